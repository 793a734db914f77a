"""``ExactFloat``: a Python float hyper-parameter as a runtime value of a compiled step.

An eager ``Optimizer.apply_gradient(g, learning_rate=0.01 * i)`` runs one compiled step. Were
Python floats compile-time constants of it, every new value would compile a new step (a compile
per value, and one cache entry per value). As plain float32 runtime values they would
lose what float64 constants give: ``1 - 0.999`` rounded once (float32 ``0.999`` is 1.3e-5 off in
its complement) and the bias correction's ``log(beta)`` (``fusedopt.flat.bias_correction``).

So a Python float ``x`` enters the step as an ``ExactFloat``: float32 runtime scalars computed on
the host in float64 -- ``x`` itself, the residual ``x - float32(x)``, ``1 - x`` and
``log1p(-(1 - x))`` -- so that every operation the optimizers do with a hyper-parameter gives
the float32 numbers the constant would have given:

- ``f32(x)`` (``fusedopt.flat.f32``) and any operation with an array use ``float32(x)``, as a
  Python float constant of a float32 computation does;
- ``1 - x`` is the float32 of the float64 ``1 - x``; ``bias_correction`` uses the float64 log;
- ``x * y`` of two hyper-parameters (``learning_rate * weight_decay``) is a double-float product
  of the two (within an ulp of the float64 product's float32, which the constants gave).

Only its pytree structure reaches the compiled step's cache key, never its value.
"""
import numbers

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


@jax.tree_util.register_pytree_node_class
class ExactFloat:
  """A float64 host value as float32 runtime scalars (see the module docstring)."""

  __slots__ = ("hi", "lo", "one_minus", "log")
  __array_priority__ = 1000   # NumPy/jax arrays on the left defer to the reflected operators

  def __init__(self, hi, lo, one_minus, log):
    self.hi, self.lo, self.one_minus, self.log = hi, lo, one_minus, log

  @classmethod
  def of(cls, x: float) -> "ExactFloat":
    x = float(x)
    hi = np.float32(x)
    with np.errstate(all="ignore"):
      log = np.float32(np.log1p(-(1.0 - x)))
    return cls(hi, np.float32(x - float(hi)), np.float32(1.0 - x), log)

  def tree_flatten(self):
    return (self.hi, self.lo, self.one_minus, self.log), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)

  def __repr__(self):
    return f"ExactFloat({self.hi!r})"

  # a float32 scalar to code that checks what a hyper-parameter is
  shape, ndim, size = (), 0, 1
  dtype = np.dtype(np.float32)

  # -- the value as a float32 scalar, and the operations the optimizers use
  def value(self):
    return jnp.asarray(self.hi, F32)

  def _as_pair(self):
    return jnp.asarray(self.hi, F32), jnp.asarray(self.lo, F32)

  def __rsub__(self, other):
    if isinstance(other, numbers.Number) and float(other) == 1.0:
      return jnp.asarray(self.one_minus, F32)
    if isinstance(other, numbers.Number):
      hi, lo = self._as_pair()
      return (F32(other) - hi) - lo
    return other - self.value()

  def __sub__(self, other):
    if isinstance(other, ExactFloat):
      hi, lo = self._as_pair()
      ohi, olo = other._as_pair()
      return (hi - ohi) + (lo - olo)
    return self.value() - other

  def __mul__(self, other):
    if isinstance(other, ExactFloat):   # double-float product, rounded once more to float32
      hi, lo = self._as_pair()
      ohi, olo = other._as_pair()
      return hi * ohi + (hi * olo + lo * ohi)
    if isinstance(other, numbers.Number):
      hi, lo = self._as_pair()
      return hi * F32(other) + lo * F32(other)
    return self.value() * other

  __rmul__ = __mul__

  def __add__(self, other):
    if isinstance(other, ExactFloat):
      hi, lo = self._as_pair()
      ohi, olo = other._as_pair()
      return (hi + ohi) + (lo + olo)
    return self.value() + other

  __radd__ = __add__

  def __truediv__(self, other):
    return self.value() / (other.value() if isinstance(other, ExactFloat) else other)

  def __rtruediv__(self, other):
    return other / self.value()

  def __neg__(self):
    return -self.value()

  def __pow__(self, other):
    return self.value() ** other

  def __lt__(self, other):
    return self.value() < _plain(other)

  def __le__(self, other):
    return self.value() <= _plain(other)

  def __gt__(self, other):
    return self.value() > _plain(other)

  def __ge__(self, other):
    return self.value() >= _plain(other)


def _plain(x):
  return x.value() if isinstance(x, ExactFloat) else x


def plain(tree):
  """``tree`` with every ``ExactFloat`` replaced by its float32 value: for code that hands
  hyper-parameters to ``jnp`` functions directly (Adafactor, a user's own OptimizerDef)."""
  return jax.tree_util.tree_map(_plain, tree, is_leaf=lambda x: isinstance(x, ExactFloat))
