"""The generic driver: built-in optimizers on flat state, one fused update per dtype group.

A ``FlatOptimizerDef`` keeps its state as ``FlatState``: for each state field (``grad_ema``, ...)
one buffer per dtype group of the parameters' ``FlatLayout``. Its ``apply_gradient`` computes the
step's scalars once (float32, as runtime values), then runs the optimizer's ``Rule`` over each
group with the selected backend. The same rule serves ``apply_param_gradient`` (the per-leaf path
that flax's API exposes), so there is one copy of every optimizer's math.
"""
import functools
import numbers
from collections.abc import Mapping
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import elementwise, quantization
from .exact_float import ExactFloat
from .base import HyperParamError, OptimizerDef, OptimizerState
from .kernels import registry
from .flat_state import FlatState, fields_of, make_param_state, with_master
from .layout import FlatLayout
from .norms import gradient_prepass
from .step import StepContext

F32 = jnp.float32
BACKENDS = registry.NAMES


def available_backends():
  """The backends that can run here, besides "auto" (``kernels/registry.py``)."""
  return registry.available_backends()


# ----------------------------------------------------------------------------- checks

def concrete_float(x):
  """``x`` as a float if it is known at trace time, else None (traced values are not checked)."""
  if isinstance(x, numbers.Number):
    return float(x)
  try:
    return float(np.asarray(x))
  except Exception:  # pylint: disable=broad-except  (tracers)
    return None


class HyperParamTypeError(HyperParamError, TypeError):
  """A hyper-parameter is not a real scalar (a string, a container, a non-scalar, complex or
  bool array): both a ``HyperParamError`` (a ValueError) and a TypeError."""


def check_prepass_args(grad_scale, clip_global_norm):
  """The checked step's ``grad_scale`` and ``clip_global_norm``: None or real scalars; a concrete
  clip positive (inf: no clipping), a concrete scale finite and positive."""
  for name, x in (("grad_scale", grad_scale), ("clip_global_norm", clip_global_norm)):
    if x is None:
      continue
    check_scalar(name, x)
    v = concrete_float(x)
    if v is not None and not v > 0:
      raise HyperParamError(f"{name}={v} must be positive")
    if v is not None and name == "grad_scale" and not np.isfinite(v):
      raise HyperParamError(f"grad_scale={v} is not finite")


def check_scalar(name, x):
  """Raises HyperParamTypeError unless ``x`` is a real scalar: a Python or NumPy number (not a
  bool) or a 0-d integer/floating array, concrete or traced (a tracer's shape and dtype are
  known, its value is not)."""
  if isinstance(x, (bool, np.bool_)):
    raise HyperParamTypeError(f"hyper-parameter {name}={x!r} is a bool; expected a real number")
  if isinstance(x, numbers.Real):
    return
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if shape is None or dtype is None or isinstance(x, str):
    raise HyperParamTypeError(f"hyper-parameter {name}={x!r} is a {type(x).__name__}; expected "
                              "a real number (a Python or NumPy number, or a scalar array)")
  try:
    real = (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)) and \
        not jnp.issubdtype(dtype, jnp.bool_)
  except TypeError:   # not a dtype at all
    real = False
  if not real:
    raise HyperParamTypeError(f"hyper-parameter {name} has dtype {dtype}; expected a real "
                              "(integer or floating-point) number")
  if tuple(shape) != ():
    raise HyperParamTypeError(f"hyper-parameter {name} has shape {tuple(shape)}; expected a "
                              "scalar (shape ())")


def check_range(hp, name, lo=None, hi=None, lo_open=False, hi_open=False, allow_none=False,
                allow_inf=False):
  """Raises HyperParamError if ``hp.name`` is missing, not a real scalar (HyperParamTypeError,
  also for tracers), not finite (unless ``allow_inf``; NaN never) or outside its range (when
  concrete)."""
  x = getattr(hp, name)
  if x is None:
    if allow_none:
      return
    if name == "learning_rate":
      raise HyperParamError("no learning rate provided.")
    raise HyperParamError(f"hyper-parameter {name} is None")
  check_scalar(name, x)
  v = concrete_float(x)
  if v is None:
    return
  lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo}"
  hi_s = "" if hi is None else f"{hi}" + (")" if hi_open else "]")
  valid = f"{lo_s or '(-inf'}, {hi_s or 'inf)'}"
  if np.isnan(v) or (np.isinf(v) and not allow_inf):
    where = "" if lo is None and hi is None else f"; its valid range is {valid}"
    raise HyperParamError(f"hyper-parameter {name}={v} is not finite{where}")
  bad = ((lo is not None and (v <= lo if lo_open else v < lo))
         or (hi is not None and (v >= hi if hi_open else v > hi)))
  if bad:
    raise HyperParamError(f"hyper-parameter {name}={v} is outside its valid range {valid}")


