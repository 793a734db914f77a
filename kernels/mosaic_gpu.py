"""Pallas kernels on Mosaic GPU (Hopper and newer): the flat-buffer driver of ``kernels/pallas.py``
for the GPU route jax keeps.

jax 0.11 deprecates Pallas' Triton backend ("please migrate to the Mosaic GPU backend"). This
module runs the same ``Rule``s over the same flat buffers with ``jax.experimental.pallas.
mosaic_gpu`` (docs/mosaic-gpu.md has what was found about it and how it is verified):

    view   (n / WIDTH, WIDTH), WIDTH = 256   a TMA copy moves at most 256 elements a dimension
    block  (k * UNIT_ROWS, WIDTH): k 1024-element layout units (``common.ALIGN``); k = 1 for a
           rule with per-unit tables or sums, else ``MosaicTuning.step_units`` (tuned)
    grid   (units / steps,) CTAs of one warpgroup; each pipelines ``steps`` blocks through
           shared memory (``plgpu.emit_pipeline``, ``Tuning.num_stages`` of them in flight);
           ``steps`` the largest power of two dividing the units, at most ``Tuning.block`` / ALIGN

A block of one alignment unit never straddles two tensors: a per-unit table (LAMB/LARS
trust ratios, per-segment scalars) is one scalar per block read from global memory, and a
per-unit sum of squares (``rule.sumsq``) one scalar per block written to it. The step's scalars
are one float32 vector, an operand copied with each pipeline step (128 bytes), so schedules
never recompile.

Params and state are refs the kernel updates in place (``pl.run_state``): Pallas aliases them in
and out of the custom call, as ``input_output_aliases`` does for ``pallas_call``.

Arithmetic: Mosaic GPU lowers ``/`` to ``div.full.f32`` (2 ulp), has no ``sqrt`` lowering, and
LLVM contracts a*b+c into fma. As on the Triton route (``pallas._gpu_precise_ops``), the rule's
float32 div, sqrt, mul, add and sub become correctly rounded PTX (``div.rn.f32``,
``sqrt.rn.f32``, ``mul.rn.f32``, ...) through ``plgpu.inline_mgpu``, so a GPU step reproduces the
jnp oracle's float32 arithmetic.
"""
import dataclasses
import functools
import inspect
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fusedopt import elementwise
from fusedopt.kernels import common, pallas as kp

F32 = jnp.float32
ALIGN = common.ALIGN
WIDTH = 256
UNIT_ROWS = ALIGN // WIDTH
SCALARS_PAD = 32        # a TMA copy moves a multiple of 128 bytes: the scalars as f32[32k]
# the pipeline buffers' shared memory at most (an H100 gives a CTA 227 KiB; Adam f32 in steps of
# 4 units at 2 stages, 224 KiB, compiles: tests/test_mosaic_gpu_lowering.py)
SMEM_BUDGET = 224 * 1024
supports = common.supports

@dataclasses.dataclass(frozen=True)
class MosaicTuning(common.Tuning):
  """``block``: the elements one CTA (one warpgroup: ``num_warps`` is always 4) pipelines, in
  steps of ``step_units`` 1024-element units (one for a rule with per-unit tables or sums),
  ``num_stages`` steps in flight per buffer."""
  step_units: int = 1


# Not tuned on a GPU yet (issue 20; `python -m bench.kernels --sweep` sweeps all three): 16
# units per CTA, steps of one unit, 2 stages: 4 KiB per f32 buffer and stage.
DEFAULT_TUNING: Dict[Tuple[str, int], MosaicTuning] = {
    ("gpu", 4): MosaicTuning(block=16 * ALIGN, num_warps=4, num_stages=2),
    ("gpu", 2): MosaicTuning(block=16 * ALIGN, num_warps=4, num_stages=2),
}


def default_tuning(rule, p_dtype) -> MosaicTuning:
  return DEFAULT_TUNING[("gpu", min(jnp.dtype(p_dtype).itemsize, 4))]


