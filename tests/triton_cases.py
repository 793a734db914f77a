"""Numerics cases of the Triton backend against the jnp oracle (tests/test_triton_kernels.py, T1).

The same cases run two ways:

- on a CPU, in Triton's interpreter (``backend="triton_interpret"``): Triton reads
  ``TRITON_INTERPRET`` once, when it is imported, and the compile/lowering tests need the real
  compiler in their process, so the pytest process runs this file as a script in a subprocess
  (``TRITON_INTERPRET=1 python tests/triton_cases.py``), which prints one JSON line per case;
- on a GPU, in the pytest process with ``backend="triton"`` (compiled by jax-triton).

Tolerances (from the same state, one kernel step vs one jnp step, the oracle on the CPU):
float32 params and state within ``F32_ULPS`` ulp of |old| + |new| (+ the step size), bf16/f16
params within 1 ulp of their dtype (the oracle's float32 result can differ in its last bit --
XLA:CPU contracts FMAs -- and flip a rounding; measured: 0 on every case but the sharded one);
LAMB/LARS steps within float32 summation error (their per-tensor norms are sums each backend adds
in its own order). Triton's interpreter truncates float32 -> bfloat16 where the GPU rounds to
nearest even; the interpreter runs here with that conversion fixed (``_round_bf16_like_the_gpu``).
"""
import json
import os
import re
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import fusedopt as optim
from fusedopt import flat
from fusedopt.elementwise import JNP
from fusedopt.kernels import triton as kt

from cases import SHAPES, ulps_error


CONFIGS = [
    ("GradientDescent", {}),
    ("Momentum", {}),
    ("Momentum", {"nesterov": True, "weight_decay": 0.01}),
    ("Adam", {}),
    ("Adam", {"weight_decay": 0.1, "master_weights": True}),
    ("Adagrad", {}),
    ("RMSProp", {"centered": True}),
    ("LAMB", {"weight_decay": 0.01}),
    ("LARS", {"nesterov": True, "weight_decay": 0.01, "eps": 1e-6}),
    ("AdaBelief", {"weight_decay": 0.01}),
    ("Adadelta", {"weight_decay": 0.01}),
    ("Lion", {"weight_decay": 0.1}),
    ("Adan", {"weight_decay": 0.1}),
    ("AdEMAMix", {"weight_decay": 0.1}),
    ("ADOPT", {"nesterov": True}),
]
# bf16/f16/f32 groups in one tree: weight decay on/off, nesterov on/off, master weights
MIXED = [("Momentum", {"nesterov": True, "weight_decay": 0.01}), ("Adam", {"weight_decay": 0.1}),
         ("Adam", {"master_weights": True}), ("LAMB", {"weight_decay": 0.01}),
         ("LAMB", {"master_weights": True})]
F32 = (jnp.float32,)
LOW = (jnp.bfloat16, jnp.float32, jnp.float16)


def config_id(name, kw, dtypes):
  kws = "-".join(f"{k}={v}" for k, v in kw.items())
  return f"{name}{'-' + kws if kws else ''}-{'mixed' if len(dtypes) > 1 else 'f32'}"


def _cpu():
  return jax.devices("cpu")[0]


def tree(dtypes, shapes=SHAPES, seed=0):
  rng = np.random.RandomState(seed)
  return {f"l{i:02d}": jnp.asarray(rng.standard_normal(s), dtypes[i % len(dtypes)])
          for i, s in enumerate(shapes)}


def grads(t, seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), t)


class Stats:
  """Worst error seen, in ulps, per dtype (reported by the tests: 'ideally bitwise')."""

  def __init__(self):
    self.worst = {}

  def note(self, dtype, ulps):
    k = np.dtype(dtype).name
    self.worst[k] = max(self.worst.get(k, 0.0), float(ulps))


def storage_ulp(x):
  """One ulp of ``x``'s largest magnitude in its own dtype (a rounding flip of a small step)."""
  x32 = np.abs(np.asarray(x, np.float32))
  sp = float(np.spacing(np.float32(x32.max(initial=0))))
  return sp * 2.0 ** (23 - jnp.finfo(x.dtype).nmant)


def host_leaves(state):
  """A flat (float) state's fields as NumPy leaves: ``{field: [leaf 0, leaf 1, ...]}``, read from
  one host copy of each buffer (``FlatState.leaf`` slices eagerly: one XLA program per leaf)."""
  bufs = jax.device_get(state.fields)
  return {k: [np.asarray(bufs[k][s.group][s.offset:s.offset + s.size]).reshape(s.shape)
              for s in state.layout.segments] for k in bufs}


def assert_close(a, b, old, what, ulps, stats, step_size=0.0):
  """|a - b| <= ulps * ulp(|old| + |new| + step) in a's dtype (``cases.ulps_error``)."""
  err = ulps_error(a, b, old, step_size)
  worst = float(np.max(err, initial=0.0))
  stats.note(np.dtype(a.dtype), worst)
  assert np.all(err <= ulps), (what, worst)


def assert_codes_close(a, b, what):
  """Two kernels' int8/fp8 codes of the same step: at most one apart, in at most 1 in 1000 (a
  value on a rounding boundary, where one path contracts a multiply-add and the other not)."""
  diff = np.abs(np.asarray(a, int) - np.asarray(b, int))
  assert diff.max(initial=0) <= 1 and np.count_nonzero(diff) <= diff.size // 1000, what


