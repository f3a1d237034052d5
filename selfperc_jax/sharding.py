"""Every decision about devices lives here: the mesh, how state and batches are placed, how the step is compiled.

The mesh has the named axes ('data', 'fsdp'); the batch is split over both. Every array of the train state (params,
optimizer moments, the EMA and the perceptual copy alike) follows one rule: replicated when `fsdp` is 1 or the array
is small, otherwise split along `fsdp` on its largest dimension that `fsdp` divides (FSDP / ZeRO-3 style; XLA
inserts the all-gathers and reduce-scatters).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from selfperc_jax.errors import ConfigError

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) from the config; -1 on one axis takes the devices the other leaves."""
  data, fsdp = int(mesh_cfg.data), int(mesh_cfg.fsdp)  # values checked in validation; here: the device count
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if num_devices % known:
      raise ConfigError(f"{num_devices} devices cannot be split into {'mesh.fsdp' if data == -1 else 'mesh.data'}"
                        f"={known} groups; choose a divisor of {num_devices}.")
    data, fsdp = (num_devices // known, known) if data == -1 else (known, num_devices // known)
  if data * fsdp > num_devices:
    raise ConfigError(f"mesh.data={data} x mesh.fsdp={fsdp} needs {data * fsdp} devices but {num_devices} are "
                      "available; use -1 for one axis to take the rest.")
  return data, fsdp


def device_grid(data: int, fsdp: int, devices) -> np.ndarray:
  """The (data, fsdp) array of devices. On several TPU slices (multi-slice), the data axis spans the slices over
  the data-centre network and everything else stays inside a slice (a hybrid mesh); otherwise devices are ordered by
  the physical topology (ICI rings on TPU; GPUs and CPUs in process order, so an fsdp group stays on one host when
  it divides the host's device count)."""
  slices = sorted({getattr(d, "slice_index", 0) for d in devices})
  if len(slices) > 1:
    if data % len(slices):
      raise ConfigError(f"the devices span {len(slices)} TPU slices, which the data axis must span: mesh.data={data} "
                        f"must be a multiple of {len(slices)} (e.g. --config.mesh.data={len(slices)} "
                        "--config.mesh.fsdp=-1 shards the state within each slice).")
    return mesh_utils.create_hybrid_device_mesh((data // len(slices), fsdp), (len(slices), 1), devices)
  try:
    return mesh_utils.create_device_mesh((data, fsdp), devices)
  except (ValueError, NotImplementedError, AssertionError):
    return np.asarray(devices).reshape(data, fsdp)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = mesh_shape(mesh_cfg, len(devices))
  return Mesh(device_grid(data, fsdp, devices[: data * fsdp]), AXES)


def local_mesh() -> Mesh:
  """A one-axis mesh of this process's own devices, for work each process does alone (e.g. embedding a reference
  batch): its arrays never span other hosts. Its axes are AXES, so batch_sharding applies."""
  return Mesh(np.asarray(jax.local_devices()).reshape(-1, 1), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """FSDP rule: split the largest dimension that `fsdp` divides, for arrays of at least `min_size` elements."""
  if fsdp == 1 or not shape or int(np.prod(shape)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % fsdp == 0:
      return P(*([None] * dim + ["fsdp"]))
  return P()


def state_shardings(mesh: Mesh, abstract_state, min_size: int = 1024):
  """Shardings for every leaf of the train state, by `param_spec` on its shape."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp, min_size)), abstract_state)


def process_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """[start, stop) of the global batch that lives on this process's devices (contiguous by construction)."""
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  starts = [idx[0].start or 0 for idx in indices.values()]
  stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in indices.values()]
  start, stop = min(starts), max(stops)
  if stop - start != global_batch * len(indices) // mesh.size:
    raise ValueError("this process's devices do not hold one contiguous block of the batch; "
                     "build the mesh so that each process owns consecutive positions.")
  return start, stop


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  if global_batch % mesh.size:
    raise ConfigError(f"batch_size={global_batch} must be divisible by the {mesh.size} devices of the mesh.")
  if global_batch % jax.process_count():
    raise ConfigError(f"batch_size={global_batch} must be divisible by the {jax.process_count()} processes.")


def global_batch(local_batch, mesh: Mesh):
  """Turns this process's numpy batch into one global jax.Array split over the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def jit_train_step(train_step, mesh: Mesh, state_sharding, frozen: bool = False):
  """Compiles the pure step with explicit shardings, donating the old state; with `frozen`, the step takes a fourth
  argument, replicated (the frozen params it uses: the text encoder's)."""
  return jax.jit(
      train_step,
      in_shardings=(state_sharding, batch_sharding(mesh), replicated(mesh)) + ((replicated(mesh),) if frozen else ()),
      out_shardings=(state_sharding, replicated(mesh)),
      donate_argnums=0,
  )


def jit_init(init_fn, state_sharding):
  """Initialises the state directly in its sharded layout."""
  return jax.jit(init_fn, out_shardings=state_sharding)


def check_divisible(value: int, key: str, mesh: Mesh) -> None:
  if value % mesh.size:
    up = -(-value // mesh.size) * mesh.size
    raise ConfigError(f"{key}={value} must be a multiple of the {mesh.size} devices of the mesh (e.g. {up}).")


def global_array(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array from a numpy array that every process holds whole (e.g. labels computed from a seed):
  each process fills only its own devices' shards, so this works on any number of hosts."""
  host_array = np.asarray(host_array)
  return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def replicate(tree, mesh: Mesh):
  """A pytree of host arrays (e.g. a feature network's weights), replicated on every device of the mesh."""
  return jax.tree.map(lambda x: global_array(x, replicated(mesh)), tree)


def to_host(tree):
  """Numpy copies of global arrays on every process, whichever devices hold their shards (small outputs only:
  samples of one chunk, features, metrics). `jax.device_get` refuses arrays with shards on other hosts."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def broadcast_from_process_0(value):
  """Process 0's value of a small numpy-compatible value, on every process (one value for a decision all must
  share, e.g. how many evaluation chunks are already done)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return multihost_utils.broadcast_one_to_all(value)


def process_0_says(flag: bool) -> bool:
  """Process 0's yes or no, on every process (e.g. whether a file that only process 0 looks at exists)."""
  return bool(int(broadcast_from_process_0(np.int32(1 if flag else 0))))


def barrier() -> None:
  """Every process waits here for all the others (e.g. until process 0 has written what they read next)."""
  broadcast_from_process_0(np.int32(0))
