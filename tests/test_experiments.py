"""The paper's comparison command: its stages, and a whole tiny comparison that is killed, resumed and rerun."""

import json
import os

import pytest

from selfperc_jax import experiments, modes, train
from selfperc_jax.errors import ConfigError

from conftest import override


def test_stages_are_one_pretraining_and_branches_continued_from_it(digits_config, tmp_path):
  # (with a schedule of the fine-tuning's own; the default 'run' re-warms each branch over its own steps instead)
  config = override(digits_config(""), **{"finetune.decay": "cosine", "finetune.sampling_ema": "carry"})
  stages = experiments.stage_configs(config, str(tmp_path))
  start, total = config.perceptual.start_step, config.total_steps
  assert list(stages) == ["pretrain", "mse", "perceptual", "mse_perceptual"]
  pre = stages["pretrain"]
  assert pre.total_steps == start and pre.perceptual.weight == 0 and pre.init_from == "" and pre.sample_every == 0
  for name in ("mse", "perceptual", "mse_perceptual"):
    c = stages[name]
    assert c.total_steps == total - start and c.init_from == str(tmp_path / "pretrain") and c.eval_every == 0
    assert c.sample_every == 0
  assert stages["mse"].perceptual.weight == 0
  paper = stages["perceptual"].perceptual
  assert paper.weight > 0 and paper.mse_weight == 0 and paper.start_step == 0 and paper.copy_ema_decay == 1.0
  assert stages["mse_perceptual"].perceptual.mse_weight == 1.0
  # Nothing else differs from the user's config (the optimizer, the fine-tuning recipe, the model, the data, the seeds).
  for name, c in stages.items():
    assert c.model.to_dict() == config.model.to_dict() and c.optimizer.to_dict() == config.optimizer.to_dict()
    assert c.seed == config.seed and c.eval.to_dict() == config.eval.to_dict()
    assert c.finetune.to_dict() == config.finetune.to_dict()


def test_the_stages_follow_the_schedules_of_the_single_run(digits_config, tmp_path):
  """The pre-training stage has the learning rate and EMA decay of the single run's MSE phase; every branch (an
  init_from run, all fine-tuning) those of the single run from its start step on."""
  from selfperc_jax import step as step_lib

  # (with a schedule of the fine-tuning's own; the default 'run' re-warms each branch over its own steps instead)
  config = override(digits_config(""), **{"finetune.decay": "cosine", "finetune.sampling_ema": "carry"})
  stages = experiments.stage_configs(config, str(tmp_path))
  start, total = config.perceptual.start_step, config.total_steps
  lr, ema = step_lib.learning_rate_fn(config), step_lib.sampling_ema_schedule(config)
  for name, c in stages.items():
    offset, steps = (0, range(0, start, 37)) if name == "pretrain" else (start, range(0, total - start, 37))
    lr_c, ema_c = step_lib.learning_rate_fn(c), step_lib.sampling_ema_schedule(c)
    assert [float(lr_c(s)) for s in steps] == [float(lr(offset + s)) for s in steps], name
    assert [float(ema_c(s)) for s in steps] == [float(ema(offset + s)) for s in steps], name


def test_guided_settings_use_the_rescale_and_unguided_ones_do_not(digits_config):
  config = digits_config("")
  assert experiments.eval_config(config, 1.0).sample.guidance_rescale == 0.0
  guided = experiments.eval_config(config, 2.0).sample
  assert guided.guidance_scale == 2.0 and guided.guidance_rescale == config.experiment.guidance_rescale


@pytest.mark.parametrize("start", [0, 2400])
def test_a_comparison_without_pretraining_or_branches_is_refused(digits_config, tmp_path, start):
  config = override(digits_config(""), **{"perceptual.start_step": start})
  with pytest.raises(ConfigError, match="needs 0 < perceptual.start_step < total_steps"):
    experiments.stage_configs(config, str(tmp_path))


class _Killed(Exception):
  pass


