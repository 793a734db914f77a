"""Pallas kernels for the flat buffers: one generic driver, every optimizer's ``Rule`` inside.

``flat_update`` runs a rule over one dtype group's flat buffers as a single ``pallas_call``:

    grid = (rows / block_rows,)      each program updates block_rows x ROW elements

The flat buffers are viewed as 2-D ``(rows, ROW)`` arrays — ``ROW = 1024`` on GPUs (one layout
alignment unit per row) and ``(8*rows, 128)`` on TPUs (one (8,128) VMEM tile per alignment unit).
Because every segment of the layout starts on a row boundary, a block never straddles two
tensors, so per-tensor scalars (LAMB/LARS trust ratios) enter as a per-row table.

No block is ragged: ``block_rows`` is the largest power of two dividing the row count (at most
the tuned ``Tuning.block`` / ROW), and the layout pads every group to whole rows. That matters on the Triton
backend, where a plain BlockSpec does *not* mask a ragged last block (silently out of bounds on a
GPU; interpret mode hides it).

Step scalars (learning rate, betas, bias corrections, ...) are one small float32 vector read at
run time, so schedules and overrides never recompile. Params and state are updated in place
(``input_output_aliases``; donate them at the jit boundary to avoid a copy).

The math is ``rule.fn`` — the same function the jnp oracle and the per-leaf path call — traced
with ``jax.numpy`` inside the kernel body, in float32 whatever the storage dtype.
"""
import functools
import types
import warnings
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.extend import core as jax_core

from fusedopt import elementwise
from fusedopt.kernels import common, symbolic

F32 = jnp.float32
ALIGN = common.ALIGN
Tuning = common.Tuning
targeting = common.targeting
supports = common.supports

# Launch parameters per (platform, storage itemsize of the params). GPU: 4096 f32 elements per
# program with 4 warps = 32 elements (8 x 16-byte vectors) per thread per buffer (the sweep:
# docs/performance.md). TPU: 64 tiles of (8,128) per program. Interpret mode costs grid steps x
# buffer size, so it takes big blocks.
DEFAULT_TUNING: Dict[Tuple[str, int], Tuning] = {
    ("gpu", 4): Tuning(block=4 * ALIGN, num_warps=4),
    ("gpu", 2): Tuning(block=4 * ALIGN, num_warps=4),
    ("tpu", 4): Tuning(block=64 * ALIGN),
    ("tpu", 2): Tuning(block=64 * ALIGN),
    ("interpret", 4): Tuning(block=64 * ALIGN),
    ("interpret", 2): Tuning(block=64 * ALIGN),
}

# What a rule's ``xp`` offers inside a kernel (fusedopt.elementwise documents the contract).
# Bit operations (stochastic rounding) are jax's integer ops: Triton and Mosaic lower them natively,
# and ``_gpu_precise_ops`` only replaces float32 arithmetic (integer ops never reach its PTX).
_XP = types.SimpleNamespace(sqrt=jnp.sqrt, where=lambda c, a, b: jnp.where(c != 0, a, b),
                            bits=elementwise.JNP.bits, from_bits=elementwise.JNP.from_bits,
                            u32=elementwise.JNP.u32, abs_sq=lambda x: x * x,   # real kernels
                            sign=jnp.sign, maximum=jnp.maximum, minimum=jnp.minimum)


def _platform(platform: Optional[str]) -> str:
  return common.platform(platform, ("gpu", "tpu", "interpret"), "Pallas")


def default_tuning(rule, p_dtype, platform: Optional[str] = None) -> Tuning:
  """The ``Tuning`` ``flat_update`` uses for ``rule`` on params of ``p_dtype``
  (``common.default_tuning`` over ``DEFAULT_TUNING``)."""
  return common.default_tuning(DEFAULT_TUNING, rule, p_dtype, _platform(platform))


def _largest_pow2_divisor(n: int, cap: int) -> int:
  r = 1
  while r * 2 <= cap and n % (r * 2) == 0:
    r *= 2
  return r


def _pad_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


# Triton lowers `/` to div.full.f32 and sqrt to sqrt.approx.ftz.f32 (about 2 ulp each, and
# denormals flushed), and contracts a*b+c into fma. XLA:CPU -- the jnp oracle -- rounds every
# operation IEEE round-to-nearest. The kernels are memory-bound, so correctly rounded, uncontracted
# instructions (PTX never fuses mul.rn/add.rn into fma) cost nothing measurable and make a GPU
# step reproduce the oracle's float32 arithmetic. The rule is traced to a jaxpr and evaluated
# with these primitives replaced by inline PTX.
PRECISE_PTX = {lax.div_p: "div.rn.f32", lax.sqrt_p: "sqrt.rn.f32", lax.mul_p: "mul.rn.f32",
               lax.add_p: "add.rn.f32", lax.sub_p: "sub.rn.f32"}   # (Mosaic GPU's too)


def _gpu_precise_ops():
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel

  def asm(instr, *args):
    args = jnp.broadcast_arrays(*args)
    code = f"{instr} " + ", ".join(f"${i}" for i in range(len(args) + 1)) + ";"
    return plgpu.elementwise_inline_asm(
        code, args=list(args), constraints="=r" + ",r" * len(args), pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, F32)])[0]
  return {prim: functools.partial(asm, instr) for prim, instr in PRECISE_PTX.items()}


