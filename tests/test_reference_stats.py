"""python -m selfperc_jax.evaluation.reference_stats: a folder of real images (COCO's, for text-to-image FID) ->
reference statistics, cropped as the samples are made, in chunks that a killed run resumes from."""

import json

import numpy as np
import pytest
from PIL import Image

from selfperc_jax.data import captioned
from selfperc_jax.errors import UserError
from selfperc_jax.evaluation import metrics, reference_stats


class MeanColour:
  """A stand-in feature network: each image's mean colour and its spread (counts its calls)."""

  def __init__(self, fail_after=None):
    self.calls, self.fail_after = 0, fail_after

  def features(self, images):
    self.calls += 1
    if self.fail_after is not None and self.calls > self.fail_after:
      raise KeyboardInterrupt  # as if killed
    x = images.astype(np.float32)
    return np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)


def _folder(tmp_path, n=5):
  folder = tmp_path / "val2014"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(n):
    pixels = rng.integers(0, 256, (20 + 3 * i, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / f"COCO_val2014_{i:012d}.jpg")
  (folder / f"COCO_val2014_{n:012d}.jpg").write_bytes(b"not an image")
  return folder


def test_statistics_of_the_cropped_images_resume_after_a_kill_and_skip_unreadable_ones(tmp_path, capsys):
  folder, out = _folder(tmp_path), str(tmp_path / "ref.npz")
  with pytest.raises(KeyboardInterrupt):  # killed after its first chunk of 2 images
    reference_stats.run(str(folder), 8, "", out, network=MeanColour(fail_after=1), chunk=2)
  with pytest.raises(UserError, match="holds the chunks of another run \\(size: 8 there, 16 now\\)"):
    reference_stats.run(str(folder), 16, "", out, network=MeanColour(), chunk=2)
  resumed = MeanColour()
  result = reference_stats.run(str(folder), 8, "", out, network=resumed, chunk=2)
  assert resumed.calls == 2  # the chunks left: [2, 4) and [4, 6), not the first again
  assert result["images"] == 5 and [p.split("/")[-1] for p in result["skipped"]] == ["COCO_val2014_000000000005.jpg"]
  assert "wrote" in capsys.readouterr().out and not (tmp_path / "ref.npz.partial").exists()
  crops = np.stack([captioned.sd_crop(Image.open(folder / f"COCO_val2014_{i:012d}.jpg"), 8) for i in range(5)])
  expected = MeanColour().features(crops)
  ref = metrics.load_reference(out)
  np.testing.assert_allclose(ref.features, expected, rtol=1e-6)
  np.testing.assert_allclose(ref.mu, expected.mean(0), rtol=1e-5)


def test_a_captions_file_picks_its_images_in_its_order_and_bad_input_is_one_error(tmp_path):
  folder = _folder(tmp_path)
  captions = tmp_path / "captions_val2014.json"
  captions.write_text(json.dumps({
      "images": [{"id": 4, "file_name": "COCO_val2014_000000000004.jpg"},
                 {"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
                 {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"}],
      "annotations": [{"image_id": i, "id": i, "caption": f"caption {i}"} for i in (4, 1, 2)]}))
  paths = reference_stats.image_files(str(folder), str(captions), limit=2)
  assert [p.split("/")[-1] for p in paths] == ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"]
  with pytest.raises(UserError, match="must end in .npz"):
    reference_stats.run(str(folder), 8, "", str(tmp_path / "ref.txt"), network=MeanColour())
  with pytest.raises(UserError, match="is not a folder of images"):
    reference_stats.image_files(str(tmp_path / "missing"))
  assert reference_stats.main([f"--images={tmp_path}", "--size=8", f"--out={tmp_path / 'r.npz'}"]) == 2
