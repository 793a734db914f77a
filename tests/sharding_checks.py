"""Sharded-state checks on 8 CPU devices, run as one subprocess by tests/test_sharding.py.

The device count must be set before jax initializes (the pytest process has already imported
jax), so this script sets XLA_FLAGS itself and prints one JSON object of results on its last
stdout line; the test asserts on it. Before that it prints a ``progress`` line at every step it
takes, so that the test can tell XLA:CPU's occasional rendezvous hang (no line for a while)
from a slow machine. Run by hand: ``python tests/sharding_checks.py``.
"""
import json
import os
import re
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           # a loaded 2-core machine can exceed XLA:CPU's 40 s collective timeout
                           " --xla_cpu_collective_call_terminate_timeout_seconds=900"
                           " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import faulthandler  # noqa: E402
import signal  # noqa: E402

# on SIGUSR1 (the parent's stall watchdog) every thread's Python stack goes to stderr
faulthandler.register(signal.SIGUSR1, all_threads=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import fusedopt as optim  # noqa: E402
from fusedopt import quantization as Q, serialization, sharding  # noqa: E402
from fusedopt.flat_state import ParamState, fields_of  # noqa: E402

N = 8
AX = "data"


def progress(*what):
  """A sign of life for the parent's stall watchdog (tests/test_sharding.py)."""
  print("progress", *what, flush=True)

OPTIMIZERS = {
    "GradientDescent": lambda b: optim.GradientDescent(0.1, backend=b),
    "Momentum": lambda b: optim.Momentum(0.1, beta=0.9, weight_decay=1e-3, nesterov=True,
                                         backend=b),
    "Adam": lambda b: optim.Adam(1e-2, weight_decay=1e-3, backend=b),
    "Adagrad": lambda b: optim.Adagrad(0.1, backend=b),
    "RMSProp": lambda b: optim.RMSProp(1e-2, centered=True, backend=b),
    "LAMB": lambda b: optim.LAMB(1e-2, weight_decay=1e-2, backend=b),
    "LARS": lambda b: optim.LARS(0.5, weight_decay=1e-3, nesterov=True, backend=b),
    "AdaBelief": lambda b: optim.AdaBelief(1e-2, weight_decay=1e-3, backend=b),
    "Adadelta": lambda b: optim.Adadelta(1.0, weight_decay=1e-3, backend=b),
    "Lion": lambda b: optim.Lion(1e-3, weight_decay=0.1, backend=b),
    "Adan": lambda b: optim.Adan(1e-2, weight_decay=0.1, backend=b),
    "AdEMAMix": lambda b: optim.AdEMAMix(1e-2, weight_decay=0.1, backend=b),
    "ADOPT": lambda b: optim.ADOPT(1e-2, nesterov=True, backend=b),
    # optimizer-wide state (its averaging scalars) beside the sharded buffers, replicated
    "ScheduleFreeAdamW": lambda b: optim.ScheduleFreeAdamW(1e-2, weight_decay=1e-3, backend=b),
}
REDUCING = ("LAMB", "LARS")   # per-tensor norms: sums reordered across shards
AUTO_CHECKED = ("Adam", "Momentum", "LAMB", "LARS")
# element-wise rules added since the sharded driver was first checked run FSDP only (the mode
# that splits params and state alike; ZeRO-1 runs the same per-shard rule): each mode costs one
# 8-device compile, which a loaded 2-core machine makes slow
FSDP_ONLY = ("Lion", "Adan", "AdEMAMix", "ADOPT", "ScheduleFreeAdamW")


def make_tree(seed=0):
  """Segments straddle shard boundaries; a float32 and a bfloat16 group; a scalar leaf."""
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  return {"dense": {"kernel": f(300, 100), "bias": f(100)}, "out": {"kernel": f(100, 257)},
          "scale": f(), "emb": jnp.asarray(rng.normal(size=(3, 1000)), jnp.bfloat16)}


def grads_for(params, step):
  rng = np.random.default_rng(100 + step)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.normal(size=np.shape(x)), x.dtype), params)


