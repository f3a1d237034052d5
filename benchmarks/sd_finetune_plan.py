"""The memory and time plan of fine-tuning Stable Diffusion 2.1-base with the self-perceptual loss, on paper:

  python benchmarks/sd_finetune_plan.py --batches=1,2,4 --out=BENCHMARKS.md

The self-perceptual train step of configs/sd21_base.py (bfloat16 compute with float32 params, remat, FSDP over
every device; the frozen text encoder in the step; the frozen copy's two encoder passes) is compiled from abstract
params (no weights are needed) for 8 simulated devices on this machine's XLA, at each per-device batch given, and
XLA's memory analysis is read: what one device holds (its share of the state, the replicated text encoder, the
batch) and its temporaries (activations kept for the backward pass under remat, the gathered params of a layer).
From these it writes, per topology (v4-32, v5p-64, v5e-16, 8 x H100): the state per chip, the largest per-chip batch
that fits the chip's memory (90 % of it; temporaries extrapolated linearly in the batch), and the chip-hours of a
10,000-step fine-tuning at the config's global batch of 256 at an assumed model FLOPs utilisation (stated, not
measured: no accelerator was lent). XLA:CPU's memory analysis is an estimate for a chip's compiler, not its figure.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # (the tests set 8 themselves)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from selfperc_jax import conditioning, config_base, diffusion, flops, sharding, step as step_lib  # noqa: E402
from selfperc_jax.models import sd  # noqa: E402
from third_party.clip_text import model as clip  # noqa: E402
from third_party.sd_unet import model as sd_unet  # noqa: E402

LATENT = 64  # 512 x 512 images through the VAE's factor 8
STEPS, GLOBAL_BATCH, ASSUMED_MFU = 10_000, 256, 0.4
GIB = 2 ** 30
# chips, memory per chip (GiB), dense bfloat16 peak per chip (TFLOP/s): the vendors' published figures
TOPOLOGIES = {"v4-32": (16, 32, 275), "v5p-64": (32, 95, 459), "v5e-16": (16, 16, 197), "8 x H100": (8, 80, 989)}


def sd21_config():
  """configs/sd21_base.py's default (the 'tpu' topology), loaded by path as main loads it."""
  return config_base.load_beside(__file__, os.path.join("..", "configs", "sd21_base.py"))


def step_memory(per_device: int, unet_config=sd_unet.SD2, text_config=clip.SD2, latent: int = LATENT) -> dict:
  """The compiled self-perceptual step at `per_device` examples per device on DEVICES devices: XLA's memory analysis
  per device (GiB), FLOPs per device and example, the state's total size."""
  config = sd21_config()
  model = sd.SDDenoiser(unet_config, timesteps=int(config.diffusion.timesteps), dtype=jnp.bfloat16, remat=True)
  text_model = clip.CLIPTextModel(text_config)
  context = (77, text_config.hidden_size)
  cond = conditioning.Conditioning(kind="text", num_classes=0, null_embedding=np.zeros(context, np.float32),
                                   prompt_embeddings=np.zeros((0,) + context, np.float32), text_model=text_model,
                                   text_tokens=context[0])
  tx, lr = step_lib.make_optimizer(config)
  fn = step_lib.make_train_step(config, model, diffusion.schedule_from_config(config.diffusion), tx, phase=True,
                                learning_rate=lr, cond=cond)
  shape = (latent, latent, unet_config.in_channels)
  state = jax.eval_shape(lambda k: step_lib.init_state(config, model, tx, k, shape, cond.example()),
                         jax.random.key(0))
  text = jax.eval_shape(text_model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, context[0]), jnp.int32))
  mesh = sharding.make_mesh(config.mesh)
  shardings = sharding.state_shardings(mesh, state, config.mesh.fsdp_min_size)
  with_sharding = lambda tree, s: jax.tree.map(lambda x, y: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=y), tree, s)
  b, data = per_device * mesh.size, sharding.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((b,) + shape, jnp.float32, sharding=data),
           "label": jax.ShapeDtypeStruct((b, context[0]), jnp.int32, sharding=data)}
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  frozen = with_sharding({"text": text}, jax.tree.map(lambda _: sharding.replicated(mesh), {"text": text}))
  jitted = sharding.jit_train_step(fn, mesh, shardings, frozen=True)
  lowered = jitted.lower(with_sharding(state, shardings), batch, key, frozen)
  total_flops = flops.lowered_flops(lowered)
  mem = lowered.compile().memory_analysis()
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return {"per_device": per_device, "devices": mesh.size, "state_gib": size(state) / GIB,
          "text_gib": size(text) / GIB, "arguments_gib": mem.argument_size_in_bytes / GIB,
          "temp_gib": mem.temp_size_in_bytes / GIB,
          "flops_per_example": None if total_flops is None else total_flops / b}


