"""InceptionV3 with the parameter layout of the FID Inception network (the TF graph of 2015-12-05), in Flax linen.

This is the network whose 2048-d 'pool_3' features define FID (the TTUR code of the FID paper, the guided-diffusion
evaluator) and whose 1008-way logits give the Inception Score, laid out so that the PyTorch state dict of its
re-packaging (`pt_inception-2015-12-05-*.pth`) maps onto it name for name:

    PyTorch                                     Flax (NHWC)
    <block>.conv.weight      (O, I, kh, kw)     params[<block>...]['conv']['kernel']   (kh, kw, I, O)
    <block>.bn.weight / .bn.bias                params[<block>...]['bn']['scale' / 'bias']
    <block>.bn.running_mean / .running_var      batch_stats[<block>...]['bn']['mean' / 'var']
    fc.weight (1008, 2048) / fc.bias            params['fc']['kernel'] (2048, 1008) / ['bias']

where <block> is a dotted path such as `Conv2d_1a_3x3` or `Mixed_5b.branch5x5_1` and becomes nested dicts in Flax.
`convert.py` does that mapping and checks it.

How it differs from torchvision's InceptionV3 (and why the blocks take a `pool` argument): in the FID graph the
branch_pool average pooling of Mixed_5b-5d (InceptionA), Mixed_6b-6e (InceptionC) and Mixed_7b (the first
InceptionE) does not count the zero padding at the border (count_include_pad=False), and Mixed_7c (the second
InceptionE) max-pools there instead. No auxiliary classifier; fc has 1008 outputs. Inference only: BatchNorm uses
its running statistics (eps = 0.001).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from selfperc_jax.errors import UserError

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_FEATURES = 2048
BN_EPSILON = 1e-3
MIN_INPUT_SIZE = 75  # the smallest side for which every VALID convolution and pooling still has an output

# The three kinds of 3x3 / stride 1 / pad 1 branch_pool pooling (the `pool` argument of the mixed blocks).
AVG_EXCLUDE_PAD = "avg_exclude_pad"  # the FID graph's average pool: border windows divide by their in-image count
AVG_INCLUDE_PAD = "avg_include_pad"  # torchvision's: every window divides by 9
MAX = "max"  # the FID graph's Mixed_7c
POOL_KINDS = (AVG_EXCLUDE_PAD, AVG_INCLUDE_PAD, MAX)


class InceptionInputError(UserError, ValueError):
  """Images the network cannot take (wrong rank, channel count or size)."""


# --------------------------------------------------------------------------------------------------------------------
# Pooling helpers (NHWC, pooling over H and W only)


def _pairs(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def avg_pool(x, window=3, stride=1, padding=1, *, count_include_pad: bool):
  """Average pool with symmetric zero padding. count_include_pad=False divides each window by the number of its
  elements inside the image (the FID graph's, TF 'SAME' average pooling); True divides by the full window size (the
  PyTorch default, torchvision's)."""
  (wh, ww), (sh, sw), (ph, pw) = _pairs(window), _pairs(stride), _pairs(padding)
  dims, strides, pads = (1, wh, ww, 1), (1, sh, sw, 1), ((0, 0), (ph, ph), (pw, pw), (0, 0))
  summed = lax.reduce_window(x, jnp.array(0, x.dtype), lax.add, dims, strides, pads)
  if count_include_pad:
    return summed / jnp.array(wh * ww, x.dtype)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  counts = lax.reduce_window(ones, jnp.array(0, x.dtype), lax.add, dims, strides, pads)
  return summed / counts


def max_pool(x, window=3, stride=1, padding=0):
  """Max pool; padding is -inf, so it never wins (PyTorch's MaxPool2d semantics)."""
  (wh, ww), (sh, sw), (ph, pw) = _pairs(window), _pairs(stride), _pairs(padding)
  init = jnp.array(-jnp.inf, x.dtype)
  return lax.reduce_window(x, init, lax.max, (1, wh, ww, 1), (1, sh, sw, 1), ((0, 0), (ph, ph), (pw, pw), (0, 0)))


def branch_pool_3x3(x, kind: str):
  """The 3x3 / stride 1 / pad 1 pooling in front of a mixed block's branch_pool convolution."""
  if kind == AVG_EXCLUDE_PAD:
    return avg_pool(x, 3, 1, 1, count_include_pad=False)
  if kind == AVG_INCLUDE_PAD:
    return avg_pool(x, 3, 1, 1, count_include_pad=True)
  if kind == MAX:
    return max_pool(x, 3, 1, 1)
  raise ValueError(f"unknown branch_pool kind {kind!r}; expected one of {POOL_KINDS}.")


# --------------------------------------------------------------------------------------------------------------------
# Input convention


def preprocess(images, size: int = INPUT_SIZE, resize: bool = True):
  """NHWC images -> float32 in [-1, 1], size x size, 3 channels.

  uint8 images (0..255) are mapped by x / 127.5 - 1; float images are taken to be in [-1, 1] already (the project's
  convention for model outputs) and only cast. One channel is repeated to three. Other sizes are resized bilinearly
  with half-pixel centres and no antialiasing, as torch's `F.interpolate(mode='bilinear', align_corners=False)`
  that pytorch-fid uses (the TF graph's own resize differs slightly; see README.md).
  """
  x = jnp.asarray(images)
  if x.ndim != 4:
    raise InceptionInputError(f"images must be NHWC (N, H, W, C); got shape {x.shape}.")
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[-1] != 3:
    raise InceptionInputError(f"images must have 1 or 3 channels (NHWC); got shape {x.shape}.")
  if x.dtype == jnp.uint8:
    x = x.astype(jnp.float32) / 127.5 - 1.0
  else:
    x = x.astype(jnp.float32)
  if resize and x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear", antialias=False)
  return x


# --------------------------------------------------------------------------------------------------------------------
# Blocks. Submodule names are the PyTorch attribute names.


class BasicConv2d(nn.Module):
  """Convolution without bias, BatchNorm (running statistics, eps 0.001), ReLU. `padding` is PyTorch's: symmetric
  zero padding per spatial side, an int or (ph, pw)."""

  features: int
  kernel_size: Any = 1
  strides: int = 1
  padding: Any = 0
  dtype: Any = jnp.float32
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    ph, pw = _pairs(self.padding)
    x = nn.Conv(self.features, _pairs(self.kernel_size), strides=_pairs(self.strides), padding=((ph, ph), (pw, pw)),
                use_bias=False, dtype=self.dtype, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=self.dtype, name="bn")(x)
    return nn.relu(x)


class _Mixed(nn.Module):
  """Shared by the mixed blocks: a BasicConv2d factory and the branch_pool pooling (sown for tests/inspection)."""

  dtype: Any = jnp.float32
  precision: Any = lax.Precision.HIGHEST

  def conv(self, features, kernel_size, name, strides=1, padding=0):
    return BasicConv2d(features, kernel_size, strides, padding, dtype=self.dtype, precision=self.precision, name=name)

  def pool_branch(self, x, kind):
    pooled = branch_pool_3x3(x, kind)
    if not self.is_initializing():  # kept only when 'intermediates' is mutable in apply; never part of init's output
      self.sow("intermediates", "branch_pool_input", x)
      self.sow("intermediates", "branch_pool_pooled", pooled)
    return pooled


class InceptionA(_Mixed):
  """Mixed_5b/5c/5d: 64 + 64 + 96 + pool_features channels."""

  pool_features: int = 32
  pool: str = AVG_EXCLUDE_PAD

  @nn.compact
  def __call__(self, x):
    b1 = self.conv(64, 1, "branch1x1")(x)
    b5 = self.conv(48, 1, "branch5x5_1")(x)
    b5 = self.conv(64, 5, "branch5x5_2", padding=2)(b5)
    b3 = self.conv(64, 1, "branch3x3dbl_1")(x)
    b3 = self.conv(96, 3, "branch3x3dbl_2", padding=1)(b3)
    b3 = self.conv(96, 3, "branch3x3dbl_3", padding=1)(b3)
    bp = self.conv(self.pool_features, 1, "branch_pool")(self.pool_branch(x, self.pool))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Mixed):
  """Mixed_6a (grid 35 -> 17): 384 + 96 + the input's channels (max pool 3/2)."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv(384, 3, "branch3x3", strides=2)(x)
    bd = self.conv(64, 1, "branch3x3dbl_1")(x)
    bd = self.conv(96, 3, "branch3x3dbl_2", padding=1)(bd)
    bd = self.conv(96, 3, "branch3x3dbl_3", strides=2)(bd)
    bp = max_pool(x, 3, 2)
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(_Mixed):
  """Mixed_6b..6e: factorised 7x7 branches of width c7; 4 x 192 channels."""

  channels_7x7: int = 128
  pool: str = AVG_EXCLUDE_PAD

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv(192, 1, "branch1x1")(x)
    b7 = self.conv(c7, 1, "branch7x7_1")(x)
    b7 = self.conv(c7, (1, 7), "branch7x7_2", padding=(0, 3))(b7)
    b7 = self.conv(192, (7, 1), "branch7x7_3", padding=(3, 0))(b7)
    bd = self.conv(c7, 1, "branch7x7dbl_1")(x)
    bd = self.conv(c7, (7, 1), "branch7x7dbl_2", padding=(3, 0))(bd)
    bd = self.conv(c7, (1, 7), "branch7x7dbl_3", padding=(0, 3))(bd)
    bd = self.conv(c7, (7, 1), "branch7x7dbl_4", padding=(3, 0))(bd)
    bd = self.conv(192, (1, 7), "branch7x7dbl_5", padding=(0, 3))(bd)
    bp = self.conv(192, 1, "branch_pool")(self.pool_branch(x, self.pool))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Mixed):
  """Mixed_7a (grid 17 -> 8): 320 + 192 + the input's channels (max pool 3/2)."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv(192, 1, "branch3x3_1")(x)
    b3 = self.conv(320, 3, "branch3x3_2", strides=2)(b3)
    b7 = self.conv(192, 1, "branch7x7x3_1")(x)
    b7 = self.conv(192, (1, 7), "branch7x7x3_2", padding=(0, 3))(b7)
    b7 = self.conv(192, (7, 1), "branch7x7x3_3", padding=(3, 0))(b7)
    b7 = self.conv(192, 3, "branch7x7x3_4", strides=2)(b7)
    bp = max_pool(x, 3, 2)
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(_Mixed):
  """Mixed_7b / 7c: 320 + 2 x 384 + 2 x 384 + 192 = 2048 channels. FID: Mixed_7b average-pools without counting
  the padding, Mixed_7c max-pools."""

  pool: str = AVG_EXCLUDE_PAD

  @nn.compact
  def __call__(self, x):
    b1 = self.conv(320, 1, "branch1x1")(x)
    b3 = self.conv(384, 1, "branch3x3_1")(x)
    b3 = jnp.concatenate([self.conv(384, (1, 3), "branch3x3_2a", padding=(0, 1))(b3),
                          self.conv(384, (3, 1), "branch3x3_2b", padding=(1, 0))(b3)], axis=-1)
    bd = self.conv(448, 1, "branch3x3dbl_1")(x)
    bd = self.conv(384, 3, "branch3x3dbl_2", padding=1)(bd)
    bd = jnp.concatenate([self.conv(384, (1, 3), "branch3x3dbl_3a", padding=(0, 1))(bd),
                          self.conv(384, (3, 1), "branch3x3dbl_3b", padding=(1, 0))(bd)], axis=-1)
    bp = self.conv(192, 1, "branch_pool")(self.pool_branch(x, self.pool))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# The mixed blocks in order, with their arguments: the one place the FID-specific pooling is chosen.
