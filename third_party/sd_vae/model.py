"""Stable Diffusion's VAE (the "kl-f8" AutoencoderKL of latent diffusion) in Flax linen, with diffusers' layout.

The network is the KL-regularised autoencoder of Rombach et al. (2022), "High-Resolution Image Synthesis with Latent
Diffusion Models", as used by Stable Diffusion 1.x/2.x and, with the same layout but other weights, SDXL. The
submodule names follow diffusers' `AutoencoderKL` state dict, so that its tensors map onto the Flax variables
name for name (`convert.py` does that and checks it):

    diffusers                                         Flax (NHWC), under params
    encoder.down_blocks.0.resnets.1.conv1.weight      ['encoder']['down_blocks_0']['resnets_1']['conv1']['kernel']
      (O, I, kh, kw)                                    (kh, kw, I, O)
    <...>.norm1.weight / <...>.norm1.bias             [...]['norm1']['scale' / 'bias']
    <...>.mid_block.attentions.0.to_q.weight          [...]['mid_block']['attentions_0']['to_q']['kernel']
      (out, in)                                         (in, out)
    <...>.mid_block.attentions.0.to_out.0.bias        [...]['mid_block']['attentions_0']['to_out_0']['bias']

that is, a list index `name.<i>` of PyTorch is the single name `name_<i>` in Flax.

The architecture (configurable by `VAEConfig`; `SD` is the full-size one):

- Encoder: conv_in (3x3) -> one down block per entry of block_out_channels, each `layers_per_block` ResNet blocks
  and, except the last, a stride-2 3x3 convolution after zero padding of one row at the bottom and one column at the
  right (PyTorch's F.pad (0, 1, 0, 1)) -> mid block (ResNet, single-head self-attention, ResNet) -> GroupNorm, SiLU
  -> conv_out (3x3) to 2 x latent_channels. quant_conv (1x1) then gives the mean and log-variance of the diagonal
  Gaussian posterior; the log-variance is clipped to [-30, 20].
- Decoder: post_quant_conv (1x1) -> conv_in (3x3) -> mid block -> one up block per entry of the reversed
  block_out_channels, each `layers_per_block + 1` ResNet blocks and, except the last, nearest-neighbour 2x upsampling
  followed by a 3x3 convolution -> GroupNorm, SiLU -> conv_out (3x3).
- ResNet block: GroupNorm, SiLU, conv 3x3, GroupNorm, SiLU, conv 3x3, plus the input (through a 1x1 conv_shortcut
  where the channel count changes). Every GroupNorm has `norm_num_groups` groups and eps 1e-6.

Images are NHWC floats in [-1, 1]; latents are NHWC with latent_channels channels and 1/2^(len(block_out_channels)-1)
of the image's size (1/8 for SD). Diffusion models work on `mean * scaling_factor` (or a sample of the posterior
times it) and decode `z / scaling_factor`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from selfperc_jax.errors import UserError

NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class VAEInputError(UserError, ValueError):
  """Images or latents the network cannot take (wrong rank or channel count)."""


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The hyperparameters of the layout (diffusers' AutoencoderKL config keys of the same names).

  `scaling_factor` does not change the network: it is the constant that brings the posterior mean to roughly unit
  variance for the diffusion model (latent = mean * scaling_factor), fixed per released VAE.
  """

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


SD = VAEConfig()  # SD 1.x / 2.x: CompVis' kl-f8, stabilityai/sd-vae-ft-mse and -ft-ema
SDXL = VAEConfig(scaling_factor=0.13025)  # stabilityai/sdxl-vae: the same layout, other weights and scale
CONFIGS = {"sd": SD, "sdxl": SDXL}


def config_for(variant: str) -> VAEConfig:
  """The full-size config of a released VAE: 'sd' (scaling factor 0.18215) or 'sdxl' (0.13025)."""
  if variant not in CONFIGS:
    raise VAEInputError(f"unknown VAE variant {variant!r}; expected one of {sorted(CONFIGS)}.")
  return CONFIGS[variant]


