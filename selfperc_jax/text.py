"""Prompts -> Stable Diffusion's text condition: the CLIP text encoder's last hidden states (77 x D per prompt) of
config.pretrained's tokenizer/ and text_encoder/ (third_party/clip_text), computed on this process's devices.

The encoder is frozen and never part of the train state: conditioning.py takes the embeddings it gives (the empty
prompt's, the prompts' and the negative prompt's of a draw), once per process and config.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np

from selfperc_jax import pretrained
from selfperc_jax.errors import ConfigError

ENCODE_BATCH = 64  # prompts per call of the encoder


class TextEncoder:
  """The tokenizer and text encoder of a model folder. `encode(prompts)` -> (N, L, D) float32 numpy."""

  def __init__(self, folder: str):
    from third_party.clip_text import convert, model, tokenizer

    self.tokenizer = tokenizer.load_tokenizer(folder)
    config_path, weights = pretrained.text_encoder_files(folder)
    config = convert.load_config(config_path)
    tokenizer.check_matches(self.tokenizer, config)
    with pretrained.one_line_mismatch(weights, "text_encoder"):
      self.variables = convert.load_variables(weights, config=config)
    self.model = model.CLIPTextModel(config)
    self.hidden_size = config.hidden_size
    self._apply = jax.jit(lambda v, ids: self.model.apply(v, ids).last_hidden_state)

  def check_lengths(self, prompts, where: str) -> None:
    """ConfigError naming the first prompt longer than the context (77 ids with BOS and EOS: 75 tokens for SD);
    diffusers' pipelines would cut it short with a warning."""
    limit = self.tokenizer.max_length
    for i, prompt in enumerate(prompts):
      encoding = self.tokenizer.backend.encode(prompt)
      if encoding.overflowing:
        raise ConfigError(f"{where}[{i}] is longer than the text encoder's {limit - 2} tokens (its context of {limit} "
                          f"ids less BOS and EOS): shorten it ({prompt[:60]!r}...).")

  def encode(self, prompts) -> np.ndarray:
    ids = self.tokenizer.encode(list(prompts))
    out = [np.asarray(self._apply(self.variables, ids[i:i + ENCODE_BATCH])) for i in range(0, len(ids), ENCODE_BATCH)]
    return np.concatenate(out).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Encoded:
  null: np.ndarray  # (L, D): the empty prompt
  prompts: np.ndarray  # (P, L, D)
  negative: np.ndarray | None  # (L, D), or None without a negative prompt


def prompts_of(config) -> tuple[str, ...]:
  """sample.prompts, then the lines of sample.prompts_file (blank lines skipped), in order."""
  prompts = [str(p) for p in config.sample.prompts]
  if config.sample.prompts_file:
    with open(os.path.expanduser(config.sample.prompts_file), encoding="utf-8") as f:
      prompts += [line.strip() for line in f if line.strip()]
  return tuple(prompts)


@functools.lru_cache(maxsize=1)
def encoder(folder: str) -> TextEncoder:
  return TextEncoder(folder)


@functools.lru_cache(maxsize=4)
def _encode(folder: str, prompts: tuple[str, ...], negative: str) -> Encoded:
  enc = encoder(folder)
  enc.check_lengths(prompts, "sample.prompts")
  enc.check_lengths([negative], "sample.negative_prompt")
  rows = enc.encode(("",) + prompts + ((negative,) if negative else ()))
  return Encoded(null=rows[0], prompts=rows[1:1 + len(prompts)], negative=rows[-1] if negative else None)


def encode_for_config(config) -> Encoded:
  """The embeddings of config's empty prompt, prompts and negative prompt (cached per process)."""
  prompts = prompts_of(config)
  if not prompts:
    raise ConfigError("condition='text' draws samples from prompts: set --config.sample.prompts='(\"a photo of a "
                      "cat\",)' or --config.sample.prompts_file=FILE (one prompt per line).")
  return _encode(pretrained.folder_of(config), prompts, str(config.sample.negative_prompt))
