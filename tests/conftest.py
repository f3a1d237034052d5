"""Test harness: 8 simulated CPU devices (set before JAX is imported), quiet TensorFlow, shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the session, shared with the processes the tests start: many tests compile
# the same tiny-config steps. (The executables are the same; only the compile time is saved.)
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="selfperc_jax_test_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


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
