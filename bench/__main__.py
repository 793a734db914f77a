"""Benchmark of one full optimizer step: fusedopt against its peers, with a roofline and plots.

  python -m bench                     # CPU default: scale sweep 1M-34M, adam/momentum/lamb (~2 min)
  python -m bench --quick             # gpt-10m and small-200, adam only (under a minute)
  python -m bench --full              # GPT-2 124M, ResNet-50, BERT-base, 2000 leaves, the scale
                                      #   sweep; adam, lamb, momentum, adafactor and the
                                      #   mixed-precision variants (CPU: long; small-2000's
                                      #   per-leaf compiles take minutes each)
  python -m bench --trees gpt2-124m --optims adam,adam-bf16-master,adam-bf16-sr,adam-state-bf16
  python -m bench --sweep --optims adam --impls optax,auto
  python -m bench --device gpu --full --out /tmp/res     # see bench/README.md

For each tree and optimizer, every implementation (bench/impls.py: optax per leaf, optax.flatten,
a flax 0.5.3-style per-leaf loop, each fusedopt backend available, torch's fused/foreach
optimizers where torch with CUDA is importable) lives in one process, and they are timed
round-robin together with a donated ``x * 1.0000001`` over a big buffer (the same-run copy
bandwidth: the roofline), so machine noise hits them alike. Per implementation: trace, lower and
compile time, XLA's temp memory and the compiled step's kernel count; 3 steps, then a check of
params and first moment against the reference (fusedopt's jnp path when it runs, else optax; a
mismatching implementation is reported and not timed); warm-up steps; timed steps
(block until ready). Implementations that do not fit in memory together (``--mem-budget-gib``)
run in batches, each timed round-robin on its own. Effective bandwidth uses each optimizer's
bytes-per-parameter model (bench/optims.py; a mixed-precision variant's peer rows their own). Writes ``<out>/<platform>-<date>[-tag].json`` and ``.md``, and the plots
``-time.png`` (step time vs parameter count) and ``-roofline.png`` (% of copy bandwidth).
"""
import argparse
import gc
import importlib.util
import os
import json
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from . import impls as impls_mod
from . import measure, optims, report, trees

CHECK_STEPS = 3
RTOL, ATOL = 1e-4, 1e-6
# Besides element-wise closeness: the error of the params' change relative to the reference's
# change (``measure.delta_rel_err``). Agreeing implementations stay below 1e-5 after 3 steps; the
# updates are small next to the params, so this catches what rtol on the params alone lets pass.
UPDATE_RTOL = 1e-3
# Mixed-precision variants whose backends may legitimately differ by more than rounding of the
# values themselves (see ``check``): bf16 state lets each param element's change differ by up to
# BF16_STATE_UPDATE_EPS of itself; stochastic rounding lets a fraction SR_DIVERGED_FRACTION of the
# bf16 params differ by up to SR_MAX_ULPS ulps.
BF16_STATE_UPDATE_EPS = 2.0 ** -6
SR_DIVERGED_FRACTION = CHECK_STEPS * 2.0 ** -15   # every element 2 float32 ulps off every step
SR_MAX_ULPS = CHECK_STEPS + 1
SLOWER = 1.05  # a fusedopt row's median paired ratio to optax above this is noted (noise below)
# --device -> jax_platforms (the CPU stays available for host-side work)
DEVICES = {"cpu": "cpu", "gpu": "cuda,cpu", "cuda": "cuda,cpu", "rocm": "rocm,cpu",
           "tpu": "tpu,cpu"}

_BAR = None


def log(*a):
  """stderr, through tqdm while a progress bar is shown (so the bar is not torn)."""
  msg = " ".join(str(x) for x in a)
  if _BAR is not None:
    _BAR.write(msg, file=sys.stderr)
  else:
    print(msg, file=sys.stderr, flush=True)


def _csv(s):
  return [x for x in s.split(",") if x] if s else []


