"""What a failed checkpoint save says: its cause in a few words, and orbax's own error output kept off the console.

While a writing Checkpointer is open, the error records of orbax's background saves (and of their asyncio tasks) go
to a temporary file instead of the console, and so do the "Event loop is closed" tracebacks that tensorstore prints
from C++ after a failed write: the run reports the failure itself, in one line that gives the cause and names that file.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
import threading


ERRNO_WORDS = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system",
                errno.EACCES: "Permission denied", errno.EDQUOT: "Disk quota exceeded"}


def cause(error) -> str:
  """A short cause of a failed save: the OS error it comes down to, else the first line of its message."""
  text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
  for words in ERRNO_WORDS.values():
    if words in text:
      return words.lower()
  first = text.splitlines()[0] if text else ""
  return first[:200] + ("..." if len(first) > 200 else "")


class OrbaxErrorLog(logging.Filter):
  """Keeps the error records of orbax's background saves (and of their asyncio tasks) off the console while a
  writing Checkpointer is open: the run reports a failed save itself, in one line that gives the cause and names the
  file these records go to instead."""

  def __init__(self):
    super().__init__()
    self.first = None  # the cause in the first such record of the save in flight
    self.path = None  # the file the records were written to (made on the first one)
    self.active = False  # a save is in flight (or failed): only then are the records kept off the console
    self._handlers = list(logging.getLogger().handlers)
    for handler in self._handlers:
      handler.addFilter(self)
    # Tensorstore's callbacks into orbax's event loop, closed after a failed write, print "Event loop is closed"
    # tracebacks from C++ (one per pending write, until the process ends): they go to the same file.
    self._stderr = sys.stderr
    if not isinstance(sys.stderr, ClosedLoopTracebacks):  # (one wrapper, however many Checkpointers are open)
      sys.stderr = ClosedLoopTracebacks(sys.stderr, self)

  def filter(self, record: logging.LogRecord) -> bool:
    if not self.active or record.levelno < logging.ERROR or not (
        "orbax" in record.pathname or record.name in ("asyncio", "concurrent.futures")):
      return True
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += "\n" + f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    if self.first is None:
      self.first = cause(text.splitlines()[-1] if record.exc_info else text)
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
    """Stops filtering; after a failure (records were kept) both filters stay until exit: asyncio reports a failed
    write's task only when the task is garbage collected ("Task exception was never retrieved", at any time up to
    the interpreter's exit), and tensorstore's tracebacks come until exit too."""
    if self.path is not None:
      self.active = True
      return
    for handler in self._handlers:
      handler.removeFilter(self)
    if isinstance(sys.stderr, ClosedLoopTracebacks) and sys.stderr._log is self:
      sys.stderr = self._stderr


class ClosedLoopTracebacks:
  """sys.stderr, less the "Event loop is closed" tracebacks (written to the log instead); everything else passes."""

  def __init__(self, stream, log: OrbaxErrorLog):
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
