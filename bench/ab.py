"""Two versions of fusedopt, benchmarked in alternation: did a change make a step slower?

    python -m bench.ab --base 7188fbc [--head HEAD] [--rounds 3] [-- bench options]

Each version is a detached ``git worktree`` of the repository (``--head`` defaults to the
working tree itself). Both are timed by the *same* harness -- this checkout's ``bench`` package,
copied once -- so only the library differs. The rounds alternate the order (base, head), (head,
base), ... so that drift of a noisy machine hits both alike; each round is one ``python -m bench``
process per version. Per (tree, optimizer, implementation) the result is the median over rounds
of each round's median step time, and the ratio head / base. ``python -m bench.ab`` writes
``bench/results/<platform>-<date>-ab[-tag].md`` and ``.json``.
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from bench.report import _cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BENCH_ARGS = ["--impls", "auto,jnp", "--optims", "adam,momentum,lamb"]


def _git(*args, cwd=ROOT):
  return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                        text=True).stdout.strip()


def _checkout(ref, where):
  """A detached worktree of ``ref`` at ``where`` whose ``fusedopt.kernels`` imports from its own
  ``kernels/`` (installed checkouts map it through ``package-dir``; here a symlink does)."""
  _git("worktree", "add", "--detach", where, ref)
  link = os.path.join(where, "fusedopt", "kernels")
  if not os.path.exists(link):
    os.symlink(os.path.join("..", "kernels"), link)
  return where


def _run(version_root, harness, out, bench_args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([version_root, harness]),
             JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  cmd = [sys.executable, "-m", "bench", "--out", out, "--no-plots", "--no-progress",
         "--overwrite", *bench_args]
  proc = subprocess.run(cmd, cwd=harness, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed in {version_root}:\n{proc.stderr[-3000:]}")
  files = [f for f in os.listdir(out) if f.endswith(".json")]
  with open(os.path.join(out, files[0])) as f:
    return json.load(f)


def _medians(result):
  """(tree, optim, impl) -> median step seconds of one bench run."""
  out = {}
  for row in result["results"]:
    for impl in row["impls"]:
      step = impl.get("step") or {}
      if "median_s" in step:
        out[(row["tree"], row["optim"], impl["impl"])] = step["median_s"]
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--base", required=True, help="git ref of the version compared against")
  ap.add_argument("--head", default=None, help="git ref (default: the working tree)")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--tag", default="")
  ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
  ap.add_argument("bench_args", nargs="*", help=f"after --: python -m bench options "
                  f"(default {' '.join(DEFAULT_BENCH_ARGS)})")
  args = ap.parse_args(argv)
  bench_args = args.bench_args or DEFAULT_BENCH_ARGS
  tmp = tempfile.mkdtemp(prefix="fusedopt-ab-")
  worktrees = []
  try:
    harness = os.path.join(tmp, "harness")
    os.makedirs(harness)
    shutil.copytree(os.path.join(ROOT, "bench"), os.path.join(harness, "bench"),
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    roots = {"base": _checkout(args.base, os.path.join(tmp, "base"))}
    worktrees.append(roots["base"])
    if args.head is None:
      roots["head"] = ROOT
    else:
      roots["head"] = _checkout(args.head, os.path.join(tmp, "head"))
      worktrees.append(roots["head"])
    commits = {"base": _git("rev-parse", "--short", args.base),
               "head": _git("rev-parse", "--short", args.head or "HEAD")
               + ("" if args.head or not _git("status", "--porcelain", "--untracked-files=no")
                  else " + uncommitted changes")}
    runs = {"base": [], "head": []}
    for r in range(args.rounds):
      for v in (("base", "head") if r % 2 == 0 else ("head", "base")):
        out = os.path.join(tmp, f"{v}-{r}")
        print(f"round {r + 1}/{args.rounds}: {v} ({commits[v]})", file=sys.stderr, flush=True)
        runs[v].append(_medians(_run(roots[v], harness, out, bench_args)))
    keys = sorted(set.intersection(*(set(m) for v in runs for m in runs[v])))
    rows = []
    for k in keys:
      base = statistics.median(m[k] for m in runs["base"])
      head = statistics.median(m[k] for m in runs["head"])
      rows.append({"tree": k[0], "optim": k[1], "impl": k[2], "base_ms": base * 1e3,
                   "head_ms": head * 1e3, "ratio": head / base,
                   "base_rounds_ms": [m[k] * 1e3 for m in runs["base"]],
                   "head_rounds_ms": [m[k] * 1e3 for m in runs["head"]]})
  finally:
    for w in worktrees:
      subprocess.run(["git", "worktree", "remove", "--force", w], cwd=ROOT, check=False,
                     capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)
  ratios = [r["ratio"] for r in rows]
  summary = (f"median ratio head/base {statistics.median(ratios):.3f} over {len(rows)} rows "
             f"(min {min(ratios):.3f}, max {max(ratios):.3f})") if rows else "no common rows"
  date = datetime.date.today().isoformat()
  stem = f"cpu-{date}-ab" + (f"-{args.tag}" if args.tag else "")
  lines = [f"# A/B: {commits['head']} vs {commits['base']}", "",
           f"`python -m bench.ab --base {args.base}"
           + (f" --head {args.head}" if args.head else "") + f" --rounds {args.rounds} -- "
           + " ".join(bench_args) + "`", "",
           f"Machine: {_cpu_model()}, {os.cpu_count()} cores; "
           f"{date}. Each version ran {args.rounds} times, alternating; per row the median over "
           "rounds of each run's median step time (ms).", "", f"**{summary}**", "",
           "| tree | optimizer | impl | base ms | head ms | head/base | rounds base | rounds head |",
           "|---|---|---|---:|---:|---:|---|---|"]
  for r in rows:
    lines.append(f"| {r['tree']} | {r['optim']} | {r['impl']} | {r['base_ms']:.3f} | "
                 f"{r['head_ms']:.3f} | {r['ratio']:.3f} | "
                 f"{', '.join(f'{x:.2f}' for x in r['base_rounds_ms'])} | "
                 f"{', '.join(f'{x:.2f}' for x in r['head_rounds_ms'])} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
      f.write(text)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
      json.dump({"base": commits["base"], "head": commits["head"], "bench_args": bench_args,
                 "rounds": args.rounds, "rows": rows, "summary": summary}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
