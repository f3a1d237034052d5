"""Starting jax.distributed when this process is one of several: explicit addresses, or found from the cluster.

`mode` is main's --distributed: 'auto' starts it on SLURM jobs of several tasks, GKE TPU pods and Cloud TPU VMs
(TPU chips on the PCI bus; JAX then finds the pod slice's workers, or the lone worker of a single-host VM, from the
VM metadata); 'on' always starts it and lets JAX find the cluster; 'off' never does (one process).
"""

from __future__ import annotations

import glob
import os

from selfperc_jax.errors import UserError

MODES = ("auto", "on", "off")
GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, ...): Google's vendor id alone also covers its virtual NICs
# and disks, which every GCE VM has.
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def _cluster_environment() -> bool:
  """GKE TPU pods (TPU_WORKER_HOSTNAMES) and SLURM jobs of several tasks."""
  env = os.environ
  tpu_workers = env.get("TPU_WORKER_HOSTNAMES", "")
  return ("," in tpu_workers or "MEGASCALE_COORDINATOR_ADDRESS" in env
          or int(env.get("SLURM_NTASKS", "1") or 1) > 1)


def tpu_chips_present(pci_root: str = "/sys/bus/pci/devices") -> bool:
  """TPU chips on this host's PCI bus: a Cloud TPU VM (single host, or one worker of a pod slice)."""
  for device_dir in glob.glob(os.path.join(pci_root, "*")):
    try:
      with open(os.path.join(device_dir, "vendor")) as f:
        vendor = f.read().strip()
      with open(os.path.join(device_dir, "device")) as f:
        device = f.read().strip()
    except OSError:
      continue
    if vendor == GOOGLE_PCI_VENDOR and device in TPU_PCI_DEVICES:
      return True
  return False


def initialize(coordinator_address=None, num_processes=None, process_id=None, mode: str = "auto") -> None:
  """Starts jax.distributed when this is one process of several; does nothing otherwise."""
  import jax

  if mode not in MODES:
    raise UserError(f"--distributed={mode!r} is not known; choose one of {MODES}.")
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise UserError("--coordinator_address, --num_processes and --process_id go together; give all three.")
    # CPU processes need a collectives backend of their own to talk to each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif mode == "on" or (mode == "auto" and (_cluster_environment() or tpu_chips_present())):
    jax.distributed.initialize()
