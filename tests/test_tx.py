"""fusedopt.tx (optax GradientTransformations on the fused engine) vs optax 0.2.8.

Agreement: each tx against optax's own optimizer over 20 steps on a tree with every kind of leaf
optax takes (float32 tensors and scalars, complex64, bfloat16, ``None``, empty containers).
Betas are dyadic (0.875, 1 - 2**-10, ...) where optax's bias correction ``1 - b**t`` would
otherwise round ``b`` first: fusedopt computes it accurately (see fusedopt.flat.bias_correction),
so with a non-representable beta the two differ by ~1e-6 relative in the update, which is
optax's error, not fusedopt's. The betas' defaults are covered by a looser test.

Tolerance: rtol 1e-6 and atol 1e-6 * max(1, max|leaf|) -- a few float32 ulps of the largest
entry: the fused rules round in another order than optax's chains (e.g. ``p - lr*x - lr*wd*p``
vs ``p + (-lr)*(x + wd*p)``; XLA contracts multiply-adds into FMAs, the native kernels do not).
"""
import functools
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp

optax = pytest.importorskip("optax")

from fusedopt import tx  # noqa: E402
import fusedopt  # noqa: E402
import test_optax_agreement  # noqa: E402

N_STEPS = 20
B1, B2 = 0.875, 1.0 - 2.0 ** -10      # exactly representable: optax's 1 - b**t is then accurate


def make_params(seed=0):
  """Mixed containers and shapes, a leaf large enough for Adafactor to factor; no zero leaf
  (LAMB/LARS zero-norm tensors: test_lamb_lars_zero_norm_tensors_agree_with_optax)."""
  rng = np.random.RandomState(seed)
  n = lambda shape, s=1.0: jnp.asarray((s * rng.standard_normal(shape)).astype(np.float32))  # noqa: E731
  return {"dense": {"kernel": n((3, 5)), "bias": n((7,), 0.5)},
          "big": [n((130, 129)), n((1,), 0.3)],
          "misc": (n((), 2.0), n((2, 3, 4), 1.5))}


def make_grads(params, seed=1, steps=N_STEPS):
  """``steps`` gradient trees for ``params``: normal draws scaled per leaf by 10^U(-1, 1), in each
  leaf's dtype (complex leaves: independent real and imaginary parts)."""
  rng = np.random.RandomState(seed)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  mags = [float(10.0 ** rng.uniform(-1, 1)) for _ in leaves]

  def draw(p, m):
    x = rng.standard_normal(p.shape)
    if jnp.iscomplexobj(p):
      x = x + 1j * rng.standard_normal(p.shape)
    return jnp.asarray(m * x).astype(p.dtype)
  return [treedef.unflatten([draw(p, m) for p, m in zip(leaves, mags)]) for _ in range(steps)]


@pytest.fixture(scope="module")
def data():
  params = make_params()
  return params, make_grads(params)


def make_zoo(seed=0, bf16=True):
  """``make_params``' tree with complex64 leaves (a matrix large enough for Adafactor to factor
  among them), a bfloat16 leaf (``bf16``), ``None`` and empty containers added; the masks of
  ``CASES`` are prefixes of it."""
  rng = np.random.RandomState(seed)
  c = lambda shape, s: jnp.asarray((s * (rng.standard_normal(shape)  # noqa: E731
                                         + 1j * rng.standard_normal(shape))).astype(np.complex64))
  params = make_params(seed)
  params["big"].append(c((129, 131), 0.5))
  params["misc"] = params["misc"] + (c((4, 3), 0.7), c((), 1.2), None, {})
  if bf16:
    params["misc"] = params["misc"] + (jnp.asarray(rng.standard_normal((5,)), jnp.bfloat16),)
  return params


@pytest.fixture(scope="module")
def zoo():
  params = make_zoo()
  return params, make_grads(params)


@pytest.fixture(scope="module")
def zoo_f32():
  """The zoo without its bfloat16 leaf (``test_agrees_with_optax``: rtol 1e-6 everywhere)."""
  params = make_zoo(bf16=False)
  return params, make_grads(params)


