"""When main starts jax.distributed: explicit flags, --distributed, SLURM / GKE environments, and Cloud TPU VMs
(detected from TPU chips on the PCI bus), where a single-host VM without a detectable cluster runs on alone."""

import jax
import pytest

from selfperc_jax import distributed
from selfperc_jax.errors import UserError


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of making them; a plain machine (no TPU, no cluster)."""
  made = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: made.append(args))
  monkeypatch.setattr(distributed, "_tpu_chips_present", lambda: False)
  for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  return made


def test_a_plain_machine_stays_single_process(calls):
  distributed.initialize()
  assert calls == []


def test_cluster_environments_and_the_flag_initialise(calls, monkeypatch):
  distributed.initialize(distributed=True)
  monkeypatch.setenv("SLURM_NTASKS", "16")
  distributed.initialize()
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  distributed.initialize()
  assert calls == [(), (), ()]  # JAX finds the coordinator and the process ids itself


def test_explicit_addresses_go_together(calls):
  with pytest.raises(UserError, match="go together"):
    distributed.initialize("127.0.0.1:1234", 2, None)
  assert calls == []


def test_cloud_tpu_vm_is_detected_and_a_lone_tpu_host_runs_on(calls, monkeypatch):
  monkeypatch.setattr(distributed, "_tpu_chips_present", lambda: True)
  distributed.initialize()
  assert calls == [()]

  def no_cluster(*args, **kwargs):
    raise ValueError("coordinator_address should be defined")

  monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
  distributed.initialize()  # a warning, then single process
  with pytest.raises(ValueError):
    distributed.initialize(distributed=True)  # asked for explicitly: the error stands
