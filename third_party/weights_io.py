"""Weights files read and written with numpy alone, and the state-dict checks, for every converter in third_party/.

Our own code, written for this project from the public descriptions of the file formats: the safetensors format (the
"Format" section of huggingface/safetensors' README), PyTorch's torch.save serialisation (the zip archive of
torch >= 1.6 and the older stream format) and numpy's .npz. No code was copied from safetensors, PyTorch or any
other project. Each converter
(fid_inception/convert.py, sd_vae/convert.py) keeps only its network's layout; this module holds what they share:

- errors: `WeightsError` (a `selfperc_jax.errors.UserError`), its `TorchRequiredError` and `StateDictMismatchError`.
- layouts: `variable_shapes(module, input_shape)`, the shapes of a module's variables (abstract, remembered);
  `torch_layout(module, input_shape)` names every Flax variable of a module as PyTorch does, with its PyTorch
  shape and the transform into Flax's layout (conv OIHW -> HWIO, linear (out, in) -> (in, out)); `match_keys`,
  `float32_tensors` and `raise_if_mismatched` check a state dict against it and report every problem at once;
  `flax_variables` builds the nested Flax variables.
- files: `read_torch_pickle` reads both torch.save formats through a restricted unpickler that knows tensors, storages
  and OrderedDict and nothing else (so no code in the file ever runs), and hands a file that needs more to
  `torch.load(weights_only=True)` when torch is importable; `read_safetensors` / `write_safetensors` /
  `safetensors_shapes` (F32, F16, BF16 and F64 are read as float32; integer and bool tensors keep their dtype);
  `read_npz` / `write_npz`; `require_file`, `is_npz` and `is_safetensors`.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import math
import operator
import os
import pickle
import zipfile
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from selfperc_jax.errors import UserError

TORCH_INSTALL_HINT = "pip install torch==2.13.0"
_MAX_LISTED = 20


class WeightsError(UserError):
  """A weights file that cannot be read, or whose contents do not fit the network's layout."""


class TorchRequiredError(WeightsError):
  """A pickled file that needs torch to be read, and torch is not importable."""


class StateDictMismatchError(WeightsError, ValueError):
  """The state dict differs from the network's layout. `missing` (the layout's names), `unexpected`, `mismatched`
  (key -> (got, expected)), `non_finite` and `not_float` (the file's names) say how."""

  def __init__(self, message: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
               mismatched: Mapping[str, tuple] | None = None, non_finite: Sequence[str] = (),
               not_float: Sequence[str] = ()):
    super().__init__(message)
    self.missing, self.unexpected = list(missing), list(unexpected)
    self.mismatched = dict(mismatched or {})
    self.non_finite, self.not_float = list(non_finite), list(not_float)


def listing(title: str, items: Sequence[str]) -> str:
  """'\\n  title (n):' and the first 20 items, one an indented line, for an error message."""
  shown = "\n    ".join(items[:_MAX_LISTED])
  more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"\n  {title} ({len(items)}):\n    {shown}{more}"


def _is_float(array: np.ndarray) -> bool:
  return np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"


# --------------------------------------------------------------------------------------------------------------------
# A Flax module's variables under PyTorch's names, and the checks of a state dict against them


class Entry(NamedTuple):
  """One Flax variable and the PyTorch tensor it is made from."""
  collection: str  # 'params' | 'batch_stats'
  path: tuple[str, ...]  # the Flax path inside the collection
  torch_shape: tuple[int, ...]
  to_flax: Callable[[np.ndarray], np.ndarray]


def _identity(a):
  return a


def _oihw_to_hwio(a):
  return a.transpose(2, 3, 1, 0)


def _transpose(a):
  return a.T