def run_optax(t, params, grads, with_params=True):
  """``run`` for optax's own transformation, the oracle: a jax deprecation raised inside optax's
  code (its accumulators cast complex leaves to a real ``accumulator_dtype``/``mu_dtype``,
  dropping the imaginary part) is optax's to fix, not a failure of ours (pyproject.toml turns
  jax's deprecations into errors)."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Casting from complex to real", DeprecationWarning)
    return run(t, params, grads, with_params)


def run(t, params, grads, with_params=True):
  @jax.jit
  def step(p, s, g):
    u, s = t.update(g, s, p if with_params else None)
    return optax.apply_updates(p, u), s
  state = t.init(params)
  for g in grads:
    params, state = step(params, state, g)
  return params, state


# fusedopt.tx against optax: tighter than the flax-API comparison's default
assert_close = functools.partial(test_optax_agreement.assert_close, rtol=1e-6, atol_rel=1e-6)


ALL_TRUE_BUT_BIG = {"dense": True, "big": False, "misc": True}

# (id, fused factory, optax factory): the same call on both modules.
CASES = [
    ("adamw", lambda m: m.adamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2)),
    ("adamw_mask", lambda m: m.adamw(1e-2, b1=B1, b2=B2, weight_decay=0.1,
                                     mask=ALL_TRUE_BUT_BIG)),
    ("adam_eps_root", lambda m: m.adam(1e-2, b1=B1, b2=B2, eps_root=1e-4)),
    ("nadamw", lambda m: m.nadamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2)),
    ("sgd_momentum", lambda m: m.sgd(1e-2, momentum=0.9)),
    ("sgd_nesterov", lambda m: m.sgd(1e-2, momentum=0.9, nesterov=True)),
    ("lamb_wd", lambda m: m.lamb(1e-2, b1=B1, b2=B2, eps=1e-4, weight_decay=1e-2)),
    ("lamb_mask_eps_root", lambda m: m.lamb(1e-2, b1=B1, b2=B2, eps_root=1e-6, weight_decay=0.1,
                                            mask=ALL_TRUE_BUT_BIG)),
    ("lars_wd_nesterov", lambda m: m.lars(0.1, weight_decay=1e-2, trust_coefficient=0.02,
                                          eps=1e-3, momentum=0.8, nesterov=True)),
    ("lars_masks", lambda m: m.lars(0.1, weight_decay=1e-2, weight_decay_mask=ALL_TRUE_BUT_BIG,
                                    trust_ratio_mask={"dense": False, "big": True,
                                                      "misc": True})),
    ("rmsprop", lambda m: m.rmsprop(1e-2)),
    ("rmsprop_eps_outside", lambda m: m.rmsprop(1e-2, decay=0.875, eps=1e-4,
                                                eps_in_sqrt=False)),
    ("rmsprop_centered", lambda m: m.rmsprop(1e-2, centered=True, initial_scale=0.5)),
    ("adagrad", lambda m: m.adagrad(0.1)),
    # a zero accumulator and a large eps: eps inside the root (and the where(G > 0)) matter
    ("adagrad_zero_init", lambda m: m.adagrad(0.1, initial_accumulator_value=0.0, eps=1e-2)),
    ("rmsprop_momentum", lambda m: m.rmsprop(1e-2, decay=0.875, momentum=0.9)),
    ("rmsprop_nesterov_bias_correction", lambda m: m.rmsprop(1e-2, decay=0.875, momentum=0.5,
                                                             nesterov=True,
                                                             bias_correction=True)),
    # (eps 1e-2: at step 1 a bias-corrected centered v - mg^2 is 0 up to rounding; with eps
    # 1e-8 in the root both optax and fusedopt give NaN for some elements)
    ("rmsprop_centered_bias_correction", lambda m: m.rmsprop(1e-2, decay=0.875, eps=1e-2,
                                                             centered=True,
                                                             bias_correction=True)),
    ("rmsprop_centered_momentum_eps_outside", lambda m: m.rmsprop(
        1e-2, decay=0.875, eps=1e-3, centered=True, momentum=0.9, eps_in_sqrt=False)),
    ("sgd_accumulator_bf16", lambda m: m.sgd(1e-2, momentum=0.5, accumulator_dtype=jnp.bfloat16)),
    ("adam_schedule", lambda m: m.adam(optax.linear_schedule(1e-2, 1e-3, 5), b1=B1, b2=B2)),
    ("adafactor", lambda m: m.adafactor(1e-2)),
    ("adafactor_momentum_wd", lambda m: m.adafactor(1e-2, momentum=0.9, weight_decay_rate=1e-3,
                                                    min_dim_size_to_factor=3,
                                                    weight_decay_mask=ALL_TRUE_BUT_BIG)),
    ("adafactor_unfactored", lambda m: m.adafactor(5e-2, factored=False, clipping_threshold=None,
                                                   multiply_by_parameter_scale=False)),
]


# Centered RMSProp with bias correction: at step 1, v_hat - mg_hat^2 = g^2 - g^2 is 0 in exact
# arithmetic; both compute it as a difference of rounded values, and that difference (a few ulps
# of g^2) sits under the root next to eps: each implementation's float32 rounding is amplified
# by g^2 / eps. Neither is the more accurate one; they agree to 1e-4.
ILL_CONDITIONED = {"rmsprop_centered_bias_correction": dict(rtol=1e-4, atol_rel=1e-4)}


def _split_bf16(tree):
  """(the tree with its bfloat16 leaves set to None, the bfloat16 leaves)."""
  is_bf16 = lambda x: x is not None and jnp.result_type(x) == jnp.bfloat16  # noqa: E731
  rest = jax.tree_util.tree_map(lambda x: None if is_bf16(x) else x, tree)
  return rest, [x for x in jax.tree_util.tree_leaves(tree) if is_bf16(x)]


def run64(make, params, grads):
  """optax's own transformation run in float64 (complex128): the reference where float32 or
  bfloat16 roundings make optax and fusedopt differ (returned as NumPy arrays)."""
  def wide(x):
    return x.astype(jnp.complex128 if jnp.iscomplexobj(x) else jnp.float64)
  with jax.enable_x64(True):
    p64 = jax.tree_util.tree_map(wide, params)
    out, _ = run(make(optax), p64, [jax.tree_util.tree_map(wide, g) for g in grads])
    return jax.tree_util.tree_map(np.asarray, out)


def assert_as_accurate(got, optax32, ref, name, ulps=1.0):
  """Leaf by leaf, fusedopt's float32/bf16 result is at least as close to the float64 reference
  as optax's own (up to ``ulps`` of the leaf's largest magnitude in the leaf's dtype)."""
  for i, (g, o, r) in enumerate(zip(jax.tree_util.tree_leaves(got),
                                    jax.tree_util.tree_leaves(optax32),
                                    jax.tree_util.tree_leaves(ref))):
    dtype = jnp.result_type(g)
    wide = np.complex128 if np.iscomplexobj(r) else np.float64
    g, o, r = (np.asarray(x, wide) for x in (g, o, r))
    real = jnp.finfo(dtype).dtype   # complex64 -> float32
    ulp = float(np.spacing(np.asarray(max(np.max(np.abs(r)), 1e-3), real)))
    err_g, err_o = float(np.max(np.abs(g - r))), float(np.max(np.abs(o - r)))
    assert err_g <= err_o + ulps * ulp, (name, i, dtype, err_g, err_o, ulp)


