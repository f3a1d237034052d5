"""The paper's comparison as one command, from one MSE pre-training (or one per training seed):

  python -m selfperc_jax.experiments --config=configs/digits.py --workdir=workdirs/digits_comparison
  python -m selfperc_jax.experiments --config=configs/digits.py:small --workdir=workdirs/digits_study \
    --config.experiment.seeds=0,1,2 --config.experiment.variants=tprime_hi:perceptual.t_prime_min=0.5

Stages, each in its own workdir under --workdir, each resumable (a killed comparison continues where it stopped, and
a finished stage is never recomputed):
  pretrain/          MSE for perceptual.start_step steps, optimizer.*'s schedule over them (the pre-trained model
                     every branch starts from; the same as the MSE phase of the single run of the config);
  <branch>/          for each experiment.branches, total_steps - perceptual.start_step more steps from pretrain/'s
                     checkpoint (init_from), fine-tuned as finetune.* says, the same recipe for every branch (by
                     default the online params and the copy from the pre-trained sampling EMA, its Adam state
                     carried on, the sampling EMA's warm-up and optimizer.*'s schedule started again over the
                     branch's steps): 'mse' (the baseline), 'perceptual' (the feature distance alone against the frozen
                     copy, the paper's setting), 'mse_perceptual' (both terms); also available: 'perceptual_ema' /
                     'perceptual_online' (the paper's setting with the copy taken from the pre-trained sampling EMA /
                     online params, to measure perceptual.copy_source);
  <branch>@<variant>/  for each experiment.variants (named sets of config overrides, 'name:key=value,key=value') and
                     each self-perceptual branch: that branch with the variant's values, from the same pretrain/
                     (an ablation: the t' range, the taps, the fine-tuning's learning rate, ...);
  seed_<s>/          with experiment.seeds: all of the above once per training seed s (config.seed = s), in
                     seed_<s>/pretrain, seed_<s>/<branch>, ...; without (the default), config.seed's stages lie
                     directly under --workdir as above;
  evaluation         every branch at every experiment.guidance_scales (eval.* settings and seeds, the same for all
                     rows and training seeds), pretrain/ without guidance; results in <stage>/eval/step_<STEP>.json;
  grids/             sample grids of the branches side by side (of the first training seed), one PNG per guidance
                     scale (sample.* seeds);
  comparison.md, comparison.json, comparison.png (FID and recall against the guidance scale per branch): with several
                     training seeds each metric as its mean ± the 95 % half-width over seeds, and each branch's paired
                     difference to the 'mse' branch of the same seed and guidance scale (evaluation/seed_stats.py),
                     '*' where that interval excludes zero; with one seed (n = 1), the values without intervals;
  compile_cache/     compiled programs, shared by the stages of every seed (the same step or sampler, other params)
                     and by a rerun.
"""

from __future__ import annotations

import sys
import time

import jax
import ml_collections
import numpy as np

from selfperc_jax import fileio, generate, modes, pretrained, resume, sharding, train, workdir_lock
from selfperc_jax.errors import Stopped
from selfperc_jax.evaluation import evaluate, report
from selfperc_jax.setup import Setup
# The stages and their configs (pure), named here too: experiments.stage_configs etc.
from selfperc_jax.stages import (BASELINE, PERCEPTUAL_BRANCHES, PRETRAIN, _join, branch_names, branch_of,  # noqa: F401
                                 parse_variant, seed_folder, stage_configs, stage_name, training_seeds, variants)

CACHE = "compile_cache"  # JAX's persistent compilation cache, shared by the stages (of every training seed)


def recipe(config: ml_collections.ConfigDict) -> str:
  """The fine-tuning recipe of the branches in words (the report's preface)."""
  f, o = config.finetune, config.optimizer
  if f.decay == "run":
    rate = (f"learning rate as optimizer.* over the branch's steps ({o.learning_rate:g} after {o.warmup_steps} "
            f"warm-up steps, {o.decay})")
  else:
    rate = (f"learning rate {f.learning_rate or o.learning_rate:g}"
            + (f" after {f.warmup_steps} warm-up steps" if f.warmup_steps else " without warm-up") + f", {f.decay}")
  ema = {"carry": "carried on at its full decay", "restart": "warmed up anew", "run": "warmed up anew"}
  online = "sampling EMA" if f.online_start == "ema" else "online params"
  optimizer = "the pre-training's optimizer state" if f.optimizer_state == "carry" else "a fresh optimizer state"
  return f"online params from the pre-trained {online}, {optimizer}, sampling EMA {ema[f.sampling_ema]}, {rate}"


def _drawn(config) -> str:
  """How a row's samples are drawn, in words."""
  return {"class": "class-balanced", "text": "each prompt alike, from sample.prompts / prompts_file",
          "none": "unconditional"}[config.condition]