def parse_args(argv):
  ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sizes = ap.add_argument_group("what runs")
  sizes.add_argument("--device", choices=sorted(DEVICES),
                     help="jax platform to run on (default: jax's default backend; 'gpu' sets "
                     "jax_platforms=cuda,cpu before jax starts)")
  sizes.add_argument("--quick", action="store_true",
                     help=f"trees {','.join(trees.QUICK_TREES)}, adam only, 256 MiB copy buffer")
  sizes.add_argument("--full", action="store_true",
                     help=f"trees {','.join(trees.FULL_TREES)} plus the scale sweep, optimizers "
                     f"{','.join(optims.FULL_OPTIMS)}, 1 GiB copy buffer")
  sizes.add_argument("--trees", help="comma-separated, from " + ",".join(trees.TREES) +
                     " (default: the default set below; see --quick, --full)")
  sizes.add_argument("--sweep", action="store_true",
                     help="add the scale sweep (scale-1m ... up to --sweep-max)")
  sizes.add_argument("--sweep-max", choices=trees.SWEEP, default=None,
                     help=f"largest sweep tree (default {trees.SWEEP_MAX_CPU} on CPU, "
                     f"{trees.SWEEP_MAX_ACCEL} on GPU/TPU)")
  sizes.add_argument("--optims", help="comma-separated, from " + ",".join(optims.OPTIMS) +
                     f" (default {','.join(optims.DEFAULT_OPTIMS)})")
  sizes.add_argument("--impls", help="comma-separated, from " + ",".join(impls_mod.ALL_IMPLS) +
                     " (default: the peers, auto and every fusedopt backend compiled here; "
                     "native only by name on CPU, where auto is native; torch-* where torch "
                     "with CUDA is importable)")
  timing = ap.add_argument_group("timing")
  timing.add_argument("--repeats", type=int, default=10, help="timed steps per implementation")
  timing.add_argument("--warmup", type=int, default=2, help="untimed steps after the check steps")
  timing.add_argument("--copy-mib", type=int, default=None,
                      help="size of the copy-bandwidth buffer (default 256, 1024 with --full)")
  timing.add_argument("--dispatch-floor", action="store_true",
                      help="also time the jitted, donated identity over (params, optax state): "
                      "jax's cost of passing that many buffers, under every optax-state row")
  timing.add_argument("--mem-budget-gib", type=float, default=None,
                      help="memory the implementations of one tree may hold at once; more are "
                      "run in batches, each timed round-robin on its own (default: 80%% of the "
                      "accelerator's memory, 70%% of the host's available memory on CPU)")
  out = ap.add_argument_group("output")
  out.add_argument("--out", default=os.path.join(report.HERE, "results"),
                   help="directory for the results files ('' to write none)")
  out.add_argument("--tag", default=None,
                   help="file name suffix (default: 'quick', 'full', 'custom' for non-default "
                   "choices, none for the default run)")
  out.add_argument("--overwrite", action="store_true",
                   help="replace existing results files of the same name (default: add -2, -3)")
  out.add_argument("--no-plots", action="store_true", help="write no PNG plots")
  out.add_argument("--fresh-compile", action="store_true",
                   help="also measure each implementation's trace+compile in a fresh process "
                   "(bench/compile_probe.py; shown in brackets in the table)")
  out.add_argument("--no-progress", action="store_true",
                   help="no progress bar (none either when stderr is not a terminal)")
  args = ap.parse_args(argv)
  if args.quick and args.full:
    ap.error("--quick and --full exclude each other")
  args.parser = ap
  return args


def select_device(device):
  """Points jax at ``device`` before it starts its backends; errors if it cannot run there."""
  if device is None:
    return jax.default_backend()
  try:
    jax.config.update("jax_platforms", DEVICES[device])
    got = jax.default_backend()
  except RuntimeError as e:
    raise SystemExit(f"--device {device}: jax cannot start it: {e}") from e
  want = "gpu" if device in ("gpu", "cuda", "rocm") else device
  if got != want:
    raise SystemExit(f"--device {device}: jax's default backend is {got!r}: jax found no "
                     f"{want} (see its messages above), or had started before the option could "
                     "take effect")
  return got


