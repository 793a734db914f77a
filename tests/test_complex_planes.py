"""Complex params on the real kernels (kernels/planes.py): the pair arithmetic against complex
numbers, which state fields are real, and fusedopt.tx on complex leaves with an explicit kernel
backend against optax (the kernels must run: no fallback warning, the kernel in the program)."""
import functools
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp

optax = pytest.importorskip("optax")

import fusedopt  # noqa: E402
from fusedopt import elementwise, tx  # noqa: E402
from fusedopt.adam import adam_rule  # noqa: E402
from fusedopt.kernels import planes, registry  # noqa: E402
from fusedopt.lamb import lamb_rules  # noqa: E402
from fusedopt.layout import FlatLayout  # noqa: E402
from fusedopt.rmsprop import rmsprop_rule  # noqa: E402
from test_tx import B1, B2, assert_close, make_grads, run  # noqa: E402

CVal = planes.CVal
XP = planes.dialect(elementwise.JNP)


def _values(seed, n=64):
  """complex64 values of every magnitude: ordinary, tiny (|z|^2 underflows), huge (|z|^2
  overflows), on the axes, and 0."""
  rng = np.random.RandomState(seed)
  z = rng.standard_normal(n) + 1j * rng.standard_normal(n)
  z[:8] *= 1e-30
  z[8:16] *= 1e30
  z[16:20] = z[16:20].real
  z[20:24] = 1j * z[20:24].imag
  z[24] = 0
  return z.astype(np.complex64)


def _cval(z):
  return CVal(jnp.asarray(z.real), jnp.asarray(z.imag))


def _complex(v):
  out = np.zeros(np.shape(v.re), np.complex64)
  out.real = np.asarray(v.re)
  if v.im is not None:
    out.imag = np.asarray(v.im)
  return out


def _assert_ulps(got, want, ulps=2):
  """complex64 results within ``ulps`` float32 ulps of ``want`` (exact, complex128) per part,
  relative to the larger part's magnitude."""
  want = np.asarray(want, np.complex128)
  scale = np.maximum(np.abs(want.real), np.abs(want.imag)).astype(np.float32)
  tol = ulps * np.spacing(np.maximum(scale, np.finfo(np.float32).tiny))
  np.testing.assert_array_less(np.abs(got.real - want.real), tol * 1.0001 + 1e-45)
  np.testing.assert_array_less(np.abs(got.imag - want.imag), tol * 1.0001 + 1e-45)


def test_pair_arithmetic_is_complex_arithmetic():
  """+ - * / by a real, |z|^2, sign (z/|z|, 0 at 0) and where on pairs, against complex128."""
  a, b = _values(0), _values(1)
  r = np.random.RandomState(2).uniform(0.5, 2.0, a.shape).astype(np.float32)
  ordinary = slice(24, None)      # products of huge and tiny values over/underflow in any form
  A, B, R = _cval(a), _cval(b), CVal(jnp.asarray(r))
  wide = lambda z: z.astype(np.complex128)  # noqa: E731
  _assert_ulps(_complex(A + B), wide(a) + wide(b), 1)
  _assert_ulps(_complex(A - B), wide(a) - wide(b), 1)
  _assert_ulps(_complex(1.5 - A), 1.5 - wide(a), 1)
  _assert_ulps(_complex(-A), -wide(a), 0)
  _assert_ulps(_complex(A * R), wide(a) * r, 1)
  _assert_ulps(_complex(0.25 * A), 0.25 * wide(a), 0)
  _assert_ulps(_complex(A / R), wide(a) / r, 1)
  ab = _complex(A * B)[ordinary]
  want = (wide(a) * wide(b))[ordinary]
  # (ac - bd) cancels: bound the error by the operands' magnitudes, not the result's
  bound = 4 * np.spacing(np.float32(1)) * np.abs(wide(a)[ordinary]) * np.abs(wide(b)[ordinary])
  assert np.all(np.abs(ab - want) <= bound)
  sq = XP.abs_sq(A)
  assert sq.im is None
  np.testing.assert_allclose(np.asarray(sq.re)[ordinary], np.abs(wide(a)[ordinary]) ** 2,
                             rtol=3e-7)
  sign = _complex(XP.sign(A))
  want = np.where(a == 0, 0, wide(a) / np.where(a == 0, 1, np.abs(wide(a))))
  _assert_ulps(sign, want, 3)      # every magnitude: tiny and huge z have unit sign too
  assert sign[24] == 0
  picked = _complex(XP.where(CVal(jnp.asarray(r > 1.0, jnp.float32)), A, B))
  np.testing.assert_array_equal(picked, np.where(r > 1.0, a, b))
  mixed = _complex(XP.where(CVal(jnp.asarray(r > 1.0, jnp.float32)), R, B))
  np.testing.assert_array_equal(mixed, np.where(r > 1.0, r, b))


