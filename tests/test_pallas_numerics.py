"""Tier 1: the Pallas kernels against the jnp oracle, every optimizer and option branch.

On CPU the kernels run in Pallas interpret mode (``backend="pallas_interpret"``); on a GPU/TPU
(``JAX_PLATFORMS=cuda pytest tests/test_pallas_numerics.py``) the same tests run the compiled
kernels (``backend="pallas"``). From the same state, one kernel step equals one jnp step:

- interpret mode (CPU): float32 within 2 ulp of the operands' magnitude, bfloat16/float16 params
  within 1 ulp of their dtype (state is float32);
- compiled on a GPU, against the jnp path on the CPU: the kernel rounds every operation IEEE
  round-to-nearest without FMA contraction (see ``kernels/pallas.py``), while XLA:CPU contracts
  ``a*b + c`` into FMAs, so where terms cancel the results differ by ~1 ulp of the *terms*:
  4 ulp of (|old| + |new| + step size, plus |g| for state), bf16/f16 params 1 ulp;
- LAMB and LARS: their trust ratios divide per-tensor norms, sums that each backend adds in its
  own order, so their steps and state agree to float32 summation error (rtol 2e-5).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim
from fusedopt.kernels import pallas as kp, registry
from fusedopt.elementwise import JNP, namespace

from cases import CONFIGS, IDS, SHAPES, ulps_error

ON_DEVICE = kp.available()

# These tiers exercise Pallas' Triton lowering on purpose (``backend="pallas"`` on a GPU, kept for
# GPUs before Hopper and for jax < 0.11): jax >= 0.11 warns that it is deprecated, and that one
# warning is expected here. Every other jax deprecation stays an error (pyproject.toml); the
# Mosaic GPU route has none (tests/test_mosaic_gpu_lowering.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
# On a device, the compiled kernels: Pallas' own lowering, or with
# FUSEDOPT_TEST_GPU_BACKEND=mosaic_gpu (a Hopper GPU: bench/gpu_run.sh MOSAIC=1) the Mosaic GPU
# kernels, whose numerics no CPU can run (docs/mosaic-gpu.md).
BACKEND = (os.environ.get("FUSEDOPT_TEST_GPU_BACKEND", "pallas") if ON_DEVICE
           else "pallas_interpret")


def _cpu():
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return None


# The oracle is the jnp path on the CPU (IEEE float32 division and sqrt). On an H100, XLA:GPU's
# own jnp path rounds division/sqrt less accurately than the kernels' div.rn/sqrt.rn (measured
# with bench/gpu_diag.py against float64: Adadelta's accumulator 7.8 ulp for XLA:GPU, 6.2 for
# the kernel), so it is not the reference there. Run with JAX_PLATFORMS=cuda,cpu.
ORACLE_DEVICE = _cpu() if ON_DEVICE else None
# jax 0.12's XLA:CPU contracts the jnp oracle's fusions differently: a first moment 1 ulp apart
# reaches AdaBelief's second moment as 3 ulp of (|old| + |new|) (2026-12-07, jax 0.12.0.1)
F32_ULPS = 4 if ON_DEVICE else (3 if jax.__version_info__ >= (0, 12) else 2)


def _on_oracle(fn, *args):
  if ORACLE_DEVICE is None:
    return fn(*args)
  with jax.default_device(ORACLE_DEVICE):
    return fn(*jax.device_put(args, ORACLE_DEVICE))




def _tree(dtypes):
  rng = np.random.RandomState(0)
  return {f"l{i}": jnp.asarray(rng.standard_normal(s), dtypes[i % len(dtypes)])
          for i, s in enumerate(SHAPES)}


def _grads(tree, seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


def _assert_close(a, b, old, what, ulps, step_size=0.0):
  err = ulps_error(a, b, old, step_size)
  assert np.all(err <= ulps), (what, float(np.max(err, initial=0.0)))


def _compare_steps(name, kw, dtypes, steps=3):
  tree = _tree(dtypes)
  defs = {b: getattr(optim, name)(learning_rate=0.05, backend=b, **kw) for b in ("jnp", BACKEND)}
  run = {b: jax.jit(lambda o, g, lr, d=d: o.replace(optimizer_def=d).apply_gradient(
      g, learning_rate=lr)) for b, d in defs.items()}
  opt = defs["jnp"].create(tree)
  for t in range(steps):
    g, lr = _grads(tree, t + 1), jnp.float32(0.05 / (t + 1))
    a, b = _on_oracle(run["jnp"], opt, g, lr), run[BACKEND](opt, g, lr)
    for x, y, old in zip(jax.tree.leaves(a.target), jax.tree.leaves(b.target),
                         jax.tree.leaves(opt.target)):
      assert x.dtype == y.dtype == old.dtype
      if name in ("LAMB", "LARS"):
        # The trust ratio's norms are sums over a tensor: a GPU kernel adds in another order
        # than XLA, so the steps agree to float32 summation error, not to 2 ulp.
        o64 = np.asarray(old, np.float64)
        np.testing.assert_allclose(np.asarray(x, np.float64) - o64, np.asarray(y, np.float64) - o64,
                                   rtol=2e-5 if x.dtype == jnp.float32 else 1e-2,
                                   atol=2 * float(np.spacing(np.float32(np.abs(o64).max(initial=0)))))
        continue
      _assert_close(x, y, old, (name, kw, t), F32_ULPS if x.dtype == jnp.float32 else 1,
                    step_size=float(lr))
    a_st, b_st = a.state.param_states, b.state.param_states
    g_leaves = jax.tree.leaves(g)
    for k in a_st.fields:
      for i in range(len(a_st.layout.segments)):
        x, y, old = a_st.leaf(k, i), b_st.leaf(k, i), opt.state.param_states.leaf(k, i)
        if name in ("LAMB", "LARS"):
          # relative to the terms' magnitude (they can cancel): |old| + |new| + lr (|g| + |p|)
          x64, y64, o64 = (np.asarray(z, np.float64) for z in (x, y, old))
          terms = (np.abs(o64) + np.abs(x64) + float(lr) * (
              np.abs(np.asarray(g_leaves[i], np.float64))
              + np.abs(np.asarray(jax.tree.leaves(opt.target)[i], np.float64))))
          assert np.all(np.abs(x64 - y64) <= 2e-5 * terms + 1e-30), (name, kw, t, k, i)
        else:
          _assert_close(x, y, old, (name, kw, t, k, i), F32_ULPS,
                        step_size=np.abs(np.asarray(g_leaves[i], np.float64)) if ON_DEVICE else 0)
    opt = jax.device_put(a, jax.devices()[0])   # the oracle's result, back on the accelerator


# One config per compiled kernel: a config without weight decay runs the same kernel as its
# weight-decay twin (the decay is a runtime scalar), which exercises the decay term too.
_SAME_KERNEL = {("Adam", ()), ("LAMB", ()), ("AdaBelief", ())}
KERNEL_CONFIGS = [(c, i) for c, i in zip(CONFIGS, IDS) if (c[0], tuple(c[1])) not in _SAME_KERNEL]


@pytest.mark.parametrize("name, kw", [c for c, _ in KERNEL_CONFIGS],
                         ids=[i for _, i in KERNEL_CONFIGS])
def test_kernel_matches_jnp_float32(name, kw):
  _compare_steps(name, kw, (jnp.float32,))


@pytest.mark.parametrize("name, kw", [c for c, _ in KERNEL_CONFIGS
                                      if c[0] in ("Adam", "Momentum", "LAMB", "RMSProp")],
                         ids=[i for c, i in KERNEL_CONFIGS
                              if c[0] in ("Adam", "Momentum", "LAMB", "RMSProp")])
def test_kernel_matches_jnp_mixed_low_precision(name, kw):
  _compare_steps(name, kw, (jnp.bfloat16, jnp.float32, jnp.float16))


@pytest.mark.parametrize("block_rows", [1, 2, 64])
@pytest.mark.parametrize("units", [1, 6, 37, 48])
def test_block_sizes_and_unit_counts(block_rows, units):
  """flat_update directly, several block sizes over buffers of awkward lengths (never ragged:
  the block is the largest power of two dividing the unit count)."""
  from fusedopt.adam import ADAM_RULE
  n = units * kp.ALIGN
  rng = np.random.RandomState(units)
  p, g, m = (jnp.asarray(rng.standard_normal(n), jnp.float32) for _ in range(3))
  v = jnp.asarray(rng.random_sample(n), jnp.float32)
  s = {"lr": 1e-2, "b1": .9, "one_minus_b1": .1, "b2": .999, "one_minus_b2": 1e-3,
       "bias_corr1": .19, "bias_corr2": 2e-3, "eps": 1e-8, "lr_wd": 1e-4}
  if BACKEND == "mosaic_gpu":   # block_rows -> units per CTA, units per step, stages
    from fusedopt.kernels import mosaic_gpu  # pylint: disable=import-outside-toplevel
    su, stages = {1: (1, 2), 2: (2, 3), 64: (4, 2)}[block_rows]
    tuning = mosaic_gpu.MosaicTuning(block=block_rows * 4 * kp.ALIGN, num_stages=stages,
                                     step_units=su)
    update = lambda *a: mosaic_gpu.flat_update(  # noqa: E731
        ADAM_RULE, s, {}, a[0], a[1], a[2:], tuning=tuning)
  else:
    tuning = kp.Tuning(block=block_rows * kp.ALIGN)
    update = lambda *a: kp.flat_update(  # noqa: E731
        ADAM_RULE, s, {}, a[0], a[1], a[2:], tuning=tuning,
        platform=None if ON_DEVICE else "interpret")
  out_p, (out_m, out_v), _ = jax.jit(update)(p, g, m, v)
  ns = namespace({k: jnp.float32(x) for k, x in s.items()})
  ref_p, (ref_m, ref_v) = _on_oracle(jax.jit(lambda *a: ADAM_RULE.fn(JNP, ns, None, *a)),
                                      p, g, m, v)
  _assert_close(out_p, ref_p, p, "p", F32_ULPS, 1e-2)
  _assert_close(out_m, ref_m, m, "m", F32_ULPS, np.abs(np.asarray(g)) if ON_DEVICE else 0)
  _assert_close(out_v, ref_v, v, "v", F32_ULPS, np.asarray(g) ** 2 if ON_DEVICE else 0)


def test_flat_update_rejects_bad_buffers():
  from fusedopt.momentum import momentum_rule
  rule = momentum_rule(False)
  s = {"lr": 0.1, "beta": 0.9, "wd": 0.0}
  x = jnp.zeros((1000,), jnp.float32)
  with pytest.raises(ValueError, match="multiple of 1024"):
    kp.flat_update(rule, s, {}, x, x, (x,), platform="interpret")
  y = jnp.zeros((2048,), jnp.float32)
  with pytest.raises(ValueError, match="does not match"):
    kp.flat_update(rule, s, {}, y, jnp.zeros((1024,)), (y,), platform="interpret")
  with pytest.raises(ValueError, match="takes 1 state"):
    kp.flat_update(rule, s, {}, y, y, (), platform="interpret")


@pytest.mark.ci_may_skip("CPU-only behaviour")
@pytest.mark.skipif(ON_DEVICE, reason="CPU-only behaviour")
def test_pallas_backend_on_cpu_is_a_clear_error():
  opt = optim.Adam(learning_rate=0.1, backend="pallas").create({"w": jnp.ones((3,))})
  with pytest.raises(RuntimeError, match="pallas_interpret"):
    opt.apply_gradient({"w": jnp.ones((3,))})


def test_step_scalars_do_not_recompile():
  """Learning rate and betas are runtime operands of the kernel: one trace for every value."""
  tree = _tree((jnp.float32,))
  opt = optim.Adam(learning_rate=0.1, backend=BACKEND).create(tree)
  traces = []

  @jax.jit
  def step(o, g, lr, b1):
    traces.append(1)
    return o.apply_gradient(g, learning_rate=lr, beta1=b1)

  for t in range(3):
    opt = step(opt, _grads(tree, t), jnp.float32(0.1 / (t + 1)), jnp.float32(0.9 - 0.1 * t))
  assert len(traces) == 1


def test_auto_choice_on_an_accelerator():
  """backend="auto" on GPU/TPU: Pallas where the flat buffer is the leaf itself or the rule's
  norms are fused (LAMB's moment pass); the XLA-fused jnp path where packing would cost copies."""
  from fusedopt.adam import ADAM_RULE
  from fusedopt.lamb import MOMENTS_RULE, APPLY_RULE
  from fusedopt.layout import FlatLayout
  one = FlatLayout.build({"w": jnp.zeros((4, 1024))})
  many = FlatLayout.build({"a": jnp.zeros((3, 5)), "b": jnp.zeros((2048,))})
  with kp.targeting("gpu"):
    assert registry.select("auto", one, 0, ADAM_RULE).name == "pallas"
    assert registry.select("auto", many, 0, ADAM_RULE).name == "jnp"
    assert registry.select("auto", many, 0, MOMENTS_RULE).name == "pallas"
    assert registry.select("auto", many, 0, APPLY_RULE).name == "jnp"
  if not ON_DEVICE:
    assert registry.select("auto", one, 0, ADAM_RULE).name != "pallas"


def test_auto_keeps_quantized_state_on_jnp_on_an_accelerator():
  """Quantized state under backend="auto" on a GPU/TPU runs on jnp, also where ``auto_choice``
  picks Pallas for float state (one leaf, LAMB's moment pass): the Pallas quantized kernel has
  not run on a device. An explicit backend="pallas" runs it (asked for by name)."""
  from fusedopt.adam import ADAM_RULE
  from fusedopt.lamb import MOMENTS_RULE
  from fusedopt.layout import FlatLayout
  one = FlatLayout.build({"w": jnp.zeros((4, 1024))})
  with kp.targeting("gpu"):
    assert registry.select("auto", one, 0, ADAM_RULE).name == "pallas"   # float state
    for rule in (ADAM_RULE, MOMENTS_RULE):
      assert registry.select_quantized("auto", one, 0, rule).name == "jnp"
      assert registry.select_quantized("pallas", one, 0, rule).name == "pallas"
  if not ON_DEVICE and "native" in registry.available_backends():   # a CPU with a compiler
    assert registry.select_quantized("auto", one, 0, ADAM_RULE).name == "native"


# (rule and wrappers as tests/test_quantized_native.py names them, params, state storage)
QUANTIZED_CASES = [("adam", np.float32, "int8"), ("adam+guarded", np.float16, "fp8"),
                   ("adam", np.float32, ("fp8", "bf16")), ("lamb_moments", np.float32, "int8"),
                   ("lamb_apply+master+guarded", "bf16", "int8"), ("adan", np.float32, "int8"),
                   ("momentum_nesterov", "bf16", "fp8")]


@pytest.mark.ci_may_skip("the compiled kernel's behaviour, on a GPU")
@pytest.mark.parametrize("name, pdt, storage", QUANTIZED_CASES,
                         ids=[f"{n}-{np.dtype(p).name if p != 'bf16' else p}-{s}"
                              for n, p, s in QUANTIZED_CASES])
def test_quantized_kernel_on_a_gpu_bitwise_equals_numpy(name, pdt, storage):
  """Compiled on a GPU, the Pallas kernel over int8/e4m3 state (with
  FUSEDOPT_TEST_GPU_BACKEND=mosaic_gpu, the Mosaic GPU one) rounds every operation as NumPy
  does (IEEE-rounded PTX, no contraction), so params, codes, scales and float fields are
  bitwise equal to tests/test_quantized_native.py's NumPy reference (LAMB's per-row sums within
  2e-6: another order), over ragged leaves and a checked skip; and the encoders code every
  value where a code changes as the reference does. (Interpret mode contracts the rule's
  multiply-adds on XLA:CPU: its checks, against the native kernel and the jnp path, are in
  that file and tests/test_mosaic_gpu_lowering.py.)"""
  if not ON_DEVICE or jax.default_backend() != "gpu" or BACKEND not in ("pallas", "mosaic_gpu"):
    pytest.skip("a quantized GPU kernel compiled (a GPU; FUSEDOPT_TEST_GPU_BACKEND unset or "
                "mosaic_gpu)")
  import ml_dtypes   # pylint: disable=import-outside-toplevel
  import test_quantized_native as tq   # pylint: disable=import-outside-toplevel
  kinds = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp8": tq.F8}
  pdt = kinds.get(pdt, pdt)
  storage = tuple(kinds[s] for s in storage) if isinstance(storage, tuple) else storage
  run = (kp._run_quantized(None) if BACKEND == "pallas"   # pylint: disable=protected-access
         else registry.get(BACKEND).run_quantized)
  tq.check_against_numpy(run, name, pdt, storage, sums_rtol=2e-6, flat=True)
  if name == "adam" and storage == "int8":
    for fmt in (tq.S8, tq.U8, tq.F8):
      tq.check_decoder(run, fmt)
      tq.check_encoder(run, fmt)
