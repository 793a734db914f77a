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
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from fusedopt import elementwise
from fusedopt.kernels import common, pallas as kp, symbolic

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

  def ptx(prim, instr):
    def op(*xs):
      if all(jnp.ndim(x) == 0 for x in xs):   # scalars (a row's absmax): one LLVM instruction,
        return prim.bind(*xs)                 # IEEE-rounded (M2 finds no div.full or .approx)
      # (a broadcast scalar is a splat: it takes the block's layout too)
      xs = [plgpu.layout_cast(jnp.broadcast_to(x, shape), layout) for x in xs]

      @plgpu.inline_mgpu(arg_types=(layout,) * len(xs),
                         return_type=plgpu.ShapeDtypeStruct(shape, F32, layout=layout))
      def run(_, *arrays):
        # pylint: disable-next=protected-access
        return arrays[0]._pointwise(mgpu.FragmentedArray._lift_fast_instr(instr), *arrays[1:])
      return run(*xs)
    return op
  return {prim: ptx(prim, instr) for prim, instr in kp.PRECISE_PTX.items()}


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


def _run_pipeline(steps, stages, rows, s_gmem, ins, outs, update):
  """On a GPU: this CTA's ``steps`` blocks of ``(rows, WIDTH)`` of every buffer in ``ins`` and
  ``outs`` through shared memory (``plgpu.emit_pipeline``, ``stages`` steps in flight), the
  scalars' vector with each; ``update(b, s_ref, in_blocks, out_blocks)`` computes block ``b``."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel

  def body(idx, s_ref, *io):
    update(_block_index(steps, idx[0]), s_ref, list(io[:len(ins)]), list(io[len(ins):]))
  blk = pl.BlockSpec((rows, WIDTH), lambda i: (_block_index(steps, i), 0))
  plgpu.emit_pipeline(
      body, grid=(steps,),
      in_specs=[pl.BlockSpec((s_gmem.shape[0],), lambda i: (0,))] + [blk] * len(ins),
      out_specs=[blk] * len(outs), max_concurrent_steps=stages)(s_gmem, *ins, *outs)


def _run_copies(steps, stages, rows, s_gmem, ins, outs, update):
  """``_run_pipeline`` in Mosaic GPU's interpreter (CPU): the same blocks through explicit
  copies, one block at a time (the interpreter rejects ``emit_pipeline``'s predicated copies);
  ``outs`` are outputs of their own (it rejects refs aliased in and out)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  del stages

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
      update(b, s_s, list(in_s), list(out_s))
      plgpu.commit_smem()
      for src, dst in zip(out_s, outs):
        plgpu.copy_smem_to_gmem(src, dst.at[pl.ds(b * rows, rows)])
      return carry
    lax.fori_loop(0, steps, one, 0)
    plgpu.wait_smem_to_gmem(0)

  smem = lambda r: plgpu.SMEM((rows, WIDTH), r.dtype)  # noqa: E731
  pl.run_scoped(run, plgpu.SMEM(s_gmem.shape, F32), [smem(r) for r in ins],
                [smem(r) for r in outs], plgpu.Barrier(num_arrivals=1, num_barriers=1 + len(ins)))


def _kernel(rule, steps, step_units, stages, n_seg, interpret, *refs):
  """One CTA: ``steps`` blocks of ``step_units`` units, each ``_update_block``. On a GPU through
  ``_run_pipeline``, p and state in place (``_split_refs``), float arithmetic as correctly
  rounded PTX; in the interpreter (``interpret``) through ``_run_copies``, jax's float
  operations, p and state written to outputs of their own."""
  s_gmem, q_gmem, g_gmem, p_gmem, st_gmem, p_out_gmem, st_out_gmem, sum_gmem = _split_refs(
      rule, n_seg, refs, outputs=interpret)
  shape = (step_units * UNIT_ROWS, WIDTH)
  if interpret:
    ops, load = None, lambda r: r[...].astype(F32)
  else:
    layout, ops = _layout(shape), _precise_ops(shape)
    load = lambda r: _load(r, layout).astype(F32)  # noqa: E731

  def update(b, s_ref, ins, outs):
    p_ref = ins.pop(0)
    g_ref = ins.pop(0) if rule.reads_grad else None
    p_out = outs.pop(0) if rule.writes_param else None
    _update_block(rule, ops, load, s_ref, q_gmem, sum_gmem, b, p_ref, g_ref, ins, p_out, outs)
  ins = [p_gmem] + ([g_gmem] if rule.reads_grad else []) + st_gmem
  outs = ([p_out_gmem] if rule.writes_param else []) + st_out_gmem
  (_run_copies if interpret else _run_pipeline)(steps, stages, shape[0], s_gmem, ins, outs, update)


def _run_kernel(kernel, name, ctas, rule, fixed, p, bufs, written, sums, platform):
  """``kernel(interpret, *fixed, p, *bufs, *outputs)`` (a ``pl.kernel`` body) on ``ctas`` CTAs.

  On a GPU, p (where the rule writes it in place) and ``bufs`` (where it writes state) are refs
  the kernel updates in place, inside ``pl.run_state`` so that no ref escapes into the caller's
  jaxpr (the kernel backends run under ``custom_jvp``): Pallas aliases them in and out of the
  custom call. An out-of-place p and the ``sums`` (shapes) are refs too, from zeros: a write
  pass, where a copy of p would add a read. In the interpreter (``platform="interpret"``) p,
  the buffers ``written`` (indices into ``bufs``) and the sums are outputs of their own.
  Returns (new p or None, {index in bufs: its new buffer} for ``written``, the sums)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  mesh = plgpu.Mesh(grid=(ctas,), grid_names=("cta",))
  # Lane semantics (jax 0.10's default, 0.12's is Warpgroup): explicit layouts, the inline PTX
  # above, and implicit broadcasts of scalars (a checked step's `ok`) lower in it
  params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)
  sums = [jax.ShapeDtypeStruct(shape, F32) for shape in sums]
  if platform == "interpret":
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=import-outside-toplevel
    out_type = ([jax.ShapeDtypeStruct(p.shape, p.dtype)] if rule.writes_param else [])
    out_type += [jax.ShapeDtypeStruct(bufs[k].shape, bufs[k].dtype) for k in written] + sums
    outs = list(pl.kernel(functools.partial(kernel, True), out_type=tuple(out_type), mesh=mesh,
                          compiler_params=params, interpret=InterpretGPUParams(),
                          name=name)(*fixed, p, *bufs))
    new_p = outs.pop(0) if rule.writes_param else None
    return new_p, {k: outs.pop(0) for k in written}, outs
  aliased_p = rule.writes_param and rule.param_in_place
  inits = (([p] if aliased_p else []) + (list(bufs) if rule.writes_state else [])
           + ([jnp.zeros(p.shape, p.dtype)] if rule.writes_param and not aliased_p else [])
           + [jnp.zeros(s.shape, F32) for s in sums])
  call = pl.kernel(functools.partial(kernel, False), out_type=(), mesh=mesh,
                   compiler_params=params, name=name)

  def run(refs):
    refs = list(refs)
    p_arg = refs.pop(0) if aliased_p else p
    buf_args = [refs.pop(0) for _ in bufs] if rule.writes_state else list(bufs)
    call(*fixed, p_arg, *buf_args, *refs)   # refs left: an out-of-place p, the sums
  final = list(pl.run_state(run)(tuple(inits)))
  new_p = final.pop(0) if aliased_p else None
  new_bufs = [final.pop(0) for _ in bufs] if rule.writes_state else []
  if rule.writes_param and not aliased_p:
    new_p = final.pop(0)
  return new_p, {k: new_bufs[k] for k in written}, final


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
  Mosaic GPU's interpreter on a CPU (``_kernel``'s copies; for verification, slow)."""
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
  written = list(range(len(state))) if rule.writes_state else []
  new_p, new_bufs, sums = _run_kernel(
      functools.partial(_kernel, rule, steps, step_units, tuning.num_stages,
                        len(rule.seg_scalars)),
      f"fusedopt_{rule.name}", blocks // steps, rule, fixed, view(p),
      [view(x) for x in state], written, [(units,)] * n_sums, platform)
  new_state = tuple(new_bufs[k].reshape(-1) if k in new_bufs else x
                    for k, x in enumerate(state))
  return (None if new_p is None else new_p.reshape(-1), new_state,
          tuple(sums) if rule.sumsq is not None else None)


# ----------------------------------------------------------------------------- quantized state

# A row of the (n / WIDTH, WIDTH) view is one block of quantization.BLOCK elements: its scale and
# per-row table entry are scalars in global memory, its absmax a whole-array reduction.
assert WIDTH == kp.QROW


def _row_layout():
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  return plgpu.Layout.WG_STRIDED((WIDTH,), vec_size=2)


def _gather(table, idx, dtype):
  """``table[idx]`` for an int32 row ``idx``: one shared-memory load per element at a computed
  address (Mosaic GPU has no gather; ``table`` is a row-major shared-memory ref, read flat)."""
  # pylint: disable=import-outside-toplevel
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import llvm, vector
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils
  from jax.experimental.pallas import mosaic_gpu as plgpu
  layout = _row_layout()

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), layout),
                     return_type=plgpu.ShapeDtypeStruct((WIDTH,), dtype, layout=layout))
  def run(_, ref, ix):
    elt = ir.F32Type.get() if dtype == F32 else ir.IntegerType.get_signless(32)
    base = utils.memref_ptr(ref)

    def one(reg):
      n = ir.VectorType(reg.type).shape[0]
      vals = [llvm.load(elt, utils.getelementptr(
          base, [vector.extract(reg, dynamic_position=[], static_position=[j])], elt))
              for j in range(n)]
      return vector.from_elements(ir.VectorType.get((n,), elt), vals)
    return mgpu.FragmentedArray(_registers=np.vectorize(one, otypes=[object])(ix.registers),
                                _layout=ix.layout, _is_signed=None if dtype == F32 else True)
  return run(table, idx)


