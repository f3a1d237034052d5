"""Orbax checkpoints in `workdir/checkpoints`: the sharded train state, the data-iterator state and the config.

Restores place arrays with the shardings of the abstract state they are given, i.e. on the *current* mesh.
Nothing here deletes or overwrites a checkpoint other than through orbax's keep-N policy; the folders of saves that
never completed are removed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from selfperc_jax import fileio, save_errors, sharding
from selfperc_jax.errors import CheckpointError, CorruptCheckpointError


def checkpoint_dir(path: str) -> str:
  """Accepts a workdir or its checkpoints/ folder."""
  path = fileio.resolve(os.fspath(path))
  sub = fileio.join(path, "checkpoints")
  return sub if fileio.isdir(sub) else path


INCOMPLETE = ".orbax-checkpoint-tmp"  # orbax writes a step under <step><INCOMPLETE>, renamed to <step> when complete

# Orbax writes a replicated array "replica-parallel": each of its N replicas writes 1/N of it, which spreads a large
# array's writes over the hosts of a pod. Each piece is a device slice, a host copy and a write of its own, so a
# small array split N ways costs N times the overhead to save the same bytes (the digits states save 2-3x faster
# whole: BENCHMARKS.md, "Checkpoint saves"). Pieces below this size are not split; a large model's arrays still are.
MIN_REPLICA_SLICE_BYTES = 256 << 10


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """The items of a checkpoint and their handlers: the train state's arrays with MIN_REPLICA_SLICE_BYTES."""
  default = ocp.type_handlers.get_type_handler(jax.Array)
  arrays = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
      array_metadata_store=getattr(default, "_array_metadata_store", None))  # as orbax's default handler has it
  types = ocp.type_handlers.create_type_handler_registry(
      *[(t, ocp.type_handlers.get_type_handler(t)) for t in (int, float, bytes, np.number, np.ndarray, str)],
      (jax.Array, arrays))
  state = ocp.PyTreeCheckpointHandler(type_handler_registry=types)
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.PyTreeSave, state)
  registry.add("state", ocp.args.PyTreeRestore, state)
  for item in ("data", "config", "fingerprint"):
    json_handler = ocp.JsonCheckpointHandler()
    registry.add(item, ocp.args.JsonSave, json_handler)
    registry.add(item, ocp.args.JsonRestore, json_handler)
  return registry


