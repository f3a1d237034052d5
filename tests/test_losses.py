"""Losses: diffusion MSE against hand computations, min-SNR weights, and the self-perceptual loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import device_array
from selfperc_jax import diffusion, losses
from selfperc_jax.models.unet import UNet

B, H, W, C = 4, 8, 8, 1
NUM_CLASSES = 10
SCHEDULE = diffusion.Schedule("cosine")


def _model():
  return UNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=2,
              dropout=0.0, num_classes=NUM_CLASSES, out_channels=C)


def _arrays(seed):
  """x0, x0_hat, eps, eps_hat (all different), labels. NumPy-drawn: many jax.random compiles are slow on CPU."""
  rng = np.random.default_rng(seed)
  x0, x0_hat, eps, eps_hat = (device_array(rng.normal(size=(B, H, W, C))) for _ in range(4))
  labels = device_array(rng.permutation(NUM_CLASSES)[:B], "int32")
  return x0, x0_hat, eps, eps_hat, labels


def _perturb(params, seed, scale=0.2):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: device_array(np.asarray(p) + scale * rng.normal(size=p.shape)), params)


@pytest.fixture(scope="module")
def model():
  return _model()


@pytest.fixture(scope="module")
def fresh_params(model):
  x0, _, _, _, labels = _arrays(0)
  # unsafe_rbg: the same initialisers, but far cheaper to compile on CPU than threefry.
  key = jax.random.key(1, impl="unsafe_rbg")
  return jax.jit(model.init)(key, x0, jnp.full((B,), 0.5), labels)["params"]


@pytest.fixture(scope="module")
def params(fresh_params):
  return _perturb(fresh_params, 2)


def _features_fn(model, p, taps=("mid",)):
  """Bound like step.py does: the perceptual params behind a stop-gradient."""
  return lambda x, t, y: model.apply({"params": jax.lax.stop_gradient(p)}, x, t, y, taps=taps)


def _jitted_loss(noise, taps=("mid",), t_min=0.0, t_max=1.0, fused=True):
  """The loss, jitted once per setting: however a test passes the arguments, one jitted function (whose traces JAX
  keeps) per setting."""
  return _jitted_loss_of(noise, tuple(taps), float(t_min), float(t_max), bool(fused))


@functools.lru_cache(maxsize=None)
def _jitted_loss_of(noise, taps, t_min, t_max, fused):
  model = _model()

  def loss(p, key, x0, x0_hat, eps, eps_hat, labels):
    return losses.self_perceptual_loss(_features_fn(model, p, taps), SCHEDULE, key, x0, x0_hat, eps, eps_hat,
                                       labels, noise=noise, t_min=t_min, t_max=t_max, fused=fused)

  return jax.jit(loss)


KEY = jax.random.PRNGKey(7)

# --------------------------------------------------------------------------------------------- self-perceptual


def test_paper_noise_zero_for_exact_prediction(params):
  x0, x0_hat, eps, eps_hat, labels = _arrays(0)
  loss = _jitted_loss("paper")
  exact = float(loss(params, KEY, x0, x0, eps, eps, labels))
  assert exact < 1e-12
  wrong_x0 = float(loss(params, KEY, x0, x0_hat, eps, eps, labels))
  wrong_eps = float(loss(params, KEY, x0, x0, eps, eps_hat, labels))
  assert wrong_x0 > 1e-4
  assert wrong_eps > 1e-4
  # A smaller error in x0_hat gives a smaller loss than a larger one in the same direction.
  near = float(loss(params, KEY, x0, x0 + 0.01 * (x0_hat - x0), eps, eps, labels))
  assert 0 < near < wrong_x0


def test_shared_noise_zero_for_exact_x0_whatever_eps_hat(params):
  x0, x0_hat, eps, eps_hat, labels = _arrays(1)
  loss = _jitted_loss("shared")
  assert float(loss(params, KEY, x0, x0, eps, eps_hat, labels)) < 1e-12
  assert float(loss(params, KEY, x0, x0, eps, 100.0 * eps_hat, labels)) < 1e-12
  wrong = float(loss(params, KEY, x0, x0_hat, eps, eps_hat, labels))
  assert wrong > 1e-4
  # eps and eps_hat are not used at all: the shared eps' comes from the key.
  np.testing.assert_allclose(float(loss(params, KEY, x0, x0_hat, 3.0 * eps, -eps_hat, labels)), wrong, rtol=1e-6)


def test_unknown_noise_variant_raises(model, params):
  x0, x0_hat, eps, eps_hat, labels = _arrays(0)
  with pytest.raises(ValueError, match="perceptual.noise"):
    losses.self_perceptual_loss(_features_fn(model, params), SCHEDULE, KEY, x0, x0_hat, eps, eps_hat, labels,
                                noise="fresh")
  assert losses.NOISE_VARIANTS == ("paper", "shared")


@functools.lru_cache(maxsize=None)
def _jitted_grads(noise, fused=True):
  """Gradients of the loss w.r.t. (perceptual params, x0, x0_hat, eps, eps_hat)."""
  return jax.jit(jax.grad(_jitted_loss(noise, fused=fused), argnums=(0, 2, 3, 4, 5)))


def _abs_sum(tree):
  return sum(float(np.abs(np.asarray(leaf)).sum()) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("which", ["fresh", "perturbed"])
def test_gradients_only_reach_the_prediction_paper(fresh_params, params, which):
  p = fresh_params if which == "fresh" else params
  x0, x0_hat, eps, eps_hat, labels = _arrays(3)
  g_p, g_x0, g_x0_hat, g_eps, g_eps_hat = _jitted_grads("paper")(p, KEY, x0, x0_hat, eps, eps_hat, labels)
  # Same tree as the params, all exactly zero: the perceptual copy is frozen.
  assert jax.tree.structure(g_p) == jax.tree.structure(p)
  assert _abs_sum(g_p) == 0.0
  # The real branch (x0 noised with the online eps) is stopped.
  assert _abs_sum(g_x0) == 0.0
  assert _abs_sum(g_eps) == 0.0
  # The prediction branch gets gradient, per example.
  for g in (g_x0_hat, g_eps_hat):
    per_example = np.abs(np.asarray(g)).sum(axis=(1, 2, 3))
    assert np.all(per_example > 0), per_example
    assert np.all(np.isfinite(np.asarray(g)))


def test_gradients_only_reach_the_prediction_shared(params):
  x0, x0_hat, eps, eps_hat, labels = _arrays(4)
  g_p, g_x0, g_x0_hat, g_eps, g_eps_hat = _jitted_grads("shared")(params, KEY, x0, x0_hat, eps, eps_hat, labels)
  assert _abs_sum(g_p) == 0.0
  assert _abs_sum(g_x0) == 0.0
  assert _abs_sum(g_eps) == 0.0
  assert _abs_sum(g_eps_hat) == 0.0  # unused with shared noise
  assert np.all(np.abs(np.asarray(g_x0_hat)).sum(axis=(1, 2, 3)) > 0)


@pytest.mark.slow  # a check of the check (the other gradient tests), not of the code
def test_param_gradient_check_is_not_vacuous(model, params):
  """Without the stop-gradient in features_fn the params would get gradient: the loss itself does not stop it."""
  x0, x0_hat, eps, eps_hat, labels = _arrays(3)

  def loss(p):
    fn = lambda x, t, y: model.apply({"params": p}, x, t, y, taps=("mid",))
    return losses.self_perceptual_loss(fn, SCHEDULE, KEY, x0, x0_hat, eps, eps_hat, labels)

  g = jax.jit(jax.grad(loss))(params)
  assert _abs_sum(g["mid_res_1"]) > 0
  assert _abs_sum(g["in_conv"]) > 0
  # Decoder params are not used by the tap-only call.
  assert _abs_sum({k: v for k, v in g.items() if k.startswith(("dec_", "out_"))}) == 0.0


def _by_hand(model, p, key, x0, x0_hat, eps, eps_hat, labels, noise, taps, t_min=0.0, t_max=1.0):
  """Two separate B-sized forwards of the perceptual network, with t' and eps' drawn as the loss draws them."""
  key_t, key_eps = jax.random.split(key)
  t_prime = jnp.maximum(jax.random.uniform(key_t, (B,), minval=t_min, maxval=t_max), 1e-5)
  alpha, sigma = (np.asarray(a)[:, None, None, None] for a in SCHEDULE.alpha_sigma(t_prime))
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-5)
  if noise == "paper":
    eps_real, eps_pred = eps, eps_hat
  else:
    eps_real = eps_pred = jax.random.normal(key_eps, x0.shape, x0.dtype)
  x_real = alpha * np.asarray(x0) + sigma * np.asarray(eps_real)
  x_pred = alpha * np.asarray(x0_hat) + sigma * np.asarray(eps_pred)
  apply = jax.jit(lambda x: model.apply({"params": p}, x, t_prime, labels, taps=taps))
  f_real, f_pred = apply(x_real), apply(x_pred)
  per_tap = [np.mean((np.asarray(f_pred[n], np.float64) - np.asarray(f_real[n], np.float64)) ** 2) for n in taps]
  return float(np.mean(per_tap)), t_prime


# Every noise variant, tap set and layout is in the fast subset; three of the six combinations are `slow`.
FUSED_CASES = [pytest.param(noise, taps, fused, id=f"{noise}-taps{len(taps)}-{fused}",
                            marks=pytest.mark.slow if slow else ())
               for noise, taps, fused, slow in [("paper", ("mid",), False, False), ("paper", ("mid",), True, True),
                                                ("shared", ("mid",), True, False), ("shared", ("mid",), False, True),
                                                ("paper", ("enc0", "mid"), True, False),
                                                ("paper", ("enc0", "mid"), False, True)]]


@pytest.mark.parametrize("noise,taps,fused", FUSED_CASES)
def test_fused_batch_equals_two_separate_forwards(model, params, noise, taps, fused):
  x0, x0_hat, eps, eps_hat, labels = _arrays(5)
  key = jax.random.PRNGKey(11)
  expected, t_prime = _by_hand(model, params, key, x0, x0_hat, eps, eps_hat, labels, noise, taps)
  # t' is a per-example draw, not one shared value.
  assert len(np.unique(np.asarray(t_prime))) == B
  got = float(_jitted_loss(noise, taps, fused=fused)(params, key, x0, x0_hat, eps, eps_hat, labels))
  assert expected > 1e-4
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_t_prime_range_is_respected(model, params):
  x0, x0_hat, eps, eps_hat, labels = _arrays(6)
  key = jax.random.PRNGKey(12)
  expected, t_prime = _by_hand(model, params, key, x0, x0_hat, eps, eps_hat, labels, "paper", ("mid",),
                               t_min=0.6, t_max=0.9)
  assert np.all((np.asarray(t_prime) >= 0.6) & (np.asarray(t_prime) <= 0.9))
  got = float(_jitted_loss("paper", ("mid",), 0.6, 0.9)(params, key, x0, x0_hat, eps, eps_hat, labels))
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_t_prime_is_drawn_from_the_loss_key(params):
  """The loss draws its own t' from its key (there is no online t argument): other keys give other values."""
  x0, x0_hat, eps, eps_hat, labels = _arrays(7)
  loss = _jitted_loss("paper")
  values = [float(loss(params, jax.random.PRNGKey(k), x0, x0_hat, eps, eps_hat, labels)) for k in range(4)]
  assert len(set(np.round(values, 7))) == 4, values
  # Same key, same value: the only randomness is the key.
  assert float(loss(params, jax.random.PRNGKey(0), x0, x0_hat, eps, eps_hat, labels)) == values[0]


