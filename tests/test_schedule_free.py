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
  expected, expected_state = test_tx.run_optax(make(optax), params, grads)
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
  expected, _ = test_tx.run_optax(make(optax), params, [g for k, g in enumerate(grads) if k != 2])
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


# ----------------------------------------------------------------------------- the flax.optim API

def numpy_schedule_free(params, grads, lrs, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, power=2.0):
  """Schedule-free AdamW in float64 NumPy, from the paper (Defazio et al. 2024, Algorithm 1
  with Adam's second moment; the step's learning rate in both the base step and the averaging
  weight, as its reference implementation): ``(y, z)`` after the steps."""
  y = {k: np.asarray(v, np.float64) for k, v in params.items()}
  z = dict(y)
  v = {k: np.zeros_like(x) for k, x in y.items()}
  weight_sum, max_lr = 0.0, 0.0
  for t, (g, lr) in enumerate(zip(grads, lrs)):
    max_lr = max(max_lr, lr)
    weight = max_lr ** power
    weight_sum += weight
    c = weight / weight_sum if weight_sum > 0 else 0.0
    for k in y:
      gk = np.asarray(g[k], np.float64)
      v[k] = b2 * v[k] + (1 - b2) * gk * gk
      u = gk / (np.sqrt(v[k] / (1 - b2 ** (t + 1))) + eps) + wd * y[k]
      z_new = z[k] - lr * u
      x = (1 - c) * ((y[k] - (1 - b1) * z[k]) / b1) + c * z_new
      y[k], z[k] = b1 * x + (1 - b1) * z_new, z_new
  return y, z


def _flat_tree(dtype=jnp.float32):
  rng = np.random.RandomState(4)
  return {"w": jnp.asarray(rng.standard_normal((33, 40)), dtype),
          "b": jnp.asarray(rng.standard_normal(70), dtype), "s": jnp.asarray(1.5, dtype)}


def _flat_grads(tree, n=8):
  rng = np.random.RandomState(5)
  return [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)
          for _ in range(n)]


LRS = [0.0, 0.004, 0.008, 0.01, 0.01, 0.006, 0.003, 0.001]   # warmup from 0, then decay
HP = dict(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, weight_lr_power=1.5)


def _flat_run(backend, tree, grads, **kw):
  opt = fusedopt.ScheduleFreeAdamW(0.01, **dict(HP, **kw), backend=backend).create(tree)
  step = jax.jit(lambda o, g, lr: o.apply_gradient(g, learning_rate=lr))
  for g, lr in zip(grads, LRS):
    opt = step(opt, g, jnp.float32(lr))
  return opt


@pytest.mark.parametrize("backend", ["jnp", "native", "pallas_interpret"])
def test_flat_matches_float64_reference(backend):
  """``fusedopt.ScheduleFreeAdamW`` with a learning rate that warms up from 0 and decays
  (overridden per step, one compiled step), against the paper's algorithm in float64: params,
  ``z`` and the eval point within float32 rounding of the terms; the averaging scalars."""
  if backend not in fusedopt.available_backends():
    pytest.skip(f"{backend} not available")
  tree, grads = _flat_tree(), _flat_grads(_flat_tree())
  opt = _flat_run(backend, tree, grads)
  y, z = numpy_schedule_free(tree, grads, LRS, b1=HP["beta1"], b2=HP["beta2"], eps=HP["eps"],
                             wd=HP["weight_decay"], power=HP["weight_lr_power"])
  for k in tree:
    np.testing.assert_allclose(opt.target[k], y[k], rtol=2e-5, atol=2e-6, err_msg=k)
    np.testing.assert_allclose(opt.state.param_states[k].z, z[k], rtol=2e-5, atol=2e-6)
  ev = opt.optimizer_def.eval_params(opt)
  for k in tree:
    np.testing.assert_allclose(ev[k], (y[k] - (1 - HP["beta1"]) * z[k]) / HP["beta1"],
                               rtol=2e-5, atol=1e-5, err_msg=k)
  assert int(opt.state.step) == len(LRS)
  np.testing.assert_allclose(float(opt.state.max_lr), 0.01, rtol=1e-7)
  np.testing.assert_allclose(float(opt.state.weight_sum),
                             sum(max(LRS[:i + 1]) ** 1.5 for i in range(len(LRS))), rtol=1e-6)


def test_flat_equals_tx_at_a_constant_learning_rate():
  """At a constant learning rate the flat API and ``tx.schedule_free_adamw`` (optax's schedule
  reading: the averaging at the 1-based ``step_count``) are the same algorithm."""
  tree, grads = _flat_tree(), _flat_grads(_flat_tree())
  opt = fusedopt.ScheduleFreeAdamW(0.01, weight_decay=0.1).create(tree)
  step = jax.jit(lambda o, g: o.apply_gradient(g))
  for g in grads:
    opt = step(opt, g)
  expected, state = test_tx.run(tx.schedule_free_adamw(0.01, weight_decay=0.1), tree, grads)
  test_tx.assert_close(opt.target, expected, "flat vs tx", rtol=1e-5, atol_rel=1e-5)
  assert float(opt.state.weight_sum) == float(state.weight_sum)


