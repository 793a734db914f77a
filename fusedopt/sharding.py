"""Optimizer state sharded over a mesh axis (ZeRO-1 / ZeRO-2 style), and FSDP-style flat params.

``shard_optimizer(opt_def, mesh, axis_name)`` wraps a built-in optimizer so that every flat state
buffer (``FlatState.fields[name][g]``) is a ``jax.Array`` with ``NamedSharding(mesh, P(axis))``:
each of the ``n`` devices on the axis holds ``1/n`` of every buffer. The layout is built with
``FlatLayout.build(params, shards=n)``: every dtype group is zero-padded to a multiple of
``n * align`` elements, so each device's slice is whole alignment units (a kernel block never
straddles a shard boundary) and the per-unit segment-id table splits into ``n`` equal tables.

The update runs per shard under ``shard_map`` (a Pallas or FFI call is not partitioned by XLA):

- each device gets its slice of the packed params and grads: ``params="replicated"`` (ZeRO-1)
  builds just its slice from the replicated leaves (a ``lax.switch`` on ``lax.axis_index`` over
  static slices of the leaves overlapping each shard: no full-size pack per device, which
  ``dynamic_slice`` of the full pack costs on XLA:CPU);
  ``params="sharded"`` (FSDP) keeps the params themselves as flat sharded buffers
  (``FlatParams``), so the slice *is* the input and nothing is packed or gathered;
- elementwise rules run the backend's ``run_group`` over the local slice as a one-leaf group
  (``native`` on CPU, ``pallas`` on GPU/TPU for ``auto``, ``jnp``); rules with per-tensor scalars
  or per-tensor sums (LAMB, LARS) run the backend's ``flat_update`` with per-unit tables (``jnp``,
  Pallas, Triton; ``registry.select_flat``);
- per-tensor sums of squares (LAMB's ||p||, ||u||; LARS's ||p||, ||g||) are per-unit partial sums
  -> per-segment vector of this shard -> one ``psum`` of the small ``[terms, num_leaves]`` vector;
  the ``apply_gradient_checked`` pre-pass likewise (local sum of squares and finite flag -> psum);
- ZeRO-1: the new param slice is ``all_gather``-ed (params only; the state never leaves its
  device) and unpacked into replicated leaves. FSDP: params stay sharded, no collective but the
  small psums.

Grads: in ``opt.apply_gradient(grads)`` (the global, jit-level view) the grads are whatever the
user computed (a data-parallel jit already all-reduced them); inside the user's own ``shard_map``
over the same axis, ``apply_gradient_local(opt, grads, reduce="mean")`` takes each device's
*unreduced* grads and reduce-scatters them (``psum_scatter``: each device receives only the reduced
slice it updates -- ZeRO-2's communication pattern, half of an all-reduce's traffic).

Adafactor keeps per-leaf factored state (row/column statistics, O(rows + cols) per matrix): its
state is replicated, not sharded. Other optimizers without flat state (MultiOptimizer, WeightNorm,
user subclasses) are rejected.

Checkpoints: ``Optimizer.state_dict()`` gathers the sharded buffers to per-leaf arrays (flax's
layout-free format); ``restore_state`` / ``serialization.from_bytes`` put the restored buffers back
with the template's sharding. ``restore_state(opt, state_dict)`` here also re-shards explicitly.
"""
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from . import norms, quantization, struct
from .base import Optimizer, OptimizerDef, join_static, outer_fields, split_static
from .exact_float import ExactFloat
from .step import StepContext
from .flat import FlatOptimizerDef, FlatState, check_prepass_args
from .flat_state import place_like, put
from .kernels import common, jnp as jnp_kernels, registry
from .layout import FlatLayout, LayoutError

F32 = jnp.float32
MODES = ("replicated", "sharded")


# ----------------------------------------------------------------------------- flat params (FSDP)

