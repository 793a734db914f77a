"""Complex leaves on the real kernels: a complex group runs as real and imaginary planes.

The kernels read and write real buffers. A rule on complex params (``fusedopt.tx``, as optax:
complex first moments, real second moments ``|g|^2``) runs on them *lifted*: every complex
buffer enters as two float32 planes ``x.re``, ``x.im``, and the rule's own function is traced
once more with ``CVal`` values, pairs of the kernel's real values, so each complex operation is
written out as the real operations that define it::

    (a + bi) + (c + di) = (a + c) + (b + d)i        r (a + bi) = ra + rbi       (r real)
    (a + bi)(c + di)    = (ac - bd) + (ad + bc)i    (a + bi) / r = a/r + (b/r)i
    |a + bi|^2          = a^2 + b^2  (real)         sign(a + bi) = (a + bi) / |a + bi|

A value known to be real carries no imaginary plane (``CVal.im is None``), so real arithmetic
stays real and costs nothing extra. Which state buffers are real is inferred from the rule:
assume every field real, trace, and drop those whose new value comes out complex, until nothing
changes (Adam: ``mu`` complex, ``nu`` real). Their imaginary parts are 0 in optax's state and
are stored as 0. A rule that does not write its state (LAMB's apply stage) says which fields
are real (``Rule.real_state``); a field stored in a real dtype (optax's explicit
``accumulator_dtype``) is real and keeps the real part, as optax's cast does.

``sqrt``, ``maximum`` and ``minimum`` of a complex value, and division by one, raise
``NotLiftable`` (no rule needs them: they apply to second moments, which are real); the
registry then runs that group on jnp with a warning. ``sign`` of a complex value is
``z / |z|`` (0 at 0), with ``|z|`` computed on ``z`` scaled by ``max(|re|, |im|)`` so that it
neither overflows nor underflows.

The planes are a split and a merge per buffer (XLA fusions around the kernel): on a kernel
backend a complex group costs those extra passes, so ``backend="auto"`` runs complex groups on
jnp, one fusion per leaf (``registry.auto_leaf_choice``). An explicit kernel backend runs them on
the kernels, with the same rule, as it runs the real groups.
"""
import dataclasses
import functools
import types
import warnings
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fusedopt import elementwise
from fusedopt.kernels import common
from fusedopt.layout import FlatLayout

F32 = jnp.float32


class NotLiftable(ValueError):
  """A rule uses an operation on complex values that the planes do not express."""


def _unsupported(what):
  raise NotLiftable(f"it takes the {what} of a complex value")


@dataclasses.dataclass(frozen=True, eq=False)
class CVal:
  """A complex value as real kernel values ``re`` and ``im`` (None: the value is real)."""
  re: Any
  im: Any = None

  __array_priority__ = 2000
  __array_ufunc__ = None

  @staticmethod
  def of(x) -> "CVal":
    return x if isinstance(x, CVal) else CVal(x)

  def __add__(self, o):
    o = CVal.of(o)
    return CVal(self.re + o.re, _add_im(self.im, o.im))

  __radd__ = __add__

  def __sub__(self, o):
    o = CVal.of(o)
    return CVal(self.re - o.re, _add_im(self.im, None if o.im is None else -o.im))

  def __rsub__(self, o):
    return CVal.of(o) - self

  def __neg__(self):
    return CVal(-self.re, None if self.im is None else -self.im)

  def __pos__(self):
    return self

  def __mul__(self, o):
    o = CVal.of(o)
    if self.im is None and o.im is None:
      return CVal(self.re * o.re)
    if o.im is None:
      return CVal(self.re * o.re, self.im * o.re)
    if self.im is None:
      return CVal(self.re * o.re, self.re * o.im)
    return CVal(self.re * o.re - self.im * o.im, self.re * o.im + self.im * o.re)

  __rmul__ = __mul__

  def __truediv__(self, o):
    o = CVal.of(o)
    if o.im is not None:
      _unsupported("quotient by")
    return CVal(self.re / o.re, None if self.im is None else self.im / o.re)

  def __rtruediv__(self, o):
    return CVal.of(o) / self


def _add_im(a, b):
  if a is None:
    return b
  return a if b is None else a + b


def _real(x, what):
  x = CVal.of(x)
  if x.im is not None:
    _unsupported(what)
  return x.re


def dialect(xp):
  """The ``xp`` namespace of a lifted rule over ``xp``'s real values."""
  def where(c, a, b):
    c, a, b = _real(c, "a condition"), CVal.of(a), CVal.of(b)
    im = None if a.im is None and b.im is None else xp.where(
        c, 0.0 if a.im is None else a.im, 0.0 if b.im is None else b.im)
    return CVal(xp.where(c, a.re, b.re), im)

  def sign(x):
    x = CVal.of(x)
    if x.im is None:
      return CVal(xp.sign(x.re))
    # |z| of z scaled by m = max(|re|, |im|): no overflow or underflow in re^2 + im^2
    m = xp.maximum(xp.sign(x.re) * x.re, xp.sign(x.im) * x.im)
    a, b = xp.where(m, x.re / m, x.re), xp.where(m, x.im / m, x.im)
    r = xp.sqrt(a * a + b * b)
    return CVal(xp.where(m, a / r, x.re), xp.where(m, b / r, x.im))

  def abs_sq(x):
    x = CVal.of(x)
    if x.im is None:
      return CVal(xp.abs_sq(x.re))
    return CVal(x.re * x.re + x.im * x.im)

  def real_only(name):
    f = getattr(xp, name)
    return lambda *args: CVal(f(*(_real(a, name) for a in args)))

  return types.SimpleNamespace(
      where=where, sign=sign, abs_sq=abs_sq, sqrt=real_only("sqrt"),
      maximum=real_only("maximum"), minimum=real_only("minimum"),
      bits=real_only("bits"), from_bits=real_only("from_bits"), u32=real_only("u32"))


