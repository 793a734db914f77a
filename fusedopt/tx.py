"""optax ``GradientTransformation``s that run fusedopt's flat engine and fused kernels.

``from fusedopt import tx`` gives drop-in replacements for optax's optimizer aliases, with optax's
argument names, defaults and formulas::

  from fusedopt import tx
  opt = tx.adamw(1e-3, weight_decay=0.01)           # like optax.adamw(1e-3, weight_decay=0.01)
  state = opt.init(params)
  updates, state = opt.update(grads, state, params)
  params = optax.apply_updates(params, updates)

They work wherever an optax transformation does: ``flax.training.train_state.TrainState``,
``flax.nnx.Optimizer``, ``optax.inject_hyperparams``, ``optax.chain``, ``jax.jit`` with donation.
Underneath, each keeps its state in fusedopt's ``FlatState`` (one contiguous buffer per state field
per dtype) and runs the built-in optimizer's ``Rule`` (``fusedopt.elementwise``) over every dtype
group in one pass with the selected backend (``native`` C++ on CPU, Pallas on GPU/TPU, ``jnp``).

**Updates from new parameters.** A fused rule computes the new parameters ``p'`` directly (that is
what the kernels write). ``update`` returns ``u = p' - p`` computed in the parameter dtype, so that
``optax.apply_updates(p, u) = p + u`` gives back ``p'``:

* By Sterbenz' lemma, ``p' - p`` is exact in any binary floating-point format (float32, bfloat16,
  float16) whenever ``p/2 <= p' <= 2p`` -- the usual case of an update smaller than the parameter
  -- and then ``p + u == p'`` bitwise: ``apply_updates`` reproduces the fused result exactly.
* Otherwise (a parameter crossing zero, or ``|p|`` tiny next to its update) ``u`` is rounded once
  and ``p + u`` is within 1.5 ulp of ``max(|p|, |p'|)`` of ``p'``: the size of the rounding optax
  itself makes in ``p + u``. Where ``p == 0`` exactly, ``u == p'`` and the result is exact again.

An in-kernel delta (writing ``p' - p`` instead of ``p'``) would round twice for bfloat16/float16
parameters (once to the delta's dtype, once in ``p + u``); subtracting the *rounded* ``p'`` keeps
the Sterbenz argument valid in every dtype, at the price of one elementwise pass that XLA fuses
with ``apply_updates`` when both are in the same ``jit``.

**Parameters.** Optimizers whose math reads ``p`` (weight decay, LAMB and LARS trust ratios,
Adafactor's parameter scale) require ``params`` in ``update`` (``ValueError`` otherwise, as optax);
the others accept ``params=None`` and then compute the update from ``p = 0``, which gives optax's
update exactly (``0 - lr * x == -(lr * x)``).

**Hyper-parameters and schedules.** Every numeric hyper-parameter may be a schedule (a callable of
the step count): it is evaluated, like optax's, at the number of updates applied so far (an int32
array in the state), and enters the kernels as a float32 runtime value, so nothing recompiles.
``optax.inject_hyperparams(tx.adamw)(learning_rate=...)`` works (injected values arrive as arrays
or tracers). Concrete values are validated at construction (``HyperParamError`` naming the
argument); where optax's formula for some argument value cannot be matched
(``rmsprop(momentum=...)``, ...) the constructor raises ``NotImplementedError`` naming it.

**Fused clipping and skipping.** ``clip_global_norm=c`` (keyword-only, every optimizer) or
``tx.chain(optax.clip_by_global_norm(c), tx.adamw(...))`` folds clipping into the update: one read
of the gradients gives their global norm, and the kernels multiply ``g`` by
``min(1, c / ||g||)`` (``optax.clip_by_global_norm``'s factor) on the fly -- no clipped copy of
the gradients is written. ``skip_nonfinite=True`` additionally leaves parameters, state and
count unchanged (zero updates) when a gradient is not finite, decided on the device.

**fusedopt extras** (keyword-only, after optax's arguments): ``backend`` (``"auto"``, ``"jnp"``,
``"native"``, ``"pallas"``, ``"pallas_interpret"``, ``"triton"``, ``"triton_interpret"``),
``state_dtype`` (storage dtype of the state
buffers, float32 by default), ``clip_global_norm``, ``skip_nonfinite``.

**State.** ``FusedState(count, inner)``: ``count`` the int32 number of updates, ``inner`` a
``FlatState`` (Adafactor: a tuple of per-leaf ``_AdafactorParamState``s). It is a pytree that passes through
``jit``, donation, ``lax.scan``, ``flax.serialization`` (``FlatState`` is registered by
``fusedopt.serialization`` when flax is installed: the flat buffers are written per leaf,
``{field: array}`` mirroring the parameters, independent of the layout) and ``nnx.Optimizer``
(which re-wraps the leaves into variables).

Import cost: this module imports optax; ``import fusedopt`` does not import it.
"""
import dataclasses
import functools
import numbers
import types
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import elementwise, norms
from .adafactor import Adafactor
from .adagrad import Adagrad, adagrad_rule
from .adam import Adam, adam_rule, moment_scalars
from .base import HyperParamError
from .flat import (FlatState, concrete_float, bias_correction, check_range, check_scalar,
                   gradient_prepass)
from .step import StepContext
from .lamb import LAMB, lamb_rules
from .lars import LARS, lars_rule, trust_ratio
from .layout import FlatLayout, LayoutError
from .momentum import Momentum, momentum_rule
from .rmsprop import RMSProp, rmsprop_rule
from .sgd import GradientDescent, SGD_RULE

