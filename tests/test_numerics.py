"""Numerics of fusedopt against the independent float64 oracle in tests/reference.py.

Every optimizer and option branch of flax 0.5.3's ``flax.optim`` is run for
``N_STEPS`` steps through the public API (``Opt(...).create(params)`` then
``opt.apply_gradient(grads, **overrides)``), eagerly and under ``jax.jit``, on a
float32 tree of nested dicts / lists / tuples with odd shapes (0-d, (1,), (7,),
(3, 5), (4, 4), (2, 3, 4), (130, 129) so Adafactor factors, and a size-0 array).

Tolerance (``assert_close``): rtol = 1e-5 and, per leaf,
atol = 1e-6 * max(1, max |expected leaf|).
Why: the implementation works in float32 (unit roundoff u = 2^-24 ~ 6e-8) and
the oracle in float64.  Every step rounds the new parameter once or twice
(|err| <= u * |p| each) and an accurate float32 update carries a few u of
*relative* error on a step of size ~lr.  Over 20 steps that is at most
~20 * (2u|p| + 4u * lr) -- far below rtol * |p| for ordinary elements, and
below 1e-6 * scale for elements that pass near zero (lr <= 0.1 and parameter
scale >= 0.3 in these trees).  A wrong formula (a missed bias correction, eps
inside vs outside the sqrt, decay of the updated vs un-updated parameter, a
trust ratio over the wrong tensor, a factored second moment over the wrong
axis) is off by >= 1e-3 relative.

Self-check: the unmodified flax 0.5.3 float32 code, run through these tests,
passes all of them except ``test_adam_family_bias_correction``, which fails on
purpose: flax computes 1 - beta2**k as 1 - float32(beta2)**k, 1.3e-5 relative
off for beta2 = 0.999 (8e-5 for 0.9999), which makes every Adam / AdaBelief
update 6.4e-6 relative too small.  That is inside rtol for the parameter in
the long runs below (the update is small against the parameter) but not when
p - lr * u cancels; that test isolates it.
"""
import math
import os
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)
try:
  import fusedopt as optim
except ImportError:  # running from a checkout without an install
  sys.path.insert(0, os.path.dirname(_HERE))
  import fusedopt as optim

import reference as ref  # noqa: E402

from hypothesis import given, settings, HealthCheck, strategies as st  # noqa: E402

N_STEPS = 20
RTOL = 1e-5
ATOL_REL = 1e-6

_HAS_BACKENDS = hasattr(optim, 'available_backends')
BACKENDS = list(getattr(optim, 'available_backends', lambda: ['jnp'])())


def bkw(backend):
  """Constructor keyword for the backend (only if fusedopt exposes backends)."""
  return {'backend': backend} if _HAS_BACKENDS else {}


# ----------------------------------------------------------------------------
# trees and gradients
# ----------------------------------------------------------------------------
# (path-ish name, shape, parameter scale, gradient scale)
def make_params(seed=0, with_scalar=True):
  rng = np.random.RandomState(seed)
  n = lambda shape, s: (s * rng.standard_normal(shape)).astype(np.float32)
  misc = [n((2, 3, 4), 1.5), {'empty': np.zeros((0, 3), np.float32), 'sq': n((4, 4), 0.7)}]
  if with_scalar:
    misc = (n((), 2.0),) + tuple(misc)
  else:
    misc = tuple(misc)
  tree = {
      'dense': {'kernel': n((3, 5), 1.0), 'bias': n((7,), 0.5)},
      'big': [n((130, 129), 1.0), n((1,), 0.3)],
      'misc': misc,
  }
  return jax.tree_util.tree_map(jnp.asarray, tree)


def make_grads(params, n_steps=N_STEPS, seed=1):
  """Random float32 grads per step; each leaf gets its own fixed magnitude."""
  rng = np.random.RandomState(seed)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  mags = [float(10.0 ** rng.uniform(-1, 1)) for _ in leaves]
  out = []
  for _ in range(n_steps):
    gs = [(m * rng.standard_normal(p.shape)).astype(np.float32) for p, m in zip(leaves, mags)]
    out.append(treedef.unflatten([jnp.asarray(g) for g in gs]))
  return out


