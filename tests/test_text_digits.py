"""Text conditions that train: the digits with captions (configs/digits.py:text) through a small SD U-Net and the
built-in text encoder (text.py): captions drawn per example, prompts per class, evaluation by the digits classifier
of the asked digit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, override
from selfperc_jax import conditioning, text, validation
from selfperc_jax.data import digits
from selfperc_jax.errors import ConfigError


def _captioned(per_class=3, classes=4):
  table = np.arange(classes * per_class, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)
  return conditioning.Conditioning(kind="text", num_classes=0, null_embedding=np.full((2, 3), -1.0, np.float32),
                                   prompt_embeddings=table[::per_class], caption_embeddings=table,
                                   captions_per_class=per_class)


def test_each_example_gets_one_of_its_class_captions_each_alike():
  cond = _captioned()
  labels = jnp.asarray(np.arange(12000) % 4, jnp.int32)
  rows = np.asarray(cond.from_labels(labels, jax.random.key(0)))[:, 0, 0].astype(int)
  np.testing.assert_array_equal(rows // 3, np.asarray(labels))  # always a caption of the example's own class
  counts = np.bincount(rows % 3, minlength=3)
  assert counts.min() > 0.3 * len(rows) and counts.max() < 0.37 * len(rows)  # the K captions alike
  other = np.asarray(cond.from_labels(labels, jax.random.key(1)))[:, 0, 0].astype(int)
  assert (other != rows).mean() > 0.5  # another step's key draws again
  assert cond.batch_label(8).shape == (8,) and cond.batch_label(8).dtype == jnp.int32


def test_the_builtin_text_encoder_is_seeded_and_tells_prompts_apart():
  text.encoder.cache_clear()
  first = text.encoder("").encode(["a handwritten seven", "a handwritten three", ""])
  text.encoder.cache_clear()
  again = text.encoder("").encode(["a handwritten seven"])
  np.testing.assert_allclose(first[:1], again, rtol=1e-5, atol=1e-6)  # (another batch: another XLA kernel)
  assert first.shape == (3, 77, text.BUILTIN_WIDTH)
  assert np.abs(first[0] - first[1]).max() > 0.1 and np.abs(first[0] - first[2]).max() > 0.1


def test_digits_text_prompts_are_the_first_caption_of_each_class_and_it_evaluates():
  config = load_config("digits", "text")
  validation.validate(override(config, eval_every=500))
  assert text.prompts_of(config) == tuple(c[0] for c in digits.CAPTIONS)
  assert text.prompts_of(config)[7] == "a handwritten seven"
  cond = conditioning.from_config(config)
  assert cond.caption_embeddings.shape == (10 * len(digits.CAPTIONS[0]), 77, text.BUILTIN_WIDTH)
  np.testing.assert_array_equal(cond.draw(20), np.repeat(np.arange(10), 2))  # prompt i is class i
  with pytest.raises(ConfigError, match="is evaluated against eval.reference .*, or on a data set's captions"):
    validation.validate(override(load_config("digits", "text"), eval_every=500, **{"sample.prompts": ("a cat",)}))
  with pytest.raises(ValueError, match="different conditions"):
    load_config("digits", "text,uncond")
  with pytest.raises(ConfigError, match="model.sd_layout='big' is not known"):
    validation.validate(override(load_config("digits", "text"), **{"model.sd_layout": "big"}))


@pytest.mark.slow
def test_a_captioned_digits_run_trains_on_captions_against_the_copy(tmp_path):
  """The input pipeline's digits -> a caption per example -> the SD U-Net's self-perceptual step (with the MSE term,
  from step 0: one step to compile) -> a checkpoint. (Sampling from prompts: tests/test_sd_text.py.)"""
  from selfperc_jax import resume, train

  config = override(load_config("digits", "text,tiny"), total_steps=4, checkpoint_every=4, sample_every=0,
                    log_every=4, **{"perceptual.start_step": 0, "perceptual.mse_weight": 1.0})
  train.train_and_evaluate(config, str(tmp_path))
  (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert row["loss_perceptual"] > 0 and np.isfinite(row["loss"]) and row["grad_norm"] > 0
  assert resume.latest_step(str(tmp_path)) == 4