class Checkpointer:
  """A save reports its failure, as one CheckpointError, at the first check() (every step) after it has failed; a
  save that would not fit on a local disk (as large as the previous checkpoint on disk) is refused before it starts.
  Folders of saves that never completed are removed when a writing Checkpointer opens the directory."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False,
               trust_unverified: bool = False):
    self.directory = fileio.resolve(directory)
    self.trust_unverified = trust_unverified
    if not read_only:
      self._remove_incomplete()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handler_registry())
    self._pending = None  # the step of the save in flight, until check() has seen it complete
    self._log = None if read_only else save_errors.OrbaxErrorLog()
    latest = self.manager.latest_step()
    self._last_size = 0  # bytes of the newest checkpoint on a local disk (process 0, which checks the space)
    if latest is not None and not read_only and jax.process_index() == 0:
      self._last_size = _disk_usage(fileio.join(self.directory, str(latest)))

  def _remove_incomplete(self) -> None:
    """Removes the folders of saves that a killed or failed run left incomplete (never restorable; on a full disk
    they hold the space the next save needs), saying which."""
    if fileio.is_remote(self.directory) or not os.path.isdir(self.directory) or jax.process_index() != 0:
      return
    import shutil

    for name in sorted(os.listdir(self.directory)):
      if INCOMPLETE in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        print(f"removed {os.path.join(self.directory, name)}: a save that never completed", flush=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config: ml_collections.ConfigDict) -> None:
    self.check(wait=True)  # the previous save's failure is reported as its own, not as this one's
    self._check_before_save(step, state)
    if self._log is not None:
      self._log.active = True  # until check() has seen this save complete
    try:
      self.manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.PyTreeSave(state),
              data=ocp.args.JsonSave(data_state),
              config=ocp.args.JsonSave(json.loads(config.to_json())),
              fingerprint=ocp.args.JsonSave(fingerprint(state)),
          ),
          force=True,
      )
    except Exception as e:  # the synchronous part of the save (creating folders, the bucket) failed
      raise self._failed(step, e) from None
    self._pending = step

  def check(self, wait: bool = False) -> None:
    """Raises, as one CheckpointError saying what failed and where, the failure of the save in flight once it has
    finished (cheap: call it every step, so a failed save stops the run at the next step, not one interval later).
    wait: wait for the save to finish first."""
    if self._pending is None or (not wait and self.manager.is_saving_in_progress()):
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:
      raise self._failed(step, e) from None
    final = fileio.join(self.directory, str(step))
    if not fileio.isdir(final):  # orbax logged the failure of an item and skipped the step's finalisation
      raise self._failed(step, None)
    if not fileio.is_remote(final) and jax.process_index() == 0:
      self._last_size = _disk_usage(final)
    if self._log is not None:
      self._log.active, self._log.first = False, None

  def _failed(self, step: int, error: Exception | None) -> CheckpointError:
    cause = save_errors.cause(error) if error is not None else (self._log.first if self._log and self._log.first else
                                                       "it was not completed")
    details = f" (orbax's log of it: {self._log.path})" if self._log and self._log.path else ""
    return CheckpointError(
        f"saving checkpoint step {step} to {self.directory} failed: {cause}{details}. The run stopped; the last "
        f"complete checkpoint is {self._last_complete()}. Fix the cause (disk space, permissions, the bucket) and "
        "rerun: it resumes from there.")

  def _last_complete(self) -> str:
    try:
      self.manager.reload()
      steps = self.manager.all_steps()
    except Exception:  # the folder itself may be what failed
      steps = []
    return f"step {max(steps)}" if steps else "none"

  def _check_before_save(self, step: int, state) -> None:
    """Process 0 looks (a write probe, the free space) and every process gets its answer, so that all of them
    either start the save, which is collective, or stop."""
    problem = None
    if jax.process_index() == 0:
      try:
        self._check_writable(step)
        self._check_space(step, state)
      except CheckpointError as e:
        problem = e
    if not sharding.process_0_says(problem is None):
      raise problem or CheckpointError(f"process 0 refused to save checkpoint step {step} to {self.directory} (its "
                                       "output says why). The run stopped.")

  def _check_writable(self, step: int) -> None:
    """A local folder that cannot be written (made read-only or immutable, permissions) fails here, at once: in
    orbax's background threads it would fail only after a long wait for the step folder's creation."""
    if fileio.is_remote(self.directory):
      return
    probe = fileio.partial_name(os.path.join(self.directory, ".write_probe"))  # (unique to this host and process)
    try:
      with open(probe, "w"):
        pass
      os.remove(probe)
    except OSError as e:
      raise self._failed(step, e) from None

  def _check_space(self, step: int, state) -> None:
    """Refuses a save that cannot fit on a local disk (a bucket has no such limit to ask about): it needs as much
    as the previous checkpoint took on disk (or, before the first, the state's bytes), plus 10 %."""
    if fileio.is_remote(self.directory):
      return
    import shutil

    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    needed = 1.1 * max(self._last_size, state_bytes)
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      raise CheckpointError(
          f"not enough disk space for checkpoint step {step} in {self.directory}: it needs about "
          f"{_size(needed)} (the previous checkpoint took {_size(self._last_size)} on disk) and {_size(free)} are "
          f"free. The run stopped without saving (the last complete checkpoint is {self._last_complete()}); free "
          "space (or lower keep_checkpoints) and rerun.")

  def restore_config(self, step: int) -> dict:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # orbax raises many kinds for unreadable files
      raise CorruptCheckpointError(
          f"the config of checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: {e}). "
          "The checkpoint may be incomplete or corrupt: move that step's folder aside to resume from an earlier "
          "one, or use a new --workdir.") from e

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, step: int, abstract_state, *, partial: bool = False) -> tuple[Any, dict | None]:
    """(state, data-iterator state); abstract_state holds ShapeDtypeStructs with the target shardings. The arrays
    are checked against the checksums saved with them; a checkpoint without them is corrupt unless trusted (and
    refused before its arrays are read)."""
    saved = self._saved_fingerprint(step)
    if saved is None and not self.trust_unverified:
      raise CorruptCheckpointError(
          f"checkpoint step {step} in {self.directory} has no checksums (its fingerprint/ folder is missing), so "
          "its arrays cannot be verified and it is treated as corrupt. If you know it is intact, put it back in "
          "checkpoints/ and set --config.trust_unverified_checkpoints=True.")
    items = {"state": ocp.args.PyTreeRestore(
        abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        partial_restore=partial)}
    if not partial:
      items["data"] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CorruptCheckpointError(
          f"checkpoint step {step} in {self.directory} could not be restored ({type(e).__name__}: "
          f"{str(e).splitlines()[0][:300] if str(e) else ''}). If it is incomplete or corrupt, move that step's "
          "folder aside to resume from an earlier one; if it was written by a different model config, use a new "
          "--workdir.") from e
    if saved is not None:
      now = fingerprint(restored["state"])
      bad = sorted(k for k in now if k in saved and saved[k] != now[k])
      if bad:
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {self.directory} is corrupt: {len(bad)} array(s) differ from what was saved "
            f"(checksum mismatch in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}).")
    return restored["state"], (None if partial else restored.get("data"))

  def _saved_fingerprint(self, step: int) -> dict | None:
    if not fileio.exists(fileio.join(self.directory, str(step), "fingerprint")):
      return None
    try:
      return self.manager.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))["fingerprint"]
    except Exception as e:
      raise CorruptCheckpointError(f"the checksums of checkpoint step {step} in {self.directory} cannot be read "
                                   f"({type(e).__name__}).") from e

  def wait(self) -> None:
    self.check(wait=True)

  def close(self, report: bool = True) -> None:
    """Waits for the save in flight; report=False (the run is already stopping with an error) leaves its failure
    unsaid rather than as a second error. The first failure is the one raised."""
    error = None
    if report:
      try:
        self.check(wait=True)
      except CheckpointError as e:
        error = e
    try:
      self.manager.close()
    except Exception as e:
      if report and error is None:
        error = CheckpointError(f"closing the checkpoints in {self.directory} failed: {save_errors.cause(e)}.")
    if self._log is not None:
      self._log.close()
    if error is not None:
      raise error


def _size(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _disk_usage(path: str) -> int:
  """Bytes of the files below a local folder."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:
        pass
  return total


@jax.jit
def _sums(leaves):
  """Per array, the wrapping uint32 sum of its bit patterns: any single flipped bit changes it."""
  out = []
  for x in leaves:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32))
    out.append(jnp.sum(words.astype(jnp.uint32), dtype=jnp.uint32))
  return out


def _path_name(path) -> str:
  """'ema_params/Conv_0/kernel' for a leaf of the TrainState or of a dict restored from part of it."""
  return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def fingerprint(state) -> dict[str, int]:
  """{leaf path: checksum} of a (possibly sharded, multi-host) state, computed on its devices."""
  paths_leaves = [(_path_name(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state)]
  if not paths_leaves:
    return {}
  sums = sharding.to_host(_sums([x for _, x in paths_leaves]))
  return {path: int(np.asarray(v)) for (path, _), v in zip(paths_leaves, sums)}
