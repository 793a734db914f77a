"""Parameter trees for the benchmark, generated from shapes (nothing is downloaded).

Each tree is described by a function returning a nested dict of shapes (the layout of the flax
model's parameters); ``materialize`` turns shapes into float32 arrays from a seeded numpy RNG.

  gpt2-124m    GPT-2 small as in flax/transformers' FlaxGPT2: 148 leaves, 124.4M params
  resnet50     ResNet-50 (HWIO conv kernels, BatchNorm scale/bias, fc): 161 leaves, 25.6M
  small-2000   2000 leaves of 5K-15K elements, mixed 1-D and 2-D shapes: ~20M
  gpt-10m      a small GPT (d=256, 6 layers, vocab 16384, ctx 512) for --quick: ~9.6M
  small-200    200 leaves like small-2000 (~2M), for --quick
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


TREES = {
    "gpt2-124m": gpt2_shapes,
    "resnet50": resnet50_shapes,
    "small-2000": lambda: small_leaves_shapes(2000),
    "gpt-10m": lambda: gpt2_shapes(vocab=16384, ctx=512, d=256, layers=6),
    "small-200": lambda: small_leaves_shapes(200, seed=1),
}
DEFAULT_TREES = ("gpt2-124m", "resnet50", "small-2000")
QUICK_TREES = ("gpt-10m", "small-200")


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