@pytest.mark.slow
def test_comparison_resumes_after_a_kill_and_never_redoes_a_finished_stage(digits_config, tmp_path, monkeypatch):
  # (finetune.sampling_ema='restart': at the full decay, a branch's EMA after 3 steps would still be the pre-trained
  # one to within 0.3 %, and its samples could not tell the branches apart.)
  config = override(digits_config("tiny"), **{
      "total_steps": 6, "perceptual.start_step": 3, "checkpoint_every": 3, "log_every": 3, "sample_every": 0,
      "eval.num_samples": 20, "sample.num_samples": 10, "sample.steps": 4,
      "experiment.guidance_scales": (1.0, 2.0), "finetune.sampling_ema": "restart"})
  workdir = str(tmp_path / "cmp")
  calls = {"train": [], "eval": []}
  real_train, real_eval = train.train_and_evaluate, modes.evaluate_checkpoint

  def counting_train(cfg, wd, *a, **k):
    name = os.path.basename(wd)
    calls["train"].append(name)
    if kill_at == ("train", name):
      raise _Killed()
    return real_train(cfg, wd, *a, **k)

  def counting_eval(cfg, wd):
    calls["eval"].append((os.path.basename(wd), cfg.sample.guidance_scale))
    return real_eval(cfg, wd)

  monkeypatch.setattr(train, "train_and_evaluate", counting_train)
  monkeypatch.setattr(modes, "evaluate_checkpoint", counting_eval)

  kill_at = ("train", "perceptual")  # killed after pretrain and the MSE branch finished
  with pytest.raises(_Killed):
    experiments.run(config, workdir)
  assert calls["train"] == ["pretrain", "mse", "perceptual"]
  assert not os.path.exists(os.path.join(workdir, "LOCK"))  # the lock was released on the way out

  kill_at = None
  calls = {"train": [], "eval": []}
  rows = experiments.run(config, workdir, command="the test")
  assert calls["train"] == ["perceptual", "mse_perceptual"]  # finished stages are not trained again
  assert len(calls["eval"]) == 1 + 3 * 2
  assert [(r["branch"], r["guidance_scale"]) for r in rows] == [
      ("pretrain", 1.0), ("mse", 1.0), ("mse", 2.0), ("perceptual", 1.0), ("perceptual", 2.0),
      ("mse_perceptual", 1.0), ("mse_perceptual", 2.0)]
  for r in rows:
    assert r["num_samples"] == 20 and 0 <= r["fid"] < 1e4 and 0 <= r["recall"] <= 1, r
    assert r["step"] == (3 if r["branch"] == "pretrain" else 3)
  assert rows[1]["guidance_rescale"] == 0.0 and rows[2]["guidance_rescale"] == config.experiment.guidance_rescale
  # Different branches are different models: their scores differ.
  assert len({round(r["fid"], 6) for r in rows if r["guidance_scale"] == 1.0}) == 4

  with open(os.path.join(workdir, "comparison.json")) as f:
    saved = json.load(f)
  assert saved["rows"] == rows and saved["command"] == "the test"
  table = open(os.path.join(workdir, "comparison.md")).read()
  assert table.count("\n| ") == 1 + 7 and "| self-perceptual | 2 (rescale 0.7) |" in table
  for png in ("comparison.png", "grids/guidance_1.png", "grids/guidance_2.png"):
    with open(os.path.join(workdir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  # A third run finds everything done: nothing is trained or evaluated, the report is written again.
  calls = {"train": [], "eval": []}
  assert experiments.run(config, workdir, command="the test") == rows
  assert calls == {"train": [], "eval": []}


@pytest.mark.slow
def test_the_unconditional_comparison_trains_samples_evaluates_and_writes_its_table(digits_config, tmp_path):
  """configs/digits.py:uncond end to end: no class embedding in the params, unlabelled samples (no arr_1, a plain
  grid), the digits classifier's confidence and class balance instead of its accuracy, one unguided row a branch."""
  import numpy as np

  from selfperc_jax.setup import Setup

  config = override(digits_config("uncond,tiny"), **{
      "total_steps": 4, "perceptual.start_step": 2, "checkpoint_every": 2, "log_every": 2, "sample_every": 0,
      "eval.num_samples": 16, "sample.num_samples": 12, "sample.steps": 3, "experiment.branches": ("mse", "perceptual"),
      "model.channel_mult": (1,), "model.attention_resolutions": (8,)})
  workdir = tmp_path / "cmp"
  rows = experiments.run(config, str(workdir))
  assert [(r["branch"], r["guidance_scale"]) for r in rows] == [("pretrain", 1.0), ("mse", 1.0), ("perceptual", 1.0)]
  for r in rows:
    assert "class_accuracy" not in r and 0 < r["class_confidence"] <= 1 and 0 <= r["class_balance"] <= 1, r
  table = (workdir / "comparison.md").read_text()
  assert table.count("\n| ") == 1 + 3
  branch = workdir / "perceptual"
  stage = experiments.stage_configs(config, str(workdir))["perceptual"]
  _, params = modes.latest_sampling_params(Setup(stage, str(branch), with_data=False))
  assert "class_embed" not in params and "time_mlp_0" in params  # no class input at all

  png = modes.sample_from_checkpoint(override(stage, **{"sample.num_samples": 7}), str(branch))
  with np.load(png[:-4] + ".npz") as f:
    assert sorted(f.files) == ["arr_0"] and f["arr_0"].shape == (7, 8, 8, 1)  # 7, not rounded up to the classes


def test_the_report_says_the_recipe_of_the_branches(digits_config):
  config = override(digits_config(""), **{"finetune.decay": "cosine", "finetune.sampling_ema": "carry"})
  assert experiments.recipe(config) == (
      "online params from the pre-trained sampling EMA, the pre-training's optimizer state, sampling EMA carried on "
      "at its full decay, learning rate 0.001 without warm-up, cosine")
  config = override(config, **{"finetune.online_start": "online", "finetune.optimizer_state": "reset",
                               "finetune.sampling_ema": "restart", "finetune.decay": "run"})
  assert experiments.recipe(config) == (
      "online params from the pre-trained online params, a fresh optimizer state, sampling EMA warmed up anew, "
      "learning rate as optimizer.* over the branch's steps (0.001 after 200 warm-up steps, cosine)")
