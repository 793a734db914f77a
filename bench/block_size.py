"""Low-bit state's block size: what a scale per block of B elements costs and what it keeps.

    python -m bench.block_size --tag cpu-DATE

fusedopt stores int8/fp8 optimizer state in blocks of ``quantization.BLOCK`` (256) elements, a
float32 scale each (docs/low-bit-state.md). For B in 64 ... 4096 this measures, side by side:

- **memory**: Adam's state bytes per parameter with int8 moments in blocks of B -- codes, a scale
  per block, the float32 state of tensors under ``quantization.MIN_SIZE`` elements, padding --
  from the layout the optimizer builds (``FlatLayout.build(tree, quantize=(MIN_SIZE, B))``), on
  GPT-2-124M and ResNet-50 (issue 18's goal: at most 2.05 B/param);
- **accuracy**: the moments of float32 Adam training the small transformer LM of
  ``examples/tiny_lm.py`` (at two points of the run), and of a GPT-2-sized token embedding fed
  Zipf-distributed tokens (``zipf_embedding_moments``: rows of very different magnitudes, where a
  block of two rows mixes them), encoded in blocks of B and decoded: the relative RMS error of m
  (signed map) and v (unsigned map), the share of v's nonzero values that decode to 0 (Adam then
  divides by eps alone), and the relative RMS error of Adam's step direction m^/(sqrt(v^) + eps);
- **training**: that LM trained with Adam whose moments are stored in blocks of B after every
  step, final loss against float32 Adam's (the mean over the last 10% of the steps), over
  ``--seeds`` seeds (the spread between seeds is the noise floor of the comparison).

The quantized Adam here is fusedopt's int8 step written with the block as an argument: each
leaf's moments decoded (``quantization.dequantize``), ``ADAM_RULE`` in float32
(``elementwise.apply_to_leaf``, the per-leaf path), encoded again (``quantization.quantize``),
over the leaf padded to whole blocks (a block never straddles two tensors, as in the layout). At
B = 256 it takes ``fusedopt.Adam(state_dtype="int8")``'s steps (tests/test_bench.py checks
codes, scales and params), so the other block sizes differ from the library's step in B only.
Step time is not measured per block: the kernels are built for B = 256, and a block adds one
absmax and one scale per B elements (docs/low-bit-state.md).
"""
import argparse
import datetime
import functools
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import fusedopt
from fusedopt import elementwise, quantization
from fusedopt.adam import ADAM_RULE
from fusedopt.layout import QUANTIZED_TILE_BLOCKS, FlatLayout
from bench import trees

BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)
RESULTS = os.path.join(os.path.dirname(__file__), "results")
S8, U8 = quantization.INT8_SIGNED, quantization.INT8_UNSIGNED
B1, B2, EPS = 0.9, 0.999, 1e-8


def load_tiny_lm():
  """examples/tiny_lm.py as a module (the model, its data, its float32 training)."""
  path = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_lm.py")
  spec = importlib.util.spec_from_file_location("tiny_lm", path)
  lm = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lm)
  return lm


# ----------------------------------------------------------------------------- memory

