"""The training loop: build or restore the state, feed batches to the step, run the periodic actions."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from selfperc_jax import (checkpoint, config_tree, data, space, diffusion, fileio, flops, generate, sharding, step as step_lib,
                          validation)
from selfperc_jax.errors import CheckpointError, CorruptCheckpointError, NonFiniteError, Stopped, WorkdirLockedError
from selfperc_jax.evaluation import evaluate
from selfperc_jax.logging_utils import MetricLogger
from selfperc_jax.preemption import PreemptionWatcher
from selfperc_jax.workdir_lock import WorkdirLock
from selfperc_jax.models import unet


class Setup:
  """Everything built from a config before the first step: mesh, data, model, optimizer, state layout."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | None = None, with_data: bool = True):
    """workdir: a local path or a bucket URL (gs://...); None where nothing is read or written (the step alone)."""
    validation.validate(config)
    self.config = config
    self.workdir = None if workdir is None else fileio.resolve(workdir)
    if self.workdir is not None:
      fileio.check_workdir(self.workdir)
    self.mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, self.mesh)
    sharding.check_divisible(int(config.sample.batch_size), "sample.batch_size", self.mesh)
    rows = sharding.process_rows(self.mesh, config.batch_size)
    self.pipeline = data.build(config, rows) if with_data else None
    self.model_shape = space.model_shape(config)  # images, or their latents
    self.model = unet.unet_from_config(config.model, out_channels=self.model_shape[-1])
    self.schedule = diffusion.schedule_from_config(config.diffusion)
    self.tx, self.lr_schedule = step_lib.make_optimizer(config)
    self.init_fn = lambda key: step_lib.init_state(config, self.model, self.tx, key, self.model_shape)
    abstract_state = jax.eval_shape(self.init_fn, jax.random.key(0))
    self.state_sharding = sharding.state_shardings(self.mesh, abstract_state, config.mesh.fsdp_min_size)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, self.state_sharding)
    self._step_fns, self._step_flops, self._decoder = {}, {}, None

  def step_fn(self, step: int):
    """The jitted train step for 0-based step `step`: one compilation per phase (MSE pre-training, perceptual)."""
    phase = step_lib.perceptual_phase(self.config, step)
    if phase not in self._step_fns:
      fn = step_lib.make_train_step(self.config, self.model, self.schedule, self.tx, phase=phase)
      self._step_fns[phase] = sharding.jit_train_step(fn, self.mesh, self.state_sharding)
    return self._step_fns[phase]

  def abstract_batch(self) -> dict:
    """The global training batch's shapes, dtypes and sharding (for lowering the step without data)."""
    batch, b = sharding.batch_sharding(self.mesh), self.config.batch_size
    return {"image": jax.ShapeDtypeStruct((b,) + tuple(self.model_shape), jnp.float32, sharding=batch),
            "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch)}

  def step_flops(self, step: int) -> float | None:
    """XLA's FLOPs per device of the train step of `step`'s phase (the lowered program's cost analysis over the
    device count; nothing is compiled for it), or None where the backend does not count them."""
    phase = step_lib.perceptual_phase(self.config, step)
    if phase not in self._step_flops:
      key = jax.eval_shape(lambda: jax.random.key(0))
      key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(self.mesh))
      total = flops.lowered_flops(self.step_fn(step).lower(self.abstract_state, self.abstract_batch(), key))
      self._step_flops[phase] = None if total is None else total / self.mesh.size
    return self._step_flops[phase]

  def generator(self, embed_fn=None, embed_variables=None) -> generate.Generator:
    """Draws samples chunk by chunk over the mesh as config.sample says (with embed_fn: their features too)."""
    if self._decoder is None:
      self._decoder = space.decoder(self.config)  # (the VAE's decoder in latent space: loaded on first use)
    return generate.Generator(self.config, self.model, self.schedule, self.model_shape, self.mesh, embed_fn,
                              embed_variables, self._decoder)

  def evaluator(self) -> evaluate.Evaluator:
    return evaluate.Evaluator(self.config, self.workdir, self.generator)

  def init_state(self, key):
    return sharding.jit_init(self.init_fn, self.mesh, self.state_sharding)(key)

  def checkpointer(self, read_only: bool = False) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(fileio.join(self.workdir, "checkpoints"), self.config.keep_checkpoints,
                                   read_only=read_only,
                                   trust_unverified=self.config.trust_unverified_checkpoints)