def assert_close_zoo(got, expected, name, ref=None, **tol):
  """float32/complex64 leaves within ``tol`` (default rtol 1e-6) of optax's. bfloat16 leaves:
  optax computes a bf16 leaf's moments and update in bf16 and rounds at every operation,
  fusedopt in float32 rounding once per stored value; after 20 steps of rounded bf16 updates
  they part by several ulps, so there fusedopt must be at least as close as optax to the
  float64 reference ``ref`` (``run64``)."""
  rest_g, bf_g = _split_bf16(got)
  rest_e, bf_e = _split_bf16(expected)
  assert_close(rest_g, rest_e, name, **tol)
  assert len(bf_g) == len(bf_e)
  if ref is not None:
    bf_r = [r for r, e in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(expected))
            if jnp.result_type(e) == jnp.bfloat16]
    assert_as_accurate(bf_g, bf_e, bf_r, name)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_agrees_with_optax(case, zoo_f32):
  """optax's state structure (tree, shapes, dtypes) exactly, and the same params and state after
  20 steps on a tree of float32 and complex64 leaves with None and empty subtrees (a bfloat16
  leaf: ``test_defaults_agree_with_optax``)."""
  name, make = case
  params, grads = zoo_f32
  expected, expected_state = run_optax(make(optax), params, grads)
  got, state = run(make(tx), params, grads)
  assert_same_structure(state, expected_state)
  assert_close(got, expected, name, **ILL_CONDITIONED.get(name, {}))
  # optax's own state, field by field: counts exactly, moments/traces as closely as the params
  for a, e in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(expected_state)):
    if jnp.issubdtype(e.dtype, jnp.integer):
      assert int(a) == int(e) == N_STEPS, name
  if name == "sgd_accumulator_bf16":   # optax rounds g + b t in bfloat16, fusedopt once: 1 ulp
    assert_close(state, expected_state, name, rtol=2 ** -7, atol_rel=2 ** -8)
  else:
    tol = ILL_CONDITIONED.get(name, dict(rtol=2e-6, atol_rel=2e-6))
    assert_close(state, expected_state, name, **tol)


def assert_same_structure(state, expected):
  """optax's state structure exactly: the tree, every leaf's shape and dtype."""
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(expected)
  for a, e in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(expected)):
    assert (jnp.shape(a), jnp.result_type(a)) == (jnp.shape(e), jnp.result_type(e))


DEFAULT_BETAS = [
    ("adamw", lambda m: m.adamw(1e-2, weight_decay=1e-2)),
    ("nadamw", lambda m: m.nadamw(1e-2)),
    ("lamb", lambda m: m.lamb(1e-2)),
    ("rmsprop_bias_correction", lambda m: m.rmsprop(1e-2, bias_correction=True, momentum=0.9)),
]


@pytest.mark.parametrize("case", DEFAULT_BETAS, ids=[c[0] for c in DEFAULT_BETAS])
def test_defaults_agree_with_optax(case, zoo):
  """optax's default betas (0.9, 0.999) over 20 steps on the zoo with its bfloat16 leaf:
  optax's float32 bias corrections (below) and the rounding of the parameters separate the two
  by up to ~1e-5; the bfloat16 leaf at least as close to the float64 run as optax's."""
  name, make = case
  params, grads = zoo
  expected, _ = run(make(optax), params, grads)
  got, _ = run(make(tx), params, grads)
  assert_close_zoo(got, expected, name, ref=run64(make, params, grads), rtol=2e-5,
                   atol_rel=2e-5)


BIAS_CORRECTED = [
    ("adam", lambda m: m.adam(1e-2)),
    ("nadam", lambda m: m.nadam(1e-2)),
    ("rmsprop_bias_correction", lambda m: m.rmsprop(1e-2, bias_correction=True)),
]


@pytest.mark.parametrize("case", BIAS_CORRECTED, ids=[c[0] for c in BIAS_CORRECTED])
def test_bias_correction_more_accurate_than_optax(case, zoo):
  """The update itself, from one state, against float64: optax computes ``1 - b**t`` in float32
  from ``b`` rounded to float32 (``1 - 0.999`` carries a relative error of 1.3e-5), fusedopt from
  the exact ``b``. At steps 1, 2, 5 and 20 of optax's own float32 trajectory, tx's update (with
  ``params=None``: computed from ``p = 0``, so no parameter rounding enters) and optax's are
  compared with optax's update run in float64 from the same state: fusedopt's within 1e-6 of
  the largest update of each leaf, and at least as close as optax's."""
  name, make = case
  params, grads = zoo
  ref_t, t = make(optax), make(tx)
  wide = lambda x: x.astype(  # noqa: E731
      jnp.complex128 if jnp.iscomplexobj(x) else jnp.float64) if jnp.issubdtype(
          jnp.result_type(x), jnp.inexact) else x
  state, p = ref_t.init(params), params
  worst = {"tx": 0.0, "optax": 0.0}
  update_optax, update_tx = jax.jit(ref_t.update), jax.jit(t.update)
  update64 = jax.jit(lambda g, s: ref_t.update(jax.tree_util.tree_map(wide, g),
                                               jax.tree_util.tree_map(wide, s))[0])
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *ref_t.update(g, s, p)))
  for k, g in enumerate(grads):
    if k + 1 in (1, 2, 5, 20):
      u_optax, _ = update_optax(g, state)
      u_tx, _ = update_tx(g, state)
      with jax.enable_x64(True):
        u64 = jax.tree_util.tree_map(np.asarray, update64(g, state))
      for x_tx, x_o, r, leaf in zip(*(jax.tree_util.tree_leaves(x) for x in (u_tx, u_optax,
                                                                              u64, p))):
        if jnp.result_type(leaf) == jnp.bfloat16:
          continue   # rounded to bf16 either way
        wide_np = np.complex128 if np.iscomplexobj(r) else np.float64
        scale = float(np.max(np.abs(r)))
        for key, x in (("tx", x_tx), ("optax", x_o)):
          err = float(np.max(np.abs(np.asarray(x, wide_np) - r))) / scale
          worst[key] = max(worst[key], err)
    p, state = step(p, state, g)
  assert worst["tx"] <= 1e-6, (name, worst)
  print(name, worst)
  assert worst["tx"] <= worst["optax"], (name, worst)


