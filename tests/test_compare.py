"""The standalone evaluator: real held-out digits score well against the training digits, noise does not."""

import numpy as np
import pytest

from conftest import random_inception_weights
from selfperc_jax.data import digits
from selfperc_jax.evaluation import compare, metrics
from selfperc_jax.images import to_uint8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("npz")
  train_x, _ = digits.load("train")
  test_x, test_y = digits.load("test")
  np.savez(d / "ref.npz", to_uint8(train_x))
  order = np.argsort(test_y, kind="stable")  # class-sorted, as the sample grids are
  np.savez(d / "real.npz", to_uint8(test_x)[order], test_y[order])
  rng = np.random.default_rng(0)
  np.savez(d / "noise.npz", rng.integers(0, 256, test_x.shape, dtype=np.uint8), test_y)
  np.savez(d / "unlabelled.npz", to_uint8(test_x))
  np.savez(d / "few.npz", to_uint8(test_x[:8]), test_y[:8])
  return d


@pytest.mark.slow
def test_real_digits_beat_noise(files, capsys):
  real = compare.compare(str(files / "ref.npz"), str(files / "real.npz"))
  noise = compare.compare(str(files / "ref.npz"), str(files / "noise.npz"))
  assert real["class_accuracy"] > 0.9 and real["class_confidence"] > 0.8
  assert real["inception_score"] > 6  # ten well-recognised classes (splits of 30 bias it low); sorted splits give ~1
  assert real["fid"] * 5 < noise["fid"]
  assert real["precision"] > 0.5 and noise["precision"] < real["precision"] / 3
  assert noise["class_accuracy"] < 0.5
  assert compare.main([str(files / "ref.npz"), str(files / "real.npz")]) == 0
  out = capsys.readouterr().out
  assert "fid" in out and "class_accuracy" in out


@pytest.mark.slow
def test_reference_statistics_file_gives_the_same_scores(files):
  from selfperc_jax.evaluation import digits_classifier

  train_x, _ = digits.load("train")
  features = digits_classifier.cached_classifier().features(to_uint8(train_x))  # the images ref.npz holds
  metrics.save_reference(str(files / "stats.npz"), features)
  a = compare.compare(str(files / "ref.npz"), str(files / "real.npz"))
  b = compare.compare(str(files / "stats.npz"), str(files / "real.npz"))
  assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.slow
def test_samples_without_labels_get_confidence_and_balance_instead_of_accuracy(files):
  result = compare.compare(str(files / "ref.npz"), str(files / "unlabelled.npz"))
  assert "class_accuracy" not in result and result["fid"] >= 0
  assert 0 < result["class_confidence"] <= 1 and 0 <= result["class_balance"] <= 1


def test_unlabelled_scores_read_the_classifier_as_they_say():
  """Confidence: the mean top probability; balance: the predicted classes' entropy over log(K)."""
  from selfperc_jax.evaluation import evaluate

  feats = np.random.default_rng(0).normal(size=(40, 4))
  sure = np.log(np.eye(4)[np.arange(40) % 4] * 0.96 + 0.01)  # each class equally often, top probability 0.97
  result = evaluate.score_features(feats, sure, None, feats, class_scores=True)
  assert result["class_confidence"] == pytest.approx(0.97) and result["class_balance"] == pytest.approx(1.0)
  one_class = np.log(np.eye(4)[np.zeros(40, int)] * 0.96 + 0.01)
  assert evaluate.score_features(feats, one_class, None, feats)["class_balance"] == pytest.approx(0.0, abs=1e-12)
  labelled = evaluate.score_features(feats, sure, np.arange(40) % 4, feats)
  assert labelled["class_accuracy"] == 1.0 and "class_balance" not in labelled
  assert "class_confidence" not in evaluate.score_features(feats, sure, None, feats, class_scores=False)


def _no_feature_network(monkeypatch):
  """Bad files must fail before the feature network is built (the digits classifier trains for ~30 s on first use)."""
  def fail(*args, **kwargs):
    raise AssertionError("the feature network was built before the files were checked")
  monkeypatch.setattr(compare.evaluate, "make_feature_network", fail)


def test_bad_files_are_one_line_errors(files, tmp_path, capsys, monkeypatch):
  _no_feature_network(monkeypatch)
  assert compare.main([str(tmp_path / "missing.npz"), str(files / "real.npz")]) == 2
  assert "does not exist" in capsys.readouterr().err
  np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
  assert compare.main([str(files / "ref.npz"), str(tmp_path / "wrong.npz")]) == 2
  assert "has no 'arr_0'" in capsys.readouterr().err


