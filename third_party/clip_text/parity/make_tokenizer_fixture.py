"""Writes the parity fixture of the CLIP tokenizer (third_party/clip_text/tokenizer.py): two small SD-style tokenizer
folders and the ids transformers' CLIPTokenizer gives for a set of edge-case prompts.

Run from the repository root, in a virtual environment OUTSIDE the repository that has transformers 5 and tokenizers
(no torch, no jax, not the project; nothing is downloaded but the packages):

    python3 -m venv /tmp/tokref && /tmp/tokref/bin/pip install transformers tokenizers numpy
    /tmp/tokref/bin/python third_party/clip_text/parity/make_tokenizer_fixture.py

and, optionally, the cross-check against transformers 4.x's two CLIP tokenizers (the Python "slow" one and the
tokenizers-backed "fast" one; transformers 5 has only the latter), which adds a `transformers_4` entry to the fixture:

    python3 -m venv /tmp/tokref4 && /tmp/tokref4/bin/pip install "transformers<5" numpy
    /tmp/tokref4/bin/python third_party/clip_text/parity/make_tokenizer_fixture.py --check_transformers_4

The committed files were written with transformers 5.24.0 / tokenizers 0.23.3 and cross-checked with transformers
4.57.6 / tokenizers 0.22.2 (the versions are stored in the fixture). ftfy was NOT installed in either venv, on purpose:
transformers 5's CLIPTokenizer never uses ftfy (it is the tokenizers pipeline, the one tokenizer.py builds), and
transformers 4's slow CLIPTokenizer falls back to BERT's BasicTokenizer without it (with it, it would apply ftfy's
fix_text and html.unescape, which no tokenizers pipeline does). The slow tokenizer's differences are listed in the
fixture, not hidden.

What it writes, next to itself:

- `tokenizer_sd1/` and `tokenizer_sd2/`: vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json in
  the shape of SD 1.x's and SD 2.x's `tokenizer/` folders, over one SMALL CLIP-style vocabulary: the 256 byte-level
  symbols in CLIP's order (GPT-2's bytes_to_unicode), then the same 256 with the end-of-word suffix `</w>`, then one
  token per merge (merges learned from the short English text below, through CLIP's normaliser and pre-tokeniser, by
  the plain most-frequent-pair rule: see learn_merges), then `<|startoftext|>` and `<|endoftext|>`: the layout of
  CLIP's 49,408-token vocabulary (512 + 48,894 merges + 2), only smaller. Both folders share it; they differ in their
  special-token files: SD 1.x pads with `<|endoftext|>`; SD 2.x's special_tokens_map.json names `!` as the pad token
  while its tokenizer_config.json names `<|endoftext|>` (to our recollection the published
  stabilityai/stable-diffusion-2(-1) files do the same; not checked against them: nothing is downloaded here);
  transformers reads special_tokens_map.json over tokenizer_config.json when the latter has no
  `added_tokens_decoder`, so SD 2.x pads with `!` (id 0).
- `tokenizer_fixture.json`: for every prompt in PROMPTS, the (77,) ids that transformers' CLIPTokenizer gives for each
  folder with `padding="max_length", max_length=77, truncation=True` (what diffusers' pipelines call), after checking
  that CLIPTokenizerFast and AutoTokenizer give the same (in transformers 5 these are one class, loaded three ways:
  the slow/fast cross-check is --check_transformers_4's); the ids of BOS / EOS / PAD per folder; and `variants`: other
  special-token files over the same vocabulary (tokenizer_config.json with transformers 5's `added_tokens_decoder`,
  tokenizer_config.json alone, a pad token given only in special_tokens_map.json), each with its files' contents and
  the ids transformers gives for a few prompts, so the test can rebuild them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
FIXTURE = HERE / "tokenizer_fixture.json"
FOLDERS = ("tokenizer_sd1", "tokenizer_sd2")
MAX_LENGTH = 77
NUM_MERGES = 400  # CLIP has 48,894
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# The text the merges are learned from (so that common English words are whole tokens and others are split).
TRAINING_TEXT = """
A photo of a cat sitting on a wooden table next to a window. A painting of a dog in a field of flowers at sunset.
A portrait of a woman with long hair, highly detailed, digital painting, artstation, concept art, smooth, sharp focus,
illustration, art by a famous painter. A photograph of the city at night with lights and cars on the street. An oil
painting of a mountain landscape with a lake and trees in the morning light. A close up photo of a red apple on a white
plate. A cute cat and a small dog playing in the garden. The house on the hill is old and beautiful. A man riding a
horse on the beach during the summer. A bowl of fruit on the kitchen table, still life, soft light. An astronaut riding
a horse on the moon, photorealistic, high quality, trending. A watercolor painting of a bird on a branch in the forest.
It's a sunny day and the children are playing in the park. They're walking in the rain with an umbrella. We've seen
the ocean and the waves. I'm sure you'll like the picture of the old castle, he'd say. A black and white photo of a
train station in the winter with snow. Two cats and three dogs sleeping on a blue sofa. A futuristic city with tall
buildings and flying cars, cinematic lighting, 4k, 8k, ultra detailed. A bouquet of roses and tulips in a glass vase.
The quick brown fox jumps over the lazy dog. A drawing of a robot reading a book in a library.
"""

# Prompts chosen for the edge cases of CLIP's normaliser, pre-tokeniser, BPE, special tokens, truncation and padding.
# Two more are added by `main`: the longest word run that fits (75 content tokens) and one token more (76), found
# with the reference tokenizer itself.
PROMPTS = [
  "",
  "a photo of a cat",
  "A Photo Of A CAT",
  "a photo of 3 cats",
  "1234567890 and 2024, 4k 8k",
  "it's a dog's life, isn't it? they're here, we've seen, I'm sure, you'll see, he'd go",
  "IT'S LOUD AND THEY'RE HERE",
  "hello, world! (test) [brackets] {braces} a+b=c; x/y: 50% @home #tag $5 ~^&*_-| \\ \"quoted\" 'single'",
  "  leading and trailing spaces   ",
  "tabs\tand\nnewlines\r\nand   many    spaces\x0b\x0cform feed",
  "   \t\n  ",
  "...",
  "caf\u00e9 au lait",  # e-acute, composed (NFC)
  "cafe\u0301 au lait",  # e + combining acute (NFD): NFC composes it
  "na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m \u0130stanbul stra\u00dfe",
  "a cat \U0001f431 with a hat \U0001f3a9\U0001f44d\U0001f3fd and a flag \U0001f1eb\U0001f1f7",
  "\u6771\u4eac\u306e\u591c\u666f, \u5bcc\u58eb\u5c71",  # Japanese / CJK
  "\u041c\u043e\u0441\u043a\u0432\u0430 \u043d\u043e\u0447\u044c\u044e",  # Cyrillic
  "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 \u0928\u092e\u0938\u094d\u0924\u0947",
  "xylophone quizzaciously zzzqqq pneumonoultramicroscopic",
  "! !! !!! wow!! hi!",  # '!' is SD 2.x's pad token: transformers matches it as a special token
  "a <|endoftext|> b <|startoftext|>c",
  "<|STARTOFTEXT|> and <|ENDOFTEXT|>",
  "don't stop, 'quoted' words, rock'n'roll",
  "non\u00a0breaking\u3000ideographic\u200bzero width\u2009thin",
  "fish &amp; chips &lt;3",  # HTML entities (ftfy / the original CLIP would unescape them)
  "it\u2019s \u201ccurly\u201d",  # curly quotes (ftfy would straighten them)
  "\uff21\uff22\uff23 \uff11\uff12\uff13",  # full-width letters and digits
  "x\u00b2 \u00bd \u0663\u0664 \u2163",  # other \p{N}: superscript, fraction, Arabic-Indic digits, Roman numeral
  "masterpiece, best quality, " * 30,  # far longer than 77 tokens
]


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's / CLIP's table: printable bytes map to themselves, the others to code points from 256 on. Its order is
  CLIP's vocabulary order."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
               + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
  order, chars = list(printable), list(printable)
  for b in range(256):
    if b not in printable:
      order.append(b)
      chars.append(256 + len(order) - len(printable) - 1)
  return dict(zip(order, map(chr, chars)))


def learn_merges() -> list[tuple[str, str]]:
  """NUM_MERGES merges learned from TRAINING_TEXT, deterministically: the text goes through CLIP's normaliser and
  pre-tokeniser (those of transformers' CLIPTokenizer, taken from it); each word starts as its byte-level symbols,
  the last one with `</w>`; each step merges the most frequent adjacent pair (ties: the smallest pair in code-point
  order) everywhere. (tokenizers' BpeTrainer breaks ties differently from run to run, so it is not used: rerunning
  this script must give the same files.)"""
  import collections

  from transformers import CLIPTokenizer

  base = [*bytes_to_unicode().values()]
  with tempfile.TemporaryDirectory() as tmp:  # a throwaway tokenizer, only to borrow its normaliser / pre-tokeniser
    _write_vocab(pathlib.Path(tmp), base + [s + "</w>" for s in base] + [BOS, EOS], [])
    (pathlib.Path(tmp) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": MAX_LENGTH}))
    backend = CLIPTokenizer.from_pretrained(tmp).backend_tokenizer
  pieces = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(TRAINING_TEXT))
  counts = collections.Counter(word for word, _ in pieces)
  words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in counts.items()}
  merges, made = [], set(base) | {s + "</w>" for s in base}
  while len(merges) < NUM_MERGES:
    pairs = collections.Counter()
    for symbols, n in words.items():
      for pair in zip(symbols, symbols[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = min(pairs, key=lambda pair: (-pairs[pair], pair))
    merged = best[0] + best[1]
    new_words = {}
    for symbols, n in words.items():
      out, i = [], 0
      while i < len(symbols):
        if symbols[i:i + 2] == best:
          out.append(merged)
          i += 2
        else:
          out.append(symbols[i])
          i += 1
      new_words[tuple(out)] = new_words.get(tuple(out), 0) + n
    words = new_words
    if merged not in made:  # one token per merge, as in CLIP's vocabulary
      made.add(merged)
      merges.append(best)
  return merges


def _write_vocab(folder: pathlib.Path, tokens: list[str], merges: list[tuple[str, str]]) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
  (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def _added(content: str, normalized: bool) -> dict:
  return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


# The special-token files of the two folders, in the published SD folders' shape (transformers 4.2x's save format).
SPECIAL_TOKENS_MAP = {
  "tokenizer_sd1": {"bos_token": _added(BOS, True), "eos_token": _added(EOS, True), "pad_token": EOS,
                    "unk_token": _added(EOS, True)},
  "tokenizer_sd2": {"bos_token": _added(BOS, True), "eos_token": _added(EOS, True), "pad_token": "!",
                    "unk_token": _added(EOS, True)},
}


def tokenizer_config(folder: str) -> dict:
  config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": MAX_LENGTH,
            "name_or_path": "openai/clip-vit-large-patch14", "pad_token": EOS,
            "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer"}
  for key, content in (("bos_token", BOS), ("eos_token", EOS), ("unk_token", EOS)):
    config[key] = {"__type": "AddedToken", **_added(content, True)}
  return dict(sorted(config.items()))


def variants(vocab: dict[str, int]) -> dict[str, dict]:
  """Other special-token files over the same vocabulary: {name: {"files": {filename: content}}}."""
  def decoder(pad: str) -> dict:
    entries = {pad: vocab[pad], BOS: vocab[BOS], EOS: vocab[EOS]}
    return {str(i): {**_added(t, False), "special": True} for t, i in sorted(entries.items(), key=lambda e: e[1])}

  # transformers 5 (and 4.3x+) saves: tokenizer_config.json carries added_tokens_decoder and plain-string tokens; a
  # special_tokens_map.json beside it is then IGNORED by transformers (here it contradicts tokenizer_config.json).
  v5_config = {"added_tokens_decoder": decoder("!"), "bos_token": BOS, "clean_up_tokenization_spaces": False,
               "do_lower_case": True, "eos_token": EOS, "errors": "replace", "model_max_length": MAX_LENGTH,
               "pad_token": "!", "tokenizer_class": "CLIPTokenizer", "unk_token": EOS}
  return {
    "added_tokens_decoder": {"files": {"tokenizer_config.json": v5_config,
                                       "special_tokens_map.json": {"pad_token": EOS, "bos_token": BOS,
                                                                   "eos_token": EOS, "unk_token": EOS}}},
    "config_only_pad_eos": {"files": {"tokenizer_config.json": tokenizer_config("tokenizer_sd1")}},
    "map_only_pad": {"files": {"tokenizer_config.json": {"model_max_length": MAX_LENGTH, "do_lower_case": True},
                               "special_tokens_map.json": {"pad_token": "!"}}},
  }


VARIANT_PROMPTS = ["", "a photo of 3 cats", "! !! !!! wow!! hi!", "a <|endoftext|> b <|startoftext|>c",
                   "<|STARTOFTEXT|> and <|ENDOFTEXT|>"]


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
  out = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True)["input_ids"]
  return [list(map(int, ids)) for ids in out]


def _reference(folder: pathlib.Path, prompts: list[str], auto: bool = True) -> tuple[list[list[int]], dict]:
  """transformers 5: CLIPTokenizer's ids, checked equal to CLIPTokenizerFast's and (`auto`) AutoTokenizer's."""
  from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

  classes = (CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer)  # AutoTokenizer: through tokenizer_class
  tokenizers = [cls.from_pretrained(str(folder)) for cls in classes[:3 if auto else 2]]
  ids = [_encode(t, prompts) for t in tokenizers]
  assert all(i == ids[0] for i in ids), f"{folder}: transformers' CLIP tokenizers disagree"
  t = tokenizers[0]
  special = {"bos": [t.bos_token, t.bos_token_id], "eos": [t.eos_token, t.eos_token_id],
             "pad": [t.pad_token, t.pad_token_id], "model_max_length": t.model_max_length}
  return ids[0], special


def _boundary_prompts(folder: pathlib.Path) -> list[str]:
  """The longest run of 'cat ' words that fits in 77 ids untruncated (75 content tokens) and one word more."""
  from transformers import CLIPTokenizer

  t = CLIPTokenizer.from_pretrained(str(folder))
  n = 1
  while len(t("cat " * (n + 1))["input_ids"]) <= MAX_LENGTH:
    n += 1
  assert len(t("cat " * n)["input_ids"]) == MAX_LENGTH, "one 'cat' is not one token"
  return ["cat " * n, "cat " * (n + 1)]


def make() -> None:
  import tokenizers
  import transformers

  assert transformers.__version__.startswith("5."), "run this with transformers 5 (see the docstring)"
  try:
    import ftfy  # noqa: F401
    sys.exit("ftfy is installed in this venv: uninstall it (see the docstring)")
  except ImportError:
    pass
  merges = learn_merges()
  base = [*bytes_to_unicode().values()]
  tokens = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [BOS, EOS]
  assert len(set(tokens)) == len(tokens)
  for name in FOLDERS:
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    _write_vocab(folder, tokens, merges)
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP[name], indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(name), indent=2) + "\n")
  prompts = PROMPTS + _boundary_prompts(HERE / FOLDERS[0])
  fixture = {"transformers_version": transformers.__version__, "tokenizers_version": tokenizers.__version__,
             "ftfy": "not installed", "max_length": MAX_LENGTH, "vocab_size": len(tokens), "num_merges": len(merges),
             "call": 'tokenizer(prompts, padding="max_length", max_length=77, truncation=True)',
             "prompts": prompts, "folders": {}, "variants": {}}
  for name in FOLDERS:
    ids, special = _reference(HERE / name, prompts)
    fixture["folders"][name] = {**special, "ids": ids}
  vocab = {t: i for i, t in enumerate(tokens)}
  for name, variant in variants(vocab).items():
    with tempfile.TemporaryDirectory() as tmp:
      folder = pathlib.Path(tmp)
      _write_vocab(folder, tokens, merges)
      for filename, content in variant["files"].items():
        (folder / filename).write_text(json.dumps(content, indent=2))
      ids, special = _reference(folder, VARIANT_PROMPTS, auto=False)
    fixture["variants"][name] = {**variant, **special, "prompts": VARIANT_PROMPTS, "ids": ids}
  _write(fixture)
  sizes = sum(p.stat().st_size for name in FOLDERS for p in (HERE / name).iterdir()) + FIXTURE.stat().st_size
  print(f"wrote {FIXTURE.name} and {', '.join(FOLDERS)}: {len(prompts)} prompts, vocabulary {len(tokens)} "
        f"({len(merges)} merges), {sizes / 1024:.0f} KB in all")


