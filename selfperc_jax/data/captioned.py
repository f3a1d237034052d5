"""Image-caption data where users keep it, read with random access (for the encoder, encode_latents.py):

  data.name='webdataset'   data.dir holds tar shards as img2dataset writes them (*.tar, read in name order); each
                           example is the members of one key: <key>.jpg|.jpeg|.png|.webp (the image), <key>.txt (its
                           caption; <key>.json, img2dataset's metadata, is not needed);
  data.name='imagefolder'  data.dir holds images and one captions file, captions.jsonl or metadata.jsonl (the Hugging
                           Face imagefolder name), one JSON object per line: {"file_name": "a/b.jpg", "text": "..."}
                           ("image" / "caption" are read as well), paths relative to data.dir.

Images are cropped as Stable Diffusion's training scripts do: the short side resized to data.image_size (bilinear,
antialiased), then the centre square. An example whose image does not decode, or whose caption is missing or blank,
is not fatal: it comes back with a `status` (UNREADABLE / NO_CAPTION) that the encoder counts, skips and reports.
Only Pillow and the standard library are used here.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np

from selfperc_jax.errors import ConfigError

WEBDATASET, IMAGEFOLDER = "webdataset", "imagefolder"
NAMES = (WEBDATASET, IMAGEFOLDER)
SPLITS = ("train",)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_FILES = ("captions.jsonl", "metadata.jsonl")
OK, UNREADABLE, NO_CAPTION = 0, 1, 2  # an example's status
PROBLEMS = {UNREADABLE: "unreadable images", NO_CAPTION: "empty or missing captions"}


def sd_crop(image, size: int) -> np.ndarray:
  """Stable Diffusion's training crop of a PIL image: the short side to `size` (bilinear, antialiased as Pillow's
  resize is), then the centre size x size square. uint8 HWC RGB."""
  from PIL import Image

  image = image.convert("RGB")
  scale = size / min(image.size)
  image = image.resize(tuple(max(size, round(x * scale)) for x in image.size), resample=Image.BILINEAR)
  arr = np.asarray(image)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def _decode(data: bytes, size: int) -> np.ndarray | None:
  from PIL import Image

  try:
    with Image.open(io.BytesIO(data)) as image:
      return sd_crop(image, size)
  except Exception:  # noqa: BLE001 - any undecodable file (truncated, not an image, an unknown format) is one skip
    return None


class _Source:
  """The random-access sequence of {'image': uint8 (S, S, 3), 'caption': str, 'key': str, 'status': int8,
  'label': int32 0}; an example that cannot be used has status UNREADABLE or NO_CAPTION (and a zero image).
  Picklable: it holds paths and offsets, and opens files per read."""

  size: int
  keys: list[str]

  def __len__(self) -> int:
    return len(self.keys)

  def _read(self, index: int) -> tuple[bytes | None, str]:
    raise NotImplementedError

  def __getitem__(self, index):
    index = int(index)
    data, caption = self._read(index)
    image = None if data is None else _decode(data, self.size)
    status = UNREADABLE if image is None else (NO_CAPTION if not caption.strip() else OK)
    if image is None:
      image = np.zeros((self.size, self.size, 3), np.uint8)
    return {"image": image, "caption": caption.strip(), "key": self.keys[index], "status": np.int8(status),
            "label": np.int32(0)}


class WebDataset(_Source):
  """Tar shards as img2dataset writes them, indexed once (member offsets from the tar headers) when opened."""

  def __init__(self, directory: str, size: int):
    self.size = size
    self.tars = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".tar"))
    if not self.tars:
      raise ConfigError(f"data.dir={directory} holds no .tar shards; data.name='webdataset' reads the tar files "
                        "that img2dataset writes (--output_format webdataset). For a folder of images and a captions "
                        "file, use data.name='imagefolder'.")
    self.keys, rows = [], []  # rows: (tar, image offset, image size, caption offset, caption size; -1: none)
    for t, path in enumerate(self.tars):
      members: dict[str, dict[str, tarfile.TarInfo]] = {}
      try:
        with tarfile.open(path, "r:") as tar:
          for info in tar:
            if info.isfile():
              base = os.path.basename(info.name)
              key, _, ext = base.partition(".")
              members.setdefault(os.path.join(os.path.dirname(info.name), key), {})[ext.lower()] = info
      except (tarfile.TarError, OSError) as e:
        raise ConfigError(f"{path} is not a readable tar file ({type(e).__name__}: {e}); remove it from data.dir or "
                          "write it again.") from e
      for key, parts in members.items():
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if image is None:
          continue  # not an example (a key with only .json, e.g. one img2dataset failed to download)
        text = parts.get("txt")
        self.keys.append(key)
        rows.append((t, image.offset_data, image.size, text.offset_data if text else -1, text.size if text else 0))
    self.rows = np.asarray(rows, np.int64).reshape(-1, 5)

  def _read(self, index: int) -> tuple[bytes | None, str]:
    t, offset, size, text_offset, text_size = (int(v) for v in self.rows[index])
    with open(self.tars[t], "rb") as f:
      f.seek(offset)
      data = f.read(size)
      caption = ""
      if text_offset >= 0:
        f.seek(text_offset)
        caption = f.read(text_size).decode("utf-8", errors="replace")
    return data, caption


class ImageFolder(_Source):
  """A folder of images and a captions .jsonl (one {"file_name", "text"} object per line)."""

  def __init__(self, directory: str, size: int):
    self.size, self.directory = size, directory
    found = [f for f in CAPTION_FILES if os.path.isfile(os.path.join(directory, f))]
    if len(found) != 1:
      raise ConfigError(f"data.dir={directory} must hold one captions file, {' or '.join(CAPTION_FILES)} (one JSON "
                        'object per line: {"file_name": "cat.jpg", "text": "a photo of a cat"}); it holds '
                        f"{' and '.join(found) if found else 'neither'}.")
    self.captions_file = os.path.join(directory, found[0])
    # An unparseable line, or one without a file name, is an example that cannot be read (named by its line).
    self.keys, self.files, self.captions = [], [], []
    with open(self.captions_file, encoding="utf-8", errors="replace") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          name = row.get("file_name", row.get("image"))
          caption = row.get("text", row.get("caption", ""))
        except (ValueError, AttributeError):
          name, caption = None, ""
        ok = isinstance(name, str) and bool(name)
        self.keys.append(name if ok else f"{found[0]} line {number}")
        self.files.append(name if ok else None)
        self.captions.append(caption if isinstance(caption, str) else "")
    if not self.keys:
      raise ConfigError(f"{self.captions_file} names no images (each line: "
                        '{"file_name": "cat.jpg", "text": "a photo of a cat"}).')

  def _read(self, index: int) -> tuple[bytes | None, str]:
    if self.files[index] is None:
      return None, self.captions[index]
    try:
      with open(os.path.join(self.directory, self.files[index]), "rb") as f:
        return f.read(), self.captions[index]
    except OSError:
      return None, self.captions[index]


def open_source(data_cfg) -> _Source:
  """The captioned examples of data_cfg (data.name, data.dir, data.image_size), or one ConfigError."""
  directory = os.path.expanduser(data_cfg.dir)
  if not directory or not os.path.isdir(directory):
    raise ConfigError(f"data.name={data_cfg.name!r} reads data.dir, which is "
                      f"{'not set' if not directory else 'not a folder: ' + directory}; set --config.data.dir to the "
                      + ("folder of img2dataset's tar shards." if data_cfg.name == WEBDATASET else
                         "folder of the images and their captions.jsonl."))
  cls = WebDataset if data_cfg.name == WEBDATASET else ImageFolder
  return cls(directory, int(data_cfg.image_size))
