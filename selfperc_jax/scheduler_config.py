"""diffusers' scheduler/scheduler_config.json read into this project's diffusion and sampler settings, and a config
checked against it: a model trained with diffusers (Stable Diffusion and its fine-tunes) is sampled here as it is
there only with these settings (tests/test_scheduler_parity.py checks the trajectories against diffusers').

Pure functions of plain dicts (the JSON object) and the config; nothing here reads a model folder but
`read_scheduler_config`. Written from diffusers 0.42.1's DDIMScheduler and DPMSolverMultistepScheduler:
`<Scheduler>.from_config(file)` takes the file's keys that the scheduler knows and its own defaults for the rest, so a
key the file leaves out means that default of the scheduler the sampler stands for (DEFAULTS_DDIM, DEFAULTS_DPM).

  settings_from_scheduler_config(file_dict, sampler) -> {"diffusion.schedule": ..., "sample.final_step": ..., ...}
  check_config(config, file_dict) -> one line per disagreement or unsupported value (empty: they agree)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from selfperc_jax import config_tree, space
from selfperc_jax.errors import ConfigError

# diffusers' prediction_type -> diffusion.prediction
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# diffusers' beta_schedule -> (diffusion.schedule, (beta_start, beta_end) this project's table uses, or None: unused).
# squaredcos_cap_v2 is improved DDPM's cosine table with beta clipped at 0.999 (diffusers' betas_for_alpha_bar), the
# same as diffusion.py's discrete 'cosine' for any T.
BETA_SCHEDULES = {"linear": ("linear", (1e-4, 2e-2)), "scaled_linear": ("scaled_linear", (0.00085, 0.012)),
                  "squaredcos_cap_v2": ("cosine", None)}
# The samplers with a diffusers counterpart whose steps samplers.make_plan reproduces.
SCHEDULER_OF_SAMPLER = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}

# diffusers 0.42.1's __init__ defaults of the keys read here (what from_config uses for a key the file leaves out).
_DEFAULTS_COMMON = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "steps_offset": 0,
    "thresholding": False,
}
DEFAULTS_DDIM = dict(_DEFAULTS_COMMON, clip_sample=True, set_alpha_to_one=True, timestep_spacing="leading")
DEFAULTS_DPM = dict(
    _DEFAULTS_COMMON, timestep_spacing="linspace", algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
    final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None, use_dynamic_shifting=False)
# DPMSolverMultistepScheduler settings that samplers' dpmpp_2m is (any other value has no counterpart here).
_DPM_REQUIRED = {
    "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True,
    "euler_at_final": False, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "use_lu_lambdas": False, "use_flow_sigmas": False, "variance_type": None, "use_dynamic_shifting": False,
}

# What the code does where a config lacks one of these keys (a config, e.g. a checkpoint's, older than them): the
# project's own behaviour, config_base's defaults.
CONFIG_DEFAULTS = {
    "diffusion.zero_snr_anchor": "clean", "sample.timestep_spacing": "project", "sample.steps_offset": 0,
    "sample.final_step": "clean",
}


def read_scheduler_config(path) -> dict:
  """The JSON object of a scheduler_config.json (a ConfigError naming the file if it is not one)."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: cannot read diffusers' scheduler config ({e}).") from e
  if not isinstance(value, dict):
    raise ConfigError(f"{path}: not a JSON object (diffusers' scheduler_config.json is one).")
  return value


def _setting(scheduler_config: Mapping, key: str, defaults: Mapping, scheduler: str):
  """(value, how the file gives it) of a diffusers key: the file's value, or the scheduler's default."""
  if key in scheduler_config:
    return scheduler_config[key], f"{key}={scheduler_config[key]!r}"
  return defaults[key], f"no {key} (so {scheduler}'s default {defaults[key]!r})"


