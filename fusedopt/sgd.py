"""Gradient descent: ``p <- p - lr * g``."""
from typing import Any

from . import struct
from .elementwise import Rule
from .flat import FlatOptimizerDef, check_kinds, f32
from .flat_state import ParamState, param_state


@struct.dataclass
class _GradientDescentHyperParams:
  learning_rate: Any


@param_state
class _GradientDescentMasterState(ParamState):
  """fusedopt's: GradientDescent's per-parameter state with ``master_weights=True`` (the float32
  copy). Without master weights the state is ``()``, as in flax 0.5.3."""
  master: Any = None

  @classmethod
  def from_fields(cls, values):
    return super().from_fields(values) if values else ()


def _sgd(xp, s, q, p, g):
  del xp, q
  return p - s.lr * g, ()


SGD_RULE = Rule("sgd", _sgd, ("lr",), n_state=0)


class GradientDescent(FlatOptimizerDef):
  """Gradient descent optimizer (no state: ``()`` per parameter)."""
  param_state_class = _GradientDescentMasterState

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
