"""Stable Diffusion VAE weights (diffusers' AutoencoderKL state dict) -> Flax variables of `model.AutoencoderKL`.

The files are read and written, and the state dict checked, by third_party/weights_io.py, shared with the other
converters (`read_safetensors`, `write_safetensors` and `safetensors_shapes` are its); this module holds the
AutoencoderKL layout, the other namings it accepts, and what to tell the user about them.

- `load_state_dict(path)`: a .safetensors, an .npz of flat names, or a PyTorch pickle (.ckpt / .pth / .bin, read
  torch-free, with torch as the fallback) as {name: array}. From a whole Stable Diffusion checkpoint (keys under
  'first_stage_model.' or 'vae.') only the VAE is kept, and a .safetensors reads only those tensors' bytes.
- `to_diffusers_state_dict(state_dict)`: the VAE's tensors under diffusers' current names, float32, PyTorch layout,
  checked. Accepted besides diffusers' current layout: diffusers' older attention names
  (`mid_block.attentions.0.query / key / value / proj_attn`), the original CompVis / LDM names (`encoder.down.0.block.
  0.nin_shortcut`, `decoder.up.3.upsample.conv`, `encoder.mid.attn_1.q`, `norm_out`, ...; LDM numbers the decoder's
  levels from the highest resolution, diffusers from the lowest), and attention weights shaped as 1x1 convolutions
  (C, C, 1, 1) or (C, C, 1). Every expected key and shape is checked; missing, unexpected and wrong-shape keys,
  non-finite values and non-float tensors are all reported at once (StateDictMismatchError).
- `convert(state_dict)`: {'params': ...} for `model.AutoencoderKL`: conv weights OIHW -> HWIO, linear weights
  (out, in) -> (in, out), GroupNorm weight -> scale; `name.<i>` of PyTorch is `name_<i>` in Flax.
- `load_variables(path)`: the file -> the Flax variables. `convert_to_safetensors(src, dst)`: the checked tensors,
  float32, under diffusers' names, for machines where the source cannot be read (a pickle that needs torch).
- `check_shapes(shapes)`: the layout check on {name: shape} alone, without any data.
"""

from __future__ import annotations

import functools
import os
import re
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np

from ..weights_io import (  # the three errors are this module's too: its functions raise them
    Entry, KeyMatch, StateDictMismatchError, TorchRequiredError, WeightsError, flax_variables, float32_tensors, is_npz,
    is_safetensors, match_keys, raise_if_mismatched, read_npz, read_safetensors, read_torch_pickle, require_file,
    safetensors_shapes, torch_layout, write_safetensors)

_README = "third_party/sd_vae/README.md"
CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")  # where whole SD checkpoints keep the VAE


# --------------------------------------------------------------------------------------------------------------------
# The expected layout, derived from the Flax model itself

_INDEXED = re.compile(r"^(.+)_(\d+)$")  # Flax 'down_blocks_0' is PyTorch 'down_blocks.0'


def _module_name(path: Sequence[str]) -> str:
  """diffusers' name of the module at a Flax path."""
  return ".".join(".".join(m.groups()) if (m := _INDEXED.match(part)) else part for part in path)


def _config(config):
  from .model import SD

  return SD if config is None else config


@functools.lru_cache(maxsize=None)
def _layout(config) -> dict[str, Entry]:
  from .model import AutoencoderKL

  size = config.downsampling_factor
  return torch_layout(AutoencoderKL(config), (1, size, size, config.in_channels), _module_name)


def expected_shapes(config=None) -> dict[str, tuple[int, ...]]:
  """{diffusers name: PyTorch shape} of every tensor of the VAE (`config` defaults to model.SD, 248 tensors)."""
  return {name: entry.torch_shape for name, entry in _layout(_config(config)).items()}


# --------------------------------------------------------------------------------------------------------------------
# Other layouts -> diffusers' current names


def _checkpoint_prefix(keys: Sequence[str]) -> str:
  """'first_stage_model.' or 'vae.' when the keys are a whole SD checkpoint (the VAE's tensors under it), else ''."""
  for prefix in CHECKPOINT_PREFIXES:
    if any(k.startswith(prefix) for k in keys):
      return prefix
  return ""