def _layout(shape):
  """The register layout of every block value: two consecutive elements per thread (Mosaic's
  own choice for a float32 load; bf16/f16 loads are given it too, so that values of every storage
  dtype combine, and the inline PTX below sees one layout)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  return plgpu.Layout.WG_STRIDED(shape, vec_size=2)


def _load(ref, layout):
  """``ref``'s whole block in ``layout`` (``plgpu.load`` took an index before jax 0.12)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  if "idx" in inspect.signature(plgpu.load).parameters:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def _precise_ops(shape):
  """float32 div/sqrt/mul/add/sub as correctly rounded PTX over ``shape`` blocks (scalar
  operands broadcast): Mosaic's own lowering contracts and approximates them."""
  from jax.experimental.mosaic import gpu as mgpu  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  layout = _layout(shape)

  def ptx(instr):
    def op(*xs):
      xs = [plgpu.layout_cast(jnp.broadcast_to(x, shape), layout) if jnp.ndim(x) == 0 else x
            for x in xs]

      @plgpu.inline_mgpu(arg_types=(layout,) * len(xs),
                         return_type=plgpu.ShapeDtypeStruct(shape, F32, layout=layout))
      def run(_, *arrays):
        # pylint: disable-next=protected-access
        return arrays[0]._pointwise(mgpu.FragmentedArray._lift_fast_instr(instr), *arrays[1:])
      return run(*xs)
    return op
  return {prim: ptx(instr) for prim, instr in kp.PRECISE_PTX.items()}


def _update_block(rule, ops, load, s_ref, q_gmem, sum_gmem, unit, p_ref, g_ref, st_refs, p_out,
                  st_outs):
  """The rule over one block (shared-memory refs), its per-unit tables read and sums written at
  ``unit`` in global memory: what both drivers below run."""
  s, q, p, g = kp._rule_inputs(  # pylint: disable=protected-access
      rule, s_ref, {k: r[unit] for k, r in zip(rule.seg_scalars, q_gmem)}, p_ref, g_ref, load)
  new_p, new_state = kp._call_rule(  # pylint: disable=protected-access
      rule.fn, s, q, p, g, tuple(load(r) for r in st_refs), ops)
  if p_out is not None:
    p_out[...] = new_p.astype(p_out.dtype)
  for o, x in zip(st_outs, new_state):
    o[...] = x.astype(o.dtype)
  if sum_gmem:
    terms = kp._call_rule(rule.sumsq, s, q, p, g, tuple(new_state), ops)  # pylint: disable=protected-access
    for o, t in zip(sum_gmem, terms):
      o[unit] = jnp.sum(t * t)


def _block_index(steps, i):
  """The block step ``i`` of this CTA updates: CTAs take ``steps`` consecutive blocks."""
  return lax.axis_index("cta") * steps + i


def _split_refs(rule, n_seg, refs, outputs):
  """(scalars, tables, g, p, state, the p and state outputs, sums) of a kernel's refs: inputs
  [scalars, seg tables..., (g), p, state...]; then either (``outputs``) [(p), state...] as
  outputs of their own, or p and state written in place with only an out-of-place p
  following; then the per-unit sums."""
  refs = list(refs)
  take = lambda k: [refs.pop(0) for _ in range(k)]  # noqa: E731
  (s_gmem,), q_gmem = take(1), take(n_seg)
  g_gmem = take(1)[0] if rule.reads_grad else None
  (p_gmem,), st_gmem = take(1), take(rule.n_state)
  if outputs:
    p_out = take(1)[0] if rule.writes_param else None
    st_out = take(rule.n_state) if rule.writes_state else []
  else:
    p_out = None
    if rule.writes_param:
      p_out = take(1)[0] if not rule.param_in_place else p_gmem
    st_out = st_gmem if rule.writes_state else []
  return s_gmem, q_gmem, g_gmem, p_gmem, st_gmem, p_out, st_out, refs


