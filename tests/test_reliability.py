"""Faults a run must survive with its data intact and one `error:` line: a full or read-only disk, a checkpoint
without its checksums, Ctrl-C, partial files of killed writers, non-finite metrics, bad workdir paths and files.
(The lock races are in test_workdir_lock.py; the SIGTERM/SIGINT end-to-end runs in test_main.py.)"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from selfperc_jax import checkpoint, fileio, logging_utils, nonfinite, periodic, preemption, save_errors
from selfperc_jax.errors import CheckpointError, CorruptCheckpointError, EvaluationError, NonFiniteError, UserError
from selfperc_jax.evaluation import evaluate

from conftest import REPO, subprocess_env


def _state(leaves: int = 400, size: int = 256) -> dict:
  """Many small arrays: on disk a checkpoint of them takes about twice their bytes (orbax's metadata per array)."""
  return {f"w{i:03d}": jax.random.normal(jax.random.key(i), (size,)) for i in range(leaves)}


def _save(ckpt, step, state):
  ckpt.save(step, state, {"position": step}, ml_collections.ConfigDict({"seed": 0}))


@pytest.fixture
def small_disk(tmp_path):
  """small_disk(MiB) -> a folder on a tmpfs of that size (remount_read_only(folder) makes it read-only)."""
  mounts = []

  def make(mib: float):
    path = tmp_path / f"disk{len(mounts)}"
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(mib * 1024)}k", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode:
      pytest.skip(f"a tmpfs cannot be mounted here (it needs root): {result.stderr.strip()}")
    mounts.append(path)
    return path

  yield make
  for path in mounts:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount_read_only(path):
  subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def _fill(path, leave_free: int):
  """Writes a filler file so that about `leave_free` bytes stay free on path's file system."""
  free = shutil.disk_usage(path).free
  with open(os.path.join(path, "filler"), "wb") as f:
    f.write(b"\0" * max(free - leave_free, 0))


def _wait_for_error(ckpt, seconds: float = 20.0) -> CheckpointError:
  """Calls check() as the loop does after every step until it raises (the failed save's one error)."""
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    try:
      ckpt.check()
    except CheckpointError as e:
      return e
    time.sleep(0.05)
  raise AssertionError("check() never reported the failed save")


# --- a full disk --------------------------------------------------------------------------------------------------


def test_a_save_that_fills_the_disk_is_one_error_at_the_next_check_and_its_folder_is_removed(small_disk, capsys):
  disk = small_disk(1)  # a checkpoint of _state() takes about 1 MB: more than is free once orbax starts writing
  ckpt = checkpoint.Checkpointer(str(disk))
  _save(ckpt, 10, _state())  # the state's own 0.4 MB fit: the save starts, then fails in the background
  error = _wait_for_error(ckpt)
  message = str(error)
  assert "saving checkpoint step 10" in message and "no space left on device" in message
  assert "last complete checkpoint is none" in message and "\n" not in message
  ckpt.close(report=False)  # the run is stopping with that error: no second copy of it at shutdown
  leftovers = [name for name in os.listdir(disk) if checkpoint.INCOMPLETE in name]
  assert leftovers, "the failed save left its temporary folder (what the rerun below must remove)"

  capsys.readouterr()
  again = checkpoint.Checkpointer(str(disk))  # the rerun on the still-full disk
  out = capsys.readouterr().out
  assert all(f"removed {os.path.join(disk, name)}: a save that never completed" in out for name in leftovers)
  assert not [name for name in os.listdir(disk) if checkpoint.INCOMPLETE in name]
  again.close()


def test_the_space_check_asks_for_what_the_previous_checkpoint_took_on_disk(small_disk):
  disk = small_disk(8)
  state = _state()
  ckpt = checkpoint.Checkpointer(str(disk))
  _save(ckpt, 1, state)
  ckpt.check(wait=True)
  on_disk = checkpoint._disk_usage(os.path.join(disk, "1"))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  assert on_disk > 1.5 * state_bytes  # so a check from the state's bytes alone would let the save start
  _fill(disk, leave_free=int(on_disk))  # room for the state's bytes, not for another checkpoint as large as it
  with pytest.raises(CheckpointError, match=r"not enough disk space for checkpoint step 2 .*the previous "
                                            r"checkpoint took .* MiB on disk.*last complete checkpoint is step 1"):
    _save(ckpt, 2, state)
  assert sorted(os.listdir(disk)) == ["1", "filler"]  # nothing was started
  ckpt.close(report=False)