def compare_steps(name, kw, dtypes, backend, stats, steps=2, f32_ulps=2, shapes=SHAPES,
                  grad_dtype=None):
  """``steps`` steps from the same state: ``backend`` vs the jnp oracle on the CPU, every leaf of
  params and state; learning rate changing each step (a runtime value); gradients in the
  params' dtypes, or every other one in ``grad_dtype``."""
  t = tree(dtypes, shapes)
  defs = {b: getattr(optim, name)(learning_rate=0.05, backend=b, **kw) for b in ("jnp", backend)}
  traces = {b: 0 for b in defs}

  def make(b, d):
    def step(o, g, lr):
      traces[b] += 1
      return o.replace(optimizer_def=d).apply_gradient(g, learning_rate=lr)
    return jax.jit(step)
  run = {b: make(b, d) for b, d in defs.items()}
  opt = defs["jnp"].create(t)
  layered = name in ("LAMB", "LARS")
  for i in range(steps):
    g, lr = grads(t, i + 1), jnp.float32(0.05 / (i + 1))
    if grad_dtype is not None:
      g = {k: (x.astype(grad_dtype) if j % 2 else x) for j, (k, x) in enumerate(sorted(g.items()))}
    with jax.default_device(_cpu()):
      a = run["jnp"](*jax.device_put((opt, g, lr), _cpu()))
    b = run[backend](opt, g, lr)
    for x, y, old in zip(jax.tree.leaves(a.target), jax.tree.leaves(b.target),
                         jax.tree.leaves(opt.target)):
      assert x.dtype == y.dtype == old.dtype
      if layered:
        o64 = np.asarray(old, np.float64)
        np.testing.assert_allclose(
            np.asarray(x, np.float64) - o64, np.asarray(y, np.float64) - o64,
            rtol=2e-5 if x.dtype == jnp.float32 else 1e-2, atol=2 * storage_ulp(old))
      else:
        assert_close(x, y, old, (name, kw, i), f32_ulps if x.dtype == jnp.float32 else 1, stats,
                     step_size=float(lr))
    a_st, b_st, o_st = (host_leaves(o.state.param_states) for o in (a, b, opt))
    g_leaves, p_leaves = jax.tree.leaves(g), jax.tree.leaves(opt.target)
    assert int(a.state.step) == int(b.state.step) == i + 1
    for k in a_st:
      for j, (x, y, old) in enumerate(zip(a_st[k], b_st[k], o_st[k])):
        if layered:
          x64, y64, o64 = (np.asarray(z, np.float64) for z in (x, y, old))
          terms = np.abs(o64) + np.abs(x64) + float(lr) * (
              np.abs(np.asarray(g_leaves[j], np.float64))
              + np.abs(np.asarray(p_leaves[j], np.float64)))
          assert np.all(np.abs(x64 - y64) <= 2e-5 * terms + 1e-30), (name, kw, i, k, j)
        else:
          # XLA:CPU (the oracle) contracts a*b + c into FMAs, the kernels never do: where terms
          # cancel the two differ by an ulp of the terms, |g| + g^2 here
          g64 = np.abs(np.asarray(g_leaves[j], np.float64))
          assert_close(x, y, old, (name, kw, i, k, j), f32_ulps, stats,
                       step_size=g64 + g64 * g64 + float(lr))
    opt = a
  # the learning rate changed every step: one trace (so one lowering, one kernel compile)
  assert traces[backend] == 1, traces


def leaf_launches(backend, stats):
  """The leaf-direct kernels over several launches per dtype group (``LEAVES_PER_LAUNCH`` = 3
  here): the flat state chained through the launches in place, LAMB/LARS per-leaf sums gathered
  across them, leaves of every vector width (sizes % 4 and % 8 or not), a tree of 30 leaves, and
  gradients in another dtype than their params (bf16 params, float32 grads and the reverse)."""
  saved = kt.LEAVES_PER_LAUNCH
  kt.LEAVES_PER_LAUNCH = 3
  try:
    shapes = SHAPES + [(5, 8), (16,), (2, 2, 2)] + [(i + 1, 3) for i in range(17)]
    layout = optim.FlatLayout.build(tree(LOW, shapes))
    assert max(len(kt.plan_launches(layout, gi, kt.Tuning())) for gi in range(3)) >= 3
    # one step each: the launches' plumbing (the steps' numerics are the other cases')
    for name, kw in (("Adam", {"weight_decay": 0.1}), ("LAMB", {"weight_decay": 0.01}),
                     ("LARS", {"nesterov": True})):
      compare_steps(name, kw, LOW, backend, stats, steps=1, shapes=shapes)
    compare_steps("Adam", {}, (jnp.bfloat16,), backend, stats, steps=1, grad_dtype=jnp.float32)
    compare_steps("Momentum", {}, (jnp.float32,), backend, stats, steps=1,
                  grad_dtype=jnp.bfloat16)
  finally:
    kt.LEAVES_PER_LAUNCH = saved


def sharded(backend, stats):
  """``fusedopt.shard_optimizer`` with the Triton kernels running per shard under ``shard_map``
  (every device's slice of each dtype group, a one-leaf group of the local layout; LAMB and LARS,
  whose rules take per-tensor tables, through the flat kernel on per-unit tables) vs the
  single-device jnp step on the CPU: ZeRO-1 (replicated params) and FSDP (flat sharded params),
  over the devices there are (4 host devices in the interpreter's subprocess, the GPU on one)."""
  from fusedopt import serialization, sharding  # pylint: disable=import-outside-toplevel
  devs = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devs), ("x",))
  t = tree((jnp.float32, jnp.bfloat16))
  # each mode once with an element-wise rule, LAMB's fused sums and LARS's per-unit tables
  for name, kw, mode in (("Adam", {"weight_decay": 0.1}, "replicated"),
                         ("Momentum", {"nesterov": True}, "sharded"),
                         ("LAMB", {"weight_decay": 0.1}, "replicated"),
                         ("LARS", {"weight_decay": 0.01}, "sharded")):
    ref = getattr(optim, name)(learning_rate=0.05, backend="jnp", **kw)
    d = sharding.shard_optimizer(getattr(optim, name)(learning_rate=0.05, backend=backend, **kw),
                                 mesh, "x", params=mode)
    with jax.default_device(_cpu()):
      single = ref.create(jax.device_put(t, _cpu()))
    opt = d.create(t)
    if mode == "sharded":
      step = jax.jit(lambda o, g: o.apply_gradient(sharding.FlatParams.pack(g, o.target.layout)))
    else:
      step = jax.jit(lambda o, g: o.apply_gradient(g))
    for i in range(2):
      g = grads(t, 30 + i)
      old = single.target
      if i:   # from the oracle's state (a checkpoint restores into the sharded layout)
        opt = serialization.from_bytes(opt, serialization.to_bytes(single))
      with jax.default_device(_cpu()):
        single = jax.jit(lambda o, g: o.apply_gradient(g))(single, jax.device_put(g, _cpu()))
      opt = step(opt, g)
      got = opt.target.tree() if mode == "sharded" else opt.target
      for x, y, o in zip(jax.tree.leaves(single.target), jax.tree.leaves(got),
                         jax.tree.leaves(old)):
        assert x.dtype == y.dtype, (x.dtype, y.dtype)
        # LAMB/LARS: per-tensor norms from psum-ed per-shard partial sums, summed in another
        # order than on one device (the bound of tests/test_sharding.py)
        ulps = 4 if name in ("LAMB", "LARS") else 2 if x.dtype == jnp.float32 else 1
        assert_close(np.asarray(y), np.asarray(x), np.asarray(o), (name, mode, i), ulps, stats,
                     step_size=0.05)


