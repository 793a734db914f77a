"""Results: the markdown table and the JSON/markdown files in bench/results/."""
import datetime
import json
import os
import platform
import subprocess

import jax
import optax

import fusedopt

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _mem_total_gib():
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal"):
          return round(int(line.split()[1]) / (1 << 20), 1)
  except OSError:
    pass
  return None


def _git(*args):
  try:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=10).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    return ""


def environment():
  commit = _git("rev-parse", "--short", "HEAD") or os.environ.get("FUSEDOPT_COMMIT", "")
  dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
  return {
      "device": {
          "cpu_model": _cpu_model(),
          "processor": platform.processor(),
          "machine": platform.machine(),
          "cpu_count": os.cpu_count(),
          "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
          "mem_total_gib": _mem_total_gib(),
          "jax_device": f"{jax.devices()[0]} ({jax.devices()[0].device_kind})",
      },
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
                   "optax": optax.__version__, "fusedopt": fusedopt.__version__},
      "git_commit": commit,
      "git_dirty": dirty,
      "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "JAX_PLATFORMS")},
      "date": datetime.date.today().isoformat(),
      "utc_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def _ms(s):
  return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def markdown(results, env, command):
  """The results table plus a short header (device, versions, command)."""
  d = env["device"]
  lines = [
      f"# {jax.default_backend().upper()} benchmark: fusedopt Adam vs optax.adamw ({env['date']})",
      "",
      f"- device: {d['jax_device']}; host {d['cpu_model']}, {d['cpu_count']} CPUs, {d['mem_total_gib']} GiB",
      f"- jax {env['versions']['jax']}, optax {env['versions']['optax']}, "
      f"fusedopt {env['versions']['fusedopt']}, commit {env['git_commit']}"
      f"{' (dirty)' if env['git_dirty'] else ''}",
      f"- command: `{command}`",
      "- step: full jitted update (grads tree in, params + state out, state donated), median "
      "(min-max) of the timed runs, implementations interleaved round-robin in one process",
      "- GB/s: 28 B/param (Adam: read p, g, m, v; write p, m, v) / median step; "
      "% copy: of the same tree's interleaved donated `x * 1.0000001` bandwidth (8 B/elem)",
      "- trace+compile: `jax.jit(f, donate_argnums).trace(...).lower().compile()`; temp: "
      "`memory_analysis().temp_size_in_bytes`",
      "",
      "| tree | leaves | params | impl | step ms median (min-max) | vs optax | GB/s | % copy "
      "| trace+compile s | temp MB | check |",
      "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
  ]
  for tree in results:
    name, n_leaves, n_params = tree["tree"], tree["leaves"], tree["params"]
    copy_bw = tree.get("copy", {}).get("gb_s")
    for r in tree["impls"]:
      chk = r.get("check", {})
      check = "ref" if r["impl"] == "optax" else ("ok" if chk.get("ok") else
                                                   f"MISMATCH ({chk.get('mismatched_elements')})")
      if "step" in r:
        st = r["step"]
        step = f"{_ms(st['median_s'])} ({_ms(st['min_s'])}-{_ms(st['max_s'])})"
        ratio = f"{r['ratio_vs_optax']:.2f}x" if r.get("ratio_vs_optax") else "-"
        bw = f"{r['gb_s']:.1f}"
        pct = f"{r['pct_copy_bw']:.0f}%" if copy_bw else "-"
      else:
        step, ratio, bw, pct = "not timed", "-", "-", "-"
      comp = r.get("compile", {})
      tc = f"{comp['trace_compile_s']:.1f}" if comp else "-"
      temp = f"{comp['temp_bytes'] / 1e6:.1f}" if comp else "-"
      lines.append(f"| {name} | {n_leaves} | {n_params / 1e6:.1f}M | {r['label']} | {step} | "
                   f"{ratio} | {bw} | {pct} | {tc} | {temp} | {check} |")
    if copy_bw:
      cp = tree["copy"]
      lines.append(f"| {name} | | | copy `x*1.0000001` ({cp['mib']} MiB) | "
                   f"{_ms(cp['step']['median_s'])} ({_ms(cp['step']['min_s'])}-"
                   f"{_ms(cp['step']['max_s'])}) | | {copy_bw:.1f} | 100% | | | |")
  return "\n".join(lines) + "\n"


def write(out_dir, stem, payload, md):
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for ext, text in (("json", json.dumps(payload, indent=1) + "\n"), ("md", md)):
    path = os.path.join(out_dir, f"{stem}.{ext}")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
    paths.append(path)
  return paths
