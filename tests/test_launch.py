"""launch/: the shell scripts parse and start the documented command, the README shows the same commands, and the
Colab notebook is valid and refers only to modules, functions, files and config keys that exist."""

import ast
import importlib
import os
import re
import shlex
import subprocess

import pytest

from conftest import REPO, load_config

README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
  match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
  assert match, f"README has no '## {title}' section"
  return match.group(1)


def _config_key_exists(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def _check_main_command(words: list[str]) -> None:
  """A `python -m selfperc_jax.main ...` command line: its config file and argument exist, every --config.key too."""
  config_arg = next(w.split("=", 1)[1] for w in words if w.startswith("--config="))
  path, _, arg = config_arg.partition(":")
  assert (REPO / path).exists(), path
  config = load_config(os.path.basename(path)[:-3], arg)
  for word in words:
    if word.startswith("--config."):
      key = word[len("--config."):].split("=", 1)[0]
      assert _config_key_exists(config, key), f"{config_arg} has no key {key}"


@pytest.mark.parametrize("script", ["tpu_vm.sh", "gpu_slurm.sh"])
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", str(REPO / "launch" / script)], check=True)


def test_tpu_script_creates_installs_and_starts_the_same_command_on_all_workers():
  env = dict(os.environ, DRY_RUN="1", TPU_NAME="sp-test", ZONE="us-central2-b", WORKDIR="gs://bucket/run",
             DATA_BUCKET="bucket", DATA_PATH="tensorflow_datasets")
  out = subprocess.run(["bash", str(REPO / "launch" / "tpu_vm.sh"), "--config.batch_size=512"], env=env,
                       capture_output=True, text=True, check=True).stdout
  lines = [line for line in out.splitlines() if line.startswith("gcloud")]
  assert any("tpus tpu-vm create sp-test" in line and "--accelerator-type=v4-32" in line for line in lines)
  ssh = [line for line in lines if "tpu-vm ssh" in line]
  assert ssh and all("--worker=all" in line for line in ssh)
  command = shlex.split(shlex.split(ssh[-1])[-1].split("--command=", 1)[-1])
  start = command.index("selfperc_jax.main")
  words = command[start + 1:]
  assert command[start - 1] == "-m" and "--workdir=gs://bucket/run" in words and "--distributed=on" in words
  assert "--config=configs/imagenet256.py" in words and "--config.batch_size=512" in words
  assert "--config.data.dir=/tmp/tfds" in words  # the gcsfuse mount point
  _check_main_command([w for w in words if w != ">"])


def test_gpu_script_runs_one_process_per_gpu_with_the_gpu_config():
  text = (REPO / "launch" / "gpu_slurm.sh").read_text()
  assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
  # near the time limit: SIGTERM to the training step (checkpoint), then requeue
  assert "#SBATCH --signal=B:USR1@300" in text and "trap on_time_limit USR1" in text
  assert 'scancel --signal=TERM "$SLURM_JOB_ID.0"' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
  assert 'CONFIG="${CONFIG:-configs/imagenet256.py:gpu}"' in text
  srun = re.search(r"srun .*?-m selfperc_jax\.main (.*?)\"\$@\"", text, re.S).group(1)
  words = shlex.split(srun.replace("\\\n", " ").replace('"$CONFIG"', "configs/imagenet256.py:gpu"))
  _check_main_command(words)


def test_readme_sections_use_the_scripts_as_they_are():
  tpu, gpu = _section("Training on Cloud TPU"), _section("Training on GPUs")
  assert "launch/tpu_vm.sh" in tpu and "sbatch" in gpu and "launch/gpu_slurm.sh" in gpu
  script = (REPO / "launch" / "tpu_vm.sh").read_text()
  for var in re.findall(r'\$\{(\w+):\?', script):  # the variables the script requires are all set in the README
    assert f"{var}=" in tpu, var
  assert "WORKDIR=" in gpu and "DATA_DIR=" in gpu
  for block in re.findall(r"```bash\n(.*?)```", tpu + gpu, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      if "selfperc_jax.main" in line:
        _check_main_command(shlex.split(line.split("#")[0]))


# --- the Colab notebook -----------------------------------------------------------------------------------------


def _notebook():
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(str(REPO / "launch" / "colab_tpu_demo.ipynb"), as_version=4)
  nbformat.validate(nb)
  return nb


def _python_of(cell_source: str) -> str:
  """The cell with IPython's shell (!) and magic (%) lines replaced by `pass` (at the same indentation)."""
  lines = cell_source.splitlines()
  return "\n".join(line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("!", "%")) else line
                   for line in lines)


def _attribute_chain(node) -> list[str] | None:
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def test_notebook_is_valid_and_refers_only_to_what_exists():
  nb = _notebook()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and any("train_and_evaluate" in c.source for c in code)
  config = load_config("digits")
  imported, config_files, keys = {}, [], set()
  for cell in code:
    tree = ast.parse(_python_of(cell.source))
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "selfperc_jax":
        for alias in node.names:
          module = importlib.import_module(node.module)
          value = getattr(module, alias.name, None) or importlib.import_module(f"{node.module}.{alias.name}")
          imported[alias.asname or alias.name] = value
      elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "spec_from_file_location":
        config_files.append(node.args[1].value)
      elif isinstance(node, ast.Attribute):
        chain = _attribute_chain(node)
        if chain and chain[0] in imported:
          assert hasattr(imported[chain[0]], chain[1]), ".".join(chain[:2])
        if chain and chain[0] == "config" and len(chain) > 1:
          keys.add(".".join(chain[1:]))
  assert "train" in imported and config_files == ["configs/digits.py"]
  assert all((REPO / f).exists() for f in config_files)
  assert keys, "the notebook sets config values"
  for key in keys:
    assert _config_key_exists(config, key), f"configs/digits.py has no key {key}"


@pytest.mark.parametrize("training_exit,requeued", [(75, True), (143, True), (0, False), (1, False), (2, False)],
                         ids=["stopped-with-checkpoint", "killed-by-srun", "finished", "failed", "error-line"])
def test_gpu_script_requeues_only_a_run_that_stopped_to_be_resumed(tmp_path, training_exit, requeued):
  """Near the time limit (USR1) the script sends SIGTERM to the training step; it requeues the job when the training
  stopped to be resumed (75, or killed by a signal on the way out) and not when it finished (0) or failed (1, 2),
  and exits with the training's own code."""
  import signal
  import time

  bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
  bin_dir.mkdir()
  stubs = {  # srun: a training step that exits with `training_exit` on SIGTERM; scancel signals it
      "srun": f"echo $$ > {tmp_path}/srun.pid; trap 'kill $!; exit {training_exit}' TERM; sleep 30 >/dev/null 2>&1 & wait",
      "scancel": f'echo "scancel $*" >> {log}; kill -TERM "$(cat {tmp_path}/srun.pid)"',
      "scontrol": f'echo "scontrol $*" >> {log}',
  }
  for name, body in stubs.items():
    (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", WORKDIR=str(tmp_path / "w"), SLURM_JOB_ID="42",
             SLURM_SUBMIT_DIR=str(REPO))
  proc = subprocess.Popen(["bash", str(REPO / "launch" / "gpu_slurm.sh")], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 20
  while not (tmp_path / "srun.pid").exists() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGUSR1)
  out = proc.communicate(timeout=30)[0]
  calls = log.read_text().splitlines()
  assert calls[0] == "scancel --signal=TERM 42.0", out
  assert ("scontrol requeue 42" in calls) == requeued, out
  assert proc.returncode == training_exit, out
