"""The test harness itself: the order the files run in (tests/conftest.py) and the durations it is read from."""

import importlib.util

import pytest

from conftest import REPO, longest_files_first


def _write_durations():
  spec = importlib.util.spec_from_file_location("write_durations", REPO / "tests" / "write_durations.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_longest_files_run_first_each_in_its_own_order():
  tests = [("tests/test_a.py::one", False), ("tests/test_a.py::two", True), ("tests/test_b.py::one", False),
           ("tests/test_b.py::two", False), ("tests/test_new.py::one", True), ("tests/test_c.py::one", False)]
  seconds = {"tests/test_a.py::one": 1.0, "tests/test_a.py::two": 2.0, "tests/test_b.py::one": 5.0,
             "tests/test_c.py::zero": 0.5}
  order = longest_files_first(tests, seconds)
  # b 5 s (its second test hidden under 5 ms: 0), a 3 s, new: the median slow test (2 s), c 0 s (known file).
  assert [tests[i][0] for i in order] == ["tests/test_b.py::one", "tests/test_b.py::two", "tests/test_a.py::one",
                                         "tests/test_a.py::two", "tests/test_new.py::one", "tests/test_c.py::one"]
  # Without durations every file counts its tests at the defaults: the one with a slow test first.
  order = longest_files_first(tests, {})
  assert [tests[i][0].split("::")[0] for i in order] == ["tests/test_a.py", "tests/test_a.py", "tests/test_new.py",
                                                         "tests/test_b.py", "tests/test_b.py", "tests/test_c.py"]


def test_durations_are_summed_over_setup_call_and_teardown_from_pytests_lines():
  lines = ["============ slowest durations ============",
           "3.50s call     tests/test_x.py::test_one[a-b]",
           "1.25s setup    tests/test_x.py::test_one[a-b]",
           "0.01s teardown tests/test_x.py::test_one[a-b]",
           "0.40s call     tests/test_y.py::test_two",
           "(412 durations < 0.005s hidden.  Use -vv to show these durations.)",
           "807 passed in 12.00s"]
  assert _write_durations().durations(lines) == {"tests/test_x.py::test_one[a-b]": 4.76,
                                                 "tests/test_y.py::test_two": 0.4}


def test_output_without_durations_is_refused_with_what_to_do(tmp_path, capsys):
  run = tmp_path / "run.txt"
  run.write_text("807 passed in 12.00s\n")
  with pytest.raises(SystemExit) as exit:
    _write_durations().main(["write_durations.py", str(run)])
  assert str(exit.value).startswith("error: no '--durations=0' lines") and "--durations=0" in str(exit.value)


def test_xdist_hands_out_the_files_in_the_collected_order(pytestconfig):
  if not hasattr(pytestconfig.option, "loadscopereorder"):
    pytest.skip("pytest-xdist is not installed or not loaded (-p no:xdist)")
  assert pytestconfig.option.loadscopereorder is False


def test_traced_layouts_are_kept_on_disk_and_an_edited_module_is_traced_again(tmp_path, monkeypatch):
  """conftest's weights_io.variable_shapes: a layout traced once is read back (no trace) after the in-process memory
  is cleared, as another worker or the next run would; a module with another field is traced."""
  import flax.linen as nn
  import jax

  from third_party import weights_io

  monkeypatch.setenv("SELFPERC_JAX_CACHE", str(tmp_path))
  shapes = weights_io.variable_shapes(nn.Dense(features=3), (2, 5))
  assert jax.tree.map(lambda s: s.shape, shapes) == {"params": {"kernel": (5, 3), "bias": (3,)}}
  assert len(list((tmp_path / "variable_shapes").glob("*.pkl"))) == 1
  weights_io.variable_shapes.cache_clear()
  traced = []
  monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: traced.append(a) or pytest.fail("traced again"))
  again = weights_io.variable_shapes(nn.Dense(features=3), (2, 5))
  assert again is not shapes and jax.tree.map(lambda s: s.shape, again) == jax.tree.map(lambda s: s.shape, shapes)
  monkeypatch.undo()
  monkeypatch.setenv("SELFPERC_JAX_CACHE", str(tmp_path))
  other = weights_io.variable_shapes(nn.Dense(features=4), (2, 5))
  assert other["params"]["kernel"].shape == (5, 4)
  assert len(list((tmp_path / "variable_shapes").glob("*.pkl"))) == 2
