"""Stable Diffusion's U-Net (third_party/sd_unet): numerical parity with diffusers' PyTorch UNet2DConditionModel, the
layout against diffusers' full-size SD 2.1 / SD 1.5 state dicts, the tap-only call, and the converter's checks. Needs
neither torch nor diffusers: what they computed is in third_party/sd_unet/parity/ (fixture.npz, sd_layouts.json),
written by parity/make_fixture.py.

The parity networks are two small UNet2DConditionModels of the real layouts: 'sd2' (linear transformer projections,
per-level head counts, three levels) and 'sd1' (1x1-conv projections, one head count, two ResNets per block); their
weights are rebuilt here from the fixture's key/shape lists by the same seeded numpy rule the fixture script used.
"""

import functools
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # third_party/ is not an installed package; `python -m pytest` has it on the path
  sys.path.insert(0, str(REPO))

from selfperc_jax.errors import UserError  # noqa: E402
from selfperc_jax.models import unet as project_unet  # noqa: E402
from third_party.sd_unet import convert, model  # noqa: E402

from conftest import parity_fixture, parity_weights  # noqa: E402

PARITY = REPO / "third_party" / "sd_unet" / "parity"
VARIANTS = ("sd2", "sd1")
# float32 parity with PyTorch's float32 (CPU, precision HIGHEST): measured max abs difference 2.5e-6 on the
# predictions (magnitude ~2) and 1.0e-5 on the taps (magnitude ~10); PyTorch's own float32 prediction is 1.7e-6 from
# its float64 one. The bound is relative to each output's largest magnitude.
RTOL = 2e-5
SD21_PARAMETERS = 865_910_724  # stabilityai/stable-diffusion-2-1(-base) unet, as diffusers builds it
SD15_PARAMETERS = 859_520_964

# --- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture():
  return parity_fixture(PARITY)


@pytest.fixture(scope="module")
def layouts():
  return json.loads((PARITY / "sd_layouts.json").read_text())


class Variant:
  """One parity network: its diffusers config, layout, weights, converted variables and the reference results."""

  def __init__(self, fixture, name, tmp_dir):
    self.name = name
    self.diffusers_config = json.loads(str(fixture[f"{name}/config_json"]))
    self.config = model.UNetConfig.from_diffusers_config(self.diffusers_config)
    self.shapes, self.weights = parity_weights(fixture, name)  # the same weights PyTorch had, bit for bit
    # As a user's weights would come: diffusers' unet/ folder, config.json beside the .safetensors.
    self.folder = tmp_dir
    (tmp_dir / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", "sample_size": 2,
         **self.diffusers_config}))
    self.path = tmp_dir / "diffusion_pytorch_model.safetensors"
    convert.write_safetensors(self.path, self.weights, metadata={"format": "pt"})
    self.variables = convert.load_variables(str(self.path))
    self.data = {k[len(name) + 1:]: v for k, v in fixture.items() if k.startswith(name + "/")}
    self.net = model.UNet2DConditionModel(self.config, precision="highest")

  def inputs(self, suffix=""):
    return self.data["x" + suffix], self.data["t" + suffix], self.data["context" + suffix]


@pytest.fixture(scope="module")
def variants(fixture, tmp_path_factory):
  return {name: Variant(fixture, name, tmp_path_factory.mktemp(name)) for name in VARIANTS}


@functools.lru_cache(maxsize=None)
def _forward(net):
  """The prediction and every tap's features from one jitted call (the taps through the 'intermediates' sown)."""

  def run(variables, x, t, context):
    out, state = net.apply(variables, x, t, context, mutable=["intermediates"])
    return out, {k: v[0] for k, v in state["intermediates"].items()}

  return jax.jit(run)


def _max_diff(got, expected):
  got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
  assert got.shape == expected.shape, (got.shape, expected.shape)
  return float(np.abs(got - expected).max())


def _assert_close(got, expected, what):
  scale = max(1.0, float(np.abs(expected).max()))
  diff = _max_diff(got, expected)
  assert diff <= RTOL * scale, f"{what}: max abs difference {diff:.3g} (> {RTOL} x {scale:.3g})"


