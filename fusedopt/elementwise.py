"""Per-element optimizer math, written once, run by every backend.

An optimizer's update is a ``Rule``: a Python function of float32 *values*

    fn(xp, s, seg, p, g, *state) -> (new_p or None, (new_state, ...))

where ``s`` holds the step's global scalars (learning rate, betas, bias corrections — computed in
float32 by the optimizer, entering every backend as runtime values so schedules never recompile),
``seg`` holds per-segment (per-tensor) scalars such as LAMB/LARS trust ratios, and ``xp`` supplies
``sqrt``, ``sign`` (-1, +1, or ``x`` itself for +-0 and NaN, as ``jnp.sign``), ``maximum(a, b)``
and ``minimum(a, b)`` (NaN if either operand is, as ``jnp.maximum``/``jnp.minimum``),
``where(c, a, b)`` (c a scalar, nonzero = true) and ``abs_sq(x)`` (``|x|^2``: ``x * x``
in the kernels, which are real; real ``re^2 + im^2`` for a complex leaf on the per-leaf jnp path,
as optax squares complex gradients). It uses only arithmetic operators
and those (plus, for bit-level wrappers such as stochastic rounding, ``xp.bits(x)`` (float32 ->
uint32 bitcast), ``xp.from_bits(u)``, ``xp.u32(x)`` (float32 integer value -> uint32) and the
uint32 operators ``^ & | + - * << >>`` with wrap-around), so the same function is traced by
jax.numpy (the ``jnp`` backend and the per-leaf path), by Pallas/Triton kernels, and symbolically
into C++ by the ``native`` CPU backend (``fusedopt.kernels.native``).

This module holds the rule type, its wrappers (master weights, the checked step's guard, stochastic
rounding, per-tensor scalars, optax's deltas) and the per-leaf evaluation. Backends that run rules
over a layout's groups live in ``fusedopt.kernels`` (``kernels/registry.py``); the ``jnp`` one
(``kernels/jnp.py``) is the test oracle for every kernel.
"""
import dataclasses
import functools
import types
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import norms

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Rule:
  """An optimizer's per-element update (see the module docstring).

  Attributes:
    name: identifies the rule (and its static variant, e.g. ``momentum_nesterov``).
    fn: ``fn(xp, s, seg, p, g, *state) -> (new_p | None, tuple_of_new_state)``.
    scalars: names of the global scalars ``fn`` reads from ``s``.
    seg_scalars: names of the per-segment scalars ``fn`` reads from ``seg``.
    n_state: number of flat state buffers the rule reads and writes.
    writes_param: False for a pre-pass that only updates state (LAMB's moment stage).
    reads_grad: False for a rule that ignores ``g`` (LAMB's apply stage): kernels skip reading it.
    writes_state: False for a rule that returns its state unchanged (LAMB's apply stage): kernels
      skip writing it back.
    param_in_place: kernels write the new param over the old one (``input_output_aliases``;
      donate the params to avoid a copy). False for an output the caller keeps apart from the
      params (``as_delta``, optax's non-donated ``update``): a fresh buffer, no copy of p.
    sumsq: optional ``sumsq(xp, s, seg, p, g, *new_state) -> tuple of terms``. Executors return,
      per tensor, the sum of each term squared (LAMB's ||p||^2 and ||u||^2): kernel backends
      fuse it into the same pass as per-block partial sums; others evaluate it per leaf.
    real_state: for complex params, which state buffers hold real values (second moments,
      ``|g|^2``), where the rule does not write its state (LAMB's apply stage); None: inferred
      from the rule (``fusedopt.kernels.planes``).
  """
  name: str
  fn: Callable
  scalars: Tuple[str, ...]
  n_state: int
  seg_scalars: Tuple[str, ...] = ()
  writes_param: bool = True
  reads_grad: bool = True
  writes_state: bool = True
  sumsq: Optional[Callable] = None
  param_in_place: bool = True
  real_state: Optional[Tuple[bool, ...]] = None


