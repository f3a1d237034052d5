"""NonFiniteGuard: the steps' `nonfinite` metric folded on the devices into "the first bad step", read on the host
only when something is about to be logged, saved or sampled (config.on_nonfinite: 'stop' or 'skip')."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from selfperc_jax import checkpoint
from selfperc_jax.errors import NonFiniteError


@jax.jit
def _track_nonfinite(first_bad, skipped, nonfinite, step):
  """On the devices, without a host sync: the first step with a non-finite loss/gradient (-1: none), and how many
  updates were non-finite. (Placed like the step's metrics, so it runs on every host of a pod alike.)"""
  bad = nonfinite > 0
  if first_bad is None:
    first_bad, skipped = jnp.full_like(nonfinite, -1, jnp.int32), jnp.zeros_like(nonfinite, jnp.int32)
  return jnp.where((first_bad < 0) & bad, step, first_bad), skipped + bad.astype(jnp.int32)


class NonFiniteGuard:
  """Watches the steps' `nonfinite` metric on the devices and looks at it on the host only when something is about
  to be logged, saved or sampled: 'stop' then raises before any non-finite state is written; 'skip' (the step
  already kept the old state) reports how many updates were skipped."""

  def __init__(self, mode: str):
    self.mode = mode
    self._first_bad = self._skipped = None
    self._reported = 0

  def update(self, metrics, step: int) -> None:
    self._first_bad, self._skipped = _track_nonfinite(self._first_bad, self._skipped, metrics["nonfinite"], step)

  def check(self, ckpt: checkpoint.Checkpointer) -> None:
    if self._first_bad is None:
      return
    if self.mode == "skip":
      skipped = int(self._skipped)
      if skipped > self._reported:
        print(f"warning: {skipped - self._reported} update(s) with a non-finite loss or gradient were skipped "
              f"({skipped} in all)", flush=True)
        self._reported = skipped
      return
    first_bad = int(self._first_bad)
    if first_bad >= 0:
      ckpt.wait()
      last = ckpt.latest_step()
      kept, rerun = ((f"the workdir's latest checkpoint is step {last} (finite)", "it resumes from that checkpoint")
                     if last is not None else ("no checkpoint was saved", "it starts again from step 0"))
      raise NonFiniteError(
          f"the loss or gradient became non-finite (NaN/inf) at step {first_bad}; training stopped and nothing "
          f"after it was saved ({kept}). Lower optimizer.learning_rate or lengthen optimizer.warmup_steps and rerun "
          f"({rerun}), or set --config.on_nonfinite=skip to skip such updates.")