@struct.dataclass
class FlatParams:
  """Parameters kept as flat buffers, one per dtype group of ``layout`` (FSDP mode).

  ``buffers[g]`` is group ``g``'s flat buffer (sharded over the mesh axis in FSDP mode). The model
  sees the tree through ``tree()`` (under ``jit``, XLA all-gathers what the forward pass reads;
  the gradient of that gather is a reduce-scatter, so ``jax.grad`` w.r.t. a ``FlatParams`` gives
  sharded flat gradients), ``leaf(i)``, or ``gather(axis_name)`` inside a ``shard_map``.
  Checkpoints write the tree (``as_flax_tree``), so they are layout- and sharding-free.
  """
  buffers: Any
  layout: FlatLayout = struct.field(pytree_node=False)

  @classmethod
  def pack(cls, tree, layout: Optional[FlatLayout] = None):
    layout = FlatLayout.build(tree) if layout is None else layout
    return cls(tuple(layout.pack(tree)), layout)

  def tree(self):
    """The parameter tree (views of the flat buffers)."""
    return self.layout.unpack(self.buffers)

  def leaf(self, i):
    return self.layout.view(self.buffers, i)

  def gather(self, axis_name):
    """Inside ``shard_map`` (buffers local slices): all-gathers and returns the tree."""
    full = tuple(lax.all_gather(b, axis_name, tiled=True) for b in self.buffers)
    return self.layout.unpack(full)

  # checkpoints (fusedopt.serialization): the tree, as flax wrote the target
  def as_flax_tree(self):
    return self.tree()

  def from_flax_tree(self, tree):
    new = tuple(self.layout.pack(tree))
    return self.replace(buffers=tuple(place_like(b, old) for b, old in zip(new, self.buffers)))


def _tree_of(target):
  return target.tree() if isinstance(target, FlatParams) else target


# ----------------------------------------------------------------------------- the wrapper

def shard_optimizer(optimizer_def, mesh, axis_name, *, params="replicated"):
  """``optimizer_def`` with its flat state sharded over ``mesh`` axis ``axis_name``.

  Args:
    optimizer_def: a built-in optimizer (``Adam(...)`` etc.; Adafactor: replicated state).
    mesh: a ``jax.sharding.Mesh``.
    axis_name: the mesh axis the state (and, with ``params="sharded"``, the params) is split over.
      Other mesh axes see the state replicated.
    params: ``"replicated"`` (ZeRO-1: the target is the usual tree, replicated; each device updates
      its slice and the new params are all-gathered) or ``"sharded"`` (FSDP: the target is a
      ``FlatParams`` whose buffers are sharded like the state; grads are ``FlatParams`` too).
  Returns:
    a ``ShardedOptimizerDef``: ``.create(params)`` gives an ``Optimizer`` as usual.
  """
  return ShardedOptimizerDef(optimizer_def, mesh, axis_name, params=params)


