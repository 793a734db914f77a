"""State memory stays within 1% (plus a small constant) of the parameters on any tree.

Each leaf is padded to the layout's alignment unit, which is 1024 elements unless that would pad
the tree by more than ``sum // 100 + PAD_ALLOWANCE`` elements (``layout.choose_align``): a tree of
3000 scalars would otherwise get 1024x its size in every state field. Per-tensor norms (LAMB,
LARS) stay per tensor at every alignment, and kernels that need whole 1024-element units leave
such layouts to the jnp path with a warning.
"""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fusedopt as optim
from fusedopt.base import OptimizerDef, OptimizerState
from fusedopt.layout import PAD_ALLOWANCE, FlatLayout

from bench import trees


def _bound(n_params):
  return n_params + n_params // 100 + PAD_ALLOWANCE


def _state_elements(opt):
  fields = opt.state.param_states.fields
  return {k: sum(int(b.size) for b in bufs) for k, bufs in fields.items()}


def test_many_scalars_state_is_about_the_params_size():
  tree = {f"s{i}": jnp.float32(i / 3000) for i in range(3000)}
  opt = optim.Adam(1e-3).create(tree)
  for k, n in _state_elements(opt).items():
    assert n <= _bound(3000), (k, n)
  assert opt.state.param_states.layout.align < 1024


@pytest.mark.parametrize("name, keeps_1024", [("gpt2-124m", True), ("resnet50", True),
                                              ("bert-base", True), ("small-2000", False)])
def test_bench_trees_padding_within_one_percent(name, keeps_1024):
  shapes = trees.shape_leaves(trees.shapes(name))
  tree = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  lay = FlatLayout.build(tree)
  n = sum(int(np.prod(s)) for s in shapes)
  assert lay.padding() <= n // 100 + PAD_ALLOWANCE
  assert (lay.align == 1024) == keeps_1024, lay.align


_sizes = st.lists(st.integers(0, 5000), min_size=1, max_size=60)


@settings(max_examples=40, deadline=None)
@given(sizes=_sizes, n_dtypes=st.integers(1, 3), shards=st.sampled_from([1, 4]))
def test_padding_bound_on_any_tree(sizes, n_dtypes, shards):
  dts = (jnp.float32, jnp.bfloat16, jnp.float16)
  tree = [jax.ShapeDtypeStruct((s,), dts[i % n_dtypes]) for i, s in enumerate(sizes)]
  lay = FlatLayout.build(tree, shards=shards)
  n = sum(sizes)
  # the shard padding (a multiple of shards * align per group) is on top of the bound
  shard_pad = sum(g.size for g in lay.groups) - sum(
      -(-s.size // lay.align) * lay.align for s in lay.segments)
  assert lay.padding() - shard_pad <= n // 100 + PAD_ALLOWANCE
  assert shard_pad < shards * lay.align * len(lay.groups)
  for s in lay.segments:   # whole units, never straddling two leaves
    assert s.offset % lay.align == 0


# pallas_interpret needs whole 1024-element units: it runs such layouts on jnp (tested below)
BACKENDS = [b for b in optim.available_backends() if b in ("jnp", "native")]


def _tiny_tree():
  rng = np.random.RandomState(0)
  tree = {f"l{i}": jnp.asarray(rng.standard_normal((1 + i % 9,)), jnp.float32)
          for i in range(72)}
  tree["zero"] = jnp.zeros((5,))   # a zero-initialised tensor: trust ratio 1
  return tree, jax.tree.map(lambda x: jnp.cos(x) + 0.1, tree)


@functools.lru_cache(maxsize=None)
def _per_leaf_reference(name):
  """flax's per-leaf path on ``_tiny_tree`` (the same for every backend: computed once)."""
  tree, g = _tiny_tree()
  opt_def = getattr(optim, name)(learning_rate=0.05, weight_decay=0.01, backend="jnp")
  per_leaf = OptimizerState(jnp.int32(0), jax.tree.map(opt_def.init_param_state, tree))
  ref, _ = jax.jit(lambda t, s, g: OptimizerDef.apply_gradient(
      opt_def, opt_def.hyper_params, t, s, g))(tree, per_leaf, g)
  return ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["LAMB", "LARS", "Adam"])
def test_tiny_leaves_keep_per_tensor_norms(name, backend):
  """A tree of 73 tiny leaves (align < 1024): the flat step equals flax's per-leaf path, whose
  norms are per tensor by construction. (73: enough leaves that 1024-element units would pad
  them past ``PAD_ALLOWANCE``; not more: the per-leaf reference's compile time grows with
  them.)"""
  tree, g = _tiny_tree()
  opt_def = getattr(optim, name)(learning_rate=0.05, weight_decay=0.01, backend=backend)
  flat = opt_def.create(tree)
  assert flat.state.param_states.layout.align < 1024
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")     # pallas: "runs on the jnp backend"
    new = jax.jit(lambda o, g: o.apply_gradient(g))(flat, g)
  ref = _per_leaf_reference(name)
  for k in tree:
    np.testing.assert_allclose(np.asarray(new.target[k]), np.asarray(ref[k]), rtol=2e-6,
                               atol=1e-7)


def test_kernels_needing_whole_units_fall_back_with_a_warning():
  tree = {f"s{i}": jnp.float32(i) for i in range(300)}
  opt = optim.Momentum(0.1, backend="pallas_interpret").create(tree)
  assert opt.state.param_states.layout.align < 1024
  with pytest.warns(RuntimeWarning, match="jnp backend"):
    new = jax.jit(lambda o: o.apply_gradient(tree))(opt)
  ref = optim.Momentum(0.1, backend="jnp").create(tree).apply_gradient(tree)
  for a, b in zip(jax.tree.leaves(new.target), jax.tree.leaves(ref.target)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
