"""Adafactor: factored second moments (row/column statistics) with update clipping.

Reference: Shazeer & Stern, https://arxiv.org/abs/1804.04235. Semantics of flax 0.5.3.

Adafactor's statistics are per-tensor reductions over rows and columns, so it runs per leaf on the
tensors' own shapes (the element-wise part fuses inside XLA); its state is per leaf as in flax.
"""
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import norms, struct
from .elementwise import store
from .base import OptimizerDef
from .flat import BACKENDS, check_kinds, check_range
from .flat_state import ParamState, fields_of, param_state

F32 = jnp.float32


@struct.dataclass
class _AdafactorHyperParams:
  learning_rate: Optional[float]
  factored: bool
  multiply_by_parameter_scale: bool
  beta1: Optional[float]
  decay_rate: float
  step_offset: int
  clipping_threshold: Optional[float]
  weight_decay_rate: Optional[float]
  min_dim_size_to_factor: int
  epsilon1: float
  epsilon2: float


@param_state(master=False)
class _AdafactorParamState(ParamState):
  """Adafactor's per-parameter state (flax 0.5.3's fields). The unused ones are float32 zeros of
  shape (1,), as in flax: ``v_row``/``v_col`` unless factored, ``v`` when factored, ``m``
  without momentum (``beta1=None``)."""
  v_row: Any   # the factored second moment, its rows ...
  v_col: Any   # ... and columns
  v: Any       # the unfactored second moment
  m: Any       # the momentum (beta1)


# A parameter's state fields, in flax 0.5.3's order (its _AdafactorParamState dataclass).
_FIELDS = ("v_row", "v_col", "v", "m")
# The numeric hyper-parameters (real scalars, finite: checked at construction) and those that
# may be None (an optional feature that is off; the learning rate may come per step).
_NUMERIC = ("learning_rate", "beta1", "decay_rate", "step_offset", "clipping_threshold",
            "weight_decay_rate", "min_dim_size_to_factor", "epsilon1", "epsilon2")
_OPTIONAL = ("learning_rate", "beta1", "clipping_threshold", "weight_decay_rate")


