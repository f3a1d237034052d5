"""Sample outputs: a class-labelled PNG grid and the guided-diffusion evaluation .npz (arr_0 uint8 NHWC, arr_1)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from selfperc_jax import fileio


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 NHWC."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def class_grid(images_u8: np.ndarray, labels: np.ndarray, min_cell: int = 32, pad: int = 2) -> Image.Image:
  """One row per class (in label order), each row headed by its class number; small images are upscaled."""
  n, h, w, c = images_u8.shape
  scale = max(1, -(-min_cell // max(h, w)))
  cell_h, cell_w = h * scale + pad, w * scale + pad
  classes = sorted(set(int(y) for y in labels))
  rows = [np.flatnonzero(labels == k) for k in classes]
  cols = max(len(r) for r in rows)
  label_w = 8 * len(str(max(classes))) + 8
  grid = Image.new("L" if c == 1 else "RGB", (label_w + cols * cell_w, len(rows) * cell_h), 0)
  draw = ImageDraw.Draw(grid)
  for r, (k, idx) in enumerate(zip(classes, rows)):
    draw.text((2, r * cell_h + cell_h // 2 - 6), str(k), fill=255 if c == 1 else (255, 255, 255))
    for col, i in enumerate(idx):
      img = images_u8[i][..., 0] if c == 1 else images_u8[i]
      tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
      grid.paste(tile, (label_w + col * cell_w, r * cell_h))
  return grid


def save_samples(out_dir: str, name: str, images, labels) -> tuple[str, str]:
  """Writes out_dir/name.png and out_dir/name.npz; returns their paths."""
  fileio.makedirs(out_dir)
  images_u8, labels = to_uint8(images), np.asarray(labels, np.int64)
  png, npz = fileio.join(out_dir, f"{name}.png"), fileio.join(out_dir, f"{name}.npz")
  buffer = io.BytesIO()
  class_grid(images_u8, labels).save(buffer, format="PNG")
  fileio.write_bytes(png, buffer.getvalue())
  fileio.savez(npz, images_u8, labels)
  return png, npz
