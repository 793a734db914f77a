"""MultiOptimizer: different optimizers for different subsets of the parameters.

Each ``(traversal, optimizer)`` pair optimizes the leaves its traversal selects; a leaf selected
twice is an error, a leaf selected by none never changes. Each sub-optimizer sees its leaves as a
tuple (as in flax 0.5.3) and keeps its own (flat) state; the step is shared.
"""
from typing import Any, Tuple

import jax

from .base import OptimizerDef, OptimizerState, _replace_checked


class _Marker:
  """A leaf placeholder that records which traversals select it."""

  def __init__(self, index):
    self.index = index
    self.owners = []


def _assign(traversals, params):
  """For each traversal, the indices (tree leaf order) of the leaves it selects."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  markers = treedef.unflatten([_Marker(i) for i in range(len(leaves))])
  picks = []
  for j, traversal in enumerate(traversals):
    found = [m for m in traversal.iterate(markers) if isinstance(m, _Marker)]
    for m in found:
      m.owners.append(j)
    picks.append(tuple(m.index for m in found))
  clash = [(i, m.owners) for i, m in enumerate(jax.tree_util.tree_leaves(markers))
           if len(m.owners) > 1] if leaves else []
  if clash:
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    detail = ", ".join(f"{paths[i]} <- optimizers {owners}" for i, owners in clash)
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

  def __init__(self, *traversals_and_optimizers: Tuple[Any, OptimizerDef]):
    if not traversals_and_optimizers:
      raise ValueError("MultiOptimizer needs at least one (traversal, optimizer) pair")
    traversals, sub_optimizers = zip(*traversals_and_optimizers)
    super().__init__([opt.hyper_params for opt in sub_optimizers])
    self.traversals = traversals
    self.sub_optimizers = sub_optimizers

  def init_state(self, params):
    leaves = jax.tree_util.tree_leaves(params)
    subs = []
    for idx, opt in zip(_assign(self.traversals, params), self.sub_optimizers):
      subs.append(opt.init_state(tuple(leaves[i] for i in idx)).param_states if idx else None)
    return OptimizerState(jax.numpy.asarray(0, jax.numpy.int32), tuple(subs))

  def apply_gradient(self, hyper_params, params, state, grads):
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

  def update_hyper_params(self, **hyper_param_overrides):
    """Overrides apply to every sub-optimizer; ``hyper_params=[...]`` replaces all."""
    hps = hyper_param_overrides.pop("hyper_params", self.hyper_params)
    if len(hps) != len(self.sub_optimizers):
      raise ValueError(f"hyper_params has {len(hps)} entries for {len(self.sub_optimizers)} "
                       "sub-optimizers")
    if hyper_param_overrides:
      hps = [_replace_checked(hp, hyper_param_overrides) for hp in hps]
    return hps