# --- a read-only disk ---------------------------------------------------------------------------------------------


def test_a_disk_made_read_only_mid_run_is_one_error_naming_the_cause(small_disk):
  disk = small_disk(16)
  ckpt = checkpoint.Checkpointer(str(disk))
  _save(ckpt, 1, _state(leaves=8))
  ckpt.check(wait=True)
  _remount_read_only(disk)
  with pytest.raises(CheckpointError) as caught:
    _save(ckpt, 2, _state(leaves=8))
    _wait_for_error(ckpt)
    pytest.fail("no error")
  message = str(caught.value)
  assert "saving checkpoint step 2" in message and "read-only file system" in message
  assert "last complete checkpoint is step 1" in message and "\n" not in message
  ckpt.close(report=False)


# --- a checkpoint without its checksums ---------------------------------------------------------------------------


def test_a_checkpoint_without_its_checksums_is_corrupt_unless_trusted(tmp_path):
  state = _state(leaves=4, size=16)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  _save(ckpt, 3, state)
  ckpt.close()
  shutil.rmtree(tmp_path / "3" / "fingerprint")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  with pytest.raises(CorruptCheckpointError, match="has no checksums.*trust_unverified_checkpoints=True"):
    checkpoint.Checkpointer(str(tmp_path), read_only=True).restore(3, abstract)
  restored, _ = checkpoint.Checkpointer(str(tmp_path), read_only=True, trust_unverified=True).restore(3, abstract)
  np.testing.assert_array_equal(restored["w000"], state["w000"])


# --- Ctrl-C -------------------------------------------------------------------------------------------------------


def test_ctrl_c_asks_for_a_checkpoint_and_a_second_one_stops_at_once(capsys):
  before = signal.getsignal(signal.SIGINT)  # Python's default handler, unless an earlier test in this worker set one
  watcher = preemption.PreemptionWatcher()
  try:
    assert watcher.should_stop(1) is None
    # raise_signal: delivered to this thread before it returns (os.kill may land on another of the process's threads,
    # whose handler can run after the next line has already looked).
    signal.raise_signal(signal.SIGINT)
    assert watcher.should_stop(2) == "interrupted"
    assert "saves a checkpoint after this step" in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGINT) is before  # restored


def test_sigterm_is_preempted():
  watcher = preemption.PreemptionWatcher()
  try:
    signal.raise_signal(signal.SIGTERM)
    assert watcher.should_stop(1) == "preempted"
  finally:
    watcher.close()


# --- workdir paths ------------------------------------------------------------------------------------------------


def test_a_workdir_name_too_long_for_the_file_system_is_one_line(tmp_path):
  with pytest.raises(UserError, match=r"cannot be created \(a name in it is longer than the file system allows\)"):
    fileio.make_workdir(str(tmp_path / ("x" * 300)))


def test_a_workdir_whose_parent_cannot_be_written_is_one_line(tmp_path, monkeypatch):
  def refuse(path):  # what mkdir raises below a folder the user cannot write (the tests run as root)
    raise PermissionError(errno.EACCES, "Permission denied", str(path))

  monkeypatch.setattr(fileio, "makedirs", refuse)
  with pytest.raises(UserError, match=r"--workdir=.* cannot be created \(permission denied\)"):
    fileio.make_workdir(str(tmp_path / "locked" / "run"))


# --- files ----------------------------------------------------------------------------------------------------------


def test_a_text_file_named_npz_is_called_text(tmp_path):
  path = tmp_path / "samples.npz"
  path.write_text("these are not images\n")
  with pytest.raises(EvaluationError) as caught:
    evaluate.load_batch(str(path), "sample")
  assert "text, not a .npz" in str(caught.value) and "pickle" not in str(caught.value)
  np.save(tmp_path / "array.npy", np.zeros(3))
  os.rename(tmp_path / "array.npy", tmp_path / "array.npz")
  with pytest.raises(EvaluationError, match=r"a \.npy array, not an \.npz"):
    evaluate.load_batch(str(tmp_path / "array.npz"), "sample")


def test_metrics_jsonl_stays_strict_json_with_non_finite_values(tmp_path):
  logger = logging_utils.MetricLogger(str(tmp_path), total_steps=10, batch_size=2, enabled=True)
  logger.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "x": -float("inf"), "ok": 0.5})
  logger.write_eval(1, {"fid": float("nan")})

  def refuse(constant):
    raise ValueError(f"bare {constant} in metrics.jsonl")

  rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["loss"] == "NaN" and rows[0]["grad_norm"] == "Infinity" and rows[0]["x"] == "-Infinity"
  assert rows[0]["ok"] == 0.5 and rows[1]["eval/fid"] == "NaN"
  assert np.isnan(float(rows[0]["loss"]))  # float() reads them back
  assert logger.drop_rows_after(0) == 2


