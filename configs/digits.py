"""Class-conditional diffusion on scikit-learn's 8x8 digits with the self-perceptual objective: the embedded default.

  python -m selfperc_jax.main --config=configs/digits.py --workdir=workdirs/digits
  python -m selfperc_jax.main --config=configs/digits.py:tiny --workdir=/tmp/tiny   # smoke-test size
  python -m selfperc_jax.main --config=configs/digits.py:mse --workdir=workdirs/digits_mse   # the MSE baseline

The default follows the paper's recipe in one run: plain MSE pre-training until `perceptual.start_step`, at which
point the perceptual copy is taken from the sampling EMA (the "released" MSE model) and frozen, then training on the
self-perceptual feature distance alone (`perceptual.mse_weight=0`). Arguments: '' (default), 'tiny', 'mse' (MSE
only), 'small' (half the channels, half the total steps: 600 + 600 instead of 1400 + 1000; a harder setting for the
comparison, where the pre-trained model is further from converged); they combine with commas, e.g. 'tiny,mse'. The
paper's whole comparison (MSE, MSE + guidance, self-perceptual, from one pre-training) is one command:

  python -m selfperc_jax.experiments --config=configs/digits.py --workdir=workdirs/digits_comparison
"""

import ml_collections


def get_config(arg=None):
  args = set(filter(None, (arg or "").split(",")))
  unknown = args - {"tiny", "mse", "small"}
  if unknown:
    raise ValueError(f"configs/digits.py: unknown argument(s) {sorted(unknown)}; use 'tiny' or 'small', 'mse', "
                     "comma-separated, or nothing.")
  if {"tiny", "small"} <= args:
    raise ValueError("configs/digits.py: 'tiny' and 'small' are two sizes; give one of them.")

  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 2400
  config.batch_size = 128
  config.log_every = 100
  config.checkpoint_every = 500
  config.sample_every = 1200
  config.eval_every = 0  # > 0: evaluate (FID etc., see eval.*) every this many steps and at the end
  # A NaN/inf loss or gradient: 'stop' with an error (no checkpoint of non-finite params is ever written), or
  # 'skip' that update and go on (the state is kept as it was before it).
  config.on_nonfinite = "stop"
  config.keep_checkpoints = 3
  # A workdir (or its checkpoints/ folder) whose latest params start this run, e.g. an MSE-pretrained model.
  config.init_from = ""

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"
  config.data.split = "train"  # 'train' (the first 1500 digits), 'test' (the other 297) or 'all'
  config.data.image_size = 8  # other sizes resize the 8x8 digits (bilinear)
  config.data.dir = ""  # data sets read from disk (imagenet2012): the TFDS data directory; the digits need none
  config.data.random_flip = False  # horizontal flips would turn digits into other shapes
  config.data.num_workers = 0  # grain worker processes per host (0: in the main process)
  config.data.read_threads = 2  # threads per process, each building one batch at a time

  # Latent space (configs/imagenet256_latent.py); latent.vae='' trains on the pixels.
  config.latent = ml_collections.ConfigDict()
  config.latent.vae = ""  # '' (pixels) | 'sd' | 'sdxl': Stable Diffusion's VAE (third_party/sd_vae)
  config.latent.vae_weights = ""  # its diffusion_pytorch_model.safetensors (third_party/sd_vae/README.md)
  config.latent.dir = ""  # the encoded latents (python -m selfperc_jax.encode_latents), one folder per split
  config.latent.flips = True  # encode each image's mirror image too (for data.random_flip)
  config.latent.scaling_factor = 0.0  # 0: the VAE's own (0.18215 'sd', 0.13025 'sdxl')
  config.latent.block_out_channels = ()  # the VAE's layout; () / 0: the released VAE's
  config.latent.layers_per_block = 0
  config.latent.norm_groups = 0
  config.latent.channels = 0
  config.latent.shard_size = 1000  # examples per encoded shard (the unit a rerun of the encoder skips)
  config.latent.encode_batch_size = 64  # images per encoder call, per process

  config.model = ml_collections.ConfigDict()
  config.model.base_channels = 32
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 2
  config.model.attention_resolutions = (4,)
  config.model.num_heads = 4
  config.model.head_channels = 0  # > 0: attention heads of this many channels (overrides num_heads)
  config.model.dropout = 0.0
  config.model.num_classes = 10
  config.model.dtype = "float32"  # compute dtype; params stay float32 ('bfloat16' for TPU/GPU speed)
  config.model.remat = False  # recompute block activations in the backward pass: less memory, more time
  # jax.nn.dot_product_attention's implementation: 'auto' (XLA picks; cuDNN flash attention on GPUs where shape
  # and dtype allow), 'xla', or 'cudnn' (fails where cuDNN cannot run it)
  config.model.attention = "auto"

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = "cosine"  # cosine | linear | scaled_linear
  config.diffusion.timesteps = 0  # 0: continuous t; T: the discrete T-step table
  config.diffusion.zero_terminal_snr = False
  config.diffusion.prediction = "v"  # v | eps | x0

  config.loss = ml_collections.ConfigDict()  # the diffusion MSE term
  config.loss.min_snr_gamma = 0.0  # > 0: min-SNR-gamma weighting of the MSE term
  config.loss.label_dropout = 0.1  # probability of the null class, for classifier-free guidance

  config.perceptual = ml_collections.ConfigDict()  # the self-perceptual term and its stop-gradient copy
  config.perceptual.weight = 1.0  # 0: plain MSE training throughout (no copy is kept)
  config.perceptual.start_step = 1400  # steps before it train with plain MSE (the pre-training phase)
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
  config.perceptual.taps = ("mid",)
  # True: real and predicted branch through the copy as one 2B batch; False: separately, so that the backward
  # skips the real half. False measured 15 % faster per step with 17 % less memory here (BENCHMARKS.md).
  config.perceptual.fused = False
  config.perceptual.t_prime_min = 0.0  # t' ~ U[t_prime_min, t_prime_max], independent of t
  config.perceptual.t_prime_max = 1.0

  config.sampling_ema = ml_collections.ConfigDict()  # the params that sampling and evaluation use
  config.sampling_ema.decay = 0.999  # warm-up: the decay at step s is min(decay, (1 + s) / (10 + s))

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.decay = "cosine"  # cosine | constant, after warm-up
  config.optimizer.weight_decay = 0.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.99
  config.optimizer.grad_clip = 1.0
  # > 1: each step's batch is processed as this many micro-batches whose gradients are averaged before the one
  # update (the same update as the full batch; activation memory of one micro-batch).
  config.optimizer.accumulate_steps = 1

  config.sample = ml_collections.ConfigDict()
  config.sample.sampler = "ddim"  # ddim | ddpm | dpmpp_2m | heun
  config.sample.steps = 50
  config.sample.guidance_scale = 1.0
  config.sample.num_samples = 100  # rounded up to a multiple of the class count: one grid row per class
  config.sample.guidance_rescale = 0.0  # phi of Lin et al. 2023 (e.g. 0.7 with guidance 7.5); 0: plain guidance
  config.sample.guidance_interval = (0.0, 1.0)  # guide only for t in [lo, hi]; the conditional output elsewhere
  config.sample.batch_size = 512  # samples drawn at once over all devices (a multiple of their count); memory does not grow with num_samples
  config.sample.seed = 0
  config.sample.classes = ()  # the classes of the training-time grids (empty: all)

  config.eval = ml_collections.ConfigDict()
  config.eval.num_samples = 1000  # rounded up to a multiple of the class count; sampler etc. from sample.*
  config.eval.features = "digits"  # the project's digits classifier (trained in seconds, cached in workdir/eval)
  config.eval.reference_split = "train"  # the data the samples are compared with
  config.eval.reference = ""  # or a reference .npz (images arr_0, or mu/sigma/features), e.g. ADM's batches
  config.eval.inception_weights = ""  # with eval.features='inception': the FID Inception weights file
  config.eval.save_samples = False  # True: also write the samples as eval/samples_step_<STEP>_<setting>.npz
  config.eval.seed = 1

  config.experiment = ml_collections.ConfigDict()  # python -m selfperc_jax.experiments (the paper's comparison)
  # Branches continued from one MSE pre-training (perceptual.start_step steps) for the rest of total_steps:
  # 'mse' (the baseline), 'perceptual' (the feature term alone, the paper's setting), 'mse_perceptual' (both);
  # 'perceptual_ema' / 'perceptual_online' fix the copy's source (to compare perceptual.copy_source).
  config.experiment.branches = ("mse", "perceptual", "mse_perceptual")
  config.experiment.guidance_scales = (1.0, 1.5, 2.0, 3.0)  # every branch is evaluated at each (1: no guidance)
  config.experiment.guidance_rescale = 0.7  # phi of Lin et al. 2023 for the guided rows (0: plain guidance)

  config.profile = ml_collections.ConfigDict()  # a jax.profiler trace into workdir/profile (process 0)
  config.profile.start_step = 10  # the first traced step (after compilation)
  config.profile.steps = 0  # how many steps to trace; 0: no trace

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # devices on the data axis; -1: the devices that mesh.fsdp leaves
  config.mesh.fsdp = 1  # devices each param is split over (FSDP); -1: the devices that mesh.data leaves
  config.mesh.fsdp_min_size = 1024  # arrays smaller than this stay replicated

  if "tiny" in args:
    config.total_steps = 100
    config.batch_size = 32
    config.log_every = 10
    config.checkpoint_every = 50
    config.sample_every = 100
    config.model.base_channels = 16
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.num_heads = 2
    config.optimizer.warmup_steps = 10
    config.perceptual.start_step = 50
    config.sample.steps = 10
    config.sample.num_samples = 20
    config.sample.batch_size = 32
    config.eval.num_samples = 50
  if "small" in args:  # the default's recipe at half the width and half the total steps (600 + 600)
    config.total_steps = 1200
    config.perceptual.start_step = 600
    config.model.base_channels = 16
  if "mse" in args:
    config.perceptual.weight = 0.0
  return config
