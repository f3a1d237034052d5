"""Checks a config before anything is built, so that every bad value gets one message that names the key."""

from __future__ import annotations

import difflib

import os

from selfperc_jax import (conditioning, config_base, config_tree, diffusion, losses, models, pretrained, samplers,
                          scheduler_config, space, stages)
from selfperc_jax.errors import ConfigError
from selfperc_jax.data.datasets import DATASETS
from selfperc_jax.evaluation import evaluate
from selfperc_jax.models import unet


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _one_of(value, choices, key: str) -> None:
  _require(value in choices, f"{key}={value!r} is not known; choose one of {tuple(choices)}.")


# Branches of the paper's comparison (python -m selfperc_jax.experiments), continued from one MSE pre-training.
BRANCHES = ("mse", "perceptual", "mse_perceptual", "perceptual_ema", "perceptual_online")

# Config keys renamed when the perceptual settings moved into one section: old dotted name -> new one.
RENAMED = {
    "loss.mse_weight": "perceptual.mse_weight",
    "loss.perceptual_weight": "perceptual.weight",
    "loss.perceptual_start_step": "perceptual.start_step",
    "loss.perceptual_ramp_steps": "perceptual.ramp_steps",
    "loss.perceptual_noise": "perceptual.noise",
    "loss.perceptual_condition": "perceptual.condition",
    "loss.perceptual_taps": "perceptual.taps",
    "loss.perceptual_fused": "perceptual.fused",
    "loss.t_prime_min": "perceptual.t_prime_min",
    "loss.t_prime_max": "perceptual.t_prime_max",
    "perceptual.ema_decay": "perceptual.copy_ema_decay",
    "ema.decay": "sampling_ema.decay",
}


def renamed_message(old: str) -> str | None:
  """The error text for a config key that was renamed (None for any other key)."""
  for key, new in RENAMED.items():
    if old == key or old.startswith(key + "."):
      return (f"config key {key} was renamed to {new} (the perceptual settings live in perceptual.*, the sampling "
              f"EMA in sampling_ema.*): use --config.{new}, or rename it in your config file.")
  return None


def _check_renamed(config) -> None:
  for key in RENAMED:
    if config_tree.lookup(config, key) is not None:
      raise ConfigError(renamed_message(key))


def _check_latent(config) -> None:
  lc = config.latent
  _one_of(lc.vae, ("",) + space.VAE_VARIANTS, "latent.vae")
  for key in ("layers_per_block", "norm_groups", "channels"):
    _require(int(lc[key]) >= 0, f"latent.{key}={lc[key]} must be >= 0 (0: the released VAE's).")
  _require(all(int(c) >= 1 for c in lc.block_out_channels),
           f"latent.block_out_channels={tuple(lc.block_out_channels)} must be positive (empty: the released VAE's).")
  _require(lc.scaling_factor >= 0, f"latent.scaling_factor={lc.scaling_factor} must be >= 0 (0: the VAE's own).")
  _require(int(lc.shard_size) >= 1 and int(lc.encode_batch_size) >= 1,
           "latent.shard_size and latent.encode_batch_size must be >= 1.")
  _require(isinstance(lc.flips, bool), "latent.flips must be True or False.")
  if not space.is_latent(config):
    return
  _require(DATASETS[config.data.name].channels == 3,
           f"latent.vae={lc.vae!r} encodes RGB images; data.name={config.data.name!r} is not RGB.")
  vae = space.vae_config(lc)
  _require(config.data.image_size % vae.downsampling_factor == 0,
           f"data.image_size={config.data.image_size} must be divisible by the VAE's downsampling factor "
           f"{vae.downsampling_factor}.")
  _require(vae.norm_num_groups >= 1 and all(c % vae.norm_num_groups == 0 for c in vae.block_out_channels),
           f"latent.norm_groups={vae.norm_num_groups} must divide every latent.block_out_channels "
           f"{tuple(vae.block_out_channels)}.")
  _require(lc.flips or not config.data.random_flip,
           "data.random_flip=True in latent space needs the mirror images encoded too: set latent.flips=True (and "
           "encode with it), or data.random_flip=False.")