def scaling_factor(variant: str) -> float:
  """0.18215 for 'sd', 0.13025 for 'sdxl'."""
  return config_for(variant).scaling_factor


def sample_posterior(rng, mean, logvar):
  """One sample mean + exp(logvar / 2) * noise of the diagonal Gaussian posterior that `encode` returns."""
  noise = jax.random.normal(rng, mean.shape, jnp.float32)
  return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise).astype(mean.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Blocks. Submodule names are diffusers' attribute names, with `name.<i>` written `name_<i>`.


class _Layers(nn.Module):
  """Shared by the blocks: the dtype / precision / group count every layer takes."""

  groups: int = 32
  dtype: Any = jnp.float32
  precision: Any = lax.Precision.HIGHEST

  def conv(self, features, name, kernel_size=3, strides=1, padding=None):
    if padding is None:
      padding = ((kernel_size // 2,) * 2,) * 2  # PyTorch's symmetric padding k // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides), padding=padding,
                   dtype=self.dtype, precision=self.precision, name=name)

  def norm(self, name):
    # Two-pass variance (not E[x^2] - E[x]^2) in float32, as PyTorch's GroupNorm computes it.
    return nn.GroupNorm(num_groups=self.groups, epsilon=NORM_EPS, dtype=self.dtype, use_fast_variance=False,
                        name=name)

  def dense(self, features, name):
    return nn.Dense(features, dtype=self.dtype, precision=self.precision, name=name)

  def child(self, cls, name, **kwargs):
    return cls(groups=self.groups, dtype=self.dtype, precision=self.precision, name=name, **kwargs)


class ResnetBlock(_Layers):
  """norm1, SiLU, conv1, norm2, SiLU, conv2, plus the input (via the 1x1 conv_shortcut if the width changes)."""

  out_channels: int = 128

  @nn.compact
  def __call__(self, x):
    h = self.conv(self.out_channels, "conv1")(nn.silu(self.norm("norm1")(x)))
    h = self.conv(self.out_channels, "conv2")(nn.silu(self.norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = self.conv(self.out_channels, "conv_shortcut", kernel_size=1)(x)
    return x + h


class Attention(_Layers):
  """Single-head self-attention over all H x W positions, with a GroupNorm in front and the input added back."""

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    y = self.norm("group_norm")(x).reshape(n, h * w, c)
    q, k, v = self.dense(c, "to_q")(y), self.dense(c, "to_k")(y), self.dense(c, "to_v")(y)
    scores = jnp.einsum("nqc,nkc->nqk", q, k, precision=self.precision) * (c ** -0.5)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("nqk,nkc->nqc", weights, v, precision=self.precision)
    out = self.dense(c, "to_out_0")(out)
    return x + out.reshape(n, h, w, c)


class MidBlock(_Layers):
  """resnets_0, attentions_0, resnets_1, all of the input's width."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = self.child(ResnetBlock, "resnets_0", out_channels=c)(x)
    x = self.child(Attention, "attentions_0")(x)
    return self.child(ResnetBlock, "resnets_1", out_channels=c)(x)


class Downsample(_Layers):
  """Zero padding of one row at the bottom and one column at the right, then a 3x3 stride-2 convolution."""

  @nn.compact
  def __call__(self, x):
    return self.conv(x.shape[-1], "conv", strides=2, padding=((0, 1), (0, 1)))(x)


class Upsample(_Layers):
  """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x.shape[-1], "conv")(x)


class DownBlock(_Layers):
  out_channels: int = 128
  num_layers: int = 2
  add_downsample: bool = True

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = self.child(ResnetBlock, f"resnets_{i}", out_channels=self.out_channels)(x)
    if self.add_downsample:
      x = self.child(Downsample, "downsamplers_0")(x)
    return x


class UpBlock(_Layers):
  out_channels: int = 128
  num_layers: int = 3
  add_upsample: bool = True

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = self.child(ResnetBlock, f"resnets_{i}", out_channels=self.out_channels)(x)
    if self.add_upsample:
      x = self.child(Upsample, "upsamplers_0")(x)
    return x


class Encoder(_Layers):
  """Images -> 2 x latent_channels moments (before quant_conv)."""

  config: VAEConfig = SD

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = self.conv(cfg.block_out_channels[0], "conv_in")(x)
    for i, width in enumerate(cfg.block_out_channels):
      last = i == len(cfg.block_out_channels) - 1
      x = self.child(DownBlock, f"down_blocks_{i}", out_channels=width, num_layers=cfg.layers_per_block,
                     add_downsample=not last)(x)
    x = self.child(MidBlock, "mid_block")(x)
    x = nn.silu(self.norm("conv_norm_out")(x))
    return self.conv(2 * cfg.latent_channels, "conv_out")(x)


class Decoder(_Layers):
  """Latents (after post_quant_conv) -> images."""

  config: VAEConfig = SD

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    widths = tuple(reversed(cfg.block_out_channels))
    x = self.conv(widths[0], "conv_in")(z)
    x = self.child(MidBlock, "mid_block")(x)
    for i, width in enumerate(widths):
      last = i == len(widths) - 1
      x = self.child(UpBlock, f"up_blocks_{i}", out_channels=width, num_layers=cfg.layers_per_block + 1,
                     add_upsample=not last)(x)
    x = nn.silu(self.norm("conv_norm_out")(x))
    return self.conv(cfg.out_channels, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """The VAE. `encode(images) -> (mean, logvar)`, `decode(latents) -> images`; `__call__` reconstructs from the mean.

  images: NHWC float in [-1, 1] with config.in_channels channels, any height and width (each downsampling gives
  floor(size / 2), as in the reference; multiples of config.downsampling_factor round-trip to the same size).
  latents: NHWC with config.latent_channels channels, unscaled (divide the diffusion model's latents by
  config.scaling_factor first). Outputs are float32.

  `dtype` is the compute dtype (params stay float32; GroupNorm statistics and the softmax are computed in float32).
  `precision` defaults to HIGHEST so that accelerators compute the convolutions and matmuls in full float32 (TPUs and
  TF32 GPUs otherwise round the operands); None gives the backend's faster default.
  """

  config: VAEConfig = SD
  dtype: Any = jnp.float32
  precision: Any = lax.Precision.HIGHEST

  def setup(self):
    cfg = self.config
    kwargs = dict(groups=cfg.norm_num_groups, dtype=self.dtype, precision=self.precision)
    self.encoder = Encoder(config=cfg, **kwargs)
    self.decoder = Decoder(config=cfg, **kwargs)
    conv1x1 = functools.partial(nn.Conv, kernel_size=(1, 1), padding="VALID", dtype=self.dtype,
                                precision=self.precision)
    self.quant_conv = conv1x1(2 * cfg.latent_channels)
    self.post_quant_conv = conv1x1(cfg.latent_channels)

  def _check(self, x, channels, what):
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[-1] != channels:
      raise VAEInputError(f"{what} must be NHWC (N, H, W, {channels}); got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise VAEInputError(f"{what} must be floating point (images in [-1, 1]); got dtype {x.dtype}.")
    return x

  def encode(self, images):
    """(mean, logvar) of the posterior, each (N, H / f, W / f, latent_channels) float32; logvar in [-30, 20]."""
    x = self._check(images, self.config.in_channels, "images")
    moments = self.quant_conv(self.encoder(x.astype(self.dtype))).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, latents):
    """Images (N, H * f, W * f, out_channels) float32, nominally in [-1, 1] (not clipped)."""
    z = self._check(latents, self.config.latent_channels, "latents")
    return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

  def __call__(self, images):
    """decode(mean of encode(images)): the deterministic reconstruction (and what `init` traces)."""
    mean, _ = self.encode(images)
    return self.decode(mean)