def resolve(args):
  """Fills in the defaults that depend on the device: trees, optimizers, impls, sizes, tag."""
  ap, backend = args.parser, jax.default_backend()
  default_set = default_trees(backend)
  if args.trees:
    tree_list = _csv(args.trees)
  elif args.quick:
    tree_list = list(trees.QUICK_TREES)
  elif args.full:
    tree_list = list(trees.FULL_TREES) + list(trees.sweep(backend, args.sweep_max))
  else:
    tree_list = list(default_set)
  if args.sweep:
    tree_list += [t for t in trees.sweep(backend, args.sweep_max) if t not in tree_list]
  if args.optims:
    optim_list = _csv(args.optims)
  else:
    optim_list = list(("adam",) if args.quick else
                      optims.FULL_OPTIMS if args.full else optims.DEFAULT_OPTIMS)
  impl_list = _csv(args.impls) or list(impls_mod.default_impls())
  for t in tree_list:
    if t not in trees.TREES:
      ap.error(f"unknown tree {t!r}; choose from {','.join(trees.TREES)}")
  for o in optim_list:
    if o not in optims.OPTIMS:
      ap.error(f"unknown optimizer {o!r}; choose from {','.join(optims.OPTIMS)}")
  for i in impl_list:
    if i not in impls_mod.ALL_IMPLS:
      ap.error(f"unknown impl {i!r}; choose from {','.join(impls_mod.ALL_IMPLS)}")
    if i in impls_mod.TORCH_IMPLS and not impls_mod.torch_cuda():
      ap.error(f"{i}: torch with CUDA is not importable here")
  args.tree_list, args.optim_list, args.impl_list = tree_list, optim_list, impl_list
  if args.copy_mib is None:
    args.copy_mib = 1024 if args.full else 256
  if args.tag is None:
    if args.quick:
      args.tag = "quick"
    elif args.full and not (args.trees or args.optims or args.impls):
      args.tag = "full"
    elif args.trees or args.optims or args.impls or args.sweep or args.full:
      args.tag = "custom"
  return args


def default_trees(backend):
  """The default run's trees: a quick CPU set (``make bench``: under 3 minutes on 2 cores);
  on an accelerator the real models, which take seconds there."""
  if backend == "cpu":
    return ("scale-1m", "scale-3m", "scale-10m", "scale-30m")
  return ("gpt2-124m", "resnet50", "bert-base", "small-2000") + trees.sweep(backend)


# ----------------------------------------------------------------------------- one group

def make_runner(name, optim, p0, grads, lr):
  if name in impls_mod.TORCH_IMPLS:
    return impls_mod.TorchRunner(name, optim, p0, jax.tree_util.tree_map(np.asarray, grads))
  return measure.Runner(impls_mod.make(name, optim), p0, grads, lr)


def setup(name, optim, inputs, lr):
  """Builds, compiles and runs CHECK_STEPS steps of one implementation; (runner, snapshot).

  The snapshot: {"params": host tree, "moment": host vector or None, "master": host leaves of
  the float32 master copy (``master_weights`` variants) or None}."""
  r = make_runner(name, optim, *inputs.for_impl(name), lr)
  r.compile()
  t = time.perf_counter()
  r.sync_step()
  r.info["first_call_s"] = time.perf_counter() - t
  for _ in range(CHECK_STEPS - 1):
    r.sync_step()
  snap = {"params": r.params_host(), "moment": r.moment_host(), "master": r.master_host()}
  i = r.info
  hlo = i.get("hlo") or {}
  log(f"  {name:13s} init {i['init_s']:.1f}s  trace {i['trace_s']:.1f}s  lower {i['lower_s']:.1f}s"
      f"  compile {i['compile_s']:.1f}s  first call {i['first_call_s']:.2f}s  temp "
      f"{i['temp_bytes'] / 1e6:.1f} MB  kernels {hlo.get('kernels', '-')}")
  return r, snap


def _weights(snap, p0):
  """The weights an optimizer updates, as {leaf path: host array}: the float32 master copy where
  there is one (``master_weights``), else the params. A float32 peer's params and a master
  variant's master are the same quantity, so they compare like with like."""
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(p0)[0]]
  leaves = snap["master"] if snap["master"] is not None else \
      jax.tree_util.tree_leaves(snap["params"])
  return dict(zip(paths, leaves))


