"""Samplers: DDIM, ancestral DDPM and DPM-Solver++(2M), each with classifier-free guidance.

A sampler walks a decreasing time grid 1 = t_0 > t_1 > ... > t_N = 0 ("trailing" spacing: the first step starts at
the last training timestep, which matters for zero-terminal-SNR schedules). The model is any
`denoise_fn(x_t, t, y) -> prediction` in the schedule's parameterisation; guidance is applied to that output.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from selfperc_jax import diffusion

SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")

DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def time_grid(num_steps: int, schedule: diffusion.Schedule):
  """Trailing spacing: N + 1 times from 1 to 0; on the discrete grid when the schedule is discrete."""
  t = jnp.linspace(1.0, 0.0, num_steps + 1)
  if schedule.timesteps:
    t = jnp.round(t * schedule.timesteps) / schedule.timesteps
  return t


def guided(denoise_fn: DenoiseFn, guidance_scale: float, null_class: int) -> DenoiseFn:
  """Classifier-free guidance: uncond + s (cond - uncond), both branches in one batched call. s = 1 is unguided."""
  if guidance_scale == 1.0:
    return denoise_fn

  def fn(x, t, y):
    both = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, jnp.full_like(y, null_class)]))
    cond, uncond = jnp.split(both, 2)
    return uncond + guidance_scale * (cond - uncond)

  return fn


def _x0_eps(denoise_fn, schedule, prediction, x, t, y):
  tb = jnp.full((x.shape[0],), t)
  alpha, sigma = schedule.alpha_sigma(tb)
  return diffusion.to_x0_eps(denoise_fn(x, tb, y), x, alpha, sigma, prediction)


def sample(
    denoise_fn: DenoiseFn,
    schedule: diffusion.Schedule,
    prediction: str,
    key: jax.Array,
    labels: jax.Array,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddim",
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    clip_x0: bool = True,
):
  """Draws len(labels) samples of `shape` (without the batch axis), returned in [-1, 1] when clip_x0 is set."""
  if sampler not in SAMPLERS:
    raise ValueError(f"sample.sampler={sampler!r} is not known; choose one of {SAMPLERS}.")
  if num_steps < 1:
    raise ValueError(f"sample.steps={num_steps} must be at least 1.")
  if schedule.timesteps and num_steps > schedule.timesteps:
    raise ValueError(f"sample.steps={num_steps} is more than the schedule's {schedule.timesteps} timesteps "
                     "(diffusion.timesteps); use at most that many.")
  if guidance_scale != 1.0 and null_class is None:
    raise ValueError("classifier-free guidance needs the model's null class.")
  fn = guided(denoise_fn, guidance_scale, null_class)
  grid = time_grid(num_steps, schedule)
  key_init, key_steps = jax.random.split(key)
  x = jax.random.normal(key_init, (labels.shape[0],) + tuple(shape))

  def predict(x, t):
    x0, eps = _x0_eps(fn, schedule, prediction, x, t, labels)
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
      alpha, sigma = schedule.alpha_sigma(t)
      # Re-derive eps from the clipped x0 so that the two stay consistent with x_t.
      eps = jnp.where(sigma > 0, (x - alpha * x0) / jnp.maximum(sigma, 1e-12), eps)
    return x0, eps

  def body(i, state):
    x, x0_prev = state
    t, s = grid[i], grid[i + 1]
    x0, eps = predict(x, t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    if sampler == "ddim":
      x = alpha_s * x0 + sigma_s * eps
    elif sampler == "ddpm":
      x = _ancestral(schedule, x, x0, t, s, jax.random.fold_in(key_steps, i))
    else:
      x = _dpmpp_2m(schedule, grid, i, x, x0, x0_prev)
    return x, x0

  x, _ = jax.lax.fori_loop(0, num_steps, body, (x, jnp.zeros_like(x)))
  return jnp.clip(x, -1.0, 1.0) if clip_x0 else x


def _ancestral(schedule, x, x0, t, s, key):
  """A draw from the posterior q(x_s | x_t, x0_hat) of the forward process."""
  alpha_t, sigma_t = schedule.alpha_sigma(t)
  alpha_s, sigma_s = schedule.alpha_sigma(s)
  alpha_ts = alpha_t / jnp.maximum(alpha_s, 1e-12)
  var_ts = jnp.maximum(sigma_t**2 - alpha_ts**2 * sigma_s**2, 0.0)
  mean = (alpha_ts * sigma_s**2 * x + alpha_s * var_ts * x0) / sigma_t**2
  std = jnp.sqrt(var_ts * sigma_s**2) / sigma_t
  return mean + std * jax.random.normal(key, x.shape)


def _lambda(schedule, t):
  alpha, sigma = schedule.alpha_sigma(t)
  return jnp.log(jnp.maximum(alpha, 1e-12)) - jnp.log(jnp.maximum(sigma, 1e-12))


def _dpmpp_2m(schedule, grid, i, x, x0, x0_prev):
  """DPM-Solver++(2M) (Lu et al., 2022): second-order multistep in the data prediction; first order at the ends."""
  t, s = grid[i], grid[i + 1]
  alpha_t, sigma_t = schedule.alpha_sigma(t)
  alpha_s, sigma_s = schedule.alpha_sigma(s)
  # exp(-h) with h = lambda_s - lambda_t, written as a ratio so that alpha_t = 0 or sigma_s = 0 stay finite.
  exp_neg_h = (alpha_t * sigma_s) / jnp.maximum(sigma_t * alpha_s, 1e-12)
  h = _lambda(schedule, s) - _lambda(schedule, t)
  h_prev = _lambda(schedule, t) - _lambda(schedule, grid[jnp.maximum(i - 1, 0)])
  r = h_prev / jnp.maximum(h, 1e-12)
  second_order = (i > 0) & (i < grid.shape[0] - 2)
  coef = jnp.where(second_order, 0.5 / jnp.maximum(r, 1e-12), 0.0)
  d = (1 + coef) * x0 - coef * x0_prev
  return (sigma_s / sigma_t) * x + alpha_s * (1 - exp_neg_h) * d


def make_sampler(apply_fn, schedule: diffusion.Schedule, prediction: str, shape: tuple[int, ...], *, sampler: str,
                 num_steps: int, guidance_scale: float, null_class: int):
  """A jitted `fn(params, key, labels) -> images` for a Flax apply function; compiled once per label count."""

  @jax.jit
  def fn(params, key, labels):
    denoise = lambda x, t, y: apply_fn({"params": params}, x, t, y)
    return sample(denoise, schedule, prediction, key, labels, shape, sampler=sampler, num_steps=num_steps,
                  guidance_scale=guidance_scale, null_class=null_class)

  return fn
