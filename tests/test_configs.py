"""The experiment configs: every variant is valid, all configs share one key set, and what the docstrings promise
(the parameter count, the topologies) is what the configs build."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_config
from selfperc_jax import config_tree, sharding, space, validation
from selfperc_jax.models import unet

VARIANTS = {"digits": ["", "tiny", "mse", "tiny,mse", "small", "small,mse"],
            "imagenet256": ["", "tpu", "gpu", "tpu,mse", "gpu,mse"], "imagenet256_latent": ["", "gpu", "tpu,mse"]}


def _keys(config, prefix=""):
  out = set()
  for k, v in config.items():
    out |= _keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
  return out


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in VARIANTS.items() for a in args])
def test_every_variant_is_valid_and_has_the_common_keys(name, arg):
  config = load_config(name, arg)
  validation.validate(config)
  assert _keys(config) == _keys(load_config("digits")), "configs must define the same keys (the code reads them all)"


def test_imagenet256_defaults_to_the_pod_slice_and_rejects_unknown_arguments():
  assert load_config("imagenet256").to_dict() == load_config("imagenet256", "tpu").to_dict()
  assert load_config("imagenet256", "tpu,mse").perceptual.weight == 0.0
  for bad in ("v4", "tpu,gpu", "gpu,tiny"):
    with pytest.raises(ValueError, match="imagenet256.py"):
      load_config("imagenet256", bad)


def test_digits_small_halves_width_and_steps_and_rejects_unknown_arguments():
  default, small = load_config("digits"), load_config("digits", "small")
  assert small.model.base_channels * 2 == default.model.base_channels
  assert small.total_steps * 2 == default.total_steps
  assert 0 < small.perceptual.start_step < small.total_steps
  for bad in ("big", "small,foo"):
    with pytest.raises(ValueError, match="unknown argument"):
      load_config("digits", bad)
  with pytest.raises(ValueError, match="two sizes"):
    load_config("digits", "tiny,small")


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