def check_beta(hp, name):
  check_range(hp, name, 0.0, 1.0, hi_open=True)


def check_kinds(hp, *names, optional=("learning_rate",), allow_inf=()):
  """Construction-time checks of ``hp``'s ``names``: each a real scalar and, when concrete,
  finite (``allow_inf``: or +-inf); those in ``optional`` may be None (the learning rate may come
  per step, as in flax). Ranges are checked by ``validate`` at every use, before any change."""
  for name in names:
    check_range(hp, name, allow_none=name in optional, allow_inf=name in allow_inf)


def _float_dtype(name, dtype):
  d = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
  if not jnp.issubdtype(d, jnp.floating):
    raise ValueError(f"{name}={d} must be a floating-point dtype")
  return d


def _storage(name, dtype):
  """A ``state_dtype`` value: a float dtype (the buffers' dtype), or the name of a quantized
  format, "int8" or "float8_e4m3fn" (``fusedopt.quantization``: 8-bit codes, a float32 scale per
  block)."""
  kind = quantization.storage_kind(dtype)
  if kind is not None:
    return kind
  try:
    return _float_dtype(name, dtype)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={dtype!r}: expected a floating-point dtype, \"int8\" (8-bit "
                     "blockwise dynamic quantization) or jnp.float8_e4m3fn (blockwise-scaled "
                     "e4m3)") from None


# ----------------------------------------------------------------------------- the driver

