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
argument).

**Fused clipping and skipping.** ``clip_global_norm=c`` (keyword-only, every optimizer) or
``tx.chain(optax.clip_by_global_norm(c), tx.adamw(...))`` folds clipping into the update: one read
of the gradients gives their global norm, and the kernels multiply ``g`` by
``min(1, c / ||g||)`` (``optax.clip_by_global_norm``'s factor) on the fly -- no clipped copy of
the gradients is written. ``skip_nonfinite=True`` additionally leaves parameters, state and
count unchanged (zero updates) when a gradient is not finite, decided on the device.

**fusedopt extras** (keyword-only, after optax's arguments): ``backend`` (``"auto"``, ``"jnp"``,
``"native"``, ``"pallas"``, ``"pallas_interpret"``, ``"triton"``, ``"triton_interpret"``),
``state_dtype`` (storage dtype of the state
fields, optax's by default), ``clip_global_norm``, ``skip_nonfinite``.

**State: optax's own.** ``tx.<name>(...).init(params)`` returns exactly
``optax.<name>(...).init(params)``: the same pytree (optax's chain tuple of
``ScaleByAdamState(count, mu, nu)``, ``TraceState(trace)``, ...), leaf shapes and dtypes (it *is*
optax's init), so ``optax.tree_map_params``, partition rules derived from the params, optax,
flax and orbax checkpoints carry over in both directions. ``update`` finds the params-shaped
fields it reads (``mu``, ``nu``, ...) in that state and runs the rule over every leaf with the
leaf's own state arrays (``StepContext.leaf_state``): the native CPU kernels read and write each
leaf's state by address in one pass (as apex's multi_tensor_apply), and so do the leaf-direct
Triton kernels; the jnp backend runs one XLA fusion per leaf, Pallas packs the state into its
flat buffers and back. Every
``count`` of the state advances as optax's (``safe_increment``); schedules are evaluated at the
state's first count, as optax evaluates them (an alias whose state has no count -- ``sgd`` with
a constant learning rate -- cannot take a schedule for another argument: ``HyperParamError``).
``state_dtype`` (one dtype, or ``{field: dtype}`` with optax's field names) stores fields in
another dtype than optax's (which is the params' dtype; ``mu_dtype`` for Adam's ``mu``).

**Complex params** (as optax's): complex first moments, real second moments ``|g|^2``
(``xp.abs_sq`` in the rules), norms of ``|x|^2``; a tree's complex leaves form their own groups,
which ``auto`` runs on jnp and an explicit kernel backend as real and imaginary planes
(``fusedopt.kernels.planes``, docs/tx.md).

Import cost: this module imports optax; ``import fusedopt`` does not import it.
"""
import dataclasses
import functools
import numbers
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import elementwise, norms, quantization
from .adafactor import Adafactor
from .adagrad import Adagrad, adagrad_rule
from .adam import Adam, adam_rule, moment_scalars
from .base import HyperParamError
from .flat import (concrete_float, bias_correction, check_range, check_scalar,
                   gradient_prepass)
from .flat import bias_correction as bias_correction_of
from .step import StepContext
from .lamb import LAMB, lamb_rules
from .lars import LARS, lars_rule, trust_ratio
from .adan import ADAN_RULE, Adan, adan_scalars
from .ademamix import ADEMAMIX_RULE, AdEMAMix, ademamix_scalars
from .adopt import ADOPT, adopt_rule, adopt_scalars
from .lion import LION_RULE, Lion, lion_scalars
from .layout import FlatLayout, LayoutError
from .momentum import Momentum, momentum_rule
from .rmsprop import CENTERED_QUANTIZED, RMSProp, rmsprop_rule
from .sgd import GradientDescent, SGD_RULE
from . import schedule_free

F32 = jnp.float32

__all__ = [
    "adafactor", "adagrad", "adam", "adamw", "chain", "clip_by_global_norm",
    "lamb", "lars", "lion", "adan", "ademamix", "adopt", "nadam", "nadamw", "rmsprop",
    "schedule_free_adamw", "schedule_free_eval_params", "sgd", "update_and_apply",
    "dequantized",
]


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

class _Runner:
  """Runs rules with the optimizer's backend in one step context: per-leaf state (optax's
  params-shaped state), ``p' - p`` for float32 groups (``StepContext.deltas``) and, inside a
  checked step, every rule ``guarded`` (``g`` multiplied by ``gscale``, the clip factor; a
  non-finite step keeps everything)."""

  def __init__(self, opt_def, guard, count, slots, deltas=True):
    self.opt_def = opt_def
    self.ctx = StepContext(count, guard=guard, deltas=deltas, leaf_state=tuple(slots))
    self.gscale = F32(1.0) if guard is None else guard["gscale"]

  def run(self, rule, scalars, seg, layout, p, g, fields):
    return self.opt_def.run_rule(rule, scalars, seg, self.ctx, layout, p, g, fields)

  def run_sumsq(self, rule, scalars, seg, layout, p, g, fields):
    return self.opt_def.run_rule_sumsq(rule, scalars, seg, self.ctx, layout, p, g, fields)


# ----------------------------------------------------------------------------- optax's state

def _is_node(x):
  """An optax state object (``ScaleByAdamState``, ``TraceState``, ``EmptyState``, ...)."""
  return isinstance(x, tuple) and hasattr(x, "_fields")


# fields of a state object that hold a wrapped optimizer's state (optax.masked's, schedule-free's)
_NESTED = ("inner_state", "base_optimizer_state")


def _state_nodes(state):
  """The state objects of an optax alias's state, in order: the chain's tuple is walked, and a
  wrapper's inner state (``MaskedState.inner_state``, ``ScheduleFreeState``'s
  ``base_optimizer_state``) after the wrapper."""
  if _is_node(state):
    yield state
    for f in _NESTED:
      if f in state._fields:
        yield from _state_nodes(getattr(state, f))
  elif isinstance(state, tuple):
    for x in state:
      yield from _state_nodes(x)


def _map_nodes(state, fn):
  """``state`` with every state object ``x`` (``_state_nodes``' order) replaced by ``fn(x)``."""
  if _is_node(state):
    out = fn(state)
    changes = {f: _map_nodes(getattr(out, f), fn) for f in _NESTED if f in out._fields}
    return out._replace(**changes) if changes else out
  if isinstance(state, tuple):
    return tuple(_map_nodes(x, fn) for x in state)
  return state


def _holder(state, attr, name):
  """The one state object of ``state`` with the params-shaped field ``attr``."""
  found = [x for x in _state_nodes(state) if attr in x._fields]
  if len(found) != 1:
    raise TypeError(f"fusedopt.tx.{name}: expected the state made by its init() (optax's "
                    f"structure, one object with the field {attr!r}), got {type(state).__name__}"
                    f" with {len(found)}")
  return found[0]


# optax's step counters (``ScaleByAdanState.t``, AdEMAMix's ``count_m2``): every one advances by
# one per update, together
_COUNTERS = ("count", "t", "count_m2")


def _step_count(state):
  """The step count of an optax state: its first counter (optax increments all of them
  together), or None where the state has none (``sgd`` with a constant learning rate)."""
  for x in _state_nodes(state):
    for c in _COUNTERS:
      if c in x._fields:
        return getattr(x, c)
  return None


def _increment(count, by):
  """optax's ``safe_increment``: ``count + by``, saturating at the int32 maximum."""
  top = jnp.iinfo(jnp.int32).max
  return jnp.where(count < top, count + jnp.asarray(by, count.dtype), count)


def _stored_leaf(x, dtype):
  """A state leaf in its storage: cast to a float dtype, or for a quantized ``Format`` a
  ``QuantizedArray`` of the leaf over whole blocks (a real leaf of at least
  ``quantization.MIN_SIZE`` elements; smaller ones, and complex ones, float32)."""
  if not isinstance(dtype, quantization.Format):
    return x.astype(dtype)
  if jnp.iscomplexobj(x) or np.size(x) < quantization.MIN_SIZE:
    return x if jnp.iscomplexobj(x) else x.astype(F32)
  n = int(np.size(x))
  padded = jnp.pad(jnp.ravel(x).astype(F32), (0, -n % quantization.BLOCK))
  return quantization.quantize_like(padded, quantization.QuantizedArray.zeros(
      padded.shape[0], dtype))


def _cast_fields(state, dtypes):
  """``state`` with the params-shaped fields named in ``dtypes`` (attr -> float dtype or
  quantized ``Format``) in that storage (``_stored_leaf``)."""
  def cast(node):
    changes = {a: jax.tree_util.tree_map(lambda x: _stored_leaf(x, dt), getattr(node, a))
               for a, dt in dtypes.items() if a in node._fields}
    return node._replace(**changes) if changes else node
  return _map_nodes(state, cast)


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
    opt_def: a built-in ``FlatOptimizerDef`` (the backend) or ``Adafactor``.
    hyper: optax-named hyper-parameters (values or schedules), evaluated per step by ``_at``.
    ref: optax's own transformation for the same arguments: its ``init`` gives the state (the
      structure, shapes, dtypes and initial values the fused update reads and writes).
    slots: the params-shaped fields of that state the rule reads and writes, in the rule's state
      order (optax's names: ``("mu", "nu")``; each held by exactly one state object).
    step: ``step(hp, count, runner, layout, p_leaves, g_leaves, fields, params) ->
      (new_p_leaves, new_fields)``; ``hp`` a namespace of the values at ``count``, ``fields``
      slot -> per-leaf list.
    cast: slot -> dtype: fields stored in another dtype than optax's (``state_dtype``).
    needs_params: whether ``update`` needs ``params``.
    clip: global-norm clipping threshold (or None); skip_nonfinite: skip non-finite steps.
    per_leaf: the optimizer runs per leaf (Adafactor).
    wd_mask: Adafactor's ``weight_decay_mask``.
    outer: state that is not per parameter (schedule-free's averaging weights):
      ``outer(state) -> (values, advance)``; ``values`` (name -> scalar) join ``hp`` for
      ``step``, ``advance(node, by)`` returns a state object with those fields advanced (``by``:
      1, or 0 for a skipped step, which must leave them unchanged).
  """
  name: str
  opt_def: Any
  hyper: dict
  ref: Any
  slots: tuple
  step: Callable
  cast: dict = dataclasses.field(default_factory=dict)
  needs_params: bool = False
  clip: Any = None
  skip_nonfinite: bool = False
  per_leaf: bool = False
  wd_mask: Any = None
  outer: Any = None


class _FusedUpdate:
  """The ``update`` function of a fused transformation (a callable object, so that ``tx.chain``
  can recognise it and fold a preceding ``clip_by_global_norm`` into it)."""

  def __init__(self, spec: _Spec):
    self.spec = spec

  def __call__(self, updates, state, params=None, **extra_args):
    del extra_args
    return self._step(updates, state, params, deltas=True)

  def apply(self, grads, state, params):
    """``(new_params, new_state)`` in one pass: the kernels write the new params over the old
    ones (in place when the caller donates them), no update tree in between."""
    if params is None:
      raise ValueError(f"fusedopt.tx.{self.spec.name}: update_and_apply needs the params")
    return self._step(grads, state, params, deltas=False)

  def _step(self, updates, state, params, deltas):
    """optax's ``update`` (``deltas``: the updates ``p' - p``) or the new params."""
    spec = self.spec
    if params is None and spec.needs_params:
      raise ValueError(f"fusedopt.tx.{spec.name} reads the parameters (weight decay, trust "
                       "ratio or parameter scale): call update(grads, state, params)")
    holders = [_holder(state, a, spec.name) for a in spec.slots]
    count = _step_count(state)
    hp = {k: _at(v, F32(0) if count is None else count) for k, v in spec.hyper.items()}
    advance = None
    if spec.outer is not None:
      values, advance = spec.outer(state)
      hp.update(values)
    hp = types.SimpleNamespace(**hp)
    g_leaves, g_def = jax.tree_util.tree_flatten(updates)
    fields = {}
    for a, h in zip(spec.slots, holders):
      leaves, tdef = jax.tree_util.tree_flatten(getattr(h, a),
                                                is_leaf=quantization.is_quantized)
      if len(leaves) != len(g_leaves):
        raise LayoutError(f"fusedopt.tx.{spec.name}: the state's {a!r} has {len(leaves)} leaves, "
                          f"the grads {len(g_leaves)}:\n  state: {tdef}\n  grads: {g_def}")
      fields[a] = (leaves, tdef)
    if not g_leaves:   # an empty tree: nothing to update; the step still counts (optax)
      return (updates if deltas else params), _map_nodes(state, _counted(1, advance))
    if spec.clip is not None or spec.skip_nonfinite:
      finite, _, gscale = gradient_prepass(g_leaves, None, spec.clip)
      ok = finite.astype(F32) if spec.skip_nonfinite else F32(1.0)
      guard = {"gscale": gscale, "ok": ok}
    else:
      finite, guard = None, None
    step_count = jnp.zeros([], jnp.int32) if count is None else count
    values = {a: leaves for a, (leaves, _) in fields.items()}
    if spec.per_leaf:
      new_p, p_leaves, new_values = _per_leaf_step(spec, hp, step_count, guard, finite, values,
                                                   g_leaves, params)
    else:
      new_p, p_leaves, new_values = _flat_step(spec, hp, step_count, guard, values, updates,
                                               g_leaves, params, deltas)
    if not deltas:
      u = new_p
      g_def = jax.tree_util.tree_structure(params)
    elif params is None:
      u = new_p                                  # computed from p = 0: optax's update exactly
    elif spec.per_leaf:
      u = [n - p for n, p in zip(new_p, p_leaves)]   # exact when p/2 <= p' <= 2p (Sterbenz)
    else:   # the kernels already returned p' - p for float32 params (``with_param_deltas``)
      u = [n if jnp.result_type(p) == F32 else n - p for n, p in zip(new_p, p_leaves)]
    new_trees = {a: jax.tree_util.tree_unflatten(fields[a][1], new_values[a])
                 for a in spec.slots}
    by = finite.astype(jnp.int32) if spec.skip_nonfinite else 1

    def put(node):
      node = _counted(by, advance)(node)
      changes = {a: t for a, t in new_trees.items() if a in node._fields}
      return node._replace(**changes) if changes else node
    return jax.tree_util.tree_unflatten(g_def, u), _map_nodes(state, put)


def _counted(by, advance=None):
  """A state object with its counters (if any) advanced by ``by`` (optax's safe increment), and
  by ``advance`` (``_Spec.outer``) where given."""
  def f(node):
    node = node._replace(**{c: _increment(getattr(node, c), by) for c in _COUNTERS
                            if c in node._fields})
    return node if advance is None else advance(node, by)
  return f


def _flat_step(spec, hp, count, guard, values, updates, g_leaves, params, deltas=True):
  # complex leaves form their own groups (``registry.select``: jnp for auto, else planes)
  if params is None:
    layout = FlatLayout.build(updates, complex_ok=True)
    p_leaves = [jnp.zeros(s.shape, layout.groups[s.group].dtype) for s in layout.segments]
  else:   # the grads must have the params' tree structure (LayoutError naming both otherwise)
    layout = FlatLayout.build(params, complex_ok=True)
    p_leaves = layout.check(params, "params", allow_other_float=False)
  g_leaves = layout.check(updates, "grads")
  for a, leaves in values.items():
    for seg, x in zip(layout.segments, leaves):
      if quantization.is_quantized(x):   # codes over the leaf's whole blocks
        if x.shape != (-(-seg.size // x.block) * x.block,):
          raise LayoutError(f"fusedopt.tx.{spec.name}: state {a!r} leaf {seg.path} holds "
                            f"{x.shape} codes, the parameter {seg.shape}")
      elif tuple(jnp.shape(x)) != seg.shape:
        raise LayoutError(f"fusedopt.tx.{spec.name}: state {a!r} leaf {seg.path} has shape "
                          f"{tuple(jnp.shape(x))}, the parameter {seg.shape}")
  runner = _Runner(spec.opt_def, guard, count, spec.slots, deltas)
  new_p, new_values = spec.step(hp, count, runner, layout, p_leaves, g_leaves, dict(values),
                                params)
  return new_p, p_leaves, {a: list(v) for a, v in new_values.items()}


def _transformation(spec: _Spec) -> optax.GradientTransformationExtraArgs:
  def init(params):
    state = spec.ref.init(params)
    return _cast_fields(state, spec.cast) if spec.cast else state

  return optax.GradientTransformationExtraArgs(init, _FusedUpdate(spec))


def _common(name, opt_def, hyper, ref, slots, step, *, clip_global_norm, skip_nonfinite,
            nonnegative=None, **kw):
  if clip_global_norm is not None:
    _check_kind("clip_global_norm", clip_global_norm)
    if _is_schedule(clip_global_norm):
      raise HyperParamError("clip_global_norm must be a number or an array, not a schedule")
    check_scalar("clip_global_norm", clip_global_norm)
    v = concrete_float(clip_global_norm)
    if v is not None and not v > 0:
      raise HyperParamError(f"clip_global_norm={v} must be positive")
  schedules = [k for k, v in hyper.items() if _is_schedule(v)]
  if schedules and _step_count(jax.eval_shape(ref.init, {"x": jax.ShapeDtypeStruct((1,), F32)})
                               ) is None:
    raise HyperParamError(f"fusedopt.tx.{name}: {schedules} are schedules, but optax's state for "
                          "these arguments has no step count to evaluate them at; pass the "
                          "learning rate as a schedule too, or use optax.inject_hyperparams")
  if kw.get("cast"):
    kw["cast"] = _formats(kw["cast"], slots, opt_def, nonnegative)
  return _transformation(_Spec(name, opt_def, hyper, ref, tuple(slots), step,
                               clip=clip_global_norm, skip_nonfinite=bool(skip_nonfinite), **kw))


def _run_masked_decay(run, rule, s, mask, layout, p, g, fields, params):
  """``run.run(rule, ...)`` with optax's weight-decay ``mask`` (None: every tensor decays) as a
  per-tensor ``wd`` (``elementwise.per_segment``): the decoupled-decay aliases' step."""
  seg = {}
  if mask is not None:
    n = len(layout.segments)
    rule, seg = _per_segment(rule, s, {}, n, {"wd": s["wd"] * _mask_vector(mask, params, n)})
  return run.run(rule, s, seg, layout, p, g, fields)


def _storage(state_dtype, slots, name):
  """``state_dtype`` (one dtype, or ``{slot: dtype}`` with optax's field names) as slot ->
  dtype, or slot -> "int8" / "float8_e4m3fn" (quantized state, ``fusedopt.quantization``;
  ``_common`` picks the map); None keeps optax's dtypes."""
  if state_dtype is None:
    return {}
  if isinstance(state_dtype, dict):
    unknown = sorted(set(state_dtype) - set(slots))
    if unknown:
      raise ValueError(f"fusedopt.tx.{name}: state_dtype names {unknown}; its state fields are "
                       f"{list(slots)}")
    out = dict(state_dtype)
  else:
    out = {a: state_dtype for a in slots}
  res = {}
  for a, dt in out.items():
    kind = quantization.storage_kind(dt)
    if kind is not None:
      res[a] = kind
      continue
    try:
      ok = jnp.issubdtype(jnp.dtype(dt), jnp.floating)
    except TypeError:
      ok = False
    if not ok:
      raise HyperParamError(f"state_dtype for {a!r} must be a floating dtype, \"int8\" or "
                            f"jnp.float8_e4m3fn (quantized), got {dt!r}")
    res[a] = jnp.dtype(dt)
  return res


def _formats(cast, slots, opt_def, nonnegative):
  """``cast`` with each quantized kind as its ``quantization.Format``: the unsigned map for the
  slots that are never negative (``nonnegative``, by default the slots matching the optimizer's
  ``nonnegative_fields`` in state order)."""
  if nonnegative is None:
    fields = getattr(opt_def, "state_fields", ())
    nonneg = getattr(opt_def, "nonnegative_fields", ())
    nonnegative = {a for a, f in zip(slots, fields) if f in nonneg}
  return {a: (quantization.format_for(dt, a in nonnegative) if isinstance(dt, str) else dt)
          for a, dt in cast.items()}


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
  slots = ("mu", "nu")
  cast = _storage(state_dtype, slots, name)
  if mu_dtype is not None:   # optax's: the first moment's dtype (over state_dtype's)
    cast["mu"] = jnp.dtype(mu_dtype)
  opt_def = Adam(0.0, backend=backend)
  step = _adam_step(bool(nesterov), _is_zero(eps_root), mask)
  kw = dict(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
            mu_dtype=mu_dtype, nesterov=nesterov)
  if weight_decay is None:
    ref = optax.adam(**kw)
  else:
    ref = optax.adamw(**kw, weight_decay=weight_decay, mask=mask)
  return _common(name, opt_def, hyper, ref, slots, step, clip_global_norm=clip_global_norm,
                 skip_nonfinite=skip_nonfinite, needs_params=weight_decay is not None,
                 cast=cast)


def adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, *,
         nesterov=False, backend="auto", state_dtype=None, clip_global_norm=None,
         skip_nonfinite=False) -> optax.GradientTransformationExtraArgs:
  r"""Adam (optax.adam), fused.

  .. math::
    m_t = b_1 m_{t-1} + (1-b_1) g_t,\quad v_t = b_2 v_{t-1} + (1-b_2) g_t^2 \\
    u_t = -\eta_t\, \frac{m_t / (1-b_1^t)}{\sqrt{v_t/(1-b_2^t) + \epsilon_{root}} + \epsilon}

  ``nesterov=True`` uses Nadam's ``m_hat`` (Dozat 2016), as optax. State: optax's
  ``(ScaleByAdamState(count, mu, nu), ...)``; ``mu_dtype`` (optax's) stores the first moment in
  that dtype (computed in float32, rounded to nearest when stored).
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


def lion(learning_rate, b1=0.9, b2=0.99, mu_dtype=None, weight_decay=1e-3, mask=None, *,
         backend="auto", state_dtype=None, clip_global_norm=None, skip_nonfinite=False
         ) -> optax.GradientTransformationExtraArgs:
  r"""Lion (optax.lion), fused: one pass, one state buffer (``mu``).

  .. math::
    c_t = (1-b_1) g_t + b_1 m_{t-1},\quad
    u_t = -\eta_t (\operatorname{sign}(c_t) + \lambda_t p_{t-1}),\quad
    m_t = (1-b_2) g_t + b_2 m_{t-1}

  ``mask`` (a tree of bools, a prefix of the params, or a callable; True = decay) applies the
  weight decay per tensor; ``mu_dtype`` stores the moment in that dtype (optax's). State:
  optax's ``(ScaleByLionState(count, mu), ...)``. Requires ``params`` in ``update`` (the decay).

  References:
    Chen et al., 2023: https://arxiv.org/abs/2302.06675
  """
  hyper = dict(learning_rate=learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
  _validate(dict(learning_rate=_LR, b1=_BETA, b2=_BETA, weight_decay=_NONNEG), hyper)
  slots = ("mu",)
  cast = _storage(state_dtype, slots, "lion")
  if mu_dtype is not None:
    cast["mu"] = jnp.dtype(mu_dtype)
  ref = optax.lion(learning_rate, b1=b1, b2=b2, mu_dtype=mu_dtype, weight_decay=weight_decay,
                   mask=mask)

  def step(hp, count, run, layout, p, g, fields, params):
    del count
    s = lion_scalars(hp.learning_rate, hp.b1, hp.b2, hp.weight_decay)
    return _run_masked_decay(run, LION_RULE, s, mask, layout, p, g, fields, params)
  return _common("lion", Lion(0.0, backend=backend), hyper, ref, slots, step,
                 clip_global_norm=clip_global_norm, skip_nonfinite=skip_nonfinite,
                 needs_params=True, cast=cast)


def adan(learning_rate, b1=0.98, b2=0.92, b3=0.99, eps=1e-8, eps_root=1e-8, weight_decay=0.0,
         mask=None, *, backend="auto", state_dtype=None, clip_global_norm=None,
         skip_nonfinite=False) -> optax.GradientTransformationExtraArgs:
  r"""Adan (optax.adan), fused: one pass over p, g and four state buffers (``m, v, n, g``).

  .. math::
    d_t = g_t - g_{t-1}\ (0 	ext{ at } t=1),\quad m_t = b_1 m + (1-b_1) g_t,\quad
    v_t = b_2 v + (1-b_2) d_t,\quad n_t = b_3 n + (1-b_3) |g_t + (1-b_2) d_t|^2

    u_t = -\eta_t \left(rac{\hat m_t + (1-b_2) \hat v_t}{\sqrt{\hat n_t + \epsilon_{root}}
          + \epsilon} + \lambda_t p_{t-1}
ight)

  with the hats the bias-corrected averages (``1 - b^t`` from the exact ``b``). ``mask`` (a tree
  of bools, a prefix of the params, or a callable; True = decay) applies the weight decay per
  tensor. State: optax's ``(ScaleByAdanState(m, v, n, g, t), ...)``. Requires ``params`` in
  ``update`` (optax's ``add_decayed_weights`` does).

  References:
    Xie et al., 2022: https://arxiv.org/abs/2208.06677
  """
  hyper = dict(learning_rate=learning_rate, b1=b1, b2=b2, b3=b3, eps=eps, eps_root=eps_root,
               weight_decay=weight_decay)
  _validate(dict(learning_rate=_LR, b1=_BETA, b2=_BETA, b3=_BETA, eps=_NONNEG,
                 eps_root=_NONNEG, weight_decay=_NONNEG), hyper)
  slots = ("m", "v", "n", "g")
  ref = optax.adan(learning_rate, b1=b1, b2=b2, b3=b3, eps=eps, eps_root=eps_root,
                   weight_decay=weight_decay, mask=mask)

  def step(hp, count, run, layout, p, g, fields, params):
    s = adan_scalars(hp.learning_rate, hp.b1, hp.b2, hp.b3, hp.eps, hp.eps_root,
                     hp.weight_decay, count)
    return _run_masked_decay(run, ADAN_RULE, s, mask, layout, p, g, fields, params)
  return _common("adan", Adan(0.0, backend=backend), hyper, ref, slots, step,
                 clip_global_norm=clip_global_norm, skip_nonfinite=skip_nonfinite,
                 needs_params=True, cast=_storage(state_dtype, slots, "adan"))


def ademamix(learning_rate, b1=0.9, b2=0.999, b3=0.9999, alpha=5.0, eps=1e-8, eps_root=0.0,
             mu_dtype=None, weight_decay=0.0, mask=None, *, backend="auto", state_dtype=None,
             clip_global_norm=None, skip_nonfinite=False
             ) -> optax.GradientTransformationExtraArgs:
  r"""AdEMAMix (optax.contrib.ademamix), fused: one pass over p, g and three state buffers.

  .. math::
    m_1 \gets b_1 m_1 + (1-b_1) g,\quad m_2 \gets b_3 m_2 + (1-b_3) g,\quad
    \nu \gets b_2 \nu + (1-b_2) |g|^2

    u_t = -\eta_t \left(\frac{\hat m_1 + \alpha_t m_2}{\sqrt{\hat\nu + \epsilon_{root}}
          + \epsilon} + \lambda p_{t-1}\right)

  ``b3`` and ``alpha`` may be schedules (the paper warms both up), like every argument; they enter
  the kernel as runtime values. ``mu_dtype`` stores all three averages in that dtype (optax's).
  ``mask`` applies the weight decay per tensor. State: optax's
  ``(ScaleByAdemamixState(count, count_m2, m1, m2, nu), ...)``. Requires ``params``.

  References:
    Pagliardini, Ablin & Grangier, 2024: https://arxiv.org/abs/2409.03137
  """
  hyper = dict(learning_rate=learning_rate, b1=b1, b2=b2, b3=b3, alpha=alpha, eps=eps,
               eps_root=eps_root, weight_decay=weight_decay)
  _validate(dict(learning_rate=_LR, b1=_BETA, b2=_BETA, b3=_BETA, alpha=_NONNEG, eps=_NONNEG,
                 eps_root=_NONNEG, weight_decay=_NONNEG), hyper)
  slots = ("m1", "m2", "nu")
  cast = _storage(state_dtype, slots, "ademamix")
  if mu_dtype is not None:   # optax's: every average's dtype (over state_dtype's)
    cast.update({a: jnp.dtype(mu_dtype) for a in slots})
  ref = optax.contrib.ademamix(learning_rate, b1=b1, b2=b2, b3=b3, alpha=alpha, eps=eps,
                               eps_root=eps_root, mu_dtype=mu_dtype, weight_decay=weight_decay,
                               mask=mask)

  def step(hp, count, run, layout, p, g, fields, params):
    s = ademamix_scalars(hp.learning_rate, hp.b1, hp.b2, hp.b3, hp.alpha, hp.eps, hp.eps_root,
                         hp.weight_decay, count)
    return _run_masked_decay(run, ADEMAMIX_RULE, s, mask, layout, p, g, fields, params)
  return _common("ademamix", AdEMAMix(0.0, backend=backend), hyper, ref, slots, step,
                 clip_global_norm=clip_global_norm, skip_nonfinite=skip_nonfinite,
                 needs_params=True, cast=cast)


def adopt(learning_rate, b1=0.9, b2=0.9999, eps=1e-6, mu_dtype=None, *, nesterov=False,
          use_clipping=True, clip_value_fn=lambda x: x ** 0.25, backend="auto",
          state_dtype=None, clip_global_norm=None, skip_nonfinite=False
          ) -> optax.GradientTransformationExtraArgs:
  r"""ADOPT (optax.contrib.adopt), fused: one pass, Adam's two state buffers.

  .. math::
    u = \operatorname{clip}\left(\frac{g_t}{\max(\sqrt{\nu_{t-1}}, \epsilon)},
        -c_t, c_t\right),\quad
    \mu_t = b_1 \mu_{t-1} + (1-b_1) u,\quad \nu_t = b_2 \nu_{t-1} + (1-b_2) |g_t|^2,\quad
    u_t = -\eta_t \mu_t

  with ``b1 = 1``, ``b2 = 0`` at the first step (optax's) and ``c_t = clip_value_fn(t)``
  (``t**0.25``; evaluated per step, a runtime value in the kernel), no clip with
  ``use_clipping=False`` (required for complex params: they have no order to clip by).
  ``nesterov`` applies the average once more. State: optax's
  ``(ScaleByAdamState(count, mu, nu), ...)``. ``params`` are not needed.

  References:
    Taniguchi et al., 2024: https://arxiv.org/abs/2411.02853
  """
  hyper = dict(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps)
  _validate(dict(learning_rate=_LR, b1=_BETA, b2=_BETA, eps=_NONNEG), hyper)
  if not callable(clip_value_fn):
    raise HyperParamError(f"clip_value_fn={clip_value_fn!r} must be a function of the step count")
  slots = ("mu", "nu")
  cast = _storage(state_dtype, slots, "adopt")
  if mu_dtype is not None:   # optax's: the first moment's dtype (over state_dtype's)
    cast["mu"] = jnp.dtype(mu_dtype)
  ref = optax.contrib.adopt(learning_rate, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype,
                            nesterov=nesterov, use_clipping=use_clipping,
                            clip_value_fn=clip_value_fn)
  rule = adopt_rule(bool(nesterov), bool(use_clipping))

  def step(hp, count, run, layout, p, g, fields, params):
    del params
    if use_clipping and any(jnp.issubdtype(gr.dtype, jnp.complexfloating)
                            for gr in layout.groups):
      raise ValueError("fusedopt.tx.adopt: complex parameters have no ordering to clip by "
                       "(optax's jnp.clip refuses them too); pass use_clipping=False")
    clip = clip_value_fn(count) if use_clipping else 0.0
    s = adopt_scalars(hp.learning_rate, hp.b1, hp.b2, hp.eps, clip, count)
    return run.run(rule, s, {}, layout, p, g, fields)
  return _common("adopt", ADOPT(0.0, backend=backend), hyper, ref, slots, step,
                 clip_global_norm=clip_global_norm, skip_nonfinite=skip_nonfinite, cast=cast)


def schedule_free_adamw(learning_rate=0.0025, warmup_steps=None, b1=0.9, b2=0.999, eps=1e-8,
                        weight_decay=0.0, weight_lr_power=2.0, state_dtype=None, *,
                        backend="auto", clip_global_norm=None, skip_nonfinite=False
                        ) -> optax.GradientTransformationExtraArgs:
  r"""Schedule-free AdamW (optax.contrib.schedule_free_adamw), fused: one pass over the params
  ``y``, the gradient and two state buffers (``nu``, ``z``).

  .. math::
    
u \gets b_2 
u + (1-b_2) |g|^2,\quad
    z' = z - \eta_t \left(rac{g}{\sqrt{
u / (1-b_2^t)} + \epsilon} + \lambda y
ight)

    x = rac{y - (1-b_1) z}{b_1},\quad x' = (1-c_t) x + c_t z',\quad
    y' = b_1 x' + (1-b_1) z'

  with ``c_t = w_t / \sum_{i \le t} w_i``, ``w_t = (\max_{i \le t} \eta_i)^r`` (``r`` =
  ``weight_lr_power``). The params are the training point ``y``; evaluate at ``x`` with
  ``schedule_free_eval_params(state, params)`` (optax's, re-exported). ``warmup_steps`` warms
  the learning rate up linearly from 0 (optax's ``warmup_constant_schedule``); ``state_dtype``
  is optax's: the dtype of ``z``. State: optax's ``ScheduleFreeState(b1, weight_sum,
  step_count, max_lr, base_optimizer_state=(ScaleByRmsWithCountState(count, nu), ...), z)``;
  its scalars (the averaging weights) are updated outside the kernel. Requires ``params``.

  References:
    Defazio et al., 2024: https://arxiv.org/abs/2405.15682
  """
  if quantization.storage_kind(state_dtype) is not None:
    raise HyperParamError("fusedopt.tx.schedule_free_adamw: state_dtype is optax's dtype of z, "
                          "a float dtype; quantized state is not offered for this alias")
  hyper = dict(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  _validate(dict(learning_rate=_LR, b1=dict(lo=0.0, lo_open=True, hi=1.0), b2=_BETA,
                 eps=_NONNEG, weight_decay=_NONNEG), hyper)
  _check_kind("weight_lr_power", weight_lr_power)
  if warmup_steps is not None:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) \
        or warmup_steps < 1:
      raise HyperParamError(f"warmup_steps={warmup_steps!r} must be a positive int or None")
    learning_rate = optax.warmup_constant_schedule(0.0, learning_rate, int(warmup_steps))
    hyper["learning_rate"] = learning_rate
  ref = optax.contrib.schedule_free_adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                                          weight_decay=weight_decay,
                                          weight_lr_power=weight_lr_power,
                                          state_dtype=state_dtype)

  def outer(state):
    sf = _holder(state, "weight_sum", "schedule_free_adamw")
    lr = _at(learning_rate, sf.step_count)
    c, max_lr, total = schedule_free.averaging_weight(sf.max_lr, sf.weight_sum, lr,
                                                      weight_lr_power)

    def advance(node, by):
      if "weight_sum" not in node._fields:
        return node
      weight_sum, new_max = schedule_free.advanced_scalars(by, node.weight_sum, node.max_lr,
                                                           total, max_lr)
      return node._replace(weight_sum=weight_sum, max_lr=new_max,
                           step_count=_increment(node.step_count, by))
    return {"c": jnp.real(c) if jnp.iscomplexobj(c) else c}, advance

  def step(hp, count, run, layout, p, g, fields, params):
    del params
    s = schedule_free.schedule_free_scalars(hp.learning_rate, hp.b1, hp.b2, hp.eps,
                                            hp.weight_decay, hp.c, count)
    return run.run(schedule_free.SCHEDULE_FREE_ADAMW_RULE, s, {}, layout, p, g, fields)
  return _common("schedule_free_adamw", Adam(0.0, backend=backend), hyper, ref, ("nu", "z"),
                 step, clip_global_norm=clip_global_norm, skip_nonfinite=skip_nonfinite,
                 needs_params=True, outer=outer)


schedule_free_eval_params = optax.contrib.schedule_free_eval_params


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
  ref = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov,
                  accumulator_dtype=accumulator_dtype)
  if momentum is None:
    opt_def, slots = GradientDescent(0.0, backend=backend), ()

    def step(hp, count, run, layout, p, g, fields, params):
      return run.run(SGD_RULE, {"lr": hp.learning_rate}, {}, layout, p, g, fields)
  else:
    opt_def, slots = Momentum(0.0, backend=backend), ("trace",)
    rule = momentum_rule(bool(nesterov))

    def step(hp, count, run, layout, p, g, fields, params):
      s = {"lr": hp.learning_rate, "beta": hp.momentum, "wd": F32(0.0)}
      return run.run(rule, s, {}, layout, p, g, fields)
  return _common("sgd", opt_def, hyper, ref, slots, step, clip_global_norm=clip_global_norm,
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
  ``initial_scale`` fills ``v`` at init. ``bias_correction=True`` divides ``v`` (and ``mg``) by
  ``1 - d^t``; ``momentum`` keeps optax's ``trace`` of the learning-rate-scaled step
  (``t = beta t - eta g / den``, ``u = t``, nesterov ``u = beta t - eta g / den``), fused into
  the same rule (``rmsprop_rule(..., momentum=True)``). State: optax's ``ScaleByRmsState`` /
  ``ScaleByRStdDevState`` (with a count under ``bias_correction``) and ``TraceState``.

  References:
    Tieleman & Hinton, 2012 (lecture 6.5); Graves, 2013: https://arxiv.org/abs/1308.0850
  """
  hyper = dict(learning_rate=learning_rate, decay=decay, eps=eps, initial_scale=initial_scale)
  ranges = dict(learning_rate=_LR, decay=_BETA, eps=_NONNEG, initial_scale=_NONNEG)
  if momentum is not None:
    hyper["momentum"] = momentum
    ranges["momentum"] = _DECAY
  _validate(ranges, hyper)
  if _is_schedule(initial_scale):
    raise HyperParamError("initial_scale must be a number (it fills the state at init)")
  opt_def = RMSProp(0.0, centered=bool(centered), backend=backend)
  rule = rmsprop_rule(bool(centered), eps_in_sqrt=bool(eps_in_sqrt),
                      bias_correction=bool(bias_correction), momentum=momentum is not None,
                      nesterov=bool(nesterov))
  slots = ("nu",) + (("mu",) if centered else ()) + (("trace",) if momentum is not None else ())
  ref = optax.rmsprop(learning_rate, decay=decay, eps=eps, initial_scale=initial_scale,
                      eps_in_sqrt=eps_in_sqrt, centered=centered, momentum=momentum,
                      nesterov=nesterov, bias_correction=bias_correction)

  def step(hp, count, run, layout, p, g, fields, params):
    s = {"lr": hp.learning_rate, "b2": hp.decay, "one_minus_b2": _one_minus(hp.decay),
         "eps": hp.eps}
    if bias_correction:
      s["bias_corr2"] = bias_correction_of(hp.decay, count)
    if momentum is not None:
      s["beta"] = hp.momentum
    return run.run(rule, s, {}, layout, p, g, fields)
  cast = _storage(state_dtype, slots, "rmsprop")
  if centered and any(isinstance(v, str) for v in cast.values()):
    raise HyperParamError(CENTERED_QUANTIZED)
  return _common("rmsprop", opt_def, hyper, ref, slots, step, clip_global_norm=clip_global_norm,
                 skip_nonfinite=skip_nonfinite, cast=cast)


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
  opt_def = Adagrad(0.0, backend=backend)
  rule = adagrad_rule(eps_in_sqrt=True)
  ref = optax.adagrad(learning_rate, initial_accumulator_value=initial_accumulator_value, eps=eps)
  slots = ("sum_of_squares",)

  def step(hp, count, run, layout, p, g, fields, params):
    return run.run(rule, {"lr": hp.learning_rate, "eps": hp.eps}, {}, layout, p, g, fields)
  return _common("adagrad", opt_def, hyper, ref, slots, step, clip_global_norm=clip_global_norm,
                 skip_nonfinite=skip_nonfinite, cast=_storage(state_dtype, slots, "adagrad"))


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
  opt_def = LAMB(0.0, backend=backend)
  slots = ("mu", "nu")
  ref = optax.lamb(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                   weight_decay=weight_decay, mask=mask)
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
  return _common("lamb", opt_def, hyper, ref, slots, step, clip_global_norm=clip_global_norm,
                 skip_nonfinite=skip_nonfinite, needs_params=True,
                 cast=_storage(state_dtype, slots, "lamb"))


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
  opt_def = LARS(0.0, backend=backend)
  slots = ("trace",)
  ref = optax.lars(learning_rate, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
                   trust_coefficient=trust_coefficient, eps=eps,
                   trust_ratio_mask=trust_ratio_mask, momentum=momentum, nesterov=nesterov)
  rule = lars_rule(bool(nesterov), descent_trace=True)   # optax's trace holds -m
  wd_masked = weight_decay_mask is not True
  tr_masked = trust_ratio_mask is not True

  def step(hp, count, run, layout, p, g, fields, params):
    n = len(layout.segments)
    wd = jnp.broadcast_to(jnp.asarray(hp.weight_decay, F32), (n,))
    if wd_masked:
      wd = wd * _mask_vector(weight_decay_mask, params, n)
    gscale = run.gscale
    d = [norms.upcast(gi) * gscale + wd[i] * norms.upcast(pi)   # (complex stays complex)
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
  return _common("lars", opt_def, hyper, ref, slots, step, clip_global_norm=clip_global_norm,
                 skip_nonfinite=skip_nonfinite, needs_params=True,
                 cast=_storage(state_dtype, slots, "lars"))


# ----------------------------------------------------------------------------- Adafactor

_ADAFACTOR_SLOTS = {"v_row": "v_row", "v_col": "v_col", "v": "v", "ema": "m"}


def _per_leaf_step(spec, hp, count, guard, finite, values, g_leaves, params):
  """Adafactor: fusedopt's ``Adafactor`` per leaf, its state read from and written to optax's
  fields (``FactoredState``'s ``v_row``/``v_col``/``v``, the momentum ``EmaState``'s ``ema``)."""
  opt_def = spec.opt_def
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
  new_p = []
  new_values = {a: [] for a in values}
  for i, (p, g) in enumerate(zip(p_leaves, g_leaves)):
    # (1 - 0) * p == p: a masked-out leaf gets exactly the undecayed update
    h = base_hp.replace(weight_decay_rate=None if wdr is None else
                        (wdr[i] if spec.wd_mask is not None else wdr))
    if guard is not None:
      g = (norms.upcast(g) * guard["gscale"]).astype(jnp.result_type(g))
    st = opt_def.init_param_state(p).replace(
        **{_ADAFACTOR_SLOTS[a]: v[i] for a, v in values.items()})
    new_leaf, new_st = opt_def.apply_param_gradient(count, h, p, st, g)
    if spec.skip_nonfinite:
      new_leaf = jnp.where(finite, new_leaf, p)
    new_p.append(new_leaf)
    for a, v in values.items():
      x = new_st[_ADAFACTOR_SLOTS[a]].astype(v[i].dtype)
      new_values[a].append(jnp.where(finite, x, v[i]) if spec.skip_nonfinite else x)
  return new_p, p_leaves, new_values


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
  ref = optax.adafactor(
      learning_rate, min_dim_size_to_factor=min_dim, decay_rate=decay_rate,
      decay_offset=decay_offset, multiply_by_parameter_scale=multiply_by_parameter_scale,
      clipping_threshold=clipping_threshold, momentum=momentum, dtype_momentum=dtype_momentum,
      weight_decay_rate=weight_decay_rate, eps=eps, factored=factored,
      weight_decay_mask=weight_decay_mask)
  slots = ("v_row", "v_col", "v") + (("ema",) if momentum is not None else ())
  return _common("adafactor", opt_def, hyper, ref, slots, None, clip_global_norm=clip_global_norm,
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
  where optax computes ``(g / ||g||) * c``: equal to 1 ulp). The state is ``optax.chain``'s,
  entry for entry (the clip's ``EmptyState`` included). A chain that reduces to a single
  transformation is returned as it is."""
  parts, i, folded = [], 0, False   # (transformation, number of optax.chain entries it holds)
  while i < len(transforms):
    t = transforms[i]
    nxt = transforms[i + 1] if i + 1 < len(transforms) else None
    max_norm = _clip_max_norm(t)
    if (max_norm is not None and nxt is not None and isinstance(nxt.update, _FusedUpdate)
        and nxt.update.spec.clip is None):
      spec = nxt.update.spec   # its state: optax.chain(clip, opt)'s, (EmptyState(), opt's)
      parts.append((_transformation(dataclasses.replace(spec, clip=max_norm,
                                                        ref=optax.chain(t, spec.ref))), 2))
      i, folded = i + 2, True
      continue
    parts.append((t, 1))
    i += 1
  if not folded:
    return optax.chain(*transforms)
  if len(parts) == 1:
    return parts[0][0]
  parts = [(optax.with_extra_args_support(t), n) for t, n in parts]

  def init(params):
    out = []
    for t, n in parts:
      s = t.init(params)
      out.extend(s if n == 2 else (s,))
    return tuple(out)
  return optax.GradientTransformationExtraArgs(init, _ChainUpdate(parts))


class _ChainUpdate:
  """``update`` of a ``tx.chain`` with a folded clip: each part's state is its entries of the
  flat ``optax.chain`` tuple (2 for a fused optimizer with the clip folded in)."""

  def __init__(self, parts):
    self.parts = parts

  def _run(self, updates, state, params, extra_args, last=None):
    out, k = [], 0
    for j, (t, n) in enumerate(self.parts):
      s = tuple(state[k:k + 2]) if n == 2 else state[k]
      if last is not None and j == len(self.parts) - 1:
        updates, s = last(t, updates, s)
      else:
        updates, s = t.update(updates, s, params, **extra_args)
      out.extend(s if n == 2 else (s,))
      k += n
    return updates, tuple(out)

  def __call__(self, updates, state, params=None, **extra_args):
    return self._run(updates, state, params, extra_args)

  def apply(self, grads, state, params):
    """The chain, its last transformation run with ``update_and_apply``."""
    return self._run(grads, state, params, {},
                     last=lambda t, g, s: update_and_apply(t, g, s, params))


def update_and_apply(transformation, grads, state, params):
  """``(new_params, new_state)``: ``transformation.update`` then ``optax.apply_updates``, in one
  fused pass where ``transformation`` is a ``fusedopt.tx`` optimizer (or a ``tx.chain`` ending
  in one): the kernels write ``p'`` over ``p`` (in place when the caller donates the params and
  the state: ``jax.jit(step, donate_argnums=...)``) instead of writing ``p' - p`` for
  ``apply_updates`` to read back. Same state, same values as the two calls (float32: bitwise
  where ``p/2 <= p' <= 2p``, see the module docstring). Any other transformation runs the two
  calls."""
  upd = getattr(transformation, "update", None)
  if isinstance(upd, (_FusedUpdate, _ChainUpdate)):
    return upd.apply(grads, state, params)
  updates, state = transformation.update(grads, state, params)
  return optax.apply_updates(params, updates), state



def dequantized(state, params):
  """``state`` of a fused transformation with quantized fields (``state_dtype="int8"`` or
  ``jnp.float8_e4m3fn``) with every ``quantization.QuantizedArray`` decoded to float32 in its
  parameter's shape: optax's structure with float state (to inspect it, or to continue with
  ``state_dtype=jnp.float32``). Other leaves are returned as they are."""
  p_leaves, p_def = jax.tree_util.tree_flatten(params)

  def decode(tree):
    leaves, tdef = jax.tree_util.tree_flatten(tree, is_leaf=quantization.is_quantized)
    if tdef != p_def or not any(quantization.is_quantized(x) for x in leaves):
      return tree
    return jax.tree_util.tree_unflatten(tdef, [
        x.dequantize()[:np.size(p)].reshape(np.shape(p)) if quantization.is_quantized(x) else x
        for x, p in zip(leaves, p_leaves)])

  return _map_nodes(state, lambda node: node._replace(
      **{f: decode(getattr(node, f)) for f in node._fields if f not in _NESTED}))
