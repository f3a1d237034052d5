"""ILSVRC-2012 archives in the layout image-net.org ships, filled with synthetic JPEGs, so that the real preparation
path (TFDS's imagenet2012 builder via `python -m selfperc_jax.data.imagenet`) can run where ImageNet is not
available: in the tests and in the data-throughput benchmark.

ILSVRC2012_img_train.tar holds one inner tar per synset (<synset>.tar of <synset>_<i>.JPEG); ILSVRC2012_img_val.tar
holds ILSVRC2012_val_<8 digits>.JPEG, whose labels TFDS reads from its own list.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable

import numpy as np
from PIL import Image


def synsets(count: int) -> list[str]:
  """The first `count` synsets of TFDS's imagenet2012 label list (class k is the k-th)."""
  import tensorflow_datasets as tfds

  labels_file = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
  with open(labels_file) as f:
    return f.read().split()[:count]


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, "JPEG", quality=quality)
  return out.getvalue()


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A smooth random colour field with fine grain: JPEG sizes and decode times close to real photos'."""
  coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
  grain = rng.normal(0, 10, (height, width, 3))
  return np.clip(np.asarray(coarse, np.float32) + grain, 0, 255).astype(np.uint8)


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def write_archives(manual_dir, num_synsets: int, per_synset: int, image: Callable[[int, int], np.ndarray],
                   num_val: int = 3) -> list[str]:
  """Writes both archives into manual_dir; image(k, j) is synset k's j-th image (uint8 HWC). Returns the synsets."""
  names = synsets(num_synsets)
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
    for k, synset in enumerate(names):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as t:
        for j in range(per_synset):
          _add(t, f"{synset}_{j}.JPEG", jpeg(image(k, j)))
      _add(outer, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as outer:
    for j in range(num_val):
      _add(outer, f"ILSVRC2012_val_{j + 1:08d}.JPEG", jpeg(image(0, j)))
  return names