F32 = jnp.float32

__all__ = [
    "FusedState", "adafactor", "adagrad", "adam", "adamw", "chain", "clip_by_global_norm",
    "lamb", "lars", "nadam", "nadamw", "rmsprop", "sgd",
]


class FusedState(NamedTuple):
  """State of a fused transformation.

  Attributes:
    count: int32 scalar, the number of updates applied (schedules are evaluated at it; with
      ``skip_nonfinite`` a skipped step does not count).
    inner: the optimizer state: a ``fusedopt.FlatState`` (Adafactor: a tuple with one
      ``_AdafactorParamState`` per parameter leaf, in leaf order).
  """
  count: Any
  inner: Any


# ----------------------------------------------------------------------------- hyper-parameters

def _is_schedule(x):
  return callable(x) and not isinstance(x, (jax.Array, np.ndarray))


def _check_kind(name, x, allow_none=False):
  """A hyper-parameter is a number, an array (possibly traced) or a schedule."""
  if x is None and allow_none:
    return
  if isinstance(x, (bool, np.bool_)) or not (
      isinstance(x, (numbers.Number, jax.Array, np.ndarray, np.generic)) or _is_schedule(x)):
    raise HyperParamError(f"hyper-parameter {name}={x!r} must be a number, an array or a "
                          "schedule (a callable of the step count)")


def _validate(ranges, values):
  """``ranges``: name -> kwargs of ``check_range``; concrete values are checked, tracers and
  schedules are not (a schedule's values are traced)."""
  ns = types.SimpleNamespace(**values)
  for name, kw in ranges.items():
    x = values[name]
    _check_kind(name, x, allow_none=kw.get("allow_none", False))
    if not _is_schedule(x):
      check_range(ns, name, **kw)


_LR = dict(lo=0.0)
_NONNEG = dict(lo=0.0)
_BETA = dict(lo=0.0, hi=1.0, hi_open=True)
_DECAY = dict(lo=0.0, hi=1.0)


def _at(x, count):
  """``x`` at step ``count``: a schedule is called with the int32 count (as optax does); a Python
  number stays one (bias corrections then use its float64 value); arrays become float32; None
  (an optional feature that is off) stays None."""
  if x is None:
    return None
  if _is_schedule(x):
    return jnp.asarray(x(count), F32)
  if isinstance(x, numbers.Number):
    return x
  return jnp.asarray(x, F32)


def _is_zero(x):
  """True if ``x`` is known to be 0 at trace time (a Python number or a concrete array)."""
  if _is_schedule(x):
    return False
  try:
    return float(np.asarray(x)) == 0.0
  except Exception:  # pylint: disable=broad-except  (tracers)
    return False


def _no(name, value, default, why):
  """NotImplementedError for an optax argument whose formula fusedopt does not implement."""
  same = value is default if default is None or isinstance(default, bool) else value == default
  if not same:
    raise NotImplementedError(f"{name}={value!r} is not supported by fusedopt.tx ({why}); "
                              f"use optax's own optimizer for it")


def _mask_vector(mask, params, n):
  """optax's ``mask`` (a tree of bools, a prefix of the params tree, or a callable of the params)
  as a float32 [n] vector in the params' leaf order (1 = apply)."""
  if params is None:
    raise ValueError("a mask needs `params` in update()")
  if callable(mask):
    mask = mask(params)
  full = jax.tree_util.tree_map(
      lambda m, sub: jax.tree_util.tree_map(lambda _: m, sub), mask, params)
  leaves = jax.tree_util.tree_leaves(full)
  if len(leaves) != n:
    raise ValueError(f"mask has {len(leaves)} leaves for {n} parameters")
  return jnp.stack([jnp.asarray(m, F32) for m in leaves])


# ----------------------------------------------------------------------------- the engine

def _compatible_layout(layout: FlatLayout, tree, what):
  """``layout`` with the tree structure of ``tree`` when only the containers differ.

  ``nnx.Optimizer`` initialises with a tree of ``nnx.Param`` variables and updates with the bare
  arrays: same leaves, another treedef. The buffers' offsets depend only on the leaves' shapes and
  dtypes (checked by ``FlatLayout.check`` afterwards), so the layout carries over."""
  treedef = jax.tree_util.tree_structure(tree)
  if treedef == layout.treedef:
    return layout
  if treedef.num_leaves != len(layout.segments):
    raise LayoutError(f"{what} has {treedef.num_leaves} leaves, the optimizer state was built for "
                      f"{len(layout.segments)}:\n  state: {layout.treedef}\n  {what}: {treedef}")
  return dataclasses.replace(layout, treedef=treedef)


class _Runner:
  """Runs rules with the optimizer's backend in one step context: ``p' - p`` for float32 groups
  (``StepContext.deltas``) and, inside a checked step, every rule ``guarded`` (``g`` multiplied
  by ``gscale``, the clip factor; a non-finite step keeps everything)."""

  def __init__(self, opt_def, guard, count):
    self.opt_def = opt_def
    self.ctx = StepContext(count, guard=guard, deltas=True)
    self.gscale = F32(1.0) if guard is None else guard["gscale"]

  def run(self, rule, scalars, seg, layout, p, g, fields):
    return self.opt_def.run_rule(rule, scalars, seg, self.ctx, layout, p, g, fields)

  def run_sumsq(self, rule, scalars, seg, layout, p, g, fields):
    return self.opt_def.run_rule_sumsq(rule, scalars, seg, self.ctx, layout, p, g, fields)


