"""flax 0.5.3 conformance of tree-shaped behaviour (issue 16, items 4-6): the per-leaf view of a
``focus=``/``MultiOptimizer`` state (None outside the traversals, the 0.5.3 clash message),
empty trees and empty subtrees (every backend, eager and jit, the checked step, checkpoints),
and ``Optimizer.replicate``/``unreplicate`` with ``jax.pmap``.

Expected values are derived by hand (one Momentum step from zero state: ``m = g``,
``p' = p - lr * g``) or taken from the same optimizer on the non-empty part of the tree; the
0.5.3 messages and checkpoint dicts are the ones flax 0.5.3 produces (also checked against the
real flax 0.5.3 by tests/test_flax053_differential.py's ``empty_*``, ``view_*``, ``clash_*`` and
``replicate_*`` scenarios).
"""
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim
from conftest import host_devices_flags
from fusedopt import serialization
from fusedopt.base import OPTAX_DEPRECATION, ReplicatedOptimizer
from fusedopt.frozen_dict import FrozenDict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = optim.available_backends()
A_ONLY = optim.ModelParamTraversal(lambda path, _: path == "/a")
KERNELS = optim.ModelParamTraversal(lambda path, _: path.endswith("/kernel"))
BIASES = optim.ModelParamTraversal(lambda path, _: path.endswith("/bias"))


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _leaves_close(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def _step(opt, grads, mode):
  if mode == "jit":
    return jax.jit(lambda o, g: o.apply_gradient(g))(opt, grads)
  return opt.apply_gradient(grads)


# ------------------------------------------------------------------------------- empty trees

EMPTY_DEFS = {
    "GradientDescent": lambda b: optim.GradientDescent(learning_rate=0.1, backend=b),
    "Momentum": lambda b: optim.Momentum(learning_rate=0.1, backend=b),
    "Adam": lambda b: optim.Adam(learning_rate=0.1, weight_decay=0.1, backend=b),
    "LAMB": lambda b: optim.LAMB(learning_rate=0.1, backend=b),
    "LARS": lambda b: optim.LARS(learning_rate=0.1, backend=b),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(EMPTY_DEFS))
def test_empty_tree_steps_count_on_every_backend(name, backend):
  for mode in ("eager", "jit"):
    opt = EMPTY_DEFS[name](backend).create({})
    assert opt.state.param_states.per_leaf() == {}
    for k in (1, 2):
      opt = _step(opt, {}, mode)
      assert opt.target == {} and int(opt.state.step) == k
    opt, finite, norm = opt.apply_gradient_checked({}, grad_scale=0.5, clip_global_norm=1.0)
    assert opt.target == {} and int(opt.state.step) == 3
    assert bool(finite) and float(norm) == 0.0
  # flax 0.5.3's state dict of an empty-tree optimizer (param_states: the empty target)
  assert serialization.to_state_dict(opt) == {"target": {}, "state": {"step": 3,
                                                                      "param_states": {}}}


def test_empty_trees_of_every_kind_and_per_leaf_optimizers():
  for empty in ({}, (), [], {"a": {}, "b": ()}, FrozenDict({})):
    for opt_def in (optim.Momentum(0.1), optim.Adafactor(0.1), optim.Adagrad(0.1),
                    optim.WeightNorm(optim.Momentum(0.1))):
      opt = opt_def.create(empty)
      opt = opt.apply_gradient(empty)
      opt = jax.jit(lambda o, g: o.apply_gradient(g))(opt, empty)
      assert opt.target == empty and type(opt.target) is type(empty)
      assert int(opt.state.step) == 2


def test_empty_tree_with_focus_and_multi_optimizer():
  for mode in ("eager", "jit"):
    # focus over an empty dict, a fused and an unfused MultiOptimizer over an empty dict
    for opt in (optim.Momentum(0.1).create({}, focus=A_ONLY),
                optim.MultiOptimizer((KERNELS, optim.Adam(0.1)),
                                     (BIASES, optim.Adam(0.2))).create({}),
                optim.MultiOptimizer((KERNELS, optim.Adam(0.1)),
                                     (BIASES, optim.Momentum(0.2))).create({})):
      assert opt.state.param_states.per_leaf() == {}
      opt = _step(_step(opt, {}, mode), {}, mode)
      assert opt.target == {} and int(opt.state.step) == 2
      sd = opt.state_dict()
      assert sd == {"target": {}, "state": {"step": 2, "param_states": {}}}
      restored = opt.restore_state(sd)
      assert int(restored.state.step) == 2 and restored.target == {}


def test_empty_tree_checkpoint_bytes_and_restore():
  opt = optim.Adam(0.1).create({}).apply_gradient({})
  data = serialization.to_bytes(opt)
  # flax's msgpack of {'target': {}, 'state': {'step': int32 1, 'param_states': {}}}
  assert serialization.msgpack_restore(data) == {
      "target": {}, "state": {"step": np.int32(1), "param_states": {}}}
  fresh = optim.Adam(0.1).create({})
  restored = serialization.from_bytes(fresh, data)
  assert int(restored.state.step) == 1 and serialization.to_bytes(restored) == data
  with pytest.raises(ValueError):   # a checkpoint of a non-empty tree does not fit
    serialization.from_bytes(fresh, serialization.to_bytes(
        optim.Adam(0.1).create({"w": jnp.ones(2)})))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_subtrees_are_kept_and_change_nothing(backend):
  x, g = jnp.array([1.0, -2.0, 3.0]), jnp.array([0.5, 0.25, -1.0])
  params, grads = {"a": x, "c": {}, "d": {"e": {}}}, {"a": g, "c": {}, "d": {"e": {}}}
  for mode in ("eager", "jit"):
    ref = _step(optim.Adam(0.1, weight_decay=0.01, backend="jnp").create({"a": x}), {"a": g},
                mode)
    opt = _step(optim.Adam(0.1, weight_decay=0.01, backend=backend).create(params), grads, mode)
    assert opt.target["c"] == {} and opt.target["d"] == {"e": {}}
    np.testing.assert_allclose(opt.target["a"], ref.target["a"], rtol=1e-6)
    view = opt.state.param_states.per_leaf()
    assert view["c"] == {} and view["d"] == {"e": {}}
    chk, finite, norm = optim.Adam(0.1, weight_decay=0.01, backend=backend).create(
        params).apply_gradient_checked(grads)
    assert bool(finite) and int(chk.state.step) == 1
    np.testing.assert_allclose(float(norm), float(jnp.linalg.norm(g)), rtol=1e-6)
    np.testing.assert_allclose(chk.target["a"], ref.target["a"], rtol=1e-6)
  sd = opt.state_dict()
  assert sd["target"]["c"] == {} and sd["state"]["param_states"]["d"] == {"e": {}}
  restored = optim.Adam(0.1, backend=backend).create(params).restore_state(sd)
  _leaves_equal(restored.state_dict(), sd)


@pytest.mark.parametrize("fuse", [True, False])
def test_empty_subtrees_with_focus_and_multi(fuse):
  x, y = jnp.array([1.0, 2.0]), jnp.array([[3.0]])
  params = {"a": x, "b": y, "c": {}}
  grads = {"a": jnp.array([1.0, -1.0]), "b": jnp.array([[2.0]]), "c": {}}
  opts = [optim.Momentum(0.1).create(params, focus=A_ONLY),
          optim.MultiOptimizer((A_ONLY, optim.Momentum(0.1)),
                               (optim.ModelParamTraversal(lambda p, _: p == "/b"),
                                optim.Momentum(0.5)), fuse=fuse).create(params)]
  for opt in opts:
    for mode in ("eager", "jit"):
      new = _step(opt, grads, mode)
      assert new.target["c"] == {} and new.state.param_states.per_leaf()["c"] == {}
      np.testing.assert_allclose(new.target["a"], x - 0.1 * grads["a"], rtol=1e-6)
      if new.state.param_states.per_leaf()["b"] is None:   # focus: b is not optimized
        np.testing.assert_array_equal(new.target["b"], y)
      else:
        np.testing.assert_allclose(new.target["b"], y - 0.5 * grads["b"], rtol=1e-6)
    sd = new.state_dict()
    assert sd["state"]["param_states"]["c"] == {}
    _leaves_equal(opt.restore_state(sd).state_dict(), sd)


# ------------------------------------------------------------------- focus / MultiOptimizer view

def _params():
  return {"Dense_0": {"kernel": jnp.full((2, 3), 0.5), "bias": jnp.array([1.0, -1.0, 2.0])},
          "scale": jnp.float32(2.0), "empty": {}}


def _grads():
  return {"Dense_0": {"kernel": jnp.full((2, 3), 0.25), "bias": jnp.array([0.5, 1.0, -2.0])},
          "scale": jnp.float32(4.0), "empty": {}}


def _field_values(st):
  """A per-leaf state's arrays (dict of fields or a flax-style state dataclass)."""
  return [np.asarray(v) for v in jax.tree_util.tree_leaves(st)]


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_focus_state_view_is_none_outside_the_focus(mode):
  # Momentum, fused (one sub-optimizer): one step from zero state is m = g, p' = p - lr * g
  opt = optim.Momentum(0.1).create(_params(), focus=KERNELS)
  view = opt.state.param_states.per_leaf()
  assert view["Dense_0"]["bias"] is None and view["scale"] is None and view["empty"] == {}
  assert [v.shape for v in _field_values(view["Dense_0"]["kernel"])] == [(2, 3)]
  opt = _step(opt, _grads(), mode)
  view = opt.state.param_states.per_leaf()
  assert sorted(view) == ["Dense_0", "empty", "scale"] and sorted(view["Dense_0"]) == [
      "bias", "kernel"]
  assert view["Dense_0"]["bias"] is None and view["scale"] is None and view["empty"] == {}
  np.testing.assert_allclose(_field_values(view["Dense_0"]["kernel"])[0], 0.25)
  np.testing.assert_allclose(opt.target["Dense_0"]["kernel"], 0.5 - 0.1 * 0.25)
  np.testing.assert_array_equal(opt.target["Dense_0"]["bias"], [1.0, -1.0, 2.0])
  # read like 0.5.3's tree, as the state of a plain optimizer reads
  assert opt.state.param_states["scale"] is None
  np.testing.assert_allclose(opt.state.param_states["Dense_0"]["kernel"].momentum, 0.25)
  # the view of one leaf is what the optimizer alone gives that leaf
  alone = _step(optim.Momentum(0.1).create({"k": _params()["Dense_0"]["kernel"]}),
                {"k": _grads()["Dense_0"]["kernel"]}, mode)
  _leaves_close(view["Dense_0"]["kernel"], alone.state.param_states.per_leaf()["k"])


@pytest.mark.parametrize("make", [
    lambda: optim.MultiOptimizer((KERNELS, optim.Momentum(0.1)), (BIASES, optim.Momentum(0.5))),
    lambda: optim.MultiOptimizer((KERNELS, optim.Momentum(0.1)), (BIASES, optim.Momentum(0.5)),
                                 fuse=False),
    lambda: optim.MultiOptimizer((KERNELS, optim.Momentum(0.1)), (BIASES, optim.Adam(0.5))),
    lambda: optim.MultiOptimizer((KERNELS, optim.LAMB(0.1)), (BIASES, optim.Adafactor(0.5))),
], ids=["fused", "unfused", "mixed", "lamb_adafactor"])
def test_multi_optimizer_view_mirrors_the_target(make):
  opt_def = make()
  opt = jax.jit(lambda o, g: o.apply_gradient(g))(opt_def.create(_params()), _grads())
  view = opt.state.param_states.per_leaf()
  assert view["scale"] is None and view["empty"] == {}
  # each leaf's state: its sub-optimizer's own per-leaf state for that leaf
  for (trav, sub), path in zip(zip(opt_def.traversals, opt_def.sub_optimizers),
                               ("kernel", "bias")):
    alone = jax.jit(lambda o, g: o.apply_gradient(g))(
        sub.create({"x": _params()["Dense_0"][path]}), {"x": _grads()["Dense_0"][path]})
    got, want = view["Dense_0"][path], alone.state.param_states
    want = want.per_leaf()["x"] if hasattr(want, "per_leaf") else want["x"]
    _leaves_close(got, want)
    _leaves_close(opt.target["Dense_0"][path], alone.target["x"])
  np.testing.assert_array_equal(opt.target["scale"], 2.0)


def test_checked_step_with_focus_covers_the_selected_leaves():
  params, grads = _params(), _grads()
  opt = optim.Momentum(0.1).create(params, focus=KERNELS)
  new, finite, norm = jax.jit(lambda o, g: o.apply_gradient_checked(g, grad_scale=0.5))(
      opt, grads)
  assert bool(finite) and int(new.state.step) == 1
  np.testing.assert_allclose(float(norm), 0.125 * np.sqrt(6), rtol=1e-6)   # kernel only
  np.testing.assert_allclose(new.target["Dense_0"]["kernel"], 0.5 - 0.1 * 0.125, rtol=1e-6)
  np.testing.assert_array_equal(new.target["Dense_0"]["bias"], params["Dense_0"]["bias"])
  # a non-finite selected gradient skips the step; an unselected one is never read
  bad = dict(grads, Dense_0=dict(grads["Dense_0"], kernel=grads["Dense_0"]["kernel"].at[0, 0]
                                  .set(jnp.inf)))
  skipped, finite, _ = opt.apply_gradient_checked(bad)
  assert not bool(finite) and int(skipped.state.step) == 0
  _leaves_equal(skipped.target, opt.target)
  ignored = dict(grads, scale=jnp.float32(jnp.nan))
  assert bool(opt.apply_gradient_checked(ignored)[1])
  mixed = optim.MultiOptimizer((KERNELS, optim.Momentum(0.1)), (BIASES, optim.Adam(0.1)))
  with pytest.raises(TypeError, match="fused MultiOptimizer"):
    mixed.create(params).apply_gradient_checked(grads)


CLASH = ("Multiple optimizers match the same leaves : "
         "{'Dense_0': {'bias': [1], 'kernel': [0, 1]}, 'n': [0, 1], 'scale': []}")


@pytest.mark.parametrize("fuse", [True, False])
def test_clash_message_is_flax_053s_and_comes_first(fuse):
  # the integer leaf 'n', selected twice, gets the clash error, not a dtype error
  params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
            "n": jnp.int32(3), "scale": jnp.float32(1.0)}
  everything_but_scale = optim.ModelParamTraversal(lambda path, _: path != "/scale")
  kernels_and_n = optim.ModelParamTraversal(lambda path, _: "kernel" in path or path == "/n")
  opt_def = optim.MultiOptimizer((kernels_and_n, optim.Momentum(0.1)),
                                 (everything_but_scale, optim.Momentum(0.2)), fuse=fuse)
  with pytest.raises(ValueError) as e:
    opt_def.create(params)
  assert str(e.value) == CLASH
  with pytest.raises(ValueError) as e:
    opt_def.create(FrozenDict(params))
  assert str(e.value) == ("Multiple optimizers match the same leaves : FrozenDict({\n"
                          "    Dense_0: {\n        bias: [1],\n        kernel: [0, 1],\n    },\n"
                          "    n: [0, 1],\n    scale: [],\n})")


