"""Writes the parity fixture of the Flax VAE: diffusers' PyTorch AutoencoderKL on known weights and inputs.

Run once, from the repository root, in a virtual environment that has torch and diffusers (CPU is enough; this file
needs neither jax nor the project installed, and nothing is downloaded but the packages themselves):

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.14.1 diffusers==0.42.1   # diffusers brings safetensors
    /tmp/refvenv/bin/python third_party/sd_vae/parity/make_fixture.py

The committed fixture was written with torch 2.14.1 (CPU), diffusers 0.42.1, safetensors 0.8.0 and numpy 2.4.6
(the script stores the versions it ran with in the fixture and in sd_layout.json). No weights exist anywhere in
this: the networks are built from their configs (the full-size one on the meta device) and filled by the rule below.

It writes, next to itself:

- `fixture.npz` (~75 KB): a SMALL AutoencoderKL of the real layout (TINY_CONFIG: two resolutions of widths 32 and
  64, one ResNet per block, 8 groups; the default down/up block types), its weights set by `reference_weights` below
  from the sorted keys and shapes of its state dict (tests/test_sd_vae.py rebuilds them with numpy alone), and
  PyTorch's float32 results on seeded NHWC inputs: the posterior's mean and (clipped) logvar of `x` (2x16x12x3) and of
  `x_odd` (1x15x13x3, where the asymmetric padding of the downsampling matters most), decode(mean of x), and
  decode(z) for a given `z` (2x5x7x4). Also the state dict's key/shape list (`layout_json`), per-tensor sums of the
  weights (`weight_sums`, to tell a wrong weight rule from a wrong network), and a small .safetensors file written by
  the safetensors library itself with F32, F16 and BF16 tensors (`safetensors_bytes`, values in `safetensors_json`),
  and a small torch.save'd checkpoint {'state_dict': {...}, 'global_step': 10} with a few VAE tensors in the CompVis /
  LDM layout under 'first_stage_model.' and one UNet tensor (`ckpt_bytes`, values under `ckpt/<key>`).
- `sd_layout.json`: the key -> shape list of the FULL-size SD VAE state dict exactly as diffusers builds it (SD's
  config, built on the meta device: no weights exist or are downloaded), so the converter can be checked against
  the real layout without torch. SDXL's VAE has the same config but the scaling factor.

Images are NHWC in the fixture (the Flax convention); the script transposes to NCHW for torch.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
SEED = 20240101

TINY_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
SD_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
}

# Added to two log-variance biases of quant_conv so that those channels hit the clipping at 20 and at -30.
LOGVAR_BIAS_SHIFTS = {1: 40.0, 2: -45.0}  # index within the logvar half -> shift


def reference_weights(shapes: dict[str, tuple[int, ...]], seed: int = SEED,
                      latent_channels: int = 4) -> dict[str, np.ndarray]:
  """The weight rule, shared with tests/test_sd_vae.py (which re-implements it; keep the two the same).

  One numpy Generator (PCG64, `seed`) draws, over the keys in sorted order: for a `.weight` of 2 or more dimensions
  (convolutions, linear layers) standard normal / sqrt(fan_in) with fan_in = prod(shape[1:]); for any other
  `.weight` (GroupNorm) 1 + 0.1 * standard normal; for everything else (biases) 0.1 * standard normal; all cast to
  float32. Then `quant_conv.bias[latent_channels + i] += LOGVAR_BIAS_SHIFTS[i]`.
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
  for i, shift in LOGVAR_BIAS_SHIFTS.items():
    out["quant_conv.bias"][latent_channels + i] += np.float32(shift)
  return out


def reference_inputs(seed: int = SEED) -> dict[str, np.ndarray]:
  """The NHWC inputs (float32), also shared with the test."""
  rng = np.random.default_rng(seed + 1)
  return {
      "x": rng.uniform(-1.0, 1.0, (2, 16, 12, 3)).astype(np.float32),
      "x_odd": rng.uniform(-1.0, 1.0, (1, 15, 13, 3)).astype(np.float32),
      "z": rng.standard_normal((2, 5, 7, 4)).astype(np.float32),
      # Nearly constant inputs: the GroupNorms then see small variances, where their eps shows.
      "x_quiet": (0.01 * rng.uniform(-1.0, 1.0, (1, 8, 8, 3))).astype(np.float32),
      "z_quiet": (0.01 * rng.standard_normal((1, 4, 4, 4))).astype(np.float32),
  }


def _build(config, **kwargs):
  from diffusers import AutoencoderKL

  n = len(config["block_out_channels"])
  return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                       **config, **kwargs)