def assert_close(actual_tree, expected_tree, what=''):
  a_leaves, a_def = jax.tree_util.tree_flatten(actual_tree)
  e_leaves, e_def = jax.tree_util.tree_flatten(expected_tree)
  assert a_def == e_def, f'{what}: tree structure changed: {a_def} vs {e_def}'
  for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
    a = np.asarray(a)
    e = np.asarray(e, np.float64)
    assert a.shape == e.shape, f'{what} leaf {i}: shape {a.shape} vs {e.shape}'
    assert a.dtype == np.float32, f'{what} leaf {i}: dtype {a.dtype}'
    scale = max(1.0, float(np.max(np.abs(e)))) if e.size else 1.0
    np.testing.assert_allclose(a.astype(np.float64), e, rtol=RTOL, atol=ATOL_REL * scale,
                               err_msg=f'{what} leaf {i} shape {a.shape}')


def assert_step(opt, n):
  assert int(np.asarray(opt.state.step)) == n


def run_fused(opt, grads_per_step, mode, overrides_per_step=None):
  """Apply the grads eagerly or through one jitted function (traced once)."""
  traces = []
  if mode == 'eager':
    for t, g in enumerate(grads_per_step):
      ov = overrides_per_step[t] if overrides_per_step else {}
      opt = opt.apply_gradient(g, **ov)
    return opt
  if overrides_per_step:
    keys = sorted(overrides_per_step[0])

    @jax.jit
    def step(o, g, ov):
      traces.append(1)
      return o.apply_gradient(g, **ov)

    for t, g in enumerate(grads_per_step):
      ov = {k: jnp.asarray(overrides_per_step[t][k], jnp.float32) for k in keys}
      opt = step(opt, g, ov)
  else:
    @jax.jit
    def step(o, g):
      traces.append(1)
      return o.apply_gradient(g)

    for g in grads_per_step:
      opt = step(opt, g)
  assert len(traces) == 1, f'jitted step retraced {len(traces)} times'
  return opt


# ----------------------------------------------------------------------------
# every optimizer / option branch
# ----------------------------------------------------------------------------
CONFIGS = [
    # each option branch is exercised both ways: a plain config and one that
    # turns every remaining option of the optimizer on.
    ('GradientDescent', dict(learning_rate=0.05)),
    ('Momentum', dict(learning_rate=0.02)),
    ('Momentum', dict(learning_rate=0.02, beta=0.95, weight_decay=1e-2, nesterov=True)),
    ('Momentum', dict(learning_rate=0.02, beta=0.8, nesterov=True)),
    ('Adam', dict(learning_rate=0.01)),
    ('Adam', dict(learning_rate=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=1e-2)),
    ('Adagrad', dict(learning_rate=0.05, eps=1e-3)),
    ('RMSProp', dict(learning_rate=0.01)),
    ('RMSProp', dict(learning_rate=0.01, beta2=0.95, eps=1e-4, centered=True)),
    ('LAMB', dict(learning_rate=0.01)),
    ('LAMB', dict(learning_rate=0.01, beta1=0.8, beta2=0.99, eps=1e-4, weight_decay=1e-2)),
    ('LARS', dict(learning_rate=0.05)),
    ('LARS', dict(learning_rate=0.05, beta=0.8, weight_decay=1e-3, trust_coefficient=0.01,
                  eps=1e-5, nesterov=True)),
    ('Adafactor', dict(learning_rate=0.05)),
    ('Adafactor', dict(learning_rate=0.05, beta1=0.9, clipping_threshold=2.0,
                       weight_decay_rate=1e-3)),
    ('Adafactor', dict(learning_rate=0.01, factored=False, multiply_by_parameter_scale=False,
                       clipping_threshold=None)),
    # min_dim_size_to_factor=3 factors (3, 5), (4, 4) (a tie) and (2, 3, 4) too;
    # epsilon2=0.8 is above the rms of the small leaves, so max(rms, eps2) takes eps2.
    ('Adafactor', dict(learning_rate=0.05, min_dim_size_to_factor=3, beta1=0.5, step_offset=-3,
                       decay_rate=0.6, epsilon1=1e-3, epsilon2=0.8)),
    ('AdaBelief', dict(learning_rate=0.01)),
    ('AdaBelief', dict(learning_rate=0.01, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=1e-2)),
    ('Adadelta', dict(learning_rate=0.5)),
    ('Adadelta', dict(learning_rate=0.5, rho=0.95, eps=1e-4, weight_decay=1e-2)),
]


