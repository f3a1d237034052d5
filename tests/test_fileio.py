"""Workdir I/O that works on local disk and in buckets: URLs are kept, writes are whole-file, appends survive the
bucket path (no native append there)."""

import os

import numpy as np

from selfperc_jax import fileio


def test_resolve_keeps_bucket_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  assert fileio.resolve("gs://bucket/runs/a") == "gs://bucket/runs/a"
  assert fileio.join("gs://bucket/runs/a", "checkpoints") == "gs://bucket/runs/a/checkpoints"
  monkeypatch.chdir(tmp_path)
  assert fileio.resolve("runs/a") == str(tmp_path / "runs" / "a")
  assert fileio.resolve("~/x") == os.path.join(os.path.expanduser("~"), "x")


def test_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
  path = str(tmp_path / "d" / "f.json")
  fileio.makedirs(os.path.dirname(path))
  fileio.write_text(path, "first")
  fileio.write_text(path, "second")
  assert fileio.read_text(path) == "second" and os.listdir(tmp_path / "d") == ["f.json"]
  fileio.savez(str(tmp_path / "a.npz"), np.arange(3), labels=np.ones(2))
  with fileio.load_npz(str(tmp_path / "a.npz")) as f:
    np.testing.assert_array_equal(f["arr_0"], np.arange(3))
    np.testing.assert_array_equal(f["labels"], np.ones(2))


def test_append_on_the_bucket_path_equals_a_local_append(tmp_path, monkeypatch):
  local, remote = str(tmp_path / "local.jsonl"), str(tmp_path / "remote.jsonl")
  for line in ("a\n", "b\n", "c\n"):
    fileio.append_text(local, line)
  monkeypatch.setattr(fileio, "is_remote", lambda path: True)  # take the read-and-rewrite path on local disk
  for line in ("a\n", "b\n", "c\n"):
    fileio.append_text(remote, line)
  assert fileio.read_text(remote) == fileio.read_text(local) == "a\nb\nc\n"
