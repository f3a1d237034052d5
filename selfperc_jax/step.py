"""The training state and the pure training step. Nothing here knows about devices: `sharding.py` compiles it."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from selfperc_jax import diffusion, losses


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # for sampling
  perceptual_params: Any  # the stop-gradient copy; None when the loss has no perceptual term or shares ema_params


def uses_perceptual(config) -> bool:
  return config.loss.perceptual_weight > 0


def keeps_perceptual_copy(config) -> bool:
  return uses_perceptual(config) and not config.perceptual.share_with_sampling_ema


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
      perceptual_params=params if keeps_perceptual_copy(config) else None,
  )


def perceptual_weight(loss_cfg, step):
  """0 before the start step, then the configured weight, reached through an optional linear ramp."""
  ramp = loss_cfg.perceptual_ramp_steps
  frac = 1.0 if ramp <= 0 else jnp.clip((step - loss_cfg.perceptual_start_step + 1) / ramp, 0.0, 1.0)
  return jnp.where(step >= loss_cfg.perceptual_start_step, loss_cfg.perceptual_weight * frac, 0.0)


def _ema(decay, old, new):
  return jax.tree.map(lambda o, n: decay * o + (1.0 - decay) * n, old, new)


def perceptual_phase(config, step: int) -> bool:
  """Whether training step `step` (0-based) includes the self-perceptual term; decided on the host."""
  return uses_perceptual(config) and step >= config.loss.perceptual_start_step


def make_train_step(config, model: nn.Module, schedule: diffusion.Schedule, tx, perceptual_active: bool):
  """Builds `train_step(state, batch, base_key) -> (state, metrics)`; batch = {'image': NHWC in [-1,1], 'label'}.

  There is one step function per phase, chosen on the host with `perceptual_phase`: the MSE pre-training phase
  (perceptual_active=False) never traces the perceptual copy's forward, and the self-perceptual phase needs no
  runtime branch (a `lax.cond` around the term made the whole step about twice as slow on CPU).
  """
  loss_cfg, prediction = config.loss, config.diffusion.prediction
  with_perceptual = uses_perceptual(config)
  if perceptual_active and not with_perceptual:
    raise ValueError("perceptual_active=True needs loss.perceptual_weight > 0.")
  null_class = config.model.num_classes
  taps = tuple(loss_cfg.perceptual_taps)

  def train_step(state: TrainState, batch, base_key):
    key = jax.random.fold_in(base_key, state.step)
    k_t, k_eps, k_drop_label, k_dropout, k_perceptual = jax.random.split(key, 5)
    x0, labels = batch["image"], batch["label"]
    b = x0.shape[0]
    t = schedule.sample_t(k_t, (b,))
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = diffusion.q_sample(x0, eps, alpha, sigma)
    labels = jnp.where(jax.random.uniform(k_drop_label, (b,)) < loss_cfg.label_dropout, null_class, labels)
    weight = None
    if loss_cfg.min_snr_gamma > 0:
      weight = losses.min_snr_weight(schedule.log_snr(t), prediction, loss_cfg.min_snr_gamma)

    w_sp = perceptual_weight(loss_cfg, state.step) if perceptual_active else jnp.zeros((), jnp.float32)
    # The pre-training phase (before the perceptual term starts) is plain MSE, whatever mse_weight says after it.
    w_mse = loss_cfg.mse_weight if perceptual_active or not with_perceptual else 1.0
    copy_params = state.ema_params if state.perceptual_params is None else state.perceptual_params

    def loss_fn(params):
      pred = model.apply({"params": params}, x_t, t, labels, train=True, rngs={"dropout": k_dropout})
      l_mse = losses.mse_loss(pred, x0, eps, alpha, sigma, prediction, weight)
      if not with_perceptual:
        return w_mse * l_mse, {"loss_mse": l_mse}
      if not perceptual_active:
        return w_mse * l_mse, {"loss_mse": l_mse, "loss_sp": jnp.zeros((), jnp.float32)}
      x0_hat, eps_hat = diffusion.to_x0_eps(pred, x_t, alpha, sigma, prediction)
      frozen = jax.lax.stop_gradient(copy_params)
      features_fn = lambda x, tt, y: model.apply({"params": frozen}, x, tt, y, taps=taps)
      sp_labels = labels if loss_cfg.perceptual_condition == "same" else jnp.full_like(labels, null_class)
      l_sp = losses.self_perceptual_loss(
          features_fn, schedule, k_perceptual, x0, x0_hat, eps, eps_hat, sp_labels,
          noise=loss_cfg.perceptual_noise, t_min=loss_cfg.t_prime_min, t_max=loss_cfg.t_prime_max,
          fused=loss_cfg.get("perceptual_fused", True))
      return w_mse * l_mse + w_sp * l_sp, {"loss_mse": l_mse, "loss_sp": l_sp}

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    ema_decay = jnp.minimum(config.ema.decay, (1.0 + state.step) / (10.0 + state.step))
    perceptual_params = None
    if state.perceptual_params is not None:
      # Tracks the online params exactly until the perceptual term starts, then is an EMA (frozen at decay 1).
      decay = jnp.where(state.step < loss_cfg.perceptual_start_step, 0.0, config.perceptual.ema_decay)
      perceptual_params = _ema(decay, state.perceptual_params, params)

    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema_params=_ema(ema_decay, state.ema_params, params),
        perceptual_params=perceptual_params,
    )
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if config.on_nonfinite == "skip":
      # Keep the state from before this update (only the step counter moves on).
      kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
      new_state = kept.replace(step=state.step + 1)
    metrics = dict(terms, loss=loss, grad_norm=grad_norm, perceptual_weight=w_sp,
                   nonfinite=1.0 - finite.astype(jnp.float32))
    return new_state, metrics

  return train_step
