"""U-Net: output shape, class conditioning, tap-only early exit (no decoder), config dtype handling."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import device_array, load_config, override
from selfperc_jax.models import unet as unet_lib
from selfperc_jax.models.unet import UNet, unet_from_config

B, H, W, C = 4, 8, 8, 1
NUM_CLASSES = 10


# The tests run the U-Net through one jitted apply (the model is a static argument): a forward is then one program,
# traced and looked up in the compilation cache once per shape, where an eager apply dispatches some 160 programs,
# one per operation.
@functools.partial(jax.jit, static_argnums=0, static_argnames=("taps", "train", "mutable"))
def _apply(model, variables, *args, **kwargs):
  return model.apply(variables, *args, **kwargs)


def _tiny(**overrides):
  kw = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=2,
            dropout=0.0, num_classes=NUM_CLASSES, out_channels=C)
  kw.update(overrides)
  return UNet(**kw)


# Test data and parameter noise come from NumPy: compiling many jax.random calls is slow on CPU.


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = device_array(rng.normal(size=(B, H, W, C)))
  t = device_array(rng.uniform(0.05, 0.95, size=(B,)))
  y = device_array(rng.permutation(NUM_CLASSES)[:B], "int32")
  return x, t, y


def _perturb(params, seed, scale=0.2):
  """Adds noise to every leaf, so the zero-initialised convs / projections are no longer zero."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: device_array(np.asarray(p) + scale * rng.normal(size=p.shape)), params)


def _init(model, x, t, y):
  # unsafe_rbg: the same initialisers, but far cheaper to compile on CPU than threefry.
  return jax.jit(model.init)(jax.random.key(1, impl="unsafe_rbg"), x, t, y)["params"]


def _random_params(model, x, t, y, seed):
  """A params tree of the model's structure filled with noise (no initialisers run)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)["params"]
  return _perturb(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes), seed, scale=0.3)


def _is_decoder(name):
  return name.startswith("dec_") or name.startswith("out_")


def _count_primitive(jaxpr, name):
  """Number of equations with primitive `name` in a jaxpr, including nested sub-jaxprs (pjit, cond, ...)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      count += 1
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else (value,)):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          count += _count_primitive(sub, name)
  return count


@pytest.fixture(scope="module")
def model():
  return _tiny()


@pytest.fixture(scope="module")
def fresh_params(model):
  x, t, y = _inputs()
  return _init(model, x, t, y)


@pytest.fixture(scope="module")
def params(fresh_params):
  return _perturb(fresh_params, 2)


def test_param_tree_has_encoder_mid_and_decoder_modules(fresh_params):
  names = set(fresh_params)
  assert {"in_conv", "enc_0_0", "enc_0_down", "enc_1_0", "enc_1_0_attn", "mid_res_0", "mid_attn",
          "mid_res_1", "out_norm", "out_conv"} <= names
  assert any(n.startswith("dec_") for n in names)
  # 8x8 level has no attention (attention_resolutions=(4,)).
  assert "enc_0_0_attn" not in names


def test_fresh_model_outputs_exactly_zero(model, fresh_params):
  """Documented property: the output conv is zero-initialised, so an untrained model predicts exactly 0."""
  x, t, y = _inputs()
  out = _apply(model, {"params": fresh_params}, x, t, y)
  assert out.shape == (B, H, W, C)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize("out_channels", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_full_forward_shape_dtype_and_finite(out_channels):
  model = _tiny(out_channels=out_channels)
  x, t, y = _inputs()
  p = _random_params(model, x, t, y, 3)
  assert p["out_conv"]["kernel"].shape == (3, 3, 8, out_channels)
  out = _apply(model, {"params": p}, x, t, y, train=False)
  assert out.shape == (B, H, W, out_channels)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  assert float(jnp.max(jnp.abs(out))) > 0


def test_class_label_and_time_change_output(model, params):
  x, t, y = _inputs()
  out = _apply(model, {"params": params}, x, t, y)
  out_other_class = _apply(model, {"params": params}, x, t, (y + 1) % NUM_CLASSES)
  out_null = _apply(model, {"params": params}, x, t, jnp.full_like(y, model.null_class))
  out_other_t = _apply(model, {"params": params}, x, 1.0 - t, y)
  for other in (out_other_class, out_null, out_other_t):
    diff = np.abs(np.asarray(out) - np.asarray(other)).reshape(B, -1).max(axis=1)
    assert np.all(diff > 1e-4), diff
  # Examples are independent: changing one example's label only changes that example's output.
  y2 = y.at[0].set((y[0] + 1) % NUM_CLASSES)
  out2 = _apply(model, {"params": params}, x, t, y2)
  np.testing.assert_allclose(np.asarray(out2[1:]), np.asarray(out[1:]), rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(out2[0] - out[0]))) > 1e-4


