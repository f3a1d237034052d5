"""The FID Inception network (third_party/fid_inception): its layout against PyTorch's names and shapes, the
converter's checks, the FID-specific pooling, and reading .pth / .npz files without torch.

The full 299x299 network is slow on CPU, so it is compiled once per module (the `forward` fixture, batch 2) and its
variables are random numpy arrays of the model's own shapes (Flax's init of 24M parameters takes ~20 s eagerly).
"""

import base64
import math
import pathlib
import sys
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # third_party/ is not an installed package; `python -m pytest` has it on the path
  sys.path.insert(0, str(REPO))

from selfperc_jax.errors import UserError  # noqa: E402
from third_party import weights_io  # noqa: E402
from third_party.fid_inception import convert, model  # noqa: E402
from third_party.fid_inception.parity import make_fixture  # noqa: E402

# --- fixtures --------------------------------------------------------------------------------------------------------


def _random_variables(seed: int = 0):
  """Random variables of InceptionV3's shapes: He-scaled kernels, non-trivial BatchNorm parameters and statistics
  (every leaf distinct, so a swapped mapping such as mean <-> var or weight <-> bias cannot round-trip)."""
  shapes = weights_io.variable_shapes(model.InceptionV3(), (1, 299, 299, 3))  # the converter's layout's, too
  rng = np.random.default_rng(seed)
  out = {}
  for collection in ("params", "batch_stats"):
    flat = {}
    for path, leaf in traverse_util.flatten_dict(shapes[collection]).items():
      shape, name = leaf.shape, path[-1]
      if name == "kernel":
        std = math.sqrt(2.0 / math.prod(shape[:-1])) if len(shape) == 4 else 0.05
        value = rng.normal(0.0, std, shape)
      elif name in ("scale", "var"):
        value = rng.uniform(0.5, 1.5, shape)
      else:  # bias, mean
        value = rng.normal(0.0, 0.1, shape)
      flat[path] = value.astype(np.float32)
    out[collection] = traverse_util.unflatten_dict(flat)
  return out