def _cfg_id(c):
  name, kw = c
  opts = ','.join(f'{k}={v}' for k, v in kw.items() if k != 'learning_rate')
  return f'{name}[{opts}]' if opts else name


_REF_CACHE = {}


def ref_run_cached(key, fn, *args, **kw):
  """The oracle result is the same for every backend and mode: compute it once."""
  if key not in _REF_CACHE:
    _REF_CACHE[key] = fn(*args, **kw)
  return _REF_CACHE[key]


@pytest.fixture(scope='module')
def tree_and_grads():
  params = make_params()
  return params, make_grads(params)


@pytest.mark.parametrize('mode', ['eager', 'jit'])
@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('config', CONFIGS, ids=_cfg_id)
def test_optimizer_matches_reference(config, backend, mode, tree_and_grads):
  name, kw = config
  params, grads = tree_and_grads
  opt = getattr(optim, name)(**kw, **bkw(backend)).create(params)
  opt = run_fused(opt, grads, mode)
  expected, n = ref_run_cached(('cfg', _cfg_id(config)), ref.run, name, kw, params, grads)
  assert_close(opt.target, expected, f'{name} {kw} {backend} {mode}')
  assert_step(opt, n)


def test_adafactor_tree_exercises_factoring(tree_and_grads):
  """Guard: the test tree really contains factored and unfactored Adafactor leaves."""
  params, _ = tree_and_grads
  shapes = [p.shape for p in jax.tree_util.tree_leaves(params)]
  assert ref.adafactor_factored_dims((130, 129)) == (1, 0)
  assert any(ref.adafactor_factored_dims(s) is not None for s in shapes)
  assert any(ref.adafactor_factored_dims(s, True, 3) == (0, 1) for s in shapes)  # (4, 4) tie
  assert any(ref.adafactor_factored_dims(s) is None and len(s) >= 2 for s in shapes)


@pytest.mark.parametrize('backend', BACKENDS)
def test_adafactor_step_offset_positive(backend, tree_and_grads):
  """step_offset = 5 starting from a restored step 5 (the fine-tuning use)."""
  params, grads = tree_and_grads
  kw = dict(learning_rate=0.05, step_offset=5)
  opt = optim.Adafactor(**kw, **bkw(backend)).create(params)
  opt = opt.replace(state=opt.state.replace(step=jnp.asarray(5, jnp.int32)))
  opt = run_fused(opt, grads[:5], 'eager')
  # oracle: the same five steps, numbered 5..9
  leaves, treedef = jax.tree_util.tree_flatten(params)
  hp = ref.full_hp('Adafactor', kw)
  ps = [np.asarray(p, np.float64) for p in leaves]
  ss = [ref.init_state('Adafactor', hp, p) for p in ps]
  for t, g in enumerate(grads[:5]):
    out = [ref.apply_param_gradient('Adafactor', 5 + t, hp, p, s, gg)
           for p, s, gg in zip(ps, ss, treedef.flatten_up_to(g))]
    ps, ss = [o[0] for o in out], [o[1] for o in out]
  assert_close(opt.target, treedef.unflatten(ps), 'Adafactor step_offset=5')
  assert_step(opt, 10)


