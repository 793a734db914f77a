"""Train a small MLP with ``flax.nnx.Optimizer`` and a fused fusedopt optimizer.

``fusedopt.tx.adamw`` is an ``optax.GradientTransformation``: ``nnx.Optimizer`` wraps its state
(optax's own structure: ``ScaleByAdamState(count, mu, nu)``, ...) into ``nnx.OptState``
variables like any optax state.
``optax.inject_hyperparams`` makes the learning rate part of the state, so it can be changed
between steps without recompiling. Runs on CPU in a few seconds::

  python examples/nnx_optimizer.py
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fusedopt import tx


class MLP(nnx.Module):
  def __init__(self, din, hidden, *, rngs):
    self.l1 = nnx.Linear(din, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.l1(x))
    x = jax.nn.relu(self.l2(x))
    return self.out(x)[..., 0]


def make_data(n=512, d=8, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.standard_normal((n, d)).astype(np.float32)
  y = (np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def main(steps=200, print_every=40):
  x, y = make_data()
  model = MLP(x.shape[1], 64, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, optax.inject_hyperparams(tx.adamw)(learning_rate=3e-3, weight_decay=1e-4),
      wrt=nnx.Param)
  losses = []
  for step in range(steps):
    if step == steps // 2:     # a runtime value in the state: no recompilation
      optimizer.opt_state.hyperparams["learning_rate"][...] = 1e-3
    losses.append(float(train_step(model, optimizer, x, y)))
    if step % print_every == 0 or step == steps - 1:
      print(f"step {step:4d}  loss {losses[-1]:.4f}")
  return losses


if __name__ == "__main__":
  main()
