"""Stable Diffusion's CLIP tokenizer: a prompt -> the (77,) int32 token ids SD 1.x / 2.x condition on, read from a
diffusers model folder's `tokenizer/` files, with Hugging Face's `tokenizers` library (the Rust one) doing the work.

The pipeline built here is the one transformers' `CLIPTokenizer` (5.x; `CLIPTokenizerFast` in 4.x) builds over the
same files, which is what diffusers' pipelines call with `padding="max_length", max_length=77, truncation=True`:

- normaliser: Unicode NFC, every run of whitespace (`\\s+`) replaced by one space, lower case;
- pre-tokeniser: CLIP's word pattern (OpenAI CLIP's simple_tokenizer: the two special tokens, the contractions
  's 't 're 've 'm 'll 'd, runs of letters, single digits, runs of anything else but whitespace; text between matches,
  i.e. whitespace, is dropped), then the byte-level mapping of each piece (GPT-2's byte-to-unicode table, with its
  own default split regex, as transformers has it);
- model: BPE over vocab.json / merges.txt with the end-of-word suffix `</w>` and no continuing-subword prefix; unknown
  symbols become the folder's unk token (never happens with CLIP's vocabulary: all 512 byte symbols are in it);
- `<|startoftext|>` before, `<|endoftext|>` after; truncated to `model_max_length` (77) with EOS kept last, padded on
  the right to that length with the folder's pad token;
- the special tokens (bos, eos, unk, pad) are matched in the prompt text itself, as transformers matches them, with
  the flags the folder gives them: SD 2.x's pad token `!` is one of them, so every `!` in an SD 2.x prompt becomes
  id 0 alone ('!!' does not merge), exactly as diffusers' SD 2.x pipelines tokenize it.

The special tokens are read as transformers reads them: from tokenizer_config.json, with special_tokens_map.json's
entries taking precedence unless tokenizer_config.json has an `added_tokens_decoder` (transformers' newer save
format, which makes it ignore special_tokens_map.json); tokens named in neither fall back to CLIPTokenizer's
defaults. SD 1.x folders pad with `<|endoftext|>` (49407), SD 2.x's special_tokens_map.json names `!` (id 0).

transformers 4's *slow* (Python) CLIPTokenizer is not what this matches where it differs from the tokenizers
pipeline (CJK characters, control characters; with ftfy installed also HTML entities and ftfy's text fixes); see
README.md. No hand-written BPE here: `tokenizers` does the normalising, splitting, merging, truncating and padding.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from selfperc_jax.errors import UserError
from third_party.weights_io import WeightsError, read_json_object

# transformers' CLIPTokenizer defaults, used for a token that neither special-token file names.
DEFAULT_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>"}
# The order in which transformers adds the named special tokens (it matters when two name the same string with
# different flags: the last one added sets them).
TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
END_OF_WORD = "</w>"
# OpenAI CLIP's word pattern (simple_tokenizer.py), applied after lower-casing.
CLIP_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
CLIP_TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")


class CLIPTokenizerError(UserError, ValueError):
  """A tokenizer folder, a prompt or a pairing with a text encoder that cannot work."""


def _tokenizers():
  try:
    import tokenizers
  except ImportError as e:  # a dependency of the project; only a broken install lacks it
    raise CLIPTokenizerError("the CLIP tokenizer needs Hugging Face's `tokenizers` package: pip install tokenizers "
                             f"(import failed: {e}).") from e
  return tokenizers


class CLIPTokenizer:
  """A loaded tokenizer folder. `encode(prompts)` -> (N, max_length) int32 ids; `bos_id` / `eos_id` / `pad_id` (and
  the `*_token` strings), `max_length` (77), `vocab_size`, `empty_ids` (the empty prompt's ids: SD's unconditional
  input for classifier-free guidance), `backend` (the tokenizers.Tokenizer) and `folder` (the tokenizer folder)."""

  def __init__(self, backend, *, folder: str, max_length: int, tokens: Mapping[str, str], vocab_size: int):
    self.backend = backend
    self.folder = folder
    self.max_length = max_length
    self.vocab_size = vocab_size
    self.bos_token, self.eos_token, self.pad_token = tokens["bos_token"], tokens["eos_token"], tokens["pad_token"]
    self.unk_token = tokens["unk_token"]
    self.bos_id, self.eos_id, self.pad_id = (backend.token_to_id(t) for t in (self.bos_token, self.eos_token,
                                                                               self.pad_token))

  def __repr__(self) -> str:
    return (f"CLIPTokenizer({self.folder!r}, vocab_size={self.vocab_size}, max_length={self.max_length}, "
            f"bos={self.bos_token!r} ({self.bos_id}), eos={self.eos_token!r} ({self.eos_id}), "
            f"pad={self.pad_token!r} ({self.pad_id}))")

  def encode(self, prompts: Sequence[str]) -> np.ndarray:
    """(N, max_length) int32: BOS, the prompt's tokens (truncated so that EOS is the last of max_length ids), EOS,
    then the pad id. `prompts` is a sequence of str (one prompt is `[prompt]`)."""
    prompts = _check_prompts(prompts)
    out = np.empty((len(prompts), self.max_length), np.int32)
    for i, prompt in enumerate(prompts):  # one at a time: no thread pool (encode_batch's) in a process that forks
      try:
        ids = self.backend.encode(prompt).ids
      except Exception as e:  # e.g. a lone surrogate, which is not Unicode text
        raise CLIPTokenizerError(f"prompt {i} cannot be tokenized ({type(e).__name__}: {e}): {prompt[:80]!r}") from e
      out[i] = ids
    return out

  @property
  def empty_ids(self) -> np.ndarray:
    """The empty prompt's (max_length,) ids: [BOS, EOS, pad, ...] (classifier-free guidance's unconditional input)."""
    return self.encode([""])[0]


def _check_prompts(prompts: Any) -> list[str]:
  if isinstance(prompts, (str, bytes)):
    raise CLIPTokenizerError(f"encode takes a sequence of prompts, not one {type(prompts).__name__}: pass "
                             f"[{prompts[:40]!r}].")
  try:
    prompts = list(prompts)
  except TypeError:
    raise CLIPTokenizerError(f"encode takes a sequence of str prompts; got a {type(prompts).__name__}.") from None
  bad = [f"{i}: {type(p).__name__} {p!r:.40}" for i, p in enumerate(prompts) if not isinstance(p, str)]
  if bad:
    raise CLIPTokenizerError(f"every prompt must be a str; not so at index {', '.join(bad[:5])}"
                             f"{f' (and {len(bad) - 5} more)' if len(bad) > 5 else ''}.")
  return prompts


# --------------------------------------------------------------------------------------------------------------------
# Reading a folder


def tokenizer_folder(folder: str) -> str:
  """The tokenizer folder of `folder`: its `tokenizer/` subfolder (a diffusers model folder), or `folder` itself."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise CLIPTokenizerError(f"tokenizer folder {folder!r} does not exist (give a diffusers model folder, which has "
                             "tokenizer/ inside, or the tokenizer folder itself).")
  inner = os.path.join(folder, "tokenizer")
  if os.path.isdir(inner):
    return inner
  if not any(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt", "tokenizer.json",
                                                               "tokenizer_config.json")):
    raise CLIPTokenizerError(f"{folder!r} is neither a diffusers model folder (no tokenizer/ inside) nor a tokenizer "
                             "folder (no vocab.json, merges.txt, tokenizer.json or tokenizer_config.json).")
  return folder