def _kernel(rule, steps, step_units, stages, n_seg, *refs):
  """One CTA on a GPU: ``steps`` blocks through ``plgpu.emit_pipeline``, p and state in place
  (``_split_refs``), float arithmetic as correctly rounded PTX."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  s_gmem, q_gmem, g_gmem, p_gmem, st_gmem, p_out_gmem, st_out_gmem, sum_gmem = _split_refs(
      rule, n_seg, refs, outputs=False)
  shape = (step_units * UNIT_ROWS, WIDTH)
  layout, ops = _layout(shape), _precise_ops(shape)

  def block(idx, s_ref, *io):
    io = list(io)
    p_ref = io.pop(0)
    g_ref = io.pop(0) if rule.reads_grad else None
    st_refs = [io.pop(0) for _ in range(rule.n_state)]
    p_out = io.pop(0) if rule.writes_param else None
    _update_block(rule, ops, lambda r: _load(r, layout).astype(F32), s_ref, q_gmem, sum_gmem,
                  _block_index(steps, idx[0]), p_ref, g_ref, st_refs, p_out, io)

  blk = pl.BlockSpec(shape, lambda i: (_block_index(steps, i), 0))
  ins = [p_gmem] + ([g_gmem] if rule.reads_grad else []) + st_gmem
  outs = ([p_out_gmem] if rule.writes_param else []) + st_out_gmem
  plgpu.emit_pipeline(
      block, grid=(steps,),
      in_specs=[pl.BlockSpec((s_gmem.shape[0],), lambda i: (0,))] + [blk] * len(ins),
      out_specs=[blk] * len(outs), max_concurrent_steps=stages)(s_gmem, *ins, *outs)


def _interpret_kernel(rule, steps, step_units, n_seg, *refs):
  """One CTA in Mosaic GPU's interpreter (CPU): the same blocks, grid and ``_update_block`` as
  ``_kernel``, through explicit copies instead of ``emit_pipeline`` (whose predicated copies
  the interpreter rejects), one block at a time, jax's float operations (no inline PTX), p and
  state written to outputs of their own (the interpreter rejects aliased refs)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  s_gmem, q_gmem, g_gmem, p_gmem, st_gmem, p_out_gmem, st_out_gmem, sum_gmem = _split_refs(
      rule, n_seg, refs, outputs=True)
  rows = step_units * UNIT_ROWS
  ins = [p_gmem] + ([g_gmem] if rule.reads_grad else []) + st_gmem
  outs = ([p_out_gmem] if rule.writes_param else []) + st_out_gmem

  def run(s_s, in_s, out_s, bar):
    plgpu.copy_gmem_to_smem(s_gmem, s_s, bar.at[0])
    plgpu.barrier_wait(bar.at[0])

    def one(i, carry):
      b = _block_index(steps, i)
      for k, (src, dst) in enumerate(zip(ins, in_s)):
        plgpu.copy_gmem_to_smem(src.at[pl.ds(b * rows, rows)], dst, bar.at[1 + k])
      for k in range(len(ins)):
        plgpu.barrier_wait(bar.at[1 + k])
      plgpu.wait_smem_to_gmem(0)   # the last block's outputs have left out_s
      it = iter(in_s)
      p_ref = next(it)
      g_ref = next(it) if rule.reads_grad else None
      o = list(out_s)
      p_out = o.pop(0) if rule.writes_param else None
      _update_block(rule, None, lambda r: r[...].astype(F32), s_s, q_gmem, sum_gmem, b, p_ref,
                    g_ref, list(it), p_out, o)
      plgpu.commit_smem()
      for src, dst in zip(out_s, outs):
        plgpu.copy_smem_to_gmem(src, dst.at[pl.ds(b * rows, rows)])
      return carry
    lax.fori_loop(0, steps, one, 0)
    plgpu.wait_smem_to_gmem(0)

  smem = lambda r: plgpu.SMEM((rows, WIDTH), r.dtype)  # noqa: E731
  pl.run_scoped(lambda s_s, in_s, out_s, bar: run(s_s, in_s, out_s, bar),
                plgpu.SMEM(s_gmem.shape, F32), [smem(r) for r in ins], [smem(r) for r in outs],
                plgpu.Barrier(num_arrivals=1, num_barriers=1 + len(ins)))


