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

With ``--anchors`` (a GPU with torch), the PyTorch 8-bit Adams the low-bit goal is measured
against -- bitsandbytes' ``Adam8bit``, torchao's ``AdamW8bit``, whichever is importable -- run
over float32 torch parameters of the same shapes (blockwise int8 state, their defaults: blocks
of 256, tensors under 4096 elements in float32, as fusedopt's) in a round-robin with fusedopt's
float32 and int8 steps: their state bytes, step time, and fusedopt int8's time over theirs
(issue 18's goal: at most 1.0).
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


def fusedopt_step(state_dtype, backend, params, grads):
  """(one synchronized step, the optimizer now) of fusedopt's Adam with ``state_dtype`` on
  ``backend``: jitted, donated, compiled and warmed up."""
  opt = fusedopt.Adam(1e-3, state_dtype=state_dtype, backend=backend).create(
      jax.tree_util.tree_map(jnp.copy, params))
  step = jax.jit(lambda o, g: o.apply_gradient(g), donate_argnums=0)
  box = [step(opt, grads)]
  jax.block_until_ready(box[0])

  def one():
    box[0] = step(box[0], grads)
    jax.block_until_ready(box[0])
  return one, lambda: box[0]


# PyTorch's 8-bit Adams (issue 18's anchors): label -> (module, class)
ANCHORS = {"bitsandbytes Adam8bit": ("bitsandbytes.optim", "Adam8bit"),
           "torchao AdamW8bit": ("torchao.optim", "AdamW8bit")}


def torch_anchor(module, cls, leaves, grads, device="cuda"):
  """(one synchronized step, state bytes) of ``module.cls`` over float32 torch parameters shaped
  as ``leaves`` (host arrays; ``grads`` alike), Adam's hyper-parameters as fusedopt's (lr 1e-3,
  betas (0.9, 0.999), eps 1e-8, no weight decay), one step taken (the state exists)."""
  import importlib  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  opt_cls = getattr(importlib.import_module(module), cls)
  ps = [torch.nn.Parameter(torch.tensor(np.asarray(x, np.float32), device=device))
        for x in leaves]
  for p, g in zip(ps, grads):
    p.grad = torch.tensor(np.asarray(g, np.float32), device=device)
  opt = opt_cls(ps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def one():
    opt.step()
    sync()
  one()
  nbytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if torch.is_tensor(t))
  return one, nbytes


def anchors(leaves, grads):
  """{label: (step, state bytes)} of the ``ANCHORS`` that run here (torch with CUDA, the
  package importable), and {label: why not} of the others."""
  found, why = {}, {}
  try:
    import torch  # pylint: disable=import-outside-toplevel
    cuda = torch.cuda.is_available()
  except ImportError:
    cuda = False
  for label, (module, cls) in ANCHORS.items():
    if not cuda:
      why[label] = "no torch with CUDA"
      continue
    try:
      found[label] = torch_anchor(module, cls, leaves, grads)
    except (ImportError, AttributeError) as e:
      why[label] = f"{module}.{cls}: {type(e).__name__}: {e}"
  return found, why


def _timed(steps, runs):
  """``steps`` (name -> one synchronized step) timed round-robin ``runs`` times: name -> step
  times."""
  times = {name: [] for name in steps}
  for _ in range(runs):
    for name, one in steps.items():
      t0 = time.perf_counter()
      one()
      times[name].append(time.perf_counter() - t0)
  return times


def run(tree_name, runs, backend, jnp_path=False, with_anchors=False, find_anchors=anchors):
  """The storages on ``backend``, round-robin; with ``jnp_path``, then int8 and fp8 on the jnp
  path against float32 on ``backend`` in a round-robin of their own (their multi-second steps
  would slow the others' rounds down); with ``with_anchors``, then ``find_anchors``' PyTorch
  8-bit Adams against fusedopt's float32 and int8 on ``backend``, another round-robin."""
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
  rows, missing = [], {}
  for k, cases in enumerate(passes):
    made = {name: fusedopt_step(sd, be, params, grads) for name, (sd, be) in cases.items()}
    times = _timed({name: m[0] for name, m in made.items()}, runs)
    for name in cases:
      if k and name == "float32":
        continue
      st = made[name][1]().state
      rows.append({"storage": name, "state_B_per_param": state_bytes(st) / n,
                   "step_B_per_param": step_bytes(st, n) / n,
                   "time": measure.summarize(times[name]),
                   "ratio_to_float32": measure.paired_ratio(times[name], times["float32"])})
    del made
  if with_anchors:
    found, missing = find_anchors([np.asarray(x) for x in jax.tree_util.tree_leaves(params)],
                                  [np.asarray(x) for x in jax.tree_util.tree_leaves(grads)])
    if found:
      made = {name: fusedopt_step(STORAGES[name], backend, params, grads)
              for name in ("float32", "int8")}
      times = _timed({**{name: m[0] for name, m in made.items()},
                      **{label: a[0] for label, a in found.items()}}, runs)
      for label, (_, nbytes) in found.items():
        rows.append({"storage": label, "state_B_per_param": nbytes / n, "step_B_per_param": None,
                     "time": measure.summarize(times[label]),
                     "ratio_to_float32": measure.paired_ratio(times[label], times["float32"]),
                     "int8_over_anchor": measure.paired_ratio(times["int8"], times[label])})
      del made
  return {"tree": tree_name, "params": n, "leaves": trees.num_leaves(shapes), "rows": rows,
          "anchors_missing": missing}


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
      step_b = "-" if row["step_B_per_param"] is None else f"{row['step_B_per_param']:.2f}"
      out.append(f"| {row['storage']} | {row['state_B_per_param']:.3f} | {step_b} | "
                 f"{row['time']['median_s'] * 1e3:.1f} ms | "
                 f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}) |")
    out.append("")
    for row in r["rows"]:
      if "int8_over_anchor" in row:
        q = row["int8_over_anchor"]
        out.append(f"- fusedopt int8 / {row['storage']}: {q['median']:.2f}x "
                   f"({q['min']:.2f}-{q['max']:.2f}; goal <= 1.0, same round-robin)")
    for label, why in r.get("anchors_missing", {}).items():
      out.append(f"- {label}: not run ({why})")
    out.append("")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--trees", default="gpt2-124m,resnet50")
  p.add_argument("--runs", type=int, default=7)
  p.add_argument("--backend", default="auto")
  p.add_argument("--jnp-path", action="store_true",
                 help="also int8/fp8 on the jnp path (its own round-robin against float32)")
  p.add_argument("--anchors", action="store_true",
                 help="also bitsandbytes' Adam8bit / torchao's AdamW8bit (torch with CUDA)")
  p.add_argument("--tag", default=None, help="write <out>/<tag>-low-bit.{md,json}")
  p.add_argument("--out", default=RESULTS, help="where --tag writes (default bench/results)")
  args = p.parse_args(argv)
  results = [run(t, args.runs, args.backend, args.jnp_path, args.anchors)
             for t in args.trees.split(",")]
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