def _table_inputs():
  """The int8 tables as ``pallas._Gather`` reads them, as rows of WIDTH for copies to shared
  memory (a TMA copy moves at most 256 elements a dimension; 51 KB), read flat."""
  return kp._Gather.inputs(WIDTH)   # pylint: disable=protected-access


def _shared_tables(maps, bkt):
  """The int8 lookups from shared-memory copies of the tables (each CTA copies them in once):
  ``pallas._Gather``'s decode (a map read) and encode (one bucket read), each read
  ``_gather``'s per-element loads."""
  return kp._Gather(maps, bkt, _gather)   # pylint: disable=protected-access


def _value_tables(maps, bkt):
  """``_shared_tables`` in Mosaic GPU's interpreter (CPU), which runs no inline code: gathers
  from the tables' values."""
  return kp._Gather(maps[...].reshape(-1), bkt[...].reshape(-1))   # pylint: disable=protected-access


def _whole(op, x):
  """A block's reduction in the quantized kernel: the whole row (one quantization block)."""
  return getattr(jnp, op)(x)


@dataclasses.dataclass
class _QRefs:
  """A quantized kernel's refs by role: global memory (``gmem``) for the scalars' vector,
  tables, per-row seg tables, scales in and out and sums; the fields' data (codes or float
  buffer), p and g in and out as the pipeline's or the interpreter's blocks."""
  s: object
  tables: list
  q: list
  g: object
  p: object
  data: list
  scales: list          # per field: its scales (None for a float field)
  p_out: object
  data_out: dict        # field index -> its written data
  scales_out: dict      # field index -> its written scales
  sums: list


