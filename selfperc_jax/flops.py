"""Analytic FLOP counts from a function's jaxpr: 2 x multiply-adds of every convolution and matrix product.

This counts what the math needs, independently of how XLA compiles it, so it can be set against XLA's own
`compiled.cost_analysis()` (which also counts elementwise work and whatever the compiler adds or removes).
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core

# Dense bf16 peak FLOP/s per chip (vendor figures), for MFU.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
}


def peak_flops(device) -> float | None:
  """The device's dense bf16 peak FLOP/s, or None when it is not in PEAK_FLOPS (e.g. a CPU)."""
  kind = getattr(device, "device_kind", "")
  for name, value in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return value
  return None


def lowered_flops(lowered) -> float | None:
  """XLA's FLOP count of a lowered (not yet partitioned) program: the whole computation over all devices."""
  try:
    cost = lowered.cost_analysis()
  except Exception:  # not every backend offers it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  value = (cost or {}).get("flops")
  return float(value) if value and value > 0 else None


def _conv_flops(eqn) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  dn = eqn.params["dimension_numbers"]
  kernel_spatial = math.prod(rhs.shape[i] for i in dn.rhs_spec[2:])
  in_features = rhs.shape[dn.rhs_spec[1]]  # already divided by feature_group_count
  return 2 * math.prod(out.shape) * kernel_spatial * in_features


def _dot_flops(eqn) -> int:
  lhs = eqn.invars[0].aval
  out = eqn.outvars[0].aval
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  return 2 * math.prod(out.shape) * math.prod(lhs.shape[i] for i in lhs_contract)


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jex_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jex_core.Jaxpr):
        yield v


def jaxpr_matmul_flops(jaxpr) -> int:
  """FLOPs of the convolutions and dot products of a jaxpr, nested calls included (loops counted once)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "dot_general":
      total += _dot_flops(eqn)
    for sub in _sub_jaxprs(eqn):
      total += jaxpr_matmul_flops(sub)
  return total


def matmul_flops(fn, *args, **kwargs) -> int:
  """Analytic FLOPs of fn(*args, **kwargs): convolutions and matrix products only."""
  return jaxpr_matmul_flops(jax.make_jaxpr(fn, **kwargs)(*args).jaxpr)