def _same_dtypes(a, b):
  return [x.dtype for x in jax.tree_util.tree_leaves(a)] == \
      [x.dtype for x in jax.tree_util.tree_leaves(b)]


def check(name, ref_name, snaps, p0, optim=None):
  """One implementation's weights (and first moment) after CHECK_STEPS steps vs the reference.

  Weights: the float32 master copy where an implementation keeps one, else the params
  (``_weights``). Where both keep a master and step on the same dtypes, their (bf16) params are
  compared too. A peer row of a different formulation (``Optim.compared``) is not compared:
  ``{"ok": True, "compared": False, "note": why}``; it is timed.

  Values stored in bf16 are allowed one bf16 ulp (``measure.compare``). Two variants need more,
  because fusedopt's backends agree to the last float32 bit only mostly (XLA contracts FMAs, the
  native kernels round every operation: on GPT-2 124M native and jnp Adam differ by ~1e-8):
  - bf16 state (``state_dtype``): a last-bit difference can round a moment to the neighbouring
    bf16 value (2^-8..2^-7 relative), which changes that element's later updates by about as
    much: each param element may differ by BF16_STATE_UPDATE_EPS of its own change (2^-6).
  - stochastic rounding: a last-bit difference of the float32 value rounds it to the other bf16
    neighbour with probability ~2^-16, and from then on that element's hash inputs differ, so its
    roundings are independent (up to one more ulp per step). Up to SR_DIVERGED_FRACTION of the
    elements (the bound if every element's float32 value were 2 ulps off at every step: 9e-5)
    may differ by up to SR_MAX_ULPS ulps (``sr_diverged`` counts them; measured on GPT-2 124M
    after 3 steps: 190 of 124.4M, 1.5e-6, at most 2 ulps), and the update check is over the whole
    tree (one diverged element of a 768-element LayerNorm bias is 1e-3 of its update). A wrong
    rounding (to nearest, other bits, another learning rate) moves far more elements."""
  if name == ref_name:
    return {"ok": True, "reference": True, "note": "reference"}
  if optim is not None and not optim.compared(name):
    return {"ok": True, "compared": False, "note": optim.peer.why}
  ref, got = snaps[ref_name], snaps[name]
  ref_w, got_w = _weights(ref, p0), _weights(got, p0)
  p0_w = dict(zip(ref_w, (np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(p0))))
  bf16_state = optim is not None and optim.state_dtype.itemsize < 4
  stochastic = optim is not None and bool(optim.variant.get("stochastic_rounding"))
  chk = measure.compare(ref_w, got_w, RTOL, ATOL, p0=p0_w if bf16_state else None,
                        update_eps=BF16_STATE_UPDATE_EPS if bf16_state else 0.0)
  if bf16_state:
    chk["update_eps"] = BF16_STATE_UPDATE_EPS
  if stochastic and not chk["ok"] and "error" not in chk and \
      chk["mismatched_elements"] <= SR_DIVERGED_FRACTION * chk["elements"] and \
      chk["worst_err_over_tol"] <= SR_MAX_ULPS:
    chk["ok"], chk["sr_diverged"] = True, chk["mismatched_elements"]
  chk["compared_as"] = "float32 master" if (ref["master"] is not None or
                                         got["master"] is not None) else "params"
  params_ok = True
  if ref["master"] is not None and got["master"] is not None and \
      _same_dtypes(ref["params"], got["params"]):
    chk["params"] = measure.compare(ref["params"], got["params"], RTOL, ATOL)
    params_ok = chk["params"]["ok"]
  mom = measure.compare_vectors(ref["moment"], got["moment"], RTOL, ATOL)
  if mom is not None:
    chk["first_moment"] = mom
  update_ok = True
  if "error" not in chk:
    if chk.get("sr_diverged"):  # a few diverged elements: over the whole tree, not per leaf
      cat = lambda t: {"all": np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])}
      chk["update_rel_err"] = measure.delta_rel_err(cat(p0_w), cat(ref_w), cat(got_w))
      chk["update_rel_err_over"] = "the whole tree"
    else:
      chk["update_rel_err"] = measure.delta_rel_err(p0_w, ref_w, got_w)
    update_ok = chk["update_rel_err"] <= UPDATE_RTOL
  chk["ok"] = bool(chk["ok"] and update_ok and params_ok and (mom is None or mom["ok"]))
  chk.update(against=ref_name, steps=CHECK_STEPS, rtol=RTOL, atol=ATOL, update_rtol=UPDATE_RTOL)
  if chk["ok"]:
    log(f"  check {name} vs {ref_name}: ok (params max|diff| {chk['max_abs_diff']:.1e}, update rel "
        f"err {chk['update_rel_err']:.1e}" + (f", m max|diff| {mom['max_abs_diff']:.1e}" if mom
                                             else "") + ")")
  else:
    log(f"  check {name} vs {ref_name}: MISMATCH {chk.get('error') or chk}")
  return chk


