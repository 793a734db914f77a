"""The ``native`` CPU backend: each optimizer's ``Rule`` compiled to a one-pass C++ kernel.

Why: on XLA:CPU, putting a pytree of gradients into a flat buffer costs more than the update
itself (``concatenate`` of large leaves runs at a few GB/s and allocates a fresh full-size buffer
per step, and chained ``dynamic_update_slice`` into a flat buffer is not done in place). This
kernel never builds a flat gradient: like apex's ``multi_tensor_apply`` it receives the address of
every gradient and parameter leaf and walks them chunk by chunk, reading and writing the flat
state in place (``input_output_aliases``), in one pass with OpenMP threads.

The C++ is *generated* from the same ``Rule.fn`` the jnp backend runs: ``fn`` is traced with
symbolic values that print C++ expressions, so the math exists once. Kernels are compiled with the
system C++ compiler on first use and cached on disk (``$FUSEDOPT_CACHE_DIR``, default
``~/.cache/fusedopt``).

Scope: float32, bfloat16 and float16 params/grads (float32 math and state; other dtypes fall back
to the jnp backend in the driver).
"""
import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from fusedopt import elementwise, quantization
from fusedopt.kernels import common, jnp as jnp_backend, symbolic

F32 = jnp.float32
# Results must not depend on the CPU that built the kernel: -ffp-contract=off (no FMA contraction,
# one IEEE rounding per operation, as NumPy's float32 evaluation of the rule) and no fast-math, so
# -march=native changes only the speed. -mprefer-vector-width=512: where the CPU has AVX-512, use
# it (GCC defaults to 256-bit vectors); stochastic rounding's integer hash is compute-bound at 256
# bits (docs/performance.md). -fno-math-errno lets sqrtf vectorise (it is still IEEE sqrt).
_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno",
          "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-w")
_FLAGS_NO_LINK = tuple(f for f in _FLAGS if f != "-shared")
_CHUNK = 1 << 15  # elements per work item: 128 KiB of fp32, enough to amortise the loop set-up
# Sums of squares (LAMB/LARS norms) go into LANES float32 accumulators, element j of a work item
# into lane j % LANES, added in index order; the lanes are then summed 0..LANES-1 in float32 and
# the work items in double, in leaf order. A fixed order, so the sums are the same whatever vector
# width the CPU has (an ``omp simd reduction`` lets the compiler pick the order).
LANES = 16


class NativeUnavailable(RuntimeError):
  """No C++ compiler or no XLA FFI headers: the native backend cannot be built here."""


# ----------------------------------------------------------------------------- code generation

def _lit(v):
  if np.isfinite(v):
    return f"{v!r}f"
  return "NAN" if np.isnan(v) else ("INFINITY" if v > 0 else "(-INFINITY)")


CPP = symbolic.Dialect(
    backend="native", float_type="float", uint_type="uint32_t",
    statement="const {type} {name} = {expr};",
    float_literal=_lit, uint_literal=lambda v: f"{v}u",
    sqrt="std::sqrt({x})", where="({c} != {zero} ? {a} : {b})",
    # C++ ``uint32_t`` arithmetic wraps modulo 2^32 and ``>>`` is logical, like jax's uint32.
    bits="f2u({x})", from_bits="u2f({x})", u32="static_cast<uint32_t>({x})",
    sign="({x} > 0.f ? 1.f : ({x} < 0.f ? -1.f : {x}))",
    # NaN-propagating, as jnp's (std::max/fmaxf return the other operand for a NaN)
    maximum="(({a} > {b} || {a} != {a}) ? {a} : {b})",
    minimum="(({a} < {b} || {a} != {a}) ? {a} : {b})")


# Storage types: the math is float32 whatever the params/grads are stored in.
_CTYPES = {"float32": "float", "bfloat16": "bf16", "float16": "_Float16"}

_CONVERSIONS = r"""
struct bf16 { uint16_t bits; };
static inline float ld(float x) { return x; }
static inline float ld(_Float16 x) { return static_cast<float>(x); }
static inline float ld(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
static inline void st(float& d, float x) { d = x; }
static inline void st(_Float16& d, float x) { d = static_cast<_Float16>(x); }  // round to nearest even
static inline void st(bf16& d, float x) {  // round to nearest even, as XLA's convert; NaN stays NaN
  uint32_t u; std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) { d.bits = static_cast<uint16_t>((u >> 16) | 0x40u); return; }
  u += 0x7fffu + ((u >> 16) & 1u);
  d.bits = static_cast<uint16_t>(u >> 16);
}
"""

# Bitcasts for rules that use ``xp.bits``/``xp.from_bits``; emitted only then, so the source (and
# the cache key) of every other kernel stays as it was.
_BITCASTS = r"""
static inline uint32_t f2u(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
static inline float u2f(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }
"""


