"""Evaluation building blocks: sample-quality metrics and a small in-project feature extractor for the digits.

`metrics` is numpy-only (FID, Inception Score, improved precision/recall, reference statistics files), so it can be
imported on any machine; `digits_classifier` trains the Flax CNN whose features stand in for Inception on 8x8
digits. Nothing is imported here, so `import selfperc_jax.evaluation` stays cheap.
"""
