"""Class-conditional diffusion on scikit-learn's 8x8 digits with the self-perceptual objective: the embedded default.

  python -m selfperc_jax.main --config=configs/digits.py --workdir=workdirs/digits
  python -m selfperc_jax.main --config=configs/digits.py:tiny --workdir=/tmp/tiny   # smoke-test size
  python -m selfperc_jax.main --config=configs/digits.py:mse --workdir=workdirs/digits_mse   # the MSE baseline

The default follows the paper's recipe in one run: plain MSE pre-training until `perceptual.start_step`, at which
point the perceptual copy is taken from the sampling EMA (the "released" MSE model) and frozen, and the online params
start again from that same EMA, then training on the self-perceptual feature distance alone
(`perceptual.mse_weight=0`), fine-tuned as `finetune.*` says (the same recipe as the comparison's branches). It is
the base config itself (selfperc_jax/config_base.py, where every key is documented); this file holds its variants.

Since 2026-11-30 the default is a U-Net of base 24 channels with one residual block per level (427 k params), 1650
steps of MSE at a peak learning rate of 2e-3 and 350 self-perceptual steps: chosen by measurement (docs/results.md,
"Choosing the default") to sample as well as the default before it ('base32') in fewer and cheaper steps.

Arguments: '' (default), 'tiny', 'mse' (MSE only), 'small' (base 16, two blocks per level, 600 + 600 steps at 1e-3:
the harder setting of docs/results.md's second comparison, where the pre-trained model is far from converged),
'base32' (the default until 2026-11-30: base 32, two blocks per level, 1400 + 1000 steps at 1e-3; docs/results.md's
figures before that date), 'uncond' (unconditional: no class input, label dropout or guidance; samples are not
class-balanced), 'text' (captions instead of classes: each training digit is given one of five captions of its class,
"a handwritten seven", "the number 7", ..., through a small Stable Diffusion U-Net (models/sd.py, 'small') and the
built-in text encoder (text.py); grids and evaluation prompt "a handwritten <digit>", so the digits classifier's
class accuracy is the share of samples that show the asked digit; 1350 MSE + 250 self-perceptual steps at batch 64),
'study' (issue 25's study, docs/results.md "The study": 'small' over training seeds 0, 1, 2 with the MSE and
self-perceptual branches, the latter also with the 'rewarm' and 'gentle' fine-tuning recipes, unguided; with
'uncond' the unconditional study; each runs in about 35 minutes with python -m selfperc_jax.experiments);
they combine with commas, e.g. 'tiny,mse'. The paper's whole comparison (MSE, MSE + guidance,
self-perceptual, from one pre-training) is one command:

  python -m selfperc_jax.experiments --config=configs/digits.py --workdir=workdirs/digits_comparison
"""

from selfperc_jax import config_base


def get_config(arg=None):
  args = set(filter(None, (arg or "").split(",")))
  unknown = args - {"tiny", "mse", "small", "base32", "uncond", "text", "study"}
  if unknown:
    raise ValueError(f"configs/digits.py: unknown argument(s) {sorted(unknown)}; use 'tiny', 'small' or 'base32', "
                     "'mse', 'uncond' or 'text', 'study', comma-separated, or nothing.")
  if {"uncond", "text"} <= args:
    raise ValueError("configs/digits.py: 'uncond' and 'text' are different conditions; give one of them.")
  sizes = sorted(args & {"tiny", "small", "base32", "study"})
  if len(sizes) > 1:
    raise ValueError(f"configs/digits.py: {' and '.join(repr(a) for a in sizes)} are different sizes; give one of "
                     "them.")

  config = config_base.get_config()
  if "tiny" in args:  # smoke-test size: every phase of the run in 100 small steps
    config.total_steps = 100
    config.batch_size = 32
    config.log_every = 10
    config.checkpoint_every = 50
    config.sample_every = 100
    config.model.base_channels = 16
    config.model.channel_mult = (1,)  # one level (attention and the copy's mid-block at 8x8): every code path of
    config.model.attention_resolutions = (8,)  # the two-level U-Net, compiled in about 2/3 of its time
    config.model.num_res_blocks = 1
    config.model.num_heads = 2
    config.optimizer.warmup_steps = 10
    config.optimizer.learning_rate = 1e-3  # tiny's own, as before the default's 2e-3 (tests' checkpoints use it)
    config.perceptual.start_step = 50
    config.sample.steps = 10
    config.sample.num_samples = 20
    config.sample.batch_size = 32
    config.eval.num_samples = 50
  if "small" in args or "base32" in args:  # the recipes of the default before 2026-11-30 ('small': at half width)
    config.total_steps = 1200 if "small" in args else 2400
    config.perceptual.start_step = 600 if "small" in args else 1400
    config.sample_every = 1200
    config.model.base_channels = 16 if "small" in args else 32
    config.model.num_res_blocks = 2
    config.optimizer.learning_rate = 1e-3
  if "study" in args:  # issue 25's study (docs/results.md, "The study"): 'small' over three training seeds
    config.total_steps, config.perceptual.start_step = 1200, 600
    config.sample_every = 1200
    config.model.base_channels, config.model.num_res_blocks = 16, 2
    config.optimizer.learning_rate = 1e-3
    config.experiment.seeds = (0, 1, 2)
    config.experiment.branches = ("mse", "perceptual")
    config.experiment.guidance_scales = (1.0,)  # the paper's claim is about unguided samples
    # The fine-tuning recipes of the self-perceptual branch: the default (the paper's start: online params = copy =
    # the pre-trained EMA; Adam carried on; the learning rate warmed up again to the peak over a new cosine), the
    # recipe before issue 25 ('rewarm': online params from the pre-trained online params, Adam and the sampling EMA
    # started again) and a fine-tuning at a tenth of the peak, constant, with the sampling EMA carried ('gentle').
    config.experiment.variants = (
        "rewarm:finetune.online_start=online,finetune.optimizer_state=reset",
        "gentle:finetune.learning_rate=1e-4,finetune.decay=constant,finetune.sampling_ema=carry",
    )
  if "mse" in args:
    config.perceptual.weight = 0.0
  if "uncond" in args:  # unconditional: no class input, so nothing to drop for guidance and no guided rows
    config.condition = "none"
    config.loss.label_dropout = 0.0
    config.experiment.guidance_scales = (1.0,)
  if "text" in args:  # captions instead of classes, through a small SD U-Net (see the module's docstring)
    config.condition = "text"
    config.model.arch = "sd"
    config.model.sd_layout = "small"
    config.diffusion.timesteps = 1000  # the SD U-Net takes diffusers' integer timesteps
    if "tiny" in args:
      config.model.sd_layout = "tiny"  # one level: the smoke test's
    else:  # the recipe chosen by measurement: docs/results.md, "Text conditions"
      config.total_steps = 1600
      config.perceptual.start_step = 1350
      config.batch_size = 64  # the SD U-Net's step is dearer than the ADM one's (BENCHMARKS.md)
      config.sample_every = 800
  return config
