"""Evaluating a set of params: draw N class-conditional samples, embed them, compare with the data set's features.

For the digits the feature network is the project's own digits classifier (trained in seconds, cached under the
workdir), which gives FID, Inception Score, precision/recall, the accuracy of conditional samples (does a sample of
class k look like a k?) and the mean confidence in the requested class.
"""

from __future__ import annotations

import json

import numpy as np

from selfperc_jax import fileio
from selfperc_jax.errors import ConfigError
from selfperc_jax.evaluation import metrics

FEATURES = ("digits", "inception")


def setting_name(config) -> str:
  """A key per sampling setting, so results of different settings never overwrite each other."""
  s, e = config.sample, config.eval
  return f"{s.sampler}{s.steps}_cfg{s.guidance_scale:g}_n{e.num_samples}_seed{e.seed}"


def feature_network(config, cache_dir: str, mesh=None):
  if config.eval.features == "inception":
    from selfperc_jax.evaluation.inception import InceptionFeatures

    return InceptionFeatures(config.eval.get("inception_weights", ""), mesh)
  if config.eval.features != "digits" or config.data.name != "digits":
    raise ConfigError(f"eval.features={config.eval.features!r} with data.name={config.data.name!r} is not available; "
                      f"this version evaluates the digits with features {FEATURES}.")
  if config.data.image_size != 8:
    raise ConfigError("the digits classifier reads 8x8 images; evaluation needs data.image_size=8.")
  from selfperc_jax.evaluation import digits_classifier

  return digits_classifier.cached_classifier(cache_dir)


def reference_features(config, network) -> np.ndarray:
  if config.eval.get("reference", ""):
    return reference_from_file(config.eval.reference, network)
  if config.data.name != "digits":
    raise ConfigError("set eval.reference to a reference batch (.npz with arr_0 images, e.g. the ADM reference "
                      "batch) or to reference statistics (mu, sigma, features).")
  from selfperc_jax.data import digits

  images, _ = digits.load(config.eval.reference_split, config.data.image_size)
  return network.features(images)


def reference_from_file(path: str, network) -> np.ndarray:
  """Features of a reference .npz: stored ones (mu, sigma, features) or computed from its images (arr_0)."""
  if not fileio.exists(path):
    raise metrics.EvaluationError(f"reference file {path} does not exist.")
  with fileio.load_npz(path) as f:
    keys = set(f)
    if {"mu", "sigma", "features"} <= keys:
      return metrics.load_reference(path).features
    if "arr_0" not in keys:
      raise metrics.EvaluationError(f"reference file {path} holds neither 'arr_0' (images) nor mu/sigma/features; "
                                    f"it holds {sorted(keys)}.")
    images = f["arr_0"]
  return network.features(images)


def embed(network, images) -> tuple[np.ndarray, np.ndarray]:
  """(features, logits) in one pass where the network can, else two."""
  if hasattr(network, "embed"):
    return network.embed(images)
  return network.features(images), network.logits(images)


def score(images, labels, network, reference: np.ndarray, class_scores: bool = True) -> dict:
  """Metrics of samples (uint8 or [-1, 1] floats, NHWC) with their requested labels against reference features.

  The class accuracy and confidence read the network's logits as class scores: meaningful for the digits
  classifier, not for Inception (whose 1008 classes are not the data set's)."""
  feats, logits = embed(network, images)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  precision, recall = metrics.precision_recall(reference, feats, k=3)
  # Samples come sorted by class; IS splits must each see the class mix, as a random sample order would.
  order = np.random.default_rng(0).permutation(len(logits))
  is_mean, is_std = metrics.inception_score(logits=logits[order], splits=min(10, len(images)))
  labels = np.asarray(labels)
  result = {
      "fid": metrics.fid_from_features(reference, feats),
      "inception_score": is_mean,
      "inception_score_std": is_std,
      "precision": precision,
      "recall": recall,
      "class_accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
      "class_confidence": float(np.mean(probs[np.arange(len(labels)), labels])),
      "num_samples": int(len(images)),
  }
  if not class_scores:
    del result["class_accuracy"], result["class_confidence"]
  return result


def write_result(eval_dir: str, step: int, setting: str, result: dict) -> str:
  """Adds one setting's metrics to eval/step_<STEP>.json, keeping every other setting already in it."""
  fileio.makedirs(eval_dir)
  path = fileio.join(eval_dir, f"step_{step}.json")
  existing = json.loads(fileio.read_text(path)) if fileio.exists(path) else {}
  existing[setting] = result
  fileio.write_text(path, json.dumps(existing, indent=2, sort_keys=True))
  return path
