"""Independent float64 NumPy oracle for the flax 0.5.3 ``flax.optim`` update rules.

Nothing here imports fusedopt.  Every function re-states, in float64 NumPy, one
``apply_param_gradient`` of flax 0.5.3 (flax/optim/*.py) for a single leaf, with
fusedopt's documented changes (docs/differences.md): float64
bias corrections, and LAMB's trust ratio 1 when either norm is zero:

    step_fn(step, hp: dict, param, state: dict, grad) -> (new_param, new_state)

where ``step`` is the optimizer step *before* the increment (flax's ``state.step``)
and ``hp`` is a dict holding every hyper-parameter of the optimizer (see
``DEFAULTS``).  All arithmetic (bias corrections, norms, Adafactor's decay
schedule, ...) is float64: the oracle is deliberately independent of the
dtype tricks of the implementation under test.

Drivers:
  * ``run(name, hp, params, grads_per_step, overrides_per_step=None)``: N steps of
    one optimizer over a pytree (what ``OptimizerDef.create(params)`` followed by
    N ``apply_gradient`` calls does).
  * ``run_multi(pairs, params, grads_per_step, ...)``: MultiOptimizer /
    ``create(target, focus=...)``: ``pairs`` is a list of
    ``(filter_fn(path, value) -> bool, name, hp)`` applied to a nested dict.
  * ``run_weight_norm(name, hp, params, grads_per_step, wn_decay, wn_eps, ...)``:
    WeightNorm over a wrapped optimizer, with the vjp of ``merge`` written by hand.

The pytree plumbing uses ``jax.tree_util`` (structure only; no jax math).
"""
import numpy as np
import jax

f64 = np.float64

DEFAULTS = {
    'GradientDescent': dict(learning_rate=None),
    'Momentum': dict(learning_rate=None, beta=0.9, weight_decay=0.0, nesterov=False),
    'Adam': dict(learning_rate=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0),
    'Adagrad': dict(learning_rate=None, eps=1e-8),
    'RMSProp': dict(learning_rate=None, beta2=0.9, eps=1e-8, centered=False),
    'LAMB': dict(learning_rate=None, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-6),
    'LARS': dict(learning_rate=None, beta=0.9, weight_decay=0.0, trust_coefficient=0.001,
                 eps=0.0, nesterov=False),
    'Adafactor': dict(learning_rate=None, factored=True, multiply_by_parameter_scale=True,
                      beta1=None, decay_rate=0.8, step_offset=0, clipping_threshold=1.0,
                      weight_decay_rate=None, min_dim_size_to_factor=128, epsilon1=1e-30,
                      epsilon2=1e-3),
    'AdaBelief': dict(learning_rate=None, beta1=0.9, beta2=0.999, eps=1e-16, weight_decay=0.0),
    'Adadelta': dict(learning_rate=None, rho=0.9, eps=1e-6, weight_decay=0.0),
    'Lion': dict(learning_rate=None, beta1=0.9, beta2=0.99, weight_decay=0.0),
    'Adan': dict(learning_rate=None, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8,
                 eps_root=1e-8, weight_decay=0.0),
    'AdEMAMix': dict(learning_rate=None, beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0,
                     eps=1e-8, eps_root=0.0, weight_decay=0.0),
    'ADOPT': dict(learning_rate=None, beta1=0.9, beta2=0.9999, eps=1e-6, nesterov=False,
                  use_clipping=True),
}


def full_hp(name, hp=None):
  """Defaults of optimizer ``name`` updated with ``hp`` (unknown names are an error)."""
  out = dict(DEFAULTS[name])
  for k, v in (hp or {}).items():
    if k not in out:
      raise TypeError(f'{name} has no hyper-parameter {k!r}')
    out[k] = v
  return out


def _norm(x):
  return np.sqrt(np.sum(np.square(x)))


def _rms(x):
  # mean of an empty array is NaN in flax too; only ever multiplied by empties.
  if x.size == 0:
    return f64(0.0)
  return np.sqrt(np.mean(np.square(x)))


