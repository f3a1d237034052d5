"""Files that may live on local disk or in a bucket (gs://...): the workdir and everything written into it.

etils.epath does the I/O (TensorFlow's gfile for gs:// paths, the os module for local ones). Buckets have no append
and no atomic rename of partial files, so appends rewrite the object and writes go to a temporary name first.
"""

from __future__ import annotations

import errno
import io
import os
import re
import socket
import time
import uuid

from etils import epath


def is_remote(path) -> bool:
  return "://" in str(path)


def resolve(path: str) -> str:
  """Absolute local paths (with ~ expanded); bucket URLs unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(os.path.expanduser(str(path)))


def check_workdir(path: str) -> None:
  """Refuses a local workdir that is a file, or lies below one, before anything is written."""
  if is_remote(path):
    return
  from selfperc_jax.errors import UserError

  node = os.path.abspath(path)
  while not os.path.exists(node):
    node = os.path.dirname(node)
  if not os.path.isdir(node):
    where = "is a file" if node == os.path.abspath(path) else f"lies below {node}, which is a file"
    raise UserError(f"--workdir={path} {where}; give a directory (it is created if missing).")


def make_workdir(path: str) -> None:
  """Creates the workdir (and its parents); what the file system refuses is one UserError line."""
  check_workdir(path)
  try:
    makedirs(path)
  except OSError as e:
    from selfperc_jax.errors import UserError

    why = {errno.ENAMETOOLONG: "a name in it is longer than the file system allows",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full"}.get(e.errno, e.strerror or str(e))
    raise UserError(f"--workdir={path} cannot be created ({why}); give a directory you can write.") from None


def join(*parts) -> str:
  return str(epath.Path(parts[0]).joinpath(*parts[1:]))


def exists(path) -> bool:
  return epath.Path(path).exists()


def isdir(path) -> bool:
  return epath.Path(path).is_dir()


def makedirs(path) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def remove(path) -> None:
  epath.Path(path).unlink(missing_ok=True)


def read_bytes(path) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path) -> str:
  return epath.Path(path).read_text()


_HOST = socket.gethostname().replace("-", "_")
# <name>.tmp-<host>-<pid>-<8 hex>: a file being written, renamed to <name> when complete
_PARTIAL = re.compile(r"\.tmp-(?P<host>[^-/]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def partial_name(path) -> epath.Path:
  """The unique temporary name beside `path` that a file is written under before it is renamed to `path` (unique,
  so processes writing the same file never write into each other's; it names the writer, so that a partial file left
  by a killed writer can be told from one being written: see remove_partial_files)."""
  path = epath.Path(path)
  return path.with_name(f"{path.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


_STARTED = time.time()  # (about) when this process started


def process_alive(pid: int, since: float | None = None) -> bool:
  """Whether process `pid` of this host exists, and, where `since` (a time) is given, was that process then: a pid
  equal to this process's own, seen before this process started, was an earlier process's (e.g. a container
  restarted in place, whose processes get the same small pids again)."""
  if since is not None and pid == os.getpid() and since < _STARTED:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def remove_partial_files(directory) -> list[str]:
  """Removes the partial files in `directory` whose writer, a process of this host, is gone (a write killed midway);
  returns their names. Partial files of live processes or of other hosts are left alone."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  removed = []
  for child in directory.iterdir():
    m = _PARTIAL.search(child.name)
    if m and m["host"] == _HOST and not process_alive(int(m["pid"]), since=child.stat().mtime):
      child.unlink(missing_ok=True)
      removed.append(child.name)
  return sorted(removed)


def write_bytes(path, data: bytes) -> None:
  """Writes a temporary file beside `path` (partial_name), then renames it over `path`: a reader never sees a
  partial file."""
  tmp = partial_name(path)
  tmp.write_bytes(data)
  tmp.replace(epath.Path(path))


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode())


def append_text(path, text: str) -> None:
  if is_remote(path):
    old = read_bytes(path) if exists(path) else b""
    write_bytes(path, old + text.encode())
  else:
    with open(path, "a") as f:
      f.write(text)


def savez(path, *args, **kwargs) -> None:
  """np.savez to any path (buffered, then written in one piece)."""
  import numpy as np

  buffer = io.BytesIO()
  np.savez(buffer, *args, **kwargs)
  write_bytes(path, buffer.getvalue())


def load_npz(path):
  """np.load of a .npz from any path (the caller closes it, e.g. `with load_npz(p) as f`); a file that is not one
  (no zip signature: a text file, a .npy, a pickle) is a ValueError saying what its first bytes are."""
  import numpy as np

  data = read_bytes(path) if is_remote(path) else None
  if data is not None:
    head = data[:4]
  else:
    with open(path, "rb") as f:
      head = f.read(4)
  if head != b"PK\x03\x04" and head != b"PK\x05\x06":  # a zip's first entry, or an empty zip
    kind = ("empty" if not head else "a .npy array, not an .npz" if head.startswith(b"\x93NU") else
            "text, not a .npz" if head.isascii() and all(32 <= c < 127 or c in b"\t\r\n" for c in head) else
            f"not a .npz (it begins with {head!r}, not a zip's PK)")
    raise ValueError(f"the file is {kind}")
  return np.load(io.BytesIO(data) if data is not None else path, allow_pickle=False)