def test_a_killed_sample_write_leaves_a_partial_file_that_the_next_run_removes(tmp_path, capsys):
  samples = tmp_path / "samples"
  samples.mkdir()
  code = ("import os, numpy as np\nfrom selfperc_jax import images\n"
          f"w = images.NpzStreamWriter({str(samples / 'step_10.npz')!r}, (8, 8, 1), np.zeros(4))\n"
          "w.write(np.zeros((2, 8, 8, 1), np.uint8))\nos.kill(os.getpid(), 9)\n")
  subprocess.run([sys.executable, "-c", code], cwd=REPO)
  partial = [p.name for p in samples.iterdir()]
  assert len(partial) == 1 and partial[0].startswith("step_10.npz.tmp-")
  mine = fileio.partial_name(samples / "step_20.npz")  # a write in progress of a live process: kept
  mine.write_bytes(b"...")
  earlier = fileio.partial_name(samples / "step_30.npz")  # this pid, but written before this process started
  earlier.write_bytes(b"...")
  os.utime(earlier, (time.time() - 3600, time.time() - 3600))
  periodic.remove_partial_outputs(str(tmp_path))
  assert sorted(p.name for p in samples.iterdir()) == [mine.name]
  assert f"removed {samples / partial[0]}: a file whose writing was stopped midway" in capsys.readouterr().out


# --- the non-finite stop --------------------------------------------------------------------------------------------


class _NoCheckpoints:
  def wait(self):
    pass

  def latest_step(self):
    return None


def test_the_non_finite_error_does_not_promise_a_checkpoint_that_does_not_exist():
  guard = nonfinite.NonFiniteGuard("stop")
  guard.update({"nonfinite": jnp.int32(1)}, 3)
  with pytest.raises(NonFiniteError) as caught:
    guard.check(_NoCheckpoints())
  message = str(caught.value)
  assert "no checkpoint was saved" in message and "it starts again from step 0" in message
  assert "resumes from that checkpoint" not in message


# --- end to end: the one line and the exit code ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_on_a_full_disk_ends_with_one_error_line_and_no_traceback(small_disk):
  # The tiny model at 8 base channels: its state (0.26 MB) is small beside what its first save writes on disk (0.86
  # MiB with orbax's metadata), so a disk of 0.55 MiB lets the check before that save pass (it asks for the state's
  # bytes and 10 %) and fails the save itself by a wide margin either way (it fails here from 0.45 to 0.7 MiB).
  disk = small_disk(0.55)
  args = [sys.executable, "-m", "selfperc_jax.main", "--config=configs/digits.py:tiny", f"--workdir={disk / 'w'}",
          "--config.model.base_channels=8", "--config.total_steps=10", "--config.checkpoint_every=10",
          "--config.sample_every=0"]
  result = subprocess.run(args, cwd=REPO, env=subprocess_env(8), capture_output=True, text=True, timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "no space left on device" in errors[0], result.stderr[-3000:]
  assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]


def test_closed_event_loop_tracebacks_go_to_the_log_and_others_pass():
  """The tracebacks tensorstore prints from C++ after a failed save, piece by piece and between other threads'
  writes, go to the log file; any other traceback and every other line reach stderr whole and in order."""
  import io
  import threading

  out = io.StringIO()
  log = save_errors.OrbaxErrorLog()
  log.close()
  stream = save_errors.ClosedLoopTracebacks(out, log)
  closed = ["Traceback (most recent call last):\n", '  File "base_events.py", line 806\n',
            "    self._check_closed()\n", "RuntimeError: Event loop is closed\n"]
  half, main_wrote = threading.Event(), threading.Event()

  def callback_thread():
    for i, piece in enumerate(closed):
      if i == 2:
        half.set()
        main_wrote.wait(10)
      stream.write(piece)

  thread = threading.Thread(target=callback_thread)
  thread.start()
  half.wait(10)
  stream.write("error: the one line\n")  # the main thread, while the other thread's traceback is half written
  main_wrote.set()
  thread.join()
  other = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: a real one\n"
  stream.write(other)
  assert out.getvalue() == "error: the one line\n" + other
  with open(log.path) as f:
    assert "Event loop is closed" in f.read()
  os.remove(log.path)
