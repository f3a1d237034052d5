"""End to end: the training loop, resume, init_from, the sample and eval modes, and the bad config values a user can
give it (the command line in subprocesses: test_main.py; the fine-tuning recipe: test_finetune.py)."""

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest

from selfperc_jax import checkpoint, logging_utils, modes, periodic, train
from selfperc_jax.errors import CheckpointError, ConfigError, NonFiniteError
from selfperc_jax.setup import Setup

from conftest import load_config, override, random_inception_weights


def _tiny(get_config, **overrides):
  config = get_config("tiny")
  config.total_steps = 12
  config.log_every = 1
  config.checkpoint_every = 6
  config.sample_every = 0
  config.eval_every = 12  # once, at the end
  config.eval.num_samples = 20
  config.perceptual.start_step = 4
  config.mesh.data = 1
  return override(config, **overrides)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  timing = ("steps_per_s", "images_per_s", "tflops_per_device", "mfu")
  return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def _snapshot(directory):
  """Every file below directory with its size and modification time."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
  return out


def test_is_due_every_n_steps_at_the_first_and_last_step_and_where_a_call_stops():
  due = lambda every, total=10, **k: [s for s in range(1, total + 1) if periodic.is_due(s, every, total, **k)]
  assert due(4) == [4, 8, 10] and due(4, last=False) == [4, 8] and due(4, first=True) == [1, 4, 8, 10]
  assert due(4, stop=7) == [4, 7, 8, 10] and due(0, stop=7) == [] and due(0, first=True) == []  # 0: never


def test_next_due_is_the_first_later_step_is_due_says_and_the_console_announces_it(tmp_path, monkeypatch, capsys):
  for every, total in ((4, 10), (3, 9), (1, 5), (7, 7), (0, 10)):
    for step in range(0, total + 1):
      later = [s for s in range(step + 1, total + 1) if periodic.is_due(s, every, total)]
      assert periodic.next_due(step, every, total) == (later[0] if later else None), (every, total, step)
  config = override(load_config("digits"), sample_every=500, eval_every=300, total_steps=2000)
  outputs = periodic.PeriodicOutputs(types.SimpleNamespace(config=config))
  assert [outputs.upcoming(s) for s in (0, 300, 1400, 1999, 2000)] == [
      ("evaluation", 300), ("sample grid", 500), ("sample grid", 1500), ("sample grid", 2000), None]
  logger = logging_utils.MetricLogger(str(tmp_path), total_steps=100, batch_size=2)
  logger.start(0)
  monkeypatch.setattr(logging_utils.time, "perf_counter", lambda: logger._last_time + 10.0)  # 10 steps in 10 s
  logger.write(10, {"loss": 1.0}, upcoming=("sample grid", 40))
  assert "ETA 1m30s | next sample grid at step 40 (in 0m30s)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One tiny run of 12 steps, shared by the tests that only read it (copy it before changing it)."""
  get_config = lambda arg="": load_config("digits", arg)
  workdir = str(tmp_path_factory.mktemp("trained"))
  train.train_and_evaluate(_tiny(get_config), workdir)
  return workdir, get_config


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(trained, tmp_path):
  workdir, get_config = trained
  config = _tiny(get_config)
  interrupted = str(tmp_path / "interrupted")
  # 5 steps (checkpointed at the stop, not at a checkpoint_every step), then the rest after a restart.
  train.train_and_evaluate(config, interrupted, num_steps=5)
  assert checkpoint.Checkpointer(os.path.join(interrupted, "checkpoints")).latest_step() == 5
  train.train_and_evaluate(config, interrupted)
  full, resumed = _metrics(workdir), _metrics(interrupted)
  assert [r["step"] for r in resumed] == list(range(1, 13)) + [12]  # the last row holds the evaluation
  assert set(resumed[-1]) >= {"eval/fid", "eval/class_accuracy", "eval/precision", "eval/recall"}
  assert any(r["loss_perceptual"] > 0 for r in full)  # the comparison covers self-perceptual steps
  for a, b in zip(full, resumed):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=f"step {a['step']} {k}")


