"""The experiment configs: every variant is valid and has the base's keys, each is what it was before the base
(tests/fixtures/configs_before.json), a new data set is one file, and what the docstrings promise (the parameter
count, the topologies) is what the configs build."""

import importlib.util
import json
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO, load_config, override
from selfperc_jax import config_base, config_tree, sharding, space, validation
from selfperc_jax.errors import ConfigError
from selfperc_jax.models import unet

VARIANTS = {"digits": ["", "tiny", "mse", "tiny,mse", "small", "small,mse", "base32", "base32,mse", "uncond", "text",
                       "text,tiny"],
            "imagenet256": ["", "tpu", "gpu", "tpu,mse", "gpu,mse"], "imagenet256_latent": ["", "gpu", "tpu,mse"]}


def _keys(config, prefix=""):
  out = set()
  for k, v in config.items():
    out |= _keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
  return out


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in VARIANTS.items() for a in args])
def test_every_variant_is_valid_and_has_the_base_keys(name, arg):
  config = load_config(name, arg)
  validation.validate(config)
  assert _keys(config) == _keys(config_base.get_config()), "a config adds no key: define it in config_base.py"


# tests/fixtures/record_configs.py: how the configs were recorded (tests/fixtures is not a package).
_spec = importlib.util.spec_from_file_location("record_configs", REPO / "tests" / "fixtures" / "record_configs.py")
record_configs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record_configs)
RECORDED = json.loads(record_configs.FIXTURE.read_text())


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in record_configs.ARGS.items() for a in args])
def test_configs_are_the_ones_recorded_before_the_base(name, arg):
  """Every key's value and type (a repr tells 1 from 1.0 and a tuple from a list), as configs/*.py built them when
  each wrote out all its keys; keys added since are the base's (checked above), each with the base's default (no
  config sets one yet)."""
  recorded = {**RECORDED["configs"][record_configs.name_arg(name, arg)],
              **CONFIGS_CHANGED_SINCE.get(record_configs.name_arg(name, arg), {})}
  now = record_configs.typed(record_configs.load(name, arg))
  assert {key: value for key, value in now.items() if key in recorded} == recorded
  base = record_configs.typed(config_base.get_config())
  added = {key: value for key, value in now.items() if key not in recorded}
  assert added == {key: base[key] for key in added}
  assert {"diffusion.zero_snr_anchor", "sample.timestep_spacing", "sample.steps_offset", "sample.final_step"} <= set(
      added)


# Values changed on purpose since the recording: the digits default's recipe (2026-11-30, docs/results.md, "Choosing
# the default"), which 'mse' builds on ('tiny' keeps its own size, steps and learning rate).
_NEW_DEFAULT = {"total_steps": "2000", "sample_every": "500", "model.base_channels": "24", "model.num_res_blocks": "1",
                "perceptual.start_step": "1650", "optimizer.learning_rate": "0.002"}
# 'tiny' as one level since 2026-12-01 (the smoke test and most tests: the same code paths, compiled faster).
_TINY = {"model.channel_mult": "(1,)", "model.attention_resolutions": "(8,)"}
CONFIGS_CHANGED_SINCE = {**{name: _NEW_DEFAULT for name in ("digits", "digits:", "digits:mse")},
                         **{name: _TINY for name in ("digits:tiny", "digits:tiny,mse")}}

# Errors whose wording changed on purpose since the recording: configs/digits.py gained the arguments 'uncond',
# 'base32' and 'text'.
ERRORS_CHANGED_SINCE = {
    **{f"digits:{arg}": f"configs/digits.py: unknown argument(s) ['{bad}']; use 'tiny', 'small' or 'base32', 'mse', "
                        "'uncond' or 'text', 'study', comma-separated, or nothing."
       for arg, bad in (("big", "big"), ("small,foo", "foo"))},
    "digits:tiny,small": "configs/digits.py: 'small' and 'tiny' are different sizes; give one of them."}


def test_bad_arguments_get_the_errors_recorded_before_the_base():
  for name, args in record_configs.BAD_ARGS.items():
    for arg in args:
      key = record_configs.name_arg(name, arg)
      assert record_configs.error(name, arg) == ERRORS_CHANGED_SINCE.get(key, RECORDED["errors"][key])


