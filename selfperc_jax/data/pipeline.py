"""grain pipelines: a deterministic, resumable stream of host-local batches.

Each process reads only its own slice of the examples (`[process_index::process_count]`), shuffled from the seed,
reshuffled every epoch, repeated forever and batched to the per-process batch size. The iterator's state is a small
JSON-able dict that the checkpoint stores, so a restarted run continues the same sequence of batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import numpy as np

from selfperc_jax.errors import ConfigError

DATASETS = ("digits",)


@dataclasses.dataclass
class Pipeline:
  iterator: Any  # a grain DatasetIterator of {'image': float32 NHWC, 'label': int32} batches
  image_shape: tuple[int, int, int]
  num_classes: int
  num_examples: int

  def __iter__(self):
    return self

  def __next__(self):
    return next(self.iterator)

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state)


CHANNELS = {"digits": 1}


def image_shape(data_cfg) -> tuple[int, int, int]:
  """The NHWC shape (without N) of the images a data config yields, known without loading them."""
  if data_cfg.name not in CHANNELS:
    raise ConfigError(f"data.name={data_cfg.name!r} is not known; choose one of {DATASETS}.")
  return (data_cfg.image_size, data_cfg.image_size, CHANNELS[data_cfg.name])


def _load_arrays(data_cfg):
  if data_cfg.name == "digits":
    from selfperc_jax.data import digits

    images, labels = digits.load(data_cfg.split, data_cfg.image_size)
    return images, labels, digits.NUM_CLASSES
  raise ConfigError(f"data.name={data_cfg.name!r} is not known; choose one of {DATASETS}.")


def build(config, process_index: int | None = None, process_count: int | None = None) -> Pipeline:
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if config.batch_size % pc:
    raise ConfigError(f"batch_size={config.batch_size} must be divisible by the {pc} processes.")
  images, labels, num_classes = _load_arrays(config.data)
  if config.model.num_classes != num_classes:
    raise ConfigError(f"model.num_classes={config.model.num_classes} but data set {config.data.name!r} has "
                      f"{num_classes} classes; set --config.model.num_classes={num_classes}.")
  local_batch = config.batch_size // pc
  indices = np.arange(len(images))[pi::pc]
  if len(indices) < local_batch:
    raise ConfigError(f"batch_size={config.batch_size} asks each of {pc} processes for {local_batch} examples, but "
                      f"process {pi} holds only {len(indices)}; lower batch_size.")
  ds = (
      grain.MapDataset.source(indices)
      .shuffle(seed=config.seed)
      .repeat()
      .map(lambda i: {"image": images[i], "label": labels[i]})
      .batch(local_batch, drop_remainder=True)
  )
  return Pipeline(iter(ds.to_iter_dataset()), tuple(images.shape[1:]), num_classes, len(images))
