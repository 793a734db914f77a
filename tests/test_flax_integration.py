"""fusedopt.tx with Flax: ``flax.training.train_state.TrainState`` and ``flax.nnx.Optimizer``
give the same parameters as with optax's own optimizers, their states survive jit and
serialization, and the examples run (so they never rot)."""
import importlib.util
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

optax = pytest.importorskip("optax")
flax = pytest.importorskip("flax")
from flax import nnx, serialization  # noqa: E402
from flax.training import train_state  # noqa: E402

from fusedopt import tx  # noqa: E402

B1, B2 = 0.875, 1.0 - 2.0 ** -10    # exactly representable betas (see tests/test_tx.py)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_close(actual, expected, what):
  for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
    e = np.asarray(e, np.float64)
    np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=1e-6,
                               atol=1e-6 * max(1.0, float(np.max(np.abs(e)))), err_msg=what)


def data(seed=0):
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.standard_normal((32, 4)).astype(np.float32))
  return x, jnp.sum(x, axis=1, keepdims=True) ** 2


# ----------------------------------------------------------------------------- TrainState

def _linen_states(make_tx, classes=None):
  from flax import linen as nn  # pylint: disable=import-outside-toplevel

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))

  x, y = data()
  model = MLP()
  params = model.init(jax.random.PRNGKey(0), x)["params"]

  @jax.jit
  def step(state):
    grads = jax.grad(lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2))(
        state.params)
    return state.apply_gradients(grads=grads)

  out = {}
  classes = classes or {"optax": (optax, train_state.TrainState),
                        "tx": (tx, train_state.TrainState)}
  for name, (mod, cls) in classes.items():
    state = cls.create(apply_fn=model.apply, params=params, tx=make_tx(mod))
    for _ in range(5):
      state = step(state)
    out[name] = state
  return out


@pytest.mark.parametrize("make_tx", [
    lambda m: m.adamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2),
    lambda m: m.chain(optax.clip_by_global_norm(0.5), m.lamb(1e-2, b1=B1, b2=B2)),
], ids=["adamw", "clip_lamb"])
def test_train_state_equals_optax(make_tx):
  states = _linen_states(make_tx)
  assert int(states["tx"].step) == 5
  assert_close(states["tx"].params, states["optax"].params, "TrainState params")


def test_train_state_serialization():
  state = _linen_states(lambda m: m.adamw(1e-2, b1=B1, b2=B2))["tx"]
  blob = serialization.to_bytes(state)
  template = state.replace(step=0, opt_state=state.tx.init(state.params))
  restored = serialization.from_bytes(template, blob)
  # optax's state structure: (ScaleByAdamState(count, mu, nu), EmptyState(), EmptyState())
  assert (jax.tree_util.tree_structure(restored.opt_state)
          == jax.tree_util.tree_structure(optax.adamw(1e-2).init(state.params)))
  assert int(restored.opt_state[0].count) == 5
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- nnx.Optimizer

