"""Evaluating a set of params: draw N class-conditional samples, embed them, compare with the data set's features.

For the digits the feature network is the project's own digits classifier (trained in seconds, cached under the
workdir), which gives FID, Inception Score, precision/recall, the accuracy of conditional samples (does a sample of
class k look like a k?) and the mean confidence in the requested class.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from etils import epath

from selfperc_jax import fileio, generate, images, sharding
from selfperc_jax.logging_utils import Progress
from selfperc_jax.errors import ConfigError, EvaluationError
from selfperc_jax.evaluation import metrics

FEATURES = ("digits", "inception")


def setting_name(config) -> str:
  """A key per evaluation setting (the sampling setting, the sample count and seed), so results of different
  settings never overwrite each other."""
  return f"{generate.sampling_name(config)}_n{config.eval.num_samples}_seed{config.eval.seed}"


def make_feature_network(features: str, cache_dir: str | None = None, inception_weights: str = ""):
  """The feature network named `features` (FEATURES): the digits classifier (cached in cache_dir) or the FID
  InceptionV3 from the user's weights file."""
  if features == "inception":
    from selfperc_jax.evaluation.inception import InceptionFeatures

    return InceptionFeatures(inception_weights)
  from selfperc_jax.evaluation import digits_classifier

  return digits_classifier.cached_classifier(cache_dir)


def feature_network(config, cache_dir: str):
  return make_feature_network(config.eval.features, cache_dir, config.eval.inception_weights)


def configured_reference(config) -> tuple | None:
  """What eval.reference holds (load_reference_file's pair), checked without a feature network, so that a bad
  file fails before one is built; None where the reference is the digits split."""
  if config.eval.reference:
    return load_reference_file(config.eval.reference)
  if config.data.name != "digits":
    raise ConfigError("set eval.reference to a reference batch (.npz with arr_0 images, e.g. the ADM reference "
                      "batch) or to reference statistics (mu, sigma, features).")
  return None


def reference_features(config, loaded: tuple | None, network) -> np.ndarray:
  """The reference features: from what configured_reference returned, or of the digits split."""
  if loaded is not None:
    return features_of_reference(loaded, network)
  from selfperc_jax.data import digits

  images, _ = digits.load(config.eval.reference_split, config.data.image_size)
  return network.features(images)


def load_batch(path: str, what: str):
  """(uint8 NHWC images, int64 labels or None) of a guided-diffusion .npz, checked; one clear error otherwise."""
  if not fileio.exists(path):
    raise EvaluationError(f"{what} file {path} does not exist.")
  expected = "an .npz with arr_0 (uint8 images, NHWC) and optionally arr_1 (integer labels)"
  try:
    with fileio.load_npz(path) as f:
      keys = set(f.files)
      if "arr_0" not in keys:
        raise EvaluationError(f"{what} file {path} has no 'arr_0' (uint8 NHWC images); it holds "
                              f"{sorted(keys)}.")
      images = f["arr_0"]
      labels = f["arr_1"] if "arr_1" in keys else None
  except EvaluationError:
    raise
  except Exception as e:  # empty, truncated, not a zip, object arrays (pickles are refused): numpy raises many types
    raise EvaluationError(f"{what} file {path} is not readable as {expected} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}).") from e
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
    raise EvaluationError(f"{what} file {path}: arr_0 must be uint8 images (N, H, W, 1 or 3), N > 0; it is "
                          f"{images.dtype} of shape {images.shape}.")
  if labels is not None:
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
      raise EvaluationError(f"{what} file {path}: arr_1 must hold one integer label per image "
                            f"({len(images)}); it is {labels.dtype} of shape {labels.shape}.")
    if labels.size and labels.min() < 0:
      raise EvaluationError(f"{what} file {path}: arr_1 holds negative labels (min {labels.min()}).")
    labels = labels.astype(np.int64)
  return images, labels


