"""AdaBelief: Adam with the second moment of (g - m) instead of g.

    m <- b1 m + (1-b1) g;   s <- b2 s + (1-b2) (g - m)^2 + eps
    p <- p - lr * (m / (1-b1^t)) / (sqrt(s / (1-b2^t)) + eps) - lr * wd * p

Reference: Zhuang et al., https://arxiv.org/abs/2010.07468.
"""
from typing import Any

from . import struct
from .adam import MOMENT_NAMES, MOMENT_SCALARS, moment_scalars, validate_moments
from .elementwise import Rule
from .flat import FlatOptimizerDef, check_kinds, f32
from .flat_state import ParamState, param_state


@struct.dataclass
class _AdaBeliefHyperParams:
  learning_rate: Any
  beta1: Any
  beta2: Any
  eps: Any
  weight_decay: Any


@param_state
class _AdaBeliefParamState(ParamState):
  """AdaBelief's per-parameter state (flax 0.5.3's fields)."""
  grad_ema: Any
  grad_sq_ema: Any


def _adabelief(xp, s, q, p, g, m, v):
  del q
  m = s.b1 * m + s.one_minus_b1 * g
  d = g - m
  v = s.b2 * v + s.one_minus_b2 * xp.abs_sq(d) + s.eps
  new_p = p - s.lr * (m / s.bias_corr1) / (xp.sqrt(v / s.bias_corr2) + s.eps)
  return new_p - s.lr_wd * p, (m, v)


ADABELIEF_RULE = Rule("adabelief", _adabelief, MOMENT_SCALARS + ("lr_wd",), 2)


class AdaBelief(FlatOptimizerDef):
  """AdaBelief optimizer. State: ``grad_ema``, ``grad_sq_ema``."""
  state_fields = ("grad_ema", "grad_sq_ema")
  nonnegative_fields = ('grad_sq_ema',)
  param_state_class = _AdaBeliefParamState

  def __init__(self, learning_rate=None, beta1=0.9, beta2=0.999, eps=1e-16, weight_decay=0.0, *,
               backend="auto", master_weights=False,
               state_dtype=None, stochastic_rounding=False, rounding_seed=0):
    super().__init__(_AdaBeliefHyperParams(learning_rate, beta1, beta2, eps, weight_decay),
                     backend,
                     master_weights=master_weights,
                     state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding,
                     rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, *MOMENT_NAMES)

  def validate(self, hp):
    validate_moments(hp)

  def rule(self, hp):
    return ADABELIEF_RULE

  def scalars(self, hp, step):
    return dict(moment_scalars(hp, step), lr_wd=f32(hp.learning_rate * hp.weight_decay))
