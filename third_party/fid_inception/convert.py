"""PyTorch state dict of the FID Inception network -> Flax variables of `model.InceptionV3`, checked key by key.

- `load_state_dict(path)`: a `.pth` as a flat {name: numpy array}. Reads both of `torch.save`'s formats (the zip
  archive of torch >= 1.6 and the older stream format of files saved before it) with the standard library and
  numpy only, through a restricted unpickler that knows tensors, storages and OrderedDict and nothing else (so no
  code in the file ever runs). A file that needs anything more (a pickled module, an unknown storage type) is handed
  to `torch.load(weights_only=True)` when torch is importable, and refused with how to get torch or an .npz
  otherwise. Also accepts an `.npz` written by `convert_to_npz`.
- `convert(state_dict)`: {'params', 'batch_stats'} for `InceptionV3`; conv weights OIHW -> HWIO, fc (out, in) ->
  (in, out), BatchNorm weight/bias -> scale/bias, running_mean/var -> batch_stats mean/var. Every expected key and
  shape is checked and every problem is reported at once (missing, unexpected, wrong shape); `*.num_batches_tracked`
  is ignored.
- `convert_to_npz(pth_path, npz_path)`: the checked state dict as an .npz with the PyTorch names as flat keys
  ('Mixed_5b.branch5x5_1.conv.weight', ...), float32, in PyTorch's layout, so machines without torch can use it.
- `load_variables(path)`: .npz or .pth -> the Flax variables.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import pickle
import zipfile
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from selfperc_jax.errors import UserError

TORCH_INSTALL_HINT = "pip install torch==2.13.0"
_MAX_LISTED = 20


class WeightsError(UserError):
  """A weights file that cannot be read, or whose contents do not fit the FID Inception layout."""


class TorchRequiredError(WeightsError):
  """The .pth needs torch to be read and torch is not importable."""


class StateDictMismatchError(WeightsError, ValueError):
  """The state dict's keys or shapes differ from the FID Inception layout; `missing`, `unexpected` and `mismatched`
  (key -> (got, expected)) say how."""

  def __init__(self, message: str, missing: Sequence[str], unexpected: Sequence[str],
               mismatched: Mapping[str, tuple]):
    super().__init__(message)
    self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), dict(mismatched)


# --------------------------------------------------------------------------------------------------------------------
# The expected layout, derived from the Flax model itself


class _Entry(NamedTuple):
  collection: str  # 'params' | 'batch_stats'
  path: tuple[str, ...]  # the Flax path inside the collection
  torch_shape: tuple[int, ...]
  to_flax: Callable[[np.ndarray], np.ndarray]


def _identity(a):
  return a


def _oihw_to_hwio(a):
  return a.transpose(2, 3, 1, 0)


def _transpose2(a):
  return a.T


_LEAF_NAMES = {("params", "scale"): "weight", ("params", "bias"): "bias",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _torch_entry(collection: str, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, _Entry]:
  """The PyTorch name of one Flax leaf, with its PyTorch shape and the transform into the Flax layout."""
  prefix, leaf = ".".join(path[:-1]), path[-1]
  if collection == "params" and leaf == "kernel" and len(shape) == 4:  # conv, HWIO <- OIHW
    kh, kw, cin, cout = shape
    return f"{prefix}.weight", _Entry(collection, path, (cout, cin, kh, kw), _oihw_to_hwio)
  if collection == "params" and leaf == "kernel" and len(shape) == 2:  # dense, (in, out) <- (out, in)
    return f"{prefix}.weight", _Entry(collection, path, (shape[1], shape[0]), _transpose2)
  if (collection, leaf) in _LEAF_NAMES:
    return f"{prefix}.{_LEAF_NAMES[collection, leaf]}", _Entry(collection, path, tuple(shape), _identity)
  raise AssertionError(f"no PyTorch name for Flax variable {collection}/{'/'.join(path)} {shape}")


@functools.lru_cache(maxsize=None)
def _layout() -> dict[str, _Entry]:
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  from .model import INPUT_SIZE, InceptionV3

  shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  layout = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in traverse_util.flatten_dict(shapes[collection]).items():
      name, entry = _torch_entry(collection, path, tuple(leaf.shape))
      layout[name] = entry
  return layout


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """{PyTorch name: PyTorch shape} of every tensor the converter needs (num_batches_tracked aside)."""
  return {name: entry.torch_shape for name, entry in _layout().items()}


# --------------------------------------------------------------------------------------------------------------------
# State dict -> Flax variables


def _is_ignored(key: str, ignore_prefixes: Sequence[str]) -> bool:
  return key.endswith("num_batches_tracked") or any(key.startswith(p) for p in ignore_prefixes)


def _listing(title: str, items: Sequence[str]) -> str:
  shown = "\n    ".join(items[:_MAX_LISTED])
  more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"\n  {title} ({len(items)}):\n    {shown}{more}"


def convert(state_dict: Mapping[str, Any], *, ignore_prefixes: Sequence[str] = ()) -> dict[str, dict]:
  """{'params': ..., 'batch_stats': ...} (nested dicts of float32 numpy arrays) for `model.InceptionV3`.

  `state_dict` maps the PyTorch names to arrays in PyTorch's layout (numpy arrays, or anything np.asarray takes).
  Keys ending in 'num_batches_tracked', and keys starting with one of `ignore_prefixes` (e.g. 'AuxLogits.' for a
  torchvision checkpoint), are skipped; every other key must be expected, every expected key present, and every
  shape right, or StateDictMismatchError lists all the differences.
  """
  from flax import traverse_util

  layout = _layout()
  ignore_prefixes = tuple(ignore_prefixes)
  unexpected, mismatched, not_float, flat = [], {}, [], {}
  for key, value in state_dict.items():
    if not isinstance(key, str):
      unexpected.append(repr(key))
      continue
    if _is_ignored(key, ignore_prefixes):
      continue
    entry = layout.get(key)
    if entry is None:
      unexpected.append(key)
      continue
    array = np.asarray(value)
    if array.shape != entry.torch_shape:
      mismatched[key] = (array.shape, entry.torch_shape)
      continue
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
      not_float.append(f"{key}: dtype {array.dtype}")
      continue
    flat[(entry.collection,) + entry.path] = np.ascontiguousarray(entry.to_flax(array.astype(np.float32)))
  missing = [key for key in layout if key not in state_dict]
  if missing or unexpected or mismatched or not_float:
    message = "the state dict does not match the FID Inception layout (pt_inception-2015-12-05):"
    if missing:
      message += _listing("missing keys", missing)
    if unexpected:
      message += _listing("unexpected keys", unexpected)
    if mismatched:
      message += _listing("wrong shapes", [f"{k}: got {g}, expected {e}" for k, (g, e) in mismatched.items()])
    if not_float:
      message += _listing("not floating point", not_float)
    keys = [k for k in state_dict if isinstance(k, str)]
    if keys and sum(k.startswith("module.") for k in keys) > len(keys) // 2:
      message += "\n  (the keys start with 'module.': strip that prefix, it comes from torch's DataParallel)"
    if any(k.startswith("AuxLogits.") for k in unexpected):
      message += ("\n  (AuxLogits.* belong to torchvision's auxiliary classifier, which the FID network does not have: "
                  "pass ignore_prefixes=('AuxLogits.',) to drop them)")
    message += ("\nUse the pt_inception-2015-12-05-*.pth released with pytorch-fid "
                "(see third_party/fid_inception/README.md).")
    raise StateDictMismatchError(message, missing, unexpected, mismatched)
  bad = [f"{'/'.join(path)}" for path, a in flat.items() if not np.all(np.isfinite(a))]
  if bad:
    raise WeightsError(f"the state dict has NaN or infinite values in {bad[:_MAX_LISTED]}.")
  return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------------------------------------------------
# Reading .pth files without torch


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


def _check_file(path: str) -> None:
  if not os.path.isfile(path):
    raise WeightsError(f"weights file {path!r} does not exist. The FID Inception weights are not downloaded by this "
                       "code: see third_party/fid_inception/README.md for where to get them.")


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
    raise WeightsError(f"{path!r} is not a readable .npz ({type(e).__name__}: {e}); write it with "
                       "third_party.fid_inception.convert.convert_to_npz.") from e


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch .pth (or an .npz from `convert_to_npz`) as {name: numpy array}, PyTorch's names and layout.

  torch is not needed for plain state dicts in either torch.save format. A file that the torch-free reader cannot
  take is loaded with `torch.load(..., weights_only=True)` if torch is importable; otherwise TorchRequiredError says
  how to install torch or where to get an .npz instead.
  """
  path = os.fspath(path)
  _check_file(path)
  if _is_npz(path):
    return _load_npz(path)
  try:
    obj = _read_without_torch(path)
  except _Unsupported as e:
    torch = _import_torch()
    if torch is None:
      raise TorchRequiredError(
          f"{path!r} cannot be read without PyTorch: it contains {e}. Either install torch "
          f"(`{TORCH_INSTALL_HINT}`) and try again, or, on a machine that has torch, run "
          f"third_party.fid_inception.convert.convert_to_npz({path!r}, 'fid_inception.npz') and pass the .npz "
          "instead.") from e
    try:
      obj = _load_with_torch(torch, path)
    except Exception as torch_error:
      raise WeightsError(
          f"{path!r} could not be read by the torch-free reader (it contains {e}) nor by "
          f"torch.load(weights_only=True) ({type(torch_error).__name__}: {torch_error}).") from torch_error
  return _as_flat_state_dict(obj, path)


