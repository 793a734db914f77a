"""Checkpoints: flax 0.5.3's state-dict layout, its msgpack bytes, flax.serialization and orbax.

The expected layouts are written out by hand from flax 0.5.3's source (flax/optim/base.py,
weight_norm.py, serialization.py), independently of fusedopt's conversion code; the expected bytes
come from flax's own encoder.
"""
import flax.serialization as flax_ser
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim
from fusedopt import serialization as ser
from fusedopt.flat import FlatState
from fusedopt.layout import FlatLayout


def _params(dtype=jnp.float32):
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return {"Dense_0": {"kernel": jax.random.normal(k[0], (5, 3)).astype(dtype),
                      "bias": jnp.zeros((3,), dtype)},
          "Dense_1": {"kernel": jax.random.normal(k[1], (3, 2)).astype(dtype),
                      "bias": jax.random.normal(k[2], (2,)).astype(dtype)}}


def _grads(params, i):
  return jax.tree.map(lambda p: (jnp.sin(jnp.arange(p.size, dtype=jnp.float32) + i)
                                 .reshape(p.shape) * 0.1).astype(p.dtype), params)


KERNELS = optim.ModelParamTraversal(lambda path, _: "kernel" in path)
BIASES = optim.ModelParamTraversal(lambda path, _: "bias" in path)

DEFS = {
    "adam": lambda: optim.Adam(0.01, weight_decay=0.01),
    "lamb": lambda: optim.LAMB(0.01),
    "momentum_nesterov": lambda: optim.Momentum(0.1, nesterov=True),
    "adafactor_beta1": lambda: optim.Adafactor(0.01, beta1=0.9),
    "rmsprop_centered": lambda: optim.RMSProp(0.01, centered=True),
    "multi_fused": lambda: optim.MultiOptimizer((KERNELS, optim.Adam(0.01)),
                                                (BIASES, optim.Adam(0.1))),
    "multi_mixed": lambda: optim.MultiOptimizer((KERNELS, optim.Momentum(0.01)),
                                                (BIASES, optim.Adagrad(0.1))),
    "multi_partial": lambda: optim.MultiOptimizer((BIASES, optim.Adam(0.1))),
    "weight_norm_momentum": lambda: optim.WeightNorm(optim.Momentum(0.1)),
    "weight_norm_adam": lambda: optim.WeightNorm(optim.Adam(0.01)),
    "adam_master_bf16": lambda: optim.Adam(0.01, master_weights=True),
    "adam_state_bf16": lambda: optim.Adam(0.01, state_dtype=jnp.bfloat16),
}
BF16_PARAMS = {"adam_master_bf16"}


def _trained(name, steps=2):
  params = _params(jnp.bfloat16 if name in BF16_PARAMS else jnp.float32)
  opt = DEFS[name]().create(params)
  for i in range(steps):
    opt = opt.apply_gradient(_grads(opt.target, i))
  return opt


def _host(tree):
  """Arrays to NumPy, dict order kept (jax.tree.map would sort the keys, changing the bytes)."""
  if isinstance(tree, dict):
    return {k: _host(v) for k, v in tree.items()}
  return None if tree is None else np.asarray(tree)


def _assert_same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


@pytest.mark.parametrize("name", sorted(DEFS))
def test_bytes_round_trip_is_bitwise_and_training_continues_identically(name):
  opt = _trained(name)
  blob = ser.to_bytes(opt)
  fresh = DEFS[name]().create(_params(jnp.bfloat16 if name in BF16_PARAMS else jnp.float32))
  back = ser.from_bytes(fresh, blob)
  _assert_same(back, opt)
  g = _grads(opt.target, 7)
  _assert_same(back.apply_gradient(g), opt.apply_gradient(g))


@pytest.mark.parametrize("name", ["adam", "multi_mixed", "weight_norm_adam"])
def test_bytes_equal_flax_encoder_and_flax_serialization_accepts_optimizer(name):
  opt = _trained(name)
  sd = opt.state_dict()
  assert ser.to_bytes(opt) == flax_ser.msgpack_serialize(_host(sd), in_place=True)
  assert flax_ser.to_bytes(opt) == ser.to_bytes(opt)              # registered with flax
  assert jax.tree.structure(flax_ser.to_state_dict(opt)) == jax.tree.structure(sd)
  fresh = DEFS[name]().create(_params())
  _assert_same(flax_ser.from_bytes(fresh, ser.to_bytes(opt)), opt)
  _assert_same(flax_ser.from_state_dict(fresh, sd), opt)


