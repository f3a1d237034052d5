"""The data sets: each one's facts (datasets.py), its random-access sources (digits, imagenet) and the encoded
latents (latents.py). The training pipeline over them is selfperc_jax/input_pipeline.py."""
