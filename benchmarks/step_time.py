"""Times the training step with and without the self-perceptual term, in one process, alternating.

  python benchmarks/step_time.py --config=configs/digits.py [--config.x=y ...] [--out=BENCHMARKS.md] [--json=F]
  python benchmarks/step_time.py --config=configs/digits.py --scaling=1,2,4,8 --simulate_devices=8 --out=BENCHMARKS.md
  python benchmarks/step_time.py --config=configs/imagenet256.py --analytic_only   # counts only, no compile
  python benchmarks/step_time.py --config=configs/imagenet256.py:gpu --compile_memory=1,2   # compile only, one device

Reports per-step median times of the MSE step (`perceptual.weight=0`: no perceptual code is traced) and the
self-perceptual step (the term active from step 0), their ratio, the compile times, XLA's FLOPs of both compiled
steps and their ratio, the analytic FLOPs of the U-Net forward and of its encoder half (to the 'mid' tap) with the
lower bound they give for the ratio, peak device memory from XLA's memory analysis, and the MFU where the device's
peak FLOP/s is known. `--scaling` runs the perceptual step on 1, 2, ... devices with a fixed per-device batch.
"""

from __future__ import annotations

import os
import sys

# Simulated CPU devices must be requested before JAX starts; this is the benchmark's own process.
_SIM = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--simulate_devices=")]
if _SIM and int(_SIM[0]) > 1:
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_SIM[0]}"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from selfperc_jax import config_tree, flops, sharding  # noqa: E402
from selfperc_jax.setup import Setup  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line (defined only when run as a script, so that benchmarks/device.py can import this module)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config (configs/<name>.py[:arg]).", lock_config=True)
  flags.DEFINE_integer("steps", 10, "Timed steps per measurement round.")
  flags.DEFINE_integer("rounds", 5, "Alternating measurement rounds (MSE, then perceptual, per round).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps per variant after compilation.")
  flags.DEFINE_string("out", None, "Append a dated section to this markdown file (e.g. BENCHMARKS.md).")
  flags.DEFINE_string("json", None, "Write the figures as JSON here.")
  flags.DEFINE_string("scaling", None, "Comma-separated device counts for a weak-scaling run, e.g. 1,2,4,8.")
  flags.DEFINE_integer("per_device_batch", 16, "Per-device batch of the weak-scaling run.")
  flags.DEFINE_integer("simulate_devices", 0, "Simulated CPU devices (read before JAX starts).")
  flags.DEFINE_string("compile_memory", None, "Comma-separated per-device batches: compile the self-perceptual step "
                      "on one device at each (abstract state: nothing allocated, nothing run) and print XLA's memory "
                      "analysis.")
  flags.DEFINE_bool("analytic_only", False, "Only count (no compile, no timing): params, state size and the analytic "
                    "FLOPs per step; for configs too large for this machine, e.g. configs/imagenet256.py.")
  flags.DEFINE_string("label", "", "A free-text label for the BENCHMARKS.md row (e.g. 'bf16', 'remat').")


def _cost(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def _peak_memory(compiled) -> int | None:
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - getattr(mem, "alias_size_in_bytes", 0))


def one_device(config, per_device_batch: int, **overrides):
  """The config on this process's first device alone, at this batch, with dotted-key overrides."""
  c = config.copy_and_resolve_references()
  c.mesh.data, c.mesh.fsdp = 1, 1
  c.batch_size = per_device_batch
  c.sample.batch_size = per_device_batch
  return config_tree.set_values(c, overrides)


def phase_config(config, perceptual: bool):
  """A copy of the config whose step 0 is the self-perceptual step (perceptual) or the MSE step (weight 0: no
  perceptual code traced)."""
  config = config.copy_and_resolve_references()
  if perceptual:
    config.perceptual.weight = config.perceptual.weight or 1.0
    config.perceptual.start_step = 0
    # The perceptual phase's step from step 0 on a random network: timed with the MSE term kept, which costs the
    # same as the feature term alone (and the config check refuses the latter without pre-training).
    config.perceptual.mse_weight = config.perceptual.mse_weight or 1.0
  else:
    config.perceptual.weight = 0.0
  return config


