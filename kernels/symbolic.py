"""Symbolic tracing of a ``Rule`` into kernel source: the machinery the generating backends share.

A rule's ``fn(xp, s, seg, p, g, *state)`` (``fusedopt.elementwise``) uses only arithmetic
operators and the ``xp`` functions, so calling it with ``Float``/``UInt`` values instead of arrays
records it: every operation appends one statement ``t<k> = <expr>`` to an ``Emitter`` and returns
the value named ``t<k>``. The statements come out in the order Python evaluates the rule, one
operation each, so the generated kernel performs exactly the jnp oracle's operations in the same
order (no reassociation, no fused expressions).

What differs between target languages is only spelling, which a ``Dialect`` supplies: the
statement form, literals, division, ``sqrt``, ``where``, the bitcasts and the uint32 conversion.
``fusedopt.kernels.native`` (C++) and ``fusedopt.kernels.triton`` (Triton-Python) each define one
and keep only their kernel templates.

Two value types:

- ``Float``: a float32 value. ``+ - * /``, unary ``-``; Python numbers become float32 literals.
- ``UInt``: a uint32 value (bit-level rule wrappers: stochastic rounding). ``+ - * ^ & | << >>``
  wrap modulo 2^32 and ``>>`` is logical, like jax's uint32; integer literals are reduced modulo
  2^32 and written as uint32 literals, so no operation is promoted to a signed or wider type.
"""
import dataclasses
import types
from typing import Callable, Optional, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dialect:
  """How one target language spells a traced rule's operations.

  Format fields: ``{name}``, ``{type}``, ``{expr}`` (``statement``); ``{a}``, ``{b}`` (binary
  operators, ``where``'s branches); ``{x}`` (unary functions); ``{c}`` and ``{zero}`` (``where``:
  its condition and the literal zero of the condition's type, since ``where`` takes "nonzero"
  as true for a float32 or a uint32 condition); ``{lit}`` and ``{type}`` (``constant``).
  """
  backend: str                       # names the backend in error messages
  float_type: str
  uint_type: str
  statement: str                     # one traced operation: "const {type} {name} = {expr};"
  float_literal: Callable[[float], str]  # a float32 value (as a Python float) -> literal text
  uint_literal: Callable[[int], str]     # 0 <= v < 2^32 -> literal text
  sqrt: str
  where: str
  bits: str                          # float32 -> uint32, bit pattern kept
  from_bits: str                     # uint32 -> float32, bit pattern kept
  u32: str                           # float32 (an integer value) -> uint32
  sign: str                          # -1, +1, or x itself for +-0 and NaN (as jnp.sign)
  maximum: str                       # NaN if either is NaN (as jnp.maximum), else the larger
  minimum: str                       # NaN if either is NaN (as jnp.minimum), else the smaller
  div: str = "{a} / {b}"
  # When set, literals are not written inline but declared once each as a named constant
  # ``c<k> = <constant>`` (``Emitter.consts``), e.g. Triton's ``tl.full([], {lit}, {type})``:
  # a typed scalar, so that a uint32 literal never promotes an operation to int32/int64.
  constant: Optional[str] = None


class Emitter:
  """The statements of one kernel body, in trace order, and its named constants: ``t<k>`` and
  ``c<k>``, or ``<prefix>t<k>`` and ``<prefix>c<k>`` for a second body in the same kernel."""

  def __init__(self, dialect: Dialect, prefix: str = ""):
    self.dialect = dialect
    self.prefix = prefix
    self.lines = []
    self.consts = {}   # key -> (name, expression), in order of first use (``dialect.constant``)

  def new(self, expr: str, cls=None):
    """Declares ``expr`` as the next statement; returns its value, of type ``cls`` (a ``Float``
    unless said otherwise)."""
    cls = cls or Float
    name = f"{self.prefix}t{len(self.lines)}"
    type_ = self.dialect.uint_type if cls is UInt else self.dialect.float_type
    self.lines.append(self.dialect.statement.format(name=name, expr=expr, type=type_))
    return cls(name, self)

  def operand(self, x, cls=None) -> str:
    """The text of an operand of type ``cls`` (``Float`` unless said otherwise): a value's name,
    or a number as a literal (float32, or an integer reduced modulo 2^32), named when the
    dialect declares constants."""
    cls = cls or Float
    if isinstance(x, cls):
      return x.name
    if isinstance(x, _Value):
      raise TypeError(f"{x.kind} value {x.name} used in a {cls.kind} operation; convert it with "
                      f"{cls.converts}")
    d = self.dialect
    if cls is UInt:
      v = int(x) & 0xFFFFFFFF
      key, lit, type_ = ("u32", v), d.uint_literal(v), d.uint_type
    else:
      v = float(np.float32(x))
      key, lit, type_ = np.float32(v).tobytes(), d.float_literal(v), d.float_type
    if d.constant is None:
      return lit
    if key not in self.consts:
      self.consts[key] = (f"{self.prefix}c{len(self.consts)}",
                          d.constant.format(lit=lit, type=type_))
    return self.consts[key][0]


