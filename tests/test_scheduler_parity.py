"""Sampling parity with diffusers' DDIMScheduler and DPMSolverMultistepScheduler, and scheduler_config.json mapping.

The fixture (tests/fixtures/scheduler_parity/, written by its make_fixture.py with torch and diffusers, which this
test does not need) holds diffusers' trajectories of a deterministic analytic model from seeded latents, for the
paper's released SD 2.1-base fine-tunes' scheduler config (v-prediction, zero terminal SNR, trailing) and SD
2.1-base's own (epsilon, leading / linspace). Our samplers, with the settings that `scheduler_config` reads off the
same config file, must visit the same timesteps and give the same sample after every step.
"""

import json
import math
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfperc_jax import config_base, diffusion, samplers, scheduler_config
from selfperc_jax.errors import ConfigError

HERE = pathlib.Path(__file__).resolve().parent / "fixtures" / "scheduler_parity"
FIXTURE = np.load(HERE / "fixture.npz")
META = json.loads((HERE / "versions.json").read_text())
CASES = META["cases"]
T = 1000
SAMPLER = {"DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp_2m"}
TOL = 1e-4  # max |ours - diffusers'| / max |diffusers'| of each intermediate sample


def _config_file(name):
  return json.loads((HERE / name).read_text())


RELEASED = _config_file("released_zsnr_v_scheduler_config.json")
SD21_BASE = _config_file("sd21_base_scheduler_config.json")


def _model(x, k):
  """make_fixture.py's MODEL_FORMULA, with diffusers' integer timestep k."""
  return jnp.tanh(0.3 * x) * (k / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1)) + 0.1 * jnp.sin(x) - 0.05


def _settings(case):
  """The project's settings of a case: read off its config file (with the case's from_config overrides) by
  scheduler_config, exactly as a user's config would be checked."""
  c = CASES[case]
  file = dict(_config_file(c["config"]), **c["overrides"])
  return scheduler_config.settings_from_scheduler_config(file, SAMPLER[c["scheduler"]], source=c["config"])


def _schedule(settings):
  return diffusion.Schedule(settings["diffusion.schedule"], settings["diffusion.timesteps"],
                            settings["diffusion.zero_terminal_snr"], settings["diffusion.zero_snr_anchor"])


def _run(case, **overrides):
  """Our trajectory of a case (x_T, the sample before each later step, the final one) and the diffusers timesteps
  our model calls correspond to (t = (k + 1) / T, so k = round(t T) - 1)."""
  settings = dict(_settings(case), **overrides)
  x_T = FIXTURE["x_T"]
  calls = []

  def denoise(x, t, y):
    k = jnp.round(t * T) - 1
    jax.debug.callback(lambda x, k: calls.append((np.asarray(x), np.asarray(k))), x, k, ordered=True)
    return _model(x, k)

  x = samplers.sample(denoise, _schedule(settings), settings["diffusion.prediction"], jax.random.key(0),
                      jnp.zeros((x_T.shape[0],), jnp.int32), x_T.shape[1:], sampler=SAMPLER[CASES[case]["scheduler"]],
                      num_steps=CASES[case]["steps"], clip_x0=False,  # latents: space.clips_x0 is False
                      timestep_spacing=settings.get("sample.timestep_spacing", "project"),
                      steps_offset=settings.get("sample.steps_offset", 0),
                      final_step=settings.get("sample.final_step", "clean"), initial_noise=x_T)
  trajectory = np.stack([x for x, _ in calls] + [np.asarray(x)])
  timesteps = [int(k[0]) for _, k in calls]
  assert all(np.all(k == k[0]) for _, k in calls)
  return trajectory, timesteps


def _relative_errors(trajectory, reference):
  axes = tuple(range(1, reference.ndim))
  return np.abs(trajectory - reference).max(axis=axes) / np.abs(reference).max(axis=axes)


# ----------------------------------------------------------------------------------------------------------------
# The fixture and the noise tables
# ----------------------------------------------------------------------------------------------------------------


