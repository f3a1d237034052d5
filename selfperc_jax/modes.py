"""--mode=sample and --mode=eval: sampling from, and scoring, the sampling EMA of a workdir's latest checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from selfperc_jax import fileio, generate, resume, sharding
from selfperc_jax.errors import CheckpointError
from selfperc_jax.setup import Setup


def latest_sampling_params(setup: Setup):
  """(step, sampling-EMA params) of the workdir's latest checkpoint, placed on the current mesh."""
  ckpt_dir = fileio.join(setup.workdir, "checkpoints")
  ckpt, latest = resume.open_latest(ckpt_dir, setup.config.trust_unverified_checkpoints)
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
  """Scores the workdir's latest checkpoint; the metrics go to workdir/eval/step_<STEP>.json under the setting
  (returned on process 0)."""
  setup = Setup(config, workdir, with_data=False)
  latest, params = latest_sampling_params(setup)
  return setup.evaluator()(params, latest)


def sample_from_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Samples from the sampling EMA of the workdir's latest checkpoint with config.sample.*; returns the PNG path
  (on process 0). Any number of samples: they are drawn chunk by chunk and streamed into the .npz."""
  setup = Setup(config, workdir, with_data=False)
  latest, params = latest_sampling_params(setup)
  s = config.sample
  name = f"step_{latest}_{generate.sampling_name(config)}"
  # A name per setting, so that sampling never overwrites the training-time grids or another setting's samples.
  labels = generate.draw_labels(config)
  png = generate.write_samples(setup.generator(), params, fileio.join(setup.workdir, "samples"), f"{name}_seed{s.seed}",
                               labels, s.seed, progress_label=f"sampling from step {latest}")
  if png:
    print(f"samples: {png} and {png[:-4]}.npz ({len(labels)} samples)", flush=True)
  return png
