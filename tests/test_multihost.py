"""Two local processes x 4 simulated devices train exactly what one process with 8 devices trains."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import REPO

OVERRIDES = ["--config.total_steps=6", "--config.log_every=1", "--config.sample_every=0",
             "--config.checkpoint_every=3", "--config.loss.perceptual_start_step=3",
             "--config.model.channel_mult=(1,)"]  # one level: a smaller program to compile three times


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in ("steps_per_s", "examples_per_s")} for line in f]


def test_two_processes_equal_one_process(tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  cmd = [sys.executable, "-m", "selfperc_jax.main", "--config=configs/digits.py:tiny"] + OVERRIDES
  port = _free_port()
  procs = [subprocess.Popen(cmd + [f"--workdir={multi}", f"--coordinator_address=127.0.0.1:{port}",
                                   "--num_processes=2", f"--process_id={i}"],
                            cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  baseline = subprocess.run(cmd + [f"--workdir={single}"], cwd=REPO, env=_env(8), capture_output=True, text=True,
                            timeout=600)
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert baseline.returncode == 0, baseline.stderr[-3000:]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "on 8 device(s)" in outputs[0]
  a, b = _rows(single), _rows(multi)  # only process 0 writes metrics
  assert [r["step"] for r in b] == list(range(1, 7)) and b[-1]["loss_sp"] > 0
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_allclose(y[k], x[k], rtol=2e-4, atol=1e-6, err_msg=f"step {x['step']} {k}")
  assert sorted(os.listdir(multi / "checkpoints")) == ["3", "6"]