# The handler is written against XLA's FFI *C* API (``xla/ffi/api/c_api.h``, plain structs), not
# the C++ binding (``ffi.h``): the C++ header's templates cost ~1.8 s of compile time per kernel,
# which every distinct kernel paid on a cold cache (about 4x the rest of the kernel). The C API is
# XLA's stable ABI; what the C++ binding did for us is here: answer the metadata query with the
# API version of the headers built against, decode the buffers, find the two attributes by name.
_FFI_C_API = r"""#include "xla/ffi/api/c_api.h"

static XLA_FFI_Error* fail(XLA_FFI_CallFrame* call, const char* msg) {
  XLA_FFI_Error_Create_Args e;
  std::memset(&e, 0, sizeof e);
  e.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
  e.message = msg;
  e.errc = XLA_FFI_Error_Code_INVALID_ARGUMENT;
  return call->api->XLA_FFI_Error_Create(&e);
}

static XLA_FFI_Error* metadata(XLA_FFI_CallFrame* call) {
  auto* ext = reinterpret_cast<XLA_FFI_Metadata_Extension*>(call->extension_start);
  if (ext->extension_base.struct_size < XLA_FFI_Metadata_Extension_STRUCT_SIZE ||
      ext->metadata->struct_size < XLA_FFI_Metadata_STRUCT_SIZE)
    return fail(call, "fusedopt kernel: unexpected FFI metadata struct size");
  ext->metadata->api_version = XLA_FFI_Api_Version{XLA_FFI_Api_Version_STRUCT_SIZE, nullptr,
                                                   XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR};
  ext->metadata->traits = 0;
  return nullptr;
}

// the int64 array attributes "offs" and "sizes" (of equal length n)
static bool int64_array_attrs(XLA_FFI_CallFrame* call, const int64_t** offs,
                              const int64_t** sizes, int64_t* n) {
  const XLA_FFI_Array* found[2] = {nullptr, nullptr};
  static const char* names[2] = {"offs", "sizes"};
  for (int64_t a = 0; a < call->attrs.size; ++a) {
    const XLA_FFI_ByteSpan* name = call->attrs.names[a];
    for (int k = 0; k < 2; ++k)
      if (name->len == std::strlen(names[k]) && std::memcmp(name->ptr, names[k], name->len) == 0) {
        if (call->attrs.types[a] != XLA_FFI_AttrType_ARRAY) return false;
        found[k] = static_cast<const XLA_FFI_Array*>(call->attrs.attrs[a]);
      }
  }
  if (!found[0] || !found[1] || found[0]->dtype != XLA_FFI_DataType_S64 ||
      found[1]->dtype != XLA_FFI_DataType_S64 || found[0]->size != found[1]->size)
    return false;
  *offs = static_cast<const int64_t*>(found[0]->data);
  *sizes = static_cast<const int64_t*>(found[1]->data);
  *n = static_cast<int64_t>(found[0]->size);
  return true;
}
"""


def _segment_loops(body, n_terms):
  """The element loop of ``segment``: ``body`` computes element ``j`` (and, with sums, adds its
  squares into lane ``l`` of each ``acc<t>``)."""
  if not n_terms:
    return f"""  #pragma omp simd
  for (int64_t j = 0; j < n; ++j) {{
      {body}
  }}"""
  decl = "".join(f"  float acc{t}[{LANES}] = {{0.f}};\n" for t in range(n_terms))
  out = "".join(f"  {{ float s = 0.f; for (int l = 0; l < {LANES}; ++l) s += acc{t}[l]; "
                f"acc_out[{t}] = s; }}\n" for t in range(n_terms))
  return f"""{decl}  int64_t j0 = 0;
  for (; j0 + {LANES} <= n; j0 += {LANES}) {{
    #pragma omp simd
    for (int l = 0; l < {LANES}; ++l) {{
      const int64_t j = j0 + l;
      {body}
    }}
  }}
  for (int l = 0; j0 + l < n; ++l) {{
    const int64_t j = j0 + l;
    {body}
  }}
{out}"""


# The end of a generated FFI handler: work item c's partial sums (``part``) added per leaf in
# double, in work-item order, into the last output.
_HANDLER_TAIL = """  if (T > 0) {  // per-leaf sums of squares: the last output, [T, n]
    float* out = static_cast<float*>(ret(KO + (WRITES_P ? n : 0)));
    std::vector<double> tot(static_cast<size_t>(T * n), 0.0);
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t t = 0; t < T; ++t) tot[t * n + leaf[c]] += part[c * T + t];
    for (int64_t x = 0; x < T * n; ++x) out[x] = static_cast<float>(tot[x]);
  }
  return nullptr;
}
"""


def _handler_head(rule, out_of_place, n_terms, consts):
  """The start of a generated FFI handler: the metadata query, the stage check, the ``offs`` and
  ``sizes`` attributes, and the constants every kernel body reads (``consts``: its own, as
  ``"NAME = value, ..."``)."""
  return f"""extern "C" XLA_FFI_Error* FusedoptKernel(XLA_FFI_CallFrame* call) {{
  if (call->extension_start != nullptr &&
      call->extension_start->type == XLA_FFI_Extension_Metadata)
    return metadata(call);
  if (call->stage != XLA_FFI_ExecutionStage_EXECUTE)
    return fail(call, "fusedopt kernel: called outside the execute stage");
  const int64_t* offs; const int64_t* sizes; int64_t n;
  if (!int64_array_attrs(call, &offs, &sizes, &n))
    return fail(call, "fusedopt kernel: expected int64 array attributes offs and sizes");
  constexpr int64_t {consts}, NQ = {max(len(rule.seg_scalars), 1)};
  constexpr bool WRITES_P = {str(rule.writes_param).lower()};
  constexpr bool WRITES_ST = {str(rule.writes_state).lower()};
  constexpr bool P_IN_PLACE = {str(not out_of_place).lower()};
  constexpr int64_t T = {n_terms};"""


