"""Stable Diffusion VAE weights (diffusers' AutoencoderKL state dict) -> Flax variables of `model.AutoencoderKL`.

- `read_safetensors(path)` / `write_safetensors(path, tensors)`: the .safetensors format with numpy alone: 8 bytes of
  little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}} (plus an optional
  '__metadata__'), then the raw little-endian data. F32, F16, BF16 and F64 are read as float32; integer and bool
  tensors keep their dtype (the converter refuses them by name).
- `load_state_dict(path)`: a .safetensors, an .npz of flat names, or a PyTorch pickle (.ckpt / .pth / .bin, read
  torch-free by third_party.fid_inception.convert's restricted reader, with torch as the fallback) as {name: array}.
  From a whole Stable Diffusion checkpoint (keys under 'first_stage_model.' or 'vae.') only the VAE is kept, and a
  .safetensors reads only those tensors' bytes.
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
import json
import math
import os
import re
import zipfile
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from selfperc_jax.errors import UserError

_MAX_LISTED = 20
_README = "third_party/sd_vae/README.md"
CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")  # where whole SD checkpoints keep the VAE


class WeightsError(UserError):
  """A weights file that cannot be read, or whose contents do not fit the AutoencoderKL layout."""


class TorchRequiredError(WeightsError):
  """A pickled checkpoint that needs torch to be read, and torch is not importable."""


class StateDictMismatchError(WeightsError, ValueError):
  """The state dict differs from the AutoencoderKL layout. `missing` (diffusers' names), `unexpected`, `mismatched`
  (key -> (got, expected)), `non_finite` and `not_float` (the file's names) say how."""

  def __init__(self, message: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
               mismatched: Mapping[str, tuple] | None = None, non_finite: Sequence[str] = (),
               not_float: Sequence[str] = ()):
    super().__init__(message)
    self.missing, self.unexpected = list(missing), list(unexpected)
    self.mismatched = dict(mismatched or {})
    self.non_finite, self.not_float = list(non_finite), list(not_float)


# --------------------------------------------------------------------------------------------------------------------
# The expected layout, derived from the Flax model itself


class _Entry(NamedTuple):
  path: tuple[str, ...]  # the Flax path inside 'params'
  torch_shape: tuple[int, ...]
  to_flax: Callable[[np.ndarray], np.ndarray]


def _oihw_to_hwio(a):
  return a.transpose(2, 3, 1, 0)


def _transpose2(a):
  return a.T


def _identity(a):
  return a


_INDEXED = re.compile(r"^(.+)_(\d+)$")  # Flax 'down_blocks_0' is PyTorch 'down_blocks.0'


def _torch_entry(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, _Entry]:
  """diffusers' name of one Flax leaf, with its PyTorch shape and the transform into the Flax layout."""
  parts = []
  for part in path[:-1]:
    match = _INDEXED.match(part)
    parts.extend(match.groups() if match else (part,))
  prefix, leaf = ".".join(parts), path[-1]
  if leaf == "kernel" and len(shape) == 4:  # conv, HWIO <- OIHW
    kh, kw, cin, cout = shape
    return f"{prefix}.weight", _Entry(path, (cout, cin, kh, kw), _oihw_to_hwio)
  if leaf == "kernel" and len(shape) == 2:  # linear, (in, out) <- (out, in)
    return f"{prefix}.weight", _Entry(path, (shape[1], shape[0]), _transpose2)
  if leaf == "scale":  # GroupNorm
    return f"{prefix}.weight", _Entry(path, tuple(shape), _identity)
  if leaf == "bias":
    return f"{prefix}.bias", _Entry(path, tuple(shape), _identity)
  raise AssertionError(f"no PyTorch name for Flax variable {'/'.join(path)} {shape}")


def _config(config):
  from .model import SD

  return SD if config is None else config


@functools.lru_cache(maxsize=None)
def _layout(config) -> dict[str, _Entry]:
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  from .model import AutoencoderKL

  size = config.downsampling_factor
  shapes = jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32))
  layout = {}
  for path, leaf in traverse_util.flatten_dict(shapes["params"]).items():
    name, entry = _torch_entry(path, tuple(leaf.shape))
    layout[name] = entry
  return layout


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


