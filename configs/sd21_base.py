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

The same config fine-tunes such a folder on image-caption data, as the paper did (README, "Fine-tuning Stable
Diffusion"): the data encoded once (python -m selfperc_jax.encode_latents, data.name='webdataset' or
'imagefolder', latent.dir), then

  # the self-perceptual stage: from the MSE model, against a frozen copy of it, the feature distance alone
  python -m selfperc_jax.main --config=configs/sd21_base.py --workdir=workdirs/sd_sp \
      --config.pretrained=MODELS/sd2.1-base-zsnr-laionaes6 --config.latent.dir=DATA/latents
  # the MSE baseline, e.g. from SD 2.1-base switched to v + zero SNR:
  python -m selfperc_jax.main --config=configs/sd21_base.py:mse --workdir=workdirs/sd_mse \
      --config.pretrained=MODELS/stable-diffusion-2-1-base --config.retrain_schedule=True \
      --config.latent.dir=DATA/latents
  # both from the same start, evaluated on COCO prompts unguided and at guidance 7.5 / rescale 0.7 (README):
  python -m selfperc_jax.experiments --config=configs/sd21_base.py --workdir=workdirs/sd_comparison \
      --config.pretrained=MODELS/sd2.1-base-zsnr-laionaes6 --config.latent.dir=DATA/latents \
      --config.sample.prompts_file=captions_val2014.json --config.eval.reference=coco512.npz \
      --config.eval.inception_weights=pt_inception-2015-12-05.pth --config.eval.num_samples=10000

A run of the folder's U-Net starts from the folder's weights (pretrained; --config.init_from=FOLDER for another
folder of the same layout).

Fine-tuning settings (choices of this project where the paper gives none, stated as such): 10,000 steps at a global
batch of 256, AdamW at a constant 1e-5 after 500 warm-up steps (weight decay 0.01), a fresh optimizer (a model
folder holds none), the sampling EMA (decay 0.9999) carried on from the folder's weights; the copy frozen at the
start weights, the same text condition, t' uniform, mid-block features (the paper's); caption dropout 0.1 in both
stages. The frozen text encoder runs in
the step; the VAE is not used by training (the latents are encoded once). Topologies: 'tpu' (the default, a pod
slice such as v4-32 or v5p-64): bfloat16 compute, remat, FSDP over every device; 'gpu' (one node of 8 GPUs, one
process each): bfloat16, remat, data parallel with the state replicated (--config.mesh.fsdp=8 when short of memory).

Arguments, comma-combinable: '' (the default above), 'tpu' / 'gpu' (the topology), 'mse' (the MSE baseline: no
perceptual term; sampled with guidance 7.5, rescale 0.7), 'dpm' (DPM-Solver++(2M), 25
steps, as diffusers' DPMSolverMultistepScheduler from the same config), 'stabilityai' (stabilityai/stable-diffusion-2-1-base
itself, where the paper's fine-tuning starts: epsilon prediction without the zero-SNR rescale, DDIM with leading
timesteps and steps_offset 1 as its scheduler config says, guidance 7.5), 'tiny' (the small random folder that
python benchmarks/fake_sd.py DIR writes: 16-pixel images, a two-level VAE, float32 on a replicated state, batch 8;
the tests' and a dry run's).
The samples go to workdir/samples/pretrained_<setting>_seed<seed>.png / .npz (arr_1: each sample's prompt index)
/ .json (the prompts); each prompt is drawn sample.num_samples / (number of prompts) times, one grid row each.
"""

from selfperc_jax import config_base


def get_config(arg=None):
  args = set(filter(None, (arg or "").split(",")))
  unknown = args - {"tpu", "gpu", "mse", "dpm", "stabilityai", "tiny"}
  if unknown or {"tpu", "gpu"} <= args:
    raise ValueError(f"configs/sd21_base.py: bad argument(s) {arg!r}; use 'tpu' (default) or 'gpu', 'mse', 'dpm', "
                     "'stabilityai', 'tiny', comma-separated, or nothing.")
  config = config_base.get_config()
  # Image-caption data, encoded once with its token ids (data/captioned.py; sampling reads no data)
  config.data.name = "webdataset"
  config.data.image_size = 512  # SD 2.1-base's resolution: 64x64x4 latents
  config.data.random_flip = False
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
  config.sample_every = 0  # grids while training need sample.prompts: set both to draw them
  config.eval_every = 0
  config.eval.features = "inception"  # against eval.reference (COCO's statistics: evaluation/reference_stats.py)

  # Fine-tuning from a model folder (init_from), as the paper's two stages did (see the module's docstring)
  config.total_steps = 10_000
  config.batch_size = 256
  config.log_every = 50
  config.checkpoint_every = 1_000
  config.perceptual.weight = 1.0  # the feature distance alone (mse_weight 0) from the first step
  config.perceptual.mse_weight = 0.0
  config.perceptual.start_step = 0
  config.perceptual.copy_ema_decay = 1.0  # frozen at the start weights
  # Caption dropout to the empty prompt in both stages (a choice: the self-perceptual model is sampled without
  # guidance, but so it keeps a trained unconditional branch and the comparison can guide both alike).
  config.loss.label_dropout = 0.1
  # python -m selfperc_jax.experiments --config=configs/sd21_base.py: both stages from the folder's U-Net (no
  # pre-training stage), each evaluated unguided and at the released MSE model's guidance 7.5 with rescale 0.7.
  config.experiment.branches = ("mse", "perceptual")
  config.experiment.guidance_scales = (1.0, 7.5)
  config.experiment.guidance_rescale = 0.7
  config.optimizer.learning_rate = 1e-5
  config.optimizer.warmup_steps = 500
  config.optimizer.decay = "constant"
  config.optimizer.weight_decay = 0.01
  config.optimizer.b2 = 0.999
  config.finetune.optimizer_state = "reset"  # a model folder holds no optimizer state
  config.finetune.sampling_ema = "carry"
  config.finetune.learning_rate = 1e-5
  config.finetune.warmup_steps = 500
  config.finetune.decay = "constant"
  config.sampling_ema.decay = 0.9999
  config.model.dtype = "bfloat16"
  config.model.remat = True
  if "gpu" not in args:  # 'tpu': FSDP over every device of the slice
    config.mesh.fsdp, config.mesh.data = -1, 1
  if "mse" in args:
    config.perceptual.weight = 0.0
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
    config.batch_size = 8
    config.model.dtype = "float32"
    config.model.remat = False
    config.mesh.fsdp, config.mesh.data = 1, -1
  return config