def _check_adm(config) -> None:
  m = config.model
  _require(m.base_channels >= 1 and len(m.channel_mult) >= 1 and all(c >= 1 for c in m.channel_mult),
           f"model.base_channels={m.base_channels} and model.channel_mult={tuple(m.channel_mult)} must be positive.")
  _require(m.num_res_blocks >= 1, f"model.num_res_blocks={m.num_res_blocks} must be >= 1.")
  _require(m.num_classes >= 1, f"model.num_classes={m.num_classes} must be >= 1.")
  _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1).")
  _require(m.head_channels >= 0, f"model.head_channels={m.head_channels} must be >= 0 (0: use model.num_heads).")
  for i, mult in enumerate(m.channel_mult):
    what, per = ("model.head_channels", m.head_channels) if m.head_channels else ("model.num_heads", m.num_heads)
    _require((m.base_channels * mult) % per == 0,
             f"{what}={per} must divide the channels of every level (level {i} has {m.base_channels * mult}).")


def _check_sd(config) -> tuple[str, ...]:
  """model.arch='sd': text conditions and diffusers' integer timesteps; the model folder (where given) complete;
  a U-Net read from it (model.sd_layout='') in its latent space, with diffusion.* / sample.* that agree with its
  scheduler_config.json (every disagreement named at once). Returns the U-Net's taps."""
  from selfperc_jax.models import sd
  from third_party.sd_unet import convert as sd_convert, model as sd_model

  layout = config.model.sd_layout
  _one_of(layout, ("",) + tuple(sd.LAYOUTS), "model.sd_layout")
  _require(config.condition == "text", f"model.arch='sd' is text-conditioned: set condition='text' (not "
                                       f"{config.condition!r}).")
  _require(config.diffusion.timesteps > 0, "model.arch='sd' takes diffusers' integer timesteps: set "
                                           "diffusion.timesteps to the scheduler's num_train_timesteps (1000).")
  if layout:
    if config.pretrained:  # its text encoder and VAE
      pretrained.check_folder(pretrained.folder_of(config))
    return sd_model.tap_names(sd.LAYOUTS[layout].num_levels)
  _require(bool(config.pretrained),
           "model.arch='sd' reads Stable Diffusion's U-Net from a model folder: set --config.pretrained=FOLDER "
           f"({pretrained.HINT}), or model.sd_layout='small' for a small one trained from scratch.")
  folder = pretrained.folder_of(config)
  pretrained.check_folder(folder)
  _require(config.latent.vae == "sd", f"model.arch='sd' works on Stable Diffusion's latents: set latent.vae='sd' "
                                      f"(not {config.latent.vae!r}).")
  _require(isinstance(config.retrain_schedule, bool), "retrain_schedule must be True or False.")
  if not config.retrain_schedule:
    path = pretrained.scheduler_config_path(folder)
    lines = scheduler_config.check_config(config, scheduler_config.read_scheduler_config(path), source=path)
    _require(not lines, "the config disagrees with the model folder's scheduler config:\n  " + "\n  ".join(lines)
             + "\n(to fine-tune the folder's U-Net to this config's schedule instead, set retrain_schedule=True)")
  unet = sd_convert.load_config(pretrained.unet_files(folder)[0])
  if pretrained.is_model_folder(config.init_from):  # the fine-tuning starts from another folder's U-Net
    start = pretrained.folder_path(config.init_from)
    _require(sd_convert.load_config(pretrained.unet_files(start)[0]) == unet,
             f"init_from={start!r} holds a U-Net of another layout than pretrained={folder!r}'s (unet/config.json "
             "differs); start from a folder of the same model, or set pretrained to that folder.")
  return sd_model.tap_names(unet.num_levels)


def evaluates_text(config) -> bool:
  """Whether a text-conditioned config can be evaluated: against eval.reference (e.g. COCO images' statistics) with
  the FID Inception network, the samples drawn from its prompts (sample.prompts / prompts_file, e.g. COCO captions);
  or, without a reference, on a data set with captions per class whose prompts are their first ones (no
  sample.prompts or prompts_file), so that prompt i asks for class i and the digits classifier can read it."""
  if config.eval.reference and config.eval.features == "inception":
    return True
  return bool(DATASETS[config.data.name].captions) and not config.sample.prompts and not config.sample.prompts_file