def test_fixture_is_what_make_fixture_writes():
  assert META["diffusers"] and META["torch"]
  assert FIXTURE["x_T"].shape == tuple(META["shape"]) and FIXTURE["x_T"].dtype == np.float32
  for case, c in CASES.items():
    x = FIXTURE[f"{case}/x"]
    assert x.shape == (c["steps"] + 1,) + tuple(META["shape"]), case
    np.testing.assert_array_equal(x[0], FIXTURE["x_T"])
    np.testing.assert_array_equal(FIXTURE[f"{case}/model_timesteps"], FIXTURE[f"{case}/timesteps"])


@pytest.mark.parametrize("name,file", [("released_zsnr_v", RELEASED), ("sd21_base", SD21_BASE)])
def test_diffusers_timestep_k_is_our_t_k_plus_1_over_T(name, file):
  """diffusers' alphas_cumprod[k] (float32 torch) is our table at t = (k + 1) / T, exactly in float64 and through
  the float32 interpolation of alpha_sigma."""
  reference = FIXTURE[f"alphas_cumprod/{name}"].astype(np.float64)
  schedule = _schedule(scheduler_config.settings_from_scheduler_config(file))
  table = schedule.alpha_bar_table()
  assert table.shape == (T + 1,) and table[0] == 1.0
  np.testing.assert_allclose(table[1:], reference, rtol=1e-4, atol=1e-12)  # measured: 3.8e-5 (zsnr), 9.3e-7
  alpha, sigma = schedule.alpha_sigma(jnp.asarray((np.arange(T) + 1) / T, jnp.float32))
  np.testing.assert_allclose(np.asarray(alpha, np.float64), np.sqrt(reference), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sigma, np.float64), np.sqrt(1 - reference), rtol=1e-4)
  # One step off would be far off: neighbouring entries differ by much more than the tolerance.
  assert np.min(np.abs(table[:T - 1] - reference[:T - 1]) / reference[:T - 1]) > 5e-4  # table[k]: t = k / T


def test_zero_snr_anchor_first_timestep_is_diffusers_rescale():
  """diffusers rescales the T-step table keeping alphas_cumprod[0]; the project's own rescale keeps alpha(0) = 1, so
  its sigma at t = 1/T is 3.6 % larger (0.0302 vs 0.0292), and the two agree at t = 1 (alpha = 0)."""
  reference = FIXTURE["alphas_cumprod/released_zsnr_v"].astype(np.float64)
  ours = diffusion.Schedule("scaled_linear", T, True, "first_timestep")
  clean = diffusion.Schedule("scaled_linear", T, True)
  sigma_ref = math.sqrt(1 - reference[0])
  assert float(ours.alpha_sigma(1 / T)[1]) == pytest.approx(sigma_ref, rel=1e-4)
  assert float(clean.alpha_sigma(1 / T)[1]) / sigma_ref - 1 > 0.03
  for schedule in (ours, clean):
    assert float(schedule.alpha_sigma(1.0)[0]) == 0.0 and float(schedule.alpha_sigma(0.0)[0]) == 1.0
  assert reference[-1] == 0.0 and ours.alpha_bar_table()[-1] == 0.0
  # The project's default is unchanged, and the anchor is a field of the (hashable) schedule.
  assert diffusion.Schedule("scaled_linear", T, True) == diffusion.Schedule("scaled_linear", T, True, "clean")
  assert len({ours, clean}) == 2


def test_zero_snr_anchor_is_checked():
  with pytest.raises(ValueError, match="zero_snr_anchor='middle' is not known"):
    diffusion.Schedule("scaled_linear", T, True, "middle")
  for schedule_args in (("scaled_linear", 0, True), ("scaled_linear", T, False)):
    with pytest.raises(ValueError, match="needs a discrete schedule"):
      diffusion.Schedule(*schedule_args, zero_snr_anchor="first_timestep")
  with pytest.raises(ValueError, match="no table"):
    diffusion.Schedule("cosine", 0).alpha_bar_table()


def test_schedule_from_config_reads_the_anchor():
  cfg = types.SimpleNamespace(schedule="scaled_linear", timesteps=1000, zero_terminal_snr=True)
  assert diffusion.schedule_from_config(cfg).zero_snr_anchor == "clean"  # a config without the key
  cfg.zero_snr_anchor = "first_timestep"
  assert diffusion.schedule_from_config(cfg) == diffusion.Schedule("scaled_linear", T, True, "first_timestep")
  assert diffusion.schedule_from_config(config_base.get_config().diffusion) == diffusion.Schedule("cosine", 0)


