"""The facts of each data set the project reads: channels, classes and splits (read by validation, space, pipeline)."""

from __future__ import annotations

import dataclasses

from selfperc_jax.data import digits, imagenet  # constants only: TFDS and scikit-learn are imported on use


@dataclasses.dataclass(frozen=True)
class DataSet:
  channels: int
  num_classes: int
  splits: tuple[str, ...]


DATASETS = {"digits": DataSet(1, digits.NUM_CLASSES, digits.SPLITS),
            imagenet.NAME: DataSet(3, imagenet.NUM_CLASSES, imagenet.SPLITS)}
