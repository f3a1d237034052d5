"""Samplers: DDIM, ancestral DDPM, DPM-Solver++(2M) and Heun, each with classifier-free guidance (and its rescale).

A sampler walks a decreasing time grid 1 = t_0 > t_1 > ... > t_N = 0 ("trailing" spacing: the first step starts at
the last training timestep, which matters for zero-terminal-SNR schedules). The model is any
`denoise_fn(x_t, t, y) -> prediction` in the schedule's parameterisation; guidance is applied to that output.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from selfperc_jax import diffusion

SAMPLERS = ("ddim", "ddpm", "dpmpp_2m", "heun")

DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def time_grid(num_steps: int, schedule: diffusion.Schedule):
  """Trailing spacing: N + 1 times from 1 to 0; on the discrete grid when the schedule is discrete."""
  t = jnp.linspace(1.0, 0.0, num_steps + 1)
  if schedule.timesteps:
    t = jnp.round(t * schedule.timesteps) / schedule.timesteps
  return t


def _per_example_std(x):
  return jnp.std(x.reshape(x.shape[0], -1), axis=1).reshape((-1,) + (1,) * (x.ndim - 1))


def guided(denoise_fn: DenoiseFn, guidance_scale: float, null_class: int, rescale: float = 0.0,
           interval: tuple[float, float] = (0.0, 1.0)) -> DenoiseFn:
  """Classifier-free guidance: uncond + s (cond - uncond), both branches in one batched call. s = 1 is unguided.

  rescale (phi, Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4): the
  guided output is scaled per example to the standard deviation of the conditional output, and mixed as
  phi * rescaled + (1 - phi) * guided; phi = 0 is plain guidance. As in that paper's algorithm it acts on the model
  output in its own parameterisation (v for this project's configs).
  interval (t_lo, t_hi): guidance only for t_lo <= t <= t_hi, the conditional output elsewhere (Kynkaanniemi et
  al. 2024 apply guidance only in a middle range of noise levels); (0, 1) guides every step.
  """
  if guidance_scale == 1.0:
    return denoise_fn
  t_lo, t_hi = (float(v) for v in interval)

  def fn(x, t, y):
    both = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, jnp.full_like(y, null_class)]))
    cond, uncond = jnp.split(both, 2)
    out = uncond + guidance_scale * (cond - uncond)
    if rescale:
      rescaled = out * _per_example_std(cond) / jnp.maximum(_per_example_std(out), 1e-12)
      out = rescale * rescaled + (1.0 - rescale) * out
    if (t_lo, t_hi) != (0.0, 1.0):
      inside = ((t >= t_lo) & (t <= t_hi)).reshape((-1,) + (1,) * (x.ndim - 1))
      out = jnp.where(inside, out, cond)
    return out

  return fn


def _x0_eps(denoise_fn, schedule, prediction, x, t, y):
  tb = jnp.full((x.shape[0],), t)
  alpha, sigma = schedule.alpha_sigma(tb)
  return diffusion.to_x0_eps(denoise_fn(x, tb, y), x, alpha, sigma, prediction)


def example_keys(key: jax.Array, num: int) -> jax.Array:
  """Keys of examples 0..num-1 of a draw with `key`: fold_in(key, i), so example i's noise depends on (key, i) only,
  never on the batch it is drawn in."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num, dtype=jnp.uint32))


def _normal(keys, shape, salt: int):
  """One standard normal draw of `shape` per example key, for use `salt` (0: the initial noise, i + 1: step i)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), shape))(keys)


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
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    null_class: int | None = None,
    clip_x0: bool = True,
):
  """Draws len(labels) samples of `shape` (without the batch axis), returned in [-1, 1] when clip_x0 is set.

  key: one key for the whole draw (example i then uses `fold_in(key, i)`), or one key per example (shape (B,)),
  e.g. `fold_in(seed_key, global_index)`: every random number of example i comes from its own key, so a sample does
  not depend on the batch, the chunk or the device it is drawn on.
  Heun (Karras et al. 2022's second-order ODE solver) evaluates the model twice per step: 2 N evaluations.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sample.sampler={sampler!r} is not known; choose one of {SAMPLERS}.")
  if num_steps < 1:
    raise ValueError(f"sample.steps={num_steps} must be at least 1.")
  if schedule.timesteps and num_steps > schedule.timesteps:
    raise ValueError(f"sample.steps={num_steps} is more than the schedule's {schedule.timesteps} timesteps "
                     "(diffusion.timesteps); use at most that many.")
  if guidance_scale != 1.0 and null_class is None:
    raise ValueError("classifier-free guidance needs the model's null class.")
  fn = guided(denoise_fn, guidance_scale, null_class, guidance_rescale, guidance_interval)
  grid = time_grid(num_steps, schedule)
  keys = key if key.shape else example_keys(key, labels.shape[0])
  x = _normal(keys, tuple(shape), 0)

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
      x = _ancestral(schedule, x, x0, t, s, _normal(keys, x.shape[1:], i + 1))
    elif sampler == "heun":
      x = _heun(schedule, predict, x, x0, eps, t, s)
    else:
      x = _dpmpp_2m(schedule, grid, i, x, x0, x0_prev)
    return x, x0

  x, _ = jax.lax.fori_loop(0, num_steps, body, (x, jnp.zeros_like(x)))
  return jnp.clip(x, -1.0, 1.0) if clip_x0 else x


def _heun(schedule, predict, x, x0, eps, t, s):
  """One Heun step (Karras et al. 2022's second-order ODE solver) of the probability-flow ODE written in the angle
  phi = atan2(sigma, alpha) of the variance-preserving schedule, where it reads dx/dphi = alpha eps - sigma x0
  (= v): an Euler step, then the trapezoid of the slopes at both ends. Unlike EDM's sigma / alpha variable, phi stays
  finite at alpha = 0 (t = 1, zero terminal SNR), so the first step is second order too; and so is the last, whose
  second evaluation is at t = 0 (EDM takes an Euler step there instead, which on this project's evenly spaced
  time grid measured 3-6x less accurate on the Gaussian toy)."""
  alpha_t, sigma_t = schedule.alpha_sigma(t)
  alpha_s, sigma_s = schedule.alpha_sigma(s)
  dphi = jnp.arctan2(sigma_s, alpha_s) - jnp.arctan2(sigma_t, alpha_t)
  slope = alpha_t * eps - sigma_t * x0
  x0_s, eps_s = predict(x + dphi * slope, s)
  return x + 0.5 * dphi * (slope + alpha_s * eps_s - sigma_s * x0_s)


def _ancestral(schedule, x, x0, t, s, noise):
  """A draw from the posterior q(x_s | x_t, x0_hat) of the forward process, with standard normal `noise`."""
  alpha_t, sigma_t = schedule.alpha_sigma(t)
  alpha_s, sigma_s = schedule.alpha_sigma(s)
  alpha_ts = alpha_t / jnp.maximum(alpha_s, 1e-12)
  var_ts = jnp.maximum(sigma_t**2 - alpha_ts**2 * sigma_s**2, 0.0)
  mean = (alpha_ts * sigma_s**2 * x + alpha_s * var_ts * x0) / sigma_t**2
  std = jnp.sqrt(var_ts * sigma_s**2) / sigma_t
  return mean + std * noise


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