# --- parity ----------------------------------------------------------------------------------------------------------


# The fast subset keeps one case, SD 1's convolutions at the odd 13x11 size with its forced upsampling sizes (SD 2's
# layout runs in the fast subset's tap test below); the other three are `slow`.
PARITY_CASES = [pytest.param(name, suffix, id=f"{size}-{name}",
                             marks=() if (name, suffix) == ("sd1", "_odd") else pytest.mark.slow)
                for suffix, size in (("", "16x16"), ("_odd", "13x11")) for name in VARIANTS]


@pytest.mark.parametrize("name, suffix", PARITY_CASES)
def test_parity_with_diffusers(variants, name, suffix):
  """Prediction and every tap (each level before its downsampler, the mid block) equal diffusers' float32 results;
  the 13x11 input has diffusers' forced upsampling sizes; t is 981 / 37, and 500.5 for the odd input."""
  v = variants[name]
  out, taps = _forward(v.net)(v.variables, *v.inputs(suffix))
  assert out.dtype == jnp.float32
  _assert_close(out, v.data["out" + suffix], f"{name}{suffix} prediction")
  assert set(taps) == set(model.tap_names(v.config.num_levels))
  for tap in taps:
    _assert_close(taps[tap], v.data[tap + suffix], f"{name}{suffix} tap {tap}")


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "sd2" else pytest.mark.slow) for n in VARIANTS])
def test_tap_call_returns_mid_block_and_skips_the_decoder(variants, name):
  v = variants[name]
  x, t, context = v.inputs()
  features = jax.jit(functools.partial(v.net.apply, taps=("mid",)))(v.variables, x, t, context)
  assert set(features) == {"mid"} and features["mid"].dtype == jnp.float32
  _assert_close(features["mid"], v.data["mid"], f"{name} mid tap")
  # The decoder is never built on a tap-only call: its parameters do not even exist there.
  for taps, absent in ((("mid",), ("up_blocks_0", "conv_out", "conv_norm_out")),
                       (("enc0",), ("mid_block", "down_blocks_1", "up_blocks_0"))):
    shapes = jax.eval_shape(functools.partial(v.net.init, taps=taps), jax.random.key(0), x, t, context)["params"]
    assert not set(absent) & set(shapes), (taps, sorted(shapes))
  enc0 = jax.eval_shape(functools.partial(v.net.init, taps=("enc0",)), jax.random.key(0), x, t, context)
  assert "downsamplers_0" not in enc0["params"]["down_blocks_0"]  # stops before level 0's downsampler


def test_tap_names_are_the_project_unets(variants):
  for levels in (1, 2, 4):
    assert model.tap_names(levels) == project_unet.tap_names(levels)
  v = variants["sd2"]
  with pytest.raises(model.UNetInputError, match="unknown taps"):
    v.net.apply(v.variables, *v.inputs(), taps=("dec0",))


# --- full-size layouts -----------------------------------------------------------------------------------------------


@pytest.mark.slow  # the full-size network traced (abstract): the small parity tests cover the fast subset
@pytest.mark.parametrize("name, config, count", [("sd21_base", model.SD2, SD21_PARAMETERS),
                                                 ("sd15", model.SD1, SD15_PARAMETERS)])
def test_full_size_layout_equals_diffusers(layouts, name, config, count):
  reference = {k: tuple(s) for k, s in layouts[name]["shapes"].items()}
  assert layouts[name]["num_parameters"] == count
  assert model.UNetConfig.from_diffusers_config(layouts[name]["config"]) == config
  assert convert.expected_shapes(config) == reference  # every name and shape; 686 tensors
  assert len(reference) == 686
  convert.check_shapes(reference, config=config)


