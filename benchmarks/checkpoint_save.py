"""Time and CPU of one checkpoint save of a config's train state, with replicated arrays split over their replicas
(orbax's replica-parallel writes for every array) and with checkpoint.MIN_REPLICA_SLICE_BYTES (the default).

  python benchmarks/checkpoint_save.py --config=configs/digits.py:tiny --devices=8 --out=BENCHMARKS.md

Each save is waited for (the async part included), in a scratch folder; the figure is the median of --saves saves
after one unmeasured save. CPU is this process's user + system time over the save (orbax's and tensorstore's threads
included). The state is replicated over the host devices, as a data-parallel run's is.
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import tempfile
import time

if __name__ == "__main__":  # the host devices, before JAX is imported (a test imports measure() alone)
  _DEVICES = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_DEVICES}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The script's flags, defined only when it runs as one (a test imports measure() beside other benchmarks, whose
  --config would clash)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config (configs/<name>.py[:arg]).", lock_config=True)
  flags.DEFINE_integer("devices", 8, "Host devices the state is replicated over.")
  flags.DEFINE_integer("saves", 3, "Measured saves per setting (after one unmeasured save).")
  flags.DEFINE_string("out", None, "Append the table to this markdown file (e.g. BENCHMARKS.md).")
  flags.mark_flag_as_required("config")


def _cpu_seconds() -> float:
  import resource

  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measure(config, state, min_slice_bytes: int, saves: int) -> tuple[float, float]:
  """(median wall s, median CPU s) of a save of `state` with checkpoint.MIN_REPLICA_SLICE_BYTES = min_slice_bytes."""
  from selfperc_jax import checkpoint

  default, checkpoint.MIN_REPLICA_SLICE_BYTES = checkpoint.MIN_REPLICA_SLICE_BYTES, min_slice_bytes
  try:
    with tempfile.TemporaryDirectory() as folder:
      saver = checkpoint.Checkpointer(os.path.join(folder, "checkpoints"), keep=2)
      walls, cpus = [], []
      for step in range(saves + 1):
        start, cpu = time.perf_counter(), _cpu_seconds()
        saver.save(step, state, {}, config)
        saver.check(wait=True)
        if step:
          walls.append(time.perf_counter() - start)
          cpus.append(_cpu_seconds() - cpu)
      saver.close()
  finally:
    checkpoint.MIN_REPLICA_SLICE_BYTES = default
  return statistics.median(walls), statistics.median(cpus)


def main(argv):
  del argv
  import jax

  from selfperc_jax import checkpoint
  from selfperc_jax.setup import Setup

  config = FLAGS.config
  config.mesh.data, config.mesh.fsdp = -1, 1
  state = Setup(config, with_data=False).init_state(jax.random.key(0))
  leaves = jax.tree.leaves(state)
  megabytes = sum(x.size * x.dtype.itemsize for x in leaves) / 1e6
  split = measure(config, state, 0, FLAGS.saves)
  whole = measure(config, state, checkpoint.MIN_REPLICA_SLICE_BYTES, FLAGS.saves)
  name = next(a for a in sys.argv if a.startswith("--config=")).split("=", 1)[1]
  lines = [
      f"#### Checkpoint save, {datetime.date.today()}, {jax.device_count()} x {jax.devices()[0].platform}, "
      f"{os.cpu_count()} cores: `{name}` ({len(leaves)} arrays, {megabytes:.1f} MB)", "",
      "| replicated arrays | save s (wall) | save CPU s |", "| --- | --- | --- |",
      f"| split over every replica (orbax's default) | {split[0]:.2f} | {split[1]:.2f} |",
      f"| split only into pieces of >= {checkpoint.MIN_REPLICA_SLICE_BYTES >> 10} KiB (ours) | {whole[0]:.2f} | "
      f"{whole[1]:.2f} |", ""]
  text = "\n".join(lines)
  print(text)
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write("\n" + text)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
