"""Scenarios run by both flax 0.5.3's ``flax.optim`` and fusedopt, for the differential test.

Not a test module (pytest does not collect it): ``tests/test_flax053_differential.py`` runs it as
a script twice, once with a flax 0.5.3 interpreter (``--impl flax``) and once with fusedopt's
(``--impl fusedopt``), and compares what the two wrote. Every scenario builds its inputs from
fixed seeds (numpy ``RandomState``, keyed by the leaf's path and the step, so the leaf order of
either tree library does not matter) and touches the optimizer library only through the API the
two share (``optim``, ``serialization``, ``FrozenDict``, ``DynamicScale``).

    python flax053_scenarios.py --impl {flax,fusedopt} --out DIR [--restore-from OTHER_DIR]
                                [--only NAME,NAME]

Phase 1 (no ``--restore-from``) runs every scenario and writes ``DIR/results.json`` +
``DIR/arrays.npz`` and, for the checkpoint scenarios (``ckpt_*``), ``DIR/<scenario>.msgpack`` (this
implementation's ``serialization.to_bytes`` of its optimizer after two steps). Phase 2
(``--restore-from OTHER_DIR``) restores the *other* implementation's checkpoints into this
implementation's optimizer, records what was restored, re-serializes it and takes one more step;
it writes ``DIR/restore.json`` + ``DIR/restore.npz``.

A record is a label (``sd/2``: ``serialization.to_state_dict(optimizer)`` after step 2; other
labels per scenario) and a tree flattened to ``path -> leaf``; each leaf is described by its kind
(``array``, ``none``, ``empty`` for an empty container, ``py:<type>`` for a Python scalar,
``bytes``), dtype and shape, and arrays are stored in the .npz. A scenario that raises records
the exception instead (so one failure does not hide the others).
"""
import argparse
import functools
import json
import os
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Mapping

import numpy as np

IMPL = None       # "flax" or "fusedopt"
optim = serialization = FrozenDict = DynamicScale = None
jax = jnp = None


def _import(impl):
  global IMPL, optim, serialization, FrozenDict, DynamicScale, jax, jnp
  IMPL = impl
  warnings.simplefilter("ignore", DeprecationWarning)
  warnings.simplefilter("ignore", FutureWarning)
  import jax as _jax
  import jax.numpy as _jnp
  jax, jnp = _jax, _jnp
  if impl == "flax":
    from flax import optim as _optim, serialization as _ser
    from flax.core import FrozenDict as _FD
    from flax.optim.dynamic_scale import DynamicScale as _DS
    # flax 0.5.3 (for jax 0.3) recognises device arrays in ``serialization.to_bytes`` as
    # ``jax.xla.DeviceArray``, which jax 0.4 (the oldest jax with wheels for current Pythons)
    # removed; without this alias to_bytes fails with AttributeError. ``jax.Array`` is what
    # DeviceArray became, and flax's code then converts it with np.array as it did then.
    if not hasattr(_jax.interpreters.xla, "DeviceArray"):
      _jax.interpreters.xla.DeviceArray = _jax.Array
  else:
    # The fusedopt of the checkout this file lives in (also when another one is installed).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fusedopt as _optim
    from fusedopt import serialization as _ser
    from fusedopt.frozen_dict import FrozenDict as _FD
    _DS = _optim.DynamicScale
  optim, serialization, FrozenDict, DynamicScale = _optim, _ser, _FD, _DS


# ----------------------------------------------------------------------------------------------
# Deterministic inputs.

# Shapes: a matrix, a vector, a 4-D kernel, a scalar and a 1-element vector (float32 only: the
# bf16 state dtype differs on purpose). Nested dicts as flax models have them.
BASE = {"Dense_0": {"kernel": (4, 3), "bias": (3,)}, "Conv_0": {"kernel": (2, 2, 3, 5)},
        "scale": (), "one": (1,)}
# WeightNorm: flax 0.5.3 reads ``param.shape[-1]``, so no scalar.
WN = {"Dense_0": {"kernel": (4, 3), "bias": (3,)}, "Conv_0": {"kernel": (2, 2, 3, 5)},
      "one": (1,)}
# Adafactor with min_dim_size_to_factor=2: factored 2-D, 2-D with a tie, 3-D; unfactored
# vector and scalar.
FACT = {"w": (6, 4), "sq": (3, 3), "t": (2, 3, 4), "b": (5,), "s": ()}
# Adafactor with its defaults (min_dim_size_to_factor=128).
BIG = {"w": (130, 129), "b": (129,), "s": ()}


def _seed(path, salt):
  return (zlib.crc32(path.encode()) + 7919 * salt) % (2 ** 31)


