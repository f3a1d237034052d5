"""Stable Diffusion U-Net weights (diffusers' UNet2DConditionModel state dict) -> Flax variables of
`model.UNet2DConditionModel`.

The files are read, and the state dict checked, by third_party/weights_io.py, shared with the other converters; this
module holds the U-Net's layout and what to tell the user about it.

- `load_config(path)`: a diffusers `unet/config.json` -> `model.UNetConfig` (an unsupported feature is named).
- `load_state_dict(path)`: a .safetensors (diffusers' `unet/diffusion_pytorch_model.safetensors`, F32 / F16 / BF16),
  an .npz of flat names, or a PyTorch pickle (`diffusion_pytorch_model.bin`, read torch-free, torch as the fallback)
  as {name: array}. Of a file that holds a whole diffusers pipeline's tensors under 'unet.' only those are kept.
- `to_diffusers_state_dict(state_dict, config=...)`: the U-Net's tensors, float32, PyTorch layout, checked: every
  expected key and shape; missing, unexpected and wrong-shape keys, non-finite values and non-float tensors are all
  reported at once (StateDictMismatchError). The original CompVis / Stability layout (`model.diffusion_model.
  input_blocks...`) is recognised and refused with a pointer to diffusers' conversion script.
- `convert(state_dict, config=...)`: {'params': ...} for `model.UNet2DConditionModel(config)`: conv weights OIHW ->
  HWIO, linear weights (out, in) -> (in, out), norm weights -> scale; `name.<i>` of PyTorch is `name_<i>` in Flax.
- `load_variables(path, config=None)`: the file -> the Flax variables; without `config`, the `config.json` next to
  the file is read (diffusers' folder layout), and failing that model.SD2 is assumed.
- `expected_shapes(config)`, `check_shapes(shapes, config=...)`: the layout, and its check on {name: shape} alone.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np

from ..weights_io import (  # the three errors are this module's too: its functions raise them
    Entry, KeyMatch, StateDictMismatchError, TorchRequiredError, WeightsError, flax_variables, float32_tensors,
    is_npz, is_safetensors, match_keys, raise_if_mismatched, read_json_object, read_npz, read_safetensors,
    read_torch_pickle, require_file, safetensors_shapes, torch_layout, write_safetensors)

__all__ = ["StateDictMismatchError", "TorchRequiredError", "WeightsError", "check_shapes", "convert",
           "convert_to_safetensors", "expected_shapes", "load_config", "load_state_dict", "load_variables",
           "to_diffusers_state_dict", "write_safetensors"]

_README = "third_party/sd_unet/README.md"
PIPELINE_PREFIX = "unet."  # a whole pipeline's tensors in one file keep the U-Net's under it
_COMPVIS_PREFIX = "model.diffusion_model."
_LITERAL = {"linear_1", "linear_2"}  # diffusers' own attribute names (TimestepEmbedding), not list indices
_INDEXED = re.compile(r"^(.+)_(\d+)$")  # Flax 'down_blocks_0' is PyTorch 'down_blocks.0'


def _module_name(path: Sequence[str]) -> str:
  """diffusers' name of the module at a Flax path."""
  parts = []
  for part in path:
    m = _INDEXED.match(part)
    parts.append(".".join(m.groups()) if m and part not in _LITERAL else part)
  return ".".join(parts)


def _config(config):
  from .model import SD2, UNetConfig

  if config is None:
    return SD2
  if isinstance(config, UNetConfig):
    return config
  if isinstance(config, Mapping):
    return UNetConfig.from_diffusers_config(config)
  return load_config(os.fspath(config))


@dataclasses.dataclass(frozen=True)  # equal for an equal U-Net, and its repr is the U-Net's (a key for its layout)
class _Probe:
  """`torch_layout` initialises a module from one input shape; the U-Net also takes t and a context."""

  unet: Any

  def init(self, rng, x):
    import jax.numpy as jnp

    context = jnp.zeros((x.shape[0], 1, self.unet.config.cross_attention_dim), jnp.float32)
    return self.unet.init(rng, x, jnp.zeros((x.shape[0],), jnp.float32), context)


@functools.lru_cache(maxsize=None)
def _layout(config) -> dict[str, Entry]:
  from .model import UNet2DConditionModel

  size = config.downsampling_factor
  return torch_layout(_Probe(UNet2DConditionModel(config)), (1, size, size, config.in_channels), _module_name)


def expected_shapes(config=None) -> dict[str, tuple[int, ...]]:
  """{diffusers name: PyTorch shape} of every tensor of the U-Net (`config` defaults to model.SD2: 686 tensors)."""
  return {name: entry.torch_shape for name, entry in _layout(_config(config)).items()}


def num_parameters(config=None) -> int:
  """The U-Net's parameter count (865,910,724 for model.SD2, 859,520,964 for model.SD1), from shapes alone."""
  return int(sum(np.prod(s, dtype=np.int64) for s in expected_shapes(config).values()))


# --------------------------------------------------------------------------------------------------------------------
# Checking and converting


def _describe(config) -> str:
  return (f"block_out_channels {tuple(config.block_out_channels)}, layers_per_block {config.layers_per_block}, "
          f"cross_attention_dim {config.cross_attention_dim}, use_linear_projection {config.use_linear_projection}, "
          f"norm_num_groups {config.norm_num_groups}")