@pytest.mark.parametrize("backend", ["jnp", "pallas_interpret"])
def test_other_backends(backend, data):
  params, grads = data
  grads = grads[:2]
  makers = [lambda m, **k: m.lamb(1e-2, b1=B1, b2=B2, weight_decay=1e-2, **k)]
  if backend == "jnp":
    makers.append(lambda m, **k: m.adamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2, **k))
  for make in makers:
    expected, _ = run(make(optax), params, grads)
    got, _ = run(make(tx, backend=backend), params, grads)
    assert_close(got, expected, backend)


def test_params_optional_where_unused(data):
  params, grads = data
  for make in (lambda m: m.adam(1e-2, b1=B1, b2=B2), lambda m: m.sgd(1e-2),
               lambda m: m.rmsprop(1e-2)):
    expected, _ = run(make(optax), params, grads)
    got, _ = run(make(tx), params, grads, with_params=False)
    assert_close(got, expected, "params=None")


@pytest.mark.parametrize("make", [lambda: tx.adamw(1e-3), lambda: tx.lamb(1e-3),
                                  lambda: tx.lars(1e-3), lambda: tx.adafactor(1e-3)])
def test_params_required(make, data):
  params, grads = data
  t = make()
  with pytest.raises(ValueError, match="update\\(grads, state, params\\)"):
    t.update(grads[0], t.init(params))


# LAMB and LARS on tensors whose trust-ratio norms are zero (a zero-initialised tensor, zero grads
# on a nonzero tensor, zero param with zero grad): optax's scale_by_trust_ratio makes the ratio 1
# there, as fusedopt does (tests/test_numerics.py: make_degenerate has the cases).
ZERO_NORM_CASES = [
    ("lamb", lambda m: m.lamb(5e-2, b1=B1, b2=B2)),
    ("lars", lambda m: m.lars(0.5)),                  # wd = eps = 0: 0/0 without the clamp
    ("lars_wd_nesterov", lambda m: m.lars(0.5, weight_decay=1e-3, eps=1e-5, nesterov=True)),
]


@pytest.mark.parametrize("case", ZERO_NORM_CASES, ids=[c[0] for c in ZERO_NORM_CASES])
def test_lamb_lars_zero_norm_tensors_agree_with_optax(case):
  import test_numerics  # pylint: disable=import-outside-toplevel
  name, make = case
  params, grads = test_numerics.make_degenerate()
  expected, _ = run(make(optax), params, grads)
  got, _ = run(make(tx), params, grads)
  assert_close(got, expected, name)
  assert np.all(np.asarray(got["bias"]) != 0)          # the zero-initialised tensor trains


# ----------------------------------------------------------------------------- precision

@pytest.mark.parametrize("backend", ["auto", "jnp", "pallas_interpret"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_apply_updates_reproduces_fused_params(dtype, backend, data):
  """``p + (p' - p) == p'`` bitwise wherever p'/p is in [1/2, 2] (Sterbenz), p' the fused
  optimizer's own result; elsewhere within 1.5 ulp of max(|p|, |p'|). float32 deltas come
  straight from the kernels (``elementwise.as_delta``), bf16 ones after the param rounding."""
  params, grads = data
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  t = tx.adamw(0.05, weight_decay=1e-2, backend=backend)
  u, _ = jax.jit(t.update)(grads[0], t.init(params), params)
  got = optax.apply_updates(params, u)
  opt = fusedopt.Adam(0.05, weight_decay=1e-2, backend=backend).create(params)
  want = opt.apply_gradient(grads[0]).target
  n_sterbenz = n_total = 0
  for p, g, w in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(got),
                     jax.tree_util.tree_leaves(want)):
    p, g, w = (np.asarray(x, np.float64) for x in (p, g, w))
    ratio = w / np.where(p == 0, 1, p)
    sterbenz = (p != 0) & (ratio >= 0.5) & (ratio <= 2)
    ulp = np.spacing(np.maximum(np.abs(p), np.abs(w)).astype(dtype)).astype(np.float64)
    if backend in ("jnp", "auto"):   # (auto: jnp for optax's update, registry.auto_leaf_choice)
      # tx's jnp path runs each leaf as its own XLA fusion with optax's per-leaf state, the
      # Optimizer's the flat buffers: XLA:CPU contracts a*b+c into FMAs differently (1 ulp of
      # the update, up to 2 of p'; outside Sterbenz's range up to 4 ulp of an update as large
      # as p with jax 0.12's XLA, 0.91 of this bound's 2-ulp form with jax 0.10's)
      assert np.all(np.abs(g - w)[sterbenz] <= 2 * ulp[sterbenz])
    else:
      np.testing.assert_array_equal(g[sterbenz], w[sterbenz])
    tol = 1.5 * ulp
    if backend in ("jnp", "auto"):   # (+ 3 ulp of the update itself: FMA contraction, above)
      tol = tol + 3 * np.spacing(np.abs(w - p).astype(dtype)).astype(np.float64)
    assert np.all(np.abs(g - w)[~sterbenz] <= tol[~sterbenz])
    n_sterbenz, n_total = n_sterbenz + int(np.sum(sterbenz)), n_total + p.size
  assert 0.8 * n_total < n_sterbenz < n_total      # both cases occur


def test_update_never_copies_the_params(data):
  """optax does not donate the params to ``update``: kernels that wrote p' over p would make XLA
  copy every param first. The float32 deltas go to fresh buffers instead, and the state leaves
  are updated in place: a donated train step copies nothing of a param's size. (Donate the
  params too: jax pairs a donated buffer with the first output of its shape, and the new params
  come first -- donating the state alone hands the moments' buffers to the params.)"""
  params, grads = data
  t = tx.adamw(0.05, weight_decay=1e-2)

  def step(p, s, g):
    u, s = t.update(g, s, p)
    return optax.apply_updates(p, u), s
  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, t.init(params), grads[0]).compile().as_text()
  sizes = {int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params)}
  copies = [int(np.prod([int(d) for d in m.split(",") if d]))
            for m in re.findall(r"= f32\[([0-9,]*)\]\{[^}]*\} copy\(", hlo)]
  assert not [c for c in copies if c in sizes and c > 1], copies