def _check_condition(config) -> None:
  """An unconditional model has no class input: every setting that needs one is refused, each with its fix. A text
  condition needs Stable Diffusion's U-Net (model.arch='sd') and prompts to draw from."""
  _one_of(config.condition, conditioning.KINDS, "condition")
  if config.condition == "text":
    _require(config.model.arch == "sd", "condition='text' needs a text-conditioned U-Net: set model.arch='sd' with "
                                        "pretrained=FOLDER (configs/sd21_base.py) or model.sd_layout='small' "
                                        "(configs/digits.py:text).")
    s = config.sample
    _require(all(isinstance(p, str) for p in s.prompts),
             f"sample.prompts={tuple(s.prompts)!r} must be strings, e.g. --config.sample.prompts='(\"a cat\",)'.")
    _require(not s.prompts_file or os.path.isfile(os.path.expanduser(s.prompts_file)),
             f"sample.prompts_file={s.prompts_file!r} is not a file (one prompt per line).")
    _require(isinstance(s.negative_prompt, str), "sample.negative_prompt must be a string ('' for none).")
    _require(config.eval_every == 0 or evaluates_text(config),
             "condition='text' is evaluated against eval.reference (e.g. COCO images' statistics from python -m "
             "selfperc_jax.evaluation.reference_stats) with eval.features='inception', or on a data set's captions, "
             "one prompt per class (the digits, with sample.prompts and sample.prompts_file empty): set those, or "
             "eval_every=0.")
    return
  _require(not config.sample.prompts and not config.sample.prompts_file and not config.sample.negative_prompt,
           f"sample.prompts / prompts_file / negative_prompt are for condition='text'; this config's condition is "
           f"{config.condition!r}: clear them.")
  if config.condition != "none":
    return
  why = "condition='none' (unconditional) has no class input"
  _require(config.loss.label_dropout == 0,
           f"{why} to drop: loss.label_dropout={config.loss.label_dropout} trains for guidance; set it to 0.")
  _require(config.sample.guidance_scale == 1,
           f"{why} to guide with: sample.guidance_scale={config.sample.guidance_scale}; set it to 1.")
  _require(tuple(config.experiment.guidance_scales) == (1.0,),
           f"{why} to guide with: experiment.guidance_scales={tuple(config.experiment.guidance_scales)}; "
           "set it to (1.0,).")
  _require(not len(config.sample.classes),
           f"{why}: sample.classes={tuple(config.sample.classes)} cannot be drawn; set it to () (empty).")


# What a variant (experiment.variants) may not change, and why: what its branch shares with the pre-training it
# starts from, and the comparison's own settings. (model.*: its shape keys, config_base.SHAPE_KEYS, less NON_SHAPE_KEYS.)
VARIANT_FIXED = (
    ("seed", "the training seed, which its pre-training shares (experiment.seeds runs several)"),
    ("data", "the data, which its pre-training shares"),
    ("latent", "the data (its latents), which its pre-training shares"),
    ("total_steps", "the comparison's schedule (perceptual.start_step steps of pre-training, then the branches)"),
    ("perceptual.start_step", "the comparison's schedule (the pre-training's length; a branch starts from it)"),
    ("init_from", "the branch's start, the pre-training"),
    ("eval_every", "the comparison's own evaluation of each stage"),
    ("sample_every", "the comparison's own grids"),
    ("eval", "the evaluation, the same for every row"),
    ("sample", "the sampling of the evaluation and grids, the same for every row"),
    ("experiment", "the comparison's own settings"),
)


