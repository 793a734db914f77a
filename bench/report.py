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


def mem_available_bytes():
  """MemAvailable from /proc/meminfo (8 GiB where there is none)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 8 << 30


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
  """Milliseconds to three significant digits (at least one decimal)."""
  ms = s * 1e3
  return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 \
      else f"{ms:.0f}"


def _ratio(r, base=False):
  if base:
    return "base"
  if r and r.get("paired") is False:
    return f"{r['median']:.2f}x (of medians)"
  return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})" if r else "-"


def _step(st):
  return f"{_ms(st['median_s'])} ({_ms(st['min_s'])}-{_ms(st['max_s'])})"


def _check(rec, reference):
  chk = rec.get("check", {})
  if rec.get("error"):
    return "FAILED"
  if chk.get("reference"):
    return "ref"
  if chk.get("compared") is False:
    return "not compared (below)"
  if chk.get("ok"):
    return f"ok vs {reference}" + (f" ({chk['sr_diverged']} elements diverged by stochastic "
                                   "rounding)" if chk.get("sr_diverged") else "")
  if "error" in chk:
    return f"MISMATCH vs {reference} ({chk['error']})"
  return (f"MISMATCH vs {reference} ({chk.get('mismatched_elements', 0)} elements, update rel err "
          f"{chk.get('update_rel_err', float('nan')):.1e})")


def _kernels(comp):
  hlo = comp.get("hlo") if comp else None
  if not hlo or "kernels" not in hlo:
    return "-"
  return f"{hlo['kernels']} ({hlo['fusions']}/{hlo['custom_calls']})"


def header(payload, plots):
  """Device, versions, command, and what each column means."""
  env = payload
  d = env["device"]
  v = env["versions"]
  lines = [
      f"# {jax.default_backend().upper()} benchmark: fusedopt vs its peers, one full optimizer "
      f"step ({env['date']})",
      "",
      f"- device: {d['jax_device']}; host {d['cpu_model']}, {d['cpu_count']} CPUs, "
      f"{d['mem_total_gib']} GiB",
      f"- jax {v['jax']}, optax {v['optax']}, fusedopt {v['fusedopt']}"
      + (f", torch {v['torch']}" if v.get("torch") else "") + f", commit {env['git_commit']}"
      f"{' (dirty)' if env['git_dirty'] else ''}",
      f"- command: `{payload['command']}`",
      "- step: full jitted update (grads tree in, params + state out, state donated), median "
      "(min-max) of the timed runs; implementations interleaved round-robin in one process",
      "- vs optax / vs torch fused: run-by-run ratio of step times to that implementation's step in "
      "the same round, median (min-max)",
      "- GB/s: the optimizer's bytes-per-step model (B/param in each heading) / median step; "
      "% copy: of the same group's interleaved donated `x * 1.0000001` bandwidth (8 B/elem), "
      "the roofline",
      "- trace+compile: `jax.jit(f, donate_argnums).trace(...).lower().compile()` in this run (in "
      "brackets with `--fresh-compile`: in a fresh process, `bench/compile_probe.py`); temp: "
      "`memory_analysis().temp_size_in_bytes`; kernels: kernel-launching instructions of the "
      "compiled step (fusions/custom-calls in brackets)",
      f"- check: params and first moment after {payload['settings']['check_steps']} steps vs the "
      f"reference, rtol {payload['settings']['rtol']}, atol {payload['settings']['atol']}, and "
      f"the params' change within {payload['settings']['update_rtol']:g} (relative) of the "
      "reference's",
      "",
  ]
  for kind, title in (("time", "Step time vs parameter count"),
                      ("roofline", "% of copy bandwidth")):
    if kind in plots:
      lines += [f"![{title}, {d['jax_device']}, {env['date']}]({plots[kind]})", ""]
  return lines


def markdown(payload, plots=None):
  """The header plus one table per optimizer, the skipped implementations and the notes."""
  results = payload["results"]
  lines = header(payload, plots or {})
  lines += [f"**{x}**" for x in payload.get("notes", []) if x.startswith("PARTIAL RUN")]
  lines += [""] if lines[-1].startswith("**PARTIAL RUN") else []
  for optim in dict.fromkeys(g["optim"] for g in results):
    groups = [g for g in results if g["optim"] == optim]
    bpp = sorted({round(g["bytes_per_param"], 1) for g in groups})
    bpp = f"{bpp[0]:g}" if len(bpp) == 1 else f"{bpp[0]:g}-{bpp[-1]:g}"
    note = payload["settings"].get("bytes_model", {}).get(optim, "")
    variant = payload["settings"].get("variants", {}).get(optim)
    lines += [f"## {optim} ({bpp} B/param: {note})", ""]
    if variant:
      peer = variant.get("peer")
      lines += [f"{variant['description']}."
                + (f" Peer rows (optax, torch): {peer['what']} ({peer['bytes_per_param']} "
                   "B/param, the GB/s of those rows), "
                   + ("compared with fusedopt's float32 master and first moment."
                      if peer["compared"] else "timed, not compared.") if peer else ""), ""]
    lines += [
        "| tree | leaves | params | impl | step ms median (min-max) | vs optax | vs torch fused "
        "| GB/s | % copy | trace+compile s | temp MB | kernels | check |",
        "|---|---:|---:|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    skipped, uncompared = {}, {}
    for g in groups:
      for rec in g["impls"]:
        comp = rec.get("compile", {})
        if "step" in rec:
          step, bw = _step(rec["step"]), f"{rec['gb_s']:.1f}"
          pct = f"{rec['pct_copy_bw']:.0f}%"
        else:
          step, bw, pct = "not timed", "-", "-"
        jax_row = comp and not rec["impl"].startswith("torch")
        tc = f"{comp['trace_compile_s']:.1f}" if jax_row else "-"
        fresh = rec.get("compile_fresh", {}).get("trace_compile_s")
        if jax_row and fresh is not None:
          tc += f" ({fresh:.1f})"
        temp = f"{comp['temp_bytes'] / 1e6:.1f}" if jax_row else "-"
        if rec.get("check", {}).get("compared") is False:
          uncompared.setdefault(rec["check"].get("note", ""), []).append(rec["impl"])
        lines.append(
            f"| {g['tree']} | {g['leaves']} | {g['params'] / 1e6:.1f}M | {rec['label']} | {step} "
            f"| {_ratio(rec.get('vs_optax'), rec['impl'] == 'optax')} "
            f"| {_ratio(rec.get('vs_torch_fused'), rec['impl'] == 'torch-fused')} | {bw} | {pct} "
            f"| {tc} | {temp} | {_kernels(comp)} | {_check(rec, g['reference'])} |")
      cp = g.get("copy")
      if cp:
        lines.append(f"| {g['tree']} | | | copy `x*1.0000001` ({cp['mib']} MiB) "
                     f"| {_step(cp['step'])} | | | {cp['gb_s']:.1f} | 100% | | | | |")
      fl = g.get("floor")
      if fl:
        lines.append(f"| {g['tree']} | | | dispatch floor: identity over (params, optax state), "
                     f"{fl['buffers']} donated buffers | {_step(fl['step'])} | | | | | | | | |")
      for k, why in g.get("skipped", {}).items():
        skipped.setdefault(k, why)
    if skipped or uncompared:
      lines.append("")
    lines += [f"- not run for {optim}: {k} ({why})" for k, why in skipped.items()]
    lines += [f"- not compared for {optim}: {', '.join(dict.fromkeys(names))} ({why}; timed, "
              "with its own bytes model)" for why, names in uncompared.items()]
    lines.append("")
  if payload.get("notes"):
    lines += ["Notes:", ""] + [f"- {x}" for x in payload["notes"]] + [""]
  lines.append(f"Total runtime: {payload['total_runtime_s']:.0f} s")
  return "\n".join(lines) + "\n"


def free_stem(out_dir, stem, overwrite=False):
  """``stem``, or ``stem-2``, ``stem-3``... so that no earlier results file is replaced."""
  if overwrite:
    return stem
  cand, k = stem, 1
  while os.path.exists(os.path.join(out_dir, cand + ".json")) or \
      os.path.exists(os.path.join(out_dir, cand + ".md")):
    k += 1
    cand = f"{stem}-{k}"
  return cand


def write(out_dir, stem, payload, md):
  """``<stem>.json`` and ``<stem>.md`` in ``out_dir``, each written whole (tmp file + rename)."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for ext, text in (("json", json.dumps(payload, indent=1, default=str) + "\n"), ("md", md)):
    path = os.path.join(out_dir, f"{stem}.{ext}")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
    paths.append(path)
  return paths