def sharded_quantized(backend, stats):
  """Low-bit state per shard on the Triton kernels: ``shard_optimizer`` over int8 Adam, ZeRO-1
  at the tree's alignment and FSDP at 256 (each device runs its slice of each quantized group,
  whole blocks, as the one-leaf quantized group of its local layout: rows of a block fit at any
  alignment) vs the single-device jnp step on the CPU, from the same state each step: codes and
  scales leaf by leaf (``FlatState.stored_leaf``) and params, within the bounds of
  ``quantized-narrow-alignments``; no group falls back to jnp. (In the interpreter it hung until
  the callback operands were passed in parts: ``kernels/triton.py``, ``_callback_parts``.)"""
  from fusedopt import layout as fl   # pylint: disable=import-outside-toplevel
  # the two large leaves span shards (each device's slice is 128 blocks: 32768 elements)
  t = tree((jnp.float32, jnp.bfloat16), [(300, 256), (40000,), (33,), (4100,), (3, 5)])
  saved = fl.choose_align
  try:
    for mode, align in (("replicated", None), ("sharded", 256)):
      if align:
        fl.choose_align = lambda sizes, a=align: a
      _sharded_quantized_steps(backend, stats, t, mode, align)
  finally:
    fl.choose_align = saved


def _sharded_quantized_steps(backend, stats, t, mode, align):
  import warnings   # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from fusedopt import quantization, serialization, sharding
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
  lr = 1e-3
  kw = dict(learning_rate=lr, weight_decay=0.1, state_dtype="int8")
  with jax.default_device(_cpu()):
    single = optim.Adam(backend="jnp", **kw).create(jax.device_put(t, _cpu()))
  opt = sharding.shard_optimizer(optim.Adam(backend=backend, **kw), mesh, "x",
                                 params=mode).create(t)
  lay = opt.state.param_states.layout
  assert align is None or lay.align == align
  if len(mesh.devices.flat) > 1:
    n = [lay.shard_size(s.group) for s in lay.segments]
    assert sum(lay.groups[s.group].block > 0 and s.offset // k != (s.offset + s.size - 1) // k
               for s, k in zip(lay.segments, n)) == 2, lay
  if mode == "sharded":
    step = jax.jit(lambda o, g: o.apply_gradient(sharding.FlatParams.pack(g, o.target.layout)))
  else:
    step = jax.jit(lambda o, g: o.apply_gradient(g))
  with warnings.catch_warnings(record=True) as caught:   # the backends are chosen as it traces
    warnings.simplefilter("always")
    # the codes written by the kernel: the interpreter's callback or jax-triton's custom call
    jaxpr = str(jax.make_jaxpr(step)(opt, grads(t, 50)))
    assert re.search(r"u8\[\d+\].* = (pure_callback|triton_kernel_call)\[", jaxpr), mode
    for i in range(2):
      g = grads(t, 50 + i)
      old = single
      if i:   # from the oracle's state (a checkpoint restores into the sharded layout)
        opt = serialization.from_bytes(opt, serialization.to_bytes(single))
      with jax.default_device(_cpu()):
        single = jax.jit(lambda o, g: o.apply_gradient(g))(single, jax.device_put(g, _cpu()))
      opt = jax.block_until_ready(step(opt, g))
      a, b, o = jax.device_get((single, opt, old))
      got = b.target.tree() if mode == "sharded" else b.target
      what = ("Adam int8", mode, align, i)
      for x, y, z in zip(jax.tree.leaves(a.target), jax.tree.leaves(got),
                         jax.tree.leaves(o.target)):
        assert x.dtype == y.dtype, what
        assert_close(np.asarray(y), np.asarray(x), np.asarray(z), what,
                     2 if x.dtype == np.float32 else 1, stats, step_size=lr)
      fa, fb, fo = (s.state.param_states for s in (a, b, o))
      n_quantized = 0
      for k in fa.fields:
        for j in range(len(fa.layout.segments)):
          x, y = fa.stored_leaf(k, j), fb.stored_leaf(k, j)
          if not quantization.is_quantized(x):   # a small leaf's float32 state
            assert_close(np.asarray(y), np.asarray(x), np.asarray(fo.stored_leaf(k, j)),
                         (what, k, j), 2, stats)
            continue
          n_quantized += 1
          assert_codes_close(x.codes, y.codes, (what, k, j))
          np.testing.assert_allclose(np.asarray(y.scales), np.asarray(x.scales), rtol=1e-6,
                                     err_msg=str((what, k, j)))
      assert n_quantized == 6, (what, n_quantized)   # both moments of three large leaves
  assert not [w for w in caught if "jnp backend" in str(w.message)], \
      [str(w.message) for w in caught]


def multi_fused(backend, stats):
  """A fused MultiOptimizer (one flat state, every sub-optimizer's scalars a per-leaf table:
  ``per_segment``) on the leaf-direct kernels vs the same on jnp: Adam with weight decay on the
  matrices only, different learning rates and betas; leaves selected by neither keep their values."""
  t = tree(LOW)
  mats = optim.ModelParamTraversal(lambda path, x: x.ndim >= 2)
  vecs = optim.ModelParamTraversal(lambda path, x: x.ndim == 1)
  defs = {b: optim.MultiOptimizer(
      (mats, optim.Adam(learning_rate=0.05, weight_decay=0.1, backend=b)),
      (vecs, optim.Adam(learning_rate=0.02, beta1=0.8, backend=b))) for b in ("jnp", backend)}
  opt = defs["jnp"].create(t)
  assert type(opt.state.param_states).__name__ == "FusedMultiState"
  for i in range(2):
    g = grads(t, 40 + i)
    with jax.default_device(_cpu()):
      a = jax.jit(lambda o, g: o.apply_gradient(g))(*jax.device_put((opt, g), _cpu()))
    b = jax.jit(lambda o, g: o.replace(optimizer_def=defs[backend]).apply_gradient(g))(opt, g)
    for (path, x), y, old in zip(jax.tree_util.tree_leaves_with_path(a.target),
                                 jax.tree.leaves(b.target), jax.tree.leaves(opt.target)):
      if x.ndim == 0:   # selected by neither traversal: unchanged
        assert np.array_equal(np.asarray(y), np.asarray(old)), path
      assert_close(y, x, old, ("multi", path, i), 2 if x.dtype == jnp.float32 else 1, stats,
                   step_size=0.05)
    opt = a


