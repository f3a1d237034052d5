"""Stable Diffusion 2.1-base at full size without its weights: parameter counts from an abstract init, analytic FLOPs
per 512x512 image, and the cost of one sampling step (the U-Net on both halves of classifier-free guidance).

  python benchmarks/sd_sampling.py --out=BENCHMARKS.md                    # counts and FLOPs (no memory, seconds)
  python benchmarks/sd_sampling.py --compile_memory=1,4 --out=BENCHMARKS.md   # + the step compiled, its memory
  python benchmarks/sd_sampling.py --measure=8,4 --out=BENCHMARKS.md          # + timed on this device (random weights)

Counts: jax.eval_shape of each network's init (no memory). FLOPs: the convolutions and matrix products of the
forward's jaxpr (selfperc_jax.flops; a multiply-add is 2), per image: the U-Net at 64x64x4 latents with a 77-token
context, the VAE's decoder to 512x512, the text encoder per prompt; a DDIM sample of N steps costs N U-Net forwards
(2N with guidance) + one decode + one or two prompt encodings. --compile_memory compiles the guided step (2B through
the U-Net, bf16 compute, float32 params) on the local backend and reads XLA's memory analysis; --measure times it
on the local device with seeded random weights (benchmarks/device.py runs it on a lent GPU/TPU). Nothing here needs
the weights or a model folder.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from selfperc_jax import flops  # noqa: E402
from selfperc_jax.models import sd  # noqa: E402
from third_party.clip_text import model as clip  # noqa: E402
from third_party.sd_unet import model as sd_unet  # noqa: E402
from third_party.sd_vae import model as sd_vae  # noqa: E402

IMAGE = 512
CONTEXT = 77


def _count(shapes) -> int:
  return int(sum(x.size for x in jax.tree.leaves(shapes)))


def facts(unet_config=sd_unet.SD2, text_config=clip.SD2, vae_config=sd_vae.SD, image: int = IMAGE) -> dict:
  """Parameter counts and analytic forward FLOPs per image (see the module's docstring); abstract, no memory."""
  latent = image // vae_config.downsampling_factor
  x = jax.ShapeDtypeStruct((1, latent, latent, unet_config.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  context = jax.ShapeDtypeStruct((1, CONTEXT, unet_config.cross_attention_dim), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, CONTEXT), jnp.int32)
  z = jax.ShapeDtypeStruct((1, latent, latent, vae_config.latent_channels), jnp.float32)

  unet = sd.SDDenoiser(unet_config)
  unet_params = jax.eval_shape(unet.init, jax.random.key(0), x, t, context)
  text = clip.CLIPTextModel(text_config)
  text_params = jax.eval_shape(text.init, jax.random.key(0), ids)
  vae = sd_vae.AutoencoderKL(vae_config)
  vae_params = jax.eval_shape(lambda k: vae.init(k, jnp.zeros((1, 8 * vae_config.downsampling_factor,
                                                                8 * vae_config.downsampling_factor, 3))),
                              jax.random.key(0))
  decoder = {"params": {k: v for k, v in vae_params["params"].items() if k in ("decoder", "post_quant_conv")}}
  return {
      "image": image, "latent": latent,
      "params_unet": _count(unet_params), "params_text_encoder": _count(text_params), "params_vae": _count(vae_params),
      "params_vae_decoder": _count(decoder),
      "gflops_unet": flops.matmul_flops(lambda p, a, b, c: unet.apply(p, a, b, c), unet_params, x, t, context) / 1e9,
      "gflops_text_encoder": flops.matmul_flops(lambda p, a: text.apply(p, a).last_hidden_state, text_params,
                                                ids) / 1e9,
      "gflops_vae_decode": flops.matmul_flops(lambda p, a: vae.apply(p, a, method=vae.decode), decoder, z) / 1e9,
  }


def per_sample_tflops(f: dict, steps: int, guided: bool) -> float:
  """A DDIM sample of `steps` steps: the U-Net once per step (twice guided), one decode, the prompt (and the empty
  or negative prompt) encoded once."""
  k = 2 if guided else 1
  return (k * steps * f["gflops_unet"] + f["gflops_vae_decode"] + k * f["gflops_text_encoder"]) / 1e3


def guided_step(unet_config=sd_unet.SD2, dtype=jnp.bfloat16, attention=None):
  """(model, fn(params, x, t, context) -> the guided prediction): one sampling step's network work, both halves of
  classifier-free guidance in one 2B batch as samplers.guided runs them."""
  model = sd.SDDenoiser(unet_config, dtype=dtype, attention=attention)

  def fn(params, x, t, context):
    both = model.apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                       jnp.concatenate([context, jnp.zeros_like(context)]))
    cond, uncond = jnp.split(both, 2)
    return uncond + 7.5 * (cond - uncond)

  return model, fn


def _inputs(unet_config, batch: int, latent: int):
  return (jax.ShapeDtypeStruct((batch, latent, latent, unet_config.in_channels), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.float32),
          jax.ShapeDtypeStruct((batch, CONTEXT, unet_config.cross_attention_dim), jnp.float32))


def compiled_memory(batch: int, unet_config=sd_unet.SD2, latent: int = IMAGE // 8, dtype=jnp.bfloat16) -> dict:
  """The guided step compiled from abstract params on the local backend: XLA's memory analysis (GiB) and compile s."""
  model, fn = guided_step(unet_config, dtype)
  inputs = _inputs(unet_config, batch, latent)
  params = jax.eval_shape(model.init, jax.random.key(0), *(jax.ShapeDtypeStruct((1,) + a.shape[1:], a.dtype)
                                                           for a in inputs))
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(params, *inputs).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  gib = lambda n: n / 2 ** 30
  return {"batch": batch, "compile_s": seconds, "params_gib": gib(mem.argument_size_in_bytes),
          "temp_gib": gib(mem.temp_size_in_bytes),
          "peak_gib": gib(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)}


def measure(batch: int, unet_config=sd_unet.SD2, latent: int = IMAGE // 8, dtype=jnp.bfloat16, steps: int = 5,
            rounds: int = 3, attention=None) -> dict:
  """The guided step timed on the local device with seeded random weights (median of `rounds` x `steps`)."""
  model, fn = guided_step(unet_config, dtype, attention)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (batch, latent, latent, unet_config.in_channels))
  t = jnp.full((batch,), 0.5)
  context = jax.random.normal(keys[1], (batch, CONTEXT, unet_config.cross_attention_dim))
  params = jax.jit(model.init)(keys[2], x[:1], t[:1], context[:1])
  step = jax.jit(fn)
  t0 = time.perf_counter()
  step(params, x, t, context).block_until_ready()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = step(params, x, t, context)
    out.block_until_ready()
    times.append((time.perf_counter() - t0) / steps)
  ms = sorted(times)[len(times) // 2] * 1e3
  gflops = 2 * flops.matmul_flops(lambda p, a, b, c: model.apply(p, a, b, c), params, x[:1], t[:1], context[:1]) / 1e9
  peak = flops.peak_flops(jax.devices()[0])
  return {"batch": batch, "step_ms": ms, "compile_s": compile_s, "images_per_s": batch / ms * 1e3,
          "mfu": None if peak is None else batch * gflops * 1e9 / (ms / 1e3) / peak}


def markdown(f: dict, memory=(), timed=()) -> str:
  device = jax.devices()[0].device_kind
  lines = [f"\n### Stable Diffusion 2.1-base at full size, without weights ({datetime.date.today().isoformat()}, "
           f"jax {jax.__version__})\n",
           "Reproduce: `python benchmarks/sd_sampling.py [--compile_memory=B,...] [--measure=B,...] "
           "--out=BENCHMARKS.md`\n",
           "| network | parameters | GFLOPs per forward (one image / prompt) |", "| --- | --- | --- |",
           f"| U-Net (64x64x4 latents, 77-token context) | {f['params_unet']:,} | {f['gflops_unet']:.1f} |",
           f"| text encoder (77 tokens) | {f['params_text_encoder']:,} | {f['gflops_text_encoder']:.1f} |",
           f"| VAE (decoder to {f['image']}x{f['image']}) | {f['params_vae']:,} ({f['params_vae_decoder']:,} in the "
           f"decoder) | {f['gflops_vae_decode']:.1f} |",
           "",
           f"A 50-step DDIM sample: {per_sample_tflops(f, 50, False):.1f} TFLOPs unguided (the self-perceptual "
           f"model), {per_sample_tflops(f, 50, True):.1f} TFLOPs with classifier-free guidance (the MSE model).\n"]
  if memory:
    lines += [f"The guided step (2B through the U-Net, bf16 compute, float32 params) compiled on {device} "
              "(XLA's memory analysis):\n",
              "| batch | params GiB | temporaries GiB | peak GiB | compile s |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {m['batch']} | {m['params_gib']:.2f} | {m['temp_gib']:.2f} | {m['peak_gib']:.2f} | "
              f"{m['compile_s']:.0f} |" for m in memory]
    lines.append("")
  if timed:
    lines += [f"The guided step timed on {device} (random weights, bf16):\n",
              "| batch | step ms | images/s per step | MFU | compile s |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['batch']} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | "
              f"{'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')} | {r['compile_s']:.1f} |" for r in timed]
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  from absl import app, flags

  flags.DEFINE_string("compile_memory", "", "Comma-separated batches: compile the guided step, report its memory.")
  flags.DEFINE_string("measure", "", "Comma-separated batches: time the guided step on the local device.")
  flags.DEFINE_string("out", None, "Append the tables to this markdown file (e.g. BENCHMARKS.md).")

  def run(argv):
    del argv
    FLAGS = flags.FLAGS
    f = facts()
    memory = [compiled_memory(int(b)) for b in FLAGS.compile_memory.split(",") if b]
    timed = [measure(int(b)) for b in FLAGS.measure.split(",") if b]
    text = markdown(f, memory, timed)
    print(text, flush=True)
    if FLAGS.out:
      with open(FLAGS.out, "a") as out:
        out.write(text)

  app.run(run, argv)


if __name__ == "__main__":
  main()