_TORCH_LEAVES = {("params", "scale"): "weight", ("params", "bias"): "bias",
                 ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


@functools.lru_cache(maxsize=8)
def variable_shapes(module, input_shape: tuple[int, ...]) -> dict:
  """The variables that `module.init` makes for a float32 input of `input_shape`, as jax.ShapeDtypeStructs (by
  jax.eval_shape: no memory). Remembered per (module, shape): tracing a full-size network takes seconds, and a
  converter's layout and a caller that makes variables of the same shapes would each pay it. Shared: read it, never
  change it."""
  import jax
  import jax.numpy as jnp

  return jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(input_shape, jnp.float32))


def torch_layout(module, input_shape: tuple[int, ...],
                 module_name: Callable[[Sequence[str]], str] = ".".join) -> dict[str, Entry]:
  """{PyTorch name: Entry} of every variable that `module.init` makes for a float32 input of `input_shape` (shapes
  only, by jax.eval_shape). PyTorch's names: '<module>.weight' for a kernel (conv (kh, kw, I, O) from (O, I, kh, kw),
  linear (in, out) from (out, in)) and for a norm's scale, '<module>.bias', and BatchNorm's statistics
  '<module>.running_mean' / 'running_var'. `module_name(path)` names the module at a Flax path (default: joined by
  dots)."""
  from flax import traverse_util

  shapes = variable_shapes(module, tuple(input_shape))
  shapes = dict(sorted(shapes.items(), key=lambda item: item[0] != "params"))  # params first, then the statistics
  layout = {}
  for (collection, *path), leaf in traverse_util.flatten_dict(shapes).items():
    shape = tuple(leaf.shape)
    if collection == "params" and path[-1] == "kernel" and len(shape) == 4:  # conv, HWIO <- OIHW
      kh, kw, cin, cout = shape
      torch_leaf, torch_shape, to_flax = "weight", (cout, cin, kh, kw), _oihw_to_hwio
    elif collection == "params" and path[-1] == "kernel" and len(shape) == 2:  # linear, (in, out) <- (out, in)
      torch_leaf, torch_shape, to_flax = "weight", shape[::-1], _transpose
    elif (collection, path[-1]) in _TORCH_LEAVES:
      torch_leaf, torch_shape, to_flax = _TORCH_LEAVES[collection, path[-1]], shape, _identity
    else:
      raise AssertionError(f"no PyTorch name for Flax variable {collection}/{'/'.join(path)} {shape}")
    layout[f"{module_name(path[:-1])}.{torch_leaf}"] = Entry(collection, tuple(path), torch_shape, to_flax)
  return layout


class KeyMatch(NamedTuple):
  """How a state dict's keys meet a layout (see `match_keys`)."""
  sources: dict[str, str]  # layout name -> the state dict's key (one of the wrong shape too: it is not missing)
  missing: list[str]  # layout names
  unexpected: list[str]  # as shown in the error
  unexpected_keys: list[str]  # the state dict's own keys
  mismatched: dict[str, tuple]  # key as shown -> (got, expected)


def match_keys(shapes: Mapping[Any, tuple], expected: Mapping[str, tuple], names: Mapping[str, str], *,
               fits: Callable[[tuple, tuple], bool] = operator.eq, label: str = "layout") -> KeyMatch:
  """Matches a state dict's {key: shape} with `expected` ({layout name: shape}). `names` gives the layout name of each
  string key to check (the keys it leaves out are skipped; keys that are not strings are unexpected). A key is
  unexpected when its name is not in the layout or an earlier key has it, mismatched unless fits(shape, expected
  shape). A renamed key is shown as 'key (<label>: name)'."""
  sources, unexpected, unexpected_keys, mismatched = {}, [repr(k) for k in shapes if not isinstance(k, str)], [], {}
  for key, name in names.items():
    shown = key if key == name else f"{key} ({label}: {name})"
    if name not in expected or name in sources:
      unexpected.append(shown + (f": a second tensor for {name}, after {sources[name]}" if name in sources else ""))
      unexpected_keys.append(key)
      continue
    sources[name] = key
    if not fits(tuple(shapes[key]), expected[name]):
      mismatched[shown] = (tuple(shapes[key]), expected[name])
  missing = [name for name in expected if name not in sources]
  return KeyMatch(sources, missing, unexpected, unexpected_keys, mismatched)


