"""The flat layout: a parameter pytree as a few contiguous 1-D buffers, one per dtype.

Every leaf is a *segment* of its dtype group's buffer. Segments start at multiples of ``align``
elements and are zero-padded up to the next multiple, so that a kernel block of ``align`` (or a
divisor of it) never straddles two tensors: per-tensor norms (LAMB, LARS) reduce whole blocks,
and the padding (always zero in params, grads and moments) contributes nothing. ``align`` is
1024 unless that would pad a tree of many small leaves by more than 1% (``choose_align``);
kernels that need whole 1024-element units then leave such a layout to the jnp path.

A layout is built once per (tree structure, shapes, dtypes) — at trace time — and cached. It is
static (hashable), so it can sit in a pytree's aux data: jit sees the same layout as the same
treedef and never retraces for it.

``shards=n`` (for state sharded over n devices, ``fusedopt.sharding``) additionally zero-pads the
end of every group's buffer to a multiple of ``n * align`` elements, so that each of the n equal
slices of a buffer is whole alignment units: a shard boundary never splits a unit, and the
per-unit segment-id table splits into n equal tables. ``shards=1`` (the default) adds nothing.
"""
import dataclasses
import functools
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_ALIGN = 1024
# A layout's alignment is the largest power of two <= DEFAULT_ALIGN whose zero padding stays within
# 1% of the parameters plus PAD_ALLOWANCE elements, so that the state never costs much more than
# the parameters (3000 scalar leaves padded to 1024 would take 1024x their memory). Real models
# keep 1024 (GPT-2 124M: 0.02% padding); trees of many small leaves get a smaller unit.
PAD_ALLOWANCE = 65536
# A quantized group holds a whole number of this many blocks (on each shard): the Pallas TPU
# kernel views the scales as rows of 128 lanes, a bitcast of their tiled 1-D buffer (any other
# view is a relayout copy of every operand: kernels/pallas.py, ``_View``). At most 127 blocks of
# zeros per group and shard (32512 elements at the default block of 256).
QUANTIZED_TILE_BLOCKS = 128


class LayoutError(ValueError):
  """A tree does not match the layout it is used with (structure, shape or dtype)."""


@dataclasses.dataclass(frozen=True)
class Segment:
  """One leaf of the tree: where it lives in its group's flat buffer."""
  index: int          # position in the tree's leaf order
  path: str           # jax.tree_util.keystr of the leaf, for error messages
  shape: Tuple[int, ...]
  group: int          # index into FlatLayout.groups
  offset: int         # element offset in the group buffer (a multiple of align)
  size: int           # number of elements (offset + padded_size is the next segment)



@dataclasses.dataclass(frozen=True)
class Group:
  """All leaves of one dtype: one contiguous buffer of ``size`` elements."""
  dtype: np.dtype
  size: int
  segments: Tuple[int, ...]   # Segment indices, in buffer order
  # > 0: the group's leaves hold quantized state (``build(..., quantize=...)``), in blocks of
  # this many elements: its segments start on multiples of both (``FlatLayout.unit``)
  block: int = 0


