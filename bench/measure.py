"""Measurement helpers: compile time, memory and kernel count, correctness check, timed steps,
copy bandwidth, paired ratios."""
import gc
import re
import time

import jax
import jax.numpy as jnp
import numpy as np


class _Timed:
  """``sync_step`` and ``timed_step`` (appended to ``self.times``) over a subclass's ``step``."""

  def sync_step(self):
    jax.block_until_ready(self.step())

  def timed_step(self):
    t = time.perf_counter()
    jax.block_until_ready(self.step())
    dt = time.perf_counter() - t
    self.times.append(dt)
    return dt


class Runner(_Timed):
  """One implementation on one tree: compiled step plus its carried (donated) state."""

  def __init__(self, impl, params_host, grads, lr):
    self.impl = impl
    self.grads = grads
    self.lr = lr
    self.times = []
    self.info = {}
    # Fresh device copies: the carry is donated, and the host tree is shared by all impls.
    params = jax.device_put(jax.tree_util.tree_map(np.copy, params_host))
    t = time.perf_counter()
    self.carry = jax.block_until_ready(impl.init(params))
    self.info["init_s"] = time.perf_counter() - t
    del params

  def compile(self):
    donate = tuple(range(self.impl.n_carry))
    self.jitted = jax.jit(self.impl.step, donate_argnums=donate)
    args = (*self.carry, self.grads, self.lr)
    t0 = time.perf_counter()
    traced = self.jitted.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    ma = compiled.memory_analysis()
    try:
      self.info["hlo"] = hlo_counts(compiled.as_text())
    except Exception as e:  # pylint: disable=broad-except
      self.info["hlo"] = {"error": repr(e)}
    self.info.update(
        trace_s=t1 - t0, lower_s=t2 - t1, compile_s=t3 - t2, trace_compile_s=t3 - t0,
        temp_bytes=int(ma.temp_size_in_bytes),
        argument_bytes=int(ma.argument_size_in_bytes),
        output_bytes=int(ma.output_size_in_bytes),
        alias_bytes=int(ma.alias_size_in_bytes))
    # The jit object reuses this compilation on its first call (checked: first_call_s is a step,
    # not a compile).
    del traced, lowered, compiled

  def step(self):
    out = self.jitted(*self.carry, self.grads, self.lr)
    self.carry = out if self.impl.n_carry > 1 else (out,)
    return self.carry

  def params_host(self):
    return jax.tree_util.tree_map(np.array, self.impl.params_of(self.carry))

  def moment_host(self):
    return self.impl.moment_of(self.carry)

  def master_host(self):
    return self.impl.master_of(self.carry)

  def close(self):
    self.carry = None
    self.jitted = None
    gc.collect()


class CopyRunner(_Timed):
  """A jitted, donated ``x * 1.0000001`` over a big float32 buffer: the same-run reference for
  memory bandwidth (read + write = 8 B per element)."""
  name = "copy"

  def __init__(self, mib):
    self.n = int(mib) * (1 << 20) // 4
    self.x = jax.device_put(np.ones((self.n,), np.float32))
    self.f = jax.jit(lambda x: x * jnp.float32(1.0000001), donate_argnums=0)
    self.times = []

  def step(self):
    self.x = self.f(self.x)
    return self.x

  @property
  def bytes_moved(self):
    return 8 * self.n

  def close(self):
    self.x = None
    gc.collect()


class FloorRunner(_Timed):
  """The jitted, donated identity over ``(params, optax state)`` with the step's signature: what
  dispatching that many buffers costs before any math. Every row that carries optax's
  params-shaped state pays it (2000 leaves: 6000 donated buffers); the flat API does not."""
  name = "floor"

  def __init__(self, params_host, state_init, grads, lr):
    params = jax.device_put(jax.tree_util.tree_map(np.copy, params_host))
    self.carry = (params, jax.block_until_ready(jax.jit(state_init)(params)))
    self.grads, self.lr = grads, lr
    self.f = jax.jit(lambda p, s, g, lr: (p, s), donate_argnums=(0, 1))
    self.n_buffers = len(jax.tree_util.tree_leaves(self.carry))
    self.times = []

  def step(self):
    self.carry = self.f(*self.carry, self.grads, self.lr)
    return self.carry

  def close(self):
    self.carry = None
    gc.collect()


def leaf_rtol(rtol, *arrays):
  """``rtol``, widened to one ulp (the dtype's eps) where a leaf is stored in a narrower float
  than float32: two correct bf16 results may round a value on either side of a tie."""
  for a in arrays:
    dt = np.dtype(a.dtype)
    if dt.itemsize < 4 and (dt.kind == "f" or dt == np.dtype(jnp.bfloat16)):
      rtol = max(rtol, float(jnp.finfo(dt).eps))
  return rtol


