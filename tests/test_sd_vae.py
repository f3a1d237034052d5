"""Stable Diffusion's VAE (third_party/sd_vae): numerical parity with diffusers' PyTorch AutoencoderKL, the layout
against diffusers' full-size state dict, the converter's checks and other accepted layouts, and the .safetensors
reader. Needs neither torch nor diffusers: what they computed is in third_party/sd_vae/parity/ (fixture.npz,
sd_layout.json), written by parity/make_fixture.py.

The parity network is a small AutoencoderKL of the real layout (widths 32 and 64, one ResNet per block, 8 groups);
its weights are rebuilt here from the fixture's key/shape list by the same seeded numpy rule the fixture script used.
"""

import json
import math
import pathlib
import re
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # third_party/ is not an installed package; `python -m pytest` has it on the path
  sys.path.insert(0, str(REPO))

from selfperc_jax.errors import UserError  # noqa: E402
from third_party.sd_vae import convert, model  # noqa: E402

from conftest import seeded_weights  # noqa: E402

PARITY = REPO / "third_party" / "sd_vae" / "parity"
# float32 parity with PyTorch's float32: measured max abs difference 4.6e-6 (outputs of magnitude ~2; PyTorch's own
# float32 result is 3.2e-6 from its float64 one). A GroupNorm eps of 1e-5 instead of 1e-6 moves the quiet inputs'
# results by 3e-3, a symmetric downsampling padding by far more.
ATOL = 2e-5

# --- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture():
  with np.load(PARITY / "fixture.npz") as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def tiny_config(fixture):
  cfg = json.loads(str(fixture["config_json"]))
  return model.VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


@pytest.fixture(scope="module")
def tiny_shapes(fixture):
  """{diffusers name: shape} of the small network, as diffusers built it (in its state-dict order)."""
  return {k: tuple(v) for k, v in json.loads(str(fixture["layout_json"])).items()}


@pytest.fixture(scope="module")
def sd_layout():
  return json.loads((PARITY / "sd_layout.json").read_text())


def _reference_weights(shapes, seed, latent_channels):
  """The fixture's weights (conftest.seeded_weights), with two log-variance biases of quant_conv pushed past the
  clipping (+40 and -45)."""
  out = seeded_weights(shapes, seed)
  out["quant_conv.bias"][latent_channels + 1] += np.float32(40.0)
  out["quant_conv.bias"][latent_channels + 2] += np.float32(-45.0)
  return out


@pytest.fixture(scope="module")
def weights(fixture, tiny_shapes, tiny_config):
  w = _reference_weights(tiny_shapes, int(fixture["seed"]), tiny_config.latent_channels)
  sums = np.array([w[k].astype(np.float64).sum() for k in sorted(w)])
  np.testing.assert_array_equal(sums, fixture["weight_sums"])  # the same weights as PyTorch had, bit for bit
  return w


@pytest.fixture(scope="module")
def variables(tmp_path_factory, weights, tiny_config):
  """The reference weights through a .safetensors file and the converter, as a user's weights would come."""
  path = tmp_path_factory.mktemp("vae") / "diffusion_pytorch_model.safetensors"
  convert.write_safetensors(path, weights, metadata={"format": "pt"})
  return convert.load_variables(str(path), config=tiny_config)


@pytest.fixture(scope="module")
def apply(tiny_config):
  vae = model.AutoencoderKL(tiny_config)
  return (jax.jit(lambda v, x: vae.apply(v, x, method="encode")),
          jax.jit(lambda v, z: vae.apply(v, z, method="decode")))


def _without_scale(config):
  return {k: v for k, v in vars(config).items() if k != "scaling_factor"}


def _max_diff(got, expected):
  got = np.asarray(got)
  assert got.shape == expected.shape and got.dtype == np.float32
  return float(np.abs(got - expected).max())


def _assert_same_tree(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for key in fa:
    np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=str(key))


def _to_ldm(name: str, levels: int) -> str:
  """diffusers' name -> the CompVis / LDM one, written independently of the converter (the inverse direction)."""
  name = name.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
  name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
  name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
  name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", name)
  name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", name)
  name = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
  for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
    name = name.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
  return name


