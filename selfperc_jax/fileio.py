"""Files that may live on local disk or in a bucket (gs://...): the workdir and everything written into it.

etils.epath does the I/O (TensorFlow's gfile for gs:// paths, the os module for local ones). Buckets have no append
and no atomic rename of partial files, so appends rewrite the object and writes go to a temporary name first.
"""

from __future__ import annotations

import io
import os
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


def write_bytes(path, data: bytes) -> None:
  """Writes a temporary file beside `path`, then renames it over `path`: a reader never sees a partial file. The
  temporary name is unique, so processes writing the same file never write into each other's."""
  path = epath.Path(path)
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}_{uuid.uuid4().hex[:8]}")
  tmp.write_bytes(data)
  tmp.replace(path)


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
  """np.load of a .npz from any path (the caller closes it, e.g. `with load_npz(p) as f`)."""
  import numpy as np

  if is_remote(path):
    return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)
  return np.load(path, allow_pickle=False)