def _per_segment(rule, scalars, seg, n, overrides):
  """``rule`` with every scalar per tensor (``elementwise.per_segment``): broadcast ``scalars``
  to [n] vectors and replace those in ``overrides`` (a masked weight decay)."""
  table = {k: jnp.broadcast_to(jnp.asarray(scalars[k], F32), (n,)) for k in rule.scalars}
  table.update(seg)
  table.update(overrides)
  return elementwise.per_segment(rule), table


@dataclasses.dataclass(frozen=True, eq=False)
class _Spec:
  """What a fused transformation does (see ``_transformation``).

  Attributes:
    name: the optax alias it replaces (for error messages).
    opt_def: a built-in ``FlatOptimizerDef`` (backend, state fields and dtype) or ``Adafactor``.
    hyper: optax-named hyper-parameters (values or schedules), evaluated per step by ``_at``.
    step: ``step(hp, count, runner, layout, p_leaves, g_leaves, fields, params) ->
      (new_p_leaves, new_fields)``; ``hp`` a namespace of the values at ``count``.
    init_fill: field -> hyper-parameter name whose (concrete) value fills it at init (optax's
      ``initial_scale`` / ``initial_accumulator_value``).
    needs_params: whether ``update`` needs ``params`` (``bool`` or a function of ``hyper``).
    clip: global-norm clipping threshold (or None); skip_nonfinite: skip non-finite steps.
    per_leaf: the optimizer runs per leaf (Adafactor), its state a tuple of per-leaf dicts.
    wd_mask: Adafactor's ``weight_decay_mask``.
  """
  name: str
  opt_def: Any
  hyper: dict
  step: Callable
  init_fill: dict = dataclasses.field(default_factory=dict)
  needs_params: bool = False
  clip: Any = None
  skip_nonfinite: bool = False
  per_leaf: bool = False
  wd_mask: Any = None


class _FusedUpdate:
  """The ``update`` function of a fused transformation (a callable object, so that ``tx.chain``
  can recognise it and fold a preceding ``clip_by_global_norm`` into it)."""

  def __init__(self, spec: _Spec):
    self.spec = spec

  def __call__(self, updates, state, params=None, **extra_args):
    del extra_args
    spec = self.spec
    if not isinstance(state, FusedState):
      raise TypeError(f"fusedopt.tx.{spec.name}: expected the FusedState made by its init(), got "
                      f"{type(state).__name__}")
    if params is None and spec.needs_params:
      raise ValueError(f"fusedopt.tx.{spec.name} reads the parameters (weight decay, trust "
                       "ratio or parameter scale): call update(grads, state, params)")
    count = state.count
    hp = types.SimpleNamespace(**{k: _at(v, count) for k, v in spec.hyper.items()})
    g_leaves, g_def = jax.tree_util.tree_flatten(updates)
    if spec.clip is not None or spec.skip_nonfinite:
      finite, _, gscale = gradient_prepass(g_leaves, None, spec.clip)
      ok = finite.astype(F32) if spec.skip_nonfinite else F32(1.0)
      guard = {"gscale": gscale, "ok": ok}
    else:
      finite, guard = None, None
    if spec.per_leaf:
      new_p, p_leaves, inner = _per_leaf_step(spec, hp, count, guard, finite, state.inner,
                                              updates, g_leaves, params)
    else:
      new_p, p_leaves, inner = _flat_step(spec, hp, count, guard, state.inner, updates, g_leaves,
                                          params)
    if params is None:
      u = new_p                                  # computed from p = 0: optax's update exactly
    elif spec.per_leaf:
      u = [n - p for n, p in zip(new_p, p_leaves)]   # exact when p/2 <= p' <= 2p (Sterbenz)
    else:   # the kernels already returned p' - p for float32 params (``with_param_deltas``)
      u = [n if jnp.result_type(p) == F32 else n - p for n, p in zip(new_p, p_leaves)]
    new_count = count + (finite.astype(count.dtype) if spec.skip_nonfinite else 1)
    return jax.tree_util.tree_unflatten(g_def, u), FusedState(new_count, inner)


def _flat_step(spec, hp, count, guard, flat, updates, g_leaves, params):
  if not isinstance(flat, FlatState):
    raise TypeError(f"fusedopt.tx.{spec.name}: state.inner is a {type(flat).__name__}, expected "
                    "a FlatState")
  if params is None:
    layout = _compatible_layout(flat.layout, updates, "grads")
    p_leaves = [jnp.zeros(s.shape, layout.groups[s.group].dtype) for s in layout.segments]
  else:   # the grads must have the params' tree structure (LayoutError naming both otherwise)
    layout = _compatible_layout(flat.layout, params, "params")
    p_leaves = layout.check(params, "params", allow_other_float=False)
  g_leaves = layout.check(updates, "grads")
  runner = _Runner(spec.opt_def, guard, count)
  new_p, fields = spec.step(hp, count, runner, layout, p_leaves, g_leaves, flat.fields, params)
  # keep the state's own layout (treedef): the opt-state pytree never changes structure
  return new_p, p_leaves, FlatState(fields, flat.layout)


