"""Where the diffusion model works: on the data's pixels, or on the latents of Stable Diffusion's VAE.

This module is the one place that decides it (`latent.vae`: '' for pixels). Data, sampling and evaluation call it at
their edges; the loss, the step and the samplers only ever see "x", whatever it is.

- Pixel space: the model works on the images ([-1, 1], NHWC), and its samples are the images; sampling clips each
  x0 prediction and the samples to [-1, 1] (`clips_x0`).
- Latent space: the data are latents pre-encoded once (`python -m selfperc_jax.encode_latents`, see
  `data/latents.py`); the model works on z * scaling_factor, z drawn from each image's VAE posterior. Its samples are
  decoded, vae.decode(x / scaling_factor), inside the sampling program, chunk by chunk on the devices, so that only
  uint8 images leave them (the same .npz, PNG and FID path as in pixel space). Nothing is clipped before decoding:
  scaled latents have about unit spread, not a range (diffusers' Stable Diffusion schedulers: clip_sample=False).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

from selfperc_jax import config_tree
from selfperc_jax.data.datasets import DATASETS
from selfperc_jax.errors import ConfigError

VAE_VARIANTS = ("sd", "sdxl")


def is_latent(config) -> bool:
  """latent.vae is set (a ConfigDict or a nested dict; a config without the latent section is in pixel space)."""
  return bool(config_tree.lookup(config, "latent.vae"))


def clips_x0(config) -> bool:
  """Whether sampling clips x0 predictions and samples to [-1, 1] (samplers.sample's clip_x0): the pixels' range;
  latents have none."""
  return not is_latent(config)


def vae_config(latent_cfg):
  """The sd_vae.VAEConfig of latent.vae, with the latent.* layout overrides (0 / (): the released VAE's)."""
  from third_party.sd_vae import model as vae_model

  base = vae_model.config_for(latent_cfg.vae)
  return dataclasses.replace(
      base,
      block_out_channels=tuple(latent_cfg.block_out_channels) or base.block_out_channels,
      layers_per_block=int(latent_cfg.layers_per_block) or base.layers_per_block,
      norm_num_groups=int(latent_cfg.norm_groups) or base.norm_num_groups,
      latent_channels=int(latent_cfg.channels) or base.latent_channels,
      scaling_factor=float(latent_cfg.scaling_factor) or base.scaling_factor)


def image_shape(config) -> tuple[int, int, int]:
  """HWC of the images the data holds and the samples become."""
  size = int(config.data.image_size)
  return (size, size, DATASETS[config.data.name].channels)


def model_shape(config) -> tuple[int, int, int]:
  """HWC of what the diffusion model works on: the images, or their latents (1/f of the size, the VAE's channels)."""
  if not is_latent(config):
    return image_shape(config)
  vae = vae_config(config.latent)
  size = int(config.data.image_size) // vae.downsampling_factor
  return (size, size, vae.latent_channels)


def encode_command() -> str:
  """The command that encodes the latents this run needs: the encoder with this command's --config flags."""
  config_flags = [a for a in sys.argv[1:] if a.startswith("--config")]
  return " ".join(["python -m selfperc_jax.encode_latents"]
                  + (config_flags or ["--config=configs/imagenet256_latent.py"]))


def check_vae_weights(latent_cfg) -> None:
  if not latent_cfg.vae_weights or not os.path.isfile(os.path.expanduser(latent_cfg.vae_weights)):
    raise ConfigError(
        f"latent.vae={latent_cfg.vae!r} needs the VAE's weights: latent.vae_weights={latent_cfg.vae_weights!r} is "
        "not a file. Download diffusion_pytorch_model.safetensors of stabilityai/sd-vae-ft-ema (or -ft-mse; "
        "stabilityai/sdxl-vae for 'sdxl') once, see third_party/sd_vae/README.md, and pass "
        "--config.latent.vae_weights=PATH.")


def load_vae(latent_cfg):
  """(AutoencoderKL, its variables) from latent.vae_weights, checked tensor by tensor."""
  from third_party.sd_vae import convert, model as vae_model

  check_vae_weights(latent_cfg)
  cfg = vae_config(latent_cfg)
  variables = convert.load_variables(os.path.expanduser(latent_cfg.vae_weights), config=cfg)
  return vae_model.AutoencoderKL(cfg), variables


@dataclasses.dataclass(frozen=True)
class Decoder:
  """decode_fn(variables, x) -> images in [-1, 1] (jit-compatible), with the variables it needs; None for pixels."""

  decode_fn: Callable | None = None
  variables: Any = None


def latent_section(config):
  """config.latent, with latent.vae_weights = the model folder's vae/ weights where it is empty and config.pretrained
  names a Stable Diffusion folder (selfperc_jax/pretrained.py)."""
  lc = config.latent
  folder = config_tree.lookup(config, "pretrained")
  if lc.vae_weights or not folder:
    return lc
  from selfperc_jax import pretrained

  lc = type(lc)(lc.to_dict())
  lc.vae_weights = pretrained.vae_weights(pretrained.folder_of(config))
  return lc


def decoder(config) -> Decoder:
  """What turns the model's samples into images: nothing in pixel space, the VAE's decoder in latent space."""
  if not is_latent(config):
    return Decoder()
  lc = latent_section(config)
  if lc is config.latent:
    vae, variables = load_vae(lc)
  else:  # the model folder's vae/
    from selfperc_jax import pretrained

    with pretrained.one_line_mismatch(lc.vae_weights, "vae"):
      vae, variables = load_vae(lc)
  scale = vae.config.scaling_factor
  decoder_params = {"params": {k: v for k, v in variables["params"].items() if k in ("decoder", "post_quant_conv")}}

  def decode(params, z):
    return vae.apply(params, z / scale, method=vae.decode)

  return Decoder(decode, decoder_params)


def latent_layout(config, num_examples: int = 0, shard_size: int = 0):
  """The data/latents.Layout that this config's latents have (the encoder's count and shard size where given)."""
  from selfperc_jax.data import latents

  vae = vae_config(config.latent)
  text_tokens, tokenizer = 0, ""
  if DATASETS[config.data.name].captioned:  # the captions' token ids are stored with the latents
    from selfperc_jax import text

    tok = text.tokenizer(text.folder_of(config))
    text_tokens, tokenizer = int(tok.max_length), text.tokenizer_identity(tok)
  return latents.Layout(
      source=config.data.name, split=config.data.split, image_size=int(config.data.image_size),
      num_examples=int(num_examples), shard_size=int(shard_size), flips=bool(config.latent.flips),
      latent_shape=model_shape(config), vae=config.latent.vae,
      vae_layout=(tuple(vae.block_out_channels), vae.layers_per_block, vae.norm_num_groups),
      vae_weights=latents.weights_identity(latent_section(config).vae_weights), text_tokens=text_tokens, tokenizer=tokenizer)


def open_latents(config):
  """The encoded latents of config.data.split (a data/latents.LatentSource), or one error with the command that
  makes them."""
  from selfperc_jax.data import latents

  check_vae_weights(latent_section(config))
  if not config.latent.dir:
    raise ConfigError(f"latent.dir is empty: set it to the folder of the encoded latents, made once with\n  "
                      f"{encode_command()} --config.latent.dir=DIR")
  return latents.open_source(latents.split_dir(config.latent.dir, config.data.split), latent_layout(config),
                             vae_config(config.latent).scaling_factor, encode_command())