def _to_pytorch_state_dict(variables):
  """The inverse of the converter, written independently here: PyTorch names and layouts (OIHW conv weights,
  (out, in) fc weight), plus the num_batches_tracked entries a real BatchNorm state dict has."""
  sd = {}
  for path, value in traverse_util.flatten_dict(variables["params"]).items():
    prefix, leaf = ".".join(path[:-1]), path[-1]
    if leaf == "kernel" and value.ndim == 4:
      sd[f"{prefix}.weight"] = np.ascontiguousarray(value.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    elif leaf == "kernel":
      sd[f"{prefix}.weight"] = np.ascontiguousarray(value.T)  # (in, out) -> (out, in)
    elif leaf == "scale":
      sd[f"{prefix}.weight"] = value
    else:
      assert leaf == "bias", path
      sd[f"{prefix}.bias"] = value
  for path, value in traverse_util.flatten_dict(variables["batch_stats"]).items():
    prefix = ".".join(path[:-1])
    sd[f"{prefix}.running_{'mean' if path[-1] == 'mean' else 'var'}"] = value
    sd[f"{prefix}.num_batches_tracked"] = np.array(12345, np.int64)
  return sd


@pytest.fixture(scope="module")
def variables():
  return _random_variables()


@pytest.fixture(scope="module")
def state_dict(variables):
  return _to_pytorch_state_dict(variables)


# The one compiled network of this module: every test that runs it passes (2, 48, 48, 3) float32 images (which
# preprocess resizes to 299) and variables of the same structure, so it is traced and compiled once.
_apply = jax.jit(lambda v, x: model.InceptionV3().apply(v, x, mutable=["intermediates"]))


@pytest.fixture(scope="module")
def forward(variables):
  """One compiled forward on 2 different 48x48 images in [-1, 1] (so preprocess resizes), with the branch_pool
  intermediates."""
  images = jax.random.uniform(jax.random.key(1), (2, 48, 48, 3), minval=-1.0, maxval=1.0)
  out, state = _apply(variables, images)
  return jax.device_get(out), jax.device_get(state["intermediates"])


@pytest.fixture
def no_torch(monkeypatch):
  """Any attempt of the converter to use torch fails the test."""

  def refuse():
    raise AssertionError("the converter tried to import torch")

  monkeypatch.setattr(weights_io, "_import_torch", refuse)


def _assert_same_tree(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for key in fa:
    assert np.asarray(fa[key]).shape == np.asarray(fb[key]).shape, key
    np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=str(key))


# --- the forward pass ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # compiles the full 299x299 network (~9 s); layout and conversion tests stay fast
def test_forward_gives_pool_and_logits(forward):
  out, _ = forward
  assert set(out) == {"pool", "logits"}
  assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
  assert out["pool"].dtype == np.float32 and out["logits"].dtype == np.float32
  assert np.all(np.isfinite(out["pool"])) and np.all(np.isfinite(out["logits"]))
  assert np.all(out["pool"] >= 0.0)  # the average of ReLU outputs
  assert out["pool"].std() > 0.0 and not np.allclose(out["pool"][0], out["pool"][1])  # the images differ


# --- the layout ------------------------------------------------------------------------------------------------------


def test_layout_has_the_pytorch_names_and_shapes():
  shapes = convert.expected_shapes()
  # 94 BasicConv2d x (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var) + fc.weight, fc.bias.
  assert len(shapes) == 94 * 5 + 2
  expected = {
      "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
      "Conv2d_2b_3x3.bn.running_var": (64,),
      "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
      "Mixed_5b.branch5x5_1.conv.weight": (48, 192, 1, 1),
      "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
      "Mixed_5d.branch_pool.conv.weight": (64, 288, 1, 1),
      "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
      "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
      "Mixed_6e.branch7x7dbl_4.conv.weight": (192, 192, 7, 1),
      "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
      "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
      "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
      "Mixed_7c.branch_pool.bn.running_mean": (192,),
      "fc.weight": (1008, 2048),
      "fc.bias": (1008,),
  }
  for key, shape in expected.items():
    assert shapes[key] == shape, key
  # Trainable parameters: torchvision's inception_v3 has 27,161,264; less its AuxLogits (3,326,696) and plus 8 more
  # fc classes (8 x 2049) is the FID network's 23,850,960.
  trainable = sum(math.prod(s) for k, s in shapes.items() if not k.endswith(("running_mean", "running_var")))
  assert trainable == 27_161_264 - 3_326_696 + 8 * 2049 == 23_850_960


def test_the_networks_shapes_are_traced_once_for_the_layout_and_the_variables(variables):
  shapes = weights_io.variable_shapes(model.InceptionV3(), (1, 299, 299, 3))
  assert weights_io.variable_shapes(model.InceptionV3(), (1, 299, 299, 3)) is shapes  # an equal module: remembered
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, variables)


def test_state_dict_round_trips_to_identical_variables(variables, state_dict):
  assert any(k.endswith("num_batches_tracked") for k in state_dict)  # ignored by the converter
  _assert_same_tree(convert.convert(state_dict), variables)