@pytest.mark.slow
def test_restore_onto_a_different_mesh_continues_the_same_run(trained, tmp_path):
  """Saved with FSDP on 8 devices (2 x 4), resumed on 4 devices (2 x 2): the same run as on one device."""
  workdir, get_config = trained
  moved = str(tmp_path / "moved")
  meshes = [{"mesh.data": 2, "mesh.fsdp": fsdp, "mesh.fsdp_min_size": 64, "eval_every": 0} for fsdp in (4, 2)]
  first = _tiny(get_config, **meshes[0])
  train.train_and_evaluate(first, moved, num_steps=6)
  setup = Setup(first, moved)
  assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(setup.state_sharding.params))
  train.train_and_evaluate(_tiny(get_config, **meshes[1]), moved)
  assert len(_metrics(moved)) == 12  # the training rows; the evaluation row of `trained` is not compared
  for a, b in zip(_metrics(workdir), _metrics(moved)):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=2e-4, atol=1e-6, err_msg=f"step {a['step']} {k}")


@pytest.mark.slow
def test_finished_run_restarted_trains_nothing_and_keeps_its_files(trained):
  workdir, get_config = trained
  before = _snapshot(workdir)
  assert train.train_and_evaluate(_tiny(get_config), workdir) is None
  assert _snapshot(workdir) == before


@pytest.mark.slow
def test_a_finished_run_missing_its_last_outputs_writes_them_on_restart(trained, tmp_path, capsys):
  """Killed after the last checkpoint but before its samples and evaluation: the next start writes them."""
  workdir, get_config = trained
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  with open(copy / "eval" / "step_12.json") as f:
    before = json.load(f)
  os.remove(copy / "eval" / "step_12.json")
  config = _tiny(get_config, sample_every=12)  # the run itself had no samples: they are missing too
  assert train.train_and_evaluate(config, str(copy)) is None
  assert "step 12's samples and eval are missing from the workdir: writing them first" in capsys.readouterr().out
  assert (copy / "samples" / "step_12.png").exists() and (copy / "samples" / "step_12.npz").exists()
  with open(copy / "eval" / "step_12.json") as f:
    after = json.load(f)
  assert after.keys() == before.keys()
  for setting, result in before.items():  # the same evaluation as at the end of training
    assert after[setting]["fid"] == pytest.approx(result["fid"], rel=1e-6)
  assert sorted(os.listdir(copy / "checkpoints")) == ["12", "6"]
  snapshot = _snapshot(copy)
  train.train_and_evaluate(config, str(copy))  # now complete: nothing is done or touched
  assert "nothing to train" in capsys.readouterr().out
  assert _snapshot(copy) == snapshot


def _diverging(get_config, **overrides):
  """A learning rate far too high, no clipping: the loss becomes non-finite within a few steps."""
  return _tiny(get_config, **{"optimizer.learning_rate": 1e9, "optimizer.warmup_steps": 0, "optimizer.grad_clip": 0.0,
                              "total_steps": 16, "checkpoint_every": 1, "log_every": 8, "eval_every": 0,
                              "perceptual.start_step": 100, **overrides})


def _all_params_finite(directory, step, config):
  setup = Setup(config, with_data=False)
  state, _ = checkpoint.Checkpointer(directory, read_only=True).restore(step, setup.abstract_state)
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(state))


@pytest.mark.slow
def test_divergence_stops_with_an_error_and_writes_no_non_finite_checkpoint(digits_config, tmp_path):
  config = _diverging(digits_config)
  with pytest.raises(NonFiniteError, match=r"became non-finite \(NaN/inf\) at step (\d+)") as info:
    train.train_and_evaluate(config, str(tmp_path))
  bad = int(info.value.args[0].split(" at step ")[1].split(";")[0])
  ckpt_dir = str(tmp_path / "checkpoints")
  saved = sorted(int(d) for d in os.listdir(ckpt_dir))
  assert bad <= 16 and all(step < bad for step in saved)  # training stopped; nothing from the bad step on was saved
  assert saved and all(_all_params_finite(ckpt_dir, step, config) for step in saved)
  assert f"latest checkpoint is step {saved[-1]}" in info.value.args[0]


