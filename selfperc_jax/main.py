"""Entry point: python -m selfperc_jax.main --config=configs/digits.py --workdir=DIR [--mode=train|sample|eval]."""

from __future__ import annotations

import os
import sys

# TensorFlow (imported by the TensorBoard writer) prints C++ start-up chatter unless told otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# On a CPU-only machine JAX makes one device of all cores, and XLA spreads the small convolutions of a model like
# the digits U-Net badly over them: several devices (the batch data-parallel over them) measured faster, 4 fastest
# for today's digits default (BENCHMARKS.md). Only the host platform is affected; accelerators are not.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

from absl import app, flags, logging
from ml_collections import config_flags

from selfperc_jax.errors import EXIT_STOPPED, Stopped, UserError

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


def _flag_error(e: Exception) -> str:
  """One line for a flag or config-file mistake (absl and ml_collections wrap them in nested tracebacks)."""
  text = str(e)
  if "No such file or directory" in text:
    path = text.split("No such file or directory: ", 1)[1].split("\n")[0].strip("'\"")
    return (f"config file {path} does not exist; give --config=configs/<name>.py[:arg] "
            f"(e.g. configs/digits.py or configs/imagenet256.py).")
  if "Did you mean" in text or isinstance(e, (AttributeError, KeyError)):
    lines = [l.strip(" '\"") for l in text.replace("\\n", "\n").replace("\\'", "'").split("\n") if l.strip(" '\"")]
    key = next((a.split("=", 1)[0][len("--config."):] for a in sys.argv if a.startswith("--config.")
                and lines and lines[0].strip("'") in a.split("=", 1)[0]), lines[0] if lines else "?")
    hint = next((l for l in lines if l.startswith("Did you mean")), "")
    from selfperc_jax import validation  # only on this error path: it imports JAX
    renamed = validation.renamed_message(key)
    if renamed:
      return renamed
    return f"unknown config key {key}. {hint}".strip() + " (python -m selfperc_jax.main --helpfull lists the keys)"
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  causes = [l for l in lines if l.startswith(("ValueError:", "KeyError:", "TypeError:"))]
  return (causes[-1].split(": ", 1)[1] if causes else lines[-1] if lines else type(e).__name__)


def parse_flags(argv, workdir: bool = True):
  """absl's flag parsing, with every mistake in --config (file, argument, key, value) as one error line, exit 2.
  --config is required, and --workdir unless workdir=False (a command that writes no workdir)."""
  try:
    rest = FLAGS(argv)
    for name in ("config", "workdir") if workdir else ("config",):
      if FLAGS[name].value is None:
        print(f"error: --{name} is required (e.g. --config=configs/digits.py --workdir=workdirs/digits).",
              file=sys.stderr, flush=True)
        sys.exit(2)
    FLAGS.config.keys()  # a config file that failed to load raises only when the config is read
    return rest
  except SystemExit:
    raise
  except Exception as e:  # absl's flags.Error and the config loader's own errors alike
    print(f"error: {_flag_error(e)}", file=sys.stderr, flush=True)
    sys.exit(2)


def configure_logging() -> None:
  if not FLAGS["verbosity"].present:
    # Orbax and TensorFlow log every save at INFO; the run's own progress goes to stdout. -v 0 brings them back.
    logging.set_verbosity(logging.WARNING)


def run_reporting_errors(job) -> None:
  """Starts jax.distributed as the flags say, then runs job(); a UserError becomes one "error:" line, exit 2; a run
  stopped with a checkpoint to be resumed (SIGTERM, preemption, Ctrl-C) exits with EXIT_STOPPED (75)."""
  from selfperc_jax import distributed  # imported here so that `--help` and flag errors come back before JAX starts

  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed)
    job()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except Stopped as e:
    print(f"stopped: {e}", flush=True)
    sys.exit(EXIT_STOPPED)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  configure_logging()

  def job():
    from selfperc_jax import modes, train

    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
      modes.sample_from_checkpoint(FLAGS.config, FLAGS.workdir)
    else:
      modes.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)

  run_reporting_errors(job)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
