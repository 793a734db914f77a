"""A small transformer language model trained with float32, int8 and fp8 Adam state, side by side.

    python examples/tiny_lm.py                       # 400 steps, about 40 s on 2 CPU cores
    python examples/tiny_lm.py --steps 100 --plot lm.png

The text is generated here, so nothing is downloaded: a random order-2 Markov chain over a
vocabulary of 16 tokens (each pair of previous tokens allows three next ones, with Dirichlet
weights), whose entropy rate is the floor of any model's loss and is printed beside the losses.
The model is a two-layer decoder-only transformer (d=64, 4 heads, learned positions, pre-norm),
106K parameters. The tensors of at least 4096 elements (the blocks' matrices and the position
table: 97% of the parameters) get quantized Adam state (``fusedopt.quantization``); the token
embedding, the unembedding, biases and norms keep float32 state.

The three runs (``fusedopt.Adam(lr, state_dtype=...)``: None, "int8", jnp.float8_e4m3fn) start
from the same weights and see the same batches. The script reports each run's final loss (the
mean over the last 10% of the steps) and exits non-zero unless the int8 and fp8 runs reach the
float32 run's within ``--tolerance`` (relative, default 2%; one-sided: ending lower is fine). It
writes the curves to ``--plot``.
"""
import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import fusedopt

VOCAB, CONTEXT, WIDTH, HEADS, LAYERS = 16, 64, 64, 4, 2
STATES = {"float32": None, "int8": "int8", "float8_e4m3fn": jnp.float8_e4m3fn}


# ----------------------------------------------------------------------------- the text

def markov_chain(seed, vocab=VOCAB, fanout=3):
  """Next-token probabilities [vocab, vocab, vocab] of an order-2 chain: for each pair of
  previous tokens, ``fanout`` allowed next tokens with Dirichlet(1) weights."""
  rng = np.random.default_rng(seed)
  probs = np.zeros((vocab, vocab, vocab))
  for a in range(vocab):
    for b in range(vocab):
      nxt = rng.choice(vocab, fanout, replace=False)
      probs[a, b, nxt] = rng.dirichlet(np.ones(fanout))
  return probs


def entropy_rate(probs, n=200_000, seed=1):
  """The chain's entropy rate in nats per token (the stationary average of the next-token
  entropy, estimated along one long sample): the lowest loss a model can reach."""
  rng = np.random.default_rng(seed)
  with np.errstate(divide="ignore", invalid="ignore"):
    h = -np.nansum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=-1)
  a, b, total = 0, 1, 0.0
  for _ in range(n):
    total += h[a, b]
    a, b = b, rng.choice(probs.shape[-1], p=probs[a, b])
  return total / n


def sample_batches(probs, steps, batch, seed):
  """int32 [steps, batch, CONTEXT + 1] token sequences sampled from the chain."""
  rng = np.random.default_rng(seed)
  cum = np.cumsum(probs, axis=-1)
  seqs = np.zeros((steps * batch, CONTEXT + 1), np.int32)
  seqs[:, 0] = rng.integers(0, VOCAB, steps * batch)
  seqs[:, 1] = rng.integers(0, VOCAB, steps * batch)
  for t in range(2, CONTEXT + 1):
    u = rng.random(steps * batch)[:, None]
    c = cum[seqs[:, t - 2], seqs[:, t - 1]]
    seqs[:, t] = np.minimum((u > c).sum(axis=1), VOCAB - 1)
  return seqs.reshape(steps, batch, CONTEXT + 1)


# ----------------------------------------------------------------------------- the model

def init_params(seed):
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 4 + 4 * LAYERS))
  dense = lambda k, m, n: jax.random.normal(k, (m, n), jnp.float32) / np.sqrt(m)  # noqa: E731
  params = {"embed": jax.random.normal(next(keys), (VOCAB, WIDTH)) * 0.02,
            "pos": jax.random.normal(next(keys), (CONTEXT, WIDTH)) * 0.02,
            "out_norm": {"scale": jnp.ones(WIDTH), "bias": jnp.zeros(WIDTH)},
            "unembed": dense(next(keys), WIDTH, VOCAB)}
  for layer in range(LAYERS):
    params[f"block{layer}"] = {
        "norm1": {"scale": jnp.ones(WIDTH), "bias": jnp.zeros(WIDTH)},
        "qkv": dense(next(keys), WIDTH, 3 * WIDTH), "qkv_bias": jnp.zeros(3 * WIDTH),
        "proj": dense(next(keys), WIDTH, WIDTH) / np.sqrt(2 * LAYERS),
        "norm2": {"scale": jnp.ones(WIDTH), "bias": jnp.zeros(WIDTH)},
        "up": dense(next(keys), WIDTH, 4 * WIDTH), "up_bias": jnp.zeros(4 * WIDTH),
        "down": dense(next(keys), 4 * WIDTH, WIDTH) / np.sqrt(2 * LAYERS)}
  return params