def _eval_jaxpr(jaxpr, consts, args, overrides):
  env = {}
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]  # noqa: E731
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    sub = eqn.params.get("jaxpr")
    if eqn.primitive.name in ("pjit", "jit", "closed_call") and sub is not None:
      outs = _eval_jaxpr(sub.jaxpr, sub.consts, ins, overrides)
    elif (eqn.primitive in overrides
          and all(jnp.result_type(x) == F32 for x in ins)):
      outs = [overrides[eqn.primitive](*ins)]
    else:
      outs = eqn.primitive.bind(*ins, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _call_rule(rule_fn, s, q, p, g, state, overrides):
  """``rule_fn(jnp, s, q, p, g, *state)`` on float32 values, primitives in ``overrides`` replaced."""
  def fn(s, q, p, g, state):
    return rule_fn(_XP, types.SimpleNamespace(**s), types.SimpleNamespace(**q), p, g, *state)
  return _precise(fn, overrides, s, q, p, g, state)


def _rule_inputs(rule, s_ref, q, p_ref, g_ref, load=lambda r: r[...].astype(F32)):
  """(scalars by name, ``q``, p, g) of one block, in float32: the scalars read from the step's
  vector, p and g (a zero where the rule reads none) by ``load``."""
  s = {k: s_ref[j] for j, k in enumerate(rule.scalars)}
  g = load(g_ref) if g_ref is not None else jnp.zeros((), F32)
  return s, q, load(p_ref), g


def _kernel(rule, n_seg, precise, *refs):
  """One block: refs are [scalars, seg tables..., p, (g), state...] then outputs
  [(p), state..., per-row sums of squares...]."""
  refs = list(refs)
  take = lambda k: [refs.pop(0) for _ in range(k)]  # noqa: E731
  (s_ref,), q_refs, (p_ref,) = take(1), take(n_seg), take(1)
  g_ref = take(1)[0] if rule.reads_grad else None
  st_refs = take(rule.n_state)
  p_out = take(1)[0] if rule.writes_param else None
  st_outs = take(rule.n_state) if rule.writes_state else []
  sum_outs = refs
  s, q, p, g = _rule_inputs(rule, s_ref, {k: r[...] for k, r in zip(rule.seg_scalars, q_refs)},
                            p_ref, g_ref)
  ops = _gpu_precise_ops() if precise else None
  new_p, new_state = _call_rule(rule.fn, s, q, p, g, tuple(r[...].astype(F32) for r in st_refs),
                                ops)
  if p_out is not None:
    p_out[...] = new_p.astype(p_out.dtype)
  for o, x in zip(st_outs, new_state):
    o[...] = x.astype(o.dtype)
  if sum_outs:
    terms = _call_rule(rule.sumsq, s, q, p, g, tuple(new_state), ops)
    for o, t in zip(sum_outs, terms):
      o[...] = jnp.sum(t * t, axis=1, keepdims=True)


def _scalar_vector(rule, scalars):
  """The step's scalars as one float32 vector, padded to a power of two."""
  return jnp.stack([jnp.asarray(scalars[k], F32) for k in rule.scalars]
                   + [jnp.zeros((), F32)] * (_pad_pow2(len(rule.scalars)) - len(rule.scalars)))


def _launch(plat, s_vec, num_warps, num_stages):
  """(the scalars' BlockSpec, the compiler parameters) of a ``pallas_call`` on ``plat``: on a
  TPU the scalars in SMEM and a parallel grid; on a GPU the Triton launch parameters."""
  if plat == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
    return (pl.BlockSpec(memory_space=pltpu.SMEM),
            pltpu.CompilerParams(dimension_semantics=("parallel",)))
  s_spec = pl.BlockSpec((s_vec.shape[0],), lambda i: (0,))
  if plat == "gpu":
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
    return s_spec, plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  return s_spec, None


def flat_update(rule, scalars, seg_rows, p, g, state, *, platform=None, tuning=None):
  """Runs ``rule`` over flat buffers in one ``pallas_call``.

  Args:
    rule: a ``fusedopt.elementwise.Rule``.
    scalars: name -> float32 scalar (traced values welcome), for ``rule.scalars``.
    seg_rows: name -> float32 [n // ALIGN], the per-segment scalar of each alignment unit.
    p, g: 1-D buffers of n elements, n a multiple of ALIGN (any float dtypes); ``g`` may be None
      for a rule that does not read it.
    state: tuple of ``rule.n_state`` 1-D buffers of n elements.
    platform: "gpu", "tpu" or "interpret" (CPU, for verification); default: jax's backend.
    tuning: a ``Tuning`` overriding the table.
  Returns:
    (new p or None if the rule does not write params, tuple of new state buffers, tuple of
    float32 [n // ALIGN] per-unit sums of squares of ``rule.sumsq``'s terms, or None). p and
    state are updated in place when donated.
  """
  plat = _platform(platform)
  n = p.shape[0]
  common.check_flat_buffers(rule, p, g, state, ALIGN)
  n_sums = elementwise.num_sumsq_terms(rule)
  units = n // ALIGN
  if n == 0:
    return ((p if rule.writes_param else None), tuple(state),
            tuple(jnp.zeros((0,), F32) for _ in range(n_sums)) if rule.sumsq else None)
  tuning = tuning or default_tuning(rule, p.dtype, plat)
  if tuning.block % ALIGN or tuning.block & (tuning.block - 1):
    raise ValueError(f"Pallas blocks are a power of two of whole {ALIGN}-element units; got "
                     f"block={tuning.block}")

  # GPU/interpret: (units, 1024); TPU: (8 * units, 128), so each unit is one (8,128) tile.
  width = 128 if plat == "tpu" else ALIGN
  rows = n // width
  per_unit = ALIGN // width
  block = _largest_pow2_divisor(units, tuning.block // ALIGN) * per_unit

  s_vec = _scalar_vector(rule, scalars)
  q_cols = [jnp.repeat(jnp.asarray(seg_rows[k], F32), per_unit)[:, None] if per_unit > 1
            else jnp.asarray(seg_rows[k], F32)[:, None] for k in rule.seg_scalars]

  blk = pl.BlockSpec((block, width), lambda i: (i, 0))
  col = pl.BlockSpec((block, 1), lambda i: (i, 0))
  s_spec, params = _launch(plat, s_vec, tuning.num_warps, tuning.num_stages)

  view = lambda x: x.reshape(rows, width)  # noqa: E731
  ins = [s_vec, *q_cols, view(p)] + ([view(g)] if rule.reads_grad else [])
  first_state = len(ins)
  ins += [view(x) for x in state]
  out_shape, aliases = [], {}
  if rule.writes_param:
    if rule.param_in_place:
      aliases[1 + len(q_cols)] = 0
    out_shape.append(jax.ShapeDtypeStruct((rows, width), p.dtype))
  if rule.writes_state:
    for j, x in enumerate(state):
      aliases[first_state + j] = len(out_shape)
      out_shape.append(jax.ShapeDtypeStruct((rows, width), x.dtype))
  n_big = len(out_shape)
  out_shape += [jax.ShapeDtypeStruct((rows, 1), F32)] * n_sums

  outs = pl.pallas_call(
      functools.partial(_kernel, rule, len(q_cols), plat == "gpu"),
      out_shape=out_shape,
      grid=(rows // block,),
      in_specs=[s_spec] + [col] * len(q_cols) + [blk] * (len(ins) - 1 - len(q_cols)),
      out_specs=[blk] * n_big + [col] * n_sums,
      input_output_aliases=aliases,
      compiler_params=params,
      interpret=plat == "interpret",
      name=f"fusedopt_{rule.name}",
  )(*ins)
  big = [o.reshape(-1) for o in outs[:n_big]]
  new_p = big.pop(0) if rule.writes_param else None
  new_state = tuple(big) if rule.writes_state else tuple(state)
  sums = None
  if rule.sumsq is not None:
    sums = tuple(o.reshape(units, per_unit).sum(axis=1) if per_unit > 1 else o.reshape(units)
                 for o in outs[n_big:])
  return new_p, new_state, sums


# ----------------------------------------------------------------------------- quantized state

QROW = 256   # a row of the quantized kernel: one block of quantization.BLOCK elements
LANES = 128  # a TPU vector register's lanes: a row of the "tiles" view (``_View``)


def _precise(fn, ops, *args):
  """``fn(*args)`` on float32 arrays with the primitives in ``ops`` replaced (``_eval_jaxpr``:
  on a GPU, IEEE-rounded PTX instead of Triton's contracted or approximate forms)."""
  if not ops:
    return fn(*args)
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  outs = _eval_jaxpr(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args), ops)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


# The codecs' integer arithmetic is on int32 bits: Mosaic TPU has no unsigned vector min,
# compare or conversion (arith.minui does not legalize), and a float's magnitude bits are
# non-negative int32s, so signed operations give the same results.
SIGN = np.int32(np.iinfo(np.int32).min)   # the sign bit, 0x80000000


def _decode_e4m3(codes):
  """float32 values of e4m3 codes (uint8) in integer arithmetic, as the native kernel decodes
  them (no table read)."""
  c = codes.astype(jnp.int32)
  a = c & 0x7F
  sign = (c & 0x80) << 24
  nrm = (a << 20) + (120 << 23)
  sub = lax.bitcast_convert_type(a.astype(F32) * F32(2.0 ** -9), jnp.int32)
  mag = jnp.where(a >= 8, nrm, sub)
  mag = jnp.where(a == 0x7F, 0x7FC00000, mag)
  return lax.bitcast_convert_type(sign | mag, F32)


def _e4m3_code(u, a, ops):
  """The e4m3 code (int32) of the float32 bits ``u`` (|value| <= 448 or NaN; ``a``: the
  magnitude's bits) by rounding to nearest even in integer arithmetic, as the native kernel
  encodes."""
  nrm = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - 960
  # subnormal: |y| * 2^9 (exact) rounded to nearest even: on a GPU the native kernel's
  # add-and-subtract 2^23 in IEEE-rounded PTX (Triton lowers no round); elsewhere lax.round
  # (XLA would fold the add and subtract away)
  f = lax.bitcast_convert_type(a, F32) * F32(512.0)
  if ops:
    x = _precise(lambda f: (f + F32(8388608.0)) - F32(8388608.0), ops, f)
  else:
    x = lax.round(f, lax.RoundingMethod.TO_NEAREST_EVEN)
  sub = x.astype(jnp.int32)
  return ((u >> 24) & 0x80) | jnp.where(a > 0x7F800000, 0x7F, jnp.where(a >= 0x3C800000, nrm, sub))


class _Gather:
  """The int8 maps' lookups as reads of kernel inputs at computed addresses (GPU: Triton gathers
  from global memory, cached; interpret mode): ``maps`` float32 [512] (the signed map's 256
  values, then the unsigned map's) and ``buckets`` int32 (``quantization.bucket_table`` of each,
  padded to a power of two). The encode is the native kernel's: one bucket read and a comparison
  of the low 16 bits."""
  n_inputs = 2

  @staticmethod
  def inputs(row=None):
    """[maps, buckets]; the buckets padded to a power of two (a Triton block), or with ``row``
    both as rows of ``row`` entries."""
    from fusedopt import quantization as Q  # pylint: disable=import-outside-toplevel
    maps = np.concatenate([Q.dynamic_map(True), Q.dynamic_map(False)])
    bkt = np.concatenate([Q.bucket_table(True), Q.bucket_table(False)])
    if row is None:
      return [jnp.asarray(maps), jnp.asarray(np.pad(bkt, (0, _pad_pow2(bkt.size) - bkt.size)))]
    return [jnp.asarray(np.pad(x, (0, -x.size % row)).reshape(-1, row)) for x in (maps, bkt)]

  @staticmethod
  def specs(arrays):
    return [pl.BlockSpec(a.shape, lambda i: (0,)) for a in arrays]

  def __init__(self, maps_ref, bkt_ref, read=lambda table, idx, dtype: table[idx]):
    """``read(table, int32 indices, dtype)``: a table's entries (by default, indexing; Mosaic
    GPU: its own shared-memory loads, over the same tables reshaped for its copies)."""
    self.maps, self.bkt, self.read = maps_ref, bkt_ref, read

  def decode(self, fmt, codes):
    off = 0 if fmt.name == "int8_signed" else 256
    return self.read(self.maps, codes.astype(jnp.int32) + off, F32)

  def encode(self, fmt, u, ops):
    del ops
    from fusedopt import quantization as Q  # pylint: disable=import-outside-toplevel
    off = 0 if fmt.name == "int8_signed" else 2 * (Q.NUM_BUCKETS + 2)   # (both signs each)
    return Q.bucket_code(jnp, u, lambda i: self.read(self.bkt, i + off, jnp.int32))


class _Lanes:
  """The int8 maps' lookups where a kernel cannot read at computed addresses (Mosaic TPU): a
  256-entry table is two 128-lane rows of one (8, 128) input, and a lookup is a lane gather
  (``take_along_axis``, ``tpu.dynamic_gather``) from each, selected by the index's top bit.
  Rows: the signed map (2), its midpoints (2), the unsigned map (2), its midpoints (2). The
  encode is ``quantization.encode``'s binary search over the midpoints (8 lookups)."""
  n_inputs = 1

  @staticmethod
  def inputs():
    from fusedopt import quantization as Q  # pylint: disable=import-outside-toplevel
    rows = [Q.dynamic_map(True), Q.thresholds(True), Q.dynamic_map(False), Q.thresholds(False)]
    return [jnp.asarray(np.concatenate(rows).reshape(8, 128))]

  @staticmethod
  def specs(arrays):
    return [pl.BlockSpec(arrays[0].shape, lambda i: (0, 0))]

  def __init__(self, tab_ref):
    self.tab = tab_ref

  def _take(self, row, idx):
    """``table[idx]`` for the 256-entry table at rows ``row``, ``row + 1``; idx int32
    [R, QROW], taken a vector register's 128 lanes at a time."""
    idx = idx.astype(jnp.int32)
    r = idx.shape[0]
    lo = jnp.broadcast_to(self.tab[row:row + 1, :], (r, 128))
    hi = jnp.broadcast_to(self.tab[row + 1:row + 2, :], (r, 128))
    out = []
    for h in range(QROW // 128):
      i = idx[:, h * 128:(h + 1) * 128]
      i7 = i & 127
      out.append(jnp.where(i >= 128,
                           jnp.take_along_axis(hi, i7, axis=1, mode="promise_in_bounds"),
                           jnp.take_along_axis(lo, i7, axis=1, mode="promise_in_bounds")))
    return jnp.concatenate(out, axis=1)

  def _row(self, fmt):
    return 0 if fmt.name == "int8_signed" else 4

  def decode(self, fmt, codes):
    return self._take(self._row(fmt), codes)

  def encode(self, fmt, u, ops):
    del ops
    from fusedopt import quantization as Q  # pylint: disable=import-outside-toplevel
    row = self._row(fmt) + 2
    y = lax.bitcast_convert_type(u, F32)
    return Q.encode(lambda table, i: self._take(row, i), jnp.where, fmt, y).astype(jnp.int32)


LOOKUPS = {"gather": _Gather, "lanes": _Lanes}


def _lookup_for(plat, lookup):
  """The int8 lookup strategy: lane gathers on a TPU, address reads elsewhere (``lookup``
  chooses in interpret mode, so both run on a CPU)."""
  if lookup is None:
    return "lanes" if plat == "tpu" else "gather"
  if lookup not in LOOKUPS or (plat != "interpret" and lookup != _lookup_for(plat, None)):
    raise ValueError(f"lookup={lookup!r} on {plat!r}: Mosaic TPU takes 'lanes', a GPU "
                     "'gather' (interpret mode either)")
  return lookup


def _decode(fmt, codes, lookup):
  """float32 values (before the scale) of ``codes`` (uint8) in ``fmt``."""
  return _decode_e4m3(codes) if fmt.is_fp8 else lookup.decode(fmt, codes)


def by_rows(op, x):
  """``op`` ("max" or "sum") of each row of ``x`` [R, QROW], as a column [R, 1]: the blocks'
  reductions of the kernels over rows of blocks."""
  return getattr(jnp, op)(x, axis=1, keepdims=True)


def _encode(fmt, y, ops, lookup, reduce=by_rows):
  """(codes int32 [R, QROW], scales float32 [R, 1]) of the rows ``y``: absmax per row (NaN if
  the row holds one), ``y * fmax / absmax`` clipped to ``[-fmax, fmax]`` (on the bits, NaN kept)
  and encoded -- the native kernel's encode, its float operations IEEE-rounded on a GPU
  (``ops``). The scale is ``absmax * float32(1 / fmax)``, for int8 (fmax 1) the absmax.
  ``reduce(op, x)``: a row's reduction (``by_rows``; Mosaic GPU's kernel holds one block)."""
  am = reduce("max", jnp.abs(y))
  bad = reduce("max", jnp.where(y != y, 1, 0))
  am = jnp.where(bad > 0, F32(jnp.nan), am)
  fmax = F32(fmt.fmax)

  def scaled(y, am):
    if jnp.ndim(am) == 0:   # one row (Mosaic GPU), whose scalar 1/x LLVM makes rcp.approx:
      am = jnp.broadcast_to(am, y.shape)   # a vector op per thread, as IEEE-rounded as the rest
    return y * jnp.where(am > 0, fmax / am, F32(0.0))
  z = _precise(scaled, ops, y, am)
  scale = am * F32(1.0 / fmt.fmax) if fmt.is_fp8 else am   # (one multiply: nothing to contract)
  u = lax.bitcast_convert_type(z, jnp.int32)
  a = u & 0x7FFFFFFF
  fbits = int(np.float32(fmt.fmax).view(np.int32))
  a = jnp.where(a > 0x7F800000, a, jnp.minimum(a, fbits))
  if fmt.is_fp8:
    code = _e4m3_code(u, a, ops)
  else:
    code = lookup.encode(fmt, (u & SIGN) | a, ops)
  return code, scale


def _lanes_to_column(x):
  """(k, 1, LANES) per-row values (a "tiles" column block) as the (k * LANES, 1) column: each
  lane row broadcast to a square and transposed (Mosaic reshapes no lanes into sublanes, and
  a v4 has no sublane gather)."""
  x = x.reshape(-1, LANES)
  return jnp.concatenate([jnp.transpose(jnp.broadcast_to(x[j:j + 1], (LANES, LANES)))[:, :1]
                          for j in range(x.shape[0])], axis=0)


def _column_to_lanes(c):
  """The (k * LANES, 1) column ``c`` as (k, 1, LANES): ``_lanes_to_column``'s inverse."""
  rows = [jnp.transpose(jnp.broadcast_to(c[j:j + LANES], (LANES, LANES)))[:1]
          for j in range(0, c.shape[0], LANES)]
  return jnp.concatenate(rows, axis=0).reshape(-1, 1, LANES)


def quantized_block(rule, fmts, s, q, p, g, fields, ops, lookup, reduce=by_rows):
  """The quantized update of one block of rows, written once for every kernel that runs it
  (``_quantized_kernel``: rows [R, QROW] and columns [R, 1]; ``kernels.mosaic_gpu``: one row
  and scalars, its own ``reduce``). ``fields``, per state field: (codes, scale) of a quantized
  one (codes int32), or (the values as stored,) of a float one. Decodes, runs the rule, and
  encodes each field the rule writes; a checked step's skip (``ok`` = 0) keeps codes and scales.
  Returns (new p, per field: None where the rule passes it through or writes no state, else
  (codes uint8, scale) or (float32 values to store,), the rule's sums of squares over the
  state as stored (per row), or None)."""
  state = tuple(_decode(f, fl[0], lookup) * fl[1] if f else fl[0].astype(F32)
                for fl, f in zip(fields, fmts))
  new_p, new_state = _call_rule(rule.fn, s, q, p, g, state, ops)
  ok = s["ok"] != 0 if "ok" in rule.scalars else None
  stored, outs = list(state), []
  for k, (x, old, f) in enumerate(zip(new_state, fields, fmts)):
    if not rule.writes_state or symbolic.passed_through(rule)[k]:
      outs.append(None)
    elif not f:
      outs.append((x,))
      stored[k] = x.astype(old[0].dtype).astype(F32)
    else:
      codes, scale = _encode(f, x, ops, lookup, reduce)
      if ok is not None:   # (selected as int32: Mosaic TPU v4 compares no int8 vectors)
        codes = jnp.where(ok, codes, old[0])
        scale = jnp.where(ok, scale, old[1])
      codes = codes.astype(jnp.uint8)
      outs.append((codes, scale))
      stored[k] = _decode(f, codes, lookup) * scale
  sums = None
  if rule.sumsq is not None:
    sums = [reduce("sum", t * t) for t in _call_rule(rule.sumsq, s, q, p, g, tuple(stored), ops)]
  return new_p, outs, sums


def _quantized_kernel(rule, n_seg, fmts, precise, lookup_cls, *refs):
  """One block of rows: refs are [scalars, lookup tables (int8 fields), seg tables..., p, (g),
  per field: codes and scales (quantized) or the buffer] then outputs [(p), per field: codes
  and scales or the buffer (where the rule writes its state), per-row sums...]. Each block is
  computed as (rows, QROW) values and (rows, 1) per-row columns, whatever view its refs have
  (``_View``): loads reshape to those, stores back to the ref's shape."""
  refs = list(refs)
  take = lambda k: [refs.pop(0) for _ in range(k)]  # noqa: E731
  rows_of = lambda r: r[...].reshape(-1, QROW)  # noqa: E731
  col_of = lambda r: _lanes_to_column(r[...]) if r.ndim == 3 else r[...]  # noqa: E731

  def put(ref, x):
    x = _column_to_lanes(x) if ref.ndim == 3 else x.reshape(ref.shape)
    ref[...] = x.astype(ref.dtype)
  (s_ref,) = take(1)
  lookup = lookup_cls(*take(lookup_cls.n_inputs)) if lookup_cls else None
  q_refs, (p_ref,) = take(n_seg), take(1)
  g_ref = take(1)[0] if rule.reads_grad else None
  fields = [take(2) if f else take(1) for f in fmts]
  p_out = take(1)[0] if rule.writes_param else None
  out_refs = [take(2) if f else take(1) for f in fmts] if rule.writes_state else []
  s, q, p, g = _rule_inputs(rule, s_ref, {k: col_of(r) for k, r in zip(rule.seg_scalars, q_refs)},
                            p_ref, g_ref, load=lambda r: rows_of(r).astype(F32))
  loaded = [(rows_of(fl[0]).astype(jnp.int32), col_of(fl[1])) if f else (rows_of(fl[0]),)
            for fl, f in zip(fields, fmts)]
  new_p, outs, sums = quantized_block(rule, fmts, s, q, p, g, loaded,
                                      _gpu_precise_ops() if precise else None, lookup)
  if p_out is not None:
    put(p_out, new_p)
  for o, x, old in zip(out_refs, outs, fields):
    for dst, src, val in zip(o, old, x or (None,) * len(o)):
      if x is None:   # passed through: the same codes (or values)
        dst[...] = src[...]
      else:
        put(dst, val)
  for o, t in zip(refs, sums or ()):
    put(o, t)


def quantized_warps(tuning) -> int:
  """Warps of the quantized kernel on a GPU: twice the table's (the guarded, master-weights
  Adam over e4m3 state spills at 4 on sm_90, at 8 nothing does)."""
  return 2 * tuning.num_warps


class _View:
  """How the quantized kernel's operands see a group of ``rows`` blocks: ``data(x)`` a flat
  buffer (params, grads, codes, float fields), ``column(x)`` one value per block (scales,
  per-row tables and sums), ``specs(block)`` their BlockSpecs for ``block`` rows a step.

  - "rows": (rows, QROW) and (rows, 1), the kernel's own shapes: bitcasts of row-major 1-D
    buffers (a GPU, interpret mode).
  - "tiles": (rows * QROW / LANES, LANES) and (rows / LANES, 1, LANES). A TPU tiles a 1-D
    buffer ((1024) for float32, (1024)(128)(4,1) for uint8) so that these views are bitcasts,
    where the "rows" views are relayout copies (a 16M-element int8 Adam group: 101 MB of
    temporaries); the kernel reshapes each block to its (rows, QROW) and (rows, 1) values. It
    needs ``rows`` and the block a multiple of LANES (the layout's ``QUANTIZED_TILE_BLOCKS``)."""

  def __init__(self, name, rows):
    self.name, self.rows = name, rows

  def data(self, x):
    return x.reshape(self.rows, QROW) if self.name == "rows" else x.reshape(-1, LANES)

  @property
  def column_shape(self):
    return (self.rows, 1) if self.name == "rows" else (self.rows // LANES, 1, LANES)

  def column(self, x):
    return x.reshape(self.column_shape)

  def specs(self, block):
    if self.name == "rows":
      return (pl.BlockSpec((block, QROW), lambda i: (i, 0)),
              pl.BlockSpec((block, 1), lambda i: (i, 0)))
    return (pl.BlockSpec((block * QROW // LANES, LANES), lambda i: (i, 0)),
            pl.BlockSpec((block // LANES, 1, LANES), lambda i: (i, 0, 0)))


def _view_for(plat, view, rows):
  """The view of a group of ``rows`` blocks: "tiles" on a TPU when it blocks whole lanes of
  scales, else "rows" (``view`` chooses in interpret mode, so both run on a CPU)."""
  if view is None:
    return "tiles" if plat == "tpu" and rows % LANES == 0 else "rows"
  if view not in ("rows", "tiles") or (plat != "interpret" and view != _view_for(plat, None, rows)):
    raise ValueError(f"view={view!r} on {plat!r}: a TPU takes 'tiles' (groups of whole "
                     f"{LANES}-block rows), a GPU 'rows' (interpret mode either)")
  if view == "tiles" and rows % LANES:
    raise ValueError(f"view='tiles' needs whole {LANES}-block rows of scales; the group has "
                     f"{rows} blocks")
  return view


def flat_update_quantized(rule, scalars, seg_rows, p, g, state, *, platform=None, tuning=None,
                          lookup=None, view=None):
  """``flat_update`` where state fields may be ``quantization.QuantizedArray``s (int8 maps or
  e4m3): rows of one 256-element block (``seg_rows``: per-row tables); decode, the rule, the
  row's absmax and encode in one ``pallas_call``; codes and scales in place. A field the rule
  passes through keeps its codes; a checked step's skip (``ok`` = 0) keeps codes and scales;
  per-row sums of ``rule.sumsq``'s terms over the state as stored.

  e4m3 decodes and encodes in integer arithmetic. The int8 maps are tables: ``lookup`` "gather"
  reads them at computed addresses (a GPU; the native kernel's one-read bucket encode),
  "lanes" gathers within 128-lane vector registers (a TPU, where Mosaic has no other gather;
  a binary search over the midpoints); default: the platform's, and interpret mode runs
  either. Both give the reference's codes (``tests/test_quantized_native.py``). ``view``: how
  the operands see the flat buffers (``_View``; default: the platform's)."""
  from fusedopt import quantization  # pylint: disable=import-outside-toplevel
  plat = _platform(platform)
  n = p.shape[0]
  rows = n // QROW
  why = _unsupported(plat, n)
  if why and any(quantization.is_quantized(x) for x in state):
    raise ValueError(why)
  v = _View(_view_for(plat, view, rows), rows)
  fmts = tuple(x.fmt if quantization.is_quantized(x) else None for x in state)
  lookup_cls = (LOOKUPS[_lookup_for(plat, lookup)]
                if any(f and not f.is_fp8 for f in fmts) else None)
  tuning = tuning or default_tuning(rule, p.dtype, plat)
  cap = max(1, tuning.block // QROW)
  block = _largest_pow2_divisor(rows, max(cap, LANES) if v.name == "tiles" else cap)
  s_vec = _scalar_vector(rule, scalars)
  q_cols = [v.column(jnp.asarray(seg_rows[k], F32)) for k in rule.seg_scalars]
  if plat == "tpu" and v.name == "rows" and block < 32 and block != rows:
    # uint8 codes tile (32, 128): blocks of 32 rows, or the whole group (small: _unsupported)
    block = rows if rows % 32 else 32
  grid = rows // block
  blk, col = v.specs(block)
  # twice the warps on a GPU: the encode's registers (spills at 4 on sm_90)
  s_spec, params = _launch(plat, s_vec, quantized_warps(tuning), tuning.num_stages)
  tables = lookup_cls.inputs() if lookup_cls else []
  ins = [s_vec, *tables, *q_cols, v.data(p)] + ([v.data(g)] if rule.reads_grad else [])
  specs = ([s_spec] + (lookup_cls.specs(tables) if lookup_cls else []) + [col] * len(q_cols)
           + [blk] * (1 + rule.reads_grad))
  bufs = []   # (operand index, array, spec) of each state buffer
  for x in state:
    if quantization.is_quantized(x):
      bufs += [(len(ins), v.data(x.codes), blk), (len(ins) + 1, v.column(x.scales), col)]
      ins += [bufs[-2][1], bufs[-1][1]]
      specs += [blk, col]
    else:
      bufs.append((len(ins), v.data(x), blk))
      ins.append(bufs[-1][1])
      specs.append(blk)
  out_shape, out_specs, aliases = [], [], {}
  if rule.writes_param:
    if rule.param_in_place:
      aliases[1 + len(tables) + len(q_cols)] = 0
    out_shape.append(jax.ShapeDtypeStruct(ins[1 + len(tables) + len(q_cols)].shape, p.dtype))
    out_specs.append(blk)
  if rule.writes_state:
    for idx, x, spec in bufs:
      aliases[idx] = len(out_shape)
      out_shape.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
      out_specs.append(spec)
  n_big = len(out_shape)
  n_sums = elementwise.num_sumsq_terms(rule)
  out_shape += [jax.ShapeDtypeStruct(v.column_shape, F32)] * n_sums
  out_specs += [col] * n_sums
  outs = pl.pallas_call(
      functools.partial(_quantized_kernel, rule, len(q_cols), fmts, plat == "gpu", lookup_cls),
      out_shape=out_shape, grid=(grid,), in_specs=specs, out_specs=out_specs,
      input_output_aliases=aliases, compiler_params=params, interpret=plat == "interpret",
      name=f"fusedopt_q_{rule.name}")(*ins)
  new_p = outs[0].reshape(-1) if rule.writes_param else None
  new_state = tuple(state)
  if rule.writes_state:
    it = iter(outs[1 if rule.writes_param else 0:n_big])
    new_state = tuple(quantization.QuantizedArray(next(it).reshape(-1), next(it).reshape(-1),
                                                  x.fmt, x.block)
                      if quantization.is_quantized(x) else next(it).reshape(-1) for x in state)
  sums = tuple(o.reshape(-1) for o in outs[n_big:]) if n_sums else None
  return new_p, new_state, sums


# Pallas' Triton lowering picks 64-bit offsets for arrays over 2^32 bytes: a uint8 codes array
# of 2^31..2^32 elements gets 32-bit ones, which the pointer arithmetic sign-extends.
CODES_LIMIT = 2 ** 31 - 1
# A TPU group that is not whole 128-block rows (not built by ``FlatLayout.build``) takes the
# "rows" view, where a block of uint8 codes is a whole number of (32, 128) tiles or the whole
# array. A group whose rows (4 per 1024-element unit) no multiple of 32 divides runs as one
# block up to this many rows (a few MiB of VMEM over its buffers); a larger one would need
# blocks with a partial last one, which Pallas pads by copying every operand (measured: 425 MB
# of temporaries for GPT-2's 37693-unit embedding), so it runs on jnp (``_run_quantized``).
TPU_WHOLE_ROWS = 512


def _unsupported(plat, size):
  """Why the kernel does not take a quantized group of ``size`` elements on ``plat``, or
  None (``flat_update_quantized`` raises it, ``_run_quantized`` runs the group on jnp)."""
  if plat == "gpu" and size > CODES_LIMIT:
    return (f"a quantized group of {size} elements: Pallas' Triton lowering addresses a uint8 "
            f"array under 2^32 bytes with 32-bit signed offsets, so the Pallas GPU kernel takes "
            f"at most {CODES_LIMIT} (backend='triton' has 64-bit offsets)")
  rows = size // QROW
  if plat == "tpu" and rows % 32 and rows > TPU_WHOLE_ROWS:
    return (f"a quantized group of {rows} rows of {QROW} is not a whole number of 32-row uint8 "
            f"tiles and is over {TPU_WHOLE_ROWS} rows (one block)")
  return None


def _run_quantized(platform, lookup=None, view=None):
  """``Backend.run_quantized``: ``flat_update_quantized`` on the packed params and grads; a
  group the kernel cannot take on this platform (``_unsupported``) runs on jnp (warned)."""
  from fusedopt.kernels import jnp as jnp_backend  # pylint: disable=import-outside-toplevel
  update = common.at_unit(functools.partial(flat_update_quantized, platform=platform,
                                            lookup=lookup, view=view), QROW)
  packed = common.packed_run_group(update, grad_dtype_ok=lambda d: True)

  def run(rule, scalars, seg, layout, gi, *args):
    why = _unsupported(_platform(platform), layout.groups[gi].size)
    if why:
      warnings.warn(f"{why}: it runs on the jnp backend", RuntimeWarning, stacklevel=4)
      return jnp_backend.run_quantized(rule, scalars, seg, layout, gi, *args)
    return packed(rule, scalars, seg, layout, gi, *args)
  return run


def bytes_per_element(rule, p_dtype=F32, g_dtype=F32, state_dtype=F32) -> int:
  """HBM traffic of one ``flat_update`` per parameter (the roofline model of the benchmark)."""
  return common.bytes_per_element(rule, p_dtype, g_dtype, state_dtype)


# ----------------------------------------------------------------------------- the backend

def available() -> bool:
  """Whether compiled (non-interpret) Pallas kernels can run on jax's default backend."""
  return _platform(None) in ("gpu", "tpu")


def _unavailable():
  if available():
    return None
  return (f"backend='pallas' needs a GPU or TPU (jax's default backend is "
          f"{jax.default_backend()!r}); use backend='pallas_interpret' to run the Pallas kernels "
          "in interpret mode on CPU (slow: for verification), or 'auto'")


def _backend(name, platform):
  update = common.at_unit(functools.partial(flat_update, platform=platform), ALIGN)
  return common.Backend(name, common.packed_run_group(update, grad_dtype_ok=lambda d: True),
                        update, unit=ALIGN, supports=supports,
                        unavailable=_unavailable if platform is None else (lambda: None),
                        run_quantized=_run_quantized(platform))


BACKENDS = {"pallas": _backend("pallas", None),
            "pallas_interpret": _backend("pallas_interpret", "interpret")}

__all__ = ["flat_update", "targeting", "available", "supports", "DEFAULT_TUNING", "Tuning",
           "default_tuning", "bytes_per_element", "ALIGN", "BACKENDS"]
