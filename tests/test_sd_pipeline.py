"""Text-to-image sampling end to end against diffusers' StableDiffusionPipeline: prompt -> tokens -> text encoder ->
U-Net with classifier-free guidance (+ rescale, + a negative prompt) -> DDIM / DPM-Solver++ -> VAE decode, on the
small random folder of benchmarks/fake_sd.py, with the starting latents of the stored fixture
(tests/fixtures/sd_pipeline_parity/: diffusers' outputs and the script that made them; no torch needed here)."""

import json
import pathlib

import jax
import numpy as np
import pytest

from conftest import load_config, override
from selfperc_jax import samplers, space
from selfperc_jax.models import sd
from selfperc_jax.setup import Setup
from third_party import weights_io

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd_pipeline_parity"
# ddim_cfg in the fast subset; the other cases repeat its path with other settings.
CASES = ("ddim_cfg",) + tuple(pytest.param(c, marks=pytest.mark.slow) for c in ("ddim_negative", "ddim_unguided",
                                                                                 "dpm_cfg"))


@pytest.fixture(scope="module")
def reference():
  with np.load(FIXTURE / "fixture.npz") as data:
    return {k: data[k] for k in data.files}


def _close(got, want, rtol=1e-4):
  """Agreement relative to the reference's scale: max |got - want| <= rtol * max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  err, scale = np.abs(got - want).max(), np.abs(want).max()
  assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} x {scale:.3g}"


def test_the_folder_is_the_one_the_fixture_was_made_from(sd_folder, reference):
  for key in [k for k in reference if k.startswith("weights_digest/")]:
    tensors = weights_io.read_safetensors(str(pathlib.Path(sd_folder) / key[len("weights_digest/"):]))
    values = np.concatenate([t.astype(np.float64).ravel() for t in tensors.values()])
    np.testing.assert_allclose([values.sum(), (values ** 2).sum()], reference[key], rtol=1e-9)


def _config(folder, case, settings, prompts):
  config = load_config("sd21_base", "tiny,dpm" if case.startswith("dpm") else "tiny")
  return override(config, **{
      "pretrained": folder, "sample.prompts": tuple(prompts), "sample.negative_prompt": settings["negative_prompt"]
      and settings["negative_prompt"][0] or "", "sample.guidance_scale": settings["guidance_scale"],
      "sample.guidance_rescale": settings["guidance_rescale"], "sample.steps": settings["num_inference_steps"]})


@pytest.mark.parametrize("case", CASES)
def test_sampling_from_prompts_equals_diffusers_pipeline(sd_folder, reference, case):
  settings = json.loads(str(reference[f"{case}/settings"]))
  prompts = json.loads(str(reference[f"{case}/prompts"]))
  config = _config(sd_folder, case, settings, prompts)
  setup = Setup(config, with_data=False)
  cond = setup.conditioning
  # The text encoder's hidden states of the prompts, and guidance's unconditional input: the empty prompt's, or the
  # negative prompt's (diffusers' negative_prompt_embeds).
  _close(cond.model_inputs(np.arange(cond.prompt_count)), reference[f"{case}/prompt_embeds"])
  if f"{case}/negative_prompt_embeds" in reference:
    _close(np.broadcast_to(cond.guidance_null, (2,) + cond.guidance_null.shape),
           reference[f"{case}/negative_prompt_embeds"])

  params = sd.load_params(config)
  denoise = lambda x, t, y: setup.model.apply({"params": params}, x, t, y)
  s = config.sample
  latents = samplers.sample(
      denoise, setup.schedule, config.diffusion.prediction, jax.random.key(0), cond.model_inputs(np.arange(2)),
      setup.model_shape, sampler=s.sampler, num_steps=s.steps, guidance_scale=s.guidance_scale,
      guidance_rescale=s.guidance_rescale, null_class=cond.guidance_null, clip_x0=space.clips_x0(config),
      timestep_spacing=s.timestep_spacing, steps_offset=s.steps_offset, final_step=s.final_step,
      initial_noise=reference[f"{case}/latents_T"])
  _close(latents, reference[f"{case}/latents"][-1])
  decoder = space.decoder(config)
  _close(jax.jit(decoder.decode_fn)(decoder.variables, latents), reference[f"{case}/decoded"])  # as Generator does
