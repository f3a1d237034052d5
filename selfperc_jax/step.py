"""The training state and the pure training step. Nothing here knows about devices: `sharding.py` compiles it."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from selfperc_jax import conditioning, diffusion, losses, pretrained


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # for sampling
  perceptual_params: Any  # the stop-gradient copy; None when the loss has no perceptual term or shares ema_params


def has_perceptual(config) -> bool:
  """Whether the loss has the self-perceptual term at all (from perceptual.start_step on)."""
  return config.perceptual.weight > 0


def keeps_copy(config) -> bool:
  """Whether the train state holds its own perceptual copy (not the case when it shares the sampling EMA)."""
  return has_perceptual(config) and not config.perceptual.share_with_sampling_ema


def perceptual_phase(config, step: int) -> bool:
  """Whether training step `step` (0-based) includes the self-perceptual term; decided on the host."""
  return has_perceptual(config) and step >= config.perceptual.start_step


def fine_tuning_start(config) -> int | None:
  """The 0-based step where the run's fine-tuning (finetune.*) begins: 0 for a run with init_from (all of it is
  fine-tuning), perceptual.start_step for a run that pre-trains with MSE and trains the self-perceptual term from
  that step on (start_step > 0), None for a run without fine-tuning (from scratch, with no such switch). A run from
  a model folder's U-Net (pretrained.start_folder) is fine-tuning throughout, as one with init_from."""
  if config.init_from or pretrained.start_folder(config):
    return 0
  if has_perceptual(config) and int(config.perceptual.start_step) > 0:
    return int(config.perceptual.start_step)
  return None


def transition_step(config) -> int | None:
  """The step before which the state changes, once, into the fine-tuning's (`start_fine_tuning`): a single run's
  fine-tuning start; None for an init_from run (its state is made so when it is initialised, resume._init_from) and
  for a run without fine-tuning."""
  return fine_tuning_start(config) or None


def start_fine_tuning(config, tx, state: TrainState) -> TrainState:
  """The state at the fine-tuning's first step, from the pre-trained state (pure): the online params from the
  sampling EMA with finetune.online_start='ema', a fresh optimizer state with finetune.optimizer_state='reset'; the
  sampling EMA, the copy and the step as they are."""
  f = config.finetune
  params = jax.tree.map(jnp.copy, state.ema_params) if f.online_start == "ema" else state.params
  opt_state = tx.init(params) if f.optimizer_state == "reset" else state.opt_state
  return state.replace(params=params, opt_state=opt_state)


def warmup_then_decay(peak: float, warmup_steps: int, decay: str, steps: int):
  """Linear from 0 to `peak` over warmup_steps, then 'constant' or 'cosine' (to 0 at `steps`)."""
  warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  if decay == "constant":
    after = optax.constant_schedule(peak)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(peak, max(steps - warmup_steps, 1))
  else:
    raise ValueError(f"decay={decay!r} is not known; choose 'cosine' or 'constant'.")
  return optax.join_schedules([warmup, after], [warmup_steps])


def learning_rate_schedule(opt_cfg, total_steps: int):
  """optimizer.*'s schedule over total_steps."""
  return warmup_then_decay(opt_cfg.learning_rate, opt_cfg.warmup_steps, opt_cfg.decay, total_steps)


def learning_rate_fn(config):
  """The learning rate at (0-based) step s of the run, a function of s: without fine-tuning (or with
  finetune.decay='run') optimizer.*'s schedule over total_steps; an init_from run finetune.*'s over its total_steps;
  a single run optimizer.*'s over its first perceptual.start_step steps (the comparison's pre-training stage), then
  finetune.*'s over the rest."""
  f, start = config.finetune, fine_tuning_start(config)
  if start is None or f.decay == "run":
    return learning_rate_schedule(config.optimizer, config.total_steps)
  tune = warmup_then_decay(f.learning_rate or config.optimizer.learning_rate, f.warmup_steps, f.decay,
                           config.total_steps - start)
  if start == 0:
    return tune
  return optax.join_schedules([learning_rate_schedule(config.optimizer, start), tune], [start])


def make_optimizer(config):
  """(tx, learning_rate): AdamW at a unit learning rate, and the run's learning rate as a function of the step
  (`learning_rate_fn`), which the step multiplies tx's updates by, so that it follows the state's step and not the
  optimizer's count (which finetune.optimizer_state='reset' starts again). The same updates as AdamW at that rate;
  the optimizer state has the layout of optax.adamw with a schedule."""
  opt = config.optimizer
  parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
  parts.append(optax.adamw(optax.constant_schedule(1.0), b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay))
  return optax.chain(*parts), learning_rate_fn(config)