def _check_experiment(config) -> None:
  e = config.experiment
  _require(len(e.branches) >= 1 and len(set(e.branches)) == len(e.branches)
           and all(b in BRANCHES for b in e.branches),
           f"experiment.branches={tuple(e.branches)} must be distinct names from {BRANCHES}.")
  _require(len(e.guidance_scales) >= 1 and all(g >= 0 for g in e.guidance_scales),
           f"experiment.guidance_scales={tuple(e.guidance_scales)} must be one or more scales >= 0 (1: no guidance).")
  _require(0 <= e.guidance_rescale <= 1, f"experiment.guidance_rescale={e.guidance_rescale} must be in [0, 1].")
  seeds = tuple(e.seeds)
  _require(all(type(s) is int and s >= 0 for s in seeds) and len(set(seeds)) == len(seeds),
           f"experiment.seeds={seeds} must be distinct integers >= 0, the training seeds, e.g. (0, 1, 2) (empty: one "
           "comparison with config.seed).")
  _require(all(isinstance(v, str) for v in e.variants),
           f"experiment.variants={tuple(e.variants)} must be strings 'name:key=value,key=value', e.g. "
           "('lr1e-4:finetune.learning_rate=1e-4',).")
  if len(e.variants):
    _check_variants(config)


def _check_variants(config) -> None:
  """Each variant: its syntax, each key a config key that it may change, and its branches' configs valid, each
  refusal in one line that names the variant (now, not after the pre-training)."""

  variants = stages.variants(config)
  perceptual = [b for b in config.experiment.branches if b in stages.PERCEPTUAL_BRANCHES]
  _require(bool(perceptual),
           f"experiment.variants apply to the self-perceptual branches, and experiment.branches="
           f"{tuple(config.experiment.branches)} has none; add one of {stages.PERCEPTUAL_BRANCHES}.")
  known = _leaf_keys(config.to_dict())
  for name, overrides in variants.items():
    for key in overrides:
      what = f"experiment.variants '{name}': {key}"
      if key not in known:
        renamed = renamed_message(key)
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        raise ConfigError(f"{what} is not a config key" + (f"; {renamed}" if renamed else
                                                            f"; did you mean {close[0]}?" if close else "."))
      why = next((why for prefix, why in VARIANT_FIXED if key == prefix or key.startswith(prefix + ".")), None)
      if why is None and any(key == k or key.startswith(k + ".") for k in config_base.SHAPE_KEYS):
        if key not in config_base.NON_SHAPE_KEYS:
          why = "the model's shape, which its pre-training fixed"
      _require(why is None, f"{what} cannot change in a variant: it is {why}.")
    for key, value in overrides.items():
      default = config_tree.lookup(config, key)
      _require(_fits(config, key, value),
               f"experiment.variants '{name}': {key}={value!r} must be of type {type(default).__name__}, like its "
               f"default {default!r}.")
  if not 0 < int(config.perceptual.start_step) < int(config.total_steps):
    return  # no comparison to run (stages.stage_configs says why, where one is run)
  configs = stages.stage_configs(config, "<workdir>")
  seed = stages.training_seeds(config)[0]
  for name in variants:
    for branch in perceptual:
      try:
        validate(configs[stages.stage_name(seed, f"{branch}@{name}")])
      except ConfigError as err:
        raise ConfigError(f"experiment.variants '{name}' (stage {branch}@{name}): {err}") from None


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in tree.items():
    keys += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
  return keys


def _fits(config, key: str, value) -> bool:
  """Whether the ConfigDict takes value at key (its type checks)."""
  import ml_collections

  copy = ml_collections.ConfigDict(config.to_dict())
  try:
    config_tree.set_values(copy, {key: value})
  except TypeError:
    return False
  return True


