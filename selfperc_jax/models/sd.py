"""Stable Diffusion's U-Net (third_party/sd_unet) as this project's denoiser: `model(x, t, y, train, taps)` as
models/unet.py takes it, so the step, the losses, the copy and the samplers use it unchanged.

t is the project's time in (0, 1] on the discrete T-step grid (diffusion.py: diffusers' timestep k is t = (k + 1) / T),
so the U-Net gets k = round(t T) - 1, the integer timestep diffusers gives it; y is the text condition (N, 77, D)
(conditioning.py). The params are {'unet': the U-Net's}, from the model folder's unet/ (selfperc_jax/pretrained.py);
or, with model.sd_layout, a layout of LAYOUTS trained from scratch (its in / out channels the data's).
"""

from __future__ import annotations

import dataclasses

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from third_party.sd_unet import model as sd_unet

# model.sd_layout: SD U-Net layouts trained here from scratch. 'small': SD 2.x's blocks (linear projections, cross-
# attention at both levels) at widths 32 / 64 with 8-channel heads, context width 32 (text.py's built-in encoder);
# 'tiny': one level of width 16 (the smoke-test size, configs/digits.py:text,tiny).
LAYOUTS = {
    "small": sd_unet.UNetConfig(
        down_block_types=(sd_unet.CROSS_DOWN, sd_unet.CROSS_DOWN), up_block_types=(sd_unet.CROSS_UP, sd_unet.CROSS_UP),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=(4, 8)),
    "tiny": sd_unet.UNetConfig(
        down_block_types=(sd_unet.CROSS_DOWN,), up_block_types=(sd_unet.CROSS_UP,), block_out_channels=(16,),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2),
}


class SDDenoiser(nn.Module):
  config: sd_unet.UNetConfig
  timesteps: int = 1000  # T of the discrete schedule (diffusion.timesteps)
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str | None = None

  @nn.compact
  def __call__(self, x, t, y, train: bool = False, taps: Sequence[str] = ()):
    del train  # no dropout in SD's U-Net
    k = jnp.round(jnp.asarray(t, jnp.float32) * self.timesteps) - 1.0
    unet = sd_unet.UNet2DConditionModel(self.config, dtype=self.dtype, remat=self.remat, attention=self.attention,
                                        name="unet")
    return unet(x, k, y, taps=tuple(taps) or None)


def unet_config(config) -> sd_unet.UNetConfig:
  """The U-Net's layout: model.sd_layout's (with the data's channels), or config.pretrained's unet/config.json."""
  from selfperc_jax import pretrained, space
  from third_party.sd_unet import convert

  if config.model.sd_layout:
    channels = space.model_shape(config)[-1]
    return dataclasses.replace(LAYOUTS[config.model.sd_layout], in_channels=channels, out_channels=channels)
  return convert.load_config(pretrained.unet_files(pretrained.folder_of(config))[0])


def from_config(config, dtype, attention) -> SDDenoiser:
  return SDDenoiser(unet_config(config), timesteps=int(config.diffusion.timesteps), dtype=dtype,
                    remat=bool(config.model.remat), attention=attention)


def load_params(config) -> dict:
  """The denoiser's params (numpy float32) from config.pretrained's unet/ weights, checked tensor by tensor."""
  from selfperc_jax import pretrained

  return load_folder_params(pretrained.folder_of(config))


def load_folder_params(folder: str) -> dict:
  """The denoiser's params (numpy float32) from a model folder's unet/ weights, checked tensor by tensor."""
  from selfperc_jax import pretrained
  from third_party.sd_unet import convert

  config_path, weights = pretrained.unet_files(folder)
  with pretrained.one_line_mismatch(weights, "unet"):
    return {"unet": convert.load_variables(weights, config=convert.load_config(config_path))["params"]}
