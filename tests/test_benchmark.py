"""The step-time benchmark produces well-formed figures; the MSE step carries no perceptual work; remat is exact."""

import json
import math
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import step_time
from selfperc_jax import diffusion, flops, losses, sharding
from selfperc_jax.setup import Setup


pytestmark = pytest.mark.slow  # subprocesses and end-to-end runs

@pytest.fixture
def tiny(digits_config):
  """configs/digits.py:tiny (one level, attention at 8x8: every code path the benchmarks time) on one device."""
  config = digits_config("tiny")
  config.mesh.data = 1
  return config


def test_benchmark_on_the_tiny_config_is_well_formed(tiny, tmp_path):
  result = step_time.measure(tiny, steps=1, rounds=2, warmup=1)
  for key in ("step_ms_mse", "step_ms_sp", "time_ratio", "compile_s_mse", "compile_s_sp", "xla_flops_mse",
              "xla_flops_sp", "xla_flop_ratio", "analytic_forward_flops", "analytic_encoder_flops",
              "analytic_flop_ratio", "peak_mib_mse", "peak_mib_sp"):
    assert math.isfinite(result[key]) and result[key] > 0, key
  assert len(result["rounds_ms_mse"]) == len(result["rounds_ms_sp"]) == 2
  assert result["time_ratio"] == pytest.approx(result["step_ms_sp"] / result["step_ms_mse"])
  # The perceptual step does strictly more work, and the encoder half is a strict part of the forward.
  assert result["xla_flops_sp"] > result["xla_flops_mse"]
  assert 0 < result["analytic_encoder_flops"] < result["analytic_forward_flops"]
  assert result["peak_mib_sp"] > result["peak_mib_mse"]  # the frozen copy and its activations
  assert "mfu_sp" not in result  # no known peak FLOP/s for a CPU
  result["label"] = "tiny"
  out = tmp_path / "BENCHMARKS.md"
  result["weak_scaling"] = [{"devices": 1, "batch_size": 16, "step_ms_sp": 1.0, "compile_s": 2.0}]
  step_time.write_markdown(str(out), result)
  text = out.read_text()
  assert step_time.HEADER in text and "| tiny | 32 |" in text and "| 1 | 16 | 1.0 | 2.0 |" in text
  json.dumps(result)  # JSON-serialisable as written by --json


def test_weak_scaling_keeps_the_per_device_batch(tiny):
  rows = step_time.weak_scaling(tiny, [1, 2], per_device_batch=4, steps=1, rounds=1, warmup=1)
  assert [(r["devices"], r["batch_size"]) for r in rows] == [(1, 4), (2, 8)]
  assert all(r["step_ms_sp"] > 0 for r in rows)


def _reference_mse_step(config, model, schedule, tx, learning_rate):
  """A training step written without any of the perceptual code, doing what the MSE step must do."""
  null_class, cfg = config.model.num_classes, config.loss

  def step(state, batch, base_key):
    k_t, k_eps, k_drop, k_dropout, _ = jax.random.split(jax.random.fold_in(base_key, state.step), 5)
    x0, labels = batch["image"], batch["label"]
    t = schedule.sample_t(k_t, (x0.shape[0],))
    eps = jax.random.normal(k_eps, x0.shape)
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = diffusion.q_sample(x0, eps, alpha, sigma)
    labels = jnp.where(jax.random.uniform(k_drop, labels.shape) < cfg.label_dropout, null_class, labels)

    def loss_fn(params):
      pred = model.apply({"params": params}, x_t, t, labels, train=True, rngs={"dropout": k_dropout})
      loss = losses.mse_loss(pred, x0, eps, alpha, sigma, config.diffusion.prediction)
      return loss, {"loss_mse": loss}

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)  # AdamW at a unit rate, times the run's
    updates = jax.tree.map(lambda u: learning_rate(state.step) * u, updates)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.minimum(config.sampling_ema.decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda o, n: decay * o + (1 - decay) * n, state.ema_params, params)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new_state, dict(terms, loss=loss, grad_norm=optax.tree.norm(grads), perceptual_weight=jnp.float32(0))

  return step


