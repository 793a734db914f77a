"""MultiOptimizer over optimizers of one kind: one flat state and one kernel pass for all groups.

Expected values come from the float64 NumPy reference (tests/reference.py) and from the same
MultiOptimizer with ``fuse=False`` (one state and one update per sub-optimizer).
"""
import jax
import numpy as np
import pytest

import fusedopt as optim
import reference as ref
from test_numerics import (BACKENDS, assert_close, assert_step, bkw, is_bias, is_kernel,
                           lr_schedule, make_dict_params, make_grads, run_fused)

KERNELS = optim.ModelParamTraversal(is_kernel)
BIASES = optim.ModelParamTraversal(is_bias)

CASES = [
    ("Adam", dict(learning_rate=0.01, beta2=0.99, weight_decay=1e-2),
     dict(learning_rate=0.03, beta1=0.8, eps=1e-6)),
    ("Momentum", dict(learning_rate=0.02, beta=0.8, weight_decay=1e-3, nesterov=True),
     dict(learning_rate=0.05, beta=0.95, nesterov=True)),
    ("RMSProp", dict(learning_rate=0.01, centered=True), dict(learning_rate=0.002, beta2=0.8,
                                                              centered=True)),
]


def _multi(name, kw_a, kw_b, backend, fuse=True):
  cls = getattr(optim, name)
  return optim.MultiOptimizer((KERNELS, cls(**kw_a, **bkw(backend))),
                              (BIASES, cls(**kw_b, **bkw(backend))), fuse=fuse)


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, kw_a, kw_b", CASES, ids=[c[0] for c in CASES])
def test_fused_matches_reference_and_unfused(name, kw_a, kw_b, backend, mode):
  params = make_dict_params()
  grads = make_grads(params)
  fused = _multi(name, kw_a, kw_b, backend).create(params)
  assert type(fused.state.param_states).__name__ == "FusedMultiState"
  fused = run_fused(fused, grads, mode)
  expected, n = ref.run_multi([(is_kernel, name, kw_a), (is_bias, name, kw_b)], params, grads)
  assert_close(fused.target, expected, f"fused multi {name} {backend} {mode}")
  assert_step(fused, n)
  plain = run_fused(_multi(name, kw_a, kw_b, backend, fuse=False).create(params), grads, mode)
  assert type(plain.state.param_states).__name__ == "MultiState"
  for a, b in zip(jax.tree.leaves(fused.target), jax.tree.leaves(plain.target)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_learning_rate_override_reaches_every_group(backend):
  params = make_dict_params()
  grads = make_grads(params)
  kw_a, kw_b = dict(learning_rate=0.02), dict(learning_rate=0.01, beta1=0.5)
  ovs = [{"learning_rate": lr} for lr in lr_schedule(0.01)]
  opt = run_fused(_multi("Adam", kw_a, kw_b, backend).create(params), grads, "jit", ovs)
  expected, _ = ref.run_multi([(is_kernel, "Adam", kw_a), (is_bias, "Adam", kw_b)], params,
                              grads, ovs)
  assert_close(opt.target, expected, f"fused multi lr override {backend}")


def _count_pallas_calls(opt, grads):
  jaxpr = jax.make_jaxpr(lambda o, g: o.apply_gradient(g))(opt, grads)
  return str(jaxpr).count("pallas_call")


def test_one_kernel_pass_for_all_groups():
  params = make_dict_params()
  grads = make_grads(params, n_steps=1)[0]
  kw = dict(learning_rate=0.01)
  fused = _multi("Adam", kw, kw, "pallas_interpret").create(params)
  plain = _multi("Adam", kw, kw, "pallas_interpret", fuse=False).create(params)
  assert _count_pallas_calls(fused, grads) == 1      # one float32 group
  assert _count_pallas_calls(plain, grads) == 2      # one per sub-optimizer


def test_state_dict_format_is_flax_per_sub_optimizer():
  params = make_dict_params()
  grads = make_grads(params, n_steps=2)
  kw_a, kw_b = dict(learning_rate=0.01), dict(learning_rate=0.02)
  fused = run_fused(_multi("Adam", kw_a, kw_b, "jnp").create(params), grads, "jit")
  plain = run_fused(_multi("Adam", kw_a, kw_b, "jnp", fuse=False).create(params), grads, "jit")
  sd_f, sd_p = fused.state_dict(), plain.state_dict()
  assert jax.tree.structure(sd_f) == jax.tree.structure(sd_p)
  for a, b in zip(jax.tree.leaves(sd_f), jax.tree.leaves(sd_p)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
  # a checkpoint written unfused restores into the fused optimizer, bitwise
  fresh = _multi("Adam", kw_a, kw_b, "jnp").create(params)
  restored = fresh.restore_state(sd_p)
  for a, b in zip(jax.tree.leaves(restored.state_dict()), jax.tree.leaves(sd_p)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mixed_kinds_or_variants_are_not_fused():
  params = make_dict_params()
  mixed = optim.MultiOptimizer((KERNELS, optim.Momentum(0.1)), (BIASES, optim.Adam(0.1)))
  variants = optim.MultiOptimizer((KERNELS, optim.Momentum(0.1, nesterov=True)),
                                  (BIASES, optim.Momentum(0.1)))
  for opt_def in (mixed, variants):
    assert type(opt_def.create(params).state.param_states).__name__ == "MultiState"


def test_override_changing_the_static_variant_is_a_clear_error():
  params = make_dict_params()
  opt = optim.MultiOptimizer((KERNELS, optim.Momentum(0.1)),
                             (BIASES, optim.Momentum(0.1))).create(params)
  grads = make_grads(params, n_steps=1)[0]
  hps = opt.optimizer_def.hyper_params
  with pytest.raises(ValueError, match="fuse=False"):
    opt.apply_gradient(grads, hyper_params=[hps[0], hps[1].replace(nesterov=True)])


@pytest.mark.parametrize("fuse", [True, False])
def test_traversal_filter_sees_the_values(fuse):
  """As in flax, ``filter_fn(path, value)`` receives the parameter itself: selecting by rank
  gives the matrices one optimizer and the vectors another (scalars: neither, unchanged)."""
  params = make_dict_params()
  grads = make_grads(params)[0]
  mats = optim.ModelParamTraversal(lambda path, v: v.ndim > 1)
  vecs = optim.ModelParamTraversal(lambda path, v: v.ndim == 1)
  opt = optim.MultiOptimizer((mats, optim.GradientDescent(0.1)),
                             (vecs, optim.GradientDescent(0.01)), fuse=fuse).create(params)
  new = opt.apply_gradient(grads).target
  ranks = set()
  for p, g, x in zip(jax.tree.leaves(params), jax.tree.leaves(grads), jax.tree.leaves(new)):
    lr = 0.1 if p.ndim > 1 else 0.01 if p.ndim == 1 else 0.0
    ranks.add(min(p.ndim, 2))
    np.testing.assert_allclose(np.asarray(x), np.asarray(p) - lr * np.asarray(g), rtol=1e-6,
                               atol=1e-7)
  assert {1, 2} <= ranks
