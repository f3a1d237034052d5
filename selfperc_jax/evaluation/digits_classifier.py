"""A small CNN on the 8x8 digits, trained by the project itself, as the feature extractor for digits metrics.

Inception features mean nothing on 8x8 grey digits, and downloading a pretrained digits network would tie scores
to a file we cannot rebuild. Instead this classifier trains in seconds on the 'train' split, deterministically
from a seed, so "FID in classifier features" (and IS, precision/recall) is reproducible anywhere. Its penultimate
layer gives the features, its last layer the logits.

Images are NHWC (N, 8, 8, 1), floats in [-1, 1] (the data convention) or uint8 (the sample .npz convention,
mapped by x / 127.5 - 1).
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from selfperc_jax import fileio
from selfperc_jax.data import digits
from selfperc_jax.errors import EvaluationError

IMAGE_SHAPE = (8, 8, 1)
FEATURE_DIM = 128
DEFAULT_STEPS = 600
DEFAULT_BATCH_SIZE = 128
DEFAULT_LEARNING_RATE = 2e-3
_FILE_FORMAT = "selfperc_jax.digits_classifier/v1"  # bumped whenever the architecture changes


class DigitsCNN(nn.Module):
  """conv32-conv32-pool-conv64-pool-dense(FEATURE_DIM)-dense(10); returns (features, logits)."""

  feature_dim: int = FEATURE_DIM
  num_classes: int = digits.NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(32, (3, 3), name="conv2")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))  # 4x4
    x = nn.relu(nn.Conv(64, (3, 3), name="conv3")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))  # 2x2
    features = nn.relu(nn.Dense(self.feature_dim, name="features")(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(self.num_classes, name="logits")(features)


def prepare_images(images) -> np.ndarray:
  """float32 (N, 8, 8, 1) in [-1, 1] from uint8 or float input, (N, 8, 8) accepted; clear errors otherwise."""
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
    raise EvaluationError(
        f"the digits classifier takes NHWC images of shape (N, 8, 8, 1); got {x.shape}. Resize samples of other "
        f"sizes to 8x8 first.")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 127.5 - 1.0
  if not np.issubdtype(x.dtype, np.floating):
    raise EvaluationError(f"images must be uint8 (0..255) or floats in [-1, 1]; got dtype {x.dtype}.")
  x = x.astype(np.float32)
  # Slightly out-of-range floats (unclipped samples) are fine; values far outside mean the wrong scale, e.g. 0..255.
  if x.size and (np.abs(x).max() > 2.0 or not np.all(np.isfinite(x))):
    raise EvaluationError(
        f"float images must lie in [-1, 1]; got values in [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]. Pass uint8 "
        f"images for 0..255 data.")
  return x


def _param_template(module: DigitsCNN):
  """Parameter shapes without computing anything, for checking loaded files."""
  return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))["params"]


class DigitsClassifier:
  """Trained params plus jitted `features` / `logits`. Inputs are evaluated in fixed-size chunks (the last one
  padded), so any N compiles once and memory stays bounded."""

  def __init__(self, params, module: DigitsCNN | None = None, chunk_size: int = 2048):
    self.module = module or DigitsCNN()
    self.params = params
    self.chunk_size = chunk_size
    self._apply = jax.jit(lambda p, x: self.module.apply({"params": p}, x))

  def _run(self, images, which: int) -> np.ndarray:
    x = prepare_images(images)
    n = x.shape[0]
    outputs = []
    for start in range(0, n, self.chunk_size):
      chunk = x[start:start + self.chunk_size]
      size = len(chunk) if n <= self.chunk_size else self.chunk_size  # small inputs: one exact-size call
      padded = np.concatenate([chunk, np.zeros((size - len(chunk), *IMAGE_SHAPE), np.float32)])
      outputs.append(np.asarray(self._apply(self.params, padded)[which])[:len(chunk)])
    if not outputs:
      dim = self.module.feature_dim if which == 0 else self.module.num_classes
      return np.zeros((0, dim), np.float32)
    return np.concatenate(outputs)

  @property
  def embed_variables(self):
    return self.params

  def embed_fn(self, params, images):
    """(features, logits) of uint8 (or [-1, 1] float) NHWC images, inside a jitted function (no checks)."""
    x = images.astype(jnp.float32) / 127.5 - 1.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    return self.module.apply({"params": params}, x)

  def features(self, images) -> np.ndarray:
    """(N, FEATURE_DIM) penultimate-layer (post-ReLU) features: the space FID and precision/recall are measured in."""
    return self._run(images, 0)

  def logits(self, images) -> np.ndarray:
    """(N, 10) class logits, e.g. for `metrics.inception_score(logits=...)`."""
    return self._run(images, 1)

  def accuracy(self, images, labels) -> float:
    """Fraction of images whose argmax logit is the label."""
    labels = np.asarray(labels)
    return float(np.mean(self.logits(images).argmax(axis=1) == labels))

  def save(self, path: str) -> None:
    """Writes the params to an .npz (one array per parameter path plus a format tag), atomically."""
    flat = traverse_util.flatten_dict(jax.device_get(self.params), sep="/")
    arrays = {f"params/{k}": np.asarray(v) for k, v in flat.items()}
    fileio.makedirs(os.path.dirname(fileio.resolve(path)))
    fileio.savez(path, format=np.array(_FILE_FORMAT), **arrays)

  @classmethod
  def load(cls, path: str) -> "DigitsClassifier":
    """Reads a file written by `save`, checking every parameter's presence and shape against the architecture."""
    module = DigitsCNN()
    template = traverse_util.flatten_dict(_param_template(module), sep="/")
    expected = f"an .npz written by DigitsClassifier.save ({_FILE_FORMAT})"
    if not fileio.exists(path):
      raise EvaluationError(f"digits classifier file {path!r} does not exist; it must be {expected}.")
    try:
      with fileio.load_npz(path) as data:
        stored = {name: np.asarray(data[name]) for name in data.files}
    except Exception as e:  # truncated / not a zip / bad member: numpy raises several types
      raise EvaluationError(
          f"digits classifier file {path!r} is unreadable ({type(e).__name__}: {e}); delete it to retrain, or "
          f"point to {expected}.") from e
    fmt = str(stored.pop("format", ""))
    if fmt != _FILE_FORMAT:
      raise EvaluationError(f"digits classifier file {path!r} has format {fmt!r}; it must be {expected}.")
    problems, stored_params = [], {}
    for key, leaf in template.items():
      value = stored_params[key] = stored.pop(f"params/{key}", None)
      if value is None:
        problems.append(f"missing {key}")
      elif value.shape != leaf.shape:
        problems.append(f"{key} has shape {value.shape}, expected {leaf.shape}")
    problems += [f"unexpected {name}" for name in stored]
    if problems:
      raise EvaluationError(
          f"digits classifier file {path!r} does not match the architecture: {'; '.join(problems)}. Delete it to "
          f"retrain.")
    params = {key: jnp.asarray(stored_params[key], template[key].dtype) for key in template}
    return cls(traverse_util.unflatten_dict(params, sep="/"), module)


