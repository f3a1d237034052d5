"""Samplers on Gaussian toy data, whose optimal denoiser (and so the exact answer) is known in closed form."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfperc_jax import diffusion, samplers

MU, SD = 0.3, 0.5  # x0 ~ N(MU, SD^2), independently per dimension
SHAPE = (4, 4, 1)  # a small NHWC image
NUM = 4096  # samples per run: 4096 x 16 values, so the std of the sample std is ~0.3%

COSINE = diffusion.Schedule("cosine", 0)
COSINE_ZTS_T1000 = diffusion.Schedule("cosine", 1000, zero_terminal_snr=True)
LINEAR_ZTS = diffusion.Schedule("linear", 0, zero_terminal_snr=True)
LINEAR_T1000 = diffusion.Schedule("linear", 1000)
SCALED_LINEAR_ZTS_T1000 = diffusion.Schedule("scaled_linear", 1000, zero_terminal_snr=True)


def gaussian_denoiser(schedule, prediction, mu=MU, sd=SD):
  """The optimal model for x0 ~ N(mu, sd^2): E[x0 | x_t] = mu + alpha sd^2 / (alpha^2 sd^2 + sigma^2) (x_t - alpha mu).

  `mu` and `sd` may be arrays indexed by the class label y (a class-conditional toy).
  """

  def fn(x, t, y):
    alpha, sigma = schedule.alpha_sigma(t)
    expand = lambda a: a.reshape(a.shape + (1,) * (x.ndim - 1))
    a, s = expand(alpha), expand(sigma)
    m = expand(jnp.asarray(mu)[y]) if jnp.ndim(mu) else mu
    d = expand(jnp.asarray(sd)[y]) if jnp.ndim(sd) else sd
    var = a**2 * d**2 + s**2
    x0 = m + a * d**2 / var * (x - a * m)
    if prediction == "x0":
      return x0
    if prediction == "eps":
      # (x_t - alpha x0_hat) / sigma, simplified so that it stays finite (-> 0) at sigma = 0, as the v form below.
      return s * (x - a * m) / var
    # to_x0_eps uses x0 = alpha x_t - sigma v, so v = (alpha x_t - x0) / sigma. With alpha^2 + sigma^2 = 1 this
    # simplifies to the form below, which stays finite at sigma = 0.
    return s * (a * (1 - d**2) * x - m) / var

  return fn


def compiled_sample(fn, schedule, prediction, key, labels, shape, **kwargs):
  """samplers.sample compiled whole, as generate.py runs it: one program, where an eager call compiles each of the
  operations around its loop on its own (and again for every new shape)."""
  return jax.jit(lambda key, labels: samplers.sample(fn, schedule, prediction, key, labels, shape, **kwargs))(
      key, labels)


def draw(schedule, prediction, sampler, num_steps, *, num=NUM, key=0, **kwargs):
  labels = jnp.zeros((num,), jnp.int32)
  x = compiled_sample(gaussian_denoiser(schedule, prediction), schedule, prediction, jax.random.key(key), labels,
                      SHAPE, sampler=sampler, num_steps=num_steps, clip_x0=False, **kwargs)
  x = np.asarray(x)
  assert x.shape == (num,) + SHAPE
  assert np.all(np.isfinite(x))
  return x


def test_v_form_of_the_toy_denoiser():
  """The simplified v above is (alpha x_t - x0_hat) / sigma and inverts through to_x0_eps."""
  schedule = COSINE
  t = jnp.array([0.1, 0.4, 0.8])
  x = jax.random.normal(jax.random.key(3), (3,) + SHAPE)
  y = jnp.zeros((3,), jnp.int32)
  alpha, sigma = schedule.alpha_sigma(t)
  x0_direct = gaussian_denoiser(schedule, "x0")(x, t, y)
  v = gaussian_denoiser(schedule, "v")(x, t, y)
  a, s = alpha[:, None, None, None], sigma[:, None, None, None]
  np.testing.assert_allclose(np.asarray(v), np.asarray((a * x - x0_direct) / s), atol=1e-5)
  x0_hat, _ = diffusion.to_x0_eps(v, x, alpha, sigma, "v")
  np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0_direct), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Time grid
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 2, 7, 50, 250])
def test_time_grid_continuous(num_steps):
  grid = np.asarray(samplers.time_grid(num_steps, COSINE))
  assert grid.shape == (num_steps + 1,)
  assert grid[0] == 1.0 and grid[-1] == 0.0
  assert np.all(np.diff(grid) < 0)
  np.testing.assert_allclose(np.diff(grid), -1.0 / num_steps, atol=1e-6)  # evenly spaced


_time_grid = jax.jit(samplers.time_grid, static_argnums=(0, 1))  # one program per grid (eagerly, one per operation)


def _check_discrete_grid(num_steps, T):
  grid = np.asarray(_time_grid(num_steps, diffusion.Schedule("linear", T)), np.float64)
  assert grid.shape == (num_steps + 1,)
  assert grid[0] == 1.0 and grid[-1] == 0.0
  assert np.all(np.diff(grid) < 0), (num_steps, T)
  steps = grid * T
  np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
  # Each point is the grid point nearest to the even spacing.
  np.testing.assert_allclose(steps, np.linspace(T, 0, num_steps + 1), atol=0.5 + 1e-3)


def test_time_grid_discrete_many_step_counts():
  for num_steps in (1, 2, 3, 4, 6, 7, 9, 13, 17, 23, 33, 49, 50):
    _check_discrete_grid(num_steps, 50)


@pytest.mark.parametrize("num_steps", [1, 3, 7, 10, 30, 333, 999, 1000])
def test_time_grid_discrete_t1000(num_steps):
  _check_discrete_grid(num_steps, 1000)


# ----------------------------------------------------------------------------------------------------------------
# Sampling the Gaussian toy
# ----------------------------------------------------------------------------------------------------------------

MOMENT_CASES = [
    # schedule, prediction, sampler, steps, tolerance on std / SD - 1
    (COSINE, "v", "ddim", 100, 0.03),
    (COSINE, "v", "dpmpp_2m", 50, 0.02),
    (COSINE, "v", "ddpm", 200, 0.04),
    (COSINE, "eps", "dpmpp_2m", 50, 0.02),
    (COSINE, "x0", "dpmpp_2m", 50, 0.02),
    (COSINE_ZTS_T1000, "v", "ddim", 100, 0.03),
    (COSINE_ZTS_T1000, "v", "dpmpp_2m", 50, 0.02),
    (COSINE_ZTS_T1000, "v", "ddpm", 200, 0.04),
    (LINEAR_ZTS, "v", "dpmpp_2m", 50, 0.02),
    (LINEAR_T1000, "eps", "dpmpp_2m", 50, 0.02),
    (COSINE, "v", "heun", 25, 0.02),
    (COSINE_ZTS_T1000, "v", "heun", 25, 0.02),
    (LINEAR_T1000, "eps", "heun", 25, 0.02),
]


def _moment_case(schedule, prediction, sampler, num_steps, std_tol):
  # The fast subset keeps the deterministic samplers on the cosine schedule, each once, with two prediction types
  # (v and eps); ancestral sampling, the x0 prediction and the other schedules are `slow` here (the fast subset
  # still runs DDPM's update and the zero-terminal-SNR schedule in test_one_step_from_zero_snr_gives_the_data_mean,
  # the x0 prediction in test_guidance_end_to_end_on_class_conditional_toy).
  fast = schedule is COSINE and (sampler, prediction) in (("ddim", "v"), ("dpmpp_2m", "eps"), ("heun", "v"))
  return pytest.param(schedule, prediction, sampler, num_steps, std_tol, marks=() if fast else pytest.mark.slow,
                      id=f"{schedule.name}-T{schedule.timesteps}{'-zts' if schedule.zero_terminal_snr else ''}-"
                         f"{prediction}-{sampler}-{num_steps}")


@pytest.mark.parametrize("schedule,prediction,sampler,num_steps,std_tol", [_moment_case(*c) for c in MOMENT_CASES])
def test_reproduces_gaussian_moments(schedule, prediction, sampler, num_steps, std_tol):
  x = draw(schedule, prediction, sampler, num_steps)
  assert x.mean() == pytest.approx(MU, abs=0.02)
  assert x.std() / SD == pytest.approx(1.0, abs=std_tol)
  # No cross-dimension structure is invented: per-pixel means agree with the data mean too.
  assert np.max(np.abs(x.mean(axis=0) - MU)) < 0.05


@pytest.mark.parametrize("schedule", [pytest.param(COSINE, id="cosine"), pytest.param(LINEAR_T1000, id="linear-T1000"),
                                      pytest.param(SCALED_LINEAR_ZTS_T1000, id="scaled_linear-T1000-zts",
                                                   marks=pytest.mark.slow)])
def test_dpmpp_2m_at_least_as_accurate_as_ddim_at_few_steps(schedule):
  """Second order vs first order at 10 steps: both start from the same noise, so the comparison is paired."""
  err = {m: abs(draw(schedule, "v", m, 10).std() / SD - 1) for m in ("ddim", "dpmpp_2m")}
  assert err["ddim"] > 0.1  # 10 steps are few enough that DDIM is visibly off ...
  assert err["dpmpp_2m"] < err["ddim"]  # ... and the multistep solver is closer


@functools.lru_cache(maxsize=None)
def _initial_noise(key, num):
  """The x_T that `sample` starts from for (key, num), read back through a closed form.

  One DDIM step from t = 1 to t = 0 returns x0_hat(x_T) = MU + c (x_T - alpha_1 MU), with c = alpha_1 SD^2 /
  (alpha_1^2 SD^2 + sigma_1^2); the raw scaled_linear schedule has the largest alpha_1 (~0.07), so inverting it
  loses little precision. The noise is drawn from the key alone, whatever the schedule.
  """
  schedule = diffusion.Schedule("scaled_linear", 0)
  a1, s1 = (float(v) for v in schedule.alpha_sigma(1.0))
  c = a1 * SD**2 / (a1**2 * SD**2 + s1**2)
  x = draw(schedule, "v", "ddim", 1, num=num, key=key).astype(np.float64)
  return (x - MU) / c + a1 * MU


def _exact_flow(schedule, x_T):
  """The probability-flow ODE from t = 1 to 0 keeps z = (x_t - alpha MU) / sqrt(alpha^2 SD^2 + sigma^2) fixed."""
  a1, s1 = (float(v) for v in schedule.alpha_sigma(1.0))
  return MU + SD * (x_T - a1 * MU) / np.sqrt(a1**2 * SD**2 + s1**2)


def test_initial_noise_is_standard_normal():
  x_T = _initial_noise(0, 64)
  assert x_T.shape == (64,) + SHAPE
  assert abs(x_T.mean()) < 0.1 and abs(x_T.std() - 1) < 0.1


# The fast subset keeps the two continuous schedules (one of them zero-terminal-SNR); the discrete T = 1000 grids
# are `slow` here (DDIM and DPM-Solver++ on a discrete grid stay fast in the few-steps test below).
ODE_SCHEDULES = [pytest.param(COSINE, id="cosine"),
                 pytest.param(COSINE_ZTS_T1000, id="cosine-T1000-zts", marks=pytest.mark.slow),
                 pytest.param(LINEAR_T1000, id="linear-T1000", marks=pytest.mark.slow),
                 pytest.param(LINEAR_ZTS, id="linear-zts")]


@pytest.mark.parametrize("schedule", ODE_SCHEDULES)
def test_deterministic_samplers_converge_to_the_exact_flow(schedule):
  """Per sample, against the exact ODE solution from the same x_T: DDIM is first order (doubling the steps halves
  the error), DPM-Solver++(2M) is an order of magnitude more accurate at the same 40 steps."""
  exact = _exact_flow(schedule, _initial_noise(0, 64))
  err = lambda m, n: np.max(np.abs(draw(schedule, "v", m, n, num=64) - exact))
  ddim_20, ddim_40, dpm_40 = err("ddim", 20), err("ddim", 40), err("dpmpp_2m", 40)
  assert 1.7 < ddim_20 / ddim_40 < 2.3
  assert dpm_40 < 0.1 * ddim_40
  # Heun is second order: doubling the steps divides the error by about four, and at the same number of model
  # evaluations (20 Heun steps ~ 40 DDIM steps) it is far more accurate than DDIM.
  heun_10, heun_20 = err("heun", 10), err("heun", 20)
  assert heun_10 / heun_20 > 3.0
  assert heun_20 < 0.2 * ddim_40


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])  # Heun is no one-step solver
def test_one_step_from_zero_snr_gives_the_data_mean(sampler):
  """At alpha = 0 the optimal x0 prediction is the data mean, and a single step from t = 1 to t = 0 returns it.

  This pins the trailing spacing (the first step starts exactly at t = 1) and the alpha = 0 handling.
  """
  x = draw(COSINE_ZTS_T1000, "v", sampler, 1, num=8)
  np.testing.assert_allclose(x, MU, atol=1e-5)


def test_clip_x0_keeps_samples_in_range():
  schedule = COSINE
  labels = jnp.zeros((256,), jnp.int32)
  wide = gaussian_denoiser(schedule, "v", mu=0.0, sd=2.0)  # data mostly outside [-1, 1]
  x = np.asarray(compiled_sample(wide, schedule, "v", jax.random.key(0), labels, SHAPE, sampler="dpmpp_2m",
                                 num_steps=10))
  assert np.all(np.isfinite(x)) and x.min() >= -1.0 and x.max() <= 1.0
  assert np.mean(np.abs(x) > 0.99) > 0.3  # the clip actually acted
  unclipped = np.asarray(compiled_sample(wide, schedule, "v", jax.random.key(0), labels, SHAPE,
                                         sampler="dpmpp_2m", num_steps=10, clip_x0=False))
  assert np.abs(unclipped).max() > 2.0


def test_clip_x0_rederives_eps_from_the_clipped_prediction():
  """Two DDIM steps 1 -> 0.5 -> 0 with a model that predicts x0 = 3 at t = 1 and x0 = x_t at t = 0.5.

  With the clipped x0 = 1 and eps re-derived from it, the first step keeps (x_t - alpha_t) / sigma_t fixed, so
  x_0.5 = alpha_0.5 + sigma_0.5 (x_T - alpha_1) / sigma_1; the second step returns clip(x_0.5).
  """
  schedule = diffusion.Schedule("scaled_linear", 0)  # alpha_1 ~ 0.07, so the clip visibly changes eps

  def fn(x, t, y):
    return jnp.where(t.reshape((-1,) + (1,) * (x.ndim - 1)) > 0.75, 3.0, x)

  x = compiled_sample(fn, schedule, "x0", jax.random.key(0), jnp.zeros((64,), jnp.int32), SHAPE, sampler="ddim",
                      num_steps=2, clip_x0=True)
  a1, s1 = (float(v) for v in schedule.alpha_sigma(1.0))
  a_half, s_half = (float(v) for v in schedule.alpha_sigma(0.5))
  x_half = a_half + s_half * (_initial_noise(0, 64) - a1) / s1
  assert 0.2 < np.mean(np.abs(x_half) < 1) < 0.98  # the final clip neither does everything nor nothing
  np.testing.assert_allclose(np.asarray(x), np.clip(x_half, -1, 1), atol=1e-4)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm"])
def test_more_steps_than_timesteps_is_rejected(sampler):
  schedule = diffusion.Schedule("cosine", 10)
  labels = jnp.zeros((256,), jnp.int32)
  with pytest.raises(ValueError, match="more than the schedule's 10 timesteps"):
    samplers.sample(gaussian_denoiser(schedule, "v"), schedule, "v", jax.random.key(0), labels, SHAPE,
                    sampler=sampler, num_steps=25, clip_x0=False)
  # All T steps are fine and reproduce the data.
  x = np.asarray(compiled_sample(gaussian_denoiser(schedule, "v"), schedule, "v", jax.random.key(0), labels, SHAPE,
                                 sampler=sampler, num_steps=10, clip_x0=False))
  assert np.all(np.isfinite(x))
  assert x.std() / SD == pytest.approx(1.0, abs=0.3)


# ----------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------

NULL = 3
CLASS_VALUES = jnp.array([1.0, -2.0, 0.5, 4.0])  # c_y for y = 0, 1, 2 and u for the null class 3


def _recording_fn(calls):
  def fn(x, t, y):
    calls.append((x.shape[0], t.shape[0], y.shape[0]))
    return jnp.broadcast_to(CLASS_VALUES[y].reshape((-1,) + (1,) * (x.ndim - 1)), x.shape) + 0 * x

  return fn


@pytest.mark.parametrize("scale", [0.0, 2.5, 7.0])
def test_guided_combines_conditional_and_unconditional(scale):
  calls = []
  fn = samplers.guided(_recording_fn(calls), scale, NULL)
  y = jnp.array([0, 1, 2, 1, 0])
  x = jnp.ones((5, 2, 2, 1))
  out = np.asarray(fn(x, jnp.full((5,), 0.5), y))
  c, u = np.asarray(CLASS_VALUES)[np.asarray(y)], float(CLASS_VALUES[NULL])
  expected = u + scale * (c - u)
  np.testing.assert_allclose(out, np.broadcast_to(expected[:, None, None, None], out.shape), rtol=1e-6)
  assert calls == [(10, 10, 10)]  # one batched call over both branches


def test_guided_scale_one_is_the_original_function():
  calls = []
  base = _recording_fn(calls)
  assert samplers.guided(base, 1.0, NULL) is base
  fn = samplers.guided(base, 1.0, NULL)
  out = np.asarray(fn(jnp.ones((3, 2)), jnp.full((3,), 0.5), jnp.array([0, 1, 2])))
  np.testing.assert_allclose(out[:, 0], np.asarray(CLASS_VALUES[:3]))
  assert calls == [(3, 3, 3)]  # no doubled batch


@pytest.mark.parametrize("scale,batch", [(1.0, 6), (3.0, 12)])
def test_sample_doubles_the_batch_only_when_guided(scale, batch):
  calls = []
  samplers.sample(_recording_fn(calls), COSINE, "x0", jax.random.key(0), jnp.array([0, 1, 2, 0, 1, 2]), (2,),
                  sampler="ddim", num_steps=3, guidance_scale=scale, null_class=NULL, clip_x0=False)
  assert calls and all(c == (batch, batch, batch) for c in calls)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_guidance_end_to_end_on_class_conditional_toy(prediction):
  """One step from zero SNR returns the guided mean u + s (mu_y - u) for each example's own class."""
  mus = jnp.array([0.5, -0.4, 0.1, 0.2])  # classes 0..2 and the null class (the marginal) 3
  sds = jnp.array([0.2, 0.3, 0.4, 0.6])
  schedule = COSINE_ZTS_T1000
  labels = jnp.array([0, 1, 2, 2, 1, 0])
  scale = 2.0
  x = compiled_sample(gaussian_denoiser(schedule, prediction, mus, sds), schedule, prediction, jax.random.key(0),
                      labels, SHAPE, sampler="ddim", num_steps=1, guidance_scale=scale, null_class=NULL,
                      clip_x0=False)
  expected = mus[NULL] + scale * (mus[labels] - mus[NULL])
  np.testing.assert_allclose(np.asarray(x), np.broadcast_to(np.asarray(expected)[:, None, None, None], x.shape),
                             atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------


def test_sample_rejects_bad_arguments():
  fn = gaussian_denoiser(COSINE, "v")
  labels = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError):
    samplers.sample(fn, COSINE, "v", jax.random.key(0), labels, (2,), sampler="euler")
  for n in (0, -1):
    with pytest.raises(ValueError):
      samplers.sample(fn, COSINE, "v", jax.random.key(0), labels, (2,), num_steps=n)
  with pytest.raises(ValueError):  # guidance without a null class
    samplers.sample(fn, COSINE, "v", jax.random.key(0), labels, (2,), guidance_scale=2.0)