def generate(rule, p_dtype="float32", g_dtype="float32", st_dtypes=None,
             leaf_state=False) -> str:
  """C++ source of the FFI handler ``FusedoptKernel`` for ``rule`` with params stored as
  ``p_dtype``, grads as ``g_dtype`` and state buffer k as ``st_dtypes[k]`` (each float32,
  bfloat16 or float16; default float32). The math is float32.

  The state is either one flat buffer per field, leaf ``i`` at ``offs[i]`` (``FlatState``), or,
  with ``leaf_state``, one buffer per field *per leaf* (optax's params-shaped state,
  ``fusedopt.tx``): then every leaf's state is read and written by its own address, like its
  params and grads -- apex's multi_tensor_apply passes per-tensor state lists the same way."""
  pt, gt = _CTYPES[np.dtype(p_dtype).name], _CTYPES[np.dtype(g_dtype).name]
  if st_dtypes is None:
    st_dtypes = ("float32",) * rule.n_state
  stt = [_CTYPES[np.dtype(d).name] for d in st_dtypes]
  em = symbolic.Emitter(CPP)
  new_p, new_state, terms = symbolic.trace(
      rule, em, [f"S[{i}]" for i in range(len(rule.scalars))],
      [f"Q[{i}]" for i in range(len(rule.seg_scalars))],
      symbolic.Float("ld(p[j])", em), symbolic.Float("ld(g[j])", em),
      [symbolic.Float(f"ld(st{k}[j])", em) for k in range(rule.n_state)])
  # LAMB-style per-tensor sums of squares of rule.sumsq's terms, from the values just computed:
  # float accumulators per work item (<= 32K elements), then double across items per leaf.
  n_terms = len(terms)
  accum = [f"acc{t}[l] += {v.name} * {v.name};" for t, v in enumerate(terms)]
  # Loads are plain C++ lvalues in the expressions; stores go last so in-place is safe.
  stores = [f"st(st{k}[j], {v.name});" for k, v in enumerate(new_state)]
  out_of_place = rule.writes_param and not rule.param_in_place
  if rule.writes_param:
    stores.append(f"st({'pout' if out_of_place else 'p'}[j], {new_p.name});")
  body = "\n      ".join(em.lines + accum + stores)
  k = rule.n_state
  st_params = "".join(f", {stt[i]}* __restrict st{i}" for i in range(k))
  if leaf_state:   # buffer (field f, leaf i) is state input/output f * n + i
    st_args = "".join(f", ST{i}[i] + a" for i in range(k))
    st_ptrs = "".join(f"  std::vector<{stt[i]}*> ST{i}(n);\n" for i in range(k))
    st_fill = "".join(
        f"    ST{f}[i] = static_cast<{stt[f]}*>(WRITES_ST ? ret({f} * n + i) : arg(2 + {f} * n + i));\n"
        for f in range(k))
  else:
    st_args = "".join(f", st{i}p + o" for i in range(k))
    st_ptrs = "".join(
        f"  {stt[i]}* st{i}p = static_cast<{stt[i]}*>(WRITES_ST ? ret({i}) : arg({2 + i}));\n"
        for i in range(k))
    st_fill = ""
  loops = _segment_loops(body, n_terms)
  p_qual = f"{pt}*" if rule.writes_param and not out_of_place else f"const {pt}*"
  pout_param = f", {pt}* __restrict pout" if out_of_place else ""
  pout_arg = ", POUT[i] + a" if out_of_place else ""
  # out of place: read p from the inputs, write the outputs (fresh buffers); in place the one
  # pointer is the aliased output
  form = "per-leaf" if leaf_state else "flat"
  return f"""// generated by fusedopt.kernels.native from rule {rule.name!r} ({pt} params, {gt} grads,
// {form} state)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
{_FFI_C_API}{_CONVERSIONS}{_BITCASTS if ("f2u(" in body or "u2f(" in body) else ""}
static inline void segment(const float* __restrict S, const float* __restrict Q,
                           {p_qual} __restrict p{pout_param}, const {gt}* __restrict g{st_params},
                           int64_t n, float* __restrict acc_out) {{
{loops}
}}

{_handler_head(rule, out_of_place, n_terms, f"K = {k}")}
  const int64_t NS = K * {"n" if leaf_state else "1"};       // state buffers
  const int64_t KO = WRITES_ST ? NS : 0;  // state outputs (an unchanged state is input only)
  if (call->args.size != 2 + NS + 2 * n ||
      call->rets.size != KO + (WRITES_P ? n : 0) + (T > 0 ? 1 : 0))
    return fail(call, "fusedopt kernel: wrong number of operands or results");
  auto arg = [call](int64_t i) {{ return static_cast<XLA_FFI_Buffer*>(call->args.args[i])->data; }};
  auto ret = [call](int64_t i) {{ return static_cast<XLA_FFI_Buffer*>(call->rets.rets[i])->data; }};
  const float* S = static_cast<const float*>(arg(0));
  const float* SEG = static_cast<const float*>(arg(1));
{st_ptrs}
  std::vector<{pt}*> P(n), POUT(n);
  std::vector<const {gt}*> G(n);
  for (int64_t i = 0; i < n; ++i) {{
    P[i] = static_cast<{pt}*>(WRITES_P && P_IN_PLACE ? ret(KO + i) : arg(2 + NS + i));
    POUT[i] = WRITES_P ? static_cast<{pt}*>(ret(KO + i)) : nullptr;
    G[i] = static_cast<const {gt}*>(arg(2 + NS + n + i));
{st_fill}  }}
  std::vector<int64_t> leaf, start;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t a = 0; a < sizes[i]; a += {_CHUNK}) {{ leaf.push_back(i); start.push_back(a); }}
  const int64_t nc = static_cast<int64_t>(leaf.size());
  std::vector<float> part(static_cast<size_t>(nc * (T > 0 ? T : 1)));
  #pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nc; ++c) {{
    const int64_t i = leaf[c], a = start[c], len = std::min<int64_t>({_CHUNK}, sizes[i] - a);
    const int64_t o = offs[i] + a;
    float Q[NQ];
    for (int64_t f = 0; f < NQ; ++f) Q[f] = SEG[f * n + i];
    segment(S, Q, P[i] + a{pout_arg}, G[i] + a{st_args}, len, part.data() + c * T);
  }}
{_HANDLER_TAIL}"""


# ----------------------------------------------------------------------------- quantized state

def _exact(v) -> str:
  """A float32 value as an exact C++ literal (hexadecimal)."""
  v = float(v)
  if not np.isfinite(v):
    return _lit(v)
  return f"{v.hex()}f"