def _ldm_state_dict(sd, levels, prefix="first_stage_model."):
  """The state dict as an original SD checkpoint holds it: LDM names under `prefix`, attention weights as 1x1
  convolutions, plus tensors of the other models of the checkpoint."""
  out = {}
  for name, value in sd.items():
    if ".attentions." in name and name.endswith(".weight") and len(np.shape(value)) == 2:
      value = np.reshape(value, tuple(np.shape(value)) + (1, 1))
    out[prefix + _to_ldm(name, levels)] = value
  if prefix:
    out["model.diffusion_model.out.2.bias"] = np.zeros(4, np.float32)
    out["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.zeros(8, np.float32)
  return out


def _old_attention_state_dict(sd):
  """diffusers' names before its attention refactor: query / key / value / proj_attn."""
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  return {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{old[m[1]]}.", k): v
          for k, v in sd.items()}


# --- parity with diffusers -------------------------------------------------------------------------------------------


# The fast subset keeps the quiet inputs (where a wrong GroupNorm eps shows) and the odd sizes.
@pytest.mark.parametrize("name", [pytest.param("x", marks=pytest.mark.slow), "x_odd", "x_quiet"])
def test_encode_matches_diffusers(fixture, variables, apply, name):
  encode, _ = apply
  mean, logvar = encode(variables, fixture[name])
  diffs = _max_diff(mean, fixture[f"{name}_mean"]), _max_diff(logvar, fixture[f"{name}_logvar"])
  print(f"\n{name}: max |mean - diffusers| = {diffs[0]:.2e}, max |logvar - diffusers| = {diffs[1]:.2e}")
  assert max(diffs) < ATOL
  # Latents are 1/2 of the size (one downsampling), floor for odd sizes; two logvar channels hit the clipping.
  h, w = fixture[name].shape[1:3]
  assert mean.shape == (fixture[name].shape[0], h // 2, w // 2, 4)
  logvar = np.asarray(logvar)
  assert np.all(logvar[..., 1] == 20.0) and np.all(logvar[..., 2] == -30.0)
  assert np.all(np.abs(logvar[..., [0, 3]]) < 15.0)


@pytest.mark.parametrize("latents,expected", [("x_mean", "x_decoded_mean"),
                                              pytest.param("z", "z_decoded", marks=pytest.mark.slow),
                                              ("z_quiet", "z_quiet_decoded")])
def test_decode_matches_diffusers(fixture, variables, apply, latents, expected):
  _, decode = apply
  diff = _max_diff(decode(variables, fixture[latents]), fixture[expected])
  print(f"\ndecode({latents}): max |images - diffusers| = {diff:.2e}")
  assert diff < ATOL


def test_call_shape_and_bf16_compute_stays_close(fixture, variables, tiny_config):
  recon = jax.eval_shape(model.AutoencoderKL(tiny_config).apply, variables, fixture["x_odd"])
  assert recon.shape == (1, 14, 12, 3) and recon.dtype == jnp.float32  # 15 x 13 -> latents 7 x 6 -> 14 x 12
  bf16 = model.AutoencoderKL(tiny_config, dtype=jnp.bfloat16, precision=None)
  mean, logvar = jax.jit(lambda v, x: bf16.apply(v, x, method="encode"))(variables, fixture["x"])
  assert mean.dtype == np.float32 and logvar.dtype == np.float32  # outputs are float32 whatever the compute dtype
  assert _max_diff(mean, fixture["x_mean"]) < 0.1


def test_sample_posterior_and_scaling_factors():
  mean, logvar = jnp.full((4000,), 0.5), jnp.full((4000,), math.log(4.0))
  z = np.asarray(jax.jit(model.sample_posterior)(jax.random.key(1), mean, logvar))
  assert z.shape == (4000,) and abs(z.mean() - 0.5) < 0.1 and abs(z.std() - 2.0) < 0.1  # std = exp(logvar / 2)
  assert model.scaling_factor("sd") == 0.18215 == model.SD.scaling_factor
  assert model.scaling_factor("sdxl") == 0.13025 == model.SDXL.scaling_factor
  assert _without_scale(model.SD) == _without_scale(model.SDXL)  # the same network
  with pytest.raises(model.VAEInputError, match="sdxl"):
    model.scaling_factor("sd3")


def test_wrong_inputs_are_refused(variables, tiny_config):
  vae = model.AutoencoderKL(tiny_config)
  for bad in (np.zeros((8, 8, 3), np.float32), np.zeros((1, 8, 8, 4), np.float32)):
    with pytest.raises(model.VAEInputError, match="NHWC"):
      vae.apply(variables, bad, method="encode")
  with pytest.raises(model.VAEInputError, match="floating point"):
    vae.apply(variables, np.zeros((1, 8, 8, 3), np.uint8), method="encode")
  with pytest.raises(model.VAEInputError, match="latents"):
    vae.apply(variables, np.zeros((1, 4, 4, 3), np.float32), method="decode")


# --- the layout ------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # the full-size network traced (abstract): the other layout tests cover the fast subset
def test_full_size_layout_is_diffusers(sd_layout):
  # Every name and shape of diffusers' SD VAE state dict (sd_layout.json), from the Flax model's own eval_shape.
  diffusers = {k: tuple(v) for k, v in sd_layout["shapes"].items()}
  assert convert.expected_shapes() == diffusers
  assert convert.expected_shapes(model.SDXL) == diffusers
  assert len(diffusers) == 248 == sd_layout["num_tensors"]
  params = sum(math.prod(s) for s in diffusers.values())
  assert params == 83_653_863 == sd_layout["num_parameters"]
  convert.check_shapes(diffusers)  # raises on any difference
  flax_shapes = jax.eval_shape(model.AutoencoderKL().init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(flax_shapes)) == params


def test_full_size_layout_in_other_names_is_accepted(sd_layout):
  shapes = {k: tuple(v) for k, v in sd_layout["shapes"].items()}
  zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}  # no memory behind them
  ldm = _ldm_state_dict(zeros, levels=4)
  assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm
  assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
  convert.check_shapes({k: v.shape for k, v in ldm.items()})
  convert.check_shapes({k: s for k, s in _old_attention_state_dict(shapes).items()})


def test_tiny_layout_is_diffusers(tiny_shapes, tiny_config):
  assert convert.expected_shapes(tiny_config) == tiny_shapes


def test_conversion_transposes_as_pytorch_lays_out(tiny_config, tiny_shapes):
  sd = {k: np.zeros(s, np.float32) for k, s in tiny_shapes.items()}
  sd["encoder.down_blocks.1.resnets.0.conv1.weight"][5, 7, 0, 2] = 1.0  # out 5, in 7, kh 0, kw 2
  sd["decoder.mid_block.attentions.0.to_q.weight"][3, 11] = 2.0  # out 3, in 11
  sd["decoder.up_blocks.1.resnets.0.norm1.weight"][9] = 3.0
  params = convert.convert(sd, config=tiny_config)["params"]
  kernel = params["encoder"]["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]
  assert kernel.shape == (3, 3, 32, 64) and kernel[0, 2, 7, 5] == 1.0 and kernel.sum() == 1.0
  assert params["decoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"][11, 3] == 2.0
  assert params["decoder"]["up_blocks_1"]["resnets_0"]["norm1"]["scale"][9] == 3.0


def test_ldm_and_old_attention_layouts_convert_to_the_same_variables(tmp_path, weights, variables, tiny_config):
  ldm = _ldm_state_dict(weights, levels=2)
  path = tmp_path / "sd-checkpoint.safetensors"
  convert.write_safetensors(path, ldm)
  _assert_same_tree(convert.load_variables(str(path), config=tiny_config), variables)
  _assert_same_tree(convert.convert(_ldm_state_dict(weights, levels=2, prefix=""), config=tiny_config), variables)
  _assert_same_tree(convert.convert(_old_attention_state_dict(weights), config=tiny_config), variables)
  # convert_to_safetensors writes diffusers' names and shapes, whatever it read.
  out = tmp_path / "out" / "vae.safetensors"
  convert.convert_to_safetensors(str(path), str(out), config=tiny_config)
  assert convert.safetensors_shapes(str(out)) == convert.expected_shapes(tiny_config)
  _assert_same_tree(convert.load_variables(str(out), config=tiny_config), variables)


# --- the converter's checks ------------------------------------------------------------------------------------------


def test_conversion_reports_every_problem_at_once(weights, tiny_config):
  sd = dict(weights)
  del sd["encoder.mid_block.attentions.0.to_k.bias"]
  sd["encoder.down_blocks.0.resnets.1.conv1.weight"] = np.zeros((32, 32, 3, 3), np.float32)  # layers_per_block 2?
  sd["decoder.up_blocks.0.resnets.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  sd["decoder.conv_out.bias"] = np.array([0.0, np.nan, 0.0], np.float32)
  sd["decoder.conv_in.bias"] = np.zeros(64, np.int64)
  with pytest.raises(convert.StateDictMismatchError) as info:
    convert.convert(sd, config=tiny_config)
  error = info.value
  assert isinstance(error, UserError)
  assert error.missing == ["encoder.mid_block.attentions.0.to_k.bias"]
  assert error.unexpected == ["encoder.down_blocks.0.resnets.1.conv1.weight"]
  assert error.mismatched == {"decoder.up_blocks.0.resnets.0.conv1.weight": ((64, 64, 1, 1), (64, 64, 3, 3))}
  assert error.non_finite == ["decoder.conv_out.bias"]
  assert error.not_float == ["decoder.conv_in.bias: dtype int64"]
  message = str(error)
  for text in ("missing keys (1)", "unexpected keys (1)", "wrong shapes (1)", "NaN or infinite", "not floating point",
               "(64, 64, 3, 3)", "README.md"):
    assert text in message, text


def test_full_size_check_names_each_problem(sd_layout):
  shapes = {k: tuple(v) for k, v in sd_layout["shapes"].items()}
  del shapes["decoder.up_blocks.3.resnets.2.norm2.bias"]
  shapes["decoder.up_blocks.3.upsamplers.0.conv.weight"] = (128, 128, 3, 3)  # the last up block has none
  shapes["encoder.conv_out.weight"] = (4, 512, 3, 3)  # double_z=False
  with pytest.raises(convert.StateDictMismatchError) as info:
    convert.check_shapes(shapes)
  error = info.value
  assert error.missing == ["decoder.up_blocks.3.resnets.2.norm2.bias"]
  assert error.unexpected == ["decoder.up_blocks.3.upsamplers.0.conv.weight"]
  assert error.mismatched == {"encoder.conv_out.weight": ((4, 512, 3, 3), (8, 512, 3, 3))}


def test_ldm_problems_are_named_as_in_the_file(weights, tiny_config):
  sd = _ldm_state_dict(weights, levels=2)
  sd["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"] = np.zeros((32, 64, 3, 3), np.float32)
  sd["first_stage_model.loss.logvar"] = np.zeros((), np.float32)
  with pytest.raises(convert.StateDictMismatchError) as info:
    convert.convert(sd, config=tiny_config)
  key = ("first_stage_model.decoder.up.0.block.0.nin_shortcut.weight "
         "(diffusers: decoder.up_blocks.1.resnets.0.conv_shortcut.weight)")
  assert info.value.mismatched == {key: ((32, 64, 3, 3), (32, 64, 1, 1))}
  assert info.value.unexpected == ["first_stage_model.loss.logvar (diffusers: loss.logvar)"]
  assert "ignore_prefixes=('first_stage_model.loss.',)" in str(info.value) and "LDM" in str(info.value)
  del sd["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"]
  with pytest.raises(convert.StateDictMismatchError, match="decoder.up_blocks.1.resnets.0.conv_shortcut.weight"):
    convert.convert(sd, config=tiny_config, ignore_prefixes=("first_stage_model.loss.",))


# --- files -----------------------------------------------------------------------------------------------------------


def test_safetensors_written_by_the_library_reads(tmp_path, fixture):
  path = tmp_path / "library.safetensors"
  path.write_bytes(fixture["safetensors_bytes"].tobytes())
  got = convert.read_safetensors(str(path))
  expected = json.loads(str(fixture["safetensors_json"]))
  assert set(got) == set(expected)
  for name, spec in expected.items():
    assert got[name].dtype == np.float32 and got[name].shape == tuple(spec["shape"]), name
    np.testing.assert_array_equal(got[name].ravel(), np.array(spec["values"], np.float32), err_msg=name)
  assert convert.read_safetensors(str(path), ["b.f16"]).keys() == {"b.f16"}


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_safetensors_round_trip(tmp_path, weights, tiny_config, dtype):
  path = tmp_path / f"vae_{dtype}.safetensors"
  convert.write_safetensors(path, weights, dtype=dtype)
  half = np.float16 if dtype == "F16" else ml_dtypes.bfloat16
  params = convert.load_variables(str(path), config=tiny_config)["params"]
  got = params["encoder"]["mid_block"]["attentions_0"]["to_v"]["kernel"]
  expected = weights["encoder.mid_block.attentions.0.to_v.weight"].astype(half).astype(np.float32).T
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, expected)
  special = {"s": np.array([1.0, -3.5, 65504.0, 1e-3, np.inf, -0.0, 1.00390625], np.float32)}
  convert.write_safetensors(path, special, dtype=dtype)
  np.testing.assert_array_equal(convert.read_safetensors(str(path))["s"],
                                special["s"].astype(half).astype(np.float32))


def test_checkpoint_pickle_reads_without_torch(tmp_path, fixture, tiny_config):
  # A torch.save'd {'state_dict': {...}, 'global_step': 10} (written by make_fixture.py with torch).
  path = tmp_path / "sd.ckpt"
  path.write_bytes(fixture["ckpt_bytes"].tobytes())
  sd = convert.load_state_dict(str(path))
  expected = {k[len("ckpt/"):]: v for k, v in fixture.items() if k.startswith("ckpt/")}
  assert set(sd) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(sd[key], np.float32), value, err_msg=key)
  assert sd["first_stage_model.encoder.norm_out.bias"].dtype == np.float16
  with pytest.raises(convert.StateDictMismatchError) as info:
    convert.convert(sd, config=tiny_config)  # a few tensors only: the rest is missing, but those few fit
  assert not info.value.unexpected and not info.value.mismatched
  assert "encoder.mid_block.attentions.0.to_q.weight" not in info.value.missing
  assert "encoder.conv_norm_out.bias" not in info.value.missing


def test_pickle_that_needs_torch_says_how_to_get_it(tmp_path, monkeypatch):
  from third_party import weights_io  # the torch-free .pth reader the converter uses

  path = tmp_path / "trainer.ckpt"  # a zip .ckpt whose pickle holds an object, not a state dict
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", b"\x80\x02cpytorch_lightning.callbacks\nModelCheckpoint\n)\x81.")
  monkeypatch.setattr(weights_io, "_import_torch", lambda: None)
  with pytest.raises(convert.TorchRequiredError) as info:
    convert.load_variables(str(path))
  message = str(info.value)
  assert isinstance(info.value, UserError)
  assert "pytorch_lightning.callbacks.ModelCheckpoint" in message and "pip install torch" in message
  assert "convert_to_safetensors" in message and "fid_inception" not in message


def test_npz_reads(tmp_path, weights, variables, tiny_config):
  path = tmp_path / "vae.npz"
  np.savez(path, **weights)
  _assert_same_tree(convert.load_variables(str(path), config=tiny_config), variables)


def test_missing_or_broken_file_is_a_user_error(tmp_path, weights):
  with pytest.raises(convert.WeightsError, match="README"):
    convert.load_variables(str(tmp_path / "diffusion_pytorch_model.safetensors"))
  path = tmp_path / "cut.safetensors"
  convert.write_safetensors(path, {"a": np.ones((4, 4), np.float32), "b": np.ones(3, np.float32)})
  data = path.read_bytes()
  path.write_bytes(data[:-5])
  with pytest.raises(convert.WeightsError, match="truncated or corrupt") as info:
    convert.read_safetensors(str(path))
  assert isinstance(info.value, UserError) and "b:" in str(info.value)
  path.write_bytes(b"\xff" * 16)
  with pytest.raises(convert.WeightsError, match="not a .safetensors"):
    convert.read_safetensors(str(path))
