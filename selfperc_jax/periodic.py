"""The periodic actions of the loop: when one is due (is_due), the sample grids and evaluations with those a restart
still lacks (PeriodicOutputs), the profiler's trace window (Profiler), and the removal of partial output files that a
killed run left behind."""

from __future__ import annotations

import jax
import numpy as np

from selfperc_jax import fileio, generate, sharding
from selfperc_jax.evaluation import evaluate
from selfperc_jax.logging_utils import MetricLogger
from selfperc_jax.setup import Setup


def next_due(step: int, every: int, total: int) -> int | None:
  """The first step after `step` at which an action repeated every `every` steps is due (is_due with its defaults;
  the run's last step counts), or None if none is left."""
  if every <= 0 or step >= total:
    return None
  return min((step // every + 1) * every, total)


def is_due(step: int, every: int, total: int, *, first: bool = False, last: bool = True,
           stop: int | None = None) -> bool:
  """Whether an action repeated every `every` steps runs after (1-based) step `step` of `total` (as big_vision's
  itstime): at every multiple of `every`; with `first`, also after step 1; with `last`, also after step `total`; and
  after step `stop` where given (where this call stops early: num_steps or a preemption). Never when every is 0."""
  if every <= 0:
    return False
  return step % every == 0 or (first and step == 1) or (last and step == total) or step == stop


class PeriodicOutputs:
  """The run's sample grids and evaluations (their generator and evaluator built on first use), and which of them a
  step still lacks: a run killed after a checkpoint but before that step's samples or evaluation were written makes
  them when it is started again."""

  ACTIONS = ("samples", "eval")

  def __init__(self, setup: Setup):
    self.setup = setup
    self.logger: MetricLogger | None = None  # set before the first write
    self._generator = self._evaluator = None

  def due(self, step: int) -> list[str]:
    c = self.setup.config
    every = {"samples": c.sample_every, "eval": c.eval_every}
    return [a for a in self.ACTIONS if is_due(step, every[a], c.total_steps)]

  def upcoming(self, step: int) -> tuple[str, int] | None:
    """The next output after `step` (what, and at which step), for the console: the sample grid if both are due."""
    c = self.setup.config
    coming = [(what, at) for what, every in (("sample grid", c.sample_every), ("evaluation", c.eval_every))
              if (at := next_due(step, every, c.total_steps)) is not None]
    return min(coming, key=lambda x: x[1], default=None)  # min keeps the first listed (the grid) on a tie

  def _exists(self, action: str, step: int) -> bool:
    workdir = self.setup.workdir
    if action == "samples":
      return all(fileio.exists(fileio.join(workdir, "samples", f"step_{step}.{ext}")) for ext in ("png", "npz"))
    return evaluate.has_result(fileio.join(workdir, "eval"), step, evaluate.setting_name(self.setup.config))

  def missing(self, step: int) -> list[str]:
    """The due outputs of `step` that are not in the workdir (process 0 looks; every process gets its answer)."""
    due = self.due(step)
    mask = sum(1 << i for i, a in enumerate(self.ACTIONS) if a in due and not self._exists(a, step))
    mask = int(sharding.broadcast_from_process_0(np.int32(mask if jax.process_index() == 0 else 0)))
    return [a for i, a in enumerate(self.ACTIONS) if mask & (1 << i)]

  def write(self, params, step: int, actions) -> None:
    c = self.setup.config
    if "samples" in actions:
      self._generator = self._generator or self.setup.generator()
      labels = generate.draw_labels(c)
      png = generate.write_samples(self._generator, params, fileio.join(self.setup.workdir, "samples"),
                                   f"step_{step}", labels, c.sample.seed)
      if png:
        following = next_due(step, c.sample_every, c.total_steps)
        print(f"samples: {png}" + (f" (the next grid at step {following})" if following else ""), flush=True)
    if "eval" in actions:
      self._evaluator = self._evaluator or self.setup.evaluator()
      result = self._evaluator(params, step)
      if result is not None:
        self.logger.write_eval(step, {k: v for k, v in result.items() if isinstance(v, float)})


def remove_partial_outputs(workdir: str) -> None:
  """Removes the sample and evaluation files that a killed run was writing (never complete; large at scale)."""
  for sub in ("samples", "eval", ""):
    folder = fileio.join(workdir, sub) if sub else workdir
    for name in fileio.remove_partial_files(folder):
      print(f"removed {fileio.join(folder, name)}: a file whose writing was stopped midway", flush=True)


class Profiler:
  """A jax.profiler trace of steps [profile.start_step, + profile.steps) on process 0, written to workdir/profile
  for TensorBoard's profile plugin (`tensorboard --logdir WORKDIR/profile`)."""

  def __init__(self, profile_cfg, workdir: str):
    self.start, self.stop = int(profile_cfg.start_step), int(profile_cfg.start_step) + int(profile_cfg.steps)
    self.enabled = int(profile_cfg.steps) > 0 and jax.process_index() == 0
    self.directory, self.active = fileio.join(workdir, "profile"), False

  def before(self, step: int) -> None:
    if self.enabled and step == self.start and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, done: int, outputs) -> None:
    if self.active and done >= self.stop:
      jax.block_until_ready(outputs)  # the traced steps' device work, not only their dispatch
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      print(f"profile of steps {self.start}..{self.stop - 1}: {self.directory} (tensorboard --logdir "
            f"{self.directory})", flush=True)
