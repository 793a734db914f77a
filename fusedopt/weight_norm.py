"""WeightNorm: run a wrapped optimizer on the (direction, scale) decomposition of each weight.

``w = s * v / ||v||`` with the norm over all axes but the last (the output axis). Leaves with
``size <= shape[-1]`` (biases, scalars) pass through to the wrapped optimizer unchanged in form.
Reference: Salimans & Kingma, https://arxiv.org/abs/1602.07868. Semantics of flax 0.5.3.
"""
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import struct
from .base import OptimizerDef
from .flat import check_range
from .flat_state import ParamState, param_state


@struct.dataclass
class _WeightNormHyperParams:
  inner: Any
  wn_decay: Any
  wn_eps: Any


@param_state(master=False)
class _WeightNormParamState(ParamState):
  """WeightNorm's per-parameter state in flax 0.5.3's form (its fields, in its order): the
  wrapped optimizer's state for the direction and for the scale, and those two params (for a
  leaf that is not decomposed: the param itself, and ``()`` as scale and scale state)."""
  direction_state: Any
  scale_state: Any
  direction: Any
  scale: Any


@struct.dataclass
class WeightNormState:
  """The wrapped optimizer's param_states over ``{'direction', 'scale'}``, plus those params.

  fusedopt keeps WeightNorm's state in this form (the wrapped optimizer's flat state runs over
  all directions and scales at once); ``per_leaf()`` gives flax 0.5.3's form, a tree mirroring
  the params of ``_WeightNormParamState``s, and ``state[key]`` reads like that tree."""
  inner: Any
  direction: Any
  scale: Any

  def per_leaf(self):
    """flax 0.5.3's per-leaf form: a tree mirroring the params, each leaf a
    ``_WeightNormParamState(direction_state, scale_state, direction, scale)``."""
    inner = self.inner.per_leaf() if hasattr(self.inner, "per_leaf") else self.inner
    return _per_leaf(self.direction, inner["direction"], inner["scale"], self.direction,
                     self.scale)

  def __getitem__(self, key):
    return self.per_leaf()[key]

  def __eq__(self, other):
    """As flax's equality of the per-leaf form (``FlatState.__eq__``'s convention): ``per_leaf()``
    compared with ``other`` (or with ``other.per_leaf()``); the same object is equal at once."""
    if other is self:
      return True
    if isinstance(other, WeightNormState):
      other = other.per_leaf()
    return self.per_leaf() == other


def _per_leaf(params, direction_state, scale_state, direction, scale):
  return jax.tree_util.tree_map(lambda _, *args: _WeightNormParamState(*args), params,
                                direction_state, scale_state, direction, scale)


def _components(params, param_states):
  """``(inner, direction, scale)`` of a WeightNorm state: fusedopt's ``WeightNormState``, or
  flax's per-leaf tree of ``_WeightNormParamState``s (``inner`` then the wrapped optimizer's
  per-leaf states as ``{'direction': ..., 'scale': ...}``)."""
  if isinstance(param_states, WeightNormState):
    return param_states.inner, param_states.direction, param_states.scale
  treedef = jax.tree_util.tree_structure(params)
  leaves = treedef.flatten_up_to(param_states)
  field = lambda k: treedef.unflatten([x[k] for x in leaves])  # noqa: E731
  return ({"direction": field("direction_state"), "scale": field("scale_state")},
          field("direction"), field("scale"))


def _decomposed(p):
  return p.size > p.shape[-1] if p.ndim else False


def _split(p, eps):
  if _decomposed(p):
    norms = jnp.sqrt(jnp.square(p).sum(tuple(range(p.ndim - 1)), keepdims=True) + eps)
    return p / norms, norms
  return p, ()


def _merge(direction, scale, eps):
  if _decomposed(direction):
    norm = jnp.square(direction).sum(tuple(range(direction.ndim - 1)), keepdims=True) + eps
    return direction * (scale * lax.rsqrt(norm))
  return direction


