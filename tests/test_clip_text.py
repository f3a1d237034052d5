"""The CLIP text encoder (third_party/clip_text): numerical parity with transformers' PyTorch CLIPTextModel, the layout
against the full-size SD 2.x / SD 1.x text encoders, and the converter's checks. Needs neither torch nor transformers:
what they computed is in third_party/clip_text/parity/ (fixture.npz, sd_layouts.json), written by
parity/make_fixture.py.

The parity networks are two small CLIPTextModels: 'sd1' (quick_gelu, eos_token_id 2: pooled at the argmax of the ids)
and 'sd2' (gelu, eos_token_id 49: pooled at the first EOS); their weights are rebuilt here from the fixture's
key/shape lists by conftest's seeded rule, the one the fixture script used.
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
from third_party.clip_text import convert, model  # noqa: E402

from conftest import parity_fixture, parity_weights  # noqa: E402

PARITY = REPO / "third_party" / "clip_text" / "parity"
VARIANTS = ("sd1", "sd2")
# float32 parity with PyTorch's float32 (CPU, precision HIGHEST): measured max abs difference <= 2.3e-6 on outputs of
# magnitude ~2.5-4; PyTorch's own float32 last_hidden_state is 1.2e-6 / 1.5e-6 from its float64 one. The bound is
# relative to each output's largest magnitude (LayerNorm eps 1e-6 instead of 1e-5 moves last_hidden_state by 4e-4,
# the other activation by 0.04, tanh-GELU by 1.4e-3: all caught).
RTOL = 2e-5
SD2_PARAMETERS = 340_387_840  # SD 2.x's OpenCLIP ViT-H/14 text tower as stored (23 layers), as transformers builds it
SD1_PARAMETERS = 123_060_480  # SD 1.x's CLIP ViT-L/14 text tower
OUTPUTS = ("last_hidden_state", "pooler_output", "hidden_state_1", "clip_skip_1", "short_last_hidden_state",
           "short_masked_last_hidden_state")


@pytest.fixture(scope="module")
def fixture():
  return parity_fixture(PARITY)


@pytest.fixture(scope="module")
def layouts():
  return json.loads((PARITY / "sd_layouts.json").read_text())


class Variant:
  """One parity network: its transformers config, layout, weights, converted variables and the reference results."""

  def __init__(self, fixture, name, tmp_dir):
    self.name = name
    self.transformers_config = json.loads(str(fixture[f"{name}/config_json"]))
    self.config = model.CLIPTextConfig.from_transformers_config(self.transformers_config)
    self.shapes, self.weights = parity_weights(fixture, name)  # the same weights PyTorch had, bit for bit
    # As a user's weights would come: a diffusers text_encoder/ folder, config.json beside the .safetensors, the names
    # under 'text_model.' and the int64 position_ids buffer as transformers 4.x wrote them.
    (tmp_dir / "config.json").write_text(json.dumps({**self.transformers_config, "transformers_version": "4.25.0",
                                                     "projection_dim": 512, "torch_dtype": "float32"}))
    self.path = tmp_dir / "model.safetensors"
    published = {f"text_model.{k}": a for k, a in self.weights.items()}
    published["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    convert.write_safetensors(self.path, published, metadata={"format": "pt"})
    self.variables = convert.load_variables(str(self.path))
    self.data = {k[len(name) + 1:]: v for k, v in fixture.items() if k.startswith(name + "/")}
    self.net = model.CLIPTextModel(self.config, precision="highest")


@pytest.fixture(scope="module")
def variants(fixture, tmp_path_factory):
  return {name: Variant(fixture, name, tmp_path_factory.mktemp(name)) for name in VARIANTS}


@functools.lru_cache(maxsize=None)
def _forward(net, **kwargs):
  return jax.jit(functools.partial(net.apply, **kwargs))


def _outputs(v, net=None):
  """Every output the fixture holds, from the Flax model."""
  net = net or v.net
  out = _forward(net, output_hidden_states=True)(v.variables, v.data["ids"])
  return {
      "last_hidden_state": out.last_hidden_state,
      "pooler_output": out.pooler_output,
      "hidden_state_1": out.hidden_states[1],
      "clip_skip_1": _forward(net, clip_skip=1)(v.variables, v.data["ids"]).last_hidden_state,
      "short_last_hidden_state": _forward(net)(v.variables, v.data["short_ids"]).last_hidden_state,
      "short_masked_last_hidden_state": _forward(net)(v.variables, v.data["short_ids"],
                                                      v.data["short_mask"]).last_hidden_state,
  }


def _max_diff(got, expected):
  got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
  assert got.shape == expected.shape, (got.shape, expected.shape)
  return float(np.abs(got - expected).max())


def _assert_close(got, expected, what):
  scale = max(1.0, float(np.abs(expected).max()))
  diff = _max_diff(got, expected)
  assert diff <= RTOL * scale, f"{what}: max abs difference {diff:.3g} (> {RTOL} x {scale:.3g})"


# --- parity ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_parity_with_transformers(variants, name):
  """last_hidden_state (SD's conditioning), the pooled EOS row, the first layer's hidden state, diffusers' clip_skip=1
  conditioning, and short ids with and without an attention mask equal transformers' float32 results."""
  v = variants[name]
  got = _outputs(v)
  for key in OUTPUTS:
    assert got[key].dtype == jnp.float32
    _assert_close(got[key], v.data[key], f"{name} {key}")
  # The fixture tells the masked and unmasked short runs apart (else the mask would be untested).
  assert _max_diff(v.data["short_masked_last_hidden_state"], v.data["short_last_hidden_state"]) > 1e-2


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "sd2" else pytest.mark.slow) for n in VARIANTS])
def test_is_causal_equals_an_explicit_mask(variants, name):  # one layout in the fast subset: the attention is shared
  """jax.nn.dot_product_attention(is_causal=True) and an explicit lower-triangular mask give the same result (CPU)."""
  v = variants[name]
  explicit = _outputs(v, model.CLIPTextModel(v.config, precision="highest", explicit_causal_mask=True))
  flag = _outputs(v)
  for key in OUTPUTS:
    assert _max_diff(explicit[key], flag[key]) <= 1e-6, key
  # Causal: changing a later token leaves the earlier positions as they were.
  ids = np.array(v.data["ids"])
  ids[:, 40] = 7
  changed = _forward(v.net)(v.variables, ids).last_hidden_state
  np.testing.assert_array_equal(changed[:, :40], flag["last_hidden_state"][:, :40])
  assert _max_diff(changed[:, 40:], flag["last_hidden_state"][:, 40:]) > 1e-2