@functools.lru_cache(maxsize=None)
def per_segment(rule: Rule) -> Rule:
  """``rule`` with every global scalar read per segment instead: one pass can then update
  tensors that belong to different optimizers of the same kind (MultiOptimizer), each with its
  own learning rate, betas, bias corrections."""
  fn, sumsq = rule.fn, rule.sumsq

  def seg_fn(xp, s, q, p, g, *state):
    del s
    return fn(xp, q, q, p, g, *state)

  def seg_sumsq(xp, s, q, p, g, *state):
    del s
    return sumsq(xp, q, q, p, g, *state)

  return dataclasses.replace(rule, name=rule.name + "_per_segment", fn=seg_fn, scalars=(),
                             seg_scalars=rule.scalars + rule.seg_scalars,
                             sumsq=None if sumsq is None else seg_sumsq)


@functools.lru_cache(maxsize=None)
def guarded(rule: Rule) -> Rule:
  """``rule`` with the gradient pre-pass folded in: ``g`` is multiplied by the scalar ``gscale``
  (1/loss-scale times the clip-by-global-norm factor) and, when the scalar ``ok`` is 0 (some
  gradient was not finite), params and state keep their old values -- a per-element select, so a
  skipped step changes nothing bitwise and needs no host synchronisation or extra buffer."""
  fn, sumsq = rule.fn, rule.sumsq

  def g_fn(xp, s, q, p, g, *state):
    new_p, new_state = fn(xp, s, q, p, g * s.gscale, *state)
    # a field the rule passes through stays that very value (``symbolic.passed_through``)
    keep = lambda new, old: old if new is old else xp.where(s.ok, new, old)  # noqa: E731
    return (None if new_p is None else keep(new_p, p),
            tuple(keep(n, o) for n, o in zip(new_state, state)))

  def g_sumsq(xp, s, q, p, g, *state):
    return sumsq(xp, s, q, p, g * s.gscale, *state)

  return dataclasses.replace(rule, name=rule.name + "_guarded", fn=g_fn,
                             scalars=rule.scalars + ("gscale", "ok"),
                             sumsq=None if sumsq is None else g_sumsq)


@functools.lru_cache(maxsize=None)
def with_master(rule: Rule) -> Rule:
  """``rule`` on a float32 master copy of the params, kept as the last state buffer: the math
  reads and updates the master, and the stored param is the master rounded to the param's dtype
  (bf16/f16 training without losing small updates to rounding). Adam on bf16 params: reads g
  (2 B) and master, m, v (12 B), writes them (12 B) and the bf16 param (2 B)."""
  fn, sumsq = rule.fn, rule.sumsq

  def m_fn(xp, s, q, p, g, *state):
    del p
    *st, master = state
    new_master, new_st = fn(xp, s, q, master, g, *st)
    if new_master is None:
      new_master = master
    if not rule.writes_state:
      new_st = st
    return new_master, tuple(new_st) + (new_master,)

  def m_sumsq(xp, s, q, p, g, *state):
    del p
    *st, master = state
    return sumsq(xp, s, q, master, g, *st)

  return dataclasses.replace(rule, name=rule.name + "_master", fn=m_fn, n_state=rule.n_state + 1,
                             writes_state=True, sumsq=None if sumsq is None else m_sumsq,
                             real_state=None if rule.real_state is None
                             else rule.real_state + (False,))


# ----------------------------------------------------------------------------- stochastic rounding

