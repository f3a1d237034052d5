"""Chunked, sharded sampling: samples depend only on (seed, index), memory only on the chunk size."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from selfperc_jax import diffusion, generate, images, samplers, sharding
from selfperc_jax.errors import ConfigError

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
  c.diffusion = ml_collections.ConfigDict({"prediction": "v"})
  c.model = ml_collections.ConfigDict({"num_classes": NUM_CLASSES})
  c.sample = ml_collections.ConfigDict({
      "sampler": sampler, "steps": 4, "guidance_scale": guidance_scale, "guidance_rescale": 0.0,
      "guidance_interval": (0.0, 1.0), "batch_size": batch_size})
  return c


@pytest.fixture(scope="module")
def model_and_params():
  model = TinyDenoiser()
  params = model.init(jax.random.key(0), jnp.zeros((1,) + SHAPE), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
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
  labels = generate.class_labels(20, NUM_CLASSES)  # 21 labels: 7 per class
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
  direct = samplers.sample(lambda x, t, y: model.apply({"params": params}, x, t, y),
                           diffusion.Schedule("cosine", 0, True), "v", jax.random.key(3), jnp.asarray(labels), SHAPE,
                           sampler=sampler, num_steps=s.steps, guidance_scale=s.guidance_scale,
                           null_class=NUM_CLASSES)
  assert np.abs(images.to_uint8(direct).astype(int) - reference).max() <= 1


def test_a_draw_resumes_from_any_chunk_and_seeds_differ(model_and_params):
  model, params = model_and_params
  gen = _generator(model, _config(batch_size=8))
  labels = generate.class_labels(24, NUM_CLASSES)
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
    count = sum(1 for _ in gen.chunks(params, generate.class_labels(n, NUM_CLASSES), seed=0))
    assert count == -(-len(generate.class_labels(n, NUM_CLASSES)) // 64)
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
  labels = generate.class_labels(300, NUM_CLASSES)
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
  labels = generate.class_labels(12, NUM_CLASSES)
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
  np.testing.assert_array_equal(generate.class_labels(5, 3), [0, 0, 1, 1, 2, 2])  # rounded up to 2 per class
  np.testing.assert_array_equal(generate.class_labels(4, 10, classes=(7, 2)), [7, 7, 2, 2])
  np.testing.assert_array_equal(generate.class_labels(5, 1000), [0, 250, 500, 749, 999])  # one each, spread
