"""Adam with weight decay scaled by the learning rate (flax's form).

    m <- b1 m + (1-b1) g;   v <- b2 v + (1-b2) g^2
    p <- p - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) - lr * wd * p

Reference: Kingma & Ba, https://arxiv.org/abs/1412.6980.
"""
import functools
from typing import Any

from . import struct
from .elementwise import Rule
from .flat import (FlatOptimizerDef, bias_correction, check_beta, check_kinds, check_range,
                   f32)
from .flat_state import ParamState, param_state


# the step scalars of the Adam family (``moment_scalars``): 1 - beta and the bias corrections
# 1 - beta^t come from the host in float32, never from the rule
MOMENT_SCALARS = ("lr", "b1", "one_minus_b1", "b2", "one_minus_b2", "bias_corr1", "bias_corr2",
                  "eps")


@struct.dataclass
class _AdamHyperParams:
  learning_rate: Any
  beta1: Any
  beta2: Any
  eps: Any
  weight_decay: Any


@param_state
class _AdamParamState(ParamState):
  """Adam's per-parameter state (flax 0.5.3's fields)."""
  grad_ema: Any
  grad_sq_ema: Any


@functools.lru_cache(maxsize=None)
def adam_rule(nesterov: bool = False, eps_root: bool = False) -> Rule:
  """Adam's per-element update; ``nesterov`` and ``eps_root`` choose static variants (optax's
  ``scale_by_adam`` options, used by ``fusedopt.tx``):

      m <- b1 m + (1-b1) g;   v <- b2 v + (1-b2) g^2
      m_hat = m / (1-b1^t)                      or, nesterov (Dozat 2016),
      m_hat = b1 m / (1-b1^(t+1)) + (1-b1) g / (1-b1^t)
      v_hat = v / (1-b2^t)                      or, eps_root,  v / (1-b2^t) + eps_root
      p <- p - lr * m_hat / (sqrt(v_hat) + eps) - lr * wd * p

  The default (``ADAM_RULE``, flax's ``Adam``) reads neither ``bias_corr1_next`` nor
  ``eps_root``; each variant only adds its own terms, in the same operation order (the
  default's: m, v, then ``lr * m_hat``, then the denominator).
  """
  def m_hat(s, g, m):
    if nesterov:
      return s.b1 * (m / s.bias_corr1_next) + s.one_minus_b1 * (g / s.bias_corr1)
    return m / s.bias_corr1

  def v_hat(s, v):
    return v / s.bias_corr2 + s.eps_root if eps_root else v / s.bias_corr2

  def fn(xp, s, q, p, g, m, v):
    del q
    m = s.b1 * m + s.one_minus_b1 * g
    v = s.b2 * v + s.one_minus_b2 * xp.abs_sq(g)
    new_p = p - s.lr * m_hat(s, g, m) / (xp.sqrt(v_hat(s, v)) + s.eps)
    return new_p - s.lr_wd * p, (m, v)

  name = "adam" + ("_nesterov" if nesterov else "") + ("_eps_root" if eps_root else "")
  scalars = MOMENT_SCALARS + ("lr_wd",) + (("eps_root",) if eps_root else ()) + (
      ("bias_corr1_next",) if nesterov else ())
  return Rule(name, fn, scalars, 2)


ADAM_RULE = adam_rule()


def moment_scalars(hp, step):
  """Scalars shared by the Adam family, in float32 whatever the param dtype."""
  return {"lr": f32(hp.learning_rate),
          "b1": f32(hp.beta1), "one_minus_b1": f32(1. - hp.beta1),
          "b2": f32(hp.beta2), "one_minus_b2": f32(1. - hp.beta2),
          "bias_corr1": bias_correction(hp.beta1, step),
          "bias_corr2": bias_correction(hp.beta2, step),
          "eps": f32(hp.eps)}


# the Adam family's numeric hyper-parameters (each a real scalar, finite, at construction)
MOMENT_NAMES = ("learning_rate", "beta1", "beta2", "eps", "weight_decay")


def validate_moments(hp):
  check_range(hp, "learning_rate", 0.0)
  check_beta(hp, "beta1")
  check_beta(hp, "beta2")
  check_range(hp, "eps", 0.0)
  check_range(hp, "weight_decay", 0.0)


class Adam(FlatOptimizerDef):
  """Adam optimizer. State: ``grad_ema``, ``grad_sq_ema``."""
  state_fields = ("grad_ema", "grad_sq_ema")
  nonnegative_fields = ('grad_sq_ema',)
  param_state_class = _AdamParamState

  def __init__(self, learning_rate=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, *,
               backend="auto", master_weights=False,
               state_dtype=None, stochastic_rounding=False, rounding_seed=0):
    super().__init__(_AdamHyperParams(learning_rate, beta1, beta2, eps, weight_decay), backend,
                     master_weights=master_weights,
                     state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding,
                     rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, *MOMENT_NAMES)

  def validate(self, hp):
    validate_moments(hp)

  def rule(self, hp):
    return ADAM_RULE

  def scalars(self, hp, step):
    return dict(moment_scalars(hp, step), lr_wd=f32(hp.learning_rate * hp.weight_decay))