class FlatOptimizerDef(OptimizerDef):
  """Base of the built-in optimizers: flat state and fused per-group updates.

  Subclasses define:
    state_fields: names of the state buffers (zeros at init).
    rule(hp) -> Rule: the per-element update (a static variant per static hyper-parameters).
    scalars(hp, step) -> dict of float32 scalars the rule reads.
    validate(hp): raise HyperParamError on bad values.
  and may override ``update_leaves`` for multi-stage updates (LAMB, LARS).
  """
  state_fields: Tuple[str, ...] = ()
  # the fields that are never negative (second moments): quantized to int8 with the unsigned
  # dynamic map, twice the signed map's resolution (``fusedopt.quantization``)
  nonnegative_fields: Tuple[str, ...] = ()
  # the per-parameter state class, flax 0.5.3's (``_AdamParamState``, ...): what
  # ``init_param_state``/``apply_param_gradient`` return and ``FlatState`` reads as per leaf
  # (``state_class``: its ``...WithMaster`` subclass with master weights)
  param_state_class = None

  def __init__(self, hyper_params, backend="auto", master_weights=False, state_dtype=None, *,
               stochastic_rounding=False, rounding_seed=0):
    """``master_weights=True`` keeps a float32 copy of the params in the state (field
    ``master``) and updates that; the params are the master rounded to their dtype. Meant for
    bfloat16/float16 params (for float32 ones the copy only costs memory).

    ``state_dtype`` (default float32) stores the optimizer's own state (moments, accumulators;
    not the master copy) in another float dtype, e.g. ``jnp.bfloat16`` to halve its memory; the
    kernels still compute in float32 and round when storing.

    ``stochastic_rounding=True`` stores new bfloat16 params rounded stochastically instead of to
    nearest (``elementwise.with_stochastic_rounding``: unbiased, so updates below half a bf16 ulp
    still move the params in expectation) -- bf16 training without a master copy (4 B/param less
    memory and traffic than ``master_weights``). The random bits are hashed from the step
    (``rounding_seed``, a Python int, varies them) and each element's own inputs: no extra
    memory traffic, deterministic, the same on every backend (the state is hashed without its
    low 16 bits, where XLA's FMA contraction and the IEEE native kernels may differ). float32
    param groups are unaffected; float16 params, and ``master_weights=True``, are rejected.

    Every built-in optimizer's ``__init__`` takes ``backend``, ``master_weights``,
    ``state_dtype``, ``stochastic_rounding`` and ``rounding_seed`` as keyword-only arguments and
    passes them here; a subclass that should offer them threads them through the same way."""
    if backend not in BACKENDS:
      raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    super().__init__(hyper_params)
    self.backend = backend
    self.master_weights = bool(master_weights)
    per_field = dict(state_dtype) if isinstance(state_dtype, Mapping) else {}
    default = None if isinstance(state_dtype, Mapping) else state_dtype
    self.state_storage = _storage("state_dtype", F32 if default is None else default)
    # {field: dtype} for the fields stored otherwise (optax's mu_dtype: the first moment only)
    self.field_storage = {k: _storage(f"state_dtype[{k!r}]", d) for k, d in per_field.items()}
    if not isinstance(rounding_seed, (numbers.Integral, np.integer)):
      raise TypeError(f"rounding_seed={rounding_seed!r} must be a Python int")
    self.stochastic_rounding = bool(stochastic_rounding)
    self.rounding_seed = int(rounding_seed)
    if self.stochastic_rounding and self.master_weights:
      raise ValueError("stochastic_rounding=True and master_weights=True: choose one (stochastic "
                       "rounding is for bfloat16 params *without* a float32 master copy; with "
                       "one, the params are the master rounded to nearest)")

  def _rounding_scalars(self, layout, step):
    """The step's stochastic-rounding scalars (``{}`` when no group is rounded); checks dtypes."""
    if not self.stochastic_rounding:
      return {}
    bad = [np.dtype(g.dtype).name for g in layout.groups
           if np.dtype(g.dtype) not in (np.dtype(F32), np.dtype(jnp.bfloat16))]
    if bad:
      raise ValueError(f"stochastic_rounding=True applies to bfloat16 params (float32 ones are "
                       f"left as they are); got {', '.join(sorted(set(bad)))} params: use "
                       "master_weights=True for float16")
    if not any(np.dtype(g.dtype) == np.dtype(jnp.bfloat16) for g in layout.groups):
      return {}
    return elementwise.rounding_seed_scalars(step, self.rounding_seed)

  @property
  def all_state_fields(self):
    """``state_fields`` plus ``master`` with master weights (always last)."""
    return tuple(self.state_fields) + (("master",) if self.master_weights else ())

  def wrap_rule(self, rule):
    return elementwise.with_master(rule) if self.master_weights else rule

  # -- to be defined by each optimizer
  def rule(self, hp) -> elementwise.Rule:
    raise NotImplementedError

  def single_pass_rule(self, hp):
    """The whole step as one rule, or None for a multi-stage ``update_leaves`` (LAMB, LARS):
    what a fused ``MultiOptimizer`` runs once over every sub-optimizer's leaves with per-segment
    scalars. A subclass overriding ``update_leaves`` overrides this too."""
    return self.rule(hp)

  def scalars(self, hp, step) -> Dict[str, Any]:
    raise NotImplementedError

  def validate(self, hp):
    check_range(hp, "learning_rate", 0.0)

  def validate_for_jit(self, hyper_params):
    self.validate(hyper_params)
    return True

  # -- checkpoints in flax's per-leaf layout
  def flax_param_states(self, target, param_states):
    if isinstance(param_states, FlatState):
      per_leaf = param_states.per_leaf_dicts()
    else:   # flax's per-leaf form: a tree of state objects (or dicts)
      per_leaf = jax.tree_util.tree_map(lambda _, st: fields_of(st), target, param_states)
    return self.fields_in_order(target, per_leaf, self.all_state_fields)

  def from_flax_param_states(self, target, param_states, restored):
    if isinstance(param_states, FlatState):
      return param_states.restored_from(restored)
    return jax.tree_util.tree_map(lambda _, st: self.make_param_state(st), target, restored)

  def state_for_target(self, target, state):
    """With master weights, the master copy re-read from ``target`` (float32): edits to the
    params made through ``Optimizer.replace(target=...)`` win over the stored master."""
    if not self.master_weights:
      return state
    if not isinstance(state.param_states, FlatState):   # flax's per-leaf form
      return state.replace(param_states=jax.tree_util.tree_map(
          lambda p, st: self.make_param_state(dict(fields_of(st), master=jnp.asarray(p, F32))),
          target, state.param_states))
    return state.replace(param_states=state.param_states.with_master_from(target))

  # -- per-leaf (flax) API, on the same rule
  @property
  def state_class(self):
    """The class of a parameter's state: ``param_state_class`` or, with master weights, its
    subclass with the ``master`` field (``_AdamParamStateWithMaster``)."""
    if self.master_weights:
      return with_master(self.param_state_class)
    return self.param_state_class

  def make_param_state(self, values):
    """One parameter's state from ``{field: array}``: a ``state_class`` instance (a dict for an
    optimizer without one)."""
    return make_param_state(self.state_class, values)

  def leaf_state_values(self, state):
    """The arrays of ``all_state_fields`` from one parameter's state (a state object or a dict,
    as flax's per-leaf form or fusedopt's earlier dict form)."""
    values = fields_of(state)
    missing = [k for k in self.all_state_fields if k not in values]
    if missing:
      raise ValueError(f"{type(self).__name__}: a parameter's state lacks {missing} (got "
                       f"{sorted(values)}; expected {list(self.all_state_fields)})")
    return tuple(values[k] for k in self.all_state_fields)

  def storage_of(self, field):
    """The dtype state field ``field`` is stored in: ``state_dtype``'s for it (a dict
    ``state_dtype`` names fields; unknown names raise), float32 for ``master``."""
    unknown = sorted(set(self.field_storage) - set(self.state_fields))
    if unknown:
      raise ValueError(f"state_dtype names {unknown}, which are not state fields of "
                       f"{type(self).__name__} (its fields: {list(self.state_fields)})")
    if field == "master":
      return np.dtype(F32)
    return self.field_storage.get(field, self.state_storage)

  def quantized_format(self, field):
    """The ``quantization.Format`` field ``field`` is stored in, or None for a float dtype."""
    kind = self.storage_of(field)
    if not isinstance(kind, str):
      return None
    return quantization.format_for(kind, field in self.nonnegative_fields)

  @property
  def quantizes(self) -> bool:
    """Whether any state field is stored quantized."""
    return any(self.quantized_format(k) is not None for k in self.state_fields)

  def build_layout(self, params, shards: int = 1):
    """The flat layout of ``params`` (``shards``: split evenly over that many devices): with
    quantized state, the tensors of at least ``quantization.MIN_SIZE`` elements in groups of
    their own, aligned to whole blocks (so a block never straddles two tensors or two shards)."""
    quantize = (quantization.MIN_SIZE, quantization.BLOCK) if self.quantizes else None
    return FlatLayout.build(params, shards=shards, quantize=quantize)

  def field_buffer(self, layout, g, field):
    """Zero state of ``field`` for group ``g``: a ``QuantizedArray`` in a quantized group (small
    tensors' groups keep float32), else a buffer of the field's dtype."""
    fmt = self.quantized_format(field)
    size = layout.groups[g].size
    if fmt is None:
      return jnp.zeros((size,), self.storage_of(field))
    if layout.groups[g].block:
      return quantization.QuantizedArray.zeros(size, fmt, layout.groups[g].block)
    return jnp.zeros((size,), F32)

  def init_param_state(self, param):
    if self.quantizes:
      raise NotImplementedError(
          f"{type(self).__name__}(state_dtype=...): quantized state is blockwise over the flat "
          "layout; flax's per-leaf state form (init_param_state/apply_param_gradient) keeps "
          "float state -- use Optimizer/init_state, whose per_leaf() views are dequantized")
    state = {k: jnp.zeros(jnp.shape(param), self.storage_of(k)) for k in self.state_fields}
    if self.master_weights:
      state["master"] = jnp.asarray(param, F32)
    return self.make_param_state(state)

  def apply_param_gradient(self, step, hyper_params, param, state, grad):
    self.validate(hyper_params)
    seg = self.leaf_seg_scalars(hyper_params, step, param, state, grad)
    rule, scalars = self._leaf_rounding(self.wrap_rule(self.rule(hyper_params)),
                                        self.scalars(hyper_params, step), step, param)
    new_p, new_state = elementwise.apply_to_leaf(
        rule, scalars, seg, param, grad, self.leaf_state_values(state))
    return new_p, self.make_param_state(dict(zip(self.all_state_fields, new_state)))

  def apply_gradient_per_leaf(self, hyper_params, params, state, grads):
    """flax's functional form: ``state.param_states`` a tree mirroring ``params`` whose leaves
    are per-parameter states (``init_param_state``'s; dicts accepted), updated leaf by leaf with
    ``apply_param_gradient``; returns ``(new_params, OptimizerState(step + 1, new per-leaf
    states))``. The hyper-parameters reach the rule as on the flat path (Python floats and
    ``ExactFloat``s through ``scalars``), so each leaf runs the flat path's arithmetic."""
    self.validate(hyper_params)
    return self.apply_leaf_by_leaf(hyper_params, params, state, grads)

  def _leaf_rounding(self, rule, scalars, step, param):
    """(rule, scalars) for the per-leaf path: with stochastic rounding and a bfloat16 ``param``,
    ``with_stochastic_rounding(rule)`` and the step's seed scalars (the flat path's bits); else
    unchanged. Raises for other non-float32 params with stochastic rounding on."""
    if self.stochastic_rounding and jnp.result_type(param) == jnp.bfloat16:
      return (elementwise.with_stochastic_rounding(rule),
              dict(scalars, **elementwise.rounding_seed_scalars(step, self.rounding_seed)))
    if self.stochastic_rounding and jnp.result_type(param) != F32:
      raise ValueError(f"stochastic_rounding=True applies to bfloat16 params; got "
                       f"{jnp.result_type(param)}")
    return rule, scalars

  def leaf_seg_scalars(self, hp, step, param, state, grad):
    del hp, step, param, state, grad
    return {}

  # -- the flat path
  def init_state(self, params):
    layout = self.build_layout(params)
    self._rounding_scalars(layout, 0)   # rejects float16 params with rounding
    return self.initial_state(jnp.asarray(0, jnp.int32),
                              FlatState(self.initial_fields(layout, params), layout,
                                        self.state_class))

  def initial_fields(self, layout, params):
    """The flat state buffers at step 0 (``layout`` may be padded for shards): zeros in each
    field's storage dtype -- float32 by default whatever the param dtype (flax used the param
    dtype: bf16 moments) -- and, with master weights, the params packed in float32."""
    fields = {k: tuple(self.field_buffer(layout, g, k) for g in range(len(layout.groups)))
              for k in self.state_fields}
    if self.master_weights:
      leaves = jax.tree_util.tree_leaves(params)
      fields["master"] = tuple(layout.pack_group(leaves, g, F32) for g in range(len(layout.groups)))
    return fields

  def initial_state(self, step, param_states):
    """The optimizer state at ``step`` holding ``param_states``: flax's ``OptimizerState``; an
    optimizer with optimizer-wide state returns its subclass, those fields at their start."""
    return OptimizerState(step, param_states)

  def apply_gradient(self, hyper_params, params, state, grads):
    if not isinstance(state.param_states, FlatState):
      return self.apply_gradient_per_leaf(hyper_params, params, state, grads)
    self.validate(hyper_params)
    layout = state.param_states.layout
    p_leaves = layout.check(params, "target", allow_other_float=False)
    g_leaves = layout.check(grads, "grads")
    ctx = self.step_context(hyper_params, state)
    new_p, new_fields = self.update_leaves(hyper_params, ctx, layout, p_leaves, g_leaves,
                                           state.param_states.fields)
    new_params = jax.tree_util.tree_unflatten(layout.treedef, new_p)
    return new_params, self.next_state(state, 1, state.param_states.replace(fields=new_fields),
                                       ctx)

  def apply_gradient_checked(self, hyper_params, params, state, grads, grad_scale=None,
                             clip_global_norm=None):
    """``apply_gradient`` with the gradient pre-pass folded into the update.

    One read of the gradients gives their global L2 norm and whether all are finite; the
    update kernels then multiply ``g`` by ``grad_scale * clip`` (``clip = max_norm / norm`` when
    the unscaled norm exceeds ``clip_global_norm``, else 1: optax.clip_by_global_norm) and, on a
    non-finite step, keep params, state and step unchanged -- decided per element on the device.
    Returns ``(new_params, new_state, finite, global_norm)``, the norm of the unscaled, unclipped
    gradients.
    """
    if not isinstance(state.param_states, FlatState):
      raise TypeError("apply_gradient_checked needs the flat state of a built-in optimizer")
    self.validate(hyper_params)
    check_prepass_args(grad_scale, clip_global_norm)
    layout = state.param_states.layout
    p_leaves = layout.check(params, "target", allow_other_float=False)
    g_leaves = layout.check(grads, "grads")
    kernel_prepass = registry.gradient_prepass(self.backend, layout)
    if kernel_prepass is not None:   # the backend's own pre-pass kernel (Triton)
      finite, norm, gscale = kernel_prepass(layout, g_leaves, grad_scale, clip_global_norm)
    else:
      finite, norm, gscale = gradient_prepass(g_leaves, grad_scale, clip_global_norm)
    ctx = self.step_context(hyper_params, state,
                            guard={"gscale": gscale, "ok": finite.astype(F32)})
    new_p, new_fields = self.update_leaves(hyper_params, ctx, layout, p_leaves, g_leaves,
                                           state.param_states.fields)
    new_params = jax.tree_util.tree_unflatten(layout.treedef, new_p)
    new_state = self.next_state(state, finite.astype(state.step.dtype),
                                state.param_states.replace(fields=new_fields), ctx)
    return new_params, new_state, finite, norm

  def step_context(self, hp, state, guard=None) -> StepContext:
    """The context of one step on this device from ``state`` (``guard``: the checked step's).
    An optimizer with optimizer-wide state (schedule-free) adds its step's values (``outer``)."""
    del hp
    return StepContext(state.step, guard=guard)

  def next_state(self, state, inc, param_states, ctx):
    """``state`` after a step: its count advanced by ``inc`` (1, or 0 for a skipped step) and
    the new per-parameter state; optimizer-wide fields (a subclass's) from ``ctx.outer``."""
    del ctx
    return state.replace(step=state.step + inc, param_states=param_states)

  def update_leaves(self, hp, ctx: StepContext, layout, p_leaves, g_leaves, fields):
    """One step over all groups: returns (new param leaves, new fields). Multi-stage optimizers
    (LAMB, LARS) override it, running their rules with ``run_rule``/``run_rule_sumsq`` and
    per-tensor norms from ``ctx.leaf_norms``, so that the sharded driver runs them unchanged."""
    return self.run_rule(self.rule(hp), self.step_scalars(hp, ctx), {}, ctx, layout, p_leaves,
                         g_leaves, fields)

  def step_scalars(self, hp, ctx: StepContext):
    """The global scalars of ``single_pass_rule`` for the step ``ctx`` describes: ``scalars(hp,
    ctx.step)``; an optimizer with optimizer-wide state reads its step's values in
    ``ctx.outer``."""
    return self.scalars(hp, ctx.step)

  def run_rule(self, rule, scalars, seg, ctx, layout, p_leaves, g_leaves, fields):
    """Runs ``rule`` over every dtype group; returns (new param leaves, new fields)."""
    new_p, new_fields, _ = self.run_rule_sumsq(rule, scalars, seg, ctx, layout, p_leaves,
                                               g_leaves, fields)
    return new_p, new_fields

  def prepared_rule(self, rule, scalars, ctx, layout):
    """``(rule, scalars, rounding)`` for this step: master weights, the checked step's guard and
    stochastic rounding's seed scalars applied (``rounding`` is {} when no group is rounded)."""
    rule = self.wrap_rule(rule)
    if ctx.guard is not None:   # inside apply_gradient_checked
      rule, scalars = elementwise.guarded(rule), dict(scalars, **ctx.guard)
    rounding = self._rounding_scalars(layout, ctx.step)   # stochastic rounding of bf16 groups
    if rounding:
      scalars = dict(scalars, **rounding)
    return rule, scalars, rounding

  def group_rule(self, rule, dtype, rounding, ctx):
    """``prepared_rule``'s rule as run on a group of ``dtype``: bf16 groups rounded
    stochastically when asked; with ``ctx.deltas`` (fusedopt.tx) float32 groups return
    ``p' - p`` (optax's update, exact by Sterbenz when ``p/2 <= p' <= 2p``) and the others their
    new params, both in fresh buffers (params that are not donated are not copied)."""
    dtype = np.dtype(dtype)
    if rounding and dtype == np.dtype(jnp.bfloat16):
      rule = elementwise.with_stochastic_rounding(rule)
    if rule.writes_param and ctx.deltas:
      rule = (elementwise.as_delta(rule) if dtype == np.dtype(F32)
              else elementwise.out_of_place(rule))
    return rule

  def run_rule_sumsq(self, rule, scalars, seg, ctx, layout, p_leaves, g_leaves, fields):
    """``run_rule`` plus, for a rule with ``sumsq``, per-leaf sums of its terms squared: a tuple
    of float32 [num_leaves] vectors (else None). Kernel backends compute them in the same pass.

    The one group loop of every driver: ``ctx.run_group`` runs a group (default ``run_group``,
    on this device; the sharded driver's runs on its local slices) and ``ctx.reduce_sums``
    combines the per-leaf sums across devices."""
    rule, scalars, rounding = self.prepared_rule(rule, scalars, ctx, layout)
    per_leaf = ctx.leaf_state is not None
    if per_leaf and ctx.run_group is not None:
      raise ValueError("per-leaf state (StepContext.leaf_state) runs on this device only")
    run = ctx.run_group or (run_group_leaf_state if per_leaf else run_group)
    # per-leaf state (fusedopt.tx) is named by its owner (optax's names), in the rule's order
    names = tuple(ctx.leaf_state) if per_leaf else self.all_state_fields
    n = len(layout.segments)
    new_p = list(p_leaves)
    new_fields = {k: list(v) for k, v in fields.items()}
    sums = None
    for gi, group in enumerate(layout.groups):
      if group.size == 0:   # only size-0 leaves: nothing to update, their sums are 0
        continue
      grule = self.group_rule(rule, group.dtype, rounding, ctx)
      if per_leaf:
        state = tuple(tuple(fields[k][i] for i in group.segments) for k in names)
      else:
        state = tuple(fields[k][gi] for k in names)
      out_p, out_state, part = run(self, grule, scalars, seg, layout, gi, p_leaves, g_leaves,
                                   state)
      for i, x in out_p or ():
        new_p[i] = x
      for k, buf in zip(names, out_state):
        if per_leaf:
          for i, leaf in zip(group.segments, buf):
            new_fields[k][i] = leaf
        else:
          new_fields[k][gi] = buf
      if rule.sumsq is not None and part is not None:
        sums = list(part) if sums is None else [a + b for a, b in zip(sums, part)]
    if rule.sumsq is not None:
      if sums is None:
        sums = [jnp.zeros((n,), F32)] * elementwise.num_sumsq_terms(rule)
      if ctx.reduce_sums is not None:
        sums = ctx.reduce_sums(list(sums))
    return new_p, {k: tuple(v) for k, v in new_fields.items()}, (
        None if rule.sumsq is None else tuple(sums))