def _check_finetune(config) -> None:
  """The fine-tuning recipe: each key once, its value and the fix in one line."""
  f = config.finetune
  for key, choices, meaning in (
      ("online_start", ("ema", "online"), "'ema' (the pre-trained sampling EMA, the paper's) or 'online'"),
      ("optimizer_state", ("carry", "reset"), "'carry' (the pre-training's Adam state) or 'reset' (a fresh one)"),
      ("sampling_ema", ("carry", "restart", "run"),
       "'carry' (the full decay from the start), 'restart' (its warm-up anew) or 'run' (warmed up over the run)"),
      ("decay", ("cosine", "constant", "run"),
       "'cosine' or 'constant' over the fine-tuning's steps, or 'run' (optimizer.*'s schedule over the run)")):
    _require(f[key] in choices, f"finetune.{key}={f[key]!r} is not known; set it to {meaning}.")
  _require(f.learning_rate >= 0,
           f"finetune.learning_rate={f.learning_rate!r} must be >= 0: the fine-tuning's peak learning rate, or 0 for "
           "optimizer.learning_rate (the pre-training's).")
  _require(int(f.warmup_steps) >= 0,
           f"finetune.warmup_steps={f.warmup_steps!r} must be >= 0: steps of linear warm-up from 0 at the "
           "fine-tuning's start (0: none).")
  if pretrained.is_model_folder(config.init_from):
    _require(config.model.arch == "sd" and not config.model.sd_layout,
             f"init_from={config.init_from!r} is a diffusers model folder, whose unet/ starts a Stable Diffusion "
             "U-Net: set model.arch='sd' with model.sd_layout='' (configs/sd21_base.py).")
  folder = pretrained.start_folder(config)
  _require(not folder or f.optimizer_state == "reset",
           f"the run starts from the model folder {folder}'s unet/, and a model folder holds no optimizer state: set "
           "--config.finetune.optimizer_state=reset.")
  _require(f.decay != "run" or (f.learning_rate == 0 and f.warmup_steps == 0),
           f"finetune.decay='run' trains with optimizer.*'s schedule over the run, so finetune.learning_rate="
           f"{f.learning_rate!r} and finetune.warmup_steps={f.warmup_steps!r} would be unused: set them to 0, or "
           "finetune.decay to 'cosine' or 'constant'.")