# ----------------------------------------------------------------------------
# LAMB / LARS: tensors whose trust-ratio norms are zero
# ----------------------------------------------------------------------------
def make_degenerate(n_steps=4, seed=7):
  """Params and grads with every zero-norm case of the per-tensor trust ratios.

  'kernel' ordinary; 'bias' zero-initialised with nonzero grads (||p|| = 0 at the first step:
  flax 0.5.3's LAMB, or LARS without its clamp, gives it ratio 0 and it never moves);
  'frozen' nonzero with zero grads every step (LAMB without weight decay: ||u|| = 0, where
  0.5.3's p/u gave inf * 0 = NaN; LARS: ||g|| = 0, tc|p| / (0 + wd|p| + eps) is inf or not 1);
  'dead' zero with zero grads (both norms 0: LARS without the clamp gives 0/0 = NaN).
  The trust ratio is 1 in each case (docs/differences.md).
  """
  rng = np.random.RandomState(seed)
  n = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  params = {'kernel': n(3, 5), 'bias': np.zeros(7, np.float32), 'frozen': n(4),
            'dead': np.zeros((2, 3), np.float32)}
  grads = [{'kernel': n(3, 5), 'bias': n(7), 'frozen': np.zeros(4, np.float32),
            'dead': np.zeros((2, 3), np.float32)} for _ in range(n_steps)]
  to_jnp = lambda t: jax.tree_util.tree_map(jnp.asarray, t)
  return to_jnp(params), [to_jnp(g) for g in grads]


DEGENERATE_CONFIGS = [
    ('LAMB', dict(learning_rate=0.05)),
    ('LAMB', dict(learning_rate=0.05, weight_decay=1e-2)),
    ('LARS', dict(learning_rate=0.5)),                      # eps = wd = 0: 0/0 without clamp
    ('LARS', dict(learning_rate=0.5, weight_decay=1e-3, eps=1e-5, nesterov=True)),
]
_DEGENERATE_CASES = ([(c, b, 'jit') for c in DEGENERATE_CONFIGS for b in BACKENDS]
                     + [(c, 'jnp', 'eager') for c in DEGENERATE_CONFIGS])


@pytest.mark.parametrize('config,backend,mode', _DEGENERATE_CASES,
                         ids=[f'{_cfg_id(c)}-{b}-{m}' for c, b, m in _DEGENERATE_CASES])
def test_layerwise_zero_norm_tensors_match_reference(config, backend, mode):
  name, kw = config
  params, grads = make_degenerate()
  opt = run_fused(getattr(optim, name)(**kw, **bkw(backend)).create(params), grads, mode)
  expected, n = ref_run_cached(('degenerate', _cfg_id(config)), ref.run, name, kw, params, grads)
  assert_close(opt.target, expected, f'{name} {kw} zero-norm tensors {backend} {mode}')
  assert_step(opt, n)
  # the cases the test is about really occur: the zero tensor moved, the dead one did not
  assert np.all(np.asarray(opt.target['bias']) != 0)
  np.testing.assert_array_equal(np.asarray(opt.target['dead']), 0.0)


# ----------------------------------------------------------------------------
# hyper-parameter overrides
# ----------------------------------------------------------------------------
SCHEDULE_CONFIGS = [
    ('GradientDescent', dict(learning_rate=0.05)),
    ('Momentum', dict(learning_rate=0.02, nesterov=True)),
    ('Adam', dict(learning_rate=0.01, weight_decay=1e-2)),
    ('Adagrad', dict(learning_rate=0.05)),
    ('RMSProp', dict(learning_rate=0.01, centered=True)),
    ('LAMB', dict(learning_rate=0.01, weight_decay=1e-2)),
    ('LARS', dict(learning_rate=0.05, weight_decay=1e-3)),
    ('Adafactor', dict(learning_rate=0.05, beta1=0.9)),
    ('AdaBelief', dict(learning_rate=0.01)),
    ('Adadelta', dict(learning_rate=0.5, weight_decay=1e-2)),
]


def lr_schedule(lr0, n=N_STEPS):
  """Linear warm-up for 5 steps then cosine decay: every step has another lr."""
  out = []
  for t in range(n):
    if t < 5:
      out.append(lr0 * (t + 1) / 5)
    else:
      out.append(lr0 * 0.5 * (1 + math.cos(math.pi * (t - 5) / (n - 5))))
  # round through float32 so the oracle sees exactly the value the device sees
  return [float(np.float32(x)) for x in out]


# jit for every optimizer (a traced lr must not be baked in); eager for a few.
_SCHEDULE_CASES = ([(c, 'jit') for c in SCHEDULE_CONFIGS] +
                   [(c, 'eager') for c in SCHEDULE_CONFIGS
                    if c[0] in ('Momentum', 'Adam', 'LAMB', 'Adafactor')])


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('config,mode', _SCHEDULE_CASES,
                         ids=[f'{_cfg_id(c)}-{m}' for c, m in _SCHEDULE_CASES])
