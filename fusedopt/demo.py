"""Demo: train a small MLP on scikit-learn's digits with ``fusedopt.Adam``, then time it.

Run with ``python -m fusedopt.demo`` (``make demo`` runs the fuller examples/digits_mlp.py). The model is plain
``jax.numpy`` (no flax); the optimizer is used through the legacy ``flax.optim`` API::

  opt = fusedopt.Adam(learning_rate=1e-3).create(params)
  loss, grads = jax.value_and_grad(loss_fn)(opt.target, batch)
  opt = opt.apply_gradient(grads)

The train step is jitted with the optimizer donated. After training, the full jitted train
step with fusedopt is timed against the same step with ``optax.adam`` on the same model, side
by side in one run, and one ``bench:`` line gives the medians.

Needs the ``demo`` extras (scikit-learn, optax): ``pip install 'fusedopt[demo]'``. The digits
data set ships inside scikit-learn, so nothing is downloaded.
"""
import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import fusedopt


def load_data(seed, test_fraction=0.2):
  """Digits (1797 8x8 images, 10 classes) as float32 in [0, 1], split into train and test."""
  try:
    from sklearn.datasets import load_digits
  except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("fusedopt.demo needs scikit-learn: pip install 'fusedopt[demo]'")
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = int(len(x) * test_fraction)
  test, train = perm[:n_test], perm[n_test:]
  return (x[train], y[train]), (x[test], y[test])


def init_mlp(seed, sizes):
  """He-initialised dense layers: a list of {'w': (in, out), 'b': (out,)} dicts (float32).

  Drawn with numpy: no per-shape compilation of jax.random ops, so start-up stays quick.
  """
  rng = np.random.default_rng(seed)
  params = []
  for n_in, n_out in zip(sizes[:-1], sizes[1:]):
    w = rng.standard_normal((n_in, n_out), dtype=np.float32) * np.float32(np.sqrt(2.0 / n_in))
    params.append({"w": jnp.asarray(w), "b": jnp.zeros((n_out,), jnp.float32)})
  return params


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, batch):
  x, y = batch
  logits = mlp(params, x)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


@jax.jit
def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(mlp(params, x), axis=-1) == y)


def make_adam(args):
  if args.backend == "auto":
    return fusedopt.Adam(learning_rate=args.lr)
  return fusedopt.Adam(learning_rate=args.lr, backend=args.backend)


def fusedopt_step(opt, batch):
  loss, grads = jax.value_and_grad(loss_fn)(opt.target, batch)
  opt = opt.apply_gradient(grads)
  return opt, loss


def make_optax_step(tx):
  import optax

  def optax_step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return optax_step


def train(args, train_data, test_data, sizes):
  x_train, y_train = train_data
  x_test, y_test = jnp.asarray(test_data[0]), jnp.asarray(test_data[1])
  params = init_mlp(args.seed, sizes)
  opt = make_adam(args).create(params)
  step = jax.jit(fusedopt_step, donate_argnums=0)

  rng = np.random.default_rng(args.seed)
  steps_per_epoch = len(x_train) // args.batch_size  # drop the ragged last batch: one shape
  for epoch in range(1, args.epochs + 1):
    t0 = time.perf_counter()
    perm = rng.permutation(len(x_train))
    losses = []
    for i in range(steps_per_epoch):
      idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
      opt, loss = step(opt, (x_train[idx], y_train[idx]))
      losses.append(loss)
    train_loss = float(jnp.mean(jnp.stack(losses)))
    test_acc = float(accuracy(opt.target, x_test, y_test))
    print(f"epoch {epoch:3d}  loss {train_loss:.4f}  test acc {test_acc:.4f}  "
          f"({time.perf_counter() - t0:.2f}s)", flush=True)
  return opt


def _time_step(step, state, batch):
  t0 = time.perf_counter()
  state, loss = step(state, batch)
  jax.block_until_ready((state, loss))
  return state, time.perf_counter() - t0


def bench(args, train_data, sizes, pair=None):
  """Median time of the full jitted train step: fusedopt.Adam vs optax.adam (or ``pair``: a
  fusedopt ``OptimizerDef`` and an optax transformation), interleaved."""
  try:
    import optax
  except ImportError:
    print("bench: skipped (optax is not installed; pip install 'fusedopt[demo]')")
    return
  x_train, y_train = train_data
  batch = (jnp.asarray(x_train[:args.batch_size]), jnp.asarray(y_train[:args.batch_size]))
  # Same initial weights for both, but separate buffers: both steps donate their state.
  params = lambda: init_mlp(args.seed + 1, sizes)  # noqa: E731

  f_step = jax.jit(fusedopt_step, donate_argnums=0)
  opt_def, tx = pair if pair is not None else (make_adam(args), optax.adam(args.lr))
  f_state = opt_def.create(params())
  o_step = jax.jit(make_optax_step(tx), donate_argnums=0)
  o_params = params()
  o_state = (o_params, tx.init(o_params))

  for _ in range(max(args.warmup, 1)):  # compile, then settle
    f_state, _ = _time_step(f_step, f_state, batch)
    o_state, _ = _time_step(o_step, o_state, batch)
  f_times, o_times = [], []
  for i in range(args.steps):  # interleave so both see the same machine conditions
    if i % 2 == 0:
      f_state, t = _time_step(f_step, f_state, batch)
      f_times.append(t)
      o_state, t = _time_step(o_step, o_state, batch)
      o_times.append(t)
    else:
      o_state, t = _time_step(o_step, o_state, batch)
      o_times.append(t)
      f_state, t = _time_step(f_step, f_state, batch)
      f_times.append(t)
  f_ms = statistics.median(f_times) * 1e3
  o_ms = statistics.median(o_times) * 1e3
  print(f"bench: fusedopt {f_ms:.3f} ms/step vs optax {o_ms:.3f} ms/step ({f_ms / o_ms:.2f}x)"
        f"  [median of {args.steps} steps, batch {args.batch_size}, {jax.default_backend()}]")


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m fusedopt.demo", description=__doc__.split("\n")[0])
  p.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
  p.add_argument("--steps", type=int, default=50,
                 help="timed steps per optimizer in the closing benchmark (default 50; 0 skips it)")
  p.add_argument("--warmup", type=int, default=5, help="untimed steps before the benchmark")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--hidden", type=int, default=128, help="width of the two hidden layers")
  p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--backend", default="auto",
                 help="fusedopt kernel backend: auto (default), jnp or native")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  train_data, test_data = load_data(args.seed)
  sizes = [train_data[0].shape[1], args.hidden, args.hidden, 10]
  print(f"digits: {len(train_data[0])} train / {len(test_data[0])} test, MLP {sizes}, "
        f"fusedopt.Adam(learning_rate={args.lr:g}), batch {args.batch_size}, "
        f"jax backend {jax.default_backend()}", flush=True)
  backends = getattr(fusedopt, "available_backends", lambda: ["?"])()
  print(f"fusedopt kernel backend: {args.backend} (available here: {', '.join(backends)})",
        flush=True)
  t0 = time.perf_counter()
  train(args, train_data, test_data, sizes)
  print(f"trained {args.epochs} epochs in {time.perf_counter() - t0:.2f}s", flush=True)
  if args.steps > 0:
    bench(args, train_data, sizes)


if __name__ == "__main__":
  main()