# ------------------------------------------------------------------------ replicate / unreplicate

def test_replicate_warns_and_round_trips_on_the_host_devices():
  params, grads = _params(), _grads()
  n = jax.local_device_count()
  opt = optim.Adam(0.1, weight_decay=0.01).create(params)
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    rep = opt.replicate()
  assert [(x.category, str(x.message)) for x in w] == [(DeprecationWarning, OPTAX_DEPRECATION)]
  assert isinstance(rep.optimizer_def, ReplicatedOptimizer)
  assert rep.optimizer_def.axis_name == "batch"
  assert rep.target["Dense_0"]["kernel"].shape == (n, 2, 3) and rep.state.step.shape == (n,)
  # the checkpoint of a replicated optimizer is one copy's
  _leaves_equal(rep.state_dict(), opt.state_dict())
  step = jax.pmap(lambda o, g: o.apply_gradient(g), axis_name="batch")
  stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x] * n), grads)
  rep = step(rep, stacked)
  rep = step(rep, stacked)
  plain = opt.apply_gradient(grads).apply_gradient(grads)
  with warnings.catch_warnings():
    warnings.simplefilter("error")   # unreplicate does not warn (nor did 0.5.3's)
    back = rep.unreplicate()
  assert type(back.optimizer_def) is optim.Adam
  for a, b in zip(jax.tree_util.tree_leaves(back.state_dict()),
                  jax.tree_util.tree_leaves(plain.state_dict())):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert back.target["empty"] == {}
  # restore_state into the replicated optimizer replicates what it reads
  restored = rep.restore_state(plain.state_dict())
  assert restored.state.step.shape == (n,) and int(restored.state.step[0]) == 2
  _leaves_equal(restored.state_dict(), plain.state_dict())
  with pytest.raises(ValueError, match="Cannot unreplicate an optimizer that is not replicated"):
    opt.unreplicate()