def check_compatible(ckpt: checkpoint.Checkpointer, step: int, config, what: str) -> None:
  diffs = checkpoint.shape_differences(ckpt.restore_config(step), config)
  if diffs:
    raise CheckpointError(
        f"{what} {ckpt.directory} (step {step}) was trained with a different model shape:\n  " + "\n  ".join(diffs)
        + "\nUse the same model config, or a new --workdir for a new model. Nothing was changed.")


def _open_init_source(setup: Setup) -> tuple[checkpoint.Checkpointer, int]:
  """The checkpoint that init_from names, checked before anything is built from it."""
  source = setup.config.init_from
  directory = checkpoint.checkpoint_dir(source)
  if not fileio.isdir(directory):
    raise CheckpointError(f"init_from={source!r} does not exist; give a workdir (or its checkpoints/ folder) of an "
                          "earlier run.")
  src = checkpoint.Checkpointer(directory, read_only=True,
                                trust_unverified=setup.config.trust_unverified_checkpoints)
  latest = src.latest_step()
  if latest is None:
    raise CheckpointError(f"init_from={source!r} holds no checkpoint; give the workdir of a run that saved one.")
  check_compatible(src, latest, setup.config, "init_from=")
  return src, latest


def _init_from(setup: Setup, state, src: checkpoint.Checkpointer, step: int):
  """Online params and the sampling EMA from another run's checkpoint; the copy from its perceptual.copy_source."""
  target = {"params": setup.abstract_state.params, "ema_params": setup.abstract_state.ema_params}
  restored, _ = src.restore(step, target, partial=True)
  src.close()
  copy = None
  if state.perceptual_params is not None:
    source = restored["ema_params" if setup.config.perceptual.copy_source == "ema" else "params"]
    copy = jax.tree.map(lambda x: x.copy(), source)  # its own buffers: the step donates every array of the state
  print(f"initialised from {src.directory} (step {step})"
        + (f"; the perceptual copy from its {setup.config.perceptual.copy_source} params" if copy is not None else ""),
        flush=True)
  return state.replace(params=restored["params"], ema_params=restored["ema_params"], perceptual_params=copy)


# Config values that decide what the train state holds besides the model (the model's own are checkpoint.SHAPE_KEYS).
STATE_LAYOUT_KEYS = ("perceptual.weight", "perceptual.share_with_sampling_ema", "optimizer.grad_clip")


def check_resume_config(setup: Setup, saved: dict, step: int) -> dict:
  """Refuses a config whose train state holds other arrays than the checkpoint's (naming the keys and why); returns
  the other changed values, which the resumed run takes over."""
  changed = checkpoint.changed_values(saved, setup.config)
  if not changed:
    return {}
  then = ml_collections.ConfigDict(setup.config.to_dict())  # the config as the checkpoint was trained with it
  # (keys a checkpoint predates, or since removed, keep today's values)
  config_tree.set_values(then, {key: tuple(old) if isinstance(now, (list, tuple)) else old
                                for key, (old, now) in changed.items() if old is not None and now is not None})
  tx_then, _ = step_lib.make_optimizer(then)
  layout_then = jax.eval_shape(
      lambda k: step_lib.init_state(then, setup.model, tx_then, k, setup.model_shape), jax.random.key(0))
  if jax.tree.structure(layout_then) != jax.tree.structure(setup.abstract_state):
    keys = [k for k in STATE_LAYOUT_KEYS if k in changed] or list(changed)
    values = ", ".join(f"{k}={changed[k][0]!r} (now {changed[k][1]!r})" for k in keys)
    raise CheckpointError(
        f"the workdir's checkpoint (step {step}) was trained with {values}, and this changes what the train state "
        "holds (the perceptual copy, or the optimizer's state), so it cannot resume. Resume with the checkpoint's "
        "value(s), or start a new --workdir with --config.init_from=<this workdir> to begin from its params. "
        "Nothing was changed; the checkpoints are fine.")
  return changed


