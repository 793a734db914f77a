"""Low-bit optimizer state: Adam's state memory and step time by ``state_dtype``, side by side.

    python -m bench.low_bit --trees gpt2-124m,resnet50 --runs 7 --tag cpu-DATE

For each tree (``bench.trees``, float32 params) and each storage (float32, bfloat16, int8,
float8_e4m3fn) it reports the optimizer state's bytes per parameter (from the state's buffers:
codes, scales, the float32 state of small tensors, padding), the bytes a step moves per
parameter by the roofline model (p, g read; p written; each state field read and written at its
storage size; scales counted), and the median time of the jitted, donated ``apply_gradient`` on
the chosen backend, the storages measured round-robin so slow phases of the machine hit all of
them (ratios to float32 per round, ``measure.paired_ratio``). With ``--jnp-path``, int8 and
float8_e4m3fn also run on the jnp path (decode, rule and encode as one XLA computation), against
float32 in a round-robin of their own.
"""
import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import fusedopt
from bench import measure, trees

STORAGES = {"float32": None, "bfloat16": jnp.bfloat16, "int8": "int8",
            "float8_e4m3fn": jnp.float8_e4m3fn}
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def state_bytes(state):
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(state.param_states))


def step_bytes(state, n_params):
  """Roofline bytes of one Adam step: p and g read, p written (float32), every state buffer
  read and written (its storage size)."""
  return 3 * 4 * n_params + 2 * state_bytes(state)


def _timed(cases, params, grads, runs):
  """``cases`` (name -> (state_dtype, backend)) compiled, warmed up and timed round-robin;
  returns (name -> optimizer after the runs, name -> step times)."""
  opts, steps = {}, {}
  for name, (sd, be) in cases.items():
    opt = fusedopt.Adam(1e-3, state_dtype=sd, backend=be).create(
        jax.tree_util.tree_map(jnp.copy, params))
    steps[name] = jax.jit(lambda o, g: o.apply_gradient(g), donate_argnums=0)
    opts[name] = steps[name](opt, grads)        # compile and warm up
    jax.block_until_ready(opts[name])
  times = {name: [] for name in cases}
  for _ in range(runs):
    for name in cases:
      t0 = time.perf_counter()
      opts[name] = steps[name](opts[name], grads)
      jax.block_until_ready(opts[name])
      times[name].append(time.perf_counter() - t0)
  return opts, times


def run(tree_name, runs, backend, jnp_path=False):
  """The storages on ``backend``, round-robin; with ``jnp_path``, then int8 and fp8 on the jnp
  path against float32 on ``backend`` in a round-robin of their own (their multi-second steps
  would slow the others' rounds down)."""
  shapes = trees.shapes(tree_name)
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s, jnp.float32) + 0.01, shapes,
                                  is_leaf=trees._is_shape)   # pylint: disable=protected-access
  n = trees.num_params(shapes)
  rng = np.random.default_rng(0)
  grads = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * 1e-2), params)
  passes = [{name: (sd, backend) for name, sd in STORAGES.items()}]
  if jnp_path and backend != "jnp":
    passes.append({"float32": (None, backend),
                   **{f"{name} (jnp path)": (STORAGES[name], "jnp")
                      for name in ("int8", "float8_e4m3fn")}})
  rows = []
  for k, cases in enumerate(passes):
    opts, times = _timed(cases, params, grads, runs)
    for name in cases:
      if k and name == "float32":
        continue
      st = opts[name].state
      rows.append({"storage": name, "state_B_per_param": state_bytes(st) / n,
                   "step_B_per_param": step_bytes(st, n) / n,
                   "time": measure.summarize(times[name]),
                   "ratio_to_float32": measure.paired_ratio(times[name], times["float32"])})
    del opts
  return {"tree": tree_name, "params": n, "leaves": trees.num_leaves(shapes), "rows": rows}


def markdown(results, meta):
  out = [f"# Low-bit Adam state ({meta['date']})", "",
         f"`{meta['command']}` on {meta['machine']}, jax {meta['jax']}, backend "
         f"`{meta['backend']}`, {meta['runs']} runs round-robin; medians, ratios per round.", ""]
  for r in results:
    out += [f"## {r['tree']} ({r['params'] / 1e6:.1f}M params, {r['leaves']} leaves)", "",
            "| state_dtype | state B/param | step B/param | step median | vs float32 |",
            "|---|---:|---:|---:|---:|"]
    for row in r["rows"]:
      ratio = row["ratio_to_float32"]
      out.append(f"| {row['storage']} | {row['state_B_per_param']:.3f} | "
                 f"{row['step_B_per_param']:.2f} | {row['time']['median_s'] * 1e3:.1f} ms | "
                 f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}) |")
    out.append("")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--trees", default="gpt2-124m,resnet50")
  p.add_argument("--runs", type=int, default=7)
  p.add_argument("--backend", default="auto")
  p.add_argument("--jnp-path", action="store_true",
                 help="also int8/fp8 on the jnp path (its own round-robin against float32)")
  p.add_argument("--tag", default=None, help="write <out>/<tag>-low-bit.{md,json}")
  p.add_argument("--out", default=RESULTS, help="where --tag writes (default bench/results)")
  args = p.parse_args(argv)
  results = [run(t, args.runs, args.backend, args.jnp_path) for t in args.trees.split(",")]
  meta = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
          "backend": args.backend, "runs": args.runs,
          "machine": f"{os.cpu_count()} CPUs, {jax.devices()[0].platform} "
                     f"({jax.devices()[0].device_kind})",
          "command": "python -m bench.low_bit " + " ".join(
              sys.argv[1:] if argv is None else argv)}
  text = markdown(results, meta)
  print(text)
  if args.tag:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}-low-bit.md"), "w") as f:
      f.write(text + "\n")
    with open(os.path.join(args.out, f"{args.tag}-low-bit.json"), "w") as f:
      json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