def _map_with_path(fn, shapes, path="", frozen=False):
  if isinstance(shapes, Mapping):
    # Sorted keys, as jax's tree_unflatten leaves them: msgpack bytes follow dict order.
    out = {k: _map_with_path(fn, shapes[k], f"{path}/{k}", frozen) for k in sorted(shapes)}
    return FrozenDict(out) if frozen else out
  return fn(path, shapes)


def make_params(shapes, frozen=False, salt=0):
  """float32 params, nonzero (LAMB's zero-norm convention differs on purpose)."""
  def leaf(path, shape):
    rs = np.random.RandomState(_seed(path, salt))
    return jnp.asarray((rs.standard_normal(shape) + 0.25).astype(np.float32))
  return _map_with_path(leaf, shapes, frozen=frozen)


def make_grads(shapes, step, frozen=False):
  def leaf(path, shape):
    rs = np.random.RandomState(_seed(path, 1000 + step))
    return jnp.asarray(rs.standard_normal(shape).astype(np.float32))
  return _map_with_path(leaf, shapes, frozen=frozen)


def sd(opt):
  return serialization.to_state_dict(opt)


# ----------------------------------------------------------------------------------------------
# Recording.

class Recorder:
  def __init__(self, arrays, prefix):
    self.arrays, self.prefix, self.records, self.meta = arrays, prefix, [], {}

  def tree(self, label, tree):
    flat = []
    _flatten(tree, "", flat)
    leaves = []
    for path, leaf in flat:
      if isinstance(leaf, tuple):          # ("none",) / ("empty",)
        leaves.append([path, leaf[0], None, None, None])
        continue
      if isinstance(leaf, (bytes, bytearray)):
        arr, kind = np.frombuffer(bytes(leaf), np.uint8), "bytes"
      elif isinstance(leaf, (bool, int, float)) and not hasattr(leaf, "shape"):
        arr, kind = np.asarray(leaf), f"py:{type(leaf).__name__}"
      else:
        arr, kind = np.asarray(leaf), "array"
      key = f"a{len(self.arrays)}"
      # .npz has no bfloat16: stored as float32 (exact), the descriptor keeps the dtype.
      self.arrays[key] = arr.astype(np.float32) if arr.dtype.name == "bfloat16" else arr
      leaves.append([path, kind, str(arr.dtype), list(arr.shape), key])
    self.records.append([label, leaves])


def _flatten(tree, path, out):
  if tree is None:
    out.append((path, ("none",)))
  elif isinstance(tree, Mapping):
    if not tree:
      out.append((path, ("empty",)))
    for k in sorted(tree, key=str):
      _flatten(tree[k], f"{path}/{k}", out)
  elif isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
    if not tree:
      out.append((path, ("empty",)))
    for i, v in enumerate(tree):
      _flatten(v, f"{path}/{i}", out)
  else:
    out.append((path, tree))


# ----------------------------------------------------------------------------------------------
# Scenarios. Each takes a Recorder; ``SCENARIOS`` maps name -> function.

SCENARIOS = {}
CKPT = {}       # checkpoint scenarios: name -> (make optimizer def, shapes, frozen)


def scenario(fn):
  SCENARIOS[fn.__name__] = fn
  return fn


def run_steps(rec, opt_def, shapes, steps=3, overrides=None, frozen=False, focus=None):
  """Creates the optimizer, applies ``steps`` gradient steps, records the state dict each time.
  ``overrides(step, opt)`` gives the keyword arguments of ``apply_gradient``."""
  params = make_params(shapes, frozen)
  opt = opt_def.create(params, focus=focus) if focus is not None else opt_def.create(params)
  rec.tree("sd/0", sd(opt))
  for k in range(1, steps + 1):
    kw = overrides(k, opt) if overrides else {}
    opt = opt.apply_gradient(make_grads(shapes, k, frozen), **kw)
    rec.tree(f"sd/{k}", sd(opt))
  rec.tree(f"state_dict()/{steps}", opt.state_dict())   # the method: the same as sd/<steps>
  return opt


def _plain(name, make_def, shapes=BASE, **kw):
  def fn(rec):
    run_steps(rec, make_def(), shapes, **kw)
  fn.__name__ = name
  scenario(fn)


# Each optimizer with its defaults (learning rates large enough for visible steps) and with
# non-default hyper-parameters; eps >= 1e-4 where an eps is set, so that where it is added
# (inside or outside a square root, once or twice) changes the result well beyond float32
# rounding.
_plain("sgd", lambda: optim.GradientDescent(learning_rate=0.1))
_plain("momentum", lambda: optim.Momentum(learning_rate=0.1))
_plain("momentum_wd_nesterov",
       lambda: optim.Momentum(learning_rate=0.1, beta=0.8, weight_decay=0.05, nesterov=True))
_plain("adam", lambda: optim.Adam(learning_rate=0.01))
_plain("adam_wd", lambda: optim.Adam(learning_rate=0.01, beta1=0.8, beta2=0.99, eps=1e-3,
                                     weight_decay=0.1))
