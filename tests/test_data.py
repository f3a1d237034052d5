"""The digits pipeline: values, shapes, determinism, resumable iterator state, per-process sharding."""

import subprocess
import sys

import numpy as np
import pytest

from selfperc_jax import input_pipeline
from selfperc_jax.data import digits
from selfperc_jax.errors import ConfigError


def test_digits_splits_are_disjoint_and_scaled():
  train_x, train_y = digits.load("train")
  test_x, test_y = digits.load("test")
  all_x, _ = digits.load("all")
  assert train_x.shape == (1500, 8, 8, 1) and test_x.shape == (297, 8, 8, 1)
  assert train_x.dtype == np.float32 and train_y.dtype == np.int32
  assert train_x.min() == -1.0 and train_x.max() == 1.0  # 0..16 mapped onto [-1, 1]
  np.testing.assert_array_equal(np.concatenate([train_x, test_x]), all_x)
  assert set(train_y.tolist()) == set(range(10)) == set(test_y.tolist())


def test_digits_read_from_the_file_equal_load_digits_and_need_no_scikit_learn_import(monkeypatch):
  from sklearn.datasets import load_digits

  expected = load_digits()
  images, labels = digits.load_all()
  assert digits._digits_file() is not None  # the direct read, not the fallback
  np.testing.assert_array_equal(images, expected.images)
  np.testing.assert_array_equal(labels, expected.target)
  code = "import sys\nfrom selfperc_jax.data import digits\ndigits.load()\nprint('sklearn' in sys.modules)\n"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert result.stdout.strip() == "False", result.stderr[-2000:]
  monkeypatch.setattr(digits, "_digits_file", lambda: None)  # a scikit-learn that lays its data out otherwise
  fallback_images, fallback_labels = digits.load_all()
  np.testing.assert_array_equal(fallback_images, images)
  np.testing.assert_array_equal(fallback_labels, labels)


def test_resize():
  x, _ = digits.load("test", image_size=16)
  assert x.shape == (297, 16, 16, 1) and x.min() >= -1.0 and x.max() <= 1.0


def test_pipeline_batches_are_deterministic_and_cover_an_epoch(digits_config):
  config = digits_config("tiny")
  config.batch_size = 100
  a, b = input_pipeline.build(config), input_pipeline.build(config)
  first = [next(a) for _ in range(15)]  # exactly one epoch of the 1500 training digits
  for x, y in zip(first, [next(b) for _ in range(15)]):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert first[0]["image"].shape == (100, 8, 8, 1) and first[0]["label"].shape == (100,)
  train_x, _ = digits.load("train")
  seen = np.concatenate([batch["image"] for batch in first]).reshape(1500, -1)
  # Every training digit exactly once per epoch (compare as sorted rows, digits may repeat as images).
  np.testing.assert_array_equal(np.unique(seen, axis=0), np.unique(train_x.reshape(1500, -1), axis=0))
  second_epoch = next(a)
  assert not np.array_equal(second_epoch["image"], first[0]["image"])  # reshuffled every epoch
  config.seed = 1
  assert not np.array_equal(next(input_pipeline.build(config))["image"], first[0]["image"])


def test_iterator_state_resumes_the_same_sequence(digits_config):
  config = digits_config("tiny")
  a = input_pipeline.build(config)
  for _ in range(7):
    next(a)
  state = a.get_state()
  expected = [next(a)["image"] for _ in range(3)]
  b = input_pipeline.build(config)
  b.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(b)["image"], e)


def test_processes_read_disjoint_rows_of_the_same_global_batches(digits_config):
  config = digits_config("tiny")
  config.batch_size = 100
  whole = input_pipeline.build(config, rows=(0, 100))
  halves = [input_pipeline.build(config, rows=(0, 50)), input_pipeline.build(config, rows=(50, 100))]
  for _ in range(20):  # past the first epoch (15 batches)
    expected = next(whole)
    parts = [next(h) for h in halves]
    assert parts[0]["image"].shape == (50, 8, 8, 1)
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])


def test_a_batch_larger_than_the_data_set_is_refused(digits_config):
  config = digits_config("tiny")
  config.batch_size = 2000
  with pytest.raises(ConfigError, match="lower batch_size"):
    input_pipeline.build(config)
