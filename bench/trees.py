"""Parameter trees for the benchmark, generated from shapes (nothing is downloaded).

Each tree is described by a function returning a nested dict of shapes (the layout of the flax
model's parameters); ``host_tree`` turns shapes into float32 arrays from a seeded numpy RNG.
Sets: ``QUICK_TREES`` (--quick), ``FULL_TREES`` + ``sweep(...)`` (--full); the default run's set
is chosen per device in bench/__main__.py.

  gpt2-124m    GPT-2 small as in flax/transformers' FlaxGPT2: 148 leaves, 124.4M params
  resnet50     ResNet-50 (HWIO conv kernels, BatchNorm scale/bias, fc): 161 leaves, 25.6M
  small-2000   2000 leaves of 5K-15K elements, mixed 1-D and 2-D shapes: ~20M
  bert-base    BERT-base as in transformers' FlaxBertModel (with pooler): 199 leaves, 109.5M
  gpt-10m      a small GPT (d=256, 6 layers, vocab 16384, ctx 512) for --quick: ~9.6M
  small-200    200 leaves like small-2000 (~2M), for --quick
  scale-<n>    the scale sweep: GPT-like trees of about n parameters (scale-1m ... scale-1b), from
               ``scale_shapes``; same leaf kinds at every size, so time vs size isolates size
"""
import jax
import jax.numpy as jnp
import numpy as np


def gpt2_shapes(vocab=50257, ctx=1024, d=768, layers=12):
  """FlaxGPT2 parameter layout: wte, wpe, h/<i>/{ln_1, attn, ln_2, mlp}, ln_f."""
  ln = lambda: {"scale": (d,), "bias": (d,)}
  dense = lambda n_in, n_out: {"kernel": (n_in, n_out), "bias": (n_out,)}
  blocks = {
      str(i): {
          "ln_1": ln(),
          "attn": {"c_attn": dense(d, 3 * d), "c_proj": dense(d, d)},
          "ln_2": ln(),
          "mlp": {"c_fc": dense(d, 4 * d), "c_proj": dense(4 * d, d)},
      } for i in range(layers)
  }
  return {"wte": {"embedding": (vocab, d)}, "wpe": {"embedding": (ctx, d)}, "h": blocks,
          "ln_f": ln()}


def resnet50_shapes(num_classes=1000):
  """flax ResNet-50 (v1.5 bottlenecks): conv kernels (H, W, in, out), BatchNorm scale/bias."""

  def conv_bn(k, c_in, c_out):
    return {"conv": {"kernel": (k, k, c_in, c_out)}, "bn": {"scale": (c_out,), "bias": (c_out,)}}

  tree = {"stem": conv_bn(7, 3, 64)}
  c_in = 64
  for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
    for b in range(blocks):
      c_out = 4 * width
      block = {"conv1": conv_bn(1, c_in, width), "conv2": conv_bn(3, width, width),
               "conv3": conv_bn(1, width, c_out)}
      if b == 0:
        block["proj"] = conv_bn(1, c_in, c_out)
      tree[f"stage{stage + 1}_block{b + 1}"] = block
      c_in = c_out
  tree["fc"] = {"kernel": (c_in, num_classes), "bias": (num_classes,)}
  return tree


