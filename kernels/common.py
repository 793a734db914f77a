"""What the kernel backends share: the alignment unit, the target platform, launch parameters.

Pallas and Triton kernels both run whole alignment units (``ALIGN`` elements: a leaf's segment
starts on one, so a block never straddles two tensors), read and write the same float dtypes,
and are traced for a platform that may differ from jax's default backend (``targeting``: lowering
for a GPU or TPU from a CPU host). Launch parameters (``Tuning``) come from one table per backend,
with one adjustment for every GPU kernel (``default_tuning``).
"""
import contextlib
import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fusedopt import elementwise
from fusedopt.layout import DEFAULT_ALIGN

F32 = jnp.float32
ALIGN = DEFAULT_ALIGN   # elements per alignment unit the Pallas and Triton kernels run

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


def supports(dtype) -> bool:
  """Whether the kernels have a variant for params/grads/state of ``dtype``."""
  return np.dtype(dtype) in FLOAT_DTYPES


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Launch parameters of one kernel: ``block`` elements per program (a power of two; Pallas: a
  multiple of ``ALIGN``), and on a GPU its warps and pipeline stages."""
  block: int = 4096
  num_warps: int = 4
  num_stages: int = 1


HEAVY_STATE_BUFFERS = 4   # a rule with this many state buffers runs at half the elements/thread


def default_tuning(table: Dict[Tuple[str, int], Tuning], rule, p_dtype, platform: str) -> Tuning:
  """``table``'s entry for (platform, storage itemsize of the params, at most 4), and on a GPU
  twice the warps (half the elements per thread) for a rule heavy on registers: a
  stochastically rounding rule (``with_stochastic_rounding``: its hash), or one with four or more
  state buffers (Adan: 6 loads and 5 stores per element). At the table's elements per thread
  those spill on sm_90; at half as many none does (sm_80, sm_90; tests/test_pallas_lowering.py,
  test_triton_kernels.py)."""
  tuning = table[(platform, min(np.dtype(p_dtype).itemsize, 4))]
  heavy = (set(elementwise.ROUNDING_SCALARS) <= set(rule.scalars)
           or rule.n_state >= HEAVY_STATE_BUFFERS)
  if platform == "gpu" and heavy:
    tuning = dataclasses.replace(tuning, num_warps=2 * tuning.num_warps)
  return tuning


_TARGET = []   # (platform, compute capability) set by `targeting`, innermost last


@contextlib.contextmanager
def targeting(platform: str, compute_capability: Optional[int] = None):
  """Trace kernels for ``platform`` ("gpu"/"tpu") whatever jax's default backend is -- for
  ahead-of-time compiles to a compile-only topology and lowering tests on a CPU host. A GPU's
  ``compute_capability`` (90 = H100, 80 = A100) is what the Triton kernels compile for."""
  _TARGET.append((platform, compute_capability))
  try:
    yield
  finally:
    _TARGET.pop()


def targeted() -> Optional[str]:
  """The platform ``targeting`` set, or None."""
  return _TARGET[-1][0] if _TARGET else None


def compute_capability() -> Optional[int]:
  return _TARGET[-1][1] if _TARGET else None


def device_compute_capability() -> Optional[int]:
  """The compute capability kernels are built for: ``targeting``'s (None: no particular GPU),
  else jax's first device's (90 for an H100), else None (no GPU, or one that does not say)."""
  if targeted():
    return compute_capability()
  try:
    return round(float(jax.devices()[0].compute_capability) * 10)
  except (AttributeError, TypeError, ValueError):
    return None


def platform(explicit: Optional[str], kinds: Tuple[str, ...], backend: str) -> str:
  """The platform kernels are built for: ``explicit``, else ``targeting``'s, else jax's default
  backend, as one of "gpu", "tpu", "interpret" (a CPU runs kernels in interpret mode); raises
  where ``backend`` has no kernels for it (``kinds``)."""
  name = explicit if explicit is not None else (targeted() or jax.default_backend())
  kind = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "interpret",
          "interpret": "interpret"}.get(name)
  if kind not in kinds:
    raise ValueError(f"no {backend} kernels for platform {name!r}")
  return kind


def bytes_per_element(rule, p_dtype, g_dtype, state_dtype, loads=None) -> int:
  """Memory traffic of one update per parameter (the benchmarks' roofline model): the buffers
  read plus those written. ``loads`` (names among "p", "g", "st0", ...) restricts the reads to
  what a kernel actually loads; by default the params, the grads where the rule reads them and
  every state buffer."""
  isz = lambda d: np.dtype(d).itemsize  # noqa: E731
  inputs = [("p", p_dtype)] + ([("g", g_dtype)] if rule.reads_grad else [])
  inputs += [(f"st{k}", state_dtype) for k in range(rule.n_state)]
  reads = sum(isz(d) for v, d in inputs if loads is None or v in loads)
  writes = ((isz(p_dtype) if rule.writes_param else 0)
            + (rule.n_state * isz(state_dtype) if rule.writes_state else 0))
  return reads + writes


# ----------------------------------------------------------------------------- the interface

@dataclasses.dataclass(frozen=True)
class Backend:
  """One backend: how it runs a ``Rule`` over a group of a ``FlatLayout``, and where it can.

  ``run_group(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state)`` runs ``rule`` over
  dtype group ``gi``: ``scalars`` name -> float32 scalar, ``seg`` name -> float32 [num_leaves]
  per-tensor scalars, ``p_leaves``/``g_leaves`` every leaf of the tree, ``state`` the group's
  flat state buffers. It returns (the group's new param leaves in group order, or None for a
  rule that writes none; the new state buffers; for a rule with ``sumsq``, per leaf of the group
  the sum of each term squared, float32 [len(group.segments)] vectors in group order, else None).

  ``run_leaves`` (same arguments, but ``state`` a tuple per state field of the group's own
  state *leaves*, in group order: optax's params-shaped state, ``fusedopt.tx``) returns the new
  state in that form too. None: ``packed_leaves(run_group)`` packs the state leaves into flat
  buffers and splits them back (an extra pass over the state; the jnp backend runs each leaf as
  its own XLA fusion instead, the native one reads and writes the leaves by address).

  ``run_quantized`` (``run_group``'s arguments and results, but a state field may be a
  ``fusedopt.quantization.QuantizedArray``: low-bit state) decodes, updates and encodes those
  fields in the same pass. None: the group runs on the jnp backend's (with a warning).

  ``unit`` is the layout alignment (elements) ``flat_update`` needs, ``group_unit`` (where
  smaller) the one the group runs need.

  ``flat_update(rule, scalars, tables, p, g, state, unit)`` (None where a backend's kernels only
  address leaves) runs ``rule`` over flat buffers of whole ``unit``s with per-unit tables
  ``tables`` (name -> float32 [n // unit]) and returns (new p or None, new state, per-unit sums
  or None): what the sharded driver runs on each device's slice.
  """
  name: str
  run_group: Callable
  flat_update: Optional[Callable] = None
  unit: int = 1                               # the layout alignment its kernels need
  group_unit: int = 0                         # run_group's/run_leaves' own, where smaller (0: unit)
  supports: Callable[[Any], bool] = lambda dtype: True
  unavailable: Callable[[], Optional[str]] = lambda: None   # why it cannot run here, or None
  kernel: bool = True                         # False for jnp: derivatives are its own
  sequential_vmap: bool = False               # no batching rule: vmap runs it per element
  gradient_prepass: Optional[Callable] = None   # (layout, g_leaves, grad_scale, clip) -> ...
  run_leaves: Optional[Callable] = None       # run_group with per-leaf state (see above)
  run_quantized: Optional[Callable] = None    # run_group with quantized state (see above)

  def group_alignment(self) -> int:
    """The layout alignment ``run_group``, ``run_leaves`` and ``run_quantized`` need (leaf-direct
    kernels may need less than ``flat_update``'s ``unit``)."""
    return self.group_unit or self.unit

  def leaf_runner(self) -> Callable:
    """``run_leaves``, or ``run_group`` behind ``packed_leaves`` where the backend has none."""
    return self.run_leaves or packed_leaves(self.run_group)


# ----------------------------------------------------------------------------- group buffers

def check_flat_buffers(rule, p, g, state, unit: int):
  """Checks the buffers of a kernel backend's ``flat_update``: whole ``unit``s of elements, a
  gradient where the rule reads one, the params' shape throughout, ``rule.n_state`` states."""
  n = p.shape[0]
  if n % unit:
    raise ValueError(f"flat buffers must hold a multiple of {unit} elements, got {n}")
  if rule.reads_grad and g is None:
    raise ValueError(f"rule {rule.name} reads the gradient; got g=None")
  for x in ((g,) if rule.reads_grad else ()) + tuple(state):
    if x.shape != p.shape:
      raise ValueError(f"flat buffer of shape {x.shape} does not match params {p.shape}")
  if len(state) != rule.n_state:
    raise ValueError(f"rule {rule.name} takes {rule.n_state} state buffers, got {len(state)}")


def pack_grads(layout, gi, g_leaves):
  """Group ``gi``'s gradients as one flat buffer in their own (common) dtype: the same expression
  wherever a backend packs them in a step (pre-pass and update), so XLA builds the buffer once."""
  return layout.pack_group(g_leaves, gi, jnp.result_type(*layout.group_leaves(g_leaves, gi)))


def split_group(layout, gi, flat):
  """A group's flat param buffer -> its leaves (group order), in the group's dtype."""
  group = layout.groups[gi]
  return split_group_as(layout, gi, flat, [group.dtype] * len(group.segments))


def split_group_as(layout, gi, flat, dtypes):
  """A group's flat buffer -> its leaves (group order), leaf j in ``dtypes[j]``."""
  out = []
  for i, dt in zip(layout.groups[gi].segments, dtypes):
    seg_ = layout.segments[i]
    leaf = jax.lax.slice(flat, (seg_.offset,), (seg_.offset + seg_.size,))
    out.append(leaf.reshape(seg_.shape).astype(dt))
  return out


def pack_leaves(layout, gi, leaves, dtype=None):
  """Group ``gi``'s own leaves (one per member, in group order) packed into its zero-padded flat
  buffer, in ``dtype`` (default the first leaf's)."""
  full = [None] * len(layout.segments)
  for i, x in zip(layout.groups[gi].segments, leaves):
    full[i] = x
  return layout.pack_group(full, gi, jnp.result_type(leaves[0]) if dtype is None else dtype)


def packed_leaves(run_group):
  """``Backend.run_leaves`` of a backend that only has ``run_group``: each state field's leaves
  packed into the group's flat buffer (in the first leaf's dtype), ``run_group``, and the new
  buffers split back into leaves of their own dtypes. Costs a pack and a split of the state."""
  def run_leaves(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
    flat = [pack_leaves(layout, gi, leaves) for leaves in state]
    out_p, new_flat, sums = run_group(rule, scalars, seg, layout, gi, p_leaves, g_leaves,
                                      tuple(flat))
    new_state = tuple(tuple(split_group_as(layout, gi, buf, [x.dtype for x in leaves]))
                      for buf, leaves in zip(new_flat, state))
    return out_p, new_state, sums
  return run_leaves


def unit_tables(layout, gi, seg, names):
  """Per-tensor scalars ``seg[name]`` (float32 [num_leaves]) as per-unit tables of group ``gi``."""
  if not names:
    return {}
  ids = layout.block_segment_ids(gi)
  return {k: jnp.asarray(seg[k], F32)[ids] for k in names}


def unit_sums_per_leaf(layout, gi, sums):
  """Per-unit sums of group ``gi`` -> per leaf, in group order (``Backend.run_group``'s form)."""
  if sums is None:
    return None
  pos = {leaf: k for k, leaf in enumerate(layout.groups[gi].segments)}
  ids = jnp.asarray([pos[i] for i in layout.block_segment_ids(gi)], jnp.int32)
  return tuple(jax.ops.segment_sum(u, ids, num_segments=len(pos), indices_are_sorted=True)
               for u in sums)


def at_unit(kernel_update, kernel_unit: int):
  """``Backend.flat_update`` over a kernel's ``flat_update(rule, scalars, tables, p, g, state)``
  whose tables and sums are per ``kernel_unit`` elements: the layout's unit (a multiple of it)
  repeated into and summed out of the kernel's."""
  def flat_update(rule, scalars, tables, p, g, state, unit):
    if unit % kernel_unit:
      raise ValueError(f"these kernels need a layout aligned to a multiple of {kernel_unit}; "
                       f"got {unit}")
    rep = unit // kernel_unit
    tables = {k: (jnp.repeat(v, rep) if rep > 1 else v) for k, v in tables.items()}
    new_p, new_state, sums = kernel_update(rule, scalars, tables, p,
                                           g if rule.reads_grad else None, tuple(state))
    if sums is not None and rep > 1:
      sums = tuple(x.reshape(-1, rep).sum(axis=1) for x in sums)
    return (new_p if rule.writes_param else None), tuple(new_state), sums
  return flat_update


def packed_run_group(flat_update, grad_dtype_ok=supports):
  """``Backend.run_group`` of a flat-buffer backend: packs the group's params and grads (grads in
  their own dtype, float32 where ``grad_dtype_ok`` rejects it), runs ``flat_update`` (the
  ``Backend.flat_update`` form) and returns the params as leaves, the sums per leaf."""
  def run_group(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
    pf = layout.pack_group(p_leaves, gi)
    gf = pack_grads(layout, gi, g_leaves) if rule.reads_grad else None
    if gf is not None and not grad_dtype_ok(gf.dtype):
      gf = gf.astype(F32)
    tables = unit_tables(layout, gi, seg, rule.seg_scalars)
    new_p, new_state, sums = flat_update(rule, scalars, tables, pf, gf, tuple(state),
                                         layout.align)
    out_p = split_group(layout, gi, new_p) if rule.writes_param else None
    return out_p, new_state, unit_sums_per_leaf(layout, gi, sums)
  return run_group
