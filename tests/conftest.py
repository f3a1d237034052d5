"""Test harness: 8 simulated CPU devices (set before JAX is imported), quiet TensorFlow, shared fixtures."""

import os

# The suite is bound by XLA:CPU compile time (tiny models, a few steps each). Without LLVM's optimisations a step
# compiles about a third faster and runs a little slower, with the same loss to the last digit; without XLA:CPU's
# fusion emitters (2026-11-30, jax 0.10.2) the tiny config's train step compiles in 4-5 s instead of 6-8 s, and the
# fast subset from an empty cache took 101 s instead of 114. A good trade for tests, never for training (main sets
# no such flag).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                           " --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache, kept between runs in .pytest_cache/ (git-ignored) and shared with the processes
# the tests start: within a run many tests compile the same tiny-config programs, and in an edit-test loop the next
# run compiles only the programs the edit changed (README gives the fast subset's times both ways). An entry's key is the program itself with the compile options, XLA flags and jaxlib
# version, so a stale entry is never hit; the folder is emptied once it passes 512 MiB. A JAX_COMPILATION_CACHE_DIR
# set by the caller is used instead (CI's clean clone starts with an empty cache either way).
import pathlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402


def _compilation_cache() -> str:
  """The kept folder, emptied past 512 MiB; a fresh temporary one (removed at exit) where the repo is read-only."""
  folder = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"
  try:
    size = 0
    for entry in (folder.iterdir() if folder.is_dir() else ()):
      try:
        size += entry.stat().st_size
      except FileNotFoundError:  # removed meanwhile by another test session
        pass
    if size > 512 << 20:
      shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)
  except OSError:
    import atexit
    import tempfile

    temporary = tempfile.mkdtemp(prefix="selfperc_jax_test_cache_")
    atexit.register(shutil.rmtree, temporary, ignore_errors=True)
    return temporary


if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _compilation_cache()
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# The digits classifier (the digits evaluations' feature network) is trained once for the whole run and its worker
# and child processes, kept beside the compilation cache (selfperc_jax/evaluation/digits_classifier.py).
os.environ.setdefault("SELFPERC_JAX_CACHE", os.path.join(os.path.dirname(os.environ["JAX_COMPILATION_CACHE_DIR"]),
                                                         "selfperc_jax_cache"))

# Where PYTHONDONTWRITEBYTECODE is set (many container images set it), the bytecode of the modules collection imports
# is still kept (`__pycache__/`, git-ignored), until collection ends: pytest would otherwise rewrite the asserts of
# every test module again at every start of every worker (BENCHMARKS.md, "The tests' own speed").
_DONT_WRITE_BYTECODE = sys.dont_write_bytecode
sys.dont_write_bytecode = False

import pytest  # noqa: E402


def _keep_loaded_programs(size: int = 64) -> None:
  """The persistent cache's programs, once loaded (or compiled) in a test process, are kept loaded (the last `size`)
  for the next identical program, which the tests build again and again (every run of a config traces and looks up
  the same steps) and would otherwise deserialise again (BENCHMARKS.md, "Later on 2026-12-01"). An entry's key is the
  cache's own (the program, its devices, compile options and flags). Skipped if JAX's cache functions are not where
  they were."""
  import collections

  from jax._src import compilation_cache as cache

  get, put = getattr(cache, "get_executable_and_time", None), getattr(cache, "put_executable_and_time", None)
  if get is None or put is None or os.environ.get("SELFPERC_JAX_TEST_RELOAD_PROGRAMS"):
    return
  kept = collections.OrderedDict()

  def keep(key, value):
    kept[key] = value
    kept.move_to_end(key)
    while len(kept) > size:
      kept.popitem(last=False)

  def get_kept(cache_key, *args, **kwargs):
    value = kept.get(cache_key) or get(cache_key, *args, **kwargs)
    if value[0] is not None:
      keep(cache_key, value)
    return value

  def put_kept(cache_key, module_name, executable, backend, compile_time, *args, **kwargs):
    put(cache_key, module_name, executable, backend, compile_time, *args, **kwargs)
    keep(cache_key, (executable, compile_time))

  cache.get_executable_and_time, cache.put_executable_and_time = get_kept, put_kept


