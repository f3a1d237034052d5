"""Writes the parity fixture of the Flax CLIP text encoder: transformers' PyTorch CLIPTextModel on known weights and ids.

Run once, from the repository root, in a virtual environment that has torch and transformers (CPU is enough; this file
needs neither jax nor the project installed, and nothing is downloaded but the packages themselves):

    .venv/bin/pip install torch==2.13.0 transformers   # the CPU wheel of torch on local disk
    .venv/bin/python third_party/clip_text/parity/make_fixture.py
    .venv/bin/pip uninstall -y torch transformers ...  # and what they brought: the project's tests need neither

The committed fixture was written with torch 2.13.0 (CPU), transformers 5.24.0 and numpy 2.4.6 (versions stored in
the fixture and in sd_layouts.json). No weights exist anywhere in this: the networks are built from their configs (the
full-size ones on the meta device) and filled by the rule below.

It writes, next to itself:

- `fixture.npz`: two SMALL CLIPTextModels (hidden 32, 3 layers, 4 heads, intermediate 64, vocab 99, 77 positions):
  `sd1` (quick_gelu, eos_token_id 2: transformers' legacy pooling at the argmax of the ids, as SD 1.x / 2.x's configs
  have it; its sequences end in the highest id 98 and are padded with it, as CLIP's tokenizer pads SD 1.x's prompts
  with EOS) and `sd2` (gelu, eos_token_id 49: the pooling at the first EOS; ids above 49 come before it and padding
  is 0, as SD 2.x's tokenizer pads with '!', so the two pooling rules would pick different rows). Each one's weights
  are set by `reference_weights` below from the sorted keys and shapes of its state dict (tests/conftest.py's
  `seeded_weights` rebuilds them with numpy alone; per-tensor sums are stored to check that): every tensor random,
  LayerNorm weights and biases and both embedding tables included. Stored: the ids (3 x 77, and 2 x 9 with an
  attention mask), and PyTorch's float32 results: last_hidden_state, pooler_output, hidden_states[1] (the first
  layer's output, before any final norm), diffusers' clip_skip=1 conditioning (final_layer_norm(hidden_states[-2])),
  and for the short ids the results with and without the attention mask; the state dict's key/shape list.
- `sd_layouts.json`: the key -> shape lists of the FULL-size SD 2.x (OpenCLIP ViT-H/14 text tower, 23 layers) and
  SD 1.x (CLIP ViT-L/14) text encoders exactly as transformers builds them from the published text_encoder/config.json
  values (on the meta device: no weights exist or are downloaded), with their parameter counts. transformers 5 names
  them without the 'text_model.' prefix that the published files (written by transformers 4.x) carry.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
SEED = 20251130

_TINY = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
         "bos_token_id": 0, "pad_token_id": 1, "architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}
TINY_SD1 = dict(_TINY, hidden_act="quick_gelu", eos_token_id=2)
TINY_SD2 = dict(_TINY, hidden_act="gelu", eos_token_id=49)

# The published text_encoder/config.json values of stabilityai/stable-diffusion-2-1(-base) and of SD 1.5 (the keys that
# shape the network; projection_dim only matters to CLIPTextModelWithProjection).
_PUBLISHED = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0,
              "dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-5,
              "max_position_embeddings": 77, "vocab_size": 49408, "initializer_factor": 1.0,
              "initializer_range": 0.02, "torch_dtype": "float32"}
SD21 = dict(_PUBLISHED, hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
            num_hidden_layers=23, projection_dim=512)
SD15 = dict(_PUBLISHED, hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072, num_attention_heads=12,
            num_hidden_layers=12, projection_dim=768)


def reference_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
  """The weight rule, the same as tests/conftest.py's `seeded_weights` (keep the two the same).

  One numpy Generator (PCG64, `seed`) draws, over the keys in sorted order: for a `.weight` of 2 or more dimensions
  (linear layers and the two embedding tables) standard normal / sqrt(prod(shape[1:])); for any other `.weight`
  (LayerNorm) 1 + 0.1 * standard normal; for everything else (biases) 0.1 * standard normal; all cast to float32.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for key in sorted(shapes):
    shape = tuple(shapes[key])
    if key.endswith(".weight") and len(shape) >= 2:
      value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
    elif key.endswith(".weight"):
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    out[key] = value.astype(np.float32)
  return {k: out[k] for k in shapes}


def reference_ids(config: dict, seed: int) -> dict[str, np.ndarray]:
  """Token ids as SD's tokenizers lay them out: BOS (0), words, EOS, then padding to the length (77 here)."""
  rng = np.random.default_rng(seed)
  eos, legacy = config["eos_token_id"], config["eos_token_id"] == 2
  end, pad = (98, 98) if legacy else (eos, 0)  # legacy: EOS is the highest id (CLIP's 49407), padded with EOS
  words_range = (3, 98) if legacy else (3, 99)  # non-legacy: ids above EOS among the words (but not EOS itself)

  def sequence(length, words):
    w = rng.integers(*words_range, size=words)
    if not legacy:
      w[w == eos] = eos + 1
    return np.concatenate([[0], w, [end], np.full(length - words - 2, pad)]).astype(np.int64)

  ids = np.stack([sequence(77, n) for n in (5, 20, 75)])  # the last one has no padding
  short = np.stack([sequence(9, n) for n in (3, 7)])
  short_mask = np.arange(9)[None] <= np.array([[4], [8]])  # 1 up to and including the EOS, 0 on the padding
  return {"ids": ids, "short_ids": short, "short_mask": short_mask.astype(np.int64)}


