"""Every backend runs the same rule: native == jnp (within XLA's FMA contraction and rsqrt
rewrite), flat == per-leaf. native == NumPy float32 bitwise: tests/test_native_bitwise.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim
from fusedopt.base import OptimizerDef, OptimizerState

from cases import CONFIGS, IDS, config_id

MIXED = [c for c in CONFIGS if c[0] in ("Adam", "Momentum", "LAMB", "RMSProp")]

NATIVE = "native" in optim.available_backends()


def _tree(dtypes=(jnp.float32,)):
  rng = np.random.RandomState(0)
  shapes = [(), (1,), (7,), (3, 5), (1025,), (0,), (33, 65), (2, 3, 4)]
  tree = {}
  for i, s in enumerate(shapes):
    tree[f"l{i}"] = jnp.asarray(rng.standard_normal(s), dtypes[i % len(dtypes)])
  return tree


def _grads(tree, seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


def _run(name, kw, backend, tree, steps=5, lr=0.05):
  opt = getattr(optim, name)(learning_rate=lr, backend=backend, **kw).create(tree)
  step = jax.jit(lambda o, g, lr: o.apply_gradient(g, learning_rate=lr))
  for t in range(steps):
    opt = step(opt, _grads(tree, t + 1), jnp.float32(lr / (t + 1)))
  return opt


def _ulp_diff(a, b):
  a = np.asarray(a, np.float32).ravel()
  b = np.asarray(b, np.float32).ravel()
  ia, ib = a.view(np.int32).astype(np.int64), b.view(np.int32).astype(np.int64)
  ia = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
  ib = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
  return int(np.max(np.abs(ia - ib))) if a.size else 0


def _assert_within_8ulp(new_a, new_b, old, what, step_size=0.0, inputs=()):
  """|a - b| <= 8 ulp of the magnitude of the terms: |old| + |new| + |inputs| + step_size.

  The native kernel is IEEE float32 operation by operation (bitwise equal to NumPy:
  tests/test_native_bitwise.py); XLA:CPU is not quite: it contracts multiply-adds into FMAs
  (``g + wd*p``: 1 ulp of the terms, which near a cancellation is many ulps of the result) and
  rewrites ``a / sqrt(b)`` into ``a * rsqrt(b)`` (a few ulp of the quotient, doubled when it is
  squared, as Adadelta's ``delta**2``). ``inputs`` are the step's other operands (the gradient).
  """
  a, b, old = (np.asarray(x, np.float32) for x in (new_a, new_b, old))
  scale = np.abs(old) + np.maximum(np.abs(a), np.abs(b)) + step_size
  for x in inputs:
    scale = scale + np.abs(np.asarray(x, np.float32))
  err = np.abs(a.astype(np.float64) - b)
  bound = 8 * np.spacing(scale.astype(np.float32)).astype(np.float64)
  assert np.all(err <= bound), (what, float(np.max(err - bound)))


@pytest.mark.skipif(not NATIVE, reason="no C++ compiler for the native backend")
@pytest.mark.parametrize("name, kw", CONFIGS, ids=IDS)
def test_native_matches_jnp_float32(name, kw):
  """From the same state, one native step equals one jnp step (checked at 5 successive states)."""
  tree = _tree()
  defs = {b: getattr(optim, name)(learning_rate=0.05, backend=b, **kw) for b in ("jnp", "native")}
  steps = {b: jax.jit(lambda o, g, lr, d=d: o.replace(optimizer_def=d).apply_gradient(
      g, learning_rate=lr)) for b, d in defs.items()}
  opt = defs["jnp"].create(tree)
  for t in range(5):
    g, lr = _grads(tree, t + 1), jnp.float32(0.05 / (t + 1))
    a, b = steps["jnp"](opt, g, lr), steps["native"](opt, g, lr)
    for x, y, old in zip(jax.tree.leaves(a.target), jax.tree.leaves(b.target),
                         jax.tree.leaves(opt.target)):
      if name == "LAMB":
        # The trust ratio's norms are summed in another order by each backend (per 1024-block
        # partial sums vs per leaf): the steps agree to float32 summation error.
        o64 = np.asarray(old, np.float64)
        np.testing.assert_allclose(np.asarray(x, np.float64) - o64,
                                   np.asarray(y, np.float64) - o64, rtol=2e-5, atol=1e-7)
        continue
      _assert_within_8ulp(x, y, old, (name, kw, t), step_size=float(lr))
    # state compared leaf by leaf: the padding between segments is not state (the jnp backend
    # computes it, the native one skips it)
    a_st, b_st = a.state.param_states, b.state.param_states
    for k in a_st.fields:
      for i in range(len(a_st.layout.segments)):
        _assert_within_8ulp(a_st.leaf(k, i), b_st.leaf(k, i), opt.state.param_states.leaf(k, i),
                            (name, kw, t, k, i), inputs=(jax.tree.leaves(g)[i],))
    opt = a


@pytest.mark.skipif(not NATIVE, reason="no C++ compiler for the native backend")
@pytest.mark.parametrize("name, kw", MIXED, ids=[config_id(n, k) for n, k in MIXED])
def test_native_mixed_dtypes_match_jnp(name, kw):
  """bfloat16 and float16 params (and grads) run natively: loaded to float32, the same float32
  math, stored back rounding to nearest even as XLA's convert does."""
  import warnings
  tree = _tree((jnp.float32, jnp.bfloat16, jnp.float16))
  with warnings.catch_warnings():
    warnings.simplefilter("error")        # no fallback warning: every group is native
    b = _run(name, kw, "native", tree)
  a = _run(name, kw, "jnp", tree)
  for x, y in zip(jax.tree.leaves(a.target), jax.tree.leaves(b.target)):
    assert x.dtype == y.dtype
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.dtype == jnp.float32:
      np.testing.assert_allclose(x64, y64, rtol=2e-5, atol=1e-6)
    else:   # within 1 ulp of the storage dtype after 5 steps
      ulp = np.spacing(np.abs(x64).astype(np.float32)) * 2.0 ** (23 - jnp.finfo(x.dtype).nmant)
      assert np.all(np.abs(x64 - y64) <= np.maximum(ulp, 1e-7)), (name, x.dtype)


@pytest.mark.skipif(not NATIVE, reason="no C++ compiler for the native backend")
def test_native_bfloat16_rounding_is_round_to_nearest_even():
  """One SGD step in bfloat16 whose float32 results sit exactly between two bfloat16 values."""
  p = jnp.asarray([1.0, 1.0, -1.0, 3.0], jnp.bfloat16)
  # 1 - 0.5*2^-8 is halfway between bf16 neighbours 1 - 2^-8 and 1; even mantissa wins: 1.0
  g = jnp.asarray([2.0 ** -8, 3 * 2.0 ** -8, -(2.0 ** -8), 0.0], jnp.bfloat16)
  out = {}
  for backend in ("jnp", "native"):
    opt = optim.GradientDescent(learning_rate=0.5, backend=backend).create({"w": p})
    out[backend] = np.asarray(opt.apply_gradient({"w": g}).target["w"], np.float32)
  np.testing.assert_array_equal(out["native"], out["jnp"])
  np.testing.assert_array_equal(out["jnp"], np.asarray(jnp.asarray(
      np.asarray(p, np.float32) - 0.5 * np.asarray(g, np.float32), jnp.bfloat16), np.float32))


@pytest.mark.parametrize("name, kw", CONFIGS, ids=IDS)
def test_flat_path_equals_per_leaf_path(name, kw):
  """The flat driver and flax's per-leaf ``apply_param_gradient`` run the same rule."""
  tree = _tree()
  opt_def = getattr(optim, name)(learning_rate=0.05, backend="jnp", **kw)
  flat = opt_def.create(tree)
  per_leaf = OptimizerState(jnp.int32(0), jax.tree.map(opt_def.init_param_state, tree))
  params = tree
  for t in range(3):
    g = _grads(tree, t + 1)
    flat = flat.apply_gradient(g)
    params, per_leaf = OptimizerDef.apply_gradient(opt_def, opt_def.hyper_params, params,
                                                   per_leaf, g)
  for x, y in zip(jax.tree.leaves(flat.target), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-6, atol=1e-7)
  assert int(per_leaf.step) == int(flat.state.step) == 3


# ----------------------------------------------------------------------------- per-leaf state

LEAF_STATE_BACKENDS = [b for b in ("jnp", "native", "pallas_interpret")
                       if b in optim.available_backends()]


def _leaf_state_step(opt_def, tree, grads, leaf_state, steps=3):
  """``steps`` of ``update_leaves`` with per-leaf (optax-shaped) or flat state, the state
  starting from the same nonzero values; returns the params and the state as per-leaf arrays."""
  from fusedopt.layout import FlatLayout   # pylint: disable=import-outside-toplevel
  from fusedopt.step import StepContext   # pylint: disable=import-outside-toplevel
  layout = FlatLayout.build(tree)
  p = jax.tree.leaves(tree)
  names = opt_def.all_state_fields
  init = {k: [jnp.full(x.shape, 0.25 + 0.125 * j, jnp.float32) for x in p]
          for j, k in enumerate(names)}
  if leaf_state:
    fields = init
  else:
    fields = {k: tuple(layout.pack_group(v, gi, jnp.float32) for gi in range(len(layout.groups)))
              for k, v in init.items()}
  hp = opt_def.hyper_params
  order = names if leaf_state else None
  step = jax.jit(lambda t, p, g, f: opt_def.update_leaves(
      hp, StepContext(t, leaf_state=order), layout, p, g, f))
  for t in range(steps):
    p, fields = step(jnp.int32(t), p, jax.tree.leaves(grads[t]), fields)
  if not leaf_state:
    fields = {k: [b[s.group][s.offset:s.offset + s.size].reshape(s.shape)
                  for s in layout.segments] for k, b in fields.items()}
  return p, fields


# kernels compile per rule and dtypes (seconds each on CPU): the kernel backends run one rule of
# each shape -- no state, two states, LAMB's norms in the pass, per-tensor scalars (LARS), a
# rule with sqrt of a difference (centered RMSProp); jnp runs every rule
KERNEL_SHAPES = ("GradientDescent-", "Adam-weight_decay=0.1", "LAMB-weight_decay=0.01",
                 "LARS-nesterov=True-weight_decay=0.01-eps=1e-06", "RMSProp-centered=True")
LEAF_STATE_CASES = [(n, kw, b) for n, kw in CONFIGS for b in LEAF_STATE_BACKENDS
                    if b == "jnp" or config_id(n, kw) in KERNEL_SHAPES]


@pytest.mark.parametrize("name, kw, backend", LEAF_STATE_CASES,
                         ids=[f"{config_id(n, kw)}-{b}" for n, kw, b in LEAF_STATE_CASES])
def test_leaf_state_equals_flat_state(name, kw, backend):
  """Per-leaf state (``StepContext.leaf_state``: optax's params-shaped state, fusedopt.tx) runs
  the same rule as flat state on every backend: native reads and writes each leaf's state by
  address -- bitwise equal to its flat run; Pallas packs it and jnp runs one XLA fusion per
  leaf: both within XLA's FMA contraction of the flat fusion. Mixed float32/bfloat16 leaves, ragged
  sizes, a size-0 leaf; LAMB/LARS per-tensor norms included."""
  tree = _tree((jnp.float32, jnp.float32, jnp.bfloat16))
  grads = [_grads(tree, t + 1) for t in range(3)]
  opt_def = getattr(optim, name)(learning_rate=0.05, backend=backend, **kw)
  p1, f1 = _leaf_state_step(opt_def, tree, grads, True)
  p2, f2 = _leaf_state_step(opt_def, tree, grads, False)
  pairs = list(zip(p1, p2)) + [(a, b) for k in f1 for a, b in zip(f1[k], f2[k])]
  for i, (a, b) in enumerate(pairs):
    assert a.dtype == b.dtype and a.shape == b.shape, i
    if backend != "native":
      # jnp: per-leaf vs flat XLA fusions (FMA contraction; LAMB/LARS norms summed per leaf vs
      # per unit). pallas_interpret: interpreted kernels are XLA ops, and the packing around
      # them changes the fusion and XLA:CPU's FMA contraction with it (~1 ulp a step, more
      # near a cancellation)
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=2e-6 if a.dtype == np.float32 else 2 ** -7, atol=1e-7,
                                 err_msg=f"{name} {backend} {i}")
    else:
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                    err_msg=f"{name} {backend} {i}")
