"""LAMB: Adam's direction, rescaled per tensor by the trust ratio ||p|| / ||u||.

    m, v as in Adam;   u = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) + wd * p
    r = ||p|| / ||u||  (1 if either norm is 0);   p <- p - r * lr * u

Two stages over the flat buffers: the moments, then (after the per-tensor norms) the update.
Reference: You et al., https://arxiv.org/abs/1904.00962.
"""
import functools
from typing import Any, Tuple

import jax.numpy as jnp

from . import elementwise, norms, struct
from .adam import MOMENT_NAMES, MOMENT_SCALARS, moment_scalars, validate_moments
from .elementwise import Rule
from .flat import FlatOptimizerDef, check_kinds, f32
from .flat_state import ParamState, param_state


@struct.dataclass
class _LAMBHyperParams:
  learning_rate: Any
  beta1: Any
  beta2: Any
  weight_decay: Any
  eps: Any


@param_state
class _LAMBParamState(ParamState):
  """LAMB's per-parameter state (flax 0.5.3's fields)."""
  grad_ema: Any
  grad_sq_ema: Any


@functools.lru_cache(maxsize=None)
def lamb_rules(eps_root: bool = False) -> Tuple[Rule, Rule]:
  """LAMB's two stages, ``(moments, apply)``; ``eps_root`` chooses optax's variant (used by
  ``fusedopt.tx.lamb``) with ``eps_root`` inside the square root:

      moments:  m <- b1 m + (1-b1) g;   v <- b2 v + (1-b2) g^2;   also ||p||^2, ||u||^2 with
      u = (m / (1-b1^t)) / (sqrt(v_hat) + eps) + wd * p,  v_hat = v / (1-b2^t) (+ eps_root)
      apply:    p <- p - ratio_lr * u          (ratio_lr = lr * ||p|| / ||u||, per tensor)

  Pass 1 reads p, g, m, v and writes m, v plus per-block partial norms (24 B/param in float32);
  pass 2 reads p, m, v and writes p (16 B/param): 40 B/param in all.
  """
  def v_hat(s, v):
    return v / s.bias_corr2 + s.eps_root if eps_root else v / s.bias_corr2

  def direction(xp, s, p, m, v):
    """The unscaled LAMB update ``u`` from the *new* moments."""
    return (m / s.bias_corr1) / (xp.sqrt(v_hat(s, v)) + s.eps) + s.wd * p

  def moments(xp, s, q, p, g, m, v):
    del q, p
    return None, (s.b1 * m + s.one_minus_b1 * g, s.b2 * v + s.one_minus_b2 * xp.abs_sq(g))

  def norm_terms(xp, s, q, p, g, m, v):
    """Terms whose per-tensor sums of squares the moment pass also returns: ||p||^2, ||u||^2."""
    del q, g
    return p, direction(xp, s, p, m, v)

  def apply(xp, s, q, p, g, m, v):
    del g
    return p - q.ratio_lr * direction(xp, s, p, m, v), (m, v)

  scalars = MOMENT_SCALARS + ("wd",) + (("eps_root",) if eps_root else ())
  suffix = "_eps_root" if eps_root else ""
  return (Rule("lamb_moments" + suffix, moments, scalars, 2, writes_param=False,
               sumsq=norm_terms),
          Rule("lamb_apply" + suffix, apply, scalars, 2, seg_scalars=("ratio_lr",),
               reads_grad=False, writes_state=False, real_state=(False, True)))


MOMENTS_RULE, APPLY_RULE = lamb_rules()


class LAMB(FlatOptimizerDef):
  """Layer-wise adaptive moments (LAMB) optimizer. State: ``grad_ema``, ``grad_sq_ema``."""
  state_fields = ("grad_ema", "grad_sq_ema")
  nonnegative_fields = ('grad_sq_ema',)
  param_state_class = _LAMBParamState

  def __init__(self, learning_rate=None, beta1=0.9, beta2=0.999, weight_decay=0, eps=1e-6, *,
               backend="auto", master_weights=False,
               state_dtype=None, stochastic_rounding=False, rounding_seed=0):
    super().__init__(_LAMBHyperParams(learning_rate, beta1, beta2, weight_decay, eps), backend,
                     master_weights=master_weights,
                     state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding,
                     rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, *MOMENT_NAMES)

  def validate(self, hp):
    validate_moments(hp)

  def scalars(self, hp, step):
    return dict(moment_scalars(hp, step), wd=f32(hp.weight_decay))

  @staticmethod
  def _ratio_lr(s, p_sumsq, u_sumsq):
    return norms.safe_ratio(jnp.sqrt(p_sumsq), jnp.sqrt(u_sumsq)) * s["lr"]

  def update_leaves(self, hp, ctx, layout, p_leaves, g_leaves, fields):
    s = self.scalars(hp, ctx.step)
    _, fields, (p_sq, u_sq) = self.run_rule_sumsq(MOMENTS_RULE, s, {}, ctx, layout, p_leaves,
                                                  g_leaves, fields)
    return self.run_rule(APPLY_RULE, s, {"ratio_lr": self._ratio_lr(s, p_sq, u_sq)}, ctx,
                         layout, p_leaves, g_leaves, fields)

  def single_pass_rule(self, hp):
    return None   # two passes with per-tensor norms between them

  def apply_param_gradient(self, step, hyper_params, param, state, grad):
    self.validate(hyper_params)
    s = self.scalars(hyper_params, step)
    st = self.leaf_state_values(state)
    moments = self.wrap_rule(MOMENTS_RULE)
    # the apply stage writes the param: stochastically rounded (bf16) as on the flat path
    apply, s_apply = self._leaf_rounding(self.wrap_rule(APPLY_RULE), s, step, param)
    _, st = elementwise.apply_to_leaf(moments, s, {}, param, grad, st)
    ratio_lr = self._ratio_lr(s, *elementwise.leaf_sumsq(moments, s, {}, param, grad, st))
    new_p, st = elementwise.apply_to_leaf(apply, s_apply, {"ratio_lr": ratio_lr}, param, grad, st)
    return new_p, self.make_param_state(dict(zip(self.all_state_fields, st)))

  def rule(self, hp):
    return APPLY_RULE
