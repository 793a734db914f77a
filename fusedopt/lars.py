"""LARS: momentum SGD with a per-tensor learning rate from the trust ratio.

    r = tc ||p|| / (||g|| + wd ||p|| + eps)   (1 if ||g|| = 0 or ||p|| = 0; raw gradient)
    g <- g + wd p;   sg = lr r g;   m <- beta m + sg;   d = sg + beta m (nesterov) or m;   p <- p - d

Reference: You et al., https://arxiv.org/abs/1708.03888.
"""
import functools
from typing import Any

import jax.numpy as jnp

from . import norms, struct
from .elementwise import Rule
from .flat import FlatOptimizerDef, check_kinds, check_range, f32
from .flat_state import ParamState, param_state


@struct.dataclass
class _LARSHyperParams:
  learning_rate: Any
  beta: Any
  weight_decay: Any
  trust_coefficient: Any
  eps: Any
  nesterov: bool


@param_state
class _LARSParamState(ParamState):
  """LARS's per-parameter state (flax 0.5.3's fields)."""
  momentum: Any


@functools.lru_cache(maxsize=None)
def lars_rule(nesterov: bool, descent_trace: bool = False) -> Rule:
  """LARS's per-element update with the per-tensor ``scaled_lr = lr * trust_ratio``::

      d = scaled_lr (g + wd p);   m <- beta m + d;   p <- p - m   (nesterov: p - (d + beta m))

  ``descent_trace`` keeps optax's sign (``optax.lars`` traces the already negated step, so its
  ``trace`` is ``-m``; ``fusedopt.tx.lars``): ``t <- beta t - d``, ``p <- p + t``, the same
  values as optax's ``t <- (-d) + beta t``."""
  def fn(xp, s, q, p, g, m):
    del xp
    g = g + s.wd * p
    sg = q.scaled_lr * g
    if descent_trace:
      m = s.beta * m - sg
      return p + (s.beta * m - sg if nesterov else m), (m,)
    m = s.beta * m + sg
    d = sg + s.beta * m if nesterov else m
    return p - d, (m,)
  name = "lars" + ("_nesterov" if nesterov else "") + ("_descent_trace" if descent_trace else "")
  return Rule(name, fn, ("beta", "wd"), 1, seg_scalars=("scaled_lr",))


def trust_ratio(trust_coefficient, pn, gn, denominator):
  """Per tensor, ``trust_coefficient * ||p|| / denominator``, and 1 where ``||p|| = 0`` or the
  gradient's norm ``gn`` is 0 (the paper's and optax's convention: a zero-initialised tensor
  still trains, a zero gradient gives no 0/0). ``LARS``'s denominator is
  ``||g|| + wd ||p|| + eps``; optax's (``fusedopt.tx.lars``) ``||g + wd p|| + eps`` with
  ``gn = ||g + wd p||``."""
  ratio = trust_coefficient * pn / denominator
  return jnp.where((gn == 0.) | (pn == 0.), 1., ratio)


class LARS(FlatOptimizerDef):
  """Layer-wise adaptive rate scaling (LARS) optimizer. State: ``momentum``."""
  state_fields = ("momentum",)
  param_state_class = _LARSParamState

  def __init__(self, learning_rate=None, beta=0.9, weight_decay=0, trust_coefficient=0.001,
               eps=0, nesterov=False, *, backend="auto", master_weights=False,
               state_dtype=None, stochastic_rounding=False, rounding_seed=0):
    super().__init__(_LARSHyperParams(learning_rate, beta, weight_decay, trust_coefficient, eps,
                                      nesterov), backend,
                     master_weights=master_weights,
                     state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding,
                     rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, "learning_rate", "beta", "weight_decay",
                "trust_coefficient", "eps")

  def validate(self, hp):
    check_range(hp, "learning_rate", 0.0)
    check_range(hp, "beta", 0.0, 1.0)
    check_range(hp, "weight_decay", 0.0)
    check_range(hp, "trust_coefficient", 0.0)
    check_range(hp, "eps", 0.0)

  def rule(self, hp):
    return lars_rule(bool(hp.nesterov))

  def scalars(self, hp, step):
    del step
    return {"lr": f32(hp.learning_rate), "beta": f32(hp.beta), "wd": f32(hp.weight_decay)}

  @staticmethod
  def _scaled_lr(hp, pn, gn):
    ratio = trust_ratio(hp.trust_coefficient, pn, gn, gn + hp.weight_decay * pn + hp.eps)
    return hp.learning_rate * ratio.astype(jnp.float32)

  def update_leaves(self, hp, ctx, layout, p_leaves, g_leaves, fields):
    if ctx.leaf_norms is None:
      pn, gn = norms.per_leaf(p_leaves), norms.per_leaf(g_leaves)
    else:   # the sharded driver's: from per-shard partial sums
      pn, gn = ctx.leaf_norms(layout, p_leaves, g_leaves)
    if ctx.guard is not None:   # apply_gradient_checked: the rule sees g * gscale, so must the norm
      gn = gn * ctx.guard["gscale"]
    scaled_lr = self._scaled_lr(hp, pn, gn)
    return self.run_rule(self.rule(hp), self.scalars(hp, ctx.step), {"scaled_lr": scaled_lr},
                         ctx, layout, p_leaves, g_leaves, fields)

  def single_pass_rule(self, hp):
    return None   # the per-tensor norms of p and g come first

  def leaf_seg_scalars(self, hp, step, param, state, grad):
    return {"scaled_lr": self._scaled_lr(hp, norms.l2(param), norms.l2(grad))}