def _transformation(spec: _Spec) -> optax.GradientTransformationExtraArgs:
  def init(params):
    if spec.per_leaf:
      return FusedState(jnp.zeros([], jnp.int32),
                        tuple(spec.opt_def.init_param_state(p)
                              for p in jax.tree_util.tree_leaves(params)))
    layout = FlatLayout.build(params)
    fields = {}
    for k in spec.opt_def.all_state_fields:
      sd = spec.opt_def.storage_of(k)
      fill = spec.init_fill.get(k)
      if fill is None or _is_zero(spec.hyper[fill]):
        fields[k] = layout.zeros(sd)
      else:
        v = spec.hyper[fill]
        fields[k] = tuple(layout.pack_group([jnp.full(s.shape, v, sd) for s in layout.segments],
                                            g, sd)
                          for g in range(len(layout.groups)))
    return FusedState(jnp.zeros([], jnp.int32), FlatState(fields, layout))

  return optax.GradientTransformationExtraArgs(init, _FusedUpdate(spec))


def _common(name, opt_def, hyper, step, *, clip_global_norm, skip_nonfinite, **kw):
  if clip_global_norm is not None:
    _check_kind("clip_global_norm", clip_global_norm)
    if _is_schedule(clip_global_norm):
      raise HyperParamError("clip_global_norm must be a number or an array, not a schedule")
    check_scalar("clip_global_norm", clip_global_norm)
    v = concrete_float(clip_global_norm)
    if v is not None and not v > 0:
      raise HyperParamError(f"clip_global_norm={v} must be positive")
  return _transformation(_Spec(name, opt_def, hyper, step, clip=clip_global_norm,
                               skip_nonfinite=bool(skip_nonfinite), **kw))


# ----------------------------------------------------------------------------- Adam family

def _adam_scalars(hp, count, wd):
  """The scalars of ``adam_rule`` / ``lamb_rules`` (every variant's) from optax's names."""
  s = moment_scalars(types.SimpleNamespace(learning_rate=hp.learning_rate, beta1=hp.b1,
                                           beta2=hp.b2, eps=hp.eps), count)
  s["lr_wd"] = jnp.asarray(hp.learning_rate * wd, F32)
  s["eps_root"] = jnp.asarray(hp.eps_root, F32)
  s["bias_corr1_next"] = bias_correction(hp.b1, count + 1)
  return s


def _adam_step(nesterov, eps_root_zero, mask):
  def step(hp, count, run, layout, p, g, fields, params):
    wd = getattr(hp, "weight_decay", 0.0)
    s = _adam_scalars(hp, count, wd)
    rule = adam_rule(nesterov=nesterov, eps_root=not eps_root_zero)
    seg = {}
    if mask is not None:
      m = _mask_vector(mask, params, len(layout.segments))
      rule, seg = _per_segment(rule, s, {}, len(layout.segments), {"lr_wd": s["lr_wd"] * m})
    return run.run(rule, s, seg, layout, p, g, fields)
  return step


def _adam_like(name, learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask,
               nesterov, backend, state_dtype, clip_global_norm, skip_nonfinite):
  hyper = dict(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root)
  ranges = dict(learning_rate=_LR, b1=_BETA, b2=_BETA, eps=_NONNEG, eps_root=_NONNEG)
  if weight_decay is not None:
    hyper["weight_decay"] = weight_decay
    ranges["weight_decay"] = _NONNEG
  _validate(ranges, hyper)
  if mu_dtype is not None:   # optax: the first moment's dtype; the second keeps state_dtype's
    base = F32 if state_dtype is None else state_dtype
    state_dtype = {"grad_ema": mu_dtype, "grad_sq_ema": base}
  opt_def = Adam(0.0, backend=backend, state_dtype=state_dtype)
  step = _adam_step(bool(nesterov), _is_zero(eps_root), mask)
  return _common(name, opt_def, hyper, step, clip_global_norm=clip_global_norm,
                 skip_nonfinite=skip_nonfinite, needs_params=weight_decay is not None)


def adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, *,
         nesterov=False, backend="auto", state_dtype=None, clip_global_norm=None,
         skip_nonfinite=False) -> optax.GradientTransformationExtraArgs:
  r"""Adam (optax.adam), fused.

  .. math::
    m_t = b_1 m_{t-1} + (1-b_1) g_t,\quad v_t = b_2 v_{t-1} + (1-b_2) g_t^2 \\
    u_t = -\eta_t\, \frac{m_t / (1-b_1^t)}{\sqrt{v_t/(1-b_2^t) + \epsilon_{root}} + \epsilon}

  ``nesterov=True`` uses Nadam's ``m_hat`` (Dozat 2016), as optax. State: the flat buffers
  ``grad_ema``, ``grad_sq_ema`` (float32, or ``state_dtype``); ``mu_dtype`` (optax's) stores
  the first moment in that dtype (computed in float32, rounded to nearest when stored).
  Bias corrections are computed accurately in float32 (``fusedopt.flat.bias_correction``);
  optax's ``1 - b**t`` rounds ``b`` first (relative differences ~1e-6 in early steps).

  References:
    Kingma & Ba, 2014: https://arxiv.org/abs/1412.6980;
    Dozat, 2016: https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ
  """
  return _adam_like("adam", learning_rate, b1, b2, eps, eps_root, mu_dtype, None, None,
                    nesterov, backend, state_dtype, clip_global_norm, skip_nonfinite)


def adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None,
          weight_decay=1e-4, mask=None, *, nesterov=False, backend="auto", state_dtype=None,
          clip_global_norm=None, skip_nonfinite=False) -> optax.GradientTransformationExtraArgs:
  r"""AdamW (optax.adamw), fused: Adam with decoupled weight decay scaled by the learning rate.

  .. math::
    u_t = -\eta_t \left(\frac{m_t / (1-b_1^t)}{\sqrt{v_t/(1-b_2^t) + \epsilon_{root}} + \epsilon}
          + \lambda_t\, p_{t-1}\right)

  This is fusedopt's (and flax 0.5.3's) ``Adam(weight_decay=)`` rule: ``lr * wd * p`` with the
  un-updated ``p``. ``mask`` (a tree of bools, a prefix of the params, or a callable of the
  params; True = decay) is applied as a per-tensor weight decay (the rule runs with per-tensor
  scalars, ``elementwise.per_segment``). Requires ``params`` in ``update``.

  References:
    Loshchilov & Hutter, 2019: https://arxiv.org/abs/1711.05101
  """
  if weight_decay is None:
    raise HyperParamError("hyper-parameter weight_decay is None")
  return _adam_like("adamw", learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask,
                    nesterov, backend, state_dtype, clip_global_norm, skip_nonfinite)


nadam = functools.partial(adam, nesterov=True)
nadam.__doc__ = "Nadam: ``adam(..., nesterov=True)`` (optax.nadam), fused."
nadamw = functools.partial(adamw, nesterov=True)
nadamw.__doc__ = "NadamW: ``adamw(..., nesterov=True)`` (optax.nadamw), fused."


# ----------------------------------------------------------------------------- SGD

def sgd(learning_rate, momentum=None, nesterov=False, accumulator_dtype=None, *,
        backend="auto", clip_global_norm=None, skip_nonfinite=False
        ) -> optax.GradientTransformationExtraArgs:
  r"""SGD with optional (Nesterov) momentum (optax.sgd), fused.

  .. math::
    m_t = \beta m_{t-1} + g_t,\qquad
    u_t = -\eta_t\, m_t \ \text{ or (nesterov) }\ -\eta_t (g_t + \beta m_t)

  The momentum buffer (``momentum`` field, in ``accumulator_dtype`` or float32) is fusedopt's
  ``Momentum`` rule with zero weight decay; ``momentum=None`` is plain gradient descent (no
  state). As in optax, the learning rate multiplies the trace (a schedule rescales the whole
  accumulated direction).

  References:
    Sutskever et al., 2013: http://proceedings.mlr.press/v28/sutskever13.pdf
  """
  hyper = dict(learning_rate=learning_rate)
  ranges = dict(learning_rate=_LR)
  if momentum is not None:
    hyper["momentum"] = momentum
    ranges["momentum"] = _DECAY
  _validate(ranges, hyper)
  if momentum is None:
    opt_def = GradientDescent(0.0, backend=backend)

    def step(hp, count, run, layout, p, g, fields, params):
      return run.run(SGD_RULE, {"lr": hp.learning_rate}, {}, layout, p, g, fields)
  else:
    opt_def = Momentum(0.0, backend=backend, state_dtype=accumulator_dtype)
    rule = momentum_rule(bool(nesterov))

    def step(hp, count, run, layout, p, g, fields, params):
      s = {"lr": hp.learning_rate, "beta": hp.momentum, "wd": F32(0.0)}
      return run.run(rule, s, {}, layout, p, g, fields)
  return _common("sgd", opt_def, hyper, step, clip_global_norm=clip_global_norm,
                 skip_nonfinite=skip_nonfinite)


# ----------------------------------------------------------------------------- RMSProp, Adagrad

def rmsprop(learning_rate, decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=True,
            centered=False, momentum=None, nesterov=False, bias_correction=False, *,
            backend="auto", state_dtype=None, clip_global_norm=None, skip_nonfinite=False
            ) -> optax.GradientTransformationExtraArgs:
  r"""RMSProp (optax.rmsprop), fused.

  .. math::
    v_t = d\, v_{t-1} + (1-d)\, g_t^2,\qquad
    u_t = -\eta_t\, \frac{g_t}{\sqrt{v_t + \epsilon}}\ \text{(eps_in_sqrt, optax's default)}
    \ \text{ or }\ -\eta_t\, \frac{g_t}{\sqrt{v_t} + \epsilon}

  ``centered=True`` subtracts the squared mean gradient ``mg_t^2`` from ``v_t`` (Graves 2013).
  ``eps_in_sqrt=False`` is fusedopt's ``RMSProp`` rule; ``eps_in_sqrt=True`` its optax-form
  variant ``rmsprop_rule(centered, eps_in_sqrt=True)`` (``g / sqrt(v + eps)``; optax computes
  ``g * rsqrt(v + eps)``, equal to ~1 ulp).
  ``initial_scale`` fills ``v`` at init. ``momentum``, ``nesterov`` and ``bias_correction=True``
  raise ``NotImplementedError``.

  References:
    Tieleman & Hinton, 2012 (lecture 6.5); Graves, 2013: https://arxiv.org/abs/1308.0850
  """
  _no("momentum", momentum, None, "no momentum trace after RMSProp's scaling")
  _no("nesterov", nesterov, False, "no momentum trace after RMSProp's scaling")
  _no("bias_correction", bias_correction, False, "no bias-corrected RMSProp rule")
  hyper = dict(learning_rate=learning_rate, decay=decay, eps=eps, initial_scale=initial_scale)
  _validate(dict(learning_rate=_LR, decay=_BETA, eps=_NONNEG, initial_scale=_NONNEG), hyper)
  if _is_schedule(initial_scale):
    raise HyperParamError("initial_scale must be a number (it fills the state at init)")
  opt_def = RMSProp(0.0, centered=bool(centered), backend=backend, state_dtype=state_dtype)
  rule = rmsprop_rule(bool(centered), eps_in_sqrt=bool(eps_in_sqrt))

  def step(hp, count, run, layout, p, g, fields, params):
    s = {"lr": hp.learning_rate, "b2": hp.decay, "one_minus_b2": _one_minus(hp.decay),
         "eps": hp.eps}
    return run.run(rule, s, {}, layout, p, g, fields)
  return _common("rmsprop", opt_def, hyper, step, clip_global_norm=clip_global_norm,
                 skip_nonfinite=skip_nonfinite, init_fill={"v": "initial_scale"})