# ----------------------------------------------------------------------------- the lifted rule

@dataclasses.dataclass(frozen=True)
class Plan:
  """How a rule's buffers map to planes: ``real[j]`` (state field ``j`` is real: one plane) and
  ``terms[k]`` (``sumsq`` term ``k`` is complex: two planes whose squares add up)."""
  real: Tuple[bool, ...]
  terms: Tuple[bool, ...]


def _cvals(planes, real):
  """The state fields as ``CVal``s from their planes (one plane for a real field, two else)."""
  out, k = [], 0
  for r in real:
    out.append(CVal(planes[k]) if r else CVal(planes[k], planes[k + 1]))
    k += 1 if r else 2
  return out


def _planes(values, real, old):
  """The new state fields as planes; a real field keeps only its real part. ``old``: a complex
  field whose new value came out real keeps its old imaginary plane (not reached for inferred
  fields: their new values are complex by construction)."""
  out, k = [], 0
  for v, r in zip(values, real):
    v = CVal.of(v)
    out.append(v.re)
    if not r:
      out.append(old[k + 1] if v.im is None else v.im)
    k += 1 if r else 2
  return out


def _wrap(ns):
  return types.SimpleNamespace(**{k: CVal(v) for k, v in vars(ns).items()})


def _trace(rule, xp, real, s, q, p, g, state):
  """``rule.fn`` (and ``rule.sumsq`` on its result) on ``CVal``s: (new p, new state fields,
  sumsq terms)."""
  cx, s, q = dialect(xp), _wrap(s), _wrap(q)
  fields = _cvals(state, real)
  new_p, new_state = rule.fn(cx, s, q, p, g, *fields)
  terms = ()
  if rule.sumsq is not None:
    terms = tuple(CVal.of(t) for t in rule.sumsq(
        cx, s, q, p, g, *(new_state if rule.writes_state else fields)))
  return new_p, tuple(CVal.of(v) for v in new_state), terms


@functools.lru_cache(maxsize=None)
def plan(rule: elementwise.Rule, stored_real: Tuple[bool, ...]) -> Plan:
  """The rule's ``Plan`` for complex params whose state fields are stored in a real dtype where
  ``stored_real`` says so. Raises ``NotLiftable`` (see the module docstring)."""
  if rule.real_state is not None:
    real = tuple(a or b for a, b in zip(rule.real_state, stored_real))
  elif not rule.writes_state:
    real = stored_real
  else:
    real = (True,) * rule.n_state
  z = jax.ShapeDtypeStruct((1,), F32)
  result = {}

  def probe(*planes):
    s = elementwise.namespace({k: planes[0] for k in rule.scalars})
    q = elementwise.namespace({k: planes[0] for k in rule.seg_scalars})
    _, new_state, terms = _trace(rule, elementwise.JNP, real, s, q, CVal(planes[0], planes[1]),
                                 CVal(planes[0], planes[1]), planes[2:])
    result["complex"] = tuple(v.im is not None for v in new_state)
    result["terms"] = tuple(t.im is not None for t in terms)
    return planes[0]

  while True:   # the largest set of fields that stay real when assumed real
    jax.eval_shape(probe, *(z,) * (2 + sum(1 if r else 2 for r in real)))
    if not rule.writes_state or rule.real_state is not None:
      return Plan(real, result["terms"])
    new = tuple(r and (keep or not c) for r, c, keep in
                zip(real, result["complex"], stored_real))
    if new == real:
      return Plan(real, result["terms"])
    real = new