def test_flax_053_adam_checkpoint_of_bf16_params_restores_and_trains():
  """flax 0.5.3 kept Adam's moments in the param dtype and the step as int32."""
  params = _params(jnp.bfloat16)
  rng = np.random.default_rng(0)
  m = jax.tree.map(lambda p: (rng.normal(size=p.shape) * 0.01).astype(jnp.bfloat16), params)
  v = jax.tree.map(lambda p: (rng.random(size=p.shape) * 1e-3).astype(jnp.bfloat16), params)
  legacy = {"target": jax.tree.map(np.asarray, params),
            "state": {"step": np.asarray(3, np.int32),
                      "param_states": jax.tree.map(
                          lambda a, b: {"grad_ema": a, "grad_sq_ema": b}, m, v)}}
  blob = flax_ser.msgpack_serialize(legacy)   # what flax.serialization.to_bytes wrote
  lr = 1.0   # steps of several bf16 ulps (with lr 0.01 most were under half an ulp: no-ops)
  opt = ser.from_bytes(optim.Adam(lr).create(params), blob)
  assert int(opt.state.step) == 3
  for path in (("Dense_0", "kernel"), ("Dense_1", "bias")):
    st = opt.state.param_states.per_leaf()[path[0]][path[1]]
    np.testing.assert_array_equal(np.asarray(st["grad_ema"]),
                                  np.asarray(m[path[0]][path[1]], np.float32))
    np.testing.assert_array_equal(np.asarray(st["grad_sq_ema"]),
                                  np.asarray(v[path[0]][path[1]], np.float32))
  # one more step from the restored moments, against float64 NumPy: the float32 moments to a few
  # float32 roundings, the bf16 params rounded to nearest (half a bf16 ulp, plus float32's error)
  g = _grads(params, 0)
  new = opt.apply_gradient(g)
  states = new.state.param_states.per_leaf()
  for a, b in (("Dense_0", "kernel"), ("Dense_0", "bias"), ("Dense_1", "kernel"),
               ("Dense_1", "bias")):
    p0 = np.asarray(params[a][b], np.float64)
    g0 = np.asarray(g[a][b], np.float64)
    m1 = 0.9 * np.asarray(m[a][b], np.float64) + 0.1 * g0
    v1 = 0.999 * np.asarray(v[a][b], np.float64) + 0.001 * g0 * g0
    np.testing.assert_allclose(np.asarray(states[a][b]["grad_ema"], np.float64), m1, rtol=1e-6,
                               atol=1e-9, err_msg=f"{a}/{b}")
    np.testing.assert_allclose(np.asarray(states[a][b]["grad_sq_ema"], np.float64), v1,
                               rtol=1e-6, err_msg=f"{a}/{b}")
    want = p0 - lr * (m1 / (1 - 0.9**4)) / (np.sqrt(v1 / (1 - 0.999**4)) + 1e-8)
    got = np.asarray(new.target[a][b], np.float64)
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64) * 2.0**16   # bf16's
    np.testing.assert_array_less(np.abs(got - want), 0.5 * ulp + 1e-6 * np.abs(want) + 1e-30,
                                 err_msg=f"{a}/{b}")
    assert np.any(np.abs(want - p0) > ulp), f"{a}/{b}: a step that does nothing would pass"


