"""Tiers 2-5: every Pallas kernel lowers and compiles for GPU and TPU, on a CPU-only machine.

  T2  lowers for CUDA with the Triton backend; aliases kept; int64 offsets past 2^31 elements
  T3  its Triton IR compiles to cubin for sm_80 and sm_90 with zero register spills (triton)
  T4  lowers for TPU (Mosaic) under an abstract TPU mesh
  T5  compiles with libtpu's compile-only topologies (v5e, v4), and the whole optimizer step
      compiles for an H100 compile-only topology with XLA:GPU (jax-cuda12-plugin)
The tools come with the ``test`` extra; outside CI a tier whose tool is missing is skipped, under
``CI=true`` it fails (tests/conftest.py).
"""
import dataclasses
import importlib.util
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim
from fusedopt.adabelief import ADABELIEF_RULE
from fusedopt.adadelta import ADADELTA_RULE
from fusedopt.adagrad import ADAGRAD_RULE
from fusedopt.adam import ADAM_RULE
from fusedopt.elementwise import guarded, per_segment
from fusedopt.kernels import pallas as kp
from fusedopt.lamb import APPLY_RULE, MOMENTS_RULE
from fusedopt.lars import lars_rule
from fusedopt.adan import ADAN_RULE
from fusedopt.ademamix import ADEMAMIX_RULE
from fusedopt.adopt import adopt_rule
from fusedopt.schedule_free import SCHEDULE_FREE_ADAMW_RULE
from fusedopt.lion import LION_RULE
from fusedopt.momentum import momentum_rule
from fusedopt.rmsprop import rmsprop_rule
from fusedopt.sgd import SGD_RULE

from kernel_tools import (compile_ttir, h100_replicated, h100_target, lower_cuda, lower_tpu,
                          ptxas_stats, ttir_texts)

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None

# These tiers exercise Pallas' Triton lowering on purpose (``backend="pallas"`` on a GPU, kept for
# GPUs before Hopper and for jax < 0.11): jax >= 0.11 warns that it is deprecated, and that one
# warning is expected here. Every other jax deprecation stays an error (pyproject.toml); the
# Mosaic GPU route has none (tests/test_mosaic_gpu_lowering.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

RULES = [SGD_RULE, momentum_rule(False), momentum_rule(True), ADAM_RULE, ADAGRAD_RULE,
         rmsprop_rule(False), rmsprop_rule(True), ADABELIEF_RULE, ADADELTA_RULE, MOMENTS_RULE,
         APPLY_RULE, lars_rule(False), lars_rule(True),
         # apply_gradient_checked (unscale + clip + skip) and a fused MultiOptimizer
         guarded(ADAM_RULE), guarded(MOMENTS_RULE), guarded(APPLY_RULE), per_segment(ADAM_RULE),
         LION_RULE, ADAN_RULE, ADEMAMIX_RULE, adopt_rule(nesterov=True),
         SCHEDULE_FREE_ADAMW_RULE]