# ----------------------------------------------------------------------------------------------------------------
# Timesteps and trajectories
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_timesteps_visited_are_diffusers(case):
  settings = _settings(case)
  k = samplers.diffusers_timesteps(SAMPLER[CASES[case]["scheduler"]], CASES[case]["steps"], T,
                                   settings["sample.timestep_spacing"], settings.get("sample.steps_offset", 0))
  np.testing.assert_array_equal(k, FIXTURE[f"{case}/timesteps"])
  plan = samplers.make_plan(CASES[case]["steps"], _schedule(settings), SAMPLER[CASES[case]["scheduler"]],
                            settings["sample.timestep_spacing"], settings.get("sample.steps_offset", 0),
                            settings["sample.final_step"])
  np.testing.assert_array_equal(np.round(np.asarray(plan.t, np.float64) * T).astype(int) - 1, k)


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_diffusers(case):
  """Every intermediate sample, not only the last, within TOL of diffusers' (measured: 2e-7 ... 2.3e-6), and the
  model called at the same timesteps."""
  reference = FIXTURE[f"{case}/x"]
  trajectory, timesteps = _run(case)
  assert timesteps == FIXTURE[f"{case}/model_timesteps"].tolist()
  assert trajectory.shape == reference.shape
  errors = _relative_errors(trajectory, reference)
  assert errors.max() < TOL, errors


@pytest.mark.parametrize("case,overrides,at_least", [
    # the project's own zero-SNR rescale (alpha(0) = 1 kept): off by 1.6e-4
    ("ddim_zsnr_v_trailing_25", {"diffusion.zero_snr_anchor": "clean"}, 1e-4),
    # the last DDIM step to the clean image instead of alphas_cumprod[0] (set_alpha_to_one=False): 5e-3
    ("ddim_zsnr_v_trailing_25", {"sample.final_step": "clean"}, 1e-3),
    # 7 steps: the project's grid steps to the next visited timestep, diffusers' DDIM to k - T // N: 2.4e-3
    ("ddim_zsnr_v_trailing_7", {"sample.timestep_spacing": "project"}, 1e-3),
    # DPM-Solver without diffusers' alphas_cumprod[-1] = 2**-24 (the project's grid is the same here): 5.2e-4
    ("dpm_zsnr_v_trailing_10", {"sample.timestep_spacing": "project"}, 1e-4),
    # sigma_min: the last step second order from 15 steps on, and to alphas_cumprod[0]
    ("dpm_zsnr_v_trailing_sigma_min_20", {"sample.final_step": "clean"}, 1e-3),
])
def test_each_diffusers_rule_matters(case, overrides, at_least):
  """Each rule that `make_plan` and the schedule take from diffusers changes the result by more than TOL: the
  parity above is not a loose tolerance."""
  trajectory, _ = _run(case, **overrides)
  assert _relative_errors(trajectory, FIXTURE[f"{case}/x"]).max() > at_least


def test_sigma_min_last_step_is_second_order_only_from_15_steps():
  schedule = diffusion.Schedule("scaled_linear", T, True, "first_timestep")
  for n, last in ((14, False), (15, True)):
    plan = samplers.make_plan(n, schedule, "dpmpp_2m", "trailing", final_step="first_timestep")
    assert np.asarray(plan.second_order).tolist() == [False] + [True] * (n - 2) + [last]
    plan = samplers.make_plan(n, schedule, "dpmpp_2m", "trailing", final_step="clean")
    assert np.asarray(plan.second_order).tolist() == [False] + [True] * (n - 2) + [False]


def test_project_plan_is_the_time_grid():
  schedule = diffusion.Schedule("scaled_linear", T, True)
  grid = np.asarray(samplers.time_grid(7, schedule))
  plan = samplers.make_plan(7, schedule, "dpmpp_2m")
  np.testing.assert_array_equal(np.asarray(plan.t), grid[:-1])
  np.testing.assert_array_equal(np.asarray(plan.t_next), grid[1:])
  alpha, sigma = schedule.alpha_sigma(jnp.asarray(grid))
  np.testing.assert_array_equal(np.asarray(plan.alpha_next), np.asarray(alpha)[1:])
  np.testing.assert_array_equal(np.asarray(plan.sigma), np.asarray(sigma)[:-1])
  assert np.asarray(plan.second_order).tolist() == [False] + [True] * 5 + [False]
  first = samplers.make_plan(7, schedule, "ddim", final_step="first_timestep")
  assert float(first.t_next[-1]) == pytest.approx(1 / T)


