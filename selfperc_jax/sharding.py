"""Every decision about devices lives here: the mesh, how state and batches are placed, how the step is compiled.

The mesh has the named axes ('data', 'fsdp'); the batch is split over both. Params are replicated for now, so
'fsdp' has size 1 (sharding them along it is the scale-out issue's work and changes only `state_shardings`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from selfperc_jax.errors import ConfigError

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  n = mesh_cfg.data
  if n == -1:
    n = len(devices)
  if not 1 <= n <= len(devices):
    raise ConfigError(f"mesh.data={mesh_cfg.data} but {len(devices)} devices are available; use -1 (all) or 1..{len(devices)}.")
  return Mesh(np.asarray(devices[:n]).reshape(n, 1), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def state_shardings(mesh: Mesh, abstract_state):
  """Shardings for every leaf of the train state (replicated today)."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  if global_batch % mesh.size:
    raise ConfigError(f"batch_size={global_batch} must be divisible by the {mesh.size} devices of the mesh.")
  if global_batch % jax.process_count():
    raise ConfigError(f"batch_size={global_batch} must be divisible by the {jax.process_count()} processes.")


def global_batch(local_batch, mesh: Mesh):
  """Turns this process's numpy batch into one global jax.Array split over the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def jit_train_step(train_step, mesh: Mesh, state_sharding):
  """Compiles the pure step with explicit shardings, donating the old state."""
  return jax.jit(
      train_step,
      in_shardings=(state_sharding, batch_sharding(mesh), replicated(mesh)),
      out_shardings=(state_sharding, replicated(mesh)),
      donate_argnums=0,
  )


def jit_init(init_fn, mesh: Mesh, state_sharding):
  """Initialises the state directly in its sharded layout."""
  return jax.jit(init_fn, out_shardings=state_sharding)