def optax_api(backend, stats):
  """``fusedopt.tx.adamw`` (optax's API: ``update`` returns ``p' - p``, which the leaf-direct
  kernels write to fresh per-leaf buffers, the params not being donated) with a weight-decay
  mask (a per-leaf table) and the checked/clipped variant, vs the same on jnp: updates within
  ulps of the terms, and ``optax.apply_updates`` of them."""
  import optax  # pylint: disable=import-outside-toplevel
  from fusedopt import tx  # pylint: disable=import-outside-toplevel
  t = tree(LOW)
  mask = jax.tree.map(lambda x: x.ndim >= 2, t)
  for kw in ({}, {"clip_global_norm": 1.0}):
    txs = {b: tx.adamw(0.05, weight_decay=0.1, mask=mask, backend=b, **kw)
           for b in ("jnp", backend)}
    state = txs["jnp"].init(t)
    params = t
    for i in range(2):
      g = grads(t, 50 + i)
      with jax.default_device(_cpu()):
        ua, sa = jax.jit(txs["jnp"].update)(*jax.device_put((g, state, params), _cpu()))
      ub, _ = jax.jit(txs[backend].update)(g, state, params)
      for (path, x), y, p in zip(jax.tree_util.tree_leaves_with_path(ua), jax.tree.leaves(ub),
                                 jax.tree.leaves(params)):
        assert x.dtype == y.dtype, (path, x.dtype, y.dtype)
        assert_close(np.asarray(optax.apply_updates(p, y)), np.asarray(optax.apply_updates(p, x)),
                     np.asarray(p), ("tx", kw, path, i), 2 if p.dtype == jnp.float32 else 1,
                     stats, step_size=0.05)
      params, state = optax.apply_updates(params, ua), sa


def schedule_free(backend, stats):
  """``fusedopt.tx.schedule_free_adamw`` (its rule, and the averaging scalars from optax's state)
  on the leaf-direct kernels vs the same on jnp, over bf16 and f32 leaves (optax's state takes
  the lowest float dtype of the tree, which bf16 and f16 together do not have), two steps."""
  import optax  # pylint: disable=import-outside-toplevel
  from fusedopt import tx  # pylint: disable=import-outside-toplevel
  t = tree((jnp.bfloat16, jnp.float32))
  txs = {b: tx.schedule_free_adamw(0.05, weight_decay=0.1, backend=b) for b in ("jnp", backend)}
  state, params = txs["jnp"].init(t), t
  for i in range(2):
    g = grads(t, 60 + i)
    with jax.default_device(_cpu()):
      ua, sa = jax.jit(txs["jnp"].update)(*jax.device_put((g, state, params), _cpu()))
    ub, sb = jax.jit(txs[backend].update)(g, state, params)
    assert float(sb.weight_sum) == float(sa.weight_sum) and int(sb.step_count) == i + 2
    for (path, x), y, p in zip(jax.tree_util.tree_leaves_with_path(ua), jax.tree.leaves(ub),
                               jax.tree.leaves(params)):
      assert_close(np.asarray(optax.apply_updates(p, y)), np.asarray(optax.apply_updates(p, x)),
                   np.asarray(p), ("schedule-free", path, i), 2 if p.dtype == jnp.float32 else 1,
                   stats, step_size=0.05)
    params, state = optax.apply_updates(params, ua), sa


def complex_planes(backend, stats):
  """``fusedopt.tx`` on complex64 leaves (kernels/planes.py: real and imaginary planes through
  the leaf-direct kernels) vs the same on jnp: Adam (an inferred real second moment) and LAMB
  (per-tensor sums, a stage with declared real fields), with no fallback to jnp."""
  import warnings  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from fusedopt import tx  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(7)
  c = lambda *shape: jnp.asarray((rng.standard_normal(shape)  # noqa: E731
                                  + 1j * rng.standard_normal(shape)).astype(np.complex64))
  params = {"w": c(33, 40), "b": c(70), "s": c()}
  ulps = {tx.adamw: 2, tx.lamb: 4}   # LAMB: its norms are sums in each backend's own order
  for make in (tx.adamw, tx.lamb):
    txs = {b: make(0.05, weight_decay=0.1, backend=b) for b in ("jnp", backend)}
    state = txs["jnp"].init(params)
    p = params
    for i in range(2):
      g = jax.tree.map(lambda x, k=i: x * (0.5 + k) + 0.25j, params)
      with jax.default_device(_cpu()):
        ua, sa = jax.jit(txs["jnp"].update)(*jax.device_put((g, state, p), _cpu()))
      with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ub, _ = jax.jit(txs[backend].update)(g, state, p)
      for (path, x), y, q in zip(jax.tree_util.tree_leaves_with_path(ua), jax.tree.leaves(ub),
                                 jax.tree.leaves(p)):
        assert y.dtype == jnp.complex64, (path, y.dtype)
        for part in (np.real, np.imag):
          assert_close(part(np.asarray(optax.apply_updates(q, y))),
                       part(np.asarray(optax.apply_updates(q, x))), part(np.asarray(q)),
                       ("tx complex", make.__name__, path, i), ulps[make], stats,
                       step_size=0.05)
      p, state = optax.apply_updates(p, ua), sa


def checked_update(backend, stats, shapes=SHAPES):
  """apply_gradient_checked: the Triton pre-pass + guarded kernels vs the jnp backend, with loss
  scaling and clipping, then a skipped step (a NaN gradient) that changes nothing bitwise."""
  t = tree(LOW, shapes)
  for name, kw in (("Adam", {"weight_decay": 0.1}), ("Momentum", {"nesterov": True}),
                   ("LAMB", {"weight_decay": 0.01, "master_weights": True})):
    defs = {b: getattr(optim, name)(learning_rate=0.05, backend=b, **kw) for b in ("jnp", backend)}
    run = {b: jax.jit(lambda o, g, d=d: o.replace(optimizer_def=d).apply_gradient_checked(
        g, grad_scale=jnp.float32(0.25), clip_global_norm=20.0)) for b, d in defs.items()}
    opt = defs["jnp"].create(t)
    g = jax.tree.map(lambda x: (x * 4).astype(x.dtype), grads(t, 7))
    with jax.default_device(_cpu()):
      a, fa, na = run["jnp"](*jax.device_put((opt, g), _cpu()))
    b, fb, nb = run[backend](opt, g)
    assert bool(fa) and bool(fb)
    np.testing.assert_allclose(float(nb), float(na), rtol=1e-6)
    assert int(b.state.step) == 1
    for x, y, old in zip(jax.tree.leaves(a.target), jax.tree.leaves(b.target),
                         jax.tree.leaves(opt.target)):
      if name == "LAMB":
        o64 = np.asarray(old, np.float64)
        np.testing.assert_allclose(np.asarray(x, np.float64) - o64,
                                   np.asarray(y, np.float64) - o64,
                                   rtol=2e-5 if x.dtype == jnp.float32 else 1e-2,
                                   atol=2 * storage_ulp(old))
      else:
        assert_close(x, y, old, (name, "checked"), 2 if x.dtype == jnp.float32 else 1, stats,
                     step_size=0.05)
    # a non-finite gradient: the step is skipped, params, state and step bitwise unchanged
    bad = dict(g)
    bad["l08"] = bad["l08"].at[5].set(jnp.nan)
    c, fc, _ = run[backend](b, bad)
    assert not bool(fc)
    assert int(c.state.step) == int(b.state.step)
    for x, y in zip(jax.tree.leaves(c), jax.tree.leaves(b)):
      assert np.array_equal(np.atleast_1d(np.asarray(x)).view(np.uint8),
                            np.atleast_1d(np.asarray(y)).view(np.uint8))


