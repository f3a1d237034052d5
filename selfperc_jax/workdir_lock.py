"""One run per workdir: process 0 holds workdir/LOCK while it trains, so a second trainer stops at start.

The lock file names its holder (host, boot, pid, start time) and a background thread of the holder rewrites it every
REFRESH_EVERY seconds, also during long evaluations. A run that exits in any orderly way (the end, an error, SIGTERM
or a preemption) removes it. A lock left behind by a killed run is stale, and taken over with a message: on the same
host that is checked directly (the process is gone, or the machine has rebooted since); a holder on another machine
(e.g. a pod worker that was preempted and recreated) is taken as gone once its lock is `stale_after` seconds old.
On a local or shared disk, looking at the lock and taking it happen under a kernel lock (flock) of workdir/LOCK.guard,
so of two trainers that find the same stale lock exactly one takes it over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time

import jax

from selfperc_jax import fileio, sharding
from selfperc_jax.errors import WorkdirLockedError

STALE_AFTER = 180.0  # seconds without a refresh after which another machine's lock counts as abandoned
REFRESH_EVERY = 30.0  # a background thread of the holder rewrites the lock this often


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


class WorkdirLock:
  def __init__(self, workdir: str, stale_after: float = STALE_AFTER):
    self.path = fileio.join(workdir, "LOCK")
    self.stale_after = stale_after
    self.me = {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid()}
    self._held = False
    self._refreshed = 0.0

  def _read(self) -> dict | None:
    try:
      return json.loads(fileio.read_text(self.path))
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable: written by something else or cut short; treated as stale below

  def _is_stale(self, holder: dict) -> bool:
    if not holder or "pid" not in holder:
      return True
    if holder.get("host") == self.me["host"]:
      return holder.get("boot") != self.me["boot"] or not fileio.process_alive(int(holder["pid"]),
                                                                                since=float(holder.get("started", 0)))
    return time.time() - float(holder.get("refreshed", 0)) > self.stale_after

  def acquire(self) -> None:
    if fileio.is_remote(self.path):
      self._acquire()
      return
    # Two trainers that find the same stale lock must not both take it over (each would remove the other's new
    # lock): on a local or shared disk the look-and-take runs under a kernel lock of workdir/LOCK.guard, which the
    # kernel releases when its holder dies, so it can never be left stale itself.
    with open(self.path + ".guard", "a") as guard:
      try:
        fcntl.flock(guard, fcntl.LOCK_EX)
      except OSError:  # a file system without flock (some FUSE mounts): the O_EXCL create below still decides
        pass
      self._acquire()

  def _acquire(self) -> None:
    holder = self._read()
    if holder is not None:
      if not self._is_stale(holder):
        raise self._locked(holder)
      print(f"warning: taking over the lock of a run that is gone (process {holder.get('pid')} on "
            f"{holder.get('host')}): {self.path}", flush=True)
      fileio.remove(self.path)
    self._started = time.time()
    record = self._record()
    if fileio.is_remote(self.path):
      # A bucket has no exclusive create: write, then check that this record is the one that stayed.
      fileio.write_text(self.path, record)
      time.sleep(0.5)
      if (self._read() or {}).get("nonce") != self._nonce:
        raise self._locked(self._read() or {})
    else:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:  # another trainer created it between our look and now
        raise self._locked(self._read() or {}) from None
      with os.fdopen(fd, "w") as f:
        f.write(record)
    self._held = True
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._refresh_loop, name="workdir-lock", daemon=True)
    self._thread.start()

  def _refresh_loop(self) -> None:
    while not self._stop.wait(REFRESH_EVERY):
      try:
        fileio.write_text(self.path, self._record())
      except OSError as e:  # a full disk or a bucket hiccup: the next refresh tries again
        print(f"warning: could not refresh {self.path}: {e}", flush=True)

  def _locked(self, holder: dict) -> WorkdirLockedError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return WorkdirLockedError(
        f"{os.path.dirname(self.path)} is in use by process {holder.get('pid')} on {holder.get('host')} (running "
        f"since {since}); stop that run or use another --workdir. If that process is gone, delete {self.path}.")

  def _record(self) -> str:
    self._nonce = f"{self.me['host']}:{self.me['pid']}:{time.time_ns()}"
    self._refreshed = time.time()
    return json.dumps({**self.me, "started": self._started, "refreshed": self._refreshed, "nonce": self._nonce})

  def release(self) -> None:
    """Removes the lock if it is still this run's. A lock that cannot be removed (the workdir made read-only) is
    a warning, never an error that would hide the one that stopped the run: it is stale once this process is gone."""
    if not self._held:
      return
    self._stop.set()
    self._thread.join()
    self._held = False
    holder = self._read() or {}
    if holder.get("host") == self.me["host"] and holder.get("pid") == self.me["pid"]:
      try:
        fileio.remove(self.path)
      except OSError as e:
        print(f"warning: could not remove {self.path} ({e.strerror or e}); the next run takes it over", flush=True)


def lock_workdir(workdir: str) -> WorkdirLock:
  """Process 0 takes the workdir's lock; every process stops, with its message, if it cannot."""
  lock, error = WorkdirLock(workdir), ""
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except WorkdirLockedError as e:
      error = str(e)
    except OSError as e:  # the workdir cannot be written (read-only, permissions): every process stops alike
      error = f"{workdir} cannot be written ({e.strerror or e}); give a workdir you can write."
  if sharding.process_0_says(bool(error)):
    raise WorkdirLockedError(error or f"{workdir} is in use by another run (process 0 has the details).")
  return lock
