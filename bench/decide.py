"""Which fusedopt backend each optimizer's ``backend="auto"`` should pick, from a results file.

  python -m bench.decide bench/results/gpu-<date>.json [more.json ...]

For every (tree, optimizer) of the results, the fusedopt backends that passed the correctness
check, fastest first (median step time, the ratio to the fastest, temporary memory); then, per
optimizer, the backend fastest on most trees (ties: the larger total time saved). This is the
measurement ``fusedopt.kernels.registry.auto_choice`` cites; ``bench/gpu_run.sh`` prints it at the end of a GPU run.
"""
import collections
import json
import sys

BACKENDS = ("auto", "native", "jnp", "pallas", "mosaic_gpu", "triton")


def rankings(payload):
  """[(tree, optim, [(backend, median_s, temp_bytes), ...] fastest first)] of one results file."""
  out = []
  for res in payload.get("results", []):
    rows = []
    for r in res.get("impls", []):
      if r.get("impl") not in BACKENDS or r["impl"] == "auto":
        continue
      if not (r.get("check") or {}).get("ok", True) or not r.get("step"):
        continue
      rows.append((r["impl"], r["step"]["median_s"],
                   ((r.get("compile") or {}).get("temp_bytes"))))
    if rows:
      out.append((res["tree"], res.get("optim", "adam"), sorted(rows, key=lambda x: x[1])))
  return out


def choose(ranked):
  """{optim: backend}: the backend fastest on most trees, ties broken by the time it saves."""
  wins, saved = collections.defaultdict(collections.Counter), collections.defaultdict(
      collections.Counter)
  for _, optim, rows in ranked:
    best = rows[0]
    wins[optim][best[0]] += 1
    if len(rows) > 1:
      saved[optim][best[0]] += rows[1][1] - best[1]
  return {o: max(w, key=lambda b: (w[b], saved[o][b])) for o, w in wins.items()}


def report(payloads):
  ranked = [x for p in payloads for x in rankings(p)]
  lines = []
  for tree, optim, rows in ranked:
    best = rows[0][1]
    cells = ", ".join(f"{b} {t * 1e3:.2f} ms ({t / best:.2f}x"
                      + (f", temp {m / 2**20:.1f} MiB)" if m is not None else ")")
                      for b, t, m in rows)
    lines.append(f"{tree:14s} {optim:18s} {cells}")
  lines.append("")
  for optim, backend in sorted(choose(ranked).items()):
    lines.append(f"auto for {optim}: {backend}")
  return "\n".join(lines)


def main(argv=None):
  paths = sys.argv[1:] if argv is None else argv
  if not paths:
    print(__doc__)
    return 2
  payloads = []
  for p in paths:
    with open(p) as f:
      payloads.append(json.load(f))
  print(report(payloads))
  return 0


if __name__ == "__main__":
  sys.exit(main())
