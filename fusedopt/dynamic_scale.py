"""Dynamic loss scaling for mixed-precision gradients (flax 0.5.3's ``flax.optim.DynamicScale``)."""
import functools
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import struct
from .base import HyperParamError
from .flat import HyperParamTypeError

__all__ = ["DynamicScale", "DynamicScaleResult"]

Array = Any


def _check_real(name, x, lo, valid, lo_open=False, hi=None, allow_inf=False):
  """A static DynamicScale setting: a real Python/NumPy number in its range (``valid``)."""
  if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
    raise HyperParamTypeError(f"DynamicScale {name}={x!r} must be a real number in {valid}")
  v = float(x)
  if (np.isnan(v) or (np.isinf(v) and not allow_inf) or (v <= lo if lo_open else v < lo)
      or (hi is not None and v > hi)):
    raise HyperParamError(f"DynamicScale {name}={v} is outside its valid range {valid}")


class DynamicScaleResult(NamedTuple):
  """What ``DynamicScale.value_and_grad(fun)(...)`` returns."""
  dynamic_scale: "DynamicScale"
  finite: Array
  aux: Any
  grad: Any


def _all_finite(tree: Any) -> Array:
  """Returns a scalar bool: whether every element of every leaf of ``tree`` is finite.

  One per-leaf ``all`` and a single reduction over their stack; concatenating the leaves
  first would materialise a copy of all gradients just to test them.
  """
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


