"""A Stable Diffusion model folder in diffusers' layout (config.pretrained): where each part lies and what it holds.

    <folder>/unet/config.json + diffusion_pytorch_model.safetensors      the denoiser (third_party/sd_unet)
    <folder>/text_encoder/config.json + model.safetensors                the CLIP text encoder (third_party/clip_text)
    <folder>/tokenizer/                                                  its tokenizer files
    <folder>/vae/diffusion_pytorch_model.safetensors                     the VAE (third_party/sd_vae)
    <folder>/scheduler/scheduler_config.json                             the diffusion settings it was trained with

(PyTorch pickles `*.bin` instead of `*.safetensors`, and `.fp16.` variants, are read too.) The folders are the ones the
Hugging Face Hub holds, downloaded once by the user: e.g. ByteDance/sd2.1-base-zsnr-laionaes6-perceptual, the
paper's self-perceptual model (README "Stable Diffusion"). Nothing here downloads anything. Every problem with the
folder is one ConfigError that names what is missing and where.
"""

from __future__ import annotations

import contextlib
import os

from selfperc_jax.errors import ConfigError

# Each part's weights file names, in the order they are looked for.
WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
}
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")
HINT = ("a diffusers Stable Diffusion folder (e.g. ByteDance/sd2.1-base-zsnr-laionaes6-perceptual, downloaded once: "
        "see README, \"Stable Diffusion\"), or one made by python benchmarks/fake_sd.py DIR")


def folder_path(path: str) -> str:
  return os.path.abspath(os.path.expanduser(str(path)))


def folder_of(config) -> str:
  return folder_path(config.pretrained)


def start_folder(config) -> str:
  """The model folder whose unet/ starts a training run from scratch (no checkpoint): init_from where it names one,
  else config.pretrained for a Stable Diffusion U-Net read from it (model.arch='sd', model.sd_layout='') without
  init_from (the folder is the model that the run fine-tunes, as it is the model that --mode=sample draws from);
  '' where the run starts otherwise (random init, or another run's checkpoint)."""
  from selfperc_jax import config_tree

  get = lambda key, default: config_tree.lookup(config, key) or default  # (configs from before these keys)
  init_from = str(get("init_from", ""))
  if init_from:
    return folder_path(init_from) if is_model_folder(init_from) else ""
  if get("model.arch", "adm") == "sd" and not get("model.sd_layout", "") and get("pretrained", ""):
    return folder_of(config)
  return ""


def is_model_folder(path: str) -> bool:
  """Whether `path` (e.g. init_from) is a diffusers model folder: one with unet/config.json (not a workdir)."""
  return bool(path) and os.path.isfile(os.path.join(folder_path(path), "unet", "config.json"))


def _weights(folder: str, part: str) -> str | None:
  for name in WEIGHTS[part]:
    path = os.path.join(folder, part, name)
    if os.path.isfile(path):
      return path
  return None


def check_folder(folder: str, key: str = "pretrained") -> None:
  """One ConfigError listing every part the folder lacks (nothing is read but the directory listing)."""
  if not os.path.isdir(folder):
    raise ConfigError(f"{key}={folder!r} is not a folder: give {HINT}.")
  missing = []
  for part in ("unet", "text_encoder"):
    if not os.path.isfile(os.path.join(folder, part, "config.json")):
      missing.append(f"{part}/config.json")
  for part in WEIGHTS:
    if _weights(folder, part) is None:
      missing.append(f"{part}/{WEIGHTS[part][0]}")
  if not os.path.isdir(os.path.join(folder, "tokenizer")):
    missing.append("tokenizer/")
  if not os.path.isfile(os.path.join(folder, SCHEDULER_CONFIG)):
    missing.append(SCHEDULER_CONFIG)
  if missing:
    raise ConfigError(f"{key}={folder!r} lacks {', '.join(missing)}: it must be {HINT}.")


def unet_files(folder: str) -> tuple[str, str]:
  """(config.json, weights) of the folder's U-Net."""
  return os.path.join(folder, "unet", "config.json"), _weights(folder, "unet") or ""


def text_encoder_files(folder: str) -> tuple[str, str]:
  """(config.json, weights) of the folder's text encoder."""
  return os.path.join(folder, "text_encoder", "config.json"), _weights(folder, "text_encoder") or ""


def vae_weights(folder: str) -> str:
  return _weights(folder, "vae") or ""


def scheduler_config_path(folder: str) -> str:
  return os.path.join(folder, SCHEDULER_CONFIG)


@contextlib.contextmanager
def one_line_mismatch(path: str, part: str):
  """A weights file of another layout than its part's config (weights_io.StateDictMismatchError, which lists every
  key) as one ConfigError line: the counts, a first example, and the command that lists them all."""
  from third_party.weights_io import StateDictMismatchError

  try:
    yield
  except StateDictMismatchError as e:
    counts = [f"{len(v)} {what}" for what, v in (("missing", e.missing), ("unexpected", e.unexpected),
                                                 ("wrong-shape", e.mismatched), ("non-finite", e.non_finite),
                                                 ("non-float", e.not_float)) if v]
    example = (e.missing or e.unexpected or list(e.mismatched) or e.non_finite or e.not_float or ["?"])[0]
    module = {"unet": "sd_unet", "text_encoder": "clip_text", "vae": "sd_vae"}[part]
    raise ConfigError(
        f"{path} does not fit the {part} layout of its folder ({', '.join(counts)} tensors, e.g. {example!r}): is "
        f"it another model's? Every key: python -c \"from third_party.{module} import convert; "
        f"convert.load_variables('{path}')\"") from None
