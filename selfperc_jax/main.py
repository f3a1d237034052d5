"""Entry point: python -m selfperc_jax.main --config=configs/digits.py --workdir=DIR [--mode=train|sample]."""

from __future__ import annotations

import os
import sys

# TensorFlow (imported by the TensorBoard writer) prints C++ start-up chatter unless told otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
from ml_collections import config_flags

from selfperc_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples (created if missing).")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"],
                  "train: train (resuming from the workdir's latest checkpoint); sample: sample from it; "
                  "eval: score it (FID etc.) into workdir/eval/step_<STEP>.json.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for multi-process runs outside Cloud TPU and SLURM (which are detected).")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Start jax.distributed: 'auto' on SLURM jobs of several tasks, GKE TPU pods and Cloud TPU VMs "
                  "(JAX finds the other workers itself); 'on' always; 'off' never (one process).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:
    # Orbax and TensorFlow log every save at INFO; the run's own progress goes to stdout. -v 0 brings them back.
    logging.set_verbosity(logging.WARNING)
  # Imported here so that `--help` and flag errors come back before JAX starts up.
  from selfperc_jax import distributed, modes, train

  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed)
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
      modes.sample_from_checkpoint(FLAGS.config, FLAGS.workdir)
    else:
      modes.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
