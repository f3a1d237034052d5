"""The standard FID InceptionV3 as a feature network: 2048-d pool features and 1008 logits, sharded over the mesh.

The weights are the user's file (see third_party/fid_inception/README.md): nothing is downloaded here.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from selfperc_jax.evaluation.metrics import EvaluationError


class InceptionFeatures:
  """`embed(images) -> (pool features, logits)` for uint8 or [-1, 1] NHWC images of any size and 1 or 3 channels."""

  def __init__(self, weights_path: str, mesh: Mesh | None = None, batch_size: int = 256):
    if not weights_path:
      raise EvaluationError("the Inception features need a weights file: pass --weights PATH (or set "
                            "eval.inception_weights); third_party/fid_inception/README.md says where to get it.")
    from third_party.fid_inception import convert, model

    self.variables = convert.load_variables(weights_path)
    self.mesh = mesh or Mesh(np.asarray(jax.devices()), ("data",))
    self.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size  # a multiple of the device count
    net = model.InceptionV3()
    batch = NamedSharding(self.mesh, P(self.mesh.axis_names))
    replicated = NamedSharding(self.mesh, P())
    self._forward = jax.jit(lambda v, x: net.apply(v, model.preprocess(x)), in_shardings=(replicated, batch),
                            out_shardings=(replicated))
    self._cache = None

  def embed(self, images) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    devices = self.mesh.size
    size = min(self.batch_size, -(-len(images) // devices) * devices)  # small sets are not padded to a full batch
    pools, logits = [], []
    for start in range(0, len(images), size):
      chunk = images[start:start + size]
      n = len(chunk)
      if n < size:  # one compiled shape for every chunk
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
      out = jax.device_get(self._forward(self.variables, chunk))
      pools.append(np.asarray(out["pool"][:n], np.float64))
      logits.append(np.asarray(out["logits"][:n], np.float64))
    return np.concatenate(pools), np.concatenate(logits)

  def features(self, images) -> np.ndarray:
    return self.embed(images)[0]

  def logits(self, images) -> np.ndarray:
    return self.embed(images)[1]
