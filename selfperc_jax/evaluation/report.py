"""The comparison's outputs: a Markdown table, a JSON file, a plot of FID and recall against the guidance scale, and
sample grids side by side. Pure formatting and drawing; `experiments.py` decides what goes in.

Rows are one evaluation each: a branch ('mse', 'perceptual@lr1e-4', ...) at a guidance scale, of one training seed
('seed'; absent without experiment.seeds). With one seed the table shows the values; with several, each metric's
mean ± the half-width of its 95 % interval over the seeds, and a second table the paired difference of each branch
to the baseline branch of the same seed at the same guidance scale (`seed_stats`), '*' where its interval excludes
zero."""

from __future__ import annotations

import io
import json
import math

import numpy as np
from PIL import Image, ImageDraw

from selfperc_jax import fileio, images
from selfperc_jax.evaluation import seed_stats

BRANCH_TITLES = {
    "pretrain": "MSE pre-training (start point)",
    "mse": "MSE",
    "perceptual": "self-perceptual",
    "mse_perceptual": "MSE + self-perceptual",
    "perceptual_ema": "self-perceptual, copy = EMA",
    "perceptual_online": "self-perceptual, copy = online",
}
START_POINT = "pretrain"  # compared with nothing: the branches' start, evaluated unguided
# The metrics a row may hold (key, column name, decimals), and the sample count.
METRICS = (("fid", "FID", 3), ("inception_score", "IS", 2), ("precision", "precision", 3), ("recall", "recall", 3),
           ("class_accuracy", "class acc.", 3), ("class_confidence", "class conf.", 3),
           ("class_balance", "class bal.", 3))
COLUMNS = METRICS + (("num_samples", "samples", 0),)
LOWER_IS_BETTER = ("fid",)
# A column shown only where no row holds another: the classifier's confidence stands in for the class accuracy of an
# unconditional model (a conditional one reports both; its table keeps the accuracy alone).
_STANDS_IN_FOR = {"class_confidence": "class_accuracy"}
_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75))


def title(branch: str) -> str:
  """'self-perceptual', or for a variant 'self-perceptual @ lr1e-4'."""
  base, _, variant = branch.partition("@")
  return BRANCH_TITLES.get(base, base) + (f" @ {variant}" if variant else "")


def seeds(rows: list[dict]) -> list:
  """The training seeds of the rows, in order ([None] for rows without one)."""
  return list(dict.fromkeys(r.get("seed") for r in rows))


def columns(rows: list[dict]) -> list[tuple[str, str, int]]:
  """The COLUMNS that some row holds (the classifier's confidence only where no row has a class accuracy)."""
  held = {k for r in rows for k, v in r.items() if v is not None}
  return [c for c in COLUMNS if c[0] in held and _STANDS_IN_FOR.get(c[0]) not in held]


