"""The optimizers added after flax.optim (issue 19) in both APIs: Adan (Xie et al. 2022, optax's
form), AdEMAMix (Pagliardini et al. 2024) and ADOPT (Taniguchi et al. 2024). ``fusedopt.<Name>``
against the float64 reference (tests/reference.py) on the CPU backends and Pallas' interpreter;
``fusedopt.tx.<name>`` against optax's (``optax.adan``, ``optax.contrib.ademamix``,
``optax.contrib.adopt``). Lion has its own file (test_lion.py: its sign needs other tolerances).

Each rule (``ADAN_RULE``, ``ADEMAMIX_RULE``, ``adopt_rule``'s) is also in the shared kernel
tiers: bitwise native vs NumPy (test_native_bitwise.py), Pallas CUDA/TPU lowering
(test_pallas_lowering.py), Triton sm_80/sm_90 compiles (test_triton_kernels.py), the Triton
interpreter (triton_cases.py).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import fusedopt as optim
import reference
from cases import ulps_error
from test_lion import _grads, _tree   # test_lion's trees: cases.SHAPES, one leaf per shape
from test_numerics import is_bias, is_kernel, make_dict_params

LR = 0.01


# non-default hyper-parameters of each (every beta moved, weight decay on)
OTHER_HP = {
    "Adan": {"weight_decay": 0.1, "beta1": 0.9, "beta2": 0.8, "beta3": 0.95, "eps_root": 0.0},
    "AdEMAMix": {"weight_decay": 0.1, "beta1": 0.8, "beta2": 0.95, "beta3": 0.99, "alpha": 2.0,
                 "eps_root": 1e-8},
    "ADOPT": {"beta1": 0.8, "beta2": 0.95, "eps": 1e-3, "nesterov": True},
}
# no weight decay, beta3 or eps_root (optax's ADOPT has none either)
NO_WEIGHT_DECAY = ("ADOPT",)
NAMES = tuple(OTHER_HP)


@pytest.mark.parametrize("backend", ["jnp", "native"])
@pytest.mark.parametrize("other", [False, True], ids=["defaults", "other_hp"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(name, other, backend):
  """Six steps against the paper's algorithm in float64 NumPy: params within 4 ulps of the
  update's terms, every state field within float32 rounding."""
  if backend not in optim.available_backends():
    pytest.skip(f"{backend} not available")
  kw = OTHER_HP[name] if other else {}
  cls = getattr(optim, name)
  tree, grads = _tree(), _grads(_tree())
  opt = cls(learning_rate=LR, backend=backend, **kw).create(tree)
  step = jax.jit(lambda o, g: o.apply_gradient(g))
  for g in grads:
    opt = step(opt, g)
  hp = dict(learning_rate=LR, **kw)
  want, _ = reference.run(name, hp, tree, grads)
  for path, got in jax.tree_util.tree_leaves_with_path(opt.target):
    k = path[0].key
    err = ulps_error(np.asarray(got), want[k].astype(np.float32), np.asarray(tree[k]),
                     step_size=LR)
    assert err.size == 0 or float(np.max(err)) <= 4, (k, float(np.max(err)))
  p, st = np.asarray(tree["l06"], np.float64), reference.init_state(name, hp, tree["l06"])
  for k, g in enumerate(grads):
    p, st = reference.apply_param_gradient(name, k, hp, p, st, g["l06"])
  for field in cls.state_fields:
    got = np.asarray(getattr(opt.state.param_states["l06"], field), np.float64)
    ref = st[field]
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6 * np.max(np.abs(ref)),
                               err_msg=field)


def test_first_step_has_no_difference():
  """Step 1: ``v`` stays 0 and ``n`` is ``(1-b3) g^2`` (optax: the difference is 0 at t = 0);
  ``prev_grad`` holds the gradient."""
  tree = _tree()
  g = _grads(tree, 1)[0]
  opt = optim.Adan(learning_rate=LR, beta3=0.9).create(tree).apply_gradient(g)
  st = opt.state.param_states["l04"]
  np.testing.assert_array_equal(np.asarray(st.grad_diff_ema), 0.0)
  np.testing.assert_array_equal(np.asarray(st.prev_grad), np.asarray(g["l04"]))
  np.testing.assert_allclose(np.asarray(st.sq_ema), 0.1 * np.square(np.asarray(g["l04"])),
                             rtol=1e-6)


