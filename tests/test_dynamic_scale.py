"""Tests for fusedopt.dynamic_scale (flax 0.5.3 DynamicScale semantics plus max_scale)."""
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedopt.dynamic_scale import DynamicScale, DynamicScaleResult
from conftest import host_devices_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sum_sq(p):
  """Loss 5.0 and gradient [2, 4] at p = [1, 2]."""
  return jnp.sum(p ** 2)


P = jnp.array([1.0, 2.0])


def times(x):
  """A loss whose gradient is ``x`` itself (use inf/nan entries for non-finite grads)."""
  return lambda p: jnp.sum(p * x)


INF_LOSS = times(jnp.array([1.0, jnp.inf]))
NAN_LOSS = times(jnp.array([jnp.nan, 1.0]))


def step(ds, fun=sum_sq, p=P):
  return ds.value_and_grad(fun)(p)


def state(ds):
  return float(ds.scale), int(ds.fin_steps)


def test_defaults_match_0_5_3_and_positional_construction():
  ds = DynamicScale()
  assert (ds.growth_factor, ds.backoff_factor, ds.growth_interval) == (2.0, 0.5, 2000)
  assert (ds.fin_steps, ds.scale, ds.max_scale) == (0, 65536.0, None)
  ds = DynamicScale(3.0, 0.25, 7, 1, 8.0)  # 0.5.3 field order
  assert (ds.growth_factor, ds.backoff_factor, ds.growth_interval) == (3.0, 0.25, 7)
  assert (ds.fin_steps, ds.scale, ds.max_scale) == (1, 8.0, None)


def test_only_fin_steps_and_scale_are_pytree_leaves():
  ds = DynamicScale(growth_interval=5, fin_steps=2, scale=4.0, max_scale=64.0)
  leaves, treedef = jax.tree_util.tree_flatten(ds)
  assert leaves == [2, 4.0]
  back = jax.tree_util.tree_unflatten(treedef, [3, 8.0])
  assert (back.growth_interval, back.max_scale, back.fin_steps, back.scale) == (5, 64.0, 3, 8.0)


def test_result_is_unscaled_value_and_float32_unscaled_grad():
  res = step(DynamicScale(scale=8.0))
  assert isinstance(res, DynamicScaleResult)
  new_ds, finite, value, grad = res
  assert res.dynamic_scale is new_ds and res.aux is value and res.grad is grad
  assert bool(finite) and float(value) == 5.0
  assert grad.dtype == jnp.float32
  np.testing.assert_array_equal(grad, [2.0, 4.0])
  assert state(new_ds) == (8.0, 1)


def test_grads_are_cast_to_float32_before_unscaling():
  # Backward in float16: cotangent scale * 2^-13 * 2^-13. Unscaled, 2^-26 underflows to 0 in
  # float16; scaled by 2^15 it is 2^-11 (exact), and only /2^15 in float32 recovers 2^-26.
  def tiny(p):
    return jnp.asarray(p, jnp.float16) * jnp.float16(2 ** -13) * jnp.float16(2 ** -13)

  p16 = jnp.asarray(1.0, jnp.float16)
  _, finite, _, grad = DynamicScale(scale=1.0).value_and_grad(tiny)(p16)
  assert bool(finite) and grad.dtype == jnp.float32 and float(grad) == 0.0
  _, finite, _, grad = DynamicScale(scale=2.0 ** 15).value_and_grad(tiny)(p16)
  assert bool(finite) and grad.dtype == jnp.float32 and float(grad) == 2.0 ** -26


def test_growth_exactly_after_growth_interval_finite_steps():
  # Growth happens on the finite step that finds fin_steps == growth_interval, i.e. every
  # (growth_interval + 1)-th finite step in a row, and resets fin_steps to 0.
  ds = DynamicScale(growth_interval=3, scale=2.0)
  history = []
  for _ in range(8):
    ds = step(ds).dynamic_scale
    history.append(state(ds))
  assert history == [(2.0, 1), (2.0, 2), (2.0, 3), (4.0, 0),
                     (4.0, 1), (4.0, 2), (4.0, 3), (8.0, 0)]


def test_growth_factor_and_zero_interval():
  ds = DynamicScale(growth_factor=3.0, growth_interval=0, scale=1.0)
  history = []
  for _ in range(3):
    ds = step(ds).dynamic_scale
    history.append(state(ds))
  assert history == [(3.0, 0), (9.0, 0), (27.0, 0)]


