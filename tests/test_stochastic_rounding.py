"""stochastic_rounding=True: bfloat16 params stored with unbiased stochastic rounding.

``elementwise.with_stochastic_rounding`` rounds the float32 new param ``x`` to a bf16 neighbour:
up with probability ``q = (x - a) / ulp`` (``a`` the neighbour toward zero), so ``E[SR(x)] = x``.

Statistical bounds: each test counts roundings that are (pseudo-)independent Bernoulli(q) trials
-- distinct steps, so distinct seeds, or elements with distinct inputs -- and accepts a count k
of N trials when ``|k - N q| <= 5 sqrt(N q (1-q)) + 1`` (5 sigma of the binomial, +1 for the
discreteness; a false failure has probability < 1e-6 per check, and the hash is deterministic, so
a passing test always passes). The training check bounds a sum of T martingale differences of
variance <= q (1-q) ulp^2 the same way.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim
from fusedopt import elementwise as ew
from fusedopt.elementwise import Rule, with_stochastic_rounding
from fusedopt.sgd import SGD_RULE

BACKENDS = optim.available_backends()
FLAT = [b for b in BACKENDS if b in ("jnp", "native", "pallas_interpret", "pallas")]
BF16 = jnp.bfloat16


def _bf16(x):
  return np.asarray(jnp.asarray(np.asarray(x, np.float32), BF16), np.float32)


def _within(k, n, q, sigmas=5.0):
  return abs(k - n * q) <= sigmas * np.sqrt(n * q * (1 - q)) + 1


def _bits(x):
  return np.asarray(x, np.float32).view(np.uint32)


# ----------------------------------------------------------------------------- the rounding itself

# fractional positions (in 1/65536 of a bf16 ulp) between two bf16 neighbours
FRACS = [1, 0x100, 0x1000, 0x4000, 0x5555, 0x8000, 0xC000, 0xF000, 0xFFFF]


def test_rounds_up_with_probability_equal_to_the_fraction():
  """Rule level (jnp), many steps (= seeds): for x = a + q ulp, P(round away from zero) = q and
  the mean of the rounded values is x; round-to-nearest is biased by min(q, 1-q) ulp."""
  n_steps = 20000
  sr = with_stochastic_rounding(SGD_RULE)
  for a in (1.0, -3.0, 2.0 ** -100, 1000.0):          # several binades, both signs
    ulp = np.float32(np.spacing(np.float32(abs(a))) * 2.0 ** 16)   # bf16 ulp at a
    q = np.array(FRACS, np.float64) / 65536
    x = (np.float32(a) + np.sign(a) * (q * ulp)).astype(np.float32)   # exact in float32
    assert np.all((_bits(x) & 0xFFFF) == np.array(FRACS))
    p = jnp.full(x.shape, a, jnp.float32)
    g = jnp.asarray(np.float32(a) - x)                  # p - 1 * g == x exactly
    s = ew.namespace(dict(lr=jnp.float32(1.0),
                          **ew.rounding_seed_scalars(jnp.arange(n_steps)[:, None])))
    out, _ = sr.fn(ew.JNP, s, ew.namespace({}), p, g)
    out = np.asarray(out)
    lo, hi = np.float32(a), np.float32(a + np.sign(a) * ulp)
    assert np.all((out == lo) | (out == hi)), a        # always one of the two neighbours
    assert np.array_equal(_bf16(out), out)              # bf16-representable: the store is exact
    ups = (out == hi).sum(axis=0)
    for k, qi, xi, col in zip(ups, q, x, out.T):
      assert _within(k, n_steps, qi), (a, qi, k / n_steps)
      sigma = np.sqrt(qi * (1 - qi) / n_steps) * ulp
      mean = col.astype(np.float64).mean()
      assert abs(mean - xi) <= 5 * sigma + ulp / n_steps, (a, qi, mean, xi)
      rtn = float(_bf16(xi))
      if 0.05 < qi < 0.95:   # round-to-nearest is off by >= 0.0625 ulp: > 5 of SR's bounds
        assert abs(rtn - xi) > 5 * (5 * sigma + ulp / n_steps)


def test_special_values():
  """NaN stays NaN (also one whose payload is only in the low 16 bits, which masking would turn
  into inf), +-inf and zeros stay, representable values are unchanged, above bf16's largest
  finite value the upper neighbour is inf (round-to-nearest sends those to inf too)."""
  ident = Rule("ident", lambda xp, s, q, p, g: (g, ()), (), 0)
  sr = with_stochastic_rounding(ident)
  specials = np.array([0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0x7F800000, 0xFF800000, 0, 0x80000000,
                       0x3F800000, 0x7F7F0000, 0x7F7F0001, 0x7F7FFFFF, 0x00000001, 0x8000FFFF],
                      np.uint32)
  x = jnp.asarray(specials.view(np.float32))
  outs = []
  for t in range(64):
    s = ew.namespace(ew.rounding_seed_scalars(t))
    out, _ = sr.fn(ew.JNP, s, ew.namespace({}), jnp.zeros_like(x), x)
    outs.append(_bits(out))
  outs = np.stack(outs)
  f = outs.view(np.float32)
  assert np.all(np.isnan(f[:, :3]))
  assert np.all(outs[:, 3:8] == specials[3:8])          # inf, -inf, 0, -0, 1.0
  assert np.all(outs[:, 8] == 0x7F7F0000)               # bf16 max: representable
  for col, lo, hi in ((9, 0x7F7F0000, 0x7F800000), (10, 0x7F7F0000, 0x7F800000),
                      (11, 0, 0x10000), (12, 0x80000000, 0x80010000)):
    assert set(outs[:, col]) <= {lo, hi}, col
  assert np.mean(outs[:, 9] == 0x7F7F0000) > 0.9        # q = 2^-16: almost always down
  assert np.mean(outs[:, 10] == 0x7F800000) > 0.9       # q = 1 - 2^-16: almost always inf


def test_seed_scalars_are_exact_and_distinct_per_step():
  sc = ew.rounding_seed_scalars(jnp.arange(1 << 16), seed=7)
  hi, lo = np.asarray(sc["sr_hi"]), np.asarray(sc["sr_lo"])
  assert hi.dtype == lo.dtype == np.float32
  assert np.all((hi == np.round(hi)) & (hi >= 0) & (hi < 65536))
  assert np.all((lo == np.round(lo)) & (lo >= 0) & (lo < 65536))
  seeds = hi.astype(np.uint64) * 65536 + lo.astype(np.uint64)
  assert len(np.unique(seeds)) == len(seeds)            # fmix32 is a bijection
  other = ew.rounding_seed_scalars(jnp.arange(1 << 16), seed=8)
  assert not np.array_equal(np.asarray(other["sr_hi"]), hi)


# ----------------------------------------------------------------------------- through the optimizer

def _distinct_bf16(n, rng):
  """n distinct bf16 values, both signs, magnitudes in [2^-20, 2^20)."""
  exps = np.arange(127 - 20, 127 + 20, dtype=np.uint32)
  pats = ((exps[:, None] << 7) | np.arange(128, dtype=np.uint32)[None, :]).reshape(-1)
  pats = np.concatenate([pats, pats | 0x8000])
  pick = rng.choice(pats, n, replace=False)
  return (pick << 16).astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("backend", FLAT)
def test_optimizer_step_is_unbiased(backend):
  """GradientDescent(lr=1) on bf16 params p_i with g_i = -q_i ulp(p_i) sign(p_i): the float32
  step lands at fraction q_i above p_i. Over distinct elements and a few steps, the count of
  roundings up matches q per fraction class (5 sigma), through every backend's kernel."""
  rng = np.random.RandomState(0)
  per_class, n_steps = (1024, 4) if backend != "pallas_interpret" else (256, 2)
  q = np.repeat(np.array([0x1000, 0x4000, 0x8000, 0xC000], np.float64) / 65536, per_class)
  p0 = _distinct_bf16(len(q), rng)
  ulp = np.spacing(np.abs(p0)) * 2.0 ** 16
  g = (-np.sign(p0) * q * ulp).astype(np.float32)
  tree = {"w": jnp.asarray(p0, BF16)}
  opt = optim.GradientDescent(learning_rate=1.0, backend=backend,
                              stochastic_rounding=True).create(tree)
  step = jax.jit(lambda o, t: o.replace(state=o.state.replace(step=t)).apply_gradient(
      {"w": jnp.asarray(g)}))
  ups = np.zeros(len(q))
  for t in range(n_steps):
    new = np.asarray(step(opt, jnp.int32(t)).target["w"], np.float32)
    up = np.abs(new) > np.abs(p0)
    assert np.all(up | (new == p0))
    assert np.all(np.abs(new[up]) == (np.abs(p0) + ulp)[up])
    ups += up
  for qc in np.unique(q):
    k, n = ups[q == qc].sum(), n_steps * (q == qc).sum()
    assert _within(k, n, qc), (backend, qc, k / n)