_plain("adagrad", lambda: optim.Adagrad(learning_rate=0.1))
_plain("adagrad_eps", lambda: optim.Adagrad(learning_rate=0.1, eps=0.5))
_plain("rmsprop", lambda: optim.RMSProp(learning_rate=0.01))
_plain("rmsprop_centered",
       lambda: optim.RMSProp(learning_rate=0.01, beta2=0.8, eps=1e-3, centered=True))
_plain("lamb", lambda: optim.LAMB(learning_rate=0.01))
_plain("lamb_wd", lambda: optim.LAMB(learning_rate=0.01, beta1=0.8, beta2=0.99,
                                     weight_decay=0.1, eps=1e-3))
_plain("lars", lambda: optim.LARS(learning_rate=0.1))
_plain("lars_wd_eps_tc_nesterov",
       lambda: optim.LARS(learning_rate=0.1, beta=0.8, weight_decay=0.05,
                          trust_coefficient=0.02, eps=1e-3, nesterov=True))
_plain("adafactor_default", lambda: optim.Adafactor(learning_rate=0.01), shapes=BIG)
_plain("adafactor_factored_beta1_noclip",
       lambda: optim.Adafactor(learning_rate=0.01, beta1=0.9, clipping_threshold=None,
                               min_dim_size_to_factor=2, decay_rate=0.7), shapes=FACT)
_plain("adafactor_factored_noscale",
       lambda: optim.Adafactor(learning_rate=0.01, multiply_by_parameter_scale=False,
                               clipping_threshold=0.5, min_dim_size_to_factor=2,
                               weight_decay_rate=0.01, step_offset=-2), shapes=FACT)
_plain("adafactor_unfactored",
       lambda: optim.Adafactor(learning_rate=0.01, factored=False), shapes=FACT)
_plain("adafactor_unfactored_beta1_clip",
       lambda: optim.Adafactor(learning_rate=0.01, factored=False, beta1=0.8,
                               clipping_threshold=0.3, epsilon2=0.5), shapes=FACT)
_plain("adafactor_bf16_momentum",
       lambda: optim.Adafactor(learning_rate=0.01, beta1=0.9, min_dim_size_to_factor=2,
                               dtype_momentum=jnp.bfloat16), shapes=FACT)
_plain("adabelief", lambda: optim.AdaBelief(learning_rate=0.01))
_plain("adabelief_wd", lambda: optim.AdaBelief(learning_rate=0.01, beta1=0.8, beta2=0.99,
                                               eps=1e-3, weight_decay=0.1))
_plain("adadelta", lambda: optim.Adadelta(learning_rate=1.0))
_plain("adadelta_wd", lambda: optim.Adadelta(learning_rate=0.5, rho=0.8, eps=1e-4,
                                             weight_decay=0.1))

# A learning-rate (and other) override passed to apply_gradient, as a Python number and traced.
_plain("momentum_lr_override", lambda: optim.Momentum(learning_rate=0.1, weight_decay=0.01),
       overrides=lambda k, opt: {"learning_rate": 0.3 / k, "beta": 0.5} if k > 1 else {})
_plain("adam_lr_override", lambda: optim.Adam(learning_rate=0.01, weight_decay=0.01),
       overrides=lambda k, opt: {"learning_rate": 0.05 * k} if k > 1 else {})
_plain("lamb_lr_override", lambda: optim.LAMB(learning_rate=0.01, weight_decay=0.01),
       overrides=lambda k, opt: {"learning_rate": 0.05, "weight_decay": 0.0} if k > 1 else {})
_plain("adafactor_lr_override",
       lambda: optim.Adafactor(learning_rate=0.01, min_dim_size_to_factor=2), shapes=FACT,
       overrides=lambda k, opt: {"learning_rate": 0.1 / k, "decay_rate": 0.5} if k > 1 else {})
_plain("momentum_hyper_params",
       lambda: optim.Momentum(learning_rate=0.1),
       overrides=lambda k, opt: {"hyper_params": opt.optimizer_def.hyper_params.replace(
           learning_rate=0.02 * k, beta=0.5)})
_plain("adam_frozendict", lambda: optim.Adam(learning_rate=0.01, weight_decay=0.01),
       frozen=True)


@scenario
def adam_jit_lr(rec):
  """A jitted step with the learning rate a traced argument (a schedule)."""
  params = make_params(BASE)
  opt = optim.Adam(learning_rate=0.01, beta1=0.8).create(params)
  step = jax.jit(lambda o, g, lr: o.apply_gradient(g, learning_rate=lr))
  rec.tree("sd/0", sd(opt))
  for k in range(1, 4):
    opt = step(opt, make_grads(BASE, k), jnp.float32(0.01 * k))
    rec.tree(f"sd/{k}", sd(opt))


