"""The comparison as a study, end to end on the smallest settings: an unconditional comparison (no class input) and
several training seeds with an ablation variant, killed and resumed (the stage layout and the table's statistics:
test_experiments.py)."""

import json
import os

import pytest

from selfperc_jax import experiments, modes, train

from conftest import override


class _Killed(Exception):
  pass


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



@pytest.mark.slow
def test_seeds_and_a_variant_resume_after_a_kill_without_redoing_a_finished_pretraining_or_variant(
    digits_config, tmp_path, monkeypatch):
  """2 training seeds x (pretrain, mse, perceptual) + 1 variant of perceptual, killed at the last stage of the second
  seed, resumed: only that stage trains; the table gives n = 2 intervals and the paired differences to MSE."""
  config = override(digits_config("tiny"), **{
      "total_steps": 4, "perceptual.start_step": 2, "checkpoint_every": 2, "log_every": 2, "sample_every": 0,
      "eval.num_samples": 16, "sample.num_samples": 10, "sample.steps": 3, "experiment.branches": ("mse", "perceptual"),
      "experiment.guidance_scales": (1.0,), "model.channel_mult": (1,), "model.attention_resolutions": (8,),
      "experiment.seeds": (0, 1), "experiment.variants": ("tp:perceptual.t_prime_min=0.5",)})
  workdir = str(tmp_path / "cmp")
  calls = {"train": [], "eval": []}
  real_train, real_eval = train.train_and_evaluate, modes.evaluate_checkpoint
  stage = lambda wd: os.path.relpath(wd, workdir)

  def counting_train(cfg, wd, *a, **k):
    calls["train"].append(stage(wd))
    if kill_at == stage(wd):
      raise _Killed()
    return real_train(cfg, wd, *a, **k)

  def counting_eval(cfg, wd):
    calls["eval"].append(stage(wd))
    return real_eval(cfg, wd)

  monkeypatch.setattr(train, "train_and_evaluate", counting_train)
  monkeypatch.setattr(modes, "evaluate_checkpoint", counting_eval)

  every = [f"seed_{s}/{b}" for s in (0, 1) for b in ("pretrain", "mse", "perceptual", "perceptual@tp")]
  kill_at = "seed_1/perceptual@tp"  # seed 0 finished, its variant included; seed 1's pre-training finished
  with pytest.raises(_Killed):
    experiments.run(config, workdir)
  assert calls["train"] == every and not calls["eval"]

  kill_at = None
  calls = {"train": [], "eval": []}
  rows = experiments.run(config, workdir, command="the test")
  assert calls["train"] == ["seed_1/perceptual@tp"]  # no finished pre-training, branch or variant again
  assert calls["eval"] == every
  assert [(r["seed"], r["branch"]) for r in rows] == [(int(n[5]), n[7:]) for n in every]
  for r in rows:
    assert r["num_samples"] == 20 and 0 <= r["fid"] < 1e4 and r["step"] == 2, r  # 16, a row per class: 20
  assert rows[0]["fid"] != rows[4]["fid"]  # two seeds, two pre-trained models
  for name in every:
    assert os.path.isdir(os.path.join(workdir, *name.split("/"), "checkpoints"))

  table = open(os.path.join(workdir, "comparison.md")).read()
  assert "- Training seeds: 0, 1 (n = 2)" in table and "- Variants of the self-perceptual branches" in table
  assert "| branch | guidance | n | FID |" in table and "| self-perceptual @ tp | none | 2 | " in table
  differences = table[table.index("Paired differences to MSE"):]
  assert differences.count("\n| self-perceptual") == 2 and "| MSE |" not in differences
  with open(os.path.join(workdir, "comparison.json")) as f:
    saved = json.load(f)
  assert saved["rows"] == rows
  assert [(e["branch"], e["seeds"]) for e in saved["summary"]] == [
      (b, [0, 1]) for b in ("pretrain", "mse", "perceptual", "perceptual@tp")]
  assert saved["summary"][3]["difference_to_mse"]["fid"]["n"] == 2
  for png in ("comparison.png", "grids/guidance_1.png"):
    with open(os.path.join(workdir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  calls = {"train": [], "eval": []}  # a third run finds everything done
  assert experiments.run(config, workdir, command="the test") == rows
  assert calls == {"train": [], "eval": []}