def _norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _block(x, p):
  b, t, _ = x.shape
  q, k, v = jnp.split(_norm(x, p["norm1"]) @ p["qkv"] + p["qkv_bias"], 3, axis=-1)
  heads = lambda z: z.reshape(b, t, HEADS, WIDTH // HEADS).transpose(0, 2, 1, 3)  # noqa: E731
  att = heads(q) @ heads(k).transpose(0, 1, 3, 2) / np.sqrt(WIDTH // HEADS)
  att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e30)
  y = (jax.nn.softmax(att, axis=-1) @ heads(v)).transpose(0, 2, 1, 3).reshape(b, t, WIDTH)
  x = x + y @ p["proj"]
  h = jax.nn.gelu(_norm(x, p["norm2"]) @ p["up"] + p["up_bias"])
  return x + h @ p["down"]


def loss_fn(params, tokens):
  """Mean next-token cross-entropy (nats) of ``tokens`` [batch, CONTEXT + 1]."""
  x = params["embed"][tokens[:, :-1]] + params["pos"]
  for layer in range(LAYERS):
    x = _block(x, params[f"block{layer}"])
  logits = _norm(x, params["out_norm"]) @ params["unembed"]
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


# ----------------------------------------------------------------------------- training

def train(state_dtype, data, lr, seed=0):
  """Per-step training losses of Adam (``state_dtype`` storage) over ``data`` (one scan)."""
  kw = {} if state_dtype is None else {"state_dtype": state_dtype}
  opt = fusedopt.Adam(learning_rate=lr, **kw).create(init_params(seed))

  def body(opt, batch):
    loss, g = jax.value_and_grad(loss_fn)(opt.target, batch)
    return opt.apply_gradient(g), loss
  _, losses = jax.jit(lambda o, d: jax.lax.scan(body, o, d))(opt, jnp.asarray(data))
  return np.asarray(losses)


def final(losses):
  return float(np.mean(losses[-max(1, len(losses) // 10):]))


def plot(path, curves, floor):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.2))
  k = 10
  for (name, losses), style in zip(curves.items(), ("-", "--", ":")):
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(k, len(losses) + 1), smooth, style, label=f"Adam, {name} state")
  ax.axhline(floor, color="gray", lw=0.8, label=f"entropy rate {floor:.3f}")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (nats/token, 10-step mean)")
  ax.set_title("2-layer transformer LM on an order-2 Markov chain")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tolerance", type=float, default=0.02)
  p.add_argument("--plot", default="tiny_lm_loss.png", help="where to write the PNG")
  args = p.parse_args(argv)
  probs = markov_chain(args.seed)
  floor = entropy_rate(probs)
  data = sample_batches(probs, args.steps, args.batch_size, args.seed + 1)
  n = sum(x.size for x in jax.tree_util.tree_leaves(init_params(args.seed)))
  print(f"{n} parameters, {args.steps} steps of {args.batch_size}x{CONTEXT} tokens; "
        f"entropy rate {floor:.4f} nats/token")
  curves = {}
  for name, sd in STATES.items():
    t0 = time.perf_counter()
    curves[name] = train(sd, data, args.lr, args.seed)
    print(f"{name:>14} state: final loss {final(curves[name]):.4f} "
          f"(first {curves[name][0]:.3f}; {time.perf_counter() - t0:.1f} s)")
  plot(args.plot, curves, floor)
  print(f"wrote {args.plot}")
  base = final(curves["float32"])
  bad = [k for k in ("int8", "float8_e4m3fn") if final(curves[k]) > (1 + args.tolerance) * base]
  if bad:
    print(f"FAIL: {bad} end above float32's final loss {base:.4f} by more than "
          f"{args.tolerance:.0%}")
    return 1
  print(f"ok: int8 and fp8 state reach float32's final loss within {args.tolerance:.0%}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
