"""grain pipelines: a deterministic, resumable stream of host-local batches.

One global order of examples (shuffled from the seed, reshuffled every epoch, repeated forever) is cut into global
batches; each process reads only its own rows [row_start, row_stop) of every global batch. The global batch is
therefore the same whatever the number of processes (a run can move between topologies and still see the same
data), and no two processes read the same example of a batch. The iterator's state is a small JSON-able dict that
the checkpoint stores, so a restarted run continues the same sequence of batches.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Sequence
from typing import Any

import numpy as np

from selfperc_jax import space
from selfperc_jax.data import digits, imagenet  # TFDS and scikit-learn are imported on use
from selfperc_jax.data.datasets import DATASETS, NO_DATA
from selfperc_jax.errors import ConfigError


@dataclasses.dataclass
class Pipeline:
  iterator: Any  # a grain DatasetIterator of {'image': uint8 or float32 NHWC, 'label'} batches

  def __iter__(self):
    return self

  def __next__(self):
    return to_float(next(self.iterator))  # uint8 crosses the worker processes; floats are made here

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state)


class _Arrays(Sequence):
  """In-memory examples (the digits) as a random-access source."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def open_source(config) -> Sequence:
  """What the model trains on: the images of config.data, or their encoded latents (space.py decides)."""
  if config.data.name == NO_DATA:
    raise ConfigError("data.name='none' has no images to train on: this config samples a model folder "
                      "(--mode=sample). Training a text-conditioned model needs a captioned data set, which this "
                      "project does not read yet.")
  return space.open_latents(config) if space.is_latent(config) else open_image_source(config.data)


def open_image_source(data_cfg) -> Sequence:
  """The random-access source of {'image': HWC uint8 or [-1, 1] float, 'label'} records of a (validated) config."""
  if data_cfg.name == "digits":
    return _Arrays(*digits.load(data_cfg.split, data_cfg.image_size))
  if DATASETS[data_cfg.name].captioned:
    from selfperc_jax.data import captioned

    return captioned.open_source(data_cfg)
  return imagenet.open_source(data_cfg)  # imports TFDS; only this data set needs it


class _Read:
  """(global position, example id) -> record, flipped horizontally with probability 1/2 when `flip` is set.

  Every random number of a record (the flip; for latents, the draw from the posterior) comes from a generator seeded
  by (seed, global position): the same for any number of processes or workers, and after a resume. (A class, not a
  closure, so that grain's worker processes can pickle it.)
  """

  def __init__(self, source, seed: int, flip: bool):
    self.source, self.seed, self.flip = source, seed, flip

  def __call__(self, item):
    position, index = item
    if not self.flip and not hasattr(self.source, "draw"):  # nothing random to draw (a generator costs ~20 us)
      return self.source[index]
    rng = np.random.default_rng((self.seed, position))
    flip = self.flip and rng.random() < 0.5
    if hasattr(self.source, "draw"):  # encoded latents: a draw from the posterior (of the mirror image when flip)
      return self.source.draw(index, flip, rng)
    example = self.source[index]
    if flip:
      example = {**example, "image": np.ascontiguousarray(example["image"][:, ::-1])}
    return example


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
  """Data workers outlive a SIGTERM or Ctrl-C sent to the whole process group, so the trainer can read on to its
  checkpoint."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def to_float(batch):
  """uint8 images -> float32 in [-1, 1] (float images, the digits, pass through); int32 labels."""
  image = batch["image"]
  if image.dtype == np.uint8:
    image = image.astype(np.float32) / 127.5 - 1.0
  return {"image": image.astype(np.float32, copy=False), "label": np.asarray(batch["label"], np.int32)}


class _Rows(Sequence):
  """The rows [start, stop) of every global batch of `order`, as one flat sequence of (global position, example id)."""

  def __init__(self, order, global_batch: int, start: int, stop: int):
    self.order, self.global_batch, self.start, self.local = order, global_batch, start, stop - start

  def __len__(self):
    return len(self.order) // self.global_batch * self.local

  def __getitem__(self, j):
    position = (j // self.local) * self.global_batch + self.start + j % self.local
    return position, self.order[position]


def build(config, rows: tuple[int, int] | None = None) -> Pipeline:
  """The pipeline of this process: rows = [start, stop) of each global batch it reads, as sharding.process_rows
  says for the mesh (default: the whole global batch, for one process)."""
  start, stop = (0, int(config.batch_size)) if rows is None else rows
  source = open_source(config)
  if len(source) < config.batch_size:
    raise ConfigError(f"batch_size={config.batch_size} is larger than the {len(source)} examples of data set "
                      f"{config.data.name!r} ({config.data.split}); lower batch_size.")
  import grain  # here, so that the model, step and benchmarks import without it

  order = grain.MapDataset.source(np.arange(len(source))).shuffle(seed=config.seed).repeat()
  # Batching stays in the MapDataset, so a batch is always the same rows whatever the number of worker processes
  # (each worker builds whole batches; grain interleaves them back in order).
  ds = grain.MapDataset.source(_Rows(order, config.batch_size, start, stop)).map(
      _Read(source, int(config.seed), bool(config.data.random_flip)))
  # Each thread builds one whole batch, so read_threads batches are in flight per process (Pillow releases the GIL
  # while it decodes and resizes).
  threads = int(config.data.read_threads)
  ds = ds.batch(stop - start, drop_remainder=True).to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
  if config.data.num_workers > 0:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside main (a notebook, tests) use defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(config.data.num_workers)),
                        worker_init_fn=_ignore_stop_signals)
  return Pipeline(iter(ds))