def _batch_indices(seed: int, steps: int, batch_size: int, n: int) -> np.ndarray:
  """(steps, batch_size) example indices: seeded reshuffles of the training set, epoch after epoch."""
  rng = np.random.default_rng(seed)
  epochs = -(-steps * batch_size // n)
  order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
  return order[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def train_classifier(seed: int = 0, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH_SIZE,
                     learning_rate: float = DEFAULT_LEARNING_RATE) -> DigitsClassifier:
  """Trains the CNN on the digits 'train' split with Adam; deterministic given the arguments.

  One jitted step, compiled once, driven by a Python loop over precomputed batch indices: a few seconds on a CPU
  (a `lax.scan` over the steps compiles and runs far slower on XLA:CPU). Each batch gets a random +-1 pixel shift (edge padding): digits
  drawn by a generator are rarely centred exactly like the training set, and the features should not call that a
  difference in kind.
  """
  if steps < 1:
    raise EvaluationError(f"train_classifier needs steps >= 1; got {steps}.")
  images, labels = digits.load("train", image_size=IMAGE_SHAPE[0])
  module, tx, init, step = _training_program(steps, learning_rate)
  init_key, shift_key = jax.random.split(jax.random.key(seed))
  params = init(init_key)
  indices = _batch_indices(seed, steps, batch_size, len(images))
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  opt_state = tx.init(params)
  for idx, key in zip(indices, jax.random.split(shift_key, steps)):
    params, opt_state = step(params, opt_state, images, labels, idx, key)
  return DigitsClassifier(jax.device_get(params), module)


@functools.lru_cache(maxsize=4)
def _training_program(steps: int, learning_rate: float):
  """(module, optimizer, jitted init(key), jitted step): traced and compiled once per (steps, learning rate), so
  classifiers trained with other seeds reuse them."""
  module = DigitsCNN()
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  def shift(x, key):
    """Random translation by up to one pixel per axis, the border repeated."""
    dy, dx = jax.random.randint(key, (2,), -1, 2)
    padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return jax.lax.dynamic_slice(padded, (1 + dy, 1 + dx, 0), x.shape)

  def loss_fn(p, x, y):
    _, logits = module.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, opt_state, images, labels, idx, key):
    x = jax.vmap(shift)(images[idx], jax.random.split(key, idx.shape[0]))
    grads = jax.grad(loss_fn)(p, x, labels[idx])
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  init = jax.jit(lambda key: module.init(key, jnp.zeros((1, *IMAGE_SHAPE)))["params"])
  return module, tx, init, step


# A folder where the trained classifier is also kept across workdirs and processes (the test suite sets it, so that
# its many processes train it once); unset, each process trains it at most once and each workdir keeps its copy.
SHARED_CACHE_ENV = "SELFPERC_JAX_CACHE"


def _source_digest() -> str:
  """This file's digest: a shared cache entry is used only by the code that made it (any edit here may change the
  classifier, not only its architecture, which load checks)."""
  import hashlib

  with open(__file__, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:12]


@functools.lru_cache(maxsize=4)
def _trained_in_process(seed: int, steps: int) -> DigitsClassifier:
  shared = os.environ.get(SHARED_CACHE_ENV)
  path = fileio.join(shared, f"digits_classifier_seed{seed}_steps{steps}_{_source_digest()}.npz") if shared else None
  if path and fileio.exists(path):
    try:
      return DigitsClassifier.load(path)
    except EvaluationError as e:  # a cache of something derived: trained again and replaced, with a line
      print(f"{e} (${SHARED_CACHE_ENV}: training the classifier again and replacing it)", flush=True)
  classifier = train_classifier(seed=seed, steps=steps)
  if path:
    try:
      classifier.save(path)  # atomically: a process that reads it meanwhile sees the whole file or none
    except OSError as e:  # an optional cache: the evaluation goes on without it
      print(f"warning: ${SHARED_CACHE_ENV}={shared!r} cannot keep the digits classifier ({e}); set it to a writable "
            "folder, or unset it", flush=True)
  return classifier


def cached_classifier(cache_dir: str | None = None, seed: int = 0, steps: int = DEFAULT_STEPS) -> DigitsClassifier:
  """The classifier for (seed, steps), trained at most once.

  Without a directory it is kept in this process; with one, it is saved there as
  `digits_classifier_seed<seed>_steps<steps>.npz` and later calls (and later processes) load that file, so every
  evaluation of a project compares samples in the same feature space. A corrupt cached file is reported, not
  silently replaced: the scores it produced so far would otherwise be incomparable without anyone noticing.
  """
  if cache_dir is None:
    return _trained_in_process(seed, steps)
  path = fileio.join(cache_dir, f"digits_classifier_seed{seed}_steps{steps}.npz")
  if fileio.exists(path):
    return DigitsClassifier.load(path)
  classifier = _trained_in_process(seed, steps)  # deterministic, so one training serves every directory
  fileio.makedirs(cache_dir)
  classifier.save(path)
  return classifier
