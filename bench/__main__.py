"""CPU benchmark of one Adam step: optax.adamw per leaf vs fusedopt Adam (native, jnp backends).

  python -m bench                      # gpt2-124m, resnet50, small-2000 (about 6-10 minutes)
  python -m bench --quick              # gpt-10m and small-200 (under a minute)
  python -m bench --trees resnet50 --impls optax,native --repeats 20 --out /tmp/res

For each tree, all implementations live in one process and are timed round-robin (plus a
donated ``x * 1.0000001`` over a big buffer, the same-run bandwidth reference), so machine noise
hits them alike. Per implementation: trace+lower+compile time and XLA's temp memory of the
jitted step; 3 steps then a check of params and first moment against optax (rtol 1e-4; a
mismatching implementation is reported and not timed); warm-up steps; timed steps
(``jax.block_until_ready``). Writes ``<out>/<platform>-<date>[-tag].json`` and ``.md``.
"""
import argparse
import gc
import os
import shlex
import sys
import time

import jax
import numpy as np

from . import impls as impls_mod
from . import measure, report, trees

CHECK_STEPS = 3
RTOL, ATOL = 1e-4, 1e-6


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def parse_args(argv):
  ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true",
                  help=f"trees {','.join(trees.QUICK_TREES)} and a 256 MiB copy buffer")
  ap.add_argument("--trees", help=f"comma-separated, from {','.join(trees.TREES)} "
                  f"(default {','.join(trees.DEFAULT_TREES)})")
  ap.add_argument("--impls", default=",".join(impls_mod.default_impls()),
                  help="comma-separated, from optax,auto,native,jnp,pallas (default: optax, auto and the "
                  "fusedopt backends available here)")
  ap.add_argument("--repeats", type=int, default=10, help="timed steps per implementation")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the check steps")
  ap.add_argument("--copy-mib", type=int, default=None,
                  help="size of the copy-bandwidth buffer (default 1024, 256 with --quick)")
  ap.add_argument("--out", default=os.path.join(report.HERE, "results"),
                  help="directory for the results files ('' to write none)")
  ap.add_argument("--tag", default=None,
                  help="file name suffix (default: 'quick' with --quick, 'custom' with "
                  "non-default trees/impls, none for the default run)")
  args = ap.parse_args(argv)
  default_trees = trees.QUICK_TREES if args.quick else trees.DEFAULT_TREES
  args.tree_list = args.trees.split(",") if args.trees else list(default_trees)
  args.impl_list = args.impls.split(",")
  for t in args.tree_list:
    if t not in trees.TREES:
      ap.error(f"unknown tree {t!r}; choose from {','.join(trees.TREES)}")
  for i in args.impl_list:
    if i not in impls_mod.ALL_IMPLS:
      ap.error(f"unknown impl {i!r}; choose from {','.join(impls_mod.ALL_IMPLS)}")
  if args.copy_mib is None:
    args.copy_mib = 256 if args.quick else 1024
  if args.tag is None:
    if args.quick:
      args.tag = "quick"
    elif args.trees or args.impls != ",".join(impls_mod.default_impls()):
      args.tag = "custom"
  return args