def diff(a, b):
  """(bitwise equal, max |a - b| in units of the leaf's largest magnitude's ulp).

  Plain ulps blow up where a value is near zero (an update nearly cancelling a param); scaling
  by the leaf's largest magnitude measures the error as a reduction reorder makes it."""
  a, b = np.asarray(a), np.asarray(b)
  same = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
  if not a.size or not jnp.issubdtype(a.dtype, jnp.floating):
    return same, 0.0 if same else float("inf")
  a32, b32 = a.astype(np.float32), b.astype(np.float32)
  scale = float(np.max(np.abs(a32))) * float(jnp.finfo(a.dtype).eps)
  err = float(np.max(np.abs(a32 - b32)))
  return same, (err / scale if scale else err)


def on_host(o):
  """``o`` with its arrays fetched to the host: a comparison then slices NumPy buffers, where an
  eager slice of a sharded buffer would be one more 8-device program per leaf (the step where
  XLA:CPU's rendezvous stalled, in two make test runs: the stack dump of tests/test_sharding.py's
  watchdog)."""
  return jax.device_get(o)


def compare(o1, o2):
  """Over targets and per-leaf state: (all bitwise equal, max scaled ulps, same step)."""
  o1, o2 = on_host(o1), on_host(o2)
  t1, t2 = [t.tree() if isinstance(t, sharding.FlatParams) else t for t in (o1.target, o2.target)]
  pairs = list(zip(jax.tree_util.tree_leaves(t1), jax.tree_util.tree_leaves(t2)))
  # per-leaf state as dicts (a state built without its class reads as dicts; a dict's leaves
  # come in key order, a state object's in field order)
  as_dicts = lambda o: jax.tree_util.tree_map(  # noqa: E731
      lambda x: fields_of(x) if isinstance(x, ParamState) else x,
      o.state.param_states.per_leaf(), is_leaf=lambda x: isinstance(x, ParamState))
  pairs += list(zip(jax.tree_util.tree_leaves(as_dicts(o1)),
                    jax.tree_util.tree_leaves(as_dicts(o2))))
  ds = [diff(x, y) for x, y in pairs]
  return {"bitwise": all(d[0] for d in ds), "ulps": max(d[1] for d in ds),
          "step": int(o1.state.step) == int(o2.state.step)}


def state_is_split(opt):
  """Every flat state buffer: 8 addressable shards of size/8 on distinct devices, distinct slices."""
  ok = True
  for k, bufs in opt.state.param_states.fields.items():
    for b in jax.tree_util.tree_leaves(bufs):   # a quantized buffer: its codes and its scales
      shards = b.addressable_shards
      ok &= len(shards) == N and all(s.data.size * N == b.size for s in shards)
      ok &= len({s.device for s in shards}) == N
      ok &= len({s.index[0].start for s in shards}) == N
      ok &= b.sharding.spec == P(AX)
  return bool(ok)


_COLL = re.compile(r"=\s+(\([^=]*?\)|\S+)\s+(all-gather|all-gather-start|reduce-scatter|"
                   r"all-reduce|all-reduce-start|collective-permute|all-to-all)\((.*?)\)[,\s]")
_SHAPE = re.compile(r"(pred|s32|u32|bf16|f16|f32|f64)\[([\d,]*)\]")


def collectives(hlo):
  """[(op, [(dtype, elements) of result arrays])] for every collective in compiled HLO text."""
  out = []
  for m in _COLL.finditer(hlo):
    shapes = [(d, int(np.prod([int(x) for x in dims.split(",") if x] or [1])))
              for d, dims in _SHAPE.findall(m.group(1))]
    out.append((m.group(2).replace("-start", ""), shapes))
  return out


def summarize(colls):
  summary = {}
  for op, shapes in colls:
    summary.setdefault(op, []).extend(f"{d}[{n}]" for d, n in shapes)
  return summary