def summary(rows: list[dict], baseline: str = "mse") -> list[dict]:
  """One entry per (branch, guidance scale), in the rows' order: its rows' seeds, each metric's Interval over them
  ("metrics"), and, but for the baseline and the start point, each metric's paired difference to the baseline's row
  of the same seed at the same guidance scale ("difference": branch - baseline; None where the baseline has no row
  at that scale)."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["branch"], float(r["guidance_scale"])), []).append(r)
  out = []
  for (branch, scale), group in groups.items():
    values = lambda rs, key: [r[key] for r in rs if r.get(key) is not None]
    entry = {"branch": branch, "guidance_scale": scale, "guidance_rescale": group[0].get("guidance_rescale") or 0.0,
             "seeds": [r.get("seed") for r in group],
             "metrics": {k: seed_stats.interval(values(group, k)) for k, _, _ in METRICS if values(group, k)},
             "difference": None}
    base = {r.get("seed"): r for r in groups.get((baseline, scale), [])}
    if branch not in (baseline, START_POINT) and base:
      entry["difference"] = {}
      for key, _, _ in METRICS:
        pairs = [(r[key], base[r.get("seed")][key]) for r in group
                 if r.get(key) is not None and base.get(r.get("seed"), {}).get(key) is not None]
        if pairs:
          entry["difference"][key] = seed_stats.paired_difference(*zip(*pairs))
    out.append(entry)
  return out


def markdown(rows: list[dict], preface: str, baseline: str = "mse") -> str:
  """The table: one row per (branch, guidance scale), in the order given; missing metrics show as '-'. Rows of one
  training seed show their values; of several, mean ± 95 % half-width over the seeds, and then the table of paired
  differences to the baseline branch."""
  if len(seeds(rows)) > 1:
    return _markdown_over_seeds(rows, preface, baseline)
  cols = columns(rows)
  head = ["branch", "guidance"] + [name for _, name, _ in cols]
  lines = [preface.rstrip(), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [title(r["branch"]), _guidance(r)]
    for key, _, digits in cols:
      cells.append(_number(r[key], digits) if r.get(key) is not None else "-")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _markdown_over_seeds(rows: list[dict], preface: str, baseline: str) -> str:
  cols = columns(rows)
  entries = summary(rows, baseline)
  head = ["branch", "guidance", "n"] + [name for _, name, _ in cols]
  lines = [preface.rstrip(), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for e in entries:
    cells = [title(e["branch"]), _guidance(e), str(len(e["seeds"]))]
    for key, _, digits in cols:
      if key == "num_samples":
        counts = sorted({r["num_samples"] for r in _rows_of(rows, e) if r.get("num_samples") is not None})
        cells.append("-" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}")
      else:
        cells.append(e["metrics"][key].format(digits) if key in e["metrics"] else "-")
    lines.append("| " + " | ".join(cells) + " |")
  compared = [e for e in entries if e["difference"] is not None]
  lines.append("")
  if not compared:
    lines.append(f"No paired differences: the branches have no '{baseline}' branch ({title(baseline)}) at their "
                 "guidance scales to be compared with.")
    return "\n".join(lines) + "\n"
  metric_cols = [c for c in cols if c[0] != "num_samples"]
  lines += [f"Paired differences to {title(baseline)}: branch - {title(baseline)}, training seed by training seed at "
            "the same guidance scale, mean ± 95 % half-width; `*`: the interval excludes zero, a difference beyond "
            "the seed noise.", ""]
  head = ["branch", "guidance", "n"] + [name for _, name, _ in metric_cols] + ["beyond the seed noise"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for e in compared:
    diff = e["difference"]
    n = max((d.n for d in diff.values()), default=0)
    cells = [title(e["branch"]), _guidance(e), str(n)]
    cells += [difference_cell(diff[key], digits) if key in diff else "-" for key, _, digits in metric_cols]
    cells.append(verdict({k: v for k, v in diff.items() if k in {c[0] for c in metric_cols}}))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _rows_of(rows: list[dict], entry: dict) -> list[dict]:
  return [r for r in rows if r["branch"] == entry["branch"] and float(r["guidance_scale"]) == entry["guidance_scale"]]


def difference_cell(diff: seed_stats.Interval, digits: int) -> str:
  """'+1.351 ± 0.400 *' (the interval excludes zero), '-0.011 ± 0.300', or '+0.020' for one pair."""
  if math.isnan(diff.half_width):
    return f"{diff.mean:+.{digits}f}"
  return f"{diff.mean:+.{digits}f} ± {diff.half_width:.{digits}f}" + (" *" if diff.excludes_zero else "")


def verdict(differences: dict[str, seed_stats.Interval]) -> str:
  """What the paired differences say in words: the metrics that differ beyond the seed noise, or that none does."""
  if not differences or max(d.n for d in differences.values()) < 2:
    return "one seed: no interval"
  names = {key: name for key, name, _ in METRICS}
  said = []
  for key, d in differences.items():
    if d.excludes_zero:
      better = (d.mean < 0) == (key in LOWER_IS_BETTER)
      said.append(f"{names.get(key, key)} {'higher' if d.mean > 0 else 'lower'} ({'better' if better else 'worse'})")
  return ", ".join(said) if said else "no difference beyond the seed noise"


def _number(value, digits: int) -> str:
  return f"{value:d}" if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else f"{value:.{digits}f}"


def _guidance(row: dict) -> str:
  g = row["guidance_scale"]
  if g == 1:
    return "none"
  rescale = row.get("guidance_rescale") or 0
  return f"{g:g}" + (f" (rescale {rescale:g})" if rescale else "")


def summary_json(rows: list[dict], baseline: str = "mse") -> list[dict]:
  """summary() as plain JSON values (no NaN: a missing interval is null)."""
  finite = lambda x: x if math.isfinite(x) else None
  out = []
  for e in summary(rows, baseline):
    item = {k: e[k] for k in ("branch", "guidance_scale", "guidance_rescale", "seeds")}
    item["metrics"] = {k: {"mean": v.mean, "half_width": finite(v.half_width), "n": v.n}
                       for k, v in e["metrics"].items()}
    if e["difference"] is not None:
      item[f"difference_to_{baseline}"] = {
          k: {"mean": v.mean, "half_width": finite(v.half_width), "n": v.n, "excludes_zero": v.excludes_zero}
          for k, v in e["difference"].items()}
    out.append(item)
  return out


def write_json(path: str, rows: list[dict], meta: dict, baseline: str = "mse") -> str:
  """meta and the rows; with several training seeds also "summary" (summary_json)."""
  if len(seeds(rows)) > 1:
    meta = {**meta, "summary": summary_json(rows, baseline)}
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
  """One line chart in box=(left, top, right, bottom): series = {name: [(x, y), ...]}, or [(x, y, half_width), ...]
  for error bars y ± half_width (each series then a few pixels aside of the others, so that the bars stay apart)."""
  left, top, right, bottom = box
  ok = lambda v: v is not None and math.isfinite(v)
  series = {name: [(p[0], p[1], p[2] if len(p) > 2 and ok(p[2]) else 0.0) for p in pts if ok(p[1])]
            for name, pts in series.items()}
  points = [p for pts in series.values() for p in pts]
  if not points:
    draw.text((left + 10, top + 10), f"{y_label}: no values", fill=(0, 0, 0))
    return
  xs = [p[0] for p in points]
  yt = _ticks(min(y - h for _, y, h in points), max(y + h for _, y, h in points))
  single = min(xs) == max(xs)  # one guidance scale: its tick in the middle, the series side by side around it
  xt = [xs[0]] if single else _ticks(min(xs), max(xs))
  x0, x1 = (xs[0] - 1, xs[0] + 1) if single else (xt[0], xt[-1])
  y0, y1 = yt[0], yt[-1]
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
  bars = any(h > 0 for _, _, h in points)
  for i, (name, pts) in enumerate(series.items()):
    colour = _COLOURS[i % len(_COLOURS)]
    shift = (25 if single else 5 if bars else 0.0) * (i - (len(series) - 1) / 2)
    for x, y, h in pts:
      if h > 0:
        draw.line([(px(x) + shift, py(y - h)), (px(x) + shift, py(y + h))], fill=colour, width=1)
        for end in (y - h, y + h):
          draw.line([(px(x) + shift - 3, py(end)), (px(x) + shift + 3, py(end))], fill=colour, width=1)
    centres = [(px(x) + shift, py(y)) for x, y, _ in pts]
    if len(centres) > 1:
      draw.line(centres, fill=colour, width=2)
    for x, y in centres:
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def plot(path: str, rows: list[dict], metrics=(("fid", "FID (lower is better)"), ("recall", "recall"))) -> str:
  """A PNG with one panel per metric against the guidance scale, one line per branch, and a legend; with several
  training seeds the lines join the means over seeds, and error bars show the 95 % intervals."""
  branches = list(dict.fromkeys(r["branch"] for r in rows))
  width, height, margin = 420 * len(metrics), 360, 60
  image = Image.new("RGB", (width, height + 24 * len(branches)), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  entries = summary(rows) if len(seeds(rows)) > 1 else None
  for j, (key, label) in enumerate(metrics):
    if entries is None:
      series = {b: sorted((r["guidance_scale"], r.get(key)) for r in rows if r["branch"] == b) for b in branches}
    else:
      series = {b: sorted((e["guidance_scale"], e["metrics"][key].mean, e["metrics"][key].half_width)
                          for e in entries if e["branch"] == b and key in e["metrics"]) for b in branches}
      label += ", mean ± 95 % over seeds"
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
