"""Schedule-free AdamW: Adam without momentum, made schedule-free by interpolation and averaging.

The params ``y`` are where the gradient is taken; ``z`` steps with the base optimizer (RMS-scaled
gradient plus decoupled weight decay, no momentum); ``x``, the average of the ``z`` iterates,
is the point to evaluate::

    v <- b2 v + (1-b2) |g|^2;              u = g / (sqrt(v / (1-b2^t)) + eps) + wd * y
    z' = z - lr * u;                       x = (y - (1-b1) z) / b1          (the old average)
    x' = (1 - c) x + c z';                 y' = b1 x' + (1-b1) z'

with the averaging weight ``c = w_t / sum_{i<=t} w_i``, ``w_t = max_{i<=t}(lr_i)^r`` (``r``:
``weight_lr_power``), a per-step scalar computed outside the kernel. Two state buffers (``v``,
``z``), as Adam's two moments: 28 B/param per step in float32. ``x`` is not stored; the point to
evaluate is ``(y - (1-b1) z) / b1`` (``optax.contrib.schedule_free_eval_params``).

Reference: Defazio et al., 2024, "The Road Less Scheduled", https://arxiv.org/abs/2405.15682;
optax.contrib.schedule_free_adamw (the base optimizer ``scale_by_rms(eps_in_sqrt=False,
bias_correction=True)`` + ``add_decayed_weights`` + the learning rate).
"""
import jax.numpy as jnp

from .elementwise import Rule
from .flat import bias_correction, f32

F32 = jnp.float32


def _fn(xp, s, q, y, g, v, z):
  del q
  v = s.b2 * v + s.one_minus_b2 * xp.abs_sq(g)
  u = g / (xp.sqrt(v / s.bias_corr2) + s.eps) + s.wd * y
  z_new = z - s.lr * u
  x = s.one_minus_ck * ((y - s.one_minus_b1 * z) / s.b1) + s.ck * z_new
  return s.b1 * x + s.one_minus_b1 * z_new, (v, z_new)


SCHEDULE_FREE_ADAMW_RULE = Rule(
    "schedule_free_adamw", _fn,
    ("lr", "b2", "one_minus_b2", "bias_corr2", "eps", "wd", "b1", "one_minus_b1", "ck",
     "one_minus_ck"), 2)


def averaging_weight(max_lr, weight_sum, lr, weight_lr_power):
  """``(c, new max_lr, new weight_sum)`` of one step, in the dtype of ``max_lr`` (optax's: the
  params' lowest float dtype): ``w = max(max_lr, lr)^r``, ``c = w / (weight_sum + w)``; ``c``
  is 0 while every learning rate so far is 0 (0/0: warmup's first step), NaN if ``w`` or the
  sum is NaN (optax's)."""
  max_lr = jnp.maximum(max_lr, jnp.asarray(lr, max_lr.dtype))
  weight = max_lr ** weight_lr_power
  total = weight_sum + weight
  c = jnp.where(jnp.isnan(weight) | jnp.isnan(total), jnp.full(weight.shape, jnp.nan),
                jnp.nan_to_num(weight / total, nan=0.0, posinf=jnp.inf))
  return c, max_lr, total


def schedule_free_scalars(learning_rate, beta1, beta2, eps, weight_decay, c, step):
  """The scalars of ``SCHEDULE_FREE_ADAMW_RULE`` at ``step`` (0-based) with averaging weight
  ``c``; ``1 - b1`` from the exact ``b1`` (a Python number), ``1 - c`` in float32 as optax."""
  c = jnp.asarray(c, F32)
  return {"lr": f32(learning_rate), "b2": f32(beta2), "one_minus_b2": f32(1. - beta2),
          "bias_corr2": bias_correction(beta2, step), "eps": f32(eps), "wd": f32(weight_decay),
          "b1": f32(beta1), "one_minus_b1": f32(1. - beta1), "ck": c, "one_minus_ck": 1.0 - c}


def eval_params(y, z, b1):
  """The point to evaluate, ``x = (y - (1-b1) z) / b1``, per leaf (optax's
  ``schedule_free_eval_params``)."""
  return (y - (1.0 - b1) * z) / b1
