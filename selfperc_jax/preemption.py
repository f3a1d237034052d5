"""When a run should checkpoint and stop: SIGTERM (one process), or JAX's preemption sync point (several)."""

from __future__ import annotations

import signal
import threading

import jax


class PreemptionWatcher:
  """True once the run should checkpoint and stop: SIGTERM (one process), or JAX's preemption sync point (several
  processes, where every process must stop at the same step; it also covers TPU maintenance events)."""

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self._signalled = False
    self._previous = None
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    self._signalled = True

  def should_stop(self, step: int) -> bool:
    if self.multi_process:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