@scenario
def momentum_jit(rec):
  params = make_params(BASE)
  opt = optim.Momentum(learning_rate=0.1, weight_decay=0.01, nesterov=True).create(params)
  step = jax.jit(lambda o, g: o.apply_gradient(g))
  rec.tree("sd/0", sd(opt))
  for k in range(1, 4):
    opt = step(opt, make_grads(BASE, k))
    rec.tree(f"sd/{k}", sd(opt))


def _traversals():
  kernels = optim.ModelParamTraversal(lambda path, _: "kernel" in path)
  biases = optim.ModelParamTraversal(lambda path, _: path.endswith("/bias"))
  return kernels, biases


def _multi_overrides(k, opt):
  """Step 1 as defined, step 2 a learning rate for all, step 3 ``hyper_params=`` per optimizer."""
  if k == 2:
    return {"learning_rate": 0.05}
  if k == 3:
    hp = opt.optimizer_def.hyper_params
    return {"hyper_params": [hp[0].replace(learning_rate=0.2), hp[1].replace(learning_rate=0.02)]}
  return {}


@scenario
def multi_adam_momentum(rec):
  """Two path-based traversals with different optimizers; 'scale' and 'one' are selected by
  neither (state None, never change)."""
  kernels, biases = _traversals()
  opt_def = optim.MultiOptimizer(
      (kernels, optim.Adam(learning_rate=0.01, weight_decay=0.01)),
      (biases, optim.Momentum(learning_rate=0.1, nesterov=True)))
  run_steps(rec, opt_def, BASE, overrides=_multi_overrides)


@scenario
def multi_same_kind(rec):
  """Two Adams (fusedopt fuses these into one pass with per-tensor scalars)."""
  kernels, biases = _traversals()
  opt_def = optim.MultiOptimizer(
      (kernels, optim.Adam(learning_rate=0.01)),
      (biases, optim.Adam(learning_rate=0.1, beta1=0.8, weight_decay=0.1)))
  run_steps(rec, opt_def, BASE, overrides=_multi_overrides)


@scenario
def multi_frozendict(rec):
  kernels, biases = _traversals()
  opt_def = optim.MultiOptimizer((kernels, optim.Momentum(learning_rate=0.1)),
                                 (biases, optim.GradientDescent(learning_rate=0.5)))
  run_steps(rec, opt_def, BASE, frozen=True)


@scenario
def focus_adam(rec):
  """``create(target, focus=...)``: only the kernels are optimized."""
  kernels, _ = _traversals()
  run_steps(rec, optim.Adam(learning_rate=0.01), BASE, focus=kernels)


@scenario
def focus_momentum(rec):
  _, biases = _traversals()
  run_steps(rec, optim.Momentum(learning_rate=0.1, weight_decay=0.1), BASE, focus=biases,
            overrides=lambda k, opt: {"learning_rate": 0.2} if k == 3 else {})


@scenario
def weight_norm_adam(rec):
  run_steps(rec, optim.WeightNorm(optim.Adam(learning_rate=0.01)), WN)


@scenario
def weight_norm_momentum(rec):
  opt_def = optim.WeightNorm(optim.Momentum(learning_rate=0.1, nesterov=True), wn_decay=0.01,
                             wn_eps=1e-6)
  run_steps(rec, opt_def, WN,
            overrides=lambda k, opt: {"learning_rate": 0.05, "wn_decay": 0.1} if k == 3 else {})


@scenario
def hyper_params(rec):
  """The hyper-parameter fields of each optimizer (names are API: ``hp.replace(beta1=...)``)."""
  defs = {
      "GradientDescent": optim.GradientDescent(learning_rate=0.1),
      "Momentum": optim.Momentum(learning_rate=0.1),
      "Adam": optim.Adam(learning_rate=0.1),
      "Adagrad": optim.Adagrad(learning_rate=0.1),
      "RMSProp": optim.RMSProp(learning_rate=0.1),
      "LAMB": optim.LAMB(learning_rate=0.1),
      "LARS": optim.LARS(learning_rate=0.1),
      "Adafactor": optim.Adafactor(learning_rate=0.1),
      "AdaBelief": optim.AdaBelief(learning_rate=0.1),
      "Adadelta": optim.Adadelta(learning_rate=0.1),
  }
  for name, d in defs.items():
    rec.tree(f"hp/{name}", serialization.to_state_dict(d.hyper_params))
    rec.tree(f"hp_override/{name}",
             serialization.to_state_dict(d.update_hyper_params(learning_rate=0.5)))