class DynamicScale(struct.PyTreeNode):
  """Dynamic loss scaling for mixed-precision gradients.

  In float16 small gradients flush to zero and large ones overflow to infinity. Dynamic loss
  scaling multiplies the loss by the largest scale for which the gradients stay finite: the
  scale is multiplied by ``growth_factor`` after a run of finite steps and by
  ``backoff_factor`` on every non-finite step.

  ``value_and_grad`` mimics ``jax.value_and_grad`` and returns a ``DynamicScaleResult``
  ``(new_dynamic_scale, finite, value, grad)``. Non-finite gradients are returned as they are;
  skip the update yourself (a ``jnp.where`` is cheaper than a conditional on accelerators)::

    def loss_fn(p):
      return jnp.asarray(p, jnp.float16) ** 2
    p = jnp.array(1., jnp.float32)

    dyn_scale = DynamicScale(growth_interval=10)
    compute_grad = jax.jit(lambda ds, p: ds.value_and_grad(loss_fn)(p))
    for _ in range(100):
      dyn_scale, is_fin, loss, grad = compute_grad(dyn_scale, p)
      p += jnp.where(is_fin, 0.01 * grad, 0.)

  Improvement over flax 0.5.3: ``max_scale``. In 0.5.3 the scale grows without bound and can
  reach ``inf`` (after which every loss is ``inf`` and every step is skipped). With
  ``max_scale`` set, growth never takes the scale above ``max_scale`` (a scale already above
  it is not grown further; backoff is unaffected). With ``max_scale=None`` (the default) the
  behaviour is exactly 0.5.3's. It is the last field, so positional construction as in 0.5.3
  still works.

  Attributes:
    growth_factor: how much to grow the scale after a run of finite steps (static, 2.0).
    backoff_factor: how much to shrink the scale after a non-finite step (static, 0.5).
    growth_interval: the scale grows on a finite step that finds ``fin_steps ==
      growth_interval``, i.e. on the ``growth_interval + 1``-th finite step in a row
      (static, 2000).
    fin_steps: how many steps in a row have been finite since the last growth or backoff.
    scale: the current factor the loss is multiplied by (65536.0).
    max_scale: optional upper bound for growth (static, None: unbounded, as in 0.5.3).
  """
  growth_factor: float = struct.field(pytree_node=False, default=2.0)
  backoff_factor: float = struct.field(pytree_node=False, default=0.5)
  growth_interval: int = struct.field(pytree_node=False, default=2000)
  fin_steps: Array = 0
  scale: Array = 65536.0
  max_scale: Optional[float] = struct.field(pytree_node=False, default=None)

  def __post_init__(self):
    """Checks the settings (every construction, including pytree unflattening: cheap) and a
    ``scale`` given as a Python or NumPy number (a jax array -- the scale a step computed, which
    may legitimately reach 0 or inf as in 0.5.3 -- or a tracer is not inspected)."""
    _check_real("growth_factor", self.growth_factor, lo=1.0, valid="[1, inf)")
    _check_real("backoff_factor", self.backoff_factor, lo=0.0, lo_open=True, hi=1.0,
                valid="(0, 1]")
    gi = self.growth_interval
    if isinstance(gi, (bool, np.bool_)) or not isinstance(gi, (numbers.Integral, np.integer)):
      raise HyperParamTypeError(f"DynamicScale growth_interval={gi!r} must be an int >= 0")
    if gi < 0:
      raise HyperParamError(f"DynamicScale growth_interval={gi} must be >= 0")
    if self.max_scale is not None:
      _check_real("max_scale", self.max_scale, lo=0.0, lo_open=True, allow_inf=True,
                  valid="(0, inf] or None")
    scale = self.scale
    if isinstance(scale, (str, bytes, bool, np.bool_)):
      raise HyperParamTypeError(f"DynamicScale scale={scale!r} must be a real number")
    if isinstance(scale, (numbers.Number, np.ndarray, np.generic)):   # a host value
      a = np.asarray(scale)
      if not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)):
        raise HyperParamTypeError(f"DynamicScale scale={scale!r} must be a real number")
      a = a.astype(np.float64)
      if not np.all(np.isfinite(a) & (a > 0)):
        raise HyperParamError(f"DynamicScale scale={scale!r} must be positive and finite "
                              "(valid range (0, inf))")

  def value_and_grad(self, fun: Callable[..., Any],
                     argnums: Union[int, Sequence[int]] = 0,
                     has_aux: bool = False,
                     axis_name: Optional[str] = None,
                     ) -> Callable[..., DynamicScaleResult]:
    """Wraps ``jax.value_and_grad`` with loss scaling.

    Args:
      fun: function to differentiate; returns a scalar, or ``(scalar, aux)`` if ``has_aux``.
      argnums: int or sequence of ints, the positional arguments to differentiate.
      has_aux: whether ``fun`` returns ``(loss, aux)``.
      axis_name: if given, gradients are averaged over this mapped axis with ``lax.pmean``
        (before the finite check, so all replicas agree on it).
    Returns:
      A function of the same arguments as ``fun`` returning ``DynamicScaleResult(
      new_dynamic_scale, finite, value, grad)``: ``value`` is the unscaled loss (or
      ``(loss, aux)``), ``grad`` the unscaled float32 gradients.
    """
    @functools.wraps(fun)
    def scaled_fun(*args):
      out = fun(*args)
      if has_aux:
        return self.scale * out[0], out[1]
      return self.scale * out

    grad_fn = jax.value_and_grad(scaled_fun, argnums, has_aux)

    def scaled_grad_fn(*args):
      value, grad = grad_fn(*args)
      value = (value[0] / self.scale, value[1]) if has_aux else value / self.scale
      # Unscale in float32: a float16 gradient divided by 65536 would underflow.
      grad = jax.tree_util.tree_map(lambda g: jnp.asarray(g, jnp.float32) / self.scale, grad)
      if axis_name is not None:
        grad = lax.pmean(grad, axis_name)
      finite = _all_finite(grad)
      new_self = self._next_state(finite)
      return DynamicScaleResult(new_self, finite, value, grad)

    return scaled_grad_fn

  def update(self, finite: Array) -> "DynamicScale":
    """The next state after a step whose gradients were ``finite`` (fusedopt addition): for
    ``Optimizer.apply_gradient_checked``, which checks the gradients inside the update."""
    return self._next_state(jnp.asarray(finite))

  def _next_state(self, finite: Array) -> "DynamicScale":
    """The scale and fin_steps after a step whose gradients were ``finite``."""
    grow = self.fin_steps == self.growth_interval
    grown = self.scale * self.growth_factor
    if self.max_scale is not None:
      # max(scale, max_scale): growth must never be what lowers a scale above the bound.
      grown = jnp.minimum(grown, jnp.maximum(self.scale, self.max_scale))
    fin_scale = jnp.where(grow & finite, grown, self.scale)
    inf_scale = self.scale * self.backoff_factor
    new_scale = jnp.where(finite, fin_scale, inf_scale)
    new_fin_steps = jnp.where(grow | (~finite), 0, self.fin_steps + 1)
    return self.replace(fin_steps=new_fin_steps, scale=new_scale)