# ----------------------------------------------------------------------------
# Adafactor helpers (flax.optim.adafactor.Adafactor._factored_dims)
# ----------------------------------------------------------------------------
def adafactor_factored_dims(shape, factored=True, min_dim_size_to_factor=128):
  """(d1, d0) = the two largest axes (d0 the largest), or None when not factored."""
  if not factored or len(shape) < 2:
    return None
  # flax uses np.argsort's default kind; for ndim <= 16 that is insertion sort,
  # i.e. stable: among equal sizes the lower axis index comes first.
  sorted_dims = np.argsort(np.asarray(shape), kind='stable')
  if shape[sorted_dims[-2]] < min_dim_size_to_factor:
    return None
  return int(sorted_dims[-2]), int(sorted_dims[-1])


# ----------------------------------------------------------------------------
# init_state
# ----------------------------------------------------------------------------
def init_state(name, hp, param):
  """Per-leaf state dict of optimizer ``name`` (float64 zeros)."""
  hp = full_hp(name, hp)
  p = np.asarray(param, f64)
  z = lambda: np.zeros_like(p)
  if name == 'GradientDescent':
    return {}
  if name in ('Momentum', 'LARS'):
    return {'momentum': z()}
  if name == 'Lion':
    return {'grad_ema': z()}
  if name == 'ADOPT':
    return {'grad_ema': z(), 'grad_sq_ema': z()}
  if name == 'AdEMAMix':
    return {'fast_ema': z(), 'slow_ema': z(), 'grad_sq_ema': z()}
  if name == 'Adan':
    return {'grad_ema': z(), 'grad_diff_ema': z(), 'sq_ema': z(), 'prev_grad': z()}
  if name in ('Adam', 'LAMB', 'AdaBelief'):
    return {'grad_ema': z(), 'grad_sq_ema': z()}
  if name == 'Adagrad':
    return {'G': z()}
  if name == 'RMSProp':
    return {'v': z(), 'mg': z() if hp['centered'] else None}
  if name == 'Adadelta':
    return {'sq_avg': z(), 'acc_delta': z()}
  if name == 'Adafactor':
    st = {k: np.zeros((1,), f64) for k in ('v_row', 'v_col', 'v', 'm')}
    fd = adafactor_factored_dims(p.shape, hp['factored'], hp['min_dim_size_to_factor'])
    if fd is not None:
      d1, d0 = fd
      st['v_row'] = np.zeros(np.delete(p.shape, d0), f64)
      st['v_col'] = np.zeros(np.delete(p.shape, d1), f64)
    else:
      st['v'] = z()
    if hp['beta1'] is not None:
      st['m'] = z()
    return st
  raise ValueError(name)


# ----------------------------------------------------------------------------
# one apply_param_gradient per optimizer
# ----------------------------------------------------------------------------
def gradient_descent(step, hp, p, s, g):
  return p - hp['learning_rate'] * g, s


def momentum(step, hp, p, s, g):
  if hp['weight_decay'] != 0:
    g = g + hp['weight_decay'] * p
  m = hp['beta'] * s['momentum'] + g
  d = g + hp['beta'] * m if hp['nesterov'] else m
  return p - hp['learning_rate'] * d, {'momentum': m}


def adam(step, hp, p, s, g):
  b1, b2 = f64(hp['beta1']), f64(hp['beta2'])
  m = b1 * s['grad_ema'] + (1. - b1) * g
  v = b2 * s['grad_sq_ema'] + (1. - b2) * np.square(g)
  k = f64(step + 1)
  m_hat = m / (1. - b1 ** k)
  v_hat = v / (1. - b2 ** k)
  lr = hp['learning_rate']
  new_p = p - lr * m_hat / (np.sqrt(v_hat) + hp['eps']) - lr * hp['weight_decay'] * p
  return new_p, {'grad_ema': m, 'grad_sq_ema': v}


def adagrad(step, hp, p, s, g):
  G = s['G'] + np.square(g)
  return p - hp['learning_rate'] * g / (np.sqrt(G) + hp['eps']), {'G': G}


def rmsprop(step, hp, p, s, g):
  b2 = f64(hp['beta2'])
  v = b2 * s['v'] + (1. - b2) * np.square(g)
  if hp['centered']:
    mg = b2 * s['mg'] + (1. - b2) * g
    den = np.sqrt(v - np.square(mg)) + hp['eps']
  else:
    mg = s['mg']
    den = np.sqrt(v) + hp['eps']
  return p - hp['learning_rate'] * g / den, {'v': v, 'mg': mg}


