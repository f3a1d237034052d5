"""Evaluation metrics against closed forms and constructed cases; the digits classifier as a feature extractor."""

import time

import numpy as np
import pytest

from selfperc_jax.data import digits
from selfperc_jax.errors import UserError
from selfperc_jax.evaluation import digits_classifier as dc
from selfperc_jax.evaluation import metrics
from selfperc_jax.errors import EvaluationError


def _random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def _box_blur(images, size=3):
  """Mean over a size x size window per pixel (edges repeated): heavy blur at 8x8."""
  pad = size // 2
  x = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
  h, w = images.shape[1:3]
  return sum(x[:, i:i + h, j:j + w] for i in range(size) for j in range(size)) / size**2


# --- Frechet distance ------------------------------------------------------------------------------------------------


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  s1, s2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
  expected = np.sum((mu1 - mu2)**2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_commuting_full_covariances_closed_form():
  # Same eigenvectors, different eigenvalues: full (non-diagonal) matrices whose answer is still known exactly.
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  a, b = rng.uniform(0.1, 2.0, 12), rng.uniform(0.1, 2.0, 12)
  mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
  expected = np.sum((mu1 - mu2)**2) + np.sum(a + b - 2 * np.sqrt(a * b))
  got = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_on_random_features():
  linalg = pytest.importorskip("scipy.linalg")
  rng = np.random.default_rng(2)
  x = rng.normal(size=(600, 24)) @ rng.normal(size=(24, 24))
  y = rng.normal(size=(500, 24)) @ rng.normal(size=(24, 24)) + 0.5
  (mu1, s1), (mu2, s2) = metrics.feature_statistics(x), metrics.feature_statistics(y)
  covmean = linalg.sqrtm(s1 @ s2).real
  expected = np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
  assert metrics.fid_from_features(x, y) == pytest.approx(expected, rel=1e-8)


def test_fid_of_fewer_samples_than_dimensions_equals_the_full_computation():
  # Fewer samples than dimensions (rank-deficient covariances): fid_from_features works in the smaller set's k x k
  # space. With both sets' centred rows A and B (over sqrt(n - 1)), tr(sqrt(S1 S2)) is the sum of the singular values
  # of A B^T: the answer to rounding, in either order. The D x D eigendecompositions agree to their own rounding
  # (the null space's zero eigenvalues come out at ~1e-14, and their square roots add up), and a set against
  # itself is zero.
  rng = np.random.default_rng(5)
  x = rng.normal(size=(20, 160)) @ rng.normal(size=(160, 160)) / 10
  y = rng.normal(size=(45, 160)) + 0.3
  a, b = (x - x.mean(0)) / np.sqrt(len(x) - 1), (y - y.mean(0)) / np.sqrt(len(y) - 1)
  expected = (np.sum((x.mean(0) - y.mean(0))**2) + np.sum(a * a) + np.sum(b * b)
              - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum())
  assert metrics.fid_from_features(x, y) == pytest.approx(expected, rel=1e-12)
  assert metrics.fid_from_features(y, x) == pytest.approx(expected, rel=1e-12)
  full = metrics.frechet_distance(*metrics.feature_statistics(x), *metrics.feature_statistics(y))
  assert metrics.fid_from_features(x, y) == pytest.approx(full, rel=1e-7)
  assert abs(metrics.fid_from_features(x, x)) < 1e-8 * np.sum(a * a)  # (the k x k eigenvalues are squares)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_it_is_symmetric():
  rng = np.random.default_rng(3)
  mu, sigma = metrics.feature_statistics(rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)))
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
  mu2, sigma2 = rng.normal(size=32), _random_spd(rng, 32)
  assert metrics.frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(
      metrics.frechet_distance(mu2, sigma2, mu, sigma), rel=1e-10)


def test_frechet_distance_singular_covariances():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(300, 5)), 2.0 * rng.normal(size=(300, 5)) + 1.0
  low = metrics.fid_from_features(x, y)
  # The same data with 3 constant extra dimensions: rank-5 covariances in 8 dimensions, and the same distance.
  pad = lambda f: np.concatenate([f, np.full((len(f), 3), 0.7)], axis=1)
  assert metrics.fid_from_features(pad(x), pad(y)) == pytest.approx(low, rel=1e-9)
  # Fewer samples than dimensions.
  fd = metrics.fid_from_features(rng.normal(size=(10, 50)), rng.normal(size=(12, 50)))
  assert np.isfinite(fd) and fd > 0


