"""Checks a config before anything is built, so that every bad value gets one message that names the key."""

from __future__ import annotations

from selfperc_jax import diffusion, losses, samplers
from selfperc_jax.errors import ConfigError
from selfperc_jax.evaluation import evaluate
from selfperc_jax.models import unet


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _one_of(value, choices, key: str) -> None:
  _require(value in choices, f"{key}={value!r} is not known; choose one of {tuple(choices)}.")


def validate(config) -> None:
  for key in ("total_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    _require(int(config[key]) >= 1, f"{key}={config[key]} must be a positive integer.")
  _one_of(config.on_nonfinite, ("stop", "skip"), "on_nonfinite")
  _require(config.sample_every >= 0, f"sample_every={config.sample_every} must be >= 0 (0 turns periodic samples off).")
  _require(config.eval_every >= 0, f"eval_every={config.eval_every} must be >= 0 (0 turns periodic evaluation off).")
  _require(config.eval.num_samples >= 2, f"eval.num_samples={config.eval.num_samples} must be >= 2.")
  _one_of(config.eval.features, evaluate.FEATURES, "eval.features")

  m = config.model
  _require(m.base_channels >= 1 and len(m.channel_mult) >= 1 and all(c >= 1 for c in m.channel_mult),
           f"model.base_channels={m.base_channels} and model.channel_mult={tuple(m.channel_mult)} must be positive.")
  _require(m.num_res_blocks >= 1, f"model.num_res_blocks={m.num_res_blocks} must be >= 1.")
  _require(m.num_classes >= 1, f"model.num_classes={m.num_classes} must be >= 1.")
  _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1).")
  _one_of(m.dtype, ("float32", "bfloat16"), "model.dtype")
  _require(m.head_channels >= 0, f"model.head_channels={m.head_channels} must be >= 0 (0: use model.num_heads).")
  for i, mult in enumerate(m.channel_mult):
    what, per = ("model.head_channels", m.head_channels) if m.head_channels else ("model.num_heads", m.num_heads)
    _require((m.base_channels * mult) % per == 0,
             f"{what}={per} must divide the channels of every level (level {i} has {m.base_channels * mult}).")
  downsample = 2 ** (len(m.channel_mult) - 1)
  size = config.data.image_size
  _require(size % downsample == 0,
           f"data.image_size={size} must be divisible by {downsample} for {len(m.channel_mult)} U-Net levels "
           "(model.channel_mult); change one of them.")

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

  lc = config.loss
  _require(lc.mse_weight >= 0 and lc.perceptual_weight >= 0,
           f"loss.mse_weight={lc.mse_weight} and loss.perceptual_weight={lc.perceptual_weight} must be >= 0.")
  _require(lc.mse_weight > 0 or lc.perceptual_weight > 0,
           "loss.mse_weight and loss.perceptual_weight are both 0: there is nothing to train.")
  _require(lc.min_snr_gamma >= 0, f"loss.min_snr_gamma={lc.min_snr_gamma} must be >= 0 (0 turns it off).")
  _require(lc.perceptual_start_step >= 0 and lc.perceptual_ramp_steps >= 0,
           "loss.perceptual_start_step and loss.perceptual_ramp_steps must be >= 0.")
  _one_of(lc.perceptual_noise, losses.NOISE_VARIANTS, "loss.perceptual_noise")
  _one_of(lc.perceptual_condition, ("same", "null"), "loss.perceptual_condition")
  taps = unet.tap_names(len(m.channel_mult))
  _require(len(lc.perceptual_taps) >= 1 and all(t in taps for t in lc.perceptual_taps),
           f"loss.perceptual_taps={tuple(lc.perceptual_taps)} must name taps of this U-Net: {taps}.")
  _require(0.0 <= lc.t_prime_min < lc.t_prime_max <= 1.0,
           f"need 0 <= loss.t_prime_min < loss.t_prime_max <= 1, got {lc.t_prime_min} and {lc.t_prime_max}.")
  _require(0.0 <= lc.label_dropout < 1.0, f"loss.label_dropout={lc.label_dropout} must be in [0, 1).")

  for key, value in (("ema.decay", config.ema.decay), ("perceptual.ema_decay", config.perceptual.ema_decay)):
    _require(0.0 <= value <= 1.0, f"{key}={value} must be in [0, 1].")

  o = config.optimizer
  _require(o.learning_rate > 0, f"optimizer.learning_rate={o.learning_rate} must be > 0.")
  _require(o.warmup_steps >= 0 and o.grad_clip >= 0 and o.weight_decay >= 0,
           "optimizer.warmup_steps, optimizer.grad_clip and optimizer.weight_decay must be >= 0.")
  _one_of(o.decay, ("cosine", "constant"), "optimizer.decay")
  for key in ("b1", "b2"):
    _require(0.0 <= o[key] < 1.0, f"optimizer.{key}={o[key]} must be in [0, 1) (Adam's moment decay, e.g. 0.9 / 0.999).")

  s = config.sample
  _one_of(s.sampler, samplers.SAMPLERS, "sample.sampler")
  _require(s.steps >= 1, f"sample.steps={s.steps} must be >= 1.")
  _require(not d.timesteps or s.steps <= d.timesteps,
           f"sample.steps={s.steps} is more than diffusion.timesteps={d.timesteps}; use at most that many.")
  _require(s.guidance_scale >= 0, f"sample.guidance_scale={s.guidance_scale} must be >= 0 (1 = no guidance).")
  _require(s.num_samples >= 1, f"sample.num_samples={s.num_samples} must be >= 1.")
  _require(int(s.batch_size) >= 1, f"sample.batch_size={s.batch_size} must be >= 1 (samples drawn at once).")
  _require(s.guidance_rescale >= 0 and s.guidance_rescale <= 1,
           f"sample.guidance_rescale={s.guidance_rescale} must be in [0, 1] (0: plain guidance; 0.7 in Lin et al.).")
  _require(len(s.guidance_interval) == 2 and 0.0 <= s.guidance_interval[0] < s.guidance_interval[1] <= 1.0,
           f"sample.guidance_interval={tuple(s.guidance_interval)} must be (lo, hi) with 0 <= lo < hi <= 1.")
  _require(isinstance(config.eval.save_samples, bool), "eval.save_samples must be True or False.")
  _require(all(0 <= int(c) < m.num_classes for c in s.classes),
           f"sample.classes={tuple(s.classes)} must be class ids in [0, {m.num_classes}) (empty: all classes).")
  _require(config.mesh.data == -1 or config.mesh.data >= 1, f"mesh.data={config.mesh.data} must be -1 or >= 1.")
  _require(config.mesh.get("fsdp", 1) == -1 or config.mesh.get("fsdp", 1) >= 1,
           f"mesh.fsdp={config.mesh.get('fsdp', 1)} must be -1 or >= 1.")
