"""Images per second of the latent encoder (python -m selfperc_jax.encode_latents) on this machine.

  python benchmarks/encode_throughput.py --images=32 --out=BENCHMARKS.md

It makes a synthetic ILSVRC-2012 (photo-like JPEGs, benchmarks/fake_imagenet.py), prepares it with TFDS, writes a
full-size SD VAE of random weights (the real layout, benchmarks/fake_vae.py: the same FLOPs as the released one),
and runs the encoder command's code over it at 256x256 with flips, as configs/imagenet256_latent.py says. The
figure includes reading, JPEG decoding and the ADM crop.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_integer("images", 32, "Images in the synthetic training split.")
  flags.DEFINE_integer("image_size", 256, "Crop size (the latents are 1/8 of it).")
  flags.DEFINE_integer("batch", 8, "latent.encode_batch_size.")
  flags.DEFINE_bool("flips", True, "Also encode the mirror images (latent.flips).")
  flags.DEFINE_string("out", None, "Append a dated row to this markdown file (e.g. BENCHMARKS.md).")


def measure(num_images: int, image_size: int, batch: int, flips: bool) -> dict:
  import importlib.util

  import numpy as np

  from benchmarks import fake_imagenet, fake_vae
  from selfperc_jax import encode_latents, space
  from selfperc_jax.data import imagenet

  root = tempfile.mkdtemp(prefix="encode_bench_")
  per_synset = 8
  rng = np.random.default_rng(0)
  fake_imagenet.write_archives(os.path.join(root, "manual"), -(-num_images // per_synset), per_synset,
                               lambda k, j: fake_imagenet.photo_like(rng, 375, 500))
  imagenet.prepare(os.path.join(root, "manual"), os.path.join(root, "tfds"))
  spec = importlib.util.spec_from_file_location("latent_config", os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "imagenet256_latent.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("gpu")
  config.data.dir, config.data.image_size = os.path.join(root, "tfds"), image_size
  config.latent.dir, config.latent.encode_batch_size = os.path.join(root, "latents"), batch
  config.latent.flips = config.data.random_flip = flips
  config.latent.vae_weights = fake_vae.write_random_vae(os.path.join(root, "vae.safetensors"),
                                                        space.vae_config(config.latent))
  result = encode_latents.run(config)
  import jax

  return {"images_per_s": result["images_per_s"], "images": num_images, "image_size": image_size, "batch": batch,
          "flips": flips, "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}


def main(argv):
  del argv
  r = measure(FLAGS.images, FLAGS.image_size, FLAGS.batch, FLAGS.flips)
  row = (f"| {datetime.date.today()} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
         f"({r['devices']}) | {r['image_size']} | {'yes' if r['flips'] else 'no'} | {r['batch']} | {r['images']} | "
         f"{r['images_per_s']:.2f} |")
  print(row)
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write("\n| date | machine | crop | flips | batch | images | images/s |\n| --- | --- | --- | --- | --- | --- "
              "| --- |\n" + row + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
