"""Class-conditional ImageNet 256x256 in pixel space with the self-perceptual objective: the pod-slice default.

  python -m selfperc_jax.main --config=configs/imagenet256.py --workdir=WORKDIR              # TPU pod slice ('tpu')
  python -m selfperc_jax.main --config=configs/imagenet256.py:gpu --workdir=WORKDIR          # one 8-GPU node
  python -m selfperc_jax.main --config=configs/imagenet256.py:tpu,mse --workdir=WORKDIR      # the MSE baseline

Arguments (comma-separated): the topology, 'tpu' (default) or 'gpu'; and 'mse' for MSE only (the paper's baseline,
which is also the pre-training run that `init_from` can start a self-perceptual run from).

Data: TFDS `imagenet2012` prepared in the array_record format under `data.dir` (see README, "ImageNet"); training
fails at start, with the steps to prepare it, if it is not there.

Model: ADM's ImageNet-256 U-Net layout (Dhariwal & Nichol 2021: 256 base channels, multipliers 1,1,2,2,4,4, two
residual blocks per level, attention at 32, 16 and 8 pixels with 64-channel heads, scale-shift norm) in this
project's U-Net, which downsamples with strided convolutions and upsamples with nearest + conv instead of ADM's
residual up/down blocks and predicts no variance: 502,214,147 parameters (ADM's own model has about 554 M).
`tests/test_configs.py` recounts them.

Topologies:
- 'tpu' (e.g. v4-32 or v5p-64): global batch 256, bfloat16 compute with float32 params, remat of every block, and
  FSDP over all devices (params, Adam moments, EMA and the perceptual copy each split 1/N per device). The float32
  train state is 10.0 GB (params 2.0, Adam 4.0, EMA 2.0, copy 2.0), 0.63 GB per chip on the 16 chips of a v4-32.
- 'gpu' (one node of 8 x 80 GB, one process per GPU as launch/gpu_slurm.sh starts it): global batch 256 (32 per
  GPU), bfloat16 compute, remat, params replicated (plain data parallelism); set --config.mesh.fsdp=8 to shard the
  state over each node's GPUs when memory is short.

Schedule: MSE pre-training for `perceptual.start_step` steps, then, as in the paper, the self-perceptual feature
distance alone (`perceptual.mse_weight=0`) against a copy taken from the sampling EMA at that step and frozen. The
step counts and optimiser settings are this project's choices in ADM's range, not numbers from the paper.
`python -m selfperc_jax.experiments --config=configs/imagenet256.py --workdir=DIR` runs the paper's comparison
(MSE, MSE + guidance, self-perceptual from one pre-training) with these step counts.
"""

import ml_collections

CLASSES_SHOWN = (88, 207, 279, 360, 387, 388, 417, 980)  # macaw, golden retriever, arctic fox, otter, red panda, ...


