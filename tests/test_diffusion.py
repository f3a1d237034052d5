"""Noise schedules, forward noising and parameterisation conversions, checked against closed forms and numpy."""

import itertools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import device_array
from selfperc_jax import diffusion

ALL_SCHEDULES = [
    diffusion.Schedule(name, timesteps, zts)
    for name, timesteps, zts in itertools.product(diffusion.SCHEDULES, (0, 50, 1000), (False, True))
]


def _ids(schedules):
  return [f"{s.name}-T{s.timesteps}-{'zts' if s.zero_terminal_snr else 'raw'}" for s in schedules]


GRID = 1024  # the length every schedule call below evaluates (the rest is padding)


def _on_the_grid(fn, t):
  """fn (elementwise in t) at the points t, evaluated on one fixed-length float32 array: run eagerly, each of the
  schedule's operations then compiles once for this file, not once for every length of t the tests use."""
  t = np.asarray(t, np.float32)
  padded = np.zeros(GRID, np.float32)
  padded[: t.size] = t.reshape(-1)
  return tuple(np.asarray(out, np.float64)[: t.size].reshape(t.shape) for out in fn(device_array(padded)))


def _alpha_sigma(schedule, t):
  return _on_the_grid(schedule.alpha_sigma, t)


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=_ids(ALL_SCHEDULES))
def test_variance_preserving(schedule):
  t = np.concatenate([np.linspace(0.0, 1.0, 513), np.random.default_rng(0).uniform(0.0, 1.0, 100)])
  alpha, sigma = _alpha_sigma(schedule, t)
  assert alpha.shape == sigma.shape == t.shape
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  assert np.all((alpha >= 0) & (alpha <= 1)) and np.all((sigma >= 0) & (sigma <= 1))


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=_ids(ALL_SCHEDULES))
def test_alpha_decreasing_from_one(schedule):
  t = np.linspace(0.0, 1.0, 401)
  alpha, sigma = _alpha_sigma(schedule, t)
  # Non-increasing everywhere (the cosine clip makes it flat in the last ~3e-5 of t) and strictly decreasing
  # away from t = 1.
  assert np.all(np.diff(alpha) <= 0)
  inner = t <= 0.99
  assert np.all(np.diff(alpha[inner]) < 0)
  assert alpha[0] == pytest.approx(1.0, abs=1e-6)
  assert sigma[0] == pytest.approx(0.0, abs=1e-3)
  # Scalar t gives scalars.
  a0, s0 = schedule.alpha_sigma(0.0)
  assert jnp.shape(a0) == jnp.shape(s0) == ()


def test_continuous_cosine_closed_form():
  s = 0.008
  t = np.linspace(0.0, 0.99, 199)
  alpha, _ = _alpha_sigma(diffusion.Schedule("cosine", 0), t)
  expected = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
  np.testing.assert_allclose(alpha**2, expected, rtol=1e-4, atol=1e-8)


def _improved_ddpm_cosine_alpha_bar(T):
  s = 0.008
  f = lambda i: np.cos((i / T + s) / (1 + s) * np.pi / 2) ** 2
  i = np.arange(T, dtype=np.float64)
  betas = np.minimum(1 - f(i + 1) / f(i), 0.999)
  return np.cumprod(1 - betas)


def test_continuous_cosine_floor_is_the_clipped_last_step():
  """Near t = 1 alpha_bar is held at the 1000-step table's last value (beta clipped at 0.999), never 0."""
  floor = _improved_ddpm_cosine_alpha_bar(1000)[-1]
  assert 1e-10 < floor < 1e-8
  alpha, _ = _alpha_sigma(diffusion.Schedule("cosine", 0), np.array([0.99999, 1.0]))
  np.testing.assert_allclose(alpha**2, floor, rtol=1e-3)


def _numpy_table(name, T=1000):
  """alpha_bar at t = i / T, i = 1..T, from the published beta schedules (independent of the library)."""
  if name == "linear":
    betas = np.linspace(1e-4, 0.02, T)
  elif name == "scaled_linear":
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T) ** 2
  else:
    return _improved_ddpm_cosine_alpha_bar(T)
  return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_discrete_table_matches_numpy(name):
  T = 1000
  i = np.arange(1, T + 1)
  alpha, _ = _alpha_sigma(diffusion.Schedule(name, T), i / T)
  np.testing.assert_allclose(alpha**2, _numpy_table(name, T), rtol=2e-4, atol=1e-10)
  # t = 0 is the clean image.
  alpha0, sigma0 = _alpha_sigma(diffusion.Schedule(name, T), 0.0)
  assert alpha0 == 1.0 and sigma0 == 0.0


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_discrete_table_interpolates_linearly_between_grid_points(name):
  T = 1000
  schedule = diffusion.Schedule(name, T)
  i = np.array([1, 10, 100, 500, 998])
  alpha_lo, _ = _alpha_sigma(schedule, i / T)
  alpha_hi, _ = _alpha_sigma(schedule, (i + 1) / T)
  for w in (0.25, 0.5):
    alpha_mid, _ = _alpha_sigma(schedule, (i + w) / T)
    np.testing.assert_allclose(alpha_mid, (1 - w) * alpha_lo + w * alpha_hi, rtol=1e-4)
  assert np.all(alpha_lo > alpha_hi)


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_continuous_matches_discrete(name):
  """exp(-integral of beta) vs prod(1 - beta): equal up to the O(beta^2) terms, which are small here."""
  t = np.linspace(0.0, 1.0, 1001)
  alpha_c, _ = _alpha_sigma(diffusion.Schedule(name, 0), t)
  alpha_d, _ = _alpha_sigma(diffusion.Schedule(name, 1000), t)
  assert np.max(np.abs(alpha_c - alpha_d)) < 3e-3
  np.testing.assert_allclose(np.log(alpha_c**2), np.log(alpha_d**2), atol=0.1)
  # Independent check of the continuous closed form against numpy's product at the end point.
  np.testing.assert_allclose(alpha_c[-1] ** 2, _numpy_table(name)[-1], rtol=0.1)