@pytest.mark.slow
def test_skip_mode_skips_non_finite_updates_and_keeps_the_state_finite(digits_config, tmp_path, capsys):
  config = _diverging(digits_config, on_nonfinite="skip", checkpoint_every=16)
  train.train_and_evaluate(config, str(tmp_path))
  assert "were skipped" in capsys.readouterr().out
  assert _all_params_finite(str(tmp_path / "checkpoints"), 16, config)


@pytest.mark.slow
def test_sampling_refuses_a_checkpoint_with_non_finite_params(trained, tmp_path):
  workdir, get_config = trained
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  config = _tiny(get_config)
  setup = Setup(config, str(copy))
  ckpt = setup.checkpointer()
  state, data_state = ckpt.restore(12, setup.abstract_state)
  ckpt.save(13, state.replace(ema_params=jax.tree.map(lambda x: x * np.nan, state.ema_params)), data_state, config)
  ckpt.close()
  with pytest.raises(CheckpointError, match="checkpoint 13 .* holds NaN/inf"):
    modes.sample_from_checkpoint(config, str(copy))


@pytest.mark.slow
def test_metrics_keep_one_row_per_step_after_a_resume(trained, tmp_path):
  """A run killed after logging steps 7..12 but before checkpointing them logs them again, once."""
  workdir, get_config = trained
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "checkpoints" / "12")
  train.train_and_evaluate(_tiny(get_config), str(copy))
  rows = _metrics(copy)
  train_steps = [r["step"] for r in rows if "loss" in r]
  assert train_steps == list(range(1, 13))
  assert [r["step"] for r in rows if "eval/fid" in r] == [12]
  for a, b in zip(_metrics(workdir), rows):  # and the rows are those of the uninterrupted run
    assert a.keys() == b.keys()
    for k in a:
      assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)


@pytest.mark.parametrize("overrides,named", [
    ({"perceptual.weight": 0.0}, "perceptual.weight=1.0 (now 0.0)"),
    ({"optimizer.grad_clip": 0.0}, "optimizer.grad_clip=1.0 (now 0.0)"),
    ({"perceptual.share_with_sampling_ema": True}, "perceptual.share_with_sampling_ema=False (now True)"),
])
@pytest.mark.slow
def test_a_change_of_what_the_state_holds_is_refused_by_name(trained, overrides, named):
  workdir, get_config = trained
  before = _snapshot(workdir)
  with pytest.raises(CheckpointError, match="changes what the train state holds") as info:
    train.train_and_evaluate(_tiny(get_config, total_steps=14, **overrides), workdir)
  assert named in str(info.value) and "corrupt" not in str(info.value) and "Nothing was changed" in str(info.value)
  assert _snapshot(workdir) == before


@pytest.mark.slow
def test_other_config_changes_are_listed_at_resume_and_kept_in_the_history(trained, tmp_path, capsys):
  workdir, get_config = trained
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  config = _tiny(get_config, eval_every=0, **{"sample.guidance_scale": 2.0})
  train.train_and_evaluate(config, str(copy))
  out = capsys.readouterr().out
  assert "resuming step 12 with 2 changed config value(s): eval_every: 12 -> 0; sample.guidance_scale: 1.0 -> 2.0" in out
  with open(copy / "config_history.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows == [{"step": 12, "time": rows[0]["time"], "changed": {
      "eval_every": {"checkpoint": 12, "now": 0}, "sample.guidance_scale": {"checkpoint": 1.0, "now": 2.0}}}]
  train.train_and_evaluate(config, str(copy))  # the same change again is not recorded twice
  with open(copy / "config_history.jsonl") as f:
    assert len(f.readlines()) == 1


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused_and_nothing_is_lost(trained):
  workdir, get_config = trained
  before = _snapshot(workdir)
  config = _tiny(get_config, **{"model.base_channels": 32, "total_steps": 20})
  with pytest.raises(CheckpointError, match=r"model\.base_channels: 16 in the checkpoint, 32 now"):
    train.train_and_evaluate(config, workdir)
  assert _snapshot(workdir) == before


