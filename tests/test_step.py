"""The jitted training step: data-parallel over 8 simulated devices equals one device; its pieces behave."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from selfperc_jax import input_pipeline, sharding, step as step_lib
from selfperc_jax.errors import ConfigError
from selfperc_jax.setup import Setup

from conftest import override


def _build(config, num_devices, fsdp=1):
  """(mesh, make_state, step_fn): one compilation per phase serves several runs from the same initial state."""
  config.mesh.data = num_devices // fsdp
  config.mesh.fsdp = fsdp
  setup = Setup(config)
  return setup.mesh, lambda: setup.init_state(jax.random.key(0)), setup.step_fn


def _run(config, num_devices, batches, built=None, fsdp=1):
  mesh, make_state, train_step = built or _build(config, num_devices, fsdp=fsdp)
  state = make_state()
  history = []
  for i, batch in enumerate(batches):
    state, metrics = train_step(i)(state, sharding.global_batch(batch, mesh), jax.random.key(1))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history, state


@pytest.fixture
def small_config(digits_config):
  config = digits_config("tiny")
  config.perceptual.start_step = 2  # two MSE steps, then the snapshot, then self-perceptual steps
  config.model.dropout = 0.1  # exercises the dropout RNG under sharding too
  return config


def _batches(config, n):
  pipeline = input_pipeline.build(config)
  return [next(pipeline) for _ in range(n)]


def _assert_same_run(hist_a, state_a, hist_b, state_b):
  for m1, m2 in zip(hist_a, hist_b):
    for k in m1:
      np.testing.assert_allclose(m1[k], m2[k], rtol=2e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)


@pytest.mark.slow
def test_eight_devices_with_fsdp_equal_one_device(small_config):
  """8 devices, the batch split over all of them and the state split 4 ways (FSDP, mesh 2 x 4), train exactly what
  one device trains. (Pure data parallelism over 8 devices is compared with 2 processes in test_multihost.py.)"""
  assert jax.device_count() == 8
  small_config.mesh.fsdp_min_size = 64
  batches = _batches(small_config, 4)
  state1, hist1, _ = _run(small_config, 1, batches)
  assert hist1[-1]["loss_perceptual"] > 0  # the perceptual term was active in the compared steps
  state_f, hist_f, live = _run(small_config, 8, batches, fsdp=4)
  assert len(live.params["in_conv"]["kernel"].sharding.device_set) == 8
  kernel = live.params["enc_0_0"]["conv1"]["kernel"]  # (3, 3, 16, 16): split on the first of its largest axes
  assert kernel.sharding.spec == P(None, None, "fsdp")
  assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 4, 16)}
  mu = live.opt_state[1][0].mu["enc_0_0"]["conv1"]["kernel"]  # the Adam moment is split like its param
  assert mu.sharding.spec == kernel.sharding.spec
  assert live.params["enc_0_0"]["norm1"]["scale"].sharding.spec == P()  # 16 values: stays replicated
  _assert_same_run(hist1, state1, hist_f, state_f)


def test_mesh_shapes_from_config():
  shape = lambda data, fsdp, n=8: sharding.mesh_shape(ml_collections.ConfigDict({"data": data, "fsdp": fsdp}), n)
  assert shape(-1, 1) == (8, 1) and shape(-1, 4) == (2, 4) and shape(2, -1) == (2, 4) and shape(2, 2) == (2, 2)
  for bad in ((3, 3), (-1, 3)):  # too many devices, no divisor (values without devices: validation's)
    with pytest.raises(ConfigError):
      shape(*bad)


def test_multislice_mesh_keeps_each_fsdp_group_inside_one_slice():
  """Two TPU slices of 4 devices (stand-ins with a slice_index): the data axis spans the slices, fsdp never does."""
  import dataclasses

  @dataclasses.dataclass(frozen=True)
  class Device:
    id: int
    slice_index: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"

  devices = [Device(i, slice_index=i % 2, process_index=i % 2) for i in range(8)]  # slices interleaved in the list
  for rows, fsdp in ((2, 4), (4, 2), (8, 1)):
    grid = sharding.device_grid(rows, fsdp, devices)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    assert grid.shape == (rows, fsdp) and len({d.id for d in grid.flat}) == 8
    assert all(len(set(row)) == 1 for row in slices)  # each fsdp group: one slice
    assert sorted(slices[:, 0].tolist()) == [0] * (rows // 2) + [1] * (rows // 2)
  with pytest.raises(ConfigError, match="must be a multiple of 2"):
    sharding.device_grid(1, 8, devices)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["ema", "online"])
def test_copy_is_its_source_at_the_start_step_then_stays_frozen(small_config, source):
  """The paper's setting: from the start step on, the loss is the feature distance alone (perceptual.mse_weight=0)
  against a copy equal to the chosen source (sampling EMA or online params) at the start step, never changed after."""
  small_config.perceptual.copy_source = source
  assert small_config.perceptual.mse_weight == 0.0 and small_config.perceptual.copy_ema_decay == 1.0
  batches = _batches(small_config, 4)
  mesh, make_state, train_step = _build(small_config, 1)
  state = make_state()
  snapshots, history = [], []
  for i, batch in enumerate(batches):
    state, metrics = train_step(i)(state, sharding.global_batch(batch, mesh), jax.random.key(1))
    snapshots.append(jax.device_get((state.params, state.ema_params, state.perceptual_params)))
    history.append(jax.device_get(metrics))
  leaf = lambda tree: np.asarray(tree["in_conv"]["kernel"])
  chosen = 1 if source == "ema" else 0
  # After steps 1 and 2 (the MSE phase) the copy equals its source; afterwards it keeps the value of step 2.
  for i in (0, 1):
    np.testing.assert_array_equal(leaf(snapshots[i][2]), leaf(snapshots[i][chosen]))
  np.testing.assert_array_equal(leaf(snapshots[3][2]), leaf(snapshots[1][chosen]))
  assert not np.array_equal(leaf(snapshots[1][0]), leaf(snapshots[1][1]))  # EMA and online differ: the choice matters
  assert not np.array_equal(leaf(snapshots[3][0]), leaf(snapshots[1][0]))  # while the online params moved on
  for m in history[:2]:  # MSE pre-training: the MSE loss alone
    assert m["loss"] == m["loss_mse"] and m["loss_perceptual"] == 0.0 and m["perceptual_weight"] == 0.0
  for m in history[2:]:  # then the feature distance alone, whatever the MSE would be
    assert m["loss"] == pytest.approx(m["loss_perceptual"], rel=1e-6) and m["loss_mse"] > 0


@pytest.mark.slow
def test_copy_with_decay_below_one_follows_the_online_params(small_config):
  small_config.perceptual.copy_ema_decay = 0.5
  small_config.perceptual.copy_source = "online"
  batches = _batches(small_config, 3)
  mesh, make_state, train_step = _build(small_config, 1)
  state = make_state()
  for i, batch in enumerate(batches):
    before = jax.device_get(state.perceptual_params)
    state, _ = train_step(i)(state, sharding.global_batch(batch, mesh), jax.random.key(1))
  after, online = jax.device_get((state.perceptual_params, state.params))
  leaf = lambda tree: np.asarray(tree["in_conv"]["kernel"])
  np.testing.assert_allclose(leaf(after), 0.5 * leaf(before) + 0.5 * leaf(online), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_mse_only_step_has_no_copy_and_no_perceptual_term(digits_config):
  config = digits_config("tiny,mse")
  batches = _batches(config, 2)
  _, hist, state = _run(config, 1, batches)
  assert state.perceptual_params is None
  assert "loss_perceptual" not in hist[0]
  np.testing.assert_allclose(hist[0]["loss"], hist[0]["loss_mse"])


@pytest.mark.slow
def test_shared_copy_uses_the_sampling_ema(small_config):
  small_config.perceptual.share_with_sampling_ema = True
  _, hist, state = _run(small_config, 1, _batches(small_config, 3))
  assert state.perceptual_params is None
  assert hist[-1]["loss_perceptual"] > 0


def test_perceptual_weight_schedule():
  cfg = ml_collections.ConfigDict(dict(weight=2.0, start_step=10, ramp_steps=4))
  w = [float(step_lib.perceptual_weight(cfg, s)) for s in (0, 9, 10, 11, 13, 100)]
  assert w == pytest.approx([0.0, 0.0, 0.5, 1.0, 2.0, 2.0])


def test_learning_rate_warms_up_then_decays(digits_config):
  config = digits_config("")
  _, lr = step_lib.make_optimizer(config)
  peak, warm = config.optimizer.learning_rate, config.optimizer.warmup_steps
  assert float(lr(0)) == 0.0
  assert float(lr(warm // 2)) == pytest.approx(peak / 2, rel=1e-3)
  assert float(lr(warm)) == pytest.approx(peak, rel=1e-3)
  assert float(lr(config.total_steps)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("label_dropout", [0.0, 1.0 - 1e-7])
def test_label_dropout_reaches_the_null_class(small_config, label_dropout):
  """With label dropout ~1 every example trains unconditionally, so the class labels no longer change the loss."""
  small_config.loss.label_dropout = label_dropout
  small_config.perceptual.weight = 0.0  # one compiled phase is enough here
  small_config.optimizer.warmup_steps = 0  # the first step must already move the params
  batches = _batches(small_config, 4)
  relabelled = [{"image": b["image"], "label": (b["label"] + 3) % 10} for b in batches]
  built = _build(small_config, 1)
  # Zero-initialised output convs hide the class embedding for two steps (and dim it in the third), so compare the
  # fourth.
  loss = _run(small_config, 1, batches, built)[1][3]["loss"]
  loss_relabelled = _run(small_config, 1, relabelled, built)[1][3]["loss"]
  if label_dropout > 0.5:
    np.testing.assert_allclose(loss, loss_relabelled, rtol=1e-6)
  else:
    assert abs(loss - loss_relabelled) > 1e-6


@pytest.mark.slow
def test_gradient_accumulation_gives_the_full_batch_update(small_config, monkeypatch):
  """optimizer.accumulate_steps=4 (micro-batches of 8 over 2 devices) trains what one batch of 32 trains, through
  the self-perceptual step from step 0, whose loss holds the MSE term beside the perceptual one (the MSE phase's loss
  is that term alone, through the same micro-batch loop; shared noise: every per-example draw must reach its
  micro-batch). Plain SGD here: Adam's first steps are sign(g) * lr, which flips on float-rounding noise where g is
  ~0."""
  import optax

  monkeypatch.setattr(step_lib, "make_optimizer", lambda config: (optax.sgd(0.1), optax.constant_schedule(0.1)))
  small_config.perceptual.start_step = 0  # one program per run: the perceptual phase's
  small_config.perceptual.noise = "shared"
  small_config.model.dropout = 0.0  # dropout masks are drawn per micro-batch: the one thing that differs
  small_config.perceptual.mse_weight = 0.5
  small_config.loss.min_snr_gamma = 5.0
  batches = _batches(small_config, 2)
  full_state, full_hist, _ = _run(small_config, 2, batches)
  small_config.optimizer.accumulate_steps = 4
  acc_state, acc_hist, _ = _run(small_config, 2, batches)
  assert all(h["loss_perceptual"] > 0 and h["loss_mse"] > 0 for h in full_hist)
  _assert_same_run(full_hist, full_state, acc_hist, acc_state)


def test_micro_batches_are_strided_slices():
  x = np.arange(12).reshape(12, 1)
  parts = np.asarray(step_lib.micro_batches({"x": x}, 3)["x"])
  assert parts.shape == (3, 4, 1)
  np.testing.assert_array_equal(parts[1, :, 0], [1, 4, 7, 10])


@pytest.mark.slow
def test_step_flops_are_per_device_and_count_the_perceptual_term(small_config):
  per_device = {}
  for devices in (1, 8):
    setup = Setup(_config_with(small_config, devices))
    per_device[devices] = (setup.step_flops(0), setup.step_flops(small_config.perceptual.start_step))
  (mse1, sp1), (mse8, sp8) = per_device[1], per_device[8]
  assert mse8 == pytest.approx(mse1 / 8, rel=1e-6) and sp8 == pytest.approx(sp1 / 8, rel=1e-6)
  assert 1.2 < sp1 / mse1 < 1.6  # the copy's extra encoder passes (analytic bound 1.35 for this layout)
  # The loop's way: the live arguments of a step that ran (jit's kept trace, lowered again for nothing): the same.
  setup = Setup(_config_with(small_config, 8), with_data=True)
  state, batch, key = setup.init_state(jax.random.key(0)), sharding.global_batch(next(setup.pipeline), setup.mesh), \
      jax.random.key(1)
  state, _ = setup.step_fn(0)(state, batch, key)
  assert setup.step_flops(0, (state, batch, key)) == pytest.approx(mse8, rel=1e-9)


def _config_with(config, devices):
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.data, config.mesh.fsdp = devices, 1
  return config


def _recipe(config, **finetune):
  """A copy of config with these finetune.* values."""
  return override(ml_collections.ConfigDict(config.to_dict()), **{f"finetune.{k}": v for k, v in finetune.items()})


def test_a_single_run_pretrains_on_the_optimizer_schedule_then_fine_tunes_on_the_finetune_one(digits_config):
  """configs/digits.py: optimizer.*'s schedule over the first perceptual.start_step steps (the comparison's
  pre-training stage), then finetune.*'s over the rest; 'run' keeps the one schedule of before over the whole run."""
  config = _recipe(digits_config(""), decay="cosine")  # (the default is 'run', tested last)
  start, total, peak = config.perceptual.start_step, config.total_steps, config.optimizer.learning_rate
  assert step_lib.fine_tuning_start(config) == start == step_lib.transition_step(config)
  pre = step_lib.learning_rate_schedule(config.optimizer, start)
  lr = step_lib.learning_rate_fn(config)
  assert [float(lr(s)) for s in range(0, start, 97)] == [float(pre(s)) for s in range(0, start, 97)]
  assert float(lr(start - 1)) == pytest.approx(0.0, abs=1e-7)  # the pre-training's cosine ends annealed
  # learning_rate 0 and warmup_steps 0: the pre-training's peak at the first fine-tuning step, a cosine to 0.
  assert float(lr(start)) == pytest.approx(peak, rel=1e-6) and float(lr(total)) == pytest.approx(0.0, abs=1e-9)
  lr = step_lib.learning_rate_fn(_recipe(config, learning_rate=2e-4, warmup_steps=10, decay="constant"))
  assert float(lr(start)) == 0.0 and float(lr(start + 5)) == pytest.approx(1e-4, rel=1e-5)
  assert float(lr(start + 10)) == float(lr(total - 1)) == pytest.approx(2e-4, rel=1e-6)
  old = step_lib.learning_rate_schedule(config.optimizer, total)
  for run in (_recipe(config, decay="run"), digits_config("")):  # 'run', the default
    lr = step_lib.learning_rate_fn(run)
    assert [float(lr(s)) for s in range(0, total, 101)] == [float(old(s)) for s in range(0, total, 101)]


