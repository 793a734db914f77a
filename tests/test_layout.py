"""The flat layout: alignment, pack/unpack identity, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fusedopt.layout import FlatLayout, LayoutError
from fusedopt.frozen_dict import FrozenDict


def _tree():
  return {"a": jnp.arange(6.0).reshape(2, 3), "b": [jnp.float32(3.0), jnp.zeros((0,))],
          "c": (jnp.ones((5,), jnp.bfloat16), None), "d": FrozenDict({"k": jnp.ones((7, 3))})}


def test_segments_are_aligned_and_grouped_by_dtype():
  lay = FlatLayout.build(_tree(), align=8)
  assert [g.dtype for g in lay.groups] == [np.dtype("float32"), np.dtype("bfloat16")]
  for seg in lay.segments:
    assert seg.offset % 8 == 0
  f32 = [s for s in lay.segments if s.group == 0]
  # segments follow each other with padding up to the alignment, in leaf order
  ends = [s.offset + -(-s.size // 8) * 8 for s in f32]
  assert [s.offset for s in f32[1:]] == ends[:-1]
  assert lay.groups[0].size == ends[-1]
  assert lay.segments[0].path == "['a']"


def test_layout_is_cached_and_hashable():
  t = _tree()
  assert FlatLayout.build(t) is FlatLayout.build(jax.tree.map(lambda x: x + 1, t))
  assert hash(FlatLayout.build(t)) == hash(FlatLayout.build(t))
  other = dict(t, a=jnp.zeros((3, 2)))
  assert FlatLayout.build(other) != FlatLayout.build(t)


def test_pack_pads_with_zeros_and_unpack_is_identity_under_jit():
  t = _tree()
  lay = FlatLayout.build(t, align=8)
  bufs = jax.jit(lay.pack)(t)
  assert [b.shape[0] for b in bufs] == [g.size for g in lay.groups]
  back = jax.jit(lay.unpack)(bufs)
  for x, y in zip(jax.tree.leaves(t), jax.tree.leaves(back)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  mask = np.zeros(lay.groups[0].size, bool)
  for s in lay.segments:
    if s.group == 0:
      mask[s.offset:s.offset + s.size] = True
  assert np.all(np.asarray(bufs[0])[~mask] == 0)


def test_block_segment_ids():
  lay = FlatLayout.build({"a": jnp.ones(9), "b": jnp.ones(3)}, align=4)
  np.testing.assert_array_equal(lay.block_segment_ids(0), [0, 0, 0, 1])


@pytest.mark.parametrize("bad, match", [
    ({"a": jnp.ones(3), "b": jnp.ones(2)}, "tree structure"),
    ({"a": jnp.ones(4)}, r"\['a'\] has shape \(4,\)"),
    ({"a": jnp.ones(3, jnp.int32)}, r"\['a'\] has dtype int32"),
])
def test_check_names_the_problem(bad, match):
  lay = FlatLayout.build({"a": jnp.ones(3)})
  with pytest.raises(LayoutError, match=match):
    lay.check(bad, "grads")


def test_rejects_integer_leaves_and_lays_out_empty_trees():
  with pytest.raises(LayoutError, match=r"\['n'\] has dtype int32"):
    FlatLayout.build({"w": jnp.ones(2), "n": jnp.zeros((), jnp.int32)})
  # an empty tree (flax 0.5.3 optimizes it: every step a no-op) has no segments and no groups
  for empty in ({}, {"a": {}}, (), [None]):
    lay = FlatLayout.build(empty)
    assert lay.segments == () and lay.groups == () and lay.zeros() == ()
    assert lay.pack(empty) == () and lay.unpack(()) == empty


_shapes = st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
                   min_size=1, max_size=6)
_dtypes = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])


@settings(max_examples=25, deadline=None)
@given(shapes=_shapes, dtypes=st.lists(_dtypes, min_size=6, max_size=6),
       align=st.sampled_from([1, 4, 128]), nest=st.booleans())
def test_pack_unpack_roundtrip_property(shapes, dtypes, align, nest):
  rng = np.random.RandomState(0)
  leaves = [jnp.asarray(rng.standard_normal(s), d) for s, d in zip(shapes, dtypes)]
  tree = {"x": leaves[:2], "y": {"z": tuple(leaves[2:])}} if nest else leaves
  lay = FlatLayout.build(tree, align=align)
  back = lay.unpack(lay.pack(tree))
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_quantized_groups_hold_whole_tiles():
  """A quantized group's size is a multiple of ``QUANTIZED_TILE_BLOCKS`` blocks on each shard
  (the Pallas TPU kernel's uint8 tiles), the plain groups' is not changed by it; ``tile_blocks=1``
  keeps exactly the leaves' blocks (``fusedopt.tx``'s per-leaf state); layouts of another
  ``tile_blocks`` are other layouts; a non-positive one is an error naming it."""
  from fusedopt import layout as L   # pylint: disable=import-outside-toplevel
  tree = {"big": jax.ShapeDtypeStruct((37, 1000), jnp.float32),
          "small": jax.ShapeDtypeStruct((300,), jnp.float32)}
  tiled = L.FlatLayout.build(tree, quantize=(4096, 256))
  exact = L.FlatLayout.build(tree, quantize=(4096, 256), tile_blocks=1)
  plain = L.FlatLayout.build(tree)
  (qt,), (qe,) = ([g for g in lay.groups if g.block] for lay in (tiled, exact))
  tile = L.QUANTIZED_TILE_BLOCKS * 256
  assert qt.size == -(-37000 // tile) * tile and qe.size == 37 * 1024   # whole 1024-units
  assert [g.size for g in tiled.groups if not g.block] == [1024]
  assert tiled != exact and hash(tiled) != hash(exact)
  assert plain is L.FlatLayout.build(tree, tile_blocks=1)   # no quantized group: one layout
  for shards in (2, 8):
    (q,) = [g for g in tiled.with_shards(shards).groups if g.block]
    assert q.size % (shards * tile) == 0 and q.size - 37000 < shards * tile
  with pytest.raises(ValueError, match="tile_blocks=0"):
    L.FlatLayout.build(tree, quantize=(4096, 256), tile_blocks=0)


@pytest.mark.parametrize("align, unit", [(64, 256), (256, 256), (1024, 1024), (384, 768),
                                         (1536, 1536), (96, 768)])
def test_quantized_segments_start_on_whole_blocks_at_any_alignment(align, unit):
  """A quantized group's segments start on multiples of both the layout's alignment and the
  block (``FlatLayout.unit``: their least common multiple), so a block of codes never straddles
  two tensors, also for a hand-made alignment that is not a power of two (384 with blocks of
  256: segments on multiples of 768, where the larger of the two, 384, would put a block
  across two leaves); every block belongs to one segment."""
  from fusedopt import layout as L   # pylint: disable=import-outside-toplevel
  sizes = (4700, 4100, 7, 300)
  tree = {f"l{i}": jax.ShapeDtypeStruct((n,), jnp.float32) for i, n in enumerate(sizes)}
  lay = L.FlatLayout.build(tree, align=align, quantize=(4096, 256), tile_blocks=1)
  (gq,) = [gi for gi, g in enumerate(lay.groups) if g.block]
  assert lay.unit(gq) == unit
  owner = {}
  for i in lay.groups[gq].segments:
    seg = lay.segments[i]
    assert seg.offset % 256 == 0 and seg.offset % align == 0, (i, seg.offset)
    for b in range(seg.offset // 256, -(-(seg.offset + seg.size) // 256)):
      assert owner.setdefault(b, i) == i, ("block", b, "holds two segments")
  assert lay.groups[gq].size % unit == 0
  (gp,) = [gi for gi, g in enumerate(lay.groups) if not g.block]   # the small leaves: align only
  assert lay.unit(gp) == align
  assert all(lay.segments[i].offset % align == 0 for i in lay.groups[gp].segments)