def test_adopt_first_step_only_measures():
  """Step 1 (optax's b1 = 1, b2 = 0): params and first moment unchanged, the second moment is
  ``g^2``; step 2 normalises by it, clipped to +-1 (= 1**0.25)."""
  tree = _tree()
  g1, g2 = _grads(tree, 2)
  opt = optim.ADOPT(learning_rate=LR).create(tree).apply_gradient(g1)
  st = opt.state.param_states["l08"]
  np.testing.assert_array_equal(np.asarray(opt.target["l08"]), np.asarray(tree["l08"]))
  np.testing.assert_array_equal(np.asarray(st.grad_ema), 0.0)
  np.testing.assert_array_equal(np.asarray(st.grad_sq_ema), np.square(np.asarray(g1["l08"])))
  opt = opt.apply_gradient(g2)
  u = np.clip(np.asarray(g2["l08"]) / np.maximum(np.abs(np.asarray(g1["l08"])), 1e-6), -1, 1)
  np.testing.assert_allclose(np.asarray(opt.state.param_states["l08"].grad_ema), 0.1 * u,
                             rtol=1e-6, atol=1e-7)


# Pallas' interpreter for the rules that add something to it: Adan's four state buffers, ADOPT's
# maximum/minimum (AdEMAMix's operations are Adam's)
@pytest.mark.parametrize("name, backend", [(n, "native") for n in NAMES]
                         + [("Adan", "pallas_interpret"), ("ADOPT", "pallas_interpret")])
def test_kernel_backends_match_jnp_mixed_dtypes(name, backend):
  """float32, bfloat16 and float16 leaves, with master weights and with bfloat16 state: the
  kernel backends against the jnp backend over 3 steps, within 2 ulps of the update's terms
  (XLA contracts FMAs where the kernels do not)."""
  if backend not in optim.available_backends():
    pytest.skip(f"{backend} not available")
  tree = _tree((jnp.float32, jnp.bfloat16, jnp.float16))
  grads = _grads(tree, 3)
  for kw in ({"master_weights": True}, {"state_dtype": jnp.bfloat16}):
    outs = {}
    for b in ("jnp", backend):
      wd = {} if name in NO_WEIGHT_DECAY else {"weight_decay": 0.1}
      opt = getattr(optim, name)(learning_rate=LR, backend=b, **wd, **kw).create(tree)
      step = jax.jit(lambda o, g: o.apply_gradient(g))
      for g in grads:
        opt = step(opt, g)
      outs[b] = opt
    for x, y, p in zip(jax.tree.leaves(outs["jnp"].target), jax.tree.leaves(outs[backend].target),
                       jax.tree.leaves(tree)):
      err = ulps_error(np.asarray(y), np.asarray(x), np.asarray(p), step_size=LR)
      assert err.size == 0 or float(np.max(err)) <= 2, (kw, x.dtype, float(np.max(err)))


@pytest.mark.parametrize("name", NAMES)
def test_bad_hyper_parameters_are_clear_errors(name):
  tree = _tree()
  bad = [({"beta1": 1.0}, "beta1"), ({"beta2": -0.1}, "beta2")]
  if name not in NO_WEIGHT_DECAY:
    bad += [({"beta3": -0.1}, "beta3"), ({"eps_root": -1.0}, "eps_root"),
            ({"weight_decay": -1.0}, "weight_decay")]
  for kw, what in bad:
    with pytest.raises(optim.HyperParamError, match=what):
      getattr(optim, name)(**{"learning_rate": LR, **kw}).create(tree).apply_gradient(tree)
  if name == "AdEMAMix":
    with pytest.raises(optim.HyperParamError, match="alpha"):
      optim.AdEMAMix(learning_rate=LR, alpha=-1.0).create(tree).apply_gradient(tree)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
  tree, grads = _tree(), _grads(_tree(), 2)
  opt = getattr(optim, name)(learning_rate=LR).create(tree).apply_gradient(grads[0])
  back = optim.serialization.from_state_dict(opt, optim.serialization.to_state_dict(opt))
  a, b = opt.apply_gradient(grads[1]), back.apply_gradient(grads[1])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", NAMES)
