"""TensorBoard events written without TensorFlow: the TFRecord framing checked with a CRC-32C computed here, the
Event protos read back, a remote (rewritten whole) file equal to an appended one, and TensorBoard's own reader."""

import math
import os
import struct
import subprocess
import sys

import pytest

from selfperc_jax import logging_utils, tensorboard_events

from conftest import REPO


def _crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: independent of the writer's table."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:  # TFRecord's mask: rotate right by 15, add a constant
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path):
  data, records, at = open(path, "rb").read(), [], 0
  while at < len(data):
    (length,), (length_crc,) = struct.unpack_from("<Q", data, at), struct.unpack_from("<I", data, at + 8)
    assert length_crc == _masked(_crc32c(data[at:at + 8]))
    payload = data[at + 12:at + 12 + length]
    assert struct.unpack_from("<I", data, at + 12 + length)[0] == _masked(_crc32c(payload))
    records.append(payload)
    at += 16 + length
  return records


def _events(path):
  from tensorboard.compat.proto import event_pb2

  return [event_pb2.Event.FromString(r) for r in _records(path)]


def test_crc32c_here_is_the_standard_one():
  assert _crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C


def test_scalars_are_framed_records_of_events_and_tensorflow_is_not_imported(tmp_path):
  writer = tensorboard_events.EventsWriter(str(tmp_path))
  writer.write_scalars(10, {"loss": 0.5, "grad_norm": float("nan")})
  writer.write_scalars(20, {"loss": 0.25})
  assert os.path.basename(writer.path).startswith("events.out.tfevents.")
  events = _events(writer.path)
  assert events[0].file_version == "brain.Event:2"
  assert [e.step for e in events[1:]] == [10, 20]
  first = {v.tag: v.simple_value for v in events[1].summary.value}
  assert first["loss"] == 0.5 and math.isnan(first["grad_norm"])
  assert [(v.tag, v.simple_value) for v in events[2].summary.value] == [("loss", 0.25)]


def test_logging_a_run_does_not_import_tensorflow(tmp_path):
  """The reason for this writer: TensorFlow's import cost seconds in every process of every host."""
  code = ("import sys\nfrom selfperc_jax import logging_utils\n"
          f"logging_utils.MetricLogger({str(tmp_path)!r}, 10, 2).write(1, {{'loss': 1.0}})\n"
          "print(sorted(m for m in ('tensorflow', 'clu') if m in sys.modules))\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == "[]"
  assert [p.name for p in tmp_path.iterdir() if "tfevents" in p.name]


def test_a_remote_file_is_rewritten_whole_with_the_same_records(tmp_path, monkeypatch):
  writer = tensorboard_events.EventsWriter(str(tmp_path))
  writer._remote = True  # what gs:// gets: every write rewrites the file from the records kept
  writes = []
  monkeypatch.setattr(tensorboard_events.fileio, "write_bytes", lambda path, data: writes.append((path, data)))
  writer.write_scalars(1, {"a": 1.0})
  writer.write_scalars(2, {"a": 2.0})
  assert [p for p, _ in writes] == [writer.path] * 2 and writes[1][1].startswith(writes[0][1])
  with open(writer.path, "ab") as f:  # the first record (written locally before the flag was set) + the kept ones
    f.write(writes[1][1])
  assert [e.step for e in _events(writer.path)] == [0, 1, 2]


def test_the_metric_logger_writes_events_beside_metrics_jsonl(tmp_path):
  logger = logging_utils.MetricLogger(str(tmp_path), total_steps=10, batch_size=2)
  logger.write(5, {"loss": 1.5})
  logger.write_eval(5, {"fid": 3.0})
  (path,) = [p for p in tmp_path.iterdir() if "tfevents" in p.name]
  tags = {v.tag: v.simple_value for e in _events(path) for v in e.summary.value}
  assert tags == {"loss": 1.5, "eval/fid": 3.0}


@pytest.mark.slow
def test_tensorboard_reads_the_scalars(tmp_path):
  """TensorBoard's own loader (it may import TensorFlow: slow)."""
  from tensorboard.backend.event_processing import event_accumulator

  writer = tensorboard_events.EventsWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write_scalars(step, {"loss": 1.0 / step})
  accumulator = event_accumulator.EventAccumulator(str(tmp_path))
  accumulator.Reload()
  assert accumulator.Tags()["scalars"] == ["loss"]
  assert [(s.step, round(s.value, 6)) for s in accumulator.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
