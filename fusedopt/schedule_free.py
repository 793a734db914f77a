"""Schedule-free AdamW: Adam without momentum, made schedule-free by interpolation and averaging.

The params ``y`` are where the gradient is taken; ``z`` steps with the base optimizer (RMS-scaled
gradient plus decoupled weight decay, no momentum); ``x``, the average of the ``z`` iterates,
is the point to evaluate::

    v <- b2 v + (1-b2) |g|^2;              u = g / (sqrt(v / (1-b2^t)) + eps) + wd * y
    z' = z - lr * u;                       x = (y - (1-b1) z) / b1          (the old average)
    x' = (1 - c) x + c z';                 y' = b1 x' + (1-b1) z'

with the averaging weight ``c = w_t / sum_{i<=t} w_i``, ``w_t = max_{i<=t}(lr_i)^r`` (``r``:
``weight_lr_power``), a per-step scalar computed outside the kernel. Two state buffers (``v``,
``z``), as Adam's two moments: 28 B/param per step in float32. ``x`` is not stored; the point to
evaluate is ``(y - (1-b1) z) / b1`` (``optax.contrib.schedule_free_eval_params``).

Reference: Defazio et al., 2024, "The Road Less Scheduled", https://arxiv.org/abs/2405.15682;
optax.contrib.schedule_free_adamw (the base optimizer ``scale_by_rms(eps_in_sqrt=False,
bias_correction=True)`` + ``add_decayed_weights`` + the learning rate).
"""
from typing import Any

import jax
import jax.numpy as jnp

from . import quantization, struct
from .base import OptimizerState
from .elementwise import Rule
from .flat import (FlatOptimizerDef, bias_correction, check_beta, check_kinds, check_range,
                   f32)
from .flat_state import FlatState, ParamState, param_state

F32 = jnp.float32


def _fn(xp, s, q, y, g, v, z):
  del q
  v = s.b2 * v + s.one_minus_b2 * xp.abs_sq(g)
  u = g / (xp.sqrt(v / s.bias_corr2) + s.eps) + s.wd * y
  z_new = z - s.lr * u
  x = s.one_minus_ck * ((y - s.one_minus_b1 * z) / s.b1) + s.ck * z_new
  return s.b1 * x + s.one_minus_b1 * z_new, (v, z_new)


SCHEDULE_FREE_ADAMW_RULE = Rule(
    "schedule_free_adamw", _fn,
    ("lr", "b2", "one_minus_b2", "bias_corr2", "eps", "wd", "b1", "one_minus_b1", "ck",
     "one_minus_ck"), 2)


def averaging_weight(max_lr, weight_sum, lr, weight_lr_power):
  """``(c, new max_lr, new weight_sum)`` of one step, in the dtype of ``max_lr`` (optax's: the
  params' lowest float dtype): ``w = max(max_lr, lr)^r``, ``c = w / (weight_sum + w)``; ``c``
  is 0 while every learning rate so far is 0 (0/0: warmup's first step), NaN if ``w`` or the
  sum is NaN (optax's)."""
  max_lr = jnp.maximum(max_lr, jnp.asarray(lr, max_lr.dtype))
  weight = max_lr ** weight_lr_power
  total = weight_sum + weight
  c = jnp.where(jnp.isnan(weight) | jnp.isnan(total), jnp.full(weight.shape, jnp.nan),
                jnp.nan_to_num(weight / total, nan=0.0, posinf=jnp.inf))
  return c, max_lr, total


def advanced_scalars(inc, weight_sum, max_lr, new_weight_sum, new_max_lr):
  """``(weight_sum, max_lr)`` after a step: the new values, or the old ones where the step was
  skipped (``inc`` 0: a checked step with a non-finite gradient)."""
  keep = jnp.asarray(inc) == 0
  return jnp.where(keep, weight_sum, new_weight_sum), jnp.where(keep, max_lr, new_max_lr)