RULE_IDS = [r.name for r in RULES]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _update_fn(rule, platform, n):
  """f(p, g, *state) -> kernel outputs, scalars and per-unit tables as runtime operands."""
  def f(p, g, *state):
    scalars = {k: jnp.float32(0.5) + 0 * p[0].astype(jnp.float32) for k in rule.scalars}
    seg = {k: jnp.full((n // kp.ALIGN,), 0.5, jnp.float32) for k in rule.seg_scalars}
    return kp.flat_update(rule, scalars, seg, p, g, state, platform=platform)
  return f


def _sds(rule, n, dtype, sharding=None):
  return ([jax.ShapeDtypeStruct((n,), dtype, sharding=sharding)] * 2
          + [jax.ShapeDtypeStruct((n,), jnp.float32, sharding=sharding)] * rule.n_state)


def _donate(rule):
  return (((0,) if rule.writes_param else ())
          + (tuple(range(2, 2 + rule.n_state)) if rule.writes_state else ()))


# ----------------------------------------------------------------------------- T2

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_t2_lowers_for_cuda_triton(rule, dtype):
  n = 64 * kp.ALIGN
  low = lower_cuda(_update_fn(rule, "gpu", n), *_sds(rule, n, dtype), donate_argnums=_donate(rule))
  txt = low.as_text()
  assert txt.count("__gpu$xla.gpu.triton") == 1
  # in place: every output aliases its input
  n_out = rule.n_state * int(rule.writes_state) + int(rule.writes_param)
  assert len(re.findall(r"output_operand_alias<output_tuple_indices = \[\d*\]", txt)) == n_out


def test_t2_offsets_are_int64_past_2_to_31_elements():
  """A (2^31 + 4096)-element buffer (lowering needs no memory): the element offsets that feed
  the pointer arithmetic are 64-bit (row index * 1024 computed after widening)."""
  n = (1 << 31) + 4096
  low = lower_cuda(_update_fn(ADAM_RULE, "gpu", n), *_sds(ADAM_RULE, n, jnp.float32))
  [(_, ttir)] = ttir_texts(low)
  addptrs = re.findall(r"tt\.addptr %\w+, %\w+ : tensor<[^>]*!tt\.ptr<f32>>, tensor<([^>]*)>", ttir)
  assert addptrs and all(t.endswith("xi64") for t in addptrs), addptrs
  assert re.search(r"arith\.muli %\w+, %\w+ : tensor<\d+x\d+xi64>", ttir)


def test_t2_grid_covers_buffer_exactly():
  """No ragged blocks: the Triton backend would not mask them (silently out of bounds)."""
  for units in (1, 3, 6, 37, 48, 1000, 4096):
    for cap in (1, 4, 64):
      r = kp._largest_pow2_divisor(units, cap)  # pylint: disable=protected-access
      assert units % r == 0 and r <= cap and r & (r - 1) == 0


# ----------------------------------------------------------------------------- T3

# sm_80 (A100) compiles the representative rules only, to save test time: every rule's sm_80
# compile, in every dtype, was checked (2026-12-07, triton 3.9.0: all pass without spills), and
# sm_90 -- the tighter one for registers -- covers every rule.
# bfloat16/float16 storage adds only the conversions at loads and stores: every rule compiles in
# float32, the representative ones (the register-heaviest among them) in every dtype.
SM80_RULES = {r.name for r in (ADAM_RULE, MOMENTS_RULE, momentum_rule(True), ADAN_RULE,
                               guarded(ADAM_RULE))}
T3_CASES = [pytest.param(r, d, a, id=f"{r.name}-{jnp.dtype(d).name}-{a}") for r in RULES
            for d in DTYPES for a in (80, 90)
            if (a == 90 or r.name in SM80_RULES)
            and (d == jnp.float32 or r.name in SM80_RULES)]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (the `test` extra has it)")
@pytest.mark.parametrize("rule, dtype, arch", T3_CASES)
def test_t3_compiles_to_cubin_without_spills(rule, dtype, arch):
  """With the kernel's own launch parameters (``default_tuning``: twice the warps for a rule
  with four or more state buffers)."""
  n = 64 * kp.ALIGN
  tuning = kp.default_tuning(rule, dtype, "gpu")
  [(name, ttir)] = ttir_texts(lower_cuda(_update_fn(rule, "gpu", n), *_sds(rule, n, dtype)))
  assert name == f"fusedopt_{rule.name}"
  k = compile_ttir(ttir, arch, num_warps=tuning.num_warps, num_stages=tuning.num_stages)
  assert k.asm["cubin"]
  assert k.metadata.shared <= 48 * 1024
  st = ptxas_stats(k.asm["ptx"], arch)
  assert st["spill_stores"] == 0 and st["spill_loads"] == 0, st["text"]
  assert st["registers"] <= 255


# ----------------------------------------------------------------------------- T4

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_t4_lowers_for_tpu(rule, dtype):
  n = 64 * kp.ALIGN
  txt = lower_tpu(_update_fn(rule, "tpu", n), *_sds(rule, n, dtype)).as_text()
  assert "tpu_custom_call" in txt


# ----------------------------------------------------------------------------- T5

@pytest.fixture(scope="module", params=["v5e:1x1", "v4:1x1x1"])
def tpu_mesh(request):
  if not HAS_LIBTPU:
    pytest.skip("libtpu not installed (the `test` extra has it)")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kw = {"chips_per_host_bounds": (1, 1, 1)}
  topo = topologies.get_topology_desc(request.param, "tpu", **kw)
  return jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))


@pytest.mark.parametrize("rule", [ADAM_RULE, APPLY_RULE, rmsprop_rule(True), lars_rule(True)],
                         ids=lambda r: r.name)
def test_t5_tpu_mosaic_compiles(tpu_mesh, rule):
  n = 256 * kp.ALIGN
  rep = jax.sharding.NamedSharding(tpu_mesh, jax.sharding.PartitionSpec())
  with jax.set_mesh(tpu_mesh):
    compiled = jax.jit(_update_fn(rule, "tpu", n), donate_argnums=_donate(rule)).trace(
        *_sds(rule, n, jnp.float32, rep)).lower().compile()
  ma = compiled.memory_analysis()
  assert ma.temp_size_in_bytes < n * 4   # no full-size temporaries



@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="jax-cuda12-plugin not installed")
@pytest.mark.parametrize("name", ["Adam", "LAMB", "Momentum"])
def test_t5_full_step_compiles_for_h100(name):
  """The whole jitted optimizer step (pack, kernels, norms, unpack) through XLA:GPU for an H100
  compile-only topology, optimizer donated."""
  rep = h100_replicated()
  tree = {"a": jnp.zeros((300, 70)), "b": jnp.zeros((5000,)), "c": jnp.zeros((3,))}
  opt = optim.__dict__[name](learning_rate=0.1, backend="pallas").create(tree)
  # Build the step's arguments as shape structs on the H100 topology.
  to_sds = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=rep)  # noqa
  opt_sds = jax.tree.map(to_sds, opt)
  g_sds = jax.tree.map(to_sds, tree)
  lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  with h100_target():   # the host is a CPU; the target is the H100 topology
    compiled = jax.jit(lambda o, g, lr: o.apply_gradient(g, learning_rate=lr),
                       donate_argnums=0).trace(opt_sds, g_sds, lr).lower().compile()
  txt = compiled.as_text()
  assert "__triton" in txt or "triton" in txt


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (the `test` extra has it)")
@pytest.mark.parametrize("rule", [ADAM_RULE, MOMENTS_RULE], ids=lambda r: r.name)
def test_t3_bfloat16_state_compiles(rule):
  """state_dtype=bfloat16: bf16 params, grads and state buffers, float32 math, no spills."""
  n = 64 * kp.ALIGN
  sds = [jax.ShapeDtypeStruct((n,), jnp.bfloat16)] * (2 + rule.n_state)
  [(_, ttir)] = ttir_texts(lower_cuda(_update_fn(rule, "gpu", n), *sds))
  k = compile_ttir(ttir, 90)
  st = ptxas_stats(k.asm["ptx"], 90)
  assert st["spill_stores"] == 0 and st["spill_loads"] == 0, st["text"]
  assert "tpu_custom_call" in lower_tpu(_update_fn(rule, "tpu", n), *sds).as_text()


