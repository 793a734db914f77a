"""MultiOptimizer: different optimizers for different subsets of the parameters.

Each ``(traversal, optimizer)`` pair optimizes the leaves its traversal selects; a leaf selected
twice is an error, a leaf selected by none never changes. Each sub-optimizer sees its leaves as a
tuple (as in flax 0.5.3); the step is shared.

What the state looks like: ``opt.state.param_states.per_leaf()`` is flax 0.5.3's
``param_states``, a tree mirroring the target whose leaves are the owning sub-optimizer's
per-leaf state (``None`` where no traversal selects the leaf; empty subtrees kept). In memory it
is a ``MultiState`` (one state per sub-optimizer) or, fused, a ``FusedMultiState``.

When every sub-optimizer is a built-in single-pass optimizer of the same kind (say Adam with
different learning rates for kernels and biases), the groups are *fused*: one flat state over all
selected leaves and one pass of the kernel per dtype group, with each optimizer's scalars (lr,
betas, bias corrections) entering as a per-segment table (``elementwise.per_segment``) instead of
one launch per sub-optimizer. Checkpoints keep flax 0.5.3's format either way: a tree mirroring
the target, each leaf its owner's state for it (None where no traversal selects it).
"""
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import base, elementwise, struct
from .base import OptimizerDef, OptimizerState
from .flat import FlatOptimizerDef, check_prepass_args
from .kernels import registry
from .norms import gradient_prepass
from .step import StepContext


class _Selected:
  """What ``traversal.update`` puts in place of a value it selects (see ``_assign``)."""
  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value


def _selected(traversal, params, paths):
  """Indices (tree leaf order) of the leaves of ``params`` that ``traversal`` selects; a selected
  subtree selects each of its leaves. The traversal runs over the real params, so its filter
  sees the values as in flax (``ModelParamTraversal(lambda path, value: value.ndim > 1)``)."""
  marked = traversal.update(_Selected, params)
  hits = {p for p, x in jax.tree_util.tree_flatten_with_path(
      marked, is_leaf=lambda x: isinstance(x, _Selected))[0] if isinstance(x, _Selected)}
  return tuple(i for i, p in enumerate(paths) if any(p[:k] in hits for k in range(len(p) + 1)))