def lamb(step, hp, p, s, g):
  b1, b2 = f64(hp['beta1']), f64(hp['beta2'])
  m = b1 * s['grad_ema'] + (1. - b1) * g
  v = b2 * s['grad_sq_ema'] + (1. - b2) * np.square(g)
  k = f64(step + 1)
  m_hat = m / (1. - b1 ** k)
  v_hat = v / (1. - b2 ** k)
  u = m_hat / (np.sqrt(v_hat) + hp['eps'])
  if hp['weight_decay'] != 0:
    u = u + hp['weight_decay'] * p
  pn, un = _norm(p), _norm(u)
  # The trust ratio is 1 when either norm is zero: fusedopt's documented rule (docs/differences.md,
  # "Differences from flax 0.5.3"), the paper's and optax's. Not flax 0.5.3's
  # where(pn + un > 0, pn / un, 1), which gave a zero update on a nonzero tensor
  # inf * 0 = NaN and a zero-initialised tensor ratio 0 (it never moved).
  r = pn / un if (pn > 0 and un > 0) else f64(1.0)
  new_p = p - r * hp['learning_rate'] * u
  return new_p, {'grad_ema': m, 'grad_sq_ema': v}


def lars(step, hp, p, s, g):
  pn, gn = _norm(p), _norm(g)  # raw gradient norm, before weight decay
  wd = hp['weight_decay']
  if gn == 0 or pn == 0:
    r = f64(1.0)
  else:
    r = hp['trust_coefficient'] * pn / (gn + wd * pn + hp['eps'])
  if wd != 0:
    g = g + wd * p
  sg = hp['learning_rate'] * r * g
  m = hp['beta'] * s['momentum'] + sg
  d = sg + hp['beta'] * m if hp['nesterov'] else m
  return p - d, {'momentum': m}


def adafactor(step, hp, p, s, g):
  # decay = 1 - (t - step_offset + 1)^(-decay_rate); flax does this in float32.
  t = f64(step - hp['step_offset']) + 1.0
  decay = 1.0 - t ** (-f64(hp['decay_rate']))
  mix = 1.0 - decay
  scale = f64(hp['learning_rate'])
  if hp['multiply_by_parameter_scale']:
    scale = scale * max(_rms(p), f64(hp['epsilon2']))
  gs = g * g + hp['epsilon1']
  new = {k: np.zeros((1,), f64) for k in ('v_row', 'v_col', 'v', 'm')}
  fd = adafactor_factored_dims(p.shape, hp['factored'], hp['min_dim_size_to_factor'])
  if fd is not None:
    d1, d0 = fd
    v_row = decay * s['v_row'] + mix * np.mean(gs, axis=d0)
    v_col = decay * s['v_col'] + mix * np.mean(gs, axis=d1)
    new['v_row'], new['v_col'] = v_row, v_col
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_col_mean = np.mean(v_row, axis=reduced_d1, keepdims=True)
    row_factor = (v_row / row_col_mean) ** -0.5
    col_factor = v_col ** -0.5
    y = g * np.expand_dims(row_factor, d0) * np.expand_dims(col_factor, d1)
  else:
    v = decay * s['v'] + mix * gs
    new['v'] = v
    y = g * v ** -0.5
  if hp['clipping_threshold'] is not None:
    y = y / max(f64(1.0), _rms(y) / hp['clipping_threshold'])
  sub = scale * y
  if hp['beta1'] is not None:
    m = hp['beta1'] * s['m'] + (1.0 - hp['beta1']) * sub
    new['m'] = m
    sub = m
  if hp['weight_decay_rate'] is not None:
    new_p = (1.0 - hp['weight_decay_rate']) * p - sub
  else:
    new_p = p - sub
  return new_p, new