def _match(shapes: Mapping[str, tuple], config) -> tuple[KeyMatch, str]:
  keys = [k for k in shapes if isinstance(k, str)]
  prefix = PIPELINE_PREFIX if any(k.startswith(PIPELINE_PREFIX) for k in keys) else ""
  names = {k: k[len(prefix):] for k in keys if k.startswith(prefix)}
  note = f" (the U-Net of a whole pipeline: keys under {prefix!r})" if prefix else ""
  return match_keys(shapes, expected_shapes(config), names, label="diffusers"), note


def _raise_if_problems(match: KeyMatch, note: str, config, non_finite=(), not_float=()) -> None:
  notes = []
  if any(k.startswith(_COMPVIS_PREFIX) for k in match.unexpected_keys):
    notes.append(f"keys under {_COMPVIS_PREFIX!r} are the original CompVis / Stability checkpoint layout, which this "
                 "converter does not read: use the diffusers-format repository's unet/ folder, or convert the "
                 "checkpoint with diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py")
  wrong = {k: v for k, v in match.mismatched.items() if ".proj_in." in k or ".proj_out." in k}
  if wrong:
    notes.append("proj_in / proj_out shapes differ: SD 1.x stores them as 1x1 convolutions "
                 "(use_linear_projection=False), SD 2.x as linear layers (True); pass the model's config.json")
  raise_if_mismatched(f"the state dict does not match the UNet2DConditionModel layout ({_describe(config)}){note}",
                      match, non_finite=non_finite, not_float=not_float, notes=notes,
                      footer=f"Use a Stable Diffusion U-Net's unet/diffusion_pytorch_model.safetensors with its "
                             f"config.json (see {_README}).")


def check_shapes(shapes: Mapping[str, Sequence[int]], *, config=None) -> None:
  """The layout check of `convert` on {name: shape} alone (no data): StateDictMismatchError lists every missing,
  unexpected or wrong-shape key."""
  config = _config(config)
  _raise_if_problems(*_match({k: tuple(s) for k, s in shapes.items()}, config), config)


def to_diffusers_state_dict(state_dict: Mapping[str, Any], *, config=None) -> dict[str, np.ndarray]:
  """The U-Net's tensors under diffusers' names, float32, in PyTorch's layout, in the layout's order. Every problem
  (missing / unexpected / wrong shape / non-finite / not float) is reported at once by StateDictMismatchError."""
  config = _config(config)
  expected = expected_shapes(config)
  arrays = {k: np.asarray(v) for k, v in state_dict.items()}
  match, note = _match({k: a.shape for k, a in arrays.items()}, config)
  tensors, non_finite, not_float = float32_tensors(arrays, match, expected)
  _raise_if_problems(match, note, config, non_finite, not_float)
  return {name: tensors[name] for name in expected}


def convert(state_dict: Mapping[str, Any], *, config=None) -> dict[str, dict]:
  """{'params': nested dicts of float32 numpy arrays} for `model.UNet2DConditionModel(config)`. `config`: a
  model.UNetConfig, the dict of a diffusers config.json, a path to one, or None (model.SD2)."""
  config = _config(config)
  return flax_variables(_layout(config), to_diffusers_state_dict(state_dict, config=config))


# --------------------------------------------------------------------------------------------------------------------
# Files


def load_config(path: str):
  """model.UNetConfig from a diffusers `unet/config.json`."""
  from .model import UNetConfig

  return UNetConfig.from_diffusers_config(
      read_json_object(path, f"Expected diffusers' unet/config.json (see {_README})."))


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} from a .safetensors, an .npz of flat names, or a PyTorch pickle (.bin / .ckpt / .pth), names and
  layout as stored. Of a .safetensors that also holds other networks' tensors, only those under 'unet.' are read."""
  path = os.fspath(path)
  require_file(path, "The Stable Diffusion U-Net weights are not downloaded by this code: "
                     f"see {_README} for where to get them.")
  if not zipfile.is_zipfile(path) and is_safetensors(path):
    names = list(safetensors_shapes(path))
    if any(n.startswith(PIPELINE_PREFIX) for n in names):
      names = [n for n in names if n.startswith(PIPELINE_PREFIX)]
    return read_safetensors(path, names)
  if is_npz(path):
    return read_npz(path)
  return read_torch_pickle(path, converter="third_party.sd_unet.convert.convert_to_safetensors",
                           output="diffusion_pytorch_model.safetensors")


def _config_beside(path: str):
  candidate = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  return load_config(candidate) if os.path.isfile(candidate) else None


def load_variables(path: str, *, config=None) -> dict[str, dict]:
  """{'params': ...} for `model.UNet2DConditionModel(config)` from a weights file (see `load_state_dict`), checked by
  `convert`. Without `config`, the config.json next to the file (diffusers' unet/ folder) is used, else model.SD2."""
  path = os.fspath(path)
  state_dict = load_state_dict(path)
  if config is None:
    config = _config_beside(path)
  return convert(state_dict, config=config)


def convert_to_safetensors(src: str, dst: str, *, config=None) -> str:
  """Checks the U-Net in `src` (any file `load_state_dict` reads) and writes it to `dst` as float32 .safetensors under
  diffusers' names and shapes. Returns dst."""
  if config is None:
    config = _config_beside(os.fspath(src))
  checked = to_diffusers_state_dict(load_state_dict(src), config=config)
  return write_safetensors(dst, checked, metadata={"format": "pt"})
