"""ImageNet 2012 (ILSVRC-2012-CLS), class-conditional, read from TFDS's array_record files with random access.

TensorFlow Datasets prepares the data set once (it cannot be downloaded automatically: the archives need an
image-net.org account):

  python -m selfperc_jax.data.imagenet --manual_dir=DIR_WITH_THE_ILSVRC2012_TARS --data_dir=TFDS_DATA_DIR

Training then reads the prepared array_record files through `tfds.data_source`, which needs
no TensorFlow at read time. Images are decoded with Pillow in the grain workers and cropped as ADM does (halve with
a box filter while the short side is at least twice the target, resize the short side to the target with bicubic,
take the centre square). TFDS is imported here only, so nothing else in the package needs it.

Random access works on local paths: for a bucket, copy the prepared folder to the host's disk or mount the bucket
with gcsfuse, and point `data.dir` at it (see README, "Training on Cloud TPU").
"""

from __future__ import annotations

import io
import os

import numpy as np

from selfperc_jax.errors import ConfigError

NAME = "imagenet2012"
NUM_CLASSES = 1000
SPLITS = ("train", "validation")


def prepare_command(data_dir: str, manual_dir: str = "~/imagenet_manual") -> str:
  return f"python -m selfperc_jax.data.imagenet --manual_dir={manual_dir} --data_dir={data_dir}"


def prepare_instructions(data_dir: str) -> str:
  """The steps that prepare ImageNet for this code, with the user's data directory filled in."""
  return (
      "Prepare it once (160 GB of archives; the built files take about as much again):\n"
      "  1. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org/download-images\n"
      "     (needs an account) into a folder, e.g. ~/imagenet_manual.\n"
      f"  2. {prepare_command(data_dir)}\n"
      "     (TFDS's imagenet2012 builder, writing array_record files; takes hours on one host.)\n"
      f"Then train with --config.data.dir={data_dir} (a local path, or a gcsfuse mount of a bucket).")


def prepare(manual_dir: str, data_dir: str) -> str:
  """Builds TFDS imagenet2012 in the array_record format from the ILSVRC-2012 archives in manual_dir; returns the
  prepared folder. (The same as `tfds build`, whose command line needs apache-beam; this needs only TFDS.)"""
  manual_dir, data_dir = os.path.expanduser(manual_dir), os.path.expanduser(data_dir)
  missing = [f for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
             if not os.path.exists(os.path.join(manual_dir, f))]
  if missing:
    raise ConfigError(f"{', '.join(missing)} not found in {manual_dir}; download them from "
                      "https://image-net.org/download-images (needs an account) into that folder.")
  tfds = _tfds()
  builder = tfds.builder(NAME, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return str(builder.data_dir)


def center_crop(image, size: int) -> np.ndarray:
  """ADM's centre crop of a PIL image to size x size: box-halve while the short side >= 2*size, bicubic-resize the
  short side to `size`, then cut the centre square. Returns uint8 HWC RGB."""
  from PIL import Image

  image = image.convert("RGB")
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(max(size, round(x * scale)) for x in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def decode(jpeg: bytes, size: int) -> np.ndarray:
  from PIL import Image

  with Image.open(io.BytesIO(jpeg)) as image:
    return center_crop(image, size)


class Source:
  """A random-access sequence of {'image': uint8 HWC (size x size x 3), 'label': int32} for grain.

  Picklable (grain's worker processes get a copy): it holds the TFDS data source, which reopens its files.
  """

  def __init__(self, records, size: int):
    self.records, self.size = records, size

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index):
    record = self.records[int(index)]
    return {"image": decode(record["image"], self.size), "label": np.int32(record["label"])}


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # the model, loss and step never need it; only this data set does
    raise ConfigError("data.name='imagenet2012' needs tensorflow-datasets: pip install tensorflow-datasets "
                      f"array_record ({e}).") from e
  return tfds


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def open_source(data_cfg) -> Source:
  """The prepared split of data_cfg (data.dir, data.split, data.image_size), or one ConfigError saying how to
  prepare it. Nothing is downloaded."""
  data_dir = os.path.expanduser(data_cfg.dir or default_data_dir())
  if not os.path.isdir(os.path.join(data_dir, NAME)):
    raise ConfigError(f"{NAME} is not prepared in data.dir={data_dir} (there is no {NAME} folder in it).\n"
                      + prepare_instructions(data_dir))
  tfds = _tfds()
  builder = tfds.builder(NAME, data_dir=data_dir)
  if not builder.is_prepared():
    raise ConfigError(f"{NAME} is not prepared in data.dir={data_dir} (looked for {builder.data_dir}).\n"
                      + prepare_instructions(data_dir))
  formats = {str(getattr(f, "value", f)) for f in builder.info.available_file_formats()}
  if "array_record" not in formats:
    raise ConfigError(f"{NAME} in {builder.data_dir} is prepared as {sorted(formats)}, but training reads it with "
                      "random access, which needs array_record. Build it in that format (into another data_dir, or "
                      f"after moving {builder.data_dir} aside):\n  " + prepare_command(data_dir))
  if data_cfg.split not in builder.info.splits:
    raise ConfigError(f"{NAME} in {builder.data_dir} has no {data_cfg.split!r} split (it has "
                      f"{sorted(builder.info.splits)}); put ILSVRC2012_img_"
                      f"{'val' if data_cfg.split == 'validation' else 'train'}.tar in the manual folder and build "
                      "again.\n" + prepare_instructions(data_dir))
  records = builder.as_data_source(split=data_cfg.split, decoders={"image": tfds.decode.SkipDecoding()},
                                   file_format="array_record")
  return Source(records, int(data_cfg.image_size))


def main(argv=None) -> int:
  import argparse

  parser = argparse.ArgumentParser(description="Prepare TFDS imagenet2012 (array_record) for training.")
  parser.add_argument("--manual_dir", required=True, help="folder with ILSVRC2012_img_train.tar and _val.tar")
  parser.add_argument("--data_dir", default=default_data_dir(), help="TFDS data directory to write (data.dir)")
  args = parser.parse_args(argv)
  try:
    path = prepare(args.manual_dir, args.data_dir)
  except ConfigError as e:
    print(f"error: {e}")
    return 2
  print(f"prepared {path}; train with --config.data.dir={args.data_dir}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