def eval_config(config: ml_collections.ConfigDict, guidance_scale: float) -> ml_collections.ConfigDict:
  """A stage's config for sampling at one guidance scale (rescaled as experiment.guidance_rescale says)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.sample.guidance_scale = float(guidance_scale)
  c.sample.guidance_rescale = float(config.experiment.guidance_rescale) if guidance_scale != 1 else 0.0
  return c


class Comparison:
  """Runs the stages in order; every stage looks at its workdir first and skips what is already there."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, command: str = ""):
    self.config, self.workdir, self.command = config, fileio.resolve(workdir), command
    self.stages = stage_configs(config, self.workdir)
    self.lead = jax.process_index() == 0
    self.t0 = time.perf_counter()

  def _say(self, text: str) -> None:
    if self.lead:
      print(f"[comparison {time.perf_counter() - self.t0:7.0f}s] {text}", flush=True)

  def run(self) -> list[dict]:
    fileio.make_workdir(self.workdir)
    lock = workdir_lock.lock_workdir(self.workdir)
    try:
      for name, cfg in self.stages.items():
        self.train(name, cfg)
      rows = []
      for name, cfg in self.stages.items():
        scales = (1.0,) if branch_of(name) == PRETRAIN else tuple(self.config.experiment.guidance_scales)
        rows += [self.evaluate(name, cfg, g) for g in scales]
      for g in self.config.experiment.guidance_scales:
        self.grid(g)
      if self.lead:
        self.write(rows)
      return rows
    finally:
      lock.release()

  def stage_dir(self, name: str) -> str:
    return _join(self.workdir, name)

  def train(self, name: str, cfg) -> None:
    workdir = self.stage_dir(name)
    if sharding.process_0_says(self.lead and (resume.latest_step(workdir) or 0) >= cfg.total_steps):
      self._say(f"{name}: trained ({cfg.total_steps} steps) already")
      return
    self._say(f"{name}: training {cfg.total_steps} steps in {workdir}")
    try:
      train.train_and_evaluate(cfg, workdir)
    except Stopped as e:  # the stage saved where it stood; what comes after it must not start from there
      raise Stopped(f"stage {name}: {e} (the comparison goes on from that stage)") from None

  def evaluate(self, name: str, cfg, guidance_scale: float) -> dict:
    cfg = eval_config(cfg, guidance_scale)
    workdir, step = self.stage_dir(name), int(cfg.total_steps)
    setting = evaluate.setting_name(cfg)
    eval_dir = fileio.join(workdir, "eval")
    result = evaluate.read_result(eval_dir, step, setting) if self.lead else None
    if not sharding.process_0_says(result is not None):
      self._say(f"{name}: evaluating at guidance {guidance_scale:g} ({setting})")
      result = modes.evaluate_checkpoint(cfg, workdir)
    else:
      self._say(f"{name}: evaluated at guidance {guidance_scale:g} already")
    row = {"branch": branch_of(name), "step": step, "setting": setting, "guidance_scale": float(guidance_scale),
           "guidance_rescale": float(cfg.sample.guidance_rescale)}
    if len(self.config.experiment.seeds):
      row["seed"] = int(cfg.seed)  # the training seed (the report pairs the branches of one seed)
    if result is not None:
      row.update({k: v for k, v in result.items() if k not in row and not isinstance(v, (dict, list))})
    return row

  def grid(self, guidance_scale: float) -> None:
    """The branches of the first training seed side by side (the other seeds' look alike; their figures are in the
    table)."""
    path = fileio.join(self.workdir, "grids", f"guidance_{guidance_scale:g}.png")
    if sharding.process_0_says(fileio.exists(path) if self.lead else False):
      return
    seed = training_seeds(self.config)[0]
    grids = {}
    for branch in branch_names(self.config):
      name = stage_name(seed, branch)
      cfg = eval_config(self.stages[name], guidance_scale)
      setup = Setup(cfg, self.stage_dir(name), with_data=False)
      _, params = modes.latest_sampling_params(setup)
      s = cfg.sample
      labels = generate.draw_labels(cfg)
      generator = setup.generator()
      chunks = list(generator.chunks(params, labels, s.seed))
      grids[branch] = (np.concatenate([c.images for c in chunks])[: generate.GRID_MAX],
                       labels[: generate.GRID_MAX] if generator.labelled else None)
    if self.lead:
      fileio.makedirs(fileio.join(self.workdir, "grids"))
      s = self.config.sample
      heading = (f"guidance {guidance_scale:g}" + (f", rescale {self.config.experiment.guidance_rescale:g}"
                                                   if guidance_scale != 1 else "")
                 + f" | {s.sampler} {s.steps} steps | seed {s.seed} (the same noise in every column)"
                 + (f" | training seed {seed}" if seed is not None else ""))
      report.side_by_side(path, grids, heading)
      self._say(f"grid: {path}")

  def write(self, rows: list[dict]) -> None:
    c = self.config
    start, total = int(c.perceptual.start_step), int(c.total_steps)
    s, e = c.sample, c.eval
    seeds = tuple(c.experiment.seeds)
    pretrain = (f"{seed_folder(seeds[0])}/" if len(seeds) == 1 else "seed_<s>/" if seeds else "") + PRETRAIN
    preface = "\n".join([
        "# The paper's comparison",
        "",
        f"Command: `{self.command}`" if self.command else "",
        "",
        (f"- Pre-training: MSE for {start} steps (`{pretrain}/`); every branch continues from its checkpoint for "
         f"{total - start} steps (`init_from`), fine-tuned as `finetune.*` says: {recipe(c)}." if start else
         f"- Start: the model folder {pretrained.start_folder(c)}'s U-Net (no pre-training stage); every branch "
         f"fine-tunes it for {total} steps, its online params, sampling EMA and copy all the folder's weights, with a "
         "fresh optimizer state."),
        f"- Branches: {', '.join(report.title(b) for b in c.experiment.branches)}; the perceptual copy is the "
        f"pre-trained model's {c.perceptual.copy_source} params, frozen (copy_ema_decay "
        f"{c.perceptual.copy_ema_decay:g}); taps {', '.join(c.perceptual.taps)}; noise '{c.perceptual.noise}'.",
        f"- Evaluation: {e.num_samples} samples per row ({_drawn(c)}), {s.sampler} {s.steps} steps, eval seed "
        f"{e.seed} for every row; features '{e.features}'"
        + (f" against the {e.reference_split} split" if not e.reference else f" against {e.reference}") + ".",
        f"- Guided rows use classifier-free guidance with rescale phi = {c.experiment.guidance_rescale:g} "
        "(Lin et al. 2023); 'none' is the conditional model alone.",
        self._seeds_line(),
    ] + self._variant_lines())
    report.write_json(fileio.join(self.workdir, "comparison.json"), rows,
                      {"command": self.command, "config": c.to_dict()}, baseline=BASELINE)
    fileio.write_text(fileio.join(self.workdir, "comparison.md"), report.markdown(rows, preface, baseline=BASELINE))
    report.plot(fileio.join(self.workdir, "comparison.png"), rows)
    self._say(f"done: {fileio.join(self.workdir, 'comparison.md')} (and .json, .png, grids/)")

  def _seeds_line(self) -> str:
    c = self.config
    seeds = tuple(c.experiment.seeds)
    fixed = f"the evaluation's seeds (eval {c.eval.seed}, sample {c.sample.seed}) are the same for every training seed"
    if len(seeds) > 1:
      return (f"- Training seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}), each a whole comparison, "
              f"pre-training included (`seed_<s>/`); {fixed}. Each value is the mean ± the half-width of its 95 % "
              f"t-interval over the seeds.")
    where = f", in `{seed_folder(seeds[0])}/`" if seeds else ""
    return (f"- Training seed: {seeds[0] if seeds else c.seed}{where} (n = 1: one training of each branch, so no "
            "intervals; `experiment.seeds` runs several).")

  def _variant_lines(self) -> list[str]:
    ablations = variants(self.config)
    if not ablations:
      return []
    said = "; ".join(f"{name}: " + ", ".join(f"{k}={v!r}" for k, v in changes.items())
                     for name, changes in ablations.items())
    return [f"- Variants of the self-perceptual branches (`<branch>@<variant>`, each from the same pre-training as "
            f"its branch, with these values): {said}."]


