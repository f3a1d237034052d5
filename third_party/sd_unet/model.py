"""Stable Diffusion's denoising U-Net in Flax linen, with the layout of diffusers' `UNet2DConditionModel`.

The network is the text-conditioned latent-diffusion U-Net of Rombach et al. (2022), "High-Resolution Image
Synthesis with Latent Diffusion Models", as released by CompVis / Runway (Stable Diffusion 1.x) and Stability AI
(Stable Diffusion 2.x). The submodule names follow diffusers' `UNet2DConditionModel` state dict, so that its tensors
map onto the Flax variables name for name (`convert.py` does that and checks it):

    diffusers                                                    Flax (NHWC), under params
    down_blocks.0.resnets.1.conv1.weight (O, I, kh, kw)          ['down_blocks_0']['resnets_1']['conv1']['kernel']
    down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight (out, in)
                                        [...]['attentions_0']['transformer_blocks_0']['attn1']['to_q']['kernel']
    <...>.ff.net.0.proj.weight / <...>.ff.net.2.weight           [...]['ff']['net_0']['proj'] / [...]['ff']['net_2']
    <...>.norm1.weight (GroupNorm / LayerNorm)                   [...]['norm1']['scale']
    time_embedding.linear_1.weight                               ['time_embedding']['linear_1']['kernel']

that is, a list index `name.<i>` of PyTorch is the single name `name_<i>` in Flax (`linear_1` / `linear_2` of the
time embedding are diffusers' own attribute names, not list indices).

The architecture (configurable by `UNetConfig`; `SD2` and `SD1` are the full-size ones):

- time: the sinusoidal embedding of the timestep (diffusers' `Timesteps(block_out_channels[0], flip_sin_to_cos=True,
  freq_shift=0)`: [cos, sin] of t * 10000^(-i / half)), then linear_1, SiLU, linear_2 to 4 x block_out_channels[0].
- conv_in (3x3) -> one down block per level: `layers_per_block` ResNet blocks, each (CrossAttnDownBlock2D) followed by
  a spatial transformer; all but the last level end with a stride-2 3x3 convolution (padding 1) -> mid block (ResNet,
  transformer, ResNet) -> one up block per level, widest first, of `layers_per_block + 1` ResNets on the input
  concatenated with the matching skip (plus transformers in CrossAttnUpBlock2D) and, but for the last, nearest
  upsampling to the next skip's size followed by a 3x3 convolution -> GroupNorm, SiLU, conv_out (3x3).
- ResNet block: GroupNorm, SiLU, conv 3x3, + time_emb_proj(SiLU(emb)), GroupNorm, SiLU, conv 3x3, plus the input
  (through a 1x1 conv_shortcut where the width changes). GroupNorms: norm_num_groups groups, eps norm_eps (1e-5).
- Spatial transformer (Transformer2DModel): GroupNorm (eps 1e-6), proj_in (a linear layer for SD 2.x,
  use_linear_projection=True; a 1x1 convolution for SD 1.x), then per transformer block LayerNorm + self-attention,
  LayerNorm + cross-attention to the context, LayerNorm + GEGLU feed-forward (width 4 x channels, exact GELU), each
  residual; proj_out; plus the block's input. Attention: q/k/v projections without bias, `heads` heads of
  channels / heads dims, softmax(q k^T / sqrt(head dim)), to_out.0 with bias; computed by jax.nn.dot_product_attention.

Heads: diffusers' config key `attention_head_dim` is, for these models, the NUMBER of heads (a historical misnaming,
see diffusers' UNet2DConditionModel.__init__, which sets num_attention_heads = attention_head_dim): SD 1.x has 8 heads
at every level (head dims 40, 80, 160, 160), SD 2.x [5, 10, 20, 20] heads (head dim 64 everywhere). The up blocks take
the per-level head counts in reverse, as diffusers does. `UNetConfig.attention_head_dim` keeps diffusers' name and
meaning.

Latents are NHWC; the timestep t is diffusers' (a scalar or one per example, the discrete step in [0, 1000) for SD's
schedulers; fractional values are fine); context is (N, L, cross_attention_dim), the text encoder's hidden states.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from selfperc_jax.errors import UserError

MID_TAP = "mid"  # the same tap names as selfperc_jax/models/unet.py
CROSS_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"
TRANSFORMER_NORM_EPS = 1e-6  # Transformer2DModel's GroupNorm
LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock's LayerNorms


class UNetInputError(UserError, ValueError):
  """Inputs or a config the network cannot take."""


def encoder_tap(level: int) -> str:
  """Name of the tap after encoder level `level` (its last ResNet / transformer, before its downsampling)."""
  return f"enc{level}"


def tap_names(num_levels: int) -> tuple[str, ...]:
  """All taps in the order the forward pass reaches them."""
  return tuple(encoder_tap(i) for i in range(num_levels)) + (MID_TAP,)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The hyperparameters of the layout, under diffusers' UNet2DConditionModel config keys of the same names.

  `attention_head_dim` is diffusers' key with diffusers' meaning for these models: the number of attention heads, an
  int for every level or one per level. `upcast_attention` (SD 2.1-768 sets it) changes nothing here: the attention
  softmax is always computed in float32. Dropout is 0 in every released SD U-Net and not implemented.
  """

  in_channels: int = 4
  out_channels: int = 4
  down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, DOWN)
  up_block_types: tuple[str, ...] = (UP, CROSS_UP, CROSS_UP, CROSS_UP)
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1024
  attention_head_dim: int | tuple[int, ...] = (5, 10, 20, 20)
  use_linear_projection: bool = True
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  transformer_layers_per_block: int = 1
  upcast_attention: bool = False
  sample_size: int = 64  # the latent size it was trained at (informational)

  def __post_init__(self):
    levels = len(self.block_out_channels)
    problems = []
    if levels < 1:
      problems.append("block_out_channels is empty")
    if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
      problems.append(f"{len(self.down_block_types)} down and {len(self.up_block_types)} up block types for "
                      f"{levels} levels")
    bad = [b for b in self.down_block_types if b not in (CROSS_DOWN, DOWN)]
    bad += [b for b in self.up_block_types if b not in (CROSS_UP, UP)]
    if bad:
      problems.append(f"unsupported block types {bad} (only {CROSS_DOWN}, {DOWN}, {CROSS_UP}, {UP})")
    if not isinstance(self.attention_head_dim, int) and len(self.attention_head_dim) != levels:
      problems.append(f"attention_head_dim {self.attention_head_dim} has not one entry per level")
    elif not problems:
      for i, (c, h) in enumerate(zip(self.block_out_channels, self.num_heads)):
        if h < 1 or c % h:
          problems.append(f"level {i}: {h} heads do not divide {c} channels")
    if not isinstance(self.norm_num_groups, int) or self.norm_num_groups < 1:
      problems.append(f"norm_num_groups must be a positive int (got {self.norm_num_groups!r})")
    elif any(c % self.norm_num_groups for c in self.block_out_channels):
      problems.append(f"norm_num_groups {self.norm_num_groups} does not divide every width {self.block_out_channels}")
    if problems:
      raise UNetInputError("invalid UNetConfig: " + "; ".join(problems) + ".")

  @property
  def num_heads(self) -> tuple[int, ...]:
    """Attention heads per level (diffusers' num_attention_heads = attention_head_dim)."""
    h = self.attention_head_dim
    return (h,) * len(self.block_out_channels) if isinstance(h, int) else tuple(h)

  @property
  def num_levels(self) -> int:
    return len(self.block_out_channels)

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (self.num_levels - 1)

  # diffusers config keys that this implementation requires at a given value (their defaults for SD 1.x / 2.x).
  _FIXED = {
      "act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None,
      "num_class_embeds": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
      "only_cross_attention": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "mid_block_scale_factor": 1,
      "downsample_padding": 1, "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
      "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
      "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
      "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
      "num_attention_heads": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
      "reverse_transformer_layers_per_block": None, "dropout": 0.0, "projection_class_embeddings_input_dim": None,
      "addition_time_embed_dim": None,
  }

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any]) -> "UNetConfig":
    """From the dict of a diffusers `unet/config.json`. Keys that change nothing here (`_class_name`,
    `_diffusers_version`, `sample_size`, ...) are ignored; a key whose value this implementation does not support (a
    class embedding, SDXL's added embeddings, ...) is an error that names it."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unsupported = [f"{k}={config[k]!r} (supported: {v!r})" for k, v in cls._FIXED.items()
                   if k in config and config[k] != v and not (v is None and config[k] in ((), []))]
    if not isinstance(config.get("transformer_layers_per_block", 1), int):
      unsupported.append(f"transformer_layers_per_block={config['transformer_layers_per_block']!r} (an int only)")
    if isinstance(config.get("layers_per_block", 2), (list, tuple)):
      unsupported.append(f"layers_per_block={config['layers_per_block']!r} (an int only)")
    if isinstance(config.get("cross_attention_dim", 1024), (list, tuple)):
      unsupported.append(f"cross_attention_dim={config['cross_attention_dim']!r} (an int only)")
    if unsupported:
      raise UNetInputError("this UNet2DConditionModel config uses what the Flax SD U-Net does not implement: "
                           + "; ".join(unsupported) + ". It implements the SD 1.x / 2.x layout only.")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in fields}
    return cls(**kwargs)


SD2 = UNetConfig()  # SD 2.0 / 2.1, base (512 px) and 768-v: the same layout (865,910,724 parameters)
SD1 = UNetConfig(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)  # SD 1.x (859,520,964)
CONFIGS = {"sd2": SD2, "sd1": SD1}


def config_for(variant: str) -> UNetConfig:
  """The full-size config of a released U-Net layout: 'sd2' (SD 2.x) or 'sd1' (SD 1.x)."""
  if variant not in CONFIGS:
    raise UNetInputError(f"unknown SD U-Net variant {variant!r}; expected one of {sorted(CONFIGS)}.")
  return CONFIGS[variant]


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10_000.0):
  """diffusers' get_timestep_embedding: (N, dim) float32 of [sin, cos] (or [cos, sin]) of t * max_period^(-i /
  (half - freq_shift)), i < half = dim // 2, zero-padded to an odd dim."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """PyTorch's 'nearest' source index for each output index (F.interpolate with an explicit size)."""
  if size_out == 2 * size_in:
    return np.arange(size_out) // 2
  scale = np.float32(size_in) / np.float32(size_out)
  return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)