def fmix32(h):
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 with full avalanche. Operators only,
  so it runs on jnp uint32 arrays (host, jnp backend, Pallas kernels) and on the native backend's
  uint32 symbols alike."""
  h = h ^ (h >> 16)
  h = h * _U32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * _U32(0xC2B2AE35)
  return h ^ (h >> 16)


# uint32 constants >= 2^31 as NumPy scalars: jax rejects such Python ints (they parse as int32)
_U32 = np.uint32
ROUNDING_SCALARS = ("sr_hi", "sr_lo")


def rounding_seed_scalars(step, seed: int = 0) -> Dict[str, object]:
  """The per-step scalars of ``with_stochastic_rounding``: the 32-bit step seed
  ``fmix32(step + fmix32(seed))`` split into two float32 16-bit halves ``sr_hi``, ``sr_lo``.
  Exact small integers, not bit patterns, so no backend can flush or canonicalise them (a
  float32 scalar carrying raw bits could be a NaN or a denormal). Distinct steps give distinct
  seeds (fmix32 is a bijection); ``step`` may be traced."""
  u32 = jnp.uint32
  h = fmix32(jnp.asarray(step).astype(u32) + fmix32(u32(int(seed) % (1 << 32))))
  return {"sr_hi": (h >> 16).astype(F32), "sr_lo": (h & 0xFFFF).astype(F32)}


@functools.lru_cache(maxsize=None)
def with_stochastic_rounding(rule: Rule) -> Rule:
  """``rule`` with its new float32 param rounded *stochastically* to a bfloat16-representable
  value (Gupta et al. 2015, https://arxiv.org/abs/1502.02551; for bf16 training without a master
  copy: Zamirai et al. 2020, "Revisiting BFloat16 Training", https://arxiv.org/abs/2010.06192).
  With ``x = bits(new_p)`` (float32) and ``u`` 16 uniformly random bits::

      SR(x) = from_bits((x + u) & 0xFFFF0000)

  so ``x`` between bf16 neighbours ``a < x < a + ulp`` becomes ``a + ulp`` with probability
  ``(x - a) / ulp`` and ``a`` otherwise: ``E[SR(x)] = x`` exactly (the 16 dropped bits of ``x``
  are its fractional position). Sign-magnitude bits make it symmetric for negative values; a
  carry into the exponent is the correct next neighbour (and above bf16's largest finite value
  that neighbour is inf, with the same probability rule: round-to-nearest sends those values to
  inf too); +-inf stays inf; NaN is passed through unchanged (a NaN whose payload sits in the low
  16 bits would otherwise become inf). The bf16 store that follows is then exact.

  The random bits cost no memory traffic and no index input: ``u`` is the top 16 bits of a hash
  of values the kernel already holds -- the old param, the gradient (when the rule reads it), the
  old state, and the per-step seed (``rounding_seed_scalars``)::

      h = fmix32(bits(p) ^ seed);  h = (h ^ w) * 0x9E3779B1, h ^= h >> 15
          for w in bits(g), bits(state) & 0xFFFF0000, ...
      u = fmix32(h) >> 16

  For fixed data ``u`` is a bijection of the seed, so over seeds it is exactly uniform; every
  backend (jnp, Pallas, native C++, the per-leaf path) computes the same bits from the same
  inputs, and replicas of data-parallel training stay bitwise in sync without RNG state. The
  state enters without its low 16 bits, so backends whose state differs in the last bits (FMA
  contraction) still draw the same ``u``; their roundings differ only where the float32 value
  itself straddles ``u`` (about 2^-16 of such elements). Elements
  with bitwise-identical inputs in one step round the same way (correlated within that step, still
  unbiased). Only a rule that writes params changes; the scalars ``sr_hi``, ``sr_lo`` are added.
  """
  if not rule.writes_param:
    return rule
  fn = rule.fn

  def sr_fn(xp, s, q, p, g, *state):
    new_p, new_state = fn(xp, s, q, p, g, *state)
    seed = (xp.u32(s.sr_hi) << 16) | xp.u32(s.sr_lo)
    h = fmix32(xp.bits(p) ^ seed)
    # the state's low 16 bits are left out: they are where backends that contract multiply-adds
    # differently (XLA vs the IEEE native kernels) differ, and hashing them would make every such
    # element round independently on the two backends from then on
    words = (((xp.bits(g),) if rule.reads_grad else ())
             + tuple(xp.bits(v) & _U32(0xFFFF0000) for v in state))
    for w in words:
      h = (h ^ w) * _U32(0x9E3779B1)
      h = h ^ (h >> 15)
    u = fmix32(h) >> 16
    x = xp.bits(new_p)
    rounded = xp.from_bits((x + u) & _U32(0xFFFF0000))
    is_nan = (0x7F800000 - (x & 0x7FFFFFFF)) >> 31     # 1 iff |x| > inf as integers: NaN
    return xp.where(is_nan, new_p, rounded), new_state

  return dataclasses.replace(rule, name=rule.name + "_sr", fn=sr_fn,
                             scalars=rule.scalars + ROUNDING_SCALARS)


@functools.lru_cache(maxsize=None)
def as_delta(rule: Rule) -> Rule:
  """``rule`` whose param output is ``new_p - p`` (optax's update), written to a fresh buffer.

  For float32 params the subtraction is exact whenever ``p/2 <= new_p <= 2p`` (Sterbenz), so
  ``p + delta`` gives the fused result bitwise; for bf16/f16 params the delta would be rounded to
  the param dtype a second time, so callers use ``out_of_place`` there and subtract after the
  param rounding."""
  fn = rule.fn

  def d_fn(xp, s, q, p, g, *state):
    new_p, new_state = fn(xp, s, q, p, g, *state)
    return new_p - p, new_state

  return dataclasses.replace(rule, name=rule.name + "_delta", fn=d_fn, param_in_place=False)


@functools.lru_cache(maxsize=None)
def out_of_place(rule: Rule) -> Rule:
  """``rule`` with its new params written to a fresh buffer instead of over the params."""
  return dataclasses.replace(rule, name=rule.name + "_oop", param_in_place=False)


def _where(c, a, b):
  return jnp.where(c != 0, a, b)


def _bits(x):
  return jax.lax.bitcast_convert_type(jnp.asarray(x, F32), jnp.uint32)


def _from_bits(u):
  return jax.lax.bitcast_convert_type(jnp.asarray(u, jnp.uint32), F32)


def _u32(x):
  return jnp.asarray(x, F32).astype(jnp.uint32)


JNP = types.SimpleNamespace(sqrt=jnp.sqrt, where=_where, bits=_bits, from_bits=_from_bits,
                            u32=_u32, abs_sq=norms.abs_sq, sign=jnp.sign, maximum=jnp.maximum,
                            minimum=jnp.minimum)


def namespace(values: Dict[str, object]):
  return types.SimpleNamespace(**values)


def store(x, dtype):
  """``x`` in the storage ``dtype``. A complex value stored in a real dtype keeps its real part:
  optax creates a state field in an explicit real dtype (``accumulator_dtype``,
  ``dtype_momentum``) even for complex params, and casts into it."""
  if jnp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
    x = jnp.real(x)
  return x.astype(dtype)


def apply_to_leaf(rule: Rule, scalars, seg, p, g, state):
  """The per-leaf path: ``rule`` on one leaf (any shape), math in float32 (complex64 for a
  complex leaf: ``xp.abs_sq`` gives its real ``|g|^2``), results cast back."""
  s = namespace({k: jnp.asarray(scalars[k], F32) for k in rule.scalars})
  q = namespace({k: jnp.asarray(seg[k], F32) for k in rule.seg_scalars})
  new_p, new_state = rule.fn(JNP, s, q, norms.upcast(p), norms.upcast(g),
                             *(norms.upcast(x) for x in state))
  new_p = p if new_p is None else new_p.astype(p.dtype)
  return new_p, tuple(store(n, x.dtype) for n, x in zip(new_state, state))


@functools.lru_cache(maxsize=None)
def num_sumsq_terms(rule: Rule) -> int:
  """How many terms ``rule.sumsq`` returns (0 without one); traced abstractly, no computation."""
  if rule.sumsq is None:
    return 0
  z = jax.ShapeDtypeStruct((1,), F32)

  def count(*args):
    s = namespace({k: args[0][0] for k in rule.scalars})
    q = namespace({k: args[0][0] for k in rule.seg_scalars})
    return rule.sumsq(JNP, s, q, *args)
  return len(jax.eval_shape(count, *(z,) * (2 + rule.n_state)))


def leaf_sumsq(rule: Rule, scalars, seg, p, g, new_state):
  """Per-leaf ``rule.sumsq``: the sums of its terms squared, as float32 scalars."""
  s = namespace({k: jnp.asarray(scalars[k], F32) for k in rule.scalars})
  q = namespace({k: jnp.asarray(seg[k], F32) for k in rule.seg_scalars})
  terms = rule.sumsq(JNP, s, q, norms.upcast(p), norms.upcast(g),
                     *(norms.upcast(x) for x in new_state))
  return tuple(jnp.sum(norms.abs_sq(t)) for t in terms)