def test_learning_rate_override_schedule(config, mode, backend, tree_and_grads):
  name, kw = config
  params, grads = tree_and_grads
  ovs = [{'learning_rate': lr} for lr in lr_schedule(kw['learning_rate'])]
  # constructed with a *different* lr: the override must win every step
  opt = getattr(optim, name)(**dict(kw, learning_rate=123.0), **bkw(backend)).create(params)
  opt = run_fused(opt, grads, mode, ovs)
  expected, n = ref_run_cached(('sched', _cfg_id(config)), ref.run, name,
                               dict(kw, learning_rate=123.0), params, grads, ovs)
  assert_close(opt.target, expected, f'{name} lr schedule {backend} {mode}')
  assert_step(opt, n)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('name,kw', [
    ('Adam', dict(learning_rate=0.6)),
    ('AdaBelief', dict(learning_rate=0.6)),
    ('Adam', dict(learning_rate=0.6, beta2=0.9999)),
], ids=['Adam', 'AdaBelief', 'Adam-beta2=0.9999'])
def test_adam_family_bias_correction(name, kw, backend):
  """One step, p = 0.5, g = 1: the exact result is 0.5 - 0.6 * ~1 = -0.1.

  A float32 implementation gets this to ~1e-7 (two roundings at |x| <= 0.6).
  Computing the bias correction 1 - beta2**k as 1 - float32(beta2)**k (what
  flax 0.5.3 did for float32 params) is off by 1.3e-5 relative for beta2 = 0.999
  (float32(0.999) = 0.99900001287 and the subtraction cancels 3 digits), i.e. the
  update is 6.4e-6 relative too small, here 3.9e-6 absolute -- outside the
  tolerance.  -expm1(k * log1p(-float32(1 - beta2))) is accurate to ~1e-7.
  """
  params = {'w': jnp.full((3,), 0.5, jnp.float32), 's': jnp.asarray(0.5, jnp.float32)}
  grads = [{'w': jnp.asarray([1.0, -1e-3, 3.0], jnp.float32), 's': jnp.asarray(1.0, jnp.float32)}]
  opt = getattr(optim, name)(**kw, **bkw(backend)).create(params)
  opt = run_fused(opt, grads, 'eager')
  expected, n = ref.run(name, kw, params, grads)
  assert_close(opt.target, expected, f'{name} {kw} one step bias correction')
  assert_step(opt, n)


@pytest.mark.parametrize('backend', BACKENDS)
def test_learning_rate_none_then_override(backend, tree_and_grads):
  params, grads = tree_and_grads
  opt = optim.Adam(**bkw(backend)).create(params)  # learning_rate=None
  with pytest.raises(Exception):
    opt.apply_gradient(grads[0])
  ovs = [{'learning_rate': 0.01}] * 3
  opt = run_fused(opt, grads[:3], 'eager', ovs)
  expected, _ = ref.run('Adam', {}, params, grads[:3], ovs)
  assert_close(opt.target, expected, 'Adam lr=None + override')
  assert_step(opt, 3)


