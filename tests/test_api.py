"""The flax.optim API surface: pytree behaviour, overrides, no recompiles, errors, checkpoints."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim
from fusedopt.frozen_dict import FrozenDict


def _params():
  return {"dense": {"kernel": jnp.ones((3, 4)) * 0.5, "bias": jnp.zeros((4,))},
          "scale": jnp.float32(2.0)}


def _grads(p, c=0.1):
  return jax.tree.map(lambda x: jnp.full_like(x, c), p)


def test_optimizer_is_a_pytree_through_jit_scan_and_donation():
  opt = optim.Adam(learning_rate=0.1).create(_params())
  g = _grads(opt.target)
  eager = opt
  for _ in range(4):
    eager = eager.apply_gradient(g)

  def body(o, _):
    return o.apply_gradient(g), None
  scanned, _ = jax.lax.scan(body, opt, None, length=4)
  step = jax.jit(lambda o, g: o.apply_gradient(g), donate_argnums=0)
  donated = optim.Adam(learning_rate=0.1).create(_params())
  for _ in range(4):
    old = donated
    donated = step(donated, g)
  assert all(x.is_deleted() for x in jax.tree.leaves(old))  # buffers were donated
  for a, b, c in zip(jax.tree.leaves(eager), jax.tree.leaves(scanned), jax.tree.leaves(donated)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-6)
  assert int(donated.state.step) == 4


@pytest.mark.parametrize("backend", optim.available_backends())
def test_changing_hyper_params_every_step_never_retraces(backend):
  traces = []

  @jax.jit
  def step(opt, g, lr, b1):
    traces.append(1)
    return opt.apply_gradient(g, learning_rate=lr, beta1=b1)

  opt = optim.Adam(learning_rate=0.1, backend=backend).create(_params())
  g = _grads(opt.target)
  for t in range(6):
    opt = step(opt, g, jnp.float32(0.1 / (t + 1)), jnp.float32(0.9 - 0.01 * t))
  assert len(traces) == 1
  assert step._cache_size() == 1


def test_overrides_and_hyper_params_replacement():
  opt_def = optim.Momentum(learning_rate=0.1, beta=0.5)
  hp = opt_def.update_hyper_params(learning_rate=0.2)
  assert (hp.learning_rate, hp.beta) == (0.2, 0.5)
  assert opt_def.update_hyper_params(hyper_params=hp.replace(beta=0.1)).beta == 0.1
  opt = opt_def.create({"w": jnp.ones(3)})
  a = opt.apply_gradient({"w": jnp.ones(3)}, learning_rate=0.2)
  b = opt.apply_gradient({"w": jnp.ones(3)}, hyper_params=hp)
  np.testing.assert_allclose(a.target["w"], 1 - 0.2)
  np.testing.assert_array_equal(a.target["w"], b.target["w"])
  with pytest.raises(TypeError, match=r"unknown hyper-parameter override\(s\) \['lr'\]"):
    opt.apply_gradient({"w": jnp.ones(3)}, lr=0.1)


@pytest.mark.parametrize("make, match", [
    (lambda: optim.Adam(), "no learning rate provided"),
    (lambda: optim.Adam(learning_rate=-1.0), r"learning_rate=-1.0 is outside"),
    (lambda: optim.Adam(learning_rate=0.1, eps=-1e-8), r"eps=-1e-08 is outside"),
    (lambda: optim.Adam(learning_rate=0.1, beta1=1.0), r"beta1=1.0 is outside"),
    (lambda: optim.LAMB(learning_rate=0.1, beta2=-0.1), r"beta2=-0.1 is outside"),
    (lambda: optim.Momentum(learning_rate=0.1, beta=1.5), r"beta=1.5 is outside"),
    (lambda: optim.RMSProp(learning_rate=0.1, beta2=1.0), r"beta2=1.0 is outside"),
    (lambda: optim.Adadelta(learning_rate=0.1, rho=2.0), r"rho=2.0 is outside"),
])
def test_bad_hyper_params_raise_before_any_change(make, match):
  opt = make().create({"w": jnp.ones(3)})
  with pytest.raises(optim.HyperParamError, match=match):
    opt.apply_gradient({"w": jnp.ones(3)})
  np.testing.assert_array_equal(opt.target["w"], 1.0)  # untouched, still usable
  assert int(opt.state.step) == 0


@pytest.mark.parametrize("grads, match", [
    ({"w": jnp.ones(3), "extra": jnp.ones(1)}, "different tree structure"),
    ({"w": jnp.ones(4)}, r"grads leaf \['w'\] has shape \(4,\), expected \(3,\)"),
    ({"w": jnp.ones(3, jnp.int32)}, r"grads leaf \['w'\] has dtype int32"),
])
def test_bad_grads_name_the_leaf(grads, match):
  for backend in optim.available_backends():
    opt = optim.Adam(learning_rate=0.1, backend=backend).create({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=match):
      opt.apply_gradient(grads)
    with pytest.raises(ValueError, match=match):
      jax.jit(lambda o, g: o.apply_gradient(g))(opt, grads)


def test_bad_targets_are_rejected_at_create():
  with pytest.raises(optim.LayoutError, match=r"\['step'\] has dtype int32"):
    optim.Adam(learning_rate=0.1).create({"w": jnp.ones(3), "step": jnp.int32(0)})
  with pytest.raises(ValueError, match="backend='cuda'"):
    optim.Adam(learning_rate=0.1, backend="cuda")


def test_trees_with_none_frozendict_tuples_and_empty_leaves():
  params = FrozenDict({"a": (jnp.ones((2, 2)), None, [jnp.zeros((0,)), jnp.float32(1.0)])})
  opt = optim.Momentum(learning_rate=0.5).create(params)
  opt = jax.jit(lambda o, g: o.apply_gradient(g))(opt, _grads(params, 1.0))
  assert isinstance(opt.target, FrozenDict)
  np.testing.assert_allclose(opt.target["a"][0], 0.5)
  assert opt.target["a"][1] is None and opt.target["a"][2][0].shape == (0,)


def test_compute_gradient_and_optimize_warn_and_return_flax_tuples():
  opt = optim.GradientDescent(learning_rate=0.5).create({"w": jnp.array([1.0, 2.0])})
  loss_fn = lambda p: jnp.sum(p["w"] ** 2)
  with pytest.warns(DeprecationWarning):
    loss, grad = opt.compute_gradient(loss_fn)
  assert float(loss) == 5.0
  np.testing.assert_allclose(grad["w"], [2.0, 4.0])
  with pytest.warns(DeprecationWarning):
    loss, aux, grad = opt.compute_gradients(lambda p: (loss_fn(p), "aux"))
  assert aux == "aux"
  with pytest.warns(DeprecationWarning):
    new_opt, loss = opt.optimize(loss_fn, learning_rate=0.25)
  np.testing.assert_allclose(new_opt.target["w"], [0.5, 1.0])
  with pytest.warns(DeprecationWarning):
    new_opt, loss, aux = opt.optimize(lambda p: (loss_fn(p), 7))
  assert aux == 7


def test_user_subclass_with_only_per_leaf_methods_works_like_flax():
  class Sign(optim.OptimizerDef):
    def init_param_state(self, param):
      return jnp.zeros_like(param)

    def apply_param_gradient(self, step, hyper_params, param, state, grad):
      return param - hyper_params * jnp.sign(grad), state + 1

  opt = Sign(0.5).create({"w": jnp.array([1.0, -1.0])})
  opt = jax.jit(lambda o, g: o.apply_gradient(g))(opt, {"w": jnp.array([3.0, -2.0])})
  np.testing.assert_allclose(opt.target["w"], [0.5, -0.5])
  np.testing.assert_allclose(opt.state.param_states["w"], [1.0, 1.0])
  assert int(opt.state.step) == 1


@pytest.mark.parametrize("name", ["Adam", "LAMB", "AdaBelief", "Momentum", "RMSProp"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_train_without_nan(name, dtype):
  """flax 0.5.3 computed beta**t in the param dtype: 1 - 0.999**t == 0 in bf16 -> NaN."""
  rng = np.random.RandomState(0)
  target = jnp.asarray(rng.standard_normal((64,)), dtype)
  opt = getattr(optim, name)(learning_rate=1e-2).create({"w": target})
  loss = lambda p: jnp.sum(jnp.square(p["w"].astype(jnp.float32) - 1.0))
  step = jax.jit(lambda o: o.apply_gradient(jax.grad(loss)(o.target)))
  start = float(loss(opt.target))
  for _ in range(50):
    opt = step(opt)
  assert opt.target["w"].dtype == dtype
  assert np.all(np.isfinite(np.asarray(opt.target["w"], np.float32)))
  assert float(loss(opt.target)) < 0.9 * start


def test_lamb_has_no_nan_for_zero_updates_and_moves_zero_params():
  params = {"w": jnp.ones((4,)), "b": jnp.zeros((4,))}
  opt = optim.LAMB(learning_rate=0.1).create(params)
  opt = opt.apply_gradient({"w": jnp.zeros((4,)), "b": jnp.ones((4,))})
  np.testing.assert_array_equal(opt.target["w"], 1.0)  # zero update: unchanged, not NaN
  # zero-initialised tensor: trust ratio 1 (flax 0.5.3 gave 0 and it never moved)
  np.testing.assert_allclose(opt.target["b"], -0.1, rtol=1e-5)


def test_state_dict_roundtrip_and_mismatch_errors():
  opt = optim.Adam(learning_rate=0.1).create(_params())
  opt = opt.apply_gradient(_grads(opt.target))
  sd = opt.state_dict()
  assert set(sd) == {"target", "state"}
  assert set(sd["state"]["param_states"]["dense"]["kernel"]) == {"grad_ema", "grad_sq_ema"}
  np.testing.assert_allclose(sd["state"]["param_states"]["dense"]["kernel"]["grad_ema"], 0.01,
                             rtol=1e-6)
  fresh = optim.Adam(learning_rate=0.1).create(_params())
  restored = fresh.restore_state(sd)
  for a, b in zip(jax.tree.leaves(opt), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  bad = {"target": sd["target"], "state": {"step": 1, "param_states": {"dense": {}}}}
  with pytest.raises(ValueError, match="missing"):
    fresh.restore_state(bad)


def test_focus_only_changes_selected_leaves():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  focus = optim.ModelParamTraversal(lambda path, _: "kernel" in path)
  opt = optim.GradientDescent(learning_rate=0.5).create(params, focus=focus)
  opt = opt.apply_gradient(_grads(params, 1.0))
  np.testing.assert_allclose(opt.target["dense"]["kernel"], 0.5)
  np.testing.assert_array_equal(opt.target["dense"]["bias"], 1.0)
  both = optim.ModelParamTraversal(lambda path, _: True)
  with pytest.raises(ValueError, match="Multiple optimizers match the same leaves"):
    optim.MultiOptimizer((focus, optim.Adam(0.1)), (both, optim.Adam(0.1))).create(params)


def test_eager_apply_gradient_is_one_compiled_step():
  """Outside jit, built-in optimizers run the whole update as one cached compiled step (op-by-op
  execution would compile every operation once per leaf shape): same numbers as under jit, one
  compile for every array-valued learning rate, validation still on concrete values."""
  from fusedopt import base
  params = {f"w{i}": jnp.full((i + 1, 3), 0.5, jnp.float32) for i in range(12)}  # 12 shapes
  g = _grads(params)
  opt = optim.Adam(learning_rate=0.1).create(params)
  before = base._jitted_step._cache_size()
  eager = opt
  for t in range(3):
    eager = eager.apply_gradient(g, learning_rate=jnp.float32(0.1 / (t + 1)))
  assert base._jitted_step._cache_size() == before + 1
  jitted = opt
  step = jax.jit(lambda o, g, lr: o.apply_gradient(g, learning_rate=lr))
  for t in range(3):
    jitted = step(jitted, g, jnp.float32(0.1 / (t + 1)))
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(optim.HyperParamError, match="learning_rate"):
    opt.apply_gradient(g, learning_rate=-1.0)


@pytest.mark.parametrize("name, kw", [("Adam", {"weight_decay": 0.01}), ("LAMB", {}),
                                      ("LARS", {"weight_decay": 0.001}),
                                      ("Adadelta", {"weight_decay": 0.01}),
                                      ("Adafactor", {"beta1": 0.9})])
def test_python_float_overrides_never_recompile_and_keep_float64_accuracy(name, kw):
  """Eager steps with a new Python-float learning rate (and beta) each step compile once; their
  numbers equal a jitted step with the same Python floats as constants, bitwise (1 - beta and the
  bias corrections keep the float64 accuracy of the constants: ``fusedopt.exact_float``)."""
  from fusedopt import base
  params = {f"w{i}": jnp.linspace(-1.0, 1.0, 3 * (i + 1) * 130).reshape(3 * (i + 1), 130)
            for i in range(3)}
  g = _grads(params)
  opt = getattr(optim, name)(learning_rate=0.1, **kw).create(params)
  beta = {"Adam": "beta2", "LAMB": "beta2", "LARS": "beta", "Adadelta": "rho",
          "Adafactor": "beta1"}[name]
  before = base._jitted_step._cache_size()
  eager = opt
  for t in range(4):
    eager = eager.apply_gradient(g, learning_rate=0.01 * (t + 1), **{beta: 0.999 - 0.001 * t})
  assert base._jitted_step._cache_size() == before + 1
  jitted = opt
  for t in range(4):
    lr, b = 0.01 * (t + 1), 0.999 - 0.001 * t
    jitted = jax.jit(lambda o, g, lr=lr, b=b: o.apply_gradient(g, learning_rate=lr, **{beta: b}))(
        jitted, g)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    if name == "Adafactor":   # per-leaf jnp math: float32 hyper-parameters, not float64 ones
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flax_modules_are_attributes_of_the_package():
  """README's API table: ``optim.traverse_util`` and ``optim.frozen_dict.FrozenDict`` after
  ``import fusedopt as optim`` alone, as ``flax.traverse_util`` / ``flax.core.frozen_dict``."""
  code = ("import fusedopt as optim; d = optim.frozen_dict.FrozenDict({'a': {'b': 1}}); "
          "assert optim.traverse_util.flatten_dict(d) == {('a', 'b'): 1}")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
