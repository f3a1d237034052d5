"""Standalone evaluator for any sample batch in the guided-diffusion .npz format.

  python -m selfperc_jax.evaluation.compare REF.npz SAMPLES.npz [--features digits]

REF.npz is either a reference-statistics file (`mu`, `sigma`, `features`, as `save_reference` writes) or a batch
of real images (`arr_0`, uint8 NHWC). SAMPLES.npz holds `arr_0` (uint8 NHWC) and, optionally, `arr_1` (the
requested labels, which add the class accuracy and confidence). Prints a table of the metrics.
"""

from __future__ import annotations

import argparse
import sys

from selfperc_jax.errors import EvaluationError, UserError
from selfperc_jax.evaluation import evaluate

def compare(ref_path: str, samples_path: str, features: str = "digits", cache_dir: str | None = None,
            weights: str | None = None) -> dict:
  if features not in evaluate.FEATURES:
    raise EvaluationError(f"--features={features!r} is not available; choose one of {evaluate.FEATURES}.")
  # Both files are checked before the feature network is built (the digits classifier trains on first use).
  loaded_reference = evaluate.load_reference_file(ref_path)
  images, labels = evaluate.load_batch(samples_path, "samples")
  if labels is not None and features == "digits" and labels.max() >= 10:
    raise EvaluationError(f"samples file {samples_path}: arr_1 holds label {labels.max()}, but the digits "
                          "have classes 0-9.")
  network = evaluate.make_feature_network(features, cache_dir=cache_dir, inception_weights=weights or "")
  reference = evaluate.features_of_reference(loaded_reference, network)
  # Inception's 1008 classes are not the data set's: no class scores. Unlabelled samples (an unconditional model's)
  # get the digits classifier's confidence and class balance instead of its accuracy.
  return evaluate.score(images, labels, network, reference, class_scores=features == "digits")


def format_table(result: dict) -> str:
  width = max(len(k) for k in result)
  return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                   for k, v in result.items())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("reference", help="reference statistics (.npz with mu, sigma, features) or real images (arr_0)")
  parser.add_argument("samples", help="sample batch (.npz with arr_0 uint8 NHWC, optional arr_1 labels)")
  parser.add_argument("--features", default="digits", choices=evaluate.FEATURES)
  parser.add_argument("--cache_dir", default=None, help="where to keep the trained digits classifier")
  parser.add_argument("--weights", default=None, help="FID Inception weights (.pth or converted .npz), for inception")
  args = parser.parse_args(argv)
  try:
    print(format_table(compare(args.reference, args.samples, args.features, args.cache_dir, args.weights)))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
