"""Adan: adaptive Nesterov momentum from the gradient *differences* (optax's formulation).

    d = g - g_prev  (0 at the first step)
    m <- b1 m + (1-b1) g;   v <- b2 v + (1-b2) d;   n <- b3 n + (1-b3) |g + (1-b2) d|^2
    p <- p - lr * ((m/(1-b1^t) + (1-b2) v/(1-b2^t)) / (sqrt(n/(1-b3^t) + eps_root) + eps)
               + wd * p)

The betas are optax's (decays of the averages: 0.98, 0.92, 0.99), i.e. one minus the paper's;
the weight decay is decoupled and additive (``lr * wd * p``, optax's ``add_decayed_weights``),
not the paper's proximal ``p / (1 + lr * wd)``. Four state buffers (m, v, n and the previous
gradient): 44 B/param per step in float32.

Reference: Xie et al., 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing
Deep Models", https://arxiv.org/abs/2208.06677 (Algorithm 1); optax.adan.
"""
from typing import Any

import jax.numpy as jnp

from . import struct
from .elementwise import Rule
from .flat import (FlatOptimizerDef, bias_correction, check_beta, check_kinds, check_range,
                   f32)
from .flat_state import ParamState, param_state


@struct.dataclass
class _AdanHyperParams:
  learning_rate: Any
  beta1: Any
  beta2: Any
  beta3: Any
  eps: Any
  eps_root: Any
  weight_decay: Any


@param_state
class _AdanParamState(ParamState):
  """Adan's per-parameter state (optax's ``m``, ``v``, ``n``, ``g``)."""
  grad_ema: Any
  grad_diff_ema: Any
  sq_ema: Any
  prev_grad: Any


def _adan(xp, s, q, p, g, m, v, n, g_prev):
  """optax's operation order; ``not_first`` is 0 at the first step (no difference yet), else 1."""
  del q
  d = s.not_first * (g - g_prev)
  m = s.b1 * m + s.one_minus_b1 * g
  v = s.b2 * v + s.one_minus_b2 * d
  n = s.b3 * n + s.one_minus_b3 * xp.abs_sq(g + s.one_minus_b2 * d)
  u = (m / s.bias_corr1 + s.one_minus_b2 * (v / s.bias_corr2)) / (
      xp.sqrt(n / s.bias_corr3 + s.eps_root) + s.eps)
  return p - s.lr * (u + s.wd * p), (m, v, n, g)


ADAN_RULE = Rule("adan", _adan, ("lr", "b1", "one_minus_b1", "b2", "one_minus_b2", "b3",
                                 "one_minus_b3", "bias_corr1", "bias_corr2", "bias_corr3", "eps",
                                 "eps_root", "wd", "not_first"), 4)


def adan_scalars(learning_rate, beta1, beta2, beta3, eps, eps_root, weight_decay, step):
  """The scalars of ``ADAN_RULE`` at ``step`` (0-based, before the update) in float32; ``1 - b``
  and the bias corrections from the exact betas."""
  return {"lr": f32(learning_rate), "b1": f32(beta1), "one_minus_b1": f32(1. - beta1),
          "b2": f32(beta2), "one_minus_b2": f32(1. - beta2), "b3": f32(beta3),
          "one_minus_b3": f32(1. - beta3), "bias_corr1": bias_correction(beta1, step),
          "bias_corr2": bias_correction(beta2, step), "bias_corr3": bias_correction(beta3, step),
          "eps": f32(eps), "eps_root": f32(eps_root), "wd": f32(weight_decay),
          "not_first": jnp.asarray(jnp.asarray(step) > 0, jnp.float32)}


class Adan(FlatOptimizerDef):
  """Adan optimizer (Xie et al. 2022, optax's form). State: ``grad_ema``, ``grad_diff_ema``,
  ``sq_ema``, ``prev_grad``.

  Args:
    learning_rate: the step size.
    beta1: decay of the gradient average (0.98).
    beta2: decay of the gradient-difference average (0.92).
    beta3: decay of the squared-term average (0.99).
    eps: added to the denominator's square root (1e-8).
    eps_root: added inside the square root (1e-8, optax.adan's default).
    weight_decay: decoupled weight decay, scaled by the learning rate (0.0).
  """
  state_fields = ("grad_ema", "grad_diff_ema", "sq_ema", "prev_grad")
  nonnegative_fields = ('sq_ema',)
  param_state_class = _AdanParamState

  def __init__(self, learning_rate=None, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8,
               eps_root=1e-8, weight_decay=0.0, *, backend="auto", master_weights=False,
               state_dtype=None, stochastic_rounding=False, rounding_seed=0):
    super().__init__(_AdanHyperParams(learning_rate, beta1, beta2, beta3, eps, eps_root,
                                      weight_decay), backend,
                     master_weights=master_weights, state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, "learning_rate", "beta1", "beta2", "beta3", "eps",
                "eps_root", "weight_decay")

  def validate(self, hp):
    check_range(hp, "learning_rate", 0.0)
    for b in ("beta1", "beta2", "beta3"):
      check_beta(hp, b)
    check_range(hp, "eps", 0.0)
    check_range(hp, "eps_root", 0.0)
    check_range(hp, "weight_decay", 0.0)

  def rule(self, hp):
    return ADAN_RULE

  def scalars(self, hp, step):
    return adan_scalars(hp.learning_rate, hp.beta1, hp.beta2, hp.beta3, hp.eps, hp.eps_root,
                        hp.weight_decay, step)
