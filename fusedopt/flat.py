"""The generic driver: built-in optimizers on flat state, one fused update per dtype group.

A ``FlatOptimizerDef`` keeps its state as ``FlatState``: for each state field (``grad_ema``, ...)
one buffer per dtype group of the parameters' ``FlatLayout``. Its ``apply_gradient`` computes the
step's scalars once (float32, as runtime values), then runs the optimizer's ``Rule`` over each
group with the selected backend. The same rule serves ``apply_param_gradient`` (the per-leaf path
that flax's API exposes), so there is one copy of every optimizer's math.
"""
import os
import numbers
import warnings
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import elementwise
from .exact_float import ExactFloat
from .base import HyperParamError, OptimizerDef, OptimizerState
from .flat_state import FlatState, _place_like  # noqa: F401  (re-exported)
from .layout import FlatLayout
from .norms import gradient_prepass, prepass_result  # noqa: F401  (re-exported)
from .step import StepContext

F32 = jnp.float32
BACKENDS = ("auto", "jnp", "native", "pallas", "pallas_interpret", "triton", "triton_interpret")


# ----------------------------------------------------------------------------- backends

def _native():
  from .kernels import native  # pylint: disable=import-outside-toplevel
  return native


def _pallas():
  from .kernels import pallas  # pylint: disable=import-outside-toplevel
  return pallas


def _triton():
  # fusedopt.kernels.triton imports triton / jax-triton lazily: importing it never needs them
  from .kernels import triton  # pylint: disable=import-outside-toplevel
  return triton


def available_backends():
  """The backends that can run here, besides "auto" (``pallas_interpret`` always can)."""
  out = ["jnp"]
  try:
    if jax.default_backend() == "cpu" and _native().available():
      out.append("native")
  except ImportError:
    pass
  if _pallas().available():
    out.append("pallas")
  out.append("pallas_interpret")
  if _triton().available():
    out.append("triton")
  if os.environ.get("TRITON_INTERPRET") == "1" and _triton().interpreting():
    out.append("triton_interpret")
  return out


def _warn_once(msg):  # Python's default filter shows it once per call site
  warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _executor(backend, layout, gi, rule):
  """The function that runs ``rule`` over group ``gi``: ``run(rule, scalars, seg, layout, gi, ...)``.

  An explicit kernel backend that cannot run here raises; one without a kernel for the group's
  dtype warns and runs that group on jnp (never wrong numbers). ``auto`` picks by measurement:
  see ``_auto``.
  """
  dtype = layout.groups[gi].dtype
  if backend == "jnp":
    return elementwise.run_jnp
  if backend in ("pallas", "pallas_interpret", "triton", "triton_interpret"):
    unit = _pallas().ALIGN if backend.startswith("pallas") else _triton().ALIGN
    if layout.align % unit:
      # a tree of many small leaves whose layout was given a smaller unit (layout.choose_align)
      _warn_once(f"backend={backend!r} runs whole {unit}-element units; this tree's layout is "
                 f"aligned to {layout.align} elements (padding every leaf to {unit} would cost "
                 "over 1% more memory), so it runs on the jnp backend")
      return elementwise.run_jnp
  if backend == "pallas_interpret":
    return _pallas().run_interpret
  if backend in ("triton", "triton_interpret"):
    return _triton_executor(backend, dtype)
  if backend == "pallas":
    if not _pallas().available():
      raise RuntimeError(
          f"backend='pallas' needs a GPU or TPU (jax's default backend is "
          f"{jax.default_backend()!r}); use backend='pallas_interpret' to run the Pallas kernels "
          "in interpret mode on CPU (slow: for verification), or 'auto'")
    if not _pallas().supports(dtype):
      _warn_once(f"backend='pallas' has no {np.dtype(dtype).name} kernel; that dtype group runs "
                 "on the jnp backend")
      return elementwise.run_jnp
    return _pallas().run
  if backend == "native":
    native = _native()
    if not native.available():
      raise RuntimeError("backend='native' needs a C++ compiler and jaxlib's FFI headers; "
                         "use backend='jnp' or 'auto'")
    if not native.supports(dtype):
      _warn_once(f"backend='native' has no {np.dtype(dtype).name} kernel yet; that dtype group "
                 "runs on the jnp backend")
      return elementwise.run_jnp
    return native.run
  return _auto(layout, gi, rule)


