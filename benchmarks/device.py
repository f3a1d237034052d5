"""The device benchmark: one short script for one lent accelerator (an H100/H200 GPU, a TPU chip), about 8 minutes.

  python benchmarks/device.py --out=BENCHMARKS.md      # configs/imagenet256.py:gpu, then imagenet256_latent.py:gpu

For each config (the pixel one, then the latent one unless --nowith_latent), on one device: the largest per-device
batch (of --batches, or --latent_batches for the latent config) at which the self-perceptual step compiles and runs,
then at that batch the MSE and self-perceptual step times as configured, their ratio against the analytic lower
bound, XLA's FLOPs, MFU (where the chip's peak is in selfperc_jax.flops.PEAK_FLOPS), peak memory and compile time.
Then the self-perceptual step with one thing changed per row, each variant for every config in turn: the fused 2B
copy pass, float32 compute, XLA's attention instead of the automatic choice (cuDNN flash attention where it can run).
Last, if the budget is not spent: Stable Diffusion 2.1-base's guided sampling step (benchmarks/sd_sampling.py, random
weights, bf16) at the largest of --sd_batches that fits, with the full-size parameter counts and FLOPs.
No row starts after --budget_s (420 s; the last one started runs to its end, hence about 8 minutes in all): those
are written as skipped; a variant that runs out of memory says so, and a config that fails says why in a note
without losing the other's rows. Each row is printed (and --json rewritten) as soon as it is measured; the rows go
to --out at the end, also when a time limit's SIGTERM stops the run. JAX may take 95 % of the device's memory
(XLA_PYTHON_CLIENT_MEM_FRACTION, unless set). `--config.<key>=<value>` and `--latent_config.<key>=<value>` change
either config (and show in the section titles).

The lent machines have jax, flax, optax and orbax but not ml_collections, grain, TensorFlow or clu: this script and
what it imports need only ml_collections beside them (carry its wheel; see BENCHMARKS.md for the command;
tests/test_benchmark.py runs it with the others made unimportable).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX preallocates 75 % of a GPU's memory by default; the batch search should see (nearly) all of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import sd_sampling, step_time  # noqa: E402
from selfperc_jax import flops  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG, DEFAULT_LATENT_CONFIG = "configs/imagenet256.py:gpu", "configs/imagenet256_latent.py:gpu"

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(REPO, DEFAULT_CONFIG), "The (pixel) config.",
                                lock_config=True)
config_flags.DEFINE_config_file("latent_config", os.path.join(REPO, DEFAULT_LATENT_CONFIG),
                                "The second (latent) config.", lock_config=True)
flags.DEFINE_bool("with_latent", True, "Also measure --latent_config.")
flags.DEFINE_string("batches", "64,32,16,8,4", "Per-device batch sizes to try for --config, largest first.")
flags.DEFINE_string("latent_batches", "256,128,64,32,16", "The same for --latent_config (its step costs 1/31 "
                    "of the pixel step per image, so larger batches fit).")
flags.DEFINE_integer("steps", 5, "Timed steps per round.")
flags.DEFINE_integer("rounds", 3, "Rounds (the median is reported).")
flags.DEFINE_float("budget_s", 420.0, "Start no new row after this many seconds.")
flags.DEFINE_string("variants", "fused,float32,xla_attention", "Rows after the configured steps, in order.")
flags.DEFINE_string("sd_batches", "32,16,8,4", "Last, within the budget: Stable Diffusion 2.1-base's guided sampling "
                    "step (benchmarks/sd_sampling.py) at the largest of these batches that fits; '' for none.")
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


def _measured(variant, steps: int, rounds: int) -> dict:
  """The variant's median seconds per step (after one warm-up step) and its compile figures."""
  variant.run(1)
  return {"t": statistics.median(variant.run(steps) for _ in range(rounds)), "xla_flops": variant.xla_flops,
          "compile_s": variant.compile_s, "peak_bytes": variant.peak_bytes}


def largest_batch(config, batches):
  """(batch, its compiled self-perceptual step, notes): the largest per-device batch whose self-perceptual step
  compiles and runs. The step that fitted is returned so that it is timed without a second compilation."""
  notes = []
  for b in batches:
    try:
      v = step_time.Variant(step_time.one_device(config, b), perceptual=True)
      v.run(1)
      return b, v, notes
    except Exception as e:  # noqa: BLE001 -- only out-of-memory moves on to a smaller batch
      if not _is_oom(e):
        raise
      notes.append(f"batch {b}: out of memory")
    v = None
    gc.collect()  # out of the except block, whose traceback held the failed step's state: it leaves the device now
  return None, None, notes


