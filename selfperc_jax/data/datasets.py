"""The facts of each data set the project reads: channels, classes and splits (read by validation, space, pipeline)."""

from __future__ import annotations

import dataclasses

from selfperc_jax.data import captioned, digits, imagenet  # constants only: TFDS, scikit-learn, Pillow on use


NO_DATA = "none"


@dataclasses.dataclass(frozen=True)
class DataSet:
  channels: int
  num_classes: int
  splits: tuple[str, ...]
  # Per class, its captions (condition='text'; the first one is its prompt in grids and evaluation); () for none.
  captions: tuple[tuple[str, ...], ...] = ()
  # A caption per example (image-caption data, data/captioned.py): read only through the latent encoder, which
  # stores each caption's token ids beside its latents.
  captioned: bool = False


DATASETS = {"digits": DataSet(1, digits.NUM_CLASSES, digits.SPLITS, digits.CAPTIONS),
            imagenet.NAME: DataSet(3, imagenet.NUM_CLASSES, imagenet.SPLITS),
            **{name: DataSet(3, 0, captioned.SPLITS, captioned=True) for name in captioned.NAMES},
            # No data: a model folder that is only sampled (configs/sd21_base.py); RGB images, no classes or splits.
            NO_DATA: DataSet(3, 0, ())}
