"""Sample-quality metrics on feature vectors, following the guided-diffusion evaluation conventions.

Everything here is plain numpy (float64 where precision matters) so that scoring works on any machine, including
ones without scipy or an accelerator. The feature extractor is someone else's job (Inception for ImageNet, the
project's own `digits_classifier` for the 8x8 digits); these functions only see (N, D) arrays.

- FID: `feature_statistics` + `frechet_distance` (mu, sigma with the unbiased covariance, as the standard code).
- Inception Score: `inception_score(probs=...)` or `inception_score(logits=...)`, exp(E_x KL(p(y|x) || p(y))) per split.
- Improved precision / recall (Kynkaanniemi et al., 2019): `precision_recall`.
- Reference statistics files: `save_reference` / `load_reference` (.npz with `mu`, `sigma`, `features`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from selfperc_jax import fileio
from selfperc_jax.errors import EvaluationError


# --------------------------------------------------------------------------------------------------------------------
# Frechet distance


def _as_features(features, name: str = "features") -> np.ndarray:
  """(N, D) float64; a clear error for anything else, since a silent reshape would give a meaningless score."""
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise EvaluationError(f"{name} must be a 2-D array (num_samples, feature_dim); got shape {x.shape}.")
  if not np.all(np.isfinite(x)):
    raise EvaluationError(f"{name} contains NaN or infinite values; check the feature extractor's input.")
  return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of (N, D) features: the mean and the unbiased covariance (np.cov), as the standard FID code."""
  x = _as_features(features)
  if x.shape[0] < 2:
    raise EvaluationError(f"feature statistics need at least 2 samples (a covariance); got {x.shape[0]}.")
  return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Square root of a symmetric PSD matrix via eigh; rounding's tiny negative eigenvalues are clipped to 0."""
  w, v = np.linalg.eigh(matrix)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr(sqrt(sigma1 sigma2)) through the symmetric form tr(sqrt(sqrt(S1) S2 sqrt(S1))).

  sqrt(S1) S2 sqrt(S1) has the eigenvalues of S1 S2 but is symmetric PSD, so eigh applies and its eigenvalues are
  real and non-negative up to rounding; no complex parts to discard, unlike the non-symmetric sqrtm route.
  """
  root1 = _psd_sqrt(sigma1)
  middle = root1 @ sigma2 @ root1
  w = np.linalg.eigvalsh((middle + middle.T) / 2.0)  # re-symmetrise what rounding broke
  return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

      |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)).

  Computed in float64 with eigendecompositions of symmetric matrices only (see `_trace_sqrt_product`), so it needs
  no scipy. Singular covariances (fewer samples than dimensions, dead ReLU features) are fine as they are: the PSD
  square root is well defined. Only if the eigensolver fails or returns non-finite values is `eps * I` added to both
  covariances and the computation repeated, the same fallback as the standard FID code's; the shift changes the
  distance by O(sqrt(eps)) per dimension at most.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise EvaluationError(
        f"frechet_distance needs mu (D,) and sigma (D, D) of one D; got mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
        f"mu2 {mu2.shape}, sigma2 {sigma2.shape}.")
  for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.all(np.isfinite(value)):
      raise EvaluationError(f"frechet_distance: {name} contains NaN or infinite values.")
  sigma1, sigma2 = (sigma1 + sigma1.T) / 2.0, (sigma2 + sigma2.T) / 2.0
  diff = mu1 - mu2
  try:
    tr_covmean = _trace_sqrt_product(sigma1, sigma2)
  except np.linalg.LinAlgError:
    tr_covmean = float("nan")
  if not np.isfinite(tr_covmean):
    offset = eps * np.eye(d)
    sigma1, sigma2 = sigma1 + offset, sigma2 + offset
    tr_covmean = _trace_sqrt_product(sigma1, sigma2)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(features1, features2) -> float:
  """FID between two (N, D) feature sets: statistics of each, then `frechet_distance`.

  Where the smaller set has no more samples than dimensions (a quick evaluation: a few hundred samples of 2048
  Inception features), its covariance is A^T A with A its k centred rows over sqrt(k - 1), of rank < D, and
  tr(sqrt(S1 S2)) is the same sum over the nonzero eigenvalues of the k x k matrix A S2 A^T (AB and BA share them):
  O(k D^2) instead of the D x D eigendecompositions' O(D^3). The distance is symmetric, so either set may be it."""
  x, y = _as_features(features1, "features1"), _as_features(features2, "features2")
  if len(y) < len(x):
    x, y = y, x
  (mu1, sigma1), (mu2, sigma2) = feature_statistics(x), feature_statistics(y)
  if len(x) > x.shape[1]:
    return frechet_distance(mu1, sigma1, mu2, sigma2)
  a = (x - mu1) / np.sqrt(len(x) - 1)
  middle = a @ sigma2 @ a.T
  try:
    w = np.linalg.eigvalsh((middle + middle.T) / 2.0)
  except np.linalg.LinAlgError:
    w = np.full(1, np.nan)
  if not np.all(np.isfinite(w)):  # the full computation, with its fallback
    return frechet_distance(mu1, sigma1, mu2, sigma2)
  # The centred rows span at most k - 1 dimensions, so at least one eigenvalue is zero and comes out as rounding
  # (~eps * the largest), whose square root would add ~sqrt(eps) of the largest singular value: eigenvalues under
  # numpy's rank tolerance (k * eps * the largest) count as zero.
  w = np.where(w > len(w) * np.finfo(w.dtype).eps * np.max(np.abs(w)), w, 0.0)
  diff = mu1 - mu2
  return float(diff @ diff + np.sum(a * a) + np.trace(sigma2) - 2.0 * np.sqrt(w).sum())