def test_driver_features(name):
  """What every built-in gets from the driver, on these rules (native backend):
  - MultiOptimizer over two of them (different hyper-parameters) fuses into one state and one
    pass and matches the float64 reference per traversal;
  - ``apply_gradient_checked`` with a non-finite gradient leaves params, state and step bitwise
    unchanged;
  - ``stochastic_rounding`` on bfloat16 params stays within one bfloat16 ulp of the float32
    update."""
  cls = getattr(optim, name)
  params = make_dict_params()
  grads = _grads(params, 3)
  kw_a, kw_b = dict(learning_rate=LR), dict(learning_rate=2 * LR, beta1=0.8)
  multi = optim.MultiOptimizer((optim.ModelParamTraversal(is_kernel), cls(**kw_a)),
                               (optim.ModelParamTraversal(is_bias), cls(**kw_b))).create(params)
  assert type(multi.state.param_states).__name__ == "FusedMultiState"
  step = jax.jit(lambda o, g: o.apply_gradient(g))
  for g in grads:
    multi = step(multi, g)
  want, _ = reference.run_multi([(is_kernel, name, kw_a), (is_bias, name, kw_b)], params, grads)
  for path, got in jax.tree_util.tree_leaves_with_path(multi.target):
    ref = want
    for k in path:
      ref = ref[k.key]
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-6, atol=1e-7, err_msg=str(path))

  opt = cls(learning_rate=LR).create(params).apply_gradient(grads[0])
  bad = jax.tree.map(lambda g: g.at[..., 0].set(jnp.inf) if g.ndim else jnp.inf, grads[1])
  new, finite, _ = jax.jit(lambda o, g: o.apply_gradient_checked(g))(opt, bad)
  assert not bool(finite)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(opt)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  sr = cls(learning_rate=LR, stochastic_rounding=True).create(bf).apply_gradient(
      jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads[0]))
  f32 = cls(learning_rate=LR).create(jax.tree.map(lambda x: x.astype(jnp.float32), bf))
  f32 = f32.apply_gradient(jax.tree.map(lambda x: x.astype(jnp.float32).astype(jnp.bfloat16)
                                        .astype(jnp.float32), grads[0]))
  for a, b in zip(jax.tree.leaves(sr.target), jax.tree.leaves(f32.target)):
    b = np.asarray(b)
    ulp = np.spacing(np.abs(b).astype(np.float32)) * 2.0 ** 16   # bfloat16 spacing
    assert np.all(np.abs(np.asarray(a, np.float32) - b) <= ulp * (1 + 1e-3)), name


# ----------------------------------------------------------------------------- fusedopt.tx

optax = pytest.importorskip("optax")
from fusedopt import tx  # noqa: E402
import test_tx  # noqa: E402


@pytest.fixture(scope="module")
def zoo_f32():
  """test_tx's tree of float32 and complex64 leaves, ``None`` and empty subtrees."""
  params = test_tx.make_zoo(bf16=False)
  return params, test_tx.make_grads(params)

def _contrib(m):
  """optax keeps AdEMAMix and ADOPT in ``optax.contrib``; fusedopt.tx has them at the top."""
  return m.contrib if m is optax else m


TX_CASES = [
    ("adan_mask_wd_betas", lambda m: m.adan(1e-3, b1=0.9, b2=0.8, b3=0.95, eps_root=0.0,
                                            weight_decay=0.5, mask=test_tx.ALL_TRUE_BUT_BIG)),
    ("adan_schedules", lambda m: m.adan(optax.linear_schedule(1e-3, 1e-4, 10),
                                        weight_decay=optax.linear_schedule(0.1, 0.0, 10))),
    ("ademamix_mask_wd", lambda m: _contrib(m).ademamix(1e-3, b1=0.8, b2=0.95, eps_root=1e-8,
                                                        weight_decay=0.5,
                                                        mask=test_tx.ALL_TRUE_BUT_BIG)),
    # the paper's warm-ups of alpha and b3, as schedules of the step
    ("ademamix_warmups", lambda m: _contrib(m).ademamix(
        1e-3, b3=optax.linear_schedule(0.9, 0.999, 10),
        alpha=optax.linear_schedule(0.0, 5.0, 10))),
    ("adopt_defaults", lambda m: _contrib(m).adopt(1e-3)),
    ("adopt_nesterov_clip_fn", lambda m: _contrib(m).adopt(
        optax.linear_schedule(1e-3, 1e-4, 10), b1=0.8, b2=0.95, eps=1e-3, nesterov=True,
        clip_value_fn=lambda c: 0.5 * c ** 0.5)),
    ("adopt_no_clip", lambda m: _contrib(m).adopt(1e-3, use_clipping=False)),
]
# optax's ADOPT takes its step's betas from jnp.where, float32 arrays, so its 1 - b2 is rounded
# in float32: 1 - float32(0.9999) is 4.7e-5 off (fusedopt: from the exact b2, as optax's other
# aliases, whose Python-float betas stay exact). Its second moment and, through the normalisation,
# everything after differ by that much; the float64 comparison below decides which is closer.
LOOSE = {"adopt": dict(rtol=2e-4, atol_rel=2e-4)}
# optax's clip refuses complex values (no ordering): these run on the zoo's real leaves
REAL_ONLY = ("adopt_defaults", "adopt_nesterov_clip_fn")