@pytest.mark.slow  # the full-size network traced (abstract): the small parity tests cover the fast subset
def test_full_size_parameter_count_from_abstract_init():
  """jax.eval_shape of SD 2.1's U-Net (no memory is allocated): 865,910,724 parameters, all float32."""
  net = model.UNet2DConditionModel(model.SD2, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32)
  context = jax.ShapeDtypeStruct((1, 77, 1024), jnp.float32)
  shapes = jax.eval_shape(net.init, jax.random.key(0), x, jax.ShapeDtypeStruct((1,), jnp.float32), context)
  leaves = jax.tree_util.tree_leaves(shapes["params"])
  assert sum(math.prod(a.shape) for a in leaves) == SD21_PARAMETERS
  assert {a.dtype for a in leaves} == {jnp.dtype(jnp.float32)}
  assert convert.num_parameters(model.SD1) == SD15_PARAMETERS


def test_head_counts_follow_diffusers_attention_head_dim():
  """diffusers' attention_head_dim is the number of heads: SD 2.x [5, 10, 20, 20] (head dim 64), SD 1.x 8."""
  assert model.SD2.num_heads == (5, 10, 20, 20)
  assert [c // h for c, h in zip(model.SD2.block_out_channels, model.SD2.num_heads)] == [64] * 4
  assert model.SD1.num_heads == (8,) * 4
  with pytest.raises(model.UNetInputError, match="do not divide"):
    model.UNetConfig(attention_head_dim=(3, 10, 20, 20))


def test_unsupported_diffusers_config_is_named():
  with pytest.raises(model.UNetInputError, match="addition_embed_type") as info:
    model.UNetConfig.from_diffusers_config({"addition_embed_type": "text_time", "class_embed_type": None})
  assert isinstance(info.value, UserError)
  with pytest.raises(model.UNetInputError, match="unsupported block types"):
    model.UNetConfig.from_diffusers_config({"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D",
                                                                 "AttnDownBlock2D", "DownBlock2D"]})


# --- converter -------------------------------------------------------------------------------------------------------


def test_converted_layout(variants):
  """Flax paths nest as diffusers' names do; kernels are transposed, norms' weights become scales."""
  v = variants["sd1"]
  params = v.variables["params"]
  w = v.weights
  np.testing.assert_array_equal(params["time_embedding"]["linear_1"]["kernel"], w["time_embedding.linear_1.weight"].T)
  tb = params["down_blocks_0"]["attentions_1"]["transformer_blocks_0"]
  np.testing.assert_array_equal(tb["ff"]["net_0"]["proj"]["kernel"],
                                w["down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight"].T)
  np.testing.assert_array_equal(tb["attn2"]["to_out_0"]["bias"],
                                w["down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0.bias"])
  np.testing.assert_array_equal(tb["norm3"]["scale"], w["down_blocks.0.attentions.1.transformer_blocks.0.norm3.weight"])
  np.testing.assert_array_equal(params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"],  # SD 1.x: 1x1 conv
                                w["down_blocks.0.attentions.0.proj_in.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["up_blocks_0"]["upsamplers_0"]["conv"]["kernel"],
                                w["up_blocks.0.upsamplers.0.conv.weight"].transpose(2, 3, 1, 0))
  assert "bias" not in tb["attn1"]["to_q"]
  flat = traverse_util.flatten_dict(params)
  assert sum(a.size for a in flat.values()) == sum(a.size for a in w.values())


def test_half_precision_file_and_pipeline_prefix(variants, tmp_path):
  """An F16 file (the fp16 variant) reads as float32; a file of a whole pipeline keeps the 'unet.' tensors only."""
  v = variants["sd2"]
  path = tmp_path / "unet.fp16.safetensors"
  convert.write_safetensors(path, {**{f"unet.{k}": a for k, a in v.weights.items()},
                                   "text_encoder.foo.weight": np.ones((2, 2), np.float32)}, dtype="F16")
  got = convert.load_variables(str(path), config=v.config)
  for (key, a), b in zip(traverse_util.flatten_dict(got).items(), traverse_util.flatten_dict(v.variables).values()):
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=str(key))


