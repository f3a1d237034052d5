"""Samplers: DDIM, ancestral DDPM, DPM-Solver++(2M) and Heun, each with classifier-free guidance (and its rescale).

By default a sampler walks a decreasing time grid 1 = t_0 > t_1 > ... > t_N = 0 (the project's "trailing" spacing:
the first step starts at the last training timestep, which matters for zero-terminal-SNR schedules). On a discrete
schedule it can instead take the steps of diffusers' schedulers exactly (`timestep_spacing` 'trailing' / 'leading' /
'linspace', `steps_offset`, `final_step`; see `make_plan`), so that a model trained with diffusers (Stable
Diffusion and its fine-tunes) samples as it does there: tests/test_scheduler_parity.py checks the trajectories of
DDIMScheduler and DPMSolverMultistepScheduler step by step. The model is any `denoise_fn(x_t, t, y) -> prediction`
in the schedule's parameterisation; guidance is applied to that output.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from selfperc_jax import diffusion

SAMPLERS = ("ddim", "ddpm", "dpmpp_2m", "heun")
# 'project': the grid of `time_grid`; the others: diffusers' `timestep_spacing` and step rules (`make_plan`).
TIMESTEP_SPACINGS = ("project", "trailing", "leading", "linspace")
# Where the last step lands: the clean image (t = 0), or the first timestep of the discrete table (t = 1/T; diffusers'
# DDIMScheduler with set_alpha_to_one=False, DPMSolverMultistepScheduler with final_sigmas_type='sigma_min').
FINAL_STEPS = ("clean", "first_timestep")
# diffusers' DPMSolverMultistepScheduler sets alphas_cumprod[-1] to this where it is 0 (zero terminal SNR), so that
# its first sigma is finite: alpha = 2**-12 at t = 1.
DPM_TERMINAL_ALPHA_BAR = 2.0**-24

DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def time_grid(num_steps: int, schedule: diffusion.Schedule):
  """Trailing spacing: N + 1 times from 1 to 0; on the discrete grid when the schedule is discrete."""
  t = jnp.linspace(1.0, 0.0, num_steps + 1)
  if schedule.timesteps:
    t = jnp.round(t * schedule.timesteps) / schedule.timesteps
  return t


class Plan(NamedTuple):
  """The N steps of a run. Step i calls the model at time t[i], where x_t = alpha[i] x0 + sigma[i] eps, and lands at
  t_next[i] (alpha_next[i], sigma_next[i]); second_order[i]: DPM-Solver++(2M)'s step i uses the previous step's
  x0 prediction (else it is first order). In the project's plan and diffusers' DPM-Solver plan t_next[i] = t[i + 1];
  diffusers' DDIM lands at timestep k - T // N, which is not the next visited timestep when N does not divide T."""
  t: jax.Array
  alpha: jax.Array
  sigma: jax.Array
  t_next: jax.Array
  alpha_next: jax.Array
  sigma_next: jax.Array
  second_order: jax.Array


def diffusers_timesteps(sampler: str, num_steps: int, timesteps: int, spacing: str, steps_offset: int = 0):
  """The integer timesteps k (0..T-1, decreasing) that diffusers' `set_timesteps(num_steps)` visits: that of
  DPMSolverMultistepScheduler for 'dpmpp_2m', of DDIMScheduler for the others (DDPMScheduler's rule is the same).
  Written from diffusers 0.42.1's source; the model is called at these, our t = (k + 1) / T."""
  n, T = int(num_steps), int(timesteps)
  dpm = sampler == "dpmpp_2m"
  if spacing == "linspace":
    k = np.linspace(0, T - 1, n + 1).round()[::-1][:-1] if dpm else np.linspace(0, T - 1, n).round()[::-1]
  elif spacing == "leading":
    if dpm:
      k = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + steps_offset
    else:
      k = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
  elif spacing == "trailing":
    k = np.round(np.arange(T, 0, -T / n)) - 1
  else:
    raise ValueError(f"timestep_spacing={spacing!r} is not one of diffusers' ('trailing', 'leading', 'linspace').")
  k = k.astype(np.int64)
  if len(k) != n or np.any(k < 0) or np.any(k > T - 1) or np.any(np.diff(k) >= 0):
    raise ValueError(
        f"diffusers' {spacing!r} spacing gives the timesteps {k.tolist()[:8]}{'...' if len(k) > 8 else ''} "
        f"({len(k)} of them) for sample.steps={n} of {T} (steps_offset={steps_offset}): not {n} distinct "
        "timesteps in [0, T - 1] (a floating-point artefact of its np.arange, or too many steps for the spacing); "
        "choose another step count.")
  return k