def schedule_free_scalars(learning_rate, beta1, beta2, eps, weight_decay, c, step):
  """The scalars of ``SCHEDULE_FREE_ADAMW_RULE`` at ``step`` (0-based) with averaging weight
  ``c``; ``1 - b1`` from the exact ``b1`` (a Python number), ``1 - c`` in float32 as optax."""
  c = jnp.asarray(c, F32)
  return {"lr": f32(learning_rate), "b2": f32(beta2), "one_minus_b2": f32(1. - beta2),
          "bias_corr2": bias_correction(beta2, step), "eps": f32(eps), "wd": f32(weight_decay),
          "b1": f32(beta1), "one_minus_b1": f32(1. - beta1), "ck": c, "one_minus_ck": 1.0 - c}


def eval_params(y, z, b1):
  """The point to evaluate, ``x = (y - (1-b1) z) / b1``, per leaf (optax's
  ``schedule_free_eval_params``)."""
  return (y - (1.0 - b1) * z) / b1


# ----------------------------------------------------------------------------- the flax.optim API

@struct.dataclass
class _ScheduleFreeHyperParams:
  learning_rate: Any
  beta1: Any
  beta2: Any
  eps: Any
  weight_decay: Any
  weight_lr_power: Any


@param_state
class _ScheduleFreeParamState(ParamState):
  """Schedule-free AdamW's per-parameter state: the second moment and the ``z`` sequence."""
  grad_sq_ema: Any
  z: Any


@struct.dataclass
class ScheduleFreeOptimizerState(OptimizerState):
  """flax.optim's ``OptimizerState`` (``step``, ``param_states``) and schedule-free's
  optimizer-wide averaging scalars (float32): the sum of the averaging weights so far and the
  largest learning rate so far."""
  weight_sum: Any = None
  max_lr: Any = None


