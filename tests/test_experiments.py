"""The paper's comparison command: its stages, and a whole tiny comparison that is killed, resumed and rerun."""

import json
import os

import pytest

from selfperc_jax import experiments, modes, train
from selfperc_jax.errors import ConfigError

from conftest import override


def test_stages_are_one_pretraining_and_branches_continued_from_it(digits_config, tmp_path):
  # (with a schedule of the fine-tuning's own; the default 'run' re-warms each branch over its own steps instead)
  config = override(digits_config(""), **{"finetune.decay": "cosine", "finetune.sampling_ema": "carry"})
  stages = experiments.stage_configs(config, str(tmp_path))
  start, total = config.perceptual.start_step, config.total_steps
  assert list(stages) == ["pretrain", "mse", "perceptual", "mse_perceptual"]
  pre = stages["pretrain"]
  assert pre.total_steps == start and pre.perceptual.weight == 0 and pre.init_from == "" and pre.sample_every == 0
  for name in ("mse", "perceptual", "mse_perceptual"):
    c = stages[name]
    assert c.total_steps == total - start and c.init_from == str(tmp_path / "pretrain") and c.eval_every == 0
    assert c.sample_every == 0
  assert stages["mse"].perceptual.weight == 0
  paper = stages["perceptual"].perceptual
  assert paper.weight > 0 and paper.mse_weight == 0 and paper.start_step == 0 and paper.copy_ema_decay == 1.0
  assert stages["mse_perceptual"].perceptual.mse_weight == 1.0
  # Nothing else differs from the user's config (the optimizer, the fine-tuning recipe, the model, the data, the seeds).
  for name, c in stages.items():
    assert c.model.to_dict() == config.model.to_dict() and c.optimizer.to_dict() == config.optimizer.to_dict()
    assert c.seed == config.seed and c.eval.to_dict() == config.eval.to_dict()
    assert c.finetune.to_dict() == config.finetune.to_dict()


def test_the_stages_follow_the_schedules_of_the_single_run(digits_config, tmp_path):
  """The pre-training stage has the learning rate and EMA decay of the single run's MSE phase; every branch (an
  init_from run, all fine-tuning) those of the single run from its start step on."""
  from selfperc_jax import step as step_lib

  # (with a schedule of the fine-tuning's own; the default 'run' re-warms each branch over its own steps instead)
  config = override(digits_config(""), **{"finetune.decay": "cosine", "finetune.sampling_ema": "carry"})
  stages = experiments.stage_configs(config, str(tmp_path))
  start, total = config.perceptual.start_step, config.total_steps
  lr, ema = step_lib.learning_rate_fn(config), step_lib.sampling_ema_schedule(config)
  for name, c in stages.items():
    offset, steps = (0, range(0, start, 37)) if name == "pretrain" else (start, range(0, total - start, 37))
    lr_c, ema_c = step_lib.learning_rate_fn(c), step_lib.sampling_ema_schedule(c)
    assert [float(lr_c(s)) for s in steps] == [float(lr(offset + s)) for s in steps], name
    assert [float(ema_c(s)) for s in steps] == [float(ema(offset + s)) for s in steps], name


def test_guided_settings_use_the_rescale_and_unguided_ones_do_not(digits_config):
  config = digits_config("")
  assert experiments.eval_config(config, 1.0).sample.guidance_rescale == 0.0
  guided = experiments.eval_config(config, 2.0).sample
  assert guided.guidance_scale == 2.0 and guided.guidance_rescale == config.experiment.guidance_rescale


@pytest.mark.parametrize("start", [0, 2400])
def test_a_comparison_without_pretraining_or_branches_is_refused(digits_config, tmp_path, start):
  config = override(digits_config(""), **{"perceptual.start_step": start})
  with pytest.raises(ConfigError, match="needs 0 < perceptual.start_step < total_steps"):
    experiments.stage_configs(config, str(tmp_path))