ZTS_CASES = [(name, T) for name in diffusion.SCHEDULES for T in (0, 1000)]


@pytest.mark.parametrize("name,timesteps", ZTS_CASES)
def test_zero_terminal_snr(name, timesteps):
  raw = diffusion.Schedule(name, timesteps)
  zts = diffusion.Schedule(name, timesteps, zero_terminal_snr=True)
  a1, s1 = _alpha_sigma(zts, 1.0)
  assert a1 == pytest.approx(0.0, abs=1e-6)
  assert s1 == pytest.approx(1.0, abs=1e-6)
  raw_a1, _ = _alpha_sigma(raw, 1.0)
  assert raw_a1 > 1e-5  # the raw schedule does not reach zero SNR, so the rescale has something to do
  raw_a0, _ = _alpha_sigma(raw, 0.0)
  zts_a0, _ = _alpha_sigma(zts, 0.0)
  assert zts_a0 == pytest.approx(raw_a0, abs=1e-6)
  # The rescaled alpha is an affine function of the raw alpha: fit a line through many (raw, rescaled) pairs.
  t = np.linspace(0.0, 1.0, 23)
  x, _ = _alpha_sigma(raw, t)
  y, _ = _alpha_sigma(zts, t)
  slope, intercept = np.polyfit(x, y, 1)
  np.testing.assert_allclose(slope * x + intercept, y, atol=2e-6)
  assert slope > 1.0 and intercept < 0.0
  # The SNR at t = 1 is (numerically) zero.
  assert float(zts.log_snr(1.0)) < -30


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=_ids(ALL_SCHEDULES))
def test_log_snr_decreasing(schedule):
  t = np.linspace(0.01, 0.99, 99)
  (log_snr,) = _on_the_grid(lambda t: (schedule.log_snr(t),), t)
  assert np.all(np.diff(log_snr) < 0)
  alpha, sigma = _alpha_sigma(schedule, 0.5)
  assert float(schedule.log_snr(0.5)) == pytest.approx(math.log(alpha**2 / sigma**2), abs=1e-4)


def test_schedule_validation():
  with pytest.raises(ValueError):
    diffusion.Schedule("quadratic")
  with pytest.raises(ValueError):
    diffusion.Schedule("cosine", timesteps=-1)
  with pytest.raises(ValueError):
    diffusion.continuous_alpha_bar(0.5, "sigmoid")
  # Valid ones construct, and are hashable values (usable as static jit arguments).
  assert diffusion.Schedule("linear", 1000, True) == diffusion.Schedule("linear", 1000, True)
  assert len({diffusion.Schedule("linear", 1000), diffusion.Schedule("linear", 1000)}) == 1


def test_schedule_is_a_static_jit_argument():
  schedule = diffusion.Schedule("scaled_linear", 1000, True)
  fn = jax.jit(lambda s, t: s.alpha_sigma(t)[0], static_argnums=0)
  t = jnp.linspace(0.0, 1.0, 17)
  np.testing.assert_allclose(np.asarray(fn(schedule, t)), np.asarray(schedule.alpha_sigma(t)[0]), atol=1e-6)


def test_schedule_from_config():
  cfg = types.SimpleNamespace(schedule="linear", timesteps="250", zero_terminal_snr=1)
  assert diffusion.schedule_from_config(cfg) == diffusion.Schedule("linear", 250, True)


# ----------------------------------------------------------------------------------------------------------------
# Forward process and parameterisations
# ----------------------------------------------------------------------------------------------------------------


def _batch(seed=0, shape=(5, 4, 4, 3)):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("schedule", [diffusion.Schedule("cosine", 0), diffusion.Schedule("linear", 1000, True)],
                         ids=["cosine", "linear-zts"])