@pytest.mark.parametrize("bad_loss", [INF_LOSS, NAN_LOSS], ids=["inf", "nan"])
def test_backoff_on_non_finite_grads(bad_loss):
  ds = DynamicScale(growth_interval=10, fin_steps=4, scale=16.0)
  new_ds, finite, _, grad = step(ds, bad_loss)
  assert not bool(finite)
  assert state(new_ds) == (8.0, 0)
  assert not np.all(np.isfinite(grad))  # returned as is: skipping the update is the caller's job
  new_ds = step(new_ds, bad_loss).dynamic_scale
  assert state(new_ds) == (4.0, 0)


def test_backoff_factor_and_non_finite_step_at_growth_time():
  ds = DynamicScale(backoff_factor=0.25, growth_interval=2, fin_steps=2, scale=16.0)
  new_ds, finite, _, _ = step(ds, INF_LOSS)
  assert not bool(finite) and state(new_ds) == (4.0, 0)  # backoff wins over growth


def test_fin_steps_bookkeeping_over_a_mixed_sequence():
  ds = DynamicScale(growth_interval=2, scale=32.0)
  history = []
  for fun in [sum_sq, sum_sq, INF_LOSS, sum_sq, sum_sq, sum_sq, NAN_LOSS, sum_sq]:
    ds, finite, _, _ = step(ds, fun)
    history.append((bool(finite),) + state(ds))
  assert history == [
      (True, 32.0, 1), (True, 32.0, 2), (False, 16.0, 0), (True, 16.0, 1), (True, 16.0, 2),
      (True, 32.0, 0), (False, 16.0, 0), (True, 16.0, 1)]


def test_float16_overflow_backs_off_until_grads_fit():
  # d/dp (scale * p^2) at p=1 is 2*scale in float16 (max 65504): inf until scale = 2^14.
  # Note 0.5.3's default scale 65536 is itself inf in float16 (the weak-typed scale takes the
  # loss dtype), so with a float16 loss the first step always backs off.
  def loss16(p):
    return jnp.asarray(p, jnp.float16) ** 2

  ds = DynamicScale()
  finites = []
  for _ in range(3):
    ds, finite, value, grad = ds.value_and_grad(loss16)(jnp.float32(1.0))
    finites.append(bool(finite))
  assert finites == [False, False, True]
  assert state(ds) == (16384.0, 1)
  assert float(value) == 1.0 and float(grad) == 2.0 and grad.dtype == jnp.float32


def test_has_aux():
  def loss(p):
    return jnp.sum(p ** 2), {"norm": jnp.sum(p), "label": 7}

  new_ds, finite, (value, aux), grad = DynamicScale(scale=4.0).value_and_grad(
      loss, has_aux=True)(P)
  assert bool(finite) and float(value) == 5.0
  assert float(aux["norm"]) == 3.0 and aux["label"] == 7  # aux is not scaled
  np.testing.assert_array_equal(grad, [2.0, 4.0])
  assert state(new_ds) == (4.0, 1)


def test_argnums_int_and_tuple():
  def loss(a, b, c):
    return jnp.sum(a * b) + c

  a, b, c = jnp.array([1.0, 2.0]), jnp.array([3.0, 5.0]), jnp.float32(1.0)
  ds = DynamicScale(scale=2.0)
  _, _, value, grad = ds.value_and_grad(loss, argnums=1)(a, b, c)
  assert float(value) == 14.0
  np.testing.assert_array_equal(grad, [1.0, 2.0])
  _, finite, _, grads = ds.value_and_grad(loss, argnums=(0, 2))(a, b, c)
  assert bool(finite) and isinstance(grads, tuple) and len(grads) == 2
  np.testing.assert_array_equal(grads[0], [3.0, 5.0])
  assert float(grads[1]) == 1.0 and grads[1].dtype == jnp.float32
  # A non-finite gradient in any of the differentiated arguments counts.
  _, finite, _, _ = ds.value_and_grad(loss, argnums=(0, 1))(a, jnp.array([3.0, jnp.inf]), c)
  assert not bool(finite)


