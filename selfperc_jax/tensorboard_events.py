"""TensorBoard scalar events without TensorFlow: the `tensorboard` package's Event protos in TFRecord framing.

TensorBoard reads any file named `*tfevents*` in a run's folder: records of (uint64 length, masked CRC-32C of the
length, an Event proto, masked CRC-32C of the proto), little-endian, the first Event naming the file version. The
protos and the framing (its RecordWriter) come from the `tensorboard` package (pure Python, imported in a fraction
of a second); TensorFlow, which clu's writer imports (several seconds in every process, on every host), is not needed.

A local file is appended to and flushed at every write. Object stores (gs://) cannot append, so a remote file is
written whole at every write, from the records kept in memory (a run's scalars: well under a megabyte).
"""

from __future__ import annotations

import io
import os
import socket
import time

from selfperc_jax import fileio


class EventsWriter:
  """Scalars to `<folder>/events.out.tfevents.<time>.<host>.<pid>.v2`; a new file for each writer (TensorBoard reads
  a folder's files together, so a resumed run adds its own)."""

  def __init__(self, folder: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2  # ImportError: the caller logs without TensorBoard
    from tensorboard.summary.writer.record_writer import RecordWriter

    self._event_pb2, self._summary_pb2, self._record_writer = event_pb2, summary_pb2, RecordWriter
    self.path = fileio.join(folder, f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.v2")
    self._remote = fileio.is_remote(self.path)
    self._kept = bytearray()
    self._write(self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    buffer = io.BytesIO()
    self._record_writer(buffer).write(event.SerializeToString())  # TFRecord framing: length, CRCs, the proto
    records = buffer.getvalue()
    if self._remote:
      self._kept += records
      fileio.write_bytes(self.path, bytes(self._kept))
    else:
      with open(self.path, "ab") as f:
        f.write(records)

  def write_scalars(self, step: int, scalars: dict) -> None:
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