@pytest.mark.parametrize("op", ["sqrt", "maximum", "division"])
def test_operations_without_a_complex_form_are_not_liftable(op):
  a = _cval(_values(0))
  with pytest.raises(planes.NotLiftable, match="complex value"):
    {"sqrt": lambda: XP.sqrt(a), "maximum": lambda: XP.maximum(a, a),
     "division": lambda: a / a}[op]()
  assert XP.sqrt(XP.abs_sq(a)).im is None     # real values keep their real operations


def test_plan_finds_the_real_second_moments():
  """Inferred: a field is real if it stays real when assumed real (Adam's nu, RMSProp's nu but
  not its gradient mean or momentum); declared where the rule writes no state (LAMB's apply
  stage); forced where the field is stored in a real dtype."""
  none = lambda rule: (False,) * rule.n_state  # noqa: E731
  adam = adam_rule()
  assert planes.plan(adam, none(adam)).real == (False, True)
  moments, apply = lamb_rules()
  assert planes.plan(moments, none(moments)) == planes.Plan((False, True), (True, True))
  assert planes.plan(apply, none(apply)).real == (False, True)
  centered = rmsprop_rule(True, eps_in_sqrt=True, momentum=True)
  assert planes.plan(centered, none(centered)).real.count(True) == 1
  assert planes.plan(adam, (True, False)).real == (True, True)
  guarded = elementwise.guarded(adam)
  assert planes.plan(guarded, none(guarded)).real == (False, True)


def _toy_rule():
  def fn(xp, s, q, p, g, v):
    return p - s.lr * xp.sqrt(g), (v,)         # sqrt of a complex gradient: no planes form
  return elementwise.Rule("toy_complex_sqrt", fn, ("lr",), 1)


def test_a_rule_without_a_planes_form_runs_on_jnp_with_a_warning():
  if "native" not in fusedopt.available_backends():
    pytest.skip("no C++ compiler")
  z = jnp.asarray(np.arange(1, 7) * (1 + 2j), jnp.complex64)
  layout = FlatLayout.build([z], complex_ok=True)
  rule, scalars = _toy_rule(), {"lr": jnp.float32(0.5)}
  args = (rule, scalars, {}, layout, 0, [z], [z * 0.5], ((jnp.zeros_like(z),),))
  want = registry.get("jnp").leaf_runner()(*args)
  backend = registry.select("native", layout, 0, rule, leaf_state=True)
  with pytest.warns(RuntimeWarning, match="runs on the jnp backend.*sqrt of a complex"):
    got = backend.leaf_runner()(*args)
  np.testing.assert_array_equal(got[0][0], want[0][0])


# (id, tx factory on optax's names, backends): each covers one kind of field -- inferred real
# (adamw), per-tensor sums and a declared stage (lamb, with the checked step skipping a step),
# the complex sign (lion), a real-dtype field (sgd accumulator), two complex fields and a real
# one (rmsprop centered with momentum), four state fields (adan), ADOPT's maximum on a real v
KERNEL_CASES = [
    ("adamw", lambda m, **k: m.adamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2, **k),
     ("native", "pallas_interpret")),
    ("lamb_skip_nonfinite", lambda m, **k: m.lamb(1e-2, b1=B1, b2=B2, **k),
     ("native", "pallas_interpret")),
    ("lion", lambda m, **k: m.lion(1e-3, **k), ("native",)),
    ("sgd_accumulator_f32", lambda m, **k: m.sgd(1e-2, momentum=0.9,
                                                 accumulator_dtype=jnp.float32, **k),
     ("native",)),
    ("rmsprop_centered_momentum", lambda m, **k: m.rmsprop(1e-2, centered=True, momentum=0.9,
                                                           **k), ("native",)),
    ("adan", lambda m, **k: m.adan(1e-2, **k), ("native",)),
    ("adopt", lambda m, **k: getattr(m, "contrib", m).adopt(1e-2, use_clipping=False, **k),
     ("native",)),
]
PAIRS = [(c, b) for c in KERNEL_CASES for b in c[2]]