def _json(path: str) -> dict:
  try:
    return read_json_object(path)
  except WeightsError as e:
    raise CLIPTokenizerError(str(e)) from e


def _vocab_and_merges(folder: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """vocab.json + merges.txt (read by tokenizers' own reader), or else the BPE model inside tokenizer.json."""
  tokenizers = _tokenizers()
  vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
  json_path = os.path.join(folder, "tokenizer.json")
  has_vocab, has_merges = os.path.isfile(vocab_path), os.path.isfile(merges_path)
  if has_vocab and has_merges:
    vocab = _json(vocab_path)  # a clear message for bad JSON; tokenizers' reader then parses both the same way
    try:
      _, merges = tokenizers.models.BPE.read_file(vocab_path, merges_path)
    except Exception as e:
      raise CLIPTokenizerError(f"{merges_path!r} is not a readable BPE merges file ({type(e).__name__}: {e}).") from e
    return vocab, [tuple(m) for m in merges]
  if os.path.isfile(json_path):
    model = _json(json_path).get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) \
        or not isinstance(model.get("merges"), list):
      raise CLIPTokenizerError(f"{json_path!r} holds no BPE model with a vocab and merges (CLIP's tokenizer is "
                               "byte-level BPE).")
    merges = []
    for m in model["merges"]:
      pair = m.split(" ") if isinstance(m, str) else m
      if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
        raise CLIPTokenizerError(f"{json_path!r}: merge {m!r} is not a pair of symbols.")
      merges.append(tuple(pair))
    return model["vocab"], merges
  missing = [p for p, there in ((vocab_path, has_vocab), (merges_path, has_merges)) if not there]
  raise CLIPTokenizerError(f"tokenizer folder {folder!r} lacks {' and '.join(os.path.basename(p) for p in missing)} "
                           "(and has no tokenizer.json): CLIP's BPE needs both vocab.json and merges.txt.")


