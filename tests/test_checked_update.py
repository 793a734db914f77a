"""apply_gradient_checked: unscale, clip-by-global-norm and skip-if-not-finite folded into the update.

References: optax.clip_by_global_norm / optax.global_norm, and fusedopt's own plain
apply_gradient on gradients clipped and unscaled beforehand.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fusedopt as optim

BACKENDS = optim.available_backends()
OPTS = [("Adam", {"weight_decay": 0.01}), ("Momentum", {"nesterov": True}), ("LAMB", {}),
        ("LARS", {"weight_decay": 0.01}), ("RMSProp", {"centered": True}), ("Adagrad", {})]
IDS = [n for n, _ in OPTS]
# The pre-pass's scale reaches every rule the same way (``elementwise.guarded``): every optimizer
# on jnp, and on the kernel backends a one-stage and a two-stage one (Adam, LAMB), which is where
# the kernels differ (LAMB's sums see the scaled gradient too).
KERNEL_OPTS = ("Adam", "LAMB")
CHECKED_CASES = [(n, kw, b) for n, kw in OPTS for b in BACKENDS if b == "jnp" or n in KERNEL_OPTS]
CHECKED_IDS = [f"{n}-{b}" for n, _, b in CHECKED_CASES]


def _tree(dtype=jnp.float32):
  rng = np.random.RandomState(0)
  return {"a": jnp.asarray(rng.standard_normal((7, 33)), dtype),
          "b": {"c": jnp.asarray(rng.standard_normal((1030,)), dtype),
                "d": jnp.asarray(rng.standard_normal(()), dtype)}}


def _grads(tree, seed=1, mag=3.0):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: jnp.asarray(mag * rng.standard_normal(x.shape), x.dtype), tree)


def _opt(name, kw, backend, tree):
  return getattr(optim, name)(learning_rate=0.05, backend=backend, **kw).create(tree)


def _close(a, b, rtol=2e-6, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol,
                               atol=atol)


@pytest.mark.parametrize("name, kw, backend", CHECKED_CASES, ids=CHECKED_IDS)
def test_clip_matches_optax_clip_by_global_norm(name, kw, backend):
  tree, g = _tree(), _grads(_tree())
  max_norm = 0.5 * float(optax.tree.norm(g))        # clipping active
  opt = _opt(name, kw, backend, tree)
  checked = jax.jit(lambda o, g: o.apply_gradient_checked(g, clip_global_norm=max_norm))
  new, finite, norm = checked(opt, g)
  clipped, _ = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
  ref = jax.jit(lambda o, g: o.apply_gradient(g))(opt, clipped)
  assert bool(finite)
  np.testing.assert_allclose(float(norm), float(optax.tree.norm(g)), rtol=1e-6)
  _close(new.target, ref.target)
  _close(new.state, ref.state)
  # below the threshold nothing is clipped
  new2, _, _ = jax.jit(lambda o, g: o.apply_gradient_checked(g, clip_global_norm=1e6))(opt, g)
  _close(new2.target, jax.jit(lambda o, g: o.apply_gradient(g))(opt, g).target)


@pytest.mark.parametrize("name, kw, backend", CHECKED_CASES, ids=CHECKED_IDS)
def test_loss_scale_is_folded_into_the_update(name, kw, backend):
  tree, g = _tree(), _grads(_tree())
  scale = 2.0 ** 12            # a power of two: unscaling is exact
  opt = _opt(name, kw, backend, tree)
  scaled = jax.tree.map(lambda x: x * scale, g)
  new, finite, norm = jax.jit(lambda o, g, s: o.apply_gradient_checked(g, grad_scale=1 / s))(
      opt, scaled, jnp.float32(scale))
  ref = jax.jit(lambda o, g: o.apply_gradient(g))(opt, g)
  assert bool(finite)
  np.testing.assert_allclose(float(norm), float(optax.tree.norm(g)), rtol=1e-6)
  _close(new.target, ref.target, rtol=1e-6, atol=0)
  assert int(new.state.step) == 1


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("name, kw, backend", CHECKED_CASES, ids=CHECKED_IDS)
def test_non_finite_step_changes_nothing(name, kw, backend, bad):
  tree = _tree()
  opt = _opt(name, kw, backend, tree)
  step = jax.jit(lambda o, g: o.apply_gradient_checked(g, grad_scale=0.5, clip_global_norm=1.0))
  opt, _, _ = step(opt, _grads(tree, 2))             # a normal step first: nonzero state
  g = _grads(tree, 3)
  g["b"]["c"] = g["b"]["c"].at[17].set(bad)
  new, finite, _ = step(opt, g)
  assert not bool(finite)
  for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(opt)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))   # bitwise, step included
  assert int(new.state.step) == 1


def test_dynamic_scale_loop_with_checked_update():
  """float16 loss scaling: overflowing steps are skipped and back the scale off; the rest train."""
  tree = {"w": jnp.full((64,), 2.0, jnp.float32)}
  opt = optim.Adam(learning_rate=0.1).create(tree)
  ds = optim.DynamicScale(scale=2.0 ** 20, growth_interval=3)

  def loss_fn(p):
    w16 = p["w"].astype(jnp.float16)
    return jnp.sum((w16 * w16).astype(jnp.float32))

  @jax.jit
  def train_step(opt, ds):
    grads = jax.grad(lambda p: ds.scale * loss_fn(p))(opt.target)
    opt, finite, _ = opt.apply_gradient_checked(grads, grad_scale=1 / ds.scale)
    return opt, ds.update(finite), finite

  finites, scales = [], []
  for _ in range(12):
    opt, ds, fin = train_step(opt, ds)
    finites.append(bool(fin))
    scales.append(float(ds.scale))
  assert not finites[0] and scales[0] == 2.0 ** 19        # 2^20 * 4 overflows float16 grads
  assert any(finites)
  assert int(opt.state.step) == sum(finites)               # skipped steps do not count
  assert float(loss_fn(opt.target)) < float(loss_fn(tree))


def test_bad_inputs():
  opt = optim.Adam(learning_rate=0.1).create(_tree())
  with pytest.raises(optim.HyperParamError, match="clip_global_norm"):
    opt.apply_gradient_checked(_grads(_tree()), clip_global_norm=0.0)
  ada = optim.Adafactor(learning_rate=0.1).create(_tree())
  with pytest.raises(TypeError, match="no fused checked update"):
    ada.apply_gradient_checked(_grads(_tree()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, kw", [("Adam", {}), ("LARS", {})], ids=["Adam", "LARS"])
def test_finite_gradients_whose_norm_overflows_are_clipped_not_skipped(name, kw, backend):
  """|g| = 1e20: the float32 sum of squares overflows, the gradients do not. They are clipped to
  the global norm like any others (the same step as on g / 1e20 clipped), not skipped."""
  # a 0-d and a 1-element leaf too: XLA simplifies their reductions away (and once rewrote
  # (g*c)**2 as g**2 * c**2 = inf * 0 there)
  tree = {"w": jnp.linspace(-1.0, 1.0, 1030), "b": jnp.full((4,), 0.5), "s": jnp.float32(0.3),
          "o": jnp.ones((1,))}
  unit = {"w": jnp.cos(jnp.arange(1030.0)), "b": jnp.asarray([1.0, -2.0, 0.5, 3.0]),
          "s": jnp.float32(-1.5), "o": jnp.full((1,), 2.0)}
  opt = _opt(name, kw, backend, tree)
  step = jax.jit(lambda o, g: o.apply_gradient_checked(g, clip_global_norm=1.0))
  new, finite, norm = step(opt, jax.tree.map(lambda x: x * 1e20, unit))
  ref, ref_finite, ref_norm = step(opt, unit)
  assert bool(finite) and bool(ref_finite)
  assert int(new.state.step) == 1
  np.testing.assert_allclose(float(norm), 1e20 * float(ref_norm), rtol=1e-6)
  _close(new.target, ref.target, rtol=1e-5, atol=1e-7)
  assert not np.allclose(np.asarray(new.target["w"]), np.asarray(tree["w"]))