def main():
  assert len(jax.devices()) == N, jax.devices()
  mesh = Mesh(np.array(jax.devices()), (AX,))
  params = make_tree()
  res = {"numerics": {}, "split": {}, "errors": []}
  steps = 3

  def run(opt, fn=None):
    for t in range(steps):
      progress("step", t)
      # inputs on their devices before an 8-device program starts (transfers and programs
      # share XLA:CPU's thread pool, where the rendezvous stalls)
      opt = jax.block_until_ready(opt)
      g = jax.block_until_ready(grads_for(params, t))
      opt = opt.apply_gradient(g) if fn is None else fn(opt, g)
    return opt

  # 1. numerics vs the single-device flat path, ZeRO-1 and FSDP, jnp and auto backends
  for name, mk in OPTIMIZERS.items():
    # auto: the single-device step on the native kernels (sharded state runs the flat jnp or
    # Pallas path per shard); one rule of each shape: two moments, a trace, per-tensor norms
    for backend in ("jnp", "auto") if name in AUTO_CHECKED else ("jnp",):
      progress(name, backend)
      single = run(mk(backend).create(params))
      for mode in ("sharded",) if name in FSDP_ONLY else ("replicated", "sharded"):
        if mode == "sharded" and backend == "auto" and name not in ("Adam", "LAMB"):
          continue
        opt = sharding.shard_optimizer(mk(backend), mesh, AX, params=mode).create(params)
        if mode == "sharded":
          step = jax.jit(lambda o, g: o.apply_gradient(sharding.FlatParams.pack(g, o.target.layout)))
          opt = run(opt, step)
        else:
          opt = run(opt)
        res["numerics"][f"{name}/{backend}/{mode}"] = dict(compare(single, opt),
                                                          reducing=name in REDUCING)
        if backend == "jnp":
          res["split"][f"{name}/{mode}"] = state_is_split(opt)
          if mode == "sharded":
            res["split"][f"{name}/{mode}/target"] = all(
                len(b.addressable_shards) == N and b.addressable_shards[0].data.size * N == b.size
                for b in opt.target.buffers)

  # 2. master weights (bf16 params) and bf16 state
  bf = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  for label, mk in {"Adam/master": lambda: optim.Adam(1e-2, master_weights=True, backend="jnp"),
                    "Adam/state_bf16": lambda: optim.Adam(1e-2, state_dtype=jnp.bfloat16,
                                                          backend="jnp"),
                    "LAMB/master": lambda: optim.LAMB(1e-2, master_weights=True, backend="jnp"),
                    # stochastic rounding hashes element inputs, not positions: same bits
                    "Adam/stochastic_rounding": lambda: optim.Adam(
                        1e-2, stochastic_rounding=True, rounding_seed=3, backend="jnp"),
                    "Momentum/stochastic_rounding/auto": lambda: optim.Momentum(
                        1e-2, stochastic_rounding=True)}.items():
    o1, o2 = mk().create(bf), sharding.shard_optimizer(mk(), mesh, AX).create(bf)
    for t in range(steps):
      progress(label, t)
      g = grads_for(bf, t)
      o1, o2 = o1.apply_gradient(g), o2.apply_gradient(g)
    res["numerics"][label] = dict(compare(o1, o2), reducing=label.startswith("LAMB"))
    if "stochastic" in label:   # rounding happened: some param is off the nearest-rounded value
      near = mk().__class__(1e-2, backend="jnp").create(bf)
      for t in range(steps):
        near = near.apply_gradient(grads_for(bf, t))
      res["numerics"][label]["differs_from_nearest"] = not compare(o1, near)["bitwise"]
    res["split"][label] = state_is_split(o2)

  # 3. Adafactor: replicated state, same numbers
  o1 = run(optim.Adafactor(1e-2).create(params))
  o2 = run(sharding.shard_optimizer(optim.Adafactor(1e-2), mesh, AX).create(params))
  res["adafactor"] = {"equal": compare_tree(o1, o2),
                      "replicated": all(x.sharding.is_fully_replicated
                                        for x in jax.tree_util.tree_leaves(o2.state))}

  # 3b. the Pallas kernels (interpret mode) per shard: elementwise executor and per-row tables
  for name in ("Adam", "LAMB"):
    progress("pallas_interpret", name)
    o1 = run(OPTIMIZERS[name]("pallas_interpret").create(params))
    o2 = run(sharding.shard_optimizer(OPTIMIZERS[name]("pallas_interpret"), mesh, AX).create(params))
    res["numerics"][f"{name}/pallas_interpret/replicated"] = dict(compare(o1, o2),
                                                                  reducing=name in REDUCING)

  # 4. compiled HLO of the step: which collectives, on what
  res["hlo"] = {}
  for name in ("Adam", "LAMB", "LARS"):
    for mode in ("replicated", "sharded"):
      progress("hlo", name, mode)
      opt = sharding.shard_optimizer(OPTIMIZERS[name]("jnp"), mesh, AX, params=mode).create(params)
      g = grads_for(params, 0)
      if mode == "sharded":
        g = sharding.FlatParams.pack(g, opt.target.layout)
      step = jax.jit(lambda o, g: o.apply_gradient(g), donate_argnums=0)
      compiled = step.lower(opt, g).compile()
      hlo = compiled.as_text()
      out_specs = [s.spec for s in jax.tree_util.tree_leaves(
          compiled.output_shardings.state.param_states.fields)]
      colls = collectives(hlo)
      layout = opt.state.param_states.layout
      gathered = sorted((d, n) for op, shapes in colls if op == "all-gather" for d, n in shapes)
      param_groups = sorted((jnp.dtype(gr.dtype).name.replace("float", "f").replace("bf16", "bf16"),
                             gr.size) for gr in layout.groups)
      res["hlo"][f"{name}/{mode}"] = {
          "collectives": summarize(colls),
          "all_gather_results": [f"{d}[{n}]" for d, n in gathered],
          "param_groups": [f"{d}[{n}]" for d, n in param_groups],
          "n_state_buffers": sum(len(v) for v in opt.state.param_states.fields.values()),
          "state_out_specs": sorted({str(s) for s in out_specs}),
          "max_all_reduce": max([n for op, sh in colls if op == "all-reduce" for _, n in sh] or [0]),
          # packing p and g: each device builds only its slice (no full-size concatenation)
          "max_concatenate": max([int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
                                  for dims in re.findall(r"= \w+\[([\d,]*)\]\S* concatenate\(",
                                                         hlo)] or [0]),
          "max_shard": max(layout.shard_size(g) for g in range(len(layout.groups))),
      }

  # 5. grads reduce-scattered inside the user's shard_map (per-device unreduced grads)
  for name in ("Adam", "LAMB"):
    progress("reduce_scatter", name)
    opt = sharding.shard_optimizer(OPTIMIZERS[name]("jnp"), mesh, AX).create(params)
    specs = sharding.partition_specs(opt)
    per_dev = [grads_for(params, 10 + i) for i in range(N)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_dev)
    stacked = jax.device_put(stacked, jax.sharding.NamedSharding(mesh, P(AX)))

    def local(o, g):
      g = jax.tree_util.tree_map(lambda x: x[0], g)
      return sharding.apply_gradient_local(o, g, reduce="mean")
    step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(specs, P(AX)), out_specs=specs,
                                 check_vma=False))
    new = step(opt, stacked)
    mean = jax.tree_util.tree_map(
        lambda *xs: (sum(x.astype(jnp.float32) for x in xs) / N).astype(xs[0].dtype), *per_dev)
    ref = OPTIMIZERS[name]("jnp").create(params).apply_gradient(mean)
    hlo = step.lower(opt, stacked).compile().as_text()
    res[f"reduce_scatter/{name}"] = {"cmp": compare(ref, new), "split": state_is_split(new),
                                     "collectives": summarize(collectives(hlo))}

  # 6a. LARS on params and grads of |x| ~ 1e20: finite, but their float32 sums of squares
  # overflow; the per-tensor norms come from the overflow-safe pair of partial sums
  big = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) * 1e20
                               if x.dtype == jnp.float32 else x, params)
  g = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) * 1e20
                             if x.dtype == jnp.float32 else x, grads_for(params, 0))
  progress("overflow")
  o1 = jax.jit(lambda o, g: o.apply_gradient(g))(OPTIMIZERS["LARS"]("jnp").create(big), g)
  o2 = jax.jit(lambda o, g: o.apply_gradient(g))(
      sharding.shard_optimizer(OPTIMIZERS["LARS"]("jnp"), mesh, AX).create(big), g)
  res["overflow/LARS"] = {"cmp": compare(o1, o2), "finite": bool(all(
      np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree_util.tree_leaves(o2.target)))}

  # 6. apply_gradient_checked: scale + clip, and a non-finite step skipped bitwise
  progress("checked")
  for name in ("Adam", "LARS"):
    progress("checked", name)
    o1 = OPTIMIZERS[name]("jnp").create(params)
    o2 = sharding.shard_optimizer(OPTIMIZERS[name]("jnp"), mesh, AX).create(params)
    g = jax.tree_util.tree_map(lambda x: x * 4, grads_for(params, 0))
    chk = jax.jit(lambda o, g: o.apply_gradient_checked(g, grad_scale=0.25, clip_global_norm=50.))
    a1, f1, n1 = chk(o1, g)
    a2, f2, n2 = chk(o2, g)
    bad = dict(g, scale=jnp.float32(np.inf))
    b2, f3, _ = chk(a2, bad)
    res[f"checked/{name}"] = {
        "cmp": compare(a1, a2), "finite": bool(f1) and bool(f2),
        "norm_rel": float(abs(n1 - n2) / n1), "clipped": float(n1) > 50.,
        "skip_finite_flag": bool(f3), "skip_unchanged": compare(a2, b2)["bitwise"],
        "skip_step": int(b2.state.step) == int(a2.state.step), "split": state_is_split(b2)}

  # 7. checkpoints of sharded state round-trip (bitwise), layout-free
  for mode in ("replicated", "sharded"):
    mk = lambda: sharding.shard_optimizer(optim.LAMB(1e-2, backend="jnp"), mesh, AX,  # noqa: E731
                                          params=mode)
    opt = mk().create(params)
    fn = None
    if mode == "sharded":
      fn = jax.jit(lambda o, g: o.apply_gradient(sharding.FlatParams.pack(g, o.target.layout)))
    opt = run(opt, fn)
    progress("checkpoint", mode)
    blob = serialization.to_bytes(opt)
    fresh = mk().create(make_tree(seed=1))
    back = serialization.from_bytes(fresh, blob)
    back2 = sharding.restore_state(fresh, serialization.msgpack_restore(blob))
    single = serialization.from_bytes(optim.LAMB(1e-2, backend="jnp").create(params), blob)
    res[f"checkpoint/{mode}"] = {
        "vs_single": compare(single, opt)["bitwise"],
        "restored": compare(single, back)["bitwise"],
        "restore_state": compare(single, back2)["bitwise"],
        "step": int(back.state.step) == steps, "split": state_is_split(back),
        "split_restore_state": state_is_split(back2),
        "same_bytes": serialization.to_bytes(back) == blob,
        "target_sharding": str(jax.tree_util.tree_leaves(
            back.target.buffers if mode == "sharded" else back.target)[0].sharding.spec)}
    # and it keeps training: one more step equals the original's
    g = grads_for(params, 7)
    if fn is None:
      cont = compare(opt.apply_gradient(g), back.apply_gradient(g))
    else:
      cont = compare(fn(opt, g), fn(back, g))
    res[f"checkpoint/{mode}"]["continues"] = cont["bitwise"] and cont["step"]
    # orbax: each shard written by its device, read straight into the template's shardings
    progress("orbax", mode)
    with tempfile.TemporaryDirectory(prefix="fusedopt-orbax-") as d:
      serialization.save_orbax(os.path.join(d, "ckpt"), opt)
      ob = serialization.restore_orbax(os.path.join(d, "ckpt"), mk().create(make_tree(seed=1)))
    res[f"checkpoint/{mode}"]["orbax"] = (compare(single, ob)["bitwise"] and state_is_split(ob)
                                          and serialization.to_bytes(ob) == blob)

  # 8. low-bit state: codes and scales sharded together, blocks never straddling two shards
  res["quantized"] = {}
  fp8 = jnp.float8_e4m3fn
  for label, mk, modes in (
      ("Adam/int8/jnp", lambda: optim.Adam(1e-2, state_dtype="int8", backend="jnp"),
       ("sharded",)),
      ("Adam/fp8/auto", lambda: optim.Adam(1e-2, state_dtype=fp8), ("replicated",)),
      ("LAMB/int8/jnp", lambda: optim.LAMB(1e-2, state_dtype="int8", backend="jnp"),
       ("replicated",))):
    single = run(mk().create(params))
    for mode in modes:
      opt = sharding.shard_optimizer(mk(), mesh, AX, params=mode).create(params)
      opt = run(opt, jax.jit(lambda o, g: o.apply_gradient(
          sharding.FlatParams.pack(g, o.target.layout))) if mode == "sharded" else None)
      res["quantized"][f"{label}/{mode}"] = {
          "cmp": compare(single, opt), "codes_differing": codes_differing(single, opt),
          "quantized": any(Q.is_quantized(b) for v in opt.state.param_states.fields.values()
                           for b in v),
          "split": state_is_split(opt), "reducing": label.startswith("LAMB")}
  # a sharded int8 checkpoint restores into a single-device optimizer and back, bitwise
  progress("quantized checkpoint")
  mk = lambda: optim.Adam(1e-2, state_dtype="int8", backend="jnp")  # noqa: E731
  opt = run(sharding.shard_optimizer(mk(), mesh, AX).create(params))
  blob = serialization.to_bytes(opt)
  single = serialization.from_bytes(mk().create(make_tree(seed=1)), blob)
  back = sharding.restore_state(sharding.shard_optimizer(mk(), mesh, AX).create(
      make_tree(seed=1)), serialization.msgpack_restore(serialization.to_bytes(single)))
  res["quantized"]["checkpoint"] = {
      "single": compare(single, opt)["bitwise"] and codes_differing(single, opt) == 0,
      "back": compare(back, opt)["bitwise"] and codes_differing(back, opt) == 0,
      "split": state_is_split(back), "same_bytes": serialization.to_bytes(back) == blob}

  print(json.dumps(res))


def codes_differing(o1, o2):
  """How many stored codes differ between two optimizers' quantized state (leaf by leaf)."""
  o1, o2 = on_host(o1), on_host(o2)
  f1, f2 = o1.state.param_states, o2.state.param_states
  n = 0
  for k in f1.fields:
    for i in range(len(f1.layout.segments)):
      a, b = f1.stored_leaf(k, i), f2.stored_leaf(k, i)
      if Q.is_quantized(a):
        n += int(np.count_nonzero(np.asarray(a.codes) != np.asarray(b.codes)))
        n += int(np.count_nonzero(np.asarray(a.scales) != np.asarray(b.scales)))
  return n


def compare_tree(o1, o2):
  o1, o2 = on_host(o1), on_host(o2)
  a = jax.tree_util.tree_leaves((o1.target, o1.state))
  b = jax.tree_util.tree_leaves((o2.target, o2.state))
  return all(diff(x, y)[0] for x, y in zip(a, b))


if __name__ == "__main__":
  sys.exit(main())
