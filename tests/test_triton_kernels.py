"""The ``triton`` backend (hand-written Triton kernels through jax-triton), on a CPU-only machine.

  T1  numerics against the jnp oracle in Triton's interpreter (TRITON_INTERPRET=1, in a
      subprocess: triton reads the variable once, at import, and T2/T3 need the real compiler);
      on a GPU the same cases run compiled, in this process (tests/triton_cases.py)
  T2  every generated kernel compiles with ``triton.compile`` for sm_90 (and the representative
      ones for sm_80: SM80_RULES), float32, bfloat16, float16: zero spills, <= 255 registers,
      16-byte vector loads, no FMA contraction, IEEE div/sqrt; 64-bit offsets
  T3  jax-triton lowering of whole optimizer steps for CUDA (custom calls, aliases), buffers past
      2^31 elements, a deviceless H100 compile, no recompilation when the learning rate changes
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedopt as optim
from fusedopt.kernels import registry
from fusedopt.adabelief import ADABELIEF_RULE
from fusedopt.adam import ADAM_RULE
from fusedopt.elementwise import guarded, per_segment, with_master, with_stochastic_rounding
from fusedopt.kernels import triton as kt
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

from kernel_tools import h100_replicated
import triton_cases
from conftest import host_devices_flags

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_JAX_TRITON = HAS_TRITON and importlib.util.find_spec("jax_triton") is not None
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
ON_DEVICE = kt.available()
HERE = os.path.dirname(os.path.abspath(__file__))

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (`test` extra)")
needs_jax_triton = pytest.mark.skipif(
    not (HAS_JAX_TRITON and HAS_CUDA_PLUGIN),
    reason="jax-triton (and jax-cuda12-plugin, without which it refuses a CPU jaxlib) needed")


# ----------------------------------------------------------------------------- T1

@pytest.fixture(scope="module")
def interpret_results():
  """All T1 cases in one subprocess with TRITON_INTERPRET=1 (about a minute on 2 cores)."""
  if not HAS_TRITON:
    pytest.skip("triton not installed")
  env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu",
             XLA_FLAGS=host_devices_flags(4),
             PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_cases.py")], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
  assert lines, f"interpret run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
  return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("case", list(triton_cases.CASES))
def test_t1_numerics_match_jnp(case, request):
  """Kernel steps vs jnp steps from the same state (tolerances: tests/triton_cases.py)."""
  if ON_DEVICE:   # compiled on the GPU, oracle on the CPU
    stats = triton_cases.Stats()
    triton_cases.CASES[case]("triton", stats)
    return
  res = request.getfixturevalue("interpret_results")[case]
  assert res["ok"], res["error"]
  # worst error seen, per storage dtype, in ulps (0 = bitwise); shown with pytest -rP
  print(case, res["worst_ulps"], f"{res['seconds']} s")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.uint8])
@pytest.mark.parametrize("size", [0, 1, 65536, 65537, 3 * 65536 + 5])
def test_interpreter_callback_operands_pass_in_parts_under_64_kb(dtype, size):
  """The interpreter's callback operands (``kt._callback_parts``): flat parts of at most 64 KB
  (jaxlib 0.10 hangs on larger ones with several host devices: docs/verification.md, T1), in
  order, that concatenate back to the operand; one part, itself, when it fits."""
  x = jnp.arange(size, dtype=jnp.float32).astype(dtype).reshape((size, 1) if size % 2 else (-1,))
  parts = kt._callback_parts(x)
  item = np.dtype(dtype).itemsize
  assert all(p.ndim == 1 or p is x for p in parts)
  assert all(p.size * item <= 1 << 16 for p in parts)
  assert len(parts) == max(1, -(-size * item // (1 << 16)))
  if len(parts) == 1:
    assert parts[0] is x
  back = np.concatenate([np.asarray(p).reshape(-1) for p in parts])
  np.testing.assert_array_equal(back, np.asarray(x).reshape(-1))


@pytest.mark.ci_may_skip("CPU-only behaviour")
def test_triton_backend_on_cpu_is_a_clear_error():
  if ON_DEVICE:
    pytest.skip("CPU-only behaviour")
  opt = optim.Adam(learning_rate=0.1, backend="triton").create({"w": jnp.ones((3,))})
  with pytest.raises(RuntimeError, match="backend='auto'"):
    opt.apply_gradient({"w": jnp.ones((3,))})
  with pytest.raises(RuntimeError, match="backend='auto'"):
    opt.apply_gradient_checked({"w": jnp.ones((3,))})
  if not kt.interpreting():
    opt = optim.Adam(learning_rate=0.1, backend="triton_interpret").create({"w": jnp.ones((3,))})
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
      opt.apply_gradient({"w": jnp.ones((3,))})
  assert "triton" not in optim.available_backends()


def test_import_needs_no_triton():
  code = ("import sys, fusedopt, fusedopt.kernels.triton as kt; fusedopt.available_backends(); "
          "assert 'triton.language' not in sys.modules and 'jax_triton' not in sys.modules, "
          "sorted(m for m in sys.modules if 'triton' in m)")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("TRITON_INTERPRET", None)
  subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120,
                 capture_output=True)


def test_auto_keeps_its_choices():
  """``auto`` never picks the triton backend (until an H100 measurement says it should)."""
  from fusedopt.kernels import pallas as kp  # pylint: disable=import-outside-toplevel
  one = optim.FlatLayout.build({"w": jnp.zeros((4, 1024))})
  many = optim.FlatLayout.build({"a": jnp.zeros((3, 5)), "b": jnp.zeros((2048,))})
  with kp.targeting("gpu"), kt.targeting("gpu", 90):
    for layout in (one, many):
      for rule in (ADAM_RULE, MOMENTS_RULE, APPLY_RULE):
        assert registry.select("auto", layout, 0, rule).name in ("pallas", "jnp")
    assert registry.select("triton", one, 0, ADAM_RULE) is kt.BACKENDS["triton"]


def test_generated_source_reads_only_what_the_rule_uses():
  """Master weights: the bf16 params are not loaded (Adam 28 B/param); LAMB apply: no grads."""
  spec = kt.KernelSpec(with_master(ADAM_RULE), "bfloat16", "bfloat16", ("float32",) * 3)
  src, ins, outs = kt.generate(spec)
  assert not re.search(r"^    p = tl\.load", src, re.M)
  assert ins == ("S", "P", "G", "ST0", "ST1", "ST2") and outs == ("P_OUT", "ST0_OUT", "ST1_OUT",
                                                                  "ST2_OUT")
  assert kt.bytes_per_element(with_master(ADAM_RULE), jnp.bfloat16, jnp.bfloat16) == 28
  assert kt.bytes_per_element(ADAM_RULE) == 28
  assert kt.bytes_per_element(APPLY_RULE) == 16 and kt.bytes_per_element(MOMENTS_RULE) == 24
  assert "tl.div_rn(" in src and "tl.sqrt_rn(" in src and " / " not in src.split("@triton.jit")[1]


def test_stochastic_rounding_source_is_uint32_and_reads_nothing_more():
  """with_stochastic_rounding: bitcasts and uint32 constants (no int32/int64 promotion), the
  hash reads values the kernel loads anyway (same bytes per element), twice the warps on a GPU."""
  rule = with_stochastic_rounding(ADAM_RULE)
  src, _, _ = kt.generate(_spec(rule, "bfloat16"))
  assert ".to(tl.uint32, bitcast=True)" in src and ".to(tl.float32, bitcast=True)" in src
  assert "tl.full([], 0x85ebca6b, tl.uint32)" in src and "tl.int32" not in src
  for p_dtype in (jnp.float32, jnp.bfloat16):
    assert (kt.bytes_per_element(rule, p_dtype, p_dtype)
            == kt.bytes_per_element(ADAM_RULE, p_dtype, p_dtype))
  assert kt.default_tuning(rule, "bfloat16", "gpu").num_warps == 2 * kt.default_tuning(
      ADAM_RULE, "bfloat16", "gpu").num_warps
  assert kt.default_tuning(rule, "bfloat16", "interpret") == kt.DEFAULT_TUNING[("interpret", 2)]


# ----------------------------------------------------------------------------- T2

RULES = [SGD_RULE, momentum_rule(False), momentum_rule(True), ADAM_RULE, with_master(ADAM_RULE),
         rmsprop_rule(True), ADABELIEF_RULE, MOMENTS_RULE, APPLY_RULE, lars_rule(True),
         guarded(ADAM_RULE), guarded(with_master(MOMENTS_RULE)), per_segment(ADAM_RULE),
         # stochastic rounding (uint32 hash): guarded Adam is the one that spilled at 8 warps
         with_stochastic_rounding(ADAM_RULE), with_stochastic_rounding(guarded(ADAM_RULE)),
         LION_RULE, ADAN_RULE, ADEMAMIX_RULE, adopt_rule(nesterov=True),
         SCHEDULE_FREE_ADAMW_RULE]
SR_RULE = with_stochastic_rounding(guarded(ADAM_RULE))
DTYPES = ["float32", "bfloat16", "float16"]
# sm_80 (A100) compiles only these representative rules, to save time: every rule's sm_80 compile
# was checked once (2026-12, triton 3.9.0: all 61 rule/dtype combinations pass, 32 s on 2 cores)
# and the sm_90 cases cover every rule. The other sm_80 combinations are not generated at all
# (they used to be generated and always skipped).
SM80_RULES = (ADAM_RULE, MOMENTS_RULE, momentum_rule(True), SR_RULE)


def _arch_cases(rules, dtypes, sm80=SM80_RULES):
  """pytest params (rule, dtype, arch): sm_90 for every rule, sm_80 for those in ``sm80``."""
  return [pytest.param(r, d, a, id=f"{r.name}-{d}-{a}") for r in rules for d in dtypes
          for a in (80, 90) if a == 90 or r in sm80]


def _spec(rule, dtype):
  return kt.KernelSpec(rule, dtype, dtype if rule.reads_grad else None,
                       ("float32",) * rule.n_state)


def _check_compiled(k, arch, dtype):
  from kernel_tools import ptxas_stats  # pylint: disable=import-outside-toplevel
  ptx = k.asm["ptx"]
  st = ptxas_stats(ptx, arch)
  assert st["spill_stores"] == 0 and st["spill_loads"] == 0, st["text"]
  assert st["registers"] <= 255, st["text"]
  assert k.metadata.shared <= 48 * 1024
  assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), "no 16-byte vector loads"
  assert "fma.rn.f32" not in ptx     # enable_fp_fusion=False: every mul/add rounded on its own
  return st


@needs_triton
@pytest.mark.parametrize("rule, dtype, arch", _arch_cases(RULES, DTYPES))
def test_t2_compiles_without_spills(rule, dtype, arch):
  from triton_tools import compile_spec  # pylint: disable=import-outside-toplevel
  k = compile_spec(_spec(rule, dtype), arch)
  _check_compiled(k, arch, dtype)
  ptx = k.asm["ptx"]
  if "div.rn.f32" in ptx or "tl.div_rn" in kt.generate(_spec(rule, dtype))[0]:
    assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx
  if "tl.sqrt_rn" in kt.generate(_spec(rule, dtype))[0]:
    assert "sqrt.rn.f32" in ptx and "sqrt.approx" not in ptx
  if dtype == "bfloat16" and rule.writes_param:
    assert re.search(r"cvt\.rn\.bf16(x2)?\.f32", ptx)
  if "sr_hi" in rule.scalars:   # the hash: logical shifts, compiled with twice the warps
    assert "shr.u32" in ptx and k.metadata.num_warps == 16


LEAF_RULES = [ADAM_RULE, with_master(ADAM_RULE), momentum_rule(True), MOMENTS_RULE, APPLY_RULE,
              per_segment(lars_rule(True)), guarded(ADAM_RULE), SR_RULE]


def _vectors(ptx, op):
  return len(re.findall(rf"{op}\.global(\.\w+)*\.v4\.b32", ptx))


@needs_triton
@pytest.mark.parametrize("rule, dtype, arch", _arch_cases(LEAF_RULES, ["float32", "bfloat16"],
                                                          (ADAM_RULE, MOMENTS_RULE, SR_RULE)))
def test_t2_leaf_direct_kernels_compile(rule, dtype, arch):
  """The leaf-direct kernel of a full launch (LEAVES_PER_LAUNCH leaf pointers): no spills, no
  branches (the leaf is chosen by selects), and every buffer -- each leaf's own params and grads
  as well as the flat state -- moved in 16-byte vectors; with leaf sizes of no vector width
  (VEC = 1) it compiles too, its leaf buffers then element by element."""
  from triton_tools import compile_spec_leaves  # pylint: disable=import-outside-toplevel
  vec = 16 // np.dtype(dtype).itemsize
  k = kt.LEAVES_PER_LAUNCH
  spec = kt.KernelSpec(rule, dtype, dtype if rule.reads_grad else None,
                       ("float32",) * rule.n_state, leaves=k, vec=vec)
  c = compile_spec_leaves(spec, arch)
  st = _check_compiled(c, arch, dtype)
  ptx = c.asm["ptx"]
  assert not re.search(r"^\s*(@%p\d+ )?bra", ptx, re.M), "branches"
  src = kt.generate(spec)[0]
  tuning = kt.default_tuning(rule, dtype, "gpu")
  per_thread = tuning.block // (32 * tuning.num_warps)
  isz = {"p": np.dtype(dtype).itemsize, "g": np.dtype(dtype).itemsize}
  loaded = [v for v in ["p", "g"] + [f"st{i}" for i in range(rule.n_state)]
            if re.search(rf"^    {v} = tl\.load", src, re.M)]
  want_loads = sum(per_thread * isz.get(v, 4) // 16 for v in loaded)
  want_stores = (per_thread * np.dtype(dtype).itemsize // 16 if rule.writes_param else 0) + (
      rule.n_state * per_thread * 4 // 16 if rule.writes_state else 0)
  assert (_vectors(ptx, "ld"), _vectors(ptx, "st")) == (want_loads, want_stores), st["text"]
  if rule is ADAM_RULE and arch == 90:
    scalar = kt.KernelSpec(rule, dtype, dtype, ("float32",) * 2, leaves=k, vec=1)
    c1 = compile_spec_leaves(scalar, arch)
    _check_compiled(c1, arch, dtype)   # the state is still vectorised
    assert _vectors(c1.asm["ptx"], "ld") == 2 * per_thread * 4 // 16


LEAF_STATE_CASES = [pytest.param(r, d, st, a, id=f"{r.name}-{d}-{st}-{a}") for r, d, st, a in (
    (ADAM_RULE, "float32", "float32", 90), (ADAM_RULE, "float32", "float32", 80),
    (with_master(ADAM_RULE), "bfloat16", "float32", 90),
    (guarded(ADAM_RULE), "bfloat16", "bfloat16", 90), (MOMENTS_RULE, "float32", "float32", 90))]


@needs_triton
@pytest.mark.parametrize("rule, dtype, st_dtype, arch", LEAF_STATE_CASES)
def test_t2_leaf_state_kernels_compile(rule, dtype, st_dtype, arch):
  """The leaf-direct kernel with per-leaf state (``fusedopt.tx``'s optax state, each leaf's state
  buffers chosen by selects like its params): a full launch of ``leaves_per_launch`` leaves
  (fewer with more state fields: the pointers stay in the 4 KB of kernel parameters), no spills,
  no branches, and the state moved in 16-byte vectors as the params are."""
  from triton_tools import compile_spec_leaves  # pylint: disable=import-outside-toplevel
  k = kt.leaves_per_launch(rule, True)
  assert 8 * (3 + 2 * rule.n_state) * k <= 4096 - 256
  vec = 16 // min(np.dtype(dtype).itemsize, np.dtype(st_dtype).itemsize)
  spec = kt.KernelSpec(rule, dtype, dtype if rule.reads_grad else None,
                       (st_dtype,) * rule.n_state, leaves=k, vec=vec, leaf_state=True)
  c = compile_spec_leaves(spec, arch)
  st = _check_compiled(c, arch, dtype)
  ptx = c.asm["ptx"]
  assert not re.search(r"^\s*(@%p\d+ )?bra", ptx, re.M), "branches"
  tuning = kt.default_tuning(rule, dtype, "gpu")
  per_thread = tuning.block // (32 * tuning.num_warps)
  st_bytes = per_thread * np.dtype(st_dtype).itemsize // 16   # 16-byte vectors per field
  p_bytes = per_thread * np.dtype(dtype).itemsize // 16
  want_stores = (p_bytes if rule.writes_param else 0) + rule.n_state * st_bytes
  assert _vectors(ptx, "st") == want_stores, st["text"]
  assert _vectors(ptx, "ld") >= rule.n_state * st_bytes, st["text"]


QUANTIZED_CASES = [pytest.param(r, d, kinds, a, id=f"{r.name}-{d}-{'-'.join(kinds)}-{a}")
                   for r, d, kinds, a in (
    (ADAM_RULE, "float32", ("int8_signed", "int8_unsigned"), 90),
    (ADAM_RULE, "float32", ("int8_signed", "int8_unsigned"), 80),
    (guarded(with_master(ADAM_RULE)), "bfloat16", ("float8_e4m3fn", "bfloat16", "float32"), 90),
    (MOMENTS_RULE, "float32", ("int8_signed", "int8_unsigned"), 90))]


@needs_triton
@pytest.mark.parametrize("rule, dtype, kinds, arch", QUANTIZED_CASES)
def test_t2_quantized_kernels_compile(rule, dtype, kinds, arch):
  """The leaf-direct kernels over quantized state (a full launch): no spills, at most 255
  registers, no FMA contraction, IEEE division, the decode and bucket tables read by gathers,
  no branches; codes moved as bytes, offsets 64-bit."""
  from triton_tools import compile_quantized  # pylint: disable=import-outside-toplevel
  spec = kt.QuantizedKernelSpec(rule, dtype, dtype, kinds, leaves=kt.LEAVES_PER_LAUNCH,
                                vec=16 // np.dtype(dtype).itemsize)
  c = compile_quantized(spec, arch)
  from kernel_tools import ptxas_stats  # pylint: disable=import-outside-toplevel
  ptx = c.asm["ptx"]
  st = ptxas_stats(ptx, arch)
  assert st["spill_stores"] == 0 and st["spill_loads"] == 0, st["text"]
  assert st["registers"] <= 255, st["text"]
  assert "fma.rn.f32" not in ptx and "div.rn.f32" in ptx
  assert not re.search(r"^\s*(@%p\d+ )?bra", ptx, re.M), "branches"
  assert re.search(r"st\.global(\.\w+)*\.(u8|b8)", ptx) or re.search(
      r"st\.global(\.\w+)*\.v\d\.b32", ptx), "no code stores"
  assert "mul.wide.s32" in ptx or "mad.wide" in ptx or "cvt.s64.s32" in ptx   # 64-bit offsets


@needs_triton
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", DTYPES)
def test_t2_leaf_direct_prepass_compiles(dtype, arch):
  from triton_tools import compile_prepass_leaves  # pylint: disable=import-outside-toplevel
  vec = 16 // np.dtype(dtype).itemsize
  c = compile_prepass_leaves(kt.LEAVES_PER_LAUNCH, dtype, vec, arch)
  _check_compiled(c, arch, dtype)
  assert not re.search(r"^\s*(@%p\d+ )?bra", c.asm["ptx"], re.M)


@needs_triton
@pytest.mark.parametrize("block, warps", [(1024, 4), (4096, 8), (8192, 8), (512, 2)])
def test_t2_other_tunings_compile(block, warps):
  """The tunings bench.kernels --sweep tries on a GPU: Adam with master weights (5 buffers)."""
  from triton_tools import compile_spec  # pylint: disable=import-outside-toplevel
  k = compile_spec(_spec(with_master(ADAM_RULE), "bfloat16"), 90,
                   kt.Tuning(block=block, num_warps=warps))
  _check_compiled(k, 90, "bfloat16")


@needs_triton
def test_t2_offsets_are_int64():
  """Program offsets are widened before the multiply: the row index is int64 and every buffer
  address is computed with 64-bit offsets (tensor<RxCxi64> in tt.addptr, 64-bit PTX)."""
  from triton_tools import compile_spec  # pylint: disable=import-outside-toplevel
  k = compile_spec(_spec(ADAM_RULE, "float32"), 90, n_rows_type="i64")
  ttir = k.asm["ttir"]
  offs = re.findall(r"tt\.addptr %\w+, %\w+ : tensor<(\d+)x(\d+)x!tt\.ptr<f32>>, "
                    r"tensor<\d+x\d+x(i\d+)>", ttir)
  assert offs and all(t == "i64" for *_, t in offs), offs
  assert re.search(r"arith\.extsi %\w+ : i32 to i64", ttir)
  assert re.search(r"(mul\.wide|mad\.wide)\.[us]32", k.asm["ptx"])


# ----------------------------------------------------------------------------- T3

def _step(name, kw, tree):
  opt = getattr(optim, name)(learning_rate=0.1, backend="triton", **kw).create(tree)
  return opt


TREE = {"a": jnp.zeros((300, 70)), "b": jnp.zeros((5000,), jnp.bfloat16), "c": jnp.zeros((3,)),
        "d": jnp.zeros((7, 9), jnp.float16)}


def _launches(tree, align=1024):
  """The leaf-direct launches of each dtype group of ``tree`` (kt.plan_launches) on a layout of
  whole ``align``-element units (None: ``choose_align``'s)."""
  layout = optim.FlatLayout.build(tree, align=align)
  out = []
  for gi, group in enumerate(layout.groups):
    out.append(kt.plan_launches(layout, gi, kt.default_tuning(ADAM_RULE, group.dtype, "gpu")))
  return out


def test_launch_plan():
  """Leaves grouped by vector width (float32: sizes % 4, bfloat16/float16: % 8), group order
  within a width, at most LEAVES_PER_LAUNCH a launch; the tables cover every padded row once."""
  f32, bf16, f16 = _launches(TREE)
  assert [(l.positions, l.vec) for l in f32] == [((0,), 4), ((1,), 1)]   # a: 21000, c: 3
  assert [(l.positions, l.vec) for l in bf16] == [((0,), 8)]            # b: 5000
  assert [(l.positions, l.vec) for l in f16] == [((0,), 1)]             # d: 63
  many = {f"w{i:03d}": jnp.zeros((i + 1, 8)) for i in range(150)}
  plan = _launches(many)[0]
  assert [len(l.positions) for l in plan] == [64, 64, 22]   # every size % 4 == 0
  layout = optim.FlatLayout.build(many, align=1024)
  for launch in plan:
    slot, chunk, nrows, padv, row0 = launch.tables
    segs = [layout.segments[layout.groups[0].segments[j]] for j in launch.positions]
    assert list(nrows * launch.c - padv * launch.vec) == [s.size for s in segs]
    assert list(row0 * launch.c) == [s.offset for s in segs]
    for j in range(len(segs)):   # each leaf's chunks: 0..programs-1, covering its padded rows
      ch = chunk[slot == j]
      assert list(ch) == list(range(len(ch))) and len(ch) * launch.r >= nrows[j]
      assert (len(ch) - 1) * launch.r < nrows[j]


def test_launch_plan_rows_follow_the_alignment():
  """Rows of min(block, 1024, align) elements over each leaf's padded segment, a block's worth
  per program (no more rows than the leaf has); a layout aligned below ``MIN_ROW`` raises,
  naming its alignment (the registry runs it on jnp: test below)."""
  layout = optim.FlatLayout.build({"w": jnp.zeros((700,))}, align=512)
  [launch] = kt.plan_launches(layout, 0, kt.Tuning(block=4096))
  assert (launch.c, launch.r, list(launch.tables[2])) == (512, 2, [2])   # 1024 padded: 2 rows
  [launch] = kt.plan_launches(layout, 0, kt.Tuning(block=256))
  assert (launch.c, launch.r, list(launch.tables[2])) == (256, 1, [4])
  with pytest.raises(ValueError, match="align=64"):
    kt.plan_launches(optim.FlatLayout.build({"w": jnp.zeros((700,))}, align=64), 0, kt.Tuning())
  # a smaller block still narrows the rows (it does not raise)
  assert kt.plan_launches(layout, 0, kt.Tuning(block=64))[0].c == 64
  # a hand-made alignment that is no power of two: rows of its largest power-of-two divisor,
  # so that every leaf's rows start and end where its segment does
  odd = optim.FlatLayout.build({"a": jnp.zeros((1500,)), "b": jnp.zeros((3000,))}, align=1536)
  [launch] = kt.plan_launches(odd, 0, kt.Tuning())
  slot, chunk, nrows, padv, row0 = (t.astype(np.int64) for t in launch.tables)
  assert launch.c == 512
  assert list(nrows * launch.c - padv * launch.vec) == [1500, 3000]
  assert list(row0 * launch.c) == [s.offset for s in odd.segments] == [0, 1536]


def test_launch_tables_past_2_to_31_elements():
  """Leaves and groups past 2^31 elements: the int32 tables (all jax passes without x64) count
  rows, so they fit, and give back the sizes and offsets exactly in int64, as the kernels
  compute them (widened before any multiply)."""
  tree = {"a": jax.ShapeDtypeStruct(((1 << 31) + 5,), jnp.float32),
          **{f"b{i}": jax.ShapeDtypeStruct((1 << 30,), jnp.float32) for i in range(3)}}
  layout = optim.FlatLayout.build(tree)
  for launch in kt.plan_launches(layout, 0, kt.Tuning()):
    assert all(t.dtype == np.int32 for t in launch.tables)
    _, _, nrows, padv, row0 = (t.astype(np.int64) for t in launch.tables)
    segs = [layout.segments[layout.groups[0].segments[j]] for j in launch.positions]
    assert list(nrows * launch.c - padv * launch.vec) == [s.size for s in segs]
    assert list(row0 * launch.c) == [s.offset for s in segs]
    assert max(s.offset for s in segs) >= 1 << 31 or max(s.size for s in segs) > 1 << 31


def _assert_64_bit_addressing(ttir):
  """Every float32 pointer offset in a kernel's Triton IR is int64, and no scalar int32 multiply
  is left (a size or offset product that would wrap past 2^31 elements)."""
  assert not re.search(r"arith\.muli [^\n]*: i32\b", ttir), re.findall(r"arith\.muli [^\n]*", ttir)
  offs = re.findall(r"tt\.addptr %\w+, %\w+ : tensor<\d+x\d+x!tt\.ptr<f32>>, "
                    r"tensor<\d+x\d+x(i\d+)>", ttir)
  assert offs and set(offs) == {"i64"}, offs


@needs_jax_triton
@pytest.mark.parametrize("name, kw", [
    ("Adam", {"weight_decay": 0.1}), ("Adam", {"master_weights": True}),
    ("Momentum", {"nesterov": True}), ("LAMB", {"weight_decay": 0.01})],
    ids=["adamw", "adam-master", "nesterov", "lamb"])
def test_t3_full_step_lowers_with_jax_triton(name, kw):
  """One custom call per leaf-direct launch (LAMB: two passes), every param leaf and every state
  buffer aliased in place, and nothing packed: no concatenation and no slicing in the step."""
  from triton_tools import triton_calls  # pylint: disable=import-outside-toplevel
  opt = _step(name, kw, TREE)
  with kt.targeting("gpu", 90):
    low = jax.jit(lambda o, g, lr: o.apply_gradient(g, learning_rate=lr),
                  donate_argnums=0).trace(opt, TREE, jnp.float32(0.1)).lower(
                      lowering_platforms=("cuda",))
  calls = triton_calls(low)
  plan = [l for group in _launches(TREE) for l in group]
  n_state = 2 + int(kw.get("master_weights", False)) if name != "Momentum" else 1
  if name == "LAMB":   # the moment pass writes the state, the apply pass the params
    want = [n_state] * len(plan) + [len(l.positions) for l in plan]
  else:
    want = [len(l.positions) + n_state for l in plan]
  assert sorted(a for a, _ in calls) == sorted(want)
  assert all("tt.func" in ttir for _, ttir in calls)
  assert _packed_sizes(low.as_text()) == []


@needs_jax_triton
def test_t3_many_small_leaves_run_leaf_direct_in_rows_of_256():
  """2000 leaves of 5K-15K elements (the bench's small-2000; shapes only): ``choose_align``
  aligns their layout to 256 elements, and the step still runs leaf-direct -- one custom call
  per launch, rows of 256 elements, nothing packed -- where it used to run on jnp (303% of the
  params in temporaries, compiled for an H100: bench/compile_only)."""
  from triton_tools import triton_calls  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)   # bench/trees.py small_leaves_shapes(2000)'s sizes and kinds
  tree = {f"l{i:04d}": jax.ShapeDtypeStruct(
      (int(n),) if i % 2 else (int(n) // 50, 50), jnp.float32)
          for i, n in enumerate(rng.integers(5000, 15000, 2000) // 50 * 50)}
  assert optim.FlatLayout.build(tree).align == 256
  opt = jax.eval_shape(lambda t: _step("Adam", {}, t), tree)
  with kt.targeting("gpu", 90), warnings.catch_warnings():
    warnings.simplefilter("error")   # no fallback to jnp
    low = jax.jit(lambda o, g: o.replace(optimizer_def=optim.Adam(
        learning_rate=0.1, backend="triton")).apply_gradient(g), donate_argnums=0).trace(
            opt, tree).lower(lowering_platforms=("cuda",))
  [plan] = _launches(tree, align=None)
  assert {l.c for l in plan} == {256} and len(plan) == -(-2000 // kt.LEAVES_PER_LAUNCH)
  assert sorted(a for a, _ in triton_calls(low)) == sorted(len(l.positions) + 2 for l in plan)
  assert _packed_sizes(low.as_text()) == []


@needs_jax_triton
def test_triton_takes_layouts_aligned_to_128_elements_and_more():
  """``backend="triton"`` runs a group whose layout is aligned to ``MIN_ROW`` (128) elements or
  more (its leaf-direct rows), with its pre-pass kernel; its flat kernel (each device's slice
  of sharded state) still needs 1024. Below, jnp with a warning, and XLA's pre-pass."""
  from fusedopt.layout import FlatLayout  # pylint: disable=import-outside-toplevel
  with kt.targeting("gpu", 90):
    for align, runs in ((1024, "triton"), (256, "triton"), (128, "triton"), (1536, "triton"),
                        (64, "jnp")):
      lay = FlatLayout.build({"a": jnp.zeros((3000,))}, align=align)
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert registry.select("triton", lay, 0, ADAM_RULE).name == runs
        assert registry.select_flat("triton", jnp.float32, align).name == (
            "triton" if align % 1024 == 0 else "jnp")
      assert any("jnp backend" in str(w.message) for w in caught) == (align % 1024 != 0)
      assert (registry.gradient_prepass("triton", lay) is None) == (runs == "jnp")


@needs_jax_triton
def test_t3_checked_steps_on_a_layout_too_narrow_for_the_kernels():
  """600 scalars (aligned to 64 elements, below ``MIN_ROW``): the Triton groups run on jnp with
  a warning, and so does the checked step's pre-pass -- of a plain optimizer and of a fused
  MultiOptimizer (both used to raise in the Triton pre-pass)."""
  tree = {f"s{i:03d}": jnp.float32(i) for i in range(600)}
  plain = optim.Adam(0.1, backend="triton")
  multi = optim.MultiOptimizer(
      (optim.ModelParamTraversal(lambda path, _: int(path[-3:]) % 2 == 0), plain),
      (optim.ModelParamTraversal(lambda path, _: int(path[-3:]) % 2 == 1),
       optim.Adam(0.2, backend="triton")))
  for opt_def in (plain, multi):
    opt = opt_def.create(tree)
    assert optim.FlatLayout.build(tree).align == 64
    with kt.targeting("gpu", 90), pytest.warns(RuntimeWarning, match="jnp backend"):
      low = jax.jit(lambda o, g: o.apply_gradient_checked(g, clip_global_norm=1.0)).trace(
          opt, tree).lower(lowering_platforms=("cuda",))
    assert "triton" not in low.as_text()


@needs_jax_triton
def test_t3_tx_one_pass_lowers_with_per_leaf_state():
  """``tx.update_and_apply(tx.adamw(backend="triton"))`` with optax's state: one custom call per
  leaf-direct launch, each leaf's param and its ``mu``/``nu`` leaves aliased in place, and
  nothing packed (no concatenation or slicing of the state in the step)."""
  pytest.importorskip("optax")
  from fusedopt import tx  # pylint: disable=import-outside-toplevel
  from triton_tools import triton_calls  # pylint: disable=import-outside-toplevel
  t = tx.adamw(1e-3, weight_decay=0.1, backend="triton")
  state = jax.eval_shape(t.init, TREE)
  with kt.targeting("gpu", 90):
    low = jax.jit(lambda g, s, p: tx.update_and_apply(t, g, s, p), donate_argnums=(1, 2)).trace(
        TREE, state, TREE).lower(lowering_platforms=("cuda",))
  calls = triton_calls(low)
  plan = [l for group in _launches(TREE) for l in group]
  assert sorted(a for a, _ in calls) == sorted(3 * len(l.positions) for l in plan)
  assert _packed_sizes(low.as_text()) == []


def _packed_sizes(hlo):
  """Sizes of the concatenations and slices in ``hlo`` bigger than a vector of step scalars."""
  sizes = re.findall(r"stablehlo\.(?:concatenate|slice)[^\n]*-> tensor<(\d+)x", hlo)
  return [int(s) for s in sizes if int(s) > 64]


@needs_jax_triton
def test_t3_checked_step_uses_the_triton_prepass():
  from triton_tools import triton_calls  # pylint: disable=import-outside-toplevel
  opt = _step("Adam", {}, TREE)
  with kt.targeting("gpu", 90):
    low = jax.jit(lambda o, g: o.apply_gradient_checked(g, grad_scale=0.5, clip_global_norm=1.0),
                  donate_argnums=0).trace(opt, TREE).lower(lowering_platforms=("cuda",))
  calls = triton_calls(low)
  n = sum(len(group) for group in _launches(TREE))
  assert len(calls) == 2 * n   # per launch: the pre-pass and the guarded update
  assert sum("fusedopt_grad_prepass_x" in t for _, t in calls) == n
  assert _packed_sizes(low.as_text()) == []


@needs_jax_triton
def test_t3_buffers_past_2_to_31_elements():
  """A (2^31 + 4096)-element flat buffer (lowering allocates nothing): 64-bit offsets in the
  Triton IR jax-triton compiled for the H100."""
  from triton_tools import triton_calls  # pylint: disable=import-outside-toplevel
  n = (1 << 31) + 4096
  sds = [jax.ShapeDtypeStruct((n,), jnp.float32)] * 4
  s = {k: 0.5 for k in ADAM_RULE.scalars}
  with kt.targeting("gpu", 90):
    low = jax.jit(lambda p, g, m, v: kt.flat_update(ADAM_RULE, s, {}, p, g, (m, v)),
                  donate_argnums=(0, 2, 3)).trace(*sds).lower(lowering_platforms=("cuda",))
  [(aliases, ttir)] = triton_calls(low)
  assert aliases == 3
  _assert_64_bit_addressing(ttir)


@needs_jax_triton
def test_t3_leaf_direct_past_2_to_31_elements():
  """A whole step on a tree with a (2^31 + 5)-element leaf (lowering allocates nothing): the
  leaf-direct kernel addresses the leaf and the flat state with 64-bit offsets."""
  from triton_tools import triton_calls  # pylint: disable=import-outside-toplevel
  tree = {"big": jax.ShapeDtypeStruct(((1 << 31) + 5,), jnp.float32),
          "small": jax.ShapeDtypeStruct((12,), jnp.float32)}
  opt = jax.eval_shape(optim.Adam(learning_rate=0.1, backend="triton").create, tree)
  with kt.targeting("gpu", 90):
    low = jax.jit(lambda o, g: o.apply_gradient(g), donate_argnums=0).trace(opt, tree).lower(
        lowering_platforms=("cuda",))
  calls = triton_calls(low)
  assert len(calls) == 2   # "big" (size % 4 = 1: VEC 1) and "small" (VEC 4)
  for _, ttir in calls:
    _assert_64_bit_addressing(ttir)


@needs_jax_triton
def test_t3_quantized_step_lowers_with_64_bit_offsets():
  """An int8 Adam step with ``backend="triton"`` on a tree with a (2^31 + 5)-element leaf: its
  quantized group runs the quantized leaf-direct kernel (the param, and both fields' codes and
  scales aliased in place), the small leaf's float group the plain one; codes and params are
  addressed with 64-bit offsets (the decode and bucket tables, 256 and 6148 entries, with 32)."""
  from triton_tools import triton_calls  # pylint: disable=import-outside-toplevel
  tree = {"big": jax.ShapeDtypeStruct(((1 << 31) + 5,), jnp.float32),
          "small": jax.ShapeDtypeStruct((12,), jnp.float32)}
  opt = jax.eval_shape(optim.Adam(learning_rate=0.1, backend="triton", state_dtype="int8").create,
                       tree)
  with kt.targeting("gpu", 90):
    low = jax.jit(lambda o, g: o.apply_gradient(g), donate_argnums=0).trace(opt, tree).lower(
        lowering_platforms=("cuda",))
  calls = triton_calls(low)
  quantized = [(a, t) for a, t in calls if "fusedopt_q_" in t]
  assert len(calls) == 2 and len(quantized) == 1, [t[:80] for _, t in calls]
  aliases, ttir = quantized[0]
  assert aliases == 5
  assert not re.search(r"arith\.muli [^\n]*: i32\b", ttir)
  offs = dict.fromkeys(("f32", "i8"), set())
  for ptr, width in re.findall(r"tt\.addptr %\w+, %\w+ : tensor<\d+x\d+x!tt\.ptr<(f32|i8)>>, "
                               r"tensor<\d+x\d+x(i\d+)>", ttir):
    offs[ptr] = offs[ptr] | {width}
  assert offs["i8"] == {"i64"} and "i64" in offs["f32"], offs


@needs_jax_triton
def test_t3_changing_lr_compiles_no_new_kernel(monkeypatch):
  """The learning rate is a runtime operand of the kernel: a step traced with another lr value
  (even a compile-time constant of the XLA program) reuses the compiled Triton kernel (no call
  of jax-triton's TTIR compile after the first trace, with either jax-triton 0.3 or 0.4)."""
  jt = kt._jax_triton()  # pylint: disable=protected-access
  opt = _step("Adam", {"weight_decay": 0.1}, TREE)
  compiles, compile_ttir = [], jt.triton_lib.compile_ttir_inplace
  monkeypatch.setattr(jt.triton_lib, "compile_ttir_inplace",
                      lambda *a, **k: compiles.append(1) or compile_ttir(*a, **k))
  counts = []
  for lr in (0.1, 0.05, 0.025):
    before = len(compiles)
    with kt.targeting("gpu", 90):
      jax.jit(lambda o, g, lr=lr: o.apply_gradient(g, learning_rate=lr)).trace(
          opt, TREE).lower(lowering_platforms=("cuda",))
    counts.append(len(compiles) - before)
  assert counts[1] == counts[2] == 0, counts
  assert os.environ.get("TRITON_CACHE_DIR")   # jax_triton's import cleared it; restored



@needs_jax_triton
@pytest.mark.parametrize("name", ["Adam", "LAMB"])
def test_t3_full_step_compiles_for_h100(name):
  """The whole jitted step (Triton kernels, norms) through XLA:GPU for an H100 compile-only
  topology, optimizer donated: in place, and no temporary buffer the size of the params (the
  leaf-direct kernels pack nothing; the jnp backend's step needs a packed copy)."""
  rep = h100_replicated()
  tree = {"a": jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
          "b": jax.ShapeDtypeStruct((1000,), jnp.float32),
          "c": jax.ShapeDtypeStruct((2048, 513), jnp.bfloat16),
          "d": jax.ShapeDtypeStruct((7,), jnp.bfloat16)}
  param_bytes = sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in tree.values())
  to_sds = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=rep)  # noqa: E731
  lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  temp = {}
  for backend in ("triton", "jnp"):
    opt_def = getattr(optim, name)(learning_rate=0.1, backend=backend)
    opt = jax.eval_shape(opt_def.create, tree)
    with kt.targeting("gpu", 90):
      compiled = jax.jit(lambda o, g, lr: o.apply_gradient(g, learning_rate=lr),
                         donate_argnums=0).trace(jax.tree.map(to_sds, opt),
                                                 jax.tree.map(to_sds, tree), lr).lower().compile()
    temp[backend] = compiled.memory_analysis().temp_size_in_bytes
    if backend == "triton":
      txt = compiled.as_text()
      assert "triton_kernel_call" in txt
      assert "input_output_alias" in txt
  print(name, "temp bytes:", temp, "params:", param_bytes)
  assert temp["triton"] < 0.01 * param_bytes, temp
  assert temp["jnp"] > 0.5 * param_bytes, temp    # what packing costs (the oracle's path)


# ----------------------------------------------------------------------------- PTX version

def test_ptx_version_per_target(monkeypatch):
  """The PTX ISA the kernels are written in: the one that brought their target (8.0 up to
  sm_90a, 8.7 for sm_100/sm_120), Triton's own for a target not listed; the environment
  variable overrides it, and a malformed one is an error naming it."""
  monkeypatch.delenv(kt.PTX_ENV, raising=False)
  assert [kt.ptx_version(cc) for cc in (80, 86, 89, 90, 100, 120)] == [80, 80, 80, 80, 87, 87]
  assert kt.ptx_version(None) is None and kt.ptx_version(130) is None
  monkeypatch.setenv(kt.PTX_ENV, "90")
  assert kt.ptx_version(90) == 90 and kt.ptx_version(None) == 90
  monkeypatch.setenv(kt.PTX_ENV, "9.0")
  with pytest.raises(ValueError, match="FUSEDOPT_TRITON_PTX_VERSION='9.0'"):
    kt.ptx_version(90)


@needs_triton
def test_ptx_mismatch_names_xlas_ptxas_and_the_fix(tmp_path, monkeypatch):
  """With jax-triton 0.3 (no PTX version to give), a GPU whose XLA ptxas is older than the ISA
  Triton writes is told so, with the two fixes. XLA's ptxas is found where XLA looks
  (``--xla_gpu_cuda_data_dir`` first), and its ISA read from its CUDA release: a stand-in
  ptxas of CUDA 12.4 (ISA 8.4) is older than Triton's for sm_90; one of CUDA 19.9 is not."""
  fake = tmp_path / "bin" / "ptxas"
  fake.parent.mkdir()

  def release(version):
    fake.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {version}, V{version}.1'\n")
    fake.chmod(0o755)
    kt.ptxas_isa.cache_clear()
  monkeypatch.setenv("XLA_FLAGS", f"--xla_gpu_cuda_data_dir={tmp_path} "
                     + os.environ.get("XLA_FLAGS", ""))
  release("12.4")
  assert kt.xla_ptxas() == str(fake) and kt.ptxas_isa(str(fake)) == 84
  assert kt.triton_isa(90) > 84   # Triton 3.9 writes 9.4 for sm_90
  why = kt.ptx_mismatch(90)
  assert f"ISA {kt.triton_isa(90) // 10}." in why and "ISA 8.4" in why and str(fake) in why
  assert "jax-triton>=0.4" in why and "ISA 8.0" in why
  assert f"TRITON_PTXAS_BLACKWELL_PATH={fake}" in why
  release("19.9")
  assert kt.ptx_mismatch(90) is None
  kt.ptxas_isa.cache_clear()


@needs_jax_triton
def test_t3_kernels_are_handed_on_in_the_targets_ptx_isa(tmp_path):
  """With jax-triton 0.4 every kernel of a whole step for an H100 is handed to XLA as PTX ISA
  8.0, which any CUDA 12 or 13 ptxas takes (Triton 3.9's default, 9.4, the CUDA 13.0 ptxas
  here rejects: "Unsupported .version 9.4"), and the ptxas XLA uses here (when there is one)
  assembles it for sm_90a. With 0.3 (CI's), whatever Triton's own ptxas says
  (``triton_isa``): what ``ptx_mismatch`` warns about on a GPU."""
  from triton_tools import kernel_ptx, ptx_versions  # pylint: disable=import-outside-toplevel
  opt = _step("Adam", {}, TREE)
  with kt.targeting("gpu", 90):
    low = jax.jit(lambda o, g, lr: o.apply_gradient(g, learning_rate=lr),
                  donate_argnums=0).trace(opt, TREE, jnp.float32(0.1)).lower(
                      lowering_platforms=("cuda",))
  got = set(ptx_versions(low))
  if kt._new_api(kt._jax_triton()):   # pylint: disable=protected-access
    assert got == {"8.0"}
    ptxas = kt.xla_ptxas()
    for i, ptx in enumerate(kernel_ptx(low) if ptxas else []):
      src = tmp_path / f"k{i}.ptx"
      src.write_text(ptx)
      run = subprocess.run([ptxas, "-arch=sm_90a", str(src), "-o", str(tmp_path / f"k{i}.cubin")],
                           capture_output=True, text=True, check=False)
      assert run.returncode == 0, run.stderr
  else:
    isa = kt.triton_isa(90)
    assert got == {f"{isa // 10}.{isa % 10}"}


@needs_jax_triton
def test_ptx_mismatch_warns_once_when_tracing_for_a_gpu(tmp_path, monkeypatch):
  """Tracing a kernel call for a GPU (sm_90 here, stood in for) whose XLA ptxas is older than
  Triton's ISA warns once with jax-triton 0.3, naming the fix; not again for the next call,
  and not with 0.4 (which is given the target's ISA) nor for an ahead-of-time compile."""
  fake = tmp_path / "bin" / "ptxas"
  fake.parent.mkdir()
  fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.1'\n")
  fake.chmod(0o755)
  monkeypatch.setenv("XLA_FLAGS", f"--xla_gpu_cuda_data_dir={tmp_path} "
                     + os.environ.get("XLA_FLAGS", ""))
  monkeypatch.setattr(kt.common, "device_compute_capability", lambda: 90)
  monkeypatch.setattr(kt, "_MISMATCH_WARNED", set())
  kt.ptxas_isa.cache_clear()
  n = 4 * kt.ALIGN
  x = jax.ShapeDtypeStruct((n,), jnp.float32)
  sc = {k: jnp.float32(0.5) for k in ADAM_RULE.scalars}
  step = lambda p, g, m, v: kt.flat_update(ADAM_RULE, sc, {}, p, g, (m, v),  # noqa: E731
                                           platform="gpu")
  if kt._new_api(kt._jax_triton()):   # pylint: disable=protected-access
    with warnings.catch_warnings():
      warnings.simplefilter("error", RuntimeWarning)
      jax.eval_shape(step, x, x, x, x)
  else:
    with pytest.warns(RuntimeWarning, match=r"ISA 8\.4.*jax-triton>=0\.4.*TRITON_PTXAS_PATH="):
      jax.eval_shape(step, x, x, x, x)
    with warnings.catch_warnings():
      warnings.simplefilter("error", RuntimeWarning)
      jax.eval_shape(step, x, x, x, x)            # once
      monkeypatch.setattr(kt, "_MISMATCH_WARNED", set())
      with kt.targeting("gpu", 90):
        jax.eval_shape(step, x, x, x, x)          # ahead of time: not this machine's ptxas
  kt.ptxas_isa.cache_clear()