def test_pooling_rules(variants):
  """eos_token_id 2 (SD's configs): the row at the argmax of the ids; any other value: the first EOS. The 'sd2'
  fixture has ids above its EOS (49) before it, so there the two rules pick different rows."""
  for name in VARIANTS:
    v = variants[name]
    ids, last = v.data["ids"], v.data["last_hidden_state"]
    rows = np.arange(len(ids))
    argmax_rule, first_eos_rule = last[rows, ids.argmax(-1)], last[rows, (ids == v.config.eos_token_id).argmax(-1)]
    expected = argmax_rule if v.config.eos_token_id == model.LEGACY_EOS_TOKEN_ID else first_eos_rule
    np.testing.assert_array_equal(expected, v.data["pooler_output"])
  sd2 = variants["sd2"]
  assert _max_diff(sd2.data["pooler_output"], sd2.data["last_hidden_state"][np.arange(3),
                                                                           sd2.data["ids"].argmax(-1)]) > 0.1
  assert model.SD1.eos_token_id == model.SD2.eos_token_id == 2


def test_bfloat16_compute(variants):
  v = variants["sd2"]
  out = _forward(model.CLIPTextModel(v.config, dtype=jnp.bfloat16))(v.variables, v.data["ids"])
  assert out.last_hidden_state.dtype == jnp.float32 and out.pooler_output.dtype == jnp.float32
  ref = v.data["last_hidden_state"]
  assert np.linalg.norm(out.last_hidden_state - ref) / np.linalg.norm(ref) < 0.05


@pytest.mark.slow  # a backward pass to compile, twice (~4 s)
def test_remat_gives_the_same_gradients(variants):
  v = variants["sd1"]

  def grads(remat):
    net = model.CLIPTextModel(v.config, precision="highest", remat=remat)
    return jax.jit(jax.grad(lambda p: jnp.sum(net.apply(p, v.data["short_ids"]).last_hidden_state ** 2)))(v.variables)

  for a, b in zip(jax.tree_util.tree_leaves(grads(False)), jax.tree_util.tree_leaves(grads(True))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1e-30, float(np.abs(a).max())))


# --- full-size layouts -----------------------------------------------------------------------------------------------