class _Killed(Exception):
  pass


@pytest.mark.slow
def test_comparison_resumes_after_a_kill_and_never_redoes_a_finished_stage(digits_config, tmp_path, monkeypatch):
  # (finetune.sampling_ema='restart': at the full decay, a branch's EMA after 3 steps would still be the pre-trained
  # one to within 0.3 %, and its samples could not tell the branches apart.)
  config = override(digits_config("tiny"), **{
      "total_steps": 6, "perceptual.start_step": 3, "checkpoint_every": 3, "log_every": 3, "sample_every": 0,
      "eval.num_samples": 20, "sample.num_samples": 10, "sample.steps": 4,
      "experiment.guidance_scales": (1.0, 2.0), "finetune.sampling_ema": "restart",
      "model.channel_mult": (1,), "model.attention_resolutions": (8,)})  # a one-level U-Net: compiles faster
  workdir = str(tmp_path / "cmp")
  calls = {"train": [], "eval": []}
  real_train, real_eval = train.train_and_evaluate, modes.evaluate_checkpoint

  def counting_train(cfg, wd, *a, **k):
    name = os.path.basename(wd)
    calls["train"].append(name)
    if kill_at == ("train", name):
      raise _Killed()
    return real_train(cfg, wd, *a, **k)

  def counting_eval(cfg, wd):
    calls["eval"].append((os.path.basename(wd), cfg.sample.guidance_scale))
    return real_eval(cfg, wd)

  monkeypatch.setattr(train, "train_and_evaluate", counting_train)
  monkeypatch.setattr(modes, "evaluate_checkpoint", counting_eval)

  kill_at = ("train", "perceptual")  # killed after pretrain and the MSE branch finished
  with pytest.raises(_Killed):
    experiments.run(config, workdir)
  assert calls["train"] == ["pretrain", "mse", "perceptual"]
  assert not os.path.exists(os.path.join(workdir, "LOCK"))  # the lock was released on the way out

  kill_at = None
  calls = {"train": [], "eval": []}
  rows = experiments.run(config, workdir, command="the test")
  assert calls["train"] == ["perceptual", "mse_perceptual"]  # finished stages are not trained again
  assert len(calls["eval"]) == 1 + 3 * 2
  assert [(r["branch"], r["guidance_scale"]) for r in rows] == [
      ("pretrain", 1.0), ("mse", 1.0), ("mse", 2.0), ("perceptual", 1.0), ("perceptual", 2.0),
      ("mse_perceptual", 1.0), ("mse_perceptual", 2.0)]
  for r in rows:
    assert r["num_samples"] == 20 and 0 <= r["fid"] < 1e4 and 0 <= r["recall"] <= 1, r
    assert r["step"] == (3 if r["branch"] == "pretrain" else 3)
  assert rows[1]["guidance_rescale"] == 0.0 and rows[2]["guidance_rescale"] == config.experiment.guidance_rescale
  # Different branches are different models: their scores differ.
  assert len({round(r["fid"], 6) for r in rows if r["guidance_scale"] == 1.0}) == 4

  with open(os.path.join(workdir, "comparison.json")) as f:
    saved = json.load(f)
  assert saved["rows"] == rows and saved["command"] == "the test"
  table = open(os.path.join(workdir, "comparison.md")).read()
  assert table.count("\n| ") == 1 + 7 and "| self-perceptual | 2 (rescale 0.7) |" in table
  for png in ("comparison.png", "grids/guidance_1.png", "grids/guidance_2.png"):
    with open(os.path.join(workdir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  # A third run finds everything done: nothing is trained or evaluated, the report is written again.
  calls = {"train": [], "eval": []}
  assert experiments.run(config, workdir, command="the test") == rows
  assert calls == {"train": [], "eval": []}


def test_the_report_says_the_recipe_of_the_branches(digits_config):
  config = override(digits_config(""), **{"finetune.decay": "cosine", "finetune.sampling_ema": "carry"})
  assert experiments.recipe(config) == (
      "online params from the pre-trained sampling EMA, the pre-training's optimizer state, sampling EMA carried on "
      "at its full decay, learning rate 0.002 without warm-up, cosine")
  config = override(config, **{"finetune.online_start": "online", "finetune.optimizer_state": "reset",
                               "finetune.sampling_ema": "restart", "finetune.decay": "run"})
  assert experiments.recipe(config) == (
      "online params from the pre-trained online params, a fresh optimizer state, sampling EMA warmed up anew, "
      "learning rate as optimizer.* over the branch's steps (0.002 after 200 warm-up steps, cosine)")


# Seeds and variants (issue 25, items 2 and 3).

_VARIANTS = ("lr:finetune.learning_rate=1e-4,finetune.decay=constant", "tp:perceptual.t_prime_min=0.5")


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def test_seeds_run_the_whole_comparison_per_seed_in_its_folder_and_variants_follow_their_branch(digits_config,
                                                                                               tmp_path):
  config = override(digits_config(""), **{"experiment.seeds": (0, 3), "experiment.variants": _VARIANTS})
  stages = experiments.stage_configs(config, str(tmp_path))
  per_seed = ["pretrain", "mse", "perceptual", "perceptual@lr", "perceptual@tp", "mse_perceptual",
              "mse_perceptual@lr", "mse_perceptual@tp"]
  assert experiments.branch_names(config) == per_seed[1:]
  assert list(stages) == [f"seed_{s}/{b}" for s in (0, 3) for b in per_seed]
  comparison = experiments.Comparison(config, str(tmp_path))
  assert comparison.stage_dir("seed_3/perceptual@lr") == str(tmp_path / "seed_3" / "perceptual@lr")
  for name, c in stages.items():
    seed, branch = int(name.split("/")[0][5:]), experiments.branch_of(name)
    assert c.seed == seed  # the training seed; the evaluation's stay the user's
    assert c.eval.seed == config.eval.seed and c.sample.seed == config.sample.seed
    assert tuple(c.experiment.seeds) == () and tuple(c.experiment.variants) == ()  # the comparison's, not the stage's
    if branch != "pretrain":
      assert c.init_from == str(tmp_path / f"seed_{seed}" / "pretrain")
    assert c.total_steps == (config.perceptual.start_step if branch == "pretrain"
                             else config.total_steps - config.perceptual.start_step)
  # A variant is its branch with the variant's values, nothing else changed.
  for seed in (0, 3):
    for base in ("perceptual", "mse_perceptual"):
      plain = _flat(stages[f"seed_{seed}/{base}"].to_dict())
      for variant, changed in (("lr", {"finetune.learning_rate": 1e-4, "finetune.decay": "constant"}),
                               ("tp", {"perceptual.t_prime_min": 0.5})):
        got = _flat(stages[f"seed_{seed}/{base}@{variant}"].to_dict())
        assert {k: v for k, v in got.items() if plain[k] != v} == changed
  assert stages["seed_0/perceptual@tp"].perceptual.mse_weight == 0  # the branch's own setting stays
  assert stages["seed_0/mse_perceptual@tp"].perceptual.mse_weight == 1.0


def test_without_seeds_variants_lie_beside_the_branches_in_the_layout_of_before(digits_config, tmp_path):
  config = override(digits_config(""), **{"experiment.branches": ("mse", "perceptual"),
                                          "experiment.variants": ("tp:perceptual.t_prime_min=0.5",)})
  stages = experiments.stage_configs(config, str(tmp_path))
  assert list(stages) == ["pretrain", "mse", "perceptual", "perceptual@tp"]
  assert all(c.seed == config.seed for c in stages.values())
  assert stages["perceptual@tp"].init_from == str(tmp_path / "pretrain")
  assert experiments.training_seeds(config) == (None,) and experiments.stage_name(None, "mse") == "mse"


def test_variants_parse_from_the_command_line_as_config_base_says(monkeypatch):
  import sys

  from absl import flags
  from ml_collections import config_flags

  from conftest import REPO

  def parsed(*args):
    argv = ["prog", f"--config={REPO / 'configs' / 'digits.py'}", *args]
    monkeypatch.setattr(sys, "argv", argv)  # (config_flags reads the overrides from sys.argv)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values)
    values(argv)
    return values.config

  config = parsed("--config.experiment.variants=tprime_hi:perceptual.t_prime_min=0.5",
                  "--config.experiment.seeds=0,1,2")
  assert tuple(config.experiment.seeds) == (0, 1, 2)
  assert experiments.variants(config) == {"tprime_hi": {"perceptual.t_prime_min": 0.5}}
  config = parsed('--config.experiment.variants=("lr1e-4:finetune.learning_rate=1e-4,finetune.decay=constant",'
                  '"taps:perceptual.taps=(enc0,mid)","one:perceptual.taps=enc0")')
  assert experiments.variants(config) == {
      "lr1e-4": {"finetune.learning_rate": 1e-4, "finetune.decay": "constant"},
      "taps": {"perceptual.taps": ("enc0", "mid")}, "one": {"perceptual.taps": ("enc0",)}}
  from selfperc_jax import validation

  validation.validate(config)


@pytest.mark.parametrize("values, message", [
    ({"experiment.variants": ("lr:finetune.learning_rat=1e-4",)},
     "experiment.variants 'lr': finetune.learning_rat is not a config key; did you mean finetune.learning_rate?"),
    ({"experiment.variants": ("w:model.base_channels=8",)},
     "experiment.variants 'w': model.base_channels cannot change in a variant: it is the model's shape, which its "
     "pre-training fixed."),
    ({"experiment.variants": ("s:seed=3",)},
     "experiment.variants 's': seed cannot change in a variant: it is the training seed, which its pre-training "
     "shares (experiment.seeds runs several)."),
    ({"experiment.variants": ("d:data.split=all",)},
     "experiment.variants 'd': data.split cannot change in a variant: it is the data, which its pre-training shares."),
    ({"experiment.variants": ("c:condition=none",)}, "'c': condition cannot change in a variant: it is the model's"),
    ({"experiment.variants": ("k:perceptual.start_step=5",)}, "'k': perceptual.start_step cannot change in a variant"),
    ({"experiment.variants": ("e:eval.seed=5",)}, "'e': eval.seed cannot change in a variant: it is the evaluation"),
    ({"experiment.variants": ("t:total_steps=1.5",)}, "'t': total_steps cannot change in a variant"),
    ({"experiment.variants": ("t:finetune.warmup_steps=1.5",)},
     "experiment.variants 't': finetune.warmup_steps=1.5 must be of type int, like its default 0."),
    ({"experiment.variants": ("hi:perceptual.t_prime_min=1.5",)},
     "experiment.variants 'hi' (stage perceptual@hi): need 0 <= perceptual.t_prime_min < perceptual.t_prime_max"),
    ({"experiment.variants": ("x:perceptual.weight",)},
     "experiment.variants 'x': 'perceptual.weight' is not key=value"),
    ({"experiment.variants": ("perceptual.weight=1",)}, "is not 'name:key=value[,key=value...]'"),
    ({"experiment.variants": ("a/b:perceptual.weight=1",)}, "the name 'a/b' must be letters, digits and '_.+-'"),
    ({"experiment.variants": ("a:perceptual.weight=1", "a:perceptual.weight=2")}, "names 'a' twice"),
    ({"experiment.variants": ("a:perceptual.weight=1",), "experiment.branches": ("mse",)},
     "experiment.variants apply to the self-perceptual branches, and experiment.branches=('mse',) has none"),
    ({"experiment.seeds": (0, 0)}, "experiment.seeds=(0, 0) must be distinct integers >= 0"),
    ({"experiment.seeds": (-1,)}, "experiment.seeds=(-1,) must be distinct integers >= 0"),
])
def test_bad_seeds_and_variants_are_refused_in_one_line(digits_config, values, message):
  from selfperc_jax import validation

  config = override(digits_config(""), **values)
  with pytest.raises(ConfigError) as err:
    validation.validate(config)
  assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_variant_may_change_what_the_pretraining_does_not_share(digits_config):
  from selfperc_jax import validation

  validation.validate(override(digits_config(""), **{"experiment.variants": (
      "drop:model.dropout=0.1,perceptual.copy_source=online,finetune.optimizer_state=reset,batch_size=64",
      "taps:perceptual.taps=(enc0,mid),perceptual.noise=shared,sampling_ema.decay=0.99")}))


def _rows(seeds, fids, recalls, branch, scale=1.0):
  return [{"branch": branch, "guidance_scale": scale, "guidance_rescale": 0.7 if scale != 1 else 0.0, "step": 3,
           "setting": "x", "fid": f, "recall": r, "inception_score": 9.0 + f / 10, "precision": 0.9,
           "class_accuracy": 0.99, "class_confidence": 0.95, "num_samples": 1000,
           **({} if s is None else {"seed": s})}
          for s, f, r in zip(seeds, fids, recalls)]


def _made_up_study(seeds=(0, 1, 2)):
  mse_fid, mse_recall = [3.0, 3.2, 2.9], [0.80, 0.82, 0.79]
  sp_fid = [f + d for f, d in zip(mse_fid, (1.0, 1.1, 0.9))]  # worse by 1.0 on each seed: beyond the seed noise
  sp_recall = [r + d for r, d in zip(mse_recall, (0.01, -0.02, 0.005))]  # no consistent change
  return (_rows(seeds, [6.0, 6.4, 5.9], [0.7, 0.71, 0.69], "pretrain")
          + _rows(seeds, mse_fid, mse_recall, "mse") + _rows(seeds, [4.0, 4.1, 3.8], mse_recall, "mse", 2.0)
          + _rows(seeds, sp_fid, sp_recall, "perceptual") + _rows(seeds, [4.1, 4.0, 3.9], mse_recall, "perceptual", 2.0)
          + _rows(seeds, [3.0, 3.2, 2.9], mse_recall, "perceptual@lr"))


def test_the_table_over_seeds_gives_seed_stats_intervals_and_marks_paired_differences_beyond_the_noise():
  from selfperc_jax.evaluation import report, seed_stats

  rows = _made_up_study()
  table = report.markdown(rows, "# preface")
  lines = table.splitlines()
  assert lines[2] == "| branch | guidance | n | FID | IS | precision | recall | class acc. | samples |"
  mse = seed_stats.interval([3.0, 3.2, 2.9])
  assert f"| MSE | none | 3 | {mse.format(3)} | " in table
  sp = seed_stats.interval([4.0, 4.3, 3.8])
  assert f"| self-perceptual | none | 3 | {sp.format(3)} | " in table
  assert f"| MSE pre-training (start point) | none | 3 | {seed_stats.interval([6.0, 6.4, 5.9]).format(3)} |" in table
  assert "| self-perceptual @ lr | none | 3 |" in table and table.count("| 1000 |") == 6

  # The paired differences: FID +1.0 on every seed (half-width t(0.975, 2) * 0.1 / sqrt(3) = 0.248), beyond the noise.
  diff = seed_stats.paired_difference([4.0, 4.3, 3.8], [3.0, 3.2, 2.9])
  assert diff.mean == pytest.approx(1.0) and diff.half_width == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-5)
  recall = seed_stats.paired_difference([0.81, 0.80, 0.795], [0.80, 0.82, 0.79])
  assert not recall.excludes_zero
  differences = table[table.index("Paired differences to MSE"):]
  sp_line = next(l for l in differences.splitlines() if l.startswith("| self-perceptual | none |"))
  assert sp_line.startswith(f"| self-perceptual | none | 3 | +{diff.mean:.3f} ± {diff.half_width:.3f} * | ")
  assert f"| {recall.mean:+.3f} ± {recall.half_width:.3f} | " in sp_line
  assert sp_line.endswith("| FID higher (worse), IS higher (better) |")  # IS = 9 + FID / 10, made up so
  # A variant equal to MSE on every seed, and guidance 2 (differences of +0.1, -0.1, +0.1): no difference.
  assert "| self-perceptual @ lr | none | 3 | +0.000 ± 0.000 |" in differences
  guided = next(l for l in differences.splitlines() if l.startswith("| self-perceptual | 2 (rescale 0.7) |"))
  assert guided.endswith("| no difference beyond the seed noise |")
  assert "MSE pre-training" not in differences and "| MSE |" not in differences  # the start point, the baseline

  # The JSON summary holds the same numbers (no NaN), the plot its error bars.
  summary = {(e["branch"], e["guidance_scale"]): e for e in report.summary_json(rows)}
  got = summary[("perceptual", 1.0)]
  assert got["seeds"] == [0, 1, 2] and got["metrics"]["fid"]["mean"] == pytest.approx(sp.mean)
  assert got["metrics"]["fid"]["half_width"] == pytest.approx(sp.half_width)
  assert got["difference_to_mse"]["fid"] == {"mean": pytest.approx(1.0), "half_width": pytest.approx(diff.half_width),
                                             "n": 3, "excludes_zero": True}
  assert "difference_to_mse" not in summary[("mse", 1.0)] and "difference_to_mse" not in summary[("pretrain", 1.0)]


def test_the_plot_over_seeds_draws_error_bars(tmp_path):
  from PIL import Image

  from selfperc_jax.evaluation import report

  one, three = str(tmp_path / "one.png"), str(tmp_path / "three.png")
  report.plot(one, [r for r in _made_up_study() if r["seed"] == 0])
  report.plot(three, _made_up_study())
  import numpy as np

  pixels = lambda path: set(map(tuple, np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).tolist()))
  colours = set(report._COLOURS[:4])
  assert colours <= pixels(three) and colours <= pixels(one)
  assert Image.open(one).size == Image.open(three).size