def adabelief(step, hp, p, s, g):
  b1, b2 = f64(hp['beta1']), f64(hp['beta2'])
  m = b1 * s['grad_ema'] + (1. - b1) * g
  v = b2 * s['grad_sq_ema'] + (1. - b2) * np.square(g - m) + hp['eps']
  k = f64(step + 1)
  m_hat = m / (1. - b1 ** k)
  v_hat = v / (1. - b2 ** k)
  lr = hp['learning_rate']
  new_p = p - lr * m_hat / (np.sqrt(v_hat) + hp['eps']) - lr * hp['weight_decay'] * p
  return new_p, {'grad_ema': m, 'grad_sq_ema': v}


def adadelta(step, hp, p, s, g):
  rho, eps = f64(hp['rho']), f64(hp['eps'])
  sq = rho * s['sq_avg'] + np.square(g) * (1. - rho)
  delta = np.sqrt(s['acc_delta'] + eps) / np.sqrt(sq + eps) * g  # uses the *old* acc
  lr = hp['learning_rate']
  new_p = p - lr * delta - lr * hp['weight_decay'] * p
  acc = rho * s['acc_delta'] + np.square(delta) * (1. - rho)
  return new_p, {'sq_avg': sq, 'acc_delta': acc}


def lion(step, hp, p, s, g):
  """Chen et al. 2023, Algorithm 2: the sign of the interpolation, decoupled weight decay."""
  b1, b2 = f64(hp['beta1']), f64(hp['beta2'])
  c = (1. - b1) * g + b1 * s['grad_ema']
  new_p = p - hp['learning_rate'] * (np.sign(c) + hp['weight_decay'] * p)
  return new_p, {'grad_ema': (1. - b2) * g + b2 * s['grad_ema']}


def adan(step, hp, p, s, g):
  """Xie et al. 2022, Algorithm 1 in optax's form: betas are the averages' decays, no
  difference at the first step, decoupled additive weight decay."""
  b1, b2, b3 = f64(hp['beta1']), f64(hp['beta2']), f64(hp['beta3'])
  t = step + 1
  d = g - s['prev_grad'] if step > 0 else np.zeros_like(g)
  m = b1 * s['grad_ema'] + (1. - b1) * g
  v = b2 * s['grad_diff_ema'] + (1. - b2) * d
  n = b3 * s['sq_ema'] + (1. - b3) * np.square(g + (1. - b2) * d)
  u = (m / (1. - b1 ** t) + (1. - b2) * v / (1. - b2 ** t)) / (
      np.sqrt(n / (1. - b3 ** t) + hp['eps_root']) + hp['eps'])
  new_p = p - hp['learning_rate'] * (u + hp['weight_decay'] * p)
  return new_p, {'grad_ema': m, 'grad_diff_ema': v, 'sq_ema': n, 'prev_grad': g}


def ademamix(step, hp, p, s, g):
  """Pagliardini et al. 2024, Algorithm 1 (no warm-up: alpha and beta3 as given)."""
  b1, b2, b3 = f64(hp['beta1']), f64(hp['beta2']), f64(hp['beta3'])
  t = step + 1
  m1 = b1 * s['fast_ema'] + (1. - b1) * g
  m2 = b3 * s['slow_ema'] + (1. - b3) * g
  nu = b2 * s['grad_sq_ema'] + (1. - b2) * np.square(g)
  u = (m1 / (1. - b1 ** t) + hp['alpha'] * m2) / (
      np.sqrt(nu / (1. - b2 ** t) + hp['eps_root']) + hp['eps'])
  new_p = p - hp['learning_rate'] * (u + hp['weight_decay'] * p)
  return new_p, {'fast_ema': m1, 'slow_ema': m2, 'grad_sq_ema': nu}


def adopt(step, hp, p, s, g):
  """Taniguchi et al. 2024, Algorithm 2 with clipping at step**0.25, as optax.contrib.adopt:
  at the first step the second moment starts at g^2 and nothing else moves."""
  b1, b2 = (f64(hp['beta1']), f64(hp['beta2'])) if step > 0 else (f64(1), f64(0))
  u = g / np.maximum(np.sqrt(s['grad_sq_ema']), hp['eps'])
  if hp['use_clipping']:
    c = f64(step) ** 0.25
    u = np.clip(u, -c, c)
  m = b1 * s['grad_ema'] + (1. - b1) * u
  out = b1 * m + (1. - b1) * u if hp['nesterov'] else m
  v = b2 * s['grad_sq_ema'] + (1. - b2) * np.square(g)
  return p - hp['learning_rate'] * out, {'grad_ema': m, 'grad_sq_ema': v}


