"""Tier 1: the Pallas kernels against the jnp oracle, every optimizer and option branch.

On CPU the kernels run in Pallas interpret mode (``backend="pallas_interpret"``); on a GPU/TPU
(``JAX_PLATFORMS=cuda pytest tests/test_pallas_numerics.py``) the same tests run the compiled
kernels (``backend="pallas"``). From the same state, one kernel step equals one jnp step:
float32 within 2 ulp of the operands' magnitude, bfloat16/float16 params within 1 ulp of their
dtype (state is float32).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim
from fusedopt.kernels import pallas as kp
from fusedopt.elementwise import namespace

ON_DEVICE = kp.available()
BACKEND = "pallas" if ON_DEVICE else "pallas_interpret"

CONFIGS = [
    ("GradientDescent", {}),
    ("Momentum", {}),
    ("Momentum", {"nesterov": True, "weight_decay": 0.01}),
    ("Adam", {}),
    ("Adam", {"weight_decay": 0.1}),
    ("Adagrad", {}),
    ("RMSProp", {}),
    ("RMSProp", {"centered": True}),
    ("LAMB", {}),
    ("LAMB", {"weight_decay": 0.01}),
    ("LARS", {}),
    ("LARS", {"nesterov": True, "weight_decay": 0.01, "eps": 1e-6}),
    ("AdaBelief", {}),
    ("AdaBelief", {"weight_decay": 0.01}),
    ("Adadelta", {"weight_decay": 0.01}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CONFIGS]

# Ragged shapes: nothing a multiple of the 1024-element alignment unit except by accident.
SHAPES = [(), (1,), (7,), (3, 5), (1025,), (0,), (33, 65), (2, 3, 4), (4097,), (3000,)]


def _tree(dtypes):
  rng = np.random.RandomState(0)
  return {f"l{i}": jnp.asarray(rng.standard_normal(s), dtypes[i % len(dtypes)])
          for i, s in enumerate(SHAPES)}


def _grads(tree, seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


def _assert_close(a, b, old, what, ulps, step_size=0.0):
  """|a - b| <= ulps * ulp(|old| + |new| + step) in a's dtype (FMA contraction may differ)."""
  dtype = np.dtype(a.dtype)
  a64, b64, old64 = (np.asarray(x, np.float32).astype(np.float64) for x in (a, b, old))
  scale = np.abs(old64) + np.maximum(np.abs(a64), np.abs(b64)) + step_size
  spacing = np.spacing(scale.astype(np.float32)).astype(np.float64)
  if dtype != np.float32:   # ulp of the storage dtype
    spacing = spacing * 2.0 ** (23 - jnp.finfo(dtype).nmant)
  err = np.abs(a64 - b64)
  assert np.all(err <= ulps * spacing), (what, float(np.max(err / np.maximum(spacing, 1e-45))))


def _compare_steps(name, kw, dtypes, steps=3):
  tree = _tree(dtypes)
  defs = {b: getattr(optim, name)(learning_rate=0.05, backend=b, **kw) for b in ("jnp", BACKEND)}
  run = {b: jax.jit(lambda o, g, lr, d=d: o.replace(optimizer_def=d).apply_gradient(
      g, learning_rate=lr)) for b, d in defs.items()}
  opt = defs["jnp"].create(tree)
  for t in range(steps):
    g, lr = _grads(tree, t + 1), jnp.float32(0.05 / (t + 1))
    a, b = run["jnp"](opt, g, lr), run[BACKEND](opt, g, lr)
    for x, y, old in zip(jax.tree.leaves(a.target), jax.tree.leaves(b.target),
                         jax.tree.leaves(opt.target)):
      assert x.dtype == y.dtype == old.dtype
      _assert_close(x, y, old, (name, kw, t), 2 if x.dtype == jnp.float32 else 1,
                    step_size=float(lr))
    a_st, b_st = a.state.param_states, b.state.param_states
    for k in a_st.fields:
      for i in range(len(a_st.layout.segments)):
        _assert_close(a_st.leaf(k, i), b_st.leaf(k, i), opt.state.param_states.leaf(k, i),
                      (name, kw, t, k, i), 2)
    opt = a