def resize_nearest(x, height: int, width: int):
  """NHWC nearest-neighbour resize with PyTorch's index rule (2x: each pixel repeated)."""
  _, h, w, _ = x.shape
  if (height, width) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x[:, _nearest_indices(h, height)][:, :, _nearest_indices(w, width)]


# --------------------------------------------------------------------------------------------------------------------
# Blocks. Submodule names are diffusers' attribute names, with `name.<i>` written `name_<i>`.


class _Layers(nn.Module):
  """Shared by the blocks: the settings every layer takes."""

  groups: int = 32
  eps: float = 1e-5
  dtype: Any = jnp.float32
  precision: Any = None
  remat: bool = False
  implementation: str | None = None  # jax.nn.dot_product_attention's

  def conv(self, features, name, kernel_size=3, strides=1):
    pad = kernel_size // 2  # PyTorch's symmetric padding (also of the stride-2 downsampler: padding=1)
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides), padding=((pad, pad), (pad, pad)),
                   dtype=self.dtype, precision=self.precision, name=name)

  def group_norm(self, name, eps=None):
    # Two-pass variance in float32, as PyTorch's GroupNorm computes it.
    return nn.GroupNorm(num_groups=self.groups, epsilon=self.eps if eps is None else eps, dtype=self.dtype,
                        use_fast_variance=False, name=name)

  def layer_norm(self, name):
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, use_fast_variance=False, name=name)

  def dense(self, features, name, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, precision=self.precision, name=name)

  def child(self, cls, name, **kwargs):
    if self.remat and cls in (ResnetBlock2D, Transformer2DModel):
      cls = nn.remat(cls)
    return cls(groups=self.groups, eps=self.eps, dtype=self.dtype, precision=self.precision, remat=self.remat,
               implementation=self.implementation, name=name, **kwargs)


