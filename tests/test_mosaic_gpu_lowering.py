"""The Mosaic GPU kernels (kernels/mosaic_gpu.py), verified on a machine without a GPU.

  M0  numerics in Mosaic GPU's own interpreter (``platform="interpret"``: the same grid, blocks,
      per-unit tables and sums and the same block update, through explicit copies instead of
      ``emit_pipeline``, jax's float operations instead of the inline PTX) against the jnp
      oracle: float32 within 4 ulp of the terms, bf16 params within 1 ulp, sums to float32
      summation error
  M1  every rule lowers for CUDA to one ``mosaic_gpu_v2`` custom call (no Triton), every output
      aliased to its input; int32-safe past 2^31 elements
  M2  the whole Mosaic pipeline runs for an H100 compile-only topology (jax-cuda12-plugin):
      sm_90a PTX, ptxas without spills, and only correctly rounded float arithmetic (no
      ``.approx``, no ``div.full``; no fma outside LAMB's sums of squares)
  M3  a whole optimizer step with ``backend="mosaic_gpu"`` compiles through XLA:GPU for an H100

What no CPU can check -- ``emit_pipeline``'s overlap of copies and compute, the inline PTX's
results, speed -- is listed in docs/mosaic-gpu.md. jax's deprecation warnings are errors here: this
is the GPU route jax keeps, and it must not lean on anything jax is retiring.
"""
import contextlib
import os
import re
import warnings

import jax
import jax.numpy as jnp
import pytest

import fusedopt as optim
from fusedopt import elementwise
from fusedopt.kernels import common, mosaic_gpu as kmg

import numpy as np

from fusedopt.elementwise import JNP, namespace

import numpy_oracle
from cases import ulps_error
from kernel_tools import h100_replicated, lower_cuda
from test_pallas_lowering import QUANTIZED_IDS, QUANTIZED_RULES, RULES, SR_RULES, _donate, _sds

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning")

# low-precision storage adds only conversions at loads and stores: every rule compiles in
# float32; Adam also in bf16 and f16, LAMB's moment pass (sums) in bf16 (every rule in bf16 and
# Adam, LAMB's moment pass and Adan in f16 were checked, 2026-12-07: no spills or approximations)
DTYPE_CASES = {("adam", "bfloat16"), ("adam", "float16"), ("lamb_moments", "bfloat16")}


