"""The implementations compared: optax.adamw per leaf, fusedopt Adam (native, jnp, pallas).

Each ``Impl`` has a step function whose first ``n_carry`` arguments are the donated training
state and whose last two are the gradient tree and the learning rate (a float32 array, so a
runtime value for every implementation); it returns the new carry.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fusedopt

# Hyper-parameters shared by every implementation (flax's Adam defaults, plus weight decay).
HP = dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
ALL_IMPLS = ("optax", "auto", "native", "jnp", "pallas")


def default_impls():
  """optax plus every fusedopt backend that runs on this machine (compiled, not interpreted)."""
  avail = fusedopt.available_backends()
  return tuple(i for i in ALL_IMPLS if i in ("optax", "auto") or i in avail)


def _adamw(lr):
  return optax.adamw(lr, b1=HP["b1"], b2=HP["b2"], eps=HP["eps"],
                     weight_decay=HP["weight_decay"])


class Optax:
  """``optax.adamw`` per leaf. The transformation is built inside the jitted step with the
  traced learning rate (its state does not depend on it), so lr is a runtime input as for
  fusedopt."""
  name = "optax"
  label = "optax.adamw (per-leaf)"
  n_carry = 2

  @staticmethod
  def step(params, opt_state, grads, lr):
    updates, opt_state = _adamw(lr).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def init(self, params):
    # jit: eager tx.init on thousands of distinct shapes would compile one op per shape.
    return params, jax.jit(_adamw(HP["learning_rate"]).init)(params)

  @staticmethod
  def params_of(carry):
    return carry[0]

  @staticmethod
  def first_moment(carry):
    """The first-moment tree (``mu``) of optax's ScaleByAdamState."""
    return carry[1][0].mu


class Fusedopt:
  """``fusedopt.Adam(...).create(params)`` stepped with ``opt.apply_gradient(g, learning_rate=lr)``."""
  n_carry = 1

  def __init__(self, backend):
    self.backend = backend
    self.name = backend
    self.label = f"fusedopt Adam backend={backend!r}"
    self.opt_def = fusedopt.Adam(learning_rate=HP["learning_rate"], beta1=HP["b1"],
                                 beta2=HP["b2"], eps=HP["eps"],
                                 weight_decay=HP["weight_decay"], backend=backend)

  @staticmethod
  def step(opt, grads, lr):
    return opt.apply_gradient(grads, learning_rate=lr)

  def init(self, params):
    # Optimizer is a pytree, so create() runs under jit (one compile for the whole tree).
    return (jax.jit(self.opt_def.create)(params),)

  @staticmethod
  def params_of(carry):
    return carry[0].target

  @staticmethod
  def first_moment(carry):
    """The first moment as host arrays of the leaves' shapes (sliced out of the flat buffer in
    numpy: eager per-leaf slicing on device would compile once per shape)."""
    st = carry[0].state.param_states
    layout = st.layout
    bufs = [np.asarray(b) for b in st.fields["grad_ema"]]
    leaves = [bufs[s.group][s.offset:s.offset + s.size].reshape(s.shape) for s in layout.segments]
    return jax.tree_util.tree_unflatten(layout.treedef, leaves)


def make(name):
  if name == "optax":
    return Optax()
  if name in ("auto", "native", "jnp", "pallas"):
    return Fusedopt(name)
  raise ValueError(f"unknown implementation {name!r}; expected one of {ALL_IMPLS}")


def lr_array():
  return jnp.asarray(HP["learning_rate"], jnp.float32)