# ----------------------------------------------------------------------------- stochastic rounding

from fusedopt.elementwise import with_stochastic_rounding  # noqa: E402

SR_RULES = [with_stochastic_rounding(SGD_RULE), with_stochastic_rounding(momentum_rule(True)),
            with_stochastic_rounding(ADAM_RULE), with_stochastic_rounding(guarded(ADAM_RULE)),
            with_stochastic_rounding(APPLY_RULE), with_stochastic_rounding(lars_rule(True)),
            with_stochastic_rounding(per_segment(ADAM_RULE))]


def _sr_sds(rule, n, state_dtype=jnp.float32):
  """SR is for bf16 params (the driver applies it to bf16 groups only): bf16 p and g."""
  return ([jax.ShapeDtypeStruct((n,), jnp.bfloat16)] * 2
          + [jax.ShapeDtypeStruct((n,), state_dtype)] * rule.n_state)


@pytest.mark.parametrize("rule", SR_RULES, ids=lambda r: r.name)
def test_t2_stochastic_rounding_lowers_for_cuda(rule):
  """The hash is integer IR (xor, logical shifts, multiplies, bitcasts), not the float PTX of
  ``_gpu_precise_ops``; aliases kept."""
  n = 64 * kp.ALIGN
  low = lower_cuda(_update_fn(rule, "gpu", n), *_sr_sds(rule, n), donate_argnums=_donate(rule))
  txt = low.as_text()
  assert txt.count("__gpu$xla.gpu.triton") == 1
  n_out = rule.n_state * int(rule.writes_state) + int(rule.writes_param)
  assert len(re.findall(r"output_operand_alias<output_tuple_indices = \[\d*\]", txt)) == n_out
  [(_, ttir)] = ttir_texts(low)
  for op in ("arith.xori", "arith.shrui", "arith.muli", "tt.bitcast", "arith.andi"):
    assert op in ttir, op
  asm = set(re.findall(r'elementwise_inline_asm "([a-z0-9.]+) ', ttir))
  assert asm <= {"add.rn.f32", "sub.rn.f32", "mul.rn.f32", "div.rn.f32", "sqrt.rn.f32"}, asm


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (the `test` extra has it)")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("rule", SR_RULES, ids=lambda r: r.name)
def test_t3_stochastic_rounding_compiles_without_spills(rule, arch):
  """With the kernel's own launch parameters: SR rules get twice the default warps on GPU."""
  n = 64 * kp.ALIGN
  tuning = kp.DEFAULT_TUNING[("gpu", 2)]
  [(name, ttir)] = ttir_texts(lower_cuda(_update_fn(rule, "gpu", n), *_sr_sds(rule, n)))
  assert name == f"fusedopt_{rule.name}"
  k = compile_ttir(ttir, arch, num_warps=2 * tuning.num_warps, num_stages=tuning.num_stages)
  assert k.asm["cubin"]
  ptx = k.asm["ptx"]
  assert "mul.lo" in ptx and "shr.u32" in ptx       # the hash: 32-bit integer ops
  st = ptxas_stats(ptx, arch)
  assert st["spill_stores"] == 0 and st["spill_loads"] == 0, st["text"]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (the `test` extra has it)")