def test_feature_statistics_is_mean_and_unbiased_covariance():
  x = np.random.default_rng(5).normal(size=(50, 4))
  mu, sigma = metrics.feature_statistics(x)
  np.testing.assert_allclose(mu, x.mean(0))
  np.testing.assert_allclose(sigma, (x - x.mean(0)).T @ (x - x.mean(0)) / 49)
  with pytest.raises(EvaluationError, match="2-D"):
    metrics.feature_statistics(x[:, 0])


# --- Inception Score -------------------------------------------------------------------------------------------------


def test_inception_score_of_uniformly_spread_one_hot_predictions_is_the_number_of_classes():
  probs = np.eye(10)[np.tile(np.arange(10), 100)]  # every split of 100 holds each class 10 times
  mean, std = metrics.inception_score(probs=probs, splits=10)
  assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6


def test_inception_score_of_identical_predictions_is_one():
  row = np.random.default_rng(6).dirichlet(np.ones(10))
  mean, _ = metrics.inception_score(probs=np.tile(row, (200, 1)), splits=4)
  assert mean == pytest.approx(1.0, abs=1e-9)


def test_inception_score_logits_path_equals_probs_path():
  logits = 4.0 * np.random.default_rng(7).normal(size=(300, 10))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  a, b = metrics.inception_score(logits=logits, splits=3), metrics.inception_score(probs=probs, splits=3)
  np.testing.assert_allclose(a, b, rtol=1e-9)
  assert 1.0 < a[0] < 10.0
  # Huge logits: the stable softmax neither overflows nor changes the answer.
  np.testing.assert_allclose(metrics.inception_score(logits=logits + 1e4, splits=3), a, rtol=1e-9)


def test_inception_score_refuses_ambiguous_input():
  logits = np.random.default_rng(8).normal(size=(20, 10))
  with pytest.raises(EvaluationError, match="exactly one"):
    metrics.inception_score(probs=logits, logits=logits)
  with pytest.raises(EvaluationError, match="exactly one"):
    metrics.inception_score()
  with pytest.raises(EvaluationError, match="logits="):
    metrics.inception_score(probs=logits)  # logits passed as probabilities


# --- precision / recall ----------------------------------------------------------------------------------------------


def test_precision_recall_of_identical_sets_is_one():
  x = np.random.default_rng(9).normal(size=(300, 16))
  assert metrics.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_radius_is_the_kth_neighbour_other_than_the_point_itself():
  # Real points 0, 1, 3, 7 on a line; with k=1 their radii are 1, 1, 2, 4. Fake 10.9 is inside 7's ball, -0.9
  # inside 0's; 11.1 and -1.1 are outside every ball. The fake radii (k=1) are all 0.2, covering no real point.
  real = np.array([[0.0], [1.0], [3.0], [7.0]])
  fake = np.array([[10.9], [11.1], [-0.9], [-1.1]])
  assert metrics.precision_recall(real, fake, k=1) == (0.5, 0.0)


def test_precision_recall_of_separated_clusters_is_zero():
  rng = np.random.default_rng(10)
  real, fake = rng.normal(size=(200, 8)), rng.normal(size=(250, 8)) + 100.0
  assert metrics.precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_when_fake_covers_half_the_modes():
  # 10 tight modes far apart; the fake set is modes 0-4 of the real set, each point moved by 1e-6. Every fake point
  # sits on a real one (precision 1); the real points of modes 0-4 are covered, those of modes 5-9 are not.
  rng = np.random.default_rng(11)
  centers = np.stack([100.0 * np.arange(10), np.zeros(10)], axis=1)  # 100 apart on a line
  real = np.concatenate([c + rng.normal(size=(40, 2)) for c in centers])
  fake = real[:200] + 1e-6 * rng.normal(size=(200, 2))
  precision, recall = metrics.precision_recall(real, fake, k=3)
  assert precision == 1.0 and recall == 0.5


def test_precision_recall_does_not_depend_on_the_batch_size():
  rng = np.random.default_rng(12)
  real, fake = rng.normal(size=(230, 6)), 0.8 * rng.normal(size=(170, 6)) + 0.3
  full = metrics.precision_recall(real, fake, k=5, batch_size=10_000)
  assert 0.0 < full[0] < 1.0 and 0.0 < full[1] < 1.0
  assert metrics.precision_recall(real, fake, k=5, batch_size=7) == full
  with pytest.raises(EvaluationError, match="k="):
    metrics.precision_recall(real, fake[:3], k=3)


# --- reference statistics files ---------------------------------------------------------------------------------------