def _is_ldm(names: Sequence[str]) -> bool:
  return any(n.startswith(("encoder.down.", "encoder.mid.", "decoder.up.", "decoder.mid.")) for n in names)


_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _from_ldm(name: str, levels: int) -> str:
  """One CompVis / LDM name in diffusers' layout; a name that fits no rule is returned unchanged (and then reported
  as unexpected). `levels` is len(block_out_channels): LDM's decoder.up.<i> is diffusers' up_blocks.<levels-1-i>."""
  m = re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", name)
  if m:
    return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}".replace(".nin_shortcut.", ".conv_shortcut.")
  m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", name)
  if m:
    return f"{m[1]}.mid_block.attentions.0.{_LDM_ATTENTION[m[2]]}.{m[3]}"
  m = re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", name)
  if m:
    return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}".replace(".nin_shortcut.", ".conv_shortcut.")
  m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", name)
  if m:
    return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
  m = re.fullmatch(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample\.conv)\.(.+)", name)
  if m and int(m[1]) < levels:
    block = levels - 1 - int(m[1])
    if m[3] is not None:
      return f"decoder.up_blocks.{block}.resnets.{m[3]}.{m[4]}".replace(".nin_shortcut.", ".conv_shortcut.")
    return f"decoder.up_blocks.{block}.upsamplers.0.conv.{m[4]}"
  m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", name)
  if m:
    return f"{m[1]}.conv_norm_out.{m[2]}"
  return name


def _from_old_attention(name: str) -> str:
  m = re.fullmatch(r"(.+\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", name)
  return f"{m[1]}.{_OLD_ATTENTION[m[2]]}.{m[3]}" if m else name


def _renaming(keys: Sequence[str], config, ignore_prefixes: tuple[str, ...]) -> tuple[dict[str, str], str]:
  """{source key: diffusers name} for the VAE's keys (ignored keys, and keys outside a checkpoint's VAE prefix, left
  out) and a note on the layout that was recognised."""
  prefix = _checkpoint_prefix(keys)
  names = {k: k[len(prefix):] for k in keys if k.startswith(prefix) and not k.startswith(ignore_prefixes)}
  ldm = _is_ldm(list(names.values()))
  levels = len(config.block_out_channels)
  renamed = {}
  for key, name in names.items():
    if ldm:
      name = _from_ldm(name, levels)
    renamed[key] = _from_old_attention(name)
  note = ""
  if prefix:
    note += f" (the VAE of a whole checkpoint: keys under {prefix!r})"
  if ldm:
    note += " (read as the CompVis / LDM layout; missing keys are named in diffusers' layout)"
  return renamed, note


# --------------------------------------------------------------------------------------------------------------------
# Checking and converting


def _describe(config) -> str:
  return (f"block_out_channels {tuple(config.block_out_channels)}, layers_per_block {config.layers_per_block}, "
          f"latent_channels {config.latent_channels}, norm_num_groups {config.norm_num_groups}")


def _fits(got: tuple[int, ...], expected: tuple[int, ...]) -> bool:
  """Equal, or a linear weight stored as a 1x1 convolution ((C, C, 1, 1) or (C, C, 1), CompVis' attention)."""
  return got == expected or (len(expected) == 2 and got in (expected + (1,), expected + (1, 1)))


def _match(shapes: Mapping[str, tuple], config, ignore_prefixes: Sequence[str]) -> tuple[KeyMatch, str]:
  """The keys matched with diffusers' layout (a renamed key is shown with its diffusers name), and the note of
  `_renaming`."""
  names, note = _renaming([k for k in shapes if isinstance(k, str)], config, tuple(ignore_prefixes))
  return match_keys(shapes, expected_shapes(config), names, fits=_fits, label="diffusers"), note


def _raise_if_problems(match: KeyMatch, note: str, config, non_finite=(), not_float=()) -> None:
  training = sorted({m[1] for m in (re.match(r"^(.*?(?:loss|model_ema)\.)", k) for k in match.unexpected_keys) if m})
  notes = [f"loss.* / model_ema.* belong to the training setup of the original CompVis checkpoint, not to the "
           f"autoencoder: pass ignore_prefixes={tuple(training)!r} to drop them"] if training else []
  raise_if_mismatched(f"the state dict does not match the AutoencoderKL layout ({_describe(config)}){note}", match,
                      non_finite=non_finite, not_float=not_float, notes=notes,
                      footer=f"Use a Stable Diffusion VAE's diffusion_pytorch_model.safetensors (see {_README}).")