def test_an_init_from_run_is_all_fine_tuning_and_a_run_without_the_switch_has_none(digits_config):
  config = override(digits_config(""), init_from="/somewhere", total_steps=1000)
  assert step_lib.fine_tuning_start(config) == 0 and step_lib.transition_step(config) is None
  lr = step_lib.learning_rate_fn(_recipe(config, learning_rate=3e-4, warmup_steps=0, decay="cosine"))
  assert float(lr(0)) == pytest.approx(3e-4, rel=1e-6) and float(lr(1000)) == pytest.approx(0.0, abs=1e-9)
  lr = step_lib.learning_rate_fn(_recipe(config, decay="run"))  # the re-warm recipe of before: optimizer.* anew
  peak = config.optimizer.learning_rate
  assert float(lr(0)) == 0.0 and float(lr(config.optimizer.warmup_steps)) == pytest.approx(peak, rel=1e-6)
  for args, overrides in (("mse", {}), ("", {"perceptual.start_step": 0, "perceptual.mse_weight": 1.0})):
    plain = override(digits_config(args), **overrides)
    assert step_lib.fine_tuning_start(plain) is None
    whole = step_lib.learning_rate_schedule(plain.optimizer, plain.total_steps)
    lr = step_lib.learning_rate_fn(plain)
    assert [float(lr(s)) for s in range(0, 2400, 151)] == [float(whole(s)) for s in range(0, 2400, 151)]