def test_tap_names():
  assert unet_lib.tap_names(2) == ("enc0", "enc1", "mid")
  assert unet_lib.tap_names(3) == ("enc0", "enc1", "enc2", "mid")


def test_tap_shapes_and_dtype(model, params):
  x, t, y = _inputs()
  feats = _apply(model, {"params": params}, x, t, y, taps=("enc0", "enc1", "mid"))
  assert set(feats) == {"enc0", "enc1", "mid"}
  assert feats["enc0"].shape == (B, 8, 8, 8)
  assert feats["enc1"].shape == (B, 4, 4, 16)
  assert feats["mid"].shape == (B, 4, 4, 16)
  for v in feats.values():
    assert v.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(v)))


def test_mid_tap_works_without_decoder_params(model, params):
  """Linen raises if a module whose params were removed is called, so this proves the decoder never runs."""
  x, t, y = _inputs()
  stripped = {k: v for k, v in params.items() if not _is_decoder(k)}
  assert len(stripped) < len(params)
  assert not any(_is_decoder(k) for k in stripped)
  full = _apply(model, {"params": params}, x, t, y, taps=("mid",))
  no_dec = _apply(model, {"params": stripped}, x, t, y, taps=("mid",))
  assert set(no_dec) == {"mid"}
  np.testing.assert_array_equal(np.asarray(no_dec["mid"]), np.asarray(full["mid"]))
  # Sanity check that removal is detected at all: the full forward needs the decoder.
  with pytest.raises(Exception):
    _apply(model, {"params": stripped}, x, t, y)


def test_enc0_tap_works_without_later_params(model, params):
  x, t, y = _inputs()
  keep = ("time_mlp_0", "time_mlp_1", "class_embed", "in_conv", "enc_0_0")
  stripped = {k: v for k, v in params.items() if k in keep}
  out = _apply(model, {"params": stripped}, x, t, y, taps=("enc0",))
  ref = _apply(model, {"params": params}, x, t, y, taps=("enc0",))
  np.testing.assert_array_equal(np.asarray(out["enc0"]), np.asarray(ref["enc0"]))
  with pytest.raises(Exception):
    _apply(model, {"params": stripped}, x, t, y, taps=("mid",))


def test_tap_call_has_fewer_convs_than_full_forward(model, params):
  x, t, y = _inputs()

  def convs(taps):
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t, y, taps=taps))(params)
    return _count_primitive(jaxpr, "conv_general_dilated")

  n_full, n_mid, n_enc0 = convs(()), convs(("mid",)), convs(("enc0",))
  # Structure: in_conv 1; enc_0_0 2 convs; enc_0_down 1; enc_1_0 2 + 1x1 skip; mid 2 ResBlocks x 2 convs.
  assert n_enc0 == 1 + 2
  assert n_mid == 1 + 2 + 1 + 3 + 4
  # Decoder: 4 ResBlocks with skip 1x1 (3 convs each), one upsampling conv, the output conv.
  assert n_full == n_mid + 4 * 3 + 1 + 1
  assert n_enc0 < n_mid < n_full
  # Asking for several taps stops at the last one reached.
  assert convs(("enc0", "mid")) == n_mid
  assert convs(("enc0", "enc1")) == 1 + 2 + 1 + 3


def test_tap_equals_sown_intermediate(model, params):
  x, t, y = _inputs()
  out, state = _apply(model, {"params": params}, x, t, y, mutable=("intermediates",))
  assert out.shape == (B, H, W, C)
  inter = state["intermediates"]
  assert set(inter) == {"enc0", "enc1", "mid"}
  feats = _apply(model, {"params": params}, x, t, y, taps=("enc0", "enc1", "mid"))
  for name in ("enc0", "enc1", "mid"):
    sown = inter[name]
    assert isinstance(sown, tuple) and len(sown) == 1
    np.testing.assert_allclose(np.asarray(feats[name]), np.asarray(sown[0]), rtol=1e-5, atol=1e-6)
  # The sown mid activation differs from enc1 (mid blocks really transform it).
  assert float(jnp.max(jnp.abs(inter["mid"][0] - inter["enc1"][0]))) > 1e-3