def test_mse_step_costs_what_a_step_without_perceptual_code_costs(tiny):
  variant = step_time.Variant(tiny, perceptual=False)
  setup = variant.setup
  assert variant.state.perceptual_params is None
  reference = sharding.jit_train_step(_reference_mse_step(setup.config, setup.model, setup.schedule, setup.tx, setup.lr_schedule),
                                      setup.mesh, setup.state_sharding)
  compiled = reference.lower(variant.state, variant.batch, variant.key).compile()
  assert step_time._cost(compiled) == pytest.approx(variant.xla_flops, rel=1e-3)
  traced = flops.matmul_flops(setup.step_fn(0), variant.state, variant.batch, variant.key)
  assert traced == flops.matmul_flops(reference, variant.state, variant.batch, variant.key)


def test_matmul_flops_counts_convolutions_and_products():
  x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert flops.matmul_flops(conv, x, k) == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)
  strided = lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert flops.matmul_flops(strided, x, k) == 2 * (2 * 4 * 4 * 5) * (3 * 3 * 3)
  assert flops.matmul_flops(lambda a, b: jnp.tanh(a @ b), jnp.ones((4, 6)), jnp.ones((6, 7))) == 2 * 4 * 7 * 6
  looped = lambda a: jax.lax.fori_loop(0, 3, lambda i, c: c @ a, a)
  assert flops.matmul_flops(looped, jnp.ones((5, 5))) == 2 * 5 * 5 * 5  # a loop body is counted once