class Adafactor(OptimizerDef):
  """Adafactor optimizer. Per-leaf state: ``v_row``, ``v_col``, ``v``, ``m``."""

  def __init__(self, learning_rate=None, factored=True, multiply_by_parameter_scale=True,
               beta1=None, decay_rate=0.8, step_offset=0, clipping_threshold=1.0,
               weight_decay_rate=None, min_dim_size_to_factor=128, epsilon1=1e-30,
               epsilon2=1e-3, dtype_momentum=jnp.float32, *, backend="auto"):
    if backend not in BACKENDS:
      raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    super().__init__(_AdafactorHyperParams(
        learning_rate, factored, multiply_by_parameter_scale, beta1, decay_rate, step_offset,
        clipping_threshold, weight_decay_rate, min_dim_size_to_factor, epsilon1, epsilon2))
    check_kinds(self.hyper_params, *_NUMERIC, optional=_OPTIONAL,
                allow_inf=("clipping_threshold",))
    self.dtype_momentum = jax.dtypes.canonicalize_dtype(dtype_momentum)
    self.backend = backend

  def flax_param_states(self, target, param_states):
    dicts = jax.tree_util.tree_map(lambda _, st: fields_of(st), target, param_states)
    return self.fields_in_order(target, dicts, _FIELDS)

  def from_flax_param_states(self, target, param_states, restored):
    return jax.tree_util.tree_map(lambda _, st: _AdafactorParamState.from_fields(st), target,
                                  restored)

  def _factored_dims(self, shape: Sequence[int]) -> Optional[Tuple[int, int]]:
    """The two largest axes (second largest first) if both are >= min_dim_size_to_factor."""
    if not self.hyper_params.factored or len(shape) < 2:
      return None
    sorted_dims = np.argsort(shape, kind="stable")
    if shape[sorted_dims[-2]] < self.hyper_params.min_dim_size_to_factor:
      return None
    return int(sorted_dims[-2]), int(sorted_dims[-1])

  def init_param_state(self, param):
    shape = jnp.shape(param)
    state = {k: jnp.zeros((1,), F32) for k in _FIELDS}
    dims = self._factored_dims(shape)
    if dims is not None:
      d1, d0 = dims
      state["v_row"] = jnp.zeros(np.delete(shape, d0), F32)
      state["v_col"] = jnp.zeros(np.delete(shape, d1), F32)
    else:
      state["v"] = jnp.zeros(shape, F32)
    if self.hyper_params.beta1 is not None:
      state["m"] = jnp.zeros(shape, self.dtype_momentum)
    return _AdafactorParamState(**state)

  def validate(self, hp):
    check_range(hp, "learning_rate", 0.0)
    check_range(hp, "beta1", 0.0, 1.0, hi_open=True, allow_none=True)
    # decay = 1 - t**-decay_rate: a negative rate gives a negative decay (a second moment that
    # changes sign); 0 keeps no history
    check_range(hp, "decay_rate", 0.0)
    check_range(hp, "step_offset")
    # inf: rms(y) / inf = 0, i.e. no clipping (as None)
    check_range(hp, "clipping_threshold", 0.0, lo_open=True, allow_none=True, allow_inf=True)
    check_range(hp, "weight_decay_rate", allow_none=True)
    check_range(hp, "min_dim_size_to_factor", 0.0)
    check_range(hp, "epsilon1", 0.0)
    check_range(hp, "epsilon2", 0.0)

  def validate_for_jit(self, hyper_params):
    self.validate(hyper_params)
    return True

  def apply_gradient(self, hyper_params, params, state, grads):
    self.validate(hyper_params)
    return super().apply_gradient(hyper_params, params, state, grads)

  def apply_param_gradient(self, step, hyper_params, param, state, grad):
    hp = hyper_params
    state = fields_of(state)   # an _AdafactorParamState, or a dict of its fields
    # float32 math; a complex leaf (fusedopt.tx, as optax) in complex64 with real |g|^2 statistics
    grad = norms.upcast(grad)
    p32 = norms.upcast(param)
    updates = {k: jnp.zeros((1,), F32) for k in _FIELDS}
    t = jnp.asarray(step - hp.step_offset, F32) + 1.0
    decay = 1.0 - t ** (-jnp.asarray(hp.decay_rate, F32))
    mixing = 1.0 - decay
    update_scale = hp.learning_rate
    if self.hyper_params.multiply_by_parameter_scale:
      update_scale *= jnp.maximum(jnp.sqrt(jnp.mean(norms.abs_sq(p32))), hp.epsilon2)
    grad_sqr = norms.abs_sq(grad) + hp.epsilon1
    dims = self._factored_dims(param.shape)
    if dims is not None:
      d1, d0 = dims
      new_v_row = decay * state["v_row"] + mixing * jnp.mean(grad_sqr, axis=d0)
      new_v_col = decay * state["v_col"] + mixing * jnp.mean(grad_sqr, axis=d1)
      updates["v_row"], updates["v_col"] = new_v_row, new_v_col
      reduced_d1 = d1 - 1 if d1 > d0 else d1
      row_col_mean = jnp.mean(new_v_row, axis=reduced_d1, keepdims=True)
      row_factor = (new_v_row / row_col_mean) ** -0.5
      col_factor = new_v_col ** -0.5
      y = grad * jnp.expand_dims(row_factor, axis=d0) * jnp.expand_dims(col_factor, axis=d1)
    else:
      new_v = decay * state["v"] + mixing * grad_sqr
      updates["v"] = new_v
      y = grad * new_v ** -0.5
    if hp.clipping_threshold is not None:
      y /= jnp.maximum(1.0, jnp.sqrt(jnp.mean(norms.abs_sq(y))) / hp.clipping_threshold)
    subtrahend = update_scale * y
    if hp.beta1 is not None:
      new_m = hp.beta1 * state["m"] + (1.0 - hp.beta1) * subtrahend
      subtrahend = new_m
      updates["m"] = store(new_m, self.dtype_momentum)
    if hp.weight_decay_rate is not None:
      new_param = (1.0 - hp.weight_decay_rate) * p32 - subtrahend
    else:
      new_param = p32 - subtrahend
    return new_param.astype(param.dtype), _AdafactorParamState(**updates)