def test_flat_checked_step_skips_everything_and_master_weights():
  """``apply_gradient_checked``: a NaN gradient changes nothing (params, state, step and the
  averaging scalars, bitwise); bf16 params with master weights follow the float32 run."""
  tree = _flat_tree(jnp.bfloat16)
  grads = _flat_grads(tree, 4)
  d = fusedopt.ScheduleFreeAdamW(0.01, weight_decay=0.1, master_weights=True)
  opt = d.create(tree)
  checked = jax.jit(lambda o, g: o.apply_gradient_checked(g))
  for k, g in enumerate(grads):
    if k == 2:
      bad = dict(g, b=g["b"].at[0].set(jnp.nan))
      new, finite, _ = checked(opt, bad)
      assert not bool(finite)
      for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(opt)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    opt, finite, _ = checked(opt, g)
    assert bool(finite)
  f32 = fusedopt.ScheduleFreeAdamW(0.01, weight_decay=0.1).create(
      jax.tree.map(lambda x: x.astype(jnp.float32), tree))
  for g in grads:
    f32 = f32.apply_gradient(jax.tree.map(lambda x: x.astype(jnp.float32), g))
  for k in tree:
    np.testing.assert_allclose(opt.state.param_states[k].master, f32.target[k], rtol=2e-6,
                               atol=1e-6)
    assert opt.target[k].dtype == jnp.bfloat16