def restore_or_init(setup: Setup, ckpt: checkpoint.Checkpointer, init_key):
  """(state, restored_step or None); on resume the data iterator continues where it stopped.

  A corrupt or unreadable latest checkpoint is passed over, with a warning, for the newest one that restores intact;
  the passed-over step folders are moved to checkpoints_corrupt/ (never deleted), so later saves cannot collide with
  them. If none restores, nothing is moved and the error says so."""
  steps = ckpt.all_steps()
  if steps:
    corrupt = []
    for latest in reversed(steps):
      try:
        state, data_state, changed = _restore(setup, ckpt, latest)
        break
      except CorruptCheckpointError as e:
        corrupt.append((latest, e))
    else:
      raise CheckpointError(f"no checkpoint in {ckpt.directory} can be restored; the newest: {corrupt[0][1]} "
                            "Nothing was changed.")
    if corrupt:
      for step, error in corrupt:
        print(f"warning: {error}", flush=True)
      _move_aside(setup, ckpt, [step for step, _ in corrupt])
      print(f"resuming from step {latest}, the newest intact checkpoint", flush=True)
    if changed:
      listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
      print(f"resuming step {latest} with {len(changed)} changed config value(s): {listed}", flush=True)
      if jax.process_index() == 0:
        _record_config_change(setup.workdir, latest, changed)
    if setup.pipeline is not None and data_state is not None:
      setup.pipeline.set_state(data_state)
    if setup.config.init_from:
      print(f"resuming from step {latest} of {ckpt.directory}; init_from is ignored", flush=True)
    return state, latest
  source = _open_init_source(setup) if setup.config.init_from else None
  state = setup.init_state(init_key)
  if source is not None:
    state = _init_from(setup, state, *source)
  return state, None


