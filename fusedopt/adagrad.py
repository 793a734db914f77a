"""Adagrad: ``G <- G + g^2;  p <- p - lr * g / (sqrt(G) + eps)``.

Reference: Duchi et al., https://jmlr.org/papers/v12/duchi11a.html.
"""
import functools
from typing import Any

from . import struct
from .elementwise import Rule
from .flat import FlatOptimizerDef, check_kinds, check_range, f32
from .flat_state import ParamState, param_state


@struct.dataclass
class _AdagradHyperParams:
  learning_rate: Any
  eps: Any


@param_state
class _AdagradParamState(ParamState):
  """Adagrad's per-parameter state (flax 0.5.3's fields)."""
  G: Any


@functools.lru_cache(maxsize=None)
def adagrad_rule(eps_in_sqrt: bool = False) -> Rule:
  """Adagrad's per-element update; ``eps_in_sqrt`` chooses optax's form (``optax.adagrad``'s
  ``scale_by_rss``, used by ``fusedopt.tx``):

      G <- G + g^2;   p <- p - lr * g / (sqrt(G) + eps)
      eps_in_sqrt:    p <- p - lr * (g / sqrt(G + eps))    (0 where G = 0)
  """
  def fn(xp, s, q, p, g, acc):
    del q
    acc = acc + xp.abs_sq(g)
    if eps_in_sqrt:
      # acc == 0 only where every gradient so far was 0, so g == 0 there: where(., ., g) gives 0
      return p - s.lr * xp.where(acc, g / xp.sqrt(acc + s.eps), g), (acc,)
    return p - s.lr * g / (xp.sqrt(acc) + s.eps), (acc,)

  return Rule("adagrad_eps_in_sqrt" if eps_in_sqrt else "adagrad", fn, ("lr", "eps"), 1)


ADAGRAD_RULE = adagrad_rule()


class Adagrad(FlatOptimizerDef):
  """Adagrad optimizer. State: ``G``."""
  state_fields = ("G",)
  nonnegative_fields = ('G',)
  param_state_class = _AdagradParamState

  def __init__(self, learning_rate=None, eps=1e-8, *, backend="auto", master_weights=False,
               state_dtype=None, stochastic_rounding=False, rounding_seed=0):
    super().__init__(_AdagradHyperParams(learning_rate, eps), backend,
                     master_weights=master_weights,
                     state_dtype=state_dtype,
                     stochastic_rounding=stochastic_rounding,
                     rounding_seed=rounding_seed)
    check_kinds(self.hyper_params, "learning_rate", "eps")

  def validate(self, hp):
    check_range(hp, "learning_rate", 0.0)
    check_range(hp, "eps", 0.0)

  def rule(self, hp):
    return ADAGRAD_RULE

  def scalars(self, hp, step):
    return {"lr": f32(hp.learning_rate), "eps": f32(hp.eps)}