def test_replicate_outside_pmap_has_no_axis():
  with pytest.warns(DeprecationWarning, match="Use `optax` instead of `flax.optim`"):
    rep = optim.Momentum(0.1).create({"w": jnp.ones(2)}).replicate()
  with pytest.raises(NameError, match="batch"):
    rep.apply_gradient({"w": jnp.ones((jax.local_device_count(), 2))})


PMAP_SCRIPT = textwrap.dedent("""
    import warnings
    import jax, jax.numpy as jnp, numpy as np
    import fusedopt as optim
    assert jax.local_device_count() == 2, jax.devices()
    warnings.simplefilter("ignore", DeprecationWarning)
    params = {"Dense_0": {"kernel": jnp.full((2, 3), 0.5), "bias": jnp.array([1.0, -1.0, 2.0])},
              "scale": jnp.float32(2.0), "empty": {}}
    # each device its own gradients: the replicated optimizer steps with their mean
    g0 = {"Dense_0": {"kernel": jnp.full((2, 3), 0.25), "bias": jnp.array([0.5, 1.0, -2.0])},
          "scale": jnp.float32(4.0), "empty": {}}
    g1 = jax.tree_util.tree_map(lambda x: -3.0 * x, g0)
    mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g0, g1)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), g0, g1)
    kernels = optim.ModelParamTraversal(lambda p, _: p.endswith("/kernel"))
    cases = {
        "adam": lambda: optim.Adam(0.1, weight_decay=0.01).create(params),
        "focus": lambda: optim.Momentum(0.1).create(params, focus=kernels),
        "adafactor": lambda: optim.Adafactor(0.1).create(params),
        "empty": lambda: optim.Momentum(0.1).create({}),
    }
    for name, make in cases.items():
      opt = make()
      empty = name == "empty"
      rep = opt.replicate()
      step = jax.pmap(lambda o, g: o.apply_gradient(g), axis_name="batch")
      for _ in range(2):
        rep = step(rep, {} if empty else stacked)
      for x in jax.tree_util.tree_leaves(rep):
        assert x.shape[0] == 2, (name, x.shape)
      # both copies agree, and equal the plain optimizer stepped with the mean gradients
      for x in jax.tree_util.tree_leaves((rep.target, rep.state)):
        np.testing.assert_array_equal(np.asarray(x[0]), np.asarray(x[1]))
      plain = opt
      for _ in range(2):
        plain = plain.apply_gradient({} if empty else mean)
      back = rep.unreplicate()
      assert int(back.state.step) == 2
      for a, b in zip(jax.tree_util.tree_leaves(back.state_dict()),
                      jax.tree_util.tree_leaves(plain.state_dict())):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
      for a, b in zip(jax.tree_util.tree_leaves(rep.state_dict()),
                      jax.tree_util.tree_leaves(back.state_dict())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      restored = rep.restore_state(plain.state_dict())
      assert restored.state.step.shape == (2,)
      restored = step(restored, {} if empty else stacked)
      assert int(restored.unreplicate().state.step) == 3
    print("REPLICATE_OK")
""")