def init_state(config, model: nn.Module, tx, key, image_shape, condition=None) -> TrainState:
  """A fresh state; the EMA and the perceptual copy start equal to the online params. condition: the shape and
  dtype of one example's condition batch (conditioning.Conditioning.example; default a class label)."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  condition = condition or jax.ShapeDtypeStruct((1,), jnp.int32)
  params = model.init(key, x, jnp.full((1,), 0.5), jnp.zeros(condition.shape, condition.dtype))["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=params,
      perceptual_params=params if keeps_copy(config) else None,
  )


def perceptual_weight(p_cfg, step):
  """0 before the start step, then perceptual.weight, reached through an optional linear ramp."""
  ramp = p_cfg.ramp_steps
  frac = 1.0 if ramp <= 0 else jnp.clip((step - p_cfg.start_step + 1) / ramp, 0.0, 1.0)
  return jnp.where(step >= p_cfg.start_step, p_cfg.weight * frac, 0.0)


def sampling_ema_decay(decay, step):
  """The sampling EMA's decay at (0-based) step `step`: warmed up as min(decay, (1 + step) / (10 + step))."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def sampling_ema_schedule(config):
  """The sampling EMA's decay at (0-based) step s of the run, a function of s: warmed up over the run's steps
  (`sampling_ema_decay`) until the fine-tuning's start; from there the full sampling_ema.decay
  (finetune.sampling_ema='carry') or the warm-up anew ('restart'); 'run', or a run without fine-tuning, warms up
  over the run's steps throughout."""
  decay, start, mode = config.sampling_ema.decay, fine_tuning_start(config), config.finetune.sampling_ema
  if start is None or mode == "run":
    return lambda s: sampling_ema_decay(decay, s)
  if mode == "carry":
    return lambda s: jnp.where(s >= start, decay, sampling_ema_decay(decay, s))
  return lambda s: sampling_ema_decay(decay, jnp.where(s >= start, s - start, s))


def _ema(decay, old, new):
  return jax.tree.map(lambda o, n: decay * o + (1.0 - decay) * n, old, new)