def _written(rule, n_fields):
  """The state fields a quantized kernel writes: all but those the rule passes through (none
  where it writes no state)."""
  passed = symbolic.passed_through(rule)
  return [k for k in range(n_fields) if rule.writes_state and not passed[k]]


def _split_quantized(rule, fmts, n_seg, n_tables, refs, outputs):
  """``_QRefs`` of a quantized kernel's refs: inputs [scalars, tables, seg tables..., (g), p,
  per field: codes and scales or the buffer]; then either (``outputs``, the interpreter) an
  output per written buffer [(p), per written field: data (and scales)], or p and the written
  fields in place, only an out-of-place p following; then the per-row sums."""
  refs = list(refs)
  take = lambda k: [refs.pop(0) for _ in range(k)]  # noqa: E731
  (s,), tables, q = take(1), take(n_tables), take(n_seg)
  g = take(1)[0] if rule.reads_grad else None
  (p,) = take(1)
  fields = [take(2) if f else take(1) for f in fmts]
  written = _written(rule, len(fmts))
  if outputs:
    p_out = take(1)[0] if rule.writes_param else None
    data_out, scales_out = {}, {}
    for k in written:
      data_out[k] = take(1)[0]
      if fmts[k]:
        scales_out[k] = take(1)[0]
  else:
    p_out = (p if rule.param_in_place else take(1)[0]) if rule.writes_param else None
    data_out = {k: fields[k][0] for k in written}
    scales_out = {k: fields[k][1] for k in written if fmts[k]}
  return _QRefs(s, tables, q, g, p, [fl[0] for fl in fields],
                [fl[1] if f else None for fl, f in zip(fields, fmts)], p_out, data_out,
                scales_out, refs)