class ResnetBlock2D(_Layers):
  """norm1, SiLU, conv1, + time_emb_proj(SiLU(emb)), norm2, SiLU, conv2, plus the input (via conv_shortcut if the
  width changes)."""

  out_channels: int = 320

  @nn.compact
  def __call__(self, x, emb):
    h = self.conv(self.out_channels, "conv1")(nn.silu(self.group_norm("norm1")(x)))
    h = h + self.dense(self.out_channels, "time_emb_proj")(nn.silu(emb))[:, None, None, :]
    h = self.conv(self.out_channels, "conv2")(nn.silu(self.group_norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = self.conv(self.out_channels, "conv_shortcut", kernel_size=1)(x)
    return x + h


def _precision_name(precision) -> str | None:
  if precision is None:
    return None
  if isinstance(precision, str):
    return precision
  return jax.lax.Precision(precision).name.lower()


class Attention(_Layers):
  """Multi-head attention of x (N, T, C) to itself or to `context` (N, L, D): to_q / to_k / to_v without bias,
  jax.nn.dot_product_attention (scale 1/sqrt(head dim), softmax in float32), to_out.0."""

  heads: int = 8

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    n, t, c = x.shape
    shape = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, c // self.heads)  # noqa: E731
    q = shape(self.dense(c, "to_q", use_bias=False)(x))
    k = shape(self.dense(c, "to_k", use_bias=False)(context))
    v = shape(self.dense(c, "to_v", use_bias=False)(context))
    precision = _precision_name(self.precision)
    if precision is not None:  # the products inside at the requested precision (HIGHEST: full float32)
      with jax.default_matmul_precision(precision):
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    else:
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    return self.dense(c, "to_out_0")(out.reshape(n, t, c))


class GEGLU(_Layers):
  """proj to 2 x inner, then hidden * GELU(gate) (the exact, erf-based GELU)."""

  inner: int = 1280

  @nn.compact
  def __call__(self, x):
    hidden, gate = jnp.split(self.dense(2 * self.inner, "proj")(x), 2, axis=-1)
    return hidden * nn.gelu(gate, approximate=False)


class FeedForward(_Layers):
  """net.0 (GEGLU to 4 x the width), net.1 (dropout: nothing here), net.2 (linear back to the width)."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    return self.dense(c, "net_2")(self.child(GEGLU, "net_0", inner=4 * c)(x))


class BasicTransformerBlock(_Layers):
  """LayerNorm + self-attention, LayerNorm + cross-attention, LayerNorm + feed-forward, each residual."""

  heads: int = 8

  @nn.compact
  def __call__(self, x, context):
    x = x + self.child(Attention, "attn1", heads=self.heads)(self.layer_norm("norm1")(x))
    x = x + self.child(Attention, "attn2", heads=self.heads)(self.layer_norm("norm2")(x), context)
    return x + self.child(FeedForward, "ff")(self.layer_norm("norm3")(x))


class Transformer2DModel(_Layers):
  """GroupNorm (eps 1e-6), proj_in (linear, or 1x1 conv), transformer blocks, proj_out, plus the input."""

  heads: int = 8
  num_layers: int = 1
  linear_projection: bool = True

  @nn.compact
  def __call__(self, x, context):
    n, hgt, wid, c = x.shape
    h = self.group_norm("norm", eps=TRANSFORMER_NORM_EPS)(x)
    if self.linear_projection:
      h = self.dense(c, "proj_in")(h.reshape(n, hgt * wid, c))
    else:
      h = self.conv(c, "proj_in", kernel_size=1)(h).reshape(n, hgt * wid, c)
    for i in range(self.num_layers):
      h = self.child(BasicTransformerBlock, f"transformer_blocks_{i}", heads=self.heads)(h, context)
    if self.linear_projection:
      h = self.dense(c, "proj_out")(h).reshape(n, hgt, wid, c)
    else:
      h = self.conv(c, "proj_out", kernel_size=1)(h.reshape(n, hgt, wid, c))
    return x + h


class Downsample2D(_Layers):
  """A 3x3 stride-2 convolution with padding 1: an H x W input gives ceil(H / 2) x ceil(W / 2)."""

  @nn.compact
  def __call__(self, x):
    return self.conv(x.shape[-1], "conv", strides=2)(x)


class Upsample2D(_Layers):
  """Nearest-neighbour upsampling to `size` (2x, or the skip's size for odd inputs), then a 3x3 convolution."""

  @nn.compact
  def __call__(self, x, size):
    return self.conv(x.shape[-1], "conv")(resize_nearest(x, *size))


class _Block(_Layers):
  """What the down / mid / up blocks share: the ResNet and transformer of one layer."""

  out_channels: int = 320
  heads: int = 8
  cross_attention: bool = True
  transformer_layers: int = 1
  linear_projection: bool = True

  def resnet(self, i):
    return self.child(ResnetBlock2D, f"resnets_{i}", out_channels=self.out_channels)

  def transformer(self, i):
    return self.child(Transformer2DModel, f"attentions_{i}", heads=self.heads, num_layers=self.transformer_layers,
                      linear_projection=self.linear_projection)


class DownBlock(_Block):
  """CrossAttnDownBlock2D (cross_attention) or DownBlock2D: `num_layers` x (ResNet [+ transformer]), then the
  downsampler (when add_downsample and `downsample`). Returns (output, the features before the downsampler, the
  skips it adds)."""

  num_layers: int = 2
  add_downsample: bool = True

  @nn.compact
  def __call__(self, h, emb, context, downsample: bool = True):
    skips = []
    for i in range(self.num_layers):
      h = self.resnet(i)(h, emb)
      if self.cross_attention:
        h = self.transformer(i)(h, context)
      skips.append(h)
    features = h
    if self.add_downsample and downsample:
      h = self.child(Downsample2D, "downsamplers_0")(h)
      skips.append(h)
    return h, features, skips


class MidBlock(_Block):
  """UNetMidBlock2DCrossAttn: ResNet, transformer, ResNet."""

  @nn.compact
  def __call__(self, h, emb, context):
    h = self.resnet(0)(h, emb)
    h = self.transformer(0)(h, context)
    return self.resnet(1)(h, emb)


class UpBlock(_Block):
  """CrossAttnUpBlock2D (cross_attention) or UpBlock2D: `num_layers` x (concatenate the last skip, ResNet
  [+ transformer]), then (add_upsample) nearest upsampling to `size` and a 3x3 conv."""

  num_layers: int = 3
  add_upsample: bool = True

  @nn.compact
  def __call__(self, h, skips, emb, context, size=None):
    skips = list(skips)
    for i in range(self.num_layers):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = self.resnet(i)(h, emb)
      if self.cross_attention:
        h = self.transformer(i)(h, context)
    if self.add_upsample:
      h = self.child(Upsample2D, "upsamplers_0")(h, size)
    return h


class TimestepEmbedding(nn.Module):
  """linear_1, SiLU, linear_2."""

  features: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    dense = lambda name: nn.Dense(self.features, dtype=self.dtype, precision=self.precision, name=name)  # noqa: E731
    return dense("linear_2")(nn.silu(dense("linear_1")(x)))


class UNet2DConditionModel(nn.Module):
  """The SD U-Net. `__call__(x, t, context)` -> the prediction (N, H, W, out_channels) float32 (the noise for SD 1.x
  and SD 2.x-base, v for SD 2.x-768: the network is the same).

  x: NHWC latents (N, H, W, in_channels), any H and W (sizes that are not multiples of downsampling_factor work as in
  diffusers: each downsampling gives ceil(size / 2), each upsampling goes back to the matching skip's size). t: a
  scalar or (N,) timesteps as diffusers takes them. context: (N, L, cross_attention_dim).

  `taps=('mid',)` / `('enc0', ...)`: returns {tap: features float32} instead, and stops as soon as the last wanted tap
  is computed (the decoder never runs, so its parameters get no gradient): 'enc<i>' is level i's output before its
  downsampling, 'mid' the mid block's output. The same tap names as selfperc_jax/models/unet.py; every tap is also
  sown into the 'intermediates' collection.

  `dtype` is the compute dtype (params stay float32; GroupNorm / LayerNorm statistics and the attention softmax in
  float32). `precision`: the matmul / convolution precision (None: the backend's default; lax.Precision.HIGHEST or
  'highest' for full float32 on TPUs and TF32 GPUs). `remat` recomputes each ResNet and transformer block in the
  backward pass. `attention`: jax.nn.dot_product_attention's implementation (None: XLA chooses, 'xla', 'cudnn').
  """

  config: UNetConfig = SD2
  dtype: Any = jnp.float32
  precision: Any = None
  remat: bool = False
  attention: str | None = None

  @nn.compact
  def __call__(self, x, t, context, *, taps: Sequence[str] | None = None):
    cfg = self.config
    order = tap_names(cfg.num_levels)
    wanted = set(taps or ())
    unknown = wanted - set(order)
    if unknown:
      raise UNetInputError(f"unknown taps {sorted(unknown)}; this U-Net has {order}.")
    last = max((order.index(name) for name in wanted), default=None)  # stop after this tap
    x, t, context = self._check(x, t, context)
    found = {}

    def tap(name, h):
      self.sow("intermediates", name, h)
      if name in wanted:
        found[name] = h.astype(jnp.float32)
      return last is not None and order.index(name) == last

    emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(self.dtype)
    emb = TimestepEmbedding(cfg.time_embed_dim, self.dtype, self.precision, name="time_embedding")(emb)

    h = nn.Conv(cfg.block_out_channels[0], (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                precision=self.precision, name="conv_in")(x)
    layers = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=self.dtype, precision=self.precision,
                  remat=self.remat, implementation=self.attention, transformer_layers=cfg.transformer_layers_per_block,
                  linear_projection=cfg.use_linear_projection)
    skips, heads = [h], cfg.num_heads
    for level, (width, kind) in enumerate(zip(cfg.block_out_channels, cfg.down_block_types)):
      stop = last is not None and order.index(encoder_tap(level)) == last
      h, features, new_skips = DownBlock(
          out_channels=width, heads=heads[level], cross_attention=kind == CROSS_DOWN, num_layers=cfg.layers_per_block,
          add_downsample=level != cfg.num_levels - 1, name=f"down_blocks_{level}", **layers)(
              h, emb, context, downsample=not stop)
      skips += new_skips
      if tap(encoder_tap(level), features):
        return found

    h = MidBlock(out_channels=cfg.block_out_channels[-1], heads=heads[-1], name="mid_block", **layers)(h, emb, context)
    if tap(MID_TAP, h):
      return found

    for i, (width, kind) in enumerate(zip(cfg.block_out_channels[::-1], cfg.up_block_types)):
      final = i == cfg.num_levels - 1
      block_skips = skips[-(cfg.layers_per_block + 1):]
      skips = skips[:-(cfg.layers_per_block + 1)]
      size = None if final else skips[-1].shape[1:3]
      h = UpBlock(out_channels=width, heads=heads[::-1][i], cross_attention=kind == CROSS_UP,
                  num_layers=cfg.layers_per_block + 1, add_upsample=not final, name=f"up_blocks_{i}", **layers)(
                      h, block_skips, emb, context, size)

    h = nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=self.dtype, use_fast_variance=False,
                     name="conv_norm_out")(h)
    h = nn.Conv(cfg.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, precision=self.precision,
                name="conv_out")(nn.silu(h))
    return h.astype(jnp.float32)

  def _check(self, x, t, context):
    cfg = self.config
    x, context = jnp.asarray(x), jnp.asarray(context)
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels or not jnp.issubdtype(x.dtype, jnp.floating):
      raise UNetInputError(f"x must be floating point NHWC latents (N, H, W, {cfg.in_channels}); got shape "
                           f"{x.shape}, dtype {x.dtype}.")
    if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != cfg.cross_attention_dim:
      raise UNetInputError(f"context must be (N={x.shape[0]}, L, {cfg.cross_attention_dim}); got {context.shape}.")
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (x.shape[0],))
    if t.shape != (x.shape[0],):
      raise UNetInputError(f"t must be a scalar or one timestep per example, ({x.shape[0]},); got {t.shape}.")
    return x.astype(self.dtype), t, context.astype(self.dtype)