def time_round_robin(runners, refs, warmup, repeats, tick):
  """Warm-up, then ``repeats`` rounds of one timed step each, rotating the order every round
  (``refs``: the copy and, with --dispatch-floor, the floor, timed beside the batch)."""
  timed = list(runners) + list(refs)
  for _ in range(warmup):
    for r in timed:
      r.sync_step()
    tick(1)
  for k in range(repeats):
    for j in range(len(timed)):
      timed[(j + k) % len(timed)].timed_step()
    tick(1)


def bench_group(tree_name, optim_name, batches, skipped, args, tick):
  """All implementations of one optimizer on one tree: compile, check, time. Returns the group.

  ``batches``: the implementations in run order (the reference first), split so that each batch
  fits in memory at once (``plan``); a batch is set up, checked and timed round-robin, then freed.
  """
  t_group = time.perf_counter()
  optim = optims.OPTIMS[optim_name]
  shapes = trees.shapes(tree_name)
  n_params, n_leaves = trees.num_params(shapes), trees.num_leaves(shapes)
  nbytes = optim.bytes_per_step(trees.shape_leaves(shapes))
  log(f"\n== {tree_name} / {optim_name}: {n_leaves} leaves, {n_params / 1e6:.2f}M params "
      f"({optim.param_dtype}), {nbytes / n_params:.1f} B/param"
      + (f"; {len(batches)} batches {batches} (memory)" if len(batches) > 1 else ""))
  inputs = impls_mod.Inputs(shapes, optim)
  p0 = inputs.p0
  lr = impls_mod.lr_array()
  group = {"tree": tree_name, "optim": optim_name, "leaves": n_leaves, "params": n_params,
           "param_dtype": optim.param_dtype,
           "bytes_per_step": int(nbytes), "bytes_per_param": nbytes / n_params,
           "skipped": skipped, "reference": None, "batches": batches, "impls": []}
  recs, times, batch_of, ref = {}, {}, {}, None
  copy = measure.CopyRunner(args.copy_mib)
  floor = None
  if args.dispatch_floor and optim.optax_fn is not None:
    p_floor, g_floor = inputs.for_impl("optax")
    floor = measure.FloorRunner(p_floor, optim.optax_tx(optims.LR).init, g_floor, lr)
  for b, batch in enumerate(batches):
    active = []
    for name in batch:
      try:
        r, snap = setup(name, optim, inputs, lr)
      except Exception as e:  # pylint: disable=broad-except
        err = f"{type(e).__name__}: {e}"
        log(f"  {name}: FAILED {err}")
        recs[name] = {"impl": name, "label": name, "error": err, "check": {"ok": False,
                                                                         "error": err}}
        tick(1)
        continue
      if ref is None and optim.compared(name):  # the first compared one that runs: reference
        ref, group["reference"] = snap, name
      chk = check(name, group["reference"], {group["reference"]: ref, name: snap}, p0, optim)
      del snap
      recs[name] = {"impl": name, "label": r.impl.label, "compile": dict(r.info), "check": chk}
      impl_bytes = optim.bytes_per_step(trees.shape_leaves(shapes), name)
      if impl_bytes != nbytes:  # a peer of a mixed-precision variant: its own traffic model
        recs[name]["bytes_per_step"] = int(impl_bytes)
      if chk["ok"]:
        active.append(r)
        batch_of[name] = b
      else:
        r.close()
      tick(1)
    refs = [copy] + ([floor] if floor is not None and b == 0 else [])
    time_round_robin(active, refs, args.warmup, args.repeats, tick)
    for r in active:
      times[r.impl.name] = list(r.times)
      r.close()
    gc.collect()
  del ref, inputs
  copy_stats = measure.summarize(copy.times)
  copy_bw = copy.bytes_moved / copy_stats["median_s"] / 1e9
  group["copy"] = {"mib": args.copy_mib, "bytes_per_run": copy.bytes_moved, "step": copy_stats,
                   "gb_s": copy_bw}
  copy.close()
  if floor is not None:
    group["floor"] = {"buffers": floor.n_buffers, "step": measure.summarize(floor.times)}
    log(f"  floor         {group['floor']['step']['median_s'] * 1e3:8.2f} ms  (identity over "
        f"{floor.n_buffers} donated buffers)")
    floor.close()
  group["impls"] = [recs[n] for n in args.impl_list if n in recs]
  if args.fresh_compile:
    for rec in group["impls"]:
      if "compile" in rec and not rec["impl"].startswith("torch"):
        rec["compile_fresh"] = fresh_compile(tree_name, optim_name, rec["impl"])
        log(f"  {rec['impl']:13s} trace+compile in a fresh process "
            f"{rec['compile_fresh'].get('trace_compile_s', float('nan')):.2f} s "
            f"(in this run {rec['compile']['trace_compile_s']:.2f} s)")
  summarize_group(group, times, batch_of, copy_bw)
  for rec in group["impls"]:
    if "step" in rec:
      st = rec["step"]
      vs = rec.get("vs_optax")
      log(f"  {rec['impl']:13s} step {st['median_s'] * 1e3:8.2f} ms (min {st['min_s'] * 1e3:.2f}, "
          f"max {st['max_s'] * 1e3:.2f})  {rec['gb_s']:.1f} GB/s  {rec['pct_copy_bw']:.0f}% of copy"
          + (f"  {vs['median']:.2f}x optax" if vs and rec["impl"] != "optax" else ""))
  log(f"  copy          {copy_stats['median_s'] * 1e3:8.2f} ms  {copy_bw:.1f} GB/s")
  group["notes"] = notes(group)
  group["wall_s"] = time.perf_counter() - t_group
  log(f"  ({group['wall_s']:.0f} s)")
  return group


