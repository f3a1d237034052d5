"""benchmarks/sd_sampling.py: full-size counts and FLOPs from abstract inits, and the guided step it times (on a small
layout here), also as benchmarks/device.py's last rows."""

import dataclasses

import numpy as np
import pytest

from benchmarks import sd_sampling
from third_party.clip_text import convert as clip_convert, model as clip
from third_party.sd_unet import convert as unet_convert, model as sd_unet
from third_party.sd_vae import convert as vae_convert, model as sd_vae

SMALL_UNET = sd_unet.UNetConfig(down_block_types=(sd_unet.CROSS_DOWN, sd_unet.DOWN),
                                up_block_types=(sd_unet.UP, sd_unet.CROSS_UP), block_out_channels=(32, 64),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(2, 4))
SMALL_TEXT = clip.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4)
SMALL_VAE = dataclasses.replace(sd_vae.SD, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)


@pytest.fixture(scope="module")
def small():
  return sd_sampling.facts(SMALL_UNET, SMALL_TEXT, SMALL_VAE, image=32)


def test_counts_are_the_layouts(small):
  """Two independent counts agree (the Flax init's and the PyTorch layout's shapes)."""
  assert small["params_unet"] == unet_convert.num_parameters(SMALL_UNET)
  assert small["params_text_encoder"] == clip_convert.num_parameters(SMALL_TEXT)
  assert small["params_vae"] == sum(int(np.prod(s)) for s in vae_convert.expected_shapes(SMALL_VAE).values())
  assert min(small["gflops_unet"], small["gflops_text_encoder"], small["gflops_vae_decode"]) > 0
  # A guided sample runs the U-Net twice per step; the decode once either way.
  assert sd_sampling.per_sample_tflops(small, 10, True) > 1.9 * sd_sampling.per_sample_tflops(small, 10, False) - (
      small["gflops_vae_decode"] / 1e3)


@pytest.mark.slow  # every network's FLOPs counted again at a second size
def test_the_flops_grow_with_the_image(small):
  """For twice the side the U-Net's and the decoder's FLOPs grow between 4x (their convolutions) and 16x (their
  self-attention is quadratic in the positions), the text encoder's not at all."""
  large = sd_sampling.facts(SMALL_UNET, SMALL_TEXT, SMALL_VAE, image=64)
  assert 4 * small["gflops_unet"] < large["gflops_unet"] < 16 * small["gflops_unet"]
  assert 4 * small["gflops_vae_decode"] < large["gflops_vae_decode"] < 16 * small["gflops_vae_decode"]
  assert large["gflops_text_encoder"] == small["gflops_text_encoder"]


@pytest.mark.slow
def test_full_size_counts_are_the_published_ones():
  f = sd_sampling.facts()
  assert (f["params_unet"], f["params_text_encoder"], f["params_vae"]) == (865_910_724, 340_387_840, 83_653_863)
  assert 700 < f["gflops_unet"] < 900 and f["latent"] == 64


@pytest.mark.slow  # compiles the step twice (~15 s)
def test_the_guided_step_is_timed_and_compiled_for_its_memory():
  row = sd_sampling.measure(2, unet_config=SMALL_UNET, latent=8, steps=1, rounds=1)
  assert row["batch"] == 2 and row["step_ms"] > 0 and row["mfu"] is None  # no known peak for a CPU
  mem = sd_sampling.compiled_memory(2, unet_config=SMALL_UNET, latent=8)
  assert 0 < mem["params_gib"] < mem["peak_gib"]
  text = sd_sampling.markdown(sd_sampling.facts(SMALL_UNET, SMALL_TEXT, SMALL_VAE, image=32), [mem], [row])
  assert "| 2 |" in text and "TFLOPs with classifier-free guidance" in text


@pytest.mark.slow  # compiles the guided step
def test_device_benchmark_sd_rows_take_the_largest_batch_that_fits(monkeypatch):
  from benchmarks import device

  real, tried = sd_sampling.measure, []

  def measure(batch, **kwargs):
    tried.append(batch)
    if batch > 2:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")
    return real(batch, **kwargs)

  monkeypatch.setattr(sd_sampling, "measure", measure)
  text = device.sd_rows([4, 2], facts_kwargs=dict(unet_config=SMALL_UNET, text_config=SMALL_TEXT,
                                                  vae_config=SMALL_VAE, image=16),
                        unet_config=SMALL_UNET, latent=8, steps=1, rounds=1)
  assert tried == [4, 2] and "batch 4: out of memory" in text and "The guided step timed on" in text
