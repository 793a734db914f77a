"""Adam with weight decay scaled by the learning rate (flax's form).

    m <- b1 m + (1-b1) g;   v <- b2 v + (1-b2) g^2
    p <- p - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) - lr * wd * p

Reference: Kingma & Ba, https://arxiv.org/abs/1412.6980.
"""
from typing import Any

from . import struct
from .elementwise import Rule
from .flat import (FlatOptimizerDef, bias_correction, check_beta, check_kinds, check_range,
                   f32)


@struct.dataclass
class _AdamHyperParams:
  learning_rate: Any
  beta1: Any
  beta2: Any
  eps: Any
  weight_decay: Any


def _adam(xp, s, q, p, g, m, v):
  del q
  m = s.b1 * m + s.omb1 * g
  v = s.b2 * v + s.omb2 * (g * g)
  new_p = p - s.lr * (m / s.c1) / (xp.sqrt(v / s.c2) + s.eps)
  return new_p - s.lrwd * p, (m, v)


ADAM_RULE = Rule("adam", _adam, ("lr", "b1", "omb1", "b2", "omb2", "c1", "c2", "eps", "lrwd"), 2)


def moment_scalars(hp, step):
  """Scalars shared by the Adam family, in float32 whatever the param dtype."""
  return {"lr": f32(hp.learning_rate), "b1": f32(hp.beta1), "omb1": f32(1. - hp.beta1),
          "b2": f32(hp.beta2), "omb2": f32(1. - hp.beta2),
          "c1": bias_correction(hp.beta1, step), "c2": bias_correction(hp.beta2, step),
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
    return dict(moment_scalars(hp, step), lrwd=f32(hp.learning_rate * hp.weight_decay))
