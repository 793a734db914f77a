"""A rule evaluated by NumPy in float32: one IEEE rounding per operation, no FMA contraction.

The kernels that promise CPU-independent results (native C++, Triton) are checked *bitwise*
against this: the same ``Rule.fn`` run on NumPy float32 arrays (NumPy 2's promotion keeps Python
numbers at float32 / uint32), and the per-tensor sums of squares added in the native kernel's
fixed order (``native_sums``).
"""
import types

import numpy as np

_F32, _U32 = np.float32, np.uint32


def _bits(x):
  return np.array(x, _F32).view(_U32)


def _from_bits(u):
  return np.array(u, _U32).view(_F32)


NPX = types.SimpleNamespace(
    sqrt=np.sqrt, where=lambda c, a, b: np.where(np.asarray(c) != 0, a, b),
    bits=_bits, from_bits=_from_bits, u32=lambda x: np.asarray(x, _F32).astype(_U32),
    abs_sq=lambda x: x * x,
    # jnp.sign's: x itself for +-0 and NaN (np.sign(-0.0) is +0.0)
    sign=lambda x: np.where(x > 0, _F32(1), np.where(x < 0, _F32(-1), x)),
    maximum=np.maximum, minimum=np.minimum)   # NaN-propagating, as jnp's


def scalars_ns(values):
  return types.SimpleNamespace(**{k: np.asarray(v, _F32) for k, v in values.items()})


def random_scalars(rule, rng, ok=1.0):
  """Values for ``rule.scalars`` drawn from ``rng`` (uniform in [0.05, 0.9]); the checked step's
  ``ok`` as given; stochastic rounding's seed halves as 16-bit integers."""
  from fusedopt import elementwise  # pylint: disable=import-outside-toplevel
  out = {k: _F32(rng.uniform(0.05, 0.9)) for k in rule.scalars}
  if "ok" in out:
    out["ok"] = _F32(ok)
  for k in elementwise.ROUNDING_SCALARS:
    if k in out:
      out[k] = _F32(rng.randint(0, 1 << 16))
  return out


def evaluate(rule, scalars, seg, p, g, state):
  """``rule.fn`` and ``rule.sumsq`` on float32 NumPy arrays of one tensor (``seg``: its
  per-segment scalars). Returns (new p or None, new state tuple, sumsq terms tuple)."""
  s, q = scalars_ns(scalars), scalars_ns(seg)
  f32 = lambda x: np.asarray(x, _F32)   # noqa: E731
  p, g, state = f32(p), f32(g), tuple(f32(x) for x in state)
  with np.errstate(all="ignore"):
    new_p, new_state = rule.fn(NPX, s, q, p, g, *state)
    new_state = tuple(new_state) if rule.writes_state else state
    terms = () if rule.sumsq is None else tuple(rule.sumsq(NPX, s, q, p, g, *new_state))
  return new_p, new_state, tuple(np.broadcast_to(f32(t), p.shape) for t in terms)


def native_sums(term, chunk, lanes):
  """The sum of ``term**2`` over one tensor in the native kernel's order: element ``j`` of a
  ``chunk``-element work item into float32 lane ``j % lanes`` in index order, lanes added
  0..lanes-1 in float32, work items in float64 in order, the total rounded to float32."""
  x = np.asarray(term, _F32).ravel()
  total = np.float64(0.0)
  with np.errstate(all="ignore"):
    sq = x * x
    for a in range(0, x.size, chunk):
      part = sq[a:a + chunk]
      acc = np.zeros(lanes, _F32)
      full = part.size // lanes * lanes
      for row in part[:full].reshape(-1, lanes):
        acc = acc + row
      acc[:part.size - full] = acc[:part.size - full] + part[full:]
      s = _F32(0.0)
      for v in acc:
        s = _F32(s + v)
      total += np.float64(s)
  return _F32(total)


def same_bits(a, b):
  """Bitwise equality of two float arrays of one dtype, NaN payloads aside (NaN where NaN)."""
  a, b = np.asarray(a), np.asarray(b)
  if a.dtype != b.dtype or a.shape != b.shape:
    return False
  fa, fb = a.astype(_F32), b.astype(_F32)
  nan = np.isnan(fa)
  if not np.array_equal(nan, np.isnan(fb)):
    return False
  return np.array_equal(a[~nan].view(np.uint8), b[~nan].view(np.uint8))