def float32_tensors(arrays: Mapping[str, np.ndarray], match: KeyMatch,
                    expected: Mapping[str, tuple]) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """({layout name: float32 array} of the matched keys, the keys with NaN or infinite values, 'key: dtype ...' of the
  keys that are not floating point). An array that fits its expected shape without being it (a linear weight stored
  as a 1x1 convolution) is reshaped to it."""
  tensors, non_finite, not_float = {}, [], []
  for name, key in match.sources.items():
    array = arrays[key]
    if not _is_float(array):
      not_float.append(f"{key}: dtype {array.dtype}")
      continue
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
      non_finite.append(key)
    if array.shape != expected[name] and array.size == math.prod(expected[name]):
      array = array.reshape(expected[name])
    tensors[name] = array
  return tensors, non_finite, not_float


def raise_if_mismatched(header: str, match: KeyMatch, *, non_finite: Sequence[str] = (),
                        not_float: Sequence[str] = (), notes: Sequence[str] = (), footer: str = "") -> None:
  """StateDictMismatchError listing every problem at once, if there is any: '<header>:', the listings, a line
  '  (<note>)' for each note, then the footer."""
  wrong = [f"{k}: got {g}, expected {e}" for k, (g, e) in match.mismatched.items()]
  listings = [("missing keys", match.missing), ("unexpected keys", match.unexpected), ("wrong shapes", wrong),
              ("NaN or infinite values", list(non_finite)), ("not floating point", list(not_float))]
  if not any(items for _, items in listings):
    return
  message = f"{header}:" + "".join(listing(title, items) for title, items in listings if items)
  message += "".join(f"\n  ({note})" for note in notes) + f"\n{footer}"
  raise StateDictMismatchError(message, match.missing, match.unexpected, match.mismatched, non_finite, not_float)


def flax_variables(layout: Mapping[str, Entry], tensors: Mapping[str, np.ndarray]) -> dict[str, dict]:
  """{collection: nested dicts} from {PyTorch name: array of the layout's PyTorch shape}, each through its Entry's
  transform."""
  from flax import traverse_util

  flat = {(e.collection,) + e.path: np.ascontiguousarray(e.to_flax(tensors[name])) for name, e in layout.items()}
  return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------------------------------------------------
# Files


def require_file(path: str, hint: str = "") -> None:
  """WeightsError (with `hint`, e.g. where to get the weights) unless `path` is a file."""
  if not os.path.isfile(path):
    raise WeightsError(f"weights file {path!r} does not exist.{' ' + hint if hint else ''}")


def read_json_object(path: str, hint: str = "") -> dict:
  """The JSON object in `path` (a model folder's config.json); a missing file, bad JSON or another JSON value is a
  WeightsError."""
  import json

  require_file(path, hint)
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WeightsError(f"{path!r} is not a readable JSON config ({type(e).__name__}: {e}).") from e
  if not isinstance(data, dict):
    raise WeightsError(f"{path!r} holds a {type(data).__name__}, not a config object.")
  return data


def is_npz(path: str) -> bool:
  """Named .npz, or a zip archive of .npy files only."""
  if path.endswith(".npz"):
    return True
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
  return bool(names) and all(n.endswith(".npy") for n in names)


