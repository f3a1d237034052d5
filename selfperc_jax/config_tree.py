"""Dotted config keys ('model.base_channels'): reading and setting them in a ConfigDict or a nested dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def lookup(tree, dotted: str):
  """The value at a dotted key of a ConfigDict or nested dict, or None where the key is absent."""
  node = tree
  for part in dotted.split("."):
    if not hasattr(node, "get"):
      return None
    node = node.get(part)
    if node is None:
      return None
  return node


def set_values(config, values: Mapping[str, Any]):
  """Sets dotted keys in place, e.g. set_values(config, {"model.base_channels": 8}); returns the config.

  Every parent must exist (a misspelt key fails, as with --config. flags)."""
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config
