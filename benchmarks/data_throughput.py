"""Throughput of the ImageNet input pipeline: JPEG decode + ADM centre crop per image, and whole batches through
grain with 0..N worker processes, from TFDS array_record files.

  python benchmarks/data_throughput.py --data_dir=~/tensorflow_datasets [--workers=0,2,4] [--out=BENCHMARKS.md]
  python benchmarks/data_throughput.py --synthetic=512 [--workers=0,2] [--out=BENCHMARKS.md]

With --synthetic=N it first prepares N photo-like synthetic JPEGs of ImageNet's typical size (500x375) in the real
archive layout, through the same preparation command users run (benchmarks/fake_imagenet.py), in a temporary
directory. The figures say how many worker processes a host needs to keep up with its share of the global batch:
images/s needed = per-host batch / step time.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere

from absl import app, flags  # noqa: E402

from selfperc_jax import input_pipeline  # noqa: E402
from selfperc_jax.data import imagenet  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "TFDS data directory holding imagenet2012 (array_record).")
flags.DEFINE_integer("synthetic", 0, "Prepare this many synthetic 500x375 JPEGs instead of reading --data_dir.")
flags.DEFINE_string("workers", "0,2", "Comma-separated grain worker counts to time.")
flags.DEFINE_integer("threads", 2, "data.read_threads: threads per process, each building one batch.")
flags.DEFINE_integer("batch", 64, "Per-host batch.")
flags.DEFINE_integer("batches", 12, "Timed batches per worker count (after the warm-up batches).")
flags.DEFINE_integer("image_size", 256, "Crop size.")
flags.DEFINE_string("out", None, "Append the figures to this markdown file (e.g. BENCHMARKS.md).")


def prepare_synthetic(root: str, count: int) -> str:
  from benchmarks import fake_imagenet

  rng = np.random.default_rng(0)
  per_synset = max(1, count // 8)
  fake_imagenet.write_archives(os.path.join(root, "manual"), 8, per_synset,
                               lambda k, j: fake_imagenet.photo_like(rng, 375, 500))
  data_dir = os.path.join(root, "tfds")
  imagenet.prepare(os.path.join(root, "manual"), data_dir)
  return data_dir


def decode_ms(data_dir: str, image_size: int, n: int = 64) -> tuple[float, float]:
  """(median ms to decode + crop one image, mean JPEG KiB) in this process."""
  cfg = _config(data_dir, image_size, 64, 0).data
  records = imagenet.open_source(cfg).records
  n = min(n, len(records))
  jpegs = [records[i]["image"] for i in range(n)]
  times = []
  for b in jpegs:
    t0 = time.perf_counter()
    imagenet.decode(b, image_size)
    times.append(1e3 * (time.perf_counter() - t0))
  return statistics.median(times), float(np.mean([len(b) for b in jpegs])) / 1024


def _config(data_dir: str, image_size: int, batch: int, workers: int, threads: int = 2):
  spec = importlib.util.spec_from_file_location("imagenet256_config", os.path.join(REPO, "configs", "imagenet256.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tpu")
  config.data.dir, config.data.image_size, config.data.num_workers = data_dir, image_size, workers
  config.data.read_threads = threads
  config.batch_size = batch
  return config


def pipeline_images_per_s(data_dir: str, image_size: int, batch: int, workers: int, threads: int,
                          batches: int) -> float:
  pipeline = input_pipeline.build(_config(data_dir, image_size, batch, workers, threads), rows=(0, batch))
  # Not timed: start-up, and the batches already in flight when the first one arrives (one per thread per process).
  for _ in range(max(1, workers) * threads + 1):
    next(pipeline)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(pipeline)
  return batch * batches / (time.perf_counter() - t0)


def main(argv):
  del argv
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  with tempfile.TemporaryDirectory() as tmp:
    if FLAGS.synthetic:
      data_dir, source = prepare_synthetic(tmp, FLAGS.synthetic), f"synthetic 500x375 JPEGs ({FLAGS.synthetic})"
    elif FLAGS.data_dir:
      data_dir, source = os.path.expanduser(FLAGS.data_dir), f"imagenet2012 in {FLAGS.data_dir}"
    else:
      raise app.UsageError("give --data_dir or --synthetic=N")
    ms, kib = decode_ms(data_dir, FLAGS.image_size)
    rows = [(w, pipeline_images_per_s(data_dir, FLAGS.image_size, FLAGS.batch, w, FLAGS.threads, FLAGS.batches))
            for w in (int(x) for x in FLAGS.workers.split(","))]
  cores = os.cpu_count()
  print(f"decode + crop to {FLAGS.image_size}: {ms:.2f} ms/image (mean JPEG {kib:.0f} KiB)")
  for w, rate in rows:
    print(f"{w} worker(s) x {FLAGS.threads} threads, batch {FLAGS.batch}: {rate:.0f} images/s")
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write(f"\n#### Input pipeline, {datetime.date.today()}, {cores} CPU cores: {source}, "
              f"crop {FLAGS.image_size}\n\n"
              f"Decode + ADM crop: {ms:.2f} ms per image in one process (mean JPEG {kib:.0f} KiB).\n\n"
              "| grain workers | threads per process | batch | images/s |\n| --- | --- | --- | --- |\n")
      for w, rate in rows:
        f.write(f"| {w} | {FLAGS.threads} | {FLAGS.batch} | {rate:.0f} |\n")


if __name__ == "__main__":
  app.run(main)