def _is_ignored(key: str, ignore_prefixes: Sequence[str]) -> bool:
  return any(key.startswith(p) for p in ignore_prefixes)


def _renaming(keys: Sequence[str], config, ignore_prefixes: Sequence[str]) -> tuple[dict[str, str], str]:
  """{source key: diffusers name} for the VAE's keys (ignored keys, and keys outside a checkpoint's VAE prefix, left
  out) and a note on the layout that was recognised."""
  prefix = _checkpoint_prefix(keys)
  names = {k: k[len(prefix):] for k in keys if k.startswith(prefix) and not _is_ignored(k, ignore_prefixes)}
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


def _listing(title: str, items: Sequence[str]) -> str:
  shown = "\n    ".join(items[:_MAX_LISTED])
  more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"\n  {title} ({len(items)}):\n    {shown}{more}"


def _fits(got: tuple[int, ...], expected: tuple[int, ...]) -> bool:
  """Equal, or a linear weight stored as a 1x1 convolution ((C, C, 1, 1) or (C, C, 1), CompVis' attention)."""
  return got == expected or (len(expected) == 2 and got in (expected + (1,), expected + (1, 1)))


class _Plan(NamedTuple):
  sources: dict[str, str]  # diffusers name -> source key
  missing: list[str]
  unexpected: list[str]  # as shown: the file's name, and diffusers' where renamed
  unexpected_keys: list[str]  # the file's names
  mismatched: dict[str, tuple]
  note: str


def _plan(shapes: Mapping[str, tuple], config, ignore_prefixes: Sequence[str]) -> _Plan:
  layout = _layout(config)
  bad_keys = [repr(k) for k in shapes if not isinstance(k, str)]
  renamed, note = _renaming([k for k in shapes if isinstance(k, str)], config, tuple(ignore_prefixes))
  sources, unexpected, unexpected_keys, mismatched = {}, list(bad_keys), [], {}
  for key, name in renamed.items():
    shown = key if key == name else f"{key} (diffusers: {name})"
    entry = layout.get(name)
    if entry is None or name in sources:
      unexpected.append(shown if entry is None else f"{shown}: a second tensor for {name}, after {sources[name]}")
      unexpected_keys.append(key)
    elif not _fits(tuple(shapes[key]), entry.torch_shape):
      mismatched[shown] = (tuple(shapes[key]), entry.torch_shape)
      sources[name] = key  # present, so not also missing
    else:
      sources[name] = key
  missing = [name for name in layout if name not in sources]
  return _Plan(sources, missing, unexpected, unexpected_keys, mismatched, note)


def _raise_if_problems(plan: _Plan, config, non_finite=(), not_float=()) -> None:
  if not (plan.missing or plan.unexpected or plan.mismatched or non_finite or not_float):
    return
  message = f"the state dict does not match the AutoencoderKL layout ({_describe(config)}){plan.note}:"
  if plan.missing:
    message += _listing("missing keys", plan.missing)
  if plan.unexpected:
    message += _listing("unexpected keys", plan.unexpected)
  if plan.mismatched:
    message += _listing("wrong shapes", [f"{k}: got {g}, expected {e}" for k, (g, e) in plan.mismatched.items()])
  if non_finite:
    message += _listing("NaN or infinite values", list(non_finite))
  if not_float:
    message += _listing("not floating point", list(not_float))
  training = sorted({m[1] for m in (re.match(r"^(.*?(?:loss|model_ema)\.)", k) for k in plan.unexpected_keys) if m})
  if training:
    message += ("\n  (loss.* / model_ema.* belong to the training setup of the original CompVis checkpoint, not to "
                f"the autoencoder: pass ignore_prefixes={tuple(training)!r} to drop them)")
  message += f"\nUse a Stable Diffusion VAE's diffusion_pytorch_model.safetensors (see {_README})."
  raise StateDictMismatchError(message, plan.missing, plan.unexpected, plan.mismatched, non_finite, not_float)


