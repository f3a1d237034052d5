"""A Stable Diffusion model folder in diffusers' layout with seeded random weights and a SMALL network of each kind:
what the tests, the pipeline parity fixture and a new user's dry run load where no released model is available (its
weights are never downloaded here).

    python benchmarks/fake_sd.py DIR            # writes DIR/{unet,text_encoder,tokenizer,vae,scheduler}/ + model_index.json

The folder has what a real one has and what `selfperc_jax --config=configs/sd21_base.py` reads: unet/config.json and
diffusion_pytorch_model.safetensors (UNet2DConditionModel, SD 2.x's linear projections), text_encoder/config.json and
model.safetensors (CLIPTextModel), tokenizer/ (the small CLIP-style vocabulary of third_party/clip_text/parity),
vae/config.json and diffusion_pytorch_model.safetensors (AutoencoderKL, two levels: a factor of 2, not SD's 8),
scheduler/scheduler_config.json (the paper's released models': DDIM, v-prediction, zero terminal SNR, trailing), and
model_index.json, so that diffusers' StableDiffusionPipeline.from_pretrained loads it too (the parity fixture's
script does). configs/sd21_base.py:tiny is the config of this folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, REPO)

from third_party.weights_io import write_safetensors  # noqa: E402

TOKENIZER = os.path.join(REPO, "third_party", "clip_text", "parity", "tokenizer_sd2")

UNET = {
    "_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "norm_eps": 1e-5,
    "cross_attention_dim": 32, "attention_head_dim": [2, 4], "use_linear_projection": True,
    "flip_sin_to_cos": True, "freq_shift": 0, "sample_size": 8,
}
TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 914, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    "projection_dim": 32, "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
    "initializer_range": 0.02, "torch_dtype": "float32",
}
# The latent.* values of configs/sd21_base.py:tiny (its VAE layout).
VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, "act_fn": "silu",
    "scaling_factor": 0.18215, "sample_size": 16,
}
SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "trailing",
    "trained_betas": None,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
}


def random_tensors(shapes: dict, seed: int, embedding_std: float = 0.02) -> dict[str, np.ndarray]:
  """Kernels N(0, 1) / sqrt(fan_in), embedding tables N(0, embedding_std^2), norm scales 1, biases 0."""
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, shape in shapes.items():
    if "embedding" in name and name.endswith(".weight") and len(shape) == 2 and "time_embedding" not in name:
      tensors[name] = (embedding_std * rng.standard_normal(shape)).astype(np.float32)
    elif name.endswith(".weight") and len(shape) >= 2:
      tensors[name] = (rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))).astype(np.float32)
    else:
      tensors[name] = (np.ones(shape) if name.endswith(".weight") else np.zeros(shape)).astype(np.float32)
  return tensors


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def write_folder(folder: str, seed: int = 0, scheduler: dict | None = None) -> str:
  """Writes the small model folder (see the module's docstring) into `folder`; returns it. `scheduler`: another
  scheduler_config.json (default the paper's released models')."""
  from third_party.clip_text import convert as clip_convert
  from third_party.sd_unet import convert as unet_convert
  from third_party.sd_vae import convert as vae_convert, model as vae_model

  folder = os.fspath(folder)
  for sub in ("unet", "text_encoder", "vae", "scheduler"):
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
  shutil.copytree(TOKENIZER, os.path.join(folder, "tokenizer"), dirs_exist_ok=True)
  _write_json(os.path.join(folder, "model_index.json"), MODEL_INDEX)
  _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler or SCHEDULER)

  _write_json(os.path.join(folder, "unet", "config.json"), UNET)
  unet = random_tensors(unet_convert.expected_shapes(UNET), seed)
  write_safetensors(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), unet,
                    metadata={"format": "pt"})

  _write_json(os.path.join(folder, "text_encoder", "config.json"), TEXT_ENCODER)
  text = random_tensors(clip_convert.expected_shapes(TEXT_ENCODER), seed + 1)
  write_safetensors(os.path.join(folder, "text_encoder", "model.safetensors"), text, metadata={"format": "pt"})

  _write_json(os.path.join(folder, "vae", "config.json"), VAE)
  vae_config = vae_model.VAEConfig(block_out_channels=tuple(VAE["block_out_channels"]),
                                   layers_per_block=VAE["layers_per_block"], norm_num_groups=VAE["norm_num_groups"],
                                   latent_channels=VAE["latent_channels"], scaling_factor=VAE["scaling_factor"])
  vae = random_tensors(vae_convert.expected_shapes(vae_config), seed + 2)
  write_safetensors(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"), vae, metadata={"format": "pt"})
  return folder


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python benchmarks/fake_sd.py DIR")
  print(write_folder(sys.argv[1]))