def compare(ref, got, rtol, atol, p0=None, update_eps=0.0):
  """Leaf-wise allclose of two host trees; returns a summary dict (ok, worst leaf, errors).

  In float32 (the trees' own dtype, or bf16 leaves upcast): the differences of close float32
  numbers are exact, and float64 copies of a 100M-parameter tree would cost seconds per
  implementation. A leaf stored in bfloat16/float16 (either side) is allowed one ulp of it
  (``leaf_rtol``). With ``p0`` (the tree before the steps) each element is also allowed
  ``update_eps`` of its own change ``|ref - p0|`` (for optimizers that store their state rounded
  to bf16: see bench/__main__.py's check).
  """
  ref_l, ref_def = jax.tree_util.tree_flatten_with_path(ref)
  got_l, got_def = jax.tree_util.tree_flatten(got)
  if ref_def.num_leaves != got_def.num_leaves:
    return {"ok": False, "error": f"tree structure differs: {ref_def} vs {got_def}"}
  p0_l = jax.tree_util.tree_leaves(p0) if p0 is not None else [None] * len(ref_l)
  n_bad, n_all, worst, worst_path, max_abs = 0, 0, 0.0, None, 0.0
  for (path, r), g, a in zip(ref_l, got_l, p0_l):
    if r.shape != g.shape:
      return {"ok": False, "error": f"{jax.tree_util.keystr(path)}: shape {g.shape} != {r.shape}"}
    leaf_tol = leaf_rtol(rtol, np.asarray(r), np.asarray(g))
    r = np.asarray(r, np.float32)
    d = np.abs(np.asarray(g, np.float32) - r)
    tol = np.float32(atol) + np.float32(leaf_tol) * np.abs(r)
    if a is not None and update_eps:
      tol = tol + np.float32(update_eps) * np.abs(r - np.asarray(a, np.float32))
    n_bad += int(np.count_nonzero(~(d <= tol)))
    n_all += d.size
    ratio = float(np.max(d / tol)) if d.size else 0.0
    max_abs = max(max_abs, float(d.max()) if d.size else 0.0)
    if not np.isfinite(ratio) or ratio > worst:
      worst = ratio if np.isfinite(ratio) else float("inf")
      worst_path = jax.tree_util.keystr(path)
  return {"ok": n_bad == 0, "mismatched_elements": n_bad, "elements": n_all,
          "max_abs_diff": max_abs, "worst_err_over_tol": worst, "worst_leaf": worst_path}


def _norm(x):
  x = np.ravel(x)
  return float(np.sqrt(np.dot(x, x)))


def delta_rel_err(p0, ref, got):
  """max over leaves of ||(got - p0) - (ref - p0)|| / ||ref - p0||: error relative to the update.

  ``(got - p0) - (ref - p0)`` is computed as ``got - ref`` (equal, and exact in float32 for close
  values); NaN anywhere gives inf."""
  worst = 0.0
  for a, r, g in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(ref),
                     jax.tree_util.tree_leaves(got)):
    den = _norm(np.asarray(r, np.float32) - np.asarray(a, np.float32))
    num = _norm(np.asarray(g, np.float32) - np.asarray(r, np.float32))
    if not np.isfinite(num):
      return float("inf")
    if den > 0:
      worst = max(worst, num / den)
    elif num > 0:
      worst = float("inf")
  return worst


def compare_vectors(ref, got, rtol, atol):
  """``compare`` for two flat host vectors (the first-moment check); None where either is absent."""
  if ref is None or got is None:
    return None
  if ref.shape != got.shape:
    return {"ok": False, "error": f"size {got.shape} != {ref.shape}"}
  return compare({"state": ref}, {"state": got}, rtol, atol)


def summarize(times):
  t = np.asarray(times)
  return {"median_s": float(np.median(t)), "min_s": float(t.min()), "max_s": float(t.max()),
          "runs": len(times), "all_s": [float(x) for x in t]}


def paired_ratio(times, base_times):
  """Run-by-run ratios ``times[k] / base_times[k]`` (the two ran in the same round-robin round,
  so slow phases of the machine hit both): median and min-max. None without a baseline."""
  if not times or not base_times:
    return None
  n = min(len(times), len(base_times))
  r = np.asarray(times[:n]) / np.asarray(base_times[:n])
  return {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max()), "runs": n}


# ----------------------------------------------------------------------------- HLO counts

# Instructions that launch no kernel: they name, group or reinterpret buffers.
_FREE_OPS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
             "opt-barrier", "partition-id", "replica-id"}
# Control flow whose called computations run as ops of their own (followed, not counted).
_CONTROL_OPS = {"call", "while", "conditional", "async-start", "async-update", "async-done"}
_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\b([a-z][a-z0-9\-_]*)\(")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)="
                     r"\{?([^,}]+(?:,\s*%?[\w.\-]+)*)")


def _computations(text):
  """{name: [instruction lines]} of an HLO module's text, and the ENTRY computation's name."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    if cur is None:
      m = _COMP_HEADER.match(line)
      if m and not line.startswith(" "):
        cur = m.group(2)
        comps[cur] = []
        if m.group(1):
          entry = cur
    elif line.startswith("}"):
      cur = None
    else:
      comps[cur].append(line)
  return comps, entry


def hlo_counts(text):
  """Kernel-like instructions of a compiled step (``compiled.as_text()``).

  Counts the instructions of the ENTRY computation and of the computations it runs through
  control flow (``call``/``while``/``conditional``: e.g. GPU command buffers), not the bodies of
  fusions or reducers, and not the instructions that launch nothing (parameters, tuples,
  bitcasts, constants). On GPU each counted instruction is one kernel launch (or library call);
  on CPU one loop nest or runtime call. Returns {"kernels", "fusions", "custom_calls",
  "by_op": {opcode: n}}.
  """
  comps, entry = _computations(text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  by_op, seen, todo = {}, set(), [entry]
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      m = _INSTR.match(line)
      if not m:
        continue
      op = m.group(1)
      if op in _CONTROL_OPS:
        for c in _CALLED.findall(line):
          todo += [x.strip().lstrip("%") for x in c.split(",")]
        continue
      if op in _FREE_OPS:
        continue
      by_op[op] = by_op.get(op, 0) + 1
  return {"kernels": sum(by_op.values()), "fusions": by_op.get("fusion", 0),
          "custom_calls": by_op.get("custom-call", 0), "by_op": dict(sorted(by_op.items()))}
