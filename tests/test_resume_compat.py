"""A checkpoint written before a redesign resumes with today's code, to the same run: tests/fixtures/checkpoint_29ed5ba
holds step 3 of a small digits run saved by the code of commit 29ed5ba, and the metrics of that run uninterrupted."""

import importlib.util
import json
import shutil

import numpy as np
import pytest

from selfperc_jax import train

from conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "checkpoint_29ed5ba"


def _recipe():
  spec = importlib.util.spec_from_file_location("make_old_checkpoint", FIXTURE.parent / "make_old_checkpoint.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_a_checkpoint_of_the_earlier_code_resumes_to_the_same_run(tmp_path, capsys):
  recipe = _recipe()
  workdir = tmp_path / "w"
  shutil.copytree(FIXTURE / "checkpoints", workdir / "checkpoints")
  train.train_and_evaluate(recipe.config(str(REPO)), str(workdir))
  out = capsys.readouterr().out
  assert f"training {6 - recipe.STEPS} steps from step {recipe.STEPS}" in out
  assert "warning" not in out  # restored as it was saved: no corrupt or unverified step passed over
  assert "changed config value" not in out  # keys added since count with their defaults
  assert "predates finetune.*" in out  # and it goes on with the fine-tuning recipe it began with
  then = [json.loads(line) for line in (FIXTURE / "metrics_uninterrupted.jsonl").read_text().splitlines()]
  now = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in now] == [4, 5, 6]
  for a, b in zip(then[recipe.STEPS:], now):
    for key in ("loss", "loss_mse", "loss_perceptual", "grad_norm"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f"step {a['step']} {key}")


def test_a_checkpoint_from_before_the_fine_tuning_recipe_keeps_the_recipe_it_began_with(capsys):
  """Its config has no finetune.*: the resumed run takes the values of before (resume.ADDED_KEY_DEFAULTS), not
  today's defaults: one optimizer.* schedule and EMA warm-up over the run, no change of the state at the start
  step. The config given is not changed; what the run uses is a copy."""
  from selfperc_jax import resume, step as step_lib
  from selfperc_jax.setup import Setup

  saved = json.loads((FIXTURE / "checkpoints" / "3" / "config" / "metadata").read_text())
  assert "finetune" not in saved
  config = _recipe().config(str(REPO))
  assert config.finetune.online_start == "ema"  # today's default differs from the recipe the run began with
  setup = Setup(config, with_data=False)
  resume.keep_recipe(setup, saved, 3)
  assert "predates finetune.*" in capsys.readouterr().out
  assert setup.config.finetune.to_dict() == {"online_start": "online", "optimizer_state": "carry",
                                             "sampling_ema": "run", "learning_rate": 0.0, "warmup_steps": 0,
                                             "decay": "run"}
  assert config.finetune.online_start == "ema" and setup.config is not config
  old = step_lib.learning_rate_schedule(config.optimizer, config.total_steps)
  assert [float(setup.lr_schedule(s)) for s in range(6)] == [float(old(s)) for s in range(6)]
  assert resume.changed_values(saved, setup.config) == {}
  resume.keep_recipe(setup, {**saved, "finetune": setup.config.finetune.to_dict()}, 3)  # the same: nothing to say
  assert capsys.readouterr().out == ""


def test_carrying_the_optimizer_state_of_init_from_needs_its_optimizer_layout():
  """finetune.optimizer_state='carry' from a checkpoint (the earlier code's: the same AdamW layout) is checked before
  anything is restored: the same optimizer passes, one without gradient clipping is refused naming the key."""
  from selfperc_jax import checkpoint, resume
  from selfperc_jax.errors import CheckpointError
  from selfperc_jax.setup import Setup

  src = checkpoint.Checkpointer(str(FIXTURE / "checkpoints"), read_only=True)
  config = _recipe().config(str(REPO))
  config.init_from = str(FIXTURE)
  resume._check_optimizer_layout(Setup(config, with_data=False), src, 3)
  config.optimizer.grad_clip = 0.0
  with pytest.raises(CheckpointError, match=r"^finetune.optimizer_state='carry' takes Adam's state from init_from=.* "
                                            r"\(step 3\) was trained with optimizer.grad_clip=1.0 \(now 0.0\), so"):
    resume._check_optimizer_layout(Setup(config, with_data=False), src, 3)
  src.close()