def narrow_alignments(backend, stats):
  """A layout aligned to less than 1024 elements (``choose_align`` picks it for many small
  leaves, e.g. 256 for 2000 leaves of 5K-15K elements): the leaf-direct kernels take rows as
  wide as the alignment (256 and 128 here: 16 and 32 rows per program), their state rows,
  per-leaf sums and the checked step's pre-pass with them, and nothing runs on jnp. Below
  ``MIN_ROW`` (64) the group runs on jnp, with a warning, and the pre-pass is XLA's."""
  import warnings   # pylint: disable=import-outside-toplevel
  from fusedopt import layout as fl   # pylint: disable=import-outside-toplevel
  saved = fl.choose_align
  try:
    for align in (256, 128, 64):
      fl.choose_align = lambda sizes, a=align: a
      lay = optim.FlatLayout.build(tree(LOW, SHAPES + [(9, 40)]))
      assert lay.align == align
      if align >= kt.MIN_ROW:
        assert {ln.c for gi in range(3) for ln in kt.plan_launches(lay, gi, kt.Tuning())} == \
            {align}
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compare_steps("Adam", {"weight_decay": 0.1}, LOW, backend, stats, steps=1,
                      shapes=SHAPES + [(9, 40)])
        if align == 256:   # per-leaf sums and the pre-pass over rows of 256 too
          compare_steps("LAMB", {"weight_decay": 0.01}, LOW, backend, stats, steps=1,
                        shapes=SHAPES + [(9, 40)])
          checked_update(backend, stats, shapes=SHAPES + [(9, 40)])
      fell_back = [w for w in caught if "runs on the jnp backend" in str(w.message)]
      assert bool(fell_back) == (align < kt.MIN_ROW), (align, [str(w.message) for w in caught])
  finally:
    fl.choose_align = saved


def quantized_narrow_alignments(backend, stats):
  """Quantized state where the layout is aligned to less than 1024 elements: a flat optimizer's
  quantized groups at alignments 256 and 64 (their segments start on whole 256-element blocks
  whatever the alignment, ``FlatLayout.unit``; the plain group of 64 runs on jnp) and
  ``fusedopt.tx``'s int8 leaf state (a one-leaf layout aligned to 256 per leaf) run on the
  Triton kernels, not on jnp, and take the jnp path's steps: codes at most one apart (where XLA
  contracts a multiply-add; in at most 1 of 1000), scales and params within float32 rounding."""
  import warnings   # pylint: disable=import-outside-toplevel
  from fusedopt import layout as fl, quantization, tx   # pylint: disable=import-outside-toplevel
  from fusedopt.kernels import registry   # pylint: disable=import-outside-toplevel
  t = tree((jnp.float32, jnp.float32, jnp.bfloat16, jnp.float32),
           [(70, 90), (5000,), (4100,), (33,)])
  lr = 1e-3

  def check(a, b, old, what):
    for x, y, o in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(old)):
      x, y, o = np.asarray(x), np.asarray(y), np.asarray(o)
      assert x.dtype == y.dtype and x.shape == y.shape, what
      if x.dtype == np.uint8:   # codes
        assert_codes_close(x, y, what)
      elif jnp.issubdtype(x.dtype, jnp.integer):
        assert np.array_equal(x, y), what
      else:
        assert_close(x, y, o, what, 2 if x.dtype == np.float32 else 1, stats, step_size=lr)

  steps = {"flat": jax.jit(lambda o, g: o.apply_gradient(g)),
           "tx": jax.jit(lambda tr, g, s, p: tx.update_and_apply(tr, g, s, p), static_argnums=0)}

  def step(kind, b, *args):
    fn = steps[kind]
    if b == "jnp":
      with jax.default_device(_cpu()):
        return fn(*jax.device_put(args, _cpu())) if kind == "flat" else fn(
            args[0], *jax.device_put(args[1:], _cpu()))
    return fn(*args)

  saved = fl.choose_align
  try:
    for align in (256, 64):
      fl.choose_align = lambda sizes, a=align: a
      defs = {b: optim.Adam(learning_rate=lr, weight_decay=0.1, state_dtype="int8", backend=b)
              for b in ("jnp", backend)}
      opt = defs["jnp"].create(t)
      layout = opt.state.param_states.layout
      quantized = [gi for gi, group in enumerate(layout.groups) if group.block]
      assert layout.align == align and len(quantized) == 2, layout
      for gi in quantized:
        assert registry.select_quantized(backend, layout, gi, None).name == backend, (align, gi)
      for i in range(2):
        g = grads(t, 30 + i)
        a = step("flat", "jnp", opt, g)
        b = step("flat", backend, opt.replace(optimizer_def=defs[backend]), g)
        check((a.target, a.state.param_states), (b.target, b.state.param_states),
              (opt.target, opt.state.param_states), ("Adam int8", align, i))
        opt = a
  finally:
    fl.choose_align = saved
  txs = {b: tx.adam(lr, state_dtype="int8", backend=b) for b in ("jnp", backend)}
  state, params = txs["jnp"].init(t), t
  assert sum(quantization.is_quantized(x) for x in jax.tree.leaves(
      state, is_leaf=quantization.is_quantized)) == 6   # mu and nu of three leaves
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for i in range(2):
      g = grads(t, 40 + i)
      pa, sa = step("tx", "jnp", txs["jnp"], g, state, params)
      pb, sb = step("tx", backend, txs[backend], g, state, params)
      check((pa, sa), (pb, sb), (params, state), ("tx.adam int8", i))
      params, state = pa, sa
  assert not [w for w in caught if "jnp backend" in str(w.message)], \
      [str(w.message) for w in caught]