def test_one_seed_keeps_the_table_of_before(tmp_path):
  from selfperc_jax.evaluation import report

  rows = _rows([None], [3.0], [0.8], "mse") + _rows([None], [4.0], [0.7], "perceptual", 2.0)
  expected = ("# preface\n\n| branch | guidance | FID | IS | precision | recall | class acc. | samples |\n"
              "|---|---|---|---|---|---|---|---|\n"
              "| MSE | none | 3.000 | 9.30 | 0.900 | 0.800 | 0.990 | 1000 |\n"
              "| self-perceptual | 2 (rescale 0.7) | 4.000 | 9.40 | 0.900 | 0.700 | 0.990 | 1000 |\n")
  assert report.markdown(rows, "# preface") == expected
  seeded = [{**r, "seed": 7} for r in rows]  # experiment.seeds=(7,): one seed, the same table
  assert report.markdown(seeded, "# preface") == expected
  path = str(tmp_path / "c.json")
  report.write_json(path, seeded, {"command": "x"})
  assert "summary" not in json.loads(open(path).read())
  # Unconditional rows: the classifier's confidence and balance stand in for the class accuracy.
  uncond = [{k: v for k, v in r.items() if k != "class_accuracy"} | {"class_balance": 0.97} for r in rows]
  assert report.markdown(uncond, "").splitlines()[2] == (
      "| branch | guidance | FID | IS | precision | recall | class conf. | class bal. | samples |")
