"""An independent NumPy version of the anchors' blockwise quantization (bitsandbytes' 8-bit
dynamic map, torchao's scaled e4m3), for the low-bit state tests: the map rebuilt from
bitsandbytes' ``create_dynamic_map`` in float32 (as bitsandbytes computes it), nearest-value codes
by comparing with every float32 midpoint of the map (bitsandbytes' kernels' decision; a value at
a midpoint takes the upper code), e4m3 codes from ml_dtypes' cast."""
import ml_dtypes
import numpy as np

from fusedopt import quantization as Q

B = 256


def bnb_dynamic_map(signed):
  """bitsandbytes' create_dynamic_map(signed, 7, 8), computed in float32 as torch does."""
  data = []
  for i in range(7):
    k = 2 ** i if signed else 2 ** (i + 1)
    bounds = np.linspace(0.1, 1.0, k + 1, dtype=np.float32)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
    data += list(np.float32(10.0 ** (i - 6)) * means)
    if signed:
      data += list(-np.float32(10.0 ** (i - 6)) * means)
  data += [0.0, 1.0]
  return np.sort(np.asarray(data, np.float32))


def np_quantize(x, fmt):
  """Per block of B: absmax, y = x * (fmax / absmax), the nearest map value's index (decided
  at float32 midpoints, a value at one taking the upper) or the e4m3 rounding; returns (codes
  uint8, scales float32)."""
  xb = np.asarray(x, np.float32).reshape(-1, B)
  absmax = np.abs(xb).max(axis=1)
  fmax = np.float32(448.0 if fmt.is_fp8 else 1.0)
  with np.errstate(divide="ignore"):
    inv = np.where(absmax > 0, fmax / absmax, 0).astype(np.float32)
  y = np.clip(xb * inv[:, None], -fmax, fmax)
  if fmt.is_fp8:
    codes = y.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return codes.reshape(-1), (absmax * np.float32(1 / 448)).astype(np.float32)
  # the nearest map value, decided as bitsandbytes' kernels decide it: against the float32
  # midpoints (lo + hi) * 0.5f of neighbouring values (a value exactly at one takes the upper)
  table = Q.dynamic_map(fmt.name == "int8_signed")
  mids = (table[:-1] + table[1:]) * np.float32(0.5)
  codes = (y.reshape(-1, 1) >= mids[None, :]).sum(axis=1)
  return codes.astype(np.uint8), absmax


def np_dequantize(codes, scales, fmt):
  if fmt.is_fp8:
    v = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
  else:
    v = Q.dynamic_map(fmt.name == "int8_signed")[codes]
  return (v.reshape(-1, B) * scales[:, None]).reshape(-1)