def prepass(backend, stats):
  """The Triton pre-pass (per-row sums of squares and non-finite counts, reduced in XLA) equals
  the XLA one: norm, finite flag and clip factor; inf, NaN, a float16 overflow-by-scaling and
  finite gradients whose sum of squares overflows."""
  del stats
  plat = "interpret" if backend == "triton_interpret" else None
  t = tree(LOW, seed=3)
  layout = optim.FlatLayout.build(t)
  cases = [grads(t, 11)]
  for bad in (jnp.inf, -jnp.inf, jnp.nan):
    g = dict(cases[0])
    g["l06"] = g["l06"].at[2, 3].set(bad)
    cases.append(g)
  # finite, but the float32 sum of squares overflows: clipped (norm recomputed), not skipped
  cases.append({k: v * 1e20 if v.dtype != jnp.float16 else v for k, v in cases[0].items()})
  # one compiled program per implementation and form (scale and clip are runtime values)
  xla = {False: jax.jit(lambda l: flat.gradient_prepass(l)),
         True: jax.jit(lambda l, s, c: flat.gradient_prepass(l, s, c))}
  tri = {False: jax.jit(lambda l: kt.gradient_prepass(layout, l, platform=plat)),
         True: jax.jit(lambda l, s, c: kt.gradient_prepass(layout, l, s, c, platform=plat))}
  for g in cases:
    leaves = jax.tree.leaves(g)
    for scale, clip in ((None, None), (jnp.float32(1 / 1024.), 0.5), (jnp.float32(3.0), 1e3)):
      args = (leaves,) if scale is None else (leaves, scale, jnp.float32(clip))
      fa, na, sa = xla[scale is not None](*args)
      fb, nb, sb = tri[scale is not None](*args)
      assert bool(fa) == bool(fb)
      if bool(fa):
        np.testing.assert_allclose(float(nb), float(na), rtol=2e-6)
        np.testing.assert_allclose(float(sb), float(sa), rtol=2e-6)
      else:
        assert not np.isfinite(float(nb)) or not bool(fb)


def vmap_and_grad(backend, stats):
  """``jax.vmap`` over an ensemble of learning rates (``triton_call`` has no batching rule: the
  driver calls the kernels once per member) and ``jax.grad`` through a step (tangents from the
  jnp path) on the Triton kernels, against the jnp backend."""
  del stats
  p = tree(F32, shapes=[(33, 65), (7,), ()])
  g = grads(p, 1)

  def loss(b, lr):
    new = optim.Adam(0.01, weight_decay=0.01, backend=b).create(p).apply_gradient(
        g, learning_rate=lr)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(new.target)), new.target

  lrs = jnp.asarray([0.01, 0.05, 0.1], jnp.float32)
  got = jax.jit(jax.vmap(lambda lr: loss(backend, lr)[1]))(lrs)
  ref = jax.jit(jax.vmap(lambda lr: loss("jnp", lr)[1]))(lrs)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)
  d_got = jax.jit(jax.grad(lambda lr: loss(backend, lr)[0]))(jnp.float32(0.02))
  d_ref = jax.jit(jax.grad(lambda lr: loss("jnp", lr)[0]))(jnp.float32(0.02))
  np.testing.assert_allclose(float(d_got), float(d_ref), rtol=1e-5)


def block_sizes(backend, stats):
  """flat_update directly: blocks smaller than, equal to and larger than a 1024-element unit
  (then the last block overhangs the buffer: masked), LAMB's sums per unit in every case."""
  from fusedopt.adam import ADAM_RULE
  from fusedopt.elementwise import namespace
  from fusedopt.lamb import MOMENTS_RULE
  plat = "interpret" if backend == "triton_interpret" else None
  s = {"lr": 1e-2, "b1": .9, "one_minus_b1": .1, "b2": .999, "one_minus_b2": 1e-3,
       "bias_corr1": .19, "bias_corr2": 2e-3, "eps": 1e-8, "lr_wd": 1e-4, "wd": 1e-2}
  ns = namespace({k: jnp.float32(x) for k, x in s.items()})
  for units in (1, 3, 5):
    n = units * kt.ALIGN
    rng = np.random.RandomState(units)
    p, g, m = (jnp.asarray(rng.standard_normal(n), jnp.float32) for _ in range(3))
    v = jnp.asarray(rng.random_sample(n), jnp.float32)
    for block in (256, 1024, 4096, 16384):
      tuning = kt.Tuning(block=block)
      out_p, (out_m, out_v), _ = jax.jit(lambda *a, tu=tuning: kt.flat_update(
          ADAM_RULE, s, {}, a[0], a[1], a[2:], tuning=tu, platform=plat))(p, g, m, v)
      with jax.default_device(_cpu()):
        ref_p, (ref_m, ref_v) = jax.jit(lambda *a: ADAM_RULE.fn(JNP, ns, None, *a))(
            *jax.device_put((p, g, m, v), _cpu()))
      assert_close(out_p, ref_p, p, ("p", units, block), 2, stats, 1e-2)
      assert_close(out_m, ref_m, m, ("m", units, block), 2, stats)
      assert_close(out_v, ref_v, v, ("v", units, block), 2, stats)
      _, _, sums = jax.jit(lambda *a, tu=tuning: kt.flat_update(
          MOMENTS_RULE, s, {}, a[0], a[1], a[2:], tuning=tu, platform=plat))(p, g, m, v)
      with jax.default_device(_cpu()):
        _, new = MOMENTS_RULE.fn(JNP, ns, None, *jax.device_put((p, g, m, v), _cpu()))
        terms = MOMENTS_RULE.sumsq(JNP, ns, None, p, g, *new)
        ref = [np.asarray(jnp.sum((x * x).reshape(units, kt.ALIGN), axis=1)) for x in terms]
      for x, y in zip(sums, ref):
        assert x.shape == (units,)
        np.testing.assert_allclose(np.asarray(x), y, rtol=2e-6)


