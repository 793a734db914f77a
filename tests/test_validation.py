"""Hyper-parameter validation (issue 14, item 8): non-finite values, wrong kinds (strings, arrays of
shape (2,), bools), ``hyper_params=`` of the wrong kind, Adafactor's ``decay_rate``,
``WeightNorm``'s ``wn_eps``/``wn_decay``, ``DynamicScale``'s settings and the ``tx`` aliases all
raise clear errors naming the argument, before anything changes. No step is compiled here: every
error comes before (or while tracing, for traced values)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim
from fusedopt import tx

P = {"w": jnp.ones(3)}
G = {"w": jnp.ones(3)}

# every built-in optimizer and its numeric hyper-parameters (finite ones required)
NUMERIC = [
    (optim.Adam, ["learning_rate", "beta1", "beta2", "eps", "weight_decay"]),
    (optim.AdaBelief, ["learning_rate", "beta1", "beta2", "eps", "weight_decay"]),
    (optim.Adadelta, ["learning_rate", "rho", "eps", "weight_decay"]),
    (optim.Adagrad, ["learning_rate", "eps"]),
    (optim.LAMB, ["learning_rate", "beta1", "beta2", "weight_decay", "eps"]),
    (optim.LARS, ["learning_rate", "beta", "weight_decay", "trust_coefficient", "eps"]),
    (optim.Momentum, ["learning_rate", "beta", "weight_decay"]),
    (optim.RMSProp, ["learning_rate", "beta2", "eps"]),
    (optim.GradientDescent, ["learning_rate"]),
    (optim.Adafactor, ["learning_rate", "beta1", "decay_rate", "step_offset", "weight_decay_rate",
                       "min_dim_size_to_factor", "epsilon1", "epsilon2"]),
]
CASES = [(cls, name) for cls, names in NUMERIC for name in names]
IDS = [f"{cls.__name__}-{name}" for cls, name in CASES]


def _make(cls, **kw):
  kw.setdefault("learning_rate", 0.1)
  return cls(**kw)


@pytest.mark.parametrize("cls, name", CASES, ids=IDS)
def test_non_finite_values_are_rejected_at_construction(cls, name):
  for bad in (float("inf"), float("-inf"), float("nan"), np.float32(np.inf)):
    with pytest.raises(optim.HyperParamError, match=rf"{name}=(-?inf|nan) is not finite"):
      _make(cls, **{name: bad})


@pytest.mark.parametrize("cls, name", CASES, ids=IDS)
def test_values_of_the_wrong_kind_are_rejected_at_construction(cls, name):
  for bad, what in [("0.1", r"is a str"), (np.ones(2), r"has shape \(2,\)"),
                    (jnp.ones((1,)), r"has shape \(1,\)"), ([0.1], "is a list"),
                    (True, "is a bool"), (np.complex64(1), "has dtype complex64")]:
    with pytest.raises(optim.HyperParamError, match=rf"{name}.*{what}") as e:
      _make(cls, **{name: bad})
    assert isinstance(e.value, TypeError)   # a wrong type is also a TypeError
  # real scalars of every kind still work, and ranges are still checked at use (flax 0.5.3
  # accepted any value at construction; test_api pins that for out-of-range ones)
  for ok in (0, 0.0, np.float32(0), np.asarray(0.0), jnp.float32(0)):
    _make(cls, **{name: ok})


def test_adam_inf_learning_rate_never_trains_to_nan():
  with pytest.raises(optim.HyperParamError, match="learning_rate=inf is not finite"):
    optim.Adam(float("inf"))
  with pytest.raises(optim.HyperParamError, match="learning_rate='0.1' is a str"):
    optim.Adam("0.1")
  optim.Adam()   # no learning rate yet: it may come per step, as in flax


@pytest.mark.parametrize("overrides, match", [
    ({"learning_rate": float("inf")}, "learning_rate=inf is not finite"),
    ({"learning_rate": float("nan")}, "learning_rate=nan is not finite"),
    ({"eps": float("inf")}, "eps=inf is not finite"),
    ({"weight_decay": jnp.float32(np.inf)}, "weight_decay=inf is not finite"),
    ({"learning_rate": "0.1"}, "learning_rate='0.1' is a str"),
    ({"learning_rate": jnp.full((2,), 0.1)}, r"learning_rate has shape \(2,\)"),
    ({"beta1": np.asarray([0.9])}, r"beta1 has shape \(1,\)"),
])
def test_per_step_overrides_are_checked_before_any_change(overrides, match):
  opt = optim.Adam(0.1).create(P)
  with pytest.raises(optim.HyperParamError, match=match):
    opt.apply_gradient(G, **overrides)
  with pytest.raises(optim.HyperParamError, match=match):
    opt.apply_gradient_checked(G, **overrides)
  np.testing.assert_array_equal(opt.target["w"], 1.0)
  assert int(opt.state.step) == 0


def test_traced_overrides_are_checked_for_shape_and_dtype():
  opt = optim.Momentum(0.1).create(P)
  step = jax.jit(lambda o, lr: o.apply_gradient(G, learning_rate=lr))
  with pytest.raises(optim.HyperParamError, match=r"learning_rate has shape \(2,\)"):
    step(opt, jnp.full((2,), 0.1))
  with pytest.raises(optim.HyperParamError, match="learning_rate has dtype bool"):
    step(opt, jnp.asarray(True))


@pytest.mark.parametrize("bad", [3, {"learning_rate": 0.1}, optim.Momentum(0.1).hyper_params])
def test_hyper_params_of_the_wrong_kind_name_the_argument(bad):
  opt = optim.Adam(0.1).create(P)
  with pytest.raises(TypeError, match=r"hyper_params=.* is not this optimizer's hyper-param"):
    opt.apply_gradient(G, hyper_params=bad)
  with pytest.raises(TypeError, match=r"hyper_params=.* is not this optimizer's hyper-param"):
    opt.apply_gradient(G, hyper_params=bad, learning_rate=0.2)
  # its own kind still works
  assert opt.optimizer_def.update_hyper_params(
      hyper_params=opt.optimizer_def.hyper_params.replace(beta1=0.5)).beta1 == 0.5


def test_adafactor_decay_rate_and_friends():
  opt = optim.Adafactor(0.1, decay_rate=-1.0).create(P)
  with pytest.raises(optim.HyperParamError, match=r"decay_rate=-1.0 is outside .*\[0.0, inf\)"):
    opt.apply_gradient(G)
  with pytest.raises(optim.HyperParamError, match="decay_rate=-0.5 is outside"):
    optim.Adafactor(0.1).create(P).apply_gradient(G, decay_rate=-0.5)
  with pytest.raises(optim.HyperParamError, match="decay_rate=nan is not finite"):
    optim.Adafactor(0.1, decay_rate=float("nan"))
  np.testing.assert_array_equal(opt.target["w"], 1.0)
  # None and inf clipping both mean "no clipping"; both stay valid
  for clip in (None, float("inf")):
    d = optim.Adafactor(0.1, clipping_threshold=clip)
    d.validate(d.hyper_params)


def test_weight_norm_eps_and_decay():
  with pytest.raises(optim.HyperParamError, match=r"wn_eps=-1.0 is outside .*\[0.0, inf\)"):
    optim.WeightNorm(optim.Adam(0.1), wn_eps=-1)
  with pytest.raises(optim.HyperParamError, match="wn_decay=nan is not finite"):
    optim.WeightNorm(optim.Adam(0.1), wn_decay=float("nan"))
  with pytest.raises(optim.HyperParamError, match="wn_eps='1e-8' is a str"):
    optim.WeightNorm(optim.Adam(0.1), wn_eps="1e-8")
  params = {"w": jnp.ones((3, 2))}
  opt = optim.WeightNorm(optim.Adam(0.1)).create(params)
  for overrides, match in [({"wn_eps": -1.0}, "wn_eps=-1.0 is outside"),
                           ({"wn_decay": float("inf")}, "wn_decay=inf is not finite"),
                           ({"learning_rate": float("inf")}, "learning_rate=inf is not finite")]:
    with pytest.raises(optim.HyperParamError, match=match):
      opt.apply_gradient(params, **overrides)
  np.testing.assert_array_equal(opt.target["w"], 1.0)


@pytest.mark.parametrize("kw, match", [
    (dict(growth_factor=0.5), r"growth_factor=0.5 is outside its valid range \[1, inf\)"),
    (dict(growth_factor=float("inf")), "growth_factor=inf is outside"),
    (dict(backoff_factor=1.5), r"backoff_factor=1.5 is outside its valid range \(0, 1\]"),
    (dict(backoff_factor=0.0), "backoff_factor=0.0 is outside"),
    (dict(backoff_factor="0.5"), "backoff_factor='0.5' must be a real number"),
    (dict(growth_interval=-1), "growth_interval=-1 must be >= 0"),
    (dict(growth_interval=2.5), "growth_interval=2.5 must be an int"),
    (dict(max_scale=0.0), "max_scale=0.0 is outside"),
    (dict(scale=0.0), r"scale=0.0 must be positive and finite"),
    (dict(scale=-1), r"scale=-1 must be positive"),
    (dict(scale=float("inf")), r"scale=inf must be positive and finite"),
    (dict(scale=np.float32(np.nan)), r"scale=.*nan.* must be positive and finite"),
    (dict(scale="1"), r"scale='1' must be a real number"),
])
def test_dynamic_scale_settings(kw, match):
  with pytest.raises(optim.HyperParamError, match=match):
    optim.DynamicScale(**kw)
  # the edges stay valid: never grow, never back off, an unbounded max
  optim.DynamicScale(growth_factor=1.0, backoff_factor=1.0, growth_interval=0,
                     max_scale=float("inf"), scale=1)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_dynamic_scale_computed_scales_are_not_rechecked():
  """A scale that a step computed (a jax array: 0.5.3's scale may reach inf or underflow to 0)
  and tracers pass through; pytree round trips keep working."""
  ds = optim.DynamicScale(growth_interval=0, scale=2.0 ** 127)
  ds = ds.update(jnp.asarray(True))
  assert float(ds.scale) == float("inf")
  assert jax.jit(lambda d: d.update(jnp.asarray(False)))(ds).scale == float("inf")
  leaves, treedef = jax.tree_util.tree_flatten(ds)
  jax.tree_util.tree_unflatten(treedef, leaves)
  with pytest.raises(optim.HyperParamError, match="growth_factor=0.5"):
    optim.DynamicScale(growth_factor=0.5)


@pytest.mark.parametrize("make, match", [
    (lambda: tx.adam(float("inf")), "learning_rate=inf is not finite"),
    (lambda: tx.adamw(1e-3, weight_decay=float("nan")), "weight_decay=nan is not finite"),
    (lambda: tx.adam(1e-3, eps=float("inf")), "eps=inf is not finite"),
    (lambda: tx.sgd(np.full((2,), 0.1)), r"learning_rate has shape \(2,\)"),
    (lambda: tx.rmsprop(1e-3, initial_scale=float("inf")), "initial_scale=inf is not finite"),
    (lambda: tx.lamb(1e-3, b2=np.ones(2) * 0.9), r"b2 has shape \(2,\)"),
    (lambda: tx.adam(1e-3, clip_global_norm=np.ones(2)), r"clip_global_norm has shape \(2,\)"),
    (lambda: tx.adafactor(1e-3, decay_offset=float("nan")), "decay_offset=nan is not finite"),
])
def test_tx_aliases_reject_the_same_values(make, match):
  with pytest.raises(optim.HyperParamError, match=match):
    make()
  tx.adafactor(1e-3, clipping_threshold=float("inf"))   # inf: no clipping, as in Adafactor


def test_multi_optimizer_hyper_params_of_the_wrong_kind():
  multi = optim.MultiOptimizer(
      (optim.ModelParamTraversal(lambda path, _: "w" in path), optim.Adam(0.1)),
      (optim.ModelParamTraversal(lambda path, _: "b" in path), optim.Momentum(0.1)))
  opt = multi.create({"w": jnp.ones(3), "b": jnp.ones(2)})
  g = {"w": jnp.ones(3), "b": jnp.ones(2)}
  for bad in (3, [opt.optimizer_def.hyper_params[0]]):
    with pytest.raises(TypeError, match="hyper_params"):
      opt.apply_gradient(g, hyper_params=bad)
  with pytest.raises(TypeError, match="hyper_params"):   # entries of the wrong kind
    opt.apply_gradient(g, hyper_params=list(reversed(opt.optimizer_def.hyper_params)))
  new = opt.apply_gradient(g, hyper_params=list(opt.optimizer_def.hyper_params), learning_rate=0.2)
  np.testing.assert_allclose(np.asarray(new.target["b"]), 1 - 0.2)


@pytest.mark.parametrize("kw", [{"clip_global_norm": "1"}, {"clip_global_norm": np.ones(2)},
                                {"clip_global_norm": -1.0}, {"grad_scale": np.ones(2)},
                                {"grad_scale": float("inf")}, {"grad_scale": 0.0}])
def test_checked_step_arguments(kw):
  opt = optim.Adam(0.1).create({"w": jnp.ones(3)})
  name = next(iter(kw))
  with pytest.raises(optim.HyperParamError, match=name):
    opt.apply_gradient_checked({"w": jnp.ones(3)}, **kw)