def fresh_compile(tree, optim, impl):
  """``bench.compile_probe`` in a subprocess: {trace_s, lower_s, compile_s, trace_compile_s}."""
  cmd = [sys.executable, "-m", "bench.compile_probe", "--tree", tree, "--optim", optim,
         "--impl", impl]
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(out.stdout.strip().splitlines()[-1])
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {str(e)[-300:]}"}


def summarize_group(group, times, batch_of, copy_bw):
  """Step statistics, bandwidth, % of copy bandwidth and ratios into each impl's record.

  Ratios are paired run by run when the base ran in the same batch (the usual case), else the
  ratio of medians, marked ``paired: False``."""
  for rec in group["impls"]:
    t = times.get(rec["impl"])
    if not t:
      continue
    st = measure.summarize(t)
    rec["step"] = st
    rec["gb_s"] = rec.get("bytes_per_step", group["bytes_per_step"]) / st["median_s"] / 1e9
    rec["pct_copy_bw"] = 100.0 * rec["gb_s"] / copy_bw
    for key, base in (("vs_optax", "optax"), ("vs_torch_fused", "torch-fused")):
      if base not in times:
        rec[key] = None
      elif batch_of[base] == batch_of[rec["impl"]]:
        rec[key] = measure.paired_ratio(t, times[base])
      else:
        m = st["median_s"] / float(np.median(times[base]))
        rec[key] = {"median": m, "min": m, "max": m, "runs": len(t), "paired": False}


