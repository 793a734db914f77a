"""Low-bit optimizer state: blockwise 8-bit codes with one float32 scale per block.

A quantized state field of a flat group is a ``QuantizedArray``: ``codes`` (uint8, one per
element) and ``scales`` (float32, one per block of ``BLOCK`` elements). Element ``x`` of block
``b`` is stored as ``code = encode(x / scales[b])`` and read as ``decode(code) * scales[b]``.
Two formats (``Format``):

- ``int8``: the 8-bit *dynamic* map of Dettmers et al., "8-bit Optimizers via Block-wise
  Quantization" (2022, https://arxiv.org/abs/2110.02861), as bitsandbytes and torchao define it
  (``create_dynamic_map``): a signed map for fields of either sign (first moments), an unsigned
  one with twice the resolution for fields that are never negative (second moments). A code is
  the index of the map's value nearest to ``x / absmax``, decided as bitsandbytes' kernels
  decide it: against the float32 midpoints of neighbouring values (``thresholds``), a value at
  a midpoint taking the upper code; the scale is the block's absmax.
- ``float8_e4m3fn``: the block's values scaled so that its absmax is e4m3's largest finite value
  (448) and rounded to nearest-even e4m3 (torchao's ``AdamWFp8`` state); the code is the e4m3 bit
  pattern, the scale ``absmax * float32(1/448)``.

A block of zeros has scale 0 and the code of 0. Blocks never straddle two tensors: a quantized
group's segments start on multiples of ``BLOCK`` (``FlatLayout.build(..., quantize=...)``), and
tensors smaller than ``MIN_SIZE`` elements keep float32 state in groups of their own (the
anchors' threshold: their quantization error matters, their memory does not).

``encode``/``decode`` are written once on a small namespace of element operations (``take``
from a 256-entry table, ``where``, arithmetic), the blockwise reduction on whole blocks; the jnp
path uses them. The native kernels encode through ``bucket_table`` (one lookup instead of a
binary search), the same codes.
"""
import dataclasses
import functools
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
BLOCK = 256        # elements per scale (bitsandbytes' and torchao's block)
MIN_SIZE = 4096    # smaller tensors keep float32 state (bitsandbytes' min_8bit_size)
FP8_MAX = 448.0    # float8_e4m3fn's largest finite value


@dataclasses.dataclass(frozen=True)
class Format:
  """How a state field is stored: ``name`` is "int8_signed", "int8_unsigned" or
  "float8_e4m3fn"; ``code`` is the value of the map at each of the 256 codes (float32)."""
  name: str

  @property
  def is_fp8(self) -> bool:
    return self.name == "float8_e4m3fn"

  @property
  def fmax(self) -> float:
    """The largest magnitude a code represents: a block's absmax is scaled to it."""
    return FP8_MAX if self.is_fp8 else 1.0

  def __repr__(self):
    return f"Format({self.name})"


INT8_SIGNED = Format("int8_signed")
INT8_UNSIGNED = Format("int8_unsigned")
FLOAT8_E4M3 = Format("float8_e4m3fn")
FORMATS = {f.name: f for f in (INT8_SIGNED, INT8_UNSIGNED, FLOAT8_E4M3)}
# a small integer per format, stored in checkpoints next to the codes
FORMAT_IDS = {"int8_signed": 0, "int8_unsigned": 1, "float8_e4m3fn": 2}


def storage_kind(dtype):
  """``"int8"`` (the dynamic map), ``"float8_e4m3fn"`` (blockwise-scaled e4m3), or None for a
  plain float dtype, from a ``state_dtype`` value."""
  if isinstance(dtype, str) and dtype in ("int8", "float8_e4m3fn"):
    return dtype
  try:
    d = np.dtype(dtype)
  except TypeError:
    return None
  if d == np.dtype(np.int8):
    return "int8"
  if d == np.dtype(jnp.float8_e4m3fn):
    return "float8_e4m3fn"
  return None


def format_for(kind: str, nonnegative: bool) -> Format:
  """The format a field of ``kind`` uses: int8 fields that are never negative use the unsigned
  map."""
  if kind == "float8_e4m3fn":
    return FLOAT8_E4M3
  return INT8_UNSIGNED if nonnegative else INT8_SIGNED