def _assign(traversals, params):
  """For each traversal, the indices (tree leaf order) of the leaves it selects.

  A leaf selected by two traversals raises flax 0.5.3's ValueError, before anything looks at the
  leaves' values (an integer leaf selected twice gets this error, not a dtype error): the
  message shows the target's tree with each leaf's list of optimizer indices."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [p for p, _ in flat]
  picks = [_selected(t, params, paths) for t in traversals]
  owners = [[] for _ in paths]
  for j, idx in enumerate(picks):
    for i in idx:
      owners[i].append(j)
  if any(len(js) > 1 for js in owners):
    raise ValueError("Multiple optimizers match the same leaves : " +
                     str(treedef.unflatten(owners)))
  return picks


def _leaf_states(sub, n):
  """A sub-optimizer's state ``sub`` for its ``n`` leaves (its target is a tuple), as a list with
  one per-leaf state each: ``per_leaf()`` of flat state, per-leaf state as it is."""
  view = sub.per_leaf() if hasattr(sub, "per_leaf") else sub
  if isinstance(view, (tuple, list)) and len(view) == n:
    return list(view)
  raise TypeError(f"a sub-optimizer state of type {type(sub).__name__} has no per-leaf view")


class MultiOptimizer(OptimizerDef):
  """Applies separate optimizers to subsets of the parameters selected by traversals.

  Example::

    kernels = fusedopt.ModelParamTraversal(lambda path, _: 'kernel' in path)
    biases = fusedopt.ModelParamTraversal(lambda path, _: 'bias' in path)
    opt_def = fusedopt.MultiOptimizer((kernels, fusedopt.Momentum(0.01)),
                                      (biases, fusedopt.Momentum(0.1)))
  """

  def __init__(self, *traversals_and_optimizers: Tuple[Any, OptimizerDef], fuse: bool = True):
    """``fuse=False`` keeps one state and one update per sub-optimizer even where they could be
    fused (see the module docstring)."""
    if not traversals_and_optimizers:
      raise ValueError("MultiOptimizer needs at least one (traversal, optimizer) pair")
    traversals, sub_optimizers = zip(*traversals_and_optimizers)
    super().__init__([opt.hyper_params for opt in sub_optimizers])
    self.traversals = traversals
    self.sub_optimizers = sub_optimizers
    self.fuse = fuse

  def _fusable(self):
    """Same built-in single-pass optimizer class, backend, static variant (e.g. nesterov), master
    weights, state dtype and stochastic rounding (on/off and seed) for every sub-optimizer."""
    first = self.sub_optimizers[0]
    return (self.fuse and isinstance(first, FlatOptimizerDef)
            and first.single_pass_rule(first.hyper_params) is not None
            and all(type(o) is type(first) and o.backend == first.backend
                    and o.master_weights == first.master_weights
                    and o.state_storage == first.state_storage
                    and o.field_storage == first.field_storage
                    and o.stochastic_rounding == first.stochastic_rounding
                    and o.rounding_seed == first.rounding_seed for o in self.sub_optimizers)
            and len({o.rule(o.hyper_params).name for o in self.sub_optimizers}) == 1)

  def init_state(self, params):
    picks = _assign(self.traversals, params)   # first: a clash is reported before anything else
    if self._fusable():
      return self._init_fused(params, picks)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    subs, outer = [], []
    for idx, opt in zip(picks, self.sub_optimizers):
      st = opt.init_state(tuple(leaves[i] for i in idx)) if idx else None
      subs.append(None if st is None else st.param_states)
      outer.append({} if st is None else _outer_of(st))
    state = MultiState(tuple(subs), treedef, tuple(picks))
    if any(outer):   # a sub-optimizer with optimizer-wide state (ScheduleFreeAdamW)
      return MultiOptimizerState(jnp.asarray(0, jnp.int32), state, outer=tuple(outer))
    return OptimizerState(jnp.asarray(0, jnp.int32), state)

  def _leaves(self, params, grads, fs):
    """Param and grad leaves; checks the grads' structure and that the traversals still select
    the leaves the state was made for."""
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    g_def = jax.tree_util.tree_structure(grads)
    if g_def != treedef:
      raise ValueError(f"grads have a different tree structure than the target:\n"
                       f"  target: {treedef}\n  grads:  {g_def}")
    if tuple(_assign(self.traversals, params)) != fs.selected():
      raise ValueError("the traversals select other leaves than when the state was created")
    return p_leaves, treedef, treedef.flatten_up_to(grads)

  def apply_gradient(self, hyper_params, params, state, grads):
    fs = state.param_states
    if not isinstance(fs, (FusedMultiState, MultiState)):
      return self._apply_per_leaf(hyper_params, params, state, grads)
    if isinstance(fs, FusedMultiState):
      new_params, new_fs, _, _, outer = self._apply_fused(hyper_params, params, state, grads)
      return new_params, _advanced(state, 1, new_fs, outer)
    p_leaves, treedef, g_leaves = self._leaves(params, grads, fs)
    new_leaves = list(p_leaves)
    new_subs = []
    outer = getattr(state, "outer", None) or ({},) * len(fs.subs)
    new_outer = []
    for idx, opt, hp, sub, out in zip(fs.picks, self.sub_optimizers, hyper_params, fs.subs,
                                      outer):
      if not idx:
        new_subs.append(sub)
        new_outer.append(out)
        continue
      ps = tuple(p_leaves[i] for i in idx)
      gs = tuple(g_leaves[i] for i in idx)
      new_ps, new_sub = opt.apply_gradient(hp, ps, _sub_state(opt, state.step, sub, out), gs)
      for i, x in zip(idx, new_ps):
        new_leaves[i] = x
      new_subs.append(new_sub.param_states)
      new_outer.append(_outer_of(new_sub))
    return treedef.unflatten(new_leaves), _advanced(state, 1, fs.replace(subs=tuple(new_subs)),
                                                    tuple(new_outer))

  def _apply_per_leaf(self, hyper_params, params, state, grads):
    """flax 0.5.3's functional form: ``state.param_states`` mirrors ``params``, each selected
    leaf holding its sub-optimizer's per-leaf state and the others None; each sub-optimizer
    runs its own functional ``apply_gradient`` on its leaves (a tuple), and the new states come
    back in the same form."""
    picks = _assign(self.traversals, params)
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    g_def = jax.tree_util.tree_structure(grads)
    if g_def != treedef:
      raise ValueError(f"grads have a different tree structure than the target:\n"
                       f"  target: {treedef}\n  grads:  {g_def}")
    g_leaves = treedef.flatten_up_to(grads)
    try:
      s_leaves = treedef.flatten_up_to(state.param_states)
    except (ValueError, TypeError) as e:
      raise ValueError("state.param_states must mirror the target (each selected leaf its "
                       "sub-optimizer's per-leaf state, None elsewhere), as init_param_state "
                       f"builds it: {e}") from None
    new_p, new_s = list(p_leaves), list(s_leaves)
    for idx, opt, hp in zip(picks, self.sub_optimizers, hyper_params):
      if not idx:
        continue
      sub = OptimizerState(state.step, tuple(s_leaves[i] for i in idx))
      ps, new_sub = opt.apply_gradient(hp, tuple(p_leaves[i] for i in idx), sub,
                                       tuple(g_leaves[i] for i in idx))
      for k, i in enumerate(idx):
        new_p[i], new_s[i] = ps[k], new_sub.param_states[k]
    return treedef.unflatten(new_p), OptimizerState(state.step + 1, treedef.unflatten(new_s))

  def apply_gradient_checked(self, hyper_params, params, state, grads, grad_scale=None,
                             clip_global_norm=None):
    """``Optimizer.apply_gradient_checked`` for a fused MultiOptimizer (``create(focus=...)``
    of a built-in single-pass optimizer is one): the pre-pass, the global norm and the skip of a
    non-finite step cover the selected leaves' gradients (the others are never read)."""
    fs = state.param_states
    if not isinstance(fs, FusedMultiState):
      raise TypeError("apply_gradient_checked needs a fused MultiOptimizer (every sub-optimizer "
                      "a built-in single-pass optimizer of one kind; fuse=True); use "
                      "apply_gradient with DynamicScale.value_and_grad")
    check_prepass_args(grad_scale, clip_global_norm)
    new_params, new_fs, finite, norm, outer = self._apply_fused(
        hyper_params, params, state, grads, checked=(grad_scale, clip_global_norm))
    return (new_params, _advanced(state, finite.astype(state.step.dtype), new_fs, outer),
            finite, norm)

  def validate_for_jit(self, hyper_params):
    return all([opt.validate_for_jit(hp) for opt, hp in zip(self.sub_optimizers, hyper_params)])

  def update_hyper_params(self, **hyper_param_overrides):
    """Overrides apply to every sub-optimizer; ``hyper_params=[...]`` replaces all."""
    hps = hyper_param_overrides.pop("hyper_params", self.hyper_params)
    if not isinstance(hps, (list, tuple)) or len(hps) != len(self.sub_optimizers):
      raise TypeError(f"hyper_params={hps!r}: a MultiOptimizer's hyper-parameters are a list "
                      f"with one entry per sub-optimizer ({len(self.sub_optimizers)})")
    # each entry checked as that sub-optimizer checks its own, overrides applied to every one
    return [opt.update_hyper_params(hyper_params=hp, **hyper_param_overrides)
            for opt, hp in zip(self.sub_optimizers, hps)]

  # -- checkpoints: flax 0.5.3's layout, a tree mirroring the target whose leaves are the owning
  # sub-optimizer's state for that leaf in its checkpoint form (None where no traversal selects
  # it), each sub-optimizer converting its own
  def _parts(self, param_states):
    """(sub-optimizer, its positions in the target's leaf order, its state) for each state."""
    if isinstance(param_states, FusedMultiState):
      if param_states.flat is None:
        return []
      return [(self.sub_optimizers[0], param_states.union, param_states.flat)]
    return [(opt, idx, sub) for opt, idx, sub in zip(self.sub_optimizers, param_states.picks,
                                                     param_states.subs) if idx]

  def flax_param_states(self, target, param_states):
    leaves, treedef = jax.tree_util.tree_flatten(target)
    out = [None] * len(leaves)
    for opt, idx, sub in self._parts(param_states):
      sub_target = tuple(leaves[i] for i in idx)
      for i, st in zip(idx, opt.flax_param_states(sub_target, sub)):
        out[i] = st
    return treedef.unflatten(out)

  def from_flax_param_states(self, target, param_states, restored):
    leaves, treedef = jax.tree_util.tree_flatten(target)
    per_leaf = treedef.flatten_up_to(restored)
    new = {}
    for opt, idx, sub in self._parts(param_states):
      new[idx] = opt.from_flax_param_states(tuple(leaves[i] for i in idx), sub,
                                            tuple(per_leaf[i] for i in idx))
    if isinstance(param_states, FusedMultiState):
      return param_states if not new else param_states.replace(flat=new[param_states.union])
    return param_states.replace(subs=tuple(new[idx] if idx else sub for idx, sub in
                                           zip(param_states.picks, param_states.subs)))

  def state_for_target(self, target, state):
    """Each sub-optimizer's state brought in line with its leaves of ``target``."""
    leaves = jax.tree_util.tree_leaves(target)
    fs = state.param_states
    if isinstance(fs, FusedMultiState):
      if fs.flat is None or not self.sub_optimizers[0].master_weights:
        return state
      return state.replace(param_states=fs.replace(
          flat=fs.flat.with_master_from(tuple(leaves[i] for i in fs.union))))
    subs = []
    for idx, opt, sub in zip(fs.picks, self.sub_optimizers, fs.subs):
      if idx:
        sub = opt.state_for_target(tuple(leaves[i] for i in idx),
                                   OptimizerState(state.step, sub)).param_states
      subs.append(sub)
    return state.replace(param_states=fs.replace(subs=tuple(subs)))

  # -- fused: one flat state and one pass for all sub-optimizers
  def _init_fused(self, params, picks):
    union = tuple(sorted(i for idx in picks for i in idx))
    pos = {i: k for k, i in enumerate(union)}
    leaves, treedef = jax.tree_util.tree_flatten(params)
    flat = None
    if union:
      flat = self.sub_optimizers[0].init_state(tuple(leaves[i] for i in union)).param_states
    owner = np.zeros((len(union),), np.int32)
    for j, idx in enumerate(picks):
      owner[[pos[i] for i in idx]] = j
    step = jnp.asarray(0, jnp.int32)
    fs = FusedMultiState(flat, union, tuple(tuple(pos[i] for i in idx) for idx in picks),
                         tuple(owner.tolist()), treedef)
    # each sub-optimizer's optimizer-wide state (schedule-free's averaging scalars), if any
    outer = tuple(_outer_of(opt.initial_state(step, None)) for opt in self.sub_optimizers)
    if any(outer):
      return MultiOptimizerState(step, fs, outer=outer)
    return OptimizerState(step, fs)

  def _apply_fused(self, hyper_params, params, state, grads, checked=None):
    """One step of the fused state: ``(new params, new FusedMultiState, finite, norm)``; with
    ``checked=(grad_scale, clip_global_norm)`` the checked step (else finite and norm are
    None)."""
    fs = state.param_states
    p_leaves, treedef, g_leaves = self._leaves(params, grads, fs)
    subs = self.sub_optimizers
    for opt, hp in zip(subs, hyper_params):
      opt.validate(hp)
    outer = getattr(state, "outer", None)
    if not fs.union:   # nothing selected (an empty target, say): the step still counts
      return params, fs, (None if checked is None else jnp.asarray(True)), (
          None if checked is None else jnp.zeros((), jnp.float32)), outer
    rules = {subs[j].rule(hp).name for j, hp in enumerate(hyper_params) if fs.picks[j]}
    if len(rules) > 1:
      raise ValueError(f"fused MultiOptimizer: overrides gave the sub-optimizers different static "
                       f"variants {sorted(rules)}; create it with fuse=False")
    j0 = next(j for j in range(len(subs)) if fs.picks[j])
    rule = subs[j0].rule(hyper_params[j0])
    # each sub-optimizer's scalars from its own step context (and optimizer-wide state)
    sub_states = [_sub_state(opt, state.step, None, outer[j] if outer else {})
                  for j, opt in enumerate(subs)]
    sub_ctx = [opt.step_context(hp, st) for opt, hp, st in zip(subs, hyper_params, sub_states)]
    scal = [opt.step_scalars(hp, c) for opt, hp, c in zip(subs, hyper_params, sub_ctx)]
    owner = np.asarray(fs.owner)
    seg = {k: jnp.stack([jnp.asarray(sc[k], jnp.float32) for sc in scal])[owner]
           for k in rule.scalars}
    layout = fs.flat.layout
    ps = layout.check(tuple(p_leaves[i] for i in fs.union), "target", allow_other_float=False)
    gs = layout.check(tuple(g_leaves[i] for i in fs.union), "grads")
    # one step context: the sub-optimizers share the step and, to be fused, the rounding seed
    ctx, finite, norm = StepContext(state.step), None, None
    if checked is not None:
      kernel_prepass = registry.gradient_prepass(subs[j0].backend, layout)
      if kernel_prepass is not None:   # the backend's own pre-pass kernel (Triton)
        finite, norm, gscale = kernel_prepass(layout, gs, *checked)
      else:
        finite, norm, gscale = gradient_prepass(gs, *checked)
      ctx = ctx.replace(guard={"gscale": gscale, "ok": finite.astype(jnp.float32)})
    new_p, new_fields = subs[j0].run_rule(elementwise.per_segment(rule), {}, seg, ctx, layout,
                                          ps, gs, fs.flat.fields)
    out = list(p_leaves)
    for i, x in zip(fs.union, new_p):
      out[i] = x
    if outer:   # advanced as each sub-optimizer's own next_state does (kept on a skipped step)
      inc = 1 if finite is None else finite.astype(state.step.dtype)
      outer = tuple(_outer_of(opt.next_state(st, inc, None, c))
                    for opt, st, c in zip(subs, sub_states, sub_ctx))
    return (treedef.unflatten(out), fs.replace(flat=fs.flat.replace(fields=new_fields)), finite,
            norm, outer)