def test_the_unconditional_digits_config_passes_and_refuses_what_needs_a_class():
  config = load_config("digits", "uncond,tiny")
  validation.validate(config)
  assert config.condition == "none" and config.loss.label_dropout == 0
  for key, value, words in (("loss.label_dropout", 0.1, "to drop"), ("sample.guidance_scale", 2.0, "to guide with"),
                            ("experiment.guidance_scales", (1.0, 2.0), "set it to (1.0,)"),
                            ("sample.classes", (3,), "cannot be drawn")):
    bad = override(load_config("digits", "uncond"), **{key: value})
    with pytest.raises(ConfigError, match=rf"condition='none' \(unconditional\) has no class input.*{re.escape(words)}"):
      validation.validate(bad)
  with pytest.raises(ConfigError, match="condition='text'"):
    validation.validate(override(load_config("digits"), condition="text"))


def test_a_new_data_set_is_one_file_that_sets_what_differs(tmp_path, monkeypatch):
  """A config file outside configs/, loaded as main loads --config (config_flags) from its own folder."""
  (tmp_path / "digits16.py").write_text(textwrap.dedent("""\
      from selfperc_jax import config_base


      def get_config():
        config = config_base.get_config()
        config.data.image_size = 16
        config.model.channel_mult = (1, 2, 2)
        config.model.attention_resolutions = (8,)
        return config
      """))
  monkeypatch.chdir(tmp_path)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values)
  flag_values(["main", "--config=digits16.py"])
  config, base = flag_values.config, config_base.get_config()
  validation.validate(config)
  changed = {k for k in _keys(base) if config_tree.lookup(config, k) != config_tree.lookup(base, k)}
  assert changed == {"data.image_size", "model.channel_mult", "model.attention_resolutions"}


def test_imagenet256_defaults_to_the_pod_slice_and_rejects_unknown_arguments():
  assert load_config("imagenet256").to_dict() == load_config("imagenet256", "tpu").to_dict()
  assert load_config("imagenet256", "tpu,mse").perceptual.weight == 0.0
  for bad in ("v4", "tpu,gpu", "gpu,tiny"):
    with pytest.raises(ValueError, match="imagenet256.py"):
      load_config("imagenet256", bad)


def test_digits_small_halves_the_former_default_base32_and_rejects_unknown_arguments():
  base32, small = load_config("digits", "base32"), load_config("digits", "small")
  assert small.model.base_channels * 2 == base32.model.base_channels == 32
  assert small.total_steps * 2 == base32.total_steps == 2400
  assert 0 < small.perceptual.start_step < small.total_steps
  # 'base32' is the default before 2026-11-30 as recorded then, key for key.
  assert record_configs.typed(base32) == {**record_configs.typed(load_config("digits")),
                                          **RECORDED["configs"]["digits"]}
  for bad in ("big", "small,foo"):
    with pytest.raises(ValueError, match="unknown argument"):
      load_config("digits", bad)
  for both in ("tiny,small", "base32,small", "tiny,base32"):
    with pytest.raises(ValueError, match="are different sizes"):
      load_config("digits", both)


def test_topologies_shard_as_documented():
  """'tpu': FSDP over every device (a big kernel is split 8 ways on 8 devices); 'gpu': data parallel, replicated."""
  devices = jax.devices()
  tpu, gpu = load_config("imagenet256", "tpu"), load_config("imagenet256", "gpu")
  assert sharding.make_mesh(tpu.mesh, devices).shape == {"data": 1, "fsdp": len(devices)}
  assert sharding.make_mesh(gpu.mesh, devices).shape == {"data": len(devices), "fsdp": 1}
  kernel = (3, 3, 256, 512)  # split on its largest dimension
  assert sharding.param_spec(kernel, len(devices), tpu.mesh.fsdp_min_size) == jax.sharding.PartitionSpec(
      None, None, None, "fsdp")
  assert sharding.param_spec((256,), len(devices), tpu.mesh.fsdp_min_size) == jax.sharding.PartitionSpec()
  for config in (tpu, gpu):
    assert config.model.dtype == "bfloat16" and config.model.remat