# ----------------------------------------------------------------------------- schedules

def test_schedules(data):
  params, grads = data
  linear = optax.linear_schedule(1e-2, 1e-3, 8)
  cosine = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10)
  for make in (lambda m: m.adamw(linear, b1=B1, b2=B2, weight_decay=lambda c: 1e-2 * c),
               lambda m: m.sgd(cosine, momentum=0.9)):
    expected, _ = run(make(optax), params, grads)
    got, _ = run(make(tx), params, grads)
    assert_close(got, expected, "schedule")


def test_inject_hyperparams_no_retrace(data):
  params, grads = data
  traces = []

  def make(m):
    return optax.inject_hyperparams(m.adamw)(learning_rate=1e-2, b1=B1, b2=B2,
                                             weight_decay=1e-2)

  def stepper(t):
    def step(p, s, g):
      traces.append(1)
      u, s = t.update(g, s, p)
      return optax.apply_updates(p, u), s
    return jax.jit(step)

  results = {}
  for name, m in (("optax", optax), ("tx", tx)):
    t = make(m)
    step, state, p = stepper(t), t.init(params), params
    for i, g in enumerate(grads):
      hp = dict(state.hyperparams, learning_rate=jnp.asarray(1e-2 / (1 + i), jnp.float32))
      state = state._replace(hyperparams=hp)
      p, state = step(p, state, g)
    results[name] = p
    assert len(traces) == 1, f"{name}: retraced"
    traces.clear()
  assert_same_structure(state, make(optax).init(params))
  assert_close(results["tx"], results["optax"], "inject_hyperparams")


def test_inject_hyperparams_all_optimizers(data):
  """Every numeric argument arrives as an array (a tracer inside jit): nothing must need it
  concrete except Adafactor's shape-deciding ``min_dim_size_to_factor``."""
  params, grads = data
  grads = grads[:2]
  for make in (lambda m: optax.inject_hyperparams(m.sgd)(1e-2, momentum=0.9),
               lambda m: optax.inject_hyperparams(m.lamb)(1e-2, b1=B1, b2=B2),
               lambda m: optax.inject_hyperparams(m.lars)(0.1, weight_decay=1e-3),
               lambda m: optax.inject_hyperparams(
                   m.adafactor, static_args=("min_dim_size_to_factor",))(1e-2)):
    expected, _ = run(make(optax), params, grads)
    got, _ = run(make(tx), params, grads)
    assert_close(got, expected, "inject_hyperparams")


# ----------------------------------------------------------------------------- clipping

@pytest.mark.parametrize("max_norm", [1.0, 1e6], ids=["clipping", "not_clipping"])
def test_fused_clip_equals_optax_chain(max_norm, data):
  params, grads = data
  expected, _ = run(optax.chain(optax.clip_by_global_norm(max_norm),
                                optax.adamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2)),
                    params, grads)
  chained = tx.chain(optax.clip_by_global_norm(max_norm),
                     tx.adamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2))
  assert chained.update.spec.clip == max_norm            # folded, not an optax.chain
  got, state = run(chained, params, grads)
  assert_same_structure(state, optax.chain(optax.clip_by_global_norm(max_norm),
                                           optax.adamw(1e-2)).init(params))
  assert_close(got, expected, "tx.chain(clip, adamw)")
  got, _ = run(tx.adamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2, clip_global_norm=max_norm),
               params, grads)
  assert_close(got, expected, "adamw(clip_global_norm=)")


def test_fused_clip_lars_adafactor(data):
  params, grads = data
  grads = grads[:2]
  # (LAMB's two guarded passes: tests/test_flax_integration.py, clip_lamb)
  for make in (lambda m: m.lars(0.1, weight_decay=1e-2),
               lambda m: m.adafactor(1e-2, momentum=0.5)):
    expected, _ = run(optax.chain(optax.clip_by_global_norm(2.0), make(optax)), params, grads)
    got, _ = run(tx.chain(optax.clip_by_global_norm(2.0), make(tx)), params, grads)
    assert_close(got, expected, "clip")


def test_chain_keeps_other_transforms(data):
  params, grads = data
  expected, _ = run(optax.chain(optax.scale(0.5), optax.clip_by_global_norm(1.0),
                                optax.adamw(1e-2, b1=B1, b2=B2)), params, grads)
  got, state = run(tx.chain(optax.scale(0.5), optax.clip_by_global_norm(1.0),
                            tx.adamw(1e-2, b1=B1, b2=B2)), params, grads)
  assert_same_structure(state, optax.chain(optax.scale(0.5), optax.clip_by_global_norm(1.0),
                                           optax.adamw(1e-2)).init(params))
  assert_close(got, expected, "chain")


