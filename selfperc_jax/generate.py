"""Drawing labelled samples from a set of params at any scale: a global chunk at a time, over every device.

Each chunk holds `sample.batch_size` samples split over all devices of all processes. Sample i (of a draw with seed
s) is class `labels[i]` and takes every random number from `fold_in(key(s), i)`, so the images do not depend on the
chunk size, the number of devices or the number of processes, and a draw can stop after any chunk and go on later.
Device memory is that of one chunk whatever the number of samples. The images are quantised to uint8 on the devices
(what the .npz files and any later evaluation see) and, for evaluation, embedded there by the feature network, so
only uint8 images or features ever leave the devices, through `sharding.to_host` (valid on several hosts).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Iterator

import jax
import numpy as np

from selfperc_jax import conditioning, config_tree, fileio, images, samplers, sharding, space
from selfperc_jax.logging_utils import Progress

GRID_MAX = 256  # a sample grid shows at most this many images (the first ones, class-sorted)


def draw_labels(config, *, evaluation: bool = False) -> np.ndarray:
  """The conditions of a draw from `config` (conditioning.Conditioning.draw): sample.num_samples of sample.classes
  (sample grids and files), or with `evaluation` eval.num_samples over every class; unconditional: zeros."""
  cond = conditioning.from_config(config)
  if evaluation:
    return cond.draw(config.eval.num_samples)
  return cond.draw(config.sample.num_samples, config.sample.classes)


def sampling_name(config) -> str:
  """A name per sampling setting of a config (sampler, steps, guidance, and where they differ from the project's
  defaults the timesteps, the final step and the zero-SNR anchor), e.g. 'ddim50_cfg2_rescale0.7' or
  'ddim25_cfg1_trailing_final-first_timestep_anchor-first_timestep' (text conditions add '_prompts-<digest>' and
  '_negative-<digest>' of the prompts' and the negative prompt's text): file names and the start of
  evaluation.evaluate.setting_name, so that they never collide between settings."""
  s = config.sample
  name = f"{s.sampler}{s.steps}_cfg{s.guidance_scale:g}"
  if s.guidance_scale != 1 and s.guidance_rescale:
    name += f"_rescale{s.guidance_rescale:g}"
  if s.guidance_scale != 1 and tuple(s.guidance_interval) != (0.0, 1.0):
    name += f"_interval{s.guidance_interval[0]:g}-{s.guidance_interval[1]:g}"
  if s.timestep_spacing != "project":
    name += f"_{s.timestep_spacing}"
    if s.timestep_spacing == "leading" and s.steps_offset:  # the only spacing it moves (samplers.make_plan)
      name += f"_offset{s.steps_offset}"
  if s.final_step != "clean":
    name += f"_final-{s.final_step}"
  if config.diffusion.zero_snr_anchor != "clean":
    name += f"_anchor-{config.diffusion.zero_snr_anchor}"
  if config_tree.lookup(config, "condition") == "text":  # the prompts and negative prompt, by the digest of their text
    from selfperc_jax import text

    name += f"_prompts-{_digest(text.prompts_of(config))}"
    if s.negative_prompt:
      name += f"_negative-{_digest([s.negative_prompt])}"
  return name


def _digest(strings) -> str:
  return hashlib.sha1("\n".join(strings).encode("utf-8")).hexdigest()[:8]


@dataclasses.dataclass
class Chunk:
  """Samples [start, stop) of a draw, as numpy on every process: uint8 images and/or (features, logits)."""

  start: int
  stop: int
  labels: np.ndarray
  images: np.ndarray | None = None
  features: np.ndarray | None = None
  logits: np.ndarray | None = None


class Generator:
  """`chunks(params, labels, seed)` yields the samples of a draw chunk by chunk, from any params on the mesh.

  embed_fn(variables, uint8 images) -> (features, logits), with `embed_variables`, adds features computed on the
  devices (evaluation); a space.Decoder turns the model's samples into images first (latent space), in the same
  chunk program. Both must be jit-compatible. The sampler clips x0 to [-1, 1] where space.clips_x0 says (pixels),
  and takes config.sample's timesteps (timestep_spacing, steps_offset, final_step).
  """

  def __init__(self, config, model, schedule, model_shape, mesh, embed_fn: Callable | None = None,
               embed_variables=None, decoder: space.Decoder = space.Decoder(),
               cond: conditioning.Conditioning | None = None):
    s = config.sample
    sharding.check_divisible(int(s.batch_size), "sample.batch_size", mesh)
    self.mesh = mesh
    self.chunk_size = int(s.batch_size)
    self.model_shape = tuple(model_shape)  # what the model samples: images, or latents that the decoder decodes
    self.image_shape = self.model_shape
    if decoder.decode_fn is not None:
      probe = jax.ShapeDtypeStruct((1,) + self.model_shape, np.float32)
      self.image_shape = tuple(jax.eval_shape(decoder.decode_fn, decoder.variables, probe).shape[1:])
    self._embed_variables = sharding.replicate(embed_variables, mesh) if embed_fn is not None else None
    self._decode_variables = sharding.replicate(decoder.variables, mesh) if decoder.decode_fn is not None else None
    batch = sharding.batch_sharding(mesh)
    clip_x0 = space.clips_x0(config)
    cond = conditioning.from_config(config) if cond is None else cond
    self._model_inputs = cond.model_inputs  # a draw's labels -> what the model takes (text: prompt embeddings)
    null = cond.guidance_null  # guidance's "no class" / empty or negative prompt (None: unconditional)
    self.labelled = cond.conditional  # whether a sample's label means anything (files, grids, class accuracy)

    def draw_chunk(params, embed_variables, decode_variables, seed, labels, indices):
      base = jax.random.key(seed)
      keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
      denoise = lambda x, t, y: model.apply({"params": params}, x, t, y)
      x = samplers.sample(denoise, schedule, config.diffusion.prediction, keys, labels, self.model_shape,
                          sampler=s.sampler, num_steps=int(s.steps), guidance_scale=float(s.guidance_scale),
                          guidance_rescale=float(s.guidance_rescale),
                          guidance_interval=tuple(float(v) for v in s.guidance_interval),
                          null_class=null, clip_x0=clip_x0,
                          timestep_spacing=str(s.timestep_spacing), steps_offset=int(s.steps_offset),
                          final_step=str(s.final_step))
      if decoder.decode_fn is not None:
        x = decoder.decode_fn(decode_variables, x)
      out = {"images": images.to_uint8_device(x)}
      if embed_fn is not None:
        out["features"], out["logits"] = embed_fn(embed_variables, out["images"])
      return out

    # Params keep the shardings they come with (replicated or FSDP); every output is split like the batch.
    self._draw = jax.jit(draw_chunk, out_shardings=batch)
    self._batch = batch

  def lower(self, params, seed: int = 0):
    """The lowered chunk computation (e.g. for its memory analysis): the same for any number of samples."""
    labels, indices = self._place(self._model_inputs(np.zeros(self.chunk_size, np.int32)),
                                  np.arange(self.chunk_size, dtype=np.int32))
    return self._draw.lower(params, self._embed_variables, self._decode_variables, seed, labels, indices)

  def _place(self, labels, indices):
    return sharding.global_array(labels, self._batch), sharding.global_array(indices, self._batch)

  def chunks(self, params, labels, seed: int, start: int = 0, with_images: bool = True) -> Iterator[Chunk]:
    """Chunks covering samples [start, len(labels)); the last chunk is padded on the devices and trimmed here."""
    labels = np.asarray(labels, np.int32)
    n, size = len(labels), self.chunk_size
    if n <= size:  # a small draw (e.g. a grid) in one chunk of its own size, rounded up to the device count
      size = -(-n // self.mesh.size) * self.mesh.size

    def dispatch(lo):
      hi = min(lo + size, n)
      indices = np.arange(lo, lo + size, dtype=np.int32)  # positions past n are drawn and dropped
      chunk_labels = np.concatenate([labels[lo:hi], np.full(lo + size - hi, labels[hi - 1], np.int32)])
      out = self._draw(params, self._embed_variables, self._decode_variables, seed,
                       *self._place(self._model_inputs(chunk_labels), indices))
      if not with_images:
        out.pop("images")
      return lo, hi, out

    starts = list(range(start, n, size))
    pending = dispatch(starts[0]) if starts else None
    for i in range(len(starts)):
      lo, hi, out = pending
      # The next chunk is queued on the devices before this one is fetched, so they never wait for the host.
      pending = dispatch(starts[i + 1]) if i + 1 < len(starts) else None
      out = {k: np.asarray(v)[: hi - lo] for k, v in sharding.to_host(out).items()}
      yield Chunk(lo, hi, labels[lo:hi], out.get("images"), out.get("features"), out.get("logits"))


def write_samples(generator: Generator, params, out_dir: str, name: str, labels, seed: int,
                  progress_label: str | None = None) -> str:
  """Draws len(labels) samples into out_dir/name.npz (streamed chunk by chunk) and a grid of the first GRID_MAX
  into out_dir/name.png; only process 0 writes. Returns the PNG path (on process 0; '' elsewhere)."""
  labels = np.asarray(labels)
  writing = jax.process_index() == 0
  writer = None
  if writing:
    fileio.makedirs(out_dir)
    writer = images.NpzStreamWriter(fileio.join(out_dir, f"{name}.npz"), generator.image_shape,
                                    labels if generator.labelled else None, len(labels))
  progress = Progress(progress_label, len(labels), unit="samples", enabled=writing and progress_label is not None)
  grid = []
  try:
    for chunk in generator.chunks(params, labels, seed):
      if writing:
        writer.write(chunk.images)
        grid.append(chunk.images[: max(0, GRID_MAX - chunk.start)])
      progress.update(chunk.stop)
  except BaseException:
    if writer is not None:
      writer.abort()
    raise
  if not writing:
    return ""
  writer.close()
  grid_images = np.concatenate(grid)
  return images.save_grid(fileio.join(out_dir, f"{name}.png"), grid_images,
                          labels[: len(grid_images)] if generator.labelled else None)