@pytest.mark.slow
@pytest.mark.parametrize("name", ["imagenet256", "imagenet256_latent"])
def test_imagenet_parameter_count_is_the_one_in_its_docstring(name):
  config = load_config(name)
  doc = (REPO / "configs" / f"{name}.py").read_text()
  stated = int(re.search(r"([\d,]+) parameters", doc).group(1).replace(",", ""))
  shape = space.model_shape(config)
  model = unet.unet_from_config(config.model, out_channels=shape[-1])
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape), jnp.zeros((1,)),
                                             jnp.zeros((1,), jnp.int32)))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == stated


def test_the_latent_config_is_the_pixel_config_on_latents():
  pixels, latent = load_config("imagenet256", "gpu,mse"), load_config("imagenet256_latent", "gpu,mse")
  assert space.model_shape(latent) == (32, 32, 4) and space.image_shape(latent) == (256, 256, 3)
  assert latent.latent.vae == "sd" and not space.is_latent(pixels)
  changed = {k for k in _keys(pixels) if config_tree.lookup(pixels, k) != config_tree.lookup(latent, k)}
  assert changed == {"latent.vae", "model.channel_mult", "model.attention_resolutions"}
  with pytest.raises(ValueError, match="imagenet256_latent.py"):
    load_config("imagenet256_latent", "v4")


# diffusers' sampling settings (sample.timestep_spacing, .steps_offset, .final_step, diffusion.zero_snr_anchor): each
# bad value or combination is one ConfigError naming the key.
_DISCRETE = {"diffusion.timesteps": 1000}


@pytest.mark.parametrize("values,message", [
    ({"diffusion.zero_snr_anchor": "middle"}, "diffusion.zero_snr_anchor='middle' is not known"),
    ({"diffusion.zero_snr_anchor": "first_timestep"},
     "diffusion.zero_snr_anchor='first_timestep' rescales the discrete T-step table to zero terminal SNR: it needs "
     "diffusion.timesteps > 0 and diffusion.zero_terminal_snr=True (now 0 and False)"),
    ({"diffusion.zero_snr_anchor": "first_timestep", **_DISCRETE}, "(now 1000 and False)"),
    ({"diffusion.zero_snr_anchor": "first_timestep", "diffusion.zero_terminal_snr": True}, "(now 0 and True)"),
    ({"sample.timestep_spacing": "karras", **_DISCRETE}, "sample.timestep_spacing='karras' is not known"),
    ({"sample.final_step": "x0", **_DISCRETE}, "sample.final_step='x0' is not known"),
    ({"sample.steps_offset": -1}, "sample.steps_offset=-1 must be an integer >= 0"),
    ({"sample.timestep_spacing": "trailing"},
     "sample.timestep_spacing='trailing' needs a discrete schedule, diffusion.timesteps > 0"),
    ({"sample.final_step": "first_timestep"},
     "sample.final_step='first_timestep' needs a discrete schedule, diffusion.timesteps > 0"),
    # diffusers' trailing np.arange gives 62 timesteps for 61 steps; leading + steps_offset past T - 1.
    ({"sample.timestep_spacing": "trailing", "sample.steps": 61, **_DISCRETE}, "(62 of them) for sample.steps=61"),
    ({"sample.timestep_spacing": "leading", "sample.steps": 10, "sample.steps_offset": 101, **_DISCRETE},
     "for sample.steps=10 of 1000 (steps_offset=101): not 10 distinct timesteps"),
])
def test_bad_diffusers_sampling_settings_are_refused(values, message):
  config = config_tree.set_values(load_config("digits"), values)
  with pytest.raises(ConfigError, match=re.escape(message)):
    validation.validate(config)


def test_diffusers_sampling_settings_on_a_discrete_schedule_are_valid():
  for values in ({"sample.timestep_spacing": "trailing", "sample.final_step": "first_timestep", **_DISCRETE},
                 {"sample.timestep_spacing": "leading", "sample.steps_offset": 1, "sample.sampler": "dpmpp_2m",
                  **_DISCRETE},
                 {"diffusion.zero_snr_anchor": "first_timestep", "diffusion.zero_terminal_snr": True, **_DISCRETE},
                 {"sample.steps_offset": 1}):  # ignored by the project's grid (diffusers' too, but with 'leading')
    validation.validate(config_tree.set_values(load_config("digits"), values))