def make_plan(num_steps: int, schedule: diffusion.Schedule, sampler: str = "ddim", timestep_spacing: str = "project",
              steps_offset: int = 0, final_step: str = "clean") -> Plan:
  """The steps of `sample`.

  'project': the N + 1 points of `time_grid`, each step to the next (the last to t = 0, or to t = 1/T with
  final_step='first_timestep').
  'trailing' / 'leading' / 'linspace' (discrete schedules): diffusers' rules, for a model trained with diffusers'
  scheduler configs. The model is called at the timesteps of `diffusers_timesteps` (steps_offset counts with
  'leading' only, as in diffusers), at t = (k + 1) / T, with alpha and sigma read exactly off the table.
  ddim, ddpm, heun follow DDIMScheduler: step k lands at k - T // N, and where that is below 0 at final_step
  ('clean': set_alpha_to_one=True; 'first_timestep': alphas_cumprod[0], set_alpha_to_one=False).
  dpmpp_2m follows DPMSolverMultistepScheduler (algorithm_type 'dpmsolver++', solver_order 2, solver_type
  'midpoint', lower_order_final=True, euler_at_final=False): each step lands at the next visited timestep, the last
  at final_step ('clean': final_sigmas_type='zero'; 'first_timestep': 'sigma_min'); the first step is first order,
  and so is the last unless final_sigmas_type='sigma_min' with at least 15 steps; on a zero-terminal-SNR schedule
  alpha_bar at t = 1 is 2**-24 instead of 0, as there.
  Parity with diffusers is checked for ddim and dpmpp_2m (tests/test_scheduler_parity.py); ddpm's rule is
  DDPMScheduler's, whose posterior variance `_ancestral` also uses (its noise differs); heun has no diffusers
  counterpart and takes ddim's steps.
  """
  n, T = int(num_steps), int(schedule.timesteps)
  if timestep_spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f"sample.timestep_spacing={timestep_spacing!r} is not known; choose one of {TIMESTEP_SPACINGS}.")
  if final_step not in FINAL_STEPS:
    raise ValueError(f"sample.final_step={final_step!r} is not known; choose one of {FINAL_STEPS}.")
  if not T and (timestep_spacing != "project" or final_step != "clean"):
    raise ValueError(f"sample.timestep_spacing={timestep_spacing!r} and sample.final_step={final_step!r} need a "
                     "discrete schedule (diffusion.timesteps > 0); a continuous one takes 'project' and 'clean'.")
  steps = jnp.arange(n)
  if timestep_spacing == "project":
    grid = time_grid(n, schedule)
    if final_step == "first_timestep":
      grid = grid.at[-1].set(1.0 / T)
    alpha, sigma = schedule.alpha_sigma(grid)
    return Plan(grid[:-1], alpha[:-1], sigma[:-1], grid[1:], alpha[1:], sigma[1:],
                (steps > 0) & (steps < n - 1))
  k = diffusers_timesteps(sampler, n, T, timestep_spacing, int(steps_offset))
  alpha_bar = schedule.alpha_bar_table()  # index k + 1 is diffusers' alphas_cumprod[k]; index 0 the clean image
  final = 0 if final_step == "clean" else 1
  if sampler == "dpmpp_2m":
    if schedule.zero_terminal_snr:
      alpha_bar = alpha_bar.copy()
      alpha_bar[-1] = DPM_TERMINAL_ALPHA_BAR
    target = np.append(k[1:] + 1, final)
    last_second_order = final_step == "first_timestep" and n >= 15
    second_order = (steps > 0) & ((steps < n - 1) | last_second_order)
  else:
    prev = k - T // n
    target = np.where(prev >= 0, prev + 1, final)
    second_order = jnp.zeros((n,), bool)
  f32 = lambda a: jnp.asarray(np.asarray(a, np.float64), jnp.float32)
  index = k + 1
  return Plan(f32(index / T), f32(np.sqrt(alpha_bar[index])), f32(np.sqrt(1.0 - alpha_bar[index])),
              f32(target / T), f32(np.sqrt(alpha_bar[target])), f32(np.sqrt(1.0 - alpha_bar[target])), second_order)


