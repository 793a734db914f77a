"""Per-element optimizer math, written once, run by every backend.

An optimizer's update is a ``Rule``: a Python function of float32 *values*

    fn(xp, s, seg, p, g, *state) -> (new_p or None, (new_state, ...))

where ``s`` holds the step's global scalars (learning rate, betas, bias corrections — computed in
float32 by the optimizer, entering every backend as runtime values so schedules never recompile),
``seg`` holds per-segment (per-tensor) scalars such as LAMB/LARS trust ratios, and ``xp`` supplies
``sqrt``. It uses only arithmetic operators and ``xp.sqrt``, so the same function is traced by
jax.numpy (the ``jnp`` backend and the per-leaf path), by Pallas/Triton kernels, and symbolically
into C++ by the ``native`` CPU backend (``fusedopt.kernels.native``).

This module holds the rule type and the ``jnp`` backend: the test oracle for every kernel.
"""
import dataclasses
import types
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Rule:
  """An optimizer's per-element update (see the module docstring).

  Attributes:
    name: identifies the rule (and its static variant, e.g. ``momentum_nesterov``).
    fn: ``fn(xp, s, seg, p, g, *state) -> (new_p | None, tuple_of_new_state)``.
    scalars: names of the global scalars ``fn`` reads from ``s``.
    seg_scalars: names of the per-segment scalars ``fn`` reads from ``seg``.
    n_state: number of flat state buffers the rule reads and writes.
    writes_param: False for a pre-pass that only updates state (LAMB's moment stage).
  """
  name: str
  fn: Callable
  scalars: Tuple[str, ...]
  n_state: int
  seg_scalars: Tuple[str, ...] = ()
  writes_param: bool = True


def namespace(values: Dict[str, object]):
  return types.SimpleNamespace(**values)


def apply_to_leaf(rule: Rule, scalars, seg, p, g, state):
  """The per-leaf path: ``rule`` on one leaf (any shape), math in float32, results cast back."""
  s = namespace({k: jnp.asarray(scalars[k], F32) for k in rule.scalars})
  q = namespace({k: jnp.asarray(seg[k], F32) for k in rule.seg_scalars})
  new_p, new_state = rule.fn(jnp, s, q, p.astype(F32), g.astype(F32),
                             *(x.astype(F32) for x in state))
  new_p = p if new_p is None else new_p.astype(p.dtype)
  return new_p, tuple(n.astype(x.dtype) for n, x in zip(new_state, state))


def run_jnp(rule: Rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
  """The ``jnp`` backend: ``rule`` over group ``gi``'s flat buffers in one XLA fusion.

  Args:
    scalars: name -> float32 scalar.
    seg: name -> float32 [num_leaves] (indexed by leaf, all groups).
    p_leaves, g_leaves: all leaves of params and grads (tree leaf order).
    state: the group's flat state buffers, one per state field.
  Returns:
    (new param leaves of the group in group order, or None), tuple of new state buffers.
  """
  group = layout.groups[gi]
  if group.size == 0:
    return ([p_leaves[i] for i in group.segments] if rule.writes_param else None), tuple(state)
  pf = layout.pack_group(p_leaves, gi, F32)
  gf = layout.pack_group(g_leaves, gi, F32)
  shape = (group.size // layout.align, layout.align)
  if rule.seg_scalars:
    ids = layout.block_segment_ids(gi)
    q = {k: jnp.asarray(seg[k], F32)[ids][:, None] for k in rule.seg_scalars}
  else:
    q = {}
  s = namespace({k: jnp.asarray(scalars[k], F32) for k in rule.scalars})
  new_p, new_state = rule.fn(jnp, s, namespace(q), pf.reshape(shape), gf.reshape(shape),
                             *(x.astype(F32).reshape(shape) for x in state))
  new_state = tuple(n.reshape(-1).astype(x.dtype) for n, x in zip(new_state, state))
  if not rule.writes_param:
    return None, new_state
  new_p = new_p.reshape(-1)
  out = []
  for i in group.segments:
    seg_ = layout.segments[i]
    leaf = jax.lax.slice(new_p, (seg_.offset,), (seg_.offset + seg_.size,))
    out.append(leaf.reshape(seg_.shape).astype(group.dtype))
  return out, new_state
