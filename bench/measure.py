"""Measurement helpers: compile time and memory, correctness check, timed steps, copy bandwidth."""
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

BYTES_PER_PARAM = 28  # Adam: read p, g, m, v; write p, m, v (float32)


class Runner:
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

  def timed_step(self):
    t = time.perf_counter()
    jax.block_until_ready(self.step())
    dt = time.perf_counter() - t
    self.times.append(dt)
    return dt

  def params_host(self):
    return jax.tree_util.tree_map(np.array, self.impl.params_of(self.carry))

  def close(self):
    self.carry = None
    self.jitted = None
    gc.collect()


class CopyRunner:
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

  def timed_step(self):
    t = time.perf_counter()
    jax.block_until_ready(self.step())
    dt = time.perf_counter() - t
    self.times.append(dt)
    return dt

  @property
  def bytes_moved(self):
    return 8 * self.n

  def close(self):
    self.x = None
    gc.collect()


def compare(ref, got, rtol, atol):
  """Leaf-wise allclose of two host trees; returns a summary dict (ok, worst leaf, errors)."""
  ref_l, ref_def = jax.tree_util.tree_flatten_with_path(ref)
  got_l, got_def = jax.tree_util.tree_flatten(got)
  if ref_def.num_leaves != got_def.num_leaves:
    return {"ok": False, "error": f"tree structure differs: {ref_def} vs {got_def}"}
  n_bad, worst, worst_path, max_abs = 0, 0.0, None, 0.0
  for (path, r), g in zip(ref_l, got_l):
    if r.shape != g.shape:
      return {"ok": False, "error": f"{jax.tree_util.keystr(path)}: shape {g.shape} != {r.shape}"}
    d = np.abs(g.astype(np.float64) - r.astype(np.float64))
    tol = atol + rtol * np.abs(r.astype(np.float64))
    bad = int(np.count_nonzero(~(d <= tol)))
    n_bad += bad
    ratio = float(np.max(d / tol)) if d.size else 0.0
    max_abs = max(max_abs, float(d.max()) if d.size else 0.0)
    if not np.isfinite(ratio) or ratio > worst:
      worst, worst_path = (ratio if np.isfinite(ratio) else float("inf")), jax.tree_util.keystr(path)
  return {"ok": n_bad == 0, "mismatched_elements": n_bad, "max_abs_diff": max_abs,
          "worst_err_over_tol": worst, "worst_leaf": worst_path}


def delta_rel_err(p0, ref, got):
  """max over leaves of ||(got - p0) - (ref - p0)|| / ||ref - p0||: error relative to the update."""
  worst = 0.0
  for a, r, g in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(ref),
                     jax.tree_util.tree_leaves(got)):
    a = a.astype(np.float64)
    dr, dg = r - a, g - a
    den = np.linalg.norm(dr)
    if den > 0:
      worst = max(worst, float(np.linalg.norm(dg - dr) / den))
  return worst


def summarize(times):
  t = np.asarray(times)
  return {"median_s": float(np.median(t)), "min_s": float(t.min()), "max_s": float(t.max()),
          "runs": len(times), "all_s": [float(x) for x in t]}
