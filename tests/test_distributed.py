"""When main starts jax.distributed: explicit addresses, --distributed=auto|on|off, SLURM / GKE environments, and
Cloud TPU VMs, recognised by TPU chips on the PCI bus (not by Google's vendor id alone, which every GCE VM's virtual
NIC and disks carry)."""

import jax
import pytest

from selfperc_jax import distributed
from selfperc_jax.errors import UserError


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of making them, on a plain machine (no TPU, no cluster)."""
  made = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: made.append(args))
  monkeypatch.setattr(distributed, "tpu_chips_present", lambda: False)
  for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  return made


def test_a_plain_machine_stays_single_process_unless_asked(calls):
  distributed.initialize()
  distributed.initialize(mode="off")
  assert calls == []
  distributed.initialize(mode="on")
  assert calls == [()]  # JAX finds the coordinator and the process ids itself


def test_cluster_environments_are_detected_and_off_wins(calls, monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "16")
  distributed.initialize()
  distributed.initialize(mode="off")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  distributed.initialize()
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  distributed.initialize()
  assert calls == [(), ()]


def test_cloud_tpu_vm_is_detected(calls, monkeypatch):
  monkeypatch.setattr(distributed, "tpu_chips_present", lambda: True)
  distributed.initialize()
  assert calls == [()]


def test_explicit_addresses_go_together_and_bad_modes_are_refused(calls):
  with pytest.raises(UserError, match="go together"):
    distributed.initialize("127.0.0.1:1234", 2, None)
  with pytest.raises(UserError, match="--distributed='yes' is not known"):
    distributed.initialize(mode="yes")
  assert calls == []


def _pci(root, devices):
  for i, (vendor, device) in enumerate(devices):
    d = root / f"0000:00:{i:02x}.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
  return str(root)


def test_tpu_chips_are_told_apart_from_googles_other_pci_devices(tmp_path):
  gce_vm = [("0x1ae0", "0x0042"), ("0x1ae0", "0x001f"), ("0x8086", "0x1237")]  # gVNIC, NVMe disk, host bridge
  assert not distributed.tpu_chips_present(_pci(tmp_path / "gce", gce_vm))
  assert distributed.tpu_chips_present(_pci(tmp_path / "v5e", gce_vm + [("0x1ae0", "0x0063")]))
  assert distributed.tpu_chips_present(_pci(tmp_path / "v4", [("0x1ae0", "0x005e")] * 4))
  assert not distributed.tpu_chips_present(str(tmp_path / "no_pci_bus"))
