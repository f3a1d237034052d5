"""The comparison's outputs: a Markdown table, a JSON file, a plot of FID and recall against the guidance scale, and
sample grids side by side. Pure formatting and drawing; `experiments.py` decides what goes in."""

from __future__ import annotations

import io
import json
import math

import numpy as np
from PIL import Image, ImageDraw

from selfperc_jax import fileio, images

BRANCH_TITLES = {
    "pretrain": "MSE pre-training (start point)",
    "mse": "MSE",
    "perceptual": "self-perceptual",
    "mse_perceptual": "MSE + self-perceptual",
    "perceptual_ema": "self-perceptual, copy = EMA",
    "perceptual_online": "self-perceptual, copy = online",
}
COLUMNS = (("fid", "FID", "{:.3f}"), ("inception_score", "IS", "{:.2f}"), ("precision", "precision", "{:.3f}"),
           ("recall", "recall", "{:.3f}"), ("class_accuracy", "class acc.", "{:.3f}"),
           ("num_samples", "samples", "{:d}"))
_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75))


def title(branch: str) -> str:
  return BRANCH_TITLES.get(branch, branch)


def markdown(rows: list[dict], preface: str) -> str:
  """The table: one row per (branch, guidance scale), in the order given; missing metrics show as '-'."""
  head = ["branch", "guidance"] + [name for _, name, _ in COLUMNS]
  lines = [preface.rstrip(), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [title(r["branch"]), _guidance(r)]
    for key, _, fmt in COLUMNS:
      cells.append(fmt.format(r[key]) if key in r and r[key] is not None else "-")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _guidance(row: dict) -> str:
  g = row["guidance_scale"]
  if g == 1:
    return "none"
  rescale = row.get("guidance_rescale") or 0
  return f"{g:g}" + (f" (rescale {rescale:g})" if rescale else "")


def write_json(path: str, rows: list[dict], meta: dict) -> str:
  fileio.write_text(path, json.dumps({**meta, "rows": rows}, indent=2, sort_keys=True) + "\n")
  return path


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
  """About n round tick values covering [lo, hi]."""
  if hi <= lo:
    hi = lo + 1.0
  raw = (hi - lo) / max(n - 1, 1)
  step = 10 ** math.floor(math.log10(raw))
  step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
  first = math.floor(lo / step) * step
  return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _panel(draw: ImageDraw.ImageDraw, box, series: dict, y_label: str, x_label: str) -> None:
  """One line chart in box=(left, top, right, bottom): series = {name: [(x, y), ...]}."""
  left, top, right, bottom = box
  points = [p for pts in series.values() for p in pts if p[1] is not None and math.isfinite(p[1])]
  if not points:
    draw.text((left + 10, top + 10), f"{y_label}: no values", fill=(0, 0, 0))
    return
  xs, ys = [p[0] for p in points], [p[1] for p in points]
  xt, yt = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
  x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
  px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
  py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)
  draw.rectangle(box, outline=(0, 0, 0))
  for x in xt:
    draw.line([(px(x), bottom), (px(x), bottom + 4)], fill=(0, 0, 0))
    draw.text((px(x) - 8, bottom + 6), f"{x:g}", fill=(0, 0, 0))
  for y in yt:
    draw.line([(left - 4, py(y)), (left, py(y))], fill=(0, 0, 0))
    draw.line([(left, py(y)), (right, py(y))], fill=(230, 230, 230))
    draw.text((left - 44, py(y) - 6), f"{y:.4g}", fill=(0, 0, 0))
  draw.text(((left + right) // 2 - 40, bottom + 22), x_label, fill=(0, 0, 0))
  draw.text((left, top - 16), y_label, fill=(0, 0, 0))
  for i, (name, pts) in enumerate(series.items()):
    colour = _COLOURS[i % len(_COLOURS)]
    pts = [(px(x), py(y)) for x, y in pts if y is not None and math.isfinite(y)]
    if len(pts) > 1:
      draw.line(pts, fill=colour, width=2)
    for x, y in pts:
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def plot(path: str, rows: list[dict], metrics=(("fid", "FID (lower is better)"), ("recall", "recall"))) -> str:
  """A PNG with one panel per metric against the guidance scale, one line per branch, and a legend."""
  branches = list(dict.fromkeys(r["branch"] for r in rows))
  width, height, margin = 420 * len(metrics), 360, 60
  image = Image.new("RGB", (width, height + 24 * len(branches)), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  for j, (key, label) in enumerate(metrics):
    series = {b: sorted((r["guidance_scale"], r.get(key)) for r in rows if r["branch"] == b) for b in branches}
    _panel(draw, (j * 420 + margin, 30, (j + 1) * 420 - 20, height - 50), series, label, "guidance scale")
  for i, b in enumerate(branches):
    y = height + 24 * i + 4
    draw.rectangle([margin, y + 2, margin + 20, y + 12], fill=_COLOURS[i % len(_COLOURS)])
    draw.text((margin + 28, y), title(b), fill=(0, 0, 0))
  return _save(path, image)


def side_by_side(path: str, grids: dict[str, tuple[np.ndarray, np.ndarray]], heading: str) -> str:
  """The class grids of several branches (same seeds and labels) next to each other, each titled."""
  tiles = {name: images.class_grid(imgs, labels).convert("RGB") for name, (imgs, labels) in grids.items()}
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  widths = {name: max(tile.width, int(measure.textlength(title(name))) + 4) for name, tile in tiles.items()}
  gap, top = 16, 40
  width = max(sum(widths.values()) + gap * (len(tiles) + 1), int(measure.textlength(heading)) + 2 * gap)
  height = max(t.height for t in tiles.values()) + top + gap
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  draw.text((gap, 4), heading, fill=(0, 0, 0))
  x = gap
  for name, tile in tiles.items():
    draw.text((x, 22), title(name), fill=(0, 0, 0))
    canvas.paste(tile, (x, top))
    x += widths[name] + gap
  return _save(path, canvas)


def _save(path: str, image: Image.Image) -> str:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  fileio.write_bytes(path, buffer.getvalue())
  return path
