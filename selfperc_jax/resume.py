"""Resuming: the state from the workdir's newest intact checkpoint, or a fresh one (optionally from init_from, as
finetune.* says), and every rule of what may resume: the model's shape (SHAPE_KEYS), what the train state holds
(STATE_LAYOUT_KEYS), the fine-tuning recipe the run began with (keep_recipe), corrupt checkpoints moved aside,
changed config values recorded in config_history.jsonl."""

from __future__ import annotations

import json
import time

import jax
import ml_collections

from selfperc_jax import checkpoint, config_base, config_tree, fileio, pretrained, sharding, step as step_lib
from selfperc_jax.errors import CheckpointError, CorruptCheckpointError
from selfperc_jax.setup import Setup


# The config keys that fix the model's shape, and those inside them that do not (config_base.py says which): a
# checkpoint only resumes under the same values.
SHAPE_KEYS, NON_SHAPE_KEYS = config_base.SHAPE_KEYS, config_base.NON_SHAPE_KEYS
# Keys added after checkpoints were already written: a saved config without them had these values.
ADDED_KEY_DEFAULTS = {"model.head_channels": 0, "model.attention": "auto", "optimizer.accumulate_steps": 1,
                      "latent.vae": "", "latent.channels": 0, "latent.block_out_channels": (),
                      "trust_unverified_checkpoints": False, "diffusion.zero_snr_anchor": "clean",
                      "sample.timestep_spacing": "project", "sample.steps_offset": 0, "sample.final_step": "clean",
                      "condition": "class", "experiment.seeds": (), "experiment.variants": (),
                      "model.arch": "adm", "model.sd_layout": "", "pretrained": "", "sample.prompts": (), "sample.prompts_file": "",
                      "sample.negative_prompt": "", "retrain_schedule": False,
                      # The recipe of before finetune.* existed, so that a run that predates it goes on as it began
                      # (keep_recipe): one optimizer.* schedule and EMA warm-up over the run's steps, no change of
                      # the state at the start step (online params and Adam's state as they are). (An init_from run
                      # of then took the online params and a fresh Adam state, but at its start: once it has a
                      # checkpoint, only the schedules still count.)
                      "finetune.online_start": "online", "finetune.optimizer_state": "carry",
                      "finetune.sampling_ema": "run", "finetune.learning_rate": 0.0, "finetune.warmup_steps": 0,
                      "finetune.decay": "run"}
RECIPE = "finetune"  # the config section that is the run's fine-tuning recipe, fixed for the run's life


def open_latest(directory: str, trust_unverified: bool = False) -> tuple[checkpoint.Checkpointer | None, int | None]:
  """A read-only Checkpointer of a checkpoints folder and its latest step: (None, None) where the folder does not
  exist, (checkpointer, None) where it holds no checkpoint."""
  if not fileio.isdir(directory):
    return None, None
  ckpt = checkpoint.Checkpointer(directory, read_only=True, trust_unverified=trust_unverified)
  return ckpt, ckpt.latest_step()


def latest_step(workdir: str) -> int | None:
  """The step of the workdir's latest checkpoint (None: none saved yet)."""
  ckpt, latest = open_latest(fileio.join(workdir, "checkpoints"))
  if ckpt is not None:
    ckpt.close()
  return latest


def check_compatible(ckpt: checkpoint.Checkpointer, step: int, config, what: str) -> None:
  """Refuses a checkpoint trained with another model shape (SHAPE_KEYS), naming the differing keys."""
  diffs = shape_differences(ckpt.restore_config(step), config)
  if diffs:
    raise CheckpointError(
        f"{what} {ckpt.directory} (step {step}) was trained with a different model shape:\n  " + "\n  ".join(diffs)
        + "\nUse the same model config, or a new --workdir for a new model. Nothing was changed.")


def _open_init_source(setup: Setup) -> tuple[checkpoint.Checkpointer, int]:
  """The checkpoint that init_from names, checked before anything is built from it."""
  source = setup.config.init_from
  src, latest = open_latest(checkpoint.checkpoint_dir(source), setup.config.trust_unverified_checkpoints)
  if src is None:
    raise CheckpointError(f"init_from={source!r} does not exist; give a workdir (or its checkpoints/ folder) of an "
                          "earlier run.")
  if latest is None:
    raise CheckpointError(f"init_from={source!r} holds no checkpoint; give the workdir of a run that saved one.")
  check_compatible(src, latest, setup.config, "init_from=")
  return src, latest


