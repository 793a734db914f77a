"""``jax.vmap`` and ``jax.grad`` over optimizer steps, on every backend that runs on CPU.

- vmap: an ensemble of optimizers (one learning rate and one set of params per member) equals
  the members run one by one;
- grad: the derivative of a loss after one step with respect to the learning rate (meta-learning)
  and to the gradients equals the jnp backend's, which is checked against central differences.
Kernels have no derivative rules: the driver takes the tangents from the jnp path
(``fusedopt.kernels.registry.differentiable``); vmap batches the kernels themselves.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim

BACKENDS = [b for b in optim.available_backends() if b in ("jnp", "native", "pallas_interpret")]
OPTS = [("Adam", {"weight_decay": 0.01}), ("LAMB", {}), ("LARS", {}), ("Momentum", {}),
        ("Adadelta", {})]


def _params(seed=0):
  rng = np.random.RandomState(seed)
  return {"w": jnp.asarray(rng.standard_normal((30, 40)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal((7,)), jnp.float32)}


def _grads(p):
  return jax.tree.map(lambda x: jnp.cos(3.0 * x) + 0.1, p)


def _after_step(name, kw, backend, lr, p, g):
  opt = getattr(optim, name)(learning_rate=0.01, backend=backend, **kw).create(p)
  return opt.apply_gradient(g, learning_rate=lr)


def _loss(name, kw, backend):
  def loss(lr, g):
    p = _params()
    new = _after_step(name, kw, backend, lr, p, g)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(new.target))
  return loss


def test_jnp_backend_derivatives_match_central_differences():
  """The reference itself: d loss / d lr of one Adam step against a float64 central difference
  of the same step computed in NumPy."""
  p, g = _params(), _grads(_params())
  lr = 0.01
  d_lr = float(jax.grad(_loss("Adam", {}, "jnp"))(jnp.float32(lr), g))

  def loss64(lr):   # Adam's first step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected
    total = 0.0
    for k in p:
      x, gg = np.asarray(p[k], np.float64), np.asarray(g[k], np.float64)
      m_hat, v_hat = gg, gg * gg
      total += np.sum(np.sin(x - lr * m_hat / (np.sqrt(v_hat) + 1e-8)))
    return total
  h = 1e-4
  fd = (loss64(lr + h) - loss64(lr - h)) / (2 * h)
  np.testing.assert_allclose(d_lr, fd, rtol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, kw", OPTS, ids=[n for n, _ in OPTS])
def test_grad_through_a_step_equals_the_jnp_backend(name, kw, backend):
  p = _params()
  g = _grads(p)
  lr = jnp.float32(0.01)
  d_lr, d_g = jax.jit(jax.grad(_loss(name, kw, backend), argnums=(0, 1)))(lr, g)
  r_lr, r_g = jax.jit(jax.grad(_loss(name, kw, "jnp"), argnums=(0, 1)))(lr, g)
  np.testing.assert_allclose(float(d_lr), float(r_lr), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(d_g), jax.tree.leaves(r_g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert abs(float(d_lr)) > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, kw", OPTS, ids=[n for n, _ in OPTS])
def test_vmap_over_an_ensemble_equals_one_by_one(name, kw, backend):
  lrs = jnp.asarray([0.01, 0.02, 0.05], jnp.float32)
  members = [_params(s) for s in range(3)]
  ps = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
  gs = jax.tree.map(lambda *xs: jnp.stack(xs), *[_grads(m) for m in members])

  def two_steps(lr, p, g):
    new = _after_step(name, kw, backend, lr, p, g)
    return new.apply_gradient(g, learning_rate=lr).target

  batched = jax.jit(jax.vmap(two_steps))(lrs, ps, gs)
  for k in range(3):
    one = jax.jit(two_steps)(lrs[k], members[k], _grads(members[k]))
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
      if backend == "native":   # the same kernel, called once per member: bitwise
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b))
      else:   # XLA code, fused (contracted, reduced) anew for the batched shapes
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b), rtol=4e-6, atol=1e-7)


def test_sequential_vmap_for_kernels_without_a_batching_rule(monkeypatch):
  """A backend marked ``sequential_vmap`` (the Triton kernels: ``triton_call`` raises under
  vmap) is called once per batch element. Shown on the native kernels with their FFI batching
  rule taken away (``vmap_method=None`` raises under vmap, as ``triton_call`` does): unmarked,
  vmap fails; marked, it runs and equals the members one by one."""
  if "native" not in BACKENDS:
    pytest.fail("the native backend is needed here")
  from fusedopt.kernels import native   # pylint: disable=import-outside-toplevel
  orig = jax.ffi.ffi_call

  def no_batching_rule(*args, **kwargs):
    kwargs["vmap_method"] = None
    return orig(*args, **kwargs)
  monkeypatch.setattr(jax.ffi, "ffi_call", no_batching_rule)
  lrs = jnp.asarray([0.01, 0.02, 0.05], jnp.float32)
  p, g = _params(), _grads(_params())
  ensemble = jax.vmap(lambda lr: _after_step("Adam", {}, "native", lr, p, g).target)
  with pytest.raises(Exception, match="vmap"):
    jax.jit(ensemble)(lrs)
  monkeypatch.setitem(native.BACKENDS, "native",
                      dataclasses.replace(native.BACKENDS["native"], sequential_vmap=True))
  got = jax.jit(ensemble)(lrs)
  for k in range(3):
    one = jax.jit(lambda lr: _after_step("Adam", {}, "native", lr, p, g).target)(lrs[k])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(one)):
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b))
