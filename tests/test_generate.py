"""Chunked, sharded sampling: samples depend only on (seed, index), memory only on the chunk size."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO, load_config
from selfperc_jax import config_base, config_tree, diffusion, generate, images, samplers, scheduler_config, sharding
from selfperc_jax import conditioning, space, validation
from selfperc_jax.errors import ConfigError
from selfperc_jax.evaluation import evaluate

SHAPE = (4, 4, 3)
NUM_CLASSES = 3


class TinyDenoiser(nn.Module):
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x, t, y):
    h = nn.Dense(x.shape[-1])(x)
    h = h + nn.Embed(self.num_classes + 1, x.shape[-1])(y)[:, None, None, :]
    return h * (1.0 + t[:, None, None, None])


def _config(sampler="ddim", batch_size=8, guidance_scale=2.0):
  c = ml_collections.ConfigDict()
  c.condition = "class"
  c.diffusion = ml_collections.ConfigDict({"prediction": "v", "zero_snr_anchor": "clean"})
  c.model = ml_collections.ConfigDict({"num_classes": NUM_CLASSES})
  c.sample = ml_collections.ConfigDict({
      "sampler": sampler, "steps": 4, "guidance_scale": guidance_scale, "guidance_rescale": 0.0,
      "guidance_interval": (0.0, 1.0), "batch_size": batch_size, "timestep_spacing": "project", "steps_offset": 0,
      "final_step": "clean"})
  c.latent = ml_collections.ConfigDict({"vae": ""})  # pixel space
  return c


@pytest.fixture(scope="module")
def model_and_params():
  model = TinyDenoiser()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + SHAPE), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  return model, params["params"]


def _mesh(devices):
  return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}), jax.devices()[:devices])


def _generator(model, config, devices=8):
  return generate.Generator(config, model, diffusion.Schedule("cosine", 0, True), SHAPE, _mesh(devices))


def _draw(gen, params, labels, seed=3, start=0):
  chunks = list(gen.chunks(params, labels, seed, start=start))
  return chunks, np.concatenate([c.images for c in chunks])


# One sampler in the fast subset; the others (the same chunking, other update rules) in the full suite.
@pytest.mark.parametrize("sampler", [s if s == "ddim" else pytest.param(s, marks=pytest.mark.slow)
                                     for s in samplers.SAMPLERS])
def test_samples_do_not_depend_on_chunk_size_or_device_count(model_and_params, sampler):
  model, params = model_and_params
  labels = conditioning.class_labels(20, NUM_CLASSES)  # 21 labels: 7 per class
  _, reference = _draw(_generator(model, _config(sampler, batch_size=24), devices=8), params, labels)
  chunks, chunked = _draw(_generator(model, _config(sampler, batch_size=8), devices=8), params, labels)
  _, one_device = _draw(_generator(model, _config(sampler, batch_size=5), devices=1), params, labels)
  assert [(c.start, c.stop) for c in chunks] == [(0, 8), (8, 16), (16, 21)]
  assert reference.shape == (21,) + SHAPE and reference.dtype == np.uint8
  assert np.std(reference) > 1  # not a constant image
  # Different shapes and layouts can change float rounding by an ulp; uint8 values agree within one level.
  assert np.abs(chunked.astype(int) - reference).max() <= 1
  assert np.abs(one_device.astype(int) - reference).max() <= 1
  # ... and are what one call of the sampler with key(seed) draws (example i uses fold_in(key, i)).
  s = _config(sampler).sample
  direct = jax.jit(lambda p, y: samplers.sample(  # compiled whole, as the generator's chunks are
      lambda x, t, y: model.apply({"params": p}, x, t, y), diffusion.Schedule("cosine", 0, True), "v",
      jax.random.key(3), y, SHAPE, sampler=sampler, num_steps=s.steps, guidance_scale=s.guidance_scale,
      null_class=NUM_CLASSES))(params, labels)
  assert np.abs(images.to_uint8(direct).astype(int) - reference).max() <= 1


def test_a_draw_resumes_from_any_chunk_and_seeds_differ(model_and_params):
  model, params = model_and_params
  gen = _generator(model, _config(batch_size=8))
  labels = conditioning.class_labels(24, NUM_CLASSES)
  _, whole = _draw(gen, params, labels)
  chunks, rest = _draw(gen, params, labels, start=16)
  assert [(c.start, c.stop) for c in chunks] == [(16, 24)]
  np.testing.assert_array_equal(rest, whole[16:])
  np.testing.assert_array_equal(np.concatenate([c.labels for c in chunks]), labels[16:])
  _, other_seed = _draw(gen, params, labels, seed=4)
  assert np.mean(other_seed != whole) > 0.2  # many pixels of this toy model saturate at 0 or 255


def test_device_memory_does_not_grow_with_the_number_of_samples(model_and_params, monkeypatch):
  """Every call of the compiled chunk function has the chunk's shape, however many samples are drawn, so its
  memory (XLA's analysis of that one program) is the bound for 1,000 and for 50,000 samples alike."""
  model, params = model_and_params
  gen = _generator(model, _config(batch_size=64))
  compiled = gen.lower(params).compile()
  memory = compiled.memory_analysis()
  shapes = []
  real_draw = gen._draw

  def recording_draw(params, embed_variables, decode_variables, seed, labels, indices):
    shapes.append(labels.shape)
    return {"images": jnp.zeros((labels.shape[0],) + SHAPE, jnp.uint8)}

  monkeypatch.setattr(gen, "_draw", recording_draw)
  for n in (1000, 50_000):
    shapes.clear()
    count = sum(1 for _ in gen.chunks(params, conditioning.class_labels(n, NUM_CLASSES), seed=0))
    assert count == -(-len(conditioning.class_labels(n, NUM_CLASSES)) // 64)
    assert set(shapes) == {(64,)}
  monkeypatch.setattr(gen, "_draw", real_draw)
  if memory is not None:  # the analysis is per program: the same program serves both counts
    again = gen.lower(params).compile().memory_analysis()
    assert again.temp_size_in_bytes == memory.temp_size_in_bytes
    # Per device: an eighth of one chunk of uint8 images.
    assert memory.output_size_in_bytes == 64 * int(np.prod(SHAPE)) // 8
  # A draw smaller than one chunk runs as one chunk of its own size (rounded up to the device count).
  shapes.clear()
  monkeypatch.setattr(gen, "_draw", recording_draw)
  list(gen.chunks(params, np.zeros(10, np.int32), seed=0))
  assert shapes == [(16,)]


def test_chunk_size_must_divide_over_the_devices(model_and_params):
  model, _ = model_and_params
  with pytest.raises(ConfigError, match=r"sample.batch_size=12 must be a multiple of the 8 devices .*e.g. 16"):
    _generator(model, _config(batch_size=12))


def test_write_samples_streams_the_npz_and_grids_the_first_images(model_and_params, tmp_path):
  model, params = model_and_params
  gen = _generator(model, _config(batch_size=64, guidance_scale=1.0))
  labels = conditioning.class_labels(300, NUM_CLASSES)
  png = generate.write_samples(gen, params, str(tmp_path), "many", labels, seed=1)
  with np.load(tmp_path / "many.npz") as f:
    arr, lab = f["arr_0"], f["arr_1"]
  _, direct = _draw(gen, params, labels, seed=1)
  np.testing.assert_array_equal(arr, direct)
  np.testing.assert_array_equal(lab, labels)
  from PIL import Image

  grid = Image.open(png)
  rows = len(set(labels[:generate.GRID_MAX]))
  assert grid.size[1] == rows * (SHAPE[0] * 8 + 2)  # 4-pixel images are upscaled 8x to 32, plus padding
  assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_embedding_on_the_devices_equals_embedding_the_saved_images(model_and_params):
  """The features computed inside the chunk function are those of the uint8 images that the .npz holds."""
  model, params = model_and_params
  weights = {"w": np.random.default_rng(0).normal(size=(int(np.prod(SHAPE)), 5)).astype(np.float32)}

  def embed_fn(v, u8):
    x = u8.reshape(u8.shape[0], -1).astype(jnp.float32) / 127.5 - 1.0
    feats = x @ v["w"]
    return feats, 2.0 * feats

  gen = generate.Generator(_config(batch_size=8), model, diffusion.Schedule("cosine", 0, True), SHAPE, _mesh(8),
                           embed_fn, weights)
  labels = conditioning.class_labels(12, NUM_CLASSES)
  chunks = list(gen.chunks(params, labels, seed=2))
  imgs = np.concatenate([c.images for c in chunks])
  feats = np.concatenate([c.features for c in chunks])
  expected = (imgs.reshape(len(imgs), -1).astype(np.float32) / 127.5 - 1.0) @ weights["w"]
  np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.concatenate([c.logits for c in chunks]), 2 * expected, rtol=1e-5, atol=1e-5)
  without = list(gen.chunks(params, labels, seed=2, with_images=False))
  assert all(c.images is None for c in without)
  np.testing.assert_array_equal(np.concatenate([c.features for c in without]), feats)


def test_npz_stream_writer_refuses_a_wrong_or_incomplete_batch(tmp_path):
  writer = images.NpzStreamWriter(str(tmp_path / "x.npz"), (2, 2, 1), np.arange(3))
  with pytest.raises(ValueError, match="does not fit"):
    writer.write(np.zeros((4, 2, 2, 1), np.uint8))
  writer.write(np.zeros((2, 2, 2, 1), np.uint8))
  with pytest.raises(ValueError, match="2 of 3 images"):
    writer.close()
  writer.abort()
  assert list(tmp_path.iterdir()) == []


def test_class_labels_are_balanced_and_cover_the_classes_evenly_when_fewer():
  np.testing.assert_array_equal(conditioning.class_labels(5, 3), [0, 0, 1, 1, 2, 2])  # rounded up to 2 per class
  np.testing.assert_array_equal(conditioning.class_labels(4, 10, classes=(7, 2)), [7, 7, 2, 2])
  np.testing.assert_array_equal(conditioning.class_labels(5, 1000), [0, 250, 500, 749, 999])  # one each, spread


# ----------------------------------------------------------------------------------------------------------------
# Clipping (space.clips_x0), diffusers' sampling settings from the config, and the names of sampling settings
# ----------------------------------------------------------------------------------------------------------------


class _ConstantX0:
  """A 'model' (prediction 'x0') whose x0 is 3.0 everywhere: outside the pixels' [-1, 1], as latents often are."""

  def apply(self, variables, x, t, y):
    return jnp.full_like(x, 3.0)


def test_latent_samples_are_not_clipped_and_pixel_samples_are():
  """space.clips_x0 decides: pixel samples are clipped to [-1, 1] (x0 = 3 gives 1), latents are not (3 stays 3).
  The decoder x / 4 brings both into the uint8 range, so the images show the sample: 1 / 4 or 3 / 4."""
  decoder = space.Decoder(lambda variables, x: x / 4.0, {})
  labels = conditioning.class_labels(8, NUM_CLASSES)
  drawn = {}
  for vae in ("", "sd"):
    config = _config(batch_size=8, guidance_scale=1.0)
    config.diffusion.prediction = "x0"
    config.latent.vae = vae
    assert space.clips_x0(config) == (vae == "")
    gen = generate.Generator(config, _ConstantX0(), diffusion.Schedule("cosine", 0, True), SHAPE, _mesh(8),
                             decoder=decoder)
    _, drawn[vae] = _draw(gen, {}, labels)
  np.testing.assert_array_equal(drawn[""], images.to_uint8(np.full((len(labels),) + SHAPE, 0.25)))
  np.testing.assert_array_equal(drawn["sd"], images.to_uint8(np.full((len(labels),) + SHAPE, 0.75)))


RELEASED = scheduler_config.read_scheduler_config(
    REPO / "tests" / "fixtures" / "scheduler_parity" / "released_zsnr_v_scheduler_config.json")


class _RecordingModel:
  """An analytic v-prediction 'model' (no params) that records every call's (t, x_t) on the host."""

  def __init__(self):
    self.calls = []

  def denoise(self, x, t, y):
    jax.debug.callback(lambda t, x: self.calls.append((np.asarray(t), np.asarray(x))), t, x, ordered=True)
    return jnp.tanh(0.3 * x) * t.reshape((-1,) + (1,) * (x.ndim - 1)) + 0.1 * jnp.sin(x) - 0.05

  def apply(self, variables, x, t, y):
    return self.denoise(x, t, y)


@pytest.mark.parametrize("sampler", ["ddim", pytest.param("dpmpp_2m", marks=pytest.mark.slow)])  # one in the subset
def test_released_scheduler_settings_in_a_config_sample_as_the_direct_call(sampler):
  """The paper's released models' scheduler_config.json read into the latent config: it validates, agrees with the
  file (scheduler_config.check_config), and the Generator walks exactly the trajectory of samplers.sample called
  with those settings directly (no clipping: latents), calling the model at diffusers' timesteps."""
  settings = scheduler_config.settings_from_scheduler_config(RELEASED, sampler)
  config = load_config("imagenet256_latent")
  config_tree.set_values(config, dict(settings, **{"sample.sampler": sampler, "sample.steps": 7,
                                                   "sample.guidance_scale": 1.0, "sample.batch_size": 8}))
  validation.validate(config)
  assert scheduler_config.check_config(config, RELEASED) == []
  schedule = diffusion.schedule_from_config(config.diffusion)
  assert schedule == diffusion.Schedule("scaled_linear", 1000, True, "first_timestep")
  labels = conditioning.class_labels(8, config.model.num_classes)
  model = _RecordingModel()
  # One device: ordered callbacks (the order of the model's calls) need a single-device program.
  gen = generate.Generator(config, model, schedule, SHAPE, _mesh(1), decoder=space.Decoder(lambda v, x: x / 4.0, {}))
  _, drawn = _draw(gen, {}, labels, seed=5)
  through_generator, model.calls = model.calls, []
  direct = lambda **kwargs: samplers.sample(model.denoise, schedule, "v", jax.random.key(5), jnp.asarray(labels),
                                            SHAPE, sampler=sampler, num_steps=7, clip_x0=False, **kwargs)
  x = direct(timestep_spacing=settings["sample.timestep_spacing"], steps_offset=settings.get("sample.steps_offset", 0),
             final_step=settings["sample.final_step"])
  direct_calls, model.calls = model.calls, []
  assert len(through_generator) == len(direct_calls) == 7
  k = samplers.diffusers_timesteps(sampler, 7, 1000, "trailing")
  for (t_gen, x_gen), (t_direct, x_direct), k_i in zip(through_generator, direct_calls, k):
    np.testing.assert_array_equal(t_gen, t_direct)
    assert np.all(np.round(t_direct * 1000) - 1 == k_i)
    np.testing.assert_allclose(x_gen, x_direct, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(x)).max() > 1  # unclipped
  assert np.abs(images.to_uint8(np.asarray(x) / 4.0).astype(int) - drawn).max() <= 1
  # The settings matter here: the project's grid (the same timesteps at 7 steps) walks another trajectory.
  direct()
  assert max(np.abs(a - b).max() for (_, a), (_, b) in zip(model.calls, direct_calls)) > 1e-4


def test_sampling_names_stay_as_they_were_for_the_defaults_and_differ_otherwise():
  config = config_base.get_config()
  assert generate.sampling_name(config) == "ddim50_cfg1"
  config.sample.guidance_scale, config.sample.guidance_rescale = 2.0, 0.7
  config.sample.guidance_interval = (0.2, 0.8)
  assert generate.sampling_name(config) == "ddim50_cfg2_rescale0.7_interval0.2-0.8"
  assert evaluate.setting_name(config) == "ddim50_cfg2_rescale0.7_interval0.2-0.8_n1000_seed1"
  names = {generate.sampling_name(config)}
  for key, value in (("sample.timestep_spacing", "trailing"), ("sample.timestep_spacing", "linspace"),
                     ("sample.timestep_spacing", "leading"), ("sample.steps_offset", 1),
                     ("sample.final_step", "first_timestep"), ("diffusion.zero_snr_anchor", "first_timestep")):
    config_tree.set_values(config, {key: value})  # cumulative: each name differs from every earlier one
    name = generate.sampling_name(config)
    assert name.startswith("ddim50_cfg2_rescale0.7_interval0.2-0.8_") and name not in names, (key, name)
    names.add(name)
  assert name == ("ddim50_cfg2_rescale0.7_interval0.2-0.8_leading_offset1_final-first_timestep"
                  "_anchor-first_timestep")
  # steps_offset moves the 'leading' timesteps only: with another spacing the samples, and so the name, are the same.
  config.sample.timestep_spacing = "trailing"
  assert "offset" not in generate.sampling_name(config)
