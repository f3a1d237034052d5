"""Which stages a comparison has and the config of each (pure): one MSE pre-training per training seed, then each
branch of experiment.branches, a self-perceptual branch followed by its experiment.variants ('<branch>@<name>').
`experiments.py` runs them; `validation.py` checks the variants' stage configs before anything trains."""

from __future__ import annotations

import re
import ast
from typing import Any

import ml_collections

from selfperc_jax import config_tree, fileio, pretrained
from selfperc_jax.errors import ConfigError

PRETRAIN = "pretrain"
BASELINE = "mse"  # the branch every other one is compared with, seed by seed (the report's paired differences)
# The branches that train the self-perceptual term: those that experiment.variants apply to.
PERCEPTUAL_BRANCHES = ("perceptual", "mse_perceptual", "perceptual_ema", "perceptual_online")
_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # a folder name's part: '<branch>@<variant>'


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
  """'name:key=value,key=value' -> (name, {dotted key: value}). A value is a Python literal (1e-4, True, 'ema',
  ('mid', 'enc0')), else a word ('cosine'); a tuple may leave its words unquoted: (mid,enc0). Commas inside
  brackets or quotes do not separate overrides. Only the syntax is checked here (the keys: validation.py)."""
  name, colon, body = str(text).partition(":")
  name = name.strip()
  example = "e.g. 'lr1e-4:finetune.learning_rate=1e-4,finetune.decay=constant'"
  if not colon or not body.strip():
    raise ConfigError(f"experiment.variants entry {str(text)!r} is not 'name:key=value[,key=value...]' ({example}).")
  if not _VARIANT_NAME.fullmatch(name):
    raise ConfigError(f"experiment.variants entry {str(text)!r}: the name {name!r} must be letters, digits and "
                      "'_.+-' (it names the stage's folder, <branch>@<name>).")
  overrides = {}
  for item in _split_top_level(body):
    key, equals, value = item.partition("=")
    key = key.strip()
    if not equals or not key or not value.strip():
      raise ConfigError(f"experiment.variants '{name}': {item.strip()!r} is not key=value ({example}).")
    if key in overrides:
      raise ConfigError(f"experiment.variants '{name}': {key} is set twice; give each key once.")
    overrides[key] = _literal(value.strip())
  return name, overrides


def _split_top_level(text: str) -> list[str]:
  """text split at the commas outside brackets and quotes."""
  parts, depth, quote, current = [], 0, "", []
  for char in text:
    if quote:
      quote = "" if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      parts.append("".join(current))
      current = []
      continue
    current.append(char)
  parts.append("".join(current))
  return [p for p in parts if p.strip()] or [""]


def _literal(text: str):
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if len(text) >= 2 and text[0] + text[-1] in ("()", "[]"):  # a tuple of words: (mid,enc0)
      return tuple(_literal(p.strip()) for p in _split_top_level(text[1:-1]) if p.strip())
    return text  # a word: cosine
  return tuple(value) if isinstance(value, list) else value


