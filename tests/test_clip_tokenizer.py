"""The CLIP tokenizer (third_party/clip_text/tokenizer.py): the ids transformers' CLIPTokenizer gives, on SD 1.x- and
SD 2.x-style tokenizer folders, for edge-case prompts, and every error as one message. Needs neither torch nor
transformers: their ids are in third_party/clip_text/parity/tokenizer_fixture.json, written with the two folders by
parity/make_tokenizer_fixture.py.
"""

import json
import pathlib
import shutil
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # third_party/ is not an installed package; `python -m pytest` has it on the path
  sys.path.insert(0, str(REPO))

from selfperc_jax.errors import UserError  # noqa: E402
from third_party.clip_text import model  # noqa: E402
from third_party.clip_text import tokenizer as tk  # noqa: E402

PARITY = REPO / "third_party" / "clip_text" / "parity"
FOLDERS = ("tokenizer_sd1", "tokenizer_sd2")


@pytest.fixture(scope="module")
def fixture():
  return json.loads((PARITY / "tokenizer_fixture.json").read_text())


@pytest.fixture(scope="module")
def loaded():
  return {name: tk.load_tokenizer(PARITY / name) for name in FOLDERS}


@pytest.mark.parametrize("name", FOLDERS)
def test_ids_equal_transformers_on_every_prompt(name, fixture, loaded):
  expected = fixture["folders"][name]
  ids = loaded[name].encode(fixture["prompts"])
  assert ids.dtype == np.int32 and ids.shape == (len(fixture["prompts"]), 77)
  differ = [p for p, a, b in zip(fixture["prompts"], ids.tolist(), expected["ids"]) if a != b]
  assert not differ, f"{len(differ)} of {len(fixture['prompts'])} prompts differ from transformers: {differ}"
  t = loaded[name]
  assert [t.bos_token, t.bos_id] == expected["bos"] and [t.eos_token, t.eos_id] == expected["eos"]
  assert [t.pad_token, t.pad_id] == expected["pad"] and t.max_length == expected["model_max_length"] == 77
  assert t.vocab_size == fixture["vocab_size"]


def test_pad_token_per_folder(loaded):
  # SD 1.x pads with EOS; SD 2.x's special_tokens_map.json names '!' (id 0), and it wins over tokenizer_config.json's
  # '<|endoftext|>' as in transformers (no added_tokens_decoder there).
  sd1, sd2 = loaded["tokenizer_sd1"], loaded["tokenizer_sd2"]
  assert (sd1.pad_token, sd1.pad_id) == ("<|endoftext|>", sd1.eos_id)
  assert json.loads((PARITY / "tokenizer_sd2" / "tokenizer_config.json").read_text())["pad_token"] == "<|endoftext|>"
  assert (sd2.pad_token, sd2.pad_id) == ("!", 0)
  # '!' is then a special token in SD 2.x's prompts, matched alone, never merged nor given the end-of-word suffix:
  # "wow!!" -> wo w</w> ! ! there, wo w</w> ! !</w> in SD 1.x (whose vocabulary here has no '!!' merge).
  wow = sd2.encode(["wow"])[0].tolist()
  wow = wow[1:wow.index(sd2.eos_id)]
  assert sd2.encode(["wow!!"])[0, :len(wow) + 4].tolist() == [sd2.bos_id, *wow, 0, 0, sd2.eos_id]
  assert sd1.encode(["wow!!"])[0, :len(wow) + 4].tolist() == [sd1.bos_id, *wow, 0, sd1.backend.token_to_id("!</w>"),
                                                               sd1.eos_id]


@pytest.mark.parametrize("name", FOLDERS)
def test_empty_prompt(name, loaded):
  t = loaded[name]
  expected = [t.bos_id, t.eos_id] + [t.pad_id] * 75
  assert t.empty_ids.tolist() == expected and t.empty_ids.dtype == np.int32
  assert t.encode([""]).tolist() == [expected] and t.encode(["  \t\n "]).tolist() == [expected]
  assert t.encode([]).shape == (0, 77)