@pytest.mark.parametrize("backend", [b for b in FLAT if b != "pallas_interpret"])
def test_small_updates_track_float32_in_expectation(backend):
  """lr * g below half a bf16 ulp of p: round-to-nearest leaves bf16 params frozen, stochastic
  rounding follows the float32 trajectory on average.

  p0 = 1, g_i in [0.5, 1.5] (distinct float32 values), lr = 1e-4, T = 500 steps: p stays in
  (0.5, 1], where the bf16 ulp is 2^-8, so each step rounds with q <= 1.5e-4 / 2^-8 = 0.0384 and
  adds an error of mean 0 and variance <= q (1-q) ulp^2; after T steps the error of one element
  has sigma <= sqrt(T q (1-q)) ulp = 0.0168 and the mean over M = 4096 elements 2.6e-4. Bound:
  5 sigma plus the float32 rounding of both trajectories (2 T 2^-24). Round-to-nearest's error is
  the whole descent, T lr mean(g) = 0.05."""
  m, steps, lr = 4096, 500, 1e-4
  rng = np.random.RandomState(1)
  g = {"w": jnp.asarray(rng.uniform(0.5, 1.5, m).astype(np.float32))}
  tree = {"w": jnp.ones((m,), BF16)}
  ref = optim.GradientDescent(learning_rate=lr, backend="jnp").create(
      {"w": jnp.ones((m,), jnp.float32)})
  rtn = optim.GradientDescent(learning_rate=lr, backend=backend).create(tree)
  sr = optim.GradientDescent(learning_rate=lr, backend=backend,
                             stochastic_rounding=True).create(tree)

  @jax.jit
  def run(opts):
    def body(_, o):
      return tuple(x.apply_gradient(g) for x in o)
    return jax.lax.fori_loop(0, steps, body, opts)

  ref, rtn, sr = run((ref, rtn, sr))
  want = np.asarray(ref.target["w"], np.float64)
  got_rtn = np.asarray(rtn.target["w"], np.float64)
  got_sr = np.asarray(sr.target["w"], np.float64)
  assert np.all(got_rtn == 1.0)                           # frozen
  ulp, qmax = 2.0 ** -8, lr * 1.5 / 2.0 ** -8
  sigma_elem = np.sqrt(steps * qmax * (1 - qmax)) * ulp
  slack = 2 * steps * 2.0 ** -24
  err = got_sr - want
  assert abs(err.mean()) <= 5 * sigma_elem / np.sqrt(m) + slack, (err.mean(), sigma_elem)
  assert np.abs(err).max() <= 6 * sigma_elem + slack, np.abs(err).max()
  assert abs((got_rtn - want).mean()) > 30 * (5 * sigma_elem / np.sqrt(m) + slack)
  # the descent itself: 1 - T lr g on average
  np.testing.assert_allclose((1.0 - got_sr).mean(), steps * lr * float(np.mean(g["w"])),
                             rtol=0.05)