def validate(config) -> None:
  _check_renamed(config)
  for key in ("total_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    _require(int(config[key]) >= 1, f"{key}={config[key]} must be a positive integer.")
  _one_of(config.on_nonfinite, ("stop", "skip"), "on_nonfinite")
  _require(isinstance(config.trust_unverified_checkpoints, bool), "trust_unverified_checkpoints must be True or False.")
  _require(config.sample_every >= 0, f"sample_every={config.sample_every} must be >= 0 (0 turns periodic samples off).")
  _require(config.eval_every >= 0, f"eval_every={config.eval_every} must be >= 0 (0 turns periodic evaluation off).")
  _one_of(config.data.name, tuple(DATASETS), "data.name")
  data_set = DATASETS[config.data.name]
  if data_set.captioned:
    _require(space.is_latent(config),
             f"data.name={config.data.name!r} (image-caption data) is read through the latent encoder, which stores "
             "each caption's token ids with the latents: set latent.vae='sd' (configs/sd21_base.py) and encode once "
             "with python -m selfperc_jax.encode_latents.")
    _require(config.condition == "text",
             f"data.name={config.data.name!r} has captions, not classes: set condition='text' (and model.arch='sd').")
  if data_set.splits:
    _one_of(config.data.split, data_set.splits, "data.split")
  m = config.model
  _one_of(m.arch, models.ARCHS, "model.arch")
  _require(m.arch != "adm" or config.model.num_classes == data_set.num_classes,
           f"model.num_classes={config.model.num_classes} but data set {config.data.name!r} has "
           f"{data_set.num_classes} classes; set --config.model.num_classes={data_set.num_classes}.")
  _require(int(config.data.image_size) >= 1, f"data.image_size={config.data.image_size} must be >= 1.")

  ev = config.eval
  _require(ev.num_samples >= 2, f"eval.num_samples={ev.num_samples} must be >= 2.")
  _one_of(ev.features, evaluate.FEATURES, "eval.features")
  _require(ev.features == "inception" or config.data.name == "digits",
           f"eval.features={ev.features!r} is for the digits only; evaluate data.name={config.data.name!r} with "
           "eval.features='inception' (and eval.inception_weights).")
  if config.data.name == "digits" and not ev.reference:
    _one_of(ev.reference_split, data_set.splits, "eval.reference_split")
  _require(isinstance(ev.save_samples, bool), "eval.save_samples must be True or False.")

  _one_of(m.dtype, ("float32", "bfloat16"), "model.dtype")
  _one_of(m.attention, ("auto", "xla", "cudnn"), "model.attention")
  if m.arch == "adm":
    _check_adm(config)
  _check_latent(config)
  if m.arch == "adm":
    downsample = 2 ** (len(m.channel_mult) - 1)
    size = space.model_shape(config)[0]
    what = f"data.image_size={config.data.image_size}" + (f" (latents of {size})" if space.is_latent(config) else "")
    _require(size % downsample == 0,
             f"{what} must be divisible by {downsample} for {len(m.channel_mult)} U-Net levels "
             "(model.channel_mult); change one of them.")
  taps = _check_sd(config) if m.arch == "sd" else unet.tap_names(len(m.channel_mult))

  _require(int(config.data.num_workers) >= 0,
           f"data.num_workers={config.data.num_workers} must be >= 0 (0: read in the main process).")
  _require(int(config.data.read_threads) >= 1, f"data.read_threads={config.data.read_threads} must be >= 1.")

  d = config.diffusion
  _one_of(d.schedule, diffusion.SCHEDULES, "diffusion.schedule")
  _one_of(d.prediction, diffusion.PREDICTIONS, "diffusion.prediction")
  _require(d.timesteps >= 0, f"diffusion.timesteps={d.timesteps} must be 0 (continuous) or a positive count.")
  _require(not (d.zero_terminal_snr and d.prediction == "eps"),
           "diffusion.zero_terminal_snr=True cannot be used with diffusion.prediction='eps': at t = 1 the image "
           "cannot be recovered from eps. Use prediction 'v' (recommended) or 'x0'.")
  _one_of(d.zero_snr_anchor, diffusion.ZERO_SNR_ANCHORS, "diffusion.zero_snr_anchor")
  _require(d.zero_snr_anchor == "clean" or (d.timesteps > 0 and d.zero_terminal_snr),
           f"diffusion.zero_snr_anchor={d.zero_snr_anchor!r} rescales the discrete T-step table to zero terminal SNR: "
           f"it needs diffusion.timesteps > 0 and diffusion.zero_terminal_snr=True (now {d.timesteps} and "
           f"{d.zero_terminal_snr}); set them, or diffusion.zero_snr_anchor='clean'.")

  lc = config.loss
  _require(lc.min_snr_gamma >= 0, f"loss.min_snr_gamma={lc.min_snr_gamma} must be >= 0 (0 turns it off).")
  _require(0.0 <= lc.label_dropout < 1.0, f"loss.label_dropout={lc.label_dropout} must be in [0, 1).")

  p = config.perceptual
  _require(p.weight >= 0 and p.mse_weight >= 0,
           f"perceptual.weight={p.weight} and perceptual.mse_weight={p.mse_weight} must be >= 0.")
  _require(int(p.start_step) >= 0 and int(p.ramp_steps) >= 0,
           "perceptual.start_step and perceptual.ramp_steps must be >= 0.")
  _require(not (p.weight > 0 and p.mse_weight == 0 and p.start_step == 0 and not config.init_from
               and not pretrained.start_folder(config)),
           "perceptual.mse_weight=0 with perceptual.start_step=0 and no init_from trains against the features of a "
           "random network. Pre-train first (perceptual.start_step > 0), start from a trained model "
           "(--config.init_from=<workdir>), or keep the MSE term (perceptual.mse_weight > 0).")
  _one_of(p.copy_source, ("ema", "online"), "perceptual.copy_source")
  _require(isinstance(p.share_with_sampling_ema, bool) and isinstance(p.fused, bool),
           "perceptual.share_with_sampling_ema and perceptual.fused must be True or False.")
  _one_of(p.noise, losses.NOISE_VARIANTS, "perceptual.noise")
  _one_of(p.condition, ("same", "null"), "perceptual.condition")
  _require(len(p.taps) >= 1 and all(t in taps for t in p.taps),
           f"perceptual.taps={tuple(p.taps)} must name taps of this U-Net: {taps}.")
  _require(0.0 <= p.t_prime_min < p.t_prime_max <= 1.0,
           f"need 0 <= perceptual.t_prime_min < perceptual.t_prime_max <= 1, got {p.t_prime_min} and {p.t_prime_max}.")
  for key, value in (("sampling_ema.decay", config.sampling_ema.decay),
                     ("perceptual.copy_ema_decay", p.copy_ema_decay)):
    _require(0.0 <= value <= 1.0, f"{key}={value} must be in [0, 1].")

  _require(int(config.profile.start_step) >= 0 and int(config.profile.steps) >= 0,
           "profile.start_step and profile.steps must be >= 0 (profile.steps=0: no trace).")

  _check_experiment(config)

  o = config.optimizer
  _require(o.learning_rate > 0, f"optimizer.learning_rate={o.learning_rate} must be > 0.")
  _require(o.warmup_steps >= 0 and o.grad_clip >= 0 and o.weight_decay >= 0,
           "optimizer.warmup_steps, optimizer.grad_clip and optimizer.weight_decay must be >= 0.")
  _one_of(o.decay, ("cosine", "constant"), "optimizer.decay")
  _require(int(o.accumulate_steps) >= 1 and config.batch_size % int(o.accumulate_steps) == 0,
           f"optimizer.accumulate_steps={o.accumulate_steps} must be >= 1 and divide batch_size={config.batch_size} "
           "(the batch is split into that many equal micro-batches).")
  for key in ("b1", "b2"):
    _require(0.0 <= o[key] < 1.0, f"optimizer.{key}={o[key]} must be in [0, 1) (Adam's moment decay, e.g. 0.9 / 0.999).")

  _check_finetune(config)

  s = config.sample
  _one_of(s.sampler, samplers.SAMPLERS, "sample.sampler")
  _require(s.steps >= 1, f"sample.steps={s.steps} must be >= 1.")
  _require(not d.timesteps or s.steps <= d.timesteps,
           f"sample.steps={s.steps} is more than diffusion.timesteps={d.timesteps}; use at most that many.")
  _one_of(s.timestep_spacing, samplers.TIMESTEP_SPACINGS, "sample.timestep_spacing")
  _one_of(s.final_step, samplers.FINAL_STEPS, "sample.final_step")
  _require(type(s.steps_offset) is int and s.steps_offset >= 0,
           f"sample.steps_offset={s.steps_offset!r} must be an integer >= 0 (diffusers' steps_offset, e.g. 1).")
  for key, value, default in (("sample.timestep_spacing", s.timestep_spacing, "project"),
                              ("sample.final_step", s.final_step, "clean")):
    _require(value == default or d.timesteps > 0,
             f"{key}={value!r} needs a discrete schedule, diffusion.timesteps > 0 (diffusers' T-step table); with "
             f"continuous time (diffusion.timesteps=0) use {key}={default!r}.")
  if s.timestep_spacing != "project":
    try:  # a step count that diffusers' spacing cannot do (its np.arange artefacts, too many steps)
      samplers.diffusers_timesteps(s.sampler, s.steps, d.timesteps, s.timestep_spacing, s.steps_offset)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  _require(s.guidance_scale >= 0, f"sample.guidance_scale={s.guidance_scale} must be >= 0 (1 = no guidance).")
  _require(s.num_samples >= 1, f"sample.num_samples={s.num_samples} must be >= 1.")
  _require(int(s.batch_size) >= 1, f"sample.batch_size={s.batch_size} must be >= 1 (samples drawn at once).")
  _require(s.guidance_rescale >= 0 and s.guidance_rescale <= 1,
           f"sample.guidance_rescale={s.guidance_rescale} must be in [0, 1] (0: plain guidance; 0.7 in Lin et al.).")
  _require(len(s.guidance_interval) == 2 and 0.0 <= s.guidance_interval[0] < s.guidance_interval[1] <= 1.0,
           f"sample.guidance_interval={tuple(s.guidance_interval)} must be (lo, hi) with 0 <= lo < hi <= 1.")
  _require(config.condition != "class" or all(0 <= int(c) < m.num_classes for c in s.classes),
           f"sample.classes={tuple(s.classes)} must be class ids in [0, {m.num_classes}) (empty: all classes).")
  _check_condition(config)
  mesh = config.mesh
  for key in ("data", "fsdp"):
    _require(mesh[key] == -1 or mesh[key] >= 1, f"mesh.{key}={mesh[key]} must be -1 (the remaining devices) or >= 1.")
  _require(not (mesh.data == -1 and mesh.fsdp == -1), "mesh.data and mesh.fsdp are both -1; give one of them a size.")
  _require(int(mesh.fsdp_min_size) >= 0,
           f"mesh.fsdp_min_size={mesh.fsdp_min_size} must be >= 0 (arrays smaller than this stay replicated).")
