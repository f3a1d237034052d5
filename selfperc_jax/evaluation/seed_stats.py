"""A metric over training seeds: its mean with a 95 % interval, and the paired difference of two branches trained
from the same seeds (pure numpy, no scipy).

The interval is Student's t: mean ± t(0.975, n - 1) · s / sqrt(n), s the sample standard deviation. A paired
difference takes, per seed, branch minus baseline, and gives the same interval of those differences; it "excludes
zero" when the whole interval lies on one side of 0, the only case in which an effect is reported.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np


class Interval(NamedTuple):
  mean: float
  half_width: float  # NaN with fewer than 2 seeds: no interval
  n: int

  @property
  def excludes_zero(self) -> bool:
    return self.n >= 2 and abs(self.mean) > self.half_width

  def format(self, digits: int = 3) -> str:
    """'4.230 ± 0.310' ('4.230' for one seed)."""
    if math.isnan(self.half_width):
      return f"{self.mean:.{digits}f}"
    return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
  """The mean of `values` (one per seed) and the half-width of its t-interval."""
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or not len(x):
    raise ValueError(f"interval needs one value per seed, got shape {x.shape}")
  if len(x) < 2:
    return Interval(float(x[0]), math.nan, 1)
  half = t_quantile(0.5 + confidence / 2, len(x) - 1) * float(np.std(x, ddof=1)) / math.sqrt(len(x))
  return Interval(float(np.mean(x)), half, len(x))


def paired_difference(branch: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> Interval:
  """The interval of branch - baseline over seeds, value i of both trained from seed i."""
  a, b = np.asarray(branch, np.float64), np.asarray(baseline, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired values need one per seed on both sides, got {a.shape} and {b.shape}")
  return interval(a - b, confidence)


def t_quantile(p: float, df: int) -> float:
  """The p-quantile of Student's t with df degrees of freedom (0.5 < p < 1), by bisection on its CDF."""
  if not 0.5 < p < 1 or df < 1:
    raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
  lo, hi = 0.0, 1.0
  while _t_cdf(hi, df) < p:
    hi *= 2
  for _ in range(200):
    mid = (lo + hi) / 2
    if _t_cdf(mid, df) < p:
      lo = mid
    else:
      hi = mid
  return (lo + hi) / 2


def _t_cdf(t: float, df: int) -> float:
  """P(T <= t) for t >= 0: 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2)."""
  return 1.0 - 0.5 * _incomplete_beta(df / (df + t * t), df / 2, 0.5)


def _incomplete_beta(x: float, a: float, b: float) -> float:
  """The regularised incomplete beta function I_x(a, b), by its continued fraction (Lentz's method)."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point: use the symmetry
    return 1.0 - _incomplete_beta(1.0 - x, b, a)
  log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
  tiny = 1e-300
  c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  f = d
  for m in range(1, 500):
    for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                      -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d = 1.0 + numerator * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + numerator / c
      c = c if abs(c) > tiny else tiny
      f *= c * d
    if abs(c * d - 1.0) < 1e-15:
      break
  return math.exp(log_front) * f / a