class _ReadsAsTree:
  """Reading a MultiOptimizer's state like flax 0.5.3's ``param_states`` tree:
  ``param_states['Dense_0']['kernel'].momentum`` (None outside every traversal)."""

  def __getitem__(self, key):
    return self.per_leaf()[key]

  def keys(self):
    return self.per_leaf().keys()

  def values(self):
    return self.per_leaf().values()

  def items(self):
    return self.per_leaf().items()


def _outer_of(state):
  """``{field: value}`` of a state's optimizer-wide fields (``base.outer_fields``)."""
  return {k: getattr(state, k) for k in base.outer_fields(state)}


def _sub_state(opt, step, param_states, outer):
  """A sub-optimizer's state at ``step``: flax's ``OptimizerState``, or with its optimizer-wide
  fields ``outer`` (non-empty) its own state class (``initial_state``)."""
  if outer:
    return opt.initial_state(step, param_states).replace(**outer)
  return OptimizerState(step, param_states)


def _advanced(state, inc, param_states, outer):
  """``state`` with its step advanced by ``inc``, new ``param_states`` and, for a
  ``MultiOptimizerState``, the sub-optimizers' new optimizer-wide state ``outer``."""
  new = state.replace(step=state.step + inc, param_states=param_states)
  return new.replace(outer=outer) if isinstance(state, MultiOptimizerState) else new