class Variant:
  """One compiled step (MSE-only or with the perceptual term) with its state and a fixed synthetic batch."""

  def __init__(self, config, perceptual: bool, seed: int = 0):
    config = phase_config(config, perceptual)
    self.config = config
    self.setup = Setup(config, with_data=False)
    self.state = self.setup.init_state(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    shape = (config.batch_size,) + tuple(self.setup.model_shape)
    label = self.setup.conditioning.batch_label(config.batch_size)
    local = {"image": np.clip(rng.normal(size=shape), -1, 1).astype(np.float32),
             "label": (rng.integers(0, config.model.num_classes, config.batch_size).astype(np.int32)
                       if label.dtype == np.int32 else np.zeros(label.shape, label.dtype))}
    self.batch = sharding.global_batch(local, self.setup.mesh)
    self.key = jax.random.key(1)
    step_fn = self.setup.step_fn(config.perceptual.start_step if perceptual else 0)
    t0 = time.perf_counter()
    self.compiled = step_fn.lower(self.state, self.batch, self.key).compile()
    self.compile_s = time.perf_counter() - t0
    self.xla_flops = _cost(self.compiled)
    self.peak_bytes = _peak_memory(self.compiled)

  def run(self, n: int) -> float:
    """Mean seconds per step over n steps."""
    t0 = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self.compiled(self.state, self.batch, self.key)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / n


def _condition(setup, b: int):
  """Zeros of the model's condition input for b examples (a class, or a text embedding)."""
  spec = setup.conditioning.example(b)
  return jnp.zeros(spec.shape, spec.dtype)


def analytic_flops(setup) -> tuple[int, int]:
  """(U-Net forward, its encoder + mid-block) matmul FLOPs at the config's batch size."""
  model, b = setup.model, setup.config.batch_size
  x = jnp.zeros((b,) + tuple(setup.model_shape))
  t, y = jnp.zeros((b,)), _condition(setup, b)
  params = setup.abstract_state.params
  full = flops.matmul_flops(lambda p: model.apply({"params": p}, x, t, y), params)
  encoder = flops.matmul_flops(lambda p: model.apply({"params": p}, x, t, y, taps=("mid",)), params)
  return full, encoder


def measure(config, steps: int, rounds: int, warmup: int) -> dict:
  mse, sp = Variant(config, False), Variant(config, True)
  for v in (mse, sp):
    v.run(warmup)
  times = {"mse": [], "sp": []}
  for _ in range(rounds):
    times["mse"].append(mse.run(steps))
    times["sp"].append(sp.run(steps))
  t_mse, t_sp = statistics.median(times["mse"]), statistics.median(times["sp"])
  forward, encoder = analytic_flops(mse.setup)
  devices = mse.setup.mesh.devices.flatten()
  peak = flops.peak_flops(devices[0])
  result = {
      "date": datetime.date.today().isoformat(),
      "device": f"{len(devices)} x {devices[0].device_kind}",
      "platform": devices[0].platform,
      "batch_size": config.batch_size,
      "model_dtype": config.model.dtype,
      "remat": bool(config.model.get("remat", False)),
      "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(mse.state.params))),
      "step_ms_mse": 1e3 * t_mse,
      "step_ms_sp": 1e3 * t_sp,
      "time_ratio": t_sp / t_mse,
      "compile_s_mse": mse.compile_s,
      "compile_s_sp": sp.compile_s,
      "xla_flops_mse": mse.xla_flops,
      "xla_flops_sp": sp.xla_flops,
      "xla_flop_ratio": sp.xla_flops / mse.xla_flops,
      "analytic_forward_flops": forward,
      "analytic_encoder_flops": encoder,
      # MSE step ~ forward + backward = 3F; the perceptual term adds the copy's forward on 2B (2E) and the
      # input-gradient backward of the predicted half (E).
      "analytic_flop_ratio": (3 * forward + 3 * encoder) / (3 * forward),
      "peak_mib_mse": None if mse.peak_bytes is None else mse.peak_bytes / 2**20,
      "peak_mib_sp": None if sp.peak_bytes is None else sp.peak_bytes / 2**20,
      "examples_per_s_sp": config.batch_size / t_sp,
      "rounds_ms_mse": [1e3 * t for t in times["mse"]],
      "rounds_ms_sp": [1e3 * t for t in times["sp"]],
  }
  if peak is not None:
    # XLA's cost analysis describes the SPMD-partitioned program, i.e. one device's share of the step.
    result["mfu_mse"] = mse.xla_flops / t_mse / peak
    result["mfu_sp"] = sp.xla_flops / t_sp / peak
  return result


def weak_scaling(config, counts, per_device_batch: int, steps: int, rounds: int, warmup: int) -> list[dict]:
  rows = []
  for n in counts:
    cfg = config.copy_and_resolve_references()
    cfg.mesh.data = n
    cfg.batch_size = per_device_batch * n
    v = Variant(cfg, True)
    v.run(warmup)
    t = statistics.median(v.run(steps) for _ in range(rounds))
    rows.append({"devices": n, "batch_size": cfg.batch_size, "step_ms_sp": 1e3 * t, "compile_s": v.compile_s})
  return rows


def _fmt(x, spec=".3g"):
  return "n/a" if x is None else format(x, spec)


def table(r: dict) -> str:
  lines = [
      f"| {r['date']} | {r['device']} | {r['label']} | {r['batch_size']} | {r['step_ms_mse']:.1f} | "
      f"{r['step_ms_sp']:.1f} | **{r['time_ratio']:.3f}** | {r['xla_flop_ratio']:.3f} | "
      f"{r['analytic_flop_ratio']:.3f} | {r['compile_s_mse']:.1f} / {r['compile_s_sp']:.1f} | "
      f"{_fmt(r['peak_mib_mse'], '.1f')} / {_fmt(r['peak_mib_sp'], '.1f')} | "
      f"{_fmt(r.get('mfu_sp'), '.1%')} |"
  ]
  return "\n".join(lines)


HEADER = ("| date | device | config | batch | MSE step ms | SP step ms | SP/MSE time | SP/MSE XLA FLOPs | "
          "SP/MSE analytic | compile s (MSE / SP) | peak MiB (MSE / SP) | MFU (SP) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def write_markdown(path: str, result: dict) -> None:
  """Appends the result's row (and its weak-scaling table) to a markdown file such as BENCHMARKS.md."""
  with open(path, "a") as f:
    f.write(f"\n{HEADER}\n{table(result)}\n")
    scaling = result.get("weak_scaling")
    if scaling:
      f.write(f"\nWeak scaling ({result['device'].split(' x ')[-1]}, fixed per-device batch, self-perceptual step):\n\n"
              "| devices | batch | SP step ms | compile s |\n| --- | --- | --- | --- |\n")
      for row in scaling:
        f.write(f"| {row['devices']} | {row['batch_size']} | {row['step_ms_sp']:.1f} | {row['compile_s']:.1f} |\n")


def stored_bytes_per_example(setup) -> int:
  """Bytes that one U-Net forward keeps for its backward, per example: the residuals of jax.vjp with respect to the
  params at batch 2 minus those at batch 1 (with model.remat, each block's input only). This is what JAX hands the
  backward on every backend; how much of it is live at once is XLA's buffer assignment's choice (XLA:CPU's memory
  analysis shows no remat saving, BENCHMARKS.md)."""
  model, params = setup.model, setup.abstract_state.params

  def stored(b):
    def residuals(p):
      x, t, y = jnp.zeros((b,) + tuple(setup.model_shape)), jnp.zeros((b,)), _condition(setup, b)
      return jax.vjp(lambda q: model.apply({"params": q}, x, t, y), p)[1]

    return sum(int(np.prod(r.shape)) * r.dtype.itemsize for r in jax.tree.leaves(jax.eval_shape(residuals, params)))

  return stored(2) - stored(1)


def compiled_memory(config, per_device_batch: int) -> dict:
  """XLA's memory analysis (GiB) of the self-perceptual step compiled on one device at this batch, from the abstract
  state: nothing is allocated or run, so configs far larger than this machine's memory can be compiled."""
  setup = Setup(phase_config(one_device(config, per_device_batch), perceptual=True), with_data=False)
  t0 = time.perf_counter()
  compiled = setup.step_fn(0).lower(setup.abstract_state, setup.abstract_batch(), jax.random.key(0)).compile()
  mem = compiled.memory_analysis()
  if mem is None:
    raise SystemExit(f"error: XLA's {jax.devices()[0].platform} backend gives no memory analysis of the step.")
  return {"batch": per_device_batch, "compile_s": time.perf_counter() - t0,
          "argument_gib": mem.argument_size_in_bytes / 2**30, "temp_gib": mem.temp_size_in_bytes / 2**30,
          "peak_gib": _peak_memory(compiled) / 2**30}


def analytic_plan(config) -> dict:
  """Counts without compiling: params, float32 train-state bytes, matmul FLOPs per step at the config's batch
  (training = forward + backward = 3 forwards; self-perceptual adds 3 encoder passes, see the header), and the
  activations one forward stores for the backward per example."""
  setup = Setup(config, with_data=False)
  forward, encoder = analytic_flops(setup)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
  state = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state))
  b = config.batch_size
  return {"params": params, "state_gb": state / 1e9, "batch_size": b, "forward_gflops_per_example": forward / b / 1e9,
          "encoder_gflops_per_example": encoder / b / 1e9, "step_tflops_mse": 3 * forward / 1e12,
          "step_tflops_sp": (3 * forward + 3 * encoder) / 1e12, "analytic_flop_ratio": (forward + encoder) / forward,
          "stored_gib_per_example": stored_bytes_per_example(setup) / 2**30}


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.compile_memory:
    rows = [compiled_memory(config, int(b)) for b in FLAGS.compile_memory.split(",")]
    for r in rows:
      print(f"batch {r['batch']}: arguments {r['argument_gib']:.2f} GiB, temporaries {r['temp_gib']:.2f} GiB, peak "
            f"{r['peak_gib']:.2f} GiB ({jax.devices()[0].platform}, compiled in {r['compile_s']:.0f} s)")
    if FLAGS.json:
      with open(FLAGS.json, "w") as f:
        json.dump(rows, f, indent=2)
    return
  if FLAGS.analytic_only:
    plan = analytic_plan(config)
    for key, value in plan.items():
      print(f"{key}: {value:,.4g}" if isinstance(value, float) else f"{key}: {value:,}")
    if FLAGS.json:
      with open(FLAGS.json, "w") as f:
        json.dump(plan, f, indent=2)
    return
  result = measure(config, FLAGS.steps, FLAGS.rounds, FLAGS.warmup)
  result["label"] = FLAGS.label or "default"
  print(HEADER)
  print(table(result))
  print(f"params {result['params']:,}; analytic forward {result['analytic_forward_flops']:.3e} FLOPs, encoder "
        f"{result['analytic_encoder_flops']:.3e}; XLA step FLOPs MSE {result['xla_flops_mse']:.3e}, "
        f"SP {result['xla_flops_sp']:.3e}")
  scaling = None
  if FLAGS.scaling:
    counts = [int(c) for c in FLAGS.scaling.split(",")]
    scaling = weak_scaling(config, counts, FLAGS.per_device_batch, FLAGS.steps, FLAGS.rounds, FLAGS.warmup)
    for row in scaling:
      print(f"weak scaling: {row['devices']} device(s), batch {row['batch_size']}: {row['step_ms_sp']:.1f} ms/step")
    result["weak_scaling"] = scaling
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=2)
  if FLAGS.out:
    write_markdown(FLAGS.out, result)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