def _write(fixture: dict) -> None:
  # One line per id row keeps the file readable and diffable.
  text = json.dumps(fixture, indent=1, ensure_ascii=True)
  text = re.sub(r"\[\s*(\d+(?:,\s*\d+)*)\s*\]", lambda m: "[" + ", ".join(re.findall(r"\d+", m.group(1))) + "]", text)
  FIXTURE.write_text(text + "\n")


def check_transformers_4() -> None:
  """transformers 4.x: the slow (Python) CLIPTokenizer and CLIPTokenizerFast against the stored ids."""
  import tokenizers
  import transformers
  from transformers import CLIPTokenizer, CLIPTokenizerFast

  assert transformers.__version__.startswith("4."), "run --check_transformers_4 with transformers 4.x"
  try:
    import ftfy  # noqa: F401
    sys.exit("ftfy is installed in this venv: uninstall it (see the docstring)")
  except ImportError:
    pass
  fixture = json.loads(FIXTURE.read_text())
  prompts = fixture["prompts"]
  result = {"transformers_version": transformers.__version__, "tokenizers_version": tokenizers.__version__,
            "ftfy": "not installed (the slow tokenizer's fallback: BERT's BasicTokenizer)", "folders": {}}
  for name in FOLDERS:
    stored = fixture["folders"][name]["ids"]
    fast = _encode(CLIPTokenizerFast.from_pretrained(str(HERE / name)), prompts)
    slow = _encode(CLIPTokenizer.from_pretrained(str(HERE / name)), prompts)
    result["folders"][name] = {
      "fast_differs_on": [p for p, a, b in zip(prompts, fast, stored) if a != b],
      "slow_differs_on": [{"prompt": p, "slow_ids": a} for p, a, b in zip(prompts, slow, stored) if a != b]}
    print(f"{name}: transformers {transformers.__version__} fast differs on "
          f"{len(result['folders'][name]['fast_differs_on'])} of {len(prompts)} prompts, slow on "
          f"{len(result['folders'][name]['slow_differs_on'])}")
  fixture["transformers_4"] = result
  _write(fixture)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check_transformers_4", action="store_true",
                      help="with transformers 4.x: add its slow and fast tokenizers' agreement to the fixture")
  args = parser.parse_args()
  check_transformers_4() if args.check_transformers_4 else make()
  return 0


if __name__ == "__main__":
  sys.exit(main())
