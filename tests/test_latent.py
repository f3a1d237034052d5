"""The latent path end to end on CPU: the tiny ImageNet (fake ILSVRC archives, prepared by TFDS) -> encoded by a
small random VAE of Stable Diffusion's layout -> the latent config (tiny U-Net) trained with the self-perceptual
term -> samples decoded by the VAE -> evaluated with Inception features; plus the folder's format, resumption and
every error a user meets on the way."""

import json
import os

import numpy as np
import pytest

from conftest import load_config, override, random_inception_weights, write_random_vae
from selfperc_jax import encode_latents, modes, space, train, validation
from selfperc_jax import input_pipeline as pipeline
from selfperc_jax.data import latents
from selfperc_jax.errors import ConfigError

# A VAE of SD's layout at test size: two levels (downsampling 2), 8 and 16 channels.
VAE_LAYOUT = {"latent.block_out_channels": (8, 16), "latent.layers_per_block": 1, "latent.norm_groups": 4}


def _config(data_dir, latent_dir, vae_weights, **overrides):
  """configs/imagenet256_latent.py on the tiny ImageNet at 16x16 (8x8x4 latents), tiny U-Net, 8 devices."""
  config = load_config("imagenet256_latent", "gpu")
  override(config, **VAE_LAYOUT, **{
      "latent.vae_weights": str(vae_weights), "latent.dir": str(latent_dir), "latent.shard_size": 7,
      "latent.encode_batch_size": 4, "data.dir": data_dir, "data.image_size": 16, "data.num_workers": 0,
      "batch_size": 8, "model.base_channels": 16, "model.channel_mult": (1, 2), "model.num_res_blocks": 1,
      "model.attention_resolutions": (4,), "model.head_channels": 16, "model.dtype": "float32",
      "model.remat": False, "total_steps": 4, "log_every": 1, "checkpoint_every": 2, "sample_every": 0,
      "sample.steps": 2, "sample.num_samples": 8, "sample.batch_size": 8, "perceptual.start_step": 2,
      "optimizer.warmup_steps": 1, "eval.num_samples": 8})
  return override(config, **overrides)


def test_records_and_layout_round_trip():
  layout = latents.Layout("imagenet2012", "train", 16, 24, 7, True, (8, 8, 4), "sd", ((8, 16), 1, 4), "w (1 bytes)")
  assert latents.Layout.from_json(layout.to_json()) == layout
  assert layout.num_shards == 4 and layout.shard_range(3) == (21, 24) and layout.record_shape() == (4, 8, 8, 4)
  moments = np.random.default_rng(0).normal(size=(4, 8, 8, 4)).astype(np.float16)
  label, tokens, back = latents.decode_record(latents.encode_record(917, moments), (4, 8, 8, 4))
  assert label == 917 and tokens is None and np.array_equal(back, moments)
  ids = np.arange(77, dtype=np.int32) * 3
  label, tokens, back = latents.decode_record(latents.encode_record(0, moments, ids), (4, 8, 8, 4), 77)
  assert label == 0 and np.array_equal(tokens, ids) and np.array_equal(back, moments)
  old = json.loads(layout.to_json())  # a folder encoded before captions existed reads as one without them
  del old["text_tokens"], old["tokenizer"]
  assert latents.Layout.from_json(json.dumps(old)) == layout


def test_the_model_shape_is_the_latent_shape_and_the_config_checks_the_vae(tmp_path):
  config = _config("", tmp_path, tmp_path / "vae.safetensors")
  validation.validate(config)
  assert space.model_shape(config) == (8, 8, 4) and space.image_shape(config) == (16, 16, 3)
  for key, value, message in [("latent.vae", "sd3", "latent.vae='sd3' is not known"),
                              ("latent.norm_groups", 3, "latent.norm_groups=3 must divide"),
                              ("data.image_size", 15, "divisible by the VAE's downsampling factor 2"),
                              ("latent.flips", False, "data.random_flip=True in latent space needs")]:
    with pytest.raises(ConfigError, match=message):
      validation.validate(override(_config("", tmp_path, "x"), **{key: value}))