def small_leaves_shapes(n=2000, lo=5000, hi=15000, seed=0):
  """``n`` leaves with 5K-15K elements each; about half 1-D, half 2-D (rows 8..128)."""
  rng = np.random.default_rng(seed)
  tree = {}
  for i in range(n):
    size = int(rng.integers(lo, hi + 1))
    if rng.random() < 0.5:
      shape = (size,)
    else:
      rows = int(rng.integers(8, 129))
      shape = (rows, max(1, size // rows))
    tree[f"leaf{i:04d}"] = shape
  return tree


def bert_shapes(vocab=30522, ctx=512, d=768, layers=12, ff=3072, type_vocab=2):
  """FlaxBertModel layout (embeddings, encoder/layer/<i>, pooler), kernels as (in, out)."""
  ln = lambda: {"scale": (d,), "bias": (d,)}
  dense = lambda n_in, n_out: {"kernel": (n_in, n_out), "bias": (n_out,)}
  layer = lambda: {
      "attention": {"self": {"query": dense(d, d), "key": dense(d, d), "value": dense(d, d)},
                    "output": {"dense": dense(d, d), "LayerNorm": ln()}},
      "intermediate": {"dense": dense(d, ff)},
      "output": {"dense": dense(ff, d), "LayerNorm": ln()},
  }
  return {
      "embeddings": {"word_embeddings": {"embedding": (vocab, d)},
                     "position_embeddings": {"embedding": (ctx, d)},
                     "token_type_embeddings": {"embedding": (type_vocab, d)},
                     "LayerNorm": ln()},
      "encoder": {"layer": {str(i): layer() for i in range(layers)}},
      "pooler": {"dense": dense(d, d)},
  }


def _gpt_params(d, layers, vocab, ctx):
  return 12 * layers * d * d + 13 * layers * d + (vocab + ctx + 2) * d


def scale_shapes(target, vocab=16384, ctx=1024):
  """A GPT-2-like tree of about ``target`` parameters, for the scale sweep.

  Width d (a multiple of 64) and depth ``layers = clip(round(d / 96), 2, 48)`` grow together, as
  in GPT-style families, so the leaf count grows slowly (12 per layer + 4) and the sweep measures
  size rather than leaf count. The d whose tree is closest to ``target`` is taken.
  """
  def cfg(d):
    layers = int(np.clip(round(d / 96), 2, 48))
    return d, layers, _gpt_params(d, layers, vocab, ctx)
  best = min((cfg(d) for d in range(64, 8192 + 1, 64)), key=lambda c: abs(c[2] - target))
  return gpt2_shapes(vocab=vocab, ctx=ctx, d=best[0], layers=best[1])


SCALES = {"1m": 1e6, "3m": 3e6, "10m": 1e7, "30m": 3e7, "100m": 1e8, "300m": 3e8, "1b": 1e9}
SWEEP = tuple(f"scale-{k}" for k in SCALES)
# The scale sweep's largest member in a default ``--sweep``: CPU steps of a 300M tree take seconds
# and every implementation holds its own copy of the state, so the large end is for accelerators.
SWEEP_MAX_CPU = "scale-100m"
SWEEP_MAX_ACCEL = "scale-1b"

TREES = {
    "gpt2-124m": gpt2_shapes,
    "resnet50": resnet50_shapes,
    "bert-base": bert_shapes,
    "small-2000": lambda: small_leaves_shapes(2000),
    "gpt-10m": lambda: gpt2_shapes(vocab=16384, ctx=512, d=256, layers=6),
    "small-200": lambda: small_leaves_shapes(200, seed=1),
    **{f"scale-{k}": (lambda n=n: scale_shapes(n)) for k, n in SCALES.items()},
}
FULL_TREES = ("gpt2-124m", "resnet50", "bert-base", "small-2000")
QUICK_TREES = ("gpt-10m", "small-200")


def sweep(backend, largest=None):
  """The scale-sweep trees up to ``largest`` (default: by backend, see SWEEP_MAX_*)."""
  if largest is None:
    largest = SWEEP_MAX_CPU if backend == "cpu" else SWEEP_MAX_ACCEL
  return SWEEP[:SWEEP.index(largest) + 1]


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def shapes(name):
  return TREES[name]()


def shape_leaves(tree):
  return jax.tree_util.tree_leaves(tree, is_leaf=_is_shape)


def num_params(tree):
  return int(sum(int(np.prod(s, dtype=np.int64)) for s in shape_leaves(tree)))


def num_leaves(tree):
  return len(shape_leaves(tree))


def host_tree(tree, seed, scale):
  """numpy float32 arrays of the given shapes: N(0, scale^2), seeded."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (rng.standard_normal(s, dtype=np.float32) * np.float32(scale)), tree,
      is_leaf=_is_shape)


def to_device(host):
  """Fresh device arrays (``jnp.asarray`` per leaf: a transfer, never a compile)."""
  return jax.tree_util.tree_map(lambda x: jnp.asarray(np.array(x, copy=True)), host)
