"""--mode=sample and --mode=eval: sampling from, and scoring, the sampling EMA of a workdir's latest checkpoint (or,
for a Stable Diffusion config whose workdir has none yet, the model folder's weights)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections

from selfperc_jax import fileio, generate, resume, sharding
from selfperc_jax.errors import CheckpointError, ConfigError
from selfperc_jax.setup import Setup

PRETRAINED = "pretrained"  # the name of the model folder's weights in sample files (a checkpoint's is step_<STEP>)


def pretrained_params(setup: Setup):
  """The model folder's U-Net weights (config.pretrained), placed on the current mesh as the state's EMA is."""
  from selfperc_jax.models import sd

  params = sd.load_params(setup.config)
  return jax.tree.map(sharding.global_array, params, setup.state_sharding.ema_params)


def latest_sampling_params(setup: Setup, pretrained_fallback: bool = False):
  """(step, sampling-EMA params) of the workdir's latest checkpoint, placed on the current mesh. With
  `pretrained_fallback`, a Stable Diffusion config (model.arch='sd') whose workdir has no checkpoint yet gives
  (PRETRAINED, the model folder's weights)."""
  ckpt_dir = fileio.join(setup.workdir, "checkpoints")
  ckpt, latest = resume.open_latest(ckpt_dir, setup.config.trust_unverified_checkpoints)
  if latest is None and pretrained_fallback and setup.config.model.arch == "sd":
    return PRETRAINED, pretrained_params(setup)
  if ckpt is None:
    raise CheckpointError(f"{setup.workdir} has no checkpoints/ folder: train first (--mode=train) or fix --workdir.")
  if latest is None:
    raise CheckpointError(f"{ckpt_dir} holds no checkpoint: train first (--mode=train) or fix --workdir.")
  resume.check_compatible(ckpt, latest, setup.config, "the workdir's checkpoint")
  restored, _ = ckpt.restore(latest, {"ema_params": setup.abstract_state.ema_params}, partial=True)
  ckpt.close()
  if not bool(sharding.to_host(_all_finite(restored["ema_params"]))):
    raise CheckpointError(
        f"the sampling EMA of checkpoint {latest} in {ckpt_dir} holds NaN/inf: that run diverged before the step was "
        "saved. Sample from an earlier checkpoint (move this step's folder out of checkpoints/ to another place), "
        "and retrain from there with a lower optimizer.learning_rate.")
  return latest, restored["ema_params"]


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Scores the workdir's latest checkpoint (a Stable Diffusion config without one: its model folder's weights, as
  step 'pretrained'); the metrics go to workdir/eval/step_<STEP>.json under the setting (returned on process 0)."""
  from selfperc_jax import validation

  if config.condition == "text" and not validation.evaluates_text(config):
    raise ConfigError("--mode=eval of a text-to-image model scores its samples from sample.prompts / prompts_file "
                      "(e.g. --config.sample.prompts_file=captions_val2014.json) against --config.eval.reference "
                      "(real images' statistics: python -m selfperc_jax.evaluation.reference_stats) with "
                      "--config.eval.features=inception and eval.inception_weights; or, on the captioned digits, "
                      "one prompt per class.")
  setup = Setup(config, workdir, with_data=False)
  latest, params = latest_sampling_params(setup, pretrained_fallback=True)  # SD: the folder's own weights
  return setup.evaluator()(params, latest)


def sample_from_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Samples from the sampling EMA of the workdir's latest checkpoint with config.sample.* (a Stable Diffusion config
  without one: from its model folder); returns the PNG path (on process 0). Any number of samples: they are drawn
  chunk by chunk and streamed into the .npz. With text conditions a .json beside them lists the prompts (arr_1 of
  the .npz is each sample's index into them)."""
  setup = Setup(config, workdir, with_data=False)
  latest, params = latest_sampling_params(setup, pretrained_fallback=True)
  s = config.sample
  source = PRETRAINED if latest == PRETRAINED else f"step_{latest}"
  name = f"{source}_{generate.sampling_name(config)}_seed{s.seed}"
  # A name per setting, so that sampling never overwrites the training-time grids or another setting's samples.
  labels = generate.draw_labels(config)
  out_dir = fileio.join(setup.workdir, "samples")
  what = "the model folder" if latest == PRETRAINED else f"step {latest}"
  png = generate.write_samples(setup.generator(), params, out_dir, name, labels, s.seed,
                               progress_label=f"sampling from {what}")
  if png and config.condition == "text":
    from selfperc_jax import text

    fileio.write_text(fileio.join(out_dir, f"{name}.json"), json.dumps(
        {"prompts": list(text.prompts_of(config)), "negative_prompt": config.sample.negative_prompt,
         "prompt_of_sample": [int(i) for i in labels], "pretrained": str(config.pretrained)}, indent=1) + "\n")
  if png:
    print(f"samples: {png} and {png[:-4]}.npz ({len(labels)} samples)", flush=True)
  return png