def test_t3_stochastic_rounding_with_bfloat16_state_compiles():
  rule = with_stochastic_rounding(ADAM_RULE)
  n = 64 * kp.ALIGN
  [(_, ttir)] = ttir_texts(lower_cuda(_update_fn(rule, "gpu", n),
                                      *_sr_sds(rule, n, jnp.bfloat16)))
  st = ptxas_stats(compile_ttir(ttir, 90, num_warps=2 * kp.DEFAULT_TUNING[("gpu", 2)].num_warps)
                   .asm["ptx"], 90)
  assert st["spill_stores"] == 0 and st["spill_loads"] == 0, st["text"]


@pytest.mark.parametrize("rule", SR_RULES, ids=lambda r: r.name)
def test_t4_stochastic_rounding_lowers_for_tpu(rule):
  n = 64 * kp.ALIGN
  txt = lower_tpu(_update_fn(rule, "tpu", n), *_sr_sds(rule, n)).as_text()
  assert "tpu_custom_call" in txt


@pytest.mark.parametrize("rule", [with_stochastic_rounding(ADAM_RULE),
                                  with_stochastic_rounding(guarded(ADAM_RULE))],
                         ids=lambda r: r.name)
def test_t5_stochastic_rounding_tpu_mosaic_compiles(tpu_mesh, rule):
  n = 256 * kp.ALIGN
  rep = jax.sharding.NamedSharding(tpu_mesh, jax.sharding.PartitionSpec())
  with jax.set_mesh(tpu_mesh):
    compiled = jax.jit(_update_fn(rule, "tpu", n), donate_argnums=_donate(rule)).trace(
        *_sr_sds(rule, n, jnp.float32)[:2],
        *[jax.ShapeDtypeStruct((n,), jnp.float32, sharding=rep)] * rule.n_state).lower().compile()
  assert compiled.memory_analysis().temp_size_in_bytes < n * 4


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="jax-cuda12-plugin not installed")
def test_t5_stochastic_rounding_full_step_compiles_for_h100():
  """Adam with stochastic_rounding on a bf16 tree: the whole step through XLA:GPU for an H100."""
  rep = h100_replicated()
  tree = {"a": jnp.zeros((300, 70), jnp.bfloat16), "b": jnp.zeros((5000,), jnp.bfloat16)}
  opt = optim.Adam(learning_rate=0.1, backend="pallas", stochastic_rounding=True).create(tree)
  to_sds = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=rep)  # noqa
  with h100_target():
    compiled = jax.jit(lambda o, g: o.apply_gradient(g), donate_argnums=0).trace(
        jax.tree.map(to_sds, opt), jax.tree.map(to_sds, tree)).lower().compile()
  assert "triton" in compiled.as_text()


