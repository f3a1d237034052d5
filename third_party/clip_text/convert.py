"""CLIP text encoder weights (transformers' CLIPTextModel state dict, a diffusers folder's text_encoder/) -> Flax
variables of `model.CLIPTextModel`.

The files are read, and the state dict checked, by third_party/weights_io.py, shared with the other converters; this
module holds the text encoder's layout and what to tell the user about it.

- `load_config(path)`: a `text_encoder/config.json` -> `model.CLIPTextConfig` (an unsupported option is named).
- `load_state_dict(path)`: a .safetensors (`text_encoder/model.safetensors`, F32 / F16 / BF16), an .npz of flat names,
  or a PyTorch pickle (`pytorch_model.bin`, read torch-free, torch as the fallback) as {name: array}.
- `to_transformers_state_dict(state_dict, config=...)`: the tensors under transformers 5's CLIPTextModel names
  (`embeddings.token_embedding.weight`, ...), float32, checked: every expected key and shape; missing, unexpected and
  wrong-shape keys, non-finite values and non-float tensors are all reported at once (StateDictMismatchError). The
  published files (transformers 4.x) keep every name under `text_model.`: either naming is read (not a mix). The
  `position_ids` buffer some files hold (`text_model.embeddings.position_ids`, int64) is ignored.
- `convert(state_dict, config=...)`: {'params': ...} for `model.CLIPTextModel(config)`: linear weights (out, in) ->
  (in, out) kernels, embedding weights as they are, LayerNorm weights -> scale; `layers.<i>` is `layers_<i>`.
- `load_variables(path, config=None)`: the file -> the Flax variables; without `config`, the `config.json` next to
  the file is read (diffusers' text_encoder/ folder), and failing that model.SD2 is assumed.
- `expected_shapes(config)`, `check_shapes(shapes, config=...)`, `num_parameters(config)`: the layout, its check on
  {name: shape} alone, and the parameter count.
"""

from __future__ import annotations

import functools
import os
import re
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np

from ..weights_io import (  # the three errors are this module's too: its functions raise them
    Entry, KeyMatch, StateDictMismatchError, TorchRequiredError, WeightsError, flax_variables, float32_tensors,
    is_npz, is_safetensors, match_keys, raise_if_mismatched, read_json_object, read_npz, read_safetensors,
    read_torch_pickle, require_file, write_safetensors)

__all__ = ["StateDictMismatchError", "TorchRequiredError", "WeightsError", "check_shapes", "convert",
           "convert_to_safetensors", "expected_shapes", "load_config", "load_state_dict", "load_variables",
           "num_parameters", "to_transformers_state_dict", "write_safetensors"]

_README = "third_party/clip_text/README.md"
FILE_PREFIX = "text_model."  # transformers 4.x's CLIPTextModel (the published SD text_encoder/ files) nests all here
IGNORED = ("embeddings.position_ids",)  # a buffer (arange(77)), not a parameter: some files have it
_INDEXED = re.compile(r"^layers_(\d+)$")  # Flax 'layers_3' is PyTorch 'layers.3'


def _module_name(path: Sequence[str]) -> str:
  """transformers' name of the module at a Flax path."""
  return ".".join(f"layers.{m.group(1)}" if (m := _INDEXED.match(p)) else p for p in path)


def _identity(a):
  return a


def _transpose(a):
  return a.T


def _config(config):
  from .model import SD2, CLIPTextConfig

  if config is None:
    return SD2
  if isinstance(config, CLIPTextConfig):
    return config
  if isinstance(config, Mapping):
    return CLIPTextConfig.from_transformers_config(config)
  return load_config(os.fspath(config))