@pytest.mark.parametrize('mode', ['eager', 'jit'])
@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('name,kw,new', [
    ('Adam', dict(learning_rate=0.01), dict(learning_rate=0.02, beta1=0.5, beta2=0.9, eps=1e-3,
                                             weight_decay=1e-2)),
    ('Momentum', dict(learning_rate=0.02), dict(learning_rate=0.01, beta=0.5, weight_decay=1e-2)),
    ('LAMB', dict(learning_rate=0.01), dict(learning_rate=0.02, beta1=0.5, weight_decay=1e-3)),
], ids=['Adam', 'Momentum', 'LAMB'])
def test_hyper_params_replace_all(name, kw, new, backend, mode, tree_and_grads):
  """apply_gradient(g, hyper_params=hp) replaces every hyper-parameter; a second
  keyword on top of hyper_params= is applied after it (flax's update_hyper_params)."""
  params, grads = tree_and_grads
  opt = getattr(optim, name)(**kw, **bkw(backend)).create(params)
  hp = opt.optimizer_def.hyper_params.replace(**new)
  full_new = ref.full_hp(name, dict(kw, **new))
  if mode == 'eager':
    for t, g in enumerate(grads):
      if t % 2:
        opt = opt.apply_gradient(g, hyper_params=hp)
      else:
        opt = opt.apply_gradient(g, hyper_params=hp, learning_rate=0.003)
    ovs = [{'hyper_params': full_new} if t % 2 else {'hyper_params': full_new, 'learning_rate': 0.003}
           for t in range(N_STEPS)]
  else:
    step = jax.jit(lambda o, g: o.apply_gradient(g, hyper_params=hp))
    for g in grads:
      opt = step(opt, g)
    ovs = [{'hyper_params': full_new}] * N_STEPS
  expected, n = ref.run(name, kw, params, grads, ovs)
  assert_close(opt.target, expected, f'{name} hyper_params= {backend} {mode}')
  assert_step(opt, n)


# ----------------------------------------------------------------------------
# focus / MultiOptimizer (ModelParamTraversal works on nested dicts only)
# ----------------------------------------------------------------------------
def make_dict_params(seed=3):
  rng = np.random.RandomState(seed)
  n = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  return {
      'Dense_0': {'kernel': n(3, 5), 'bias': n(5)},
      'Block': {'Dense_1': {'kernel': n(5, 7), 'bias': n(7)}, 'scale': n(),
                'Conv': {'kernel': n(2, 3, 4), 'bias': n(4)}},
      'embedding': n(130, 129),
      'empty_kernel': jnp.zeros((0, 2), jnp.float32),
  }


is_kernel = lambda path, _: 'kernel' in path
is_bias = lambda path, _: path.endswith('/bias')


def _check_unmatched_unchanged(target, params, matched):
  flat_t = ref._flatten_dict(target)
  for key, p in ref._flatten_dict(params).items():
    path = '/' + '/'.join(key)
    if not matched(path):
      np.testing.assert_array_equal(np.asarray(flat_t[key]), np.asarray(p), err_msg=path)


@pytest.mark.parametrize('mode', ['eager', 'jit'])
@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('name,kw', [('Adam', dict(learning_rate=0.01, weight_decay=1e-2)),
                                     ('Momentum', dict(learning_rate=0.02, nesterov=True)),
                                     ('LAMB', dict(learning_rate=0.01))],
                         ids=['Adam', 'Momentum', 'LAMB'])
def test_focus_only_matched_leaves_change(name, kw, backend, mode):
  params = make_dict_params()
  grads = make_grads(params)
  opt = getattr(optim, name)(**kw, **bkw(backend)).create(
      params, focus=optim.ModelParamTraversal(is_kernel))
  opt = run_fused(opt, grads, mode)
  expected, n = ref.run_multi([(is_kernel, name, kw)], params, grads)
  assert_close(opt.target, expected, f'focus {name} {backend} {mode}')
  _check_unmatched_unchanged(opt.target, params, lambda p: is_kernel(p, None))
  assert_step(opt, n)


@pytest.mark.parametrize('mode', ['eager', 'jit'])
@pytest.mark.parametrize('backend', BACKENDS)
def test_multi_optimizer(backend, mode):
  params = make_dict_params()
  grads = make_grads(params)
  mkw = dict(learning_rate=0.02, beta=0.8, weight_decay=1e-3, nesterov=True)
  akw = dict(learning_rate=0.01, beta2=0.99, weight_decay=1e-2)
  opt_def = optim.MultiOptimizer(
      (optim.ModelParamTraversal(is_kernel), optim.Momentum(**mkw, **bkw(backend))),
      (optim.ModelParamTraversal(is_bias), optim.Adam(**akw, **bkw(backend))))
  opt = run_fused(opt_def.create(params), grads, mode)
  pairs = [(is_kernel, 'Momentum', mkw), (is_bias, 'Adam', akw)]
  expected, n = ref.run_multi(pairs, params, grads)
  assert_close(opt.target, expected, f'multi {backend} {mode}')
  # '/Block/scale' and '/embedding' are matched by neither traversal
  _check_unmatched_unchanged(opt.target, params, lambda p: is_kernel(p, None) or is_bias(p, None))
  assert_step(opt, n)


