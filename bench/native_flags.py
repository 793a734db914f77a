"""The native CPU kernel's step time under different code-generation choices, side by side.

    python -m bench.native_flags [--tree gpt2-124m] [--reps 15] [--baseline REV] [--out FILE]

Variants (each the native backend's ``run`` over one jitted, donated group update):
  - ``current``: this checkout's ``kernels/native.py`` (no FMA contraction; sums in fixed lanes).
  - ``contract``: the same generator with ``-ffp-contract=fast`` (results depend on the CPU).
  - ``REV``: ``kernels/native.py`` as of git revision ``--baseline`` (default HEAD), when given.
Rules: Adam (elementwise, 28 B/param), LAMB's moment pass (with its per-tensor sums of squares),
bf16 Adam with stochastic rounding (compute-bound hash). Medians of ``--reps`` steps, run in
rotation so that machine noise hits every variant alike; ratios are against ``current``.
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from fusedopt import elementwise as ew
from fusedopt.adam import ADAM_RULE
from fusedopt.kernels import native
from fusedopt.lamb import MOMENTS_RULE
from fusedopt.layout import FlatLayout

from . import trees


def _module_at(rev):
  src = subprocess.run(["git", "show", f"{rev}:kernels/native.py"], capture_output=True,
                       text=True, check=True).stdout
  path = os.path.join(tempfile.mkdtemp(), f"native_{rev.replace('/', '_')}.py")
  with open(path, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location(f"native_{abs(hash(rev))}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _contracting():
  spec = importlib.util.spec_from_file_location("native_contract", native.__file__)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  mod._FLAGS = tuple("-ffp-contract=fast" if f == "-ffp-contract=off" else f for f in mod._FLAGS)
  return mod


def _step(mod, rule, layout, scalars):
  def f(p_leaves, g_leaves, state):
    out_p, st, sums = mod.run(rule, scalars, {}, layout, 0, p_leaves, g_leaves, state)
    return out_p, st, sums
  return jax.jit(f, donate_argnums=(0, 2))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tree", default="gpt2-124m")
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--baseline", default=None, help="git revision of kernels/native.py to add")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  variants = {"current": native, "contract": _contracting()}
  if args.baseline:
    variants[args.baseline] = _module_at(args.baseline)
  host = trees.host_tree(trees.shapes(args.tree), seed=0, scale=0.02)
  lines = [f"# native kernel variants, tree {args.tree}, {jax.devices()[0].device_kind}, "
           f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}", "",
           f"medians of {args.reps} steps in rotation; ratio = variant / current", "",
           "| rule | params dtype | " + " | ".join(variants) + " |",
           "|---|---|" + "---:|" * len(variants)]
  for label, rule, dtype in [("adam", ADAM_RULE, np.float32),
                             ("lamb_moments (+sums)", MOMENTS_RULE, np.float32),
                             ("adam bf16 + stochastic rounding",
                              ew.with_stochastic_rounding(ADAM_RULE), jnp.bfloat16)]:
    tree = jax.tree.map(lambda x, d=dtype: jnp.asarray(x, d), host)
    layout = FlatLayout.build(tree)
    p = list(jax.tree.leaves(tree))
    g = [x * 0.01 for x in p]
    scalars = {k: jnp.float32(0.5) for k in rule.scalars}
    times = {v: [] for v in variants}
    carry = {}
    for v, mod in variants.items():
      fn = _step(mod, rule, layout, scalars)
      st = tuple(jnp.zeros((layout.groups[0].size,), jnp.float32) for _ in range(rule.n_state))
      pv = [jnp.array(x) for x in p]
      out = jax.block_until_ready(fn(pv, g, st))   # compile + warm up
      carry[v] = (fn, out[0] if rule.writes_param else [jnp.array(x) for x in p], out[1])
    for _ in range(args.reps):
      for v in variants:
        fn, pv, st = carry[v]
        t = time.perf_counter()
        out = jax.block_until_ready(fn(pv, g, st))
        times[v].append(time.perf_counter() - t)
        carry[v] = (fn, out[0] if rule.writes_param else [jnp.array(x) for x in p], out[1])
    med = {v: float(np.median(t)) * 1e3 for v, t in times.items()}
    cells = [f"{med[v]:.1f} ms ({med[v] / med['current']:.2f}x)" for v in variants]
    lines.append(f"| {label} | {np.dtype(dtype).name} | " + " | ".join(cells) + " |")
    print(lines[-1], flush=True)
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  sys.exit(main())
