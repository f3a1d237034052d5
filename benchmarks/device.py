"""The device benchmark: one short script for one lent accelerator (an H100/H200 GPU, a TPU chip), under 8 minutes.

  python benchmarks/device.py --config=configs/imagenet256.py:gpu --out=BENCHMARKS.md

On that one device: the largest per-device batch (of --batches) at which the self-perceptual step compiles and runs,
then at that batch the MSE and self-perceptual step times of the configuration as configured, their ratio against the
analytic lower bound, XLA's FLOPs, MFU (where the chip's peak is in selfperc_jax.flops.PEAK_FLOPS), peak memory and
compile time; then the self-perceptual step with one thing changed per row: the fused 2B copy pass, float32
compute, XLA's attention instead of the automatic choice (cuDNN flash attention where it can run). Rows that do not
fit in --budget_s are skipped and say so; a variant that runs out of memory says so. The rows go to --out with the
device named.

The lent machines have jax, flax, optax and orbax but not ml_collections, grain, TensorFlow or clu: this script and
what it imports need only ml_collections beside them (carry its wheel; see BENCHMARKS.md for the command).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import step_time  # noqa: E402
from selfperc_jax import config_tree, flops  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/imagenet256.py:gpu", "Experiment config.", lock_config=True)
flags.DEFINE_string("batches", "64,32,16,8,4", "Per-device batch sizes to try, largest first.")
flags.DEFINE_integer("steps", 5, "Timed steps per round.")
flags.DEFINE_integer("rounds", 3, "Rounds (the median is reported).")
flags.DEFINE_float("budget_s", 420.0, "Stop starting new rows after this many seconds.")
flags.DEFINE_string("variants", "fused,float32,xla_attention", "Rows after the configured step, in order.")
flags.DEFINE_string("out", None, "Append the rows to this markdown file (e.g. BENCHMARKS.md).")
flags.DEFINE_string("json", None, "Write the rows as JSON here.")

# Each variant changes one thing of the configured step.
VARIANTS = {
    "fused": {"perceptual.fused": True},
    "unfused": {"perceptual.fused": False},
    "float32": {"model.dtype": "float32"},
    "bfloat16": {"model.dtype": "bfloat16"},
    "xla_attention": {"model.attention": "xla"},
    "cudnn_attention": {"model.attention": "cudnn"},
    "remat_off": {"model.remat": False},
}


def _is_oom(error: Exception) -> bool:
  text = f"{type(error).__name__}: {error}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def one_device(config, per_device_batch: int, **overrides):
  """The config on this process's first device alone, at this batch, with dotted-key overrides."""
  c = config.copy_and_resolve_references()
  c.mesh.data, c.mesh.fsdp = 1, 1
  c.batch_size = per_device_batch
  c.sample.batch_size = per_device_batch
  return config_tree.set_values(c, overrides)


def _timed(variant, steps: int, rounds: int) -> float:
  variant.run(1)  # warm-up after compilation
  return statistics.median(variant.run(steps) for _ in range(rounds))


def largest_batch(config, batches) -> tuple[int | None, list[str]]:
  """The largest per-device batch whose self-perceptual step compiles and runs; notes on the ones that did not."""
  notes = []
  for b in batches:
    try:
      v = step_time.Variant(one_device(config, b), perceptual=True)
      v.run(1)
      del v
      gc.collect()
      return b, notes
    except Exception as e:  # noqa: BLE001 -- only out-of-memory moves on to a smaller batch
      if not _is_oom(e):
        raise
      notes.append(f"batch {b}: out of memory")
      gc.collect()
  return None, notes


def _row(name, config, b, sp, t_sp, mse=None, t_mse=None, bound=None) -> dict:
  device = jax.devices()[0]
  peak = flops.peak_flops(device)
  row = {"variant": name, "device": device.device_kind, "batch": b, "dtype": config.model.dtype,
         "fused": bool(config.perceptual.fused), "attention": config.model.attention,
         "step_ms_sp": 1e3 * t_sp, "xla_tflops_sp": sp.xla_flops / 1e12, "compile_s_sp": sp.compile_s,
         "peak_gib_sp": None if sp.peak_bytes is None else sp.peak_bytes / 2**30,
         "images_per_s_sp": b / t_sp, "mfu_sp": None if peak is None else sp.xla_flops / t_sp / peak}
  if mse is not None:
    row.update(step_ms_mse=1e3 * t_mse, compile_s_mse=mse.compile_s, ratio=t_sp / t_mse, bound=bound,
               mfu_mse=None if peak is None else mse.xla_flops / t_mse / peak,
               peak_gib_mse=None if mse.peak_bytes is None else mse.peak_bytes / 2**30)
  return row


