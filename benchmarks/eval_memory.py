"""Memory of `--mode=eval` as the number of samples grows: device memory of the compiled chunk program, and the
peak host memory (RSS) of the whole evaluation process.

  python benchmarks/eval_memory.py --config=configs/digits.py --num_samples=1000,10000 --out=BENCHMARKS.md

Trains the config for a couple of steps in a scratch workdir (the numbers do not depend on what the model learnt),
then runs the real entry point `python -m selfperc_jax.main --mode=eval` once per sample count, each in its own
process, and reads that process's peak RSS. The device figure is XLA's memory analysis of the program that draws and
embeds one chunk (`sample.batch_size` samples): the same program serves every sample count. For contrast it also
compiles the program the evaluation would be without chunks (all samples in one batch).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config (configs/<name>.py[:arg]).", lock_config=True)
flags.DEFINE_list("num_samples", ["1000", "10000"], "Sample counts to evaluate.")
flags.DEFINE_string("out", None, "Append the table to this markdown file (e.g. BENCHMARKS.md).")
flags.DEFINE_string("workdir", None, "Scratch workdir (default: a temporary folder).")


def _config_arg() -> str:
  return next(a for a in sys.argv if a.startswith("--config="))


def _overrides() -> list[str]:
  return [a for a in sys.argv[1:] if a.startswith("--config.")]


def _run(args: list[str]) -> tuple[float, int, str]:
  """(seconds, peak RSS in bytes, output) of `python -m selfperc_jax.main ARGS` in a fresh process."""
  wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "selfperc_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    raise SystemExit(f"error: {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
  kb = int(proc.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
  return seconds, kb * 1024, proc.stdout


def _program_bytes(config, workdir: str, batch: int) -> dict:
  """XLA's memory analysis (per device) of the chunk program with `batch` samples per chunk."""
  from selfperc_jax.setup import Setup

  config = config.copy_and_resolve_references()
  config.sample.batch_size = batch
  setup = Setup(config, workdir, with_data=False)
  evaluator = setup.evaluator()
  m = evaluator.generator.lower(setup.abstract_state.ema_params).compile().memory_analysis()
  return {"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes}


def main(argv):
  del argv
  import jax

  config = FLAGS.config
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="eval_memory_")
  common = [_config_arg(), f"--workdir={workdir}", *_overrides()]
  _run(common + ["--config.total_steps=2", "--config.sample_every=0", "--config.eval_every=0",
                 "--config.checkpoint_every=2", "--config.log_every=1"])
  counts = [int(n) for n in FLAGS.num_samples]
  chunk = _program_bytes(config, workdir, int(config.sample.batch_size))
  rows = []
  for n in counts:
    seconds, rss, _ = _run(common + ["--mode=eval", f"--config.eval.num_samples={n}"])
    whole = _program_bytes(config, workdir, -(-n // jax.device_count()) * jax.device_count())
    rows.append((n, seconds, rss, whole))
    print(f"{n} samples: {seconds:.0f} s, peak RSS {rss / 2**20:.0f} MiB, chunk program temp "
          f"{chunk['temp'] / 2**20:.1f} MiB (one batch of {n}: {whole['temp'] / 2**20:.1f} MiB)", flush=True)
  device = jax.devices()[0]
  lines = [
      f"\n### Evaluation memory vs number of samples — {datetime.date.today()}, {device.device_kind} "
      f"({jax.device_count()} device(s), {os.cpu_count()} cores)\n",
      f"`python benchmarks/eval_memory.py {' '.join([_config_arg(), *_overrides()])} "
      f"--num_samples={','.join(map(str, counts))}`; `--mode=eval` of the real entry point, one process per row; "
      f"chunks of sample.batch_size={config.sample.batch_size}, {config.sample.sampler} {config.sample.steps} "
      f"steps, guidance {config.sample.guidance_scale:g}, features {config.eval.features}.\n",
      "| samples | wall (s, incl. start-up and compile) | peak host RSS (MiB) | device temp, chunked (MiB) | "
      "device temp, one batch of all (MiB) |",
      "| --- | --- | --- | --- | --- |",
  ]
  for n, seconds, rss, whole in rows:
    lines.append(f"| {n} | {seconds:.0f} | {rss / 2**20:.0f} | {chunk['temp'] / 2**20:.1f} | "
                 f"{whole['temp'] / 2**20:.1f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write(text)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