STEP_FNS = {
    'GradientDescent': gradient_descent,
    'Momentum': momentum,
    'Adam': adam,
    'Adagrad': adagrad,
    'RMSProp': rmsprop,
    'LAMB': lamb,
    'LARS': lars,
    'Adafactor': adafactor,
    'AdaBelief': adabelief,
    'Adadelta': adadelta,
    'Lion': lion,
    'Adan': adan,
    'AdEMAMix': ademamix,
    'ADOPT': adopt,
}


def apply_param_gradient(name, step, hp, param, state, grad):
  hp = full_hp(name, hp)
  if hp['learning_rate'] is None:
    raise AssertionError('no learning rate provided.')
  return STEP_FNS[name](step, hp, np.asarray(param, f64), state, np.asarray(grad, f64))


# ----------------------------------------------------------------------------
# drivers
# ----------------------------------------------------------------------------
def _step_hp(hp, overrides):
  """flax update_hyper_params: ``hyper_params=`` replaces all, other keys replace one."""
  hp = dict(hp)
  if overrides:
    overrides = dict(overrides)
    if 'hyper_params' in overrides:
      hp = dict(overrides.pop('hyper_params'))
    hp.update(overrides)
  return hp


def _leaves(tree):
  return jax.tree_util.tree_flatten(tree)


def run(name, hp, params_tree, grads_per_step, overrides_per_step=None):
  """N steps of optimizer ``name`` over a pytree.  Returns ``(params_tree_f64, step)``.

  ``overrides_per_step``: optional list (one entry per step, ``None`` = no
  override) of dicts like ``{'learning_rate': lr_t}`` or ``{'hyper_params': {...}}``.
  """
  hp = full_hp(name, hp)
  leaves, treedef = _leaves(params_tree)
  ps = [np.asarray(p, f64) for p in leaves]
  ss = [init_state(name, hp, p) for p in ps]
  step = 0
  for i, grads in enumerate(grads_per_step):
    gs = treedef.flatten_up_to(grads)
    shp = full_hp(name, _step_hp(hp, overrides_per_step[i] if overrides_per_step else None))
    out = [apply_param_gradient(name, step, shp, p, s, g) for p, s, g in zip(ps, ss, gs)]
    ps = [o[0] for o in out]
    ss = [o[1] for o in out]
    step += 1
  return treedef.unflatten(ps), step


# --- MultiOptimizer / focus ---------------------------------------------------
def _flatten_dict(d, prefix=()):
  """Nested dict -> {key tuple: leaf} (ModelParamTraversal's flatten_dict)."""
  if not isinstance(d, dict):
    raise ValueError(f'ModelParamTraversal needs a nested dict, not {type(d)}')
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flatten_dict(v, prefix + (k,)))
    elif isinstance(v, dict):
      continue  # empty dicts hold no parameters
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten_into(template, flat, prefix=()):
  out = {}
  for k, v in template.items():
    if isinstance(v, dict):
      out[k] = _unflatten_into(v, flat, prefix + (k,))
    else:
      out[k] = flat[prefix + (k,)]
  return out