# --------------------------------------------------------------------------------------------------------------------
# Inception Score


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise log-softmax, shifted by the row max so large logits cannot overflow."""
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(*, probs=None, logits=None, splits: int = 10) -> tuple[float, float]:
  """(mean, std) over `splits` equal parts of exp(E_x KL(p(y|x) || p(y))), p(y) being the part's mean prediction.

  Keyword-only and exactly one of `probs` (rows on the simplex) or `logits` (softmaxed here, stably), because a
  logit array passed as probabilities would give a plausible-looking wrong number. The parts are contiguous
  slices [i*N//splits, (i+1)*N//splits), and the std is the population std over parts, as in the original code.
  """
  if (probs is None) == (logits is None):
    raise EvaluationError("inception_score takes exactly one of probs= or logits=.")
  if logits is not None:
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or not np.all(np.isfinite(z)):
      raise EvaluationError(f"logits must be a finite (N, num_classes) array; got shape {z.shape}.")
    log_p = _log_softmax(z)
    p = np.exp(log_p)
  else:
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or not np.all(np.isfinite(p)):
      raise EvaluationError(f"probs must be a finite (N, num_classes) array; got shape {p.shape}.")
    if p.min() < 0.0 or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
      raise EvaluationError("probs rows must be non-negative and sum to 1; pass logits= for unnormalised scores.")
    with np.errstate(divide="ignore"):
      log_p = np.log(p)  # -inf where p == 0; those terms are 0 * (...) and are zeroed below
  n = p.shape[0]
  if not 1 <= splits <= n:
    raise EvaluationError(f"inception_score needs 1 <= splits <= num_samples; got splits={splits}, N={n}.")
  scores = []
  for i in range(splits):
    part, log_part = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
    with np.errstate(divide="ignore", invalid="ignore"):  # classes no one predicts: log 0, masked out below
      log_marginal = np.log(part.mean(axis=0))
      terms = np.where(part > 0.0, part * (log_part - log_marginal), 0.0)
    scores.append(np.exp(terms.sum(axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------------------------------
# Improved precision / recall


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pairwise squared Euclidean distances (len(a), len(b)), clipped at 0 against rounding."""
  d2 = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d2, 0.0)


