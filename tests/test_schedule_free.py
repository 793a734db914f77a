"""Schedule-free AdamW (Defazio et al. 2024; issue 19): ``fusedopt.tx.schedule_free_adamw``
against ``optax.contrib.schedule_free_adamw`` (0.2.8) -- state structure, values after 20 steps,
the averaging scalars, the point to evaluate -- and its rule on the kernel backends.

Tolerances as test_tx's: optax's bias correction ``1 - b2^t`` rounds ``b2`` in float32
(fusedopt's is exact), so the params are compared at rtol 1e-5 and, against optax run in
float64, fusedopt's must be at least as close as optax's own.
"""
import functools
import inspect
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp

optax = pytest.importorskip("optax")

import fusedopt  # noqa: E402
from fusedopt import tx  # noqa: E402
from fusedopt.base import HyperParamError  # noqa: E402
import test_tx  # noqa: E402


def _sf(m):
  return m.contrib if m is optax else m


CASES = [
    ("defaults", lambda m: _sf(m).schedule_free_adamw()),
    ("wd_betas_power", lambda m: _sf(m).schedule_free_adamw(
        1e-2, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1, weight_lr_power=1.0)),
    ("warmup", lambda m: _sf(m).schedule_free_adamw(1e-2, warmup_steps=5, weight_decay=1e-2)),
    # a schedule the averaging reads at optax's 1-based step_count, the base at its 0-based
    # count; it rises and then decays, so the averaging weight follows its maximum so far
    ("schedule", lambda m: _sf(m).schedule_free_adamw(
        optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 20), b1=0.95)),
]


@pytest.fixture(scope="module")
def zoo_f32():
  """test_tx's tree of float32 and complex64 leaves, ``None`` and empty subtrees."""
  params = test_tx.make_zoo(bf16=False)
  return params, test_tx.make_grads(params)


def _scalars(state):
  sf = state[0] if isinstance(state, tuple) and not hasattr(state, "_fields") else state
  return {k: np.asarray(getattr(sf, k)) for k in ("b1", "weight_sum", "step_count", "max_lr")}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tx_agrees_with_optax(case, zoo_f32):
  """20 steps on float32 and complex64 leaves: optax's state structure exactly, its averaging
  scalars (``weight_sum``, ``max_lr``: within float32 rounding; ``step_count``: 21), params,
  ``z`` and ``nu`` as closely as optax's float32 bias correction allows, fusedopt's params at
  least as close to optax in float64, and the point to evaluate."""
  name, make = case
  params, grads = zoo_f32
  expected, expected_state = test_tx.run(make(optax), params, grads)
  got, state = test_tx.run(make(tx), params, grads)
  test_tx.assert_same_structure(state, expected_state)
  ours, theirs = _scalars(state), _scalars(expected_state)
  assert int(ours["step_count"]) == int(theirs["step_count"]) == len(grads) + 1
  for k in ("b1", "weight_sum", "max_lr"):
    np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, err_msg=k)
  test_tx.assert_close(got, expected, name, rtol=1e-5, atol_rel=1e-5)
  test_tx.assert_close(state, expected_state, name, rtol=1e-5, atol_rel=1e-5)
  test_tx.assert_as_accurate(got, expected, test_tx.run64(make, params, grads), name, ulps=4)
  test_tx.assert_close(tx.schedule_free_eval_params(state, got),
                       optax.contrib.schedule_free_eval_params(expected_state, expected),
                       name + " eval", rtol=1e-5, atol_rel=1e-5)


def test_warmup_first_step_does_not_move_the_params():
  """With warmup the base step's learning rate is 0 at count 0, so ``z`` and the params stay;
  the averaging reads the schedule at the 1-based ``step_count`` (optax's), so its weight is
  already ``(lr / warmup_steps)^2``."""
  params = {"w": jnp.linspace(-1.0, 1.0, 7)}
  t = tx.schedule_free_adamw(1e-2, warmup_steps=4)
  u, state = t.update({"w": jnp.ones(7)}, t.init(params), params)
  np.testing.assert_array_equal(u["w"], np.zeros(7, np.float32))
  np.testing.assert_array_equal(state.z["w"], params["w"])
  assert float(state.max_lr) == np.float32(1e-2 / 4)
  assert float(state.weight_sum) == np.float32(np.float32(1e-2 / 4) ** 2)
  assert int(state.step_count) == 2