def bench_tree(name, args):
  shapes = trees.shapes(name)
  n_params, n_leaves = trees.num_params(shapes), trees.num_leaves(shapes)
  log(f"\n== {name}: {n_leaves} leaves, {n_params / 1e6:.2f}M params")
  p0 = trees.host_tree(shapes, seed=0, scale=0.02)
  grads = jax.device_put(trees.host_tree(shapes, seed=1, scale=0.01))
  lr = impls_mod.lr_array()
  out = {"tree": name, "leaves": n_leaves, "params": n_params, "impls": []}

  runners, snaps = [], {}
  for impl_name in args.impl_list:
    impl = impls_mod.make(impl_name)
    r = measure.Runner(impl, p0, grads, lr)
    r.compile()
    t = time.perf_counter()
    jax.block_until_ready(r.step())
    r.info["first_call_s"] = time.perf_counter() - t
    for _ in range(CHECK_STEPS - 1):
      r.step()
    jax.block_until_ready(r.carry)
    snaps[impl_name] = (r.params_host(), jax.tree_util.tree_map(np.array, impl.first_moment(r.carry)))
    i = r.info
    log(f"  {impl_name:6s} init {i['init_s']:.1f}s  trace {i['trace_s']:.1f}s  lower "
        f"{i['lower_s']:.1f}s  compile {i['compile_s']:.1f}s  first call {i['first_call_s']:.2f}s"
        f"  temp {i['temp_bytes'] / 1e6:.1f} MB")
    runners.append(r)

  # Correctness after CHECK_STEPS steps, against optax.
  active = []
  for r in runners:
    rec = {"impl": r.impl.name, "label": r.impl.label, "compile": dict(r.info)}
    out["impls"].append(rec)
    if r.impl.name == "optax" or "optax" not in snaps:
      rec["check"] = {"ok": True, "reference": r.impl.name == "optax",
                      "note": "reference" if r.impl.name == "optax" else "no optax reference"}
      active.append((r, rec))
      continue
    ref_p, ref_m = snaps["optax"]
    got_p, got_m = snaps[r.impl.name]
    chk = measure.compare(ref_p, got_p, RTOL, ATOL)
    chk["first_moment"] = measure.compare(ref_m, got_m, RTOL, ATOL)
    chk["update_rel_err"] = measure.delta_rel_err(p0, ref_p, got_p)
    chk["ok"] = bool(chk["ok"] and chk["first_moment"]["ok"])
    chk.update(steps=CHECK_STEPS, rtol=RTOL, atol=ATOL)
    rec["check"] = chk
    log(f"  check {r.impl.name} vs optax after {CHECK_STEPS} steps: "
        f"{'ok' if chk['ok'] else 'MISMATCH'} (params max|diff| {chk['max_abs_diff']:.2e}, "
        f"update rel err {chk['update_rel_err']:.2e}, m max|diff| "
        f"{chk['first_moment']['max_abs_diff']:.2e})")
    if chk["ok"]:
      active.append((r, rec))
    else:
      r.close()
  del snaps
  gc.collect()

  # Warm-up, then timed steps round-robin (rotating the order each round).
  copy = measure.CopyRunner(args.copy_mib)
  timed = [r for r, _ in active] + [copy]
  for _ in range(args.warmup):
    for r in timed:
      jax.block_until_ready(r.step())
  for k in range(args.repeats):
    for j in range(len(timed)):
      timed[(j + k) % len(timed)].timed_step()

  copy_stats = measure.summarize(copy.times)
  copy_bw = copy.bytes_moved / copy_stats["median_s"] / 1e9
  out["copy"] = {"mib": args.copy_mib, "bytes_per_run": copy.bytes_moved, "step": copy_stats,
                 "gb_s": copy_bw}
  copy.close()
  optax_med = next((measure.summarize(r.times)["median_s"] for r, rec in active
                    if r.impl.name == "optax"), None)
  for r, rec in active:
    st = measure.summarize(r.times)
    rec["step"] = st
    rec["gb_s"] = measure.BYTES_PER_PARAM * n_params / st["median_s"] / 1e9
    rec["pct_copy_bw"] = 100.0 * rec["gb_s"] / copy_bw
    rec["ratio_vs_optax"] = st["median_s"] / optax_med if optax_med else None
    log(f"  {r.impl.name:6s} step {st['median_s'] * 1e3:8.1f} ms (min {st['min_s'] * 1e3:.1f}, "
        f"max {st['max_s'] * 1e3:.1f})  {rec['gb_s']:.1f} GB/s  {rec['pct_copy_bw']:.0f}% of copy"
        + (f"  {rec['ratio_vs_optax']:.2f}x optax" if optax_med else ""))
    r.close()
  log(f"  copy   {copy_stats['median_s'] * 1e3:8.1f} ms  {copy_bw:.1f} GB/s")
  out["notes"] = notes(out)
  return out


def notes(tree):
  """Things worth a second look: fusedopt slower than optax, temp memory over budget."""
  n = tree["params"]
  budget = 4 * n + 0.1 * 4 * n  # grads size + 10% of params (float32)
  found = []
  for rec in tree["impls"]:
    if rec["impl"] == "optax":
      continue
    if not rec["check"].get("ok"):
      found.append(f"{tree['tree']}/{rec['impl']}: does not match optax (not timed)")
    ratio = rec.get("ratio_vs_optax")
    if ratio and ratio > 1.0:
      found.append(f"{tree['tree']}/{rec['impl']}: slower than optax ({ratio:.2f}x)")
    temp = rec["compile"]["temp_bytes"]
    if temp > budget:
      found.append(f"{tree['tree']}/{rec['impl']}: temp memory {temp / 1e6:.1f} MB > grads + 10% "
                   f"params ({budget / 1e6:.1f} MB)")
  return found


def main(argv=None):
  args = parse_args(argv)
  command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
  t_start = time.perf_counter()
  env = report.environment()
  log(f"{env['device']['jax_device']}; {env['device']['cpu_model']}, {env['device']['cpu_count']} CPUs; jax "
      f"{env['versions']['jax']}, optax {env['versions']['optax']}; trees {args.tree_list}; "
      f"impls {args.impl_list}; {args.repeats} timed runs after {CHECK_STEPS} check + "
      f"{args.warmup} warm-up steps")
  results = [bench_tree(t, args) for t in args.tree_list]
  total = time.perf_counter() - t_start
  md = report.markdown(results, env, command.strip())
  all_notes = [x for t in results for x in t["notes"]]
  md += "\n" + (("Notes:\n" + "".join(f"- {x}\n" for x in all_notes)) if all_notes else "")
  md += f"\nTotal runtime: {total:.0f} s\n"
  print(md)
  payload = dict(env, command=command.strip(), total_runtime_s=total,
                 settings={"trees": args.tree_list, "impls": args.impl_list,
                           "repeats": args.repeats, "warmup": args.warmup,
                           "check_steps": CHECK_STEPS, "rtol": RTOL, "atol": ATOL,
                           "copy_mib": args.copy_mib, "hyper_params": impls_mod.HP,
                           "bytes_per_param": measure.BYTES_PER_PARAM},
                 results=results, notes=all_notes)
  if args.out:
    stem = f"{jax.default_backend()}-{env['date']}" + (f"-{args.tag}" if args.tag else "")
    for p in report.write(args.out, stem, payload, md):
      log(f"wrote {p}")


if __name__ == "__main__":
  main()