@scenario
def dynamic_scale_f16(rec):
  """flax's docstring example: a float16 loss under jit; the scale grows every
  ``growth_interval + 1`` finite steps until the gradients overflow float16, then backs off."""
  def loss_fn(p):
    return jnp.sum(jnp.asarray(p, jnp.float16) ** 2)
  p = jnp.array([1.0, 2.0, 300.0], jnp.float32)
  ds = DynamicScale(growth_interval=1, scale=32.0)
  rec.tree("ds/0", serialization.to_state_dict(ds))
  compute = jax.jit(lambda ds, p: ds.value_and_grad(loss_fn)(p))
  for k in range(1, 11):
    ds, is_fin, loss, grad = compute(ds, p)
    p = p - jnp.where(is_fin, 1e-4 * grad, 0.0)
    rec.tree(f"step/{k}", {"ds": serialization.to_state_dict(ds), "is_fin": is_fin,
                           "loss": loss, "grad": grad, "p": p})


@scenario
def dynamic_scale_optimizer(rec):
  """value_and_grad with has_aux and two argnums driving an Adam step that is skipped
  (``jnp.where`` over the optimizer pytree) when the gradients are not finite (x = inf, nan).
  The loss is linear in the params so that the gradients (c * x * w, scaled by a power of two)
  come out exactly the same from both jax versions."""
  coeffs = make_grads(BASE, 0)
  def loss_fn(params, w, x):
    terms = jax.tree_util.tree_map(lambda l, c: jnp.sum(l * c), params, coeffs)
    loss = sum(jax.tree_util.tree_leaves(terms)) * x * w
    return loss, {"twice": 2 * loss}
  params = make_params(BASE)
  opt = optim.Adam(learning_rate=0.01, weight_decay=0.01).create(params)
  ds = DynamicScale(growth_interval=2, growth_factor=4.0, backoff_factor=0.25, scale=1024.0)
  rec.tree("ds/0", serialization.to_state_dict(ds))
  rec.tree("sd/0", sd(opt))
  xs = [1.0, 2.0, float("inf"), 0.5, float("nan"), 1.5, 1.0, 0.75]
  for k, x in enumerate(xs, 1):
    res = ds.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(opt.target, jnp.float32(1.5),
                                                                   jnp.float32(x))
    ds, is_fin, (loss, aux), (grads, gw) = res
    new_opt = opt.apply_gradient(grads)
    opt = jax.tree_util.tree_map(functools.partial(jnp.where, is_fin), new_opt, opt)
    rec.tree(f"ds/{k}", {"ds": serialization.to_state_dict(ds), "is_fin": is_fin,
                         "grads": grads})
    rec.tree(f"value/{k}", {"loss": loss, "aux": aux, "gw": gw})
    rec.tree(f"sd/{k}", sd(opt))


@scenario
def deprecated_compute_gradient(rec):
  """compute_gradient / compute_gradients / optimize (deprecated in 0.5.3, kept): a loss_fn
  returning an array gives (loss, grad), one returning (loss, aux) gives (loss, aux, grad);
  optimize returns (new_optimizer, loss[, aux])."""
  def loss_fn(p):
    return sum(jnp.sum(jnp.cos(l)) for l in jax.tree_util.tree_leaves(p))
  def loss_aux(p):
    loss = loss_fn(p)
    return loss, {"neg": -loss}
  opt = optim.Momentum(learning_rate=0.1).create(make_params(BASE))
  rec.tree("sd/0", sd(opt))
  warned = {}
  for name in ("compute_gradient", "compute_gradients", "optimize"):
    with warnings.catch_warnings(record=True) as w:
      warnings.simplefilter("always")
      if name == "optimize":
        out = opt.optimize(loss_fn)
        rec.tree("value/optimize", {"n": len(out), "loss": out[1]})
        rec.tree("sd/1", sd(out[0]))
        out = out[0].optimize(loss_aux, learning_rate=0.05)
        rec.tree("value/optimize_aux", {"n": len(out), "loss": out[1], "aux": out[2]})
        rec.tree("sd/2", sd(out[0]))
      else:
        out = getattr(opt, name)(loss_fn)
        rec.tree(f"value/{name}", {"n": len(out), "loss": out[0], "grad": out[-1]})
        out = getattr(opt, name)(loss_aux)
        rec.tree(f"value/{name}_aux", {"n": len(out), "loss": out[0], "aux": out[1],
                                       "grad": out[-1]})
    warned[name] = any(issubclass(x.category, DeprecationWarning) for x in w)
  rec.meta["deprecation_warned"] = warned


# Empty trees, empty subtrees, the per-leaf view of focus/MultiOptimizer state, the clash error,
# replicate/unreplicate (issue 16).
EMPTY_SUB = dict(BASE, empty={}, nested={"e": {}})