@pytest.mark.parametrize('mode', ['eager', 'jit'])
@pytest.mark.parametrize('backend', BACKENDS)
def test_multi_optimizer_learning_rate_override_sets_every_sub_optimizer(backend, mode):
  params = make_dict_params()
  grads = make_grads(params)
  mkw = dict(learning_rate=0.02)
  akw = dict(learning_rate=0.01)
  opt_def = optim.MultiOptimizer(
      (optim.ModelParamTraversal(is_kernel), optim.Momentum(**mkw, **bkw(backend))),
      (optim.ModelParamTraversal(is_bias), optim.Adam(**akw, **bkw(backend))))
  ovs = [{'learning_rate': lr} for lr in lr_schedule(0.01)]
  opt = run_fused(opt_def.create(params), grads, mode, ovs)
  pairs = [(is_kernel, 'Momentum', mkw), (is_bias, 'Adam', akw)]
  expected, n = ref.run_multi(pairs, params, grads, ovs)
  assert_close(opt.target, expected, f'multi lr override {backend} {mode}')
  assert_step(opt, n)


def test_multi_optimizer_overlap_raises():
  params = make_dict_params()
  opt_def = optim.MultiOptimizer(
      (optim.ModelParamTraversal(is_kernel), optim.Momentum(learning_rate=0.1)),
      (optim.ModelParamTraversal(lambda p, _: 'Dense' in p), optim.Adam(learning_rate=0.1)))
  with pytest.raises(ValueError):
    opt_def.create(params)
  with pytest.raises(ValueError):
    ref.run_multi([(is_kernel, 'Momentum', {'learning_rate': 0.1}),
                   (lambda p, _: 'Dense' in p, 'Adam', {'learning_rate': 0.1})], params, [])


# ----------------------------------------------------------------------------
# WeightNorm
# ----------------------------------------------------------------------------
WEIGHT_NORM_CONFIGS = [
    ('Momentum', dict(learning_rate=0.02), {}),
    ('Momentum', dict(learning_rate=0.02, nesterov=True, weight_decay=1e-3),
     dict(wn_decay=1e-2, wn_eps=1e-6)),
    # Adam moves each direction element by ~lr per step whatever its size, and the
    # target is scale * direction / ||direction|| (scale ~ sqrt(130) on the big leaf),
    # so lr is kept at a size that suits unit-norm columns.  (At lr=0.01, flax's own
    # float32 bias correction 1 - 0.999**k, off by 1.3e-5 relative, moves the big
    # leaf by 1.2e-5 -- 3x atol; a float64 bias correction agrees to 1.5e-6.)
    ('Adam', dict(learning_rate=0.002), {}),
    ('Adam', dict(learning_rate=0.002, weight_decay=1e-3), dict(wn_decay=1e-2)),
]
# every config jitted on every backend; eager (WeightNorm's Python path op by op, the same on
# every backend: the inner optimizer's step is what differs) once, on jnp
WEIGHT_NORM_CASES = ([(n, kw, wn, 'jit', b) for n, kw, wn in WEIGHT_NORM_CONFIGS for b in BACKENDS]
                     + [('Momentum', dict(learning_rate=0.02), {}, 'eager', 'jnp')])


@pytest.mark.parametrize('name,kw,wn,mode,backend', WEIGHT_NORM_CASES,
                         ids=[f"{n}{'-wn_decay' if wn else ''}-{m}-{b}"
                              for n, _, wn, m, b in WEIGHT_NORM_CASES])
def test_weight_norm(name, kw, wn, mode, backend):
  # flax 0.5.3's WeightNorm reads param.shape[-1], so 0-d leaves are not supported.
  params = make_params(seed=5, with_scalar=False)
  grads = make_grads(params, seed=6)
  inner = getattr(optim, name)(**kw, **bkw(backend))
  opt = optim.WeightNorm(inner, **wn).create(params)
  opt = run_fused(opt, grads, mode)
  expected, n = ref_run_cached(('wn', name, str(kw), str(wn)), ref.run_weight_norm, name, kw,
                               params, grads, **wn)
  assert_close(opt.target, expected, f'WeightNorm({name}) {wn} {backend} {mode}')
  assert_step(opt, n)