def test_pytree_params_and_finite_check_over_all_leaves():
  params = {"w": jnp.ones((2, 3)), "b": {"c": jnp.zeros(3, jnp.bfloat16)}}

  def loss(p, bad):
    return jnp.sum(p["w"] * bad) + jnp.sum(p["b"]["c"].astype(jnp.float32) * 3.0)

  ds = DynamicScale(scale=4.0)
  _, finite, _, grad = ds.value_and_grad(loss)(params, jnp.ones((2, 3)))
  assert bool(finite) and grad["b"]["c"].dtype == jnp.float32
  np.testing.assert_array_equal(grad["b"]["c"], [3.0, 3.0, 3.0])
  bad = jnp.ones((2, 3)).at[1, 2].set(jnp.nan)
  _, finite, _, _ = ds.value_and_grad(loss)(params, bad)
  assert not bool(finite)


def test_empty_grad_tree_is_finite():
  def loss(p, x):
    return jnp.sum(x)

  new_ds, finite, value, grad = DynamicScale(scale=2.0).value_and_grad(loss)({}, P)
  assert bool(finite) and grad == {} and float(value) == 3.0 and state(new_ds) == (2.0, 1)


def test_wraps_partial_functions():
  loss = functools.partial(lambda p, k: k * jnp.sum(p), k=3.0)
  _, _, value, grad = DynamicScale(scale=2.0).value_and_grad(loss)(P)
  assert float(value) == 9.0
  np.testing.assert_array_equal(grad, [3.0, 3.0])


def test_max_scale_bounds_growth():
  ds = DynamicScale(growth_interval=0, scale=4.0, max_scale=10.0)
  history = []
  for _ in range(3):
    ds = step(ds).dynamic_scale
    history.append(state(ds))
  assert history == [(8.0, 0), (10.0, 0), (10.0, 0)]
  assert state(step(ds, INF_LOSS).dynamic_scale) == (5.0, 0)  # backoff unaffected


def test_max_scale_never_lowers_a_scale_already_above_it():
  ds = DynamicScale(growth_interval=0, scale=16.0, max_scale=10.0)
  assert state(step(ds).dynamic_scale) == (16.0, 0)
  assert state(step(ds, NAN_LOSS).dynamic_scale) == (8.0, 0)


def test_without_max_scale_the_scale_reaches_inf_as_in_0_5_3():
  # Vanishing gradients (e.g. dead units) stay finite at any scale, so 0.5.3 keeps growing.
  zero_grads = times(jnp.zeros(2))
  big = 2.0 ** 127
  unbounded = step(DynamicScale(growth_interval=0, scale=big), zero_grads).dynamic_scale
  assert float(unbounded.scale) == float("inf")
  bounded = step(DynamicScale(growth_interval=0, scale=big, max_scale=big),
                 zero_grads).dynamic_scale
  assert float(bounded.scale) == big


def test_under_jit_without_retracing():
  traces = []

  @jax.jit
  def train_step(ds, p):
    traces.append(None)
    return ds.value_and_grad(sum_sq)(p)

  ds = DynamicScale(growth_interval=1, scale=2.0, max_scale=4.0)
  history = []
  for _ in range(5):
    ds, finite, value, grad = train_step(ds, P)
    history.append(state(ds))
  assert history == [(2.0, 1), (4.0, 0), (4.0, 1), (4.0, 0), (4.0, 1)]
  assert bool(finite) and float(value) == 5.0
  np.testing.assert_array_equal(grad, [2.0, 4.0])
  assert len(traces) == 1


def test_jit_backoff_with_where_skip_pattern():
  @jax.jit
  def train_step(ds, p, x):
    ds, finite, _, grad = ds.value_and_grad(times(x))(p)
    return ds, jnp.where(finite, p - 0.5 * grad, p)

  ds = DynamicScale(scale=8.0)
  ds, p = train_step(ds, P, jnp.array([1.0, jnp.inf]))
  np.testing.assert_array_equal(p, [1.0, 2.0])
  assert state(ds) == (4.0, 0)
  ds, p = train_step(ds, p, jnp.array([2.0, 4.0]))
  np.testing.assert_array_equal(p, [0.0, 0.0])
  assert state(ds) == (4.0, 1)


def per_example_loss(w, x):
  return jnp.sum(w * x)  # gradient wrt w is x


