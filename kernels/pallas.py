"""Pallas kernels for the flat buffers: one generic driver, every optimizer's ``Rule`` inside.

``flat_update`` runs a rule over one dtype group's flat buffers as a single ``pallas_call``:

    grid = (rows / block_rows,)      each program updates block_rows x ROW elements

The flat buffers are viewed as 2-D ``(rows, ROW)`` arrays — ``ROW = 1024`` on GPUs (one layout
alignment unit per row) and ``(8*rows, 128)`` on TPUs (one (8,128) VMEM tile per alignment unit).
Because every segment of the layout starts on a row boundary, a block never straddles two
tensors, so per-tensor scalars (LAMB/LARS trust ratios) enter as a per-row table.

No block is ragged: ``block_rows`` is the largest power of two dividing the row count (at most
the tuned value), and the layout pads every group to whole rows. That matters on the Triton
backend, where a plain BlockSpec does *not* mask a ragged last block (silently out of bounds on a
GPU; interpret mode hides it).

Step scalars (learning rate, betas, bias corrections, ...) are one small float32 vector read at
run time, so schedules and overrides never recompile. Params and state are updated in place
(``input_output_aliases``; donate them at the jit boundary to avoid a copy).

The math is ``rule.fn`` — the same function the jnp oracle and the per-leaf path call — traced
with ``jax.numpy`` inside the kernel body, in float32 whatever the storage dtype.
"""
import contextlib
import dataclasses
import functools
import types
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