def test_a_missing_vae_file_or_latent_folder_stops_at_start_with_the_command(tmp_path):
  config = _config("", tmp_path / "latents", tmp_path / "missing.safetensors")
  with pytest.raises(ConfigError, match="latent.vae_weights=.*missing.safetensors.* is not a file.*README"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  vae = write_random_vae(tmp_path / "vae.safetensors", space.vae_config(config.latent))
  config = _config("", tmp_path / "latents", vae)
  with pytest.raises(ConfigError, match="(?s)no encoded latents in .*latents/train.*python -m selfperc_jax.encode_latents"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.fixture(scope="module")
def encoded(tiny_imagenet, tmp_path_factory):
  """The tiny ImageNet's train split encoded (24 images in 4 shards of 7), and the VAE file."""
  root = tmp_path_factory.mktemp("latent")
  probe = _config(tiny_imagenet, root / "latents", "x")
  vae = write_random_vae(root / "diffusion_pytorch_model.safetensors", space.vae_config(probe.latent))
  config = _config(tiny_imagenet, root / "latents", vae)
  result = encode_latents.run(config)
  assert result == {"encoded": 4, "skipped": 0, "images_per_s": result["images_per_s"]}
  return config, root


@pytest.mark.slow
def test_encoding_matches_the_vae_and_resumes_shard_by_shard(encoded):
  config, root = encoded
  directory = latents.split_dir(config.latent.dir, "train")
  layout = latents.read_layout(directory)
  assert layout.num_examples == 24 and layout.num_shards == 4 and layout.flips
  # Record i is image i of the data set through the VAE (its mirror image in moments 2 and 3).
  vae, variables = space.load_vae(config.latent)
  images = pipeline.open_image_source(config.data)
  source = latents.LatentSource(directory, layout, 1.0)
  for i in (0, 13, 23):
    x = images[i]["image"][None].astype(np.float32) / 127.5 - 1.0
    for k, image in ((0, x), (2, x[:, :, ::-1])):
      mean, logvar = vae.apply(variables, image, method=vae.encode)
      record = source[i]["moments"].astype(np.float32)
      np.testing.assert_allclose(record[k], np.asarray(mean[0]), rtol=2e-3, atol=2e-3)
      np.testing.assert_allclose(record[k + 1], np.exp(0.5 * np.asarray(logvar[0])), rtol=2e-3, atol=1e-4)
    assert source[i]["label"] == images[i]["label"]
  # A killed encoder leaves whole shards only; a rerun writes just the missing ones, the same bytes.
  last = os.path.join(directory, latents.shard_name(3, 4))
  before = open(last, "rb").read()
  os.remove(last)
  with pytest.raises(ConfigError, match="(?s)half-written: 1 of 4 shards are missing.*encode_latents"):
    pipeline.open_source(config)
  result = encode_latents.run(config)
  assert (result["encoded"], result["skipped"]) == (1, 3)
  assert open(last, "rb").read() == before
  # Another layout into the same folder is refused, by the encoder and by the trainer, naming what differs.
  other = override(_config(config.data.dir, config.latent.dir, config.latent.vae_weights),
                   **{"latent.flips": False, "data.random_flip": False})
  with pytest.raises(ConfigError, match="encoded differently:\n  flips: True there, False now"):
    encode_latents.run(other)
  with pytest.raises(ConfigError, match="encoded differently"):
    pipeline.open_source(other)


@pytest.mark.slow
def test_latent_batches_are_posterior_draws_that_resume_exactly(encoded):
  config, _ = encoded
  a = pipeline.build(config)
  first = [next(a) for _ in range(3)]
  assert first[0]["image"].shape == (8, 8, 8, 4) and first[0]["image"].dtype == np.float32
  state = a.get_state()
  rest = [next(a) for _ in range(2)]
  b = pipeline.build(config)
  b.set_state(state)
  for x, y in zip(rest, [next(b) for _ in range(2)]):
    np.testing.assert_array_equal(x["image"], y["image"])
  # z = (mean + std * noise) * scaling_factor, the noise differing between positions (epochs) of one example.
  whole = pipeline.build(override(_config(config.data.dir, config.latent.dir, config.latent.vae_weights),
                                  **{"batch_size": 24, "data.random_flip": False}))
  e1, e2 = next(whole), next(whole)
  order1, order2 = np.argsort(e1["label"], kind="stable"), np.argsort(e2["label"], kind="stable")
  assert not np.allclose(e1["image"][order1], e2["image"][order2])


@pytest.mark.slow
def test_the_latent_config_trains_samples_decodes_evaluates_and_resumes(encoded, tmp_path):
  config, root = encoded
  weights, reference = tmp_path / "inception.npz", tmp_path / "ref.npz"
  random_inception_weights(weights)
  images = pipeline.open_image_source(config.data)
  np.savez(reference, np.stack([images[i]["image"] for i in range(8)]))
  config = override(config, **{"eval.inception_weights": str(weights), "eval.reference": str(reference),
                               "eval.save_samples": True})

  straight = train.train_and_evaluate(config, str(tmp_path / "a"))
  assert straight["step"] == 4 and straight["loss_perceptual"] > 0  # the perceptual phase on the latent U-Net
  train.train_and_evaluate(config, str(tmp_path / "b"), num_steps=2)  # stops at step 2 (as if killed)
  resumed = train.train_and_evaluate(config, str(tmp_path / "b"))
  rows = lambda w: [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))]
  for x, y in zip(rows(tmp_path / "a"), rows(tmp_path / "b")):
    assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-6)
  assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-6)

  result = modes.evaluate_checkpoint(config, str(tmp_path / "a"))
  assert np.isfinite(result["fid"]) and result["num_samples"] == 8
  (saved,) = [f for f in os.listdir(tmp_path / "a" / "eval") if f.startswith("samples_step_4_")]
  with np.load(tmp_path / "a" / "eval" / saved) as f:
    assert f["arr_0"].shape == (8, 16, 16, 3) and f["arr_0"].dtype == np.uint8  # decoded images, not latents
    assert len(set(f["arr_0"].reshape(8, -1).sum(1).tolist())) > 1


