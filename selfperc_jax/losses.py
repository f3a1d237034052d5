"""The training objectives: plain diffusion MSE and the self-perceptual loss (Lin & Yang, arXiv 2401.00110).

Both are pure functions of arrays and of apply-functions, so they can be tested without a training state.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from selfperc_jax import diffusion

NOISE_VARIANTS = ("paper", "shared")

# features_fn(x_t, t, y) -> {tap name: activations}; the caller binds the perceptual copy's params to it.
FeaturesFn = Callable[[jax.Array, jax.Array, jax.Array], Mapping[str, jax.Array]]


def min_snr_weight(log_snr, prediction, gamma):
  """Min-SNR-gamma weights (Hang et al., 2023) expressed for the regression target in use."""
  snr = jnp.exp(log_snr)
  clipped = jnp.minimum(snr, gamma)
  if prediction == "eps":
    return clipped / snr
  if prediction == "v":
    return clipped / (snr + 1)
  if prediction == "x0":
    return clipped
  raise ValueError(f"unknown prediction {prediction!r}; expected one of {diffusion.PREDICTIONS}")


def mse_loss(pred, x0, eps, alpha, sigma, prediction, weight=None):
  """Mean over examples of the (optionally weighted) mean squared error against the target of `prediction`."""
  target = diffusion.target_of(x0, eps, alpha, sigma, prediction)
  per_example = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, pred.ndim)))
  if weight is not None:
    per_example = per_example * weight
  return jnp.mean(per_example)


def draw_t_prime_eps(key, schedule: diffusion.Schedule, shape, dtype, noise: str, t_min: float = 0.0,
                     t_max: float = 1.0):
  """The self-perceptual term's draws for a batch of `shape`: t' per example, and the fresh eps' of noise='shared'
  (None for 'paper', which reuses eps and eps_hat)."""
  key_t, key_eps = jax.random.split(key)
  t_prime = schedule.sample_t(key_t, (shape[0],), t_min, t_max)
  return t_prime, (jax.random.normal(key_eps, shape, dtype) if noise == "shared" else None)


def self_perceptual_loss(
    features_fn: FeaturesFn,
    schedule: diffusion.Schedule,
    key: jax.Array,
    x0: jax.Array,
    x0_hat: jax.Array,
    eps: jax.Array,
    eps_hat: jax.Array,
    labels: jax.Array,
    *,
    noise: str = "paper",
    t_min: float = 0.0,
    t_max: float = 1.0,
    fused: bool = True,
    t_prime: jax.Array | None = None,
    eps_prime: jax.Array | None = None,
):
  """MSE between the perceptual copy's features of the real and of the predicted image, both noised to t'.

  t' is drawn per example, independently of the online t. With `noise='paper'` the real x0 is noised with the
  online eps and the prediction x0_hat with eps_hat, so an exact prediction gives exactly zero loss; `'shared'`
  noises both with one fresh eps'. Gradients flow only into x0_hat / eps_hat: `features_fn` must hold
  stop-gradient params, and the real branch is stopped here.

  fused=True runs both branches through the copy as one 2B batch (best utilisation of wide accelerators); its
  backward then also spans the real half, whose cotangent is zero. fused=False runs the real branch on its own,
  so only the predicted half is differentiated: fewer FLOPs (3 instead of 4 encoder passes of B examples).

  t_prime (and, for noise='shared', eps_prime) may be given instead of being drawn from `key`: the step draws them
  for the whole batch, so that a batch split into micro-batches sees the same draws (`draw_t_prime_eps`).
  """
  if noise not in NOISE_VARIANTS:
    raise ValueError(f"perceptual.noise={noise!r} is not known; choose one of {NOISE_VARIANTS}.")
  if t_prime is None:
    t_prime, eps_prime = draw_t_prime_eps(key, schedule, x0.shape, x0.dtype, noise, t_min, t_max)
  alpha, sigma = schedule.alpha_sigma(t_prime)
  if noise == "paper":
    eps_real, eps_pred = eps, eps_hat
  else:
    eps_real = eps_pred = eps_prime
  x_real = jax.lax.stop_gradient(diffusion.q_sample(x0, eps_real, alpha, sigma))
  x_pred = diffusion.q_sample(x0_hat, eps_pred, alpha, sigma)

  if fused:
    both = features_fn(
        jnp.concatenate([x_real, x_pred]), jnp.concatenate([t_prime, t_prime]), jnp.concatenate([labels, labels]))
    pairs = {name: jnp.split(f, 2) for name, f in both.items()}
  else:
    real = jax.lax.stop_gradient(features_fn(x_real, t_prime, labels))
    pred = features_fn(x_pred, t_prime, labels)
    pairs = {name: (real[name], pred[name]) for name in real}
  per_tap = [jnp.mean(jnp.square(pairs[name][1] - jax.lax.stop_gradient(pairs[name][0]))) for name in sorted(pairs)]
  return sum(per_tap) / len(per_tap)