# ----------------------------------------------------------------------------- the dynamic map

@functools.lru_cache(maxsize=None)
def dynamic_map(signed: bool) -> np.ndarray:
  """bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``, sorted, as
  float32 (computed in float64, rounded once; bitsandbytes computes in float32, so a value may
  differ from its by an ulp). For exponent ``i`` in 0..6, the means of consecutive points of
  ``linspace(0.1, 1, k + 1)`` scaled by ``10**(i - 6)``, with ``k = 2**i`` signed (and their
  negatives) or ``2**(i + 1)`` unsigned; then 0 and 1."""
  data = []
  for i in range(7):
    k = 2 ** i if signed else 2 ** (i + 1)
    bounds = np.linspace(0.1, 1.0, k + 1)
    means = (bounds[:-1] + bounds[1:]) / 2.0
    data += list(10.0 ** (i - 6) * means)
    if signed:
      data += list(-(10.0 ** (i - 6)) * means)
  data += [0.0, 1.0]
  assert len(data) == 256
  return np.sort(np.asarray(data, np.float64)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def thresholds(signed: bool) -> np.ndarray:
  """The 255 midpoints between consecutive map values (float32, from float64), then +inf: a
  value's code is the number of midpoints at or below it."""
  v = dynamic_map(signed).astype(np.float64)
  return np.append(((v[:-1] + v[1:]) / 2.0).astype(np.float32), np.float32(np.inf))


def zero_code(fmt: Format) -> int:
  """The code of 0.0 (what padding and a zero block hold)."""
  if fmt.is_fp8:
    return 0
  return int(np.flatnonzero(dynamic_map(fmt.name == "int8_signed") == 0.0)[0])


# ----------------------------------------------------------------------------- encode, decode

def encode(take, where, fmt: Format, y):
  """The code (float32 holding an integer 0..255) of ``y`` (``x * fmax / absmax``, within
  ``[-fmax, fmax]``): the dynamic map's nearest value's index by an 8-step branchless binary
  search over the midpoints (``take(table, index)`` reads a 256-entry table), as bitsandbytes
  and torchao search their map. fp8 codes are computed by the caller's dtype conversion."""
  assert not fmt.is_fp8
  thr = thresholds(fmt.name == "int8_signed")
  # the first comparison is against one constant (no lookup: XLA would fold a gather at a
  # constant index into a constant of the buffer's size)
  code = where(y >= thr[127], np.float32(128.0), np.float32(0.0))
  for step in (64, 32, 16, 8, 4, 2, 1):
    code = where(y >= take(thr, code + (step - 1)), code + step, code)
  return code


# Below 2^(BUCKET_EXPONENT - 127) (1.2e-7) every value has the code of 0: the maps' smallest
# magnitudes are 3.25e-7 (unsigned) and 5.5e-7 (signed), their midpoints with 0 above it.
BUCKET_EXPONENT = 104
NUM_BUCKETS = (128 - BUCKET_EXPONENT) * 128   # per sign: exponents 104..127, 7 mantissa bits


def bucket_code(xp, u, lookup):
  """``encode``'s codes of float32 values in ``[-1, 1]`` from their bits ``u`` (int32, the sign
  bit negative), through ``bucket_table``: the bucket is the sign, exponent and top 7 mantissa
  bits, with all magnitudes below ``2^(BUCKET_EXPONENT - 127)`` in one bucket and NaN in
  another; ``lookup(index)`` reads the table's entries, and one comparison of the low 16 bits
  finishes. ``xp``: NumPy or jax.numpy (the Pallas kernel); the native and Triton kernels
  compute the same in their own languages."""
  nb = NUM_BUCKETS
  t = xp.clip(((u & 0x7FFFFFFF) >> 16) - BUCKET_EXPONENT * 128, -1, nb)
  e = lookup(xp.where(u < 0, nb + 2, 0) + t + 1)
  return (e & 0xFF) + (xp.where((u & 0xFFFF) >= (e >> 9), 1, 0) ^ ((e >> 8) & 1))


@functools.lru_cache(maxsize=None)
def bucket_table(signed: bool) -> np.ndarray:
  """``encode`` as one lookup and integer arithmetic, for kernels that gather slowly (a
  vectorised gather costs about as much as the rest of an Adam step on a CPU). Per bucket, an
  int32 ``base | invert << 8 | split << 9``: ``base`` is the number of midpoints at or below the
  bucket's lowest value, and since no bucket holds two midpoints (checked here) one comparison
  of ``y``'s low 16 bits finishes: ``code = base + ((low16 >= split) ^ invert)``. A bucket
  without a midpoint has ``split = 2^16`` (never reached); with one at ``thr``, ``split`` is
  ``thr``'s low 16 bits (positive values: their bits grow with them) or those plus one with
  ``invert`` (negative values: ``y >= thr`` is ``low16 <= low16(thr)``). NaN's bucket gives code
  0, as the binary search does. int32 [2 * (NUM_BUCKETS + 2)], positive values first."""
  thr = thresholds(signed)[:255]
  count = lambda v: np.searchsorted(thr, v, side="right").astype(np.int64)  # noqa: E731
  never = np.int64(1 << 16)
  table = np.zeros((2, NUM_BUCKETS + 2), np.int64)
  for sign in (0, 1):
    top = (np.arange(BUCKET_EXPONENT * 128, 128 * 128, dtype=np.uint32) | (sign << 15)) << 16
    first, last = top.view(np.float32), (top | 0xFFFF).view(np.float32)
    lo, hi = (first, last) if sign == 0 else (last, first)
    base = count(lo)
    inside = count(hi) - base
    if np.any(inside > 1):
      raise AssertionError("a bucket holds two of the map's midpoints")
    low = (thr[np.minimum(base, 254)].view(np.uint32) & 0xFFFF).astype(np.int64)
    split = np.where(inside == 1, low + sign, never)
    invert = np.where(inside == 1, sign, 0)
    tiny = np.array([(BUCKET_EXPONENT << 23) - 1], np.uint32).view(np.float32)[0]
    tiny = np.float32(-tiny if sign else tiny)
    if count(tiny) != count(np.float32(-0.0 if sign else 0.0)):
      raise AssertionError("the tiny bucket's values do not share one code")
    table[sign, 0] = count(tiny) | never << 9
    table[sign, 1:NUM_BUCKETS + 1] = base | invert << 8 | split << 9
    table[sign, NUM_BUCKETS + 1] = never << 9   # NaN: code 0
  return table.reshape(-1).astype(np.int32)


def encode_by_buckets(table, y):
  """``encode``'s codes (int32) of float32 values ``y`` (NumPy) through ``bucket_table``: what
  the native kernels compute."""
  u = np.asarray(y, np.float32).view(np.int32)
  return bucket_code(np, u, lambda i: table[i]).astype(np.int32)


def decode(take, fmt: Format, code):
  """The map's value at ``code``."""
  assert not fmt.is_fp8
  return take(dynamic_map(fmt.name == "int8_signed"), code)


def _take(table, index):
  return jnp.take(jnp.asarray(table), index.astype(jnp.int32), mode="clip")


# ----------------------------------------------------------------------------- blocks

@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A quantized flat state buffer: ``codes`` uint8 [n] and ``scales`` float32 [n // block]
  (``n`` a multiple of ``block``), in ``fmt``. A pytree (codes, scales): it jits, donates and
  shards like two arrays."""
  codes: Any
  scales: Any
  fmt: Format
  block: int = BLOCK

  def tree_flatten(self):
    return (self.codes, self.scales), (self.fmt, self.block)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def shape(self) -> Tuple[int, ...]:
    return tuple(np.shape(self.codes))

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    return self.size + 4 * int(np.prod(np.shape(self.scales), dtype=np.int64))

  @staticmethod
  def zeros(n: int, fmt: Format, block: int = BLOCK) -> "QuantizedArray":
    if n % block:
      raise ValueError(f"a quantized buffer holds whole blocks of {block}; got {n} elements")
    return QuantizedArray(jnp.full((n,), zero_code(fmt), jnp.uint8),
                          jnp.zeros((n // block,), F32), fmt, block)

  def dequantize(self):
    """The values as float32 [n]."""
    return dequantize(self.codes, self.scales, self.fmt, self.block)

  def __repr__(self):
    return f"QuantizedArray({self.fmt.name}, {self.shape}, block={self.block})"


def dequantize(codes, scales, fmt: Format, block: int = BLOCK):
  """float32 values of ``codes`` (uint8, shape (..., n)) with per-block ``scales``."""
  n = codes.shape[-1]
  if fmt.is_fp8:
    v = jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn).astype(F32)
  else:
    v = decode(_take, fmt, codes.astype(F32))
  v = v.reshape(codes.shape[:-1] + (n // block, block))
  return (v * scales[..., None]).reshape(codes.shape)


def quantize(x, fmt: Format, block: int = BLOCK):
  """``(codes, scales)`` of float values ``x`` (shape (..., n), n a multiple of ``block``):
  per block, ``absmax = max |x|``, ``scale = absmax / fmax``, ``code = encode(x * (fmax /
  absmax))`` (the reciprocal once per block, as bitsandbytes; 0 for a zero block)."""
  x = jnp.asarray(x, F32)
  n = x.shape[-1]
  xb = x.reshape(x.shape[:-1] + (n // block, block))
  absmax = jnp.max(jnp.abs(xb), axis=-1)
  # NaN in a block makes its scale NaN (the block reads back NaN): XLA:CPU's vectorised row max
  # drops NaN (seen from 16 blocks on), so it is found apart, as the kernels do
  absmax = jnp.where(jnp.any(jnp.isnan(xb), axis=-1), F32(jnp.nan), absmax)
  inv = jnp.where(absmax > 0, fmt.fmax / absmax, 0.0).astype(F32)
  y = jnp.clip(xb * inv[..., None], -fmt.fmax, fmt.fmax)
  if fmt.is_fp8:
    codes = jax.lax.bitcast_convert_type(y.astype(jnp.float8_e4m3fn), jnp.uint8)
  else:
    codes = encode(_take, jnp.where, fmt, y).astype(jnp.uint8)
  # absmax times the float32 reciprocal of fmax (1/448), not a division: XLA rewrites division by
  # a constant into that product, so every backend computes this one
  scale = absmax * np.float32(1.0 / fmt.fmax) if fmt.is_fp8 else absmax
  return codes.reshape(x.shape), scale


def quantize_like(x, like: QuantizedArray) -> QuantizedArray:
  """``x`` (float [n]) quantized in ``like``'s format and block."""
  codes, scales = quantize(x, like.fmt, like.block)
  return QuantizedArray(codes, scales, like.fmt, like.block)


def kept(new: QuantizedArray, old: QuantizedArray, ok) -> QuantizedArray:
  """``new`` where the scalar ``ok`` is nonzero, else ``old`` bitwise (the checked step's skip:
  re-encoding the old values could move a code)."""
  keep = lambda a, b: jnp.where(ok != 0, a, b)  # noqa: E731
  return QuantizedArray(keep(new.codes, old.codes), keep(new.scales, old.scales), new.fmt,
                        new.block)


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedArray)


def leaf_of(buf: QuantizedArray, offset: int, size: int, shape) -> QuantizedArray:
  """The codes (shaped ``shape``) and the scales of the blocks of one segment
  (``offset`` a multiple of the block)."""
  b = buf.block
  codes = jax.lax.slice(buf.codes, (offset,), (offset + size,)).reshape(shape)
  nb = -(-size // b)
  scales = jax.lax.slice(buf.scales, (offset // b,), (offset // b + nb,))
  return QuantizedArray(codes, scales, buf.fmt, b)


def leaf_values(q: QuantizedArray):
  """A per-leaf ``QuantizedArray`` (``leaf_of``'s) as float32 values of its shape."""
  shape = q.shape
  n = q.size
  padded = -(-n // q.block) * q.block
  codes = jnp.ravel(q.codes)
  if padded != n:
    codes = jnp.concatenate([codes, jnp.full((padded - n,), zero_code(q.fmt), jnp.uint8)])
  return dequantize(codes, q.scales, q.fmt, q.block)[:n].reshape(shape)
