"""Stable Diffusion in the project: the text condition (conditioning.py, text.py), the SD U-Net as the denoiser
(models/sd.py), the model folder (pretrained.py), configs/sd21_base.py and --mode=sample from prompts, on the small
random folder of benchmarks/fake_sd.py (`sd_folder`). Parity with diffusers' pipeline: tests/test_sd_pipeline.py."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_config, override, start_two_processes, subprocess_env
from selfperc_jax import conditioning, modes, text, validation
from selfperc_jax.errors import ConfigError
from selfperc_jax.models import sd
from third_party.sd_unet import model as sd_unet

PROMPTS = ("a photo of a cat", "a red car on a road")


def _config(folder, arg="tiny", **values):
  config = load_config("sd21_base", arg)
  return override(config, **{"pretrained": folder, "sample.prompts": PROMPTS, **values})


@pytest.mark.parametrize("arg", ["", "mse", "dpm", "tiny", "tiny,mse", "tiny,dpm", "mse,dpm"])
def test_every_sd21_variant_is_valid_with_a_model_folder(sd_folder, arg):
  validation.validate(_config(sd_folder, arg))


@pytest.mark.parametrize("arg", ["stabilityai", "stabilityai,dpm", "stabilityai,tiny"])
def test_the_stabilityai_variant_agrees_with_sd21_bases_own_scheduler_config(arg, tmp_path):
  from benchmarks import fake_sd

  with open(os.path.join(REPO, "tests", "fixtures", "scheduler_parity", "sd21_base_scheduler_config.json")) as f:
    folder = fake_sd.write_folder(str(tmp_path / "sd21"), scheduler=json.load(f))
  validation.validate(_config(folder, arg))
  with pytest.raises(ConfigError, match="diffusion.prediction='v' but"):  # the paper's models' settings do not
    validation.validate(_config(folder, arg.replace("stabilityai", "mse")))


def test_sd21_rejects_unknown_arguments():
  for arg in ("huge", "tpu,gpu"):
    with pytest.raises(ValueError, match="bad argument.*use 'tpu' \\(default\\) or 'gpu'"):
      load_config("sd21_base", arg)


def test_a_missing_or_incomplete_folder_is_one_error_naming_what_is_missing(sd_folder, tmp_path):
  with pytest.raises(ConfigError, match="set --config.pretrained=FOLDER"):
    validation.validate(_config(sd_folder, pretrained=""))
  with pytest.raises(ConfigError, match="is not a folder"):
    validation.validate(_config(str(tmp_path / "nowhere")))
  partial = tmp_path / "partial"
  shutil.copytree(sd_folder, partial)
  shutil.rmtree(partial / "text_encoder")
  os.remove(partial / "vae" / "diffusion_pytorch_model.safetensors")
  with pytest.raises(ConfigError, match=r"lacks text_encoder/config.json, text_encoder/model.safetensors, "
                                        r"vae/diffusion_pytorch_model.safetensors"):
    validation.validate(_config(str(partial)))


def test_a_config_that_contradicts_the_folders_scheduler_is_an_error_naming_both_values(sd_folder, tmp_path):
  folder = tmp_path / "eps"
  shutil.copytree(sd_folder, folder)
  with open(folder / "scheduler" / "scheduler_config.json") as f:
    scheduler = json.load(f)
  scheduler["prediction_type"] = "epsilon"
  with open(folder / "scheduler" / "scheduler_config.json", "w") as f:
    json.dump(scheduler, f)
  with pytest.raises(ConfigError, match=r"diffusion.prediction='v' but .*scheduler_config.json says .*'eps'"):
    validation.validate(_config(str(folder)))
  # The paper's settings are the default: the released models' scheduler config agrees with it.
  with pytest.raises(ConfigError, match="sample.timestep_spacing='leading' but"):
    validation.validate(_config(sd_folder, **{"sample.timestep_spacing": "leading"}))


def test_text_settings_are_checked_where_they_do_not_fit(sd_folder, tmp_path):
  with pytest.raises(ConfigError, match="condition='text' needs a text-conditioned U-Net"):
    validation.validate(override(load_config("digits"), condition="text"))
  with pytest.raises(ConfigError, match="are for condition='text'"):
    validation.validate(override(load_config("digits"), **{"sample.prompts": ("a cat",)}))
  with pytest.raises(ConfigError, match="sample.prompts_file=.* is not a file"):
    validation.validate(_config(sd_folder, **{"sample.prompts_file": str(tmp_path / "none.txt")}))
  with pytest.raises(ConfigError, match="model.arch='sd' is text-conditioned"):
    validation.validate(_config(sd_folder, condition="class", **{"data.name": "none"}))
  with pytest.raises(ConfigError, match="model.arch='nope' is not known"):
    validation.validate(_config(sd_folder, **{"model.arch": "nope"}))


def _text_conditioning(null=0.0, negative=None):
  shape = (3, 4)
  return conditioning.Conditioning(
      kind="text", num_classes=0, null_embedding=np.full(shape, null, np.float32),
      prompt_embeddings=np.stack([np.full(shape, 10.0 + i, np.float32) for i in range(3)]),
      negative_embedding=None if negative is None else np.full(shape, negative, np.float32))


def test_text_dropout_gives_the_empty_prompt_at_its_rate_and_the_copy_sees_the_same_or_null_text():
  cond = _text_conditioning(null=-1.0)
  y = jnp.asarray(cond.model_inputs(np.array([0, 1, 2] * 1000)))
  dropped = np.asarray(cond.drop(jax.random.key(0), y, 0.25))
  is_null = np.all(dropped == -1.0, axis=(1, 2))
  assert 0.22 < is_null.mean() < 0.28
  np.testing.assert_array_equal(dropped[~is_null], np.asarray(y)[~is_null])  # the others keep their own prompt
  np.testing.assert_array_equal(cond.for_copy(y, "same"), y)
  np.testing.assert_array_equal(cond.for_copy(y, "null"), np.full(y.shape, -1.0))
  assert cond.model_classes == 0 and cond.conditional
  assert cond.example(5).shape == (5, 3, 4) and cond.example(5).dtype == jnp.float32


def test_text_draws_are_prompt_indices_each_alike_and_guidance_takes_the_negative_prompt():
  cond = _text_conditioning(null=-1.0, negative=-2.0)
  drawn = cond.draw(7)
  np.testing.assert_array_equal(drawn, [0, 0, 0, 1, 1, 1, 2, 2, 2])  # rounded up: one grid row per prompt
  np.testing.assert_array_equal(cond.model_inputs(drawn)[:, 0, 0], 10.0 + drawn)
  np.testing.assert_array_equal(cond.guidance_null, np.full((3, 4), -2.0))
  np.testing.assert_array_equal(_text_conditioning(null=-1.0).guidance_null, np.full((3, 4), -1.0))


# Three forwards of the U-Net run op by op; in the fast subset the pipeline parity test (tests/test_sd_pipeline.py)
# proves the timestep against diffusers end to end, and tests/test_sd_unet.py the U-Net's tap call.
@pytest.mark.slow
def test_the_sd_denoiser_gives_the_unet_diffusers_integer_timestep(sd_folder):
  config = _config(sd_folder)
  model = sd.from_config(config, jnp.float32, None)
  params = sd.load_params(config)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  y = jax.random.normal(jax.random.key(1), (2, 77, 32))
  k = np.array([999, 36])
  t = jnp.asarray((k + 1) / 1000, jnp.float32)  # diffusion.py's time of diffusers' timestep k
  want = sd_unet.UNet2DConditionModel(model.config).apply({"params": params["unet"]}, x, k.astype(np.float32), y)
  np.testing.assert_array_equal(model.apply({"params": params}, x, t, y), want)
  taps = model.apply({"params": params}, x, t, y, taps=("mid",))
  assert set(taps) == {"mid"} and taps["mid"].shape == (2, 4, 4, 64)


def _sample(folder, workdir, **values):
  config = _config(folder, **values)
  return config, modes.sample_from_checkpoint(config, str(workdir))


def test_sample_mode_draws_each_prompt_from_the_folder_and_writes_grid_npz_and_prompts(sd_folder, tmp_path):
  config, png = _sample(sd_folder, tmp_path / "w")
  stem = png[:-4]
  assert os.path.basename(stem).startswith("pretrained_ddim4_cfg1_trailing")
  with np.load(stem + ".npz") as data:
    images, labels = data["arr_0"], data["arr_1"]
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [0, 0, 1, 1])
  assert images.std() > 5  # not a flat image
  with open(stem + ".json") as f:
    record = json.load(f)
  assert record["prompts"] == list(PROMPTS) and record["prompt_of_sample"] == [0, 0, 1, 1]
  assert np.abs(images[0].astype(int) - images[1]).max() > 0  # the two samples of a prompt have their own noise


@pytest.mark.slow  # traces and runs the pipeline twice; the test above covers the fast subset
def test_a_second_draw_from_prompts_with_the_seed_is_the_same(sd_folder, tmp_path):
  draws = []
  for workdir in ("w", "w2"):
    _, png = _sample(sd_folder, tmp_path / workdir)
    with np.load(png[:-4] + ".npz") as data:
      draws.append(data["arr_0"])
  np.testing.assert_array_equal(draws[0], draws[1])


@pytest.mark.slow
def test_a_negative_prompt_and_guidance_change_the_samples_and_their_name(sd_folder, tmp_path):
  _, plain = _sample(sd_folder, tmp_path / "w", **{"sample.guidance_scale": 7.5})
  _, negative = _sample(sd_folder, tmp_path / "w", **{"sample.guidance_scale": 7.5,
                                                       "sample.negative_prompt": "blurry"})
  assert "cfg7.5" in plain and "_negative-" in negative and "_negative-" not in plain
  with np.load(plain[:-4] + ".npz") as a, np.load(negative[:-4] + ".npz") as b:
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"]).mean() > 1


def test_prompts_come_from_a_file_and_too_long_ones_are_one_error(sd_folder, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a small house\n\nthe sea at night\n")
  text._encode.cache_clear()
  config = _config(sd_folder, **{"sample.prompts": (), "sample.prompts_file": str(prompts)})
  assert text.prompts_of(config) == ("a small house", "the sea at night")
  cond = conditioning.from_config(config)
  assert cond.prompt_count == 2 and cond.model_inputs(np.array([1, 0, 1])).shape == (3, 77, 32)
  # Encoded a chunk at a time: a prompt's embedding is the same whichever prompts share its chunk.
  np.testing.assert_array_equal(cond.model_inputs(np.array([1, 0, 1]))[0], cond.model_inputs(np.array([1]))[0])
  long = _config(sd_folder, **{"sample.prompts": ("a cat", "word " * 80)})
  with pytest.raises(ConfigError, match=r"sample.prompts\[1\] is longer than the text encoder's 75 tokens"):
    conditioning.from_config(long)
  with pytest.raises(ConfigError, match="set --config.sample.prompts="):  # a draw needs prompts (training does not)
    conditioning.from_config(_config(sd_folder, **{"sample.prompts": ()})).draw(4)
  with pytest.raises(ConfigError, match="set --config.sample.prompts="):  # nor do grids while training
    conditioning.from_config(_config(sd_folder, **{"sample.prompts": (), "sample_every": 10}))


def test_training_and_evaluation_of_a_text_config_are_refused_with_nothing_written(sd_folder, tmp_path):
  from selfperc_jax import train

  workdir = tmp_path / "w"
  with pytest.raises(ConfigError, match="data.name='none' has no images to train on"):
    train.train_and_evaluate(_config(sd_folder, **{"data.name": "none"}), str(workdir))
  with pytest.raises(ConfigError, match="latent.dir is empty: set it to the folder of the encoded latents, made once "
                                        "with\n  python -m selfperc_jax.encode_latents"):
    train.train_and_evaluate(_config(sd_folder), str(workdir))  # image-caption data, not encoded yet
  assert not os.path.exists(workdir / "checkpoints")
  with pytest.raises(ConfigError, match="--mode=eval of a text-to-image model"):
    modes.evaluate_checkpoint(_config(sd_folder), str(tmp_path / "e"))
  assert not os.path.exists(tmp_path / "e")


@pytest.mark.slow
def test_two_processes_sample_the_same_images_as_one(sd_folder, tmp_path):
  args = ["--config=configs/sd21_base.py:tiny", "--mode=sample", f"--config.pretrained={sd_folder}",
          f"--config.sample.prompts={PROMPTS!r}", "--config.sample.num_samples=12", "--config.sample.batch_size=8",
          "--config.sample.guidance_scale=3"]
  procs = start_two_processes("selfperc_jax.main", [*args, f"--workdir={tmp_path / 'multi'}"])
  single = subprocess.run([sys.executable, "-m", "selfperc_jax.main", *args, f"--workdir={tmp_path / 'single'}"],
                          cwd=REPO, env=subprocess_env(8), capture_output=True, text=True, timeout=600)
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert single.returncode == 0, single.stderr[-3000:]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  name = sorted(f for f in os.listdir(tmp_path / "single" / "samples") if f.endswith(".npz"))
  assert name == sorted(f for f in os.listdir(tmp_path / "multi" / "samples") if f.endswith(".npz"))
  with np.load(tmp_path / "single" / "samples" / name[0]) as a, np.load(tmp_path / "multi" / "samples" / name[0]) as b:
    assert a["arr_0"].shape == (12, 16, 16, 3)  # two chunks of 8, the last one padded
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def test_weights_of_another_layout_and_an_unknown_tokenizer_are_one_error_line_with_nothing_written(sd_folder,
                                                                                                     tmp_path):
  from selfperc_jax.errors import UserError

  swapped = tmp_path / "swapped"
  shutil.copytree(sd_folder, swapped)
  shutil.copy(swapped / "vae" / "diffusion_pytorch_model.safetensors",
              swapped / "unet" / "diffusion_pytorch_model.safetensors")
  with pytest.raises(ConfigError) as e:
    modes.sample_from_checkpoint(_config(str(swapped)), str(tmp_path / "w"))
  assert "\n" not in str(e.value) and "does not fit the unet layout of its folder (208 missing" in str(e.value)
  other = tmp_path / "t5"
  shutil.copytree(sd_folder, other)
  config_path = other / "tokenizer" / "tokenizer_config.json"
  config_path.write_text(config_path.read_text().replace('"CLIPTokenizer"', '"T5Tokenizer"'))
  text.encoder.cache_clear()
  with pytest.raises(UserError, match="names tokenizer_class 'T5Tokenizer'") as e:
    modes.sample_from_checkpoint(_config(str(other)), str(tmp_path / "w"))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "w" / "samples")