def _read(scheduler_config: Mapping, sampler: str | None, source: str):
  """({dotted config key: (value, what in the file says so)}, [problem lines], what in the file says that x0 is not
  clipped, or None). Clipping is no config key: space.clips_x0 decides it (pixels yes, latents no)."""
  problems = []
  scheduler = SCHEDULER_OF_SAMPLER.get(sampler)
  defaults = DEFAULTS_DPM if scheduler == "DPMSolverMultistepScheduler" else DEFAULTS_DDIM
  get = lambda key: _setting(scheduler_config, key, defaults, scheduler or "diffusers")
  out = {}
  unsupported = lambda key, value, why: problems.append(
      f"{source}: {key}={value!r} is not supported here: {why}.")

  class_name = scheduler_config.get("_class_name", "")
  if isinstance(class_name, str) and class_name.startswith("FlowMatch"):
    unsupported("_class_name", class_name, "a flow-matching scheduler (rectified flow), not a DDPM noise table")

  trained_betas, _ = get("trained_betas")
  if trained_betas is not None:
    unsupported("trained_betas", "[...]", "only the beta_schedule formulas (linear, scaled_linear, "
                "squaredcos_cap_v2) are implemented")

  steps, steps_from = get("num_train_timesteps")
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
    unsupported("num_train_timesteps", steps, "it must be a positive integer")
  else:
    out["diffusion.timesteps"] = (steps, steps_from)

  beta_schedule, schedule_from = get("beta_schedule")
  if beta_schedule not in BETA_SCHEDULES:
    unsupported("beta_schedule", beta_schedule, f"this project has {tuple(BETA_SCHEDULES)} (as 'linear', "
                "'scaled_linear', 'cosine')")
  else:
    name, betas = BETA_SCHEDULES[beta_schedule]
    out["diffusion.schedule"] = (name, schedule_from)
    if betas is not None:
      for key, ours in zip(("beta_start", "beta_end"), betas):
        value, _ = get(key)
        if not isinstance(value, (int, float)) or not math.isclose(value, ours, rel_tol=1e-6):
          unsupported(key, value, f"this project's {beta_schedule} table has {key}={ours}")
      if isinstance(steps, int) and steps != 1000:
        unsupported("num_train_timesteps", steps, f"with beta_schedule={beta_schedule!r} this project scales beta "
                    "by 1000 / T (diffusers does not), so only T = 1000 is the same table")

  prediction, prediction_from = get("prediction_type")
  if prediction not in PREDICTIONS:
    unsupported("prediction_type", prediction, f"this project has {tuple(PREDICTIONS)}")
  else:
    out["diffusion.prediction"] = (PREDICTIONS[prediction], prediction_from)

  rescale, rescale_from = get("rescale_betas_zero_snr")
  out["diffusion.zero_terminal_snr"] = (bool(rescale), rescale_from)
  # diffusers rescales the T-step table keeping alphas_cumprod[0] (Lin et al.'s Algorithm 1 on the table).
  out["diffusion.zero_snr_anchor"] = ("first_timestep" if rescale else "clean", rescale_from)

  thresholding, thresholding_from = get("thresholding")
  if thresholding:
    unsupported("thresholding", thresholding, "dynamic thresholding is not implemented (and unsuitable for latents)")

  if scheduler is None:
    return out, problems, None

  spacing, spacing_from = get("timestep_spacing")
  if spacing not in ("trailing", "leading", "linspace"):
    unsupported("timestep_spacing", spacing, "diffusers' spacings are 'trailing', 'leading', 'linspace'")
  else:
    out["sample.timestep_spacing"] = (spacing, spacing_from)
    if spacing == "leading":  # the only spacing whose timesteps steps_offset moves
      offset, offset_from = get("steps_offset")
      out["sample.steps_offset"] = (int(offset), offset_from)

  if scheduler == "DDIMScheduler":
    alpha_to_one, alpha_from = get("set_alpha_to_one")
    out["sample.final_step"] = ("clean" if alpha_to_one else "first_timestep", alpha_from)
    clip, clip_from = get("clip_sample")
    unclipped = None if clip or thresholding else clip_from
    if clip:
      unsupported("clip_sample", clip, "diffusers' DDIM clips x0 alone, while this project clips in pixel space "
                  "only (space.clips_x0), where it also re-derives eps and clips the result; no latent-space model "
                  "wants either")
  else:
    for key, required in _DPM_REQUIRED.items():
      value, _ = get(key)
      if value != required:
        unsupported(key, value, f"sample.sampler='dpmpp_2m' is DPMSolverMultistepScheduler with {key}={required!r}")
    clipped, _ = get("lambda_min_clipped")
    if clipped is not None and not (isinstance(clipped, (int, float)) and clipped == -math.inf):
      unsupported("lambda_min_clipped", clipped, "only -inf (no clipping of the last timesteps) is implemented")
    final, final_from = get("final_sigmas_type")
    if final not in ("zero", "sigma_min"):
      unsupported("final_sigmas_type", final, "diffusers' values are 'zero' and 'sigma_min'")
    else:
      out["sample.final_step"] = ("clean" if final == "zero" else "first_timestep", final_from)
    unclipped = None if thresholding else thresholding_from  # DPMSolverMultistepScheduler clips x0 only with it
  return out, problems, unclipped