def _keep_traced_layouts() -> None:
  """weights_io.variable_shapes (the variables a network's init makes, traced by jax.eval_shape: seconds for the
  full-size SD U-Net, VAE and Inception networks whose layouts the converters check) kept on disk beside the digits
  classifier for the other processes and the next run. An entry's key is the module's repr (every field, the
  config's included), the input shape, the source of third_party/ and of the one selfperc_jax module it imports, and
  the JAX and Flax versions: an edit to a network traces it again. 5 s of the fast subset's 57 in one process
  (BENCHMARKS.md, "2026-12-02, evening")."""
  import functools
  import hashlib
  import pickle

  import flax
  import jax

  from third_party import weights_io

  trace = weights_io.variable_shapes.__wrapped__
  sources = sorted((REPO / "third_party").rglob("*.py")) + [REPO / "selfperc_jax" / "errors.py"]
  code = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + f"{jax.__version__} {flax.__version__}".encode())

  @functools.lru_cache(maxsize=8)  # as the original: an equal module gets the same (shared, read-only) tree
  def variable_shapes(module, input_shape):
    key = code.copy()
    key.update(f"{module!r} {tuple(input_shape)}".encode())
    folder = pathlib.Path(os.environ["SELFPERC_JAX_CACHE"]) / "variable_shapes"
    path = folder / f"{key.hexdigest()[:32]}.pkl"
    try:
      return pickle.loads(path.read_bytes())
    except Exception:  # not kept yet (or half a file from a killed run): traced, as without the harness
      shapes = trace(module, input_shape)
    try:
      folder.mkdir(parents=True, exist_ok=True)
      partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
      partial.write_bytes(pickle.dumps(shapes))
      os.replace(partial, path)  # atomic: another worker never reads half a file
    except OSError:
      pass
    return shapes

  weights_io.variable_shapes = variable_shapes


