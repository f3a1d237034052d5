"""Orbax checkpoints in `workdir/checkpoints`: the sharded train state, the data-iterator state and the config.

Restores place arrays with the shardings of the abstract state they are given, i.e. on the *current* mesh.
Nothing here deletes or overwrites a checkpoint other than through orbax's keep-N policy.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import tempfile
import threading
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


INCOMPLETE = ".orbax-checkpoint-tmp"  # orbax writes a step under <step><INCOMPLETE>, renamed to <step> when complete


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
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "config", "fingerprint"))
    self._pending = None  # the step of the save in flight, until check() has seen it complete
    self._log = None if read_only else _OrbaxErrorLog()
    latest = self.manager.latest_step()
    self._last_size = 0 if latest is None or read_only else _disk_usage(fileio.join(self.directory, str(latest)))

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
    self._check_writable(step)
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
    if not fileio.is_remote(final):
      self._last_size = _disk_usage(final)

  def _failed(self, step: int, error: Exception | None) -> CheckpointError:
    cause = _cause(error) if error is not None else (self._log.first if self._log and self._log.first else
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

  def _check_writable(self, step: int) -> None:
    """A local folder that cannot be written (made read-only or immutable, permissions) fails here, at once: in
    orbax's background threads it would fail only after a long wait for the step folder's creation."""
    if fileio.is_remote(self.directory):
      return
    probe = os.path.join(self.directory, f".write_probe_{os.getpid()}")
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
    are checked against the checksums saved with them; a checkpoint without them is corrupt unless trusted."""
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
    if saved is None and not self.trust_unverified:
      raise CorruptCheckpointError(
          f"checkpoint step {step} in {self.directory} has no checksums (its fingerprint/ folder is missing), so "
          "its arrays cannot be verified and it is treated as corrupt. If you know it is intact, put it back in "
          "checkpoints/ and set --config.trust_unverified_checkpoints=True.")
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
    unsaid rather than as a second error."""
    try:
      if report:
        self.check(wait=True)
    finally:
      try:
        self.manager.close()
      except Exception as e:
        if report:
          raise CheckpointError(f"closing the checkpoints in {self.directory} failed: {_cause(e)}.") from None
      if self._log is not None:
        self._log.close()


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


_ERRNO_WORDS = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system",
                errno.EACCES: "Permission denied", errno.EDQUOT: "Disk quota exceeded"}


def _cause(error) -> str:
  """A short cause of a failed save: the OS error it comes down to, else the first line of its message."""
  text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
  for words in _ERRNO_WORDS.values():
    if words in text:
      return words.lower()
  first = text.splitlines()[0] if text else ""
  return first[:200] + ("..." if len(first) > 200 else "")


class _OrbaxErrorLog(logging.Filter):
  """Keeps the error records of orbax's background saves (and of their asyncio tasks) off the console while a
  writing Checkpointer is open: the run reports a failed save itself, in one line that gives the cause and names the
  file these records go to instead."""

  def __init__(self):
    super().__init__()
    self.first = None  # the cause in the first such record
    self.path = None  # the file the records were written to (made on the first one)
    self._handlers = list(logging.getLogger().handlers)
    for handler in self._handlers:
      handler.addFilter(self)
    # Tensorstore's callbacks into orbax's event loop, closed after a failed write, print "Event loop is closed"
    # tracebacks from C++ (one per pending write, until the process ends): they go to the same file.
    self._stderr = sys.stderr
    sys.stderr = _ClosedLoopTracebacks(sys.stderr, self)

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or not ("orbax" in record.pathname or
                                              record.name in ("asyncio", "concurrent.futures")):
      return True
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += "\n" + f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    if self.first is None:
      self.first = _cause(text.splitlines()[-1] if record.exc_info else text)
    self.write(logging.Formatter().format(record) + "\n")
    return False

  def write(self, text: str) -> None:
    try:
      if self.path is None:
        fd, self.path = tempfile.mkstemp(prefix="selfperc_jax_orbax_", suffix=".log")
        os.close(fd)
      with open(self.path, "a") as f:
        f.write(text)
    except OSError:  # the temporary folder is full too: the record is dropped; the run's error still says the cause
      pass

  def close(self) -> None:
    """Stops filtering the log records; sys.stderr stays filtered after a failure (its tracebacks come until exit)."""
    for handler in self._handlers:
      handler.removeFilter(self)
    if self.path is None and isinstance(sys.stderr, _ClosedLoopTracebacks) and sys.stderr._log is self:
      sys.stderr = self._stderr


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


class _ClosedLoopTracebacks:
  """sys.stderr, less the "Event loop is closed" tracebacks (written to the log instead); everything else passes."""

  def __init__(self, stream, log: _OrbaxErrorLog):
    self._stream, self._log, self._held = stream, log, {}  # thread id -> the pieces of its traceback so far

  def write(self, text: str) -> int:
    thread = threading.get_ident()  # (threads' writes interleave: each thread's traceback is held apart)
    held = self._held.get(thread)
    if held is None and not text.startswith("Traceback (most recent call last):"):
      return self._stream.write(text)
    held = self._held.setdefault(thread, [])
    held.append(text)
    block = "".join(held)
    last = block.rstrip("\n").rsplit("\n", 1)[-1]
    if block.endswith("\n") and last and not last.startswith((" ", "Traceback")):  # the exception's own line
      del self._held[thread]
      if last.startswith("RuntimeError: Event loop is closed"):
        self._log.write(block)
      else:
        self._stream.write(block)
    return len(text)

  def flush(self) -> None:
    self._stream.flush()

  def __getattr__(self, name):
    return getattr(self._stream, name)