def test_reference_round_trip(tmp_path):
  x = np.random.default_rng(13).normal(size=(64, 6)).astype(np.float32)
  path = str(tmp_path / "ref" / "digits_test.npz")
  metrics.save_reference(path, x)
  ref = metrics.load_reference(path)
  mu, sigma = metrics.feature_statistics(x)
  np.testing.assert_allclose(ref.mu, mu)
  np.testing.assert_allclose(ref.sigma, sigma)
  np.testing.assert_array_equal(ref.features, x)
  assert [p.name for p in (tmp_path / "ref").iterdir()] == ["digits_test.npz"]  # no temporary left behind


def test_reference_missing_file_or_keys_is_a_clear_user_error(tmp_path):
  with pytest.raises(UserError, match=r"does not exist.*'mu'.*'sigma'.*'features'"):
    metrics.load_reference(str(tmp_path / "nope.npz"))
  np.savez(tmp_path / "partial.npz", mu=np.zeros(3))
  with pytest.raises(EvaluationError, match=r"lacks \['sigma', 'features'\]"):
    metrics.load_reference(str(tmp_path / "partial.npz"))
  (tmp_path / "garbage.npz").write_bytes(b"not an npz")
  with pytest.raises(EvaluationError, match="unreadable"):
    metrics.load_reference(str(tmp_path / "garbage.npz"))


def test_the_training_time_evaluator_checks_its_reference_before_building_the_network(tmp_path, monkeypatch,
                                                                                       digits_config):
  """--mode=eval and eval_every: a bad eval.reference fails in milliseconds, not after the feature network is built
  (the digits classifier trains for ~30 s on first use; Inception loads 90 MB)."""
  from selfperc_jax.errors import ConfigError
  from selfperc_jax.evaluation import evaluate

  def fail(*args, **kwargs):
    raise AssertionError("the feature network was built before eval.reference was checked")

  monkeypatch.setattr(evaluate, "make_feature_network", fail)
  config = digits_config("tiny")
  (tmp_path / "text.npz").write_text("not a zip file")
  np.savez(tmp_path / "keys.npz", mean=np.zeros(3))
  for name, message in [("missing", "does not exist"), ("text", "is not a readable .npz"),
                        ("keys", "holds neither 'arr_0'")]:
    config.eval.reference = str(tmp_path / f"{name}.npz")
    with pytest.raises(EvaluationError, match=message):
      evaluate.Evaluator(config, str(tmp_path), generator_factory=fail)
  config.eval.reference, config.data.name = "", "imagenet2012"
  with pytest.raises(ConfigError, match="set eval.reference"):
    evaluate.Evaluator(config, str(tmp_path), generator_factory=fail)
  # A good file passes the check, and only then is the network built (here: the stand-in that refuses).
  np.savez(tmp_path / "ref.npz", np.zeros((4, 8, 8, 1), np.uint8))
  config.eval.reference, config.data.name = str(tmp_path / "ref.npz"), "digits"
  with pytest.raises(AssertionError, match="feature network was built"):
    evaluate.Evaluator(config, str(tmp_path), generator_factory=fail)


def test_evaluations_of_one_process_share_the_inception_network_and_reference_until_a_file_changes(
    tmp_path, monkeypatch, digits_config):
  """The comparison evaluates every branch at every guidance scale: the Inception weights are loaded and the
  reference batch embedded once, while the files stay the same (their size and time); the digits features are not
  kept (their classifier is cached on disk)."""
  import os

  from selfperc_jax.evaluation import evaluate

  built = []
  monkeypatch.setattr(evaluate, "_KEPT", {})
  monkeypatch.setattr(evaluate, "make_feature_network", lambda *a: built.append(a) or f"network {len(built)}")
  monkeypatch.setattr(evaluate, "features_of_reference", lambda loaded, network: np.full(3, len(built)))
  np.savez(tmp_path / "ref.npz", np.zeros((4, 8, 8, 3), np.uint8))
  (tmp_path / "w.npz").write_bytes(b"weights")
  config = digits_config("tiny")
  config.eval.features, config.eval.inception_weights = "inception", str(tmp_path / "w.npz")
  config.eval.reference = str(tmp_path / "ref.npz")
  share = lambda: evaluate._network_and_reference(config, evaluate.configured_reference(config), str(tmp_path))
  first, second = share(), share()
  assert len(built) == 1 and first[0] == second[0] == "network 1" and second[1] is first[1]
  os.utime(tmp_path / "ref.npz", ns=(1, 1))  # another reference file (its time): embedded again
  assert share()[0] == "network 2" and len(built) == 2
  (tmp_path / "w.npz").write_bytes(b"other weights")  # other weights (their size): loaded again
  assert share()[0] == "network 3" and share()[0] == "network 3"
  config.eval.features = "digits"
  share(), share()
  assert len(built) == 5 and evaluate._KEPT == {}  # the digits classifier: built each time, nothing kept