def param_states_view(rec, opt):
  """Records flax 0.5.3's ``opt.state.param_states`` (a tree mirroring the target); fusedopt's
  view of it is ``per_leaf()`` (its in-memory state is flat): the tree with each per-leaf state
  as the dict of its fields that are not None (``value/view``), and each leaf's type name
  (meta ``view_types``: ``_MomentumParamState``, ``NoneType``, ``{}`` for an empty subtree)."""
  ps = opt.state.param_states
  tree = ps if IMPL == "flax" else ps.per_leaf()
  types = {}

  def walk(x, path):
    if isinstance(x, Mapping):
      if not x:
        types[path] = "{}"
      return {k: walk(v, f"{path}/{k}") for k, v in x.items()}
    types[path] = type(x).__name__
    if x is None:
      return None
    return {k: v for k, v in serialization.to_state_dict(x).items() if v is not None}
  rec.tree("value/view", walk(tree, ""))
  rec.meta["view_types"] = types


_plain("empty_tree_momentum", lambda: optim.Momentum(learning_rate=0.1), shapes={})
_plain("empty_tree_adam", lambda: optim.Adam(learning_rate=0.1), shapes={})
_plain("empty_subtrees_adam", lambda: optim.Adam(learning_rate=0.01), shapes=EMPTY_SUB)


@scenario
def empty_tree_jit(rec):
  """An empty target under jit. (A MultiOptimizer or ``focus=`` over an empty dict raised
  IndexError in 0.5.3 -- its ``traverse_util.unflatten_dict`` of the empty path -- and works
  in fusedopt: docs/differences.md.)"""
  step = jax.jit(lambda o, g: o.apply_gradient(g))
  opt = optim.GradientDescent(learning_rate=0.1).create({})
  for k in range(1, 3):
    opt = step(opt, {})
    rec.tree(f"value/jit/{k}", sd(opt))


@scenario
def view_focus_empty_subtree(rec):
  """``create(focus=...)`` over a target with empty subtrees: the state view keeps them and has
  None outside the focus."""
  kernels, _ = _traversals()
  opt = run_steps(rec, optim.Momentum(learning_rate=0.1), EMPTY_SUB, steps=2, focus=kernels)
  param_states_view(rec, opt)


@scenario
def view_multi_mixed(rec):
  kernels, biases = _traversals()
  opt_def = optim.MultiOptimizer((kernels, optim.Momentum(learning_rate=0.1)),
                                 (biases, optim.Adagrad(learning_rate=0.1)))
  opt = run_steps(rec, opt_def, EMPTY_SUB, steps=2)
  param_states_view(rec, opt)


@scenario
def view_multi_fused(rec):
  kernels, biases = _traversals()
  opt_def = optim.MultiOptimizer((kernels, optim.Momentum(learning_rate=0.1)),
                                 (biases, optim.Momentum(learning_rate=0.5, beta=0.5)))
  opt = run_steps(rec, opt_def, BASE, steps=2, frozen=True)
  param_states_view(rec, opt)


@scenario
def clash_message(rec):
  """Two traversals selecting the same leaves (one of them an integer leaf): 0.5.3's ValueError
  and message, for a dict and a FrozenDict."""
  everything_but_scale = optim.ModelParamTraversal(lambda path, _: path != "/scale")
  kernels_and_n = optim.ModelParamTraversal(lambda path, _: "kernel" in path or path == "/n")
  opt_def = optim.MultiOptimizer((kernels_and_n, optim.Momentum(learning_rate=0.1)),
                                 (everything_but_scale, optim.Momentum(learning_rate=0.2)))
  params = dict(make_params(BASE), n=jnp.int32(3))
  for kind, target in (("dict", params), ("frozen", FrozenDict(params))):
    try:
      opt_def.create(target)
      rec.meta[kind] = "no error"
    except Exception as e:  # noqa: BLE001
      rec.meta[kind] = f"{type(e).__name__}: {e}"


@scenario
def replicate_adam(rec):
  """``Optimizer.replicate()`` (deprecated in 0.5.3; its warnings recorded), two pmapped steps,
  the replicated optimizer's state dict (one copy), ``unreplicate()`` and a step after it."""
  n = jax.local_device_count()
  params = make_params(EMPTY_SUB)
  opt = optim.Adam(learning_rate=0.01, weight_decay=0.01).create(params)
  rec.tree("sd/0", sd(opt))
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    rep = opt.replicate()
  rec.meta["replicate_warns"] = [[c.category.__name__, str(c.message)] for c in w]
  rec.meta["def"] = type(rep.optimizer_def).__name__
  rec.meta["axis_name"] = rep.optimizer_def.axis_name
  step = jax.pmap(lambda o, g: o.apply_gradient(g), axis_name="batch")
  for k in (1, 2):
    grads = jax.tree_util.tree_map(lambda x: jnp.stack([x] * n), make_grads(EMPTY_SUB, k))
    rep = step(rep, grads)
    rec.tree(f"sd/{k}", sd(rep))
  rec.tree("value/replicated_target", rep.target)
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    back = rep.unreplicate()
  rec.meta["unreplicate_warns"] = [[c.category.__name__, str(c.message)] for c in w]
  rec.meta["unreplicated_def"] = type(back.optimizer_def).__name__
  rec.tree("sd/3", sd(back.apply_gradient(make_grads(EMPTY_SUB, 3))))
  try:
    opt.unreplicate()
    rec.meta["unreplicate_plain"] = "no error"
  except Exception as e:  # noqa: BLE001
    rec.meta["unreplicate_plain"] = f"{type(e).__name__}: {e}"