@pytest.mark.parametrize("name", FOLDERS)
def test_truncation_keeps_eos(name, fixture, loaded):
  t = loaded[name]
  fits, one_more = fixture["prompts"][-2:]  # 75 content tokens, and 76
  ids = t.encode([fits, one_more, "masterpiece, best quality, " * 30])
  assert (ids[:, 0] == t.bos_id).all() and (ids[:, -1] == t.eos_id).all()
  assert t.pad_id not in ids[:, 1:-1] or t.pad_id == t.eos_id  # no padding inside a full row
  assert (ids[0] == ids[1]).all()  # the 76th word is what truncation drops; EOS stays last


def test_diffusers_model_folder_and_tokenizer_json(tmp_path, fixture, loaded):
  model_folder = tmp_path / "sd2"
  shutil.copytree(PARITY / "tokenizer_sd2", model_folder / "tokenizer")
  (model_folder / "text_encoder").mkdir()
  t = tk.load_tokenizer(str(model_folder))  # the model folder: its tokenizer/ is used
  assert t.folder == str(model_folder / "tokenizer")
  expected = np.array(fixture["folders"]["tokenizer_sd2"]["ids"], np.int32)
  assert (t.encode(fixture["prompts"]) == expected).all()
  # A folder with tokenizer.json instead of vocab.json + merges.txt: its BPE model's vocab and merges are used.
  only_json = tmp_path / "only_json"
  shutil.copytree(PARITY / "tokenizer_sd2", only_json)
  (only_json / "tokenizer.json").write_text(loaded["tokenizer_sd2"].backend.to_str())
  (only_json / "vocab.json").unlink()
  (only_json / "merges.txt").unlink()
  assert (tk.load_tokenizer(only_json).encode(fixture["prompts"]) == expected).all()


def test_special_token_file_variants(tmp_path, fixture):
  """Other special-token files (transformers' added_tokens_decoder format, tokenizer_config.json alone, a pad token
  in special_tokens_map.json only) over the same vocabulary: the ids and pad token transformers gives."""
  for name, variant in fixture["variants"].items():
    folder = tmp_path / name
    folder.mkdir()
    for filename in ("vocab.json", "merges.txt"):
      shutil.copy(PARITY / "tokenizer_sd1" / filename, folder)
    for filename, content in variant["files"].items():
      (folder / filename).write_text(json.dumps(content))
    t = tk.load_tokenizer(folder)
    assert [t.pad_token, t.pad_id] == variant["pad"], name
    assert [t.eos_token, t.eos_id] == variant["eos"] and [t.bos_token, t.bos_id] == variant["bos"], name
    assert t.encode(variant["prompts"]).tolist() == variant["ids"], name


def test_check_matches(loaded):
  t = loaded["tokenizer_sd1"]
  n, eos = t.vocab_size, t.eos_id
  small = model.CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4)
  tk.check_matches(t, small)
  tk.check_matches(t, {"vocab_size": n, "max_position_embeddings": 77, "eos_token_id": 2})  # legacy: not compared
  tk.check_matches(t, {"vocab_size": n, "eos_token_id": eos})
  with pytest.raises(tk.CLIPTokenizerError, match=rf"has {n} tokens, the text encoder's vocab_size is 49408"):
    tk.check_matches(t, model.SD2)
  with pytest.raises(tk.CLIPTokenizerError, match=rf"makes 77 ids, the text encoder has 64 positions.*"
                                                  rf"eos_token_id is 5, the tokenizer's EOS is {eos}"):
    tk.check_matches(t, {"vocab_size": n, "max_position_embeddings": 64, "eos_token_id": 5})


def _folder(tmp_path, **changes):
  """A copy of the SD 1.x folder with files replaced (str: the new text) or removed (None)."""
  folder = tmp_path / "tok"
  shutil.copytree(PARITY / "tokenizer_sd1", folder)
  for filename, text in changes.items():
    path = folder / filename.replace("__", ".")
    path.unlink() if text is None else path.write_text(text)
  return folder


def _config(**changes):
  config = json.loads((PARITY / "tokenizer_sd1" / "tokenizer_config.json").read_text())
  return json.dumps({**config, **changes})


