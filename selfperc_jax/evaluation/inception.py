"""The standard FID InceptionV3 as a feature network: 2048-d pool features and 1008 logits.

The weights are the user's file (see third_party/fid_inception/README.md): nothing is downloaded here. Like every
feature network it offers `embed_fn(variables, images)` (jit-compatible, used on the run's mesh while sampling) and
`embed(images)` for numpy images on this process's own devices (reference batches, the compare CLI).
"""

from __future__ import annotations

import jax
import numpy as np

from selfperc_jax import sharding
from selfperc_jax.errors import EvaluationError


class InceptionFeatures:
  """`embed(images) -> (pool features, logits)` for uint8 or [-1, 1] NHWC images of any size and 1 or 3 channels."""

  def __init__(self, weights_path: str, batch_size: int = 256):
    if not weights_path:
      raise EvaluationError("the Inception features need a weights file: pass --weights PATH (or set "
                            "eval.inception_weights); third_party/fid_inception/README.md says where to get it.")
    from third_party.fid_inception import convert, model

    self._model = model
    self._net = model.InceptionV3()
    self.embed_variables = convert.load_variables(weights_path)
    self.mesh = sharding.local_mesh()
    self.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size  # a multiple of the device count
    self._forward = jax.jit(self.embed_fn, in_shardings=(sharding.replicated(self.mesh),
                                                         sharding.batch_sharding(self.mesh)))
    self._variables_here = None

  def embed_fn(self, variables, images):
    out = self._net.apply(variables, self._model.preprocess(images))
    return out["pool"], out["logits"]

  def embed(self, images) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    if self._variables_here is None:
      self._variables_here = sharding.replicate(self.embed_variables, self.mesh)
    devices = self.mesh.size
    size = min(self.batch_size, -(-len(images) // devices) * devices)  # small sets are not padded to a full batch
    pools, logits = [], []
    for start in range(0, len(images), size):
      chunk = images[start:start + size]
      n = len(chunk)
      if n < size:  # one compiled shape for every chunk
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
      pool, logit = jax.device_get(self._forward(self._variables_here, chunk))
      pools.append(np.asarray(pool[:n], np.float64))
      logits.append(np.asarray(logit[:n], np.float64))
    return np.concatenate(pools), np.concatenate(logits)

  def features(self, images) -> np.ndarray:
    return self.embed(images)[0]

  def logits(self, images) -> np.ndarray:
    return self.embed(images)[1]