def _init_from(setup: Setup, state, src: checkpoint.Checkpointer, step: int):
  """The state of a fine-tuning run from another run's checkpoint, as finetune.* say: the online params from its
  sampling EMA ('ema') or its online params ('online'), the sampling EMA from its sampling EMA, Adam's state from its
  own ('carry', checked to have this run's layout first) or fresh ('reset'); the copy from its
  perceptual.copy_source."""
  f, copy_source = setup.config.finetune, setup.config.perceptual.copy_source
  carry = f.optimizer_state == "carry"
  if carry:
    _check_optimizer_layout(setup, src, step)
  target = {"ema_params": setup.abstract_state.ema_params}
  if f.online_start == "online" or (state.perceptual_params is not None and copy_source == "online"):
    target["params"] = setup.abstract_state.params
  if carry:
    target["opt_state"] = setup.abstract_state.opt_state
  restored, _ = src.restore(step, target, partial=True)
  src.close()
  own = lambda tree: jax.tree.map(lambda x: x.copy(), tree)  # its own buffers: the step donates every array
  params = own(restored["ema_params"]) if f.online_start == "ema" else restored["params"]
  copy = None
  if state.perceptual_params is not None:
    copy = own(restored["ema_params" if copy_source == "ema" else "params"])
  print(f"initialised from {src.directory} (step {step}): the online params from its "
        f"{'sampling EMA' if f.online_start == 'ema' else 'online params'}, "
        f"{'its optimizer state' if carry else 'a fresh optimizer state'}"
        + (f", the perceptual copy from its {copy_source} params" if copy is not None else ""), flush=True)
  return state.replace(params=params, ema_params=restored["ema_params"], perceptual_params=copy,
                       opt_state=restored["opt_state"] if carry else state.opt_state)


def _init_from_folder(setup: Setup, state):
  """The state of a fine-tuning run from a diffusers model folder's U-Net (pretrained.start_folder): the online params, the
  sampling EMA and the copy all its weights (the released model, as the paper fine-tunes it), a fresh optimizer."""
  from selfperc_jax.models import sd

  folder = pretrained.start_folder(setup.config)
  weights = sd.load_folder_params(folder)
  place = lambda: jax.tree.map(sharding.global_array, weights, setup.state_sharding.params)  # a buffer each
  print(f"initialised from the model folder {folder}: the online params, the sampling EMA"
        + (" and the perceptual copy" if state.perceptual_params is not None else "")
        + " from its unet/, a fresh optimizer state", flush=True)
  return state.replace(params=place(), ema_params=place(),
                       perceptual_params=None if state.perceptual_params is None else place())


def _check_optimizer_layout(setup: Setup, src: checkpoint.Checkpointer, step: int) -> None:
  """Refuses to carry init_from's optimizer state over when its layout is not this run's (e.g. one run clips the
  gradient and the other does not), naming the keys and the fix."""
  saved = src.restore_config(step)
  then = ml_collections.ConfigDict(setup.config.to_dict())  # this config with the source's optimizer.* values
  optimizer = {f"optimizer.{k}": v for k, v in (saved.get("optimizer") or {}).items() if k in then.optimizer}
  config_tree.set_values(then, optimizer)
  tx_then, _ = step_lib.make_optimizer(then)
  layout_then = jax.eval_shape(tx_then.init, setup.abstract_state.params)
  if jax.tree.structure(layout_then) != jax.tree.structure(setup.abstract_state.opt_state):
    keys = ", ".join(f"{k}={v!r} (now {config_tree.lookup(setup.config, k)!r})" for k, v in optimizer.items()
                     if v != config_tree.lookup(setup.config, k)) or "another optimizer"
    raise CheckpointError(
        f"finetune.optimizer_state='carry' takes Adam's state from init_from={setup.config.init_from!r}, but its "
        f"checkpoint (step {step}) was trained with {keys}, so its optimizer state has another layout. Use the same "
        "value(s), or --config.finetune.optimizer_state=reset to start with a fresh optimizer state.")


