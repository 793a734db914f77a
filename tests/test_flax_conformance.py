"""flax.optim (0.5.3) conformance of the per-parameter API (issue 16, items 1-3).

Written from the documented API (``flax.optim`` reference: ``init_param_state(param)`` returns
"a named tuple containing the initial optimization state for the parameter",
``apply_param_gradient(step, hyper_params, param, state, grad)`` returns ``(new_param,
new_state)``, ``OptimizerDef.apply_gradient(hyper_params, params, state, grads)``) and flax
0.5.3's source (``flax/optim/*.py``: the ``_<Name>ParamState`` struct dataclasses, their fields
and field order, and which values are None or unused):

* each optimizer's per-parameter state class: name, fields, order (and, against the real flax
  0.5.3 source when its interpreter is available, the state and hyper-parameter classes' fields);
* ``apply_param_gradient`` on hand-written states against NumPy float64 evaluations of the
  formulas (written here, not fusedopt's code), and plain dicts accepted;
* the functional form (``OptimizerDef.apply_gradient`` with per-leaf state trees) against the
  flat path: the same rule, bitwise where the arithmetic is the same (LAMB and LARS: per-tensor
  norms summed in another order, a few ulps);
* ``FlatState`` read like the per-leaf tree (dicts, tuples, lists, FrozenDicts, one array) and
  its equality; checkpoints unchanged byte for byte.
"""
import dataclasses
import json
import pickle
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim
from fusedopt import serialization as ser
from fusedopt.base import OptimizerState
from fusedopt.flat_state import FlatState, ParamState
from fusedopt.frozen_dict import FrozenDict

import flax053_env

from fusedopt import (adabelief, adadelta, adafactor, adagrad, adam, lamb, lars, momentum,
                      rmsprop, sgd, weight_norm)

# (optimizer, module, state class name, flax 0.5.3's fields in order)
STATE_CLASSES = [
    ("Momentum", momentum, "_MomentumParamState", ("momentum",)),
    ("Adam", adam, "_AdamParamState", ("grad_ema", "grad_sq_ema")),
    ("AdaBelief", adabelief, "_AdaBeliefParamState", ("grad_ema", "grad_sq_ema")),
    ("Adagrad", adagrad, "_AdagradParamState", ("G",)),
    ("RMSProp", rmsprop, "_RMSPropParamState", ("v", "mg")),
    ("Adadelta", adadelta, "_AdadeltaParamState", ("sq_avg", "acc_delta")),
    ("Adafactor", adafactor, "_AdafactorParamState", ("v_row", "v_col", "v", "m")),
    ("LAMB", lamb, "_LAMBParamState", ("grad_ema", "grad_sq_ema")),
    ("LARS", lars, "_LARSParamState", ("momentum",)),
    ("WeightNorm", weight_norm, "_WeightNormParamState",
     ("direction_state", "scale_state", "direction", "scale")),
]

# the hyper-parameter classes, flax 0.5.3's field order
HYPER_CLASSES = [
    (sgd, "_GradientDescentHyperParams", ("learning_rate",)),
    (momentum, "_MomentumHyperParams", ("learning_rate", "beta", "weight_decay", "nesterov")),
    (adam, "_AdamHyperParams", ("learning_rate", "beta1", "beta2", "eps", "weight_decay")),
    (adabelief, "_AdaBeliefHyperParams", ("learning_rate", "beta1", "beta2", "eps",
                                          "weight_decay")),
    (adagrad, "_AdagradHyperParams", ("learning_rate", "eps")),
    (rmsprop, "_RMSPropHyperParams", ("learning_rate", "beta2", "eps", "centered")),
    (adadelta, "_AdadeltaHyperParams", ("learning_rate", "rho", "eps", "weight_decay")),
    (adafactor, "_AdafactorHyperParams", (
        "learning_rate", "factored", "multiply_by_parameter_scale", "beta1", "decay_rate",
        "step_offset", "clipping_threshold", "weight_decay_rate", "min_dim_size_to_factor",
        "epsilon1", "epsilon2")),
    (lamb, "_LAMBHyperParams", ("learning_rate", "beta1", "beta2", "weight_decay", "eps")),
    (lars, "_LARSHyperParams", ("learning_rate", "beta", "weight_decay", "trust_coefficient",
                                "eps", "nesterov")),
    (weight_norm, "_WeightNormHyperParams", ("inner", "wn_decay", "wn_eps")),
]

# the flat optimizers: (name, constructor keywords), several variants each
FLAT = [
    ("GradientDescent", {}),
    ("Momentum", dict(beta=0.8, weight_decay=0.01)),
    ("Momentum", dict(beta=0.8, nesterov=True)),
    ("Adam", dict(beta1=0.8, beta2=0.95, weight_decay=0.02)),
    ("AdaBelief", dict(beta1=0.8, beta2=0.95, eps=1e-8, weight_decay=0.02)),
    ("Adagrad", {}),
    ("RMSProp", dict(beta2=0.8)),
    ("RMSProp", dict(beta2=0.8, centered=True)),
    ("Adadelta", dict(rho=0.8, weight_decay=0.01)),
    ("LAMB", dict(beta1=0.8, beta2=0.95, weight_decay=0.01)),
    ("LARS", dict(beta=0.8, weight_decay=0.01, trust_coefficient=0.5, eps=1e-3)),
    ("LARS", dict(beta=0.8, nesterov=True, trust_coefficient=0.5)),
]
FLAT_IDS = [f"{n}-{i}" for i, (n, _) in enumerate(FLAT)]


def _fields(cls):
  return tuple(f.name for f in dataclasses.fields(cls))


def _rng(seed):
  return np.random.default_rng(seed)