def test_bad_state_dict_is_one_error_listing_everything(variants):
  v = variants["sd2"]
  broken = dict(v.weights)
  del broken["mid_block.attentions.0.proj_in.weight"]
  broken["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
  broken["up_blocks.9.resnets.0.conv1.bias"] = np.zeros(3, np.float32)
  broken["conv_out.bias"] = np.full(4, np.nan, np.float32)
  broken["time_embedding.linear_2.bias"] = broken["time_embedding.linear_2.bias"].astype(np.int32)
  with pytest.raises(convert.StateDictMismatchError) as info:
    convert.convert(broken, config=v.config)
  error, message = info.value, str(info.value)
  assert isinstance(error, UserError)
  assert error.missing == ["mid_block.attentions.0.proj_in.weight"]
  assert error.unexpected == ["up_blocks.9.resnets.0.conv1.bias"]
  assert list(error.mismatched) == ["conv_in.weight"] and error.non_finite == ["conv_out.bias"]
  assert "time_embedding.linear_2.bias: dtype int32" in message
  assert "README" in message


@pytest.mark.slow  # every variant of the layout traced: the parity tests cover the fast subset
def test_wrong_config_and_other_layouts_are_explained(variants):
  sd1 = variants["sd1"]
  with pytest.raises(convert.StateDictMismatchError, match="proj_in / proj_out shapes differ"):
    convert.convert(sd1.weights, config=dict(sd1.diffusers_config, use_linear_projection=True))
  compvis = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 4, 3, 3), np.float32)}
  with pytest.raises(convert.StateDictMismatchError, match="CompVis"):
    convert.convert(compvis)


def test_missing_or_broken_files_are_user_errors(variants, tmp_path):
  with pytest.raises(convert.WeightsError, match="README"):
    convert.load_variables(str(tmp_path / "diffusion_pytorch_model.safetensors"))
  path = tmp_path / "diffusion_pytorch_model.safetensors"
  path.write_bytes(variants["sd1"].path.read_bytes()[:-7])
  with pytest.raises(convert.WeightsError, match="truncated or corrupt"):
    convert.load_variables(str(path), config=variants["sd1"].config)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(convert.WeightsError, match="JSON"):
    convert.load_config(str(tmp_path / "config.json"))


def test_input_errors(variants):
  v = variants["sd2"]
  x, t, context = v.inputs()
  with pytest.raises(model.UNetInputError, match="context must be"):
    v.net.apply(v.variables, x, t, context[..., :5])
  with pytest.raises(model.UNetInputError, match="NHWC latents"):
    v.net.apply(v.variables, x[..., :3], t, context)
  with pytest.raises(model.UNetInputError, match="one timestep per example"):
    v.net.apply(v.variables, x, t[:1].repeat(3), context)


# --- compute dtype and remat (slow: a backward pass to compile) ------------------------------------------------------


@pytest.mark.slow
def test_bfloat16_and_scalar_timestep(variants):
  v = variants["sd2"]
  x, t, context = v.inputs()
  net = model.UNet2DConditionModel(v.config, dtype=jnp.bfloat16)
  out = jax.jit(net.apply)(v.variables, x, t, context)
  ref = v.data["out"]
  assert out.dtype == jnp.float32
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.05  # measured 0.015
  same_t = jax.jit(v.net.apply)(v.variables, x[:1], t[0], context[:1])
  _assert_close(same_t, ref[:1], "scalar timestep")


@pytest.mark.slow
def test_remat_gives_the_same_gradients(variants):
  v = variants["sd1"]
  x, t, context = v.inputs()

  def grads(remat):
    net = model.UNet2DConditionModel(v.config, precision="highest", remat=remat)
    return jax.jit(jax.grad(lambda p: jnp.sum(net.apply(p, x, t, context) ** 2)))(v.variables)

  plain, remat = grads(False), grads(True)
  for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))
  # A tap-only loss gives the decoder no gradient at all.
  net = model.UNet2DConditionModel(v.config)
  mid = jax.jit(jax.grad(lambda p: jnp.sum(net.apply(p, x, t, context, taps=("mid",))["mid"] ** 2)))(v.variables)
  assert "up_blocks_0" not in mid["params"] or all(
      not np.any(a) for a in jax.tree_util.tree_leaves(mid["params"]["up_blocks_0"]))
  assert np.any(jax.tree_util.tree_leaves(mid["params"]["mid_block"])[0])