class ShardedOptimizerDef(OptimizerDef):
  """A built-in optimizer whose flat state is sharded over a mesh axis (see the module doc)."""

  def __init__(self, inner, mesh, axis_name, *, params="replicated"):
    if isinstance(inner, ShardedOptimizerDef):
      raise TypeError("the optimizer is already sharded")
    if params not in MODES:
      raise ValueError(f"params={params!r}; expected one of {MODES}")
    self.flat = isinstance(inner, FlatOptimizerDef)
    from .adafactor import Adafactor  # pylint: disable=import-outside-toplevel
    if not self.flat and not isinstance(inner, Adafactor):
      raise TypeError(
          f"{type(inner).__name__} has no flat state to shard; shard_optimizer takes the built-in "
          "flat optimizers (and Adafactor, whose small factored state is replicated)")
    if not self.flat and params == "sharded":
      raise TypeError("params='sharded' needs a flat optimizer (Adafactor's state is per leaf)")
    if axis_name not in mesh.shape:
      raise ValueError(f"mesh has no axis {axis_name!r} (axes: {tuple(mesh.shape)})")
    super().__init__(inner.hyper_params)
    self.inner = inner
    self.mesh = mesh
    self.axis_name = axis_name
    self.mode = params
    self.n = int(mesh.shape[axis_name])

  def __repr__(self):
    return (f"ShardedOptimizerDef({type(self.inner).__name__}, axis={self.axis_name!r} "
            f"x{self.n}, params={self.mode!r})")

  # -- shardings
  @property
  def state_sharding(self):
    """Sharding of every flat state buffer: ``NamedSharding(mesh, P(axis))``."""
    return NamedSharding(self.mesh, P(self.axis_name))

  @property
  def replicated(self):
    return NamedSharding(self.mesh, P())

  # -- delegated flax API
  def update_hyper_params(self, **overrides):
    return self.inner.update_hyper_params(**overrides)

  def validate_for_jit(self, hyper_params):
    return self.inner.validate_for_jit(hyper_params)

  def init_param_state(self, param):
    return self.inner.init_param_state(param)

  def state_for_target(self, target, state):
    """With master weights, the sharded master re-read from ``target`` (``Optimizer.replace``):
    a replicated tree, or ``FlatParams`` (FSDP) whose buffers are the master's layout."""
    if not (self.flat and self.inner.master_weights):
      return state
    st = state.param_states
    if isinstance(target, FlatParams):
      master = tuple(place_like(b.astype(F32), old)
                     for b, old in zip(_as_flat(target, st.layout, "target").buffers,
                                       st.fields["master"]))
      return state.replace(param_states=st.replace(fields=dict(st.fields, master=master)))
    return state.replace(param_states=st.with_master_from(target))

  def apply_param_gradient(self, step, hyper_params, param, state, grad):
    return self.inner.apply_param_gradient(step, hyper_params, param, state, grad)

  # -- checkpoints: the inner optimizer's (flax's per-leaf) format; FSDP targets as their tree
  def flax_param_states(self, target, param_states):
    return self.inner.flax_param_states(_tree_of(target), param_states)

  def from_flax_param_states(self, target, param_states, restored):
    return self.inner.from_flax_param_states(_tree_of(target), param_states, restored)

  def state_dict(self, target, state):
    return self.inner.state_dict(_tree_of(target), state)

  def restore_state(self, opt_target, opt_state, state_dict):
    target, state = self.inner.restore_state(_tree_of(opt_target), opt_state, state_dict)
    if isinstance(opt_target, FlatParams):
      target = opt_target.from_flax_tree(target)
    return target, state

  # -- creation
  def create(self, target, focus=None):
    if focus:
      raise TypeError("focus= is not supported with sharded state (MultiOptimizer has no "
                      "sharded driver); pass the sub-tree to optimize")
    if isinstance(target, FlatParams):
      target = target.tree()
    state = self.init_state(target)
    if self.mode == "sharded":
      layout = state.param_states.layout
      bufs = _on_mesh(lambda t: tuple(layout.pack(t)), self.state_sharding)(target)
      target = FlatParams(bufs, layout)
    else:
      # a fresh replicated copy (a device_put may alias the caller's buffer on its device, and
      # train steps donate the optimizer)
      target = _on_mesh(lambda t: jax.tree_util.tree_map(jnp.copy, t), self.replicated)(target)
    return Optimizer(self, state, target)

  def init_state(self, params):
    if not self.flat:   # Adafactor: replicated per-leaf state
      state = self.inner.init_state(params)
      return jax.tree_util.tree_map(lambda x: put(x, self.replicated), state)
    inner = self.inner
    layout = inner.build_layout(params, shards=self.n)
    fields = _on_mesh(lambda p: inner.initial_fields(layout, p), self.state_sharding)(params)
    step = put(jnp.asarray(0, jnp.int32), self.replicated)
    state = inner.initial_state(step, FlatState(fields, layout, self.inner.state_class))
    # optimizer-wide fields (schedule-free's scalars): replicated, as the step
    return state.replace(**{k: put(getattr(state, k), self.replicated)
                            for k in outer_fields(state)})

  # -- the step (global view: called under jit, or eagerly through Optimizer.apply_gradient)
  def apply_gradient(self, hyper_params, params, state, grads):
    if not self.flat:
      return self.inner.apply_gradient(hyper_params, params, state, grads)
    new_p, new_state, _, _ = self._global_step(hyper_params, params, state, grads, None)
    return new_p, new_state

  def apply_gradient_checked(self, hyper_params, params, state, grads, grad_scale=None,
                             clip_global_norm=None):
    if not self.flat:
      raise TypeError("apply_gradient_checked needs the flat state of a built-in optimizer")
    return self._global_step(hyper_params, params, state, grads,
                             (grad_scale, clip_global_norm))

  def _global_step(self, hp, params, state, grads, checked):
    self._check_state(state)
    self.inner.validate(hp)
    if checked is not None:
      check_prepass_args(*checked)
    layout = state.param_states.layout
    names = tuple(state.param_states.fields)
    fields = tuple(state.param_states.fields[k] for k in names)
    hp_static, hp_dyn = _split_static(hp)
    chk_static, chk_dyn = _split_static(checked, exact=False)
    ax, rep = P(self.axis_name), P()
    if self.mode == "sharded":
      params = _as_flat(params, layout, "target")
      p_arg, p_spec = params.buffers, ax
      if isinstance(grads, FlatParams):
        g_arg, g_spec, g_form = _as_flat(grads, layout, "grads").buffers, ax, "flat"
      else:   # a tree of leaves: packed and sliced per device
        g_arg, g_spec, g_form = layout.check(grads, "grads"), rep, "leaves"
    else:
      p_arg, p_spec = layout.check(params, "target", allow_other_float=False), rep
      g_arg, g_spec, g_form = layout.check(grads, "grads"), rep, "leaves"

    # optimizer-wide values of this step (schedule-free's), from the replicated state
    outer = self.inner.step_context(hp, state).outer or {}

    def body(step, hp_dyn, chk_dyn, outer, p_arg, g_arg, fields):
      hp = join_static(hp_static, hp_dyn)
      chk = join_static(chk_static, chk_dyn)
      return self._local_step(hp, step, p_arg, g_arg, dict(zip(names, fields)), layout,
                              g_form=g_form, reduce=None, checked=chk, outer=outer)

    out_p_spec = ax if self.mode == "sharded" else rep
    out_specs = (out_p_spec, {k: ax for k in names}, rep, rep)
    fn = jax.shard_map(body, mesh=self.mesh,
                       in_specs=(rep, rep, rep, rep, p_spec, g_spec, ax),
                       out_specs=out_specs, check_vma=False)
    new_p, new_fields, finite, norm = fn(state.step, hp_dyn, chk_dyn, outer, p_arg, g_arg,
                                         fields)
    if self.mode == "sharded":
      new_params = params.replace(buffers=tuple(new_p))
    else:
      new_params = jax.tree_util.tree_unflatten(layout.treedef, new_p)
    inc = 1 if checked is None else finite.astype(state.step.dtype)
    new_state = self.inner.next_state(state, inc, state.param_states.replace(fields=new_fields),
                                      StepContext(state.step, outer=outer or None))
    if checked is None:
      return new_params, new_state, None, None
    return new_params, new_state, finite, norm

  def _g_dtype(self, hp, ctx, gi, g_leaves):
    """The dtype this device's grad slice of group ``gi`` is packed in (see ``_local_step``)."""
    rule = self.inner.wrap_rule(self.inner.rule(hp))
    quantized = ctx.layout.groups[gi].block > 0   # a group of quantized state
    if _group_backend(self.inner.backend, ctx, gi, rule, quantized).name == "jnp":
      return F32
    return _grad_dtype(ctx.layout, gi, g_leaves)

  def _check_state(self, state):
    ps = state.param_states
    if not isinstance(ps, FlatState) or ps.layout.shards != self.n:
      raise TypeError("the state was not created by this ShardedOptimizerDef (expected a "
                      f"FlatState whose layout has shards={self.n}); use .create(params)")

  # -- the per-device program (inside shard_map over self.axis_name)
  def _local_step(self, hp, step, p_arg, g_arg, fields, layout, *, g_form, reduce, checked,
                  outer=None):
    """Returns (new params: leaves [ZeRO-1] or local flat slices [FSDP], new local fields,
    finite, norm)."""
    ax, n = self.axis_name, self.n
    idx = lax.axis_index(ax)
    groups = range(len(layout.groups))
    ctx = _ShardContext(layout, ax, idx)
    if self.mode == "sharded":
      p_loc = list(p_arg)
    else:
      p_loc = [_local_pack(layout, gi, p_arg, idx) for gi in groups]
    if g_form == "flat":
      g_loc = list(g_arg)
    elif reduce is None:   # replicated (reduced) grads: take this device's slice
      # For a group the jnp backend runs, the grads are converted to float32 *before* the
      # slice, exactly as the single-device jnp path packs them: XLA:CPU then emits the same
      # code (FMA contraction included) and the results are bitwise equal. Kernels read the
      # grads' own dtype (bf16: half the bytes).
      g_loc = [_local_pack(layout, gi, g_arg, idx, self._g_dtype(hp, ctx, gi, g_arg))
               for gi in groups]
    else:                  # each device's own grads: reduce-scatter, each keeps its slice
      g_loc = []
      for gi in groups:
        full = layout.pack_group(g_arg, gi, _grad_dtype(layout, gi, g_arg))
        part = lax.psum_scatter(full, ax, scatter_dimension=0, tiled=True)
        g_loc.append(part / n if reduce == "mean" else part)
    finite = norm = guard = None
    if checked is not None:
      finite, norm, gscale = norms.gradient_prepass(g_loc, *checked,
                                                    reduce=lambda t: lax.psum(t, ax))
      guard = {"gscale": gscale, "ok": finite.astype(F32)}
    # the optimizer's own update_leaves, on this device's slices (one "leaf" per group): groups
    # run by _run_group_sharded, per-tensor sums and norms combined across the shards
    step_ctx = StepContext(step, guard=guard, outer=outer or None,
                           run_group=functools.partial(_run_group_sharded, ctx),
                           reduce_sums=ctx.psum_terms,
                           leaf_norms=functools.partial(_leaf_norms_sharded, ctx))
    new_p, new_fields = self.inner.update_leaves(hp, step_ctx, layout, p_loc, g_loc, fields)
    new_p = list(new_p)
    if self.mode == "replicated":   # ZeRO-1: all-gather the new params, unpack to leaves
      full = [lax.all_gather(x, ax, tiled=True) for x in new_p]
      leaves = list(p_arg)
      for gi, group in enumerate(layout.groups):
        if group.size:
          for i, x in zip(group.segments, common.split_group(layout, gi, full[gi])):
            leaves[i] = x
      new_p = leaves
    if finite is None:
      finite, norm = jnp.asarray(True), jnp.zeros((), F32)
    return new_p, new_fields, finite, norm


