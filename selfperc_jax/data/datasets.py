"""The facts of each data set the project reads: channels, classes and splits (read by validation, space, pipeline)."""

from __future__ import annotations

import dataclasses

from selfperc_jax.data import digits, imagenet  # constants only: TFDS and scikit-learn are imported on use


NO_DATA = "none"


@dataclasses.dataclass(frozen=True)
class DataSet:
  channels: int
  num_classes: int
  splits: tuple[str, ...]
  # Per class, its captions (condition='text'; the first one is its prompt in grids and evaluation); () for none.
  captions: tuple[tuple[str, ...], ...] = ()


DATASETS = {"digits": DataSet(1, digits.NUM_CLASSES, digits.SPLITS, digits.CAPTIONS),
            imagenet.NAME: DataSet(3, imagenet.NUM_CLASSES, imagenet.SPLITS),
            # No data: a model folder that is only sampled (configs/sd21_base.py); RGB images, no classes or splits.
            NO_DATA: DataSet(3, 0, ())}