def run_group(opt_def, rule, scalars, seg, layout, gi, p_leaves, g_leaves, state, *,
              leaf_state=False):
  """``StepContext.run_group`` on this device: ``rule`` over group ``gi`` with the backend
  ``opt_def.backend`` selects for it (``registry.select``; derivatives from the jnp path).
  Returns the new params as ``(leaf index, value)`` pairs (None for a rule that writes none), the
  new state, and the per-tensor sums as float32 [num_leaves] vectors (None without ``sumsq``).
  ``leaf_state``: ``state`` (and the new state) per field a tuple of the group's state leaves."""
  if leaf_state and any(quantization.is_quantized(x) for field in state for x in field):
    return run_leaves_quantized(opt_def, rule, scalars, seg, layout, gi, p_leaves, g_leaves,
                                state)
  quantized = any(quantization.is_quantized(x) for x in state)
  if quantized:   # low-bit state: the backends' run_quantized
    backend = registry.select_quantized(opt_def.backend, layout, gi, rule)
  else:
    backend = registry.select(opt_def.backend, layout, gi, rule, leaf_state=leaf_state)
  out_p, out_state, sums = registry.differentiable(backend, leaf_state, quantized)(
      rule, scalars, seg, layout, gi, p_leaves, g_leaves, state)
  group = layout.groups[gi]
  if out_p is not None:
    out_p = list(zip(group.segments, out_p))
  if rule.sumsq is None:
    return out_p, out_state, None
  idx = np.asarray(group.segments)
  n = len(layout.segments)
  return out_p, out_state, [jnp.zeros((n,), F32).at[idx].set(u) for u in sums]