def bitwise_vs_numpy(backend, stats):
  """Each rule's kernel against the same rule evaluated by NumPy in float32 (IEEE, one rounding
  per operation, no FMA): float32, float16 and bfloat16 stores bitwise equal (in interpret mode
  with the shim's round-to-nearest-even float32 -> bfloat16 conversion, what the GPU's cvt.rn
  does: ``kernels/triton.py`` ``_round_bf16_like_the_gpu``)."""
  import types  # pylint: disable=import-outside-toplevel
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  from fusedopt.adabelief import ADABELIEF_RULE
  from fusedopt.adadelta import ADADELTA_RULE
  from fusedopt.adam import ADAM_RULE
  from fusedopt.elementwise import guarded, with_master
  from fusedopt.momentum import momentum_rule
  from fusedopt.rmsprop import rmsprop_rule
  plat = "interpret" if backend == "triton_interpret" else None
  from numpy_oracle import NPX  # pylint: disable=import-outside-toplevel
  n = 3 * kt.ALIGN
  rng = np.random.RandomState(5)
  for rule in (ADAM_RULE, with_master(ADAM_RULE), momentum_rule(True), rmsprop_rule(True),
               ADABELIEF_RULE, ADADELTA_RULE, guarded(ADAM_RULE)):
    for pdt in (np.float32, ml_dtypes.bfloat16, np.float16):
      sv = {k: np.float32(rng.uniform(0.05, 0.9)) for k in rule.scalars}
      if "ok" in sv:
        sv["ok"] = np.float32(1.0)
      p = rng.standard_normal(n).astype(pdt)
      g = rng.standard_normal(n).astype(pdt)
      st = [np.abs(rng.standard_normal(n)).astype(np.float32) for _ in range(rule.n_state)]
      out_p, out_st, _ = jax.jit(lambda p, g, *st: kt.flat_update(
          rule, sv, {}, p, g, st, platform=plat))(p, g, *st)
      ns = types.SimpleNamespace(**sv)
      with np.errstate(all="ignore"):
        ref_p, ref_st = rule.fn(NPX, ns, None, p.astype(np.float32), g.astype(np.float32), *st)
      for got, ref, dt in [(out_p, ref_p, pdt)] + [(a, b, np.float32) for a, b in zip(out_st, ref_st)]:
        got = np.asarray(got)
        ref = np.asarray(ref, np.float32).astype(dt)
        # NaN where the reference has one (sqrt(v - mg^2) of random state), whatever its payload
        # (the GPU's is canonical, NumPy's is not); every other value bit for bit
        nan = np.isnan(ref.astype(np.float32))
        assert np.array_equal(nan, np.isnan(got.astype(np.float32))), (rule.name, dt)
        same = np.array_equal(got[~nan].view(np.uint8), ref[~nan].view(np.uint8))
        stats.note(dt, 0 if same else 99)
        assert same, (rule.name, dt)


def quantized_state(backend, stats):
  """Quantized state (``Backend.run_quantized``: int8 and e4m3 codes with per-block scales, rows
  of one 256-element block): params, codes, scales and float fields equal NumPy's float32
  evaluation bitwise (tests/test_quantized_native.py's reference: decode, the rule, block
  absmax, encode), over ragged leaves and leaves of several programs; the checked step's skip;
  fields a rule passes through; LAMB's sums over the stored state (per-row sums: another order
  than the reference's, so within 2e-6); and the encoders on every value where a code
  changes."""
  import functools as ft  # pylint: disable=import-outside-toplevel
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  import test_quantized_native as tq  # pylint: disable=import-outside-toplevel
  plat = "interpret" if backend == "triton_interpret" else None
  run = ft.partial(kt.run_quantized, platform=plat)
  bf16 = ml_dtypes.bfloat16
  for name, pdt, storage in (
      ("adam", np.float32, "int8"), ("adam+guarded", np.float16, "fp8"),
      ("adam", np.float32, (tq.F8, np.dtype(bf16))), ("lamb_moments", np.float32, "int8"),
      ("lamb_apply+master+guarded", bf16, "int8"), ("adan", np.float32, "int8"),
      ("momentum_nesterov", bf16, "fp8")):
    tq.check_against_numpy(run, name, pdt, storage, sums_rtol=2e-6)
    stats.note(np.float32, 0)
  for fmt in (tq.S8, tq.U8, tq.F8):   # every value where a code changes
    tq.check_encoder(run, fmt)


def _same_bits(x, y):
  return np.array_equal(np.reshape(np.asarray(x), -1).view(np.uint8),
                        np.reshape(np.asarray(y), -1).view(np.uint8))


def leaf_state(backend, stats):
  """Per-leaf state (``fusedopt.tx``'s optax state: each leaf's state buffers read and written by
  address in the leaf-direct launch, ``Backend.run_leaves``) equals the flat-state kernels bit
  for bit, over several launches (``leaves_per_launch`` forced to 3), float32/bf16/f16 groups
  with state in mixed dtypes, a rule with three state fields (master weights), the guarded
  variant, and LAMB's moment pass with its per-leaf sums of squares. Then ``tx.adamw`` on the
  optax API (two calls and one pass) against the jnp backend: params and optax's state."""
  from fusedopt.adam import ADAM_RULE
  from fusedopt.elementwise import guarded, with_master
  from fusedopt.lamb import MOMENTS_RULE
  from fusedopt.kernels import common
  plat = "interpret" if backend == "triton_interpret" else None
  shapes = SHAPES + [(i + 1, 3) for i in range(5)]
  t = tree(LOW, shapes)
  layout = optim.FlatLayout.build(t)
  p_leaves, g_leaves = jax.tree.leaves(t), jax.tree.leaves(grads(t, 9))
  rng = np.random.RandomState(4)
  saved = kt.leaves_per_launch
  kt.leaves_per_launch = lambda rule, ls: 3
  try:
    for rule, st_dtypes in ((ADAM_RULE, (jnp.float32, jnp.bfloat16)),
                            (with_master(ADAM_RULE), (jnp.float32,) * 3),
                            (guarded(ADAM_RULE), (jnp.float32, jnp.float32)),
                            (MOMENTS_RULE, (jnp.bfloat16, jnp.float32))):
      sv = {k: jnp.float32(rng.uniform(0.05, 0.9)) for k in rule.scalars}
      if "ok" in sv:
        sv["ok"] = jnp.float32(1.0)
      for gi, group in enumerate(layout.groups):
        members = group.segments
        st_leaves = tuple(tuple(jnp.asarray(np.abs(rng.standard_normal(layout.segments[i].shape)),
                                            dt) for i in members) for dt in st_dtypes)
        flat_st = [common.pack_leaves(layout, gi, leaves) for leaves in st_leaves]
        pa, sa, ua = jax.jit(lambda p, g, st: kt.run(
            rule, sv, {}, layout, gi, p, g, st, platform=plat))(p_leaves, g_leaves, flat_st)
        pb, sb, ub = jax.jit(lambda p, g, st: kt.run(
            rule, sv, {}, layout, gi, p, g, st, platform=plat, leaf_state=True))(
                p_leaves, g_leaves, st_leaves)
        if rule.writes_param:
          for x, y in zip(pa, pb):
            assert _same_bits(x, y), (rule.name, gi)
        for f in range(rule.n_state):
          split = common.split_group_as(layout, gi, sa[f], [x.dtype for x in st_leaves[f]])
          for x, y in zip(split, sb[f]):
            assert x.shape == y.shape and x.dtype == y.dtype, (rule.name, x.shape, y.shape)
            assert _same_bits(x, y), (rule.name, gi, f)
        for x, y in zip(ua or (), ub or ()):
          assert np.array_equal(np.asarray(x), np.asarray(y)), (rule.name, "sums")
        stats.note(group.dtype, 0)
  finally:
    kt.leaves_per_launch = saved
  from fusedopt import tx  # pylint: disable=import-outside-toplevel
  t = tree(LOW)
  txs = {b: tx.adamw(0.05, weight_decay=0.1, backend=b) for b in ("jnp", backend)}
  state = txs["jnp"].init(t)
  g = grads(t, 60)
  with jax.default_device(_cpu()):
    pa, sa = jax.jit(lambda g, s, p: tx.update_and_apply(txs["jnp"], g, s, p))(
        *jax.device_put((g, state, t), _cpu()))
  pb, sb = jax.jit(lambda g, s, p: tx.update_and_apply(txs[backend], g, s, p))(g, state, t)
  for x, y, p in zip(jax.tree.leaves((pa, sa)), jax.tree.leaves((pb, sb)),
                     jax.tree.leaves((t, state))):
    if jnp.issubdtype(x.dtype, jnp.integer):
      assert int(x) == int(y)
      continue
    assert_close(np.asarray(y), np.asarray(x), np.asarray(p), "tx one pass",
                 2 if x.dtype == jnp.float32 else 1, stats, step_size=0.05)