def _grad_dtype(layout, gi, g_leaves):
  return jnp.result_type(*[g_leaves[i] for i in layout.groups[gi].segments])


def _local_pack(layout, gi, leaves, idx, dtype=None):
  """This device's slice of group ``gi``'s packed buffer, built from the (replicated) leaves
  without packing the whole buffer: a ``lax.switch`` on the shard index whose branch ``k``
  concatenates static slices of just the leaves overlapping shard ``k`` (over all branches, each
  leaf is cut at most at the shard boundaries it crosses, so the program stays about one pack's
  size). ``dynamic_slice`` of the full pack would be shorter to write, but XLA:CPU materialises
  the full-size concatenation on every device first (measured: an f32[65536] pack for an
  f32[8192] slice at 8 shards)."""
  group = layout.groups[gi]
  dtype = group.dtype if dtype is None else dtype
  size, n = layout.shard_size(gi), layout.shards
  mine = [leaves[i] for i in group.segments]
  if size == 0:
    return jnp.zeros((0,), dtype)

  def branch(k):
    lo, hi = k * size, (k + 1) * size

    def build(xs):
      parts, pos = [], lo
      for i, x in zip(group.segments, xs):
        seg = layout.segments[i]
        a, b = max(seg.offset, lo), min(seg.offset + seg.size, hi)
        if a >= b:
          continue
        if a > pos:
          parts.append(jnp.zeros((a - pos,), dtype))
        flat = jnp.ravel(jnp.asarray(x)).astype(dtype)
        parts.append(lax.slice(flat, (a - seg.offset,), (b - seg.offset,)))
        pos = b
      if hi > pos:
        parts.append(jnp.zeros((hi - pos,), dtype))
      return jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    return build

  if n == 1:
    return branch(0)(mine)
  return lax.switch(idx, [branch(k) for k in range(n)], mine)