def _round_up(n, m):
  return -(-n // m) * m


def _check_leaf(path, x, complex_ok=False):
  dtype = np.dtype(jnp.result_type(x))
  if complex_ok and jnp.issubdtype(dtype, jnp.complexfloating):
    return dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise LayoutError(
        f"leaf {path} has dtype {dtype}; fusedopt optimizes floating-point leaves only "
        "(integer and boolean leaves are rejected rather than silently skipped: keep them "
        "out of the optimized tree, e.g. with `focus=` or MultiOptimizer)")
  return dtype


@dataclasses.dataclass(frozen=True, eq=False)
class FlatLayout:
  """Where every leaf of a pytree lives in per-dtype flat buffers.

  Attributes:
    treedef: the tree structure.
    segments: one ``Segment`` per leaf, in leaf order.
    groups: one ``Group`` per distinct dtype, in order of first appearance.
    align: segment alignment in elements.
    shards: every group's size is a multiple of ``shards * align`` (trailing zero padding).
  """
  treedef: Any
  segments: Tuple[Segment, ...]
  groups: Tuple[Group, ...]
  align: int
  shards: int = 1
  # a quantized group's size is a multiple of this many blocks per shard (``build``; 1 in a
  # layout without quantized groups)
  tile_blocks: int = 1

  # Layouts are interned by `build`, so identity is equality; hashing the key keeps jit caches
  # working even for layouts built in different places.
  @property
  def _key(self):
    return (self.treedef, tuple((s.shape, self.groups[s.group].dtype, self.groups[s.group].block)
                                for s in self.segments), self.align, self.shards,
            self.tile_blocks)

  def __eq__(self, other):
    return isinstance(other, FlatLayout) and self._key == other._key

  def __hash__(self):
    return hash(self._key)

  def __repr__(self):
    groups = ", ".join(f"{g.dtype.name}[{g.size}]" + (f"/q{g.block}" if g.block else "")
                       for g in self.groups)
    shards = f"; shards={self.shards}" if self.shards != 1 else ""
    return f"FlatLayout({len(self.segments)} leaves; {groups}; align={self.align}{shards})"

  # ---------------------------------------------------------------- construction

  @staticmethod
  def build(tree, align: Optional[int] = None, shards: int = 1,
            complex_ok: bool = False, quantize: Optional[Tuple[int, int]] = None,
            tile_blocks: int = QUANTIZED_TILE_BLOCKS) -> "FlatLayout":
    """The layout of ``tree`` (arrays or ShapeDtypeStructs). Cached per structure/shapes/dtypes.

    ``align``: the alignment unit in elements; by default (None) ``choose_align``'s, which
    bounds the padding to 1% of the parameters plus ``PAD_ALLOWANCE`` elements.
    ``shards``: pad every group to a multiple of ``shards * align`` elements (see the module
    docstring), for buffers split evenly over ``shards`` devices.
    ``complex_ok``: admit complex leaves (a group per complex dtype), for drivers that run those
    groups per leaf (``fusedopt.tx``); flat buffers and kernels are real, so by default a
    complex leaf is a ``LayoutError`` naming it.
    ``quantize=(min_size, block)``: leaves of at least ``min_size`` elements go to groups of
    their own (one per dtype, ``Group.block = block``) whose segments start on multiples of
    ``align`` and ``block``, so that a block of quantized state never straddles two tensors, and
    whose size is a multiple of ``tile_blocks`` blocks per shard (default
    ``QUANTIZED_TILE_BLOCKS``; 1 for a group holding exactly its leaf's blocks, as
    ``fusedopt.tx``'s per-leaf state does); the smaller leaves stay in the plain groups
    (``fusedopt.quantization``)."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    # An empty tree ({}, or only empty containers / None) has no segments and no groups: every
    # step is a no-op that still counts, as in flax 0.5.3.
    spec = tuple((jax.tree_util.keystr(p), tuple(np.shape(x)),
                  _check_leaf(jax.tree_util.keystr(p), x, complex_ok))
                 for p, x in leaves_with_path)
    if quantize is not None:
      min_size, block = (int(v) for v in quantize)
      if block < 1 or block & (block - 1):
        raise ValueError(f"quantization block={block} must be a power of two")
      spec = tuple((path, shape, dtype,
                    block if int(np.prod(shape, dtype=np.int64)) >= min_size else 0)
                   for path, shape, dtype in spec)
    else:
      spec = tuple(s + (0,) for s in spec)
    shards = int(shards)
    if shards < 1:
      raise ValueError(f"shards={shards} must be a positive integer")
    if align is None:
      align = choose_align([int(np.prod(shape, dtype=np.int64)) for _, shape, _, _ in spec])
    elif int(align) < 1:
      raise ValueError(f"align={align} must be a positive integer")
    if int(tile_blocks) < 1:
      raise ValueError(f"tile_blocks={tile_blocks} must be a positive integer")
    # no quantized group: tile_blocks changes nothing, so one layout (and key) whatever it is
    tile_blocks = int(tile_blocks) if any(block for *_, block in spec) else 1
    return _build(treedef, spec, int(align), shards, tile_blocks)

  def padding(self) -> int:
    """Zero elements between and after the segments, over all groups."""
    return sum(g.size for g in self.groups) - sum(s.size for s in self.segments)

  def with_shards(self, shards: int) -> "FlatLayout":
    """This layout with its groups padded for ``shards`` devices (same segments and offsets)."""
    spec = tuple((s.path, s.shape, self.groups[s.group].dtype, self.groups[s.group].block)
                  for s in self.segments)
    return _build(self.treedef, spec, self.align, int(shards), self.tile_blocks)

  def unit(self, g: int) -> int:
    """Group ``g``'s segment alignment: ``align``, or for a quantized group the least common
    multiple of ``align`` and its block (where both are powers of two, the larger)."""
    return _segment_unit(self.align, self.groups[g].block)

  def shard_size(self, g: int) -> int:
    """Elements of group ``g`` held by each of the ``shards`` devices."""
    return self.groups[g].size // self.shards

  # ---------------------------------------------------------------- checks

  def check(self, tree, what="tree", allow_other_float=True):
    """Raises LayoutError naming the first leaf of ``tree`` that does not fit this layout."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if treedef != self.treedef:
      raise LayoutError(
          f"{what} has a different tree structure than the parameters:\n  params: {self.treedef}\n"
          f"  {what}: {treedef}")
    for seg, (path, x) in zip(self.segments, leaves_with_path):
      if tuple(np.shape(x)) != seg.shape:
        raise LayoutError(f"{what} leaf {seg.path} has shape {tuple(np.shape(x))}, "
                          f"expected {seg.shape}")
      dtype = np.dtype(jnp.result_type(x))
      want = self.groups[seg.group].dtype
      if dtype != want and not (allow_other_float and jnp.issubdtype(dtype, jnp.floating)):
        raise LayoutError(f"{what} leaf {seg.path} has dtype {dtype}, expected {want}")
    return [x for _, x in leaves_with_path]

  # ---------------------------------------------------------------- pack / unpack

  def group_leaves(self, leaves: Sequence[Any], g: int):
    return [leaves[i] for i in self.groups[g].segments]

  def pack_group(self, leaves: Sequence[Any], g: int, dtype=None):
    """Concatenates the leaves of group ``g`` (all the tree's leaves, in leaf order) into its
    zero-padded flat buffer."""
    group = self.groups[g]
    dtype = group.dtype if dtype is None else dtype
    parts = []
    unit = self.unit(g)
    for i in group.segments:
      seg = self.segments[i]
      parts.append(jnp.ravel(jnp.asarray(leaves[i])).astype(dtype))
      pad = _round_up(seg.size, unit) - seg.size
      if pad:
        parts.append(jnp.zeros((pad,), dtype))
    tail = group.size - sum(_round_up(self.segments[i].size, unit) for i in group.segments)
    if tail:   # shard padding (shards > 1)
      parts.append(jnp.zeros((tail,), dtype))
    if not parts:
      return jnp.zeros((0,), dtype)
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]

  def pack(self, tree, dtype=None):
    """``tree`` -> tuple of flat buffers, one per group (``dtype`` overrides the buffers' dtype)."""
    leaves = self.check(tree)
    return tuple(self.pack_group(leaves, g, dtype) for g in range(len(self.groups)))

  def view(self, buffers, i):
    """Leaf ``i`` as an array of its shape, read from ``buffers``."""
    seg = self.segments[i]
    buf = buffers[seg.group]
    return jax.lax.slice(buf, (seg.offset,), (seg.offset + seg.size,)).reshape(seg.shape)

  def unpack_leaves(self, buffers, dtype=None):
    out = [self.view(buffers, i) for i in range(len(self.segments))]
    if dtype is not None:
      out = [x.astype(dtype) for x in out]
    return out

  def unpack(self, buffers, dtype=None):
    """Tuple of flat buffers -> the tree."""
    return jax.tree_util.tree_unflatten(self.treedef, self.unpack_leaves(buffers, dtype))

  def zeros(self, dtype=None):
    """Zero flat buffers, one per group (of the group's dtype unless ``dtype`` is given)."""
    return tuple(jnp.zeros((g.size,), g.dtype if dtype is None else dtype) for g in self.groups)

  def block_segment_ids(self, g: int) -> np.ndarray:
    """For group ``g``: the segment (leaf) index owning each ``align``-sized block (host int32).

    Trailing shard padding (``shards > 1``) is attributed to the group's last segment: its
    values are zero, so it adds nothing to that segment's sums, and the ids stay sorted."""
    group = self.groups[g]
    ids = np.empty((group.size // self.align,), np.int32)
    if group.segments:
      ids[:] = group.segments[-1]
    unit = self.unit(g)
    for i in group.segments:
      seg = self.segments[i]
      a = seg.offset // self.align
      ids[a:a + _round_up(seg.size, unit) // self.align] = i
    return ids


def choose_align(sizes) -> int:
  """The largest power of two ``a <= DEFAULT_ALIGN`` with which padding every leaf of ``sizes``
  to a multiple of ``a`` adds at most ``sum(sizes) // 100 + PAD_ALLOWANCE`` elements."""
  total = int(sum(sizes))
  budget = total // 100 + PAD_ALLOWANCE
  a = DEFAULT_ALIGN
  while a > 1 and sum(_round_up(n, a) - n for n in sizes) > budget:
    a //= 2
  return a


def _segment_unit(align, block):
  """A group's segments start on multiples of this: ``align``, and for a quantized group its
  block too (blocks of 256 under a hand-made ``align`` of 1536: 1536, of 384: 768)."""
  return int(np.lcm(align, block)) if block else align


def _group_unit(align, block, tile_blocks):
  """A group's size is a multiple of this (per shard): ``_segment_unit``, and for a quantized
  group ``tile_blocks`` whole blocks."""
  unit = _segment_unit(align, block)
  return int(np.lcm(unit, tile_blocks * block)) if block else unit


@functools.lru_cache(maxsize=256)
def _build(treedef, spec, align, shards=1, tile_blocks=1):
  """``spec``: per leaf (path, shape, dtype, quantization block or 0); a group per (dtype,
  block), in order of first appearance."""
  segments, groups, order = [None] * len(spec), {}, []
  for i, (path, shape, dtype, block) in enumerate(spec):
    key = (dtype, block)
    if key not in groups:
      groups[key] = [0, []]
      order.append(key)
    size = int(np.prod(shape, dtype=np.int64))
    g = order.index(key)
    segments[i] = Segment(i, path, shape, g, groups[key][0], size)
    groups[key][0] += _round_up(size, _segment_unit(align, block))
    groups[key][1].append(i)
  group_objs = tuple(Group(d, _round_up(groups[(d, b)][0],
                                        shards * _group_unit(align, b, tile_blocks)),
                           tuple(groups[(d, b)][1]), b)
                     for d, b in order)
  return FlatLayout(treedef, tuple(segments), group_objs, align, shards, tile_blocks)