# ----------------------------------------------------------------------------- traffic: unread inputs

from fusedopt.elementwise import with_master  # noqa: E402


def test_t2_master_weights_never_load_the_low_precision_param():
  """With master weights the bf16 param is written, never read: Adam moves 28 B/param, not 30.
  In the Triton IR an operand that is never loaded appears only in the signature (%arg0 holds
  the scalars, %arg1 the param, %arg2 the grad, then the state); plain Adam does load it."""
  n = 16 * kp.ALIGN

  def uses(rule):
    [(_, ttir)] = ttir_texts(lower_cuda(_update_fn(rule, "gpu", n),
                                        *_sds(rule, n, jnp.bfloat16)))
    return [len(re.findall(rf"%arg{a}\b", ttir)) for a in range(3 + rule.n_state)]
  master = uses(with_master(ADAM_RULE))
  assert master[1] == 1 and all(u > 1 for u in master[2:])
  assert all(u > 1 for u in uses(ADAM_RULE)[1:])


# ----------------------------------------------------------------------------- quantized state

def _quantized_fn(rule, platform, n, fields):
  """f(p, g, codes/scales or buffer per field...) -> ``flat_update_quantized``'s outputs;
  ``fields``: "s8", "u8" (the int8 maps), "fp8" or "f32" per state field."""
  from fusedopt import quantization as Q   # pylint: disable=import-outside-toplevel
  fmts = {"s8": Q.INT8_SIGNED, "u8": Q.INT8_UNSIGNED, "fp8": Q.FLOAT8_E4M3}

  def f(p, g, *bufs):
    bufs, state = list(bufs), []
    for kind in fields:
      if kind in fmts:
        state.append(Q.QuantizedArray(bufs.pop(0), bufs.pop(0), fmts[kind]))
      else:
        state.append(bufs.pop(0))
    scalars = {k: jnp.float32(0.5) + 0 * p[0].astype(jnp.float32) for k in rule.scalars}
    seg = {k: jnp.full((n // 256,), 0.5, jnp.float32) for k in rule.seg_scalars}
    return kp.flat_update_quantized(rule, scalars, seg, p, g, tuple(state), platform=platform)
  sds = [jax.ShapeDtypeStruct((n,), jnp.float32)] * 2
  for kind in fields:
    sds += ([jax.ShapeDtypeStruct((n,), jnp.uint8), jax.ShapeDtypeStruct((n // 256,), jnp.float32)]
            if kind in fmts else [jax.ShapeDtypeStruct((n,), jnp.float32)])
  return f, sds


QUANTIZED_RULES = [(ADAM_RULE, ("fp8", "fp8")), (ADAM_RULE, ("s8", "u8")),
                   (guarded(with_master(ADAM_RULE)), ("fp8", "fp8", "f32")),
                   (guarded(with_master(ADAM_RULE)), ("s8", "u8", "f32")),
                   (MOMENTS_RULE, ("s8", "u8")), (per_segment(ADAM_RULE), ("fp8", "u8"))]
QUANTIZED_IDS = [f"{r.name}-{'-'.join(f)}" for r, f in QUANTIZED_RULES]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (the `test` extra has it)")
@pytest.mark.parametrize("rule, fields", QUANTIZED_RULES, ids=QUANTIZED_IDS)
def test_quantized_kernel_lowers_for_cuda_and_tpu(rule, fields):
  """The Pallas kernel over int8 and e4m3 state lowers for CUDA (Triton: cubins for sm_80 and
  sm_90 without spills, every float operation of the update IEEE-rounded, no FMA; the int8
  maps read by computed address) and for a TPU (Mosaic)."""
  n = 64 * kp.ALIGN
  f, sds = _quantized_fn(rule, "gpu", n, fields)
  with kp.targeting("gpu"):
    [(name, ttir)] = ttir_texts(lower_cuda(f, *sds))
  assert name == f"fusedopt_q_{rule.name}"
  if {"s8", "u8"} & set(fields):   # the map and bucket tables: loads at computed addresses
    assert re.search(r"tt\.load %\w+ : tensor<\d+x256x!tt\.ptr<i32>>", ttir), ttir[-3000:]
  for arch in (80, 90):
    k = compile_ttir(ttir, arch, num_warps=kp.quantized_warps(kp.default_tuning(
        rule, jnp.float32, "gpu")))
    st = ptxas_stats(k.asm["ptx"], arch)
    assert st["spill_stores"] == 0 and st["spill_loads"] == 0, st["text"]
    assert "div.rn.f32" in k.asm["ptx"] and ".approx" not in k.asm["ptx"]
    # (LAMB's per-row sums of squares accumulate by FMA: within float32 summation error)
    assert rule.sumsq is not None or "fma.rn.f32" not in k.asm["ptx"]
  f, sds = _quantized_fn(rule, "tpu", n, fields)
  assert "tpu_custom_call" in lower_tpu(f, *sds).as_text()


@pytest.mark.parametrize("rule, fields", [QUANTIZED_RULES[i] for i in (1, 2, 3, 4)],
                         ids=[QUANTIZED_IDS[i] for i in (1, 2, 3, 4)])
def test_quantized_kernel_compiles_for_tpu(tpu_mesh, rule, fields):
  """Mosaic compiles the quantized kernel (v5e, v4): integer codecs on int32 bits (Mosaic has
  no unsigned vector min or compare), the int8 maps by 128-lane gathers, the checked step's
  select on int32 codes (v4 compares no int8 vectors) -- each found by this compile, which
  lowering alone does not run. (Temporaries: the next test, at a size the compiler does not
  stage in VMEM; at this one jax 0.12 counts the staged buffers, 0.10 does not.)"""
  n = 256 * kp.ALIGN
  rep = jax.sharding.NamedSharding(tpu_mesh, jax.sharding.PartitionSpec())
  f, sds = _quantized_fn(rule, "tpu", n, fields)
  sds = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep) for x in sds]
  with jax.set_mesh(tpu_mesh):
    compiled = jax.jit(f).trace(*sds).lower().compile()
  assert "tpu_custom_call" in compiled.as_text()   # the kernel, compiled by Mosaic


@pytest.mark.parametrize("tpu_mesh", ["v5e:1x1"], indirect=True)
@pytest.mark.parametrize("rule, fields", [QUANTIZED_RULES[i] for i in (1, 4, 5)],
                         ids=[QUANTIZED_IDS[i] for i in (1, 4, 5)])
def test_quantized_kernel_on_tpu_is_in_place_at_scale(tpu_mesh, rule, fields):
  """A 16M-element group (too big for the compiler to stage it in VMEM, which hides copies at
  the small size above), every buffer donated: 64 KB of temporaries, none of a buffer's size.
  A TPU tiles a flat 1-D buffer ((1024) float32, (1024)(128)(4,1) uint8), so the kernel's
  views must be bitcasts of it: (rows, 128) for params, grads and codes, (rows / 128, 1, 128)
  for the scales, per-block tables (per-tensor Adam) and sums (LAMB's moment pass). Its first
  views, (rows, 256) and (rows, 1), were relayout copies: 101 MB for 168 MB of arguments
  (64M elements: 940 MB)."""
  n = 16384 * kp.ALIGN
  rep = jax.sharding.NamedSharding(tpu_mesh, jax.sharding.PartitionSpec())
  f, sds = _quantized_fn(rule, "tpu", n, fields)
  sds = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep) for x in sds]
  with jax.set_mesh(tpu_mesh), warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)   # "Some donated buffers were not usable"
    compiled = jax.jit(f, donate_argnums=tuple(range(len(sds)))).trace(*sds).lower().compile()
  assert compiled.memory_analysis().temp_size_in_bytes < n // 64   # under one scales buffer


def test_quantized_groups_a_tpu_kernel_cannot_block():
  """The layout pads every quantized group to whole 128-block lane rows of scales
  (``QUANTIZED_TILE_BLOCKS``: the "tiles" view, in place), so GPT-2's embedding alone (37693
  units: 4 x odd rows) lowers through the backend for a TPU with no warning. Other groups take
  the "rows" view, where a block of uint8 codes is a whole number of (32, 128) tiles or the
  whole array: a group of 4 x odd rows (a layout not built by ``FlatLayout.build``) has neither
  a 32-row block dividing it nor one small enough to hold it all (as one block it overflows
  VMEM; with a partial last block Pallas pads every operand by copying, 425 MB measured): the
  kernel refuses it, naming why, and the backend runs it on jnp with a warning (traced, not
  run); a small group of 4 x odd rows is one block, and lowers."""
  # pylint: disable=import-outside-toplevel,protected-access
  import warnings
  from fusedopt import layout as L, quantization as Q
  n = 37693 * kp.ALIGN
  run = kp._run_quantized("tpu")
  scalars = {k: jnp.float32(0.5) for k in ADAM_RULE.scalars}
  padded = L.FlatLayout.build({"w": jax.ShapeDtypeStruct((n,), jnp.float32)}, quantize=(1, 256))
  size = padded.groups[0].size
  assert size % (L.QUANTIZED_TILE_BLOCKS * 256) == 0
  assert 0 <= size - n < L.QUANTIZED_TILE_BLOCKS * 256
  for shards in (2, 8):   # whole tiles on every shard
    assert padded.with_shards(shards).groups[0].size % (shards * L.QUANTIZED_TILE_BLOCKS * 256) == 0

  def step(lay, n_codes):
    def f(p, g, c0, s0, c1, s1):
      state = (Q.QuantizedArray(c0, s0, Q.INT8_SIGNED), Q.QuantizedArray(c1, s1, Q.INT8_UNSIGNED))
      return run(ADAM_RULE, scalars, {}, lay, 0, [p], [g], state)
    leaf = jax.ShapeDtypeStruct((n,), jnp.float32)
    codes, scales = (jax.ShapeDtypeStruct((n_codes,), jnp.uint8),
                     jax.ShapeDtypeStruct((n_codes // 256,), jnp.float32))
    return f, (leaf, leaf, codes, scales, codes, scales)

  f, sds = step(padded, size)
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    assert "tpu_custom_call" in lower_tpu(f, *sds).as_text()
  f, sds = _quantized_fn(ADAM_RULE, "tpu", n, ("s8", "u8"))
  with pytest.raises(ValueError, match="32-row|32k rows"):
    lower_tpu(f, *sds)
  unpadded = L.FlatLayout(padded.treedef, padded.segments,
                          (dataclasses.replace(padded.groups[0], size=n),), padded.align)
  f, sds = step(unpadded, n)
  with pytest.warns(RuntimeWarning, match="32-row uint8 tiles.*runs on the jnp backend"):
    out = jax.eval_shape(f, *sds)
  assert out[1][0].codes.shape == (n,)
  f, sds = _quantized_fn(ADAM_RULE, "tpu", 37 * kp.ALIGN, ("s8", "u8"))   # 148 rows: one block
  assert "tpu_custom_call" in lower_tpu(f, *sds).as_text()


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (the `test` extra has it)")
def test_quantized_groups_past_2_to_31_elements():
  """Pallas' Triton lowering gives a uint8 array under 2^32 bytes 32-bit offsets (sign-extended
  in the pointer arithmetic), so the GPU kernel takes codes of at most 2^31 - 1 elements: at
  that size every pointer's offsets are 64-bit but the codes' (which stay under 2^31); past it
  the kernel refuses, naming why, and the backend runs the group on jnp with a warning
  (traced, not run: no memory needed)."""
  n = kp.CODES_LIMIT + 1 - 256   # the largest whole number of blocks under the limit
  f, sds = _quantized_fn(ADAM_RULE, "gpu", n, ("s8", "u8"))
  with kp.targeting("gpu"):
    [(_, ttir)] = ttir_texts(lower_cuda(f, *sds))
  for ty, want in (("f32", "i64"), ("i8", "i32")):
    adds = re.findall(rf"tt\.addptr %(\w+), %\w+ : tensor<\d+x256x!tt\.ptr<{ty}>>, "
                      r"tensor<\d+x256x(\w+)>", ttir)
    big = [t for base, t in adds if not _splat_of_table(ttir, base)]
    assert big and all(t == want for t in big), (ty, adds)
  n = (1 << 31) + 4096
  f, sds = _quantized_fn(ADAM_RULE, "gpu", n, ("s8", "u8"))
  with kp.targeting("gpu"), pytest.raises(ValueError, match="32-bit signed offsets"):
    lower_cuda(f, *sds)
  from fusedopt import quantization as Q   # pylint: disable=import-outside-toplevel
  from fusedopt.layout import FlatLayout   # pylint: disable=import-outside-toplevel
  tree = {"w": jax.ShapeDtypeStruct((n,), jnp.float32)}
  layout = FlatLayout.build(tree, quantize=(1, 256))
  size = layout.groups[0].size   # (whole 128-block rows of scales: a little over n)
  _, gsds = _quantized_fn(ADAM_RULE, "gpu", size, ("s8", "u8"))
  state = (Q.QuantizedArray(*gsds[2:4], Q.INT8_SIGNED),
           Q.QuantizedArray(*gsds[4:6], Q.INT8_UNSIGNED))
  run = kp._run_quantized("gpu")   # pylint: disable=protected-access
  scalars = {k: jnp.float32(0.5) for k in ADAM_RULE.scalars}
  with kp.targeting("gpu"), pytest.warns(RuntimeWarning, match="runs on the jnp backend"):
    out = jax.eval_shape(lambda p, g, st: run(ADAM_RULE, scalars, {}, layout, 0, [p], [g], st),
                         sds[0], sds[1], state)
  assert out[1][0].codes.shape == (size,)


def test_quantized_tpu_kernel_past_2_to_31_elements():
  """On a TPU the kernel takes a group past 2^31 elements (a layout's: whole 128-block rows):
  its "tiles" view indexes rows of 128 and blocks of rows, never elements (traced and lowered,
  not compiled: no memory needed)."""
  from fusedopt.layout import FlatLayout   # pylint: disable=import-outside-toplevel
  n = (1 << 31) + 4096
  size = FlatLayout.build({"w": jax.ShapeDtypeStruct((n,), jnp.float32)},
                          quantize=(1, 256)).groups[0].size
  f, sds = _quantized_fn(ADAM_RULE, "tpu", size, ("s8", "u8"))
  txt = lower_tpu(f, *sds).as_text()
  assert "tpu_custom_call" in txt and f"tensor<{size // kp.LANES}x{kp.LANES}xui8>" in txt
  assert f"tensor<{size // (256 * kp.LANES)}x1x{kp.LANES}xf32>" in txt


def _splat_of_table(ttir, name):
  """Whether SSA value ``name`` splats a lookup table (the int8 maps, the buckets: the
  kernel's arguments 1 and 2)."""
  m = re.search(rf"%{name} = tt\.splat %arg(\d+)", ttir)
  return m is not None and m.group(1) in ("1", "2")
