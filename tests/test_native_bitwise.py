"""The native CPU kernels are bitwise equal to NumPy's float32 evaluation of the same rule.

No FMA contraction, no fast-math and sums of squares in a fixed order: the results do not depend
on the CPU that compiled the kernel (Intel or AMD, AVX2 or AVX-512), only on the rule. Every rule
of every built-in optimizer and of ``fusedopt.tx``, every rule wrapper, float32/bfloat16/float16
params, bfloat16 state, leaves that span several work items (the sums' order), ragged sizes.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fusedopt as optim
from fusedopt import elementwise as ew
from fusedopt.adabelief import ADABELIEF_RULE
from fusedopt.adadelta import ADADELTA_RULE
from fusedopt.adagrad import ADAGRAD_RULE, adagrad_rule
from fusedopt.adam import ADAM_RULE, adam_rule
from fusedopt.lamb import APPLY_RULE, MOMENTS_RULE, lamb_rules
from fusedopt.lars import lars_rule
from fusedopt.layout import FlatLayout
from fusedopt.adan import ADAN_RULE
from fusedopt.ademamix import ADEMAMIX_RULE
from fusedopt.adopt import adopt_rule
from fusedopt.schedule_free import SCHEDULE_FREE_ADAMW_RULE
from fusedopt.lion import LION_RULE
from fusedopt.momentum import momentum_rule
from fusedopt.rmsprop import rmsprop_rule
from fusedopt.sgd import SGD_RULE

from numpy_oracle import evaluate, native_sums, random_scalars, same_bits

pytestmark = pytest.mark.skipif("native" not in optim.available_backends(),
                                reason="no C++ compiler for the native backend")

BF16 = ml_dtypes.bfloat16
BASE_RULES = {
    "sgd": SGD_RULE, "momentum": momentum_rule(False), "momentum_nesterov": momentum_rule(True),
    "adam": ADAM_RULE, "adagrad": ADAGRAD_RULE, "rmsprop": rmsprop_rule(False),
    "rmsprop_centered": rmsprop_rule(True), "adabelief": ADABELIEF_RULE,
    "adadelta": ADADELTA_RULE, "lamb_moments": MOMENTS_RULE, "lamb_apply": APPLY_RULE,
    "lars": lars_rule(False), "lars_nesterov": lars_rule(True), "lion": LION_RULE,
    "adan": ADAN_RULE, "ademamix": ADEMAMIX_RULE, "adopt_nesterov": adopt_rule(nesterov=True),
    "schedule_free_adamw": SCHEDULE_FREE_ADAMW_RULE,
    # the static variants fusedopt.tx runs (optax's forms)
    "adam_eps_root": adam_rule(eps_root=True), "adam_nesterov": adam_rule(nesterov=True),
    "adam_nesterov_eps_root": adam_rule(nesterov=True, eps_root=True),
    "rmsprop_eps_in_sqrt": rmsprop_rule(False, eps_in_sqrt=True),
    "rmsprop_centered_eps_in_sqrt": rmsprop_rule(True, eps_in_sqrt=True),
    "adagrad_eps_in_sqrt": adagrad_rule(eps_in_sqrt=True),
    "lamb_moments_eps_root": lamb_rules(eps_root=True)[0],
    "lamb_apply_eps_root": lamb_rules(eps_root=True)[1],
}
# (rule, param dtype, state dtype): every base rule in float32, the wrappers and storage dtypes on
# a representative selection (each case compiles one kernel).
CASES = [(name, np.float32, np.float32) for name in BASE_RULES] + [
    ("adam+master", BF16, np.float32), ("adam+master", np.float16, np.float32),
    ("lamb_moments+master", BF16, np.float32), ("adam+guarded", np.float16, np.float32),
    ("lamb_moments+guarded", np.float32, np.float32), ("adam+guarded+sr", BF16, np.float32),
    ("momentum_nesterov+sr", BF16, np.float32), ("adam", BF16, BF16),
    ("lamb_moments", np.float32, BF16), ("adam+delta", np.float32, np.float32),
    ("rmsprop_centered+oop", np.float16, np.float32), ("adam+per_segment", np.float32, np.float32),
    ("lamb_apply+per_segment", BF16, np.float32),
]
WRAPPERS = {"master": ew.with_master, "guarded": ew.guarded, "sr": ew.with_stochastic_rounding,
            "delta": ew.as_delta, "oop": ew.out_of_place, "per_segment": ew.per_segment}
# sizes: ragged, empty, and one leaf over two of the kernel's 32768-element work items
SHAPES = [(), (7,), (3, 5), (0,), (1025,), (40000,), (33, 65)]


def _rule(name):
  base, *wraps = name.split("+")
  rule = BASE_RULES[base]
  for w in wraps:
    rule = WRAPPERS[w](rule)
  return rule


@pytest.mark.parametrize("name, pdt, sdt", CASES,
                         ids=[f"{n}-{np.dtype(p).name}-state_{np.dtype(s).name}" for n, p, s in CASES])
def test_native_bitwise_equals_numpy_float32(name, pdt, sdt):
  from fusedopt.kernels import native   # pylint: disable=import-outside-toplevel
  rule = _rule(name)
  rng = np.random.RandomState(abs(hash(name)) % 2**31)
  tree = {f"l{i}": rng.standard_normal(s).astype(pdt) for i, s in enumerate(SHAPES)}
  layout = FlatLayout.build(tree)
  p_leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
  g_leaves = [jnp.asarray(rng.standard_normal(x.shape).astype(pdt)) for x in p_leaves]
  n_own = rule.n_state - (1 if "master" in name else 0)
  # positive state (second moments must be), the master copy equal to the params in float32
  st_leaves = [[np.abs(rng.standard_normal(x.shape)).astype(np.float32).astype(sdt)
                for _ in range(n_own)] + ([np.asarray(x, np.float32)] if "master" in name else [])
               for x in p_leaves]
  state = tuple(_pack(layout, [s[k] for s in st_leaves]) for k in range(rule.n_state))
  seg = {k: jnp.asarray(rng.uniform(0.05, 0.9, len(p_leaves)).astype(np.float32))
         for k in rule.seg_scalars}
  for ok in ((1.0, 0.0) if "guarded" in name else (1.0,)):
    scalars = random_scalars(rule, rng, ok)
    out_p, out_state, sums = native.run(rule, {k: jnp.float32(v) for k, v in scalars.items()}, seg,
                                        layout, 0, p_leaves, g_leaves, state)
    for pos, i in enumerate(layout.groups[0].segments):
      sg = layout.segments[i]
      st_i = [np.asarray(s)[sg.offset:sg.offset + sg.size].reshape(sg.shape) for s in state]
      ref_p, ref_st, terms = evaluate(rule, scalars, {k: np.asarray(v)[i] for k, v in seg.items()},
                                      np.asarray(p_leaves[i]), np.asarray(g_leaves[i]), st_i)
      if rule.writes_param:
        assert same_bits(np.asarray(out_p[pos]), np.asarray(ref_p, np.float32).astype(pdt)), (
            name, sg.path, "param")
      for k, (got, ref, old) in enumerate(zip(out_state, ref_st, st_i)):
        got = np.asarray(got)[sg.offset:sg.offset + sg.size].reshape(sg.shape)
        assert same_bits(got, np.asarray(ref, np.float32).astype(old.dtype)), (name, sg.path, k)
      for t, term in enumerate(terms):
        assert same_bits(np.asarray(sums[t][pos]), native_sums(term, native._CHUNK, native.LANES)
                         ), (name, sg.path, "sumsq", t)


def _pack(layout, leaves):
  return layout.pack_group([jnp.asarray(x) for x in leaves], 0)


def test_native_flags_keep_results_cpu_independent():
  """The compile flags that would make results depend on the CPU are absent."""
  from fusedopt.kernels import native   # pylint: disable=import-outside-toplevel
  flags = " ".join(native._FLAGS)
  assert "-ffp-contract=off" in flags
  for bad in ("-ffp-contract=fast", "-ffast-math", "-Ofast", "-funsafe-math-optimizations",
              "-fassociative-math", "-freciprocal-math"):
    assert bad not in flags
  assert "reduction(" not in native.generate(MOMENTS_RULE)


@pytest.mark.parametrize("opt", ["LAMB", "Adam"])
def test_native_full_step_bitwise_equals_numpy(opt):
  """A whole LAMB step (two passes, trust ratio from the kernel's sums) on the native backend
  equals NumPy's float32 evaluation of the same rules bitwise, given the same trust ratios."""
  rng = np.random.RandomState(3)
  tree = {"a": rng.standard_normal((40000,)).astype(np.float32),
          "b": rng.standard_normal((3, 5)).astype(np.float32)}
  g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in tree.items()}
  o = getattr(optim, opt)(learning_rate=0.01, weight_decay=0.01, backend="native").create(tree)
  new = o.apply_gradient(g)
  s = {k: np.float32(v) for k, v in o.optimizer_def.scalars(o.optimizer_def.hyper_params,
                                                              jnp.int32(0)).items()}
  for k in tree:
    zeros = [np.zeros(tree[k].shape, np.float32)] * 2
    if opt == "Adam":
      ref_p, _, _ = evaluate(ADAM_RULE, s, {}, tree[k], g[k], zeros)
    else:
      _, st, (pt, ut) = evaluate(MOMENTS_RULE, s, {}, tree[k], g[k], zeros)
      from fusedopt.kernels import native   # pylint: disable=import-outside-toplevel
      pn = np.sqrt(native_sums(pt, native._CHUNK, native.LANES))
      un = np.sqrt(native_sums(ut, native._CHUNK, native.LANES))
      ratio_lr = np.float32(pn / un) * s["lr"]
      ref_p, _, _ = evaluate(APPLY_RULE, s, {"ratio_lr": ratio_lr}, tree[k], g[k], st)
    assert same_bits(np.asarray(new.target[k]), ref_p), (opt, k)