def stochastic_rounding(backend, stats):
  """stochastic_rounding=True on bf16 (and float32) params: from the same state, the kernel's
  bf16 params equal the jnp oracle's *bitwise* -- the uint32 hash (bitcasts, wrapping multiplies,
  logical shifts) gives the same random bits from the same inputs, and the rounded value is
  exactly representable, so the store's rounding mode plays no part. (A float32 step differing in
  its last bit, the oracle's FMA contraction, would flip a rounding with probability 2^-16 per
  element; none does on this tree.) float32 params are not rounded stochastically, and state
  within ulps, as in compare_steps. Plain and checked (guarded) steps; the first step from zero
  state and one with nonzero state, which the hash reads too."""
  t = tree((jnp.bfloat16, jnp.float32))
  for name, kw, checked in (("GradientDescent", {}, False),
                            ("Momentum", {"nesterov": True, "weight_decay": 0.01}, False),
                            ("Adam", {"weight_decay": 0.1}, False), ("Adam", {}, True)):
    defs = {b: getattr(optim, name)(learning_rate=0.05, backend=b, stochastic_rounding=True,
                                    rounding_seed=7, **kw) for b in ("jnp", backend)}
    defs["rtn"] = getattr(optim, name)(learning_rate=0.05, backend="jnp", **kw)
    if checked:
      run = {b: jax.jit(lambda o, g, d=d: o.replace(optimizer_def=d).apply_gradient_checked(
          g, grad_scale=jnp.float32(0.5), clip_global_norm=20.0)[0]) for b, d in defs.items()}
    else:
      run = {b: jax.jit(lambda o, g, d=d: o.replace(optimizer_def=d).apply_gradient(g))
             for b, d in defs.items()}
    opt = defs["jnp"].create(t)
    for i in range(2):
      g = grads(t, 20 + i)
      with jax.default_device(_cpu()):
        a = run["jnp"](*jax.device_put((opt, g), _cpu()))
        rtn = run["rtn"](*jax.device_put((opt, g), _cpu()))
      assert any(not np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
                 for x, y in zip(jax.tree.leaves(a.target), jax.tree.leaves(rtn.target))
                 if x.dtype == jnp.bfloat16), (name, i)   # stochastic rounding is on
      b = run[backend](opt, g)
      for x, y, old in zip(jax.tree.leaves(a.target), jax.tree.leaves(b.target),
                           jax.tree.leaves(opt.target)):
        assert x.dtype == y.dtype == old.dtype
        if x.dtype == jnp.bfloat16:
          xb, yb = (np.asarray(v).view(np.uint16) for v in (x, y))
          stats.note(x.dtype, 0 if np.array_equal(xb, yb) else 99)
          assert np.array_equal(xb, yb), (name, i, int(np.sum(xb != yb)), xb.size)
        else:
          assert_close(x, y, old, (name, "sr", i), 2, stats, step_size=0.05)
      a_st, b_st, o_st = (host_leaves(o.state.param_states) for o in (a, b, opt))
      for k in a_st:
        for j, (x, y, old) in enumerate(zip(a_st[k], b_st[k], o_st[k])):
          g64 = np.abs(np.asarray(jax.tree.leaves(g)[j], np.float64))
          assert_close(x, y, old, (name, "sr", i, k, j), 2, stats,
                       step_size=g64 + g64 * g64 + 0.05)
      opt = a


CASES = {}
for _name, _kw in CONFIGS:
  CASES[config_id(_name, _kw, F32)] = (lambda b, st, n=_name, k=_kw: compare_steps(n, k, F32, b, st))
for _name, _kw in MIXED:
  CASES[config_id(_name, _kw, LOW)] = (lambda b, st, n=_name, k=_kw: compare_steps(n, k, LOW, b, st))
CASES["leaf-direct-launches"] = leaf_launches
CASES["sharded-zero1-fsdp"] = sharded
CASES["multi-optimizer-fused"] = multi_fused
CASES["optax-api-tx-adamw"] = optax_api
CASES["optax-api-complex-planes"] = complex_planes
CASES["optax-api-schedule-free"] = schedule_free
CASES["leaf-state-equals-flat-state"] = leaf_state
CASES["quantized-state-bitwise-vs-numpy"] = quantized_state
CASES["checked-update-and-skipped-step"] = checked_update
CASES["prepass-equals-xla"] = prepass
CASES["narrow-alignments-256-128"] = narrow_alignments
CASES["quantized-narrow-alignments"] = quantized_narrow_alignments
CASES["block-sizes-and-masking"] = block_sizes
CASES["vmap-and-grad"] = vmap_and_grad
CASES["bitwise-vs-numpy-float32"] = bitwise_vs_numpy
CASES["stochastic-rounding-bf16-bitwise"] = stochastic_rounding
# last: on a lent GPU (bench/gpu_run.sh, under a timeout) the cases before it come first
CASES["sharded-quantized"] = sharded_quantized


def run_all(backend):
  """{case: {"ok": bool, "error": str, "seconds": float, "worst_ulps": {...}}}."""
  out = {}
  for cid, fn in CASES.items():
    stats, t0 = Stats(), time.time()
    try:
      fn(backend, stats)
      out[cid] = {"ok": True}
    except Exception:  # pylint: disable=broad-except
      out[cid] = {"ok": False, "error": traceback.format_exc()[-3000:]}
    out[cid].update(seconds=round(time.time() - t0, 2), worst_ulps=stats.worst)
  return out


if __name__ == "__main__":
  assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
  assert kt.interpreting()
  print("RESULTS " + json.dumps(run_all("triton_interpret")), flush=True)
  sys.exit(0)
