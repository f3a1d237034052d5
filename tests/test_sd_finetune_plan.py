"""benchmarks/sd_finetune_plan.py: the fine-tuning step compiled from abstract params (a small SD layout here) and
the plan it derives per topology."""

import dataclasses

import pytest

from benchmarks import sd_finetune_plan as plan_lib
from selfperc_jax.models import sd
from third_party.clip_text import model as clip


def _rows(temps=(2.0, 3.0), state=96.0, text=1.0):
  return [{"per_device": b, "devices": 8, "state_gib": state, "text_gib": text, "arguments_gib": 0.0,
           "temp_gib": t, "flops_per_example": 3e12} for b, t in zip((1, 2), temps)]


def test_the_plan_splits_the_state_over_the_chips_and_fits_the_batch_to_the_memory():
  plan = {p["topology"]: p for p in plan_lib.plan(_rows())}
  v4 = plan["v4-32"]  # 16 chips of 32 GiB: 6 GiB of state, 1 of text encoder, temporaries 1 + 1 per example
  assert v4["state_per_chip_gib"] == pytest.approx(6.0) and v4["fixed_gib"] == pytest.approx(8.0)
  assert v4["largest_per_chip_batch"] == int((0.9 * 32 - 8.0) // 1.0) == 20
  assert v4["needed_per_chip_batch"] == 16
  h100 = plan["8 x H100"]  # chip-hours = steps x batch x FLOPs per example / (MFU x peak)
  assert h100["chip_hours"] == pytest.approx(10_000 * 256 * 3e12 / (0.4 * 989e12) / 3600)
  assert plan["v5e-16"]["largest_per_chip_batch"] == 6  # (14.4 - 8) // 1
  assert "| v4-32 | 16 | 32 | 6.00 | 8.00 | 20 | 16 |" in plan_lib.markdown(_rows(), plan_lib.plan(_rows()))


@pytest.mark.slow
def test_the_step_compiles_from_abstract_params_and_holds_a_share_of_the_state():
  unet = dataclasses.replace(sd.LAYOUTS["tiny"], in_channels=4, out_channels=4)
  text = clip.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4)
  row = plan_lib.step_memory(1, unet, text, latent=8)
  assert row["devices"] == 8 and row["state_gib"] > 0 and row["temp_gib"] > 0 and row["flops_per_example"] > 0
  # Each device holds at most its FSDP share of the state (small arrays stay whole), the text encoder, the batch.
  assert row["arguments_gib"] < row["state_gib"] / 8 * 1.5 + row["text_gib"] + 1e-3
