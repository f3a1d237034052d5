"""Every config key, its default and what it means, defined once: the base that each config file builds on.

The defaults are the embedded default's (configs/digits.py: the 8x8 digits at CPU scale), so get_config() is a
complete config. A config file starts from it and sets only what its data set or recipe changes, with a comment on
why; it adds no key (tests/test_configs.py checks that). A new data set's config is one file:

  from selfperc_jax import config_base

  def get_config(arg=None):
    config = config_base.get_config()
    config.data.image_size = 16  # ... only what differs
    return config

Config files are loaded by path (ml_collections' config_flags), not imported as modules: importing this module
works wherever the file is and from any working directory. One that derives from another config file reads it with
`load_beside`.
"""

import importlib.util
import os

import ml_collections

# Config sections that fix the shapes of the model's params; a checkpoint only resumes under the same values
# (resume.py), and no comparison variant may change them (validation.py).
SHAPE_KEYS = ("model", "condition", "data.image_size", "data.name", "latent.vae", "latent.channels",
              "latent.block_out_channels")
# Keys inside those sections that change how the model computes, not what it holds.
NON_SHAPE_KEYS = ("model.dtype", "model.remat", "model.dropout", "model.attention")


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # the data order and flips, and the training draws (init, t, noise, label dropout)
  # What the model is conditioned on (selfperc_jax/conditioning.py): 'class' (the data set's labels; a null class for
  # guidance), 'text' (prompts through the text encoder of `pretrained`; the empty prompt for guidance), or 'none'
  # (unconditional: no class embedding, label dropout or guidance; draws are not class-balanced).
  config.condition = "class"
  # A Stable Diffusion model folder in diffusers' layout (unet/, text_encoder/, tokenizer/, vae/, scheduler/;
  # selfperc_jax/pretrained.py), for model.arch='sd': its U-Net, text encoder and VAE; its scheduler_config.json must
  # agree with diffusion.* and sample.* (checked at start), unless retrain_schedule. A training run of its U-Net
  # (model.sd_layout='') without init_from starts from its unet/ (the folder is the model it fine-tunes).
  config.pretrained = ""
  # True: fine-tune the folder's U-Net to this config's diffusion.* and sample.* instead of its scheduler_config.json's
  # (not checked then): the paper's switch of SD 2.1-base's epsilon model to v-prediction with zero terminal SNR.
  config.retrain_schedule = False
  config.total_steps = 2000  # optimizer steps of the whole run, pre-training included
  config.batch_size = 128  # global, over all hosts and devices
  config.log_every = 100  # steps between rows of metrics.jsonl
  config.checkpoint_every = 500  # steps between checkpoints (and one at the last step)
  config.sample_every = 500  # steps between sample grids (samples/step_<STEP>.png); 0: none
  config.eval_every = 0  # > 0: evaluate (FID etc., see eval.*) every this many steps and at the end
  # A NaN/inf loss or gradient: 'stop' with an error (no checkpoint of non-finite params is ever written), or
  # 'skip' that update and go on (the state is kept as it was before it).
  config.on_nonfinite = "stop"
  config.keep_checkpoints = 3  # the newest checkpoints kept; older ones are deleted
  # A checkpoint without its checksums (no fingerprint/ folder) cannot be verified and is treated as corrupt
  # (passed over for an older one and moved to checkpoints_corrupt/); True trusts such checkpoints.
  config.trust_unverified_checkpoints = False
  # A workdir (or its checkpoints/ folder) whose latest checkpoint starts this run, e.g. an MSE-pretrained model: the
  # run is then a fine-tuning run, and what it takes from there is finetune.*'s to say. Or a diffusers model folder
  # (model.arch='sd'): its unet/ weights are the online params, the sampling EMA and the copy; it has no optimizer
  # state (finetune.optimizer_state='reset').
  config.init_from = ""

  config.data = ml_collections.ConfigDict()
  # 'digits' (scikit-learn's, shipped with it) | 'imagenet2012' (TFDS, prepared once) | 'none' (a model folder that
  # is only sampled)
  config.data.name = "digits"
  # digits: 'train' (the first 1500), 'test' (the other 297) or 'all'; imagenet2012: 'train' or 'validation'
  config.data.split = "train"
  config.data.image_size = 8  # digits: other sizes resize the 8x8 images (bilinear); imagenet2012: ADM's centre crop
  config.data.dir = ""  # the TFDS data directory ('': $TFDS_DATA_DIR or ~/tensorflow_datasets); the digits need none
  config.data.random_flip = False  # random horizontal flips (off for the digits: a mirrored digit is another shape)
  config.data.num_workers = 0  # grain worker processes per host (0: in the main process)
  config.data.read_threads = 2  # threads per process, each building one batch at a time

  # Latent space (configs/imagenet256_latent.py); latent.vae='' trains on the pixels.
  config.latent = ml_collections.ConfigDict()
  config.latent.vae = ""  # '' (pixels) | 'sd' | 'sdxl': Stable Diffusion's VAE (third_party/sd_vae)
  config.latent.vae_weights = ""  # its diffusion_pytorch_model.safetensors (third_party/sd_vae/README.md)
  config.latent.dir = ""  # the encoded latents (python -m selfperc_jax.encode_latents), one folder per split
  config.latent.flips = True  # encode each image's mirror image too (for data.random_flip)
  config.latent.scaling_factor = 0.0  # 0: the VAE's own (0.18215 'sd', 0.13025 'sdxl')
  # The VAE's layout, each 0 / (): the released VAE's.
  config.latent.block_out_channels = ()  # channels of each level
  config.latent.layers_per_block = 0  # residual blocks per level
  config.latent.norm_groups = 0  # group-norm groups
  config.latent.channels = 0  # latent channels
  config.latent.shard_size = 1000  # examples per encoded shard (the unit a rerun of the encoder skips)
  config.latent.encode_batch_size = 64  # images per encoder call, per process

  config.model = ml_collections.ConfigDict()  # the denoiser
  # 'adm': the ADM-style U-Net of selfperc_jax/models/unet.py, with the keys below; 'sd': Stable Diffusion's U-Net,
  # its layout read from pretrained's unet/ (selfperc_jax/models/sd.py; of the keys below only dtype, remat and
  # attention apply).
  config.model.arch = "adm"
  # model.arch='sd': '' reads the U-Net's layout (and weights) from pretrained's unet/; 'small' is a small SD layout
  # trained from scratch (selfperc_jax/models/sd.py, LAYOUTS; configs/digits.py:text).
  config.model.sd_layout = ""
  config.model.base_channels = 24  # channels of the first level
  config.model.channel_mult = (1, 2)  # each level's channels in base_channels; each level halves the size
  config.model.num_res_blocks = 1  # residual blocks per level
  config.model.attention_resolutions = (4,)  # self-attention at these feature-map sizes (pixels)
  config.model.num_heads = 4  # attention heads (unused while head_channels > 0)
  config.model.head_channels = 0  # > 0: attention heads of this many channels (overrides num_heads)
  config.model.dropout = 0.0  # in each residual block, while training
  config.model.num_classes = 10  # the data set's (checked); one more embedding is the null class of guidance
  config.model.dtype = "float32"  # compute dtype; params stay float32 ('bfloat16' for TPU/GPU speed)
  config.model.remat = False  # recompute block activations in the backward pass: less memory, more time
  # jax.nn.dot_product_attention's implementation: 'auto' (XLA picks; cuDNN flash attention on GPUs where shape
  # and dtype allow), 'xla', or 'cudnn' (fails where cuDNN cannot run it)
  config.model.attention = "auto"

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = "cosine"  # cosine | linear | scaled_linear
  config.diffusion.timesteps = 0  # 0: continuous t; T: the discrete T-step table
  config.diffusion.zero_terminal_snr = False  # rescale the schedule to zero SNR at t = 1 (Lin et al. 2023)
  # Which alpha that rescale keeps: 'clean' alpha(0) = 1 (any schedule), or 'first_timestep' the T-step table's first
  # entry, as diffusers' rescale_betas_zero_snr does (a model trained with diffusers; timesteps > 0 only).
  config.diffusion.zero_snr_anchor = "clean"
  config.diffusion.prediction = "v"  # v | eps | x0

  config.loss = ml_collections.ConfigDict()  # the diffusion MSE term
  config.loss.min_snr_gamma = 0.0  # > 0: min-SNR-gamma weighting of the MSE term
  config.loss.label_dropout = 0.1  # probability of the null class, for classifier-free guidance

  config.perceptual = ml_collections.ConfigDict()  # the self-perceptual term and its stop-gradient copy
  config.perceptual.weight = 1.0  # 0: plain MSE training throughout (no copy is kept)
  # Steps before it train with plain MSE (the pre-training phase); the run fine-tunes from it on (finetune.*).
  config.perceptual.start_step = 1650
  # The MSE term's weight from start_step on: 0 trains on the feature distance alone, as the paper fine-tunes.
  config.perceptual.mse_weight = 0.0
  config.perceptual.ramp_steps = 0  # linear ramp of the perceptual weight after the start step
  # What the copy is taken from at start_step: 'ema' (the sampling EMA, i.e. the released MSE model, as in the
  # paper) or 'online' (the raw trained params).
  config.perceptual.copy_source = "ema"
  config.perceptual.copy_ema_decay = 1.0  # from start_step on the copy is an EMA of the online params; 1.0: frozen
  config.perceptual.share_with_sampling_ema = False  # True: the sampling EMA itself is the copy (no extra memory)
  config.perceptual.noise = "paper"  # 'paper': x0 with eps, x0_hat with eps_hat; 'shared': one fresh eps'
  config.perceptual.condition = "same"  # 'same' class as the online prediction, or 'null'
  config.perceptual.taps = ("mid",)  # the copy's features compared: 'mid' or encoder levels 'enc0', 'enc1', ...
  # True: real and predicted branch through the copy as one 2B batch; False: separately, so that the backward skips
  # the real half: 3 instead of 4 encoder passes of FLOPs, faster and smaller on CPU (BENCHMARKS.md);
  # benchmarks/device.py measures both on GPU/TPU.
  config.perceptual.fused = False
  config.perceptual.t_prime_min = 0.0  # t' ~ U[t_prime_min, t_prime_max], independent of t
  config.perceptual.t_prime_max = 1.0

  config.sampling_ema = ml_collections.ConfigDict()  # the params that sampling and evaluation use
  # Warmed up: the decay at step s is min(decay, (1 + s) / (10 + s)); from a fine-tuning's start, finetune.sampling_ema.
  config.sampling_ema.decay = 0.999

  config.optimizer = ml_collections.ConfigDict()  # AdamW
  # The training before any fine-tuning (finetune.*): a run that fine-tunes from perceptual.start_step on uses this
  # schedule over its first start_step steps (as the comparison's pre-training stage does), any other run without
  # init_from over its total_steps.
  config.optimizer.learning_rate = 2e-3  # the peak, reached after warm-up
  config.optimizer.warmup_steps = 200  # linear from 0
  config.optimizer.decay = "cosine"  # cosine (to 0 at the schedule's end) | constant, after warm-up
  config.optimizer.weight_decay = 0.0  # AdamW's decoupled weight decay
  config.optimizer.b1 = 0.9  # Adam's moment decays
  config.optimizer.b2 = 0.99
  config.optimizer.grad_clip = 1.0  # global-norm clipping of the gradient; 0: none
  # > 1: each step's batch is processed as this many micro-batches whose gradients are averaged before the one
  # update (the same update as the full batch; activation memory of one micro-batch).
  config.optimizer.accumulate_steps = 1

  # The fine-tuning recipe, fixed for a run's life (a resumed run keeps the one its checkpoint recorded). It applies
  # to a run with init_from (all of it is fine-tuning: the comparison's branches) and to a run that pre-trains with
  # MSE and trains the self-perceptual term from perceptual.start_step > 0 on (from that step, where the state
  # changes once, before the step runs); a run from scratch without that switch has no fine-tuning.
  config.finetune = ml_collections.ConfigDict()
  # The online params at the fine-tuning's first step: 'ema' (the pre-trained sampling EMA, i.e. the released model,
  # as the paper fine-tunes; with perceptual.copy_source='ema' the online params start equal to the copy) or
  # 'online' (the pre-trained online params).
  config.finetune.online_start = "ema"
  # Adam's state at the fine-tuning's first step: 'carry' (the pre-training's moments and count; from init_from's
  # checkpoint, which must have the same optimizer layout) or 'reset' (fresh). 'carry' is a choice, not the paper's
  # (its released model comes without one): the optimizer goes on instead of starting again, and its moments are in
  # place, so no new warm-up is needed.
  config.finetune.optimizer_state = "carry"
  # The sampling EMA from the fine-tuning's first step: 'carry' (it goes on from the pre-trained EMA at the full
  # sampling_ema.decay, no new warm-up: after k steps the pre-trained EMA still weighs decay**k, 37 % after 1000 at
  # 0.999), 'restart' (the warm-up min(decay, (1 + k) / (10 + k)) anew, k counting the fine-tuning's steps), or 'run'
  # (the warm-up counts the run's own steps: a single run's goes on through the start step, an init_from run's
  # starts again at its step 0). 'run' is a choice, not the paper's: the recipe before this section, kept as the
  # default until the study (issue 25) measures the others.
  config.finetune.sampling_ema = "run"
  # The fine-tuning's learning rate: its peak (0: optimizer.learning_rate, the pre-training's), reached after
  # finetune.warmup_steps linear from 0, then 'cosine' (to 0 at the last step) or 'constant' over the fine-tuning's
  # steps; or 'run': no schedule of its own, optimizer.*'s over the run's total_steps (a single run's one schedule
  # goes on through the start step; an init_from run warms up again to the peak; finetune.learning_rate and
  # warmup_steps must then be 0). 'run' is a choice, not the paper's (whose fine-tuning schedule this project does
  # not know): the recipe before this section, kept as the default until the study measures the others.
  config.finetune.learning_rate = 0.0
  config.finetune.warmup_steps = 0
  config.finetune.decay = "run"

  config.sample = ml_collections.ConfigDict()  # the training-time sample grids; evaluation samples the same way
  config.sample.sampler = "ddim"  # ddim | ddpm | dpmpp_2m | heun
  config.sample.steps = 50  # sampler steps (heun: 2 model calls each)
  # Where the steps go: 'project' (N + 1 evenly spaced times from 1 to 0), or diffusers' timesteps and step rules
  # 'trailing' | 'leading' | 'linspace' (discrete schedules; scheduler_config.py reads a diffusers model's settings).
  config.sample.timestep_spacing = "project"
  config.sample.steps_offset = 0  # diffusers' steps_offset: added to the 'leading' timesteps (the others ignore it)
  # Where the last step lands: 'clean' (t = 0), or 'first_timestep' (t = 1/T, discrete schedules: diffusers' DDIM
  # with set_alpha_to_one=False, DPM-Solver with final_sigmas_type='sigma_min').
  config.sample.final_step = "clean"
  config.sample.guidance_scale = 1.0  # classifier-free guidance; 1: none
  config.sample.num_samples = 100  # rounded up to a multiple of the classes shown: one grid row per class
  config.sample.guidance_rescale = 0.0  # phi of Lin et al. 2023 (e.g. 0.7 with guidance 7.5); 0: plain guidance
  config.sample.guidance_interval = (0.0, 1.0)  # guide only for t in [lo, hi]; the conditional output elsewhere
  # Samples drawn at once over all devices (a multiple of their count): sampling and evaluation run in chunks of it,
  # so memory does not grow with the number of samples.
  config.sample.batch_size = 512
  config.sample.seed = 0  # the grids' noise: the same at every step, so that grids compare
  config.sample.classes = ()  # the classes of the training-time grids (empty: all)
  # condition='text': the prompts of a draw, each drawn alike (one grid row per prompt; fewer samples than prompts:
  # one each of prompts spread evenly over them), from sample.prompts then the lines of sample.prompts_file (or a
  # COCO captions .json: one caption per image); guidance's unconditional input is sample.negative_prompt's
  # embedding, or the empty prompt's where it is ''.
  config.sample.prompts = ()
  config.sample.prompts_file = ""
  config.sample.negative_prompt = ""

  config.eval = ml_collections.ConfigDict()  # --mode=eval and eval_every; sampler etc. from sample.*
  config.eval.num_samples = 1000  # rounded up to a multiple of the class count
  # 'digits': the project's digits classifier (trained in seconds, cached in workdir/eval); 'inception': FID's network
  config.eval.features = "digits"
  config.eval.reference_split = "train"  # digits without eval.reference: the split the samples are compared with
  # A reference .npz (images arr_0, or mu/sigma/features), e.g. ADM's VIRTUAL_imagenet256_labeled.npz; the digits
  # can do without (eval.reference_split).
  config.eval.reference = ""
  config.eval.inception_weights = ""  # with eval.features='inception': the FID Inception weights (.pth or .npz)
  config.eval.save_samples = False  # True: also write the samples as eval/samples_step_<STEP>_<setting>.npz
  config.eval.seed = 1  # the evaluation samples' noise

  config.experiment = ml_collections.ConfigDict()  # python -m selfperc_jax.experiments (the paper's comparison)
  # Branches continued from one MSE pre-training (perceptual.start_step steps) for the rest of total_steps:
  # 'mse' (the baseline), 'perceptual' (the feature term alone, the paper's setting), 'mse_perceptual' (both);
  # 'perceptual_ema' / 'perceptual_online' fix the copy's source (to compare perceptual.copy_source).
  config.experiment.branches = ("mse", "perceptual", "mse_perceptual")
  config.experiment.guidance_scales = (1.0, 1.5, 2.0, 3.0)  # every branch is evaluated at each (1: no guidance)
  config.experiment.guidance_rescale = 0.7  # phi of Lin et al. 2023 for the guided rows (0: plain guidance)
  # Training seeds, e.g. (0, 1, 2) (--config.experiment.seeds=0,1,2): the whole comparison, pre-training included,
  # once per seed (config.seed = s, stages in seed_<s>/; eval.seed and sample.seed stay the same for all), and the
  # table gives each metric as mean ± 95 % interval over the seeds and each branch's paired difference to 'mse' of
  # the same seed. Empty: one comparison with config.seed, its stages directly in the workdir (n = 1, no intervals).
  config.experiment.seeds = ()
  # Ablations: named sets of config values for the self-perceptual branches, each 'name:key=value,key=value' (values
  # are Python literals or words; a tuple may be written (mid,enc0)). Every self-perceptual branch b of
  # experiment.branches is then also trained with each variant's values, as stage b@name from the same pre-training,
  # and is evaluated and tabled as a branch. A variant may not change what the pre-training shares (model shape,
  # data, seed) nor the comparison's own settings (steps, evaluation, sampling). On the command line, one variant:
  #   --config.experiment.variants=tprime_hi:perceptual.t_prime_min=0.5
  # several, or one with commas, as a quoted tuple of strings:
  #   '--config.experiment.variants=("lr:finetune.learning_rate=1e-4,finetune.decay=cosine","w:perceptual.weight=2")'
  config.experiment.variants = ()

  config.profile = ml_collections.ConfigDict()  # a jax.profiler trace into workdir/profile (process 0)
  config.profile.start_step = 10  # the first traced step (after compilation)
  config.profile.steps = 0  # how many steps to trace; 0: no trace

  config.mesh = ml_collections.ConfigDict()  # the batch is split over both axes
  config.mesh.data = -1  # devices on the data axis; -1: the devices that mesh.fsdp leaves
  config.mesh.fsdp = 1  # devices each param is split over (FSDP); -1: the devices that mesh.data leaves
  config.mesh.fsdp_min_size = 1024  # arrays smaller than this stay replicated
  return config


def load_beside(config_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """get_config(arg) of the config file `name` in the folder of `config_file` (a config's __file__): for a config
  that derives from another one, as configs/imagenet256_latent.py does from configs/imagenet256.py."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  spec = importlib.util.spec_from_file_location(f"configs_{os.path.splitext(name)[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
