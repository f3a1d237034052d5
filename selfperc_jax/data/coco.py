"""COCO's captions files (captions_train2014.json, captions_val2014.json, captions_val2017.json, ...) as prompts.

  {"images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg", ...}, ...],
   "annotations": [{"image_id": 391895, "id": 770337, "caption": "A man with a red helmet on a small moped ..."}, ...]}

Each image has about five captions; text-to-image evaluations draw one per image. Here that is the caption with the
lowest annotation id, images in the order of their ids: deterministic, and the same file always gives the same
prompts. `sample.prompts_file` takes such a file (a name ending in .json) as well as a text file of prompts.
"""

from __future__ import annotations

import json
import os

from selfperc_jax.errors import ConfigError


def read_captions(path: str) -> list[tuple[int, str, str]]:
  """[(image id, file name, caption)], one per image that has a caption, sorted by image id; one ConfigError for a
  file that is not a COCO captions file."""
  path = os.path.expanduser(path)
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    files = {int(image["id"]): str(image.get("file_name", "")) for image in data["images"]}
    first: dict[int, tuple[int, str]] = {}
    for a in data["annotations"]:
      image, order, caption = int(a["image_id"]), int(a.get("id", 0)), " ".join(str(a["caption"]).split())
      if caption and (image not in first or order < first[image][0]):
        first[image] = (order, caption)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{path} is not a COCO captions file ({type(e).__name__}: {e}); give COCO's "
                      "annotations/captions_val2014.json (or _val2017), or a text file of prompts, one per line.") from e
  return [(image, files.get(image, ""), caption) for image, (_, caption) in sorted(first.items())]