def test_flat_checkpoint_round_trip():
  """The averaging scalars are part of the checkpoint: restoring into a fresh optimizer and
  continuing equals not stopping; a checkpoint without them is a clear error."""
  tree, grads = _flat_tree(), _flat_grads(_flat_tree())
  d = fusedopt.ScheduleFreeAdamW(0.01, weight_decay=0.1)
  opt = d.create(tree)
  for g in grads[:4]:
    opt = opt.apply_gradient(g)
  sd = fusedopt.serialization.to_state_dict(opt)
  assert set(sd["state"]) == {"step", "param_states", "weight_sum", "max_lr"}
  restored = fusedopt.serialization.from_bytes(d.create(tree),
                                               fusedopt.serialization.to_bytes(opt))
  assert float(restored.state.weight_sum) == float(opt.state.weight_sum) > 0
  for g in grads[4:]:
    opt, restored = opt.apply_gradient(g), restored.apply_gradient(g)
  for a, b in zip(jax.tree.leaves(opt), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  del sd["state"]["weight_sum"]
  with pytest.raises(ValueError, match="weight_sum"):
    fusedopt.serialization.from_state_dict(d.create(tree), sd)


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_flat_sharded_driver_carries_the_averaging_scalars(mode):
  """``shard_optimizer`` (ZeRO-1 and FSDP, here on a one-device mesh; 8 devices in
  tests/sharding_checks.py) initialises ``z`` from the params, carries the optimizer-wide
  scalars replicated beside the split buffers and steps as the single-device optimizer,
  checked steps and ``partition_specs`` included."""
  tree, grads = _flat_tree(), _flat_grads(_flat_tree(), 4)
  d = fusedopt.ScheduleFreeAdamW(0.01, weight_decay=0.1, backend="jnp")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  sd = fusedopt.shard_optimizer(d, mesh, "x", params=mode)
  single, opt = d.create(tree), sd.create(tree)
  assert isinstance(opt.state, fusedopt.ScheduleFreeOptimizerState)
  specs = fusedopt.sharding.partition_specs(opt)
  assert specs.state.weight_sum == jax.sharding.PartitionSpec()
  pack = (lambda g, o: fusedopt.FlatParams.pack(g, o.target.layout)) if mode == "sharded" else (
      lambda g, o: g)
  step = jax.jit(lambda o, g: o.apply_gradient_checked(pack(g, o))[0])
  for g in grads:
    single, opt = single.apply_gradient(g), step(opt, g)
  got = opt.target.tree() if mode == "sharded" else opt.target
  for k in tree:
    np.testing.assert_allclose(got[k], single.target[k], rtol=1e-6, atol=1e-7, err_msg=k)
  assert float(opt.state.weight_sum) == float(single.state.weight_sum)
  assert float(opt.state.max_lr) == float(single.state.max_lr) and int(opt.state.step) == 4


def test_flat_in_a_multi_optimizer():
  """``MultiOptimizer`` with a schedule-free part and an Adam part (unfused: two kinds): each
  part as its optimizer alone, the averaging scalars kept per sub-optimizer
  (``MultiOptimizerState.outer``), through a checkpoint too."""
  tree, grads = _flat_tree(), _flat_grads(_flat_tree(), 4)
  mats = fusedopt.ModelParamTraversal(lambda path, x: x.ndim == 2)
  rest = fusedopt.ModelParamTraversal(lambda path, x: x.ndim != 2)
  sf, adam = fusedopt.ScheduleFreeAdamW(0.01, weight_decay=0.1), fusedopt.Adam(0.01)
  multi = fusedopt.MultiOptimizer((mats, sf), (rest, adam))
  opt = multi.create(tree)
  step = jax.jit(lambda o, g: o.apply_gradient(g))
  for g in grads[:2]:
    opt = step(opt, g)
  opt = fusedopt.serialization.from_bytes(multi.create(tree),
                                          fusedopt.serialization.to_bytes(opt))
  for g in grads[2:]:
    opt = step(opt, g)
  alone = {"sf": sf.create({"w": tree["w"]}), "adam": adam.create({"b": tree["b"], "s": tree["s"]})}
  for g in grads:
    alone["sf"] = alone["sf"].apply_gradient({"w": g["w"]})
    alone["adam"] = alone["adam"].apply_gradient({"b": g["b"], "s": g["s"]})
  np.testing.assert_array_equal(opt.target["w"], alone["sf"].target["w"])
  np.testing.assert_array_equal(opt.target["b"], alone["adam"].target["b"])
  assert float(opt.state.outer[0]["weight_sum"]) == float(alone["sf"].state.weight_sum)
  assert opt.state.outer[1] == {}


def test_flat_fused_multi_optimizer():
  """Two schedule-free parts (other learning rates and decays) fuse into one pass, each with
  its own averaging scalars: equal to each part alone; a skipped checked step keeps them."""
  tree, grads = _flat_tree(), _flat_grads(_flat_tree(), 4)
  mats = fusedopt.ModelParamTraversal(lambda path, x: x.ndim == 2)
  rest = fusedopt.ModelParamTraversal(lambda path, x: x.ndim != 2)
  a = fusedopt.ScheduleFreeAdamW(0.01, weight_decay=0.1)
  b = fusedopt.ScheduleFreeAdamW(0.003, beta1=0.8)
  multi = fusedopt.MultiOptimizer((mats, a), (rest, b))
  opt = multi.create(tree)
  assert type(opt.state.param_states).__name__ == "FusedMultiState"
  step = jax.jit(lambda o, g: o.apply_gradient_checked(g)[0])
  for k, g in enumerate(grads):
    if k == 2:
      skipped = step(opt, dict(g, s=jnp.float32(jnp.nan)))
      for x, y in zip(jax.tree.leaves(skipped), jax.tree.leaves(opt)):
        np.testing.assert_array_equal(x, y)
    opt = step(opt, g)
  alone = {"a": a.create({"w": tree["w"]}), "b": b.create({"b": tree["b"], "s": tree["s"]})}
  for g in grads:
    alone["a"] = alone["a"].apply_gradient({"w": g["w"]})
    alone["b"] = alone["b"].apply_gradient({"b": g["b"], "s": g["s"]})
  np.testing.assert_allclose(opt.target["w"], alone["a"].target["w"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(opt.target["b"], alone["b"].target["b"], rtol=1e-6, atol=1e-7)
  assert [float(o["weight_sum"]) for o in opt.state.outer] == [
      float(alone["a"].state.weight_sum), float(alone["b"].state.weight_sum)]


def test_flat_paths_without_optimizer_wide_state_are_clear_errors():
  tree = _flat_tree()
  d = fusedopt.ScheduleFreeAdamW(0.01)
  with pytest.raises(NotImplementedError, match="per-leaf state form"):
    d.init_param_state(tree["w"])
  with pytest.raises(HyperParamError, match="beta1"):
    fusedopt.ScheduleFreeAdamW(0.01, beta1=0.0).create(tree).apply_gradient(tree)


def test_flat_state_dtype_and_stochastic_rounding():
  """The built-ins' storage options apply: ``state_dtype=bfloat16`` stores ``v`` and ``z`` in
  bf16 (the run stays within bf16 rounding of the float32 one); bf16 params with
  ``stochastic_rounding`` move where rounding to nearest would lose the step, the same on the
  native kernels as on jnp."""
  tree, grads = _flat_tree(), _flat_grads(_flat_tree(), 4)
  ref = _flat_run("jnp", tree, grads[:4])
  low = _flat_run("jnp", tree, grads[:4], state_dtype=jnp.bfloat16)
  assert low.state.param_states.fields["z"][0].dtype == jnp.bfloat16
  for k in tree:
    np.testing.assert_allclose(low.target[k], ref.target[k], rtol=2e-2, atol=2e-2, err_msg=k)
  bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
  runs = {}
  for b in [b for b in ("jnp", "native") if b in fusedopt.available_backends()]:
    opt = fusedopt.ScheduleFreeAdamW(1e-4, backend=b, stochastic_rounding=True).create(bf)
    for g in grads[:3]:
      opt = opt.apply_gradient(jax.tree.map(lambda x: x.astype(jnp.bfloat16), g))
    runs[b] = opt.target
  near = fusedopt.ScheduleFreeAdamW(1e-4).create(bf)
  for g in grads[:3]:
    near = near.apply_gradient(jax.tree.map(lambda x: x.astype(jnp.bfloat16), g))
  assert any(not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
             for a, b in zip(jax.tree.leaves(runs["jnp"]), jax.tree.leaves(near.target)))
  for a, b in zip(jax.tree.leaves(runs["jnp"]), jax.tree.leaves(runs.get("native", runs["jnp"]))):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=2 ** -7, atol=0)
