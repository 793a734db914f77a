"""Flax training objects whose step is ``fusedopt.tx``'s one fused pass.

optax's contract is two calls: ``update`` writes the updates ``p' - p``, ``apply_updates`` reads
them back and adds them to the params -- a pass over the params that a fused kernel, which
already computed ``p'``, does not need. These are Flax's own training objects with that step
replaced by ``fusedopt.tx.update_and_apply`` (the kernels write ``p'`` over ``p``); the state is
optax's, so they are drop-in replacements, and with any other optax transformation they run the
two calls as Flax does.

- ``TrainState``: ``flax.training.train_state.TrainState`` whose ``apply_gradients`` runs one
  pass. Donate it to the jitted step (``jax.jit(step, donate_argnums=0)``) for in-place updates.
- ``Optimizer``: ``flax.nnx.Optimizer`` whose ``update(model, grads)`` runs one pass.

Import cost: flax (linen's ``train_state`` and ``nnx``) and optax.
"""
from flax import nnx
from flax.training import train_state

from .tx import update_and_apply

__all__ = ["TrainState", "Optimizer"]


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` with a one-pass ``apply_gradients`` (its fields,
  ``create`` and serialization are Flax's)."""

  def apply_gradients(self, *, grads, **kwargs):
    """``step + 1``, and params and opt_state from ``update_and_apply(tx, grads, ...)``; Flax's
    ``OVERWRITE_WITH_GRADIENT`` collection is taken from ``grads`` as Flax does."""
    owg = train_state.OVERWRITE_WITH_GRADIENT
    if owg in grads:
      new_p, new_opt_state = update_and_apply(self.tx, grads["params"], self.opt_state,
                                              self.params["params"])
      new_p = {"params": new_p, owg: grads[owg]}
    else:
      new_p, new_opt_state = update_and_apply(self.tx, grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=new_p, opt_state=new_opt_state, **kwargs)


class Optimizer(nnx.Optimizer):
  """``flax.nnx.Optimizer`` with a one-pass ``update(model, grads)`` (its ``wrt``, ``step`` and
  ``opt_state`` are nnx's). Returns None where nnx returns the updates: there are none."""

  def update(self, model, grads, /, **kwargs):
    if kwargs:   # extra arguments (a line search): optax's two calls, as nnx
      return super().update(model, grads, **kwargs)
    params = nnx.as_pure(nnx.state(model, self.wrt, graph=self.graph))
    grads = nnx.as_pure(nnx.state(grads, self.wrt, graph=self.graph))
    opt_state = nnx.as_pure(self.opt_state)
    new_params, new_opt_state = update_and_apply(self.tx, grads, opt_state, params)
    nnx.update(model, new_params)
    nnx.update(self.opt_state, nnx.state(new_opt_state, graph=self.graph))
    self.step[...] += 1
    return None