class _MLP(nnx.Module):
  """BatchNorm: state that is not ``wrt``. No bias before it: that bias's gradient is 0 up to
  rounding noise, which Adam would amplify to +-lr steps (chaotic, in optax as here)."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 16, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(16, use_running_average=False, rngs=rngs)
    self.l2 = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.tanh(self.bn(self.l1(x))))


def _nnx_train(t, steps=5, cls=nnx.Optimizer):
  x, y = data()
  model = _MLP(nnx.Rngs(0))
  optimizer = cls(model, t, wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, optimizer):
    traces.append(1)
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(steps):
    step(model, optimizer)
  return model, optimizer, len(traces)


@pytest.mark.parametrize("make_tx", [
    lambda m: m.adamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2),
    lambda m: m.lars(0.1, weight_decay=1e-3),
], ids=["adamw", "lars"])
def test_nnx_optimizer_equals_optax(make_tx):
  m_tx, opt_tx, n_traces = _nnx_train(make_tx(tx))
  m_ox, opt_ox, _ = _nnx_train(make_tx(optax))
  assert n_traces == 1
  # optax's state structure survived nnx's variable wrapping
  assert (jax.tree_util.tree_structure(nnx.state(opt_tx, nnx.OptState))
          == jax.tree_util.tree_structure(nnx.state(opt_ox, nnx.OptState)))
  assert int(opt_tx.step[...]) == 5
  counts = [int(x) for x in jax.tree_util.tree_leaves(nnx.state(opt_tx, nnx.OptState))
            if jnp.issubdtype(jnp.result_type(x), jnp.integer)]
  assert counts and all(c == 5 for c in counts)
  assert_close(nnx.state(m_tx, nnx.Param), nnx.state(m_ox, nnx.Param), "nnx params")


def test_nnx_inject_hyperparams_changes_lr_without_retrace():
  make = lambda m: optax.inject_hyperparams(m.adamw)(  # noqa: E731
      learning_rate=1e-2, b1=B1, b2=B2, weight_decay=1e-2)
  x, y = data()
  results = {}
  for name, mod in (("optax", optax), ("tx", tx)):
    model = _MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make(mod), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer):
      traces.append(1)  # pylint: disable=cell-var-from-loop
      grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
      optimizer.update(model, grads)

    for i in range(4):
      optimizer.opt_state.hyperparams["learning_rate"][...] = 1e-2 / (1 + i)
      step(model, optimizer)
    assert len(traces) == 1, name
    results[name] = nnx.state(model, nnx.Param)
  assert_close(results["tx"], results["optax"], "inject_hyperparams nnx")


# ----------------------------------------------------------------------------- examples

def _load_example(name):
  path = os.path.join(ROOT, "examples", name)
  spec = importlib.util.spec_from_file_location(f"_example_{name[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", ["flax_train_state.py", "nnx_optimizer.py"])
def test_example_runs_and_learns(name, capsys):
  losses = _load_example(name).main(steps=60, print_every=20)
  assert len(losses) == 60 and all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0]
  assert "loss" in capsys.readouterr().out


# ----------------------------------------------------------------------------- one pass

ONE_PASS = [
    lambda m: m.adamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2),
    lambda m: m.chain(optax.clip_by_global_norm(0.5), m.lamb(1e-2, b1=B1, b2=B2)),
    lambda m: m.adafactor(1e-2, momentum=0.9),
    lambda m: m.chain(optax.scale_by_adam(), optax.scale(-1e-3)),   # not fused: two calls
]


@pytest.mark.parametrize("make_tx", ONE_PASS, ids=["adamw", "clip_lamb", "adafactor", "optax"])
def test_one_pass_train_state(make_tx):
  """``fusedopt.training.TrainState``: Flax's TrainState with ``apply_gradients`` in one fused
  pass; the same state and values as Flax's two-call TrainState with the same tx."""
  from fusedopt import training  # pylint: disable=import-outside-toplevel
  states = _linen_states(make_tx, {"two": (tx, train_state.TrainState),
                                   "one": (tx, training.TrainState),
                                   "optax": (optax, train_state.TrainState)})
  one, two = states["one"], states["two"]
  assert int(one.step) == 5
  assert jax.tree_util.tree_structure(one.opt_state) == jax.tree_util.tree_structure(
      states["optax"].opt_state)
  assert_close(one.params, two.params, "one pass vs two calls")
  assert_close(one.opt_state, two.opt_state, "one pass vs two calls: state")
  assert_close(one.params, states["optax"].params, "one pass vs optax")


def test_one_pass_nnx_optimizer():
  from fusedopt import training  # pylint: disable=import-outside-toplevel
  make = lambda m: m.adamw(1e-2, b1=B1, b2=B2, weight_decay=1e-2)   # noqa: E731
  m_one, opt_one, n_traces = _nnx_train(make(tx), cls=training.Optimizer)
  m_ox, opt_ox, _ = _nnx_train(make(optax))
  assert n_traces == 1 and int(opt_one.step[...]) == 5
  assert (jax.tree_util.tree_structure(nnx.state(opt_one, nnx.OptState))
          == jax.tree_util.tree_structure(nnx.state(opt_ox, nnx.OptState)))
  assert_close(nnx.state(m_one, nnx.Param), nnx.state(m_ox, nnx.Param), "nnx one pass")