def test_skip_nonfinite_leaves_everything_unchanged(zoo_f32):
  """A step with a NaN gradient changes nothing, the averaging scalars and ``step_count``
  included; the run equals optax's on the finite steps."""
  params, grads = zoo_f32
  grads = [dict(g) for g in grads[:6]]
  grads[2]["dense"] = dict(grads[2]["dense"], bias=grads[2]["dense"]["bias"].at[0].set(jnp.nan))
  make = lambda m, **k: _sf(m).schedule_free_adamw(1e-2, weight_decay=0.1, **k)  # noqa: E731
  t = make(tx, skip_nonfinite=True)
  step = jax.jit(t.update)
  p, s = params, t.init(params)
  for k, g in enumerate(grads):
    u, s_new = step(g, s, p)
    if k == 2:
      for a, b in zip(jax.tree.leaves(s_new), jax.tree.leaves(s)):
        np.testing.assert_array_equal(a, b)
    p, s = optax.apply_updates(p, u), s_new
  expected, _ = test_tx.run(make(optax), params, [g for k, g in enumerate(grads) if k != 2])
  test_tx.assert_close(p, expected, "skip_nonfinite", rtol=1e-5, atol_rel=1e-5)


@pytest.mark.parametrize("backend", ["native", "pallas_interpret"])
def test_kernel_backends_match_jnp(backend, zoo_f32):
  """The rule on a kernel backend (complex leaves as planes), two-call and one-pass forms,
  against the jnp backend, with no fallback warning."""
  if backend not in fusedopt.available_backends():
    pytest.skip(f"{backend} not available")
  params, grads = zoo_f32
  grads = grads[:4]
  make = lambda b: tx.schedule_free_adamw(1e-2, weight_decay=0.1, backend=b)  # noqa: E731
  expected, expected_state = test_tx.run(make("jnp"), params, grads)
  t = make(backend)
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    got, state = test_tx.run(t, params, grads)
    one = jax.jit(functools.partial(tx.update_and_apply, t))
    p, s = params, t.init(params)
    for g in grads:
      p, s = one(g, s, p)
  for what, a, b in (("two calls", got, expected), ("state", state, expected_state),
                     ("one pass", p, expected)):
    test_tx.assert_close(a, b, f"{backend} {what}")


def test_defaults_are_optax():
  """Every argument optax's ``schedule_free_adamw`` has, with its default, in its order; then
  fusedopt's keyword-only extras."""
  ours = inspect.signature(tx.schedule_free_adamw).parameters
  theirs = inspect.signature(optax.contrib.schedule_free_adamw).parameters
  assert list(ours)[:len(theirs)] == list(theirs)
  assert all(ours[k].default == p.default for k, p in theirs.items())
  assert set(list(ours)[len(theirs):]) == {"backend", "clip_global_norm", "skip_nonfinite"}
  assert tx.schedule_free_eval_params is optax.contrib.schedule_free_eval_params


@pytest.mark.parametrize("kw, match", [
    (dict(b1=0.0), "b1"), (dict(b1=1.5), "b1"), (dict(b2=1.0), "b2"),
    (dict(learning_rate=-1.0), "learning_rate"), (dict(warmup_steps=0), "warmup_steps"),
    (dict(warmup_steps=2.5), "warmup_steps"), (dict(weight_lr_power="2"), "weight_lr_power")])
def test_bad_hyper_parameters_are_clear_errors(kw, match):
  with pytest.raises(HyperParamError, match=match):
    tx.schedule_free_adamw(**kw)


def test_params_are_required():
  t = tx.schedule_free_adamw()
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="reads the parameters"):
    t.update(params, t.init(params))
