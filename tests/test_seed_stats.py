"""Statistics over training seeds, against scipy's (a test-only reference) on made-up numbers."""

import math

import numpy as np
import pytest

from selfperc_jax.evaluation import seed_stats


@pytest.fixture(scope="module")
def stats():
  """scipy.stats, imported when these tests run, not when every worker collects every test."""
  from scipy import stats

  return stats


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 29, 60, 1000])
@pytest.mark.parametrize("p", [0.975, 0.95, 0.995])
def test_t_quantile_equals_scipys(df, p, stats):
  assert seed_stats.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_the_interval_is_scipys_t_interval(n, stats):
  values = np.random.default_rng(n).normal(4.0, 0.5, n)
  got = seed_stats.interval(values)
  lo, hi = stats.t.interval(0.95, n - 1, loc=np.mean(values), scale=stats.sem(values))
  assert got.n == n and got.mean == pytest.approx(np.mean(values), rel=1e-12)
  assert got.mean - got.half_width == pytest.approx(lo, rel=1e-9)
  assert got.mean + got.half_width == pytest.approx(hi, rel=1e-9)


def test_a_paired_difference_excludes_zero_exactly_when_the_paired_t_test_rejects_at_5_percent(stats):
  rng = np.random.default_rng(0)
  decided = set()
  for trial in range(200):
    n = int(rng.integers(2, 8))
    baseline = rng.normal(3.0, 0.3, n)
    branch = baseline + rng.normal(rng.choice([0.0, 0.2, 0.6]), 0.3, n)  # sometimes no effect, sometimes one
    diff = seed_stats.paired_difference(branch, baseline)
    assert diff.mean == pytest.approx(np.mean(branch - baseline), rel=1e-12, abs=1e-12)
    p_value = stats.ttest_rel(branch, baseline).pvalue
    if abs(p_value - 0.05) > 1e-6:  # (not on the boundary itself)
      assert diff.excludes_zero == (p_value < 0.05), (trial, p_value, diff)
      decided.add(diff.excludes_zero)
  assert decided == {True, False}  # the made-up numbers cover both answers


def test_one_seed_gives_a_mean_without_an_interval_and_bad_inputs_are_refused(stats):
  single = seed_stats.interval([2.5])
  assert single.mean == 2.5 and math.isnan(single.half_width) and not single.excludes_zero
  assert single.format() == "2.500"
  assert seed_stats.interval([1.0, 2.0, 3.0]).format(2) == f"2.00 ± {stats.t.ppf(0.975, 2) / math.sqrt(3):.2f}"
  with pytest.raises(ValueError, match="one value per seed"):
    seed_stats.interval([])
  with pytest.raises(ValueError, match="one per seed on both sides"):
    seed_stats.paired_difference([1.0, 2.0], [1.0])
