"""Writes the parity fixture of the Flax SD U-Net: diffusers' PyTorch UNet2DConditionModel on known weights and inputs.

Run once, from the repository root, in a virtual environment that has torch and diffusers (CPU is enough; this file
needs neither jax nor the project installed, and nothing is downloaded but the packages themselves):

    .venv/bin/pip install torch==2.13.0 diffusers==0.42.1   # the CPU wheel of torch on local disk
    .venv/bin/python third_party/sd_unet/parity/make_fixture.py
    .venv/bin/pip uninstall -y torch diffusers ...          # the project's tests need neither

The committed fixture was written with torch 2.13.0 (CPU), diffusers 0.42.1 and numpy 2.4.6 (versions stored in the
fixture and in sd_layouts.json). No weights exist anywhere in this: the networks are built from their configs (the
full-size ones on the meta device) and filled by the rule below.

It writes, next to itself:

- `fixture.npz`: two SMALL UNet2DConditionModels of the real layouts, `sd2` (TINY_SD2: SD 2.x's linear projections in
  the transformers, three levels 32/64/64, CrossAttnDown x2 + Down, Up + CrossAttnUp x2, heads given as a list as
  SD 2.x does) and `sd1` (TINY_SD1: SD 1.x's 1x1-conv projections, two levels, two ResNets per block, heads given as
  an int as SD 1.x does); each one's weights are set by `reference_weights` below from the sorted keys and shapes of
  its state dict (tests/test_sd_unet.py rebuilds them with numpy alone; per-tensor sums are stored to check that), and
  PyTorch's float32 results on seeded NHWC inputs: the prediction for `x` (2x16x16x4, timesteps 981 and 37, context
  2 x 7 x cross_attention_dim), for `x_odd` (1x13x11x4 at the float timestep 500.5, where the forced upsample sizes of
  odd inputs matter), the mid block's output and each level's output before its downsampler (forward hooks), and
  the state dict's key/shape list.
- `sd_layouts.json`: the key -> shape lists of the FULL-size SD 2.1-base and SD 1.5 U-Net state dicts exactly as
  diffusers builds them from the published configs (on the meta device: no weights exist or are downloaded), with
  their parameter counts.

Latents are NHWC in the fixture (the Flax convention); the script transposes to NCHW for torch.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
SEED = 20240102

TINY_SD2 = {
    "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
    "cross_attention_dim": 24, "attention_head_dim": [2, 4, 4], "use_linear_projection": True,
    "flip_sin_to_cos": True, "freq_shift": 0,
}
TINY_SD1 = {
    "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64], "layers_per_block": 2, "norm_num_groups": 8,
    "cross_attention_dim": 16, "attention_head_dim": 2, "use_linear_projection": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
}
# The published configs (unet/config.json of stabilityai/stable-diffusion-2-1-base and of SD 1.5), the keys that shape
# the network.
SD21_BASE = {
    "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "norm_num_groups": 32,
    "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
    "flip_sin_to_cos": True, "freq_shift": 0, "sample_size": 64,
}
SD15 = dict(SD21_BASE, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)


def reference_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
  """The weight rule, shared with tests/test_sd_unet.py (which re-implements it; keep the two the same).

  One numpy Generator (PCG64, `seed`) draws, over the keys in sorted order: for a `.weight` of 2 or more dimensions
  (convolutions, linear layers) standard normal / sqrt(fan_in) with fan_in = prod(shape[1:]); for any other
  `.weight` (GroupNorm, LayerNorm) 1 + 0.1 * standard normal; for everything else (biases) 0.1 * standard normal; all
  cast to float32.
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
  return out