def variants(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """{variant name: {dotted key: value}} of experiment.variants, in their order."""
  out = {}
  for text in config.experiment.variants:
    name, overrides = parse_variant(text)
    if name in out:
      raise ConfigError(f"experiment.variants names {name!r} twice; give each variant its own name.")
    for key, value in overrides.items():  # one word for a tuple key: a tuple of one (perceptual.taps=enc0)
      if isinstance(config_tree.lookup(config, key), tuple) and not isinstance(value, tuple):
        overrides[key] = (value,)
    out[name] = overrides
  return out


def branch_names(config: ml_collections.ConfigDict) -> list[str]:
  """The branches of one training seed in the order they run: each of experiment.branches, a self-perceptual one
  followed by its variants ('<branch>@<variant>')."""
  names = []
  for name in config.experiment.branches:
    names.append(name)
    if name in PERCEPTUAL_BRANCHES:
      names += [f"{name}@{v}" for v in variants(config)]
  return names


def seed_folder(seed: int | None) -> str:
  """The folder of one training seed's stages ('' without experiment.seeds: the stages lie in the workdir)."""
  return "" if seed is None else f"seed_{int(seed)}"


def training_seeds(config: ml_collections.ConfigDict) -> tuple[int | None, ...]:
  """experiment.seeds, or (None,): one comparison with config.seed, in today's layout."""
  return tuple(int(s) for s in config.experiment.seeds) or (None,)


def stage_name(seed: int | None, branch: str) -> str:
  """'pretrain', 'perceptual@lr1e-4', or with a training seed 'seed_1/perceptual': the stage's folder."""
  return f"{seed_folder(seed)}/{branch}" if seed is not None else branch


def branch_of(stage: str) -> str:
  return stage.rsplit("/", 1)[-1]


def stage_configs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, ml_collections.ConfigDict]:
  """{stage name: its training config}, in the order they run: per training seed, the MSE pre-training, then one
  per branch (branch_names: the variants of a self-perceptual branch after it)."""
  p = config.perceptual
  start, total = int(p.start_step), int(config.total_steps)
  folder = pretrained.start_folder(config)  # a model folder's U-Net is the start: no pre-training stage
  if not (0 < start < total or (folder and start == 0)):
    raise ConfigError(f"the comparison needs 0 < perceptual.start_step < total_steps (pre-training, then the "
                      f"branches), or perceptual.start_step=0 with a model folder to start from, got "
                      f"perceptual.start_step={start} and total_steps={total}.")

  def derived(values):
    c = ml_collections.ConfigDict(config.to_dict())
    c.eval_every = 0  # the comparison evaluates each stage's final checkpoint itself
    c.sample_every = 0  # and draws the side-by-side grids of the branches (grids/)
    # A stage is one training run: which seeds and variants the comparison runs is the comparison's, not the stage's
    # (so that adding a seed or a variant later changes no finished stage's config).
    c.experiment.seeds, c.experiment.variants = (), ()
    return config_tree.set_values(c, values)

  weight = float(p.weight) or 1.0  # an MSE-only config ('mse' argument) still compares the perceptual branches
  overrides = {
      "mse": {"perceptual.weight": 0.0},
      "perceptual": {"perceptual.weight": weight, "perceptual.mse_weight": 0.0, "perceptual.start_step": 0},
      "mse_perceptual": {"perceptual.weight": weight, "perceptual.mse_weight": 1.0, "perceptual.start_step": 0},
  }
  for source in ("ema", "online"):  # the paper's setting with the copy's source fixed (to measure the choice)
    overrides[f"perceptual_{source}"] = {**overrides["perceptual"], "perceptual.copy_source": source}
  ablations = variants(config)
  stages = {}
  for seed in training_seeds(config):
    # The training seed is all that differs between seeds; the evaluation's (eval.seed, sample.seed) stay fixed.
    seeded = {} if seed is None else {"seed": seed}
    if start:
      pretrain = stage_name(seed, PRETRAIN)
      stages[pretrain] = derived({"total_steps": start, "init_from": "", "perceptual.weight": 0.0, **seeded})
      # A branch is an init_from run of the rest of the steps: a fine-tuning run, whose recipe is finetune.*'s
      # (step.learning_rate_fn, step.sampling_ema_schedule, resume._init_from), left as the config says.
      branch = {"total_steps": total - start, "init_from": _join(workdir, pretrain), **seeded}
    else:  # each branch fine-tunes the model folder's U-Net (pretrained.start_folder) for all the steps
      branch = {"total_steps": total, **seeded}
    for name in branch_names(config):
      base, _, variant = name.partition("@")
      stages[stage_name(seed, name)] = derived({**branch, **overrides[base], **ablations.get(variant, {})})
  return stages


def _join(workdir: str, stage: str) -> str:
  return fileio.join(workdir, *stage.split("/"))
