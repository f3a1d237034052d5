"""Metric outputs: workdir/metrics.jsonl, TensorBoard events (tensorboard_events.py, no TensorFlow) and a console
progress line with an ETA.

Where the `tensorboard` package is missing (e.g. a machine with only JAX installed) the run goes on with
metrics.jsonl and the console.
"""

from __future__ import annotations

import json
import math
import time

from absl import logging

from selfperc_jax import fileio, tensorboard_events


def json_line(record: dict) -> str:
  """One metrics.jsonl row, valid JSON always: a non-finite number is written as the string "NaN", "Infinity" or
  "-Infinity" (what float() reads back), never as the bare NaN that strict JSON readers reject."""
  def value(v):
    if isinstance(v, float) and not math.isfinite(v):
      return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return v

  return json.dumps({k: value(v) for k, v in record.items()}, allow_nan=False)


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricLogger:
  def __init__(self, workdir: str, total_steps: int, batch_size: int, enabled: bool = True,
               peak_flops: float | None = None):
    self.enabled = enabled
    self.peak_flops = peak_flops
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.path = fileio.join(workdir, "metrics.jsonl")
    self._writer = None
    if enabled:
      try:
        self._writer = tensorboard_events.EventsWriter(workdir)
      except ImportError as e:
        logging.warning("TensorBoard logging is off (%s); metrics go to %s only.", e, self.path)
    self._last_time, self._last_step = None, None

  def drop_rows_after(self, step: int) -> int:
    """Removes metrics.jsonl rows past `step` (logged by a run that was killed before it could checkpoint them;
    the resumed run logs those steps again), so the file keeps one row per step. Returns how many were dropped."""
    if not self.enabled or not fileio.exists(self.path):
      return 0
    lines = fileio.read_text(self.path).splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
      fileio.write_text(self.path, "".join(kept))
    return len(lines) - len(kept)

  def start(self, step: int) -> None:
    self._last_time, self._last_step = time.perf_counter(), step

  def write(self, step: int, metrics: dict, step_flops: float | None = None,
            upcoming: tuple[str, int] | None = None) -> dict:
    """step_flops: XLA's FLOPs per device of one step, for TFLOP/s per device and (with a known peak) MFU;
    upcoming: the next output (what, at which step), which the console line announces with its expected time."""
    now = time.perf_counter()
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    if self._last_time is not None and step > self._last_step:
      steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
      record["steps_per_s"] = steps_per_s
      record["images_per_s"] = steps_per_s * self.batch_size
      if step_flops:
        record["tflops_per_device"] = step_flops * steps_per_s / 1e12
        if self.peak_flops:
          record["mfu"] = step_flops * steps_per_s / self.peak_flops
    self._last_time, self._last_step = now, step
    if not self.enabled:
      return record
    fileio.append_text(self.path, json_line(record) + "\n")
    if self._writer is not None:
      self._writer.write_scalars(step, {k: v for k, v in record.items() if k != "step"})
    eta = ""
    if "steps_per_s" in record:
      rate = record["steps_per_s"]
      mfu = f" | MFU {record['mfu']:.1%}" if "mfu" in record else ""
      eta = (f" | {rate:.2f} steps/s, {record['images_per_s']:.0f} img/s{mfu} | "
             f"ETA {_format_duration((self.total_steps - step) / rate)}")
      if upcoming is not None:
        what, at = upcoming
        eta += f" | next {what} at step {at} (in {_format_duration((at - step) / rate)})"
    terms = " ".join(f"{k} {record[k]:.4g}" for k in ("loss", "loss_mse", "loss_perceptual") if k in record)
    print(f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) {terms}{eta}", flush=True)
    return record

  def write_eval(self, step: int, metrics: dict) -> None:
    """Evaluation metrics, as 'eval/<name>', in their own metrics.jsonl row and in TensorBoard."""
    if not self.enabled:
      return
    record = {f"eval/{k}": float(v) for k, v in metrics.items()}
    fileio.append_text(self.path, json_line({"step": int(step), **record}) + "\n")
    if self._writer is not None:
      self._writer.write_scalars(step, record)


class Progress:
  """A progress line for long jobs (sampling, evaluation): done/total, rate and ETA, at most every `every` seconds
  and at the end. `update(done)` takes the absolute count, so a resumed job starts where it stood."""

  def __init__(self, label: str | None, total: int, unit: str = "samples", enabled: bool = True, every: float = 10.0,
               start: int = 0):
    self.label, self.total, self.unit, self.enabled, self.every = label, total, unit, enabled, every
    self._t0 = self._last_print = time.perf_counter()
    self._start = start

  def update(self, done: int) -> None:
    now = time.perf_counter()
    if not self.enabled or (done < self.total and now - self._last_print < self.every):
      return
    self._last_print = now
    rate = (done - self._start) / max(now - self._t0, 1e-9)
    eta = f" | ETA {_format_duration((self.total - done) / rate)}" if rate > 0 and done < self.total else ""
    print(f"{self.label}: {done}/{self.total} {self.unit} ({100 * done / max(self.total, 1):.0f}%) | "
          f"{rate:.1f} {self.unit}/s{eta}", flush=True)