class ScheduleFreeAdamW(FlatOptimizerDef):
  """Schedule-free AdamW (Defazio et al. 2024; the module docstring has the equations).

  The params are the training point ``y``; ``eval_params(optimizer)`` gives the point to
  evaluate and ship, ``x = (y - (1-b1) z) / b1``. The learning rate may change every step
  (``apply_gradient(g, learning_rate=lr_t)``: a warmup, as the paper recommends; no decay is
  needed); the averaging weight of a step is ``max_{i<=t}(lr_i)^weight_lr_power`` over the sum
  of those so far, kept in the state (``ScheduleFreeOptimizerState``). State per parameter:
  ``grad_sq_ema``, ``z`` (``z`` starts at the params). ``shard_optimizer`` keeps the scalars
  replicated; ``MultiOptimizer`` keeps them per sub-optimizer (schedule-free parts fuse into one
  pass); flax's per-leaf state form has no place for them (a clear error says so).

  Args:
    learning_rate: the step size (no default, as flax's optimizers).
    beta1: the interpolation between ``z`` and the average ``x`` (0.9; in (0, 1]).
    beta2: the decay of the second moment (0.999).
    eps: added to the square root of the second moment (1e-8).
    weight_decay: decoupled weight decay at ``y``, scaled by the learning rate (0.0).
    weight_lr_power: the power of the learning rate in the averaging weight (2.0).
  """
  state_fields = ("grad_sq_ema", "z")
  nonnegative_fields = ('grad_sq_ema',)
  param_state_class = _ScheduleFreeParamState
  has_outer_state = True

  def __init__(self, learning_rate=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
               weight_lr_power=2.0, *, backend="auto", master_weights=False, state_dtype=None,
               stochastic_rounding=False, rounding_seed=0):
    super().__init__(_ScheduleFreeHyperParams(learning_rate, beta1, beta2, eps, weight_decay,
                                              weight_lr_power), backend,
                     master_weights=master_weights, state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, "learning_rate", "beta1", "beta2", "eps", "weight_decay",
                "weight_lr_power")

  def validate(self, hp):
    check_range(hp, "learning_rate", 0.0)
    check_range(hp, "beta1", 0.0, 1.0, lo_open=True)
    check_beta(hp, "beta2")
    check_range(hp, "eps", 0.0)
    check_range(hp, "weight_decay", 0.0)
    check_range(hp, "weight_lr_power")

  def rule(self, hp):
    return SCHEDULE_FREE_ADAMW_RULE

  def initial_fields(self, layout, params):
    fields = super().initial_fields(layout, params)
    leaves = jax.tree_util.tree_leaves(params)   # z starts at the params, in its field's dtype
    def packed(g, buf):
      if quantization.is_quantized(buf):
        return quantization.quantize_like(layout.pack_group(leaves, g, F32), buf)
      return layout.pack_group(leaves, g, buf.dtype)
    fields["z"] = tuple(packed(g, buf) for g, buf in enumerate(fields["z"]))
    return fields

  def initial_state(self, step, param_states):
    return ScheduleFreeOptimizerState(step, param_states, weight_sum=jnp.zeros([], F32),
                                      max_lr=jnp.zeros([], F32))

  def init_param_state(self, param):
    raise NotImplementedError(
        "ScheduleFreeAdamW keeps optimizer-wide state (its averaging weights), which flax's "
        "per-leaf state form has no place for: use its flat state (ScheduleFreeAdamW(...)"
        ".create(params))")

  def apply_param_gradient(self, step, hyper_params, param, state, grad):
    self.init_param_state(param)   # raises: see there

  def step_context(self, hp, state, guard=None):
    if not isinstance(state, ScheduleFreeOptimizerState):
      raise TypeError(f"ScheduleFreeAdamW needs its own state (ScheduleFreeOptimizerState, from "
                      f"create()/init_state()); got {type(state).__name__}")
    c, max_lr, total = averaging_weight(jnp.asarray(state.max_lr, F32),
                                        jnp.asarray(state.weight_sum, F32),
                                        f32(hp.learning_rate), f32(hp.weight_lr_power))
    return super().step_context(hp, state, guard).replace(
        outer={"c": c, "max_lr": max_lr, "weight_sum": total})

  def next_state(self, state, inc, param_states, ctx):
    weight_sum, max_lr = advanced_scalars(inc, state.weight_sum, state.max_lr,
                                          ctx.outer["weight_sum"], ctx.outer["max_lr"])
    return super().next_state(state, inc, param_states, ctx).replace(weight_sum=weight_sum,
                                                                      max_lr=max_lr)

  def step_scalars(self, hp, ctx):
    if ctx.outer is None:
      raise NotImplementedError("ScheduleFreeAdamW's step needs the averaging weight from its "
                                "own state (step_context); this driver does not provide it")
    return schedule_free_scalars(hp.learning_rate, hp.beta1, hp.beta2, hp.eps, hp.weight_decay,
                                 ctx.outer["c"], ctx.step)

  def scalars(self, hp, step):
    raise NotImplementedError("ScheduleFreeAdamW's scalars need the step's averaging weight "
                              "(StepContext.outer): see step_scalars")

  def eval_params(self, optimizer):
    """The point to evaluate, ``x = (y - (1-b1) z) / b1`` per leaf, from an ``Optimizer`` of
    this definition (its target ``y`` and state ``z``), in the params' dtypes."""
    ps = optimizer.state.param_states
    if not isinstance(ps, FlatState):
      raise TypeError("eval_params needs ScheduleFreeAdamW's flat state")
    b1 = self.hyper_params.beta1
    leaves = [eval_params(jnp.asarray(y, F32), jnp.asarray(ps.leaf("z", i), F32), b1
                          ).astype(jnp.result_type(y))
              for i, y in enumerate(jax.tree_util.tree_leaves(optimizer.target))]
    return jax.tree_util.tree_unflatten(ps.layout.treedef, leaves)