def plan(rows: list[dict]) -> list[dict]:
  """Per topology: state per chip (FSDP over its chips), the largest per-chip batch that fits 90 % of its memory
  (temporaries linear in the batch, fitted to the rows), chip-hours of STEPS steps at GLOBAL_BATCH and ASSUMED_MFU."""
  per = np.array([r["per_device"] for r in rows], float)
  temp = np.array([r["temp_gib"] for r in rows], float)
  slope, intercept = np.polyfit(per, temp, 1) if len(rows) > 1 else (temp[0] / per[0], 0.0)
  state, text, example_flops = rows[0]["state_gib"], rows[0]["text_gib"], rows[-1]["flops_per_example"]
  out = []
  for name, (chips, memory, peak) in TOPOLOGIES.items():
    fixed = state / chips + text + intercept
    largest = int((0.9 * memory - fixed) // slope) if slope > 0 else 0
    hours = None
    if example_flops:
      hours = STEPS * GLOBAL_BATCH * example_flops / (ASSUMED_MFU * peak * 1e12) / 3600
    out.append({"topology": name, "chips": chips, "memory_gib": memory, "state_per_chip_gib": state / chips,
                "fixed_gib": fixed, "largest_per_chip_batch": max(largest, 0),
                "needed_per_chip_batch": -(-GLOBAL_BATCH // chips), "chip_hours": hours})
  return out


def markdown(rows: list[dict], topologies: list[dict]) -> str:
  date = datetime.date.today().isoformat()
  lines = [f"## Stable Diffusion 2.1-base self-perceptual fine-tuning: memory and time plan ({date})", "",
           "`python benchmarks/sd_finetune_plan.py` (the train step of configs/sd21_base.py: bf16 compute, float32 "
           "params, remat, FSDP, the frozen text encoder in the step; compiled from abstract params on XLA:CPU with "
           f"{DEVICES} simulated devices: an estimate of a chip's memory, not its compiler's figure).", "",
           "| per-device batch | state, total (GiB) | text encoder per device | arguments per device | temporaries per "
           "device | GFLOPs per example |", "|---|---|---|---|---|---|"]
  for r in rows:
    gflops = "" if r["flops_per_example"] is None else f"{r['flops_per_example'] / 1e9:,.0f}"
    lines.append(f"| {r['per_device']} | {r['state_gib']:.2f} | {r['text_gib']:.2f} | {r['arguments_gib']:.2f} | "
                 f"{r['temp_gib']:.2f} | {gflops} |")
  lines += ["", f"Per topology, the state split over every chip (FSDP), 90 % of a chip's memory usable; a "
                f"{STEPS:,}-step fine-tuning at a global batch of {GLOBAL_BATCH} at an **assumed** MFU of "
                f"{ASSUMED_MFU:.0%} (not measured):", "",
            "| topology | chips | memory per chip (GiB) | state per chip | fixed per chip (state, text encoder, temporaries at "
            "batch 0) | "
            "largest per-chip batch | per-chip batch needed | chip-hours |", "|---|---|---|---|---|---|---|---|"]
  for t in topologies:
    hours = "" if t["chip_hours"] is None else f"{t['chip_hours']:,.0f}"
    lines.append(f"| {t['topology']} | {t['chips']} | {t['memory_gib']} | {t['state_per_chip_gib']:.2f} | "
                 f"{t['fixed_gib']:.2f} | {t['largest_per_chip_batch']} | {t['needed_per_chip_batch']} | {hours} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", default="1,2", help="per-device batches to compile, comma-separated")
  parser.add_argument("--out", default="", help="append the tables to this markdown file")
  args = parser.parse_args(argv)
  rows = []
  for b in (int(x) for x in args.batches.split(",")):
    rows.append(step_memory(b))
    print(rows[-1], flush=True)
  text = markdown(rows, plan(rows))
  print(text)
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n" + text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