# --- the digits classifier -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
  start = time.perf_counter()
  classifier = dc.train_classifier(seed=0)
  return classifier, time.perf_counter() - start


@pytest.fixture(scope="module")
def digit_sets():
  train_x, _ = digits.load("train")
  test_x, test_y = digits.load("test")
  noise = np.random.default_rng(14).uniform(-1.0, 1.0, test_x.shape).astype(np.float32)
  return {"train": train_x, "test": test_x, "test_labels": test_y, "blur": _box_blur(test_x), "noise": noise}


@pytest.mark.slow
def test_classifier_trains_in_seconds_and_generalises(trained, digit_sets):
  classifier, seconds = trained
  assert seconds < 90.0  # ~5-10 s on 2 CPU cores; the bound only catches a pathological slowdown
  assert classifier.accuracy(digit_sets["test"], digit_sets["test_labels"]) >= 0.93  # observed 0.97


@pytest.mark.slow
def test_classifier_outputs_and_input_conventions(trained, digit_sets):
  classifier, _ = trained
  x = digit_sets["test"]
  feats, logits = classifier.features(x), classifier.logits(x)
  assert feats.shape == (len(x), dc.FEATURE_DIM) and logits.shape == (len(x), 10) and feats.min() >= 0.0
  # uint8 input means x / 127.5 - 1.
  u8 = np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(classifier.logits(u8), classifier.logits(u8.astype(np.float32) / 127.5 - 1.0))
  # Chunked evaluation (last chunk padded) gives what one call does; (N, 8, 8) is accepted.
  chunked = dc.DigitsClassifier(classifier.params, chunk_size=100)
  np.testing.assert_allclose(chunked.features(x[..., 0]), feats, rtol=1e-5, atol=1e-5)
  with pytest.raises(EvaluationError, match=r"\(N, 8, 8, 1\)"):
    classifier.features(np.zeros((2, 16, 16, 1), np.float32))
  with pytest.raises(EvaluationError, match="uint8"):
    classifier.features(np.full((2, 8, 8, 1), 255.0, np.float32))


@pytest.mark.slow
def test_fid_in_classifier_features_ranks_real_blurred_noise(trained, digit_sets):
  classifier, _ = trained
  train_feats = classifier.features(digit_sets["train"])
  fid = {name: metrics.fid_from_features(classifier.features(digit_sets[name]), train_feats)
         for name in ("test", "blur", "noise")}
  print("FID vs train digits:", fid)
  assert fid["test"] < fid["noise"] / 5  # observed ~12 vs ~230
  assert fid["test"] < fid["blur"] / 5  # observed ~12 vs ~220
  # Precision of real held-out digits is far above that of blurred ones in the same features.
  precision_real, recall_real = metrics.precision_recall(train_feats, classifier.features(digit_sets["test"]))
  precision_blur, _ = metrics.precision_recall(train_feats, classifier.features(digit_sets["blur"]))
  assert precision_real > 0.5 > 0.1 > precision_blur and recall_real > 0.5
  is_real, _ = metrics.inception_score(logits=classifier.logits(digit_sets["test"]), splits=1)
  assert is_real > 8.0  # confident, class-balanced predictions on real digits (observed ~9.0)


@pytest.mark.slow
def test_classifier_save_load_round_trip_and_bad_files(trained, digit_sets, tmp_path):
  classifier, _ = trained
  path = str(tmp_path / "clf.npz")
  classifier.save(path)
  loaded = dc.DigitsClassifier.load(path)
  np.testing.assert_array_equal(loaded.logits(digit_sets["test"]), classifier.logits(digit_sets["test"]))
  (tmp_path / "corrupt.npz").write_bytes(open(path, "rb").read()[:200])
  with pytest.raises(EvaluationError, match="unreadable"):
    dc.DigitsClassifier.load(str(tmp_path / "corrupt.npz"))
  import jax  # a file from a different architecture (narrower feature layer) is refused by shape

  narrow = dc.DigitsCNN(feature_dim=16)
  other = dc.DigitsClassifier(narrow.init(jax.random.key(0), np.zeros((1, 8, 8, 1)))["params"], narrow)
  other.save(str(tmp_path / "narrow.npz"))
  with pytest.raises(EvaluationError, match=r"features/kernel has shape \(256, 16\), expected \(256, 128\)"):
    dc.DigitsClassifier.load(str(tmp_path / "narrow.npz"))
  with pytest.raises(EvaluationError, match="does not exist"):
    dc.DigitsClassifier.load(str(tmp_path / "missing.npz"))


