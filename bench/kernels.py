"""Kernel roofline: every optimizer's update over one big flat buffer vs same-run copy bandwidth.

  python -m bench.kernels                       # 2^28 float32 elements on GPU, 2^22 on CPU
  python -m bench.kernels --log2n 26 --optims adam,momentum --impls pallas,jnp
  python -m bench.kernels --sweep               # also tune block size x num_warps for Adam
  python -m bench.kernels --device gpu          # on a GPU: pallas, triton, jnp and torch side by side

Each optimizer runs through the public API on a one-leaf tree ``{"w": f32[n]}`` (so the layout
adds no copies), jitted with the optimizer donated; per implementation the median and min-max of
``--repeats`` runs of ``--inner`` steps. "GB/s" counts the traffic a perfect fused kernel needs
(bytes/param below; LAMB's 40 assumes norms fused into the passes), and "% copy" relates it to a
donated ``x * 1.0000001`` over an equally large buffer timed in the same run (8 B/elem).
``torch`` (``torch.optim.AdamW(fused=True)`` and ``(foreach=True)``) joins when torch with CUDA
is importable. ``triton`` (the hand-written jax-triton kernels, ``fusedopt.kernels.triton``) joins
where it can run (a CUDA GPU with triton and jax-triton), ``mosaic_gpu`` on Hopper and newer;
``--sweep`` tunes the Pallas, Triton and Mosaic GPU kernels. Writes ``bench/results/kernels-<platform>-<date>.{json,md}``.
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import fusedopt
from fusedopt.kernels import pallas as kp
from fusedopt.kernels import triton as kt

from . import report

# optimizer -> (constructor, kwargs, ideal fp32 bytes per parameter)
OPTIMS = {
    "sgd": ("GradientDescent", {}, 12),
    "momentum": ("Momentum", {"weight_decay": 1e-4}, 20),
    "nesterov": ("Momentum", {"nesterov": True}, 20),
    "adam": ("Adam", {"weight_decay": 1e-4}, 28),
    "adagrad": ("Adagrad", {}, 20),
    "rmsprop": ("RMSProp", {}, 20),
    "rmsprop_centered": ("RMSProp", {"centered": True}, 28),
    "adabelief": ("AdaBelief", {}, 28),
    "adadelta": ("Adadelta", {}, 28),
    "lamb": ("LAMB", {"weight_decay": 1e-2}, 40),
    "lars": ("LARS", {}, 28),
}


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def _time(fn, carry, inner, repeats, warmup=2):
  for _ in range(warmup):
    carry = fn(carry)
  jax.block_until_ready(carry)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(inner):
      carry = fn(carry)
    jax.block_until_ready(carry)
    times.append((time.perf_counter() - t) / inner)
  return times, carry


def _stats(times, nbytes):
  med = statistics.median(times)
  return {"median_s": med, "min_s": min(times), "max_s": max(times), "gb_s": nbytes / med / 1e9}


def bench_copy(n, inner, repeats):
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda x: x * jnp.float32(1.0000001), donate_argnums=0)
  times, _ = _time(f, x, inner, repeats)
  return _stats(times, 8 * n)


def bench_fusedopt(opt_name, backend, n, inner, repeats):
  cls, kw, bpp = OPTIMS[opt_name]
  p = {"w": jnp.full((n,), 0.5, jnp.float32)}
  g = {"w": jnp.full((n,), 1e-3, jnp.float32)}
  opt = jax.jit(getattr(fusedopt, cls)(learning_rate=1e-3, backend=backend, **kw).create)(p)
  del p
  lr = jnp.float32(1e-3)
  step = jax.jit(lambda o, g, lr: o.apply_gradient(g, learning_rate=lr), donate_argnums=0)
  t = time.perf_counter()
  compiled = step.lower(opt, g, lr).compile()
  compile_s = time.perf_counter() - t
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  times, opt = _time(lambda o: step(o, g, lr), opt, inner, repeats)
  w = np.asarray(opt.target["w"][:4])
  out = _stats(times, bpp * n)
  out.update(compile_s=compile_s, temp_bytes=temp, bytes_per_param=bpp,
             finite=bool(np.all(np.isfinite(w))))
  return out


def bench_torch(n, inner, repeats, mode):
  import torch  # pylint: disable=import-outside-toplevel
  p = torch.nn.Parameter(torch.full((n,), 0.5, device="cuda"))
  p.grad = torch.full((n,), 1e-3, device="cuda")
  opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=1e-4, **{mode: True})

  def run():
    opt.step()
  for _ in range(3):
    run()
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(inner):
      run()
    torch.cuda.synchronize()
    times.append((time.perf_counter() - t) / inner)
  del opt, p
  torch.cuda.empty_cache()
  return _stats(times, 28 * n)


def _torch_cuda():
  try:
    import torch  # pylint: disable=import-outside-toplevel
    return torch.cuda.is_available()
  except ImportError:
    return False


def _sweep(name, table, backend, configs, n, inner, repeats):
  """Adam fp32 on ``backend`` once per ``(label, tuning, fields)`` of ``configs``, with
  ``table[("gpu", 4)]`` (the backend's tuning table) set to ``tuning`` and ``fields`` added to
  the row; rows sorted by median time. A configuration that fails (too many registers, too much
  shared memory) is logged and left out."""
  rows = []
  saved = dict(table)
  try:
    for label, tuning, fields in configs:
      table[("gpu", 4)] = tuning
      jax.clear_caches()
      try:
        r = bench_fusedopt("adam", backend, n, inner, repeats)
      except Exception as e:  # pylint: disable=broad-except
        log(f"  {name} sweep {label}: failed: {str(e)[:200]}")
        continue
      r.update(fields)
      log(f"  {name} sweep {label}: {r['median_s'] * 1e3:.3f} ms {r['gb_s']:.0f} GB/s")
      rows.append(r)
  finally:
    table.clear()
    table.update(saved)
    jax.clear_caches()
  return sorted(rows, key=lambda r: r["median_s"])


def sweep_triton(n, inner, repeats):
  """Adam fp32 on the triton backend over block x num_warps."""
  configs = [(f"block={block:5d} num_warps={nw:2d}", kt.Tuning(block=block, num_warps=nw),
              dict(block=block, num_warps=nw))
             for block in (1024, 2048, 4096, 8192, 16384) for nw in (2, 4, 8, 16)]
  return _sweep("triton", kt.DEFAULT_TUNING, "triton", configs, n, inner, repeats)


def sweep_mosaic(n, inner, repeats):
  """Adam fp32 on the mosaic_gpu backend over units per CTA x units per step x stages."""
  from fusedopt.kernels import mosaic_gpu as kmg  # pylint: disable=import-outside-toplevel
  configs = [(f"units/CTA={units:2d} units/step={su} stages={st}",
              kmg.MosaicTuning(block=units * kmg.ALIGN, num_stages=st, step_units=su),
              dict(block=units * kmg.ALIGN, num_stages=st, step_units=su))
             for units in (4, 16, 64) for su in (1, 2, 4) for st in (2, 3)]
  return _sweep("mosaic", kmg.DEFAULT_TUNING, "mosaic_gpu", configs, n, inner, repeats)


def sweep(n, inner, repeats):
  """Adam fp32 on the pallas backend over block_rows x num_warps."""
  configs = [(f"block_rows={br:2d} ({br * 1024} elems) num_warps={nw}",
              kp.Tuning(block=br * kp.ALIGN, num_warps=nw), dict(block_rows=br, num_warps=nw))
             for br in (1, 2, 4, 8, 16) for nw in (2, 4, 8)]
  return _sweep("pallas", kp.DEFAULT_TUNING, "pallas", configs, n, inner, repeats)


def main(argv=None):
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--device", choices=("cpu", "gpu", "tpu"), default=None)
  known, _ = pre.parse_known_args(argv)
  if known.device:   # before jax picks its backend
    jax.config.update("jax_platforms", {"gpu": "cuda,cpu", "cpu": "cpu", "tpu": "tpu,cpu"}[
        known.device])
  on_accel = jax.default_backend() != "cpu"
  ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--device", choices=("cpu", "gpu", "tpu"), default=None,
                  help="the jax platform (default: jax's default backend)")
  ap.add_argument("--log2n", type=int, default=28 if on_accel else 22)
  ap.add_argument("--optims", default=",".join(OPTIMS))
  ap.add_argument("--impls", default=None,
                  help="comma-separated from pallas,triton,jnp,native,torch (default: those "
                  "available)")
  ap.add_argument("--inner", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--sweep", action="store_true")
  ap.add_argument("--out", default=os.path.join(report.HERE, "results"))
  ap.add_argument("--tag", default=None, help="kernels-<device>-<date>-<tag>.{md,json}")
  args = ap.parse_args(argv)
  avail = [b for b in ("pallas", "mosaic_gpu", "triton", "native", "jnp")
           if b in fusedopt.available_backends()]
  if _torch_cuda():
    avail.append("torch")
  impls = args.impls.split(",") if args.impls else avail
  missing = [i for i in impls if i not in avail]
  if missing:   # named but not runnable here (torch without CUDA, mosaic_gpu before Hopper)
    log(f"skipping {', '.join(missing)}: not available here")
    impls = [i for i in impls if i in avail]
  n = 1 << args.log2n
  env = report.environment()
  log(f"{env['device']['jax_device']}: n = 2^{args.log2n}; impls {impls}")

  results = {"n": n, "copy": bench_copy(n, args.inner, args.repeats), "rows": []}
  copy_bw = results["copy"]["gb_s"]
  log(f"  copy {results['copy']['median_s'] * 1e3:.3f} ms  {copy_bw:.0f} GB/s")
  for o in args.optims.split(","):
    for impl in impls:
      if impl == "torch":
        if o != "adam":
          continue
        rows = []
        for mode in ("fused", "foreach"):
          r = bench_torch(n, args.inner, args.repeats, mode)
          r.update(optim=o, impl=f"torch AdamW {mode}=True", bytes_per_param=28)
          rows.append(r)
      else:
        r = bench_fusedopt(o, impl, n, args.inner, args.repeats)
        r.update(optim=o, impl=impl)
        rows = [r]
      for r in rows:
        r["pct_copy"] = 100 * r["gb_s"] / copy_bw
        results["rows"].append(r)
        log(f"  {o:16s} {r['impl']:22s} {r['median_s'] * 1e3:8.3f} ms  {r['gb_s']:6.0f} GB/s  "
            f"{r['pct_copy']:5.1f}% of copy")
    results["copy_after_" + o] = bench_copy(n, args.inner, args.repeats)["gb_s"]
  if args.sweep and jax.default_backend() == "gpu":
    if "pallas" in impls:
      results["sweep"] = sweep(n, args.inner, args.repeats)
    if "triton" in impls:
      results["sweep_triton"] = sweep_triton(n, args.inner, args.repeats)
    if "mosaic_gpu" in impls:
      results["sweep_mosaic"] = sweep_mosaic(n, args.inner, args.repeats)

  md = markdown(results, env, "python -m bench.kernels " + " ".join(argv or sys.argv[1:]))
  print(md)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, report.free_stem(
        args.out, f"kernels-{jax.default_backend()}-{env['date']}"
        + (f"-{args.tag}" if args.tag else "")))
    with open(stem + ".json", "w") as f:
      json.dump(dict(env, results=results), f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
      f.write(md)
    log(f"wrote {stem}.json, {stem}.md")


def markdown(results, env, command):
  d = env["device"]
  copy = results["copy"]
  lines = [
      f"# Kernel roofline ({env['date']}): one flat float32 buffer of {results['n']:,} elements",
      "",
      f"- device: {d['jax_device']}; jax {env['versions']['jax']}, commit {env['git_commit']}"
      f"{' (dirty)' if env['git_dirty'] else ''}",
      f"- command: `{command}`",
      f"- same-run copy (`x * 1.0000001`, donated, 8 B/elem): {copy['median_s'] * 1e3:.3f} ms, "
      f"{copy['gb_s']:.0f} GB/s",
      "- each row: full jitted optimizer step through the public API, donated; GB/s counts the "
      "ideal bytes/param of a fused kernel",
      "",
      "| optimizer | impl | B/param | ms median (min-max) | GB/s | % copy | compile s |",
      "|---|---|---:|---|---:|---:|---:|",
  ]
  for r in results["rows"]:
    lines.append(
        f"| {r['optim']} | {r['impl']} | {r['bytes_per_param']} | {r['median_s'] * 1e3:.3f} "
        f"({r['min_s'] * 1e3:.3f}-{r['max_s'] * 1e3:.3f}) | {r['gb_s']:.0f} | "
        f"{r['pct_copy']:.1f} | {r.get('compile_s', float('nan')):.2f} |")
  ms_gbs = [("ms", lambda r: f"{r['median_s'] * 1e3:.3f}"), ("GB/s", lambda r: f"{r['gb_s']:.0f}")]
  tables = [
      ("sweep", "Adam fp32 block sweep (pallas)",
       [("block_rows", lambda r: r["block_rows"]),
        ("elements/program", lambda r: r["block_rows"] * 1024),
        ("num_warps", lambda r: r["num_warps"])]),
      ("sweep_triton", "Adam fp32 block sweep (triton)",
       [("block (elements/program)", lambda r: r["block"]),
        ("num_warps", lambda r: r["num_warps"])]),
      ("sweep_mosaic", "Adam fp32 sweep (mosaic_gpu)",
       [("elements/CTA", lambda r: r["block"]), ("units/step", lambda r: r["step_units"]),
        ("stages", lambda r: r["num_stages"])])]
  for key, title, cols in tables:
    if key in results:
      cols = cols + ms_gbs
      lines += ["", f"{title}:", "", "| " + " | ".join(h for h, _ in cols) + " |",
                "|" + "---:|" * len(cols)]
      lines += ["| " + " | ".join(str(f(r)) for _, f in cols) + " |" for r in results[key]]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
