"""Encodes a data set into VAE latents once, for latent-space training (see data/latents.py for the folder):

  python -m selfperc_jax.encode_latents --config=configs/imagenet256_latent.py \\
      --config.latent.vae_weights=PATH/diffusion_pytorch_model.safetensors --config.latent.dir=DIR

It reads config.data (the prepared TFDS imagenet2012 split, ADM's centre crop at data.image_size; or image-caption
data, data/captioned.py: img2dataset's webdataset shards or a folder with a captions .jsonl, SD's resize and centre
crop), runs the VAE's encoder from latent.vae_weights over it, and writes the posterior moments (mean and std, also
of the mirror image with latent.flips) to latent.dir/<data.split>/, with each caption's token ids (the config's
tokenizer: config.pretrained's, or the built-in one). Captioned examples whose image does not decode or whose caption
is blank are skipped, counted per shard, and summed up in one line at the end (a few named). Every process encodes its own shards (shard i belongs to process
i mod the process count) on its own devices, the batch split over them, so a pod slice encodes in parallel with no
communication. A rerun skips the complete shards (a killed run resumes), and a folder encoded with another layout is
refused. Progress and ETA are printed as it goes.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from selfperc_jax import sharding, space
from selfperc_jax import input_pipeline
from selfperc_jax.data import captioned, latents
from selfperc_jax.errors import ConfigError
from selfperc_jax.logging_utils import Progress


def _moments_fn(vae, flips: bool):
  def moments(params, images):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    if flips:  # the crops and their mirror images through the encoder as one batch of 2B
      x = jnp.concatenate([x, x[:, :, ::-1]])
    mean, logvar = vae.apply(params, x, method=vae.encode)
    std, b = jnp.exp(0.5 * logvar), images.shape[0]
    out = [mean[:b], std[:b], mean[b:], std[b:]] if flips else [mean, std]
    return jnp.stack(out, axis=1).astype(latents.DTYPE)  # (B, k, h, w, c)

  return moments


class _Images:
  """Examples [lo, hi) of the image source, read in order by a few threads, in batches of `batch` (uint8)."""

  def __init__(self, source, threads: int):
    self.source, self.threads = source, threads

  def batches(self, lo: int, hi: int, batch: int):
    """Lists of `batch` examples (the last one shorter), in order."""
    import grain

    ds = grain.MapDataset.range(lo, hi).map(lambda i: self.source[i]).batch(batch, batch_fn=list)
    yield from ds.to_iter_dataset(grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.threads))


class _Skips:
  """A captioned shard's skipped examples: counts per problem and the first few keys (shard-*.json)."""

  KEEP = 5

  def __init__(self):
    self.counts = {name: 0 for name in captioned.PROBLEMS.values()}
    self.examples: dict[str, list[str]] = {name: [] for name in captioned.PROBLEMS.values()}

  def add(self, problem: str, key: str) -> None:
    self.counts[problem] += 1
    if len(self.examples[problem]) < self.KEEP:
      self.examples[problem].append(key)

  def to_json(self, written: int) -> str:
    return json.dumps({"written": written, "skipped": self.counts, "examples": self.examples})


def _tokens(tokenizer, caption: str) -> np.ndarray | None:
  try:
    return tokenizer.encode([caption])[0]
  except ValueError:  # not text the tokenizer takes (e.g. a lone surrogate)
    return None


def summary(directory: str, layout: latents.Layout) -> str:
  """One line: how many captioned examples the folder's shards hold and how many were skipped, and why (with a few
  keys); '' for a data set without captions."""
  if not layout.text_tokens:
    return ""
  written, counts, examples = 0, {}, {}
  for i in range(layout.num_shards):
    path = os.path.join(directory, latents.skips_name(i, layout.num_shards))
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      row = json.load(f)
    written += row["written"]
    for name, n in row["skipped"].items():
      counts[name] = counts.get(name, 0) + n
      examples.setdefault(name, []).extend(row["examples"][name])
  parts = [f"{n} {name} (e.g. {', '.join(examples[name][:3])})" for name, n in counts.items() if n]
  return (f"{written} captioned examples of {layout.num_examples} encoded; skipped "
          + ("; ".join(parts) if parts else "none") + ".")


def _prepare_folder(directory: str, layout: latents.Layout, lead: bool) -> None:
  """Writes meta.json in a new folder; refuses a folder that holds another encoding. Every process checks."""
  if lead:
    os.makedirs(directory, exist_ok=True)
    if latents.read_layout(directory) is None:
      tmp = os.path.join(directory, f".{latents.META}.tmp{os.getpid()}")
      with open(tmp, "w") as f:
        f.write(layout.to_json())
      os.replace(tmp, os.path.join(directory, latents.META))
  sharding.barrier()  # the folder and meta.json exist past this line
  there = latents.read_layout(directory)
  if there is None:
    raise ConfigError(f"{directory}/{latents.META} is not visible from process {jax.process_index()}; latent.dir "
                      "must be one folder that every host sees (a shared disk or a gcsfuse mount).")
  diffs = latents.differences(there, layout)
  if diffs:
    raise ConfigError(f"{directory} holds latents encoded differently:\n  " + "\n  ".join(diffs)
                      + "\nGive another --config.latent.dir, or remove that folder to encode it anew.")


