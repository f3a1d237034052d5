"""Class-conditional diffusion on scikit-learn's 8x8 digits with the self-perceptual objective: the embedded default.

  python -m selfperc_jax.main --config=configs/digits.py --workdir=workdirs/digits
  python -m selfperc_jax.main --config=configs/digits.py:tiny --workdir=/tmp/tiny   # smoke-test size
  python -m selfperc_jax.main --config=configs/digits.py:mse --workdir=workdirs/digits_mse   # the MSE baseline

The default follows the paper's recipe in one run: plain MSE pre-training until `loss.perceptual_start_step`, at
which point the perceptual copy is snapshotted from the online weights and frozen (`perceptual.ema_decay=1.0`), then
self-perceptual training. Arguments: '' (default), 'tiny', 'mse' (MSE only, for the paper's comparison); they combine
with commas, e.g. 'tiny,mse'.
"""

import ml_collections


def get_config(arg=None):
  args = set(filter(None, (arg or "").split(",")))
  unknown = args - {"tiny", "mse"}
  if unknown:
    raise ValueError(f"configs/digits.py: unknown argument(s) {sorted(unknown)}; use 'tiny', 'mse' or nothing.")

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

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = "cosine"  # cosine | linear | scaled_linear
  config.diffusion.timesteps = 0  # 0: continuous t; T: the discrete T-step table
  config.diffusion.zero_terminal_snr = False
  config.diffusion.prediction = "v"  # v | eps | x0

  config.loss = ml_collections.ConfigDict()
  config.loss.mse_weight = 1.0
  config.loss.min_snr_gamma = 0.0  # > 0: min-SNR-gamma weighting of the MSE term
  config.loss.perceptual_weight = 1.0
  config.loss.perceptual_start_step = 1400  # steps before it train with plain MSE (the pre-training phase)
  config.loss.perceptual_ramp_steps = 0  # linear ramp of the perceptual weight after the start step
  config.loss.perceptual_noise = "paper"  # 'paper': x0 with eps, x0_hat with eps_hat; 'shared': one fresh eps'
  config.loss.perceptual_condition = "same"  # 'same' class as the online prediction, or 'null'
  config.loss.perceptual_taps = ("mid",)
  # True: real and predicted branch through the copy as one 2B batch; False: separately, so that the backward
  # skips the real half (fewer FLOPs; see BENCHMARKS.md for which is faster where).
  config.loss.perceptual_fused = True
  config.loss.t_prime_min = 0.0
  config.loss.t_prime_max = 1.0
  config.loss.label_dropout = 0.1  # probability of the null class, for classifier-free guidance

  config.perceptual = ml_collections.ConfigDict()
  # The copy is an EMA of the online params from the perceptual start step on; 1.0 freezes it there.
  config.perceptual.ema_decay = 1.0
  config.perceptual.share_with_sampling_ema = False  # use the sampling EMA itself as the copy (no extra memory)

  config.ema = ml_collections.ConfigDict()
  config.ema.decay = 0.999

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.decay = "cosine"  # cosine | constant, after warm-up
  config.optimizer.weight_decay = 0.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.99
  config.optimizer.grad_clip = 1.0

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
    config.loss.perceptual_start_step = 50
    config.sample.steps = 10
    config.sample.num_samples = 20
    config.sample.batch_size = 32
    config.eval.num_samples = 50
  if "mse" in args:
    config.loss.perceptual_weight = 0.0
  return config