def _format_source(fmt) -> str:
  """C++ for one quantized format (``fusedopt.quantization``): its decode (``_decode``: for the
  dynamic maps ``MAP_<name>``, the value of each of the 256 codes; for e4m3 integer arithmetic)
  and ``enc_<name>(y)``, the code of ``y = x * fmax / absmax`` -- for the dynamic maps by
  ``quantization.bucket_table`` (one table read and a comparison of the low bits, the same
  codes as the binary search), for e4m3 by rounding to nearest even in integer arithmetic."""
  name = fmt.name
  table = lambda t, vals: f"static const {t} {vals}"  # noqa: E731
  if fmt.is_fp8:
    # decode without a table read (a vectorised gather costs as much as the rest of the
    # decode): normal codes rebias the exponent (7 -> 127) in the bits, subnormal ones are
    # code * 2^-9, 0x7f is NaN; masks, not selects, so that GCC vectorises it. Encode: normal
    # (|y| >= 2^-6): 3 mantissa bits rounded to nearest even in the float32 bits, exponent
    # rebiased (127 -> 7); subnormal: |y| * 2^9 rounded to an integer (adding and subtracting
    # 2^23 rounds to nearest even); NaN -> 0x7f. |y| <= 448, so nothing overflows.
    return """static inline float dec_float8_e4m3fn(uint32_t c) {
  const uint32_t a = c & 0x7fu, s = (c & 0x80u) << 24;
  const uint32_t nrm = (a << 20) + (120u << 23), sub = f2u(static_cast<float>(a) * 0x1p-9f);
  const uint32_t m = 0u - static_cast<uint32_t>(a >= 8u);
  const uint32_t q = 0u - static_cast<uint32_t>(a == 0x7fu);
  return u2f(s | (0x7fc00000u & q) | (((nrm & m) | (sub & ~m)) & ~q));
}
static inline uint32_t enc_float8_e4m3fn(float y) {
  const uint32_t u = f2u(y), a = u & 0x7fffffffu, s = (u >> 24) & 0x80u;
  const uint32_t nrm = ((a + 0x7ffffu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
  const uint32_t sub = static_cast<uint32_t>((u2f(a) * 512.f + 8388608.f) - 8388608.f);
  return s | (a > 0x7f800000u ? 0x7fu : (a >= 0x3c800000u ? nrm : sub));
}
"""
  signed = fmt.name == "int8_signed"   # (by name: a pickled or copied Format is another object)
  values = quantization.dynamic_map(signed)
  src = table("float", f"MAP_{name}[256] = {{{', '.join(_exact(v) for v in values)}}};\n")
  buckets = quantization.bucket_table(signed)
  nb, lo = quantization.NUM_BUCKETS, quantization.BUCKET_EXPONENT * 128
  src += table("int32_t", f"BKT_{name}[{buckets.size}] = {{{', '.join(map(str, buckets))}}};\n")
  return src + f"""static inline uint32_t enc_{name}(float y) {{
  const uint32_t u = f2u(y), a = u & 0x7fffffffu;
  int32_t t = static_cast<int32_t>(a >> 16) - {lo};
  t = t < -1 ? -1 : (t > {nb} ? {nb} : t);
  const uint32_t e =
      static_cast<uint32_t>(BKT_{name}[static_cast<int32_t>(u >> 31) * {nb + 2} + t + 1]);
  return (e & 0xffu) + (static_cast<uint32_t>((u & 0xffffu) >= (e >> 9)) ^ ((e >> 8) & 1u));
}}
"""


QBLOCK = quantization.BLOCK


def _decode(fmt, code):
  """The C++ expression of ``code``'s value in ``fmt`` (before the scale)."""
  return f"dec_float8_e4m3fn({code})" if fmt.is_fp8 else f"MAP_{fmt.name}[{code}]"


