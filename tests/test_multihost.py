"""Two local processes x 4 simulated devices run every periodic action a pod run reaches, as one process with 8
devices does: the steps, checkpoints, sample grids, evaluation, and a preemption stop."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, start_two_processes, subprocess_env

OVERRIDES = ["--config.total_steps=6", "--config.log_every=1", "--config.sample_every=6", "--config.eval_every=6",
             "--config.checkpoint_every=3", "--config.perceptual.start_step=3",
             "--config.sample.batch_size=16", "--config.eval.num_samples=40",  # 3 chunks, the last one padded
             "--config.model.channel_mult=(1,)"]  # one level: a smaller program to compile three times
pytestmark = pytest.mark.slow


def _start_two(args, workdir):
  return start_two_processes("selfperc_jax.main", [*args, f"--workdir={workdir}"])


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in ("steps_per_s", "images_per_s", "tflops_per_device")} for line in f]


def _files(directory):
  return sorted(os.listdir(directory))


def test_two_processes_equal_one_process_in_every_periodic_action(tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  args = ["--config=configs/digits.py:tiny"] + OVERRIDES
  procs = _start_two(args, multi)
  baseline = subprocess.run([sys.executable, "-m", "selfperc_jax.main", *args, f"--workdir={single}"], cwd=REPO,
                            env=subprocess_env(8), capture_output=True, text=True, timeout=600)
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert baseline.returncode == 0, baseline.stderr[-3000:]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "on 8 device(s)" in outputs[0]
  # Only process 0 reports and writes.
  assert "samples: " in outputs[0] and "samples: " not in outputs[1]
  assert "eval at step 6: FID" in outputs[0] and "eval at step 6: FID" not in outputs[1]
  a, b = _rows(single), _rows(multi)
  train_rows = [r for r in b if "loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, 7)) and train_rows[-1]["loss_perceptual"] > 0
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_allclose(y[k], x[k], rtol=2e-4, atol=1e-6, err_msg=f"step {x['step']} {k}")
  assert _files(multi / "checkpoints") == ["3", "6"]
  # The grid and its .npz, written once, and the same samples as one process draws (within 2/255).
  assert _files(multi / "samples") == _files(single / "samples") == ["step_6.npz", "step_6.png"]
  with np.load(multi / "samples" / "step_6.npz") as m, np.load(single / "samples" / "step_6.npz") as s:
    assert m["arr_0"].shape == (20, 8, 8, 1)
    assert np.abs(m["arr_0"].astype(int) - s["arr_0"]).max() <= 2
    np.testing.assert_array_equal(m["arr_1"], s["arr_1"])
  # The evaluation: one JSON, no partial chunks left behind, the metrics of the one-process run.
  assert _files(multi / "eval") == _files(single / "eval")
  assert "step_6.json" in _files(multi / "eval") and "partial" not in _files(multi / "eval")
  with open(multi / "eval" / "step_6.json") as m, open(single / "eval" / "step_6.json") as s:
    em, es = json.load(m), json.load(s)
  assert list(em) == ["ddim10_cfg1_n40_seed1"]
  result = em["ddim10_cfg1_n40_seed1"]
  assert result["num_samples"] == 40
  assert result["fid"] == pytest.approx(es["ddim10_cfg1_n40_seed1"]["fid"], rel=1e-3)


def test_preemption_stops_both_processes_at_one_step_then_the_run_finishes(tmp_path):
  """SIGTERM to one process of two: JAX's preemption sync point stops both at the same step, a checkpoint is saved
  there, and the restarted run finishes with its samples (the evaluation is covered by the test above)."""
  workdir = tmp_path / "pod"
  args = ["--config=configs/digits.py:tiny", *OVERRIDES, "--config.total_steps=100000",
          "--config.checkpoint_every=100000", "--config.sample_every=100000", "--config.eval_every=100000"]
  procs = _start_two(args, workdir)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
    time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 75, out[-3000:]  # stopped with a checkpoint, to be resumed
    assert "preempted: saving a checkpoint at step" in out
  stops = [int(out.split("preempted: saving a checkpoint at step ")[1].split()[0]) for out in outputs]
  assert stops[0] == stops[1] and _files(workdir / "checkpoints") == [str(stops[0])]
  rerun = _start_two(["--config=configs/digits.py:tiny", *OVERRIDES, f"--config.total_steps={stops[0] + 2}",
                      f"--config.sample_every={stops[0] + 2}", "--config.eval_every=0"], workdir)
  outputs = [p.communicate(timeout=600)[0] for p in rerun]
  for p, out in zip(rerun, outputs):
    assert p.returncode == 0, out[-3000:]
  assert f"training 2 steps from step {stops[0]}" in outputs[0]
  assert (workdir / "samples" / f"step_{stops[0] + 2}.png").exists()