def _one_minus(x):
  return 1.0 - x if isinstance(x, numbers.Number) else F32(1.0) - x


def adagrad(learning_rate, initial_accumulator_value=0.1, eps=1e-7, *, backend="auto",
            state_dtype=None, clip_global_norm=None, skip_nonfinite=False
            ) -> optax.GradientTransformationExtraArgs:
  r"""Adagrad (optax.adagrad), fused.

  .. math::
    G_t = G_{t-1} + g_t^2,\qquad u_t = -\eta_t\, \frac{g_t}{\sqrt{G_t + \epsilon}}
    \ (0 \text{ where } G_t = 0)

  ``G_0 = initial_accumulator_value``. optax's form (eps inside the square root) differs from
  fusedopt's ``Adagrad`` (``g / (sqrt(G) + eps)``): this runs the variant
  ``adagrad_rule(eps_in_sqrt=True)`` on ``Adagrad``'s flat state (field ``G``).

  References:
    Duchi et al., 2011: https://jmlr.org/papers/v12/duchi11a.html
  """
  hyper = dict(learning_rate=learning_rate, eps=eps,
               initial_accumulator_value=initial_accumulator_value)
  _validate(dict(learning_rate=_LR, eps=_NONNEG, initial_accumulator_value=_NONNEG), hyper)
  if _is_schedule(initial_accumulator_value):
    raise HyperParamError("initial_accumulator_value must be a number (it fills the state)")
  opt_def = Adagrad(0.0, backend=backend, state_dtype=state_dtype)
  rule = adagrad_rule(eps_in_sqrt=True)

  def step(hp, count, run, layout, p, g, fields, params):
    return run.run(rule, {"lr": hp.learning_rate, "eps": hp.eps}, {}, layout, p, g, fields)
  return _common("adagrad", opt_def, hyper, step, clip_global_norm=clip_global_norm,
                 skip_nonfinite=skip_nonfinite, init_fill={"G": "initial_accumulator_value"})


# ----------------------------------------------------------------------------- LAMB, LARS

def lamb(learning_rate, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0, weight_decay=0.0, mask=None,
         *, backend="auto", state_dtype=None, clip_global_norm=None, skip_nonfinite=False
         ) -> optax.GradientTransformationExtraArgs:
  r"""LAMB (optax.lamb), fused.

  .. math::
    d_t = \frac{m_t/(1-b_1^t)}{\sqrt{v_t/(1-b_2^t) + \epsilon_{root}} + \epsilon}
          + \lambda_t p_{t-1},\qquad
    u_t = -\eta_t\, \frac{\|p_{t-1}\|}{\|d_t\|}\, d_t

  per tensor, the trust ratio 1 where either norm is 0 (optax's and the paper's convention, and
  fusedopt's ``LAMB``). Two passes over the flat buffers: the moments (which also return the
  per-tensor norms), then the update. ``mask`` (weight decay only, as optax) runs the rules with
  per-tensor scalars. Requires ``params`` in ``update``.

  References:
    You et al., 2019: https://arxiv.org/abs/1904.00962
  """
  hyper = dict(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
               weight_decay=weight_decay)
  _validate(dict(learning_rate=_LR, b1=_BETA, b2=_BETA, eps=_NONNEG, eps_root=_NONNEG,
                 weight_decay=_NONNEG), hyper)
  opt_def = LAMB(0.0, backend=backend, state_dtype=state_dtype)
  moments, apply_rule = lamb_rules(eps_root=not _is_zero(eps_root))

  def step(hp, count, run, layout, p, g, fields, params):
    s = _adam_scalars(hp, count, 0.0)
    s["wd"] = jnp.asarray(hp.weight_decay, F32)
    n = len(layout.segments)
    mrule, arule, seg = moments, apply_rule, {}
    if mask is not None:
      wd = {"wd": s["wd"] * _mask_vector(mask, params, n)}
      mrule, seg = _per_segment(moments, s, {}, n, wd)
      arule = elementwise.per_segment(apply_rule)
    _, fields, (p_sq, u_sq) = run.run_sumsq(mrule, s, seg, layout, p, g, fields)
    ratio_lr = norms.safe_ratio(jnp.sqrt(p_sq), jnp.sqrt(u_sq)) * jnp.asarray(s["lr"], F32)
    return run.run(arule, s, dict(seg, ratio_lr=ratio_lr), layout, p, g, fields)
  return _common("lamb", opt_def, hyper, step, clip_global_norm=clip_global_norm,
                 skip_nonfinite=skip_nonfinite, needs_params=True)