def test_skip_nonfinite(data):
  params, grads = data
  t = tx.adamw(1e-2, clip_global_norm=1.0, skip_nonfinite=True)
  state = t.init(params)
  step = jax.jit(t.update)
  u, state = step(grads[0], state, params)
  bad = jax.tree_util.tree_map(lambda g: g, grads[1])
  bad["dense"]["bias"] = bad["dense"]["bias"].at[0].set(jnp.nan)
  u2, state2 = step(bad, state, params)
  assert int(state2[0].count) == int(state[0].count) == 1
  assert all(bool(jnp.all(x == 0)) for x in jax.tree_util.tree_leaves(u2))
  for a, b in zip(jax.tree_util.tree_leaves(state2), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the one-pass step skips the same way: params and state bitwise unchanged
  p3, state3 = jax.jit(lambda p, s, g: tx.update_and_apply(t, g, s, p))(params, state, bad)
  for a, b in zip(jax.tree_util.tree_leaves((p3, state3)),
                  jax.tree_util.tree_leaves((params, state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- jit, errors, state

def test_jit_donation_and_scan(data):
  params, grads = data
  t = tx.adamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2)
  expected, _ = run(t, params, grads)

  def step(p, s, g):
    u, s = t.update(g, s, p)
    return optax.apply_updates(p, u), s
  donated = jax.jit(step, donate_argnums=(0, 1))
  p = jax.tree_util.tree_map(jnp.copy, params)
  s = t.init(p)
  for g in grads:
    p, s = donated(p, s, g)
  assert_close(p, expected, "donated")
  stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *grads)
  (p, s), _ = jax.jit(lambda p, s: jax.lax.scan(
      lambda c, g: (step(*c, g), None), (p, s), stacked))(params, t.init(params))
  assert_close(p, expected, "scan")


def test_bad_hyper_parameters():
  with pytest.raises(fusedopt.HyperParamError, match="learning_rate"):
    tx.adamw(-1e-3)
  with pytest.raises(fusedopt.HyperParamError, match="b1"):
    tx.adam(1e-3, b1=1.5)
  with pytest.raises(fusedopt.HyperParamError, match="momentum"):
    tx.sgd(1e-3, momentum=-0.1)
  with pytest.raises(fusedopt.HyperParamError, match="learning_rate"):
    tx.lamb("fast")
  with pytest.raises(fusedopt.HyperParamError, match="clip_global_norm"):
    tx.adamw(1e-3, clip_global_norm=0.0)
  with pytest.raises(fusedopt.HyperParamError, match="no step count"):
    tx.sgd(1e-3, momentum=lambda count: 0.9)     # optax's sgd state has no count
  with pytest.raises(ValueError, match="'grad_ema'"):
    tx.adam(1e-3, state_dtype={"grad_ema": jnp.bfloat16})   # optax's names: mu, nu
  with pytest.raises(fusedopt.HyperParamError, match="floating"):
    tx.adam(1e-3, state_dtype=jnp.int32)   # (jnp.int8 is the quantized "int8")
  with pytest.raises(ValueError, match="backend"):
    tx.adamw(1e-3, backend="cuda")


def test_wrong_tree_is_a_clear_error(data):
  params, grads = data
  t = tx.adamw(1e-3)
  with pytest.raises(fusedopt.LayoutError):
    t.update({"x": jnp.ones(3)}, t.init(params), {"x": jnp.ones(3)})


def test_state_serialization_roundtrip(data):
  from flax import serialization  # pylint: disable=import-outside-toplevel
  params, grads = data
  for t in (tx.adamw(1e-2), tx.adafactor(1e-2, momentum=0.9)):
    _, state = run(t, params, grads[:2])
    blob = serialization.to_bytes(state)
    restored = serialization.from_bytes(t.init(params), blob)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  sd = serialization.to_state_dict(run(tx.adamw(1e-2), params, grads[:1])[1])
  assert jax.tree_util.tree_structure(sd) == jax.tree_util.tree_structure(
      serialization.to_state_dict(optax.adamw(1e-2).init(params)))       # optax's state dict


def test_import_fusedopt_does_not_import_optax():
  code = "import sys, fusedopt; assert 'optax' not in sys.modules, 'optax imported'"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env,
                 capture_output=True)


@pytest.mark.parametrize("backend", [b for b in fusedopt.available_backends()
                                     if b in ("jnp", "native", "pallas_interpret")])
def test_adamw_mu_dtype_as_optax(backend):
  """``mu_dtype=bfloat16`` (optax's): the first moment is stored in bfloat16, the second stays
  float32. Each of 5 steps, taken by both from the same state (optax's state set to ours), gives
  optax.adamw(mu_dtype=bfloat16)'s update and stored moment up to optax's bfloat16 product
  ``b1 * mu`` (fusedopt computes the new moment in float32, uses it, then rounds it once)."""
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=(40, 30)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(30,)), jnp.float32)}
  # dyadic betas: optax's float32 bias correction is then exact too (module docstring)
  kw = dict(b1=0.875, b2=1 - 2 ** -10, weight_decay=1e-2, mu_dtype=jnp.bfloat16)
  ours = tx.adamw(1e-2, backend=backend, **kw)
  ref = optax.adamw(1e-2, **kw)
  s1 = ours.init(params)
  assert_same_structure(s1, ref.init(params))
  assert {np.dtype(x.dtype).name for x in jax.tree_util.tree_leaves(s1[0].mu)} == {"bfloat16"}
  assert {np.dtype(x.dtype).name for x in jax.tree_util.tree_leaves(s1[0].nu)} == {"float32"}
  p = params
  for _ in range(5):
    g = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                               params)
    u1, new1 = ours.update(g, s1, p)
    u2, new2 = ref.update(g, s1, p)          # the same state: optax's structure
    for a, b in zip(jax.tree_util.tree_leaves(u1), jax.tree_util.tree_leaves(u2)):
      # optax computes ``b1 * mu`` in bfloat16 (a Python float times a bfloat16 array stays
      # bfloat16), fusedopt in float32: the new moments differ by up to a bfloat16 rounding of
      # that term, 2^-9 of it; bounded here by 2^-8 of the leaf's largest update
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6,
                                 atol=2 ** -8 * float(np.max(np.abs(np.asarray(b)))))
    assert_same_structure(new1, new2)
    for k in params:
      m1, m2 = (np.asarray(x[0].mu[k], np.float32) for x in (new1, new2))
      np.testing.assert_allclose(m1, m2, rtol=2 ** -7, atol=2 ** -8 * float(np.max(np.abs(m2))))
    p, s1 = optax.apply_updates(p, u1), new1