@pytest.mark.slow  # the full-size network traced (abstract): the small parity tests cover the fast subset
@pytest.mark.parametrize("name, config, count", [("sd21", model.SD2, SD2_PARAMETERS),
                                                 ("sd15", model.SD1, SD1_PARAMETERS)])
def test_full_size_layout_equals_transformers(layouts, name, config, count):
  reference = {k: tuple(s) for k, s in layouts[name]["shapes"].items()}
  assert layouts[name]["num_parameters"] == count
  assert model.CLIPTextConfig.from_transformers_config(layouts[name]["config"]) == config
  expected = convert.expected_shapes(config)
  assert list(expected.items()) == list(reference.items())  # every name and shape, in transformers' order
  assert len(reference) == 16 * config.num_hidden_layers + 4  # 372 (SD 2.x), 196 (SD 1.x)
  assert convert.num_parameters(config) == count
  convert.check_shapes(reference, config=config)  # transformers 5's names
  convert.check_shapes({f"text_model.{k}": s for k, s in reference.items()}, config=config)  # the published files'
  with pytest.raises(convert.StateDictMismatchError, match="SD 1.x's text encoder"):
    convert.check_shapes(reference, config=model.SD1 if config == model.SD2 else model.SD2)


@pytest.mark.slow  # the full-size network traced (abstract): the small parity tests cover the fast subset
def test_full_size_parameter_count_from_abstract_init():
  """jax.eval_shape of SD 2.x's text encoder (no memory is allocated): 340,387,840 parameters, all float32."""
  net = model.CLIPTextModel(model.SD2, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(net.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 77), jnp.int32))
  leaves = jax.tree_util.tree_leaves(shapes["params"])
  assert sum(math.prod(a.shape) for a in leaves) == SD2_PARAMETERS
  assert {a.dtype for a in leaves} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(net.apply, shapes, jax.ShapeDtypeStruct((2, 77), jnp.int32))
  assert out.last_hidden_state.shape == (2, 77, 1024) and out.last_hidden_state.dtype == jnp.float32
  assert out.pooler_output.shape == (2, 1024)


def test_unsupported_transformers_config_is_one_error():
  with pytest.raises(model.CLIPTextInputError) as info:
    model.CLIPTextConfig.from_transformers_config({"hidden_act": "gelu_new", "attention_dropout": 0.1,
                                                   "architectures": ["CLIPTextModelWithProjection"]})
  message = str(info.value)
  assert isinstance(info.value, UserError)
  assert "gelu_new" in message and "attention_dropout" in message and "CLIPTextModelWithProjection" in message
  with pytest.raises(model.CLIPTextInputError, match="whole CLIPModel"):
    model.CLIPTextConfig.from_transformers_config({"text_config": {}, "vision_config": {}})
  with pytest.raises(model.CLIPTextInputError, match="do not divide"):
    model.CLIPTextConfig(hidden_size=100, num_attention_heads=16)


def test_input_errors(variants):
  v = variants["sd1"]
  with pytest.raises(model.CLIPTextInputError, match="1 .. 77"):
    v.net.apply(v.variables, np.zeros((1, 78), np.int32))
  with pytest.raises(model.CLIPTextInputError, match="integer token ids"):
    v.net.apply(v.variables, np.zeros((1, 7), np.float32))
  with pytest.raises(model.CLIPTextInputError, match="attention_mask"):
    v.net.apply(v.variables, np.zeros((1, 7), np.int32), np.ones((1, 6), np.int32))
  with pytest.raises(model.CLIPTextInputError, match="clip_skip"):
    v.net.apply(v.variables, np.zeros((1, 7), np.int32), clip_skip=3)


# --- converter -------------------------------------------------------------------------------------------------------


def test_converted_layout(variants):
  """Flax paths nest as transformers' names do; linear kernels are transposed, embeddings kept, norms' weights become
  scales; the position_ids buffer is not a parameter."""
  v = variants["sd2"]
  params, w = v.variables["params"], v.weights
  np.testing.assert_array_equal(params["embeddings"]["token_embedding"]["embedding"],
                                w["embeddings.token_embedding.weight"])
  np.testing.assert_array_equal(params["embeddings"]["position_embedding"]["embedding"],
                                w["embeddings.position_embedding.weight"])
  layer = params["encoder"]["layers_2"]
  np.testing.assert_array_equal(layer["self_attn"]["q_proj"]["kernel"], w["encoder.layers.2.self_attn.q_proj.weight"].T)
  np.testing.assert_array_equal(layer["mlp"]["fc1"]["kernel"], w["encoder.layers.2.mlp.fc1.weight"].T)
  np.testing.assert_array_equal(layer["layer_norm2"]["scale"], w["encoder.layers.2.layer_norm2.weight"])
  np.testing.assert_array_equal(params["final_layer_norm"]["bias"], w["final_layer_norm.bias"])
  flat = traverse_util.flatten_dict(params)
  assert sum(a.size for a in flat.values()) == sum(a.size for a in w.values())
  assert all(a.dtype == np.float32 for a in flat.values())