def _as_flat(x, layout, what):
  if isinstance(x, FlatParams):
    if x.layout != layout:
      raise LayoutError(f"{what} is a FlatParams of another layout ({x.layout}) than the state "
                        f"({layout})")
    return x
  raise TypeError(f"{what}: params='sharded' keeps the params as FlatParams (opt.target); "
                  f"got {type(x).__name__}")


def _on_mesh(fn, sharding):
  """``fn`` run so that its array outputs are created with ``sharding`` (no full copy on one
  device first)."""
  def run(*args):
    if not sharding.is_fully_addressable:   # multi-process: inputs as global replicated arrays
      rep = NamedSharding(sharding.mesh, P())
      args = jax.tree_util.tree_map(lambda x: put(jnp.asarray(x), rep), args)
    out = jax.eval_shape(fn, *args)
    return jax.jit(fn, out_shardings=jax.tree_util.tree_map(lambda _: sharding, out))(*args)
  return run


def _split_static(tree, exact=True):
  """``base.split_static`` with the runtime values as shard_map inputs: arrays (hyper-parameter
  floats as ``ExactFloat`` when ``exact``, else float32 arrays)."""
  static_part, dynamic = split_static(tree, exact)
  return static_part, [x if isinstance(x, ExactFloat) else jnp.asarray(x) for x in dynamic]