@functools.lru_cache(maxsize=None)
def _layout(config) -> dict[str, Entry]:
  """{transformers name: Entry} of every parameter, from jax.eval_shape (no memory). weights_io.torch_layout knows
  kernels, scales and biases; the embedding tables ('embedding', stored as they are) are named here."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  from .model import CLIPTextModel

  shapes = jax.eval_shape(CLIPTextModel(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32))
  layout = {}
  for path, leaf in traverse_util.flatten_dict(shapes["params"]).items():
    shape, leaf_name = tuple(leaf.shape), path[-1]
    if leaf_name == "kernel" and len(shape) == 2:  # linear, (in, out) <- (out, in)
      torch_leaf, torch_shape, to_flax = "weight", shape[::-1], _transpose
    elif leaf_name == "embedding":
      torch_leaf, torch_shape, to_flax = "weight", shape, _identity
    elif leaf_name in ("scale", "bias"):
      torch_leaf, torch_shape, to_flax = ("weight" if leaf_name == "scale" else "bias"), shape, _identity
    else:
      raise AssertionError(f"no PyTorch name for Flax parameter {'/'.join(path)} {shape}")
    layout[f"{_module_name(path[:-1])}.{torch_leaf}"] = Entry("params", tuple(path), torch_shape, to_flax)
  return dict(sorted(layout.items(), key=lambda item: _order(item[0])))


def _order(name: str):
  """transformers' state-dict order: embeddings, the layers in order (each in its own module order), the final norm."""
  parts = name.split(".")
  if parts[0] == "embeddings":
    return (0, ["token_embedding", "position_embedding"].index(parts[1]), 0, 0)
  if parts[0] == "encoder":
    within = ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "layer_norm1",
              "mlp.fc1", "mlp.fc2", "layer_norm2"]
    return (1, int(parts[2]), within.index(".".join(parts[3:-1])), parts[-1] == "bias")
  return (2, 0, 0, parts[-1] == "bias")


def expected_shapes(config=None) -> dict[str, tuple[int, ...]]:
  """{transformers name: PyTorch shape} of every tensor of the text encoder, in transformers' order (`config`
  defaults to model.SD2: 372 tensors; model.SD1: 196). The published files have each name under 'text_model.'."""
  return {name: entry.torch_shape for name, entry in _layout(_config(config)).items()}


def num_parameters(config=None) -> int:
  """The parameter count (340,387,840 for model.SD2, 123,060,480 for model.SD1), from shapes alone."""
  return int(sum(np.prod(s, dtype=np.int64) for s in expected_shapes(config).values()))


# --------------------------------------------------------------------------------------------------------------------
# Checking and converting


def _describe(config) -> str:
  return (f"hidden_size {config.hidden_size}, num_hidden_layers {config.num_hidden_layers}, intermediate_size "
          f"{config.intermediate_size}, vocab_size {config.vocab_size}, max_position_embeddings "
          f"{config.max_position_embeddings}")


def _match(shapes: Mapping[Any, tuple], config) -> tuple[KeyMatch, str]:
  """Matches a state dict's keys with the layout: all under 'text_model.' (the published files) or none (transformers
  5); in the first case a key outside the prefix is unexpected. The position_ids buffer is skipped."""
  strings = [k for k in shapes if isinstance(k, str)]
  prefix = FILE_PREFIX if any(k.startswith(FILE_PREFIX) for k in strings) else ""
  names = {k: k[len(prefix):] for k in strings if k.startswith(prefix) and k[len(prefix):] not in IGNORED}
  stray = [k for k in strings if not k.startswith(prefix)]
  match = match_keys(shapes, expected_shapes(config), names, label="transformers")
  match = match._replace(unexpected=match.unexpected + stray, unexpected_keys=match.unexpected_keys + stray)
  note = f" (keys under {prefix!r}, transformers 4.x's naming)" if prefix else ""
  return match, note


def _raise_if_problems(match: KeyMatch, note: str, config, non_finite=(), not_float=()) -> None:
  notes = []
  if any(k.startswith(("vision_model.", "text_projection.", "logit_scale")) for k in match.unexpected_keys):
    notes.append("vision_model / text_projection / logit_scale keys are a whole CLIPModel (or a CLIPTextModel"
                 "WithProjection): this converter reads the text tower alone, a diffusers folder's text_encoder/")
  if match.mismatched or any(".layers." in k for k in match.missing + match.unexpected):
    notes.append("SD 1.x's text encoder is CLIP ViT-L/14 (hidden 768, 12 layers), SD 2.x's OpenCLIP ViT-H/14 "
                 "(hidden 1024, 23 layers as stored): pass the folder's text_encoder/config.json")
  raise_if_mismatched(f"the state dict does not match the CLIPTextModel layout ({_describe(config)}){note}",
                      match, non_finite=non_finite, not_float=not_float, notes=notes,
                      footer=f"Use a Stable Diffusion text encoder's text_encoder/model.safetensors with its "
                             f"config.json (see {_README}).")