def test_the_sampling_ema_decay_at_the_fine_tuning_start(digits_config):
  """'carry': the full decay from the first fine-tuning step on; 'restart': the warm-up anew; 'run': the warm-up
  over the run's steps (the recipe of before). Before the start, every one warms up over the run's steps."""
  config = digits_config("")
  start, full = config.perceptual.start_step, config.sampling_ema.decay
  warm = lambda s: min(full, (1 + s) / (10 + s))
  decay = {mode: step_lib.sampling_ema_schedule(_recipe(config, sampling_ema=mode))
           for mode in ("carry", "restart", "run")}
  for mode, expected in (("carry", full), ("restart", warm(0)), ("run", warm(start))):
    assert float(decay[mode](start - 1)) == pytest.approx(warm(start - 1), rel=1e-6), mode
    assert float(decay[mode](start)) == pytest.approx(expected, rel=1e-6), mode
  assert float(decay["restart"](start + 5)) == pytest.approx(warm(5), rel=1e-6)
  from_run = override(config, init_from="/somewhere")
  assert float(step_lib.sampling_ema_schedule(_recipe(from_run, sampling_ema="carry"))(0)) == pytest.approx(full)
  assert float(step_lib.sampling_ema_schedule(from_run)(0)) == pytest.approx(0.1)  # 'run', the default
  assert float(step_lib.sampling_ema_schedule(_recipe(from_run, sampling_ema="restart"))(0)) == pytest.approx(0.1)


