"""Pre-encoded VAE latents: the folder the encoder writes and the trainer reads.

  latent.dir/<split>/meta.json                              what was encoded (Layout), written first
  latent.dir/<split>/shard-00000-of-00040.array_record      examples [0, shard_size), in the data set's order
  ...

Each record is one example: its label (int32), for a captioned data set its caption's token ids (int32, the
tokenizer's context length: the text encoder runs in the step), and the moments of its VAE posterior as float16,
(k, h, w, c) with k = 2 (mean, std) or, with latent.flips, 4 (mean, std of the image, then of its mirror image, which
is not the mirror of the latent). A shard is written under a temporary name and renamed when complete, so a folder
holds only whole shards; the encoder skips those on a rerun, and the trainer refuses a folder that lacks any. A
captioned data set's shard holds the examples of its range that could be used; shard-*.json beside it counts the
ones skipped (unreadable images, empty captions) and names a few, for the encoder's summary.

The trainer draws z = mean + std * noise (`LatentSource.draw`), from a generator seeded by (seed, global position
in the data order): the draws do not depend on the number of processes or workers, and a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from selfperc_jax.errors import ConfigError

FORMAT = 1
META = "meta.json"
DTYPE = np.float16


@dataclasses.dataclass(frozen=True)
class Layout:
  """What an encoded folder holds; an encoder continues, and a trainer reads, only a folder of the same layout."""

  source: str  # the image data set, e.g. 'imagenet2012'
  split: str
  image_size: int
  num_examples: int
  shard_size: int
  flips: bool
  latent_shape: tuple[int, int, int]  # h, w, c
  vae: str  # 'sd' | 'sdxl' (with the layout below)
  vae_layout: tuple  # block_out_channels, layers_per_block, norm groups
  vae_weights: str  # file name and size of the weights (a changed file is another encoding)
  format: int = FORMAT
  text_tokens: int = 0  # a captioned data set's token ids per example (the tokenizer's context); 0: no captions
  tokenizer: str = ""  # which tokenizer made them (its vocabulary's digest): another one is another encoding

  @property
  def num_shards(self) -> int:
    return -(-self.num_examples // self.shard_size)

  @property
  def moments(self) -> int:
    return 4 if self.flips else 2

  def shard_range(self, i: int) -> tuple[int, int]:
    return i * self.shard_size, min((i + 1) * self.shard_size, self.num_examples)

  def record_shape(self) -> tuple[int, ...]:
    return (self.moments,) + tuple(self.latent_shape)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  @classmethod
  def from_json(cls, text: str) -> "Layout":
    d = json.loads(text)
    d["latent_shape"] = tuple(d["latent_shape"])
    d["vae_layout"] = tuple(tuple(v) if isinstance(v, list) else v for v in d["vae_layout"])
    return cls(**d)


def weights_identity(path: str) -> str:
  path = os.path.expanduser(path)
  return f"{os.path.basename(path)} ({os.path.getsize(path)} bytes)"


def split_dir(latent_dir: str, split: str) -> str:
  return os.path.join(os.path.expanduser(latent_dir), split)


def shard_name(i: int, n: int) -> str:
  return f"shard-{i:05d}-of-{n:05d}.array_record"


def skips_name(i: int, n: int) -> str:
  """The captioned shard's count of skipped examples (JSON), written before the shard."""
  return shard_name(i, n).replace(".array_record", ".json")


def encode_record(label: int, moments: np.ndarray, tokens: np.ndarray | None = None) -> bytes:
  ids = b"" if tokens is None else np.ascontiguousarray(tokens, np.int32).tobytes()
  return np.int32(label).tobytes() + ids + np.ascontiguousarray(moments, DTYPE).tobytes()


def decode_record(record: bytes, shape: tuple[int, ...], text_tokens: int = 0
                  ) -> tuple[int, np.ndarray | None, np.ndarray]:
  """(label, token ids (text_tokens,) or None, moments `shape`)."""
  label = int(np.frombuffer(record, np.int32, 1)[0])
  tokens = np.frombuffer(record, np.int32, text_tokens, offset=4) if text_tokens else None
  return label, tokens, np.frombuffer(record, DTYPE, offset=4 + 4 * text_tokens).reshape(shape)


def read_layout(directory: str) -> Layout | None:
  path = os.path.join(directory, META)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return Layout.from_json(f.read())
  except (ValueError, TypeError, KeyError) as e:
    raise ConfigError(f"{path} is not a latent folder's meta.json ({type(e).__name__}: {e}); remove the folder "
                      "or point latent.dir elsewhere.") from e


def differences(a: Layout, b: Layout) -> list[str]:
  da, db = dataclasses.asdict(a), dataclasses.asdict(b)
  return [f"{k}: {da[k]!r} there, {db[k]!r} now" for k in da if da[k] != db[k]]


def missing_shards(directory: str, layout: Layout) -> list[int]:
  return [i for i in range(layout.num_shards)
          if not os.path.isfile(os.path.join(directory, shard_name(i, layout.num_shards)))]


class LatentSource(Sequence):
  """Random access to the encoded examples: {'moments': float16 (k, h, w, c), 'label'} (and 'tokens', int32 ids, of a
  captioned data set); `draw` makes a training example. Picklable (grain's workers get a copy), as the ArrayRecord
  data source reopens its files. Its length is the records'(a captioned data set's skipped examples are not there)."""

  def __init__(self, directory: str, layout: Layout, scaling_factor: float):
    import grain

    self.layout, self.scale = layout, float(scaling_factor)
    paths = [os.path.join(directory, shard_name(i, layout.num_shards)) for i in range(layout.num_shards)]
    self.records = grain.sources.ArrayRecordDataSource(paths)
    self.shape = layout.record_shape()

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index):
    label, tokens, moments = decode_record(self.records[int(index)], self.shape, self.layout.text_tokens)
    example = {"moments": moments, "label": np.int32(label)}
    if tokens is not None:
      example["tokens"] = tokens
    return example

  def draw(self, index: int, flip: bool, rng: np.random.Generator) -> dict:
    """{'image': z * scaling_factor (float32 h, w, c), 'label'}, z drawn from the posterior of the example (of its
    mirror image when flip); a captioned example's label is its caption's token ids (the model's condition)."""
    example = self[index]
    m = example["moments"].astype(np.float32)
    mean, std = (m[2], m[3]) if flip else (m[0], m[1])
    z = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    return {"image": z * np.float32(self.scale), "label": example.get("tokens", example["label"])}


def open_source(directory: str, expected: Layout, scaling_factor: float, command: str) -> LatentSource:
  """The encoded split in `directory`, or one ConfigError saying what is wrong and the command that fixes it."""
  layout = read_layout(directory)
  if layout is None:
    raise ConfigError(f"no encoded latents in {directory} (latent.dir/{expected.split}); encode them once with\n  "
                      f"{command}")
  # The number of examples and the shard size are the encoder's; everything else must match this config.
  expected = dataclasses.replace(expected, num_examples=layout.num_examples, shard_size=layout.shard_size)
  diffs = differences(layout, expected)
  if diffs:
    raise ConfigError(f"the latents in {directory} were encoded differently:\n  " + "\n  ".join(diffs)
                      + f"\nEncode into another latent.dir (or remove this one) with\n  {command}")
  missing = missing_shards(directory, layout)
  if missing:
    raise ConfigError(f"the latents in {directory} are half-written: {len(missing)} of {layout.num_shards} shards "
                      f"are missing (e.g. {shard_name(missing[0], layout.num_shards)}). Run the encoder again to "
                      f"finish them:\n  {command}")
  return LatentSource(directory, layout, scaling_factor)