@pytest.mark.parametrize("case", TX_CASES, ids=[c[0] for c in TX_CASES])
def test_tx_agrees_with_optax(case, zoo_f32):
  """20 steps on the float32/complex64 zoo: optax's state structure exactly (its counters --
  ``t``, ``count``, ``count_m2`` -- counted as optax's), params and state within rtol 1e-6
  where optax's float32 bias corrections allow: ``1 - b^t`` carries optax's float32 rounding of
  ``b``, so the params are compared at 1e-5. ADOPT (``LOOSE``: optax's ``1 - b2`` in float32) is
  compared more loosely and against optax run in float64, where fusedopt's must be as close as
  optax's up to 4 ulps of the leaf (each of the 20 steps rounds the params once, in either
  library)."""
  name, make = case
  params, grads = zoo_f32
  if name in REAL_ONLY:
    params, grads = jax.tree.map(_real_or_none, (params, grads))
  expected, expected_state = test_tx.run_optax(make(optax), params, grads)
  got, state = test_tx.run(make(tx), params, grads)
  test_tx.assert_same_structure(state, expected_state)
  for a, e in zip(jax.tree.leaves(state), jax.tree.leaves(expected_state)):
    if jnp.issubdtype(e.dtype, jnp.integer):
      assert int(a) == int(e) == len(grads), name
  tol = LOOSE.get(name.split("_")[0], dict(rtol=1e-5, atol_rel=1e-5))
  test_tx.assert_close(got, expected, name, **tol)
  test_tx.assert_close(state, expected_state, name, **LOOSE.get(name.split("_")[0], dict(
      rtol=2e-6, atol_rel=2e-6)))
  if name.split("_")[0] in LOOSE:   # where optax's float32 rounding is the larger difference
    test_tx.assert_as_accurate(got, expected, test_tx.run64(make, params, grads), name, ulps=4)


@pytest.mark.parametrize("name", ["adan", "ademamix", "adopt"])
def test_tx_defaults_are_optax(name):
  """Every argument optax has, with optax's default (``clip_value_fn``: a function, compared by
  its values), then fusedopt's keyword-only extras. The cases above run optax's defaults
  wherever they do not name an argument."""
  import inspect  # pylint: disable=import-outside-toplevel
  ours = inspect.signature(getattr(tx, name)).parameters
  theirs = inspect.signature(getattr(optax, name, None) or getattr(optax.contrib, name)).parameters
  assert list(ours)[:len(theirs)] == list(theirs), name
  for k, p in theirs.items():
    if k == "clip_value_fn":
      assert all(float(ours[k].default(t)) == float(p.default(t)) for t in (0, 1, 16, 1000))
    else:
      assert ours[k].default == p.default, (name, k)
  assert set(list(ours)[len(theirs):]) == {"backend", "state_dtype", "clip_global_norm",
                                            "skip_nonfinite"}


def _real_or_none(x):
  return None if jnp.iscomplexobj(x) else x


def test_tx_adopt_complex_params_with_clipping_are_a_clear_error(zoo_f32):
  params, grads = zoo_f32
  t = tx.adopt(1e-3)
  with pytest.raises(ValueError, match="use_clipping=False"):
    t.update(grads[0], t.init(params), params)


@pytest.mark.parametrize("make", [lambda: tx.adan(1e-3, weight_decay=0.1),
                                  lambda: tx.ademamix(1e-3, weight_decay=0.1),
                                  lambda: tx.adopt(1e-3, nesterov=True),
                                  lambda: tx.lion(1e-3, weight_decay=0.1)],
                         ids=["adan", "ademamix", "adopt", "lion"])
def test_tx_one_pass_equals_two_calls(make):
  """``update_and_apply`` (the native kernel, each leaf's state arrays by address, in place)
  equals ``update`` + ``apply_updates``."""
  params = test_tx.make_params()
  grads = test_tx.make_grads(params, steps=3)
  t = make()
  expected, expected_state = test_tx.run(t, params, grads)
  p, s = params, t.init(params)
  step = jax.jit(lambda g, s, p: tx.update_and_apply(t, g, s, p))
  for g in grads:
    p, s = step(g, s, p)
  test_tx.assert_close(p, expected, "one pass")
  test_tx.assert_close(s, expected_state, "one pass state")