def pytest_configure(config):
  """Every process that runs tests keeps its loaded programs and its traced layouts; the controller of `-n auto`
  runs none, and does not import JAX at all (about 1.5 s of CPU beside the workers' start). The controller hands out
  the files in the order the workers collected them."""
  if not (getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput")):
    _keep_loaded_programs()
    _keep_traced_layouts()
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False  # the files' order is pytest_collection_modifyitems'


REPO = pathlib.Path(__file__).resolve().parents[1]


def device_array(a, dtype="float32"):
  """`a` as a JAX array of `dtype`, converted by NumPy and copied to the device: `jnp.asarray(a, dtype)` of a NumPy
  array compiles a conversion program for every new shape (about 12 ms each on CPU, BENCHMARKS.md), which the tests'
  many parameter trees of many shapes paid again and again."""
  import jax
  import numpy as np

  return jax.device_put(np.asarray(a, dtype))


DURATIONS = pathlib.Path(__file__).with_name("durations.json")


def longest_files_first(tests, seconds: dict) -> list[int]:
  """The order (indices into `tests`, a list of (node id, is slow)) that runs the longest files first, each file's
  tests in their own order. A file's length is the sum of its tests' seconds; a test missing from `seconds`
  counts 0 if its file is there (pytest hides durations under 5 ms) and the median test of its kind (slow or not)
  otherwise (a new file)."""
  import statistics

  def file(nodeid):
    return nodeid.split("::")[0]

  known_files = {file(nodeid) for nodeid in seconds}
  median = {}
  for kind in (True, False):
    values = [seconds[nodeid] for nodeid, slow in tests if slow == kind and nodeid in seconds]
    median[kind] = statistics.median(values) if values else (2.0 if kind else 0.1)
  length = {}
  for nodeid, slow in tests:
    default = 0.0 if file(nodeid) in known_files else median[slow]
    length[file(nodeid)] = length.get(file(nodeid), 0.0) + seconds.get(nodeid, default)
  return sorted(range(len(tests)), key=lambda i: (-length[file(tests[i][0])], i))


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: the files are weighed by the tests that will run
def pytest_collection_modifyitems(session, config, items):
  """With `--dist loadfile` a worker takes a whole file at a time, in the order collected here (xdist's own
  reordering by count of tests is off, pytest_configure): the longest files first, by tests/durations.json (a whole
  run from an empty compilation cache, written by tests/write_durations.py), so they start early instead of ending
  the run alone."""
  import json

  seconds = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
  tests = [(item.nodeid, item.get_closest_marker("slow") is not None) for item in items]
  items[:] = [items[i] for i in longest_files_first(tests, seconds)]


def pytest_collection_finish(session):
  """Collection leaves a large heap that lives to the end (every module, test item and JAX's own structures), which
  Python's collector walked again at every full collection while JAX traced: frozen out of its reach, and with the
  youngest generation collected every 10,000 allocations instead of 700 (BENCHMARKS.md, "The tests' own speed").
  Bytecode is written again only if the environment allows it."""
  import gc

  sys.dont_write_bytecode = _DONT_WRITE_BYTECODE
  gc.collect()
  gc.freeze()
  gc.set_threshold(10_000, 10, 10)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
  """An xdist worker ends here, once its results are with the controller (sent at its session's finish) and every
  other unconfigure hook has run: tearing down its interpreter (JAX clears its caches and destroys every loaded
  executable) would only delay the end of the run (BENCHMARKS.md, "The tests' own speed")."""
  if hasattr(config, "workerinput"):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: the suite also runs without xdist (`-p no:xdist`)
def pytest_xdist_auto_num_workers(config):
  """`-n auto` (README's test command): one worker per core, at most 4. The tests compile on one core each, so two
  workers on CI's two cores halve the wall time; past 4, each worker's 8 simulated devices and the 2-process tests'
  extra processes would cost more memory than the time they save."""
  return max(1, min(4, len(os.sched_getaffinity(0))))


def subprocess_env(devices: int) -> dict:
  """The environment of a process a test starts: conftest's compile flags (the processes compile the same programs,
  and share the session's compilation cache), with `devices` simulated CPU devices."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = os.environ["XLA_FLAGS"].replace("device_count=8", f"device_count={devices}")
  return env


def start_two_processes(module: str, args: list[str], devices_each: int = 4):
  """`python -m module *args` as the two processes of one JAX distributed run on this host (a pod slice of two
  hosts in miniature), with a coordinator on a free local port; output merged into stdout (text)."""
  import socket
  import subprocess

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return [subprocess.Popen([sys.executable, "-m", module, *args, f"--coordinator_address=127.0.0.1:{port}",
                            "--num_processes=2", f"--process_id={i}"], cwd=REPO, env=subprocess_env(devices_each),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def load_config(name: str, arg: str = ""):
  """configs/<name>.py's get_config(arg), loaded from the file as main does."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def override(config, **values):
  """Sets dotted keys in place, e.g. override(config, **{"model.base_channels": 8}); returns the config."""
  from selfperc_jax import config_tree

  return config_tree.set_values(config, values)


@pytest.fixture
def digits_config():
  """A loader for configs/digits.py with an argument, e.g. digits_config('tiny')."""
  return lambda arg="": load_config("digits", arg)


def random_inception_weights(path):
  """A FID Inception weights file in the PyTorch layout (flat names), made from randomly initialised Flax
  variables: made once for the whole run (and its workers) beside the digits classifier, then copied."""
  import hashlib

  import jax

  code = b"".join((REPO / "third_party" / "fid_inception" / f).read_bytes() for f in ("model.py", "convert.py"))
  key = hashlib.sha256(code + jax.__version__.encode()).hexdigest()[:16]  # another network: another file
  made = pathlib.Path(os.environ["SELFPERC_JAX_CACHE"]) / f"random_inception_weights_{key}.npz"
  if not made.exists():
    made.parent.mkdir(parents=True, exist_ok=True)
    partial = made.with_name(f"{made.stem}.{os.getpid()}.npz")
    _write_random_inception_weights(partial)
    os.replace(partial, made)  # atomic: a worker reading it never sees half a file
  shutil.copyfile(made, path)


def _write_random_inception_weights(path):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import traverse_util

  from third_party.fid_inception import convert, model

  variables = jax.jit(model.InceptionV3().init)(jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
  flat = {c: traverse_util.flatten_dict(jax.device_get(variables[c])) for c in ("params", "batch_stats")}
  state = {}
  for name, entry in convert._layout().items():
    value = np.asarray(flat[entry.collection][entry.path])
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif value.ndim == 2:
      value = value.T
    state[name] = value
  np.savez(path, **state)


# A tiny ImageNet: fake ILSVRC-2012 archives (synthetic JPEGs in the real tar layout), NUM_SYNSETS classes.
NUM_SYNSETS, PER_SYNSET = 4, 6


def _image(k: int, j: int):
  """Class k's j-th image: brightness 40 * (k + 1) on the left half, black on the right; sizes vary."""
  import numpy as np

  h, w = 40 + 8 * j, 64 - 4 * j
  a = np.zeros((h, w, 3), np.uint8)
  a[:, : w // 2] = 40 * (k + 1)
  return a


def write_ilsvrc_archives(manual_dir):
  from benchmarks import fake_imagenet

  return fake_imagenet.write_archives(manual_dir, NUM_SYNSETS, PER_SYNSET, _image)


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory):
  """The TFDS data directory of a prepared tiny ImageNet (array_record), made by the project's prepare command."""
  from selfperc_jax.data import imagenet

  root = tmp_path_factory.mktemp("imagenet")
  write_ilsvrc_archives(root / "manual")
  assert imagenet.main(["--manual_dir", str(root / "manual"), "--data_dir", str(root / "tfds")]) == 0
  return str(root / "tfds")


def write_random_vae(path, vae_config, seed: int = 0):
  """A diffusers-layout .safetensors of Stable Diffusion's VAE layout at vae_config's size, seeded random weights."""
  from benchmarks import fake_vae

  return fake_vae.write_random_vae(path, vae_config, seed)


def seeded_weights(shapes: dict, seed: int) -> dict:
  """The parity fixtures' weight rule (third_party/*/parity/make_fixture.py, written again here): one PCG64 stream over
  the sorted keys; conv / linear weights N(0, 1) / sqrt(fan_in), other weights (GroupNorm, LayerNorm) 1 + 0.1 N(0, 1),
  biases 0.1 N(0, 1). Returned in the order of `shapes` (diffusers' order)."""
  import math

  import numpy as np

  rng = np.random.default_rng(seed)
  out = {}
  for key in sorted(shapes):
    shape = shapes[key]
    if key.endswith(".weight") and len(shape) >= 2:
      value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
    elif key.endswith(".weight"):
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    out[key] = value.astype(np.float32)
  return {k: out[k] for k in shapes}


def parity_fixture(folder) -> dict:
  """The arrays of a port's parity fixture (third_party/<port>/parity/fixture.npz)."""
  import numpy as np

  with np.load(pathlib.Path(folder) / "fixture.npz") as data:
    return {k: data[k] for k in data.files}


def parity_weights(fixture: dict, name: str) -> tuple[dict, dict]:
  """(shapes, weights) of the fixture's network `name`: its state-dict layout and the seeded weights, checked to be
  the ones the reference implementation had, bit for bit (their stored sums)."""
  import json

  import numpy as np

  shapes = {k: tuple(v) for k, v in json.loads(str(fixture[f"{name}/layout_json"])).items()}
  weights = seeded_weights(shapes, int(fixture[f"{name}/seed"]))
  sums = np.array([weights[k].astype(np.float64).sum() for k in sorted(weights)])
  np.testing.assert_array_equal(sums, fixture[f"{name}/weight_sums"])
  return shapes, weights


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
  """benchmarks/fake_sd.py's small Stable Diffusion folder (seeded: the one the pipeline parity fixture was made
  from), written once per test process."""
  from benchmarks import fake_sd

  return fake_sd.write_folder(str(tmp_path_factory.mktemp("sd_folder")))