def _temporary_name(path: str, suffix: str = "") -> str:
  """A name next to `path` (whose folder is made) to write to, then rename to `path`: a failed write never leaves a
  file that looks complete."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return f"{path}.tmp{os.getpid()}{suffix}"


def write_npz(path: str, tensors: Mapping[str, np.ndarray]) -> str:
  """Writes {name: array} as an .npz (to a temporary name, then renamed). Returns path."""
  path = os.fspath(path)
  tmp = _temporary_name(path, ".npz")  # np.savez would append .npz to any other name
  np.savez(tmp, **tensors)
  os.replace(tmp, path)
  return path


def read_npz(path: str) -> dict[str, np.ndarray]:
  """{key: array} of an .npz (no pickled objects)."""
  require_file(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      return {key: np.asarray(data[key]) for key in data.files}
  except Exception as e:
    raise WeightsError(f"{path!r} is not a readable .npz ({type(e).__name__}: {e}).") from e


# --------------------------------------------------------------------------------------------------------------------
# torch.save's files without torch


class _Unsupported(Exception):
  """Something in the file that the torch-free reader does not handle (then torch is needed)."""


_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "UntypedStorage": "uint8",
}
_TORCH_DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64", "float16": "float16",
    "half": "float16", "bfloat16": "bfloat16", "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
    "int16": "int16", "short": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool", "uint16": "uint16",
    "uint32": "uint32", "uint64": "uint64",
}


def _numpy_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # a dependency of jax

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


class _DtypeTag(NamedTuple):
  """What a storage class (torch.FloatStorage) or a dtype (torch.float32) unpickles to: its numpy dtype's name."""
  dtype: str


class _StorageRef(NamedTuple):
  key: str
  dtype: str
  offset: int  # elements; legacy storage views start inside their root storage


class _LazyTensor(NamedTuple):
  storage: _StorageRef
  offset: int
  size: tuple
  stride: tuple
  dtype: str


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  if not isinstance(storage, _StorageRef):
    raise _Unsupported(f"a tensor whose storage is a {type(storage).__name__}")
  return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride), storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *unused):
  """torch's rebuild for dtypes without a typed storage class: an untyped (byte) storage plus the dtype."""
  if not isinstance(storage, _StorageRef) or not isinstance(dtype, _DtypeTag):
    raise _Unsupported("a tensor rebuilt by _rebuild_tensor_v3 from unknown parts")
  return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride), dtype.dtype)


def _rebuild_parameter(data, *unused):
  return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
  """Knows exactly the globals in _GLOBALS, torch's storage classes and dtypes; storages become _StorageRef."""

  def __init__(self, file, legacy: bool):
    super().__init__(file)
    self.legacy = legacy
    self.storage_dtypes: dict[str, str] = {}  # root key -> dtype name

  def find_class(self, module, name):
    if (module, name) in _GLOBALS:
      return _GLOBALS[module, name]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _DtypeTag(_STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
      return _DtypeTag(_TORCH_DTYPES[name])
    raise _Unsupported(f"the pickled object {module}.{name}")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise _Unsupported(f"a persistent id of kind {pid[0] if isinstance(pid, tuple) and pid else pid!r}")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _DtypeTag):
      raise _Unsupported(f"the storage type {storage_type!r}")
    offset = 0
    if self.legacy and len(pid) > 5 and pid[5] is not None:  # a view: (view_key, offset, size) into root `key`
      offset = int(pid[5][1])
    self.storage_dtypes.setdefault(key, storage_type.dtype)
    return _StorageRef(key, storage_type.dtype, offset)


class _NoGlobals(pickle.Unpickler):
  """For the legacy header pickles and the storage key list: plain data only."""

  def find_class(self, module, name):
    raise _Unsupported(f"the pickled object {module}.{name} in a file header")


def _materialise(tensor: _LazyTensor, data: bytes, byteorder: str) -> np.ndarray:
  dtype = _numpy_dtype(tensor.dtype)
  if byteorder == "big" and dtype.itemsize > 1:
    dtype = dtype.newbyteorder(">")
  elif dtype.itemsize > 1:
    dtype = dtype.newbyteorder("<")
  usable = len(data) - len(data) % dtype.itemsize
  flat = np.frombuffer(data[:usable], dtype=dtype)
  size, stride = tensor.size, tensor.stride
  start = tensor.storage.offset + tensor.offset
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise WeightsError(f"a tensor with size {size} and stride {stride} is malformed.")
  if math.prod(size) == 0:
    return np.zeros(size, dtype.newbyteorder("="))
  last = start + sum((n - 1) * s for n, s in zip(size, stride))
  if start < 0 or last >= flat.size:
    raise WeightsError(f"a tensor (size {size}, stride {stride}, offset {start}) reaches past its storage of "
                       f"{flat.size} elements: the file is truncated or corrupt.")
  view = np.lib.stride_tricks.as_strided(flat[start:], shape=size, strides=[s * dtype.itemsize for s in stride])
  return np.array(view, dtype=dtype.newbyteorder("="))