def recorded_recipe(saved: dict) -> dict:
  """{finetune key: value} as a checkpoint's config recorded them (keys it predates: ADDED_KEY_DEFAULTS, the recipe
  of before the section)."""
  section = saved.get(RECIPE) or {}
  prefix = RECIPE + "."
  return {k[len(prefix):]: section.get(k[len(prefix):], v) for k, v in ADDED_KEY_DEFAULTS.items()
          if k.startswith(prefix)}


def keep_recipe(setup: Setup, saved: dict, step: int) -> None:
  """A resumed run goes on with the fine-tuning recipe it began with (its checkpoint's finetune.*), whatever the
  config says now: a recipe that changed mid-run would be neither. A config that says otherwise is told so."""
  recorded = recorded_recipe(saved)
  differ = {k: (v, setup.config[RECIPE][k]) for k, v in recorded.items() if v != setup.config[RECIPE][k]}
  if not differ:
    return
  setup.keep_recipe(recorded)
  values = ", ".join(f"{RECIPE}.{k}={a!r} (this config: {b!r})" for k, (a, b) in differ.items())
  why = (" (its checkpoint predates finetune.*: the recipe of before, as resume.ADDED_KEY_DEFAULTS says)"
         if RECIPE not in saved else "")
  print(f"the run goes on with the fine-tuning recipe it began with{why}: {values}; another recipe needs a new "
        "--workdir (e.g. with --config.init_from=<this workdir>)", flush=True)


def _flatten(prefix: str, value) -> dict:
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(_flatten(f"{prefix}.{k}", v))
    return out
  return {prefix: value}


def shape_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """'key: saved -> current' for every shape-determining config value that differs."""
  current = json.loads(config.to_json())
  diffs = []
  for key in SHAPE_KEYS:
    old, new = _flatten(key, config_tree.lookup(saved, key)), _flatten(key, config_tree.lookup(current, key))
    for k in sorted((set(old) | set(new)) - set(NON_SHAPE_KEYS)):
      a, b = (ADDED_KEY_DEFAULTS.get(k) if d.get(k) is None else d[k] for d in (old, new))
      if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
        diffs.append(f"{k}: {a!r} in the checkpoint, {b!r} now")
  return diffs


