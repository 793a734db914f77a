"""A whole donated optimizer step compiled for an H100 on a machine without one.

  python -m bench.compile_only                       # GPT-2 124M, ResNet-50, 2000 leaves; Adam, LAMB
  python -m bench.compile_only --trees resnet50 --optims adam --backends jnp,triton

XLA:GPU's compile-only topology (jax-cuda12-plugin; ``tests/kernel_tools.H100`` describes the
device) compiles the jitted, donated ``apply_gradient`` step of each backend as a GPU run would,
so what the compiled program holds is known before a GPU is lent:

- **temporary memory** (``memory_analysis().temp_size_in_bytes``): issue 21's goal is at most 1%
  of the params' bytes for every tree; a packed copy of the tree is 100%;
- **kernels**: the fusions, custom calls (a Pallas, Mosaic GPU or Triton kernel each) and
  copies the step launches (``measure.hlo_counts``: the entry computation and what it runs
  through control flow, such as command buffers) -- launches per step, which on a GPU cost a few
  microseconds each against a whole step of 0.2-1.2 ms at copy bandwidth (ResNet-50, GPT-2).

Not a timing: a GPU run (``bench/gpu_run.sh``) measures those. ``--candidate`` adds the issue's
"per-leaf XLA fusions writing each leaf's slice of the flat state in place"
(``by_leaf_run_group``: the jnp rule on each leaf's params and grads where they are, its state
segment read by a slice and written back by ``dynamic_update_slice``), which is not a backend.
Writes ``<out>/cpu-<date>-h100-compile.{json,md}``.
"""
import argparse
import contextlib
import dataclasses
import importlib.util
import sys
import time
import traceback

import jax
import jax.numpy as jnp
from jax import lax

from fusedopt import elementwise
from fusedopt.kernels import common

from . import measure, optims, report, trees

CANDIDATE = "jnp-by-leaf (candidate)"


def by_leaf_run_group(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
  """``Backend.run_group`` of the candidate: per leaf, ``elementwise.apply_to_leaf`` over its own
  params and grads (flat views) and its segment of each state buffer, the new segment written
  back with ``lax.dynamic_update_slice`` (in place where XLA can)."""
  group, state, new_p, sums = layout.groups[gi], list(state), [], []
  for i in group.segments:
    s = layout.segments[i]
    q = {k: jnp.asarray(seg[k], jnp.float32)[i] for k in rule.seg_scalars}
    p = p_leaves[i].reshape(-1)
    g = g_leaves[i].reshape(-1) if rule.reads_grad else jnp.zeros((), jnp.float32)
    st = tuple(lax.slice(x, (s.offset,), (s.offset + s.size,)) for x in state)
    p1, st1 = elementwise.apply_to_leaf(rule, scalars, q, p, g, st)
    new_p.append(p1.reshape(s.shape))
    if rule.writes_state:
      state = [lax.dynamic_update_slice(x, y, (s.offset,)) for x, y in zip(state, st1)]
    if rule.sumsq is not None:
      sums.append(elementwise.leaf_sumsq(rule, scalars, q, p, g, st1))
  if rule.sumsq is not None:
    sums = tuple(jnp.stack([x[t] for x in sums]) for t in range(len(sums[0])))
  return (new_p if rule.writes_param else None), tuple(state), sums or None


@contextlib.contextmanager
def _candidate():
  """backend="jnp" runs its groups through ``by_leaf_run_group`` meanwhile."""
  from fusedopt.kernels import jnp as kj  # pylint: disable=import-outside-toplevel
  old = kj.BACKENDS["jnp"]
  kj.BACKENDS["jnp"] = dataclasses.replace(old, run_group=by_leaf_run_group)
  try:
    yield
  finally:
    kj.BACKENDS["jnp"] = old


def compile_step(tree, optim, backend, sharding):
  """The row of one (tree, optimizer, backend): temp memory, kernels, compile seconds."""
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(s), jnp.dtype(optim.param_dtype)),
                        trees.shapes(tree), is_leaf=trees._is_shape)  # pylint: disable=protected-access
  n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  on_device = lambda t: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), t)
  opt_def = optim.fusedopt_def("jnp" if backend == CANDIDATE else backend)
  row = {"tree": tree, "optim": optim.name, "backend": backend, "param_bytes": n_bytes}
  t0 = time.perf_counter()
  try:
    with common.targeting("gpu", 90), (_candidate() if backend == CANDIDATE
                                       else contextlib.nullcontext()):
      opt = jax.eval_shape(opt_def.create, params)
      step = jax.jit(lambda o, g: o.replace(optimizer_def=opt_def).apply_gradient(g),
                     donate_argnums=0)
      compiled = step.trace(on_device(opt), on_device(params)).lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    row["traceback"] = traceback.format_exc()[-2000:]
    return row
  temp = compiled.memory_analysis().temp_size_in_bytes
  counts = measure.hlo_counts(compiled.as_text())
  row.update(compile_s=round(time.perf_counter() - t0, 2), temp_bytes=int(temp),
             temp_pct=100.0 * temp / n_bytes, fusions=counts["fusions"],
             custom_calls=counts["custom_calls"], copies=counts["by_op"].get("copy", 0))
  return row