def test_conversion_transposes_as_pytorch_lays_out():
  # Independent of the inverse above: one PyTorch conv weight element lands where HWIO says.
  sd = {k: np.zeros(s, np.float32) for k, s in convert.expected_shapes().items()}
  sd["Mixed_6b.branch7x7_2.conv.weight"][5, 7, 0, 2] = 1.0  # out 5, in 7, kh 0, kw 2 of a (1, 7) conv
  sd["fc.weight"][3, 11] = 2.0  # out 3, in 11
  v = convert.convert(sd)
  kernel = v["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
  assert kernel.shape == (1, 7, 128, 128) and kernel[0, 2, 7, 5] == 1.0 and kernel.sum() == 1.0
  assert v["params"]["fc"]["kernel"][11, 3] == 2.0


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape"])
def test_conversion_names_the_offending_key(state_dict, problem):
  sd = dict(state_dict)
  if problem == "missing":
    key = "Mixed_6c.branch7x7dbl_3.bn.running_var"
    del sd[key]
  elif problem == "unexpected":
    key = "Mixed_6c.branch7x7dbl_6.conv.weight"
    sd[key] = np.zeros((160, 160, 1, 7), np.float32)
  else:
    key = "Mixed_5c.branch_pool.conv.weight"
    sd[key] = np.zeros((32, 256, 1, 1), np.float32)  # Mixed_5b's pool_features, not Mixed_5c's 64
  with pytest.raises(convert.StateDictMismatchError) as info:
    convert.convert(sd)
  error = info.value
  assert isinstance(error, UserError)
  assert key in str(error)
  listed = {"missing": error.missing, "unexpected": error.unexpected, "shape": list(error.mismatched)}[problem]
  assert listed == [key]
  if problem == "shape":
    assert "(32, 256, 1, 1)" in str(error) and "(64, 256, 1, 1)" in str(error)


def test_conversion_reports_every_problem_at_once_and_can_ignore_aux_logits(state_dict):
  sd = dict(state_dict)
  del sd["fc.bias"]
  sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  sd["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  with pytest.raises(convert.StateDictMismatchError) as info:
    convert.convert(sd)
  assert info.value.missing == ["fc.bias"] and info.value.unexpected == ["AuxLogits.fc.weight"]
  assert list(info.value.mismatched) == ["Conv2d_1a_3x3.conv.weight"]
  assert "ignore_prefixes" in str(info.value)  # the hint for torchvision's auxiliary classifier
  sd = dict(state_dict, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
  convert.convert(sd, ignore_prefixes=("AuxLogits.",))


def test_conversion_refuses_non_finite_values(state_dict):
  sd = dict(state_dict)
  sd["Mixed_7b.branch1x1.bn.running_var"] = np.full((320,), np.nan, np.float32)
  with pytest.raises(convert.WeightsError, match="NaN"):
    convert.convert(sd)


# --- the FID-specific pooling ----------------------------------------------------------------------------------------

_GRID = np.arange(1.0, 10.0, dtype=np.float32).reshape(1, 3, 3, 1)  # [[1 2 3] [4 5 6] [7 8 9]]


def test_average_pool_without_padding_count_divides_by_the_in_image_window():
  # By hand: corner (0,0) averages {1,2,4,5} = 12/4; edge (0,1) {1..6} = 21/6; the centre all nine = 45/9.
  exclude = np.array([[12 / 4, 21 / 6, 16 / 4], [27 / 6, 45 / 9, 33 / 6], [24 / 4, 39 / 6, 28 / 4]])
  include = np.array([[12, 21, 16], [27, 45, 33], [24, 39, 28]]) / 9.0  # padding counted: always /9
  got_exclude = np.asarray(model.avg_pool(jnp.asarray(_GRID), 3, 1, 1, count_include_pad=False))[0, :, :, 0]
  got_include = np.asarray(model.avg_pool(jnp.asarray(_GRID), 3, 1, 1, count_include_pad=True))[0, :, :, 0]
  np.testing.assert_allclose(got_exclude, exclude, rtol=1e-6)
  np.testing.assert_allclose(got_include, include, rtol=1e-6)
  border = np.ones((3, 3), bool)
  border[1, 1] = False
  assert np.all(np.abs(got_exclude - got_include)[border] > 0.5)  # they differ on the whole border
  assert got_exclude[1, 1] == got_include[1, 1]  # and agree where the window is inside the image
  np.testing.assert_array_equal(np.asarray(model.branch_pool_3x3(jnp.asarray(_GRID), model.AVG_EXCLUDE_PAD)),
                                got_exclude[None, :, :, None])


def test_max_pool_padding_never_wins():
  x = -jnp.asarray(_GRID)  # all negative: a zero-padded max pool would return 0 on the border
  expected = -np.array([[1, 1, 2], [1, 1, 2], [4, 4, 5]], np.float32)
  got = np.asarray(model.branch_pool_3x3(x, model.MAX))[0, :, :, 0]
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(np.asarray(model.max_pool(x, 3, 2))[0, :, :, 0], [[-1.0]])  # 3/2 valid: one window
  with pytest.raises(ValueError, match="branch_pool kind"):
    model.branch_pool_3x3(x, "avg")


@pytest.mark.slow  # compiles the full 299x299 network (~9 s); layout and conversion tests stay fast
def test_network_pools_as_the_fid_graph(forward):
  # Each mixed block's sown branch_pool input and output, from the real forward pass: Mixed_7c max-pools, every
  # other branch_pool averages without counting the padding (which differs from counting it, at the border).
  _, intermediates = forward
  pools = {name: kwargs.get("pool") for name, _, kwargs in model.MIXED_BLOCKS}
  assert pools["Mixed_7c"] == model.MAX and pools["Mixed_7b"] == model.AVG_EXCLUDE_PAD
  assert set(intermediates) == {"Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                                "Mixed_7b", "Mixed_7c"}
  for name, sown in intermediates.items():
    x, pooled = jnp.asarray(sown["branch_pool_input"][0]), np.asarray(sown["branch_pool_pooled"][0])
    if name == "Mixed_7c":
      np.testing.assert_array_equal(pooled, np.asarray(model.max_pool(x, 3, 1, 1)), err_msg=name)
      assert not np.allclose(pooled, np.asarray(model.avg_pool(x, count_include_pad=False)))
    else:
      np.testing.assert_allclose(pooled, np.asarray(model.avg_pool(x, count_include_pad=False)), rtol=1e-5,
                                 atol=1e-6, err_msg=name)
      assert not np.allclose(pooled[:, 0], np.asarray(model.avg_pool(x, count_include_pad=True))[:, 0]), name


# --- preprocessing ---------------------------------------------------------------------------------------------------


def test_preprocess_scales_uint8_and_resizes():
  u8 = np.array([0, 255, 51], np.uint8).reshape(1, 1, 3, 1) * np.ones((1, 4, 1, 1), np.uint8)  # (1, 4, 3, 1)
  x = np.asarray(model.preprocess(u8, size=8))
  assert x.shape == (1, 8, 8, 3) and x.dtype == np.float32  # grey repeated to 3 channels, resized
  assert x.min() == -1.0 and x.max() <= 1.0  # the 255 column is interpolated with its neighbours
  np.testing.assert_allclose(np.asarray(model.preprocess(u8, resize=False))[0, 0, :, 0], [-1.0, 1.0, 51 / 127.5 - 1])
  const = np.full((2, 40, 30, 3), 0.25, np.float32)
  np.testing.assert_allclose(np.asarray(model.preprocess(const)), 0.25, rtol=1e-6)
  exact = np.random.default_rng(0).uniform(-1, 1, (1, 299, 299, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(model.preprocess(exact)), exact)  # float at 299: untouched
  for bad in (np.zeros((4, 4, 3)), np.zeros((1, 4, 4, 2))):
    with pytest.raises(model.InceptionInputError):
      model.preprocess(bad)


# --- files: .npz and .pth without torch -------------------------------------------------------------------------------


def test_npz_round_trip_without_torch(tmp_path, variables, state_dict, no_torch):
  flat = tmp_path / "fid_inception.npz"
  np.savez(flat, **state_dict)  # flat 'a.b.c' PyTorch names, PyTorch layout, num_batches_tracked included
  _assert_same_tree(convert.load_variables(str(flat)), variables)
  # convert_to_npz checks, drops num_batches_tracked, writes float32; the result loads to the same variables.
  out = tmp_path / "out" / "converted.npz"
  assert convert.convert_to_npz(str(flat), str(out)) == str(out)
  with np.load(out) as data:
    assert set(data.files) == set(convert.expected_shapes())
    assert all(data[k].dtype == np.float32 for k in data.files)
  _assert_same_tree(convert.load_variables(str(out)), variables)


def test_convert_to_npz_writes_nothing_for_a_mismatching_file(tmp_path, state_dict):
  bad = tmp_path / "bad.npz"
  np.savez(bad, **{k: v for k, v in state_dict.items() if k != "fc.weight"})
  out = tmp_path / "never.npz"
  with pytest.raises(convert.StateDictMismatchError, match="fc.weight"):
    convert.convert_to_npz(str(bad), str(out))
  assert list(tmp_path.iterdir()) == [bad]


# Two small state dicts written by torch 2.13.0 itself (zlib-compressed, base64), one per torch.save format:
#   m = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3, eps=1e-3)); weights and stats set as in
#   _TINY_EXPECTED, num_batches_tracked = 7; sd = m.state_dict(); base = torch.arange(12.).reshape(3, 4);
#   sd['x.transposed'] = base.t(); sd['x.slice'] = base[1:, 2:] (a view with a storage offset);
#   sd['x.half'] = float16 [0.5, -2, 65504]; sd['x.bf16'] = bfloat16 [1, -3.5]
#   torch.save(sd, 'tiny_zip.pth'); torch.save(sd, 'tiny_legacy.pth', _use_new_zipfile_serialization=False)
_TINY_ZIP = (
    "eNqlV9tv21QYP7k0bUPvY6wjbB3jspStaZx7Npq2YYSBC2s9NswYGCdxE2up0y8+6dqhokqolfbIY5G4/AM8IY036B/QaQIhBNIeEGgaPE0gHn",
    "gb59huap+oKaSOTm2n53c5n8/3fc4s7/Ei1NWFmo5B8sGqtiLdVBfHizKWQ4vXK7lsL7pqP9bchUK1UlEKWK1quv9irajUlOJ5tYD9gEYFcAVF",
    "yh0O3VDUUhmDu4CrtUI5JNWxWtH9Uk3J19VKUcKKpldr0lLED55gUOwkGJ3MlEsKeE2IP1epyviS+aUfOkQX5QWf6CHnwmIdOnkfhq45HgV5D+",
    "/mXbwLQ3fQvKLX/ltl6ugxDD0C9Bq2uB1bfWWiWvaWTVYO+sudvAfDAGHjPeswyLvWYcjEH8LwuACHRZ+Bz6uyDk840BE4YqKHLfRRin7SRAcw",
    "PCXAMbHPQNfqmqZqJWlBkTU47mCJwojJcsJieZqynDRZnsHwrADPib0OliW5Bs87SGJwyiQJWiSjlOQFk+Q0hjMCjImHDRKtviDlZVwoK7qEa3",
    "LhulKEkElmxX+mqpUa4R83+OMQJvwkthzhHx01eSMYogLExB4yYTlEuDR9saoTurjDWwISBNuDIUm9eXnPBqTIg/JuQNrkOYvhnAAvGnthOaRX",
    "1IICEzsUZQucmeN95BG7N2CScLg2YMoET2PICvCS8ZSWQ2W5Mg/nHau5QL5qrOZlw1EScma0XrGidYFG61WT8DUMvAAzFmF+nkvA6w7CrLE/uU",
    "SD9A2DNAUXCakbwywlda/DHCUVTNJLGN4U4HJ9Fa6I3WQy2QhYprkGbxn/F4MiTUV4exWuGnFYUmo6STR4h3fpVgJcW4V3y417Dt5bBYncu/W6",
    "ng/N8p1d44Hhnz8nSULH7J7pPowCu+kemq/WFmQsWXK57BFn1u8eHFX4+uG9j6g4HXsrBFDCpmBltyRX1JK2oGg4l43sJdLiSMSogckb8IebSL",
    "hbGhhCmV0D+RWsVGm1ymXPtqG7c1RUjCsK9bA+8dtRujl8LT30owlnVR0P57Lp9g2YrGsZ8mcSoSky1sj4YpI6Eu4/GBk2Hm1rR6cZR1wuewr9",
    "Z/0tooemyPiWam5yd/+kid+zj2aS0YzkslHU1vqNtdMYGPrLv34YaEc/2qb+ne3tiTvbM5lPNjczVP/klz9p7ejH2l+/Ff+1Kar/aPrvlXb042",
    "3qd1qMVHvxxwdVKta1j/Y5RjuRyybRwfa/FYMpIw5k/5OxRcYvdF9OIzRAxgkywtPGHlmdz4Rp7dzH5yHGZzKX7Wd9ohTaevQBZc1/fPd+O/mf",
    "OlD+r02+v0XVP81/dYxIIm9L9QF7BWwU94PUv6ifqn/3Weny/vV3BHG2BmAsXldqKukAN2X6+iipxVx27P+ZCXPpZDKVCEfj0WgiHQlzsVg0nI",
    "qkE8lIJJKMJOLkIh1PGV1i9Lb6V5D4CBouXdRsw6e9SQ42OW96D2bh9g447IA+9KA9+yrLYm9jAQfLnBe16p0skb0XDTmIvrcTNXogi7d3jn4H",
    "/koHYvsXC7a3ACf49yYwx4Lt9dsJvuZjwREWbC++TvC9JnCUBdsrJ6PcyYJjLNhe+hjlJnC8ac22euQE0x8pTK1kwfay4wSjbhacZMH2qsE85y",
    "ZwigXbk37AAf7BDt5jr9uTccSBFvxovzIxy/t8Z6zpxz1jturqPH/jMc//+He6lM9oWLf7zHvzhbXDZ2L6jfnm3H8BxeNlrw==",
)
_TINY_LEGACY = (
    "eNp9lOt21FQUx3PrTBsLFBUVRagimHqJSWYmnQq0U8AKplwavMQLhkzm0ERD0p2clAJr1pov7ULfAJYf/Mhb0Aco78BXH8G1XEt2Lh06EE3WPk",
    "n2Oef33zl7nzPgfheDf/5Y+nv6l0dXD8sD7tJfPLZ9YCRrimGYtTiikRsF9jqJEz8KgcUB1j7sCXxKA2KTsOc7IXD3LRGd9M4asRP/LkmA74Mg",
    "WWPoTLwopjBmcBaPX35IoWYIlpAxonAV6oaQpqjpokxAXIoqiXgl7pGY9M77LhWBmTGBlaxxnKHIt4m/6lHgXBrFrifbKfWDRLRj0k39oGdTEi",
    "ZRbK9rIvCSZNUzfRzprBIQiiniUhA59FrhFGHM2o9j5pqa0lZ1XZ3TdaUNtTxUdy3F6GqXKYyvGIxk8AZnsAZLYUIq3rJ38Tcvi+8VCpMm7MuD",
    "VHeD3O9hDJ7g7dHAW51TGkoTDnh1g0f2FLINfhMOGuwmvFrQXqPwugmHrFpO6/pOAm+8zMJ4NWW21dLgzZL1Vsk6nLHeLljvUDhiwrv5NFWO0z",
    "D0w1X7FsGsHa1mqkqj3YRjJXO6ZL6XMd8vmMcpfGDCibwQnjPXnRhO/heypbXhwxIplciZDPlRgfyYwicmfGodypFhesvuOtT1SGLT2HF/JT2Q",
    "C3SZxWWsnWESP3tBTWs3NFBQjUU1FdVmZgoVjULDhKY1icM3ZCSHyVqUILxVHbfW1mc10JE0iaTZLG7B4LegjckXtmCuoH5O4ZQJp/Nq25CTwH",
    "cJnPk/4HwJXFgxalhK3BZ0kMtuwWIBPEvhnAnn8/xvyJ4T3IQvRv7+ArqGf780KtFQVFWDL8u1vlCu9cVsrb8q8AaFZRMulfjuTVWHyyP4s/ke",
    "UfWhxJUXFlhvNZtwFSU4lFjJJLhNMDOJa4XE1xS+MeHbtA/fWRM4FQuOOj2HOmDl/d9LFnoZ+KEPP+brtnvA/GSwicVmWx2u9+Fnb/itgt2HG/",
    "jNJWnSxQPjenZIVWwstmpHc1Xbhq+qe6GqcseqCqxWtSj1qnyPV2VogsjZKVNc2wvYdNAe15i912AeG+zroA3Q/lzgR/uy5+Nd35OdnTNPdpbn",
    "Hz54ML9nXMkedNjSUy+f3HDEje3JUd1yTiefh7po22hPsxgXGWYKbRpNWRzqtJntf+89A8+2g8g=",
)
_TINY_EXPECTED = {
    "0.weight": np.arange(6, dtype=np.float32).reshape(3, 2, 1, 1) / 4,
    "1.weight": np.array([1.5, 2.0, -0.5], np.float32),
    "1.bias": np.array([0.25, 0.0, -1.0], np.float32),
    "1.running_mean": np.array([0.1, 0.2, 0.3], np.float32),
    "1.running_var": np.array([1.0, 2.0, 4.0], np.float32),
    "1.num_batches_tracked": np.array(7, np.int64),
    "x.transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,
    "x.slice": np.array([[6.0, 7.0], [10.0, 11.0]], np.float32),
    "x.half": np.array([0.5, -2.0, 65504.0], np.float16),
    "x.bf16": np.array([1.0, -3.5], np.float32),  # compared after a cast to float32
}


@pytest.mark.parametrize("blob", [_TINY_ZIP, _TINY_LEGACY], ids=["zip", "legacy"])
def test_pth_written_by_torch_reads_without_torch(tmp_path, blob, no_torch):
  path = tmp_path / "tiny.pth"
  path.write_bytes(zlib.decompress(base64.b64decode("".join(blob))))
  assert zipfile.is_zipfile(path) == (blob is _TINY_ZIP)
  sd = convert.load_state_dict(str(path))
  assert list(sd) == list(_TINY_EXPECTED)  # the order torch saved them in
  for key, expected in _TINY_EXPECTED.items():
    got = sd[key].astype(np.float32) if key == "x.bf16" else sd[key]
    assert got.dtype == expected.dtype and got.shape == expected.shape, key
    np.testing.assert_array_equal(got, expected, err_msg=key)
  assert sd["x.bf16"].dtype.name == "bfloat16"


def test_pth_that_needs_torch_says_how_to_get_it(tmp_path, monkeypatch):
  # A zip .pth whose pickle holds a whole module (what torch.save(model) writes), not a state dict.
  path = tmp_path / "module.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", b"\x80\x02ctorch.nn.modules.conv\nConv2d\n)\x81.")
  monkeypatch.setattr(weights_io, "_import_torch", lambda: None)
  with pytest.raises(convert.TorchRequiredError) as info:
    convert.load_variables(str(path))
  message = str(info.value)
  assert isinstance(info.value, UserError)
  assert "pip install torch==2.13.0" in message and "convert_to_npz" in message
  assert "torch.nn.modules.conv.Conv2d" in message


def test_missing_weights_file_points_to_the_readme(tmp_path):
  with pytest.raises(convert.WeightsError, match="README"):
    convert.load_variables(str(tmp_path / "pt_inception-2015-12-05-6726825d.pth"))


# --- numerical parity with pytorch-fid --------------------------------------------------------------------------------
# third_party/fid_inception/parity/fixture.npz holds what pytorch-fid's own network (fid_inception_v3() with its
# FIDInceptionA/C/E_1/E_2 blocks, through its InceptionV3 wrapper with resize_input=True) computed on CPU with
# seeded random weights; make_fixture.py (run in a venv with torch and pytorch-fid) wrote it and says how. Neither
# torch nor pytorch-fid is needed here: the same weights are rebuilt with numpy from the PyTorch names and shapes.


@pytest.fixture(scope="module")
def parity():
  with np.load(make_fixture.FIXTURE) as data:
    return {key: data[key] for key in data.files}


def test_layout_is_that_of_pytorch_fids_network(parity):
  torch_layout = dict(zip(parity["keys"].tolist(), parity["shapes"].tolist()))  # num_batches_tracked left out
  ours = {key: make_fixture.shape_string(shape) for key, shape in convert.expected_shapes().items()}
  assert ours == torch_layout


@pytest.mark.slow  # compiles the full 299x299 network (~9 s); layout and conversion tests stay fast
def test_network_matches_pytorch_fid(parity):
  state_dict = make_fixture.random_state_dict(convert.expected_shapes(), int(parity["seed"]))
  np.testing.assert_allclose(make_fixture.checksums(state_dict), parity["checksums"], rtol=1e-6, atol=1e-6,
                             err_msg="numpy's random stream differs from the one the fixture was made with; "
                             "regenerate it (make_fixture.py)")
  images = parity["images"]
  assert images.shape == (2, 48, 48, 3) and images.dtype == np.float32  # the shape _apply is compiled for
  out, _ = jax.device_get(_apply(convert.convert(state_dict), images))
  # Measured on CPU (jax 0.10.2 against torch 2.14.1, pytorch-fid 0.3.0): max abs difference 2.1e-5 for pool
  # (max |value| 30) and 1.5e-5 for logits (max |value| 20), as close as torch's own float32 run is to its float64
  # run (1.7e-5 and 1.0e-5). The smallest structural error tried is ~90x the tolerance: BatchNorm eps 1.1e-3
  # instead of 1e-3 (1.7e-3 of the largest value), count_include_pad=True in Mixed_5b alone (2.1e-3), SAME instead
  # of VALID padding in Conv2d_1a_3x3 (9e-3), kh <-> kw in one 3x3 kernel (5e-2), eps 1e-5 (1.8e-2), Mixed_7c
  # average- instead of max-pooled (0.29), edge instead of zero padding (0.5).
  for name in ("pool", "logits"):
    got = np.asarray(out[name])
    for reference in (parity[name], parity[f"{name}_f64"]):
      scale = float(np.abs(reference).max())
      np.testing.assert_allclose(got, reference, rtol=1e-4, atol=2e-5 * scale, err_msg=name)
  assert np.abs(parity["pool"]).max() > 1.0 and 0.5 < np.mean(parity["pool"] > 0) < 1.0  # not degenerate


@pytest.mark.parametrize("case", ["up", "down"])
def test_resize_matches_pytorch_fids_interpolate(parity, case):
  # torch's F.interpolate(mode='bilinear', align_corners=False), pytorch-fid's resize to 299, on small inputs.
  x, expected = parity[f"resize_{case}_in"], parity[f"resize_{case}_out"]
  got = np.asarray(model.preprocess(x, size=expected.shape[1]))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # measured: 9.5e-7 (up), 1.2e-7 (down)
