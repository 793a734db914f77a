"""Gradient descent: ``p <- p - lr * g``."""
from typing import Any

from . import struct
from .elementwise import Rule
from .flat import FlatOptimizerDef, check_kinds, f32


@struct.dataclass
class _GradientDescentHyperParams:
  learning_rate: Any


def _sgd(xp, s, q, p, g):
  del xp, q
  return p - s.lr * g, ()


SGD_RULE = Rule("sgd", _sgd, ("lr",), n_state=0)


class GradientDescent(FlatOptimizerDef):
  """Gradient descent optimizer (no state)."""

  def __init__(self, learning_rate=None, *, backend="auto", master_weights=False,
               state_dtype=None, stochastic_rounding=False, rounding_seed=0):
    super().__init__(_GradientDescentHyperParams(learning_rate), backend,
                     master_weights=master_weights,
                     state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding,
                     rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, "learning_rate")

  def rule(self, hp):
    return SGD_RULE

  def scalars(self, hp, step):
    return {"lr": f32(hp.learning_rate)}
