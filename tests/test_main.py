"""The command line end to end, in subprocesses as a user runs it: the main smoke run, one-line errors for every
mistake on the command line, and SIGTERM / Ctrl-C saving a checkpoint that the next run resumes from."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from selfperc_jax import checkpoint

from conftest import REPO


def _main(*args, timeout=600):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, "-m", "selfperc_jax.main", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--config=configs/digits.py:tiny", "--config.model.base_chanels=8"],
     'unknown config key model.base_chanels. Did you mean "base_channels"'),
    (["--config=configs/digits.py:tiny", "--config.perceptual.wieght=1"],
     'unknown config key perceptual.wieght. Did you mean "weight"'),
    (["--config=configs/digits.py:tiny", "--config.loss.perceptual_weight=0"],
     "config key loss.perceptual_weight was renamed to perceptual.weight"),
    (["--config=configs/nothere.py"], "config file configs/nothere.py does not exist"),
    (["--config=configs/digits.py:foo"], "configs/digits.py: unknown argument(s) ['foo']"),
    (["--config=configs/digits.py:tiny", "--config.sample.steps=many"], "flag --config.sample.steps=many: invalid"),
    (["--config=configs/digits.py:tiny", "--bogus=1"], "Unknown command line flag 'bogus'"),
])
def test_command_line_mistakes_are_one_line_without_traceback(tmp_path, args, message):
  workdir = tmp_path / "w"
  result = _main(*args, f"--workdir={workdir}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
  assert message in result.stderr
  assert not workdir.exists()


@pytest.mark.slow
def test_missing_workdir_flag_and_a_workdir_that_is_a_file(tmp_path):
  result = subprocess.run([sys.executable, "-m", "selfperc_jax.main", "--config=configs/digits.py:tiny"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and result.stderr.startswith("error: --workdir is required")
  (tmp_path / "file").write_text("mine")
  for workdir, message in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "run", "lies below")):
    result = _main("--config=configs/digits.py:tiny", f"--workdir={workdir}")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
  assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.slow
def test_bad_value_on_the_command_line_is_one_line_without_traceback(tmp_path):
  result = _main("--config=configs/digits.py:tiny", f"--workdir={tmp_path}", "--config.sample.sampler=euler")
  assert result.returncode == 2
  assert "error: sample.sampler='euler' is not known" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_main_smoke_trains_checkpoints_and_samples(tmp_path):
  """The tiny config through the real entry point on all 8 simulated devices, then the sample mode."""
  workdir = tmp_path / "run"
  result = _main("--config=configs/digits.py:tiny", f"--workdir={workdir}", "--config.profile.start_step=60",
                 "--config.profile.steps=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 100/100" in result.stdout
  traces = [f for _, _, files in os.walk(workdir / "profile") for f in files if f.endswith(".xplane.pb")]
  assert traces and "profile of steps 60..61" in result.stdout
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert rows[-1]["step"] == 100 and rows[-1]["loss_perceptual"] > 0
  for key in ("loss", "loss_mse", "loss_perceptual", "grad_norm", "learning_rate", "steps_per_s", "images_per_s",
              "tflops_per_device"):
    assert np.isfinite(rows[-1][key]), key
  assert sorted(os.listdir(workdir / "checkpoints")) == ["100", "50"]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  with np.load(workdir / "samples" / "step_100.npz") as f:
    images, labels = f["arr_0"], f["arr_1"]
  assert images.dtype == np.uint8 and images.shape == (20, 8, 8, 1)
  assert labels.tolist() == sorted(labels.tolist()) and set(labels.tolist()) == set(range(10))
  assert (workdir / "samples" / "step_100.png").stat().st_size > 0

  result = _main("--config=configs/digits.py:tiny", f"--workdir={workdir}", "--mode=sample",
                 "--config.sample.guidance_scale=2", "--config.sample.sampler=dpmpp_2m",
                 "--config.sample.num_samples=10")
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(workdir / "samples" / "step_100_dpmpp_2m10_cfg2_seed0.npz") as f:
    assert f["arr_0"].shape == (10, 8, 8, 1)
  with np.load(workdir / "samples" / "step_100.npz") as f:  # the training-time samples are untouched
    np.testing.assert_array_equal(f["arr_0"], images)


@pytest.mark.slow
@pytest.mark.parametrize("signum,reason", [("SIGTERM", "preempted"), ("SIGINT", "interrupted")])
def test_sigterm_saves_a_checkpoint_at_the_step_reached_and_restart_resumes_there(tmp_path, signum, reason):
  """SIGTERM (a preemption) and Ctrl-C alike: a checkpoint at the step reached, exit code 75, the run resumes there."""
  import signal
  import time

  workdir = tmp_path / "preempted"
  args = ["--config=configs/digits.py:tiny", f"--workdir={workdir}", "--config.total_steps=100000",
          "--config.log_every=1", "--config.sample_every=0", "--config.checkpoint_every=100000",
          "--config.mesh.data=1"]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen([sys.executable, "-m", "selfperc_jax.main", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
    time.sleep(0.5)
  # A second trainer on the same workdir stops at once, naming the run that holds it, and changes nothing.
  second = _main(*args)
  assert second.returncode == 2 and f"is in use by process {proc.pid} on " in second.stderr, second.stderr[-2000:]
  assert "Traceback" not in second.stderr
  proc.send_signal(getattr(signal, signum))
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 75, out[-3000:]  # stopped with a checkpoint: resume me (not 0, not a failure)
  assert f"{reason}: saving a checkpoint at step" in out and "Traceback" not in out
  assert not (workdir / "LOCK").exists()  # released on the way out
  saved = checkpoint.Checkpointer(str(workdir / "checkpoints"), read_only=True).latest_step()
  logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert saved is not None and saved >= 3 and saved == logged[-1]
  result = _main(*args[:2], f"--config.total_steps={saved + 2}", *args[3:])
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"training 2 steps from step {saved}" in result.stdout