@pytest.mark.parametrize("name, kw", CONFIGS, ids=IDS)
def test_kernel_matches_jnp_float32(name, kw):
  _compare_steps(name, kw, (jnp.float32,))


@pytest.mark.parametrize("name, kw", [c for c in CONFIGS if c[0] in ("Adam", "Momentum", "LAMB",
                                                                        "RMSProp")],
                         ids=[i for c, i in zip(CONFIGS, IDS)
                              if c[0] in ("Adam", "Momentum", "LAMB", "RMSProp")])
def test_kernel_matches_jnp_mixed_low_precision(name, kw):
  _compare_steps(name, kw, (jnp.bfloat16, jnp.float32, jnp.float16))


@pytest.mark.parametrize("block_rows", [1, 2, 64])
@pytest.mark.parametrize("units", [1, 6, 37, 48])
def test_block_sizes_and_unit_counts(block_rows, units):
  """flat_update directly, several block sizes over buffers of awkward lengths (never ragged:
  the block is the largest power of two dividing the unit count)."""
  from fusedopt.adam import ADAM_RULE
  n = units * kp.ALIGN
  rng = np.random.RandomState(units)
  p, g, m = (jnp.asarray(rng.standard_normal(n), jnp.float32) for _ in range(3))
  v = jnp.asarray(rng.random_sample(n), jnp.float32)
  s = {"lr": 1e-2, "b1": .9, "omb1": .1, "b2": .999, "omb2": 1e-3, "c1": .19, "c2": 2e-3,
       "eps": 1e-8, "lrwd": 1e-4}
  tuning = kp.Tuning(block_rows=block_rows)
  out_p, (out_m, out_v), _ = jax.jit(lambda *a: kp.flat_update(
      ADAM_RULE, s, {}, a[0], a[1], a[2:], tuning=tuning,
      platform=None if ON_DEVICE else "interpret"))(p, g, m, v)
  ns = namespace({k: jnp.float32(x) for k, x in s.items()})
  ref_p, (ref_m, ref_v) = jax.jit(lambda *a: ADAM_RULE.fn(jnp, ns, None, *a))(p, g, m, v)
  _assert_close(out_p, ref_p, p, "p", 2, 1e-2)
  _assert_close(out_m, ref_m, m, "m", 2)
  _assert_close(out_v, ref_v, v, "v", 2)


def test_flat_update_rejects_bad_buffers():
  from fusedopt.momentum import momentum_rule
  rule = momentum_rule(False)
  s = {"lr": 0.1, "beta": 0.9, "wd": 0.0}
  x = jnp.zeros((1000,), jnp.float32)
  with pytest.raises(ValueError, match="multiple of 1024"):
    kp.flat_update(rule, s, {}, x, x, (x,), platform="interpret")
  y = jnp.zeros((2048,), jnp.float32)
  with pytest.raises(ValueError, match="does not match"):
    kp.flat_update(rule, s, {}, y, jnp.zeros((1024,)), (y,), platform="interpret")
  with pytest.raises(ValueError, match="takes 1 state"):
    kp.flat_update(rule, s, {}, y, y, (), platform="interpret")


@pytest.mark.skipif(ON_DEVICE, reason="CPU-only behaviour")
def test_pallas_backend_on_cpu_is_a_clear_error():
  opt = optim.Adam(learning_rate=0.1, backend="pallas").create({"w": jnp.ones((3,))})
  with pytest.raises(RuntimeError, match="pallas_interpret"):
    opt.apply_gradient({"w": jnp.ones((3,))})


def test_step_scalars_do_not_recompile():
  """Learning rate and betas are runtime operands of the kernel: one trace for every value."""
  tree = _tree((jnp.float32,))
  opt = optim.Adam(learning_rate=0.1, backend=BACKEND).create(tree)
  traces = []

  @jax.jit
  def step(o, g, lr, b1):
    traces.append(1)
    return o.apply_gradient(g, learning_rate=lr, beta1=b1)

  for t in range(3):
    opt = step(opt, _grads(tree, t), jnp.float32(0.1 / (t + 1)), jnp.float32(0.9 - 0.1 * t))
  assert len(traces) == 1