def get_config(arg=None):
  args = set(filter(None, (arg or "").split(",")))
  unknown = args - {"tpu", "gpu", "mse"}
  if unknown or {"tpu", "gpu"} <= args:
    raise ValueError(f"configs/imagenet256.py: bad argument {arg!r}; use 'tpu' (default) or 'gpu', optionally "
                     "with ',mse'.")
  topology = "gpu" if "gpu" in args else "tpu"

  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 1_000_000
  config.batch_size = 256  # global, over all hosts and devices
  config.log_every = 100
  config.checkpoint_every = 5_000
  config.sample_every = 20_000
  config.eval_every = 0  # > 0: FID etc. every this many steps (needs eval.reference and eval.inception_weights)
  # A NaN/inf loss or gradient: 'stop' with an error (no checkpoint of non-finite params is ever written), or
  # 'skip' that update and go on (the state is kept as it was before it).
  config.on_nonfinite = "stop"
  config.keep_checkpoints = 3
  config.init_from = ""  # e.g. the workdir of an MSE run ('mse'), to start from its params

  config.data = ml_collections.ConfigDict()
  config.data.name = "imagenet2012"
  config.data.split = "train"  # 'train' or 'validation'
  config.data.image_size = 256  # ADM centre crop to this size
  config.data.dir = ""  # TFDS data directory with imagenet2012 ('': $TFDS_DATA_DIR or ~/tensorflow_datasets)
  config.data.random_flip = True
  # grain worker processes per host that decode and crop the JPEGs; one CPU core does about 400 images/s
  # (BENCHMARKS.md, "Input pipeline"), far more than a host's share of the batch needs.
  config.data.num_workers = 8
  config.data.read_threads = 2  # threads per worker process, each building one batch at a time

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
  config.model.base_channels = 256
  config.model.channel_mult = (1, 1, 2, 2, 4, 4)
  config.model.num_res_blocks = 2
  config.model.attention_resolutions = (32, 16, 8)
  config.model.num_heads = 4  # unused while head_channels > 0
  config.model.head_channels = 64
  config.model.dropout = 0.0
  config.model.num_classes = 1000
  config.model.dtype = "bfloat16"
  config.model.remat = True
  # jax.nn.dot_product_attention's implementation: 'auto' (XLA picks; cuDNN flash attention on GPUs where shape
  # and dtype allow), 'xla', or 'cudnn' (fails where cuDNN cannot run it)
  config.model.attention = "auto"

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = "linear"
  config.diffusion.timesteps = 1000
  config.diffusion.zero_terminal_snr = True
  config.diffusion.prediction = "v"

  config.loss = ml_collections.ConfigDict()  # the diffusion MSE term
  config.loss.min_snr_gamma = 0.0
  config.loss.label_dropout = 0.1

  config.perceptual = ml_collections.ConfigDict()  # the self-perceptual term and its stop-gradient copy
  config.perceptual.weight = 1.0
  config.perceptual.start_step = 500_000
  config.perceptual.mse_weight = 0.0  # the paper: the feature distance alone after the MSE pre-training
  config.perceptual.ramp_steps = 0
  config.perceptual.copy_source = "ema"  # the released (EMA) MSE model, as in the paper
  config.perceptual.copy_ema_decay = 1.0  # frozen
  config.perceptual.share_with_sampling_ema = False
  config.perceptual.noise = "paper"
  config.perceptual.condition = "same"
  config.perceptual.taps = ("mid",)
  # Separate real and predicted passes: 3 instead of 4 encoder passes of FLOPs, and 15 % faster with 17 % less
  # memory on CPU (BENCHMARKS.md); the device benchmark (benchmarks/device.py) measures both on GPU/TPU.
  config.perceptual.fused = False
  config.perceptual.t_prime_min = 0.0
  config.perceptual.t_prime_max = 1.0

  config.sampling_ema = ml_collections.ConfigDict()
  config.sampling_ema.decay = 0.9999

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 1_000
  config.optimizer.decay = "constant"
  config.optimizer.weight_decay = 0.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.grad_clip = 1.0
  config.optimizer.accumulate_steps = 1  # e.g. 2 or 4 where batch 256 does not fit the slice (same update)

  config.sample = ml_collections.ConfigDict()
  config.sample.sampler = "ddim"
  config.sample.steps = 50
  config.sample.guidance_scale = 1.0
  config.sample.num_samples = 64  # over sample.classes: one grid row per class
  config.sample.guidance_rescale = 0.0  # phi of Lin et al. 2023 (e.g. 0.7 with guidance 7.5); 0: plain guidance
  config.sample.guidance_interval = (0.0, 1.0)  # guide only for t in [lo, hi]; the conditional output elsewhere
  config.sample.batch_size = 256  # samples drawn at once over all devices (a multiple of their count): a chunk of eval.num_samples
  config.sample.seed = 0
  config.sample.classes = CLASSES_SHOWN

  config.eval = ml_collections.ConfigDict()
  config.eval.num_samples = 50_000
  config.eval.features = "inception"
  config.eval.reference_split = "train"  # used by the digits only; ImageNet needs eval.reference
  config.eval.reference = ""  # e.g. ADM's VIRTUAL_imagenet256_labeled.npz
  config.eval.inception_weights = ""  # the FID Inception weights (.pth or the converted .npz)
  config.eval.save_samples = False  # True: also write the samples as eval/samples_step_<STEP>_<setting>.npz
  config.eval.seed = 1

  config.experiment = ml_collections.ConfigDict()  # python -m selfperc_jax.experiments: the paper's comparison
  config.experiment.branches = ("mse", "perceptual", "mse_perceptual")
  config.experiment.guidance_scales = (1.0, 1.25, 1.5, 2.0)
  config.experiment.guidance_rescale = 0.7

  config.profile = ml_collections.ConfigDict()  # a jax.profiler trace into workdir/profile (process 0)
  config.profile.start_step = 10  # the first traced step (after compilation)
  config.profile.steps = 0  # how many steps to trace; 0: no trace

  config.mesh = ml_collections.ConfigDict()
  if topology == "tpu":
    config.mesh.data = 1
    config.mesh.fsdp = -1  # every device holds 1/N of each large array
  else:
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.data.num_workers = 2  # launch/gpu_slurm.sh runs one process per GPU, eight per node
  config.mesh.fsdp_min_size = 1 << 16  # smaller arrays (norms, biases, the input conv) stay replicated

  if "mse" in args:
    config.perceptual.weight = 0.0
  return config