# ----------------------------------------------------------------------------- per-shard execution

class _ShardContext:
  """What the per-device program knows: the global layout, the axis, this device's index."""

  def __init__(self, layout, axis_name, idx):
    self.layout, self.axis_name, self.idx = layout, axis_name, idx
    self._local = {}
    self._ids = {}

  def local(self, gi):
    """The executors' view of this shard of group ``gi``: a layout of one leaf, the local slice
    (one layout per group: two groups may share a dtype, e.g. quantized and small tensors). A
    quantized group's slice is whole blocks (whole tiles of them), so its one-leaf layout has
    the group's block: a kernel running rows of one block takes it at any alignment
    (``registry.select_quantized``)."""
    if gi not in self._local:
      grp = self.layout.groups[gi]
      self._local[gi] = FlatLayout.build(
          (jax.ShapeDtypeStruct((self.layout.shard_size(gi),), grp.dtype),),
          align=self.layout.align, quantize=(0, grp.block) if grp.block else None,
          tile_blocks=1)
    return self._local[gi]

  def ids(self, gi):
    """int32 [local units]: the segment (leaf) index of each alignment unit of this shard."""
    if gi not in self._ids:
      table = jnp.asarray(self.layout.block_segment_ids(gi))
      units = self.layout.shard_size(gi) // self.layout.align
      self._ids[gi] = lax.dynamic_slice_in_dim(table, self.idx * units, units)
    return self._ids[gi]

  def per_segment(self, gi, unit_sums):
    """Per-unit partial sums of group ``gi`` -> [num_leaves] vector of this shard (sorted ids)."""
    return [jax.ops.segment_sum(u, self.ids(gi), num_segments=len(self.layout.segments),
                                indices_are_sorted=True) for u in unit_sums]

  def psum_terms(self, terms):
    """One psum of the small [T, num_leaves] stack."""
    if not terms:
      return terms
    return tuple(lax.psum(jnp.stack(terms), self.axis_name))


def _group_backend(name, ctx, gi, rule, quantized=False):
  """The backend that runs ``rule`` over this device's slice of group ``gi``: rules with
  per-tensor scalars or sums on per-unit tables (``registry.select_flat``: a shard's units belong
  to tensors known only at run time; with quantized state the jnp path's), the others as the
  one-leaf group of the local layout (``quantized``: ``registry.select_quantized``)."""
  if rule.seg_scalars or rule.sumsq is not None:
    if quantized:
      return registry.get("jnp")
    return registry.select_flat(name, ctx.layout.groups[gi].dtype, ctx.layout.align)
  if quantized:
    return registry.select_quantized(name, ctx.local(gi), 0, rule)
  return registry.select(name, ctx.local(gi), 0, rule)


