"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), shipped with the package: no download."""

from __future__ import annotations

import numpy as np


TRAIN_SIZE = 1500  # the first 1500 digits train; the other 297 are held out ('test')
SPLITS = ("train", "test", "all")
NUM_CLASSES = 10
# Captions of each class for text conditions (condition='text'): the first is the class's prompt in sample grids and
# evaluation ("a handwritten seven"); training draws one of them per example and step.
_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEMPLATES = ("a handwritten {word}", "the digit {word}", "a {word} written by hand", "the number {digit}",
              "handwritten digit {digit}")
CAPTIONS = tuple(tuple(t.format(word=w, digit=d) for t in _TEMPLATES) for d, w in enumerate(_WORDS))


def _digits_file():
  """scikit-learn's digits.csv.gz (1797 rows of 64 pixels then the label), found without importing scikit-learn
  (whose import, through SciPy, costs over a second in every process); None where the package lays it out otherwise."""
  import importlib.util
  import os

  spec = importlib.util.find_spec("sklearn")
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
    if os.path.exists(path):
      return path
  return None


def load_all() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 digits: (images float64 (N, 8, 8), pixel values 0..16; labels int64), as sklearn's load_digits gives."""
  path = _digits_file()
  if path is None:
    from sklearn.datasets import load_digits  # imported here so the model code never needs scikit-learn

    digits = load_digits()
    return digits.images, digits.target
  data = np.loadtxt(path, delimiter=",")
  return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def load(split: str = "train", image_size: int = 8):
  """(images float32 NHWC in [-1, 1], labels int32) of a split, resized to image_size x image_size."""
  images, labels = load_all()
  images = (images.astype(np.float32) / 16.0) * 2.0 - 1.0  # pixel values are 0..16
  labels = labels.astype(np.int32)
  sl = {"train": slice(0, TRAIN_SIZE), "test": slice(TRAIN_SIZE, None), "all": slice(None)}[split]
  images, labels = images[sl, :, :, None], labels[sl]
  if image_size != images.shape[1]:
    import jax  # resizing is rare; keep the common path numpy-only

    images = np.asarray(jax.image.resize(images, (len(images), image_size, image_size, 1), "bilinear"))
    images = np.clip(images, -1.0, 1.0)
  return images, labels
