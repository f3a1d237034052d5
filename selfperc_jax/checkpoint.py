"""Orbax checkpoints in `workdir/checkpoints`: the sharded train state, the data-iterator state and the config.

Restores place arrays with the shardings of the abstract state they are given, i.e. on the *current* mesh.
Nothing here deletes or overwrites a checkpoint other than through orbax's keep-N policy.
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

from selfperc_jax import config_tree, fileio
from selfperc_jax.errors import CheckpointError, CorruptCheckpointError

# Config sections that fix the shapes of the state; a checkpoint only resumes under the same values.
SHAPE_KEYS = ("model", "data.image_size", "data.name", "latent.vae", "latent.channels", "latent.block_out_channels")
# Keys inside those sections that change how the model computes, not what it holds.
NON_SHAPE_KEYS = ("model.dtype", "model.remat", "model.dropout", "model.attention")
# Keys added after checkpoints were already written: a saved config without them had these values.
ADDED_KEY_DEFAULTS = {"model.head_channels": 0, "model.attention": "auto", "optimizer.accumulate_steps": 1,
                      "latent.vae": "", "latent.channels": 0, "latent.block_out_channels": ()}


def checkpoint_dir(path: str) -> str:
  """Accepts a workdir or its checkpoints/ folder."""
  path = fileio.resolve(os.fspath(path))
  sub = fileio.join(path, "checkpoints")
  return sub if fileio.isdir(sub) else path


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.directory = fileio.resolve(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "config", "fingerprint"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config: ml_collections.ConfigDict) -> None:
    self.check()
    self._check_space(step, state)
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
      raise CheckpointError(
          f"saving checkpoint step {step} to {self.directory} failed ({type(e).__name__}: "
          f"{str(e).splitlines()[0][:300] if str(e) else ''}). The run stopped; the last complete checkpoint is "
          f"{self._last_complete()}. Fix the cause (disk space, permissions, the bucket) and rerun: it resumes "
          "from there.") from e

  def check(self) -> None:
    """Raises, as a CheckpointError saying what failed and where, the error of an asynchronous save that has
    finished since (cheap: call it every step, so a failed save stops the run at once, not one interval later)."""
    try:
      self.manager.check_for_errors()
      if not self.manager.is_saving_in_progress():
        self.manager.wait_until_finished()  # returns at once, or raises the finished save's error
    except Exception as e:
      latest = self._last_complete()
      raise CheckpointError(
          f"saving a checkpoint to {self.directory} failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
          f"The run stopped; the last complete checkpoint is {latest}. Fix the cause (disk space, permissions, "
          "the bucket) and rerun: it resumes from there.") from e

  def _last_complete(self) -> str:
    try:
      steps = self.manager.all_steps(read=True)
    except Exception:  # the folder itself may be what failed
      steps = []
    return f"step {max(steps)}" if steps else "none"

  def _check_space(self, step: int, state) -> None:
    """Refuses a save that cannot fit on a local disk (a bucket has no such limit to ask about)."""
    if fileio.is_remote(self.directory):
      return
    import shutil

    import jax

    needed = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    free = shutil.disk_usage(self.directory).free
    if free < 1.05 * needed:
      raise CheckpointError(
          f"not enough disk space for checkpoint step {step} in {self.directory}: it needs about "
          f"{needed / 2**30:.2f} GiB and {free / 2**30:.2f} GiB are free. The run stopped without saving (the last "
          f"complete checkpoint is {self._last_complete()}); free space (or lower keep_checkpoints) and rerun.")

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
    are checked against the fingerprint saved with them (checkpoints written before fingerprints: not checked)."""
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
    saved = self._saved_fingerprint(step)
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
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _flatten(prefix: str, value) -> dict:
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(_flatten(f"{prefix}.{k}", v))
    return out
  return {prefix: value}


def shape_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """'key: saved -> current' for every shape-determining config value that differs."""
  current = json.loads(config.to_json())
  diffs = []
  for key in SHAPE_KEYS:
    old, new = _flatten(key, config_tree.lookup(saved, key)), _flatten(key, config_tree.lookup(current, key))
    for k in sorted((set(old) | set(new)) - set(NON_SHAPE_KEYS)):
      a, b = (ADDED_KEY_DEFAULTS.get(k) if d.get(k) is None else d[k] for d in (old, new))
      if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
        diffs.append(f"{k}: {a!r} in the checkpoint, {b!r} now")
  return diffs


def changed_values(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{dotted key: (value in the checkpoint, value now)} for every config value that differs (lists and tuples
  compare equal; keys a checkpoint predates count with their defaults)."""
  old = _flatten("", saved)
  new = _flatten("", json.loads(config.to_json()))
  norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  out = {}
  for k in sorted(set(old) | set(new)):
    key = k[1:]
    a, b = old.get(k, ADDED_KEY_DEFAULTS.get(key)), new.get(k, ADDED_KEY_DEFAULTS.get(key))
    if norm(a) != norm(b):
      out[key] = (a, b)
  return out


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
  from selfperc_jax import sharding

  sums = sharding.to_host(_sums([x for _, x in paths_leaves]))
  return {path: int(np.asarray(v)) for (path, _), v in zip(paths_leaves, sums)}