def _check_vocab(vocab: dict, path: str) -> None:
  bad = [f"{k!r}: {v!r}" for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
  if bad:
    raise CLIPTokenizerError(f"{path!r}: token ids must be non-negative ints; not so for {', '.join(bad[:3])}.")
  if sorted(vocab.values()) != list(range(len(vocab))):
    raise CLIPTokenizerError(f"{path!r}: the {len(vocab)} token ids are not 0 .. {len(vocab) - 1}, each once (a "
                             "damaged vocabulary?).")


def _added_token(value: Any, where: str, key: str):
  """A special token as transformers takes it: a plain string (special, matched on the raw text) or an AddedToken
  dict (its lstrip / rstrip / single_word / normalized flags; '__type' and 'special' are ignored)."""
  AddedToken = _tokenizers().AddedToken
  if isinstance(value, str):
    return AddedToken(value, special=True, normalized=False)
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    flags = {k: bool(value[k]) for k in ("lstrip", "rstrip", "single_word", "normalized") if k in value}
    return AddedToken(value["content"], special=True, **{"normalized": False, **flags})
  raise CLIPTokenizerError(f"{where}: {key} is {value!r}, neither a string nor a token object with a 'content'.")


def _special_tokens(folder: str, config: dict, vocab: Mapping[str, int], vocab_where: str) -> tuple[dict, list]:
  """({key: AddedToken} for the named special tokens, [AddedToken] in the order transformers adds them), each one
  checked against the vocabulary."""
  config_path = os.path.join(folder, "tokenizer_config.json")
  map_path = os.path.join(folder, "special_tokens_map.json")
  values = {k: (config[k], config_path) for k in TOKEN_KEYS if config.get(k) is not None}
  decoder = config.get("added_tokens_decoder")
  if decoder is None and os.path.isfile(map_path):  # transformers: the map overrides the config, key by key
    values.update({k: (v, map_path) for k, v in _json(map_path).items() if k in TOKEN_KEYS and v is not None})
  for k, v in DEFAULT_TOKENS.items():
    values.setdefault(k, (v, "CLIPTokenizer's default"))
  named = {k: _added_token(v, where, k) for k, (v, where) in values.items()}
  first = []  # transformers' newer format: added_tokens_decoder's entries (and their flags) come first, as they are
  if decoder is not None:
    if not isinstance(decoder, dict) or not all(isinstance(i, str) and i.isdigit() for i in decoder):
      raise CLIPTokenizerError(f"{config_path!r}: added_tokens_decoder must be an object of token id -> token.")
    entries = sorted(((int(i), _added_token(v, config_path, f"added_tokens_decoder[{i!r}]"))
                      for i, v in decoder.items()), key=lambda e: e[0])
    wrong = [f"{t.content!r} is id {i} there, {vocab[t.content]} in the vocabulary" for i, t in entries
             if t.content in vocab and vocab[t.content] != i]
    if wrong:
      raise CLIPTokenizerError(f"{config_path!r}: added_tokens_decoder disagrees with {vocab_where!r}: "
                               f"{'; '.join(wrong)}.")
    first = [t for _, t in entries]
    by_content = {t.content: t for t in first}
    named = {k: by_content.get(t.content, t) for k, t in named.items()}
  contents = {t.content for t in first}
  order = first + [named[k] for k in TOKEN_KEYS if k in named and named[k].content not in contents]
  labels = {t.content: k for k, t in named.items()}
  missing = [f"{labels.get(t.content, 'added token')} {t.content!r}" for t in order if t.content not in vocab]
  if missing:
    raise CLIPTokenizerError(f"{vocab_where!r} lacks the special token(s) {', '.join(dict.fromkeys(missing))}: the "
                             "vocabulary and the special-token files do not belong together.")
  return named, order


def load_tokenizer(folder: str) -> CLIPTokenizer:
  """The CLIP tokenizer of a diffusers model folder (its `tokenizer/`) or of a tokenizer folder itself: vocab.json
  and merges.txt (or, lacking them, tokenizer.json's BPE model), tokenizer_config.json (model_max_length, special
  tokens) and special_tokens_map.json if present. Every problem is one CLIPTokenizerError."""
  tokenizers = _tokenizers()
  folder = tokenizer_folder(folder)
  config_path = os.path.join(folder, "tokenizer_config.json")
  if not os.path.isfile(config_path):
    raise CLIPTokenizerError(f"tokenizer folder {folder!r} has no tokenizer_config.json (it gives the maximum length, "
                             "77 for SD, and the special tokens).")
  config = _json(config_path)
  cls = config.get("tokenizer_class")
  if cls is not None and cls not in CLIP_TOKENIZER_CLASSES:
    raise CLIPTokenizerError(f"{config_path!r} names tokenizer_class {cls!r}: this loader builds CLIP's tokenizer "
                             f"({' / '.join(CLIP_TOKENIZER_CLASSES)}) only.")
  max_length = config.get("model_max_length")
  if not isinstance(max_length, int) or isinstance(max_length, bool) or not 2 <= max_length <= 100_000:
    raise CLIPTokenizerError(f"{config_path!r}: model_max_length must be an int >= 2 (SD: 77); got {max_length!r}.")
  vocab, merges = _vocab_and_merges(folder)
  vocab_where = os.path.join(folder, "vocab.json" if os.path.isfile(os.path.join(folder, "vocab.json"))
                             else "tokenizer.json")
  _check_vocab(vocab, vocab_where)
  named, order = _special_tokens(folder, config, vocab, vocab_where)
  unk = named["unk_token"].content
  try:
    model = tokenizers.models.BPE(vocab, merges, unk_token=unk, continuing_subword_prefix="",
                                  end_of_word_suffix=END_OF_WORD, fuse_unk=False, dropout=None)
  except Exception as e:  # e.g. a merge whose symbols are not in the vocabulary
    raise CLIPTokenizerError(f"vocab.json and merges.txt of {folder!r} do not make a BPE model "
                             f"({type(e).__name__}: {e}).") from e
  backend = tokenizers.Tokenizer(model)
  n = tokenizers.normalizers
  backend.normalizer = n.Sequence([n.NFC(), n.Replace(tokenizers.Regex(r"\s+"), " "), n.Lowercase()])
  p = tokenizers.pre_tokenizers
  # behavior="removed" + invert=True: keep the pattern's matches, drop what lies between them (whitespace).
  backend.pre_tokenizer = p.Sequence([p.Split(tokenizers.Regex(CLIP_PATTERN), behavior="removed", invert=True),
                                      p.ByteLevel(add_prefix_space=False)])
  backend.decoder = tokenizers.decoders.ByteLevel()
  backend.add_special_tokens(order)  # matched in the text before normalising (or after, for normalized ones)
  bos, eos, pad = (named[k].content for k in ("bos_token", "eos_token", "pad_token"))
  backend.post_processor = tokenizers.processors.TemplateProcessing(
      single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
  backend.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
  backend.enable_padding(direction="right", pad_id=vocab[pad], pad_token=pad, length=max_length)
  return CLIPTokenizer(backend, folder=folder, max_length=max_length, vocab_size=len(vocab),
                       tokens={k: t.content for k, t in named.items()})


def check_matches(tokenizer: CLIPTokenizer, clip_config) -> None:
  """CLIPTokenizerError unless the tokenizer fits the text encoder: the same vocabulary size, no more ids than
  position embeddings, and (with a non-legacy eos_token_id, which the pooled output uses) the same EOS id.
  `clip_config`: a model.CLIPTextConfig or a text_encoder/config.json dict."""
  def get(key):
    return clip_config.get(key) if isinstance(clip_config, Mapping) else getattr(clip_config, key, None)

  from third_party.clip_text.model import LEGACY_EOS_TOKEN_ID

  problems = []
  vocab_size, positions, eos = get("vocab_size"), get("max_position_embeddings"), get("eos_token_id")
  if vocab_size != tokenizer.vocab_size:
    problems.append(f"the tokenizer has {tokenizer.vocab_size} tokens, the text encoder's vocab_size is {vocab_size}")
  if positions is not None and tokenizer.max_length > positions:
    problems.append(f"the tokenizer makes {tokenizer.max_length} ids, the text encoder has {positions} positions")
  if eos is not None and eos != LEGACY_EOS_TOKEN_ID and eos != tokenizer.eos_id:
    problems.append(f"the text encoder's eos_token_id is {eos}, the tokenizer's EOS is {tokenizer.eos_id}")
  if problems:
    raise CLIPTokenizerError(f"tokenizer {tokenizer.folder!r} does not match the text encoder: {'; '.join(problems)} "
                             "(a tokenizer/ and text_encoder/ from different models?).")
