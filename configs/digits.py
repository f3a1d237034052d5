"""Class-conditional diffusion on scikit-learn's 8x8 digits with the self-perceptual objective: the embedded default.

  python -m selfperc_jax.main --config=configs/digits.py --workdir=workdirs/digits
  python -m selfperc_jax.main --config=configs/digits.py:tiny --workdir=/tmp/tiny   # smoke-test size
  python -m selfperc_jax.main --config=configs/digits.py:mse --workdir=workdirs/digits_mse   # the MSE baseline

The default follows the paper's recipe in one run: plain MSE pre-training until `perceptual.start_step`, at which
point the perceptual copy is taken from the sampling EMA (the "released" MSE model) and frozen, and the online params
start again from that same EMA, then training on the self-perceptual feature distance alone
(`perceptual.mse_weight=0`), fine-tuned as `finetune.*` says (the same recipe as the comparison's branches). It is
the base config itself (selfperc_jax/config_base.py, where every key is documented); this file holds its variants.

Arguments: '' (default), 'tiny', 'mse' (MSE only), 'small' (half the channels, half the total steps: 600 + 600
instead of 1400 + 1000; a harder setting for the comparison, where the pre-trained model is further from converged),
'uncond' (unconditional: no class input, label dropout or guidance; samples are not class-balanced);
they combine with commas, e.g. 'tiny,mse'. The paper's whole comparison (MSE, MSE + guidance, self-perceptual, from
one pre-training) is one command:

  python -m selfperc_jax.experiments --config=configs/digits.py --workdir=workdirs/digits_comparison
"""

from selfperc_jax import config_base


def get_config(arg=None):
  args = set(filter(None, (arg or "").split(",")))
  unknown = args - {"tiny", "mse", "small", "uncond"}
  if unknown:
    raise ValueError(f"configs/digits.py: unknown argument(s) {sorted(unknown)}; use 'tiny' or 'small', 'mse', "
                     "'uncond', comma-separated, or nothing.")
  if {"tiny", "small"} <= args:
    raise ValueError("configs/digits.py: 'tiny' and 'small' are two sizes; give one of them.")

  config = config_base.get_config()
  if "tiny" in args:  # smoke-test size: every phase of the run in 100 small steps
    config.total_steps = 100
    config.batch_size = 32
    config.log_every = 10
    config.checkpoint_every = 50
    config.sample_every = 100
    config.model.base_channels = 16
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
  if "uncond" in args:  # unconditional: no class input, so nothing to drop for guidance and no guided rows
    config.condition = "none"
    config.loss.label_dropout = 0.0
    config.experiment.guidance_scales = (1.0,)
  return config