def settings_from_scheduler_config(scheduler_config: Mapping, sampler: str | None = None,
                                   source: str = "scheduler_config.json") -> dict[str, Any]:
  """The project's settings of a diffusers scheduler config, as {dotted config key: value}.

  diffusion.schedule, .timesteps, .prediction, .zero_terminal_snr, .zero_snr_anchor always; with sampler 'ddim' or
  'dpmpp_2m' (read as DDIMScheduler / DPMSolverMultistepScheduler.from_config(file) would, with that scheduler's
  defaults) also sample.timestep_spacing, sample.steps_offset (with 'leading' only) and sample.final_step. Other
  samplers have no diffusers counterpart: no sample.* keys. Raises one ConfigError with a line per unsupported value,
  each naming `source` and the key. Such a scheduler does not clip x0 (clip_sample=True is unsupported): that is the
  latent space's sampling (space.clips_x0), which check_config checks.
  """
  settings, problems, _ = _read(scheduler_config, sampler, source)
  if problems:
    raise ConfigError("\n".join(problems))
  return {key: value for key, (value, _) in settings.items()}


def check_config(config, scheduler_config: Mapping, source: str = "scheduler_config.json") -> list[str]:
  """One line per value of `config` (a ConfigDict or nested dict) that disagrees with the scheduler config, naming
  both values and the fix, after one line per unsupported value of the file; empty when they agree. The sample.*
  settings are checked for config.sample.sampler 'ddim' and 'dpmpp_2m' only, and with them that the config's space
  does not clip x0 (space.clips_x0: a pixel-space config does). A key the config lacks counts as CONFIG_DEFAULTS
  says (what the code does without it)."""
  sampler = config_tree.lookup(config, "sample.sampler")
  settings, lines, unclipped = _read(scheduler_config, sampler if sampler in SCHEDULER_OF_SAMPLER else None, source)
  for key, (expected, reason) in settings.items():
    value = config_tree.lookup(config, key)
    if value is None:
      value = CONFIG_DEFAULTS.get(key)
    same = (value == expected) and (isinstance(value, bool) == isinstance(expected, bool))
    if not same:
      lines.append(f"{key}={value!r} but {source} says {reason}; set {key}={expected!r} to match it.")
  if unclipped is not None and space.clips_x0(config):
    vae = config_tree.lookup(config, "latent.vae") or ""
    lines.append(f"latent.vae={vae!r} (pixel space: x0 is clipped to [-1, 1]) but {source} says {unclipped} (x0 "
                 "not clipped, as latents are); set latent.vae to the model's VAE ('sd' or 'sdxl') to match it.")
  return lines
