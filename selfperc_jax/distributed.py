"""Starting jax.distributed when this process is one of several: explicit flags, or detected from the cluster."""

from __future__ import annotations

import glob
import os

from absl import logging

from selfperc_jax.errors import UserError


def _auto_detected_multi_process() -> bool:
  """GKE TPU pods (TPU_WORKER_HOSTNAMES) and SLURM jobs of several tasks; JAX finds the rest itself."""
  env = os.environ
  tpu_workers = env.get("TPU_WORKER_HOSTNAMES", "")
  return ("," in tpu_workers or "MEGASCALE_COORDINATOR_ADDRESS" in env
          or int(env.get("SLURM_NTASKS", "1") or 1) > 1)


def _tpu_chips_present() -> bool:
  """Google TPU chips on this host's PCI bus (vendor 0x1ae0): a Cloud TPU VM, single host or one of a pod slice."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == "0x1ae0":
          return True
    except OSError:
      continue
  return False


def initialize(coordinator_address=None, num_processes=None, process_id=None,
                           distributed: bool = False) -> None:
  """Starts jax.distributed when this is one process of several (see the flags); does nothing otherwise."""
  import jax

  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise UserError("--coordinator_address, --num_processes and --process_id go together; give all three.")
    # CPU processes need a collectives backend of their own to talk to each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif distributed or _auto_detected_multi_process():
    jax.distributed.initialize()
  elif _tpu_chips_present():
    # A Cloud TPU VM: JAX finds the pod slice's workers from the VM metadata (one worker on a single-host VM).
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
      logging.warning("TPU host without a cluster JAX can detect (%s): running as a single process. Pass "
                      "--distributed to make this an error.", e)