# ----------------------------------------------------------------------------------------------------------------
# Guidance rescale and interval
# ----------------------------------------------------------------------------------------------------------------


def _two_branch_fn(x, t, y):
  """A denoiser whose conditional output is x * (1 + y) and whose unconditional (null class) output is x / 2."""
  scale = jnp.where(y == NULL, 0.5, 1.0 + y).reshape((-1,) + (1,) * (x.ndim - 1))
  return x * scale


def test_rescale_zero_is_plain_guidance_and_one_matches_the_conditional_std():
  x = jax.random.normal(jax.random.key(0), (6, 4, 4, 1))
  t, y = jnp.full((6,), 0.5), jnp.array([0, 1, 2, 0, 1, 2])
  plain = samplers.guided(_two_branch_fn, 3.0, NULL)(x, t, y)
  np.testing.assert_array_equal(np.asarray(samplers.guided(_two_branch_fn, 3.0, NULL, rescale=0.0)(x, t, y)),
                                np.asarray(plain))
  cond = _two_branch_fn(x, t, y)
  full = np.asarray(samplers.guided(_two_branch_fn, 3.0, NULL, rescale=1.0)(x, t, y))
  std = lambda a: np.asarray(a).reshape(6, -1).std(axis=1)
  np.testing.assert_allclose(std(full), std(cond), rtol=1e-5)
  # Rescaling only changes the scale of each example's guided output, and phi mixes the two linearly.
  np.testing.assert_allclose(full / std(full)[:, None, None, None],
                             np.asarray(plain) / std(plain)[:, None, None, None], rtol=1e-5, atol=1e-6)
  half = np.asarray(samplers.guided(_two_branch_fn, 3.0, NULL, rescale=0.5)(x, t, y))
  np.testing.assert_allclose(half, 0.5 * full + 0.5 * np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_guidance_interval_guides_only_inside_it():
  x = jax.random.normal(jax.random.key(1), (4, 2, 2, 1))
  y = jnp.array([0, 1, 2, 0])
  t = jnp.array([0.1, 0.4, 0.6, 0.9])
  fn = samplers.guided(_two_branch_fn, 3.0, NULL, interval=(0.3, 0.7))
  out = np.asarray(fn(x, t, y))
  guided_all = np.asarray(samplers.guided(_two_branch_fn, 3.0, NULL)(x, t, y))
  cond = np.asarray(_two_branch_fn(x, t, y))
  np.testing.assert_array_equal(out[[1, 2]], guided_all[[1, 2]])
  np.testing.assert_array_equal(out[[0, 3]], cond[[0, 3]])


def test_rescale_pulls_an_overexposed_guided_sample_back():
  """On the class-conditional Gaussian toy a large guidance scale inflates the sample std; rescale 1 brings it back
  towards the conditional model's."""
  mus = jnp.array([0.5, -0.4, 0.1, 0.0])
  sds = jnp.array([0.3, 0.3, 0.3, 0.8])
  schedule = COSINE
  labels = jnp.zeros((512,), jnp.int32)
  kwargs = dict(sampler="ddim", num_steps=20, guidance_scale=4.0, null_class=NULL, clip_x0=False)
  denoiser = gaussian_denoiser(schedule, "v", mus, sds)
  plain = np.asarray(compiled_sample(denoiser, schedule, "v", jax.random.key(0), labels, SHAPE, **kwargs))
  rescaled = np.asarray(compiled_sample(denoiser, schedule, "v", jax.random.key(0), labels, SHAPE,
                                        guidance_rescale=1.0, **kwargs))
  assert abs(rescaled.std() - 0.3) < abs(plain.std() - 0.3)