def test_plan_arguments_are_checked():
  discrete, continuous = diffusion.Schedule("scaled_linear", T), diffusion.Schedule("cosine", 0)
  with pytest.raises(ValueError, match="timestep_spacing='karras' is not known"):
    samplers.make_plan(10, discrete, "ddim", "karras")
  with pytest.raises(ValueError, match="final_step='x0' is not known"):
    samplers.make_plan(10, discrete, "ddim", "trailing", final_step="x0")
  for kwargs in ({"timestep_spacing": "trailing"}, {"final_step": "first_timestep"}):
    with pytest.raises(ValueError, match="need a discrete schedule"):
      samplers.make_plan(10, continuous, "ddim", **kwargs)
  # diffusers' trailing np.arange gives 62 timesteps for 61 steps (its floating-point artefact): refused.
  with pytest.raises(ValueError, match=r"\(62 of them\) for sample.steps=61"):
    samplers.diffusers_timesteps("ddim", 61, T, "trailing")
  with pytest.raises(ValueError, match="not 1000 distinct"):  # DPM's leading step ratio T // (N + 1) is 0
    samplers.diffusers_timesteps("dpmpp_2m", 1000, T, "leading")
  with pytest.raises(ValueError, match="initial_noise has the shape"):
    samplers.sample(lambda x, t, y: x, discrete, "v", jax.random.key(0), jnp.zeros((2,), jnp.int32), (3,),
                    initial_noise=jnp.zeros((2, 4)))


# ----------------------------------------------------------------------------------------------------------------
# scheduler_config.json -> settings
# ----------------------------------------------------------------------------------------------------------------

RELEASED_DIFFUSION = {"diffusion.schedule": "scaled_linear", "diffusion.timesteps": 1000, "diffusion.prediction": "v",
                      "diffusion.zero_terminal_snr": True, "diffusion.zero_snr_anchor": "first_timestep"}
SD21_DIFFUSION = {"diffusion.schedule": "scaled_linear", "diffusion.timesteps": 1000, "diffusion.prediction": "eps",
                  "diffusion.zero_terminal_snr": False, "diffusion.zero_snr_anchor": "clean"}


def test_released_models_settings():
  """The paper's released models (perceptual and MSE twin share the scheduler config): DDIM as the config says,
  DPM-Solver++(2M) as DPMSolverMultistepScheduler.from_config(it) with its defaults (final_sigmas_type 'zero')."""
  read = scheduler_config.settings_from_scheduler_config
  assert read(RELEASED, "ddim") == dict(RELEASED_DIFFUSION, **{
      "sample.timestep_spacing": "trailing", "sample.final_step": "first_timestep"})
  assert read(RELEASED, "dpmpp_2m") == dict(RELEASED_DIFFUSION, **{
      "sample.timestep_spacing": "trailing", "sample.final_step": "clean"})
  for sampler in (None, "heun", "ddpm"):  # no diffusers counterpart: the diffusion settings alone
    assert read(RELEASED, sampler) == RELEASED_DIFFUSION


def test_sd21_base_settings():
  """SD 2.1-base's own file has no timestep_spacing: DDIM's default is 'leading' (steps_offset 1 counts), DPM's
  'linspace'; with an explicit 'leading' both lead."""
  read = scheduler_config.settings_from_scheduler_config
  assert read(SD21_BASE, "ddim") == dict(SD21_DIFFUSION, **{
      "sample.timestep_spacing": "leading", "sample.steps_offset": 1, "sample.final_step": "first_timestep"})
  assert read(SD21_BASE, "dpmpp_2m") == dict(SD21_DIFFUSION, **{
      "sample.timestep_spacing": "linspace", "sample.final_step": "clean"})
  leading = dict(SD21_BASE, timestep_spacing="leading")
  assert read(leading, "dpmpp_2m")["sample.timestep_spacing"] == "leading"
  assert read(leading, "dpmpp_2m")["sample.steps_offset"] == 1
  assert read(SD21_BASE) == SD21_DIFFUSION