@pytest.mark.slow
def test_two_processes_encode_their_own_shards_into_one_folder(encoded, tmp_path):
  """2 processes x 4 devices (as on a pod slice: shard i on process i mod 2) write what 1 process x 8 wrote."""
  from conftest import start_two_processes

  config, _ = encoded
  flags = ["--config=configs/imagenet256_latent.py:gpu", f"--config.data.dir={config.data.dir}",
           "--config.data.image_size=16", f"--config.latent.vae_weights={config.latent.vae_weights}",
           f"--config.latent.dir={tmp_path / 'latents'}", "--config.latent.shard_size=7",
           "--config.latent.encode_batch_size=4", "--config.latent.block_out_channels=(8,16)",
           "--config.latent.layers_per_block=1", "--config.latent.norm_groups=4"]
  procs = start_two_processes("selfperc_jax.encode_latents", flags)
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "2 of its 2 shards to do" in outputs[0] and "2 of its 2 shards to do" in outputs[1]
  assert "complete." in outputs[0]
  one = latents.split_dir(config.latent.dir, "train")
  two = latents.split_dir(str(tmp_path / "latents"), "train")
  assert latents.read_layout(two) == latents.read_layout(one)
  a = latents.LatentSource(one, latents.read_layout(one), 1.0)
  b = latents.LatentSource(two, latents.read_layout(two), 1.0)
  for i in range(len(a)):
    assert a[i]["label"] == b[i]["label"]
    np.testing.assert_allclose(a[i]["moments"].astype(np.float32), b[i]["moments"].astype(np.float32),
                               rtol=2e-3, atol=2e-3)
