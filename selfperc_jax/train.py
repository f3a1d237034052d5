"""The training loop and the sample mode: build or restore the state, feed batches to the step, periodic actions."""

from __future__ import annotations

import signal
import threading
import time

import jax
import ml_collections

from selfperc_jax import (checkpoint, data, diffusion, fileio, images, sampling, sharding, step as step_lib,
                          validation)
from selfperc_jax.errors import CheckpointError
from selfperc_jax.logging_utils import MetricLogger
from selfperc_jax.models import unet


class Setup:
  """Everything built from a config before the first step: mesh, data, model, optimizer, state layout."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, with_data: bool = True):
    validation.validate(config)
    self.config = config
    self.workdir = fileio.resolve(workdir)  # a local path or a bucket URL (gs://...)
    self.mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, self.mesh)
    rows = sharding.process_rows(self.mesh, config.batch_size)
    self.pipeline = data.build(config, rows) if with_data else None
    self.image_shape = data.image_shape(config.data)
    self.model = unet.unet_from_config(config.model, out_channels=self.image_shape[-1])
    self.schedule = diffusion.schedule_from_config(config.diffusion)
    self.tx, self.lr_schedule = step_lib.make_optimizer(config)
    self.init_fn = lambda key: step_lib.init_state(config, self.model, self.tx, key, self.image_shape)
    abstract_state = jax.eval_shape(self.init_fn, jax.random.key(0))
    self.state_sharding = sharding.state_shardings(self.mesh, abstract_state, config.mesh.get("fsdp_min_size", 1024))
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, self.state_sharding)
    self._step_fns = {}

  def step_fn(self, step: int):
    """The jitted train step for 0-based step `step`: one compilation per phase (MSE pre-training, perceptual)."""
    active = step_lib.perceptual_phase(self.config, step)
    if active not in self._step_fns:
      fn = step_lib.make_train_step(self.config, self.model, self.schedule, self.tx, perceptual_active=active)
      self._step_fns[active] = sharding.jit_train_step(fn, self.mesh, self.state_sharding)
    return self._step_fns[active]

  def init_state(self, key):
    return sharding.jit_init(self.init_fn, self.mesh, self.state_sharding)(key)

  def checkpointer(self, read_only: bool = False) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(fileio.join(self.workdir, "checkpoints"), self.config.keep_checkpoints,
                                   read_only=read_only)


def _check_compatible(ckpt: checkpoint.Checkpointer, step: int, config, what: str) -> None:
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
  src = checkpoint.Checkpointer(directory, read_only=True)
  latest = src.latest_step()
  if latest is None:
    raise CheckpointError(f"init_from={source!r} holds no checkpoint; give the workdir of a run that saved one.")
  _check_compatible(src, latest, setup.config, "init_from=")
  return src, latest


def _init_from(setup: Setup, state, src: checkpoint.Checkpointer, step: int):
  """Online params (and the copy, which starts from them) and the sampling EMA from another run's checkpoint."""
  target = {"params": setup.abstract_state.params, "ema_params": setup.abstract_state.ema_params}
  restored, _ = src.restore(step, target, partial=True)
  src.close()
  print(f"initialised from {src.directory} (step {step})", flush=True)
  copy = restored["params"] if state.perceptual_params is not None else None
  return state.replace(params=restored["params"], ema_params=restored["ema_params"], perceptual_params=copy)


def restore_or_init(setup: Setup, ckpt: checkpoint.Checkpointer, init_key):
  """(state, restored_step or None); on resume the data iterator continues where it stopped."""
  latest = ckpt.latest_step()
  if latest is not None:
    _check_compatible(ckpt, latest, setup.config, "the workdir's checkpoint")
    state, data_state = ckpt.restore(latest, setup.abstract_state)
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


def _write_samples(setup: Setup, sample_fn, params, name: str) -> str:
  imgs, labels = sampling.draw(sample_fn, params, setup.config, setup.mesh)
  if jax.process_index() != 0:
    return ""
  png, _ = images.save_samples(fileio.join(setup.workdir, "samples"), name, imgs, labels)
  return png