def test_replicate_pmap_over_two_host_devices_in_subprocess():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=host_devices_flags(2),
             PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
  proc = subprocess.run([sys.executable, "-c", PMAP_SCRIPT], env=env, cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "REPLICATE_OK" in proc.stdout


@pytest.mark.parametrize("fuse", [True, False])
def test_multi_optimizer_functional_per_leaf_state(fuse):
  """flax 0.5.3's functional form of a MultiOptimizer: ``apply_gradient`` on a hand-built
  ``OptimizerState`` whose ``param_states`` mirrors the target (each selected leaf its
  sub-optimizer's ``_...ParamState``, None elsewhere) gives the optimizer's own steps and returns
  the same form; a state that does not mirror the target is a clear error."""
  rng = np.random.default_rng(0)
  params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
            "scale": jnp.float32(0.5)}
  grads = jax.tree_util.tree_map(lambda x: x * 0.1 + 0.01, params)
  kernels = optim.ModelParamTraversal(lambda path, _: "kernel" in path)
  biases = optim.ModelParamTraversal(lambda path, _: "bias" in path)
  md = optim.MultiOptimizer((kernels, optim.Adam(0.01, weight_decay=0.01, backend="jnp")),
                            (biases, optim.Momentum(0.1, beta=0.9, backend="jnp")), fuse=fuse)
  from fusedopt.adam import _AdamParamState  # pylint: disable=import-outside-toplevel
  from fusedopt.momentum import _MomentumParamState  # pylint: disable=import-outside-toplevel
  per_leaf = {"Dense_0": {"kernel": _AdamParamState(jnp.zeros((4, 3)), jnp.zeros((4, 3))),
                          "bias": _MomentumParamState(jnp.zeros((3,)))}, "scale": None}
  p, st = params, optim.OptimizerState(jnp.asarray(0, jnp.int32), per_leaf)
  for _ in range(2):
    p, st = md.apply_gradient(md.hyper_params, p, st, grads)
  opt = md.create(params).apply_gradient(grads).apply_gradient(grads)
  for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(opt.target)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert int(st.step) == 2 and st.param_states["scale"] is None
  assert type(st.param_states["Dense_0"]["kernel"]) is _AdamParamState
  assert type(st.param_states["Dense_0"]["bias"]) is _MomentumParamState
  view = opt.state.param_states.per_leaf()
  for path in (("Dense_0", "kernel"), ("Dense_0", "bias")):
    got, ref = st.param_states[path[0]][path[1]], view[path[0]][path[1]]
    for f in got.__dataclass_fields__:
      np.testing.assert_allclose(np.asarray(getattr(got, f)), np.asarray(getattr(ref, f)),
                                 rtol=1e-6, atol=1e-8)
  with pytest.raises(ValueError, match="mirror the target"):
    md.apply_gradient(md.hyper_params, params,
                      optim.OptimizerState(jnp.asarray(0), {"Dense_0": None}), grads)
