"""Adagrad: ``G <- G + g^2;  p <- p - lr * g / (sqrt(G) + eps)``.

Reference: Duchi et al., https://jmlr.org/papers/v12/duchi11a.html.
"""
from typing import Any

from . import struct
from .elementwise import Rule
from .flat import FlatOptimizerDef, check_kinds, check_range, f32


@struct.dataclass
class _AdagradHyperParams:
  learning_rate: Any
  eps: Any


def _adagrad(xp, s, q, p, g, acc):
  del q
  acc = acc + g * g
  return p - s.lr * g / (xp.sqrt(acc) + s.eps), (acc,)


ADAGRAD_RULE = Rule("adagrad", _adagrad, ("lr", "eps"), 1)


class Adagrad(FlatOptimizerDef):
  """Adagrad optimizer. State: ``G``."""
  state_fields = ("G",)

  def __init__(self, learning_rate=None, eps=1e-8, *, backend="auto", master_weights=False,
               state_dtype=None, stochastic_rounding=False, rounding_seed=0):
    super().__init__(_AdagradHyperParams(learning_rate, eps), backend,
                     master_weights=master_weights,
                     state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding,
                     rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, "learning_rate", "eps")

  def validate(self, hp):
    check_range(hp, "learning_rate", 0.0)
    check_range(hp, "eps", 0.0)

  def rule(self, hp):
    return ADAGRAD_RULE

  def scalars(self, hp, step):
    return {"lr": f32(hp.learning_rate), "eps": f32(hp.eps)}
