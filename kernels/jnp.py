"""The ``jnp`` backend: a rule over a group's flat buffers in ``jax.numpy``, one XLA fusion.

It runs everywhere and is the oracle every kernel is tested against. Packing the leaves into a
float32 buffer costs no copy here: XLA fuses the concatenation into the update itself (a kernel
cannot; docs/performance.md).
"""
import dataclasses

import jax.numpy as jnp

from fusedopt import elementwise, quantization
from fusedopt.kernels import common, symbolic

F32 = jnp.float32


def flat_update(rule, scalars, tables, p, g, state, unit):
  """``Backend.flat_update``: ``rule`` over flat buffers of whole ``unit``s, viewed as
  ``(n // unit, unit)``, the per-unit ``tables`` as a column; math in float32, results in the
  buffers' dtypes; per-unit sums of ``rule.sumsq``'s terms squared."""
  shape = (p.shape[0] // unit, unit)
  s = elementwise.namespace({k: jnp.asarray(scalars[k], F32) for k in rule.scalars})
  q = elementwise.namespace({k: jnp.asarray(tables[k], F32)[:, None] for k in rule.seg_scalars})
  p2 = p.astype(F32).reshape(shape)
  g2 = g.astype(F32).reshape(shape) if rule.reads_grad else jnp.zeros((), F32)
  new_p, new_state = rule.fn(elementwise.JNP, s, q, p2, g2,
                             *(x.astype(F32).reshape(shape) for x in state))
  sums = None
  if rule.sumsq is not None:
    sums = tuple(jnp.sum(t * t, axis=1)
                 for t in rule.sumsq(elementwise.JNP, s, q, p2, g2, *new_state))
  if rule.writes_state:
    new_state = tuple(n.reshape(-1).astype(x.dtype) for n, x in zip(new_state, state))
  else:
    new_state = tuple(state)
  new_p = new_p.reshape(-1).astype(p.dtype) if rule.writes_param else None
  return new_p, new_state, sums


def run_group(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
  """``Backend.run_group``: the group's params and grads packed in float32 (the packing fuses
  into the update), ``flat_update`` over them, the params split back into leaves."""
  group = layout.groups[gi]
  if group.size == 0:
    return (([p_leaves[i] for i in group.segments] if rule.writes_param else None), tuple(state),
            None if rule.sumsq is None else ())
  pf = layout.pack_group(p_leaves, gi, F32)
  gf = layout.pack_group(g_leaves, gi, F32) if rule.reads_grad else None
  tables = common.unit_tables(layout, gi, seg, rule.seg_scalars)
  new_p, new_state, sums = flat_update(rule, scalars, tables, pf, gf, tuple(state), layout.align)
  out_p = common.split_group(layout, gi, new_p) if rule.writes_param else None
  return out_p, new_state, common.unit_sums_per_leaf(layout, gi, sums)


def run_leaves(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
  """``Backend.run_leaves``: the rule on each leaf of the group with its own state leaves
  (``elementwise.apply_to_leaf``): one XLA fusion per leaf, as optax's own update, and nothing
  packed; per-leaf sums of ``rule.sumsq``'s terms squared."""
  members = layout.groups[gi].segments
  new_p, new_state, sums = [], [[] for _ in state], []
  for j, i in enumerate(members):
    q = {k: jnp.asarray(seg[k], F32)[i] for k in rule.seg_scalars}
    st = tuple(s[j] for s in state)
    g = g_leaves[i] if rule.reads_grad else jnp.zeros((), F32)
    p1, st1 = elementwise.apply_to_leaf(rule, scalars, q, p_leaves[i], g, st)
    new_p.append(p1)
    for k, x in enumerate(st1 if rule.writes_state else st):
      new_state[k].append(x)
    if rule.sumsq is not None:
      sums.append(elementwise.leaf_sumsq(rule, scalars, q, p_leaves[i], g, st1))
  if rule.sumsq is not None:
    sums = tuple(jnp.stack([s[t] for s in sums]) for t in range(len(sums[0])))
  else:
    sums = None
  return (new_p if rule.writes_param else None), tuple(tuple(x) for x in new_state), sums


# ----------------------------------------------------------------------------- quantized state

def unit_sums(rule, scalars, tables, p, g, state, unit):
  """Per-unit sums of ``rule.sumsq``'s terms squared over flat buffers, evaluated on the given
  (float) state: for state stored otherwise than the rule computed it (quantized), the norms of
  what a later stage reads."""
  shape = (p.shape[0] // unit, unit)
  s = elementwise.namespace({k: jnp.asarray(scalars[k], F32) for k in rule.scalars})
  q = elementwise.namespace({k: jnp.asarray(tables[k], F32)[:, None] for k in rule.seg_scalars})
  g2 = g.astype(F32).reshape(shape) if rule.reads_grad else jnp.zeros((), F32)
  terms = rule.sumsq(elementwise.JNP, s, q, p.astype(F32).reshape(shape), g2,
                     *(x.astype(F32).reshape(shape) for x in state))
  return tuple(jnp.sum(t * t, axis=1) for t in terms)


def _decoded(state):
  return tuple(x.dequantize() if quantization.is_quantized(x) else x for x in state)


def _stored(rule, scalars, new, old):
  """The new state as stored: each quantized field's new values encoded block by block, except
  a field the rule passes through (``symbolic.passed_through``) and a skipped checked step
  (``ok`` = 0), which keep codes and scales bitwise -- encoding decoded values again could move
  a code."""
  out = []
  for x, was, same in zip(new, old, symbolic.passed_through(rule)):
    if quantization.is_quantized(was):
      x = was if same else quantization.quantize_like(x, was)
      if "ok" in rule.scalars and not same:
        x = quantization.kept(x, was, scalars["ok"])
    out.append(x)
  return tuple(out)


def flat_update_quantized(rule, scalars, tables, p, g, state, unit):
  """``flat_update`` where a state field may be a ``quantization.QuantizedArray``: decoded to
  float32, the rule, encoded again (``_stored``), in one XLA computation. Per-tensor sums
  (LAMB's ||u||) are taken over the state as stored, which is what the next stage reads."""
  no_sums = rule if rule.sumsq is None else dataclasses.replace(rule, sumsq=None)
  new_p, new_dense, _ = flat_update(no_sums, scalars, tables, p, g, _decoded(state), unit)
  out = _stored(rule, scalars, new_dense, state)
  sums = None
  if rule.sumsq is not None:
    sums = unit_sums(rule, scalars, tables, p, g, _decoded(out), unit)
  return new_p, out, sums


def run_quantized(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
  """``Backend.run_quantized``: ``flat_update_quantized`` over the group's params and grads
  packed in float32, as ``run_group`` packs them."""
  pf = layout.pack_group(p_leaves, gi, F32)
  gf = layout.pack_group(g_leaves, gi, F32) if rule.reads_grad else None
  tables = common.unit_tables(layout, gi, seg, rule.seg_scalars)
  new_p, out, sums = flat_update_quantized(rule, scalars, tables, pf, gf, tuple(state),
                                           layout.align)
  out_p = common.split_group(layout, gi, new_p) if rule.writes_param else None
  return out_p, out, common.unit_sums_per_leaf(layout, gi, sums)


BACKENDS = {"jnp": common.Backend("jnp", run_group, flat_update, kernel=False,
                                  run_leaves=run_leaves, run_quantized=run_quantized)}