def _resolve(obj, storages: Mapping[str, bytes], byteorder: str):
  """Replaces every _LazyTensor in dicts / lists / tuples by its numpy array."""
  if isinstance(obj, _LazyTensor):
    if obj.storage.key not in storages:
      raise WeightsError(f"the file lacks the data of storage {obj.storage.key!r}: it is truncated or corrupt.")
    return _materialise(obj, storages[obj.storage.key], byteorder)
  if isinstance(obj, dict):  # dict or OrderedDict
    return type(obj)((k, _resolve(v, storages, byteorder)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)) and not isinstance(obj, (_StorageRef, _DtypeTag)):
    return type(obj)(_resolve(v, storages, byteorder) for v in obj)
  return obj


def _read_zip_pth(path: str):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise _Unsupported(f"a zip archive with {len(pickles)} data.pkl records (expected one)")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode().strip()
    unpickler = _Unpickler(io.BytesIO(zf.read(pickles[0])), legacy=False)
    obj = unpickler.load()
    storages = {}
    for key in unpickler.storage_dtypes:
      record = f"{prefix}data/{key}"
      if record not in names:
        raise WeightsError(f"{path!r} lacks the record {record!r}: the file is truncated or corrupt.")
      storages[key] = zf.read(record)
  return _resolve(obj, storages, byteorder)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_legacy_pth(path: str):
  with open(path, "rb") as f:
    try:
      magic = _NoGlobals(f).load()
    except Exception as e:
      raise _Unsupported(f"a file that is neither a zip archive nor a legacy torch.save stream ({e})") from e
    if magic != _LEGACY_MAGIC:
      raise _Unsupported("a file that is neither a zip archive nor a legacy torch.save stream (wrong magic number)")
    _NoGlobals(f).load()  # protocol version
    _NoGlobals(f).load()  # sys_info (byte order, type sizes): torch writes legacy storages little-endian anyway
    unpickler = _Unpickler(f, legacy=True)
    obj = unpickler.load()
    keys = _NoGlobals(f).load()
    storages = {}
    for key in keys:
      key = str(key)
      if key not in unpickler.storage_dtypes:
        raise _Unsupported(f"a storage {key!r} that no tensor refers to")
      itemsize = _numpy_dtype(unpickler.storage_dtypes[key]).itemsize
      header = f.read(8)
      if len(header) != 8:
        raise WeightsError(f"{path!r} ends before the data of storage {key!r}: the file is truncated.")
      numel = int.from_bytes(header, "little", signed=True)
      data = f.read(numel * itemsize)
      if len(data) != numel * itemsize:
        raise WeightsError(f"{path!r} ends inside the data of storage {key!r}: the file is truncated.")
      storages[key] = data  # legacy storages are written little-endian whatever the machine
  return _resolve(obj, storages, "little")


def _read_without_torch(path: str):
  """Either format; anything it cannot parse becomes _Unsupported (torch may still read it), except a file that is
  clearly truncated or corrupt (WeightsError: torch would not help)."""
  try:
    return _read_zip_pth(path) if zipfile.is_zipfile(path) else _read_legacy_pth(path)
  except (_Unsupported, WeightsError):
    raise
  except Exception as e:  # a malformed pickle: UnpicklingError, EOFError, TypeError from a bad REDUCE, ...
    raise _Unsupported(f"something the torch-free reader cannot parse ({type(e).__name__}: {e})") from e