def lars(learning_rate, weight_decay=0.0, weight_decay_mask=True, trust_coefficient=0.001,
         eps=0.0, trust_ratio_mask=True, momentum=0.9, nesterov=False, *, backend="auto",
         state_dtype=None, clip_global_norm=None, skip_nonfinite=False
         ) -> optax.GradientTransformationExtraArgs:
  r"""LARS (optax.lars), fused.

  .. math::
    d_t = g_t + \lambda_t p_{t-1},\qquad
    r = \frac{\kappa \|p_{t-1}\|}{\|d_t\| + \epsilon}\ (1 \text{ if either norm is } 0),\qquad
    m_t = \beta m_{t-1} + \eta_t r d_t,\qquad u_t = -m_t\ \text{ or (nesterov) }
    -(\eta_t r d_t + \beta m_t)

  per tensor. optax's trust ratio divides by ``||g + wd p||``; fusedopt's ``LARS`` (the paper's
  form) by ``||g|| + wd ||p||``: here the ratio is optax's, computed per leaf from one fused
  reduction over ``g`` and ``p``, then fusedopt's ``LARS`` rule (momentum ``momentum``) runs
  with ``lr * r`` as its per-tensor learning rate. ``weight_decay_mask`` / ``trust_ratio_mask``
  (trees of bools, prefixes, or callables) apply per tensor. Requires ``params``.

  References:
    You et al., 2017: https://arxiv.org/abs/1708.03888
  """
  hyper = dict(learning_rate=learning_rate, weight_decay=weight_decay,
               trust_coefficient=trust_coefficient, eps=eps, momentum=momentum)
  _validate(dict(learning_rate=_LR, weight_decay=_NONNEG, trust_coefficient=_NONNEG,
                 eps=_NONNEG, momentum=_DECAY), hyper)
  opt_def = LARS(0.0, backend=backend, state_dtype=state_dtype)
  rule = lars_rule(bool(nesterov))
  wd_masked = weight_decay_mask is not True
  tr_masked = trust_ratio_mask is not True

  def step(hp, count, run, layout, p, g, fields, params):
    n = len(layout.segments)
    wd = jnp.broadcast_to(jnp.asarray(hp.weight_decay, F32), (n,))
    if wd_masked:
      wd = wd * _mask_vector(weight_decay_mask, params, n)
    gscale = run.gscale
    d = [jnp.asarray(gi, F32) * gscale + wd[i] * jnp.asarray(pi, F32)
         for i, (pi, gi) in enumerate(zip(p, g))]
    pn, dn = norms.per_leaf(p), norms.per_leaf(d)
    ratio = trust_ratio(jnp.asarray(hp.trust_coefficient, F32), pn, dn,
                        dn + jnp.asarray(hp.eps, F32))
    if tr_masked:
      ratio = jnp.where(_mask_vector(trust_ratio_mask, params, n) != 0, ratio, F32(1.0))
    seg = {"scaled_lr": jnp.asarray(hp.learning_rate, F32) * ratio}
    s = {"beta": hp.momentum, "wd": hp.weight_decay}
    r = rule
    if wd_masked:
      r, seg = _per_segment(rule, s, seg, n, {"wd": wd})
    return run.run(r, s, seg, layout, p, g, fields)
  return _common("lars", opt_def, hyper, step, clip_global_norm=clip_global_norm,
                 skip_nonfinite=skip_nonfinite, needs_params=True)


# ----------------------------------------------------------------------------- Adafactor

def _per_leaf_step(spec, hp, count, guard, finite, states, grads, g_leaves, params):
  opt_def = spec.opt_def
  if not isinstance(states, tuple) or len(states) != len(g_leaves):
    raise LayoutError(f"fusedopt.tx.{spec.name}: the state holds state for "
                      f"{len(states) if isinstance(states, tuple) else '?'} leaves, the grads "
                      f"have {len(g_leaves)}")
  if params is None:
    p_leaves = [jnp.zeros(jnp.shape(g), jnp.result_type(g)) for g in g_leaves]
  else:
    p_leaves = jax.tree_util.tree_leaves(params)
    if len(p_leaves) != len(g_leaves):
      raise LayoutError(f"params have {len(p_leaves)} leaves, grads {len(g_leaves)}")
  wdr = hp.weight_decay_rate
  if wdr is not None and spec.wd_mask is not None:
    wdr = jnp.asarray(wdr, F32) * _mask_vector(spec.wd_mask, params, len(g_leaves))
  base_hp = opt_def.hyper_params.replace(
      learning_rate=1.0 if hp.learning_rate is None else hp.learning_rate,
      beta1=hp.momentum, decay_rate=hp.decay_rate, step_offset=hp.decay_offset,
      clipping_threshold=hp.clipping_threshold, epsilon1=hp.eps)
  new_p, new_states = [], []
  for i, (p, st, g) in enumerate(zip(p_leaves, states, g_leaves)):
    # (1 - 0) * p == p: a masked-out leaf gets exactly the undecayed update
    h = base_hp.replace(weight_decay_rate=None if wdr is None else
                        (wdr[i] if spec.wd_mask is not None else wdr))
    if guard is not None:
      g = (jnp.asarray(g, F32) * guard["gscale"]).astype(jnp.result_type(g))
    new_leaf, new_st = opt_def.apply_param_gradient(count, h, p, st, g)
    if spec.skip_nonfinite:
      new_leaf = jnp.where(finite, new_leaf, p)
      # (a per-leaf state object, _AdafactorParamState: the same class comes back)
      new_st = new_st.replace(**{k: jnp.where(finite, v, st[k]) for k, v in new_st.items()})
    new_p.append(new_leaf)
    new_states.append(new_st)
  return new_p, p_leaves, tuple(new_states)