def reference_inputs(cross_attention_dim: int, seed: int) -> dict[str, np.ndarray]:
  """The NHWC inputs (float32), also shared with the test."""
  rng = np.random.default_rng(seed)
  return {
      "x": rng.standard_normal((2, 16, 16, 4)).astype(np.float32),
      "t": np.array([981.0, 37.0], np.float32),
      "context": rng.standard_normal((2, 7, cross_attention_dim)).astype(np.float32),
      "x_odd": rng.standard_normal((1, 13, 11, 4)).astype(np.float32),
      "t_odd": np.array([500.5], np.float32),
      "context_odd": rng.standard_normal((1, 5, cross_attention_dim)).astype(np.float32),
  }


def _layout_lines(name, config, state_dict):
  shapes = {k: list(v.shape) for k, v in state_dict.items()}
  lines = [f'  {json.dumps(name)}: {{"config": {json.dumps(config)}, "num_tensors": {len(shapes)}, '
           f'"num_parameters": {sum(math.prod(s) for s in shapes.values())}, "shapes": {{']
  lines += [f"   {json.dumps(k)}: {json.dumps(v)}," for k, v in shapes.items()]
  lines[-1] = lines[-1].rstrip(",")
  lines.append("  }}")
  return lines


def main() -> int:
  import diffusers
  import torch
  from diffusers import UNet2DConditionModel

  torch.manual_seed(0)
  versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__}

  # The full-size layouts, on the meta device (shapes only).
  blocks = []
  for name, config in (("sd21_base", SD21_BASE), ("sd15", SD15)):
    with torch.device("meta"):
      full = UNet2DConditionModel(**config)
    blocks.append(_layout_lines(name, config, full.state_dict()))
    print(f"{name}: {len(full.state_dict())} tensors, {sum(p.numel() for p in full.parameters())} parameters")
  lines = ["{", f' "versions": {json.dumps(versions)},']
  for i, block in enumerate(blocks):
    lines += block[:-1] + [block[-1] + ("," if i < len(blocks) - 1 else "")]
  lines.append("}")
  (HERE / "sd_layouts.json").write_text("\n".join(lines) + "\n")
  json.loads((HERE / "sd_layouts.json").read_text())  # well-formed

  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
  nhwc = lambda t: np.ascontiguousarray(t.detach().numpy().transpose(0, 2, 3, 1)).astype(np.float32)  # noqa: E731
  arrays = {"versions_json": np.array(json.dumps(versions))}
  for offset, (name, config) in enumerate((("sd2", TINY_SD2), ("sd1", TINY_SD1))):
    unet = UNet2DConditionModel(**config).eval().float()
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    weights = reference_weights(shapes, SEED + offset)
    missing, unexpected = unet.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    assert not missing and not unexpected
    inputs = reference_inputs(config["cross_attention_dim"], SEED + 100 + offset)

    captured = {}

    def hook_mid(module, args, output):
      captured["mid"] = output

    def hook_down(level, has_downsampler):
      def hook(module, args, output):
        _, states = output
        captured[f"enc{level}"] = states[-2] if has_downsampler else states[-1]
      return hook

    handles = [unet.mid_block.register_forward_hook(hook_mid)]
    for level, block in enumerate(unet.down_blocks):
      handles.append(block.register_forward_hook(hook_down(level, block.downsamplers is not None)))
    results = {}
    with torch.no_grad():
      for suffix in ("", "_odd"):
        captured.clear()
        out = unet(nchw(inputs["x" + suffix]), torch.from_numpy(inputs["t" + suffix]),
                   encoder_hidden_states=torch.from_numpy(inputs["context" + suffix])).sample
        results["out" + suffix] = nhwc(out)
        for tap, value in captured.items():
          results[tap + suffix] = nhwc(value)
      # For the record: how far float32 PyTorch itself is from float64 on the same network.
      unet64 = UNet2DConditionModel(**config).double().eval()
      unet64.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in weights.items()})
      out64 = unet64(nchw(inputs["x"]).double(), torch.from_numpy(inputs["t"]).double(),
                     encoder_hidden_states=torch.from_numpy(inputs["context"]).double()).sample
    for h in handles:
      h.remove()
    f64 = float(np.abs(nhwc(out64) - results["out"]).max())
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
