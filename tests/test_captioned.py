"""Image-caption data (data/captioned.py) through the latent encoder: img2dataset's webdataset shards and a folder
with a captions .jsonl, SD's crop, token ids stored with the latents, bad examples counted and named, resume."""

import copy
import io
import json
import os
import shutil
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import load_config, override
from selfperc_jax import encode_latents, space, text, validation
from selfperc_jax.data import captioned, latents
from selfperc_jax.errors import ConfigError


def _image(width, height, seed, fmt="PNG"):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format=fmt)
  return pixels, out.getvalue()


# key: (image bytes or None, caption or None); the examples both formats hold, in their order
def _examples():
  return {
      "000000000": (_image(24, 16, 0)[1], "a photo of a red cube"),
      "000000001": (_image(12, 30, 1, "JPEG")[1], "two cats on a sofa"),
      "000000002": (b"\xff\xd8 not a jpeg", "a broken file"),  # unreadable
      "000000003": (_image(20, 20, 3)[1], "   "),  # blank caption
      "000000004": (_image(40, 18, 4, "WEBP")[1], "a lighthouse at dusk"),
      "000000005": (_image(16, 16, 5)[1], None),  # no .txt
  }


def write_webdataset(folder, examples=None, per_tar=3):
  """Tar shards as img2dataset writes them: <key>.<ext>, <key>.txt, <key>.json (and a key with only .json)."""
  os.makedirs(folder, exist_ok=True)
  items = list((examples or _examples()).items())
  for t in range(0, len(items), per_tar):
    with tarfile.open(os.path.join(folder, f"{t // per_tar:05d}.tar"), "w") as tar:
      def add(name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
      for key, (data, caption) in items[t:t + per_tar]:
        ext = "jpg" if data.startswith(b"\xff\xd8") else ("webp" if data[8:12] == b"WEBP" else "png")
        add(f"{key}.{ext}", data)
        if caption is not None:
          add(f"{key}.txt", caption.encode())
        add(f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
      add(f"9{t:08d}.json", b'{"status": "failed_to_download"}')  # no image: not an example
  return str(folder)


def write_imagefolder(folder, examples=None):
  """Images in a subfolder and metadata.jsonl naming them (one missing file, one unparseable line)."""
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  lines = []
  for key, (data, caption) in (examples or _examples()).items():
    with open(os.path.join(folder, "images", key + ".img"), "wb") as f:
      f.write(data)
    lines.append(json.dumps({"file_name": f"images/{key}.img", **({"text": caption} if caption is not None else {})}))
  lines.insert(2, json.dumps({"file_name": "images/missing.png", "text": "gone"}))
  lines.insert(4, "{not json")
  with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n\n")
  return str(folder)


def test_sd_crop_resizes_the_short_side_then_cuts_the_centre():
  pixels = np.zeros((30, 60, 3), np.uint8)
  pixels[:, 15:45] = 200  # the centre square of the landscape image is bright, its sides dark
  out = captioned.sd_crop(Image.fromarray(pixels), 10)
  assert out.shape == (10, 10, 3) and out.dtype == np.uint8
  assert out[:, 1:-1].min() == 200  # only the centre's columns are left (the edges may blend)
  portrait = captioned.sd_crop(Image.fromarray(np.full((50, 20, 3), 7, np.uint8)), 8)
  assert portrait.shape == (8, 8, 3) and (portrait == 7).all()


@pytest.mark.parametrize("kind", ["webdataset", "imagefolder"])
def test_both_formats_read_every_example_and_flag_the_ones_that_cannot_be_used(kind, tmp_path):
  directory = (write_webdataset if kind == "webdataset" else write_imagefolder)(tmp_path / kind)
  source = captioned.open_source(override(load_config("sd21_base", "tiny"),
                                          **{"data.name": kind, "data.dir": directory}).data)
  rows = [source[i] for i in range(len(source))]
  by_key = {r["key"].split("/")[-1].removesuffix(".img"): r for r in rows}
  assert by_key["000000000"]["caption"] == "a photo of a red cube" and by_key["000000000"]["status"] == captioned.OK
  assert by_key["000000002"]["status"] == captioned.UNREADABLE
  assert by_key["000000003"]["status"] == by_key["000000005"]["status"] == captioned.NO_CAPTION
  assert by_key["000000004"]["status"] == captioned.OK  # webp
  assert all(r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8 for r in rows)
  expected = captioned.sd_crop(Image.open(io.BytesIO(_examples()["000000001"][0])), 16)
  np.testing.assert_array_equal(by_key["000000001"]["image"], expected)
  if kind == "webdataset":
    assert len(source) == 6  # the keys with only a .json are not examples
  else:
    assert len(source) == 8 and by_key["missing.png"]["status"] == captioned.UNREADABLE
    assert by_key["metadata.jsonl line 5"]["status"] == captioned.UNREADABLE  # the unparseable line, by its number


def test_a_folder_without_data_is_one_error_naming_what_to_give(tmp_path):
  config = load_config("sd21_base", "tiny")
  with pytest.raises(ConfigError, match="holds no .tar shards.*imagefolder"):
    captioned.open_source(override(config, **{"data.name": "webdataset", "data.dir": str(tmp_path)}).data)
  (tmp_path / "captions.jsonl").write_text("")
  (tmp_path / "metadata.jsonl").write_text("")
  with pytest.raises(ConfigError, match="one captions file.*it holds captions.jsonl and metadata.jsonl"):
    captioned.open_source(override(config, **{"data.name": "imagefolder", "data.dir": str(tmp_path)}).data)
  with pytest.raises(ConfigError, match="data.dir, which is not set"):
    captioned.open_source(override(config, **{"data.name": "imagefolder", "data.dir": ""}).data)


def test_captioned_data_needs_latents_and_a_text_condition():
  config = override(load_config("digits", "text"), **{"data.name": "webdataset", "eval.features": "inception"})
  with pytest.raises(ConfigError, match="read through the latent encoder.*latent.vae='sd'"):
    validation.validate(config)
  config = override(load_config("digits", ""), **{"data.name": "webdataset", "latent.vae": "sd",
                                                  "data.image_size": 16, "eval.features": "inception"})
  with pytest.raises(ConfigError, match="has captions, not classes: set condition='text'"):
    validation.validate(config)


def _encode_config(sd_folder, kind, directory, latent_dir, **overrides):
  return override(load_config("sd21_base", "tiny"), **{
      "pretrained": sd_folder, "data.name": kind, "data.dir": directory, "latent.dir": str(latent_dir),
      "latent.shard_size": 3, "latent.encode_batch_size": 4, **overrides})


@pytest.mark.parametrize("kind", ["webdataset", "imagefolder"])
def test_encoding_stores_the_token_ids_skips_bad_examples_with_a_summary_and_resumes(kind, sd_folder, tmp_path,
                                                                                    capsys):
  directory = (write_webdataset if kind == "webdataset" else write_imagefolder)(tmp_path / kind)
  config = _encode_config(sd_folder, kind, directory, tmp_path / "latents")
  result = encode_latents.run(config)
  out = capsys.readouterr().out
  n, shards = (6, 2) if kind == "webdataset" else (8, 3)
  assert (result["encoded"], result["skipped"]) == (shards, 0)
  bad = 1 if kind == "webdataset" else 3  # + the missing file and the unparseable line
  assert (f"3 captioned examples of {n} encoded; skipped {bad} unreadable images (e.g. " in out
          and "2 empty or missing captions (e.g. " in out), out
  split = latents.split_dir(config.latent.dir, "train")
  layout = latents.read_layout(split)
  tok = text.tokenizer(sd_folder)
  assert layout.text_tokens == tok.max_length == 77 and "sha256" in layout.tokenizer
  source = space.open_latents(config)  # what the trainer will read
  assert len(source) == 3  # the usable examples: 0, 1, 4 in order
  captions = ["a photo of a red cube", "two cats on a sofa", "a lighthouse at dusk"]
  for i, caption in enumerate(captions):
    np.testing.assert_array_equal(source[i]["tokens"], tok.encode([caption])[0])
  # Record 1 is image 1's posterior through the folder's VAE (SD's crop of it).
  vae, variables = space.load_vae(space.latent_section(config))  # the folder's vae/
  image = captioned.sd_crop(Image.open(io.BytesIO(_examples()["000000001"][0])), 16)
  encode = jax.jit(lambda v, x: vae.apply(v, x, method=vae.encode))  # one program (eagerly, one per operation)
  mean, logvar = encode(variables, image[None].astype(np.float32) / 127.5 - 1.0)
  np.testing.assert_allclose(source[1]["moments"][0].astype(np.float32), np.asarray(mean[0]), rtol=2e-3, atol=2e-3)
  np.testing.assert_array_equal(source.draw(1, False, np.random.default_rng(0))["label"], source[1]["tokens"])

  # A killed run resumes: the missing shard is written again with its count; the summary is the same.
  last = os.path.join(split, latents.shard_name(shards - 1, shards))
  before = open(last, "rb").read()
  os.remove(last)
  assert encode_latents.run(config)["encoded"] == 1 and open(last, "rb").read() == before
  assert encode_latents.summary(split, layout) in capsys.readouterr().out
  # Another tokenizer's ids are another encoding: refused by the encoder, naming the tokenizer.
  other = tmp_path / "other_sd"  # the same folder with SD 1.x's style of tokenizer
  shutil.copytree(sd_folder, other)
  shutil.rmtree(other / "tokenizer")
  shutil.copytree(os.path.join(os.path.dirname(text.BUILTIN_TOKENIZER), "tokenizer_sd1"), other / "tokenizer")
  with pytest.raises(ConfigError, match="encoded differently:\n  tokenizer: 'CLIP BPE.*' there, 'CLIP BPE.*' now"):
    encode_latents.run(override(config, **{"pretrained": str(other)}))


@pytest.mark.slow
def test_a_run_on_encoded_captions_trains_both_phases_resumes_and_runs_on_two_processes(sd_folder, tmp_path):
  """Encoded webdataset -> MSE then self-perceptual steps, the condition the frozen text encoder's hidden states of
  each example's caption, computed in the step (equal to the host's encoding), never trained or checkpointed; a run
  stopped at step 2 and resumed is the uninterrupted run of 2 processes x 4 devices."""
  import jax

  from conftest import start_two_processes
  from selfperc_jax import conditioning, sharding, train
  from selfperc_jax.setup import Setup

  examples = {**_examples(), **{f"1{i:08d}": (_image(20 + i, 16, 10 + i)[1], f"picture number {i}") for i in range(9)}}
  data = write_webdataset(tmp_path / "wds", examples)
  values = {"pretrained": sd_folder, "data.name": "webdataset", "data.dir": data, "latent.dir": str(tmp_path / "lat"),
            "latent.shard_size": 3, "latent.encode_batch_size": 4, "total_steps": 4, "perceptual.start_step": 2,
            "batch_size": 8, "log_every": 1, "checkpoint_every": 4, "optimizer.warmup_steps": 1,
            "loss.label_dropout": 0.0, "sample.prompts": ("a red cube",),
            "model.sd_layout": "tiny"}  # a one-level U-Net from scratch; the folder's text encoder and VAE
  config = override(load_config("sd21_base", "tiny"), **values)
  encode_latents.run(config)
  procs = start_two_processes("selfperc_jax.main", ["--config=configs/sd21_base.py:tiny", f"--workdir={tmp_path / 'two'}"]
                              + [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
                                 for k, v in values.items()])
  cond = conditioning.from_config(config)
  frozen = conditioning.frozen_params(config)
  tokens = space.open_latents(config)[1]["tokens"][None]
  host = text.encoder(sd_folder).encode(["two cats on a sofa"])
  np.testing.assert_allclose(np.asarray(cond.from_labels(tokens, text_params=frozen["text"])), host, atol=1e-5)

  train.train_and_evaluate(config, str(tmp_path / "r"), num_steps=2)  # stopped at step 2 (as if killed)
  final = train.train_and_evaluate(config, str(tmp_path / "r"))
  assert final["step"] == 4 and final["loss_perceptual"] > 0 and np.isfinite(final["loss"])
  outputs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  # The uninterrupted run of two processes and the resumed run of one: the same losses, step by step.
  rows = lambda w: [json.loads(line) for line in open(tmp_path / w / "metrics.jsonl")]
  assert [r["step"] for r in rows("r")] == [r["step"] for r in rows("two")] == [1, 2, 3, 4]
  for x, y in zip(rows("two"), rows("r")):
    assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
  # The caption reaches the loss: the same state and noise, other captions, another loss.
  setup = Setup(config, with_data=True)
  state, key = setup.init_state(jax.random.key(0)), jax.random.key(1)
  batch = next(setup.pipeline)
  other = {**batch, "label": batch["label"][::-1].copy()}
  losses = [float(setup.step_fn(0)(setup.init_state(jax.random.key(0)), sharding.global_batch(b, setup.mesh),
                                   key)[1]["loss"]) for b in (batch, other)]
  assert losses[0] != losses[1] and not any("text" in str(k) for k in jax.tree_util.tree_flatten_with_path(state)[0])


def _init_from_folder_config(sd_folder, tmp_path):
  return _encode_config(sd_folder, "webdataset", "", tmp_path / "latents", **{
      "init_from": sd_folder, "finetune.optimizer_state": "reset", "perceptual.start_step": 0,
      "perceptual.mse_weight": 0.0, "batch_size": 8})


@pytest.mark.slow  # compiles the SD train state's sharded init
def test_init_from_a_model_folder_starts_online_ema_and_copy_from_its_unet(sd_folder, tmp_path):
  """The paper fine-tunes the released model: online params = sampling EMA = copy = the folder's U-Net, a fresh
  Adam state."""
  import jax

  from selfperc_jax import checkpoint, resume
  from selfperc_jax.models import sd
  from selfperc_jax.setup import Setup

  config = _init_from_folder_config(sd_folder, tmp_path)
  setup = Setup(config, str(tmp_path / "w"), with_data=False)
  state, restored = resume.restore_or_init(setup, checkpoint.Checkpointer(str(tmp_path / "w" / "ckpt"), 1),
                                           jax.random.key(0))
  assert restored is None
  folder = sd.load_folder_params(sd_folder)
  for tree in (state.params, state.ema_params, state.perceptual_params):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), tree, folder)
  assert int(jax.tree.leaves(state.opt_state)[0]) == 0  # Adam's count: fresh