# ----------------------------------------------------------------------------- every backend, bitwise

SHAPES = [(), (1,), (7,), (3, 5), (1025,), (0,), (33, 65), (2, 3, 4), (4097,), (3000,)]
OPTS = [("GradientDescent", {}), ("Momentum", {"nesterov": True, "weight_decay": 0.01}),
        ("Adam", {"weight_decay": 0.01}), ("Adam", {"state_dtype": BF16})]
OPT_IDS = [f"{n}-{'-'.join(kw)}" for n, kw in OPTS]


def _tree():
  rng = np.random.RandomState(0)     # bf16 and float32 leaves: two groups, SR on the bf16 one
  return {f"l{i}": jnp.asarray(rng.standard_normal(s), jnp.float32 if i % 3 == 0 else BF16)
          for i, s in enumerate(SHAPES)}


def _grads(seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), _tree())


def _def(name, kw, backend, **extra):
  return getattr(optim, name)(learning_rate=1e-2, backend=backend, **kw, **extra)


def _step_fn(checked):
  if checked:
    return jax.jit(lambda o, g: o.apply_gradient_checked(g, grad_scale=0.5,
                                                         clip_global_norm=10.0)[0])
  return jax.jit(lambda o, g: o.apply_gradient(g))


def _run(name, kw, backend, steps=3, checked=False, **extra):
  out = [_def(name, kw, backend, **extra).create(_tree())]
  step = _step_fn(checked)
  for t in range(steps):
    out.append(step(out[-1], _grads(t)))
  return out


