"""L2 norms without overflow: per tensor (LAMB, LARS) and global (the checked step's pre-pass)."""
import jax
import jax.numpy as jnp

F32 = jnp.float32


# Squares of x * 2**-80 cannot overflow float32 (|x| <= 3.4e38 -> 8e28, summed over < 2**32
# elements); used only where the plain sum of squares overflowed, i.e. some |x| >= ~1e19, so the
# elements this scaling flushes to zero could not change the norm anyway.
_SMALL = 2.0 ** -80


def abs_sq(x):
  """``|x|^2`` per element: ``x * x`` for real ``x``; ``re^2 + im^2`` (a real array) for complex
  ``x``, as optax's ``numerics.abs_sq`` (``(x.conj() * x).real``)."""
  if jnp.iscomplexobj(x):
    return (x.conj() * x).real
  return x * x


def upcast(x):
  """``x`` in the dtype the rules compute in: float32, or complex64 for a complex ``x`` (whose
  first moments are complex, its second moments ``|g|^2`` real)."""
  x = jnp.asarray(x)
  return x.astype(jnp.complex64 if jnp.iscomplexobj(x) else F32)


def sum_squares(x, axis=None):
  """(sum(|x|**2), sum(|x * 2**-80|**2)) in float32 over ``axis`` (default: all): two
  accumulators over one read of ``x`` (complex ``x``: ``abs_sq``)."""
  x = upcast(x)
  # a runtime scale: with a constant, XLA rewrites (x*c)*(x*c) as (x*x)*(c*c) = inf*0 = NaN
  small = jax.lax.optimization_barrier(F32(_SMALL))
  y = x * small
  return jnp.sum(abs_sq(x), axis=axis), jnp.sum(abs_sq(y), axis=axis)


def norm_from_sums(sq, sq_small):
  """The L2 norm from ``sum_squares``'s pair: ``sqrt(sq)``, or where that sum overflowed to inf,
  ``2**80 * sqrt(sq_small)`` (finite tensors of |x| ~ 1e20 have finite norms)."""
  return jnp.where(jnp.isinf(sq), jnp.sqrt(sq_small) / _SMALL, jnp.sqrt(sq))


def l2(x):
  """||x||_2 over the whole tensor, accumulated in float32, without overflow."""
  return norm_from_sums(*sum_squares(x))


def per_leaf(leaves):
  """[num_leaves] float32 vector of the leaves' norms (0 for an empty tree)."""
  if not leaves:
    return jnp.zeros((0,), F32)
  return jnp.stack([l2(x) for x in leaves])


def safe_ratio(num, den):
  """``num / den`` where both are positive, else 1.

  flax 0.5.3's LAMB used ``where(num + den > 0, num / den, 1)``: a zero update on a nonzero
  tensor gave ``inf * 0 = NaN`` and an all-zero tensor (a zero-initialised bias) got ratio 0 and
  never moved. This is the LAMB paper's and optax's convention instead.
  """
  ok = (num > 0) & (den > 0)
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 1.0)


# ----------------------------------------------------------------------------- the checked step

def gradient_prepass(g_leaves, grad_scale=None, clip_global_norm=None, reduce=None):
  """(all finite, global L2 norm of ``grad_scale * g``, the factor to multiply ``g`` by).

  Per leaf, XLA fuses the sums of squares and the finite test into one read of the gradient; no
  concatenated copy is made. Squares are summed in float32 after scaling, so a loss-scaled float16
  gradient does not overflow in the square, and beside them the squares of ``g * 2**-80``
  (``sum_squares``), so that finite gradients whose sum of squares overflows (|g| ~ 1e20)
  still have a finite norm: they are clipped, not skipped. ``reduce`` combines the float32
  [3] vector (sum of squares, scaled sum, count of non-finite elements) across devices (the
  sharded driver's psum over each device's slices); None: these leaves are all there is."""
  scale = F32(1.0) if grad_scale is None else jnp.asarray(grad_scale, F32)
  sq, sq_small, bad = [], [], []
  for g in g_leaves:
    x = upcast(g) * scale
    a, b = sum_squares(x)
    sq.append(a)
    sq_small.append(b)
    bad.append(jnp.sum((~jnp.isfinite(x)).astype(F32)))
  total = lambda xs: jnp.sum(jnp.stack(xs)) if xs else F32(0.0)  # noqa: E731
  totals = jnp.stack([total(sq), total(sq_small), total(bad)])
  if reduce is not None:
    totals = reduce(totals)
  return prepass_result(totals[2] == 0, norm_from_sums(totals[0], totals[1]), scale,
                        clip_global_norm)


def prepass_result(finite, norm, scale, clip_global_norm=None):
  """``gradient_prepass``'s (all finite, norm, g factor) from whether every element of
  ``scale * g`` is finite and its global norm. Only non-finite *elements* skip a step; the factor
  is ``scale`` times optax.clip_by_global_norm's (``max_norm / norm`` when ``norm`` exceeds
  ``clip_global_norm``, else 1)."""
  factor = scale
  if clip_global_norm is not None:
    max_norm = jnp.asarray(clip_global_norm, F32)
    factor = scale * jnp.where(norm < max_norm, F32(1.0), max_norm / norm)
  return finite, norm, factor