F32 = jnp.float32
ALIGN = 1024          # elements per layout alignment unit (fusedopt.layout.DEFAULT_ALIGN)


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Per-platform launch parameters. ``block_rows`` alignment units per program."""
  block_rows: int
  num_warps: int = 4     # GPU only
  num_stages: int = 1    # GPU only


# Block size per (platform, storage itemsize of the params). GPU numbers: 4096 f32 elements per
# program with 4 warps = 32 elements (8 x 16-byte vectors) per thread per buffer; see
# bench/results for the sweep they come from. TPU: 8 tiles of (8,128) per program.
TUNING: Dict[Tuple[str, int], Tuning] = {
    ("gpu", 4): Tuning(block_rows=4, num_warps=4),
    ("gpu", 2): Tuning(block_rows=4, num_warps=4),
    ("tpu", 4): Tuning(block_rows=64),
    ("tpu", 2): Tuning(block_rows=64),
    ("interpret", 4): Tuning(block_rows=64),   # interpret mode costs grid steps x buffer size
    ("interpret", 2): Tuning(block_rows=64),
}


_TARGET = []   # platforms set by `targeting`, innermost last


@contextlib.contextmanager
def targeting(platform: str):
  """Trace kernels for ``platform`` ("gpu"/"tpu") whatever jax's default backend is: for
  ahead-of-time compiles to a compile-only topology from a CPU host."""
  _TARGET.append(platform)
  try:
    yield
  finally:
    _TARGET.pop()


def _platform(platform: Optional[str]) -> str:
  if platform is None:
    platform = _TARGET[-1] if _TARGET else jax.default_backend()
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  if platform == "tpu":
    return "tpu"
  if platform in ("interpret", "cpu"):
    return "interpret"
  raise ValueError(f"no Pallas kernels for platform {platform!r}")


def _largest_pow2_divisor(n: int, cap: int) -> int:
  r = 1
  while r * 2 <= cap and n % (r * 2) == 0:
    r *= 2
  return r


def _pad_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _kernel(rule, n_seg, n_state, writes_param, *refs):
  s_ref = refs[0]
  q_refs = refs[1:1 + n_seg]
  p_ref, g_ref = refs[1 + n_seg:3 + n_seg]
  st_refs = refs[3 + n_seg:3 + n_seg + n_state]
  outs = refs[3 + n_seg + n_state:]
  s = types.SimpleNamespace(**{k: s_ref[j] for j, k in enumerate(rule.scalars)})
  q = types.SimpleNamespace(**{k: r[...] for k, r in zip(rule.seg_scalars, q_refs)})
  new_p, new_state = rule.fn(jnp, s, q, p_ref[...].astype(F32), g_ref[...].astype(F32),
                             *(r[...].astype(F32) for r in st_refs))
  if writes_param:
    outs[0][...] = new_p.astype(outs[0].dtype)
    outs = outs[1:]
  for o, x in zip(outs, new_state):
    o[...] = x.astype(o.dtype)


def flat_update(rule, scalars, seg_rows, p, g, state, *, platform=None, tuning=None):
  """Runs ``rule`` over flat buffers in one ``pallas_call``.

  Args:
    rule: a ``fusedopt.elementwise.Rule``.
    scalars: name -> float32 scalar (traced values welcome), for ``rule.scalars``.
    seg_rows: name -> float32 [n // ALIGN], the per-segment scalar of each alignment unit.
    p, g: 1-D buffers of n elements, n a multiple of ALIGN (any float dtypes).
    state: tuple of ``rule.n_state`` 1-D buffers of n elements.
    platform: "gpu", "tpu" or "interpret" (CPU, for verification); default: jax's backend.
    tuning: a ``Tuning`` overriding the table.
  Returns:
    (new p or None if the rule does not write params, tuple of new state buffers); p and state are
    updated in place when donated.
  """
  plat = _platform(platform)
  n = p.shape[0]
  if n % ALIGN:
    raise ValueError(f"flat buffers must hold a multiple of {ALIGN} elements, got {n}")
  for x in (g,) + tuple(state):
    if x.shape != p.shape:
      raise ValueError(f"flat buffer of shape {x.shape} does not match params {p.shape}")
  if len(state) != rule.n_state:
    raise ValueError(f"rule {rule.name} takes {rule.n_state} state buffers, got {len(state)}")
  if n == 0:
    return (p if rule.writes_param else None), tuple(state)
  tuning = tuning or TUNING[(plat, min(np.dtype(p.dtype).itemsize, 4))]

  # GPU/interpret: (units, 1024); TPU: (8 * units, 128), so each unit is one (8,128) tile.
  width = 128 if plat == "tpu" else ALIGN
  rows = n // width
  per_unit = ALIGN // width
  block = _largest_pow2_divisor(n // ALIGN, tuning.block_rows) * per_unit

  s_vec = jnp.stack([jnp.asarray(scalars[k], F32) for k in rule.scalars]
                    + [jnp.zeros((), F32)] * (_pad_pow2(len(rule.scalars)) - len(rule.scalars)))
  q_cols = [jnp.repeat(jnp.asarray(seg_rows[k], F32), per_unit)[:, None] if per_unit > 1
            else jnp.asarray(seg_rows[k], F32)[:, None] for k in rule.seg_scalars]

  blk = pl.BlockSpec((block, width), lambda i: (i, 0))
  col = pl.BlockSpec((block, 1), lambda i: (i, 0))
  if plat == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
    s_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
    params = pltpu.CompilerParams(dimension_semantics=("parallel",))
  else:
    s_spec = pl.BlockSpec((s_vec.shape[0],), lambda i: (0,))
    params = None
    if plat == "gpu":
      from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
      params = plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages)

  n_seg = len(q_cols)
  ins = [s_vec, *q_cols, p.reshape(rows, width), g.reshape(rows, width),
         *(x.reshape(rows, width) for x in state)]
  first_state = 3 + n_seg
  out_shape, aliases = [], {}
  if rule.writes_param:
    aliases[1 + n_seg] = 0
    out_shape.append(jax.ShapeDtypeStruct((rows, width), p.dtype))
  for j, x in enumerate(state):
    aliases[first_state + j] = len(out_shape)
    out_shape.append(jax.ShapeDtypeStruct((rows, width), x.dtype))

  outs = pl.pallas_call(
      functools.partial(_kernel, rule, n_seg, len(state), rule.writes_param),
      out_shape=out_shape,
      grid=(rows // block,),
      in_specs=[s_spec] + [col] * n_seg + [blk] * (2 + len(state)),
      out_specs=[blk] * len(out_shape),
      input_output_aliases=aliases,
      compiler_params=params,
      interpret=plat == "interpret",
      name=f"fusedopt_{rule.name}",
  )(*ins)
  outs = [o.reshape(-1) for o in outs]
  new_p = outs.pop(0) if rule.writes_param else None
  return new_p, tuple(outs)


def bytes_per_element(rule, p_dtype=F32, g_dtype=F32, state_dtype=F32) -> int:
  """HBM traffic of one ``flat_update`` per parameter (the roofline model of the benchmark)."""
  isz = lambda d: np.dtype(d).itemsize  # noqa: E731
  reads = isz(p_dtype) + isz(g_dtype) + rule.n_state * isz(state_dtype)
  writes = (isz(p_dtype) if rule.writes_param else 0) + rule.n_state * isz(state_dtype)
  return reads + writes


# ----------------------------------------------------------------------------- group executor

def run(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state, *, platform=None):
  """The ``pallas`` backend's group executor (same contract as ``elementwise.run_jnp``)."""
  group = layout.groups[gi]
  if layout.align % ALIGN:
    raise ValueError(f"the pallas backend needs a layout aligned to a multiple of {ALIGN}")
  if group.size == 0:
    return ([p_leaves[i] for i in group.segments] if rule.writes_param else None), tuple(state)
  g_dtype = jnp.result_type(*[g_leaves[i] for i in group.segments])
  pf = layout.pack_group(p_leaves, gi)
  gf = layout.pack_group(g_leaves, gi, g_dtype)
  seg_rows = {}
  if rule.seg_scalars:
    ids = np.repeat(layout.block_segment_ids(gi), layout.align // ALIGN)
    seg_rows = {k: jnp.asarray(seg[k], F32)[ids] for k in rule.seg_scalars}
  new_p, new_state = flat_update(rule, scalars, seg_rows, pf, gf, tuple(state), platform=platform)
  if not rule.writes_param:
    return None, new_state
  out = []
  for i in group.segments:
    s = layout.segments[i]
    out.append(jax.lax.slice(new_p, (s.offset,), (s.offset + s.size,)).reshape(s.shape))
  return out, new_state


def run_interpret(*args):
  """``run`` in Pallas interpret mode (CPU): the kernels' numerics, slowly."""
  return run(*args, platform="interpret")


def available() -> bool:
  """Whether compiled (non-interpret) Pallas kernels can run on jax's default backend."""
  return _platform(None) in ("gpu", "tpu")


def supports(dtype) -> bool:
  return np.dtype(dtype) in (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


__all__ = ["flat_update", "targeting", "run", "run_interpret", "available", "supports", "TUNING", "Tuning",
           "bytes_per_element", "ALIGN"]