def _layout_lines(name, config, state_dict):
  shapes = {k: list(v.shape) for k, v in state_dict.items()}
  lines = [f'  {json.dumps(name)}: {{"config": {json.dumps(config)}, "file_prefix": "text_model.", '
           f'"num_tensors": {len(shapes)}, "num_parameters": {sum(math.prod(s) for s in shapes.values())}, '
           '"shapes": {']
  lines += [f"   {json.dumps(k)}: {json.dumps(v)}," for k, v in shapes.items()]
  lines[-1] = lines[-1].rstrip(",")
  lines.append("  }}")
  return lines


def main() -> int:
  import torch
  import transformers
  from transformers import CLIPTextConfig, CLIPTextModel

  torch.manual_seed(0)
  versions = {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__}

  # The full-size layouts, on the meta device (shapes only).
  blocks = []
  for name, config in (("sd21", SD21), ("sd15", SD15)):
    with torch.device("meta"):
      full = CLIPTextModel(CLIPTextConfig(**config))
    blocks.append(_layout_lines(name, config, full.state_dict()))
    print(f"{name}: {len(full.state_dict())} tensors, {sum(p.numel() for p in full.parameters())} parameters")
  lines = ["{", f' "versions": {json.dumps(versions)},']
  for i, block in enumerate(blocks):
    lines += block[:-1] + [block[-1] + ("," if i < len(blocks) - 1 else "")]
  lines.append("}")
  (HERE / "sd_layouts.json").write_text("\n".join(lines) + "\n")
  json.loads((HERE / "sd_layouts.json").read_text())  # well-formed

  arrays = {"versions_json": np.array(json.dumps(versions))}
  for offset, (name, config) in enumerate((("sd1", TINY_SD1), ("sd2", TINY_SD2))):
    net = CLIPTextModel(CLIPTextConfig(**config)).eval().float()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    weights = reference_weights(shapes, SEED + offset)
    missing, unexpected = net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    assert not missing and not unexpected
    inputs = reference_ids(config, SEED + 100 + offset)
    ids = torch.from_numpy(inputs["ids"])
    with torch.no_grad():
      out = net(ids, output_hidden_states=True)
      assert len(out.hidden_states) == config["num_hidden_layers"] + 1
      results = {
          "last_hidden_state": out.last_hidden_state,
          "pooler_output": out.pooler_output,
          "hidden_state_1": out.hidden_states[1],
          "clip_skip_1": net.final_layer_norm(out.hidden_states[-2]),  # diffusers' encode_prompt(clip_skip=1)
          "short_last_hidden_state": net(torch.from_numpy(inputs["short_ids"])).last_hidden_state,
          "short_masked_last_hidden_state": net(torch.from_numpy(inputs["short_ids"]),
                                                attention_mask=torch.from_numpy(inputs["short_mask"])).last_hidden_state,
      }
      results = {k: v.numpy().astype(np.float32) for k, v in results.items()}
      # For the record: how far float32 PyTorch itself is from float64 on the same network.
      net64 = CLIPTextModel(CLIPTextConfig(**config)).double().eval()
      net64.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in weights.items()})
      f64 = float(np.abs(net64(ids).last_hidden_state.numpy() - results["last_hidden_state"]).max())
    print(f"{name}: {len(shapes)} tensors, {sum(math.prod(s) for s in shapes.values())} parameters; "
          f"float32 vs float64 torch max abs {f64:.3g}")
    for key, value in results.items():
      print(f"  {key}: shape {value.shape}, range [{value.min():.4g}, {value.max():.4g}], std {value.std():.4g}")
    arrays[f"{name}/config_json"] = np.array(json.dumps(config))
    arrays[f"{name}/seed"] = np.int64(SEED + offset)
    arrays[f"{name}/layout_json"] = np.array(json.dumps({k: list(s) for k, s in shapes.items()}))
    arrays[f"{name}/weight_sums"] = np.array([weights[k].astype(np.float64).sum() for k in sorted(weights)])
    arrays[f"{name}/f64_max_abs"] = np.float64(f64)
    arrays.update({f"{name}/{k}": v for k, v in inputs.items()})
    arrays.update({f"{name}/{k}": v for k, v in results.items()})

  np.savez_compressed(HERE / "fixture.npz", **arrays)
  print(f"versions: {versions}; fixture.npz: {(HERE / 'fixture.npz').stat().st_size} bytes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