def check_shapes(shapes: Mapping[str, Sequence[int]], *, config=None, ignore_prefixes: Sequence[str] = ()) -> None:
  """The layout check of `convert` on {name: shape} alone (no data): StateDictMismatchError lists every missing,
  unexpected or wrong-shape key. Accepts the same layouts and prefixes as `convert`."""
  config = _config(config)
  _raise_if_problems(*_match({k: tuple(s) for k, s in shapes.items()}, config, ignore_prefixes), config)


def to_diffusers_state_dict(state_dict: Mapping[str, Any], *, config=None,
                            ignore_prefixes: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """The VAE's tensors under diffusers' current names, float32, in PyTorch's layout (attention weights as (out, in)),
  in the layout's order. Every problem (missing / unexpected / wrong shape / non-finite / not float) is reported at
  once by StateDictMismatchError."""
  config = _config(config)
  expected = expected_shapes(config)
  arrays = {k: np.asarray(v) for k, v in state_dict.items()}
  match, note = _match({k: a.shape for k, a in arrays.items()}, config, ignore_prefixes)
  tensors, non_finite, not_float = float32_tensors(arrays, match, expected)
  _raise_if_problems(match, note, config, non_finite, not_float)
  return {name: tensors[name] for name in expected}


def convert(state_dict: Mapping[str, Any], *, config=None, ignore_prefixes: Sequence[str] = ()) -> dict[str, dict]:
  """{'params': nested dicts of float32 numpy arrays} for `model.AutoencoderKL(config)` (config defaults to
  model.SD; SD and SDXL VAEs share it). `state_dict` maps names to arrays in PyTorch's layout, in any of the layouts
  `to_diffusers_state_dict` accepts; keys starting with one of `ignore_prefixes` are skipped."""
  config = _config(config)
  checked = to_diffusers_state_dict(state_dict, config=config, ignore_prefixes=ignore_prefixes)
  return flax_variables(_layout(config), checked)


# --------------------------------------------------------------------------------------------------------------------
# Files


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} from a .safetensors, an .npz of flat names, or a PyTorch pickle (.ckpt / .pth / .bin), names and
  layout as stored. From a whole SD checkpoint in .safetensors only the VAE's tensors (under 'first_stage_model.'
  or 'vae.') are read; a pickle is read whole."""
  path = os.fspath(path)
  require_file(path, "The Stable Diffusion VAE weights are not downloaded by this code: "
                     f"see {_README} for where to get them.")
  if not zipfile.is_zipfile(path) and is_safetensors(path):
    names = list(safetensors_shapes(path))
    prefix = _checkpoint_prefix(names)
    return read_safetensors(path, [n for n in names if n.startswith(prefix)])
  if is_npz(path):
    return read_npz(path)
  return read_torch_pickle(path, converter="third_party.sd_vae.convert.convert_to_safetensors",
                           output="vae.safetensors")  # torch.save's zip archive or legacy (pre-1.6) stream


def load_variables(path: str, *, config=None, ignore_prefixes: Sequence[str] = ()) -> dict[str, dict]:
  """{'params': ...} for `model.AutoencoderKL(config)` from a weights file (see `load_state_dict`), checked by
  `convert`. config defaults to model.SD, whose layout SDXL's VAE shares."""
  return convert(load_state_dict(path), config=config, ignore_prefixes=ignore_prefixes)


def convert_to_safetensors(src: str, dst: str, *, config=None, ignore_prefixes: Sequence[str] = ()) -> str:
  """Checks the VAE in `src` (any file `load_state_dict` reads) and writes it to `dst` as float32 .safetensors under
  diffusers' current names and shapes, the layout of diffusers' diffusion_pytorch_model.safetensors. Returns dst."""
  checked = to_diffusers_state_dict(load_state_dict(src), config=config, ignore_prefixes=ignore_prefixes)
  return write_safetensors(dst, checked, metadata={"format": "pt"})