def _tree(seed=0):
  r = _rng(seed)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
  return {"Dense_0": {"kernel": f(4, 3), "bias": f(3)}, "Dense_1": {"kernel": f(3, 2),
                                                                    "bias": f(2)}}


def _grads(tree, t):
  r = _rng(100 + t)
  return jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape) * 0.5, x.dtype), tree)


def _bitwise(a, b, what):
  a, b = np.atleast_1d(np.asarray(a)), np.atleast_1d(np.asarray(b))
  assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
  same = np.array_equal(a.view(np.uint8), b.view(np.uint8))
  assert same, (what, int(np.sum(a != b)), "elements differ")


# ----------------------------------------------------------------------------- 1. the classes

@pytest.mark.parametrize("name, module, cls_name, fields", STATE_CLASSES,
                         ids=[c[2] for c in STATE_CLASSES])
def test_param_state_classes_have_flax_fields(name, module, cls_name, fields):
  cls = getattr(module, cls_name)
  assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
  assert _fields(cls) == fields
  # master weights (fusedopt's): a subclass with one more field, last
  sub = getattr(module, cls_name + "WithMaster", None)
  if name in ("Adafactor", "WeightNorm"):
    assert sub is None
  else:
    assert issubclass(sub, cls) and _fields(sub) == fields + ("master",)
    assert sub.__module__ == module.__name__ and pickle.loads(pickle.dumps(sub)) is sub
  # a pytree whose children are the fields (None: no leaves), with replace()
  st = cls(*[jnp.full((2,), i, jnp.float32) for i in range(len(fields))])   # flax's positional
  leaves = jax.tree.leaves(st)
  assert len(leaves) == len(fields)
  assert [float(x[0]) for x in leaves] == list(range(len(fields)))
  assert st.replace(**{fields[0]: 7}).__getattribute__(fields[0]) == 7
  rebuilt = jax.tree.unflatten(jax.tree.structure(st), leaves)
  assert type(rebuilt) is cls


@pytest.mark.parametrize("module, cls_name, fields", HYPER_CLASSES,
                         ids=[c[1] for c in HYPER_CLASSES])
def test_hyper_param_classes_keep_flax_order(module, cls_name, fields):
  assert _fields(getattr(module, cls_name)) == fields


_FLAX_SCRIPT = r"""
import dataclasses, json, importlib
out = {}
for mod in ["sgd", "momentum", "adam", "adabelief", "adagrad", "rmsprop", "adadelta",
            "adafactor", "lamb", "lars", "weight_norm"]:
  m = importlib.import_module("flax.optim." + mod)
  for k, v in vars(m).items():
    if k.startswith("_") and (k.endswith("ParamState") or k.endswith("HyperParams")):
      out[k] = [f.name for f in dataclasses.fields(v)]
print(json.dumps(out))
"""


def test_classes_match_flax_053_source():
  """Against the real flax 0.5.3 (``flax053_env``: skipped without it, failing under CI)."""
  python, reason = flax053_env.flax053_python()
  if python is None:
    pytest.skip(f"no flax 0.5.3 interpreter: {reason}")
  proc = subprocess.run([str(python), "-c", _FLAX_SCRIPT], capture_output=True, text=True,
                        timeout=180, env=flax053_env._quiet_env(), check=True)
  theirs = json.loads(proc.stdout.strip().splitlines()[-1])
  modules = {m.__name__.split(".")[-1]: m for m in (
      sgd, momentum, adam, adabelief, adagrad, rmsprop, adadelta, adafactor, lamb, lars,
      weight_norm)}
  ours = {}
  for m in modules.values():
    for k, v in vars(m).items():
      if k.startswith("_") and (k.endswith("ParamState") or k.endswith("HyperParams")):
        ours[k] = [n for n in _fields(v) if n != "master"]
  # every class flax had, with its fields in its order; GradientDescent has none (state ())
  assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
  for k, fields in theirs.items():
    assert ours[k] == fields, (k, ours[k], fields)
  assert "_GradientDescentParamState" not in theirs


# ----------------------------------------------------------------------------- init_param_state

@pytest.mark.parametrize("name, kw", FLAT, ids=FLAT_IDS)
def test_init_param_state(name, kw):
  opt_def = getattr(optim, name)(learning_rate=0.1, **kw)
  p = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
  st = opt_def.init_param_state(p)
  if name == "GradientDescent":
    assert st == ()
    return
  cls = opt_def.param_state_class
  assert type(st) is cls and isinstance(st, ParamState)
  for k in opt_def.state_fields:
    x = getattr(st, k)
    assert x.shape == p.shape and x.dtype == jnp.float32 and not np.any(np.asarray(x))
  if name == "RMSProp" and not kw.get("centered"):
    assert st.mg is None                       # flax: mg = None unless centered
    assert jax.tree.leaves(st) == [st.v]
  assert "master" not in _fields(cls)
  # master weights: the float32 copy, in the trailing field of the subclass
  st = getattr(optim, name)(learning_rate=0.1, master_weights=True, **kw).init_param_state(
      p.astype(jnp.bfloat16))
  assert isinstance(st, cls) and type(st).__name__ == cls.__name__ + "WithMaster"
  assert _fields(type(st)) == _fields(cls) + ("master",)
  np.testing.assert_array_equal(np.asarray(st.master), np.asarray(p))
  assert st.master.dtype == jnp.float32