def _interpret_update(rule, steps, step_units, fixed, p, state, units, mesh, params):
  """``flat_update`` through ``_interpret_kernel``: every output a fresh buffer."""
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=import-outside-toplevel
  n = p.shape[0]
  view = lambda x: x.reshape(n // WIDTH, WIDTH)  # noqa: E731
  out_type = ([jax.ShapeDtypeStruct((n // WIDTH, WIDTH), p.dtype)] if rule.writes_param else [])
  out_type += ([jax.ShapeDtypeStruct((n // WIDTH, WIDTH), x.dtype) for x in state]
               if rule.writes_state else [])
  out_type += [jax.ShapeDtypeStruct((units,), F32)] * elementwise.num_sumsq_terms(rule)
  outs = list(pl.kernel(
      functools.partial(_interpret_kernel, rule, steps, step_units, len(rule.seg_scalars)),
      out_type=tuple(out_type), mesh=mesh, compiler_params=params,
      interpret=InterpretGPUParams(), name=f"fusedopt_{rule.name}")(
          *fixed, view(p), *[view(x) for x in state]))
  new_p = outs.pop(0).reshape(-1) if rule.writes_param else None
  new_state = (tuple(outs.pop(0).reshape(-1) for _ in state) if rule.writes_state
               else tuple(state))
  return new_p, new_state, (tuple(outs) if rule.sumsq is not None else None)


def _block_bytes_per_unit(rule, p_dtype, g, state) -> int:
  """Shared memory of one unit's blocks in one pipeline stage: p (in, and out where written),
  g, each state buffer (in, and out where written)."""
  item = lambda d: jnp.dtype(d).itemsize  # noqa: E731
  total = item(p_dtype) * (1 + int(rule.writes_param))
  total += item(g.dtype) if rule.reads_grad else 0
  total += sum(item(x.dtype) * (1 + int(rule.writes_state)) for x in state)
  return total * ALIGN


def _scalar_vector(rule, scalars):
  """The step's scalars as one float32 vector of a multiple of ``SCALARS_PAD`` elements."""
  k = len(rule.scalars)
  pad = -k % SCALARS_PAD or (SCALARS_PAD if k == 0 else 0)
  return jnp.stack([jnp.asarray(scalars[name], F32) for name in rule.scalars]
                   + [jnp.zeros((), F32)] * pad)


def flat_update(rule, scalars, seg_rows, p, g, state, *, tuning: Optional[MosaicTuning] = None,
                platform: Optional[str] = None):
  """``kernels.pallas.flat_update`` on Mosaic GPU: runs ``rule`` over flat buffers of whole
  ``ALIGN``-element units in one kernel (same arguments and results; ``seg_rows`` and the sums
  are per unit). p and state are updated in place when donated. ``platform="interpret"``:
  Mosaic GPU's interpreter on a CPU (``_interpret_kernel``; for verification, slow)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  common.check_flat_buffers(rule, p, g, state, ALIGN)
  n = p.shape[0]
  units = n // ALIGN
  n_sums = elementwise.num_sumsq_terms(rule)
  if n == 0:
    return ((p if rule.writes_param else None), tuple(state),
            tuple(jnp.zeros((0,), F32) for _ in range(n_sums)) if rule.sumsq else None)
  tuning = tuning or default_tuning(rule, p.dtype)
  # pylint: disable=protected-access
  per_unit = bool(rule.seg_scalars) or rule.sumsq is not None
  step_units = 1 if per_unit else kp._largest_pow2_divisor(
      units, max(1, getattr(tuning, "step_units", 1)))
  # the pipeline's shared memory: every block buffer, each stage; a rule with more buffers (Adan:
  # 11) than the tuned one (Adam: 7) gets smaller steps
  unit_bytes = _block_bytes_per_unit(rule, p.dtype, g, state) * tuning.num_stages
  while step_units > 1 and step_units * unit_bytes > SMEM_BUDGET:
    step_units //= 2
  blocks = units // step_units
  steps = kp._largest_pow2_divisor(blocks, max(1, tuning.block // (ALIGN * step_units)))
  # pylint: enable=protected-access
  view = lambda x: x.reshape(n // WIDTH, WIDTH)  # noqa: E731

  fixed = ([_scalar_vector(rule, scalars)]
           + [jnp.asarray(seg_rows[k], F32) for k in rule.seg_scalars]
           + ([view(g)] if rule.reads_grad else []))
  mesh = plgpu.Mesh(grid=(blocks // steps,), grid_names=("cta",))
  # Lane semantics (jax 0.10's default, 0.12's is Warpgroup): explicit layouts, the inline PTX
  # above, and implicit broadcasts of scalars (a checked step's `ok`) lower in it
  params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)
  if platform == "interpret":
    return _interpret_update(rule, steps, step_units, fixed, p, state, units, mesh, params)
  aliased_p = rule.writes_param and rule.param_in_place
  # What the kernel writes is a ref (Mosaic GPU's in-place outputs), inside ``run_state`` so that
  # no ref escapes into the caller's jaxpr (the kernel backends run under ``custom_jvp``). An
  # out-of-place param output starts as zeros: a write pass, where a copy of p would add a read.
  inits = (([view(p)] if aliased_p else [])
           + ([view(x) for x in state] if rule.writes_state else [])
           + ([jnp.zeros((n // WIDTH, WIDTH), p.dtype)]
              if rule.writes_param and not rule.param_in_place else [])
           + [jnp.zeros((units,), F32)] * n_sums)
  kernel = pl.kernel(
      functools.partial(_kernel, rule, steps, step_units, tuning.num_stages,
                        len(rule.seg_scalars)),
      out_type=(), mesh=mesh, compiler_params=params, name=f"fusedopt_{rule.name}")

  def run(refs):
    refs = list(refs)
    p_arg = refs.pop(0) if aliased_p else view(p)
    st_args = ([refs.pop(0) for _ in state] if rule.writes_state else [view(x) for x in state])
    kernel(*fixed, p_arg, *st_args, *refs)   # refs left: an out-of-place p, the sums
  final = list(pl.run_state(run)(tuple(inits)))
  new_p = final.pop(0).reshape(-1) if aliased_p else None
  new_state = (tuple(final.pop(0).reshape(-1) for _ in state) if rule.writes_state
               else tuple(state))
  if rule.writes_param and not rule.param_in_place:
    new_p = final.pop(0).reshape(-1)
  sums = tuple(final) if rule.sumsq is not None else None
  return new_p, new_state, sums


# ----------------------------------------------------------------------------- the backend

MIN_COMPUTE_CAPABILITY = 90   # Mosaic GPU: Hopper and newer (sm_80 fails in ptxas: bulk copies)


def _unavailable():
  """Why ``backend="mosaic_gpu"`` cannot run here, or None: it needs an NVIDIA GPU of compute
  capability 9.0 or newer (or ``common.targeting("gpu", cc)`` for ahead-of-time compiles)."""
  plat = common.targeted() or jax.default_backend()
  if plat not in ("gpu", "cuda"):
    return (f"backend='mosaic_gpu' needs an NVIDIA GPU (Hopper or newer); jax's default backend "
            f"is {plat!r}. Use 'pallas_interpret' to check the Pallas kernels' numerics on a CPU, "
            "or 'auto'")
  if common.targeted():
    cc = common.compute_capability()   # None: no particular GPU asked for
  else:
    raw = getattr(jax.devices()[0], "compute_capability", None)
    try:
      cc = round(float(raw) * 10)
    except (TypeError, ValueError):
      return (f"backend='mosaic_gpu' needs an NVIDIA GPU of compute capability 9.0 or newer; "
              f"this device reports {raw!r}: use backend='pallas' or 'auto'")
  if cc is not None and cc < MIN_COMPUTE_CAPABILITY:
    return (f"backend='mosaic_gpu' needs compute capability 9.0 or newer (Hopper); this GPU has "
            f"{cc / 10:.1f}: use backend='pallas' or 'triton'")
  return None


_UPDATE = common.at_unit(flat_update, ALIGN)
# sequential_vmap: ``pl.run_state`` has no batching rule, so under jax.vmap the kernel runs once
# per batch element (as jax-triton's calls do)
BACKENDS = {"mosaic_gpu": common.Backend("mosaic_gpu", common.packed_run_group(_UPDATE),
                                         _UPDATE, unit=ALIGN, supports=supports,
                                         unavailable=_unavailable, sequential_vmap=True)}

__all__ = ["flat_update", "default_tuning", "DEFAULT_TUNING", "ALIGN", "WIDTH", "BACKENDS"]