def test_state_dtype_per_field():
  """``state_dtype={field: dtype}`` stores each named field in its dtype (the others float32),
  on every backend the same numbers as jnp; an unknown field is an error naming it."""
  params = {"w": jnp.linspace(-1.0, 1.0, 2048, dtype=jnp.float32).reshape(32, 64)}
  g = jax.tree_util.tree_map(lambda x: 0.1 * x + 0.01, params)
  outs = {}
  for backend in [b for b in fusedopt.available_backends()
                  if b in ("jnp", "native", "pallas_interpret")]:
    opt = fusedopt.Adam(0.1, state_dtype={"grad_ema": jnp.bfloat16},
                        backend=backend).create(params)
    opt = opt.apply_gradient(g).apply_gradient(g)
    st = opt.state.param_states
    assert st.fields["grad_ema"][0].dtype == jnp.bfloat16
    assert st.fields["grad_sq_ema"][0].dtype == jnp.float32
    outs[backend] = (np.asarray(opt.target["w"]), np.asarray(st["w"].grad_ema, np.float32))
  for b, (p, m) in outs.items():
    np.testing.assert_allclose(p, outs["jnp"][0], rtol=1e-6, atol=1e-7, err_msg=b)
    np.testing.assert_allclose(m, outs["jnp"][1], rtol=2 ** -8, err_msg=b)
  with pytest.raises(ValueError, match="grad_emma"):
    fusedopt.Adam(0.1, state_dtype={"grad_emma": jnp.bfloat16}).create(params)
  with pytest.raises(ValueError, match="floating"):
    fusedopt.Adam(0.1, state_dtype={"grad_ema": jnp.int32})


# ----------------------------------------------------------------------------- optax's state

STATE_CASES = [c for c in CASES if c[0] in (
    "adamw_mask", "sgd_nesterov", "lamb_wd", "lars_masks", "rmsprop_momentum", "adagrad",
    "adafactor_momentum_wd")]


@pytest.mark.parametrize("case", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_empty_subtrees_none_and_scalars(case):
  """A tree with ``None`` leaves, empty containers and scalars: optax's state structure, the
  same steps."""
  name, make = case
  rng = np.random.RandomState(5)
  params = {"a": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32), "none": None,
            "empty": {}, "nested": [(), {"s": jnp.float32(1.5)}],
            "big": jnp.asarray(rng.standard_normal((130, 129)), jnp.float32)}
  grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(jnp.shape(x)),
                                                        jnp.float32), params)
           for _ in range(3)]
  mask = {"a": True, "none": None, "empty": {}, "nested": [(), {"s": True}], "big": False}
  fix = lambda m: (lambda mod: m(_Masked(mod, mask)))   # noqa: E731
  expected, expected_state = run(fix(make)(optax), params, grads)
  got, state = run(fix(make)(tx), params, grads)
  assert_same_structure(state, expected_state)
  assert_close(got, expected, name)


class _Masked:
  """``module.<alias>`` with the CASES' mask (a prefix of the old tree) replaced by ``mask``."""

  def __init__(self, module, mask):
    self.module, self.mask = module, mask

  def __getattr__(self, alias):
    def make(*a, **k):
      for key in ("mask", "weight_decay_mask"):
        if k.get(key) is ALL_TRUE_BUT_BIG:
          k[key] = self.mask
      if k.get("trust_ratio_mask") not in (None, True):
        k["trust_ratio_mask"] = self.mask
      return getattr(self.module, alias)(*a, **k)
    return make


def test_empty_tree():
  for t in (tx.adamw(1e-2), tx.sgd(1e-2, momentum=0.9), tx.lamb(1e-2), tx.adafactor(1e-2)):
    for params in ({}, {"a": None, "b": []}):
      state = t.init(params)
      u, new = jax.jit(t.update)(params, state, params)
      assert u == params
      assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)


def test_tree_map_params(data):
  """``optax.tree_map_params`` sees the params-shaped fields: e.g. partition specs, or a dtype
  cast of the moments (and the cast state keeps training)."""
  params, grads = data
  t = tx.adamw(1e-2, b1=B1, b2=B2)
  state = t.init(params)
  specs = optax.tree_map_params(t, lambda p: "P" + str(p.ndim), state,
                                transform_non_params=lambda _: None)
  assert specs[0].mu["dense"]["kernel"] == "P2" and specs[0].nu["misc"][0] == "P0"
  assert specs[0].count is None
  half = optax.tree_map_params(t, lambda p: p.astype(jnp.bfloat16), state)
  assert half[0].mu["big"][0].dtype == jnp.bfloat16
  u, new = jax.jit(t.update)(grads[0], half, params)
  assert new[0].mu["big"][0].dtype == jnp.bfloat16
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(u))


def test_checkpoint_interchange_with_optax(tmp_path, data):
  """optax state -> orbax -> fusedopt.tx -> a step -> orbax -> optax, bitwise: the restored
  state is what was saved, and the fused step from optax's state equals optax's step."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  params, grads = data
  make = lambda m: m.adamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2)   # noqa: E731
  ref, ours = make(optax), make(tx)
  _, ostate = run(ref, params, grads[:3])
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "optax", ostate)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "optax", ours.init(params))
  assert_same_structure(restored, ostate)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(ostate)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  u_ours, s_ours = jax.jit(ours.update)(grads[3], restored, params)
  u_ref, s_ref = jax.jit(ref.update)(grads[3], ostate, params)
  assert_close(u_ours, u_ref, "update from optax's state")
  ckpt.save(tmp_path / "tx", s_ours)
  ckpt.wait_until_finished()
  back = ckpt.restore(tmp_path / "tx", ref.init(params))
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(s_ours)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, s_next = jax.jit(ref.update)(grads[4], back, params)   # optax continues from it
  assert_same_structure(s_next, s_ref)


# ----------------------------------------------------------------------------- one pass

@pytest.mark.parametrize("case", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_update_and_apply_equals_two_calls(case, data):
  """``tx.update_and_apply``: the kernels write ``p'`` itself; the same state and params as
  ``update`` + ``apply_updates`` (float32: bitwise where ``p/2 <= p' <= 2p``, Sterbenz)."""
  name, make = case
  params, grads = data
  t = make(tx)
  two = run(t, params, grads[:3])

  @jax.jit
  def step(p, s, g):
    return tx.update_and_apply(t, g, s, p)
  p, s = params, t.init(params)
  for g in grads[:3]:
    p, s = step(p, s, g)
  assert_same_structure(s, two[1])
  assert_close(p, two[0], name)
  assert_close(s, two[1], name)


def test_update_and_apply_is_in_place(data):
  """Donated params and state: the compiled one-pass step copies no param-sized buffer and
  aliases every param and moment to its output (written where it is)."""
  params, grads = data
  t = tx.adamw(0.05, weight_decay=1e-2)
  lowered = jax.jit(lambda p, s, g: tx.update_and_apply(t, g, s, p),
                    donate_argnums=(0, 1)).lower(params, t.init(params), grads[0])
  hlo = lowered.compile().as_text()
  sizes = {int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params)}
  copies = [int(np.prod([int(d) for d in m.split(",") if d]))
            for m in re.findall(r"= f32\[([0-9,]*)\]\{[^}]*\} copy\(", hlo)]
  assert not [c for c in copies if c in sizes and c > 1], copies
  n_leaves = len(jax.tree_util.tree_leaves(params))
  header = hlo.splitlines()[0]    # HloModule ..., input_output_alias={ {0}: (1, {}, may-alias), ...
  assert header.count("may-alias") + header.count("must-alias") >= 3 * n_leaves, header