def _run_group_sharded(ctx, opt_def, rule, scalars, seg, layout, gi, p_loc, g_loc, state):
  """``StepContext.run_group`` on this device's slices: ``p_loc``/``g_loc`` hold one local flat
  slice per group; ``seg`` the global [num_leaves] per-tensor scalars. Returns the group's new
  slice (at index ``gi``), its new state and this shard's per-tensor partial sums
  (``reduce_sums`` adds them up). Quantized state is sliced with its blocks: a shard holds whole
  blocks (``FlatLayout.build(..., shards=, quantize=)``), its codes and their scales."""
  quantized = any(quantization.is_quantized(x) for x in state)
  backend = _group_backend(opt_def.backend, ctx, gi, rule, quantized)
  if rule.seg_scalars or rule.sumsq is not None:
    tables = {k: jnp.asarray(seg[k], F32)[ctx.ids(gi)] for k in rule.seg_scalars}
    update = jnp_kernels.flat_update_quantized if quantized else backend.flat_update
    out_p, out_state, unit_sums = update(rule, scalars, tables, p_loc[gi], g_loc[gi],
                                         tuple(state), layout.align)
  else:
    out = registry.differentiable(backend, quantized=quantized)(
        rule, scalars, {}, ctx.local(gi), 0, [p_loc[gi]], [g_loc[gi]], state)
    out_p = None if out[0] is None else out[0][0]
    out_state, unit_sums = out[1], None
  part = None if unit_sums is None else ctx.per_segment(gi, unit_sums)
  return (None if out_p is None else [(gi, out_p)]), tuple(out_state), part


def _leaf_norms_sharded(ctx, layout, *loc_lists):
  """``StepContext.leaf_norms`` on this device's slices: per-tensor L2 norms of each list of
  local slices from per-unit partial sums of squares (both of ``norms.sum_squares``'s, so that a
  tensor whose plain sum overflows still gets its finite norm, as on one device), every list in
  one psum."""
  n = len(layout.segments)
  sums = [jnp.zeros((n,), F32) for _ in range(2 * len(loc_lists))]
  for gi, group in enumerate(layout.groups):
    if group.size == 0:
      continue
    units = layout.shard_size(gi) // layout.align
    rows = [norms.sum_squares(loc[gi].reshape(units, layout.align), axis=1) for loc in loc_lists]
    parts = ctx.per_segment(gi, [s for pair in rows for s in pair])
    sums = [a + b for a, b in zip(sums, parts)]
  sums = ctx.psum_terms(sums)
  return tuple(norms.norm_from_sums(sums[2 * k], sums[2 * k + 1]) for k in range(len(loc_lists)))


# ----------------------------------------------------------------------------- user-facing helpers

def partition_specs(opt: Optimizer):
  """A tree of ``PartitionSpec`` matching ``opt`` (for ``shard_map`` in_specs/out_specs and
  ``jit`` shardings): flat state buffers ``P(axis)``, step ``P()``, target ``P()`` (ZeRO-1) or
  ``P(axis)`` (FSDP ``FlatParams`` buffers)."""
  d = _sharded_def(opt)
  ax, rep = P(d.axis_name), P()
  if not d.flat:
    return jax.tree_util.tree_map(lambda _: rep, opt)
  ps = opt.state.param_states
  # step and optimizer-wide fields replicated, the flat buffers split
  # (a quantized buffer: its codes and scales both split)
  state = jax.tree_util.tree_map(lambda _: rep, opt.state).replace(
      param_states=ps.replace(fields=jax.tree_util.tree_map(lambda _: ax, ps.fields)))
  if d.mode == "sharded":
    target = opt.target.replace(buffers=tuple(ax for _ in opt.target.buffers))
  else:
    target = jax.tree_util.tree_map(lambda _: rep, opt.target)
  return opt.replace(state=state, target=target)


def shardings(opt: Optimizer):
  """``partition_specs(opt)`` as ``NamedSharding``s (for ``jax.jit(in_shardings=...)``)."""
  d = _sharded_def(opt)
  return jax.tree_util.tree_map(lambda s: NamedSharding(d.mesh, s), partition_specs(opt),
                                is_leaf=lambda x: isinstance(x, P))


def _sharded_def(opt):
  d = opt.optimizer_def
  if not isinstance(d, ShardedOptimizerDef):
    raise TypeError("expected an Optimizer created by shard_optimizer(...).create(params)")
  return d