def _gib(n):
  return None if n is None else n / 2**30


def _row(name, config, b, sp: dict, mse: dict | None = None, bound=None) -> dict:
  device = jax.devices()[0]
  peak = flops.peak_flops(device)
  row = {"variant": name, "device": device.device_kind, "batch": b, "dtype": config.model.dtype,
         "fused": bool(config.perceptual.fused), "attention": config.model.attention,
         "step_ms_sp": 1e3 * sp["t"], "xla_tflops_sp": sp["xla_flops"] / 1e12, "compile_s_sp": sp["compile_s"],
         "peak_gib_sp": _gib(sp["peak_bytes"]), "images_per_s_sp": b / sp["t"],
         "mfu_sp": None if peak is None else sp["xla_flops"] / sp["t"] / peak}
  if mse is not None:
    row.update(step_ms_mse=1e3 * mse["t"], compile_s_mse=mse["compile_s"], ratio=sp["t"] / mse["t"], bound=bound,
               mfu_mse=None if peak is None else mse["xla_flops"] / mse["t"] / peak,
               peak_gib_mse=_gib(mse["peak_bytes"]))
  return row


def _as_configured(config, batches, steps: int, rounds: int, section: dict) -> None:
  """The section's first row: at the largest batch that fits, the MSE and self-perceptual steps as configured (one
  at a time on the device: the batch that fitted the self-perceptual step alone fits the MSE step alone)."""
  b, sp, notes = largest_batch(config, batches)
  section["notes"] += notes
  if b is None:
    section["notes"].append("no batch of " + ", ".join(map(str, batches)) + " fits")
    return
  section["batch"] = b
  base = step_time.one_device(config, b)
  sp_figures = _measured(sp, steps, rounds)
  del sp
  gc.collect()
  mse = step_time.Variant(base, perceptual=False)
  mse_figures = _measured(mse, steps, rounds)
  forward, encoder = step_time.analytic_flops(mse.setup)
  # Lower bound of the ratio: training = 3 forwards; the copy adds its forward on both branches and the backward of
  # the predicted half (3 encoder passes unfused, 4 fused, whose backward also spans the real half).
  copy_passes = 4 if base.perceptual.fused else 3
  bound = (3 * forward + copy_passes * encoder) / (3 * forward)
  section["rows"].append(_row("as configured", base, b, sp_figures, mse_figures, bound))


def _variant(config, name: str, steps: int, rounds: int, section: dict) -> None:
  """One self-perceptual row with one thing changed, at the section's batch."""
  cfg = step_time.one_device(config, section["batch"], **VARIANTS[name])
  try:
    v = step_time.Variant(cfg, perceptual=True)
    section["rows"].append(_row(name, cfg, section["batch"], _measured(v, steps, rounds)))
  except Exception as e:  # noqa: BLE001 -- a variant that does not fit (or cannot run here) is a result too
    section["rows"].append({"variant": name, "skipped": "out of memory" if _is_oom(e) else
                            f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})