@pytest.mark.skipif("native" not in fusedopt.available_backends(), reason="no C++ compiler")
def test_auto_picks_native_for_one_pass_jnp_for_two_calls(data):
  """``auto`` with optax's state on a one-device CPU: the native kernel for the in-place
  one-pass step; jnp for optax's ``update``, whose per-leaf fusions XLA merges with
  ``apply_updates`` (a kernel would write ``p' - p`` to fresh memory each step)."""
  params, grads = data
  t = tx.adamw(0.05, weight_decay=1e-2)
  s = t.init(params)

  def two(p, s, g):
    u, s = t.update(g, s, p)
    return optax.apply_updates(p, u), s
  one = jax.jit(lambda p, s, g: tx.update_and_apply(t, g, s, p)).lower(params, s, grads[0])
  assert "custom-call" in one.compile().as_text()
  assert "custom-call" not in jax.jit(two).lower(params, s, grads[0]).compile().as_text()


def test_update_and_apply_falls_back_for_optax(data):
  params, grads = data
  t = optax.adam(1e-2)
  p, s = tx.update_and_apply(t, grads[0], t.init(params), params)
  u, s2 = t.update(grads[0], t.init(params), params)
  assert_close(p, optax.apply_updates(params, u), "fallback")


# ----------------------------------------------------------------------------- composition

def _label_tree(params):
  return {"dense": "adam", "big": "sgd", "misc": "adam"}


COMPOSITIONS = [
    ("multi_steps", lambda m: optax.MultiSteps(m.adamw(1e-2, b1=B1, b2=B2), every_k_schedule=2)),
    ("apply_if_finite", lambda m: optax.apply_if_finite(m.adamw(1e-2, b1=B1, b2=B2), 3)),
    ("masked", lambda m: optax.masked(m.sgd(1e-2, momentum=0.9), ALL_TRUE_BUT_BIG)),
    ("multi_transform", lambda m: optax.multi_transform(
        {"adam": m.adamw(1e-2, b1=B1, b2=B2), "sgd": m.sgd(1e-2, momentum=0.9)}, _label_tree)),
    ("chain_optax_first", lambda m: optax.chain(optax.clip(1.0), m.lamb(1e-2, b1=B1, b2=B2))),
    ("inject_schedule", lambda m: optax.inject_hyperparams(m.rmsprop)(
        learning_rate=optax.linear_schedule(1e-2, 1e-3, 5), momentum=0.5)),
]


@pytest.mark.parametrize("case", COMPOSITIONS, ids=[c[0] for c in COMPOSITIONS])
def test_optax_composition(case, data):
  """optax's wrappers around fusedopt.tx: the same state structure and values as around
  optax's own alias (MultiSteps accumulates, apply_if_finite, masked / multi_transform hand
  the optimizer a tree with optax's MaskedNode placeholders)."""
  name, make = case
  params, grads = data
  grads = [dict(g) for g in grads[:6]]
  if name == "apply_if_finite":   # one non-finite step, skipped by both
    grads[2] = jax.tree_util.tree_map(lambda x: x * jnp.nan, grads[2])
  expected, expected_state = run_optax(make(optax), params, grads)
  got, state = run(make(tx), params, grads)
  assert_same_structure(state, expected_state)
  assert_close(got, expected, name)
  assert_close(state, expected_state, name, rtol=2e-6, atol_rel=2e-6)


def test_reduce_on_plateau(data):
  """``optax.contrib.reduce_on_plateau`` after a fused optimizer: the loss arrives as an extra
  argument, the scale applies to the fused updates."""
  params, grads = data
  out = {}
  for m in (optax, tx):
    t = optax.chain(m.adamw(1e-2, b1=B1, b2=B2),
                    optax.contrib.reduce_on_plateau(factor=0.5, patience=1, accumulation_size=1))
    s, p = t.init(params), params
    step = jax.jit(lambda p, s, g, v: t.update(g, s, p, value=v))
    for i, g in enumerate(grads[:6]):
      u, s = step(p, s, g, jnp.float32(1.0))   # a flat loss: the scale drops
      p = optax.apply_updates(p, u)
    out[m.__name__] = (p, s)
  assert float(out["fusedopt.tx"][1][1].scale) == float(out["optax"][1][1].scale) < 1.0
  assert_close(out["fusedopt.tx"][0], out["optax"][0], "reduce_on_plateau")



def test_complex_params_in_the_flax_api_are_a_clear_error():
  """The flax.optim API keeps its state in flat real buffers: a complex leaf is a LayoutError
  naming the leaf and its dtype (fusedopt.tx takes complex leaves)."""
  params = {"re": jnp.ones(3), "z": jnp.ones(3, jnp.complex64)}
  with pytest.raises(fusedopt.LayoutError, match=r"\['z'\].*complex64"):
    fusedopt.Adam(1e-2).create(params)
