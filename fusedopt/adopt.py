"""ADOPT: Adam with the gradient normalised by the *previous* second moment, then averaged.

    u  = clip(g / max(sqrt(v), eps), -c_t, c_t)          (c_t = t^0.25, or no clip)
    m <- b1 m + (1-b1) u;   v <- b2 v + (1-b2) |g|^2;   p <- p - lr * m
    (nesterov: p <- p - lr * (b1 m + (1-b1) u) with the new m)

At the first step (t = 0) the betas are b1 = 1, b2 = 0 (optax's): ``v`` becomes ``|g|^2`` and
neither ``m`` nor ``p`` moves. Normalising by the old ``v`` decouples the second moment from the
current gradient, which is what lets ADOPT converge for any ``b2``. Two state buffers, as Adam:
28 B/param per step in float32.

Reference: Taniguchi et al., 2024, "ADOPT: Modified Adam Can Converge with Any beta2 with the
Optimal Rate", https://arxiv.org/abs/2411.02853 (Algorithm 2, with its clipping);
optax.contrib.adopt.
"""
import functools
from typing import Any

import jax.numpy as jnp

from . import struct
from .elementwise import Rule
from .flat import FlatOptimizerDef, check_beta, check_kinds, check_range, f32
from .flat_state import ParamState, param_state

F32 = jnp.float32


@struct.dataclass
class _ADOPTHyperParams:
  learning_rate: Any
  beta1: Any
  beta2: Any
  eps: Any
  nesterov: Any
  use_clipping: Any


@param_state
class _ADOPTParamState(ParamState):
  """ADOPT's per-parameter state (optax's ``mu``, ``nu``)."""
  grad_ema: Any
  grad_sq_ema: Any


@functools.lru_cache(maxsize=None)
def adopt_rule(nesterov: bool = False, clipping: bool = True) -> Rule:
  """ADOPT's per-element update in optax's operation order; ``b1``/``b2`` are the step's
  (``adopt_scalars``: 1 and 0 at the first step), ``clip`` the bound (read with ``clipping``)."""
  def fn(xp, s, q, p, g, m, v):
    del q
    u = g / xp.maximum(xp.sqrt(v), s.eps)
    if clipping:
      u = xp.minimum(xp.maximum(u, -s.clip), s.clip)
    m = s.one_minus_b1 * u + s.b1 * m
    out = s.one_minus_b1 * u + s.b1 * m if nesterov else m
    v = s.one_minus_b2 * xp.abs_sq(g) + s.b2 * v
    return p - s.lr * out, (m, v)
  return Rule("adopt" + ("_nesterov" if nesterov else "") + ("" if clipping else "_noclip"), fn,
              ("lr", "b1", "one_minus_b1", "b2", "one_minus_b2", "eps")
              + (("clip",) if clipping else ()), 2)


def adopt_scalars(learning_rate, beta1, beta2, eps, clip, step):
  """The scalars of ``adopt_rule`` at ``step`` (0-based, before the update): at step 0 the betas
  are 1 and 0 (no first moment yet; the second moment starts at ``|g|^2``). ``clip`` is the
  bound at this step (any value where the rule does not clip)."""
  later = jnp.asarray(step) > 0
  b1 = jnp.where(later, f32(beta1), F32(1.0))
  b2 = jnp.where(later, f32(beta2), F32(0.0))
  return {"lr": f32(learning_rate), "b1": b1,
          "one_minus_b1": jnp.where(later, f32(1. - beta1), F32(0.0)), "b2": b2,
          "one_minus_b2": jnp.where(later, f32(1. - beta2), F32(1.0)), "eps": f32(eps),
          "clip": jnp.asarray(clip, F32)}


def default_clip(step):
  """optax's default ``clip_value_fn``: ``step ** 0.25`` (0 at the first step)."""
  return jnp.asarray(step, F32) ** 0.25


class ADOPT(FlatOptimizerDef):
  """ADOPT optimizer (Taniguchi et al. 2024, optax.contrib.adopt's form). State: ``grad_ema``,
  ``grad_sq_ema``.

  Args:
    learning_rate: the step size.
    beta1: decay of the normalised-gradient average (0.9).
    beta2: decay of the squared-gradient average (0.9999).
    eps: floor of ``sqrt(v)`` in the normalisation (1e-6).
    nesterov: Nesterov momentum (static; False).
    use_clipping: clip the normalised gradient to ``±step**0.25`` (static; True, as optax).
  """
  state_fields = ("grad_ema", "grad_sq_ema")
  nonnegative_fields = ('grad_sq_ema',)
  param_state_class = _ADOPTParamState

  def __init__(self, learning_rate=None, beta1=0.9, beta2=0.9999, eps=1e-6, *, nesterov=False,
               use_clipping=True, backend="auto", master_weights=False, state_dtype=None,
               stochastic_rounding=False, rounding_seed=0):
    super().__init__(_ADOPTHyperParams(learning_rate, beta1, beta2, eps, nesterov, use_clipping),
                     backend,
                     master_weights=master_weights, state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, "learning_rate", "beta1", "beta2", "eps")

  def validate(self, hp):
    check_range(hp, "learning_rate", 0.0)
    check_beta(hp, "beta1")
    check_beta(hp, "beta2")
    check_range(hp, "eps", 0.0)

  def rule(self, hp):
    return adopt_rule(bool(hp.nesterov), bool(hp.use_clipping))

  def scalars(self, hp, step):
    return adopt_scalars(hp.learning_rate, hp.beta1, hp.beta2, hp.eps, default_clip(step), step)