def run(config) -> dict:
  """Encodes config.data.split into latent.dir; returns {'encoded': shards written now, 'skipped': shards done}."""
  from selfperc_jax import validation

  validation.validate(config)
  if not space.is_latent(config):
    raise ConfigError("latent.vae is '' (pixel space): set --config.latent.vae=sd (or sdxl), or use a latent "
                      "config such as configs/imagenet256_latent.py.")
  if not config.latent.dir:
    raise ConfigError("set --config.latent.dir to the folder the latents go to (and the trainer reads).")
  lc = space.latent_section(config)  # latent.vae_weights, or the model folder's vae/
  space.check_vae_weights(lc)
  images = input_pipeline.open_image_source(config.data)
  layout = space.latent_layout(config, num_examples=len(images), shard_size=int(lc.shard_size))
  directory = latents.split_dir(lc.dir, config.data.split)
  lead = jax.process_index() == 0
  _prepare_folder(directory, layout, lead)

  mine = [i for i in range(layout.num_shards) if i % jax.process_count() == jax.process_index()]
  todo = [i for i in latents.missing_shards(directory, layout) if i in set(mine)]
  vae, variables = space.load_vae(lc)
  mesh = sharding.local_mesh()
  batch = -(-int(lc.encode_batch_size) // mesh.size) * mesh.size  # a multiple of this process's devices
  params = sharding.replicate(variables, mesh)
  encode = jax.jit(_moments_fn(vae, layout.flips), out_shardings=sharding.replicated(mesh))
  reader = _Images(images, threads=max(1, int(config.data.read_threads)))
  if layout.text_tokens:
    from selfperc_jax import text

    tokenizer = text.tokenizer(text.folder_of(config))
  total = sum(np.subtract(*layout.shard_range(i)[::-1]) for i in todo)
  progress = Progress(f"encoding {config.data.name} {config.data.split} (process {jax.process_index()}, "
                      f"{len(todo)} of its {len(mine)} shards to do)", int(total), unit="images")
  print(f"encoding {len(todo)} shards ({total} images) into {directory} on {mesh.size} device(s); "
        f"{len(mine) - len(todo)} of this process's shards are done already", flush=True)
  done, t0 = 0, time.perf_counter()
  from array_record.python.array_record_module import ArrayRecordWriter

  for i in todo:
    lo, hi = layout.shard_range(i)
    final = os.path.join(directory, latents.shard_name(i, layout.num_shards))
    tmp = os.path.join(directory, f".{latents.shard_name(i, layout.num_shards)}.tmp{os.getpid()}")
    writer, skips, written = ArrayRecordWriter(tmp, "group_size:1"), _Skips(), 0
    try:
      for examples in reader.batches(lo, hi, batch):
        n, tokens = len(examples), [None] * len(examples)
        if layout.text_tokens:  # the usable examples only; the others are counted
          usable = []
          for e in examples:
            ids = _tokens(tokenizer, e["caption"]) if e["status"] == captioned.OK else None
            if ids is None:
              skips.add(captioned.PROBLEMS[int(e["status"]) or captioned.NO_CAPTION], e["key"])
            else:
              usable.append(e)
              tokens[len(usable) - 1] = ids
          examples = usable
        if examples:
          pixels = np.zeros((batch,) + examples[0]["image"].shape, np.uint8)
          pixels[:len(examples)] = [e["image"] for e in examples]
          moments = np.asarray(encode(params, sharding.global_array(pixels, sharding.batch_sharding(mesh))))
          for e, ids, m in zip(examples, tokens, moments):
            writer.write(latents.encode_record(int(e["label"]), m, ids))
          written += len(examples)
        done += n
        progress.update(done)
      writer.close()
      if layout.text_tokens:  # the skips of the shard, before the shard: a complete shard always has its count
        with open(os.path.join(directory, latents.skips_name(i, layout.num_shards)), "w") as f:
          f.write(skips.to_json(written))
    except BaseException:
      writer.close()
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    os.replace(tmp, final)
  sharding.barrier()  # every process has finished its shards
  missing = latents.missing_shards(directory, layout)
  rate = done / max(time.perf_counter() - t0, 1e-9)
  if lead:
    print(f"encoded {done} images ({rate:.1f} images/s) into {directory}; "
          + ("complete." if not missing else f"{len(missing)} shards missing (run again)."), flush=True)
    if layout.text_tokens:
      print(summary(directory, layout), flush=True)
  return {"encoded": len(todo), "skipped": len(mine) - len(todo), "images_per_s": rate}


def main(argv):
  from absl import app

  from selfperc_jax import main as cli

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.configure_logging()
  cli.run_reporting_errors(lambda: run(cli.FLAGS.config))


if __name__ == "__main__":
  from absl import app

  from selfperc_jax import main as cli

  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, workdir=False))