def run(config, batches, variants, steps: int = 5, rounds: int = 3, budget_s: float = 420.0) -> dict:
  t0 = time.perf_counter()
  b, notes = largest_batch(config, batches)
  result = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "device": jax.devices()[0].device_kind, "notes": notes, "rows": []}
  if b is None:
    result["notes"].append("no batch of " + ", ".join(map(str, batches)) + " fits")
    return result
  base = one_device(config, b)
  mse = step_time.Variant(base, perceptual=False)
  t_mse = _timed(mse, steps, rounds)
  forward, encoder = step_time.analytic_flops(mse.setup)
  # Lower bound of the ratio: training = 3 forwards; the copy adds its forward on both branches and the backward of
  # the predicted half (3 encoder passes unfused, 4 fused, whose backward also spans the real half).
  copy_passes = 4 if base.perceptual.fused else 3
  bound = (3 * forward + copy_passes * encoder) / (3 * forward)
  sp = step_time.Variant(base, perceptual=True)
  t_sp = _timed(sp, steps, rounds)
  result["rows"].append(_row("as configured", base, b, sp, t_sp, mse, t_mse, bound))
  del mse, sp
  gc.collect()
  for name in variants:
    if time.perf_counter() - t0 > budget_s:
      result["rows"].append({"variant": name, "skipped": f"time budget of {budget_s:.0f} s spent"})
      continue
    cfg = one_device(config, b, **VARIANTS[name])
    try:
      v = step_time.Variant(cfg, perceptual=True)
      result["rows"].append(_row(name, cfg, b, v, _timed(v, steps, rounds)))
      del v
    except Exception as e:  # noqa: BLE001 -- a variant that does not fit (or cannot run here) is a result too
      result["rows"].append({"variant": name, "skipped": "out of memory" if _is_oom(e) else
                             f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
    gc.collect()
  result["seconds"] = time.perf_counter() - t0
  return result


def _f(x, spec):
  return "n/a" if x is None else format(x, spec)


def markdown(result: dict, config_name: str) -> str:
  lines = [f"\n### {result['device']}, one device, {config_name} ({result['date']}, jax {result['jax']})\n",
           "| variant | batch | dtype | fused | attention | MSE ms | SP ms | SP/MSE | bound | XLA TFLOP (SP) | "
           "MFU (MSE / SP) | peak GiB (MSE / SP) | compile s (MSE / SP) | img/s (SP) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in result["rows"]:
    if "skipped" in r:
      lines.append(f"| {r['variant']} | {r['skipped']} |" + " |" * 12)
      continue
    lines.append(
        f"| {r['variant']} | {r['batch']} | {r['dtype']} | {r['fused']} | {r['attention']} | "
        f"{_f(r.get('step_ms_mse'), '.1f')} | {r['step_ms_sp']:.1f} | {_f(r.get('ratio'), '.3f')} | "
        f"{_f(r.get('bound'), '.3f')} | {r['xla_tflops_sp']:.3g} | {_f(r.get('mfu_mse'), '.1%')} / "
        f"{_f(r['mfu_sp'], '.1%')} | {_f(r.get('peak_gib_mse'), '.3g')} / {_f(r['peak_gib_sp'], '.3g')} | "
        f"{_f(r.get('compile_s_mse'), '.1f')} / {r['compile_s_sp']:.1f} | {r['images_per_s_sp']:.1f} |")
  for note in result["notes"]:
    lines.append(f"\n{note}")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  batches = [int(b) for b in FLAGS.batches.split(",") if b]
  variants = [v for v in FLAGS.variants.split(",") if v]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
  result = run(FLAGS.config, batches, variants, FLAGS.steps, FLAGS.rounds, FLAGS.budget_s)
  name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "configs/imagenet256.py:gpu")
  text = markdown(result, name)
  print(text)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=2)
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
