"""Per-tensor L2 norms for the layer-wise optimizers (LAMB, LARS)."""
import jax.numpy as jnp

F32 = jnp.float32


def l2(x):
  """||x||_2 over the whole tensor, accumulated in float32."""
  x = jnp.asarray(x).astype(F32)
  return jnp.sqrt(jnp.sum(x * x))


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