def _per_example_std(x):
  return jnp.std(x.reshape(x.shape[0], -1), axis=1).reshape((-1,) + (1,) * (x.ndim - 1))


def guided(denoise_fn: DenoiseFn, guidance_scale: float, null_class, rescale: float = 0.0,
           interval: tuple[float, float] = (0.0, 1.0)) -> DenoiseFn:
  """Classifier-free guidance: uncond + s (cond - uncond), both branches in one batched call. s = 1 is unguided.

  null_class: the unconditional input (conditioning.Conditioning.guidance_null), broadcast to each example's
  condition: the null class, or the empty (or negative) prompt's (L, D) embedding.

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
    both = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, _broadcast_null(null_class, y)]))
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


def _broadcast_null(null, y):
  return jnp.broadcast_to(jnp.asarray(null, y.dtype), y.shape)


def _x0_eps(denoise_fn, prediction, x, t, alpha, sigma, y):
  full = lambda v: jnp.full((x.shape[0],), v)
  return diffusion.to_x0_eps(denoise_fn(x, full(t), y), x, full(alpha), full(sigma), prediction)


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
    null_class=None,
    clip_x0: bool = True,
    timestep_spacing: str = "project",
    steps_offset: int = 0,
    final_step: str = "clean",
    initial_noise: jax.Array | None = None,
):
  """Draws len(labels) samples of `shape` (without the batch axis), returned in [-1, 1] when clip_x0 is set.

  key: one key for the whole draw (example i then uses `fold_in(key, i)`), or one key per example (shape (B,)),
  e.g. `fold_in(seed_key, global_index)`: every random number of example i comes from its own key, so a sample does
  not depend on the batch, the chunk or the device it is drawn on.
  Heun (Karras et al. 2022's second-order ODE solver) evaluates the model twice per step: 2 N evaluations.
  timestep_spacing, steps_offset, final_step: where the steps go (`make_plan`); the defaults are the project's grid.
  initial_noise: the x_T to start from, (B,) + shape, instead of the keys' draw (e.g. another implementation's
  starting latents); the keys still draw the ancestral sampler's noise.
  clip_x0 clips each x0 prediction to [-1, 1], re-derives eps from it, and clips the result; diffusers'
  clip_sample=True clips x0 alone (not eps, not the result): no counterpart here. Latents want clip_x0=False.
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
  plan = make_plan(num_steps, schedule, sampler, timestep_spacing, steps_offset, final_step)
  keys = key if key.shape else example_keys(key, labels.shape[0])
  if initial_noise is None:
    x = _normal(keys, tuple(shape), 0)
  else:
    x = jnp.asarray(initial_noise, jnp.float32)
    if x.shape != (labels.shape[0],) + tuple(shape):
      raise ValueError(f"initial_noise has the shape {x.shape}, not {(labels.shape[0],) + tuple(shape)}.")

  def predict(x, t, alpha, sigma):
    x0, eps = _x0_eps(fn, prediction, x, t, alpha, sigma, labels)
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
      # Re-derive eps from the clipped x0 so that the two stay consistent with x_t.
      eps = jnp.where(sigma > 0, (x - alpha * x0) / jnp.maximum(sigma, 1e-12), eps)
    return x0, eps

  def body(i, state):
    x, x0_prev = state
    t, alpha_t, sigma_t = plan.t[i], plan.alpha[i], plan.sigma[i]
    s, alpha_s, sigma_s = plan.t_next[i], plan.alpha_next[i], plan.sigma_next[i]
    x0, eps = predict(x, t, alpha_t, sigma_t)
    if sampler == "ddim":
      x = alpha_s * x0 + sigma_s * eps
    elif sampler == "ddpm":
      x = _ancestral(alpha_t, sigma_t, alpha_s, sigma_s, x, x0, _normal(keys, x.shape[1:], i + 1))
    elif sampler == "heun":
      x = _heun(lambda x: predict(x, s, alpha_s, sigma_s), x, x0, eps, alpha_t, sigma_t, alpha_s, sigma_s)
    else:
      j = jnp.maximum(i - 1, 0)
      x = _dpmpp_2m(alpha_t, sigma_t, alpha_s, sigma_s, plan.alpha[j], plan.sigma[j], plan.second_order[i], x, x0,
                    x0_prev)
    return x, x0

  x, _ = jax.lax.fori_loop(0, num_steps, body, (x, jnp.zeros_like(x)))
  return jnp.clip(x, -1.0, 1.0) if clip_x0 else x


