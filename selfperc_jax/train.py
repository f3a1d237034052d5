"""The training loop: build or restore the state, feed batches to the step, run the periodic actions.

What the loop uses lives beside it: setup.py (Setup), resume.py (restore_or_init and the resume rules), periodic.py
(is_due, the samples / evaluation, the profiler), nonfinite.py (NonFiniteGuard), workdir_lock.py (lock_workdir)."""

from __future__ import annotations

import time

import jax
import ml_collections

from selfperc_jax import fileio, flops, sharding
from selfperc_jax.errors import Stopped
from selfperc_jax.logging_utils import MetricLogger
from selfperc_jax.nonfinite import NonFiniteGuard
from selfperc_jax.periodic import PeriodicOutputs, Profiler, is_due, remove_partial_outputs
from selfperc_jax.preemption import PreemptionWatcher
from selfperc_jax.resume import restore_or_init
from selfperc_jax.setup import Setup
from selfperc_jax.workdir_lock import lock_workdir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, num_steps: int | None = None) -> dict | None:
  """Trains to config.total_steps, resuming from workdir's latest checkpoint; returns the last logged metrics.

  num_steps: train at most this many steps in this call, then checkpoint and return (e.g. to train in chunks from a
  notebook); calling again continues exactly where it stopped.
  """
  setup = Setup(config, workdir)
  fileio.make_workdir(setup.workdir)
  lock = lock_workdir(setup.workdir)
  try:
    return _train(setup, num_steps)
  finally:
    lock.release()


def _train(setup: Setup, num_steps: int | None) -> dict | None:
  ckpt = setup.checkpointer()
  try:
    last, stopped = _loop(setup, ckpt, num_steps)
  except BaseException:
    ckpt.close(report=False)  # a run already stopping with an error does not add a second one
    raise
  ckpt.close()  # the last save complete, or its failure reported
  if stopped:
    raise Stopped(stopped)
  return last


def _loop(setup: Setup, ckpt, num_steps: int | None) -> tuple[dict | None, str | None]:
  """(the last logged metrics, why the run stopped early or None)."""
  config = setup.config
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  if jax.process_index() == 0:
    remove_partial_outputs(setup.workdir)
  state, restored = restore_or_init(setup, ckpt, init_key)
  start = 0 if restored is None else restored
  outputs = PeriodicOutputs(setup)
  lacking = outputs.missing(start) if restored is not None else []
  if start >= config.total_steps and not lacking:
    print(f"the checkpoint is at step {start} >= total_steps={config.total_steps}: nothing to train", flush=True)
    return None, None
  logger = outputs.logger = MetricLogger(setup.workdir, config.total_steps, config.batch_size,
                                         enabled=jax.process_index() == 0,
                                         peak_flops=flops.peak_flops(setup.mesh.devices.flat[0]))
  dropped = logger.drop_rows_after(start)
  if dropped:
    print(f"metrics.jsonl: dropped {dropped} row(s) past step {start}, logged before the run was stopped; those "
          "steps are trained and logged again", flush=True)
  if lacking:
    print(f"step {start}'s {' and '.join(lacking)} are missing from the workdir: writing them first", flush=True)
    outputs.write(state.ema_params, start, lacking)
  if start >= config.total_steps:
    return None, None
  return _steps(setup, ckpt, state, start, step_key, outputs, logger, num_steps)


def _steps(setup: Setup, ckpt, state, start: int, step_key, outputs: PeriodicOutputs, logger: MetricLogger,
           num_steps: int | None) -> tuple[dict | None, str | None]:
  config = setup.config
  print(f"training {config.total_steps - start} steps from step {start} in {setup.workdir} on "
        f"{setup.mesh.size} device(s)", flush=True)
  last = stopped = None
  t0 = time.perf_counter()
  logger.start(start)
  stop = config.total_steps if num_steps is None else min(config.total_steps, start + num_steps)
  watcher = PreemptionWatcher()
  guard = NonFiniteGuard(config.on_nonfinite)
  profiler = Profiler(config.profile, setup.workdir)
  try:
    for step in range(start, stop):
      profiler.before(step)
      state = setup.start_fine_tuning(state, step)  # once, before a single run's first fine-tuning step
      batch = sharding.global_batch(next(setup.pipeline), setup.mesh)
      state, metrics = setup.step_fn(step)(state, batch, step_key)
      done = step + 1
      guard.update(metrics, done)
      ckpt.check()  # a failed asynchronous save stops the run now, not at the next save
      reason = watcher.should_stop(done)
      if reason:
        stop = done  # checkpoint below, then leave; the next start resumes here (and writes this step's outputs)
        stopped = f"{reason} at step {done} of {config.total_steps}, with a checkpoint there; run the same command " \
                  "again to continue"
        print(f"{reason}: saving a checkpoint at step {done} and stopping", flush=True)
      if step == start:
        jax.block_until_ready(metrics)
        print(f"first step (with compilation) took {time.perf_counter() - t0:.1f}s", flush=True)
      log = is_due(done, config.log_every, config.total_steps)
      save = is_due(done, config.checkpoint_every, config.total_steps, stop=stop)  # also where this call stops
      due = [] if reason else outputs.due(done)
      if log or save or due:
        guard.check(ckpt)  # before anything of this step is logged, saved or sampled
      profiler.after(done, metrics)
      if log:
        metrics = jax.device_get(metrics)
        metrics["learning_rate"] = setup.lr_schedule(step)
        last = logger.write(done, metrics, step_flops=setup.step_flops(step, (state, batch, step_key)),
                            upcoming=outputs.upcoming(done))
      if save:
        ckpt.save(done, state, setup.pipeline.get_state(), config)
      outputs.write(state.ema_params, done, due)
      if done == stop:
        break
  finally:
    profiler.close()
    watcher.close()
  return last, stopped
