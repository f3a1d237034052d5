"""Class-conditional ImageNet 256x256 in Stable Diffusion's latent space with the self-perceptual objective.

  # once: encode the prepared TFDS imagenet2012 train split into latents (resumable; see README, "Latent space")
  python -m selfperc_jax.encode_latents --config=configs/imagenet256_latent.py \\
      --config.latent.vae_weights=VAE/diffusion_pytorch_model.safetensors --config.latent.dir=LATENTS
  # then train, as with the pixel config
  python -m selfperc_jax.main --config=configs/imagenet256_latent.py --workdir=WORKDIR \\
      --config.latent.vae_weights=VAE/diffusion_pytorch_model.safetensors --config.latent.dir=LATENTS

Arguments: as configs/imagenet256.py ('tpu' (default) or 'gpu', plus 'mse'); everything not named here is that
config's (schedule, optimiser, sampling, evaluation, the paper's comparison).

Space: the 256x256 crops are encoded once by SD's kl-f8 VAE (sd-vae-ft-ema by default, scaling factor 0.18215) into
32x32x4 latents; the trainer draws z from each image's posterior (of its mirror image with probability 1/2) and
the samples are decoded by the same VAE before the PNG / .npz / FID outputs. The perceptual copy is the latent U-Net
itself, as in the paper.

Model: an ADM-style U-Net on the 32x32x4 latents, the pixel config's width (256 base channels, two residual blocks
per level, 64-channel heads) over four levels, multipliers 1,2,3,4 (32, 16, 8, 4 pixels), with attention at 16, 8
and 4 pixels: 374,167,812 parameters (tests/test_configs.py recounts them) and 63.5 GFLOPs per image forward (a
multiply-add counted as 2), counted by `benchmarks/step_time.py --analytic_only` (BENCHMARKS.md).
For comparison: LDM-4's ImageNet U-Net has about 400 M parameters (Rombach et al. 2022), DiT-L/2 458 M and DiT-XL/2
675 M (Peebles & Xie 2023, who report 80.7 and 118.6 Gflops per forward on the same 32x32x4 latents, counted their
way). The choice is LDM-4's capacity at about a DiT-L/2's compute: a step of batch 256 costs 1/31 of the pixel
config's (about 2 TFLOPs per image forward, BENCHMARKS.md).
"""

from selfperc_jax import config_base


def get_config(arg=None):
  try:
    config = config_base.load_beside(__file__, "imagenet256.py", arg)
  except ValueError as e:
    raise ValueError(str(e).replace("configs/imagenet256.py", "configs/imagenet256_latent.py")) from None
  config.latent.vae = "sd"
  config.data.num_workers = 2  # no JPEG decoding: a latent record is read and drawn from in microseconds
  # Four levels of the pixel U-Net's width, blocks and heads on the 32x32 latents (see above).
  config.model.channel_mult = (1, 2, 3, 4)
  config.model.attention_resolutions = (16, 8, 4)
  return config