def _assert_same(a, b, what, bf16_ulps=0):
  """bf16 params bitwise equal; float32 arrays (not rounded stochastically: FMA contraction may
  differ between backends, as in test_pallas_numerics) within 2 ulp of the leaf's magnitude;
  ``bf16_ulps`` for bf16 *state* (rounded to nearest after that float32 math)."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype, (what, path)
    x32, y32 = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if x.dtype == BF16 and bf16_ulps:
      scale = np.float32(np.max(np.abs(x32), initial=0))   # terms can cancel: ulp of the leaf
      assert np.all(np.abs(x32 - y32) <= bf16_ulps * np.spacing(scale) * 2 ** 16), (what, path)
    elif x.dtype == BF16:
      assert np.array_equal(x32, y32, equal_nan=True), (what, path, int(np.sum(x32 != y32)))
    else:
      scale = np.float32(np.max(np.abs(x32), initial=0))   # terms can cancel: ulp of the leaf
      assert np.all(np.abs(x32 - y32) <= 2 * np.spacing(scale)), (what, path)


def _state_leaves(opt):
  ps = opt.state.param_states   # per leaf a state object (_AdamParamState, ...; () for SGD)
  return ps.layout.treedef.flatten_up_to(ps.per_leaf())


@pytest.mark.parametrize("name, kw", OPTS, ids=OPT_IDS)
def test_backends_and_per_leaf_path_agree_bitwise(name, kw):
  """From the same state, one step of jnp (flat), native, Pallas (interpret on CPU) and the
  per-leaf ``apply_param_gradient`` give the same bf16 bits: the random bits are hashed from the
  same inputs everywhere (a float32 FMA-contraction difference in the new value could still flip
  a rounding with probability ~2^-16 per element; none does on this tree). float32 leaves are
  not rounded stochastically: they equal the optimizer without the option."""
  ref = _run(name, kw, "jnp", stochastic_rounding=True, rounding_seed=3)
  plain = _run(name, kw, "jnp")
  for x, y in zip(jax.tree.leaves(ref[1].target), jax.tree.leaves(plain[1].target)):
    if x.dtype == jnp.float32:
      assert np.array_equal(np.asarray(x), np.asarray(y))
  assert any(not np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
             for x, y in zip(jax.tree.leaves(ref[1].target), jax.tree.leaves(plain[1].target))
             if x.dtype == BF16)
  step = _step_fn(False)
  for backend in FLAT:
    d = _def(name, kw, backend, stochastic_rounding=True, rounding_seed=3)
    for t in range(len(ref) - 1):
      out = step(ref[t].replace(optimizer_def=d), _grads(t))
      _assert_same(ref[t + 1].target, out.target, (backend, t))
      _assert_same(ref[t + 1].state.param_states.fields, out.state.param_states.fields,
                   (backend, t, "state"), bf16_ulps=1)
  # flax's per-leaf API on the same rule, one step from each state
  opt_def = ref[0].optimizer_def
  for t in range(len(ref) - 1):
    new = [opt_def.apply_param_gradient(ref[t].state.step, opt_def.hyper_params, p, s, g)
           for p, s, g in zip(jax.tree.leaves(ref[t].target), _state_leaves(ref[t]),
                              jax.tree.leaves(_grads(t)))]
    _assert_same(ref[t + 1].target, jax.tree.unflatten(jax.tree.structure(ref[t].target),
                                                       [p for p, _ in new]), ("per-leaf", t))


@pytest.mark.parametrize("backend", FLAT)
def test_checked_update_agrees_and_skips_bitwise(backend):
  """apply_gradient_checked (scaled, clipped g): same bits as jnp; a non-finite step leaves
  params (and the step count, so the next step's seed) unchanged."""
  ref = _run("Adam", {}, "jnp", steps=2, checked=True, stochastic_rounding=True)
  d = _def("Adam", {}, backend, stochastic_rounding=True)
  step = _step_fn(True)
  for t in range(len(ref) - 1):
    _assert_same(ref[t + 1].target, step(ref[t].replace(optimizer_def=d), _grads(t)).target,
                 (backend, t))
  opt = ref[-1].replace(optimizer_def=d)
  bad = jax.tree.map(lambda g: g.at[...].set(jnp.nan) if g.size else g, _grads(5))
  new, finite, _ = jax.jit(lambda o, g: o.apply_gradient_checked(g))(opt, bad)
  assert not bool(finite)
  for x, y in zip(jax.tree.leaves(opt.target), jax.tree.leaves(new.target)):
    assert np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  assert int(new.state.step) == int(opt.state.step)


def test_deterministic_given_seed_and_step_and_different_across_steps():
  a = _run("Adam", {}, "jnp", steps=2, stochastic_rounding=True, rounding_seed=11)
  b = _run("Adam", {}, "jnp", steps=2, stochastic_rounding=True, rounding_seed=11)
  c = _run("Adam", {}, "jnp", steps=2, stochastic_rounding=True, rounding_seed=12)
  _assert_same(a[-1].target, b[-1].target, "same seed")
  assert not np.array_equal(np.asarray(a[1].target["l4"], np.float32),
                            np.asarray(c[1].target["l4"], np.float32))
  # the same params and grads at another step round differently (the seed depends on the step)
  opt = a[1]
  step = jax.jit(lambda o, t: o.replace(state=o.state.replace(step=t)).apply_gradient(_grads(9)))
  x, y = (np.asarray(step(opt, jnp.int32(t)).target["l4"], np.float32) for t in (1, 2))
  # a fraction 2 q (1 - q) of the elements differs; with q ~ U(0, 1) that is ~1/3, plus the
  # elements whose float32 values themselves differ (the bias corrections depend on the step)
  assert 0.15 < np.mean(x != y) < 0.7, np.mean(x != y)
  np.testing.assert_array_equal(x, np.asarray(step(opt, jnp.int32(1)).target["l4"], np.float32))


# ----------------------------------------------------------------------------- errors and plumbing

def test_errors():
  with pytest.raises(ValueError, match="master_weights"):
    optim.Adam(learning_rate=0.1, stochastic_rounding=True, master_weights=True)
  with pytest.raises(ValueError, match="bfloat16"):
    optim.Adam(learning_rate=0.1, stochastic_rounding=True).create(
        {"w": jnp.zeros((4,), jnp.float16)})
  with pytest.raises(ValueError, match="bfloat16"):
    optim.Adam(learning_rate=0.1, stochastic_rounding=True).apply_param_gradient(
        0, optim.Adam(learning_rate=0.1).hyper_params, jnp.zeros((4,), jnp.float16),
        {"grad_ema": jnp.zeros((4,)), "grad_sq_ema": jnp.zeros((4,))}, jnp.ones((4,), jnp.float16))
  with pytest.raises(TypeError, match="rounding_seed"):
    optim.Adam(learning_rate=0.1, stochastic_rounding=True, rounding_seed=1.5)


def test_float32_only_tree_is_unaffected_and_keywords_reach_every_optimizer():
  tree = {"w": jnp.linspace(-1, 1, 3000, dtype=jnp.float32)}
  g = {"w": jnp.full((3000,), 0.3, jnp.float32)}
  a = optim.Adam(learning_rate=0.1, stochastic_rounding=True).create(tree).apply_gradient(g)
  b = optim.Adam(learning_rate=0.1).create(tree).apply_gradient(g)
  np.testing.assert_array_equal(np.asarray(a.target["w"]), np.asarray(b.target["w"]))
  for name in ("GradientDescent", "Momentum", "Adam", "Adagrad", "RMSProp", "LAMB", "LARS",
               "AdaBelief", "Adadelta"):
    d = getattr(optim, name)(learning_rate=0.1, stochastic_rounding=True, rounding_seed=5)
    assert d.stochastic_rounding and d.rounding_seed == 5, name
    assert not getattr(optim, name)(learning_rate=0.1).stochastic_rounding


@pytest.mark.parametrize("name, kw", [("LAMB", {"weight_decay": 0.01}), ("LARS", {}),
                                      ("RMSProp", {"centered": True}), ("AdaBelief", {})])
def test_other_optimizers_round_stochastically(name, kw):
  """Every built-in flat optimizer takes the option: bf16 results lie on the two bf16 neighbours
  of the float32 step (computed by the same optimizer on float32 params), and differ from
  round-to-nearest somewhere."""
  rng = np.random.RandomState(0)
  p = {"w": jnp.asarray(rng.standard_normal((64, 64)), BF16)}
  g = {"w": jnp.asarray(rng.standard_normal((64, 64)), BF16)}
  f32 = jax.tree.map(lambda x: x.astype(jnp.float32), p)
  lr = 1.0 if name == "LARS" else 1e-3   # LARS scales lr by trust_coefficient * |p| / |g|
  ref = getattr(optim, name)(learning_rate=lr, backend="jnp", **kw).create(f32)
  x = np.asarray(ref.apply_gradient(jax.tree.map(lambda v: v.astype(jnp.float32), g)).target["w"])
  for backend in FLAT:
    sr = getattr(optim, name)(learning_rate=lr, backend=backend, stochastic_rounding=True,
                              **kw).create(p)
    y = np.asarray(sr.apply_gradient(g).target["w"], np.float32)
    down = (_bits(x) & 0xFFFF0000).view(np.float32)
    up = ((_bits(x) & 0xFFFF0000) + 0x10000).view(np.float32)
    exact = (_bits(x) & 0xFFFF) == 0
    # LAMB/LARS norms are summed in another order per backend: allow a float32 ulp of slack
    near = lambda a, b: np.abs(a - b) <= np.spacing(np.abs(b)) * 2 ** 16 * 1e-3  # noqa: E731
    ok = near(y, down) | near(y, up) | (exact & near(y, x))
    assert ok.mean() > 0.999, (name, backend, ok.mean())
    assert np.mean(y != _bf16(x)) > 0.05, (name, backend)


def _multi(backend, fuse=True, seeds=(4, 4), rounding=(True, True)):
  kernels = optim.ModelParamTraversal(lambda path, _: int(path.strip("/l")) % 2 == 0)
  rest = optim.ModelParamTraversal(lambda path, _: int(path.strip("/l")) % 2 == 1)
  return optim.MultiOptimizer(
      (kernels, optim.Adam(learning_rate=1e-2, weight_decay=0.01, backend=backend,
                           stochastic_rounding=rounding[0], rounding_seed=seeds[0])),
      (rest, optim.Adam(learning_rate=3e-2, beta1=0.8, backend=backend,
                        stochastic_rounding=rounding[1], rounding_seed=seeds[1])), fuse=fuse)


@pytest.mark.parametrize("backend", FLAT)
def test_fused_multi_optimizer_matches_unfused_bitwise(backend):
  """A fused MultiOptimizer (one flat state, per-segment scalars) rounds like one state per
  sub-optimizer: same step seed, same hashed inputs, so the same bf16 bits (float32 leaves: not
  rounded stochastically, FMA contraction aside). Sub-optimizers with another rounding seed or
  without the option are not fused."""
  tree = _tree()
  fused, plain = _multi(backend).create(tree), _multi(backend, fuse=False).create(tree)
  assert type(fused.state.param_states).__name__ == "FusedMultiState"
  assert type(plain.state.param_states).__name__ == "MultiState"
  rtn = _multi(backend, rounding=(False, False)).create(tree)
  step = _step_fn(False)
  for t in range(3):
    g = _grads(t)
    fused, plain, rtn = step(fused, g), step(plain, g), step(rtn, g)
    _assert_same(plain.target, fused.target, (backend, t))
    assert any(not np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
               for x, y in zip(jax.tree.leaves(fused.target), jax.tree.leaves(rtn.target))
               if x.dtype == BF16), (backend, t)   # it did round stochastically
  assert int(fused.state.step) == 3
  for kw in ({"seeds": (4, 5)}, {"rounding": (True, False)}):
    assert type(_multi(backend, **kw).create(tree).state.param_states).__name__ == "MultiState", kw


@pytest.mark.parametrize("name, kw", [("LAMB", {"weight_decay": 0.01}), ("LAMB", {}),
                                      ("LARS", {"nesterov": True, "weight_decay": 0.01})])
def test_layered_optimizers_per_leaf_path_agrees_bitwise(name, kw):
  """LAMB overrides ``apply_param_gradient`` (two stages per leaf), LARS ``update_leaves``: their
  per-leaf path rounds the bf16 params stochastically with the flat path's bits.

  Jitted, as flax's per-leaf loop runs: LAMB's apply stage hashes the step's *new* moments, and
  eager per-op execution rounds ``b1 * m + (1 - b1) * g`` without the FMA contraction XLA:CPU
  applies under jit, so eager moments can differ in the last bit and give other random bits."""
  ref = _run(name, kw, "jnp", stochastic_rounding=True, rounding_seed=3)
  plain = _run(name, kw, "jnp")
  assert any(not np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
             for x, y in zip(jax.tree.leaves(ref[1].target), jax.tree.leaves(plain[1].target))
             if x.dtype == BF16)
  opt_def = ref[0].optimizer_def
  leaf_step = jax.jit(lambda step, p, s, g: opt_def.apply_param_gradient(
      step, opt_def.hyper_params, p, s, g))
  for t in range(len(ref) - 1):
    new = [leaf_step(ref[t].state.step, p, s, g)
           for p, s, g in zip(jax.tree.leaves(ref[t].target), _state_leaves(ref[t]),
                              jax.tree.leaves(_grads(t)))]
    _assert_same(ref[t + 1].target, jax.tree.unflatten(jax.tree.structure(ref[t].target),
                                                       [p for p, _ in new]), ("per-leaf", t))
    if name == "LAMB":   # the moments the apply stage hashes: bitwise the flat path's
      for a, (_, b) in zip(_state_leaves(ref[t + 1]), new):
        for k in a:
          assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), ("state", t, k)
  with pytest.raises(ValueError, match="bfloat16"):
    opt_def.apply_param_gradient(0, opt_def.hyper_params, jnp.zeros((4,), jnp.float16),
                                 {k: jnp.zeros((4,)) for k in opt_def.state_fields},
                                 jnp.ones((4,), jnp.float16))
