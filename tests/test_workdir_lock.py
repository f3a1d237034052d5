"""One run per workdir: a live holder refuses a second trainer; a dead holder's lock is taken over."""

import json
import os
import subprocess
import sys
import time

import pytest

from selfperc_jax import workdir_lock
from selfperc_jax.errors import WorkdirLockedError
from selfperc_jax.workdir_lock import WorkdirLock


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _write_lock(directory, **fields):
  me = WorkdirLock(str(directory)).me
  record = {**me, "started": time.time(), "refreshed": time.time(), "nonce": "x", **fields}
  (directory / "LOCK").write_text(json.dumps(record))


def test_a_live_holder_refuses_a_second_run_until_it_releases(tmp_path):
  first = WorkdirLock(str(tmp_path))
  first.acquire()
  assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
  with pytest.raises(WorkdirLockedError, match=f"is in use by process {os.getpid()} on "):
    WorkdirLock(str(tmp_path)).acquire()
  first.release()
  assert not (tmp_path / "LOCK").exists()
  second = WorkdirLock(str(tmp_path))
  second.acquire()
  second.release()


def test_the_lock_is_refreshed_while_held(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "REFRESH_EVERY", 0.05)
  lock = WorkdirLock(str(tmp_path))
  lock.acquire()
  first = json.loads((tmp_path / "LOCK").read_text())["refreshed"]
  time.sleep(0.5)
  assert json.loads((tmp_path / "LOCK").read_text())["refreshed"] > first
  lock.release()
  assert not (tmp_path / "LOCK").exists()


@pytest.mark.parametrize("fields", [
    lambda: {"pid": _dead_pid()},  # this machine, the process is gone
    lambda: {"pid": os.getpid(), "boot": "an-earlier-boot"},  # this machine has rebooted since
    lambda: {"host": "another-host", "refreshed": time.time() - 2 * workdir_lock.STALE_AFTER},  # not refreshed
    lambda: {"pid": os.getpid(), "started": time.time() - 3600},  # an earlier process with this one's pid
], ids=["dead-process", "rebooted", "other-host-silent", "own-pid-before-this-process-started"])
def test_a_gone_holder_is_taken_over_with_a_warning(tmp_path, capsys, fields):
  _write_lock(tmp_path, **fields())
  lock = WorkdirLock(str(tmp_path))
  lock.acquire()
  assert "taking over the lock of a run that is gone" in capsys.readouterr().out
  assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
  lock.release()


def test_a_recently_refreshed_lock_of_another_host_is_respected(tmp_path):
  _write_lock(tmp_path, host="tpu-worker-0", pid=12345)
  with pytest.raises(WorkdirLockedError, match="in use by process 12345 on tpu-worker-0.*delete .*LOCK"):
    WorkdirLock(str(tmp_path)).acquire()
  assert json.loads((tmp_path / "LOCK").read_text())["host"] == "tpu-worker-0"  # untouched


def _two_runs_at_once(tmp_path, monkeypatch, waits_after_reading) -> list[str]:
  """Two trainers acquire the lock at once, each waiting after its read where waits_after_reading(holder) (so that
  both have looked before either acts, where both can look at once); returns their outcomes, held or refused."""
  import threading

  barrier = threading.Barrier(2)
  real_read = WorkdirLock._read

  def read_then_wait(self):
    holder = real_read(self)
    if waits_after_reading(holder):
      try:  # one acts at once, the other a moment later (after the first has taken the lock)
        if barrier.wait(timeout=0.5) == 0:  # both threads start within ms: 0.5 s is ample
          time.sleep(0.3)
      except threading.BrokenBarrierError:  # the guard lets one look at a time
        pass
    return holder

  monkeypatch.setattr(WorkdirLock, "_read", read_then_wait)
  results = []

  def run():
    lock = WorkdirLock(str(tmp_path))
    try:
      lock.acquire()
      results.append(("held", lock))
    except WorkdirLockedError as e:
      results.append(("refused", str(e)))

  threads = [threading.Thread(target=run) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=30)
  monkeypatch.setattr(WorkdirLock, "_read", real_read)
  for kind, lock in results:
    if kind == "held":
      lock.release()
  return sorted(kind for kind, _ in results)


def test_two_runs_starting_at_the_same_moment_get_one_lock(tmp_path, monkeypatch):
  """Both look before either writes (the race of two trainers started together): exactly one wins."""
  assert _two_runs_at_once(tmp_path, monkeypatch, lambda holder: holder is None) == ["held", "refused"]


def test_two_runs_finding_the_same_stale_lock_get_one_lock(tmp_path, monkeypatch):
  """Both have read the dead holder's lock before either takes it over (the race of two trainers restarted
  together): without the guard each removes the other's new lock and both train; with it exactly one wins."""
  dead = _dead_pid()
  _write_lock(tmp_path, pid=dead)
  assert _two_runs_at_once(tmp_path, monkeypatch, lambda holder: bool(holder) and holder.get("pid") == dead) == [
      "held", "refused"]


def test_a_lock_that_cannot_be_removed_is_a_warning_not_an_error(tmp_path, monkeypatch, capsys):
  """A workdir made read-only mid-run: the lock's removal must not replace the error that stopped the run."""
  from selfperc_jax import fileio

  lock = WorkdirLock(str(tmp_path))
  lock.acquire()

  def refuse(path):
    raise PermissionError(13, "Permission denied", str(path))

  monkeypatch.setattr(fileio, "remove", refuse)
  lock.release()
  assert "warning: could not remove" in capsys.readouterr().out