@pytest.fixture(scope="module")
def complex_tree():
  """Complex64 leaves only (and a scalar), so the kernel call in the program is theirs."""
  rng = np.random.RandomState(5)
  c = lambda shape, s: jnp.asarray((s * (rng.standard_normal(shape)  # noqa: E731
                                         + 1j * rng.standard_normal(shape))).astype(np.complex64))
  params = {"w": c((6, 5), 0.7), "b": c((7,), 0.3), "s": c((), 1.2)}
  return params, make_grads(params, steps=6)


def _kernel_in(fn, *args):
  text = str(jax.make_jaxpr(fn)(*args))
  return "pallas_call" in text or "ffi_call" in text


# optax's own sgd casts the complex trace into accumulator_dtype (its deprecated complex->real
# astype); fusedopt keeps the real part explicitly (elementwise.store)
@pytest.mark.filterwarnings("ignore:Casting from complex to real:DeprecationWarning")
@pytest.mark.parametrize("case,backend", PAIRS, ids=[f"{c[0]}-{b}" for c, b in PAIRS])
def test_complex_leaves_run_on_the_kernels(case, backend, complex_tree):
  """optax's values after 6 steps (float32 tolerance of test_tx), with no fallback warning and
  the kernel in the step's program; the checked step skips a step with a NaN gradient."""
  if backend not in fusedopt.available_backends():
    pytest.skip(f"{backend} not available")
  name, make, _ = case
  params, grads = complex_tree
  kw = {}
  if name.endswith("skip_nonfinite"):
    grads = list(grads)
    grads[2] = dict(grads[2], b=grads[2]["b"].at[3].set(jnp.nan))
    kw = dict(skip_nonfinite=True)
    expected, _ = run(optax.apply_if_finite(make(optax), 10), params,
                      [g for k, g in enumerate(grads) if k != 2])
  else:
    expected, _ = run(make(optax), params, grads)
  t = make(tx, backend=backend, **kw)
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    got, _ = run(t, params, grads)
    assert _kernel_in(lambda p, s, g: t.update(g, s, p), params, t.init(params), grads[0])
  assert_close(got, expected, f"{name} {backend}")


def test_complex_one_pass_on_native(complex_tree):
  """``tx.update_and_apply`` (the one-pass step) on complex leaves with the native kernels."""
  if "native" not in fusedopt.available_backends():
    pytest.skip("no C++ compiler")
  params, grads = complex_tree
  make = lambda m, **k: m.adamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2, **k)  # noqa: E731
  expected, _ = run(make(optax), params, grads)
  t = make(tx, backend="native")
  p, state = params, t.init(params)
  step = jax.jit(functools.partial(tx.update_and_apply, t))
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    for g in grads:
      p, state = step(g, state, p)
  assert_close(p, expected, "update_and_apply")


def test_complex128_runs_on_jnp_with_a_warning():
  """The kernels have no float64 variant: complex128 leaves run on jnp, named in a warning."""
  if "native" not in fusedopt.available_backends():
    pytest.skip("no C++ compiler")
  with jax.enable_x64(True):
    params = {"z": jnp.asarray(np.arange(1, 6) * (1 - 1j), jnp.complex128)}
    grads = make_grads(params, steps=2)
    expected, _ = run(optax.adam(1e-2), params, grads)
    with pytest.warns(RuntimeWarning, match="no float64 kernel for the planes of complex128"):
      got, _ = run(tx.adam(1e-2, backend="native"), params, grads)
    # fusedopt's math is float32 (complex64) whatever the storage dtype
    np.testing.assert_allclose(got["z"], expected["z"], rtol=1e-6)