def notes(group):
  """Things worth a second look: a mismatch, fusedopt more than 5% slower than optax, fusedopt
  temp memory over grads + 10% params."""
  n = group["params"]
  item = np.dtype(group.get("param_dtype", "float32")).itemsize
  budget = item * n + 0.1 * item * n  # grads size + 10% of params
  where = f"{group['tree']}/{group['optim']}"
  found = []
  for rec in group["impls"]:
    if rec.get("error"):
      found.append(f"{where}/{rec['impl']}: failed: {rec['error']}")
      continue
    if not rec["check"].get("ok"):
      found.append(f"{where}/{rec['impl']}: does not match {group['reference']} (not timed)")
    if rec["impl"] not in impls_mod.FUSEDOPT_BACKENDS:
      continue
    vs = rec.get("vs_optax")
    if vs and vs["median"] > SLOWER:
      found.append(f"{where}/{rec['impl']}: slower than optax ({vs['median']:.2f}x)")
    temp = rec["compile"]["temp_bytes"]
    if temp > budget:
      found.append(f"{where}/{rec['impl']}: temp memory {temp / 1e6:.1f} MB > grads + 10% "
                   f"params ({budget / 1e6:.1f} MB)")
  return found


# ----------------------------------------------------------------------------- the run

def run_order(names):
  """The order implementations are set up in: the reference candidates first (the check's
  reference is the first that runs: jnp, else optax), then the ratio bases, then the rest."""
  first = [n for n in ("jnp", "optax", "torch-fused") if n in names]
  return first + [n for n in names if n not in first]


def memory_budget(args):
  """Bytes the implementations of one group may hold at once: ``--mem-budget-gib``, else 80% of
  the device's memory (GPU/TPU) or 70% of the host's available memory (CPU)."""
  if args.mem_budget_gib:
    return args.mem_budget_gib * (1 << 30)
  stats = None
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    pass
  if stats and stats.get("bytes_limit"):
    return 0.8 * stats["bytes_limit"]
  return 0.7 * report.mem_available_bytes()


