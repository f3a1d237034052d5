"""PyTorch state dict of the FID Inception network -> Flax variables of `model.InceptionV3`, checked key by key.

The files are read, and the state dict checked, by third_party/weights_io.py, shared with the other converters; this
module holds the FID Inception layout and what to tell the user about it.

- `load_state_dict(path)`: a `.pth` as a flat {name: numpy array}, read without torch (both of `torch.save`'s
  formats, through a restricted unpickler that runs no code in the file); a file that needs more is handed to
  `torch.load(weights_only=True)` when torch is importable, and refused with how to get torch or an .npz otherwise
  (TorchRequiredError). Also accepts an `.npz` written by `convert_to_npz`.
- `convert(state_dict)`: {'params', 'batch_stats'} for `InceptionV3`; conv weights OIHW -> HWIO, fc (out, in) ->
  (in, out), BatchNorm weight/bias -> scale/bias, running_mean/var -> batch_stats mean/var. Every expected key and
  shape is checked and every problem is reported at once (missing, unexpected, wrong shape: StateDictMismatchError);
  `*.num_batches_tracked` is ignored.
- `convert_to_npz(pth_path, npz_path)`: the checked state dict as an .npz with the PyTorch names as flat keys
  ('Mixed_5b.branch5x5_1.conv.weight', ...), float32, in PyTorch's layout, so machines without torch can use it.
- `load_variables(path)`: .npz or .pth -> the Flax variables.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Sequence

import numpy as np

from ..weights_io import (  # the three errors are this module's too: its functions raise them
    Entry, StateDictMismatchError, TorchRequiredError, WeightsError, flax_variables, float32_tensors, is_npz,
    listing, match_keys, raise_if_mismatched, read_npz, read_torch_pickle, require_file, torch_layout, write_npz)

_README = "third_party/fid_inception/README.md"


@functools.lru_cache(maxsize=None)
def _layout() -> dict[str, Entry]:
  from .model import INPUT_SIZE, InceptionV3

  return torch_layout(InceptionV3(), (1, INPUT_SIZE, INPUT_SIZE, 3))


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """{PyTorch name: PyTorch shape} of every tensor the converter needs (num_batches_tracked aside)."""
  return {name: entry.torch_shape for name, entry in _layout().items()}


def _is_ignored(key: str, ignore_prefixes: Sequence[str]) -> bool:
  return key.endswith("num_batches_tracked") or key.startswith(tuple(ignore_prefixes))


def _notes(keys: Sequence[str], unexpected: Sequence[str]) -> list[str]:
  """Hints on the two usual near misses: a DataParallel state dict and torchvision's InceptionV3."""
  notes = []
  if keys and sum(k.startswith("module.") for k in keys) > len(keys) // 2:
    notes.append("the keys start with 'module.': strip that prefix, it comes from torch's DataParallel")
  if any(k.startswith("AuxLogits.") for k in unexpected):
    notes.append("AuxLogits.* belong to torchvision's auxiliary classifier, which the FID network does not have: "
                 "pass ignore_prefixes=('AuxLogits.',) to drop them")
  return notes


def convert(state_dict: Mapping[str, Any], *, ignore_prefixes: Sequence[str] = ()) -> dict[str, dict]:
  """{'params': ..., 'batch_stats': ...} (nested dicts of float32 numpy arrays) for `model.InceptionV3`.

  `state_dict` maps the PyTorch names to arrays in PyTorch's layout (numpy arrays, or anything np.asarray takes).
  Keys ending in 'num_batches_tracked', and keys starting with one of `ignore_prefixes` (e.g. 'AuxLogits.' for a
  torchvision checkpoint), are skipped; every other key must be expected, every expected key present, and every
  shape right, or StateDictMismatchError lists all the differences.
  """
  expected = expected_shapes()
  arrays = {k: np.asarray(v) for k, v in state_dict.items()}
  keys = [k for k in arrays if isinstance(k, str)]
  match = match_keys({k: a.shape for k, a in arrays.items()}, expected,
                     {k: k for k in keys if not _is_ignored(k, ignore_prefixes)})
  tensors, non_finite, not_float = float32_tensors(arrays, match, expected)
  raise_if_mismatched("the state dict does not match the FID Inception layout (pt_inception-2015-12-05)", match,
                      not_float=not_float, notes=_notes(keys, match.unexpected),
                      footer=f"Use the pt_inception-2015-12-05-*.pth released with pytorch-fid (see {_README}).")
  if non_finite:
    raise WeightsError("the state dict is not finite:" + listing("NaN or infinite values", non_finite))
  return flax_variables(_layout(), tensors)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch .pth (or an .npz from `convert_to_npz`) as {name: numpy array}, PyTorch's names and layout.

  torch is not needed for plain state dicts in either torch.save format. A file that the torch-free reader cannot
  take is loaded with `torch.load(..., weights_only=True)` if torch is importable; otherwise TorchRequiredError says
  how to install torch or where to get an .npz instead.
  """
  path = os.fspath(path)
  require_file(path, "The FID Inception weights are not downloaded by this code: "
                     f"see {_README} for where to get them.")
  if is_npz(path):
    return read_npz(path)
  return read_torch_pickle(path, converter="third_party.fid_inception.convert.convert_to_npz",
                           output="fid_inception.npz")


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
  return write_npz(npz_path, {k: np.asarray(v, np.float32) for k, v in state_dict.items()
                               if not _is_ignored(k, ignore_prefixes)})