def test_settings_that_cannot_hold_for_a_model_folder_are_one_error_line_each(sd_folder, tmp_path):
  config = _init_from_folder_config(sd_folder, tmp_path)
  validation.validate(config)
  for overrides, words in (({"finetune.optimizer_state": "carry"}, "holds no optimizer state: set --config.finetune"
                                                                     ".optimizer_state=reset"),
                           ({"model.sd_layout": "tiny"}, "set model.arch='sd' with model.sd_layout=''"),
                           ({"sample.timestep_spacing": "leading"}, "(?s)disagrees with the model folder's scheduler "
                                                                     "config:.*retrain_schedule=True")):
    with pytest.raises(ConfigError, match=words):
      validation.validate(override(copy.deepcopy(config), **overrides))
  validation.validate(override(copy.deepcopy(config), **{"sample.timestep_spacing": "leading",
                                                         "retrain_schedule": True}))
  # Without init_from, the model folder itself (pretrained) is where a run of its U-Net starts.
  from selfperc_jax import pretrained
  assert pretrained.start_folder(override(copy.deepcopy(config), init_from="")) == sd_folder
  assert pretrained.start_folder(override(copy.deepcopy(config), **{"init_from": "", "model.sd_layout": "tiny"})) == ""


def test_a_coco_captions_file_gives_one_caption_per_image_and_bad_files_one_error(sd_folder, tmp_path):
  """COCO's captions json as sample.prompts_file: the lowest-id caption of each image, images by id; a draw of
  fewer samples than prompts takes prompts spread evenly over them."""
  from selfperc_jax import conditioning
  from selfperc_jax.data import coco

  data = {"images": [{"id": 9, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"}, {"id": 5, "file_name": "c.jpg"}],
          "annotations": [{"image_id": 9, "id": 20, "caption": "a dog  on a\\nbeach "},
                          {"image_id": 9, "id": 11, "caption": "A dog running."},
                          {"image_id": 3, "id": 30, "caption": "Two cats."},
                          {"image_id": 5, "id": 7, "caption": "   "}]}  # image 5 has no caption: not a prompt
  path = tmp_path / "captions_val2014.json"
  path.write_text(json.dumps(data))
  assert coco.read_captions(str(path)) == [(3, "a.jpg", "Two cats."), (9, "b.jpg", "A dog running.")]
  config = override(load_config("sd21_base", "tiny"), **{"pretrained": sd_folder, "sample.prompts_file": str(path)})
  assert text.prompts_of(config) == ("Two cats.", "A dog running.")
  cond = conditioning.from_config(config)
  np.testing.assert_array_equal(cond.draw(1), [0])
  np.testing.assert_array_equal(cond.draw(4), [0, 0, 1, 1])
  (tmp_path / "bad.json").write_text('{"images": []}')
  with pytest.raises(ConfigError, match="bad.json is not a COCO captions file \\(KeyError"):
    coco.read_captions(str(tmp_path / "bad.json"))


@pytest.mark.slow
def test_eval_mode_scores_samples_from_coco_prompts_against_a_reference_and_records_the_prompts(sd_folder, tmp_path):
  """--mode=eval of a text-to-image model: the folder's own weights (no checkpoint yet), samples drawn from a COCO
  captions file in chunks, FID / IS with the Inception network against a reference, each sample's prompt written."""
  from conftest import random_inception_weights
  from selfperc_jax import modes

  captions = tmp_path / "captions_val2014.json"
  captions.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(5)],
                                  "annotations": [{"image_id": i, "id": i, "caption": f"picture {i}"}
                                                  for i in range(5)]}))
  weights, reference = tmp_path / "inception.npz", tmp_path / "ref.npz"
  random_inception_weights(weights)
  np.savez(reference, np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
  config = override(load_config("sd21_base", "tiny"), **{
      "pretrained": sd_folder, "sample.prompts_file": str(captions), "sample.batch_size": 8, "sample.steps": 2,
      "eval.features": "inception", "eval.inception_weights": str(weights), "eval.reference": str(reference),
      "eval.num_samples": 8})
  result = modes.evaluate_checkpoint(config, str(tmp_path / "w"))
  assert result["step"] == "pretrained" and np.isfinite(result["fid"]) and result["num_samples"] == 10
  assert result["prompts_given"] == result["prompts_drawn"] == 5  # 8 rounded up to 2 per prompt
  lines = open(result["prompts"]).read().splitlines()
  assert lines == [f"picture {i}" for i in range(5) for _ in range(2)]


def test_the_sd_comparison_fine_tunes_both_branches_from_the_folder_without_a_pretraining_stage(sd_folder, tmp_path):
  from selfperc_jax import stages

  config = override(load_config("sd21_base", "tiny"), **{"pretrained": sd_folder, "total_steps": 6})
  built = stages.stage_configs(config, str(tmp_path))
  assert list(built) == ["mse", "perceptual"]
  for name, c in built.items():
    validation.validate(c)
    assert c.total_steps == 6 and c.init_from == "" and c.loss.label_dropout == 0.1
    assert stages.pretrained.start_folder(c) == sd_folder  # each branch starts from the folder's U-Net
  assert built["mse"].perceptual.weight == 0 and built["perceptual"].perceptual.mse_weight == 0
  assert tuple(config.experiment.guidance_scales) == (1.0, 7.5) and config.experiment.guidance_rescale == 0.7
  with pytest.raises(ConfigError, match="or perceptual.start_step=0 with a model folder"):
    stages.stage_configs(override(config, **{"model.sd_layout": "tiny"}), str(tmp_path))


@pytest.mark.slow
def test_the_sd_comparison_runs_from_encoded_captions_to_its_table(sd_folder, tmp_path):
  """python -m selfperc_jax.experiments --config=configs/sd21_base.py on the tiny folder: both branches fine-tuned
  from the folder, each evaluated on COCO-style prompts unguided and at 7.5 / rescale 0.7, the table written."""
  from conftest import random_inception_weights
  from selfperc_jax import experiments

  examples = {**_examples(), **{f"1{i:08d}": (_image(20 + i, 16, 10 + i)[1], f"picture number {i}") for i in range(9)}}
  captions = tmp_path / "captions.json"
  captions.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(4)],
                                  "annotations": [{"image_id": i, "id": i, "caption": f"picture number {i}"}
                                                  for i in range(4)]}))
  random_inception_weights(tmp_path / "inception.npz")
  np.savez(tmp_path / "ref.npz", np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
  config = override(load_config("sd21_base", "tiny"), **{
      "pretrained": sd_folder, "data.dir": write_webdataset(tmp_path / "wds", examples),
      "latent.dir": str(tmp_path / "lat"), "total_steps": 2, "log_every": 1, "checkpoint_every": 2,
      "optimizer.warmup_steps": 1, "finetune.warmup_steps": 1, "sample.prompts_file": str(captions),
      "sample.steps": 2, "eval.reference": str(tmp_path / "ref.npz"),
      "eval.inception_weights": str(tmp_path / "inception.npz"), "eval.num_samples": 8})
  encode_latents.run(config)
  rows = experiments.run(config, str(tmp_path / "w"))
  assert [(r["branch"], r["guidance_scale"]) for r in rows] == [("mse", 1.0), ("mse", 7.5), ("perceptual", 1.0),
                                                                ("perceptual", 7.5)]
  assert all(np.isfinite(r["fid"]) and r["num_samples"] == 8 for r in rows)
  table = (tmp_path / "w" / "comparison.md").read_text()
  assert "Start: the model folder" in table and "each prompt alike" in table
