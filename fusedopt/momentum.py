"""Momentum (heavy ball or Nesterov) with L2 weight decay added to the gradient.

    g <- g + wd * p;   m <- beta * m + g;   d = g + beta * m  (nesterov)  or  m;   p <- p - lr * d
"""
import functools
from typing import Any

from . import struct
from .elementwise import Rule
from .flat import FlatOptimizerDef, check_kinds, check_range, f32
from .flat_state import ParamState, param_state


@struct.dataclass
class _MomentumHyperParams:
  learning_rate: Any
  beta: Any
  weight_decay: Any
  nesterov: bool


@param_state
class _MomentumParamState(ParamState):
  """Momentum's per-parameter state (flax 0.5.3's fields)."""
  momentum: Any


@functools.lru_cache(maxsize=None)
def momentum_rule(nesterov: bool) -> Rule:
  def fn(xp, s, q, p, g, m):
    del xp, q
    # flax adds wd*p only when wd != 0; adding 0*p is the same number for finite p, and keeps
    # weight_decay a runtime value (no recompile when it changes).
    g = g + s.wd * p
    m = s.beta * m + g
    d = g + s.beta * m if nesterov else m
    return p - s.lr * d, (m,)
  return Rule("momentum_nesterov" if nesterov else "momentum", fn, ("lr", "beta", "wd"), 1)


class Momentum(FlatOptimizerDef):
  """Momentum optimizer. State: ``momentum``."""
  state_fields = ("momentum",)
  param_state_class = _MomentumParamState

  def __init__(self, learning_rate=None, beta=0.9, weight_decay=0, nesterov=False, *,
               backend="auto", master_weights=False,
               state_dtype=None, stochastic_rounding=False, rounding_seed=0):
    super().__init__(_MomentumHyperParams(learning_rate, beta, weight_decay, nesterov), backend,
                     master_weights=master_weights,
                     state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding,
                     rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, "learning_rate", "beta", "weight_decay")

  def validate(self, hp):
    check_range(hp, "learning_rate", 0.0)
    check_range(hp, "beta", 0.0, 1.0)
    check_range(hp, "weight_decay", 0.0)

  def rule(self, hp):
    return momentum_rule(bool(hp.nesterov))

  def scalars(self, hp, step):
    return {"lr": f32(hp.learning_rate), "beta": f32(hp.beta), "wd": f32(hp.weight_decay)}