def _sequential_vmap(fn):
  """``fn`` whose ``jax.vmap`` runs it once per batch element (``lax.map``): for kernels without
  a batching rule (jax-triton's ``triton_call`` raises under vmap)."""
  fn = jax.custom_batching.custom_vmap(fn)

  @fn.def_vmap
  def rule(axis_size, in_batched, *args):
    leaves, treedef = jax.tree_util.tree_flatten(args)
    flags = jax.tree_util.tree_leaves(list(in_batched))   # same leaf order as ``args``
    leaves = [x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))
              for x, b in zip(leaves, flags)]
    out = jax.lax.map(lambda xs: fn(*jax.tree_util.tree_unflatten(treedef, xs)), leaves)
    return out, jax.tree_util.tree_map(lambda _: True, out)

  return fn


def _with_jnp_derivatives(run):
  """``run`` (a kernel backend's group executor) whose derivatives are the jnp backend's.

  Kernels (FFI calls, Pallas, Triton) have no JVP rule; the jnp backend runs the same rule in
  ``jax.numpy``, so under ``jax.jvp``/``jax.grad`` (meta-learning: derivatives with respect to
  hyper-parameters or inputs) the step's value comes from the kernel and its tangent from the jnp
  path. ``jax.vmap`` batches the kernel itself (each backend's batching rule; one call per batch
  element for an executor marked ``sequential_vmap``, the Triton kernels)."""
  if run is elementwise.run_jnp:
    return run
  mode = getattr(run, "fused_sumsq", False)
  sequential = getattr(run, "sequential_vmap", False)

  def wrapped(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
    def kernel(scalars, seg, p_leaves, g_leaves, state):
      return run(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state)
    if sequential:
      kernel = _sequential_vmap(kernel)

    @jax.custom_jvp
    def step(scalars, seg, p_leaves, g_leaves, state):
      return kernel(scalars, seg, p_leaves, g_leaves, state)

    def reference(scalars, seg, p_leaves, g_leaves, state):
      new_p, new_state, sums = elementwise.run_jnp(rule, scalars, seg, layout, gi, p_leaves,
                                                   g_leaves, state)
      if sums is not None and mode == "per_leaf":
        sums = elementwise.unit_sums_per_leaf(layout, gi, sums)
      return new_p, new_state, sums

    @step.defjvp
    def step_jvp(primals, tangents):
      _, t_out = jax.jvp(reference, primals, tangents)
      return step(*primals), t_out

    return step(dict(scalars), dict(seg), list(p_leaves), list(g_leaves), tuple(state))

  wrapped.fused_sumsq = mode
  return wrapped


def _triton_executor(backend, dtype):
  triton = _triton()
  if backend == "triton_interpret":
    if not triton.interpreting():
      raise RuntimeError("backend='triton_interpret' runs the Triton kernels in Triton's "
                         "interpreter: set TRITON_INTERPRET=1 before triton is first imported "
                         "(slow: for verification); or use backend='auto'")
    run = triton.run_interpret
  elif not triton.available():
    raise RuntimeError(f"backend='triton' cannot run here: {triton.unavailable_reason()}; "
                       "use backend='auto' (or 'jnp')")
  else:
    run = triton.run
  if not triton.supports(dtype):
    _warn_once(f"backend={backend!r} has no {np.dtype(dtype).name} kernel; that dtype group runs "
               "on the jnp backend")
    return elementwise.run_jnp
  return run


def _auto(layout, gi, rule):
  """``backend="auto"``, from the benchmarks in bench/results:

  - CPU: the native kernels (float32, bfloat16, float16; when a C++ compiler is there), else jnp.
  - GPU/TPU: the Pallas kernel when the group's flat buffer costs no copy (one leaf whose size
    is a multiple of the alignment: the buffer *is* the leaf), or when the rule's norms are fused
    into the kernel (LAMB). Otherwise the jnp path: XLA fuses the concatenation of the leaves
    into the update itself, which a kernel cannot (H100 numbers: docs/performance.md).
  """
  group = layout.groups[gi]
  if _pallas().available():
    if not _pallas().supports(group.dtype) or layout.align % _pallas().ALIGN:
      return elementwise.run_jnp
    one_leaf = (len(group.segments) == 1
                and layout.segments[group.segments[0]].size == group.size)
    return _pallas().run if (one_leaf or rule.sumsq is not None) else elementwise.run_jnp
  if jax.default_backend() == "cpu":
    try:
      if _native().available() and _native().supports(group.dtype):
        return _native().run
    except ImportError:
      pass
  return elementwise.run_jnp


# ----------------------------------------------------------------------------- checks

def _concrete(x):
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
    v = _concrete(x)
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
  v = _concrete(x)
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
    sd = np.dtype(F32 if state_dtype is None else jax.dtypes.canonicalize_dtype(state_dtype))
    if not jnp.issubdtype(sd, jnp.floating):
      raise ValueError(f"state_dtype={sd} must be a floating-point dtype")
    self.state_storage = sd
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
    per_leaf = param_states.per_leaf() if isinstance(param_states, FlatState) else param_states
    return self.fields_in_order(target, per_leaf, self.all_state_fields)

  def from_flax_param_states(self, target, param_states, restored):
    if isinstance(param_states, FlatState):
      return param_states.restored_from(restored)
    return restored

  def state_for_target(self, target, state):
    """With master weights, the master copy re-read from ``target`` (float32): edits to the
    params made through ``Optimizer.replace(target=...)`` win over the stored master."""
    if not self.master_weights or not isinstance(state.param_states, FlatState):
      return state
    return state.replace(param_states=state.param_states.with_master_from(target))

  # -- per-leaf (flax) API, on the same rule
  def init_param_state(self, param):
    state = {k: jnp.zeros(jnp.shape(param), self.state_storage) for k in self.state_fields}
    if self.master_weights:
      state["master"] = jnp.asarray(param, F32)
    return state

  def apply_param_gradient(self, step, hyper_params, param, state, grad):
    self.validate(hyper_params)
    seg = self.leaf_seg_scalars(hyper_params, step, param, state, grad)
    rule, scalars = self._leaf_rounding(self.wrap_rule(self.rule(hyper_params)),
                                        self.scalars(hyper_params, step), step, param)
    new_p, new_state = elementwise.apply_to_leaf(
        rule, scalars, seg, param, grad, tuple(state[k] for k in self.all_state_fields))
    return new_p, dict(zip(self.all_state_fields, new_state))

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
    layout = FlatLayout.build(params)
    self._rounding_scalars(layout, 0)   # rejects float16 params with rounding
    # float32 by default whatever the param dtype (flax used the param dtype: bf16 moments)
    fields = {k: layout.zeros(self.state_storage) for k in self.state_fields}
    if self.master_weights:
      leaves = jax.tree_util.tree_leaves(params)
      fields["master"] = tuple(layout.pack_group(leaves, g, F32) for g in range(len(layout.groups)))
    return OptimizerState(jnp.asarray(0, jnp.int32), FlatState(fields, layout))

  def apply_gradient(self, hyper_params, params, state, grads):
    if not isinstance(state.param_states, FlatState):
      return super().apply_gradient(hyper_params, params, state, grads)
    self.validate(hyper_params)
    layout = state.param_states.layout
    p_leaves = layout.check(params, "target", allow_other_float=False)
    g_leaves = layout.check(grads, "grads")
    new_p, new_fields = self.update_leaves(hyper_params, StepContext(state.step), layout,
                                           p_leaves, g_leaves, state.param_states.fields)
    new_params = jax.tree_util.tree_unflatten(layout.treedef, new_p)
    return new_params, OptimizerState(state.step + 1, FlatState(new_fields, layout))

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
    if self.backend in ("triton", "triton_interpret"):   # the pre-pass as a Triton kernel
      _triton_executor(self.backend, F32)   # raises where the backend cannot run
      finite, norm, gscale = _triton().gradient_prepass(
          layout, g_leaves, grad_scale, clip_global_norm,
          platform="interpret" if self.backend == "triton_interpret" else None)
    else:
      finite, norm, gscale = gradient_prepass(g_leaves, grad_scale, clip_global_norm)
    ctx = StepContext(state.step, guard={"gscale": gscale, "ok": finite.astype(F32)})
    new_p, new_fields = self.update_leaves(hyper_params, ctx, layout, p_leaves, g_leaves,
                                           state.param_states.fields)
    new_params = jax.tree_util.tree_unflatten(layout.treedef, new_p)
    new_state = OptimizerState(state.step + finite.astype(state.step.dtype),
                               FlatState(new_fields, layout))
    return new_params, new_state, finite, norm

  def update_leaves(self, hp, ctx: StepContext, layout, p_leaves, g_leaves, fields):
    """One step over all groups: returns (new param leaves, new fields). Multi-stage optimizers
    (LAMB, LARS) override it, running their rules with ``run_rule``/``run_rule_sumsq`` and
    per-tensor norms from ``ctx.leaf_norms``, so that the sharded driver runs them unchanged."""
    return self.run_rule(self.rule(hp), self.scalars(hp, ctx.step), {}, ctx, layout, p_leaves,
                         g_leaves, fields)

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
    run = ctx.run_group or run_group
    names = self.all_state_fields
    n = len(layout.segments)
    new_p = list(p_leaves)
    new_fields = {k: list(v) for k, v in fields.items()}
    sums = None
    for gi, group in enumerate(layout.groups):
      if group.size == 0:   # only size-0 leaves: nothing to update, their sums are 0
        continue
      grule = self.group_rule(rule, group.dtype, rounding, ctx)
      out_p, out_state, part = run(self, grule, scalars, seg, layout, gi, p_leaves, g_leaves,
                                   tuple(fields[k][gi] for k in names))
      for i, x in out_p or ():
        new_p[i] = x
      for k, buf in zip(names, out_state):
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


def run_group(opt_def, rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
  """``StepContext.run_group`` on this device: ``rule`` over group ``gi`` with ``opt_def``'s
  backend (``_executor``; derivatives from the jnp path). Returns the new params as
  ``(leaf index, value)`` pairs (None for a rule that writes none), the new state, and the
  per-tensor sums as float32 [num_leaves] vectors whatever form the executor returns them in."""
  run = _with_jnp_derivatives(_executor(opt_def.backend, layout, gi, rule))
  out_p, out_state, raw = run(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state)
  group = layout.groups[gi]
  if out_p is not None:
    out_p = list(zip(group.segments, out_p))
  if rule.sumsq is None:
    return out_p, out_state, None
  n = len(layout.segments)
  mode = getattr(run, "fused_sumsq", False)
  if mode == "per_leaf":                    # already per leaf, in group order
    idx = np.asarray(group.segments)
    part = [jnp.zeros((n,), F32).at[idx].set(u) for u in raw]
  elif mode:                                # per-unit partial sums -> per leaf
    ids = jnp.asarray(layout.block_segment_ids(gi))
    # ids are sorted (segments lie in buffer order): on GPU the sorted scatter avoids
    # serialising atomics on one address (docs/performance.md)
    part = [jax.ops.segment_sum(u, ids, num_segments=n, indices_are_sorted=True) for u in raw]
  else:                                     # evaluated per leaf from the new state
    idx = np.asarray(group.segments)
    per = [elementwise.leaf_sumsq(
        rule, scalars, seg, p_leaves[i], g_leaves[i],
        tuple(_segment_view(buf, layout.segments[i]) for buf in out_state))
           for i in group.segments]
    part = [jnp.zeros((n,), F32).at[idx].set(jnp.stack([x[t] for x in per]))
            for t in range(len(per[0]))]
  return out_p, out_state, part


def _segment_view(buf, seg):
  return jax.lax.slice(buf, (seg.offset,), (seg.offset + seg.size,)).reshape(seg.shape)


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