def check_shapes(shapes: Mapping[str, Sequence[int]], *, config=None, ignore_prefixes: Sequence[str] = ()) -> None:
  """The layout check of `convert` on {name: shape} alone (no data): StateDictMismatchError lists every missing,
  unexpected or wrong-shape key. Accepts the same layouts and prefixes as `convert`."""
  config = _config(config)
  _raise_if_problems(_plan({k: tuple(s) for k, s in shapes.items()}, config, ignore_prefixes), config)


def _is_float(array: np.ndarray) -> bool:
  return np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"


def to_diffusers_state_dict(state_dict: Mapping[str, Any], *, config=None,
                            ignore_prefixes: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """The VAE's tensors under diffusers' current names, float32, in PyTorch's layout (attention weights as (out, in)),
  in the layout's order. Every problem (missing / unexpected / wrong shape / non-finite / not float) is reported at
  once by StateDictMismatchError."""
  config = _config(config)
  arrays = {k: np.asarray(v) for k, v in state_dict.items()}
  plan = _plan({k: a.shape for k, a in arrays.items()}, config, ignore_prefixes)
  layout = _layout(config)
  out, non_finite, not_float = {}, [], []
  for name, key in plan.sources.items():
    array = arrays[key]
    if not _is_float(array):
      not_float.append(f"{key}: dtype {array.dtype}")
      continue
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
      non_finite.append(key)
    if array.shape != layout[name].torch_shape and array.size == math.prod(layout[name].torch_shape):
      array = array.reshape(layout[name].torch_shape)  # (C, C, 1, 1) attention weights
    out[name] = array
  _raise_if_problems(plan, config, non_finite, not_float)
  return {name: out[name] for name in layout}


def convert(state_dict: Mapping[str, Any], *, config=None, ignore_prefixes: Sequence[str] = ()) -> dict[str, dict]:
  """{'params': nested dicts of float32 numpy arrays} for `model.AutoencoderKL(config)` (config defaults to
  model.SD; SD and SDXL VAEs share it). `state_dict` maps names to arrays in PyTorch's layout, in any of the layouts
  `to_diffusers_state_dict` accepts; keys starting with one of `ignore_prefixes` are skipped."""
  from flax import traverse_util

  config = _config(config)
  layout = _layout(config)
  checked = to_diffusers_state_dict(state_dict, config=config, ignore_prefixes=ignore_prefixes)
  flat = {layout[name].path: np.ascontiguousarray(layout[name].to_flax(a)) for name, a in checked.items()}
  return {"params": traverse_util.unflatten_dict(flat)}


# --------------------------------------------------------------------------------------------------------------------
# .safetensors with numpy

_ST_DTYPES = {  # safetensors dtype -> (little-endian numpy dtype as stored, itemsize)
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2),
    "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1), "U8": ("u1", 1), "BOOL": ("?", 1),
}
_ST_FLOATS = ("F64", "F32", "F16", "BF16")
_MAX_HEADER = 100 * 2 ** 20