class Evaluator:
  """Samples eval.num_samples images with the sample.* settings and scores them against the reference data."""

  def __init__(self, setup: Setup):
    from selfperc_jax.evaluation import evaluate

    self.setup, self.evaluate = setup, evaluate
    self.eval_dir = fileio.join(setup.workdir, "eval")
    self.network = evaluate.feature_network(setup.config, self.eval_dir, setup.mesh)
    self.reference = evaluate.reference_features(setup.config, self.network)
    self.sample_fn = sampling.make_sample_fn(setup.config, setup.model, setup.schedule, setup.image_shape)

  def __call__(self, params, step: int) -> dict:
    cfg = self.setup.config
    imgs, labels = sampling.draw(self.sample_fn, params, cfg, self.setup.mesh, cfg.eval.num_samples, cfg.eval.seed)
    result = self.evaluate.score(imgs, labels, self.network, self.reference,
                                 class_scores=cfg.eval.features == "digits")
    result.update(step=step, sampler=cfg.sample.sampler, sample_steps=cfg.sample.steps,
                  guidance_scale=cfg.sample.guidance_scale)
    if jax.process_index() == 0:
      path = self.evaluate.write_result(self.eval_dir, step, self.evaluate.setting_name(cfg), result)
      accuracy = f", class accuracy {result['class_accuracy']:.3f}" if "class_accuracy" in result else ""
      print(f"eval at step {step}: FID {result['fid']:.3f}{accuracy}, IS {result['inception_score']:.2f} -> {path}",
            flush=True)
    return result


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, num_steps: int | None = None) -> dict | None:
  """Trains to config.total_steps, resuming from workdir's latest checkpoint; returns the last logged metrics.

  num_steps: train at most this many steps in this call, then checkpoint and return (e.g. to train in chunks from a
  notebook); calling again continues exactly where it stopped.
  """
  setup = Setup(config, workdir)
  fileio.makedirs(setup.workdir)
  base_key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(base_key)
  ckpt = setup.checkpointer()
  state, restored = restore_or_init(setup, ckpt, init_key)
  start = 0 if restored is None else restored
  if start >= config.total_steps:
    print(f"the checkpoint is at step {start} >= total_steps={config.total_steps}: nothing to train", flush=True)
    ckpt.close()
    return None

  sample_fn = sampling.make_sample_fn(config, setup.model, setup.schedule, setup.image_shape)
  logger = MetricLogger(setup.workdir, config.total_steps, config.batch_size, enabled=jax.process_index() == 0)
  evaluator = Evaluator(setup) if config.eval_every else None
  print(f"training {config.total_steps - start} steps from step {start} in {setup.workdir} on "
        f"{setup.mesh.size} device(s)", flush=True)
  last = None
  t0 = time.perf_counter()
  logger.start(start)
  stop = config.total_steps if num_steps is None else min(config.total_steps, start + num_steps)
  preemption = PreemptionWatcher()
  for step in range(start, stop):
    batch = sharding.global_batch(next(setup.pipeline), setup.mesh)
    state, metrics = setup.step_fn(step)(state, batch, step_key)
    done = step + 1
    if preemption.should_stop(done):
      stop = done  # checkpoint below, then leave; the next start resumes here
      print(f"preempted: saving a checkpoint at step {done} and stopping", flush=True)
    if step == start:
      jax.block_until_ready(metrics)
      print(f"first step (with compilation) took {time.perf_counter() - t0:.1f}s", flush=True)
    if done % config.log_every == 0 or done == config.total_steps:
      metrics = jax.device_get(metrics)
      metrics["learning_rate"] = setup.lr_schedule(step)
      last = logger.write(done, metrics)
    if done % config.checkpoint_every == 0 or done == stop:
      ckpt.save(done, state, setup.pipeline.get_state(), config)
    if config.sample_every and (done % config.sample_every == 0 or done == config.total_steps):
      png = _write_samples(setup, sample_fn, state.ema_params, f"step_{done}")
      if png:
        print(f"samples: {png}", flush=True)
    if evaluator is not None and (done % config.eval_every == 0 or done == config.total_steps):
      result = evaluator(state.ema_params, done)
      logger.write_eval(done, {k: v for k, v in result.items() if isinstance(v, float)})
    if done == stop:
      break
  preemption.close()
  ckpt.close()
  logger.close()
  return last


def _latest_sampling_params(setup: Setup):
  """(step, sampling-EMA params) of the workdir's latest checkpoint."""
  ckpt_dir = fileio.join(setup.workdir, "checkpoints")
  if not fileio.isdir(ckpt_dir):
    raise CheckpointError(f"{setup.workdir} has no checkpoints/ folder: train first (--mode=train) or fix --workdir.")
  ckpt = setup.checkpointer(read_only=True)
  latest = ckpt.latest_step()
  if latest is None:
    raise CheckpointError(f"{ckpt_dir} holds no checkpoint: train first (--mode=train) or fix --workdir.")
  _check_compatible(ckpt, latest, setup.config, "the workdir's checkpoint")
  restored, _ = ckpt.restore(latest, {"ema_params": setup.abstract_state.ema_params}, partial=True)
  ckpt.close()
  return latest, restored["ema_params"]


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the workdir's latest checkpoint; the metrics go to workdir/eval/step_<STEP>.json under the setting."""
  setup = Setup(config, workdir, with_data=False)
  latest, params = _latest_sampling_params(setup)
  return Evaluator(setup)(params, latest)


def sample_from_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Samples from the sampling EMA of the workdir's latest checkpoint with config.sample.*; returns the PNG path."""
  setup = Setup(config, workdir, with_data=False)
  latest, params = _latest_sampling_params(setup)
  s = config.sample
  sample_fn = sampling.make_sample_fn(config, setup.model, setup.schedule, setup.image_shape)
  # A name per setting, so that sampling never overwrites the training-time grids or another setting's samples.
  png = _write_samples(setup, sample_fn, params,
                       f"step_{latest}_{s.sampler}{s.steps}_cfg{s.guidance_scale:g}_seed{s.seed}")
  print(f"samples: {png}", flush=True)
  return png