def check_shapes(shapes: Mapping[str, Sequence[int]], *, config=None) -> None:
  """The layout check of `convert` on {name: shape} alone (no data): StateDictMismatchError lists every missing,
  unexpected or wrong-shape key."""
  config = _config(config)
  _raise_if_problems(*_match({k: tuple(s) for k, s in shapes.items()}, config), config)


def to_transformers_state_dict(state_dict: Mapping[str, Any], *, config=None) -> dict[str, np.ndarray]:
  """The text encoder's tensors under transformers 5's CLIPTextModel names (no 'text_model.'), float32, in PyTorch's
  layout and order. Every problem (missing / unexpected / wrong shape / non-finite / not float) is reported at once by
  StateDictMismatchError."""
  config = _config(config)
  expected = expected_shapes(config)
  arrays = {k: np.asarray(v) for k, v in state_dict.items()}
  match, note = _match({k: a.shape for k, a in arrays.items()}, config)
  tensors, non_finite, not_float = float32_tensors(arrays, match, expected)
  _raise_if_problems(match, note, config, non_finite, not_float)
  return {name: tensors[name] for name in expected}


def convert(state_dict: Mapping[str, Any], *, config=None) -> dict[str, dict]:
  """{'params': nested dicts of float32 numpy arrays} for `model.CLIPTextModel(config)`. `config`: a
  model.CLIPTextConfig, the dict of a transformers config.json, a path to one, or None (model.SD2)."""
  config = _config(config)
  return flax_variables(_layout(config), to_transformers_state_dict(state_dict, config=config))


# --------------------------------------------------------------------------------------------------------------------
# Files


def load_config(path: str):
  """model.CLIPTextConfig from a diffusers folder's `text_encoder/config.json`."""
  from .model import CLIPTextConfig

  path = os.fspath(path)
  return CLIPTextConfig.from_transformers_config(
      read_json_object(path, f"Expected the folder's text_encoder/config.json (see {_README})."))


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} from a .safetensors, an .npz of flat names, or a PyTorch pickle (.bin / .ckpt / .pth), names and
  layout as stored."""
  path = os.fspath(path)
  require_file(path, "The CLIP text encoder weights are not downloaded by this code: "
                     f"see {_README} for where to get them.")
  if not zipfile.is_zipfile(path) and is_safetensors(path):
    return read_safetensors(path)
  if is_npz(path):
    return read_npz(path)
  return read_torch_pickle(path, converter="third_party.clip_text.convert.convert_to_safetensors",
                           output="model.safetensors")


def _config_beside(path: str):
  candidate = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  return load_config(candidate) if os.path.isfile(candidate) else None


def load_variables(path: str, *, config=None) -> dict[str, dict]:
  """{'params': ...} for `model.CLIPTextModel(config)` from a weights file (see `load_state_dict`), checked by
  `convert`. Without `config`, the config.json next to the file (the text_encoder/ folder) is used, else model.SD2."""
  path = os.fspath(path)
  state_dict = load_state_dict(path)
  if config is None:
    config = _config_beside(path)
  return convert(state_dict, config=config)


def convert_to_safetensors(src: str, dst: str, *, config=None) -> str:
  """Checks the text encoder in `src` (any file `load_state_dict` reads) and writes it to `dst` as float32
  .safetensors under transformers 5's CLIPTextModel names (no 'text_model.' prefix, no position_ids). Returns dst."""
  if config is None:
    config = _config_beside(os.fspath(src))
  checked = to_transformers_state_dict(load_state_dict(src), config=config)
  return write_safetensors(dst, checked, metadata={"format": "pt"})