class _Value:
  __array_priority__ = 1000
  __array_ufunc__ = None   # NumPy scalars on the left defer to the reflected operators

  def __init__(self, name, em):
    self.name, self.em = name, em

  def _bin(self, other, fmt):
    return self.em.new(fmt.format(a=self.name, b=self.em.operand(other, type(self))), type(self))

  def _rbin(self, other, fmt):
    return self.em.new(fmt.format(a=self.em.operand(other, type(self)), b=self.name), type(self))


def _binary(fmt):
  """An operator and its reflected form: ``fmt`` with ``{a}``, ``{b}`` the left, right operand."""
  return (lambda s, o: s._bin(o, fmt)), (lambda s, o: s._rbin(o, fmt))


class Float(_Value):
  """A float32 value of the kernel; each operator emits one statement."""
  kind, converts = "float32", "xp.from_bits"
  __add__, __radd__ = _binary("{a} + {b}")
  __sub__, __rsub__ = _binary("{a} - {b}")
  __mul__, __rmul__ = _binary("{a} * {b}")
  __truediv__ = lambda s, o: s._bin(o, s.em.dialect.div)
  __rtruediv__ = lambda s, o: s._rbin(o, s.em.dialect.div)
  __neg__ = lambda s: s.em.new(f"-{s.name}")
  __pos__ = lambda s: s


class UInt(_Value):
  """A uint32 value of the kernel (operators wrap modulo 2^32, ``>>`` is logical)."""
  kind, converts = "uint32", "xp.bits or xp.u32"
  __add__, __radd__ = _binary("{a} + {b}")
  __sub__, __rsub__ = _binary("{a} - {b}")
  __mul__, __rmul__ = _binary("{a} * {b}")
  __xor__, __rxor__ = _binary("{a} ^ {b}")
  __and__, __rand__ = _binary("{a} & {b}")
  __or__, __ror__ = _binary("{a} | {b}")
  __lshift__ = _binary("{a} << {b}")[0]
  __rshift__ = _binary("{a} >> {b}")[0]


def xp(em: Emitter):
  """The ``xp`` namespace a rule is traced with: ``sqrt``, ``where`` and the bit-level
  ``bits``/``from_bits``/``u32`` (``fusedopt.elementwise.JNP`` is its jnp counterpart)."""
  d = em.dialect

  def where(c, a, b):   # nonzero = true, for a float32 or a uint32 condition
    if isinstance(c, UInt):
      c, zero = c.name, em.operand(0, UInt)
    else:
      c, zero = em.operand(c), em.operand(0.0)
    return em.new(d.where.format(c=c, zero=zero, a=em.operand(a), b=em.operand(b)))

  return types.SimpleNamespace(
      sqrt=lambda x: em.new(d.sqrt.format(x=em.operand(x))),
      where=where,
      bits=lambda x: em.new(d.bits.format(x=em.operand(x)), UInt),
      from_bits=lambda u: em.new(d.from_bits.format(x=em.operand(u, UInt))),
      u32=lambda x: em.new(d.u32.format(x=em.operand(x)), UInt),
      sign=lambda x: em.new(d.sign.format(x=em.operand(x))),
      maximum=lambda a, b: em.new(d.maximum.format(a=em.operand(a), b=em.operand(b))),
      minimum=lambda a, b: em.new(d.minimum.format(a=em.operand(a), b=em.operand(b))),
      abs_sq=lambda x: x * x)   # kernels are real: |x|^2 is x * x, one traced multiply