MIXED_BLOCKS = (
    ("Mixed_5b", InceptionA, {"pool_features": 32, "pool": AVG_EXCLUDE_PAD}),
    ("Mixed_5c", InceptionA, {"pool_features": 64, "pool": AVG_EXCLUDE_PAD}),
    ("Mixed_5d", InceptionA, {"pool_features": 64, "pool": AVG_EXCLUDE_PAD}),
    ("Mixed_6a", InceptionB, {}),
    ("Mixed_6b", InceptionC, {"channels_7x7": 128, "pool": AVG_EXCLUDE_PAD}),
    ("Mixed_6c", InceptionC, {"channels_7x7": 160, "pool": AVG_EXCLUDE_PAD}),
    ("Mixed_6d", InceptionC, {"channels_7x7": 160, "pool": AVG_EXCLUDE_PAD}),
    ("Mixed_6e", InceptionC, {"channels_7x7": 192, "pool": AVG_EXCLUDE_PAD}),
    ("Mixed_7a", InceptionD, {}),
    ("Mixed_7b", InceptionE, {"pool": AVG_EXCLUDE_PAD}),
    ("Mixed_7c", InceptionE, {"pool": MAX}),
)


class InceptionV3(nn.Module):
  """The FID Inception network. `__call__(images) -> {'pool': (N, 2048), 'logits': (N, 1008)}`, float32.

  `images` are NHWC, uint8 or float in [-1, 1], any size (resized to 299 by `preprocess` unless resize_input is
  False, in which case they must be at least 75 x 75). 'pool' is the global average of Mixed_7c (the FID
  features, TF's 'pool_3'); 'logits' is fc of it (softmax gives the Inception Score's p(y|x) over the graph's 1008
  outputs, as the Inception Score code uses them).

  `precision` defaults to HIGHEST so that accelerators compute the convolutions in full float32 (TPUs and TF32 GPUs
  otherwise round the operands, which moves FID); `dtype` is the compute dtype (params stay float32).
  """

  num_classes: int = NUM_CLASSES
  resize_input: bool = True
  dtype: Any = jnp.float32
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images):
    x = preprocess(images, resize=self.resize_input)
    if min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise InceptionInputError(
          f"images must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} when resize_input=False; got {x.shape}.")
    conv = functools.partial(BasicConv2d, dtype=self.dtype, precision=self.precision)
    x = conv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = max_pool(x, 3, 2)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = max_pool(x, 3, 2)
    for name, block, kwargs in MIXED_BLOCKS:
      x = block(dtype=self.dtype, precision=self.precision, name=name, **kwargs)(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, precision=self.precision, name="fc")(pool)
    return {"pool": pool, "logits": logits.astype(jnp.float32)}