@struct.dataclass
class MultiOptimizerState(OptimizerState):
  """A MultiOptimizer's state when a sub-optimizer keeps optimizer-wide state
  (``ScheduleFreeAdamW``'s averaging scalars): flax's ``step`` and ``param_states``, and per
  sub-optimizer a dict of those fields (empty for the others)."""
  outer: Tuple[Any, ...] = ()


@struct.dataclass
class MultiState(_ReadsAsTree):
  """A MultiOptimizer's state, one per sub-optimizer: ``subs[j]`` is sub-optimizer j's
  ``param_states`` for its leaves (a tuple target), None where it selects none; ``picks[j]`` are
  their indices in the target's leaf order (``treedef``). ``per_leaf()`` is flax 0.5.3's view."""
  subs: Tuple[Any, ...]
  treedef: Any = struct.field(pytree_node=False)
  picks: Tuple[Tuple[int, ...], ...] = struct.field(pytree_node=False)

  def selected(self):
    return tuple(self.picks)

  def per_leaf(self):
    """flax 0.5.3's ``param_states``: a tree mirroring the target, each leaf its sub-optimizer's
    per-leaf state (None where no traversal selects it)."""
    out = [None] * self.treedef.num_leaves
    for idx, sub in zip(self.picks, self.subs):
      if idx:
        for i, st in zip(idx, _leaf_states(sub, len(idx))):
          out[i] = st
    return self.treedef.unflatten(out)


