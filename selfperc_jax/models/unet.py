"""ADM-style class-conditional U-Net (Dhariwal & Nichol, 2021) with named feature taps.

`UNet(...)(x, t, y)` returns the prediction (same shape as x). `UNet(...)(x, t, y, taps=('mid',))` returns a dict of
the requested activations and stops as soon as the last of them is computed, so the decoder never runs: the
self-perceptual loss only needs the perceptual copy's encoder and mid-block. Submodule names say where a module
sits (`enc_*`, `mid_*`, `dec_*`, `out_*`), which makes "the decoder's parameters are unused" checkable.

Shapes are NHWC; t is a float in [0, 1] per example; y is an int class per example, `num_classes` being the null
class used for classifier-free guidance.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

MID_TAP = "mid"


def encoder_tap(level: int) -> str:
  """Name of the tap after encoder level `level` (before its downsampling)."""
  return f"enc{level}"


def tap_names(num_levels: int) -> tuple[str, ...]:
  """All taps in the order the forward pass reaches them."""
  return tuple(encoder_tap(i) for i in range(num_levels)) + (MID_TAP,)


def _num_groups(channels: int, max_groups: int = 32) -> int:
  return max(g for g in range(1, max_groups + 1) if channels % g == 0)


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
  """Sinusoidal embedding of t * 1000 (the DDPM step scale), shape (B, dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * 1000.0)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, the embedding entering through scale-shift norm; zero-initialised last conv."""

  channels: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    h = nn.silu(nn.GroupNorm(_num_groups(x.shape[-1]), dtype=self.dtype, name="norm1")(x))
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="conv1")(h)
    scale, shift = jnp.split(nn.Dense(2 * self.channels, dtype=self.dtype, name="emb")(nn.silu(emb)), 2, axis=-1)
    h = nn.GroupNorm(_num_groups(self.channels), dtype=self.dtype, name="norm2")(h)
    h = h * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros, name="conv2")(h)
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), dtype=self.dtype, name="skip")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over the spatial positions, residual, zero-initialised output projection.

  `num_heads` heads, or with `head_channels` > 0 as many heads as have that many channels (ADM's num_head_channels).
  """

  num_heads: int
  dtype: Any = jnp.float32
  head_channels: int = 0
  implementation: str | None = None  # jax.nn.dot_product_attention's: None (XLA chooses), 'xla' or 'cudnn'

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    heads = c // self.head_channels if self.head_channels else self.num_heads
    if c % heads or (self.head_channels and c % self.head_channels):
      raise ValueError(f"the attention heads (model.num_heads={self.num_heads}, model.head_channels="
                       f"{self.head_channels}) must divide the channel count {c} of every attention layer.")
    h = nn.GroupNorm(_num_groups(c), dtype=self.dtype, name="norm")(x).reshape(b, hgt * wid, c)
    qkv = nn.DenseGeneral((3, heads, c // heads), dtype=self.dtype, name="qkv")(h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # jax.nn's attention: XLA's fused attention, and cuDNN's flash attention on GPUs where shape and dtype allow,
    # so memory stays linear in the number of positions at 32x32 and above.
    h = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    h = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj")(h)
    return x + h.reshape(b, hgt, wid, c)


class UNet(nn.Module):
  base_channels: int = 64
  channel_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = ()  # feature-map sizes (in pixels) that get self-attention
  num_heads: int = 4
  head_channels: int = 0  # > 0: heads of this many channels each, overriding num_heads
  dropout: float = 0.0
  num_classes: int = 10  # classes embedded, plus the null class; 0: unconditional (no class embedding)
  out_channels: int = 1
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass (memory for time)
  attention: str | None = None  # the attention implementation (AttentionBlock.implementation)

  @property
  def null_class(self) -> int:
    return self.num_classes

  @nn.compact
  def __call__(self, x, t, y, train: bool = False, taps: Sequence[str] = ()):
    wanted = set(taps)
    unknown = wanted - set(tap_names(len(self.channel_mult)))
    if unknown:
      raise ValueError(f"unknown taps {sorted(unknown)}; this U-Net has {tap_names(len(self.channel_mult))}.")
    found = {}
    # `self` is argument 0 of a module's __call__, so `train` is argument 3 of ResBlock's.
    Res = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    Attn = nn.remat(AttentionBlock) if self.remat else AttentionBlock

    def tap(name, h):
      self.sow("intermediates", name, h)
      if name in wanted:
        found[name] = h.astype(jnp.float32)
      return wanted and set(found) == wanted

    emb_dim = 4 * self.base_channels
    emb = timestep_embedding(t, self.base_channels)
    emb = nn.Dense(emb_dim, dtype=self.dtype, name="time_mlp_0")(emb)
    emb = nn.Dense(emb_dim, dtype=self.dtype, name="time_mlp_1")(nn.silu(emb))
    if self.num_classes:  # 0: unconditional, y reaches nothing
      emb = emb + nn.Embed(self.num_classes + 1, emb_dim, name="class_embed")(y).astype(emb.dtype)

    h = nn.Conv(self.base_channels, (3, 3), dtype=self.dtype, name="in_conv")(x.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for block in range(self.num_res_blocks):
        h = Res(self.base_channels * mult, self.dropout, self.dtype, name=f"enc_{level}_{block}")(h, emb, train)
        if h.shape[1] in self.attention_resolutions:
          h = Attn(self.num_heads, self.dtype, self.head_channels, self.attention, name=f"enc_{level}_{block}_attn")(h)
        skips.append(h)
      if tap(encoder_tap(level), h):
        return found
      if level != len(self.channel_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype, name=f"enc_{level}_down")(h)
        skips.append(h)

    mid_channels = h.shape[-1]
    h = Res(mid_channels, self.dropout, self.dtype, name="mid_res_0")(h, emb, train)
    h = Attn(self.num_heads, self.dtype, self.head_channels, self.attention, name="mid_attn")(h)
    h = Res(mid_channels, self.dropout, self.dtype, name="mid_res_1")(h, emb, train)
    if tap(MID_TAP, h):
      return found

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for block in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = Res(self.base_channels * mult, self.dropout, self.dtype, name=f"dec_{level}_{block}")(h, emb, train)
        if h.shape[1] in self.attention_resolutions:
          h = Attn(self.num_heads, self.dtype, self.head_channels, self.attention, name=f"dec_{level}_{block}_attn")(h)
      if level != 0:
        b, hgt, wid, c = h.shape
        h = jax.image.resize(h, (b, 2 * hgt, 2 * wid, c), "nearest")
        h = nn.Conv(c, (3, 3), dtype=self.dtype, name=f"dec_{level}_up")(h)

    h = nn.silu(nn.GroupNorm(_num_groups(h.shape[-1]), dtype=self.dtype, name="out_norm")(h))
    h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros, name="out_conv")(h)
    return h.astype(jnp.float32)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # model.dtype, checked in validation


def unet_from_config(model_cfg, out_channels: int, num_classes: int | None = None) -> UNet:
  """The config's U-Net; num_classes: conditioning.Conditioning.model_classes (0: unconditional; None: the model
  section's num_classes)."""
  return UNet(
      base_channels=model_cfg.base_channels,
      channel_mult=tuple(model_cfg.channel_mult),
      num_res_blocks=model_cfg.num_res_blocks,
      attention_resolutions=tuple(model_cfg.attention_resolutions),
      num_heads=model_cfg.num_heads,
      head_channels=int(model_cfg.head_channels),
      dropout=model_cfg.dropout,
      num_classes=model_cfg.num_classes if num_classes is None else int(num_classes),
      out_channels=out_channels,
      dtype=DTYPES[model_cfg.dtype],
      remat=bool(model_cfg.remat),
      attention=None if model_cfg.attention == "auto" else model_cfg.attention,
  )