def _knn_radii_squared(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
  """Squared distance of each row of x to its k-th nearest other row.

  The row itself sits at distance 0, so the k-th neighbour is the (k+1)-th smallest entry (index k). Rows are
  processed in batches so only (batch_size, N) distances exist at a time.
  """
  radii = np.empty(x.shape[0])
  for start in range(0, x.shape[0], batch_size):
    d2 = _squared_distances(x[start:start + batch_size], x)
    radii[start:start + batch_size] = np.partition(d2, k, axis=1)[:, k]
  return radii


def _fraction_in_manifold(points: np.ndarray, support: np.ndarray, radii2: np.ndarray, batch_size: int) -> float:
  """Fraction of `points` within the k-NN ball of at least one `support` point."""
  inside = 0
  for start in range(0, points.shape[0], batch_size):
    d2 = _squared_distances(points[start:start + batch_size], support)
    inside += int(np.any(d2 <= radii2[None, :], axis=1).sum())
  return inside / points.shape[0]


DISTANCE_BLOCK = 2_000_000  # distances held at once by precision_recall's default batching (16 MB of float64)


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int | None = None) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al., 2019) of fake features against real ones.

  Precision: the fraction of fake samples inside the real manifold, the union of balls around each real feature
  with radius its k-th nearest-neighbour distance among the real features (itself excluded). Recall: the fraction
  of real samples inside the fake manifold, built the same way. Distances are computed `batch_size` rows at a time;
  by default as many rows as keep a block at DISTANCE_BLOCK distances, so memory stays the same for 1,000 or
  50,000 samples (a fixed row count would grow with the other set's size).
  """
  real, fake = _as_features(real_features, "real_features"), _as_features(fake_features, "fake_features")
  if real.shape[1] != fake.shape[1]:
    raise EvaluationError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}.")
  if not 1 <= k < min(real.shape[0], fake.shape[0]):
    raise EvaluationError(
        f"precision_recall needs 1 <= k < the size of each set; got k={k}, {real.shape[0]} real, "
        f"{fake.shape[0]} fake.")
  if batch_size is not None and batch_size < 1:
    raise EvaluationError(f"batch_size must be positive; got {batch_size}.")
  rows = lambda columns: batch_size or max(1, DISTANCE_BLOCK // columns)
  real_radii2 = _knn_radii_squared(real, k, rows(len(real)))
  fake_radii2 = _knn_radii_squared(fake, k, rows(len(fake)))
  precision = _fraction_in_manifold(fake, real, real_radii2, rows(len(real)))
  recall = _fraction_in_manifold(real, fake, fake_radii2, rows(len(fake)))
  return precision, recall


# --------------------------------------------------------------------------------------------------------------------
# Reference statistics files

REFERENCE_KEYS = ("mu", "sigma", "features")
_REFERENCE_CONTENTS = ("an .npz with 'mu' (D,), 'sigma' (D, D) and 'features' (N, D), "
                       "as written by selfperc_jax.evaluation.metrics.save_reference")


class Reference(NamedTuple):
  """The statistics of a reference set: FID needs mu and sigma, precision/recall the features themselves."""

  mu: np.ndarray
  sigma: np.ndarray
  features: np.ndarray


def save_reference(path: str, features) -> Reference:
  """Writes mu, sigma and the features to `path` (.npz); returns them. Written to a temporary name, then renamed,
  so an interrupted write never leaves a half file that a later run would trust."""
  x = _as_features(features)
  mu, sigma = feature_statistics(x)
  if not path.endswith(".npz"):
    raise EvaluationError(f"reference statistics path {path!r} must end in .npz.")
  fileio.makedirs(os.path.dirname(fileio.resolve(path)))
  fileio.savez(path, mu=mu, sigma=sigma, features=x.astype(np.float32))
  return Reference(mu, sigma, x.astype(np.float32))


def load_reference(path: str) -> Reference:
  """Reads a file written by `save_reference`; anything else is refused with what the file must contain."""
  if not fileio.exists(path):
    raise EvaluationError(f"reference statistics file {path!r} does not exist; it must be {_REFERENCE_CONTENTS}.")
  try:
    with fileio.load_npz(path) as data:
      missing = [key for key in REFERENCE_KEYS if key not in data.files]
      if missing:
        raise EvaluationError(
            f"reference statistics file {path!r} lacks {missing} (has {sorted(data.files)}); "
            f"it must be {_REFERENCE_CONTENTS}.")
      ref = Reference(*(np.asarray(data[key]) for key in REFERENCE_KEYS))
  except EvaluationError:
    raise
  except Exception as e:  # a truncated or non-npz file: numpy raises zipfile/OSError/ValueError variants
    raise EvaluationError(
        f"reference statistics file {path!r} is unreadable ({type(e).__name__}: {e}); "
        f"it must be {_REFERENCE_CONTENTS}.") from e
  d = ref.mu.shape[0] if ref.mu.ndim == 1 else -1
  if d < 1 or ref.sigma.shape != (d, d) or ref.features.ndim != 2 or ref.features.shape[1] != d:
    raise EvaluationError(
        f"reference statistics file {path!r} has inconsistent shapes: mu {ref.mu.shape}, sigma {ref.sigma.shape}, "
        f"features {ref.features.shape}; it must be {_REFERENCE_CONTENTS}.")
  return ref