class _TensorInfo(NamedTuple):
  dtype: str
  shape: tuple[int, ...]
  begin: int  # byte offsets into the data section
  end: int


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
  return (bits.astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
  """Round to nearest even (NaN stays NaN), as torch's float32 -> bfloat16 cast."""
  bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
  rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
  return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def _read_header(f, path: str) -> tuple[dict[str, _TensorInfo], dict, int]:
  """({name: info}, metadata, start of the data section) of an open .safetensors; WeightsError if malformed."""
  size = os.fstat(f.fileno()).st_size
  head = f.read(8)
  length = int.from_bytes(head, "little") if len(head) == 8 else -1
  if length < 2 or length > min(size - 8, _MAX_HEADER):
    raise WeightsError(f"{path!r} is not a .safetensors file (header length {length} in a file of {size} bytes): "
                       "it is truncated, or another format.")
  try:
    header = json.loads(f.read(length).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WeightsError(f"{path!r} has an unreadable .safetensors header ({e}).") from e
  if not isinstance(header, dict):
    raise WeightsError(f"{path!r} has a .safetensors header that is not a JSON object.")
  metadata = header.pop("__metadata__", None) or {}
  data_size, infos, bad = size - 8 - length, {}, []
  for name, spec in header.items():
    try:
      dtype, shape, (begin, end) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
      begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError):
      bad.append(f"{name}: malformed entry {spec!r}")
      continue
    if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_size:
      bad.append(f"{name}: shape {shape}, bytes {begin}..{end} of a data section of {data_size}")
    elif dtype in _ST_DTYPES and end - begin != math.prod(shape) * _ST_DTYPES[dtype][1]:
      bad.append(f"{name}: {end - begin} bytes for {dtype} {shape}")
    else:
      infos[name] = _TensorInfo(dtype, shape, begin, end)
  if bad:
    raise WeightsError(f"{path!r} is truncated or corrupt:" + _listing("bad tensor entries", bad))
  return infos, metadata, 8 + length


def safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """{name: shape} from a .safetensors header, reading no tensor data."""
  path = os.fspath(path)
  _check_file(path)
  with open(path, "rb") as f:
    return {name: info.shape for name, info in _read_header(f, path)[0].items()}


def read_safetensors(path: str, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """{name: array} of a .safetensors file (all tensors, or `names` only, reading only their bytes). Floating point
  tensors (F32, F16, BF16, F64) come back as float32, integer and bool ones in their own dtype."""
  path = os.fspath(path)
  _check_file(path)
  with open(path, "rb") as f:
    infos, _, start = _read_header(f, path)
    names = list(infos) if names is None else list(names)
    absent = [n for n in names if n not in infos]
    unknown = [f"{n}: {infos[n].dtype}" for n in names if n in infos and infos[n].dtype not in _ST_DTYPES]
    if absent or unknown:
      raise WeightsError(f"{path!r} cannot give the requested tensors:" + (_listing("absent", absent) if absent else "")
                         + (_listing("unsupported dtypes", unknown) if unknown else ""))
    out = {}
    for name in names:
      info = infos[name]
      f.seek(start + info.begin)
      data = f.read(info.end - info.begin)
      if len(data) != info.end - info.begin:
        raise WeightsError(f"{path!r} ends inside the data of {name!r}: the file is truncated.")
      array = np.frombuffer(data, np.dtype(_ST_DTYPES[info.dtype][0])).reshape(info.shape)
      if info.dtype == "BF16":
        array = _bf16_bits_to_float32(array)
      elif info.dtype in _ST_FLOATS:
        array = array.astype(np.float32)
      out[name] = np.array(array, array.dtype.newbyteorder("="))  # a native-endian, writable copy
  return out


def write_safetensors(path: str, tensors: Mapping[str, Any], *, dtype: str = "F32",
                      metadata: Mapping[str, str] | None = None) -> str:
  """Writes `tensors` ({name: array}) as a .safetensors file; floating point arrays are stored as `dtype` ('F32',
  'F16' or 'BF16', rounded to nearest even), integer / bool ones as they are. Written to a temporary name and renamed.
  Returns path."""
  if dtype not in ("F32", "F16", "BF16"):
    raise ValueError(f"dtype must be 'F32', 'F16' or 'BF16'; got {dtype!r}.")
  path = os.fspath(path)
  header, blobs, offset = {}, [], 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  integer_dtypes = {np.dtype(v[0]).newbyteorder("=").str: k for k, v in _ST_DTYPES.items() if k not in _ST_FLOATS}
  for name, value in tensors.items():
    array = np.asarray(value)
    if _is_float(array):
      stored = dtype
      array = array.astype(np.float32)
      raw = _float32_to_bf16_bits(array) if dtype == "BF16" else array.astype(_ST_DTYPES[dtype][0])
    elif array.dtype.newbyteorder("=").str in integer_dtypes:
      stored = integer_dtypes[array.dtype.newbyteorder("=").str]
      raw = array.astype(_ST_DTYPES[stored][0])
    else:
      raise ValueError(f"{name!r}: cannot store dtype {array.dtype} in a .safetensors file.")
    data = np.ascontiguousarray(raw).astype(np.dtype(raw.dtype).newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": stored, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
  encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned, as the safetensors library does
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(encoded)
    for data in blobs:
      f.write(data)
  os.replace(tmp, path)
  return path


# --------------------------------------------------------------------------------------------------------------------
# Files


def _check_file(path: str) -> None:
  if not os.path.isfile(path):
    raise WeightsError(f"weights file {path!r} does not exist. The Stable Diffusion VAE weights are not downloaded by "
                       f"this code: see {_README} for where to get them.")


def _is_safetensors(path: str) -> bool:
  with open(path, "rb") as f:
    head = f.read(9)
  if path.endswith(".safetensors"):
    return True
  return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= _MAX_HEADER


def _is_npz(path: str) -> bool:
  if path.endswith(".npz"):
    return True
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
  return bool(names) and all(n.endswith(".npy") for n in names)


def _load_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {key: np.asarray(data[key]) for key in data.files}
  except Exception as e:
    raise WeightsError(f"{path!r} is not a readable .npz ({type(e).__name__}: {e}).") from e


def _load_pickle(path: str) -> dict[str, np.ndarray]:
  """A torch.save'd state dict or checkpoint ({'state_dict': ...}) through the FID Inception package's torch-free
  reader (torch.load(weights_only=True) where that reader gives up and torch is importable)."""
  from ..fid_inception import convert as pth

  try:
    return pth.load_state_dict(path)
  except pth.TorchRequiredError as e:
    detail = f": it contains {e.__cause__}" if e.__cause__ is not None else ""
    raise TorchRequiredError(
        f"{path!r} cannot be read without PyTorch{detail}. Install torch (`{pth.TORCH_INSTALL_HINT}`), or, on a "
        f"machine that has it, run third_party.sd_vae.convert.convert_to_safetensors({path!r}, 'vae.safetensors') and pass that file "
        "instead.") from e
  except pth.WeightsError as e:
    raise WeightsError(str(e)) from e


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} from a .safetensors, an .npz of flat names, or a PyTorch pickle (.ckpt / .pth / .bin), names and
  layout as stored. From a whole SD checkpoint in .safetensors only the VAE's tensors (under 'first_stage_model.'
  or 'vae.') are read; a pickle is read whole."""
  path = os.fspath(path)
  _check_file(path)
  if zipfile.is_zipfile(path):
    return _load_npz(path) if _is_npz(path) else _load_pickle(path)
  if _is_safetensors(path):
    names = list(safetensors_shapes(path))
    prefix = _checkpoint_prefix(names)
    return read_safetensors(path, [n for n in names if n.startswith(prefix)])
  return _load_pickle(path)  # torch.save's legacy (pre-1.6) stream format


def load_variables(path: str, *, config=None, ignore_prefixes: Sequence[str] = ()) -> dict[str, dict]:
  """{'params': ...} for `model.AutoencoderKL(config)` from a weights file (see `load_state_dict`), checked by
  `convert`. config defaults to model.SD, whose layout SDXL's VAE shares."""
  return convert(load_state_dict(path), config=config, ignore_prefixes=ignore_prefixes)


def convert_to_safetensors(src: str, dst: str, *, config=None, ignore_prefixes: Sequence[str] = ()) -> str:
  """Checks the VAE in `src` (any file `load_state_dict` reads) and writes it to `dst` as float32 .safetensors under
  diffusers' current names and shapes, the layout of diffusers' diffusion_pytorch_model.safetensors. Returns dst."""
  checked = to_diffusers_state_dict(load_state_dict(src), config=config, ignore_prefixes=ignore_prefixes)
  return write_safetensors(dst, checked, metadata={"format": "pt"})
