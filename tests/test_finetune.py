"""The fine-tuning recipe (finetune.*) end to end: a single run's switch at perceptual.start_step, resumed before, at
or after it; its MSE phase against the comparison's pre-training; init_from runs as the recipe says."""

import os

import jax
import numpy as np
import pytest

from selfperc_jax import checkpoint, resume, train
from selfperc_jax.setup import Setup

from conftest import load_config, override
from test_train import _metrics


def _single_run(get_config, **overrides):
  """MSE pre-training for 3 steps, then the self-perceptual term, in one run of 6 (a one-level U-Net, batch 8), with a
  recipe whose every key changes something at the start step: the online params from the sampling EMA, a fresh Adam
  state, the EMA's warm-up anew, a constant learning rate of its own."""
  return override(get_config("tiny"), **{
      "model.channel_mult": (1,), "model.attention_resolutions": (8,), "batch_size": 8, "mesh.data": 1,
      "total_steps": 6, "perceptual.start_step": 3, "log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 10,
      "sample_every": 0, "eval_every": 0, "optimizer.warmup_steps": 0, "finetune.online_start": "ema",
      "finetune.optimizer_state": "reset", "finetune.sampling_ema": "restart", "finetune.learning_rate": 2e-3,
      "finetune.decay": "constant", **overrides})


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
  """_single_run trained without a stop, a checkpoint at every step (shared: copy it before changing it)."""
  config = _single_run(lambda arg="": load_config("digits", arg))
  workdir = str(tmp_path_factory.mktemp("single_run"))
  train.train_and_evaluate(config, workdir)
  return workdir, config


def _restored(workdir, step, config):
  setup = Setup(config, with_data=False)
  return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).restore(
      step, setup.abstract_state)[0]


def _assert_close(a, b, what):
  """Equal to 1e-5 of each value and of the tree's largest: a bias just before a GroupNorm has a gradient that is zero
  but for rounding, so it holds rounding noise (~1e-6 here) whose sign two differently compiled steps may flip (and
  the zero-initialised attention projections take up a little of it); a wrong step would move every param by about
  the learning rate (1e-3)."""
  floats = [np.asarray(y) for y in jax.tree.leaves(b) if np.issubdtype(np.asarray(y).dtype, np.floating)]
  atol = 1e-5 * max(float(np.abs(y).max()) for y in floats if y.size)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=atol, err_msg=what)


@pytest.mark.slow
def test_a_single_run_resumed_before_at_or_after_its_fine_tuning_start_is_the_same_run(single_run, tmp_path):
  """The state changes once, before step perceptual.start_step runs, as a function of the state: a run stopped at
  start - 1, start or start + 1 and resumed trains what the run without a stop trains."""
  workdir, config = single_run
  start = config.perceptual.start_step
  full, final = _metrics(workdir), _restored(workdir, 6, config)
  for stop in (start - 1, start, start + 1):
    resumed = str(tmp_path / f"stopped_at_{stop}")
    train.train_and_evaluate(config, resumed, num_steps=stop)
    train.train_and_evaluate(config, resumed)
    rows = _metrics(resumed)
    assert [r["step"] for r in rows] == [r["step"] for r in full] == list(range(1, 7))
    for a, b in zip(full, rows):
      for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=f"stopped at {stop}: step {a['step']} {k}")
    _assert_close(_restored(resumed, 6, config), final, f"stopped at {stop}")