@struct.dataclass
class FusedMultiState(_ReadsAsTree):
  """A fused MultiOptimizer's state: one ``FlatState`` over the ``union`` of selected leaves
  (their indices in the target's leaf order, ``treedef``; None when there are none);
  ``picks[j]`` are sub-optimizer j's positions in the union, ``owner[k]`` the sub-optimizer of
  union position k. ``per_leaf()`` is flax 0.5.3's view."""
  flat: Any
  union: Tuple[int, ...] = struct.field(pytree_node=False)
  picks: Tuple[Tuple[int, ...], ...] = struct.field(pytree_node=False)
  owner: Tuple[int, ...] = struct.field(pytree_node=False)
  treedef: Any = struct.field(pytree_node=False)

  def selected(self):
    return tuple(tuple(self.union[k] for k in ks) for ks in self.picks)

  def per_leaf(self):
    """flax 0.5.3's ``param_states``: a tree mirroring the target, each leaf its per-leaf state
    (the view of the flat buffers; None where no traversal selects it)."""
    out = [None] * self.treedef.num_leaves
    if self.flat is not None:
      for i, st in zip(self.union, _leaf_states(self.flat, len(self.union))):
        out[i] = st
    return self.treedef.unflatten(out)


base.PROVIDED["focus"] = lambda focus, opt_def: MultiOptimizer((focus, opt_def))