def generate_quantized(rule, p_dtype, g_dtype, kinds) -> str:
  """C++ source of the FFI handler ``FusedoptKernel`` for ``rule`` over a group whose state
  field ``k`` is stored as ``kinds[k]``: a float dtype name (a flat buffer) or a quantized
  format's name (``fusedopt.quantization``: uint8 codes and a float32 scale per block of
  ``QBLOCK``, two buffers).

  One pass per block of ``QBLOCK`` elements: decode (``MAP[code] * scale``), the rule in
  float32, the block's absmax, encode -- the jnp backend's ``run_quantized``, operation for
  operation, and bitwise equal to NumPy's float32 evaluation of it
  (tests/test_quantized_native.py). A leaf is run over its blocks (its last one zero-padded, as
  the flat buffers are), a field the rule passes through is not stored again, and a checked
  step whose ``ok`` is 0 keeps codes and scales. Per-tensor sums (``rule.sumsq``) are taken
  over the state as stored."""
  pt, gt = _CTYPES[np.dtype(p_dtype).name], _CTYPES[np.dtype(g_dtype).name]
  fmts = [quantization.FORMATS.get(kind) for kind in kinds]
  stt = [None if f is not None else _CTYPES[np.dtype(kind).name] for kind, f in zip(kinds, fmts)]
  k_all = rule.n_state
  em = symbolic.Emitter(CPP)
  loads = [symbolic.Float(f"ld(st{k}[j])", em) if f is None
           else em.new(f"{_decode(f, f'c{k}[j]')} * q{k}") for k, f in enumerate(fmts)]
  scalars = [f"S[{i}]" for i in range(len(rule.scalars))]
  segs = [f"Q[{i}]" for i in range(len(rule.seg_scalars))]
  new_p, new_state, _ = symbolic.trace(dataclasses.replace(rule, sumsq=None), em, scalars, segs,
                                       symbolic.Float("ld(p[j])", em),
                                       symbolic.Float("ld(g[j])", em), loads)
  stored = [k for k in range(k_all) if rule.writes_state and new_state[k] is not loads[k]]
  out_of_place = rule.writes_param and not rule.param_in_place
  keep_p = rule.writes_param and rule.param_in_place and rule.sumsq is not None
  stores = []
  if keep_p:   # the sums read the old param
    stores.append("p_old[j] = ld(p[j]);")
  for k in stored:
    v = new_state[k].name
    stores.append(f"st(st{k}[j], {v});" if fmts[k] is None else
                  f"y{k}[j] = {v}; am{k} = std::max(am{k}, std::fabs({v})); "
                  f"bad{k} |= ({v} != {v});")
  if rule.writes_param:
    stores.append(f"st({'pout' if out_of_place else 'p'}[j], {new_p.name});")
  quant = [k for k in stored if fmts[k] is not None]
  reductions = "".join(f" reduction(max:am{k}) reduction(|:bad{k})" for k in quant)
  decl = "".join(f"  alignas(64) float y{k}[{QBLOCK}]; float am{k} = 0.f; int bad{k} = 0;\n"
                 for k in quant)
  decl += "".join(f"  const float q{k} = *sc{k};\n" for k, f in enumerate(fmts) if f is not None)
  if keep_p:
    decl += f"  alignas(64) float p_old[{QBLOCK}];\n"
  encode = ""
  for k in quant:
    f = fmts[k]
    fmax = _exact(f.fmax)
    scale = f"am * {_exact(np.float32(1.0 / f.fmax))}" if f.is_fp8 else "am"
    encode += f"""  if (store) {{
    const float am = bad{k} ? NAN : am{k};
    const float inv = am > 0.f ? {fmax} / am : 0.f;
    #pragma omp simd
    for (int64_t j = 0; j < {QBLOCK}; ++j)
      c{k}[j] = static_cast<uint8_t>(enc_{f.name}(clip(y{k}[j] * inv, {fmax})));
    *sc{k} = {scale};
  }}
"""
  # the sums: rule.sumsq on the state as stored (decoded again), the old param, the grad
  n_terms = elementwise.num_sumsq_terms(rule)
  sums = ""
  if n_terms:
    em2 = symbolic.Emitter(CPP)
    st_vals = [symbolic.Float(f"ld(st{k}[j])", em2) if f is None
               else em2.new(f"{_decode(f, f'c{k}[j]')} * (*sc{k})") for k, f in enumerate(fmts)]
    p_val = symbolic.Float("p_old[j]" if keep_p else "ld(p[j])", em2)
    terms = symbolic.trace_terms(rule, em2, scalars, segs, p_val, symbolic.Float("ld(g[j])", em2),
                                 st_vals)
    body = "\n        ".join(em2.lines + [f"acc[{t} * {LANES} + l] += {v.name} * {v.name};"
                                          for t, v in enumerate(terms)])
    sums = f"""  for (int64_t j0 = 0; j0 < {QBLOCK}; j0 += {LANES}) {{
    #pragma omp simd
    for (int l = 0; l < {LANES}; ++l) {{
      const int64_t j = j0 + l;
        {body}
    }}
  }}
"""
  body = "\n      ".join(em.lines + stores)
  field_params = "".join(
      f", {stt[k]}* __restrict st{k}" if f is None
      else f", uint8_t* __restrict c{k}, float* __restrict sc{k}" for k, f in enumerate(fmts))
  p_qual = f"{pt}*" if rule.writes_param and not out_of_place else f"const {pt}*"
  pout_param = f", {pt}* __restrict pout" if out_of_place else ""
  # buffers: a float field is one, a quantized one two (codes, scales)
  bufs, field_args = 0, ""
  for k, f in enumerate(fmts):
    if f is None:
      field_args += f", static_cast<{stt[k]}*>(buf({bufs})) + o"
      bufs += 1
    else:
      field_args += (f", static_cast<uint8_t*>(buf({bufs})) + o, "
                     f"static_cast<float*>(buf({bufs + 1})) + o / {QBLOCK}")
      bufs += 2
  store = f"S[{rule.scalars.index('ok')}] != 0.f" if "ok" in rule.scalars else "true"
  formats = "".join(_format_source(f) for f in dict.fromkeys(f for f in fmts if f is not None))
  return f"""// generated by fusedopt.kernels.native from rule {rule.name!r}
// ({pt} params, {gt} grads, state {", ".join(kinds)}; blocks of {QBLOCK})
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
{_FFI_C_API}{_CONVERSIONS}{_BITCASTS}
// jnp.clip(y, -f, f) (NaN stays NaN) on the bits, which GCC vectorises (float selects it does not)
static inline float clip(float y, float f) {{
  const uint32_t u = f2u(y), a = u & 0x7fffffffu;
  return u2f((u & 0x80000000u) | (a > 0x7f800000u ? a : std::min(a, f2u(f))));
}}
{formats}
static inline void block(const float* __restrict S, const float* __restrict Q,
                         {p_qual} __restrict p{pout_param}, const {gt}* __restrict g{field_params},
                         bool store, float* __restrict acc) {{
{decl}  #pragma omp simd{reductions}
  for (int64_t j = 0; j < {QBLOCK}; ++j) {{
      {body}
  }}
{encode}{sums}}}

{_handler_head(rule, out_of_place, n_terms, f"B = {QBLOCK}, NB = {bufs}")}
  const int64_t KO = WRITES_ST ? NB : 0;  // state outputs (an unchanged state is input only)
  if (call->args.size != 2 + NB + 2 * n ||
      call->rets.size != KO + (WRITES_P ? n : 0) + (T > 0 ? 1 : 0))
    return fail(call, "fusedopt kernel: wrong number of operands or results");
  auto arg = [call](int64_t i) {{ return static_cast<XLA_FFI_Buffer*>(call->args.args[i])->data; }};
  auto ret = [call](int64_t i) {{ return static_cast<XLA_FFI_Buffer*>(call->rets.rets[i])->data; }};
  auto buf = [&](int64_t b) {{ return WRITES_ST ? ret(b) : arg(2 + b); }};
  const float* S = static_cast<const float*>(arg(0));
  const float* SEG = static_cast<const float*>(arg(1));
  const bool store = {store};
  std::vector<{pt}*> P(n), POUT(n);
  std::vector<const {gt}*> G(n);
  for (int64_t i = 0; i < n; ++i) {{
    P[i] = static_cast<{pt}*>(WRITES_P && P_IN_PLACE ? ret(KO + i) : arg(2 + NB + i));
    POUT[i] = WRITES_P ? static_cast<{pt}*>(ret(KO + i)) : nullptr;
    G[i] = static_cast<const {gt}*>(arg(2 + NB + n + i));
  }}
  // work items: {_CHUNK} elements of one leaf's blocks (its size rounded up to whole blocks)
  std::vector<int64_t> leaf, start;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t a = 0; a < (sizes[i] + B - 1) / B * B; a += {_CHUNK}) {{
      leaf.push_back(i); start.push_back(a);
    }}
  const int64_t nc = static_cast<int64_t>(leaf.size());
  std::vector<float> part(static_cast<size_t>(nc * (T > 0 ? T : 1)));
  #pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nc; ++c) {{
    const int64_t i = leaf[c], a = start[c];
    const int64_t len = std::min<int64_t>({_CHUNK}, (sizes[i] + B - 1) / B * B - a);
    float Q[NQ];
    for (int64_t f = 0; f < NQ; ++f) Q[f] = SEG[f * n + i];
    float acc[(T > 0 ? T : 1) * {LANES}] = {{0.f}};
    alignas(64) {pt} pz[B], pzo[B];
    alignas(64) {gt} gz[B];
    for (int64_t b = a; b < a + len; b += B) {{
      const int64_t o = offs[i] + b, real = std::min<int64_t>(B, sizes[i] - b);
      {pt}* pp = P[i] + b;
      {pt}* po = POUT[i] == nullptr ? nullptr : POUT[i] + b;
      const {gt}* gg = G[i] + b;
      if (real < B) {{  // the leaf's last block: zero-padded copies, as in the flat buffers
        std::memset(static_cast<void*>(pz), 0, sizeof pz);
        std::memset(static_cast<void*>(gz), 0, sizeof gz);
        std::memcpy(static_cast<void*>(pz), pp, real * sizeof({pt}));
        std::memcpy(static_cast<void*>(gz), gg, real * sizeof({gt}));
        pp = pz; gg = gz; po = pzo;
      }}
      block(S, Q, pp{", po" if out_of_place else ""}, gg{field_args}, store, acc);
      if (real < B && WRITES_P)
        std::memcpy(P_IN_PLACE ? static_cast<void*>(P[i] + b) : static_cast<void*>(POUT[i] + b),
                    P_IN_PLACE ? static_cast<void*>(pz) : static_cast<void*>(pzo),
                    real * sizeof({pt}));
    }}
    for (int64_t t = 0; t < T; ++t) {{
      float s = 0.f;
      for (int l = 0; l < {LANES}; ++l) s += acc[t * {LANES} + l];
      part[c * (T > 0 ? T : 1) + t] = s;
    }}
  }}
{_HANDLER_TAIL}"""


