"""Adadelta with decoupled weight decay (flax's form).

    sq <- rho sq + g^2 (1-rho);   delta = sqrt(acc + eps) / sqrt(sq + eps) * g   (old acc)
    p <- p - lr delta - lr wd p;  acc <- rho acc + delta^2 (1-rho)

Reference: Zeiler, https://arxiv.org/abs/1212.5701.
"""
from typing import Any

from . import struct
from .elementwise import Rule
from .flat import FlatOptimizerDef, check_beta, check_kinds, check_range, f32
from .flat_state import ParamState, param_state


@struct.dataclass
class _AdadeltaHyperParams:
  learning_rate: Any
  rho: Any
  eps: Any
  weight_decay: Any


@param_state
class _AdadeltaParamState(ParamState):
  """Adadelta's per-parameter state (flax 0.5.3's fields)."""
  sq_avg: Any
  acc_delta: Any


def _adadelta(xp, s, q, p, g, sq, acc):
  del q
  sq = s.rho * sq + xp.abs_sq(g) * s.one_minus_rho
  delta = (xp.sqrt(acc + s.eps) / xp.sqrt(sq + s.eps)) * g
  new_p = p - s.lr * delta
  new_p = new_p - s.lr_wd * p
  acc = s.rho * acc + (delta * delta) * s.one_minus_rho
  return new_p, (sq, acc)


ADADELTA_RULE = Rule("adadelta", _adadelta, ("lr", "rho", "one_minus_rho", "eps", "lr_wd"), 2)


class Adadelta(FlatOptimizerDef):
  """Adadelta optimizer. State: ``sq_avg``, ``acc_delta``."""
  state_fields = ("sq_avg", "acc_delta")
  nonnegative_fields = ('sq_avg', 'acc_delta')
  param_state_class = _AdadeltaParamState

  def __init__(self, learning_rate=None, rho=0.9, eps=1e-6, weight_decay=0.0, *,
               backend="auto", master_weights=False,
               state_dtype=None, stochastic_rounding=False, rounding_seed=0):
    super().__init__(_AdadeltaHyperParams(learning_rate, rho, eps, weight_decay), backend,
                     master_weights=master_weights,
                     state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding,
                     rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, "learning_rate", "rho", "eps", "weight_decay")

  def validate(self, hp):
    check_range(hp, "learning_rate", 0.0)
    check_beta(hp, "rho")
    check_range(hp, "eps", 0.0)
    check_range(hp, "weight_decay", 0.0)

  def rule(self, hp):
    return ADADELTA_RULE

  def scalars(self, hp, step):
    return {"lr": f32(hp.learning_rate), "rho": f32(hp.rho), "one_minus_rho": f32(1 - hp.rho),
            "eps": f32(hp.eps), "lr_wd": f32(hp.learning_rate * hp.weight_decay)}
