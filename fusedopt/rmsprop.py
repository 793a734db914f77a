"""RMSProp, optionally centered.

    v <- b2 v + (1-b2) g^2;   centered: mg <- b2 mg + (1-b2) g,  den = sqrt(v - mg^2) + eps
    otherwise den = sqrt(v) + eps;   p <- p - lr * g / den
"""
import functools
from typing import Any

import jax

from . import struct
from .base import HyperParamError
from .elementwise import Rule
from .flat import FlatOptimizerDef, check_beta, check_kinds, check_range, f32
from .flat_state import ParamState, param_state


@struct.dataclass
class _RMSPropHyperParams:
  learning_rate: Any
  beta2: Any
  eps: Any
  centered: bool


@param_state
class _RMSPropParamState(ParamState):
  """RMSProp's per-parameter state (flax 0.5.3's fields; ``mg`` is None unless centered)."""
  v: Any
  mg: Any


@functools.lru_cache(maxsize=None)
def rmsprop_rule(centered: bool, eps_in_sqrt: bool = False, bias_correction: bool = False,
                 momentum: bool = False, nesterov: bool = False) -> Rule:
  """RMSProp's per-element update; ``centered`` and ``eps_in_sqrt`` choose static variants
  (``eps_in_sqrt``: optax's default form, used by ``fusedopt.tx``):

      v <- b2 v + (1-b2) g^2;   centered: mg <- b2 mg + (1-b2) g,  w = v - mg^2;  else w = v
      p <- p - lr * g / (sqrt(w) + eps)      eps_in_sqrt:  p <- p - lr * (g / sqrt(w + eps))

  optax's ``rmsprop`` options (``fusedopt.tx.rmsprop``): ``bias_correction`` divides ``v`` and
  ``mg`` by ``bias_corr2 = 1 - b2^t`` before use; ``momentum`` keeps optax's ``trace`` ``t`` of
  the learning-rate-scaled step ``u = -lr * g / den`` (an extra state after ``v``/``mg``)::

      t <- beta t + u;   p <- p + t          nesterov:  p <- p + (u + beta t)
  """
  def w_of(xp, s, v, mg):
    if bias_correction:
      v = v / s.bias_corr2
      mg = None if mg is None else mg / s.bias_corr2
    return v if mg is None else v - xp.abs_sq(mg)

  def step(xp, s, p, g, w):
    # w() = v or v - mg^2, called where the formula reads it (the trace keeps its op order)
    if not momentum:
      if eps_in_sqrt:
        return p - s.lr * (g / xp.sqrt(w() + s.eps)), ()
      return p - s.lr * g / (xp.sqrt(w()) + s.eps), ()
    scaled = g / xp.sqrt(w() + s.eps) if eps_in_sqrt else g / (xp.sqrt(w()) + s.eps)
    return scaled, ()

  def trace(s, p, scaled, t):
    # optax: u = -lr * scaled; t = u + beta t -- the same values as beta t - lr * scaled
    u = s.lr * scaled
    t = s.beta * t - u
    return (p + (s.beta * t - u) if nesterov else p + t), (t,)

  def plain(xp, s, q, p, g, v, *t):
    del q
    v = s.b2 * v + s.one_minus_b2 * xp.abs_sq(g)
    out, _ = step(xp, s, p, g, lambda: w_of(xp, s, v, None))
    if momentum:
      out, t = trace(s, p, out, t[0])
    return out, (v,) + tuple(t)

  def centered_fn(xp, s, q, p, g, v, mg, *t):
    del q
    v = s.b2 * v + s.one_minus_b2 * xp.abs_sq(g)
    mg = s.b2 * mg + s.one_minus_b2 * g
    out, _ = step(xp, s, p, g, lambda: w_of(xp, s, v, mg))
    if momentum:
      out, t = trace(s, p, out, t[0])
    return out, (v, mg) + tuple(t)

  scalars = (("lr", "b2", "one_minus_b2", "eps") + (("bias_corr2",) if bias_correction else ())
             + (("beta",) if momentum else ()))
  name = ("rmsprop" + ("_centered" if centered else "") + ("_eps_in_sqrt" if eps_in_sqrt else "")
          + ("_bias_corrected" if bias_correction else "")
          + (("_nesterov" if nesterov else "_momentum") if momentum else ""))
  n_state = (2 if centered else 1) + (1 if momentum else 0)
  return Rule(name, centered_fn if centered else plain, scalars, n_state)


# v - mg^2 is a difference of two nearly equal values where the gradient's variance is small
# next to its mean: a few per cent of quantization error in either makes it negative (NaN)
CENTERED_QUANTIZED = ("centered RMSProp subtracts the squared mean gradient from v, and 8-bit "
                      "state errors make that difference negative (NaN); keep its state in a "
                      "float dtype (state_dtype=jnp.bfloat16 or float32)")


class RMSProp(FlatOptimizerDef):
  """RMSProp optimizer. State: ``v`` (and ``mg`` when centered). Centered, its state stays in a
  float dtype (``CENTERED_QUANTIZED``)."""
  param_state_class = _RMSPropParamState

  def __init__(self, learning_rate=None, beta2=0.9, eps=1e-8, centered=False, *,
               backend="auto", master_weights=False,
               state_dtype=None, stochastic_rounding=False, rounding_seed=0):
    super().__init__(_RMSPropHyperParams(learning_rate, beta2, eps, centered), backend,
                     master_weights=master_weights,
                     state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding,
                     rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, "learning_rate", "beta2", "eps")
    self.state_fields = ("v", "mg") if centered else ("v",)
    self.nonnegative_fields = ("v",)
    if centered and self.quantizes:
      raise HyperParamError(CENTERED_QUANTIZED)

  # flax 0.5.3's state has ``mg: None`` when not centered; checkpoints keep that key
  def flax_param_states(self, target, param_states):
    tree = super().flax_param_states(target, param_states)
    if "mg" in self.state_fields:
      return tree
    return jax.tree_util.tree_map(lambda _, st: dict(st, mg=None), target, tree)

  def from_flax_param_states(self, target, param_states, restored):
    if "mg" not in self.state_fields:
      restored = jax.tree_util.tree_map(
          lambda _, st: {k: v for k, v in st.items() if k != "mg"}, target, restored)
    return super().from_flax_param_states(target, param_states, restored)

  def validate(self, hp):
    check_range(hp, "learning_rate", 0.0)
    check_beta(hp, "beta2")
    check_range(hp, "eps", 0.0)
    if bool(hp.centered) != ("mg" in self.state_fields):
      raise ValueError("`centered` decides the state layout at create(); it cannot be "
                       "overridden per step")

  def rule(self, hp):
    return rmsprop_rule(bool(hp.centered))

  def scalars(self, hp, step):
    return {"lr": f32(hp.learning_rate), "b2": f32(hp.beta2),
            "one_minus_b2": f32(1. - hp.beta2), "eps": f32(hp.eps)}
