"""Prompts -> Stable Diffusion's text condition: the CLIP text encoder's last hidden states (77 x D per prompt) of
config.pretrained's tokenizer/ and text_encoder/ (third_party/clip_text), computed on this process's devices; without
a model folder (pretrained=''), the built-in one: a small CLIP text encoder (2 layers, width 32) with seeded random
weights over the small CLIP-style vocabulary of third_party/clip_text/parity/tokenizer_sd2 (the captioned digits'
encoder: configs/digits.py:text). Random weights still map each prompt to its own embedding, which is all a model
trained on them needs.

The encoder is frozen and never part of the train state: conditioning.py takes the embeddings it gives (the empty
prompt's, the prompts' and the negative prompt's of a draw, the data set's captions), once per process and config.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np

from selfperc_jax import pretrained
from selfperc_jax.data.datasets import DATASETS
from selfperc_jax.errors import ConfigError

ENCODE_BATCH = 64  # prompts per call of the encoder
BUILTIN_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "third_party",
                                 "clip_text", "parity", "tokenizer_sd2")
BUILTIN_SEED = 0
BUILTIN_WIDTH = 32  # the built-in encoder's hidden size: the cross_attention_dim of models/sd.py's small layout


class TextEncoder:
  """The tokenizer and text encoder of a model folder. `encode(prompts)` -> (N, L, D) float32 numpy."""

  def __init__(self, folder: str):
    """folder: a diffusers model folder, or '' for the built-in encoder."""
    from third_party.clip_text import convert, model, tokenizer

    self.tokenizer = tokenizer.load_tokenizer(folder or BUILTIN_TOKENIZER)
    if folder:
      config_path, weights = pretrained.text_encoder_files(folder)
      config = convert.load_config(config_path)
      tokenizer.check_matches(self.tokenizer, config)
      with pretrained.one_line_mismatch(weights, "text_encoder"):
        self.variables = convert.load_variables(weights, config=config)
    else:
      config = model.CLIPTextConfig(vocab_size=self.tokenizer.vocab_size, hidden_size=BUILTIN_WIDTH,
                                    intermediate_size=2 * BUILTIN_WIDTH, num_hidden_layers=2, num_attention_heads=4)
      # Compiled: one program, where an eager init runs (and compiles) every operation of the forward pass alone.
      self.variables = jax.jit(model.CLIPTextModel(config).init)(jax.random.key(BUILTIN_SEED),
                                                                 np.zeros((1, self.tokenizer.max_length), np.int32))
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
    """(N, L, D) float32, ENCODE_BATCH prompts per call (the last call padded): one compiled program for any N, and
    a prompt's embedding does not depend on which prompts it was encoded with."""
    ids = self.tokenizer.encode(list(prompts))
    out = []
    for i in range(0, len(ids), ENCODE_BATCH):
      part = ids[i:i + ENCODE_BATCH]
      padded = np.concatenate([part, np.repeat(part[-1:], ENCODE_BATCH - len(part), axis=0)])
      out.append(np.asarray(self._apply(self.variables, padded))[:len(part)])
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.tokenizer.max_length,
                                                                         self.hidden_size), np.float32)


@dataclasses.dataclass(frozen=True)
class Encoded:
  null: np.ndarray  # (L, D): the empty prompt
  prompts: tuple[str, ...]  # not encoded here: a draw encodes the prompts of each chunk (prompt_encoder)
  negative: np.ndarray | None  # (L, D), or None without a negative prompt
  captions: np.ndarray | None  # (classes x K, L, D): the data set's K captions of each class, or None


