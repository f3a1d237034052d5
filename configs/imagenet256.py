"""Class-conditional ImageNet 256x256 in pixel space with the self-perceptual objective: the pod-slice default.

  python -m selfperc_jax.main --config=configs/imagenet256.py --workdir=WORKDIR              # TPU pod slice ('tpu')
  python -m selfperc_jax.main --config=configs/imagenet256.py:gpu --workdir=WORKDIR          # one 8-GPU node
  python -m selfperc_jax.main --config=configs/imagenet256.py:tpu,mse --workdir=WORKDIR      # the MSE baseline

Arguments (comma-separated): the topology, 'tpu' (default) or 'gpu'; and 'mse' for MSE only (the paper's baseline,
which is also the pre-training run that `init_from` can start a self-perceptual run from). Every key not set here
is the base config's (selfperc_jax/config_base.py, where each key is documented).

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

from selfperc_jax import config_base

CLASSES_SHOWN = (88, 207, 279, 360, 387, 388, 417, 980)  # macaw, golden retriever, arctic fox, otter, red panda, ...


def get_config(arg=None):
  args = set(filter(None, (arg or "").split(",")))
  unknown = args - {"tpu", "gpu", "mse"}
  if unknown or {"tpu", "gpu"} <= args:
    raise ValueError(f"configs/imagenet256.py: bad argument {arg!r}; use 'tpu' (default) or 'gpu', optionally "
                     "with ',mse'.")

  config = config_base.get_config()
  config.total_steps = 1_000_000
  config.batch_size = 256
  config.checkpoint_every = 5_000
  config.sample_every = 20_000

  config.data.name = "imagenet2012"
  config.data.image_size = 256
  config.data.random_flip = True
  # Workers decode and crop the JPEGs, each a few hundred images per second (BENCHMARKS.md, "Input pipeline"):
  # eight give a host far more than its share of the batch needs.
  config.data.num_workers = 8

  # ADM's ImageNet-256 layout (see above); bfloat16 compute for speed, remat for memory.
  config.model.base_channels = 256
  config.model.channel_mult = (1, 1, 2, 2, 4, 4)
  config.model.num_res_blocks = 2
  config.model.attention_resolutions = (32, 16, 8)
  config.model.head_channels = 64
  config.model.num_classes = 1000
  config.model.dtype = "bfloat16"
  config.model.remat = True

  # DDPM's 1000-step table, rescaled to zero SNR at t = 1: the model learns to start from pure noise, as sampling does.
  config.diffusion.schedule = "linear"
  config.diffusion.timesteps = 1000
  config.diffusion.zero_terminal_snr = True

  config.perceptual.start_step = 500_000  # half of the run is the MSE pre-training
  config.sampling_ema.decay = 0.9999

  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 1_000
  config.optimizer.decay = "constant"
  config.optimizer.b2 = 0.999

  config.sample.num_samples = 64  # 8 of each class shown
  config.sample.batch_size = 256
  config.sample.classes = CLASSES_SHOWN
  config.eval.num_samples = 50_000  # FID-50k, the number ImageNet results are reported with
  config.eval.features = "inception"
  config.experiment.guidance_scales = (1.0, 1.25, 1.5, 2.0)

  if "gpu" in args:  # the base's mesh: plain data parallelism, params replicated
    config.data.num_workers = 2  # launch/gpu_slurm.sh runs one process per GPU, eight per node
  else:  # 'tpu': FSDP, every device holds 1/N of each large array
    config.mesh.data = 1
    config.mesh.fsdp = -1
  config.mesh.fsdp_min_size = 1 << 16  # smaller arrays (norms, biases, the input conv) stay replicated

  if "mse" in args:
    config.perceptual.weight = 0.0
  return config