@pytest.mark.slow
def test_a_single_run_starts_fine_tuning_as_the_recipe_says(single_run):
  """At the start step the online params become the sampling EMA and Adam's state is fresh; that step then runs at
  finetune.learning_rate and updates the EMA with its warm-up anew (decay 0.1)."""
  workdir, config = single_run
  start, lr = config.perceptual.start_step, config.finetune.learning_rate
  before, after = _restored(workdir, start, config), _restored(workdir, start + 1, config)
  kernel = lambda tree: np.asarray(tree["in_conv"]["kernel"])
  assert not np.allclose(kernel(before.params), kernel(before.ema_params))  # the choice matters
  setup = Setup(config, with_data=False)
  assert setup.start_fine_tuning(before, start - 1) is before and setup.start_fine_tuning(before, start + 1) is before
  started = setup.start_fine_tuning(_restored(workdir, start, config), start)  # (donates the state it is given)
  _assert_close(started.params, before.ema_params, "online params = the sampling EMA")
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(started.opt_state))
  # The step from there: Adam's first update from zero moments is lr * g / (|g| + eps), at most lr and about lr
  # where the gradient is not tiny; its count is 1; the EMA takes 1 - 0.1 of the new params.
  delta = np.concatenate([np.ravel(np.asarray(a) - np.asarray(b))
                          for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(before.ema_params))])
  assert np.max(np.abs(delta)) == pytest.approx(lr, rel=1e-3)
  assert [int(x) for x in jax.tree.leaves(after.opt_state) if x.dtype == np.int32] == [1, 1]  # Adam's, schedule's
  _assert_close(after.ema_params, jax.tree.map(lambda e, p: 0.1 * e + 0.9 * p, before.ema_params, after.params),
                "sampling EMA")
  rows = {r["step"]: r for r in _metrics(workdir)}
  assert rows[start + 1]["learning_rate"] == pytest.approx(lr) and rows[start]["learning_rate"] < 1e-3


@pytest.mark.slow
def test_the_single_runs_mse_phase_is_the_comparisons_pretraining(single_run, tmp_path):
  """The pre-training stage of `experiments` (total_steps = perceptual.start_step, no perceptual term) trains what
  the single run trains before its start step: the same params, EMA and optimizer state, the same losses."""
  from selfperc_jax import experiments

  workdir, config = single_run
  start = config.perceptual.start_step
  pretrain = experiments.stage_configs(config, str(tmp_path))["pretrain"]
  train.train_and_evaluate(pretrain, str(tmp_path / "pretrain"))
  a, b = _restored(workdir, start, config), _restored(str(tmp_path / "pretrain"), start, pretrain)
  for name in ("params", "ema_params", "opt_state"):
    _assert_close(getattr(a, name), getattr(b, name), name)
  for r, s in zip(_metrics(workdir)[:start], _metrics(str(tmp_path / "pretrain")), strict=True):
    for k in ("step", "loss", "loss_mse", "grad_norm", "learning_rate"):
      assert s[k] == pytest.approx(r[k], rel=1e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("copy_source,online_start,optimizer_state", [("ema", "ema", "carry"),
                                                                      ("online", "online", "reset")])
def test_init_from_starts_from_the_source_as_the_recipe_says(single_run, tmp_path, copy_source, online_start,
                                                             optimizer_state):
  """An init_from run is a fine-tuning run: the online params from the source's sampling EMA ('ema', the paper's)
  or its online params; Adam's state the source's ('carry') or zero ('reset'); the sampling EMA the source's, at the
  full decay from step 0 ('carry', the default); the learning rate finetune.*'s from step 0."""
  workdir, _ = single_run
  config = _single_run(lambda arg="": load_config("digits", arg), init_from=workdir, total_steps=30, **{
      "perceptual.copy_source": copy_source, "finetune.online_start": online_start,
      "finetune.optimizer_state": optimizer_state, "finetune.learning_rate": 3e-4, "finetune.decay": "cosine",
      "finetune.sampling_ema": "carry"})
  setup = Setup(config, str(tmp_path / "finetune"))
  state, restored = resume.restore_or_init(setup, setup.checkpointer(), jax.random.key(123))
  assert restored is None and int(state.step) == 0
  source = _restored(workdir, 6, config)
  same = lambda tree, other, what: [np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)
                                    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(other), strict=True)]
  same(state.params, source.ema_params if online_start == "ema" else source.params, "online params")
  same(state.ema_params, source.ema_params, "sampling EMA")
  same(state.perceptual_params, source.ema_params if copy_source == "ema" else source.params, "the copy")
  assert not np.array_equal(np.asarray(source.params["in_conv"]["kernel"]),
                            np.asarray(source.ema_params["in_conv"]["kernel"]))  # the choice matters
  if optimizer_state == "carry":
    same(state.opt_state, source.opt_state, "optimizer state")
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(source.opt_state))
  else:
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))  # moments and counts zero
  assert float(setup.lr_schedule(0)) == pytest.approx(3e-4, rel=1e-6)
  from selfperc_jax import step as step_lib

  assert float(step_lib.sampling_ema_schedule(setup.config)(0)) == pytest.approx(config.sampling_ema.decay)