def markdown(payload):
  env = payload["env"]
  lines = [f"# A donated step compiled for an H100, without one ({env['date']})", "",
           f"`{payload['command']}` on {env['device']['cpu_model']}: XLA:GPU's compile-only "
           f"topology (no timing), jax {env['versions']['jax']}, commit {env['git_commit']}"
           + (" (dirty)" if env["git_dirty"] else "") + ". Temp: XLA's temporary memory of "
           "the compiled step (issue 21's goal: at most 1% of the params' bytes); fusions, "
           "custom calls (kernels) and copies: the instructions the step launches "
           "(`measure.hlo_counts`), about one launch each.", "",
           "| tree | optimizer | backend | temp MiB | temp % of params | fusions | custom calls "
           "| copies | compile s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in payload["rows"]:
    if "error" in r:
      lines.append(f"| {r['tree']} | {r['optim']} | {r['backend']} | error: {r['error']} "
                   "| | | | | |")
      continue
    lines.append(f"| {r['tree']} | {r['optim']} | {r['backend']} | {r['temp_bytes'] / 2**20:.1f} "
                 f"| {r['temp_pct']:.2f} | {r['fusions']} | {r['custom_calls']} | {r['copies']} "
                 f"| {r['compile_s']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--trees", default="gpt2-124m,resnet50,small-2000")
  ap.add_argument("--optims", default="adam,lamb")
  ap.add_argument("--backends", default="jnp,pallas,triton,mosaic_gpu")
  ap.add_argument("--candidate", action="store_true", help=f"add the {CANDIDATE!r} rows")
  ap.add_argument("--out", default=report.HERE + "/results", help="'' writes no files")
  ap.add_argument("--tag", default="h100-compile")
  args = ap.parse_args(argv)
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    raise SystemExit("bench.compile_only needs jax-cuda12-plugin (the `test` extra has it) for "
                     "XLA:GPU's compile-only topology")
  sys.path.insert(0, report.HERE + "/../tests")
  from kernel_tools import h100_replicated  # pylint: disable=import-outside-toplevel
  sharding = h100_replicated()
  backends = args.backends.split(",") + ([CANDIDATE] if args.candidate else [])
  rows = []
  for tree in args.trees.split(","):
    for o in args.optims.split(","):
      for b in backends:
        rows.append(compile_step(tree, optims.OPTIMS[o], b, sharding))
        r = rows[-1]
        print(f"{tree} {o} {b}: " + (r["error"] if "error" in r else
              f"temp {r['temp_bytes'] / 2**20:.1f} MiB ({r['temp_pct']:.2f}%), "
              f"{r['fusions']} fusions, {r['custom_calls']} custom calls, {r['copies']} copies, "
              f"{r['compile_s']:.1f} s"), flush=True)
  payload = {"env": report.environment(), "command": "python -m bench.compile_only "
             + " ".join(argv), "rows": rows}
  md = markdown(payload)
  print(md)
  if args.out:
    stem = f"cpu-{payload['env']['date']}-{args.tag}"
    for p in report.write(args.out, stem, payload, md):
      print("wrote", p)
  return payload


if __name__ == "__main__":
  main()