def test_names_without_prefix_and_half_precision_files(variants, tmp_path):
  """transformers 5's names (no 'text_model.') convert to the same variables; an F16 file reads as float32."""
  v = variants["sd1"]
  bare = convert.convert(v.weights, config=v.config)
  for a, b in zip(jax.tree_util.tree_leaves(bare), jax.tree_util.tree_leaves(v.variables)):
    np.testing.assert_array_equal(a, b)
  path = tmp_path / "model.fp16.safetensors"
  convert.write_safetensors(path, {f"text_model.{k}": a for k, a in v.weights.items()}, dtype="F16")
  got = convert.load_variables(str(path), config=v.config)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(v.variables)):
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  out = tmp_path / "converted.safetensors"
  convert.convert_to_safetensors(str(v.path), str(out), config=v.config)
  assert list(convert.load_state_dict(str(out))) == list(v.shapes)  # transformers 5's names, no position_ids


def test_bad_state_dict_is_one_error_listing_everything(variants):
  v = variants["sd2"]
  broken = {f"text_model.{k}": a for k, a in v.weights.items()}
  del broken["text_model.encoder.layers.1.mlp.fc2.bias"]
  broken["text_model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 16), np.float32)
  broken["text_model.encoder.layers.3.mlp.fc1.bias"] = np.zeros(64, np.float32)
  broken["text_model.final_layer_norm.weight"] = np.full(32, np.nan, np.float32)
  broken["text_model.embeddings.position_embedding.weight"] = np.zeros((77, 32), np.int32)
  broken["embeddings.token_embedding.weight"] = v.weights["embeddings.token_embedding.weight"]  # a bare stray key
  broken["text_model.embeddings.position_ids"] = np.arange(77)[None]  # ignored
  with pytest.raises(convert.StateDictMismatchError) as info:
    convert.convert(broken, config=v.config)
  error, message = info.value, str(info.value)
  assert isinstance(error, UserError)
  assert error.missing == ["encoder.layers.1.mlp.fc2.bias"]
  assert error.unexpected == ["text_model.encoder.layers.3.mlp.fc1.bias (transformers: encoder.layers.3.mlp.fc1.bias)",
                              "embeddings.token_embedding.weight"]
  assert list(error.mismatched) == ["text_model.encoder.layers.0.self_attn.q_proj.weight (transformers: "
                                    "encoder.layers.0.self_attn.q_proj.weight)"]
  assert error.non_finite == ["text_model.final_layer_norm.weight"]
  assert "text_model.embeddings.position_embedding.weight: dtype int32" in message
  assert "README" in message and "position_ids" not in message


def test_whole_clip_model_is_explained(variants):
  v = variants["sd1"]
  whole = {f"text_model.{k}": a for k, a in v.weights.items()}
  whole["vision_model.embeddings.class_embedding"] = np.zeros(32, np.float32)
  whole["text_projection.weight"] = np.zeros((32, 32), np.float32)
  with pytest.raises(convert.StateDictMismatchError, match="whole CLIPModel"):
    convert.convert(whole, config=v.config)


def test_missing_or_broken_files_are_user_errors(variants, tmp_path):
  with pytest.raises(convert.WeightsError, match="README"):
    convert.load_variables(str(tmp_path / "model.safetensors"))
  path = tmp_path / "model.safetensors"
  path.write_bytes(variants["sd1"].path.read_bytes()[:-7])
  with pytest.raises(convert.WeightsError, match="truncated or corrupt"):
    convert.load_variables(str(path), config=variants["sd1"].config)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(convert.WeightsError, match="JSON"):
    convert.load_config(str(tmp_path / "config.json"))
  (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "relu"}))
  with pytest.raises(model.CLIPTextInputError, match="relu"):
    convert.load_config(str(tmp_path / "config.json"))