def load_variables(path: str, *, ignore_prefixes: Sequence[str] = ()) -> dict[str, dict]:
  """{'params', 'batch_stats'} for `model.InceptionV3` from an .npz (flat PyTorch names, as `convert_to_npz`
  writes) or a PyTorch .pth, checked by `convert`."""
  return convert(load_state_dict(path), ignore_prefixes=ignore_prefixes)


def convert_to_npz(pth_path: str, npz_path: str, *, ignore_prefixes: Sequence[str] = ()) -> str:
  """Checks the .pth against the layout (as `convert`) and writes its tensors, float32 and in PyTorch's layout, to
  `npz_path` with the PyTorch names as keys (num_batches_tracked and ignored prefixes left out). Written to a
  temporary name and renamed, so a failed write never leaves a file that looks complete. Returns npz_path."""
  npz_path = os.fspath(npz_path)
  if not npz_path.endswith(".npz"):
    raise WeightsError(f"the output path {npz_path!r} must end in .npz.")
  state_dict = load_state_dict(pth_path)
  convert(state_dict, ignore_prefixes=ignore_prefixes)  # refuses anything that does not fit, before writing
  kept = {k: np.asarray(v, np.float32) for k, v in state_dict.items() if not _is_ignored(k, tuple(ignore_prefixes))}
  parent = os.path.dirname(os.path.abspath(npz_path))
  os.makedirs(parent, exist_ok=True)
  tmp = f"{npz_path[:-4]}.tmp{os.getpid()}.npz"
  np.savez(tmp, **kept)
  os.replace(tmp, npz_path)
  return npz_path