def run(configs, variants, steps: int = 5, rounds: int = 3, budget_s: float = 420.0, progress=None) -> dict:
  """configs: [(name, config, per-device batches to try, largest first)]. Every config's row as configured first, then
  the variants in turn over the configs (fused for each config, then float32 for each, ...), so that a short
  budget still measures every config; work that would start after budget_s seconds is skipped and says so (the
  first config's row always runs). progress(result) is called after each row, with the rows so far."""
  t0 = time.perf_counter()
  result = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "device": jax.devices()[0].device_kind,
            "sections": [{"config": c[0], "batch": None, "rows": [], "notes": []} for c in configs]}
  skip = f"time budget of {budget_s:.0f} s spent"
  work = [(_as_configured, None, i) for i in range(len(configs))]
  work += [(_variant, name, i) for name in variants for i in range(len(configs))]
  for k, (what, name, i) in enumerate(work):
    section, (_, config, batches) = result["sections"][i], configs[i]
    if what is _variant and section["batch"] is None:
      continue  # nothing fitted: the section's note says so
    if k > 0 and time.perf_counter() - t0 > budget_s:
      section["rows"].append({"variant": name or "as configured", "skipped": skip})
    elif what is _as_configured:
      try:
        _as_configured(config, batches, steps, rounds, section)
      except Exception as e:  # noqa: BLE001 -- one config that cannot run must not lose the other's rows
        section["notes"].append(f"not measured: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    else:
      _variant(config, name, steps, rounds, section)
    gc.collect()
    result["seconds"] = time.perf_counter() - t0
    if progress is not None:
      progress(result)
  return result


def sd_rows(batches, facts_kwargs=None, **kwargs) -> str:
  """SD 2.1-base's guided sampling step (random weights, bf16) at the largest of `batches` that fits, as markdown
  (the full-size counts and FLOPs with it). kwargs go to sd_sampling.measure, facts_kwargs to sd_sampling.facts
  (the tests pass small layouts)."""
  notes = []
  for b in batches:
    try:
      row = sd_sampling.measure(b, **kwargs)
      break
    except Exception as e:  # noqa: BLE001 -- the next smaller batch, or a note
      notes.append(f"batch {b}: {'out of memory' if _is_oom(e) else type(e).__name__ + ': ' + str(e)[:160]}")
      gc.collect()
  else:
    return "\nStable Diffusion sampling step: not measured (" + "; ".join(notes) + ").\n"
  facts = sd_sampling.facts(**(facts_kwargs or {}))
  return sd_sampling.markdown(facts, timed=[row]) + "".join(f"\n{n}" for n in notes) + "\n"


def _f(x, spec):
  return "n/a" if x is None else format(x, spec)


def markdown(result: dict) -> str:
  lines = []
  for section in result["sections"]:
    lines += [f"\n### {result['device']}, one device, {section['config']} ({result['date']}, jax {result['jax']})\n",
              "| variant | batch | dtype | fused | attention | MSE ms | SP ms | SP/MSE | bound | XLA TFLOP (SP) | "
              "MFU (MSE / SP) | peak GiB (MSE / SP) | compile s (MSE / SP) | img/s (SP) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in section["rows"]:
      if "skipped" in r:
        lines.append(f"| {r['variant']} | {r['skipped']} |" + " |" * 12)
        continue
      lines.append(
          f"| {r['variant']} | {r['batch']} | {r['dtype']} | {r['fused']} | {r['attention']} | "
          f"{_f(r.get('step_ms_mse'), '.1f')} | {r['step_ms_sp']:.1f} | {_f(r.get('ratio'), '.3f')} | "
          f"{_f(r.get('bound'), '.3f')} | {r['xla_tflops_sp']:.3g} | {_f(r.get('mfu_mse'), '.1%')} / "
          f"{_f(r['mfu_sp'], '.1%')} | {_f(r.get('peak_gib_mse'), '.3g')} / {_f(r['peak_gib_sp'], '.3g')} | "
          f"{_f(r.get('compile_s_mse'), '.1f')} / {r['compile_s_sp']:.1f} | {r['images_per_s_sp']:.1f} |")
    for note in section["notes"]:
      lines.append(f"\n{note}")
  if "seconds" in result:
    lines.append(f"\n({result['seconds']:.0f} s for all of the above.)")
  return "\n".join(lines) + "\n"


def _config_name(flag: str) -> str:
  """The config file (relative to the repository where it is in it) and its command-line overrides, for titles."""
  name = config_flags.get_config_filename(FLAGS[flag])
  if os.path.isabs(name) and name.startswith(REPO + os.sep):
    name = os.path.relpath(name, REPO)
  overrides = config_flags.get_override_values(FLAGS[flag])
  return name + "".join(f" {k}={v}" for k, v in overrides.items())


def main(argv):
  del argv

  def batches(flag):
    return [int(b) for b in flag.split(",") if b]

  variants = [v for v in FLAGS.variants.split(",") if v]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
  configs = [(_config_name("config"), FLAGS.config, batches(FLAGS.batches))]
  if FLAGS.with_latent:
    configs.append((_config_name("latent_config"), FLAGS.latent_config, batches(FLAGS.latent_batches)))
  latest = {}

  def progress(result):
    """Each row as soon as it is measured: a run stopped part-way (a time limit) keeps what it has."""
    latest["result"] = result
    print(markdown(result), flush=True)
    if FLAGS.json:
      with open(FLAGS.json, "w") as f:
        json.dump(result, f, indent=2)

  # A time limit's SIGTERM ends the run through `finally`, which still writes the rows measured so far to --out.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  t0 = time.perf_counter()
  try:
    run(configs, variants, FLAGS.steps, FLAGS.rounds, FLAGS.budget_s, progress)
  finally:
    if FLAGS.out and "result" in latest:
      with open(FLAGS.out, "a") as f:
        f.write(markdown(latest["result"]))
  sd_batches = batches(FLAGS.sd_batches)
  if sd_batches and time.perf_counter() - t0 < FLAGS.budget_s:
    text = sd_rows(sd_batches, steps=FLAGS.steps, rounds=FLAGS.rounds)
    print(text, flush=True)
    if FLAGS.out:
      with open(FLAGS.out, "a") as f:
        f.write(text)


if __name__ == "__main__":
  app.run(main)