def test_flax_053_multi_optimizer_and_weight_norm_layouts():
  """MultiOptimizer: a tree mirroring the target, None where no traversal selects the leaf.
  WeightNorm: per leaf {direction_state, scale_state, direction, scale}; leaves that are not
  decomposed (biases) have scale () and scale_state (), i.e. {} in the state dict."""
  params = _params()
  sd = _trained("multi_partial").state_dict()["state"]["param_states"]
  assert sd["Dense_0"]["kernel"] is None and sd["Dense_1"]["kernel"] is None
  assert set(sd["Dense_0"]["bias"]) == {"grad_ema", "grad_sq_ema"}
  mixed = _trained("multi_mixed").state_dict()["state"]["param_states"]
  assert set(mixed["Dense_0"]["kernel"]) == {"momentum"}
  assert set(mixed["Dense_0"]["bias"]) == {"G"}      # flax's _AdagradParamState
  wn = _trained("weight_norm_momentum")
  wsd = wn.state_dict()["state"]["param_states"]
  kern, bias = wsd["Dense_0"]["kernel"], wsd["Dense_0"]["bias"]
  assert set(kern) == {"direction_state", "scale_state", "direction", "scale"}
  assert kern["direction"].shape == (5, 3) and kern["scale"].shape == (1, 3)
  assert set(kern["direction_state"]) == {"momentum"} and set(kern["scale_state"]) == {"momentum"}
  assert bias["scale"] == {} and bias["scale_state"] == {}
  # the merged weight is scale * direction / ||direction|| (flax's definition)
  d, s = np.asarray(kern["direction"], np.float64), np.asarray(kern["scale"], np.float64)
  merged = s * d / np.sqrt((d * d).sum(0, keepdims=True) + 1e-8)
  np.testing.assert_allclose(np.asarray(wn.target["Dense_0"]["kernel"]), merged, rtol=1e-5)
  # a hand-written flax 0.5.3 MultiOptimizer checkpoint restores
  legacy = {"target": jax.tree.map(np.asarray, params),
            "state": {"step": np.asarray(5, np.int32), "param_states": {
                "Dense_0": {"kernel": None, "bias": {"grad_ema": np.full(3, 0.5, np.float32),
                                                     "grad_sq_ema": np.full(3, 0.25, np.float32)}},
                "Dense_1": {"kernel": None, "bias": {"grad_ema": np.full(2, 1.5, np.float32),
                                                     "grad_sq_ema": np.full(2, 2.0, np.float32)}}}}}
  opt = ser.from_bytes(DEFS["multi_partial"]().create(params), flax_ser.msgpack_serialize(legacy))
  back = opt.state_dict()["state"]["param_states"]
  np.testing.assert_array_equal(back["Dense_1"]["bias"]["grad_sq_ema"], [2.0, 2.0])
  np.testing.assert_array_equal(back["Dense_0"]["bias"]["grad_ema"], [0.5, 0.5, 0.5])
  assert int(opt.state.step) == 5


def test_checkpoint_does_not_depend_on_the_flat_layout():
  opt = _trained("adam")
  sd = opt.state_dict()
  # a state built on another alignment (as another block size would give)
  layout = FlatLayout.build(opt.target, align=4096)
  other = FlatState({k: layout.zeros(jnp.float32) for k in ("grad_ema", "grad_sq_ema")}, layout)
  template = opt.replace(state=opt.state.replace(param_states=other))
  back = template.restore_state(sd)
  assert back.state.param_states.layout.align == 4096
  _assert_same(back.state_dict(), sd)