def _namespaces(rule, em: Emitter, scalars, seg_scalars):
  s = types.SimpleNamespace(**{k: Float(e, em) for k, e in zip(rule.scalars, scalars)})
  q = types.SimpleNamespace(**{k: Float(e, em) for k, e in zip(rule.seg_scalars, seg_scalars)})
  return s, q


def _unsupported(rule, em, e):
  return NotImplementedError(
      f"the {em.dialect.backend} backend cannot generate rule {rule.name!r} ({e}); its emitter "
      "supports + - * /, sqrt, abs_sq, sign, maximum, minimum and where on float32 values, and "
      "bits/from_bits/u32 with the uint32 operators + - * ^ & | << >>")


def trace(rule, em: Emitter, scalars, seg_scalars, p, g, state):
  """Traces ``rule.fn`` and then ``rule.sumsq`` into ``em``.

  Args:
    scalars, seg_scalars: the kernel's expressions for ``rule.scalars`` / ``rule.seg_scalars``.
    p, g: the param and grad values (``Float``, or a number for an input that is not read).
    state: ``rule.n_state`` ``Float`` values.
  Returns:
    (new param value or None, tuple of new state values -- empty unless ``rule.writes_state`` --,
    tuple of ``rule.sumsq``'s terms -- empty without one), each term evaluated on the new state
    (the old one where the rule does not write it). A new state value that *is* its input value
    (the same ``Float``) is a field the rule passes through unchanged.
  """
  ns = xp(em)
  s, q = _namespaces(rule, em, scalars, seg_scalars)
  try:
    new_p, new_state = rule.fn(ns, s, q, p, g, *state)
    terms = ()
    if rule.sumsq is not None:
      terms = tuple(rule.sumsq(ns, s, q, p, g, *(new_state if rule.writes_state else state)))
  except AttributeError as e:   # an xp function or operator the emitter does not know
    raise _unsupported(rule, em, e) from e
  return new_p, (tuple(new_state) if rule.writes_state else ()), terms


def trace_terms(rule, em: Emitter, scalars, seg_scalars, p, g, state):
  """Traces ``rule.sumsq`` alone on the given state values (e.g. the state as stored after a
  lossy store, which is what a later stage reads); returns its terms."""
  s, q = _namespaces(rule, em, scalars, seg_scalars)
  try:
    return tuple(rule.sumsq(xp(em), s, q, p, g, *state))
  except AttributeError as e:
    raise _unsupported(rule, em, e) from e


_ANALYSIS = Dialect(
    backend="analysis", float_type="f", uint_type="u", statement="{name} = {expr}",
    float_literal=repr, uint_literal=str, sqrt="sqrt({x})", where="where({c}, {a}, {b})",
    bits="bits({x})", from_bits="from_bits({x})", u32="u32({x})", sign="sign({x})",
    maximum="maximum({a}, {b})", minimum="minimum({a}, {b})")


def passed_through(rule) -> Tuple[bool, ...]:
  """Per state field of ``rule``, whether ``rule.fn`` returns it unchanged (its input value
  itself; all True for a rule that does not write its state): e.g. LAMB's apply stage under
  master weights writes the master but passes the moments through. A lossy store (quantized
  state) must keep such a field's stored form rather than store its decoded value again."""
  em = Emitter(_ANALYSIS)
  state = [Float(f"st{k}", em) for k in range(rule.n_state)]
  if not rule.writes_state:
    return (True,) * rule.n_state
  _, new_state, _ = trace(dataclasses.replace(rule, sumsq=None), em,
                          [f"s{k}" for k in range(len(rule.scalars))],
                          [f"q{k}" for k in range(len(rule.seg_scalars))],
                          Float("p", em), Float("g", em), state)
  return tuple(new is old for new, old in zip(new_state, state))
