"""Setup: everything built from a config before the first step (mesh, data, model, optimizer, state layout), and what
is built from those on demand (the jitted step per phase, its FLOPs, the generator, the evaluator, the checkpointer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from selfperc_jax import (checkpoint, conditioning, config_tree, diffusion, fileio, flops, generate, input_pipeline,
                          sharding, space, step as step_lib, validation)
from selfperc_jax import models
from selfperc_jax.evaluation import evaluate


class _WithFrozen:
  """A jitted step of (state, batch, key, frozen) called, and lowered, as (state, batch, key): the frozen params
  (placed once on the mesh) go with every call."""

  def __init__(self, jitted, frozen):
    self.jitted, self.frozen = jitted, frozen

  def __call__(self, state, batch, key):
    return self.jitted(state, batch, key, self.frozen)

  def lower(self, state, batch, key):
    return self.jitted.lower(state, batch, key, self.frozen)


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
    self.pipeline = input_pipeline.build(config, rows) if with_data else None
    self.model_shape = space.model_shape(config)  # images, or their latents
    self.conditioning = conditioning.from_config(config)  # class, text or none
    self.model = models.from_config(config, self.model_shape[-1], self.conditioning.model_classes)
    self.schedule = diffusion.schedule_from_config(config.diffusion)
    self.tx, self.lr_schedule = step_lib.make_optimizer(config)
    self.init_fn = lambda key: step_lib.init_state(config, self.model, self.tx, key, self.model_shape,
                                                   self.conditioning.example())
    abstract_state = jax.eval_shape(self.init_fn, jax.random.key(0))
    self.state_sharding = sharding.state_shardings(self.mesh, abstract_state, config.mesh.fsdp_min_size)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, self.state_sharding)
    self._step_fns, self._step_flops, self._decoder, self._transition = {}, {}, None, None

  def step_fn(self, step: int):
    """The jitted train step for 0-based step `step`: one compilation per phase (MSE pre-training, perceptual)."""
    phase = step_lib.perceptual_phase(self.config, step)
    if phase not in self._step_fns:
      fn = step_lib.make_train_step(self.config, self.model, self.schedule, self.tx, phase=phase,
                                    learning_rate=self.lr_schedule, cond=self.conditioning)
      frozen = conditioning.frozen_params(self.config)
      jitted = sharding.jit_train_step(fn, self.mesh, self.state_sharding, frozen=bool(frozen))
      self._step_fns[phase] = _WithFrozen(jitted, sharding.replicate(frozen, self.mesh)) if frozen else jitted
    return self._step_fns[phase]

  def start_fine_tuning(self, state, step: int):
    """The state to run 0-based step `step` from: at a single run's fine-tuning start (step.transition_step) the
    fine-tuning's (step.start_fine_tuning, jitted with the state donated), applied once, before that step; at any
    other step the state as it is. So a run resumed at any step, before, at or after the start, is the same run."""
    if step != step_lib.transition_step(self.config):
      return state
    if self._transition is None:
      self._transition = jax.jit(lambda s: step_lib.start_fine_tuning(self.config, self.tx, s),
                                 in_shardings=(self.state_sharding,), out_shardings=self.state_sharding,
                                 donate_argnums=0)
    return self._transition(state)

  def keep_recipe(self, values: dict) -> None:
    """Takes finetune.* from `values` (the recipe a resumed run began with) instead of the config's: self.config
    becomes a copy with them (the caller's config is not changed), and what is built from them is built again."""
    config = ml_collections.ConfigDict(self.config.to_dict())
    config_tree.set_values(config, {f"finetune.{k}": v for k, v in values.items()})
    self.config = config
    _, self.lr_schedule = step_lib.make_optimizer(config)  # (the optimizer itself does not depend on the recipe)
    self._step_fns, self._step_flops, self._transition = {}, {}, None

  def abstract_batch(self) -> dict:
    """The global training batch's shapes, dtypes and sharding (for lowering the step without data)."""
    batch, b = sharding.batch_sharding(self.mesh), self.config.batch_size
    label = self.conditioning.batch_label(b)
    return {"image": jax.ShapeDtypeStruct((b,) + tuple(self.model_shape), jnp.float32, sharding=batch),
            "label": jax.ShapeDtypeStruct(label.shape, label.dtype, sharding=batch)}

  def step_flops(self, step: int, args: tuple | None = None) -> float | None:
    """XLA's FLOPs per device of the train step of `step`'s phase (the lowered program's cost analysis over the
    device count; nothing is compiled for it), or None where the backend does not count them. args: the live
    (state, batch, key) of a step of that phase already run, whose trace jit has kept (lowering it again is then
    free); without them the step is traced again from the abstract state."""
    phase = step_lib.perceptual_phase(self.config, step)
    if phase not in self._step_flops:
      if args is None:
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(self.mesh))
        args = (self.abstract_state, self.abstract_batch(), key)
      total = flops.lowered_flops(self.step_fn(step).lower(*args))
      self._step_flops[phase] = None if total is None else total / self.mesh.size
    return self._step_flops[phase]

  def generator(self, embed_fn=None, embed_variables=None) -> generate.Generator:
    """Draws samples chunk by chunk over the mesh as config.sample says (with embed_fn: their features too)."""
    if self._decoder is None:
      self._decoder = space.decoder(self.config)  # (the VAE's decoder in latent space: loaded on first use)
    return generate.Generator(self.config, self.model, self.schedule, self.model_shape, self.mesh, embed_fn,
                              embed_variables, self._decoder, self.conditioning)

  def evaluator(self) -> evaluate.Evaluator:
    return evaluate.Evaluator(self.config, self.workdir, self.generator)

  def init_state(self, key):
    return sharding.jit_init(self.init_fn, self.state_sharding)(key)

  def checkpointer(self) -> checkpoint.Checkpointer:
    """The workdir's checkpoints, for writing."""
    return checkpoint.Checkpointer(fileio.join(self.workdir, "checkpoints"), self.config.keep_checkpoints,
                                   trust_unverified=self.config.trust_unverified_checkpoints)
