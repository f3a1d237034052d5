"""Sample outputs: a class-labelled PNG grid and the guided-diffusion evaluation .npz (arr_0 uint8 NHWC, arr_1)."""

from __future__ import annotations

import io
import zipfile

import numpy as np

from selfperc_jax import fileio


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 NHWC."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_uint8_device(images):
  """`to_uint8` inside a jitted function (the same rounding), so that only uint8 leaves the devices."""
  import jax.numpy as jnp

  return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def class_grid(images_u8: np.ndarray, labels: np.ndarray | None, min_cell: int = 32, pad: int = 2):
  """One row per class (in label order), each row headed by its class number; unlabelled images (labels None: an
  unconditional model's) in a square grid without headings. Small images are upscaled (a PIL image; Pillow is
  imported here, so that training and the benchmarks import without it)."""
  from PIL import Image, ImageDraw

  n, h, w, c = images_u8.shape
  scale = max(1, -(-min_cell // max(h, w)))
  cell_h, cell_w = h * scale + pad, w * scale + pad
  if labels is None:
    side = max(1, int(np.ceil(np.sqrt(n))))
    classes, rows = [""] * (-(-n // side)), [np.arange(i, min(i + side, n)) for i in range(0, n, side)]
  else:
    labels = np.asarray(labels)
    classes = sorted(set(int(y) for y in labels))
    rows = [np.flatnonzero(labels == k) for k in classes]
  cols = max(len(r) for r in rows)
  label_w = 8 * len(str(max(classes))) + 8 if labels is not None else 0
  grid = Image.new("L" if c == 1 else "RGB", (label_w + cols * cell_w, len(rows) * cell_h), 0)
  draw = ImageDraw.Draw(grid)
  for r, (k, idx) in enumerate(zip(classes, rows)):
    draw.text((2, r * cell_h + cell_h // 2 - 6), str(k), fill=255 if c == 1 else (255, 255, 255))
    for col, i in enumerate(idx):
      img = images_u8[i][..., 0] if c == 1 else images_u8[i]
      tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
      grid.paste(tile, (label_w + col * cell_w, r * cell_h))
  return grid


def save_grid(path: str, images_u8, labels) -> str:
  """Writes the class grid of uint8 images (labels None: unlabelled) as a PNG; returns the path."""
  buffer = io.BytesIO()
  labels = None if labels is None else np.asarray(labels, np.int64)
  class_grid(np.asarray(images_u8, np.uint8), labels).save(buffer, format="PNG")
  fileio.write_bytes(path, buffer.getvalue())
  return path


class NpzStreamWriter:
  """Writes the guided-diffusion .npz (arr_0 uint8 NHWC, arr_1 labels) chunk by chunk, never holding all images.

  The labels are known up front; `write(images)` appends the next chunk of arr_0. Unlabelled samples (an
  unconditional model's: labels None, num_images their count) get no arr_1, as in guided-diffusion's format. The file
  appears under its name only when `close()` has written everything (a temporary name until then), so a reader never
  sees half a batch.
  """

  def __init__(self, path: str, image_shape: tuple[int, ...], labels, num_images: int | None = None):
    from etils import epath

    self.path = epath.Path(path)
    self.labels = None if labels is None else np.asarray(labels, np.int64)
    self.shape = (len(self.labels) if num_images is None else int(num_images),) + tuple(image_shape)
    self.written = 0
    self._tmp = fileio.partial_name(self.path)
    self._file = self._tmp.open("wb")
    self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED)
    self._member = self._zip.open("arr_0.npy", "w", force_zip64=True)
    np.lib.format.write_array_header_2_0(
        self._member, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                       "shape": self.shape})

  def write(self, images_u8) -> None:
    images_u8 = np.ascontiguousarray(images_u8, np.uint8)
    if images_u8.shape[1:] != self.shape[1:] or self.written + len(images_u8) > self.shape[0]:
      raise ValueError(f"chunk of shape {images_u8.shape} does not fit the remaining {self.shape[0] - self.written} "
                       f"images of shape {self.shape[1:]}.")
    self._member.write(images_u8.tobytes())
    self.written += len(images_u8)

  def close(self) -> str:
    if self.written != self.shape[0]:
      raise ValueError(f"{self.written} of {self.shape[0]} images were written.")
    self._member.close()
    if self.labels is not None:
      with self._zip.open("arr_1.npy", "w") as f:
        np.lib.format.write_array(f, self.labels, allow_pickle=False)
    self._zip.close()
    self._file.close()
    self._tmp.replace(self.path)
    return str(self.path)

  def abort(self) -> None:
    for closer in (self._member.close, self._zip.close, self._file.close):
      try:
        closer()
      except Exception:  # already broken; the temporary file is removed below
        pass
    self._tmp.unlink(missing_ok=True)