def test_cosine_and_defaults():
  read = scheduler_config.settings_from_scheduler_config
  cosine = read({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 4000, "beta_start": 0.5})
  assert cosine["diffusion.schedule"] == "cosine" and cosine["diffusion.timesteps"] == 4000  # betas unused
  # An empty file is diffusers' defaults: linear 1e-4 .. 2e-2 over 1000, epsilon; DDIM clips x0 by default.
  assert read({}) == {"diffusion.schedule": "linear", "diffusion.timesteps": 1000, "diffusion.prediction": "eps",
                      "diffusion.zero_terminal_snr": False, "diffusion.zero_snr_anchor": "clean"}
  with pytest.raises(ConfigError, match="clip_sample=True is not supported"):
    read({}, "ddim")
  assert read({}, "dpmpp_2m")["sample.timestep_spacing"] == "linspace"


@pytest.mark.parametrize("changes,sampler,key", [
    ({"beta_schedule": "sigmoid"}, None, "beta_schedule='sigmoid'"),
    ({"trained_betas": [0.1, 0.2]}, None, "trained_betas="),
    ({"beta_start": 0.0001}, None, "beta_start=0.0001"),
    ({"beta_end": 0.02}, None, "beta_end=0.02"),
    ({"num_train_timesteps": 500}, None, "num_train_timesteps=500"),
    ({"num_train_timesteps": "1000"}, None, "num_train_timesteps='1000'"),
    ({"prediction_type": "flow_prediction"}, None, "prediction_type='flow_prediction'"),
    ({"thresholding": True}, None, "thresholding=True"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, None, "_class_name='FlowMatchEulerDiscreteScheduler'"),
    ({"timestep_spacing": "karras"}, "ddim", "timestep_spacing='karras'"),
    ({"clip_sample": True}, "ddim", "clip_sample=True"),
    ({"algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m", "algorithm_type='sde-dpmsolver++'"),
    ({"solver_order": 3}, "dpmpp_2m", "solver_order=3"),
    ({"solver_type": "heun"}, "dpmpp_2m", "solver_type='heun'"),
    ({"use_karras_sigmas": True}, "dpmpp_2m", "use_karras_sigmas=True"),
    ({"euler_at_final": True}, "dpmpp_2m", "euler_at_final=True"),
    ({"final_sigmas_type": "denoise_to_zero"}, "dpmpp_2m", "final_sigmas_type='denoise_to_zero'"),
    ({"lambda_min_clipped": -5.1}, "dpmpp_2m", "lambda_min_clipped=-5.1"),
])
def test_unsupported_values_are_errors_naming_file_and_key(changes, sampler, key):
  source = "models/x/scheduler/scheduler_config.json"
  with pytest.raises(ConfigError) as info:
    scheduler_config.settings_from_scheduler_config(dict(RELEASED, **changes), sampler, source=source)
  lines = str(info.value).splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{source}: {key}") and "not supported" in lines[0], lines


def test_every_problem_is_reported_at_once():
  bad = dict(RELEASED, beta_schedule="sigmoid", prediction_type="flow_prediction", clip_sample=True)
  with pytest.raises(ConfigError) as info:
    scheduler_config.settings_from_scheduler_config(bad, "ddim", source="s.json")
  assert len(str(info.value).splitlines()) == 3


def test_read_scheduler_config(tmp_path):
  good = tmp_path / "scheduler_config.json"
  good.write_text(json.dumps(RELEASED))
  assert scheduler_config.read_scheduler_config(good) == RELEASED
  bad = tmp_path / "broken.json"
  bad.write_text("[1, 2]")
  with pytest.raises(ConfigError, match="broken.json: not a JSON object"):
    scheduler_config.read_scheduler_config(bad)
  with pytest.raises(ConfigError, match="missing.json: cannot read"):
    scheduler_config.read_scheduler_config(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------------------------
# A config checked against a scheduler config
# ----------------------------------------------------------------------------------------------------------------


def _config(sampler="ddim", **values):
  """The base config in SD's latent space with the released models' settings; `values` (dotted keys, also keys
  config_base lacks) on top."""
  config = config_base.get_config()
  config.sample.sampler = sampler
  config.latent.vae = "sd"
  settings = scheduler_config.settings_from_scheduler_config(RELEASED, sampler)
  settings.update(values)
  with config.unlocked():
    for key, value in settings.items():
      section, leaf = key.split(".")
      config[section][leaf] = value
  return config


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_agreeing_config_has_no_errors(sampler):
  assert scheduler_config.check_config(_config(sampler), RELEASED) == []


def test_each_disagreement_is_one_line_naming_both_values():
  source = "models/x/scheduler/scheduler_config.json"
  lines = scheduler_config.check_config(_config(**{"diffusion.prediction": "eps"}), RELEASED, source)
  assert lines == [f"diffusion.prediction='eps' but {source} says prediction_type='v_prediction'; set "
                   "diffusion.prediction='v' to match it."]
  lines = scheduler_config.check_config(
      _config(**{"sample.final_step": "clean", "sample.timestep_spacing": "leading",
                 "diffusion.zero_snr_anchor": "clean", "diffusion.timesteps": 0}), RELEASED, source)
  assert len(lines) == 4
  assert any(line.startswith("sample.final_step='clean' but") and "set_alpha_to_one=False" in line for line in lines)
  assert any(line.startswith("sample.timestep_spacing='leading' but") and "'trailing'" in line for line in lines)
  assert any(line.startswith("diffusion.zero_snr_anchor='clean'") and "rescale_betas_zero_snr=True" in line
             for line in lines)
  assert any(line.startswith("diffusion.timesteps=0") and "num_train_timesteps=1000" in line for line in lines)
  # A default that the file leaves out is named as the scheduler's default.
  lines = scheduler_config.check_config(_config("dpmpp_2m", **{"sample.timestep_spacing": "trailing"}), SD21_BASE)
  assert any("no timestep_spacing (so DPMSolverMultistepScheduler's default 'linspace')" in line for line in lines)


def test_keys_the_config_lacks_count_as_the_code_behaves_without_them():
  """The base config (pixel space, which clips x0) against the released config: every setting that differs is
  named; the same for a config without the keys added for diffusers' settings (one of before them), whose missing
  keys count as the code's behaviour."""
  config = config_base.get_config()
  config.sample.sampler = "ddim"
  expected = sorted(["diffusion.schedule", "diffusion.timesteps", "diffusion.zero_terminal_snr",
                     "diffusion.zero_snr_anchor", "sample.timestep_spacing", "sample.final_step", "latent.vae"])
  lines = scheduler_config.check_config(config, RELEASED, "s.json")
  assert sorted(line.split("=")[0] for line in lines) == expected
  assert "latent.vae='' (pixel space: x0 is clipped to [-1, 1]) but s.json says clip_sample=False" in "\n".join(lines)
  older = config.to_dict()
  for key in scheduler_config.CONFIG_DEFAULTS:
    section, leaf = key.split(".")
    del older[section][leaf]
  del older["latent"]
  assert scheduler_config.check_config(older, RELEASED, "s.json") == lines
  dpm = scheduler_config.check_config(dict(older, sample=dict(older["sample"], sampler="dpmpp_2m")), RELEASED, "s.json")
  assert "s.json says no thresholding (so DPMSolverMultistepScheduler's default False)" in dpm[-1]


def test_samplers_without_counterpart_check_the_diffusion_settings_only():
  config = _config("ddim", **{"sample.timestep_spacing": "project"})
  config.sample.sampler = "heun"
  assert scheduler_config.check_config(config, RELEASED) == []
  config.diffusion.prediction = "x0"
  assert len(scheduler_config.check_config(config, RELEASED)) == 1


def test_check_config_reports_unsupported_values_as_lines():
  lines = scheduler_config.check_config(_config(), dict(RELEASED, beta_schedule="sigmoid"), "s.json")
  assert lines[0].startswith("s.json: beta_schedule='sigmoid' is not supported")
  assert all("diffusion.schedule" not in line for line in lines)


def test_nested_dict_configs_work_too():
  config = _config().to_dict()
  assert isinstance(config, dict) and scheduler_config.check_config(config, RELEASED) == []
  config["diffusion"]["zero_terminal_snr"] = False
  assert len(scheduler_config.check_config(config, RELEASED)) == 1