# The functional OptimizerDef API (issue 16): ``init_state``, ``init_param_state`` and
# ``apply_gradient(hyper_params, params, state, grads)`` on a hand-built per-leaf state, as code
# written against flax 0.5.3's documentation calls them.

def _per_leaf_view(tree, types, prefix):
  """A per-leaf state tree as {field: value} dicts (None fields left out), each leaf's type name
  in ``types`` (``_AdamParamState``, ``tuple`` for GradientDescent's ``()``)."""
  def walk(x, path):
    if isinstance(x, Mapping):
      return {k: walk(v, f"{path}/{k}") for k, v in x.items()}
    types[prefix + path] = type(x).__name__
    if isinstance(x, tuple) and not hasattr(x, "__dataclass_fields__"):
      return {}
    return {k: (_per_leaf_view(v, types, f"{prefix}{path}/{k}") if k.endswith("_state") else v)
            for k, v in ((f.name, getattr(x, f.name)) for f in x.__dataclass_fields__.values())
            if v is not None}
  return walk(tree, "")


def _functional(name, make_def, shapes=BASE, steps=2, from_init_state=False):
  """``from_init_state``: the per-leaf states are ``init_state``'s (WeightNorm has no
  ``init_param_state``: NotImplementedError in both), else ``init_param_state``'s."""
  def fn(rec):
    opt_def = make_def()
    params = make_params(shapes)
    types = {}
    st = opt_def.init_state(params)
    # fusedopt keeps flat state; per_leaf() is the per-leaf tree flax 0.5.3 holds
    ps = st.param_states.per_leaf() if hasattr(st.param_states, "per_leaf") else st.param_states
    rec.tree("value/init_state", {"step": st.step, "view": _per_leaf_view(ps, types, "init")})
    per_leaf = (ps if from_init_state
                else jax.tree_util.tree_map(opt_def.init_param_state, params))
    state = optim.OptimizerState(jnp.asarray(0, jnp.int32), per_leaf)
    for k in range(1, steps + 1):
      params, state = opt_def.apply_gradient(opt_def.hyper_params, params, state,
                                             make_grads(shapes, k))
      rec.tree(f"value/functional/{k}", {
          "target": params, "step": state.step,
          "view": _per_leaf_view(state.param_states, types, f"step{k}")})
    rec.meta["types"] = types
  fn.__name__ = name
  scenario(fn)


_functional("functional_sgd", lambda: optim.GradientDescent(learning_rate=0.1))
_functional("functional_momentum", lambda: optim.Momentum(learning_rate=0.1, beta=0.8,
                                                          weight_decay=0.01, nesterov=True))
_functional("functional_adam", lambda: optim.Adam(learning_rate=0.01, weight_decay=0.01))
_functional("functional_adagrad", lambda: optim.Adagrad(learning_rate=0.1))
_functional("functional_rmsprop", lambda: optim.RMSProp(learning_rate=0.01))
_functional("functional_rmsprop_centered", lambda: optim.RMSProp(learning_rate=0.01,
                                                                 centered=True))
_functional("functional_lamb", lambda: optim.LAMB(learning_rate=0.01, weight_decay=0.01))
_functional("functional_lars", lambda: optim.LARS(learning_rate=0.1, weight_decay=0.01))
_functional("functional_adabelief", lambda: optim.AdaBelief(learning_rate=0.01))
_functional("functional_adadelta", lambda: optim.Adadelta(learning_rate=1.0))
_functional("functional_adafactor", lambda: optim.Adafactor(learning_rate=0.1,
                                                            min_dim_size_to_factor=2), FACT)
_functional("functional_adafactor_beta1", lambda: optim.Adafactor(
    learning_rate=0.1, beta1=0.9, min_dim_size_to_factor=2), FACT)
_functional("functional_weight_norm", lambda: optim.WeightNorm(
    optim.Momentum(learning_rate=0.1, beta=0.9)), WN, from_init_state=True)


# Checkpoints: after two steps, ``serialization.to_bytes``; restored (phase 1: own bytes;
# phase 2: the other implementation's bytes) into a freshly created optimizer, then step 3.
def _ckpt(name, make_def, shapes=BASE, frozen=False):
  CKPT[name] = (make_def, shapes, frozen)

  def fn(rec):
    opt = run_steps(rec, make_def(), shapes, steps=2, frozen=frozen)
    data = serialization.to_bytes(opt)
    rec.tree("bytes", data)
    with open(os.path.join(OUT, f"{name}.msgpack"), "wb") as f:
      f.write(data)
    opt3 = opt.apply_gradient(make_grads(shapes, 3, frozen))
    rec.tree("sd/3", sd(opt3))
    _restore_and_step(rec, name, data, "own")
  fn.__name__ = name
  scenario(fn)


