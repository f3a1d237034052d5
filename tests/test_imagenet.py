"""ImageNet through TFDS + grain, on a tiny ImageNet that this test makes: fake ILSVRC-2012 archives (a few
synthetic JPEGs in the real tar layout) prepared by the project's prepare command, which runs TFDS's real
imagenet2012 builder into real array_record files. Then the ADM crop, the pipeline (flips, resume, worker
processes), the errors for missing or mis-prepared data, and a few steps of the imagenet256 config."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import NUM_SYNSETS, PER_SYNSET, REPO, load_config, override, write_ilsvrc_archives
from selfperc_jax import input_pipeline, train
from selfperc_jax.data import imagenet
from selfperc_jax.errors import ConfigError

pytestmark = pytest.mark.slow  # subprocesses and end-to-end runs


def _data_cfg(data_dir, split="train", size=32):
  cfg = load_config("imagenet256").data
  cfg.dir, cfg.split, cfg.image_size = data_dir, split, size
  return cfg


# --- the ADM centre crop ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(300, 900), (900, 300), (64, 64), (20, 50), (513, 257)])
def test_center_crop_size_and_constant_colour(hw):
  image = Image.fromarray(np.full(hw + (3,), (10, 200, 90), np.uint8))
  out = imagenet.center_crop(image, 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.full((32, 32, 3), (10, 200, 90), np.uint8))


def test_center_crop_keeps_the_middle_third_of_a_3_to_1_image():
  """1200x400 -> 600x200 -> 300x100 by box halving, then the centre 100x100: exactly the middle band."""
  a = np.zeros((400, 1200, 3), np.uint8)
  a[:, :400], a[:, 400:800], a[:, 800:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
  out = imagenet.center_crop(Image.fromarray(a), 100)
  np.testing.assert_array_equal(out, np.full((100, 100, 3), (0, 255, 0), np.uint8))


def test_center_crop_of_a_grey_image_is_rgb():
  out = imagenet.center_crop(Image.fromarray(np.full((50, 80), 77, np.uint8)), 16)
  assert out.shape == (16, 16, 3) and (out == 77).all()


# --- the prepared data -----------------------------------------------------------------------------------------


def test_prepared_source_reads_decoded_cropped_labelled_examples(tiny_imagenet):
  train_src = imagenet.open_source(_data_cfg(tiny_imagenet))
  assert len(train_src) == NUM_SYNSETS * PER_SYNSET
  assert len(imagenet.open_source(_data_cfg(tiny_imagenet, "validation"))) == 3
  seen = set()
  for i in range(len(train_src)):
    ex = train_src[i]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    k = int(ex["label"])
    seen.add(k)
    # synset k is class k of TFDS's label list; its images are 40(k+1) on the left half, black on the right
    np.testing.assert_allclose(ex["image"][:, :12].mean(), 40 * (k + 1), atol=4)
    assert ex["image"][:, 20:].mean() < 4
  assert seen == set(range(NUM_SYNSETS))


def _pipeline_config(data_dir, **overrides):
  config = load_config("imagenet256")
  config.data.dir, config.data.image_size, config.data.num_workers = data_dir, 32, 0
  config.batch_size = 8
  return override(config, **overrides)


def test_pipeline_flips_half_the_images_deterministically_and_resumes(tiny_imagenet):
  config = _pipeline_config(tiny_imagenet)
  a = input_pipeline.build(config)
  batches = [next(a) for _ in range(6)]
  assert batches[0]["image"].shape == (8, 32, 32, 3) and batches[0]["image"].dtype == np.float32
  images = np.concatenate([b["image"] for b in batches])
  assert images.min() >= -1.0 and images.max() <= 1.0
  flipped = images[:, :, :12].mean(axis=(1, 2, 3)) < images[:, :, 20:].mean(axis=(1, 2, 3))
  assert 0.25 < flipped.mean() < 0.75  # about half of 48 draws; flipped images keep their colour on the right
  # determinism, and a restored iterator state continues the same sequence
  b = input_pipeline.build(config)
  next(b), next(b)
  state = b.get_state()
  c = input_pipeline.build(config)
  c.set_state(state)
  for expected in batches[2:]:
    got = next(c)
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["label"], expected["label"])
  no_flip = input_pipeline.build(_pipeline_config(tiny_imagenet, **{"data.random_flip": False}))
  unflipped = np.concatenate([next(no_flip)["image"] for _ in range(6)])
  assert (unflipped[:, :, :12].mean(axis=(1, 2, 3)) > unflipped[:, :, 20:].mean(axis=(1, 2, 3))).all()


def _assert_same_batches(expected, got):
  for x, y in zip(expected, got):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_flipped_global_batch_is_the_same_for_any_number_of_processes(tiny_imagenet):
  """Two processes reading rows [0, 4) and [4, 8) of each global batch together read (and flip) exactly what one
  process reads: the flips are drawn per global position, not per process."""
  config = _pipeline_config(tiny_imagenet)
  whole = input_pipeline.build(config, rows=(0, 8))
  halves = [input_pipeline.build(config, rows=(0, 4)), input_pipeline.build(config, rows=(4, 8))]
  for _ in range(4):
    parts = [next(h) for h in halves]
    _assert_same_batches([next(whole)], [{k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")}])


def test_worker_processes_give_the_same_batches_and_resume(tiny_imagenet):
  """Each grain worker builds whole batches, so their number never changes the data; their state resumes too."""
  inline = input_pipeline.build(_pipeline_config(tiny_imagenet))
  expected = [next(inline) for _ in range(5)]
  config = _pipeline_config(tiny_imagenet, **{"data.num_workers": 2})
  workers = input_pipeline.build(config)
  _assert_same_batches(expected[:2], [next(workers) for _ in range(2)])
  state = workers.get_state()
  resumed = input_pipeline.build(config)
  resumed.set_state(state)
  _assert_same_batches(expected[2:], [next(resumed) for _ in range(3)])


# --- bad inputs --------------------------------------------------------------------------------------------------


def test_missing_data_set_says_how_to_prepare_it(tmp_path):
  with pytest.raises(ConfigError, match="not prepared") as e:
    imagenet.open_source(_data_cfg(str(tmp_path)))
  assert f"python -m selfperc_jax.data.imagenet --manual_dir=~/imagenet_manual --data_dir={tmp_path}" in str(e.value)
  assert "image-net.org" in str(e.value)


def test_missing_split_and_wrong_format_and_missing_archives(tiny_imagenet, tmp_path):
  with pytest.raises(ConfigError, match="has no 'test' split"):
    imagenet.open_source(_data_cfg(tiny_imagenet, "test"))
  with pytest.raises(ConfigError, match="ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar not found"):
    imagenet.prepare(str(tmp_path / "empty"), str(tmp_path / "tfds"))
  # prepared by plain TFDS in its default format (tfrecord): random access needs array_record
  write_ilsvrc_archives(tmp_path / "manual")
  tfds = pytest.importorskip("tensorflow_datasets")  # here: collecting the file (the fast subset too) skips its import
  builder = tfds.builder("imagenet2012", data_dir=str(tmp_path / "tfrecord"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
  with pytest.raises(ConfigError, match="prepared as .*tfrecord.* needs array_record"):
    imagenet.open_source(_data_cfg(str(tmp_path / "tfrecord")))


def test_main_with_the_pod_default_config_and_no_data_gives_one_clear_error(tmp_path):
  """`--config=configs/imagenet256.py` (no argument, the TPU default) on a machine without ImageNet."""
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
  result = subprocess.run(
      [sys.executable, "-m", "selfperc_jax.main", "--config=configs/imagenet256.py", f"--workdir={tmp_path / 'w'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"error: imagenet2012 is not prepared in data.dir={tmp_path / 'tfds'}" in result.stderr
  assert "python -m selfperc_jax.data.imagenet" in result.stderr and "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "w")


# --- training --------------------------------------------------------------------------------------------------


def test_imagenet256_config_trains_on_the_prepared_data(tiny_imagenet, tmp_path):
  """The pod config as it is (bf16, remat, FSDP over the 8 simulated devices, 1000 classes), model shrunk."""
  config = _pipeline_config(tiny_imagenet, **{
      "model.base_channels": 16, "model.channel_mult": (1, 2), "model.num_res_blocks": 1,
      "model.attention_resolutions": (16,), "model.head_channels": 16, "mesh.fsdp_min_size": 256,
      "total_steps": 3, "log_every": 1, "checkpoint_every": 3, "sample_every": 3, "sample.steps": 2,
      "sample.num_samples": 8, "perceptual.start_step": 0, "perceptual.mse_weight": 1.0,
      "optimizer.warmup_steps": 1})
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["loss"]) and metrics["loss_perceptual"] > 0  # self-perceptual from the start (one compile)
  assert os.path.isdir(tmp_path / "checkpoints" / "3")
  with np.load(tmp_path / "samples" / "step_3.npz") as f:
    assert f["arr_0"].shape == (8, 32, 32, 3)
    assert sorted(set(f["arr_1"].tolist())) == sorted(config.sample.classes)


def test_data_throughput_benchmark_writes_its_figures(tmp_path):
  out = tmp_path / "BENCH.md"
  result = subprocess.run(
      [sys.executable, "benchmarks/data_throughput.py", "--synthetic=16", "--workers=0", "--batch=8", "--batches=2",
       "--image_size=32", f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  text = out.read_text()
  assert "synthetic 500x375 JPEGs (16), crop 32" in text
  row = [line for line in text.splitlines() if line.startswith("| 0 | 2 | 8 |")]
  assert len(row) == 1 and float(row[0].split("|")[4]) > 0
  assert float(text.split("Decode + ADM crop: ")[1].split(" ms")[0]) > 0