@pytest.mark.parametrize("online_start,optimizer_state", [("ema", "reset"), ("online", "carry")])
def test_the_fine_tuning_start_is_what_the_recipe_keys_say(digits_config, online_start, optimizer_state):
  """step.start_fine_tuning (pure): the online params become the sampling EMA with 'ema' and stay with 'online';
  Adam's moments and count are zero after 'reset' and the pre-training's with 'carry'; nothing else changes."""
  import jax.numpy as jnp

  config = _recipe(digits_config(""), online_start=online_start, optimizer_state=optimizer_state)
  tx, _ = step_lib.make_optimizer(config)
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  _, opt_state = jax.jit(tx.update)(jax.tree.map(lambda x: x + 0.5, params), tx.init(params), params)
  state = step_lib.TrainState(step=jnp.int32(config.perceptual.start_step), params=params, opt_state=opt_state,
                              ema_params=jax.tree.map(lambda x: 0.5 * x - 1, params), perceptual_params=params)
  after = step_lib.start_fine_tuning(config, tx, state)
  expected = state.ema_params if online_start == "ema" else state.params
  assert jax.tree.all(jax.tree.map(np.array_equal, after.params, expected))
  leaves = jax.tree.leaves(after.opt_state)
  if optimizer_state == "reset":
    assert all(not np.any(np.asarray(x)) for x in leaves)  # the moments and the counts
  else:
    assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(opt_state)))
    assert any(np.any(np.asarray(x)) for x in leaves)
  for name in ("step", "ema_params", "perceptual_params"):
    assert getattr(after, name) is getattr(state, name)