def micro_batches(examples, n: int):
  """Splits every (B, ...) array into n strided micro-batches, stacked as (n, B / n, ...): micro-batch j holds
  examples j, j + n, j + 2n, ... With the batch split into contiguous blocks over the devices, each device keeps
  its own examples (when n divides its block), so the split needs no communication."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1), examples)


def _accumulated(grad_fn, params, examples, dropout_key, n: int):
  """The mean over n micro-batches of grad_fn's ((loss, terms), grads): equal to one full-batch evaluation (every
  term is a mean over equally many examples), with the activations of one micro-batch at a time."""

  def body(total, xs):
    j, ex = xs
    out = grad_fn(params, ex, jax.random.fold_in(dropout_key, j))
    return jax.tree.map(jnp.add, total, out), None

  first = jax.tree.map(lambda x: x[0], micro_batches(examples, n))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first, dropout_key))
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(n), micro_batches(examples, n)))
  return jax.tree.map(lambda x: x / n, total)


def make_train_step(config, model: nn.Module, schedule: diffusion.Schedule, tx, phase: bool, learning_rate=None,
                    cond: conditioning.Conditioning | None = None):
  """Builds `train_step(state, batch, base_key[, frozen]) -> (state, metrics)`; batch = {'image': NHWC in [-1,1],
  'label'}.

  tx's updates are multiplied by learning_rate(state.step) (default `learning_rate_fn(config)`; see
  `make_optimizer`), and the sampling EMA's decay is `sampling_ema_schedule(config)`'s. The state change at a single
  run's fine-tuning start (`start_fine_tuning`) is not the step's: the loop applies it before the step.

  There is one step function per phase, chosen on the host with `perceptual_phase`: the MSE pre-training phase
  (phase=False) never traces the perceptual copy's forward, and the self-perceptual phase (phase=True) needs no
  runtime branch (a `lax.cond` around the term made the whole step about twice as slow on CPU).

  The copy: in the pre-training phase it is set after every update to its source (`perceptual.copy_source`: the
  sampling EMA or the online params), so at the start step it holds the source of that moment; in the perceptual
  phase it is an EMA of the online params with `perceptual.copy_ema_decay` (1.0: frozen, not touched at all).
  """
  loss_cfg, p_cfg, prediction = config.loss, config.perceptual, config.diffusion.prediction
  if phase and not has_perceptual(config):
    raise ValueError("phase=True (the self-perceptual phase) needs perceptual.weight > 0.")
  cond = conditioning.from_config(config) if cond is None else cond
  taps = tuple(p_cfg.taps)

  accumulate = int(config.optimizer.accumulate_steps)
  learning_rate = learning_rate_fn(config) if learning_rate is None else learning_rate
  ema_decay = sampling_ema_schedule(config)

  def train_step(state: TrainState, batch, base_key, frozen=None):
    """frozen: what the step uses and never trains (conditioning.frozen_params: the text encoder's variables where
    the labels are token ids), or None."""
    frozen = frozen or {}
    key = jax.random.fold_in(base_key, state.step)
    k_t, k_eps, k_drop_label, k_dropout, k_perceptual = jax.random.split(key, 5)
    x0, labels = batch["image"], batch["label"]
    b = x0.shape[0]
    # Every per-example draw is made for the whole batch first, so that micro-batches (optimizer.accumulate_steps)
    # see exactly the draws of the one full-batch step.
    t = schedule.sample_t(k_t, (b,))
    examples = {
        "x0": x0, "t": t, "eps": jax.random.normal(k_eps, x0.shape, x0.dtype),
        "label": cond.drop(k_drop_label, cond.from_labels(labels, jax.random.fold_in(k_drop_label, 1),
                                                          frozen.get("text")), loss_cfg.label_dropout),
    }
    if loss_cfg.min_snr_gamma > 0:
      examples["weight"] = losses.min_snr_weight(schedule.log_snr(t), prediction, loss_cfg.min_snr_gamma)
    if phase:
      examples["t_prime"], eps_prime = losses.draw_t_prime_eps(
          k_perceptual, schedule, x0.shape, x0.dtype, p_cfg.noise, p_cfg.t_prime_min, p_cfg.t_prime_max)
      if eps_prime is not None:
        examples["eps_prime"] = eps_prime

    w_perceptual = perceptual_weight(p_cfg, state.step) if phase else jnp.zeros((), jnp.float32)
    # The pre-training phase (and a run without the perceptual term) is plain MSE.
    w_mse = p_cfg.mse_weight if phase else 1.0
    frozen = jax.lax.stop_gradient(state.ema_params if state.perceptual_params is None else state.perceptual_params)
    features_fn = lambda x, tt, y: model.apply({"params": frozen}, x, tt, y, taps=taps)

    def loss_fn(params, ex, dropout_key):
      alpha, sigma = schedule.alpha_sigma(ex["t"])
      x_t = diffusion.q_sample(ex["x0"], ex["eps"], alpha, sigma)
      pred = model.apply({"params": params}, x_t, ex["t"], ex["label"], train=True, rngs={"dropout": dropout_key})
      l_mse = losses.mse_loss(pred, ex["x0"], ex["eps"], alpha, sigma, prediction, ex.get("weight"))
      if not has_perceptual(config):
        return l_mse, {"loss_mse": l_mse}
      if not phase:
        return l_mse, {"loss_mse": l_mse, "loss_perceptual": jnp.zeros((), jnp.float32)}
      x0_hat, eps_hat = diffusion.to_x0_eps(pred, x_t, alpha, sigma, prediction)
      copy_labels = cond.for_copy(ex["label"], p_cfg.condition)
      l_perceptual = losses.self_perceptual_loss(
          features_fn, schedule, None, ex["x0"], x0_hat, ex["eps"], eps_hat, copy_labels, noise=p_cfg.noise,
          fused=p_cfg.fused, t_prime=ex["t_prime"], eps_prime=ex.get("eps_prime"))
      return w_mse * l_mse + w_perceptual * l_perceptual, {"loss_mse": l_mse, "loss_perceptual": l_perceptual}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accumulate == 1:
      (loss, terms), grads = grad_fn(state.params, examples, k_dropout)
    else:
      (loss, terms), grads = _accumulated(grad_fn, state.params, examples, k_dropout, accumulate)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = learning_rate(state.step)
    updates = jax.tree.map(lambda u: jnp.asarray(lr, u.dtype) * u, updates)
    params = optax.apply_updates(state.params, updates)

    ema_params = _ema(ema_decay(state.step), state.ema_params, params)
    perceptual_params = state.perceptual_params
    if perceptual_params is not None:
      if not phase:
        perceptual_params = ema_params if p_cfg.copy_source == "ema" else params
      elif p_cfg.copy_ema_decay < 1.0:
        perceptual_params = _ema(p_cfg.copy_ema_decay, perceptual_params, params)

    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema_params=ema_params,
        perceptual_params=perceptual_params,
    )
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if config.on_nonfinite == "skip":
      # Keep the state from before this update (only the step counter moves on).
      kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
      new_state = kept.replace(step=state.step + 1)
    metrics = dict(terms, loss=loss, grad_norm=grad_norm, perceptual_weight=w_perceptual,
                   nonfinite=1.0 - finite.astype(jnp.float32))
    return new_state, metrics

  return train_step