def load_reference_file(path: str) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(stored features, None) of reference statistics (mu, sigma, features) or (None, uint8 images) of a reference
  batch (arr_0), checked; one clear error otherwise. Needs no feature network: a bad file fails before one is built."""
  if not fileio.exists(path):
    raise EvaluationError(f"reference file {path} does not exist.")
  try:
    with fileio.load_npz(path) as f:
      keys = set(f.files)
  except Exception as e:  # empty, truncated, not a zip
    raise EvaluationError(
        f"reference file {path} is not a readable .npz ({type(e).__name__}); give a reference batch (arr_0 "
        "images) or reference statistics (mu, sigma, features).") from e
  if {"mu", "sigma", "features"} <= keys:
    return metrics.load_reference(path).features, None
  if "arr_0" not in keys:
    raise EvaluationError(f"reference file {path} holds neither 'arr_0' (images) nor mu/sigma/features; "
                          f"it holds {sorted(keys)}.")
  return None, load_batch(path, "reference")[0]


def features_of_reference(loaded: tuple, network) -> np.ndarray:
  """The reference features from what load_reference_file returned: the stored ones, or those of its images."""
  stored, images = loaded
  return stored if stored is not None else network.features(images)


def embed(network, images) -> tuple[np.ndarray, np.ndarray]:
  """(features, logits) in one pass where the network can, else two."""
  if hasattr(network, "embed"):
    return network.embed(images)
  return network.features(images), network.logits(images)


def score(images, labels, network, reference: np.ndarray, class_scores: bool = True) -> dict:
  """Metrics of samples (uint8 or [-1, 1] floats, NHWC) with their requested labels against reference features."""
  feats, logits = embed(network, images)
  return score_features(feats, logits, labels, reference, class_scores)


def score_features(feats, logits, labels, reference: np.ndarray, class_scores: bool = True) -> dict:
  """Metrics of samples' features and logits, with their requested labels, against reference features.

  The class scores read the network's logits as class scores: meaningful for the digits classifier, not for
  Inception (whose 1008 classes are not the data set's). With labels (conditional samples): the class accuracy and
  the mean probability of the requested class. Without (labels None: unconditional samples): the mean probability
  of the most likely class (how surely each sample reads as some class: a realism signal) and the class balance,
  the entropy of the predicted classes' histogram over log(number of classes) (1: every class equally often)."""
  feats, logits = np.asarray(feats, np.float64), np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  precision, recall = metrics.precision_recall(reference, feats, k=3)
  # Samples come sorted by class; IS splits must each see the class mix, as a random sample order would.
  order = np.random.default_rng(0).permutation(len(logits))
  is_mean, is_std = metrics.inception_score(logits=logits[order], splits=min(10, len(logits)))
  result = {
      "fid": metrics.fid_from_features(reference, feats),
      "inception_score": is_mean,
      "inception_score_std": is_std,
      "precision": precision,
      "recall": recall,
      "num_samples": int(len(logits)),
  }
  if class_scores and labels is not None:
    labels = np.asarray(labels)
    result["class_accuracy"] = float(np.mean(np.argmax(logits, -1) == labels))
    result["class_confidence"] = float(np.mean(probs[np.arange(len(labels)), labels]))
  elif class_scores:
    counts = np.bincount(np.argmax(logits, -1), minlength=logits.shape[-1]) / len(logits)
    entropy = -np.sum(counts[counts > 0] * np.log(counts[counts > 0]))
    result["class_confidence"] = float(np.mean(probs.max(-1)))
    result["class_balance"] = float(entropy / np.log(logits.shape[-1]))
  return result


def _result_path(eval_dir: str, step: int) -> str:
  return fileio.join(eval_dir, f"step_{step}.json")


def has_result(eval_dir: str, step: int, setting: str) -> bool:
  """Whether eval/step_<STEP>.json already holds this setting's metrics."""
  return read_result(eval_dir, step, setting) is not None


def read_result(eval_dir: str, step: int, setting: str) -> dict | None:
  """This setting's metrics from eval/step_<STEP>.json, or None if it has none."""
  path = _result_path(eval_dir, step)
  return json.loads(fileio.read_text(path)).get(setting) if fileio.exists(path) else None


def write_result(eval_dir: str, step: int, setting: str, result: dict) -> str:
  """Adds one setting's metrics to eval/step_<STEP>.json, keeping every other setting already in it."""
  fileio.makedirs(eval_dir)
  path = _result_path(eval_dir, step)
  existing = json.loads(fileio.read_text(path)) if fileio.exists(path) else {}
  existing[setting] = result
  fileio.write_text(path, json.dumps(existing, indent=2, sort_keys=True))
  return path


_KEPT: dict = {}  # the last Inception network and reference features of this process (see below)


def _local_file_key(path: str):
  """(path, size, mtime) of a local file; None for a bucket's (not kept: another run may rewrite it unseen)."""
  if not path or fileio.is_remote(path):
    return None
  import os

  info = os.stat(path)
  return (os.path.abspath(path), info.st_size, info.st_mtime_ns)


def _network_and_reference(config, loaded: tuple | None, cache_dir: str):
  """The feature network and the reference features. With Inception weights and a reference file on local disk, the
  last pair is kept for the process: the comparison's evaluations (branches x guidance scales) load the weights and
  embed the reference batch once instead of once each. A changed file (size or time) is another key."""
  key = None
  if config.eval.features == "inception" and config.eval.reference:
    weights, reference = _local_file_key(config.eval.inception_weights), _local_file_key(config.eval.reference)
    key = None if weights is None or reference is None else (weights, reference)
  if key is not None and _KEPT.get("key") == key:
    return _KEPT["network"], _KEPT["reference"]
  _KEPT.clear()  # at most one network held
  network = feature_network(config, cache_dir)
  reference = reference_features(config, loaded, network)
  if key is not None:
    _KEPT.update(key=key, network=network, reference=reference)
  return network, reference


class Evaluator:
  """Scores params: draws eval.num_samples class-balanced samples with the sample.* settings, chunk by chunk over
  every device, embeds each chunk on the devices and compares the features with the reference data's.

  Resumable: process 0 keeps each finished chunk's features (and, with eval.save_samples, its uint8 images) in
  eval/partial/step_<STEP>_<setting>_<features>/, so an evaluation killed part-way (preemption, time limit) goes
  on from the chunks it has; the samples of a chunk depend only on (seed, index), so the result is the one an
  uninterrupted evaluation gives. Once the result is written the partial files are removed.
  """

  def __init__(self, config, workdir: str, generator_factory):
    self.config = config
    self.eval_dir = fileio.join(workdir, "eval")
    loaded = configured_reference(config)  # before the network: a bad reference file fails in milliseconds
    self.network, self.reference = _network_and_reference(config, loaded, self.eval_dir)
    self.generator = generator_factory(self.network.embed_fn, self.network.embed_variables)

  def __call__(self, params, step: int) -> dict | None:
    """The metrics (on process 0; None on the others), also added to eval/step_<STEP>.json."""
    cfg = self.config
    setting = setting_name(cfg)
    labels = generate.draw_labels(cfg, evaluation=True)
    lead = jax.process_index() == 0
    partial = fileio.join(self.eval_dir, "partial", f"step_{step}_{setting}_{cfg.eval.features}")
    done_chunks = _load_partial(partial, setting, cfg.eval.save_samples) if lead else []
    start = int(sharding.broadcast_from_process_0(np.int32(done_chunks[-1]["stop"] if done_chunks else 0)))
    progress = Progress(f"eval at step {step} ({setting})", len(labels), enabled=lead, start=start)
    if start:
      progress.update(start)
    if lead:
      fileio.makedirs(partial)
    for chunk in self.generator.chunks(params, labels, cfg.eval.seed, start=start, with_images=cfg.eval.save_samples):
      if lead:
        arrays = {"features": chunk.features, "logits": chunk.logits, "setting": np.array(setting)}
        if chunk.images is not None:
          arrays["images"] = chunk.images
        path = fileio.join(partial, f"chunk_{chunk.start:09d}_{chunk.stop:09d}.npz")
        fileio.savez(path, **arrays)
        done_chunks.append({"start": chunk.start, "stop": chunk.stop, "features": chunk.features,
                            "logits": chunk.logits, "path": path})
      progress.update(chunk.stop)
    if not lead:
      return None
    feats = np.concatenate([c["features"] for c in done_chunks])
    logits = np.concatenate([c["logits"] for c in done_chunks])
    labelled = self.generator.labelled
    result = score_features(feats, logits, labels if labelled else None, self.reference,
                            class_scores=cfg.eval.features == "digits")
    s = cfg.sample
    result.update(step=step, sampler=s.sampler, sample_steps=s.steps, guidance_scale=s.guidance_scale,
                  guidance_rescale=s.guidance_rescale, features=cfg.eval.features)
    if cfg.condition == "text":  # the prompts the samples were drawn from: each sample's, one per line, beside
      from selfperc_jax import text

      prompts = text.prompts_of(cfg)
      prompts_path = fileio.join(self.eval_dir, f"prompts_{setting}.txt")
      fileio.write_text(prompts_path, "".join(prompts[int(i)] + "\n" for i in labels))
      result.update(prompts=prompts_path, prompts_file=str(cfg.sample.prompts_file), prompts_given=len(prompts),
                    prompts_drawn=len({int(i) for i in labels}), negative_prompt=str(cfg.sample.negative_prompt))
    if cfg.eval.save_samples:
      writer = images.NpzStreamWriter(fileio.join(self.eval_dir, f"samples_step_{step}_{setting}.npz"),
                                      self.generator.image_shape, labels if labelled else None, len(labels))
      for c in done_chunks:
        with fileio.load_npz(c["path"]) as f:
          writer.write(f["images"])
      result["samples"] = writer.close()
    path = write_result(self.eval_dir, step, setting, result)
    _remove_partial(partial)
    accuracy = f", class accuracy {result['class_accuracy']:.3f}" if "class_accuracy" in result else ""
    print(f"eval at step {step}: FID {result['fid']:.3f}{accuracy}, IS {result['inception_score']:.2f} "
          f"({len(labels)} samples, {setting}) -> {path}", flush=True)
    return result


def _chunk_files(partial: str) -> list[str]:
  return sorted(str(p) for p in epath.Path(partial).glob("chunk_*.npz")) if fileio.isdir(partial) else []


def _load_partial(partial: str, setting: str, with_images: bool) -> list[dict]:
  """The finished chunks of an interrupted evaluation: those that tile [0, stop) from the start, in order. Files
  after the first gap or unreadable chunk are removed (they are recomputed)."""
  chunks, files = [], _chunk_files(partial)
  for i, path in enumerate(files):
    start, stop = (int(v) for v in path.rsplit("/", 1)[-1][len("chunk_"):-len(".npz")].split("_"))
    try:
      if start != (chunks[-1]["stop"] if chunks else 0):
        raise ValueError(f"it starts at {start}")
      with fileio.load_npz(path) as f:
        if str(f["setting"]) != setting or (with_images and "images" not in f):
          raise ValueError("another setting")
        chunks.append({"start": start, "stop": stop, "features": f["features"], "logits": f["logits"],
                       "path": path})
    except Exception as e:  # e.g. a file cut short by a kill: recompute from here
      print(f"warning: evaluation chunk {path} is not usable ({type(e).__name__}: {e}); computing from sample "
            f"{chunks[-1]['stop'] if chunks else 0} again", flush=True)
      for stale in files[i:]:
        epath.Path(stale).unlink(missing_ok=True)
      break
  if chunks:
    print(f"resuming the evaluation from {len(chunks)} finished chunk(s) in {partial} "
          f"({chunks[-1]['stop']} samples)", flush=True)
  return chunks


def _remove_partial(partial: str) -> None:
  """Removes one evaluation's chunk folder, and eval/partial/ too once no other evaluation has chunks there."""
  path = epath.Path(partial)
  if path.exists():
    path.rmtree()
  if path.parent.exists() and not any(path.parent.iterdir()):
    path.parent.rmdir()