class _PixelFeatures:
  """A stand-in feature network (the pixels as features, no class scores), for the CLI's plumbing without the ~30 s
  of training the digits classifier."""

  def features(self, images):
    return np.asarray(images, np.float64).reshape(len(images), -1) / 255.0

  def logits(self, images):
    return np.zeros((len(images), 10), np.float32)


def test_a_reference_batch_and_its_statistics_give_the_same_scores(tmp_path, monkeypatch):
  monkeypatch.setattr(compare.evaluate, "make_feature_network", lambda *a, **k: _PixelFeatures())
  rng = np.random.default_rng(0)
  reference, samples = (rng.integers(0, 256, size=(40, 4, 4, 1), dtype=np.uint8) for _ in range(2))
  np.savez(tmp_path / "ref.npz", reference)
  metrics.save_reference(str(tmp_path / "stats.npz"), _PixelFeatures().features(reference))
  np.savez(tmp_path / "samples.npz", samples)
  from_images = compare.compare(str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"))
  from_stats = compare.compare(str(tmp_path / "stats.npz"), str(tmp_path / "samples.npz"))
  assert from_images == pytest.approx(from_stats, rel=1e-6) and from_images["fid"] > 0
  assert compare.compare(str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"))["fid"] == pytest.approx(0, abs=1e-4)


def test_bad_reference_files_are_one_line_errors(files, tmp_path, capsys, monkeypatch):
  _no_feature_network(monkeypatch)
  np.savez(tmp_path / "keys.npz", mean=np.zeros(3))
  np.savez(tmp_path / "floats.npz", np.zeros((4, 8, 8, 1), np.float32))
  (tmp_path / "text.npz").write_text("not a zip file")
  for name, message in [("keys", "holds neither 'arr_0'"), ("floats", "arr_0 must be uint8 images"),
                        ("text", "is not a readable .npz")]:
    assert compare.main([str(tmp_path / f"{name}.npz"), str(files / "real.npz")]) == 2, name
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, (name, err)


def _bad_batches(d):
  """(file, expected message) for every malformed sample batch a user has handed the CLI."""
  images = np.zeros((4, 8, 8, 1), np.uint8)
  (d / "empty.npz").write_bytes(b"")
  (d / "text.npz").write_text("not a zip file")
  full = (d / "ok.npz")
  np.savez(full, images, np.arange(4))
  (d / "truncated.npz").write_bytes(full.read_bytes()[:300])
  np.savez(d / "objects.npz", np.array([images[0], "x"], dtype=object))
  np.savez(d / "floats.npz", images.astype(np.float32))
  np.savez(d / "flat.npz", images.reshape(4, 64))
  np.savez(d / "short_labels.npz", images, np.arange(3))
  np.savez(d / "float_labels.npz", images, np.zeros(4, np.float32))
  np.savez(d / "negative_labels.npz", images, -np.ones(4, np.int64))
  np.savez(d / "big_labels.npz", images, np.full(4, 12))
  readable = "is not readable as an .npz with arr_0"
  return [("empty", readable), ("text", readable), ("truncated", readable), ("objects", readable),
          ("floats", "arr_0 must be uint8 images"), ("flat", "arr_0 must be uint8 images"),
          ("short_labels", "arr_1 must hold one integer label per image (4)"),
          ("float_labels", "arr_1 must hold one integer label per image"),
          ("negative_labels", "negative labels"), ("big_labels", "the digits have classes 0-9")]


def test_malformed_sample_batches_are_one_line_errors(files, tmp_path, capsys, monkeypatch):
  _no_feature_network(monkeypatch)
  for name, message in _bad_batches(tmp_path):
    assert compare.main([str(files / "ref.npz"), str(tmp_path / f"{name}.npz")]) == 2, name
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, (name, err)
  # The same shape, well formed, gets past every check: to the feature network, which this test refuses to build.
  with pytest.raises(AssertionError, match="feature network was built"):
    compare.main([str(files / "ref.npz"), str(tmp_path / "ok.npz")])


@pytest.mark.slow
def test_inception_features_through_the_cli(files, tmp_path, capsys):
  weights = tmp_path / "inception.npz"
  random_inception_weights(weights)
  real = compare.compare(str(files / "few.npz"), str(files / "few.npz"), "inception", weights=str(weights))
  assert real["fid"] == pytest.approx(0.0, abs=1e-3) and real["precision"] == real["recall"] == 1.0
  assert "class_accuracy" not in real  # Inception's classes are not the digits'
  assert compare.main([str(files / "ref.npz"), str(files / "real.npz"), "--features=inception"]) == 2
  assert "need a weights file" in capsys.readouterr().err