def changed_values(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{dotted key: (value in the checkpoint, value now)} for every config value that differs (lists and tuples
  compare equal; keys a checkpoint predates count with their defaults)."""
  old = _flatten("", saved)
  new = _flatten("", json.loads(config.to_json()))
  norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  out = {}
  for k in sorted(set(old) | set(new)):
    key = k[1:]
    a, b = old.get(k, ADDED_KEY_DEFAULTS.get(key)), new.get(k, ADDED_KEY_DEFAULTS.get(key))
    if norm(a) != norm(b):
      out[key] = (a, b)
  return out


# Config values that decide what the train state holds besides the model (the model's own are SHAPE_KEYS).
STATE_LAYOUT_KEYS = ("perceptual.weight", "perceptual.share_with_sampling_ema", "optimizer.grad_clip")


def check_resume_config(setup: Setup, saved: dict, step: int) -> dict:
  """Refuses a config whose train state holds other arrays than the checkpoint's (naming the keys and why); returns
  the other changed values, which the resumed run takes over."""
  changed = changed_values(saved, setup.config)
  if not changed:
    return {}
  then = ml_collections.ConfigDict(setup.config.to_dict())  # the config as the checkpoint was trained with it
  # (keys a checkpoint predates, or since removed, keep today's values)
  config_tree.set_values(then, {key: tuple(old) if isinstance(now, (list, tuple)) else old
                                for key, (old, now) in changed.items() if old is not None and now is not None})
  tx_then, _ = step_lib.make_optimizer(then)
  layout_then = jax.eval_shape(
      lambda k: step_lib.init_state(then, setup.model, tx_then, k, setup.model_shape), jax.random.key(0))
  if jax.tree.structure(layout_then) != jax.tree.structure(setup.abstract_state):
    keys = [k for k in STATE_LAYOUT_KEYS if k in changed] or list(changed)
    values = ", ".join(f"{k}={changed[k][0]!r} (now {changed[k][1]!r})" for k in keys)
    raise CheckpointError(
        f"the workdir's checkpoint (step {step}) was trained with {values}, and this changes what the train state "
        "holds (the perceptual copy, or the optimizer's state), so it cannot resume. Resume with the checkpoint's "
        "value(s), or start a new --workdir with --config.init_from=<this workdir> to begin from its params. "
        "Nothing was changed; the checkpoints are fine.")
  return changed


def restore_or_init(setup: Setup, ckpt: checkpoint.Checkpointer, init_key):
  """(state, restored_step or None); on resume the data iterator continues where it stopped.

  A corrupt or unreadable latest checkpoint is passed over, with a warning, for the newest one that restores intact;
  the passed-over step folders are moved to checkpoints_corrupt/ (never deleted), so later saves cannot collide with
  them. If none restores, nothing is moved and the error says so."""
  steps = ckpt.all_steps()
  if steps:
    corrupt = []
    for latest in reversed(steps):
      try:
        state, data_state, changed = _restore(setup, ckpt, latest)
        break
      except CorruptCheckpointError as e:
        corrupt.append((latest, e))
    else:
      raise CheckpointError(f"no checkpoint in {ckpt.directory} can be restored; the newest: {corrupt[0][1]} "
                            "Nothing was changed.")
    if corrupt:
      for step, error in corrupt:
        print(f"warning: {error}", flush=True)
      _move_aside(setup, ckpt, [step for step, _ in corrupt])
      print(f"resuming from step {latest}, the newest intact checkpoint", flush=True)
    if changed:
      listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
      print(f"resuming step {latest} with {len(changed)} changed config value(s): {listed}", flush=True)
      if jax.process_index() == 0:
        _record_config_change(setup.workdir, latest, changed)
    if setup.pipeline is not None and data_state is not None:
      setup.pipeline.set_state(data_state)
    if setup.config.init_from:
      print(f"resuming from step {latest} of {ckpt.directory}; init_from is ignored", flush=True)
    return state, latest
  folder = pretrained.start_folder(setup.config)
  source = _open_init_source(setup) if setup.config.init_from and not folder else None
  state = setup.init_state(init_key)
  if folder:
    state = _init_from_folder(setup, state)
  elif source is not None:
    state = _init_from(setup, state, *source)
  return state, None


def _record_config_change(workdir: str, step: int, changed: dict) -> None:
  """Appends the change to workdir/config_history.jsonl, unless its last row already says the same."""
  path = fileio.join(workdir, "config_history.jsonl")
  row = {"step": step, "changed": {k: {"checkpoint": a, "now": b} for k, (a, b) in changed.items()}}
  if fileio.exists(path):
    lines = fileio.read_text(path).splitlines()
    last = json.loads(lines[-1]) if lines else {}
    if {k: last.get(k) for k in row} == row:
      return
  fileio.append_text(path, json.dumps({**row, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def _restore(setup: Setup, ckpt: checkpoint.Checkpointer, step: int):
  """(state, data state, changed config values) of one step, after the config checks."""
  check_compatible(ckpt, step, setup.config, "the workdir's checkpoint")
  saved = ckpt.restore_config(step)
  keep_recipe(setup, saved, step)
  changed = check_resume_config(setup, saved, step)
  state, data_state = ckpt.restore(step, setup.abstract_state)
  return state, data_state, changed


def _move_aside(setup: Setup, ckpt: checkpoint.Checkpointer, steps) -> None:
  """Moves corrupt step folders to workdir/checkpoints_corrupt/<step> (process 0), then every process re-reads."""
  if jax.process_index() == 0:
    from etils import epath

    aside = epath.Path(fileio.join(setup.workdir, "checkpoints_corrupt"))
    aside.mkdir(parents=True, exist_ok=True)
    for step in steps:
      target = aside / f"{step}"
      if target.exists():
        target = aside / f"{step}_{time.strftime('%Y%m%dT%H%M%S')}"
      epath.Path(fileio.join(ckpt.directory, str(step))).rename(target)
      print(f"moved the corrupt checkpoint step {step} to {target}", flush=True)
  sharding.barrier()  # every process waits for the move
  ckpt.manager.reload()
