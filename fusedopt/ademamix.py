"""AdEMAMix: Adam plus a slow gradient average mixed into the numerator.

    m1 <- b1 m1 + (1-b1) g;   m2 <- b3 m2 + (1-b3) g;   nu <- b2 nu + (1-b2) |g|^2
    p  <- p - lr * ((m1/(1-b1^t) + alpha m2) / (sqrt(nu/(1-b2^t) + eps_root) + eps) + wd * p)

The slow average ``m2`` (b3 = 0.9999: a memory of ~10k steps) is not bias-corrected. The paper
warms ``alpha`` and ``b3`` up over training; both are runtime hyper-parameters here (a per-step
override, or a schedule in ``fusedopt.tx.ademamix``), so a schedule never recompiles. Three state
buffers: 36 B/param per step in float32.

Reference: Pagliardini, Ablin & Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster,
Older", https://arxiv.org/abs/2409.03137 (Algorithm 1); optax.contrib.ademamix.
"""
from typing import Any

from . import struct
from .elementwise import Rule
from .flat import (FlatOptimizerDef, bias_correction, check_beta, check_kinds, check_range,
                   f32)
from .flat_state import ParamState, param_state


@struct.dataclass
class _AdEMAMixHyperParams:
  learning_rate: Any
  beta1: Any
  beta2: Any
  beta3: Any
  alpha: Any
  eps: Any
  eps_root: Any
  weight_decay: Any


@param_state
class _AdEMAMixParamState(ParamState):
  """AdEMAMix's per-parameter state (optax's ``m1``, ``m2``, ``nu``)."""
  fast_ema: Any
  slow_ema: Any
  grad_sq_ema: Any


def _ademamix(xp, s, q, p, g, m1, m2, nu):
  """optax's operation order."""
  del q
  m1 = s.b1 * m1 + s.one_minus_b1 * g
  m2 = s.b3 * m2 + s.one_minus_b3 * g
  nu = s.b2 * nu + s.one_minus_b2 * xp.abs_sq(g)
  u = (m1 / s.bias_corr1 + s.alpha * m2) / (xp.sqrt(nu / s.bias_corr2 + s.eps_root) + s.eps)
  return p - s.lr * (u + s.wd * p), (m1, m2, nu)


ADEMAMIX_RULE = Rule("ademamix", _ademamix,
                     ("lr", "b1", "one_minus_b1", "b2", "one_minus_b2", "b3", "one_minus_b3",
                      "bias_corr1", "bias_corr2", "alpha", "eps", "eps_root", "wd"), 3)


def ademamix_scalars(learning_rate, beta1, beta2, beta3, alpha, eps, eps_root, weight_decay,
                     step):
  """The scalars of ``ADEMAMIX_RULE`` at ``step`` (0-based, before the update) in float32."""
  return {"lr": f32(learning_rate), "b1": f32(beta1), "one_minus_b1": f32(1. - beta1),
          "b2": f32(beta2), "one_minus_b2": f32(1. - beta2), "b3": f32(beta3),
          "one_minus_b3": f32(1. - beta3), "bias_corr1": bias_correction(beta1, step),
          "bias_corr2": bias_correction(beta2, step), "alpha": f32(alpha), "eps": f32(eps),
          "eps_root": f32(eps_root), "wd": f32(weight_decay)}


class AdEMAMix(FlatOptimizerDef):
  """AdEMAMix optimizer (Pagliardini et al. 2024). State: ``fast_ema``, ``slow_ema``,
  ``grad_sq_ema``.

  Args:
    learning_rate: the step size.
    beta1: decay of the fast gradient average (0.9).
    beta2: decay of the squared-gradient average (0.999).
    beta3: decay of the slow gradient average (0.9999).
    alpha: weight of the slow average in the numerator (5.0, optax.contrib.ademamix's).
    eps: added to the denominator's square root (1e-8).
    eps_root: added inside the square root (0.0).
    weight_decay: decoupled weight decay, scaled by the learning rate (0.0).
  """
  state_fields = ("fast_ema", "slow_ema", "grad_sq_ema")
  nonnegative_fields = ('grad_sq_ema',)
  param_state_class = _AdEMAMixParamState

  def __init__(self, learning_rate=None, beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0,
               eps=1e-8, eps_root=0.0, weight_decay=0.0, *, backend="auto",
               master_weights=False, state_dtype=None, stochastic_rounding=False,
               rounding_seed=0):
    super().__init__(_AdEMAMixHyperParams(learning_rate, beta1, beta2, beta3, alpha, eps,
                                          eps_root, weight_decay), backend,
                     master_weights=master_weights, state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, "learning_rate", "beta1", "beta2", "beta3", "alpha", "eps",
                "eps_root", "weight_decay")

  def validate(self, hp):
    check_range(hp, "learning_rate", 0.0)
    for b in ("beta1", "beta2", "beta3"):
      check_beta(hp, b)
    for name in ("alpha", "eps", "eps_root", "weight_decay"):
      check_range(hp, name, 0.0)

  def rule(self, hp):
    return ADEMAMIX_RULE

  def scalars(self, hp, step):
    return ademamix_scalars(hp.learning_rate, hp.beta1, hp.beta2, hp.beta3, hp.alpha, hp.eps,
                            hp.eps_root, hp.weight_decay, step)