def _restore_and_step(rec, name, data, tag):
  make_def, shapes, frozen = CKPT[name]
  template = make_def().create(make_params(shapes, frozen, salt=99))
  restored = serialization.from_bytes(template, data)
  rec.tree(f"{tag}_restored", sd(restored))
  rec.tree(f"{tag}_rebytes", serialization.to_bytes(restored))
  stepped = restored.apply_gradient(make_grads(shapes, 3, frozen))
  rec.tree(f"{tag}_sd/3", sd(stepped))


_ckpt("ckpt_sgd", lambda: optim.GradientDescent(learning_rate=0.1))
_ckpt("ckpt_momentum", lambda: optim.Momentum(learning_rate=0.1, weight_decay=0.01))
_ckpt("ckpt_adam", lambda: optim.Adam(learning_rate=0.01, weight_decay=0.01))
_ckpt("ckpt_rmsprop_centered", lambda: optim.RMSProp(learning_rate=0.01, centered=True))
_ckpt("ckpt_adagrad", lambda: optim.Adagrad(learning_rate=0.1))
_ckpt("ckpt_lars", lambda: optim.LARS(learning_rate=0.1, weight_decay=0.01, nesterov=True))
_ckpt("ckpt_adabelief", lambda: optim.AdaBelief(learning_rate=0.01, weight_decay=0.01))
_ckpt("ckpt_adadelta", lambda: optim.Adadelta(learning_rate=0.5, weight_decay=0.01))
_ckpt("ckpt_adafactor", lambda: optim.Adafactor(learning_rate=0.01, beta1=0.9,
                                                min_dim_size_to_factor=2), shapes=FACT)
_ckpt("ckpt_multi", lambda: optim.MultiOptimizer(
    (_traversals()[0], optim.Adam(learning_rate=0.01)),
    (_traversals()[1], optim.Momentum(learning_rate=0.1))))
_ckpt("ckpt_multi_fused_rmsprop", lambda: optim.MultiOptimizer(   # fusedopt fuses these
    (_traversals()[0], optim.RMSProp(learning_rate=0.01, centered=True)),
    (_traversals()[1], optim.RMSProp(learning_rate=0.02, beta2=0.8, centered=True))))
_ckpt("ckpt_weight_norm", lambda: optim.WeightNorm(optim.Adam(learning_rate=0.01)), shapes=WN)
_ckpt("ckpt_frozendict_lamb", lambda: optim.LAMB(learning_rate=0.01, weight_decay=0.01),
      frozen=True)
_ckpt("ckpt_empty_tree", lambda: optim.Momentum(learning_rate=0.1), shapes={})
_ckpt("ckpt_empty_subtrees_focus", lambda: optim.MultiOptimizer(
    (_traversals()[0], optim.Adam(learning_rate=0.01))), shapes=EMPTY_SUB)


# ----------------------------------------------------------------------------------------------

OUT = None


def main(argv=None):
  global OUT
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--impl", choices=("flax", "fusedopt"), required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--restore-from", default=None)
  ap.add_argument("--only", default=None, help="comma-separated scenario names")
  args = ap.parse_args(argv)
  OUT = args.out
  os.makedirs(OUT, exist_ok=True)
  t0 = time.time()
  _import(args.impl)
  import_s = time.time() - t0

  if args.restore_from:
    names = [n for n in CKPT if not args.only or n in args.only.split(",")]
    base = "restore"
    todo = {}
    for n in names:
      path = os.path.join(args.restore_from, f"{n}.msgpack")
      def fn(rec, n=n, path=path):
        with open(path, "rb") as f:
          _restore_and_step(rec, n, f.read(), "cross")
      todo[n] = fn
  else:
    names = [n for n in SCENARIOS if not args.only or n in args.only.split(",")]
    base = "results"
    todo = {n: SCENARIOS[n] for n in names}

  arrays, results = {}, {}
  for name, fn in todo.items():
    rec = Recorder(arrays, name)
    t = time.time()
    try:
      fn(rec)
      error = None
    except Exception as e:  # noqa: BLE001 -- recorded and reported by the test
      error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
    results[name] = {"records": rec.records, "meta": rec.meta, "error": error,
                     "seconds": round(time.time() - t, 3)}
  np.savez(os.path.join(OUT, base + ".npz"), **arrays)
  with open(os.path.join(OUT, base + ".json"), "w") as f:
    json.dump({"impl": args.impl, "module": optim.__file__, "jax": jax.__version__,
               "import_s": round(import_s, 2),
               "total_s": round(time.time() - t0, 2), "scenarios": results}, f)


if __name__ == "__main__":
  main()