def test_key_only_moves_t_prime_with_paper_noise(params):
  """With t' pinned (t_min = t_max) the paper variant has no randomness left, so the key does not matter."""
  x0, x0_hat, eps, eps_hat, labels = _arrays(8)
  loss = _jitted_loss("paper", ("mid",), 0.5, 0.5)
  a = float(loss(params, jax.random.PRNGKey(0), x0, x0_hat, eps, eps_hat, labels))
  b = float(loss(params, jax.random.PRNGKey(1), x0, x0_hat, eps, eps_hat, labels))
  assert a > 1e-4
  np.testing.assert_allclose(a, b, rtol=1e-6)


# --------------------------------------------------------------------------------------------- MSE and weights


def _np_target(x0, eps, alpha, sigma, prediction):
  a, s = alpha[:, None, None, None], sigma[:, None, None, None]
  return {"v": a * eps - s * x0, "eps": eps, "x0": x0}[prediction]


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_loss_matches_hand_computation(prediction, weighted):
  rng = np.random.default_rng(9)
  pred, x0, eps = (rng.normal(size=(B, H, W, C)) for _ in range(3))
  t = np.array([0.05, 0.3, 0.6, 0.95])
  alpha = np.cos(t * np.pi / 2)
  sigma = np.sin(t * np.pi / 2)
  weight = rng.uniform(0.1, 3.0, size=(B,)) if weighted else None
  target = _np_target(x0, eps, alpha, sigma, prediction)
  per_example = ((pred - target) ** 2).reshape(B, -1).mean(axis=1)
  expected = np.mean(per_example * (weight if weighted else 1.0))
  f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
  got = losses.mse_loss(f32(pred), f32(x0), f32(eps), f32(alpha), f32(sigma), prediction, f32(weight))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  # Exact target gives zero.
  zero = losses.mse_loss(f32(target), f32(x0), f32(eps), f32(alpha), f32(sigma), prediction, f32(weight))
  assert float(zero) < 1e-12


