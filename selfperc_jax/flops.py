"""Analytic FLOP counts from a function's jaxpr: 2 x multiply-adds of every convolution and matrix product.

This counts what the math needs, independently of how XLA compiles it, so it can be set against XLA's own
`compiled.cost_analysis()` (which also counts elementwise work and whatever the compiler adds or removes).
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core


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
