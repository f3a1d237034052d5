"""Diffusion math: noise schedules, forward noising and conversions between parameterisations.

Time runs over t in [0, 1] (t = 0 clean, t = 1 pure noise) for every schedule. A *discrete* schedule with T
timesteps is the DDPM table alpha_bar[i] = prod_{j<=i} (1 - beta_j), placed at t = i / T (i = 1..T, with t = 0
the clean image), and is linearly interpolated between grid points; a *continuous* schedule (T = 0) uses the
closed form of the same family. All processes are variance preserving: alpha_t**2 + sigma_t**2 = 1.

diffusers' schedulers index the same table by k = 0..T-1 (`alphas_cumprod[k]`, betas from the same formulas), so
diffusers' timestep k is this module's t = (k + 1) / T, and a model trained with diffusers is called with the
timestep round(t T) - 1 (tests/test_scheduler_parity.py checks both tables against diffusers').

Everything here is a pure function of arrays, so it can be jitted, vmapped and tested against closed forms.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("cosine", "linear", "scaled_linear")
PREDICTIONS = ("v", "eps", "x0")
# Which alpha the zero-terminal-SNR rescale keeps (see Schedule.zero_snr_anchor).
ZERO_SNR_ANCHORS = ("clean", "first_timestep")

# DDPM / Stable Diffusion endpoints of beta, defined for a 1000-step process.
_LINEAR_BETAS = (1e-4, 2e-2)
_SCALED_LINEAR_BETAS = (0.00085, 0.012)
_REFERENCE_STEPS = 1000
_COSINE_OFFSET = 0.008
# Keeps alpha > 0 at t = 1 for schedules that are not rescaled to zero terminal SNR (the improved-DDPM clip).
_MAX_BETA = 0.999


def _cosine_alpha_bar(t):
  s = _COSINE_OFFSET
  f = lambda u: jnp.cos((u + s) / (1 + s) * jnp.pi / 2) ** 2
  return f(t) / f(jnp.zeros_like(t))


def _beta_integral(t, name):
  """Integral of T_ref * beta(u) du from 0 to t, with beta interpolated linearly (or in sqrt) over [0, 1]."""
  if name == "linear":
    b0, b1 = _LINEAR_BETAS
    return _REFERENCE_STEPS * (b0 * t + 0.5 * (b1 - b0) * t**2)
  r0, r1 = (math.sqrt(b) for b in _SCALED_LINEAR_BETAS)
  return _REFERENCE_STEPS * ((r0 + (r1 - r0) * t) ** 3 - r0**3) / (3 * (r1 - r0))


def continuous_alpha_bar(t, name):
  """Closed-form alpha_bar(t) = alpha_t**2 of a schedule family, t in [0, 1]."""
  t = jnp.asarray(t, jnp.float32)
  if name == "cosine":
    # The improved-DDPM clip of beta at 0.999, in continuous form: alpha_bar never falls below its value at
    # the last step of the 1000-step table.
    return jnp.maximum(_cosine_alpha_bar(t), _discrete_alpha_bar_np("cosine", _REFERENCE_STEPS)[-1])
  if name in ("linear", "scaled_linear"):
    return jnp.exp(-_beta_integral(t, name))
  raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")


def _discrete_betas_np(name, timesteps):
  i = np.arange(timesteps, dtype=np.float64)
  if name == "linear":
    scale = _REFERENCE_STEPS / timesteps  # keeps the same overall noise when T differs from 1000
    b0, b1 = _LINEAR_BETAS
    return np.linspace(b0 * scale, b1 * scale, timesteps)
  if name == "scaled_linear":
    scale = _REFERENCE_STEPS / timesteps
    b0, b1 = _SCALED_LINEAR_BETAS
    return np.linspace(math.sqrt(b0 * scale), math.sqrt(b1 * scale), timesteps) ** 2
  if name == "cosine":
    s = _COSINE_OFFSET
    f = lambda u: np.cos((u / timesteps + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1 - f(i + 1) / f(i), _MAX_BETA)
  raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")


def _discrete_alpha_bar_np(name, timesteps):
  """alpha_bar at t = 0, 1/T, ..., 1 (length T + 1, first entry 1)."""
  return np.concatenate([[1.0], np.cumprod(1.0 - _discrete_betas_np(name, timesteps))])


def _rescaled_first_timestep_alpha_np(name, timesteps):
  """sqrt(alpha_bar) at t = 0, 1/T, ..., 1 with Lin et al.'s Algorithm 1 applied to the T-step table (t = 1/T .. 1):
  shifted and scaled so that alpha(1) = 0 and alpha(1/T) keeps its value, as diffusers' `rescale_betas_zero_snr`
  does; the clean image t = 0 keeps alpha = 1."""
  alpha = np.sqrt(_discrete_alpha_bar_np(name, timesteps))
  first, last = alpha[1], alpha[-1]
  alpha[1:] = (alpha[1:] - last) * first / (first - last)
  alpha[-1] = 0.0
  return alpha


def rescale_zero_terminal_snr(alpha_fn):
  """Shifts and scales sqrt(alpha_bar) so that alpha(1) = 0 while alpha(0) is unchanged (Lin et al., 2023)."""
  a0, a1 = alpha_fn(jnp.float32(0.0)), alpha_fn(jnp.float32(1.0))
  return lambda t: (alpha_fn(t) - a1) * a0 / (a0 - a1)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A variance-preserving noise schedule. Hashable, so it can be a static argument of jitted functions."""

  name: str = "cosine"
  timesteps: int = 0  # 0: continuous time; T > 0: the discrete T-step DDPM table
  zero_terminal_snr: bool = False
  # Which alpha the zero-terminal-SNR rescale keeps: 'clean' alpha(0) = 1 (the project's own, any schedule);
  # 'first_timestep' alpha(1/T), the first entry of the T-step table (Lin et al.'s Algorithm 1 on the discrete
  # table, as diffusers' rescale_betas_zero_snr does; discrete schedules with zero_terminal_snr only). The two
  # differ most near t = 0: with scaled_linear, T = 1000, sigma(1/T) is 0.0302 vs diffusers' 0.0292.
  zero_snr_anchor: str = "clean"

  def __post_init__(self):
    if self.name not in SCHEDULES:
      raise ValueError(f"diffusion.schedule={self.name!r} is not known; choose one of {SCHEDULES}.")
    if self.timesteps < 0:
      raise ValueError(f"diffusion.timesteps={self.timesteps} must be 0 (continuous) or a positive step count.")
    if self.zero_snr_anchor not in ZERO_SNR_ANCHORS:
      raise ValueError(f"diffusion.zero_snr_anchor={self.zero_snr_anchor!r} is not known; choose one of "
                       f"{ZERO_SNR_ANCHORS}.")
    if self.zero_snr_anchor == "first_timestep" and not (self.timesteps and self.zero_terminal_snr):
      raise ValueError("diffusion.zero_snr_anchor='first_timestep' needs a discrete schedule (diffusion.timesteps > "
                       "0) rescaled to zero terminal SNR (diffusion.zero_terminal_snr=True).")

  def _raw_alpha(self, t):
    if self.timesteps == 0:
      return jnp.sqrt(continuous_alpha_bar(t, self.name))
    if self.zero_snr_anchor == "first_timestep":
      table = _rescaled_first_timestep_alpha_np(self.name, self.timesteps)
    else:
      table = np.sqrt(_discrete_alpha_bar_np(self.name, self.timesteps))
    grid = jnp.linspace(0.0, 1.0, self.timesteps + 1)
    return jnp.interp(jnp.asarray(t, jnp.float32), grid, jnp.asarray(table, jnp.float32))

  def alpha_bar_table(self) -> np.ndarray:
    """alpha_bar at t = 0, 1/T, ..., 1 in float64 (length T + 1, first entry 1), rescaled as alpha_sigma is: the
    exact values at the grid points (diffusers' alphas_cumprod[k] is entry k + 1). Discrete schedules only."""
    if not self.timesteps:
      raise ValueError("a continuous schedule (timesteps=0) has no table.")
    if not self.zero_terminal_snr:
      return _discrete_alpha_bar_np(self.name, self.timesteps)
    if self.zero_snr_anchor == "first_timestep":
      return _rescaled_first_timestep_alpha_np(self.name, self.timesteps) ** 2
    alpha = np.sqrt(_discrete_alpha_bar_np(self.name, self.timesteps))
    return ((alpha - alpha[-1]) * alpha[0] / (alpha[0] - alpha[-1])) ** 2

  def alpha_sigma(self, t):
    """(alpha_t, sigma_t) with the shape of t."""
    alpha_fn = self._raw_alpha
    if self.zero_terminal_snr and self.zero_snr_anchor == "clean":
      alpha_fn = rescale_zero_terminal_snr(alpha_fn)
    alpha = jnp.clip(alpha_fn(jnp.asarray(t, jnp.float32)), 0.0, 1.0)
    return alpha, jnp.sqrt(jnp.maximum(1.0 - alpha**2, 0.0))

  def log_snr(self, t):
    alpha, sigma = self.alpha_sigma(t)
    return 2 * (jnp.log(jnp.maximum(alpha, 1e-20)) - jnp.log(jnp.maximum(sigma, 1e-20)))

  def sample_t(self, key, shape, t_min=0.0, t_max=1.0):
    """Training times: uniform on [t_min, t_max]; for a discrete schedule, uniform over its grid points
    {1/T, ..., 1} that lie in [t_min, t_max] (the nearest one if none does)."""
    if self.timesteps == 0:
      # Exactly t = 0 carries no information to learn; keep a tiny margin.
      return jnp.maximum(jax.random.uniform(key, shape, minval=t_min, maxval=t_max), 1e-5)
    first = max(1, math.ceil(t_min * self.timesteps - 1e-6))
    last = max(first, min(self.timesteps, math.floor(t_max * self.timesteps + 1e-6)))
    return jax.random.randint(key, shape, first, last + 1).astype(jnp.float32) / self.timesteps