def test_maximum_minimum_propagate_nan_as_jnp():
  """``xp.maximum``/``xp.minimum`` (ADOPT's ``max(sqrt(v), eps)`` and clip) in the C++ dialect:
  NaN when either operand is NaN, as ``jnp.maximum``/``jnp.minimum`` (``std::max``/``fmaxf``
  return the other operand), and the larger/smaller otherwise, infinities included."""
  from fusedopt.kernels import native   # pylint: disable=import-outside-toplevel
  rule = ew.Rule("maxmin", lambda xp, s, q, p, g, m: (xp.maximum(p, g), (xp.minimum(g, p),)),
                 (), 1)
  vals = np.array([np.nan, -np.inf, -2.0, -0.5, 0.5, 3.0, np.inf], np.float32)
  a, b = (x.ravel() for x in np.meshgrid(vals, vals))
  tree = {"x": a}
  layout = FlatLayout.build(tree)
  out_p, (out_m,), _ = native.run(rule, {}, {}, layout, 0, [jnp.asarray(a)], [jnp.asarray(b)],
                                  (_pack(layout, [np.zeros_like(a)]),))
  want_max, want_min = np.asarray(jnp.maximum(a, b)), np.asarray(jnp.minimum(b, a))
  np.testing.assert_array_equal(np.asarray(out_p[0]), want_max)
  np.testing.assert_array_equal(np.asarray(out_m)[:a.size], want_min)
  assert np.isnan(want_max).sum() == 2 * len(vals) - 1   # either operand NaN: NaN
