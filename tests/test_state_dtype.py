"""state_dtype=bfloat16: optimizer state stored in bf16 (half the memory), float32 math inside.

Reference: a float32 NumPy Adam whose moments are rounded to bfloat16 after every update.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim

BACKENDS = optim.available_backends()


def _tree():
  rng = np.random.RandomState(0)
  return {"a": jnp.asarray(rng.standard_normal((9, 130)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal((5,)), jnp.float32)}


def _grads(seed):
  rng = np.random.RandomState(seed)
  return {"a": jnp.asarray(rng.standard_normal((9, 130)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal((5,)), jnp.float32)}


def _bf16(x):
  return np.asarray(jnp.asarray(np.asarray(x, np.float32), jnp.bfloat16), np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_with_bfloat16_moments_matches_reference(backend):
  lr, b1, b2, eps, steps = 1e-2, 0.9, 0.999, 1e-8, 5
  opt = optim.Adam(learning_rate=lr, backend=backend, state_dtype=jnp.bfloat16).create(_tree())
  for k, bufs in opt.state.param_states.fields.items():
    assert all(b.dtype == jnp.bfloat16 for b in bufs), k
  step = jax.jit(lambda o, g: o.apply_gradient(g))
  ref = {k: np.asarray(v, np.float32) for k, v in _tree().items()}
  m = {k: np.zeros_like(v) for k, v in ref.items()}
  v = {k: np.zeros_like(x) for k, x in ref.items()}
  for t in range(steps):
    g = _grads(t)
    opt = step(opt, g)
    for k in ref:
      gk = np.asarray(g[k], np.float32)
      m_new = np.float32(b1) * m[k] + np.float32(1 - b1) * gk        # float32 math ...
      v_new = np.float32(b2) * v[k] + np.float32(1 - b2) * gk * gk
      bias_corr1 = np.float32(1 - b1 ** (t + 1))
      bias_corr2 = np.float32(1 - b2 ** (t + 1))
      ref[k] = ref[k] - lr * (m_new / bias_corr1) / (np.sqrt(v_new / bias_corr2) + eps)
      m[k], v[k] = _bf16(m_new), _bf16(v_new)                        # ... bf16 storage
  for k in ref:
    np.testing.assert_allclose(np.asarray(opt.target[k]), ref[k], rtol=1e-5, atol=1e-5 * lr)
  st = opt.state.param_states
  for name, want in (("grad_ema", m), ("grad_sq_ema", v)):
    for i, k in enumerate(sorted(ref)):
      got = np.asarray(st.leaf(name, i), np.float32)
      # float32 values rounded to bf16 each step: a rounding flip (FMA contraction, ties) at one
      # step carries into the next, so allow two bf16 ulps
      np.testing.assert_allclose(got, want[k], rtol=2 ** -6, atol=0)


@pytest.mark.parametrize("name", ["Momentum", "LAMB", "RMSProp"])
def test_backends_agree_with_bfloat16_state(name):
  ref = None
  for backend in BACKENDS:
    opt = getattr(optim, name)(learning_rate=1e-2, backend=backend,
                               state_dtype=jnp.bfloat16).create(_tree())
    step = jax.jit(lambda o, g: o.apply_gradient(g))
    for t in range(3):
      opt = step(opt, _grads(t))
    if ref is None:
      ref = opt
      continue
    for a, b in zip(jax.tree.leaves(opt.target), jax.tree.leaves(ref.target)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_state_dict_keeps_the_dtype_and_bad_dtype_is_rejected():
  opt = optim.Adam(learning_rate=0.1, state_dtype=jnp.bfloat16).create(_tree())
  opt = opt.apply_gradient(_grads(1))
  back = optim.Adam(learning_rate=0.1, state_dtype=jnp.bfloat16).create(_tree()).restore_state(
      opt.state_dict())
  for a, b in zip(jax.tree.leaves(back.state), jax.tree.leaves(opt.state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  with pytest.raises(ValueError, match="state_dtype"):
    optim.Adam(learning_rate=0.1, state_dtype=jnp.int32)
