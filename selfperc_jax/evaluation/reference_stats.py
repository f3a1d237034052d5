"""Reference statistics of a folder of real images (e.g. COCO's val2014 for text-to-image FID), for eval.reference
and `python -m selfperc_jax.evaluation.compare`:

  python -m selfperc_jax.evaluation.reference_stats --images=coco/val2014 --size=512 \\
      --weights=pt_inception-2015-12-05.pth --out=coco_val2014_512.npz [--captions=captions_val2014.json] [--limit=N]

Each image is cropped as the samples are made (Stable Diffusion's: the short side resized to --size, bilinear and
antialiased, then the centre square: data/captioned.py), then through the FID Inception network; mu, sigma and the
features are written to --out. With --captions (a COCO captions file) only the images that have a caption are read,
in the order of the prompts that file gives (data/coco.py), so that --limit=N takes the same images as the first N
prompts. Features go to --out's folder in chunks as they are made (<out>.partial/), so a killed run resumes where it
stopped; memory does not grow with the number of images. Images that do not decode are skipped, counted and named
in one line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

from selfperc_jax.errors import UserError
from selfperc_jax.logging_utils import Progress

CHUNK = 512  # images per features chunk file
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def image_files(images: str, captions: str = "", limit: int = 0) -> list[str]:
  """The image paths to read, in order (sorted names, or the captions file's order); one UserError if none."""
  from selfperc_jax.data import coco

  if not os.path.isdir(images):
    raise UserError(f"--images={images} is not a folder of images.")
  if captions:
    names = [name for _, name, _ in coco.read_captions(captions)]
  else:
    names = sorted(f for f in os.listdir(images) if f.lower().endswith(EXTENSIONS))
  paths = [os.path.join(images, n) for n in names][: limit or None]
  if not paths:
    raise UserError(f"--images={images} holds no {'/'.join(EXTENSIONS)} images"
                    + (" named by --captions" if captions else "") + ".")
  return paths


def _read(path: str, size: int) -> np.ndarray | None:
  from PIL import Image

  from selfperc_jax.data import captioned

  try:
    with Image.open(path) as image:
      return captioned.sd_crop(image, size)
  except Exception:  # noqa: BLE001 - a file that is missing, truncated or not an image is one skip
    return None


def run(images: str, size: int, weights: str, out: str, captions: str = "", limit: int = 0, network=None,
        chunk: int = CHUNK) -> dict:
  """Writes out (mu, sigma, features); returns {'images': used, 'skipped': [paths]}. `network` (tests): an object with
  features(uint8 NHWC) -> (N, D), instead of the FID Inception from `weights`."""
  from selfperc_jax.evaluation import metrics

  if not out.endswith(".npz"):
    raise UserError(f"--out={out} must end in .npz.")
  paths = image_files(images, captions, limit)
  if network is None:
    from selfperc_jax.evaluation.inception import InceptionFeatures

    network = InceptionFeatures(weights)
  partial = out + ".partial"
  os.makedirs(partial, exist_ok=True)
  manifest = {"size": int(size), "images": len(paths), "first": paths[0], "last": paths[-1], "chunk": int(chunk),
              "weights": os.path.basename(weights)}
  manifest_path = os.path.join(partial, "manifest.json")
  if os.path.exists(manifest_path):  # a resumed run must be the same run, or its chunks would be mixed with these
    with open(manifest_path) as f:
      there = json.load(f)
    if there != manifest:
      differ = ", ".join(f"{k}: {there.get(k)!r} there, {v!r} now" for k, v in manifest.items() if there.get(k) != v)
      raise UserError(f"{partial} holds the chunks of another run ({differ}); remove it, or give another --out.")
  else:
    with open(manifest_path, "w") as f:
      json.dump(manifest, f)
  chunks = -(-len(paths) // chunk)
  done = sum(os.path.exists(os.path.join(partial, f"chunk_{i:05d}.npz")) for i in range(chunks))
  progress = Progress(f"reference features of {images}", len(paths), unit="images",
                      start=min(done * chunk, len(paths)))
  for i in range(chunks):
    target = os.path.join(partial, f"chunk_{i:05d}.npz")
    if os.path.exists(target):
      continue
    part = paths[i * chunk:(i + 1) * chunk]
    crops = [_read(p, size) for p in part]
    kept = [c for c in crops if c is not None]
    features = network.features(np.stack(kept)) if kept else np.zeros((0, 0), np.float32)
    skipped = np.array([p for p, c in zip(part, crops) if c is None], dtype=str)
    tmp = target + ".tmp.npz"
    np.savez(tmp, features=np.asarray(features, np.float32), skipped=skipped)
    os.replace(tmp, target)
    progress.update(min((i + 1) * chunk, len(paths)))
  features, skipped = [], []
  for i in range(chunks):
    with np.load(os.path.join(partial, f"chunk_{i:05d}.npz")) as f:
      if len(f["features"]):
        features.append(f["features"])
      skipped += [str(s) for s in f["skipped"]]
  if not features:
    raise UserError(f"none of the {len(paths)} images of {images} could be read.")
  metrics.save_reference(out, np.concatenate(features))
  shutil.rmtree(partial, ignore_errors=True)
  n = sum(len(f) for f in features)
  print(f"wrote {out}: {n} images" + (f"; skipped {len(skipped)} unreadable (e.g. "
                                     f"{', '.join(os.path.basename(s) for s in skipped[:3])})" if skipped else ""),
        flush=True)
  return {"images": n, "skipped": skipped}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", required=True, help="folder of the real images")
  parser.add_argument("--size", type=int, required=True, help="the samples' resolution (the crop's side)")
  parser.add_argument("--weights", default="", help="FID Inception weights (.pth or converted .npz)")
  parser.add_argument("--out", required=True, help="the reference statistics to write (.npz)")
  parser.add_argument("--captions", default="", help="a COCO captions file: only its images, in its order")
  parser.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
  args = parser.parse_args(argv)
  try:
    run(args.images, args.size, args.weights, args.out, args.captions, args.limit)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