def _update_fn(rule, n, tuning=None):
  def f(p, g, *state):
    scalars = {k: jnp.float32(0.5) + 0 * p[0].astype(jnp.float32) for k in rule.scalars}
    seg = {k: jnp.full((n // kmg.ALIGN,), 0.5, jnp.float32) for k in rule.seg_scalars}
    return kmg.flat_update(rule, scalars, seg, p, g if rule.reads_grad else None, state,
                           tuning=tuning)
  return f


def _n_aliased(rule):
  """Every output is a ref the kernel writes in place: p and state (when written), an
  out-of-place p and the per-unit sums (each from a zero-filled buffer)."""
  return (rule.n_state * int(rule.writes_state) + int(rule.writes_param)
          + elementwise.num_sumsq_terms(rule))


def _check_lowered(txt, rule):
  assert txt.count("@mosaic_gpu_v2") == 1 and "triton" not in txt
  aliases = re.findall(r"output_operand_alias<output_tuple_indices = \[\d*\]", txt)
  assert len(aliases) == _n_aliased(rule)


@contextlib.contextmanager
def _mosaic_dumps(tmp_path):
  """Mosaic GPU writes each kernel's PTX and ptxas report under ``tmp_path`` while it compiles
  (a persistent-cache hit would compile nothing: the cache is off meanwhile)."""
  env = dict(MOSAIC_GPU_DUMP_TO=str(tmp_path), MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1")
  old = {k: os.environ.get(k) for k in env}
  cache = jax.config.jax_enable_compilation_cache
  os.environ.update(env)
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _compile_h100(rule, dtype, tmp_path, n=64 * kmg.ALIGN, tuning=None):
  """(PTX, ptxas report) of ``rule``'s kernel compiled for the H100 topology."""
  rep = h100_replicated()
  sds = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep) for s in _sds(rule, n, dtype)]
  with _mosaic_dumps(tmp_path):
    lowered = jax.jit(_update_fn(rule, n, tuning),
                      donate_argnums=_donate(rule)).trace(*sds).lower()
    lowered.compile()
  _check_lowered(lowered.as_text(), rule)
  [ptx] = [p.read_text() for p in tmp_path.glob("*.ptx")]
  [report] = [p.read_text() for p in tmp_path.glob("*.ptxas")]
  return ptx, report


# ----------------------------------------------------------------------------- M0

def _rule(name):
  return next(r for r in RULES + SR_RULES if r.name == name)


M0_CASES = [  # (rule, units, tuning: (units per CTA, units per step), param dtype)
    ("adam", 48, (16, 4), "float32"), ("adam", 37, (4, 2), "bfloat16"),
    ("adam_guarded", 5, None, "float32"), ("lamb_moments", 3, None, "float32"),
    ("lamb_apply", 5, None, "float32"), ("adam_per_segment", 6, None, "float32"),
    ("momentum", 4, (2, 2), "float16"), ("sgd", 3, None, "float32"),
]


@pytest.mark.parametrize("name, units, tuning, dtype", M0_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in M0_CASES])
def test_m0_interpreter_matches_jnp(name, units, tuning, dtype):
  """One step over ``units`` units (ragged for the grid: 37 is prime) in Mosaic GPU's
  interpreter against ``rule.fn`` on the whole buffers; a checked step with ok = 0 and 1. Both
  are XLA:CPU programs that contract FMAs in their own places, and the scalars are random (as
  large as 0.9): errors are measured in ulps of the terms, |p| + |g| + the old state's
  magnitudes. A block updated twice, or not at all, or with another block's table entry is off
  by orders of magnitude more."""
  rule = _rule(name)
  rng = np.random.RandomState(units)
  n, pdt = units * kmg.ALIGN, jnp.dtype(dtype)
  p, g = (jnp.asarray(rng.standard_normal(n), pdt) for _ in range(2))
  state = tuple(jnp.asarray(np.abs(rng.standard_normal(n)), jnp.float32)
                for _ in range(rule.n_state))
  q = {k: jnp.asarray(rng.uniform(0.1, 0.9, units), jnp.float32) for k in rule.seg_scalars}
  tun = None if tuning is None else kmg.MosaicTuning(block=tuning[0] * kmg.ALIGN,
                                                      step_units=tuning[1])
  for ok in ((0.0, 1.0) if "ok" in rule.scalars else (None,)):
    s = numpy_oracle.random_scalars(rule, rng, ok=1.0 if ok is None else ok)
    out_p, out_st, sums = jax.jit(lambda p, g, *st, s=s: kmg.flat_update(
        rule, s, q, p, g, st, tuning=tun, platform="interpret"))(p, g, *state)
    q_elem = namespace({k: jnp.repeat(v, kmg.ALIGN) for k, v in q.items()})
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref_p, ref_st = jax.jit(lambda p, g, *st, s=s: rule.fn(JNP, namespace(s), q_elem, f32(p),
                                                          f32(g), *st))(p, g, *state)
    terms = (np.abs(np.asarray(p, np.float64)) + np.abs(np.asarray(g, np.float64))
             + sum(np.abs(np.asarray(x, np.float64)) for x in state))
    if rule.writes_param:
      if pdt == jnp.float32:
        assert float(ulps_error(out_p, ref_p, p, terms).max()) <= 4, (name, ok)
      else:   # one rounding to the storage dtype apart at most
        assert float(ulps_error(out_p, ref_p.astype(pdt), p).max()) <= 1, (name, ok)
    for a, b, old in zip(out_st, ref_st, state):
      assert float(ulps_error(a, b, old, terms).max()) <= 4, (name, ok)
    if ok == 0.0:   # a skipped step keeps everything bitwise
      np.testing.assert_array_equal(np.asarray(out_st[0]), np.asarray(state[0]))
    if rule.sumsq is not None:
      for got, t in zip(sums, rule.sumsq(JNP, namespace(s), q_elem, f32(p), f32(g), *ref_st)):
        want = np.sum(np.asarray(t, np.float64).reshape(units, -1) ** 2, axis=1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


# ----------------------------------------------------------------------------- M1 + M2

# Compiled in make test: the rules heaviest on registers (most buffers and terms, the checked
# step, LAMB's sums, LARS's tables) -- every rule compiled without spills or approximations on
# 2026-12-07; the others are lowered (M1). (A compile costs ~0.6 s on 2 cores.)
M2_RULES = {"adam", "adam_guarded", "lamb_moments_guarded", "lamb_apply_guarded",
            "lars_nesterov", "rmsprop_centered", "adan", "ademamix", "adopt_nesterov",
            "schedule_free_adamw"}
M2_CASES = [pytest.param(r, d, id=f"{r.name}-{jnp.dtype(d).name}") for r in RULES
            for d in (jnp.float32, jnp.bfloat16, jnp.float16)
            if (d == jnp.float32 and r.name in M2_RULES)
            or (r.name, jnp.dtype(d).name) in DTYPE_CASES]


@pytest.mark.parametrize("rule", [r for r in RULES if r.name not in M2_RULES],
                         ids=lambda r: r.name)
def test_m1_every_other_rule_lowers(rule):
  n = 16 * kmg.ALIGN
  _check_lowered(lower_cuda(_update_fn(rule, n), *_sds(rule, n, jnp.float32),
                            donate_argnums=_donate(rule)).as_text(), rule)


@pytest.mark.parametrize("rule, dtype", M2_CASES)
def test_m2_compiles_for_sm90a_without_spills_or_approximations(rule, dtype, tmp_path):
  ptx, report = _compile_h100(rule, dtype, tmp_path)
  assert ".target sm_90a" in ptx
  assert re.search(r"0 bytes spill stores, 0 bytes spill loads", report), report
  # correctly rounded arithmetic: the jnp oracle's float32 operations
  assert not re.search(r"\.approx|div\.full", ptx)
  if rule.sumsq is None:   # the sums of squares may contract; the update may not
    assert not re.search(r"\bfma\.", ptx)
  if "div" in ptx:
    assert "div.rn.f32" in ptx


@pytest.mark.parametrize("name, step_units, stages", [("adam", 4, 2), ("adam", 2, 3),
                                                     ("adan", 4, 2)])
def test_m2_multi_unit_steps_fit_shared_memory(name, step_units, stages, tmp_path):
  """The tuning sweep's largest shared-memory configurations compile for the H100 without
  spills: Adam f32 (7 buffers of ``step_units`` x 4 KiB per stage: 224 and 168 KiB) in blocks of
  ``step_units`` units; Adan (11 buffers) with its steps capped to fit; a rule with per-unit
  tables keeps blocks of one unit."""
  from fusedopt.lars import lars_rule  # pylint: disable=import-outside-toplevel
  [rule] = [r for r in RULES if r.name == name]
  tuning = kmg.MosaicTuning(block=16 * kmg.ALIGN, num_stages=stages, step_units=step_units)
  ptx, report = _compile_h100(rule, jnp.float32, tmp_path, tuning=tuning)
  assert re.search(r"0 bytes spill stores, 0 bytes spill loads", report), report
  assert not re.search(r"\.approx|div\.full|\bfma\.", ptx)
  n = 64 * kmg.ALIGN
  jaxpr = str(jax.make_jaxpr(_update_fn(lars_rule(False), n, tuning))(
      *_sds(lars_rule(False), n, jnp.float32)))
  assert _block_shape(jaxpr) == (kmg.UNIT_ROWS, kmg.WIDTH)


@pytest.mark.parametrize("rule", SR_RULES, ids=lambda r: r.name)
def test_m1_stochastic_rounding_lowers(rule):
  n = 64 * kmg.ALIGN
  sds = ([jax.ShapeDtypeStruct((n,), jnp.bfloat16)] * 2
         + [jax.ShapeDtypeStruct((n,), jnp.float32)] * rule.n_state)
  _check_lowered(lower_cuda(_update_fn(rule, n), *sds, donate_argnums=_donate(rule)).as_text(),
                 rule)


def test_m1_past_2_to_31_elements():
  """A (2^31 + 4096)-element buffer lowers (no memory needed): rows and units, the only indices
  the kernel computes, stay below 2^31 (TMA copies address the rest)."""
  from fusedopt.adam import ADAM_RULE  # pylint: disable=import-outside-toplevel
  n = (1 << 31) + 4096
  low = lower_cuda(_update_fn(ADAM_RULE, n), *_sds(ADAM_RULE, n, jnp.float32),
                   donate_argnums=_donate(ADAM_RULE))
  _check_lowered(low.as_text(), ADAM_RULE)
  assert f"tensor<{n // kmg.WIDTH}x{kmg.WIDTH}xf32>" in low.as_text()


def test_m1_out_of_place_params_are_a_fresh_output():
  """``param_in_place=False`` (``as_delta``, optax's ``update``): p is read, the new params are
  a new buffer, only the state is aliased."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from fusedopt.adam import ADAM_RULE  # pylint: disable=import-outside-toplevel
  rule = dataclasses.replace(ADAM_RULE, param_in_place=False)
  n = 8 * kmg.ALIGN
  txt = lower_cuda(_update_fn(rule, n), *_sds(rule, n, jnp.float32),
                   donate_argnums=(2, 3)).as_text()
  _check_lowered(txt, rule)
  # the custom call's operands: scalars, g, p, m, v, then the zero-filled new-params buffer
  aliased = {int(i) for i in re.findall(r"operand_index = (\d+)", txt)}
  assert aliased == {3, 4, 5}, aliased   # p (operand 2) is read, never written
  in_place = lower_cuda(_update_fn(ADAM_RULE, n), *_sds(ADAM_RULE, n, jnp.float32),
                        donate_argnums=(0, 2, 3)).as_text()
  assert {int(i) for i in re.findall(r"operand_index = (\d+)", in_place)} == {2, 3, 4}


@pytest.mark.parametrize("units, step_units, stages", [(1, 1, 2), (37, 1, 2), (48, 4, 2),
                                                     (1000, 4, 3), (4096, 2, 2)])
def test_m1_grid_covers_the_buffer_once(units, step_units, stages):
  """The kernel's grid x steps per CTA x units per step is the buffer's unit count (no block
  twice, none left out), with the blocks' shape; Adan's 11 buffers get smaller steps where
  Adam's 7 fit the shared memory budget."""
  from fusedopt.adam import ADAM_RULE  # pylint: disable=import-outside-toplevel
  from fusedopt.adan import ADAN_RULE  # pylint: disable=import-outside-toplevel
  tuning = kmg.MosaicTuning(block=16 * kmg.ALIGN, num_stages=stages, step_units=step_units)
  for rule in (ADAM_RULE, ADAN_RULE):
    n = units * kmg.ALIGN
    jaxpr = str(jax.make_jaxpr(_update_fn(rule, n, tuning))(*_sds(rule, n, jnp.float32)))
    [grid] = re.findall(r"Mesh\(grid=\((\d+),\)", jaxpr)
    rows, width = _block_shape(jaxpr)
    su = rows * width // kmg.ALIGN
    steps = units // (int(grid) * su)
    assert int(grid) * steps * su == units and steps >= 1
    assert steps & (steps - 1) == 0 and steps * su <= max(16, su)
    budget = kmg._block_bytes_per_unit(  # pylint: disable=protected-access
        rule, jnp.float32, jnp.zeros((1,)), [jnp.zeros((1,))] * rule.n_state) * stages
    # the most units a step that divide the buffer and fit the budget, up to step_units
    want = max(k for k in (1, 2, 4) if k <= step_units and units % k == 0
               and (k == 1 or k * budget <= kmg.SMEM_BUDGET))
    assert su == want, (rule.name, su, want)


def _block_shape(jaxpr):
  """The (rows, 256) shape of the kernel's blocks: the smallest float32 (rows, 256) in its
  jaxpr (the (n/256, 256) views are larger or equal)."""
  return min((int(a), kmg.WIDTH) for a in re.findall(rf"f32\[(\d+),{kmg.WIDTH}\]", jaxpr))


def test_m1_scalars_are_whole_tma_copies():
  """The scalars' vector is a whole number of 128-byte TMA copies, a rule without global
  scalars (a fused MultiOptimizer's) included."""
  for rule in [r for r in RULES if r.name in ("sgd", "adam", "adam_per_segment", "adan")]:
    vec = kmg._scalar_vector(rule, {k: 1.0 for k in rule.scalars})  # pylint: disable=protected-access
    assert vec.shape[0] % kmg.SCALARS_PAD == 0 and vec.shape[0] >= max(1, len(rule.scalars))
    assert float(vec[: len(rule.scalars)].sum()) == len(rule.scalars)
    assert float(vec[len(rule.scalars):].sum()) == 0.0


def test_m1_vmap_runs_the_kernel_per_batch_element():
  """``jax.vmap`` of a step (``pl.run_state`` has no batching rule): the backend is
  ``sequential_vmap``, one kernel call per batch element, as ``registry.differentiable``
  promises every backend."""
  opt = optim.Adam(learning_rate=0.1, backend="mosaic_gpu").create({"w": jnp.zeros((2048,))})
  batched = jax.tree.map(lambda x: jnp.stack([x, x]), opt)
  g = {"w": jnp.ones((2, 2048))}
  with common.targeting("gpu", 90):
    txt = lower_cuda(jax.vmap(lambda o, g: o.apply_gradient(g)), batched, g).as_text()
  assert txt.count("@mosaic_gpu_v2") >= 1 and "triton" not in txt


# ----------------------------------------------------------------------------- M3 and the backend

@pytest.mark.parametrize("name", ["Adam", "LAMB"])
def test_m3_full_step_compiles_for_h100(name):
  """The whole jitted step (pack, Mosaic GPU kernels, LAMB's norms, unpack) for an H100
  compile-only topology, optimizer donated."""
  rep = h100_replicated()
  tree = {"a": jnp.zeros((300, 70)), "b": jnp.zeros((5000,)), "c": jnp.zeros((3,))}
  with common.targeting("gpu", 90):
    opt = optim.__dict__[name](learning_rate=0.1, backend="mosaic_gpu").create(tree)
    to_sds = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=rep)  # noqa
    lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    compiled = jax.jit(lambda o, g, lr: o.apply_gradient(g, learning_rate=lr),
                       donate_argnums=0).trace(jax.tree.map(to_sds, opt),
                                               jax.tree.map(to_sds, tree), lr).lower().compile()
  txt = compiled.as_text()
  assert "mosaic_gpu" in txt and "triton" not in txt


# ----------------------------------------------------------------------------- quantized state

def _q_fn(rule, n, fields, platform=None, tuning=None):
  """f(p, g, buffers...) -> ``kmg.flat_update_quantized``'s outputs; ``fields`` per state
  field: "s8"/"u8" (the int8 maps), "fp8", or a float dtype's name."""
  from fusedopt import quantization as Q   # pylint: disable=import-outside-toplevel
  fmts = {"s8": Q.INT8_SIGNED, "u8": Q.INT8_UNSIGNED, "fp8": Q.FLOAT8_E4M3}

  def f(p, g, *bufs):
    bufs, state = list(bufs), []
    for kind in fields:
      state.append(Q.QuantizedArray(bufs.pop(0), bufs.pop(0), fmts[kind]) if kind in fmts
                   else bufs.pop(0))
    scalars = {k: jnp.float32(0.5) + 0 * p[0].astype(jnp.float32) for k in rule.scalars}
    seg = {k: jnp.full((n // 256,), 0.5, jnp.float32) for k in rule.seg_scalars}
    return kmg.flat_update_quantized(rule, scalars, seg, p, g, tuple(state), platform=platform,
                                     tuning=tuning)
  return f


def _q_sds(n, fields, pdt=jnp.float32, sharding=None):
  sds = lambda shape, d: jax.ShapeDtypeStruct(shape, d, sharding=sharding)  # noqa: E731
  out = [sds((n,), pdt)] * 2
  for kind in fields:
    out += ([sds((n,), jnp.uint8), sds((n // 256,), jnp.float32)]
            if kind in ("s8", "u8", "fp8") else [sds((n,), _FLOAT.get(kind, kind))])
  return out


_FLOAT = {"f32": jnp.float32}   # the float fields' names in test_pallas_lowering's cases


def _n_written(rule, fields):
  """Buffers a quantized kernel writes in place: p, each field the rule writes (codes and
  scales, or the buffer), the per-row sums."""
  from fusedopt.kernels import symbolic   # pylint: disable=import-outside-toplevel
  passed = symbolic.passed_through(rule)
  state = sum(2 if f in ("s8", "u8", "fp8") else 1 for k, f in enumerate(fields)
              if rule.writes_state and not passed[k])
  return int(rule.writes_param) + state + elementwise.num_sumsq_terms(rule)


Q_CASES = [pytest.param(r, f, id=i) for (r, f), i in zip(QUANTIZED_RULES, QUANTIZED_IDS)]


@pytest.mark.parametrize("rule, fields", Q_CASES)
def test_mq1_quantized_kernel_lowers_in_place(rule, fields):
  """Every quantized case lowers to one ``mosaic_gpu_v2`` call (no Triton) with each buffer
  it writes aliased in place: p, codes and scales (or a float field), sums."""
  n = 64 * kmg.ALIGN
  txt = lower_cuda(_q_fn(rule, n, fields), *_q_sds(n, fields)).as_text()
  assert txt.count("@mosaic_gpu_v2") == 1 and "triton" not in txt
  aliases = re.findall(r"output_operand_alias<output_tuple_indices = \[\d*\]", txt)
  assert len(aliases) == _n_written(rule, fields)


def test_mq1_quantized_kernel_past_2_to_31_elements():
  """A (2^31 + 4096)-element int8 group lowers (no memory needed): the kernel indexes rows (of
  256: under 2^24) and units, never elements; the codes are a (rows, 256) uint8 view."""
  n = (1 << 31) + 4096
  txt = lower_cuda(_q_fn(QUANTIZED_RULES[1][0], n, ("s8", "u8")),
                   *_q_sds(n, ("s8", "u8"))).as_text()
  assert txt.count("@mosaic_gpu_v2") == 1
  assert f"tensor<{n // kmg.WIDTH}x{kmg.WIDTH}xui8>" in txt


@pytest.mark.parametrize("rule, fields, pdt", [pytest.param(*c.values, jnp.float32, id=c.id)
                                               for c in Q_CASES]
                         + [pytest.param(Q_CASES[1].values[0], ("s8", "u8"), jnp.bfloat16,
                                         id="adam-s8-u8-bf16")])
def test_mq2_quantized_kernel_compiles_for_sm90a(rule, fields, pdt, tmp_path):
  """The whole Mosaic pipeline for the H100 topology: sm_90a, no spills, the int8 tables read
  from shared memory (``ld.shared``), every float operation correctly rounded (no ``.approx``
  -- a row's scalar 1/absmax would be ``rcp.approx``, so it is a vector op --, no
  ``div.full``; no fma outside LAMB's sums)."""
  n = 64 * kmg.ALIGN
  sds = _q_sds(n, fields, pdt, h100_replicated())
  with _mosaic_dumps(tmp_path), warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers", UserWarning)   # p: LAMB's moments
    jax.jit(_q_fn(rule, n, fields), donate_argnums=(0, *range(2, len(sds)))).trace(
        *sds).lower().compile()
  [ptx] = [x.read_text() for x in tmp_path.glob("*.ptx")]
  [report] = [x.read_text() for x in tmp_path.glob("*.ptxas")]
  assert ".target sm_90a" in ptx
  assert re.search(r"0 bytes spill stores, 0 bytes spill loads", report), report
  assert not re.search(r"\.approx|div\.full", ptx)
  if rule.sumsq is None:
    assert not re.search(r"\bfma\.", ptx)
  # the int8 tables' gathers: a computed address per element (a decode and a bucket read per
  # int8 field and element, two elements a thread, four rows a block)
  gathers = len(re.findall(r"ld\.shared\.b32\s+%r\d+, \[%rd\d+(\+\d+)?\]", ptx))
  int8 = sum(f in ("s8", "u8") for f in fields)
  assert gathers >= 4 * kmg.UNIT_ROWS * int8 and (int8 or gathers < 4 * kmg.UNIT_ROWS), gathers


M0Q_CASES = [  # (rule, fields, units, param dtype)
    ("adam_guarded", ("s8", "u8"), 6, "float32"), ("lamb_moments", ("fp8", "u8"), 3, "float32"),
    ("lamb_apply_master", ("fp8", "fp8", "float32"), 2, "bfloat16"),
    ("adam_per_segment", ("fp8", "u8"), 4, "float32"),
    ("adam_master_guarded", ("s8", "bfloat16", "float32"), 3, "bfloat16")]


@pytest.mark.parametrize("name, fields, units, dtype", M0Q_CASES,
                         ids=[f"{c[0]}-{'-'.join(c[1])}" for c in M0Q_CASES])
def test_mq0_quantized_interpreter_matches_jnp(name, fields, units, dtype):
  """One step in Mosaic GPU's interpreter (the kernel's blocks, rows, scalar scales, per-row
  tables and sums, ``pallas.quantized_block``, the int8 tables gathered) against the jnp
  path's ``flat_update_quantized``: codes at most one apart in at most 1 of 1000 (XLA:CPU
  contracts each program's multiply-adds in its own places), floats within an ulp of the
  buffer's scale, sums within 2e-5; a skipped step keeps codes and scales bitwise. A row or
  block misplaced, or a table offset wrong, is off everywhere (an unsigned bucket offset off by
  one table half was caught: every code of the second field differed)."""
  # pylint: disable=import-outside-toplevel
  from fusedopt.elementwise import guarded, per_segment, with_master
  from fusedopt.kernels import jnp as jnp_backend
  from fusedopt.adam import ADAM_RULE
  from fusedopt.lamb import APPLY_RULE, MOMENTS_RULE
  import test_quantized_native as tq
  rule = {"adam_guarded": guarded(ADAM_RULE), "lamb_moments": MOMENTS_RULE,
          "lamb_apply_master": with_master(APPLY_RULE), "adam_per_segment": per_segment(ADAM_RULE),
          "adam_master_guarded": guarded(with_master(ADAM_RULE))}[name]
  rng = np.random.RandomState(units)
  n, pdt = units * kmg.ALIGN, jnp.dtype(dtype)
  p, g = (jnp.asarray(rng.standard_normal(n), pdt) for _ in range(2))
  fmts = {"s8": tq.S8, "u8": tq.U8, "fp8": tq.F8}
  # (the second field is a second moment: never negative)
  state = tuple(tq._random_field(rng, fmts[f], n, k == 1) if f in fmts   # pylint: disable=protected-access
                else jnp.asarray(np.abs(rng.standard_normal(n)), jnp.dtype(f))
                for k, f in enumerate(fields))
  if "master" in name:
    state = state[:-1] + (p.astype(jnp.float32),)
  q = {k: jnp.asarray(rng.uniform(0.1, 0.9, n // 256), jnp.float32) for k in rule.seg_scalars}
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  for ok in ((0.0, 1.0) if "ok" in rule.scalars else (None,)):
    s = {k: jnp.float32(v) for k, v in
         numpy_oracle.random_scalars(rule, rng, ok=1.0 if ok is None else ok).items()}
    got = kmg.flat_update_quantized(rule, s, q, p, g, state, platform="interpret",
                                    tuning=kmg.MosaicTuning(block=2 * kmg.ALIGN))
    want = jnp_backend.flat_update_quantized(rule, s, q, f32(p), f32(g), state, 256)
    if rule.writes_param:
      b = np.asarray(want[0].astype(pdt), np.float32)
      np.testing.assert_allclose(np.asarray(got[0], np.float32), b,
                                 rtol=1e-6 if pdt == jnp.float32 else 8e-3,
                                 atol=2e-7 * float(np.abs(b).max()), err_msg=name)
    for a, b, old in zip(got[1], want[1], state):
      for x, y, o in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(old)):
        x, y = np.asarray(x), np.asarray(y)
        if ok == 0.0:
          np.testing.assert_array_equal(x.view(np.uint8), np.asarray(o).view(np.uint8))
        elif x.dtype == np.uint8:
          assert np.count_nonzero(x != y) <= x.size // 1000, (name, np.count_nonzero(x != y))
          assert np.abs(x.astype(int) - y.astype(int)).max() <= 1, name
        else:
          y = y.astype(np.float32)
          np.testing.assert_allclose(x.astype(np.float32), y, rtol=1e-6 if x.dtype == np.float32
                                     else 8e-3, atol=2e-7 * float(np.nanmax(np.abs(y))),
                                     err_msg=name)
    for a, b in zip(got[2] or (), want[2] or ()):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, err_msg=name)
    assert (got[2] is None) == (rule.sumsq is None)


def test_mq0_non_finite_rows_as_the_jnp_path():
  """A row (block) whose update holds NaN or inf is stored as the jnp path stores it: scale NaN
  or inf (its absmax: the whole-row reduction keeps a NaN), its codes equal; the other rows'
  scales within float32 rounding (the two programs contract differently). int8 and e4m3."""
  # pylint: disable=import-outside-toplevel
  from fusedopt.adam import ADAM_RULE
  from fusedopt.kernels import jnp as jnp_backend
  import test_quantized_native as tq
  rng = np.random.RandomState(1)
  n = 3 * kmg.ALIGN
  p = jnp.asarray(rng.standard_normal(n), jnp.float32)
  g = rng.standard_normal(n).astype(np.float32)
  g[256 + 5], g[512 + 9], g[2048 + 3] = np.nan, np.inf, -np.inf   # rows 1, 2, 8
  g = jnp.asarray(g)
  for fields in ((tq.S8, tq.U8), (tq.F8, tq.F8)):
    state = tuple(tq._random_field(rng, f, n, k == 1)   # pylint: disable=protected-access
                  for k, f in enumerate(fields))
    s = {k: jnp.float32(v) for k, v in
         numpy_oracle.random_scalars(ADAM_RULE, rng, ok=1.0).items()}
    got = kmg.flat_update_quantized(ADAM_RULE, s, {}, p, g, state, platform="interpret",
                                    tuning=kmg.MosaicTuning(block=2 * kmg.ALIGN))
    want = jnp_backend.flat_update_quantized(ADAM_RULE, s, {}, p, g, state, 256)
    for a, b in zip(got[1], want[1]):
      np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
      x, y = np.asarray(a.scales), np.asarray(b.scales)
      assert not np.isfinite(y[[1, 2, 8]]).any()
      np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
      np.testing.assert_array_equal(np.isinf(x), np.isinf(y))
      np.testing.assert_allclose(x[np.isfinite(y)], y[np.isfinite(y)], rtol=2.4e-7)


@pytest.mark.ci_may_skip("CPU-only behaviour")
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU-only behaviour")
def test_backend_says_where_it_runs():
  """On a CPU the backend refuses with the reason; for an A100 target (sm_80: Mosaic GPU's bulk
  copies do not exist there) too; for an H100 target it runs."""
  opt = optim.Adam(learning_rate=0.1, backend="mosaic_gpu").create({"w": jnp.zeros((8,))})
  with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
    opt.apply_gradient({"w": jnp.ones((8,))})
  with common.targeting("gpu", 80):
    assert "9.0 or newer" in kmg.BACKENDS["mosaic_gpu"].unavailable()
  with common.targeting("gpu", 90):
    assert kmg.BACKENDS["mosaic_gpu"].unavailable() is None