def adam_state_bytes(shapes, block):
  """Bytes of Adam's two int8 moments over a float32 tree of ``shapes`` in blocks of ``block``:
  per field, the quantized groups' codes (1 B/element) and scales (4 B/block), the other groups'
  float32 state, padding included (at 256, the buffers ``fusedopt.Adam(state_dtype="int8")``
  holds; at other sizes with the same tile of 32768 elements).
  ``block`` None: float32 moments (``fusedopt.Adam()``'s buffers)."""
  tree = [jax.ShapeDtypeStruct(s, jnp.float32) for s in trees.shape_leaves(shapes)]
  if block is None:   # float32 moments
    return 2 * 4 * sum(g.size for g in FlatLayout.build(tree).groups)
  # a quantized group is padded to whole tiles (the Pallas TPU kernel's, QUANTIZED_TILE_BLOCKS
  # blocks of 256): the same tile in elements at every block size, so that the rows differ in
  # the block only
  tile = max(1, QUANTIZED_TILE_BLOCKS * quantization.BLOCK // block)
  layout = FlatLayout.build(tree, quantize=(quantization.MIN_SIZE, block), tile_blocks=tile)
  per_field = sum(g.size + 4 * (g.size // g.block) if g.block else 4 * g.size
                  for g in layout.groups)
  return 2 * per_field


# ----------------------------------------------------------------------------- Adam, blockwise

def _padded(x, block):
  x = jnp.ravel(x).astype(jnp.float32)
  return jnp.pad(x, (0, -x.size % block))


def init_state(params, block):
  """Per leaf of ``params`` (a list, in its order) (m, v): float32 zeros with ``block`` None or
  for a leaf under ``MIN_SIZE`` elements, else ``QuantizedArray``s of its elements padded to
  whole blocks (both maps' codes of 0)."""
  def one(p):
    if block is None or p.size < quantization.MIN_SIZE:
      return (jnp.zeros_like(p, jnp.float32),) * 2
    n = p.size + (-p.size % block)
    return (quantization.QuantizedArray.zeros(n, S8, block),
            quantization.QuantizedArray.zeros(n, U8, block))
  return [one(p) for p in jax.tree_util.tree_leaves(params)]


def adam_step(params, state, grads, step, lr):
  """One step of fusedopt's Adam (flax's form, ``ADAM_RULE``) with each leaf's moments decoded
  and encoded again in the blocks ``state`` holds (``init_state``'s list). ``step``: the steps
  taken before this one (0, 1, ...: the optimizer's ``state.step``)."""
  opt = fusedopt.Adam(lr, B1, B2, EPS)
  scalars = opt.scalars(opt.hyper_params, step)

  def one(p, mv, g):
    m, v = mv
    if not quantization.is_quantized(m):
      new_p, (m, v) = elementwise.apply_to_leaf(ADAM_RULE, scalars, {}, p, g, (m, v))
      return new_p, (m, v)
    n = p.size
    pf, gf = _padded(p, m.block), _padded(g, m.block)
    new_p, (m2, v2) = elementwise.apply_to_leaf(ADAM_RULE, scalars, {}, pf, gf,
                                                (m.dequantize(), v.dequantize()))
    m2 = quantization.QuantizedArray(*quantization.quantize(m2, S8, m.block), S8, m.block)
    v2 = quantization.QuantizedArray(*quantization.quantize(v2, U8, v.block), U8, v.block)
    return new_p[:n].reshape(p.shape).astype(p.dtype), (m2, v2)

  p_leaves, treedef = jax.tree_util.tree_flatten(params)
  out = [one(p, mv, g) for p, mv, g in zip(p_leaves, state, treedef.flatten_up_to(grads))]
  return treedef.unflatten([o[0] for o in out]), [o[1] for o in out]


def train(lm, data, lr, block, seed=0, snapshot_steps=()):
  """Per-step losses of the LM trained with Adam whose moments are stored in blocks of
  ``block`` (None: float32 moments throughout), and the float32 moments at ``snapshot_steps``
  (float32 runs only): {step: (m leaves, v leaves)}."""
  params = lm.init_params(seed)
  state = init_state(params, block)

  def body(carry, batch):
    p, st, t = carry
    loss, g = jax.value_and_grad(lm.loss_fn)(p, batch)
    p, st = adam_step(p, st, g, t, lr)
    return (p, st, t + 1), loss

  run = jax.jit(lambda c, d: jax.lax.scan(body, c, d))
  carry, losses, snaps, done = (params, state, jnp.int32(0)), [], {}, 0
  for stop in sorted(snapshot_steps) + [len(data)]:
    if stop > done:
      carry, part = run(carry, jnp.asarray(data[done:stop]))
      losses.append(np.asarray(part))
      done = stop
    if stop in snapshot_steps:
      snaps[stop] = tuple([np.asarray(mv[k]) for mv in carry[1]] for k in (0, 1))
  return np.concatenate(losses), snaps


# ----------------------------------------------------------------------------- accuracy

@functools.partial(jax.jit, static_argnums=(1, 2))
def _round_trip(x, fmt, block):
  """``x`` encoded in blocks of ``block`` and decoded (``quantization.quantize``,
  ``dequantize``)."""
  return quantization.dequantize(*quantization.quantize(x, fmt, block), fmt, block)


def moment_errors(m_leaves, v_leaves, step, block):
  """Over the leaves of at least ``MIN_SIZE`` elements: relative RMS error of m and v encoded in
  blocks of ``block`` and decoded, the share of v's nonzero values decoded to 0, and the relative
  RMS error of Adam's direction m^/(sqrt(v^) + eps) (bias-corrected at ``step``)."""
  c1, c2 = 1 - B1 ** step, 1 - B2 ** step
  acc = dict(m_err=[0.0, 0.0], v_err=[0.0, 0.0], u_err=[0.0, 0.0], v_flushed=[0, 0])
  for m, v in zip(m_leaves, v_leaves):
    if m.size < quantization.MIN_SIZE:
      continue
    mf, vf = (np.asarray(_padded(x, block)) for x in (m, v))
    mq, vq = (np.asarray(_round_trip(x, fmt, block)) for x, fmt in ((mf, S8), (vf, U8)))
    u = (mf / c1) / (np.sqrt(vf / c2) + EPS)
    uq = (mq / c1) / (np.sqrt(vq / c2) + EPS)
    for key, (x, xq) in (("m_err", (mf, mq)), ("v_err", (vf, vq)), ("u_err", (u, uq))):
      acc[key][0] += float(np.sum((xq.astype(np.float64) - x) ** 2))
      acc[key][1] += float(np.sum(x.astype(np.float64) ** 2))
    acc["v_flushed"][0] += int(np.count_nonzero((vf > 0) & (vq == 0)))
    acc["v_flushed"][1] += int(np.count_nonzero(vf > 0))
  return {k: (np.sqrt(a / b) if k != "v_flushed" else a / b) if b else 0.0
          for k, (a, b) in acc.items()}


def zipf_embedding_moments(vocab=50257, width=768, steps=100, tokens=8192, seed=0):
  """Adam's moments (float32 [vocab, width]) of a GPT-2-sized token embedding after ``steps``
  steps of ``tokens`` tokens drawn from a Zipf law (probability of the k-th token proportional
  to 1/k): each occurrence adds a N(0, 1) / ``tokens`` vector to its row's gradient, as a mean
  loss's gradient does, so frequent rows get large moments and rare ones small, decaying ones,
  and a row never drawn stays 0. A block wider than a row (or not dividing it: 512 of 768) holds
  two tokens' rows."""
  rng = np.random.default_rng(seed)
  probs = 1.0 / np.arange(1, vocab + 1)
  probs /= probs.sum()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(m, v, ids, key):
    g = jnp.zeros((vocab, width), jnp.float32).at[ids].add(
        jax.random.normal(key, (tokens, width), jnp.float32) / tokens)
    return B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g

  m, v = jnp.zeros((vocab, width), jnp.float32), jnp.zeros((vocab, width), jnp.float32)
  for t in range(steps):
    m, v = step(m, v, jnp.asarray(rng.choice(vocab, tokens, p=probs)), jax.random.PRNGKey(t))
  return m, v


# ----------------------------------------------------------------------------- the run

def run(steps, batch, lr, seeds, blocks, mem_trees, embedding=(50257, 768, 100)):
  """``embedding``: (vocab, width, steps) of ``zipf_embedding_moments``' case, or None."""
  lm = load_tiny_lm()
  probs = lm.markov_chain(0)
  out = {"memory": {}, "accuracy": {}, "training": {}}
  if embedding is not None:
    vocab, width, e_steps = embedding
    m, v = zipf_embedding_moments(vocab, width, e_steps)
    label = (f"a {vocab}x{width} token embedding's Adam moments after {e_steps} steps of "
             "Zipf-distributed tokens (`zipf_embedding_moments`)")
    out["accuracy"][label] = {str(b): moment_errors([m], [v], e_steps, b) for b in blocks}
    del m, v
  for name in mem_trees:
    shapes = trees.shapes(name)
    n = trees.num_params(shapes)
    out["memory"][name] = {"params": n, "float32": adam_state_bytes(shapes, None) / n}
    for b in blocks:
      out["memory"][name][str(b)] = adam_state_bytes(shapes, b) / n
  snap_at = (max(1, steps // 8), steps)
  for seed in seeds:
    data = lm.sample_batches(probs, steps, batch, seed + 1)
    t0 = time.perf_counter()
    losses, snaps = train(lm, data, lr, None, seed, snap_at)
    runs = {"float32": {"final": lm.final(losses), "curve": losses.tolist(),
                        "seconds": time.perf_counter() - t0}}
    if seed == seeds[0]:
      for s, (m, v) in snaps.items():
        label = f"the LM's float32 Adam moments at step {s}"
        out["accuracy"][label] = {str(b): moment_errors(m, v, s, b) for b in blocks}
    for b in blocks:
      t0 = time.perf_counter()
      losses, _ = train(lm, data, lr, b, seed)
      runs[str(b)] = {"final": lm.final(losses), "curve": losses.tolist(),
                      "seconds": time.perf_counter() - t0}
      print(f"seed {seed} block {b:5d}: final loss {runs[str(b)]['final']:.4f} "
            f"(float32 {runs['float32']['final']:.4f})", flush=True)
    out["training"][str(seed)] = runs
  return out


def markdown(res, meta):
  blocks = meta["blocks"]
  lines = [f"# Low-bit state: block size ({meta['date']})", "",
           f"`{meta['command']}` on {meta['host']}, jax {meta['jax']}, commit {meta['commit']}. "
           "What this measures and how: `bench/block_size.py`'s docstring. fusedopt's block: "
           f"{quantization.BLOCK}.", "",
           "## Memory: Adam's state, int8 moments (B/param)", "",
           "| tree | float32 | " + " | ".join(f"B={b}" for b in blocks) + " |",
           "|---|---:|" + "---:|" * len(blocks)]
  for name, row in res["memory"].items():
    lines.append(f"| {name} | {row['float32']:.3f} | "
                 + " | ".join(f"{row[str(b)]:.4f}" for b in blocks) + " |")
  lines += ["", "Issue 18's goal: at most 2.05 B/param.", ""]
  for label, row in res["accuracy"].items():
    lines += [f"## Accuracy: {label}, encoded and decoded",
              "", "| block | m: rel. RMS error | v: rel. RMS error | v nonzero decoded to 0 | "
              "Adam direction: rel. RMS error |", "|---:|---:|---:|---:|---:|"]
    for b in blocks:
      e = row[str(b)]
      lines.append(f"| {b} | {e['m_err']:.2e} | {e['v_err']:.2e} | {e['v_flushed']:.2e} | "
                   f"{e['u_err']:.2e} |")
    lines.append("")
  lines += ["## Training: the LM's final loss (mean of the last 10% of the steps)", "",
            "| seed | float32 | " + " | ".join(f"B={b}" for b in blocks) + " |",
            "|---|---:|" + "---:|" * len(blocks)]
  for seed, runs in res["training"].items():
    base = runs["float32"]["final"]
    lines.append(f"| {seed} | {base:.4f} | " + " | ".join(
        f"{runs[str(b)]['final']:.4f} ({runs[str(b)]['final'] / base - 1:+.1%})"
        for b in blocks) + " |")
  lines += ["", "In brackets: against the same seed's float32 run.", ""]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--blocks", default=",".join(map(str, BLOCKS)))
  p.add_argument("--trees", default="gpt2-124m,resnet50", help="memory rows")
  p.add_argument("--embedding", default="50257,768,100",
                 help="vocab,width,steps of the Zipf embedding case ('' to skip)")
  p.add_argument("--tag", default=None, help="write bench/results/<tag>-block-size.{md,json}")
  args = p.parse_args(argv)
  blocks = [int(b) for b in args.blocks.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  embedding = tuple(int(x) for x in args.embedding.split(",")) if args.embedding else None
  res = run(args.steps, args.batch_size, args.lr, seeds, blocks,
            [t for t in args.trees.split(",") if t], embedding)
  import platform  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=os.path.dirname(__file__), check=False).stdout.strip()
  meta = {"date": datetime.date.today().isoformat(), "blocks": blocks, "jax": jax.__version__,
          "command": "python -m bench.block_size " + " ".join(argv or sys.argv[1:]),
          "host": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})",
          "commit": commit or "unknown"}
  text = markdown(res, meta)
  print(text)
  if args.tag:
    base = os.path.join(RESULTS, f"{args.tag}-block-size")
    with open(base + ".md", "w") as f:
      f.write(text)
    with open(base + ".json", "w") as f:
      json.dump({"meta": meta, "results": res}, f)
    print(f"wrote {base}.md, {base}.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
