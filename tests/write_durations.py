"""Writes tests/durations.json, the seconds of each test that tests/conftest.py orders the files by, from the output of
a whole run with every test's duration:

  JAX_COMPILATION_CACHE_DIR=$(mktemp -d) SELFPERC_JAX_CACHE=$(mktemp -d) \\
    .venv/bin/python -m pytest -q -n auto --dist loadfile --durations=0 > run.txt
  .venv/bin/python tests/write_durations.py run.txt

From an empty compilation cache, as CI runs. Only the order of the files depends on it: a stale or missing entry
costs time, never a result.
"""

import json
import pathlib
import re
import sys

LINE = re.compile(r"^([0-9.]+)s (?:setup|call|teardown)\s+(\S+)$")


def durations(lines) -> dict[str, float]:
  """{test node id: seconds of its setup, call and teardown} from pytest's `--durations=0` lines."""
  seconds = {}
  for line in lines:
    match = LINE.match(line.strip())
    if match:
      seconds[match.group(2)] = seconds.get(match.group(2), 0.0) + float(match.group(1))
  return {test: round(value, 2) for test, value in sorted(seconds.items())}


def main(argv):
  if len(argv) != 2:
    sys.exit("usage: python tests/write_durations.py RUN_OUTPUT (pytest ... --durations=0 > RUN_OUTPUT)")
  seconds = durations(pathlib.Path(argv[1]).read_text().splitlines())
  if not seconds:
    sys.exit(f"error: no '--durations=0' lines in {argv[1]}: run pytest with --durations=0 and give its output")
  path = pathlib.Path(__file__).with_name("durations.json")
  path.write_text(json.dumps(seconds, indent=0) + "\n")
  print(f"{path}: {len(seconds)} tests, {sum(seconds.values()):.0f} s")


if __name__ == "__main__":
  main(sys.argv)