def _quantized_rows(rule, fmts, r, lookup, ops, load, unit, s_ref, p_ref, g_ref, data, p_out,
                    data_out):
  """One unit's four rows, each one ``pallas.quantized_block``: blocks (p_ref, g_ref, data,
  p_out, data_out: shared-memory refs of (UNIT_ROWS, WIDTH)) and the scalars in global memory
  (``r``: ``_QRefs``)."""
  for i in range(UNIT_ROWS):
    row = unit * UNIT_ROWS + i
    loaded = [(load(d.at[i]).astype(jnp.int32), sc[row]) if f else (load(d.at[i]),)
              for d, sc, f in zip(data, r.scales, fmts)]
    s, q, p, g = kp._rule_inputs(  # pylint: disable=protected-access
        rule, s_ref, {k: t[row] for k, t in zip(rule.seg_scalars, r.q)}, load(p_ref.at[i]),
        None if g_ref is None else load(g_ref.at[i]), load=lambda x: x.astype(F32))
    new_p, outs, sums = kp.quantized_block(rule, fmts, s, q, p, g, loaded, ops, lookup, _whole)
    if p_out is not None:
      p_out[i] = new_p.astype(p_out.dtype)
    for k, o in data_out.items():
      o[i] = outs[k][0].astype(o.dtype)
      if k in r.scales_out:
        r.scales_out[k][row] = outs[k][1]
    for o, t in zip(r.sums, sums or ()):
      o[row] = t


def _quantized_kernel(rule, fmts, steps, stages, n_seg, n_tables, interpret, *refs):
  """One CTA: ``steps`` one-unit blocks (4 rows), each row one ``pallas.quantized_block``
  (decode, rule, absmax, encode); scales and per-row tables and sums are scalars in global
  memory. On a GPU through ``_run_pipeline``: p (in place) and the fields the rule writes
  updated in place, float arithmetic as correctly rounded PTX, the int8 tables copied to shared
  memory first (``_shared_tables``). In the interpreter (``interpret``) through ``_run_copies``:
  jax's float operations and gathers (``_value_tables``), every written buffer an output of
  its own."""
  r = _split_quantized(rule, fmts, n_seg, n_tables, refs, outputs=interpret)
  if interpret:
    ops, load, tables = None, lambda ref: ref[...], _value_tables
  else:
    layout, ops, tables = _row_layout(), _precise_ops((WIDTH,)), _shared_tables
    load = lambda ref: _load(ref, layout)  # noqa: E731
  ins = [r.p] + ([r.g] if rule.reads_grad else []) + r.data
  outs = ([r.p_out] if rule.writes_param else []) + list(r.data_out.values())

  def run(tabs):
    lookup = tables(*tabs) if tabs else None

    def update(b, s_ref, ins, outs):
      p_ref = ins.pop(0)
      g_ref = ins.pop(0) if rule.reads_grad else None
      p_out = outs.pop(0) if rule.writes_param else None
      _quantized_rows(rule, fmts, r, lookup, ops, load, b, s_ref, p_ref, g_ref, ins, p_out,
                      dict(zip(r.data_out, outs)))
    (_run_copies if interpret else _run_pipeline)(steps, stages, UNIT_ROWS, r.s, ins, outs,
                                                  update)
  _with_tables(r.tables, run)