def adafactor(learning_rate=None, min_dim_size_to_factor=128, decay_rate=0.8, decay_offset=0,
              multiply_by_parameter_scale=True, clipping_threshold=1.0, momentum=None,
              dtype_momentum=jnp.float32, weight_decay_rate=None, eps=1e-30, factored=True,
              weight_decay_mask=None, *, clip_global_norm=None, skip_nonfinite=False
              ) -> optax.GradientTransformationExtraArgs:
  r"""Adafactor (optax.adafactor) on fusedopt's ``Adafactor`` (per leaf: its row/column
  statistics are reductions on each tensor's own shape, so it is not a flat elementwise rule;
  XLA fuses the elementwise part per leaf).

  .. math::
    \hat v_t = \text{factored or full EMA of } g_t^2 + \epsilon_1,\ \text{decay}
      1 - (t - \text{offset})^{-\text{decay\_rate}} \\
    y_t = g_t / \sqrt{\hat v_t},\quad y_t \leftarrow y_t / \max(1, \text{rms}(y_t)/d),\quad
    s_t = \eta_t \max(\text{rms}(p), 10^{-3})\, y_t \\
    m_t = \beta m_{t-1} + (1-\beta) s_t\ \text{(momentum)},\quad
    u_t = -(m_t + \lambda_t p_{t-1})

  The parameter-scale floor is optax's fixed ``1e-3`` (fusedopt's ``epsilon2``).
  ``min_dim_size_to_factor`` and ``factored`` shape the state: with ``optax.inject_hyperparams``
  pass them in ``static_args`` (as optax's own adafactor needs). ``weight_decay_mask`` applies
  per tensor. Needs ``params`` when ``multiply_by_parameter_scale`` or ``weight_decay_rate``.

  References:
    Shazeer & Stern, 2018: https://arxiv.org/abs/1804.04235
  """
  try:
    min_dim = int(np.asarray(min_dim_size_to_factor))
  except Exception as e:  # pylint: disable=broad-except  (tracer)
    raise HyperParamError(
        "min_dim_size_to_factor decides the state's shapes and must be concrete; with "
        "optax.inject_hyperparams pass static_args=('min_dim_size_to_factor',)") from e
  hyper = dict(learning_rate=learning_rate, decay_rate=decay_rate, decay_offset=decay_offset,
               clipping_threshold=clipping_threshold, momentum=momentum,
               weight_decay_rate=weight_decay_rate, eps=eps)
  _validate(dict(learning_rate=dict(lo=0.0, allow_none=True), decay_rate=_NONNEG,
                 decay_offset={}, clipping_threshold=dict(lo=0.0, lo_open=True, allow_none=True,
                                                          allow_inf=True),
                 momentum=dict(lo=0.0, hi=1.0, hi_open=True, allow_none=True),
                 weight_decay_rate=dict(allow_none=True), eps=_NONNEG), hyper)
  if momentum is None:   # (inject_hyperparams takes the dtype, a callable, for a schedule)
    dtype_momentum = jnp.float32
  try:
    dtype_momentum = jnp.dtype(dtype_momentum)
  except TypeError as e:
    raise HyperParamError(f"dtype_momentum={dtype_momentum!r} is not a dtype; with "
                          "optax.inject_hyperparams pass static_args=('dtype_momentum',)") from e
  opt_def = Adafactor(learning_rate=1.0, factored=bool(factored),
                      multiply_by_parameter_scale=bool(multiply_by_parameter_scale),
                      beta1=None if momentum is None else 0.0,
                      min_dim_size_to_factor=min_dim, epsilon2=1e-3,
                      dtype_momentum=dtype_momentum)
  needs = (bool(multiply_by_parameter_scale) or weight_decay_rate is not None
           or weight_decay_mask is not None)
  return _common("adafactor", opt_def, hyper, None, clip_global_norm=clip_global_norm,
                 skip_nonfinite=skip_nonfinite, needs_params=needs, per_leaf=True,
                 wd_mask=weight_decay_mask)


# ----------------------------------------------------------------------------- chain, clipping

def clip_by_global_norm(max_norm) -> optax.GradientTransformation:
  """``optax.clip_by_global_norm`` (the same object): ``tx.chain`` folds it into a following
  fused optimizer."""
  return optax.clip_by_global_norm(max_norm)


def _clip_max_norm(t):
  """The ``max_norm`` of an ``optax.clip_by_global_norm`` transformation, else None."""
  upd = getattr(t, "update", None)
  if getattr(upd, "__qualname__", "") != "clip_by_global_norm.<locals>.update_fn":
    return None
  cells = dict(zip(upd.__code__.co_freevars, upd.__closure__ or ()))
  cell = cells.get("max_norm")
  return None if cell is None else cell.cell_contents


def chain(*transforms) -> optax.GradientTransformation:
  """``optax.chain``, with ``optax.clip_by_global_norm(c)`` immediately followed by a fused
  optimizer replaced by that optimizer with ``clip_global_norm=c`` (one pass, no clipped copy of
  the gradients; the clip factor is optax's, ``min(1, c / ||g||)``, applied as ``g * factor``
  where optax computes ``(g / ||g||) * c``: equal to 1 ulp). A chain that reduces to a single
  transformation is returned as it is (its state is then not wrapped in a tuple)."""
  out, i = [], 0
  while i < len(transforms):
    t = transforms[i]
    nxt = transforms[i + 1] if i + 1 < len(transforms) else None
    max_norm = _clip_max_norm(t)
    if (max_norm is not None and nxt is not None and isinstance(nxt.update, _FusedUpdate)
        and nxt.update.spec.clip is None):
      out.append(_transformation(dataclasses.replace(nxt.update.spec, clip=max_norm)))
      i += 2
      continue
    out.append(t)
    i += 1
  return out[0] if len(out) == 1 else optax.chain(*out)