def test_gradient_descent_master_state():
  opt_def = optim.GradientDescent(0.5, master_weights=True)
  p = jnp.asarray([1.0, 2.0], jnp.bfloat16)
  st = opt_def.init_param_state(p)
  assert st.master.dtype == jnp.float32
  new_p, new_st = opt_def.apply_param_gradient(0, opt_def.hyper_params, p, st,
                                               jnp.asarray([1.0, 1.0], jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(new_st.master), [0.5, 1.5])
  assert type(new_st) is type(st)


@pytest.mark.parametrize("kw, shape, factored", [
    ({}, (4, 3), False),                                     # dims below min_dim_size_to_factor
    (dict(min_dim_size_to_factor=2), (4, 3), True),
    (dict(min_dim_size_to_factor=2, beta1=0.9), (4, 3), True),
    (dict(beta1=0.9, factored=False, min_dim_size_to_factor=2), (4, 3), False),
    (dict(min_dim_size_to_factor=2), (5,), False),             # one axis: never factored
])
def test_adafactor_init_param_state(kw, shape, factored):
  opt_def = optim.Adafactor(learning_rate=0.1, **kw)
  st = opt_def.init_param_state(jnp.ones(shape, jnp.float32))
  assert type(st) is adafactor._AdafactorParamState
  one = lambda x: x.shape == (1,) and x.dtype == jnp.float32 and not np.any(np.asarray(x))  # noqa
  if factored:   # shape (4, 3): d1, d0 = 1, 0: v_row drops axis 0, v_col drops axis 1
    assert st.v_row.shape == (3,) and st.v_col.shape == (4,) and one(st.v)
  else:
    assert one(st.v_row) and one(st.v_col) and st.v.shape == shape
  if kw.get("beta1") is None:
    assert one(st.m)
  else:
    assert st.m.shape == shape


# ----------------------------------------------------------------------------- apply_param_gradient
# NumPy float64 evaluations of flax 0.5.3's formulas (docs: flax_optim_spec.md), one per optimizer:
# f(step, hp, p, state fields..., g) -> (new p, new state fields...)

def _np_momentum(k, hp, p, g, m):
  g = g + hp["weight_decay"] * p
  m = hp["beta"] * m + g
  d = g + hp["beta"] * m if hp["nesterov"] else m
  return p - hp["learning_rate"] * d, (m,)


def _np_adam(k, hp, p, g, m, v):
  b1, b2 = hp["beta1"], hp["beta2"]
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  mh, vh = m / (1 - b1 ** k), v / (1 - b2 ** k)
  lr = hp["learning_rate"]
  return p - lr * mh / (np.sqrt(vh) + hp["eps"]) - lr * hp["weight_decay"] * p, (m, v)


def _np_adabelief(k, hp, p, g, m, s):
  b1, b2 = hp["beta1"], hp["beta2"]
  m = b1 * m + (1 - b1) * g
  s = b2 * s + (1 - b2) * (g - m) ** 2 + hp["eps"]
  lr = hp["learning_rate"]
  return (p - lr * (m / (1 - b1 ** k)) / (np.sqrt(s / (1 - b2 ** k)) + hp["eps"])
          - lr * hp["weight_decay"] * p), (m, s)


def _np_adagrad(k, hp, p, g, G):
  G = G + g * g
  return p - hp["learning_rate"] * g / (np.sqrt(G) + hp["eps"]), (G,)


def _np_rmsprop(k, hp, p, g, v, mg=None):
  b2 = hp["beta2"]
  v = b2 * v + (1 - b2) * g * g
  if hp["centered"]:
    mg = b2 * mg + (1 - b2) * g
    den = np.sqrt(v - mg * mg) + hp["eps"]
    return p - hp["learning_rate"] * g / den, (v, mg)
  return p - hp["learning_rate"] * g / (np.sqrt(v) + hp["eps"]), (v,)


def _np_adadelta(k, hp, p, g, sq, acc):
  rho, eps, lr = hp["rho"], hp["eps"], hp["learning_rate"]
  sq = rho * sq + (1 - rho) * g * g
  delta = np.sqrt(acc + eps) / np.sqrt(sq + eps) * g
  new_p = p - lr * delta - lr * hp["weight_decay"] * p
  acc = rho * acc + (1 - rho) * delta * delta
  return new_p, (sq, acc)


def _np_lamb(k, hp, p, g, m, v):
  b1, b2 = hp["beta1"], hp["beta2"]
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  u = (m / (1 - b1 ** k)) / (np.sqrt(v / (1 - b2 ** k)) + hp["eps"]) + hp["weight_decay"] * p
  r = np.linalg.norm(p) / np.linalg.norm(u)
  return p - r * hp["learning_rate"] * u, (m, v)


def _np_lars(k, hp, p, g, m):
  pn, gn = np.linalg.norm(p), np.linalg.norm(g)
  r = hp["trust_coefficient"] * pn / (gn + hp["weight_decay"] * pn + hp["eps"])
  g = g + hp["weight_decay"] * p
  sg = hp["learning_rate"] * r * g
  m = hp["beta"] * m + sg
  d = sg + hp["beta"] * m if hp["nesterov"] else m
  return p - d, (m,)


def _np_sgd(k, hp, p, g):
  return p - hp["learning_rate"] * g, ()


NP_RULES = {"Momentum": _np_momentum, "Adam": _np_adam, "AdaBelief": _np_adabelief,
            "Adagrad": _np_adagrad, "RMSProp": _np_rmsprop, "Adadelta": _np_adadelta,
            "LAMB": _np_lamb, "LARS": _np_lars, "GradientDescent": _np_sgd}


def _hand_state(opt_def, shape, seed):
  """A nonzero state, built positionally as flax code would (``_AdamParamState(m, v)``)."""
  r = _rng(seed)
  vals = [np.abs(r.normal(size=shape)).astype(np.float32) * 0.1 for _ in opt_def.state_fields]
  cls = opt_def.param_state_class
  if not vals:
    return (), vals
  if cls is rmsprop._RMSPropParamState and len(vals) == 1:
    return cls(jnp.asarray(vals[0]), None), vals      # flax's non-centered state: mg = None
  if cls is rmsprop._RMSPropParamState:   # centered: keep v - mg^2 > 0
    vals[1] = vals[1] * 0.1
  return cls(*[jnp.asarray(v) for v in vals]), vals


@pytest.mark.parametrize("name, kw", FLAT, ids=FLAT_IDS)
def test_apply_param_gradient_by_hand(name, kw):
  opt_def = getattr(optim, name)(learning_rate=0.05, **kw)
  hp = {f.name: getattr(opt_def.hyper_params, f.name)
        for f in dataclasses.fields(opt_def.hyper_params)}
  r = _rng(7)
  p = r.normal(size=(5, 3)).astype(np.float32)
  g = (r.normal(size=(5, 3)) * 0.3).astype(np.float32)
  state, vals = _hand_state(opt_def, p.shape, 8)
  step = 2
  want_p, want_state = NP_RULES[name](step + 1, hp, p.astype(np.float64), g.astype(np.float64),
                                      *[v.astype(np.float64) for v in vals])
  new_p, new_state = opt_def.apply_param_gradient(step, opt_def.hyper_params, jnp.asarray(p),
                                                  state, jnp.asarray(g))
  np.testing.assert_allclose(np.asarray(new_p), want_p, rtol=1e-5, atol=1e-6)
  if name == "GradientDescent":
    assert new_state == ()
    return
  assert type(new_state) is type(state)
  for k, want in zip(opt_def.state_fields, want_state):
    np.testing.assert_allclose(np.asarray(getattr(new_state, k)), want, rtol=1e-5, atol=1e-7,
                               err_msg=k)
  if name == "RMSProp" and not kw.get("centered"):
    assert new_state.mg is None
  # plain dicts are still accepted (fusedopt's earlier form), with the same result
  as_dict = {k: getattr(state, k) for k in opt_def.state_fields}
  p2, st2 = opt_def.apply_param_gradient(step, opt_def.hyper_params, jnp.asarray(p), as_dict,
                                         jnp.asarray(g))
  _bitwise(p2, new_p, "dict state")
  assert type(st2) is type(new_state)
  for a, b in zip(jax.tree.leaves(st2), jax.tree.leaves(new_state)):
    _bitwise(a, b, "dict state")


def _np_adafactor(k, hp, p, g, st, factored_dims):
  lr = hp["learning_rate"]
  decay = 1 - k ** (-hp["decay_rate"])
  mix = 1 - decay
  scale = lr * max(np.sqrt(np.mean(p * p)), hp["epsilon2"]) \
      if hp["multiply_by_parameter_scale"] else lr
  gs = g * g + hp["epsilon1"]
  out = dict(st)
  if factored_dims:
    d1, d0 = factored_dims
    vr = decay * st["v_row"] + mix * gs.mean(axis=d0)
    vc = decay * st["v_col"] + mix * gs.mean(axis=d1)
    out["v_row"], out["v_col"] = vr, vc
    rd1 = d1 - 1 if d1 > d0 else d1
    row = (vr / vr.mean(axis=rd1, keepdims=True)) ** -0.5
    y = g * np.expand_dims(row, d0) * np.expand_dims(vc ** -0.5, d1)
  else:
    v = decay * st["v"] + mix * gs
    out["v"] = v
    y = g * v ** -0.5
  if hp["clipping_threshold"] is not None:
    y = y / max(1.0, np.sqrt(np.mean(y * y)) / hp["clipping_threshold"])
  sub = scale * y
  if hp["beta1"] is not None:
    out["m"] = hp["beta1"] * st["m"] + (1 - hp["beta1"]) * sub
    sub = out["m"]
  wdr = hp["weight_decay_rate"]
  new_p = ((1 - wdr) * p if wdr is not None else p) - sub
  return new_p, out


@pytest.mark.parametrize("kw, shape, dims", [
    (dict(min_dim_size_to_factor=2), (6, 4), (1, 0)),
    (dict(min_dim_size_to_factor=2, beta1=0.9, weight_decay_rate=0.01), (3, 5), (0, 1)),
    (dict(factored=False, beta1=0.8), (6, 4), None),
    (dict(clipping_threshold=None, multiply_by_parameter_scale=False), (7,), None),
])
def test_adafactor_apply_param_gradient_by_hand(kw, shape, dims):
  opt_def = optim.Adafactor(learning_rate=0.05, decay_rate=0.8, **kw)
  hp = {f.name: getattr(opt_def.hyper_params, f.name)
        for f in dataclasses.fields(opt_def.hyper_params)}
  r = _rng(3)
  p = r.normal(size=shape).astype(np.float32)
  g = (r.normal(size=shape) * 0.3).astype(np.float32)
  init = opt_def.init_param_state(jnp.asarray(p))
  # a nonzero state, built positionally from init's shapes
  vals = [np.abs(r.normal(size=np.shape(x))).astype(np.float32) * 0.1 + 0.01
          for x in (init.v_row, init.v_col, init.v, init.m)]
  state = adafactor._AdafactorParamState(*[jnp.asarray(v) for v in vals])
  step = 4
  want_p, want = _np_adafactor(step + 1, hp, p.astype(np.float64), g.astype(np.float64),
                               dict(zip(("v_row", "v_col", "v", "m"),
                                        [v.astype(np.float64) for v in vals])), dims)
  new_p, new_state = opt_def.apply_param_gradient(step, opt_def.hyper_params, jnp.asarray(p),
                                                  state, jnp.asarray(g))
  assert type(new_state) is adafactor._AdafactorParamState
  np.testing.assert_allclose(np.asarray(new_p), want_p, rtol=1e-5, atol=1e-6)
  used = (["v_row", "v_col"] if dims else ["v"]) + (["m"] if hp["beta1"] is not None else [])
  for k in ("v_row", "v_col", "v", "m"):
    x = np.asarray(getattr(new_state, k))
    if k in used:
      np.testing.assert_allclose(x, want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    else:   # flax: unused fields come back as float32 zeros (1,)
      assert x.shape == (1,) and not np.any(x), k
  # dict form accepted
  p2, st2 = opt_def.apply_param_gradient(step, opt_def.hyper_params, jnp.asarray(p),
                                         {k: getattr(state, k) for k in
                                          ("v_row", "v_col", "v", "m")}, jnp.asarray(g))
  _bitwise(p2, new_p, "dict state")
  assert type(st2) is adafactor._AdafactorParamState


# ----------------------------------------------------------------------------- 2. functional form

def _per_leaf_state(opt_def, params):
  return OptimizerState(jnp.asarray(0, jnp.int32), jax.tree.map(opt_def.init_param_state, params))


def _run_functional(opt_def, params, state, steps, hp=None):
  step = jax.jit(lambda p, s, g: opt_def.apply_gradient(hp or opt_def.hyper_params, p, s, g))
  for t in range(steps):
    params, state = step(params, state, _grads(params, t))
  return params, state


# Bitwise except: LAMB and LARS (per-tensor norms summed per leaf on one path, per segment of
# the flat buffer on the other: the ratio differs in the last bits) and AdaBelief (XLA:CPU
# contracts ``b2 * s + (1 - b2) * d * d + eps`` into FMAs differently in the two fusions; the
# first step is bitwise). Their bound, measured at <= 2 ulps after 3 steps: 2 ulps of the
# leaf's largest magnitude per step (float32), one bfloat16 ulp of it for bf16 params (the
# rounding of a master copy that differs in its last float32 bits).
NOT_BITWISE = ("AdaBelief", "LAMB", "LARS")


@pytest.mark.parametrize("master", [False, True], ids=["f32", "master"])
@pytest.mark.parametrize("name, kw", FLAT, ids=FLAT_IDS)
def test_functional_per_leaf_equals_flat(name, kw, master):
  params = _tree(1)
  if master:
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  opt_def = getattr(optim, name)(learning_rate=0.05, backend="jnp", master_weights=master, **kw)
  flat_p, flat_s = _run_functional(opt_def, params, opt_def.init_state(params), 3)
  leaf_p, leaf_s = _run_functional(opt_def, params, _per_leaf_state(opt_def, params), 3)
  assert isinstance(flat_s.param_states, FlatState)
  assert int(leaf_s.step) == int(flat_s.step) == 3
  # the per-leaf form comes back as it went in: a tree of the state class
  want_def = jax.tree.structure(jax.tree.map(opt_def.init_param_state, params))
  assert jax.tree.structure(leaf_s.param_states) == want_def
  assert jax.tree.structure(flat_s.param_states.per_leaf()) == want_def
  pairs = list(zip(jax.tree.leaves(flat_p), jax.tree.leaves(leaf_p))) + list(
      zip(jax.tree.leaves(flat_s.param_states.per_leaf()), jax.tree.leaves(leaf_s.param_states)))
  for a, b in pairs:
    if name in NOT_BITWISE:
      a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
      scale = np.max(np.abs(a32))
      tol = 2 * 3 * np.spacing(scale) if a.dtype == jnp.float32 else scale * 2.0 ** -7
      assert a.dtype == b.dtype and np.max(np.abs(a32 - b32)) <= tol, (name, a.dtype)
    else:
      _bitwise(a, b, name)


def test_functional_via_optimizer_object_and_hyper_param_overrides():
  """An ``Optimizer`` holding per-leaf state (its eager step compiles) runs the flat path's
  arithmetic, Python-float hyper-parameters included."""
  params = _tree(2)
  opt_def = optim.Adam(learning_rate=0.1, beta1=0.8, backend="jnp")
  flat = opt_def.create(params)
  leaf = optim.Optimizer(opt_def, _per_leaf_state(opt_def, params), params)
  for t in range(2):
    flat = flat.apply_gradient(_grads(params, t), learning_rate=0.03)
    leaf = leaf.apply_gradient(_grads(params, t), learning_rate=0.03)
  assert int(flat.state.step) == int(leaf.state.step) == 2
  for a, b in zip(jax.tree.leaves((flat.target, flat.state.param_states.per_leaf())),
                  jax.tree.leaves((leaf.target, leaf.state.param_states))):
    _bitwise(a, b, "Optimizer")
  assert type(leaf.state.param_states["Dense_0"]["bias"]) is adam._AdamParamState


@pytest.mark.parametrize("kw", [
    dict(min_dim_size_to_factor=2),
    dict(min_dim_size_to_factor=2, beta1=0.9),
    dict(factored=False),
    dict(factored=False, beta1=0.9, weight_decay_rate=0.01),
], ids=["factored", "factored-momentum", "unfactored", "unfactored-momentum-wd"])
def test_adafactor_functional(kw):
  params = _tree(3)
  opt_def = optim.Adafactor(learning_rate=0.05, **kw)
  state = opt_def.init_state(params)
  assert jax.tree.structure(state.param_states, is_leaf=lambda x: isinstance(x, ParamState)) \
      == jax.tree.structure(params)
  new_p, new_s = _run_functional(opt_def, params, state, 2)
  for st in jax.tree.leaves(new_s.param_states, is_leaf=lambda x: isinstance(x, ParamState)):
    assert type(st) is adafactor._AdafactorParamState
  # the same from dict states (fusedopt's earlier form)
  dicts = OptimizerState(state.step, jax.tree.map(
      lambda st: {k: getattr(st, k) for k in ("v_row", "v_col", "v", "m")},
      state.param_states, is_leaf=lambda x: isinstance(x, ParamState)))
  p2, s2 = _run_functional(opt_def, params, dicts, 2)
  for a, b in zip(jax.tree.leaves((new_p, new_s)), jax.tree.leaves((p2, s2))):
    _bitwise(a, b, "adafactor dict state")


def _wn_per_leaf_by_hand(wn_def, params):
  """flax 0.5.3's WeightNorm.init_state, written out: per leaf _WeightNormParamState."""
  eps = wn_def.hyper_params.wn_eps

  def split(p):
    if p.size > p.shape[-1]:
      n = jnp.sqrt(jnp.square(p).sum(tuple(range(p.ndim - 1)), keepdims=True) + eps)
      return p / n, n
    return p, ()
  leaves, treedef = jax.tree.flatten(params)
  ds, ss = zip(*(split(p) for p in leaves))
  direction, scale = treedef.unflatten(ds), treedef.unflatten(ss)
  inner = wn_def.wrapped_optimizer
  d_state = jax.tree.map(inner.init_param_state, direction)
  s_state = jax.tree.map(inner.init_param_state, scale)
  return OptimizerState(jnp.asarray(0, jnp.int32), jax.tree.map(
      lambda _, *a: weight_norm._WeightNormParamState(*a), params, d_state, s_state, direction,
      scale))


@pytest.mark.parametrize("inner", [
    lambda: optim.Momentum(learning_rate=0.1, beta=0.8, nesterov=True, backend="jnp"),
    lambda: optim.Adam(learning_rate=0.05, backend="jnp"),
], ids=["momentum", "adam"])
def test_weight_norm_functional(inner):
  params = _tree(4)
  wn_def = optim.WeightNorm(inner(), wn_decay=0.01)
  fused = wn_def.init_state(params)
  by_hand = _wn_per_leaf_by_hand(wn_def, params)
  # the fused state's per-leaf view is flax's per-leaf state
  view = fused.param_states.per_leaf()
  assert jax.tree.structure(view) == jax.tree.structure(by_hand.param_states)
  for a, b in zip(jax.tree.leaves(view), jax.tree.leaves(by_hand.param_states)):
    _bitwise(a, b, "wn init")
  st = fused.param_states["Dense_0"]["kernel"]
  assert type(st) is weight_norm._WeightNormParamState
  assert type(st.direction_state) is type(inner().init_param_state(jnp.zeros(2)))
  assert fused.param_states["Dense_0"]["bias"].scale == ()
  # three steps in each form: the same numbers; each form comes back as it went in
  p1, s1 = _run_functional(wn_def, params, fused, 3)
  p2, s2 = _run_functional(wn_def, params, by_hand, 3)
  assert isinstance(s1.param_states, weight_norm.WeightNormState)
  assert jax.tree.structure(s2.param_states) == jax.tree.structure(by_hand.param_states)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    _bitwise(a, b, "wn params")
  for a, b in zip(jax.tree.leaves(s1.param_states.per_leaf()), jax.tree.leaves(s2.param_states)):
    _bitwise(a, b, "wn state")
  # checkpoints of both forms: the same bytes, and each restores into its own form
  b1 = ser.to_bytes(optim.Optimizer(wn_def, s1, p1))
  b2 = ser.to_bytes(optim.Optimizer(wn_def, s2, p2))
  assert b1 == b2
  restored = ser.from_bytes(optim.Optimizer(wn_def, by_hand, params), b1)
  assert jax.tree.structure(restored.state.param_states) == \
      jax.tree.structure(by_hand.param_states)
  for a, b in zip(jax.tree.leaves(restored.state.param_states), jax.tree.leaves(s2.param_states)):
    _bitwise(a, b, "wn restored")


@pytest.mark.parametrize("name, kw", [("Adam", {}), ("RMSProp", {}), ("GradientDescent", {}),
                                      ("Momentum", dict(nesterov=True))])
def test_checkpoints_of_both_forms_are_the_same_bytes(name, kw):
  params = _tree(5)
  opt_def = getattr(optim, name)(learning_rate=0.05, backend="jnp", **kw)   # the per-leaf rule
  flat_p, flat_s = _run_functional(opt_def, params, opt_def.init_state(params), 2)
  leaf_p, leaf_s = _run_functional(opt_def, params, _per_leaf_state(opt_def, params), 2)
  flat_bytes = ser.to_bytes(optim.Optimizer(opt_def, flat_s, flat_p))
  assert flat_bytes == ser.to_bytes(optim.Optimizer(opt_def, leaf_s, leaf_p))
  sd = ser.to_state_dict(optim.Optimizer(opt_def, flat_s, flat_p))
  leaf_sd = sd["state"]["param_states"]["Dense_0"]["kernel"]
  if name == "RMSProp":
    assert list(leaf_sd) == ["v", "mg"] and leaf_sd["mg"] is None   # flax 0.5.3's layout
  elif name == "GradientDescent":
    assert leaf_sd == {}
  # restoring into the per-leaf form gives state objects again
  restored = ser.from_bytes(optim.Optimizer(opt_def, _per_leaf_state(opt_def, params), params),
                            flat_bytes)
  st = restored.state.param_states["Dense_1"]["kernel"]
  if name == "GradientDescent":
    assert st == ()
  else:
    assert type(st) is opt_def.param_state_class
  for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(leaf_s)):
    _bitwise(a, b, "restored")


# ----------------------------------------------------------------------------- 3. FlatState views

def test_flat_state_reads_like_the_tree():
  params = _tree(6)
  opt = optim.Adam(learning_rate=0.1).create(params)
  opt = jax.jit(lambda o, g: o.apply_gradient(g))(opt, _grads(params, 0))   # through jit
  ps = opt.state.param_states
  assert isinstance(ps, FlatState) and ps.param_state is adam._AdamParamState
  st = ps["Dense_0"]["kernel"]
  assert type(st) is adam._AdamParamState
  _bitwise(st.grad_ema, ps.leaf("grad_ema", 1), "view")   # leaf order: Dense_0/bias, kernel
  # against per_leaf() and the buffers
  pl = ps.per_leaf()
  for path in (("Dense_0", "kernel"), ("Dense_0", "bias"), ("Dense_1", "kernel")):
    a, b = ps[path[0]][path[1]], pl[path[0]][path[1]]
    for k in ("grad_ema", "grad_sq_ema"):
      _bitwise(getattr(a, k), getattr(b, k), path)
  expect = 0.1 * np.asarray(_grads(params, 0)["Dense_1"]["bias"])   # (1 - b1) g from zero
  np.testing.assert_allclose(np.asarray(ps["Dense_1"]["bias"].grad_ema), expect, rtol=1e-6)
  sub = ps["Dense_1"]
  assert set(sub) == {"kernel", "bias"} and type(sub["bias"]) is adam._AdamParamState
  assert set(ps.keys()) == {"Dense_0", "Dense_1"}
  # the dict form for checkpoints
  d = ps.per_leaf_dicts()["Dense_0"]["bias"]
  assert type(d) is dict and set(d) == {"grad_ema", "grad_sq_ema"}
  # the flat buffers are what jit sees: the leaves of the state are the buffers
  assert len(jax.tree.leaves(ps)) == 2 * len(ps.layout.groups)


@pytest.mark.parametrize("make", [
    lambda p: tuple(p["Dense_0"].values()),
    lambda p: [p["Dense_0"]["kernel"], p["Dense_1"]["bias"]],
    lambda p: FrozenDict(p),
], ids=["tuple", "list", "frozendict"])
def test_flat_state_views_of_other_containers(make):
  params = make(_tree(7))
  opt_def = optim.Momentum(learning_rate=0.1, beta=0.5)
  new_p, new_s = _run_functional(opt_def, params, opt_def.init_state(params), 1)
  ps = new_s.param_states
  leaves = jax.tree.leaves(jax.tree.map(lambda g: -0.0 + g, _grads(params, 0)))
  if isinstance(params, (tuple, list)):
    for i, g in enumerate(leaves):
      assert type(ps[i]) is momentum._MomentumParamState
      np.testing.assert_allclose(np.asarray(ps[i].momentum), np.asarray(g), rtol=1e-6)
  else:
    np.testing.assert_allclose(np.asarray(ps["Dense_1"]["kernel"].momentum),
                               np.asarray(_grads(params, 0)["Dense_1"]["kernel"]), rtol=1e-6)


def test_flat_state_of_a_single_array():
  p = jnp.arange(4.0)
  opt_def = optim.Adam(learning_rate=0.1)
  _, state = _run_functional(opt_def, p, opt_def.init_state(p), 1)
  ps = state.param_states
  np.testing.assert_allclose(np.asarray(ps.grad_ema), 0.1 * np.asarray(_grads(p, 0)),
                             rtol=1e-6)
  assert ps.grad_sq_ema.shape == (4,)
  assert type(ps.per_leaf()) is adam._AdamParamState
  with pytest.raises(AttributeError):
    ps.no_such_field   # pylint: disable=pointless-statement
  # on a tree, the attribute names the way through the tree
  tree_state = opt_def.init_state(_tree(0)).param_states
  with pytest.raises(AttributeError, match=r"\['Dense_0'\]\['kernel'\]"):
    tree_state.grad_ema   # pylint: disable=pointless-statement


def test_views_of_rmsprop_master_and_sgd():
  params = _tree(8)
  ps = optim.RMSProp(learning_rate=0.1).init_state(params).param_states
  st = ps["Dense_0"]["kernel"]
  assert type(st) is rmsprop._RMSPropParamState and st.mg is None
  ps = optim.Adam(learning_rate=0.1, master_weights=True).init_state(params).param_states
  assert type(ps["Dense_1"]["bias"]) is adam._AdamParamStateWithMaster
  np.testing.assert_array_equal(np.asarray(ps["Dense_1"]["bias"].master),
                                np.asarray(params["Dense_1"]["bias"]))
  ps = optim.GradientDescent(learning_rate=0.1).init_state(params).param_states
  assert ps["Dense_0"]["kernel"] == ()
  assert ps.per_leaf() == jax.tree.map(lambda _: (), params)
  assert ps == jax.tree.map(lambda _: (), params)


def test_equality_as_flax_per_leaf_form():
  """flax 0.5.3's own tests compare states with ``==`` (size-1 arrays): a FlatState equals the
  equivalent per-leaf tree of state objects, in either order, also inside an OptimizerState."""
  p = np.zeros((1,), np.float32)
  state = optim.Adam(learning_rate=0.1).init_state(p)
  expected = OptimizerState(0, adam._AdamParamState(np.zeros((1,)), np.zeros((1,))))
  assert state == expected and expected == state
  assert state.param_states == adam._AdamParamState(np.zeros((1,)), np.zeros((1,)))
  assert not state.param_states == adam._AdamParamState(np.ones((1,)), np.zeros((1,)))
  assert state.param_states != adam._AdamParamState(np.ones((1,)), np.zeros((1,)))
  assert state.param_states != adabelief._AdaBeliefParamState(np.zeros((1,)), np.zeros((1,)))
  # one step (exact numbers: g = 1, b1 = 0.5, b2 = 0.75): m = 0.5, v = 0.25
  opt_def = optim.Adam(learning_rate=0.1, beta1=0.5, beta2=0.75)
  _, new = opt_def.apply_gradient(opt_def.hyper_params, p, state, np.ones((1,), np.float32))
  assert new == OptimizerState(1, adam._AdamParamState(np.array([0.5]), np.array([0.25])))
  # a tree target
  tree = {"a": np.zeros((1,), np.float32), "b": (np.zeros((1,), np.float32),)}
  st = optim.Momentum(learning_rate=0.1).init_state(tree).param_states
  z = momentum._MomentumParamState(np.zeros((1,)))
  assert st == {"a": z, "b": (z,)} and {"a": z, "b": (z,)} == st
  assert st != {"a": z, "b": [z]}
  assert st != {"a": z}
  # two FlatStates: equal as their per-leaf forms; the same buffers are equal whatever the size
  st2 = optim.Momentum(learning_rate=0.5).init_state(tree).param_states
  assert st == st2
  big = optim.Momentum(learning_rate=0.1).init_state(_tree(0)).param_states
  assert big == big and big == big.replace(fields=dict(big.fields))
  assert big != st


def test_weight_norm_state_equality_as_flax_per_leaf_form():
  """WeightNorm's state compares as 0.5.3's per-leaf tree of ``_WeightNormParamState``s, in
  either order; a different value makes it unequal (size-1 leaves, as flax's tests use)."""
  params = {"a": np.full((1,), 2.0, np.float32), "b": np.full((1, 1), 3.0, np.float32)}
  d = optim.WeightNorm(optim.Momentum(learning_rate=0.1, beta=0.9, backend="jnp"))
  opt = d.create(params).apply_gradient({"a": np.full((1,), 0.5, np.float32),
                                         "b": np.full((1, 1), 0.25, np.float32)})
  ps = opt.state.param_states
  view = ps.per_leaf()
  assert type(view["a"]).__name__ == "_WeightNormParamState"
  assert ps == view and view == ps and ps == ps
  assert ps != jax.tree_util.tree_map(lambda x: x + 1, view)


def test_old_flat_state_without_class_reads_as_dicts():
  """A FlatState pickled before it knew its class (no ``param_state``) still loads and reads,
  as dicts; so does one built without it."""
  params = _tree(9)
  ps = optim.Adam(learning_rate=0.1).init_state(params).param_states
  old = FlatState.__new__(FlatState)
  old.__dict__.update(fields=ps.fields, layout=ps.layout)   # what unpickling an old one does
  assert old.param_state is None
  assert old["Dense_0"]["kernel"]["grad_ema"].shape == (4, 3)
  assert type(old.per_leaf()["Dense_1"]["bias"]) is dict
  new = pickle.loads(pickle.dumps(ps))
  assert new.param_state is adam._AdamParamState
  assert type(new["Dense_1"]["bias"]) is adam._AdamParamState
  # and checkpoints do not depend on it
  sd_old = ser.to_state_dict(old)
  sd_new = ser.to_state_dict(ps)
  assert jax.tree.structure(sd_old) == jax.tree.structure(sd_new)


def test_param_state_reads_by_name():
  """A per-parameter state also reads like the dict fusedopt used before (read-only)."""
  st = optim.RMSProp(learning_rate=0.1).init_param_state(jnp.zeros(3))
  assert st["v"] is st.v and "v" in st and "mg" not in st and list(st.keys()) == ["v"]
  with pytest.raises(KeyError):
    st["grad_ema"]   # pylint: disable=pointless-statement
  with pytest.raises(dataclasses.FrozenInstanceError):
    st.v = 1


def test_per_leaf_master_follows_replaced_target():
  """``Optimizer.replace(target=...)`` re-reads the master copy from the new target in the
  per-leaf form too (as for flat state), and the next step starts from it."""
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(10))
  opt_def = optim.Adam(learning_rate=0.05, master_weights=True, backend="jnp")
  leaf = optim.Optimizer(opt_def, _per_leaf_state(opt_def, params), params)
  flat = opt_def.create(params)
  edited = jax.tree.map(lambda x: (x * 2).astype(jnp.bfloat16), params)
  leaf, flat = leaf.replace(target=edited), flat.replace(target=edited)
  st = leaf.state.param_states["Dense_0"]["kernel"]
  np.testing.assert_array_equal(np.asarray(st.master),
                                np.asarray(edited["Dense_0"]["kernel"], np.float32))
  leaf = leaf.apply_gradient(_grads(params, 0))
  flat = flat.apply_gradient(_grads(params, 0))
  for a, b in zip(jax.tree.leaves((flat.target, flat.state.param_states.per_leaf())),
                  jax.tree.leaves((leaf.target, leaf.state.param_states))):
    _bitwise(a, b, "replaced target")


def test_tx_adafactor_state_keeps_its_structure():
  """``fusedopt.tx.adafactor`` holds optax's state (``FactoredState`` and, with momentum, an
  ``EmaState``), Adafactor's per-leaf fields read from it; a step (also one that skips a
  non-finite gradient) returns the same pytree structure, as ``lax.scan`` needs."""
  from fusedopt import tx   # pylint: disable=import-outside-toplevel
  import optax   # pylint: disable=import-outside-toplevel
  params = _tree(11)
  for t in (tx.adafactor(1e-2), tx.adafactor(1e-2, momentum=0.9, skip_nonfinite=True)):
    state = t.init(params)
    ref = optax.adafactor(1e-2, momentum=t.update.spec.hyper["momentum"])
    assert jax.tree.structure(state) == jax.tree.structure(ref.init(params))
    _, new = jax.jit(t.update)(_grads(params, 0), state, params)
    assert jax.tree.structure(new) == jax.tree.structure(state)
