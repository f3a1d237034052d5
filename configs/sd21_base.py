"""Stable Diffusion 2.1-base, as the paper's released models are: text-to-image sampling from a diffusers folder.

  # the self-perceptual model, unguided (as its model card samples it)
  python -m selfperc_jax.main --config=configs/sd21_base.py --mode=sample --workdir=workdirs/sd_perceptual \\
      --config.pretrained=MODELS/sd2.1-base-zsnr-laionaes6-perceptual --config.sample.prompts_file=prompts.txt
  # its MSE twin, with classifier-free guidance 7.5 and rescale 0.7 (its model card's settings)
  python -m selfperc_jax.main --config=configs/sd21_base.py:mse --mode=sample --workdir=workdirs/sd_mse \\
      --config.pretrained=MODELS/sd2.1-base-zsnr-laionaes6 --config.sample.prompts_file=prompts.txt

Both are ByteDance's fine-tunes of stabilityai/stable-diffusion-2-1-base on LAION aesthetics 6+ with v-prediction
and a zero-terminal-SNR schedule, sampled by DDIM with trailing timesteps: their scheduler/scheduler_config.json,
which the run checks diffusion.* and sample.* against (a disagreement is an error that names both values). With no
checkpoint in the workdir the folder's weights are sampled; a workdir's latest checkpoint comes first.

Arguments, comma-combinable: '' (the default above), 'mse' (guidance 7.5, rescale 0.7), 'dpm' (DPM-Solver++(2M), 25
steps, as diffusers' DPMSolverMultistepScheduler from the same config), 'stabilityai' (stabilityai/stable-diffusion-2-1-base
itself, where the paper's fine-tuning starts: epsilon prediction without the zero-SNR rescale, DDIM with leading
timesteps and steps_offset 1 as its scheduler config says, guidance 7.5), 'tiny' (the small random folder that
python benchmarks/fake_sd.py DIR writes: 16-pixel images, a two-level VAE; the tests' and a dry run's).
The samples go to workdir/samples/pretrained_<setting>_seed<seed>.png / .npz (arr_1: each sample's prompt index)
/ .json (the prompts); each prompt is drawn sample.num_samples / (number of prompts) times, one grid row each.
"""

from selfperc_jax import config_base


def get_config(arg=None):
  args = set(filter(None, (arg or "").split(",")))
  unknown = args - {"mse", "dpm", "stabilityai", "tiny"}
  if unknown:
    raise ValueError(f"configs/sd21_base.py: unknown argument(s) {sorted(unknown)}; use 'mse', 'dpm', 'stabilityai', "
                     "'tiny', comma-separated, or nothing.")
  config = config_base.get_config()
  config.data.name = "none"  # sampled, not trained: no data set
  config.data.image_size = 512  # SD 2.1-base's resolution: 64x64x4 latents
  config.condition = "text"
  config.model.arch = "sd"  # the folder's unet/ (865,910,724 parameters for SD 2.x)
  config.latent.vae = "sd"  # the folder's vae/ (latent.vae_weights='' reads it from there)
  config.latent.flips = False
  # The released models' scheduler_config.json: scaled-linear betas over 1000 steps rescaled to zero terminal SNR
  # (diffusers' rule, which keeps the first timestep's alpha), v-prediction; DDIM with trailing timesteps and
  # set_alpha_to_one=False (the last step lands at the first timestep).
  config.diffusion.schedule = "scaled_linear"
  config.diffusion.timesteps = 1000
  config.diffusion.zero_terminal_snr = True
  config.diffusion.zero_snr_anchor = "first_timestep"
  config.diffusion.prediction = "v"
  config.sample.sampler = "ddim"
  config.sample.steps = 50
  config.sample.timestep_spacing = "trailing"
  config.sample.final_step = "first_timestep"
  config.sample.guidance_scale = 1.0  # the self-perceptual model is sampled without guidance
  config.sample.num_samples = 4  # per draw; each prompt alike
  config.sample.batch_size = 8  # samples at once over all devices (a multiple of their count)
  config.sample_every = 0  # no training here: no grids or evaluation while training
  config.eval_every = 0
  config.eval.features = "inception"
  if "mse" in args:
    config.sample.guidance_scale = 7.5
    config.sample.guidance_rescale = 0.7
  if "stabilityai" in args:  # its scheduler_config.json (PNDMScheduler's, read by DDIM and DPM-Solver as diffusers does)
    config.diffusion.zero_terminal_snr = False
    config.diffusion.zero_snr_anchor = "clean"
    config.diffusion.prediction = "eps"
    config.sample.timestep_spacing = "leading"  # DDIMScheduler's default; the file names none
    config.sample.steps_offset = 1
    config.sample.guidance_scale = 7.5
  if "dpm" in args:
    config.sample.sampler = "dpmpp_2m"
    config.sample.steps = 25
    config.sample.final_step = "clean"  # DPMSolverMultistepScheduler's final_sigmas_type='zero'
    if "stabilityai" in args:
      config.sample.timestep_spacing = "linspace"  # DPMSolverMultistepScheduler's default
      config.sample.steps_offset = 0
  if "tiny" in args:
    config.data.image_size = 16  # 8x8x4 latents through benchmarks/fake_sd.py's two-level VAE
    config.latent.block_out_channels = (16, 32)
    config.latent.layers_per_block = 1
    config.latent.norm_groups = 8
    config.sample.steps = 4
  return config
