"""grain pipelines: a deterministic, resumable stream of host-local batches.

One global order of examples (shuffled from the seed, reshuffled every epoch, repeated forever) is cut into global
batches; each process reads only its own rows [row_start, row_stop) of every global batch. The global batch is
therefore the same whatever the number of processes (a run can move between topologies and still see the same
data), and no two processes read the same example of a batch. The iterator's state is a small JSON-able dict that
the checkpoint stores, so a restarted run continues the same sequence of batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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


class _Rows(Sequence):
  """The rows [start, stop) of every global batch of `order`, as one flat sequence of example ids."""

  def __init__(self, order, global_batch: int, start: int, stop: int):
    self.order, self.global_batch, self.start, self.local = order, global_batch, start, stop - start

  def __len__(self):
    return len(self.order) // self.global_batch * self.local

  def __getitem__(self, j):
    return self.order[(j // self.local) * self.global_batch + self.start + j % self.local]


def default_rows(global_batch: int) -> tuple[int, int]:
  """This process's rows of a global batch when processes own equal consecutive blocks (what sharding.py makes)."""
  local = global_batch // jax.process_count()
  return jax.process_index() * local, (jax.process_index() + 1) * local


def build(config, rows: tuple[int, int] | None = None) -> Pipeline:
  """The pipeline of this process: rows = [start, stop) of each global batch it reads (default: its equal block)."""
  if config.batch_size % jax.process_count():
    raise ConfigError(f"batch_size={config.batch_size} must be divisible by the {jax.process_count()} processes.")
  start, stop = default_rows(config.batch_size) if rows is None else rows
  images, labels, num_classes = _load_arrays(config.data)
  if config.model.num_classes != num_classes:
    raise ConfigError(f"model.num_classes={config.model.num_classes} but data set {config.data.name!r} has "
                      f"{num_classes} classes; set --config.model.num_classes={num_classes}.")
  if len(images) < config.batch_size:
    raise ConfigError(f"batch_size={config.batch_size} is larger than the {len(images)} examples of data set "
                      f"{config.data.name!r} ({config.data.split}); lower batch_size.")
  order = grain.MapDataset.source(np.arange(len(images))).shuffle(seed=config.seed).repeat()
  ds = (
      grain.MapDataset.source(_Rows(order, config.batch_size, start, stop))
      .map(lambda i: {"image": images[i], "label": labels[i]})
      .batch(stop - start, drop_remainder=True)
  )
  return Pipeline(iter(ds.to_iter_dataset()), tuple(images.shape[1:]), num_classes, len(images))