def test_remat_recomputes_blocks_and_gives_the_same_step(tiny):
  batch = {"image": np.zeros((32, 8, 8, 1), np.float32) + 0.1, "label": np.arange(32, dtype=np.int32) % 10}
  results = {}
  for remat in (False, True):
    tiny.model.remat = remat
    tiny.perceptual.start_step = 0
    tiny.perceptual.mse_weight = 1.0  # from step 0 on a random network: the check refuses the feature loss alone
    setup = Setup(tiny, with_data=False)
    state = setup.init_state(jax.random.key(0))
    for i in range(3):
      state, metrics = setup.step_fn(i)(state, sharding.global_batch(batch, setup.mesh), jax.random.key(1))
    results[remat] = jax.device_get((state.params, metrics))
    grad = jax.grad(lambda p: setup.model.apply({"params": p}, jnp.zeros((1, 8, 8, 1)), jnp.ones(1),
                                                 jnp.zeros(1, jnp.int32)).sum())
    assert ("remat" in str(jax.make_jaxpr(grad)(state.params))) == remat  # the rematerialisation primitive
  for a, b in zip(jax.tree.leaves(results[False]), jax.tree.leaves(results[True])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_analytic_plan_counts_without_compiling(tiny):
  plan = step_time.analytic_plan(tiny)
  setup = Setup(tiny, with_data=False)
  forward, encoder = step_time.analytic_flops(setup)
  b = tiny.batch_size
  assert plan["forward_gflops_per_example"] == pytest.approx(forward / b / 1e9)
  assert 0 < plan["encoder_gflops_per_example"] < plan["forward_gflops_per_example"]
  # per-example figures do not depend on the batch; per-step ones grow with it
  tiny.batch_size = 2 * b
  double = step_time.analytic_plan(tiny)
  assert double["forward_gflops_per_example"] == pytest.approx(plan["forward_gflops_per_example"])
  assert double["step_tflops_sp"] == pytest.approx(2 * plan["step_tflops_sp"])
  # float32 params, two Adam moments, the sampling EMA and the perceptual copy: five copies of the params
  assert plan["state_gb"] == pytest.approx(5 * 4 * plan["params"] / 1e9, rel=1e-3)


def test_compiled_memory_compiles_from_the_abstract_state_and_grows_with_the_batch(tiny):
  small, large = (step_time.compiled_memory(tiny, b) for b in (4, 8))
  # The same state (params, Adam, EMA, copy) at any batch: the arguments grow by the 4 added examples alone (an 8x8x1
  # float32 image and an int32 label each); more temporaries for more examples.
  assert (large["argument_gib"] - small["argument_gib"]) * 2**30 == pytest.approx(4 * (8 * 8 * 4 + 4), rel=1e-3)
  assert 0 < small["temp_gib"] < large["temp_gib"] and small["peak_gib"] < large["peak_gib"]


def test_remat_stores_less_per_example_for_the_backward(tiny):
  """The residuals one forward keeps for its backward, per example: fewer with remat (each block's input only), the
  same for every added example, and not counting the params (which do not grow with the batch)."""
  stored = {}
  tiny.model.channel_mult, tiny.model.attention_resolutions = (1, 2), (4,)  # traced only: the two-level tiny U-Net
  for remat in (False, True):
    tiny.model.remat = remat
    setup = Setup(tiny, with_data=False)
    stored[remat] = step_time.stored_bytes_per_example(setup)
    # at least the input image is kept (float32, the model's shape), and far less than the params
    assert 4 * np.prod(setup.model_shape) <= stored[remat] < 4 * sum(x.size for x in
                                                                      jax.tree.leaves(setup.abstract_state.params))
  assert stored[True] < stored[False] / 2


def test_device_benchmark_finds_the_batch_that_fits_and_writes_its_rows(tiny, monkeypatch):
  from benchmarks import device

  real, built, failed, compiled = step_time.Variant, [], [], set()

  class TooBig:
    """A step whose state was made but whose first run runs out of memory."""

    def run(self, n):
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

  class Timed:
    """A step that fits, with made-up times and XLA figures, where the test asserts only how the rows are put
    together; the config's own Setup (no compilation) for the analytic FLOPs of the MSE step."""

    def __init__(self, config, perceptual):
      self.setup = None if perceptual else Setup(step_time.phase_config(config, False), with_data=False)
      self.xla_flops, self.compile_s, self.peak_bytes = 1e9, 0.5, 1 << 20

    def run(self, n):
      return 0.002 if self.setup is None else 0.001

  def variant(config, perceptual, seed=0):
    # A step that failed for memory is gone (its state off the device) before the next one is made.
    assert all(ref() is None for ref in failed), "the step that ran out of memory is still alive"
    built.append((config.batch_size, perceptual, bool(config.perceptual.fused)))
    if config.batch_size == 3:
      raise ValueError("not an out-of-memory error")
    if config.batch_size > 8:
      failed.append(weakref.ref(v := TooBig()))
      return v
    # The XLA FLOPs of the unfused and fused self-perceptual steps are compared below: those two are compiled (once
    # each); the other steps' figures do not enter an assertion.
    kind = (perceptual, bool(config.perceptual.fused), config.model.dtype)
    if perceptual and config.model.dtype == "float32" and kind not in compiled:
      compiled.add(kind)
      return real(config, perceptual, seed)
    return Timed(config, perceptual)

  monkeypatch.setattr(step_time, "Variant", variant)
  other = tiny.copy_and_resolve_references()
  other.perceptual.fused = True
  result = device.run([("tiny", tiny, [16, 8]), ("tiny fused", other, [16, 8])], variants=["fused", "bfloat16"],
                      steps=1, rounds=1, budget_s=1e9)
  first, second = result["sections"]
  assert first["notes"] == second["notes"] == ["batch 16: out of memory"]
  base, fused, bf16 = first["rows"]
  assert base["batch"] == fused["batch"] == 8 and base["variant"] == "as configured"
  assert base["fused"] is False and fused["fused"] is True
  assert base["dtype"] == "float32" and bf16["dtype"] == "bfloat16"
  # The bound counts 3 encoder passes for the unfused copy and 4 for the fused one: (3F + cE) / 3F, in (1, 2).
  assert 1 < base["bound"] < second["rows"][0]["bound"] < 2
  assert base["ratio"] == pytest.approx(base["step_ms_sp"] / base["step_ms_mse"])
  # The fused pass differentiates the real half too (the second config's step is the fused one).
  assert second["rows"][0]["xla_tflops_sp"] > base["xla_tflops_sp"]
  # The step that fitted in the batch search is the one timed (no second compilation of it); the configs come
  # first, then each variant for every config in turn.
  assert built == [(16, True, False), (8, True, False), (8, False, False),
                   (16, True, True), (8, True, True), (8, False, True),
                   (8, True, True), (8, True, True), (8, True, False), (8, True, True)]
  text = device.markdown(result)
  assert "| as configured | 8 | float32 | False | auto |" in text and "batch 16: out of memory" in text
  assert text.index("one device, tiny (") < text.index("one device, tiny fused (")
  over = device.run([("a", tiny, [8]), ("b", tiny, [8])], variants=["fused"], steps=1, rounds=1, budget_s=0)
  skipped = {"variant": "as configured", "skipped": "time budget of 0 s spent"}
  assert over["sections"][0]["rows"][0]["variant"] == "as configured"  # the first row always runs
  assert over["sections"][1]["rows"] == [skipped]  # and nothing else; a section without a batch gets no variants
  assert over["sections"][0]["rows"][1] == {"variant": "fused", "skipped": "time budget of 0 s spent"}
  # A config that fails for another reason than memory says why, and the next config is still measured.
  seen = []
  mixed = device.run([("bad", tiny, [3]), ("good", tiny, [8])], variants=[], steps=1, rounds=1, budget_s=1e9,
                     progress=lambda r: seen.append(sum(len(s["rows"]) + len(s["notes"]) for s in r["sections"])))
  assert mixed["sections"][0]["notes"] == ["not measured: ValueError: not an out-of-memory error"]
  assert [r["variant"] for r in mixed["sections"][1]["rows"]] == ["as configured"]
  assert seen == [1, 2]  # reported after each row, not only at the end


# What the lent machines lack (they have jax with CUDA, flax, optax, orbax and their own dependencies).
NOT_ON_THE_DEVICE = ("tensorflow", "tensorflow_datasets", "grain", "clu", "array_record", "PIL", "sklearn", "torch",
                     "safetensors", "matplotlib")


def test_device_benchmark_runs_with_only_what_the_lent_machine_has(tmp_path):
  """The script as run on the device, on the tiny digits config and a shrunk latent config, in a process where the
  packages the lent machines lack cannot be imported (optional imports that fall back may warn): a stray import
  would cost the device's time, not CI's."""
  import subprocess
  import sys

  from conftest import REPO, subprocess_env

  (tmp_path / "sitecustomize.py").write_text(
      "import importlib.abc, sys\n"
      f"ABSENT = {NOT_ON_THE_DEVICE!r}\n"
      "class Absent(importlib.abc.MetaPathFinder):\n"
      "  def find_spec(self, name, path, target=None):\n"
      "    if name.split('.')[0] in ABSENT:\n"
      "      raise ModuleNotFoundError(f'No module named {name!r} (not on the lent machine)')\n"
      "sys.meta_path.insert(0, Absent())\n")
  env = subprocess_env(8)  # as in this process, so that the tiny steps timed above are compilation-cache hits
  env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
  out = tmp_path / "rows.json"
  latent = ["--latent_config=configs/imagenet256_latent.py:gpu", "--latent_config.data.image_size=64",
            "--latent_config.model.base_channels=16", "--latent_config.model.channel_mult=(1,)",
            "--latent_config.model.attention_resolutions=(8,)", "--latent_config.model.head_channels=16",
            "--latent_config.model.dtype=float32", "--latent_config.model.remat=False"]
  proc = subprocess.run(
      [sys.executable, "benchmarks/device.py", "--config=configs/digits.py:tiny", "--config.model.channel_mult=(1,)",
       "--config.model.attention_resolutions=(8,)", *latent, "--batches=8",
       "--latent_batches=8", "--variants=", "--sd_batches=", "--steps=1", "--rounds=1", f"--json={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  probe = subprocess.run([sys.executable, "-c", "import PIL"], env=env, capture_output=True, text=True)
  assert probe.returncode != 0 and "(not on the lent machine)" in probe.stderr  # the blocker was active
  result = json.loads(out.read_text())
  pixels, latents = result["sections"]
  assert pixels["config"] == "configs/digits.py:tiny model.channel_mult=(1,) model.attention_resolutions=(8,)"
  assert latents["config"].startswith("configs/imagenet256_latent.py:gpu data.image_size=64 model.base_channels=16 "
                                     "model.channel_mult=(1,)")
  for section in (pixels, latents):
    (row,) = section["rows"]
    assert row["variant"] == "as configured" and row["batch"] == 8 and row["step_ms_sp"] > 0


def test_checkpoint_save_benchmark_times_both_settings_and_leaves_the_threshold_as_it_was(tiny):
  from benchmarks import checkpoint_save
  from selfperc_jax import checkpoint

  replicated = sharding.replicated(jax.sharding.Mesh(np.array(jax.devices()), ("data",)))
  state = {"w": jax.device_put(np.ones((64, 64), np.float32), replicated)}
  threshold = checkpoint.MIN_REPLICA_SLICE_BYTES
  for min_slice in (0, threshold):
    wall, cpu = checkpoint_save.measure(tiny, state, min_slice, saves=1)
    assert 0 < wall < 60 and 0 < cpu < 60
  assert checkpoint.MIN_REPLICA_SLICE_BYTES == threshold
