"""Drawing a labelled batch of samples from a set of params, as the config's `sample.*` section says."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from selfperc_jax import samplers, sharding


def class_labels(num_samples: int, num_classes: int, classes=()) -> np.ndarray:
  """Class-sorted labels of `classes` (empty: all), num_samples rounded up to a multiple of their count (one grid
  row per class)."""
  classes = np.asarray(classes, np.int32) if len(classes) else np.arange(num_classes, dtype=np.int32)
  per_class = -(-num_samples // len(classes))
  return np.repeat(classes, per_class)


def make_sample_fn(config, model, schedule, image_shape):
  s = config.sample
  return samplers.make_sampler(
      model.apply, schedule, config.diffusion.prediction, tuple(image_shape), sampler=s.sampler, num_steps=s.steps,
      guidance_scale=float(s.guidance_scale), null_class=config.model.num_classes)


def draw(sample_fn, params, config, mesh, num_samples: int | None = None, seed: int | None = None):
  """(images in [-1, 1], labels) as numpy; labels are split over the mesh when they divide evenly.

  Defaults to config.sample.num_samples over config.sample.classes, and config.sample.seed (the grids); with
  num_samples given (evaluation) every class is drawn equally often.
  """
  classes = config.sample.classes if num_samples is None else ()
  num_samples = config.sample.num_samples if num_samples is None else num_samples
  seed = config.sample.seed if seed is None else seed
  labels = class_labels(num_samples, config.model.num_classes, classes)
  placement = sharding.batch_sharding(mesh) if len(labels) % mesh.size == 0 else sharding.replicated(mesh)
  images = sample_fn(params, jax.random.key(seed), jax.device_put(jnp.asarray(labels), placement))
  return np.asarray(jax.device_get(images)), labels