@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_round_trip(schedule, prediction):
  x0, eps = _batch()
  t = np.array([0.05, 0.3, 0.5, 0.7, 0.9], np.float32)
  alpha, sigma = schedule.alpha_sigma(t)
  assert alpha.shape == (5,)
  a, s = np.asarray(alpha), np.asarray(sigma)
  x_t = np.asarray(diffusion.q_sample(x0, eps, alpha, sigma))
  for b in range(5):  # per-example scalars, broadcast over H, W, C
    np.testing.assert_allclose(x_t[b], a[b] * x0[b] + s[b] * eps[b], rtol=1e-5, atol=1e-6)
  target = np.asarray(diffusion.target_of(x0, eps, alpha, sigma, prediction))
  expected_target = {"v": a[:, None, None, None] * eps - s[:, None, None, None] * x0, "eps": eps, "x0": x0}
  np.testing.assert_allclose(target, expected_target[prediction], rtol=1e-5, atol=1e-6)
  x0_hat, eps_hat = diffusion.to_x0_eps(target, x_t, alpha, sigma, prediction)
  np.testing.assert_allclose(np.asarray(x0_hat), x0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(eps_hat), eps, atol=1e-4)


def test_v_round_trip_at_both_ends():
  """v is well defined at t = 0 (x_t = x0) and at zero terminal SNR (x_t = eps), where eps / x0 targets are not."""
  schedule = diffusion.Schedule("cosine", 0, zero_terminal_snr=True)
  x0, eps = _batch(1, (2, 3, 3, 1))
  alpha, sigma = schedule.alpha_sigma(jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(np.asarray(alpha), [1.0, 0.0], atol=1e-6)
  x_t = diffusion.q_sample(x0, eps, alpha, sigma)
  np.testing.assert_allclose(np.asarray(x_t)[0], x0[0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(x_t)[1], eps[1], atol=1e-6)
  v = diffusion.target_of(x0, eps, alpha, sigma, "v")
  np.testing.assert_allclose(np.asarray(v)[0], eps[0], atol=1e-6)  # v = eps at t = 0
  np.testing.assert_allclose(np.asarray(v)[1], -x0[1], atol=1e-6)  # v = -x0 at alpha = 0
  x0_hat, eps_hat = diffusion.to_x0_eps(v, x_t, alpha, sigma, "v")
  assert np.all(np.isfinite(np.asarray(x0_hat))) and np.all(np.isfinite(np.asarray(eps_hat)))
  np.testing.assert_allclose(np.asarray(x0_hat), x0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(eps_hat), eps, atol=1e-5)


def test_unknown_prediction_rejected():
  x0, eps = _batch(2, (2, 2))
  a, s = jnp.array([0.6, 0.8]), jnp.array([0.8, 0.6])
  with pytest.raises(ValueError):
    diffusion.target_of(x0, eps, a, s, "score")
  with pytest.raises(ValueError):
    diffusion.to_x0_eps(x0, x0, a, s, "score")


# ----------------------------------------------------------------------------------------------------------------
# Training times
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t_min,t_max", [(0.0, 1.0), (0.2, 0.6)])
def test_sample_t_continuous(t_min, t_max):
  t = np.asarray(diffusion.Schedule("cosine", 0).sample_t(jax.random.key(0), (20000,), t_min, t_max))
  assert t.shape == (20000,)
  assert np.all(t >= max(t_min, 1e-5)) and np.all(t <= t_max)
  assert t.mean() == pytest.approx((t_min + t_max) / 2, abs=0.01)
  assert t.std() == pytest.approx((t_max - t_min) / math.sqrt(12), rel=0.03)
  assert len(np.unique(t)) > 19000  # continuous, not on a grid


@pytest.mark.parametrize("t_min,t_max,allowed", [(0.0, 1.0, range(1, 11)), (0.2, 0.6, range(2, 7))])
def test_sample_t_discrete_on_grid(t_min, t_max, allowed):
  T = 10
  t = np.asarray(diffusion.Schedule("linear", T).sample_t(jax.random.key(1), (20000,), t_min, t_max))
  steps = t * T
  np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
  steps = np.round(steps).astype(int)
  assert np.all(t >= t_min - 1e-6) and np.all(t <= t_max + 1e-6)
  assert set(np.unique(steps)) == set(allowed)  # never t = 0; every grid point in [t_min, t_max] is used
  freq = np.bincount(steps, minlength=T + 1)[list(allowed)] / len(steps)
  np.testing.assert_allclose(freq, 1 / len(allowed), atol=0.02)


def test_sample_t_discrete_full_table():
  T = 1000
  t = np.asarray(diffusion.Schedule("scaled_linear", T).sample_t(jax.random.key(2), (4096,)))
  steps = t * T
  np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
  assert steps.min() >= 1 - 1e-3 and steps.max() <= T + 1e-3
  assert len(np.unique(np.round(steps))) > 900


def test_sample_t_discrete_respects_unaligned_t_max():
  t = np.asarray(diffusion.Schedule("cosine", 10).sample_t(jax.random.key(0), (1000,), 0.0, 0.55))
  assert np.all(t <= 0.55)