def main() -> int:
  import diffusers
  import safetensors
  import safetensors.torch
  import torch

  torch.manual_seed(0)
  versions = {"torch": torch.__version__, "diffusers": diffusers.__version__,
              "safetensors": safetensors.__version__, "numpy": np.__version__}

  # The full-size layout, on the meta device (shapes only).
  with torch.device("meta"):
    full = _build(SD_CONFIG)
  sd_layout = {k: list(v.shape) for k, v in full.state_dict().items()}
  header = {"versions": versions, "config": SD_CONFIG, "num_tensors": len(sd_layout),
            "num_parameters": sum(math.prod(s) for s in sd_layout.values())}
  lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()]
  lines += [' "shapes": {'] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in sd_layout.items()]
  lines[-1] = lines[-1].rstrip(",")
  (HERE / "sd_layout.json").write_text("{\n" + "\n".join(lines) + "\n }\n}\n")  # one tensor per line

  # The small network with the reference weights.
  vae = _build(TINY_CONFIG).eval().float()
  shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
  weights = reference_weights(shapes, latent_channels=TINY_CONFIG["latent_channels"])
  missing, unexpected = vae.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
  assert not missing and not unexpected

  inputs = reference_inputs()
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
  nhwc = lambda t: np.ascontiguousarray(t.detach().numpy().transpose(0, 2, 3, 1)).astype(np.float32)  # noqa: E731
  results = {}
  with torch.no_grad():
    for name in ("x", "x_odd", "x_quiet"):
      posterior = vae.encode(nchw(inputs[name])).latent_dist
      results[f"{name}_mean"] = nhwc(posterior.mean)
      results[f"{name}_logvar"] = nhwc(posterior.logvar)
    posterior_mean = nchw(results["x_mean"])
    results["x_decoded_mean"] = nhwc(vae.decode(posterior_mean).sample)
    results["z_decoded"] = nhwc(vae.decode(nchw(inputs["z"])).sample)
    results["z_quiet_decoded"] = nhwc(vae.decode(nchw(inputs["z_quiet"])).sample)
    # For the record: how far float32 PyTorch itself is from float64 on the same network.
    vae64 = _build(TINY_CONFIG).double().eval()
    vae64.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in weights.items()})
    mean64 = vae64.encode(nchw(inputs["x"]).double()).latent_dist.mean
    dec64 = vae64.decode(posterior_mean.double()).sample
  f64_diffs = {"x_mean": float(np.abs(nhwc(mean64) - results["x_mean"]).max()),
               "x_decoded_mean": float(np.abs(nhwc(dec64) - results["x_decoded_mean"]).max())}

  # A .safetensors written by the safetensors library, to read back with the converter's own reader.
  st_tensors = {
      "a.f32": torch.tensor([[1.5, -2.25, 3.0e-8], [65504.0, -0.0, 7.0]], dtype=torch.float32),
      "b.f16": torch.tensor([0.5, -2.0, 65504.0, 6.0e-8], dtype=torch.float16),
      "c.bf16": torch.tensor([[1.0, -3.5], [3.0e38, 0.0078125]], dtype=torch.bfloat16),
  }
  st_bytes = safetensors.torch.save(st_tensors, metadata={"format": "pt"})
  st_values = {k: {"dtype": str(v.dtype), "shape": list(v.shape), "values": v.float().flatten().tolist()}
               for k, v in st_tensors.items()}

  # A whole-checkpoint-like .ckpt (torch.save, zip format) holding a few VAE tensors in the CompVis / LDM layout
  # under 'first_stage_model.', one UNet tensor and a non-tensor entry, to read back without torch.
  g = torch.Generator().manual_seed(SEED)
  ckpt = {"state_dict": {
      "first_stage_model.encoder.mid.attn_1.q.weight": torch.randn(64, 64, 1, 1, generator=g),
      "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": torch.randn(32, 64, 1, 1, generator=g),
      "first_stage_model.encoder.norm_out.bias": torch.randn(64, generator=g).half(),
      "model.diffusion_model.input_blocks.0.0.weight": torch.randn(2, 3, generator=g),
  }, "global_step": 10}
  buffer = io.BytesIO()
  torch.save(ckpt, buffer)
  ckpt_arrays = {f"ckpt/{k}": v.float().numpy() for k, v in ckpt["state_dict"].items()}

  layout_json = json.dumps({k: list(s) for k, s in shapes.items()})
  np.savez_compressed(
      HERE / "fixture.npz", seed=np.int64(SEED), config_json=np.array(json.dumps(TINY_CONFIG)),
      versions_json=np.array(json.dumps(versions)), layout_json=np.array(layout_json),
      weight_sums=np.array([weights[k].astype(np.float64).sum() for k in sorted(weights)]),
      safetensors_bytes=np.frombuffer(st_bytes, np.uint8), safetensors_json=np.array(json.dumps(st_values)),
      ckpt_bytes=np.frombuffer(buffer.getvalue(), np.uint8), **ckpt_arrays, **inputs, **results)
  size = (HERE / "fixture.npz").stat().st_size
  print(f"versions: {versions}")
  print(f"full SD layout: {len(sd_layout)} tensors, {sum(math.prod(s) for s in sd_layout.values())} parameters")
  print(f"tiny layout: {len(shapes)} tensors; fixture.npz: {size} bytes")
  print(f"float32 torch vs float64 torch, max abs: {f64_diffs}")
  for name, value in results.items():
    print(f"  {name}: shape {value.shape}, range [{value.min():.4g}, {value.max():.4g}], std {value.std():.4g}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
