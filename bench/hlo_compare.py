"""Do two versions of fusedopt compile a step to the same program? (``bench/ab.py``'s companion)

    python -m bench.hlo_compare --base 7188fbc [--head REF]

Timing a refactor on a noisy machine can only bound its cost; comparing the compiled programs
can show there is none. For a few optimizers and backends this compiles one jitted, donated
``apply_gradient`` step per version (each in its own worktree and process, as ``bench/ab.py``
does) and compares the optimized HLO's instructions (metadata and kernel target names dropped):
identical instructions run the same kernels and the same fusions.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from bench.ab import ROOT, _checkout, _git

PROBE = r'''
import json, re, sys
import jax, jax.numpy as jnp, numpy as np
import fusedopt as optim
rng = np.random.default_rng(0)
tree = {"a": jnp.asarray(rng.normal(size=(300, 100)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(100,)), jnp.float32),
        "c": jnp.asarray(rng.normal(size=(64, 64)), jnp.bfloat16)}
make = {"Adam": lambda b: optim.Adam(1e-3, weight_decay=1e-2, backend=b),
        "Momentum": lambda b: optim.Momentum(1e-2, beta=0.9, backend=b),
        "LAMB": lambda b: optim.LAMB(1e-3, weight_decay=1e-2, backend=b),
        "LARS": lambda b: optim.LARS(0.1, backend=b)}
out = {}
for name, mk in make.items():
  for b in sys.argv[1].split(","):
    opt = mk(b).create(tree)
    txt = jax.jit(lambda o, g: o.apply_gradient(g), donate_argnums=0).lower(
        opt, tree).compile().as_text()
    lines = []
    for line in txt.splitlines():
      s = line.strip()
      if s.startswith(("%", "ROOT", "ENTRY")):
        s = re.sub(r", metadata=\{[^}]*\}", "", s)
        lines.append(re.sub(r'custom_call_target="[^"]*"', "T", s))
    out[f"{name}/{b}"] = lines
print("HLO " + json.dumps(out))
'''


def _probe(root, backends):
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", PROBE, backends], env=env, cwd=tempfile.gettempdir(),
                        capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("HLO ")]
  if not lines:
    raise RuntimeError(f"probe failed in {root}:\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][4:])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--base", required=True)
  ap.add_argument("--head", default=None, help="git ref (default: the working tree)")
  ap.add_argument("--backends", default="jnp,native")
  args = ap.parse_args(argv)
  tmp = tempfile.mkdtemp(prefix="fusedopt-hlo-")
  worktrees = []
  try:
    base_root = _checkout(args.base, os.path.join(tmp, "base"))
    worktrees.append(base_root)
    head_root = ROOT
    if args.head:
      head_root = _checkout(args.head, os.path.join(tmp, "head"))
      worktrees.append(head_root)
    base, head = _probe(base_root, args.backends), _probe(head_root, args.backends)
  finally:
    for w in worktrees:
      subprocess.run(["git", "worktree", "remove", "--force", w], cwd=ROOT, check=False,
                     capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"| step | {_git('rev-parse', '--short', args.base)} instructions | "
        f"{args.head or 'working tree'} instructions | differing |")
  print("|---|---:|---:|---:|")
  for key in base:
    a, b = base[key], head.get(key, [])
    # instruction names carry counters that shift with unrelated edits: compare without them
    canon = lambda ls: sorted(re.sub(r"[%\w.\-]+(?==| )", "", x) for x in ls)  # noqa: E731
    diff = sum(1 for x, y in zip(canon(a), canon(b)) if x != y) + abs(len(a) - len(b))
    print(f"| {key} | {len(a)} | {len(b)} | {diff} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