def _import_torch():
  try:
    import torch  # noqa: PLC0415

    return torch
  except ImportError:
    return None


def _load_with_torch(torch, path: str):
  obj = torch.load(path, map_location="cpu", weights_only=True)

  def to_numpy(value):
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, Mapping):
      return {k: to_numpy(v) for k, v in value.items()}
    return value

  return to_numpy(obj)


def _as_flat_state_dict(obj, path: str) -> dict[str, np.ndarray]:
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise WeightsError(f"{path!r} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors).")
  bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise WeightsError(f"{path!r} is not a flat state dict: the entries {bad[:_MAX_LISTED]} are not tensors.")
  return dict(obj)


def read_torch_pickle(path: str, *, converter: str, output: str) -> dict[str, np.ndarray]:
  """A torch.save'd state dict, or a checkpoint that holds one under 'state_dict', as {name: numpy array} in the
  dtypes it was saved in (bfloat16 as ml_dtypes.bfloat16). Both torch.save formats are read without torch; a file
  that the torch-free reader cannot take is loaded with `torch.load(..., weights_only=True)` if torch is importable.
  Otherwise TorchRequiredError says how to install torch, or to run `converter(path, output)` (a function that writes
  a file this module reads without torch) on a machine that has it."""
  require_file(path)
  try:
    obj = _read_without_torch(path)
  except _Unsupported as e:
    torch = _import_torch()
    if torch is None:
      raise TorchRequiredError(
          f"{path!r} cannot be read without PyTorch: it contains {e}. Either install torch (`{TORCH_INSTALL_HINT}`) "
          f"and try again, or, on a machine that has torch, run {converter}({path!r}, {output!r}) and pass that "
          "file instead.") from e
    try:
      obj = _load_with_torch(torch, path)
    except Exception as torch_error:
      raise WeightsError(
          f"{path!r} could not be read by the torch-free reader (it contains {e}) nor by "
          f"torch.load(weights_only=True) ({type(torch_error).__name__}: {torch_error}).") from torch_error
  return _as_flat_state_dict(obj, path)


# --------------------------------------------------------------------------------------------------------------------
# .safetensors: 8 bytes of little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}} (plus an
# optional '__metadata__'), then the raw little-endian data

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


def is_safetensors(path: str) -> bool:
  """Named .safetensors, or starting as one: a plausible header length, then '{'."""
  if path.endswith(".safetensors"):
    return True
  with open(path, "rb") as f:
    head = f.read(9)
  return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= _MAX_HEADER


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
    raise WeightsError(f"{path!r} is truncated or corrupt:" + listing("bad tensor entries", bad))
  return infos, metadata, 8 + length


def safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """{name: shape} from a .safetensors header, reading no tensor data."""
  path = os.fspath(path)
  require_file(path)
  with open(path, "rb") as f:
    return {name: info.shape for name, info in _read_header(f, path)[0].items()}


def read_safetensors(path: str, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """{name: array} of a .safetensors file (all tensors, or `names` only, reading only their bytes). Floating point
  tensors (F32, F16, BF16, F64) come back as float32, integer and bool ones in their own dtype."""
  path = os.fspath(path)
  require_file(path)
  with open(path, "rb") as f:
    infos, _, start = _read_header(f, path)
    names = list(infos) if names is None else list(names)
    absent = [n for n in names if n not in infos]
    unknown = [f"{n}: {infos[n].dtype}" for n in names if n in infos and infos[n].dtype not in _ST_DTYPES]
    if absent or unknown:
      raise WeightsError(f"{path!r} cannot give the requested tensors:" + (listing("absent", absent) if absent else "")
                         + (listing("unsupported dtypes", unknown) if unknown else ""))
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
  tmp = _temporary_name(path)
  with open(tmp, "wb") as f:
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(encoded)
    for data in blobs:
      f.write(data)
  os.replace(tmp, path)
  return path
