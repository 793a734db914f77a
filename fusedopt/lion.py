"""Lion: the sign of an interpolated momentum, with decoupled weight decay.

    c = b1 m + (1-b1) g;   p <- p - lr * (sign(c) + wd * p);   m <- b2 m + (1-b2) g

Every element moves by exactly ``lr`` (plus the decay): the update has the norm of a sign
vector, so Lion's learning rate is typically 3-10x smaller than AdamW's and its weight decay
3-10x larger. One state buffer (Adam keeps two).

Reference: Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms",
https://arxiv.org/abs/2302.06675 (Algorithm 2).
"""
from typing import Any

from . import struct
from .elementwise import Rule
from .flat import FlatOptimizerDef, check_beta, check_kinds, check_range, f32
from .flat_state import ParamState, param_state


@struct.dataclass
class _LionHyperParams:
  learning_rate: Any
  beta1: Any
  beta2: Any
  weight_decay: Any


@param_state
class _LionParamState(ParamState):
  """Lion's per-parameter state: the gradient EMA ``m`` (optax's ``mu``)."""
  grad_ema: Any


def _lion(xp, s, q, p, g, m):
  """optax's operation order: ``c = (1-b1) g + b1 m``, ``m' = (1-b2) g + b2 m``."""
  del q
  c = s.one_minus_b1 * g + s.b1 * m
  new_p = p - s.lr * (xp.sign(c) + s.wd * p)
  return new_p, (s.one_minus_b2 * g + s.b2 * m,)


LION_RULE = Rule("lion", _lion, ("lr", "b1", "one_minus_b1", "b2", "one_minus_b2", "wd"), 1)


def lion_scalars(learning_rate, beta1, beta2, weight_decay):
  """The scalars of ``LION_RULE`` in float32 (``1 - beta`` from the exact beta)."""
  return {"lr": f32(learning_rate), "b1": f32(beta1), "one_minus_b1": f32(1. - beta1),
          "b2": f32(beta2), "one_minus_b2": f32(1. - beta2), "wd": f32(weight_decay)}


class Lion(FlatOptimizerDef):
  """Lion optimizer (Chen et al. 2023). State: ``grad_ema``.

  Args:
    learning_rate: the step size (every element moves by it).
    beta1: the interpolation between the gradient and the EMA whose sign is the update (0.9).
    beta2: the EMA's decay (0.99).
    weight_decay: decoupled weight decay, scaled by the learning rate (0.0).
  """
  state_fields = ("grad_ema",)
  param_state_class = _LionParamState

  def __init__(self, learning_rate=None, beta1=0.9, beta2=0.99, weight_decay=0.0, *,
               backend="auto", master_weights=False, state_dtype=None,
               stochastic_rounding=False, rounding_seed=0):
    super().__init__(_LionHyperParams(learning_rate, beta1, beta2, weight_decay), backend,
                     master_weights=master_weights, state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, "learning_rate", "beta1", "beta2", "weight_decay")

  def validate(self, hp):
    check_range(hp, "learning_rate", 0.0)
    check_beta(hp, "beta1")
    check_beta(hp, "beta2")
    check_range(hp, "weight_decay", 0.0)

  def rule(self, hp):
    return LION_RULE

  def scalars(self, hp, step):
    del step
    return lion_scalars(hp.learning_rate, hp.beta1, hp.beta2, hp.weight_decay)