# ----------------------------------------------------------------------------- build and load

def _compiler():
  for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if c and shutil.which(c):
      return shutil.which(c)
  return None


def _cache_dir():
  """The kernel cache: ``$FUSEDOPT_CACHE_DIR``, default ``~/.cache/fusedopt``; created here."""
  d = os.environ.get("FUSEDOPT_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "fusedopt")
  try:
    os.makedirs(d, exist_ok=True)
    if not os.access(d, os.W_OK | os.X_OK):
      raise PermissionError(f"no write permission on {d}")
  except OSError as e:
    raise NativeUnavailable(
        f"the native kernel cache directory {d!r} cannot be created or written ({e}); set "
        "$FUSEDOPT_CACHE_DIR to a writable directory") from e
  return d


def _cpu_fingerprint():
  # -march=native binaries are only valid on the CPU that built them: key the cache on it.
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((l for l in f if l.startswith("flags")), "")
  except OSError:
    flags = ""
  return platform.machine() + hashlib.sha256(flags.encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """True when a C++ compiler and the XLA FFI headers are present."""
  try:
    return _compiler() is not None and os.path.isdir(jax.ffi.include_dir())
  except Exception:  # pylint: disable=broad-except
    return False


def _digest(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return f"{os.path.getsize(path)} {h.hexdigest()}"


def _verified(so):
  """Whether ``so`` is a complete library this module built: its size and SHA-256 equal those
  recorded next to it (``<so>.sha256``) when it was built. A truncated or foreign file would
  crash the process when loaded (SIGBUS), so it is rebuilt instead."""
  try:
    with open(so + ".sha256") as f:
      return f.read().strip() == _digest(so)
  except OSError:
    return False


# The standard headers every generated kernel includes, precompiled once per cache directory
# (GCC only): parsing them was 0.1 s of each kernel's 0.3 s compile. The sources still include
# them (self-contained, the same with or without the PCH), and the library's bytes are the same.
_PCH_HEADER = ("#include <algorithm>\n#include <cmath>\n#include <cstdint>\n#include <cstring>\n"
               "#include <vector>\n#include \"xla/ffi/api/c_api.h\"\n")


def _is_gcc(compiler):
  try:
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False,
                         timeout=60).stdout
  except (OSError, subprocess.SubprocessError):
    return False
  return "Free Software Foundation" in out and "clang" not in out


def _publish(tmp, d, names):
  """Moves the files ``names`` from ``tmp`` (a directory inside ``d``) into ``d``, in order, each
  with its digest written first (``<name>.sha256``, moved right after it): ``os.replace`` within
  one filesystem, so a reader sees no file or a complete one, and a file before its digest."""
  for name in names:
    path = os.path.join(tmp, name)
    with open(path + ".sha256", "w") as f:
      f.write(_digest(path))
    os.replace(path, os.path.join(d, name))
    os.replace(path + ".sha256", os.path.join(d, name + ".sha256"))


@functools.lru_cache(maxsize=None)
def _pch_args(d):
  """``("-include", header)`` for the precompiled kernel header in cache directory ``d``, built
  there on first use (``<header>.gch`` beside it, with its digest); ``()`` where there is none
  (not GCC, or it failed to build: the kernels compile without it)."""
  cc = _compiler()
  if cc is None or not _is_gcc(cc):
    return ()
  key = hashlib.sha256("\n".join([_PCH_HEADER, cc, " ".join(_FLAGS), jax.ffi.include_dir(),
                                   jax.__version__, _cpu_fingerprint()]).encode()).hexdigest()[:20]
  header = os.path.join(d, f"fusedopt_pch_{key}.h")
  gch = header + ".gch"
  if os.path.exists(header) and _verified(gch):
    return ("-include", header)
  tmp = tempfile.mkdtemp(prefix=".build-", dir=d)
  name = os.path.basename(header)
  try:
    with open(os.path.join(tmp, name), "w") as f:
      f.write(_PCH_HEADER)
    cmd = [cc, *_FLAGS_NO_LINK, "-I", jax.ffi.include_dir(), "-x", "c++-header", name, "-o",
           name + ".gch"]
    if subprocess.run(cmd, capture_output=True, check=False, cwd=tmp).returncode:
      return ()
    _publish(tmp, d, [name, name + ".gch"])
  except OSError:
    return ()
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return ("-include", header) if _verified(gch) else ()


def _build(src, so, pch=True):
  """Compiles ``src`` into ``so``. Every file is written in ``so``'s own directory and renamed
  into place (``os.replace`` is atomic only within one filesystem: a temporary directory on a
  tmpfs ``/tmp`` would make it fail with EXDEV), the library first and then its digest, so a
  concurrent process sees either no kernel, or a complete one with its digest. The source is
  compiled under the library's own name from a fresh directory: the same source gives the same
  bytes in every process, so concurrent builds of one kernel agree with either digest (with the
  precompiled header or without: ``pch=False``, and the retry when a build with it fails)."""
  d = os.path.dirname(so)
  name = os.path.basename(so)[:-len(".so")]
  tmp = tempfile.mkdtemp(prefix=".build-", dir=d)
  try:
    with open(os.path.join(tmp, name + ".cc"), "w") as f:
      f.write(src)
    pch_args = _pch_args(d) if pch else ()
    cmd = [_compiler(), *_FLAGS, *pch_args, "-I", jax.ffi.include_dir(), name + ".cc", "-o",
           name + ".so"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp)
    if proc.returncode and pch_args:   # a damaged precompiled header: without it
      cmd = [c for c in cmd if c not in pch_args]
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp)
    if proc.returncode:
      raise NativeUnavailable(f"compiling a native kernel failed:\n{' '.join(cmd)}\n"
                              f"{proc.stderr[-4000:]}")
    _publish(tmp, d, [name + ".so"])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


_lock = threading.Lock()
_failed = {}   # source -> NativeUnavailable: a kernel that cannot be built is not retried


@functools.lru_cache(maxsize=None)
def _target(src: str) -> str:
  """Compiles (or finds in the cache) ``src``, registers it with XLA, returns the target name.
  Raises ``NativeUnavailable`` saying why when it cannot."""
  if src in _failed:
    raise _failed[src]
  try:
    if not available():
      raise NativeUnavailable("no C++ compiler (set $CXX) or no jaxlib FFI headers")
    key = hashlib.sha256("\n".join([src, " ".join(_FLAGS), jax.__version__,
                                    _cpu_fingerprint()]).encode()).hexdigest()[:20]
    with _lock:
      so = os.path.join(_cache_dir(), f"fusedopt_{key}.so")
      if not _verified(so):
        _build(src, so)
        if not _verified(so):
          raise NativeUnavailable(f"the kernel just built, {so}, does not match its digest "
                                  "(another process writing the cache?)")
      lib = ctypes.CDLL(so)
      name = f"fusedopt_{key}"
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(lib.FusedoptKernel), platform="cpu")
    return name
  except NativeUnavailable as e:
    _failed[src] = e
    raise
  except OSError as e:   # a full disk, a file we may not write, a library that does not load
    _failed[src] = NativeUnavailable(f"building or loading a native kernel failed: {e}")
    raise _failed[src] from e


