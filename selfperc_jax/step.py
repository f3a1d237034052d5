"""The training state and the pure training step. Nothing here knows about devices: `sharding.py` compiles it."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from selfperc_jax import conditioning, diffusion, losses


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


def learning_rate_schedule(opt_cfg, total_steps: int):
  warmup = optax.linear_schedule(0.0, opt_cfg.learning_rate, max(opt_cfg.warmup_steps, 1))
  if opt_cfg.decay == "constant":
    after = optax.constant_schedule(opt_cfg.learning_rate)
  elif opt_cfg.decay == "cosine":
    after = optax.cosine_decay_schedule(opt_cfg.learning_rate, max(total_steps - opt_cfg.warmup_steps, 1))
  else:
    raise ValueError(f"optimizer.decay={opt_cfg.decay!r} is not known; choose 'cosine' or 'constant'.")
  return optax.join_schedules([warmup, after], [opt_cfg.warmup_steps])


def make_optimizer(config):
  opt = config.optimizer
  lr = learning_rate_schedule(opt, config.total_steps)
  parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
  parts.append(optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay))
  return optax.chain(*parts), lr


def init_state(config, model: nn.Module, tx, key, image_shape) -> TrainState:
  """A fresh state; the EMA and the perceptual copy start equal to the online params."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  params = model.init(key, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
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


def make_train_step(config, model: nn.Module, schedule: diffusion.Schedule, tx, phase: bool):
  """Builds `train_step(state, batch, base_key) -> (state, metrics)`; batch = {'image': NHWC in [-1,1], 'label'}.

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
  cond = conditioning.from_config(config)
  taps = tuple(p_cfg.taps)

  accumulate = int(config.optimizer.accumulate_steps)

  def train_step(state: TrainState, batch, base_key):
    key = jax.random.fold_in(base_key, state.step)
    k_t, k_eps, k_drop_label, k_dropout, k_perceptual = jax.random.split(key, 5)
    x0, labels = batch["image"], batch["label"]
    b = x0.shape[0]
    # Every per-example draw is made for the whole batch first, so that micro-batches (optimizer.accumulate_steps)
    # see exactly the draws of the one full-batch step.
    t = schedule.sample_t(k_t, (b,))
    examples = {
        "x0": x0, "t": t, "eps": jax.random.normal(k_eps, x0.shape, x0.dtype),
        "label": cond.drop(k_drop_label, cond.from_labels(labels), loss_cfg.label_dropout),
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
    params = optax.apply_updates(state.params, updates)

    ema_params = _ema(sampling_ema_decay(config.sampling_ema.decay, state.step), state.ema_params, params)
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