def _record_config_change(workdir: str, step: int, changed: dict) -> None:
  """Appends the change to workdir/config_history.jsonl, unless its last row already says the same."""
  path = fileio.join(workdir, "config_history.jsonl")
  row = {"step": step, "changed": {k: {"checkpoint": a, "now": b} for k, (a, b) in changed.items()}}
  if fileio.exists(path):
    lines = fileio.read_text(path).splitlines()
    last = json.loads(lines[-1]) if lines else {}
    if {k: last.get(k) for k in row} == row:
      return
  fileio.append_text(path, json.dumps({**row, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def _restore(setup: Setup, ckpt: checkpoint.Checkpointer, step: int):
  """(state, data state, changed config values) of one step, after the config checks."""
  check_compatible(ckpt, step, setup.config, "the workdir's checkpoint")
  changed = check_resume_config(setup, ckpt.restore_config(step), step)
  state, data_state = ckpt.restore(step, setup.abstract_state)
  return state, data_state, changed


def _move_aside(setup: Setup, ckpt: checkpoint.Checkpointer, steps) -> None:
  """Moves corrupt step folders to workdir/checkpoints_corrupt/<step> (process 0), then every process re-reads."""
  if jax.process_index() == 0:
    from etils import epath

    aside = epath.Path(fileio.join(setup.workdir, "checkpoints_corrupt"))
    aside.mkdir(parents=True, exist_ok=True)
    for step in steps:
      target = aside / f"{step}"
      if target.exists():
        target = aside / f"{step}_{time.strftime('%Y%m%dT%H%M%S')}"
      epath.Path(fileio.join(ckpt.directory, str(step))).rename(target)
      print(f"moved the corrupt checkpoint step {step} to {target}", flush=True)
  sharding.broadcast_from_process_0(np.int32(0))  # every process waits for the move
  ckpt.manager.reload()


def is_due(done: int, every: int, total: int) -> bool:
  """Whether a periodic action (every `every` steps, and at the last step; never when every is 0) runs after
  step `done`."""
  return every > 0 and (done % every == 0 or done == total)


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
      labels = generate.class_labels(c.sample.num_samples, c.model.num_classes, c.sample.classes)
      png = generate.write_samples(self._generator, params, fileio.join(self.setup.workdir, "samples"),
                                   f"step_{step}", labels, c.sample.seed)
      if png:
        print(f"samples: {png}", flush=True)
    if "eval" in actions:
      self._evaluator = self._evaluator or self.setup.evaluator()
      result = self._evaluator(params, step)
      if result is not None:
        self.logger.write_eval(step, {k: v for k, v in result.items() if isinstance(v, float)})


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


def lock_workdir(workdir: str) -> WorkdirLock:
  """Process 0 takes the workdir's lock; every process stops, with its message, if it cannot."""
  lock, error = WorkdirLock(workdir), ""
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except WorkdirLockedError as e:
      error = str(e)
  if not int(sharding.broadcast_from_process_0(np.int32(1 if error else 0))) == 0:
    raise WorkdirLockedError(error or f"{workdir} is in use by another run (process 0 has the details).")
  return lock


def _train(setup: Setup, num_steps: int | None) -> dict | None:
  config = setup.config
  base_key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(base_key)
  ckpt = setup.checkpointer()
  if jax.process_index() == 0:
    _remove_partial_outputs(setup.workdir)
  state, restored = restore_or_init(setup, ckpt, init_key)
  start = 0 if restored is None else restored
  outputs = PeriodicOutputs(setup)
  lacking = outputs.missing(start) if restored is not None else []
  if start >= config.total_steps and not lacking:
    print(f"the checkpoint is at step {start} >= total_steps={config.total_steps}: nothing to train", flush=True)
    ckpt.close()
    return None
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
    ckpt.close()
    logger.close()
    return None

  print(f"training {config.total_steps - start} steps from step {start} in {setup.workdir} on "
        f"{setup.mesh.size} device(s)", flush=True)
  last = preempted = None
  t0 = time.perf_counter()
  logger.start(start)
  stop = config.total_steps if num_steps is None else min(config.total_steps, start + num_steps)
  preemption = PreemptionWatcher()
  guard = NonFiniteGuard(config.on_nonfinite)
  profiler = Profiler(config.profile, setup.workdir)
  failed = True
  try:
    for step in range(start, stop):
      profiler.before(step)
      batch = sharding.global_batch(next(setup.pipeline), setup.mesh)
      state, metrics = setup.step_fn(step)(state, batch, step_key)
      done = step + 1
      guard.update(metrics, done)
      ckpt.check()  # a failed asynchronous save stops the run now, not at the next save
      preempted = preemption.should_stop(done)
      if preempted:
        stop = done  # checkpoint below, then leave; the next start resumes here (and writes this step's outputs)
        print(f"{preempted}: saving a checkpoint at step {done} and stopping", flush=True)
      if step == start:
        jax.block_until_ready(metrics)
        print(f"first step (with compilation) took {time.perf_counter() - t0:.1f}s", flush=True)
      log = is_due(done, config.log_every, config.total_steps)
      save = done % config.checkpoint_every == 0 or done == stop
      due = [] if preempted else outputs.due(done)
      if log or save or due:
        guard.check(ckpt)  # before anything of this step is logged, saved or sampled
      profiler.after(done, metrics)
      if log:
        metrics = jax.device_get(metrics)
        metrics["learning_rate"] = setup.lr_schedule(step)
        last = logger.write(done, metrics, step_flops=setup.step_flops(step))
      if save:
        ckpt.save(done, state, setup.pipeline.get_state(), config)
      outputs.write(state.ema_params, done, due)
      if done == stop:
        break
    failed = False
  finally:
    profiler.close()
    preemption.close()
    ckpt.close(report=not failed)  # a run already stopping with an error does not add a second one
    logger.close()
  if preempted:
    raise Stopped(f"{preempted} at step {stop} of {config.total_steps}, with a checkpoint there; run the same command "
                  "again to continue")
  return last


def _remove_partial_outputs(workdir: str) -> None:
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