def use_compilation_cache(workdir: str) -> str:
  """Keeps compiled programs in workdir/compile_cache (unless JAX_COMPILATION_CACHE_DIR names another folder), so
  that the branches share their compiles (the same step or sampler programs, other params) and a resumed comparison
  compiles nothing again. Returns the folder in use."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", fileio.join(fileio.resolve(workdir), CACHE))
  return jax.config.jax_compilation_cache_dir


def run(config: ml_collections.ConfigDict, workdir: str, command: str = "") -> list[dict]:
  """Runs (or completes) the comparison in workdir; returns its rows (metrics on process 0)."""
  from selfperc_jax import validation

  validation.validate(config)
  use_compilation_cache(workdir)
  return Comparison(config, workdir, command).run()


def main(argv):
  from absl import app

  from selfperc_jax import main as cli

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if cli.FLAGS["mode"].present:
    raise app.UsageError("--mode belongs to selfperc_jax.main; the comparison trains, evaluates and reports itself.")
  cli.configure_logging()
  command = " ".join(["python -m selfperc_jax.experiments"] + sys.argv[1:])
  cli.run_reporting_errors(lambda: run(cli.FLAGS.config, cli.FLAGS.workdir, command))  # a stopped stage: exit 75


if __name__ == "__main__":
  from absl import app

  from selfperc_jax import main as cli

  app.run(main, flags_parser=cli.parse_flags)