def apply_gradient_local(opt: Optimizer, grads, *, reduce: Optional[str] = "mean",
                         grad_scale=None, clip_global_norm=None, **hyper_param_overrides):
  """One step from *inside* a ``shard_map`` over the optimizer's axis, with ``opt`` passed in with
  ``partition_specs(opt)`` (its state buffers are then this device's slices).

  Args:
    grads: this device's gradients: a tree like the params (ZeRO-1), or for FSDP a tree or a
      ``FlatParams`` of local slices (then already reduced; ``reduce`` must be None).
    reduce: ``"mean"``/``"sum"``: ``grads`` are this device's unreduced gradients; they are
      reduce-scattered (``psum_scatter``) so each device receives only its reduced slice.
      ``None``: ``grads`` are already reduced (replicated).
    grad_scale, clip_global_norm: as ``Optimizer.apply_gradient_checked``; with either given the
      result is ``(new_opt, finite, global_norm)``.
  Returns:
    the new ``Optimizer`` (local view; ZeRO-1 target leaves replicated, all-gathered).
  """
  d = _sharded_def(opt)
  if not d.flat:
    raise TypeError("apply_gradient_local needs a flat optimizer")
  if reduce not in (None, "mean", "sum"):
    raise ValueError(f"reduce={reduce!r}; expected 'mean', 'sum' or None")
  hp = d.update_hyper_params(**hyper_param_overrides)
  d.inner.validate(hp)
  d._check_state(opt.state)  # pylint: disable=protected-access
  checked = None
  if grad_scale is not None or clip_global_norm is not None:
    check_prepass_args(grad_scale, clip_global_norm)
    checked = (grad_scale, clip_global_norm)
  layout = opt.state.param_states.layout
  if d.mode == "sharded":
    p_arg = _as_flat(opt.target, layout, "target").buffers
  else:
    p_arg = layout.check(opt.target, "target", allow_other_float=False)
  if isinstance(grads, FlatParams):
    if reduce is not None:
      raise ValueError("FlatParams grads are local slices: already reduced (reduce=None)")
    g_arg, g_form = _as_flat(grads, layout, "grads").buffers, "flat"
  else:
    g_arg, g_form = layout.check(grads, "grads"), "leaves"
  outer = d.inner.step_context(hp, opt.state).outer
  new_p, new_fields, finite, norm = d._local_step(  # pylint: disable=protected-access
      hp, opt.state.step, p_arg, g_arg, dict(opt.state.param_states.fields), layout,
      g_form=g_form, reduce=reduce, checked=checked, outer=outer)
  if d.mode == "sharded":
    target = opt.target.replace(buffers=tuple(new_p))
  else:
    target = jax.tree_util.tree_unflatten(layout.treedef, new_p)
  inc = 1 if checked is None else finite.astype(opt.state.step.dtype)
  state = d.inner.next_state(opt.state, inc, opt.state.param_states.replace(fields=new_fields),
                             StepContext(opt.state.step, outer=outer))
  new = opt.replace(target=target, state=state)
  return new if checked is None else (new, finite, norm)


def restore_state(opt: Optimizer, state_dict):
  """``opt.restore_state(state_dict)`` with every array put back with ``opt``'s shardings
  (state ``P(axis)``, target as created), whatever the checkpoint's origin."""
  new = opt.restore_state(state_dict)
  if not isinstance(opt.optimizer_def, ShardedOptimizerDef):
    return new
  return jax.tree_util.tree_map(put, new, shardings(opt))


def state_fraction(opt: Optimizer):
  """For each flat state buffer, ``(name, group, addressable shard sizes, global size)``: a quick
  check that each device holds ``1/n`` of the state (MaxText once shipped a "ZeRO-1" that
  replicated everything). A quantized buffer reports its codes and its scales, as ``name`` and
  ``name + ".scales"``."""
  out = []
  for k, bufs in opt.state.param_states.fields.items():
    for g, b in enumerate(bufs):
      parts = ([(k, b.codes), (k + ".scales", b.scales)] if quantization.is_quantized(b)
               else [(k, b)])
      out += [(name, g, [s.data.size for s in x.addressable_shards], x.size)
              for name, x in parts]
  return out


__all__ = ["FlatParams", "ShardedOptimizerDef", "apply_gradient_local", "partition_specs",
           "restore_state", "shard_optimizer", "shardings", "state_fraction"]