def _bcast(a, x):
  """Reshapes per-example scalars (B,) to broadcast against x (B, ...)."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def q_sample(x0, eps, alpha, sigma):
  """x_t = alpha x0 + sigma eps, with per-example alpha, sigma of shape (B,)."""
  return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps


def target_of(x0, eps, alpha, sigma, prediction):
  """The regression target of a parameterisation (v = alpha eps - sigma x0, eps, or x0); inverts `to_x0_eps`."""
  if prediction == "v":
    return _bcast(alpha, x0) * eps - _bcast(sigma, x0) * x0
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def to_x0_eps(pred, x_t, alpha, sigma, prediction):
  """(x0_hat, eps_hat) from a model output in the given parameterisation."""
  a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
  if prediction == "v":
    return a * x_t - s * pred, s * x_t + a * pred
  if prediction == "eps":
    return (x_t - s * pred) / a, pred
  if prediction == "x0":
    return pred, (x_t - a * pred) / s
  raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def schedule_from_config(cfg) -> Schedule:
  # zero_snr_anchor: 'clean' where the config has no such key (configs older than the key).
  return Schedule(name=cfg.schedule, timesteps=int(cfg.timesteps), zero_terminal_snr=bool(cfg.zero_terminal_snr),
                  zero_snr_anchor=str(getattr(cfg, "zero_snr_anchor", "clean")))