def prompts_of(config) -> tuple[str, ...]:
  """sample.prompts, then those of sample.prompts_file (its lines, blank ones skipped; or, for a COCO captions file
  ending in .json, one caption per image: data/coco.py), in order; neither given: the first caption of each class
  of a captioned data set (the digits: "a handwritten zero", ...), so that prompt i asks for class i."""
  prompts = [str(p) for p in config.sample.prompts]
  if config.sample.prompts_file and config.sample.prompts_file.endswith(".json"):
    from selfperc_jax.data import coco

    prompts += [caption for _, _, caption in coco.read_captions(config.sample.prompts_file)]
  elif config.sample.prompts_file:
    with open(os.path.expanduser(config.sample.prompts_file), encoding="utf-8") as f:
      prompts += [line.strip() for line in f if line.strip()]
  if not prompts:
    prompts = [captions[0] for captions in DATASETS[config.data.name].captions]
  return tuple(prompts)


def no_prompts() -> ConfigError:
  return ConfigError("condition='text' draws samples from prompts: set --config.sample.prompts='(\"a photo of a "
                     "cat\",)' or --config.sample.prompts_file=FILE (one prompt per line).")


def captioned(config) -> bool:
  """Whether config's data set has a caption per example (image-caption data: token ids in the batch)."""
  return DATASETS[config.data.name].captioned


def captions_of(config) -> tuple[tuple[str, ...], ...]:
  """The data set's captions per class (() for a data set without captions)."""
  return DATASETS[config.data.name].captions


@functools.lru_cache(maxsize=1)
def encoder(folder: str) -> TextEncoder:
  return TextEncoder(folder)


def folder_of(config) -> str:
  """The model folder whose tokenizer and text encoder config's text condition uses ('' for the built-in one)."""
  return pretrained.folder_of(config) if config.pretrained else ""


@functools.lru_cache(maxsize=2)
def tokenizer(folder: str):
  """The tokenizer alone (third_party/clip_text's CLIPTokenizer) of a model folder, or the built-in one for ''."""
  from third_party.clip_text import tokenizer as clip_tokenizer

  return clip_tokenizer.load_tokenizer(folder or BUILTIN_TOKENIZER)


def tokenizer_identity(tok) -> str:
  """What makes one tokenizer's ids another's: its vocabulary, merges and specials (a digest of them), and context."""
  import hashlib

  digest = hashlib.sha256(tok.backend.to_str().encode()).hexdigest()[:16]
  return f"CLIP BPE, {tok.vocab_size} tokens, context {tok.max_length}, sha256 {digest}"


@functools.lru_cache(maxsize=4)
def _encode(folder: str, prompts: tuple[str, ...], negative: str, captions: tuple[tuple[str, ...], ...]) -> Encoded:
  enc = encoder(folder)
  enc.check_lengths(prompts, "sample.prompts")
  enc.check_lengths([negative], "sample.negative_prompt")
  flat = tuple(c for per_class in captions for c in per_class)
  if captions and len({len(c) for c in captions}) != 1:
    raise ValueError("every class needs as many captions")
  rows = enc.encode(("",) + ((negative,) if negative else ()) + flat)
  return Encoded(null=rows[0], prompts=prompts, negative=rows[1] if negative else None,
                 captions=rows[len(rows) - len(flat):] if flat else None)


def prompt_encoder(folder: str, prompts: tuple[str, ...]):
  """indices -> (n, L, D): the embeddings of those prompts, encoded when asked (a chunk of a draw at a time), so that
  no host holds a table that grows with the number of prompts (30,000 COCO captions would be 9.5 GB at SD's size)."""
  def encode(indices) -> np.ndarray:
    return encoder(folder).encode([prompts[int(i)] for i in indices])

  return encode


def encode_for_config(config) -> Encoded:
  """The embeddings of config's empty prompt, negative prompt and data set's captions, and its prompts (checked to
  fit the context; encoded by a draw, prompt_encoder), cached per process."""
  prompts = prompts_of(config)
  if not prompts and not (captioned(config) and config.sample_every == 0):  # (a run without grids needs none)
    raise no_prompts()
  return _encode(folder_of(config), prompts, str(config.sample.negative_prompt), captions_of(config))
