"""Edits to the target through the public API win over master weights.

``opt.replace(target=new)`` -- loading pretrained weights, clamping -- re-reads the float32 master
copy from ``new``, so the next step starts from ``new``; ``replace(target=..., state=...)`` keeps
the given state. Reference: the per-leaf path (``apply_param_gradient``) run from a state whose
master is ``float32(new)`` and whose moments are the optimizer's.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim

BF16 = jnp.bfloat16


def _tree(seed, dtype=BF16):
  rng = np.random.RandomState(seed)
  return {"w": jnp.asarray(rng.standard_normal((33, 65)), dtype),
          "b": jnp.asarray(rng.standard_normal((7,)), dtype)}


def _grads(seed):
  return jax.tree.map(lambda x: x.astype(jnp.float32), _tree(seed))


def _assert_bitwise(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("backend", ["jnp", "native"])
def test_replace_target_resyncs_master_and_next_step_starts_from_it(backend):
  if backend not in optim.available_backends():
    pytest.fail(f"backend {backend} unavailable")
  opt = optim.Adam(learning_rate=0.01, master_weights=True, backend=backend).create(_tree(0))
  opt = opt.apply_gradient(_grads(1))
  pretrained = _tree(2)
  edited = opt.replace(target=pretrained)
  st = edited.state.param_states
  for i, leaf in enumerate(jax.tree.leaves(pretrained)):
    np.testing.assert_array_equal(np.asarray(st.leaf("master", i)),
                                  np.asarray(leaf, np.float32))
    for k in ("grad_ema", "grad_sq_ema"):   # the moments are kept
      np.testing.assert_array_equal(np.asarray(st.leaf(k, i)),
                                    np.asarray(opt.state.param_states.leaf(k, i)))
  new = edited.apply_gradient(_grads(3))
  # reference: flax's per-leaf path from the same moments and master = float32(pretrained)
  d = opt.optimizer_def
  per_leaf = opt.state.param_states.per_leaf()
  for name, p in pretrained.items():
    state = dict(per_leaf[name], master=p.astype(jnp.float32))
    ref_p, ref_state = d.apply_param_gradient(opt.state.step, d.hyper_params, p, state,
                                              _grads(3)[name])
    np.testing.assert_array_equal(np.asarray(new.target[name], np.float32),
                                  np.asarray(ref_p, np.float32))
    np.testing.assert_allclose(np.asarray(new.state.param_states.per_leaf()[name]["master"]),
                               np.asarray(ref_state["master"]), rtol=1e-6, atol=1e-7)


def test_clamped_target_stays_clamped_after_a_step():
  opt = optim.Momentum(learning_rate=1e-4, master_weights=True).create(_tree(0))
  opt = opt.apply_gradient(_grads(1))
  clamped = opt.replace(target=jax.tree.map(lambda x: jnp.clip(x, -0.25, 0.25), opt.target))
  new = clamped.apply_gradient(_grads(2))
  for x in jax.tree.leaves(new.target):
    assert float(jnp.max(jnp.abs(x.astype(jnp.float32)))) <= 0.25 + 2e-3


def test_replace_target_and_state_keeps_the_given_state():
  opt = optim.Adam(learning_rate=0.01, master_weights=True).create(_tree(0))
  stepped = opt.apply_gradient(_grads(1))
  both = opt.replace(target=stepped.target, state=stepped.state)
  _assert_bitwise(both.state, stepped.state)


def test_replace_target_checks_the_new_tree():
  opt = optim.Adam(learning_rate=0.01, master_weights=True).create(_tree(0))
  with pytest.raises(optim.LayoutError, match="shape"):
    opt.replace(target={"w": jnp.zeros((3, 3), BF16), "b": jnp.zeros((7,), BF16)})


@pytest.mark.parametrize("fuse", [True, False])
def test_multi_optimizer_master_follows_the_target(fuse):
  kernels = optim.ModelParamTraversal(lambda path, _: "w" in path)
  biases = optim.ModelParamTraversal(lambda path, _: "b" in path)
  multi = optim.MultiOptimizer((kernels, optim.Adam(0.01, master_weights=True)),
                               (biases, optim.Adam(0.02, master_weights=True)), fuse=fuse)
  opt = multi.create(_tree(0)).apply_gradient(_grads(1))
  pretrained = _tree(2)
  edited = opt.replace(target=pretrained)
  fresh_state = multi.create(pretrained).state   # master = pretrained, zero moments
  flax_edited = multi.flax_param_states(pretrained, edited.state.param_states)
  flax_fresh = multi.flax_param_states(pretrained, fresh_state.param_states)
  for name in pretrained:
    np.testing.assert_array_equal(np.asarray(flax_edited[name]["master"]),
                                  np.asarray(flax_fresh[name]["master"]))
  new = edited.apply_gradient(_grads(3))
  for name, p in pretrained.items():   # a small step from the pretrained values
    delta = np.abs(np.asarray(new.target[name], np.float32) - np.asarray(p, np.float32))
    assert float(delta.max()) < 0.1