def test_mse_loss_unknown_prediction_raises():
  z = jnp.zeros((B, H, W, C))
  with pytest.raises(ValueError):
    losses.mse_loss(z, z, z, jnp.ones((B,)), jnp.zeros((B,)), "score")


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weight_gamma5(prediction):
  gamma = 5.0
  t = np.linspace(0.02, 0.98, 9)
  log_snr = np.asarray(SCHEDULE.log_snr(jnp.asarray(t, jnp.float32)), np.float64)
  snr = np.exp(log_snr)
  assert snr.min() < gamma < snr.max()  # both sides of the clip are exercised
  clipped = np.minimum(snr, gamma)
  expected = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction]
  got = np.asarray(losses.min_snr_weight(jnp.asarray(log_snr, jnp.float32), prediction, gamma))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  low = snr < gamma
  if prediction == "eps":
    np.testing.assert_allclose(got[low], 1.0, rtol=1e-6)
    np.testing.assert_allclose(got[~low], gamma / snr[~low], rtol=1e-5)
  if prediction == "x0":
    np.testing.assert_allclose(got[~low], gamma, rtol=1e-6)


def test_unfused_branches_give_the_same_gradient_to_the_prediction(params):
  x0, x0_hat, eps, eps_hat, labels = _arrays(8)
  key = jax.random.PRNGKey(13)
  grads = {}
  for fused in (True, False):  # the fused program is the one test_gradients_only_reach_the_prediction_paper ran
    grads[fused] = _jitted_grads("paper", fused)(params, key, x0, x0_hat, eps, eps_hat, labels)[1:]
  for a, b in zip(grads[True], grads[False]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-6)  # float32 summation order
  assert _abs_sum(grads[False][1]) > 0 and _abs_sum(grads[False][0]) == 0.0