def _corrupt(directory, flip_one_bit: bool):
  """Damages a checkpoint's array data: truncates every data file, or flips one bit in the largest."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(directory, "state")) for name in names
           if "metadata" not in name.lower() and name != "_sharding"]
  if flip_one_bit:
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
      data = bytearray(f.read())
      data[len(data) // 2] ^= 0x10
      f.seek(0)
      f.write(data)
    return
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(3)


def test_fingerprint_changes_with_any_single_flipped_bit():
  state = {"w": jax.numpy.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8),
           "h": jax.numpy.ones((5,), jax.numpy.bfloat16), "n": jax.numpy.int32(7)}
  clean = checkpoint.fingerprint(state)
  assert set(clean) == {"w", "h", "n"}
  rng = np.random.default_rng(0)
  for name, width in (("w", np.uint32), ("h", np.uint16)):
    for _ in range(20):
      words = np.asarray(state[name]).copy().view(width)
      words.flat[rng.integers(words.size)] ^= width(1) << width(rng.integers(8 * words.itemsize))
      flipped = checkpoint.fingerprint(dict(state, **{name: jax.numpy.asarray(words.view(state[name].dtype))}))
      assert flipped[name] != clean[name] and all(flipped[k] == clean[k] for k in clean if k != name)


def test_small_replicated_arrays_are_saved_whole_and_large_ones_split_over_their_replicas(tmp_path, monkeypatch):
  """Replica-parallel writes only where each of the 8 replicas' pieces holds MIN_REPLICA_SLICE_BYTES; the state
  restores the same either way."""
  from jax.sharding import NamedSharding, PartitionSpec
  from orbax.checkpoint._src.serialization import replica_slices

  pieces, real = {}, replica_slices.get_replica_slices

  def spy(arr, *args, **kwargs):
    out = real(arr, *args, **kwargs)
    pieces[arr.shape] = out.local_shape
    return out

  monkeypatch.setattr(replica_slices, "get_replica_slices", spy)
  replicated = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
  big_rows = 8 * checkpoint.MIN_REPLICA_SLICE_BYTES // (4 * 128)  # 8 pieces of exactly the minimum
  state = {"small": jax.device_put(np.ones((32, 128), np.float32), replicated),
           "big": jax.device_put(np.arange(big_rows * 128, dtype=np.float32).reshape(big_rows, 128), replicated)}
  saver = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  saver.save(1, state, {}, load_config("digits", "tiny"))
  saver.check(wait=True)
  assert jax.device_count() == 8 and pieces == {(32, 128): (32, 128), (big_rows, 128): (big_rows // 8, 128)}
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state)
  restored, _ = saver.restore(1, abstract)
  for name in state:
    np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(state[name]))
  saver.close()


@pytest.mark.slow
@pytest.mark.parametrize("flip_one_bit,drop_checksums", [(False, False), (True, False), (True, True)],
                         ids=["truncated", "one-bit-flipped", "one-bit-flipped-checksums-deleted"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, capsys, flip_one_bit,
                                                                     drop_checksums):
  workdir, get_config = trained
  broken = tmp_path / "broken"
  shutil.copytree(workdir, broken)
  _corrupt(broken / "checkpoints" / "12", flip_one_bit)
  if drop_checksums:  # without them the flipped bit cannot be seen: the checkpoint is unverified, so not trusted
    shutil.rmtree(broken / "checkpoints" / "12" / "fingerprint")
  train.train_and_evaluate(_tiny(get_config), str(broken))
  out = capsys.readouterr().out
  assert "checkpoint step 12" in out and ("corrupt" in out or "could not be restored" in out)
  assert ("has no checksums" in out) == drop_checksums
  assert "resuming from step 6, the newest intact checkpoint" in out
  assert "training 6 steps from step 6" in out
  assert os.listdir(broken / "checkpoints_corrupt") == ["12"]  # moved aside, not deleted
  assert sorted(os.listdir(broken / "checkpoints")) == ["12", "6"]  # step 12 trained and saved again
  assert checkpoint.Checkpointer(str(broken / "checkpoints"), read_only=True).restore(
      12, Setup(_tiny(get_config), with_data=False).abstract_state)[0] is not None


@pytest.mark.slow
def test_no_restorable_checkpoint_is_an_error_that_changes_nothing(trained, tmp_path):
  workdir, get_config = trained
  broken = tmp_path / "broken"
  shutil.copytree(workdir, broken)
  for step in ("6", "12"):
    _corrupt(broken / "checkpoints" / step, flip_one_bit=False)
  before = _snapshot(broken)
  with pytest.raises(CheckpointError, match="no checkpoint in .* can be restored"):
    train.train_and_evaluate(_tiny(get_config, total_steps=20), str(broken))
  assert _snapshot(broken) == before


@pytest.mark.slow
def test_init_from_missing_or_incompatible_is_refused(trained, tmp_path):
  workdir, get_config = trained
  with pytest.raises(CheckpointError, match="does not exist"):
    train.train_and_evaluate(_tiny(get_config, init_from=str(tmp_path / "nope")), str(tmp_path / "a"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    train.train_and_evaluate(_tiny(get_config, init_from=str(empty)), str(tmp_path / "b"))
  before = _snapshot(workdir)
  with pytest.raises(CheckpointError, match=r"model\.num_res_blocks: 1 in the checkpoint, 2 now"):
    train.train_and_evaluate(_tiny(get_config, init_from=workdir, **{"model.num_res_blocks": 2}), str(tmp_path / "c"))
  assert _snapshot(workdir) == before
  assert not os.listdir(tmp_path / "c" / "checkpoints")
  # Adam's state carried over (the default) needs the source's optimizer layout; a fresh one does not.
  with pytest.raises(CheckpointError, match=r"finetune.optimizer_state='carry' takes Adam's state from init_from="
                                            r".* trained with optimizer.grad_clip=1.0 \(now 0.0\)"):
    train.train_and_evaluate(_tiny(get_config, init_from=workdir, **{"optimizer.grad_clip": 0.0}), str(tmp_path / "d"))
  assert _snapshot(workdir) == before


def test_sample_mode_without_checkpoint_is_refused(digits_config, tmp_path):
  with pytest.raises(CheckpointError, match="train first"):
    modes.sample_from_checkpoint(_tiny(digits_config), str(tmp_path))


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", 0, "batch_size=0 must be a positive integer"),
    ("batch_size", 12, "batch_size=12 must be divisible by the 8 devices"),
    ("mesh.data", 16, "needs 16 devices but 8 are available"),
    ("mesh.fsdp", 3, "8 devices cannot be split into mesh.fsdp=3 groups"),
    ("diffusion.schedule", "quadratic", "diffusion.schedule='quadratic' is not known"),
    ("diffusion.prediction", "score", "diffusion.prediction='score' is not known"),
    ("perceptual.noise", "fresh", "perceptual.noise='fresh' is not known"),
    ("perceptual.condition", "other", "perceptual.condition='other' is not known"),
    ("perceptual.taps", ("dec0",), "must name taps of this U-Net"),
    ("perceptual.t_prime_min", 1.0, "t_prime_min < perceptual.t_prime_max"),
    ("perceptual.mse_weight", -1.0, "must be >= 0"),
    ("perceptual.copy_ema_decay", 1.5, "perceptual.copy_ema_decay=1.5 must be in"),
    ("perceptual.copy_source", "best", "perceptual.copy_source='best' is not known"),
    ("sampling_ema.decay", -0.5, "sampling_ema.decay=-0.5 must be in"),
    ("experiment.branches", ("mse", "sp"), "experiment.branches=('mse', 'sp') must be distinct names"),
    ("experiment.guidance_scales", (), "experiment.guidance_scales=() must be one or more"),
    ("sample.sampler", "euler", "sample.sampler='euler' is not known"),
    ("sample.batch_size", 12, "sample.batch_size=12 must be a multiple of the 8 devices of the mesh (e.g. 16)"),
    ("sample.guidance_rescale", 1.5, "sample.guidance_rescale=1.5 must be in"),
    ("sample.guidance_interval", (0.6, 0.2), "sample.guidance_interval=(0.6, 0.2) must be (lo, hi)"),
    ("model.num_heads", 3, "model.num_heads=3 must divide"),
    ("model.dtype", "float16", "model.dtype='float16' is not known"),
    ("model.channel_mult", (1, 2, 2, 2, 2), "data.image_size=8 must be divisible by 16 for 5 U-Net levels"),
    ("data.name", "cifar", "data.name='cifar' is not known"),
    ("data.split", "val", "data.split='val' is not known"),
    ("data.image_size", 0, "data.image_size=0 must be >= 1"),
    ("model.num_classes", 12, "model.num_classes=12 but data set 'digits' has 10 classes; set --config.model.num_classes=10"),
    ("eval.reference_split", "val", "eval.reference_split='val' is not known"),
    ("mesh.fsdp", -1, "mesh.data and mesh.fsdp are both -1"),
    ("mesh.data", 0, "mesh.data=0 must be -1 (the remaining devices) or >= 1"),
    ("mesh.fsdp_min_size", -1, "mesh.fsdp_min_size=-1 must be >= 0"),
    ("optimizer.decay", "step", "optimizer.decay='step' is not known"),
    ("optimizer.b1", 1.0, "optimizer.b1=1.0 must be in"),
    ("optimizer.b2", -0.1, "optimizer.b2=-0.1 must be in"),
    ("finetune.online_start", "copy", "finetune.online_start='copy' is not known; set it to 'ema'"),
    ("finetune.optimizer_state", "keep", "finetune.optimizer_state='keep' is not known; set it to 'carry'"),
    ("finetune.sampling_ema", "reset", "finetune.sampling_ema='reset' is not known; set it to 'carry'"),
    ("finetune.decay", "linear", "finetune.decay='linear' is not known; set it to 'cosine' or 'constant'"),
    ("finetune.learning_rate", -1e-4, "finetune.learning_rate=-0.0001 must be >= 0"),
    ("finetune.warmup_steps", -1, "finetune.warmup_steps=-1 must be >= 0"),
])
def test_bad_config_values_are_refused_before_anything_is_written(digits_config, tmp_path, key, value, message):
  config = _tiny(digits_config, **{"mesh.data": -1, key: value})
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_a_fine_tuning_schedule_of_its_own_with_the_runs_schedule_is_refused(digits_config, tmp_path):
  config = _tiny(digits_config, **{"finetune.decay": "run", "finetune.learning_rate": 1e-4})
  with pytest.raises(ConfigError, match=r"finetune.decay='run' trains with optimizer.\*'s schedule over the run, so "
                                        r"finetune.learning_rate=0.0001 and finetune.warmup_steps=0 would be unused"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_zero_terminal_snr_with_eps_prediction_is_refused(digits_config, tmp_path):
  config = _tiny(digits_config, **{"diffusion.zero_terminal_snr": True, "diffusion.prediction": "eps"})
  with pytest.raises(ConfigError, match="zero_terminal_snr=True cannot be used with diffusion.prediction='eps'"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.slow
def test_eval_mode_adds_one_entry_per_setting(trained):
  workdir, get_config = trained
  with open(os.path.join(workdir, "eval", "step_12.json")) as f:
    during_training = json.load(f)
  config = _tiny(get_config, **{"sample.guidance_scale": 2.0})
  result = modes.evaluate_checkpoint(config, workdir)
  with open(os.path.join(workdir, "eval", "step_12.json")) as f:
    saved = json.load(f)
  assert set(saved) == set(during_training) | {"ddim10_cfg2_n20_seed1"}  # the training-time entry is kept
  assert saved["ddim10_cfg2_n20_seed1"] == pytest.approx(result)
  assert saved["ddim10_cfg1_n20_seed1"] == during_training["ddim10_cfg1_n20_seed1"]
  for key in ("fid", "inception_score", "precision", "recall", "class_accuracy", "class_confidence"):
    assert np.isfinite(result[key]) and result[key] >= 0, key
  assert 0 <= result["class_accuracy"] <= 1 and result["num_samples"] == 20 and result["guidance_scale"] == 2.0


@pytest.mark.slow
def test_killed_evaluation_resumes_from_its_chunks_and_gives_the_same_result(trained, tmp_path, monkeypatch):
  from selfperc_jax import generate

  workdir, get_config = trained
  config = _tiny(get_config, **{"eval.num_samples": 40, "sample.batch_size": 8, "eval.save_samples": True,
                                "sample.guidance_scale": 1.5, "sample.guidance_rescale": 0.5})
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  shutil.copytree(workdir, whole)
  shutil.copytree(workdir, killed)
  expected = modes.evaluate_checkpoint(config, whole)

  real_chunks = generate.Generator.chunks
  starts = []

  def dies_after_two_chunks(self, *args, **kwargs):
    for i, chunk in enumerate(real_chunks(self, *args, **kwargs)):
      if i == 2:
        raise KeyboardInterrupt  # as a kill would: the third chunk is drawn but never saved
      yield chunk

  monkeypatch.setattr(generate.Generator, "chunks", dies_after_two_chunks)
  with pytest.raises(KeyboardInterrupt):
    modes.evaluate_checkpoint(config, killed)
  setting = "ddim10_cfg1.5_rescale0.5_n40_seed1"
  partial = os.path.join(killed, "eval", "partial", f"step_12_{setting}_digits")
  assert sorted(os.listdir(partial)) == ["chunk_000000000_000000008.npz", "chunk_000000008_000000016.npz"]

  def records_start(self, params, labels, seed, start=0, **kwargs):
    starts.append(start)
    return real_chunks(self, params, labels, seed, start=start, **kwargs)

  monkeypatch.setattr(generate.Generator, "chunks", records_start)
  resumed = modes.evaluate_checkpoint(config, killed)
  assert starts == [16]  # the two saved chunks were not drawn again
  assert resumed.keys() == expected.keys()
  for key, value in expected.items():
    if isinstance(value, float):
      assert resumed[key] == pytest.approx(value, rel=1e-6), key
  assert not os.path.exists(partial)  # removed once the result is written
  with np.load(resumed["samples"]) as a, np.load(expected["samples"]) as b:
    assert a["arr_0"].shape == (40, 8, 8, 1)
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
  with open(os.path.join(killed, "eval", "step_12.json")) as f:
    assert json.load(f)[setting]["fid"] == pytest.approx(expected["fid"], rel=1e-6)


@pytest.mark.slow
def test_eval_mode_with_inception_features_and_a_reference_file(trained, tmp_path):
  from selfperc_jax.data import digits
  from selfperc_jax.images import to_uint8

  workdir, get_config = trained
  weights, reference = tmp_path / "inception.npz", tmp_path / "ref.npz"
  random_inception_weights(weights)
  np.savez(reference, to_uint8(digits.load("test")[0][:16]))
  config = _tiny(get_config, **{"eval.features": "inception", "eval.inception_weights": str(weights),
                                "eval.reference": str(reference), "eval.num_samples": 10})
  result = modes.evaluate_checkpoint(config, workdir)
  assert np.isfinite(result["fid"]) and result["fid"] > 0 and "class_accuracy" not in result
  with pytest.raises(ConfigError, match="eval.features='clip' is not known"):
    modes.evaluate_checkpoint(_tiny(get_config, **{"eval.features": "clip"}), workdir)