def target_for(rule, p_dtype="float32", g_dtype="float32", st_dtypes=None,
               leaf_state=False) -> str:
  return _target(generate(rule, p_dtype, g_dtype, st_dtypes, leaf_state))


# ----------------------------------------------------------------------------- the backend

def supports(dtype) -> bool:
  return np.dtype(dtype).name in _CTYPES


# XLA's compile time grows faster than linearly with the number of aliased outputs of one custom
# call (docs/performance.md); calls over batches of leaves, threading the
# flat state through, keep it near-linear. Each batch is still one pass over its leaves.
_LEAVES_PER_CALL = 128


_warned = set()


def _fallback_warning(err):
  msg = (f"fusedopt's native CPU kernels are unavailable, so this step runs on the jnp backend "
         f"(same results, slower): {err}")
  if msg not in _warned:
    _warned.add(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


def run(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
  """``Backend.run_group`` for a float32/bfloat16/float16 group. Where a kernel cannot be built
  or loaded, warns once and runs the group on the jnp backend instead."""
  try:
    return _run_native(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state, False)
  except NativeUnavailable as e:
    _fallback_warning(e)
  return jnp_backend.run_group(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state)


def run_leaves(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
  """``Backend.run_leaves``: as ``run``, each leaf's state read and written by its address."""
  try:
    return _run_native(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state, True)
  except NativeUnavailable as e:
    _fallback_warning(e)
  return jnp_backend.run_leaves(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state)


def _run_native(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state, leaf_state):
  group = layout.groups[gi]
  S = (jnp.stack([jnp.asarray(scalars[name], F32) for name in rule.scalars])
       if rule.scalars else jnp.zeros((1,), F32))
  state = tuple(state)
  new_p, sums, new_state = [], [], [[] for _ in state]
  idx_all = list(group.segments)
  for start in range(0, len(idx_all), _LEAVES_PER_CALL):
    idx = idx_all[start:start + _LEAVES_PER_CALL]
    if leaf_state:   # this call's leaves' own state buffers
      part_state = tuple(x[start:start + len(idx)] for x in state)
      out_p, out_state, part = _call(rule, S, seg, layout, idx, p_leaves, g_leaves, part_state,
                                     True)
      for k, x in enumerate(out_state):
        new_state[k] += list(x)
    else:
      out_p, state, part = _call(rule, S, seg, layout, idx, p_leaves, g_leaves, state, False)
    new_p += out_p or []
    sums.append(part)
  if leaf_state:
    state = tuple(tuple(x) for x in new_state)
  if rule.sumsq is not None:   # per leaf of the group, in group order
    sums = tuple(jnp.concatenate([p[t] for p in sums]) for t in range(len(sums[0])))
  else:
    sums = None
  return (new_p if rule.writes_param else None), state, sums


def _leaf_operands(rule, seg, layout, idx, p_leaves, g_leaves):
  """What one FFI call over the leaves ``idx`` takes besides the scalars and the state: the
  per-leaf scalars (field-major), the params, the grads in one dtype (float32 where a group
  mixes grad dtypes: a copy), that dtype, and the ``offs``/``sizes`` attributes."""
  SEG = (jnp.stack([jnp.asarray(seg[name], F32)[np.asarray(idx)] for name in rule.seg_scalars])
         .reshape(-1) if rule.seg_scalars else jnp.zeros((1,), F32))
  ps = [p_leaves[i] for i in idx]
  gs = [jnp.asarray(g_leaves[i]) for i in idx]
  g_dtype = gs[0].dtype if all(g.dtype == gs[0].dtype and supports(g.dtype) for g in gs) else F32
  gs = [g.astype(g_dtype) for g in gs]
  offs = np.array([layout.segments[i].offset for i in idx], np.int64)
  sizes = np.array([layout.segments[i].size for i in idx], np.int64)
  return SEG, ps, gs, g_dtype, offs, sizes


def _ffi(target, rule, S, SEG, bufs, ps, gs, offs, sizes):
  """The FFI call of a generated kernel: ``bufs`` (the state buffers) aliased to the first
  outputs where the rule writes its state, the params to the next ones where it writes them in
  place, the per-leaf sums last. Returns (new state buffers, new params or None, sums)."""
  n = len(ps)
  out_types = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in bufs] if rule.writes_state else []
  k_out = len(out_types)
  aliases = {2 + j: j for j in range(k_out)}
  if rule.writes_param:
    out_types += [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in ps]
    if rule.param_in_place:
      aliases.update({2 + len(bufs) + i: k_out + i for i in range(n)})
  n_terms = elementwise.num_sumsq_terms(rule)
  if n_terms:
    out_types.append(jax.ShapeDtypeStruct((n_terms * n,), F32))
  # vmap (ensembles, population-based training): one call per batch element, in a loop
  outs = jax.ffi.ffi_call(target, out_types, input_output_aliases=aliases,
                          vmap_method="sequential")(
      S, SEG, *bufs, *ps, *gs, offs=offs, sizes=sizes)
  new_bufs = list(outs[:k_out]) if rule.writes_state else list(bufs)
  sums = tuple(outs[-1].reshape(n_terms, n)) if n_terms else ()
  return new_bufs, (list(outs[k_out:k_out + n]) if rule.writes_param else None), sums


def _call(rule, S, seg, layout, idx, p_leaves, g_leaves, state, leaf_state):
  """One FFI call over the leaves ``idx``; ``state`` per field a flat buffer or (``leaf_state``)
  a tuple of those leaves' state arrays."""
  n, k = len(idx), rule.n_state
  fields = state
  if leaf_state:   # field-major, as the kernel reads; one dtype per field (a kernel per dtypes)
    orig = [[x.dtype for x in leaves] for leaves in fields]
    fields = tuple(tuple(x.astype(leaves[0].dtype) for x in leaves) for leaves in fields)
    state = tuple(x for leaves in fields for x in leaves)
    st_dtypes = tuple(np.dtype(leaves[0].dtype).name for leaves in fields)
  else:
    st_dtypes = tuple(np.dtype(x.dtype).name for x in state)
  SEG, ps, gs, g_dtype, offs, sizes = _leaf_operands(rule, seg, layout, idx, p_leaves, g_leaves)
  target = target_for(rule, ps[0].dtype, g_dtype, st_dtypes, leaf_state)
  new_state, new_p, sums = _ffi(target, rule, S, SEG, state, ps, gs, offs, sizes)
  new_state = tuple(new_state)
  if leaf_state:
    new_state = tuple(tuple(x.astype(dt) for x, dt in zip(new_state[f * n:(f + 1) * n], orig[f]))
                      for f in range(k))
  return new_p, new_state, sums


def run_quantized(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
  """``Backend.run_quantized``: a group whose state fields may be ``QuantizedArray``s, decoded,
  updated and encoded in one pass (``generate_quantized``). Where a kernel cannot be built,
  warns once and runs the group on the jnp backend's ``run_quantized``."""
  try:
    return _run_quantized(rule, scalars, seg, layout, gi, p_leaves, g_leaves, tuple(state))
  except NativeUnavailable as e:
    _fallback_warning(e)
  return jnp_backend.run_quantized(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state)


def _run_quantized(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
  group = layout.groups[gi]
  if any(quantization.is_quantized(x) and x.block != QBLOCK for x in state):
    raise ValueError(f"the native kernels quantize in blocks of {QBLOCK}")
  S = (jnp.stack([jnp.asarray(scalars[name], F32) for name in rule.scalars])
       if rule.scalars else jnp.zeros((1,), F32))
  new_p, sums = [], []
  idx_all = list(group.segments)
  for start in range(0, len(idx_all), _LEAVES_PER_CALL):
    idx = idx_all[start:start + _LEAVES_PER_CALL]
    out_p, state, part = _call_quantized(rule, S, seg, layout, idx, p_leaves, g_leaves, state)
    new_p += out_p or []
    sums.append(part)
  if rule.sumsq is not None:
    sums = tuple(jnp.concatenate([p[t] for p in sums]) for t in range(len(sums[0])))
  else:
    sums = None
  return (new_p if rule.writes_param else None), state, sums


def _call_quantized(rule, S, seg, layout, idx, p_leaves, g_leaves, state):
  """One FFI call of ``generate_quantized``'s kernel over the leaves ``idx``: a quantized field
  passes its codes and scales, a float field its buffer."""
  kinds, bufs = [], []
  for x in state:
    if quantization.is_quantized(x):
      kinds.append(x.fmt.name)
      bufs += [x.codes, x.scales]
    else:
      kinds.append(np.dtype(x.dtype).name)
      bufs.append(x)
  SEG, ps, gs, g_dtype, offs, sizes = _leaf_operands(rule, seg, layout, idx, p_leaves, g_leaves)
  target = _target(generate_quantized(rule, ps[0].dtype, g_dtype, tuple(kinds)))
  new_bufs, new_p, sums = _ffi(target, rule, S, SEG, bufs, ps, gs, offs, sizes)
  new_state, pos = [], 0
  for x in state:
    if quantization.is_quantized(x):
      new_state.append(quantization.QuantizedArray(new_bufs[pos], new_bufs[pos + 1], x.fmt,
                                                   x.block))
      pos += 2
    else:
      new_state.append(new_bufs[pos])
      pos += 1
  return new_p, tuple(new_state), sums


def _unavailable():
  if jax.default_backend() != "cpu":
    return (f"backend='native' runs on the CPU (jax's default backend is "
            f"{jax.default_backend()!r}); use backend='auto'")
  if not available():
    return ("backend='native' needs a C++ compiler and jaxlib's FFI headers; use backend='jnp' "
            "or 'auto'")
  return None


BACKENDS = {"native": common.Backend("native", run, supports=supports, unavailable=_unavailable,
                                     run_leaves=run_leaves, run_quantized=run_quantized)}