class WeightNorm(OptimizerDef):
  """Adds weight normalization to an optimizer definition."""

  def __init__(self, wrapped_optimizer, wn_decay=0, wn_eps=1e-8):
    super().__init__(_WeightNormHyperParams(wrapped_optimizer.hyper_params, wn_decay, wn_eps))
    self.wrapped_optimizer = wrapped_optimizer
    self.validate(self.hyper_params)

  def validate(self, hp):
    """``wn_decay`` and ``wn_eps``: real scalars (also when traced), finite and >= 0 when
    concrete (``wn_eps`` is added under the square root of each column's squared norm)."""
    check_range(hp, "wn_decay", 0.0)
    check_range(hp, "wn_eps", 0.0)

  def update_hyper_params(self, **hyper_param_overrides):
    decay = hyper_param_overrides.pop("wn_decay", self.hyper_params.wn_decay)
    eps = hyper_param_overrides.pop("wn_eps", self.hyper_params.wn_eps)
    inner = self.wrapped_optimizer.update_hyper_params(**hyper_param_overrides)
    hp = self.hyper_params.replace(inner=inner, wn_decay=decay, wn_eps=eps)
    self.validate(hp)
    return hp

  def init_state(self, params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    eps = self.hyper_params.wn_eps
    directions, scales = zip(*(_split(p, eps) for p in leaves)) if leaves else ((), ())
    direction = treedef.unflatten(directions)
    scale = treedef.unflatten(scales)
    state = self.wrapped_optimizer.init_state({"direction": direction, "scale": scale})
    return state.replace(param_states=WeightNormState(state.param_states, direction, scale))

  # -- checkpoints: flax 0.5.3 kept per leaf {direction_state, scale_state, direction, scale}
  def flax_param_states(self, target, param_states):
    wn_inner, wn_direction, wn_scale = _components(target, param_states)
    inner = self.wrapped_optimizer.flax_param_states(
        {"direction": wn_direction, "scale": wn_scale}, wn_inner)
    return jax.tree_util.tree_map(
        lambda _, ds, ss, d, s: {"direction_state": ds, "scale_state": ss, "direction": d,
                                 "scale": s},
        target, inner["direction"], inner["scale"], wn_direction, wn_scale)

  def from_flax_param_states(self, target, param_states, restored):
    treedef = jax.tree_util.tree_structure(target)
    per_leaf = treedef.flatten_up_to(restored)
    field = lambda k: treedef.unflatten([x[k] for x in per_leaf])  # noqa: E731
    direction, scale = field("direction"), field("scale")
    template_inner = _components(target, param_states)[0]
    inner = self.wrapped_optimizer.from_flax_param_states(
        {"direction": direction, "scale": scale}, template_inner,
        {"direction": field("direction_state"), "scale": field("scale_state")})
    if isinstance(param_states, WeightNormState):
      return WeightNormState(inner, direction, scale)
    return _per_leaf(target, inner["direction"], inner["scale"], direction, scale)

  def apply_gradient(self, hyper_params, params, state, grads):
    """With fusedopt's ``WeightNormState`` (``init_state``'s) or, as flax 0.5.3's functional
    form, a per-leaf tree of ``_WeightNormParamState``s (the wrapped optimizer then runs on its
    per-leaf states too); returns the state in the form it was given."""
    self.validate(hyper_params)
    per_leaf = not isinstance(state.param_states, WeightNormState)
    inner, wn_direction, wn_scale = _components(params, state.param_states)
    wn = WeightNormState(inner, wn_direction, wn_scale)
    eps, decay = hyper_params.wn_eps, hyper_params.wn_decay
    merge = lambda d, s: jax.tree_util.tree_map(lambda a, b: _merge(a, b, eps), d, s)
    p_def, g_def = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(grads)
    if p_def != g_def:
      raise ValueError(f"grads have a different tree structure than the target:\n"
                       f"  target: {p_def}\n  grads:  {g_def}")
    _, vjp_fn = jax.vjp(merge, wn.direction, wn.scale)
    dir_grad, scale_grad = vjp_fn(grads)
    dir_grad = jax.tree_util.tree_map(
        lambda d, g: g + decay * d if _decomposed(d) else g, wn.direction, dir_grad)
    new_wn, new_state = self.wrapped_optimizer.apply_gradient(
        hyper_params.inner, {"direction": wn.direction, "scale": wn.scale},
        state.replace(param_states=wn.inner), {"direction": dir_grad, "scale": scale_grad})
    direction, scale = new_wn["direction"], new_wn["scale"]
    if per_leaf:
      new_inner = new_state.param_states
      return merge(direction, scale), new_state.replace(param_states=_per_leaf(
          params, new_inner["direction"], new_inner["scale"], direction, scale))
    return merge(direction, scale), new_state.replace(
        param_states=WeightNormState(new_state.param_states, direction, scale))