def _with_tables(tables, body):
  """``body(shared-memory copies of tables)``: each copied in once, before it runs."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  if not tables:
    body([])
    return

  def run(*scoped):
    *smem, bar = scoped
    for k, (src, dst) in enumerate(zip(tables, smem)):
      plgpu.copy_gmem_to_smem(src, dst, bar.at[k])
    for k in range(len(smem)):
      plgpu.barrier_wait(bar.at[k])
    body(smem)
  pl.run_scoped(run, *[plgpu.SMEM(t.shape, t.dtype) for t in tables],
                plgpu.Barrier(num_arrivals=1, num_barriers=len(tables)))


def flat_update_quantized(rule, scalars, seg_rows, p, g, state, *,
                          tuning: Optional[MosaicTuning] = None, platform: Optional[str] = None):
  """``pallas.flat_update_quantized`` on Mosaic GPU: state fields may be
  ``quantization.QuantizedArray``s (int8 maps or e4m3); ``seg_rows`` and the sums are per row
  of one 256-element block. Each row is one ``pallas.quantized_block``; codes, scales, float
  fields and p are updated in place when donated. The int8 maps are read from shared memory
  (``_shared_tables``). ``platform="interpret"``: Mosaic GPU's interpreter on a CPU
  (``_quantized_kernel``'s copies; for verification, slow)."""
  from fusedopt import quantization  # pylint: disable=import-outside-toplevel
  if platform not in (None, "gpu", "interpret"):
    raise ValueError(f"platform={platform!r}: the Mosaic GPU kernels run on a GPU, or in its "
                     "interpreter ('interpret')")
  n = p.shape[0]
  rows, units = n // WIDTH, n // ALIGN
  if n % ALIGN:
    raise ValueError(f"a flat buffer of {n} elements: whole {ALIGN}-element units expected")
  fmts = tuple(x.fmt if quantization.is_quantized(x) else None for x in state)
  n_sums = elementwise.num_sumsq_terms(rule)
  if n == 0:
    return ((p if rule.writes_param else None), tuple(state),
            tuple(jnp.zeros((0,), F32) for _ in range(n_sums)) if rule.sumsq else None)
  tuning = tuning or default_tuning(rule, p.dtype)
  steps = kp._largest_pow2_divisor(units, max(1, tuning.block // ALIGN))  # pylint: disable=protected-access
  view = lambda x: x.reshape(rows, WIDTH)  # noqa: E731
  tables = _table_inputs() if any(f and not f.is_fp8 for f in fmts) else []
  fixed = ([_scalar_vector(rule, scalars)] + tables
           + [jnp.asarray(seg_rows[k], F32) for k in rule.seg_scalars]
           + ([view(g)] if rule.reads_grad else []))
  bufs, first = [], []   # every field's buffers (codes and scales, or one); its first's index
  for x in state:
    first.append(len(bufs))
    bufs += [view(x.codes), x.scales] if quantization.is_quantized(x) else [view(x)]
  written = [first[k] + j for k in _written(rule, len(state)) for j in range(2 if fmts[k] else 1)]
  new_p, new_bufs, sums = _run_kernel(
      functools.partial(_quantized_kernel, rule, fmts, steps, tuning.num_stages,
                        len(rule.seg_scalars), len(tables)),
      f"fusedopt_q_{rule.name}", units // steps, rule, fixed, view(p), bufs, written,
      [(rows,)] * n_sums, platform)
  new_state = list(state)
  for k, x in enumerate(state):
    if first[k] in new_bufs:
      new_state[k] = (quantization.QuantizedArray(new_bufs[first[k]].reshape(-1),
                                                  new_bufs[first[k] + 1], x.fmt, x.block)
                      if fmts[k] else new_bufs[first[k]].reshape(-1))
  return (None if new_p is None else new_p.reshape(-1), tuple(new_state),
          tuple(sums) if rule.sumsq is not None else None)


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
  cc = common.device_compute_capability()   # targeting's None: no particular GPU asked for
  if cc is None and not common.targeted():
    raw = getattr(jax.devices()[0], "compute_capability", None)
    return (f"backend='mosaic_gpu' needs an NVIDIA GPU of compute capability 9.0 or newer; "
            f"this device reports {raw!r}: use backend='pallas' or 'auto'")
  if cc is not None and cc < MIN_COMPUTE_CAPABILITY:
    return (f"backend='mosaic_gpu' needs compute capability 9.0 or newer (Hopper); this GPU has "
            f"{cc / 10:.1f}: use backend='pallas' or 'triton'")
  return None


_UPDATE = common.at_unit(flat_update, ALIGN)
# sequential_vmap: ``pl.run_state`` has no batching rule, so under jax.vmap the kernel runs once
# per batch element (as jax-triton's calls do)
BACKENDS = {"mosaic_gpu": common.Backend(
    "mosaic_gpu", common.packed_run_group(_UPDATE), _UPDATE, unit=ALIGN, supports=supports,
    unavailable=_unavailable, sequential_vmap=True,
    run_quantized=common.packed_run_group(common.at_unit(flat_update_quantized, kp.QROW)))}

__all__ = ["flat_update", "flat_update_quantized", "default_tuning", "DEFAULT_TUNING", "ALIGN",
           "WIDTH", "BACKENDS"]