def split(names, n_params, optim, budget, copy_mib):
  """``names`` in batches that fit ``budget``: each implementation counted as params + the
  optimizer's full-size state + 2x params of temporaries (packing copies), in float32; the
  gradients and the copy buffer are shared."""
  per_impl = 4 * n_params * (3 + optim.state_buffers)
  room = budget - 4 * n_params - copy_mib * (1 << 20)
  k = max(1, int(room // per_impl)) if room > 0 else 1
  return [names[i:i + k] for i in range(0, len(names), k)]


def plan(args):
  """[(tree, optim, batches, skipped)] in run order: optimizers inside trees (one tree's host
  arrays at a time)."""
  out, budget = [], memory_budget(args)
  for t in args.tree_list:
    n = trees.num_params(trees.shapes(t))
    for o in args.optim_list:
      kept, skipped = impls_mod.for_optim(optims.OPTIMS[o], args.impl_list)
      out.append((t, o, split(run_order(kept), n, optims.OPTIMS[o], budget, args.copy_mib),
                  skipped))
  return out


def progress_bar(total, enabled):
  """A tqdm bar on stderr (None when disabled, stderr is not a terminal, or tqdm is missing)."""
  if not enabled or not sys.stderr.isatty():
    return None
  try:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  # One tick per implementation set up (compile + check steps) and per round-robin round.
  return tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)


class Stopped(BaseException):
  """SIGTERM (``timeout`` around a stage of bench/gpu_run.sh): the groups finished so far are
  written, marked as a partial run. A ``BaseException``: the ``except Exception`` that records
  an implementation's failure (its compile, its check) must not swallow it."""


def _stop(signum, frame):
  del frame
  raise Stopped(f"stopped by signal {signum}")


def main(argv=None):
  global _BAR
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if importlib.util.find_spec("torch") is not None:
    # torch allocates outside jax's pool: without this jax takes 75% of the GPU up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  select_device(args.device)
  resolve(args)
  command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
  t_start = time.perf_counter()
  env = report.environment()
  env["versions"]["torch"] = impls_mod.torch_version()
  groups = plan(args)
  log(f"{env['device']['jax_device']}; {env['device']['cpu_model']}, {env['device']['cpu_count']} "
      f"CPUs; jax {env['versions']['jax']}, optax {env['versions']['optax']}; trees "
      f"{args.tree_list}; optims {args.optim_list}; impls {args.impl_list}; {args.repeats} timed "
      f"runs after {CHECK_STEPS} check + {args.warmup} warm-up steps")
  total = sum(len(sum(b, [])) + len(b) * (args.warmup + args.repeats) for _, _, b, _ in groups)
  _BAR = progress_bar(total, not args.no_progress)
  stem = None
  if args.out:
    stem = report.free_stem(args.out, f"{jax.default_backend()}-{env['date']}"
                            + (f"-{args.tag}" if args.tag else ""), args.overwrite)
  settings = run_settings(args)

  def payload_of(results, stopped):
    return dict(env, command=command.strip(), total_runtime_s=time.perf_counter() - t_start,
                settings=settings, results=results,
                notes=([f"PARTIAL RUN: {stopped}"] if stopped else [])
                + [x for g in results for x in g["notes"]])
  results, stopped = [], None
  old_term = signal.signal(signal.SIGTERM, _stop)
  try:
    for t, o, batches, skipped in groups:
      if _BAR is not None:
        _BAR.set_description(f"{t}/{o}")
      results.append(bench_group(t, o, batches, skipped, args,
                                 _BAR.update if _BAR is not None else (lambda n: None)))
      if stem and len(results) < len(groups):   # what a SIGKILL mid-group would leave
        so_far = payload_of(results, f"{len(results)} of {len(groups)} (tree, optimizer) "
                            "groups written; the run had not finished")
        report.write(args.out, stem, so_far, report.markdown(so_far))
  except Stopped as e:   # a device run's stage ran out of time: keep what was measured
    stopped = (f"{e} after {len(results)} of {len(groups)} (tree, optimizer) groups; the "
               "rest were not run")
    log(stopped)
  finally:
    signal.signal(signal.SIGTERM, old_term)
    if _BAR is not None:
      _BAR.close()
      _BAR = None
  payload = payload_of(results, stopped)
  plots = {}
  if stem and not args.no_plots:
    plots = write_plots(results, env, args.out, stem)
  md = report.markdown(payload, plots)
  print(md)
  if stem:
    payload["plots"] = plots
    for p in report.write(args.out, stem, payload, md):
      log(f"wrote {p}")
  return payload


def run_settings(args):
  """The run's settings, as the JSON records them."""
  return {"trees": args.tree_list, "optims": args.optim_list, "impls": args.impl_list,
          "repeats": args.repeats, "warmup": args.warmup, "check_steps": CHECK_STEPS,
          "rtol": RTOL, "atol": ATOL, "update_rtol": UPDATE_RTOL, "copy_mib": args.copy_mib,
          "mem_budget_bytes": memory_budget(args), "learning_rate": optims.LR,
          "hyper_params": {o: optims.OPTIMS[o].hp for o in args.optim_list},
          "variants": {o: variant_settings(optims.OPTIMS[o]) for o in args.optim_list
                       if optims.OPTIMS[o].desc},
          "bytes_model": {o: optims.OPTIMS[o].bytes_note for o in args.optim_list}}


def variant_settings(optim):
  """A mixed-precision variant's settings for the JSON (dtypes, fusedopt options, its peer)."""
  peer = optim.peer
  return {"description": optim.desc, "param_dtype": optim.param_dtype,
          "fusedopt_options": dict(optim.variant),
          "peer": None if peer is None else {
              "what": peer.label, "param_dtype": peer.param_dtype,
              "bytes_per_param": peer.bytes_per_param, "compared": peer.compared,
              "why_not_compared": peer.why or None}}


def write_plots(results, env, out_dir, stem):
  """The PNGs next to the results ({kind: file name}); a plotting failure costs only the plots."""
  try:
    from . import plots  # pylint: disable=import-outside-toplevel
    written = plots.write_all(results, env, out_dir, stem)
  except Exception as e:  # pylint: disable=broad-except
    log(f"plots not written: {type(e).__name__}: {e}")
    return {}
  for p in written.values():
    log(f"wrote {os.path.join(out_dir, p)}")
  return written


if __name__ == "__main__":
  main()