def test_mismatches_raise_naming_the_first_path_and_restore_nothing():
  opt = _trained("adam")
  blob = ser.to_bytes(opt)
  other_tree = optim.Adam(0.01).create({"Dense_0": _params()["Dense_0"]})
  with pytest.raises(ValueError, match=r"at /target: missing \[\], unknown \['Dense_1'\]"):
    ser.from_bytes(other_tree, blob)
  wide = dict(_params(), Dense_1={"kernel": jnp.ones((3, 4)), "bias": jnp.ones((2,))})
  with pytest.raises(ValueError, match=r"/target/Dense_1/kernel has shape \(3, 2\).*\(3, 4\)"):
    ser.from_bytes(optim.Adam(0.01).create(wide), blob)
  half = optim.Adam(0.01).create(_params(jnp.float16))
  with pytest.raises(ValueError, match=r"dtype float32.*expects float16"):
    ser.from_bytes(half, blob)
  sd = opt.state_dict()
  sd["state"]["step"] = np.asarray(1.5, np.float32)
  with pytest.raises(ValueError, match=r"/state/step has dtype float32.*int32"):
    opt.restore_state(sd)
  sd = opt.state_dict()
  sd["state"]["param_states"]["Dense_0"]["bias"]["extra"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
    opt.restore_state(sd)
  with pytest.raises(ValueError, match="checkpoint"):
    optim.Momentum(0.1).create(_params()).restore_state(opt.state_dict())
  # the failed restores built nothing: the optimizer still restores and matches
  _assert_same(ser.from_bytes(optim.Adam(0.01).create(_params()), blob), opt)


def test_chunked_arrays_match_flax(monkeypatch):
  """flax splits arrays over MAX_CHUNK_SIZE bytes (2**30) into chunks; shrunk here to test it."""
  monkeypatch.setattr(ser, "MAX_CHUNK_SIZE", 16)
  monkeypatch.setattr(flax_ser, "MAX_CHUNK_SIZE", 16)
  opt = _trained("adam")
  blob = ser.to_bytes(opt)
  assert blob == flax_ser.msgpack_serialize(_host(opt.state_dict()), in_place=True)
  assert b"__msgpack_chunked_array__" in blob
  _assert_same(ser.from_bytes(optim.Adam(0.01).create(_params()), blob), opt)


def test_orbax_round_trip_and_mismatch(tmp_path):
  opt = _trained("multi_fused")
  ser.save_orbax(tmp_path / "ckpt", opt)
  back = ser.restore_orbax(tmp_path / "ckpt", DEFS["multi_fused"]().create(_params()))
  _assert_same(back, opt)
  wide = dict(_params(), Dense_1={"kernel": jnp.ones((3, 4)), "bias": jnp.ones((2,))})
  with pytest.raises(ValueError, match=r"Dense_1/kernel.* has shape \(3, 2\)"):
    ser.restore_orbax(tmp_path / "ckpt", DEFS["multi_fused"]().create(wide))


# flax 0.5.3's per-leaf state dataclasses (flax/optim/*.py), written out by hand
FLAX_053_FIELDS = [
    (lambda: optim.Adam(0.1), {"grad_ema", "grad_sq_ema"}),
    (lambda: optim.AdaBelief(0.1), {"grad_ema", "grad_sq_ema"}),
    (lambda: optim.Adadelta(0.1), {"sq_avg", "acc_delta"}),
    (lambda: optim.Adagrad(0.1), {"G"}),
    (lambda: optim.LAMB(0.1), {"grad_ema", "grad_sq_ema"}),
    (lambda: optim.LARS(0.1), {"momentum"}),
    (lambda: optim.Momentum(0.1), {"momentum"}),
    (lambda: optim.RMSProp(0.1), {"v", "mg"}),
    (lambda: optim.RMSProp(0.1, centered=True), {"v", "mg"}),
    (lambda: optim.Adafactor(0.1), {"v_row", "v_col", "v", "m"}),
]


@pytest.mark.parametrize("make, fields", FLAX_053_FIELDS,
                         ids=[f"{i}" for i in range(len(FLAX_053_FIELDS))])
def test_per_leaf_state_fields_are_flax_053s(make, fields):
  opt = make().create(_params())
  sd = opt.state_dict()["state"]["param_states"]
  assert set(sd["Dense_0"]["kernel"]) == fields
  if isinstance(opt.optimizer_def, optim.RMSProp) and not opt.optimizer_def.hyper_params.centered:
    assert sd["Dense_0"]["kernel"]["mg"] is None           # flax: mg = None unless centered
  # and a checkpoint in that layout restores (round trip through flax's own encoder)
  blob = flax_ser.msgpack_serialize(_host(opt.state_dict()), in_place=True)
  _assert_same(ser.from_bytes(make().create(_params()), blob), opt)


@pytest.mark.parametrize("make, order", [
    (lambda: optim.RMSProp(0.1, centered=True), ["v", "mg"]),
    (lambda: optim.RMSProp(0.1), ["v", "mg"]),
    (lambda: optim.Adadelta(0.1), ["sq_avg", "acc_delta"]),
    (lambda: optim.Adafactor(0.1), ["v_row", "v_col", "v", "m"]),
    (lambda: optim.MultiOptimizer(
        (optim.ModelParamTraversal(lambda p, _: "w" in p), optim.RMSProp(0.1, centered=True)),
        (optim.ModelParamTraversal(lambda p, _: "b" in p), optim.RMSProp(0.2, centered=True))),
     ["v", "mg"]),
], ids=["rmsprop-centered", "rmsprop", "adadelta", "adafactor", "multi-fused-rmsprop"])
def test_state_fields_in_flax_order_after_a_jitted_step(make, order):
  """flax 0.5.3 wrote a parameter's state in its dataclass's field order (flax/optim/*.py);
  a dict that went through jax.jit comes back with sorted keys, which must not reach the
  checkpoint (its bytes would change after a step)."""
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones((4,))}
  opt = make().create(params)
  opt = jax.jit(lambda o, g: o.apply_gradient(g))(opt, params)
  states = ser.to_state_dict(opt)["state"]["param_states"]
  for leaf in ("w", "b"):
    assert list(states[leaf]) == order, (leaf, list(states[leaf]))
