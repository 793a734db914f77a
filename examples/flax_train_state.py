"""Train a small MLP with ``flax.training.train_state.TrainState`` and a fused fusedopt optimizer.

``fusedopt.tx.adamw`` is an ``optax.GradientTransformation``: ``TrainState`` uses it exactly as it
would ``optax.adamw`` (same arguments), while the update runs fusedopt's fused kernels over flat
state buffers. The learning rate is an optax schedule and gradient clipping is fused into the
update (``clip_global_norm``). Runs on CPU in a few seconds::

  python examples/flax_train_state.py
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

from fusedopt import tx


class MLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(1)(x)[..., 0]


def make_data(n=512, d=8, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.standard_normal((n, d)).astype(np.float32)
  y = (np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


@functools.partial(jax.jit, donate_argnums=0)     # donated: the state is updated in place
def train_step(state, x, y):
  def loss_fn(params):
    return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def main(steps=200, print_every=40):
  x, y = make_data()
  model = MLP()
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup_steps=20, decay_steps=steps)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=tx.adamw(schedule, weight_decay=1e-4, clip_global_norm=1.0))
  losses = []
  for step in range(steps):
    state, loss = train_step(state, x, y)
    losses.append(float(loss))
    if step % print_every == 0 or step == steps - 1:
      print(f"step {step:4d}  loss {losses[-1]:.4f}")
  return losses


if __name__ == "__main__":
  main()