def test_axis_name_under_vmap_averages_grads():
  ds = DynamicScale(growth_interval=0, scale=8.0)
  xs = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
  fn = jax.vmap(lambda x: ds.value_and_grad(per_example_loss, axis_name="i")(P, x),
                axis_name="i")
  new_ds, finite, value, grad = fn(xs)
  np.testing.assert_array_equal(value, [5.0, 11.0, 23.0])  # per example, not averaged
  np.testing.assert_array_equal(grad, [[3.0, 5.0]] * 3)  # pmean of the per-example grads
  np.testing.assert_array_equal(finite, [True] * 3)
  np.testing.assert_array_equal(new_ds.scale, [16.0] * 3)
  np.testing.assert_array_equal(new_ds.fin_steps, [0] * 3)


def test_axis_name_under_vmap_one_bad_example_backs_off_everywhere():
  ds = DynamicScale(growth_interval=0, scale=8.0)
  xs = jnp.array([[1.0, 2.0], [jnp.nan, 4.0]])
  fn = jax.jit(jax.vmap(lambda x: ds.value_and_grad(per_example_loss, axis_name="i")(P, x),
                        axis_name="i"))
  new_ds, finite, _, _ = fn(xs)
  np.testing.assert_array_equal(finite, [False, False])
  np.testing.assert_array_equal(new_ds.scale, [4.0, 4.0])


PMAP_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from fusedopt.dynamic_scale import DynamicScale
    assert jax.local_device_count() == 4, jax.devices()

    def loss(w, x):
      return jnp.sum(w * x)

    step = jax.pmap(lambda ds, x: ds.value_and_grad(loss, axis_name='batch')(jnp.ones(2), x),
                    axis_name='batch', in_axes=(None, 0))
    ds = DynamicScale(growth_interval=0, scale=8.0)
    xs = jnp.arange(8.0).reshape(4, 2)
    new_ds, finite, value, grad = step(ds, xs)
    np.testing.assert_array_equal(value, [1.0, 5.0, 9.0, 13.0])
    np.testing.assert_array_equal(grad, [[3.0, 4.0]] * 4)
    np.testing.assert_array_equal(finite, [True] * 4)
    np.testing.assert_array_equal(new_ds.scale, [16.0] * 4)
    new_ds, finite, _, _ = step(ds, xs.at[2, 0].set(jnp.inf))
    np.testing.assert_array_equal(finite, [False] * 4)
    np.testing.assert_array_equal(new_ds.scale, [4.0] * 4)
    print('PMAP_OK')

    # the same under shard_map over a 4-device mesh (each device one row of xs). check_vma=False
    # gives pmap's semantics; with jax's default check_vma=True, jax.grad w.r.t. the replicated
    # params already sums the per-device grads (the transpose of their implicit broadcast), so
    # the pmean that follows leaves that sum as it is.
    from jax.sharding import Mesh, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ('batch',))

    @jax.jit
    def sm_step(ds, xs):
      def body(ds, x):
        new_ds, finite, value, grad = ds.value_and_grad(loss, axis_name='batch')(jnp.ones(2),
                                                                                 x[0])
        return new_ds, finite[None], value[None], grad[None]
      return jax.shard_map(body, mesh=mesh, in_specs=(P(), P('batch')),
                           out_specs=(P(), P('batch'), P('batch'), P('batch')),
                           check_vma=False)(ds, xs)
    new_ds, finite, value, grad = sm_step(ds, xs)
    np.testing.assert_array_equal(value, [1.0, 5.0, 9.0, 13.0])
    np.testing.assert_array_equal(grad, [[3.0, 4.0]] * 4)
    np.testing.assert_array_equal(finite, [True] * 4)
    assert float(new_ds.scale) == 16.0
    new_ds, finite, _, _ = sm_step(ds, xs.at[2, 0].set(jnp.inf))
    np.testing.assert_array_equal(finite, [False] * 4)
    assert float(new_ds.scale) == 4.0
    print('SHARD_MAP_OK')
""")


def test_axis_name_under_pmap_and_shard_map_in_subprocess():
  # The fake device count must be set before jax initialises, so it runs in a child process.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=host_devices_flags(4),
             PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
  proc = subprocess.run([sys.executable, "-c", PMAP_SCRIPT], env=env, cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "PMAP_OK" in proc.stdout and "SHARD_MAP_OK" in proc.stdout