def _heun(predict_s, x, x0, eps, alpha_t, sigma_t, alpha_s, sigma_s):
  """One Heun step (Karras et al. 2022's second-order ODE solver) of the probability-flow ODE written in the angle
  phi = atan2(sigma, alpha) of the variance-preserving schedule, where it reads dx/dphi = alpha eps - sigma x0
  (= v): an Euler step, then the trapezoid of the slopes at both ends. Unlike EDM's sigma / alpha variable, phi stays
  finite at alpha = 0 (t = 1, zero terminal SNR), so the first step is second order too; and so is the last, whose
  second evaluation is at t = 0 (EDM takes an Euler step there instead, which on this project's evenly spaced
  time grid measured 3-6x less accurate on the Gaussian toy). predict_s(x) is (x0, eps) at the step's end."""
  dphi = jnp.arctan2(sigma_s, alpha_s) - jnp.arctan2(sigma_t, alpha_t)
  slope = alpha_t * eps - sigma_t * x0
  x0_s, eps_s = predict_s(x + dphi * slope)
  return x + 0.5 * dphi * (slope + alpha_s * eps_s - sigma_s * x0_s)


def _ancestral(alpha_t, sigma_t, alpha_s, sigma_s, x, x0, noise):
  """A draw from the posterior q(x_s | x_t, x0_hat) of the forward process, with standard normal `noise`."""
  alpha_ts = alpha_t / jnp.maximum(alpha_s, 1e-12)
  var_ts = jnp.maximum(sigma_t**2 - alpha_ts**2 * sigma_s**2, 0.0)
  mean = (alpha_ts * sigma_s**2 * x + alpha_s * var_ts * x0) / sigma_t**2
  std = jnp.sqrt(var_ts * sigma_s**2) / sigma_t
  return mean + std * noise


def _lambda(alpha, sigma):
  return jnp.log(jnp.maximum(alpha, 1e-12)) - jnp.log(jnp.maximum(sigma, 1e-12))


def _dpmpp_2m(alpha_t, sigma_t, alpha_s, sigma_s, alpha_prev, sigma_prev, second_order, x, x0, x0_prev):
  """DPM-Solver++(2M) (Lu et al., 2022; the 'midpoint' form) from t to s: second-order multistep in the data
  prediction where `second_order` (with the previous step's x0_prev at alpha_prev, sigma_prev), else first order."""
  # exp(-h) with h = lambda_s - lambda_t, written as a ratio so that alpha_t = 0 or sigma_s = 0 stay finite.
  exp_neg_h = (alpha_t * sigma_s) / jnp.maximum(sigma_t * alpha_s, 1e-12)
  h = _lambda(alpha_s, sigma_s) - _lambda(alpha_t, sigma_t)
  h_prev = _lambda(alpha_t, sigma_t) - _lambda(alpha_prev, sigma_prev)
  r = h_prev / jnp.maximum(h, 1e-12)
  coef = jnp.where(second_order, 0.5 / jnp.maximum(r, 1e-12), 0.0)
  d = (1 + coef) * x0 - coef * x0_prev
  return (sigma_s / sigma_t) * x + alpha_s * (1 - exp_neg_h) * d