run_group_leaf_state = functools.partial(run_group, leaf_state=True)


def _leaf_layout(seg, dtype, quantized):
  """The layout of one leaf as a group of its own: quantized, of whole blocks (its state's
  codes), or as ``FlatLayout.build`` lays it out."""
  leaf = (jax.ShapeDtypeStruct(seg.shape, dtype),)
  if quantized:
    return FlatLayout.build(leaf, align=quantization.BLOCK,
                            quantize=(1, quantization.BLOCK), tile_blocks=1)
  return FlatLayout.build(leaf)


def run_leaves_quantized(opt_def, rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
  """``run_group`` with per-leaf state some of whose leaves are quantized (``fusedopt.tx`` with
  ``state_dtype="int8"``: a ``QuantizedArray`` per large leaf, its codes over whole blocks): each
  leaf of the group runs as a group of its own (``_leaf_layout``) -- one kernel call or XLA
  fusion per leaf, nothing packed --, a quantized leaf through the backend's ``run_quantized``
  (a float field of it, in a per-field mix, padded to the leaf's blocks and back), the others
  through its per-leaf runner."""
  group = layout.groups[gi]
  n = len(layout.segments)
  out_p, sums = [], None
  new_state = [list(field) for field in state]
  for j, i in enumerate(group.segments):
    sg = layout.segments[i]
    st = tuple(field[j] for field in state)
    quantized = any(quantization.is_quantized(x) for x in st)
    one = _leaf_layout(sg, group.dtype, quantized)
    seg_i = {k: jnp.asarray(v, F32)[i:i + 1] for k, v in seg.items()}
    args = (rule, scalars, seg_i, one, 0, [p_leaves[i]], [g_leaves[i]])
    if quantized:
      size = one.groups[0].size
      flat = tuple(x if quantization.is_quantized(x) else
                   jnp.pad(jnp.ravel(x), (0, size - sg.size)) for x in st)
      backend = registry.select_quantized(opt_def.backend, one, 0, rule, leaf_state=True)
      p1, st1, part = registry.differentiable(backend, quantized=True)(*args, flat)
      st1 = tuple(y if quantization.is_quantized(y) else y[:sg.size].reshape(sg.shape)
                  for y in st1)
    else:
      backend = registry.select(opt_def.backend, one, 0, rule, leaf_state=True)
      p1, st1, part = registry.differentiable(backend, True)(*args, tuple((x,) for x in st))
      st1 = tuple(y[0] for y in st1)
    for k, y in enumerate(st1):
      new_state[k][j] = y
    if p1 is not None:
      out_p.append((i, p1[0]))
    if rule.sumsq is not None:
      part = [jnp.zeros((n,), F32).at[i].set(u[0]) for u in part]
      sums = part if sums is None else [a + b for a, b in zip(sums, part)]
  return ((out_p if rule.writes_param else None), tuple(tuple(f) for f in new_state),
          sums)


def bias_correction(beta, step):
  """``1 - beta**(step+1)``, accurate in float32.

  flax 0.5.3 computed ``1 - beta**t`` in the param dtype: in bfloat16 that is 0 (division by zero);
  even in float32, rounding ``beta`` first puts the correction off by up to 1e-4 relative
  (docs/differences.md). ``-expm1(t * log(beta))`` with ``log(beta)`` taken as
  ``log1p(-(1 - beta))`` (in float64 when ``beta`` is a Python number or an ``ExactFloat``) is
  within ~1e-7.
  """
  t = jnp.asarray(step, F32) + 1.0
  if isinstance(beta, ExactFloat):      # a Python float passed as a runtime value
    log_beta = jnp.asarray(beta.log, F32)
  elif isinstance(beta, numbers.Number):
    with np.errstate(divide="ignore"):   # beta = 0: log 0 = -inf, correction exactly 1
      log_beta = jnp.asarray(np.log1p(-(1.0 - float(beta))), F32)
  else:
    log_beta = jnp.log1p(-(1.0 - jnp.asarray(beta, F32)))
  return -jnp.expm1(t * log_beta)


def f32(x):
  """A hyper-parameter (Python number, array, ``ExactFloat``) as a float32 scalar."""
  if isinstance(x, ExactFloat):
    return x.value()
  return jnp.asarray(x, F32)
