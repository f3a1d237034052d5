"""A weights file of Stable Diffusion's VAE layout with seeded random weights, written as diffusers'
diffusion_pytorch_model.safetensors is: what the tests and the encoder benchmark load where the real VAE is not
available (its weights are never downloaded here)."""

from __future__ import annotations

import math

import numpy as np

from third_party.sd_vae import convert
from third_party.weights_io import write_safetensors


def write_random_vae(path, vae_config, seed: int = 0) -> str:
  """Conv / linear weights N(0, 1) / sqrt(fan_in), norm scales 1, biases 0, at vae_config's size; returns the path."""
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, shape in convert.expected_shapes(vae_config).items():
    if name.endswith(".weight") and len(shape) >= 2:
      tensors[name] = (rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))).astype(np.float32)
    else:
      tensors[name] = (np.ones(shape) if name.endswith(".weight") else np.zeros(shape)).astype(np.float32)
  write_safetensors(str(path), tensors, metadata={"format": "pt"})
  return str(path)