@pytest.mark.parametrize("taps", [("bottleneck",), ("mid", "enc2"), ("dec0",)])
def test_unknown_tap_raises(model, params, taps):
  x, t, y = _inputs()
  with pytest.raises(ValueError, match="unknown taps"):
    _apply(model, {"params": params}, x, t, y, taps=taps)


def test_tap_gradient_zero_for_decoder_nonzero_for_encoder(model, params):
  x, t, y = _inputs()

  def f(p):
    return jnp.sum(jnp.square(model.apply({"params": p}, x, t, y, taps=("mid",))["mid"]))

  grads = jax.jit(jax.grad(f))(params)
  dec_norm = sum(float(np.abs(np.asarray(g)).sum()) for k, v in grads.items() if _is_decoder(k)
                 for g in jax.tree.leaves(v))
  assert dec_norm == 0.0
  for name in ("in_conv", "enc_0_0", "enc_1_0", "mid_res_1", "time_mlp_0", "class_embed"):
    norm = sum(float(np.abs(np.asarray(g)).sum()) for g in jax.tree.leaves(grads[name]))
    assert norm > 0, name
  # Contrast: the full forward does send gradient into the decoder.
  def full(out_conv):
    return jnp.sum(jnp.square(model.apply({"params": {**params, "out_conv": out_conv}}, x, t, y)))

  out_conv_grad = jax.jit(jax.grad(full))(params["out_conv"])
  assert float(np.abs(np.asarray(out_conv_grad["kernel"])).sum()) > 0


def _model_cfg(dtype):
  """The digits config's model section with this file's tiny sizes, so every key unet_from_config reads is there."""
  return override(load_config("digits").model, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=2, head_channels=0, dropout=0.0, num_classes=NUM_CLASSES,
                  dtype=dtype, remat=False)


def test_unet_from_config_float32_fields():
  model = unet_from_config(_model_cfg("float32"), out_channels=3)
  assert model.dtype == jnp.float32
  assert model.out_channels == 3
  assert model.channel_mult == (1, 2) and model.attention_resolutions == (4,)
  assert model.num_classes == NUM_CLASSES and model.null_class == NUM_CLASSES


@pytest.mark.slow
def test_bfloat16_model_runs_and_returns_float32(params):
  model = unet_from_config(_model_cfg("bfloat16"), out_channels=1)
  assert model.dtype == jnp.bfloat16
  x, t, y = _inputs()
  # dtype is the computation dtype only: the bfloat16 model has the float32 model's float32 param tree.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert all(s.dtype == jnp.float32 and s.shape == p.shape
             for s, p in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)))
  p = params
  out = _apply(model, {"params": p}, x, t, y)
  assert out.shape == (B, H, W, C)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  feats = _apply(model, {"params": p}, x, t, y, taps=("mid",))
  assert feats["mid"].dtype == jnp.float32
  # Close to, but (because of bfloat16 rounding) not bit-identical with, the float32 model on the same params.
  ref = _apply(unet_from_config(_model_cfg("float32"), out_channels=1), {"params": p}, x, t, y)
  err = float(jnp.max(jnp.abs(out - ref)))
  scale = float(jnp.max(jnp.abs(ref)))
  assert 0 < err < 0.1 * scale


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_attention_equals_the_textbook_formula(dtype, tol):
  """jax.nn.dot_product_attention inside the block: softmax(q k^T / sqrt(d)) v per head, as written out here."""
  block = unet_lib.AttentionBlock(num_heads=2, dtype=dtype)
  rng = np.random.default_rng(0)
  x = device_array(rng.normal(size=(2, 4, 4, 8)))
  variables = jax.jit(block.init)(jax.random.key(1, impl="unsafe_rbg"), x)
  # A non-zero output projection, so that the attention output shows in the result.
  proj = variables["params"]["proj"]
  variables = {"params": dict(variables["params"],
                              proj=dict(proj, kernel=device_array(rng.normal(size=proj["kernel"].shape))))}
  out = jax.jit(block.apply)(variables, x)

  @jax.jit
  def textbook(p, x):
    h = nn.GroupNorm(unet_lib._num_groups(8)).apply({"params": p["norm"]}, x).reshape(2, 16, 8)
    qkv = jnp.einsum("btc,cshd->btshd", h, p["qkv"]["kernel"]) + p["qkv"]["bias"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(4.0), axis=-1)
    att = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return x + (jnp.einsum("bthd,hdc->btc", att, p["proj"]["kernel"]) + p["proj"]["bias"]).reshape(2, 4, 4, 8)

  expected = textbook(variables["params"], x)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected), atol=tol, rtol=tol)