@functools.lru_cache(maxsize=None)
def lift(rule: elementwise.Rule, stored_real: Tuple[bool, ...]) -> elementwise.Rule:
  """``rule`` over planes. Its param and grad are the real planes; its state is the param's and
  the grad's imaginary planes, then each field's plane(s) (``plan``); its ``sumsq`` terms are
  the real and imaginary planes of the complex terms. Writes its state (the param's imaginary
  plane is state)."""
  pl = plan(rule, stored_real)
  if rule.sumsq is not None and rule.writes_param:   # its terms would see the new p's im plane
    raise NotLiftable("it returns per-tensor sums and writes its param in one pass")

  def fn(xp, s, q, p_re, g_re, p_im, g_im, *planes):
    p = CVal(p_re, p_im)
    new_p, new_state, _ = _trace(rule, xp, pl.real, s, q, p, CVal(g_re, g_im), planes)
    if not rule.writes_state:
      new_state = _cvals(planes, pl.real)
    if new_p is None:
      new_p = p
    new_p = CVal.of(new_p)
    if new_p.im is None:
      raise NotLiftable("its new param is real")
    out = _planes(new_state, pl.real, planes)
    return (new_p.re if rule.writes_param else None), (new_p.im, g_im, *out)

  def sumsq(xp, s, q, p_re, g_re, p_im, g_im, *planes):   # planes: the new state's
    terms = rule.sumsq(dialect(xp), _wrap(s), _wrap(q), CVal(p_re, p_im), CVal(g_re, g_im),
                       *_cvals(planes, pl.real))
    return tuple(x for t in map(CVal.of, terms)
                 for x in ((t.re,) if t.im is None else (t.re, t.im)))

  n = 2 + sum(1 if r else 2 for r in pl.real)
  return dataclasses.replace(
      rule, name=rule.name + "_planes", fn=fn, n_state=n, writes_state=True, reads_grad=True,
      real_state=None, sumsq=None if rule.sumsq is None else sumsq)


def _real_dtype(dtype):
  return np.dtype(jnp.finfo(dtype).dtype)


def unsupported_dtype(backend: common.Backend, dtype) -> Optional[str]:
  """None where ``backend`` has kernels for the planes of a complex ``dtype``, else why not."""
  real = _real_dtype(dtype)
  if not backend.supports(real):
    return (f"backend={backend.name!r} has no {real.name} kernel for the planes of "
            f"{np.dtype(dtype).name}")
  return None


def on_planes(backend: common.Backend, fallback: common.Backend) -> common.Backend:
  """``backend`` for a complex group with per-leaf state (``Backend.run_leaves``): the leaves
  split into planes, ``lift(rule)`` run by ``backend`` over a float layout of the group's own
  leaves, the results merged back. A rule that cannot be lifted (``NotLiftable``) runs on
  ``fallback`` (jnp) with a warning."""
  inner = backend.leaf_runner()

  def run_leaves(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
    group = layout.groups[gi]
    members = list(group.segments)
    real = _real_dtype(group.dtype)
    stored_real = tuple(not jnp.iscomplexobj(leaves[0]) for leaves in state)
    try:
      if any(jnp.iscomplexobj(x) == r for leaves, r in zip(state, stored_real) for x in leaves):
        raise NotLiftable("a state field is complex for some leaves, real for others")
      lifted, pl = lift(rule, stored_real), plan(rule, stored_real)
    except NotLiftable as e:
      warnings.warn(f"backend={backend.name!r}: this complex group runs on the jnp backend: "
                    f"rule {rule.name!r} cannot run on real planes ({e})",
                    RuntimeWarning, stacklevel=2)
      return fallback.leaf_runner()(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state)
    sub = FlatLayout.build([jax.ShapeDtypeStruct(layout.segments[i].shape, real)
                            for i in members], align=layout.align)
    ps = [p_leaves[i] for i in members]
    gs = [jnp.asarray(g_leaves[i]).astype(group.dtype) for i in members]
    planes = [tuple(jnp.imag(x) for x in ps), tuple(jnp.imag(x) for x in gs)]
    for leaves, r in zip(state, pl.real):
      planes.append(tuple(jnp.real(x) for x in leaves))
      if not r:
        planes.append(tuple(jnp.imag(x) for x in leaves))
    idx = np.asarray(members)
    sub_seg = {k: jnp.asarray(v, F32)[idx] for k, v in seg.items()}
    out_p, new_planes, sums = inner(lifted, scalars, sub_seg, sub, 0,
                                    [jnp.real(x) for x in ps], [jnp.real(x) for x in gs],
                                    tuple(planes))
    new_p = None
    if rule.writes_param:
      new_p = [jax.lax.complex(r, i).astype(x.dtype)
               for r, i, x in zip(out_p, new_planes[0], ps)]
    new_state, k = [], 2
    for leaves, r in zip(state, pl.real):
      if not rule.writes_state:
        new_state.append(tuple(leaves))
      elif not jnp.iscomplexobj(leaves[0]):
        new_state.append(tuple(x.astype(o.dtype) for x, o in zip(new_planes[k], leaves)))
      elif r:
        new_state.append(tuple(jax.lax.complex(x, jnp.zeros_like(x)).astype(o.dtype)
                               for x, o in zip(new_planes[k], leaves)))
      else:
        new_state.append(tuple(jax.lax.complex(x, y).astype(o.dtype) for x, y, o in
                               zip(new_planes[k], new_planes[k + 1], leaves)))
      k += 1 if r else 2
    if sums is not None:
      out, j = [], 0
      for cplx in pl.terms:
        out.append(sums[j] + sums[j + 1] if cplx else sums[j])
        j += 2 if cplx else 1
      sums = tuple(out)
    return new_p, tuple(new_state), sums

  return dataclasses.replace(backend, run_leaves=run_leaves)


__all__ = ["CVal", "NotLiftable", "Plan", "dialect", "plan", "lift", "unsupported_dtype",
           "on_planes"]