FOLDER_ERRORS = {
  "missing folder": (lambda tmp: tmp / "nowhere", r"tokenizer folder '.*nowhere' does not exist"),
  "not a tokenizer folder": (lambda tmp: tmp, r"is neither a diffusers model folder .* nor a tokenizer folder"),
  "no vocab": (lambda tmp: _folder(tmp, vocab__json=None), r"lacks vocab\.json \(and has no tokenizer\.json\)"),
  "no merges": (lambda tmp: _folder(tmp, merges__txt=None), r"lacks merges\.txt \(and has no tokenizer\.json\)"),
  "no config": (lambda tmp: _folder(tmp, tokenizer_config__json=None), r"has no tokenizer_config\.json"),
  "vocab not JSON": (lambda tmp: _folder(tmp, vocab__json='{"a": 1'), r"vocab\.json' is not a readable JSON"),
  "vocab a list": (lambda tmp: _folder(tmp, vocab__json="[1, 2]"), r"vocab\.json' holds a list"),
  "vocab ids": (lambda tmp: _folder(tmp, vocab__json='{"a": 0, "b": "1"}'), r"token ids must be non-negative ints"),
  "vocab gaps": (lambda tmp: _folder(tmp, vocab__json='{"a": 0, "b": 2}'), r"ids are not 0 \.\. 1, each once"),
  "config not JSON": (lambda tmp: _folder(tmp, tokenizer_config__json="{,}"), r"config\.json' is not a readable"),
  "map not JSON": (lambda tmp: _folder(tmp, special_tokens_map__json=""), r"map\.json' is not a readable JSON"),
  "max length": (lambda tmp: _folder(tmp, tokenizer_config__json=_config(model_max_length=None)),
                 r"model_max_length must be an int >= 2 \(SD: 77\); got None"),
  "other tokenizer": (lambda tmp: _folder(tmp, tokenizer_config__json=_config(tokenizer_class="T5Tokenizer")),
                      r"names tokenizer_class 'T5Tokenizer': this loader builds CLIP's tokenizer"),
  "pad not in vocab": (lambda tmp: _folder(tmp, special_tokens_map__json='{"pad_token": "<pad>"}'),
                       r"lacks the special token\(s\) pad_token '<pad>'"),
  "bad token entry": (lambda tmp: _folder(tmp, special_tokens_map__json='{"eos_token": 3}'),
                      r"eos_token is 3, neither a string nor a token object"),
  "merge out of vocab": (lambda tmp: _folder(tmp, merges__txt="#version: 0.2\nq zzz\n"),
                         r"do not make a BPE model .*zzz"),
  "merges malformed": (lambda tmp: _folder(tmp, merges__txt="#version: 0.2\na b c\n"),
                       r"merges\.txt' is not a readable BPE merges file"),
}


@pytest.mark.parametrize("case", FOLDER_ERRORS)
def test_folder_errors(case, tmp_path):
  make, message = FOLDER_ERRORS[case]
  with pytest.raises(tk.CLIPTokenizerError, match=message) as e:
    tk.load_tokenizer(make(tmp_path))
  assert isinstance(e.value, UserError) and "\n" not in str(e.value)


PROMPT_ERRORS = {
  "a str": ("a cat", r"a sequence of prompts, not one str: pass \['a cat'\]"),
  "bytes": ([b"a cat"], r"every prompt must be a str; not so at index 0: bytes b'a cat'"),
  "None and int": (["ok", None, 3], r"not so at index 1: NoneType None, 2: int 3\."),
  "not a sequence": (5, r"a sequence of str prompts; got a int"),
  "lone surrogate": (["a \ud800 cat"], r"prompt 0 cannot be tokenized"),
}


@pytest.mark.parametrize("case", PROMPT_ERRORS)
def test_prompt_errors(case, loaded):
  prompts, message = PROMPT_ERRORS[case]
  with pytest.raises(tk.CLIPTokenizerError, match=message) as e:
    loaded["tokenizer_sd1"].encode(prompts)
  assert "\n" not in str(e.value)
