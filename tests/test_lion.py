"""Lion (Chen et al. 2023) in both APIs: ``fusedopt.Lion`` (flax.optim style) against the float64
reference (tests/reference.py) on every CPU backend, and ``fusedopt.tx.lion`` against optax.lion.

The rule (``fusedopt.lion.LION_RULE``) is also in the shared kernel tiers: bitwise native vs
NumPy (test_native_bitwise.py), Pallas CUDA/TPU lowering (test_pallas_lowering.py), Triton
sm_80/sm_90 compiles (test_triton_kernels.py).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import fusedopt as optim
import reference
from cases import SHAPES, ulps_error

N_STEPS = 6


def _tree(dtypes=(jnp.float32,), seed=0):
  rng = np.random.RandomState(seed)
  return {f"l{i:02d}": jnp.asarray(rng.standard_normal(s), dtypes[i % len(dtypes)])
          for i, s in enumerate(SHAPES)}


def _grads(tree, steps=N_STEPS, seed=1):
  rng = np.random.RandomState(seed)
  return [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)
          for _ in range(steps)]


@pytest.mark.parametrize("backend", ["jnp", "native", "auto"])
@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.1, "beta1": 0.8, "beta2": 0.95}],
                         ids=["defaults", "wd"])
def test_matches_float64_reference(backend, kw):
  """Steps of the flat optimizer against the paper's update in float64 NumPy. Every element moves
  by ``lr`` (plus the decay), so the float32 result is within a couple of ulps of the update's
  terms wherever ``sign(c)`` agrees, which it does unless |c| is at rounding level (not in this
  data: asserted)."""
  if backend != "auto" and backend not in optim.available_backends():
    pytest.skip(f"{backend} not available")
  tree, grads = _tree(), _grads(_tree())
  opt = optim.Lion(learning_rate=0.01, backend=backend, **kw).create(tree)
  step = jax.jit(lambda o, g: o.apply_gradient(g))
  for g in grads:
    opt = step(opt, g)
  want, _ = reference.run("Lion", dict(learning_rate=0.01, **kw), tree, grads)
  for path, got in jax.tree_util.tree_leaves_with_path(opt.target):
    ref = want[path[0].key]
    err = ulps_error(np.asarray(got), ref.astype(np.float32), np.asarray(tree[path[0].key]),
                     step_size=0.01)
    assert err.size == 0 or float(np.max(err)) <= 4, (path, float(np.max(err)))
  # the state: the gradient EMA, as the reference's
  m = opt.state.param_states["l06"].grad_ema
  b2 = kw.get("beta2", 0.99)
  want_m = np.zeros(SHAPES[6])
  for g in grads:
    want_m = (1 - b2) * np.asarray(g["l06"], np.float64) + b2 * want_m
  np.testing.assert_allclose(np.asarray(m), want_m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "pallas_interpret"])
def test_kernel_backends_match_jnp_mixed_dtypes(backend):
  """float32, bfloat16 and float16 leaves with master weights and bfloat16 state: the kernel
  backends against the jnp backend over 3 steps. Within 2 ulps of the terms, except where
  ``c = b1 m + (1-b1) g`` is 0 up to rounding: ``sign(c)`` is discontinuous there, and a state
  that differs in its last bit (XLA contracts FMAs, the kernels do not; bf16 state rounds those
  differently) can flip it -- a step of ``lr`` more or less. Those elements are counted (at most
  1 in 1000) and bounded by ``2 lr`` a step."""
  if backend not in optim.available_backends():
    pytest.skip(f"{backend} not available")
  tree = _tree((jnp.float32, jnp.bfloat16, jnp.float16))
  grads = _grads(tree, 3)
  outs = {}
  for b in ("jnp", backend):
    for kw in ({"master_weights": True}, {"state_dtype": jnp.bfloat16}):
      opt = optim.Lion(learning_rate=0.01, weight_decay=0.1, backend=b, **kw).create(tree)
      for g in grads:
        opt = jax.jit(lambda o, g: o.apply_gradient(g))(opt, g)
      outs[(b, tuple(kw))] = opt
  for kw in (("master_weights",), ("state_dtype",)):
    a, b = outs[("jnp", kw)], outs[(backend, kw)]
    for x, y, p in zip(jax.tree.leaves(a.target), jax.tree.leaves(b.target),
                       jax.tree.leaves(tree)):
      err = ulps_error(np.asarray(y), np.asarray(x), np.asarray(p), step_size=0.01)
      flips = err > 2
      assert np.sum(flips) <= max(1, err.size // 1000), (kw, x.dtype, int(np.sum(flips)))
      gap = np.abs(np.asarray(y, np.float64) - np.asarray(x, np.float64))[flips]
      assert np.all(gap <= 2 * 0.01 * len(grads) + 1e-2 * 2 ** -7), (kw, x.dtype, gap)


def test_bad_hyper_parameters_are_clear_errors():
  tree = _tree()
  for kw, name in (({"beta1": 1.0}, "beta1"), ({"beta2": -0.1}, "beta2"),
                   ({"weight_decay": -1.0}, "weight_decay"), ({"learning_rate": -1.0},
                                                              "learning_rate")):
    args = {"learning_rate": 0.01, **kw}
    with pytest.raises(optim.HyperParamError, match=name):
      optim.Lion(**args).create(tree).apply_gradient(tree)


def test_state_dict_round_trip():
  tree, grads = _tree(), _grads(_tree(), 2)
  opt = optim.Lion(learning_rate=0.01).create(tree).apply_gradient(grads[0])
  back = optim.serialization.from_state_dict(opt, optim.serialization.to_state_dict(opt))
  a = opt.apply_gradient(grads[1])
  b = back.apply_gradient(grads[1])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- fusedopt.tx.lion

optax = pytest.importorskip("optax")
from fusedopt import tx  # noqa: E402
import test_tx  # noqa: E402

LION_CASES = [
    ("defaults", lambda m: m.lion(1e-3)),
    ("mask_wd", lambda m: m.lion(1e-3, b1=0.8, b2=0.95, weight_decay=0.5,
                                 mask=test_tx.ALL_TRUE_BUT_BIG)),
    ("mu_bf16_schedule", lambda m: m.lion(optax.linear_schedule(1e-3, 1e-4, 10),
                                          mu_dtype=jnp.bfloat16)),
]


@pytest.mark.parametrize("case", LION_CASES, ids=[c[0] for c in LION_CASES])
def test_tx_lion_agrees_with_optax(case):
  """20 steps on the float32/complex64 zoo (complex: sign is x/|x|, as jnp.sign): optax's
  state structure exactly, params and ``mu`` within rtol 1e-6.

  bfloat16 ``mu``: optax multiplies ``b1 * mu`` and ``b2 * mu`` in bfloat16 (a Python float times
  a bf16 array stays bf16) before adding the float32 gradient term; fusedopt computes in float32
  and rounds once when storing. ``sign(c)`` then differs where ``|c|`` is below that bf16
  rounding -- about 2% of the elements here, each off by whole steps of ``lr`` -- and ``mu`` by a
  bf16 ulp or two."""
  name, make = case
  params = test_tx.make_zoo(bf16=False)
  grads = test_tx.make_grads(params)
  expected, expected_state = test_tx.run_optax(make(optax), params, grads)
  got, state = test_tx.run(make(tx), params, grads)
  test_tx.assert_same_structure(state, expected_state)
  if "bf16" not in name:
    test_tx.assert_close(got, expected, name)
    test_tx.assert_close(state, expected_state, name)
    return
  for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    gap = np.abs(np.asarray(a) - np.asarray(e))
    # a flipped sign moves an element by a step (lr >= 1e-4 here); complex signs are continuous
    assert np.mean(gap > 5e-5) <= 0.05, name
    assert float(np.max(gap, initial=0.0)) <= 2 * 1e-3 * len(grads), name
  test_tx.assert_close(state, expected_state, name, rtol=2 ** -6, atol_rel=2 ** -7)

