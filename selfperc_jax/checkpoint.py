"""Orbax checkpoints in `workdir/checkpoints`: the sharded train state, the data-iterator state and the config.

Restores place arrays with the shardings of the abstract state they are given, i.e. on the *current* mesh.
Nothing here deletes or overwrites a checkpoint other than through orbax's keep-N policy.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from selfperc_jax import fileio
from selfperc_jax.errors import CheckpointError

# Config sections that fix the shapes of the state; a checkpoint only resumes under the same values.
SHAPE_KEYS = ("model", "data.image_size", "data.name")
# Keys inside those sections that change how the model computes, not what it holds.
NON_SHAPE_KEYS = ("model.dtype", "model.remat", "model.dropout")
# Keys added after checkpoints were already written: a saved config without them had these values.
ADDED_KEY_DEFAULTS = {"model.head_channels": 0}


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
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config: ml_collections.ConfigDict) -> None:
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(json.loads(config.to_json())),
        ),
        force=True,
    )

  def restore_config(self, step: int) -> dict:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # orbax raises many kinds for unreadable files
      raise CheckpointError(
          f"the config of checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: {e}). "
          "The checkpoint may be incomplete or corrupt: move that step's folder aside to resume from an earlier "
          "one, or use a new --workdir.") from e

  def restore(self, step: int, abstract_state, *, partial: bool = False) -> tuple[Any, dict | None]:
    """(state, data-iterator state); abstract_state holds ShapeDtypeStructs with the target shardings."""
    items = {"state": ocp.args.PyTreeRestore(
        abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        partial_restore=partial)}
    if not partial:
      items["data"] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} could not be restored ({type(e).__name__}: {e}). "
          "If it is incomplete or corrupt, move that step's folder aside to resume from an earlier one; if it was "
          "written by a different model config, use a new --workdir.") from e
    return restored["state"], (None if partial else restored.get("data"))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _lookup(d: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(d, dict) or part not in d:
      return None
    d = d[part]
  return d


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
    old, new = _flatten(key, _lookup(saved, key)), _flatten(key, _lookup(current, key))
    for k in sorted((set(old) | set(new)) - set(NON_SHAPE_KEYS)):
      a, b = old.get(k, ADDED_KEY_DEFAULTS.get(k)), new.get(k, ADDED_KEY_DEFAULTS.get(k))
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
