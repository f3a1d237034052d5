"""When a run should checkpoint and stop: SIGTERM or Ctrl-C (one process), or JAX's preemption sync point (several)."""

from __future__ import annotations

import signal
import threading

import jax


class PreemptionWatcher:
  """Says why the run should checkpoint and stop, once it should: SIGTERM or a first Ctrl-C (SIGINT) in one process
  (a second Ctrl-C stops at once, without a checkpoint), or JAX's preemption sync point in several processes, where
  every process must stop at the same step (it also covers TPU maintenance events)."""

  REASONS = {signal.SIGTERM: "preempted", signal.SIGINT: "interrupted"}

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self._reason = None
    self._previous = {}
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      self._previous = {signum: signal.signal(signum, self._on_signal) for signum in self.REASONS}

  def _on_signal(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self._reason is not None:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the checkpoint
    self._reason = self._reason or self.REASONS[signum]
    if signum == signal.SIGINT:
      print("\ninterrupted: the run saves a checkpoint after this step and stops (Ctrl-C again stops at once, "
            "without it)", flush=True)

  def should_stop(self, step: int) -> str | None:
    """None, or why the run stops after `step`: 'preempted' or 'interrupted'."""
    if self.multi_process:
      from jax.experimental import multihost_utils

      return "preempted" if multihost_utils.reached_preemption_sync_point(step) else None
    return self._reason

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