@pytest.mark.parametrize('backend', BACKENDS)
def test_weight_norm_learning_rate_override(backend):
  params = make_params(seed=5, with_scalar=False)
  grads = make_grads(params, seed=6)
  ovs = [{'learning_rate': lr} for lr in lr_schedule(0.002)]
  opt = optim.WeightNorm(optim.Adam(learning_rate=1.0, **bkw(backend))).create(params)
  opt = run_fused(opt, grads, 'jit', ovs)
  expected, n = ref.run_weight_norm('Adam', dict(learning_rate=1.0), params, grads,
                                    overrides_per_step=ovs)
  assert_close(opt.target, expected, f'WeightNorm(Adam) lr override {backend}')
  assert_step(opt, n)


def test_reference_weight_norm_vjp_matches_jax():
  """Self-check of the oracle's hand-written vjp of merge (jax only used here)."""
  rng = np.random.RandomState(0)
  for shape in [(3, 5), (2, 3, 4), (6, 1)]:
    d = rng.standard_normal(shape)
    s = np.abs(rng.standard_normal((1,) * (len(shape) - 1) + shape[-1:])) + 0.5
    g = rng.standard_normal(shape)
    eps = 1e-3

    def merge(d, s):
      axes = tuple(range(d.ndim - 1))
      return d * s * jax.lax.rsqrt(jnp.sum(d * d, axis=axes, keepdims=True) + eps)

    with jax.enable_x64(True):
      _, vjp = jax.vjp(merge, jnp.asarray(d, jnp.float64), jnp.asarray(s, jnp.float64))
      jd, js = vjp(jnp.asarray(g, jnp.float64))
      rd, rs = ref.wn_merge_vjp(d, s, eps, g)
      np.testing.assert_allclose(rd, np.asarray(jd), rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(rs, np.asarray(js), rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(ref.wn_merge(d, s, eps), np.asarray(merge(d, s)), rtol=1e-12)


# ----------------------------------------------------------------------------
# property test: random small trees, one step of Adam / Momentum
# ----------------------------------------------------------------------------
_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
_keys = st.sampled_from(['a', 'b', 'kernel', 'bias', 'x1', 'Dense_0'])


def _trees(leaf):
  return st.recursive(
      leaf,
      lambda children: st.one_of(
          st.dictionaries(_keys, children, min_size=1, max_size=3),
          st.lists(children, min_size=1, max_size=3),
          st.lists(children, min_size=1, max_size=3).map(tuple)),
      max_leaves=6)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(shape_tree=_trees(_shapes.map(lambda s: ('#',) + s)),
       seed=st.integers(0, 2 ** 31 - 1),
       which=st.sampled_from(['Adam', 'Momentum']),
       lr=st.floats(1e-4, 0.1),  # see the module docstring and test_adam_family_bias_correction
       beta=st.floats(0.0, 0.99),
       wd=st.sampled_from([0.0, 1e-3, 0.1]),
       nesterov=st.booleans())
def test_property_random_trees_one_step(shape_tree, seed, which, lr, beta, wd, nesterov):
  # leaves are encoded as ('#', *shape) so that tuples of the tree stay containers
  is_leaf = lambda x: isinstance(x, tuple) and len(x) > 0 and x[0] == '#'
  rng = np.random.RandomState(seed)
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.standard_normal(s[1:]).astype(np.float32)), shape_tree,
      is_leaf=is_leaf)
  grads = [jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape).astype(np.float32)), params)]
  if which == 'Adam':
    kw = dict(learning_rate=lr, beta1=beta, weight_decay=wd)
  else:
    kw = dict(learning_rate=lr, beta=beta, weight_decay=wd, nesterov=nesterov)
  opt = getattr(optim, which)(**kw).create(params)
  opt = opt.apply_gradient(grads[0])
  expected, n = ref.run(which, kw, params, grads)
  assert_close(opt.target, expected, f'{which} {kw}')
  assert_step(opt, n)