def run_multi(pairs, params_tree, grads_per_step, overrides_per_step=None):
  """MultiOptimizer((traversal_i, opt_i), ...) over a nested dict.

  ``pairs``: list of ``(filter_fn(path, value), name, hp)``; a parameter path is
  '/' + '/'.join(keys), e.g. '/Dense_0/kernel'.  Leaves matched by no filter
  never change; a leaf matched by two raises ValueError.  One shared step.
  Overrides apply to every sub-optimizer (``learning_rate=x``); ``hyper_params``
  must then be a list with one dict per sub-optimizer.
  Returns ``(params_tree_f64, step)``; unmatched leaves are returned as given.
  """
  flat = _flatten_dict(params_tree)
  owner = {}
  for key, value in flat.items():
    path = '/' + '/'.join(str(k) for k in key)
    hits = [i for i, (fn, _, _) in enumerate(pairs) if fn(path, value)]
    if len(hits) > 1:
      raise ValueError('Multiple optimizers match the same leaves')
    if hits:
      owner[key] = hits[0]
  hps = [full_hp(name, hp) for _, name, hp in pairs]
  ps = {k: (np.asarray(v, f64) if k in owner else v) for k, v in flat.items()}
  ss = {k: init_state(pairs[i][1], hps[i], ps[k]) for k, i in owner.items()}
  step = 0
  for t, grads in enumerate(grads_per_step):
    gflat = _flatten_dict(grads)
    ov = dict(overrides_per_step[t] or {}) if overrides_per_step else {}
    step_hps = list(ov.pop('hyper_params', hps))
    step_hps = [dict(h, **ov) for h in step_hps]
    for k, i in owner.items():
      ps[k], ss[k] = apply_param_gradient(pairs[i][1], step, step_hps[i], ps[k], ss[k], gflat[k])
    step += 1
  return _unflatten_into(params_tree, ps), step


# --- WeightNorm -----------------------------------------------------------------
def _wn_split(p):
  return p.size > p.shape[-1]  # flax: param.size > param.shape[-1] (0-d params crash in flax)


def wn_decompose(p, eps):
  """(direction, scale) of one leaf; scale is None for leaves that are not split."""
  p = np.asarray(p, f64)
  if not _wn_split(p):
    return p, None
  axes = tuple(range(p.ndim - 1))
  n = np.sqrt(np.sum(np.square(p), axis=axes, keepdims=True) + eps)
  return p / n, n


def wn_merge(d, s, eps):
  if s is None:
    return d
  axes = tuple(range(d.ndim - 1))
  r = 1.0 / np.sqrt(np.sum(np.square(d), axis=axes, keepdims=True) + eps)
  return d * s * r


def wn_merge_vjp(d, s, eps, g):
  """Cotangents (dL/dd, dL/ds) of w = d * s * N^-1/2, N = sum_{axes != -1} d^2 + eps."""
  if s is None:
    return g, None
  axes = tuple(range(d.ndim - 1))
  r = 1.0 / np.sqrt(np.sum(np.square(d), axis=axes, keepdims=True) + eps)
  gd = np.sum(g * d, axis=axes, keepdims=True)
  d_grad = s * r * g - d * s * r ** 3 * gd
  s_grad = r * gd
  return d_grad, s_grad


def run_weight_norm(name, hp, params_tree, grads_per_step, wn_decay=0.0, wn_eps=1e-8,
                    overrides_per_step=None):
  """WeightNorm(<name>(**hp), wn_decay, wn_eps).  Returns ``(params_tree_f64, step)``.

  The wrapped optimizer runs on the (direction, scale) leaves with one shared
  step; ``wn_decay * direction`` is added to the direction gradient of split
  leaves; the target is ``merge(direction, scale)``.
  """
  hp = full_hp(name, hp)
  leaves, treedef = _leaves(params_tree)
  ds, sc = [], []
  for p in leaves:
    d, s = wn_decompose(p, wn_eps)
    ds.append(d)
    sc.append(s)
  d_st = [init_state(name, hp, d) for d in ds]
  s_st = [None if s is None else init_state(name, hp, s) for s in sc]
  step = 0
  for t, grads in enumerate(grads_per_step):
    gs = [np.asarray(g, f64) for g in treedef.flatten_up_to(grads)]
    shp = _step_hp(hp, overrides_per_step[t] if overrides_per_step else None)
    for i in range(len(ds)):
      dg, sg = wn_merge_vjp(ds[i], sc[i], wn_eps, gs[i])
      if sc[i] is not None:
        dg = dg + wn_decay * ds[i]
      new_d, d_st[i] = apply_param_gradient(name, step, shp, ds[i], d_st[i], dg)
      if sc[i] is not None:
        sc[i], s_st[i] = apply_param_gradient(name, step, shp, sc[i], s_st[i], sg)
      ds[i] = new_d
    step += 1
  out = [wn_merge(d, s, wn_eps) for d, s in zip(ds, sc)]
  return treedef.unflatten(out), step