@pytest.mark.slow
def test_cached_classifier_trains_once_then_loads(trained, digit_sets, tmp_path, monkeypatch):
  classifier, _ = trained
  calls = []
  monkeypatch.delenv(dc.SHARED_CACHE_ENV, raising=False)
  monkeypatch.setattr(dc, "train_classifier", lambda **kw: calls.append(kw) or classifier)
  first = dc.cached_classifier(str(tmp_path), seed=0, steps=7)
  second = dc.cached_classifier(str(tmp_path), seed=0, steps=7)
  assert calls == [{"seed": 0, "steps": 7}]
  assert (tmp_path / "digits_classifier_seed0_steps7.npz").is_file()
  np.testing.assert_array_equal(second.logits(digit_sets["test"]), first.logits(digit_sets["test"]))


@pytest.mark.slow
def test_the_shared_cache_serves_other_processes_and_a_corrupt_one_is_trained_again(trained, digit_sets, tmp_path,
                                                                                   monkeypatch, capsys):
  classifier, _ = trained
  calls = []
  monkeypatch.setenv(dc.SHARED_CACHE_ENV, str(tmp_path / "shared"))
  monkeypatch.setattr(dc, "train_classifier", lambda **kw: calls.append(kw) or classifier)
  dc._trained_in_process.cache_clear()  # each cache_clear below stands for another process
  try:
    dc.cached_classifier(str(tmp_path / "a"), seed=0, steps=9)
    dc._trained_in_process.cache_clear()
    other = dc.cached_classifier(str(tmp_path / "b"), seed=0, steps=9)  # another workdir, another process
    assert calls == [{"seed": 0, "steps": 9}] and (tmp_path / "b" / "digits_classifier_seed0_steps9.npz").is_file()
    np.testing.assert_array_equal(other.logits(digit_sets["test"]), classifier.logits(digit_sets["test"]))
    shared, = (tmp_path / "shared").glob("digits_classifier_seed0_steps9_*.npz")
    shared.write_bytes(b"not a zip")
    dc._trained_in_process.cache_clear()
    dc.cached_classifier(str(tmp_path / "c"), seed=0, steps=9)
    assert len(calls) == 2 and "training the classifier again and replacing it" in capsys.readouterr().out
    dc._trained_in_process.cache_clear()
    dc.cached_classifier(str(tmp_path / "d"), seed=0, steps=9)
    assert len(calls) == 2  # the replaced file is whole again
    (tmp_path / "a_file").write_text("")  # a cache folder that cannot be made: a warning line, the evaluation goes on
    monkeypatch.setenv(dc.SHARED_CACHE_ENV, str(tmp_path / "a_file" / "cache"))
    dc._trained_in_process.cache_clear()
    assert dc.cached_classifier(str(tmp_path / "e"), seed=0, steps=9) is not None and len(calls) == 3
    assert "cannot keep the digits classifier" in capsys.readouterr().out
  finally:
    dc._trained_in_process.cache_clear()  # no patched classifier left for the other tests of this process


@pytest.mark.slow  # Flax's eager init runs op by op (2-3 s of the subset); the subset trains with the compiled one
def test_compiled_init_gives_the_eager_init_bit_for_bit():
  """The cached classifiers (and the scores in docs/results.md) were made with Flax's eager init."""
  import jax
  import jax.numpy as jnp

  _, _, init, _ = dc._training_program(3, dc.DEFAULT_LEARNING_RATE)
  key = jax.random.key(4)
  eager = dc.DigitsCNN().init(key, jnp.zeros((1, *dc.IMAGE_SHAPE)))["params"]
  same = jax.tree_util.tree_map(np.array_equal, init(key), eager)
  assert all(jax.tree_util.tree_leaves(same))


def test_training_is_deterministic_from_the_seed():
  import jax

  a, b, c = (dc.train_classifier(seed=s, steps=3).params for s in (5, 5, 6))
  same = jax.tree_util.tree_map(np.array_equal, a, b)
  assert all(jax.tree_util.tree_leaves(same))
  assert not np.array_equal(a["logits"]["kernel"], c["logits"]["kernel"])
