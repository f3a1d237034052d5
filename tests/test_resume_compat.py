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
  then = [json.loads(line) for line in (FIXTURE / "metrics_uninterrupted.jsonl").read_text().splitlines()]
  now = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in now] == [4, 5, 6]
  for a, b in zip(then[recipe.STEPS:], now):
    for key in ("loss", "loss_mse", "loss_perceptual", "grad_norm"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f"step {a['step']} {key}")
