"""MultiOptimizer: different optimizers for different subsets of the parameters.

Each ``(traversal, optimizer)`` pair optimizes the leaves its traversal selects; a leaf selected
twice is an error, a leaf selected by none never changes. Each sub-optimizer sees its leaves as a
tuple (as in flax 0.5.3); the step is shared.

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
from .base import OptimizerDef, OptimizerState, ordered_fields
from .flat import FlatOptimizerDef, FlatState
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
  """For each traversal, the indices (tree leaf order) of the leaves it selects."""
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  picks = [_selected(t, params, paths) for t in traversals]
  owners = {}
  for j, idx in enumerate(picks):
    for i in idx:
      owners.setdefault(i, []).append(j)
  clash = sorted((i, js) for i, js in owners.items() if len(js) > 1)
  if clash:
    detail = ", ".join(f"{jax.tree_util.keystr(paths[i])} <- optimizers {js}" for i, js in clash)
    raise ValueError(f"Multiple optimizers match the same leaves : {detail}")
  return picks


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
                    and o.stochastic_rounding == first.stochastic_rounding
                    and o.rounding_seed == first.rounding_seed for o in self.sub_optimizers)
            and len({o.rule(o.hyper_params).name for o in self.sub_optimizers}) == 1)

  def init_state(self, params):
    if self._fusable():
      return self._init_fused(params)
    leaves = jax.tree_util.tree_leaves(params)
    subs = []
    for idx, opt in zip(_assign(self.traversals, params), self.sub_optimizers):
      subs.append(opt.init_state(tuple(leaves[i] for i in idx)).param_states if idx else None)
    return OptimizerState(jax.numpy.asarray(0, jax.numpy.int32), tuple(subs))

  def apply_gradient(self, hyper_params, params, state, grads):
    if isinstance(state.param_states, FusedMultiState):
      return self._apply_fused(hyper_params, params, state, grads)
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    g_def = jax.tree_util.tree_structure(grads)
    if g_def != treedef:
      raise ValueError(f"grads have a different tree structure than the target:\n"
                       f"  target: {treedef}\n  grads:  {g_def}")
    g_leaves = treedef.flatten_up_to(grads)
    new_leaves = list(p_leaves)
    new_subs = []
    for idx, opt, hp, sub in zip(_assign(self.traversals, params), self.sub_optimizers,
                                 hyper_params, state.param_states):
      if not idx:
        new_subs.append(sub)
        continue
      ps = tuple(p_leaves[i] for i in idx)
      gs = tuple(g_leaves[i] for i in idx)
      new_ps, new_sub = opt.apply_gradient(hp, ps, OptimizerState(state.step, sub), gs)
      for i, x in zip(idx, new_ps):
        new_leaves[i] = x
      new_subs.append(new_sub.param_states)
    return treedef.unflatten(new_leaves), OptimizerState(state.step + 1, tuple(new_subs))

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
  # sub-optimizer's state for that leaf (None where no traversal selects it)
  def flax_param_states(self, target, param_states):
    leaves, treedef = jax.tree_util.tree_flatten(target)
    out = [None] * len(leaves)
    if isinstance(param_states, FusedMultiState):
      if param_states.flat is not None:
        order = self.sub_optimizers[0].all_state_fields
        for i, st in zip(param_states.union, param_states.flat.per_leaf()):
          out[i] = ordered_fields(st, order)
      return treedef.unflatten(out)
    for idx, opt, sub in zip(_assign(self.traversals, target), self.sub_optimizers,
                             param_states):
      if idx:
        sub_target = tuple(leaves[i] for i in idx)
        for i, st in zip(idx, opt.flax_param_states(sub_target, sub)):
          out[i] = st
    return treedef.unflatten(out)

  def from_flax_param_states(self, target, param_states, restored):
    leaves, treedef = jax.tree_util.tree_flatten(target)
    per_leaf = treedef.flatten_up_to(restored)
    if isinstance(param_states, FusedMultiState):
      if param_states.flat is None:
        return param_states
      return param_states.replace(flat=param_states.flat.restored_from(
          tuple(per_leaf[i] for i in param_states.union)))
    subs = []
    for idx, opt, sub in zip(_assign(self.traversals, target), self.sub_optimizers,
                             param_states):
      subs.append(opt.from_flax_param_states(tuple(leaves[i] for i in idx), sub,
                                             tuple(per_leaf[i] for i in idx)) if idx else sub)
    return tuple(subs)

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
    for idx, opt, sub in zip(_assign(self.traversals, target), self.sub_optimizers, fs):
      if idx:
        sub = opt.state_for_target(tuple(leaves[i] for i in idx),
                                   OptimizerState(state.step, sub)).param_states
      subs.append(sub)
    return state.replace(param_states=tuple(subs))

  # -- fused: one flat state and one pass for all sub-optimizers
  def _init_fused(self, params):
    picks = _assign(self.traversals, params)
    union = tuple(sorted(i for idx in picks for i in idx))
    pos = {i: k for k, i in enumerate(union)}
    leaves = jax.tree_util.tree_leaves(params)
    flat = None
    if union:
      flat = self.sub_optimizers[0].init_state(tuple(leaves[i] for i in union)).param_states
    owner = np.zeros((len(union),), np.int32)
    for j, idx in enumerate(picks):
      owner[[pos[i] for i in idx]] = j
    return OptimizerState(jnp.asarray(0, jnp.int32),
                          FusedMultiState(flat, union, tuple(tuple(pos[i] for i in idx)
                                                        for idx in picks), tuple(owner.tolist())))

  def _apply_fused(self, hyper_params, params, state, grads):
    fs = state.param_states
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    g_def = jax.tree_util.tree_structure(grads)
    if g_def != treedef:
      raise ValueError(f"grads have a different tree structure than the target:\n"
                       f"  target: {treedef}\n  grads:  {g_def}")
    if tuple(_assign(self.traversals, params)) != tuple(tuple(fs.union[k] for k in ks)
                                                  for ks in fs.picks):
      raise ValueError("the traversals select other leaves than when the state was created")
    if not fs.union:
      return params, OptimizerState(state.step + 1, fs)
    g_leaves = treedef.flatten_up_to(grads)
    subs = self.sub_optimizers
    rules = {subs[j].rule(hp).name for j, hp in enumerate(hyper_params) if fs.picks[j]}
    if len(rules) > 1:
      raise ValueError(f"fused MultiOptimizer: overrides gave the sub-optimizers different static "
                       f"variants {sorted(rules)}; create it with fuse=False")
    for opt, hp in zip(subs, hyper_params):
      opt.validate(hp)
    j0 = next(j for j in range(len(subs)) if fs.picks[j])
    rule = subs[j0].rule(hyper_params[j0])
    scal = [subs[j].scalars(hp, state.step) for j, hp in enumerate(hyper_params)]
    owner = np.asarray(fs.owner)
    seg = {k: jnp.stack([jnp.asarray(sc[k], jnp.float32) for sc in scal])[owner]
           for k in rule.scalars}
    layout = fs.flat.layout
    ps = layout.check(tuple(p_leaves[i] for i in fs.union), "target", allow_other_float=False)
    gs = layout.check(tuple(g_leaves[i] for i in fs.union), "grads")
    # one step context: the sub-optimizers share the step and, to be fused, the rounding seed
    new_p, new_fields = subs[j0].run_rule(elementwise.per_segment(rule), {}, seg,
                                          StepContext(state.step), layout, ps, gs, fs.flat.fields)
    out = list(p_leaves)
    for i, x in zip(fs.union, new_p):
      out[i] = x
    return (treedef.unflatten(out),
            OptimizerState(state.step + 1, fs.replace(flat=FlatState(new_fields, layout))))


@struct.dataclass
class FusedMultiState:
  """A fused MultiOptimizer's state: one ``FlatState`` over the ``union`` of selected leaves
  (their indices in the target's leaf order); ``picks[j]`` are sub-optimizer j's positions in
  the union, ``owner[k]`` the sub-optimizer of union position k."""
  flat: Any
  union: Tuple[int, ...] = struct.field(pytree_node=False)
  picks: Tuple[Tuple[int, ...], ...] = struct.field(pytree_node=False)
  owner: Tuple[int, ...] = struct.field(pytree_node=False)


base.PROVIDED["focus"] = lambda focus, opt_def: MultiOptimizer((focus, opt_def))
