"""The backends by name, and which one runs a group: explicit choices, fallbacks and ``auto``.

Every backend is a ``common.Backend`` in the ``BACKENDS`` dict of its module; ``MODULES`` says
which module holds which names (imported on first use: importing fusedopt never imports Pallas,
triton or a compiler). A new backend is one module exporting ``BACKENDS`` and one line here.

``select`` decides, for one dtype group, the backend that runs it:

- an explicit backend that cannot run here raises, naming why and what to use instead;
- one without a kernel for the group's dtype, or whose kernels need a larger alignment than the
  layout's (``layout.choose_align``: a tree of many small leaves), warns once and runs that group
  on ``jnp`` (never wrong numbers);
- a complex group with per-leaf state (``fusedopt.tx``) on a kernel backend runs as its real
  and imaginary planes (``kernels/planes.py``);
- ``auto``: ``auto_choice`` (``auto_leaf_choice`` with per-leaf state: complex groups on jnp).
"""
import importlib
import warnings
from typing import List

import jax
import jax.numpy as jnp
import numpy as np

from fusedopt.kernels import common, planes

NAMES = ("auto", "jnp", "native", "pallas", "pallas_interpret", "mosaic_gpu", "triton",
         "triton_interpret")
MODULES = {"jnp": "jnp", "native": "native", "pallas": "pallas", "pallas_interpret": "pallas",
           "mosaic_gpu": "mosaic_gpu", "triton": "triton", "triton_interpret": "triton"}


def get(name: str) -> common.Backend:
  """The backend called ``name`` (not "auto")."""
  if name not in MODULES:
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(NAMES)}")
  return importlib.import_module(f"fusedopt.kernels.{MODULES[name]}").BACKENDS[name]


def _runs_here(name: str) -> bool:
  try:
    return get(name).unavailable() is None
  except ImportError:
    return False


def available_backends() -> List[str]:
  """The backends that can run here, besides "auto" (``jnp`` and ``pallas_interpret`` always
  can; ``triton_interpret`` where triton was imported with TRITON_INTERPRET=1)."""
  return [name for name in MODULES if _runs_here(name)]


def _warn_once(msg):  # Python's default filter shows it once per call site
  warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _fallback(backend: common.Backend, dtype, align: int, unit: int, quantized: bool = False):
  """``backend``, or jnp (with a warning) where it has no kernel for ``dtype`` or ``align`` (the
  layout's alignment; ``quantized``: where a quantized group's segments start) is not a multiple
  of ``unit`` (the alignment the runner that will run needs)."""
  if align % unit:
    where = (f"this quantized group's segments start on multiples of {align} elements"
             if quantized else f"this tree's layout is aligned to {align} elements (padding "
             f"every leaf to {unit} would cost over 1% more memory)")
    _warn_once(f"backend={backend.name!r} runs whole {unit}-element units; {where}, so it runs "
               "on the jnp backend")
    return get("jnp")
  if not backend.supports(dtype):
    _warn_once(f"backend={backend.name!r} has no {np.dtype(dtype).name} kernel; that dtype "
               "group runs on the jnp backend")
    return get("jnp")
  return backend


def _explicit(name: str) -> common.Backend:
  backend = get(name)
  why = backend.unavailable()
  if why is not None:
    raise RuntimeError(why)
  return backend


def select(name: str, layout, gi: int, rule, leaf_state: bool = False) -> common.Backend:
  """The backend that runs ``rule`` over group ``gi`` of ``layout`` when ``name`` is asked for
  (``leaf_state``: with per-leaf state, ``Backend.run_leaves``)."""
  if name == "auto":
    return auto_leaf_choice(layout, gi, rule) if leaf_state else auto_choice(layout, gi, rule)
  backend, dtype = _explicit(name), layout.groups[gi].dtype
  if leaf_state and backend.kernel and jnp.issubdtype(dtype, jnp.complexfloating):
    why = planes.unsupported_dtype(backend, dtype)
    if why is not None:
      _warn_once(f"{why}; that group runs on the jnp backend")
      return get("jnp")
    backend, dtype = planes.on_planes(backend, get("jnp")), jnp.finfo(dtype).dtype
  return _fallback(backend, dtype, layout.align, backend.group_alignment())


def auto_leaf_choice(layout, gi: int, rule) -> common.Backend:
  """``backend="auto"`` with per-leaf state (``fusedopt.tx``), from the tx rows of the CPU bench
  (docs/performance.md):

  - a rule that writes its params in place (``tx.update_and_apply``, the one-pass step): the
    native kernels on a CPU with one device -- every leaf's param, grad and state read and
    written by address in one pass;
  - a rule whose param output is a fresh buffer (optax's ``update``: ``p' - p``), and anywhere
    else: jnp, one XLA fusion per leaf, which XLA fuses with the caller's ``apply_updates`` so
    the update never reaches memory. A kernel would write it to a fresh buffer each step and
    ``apply_updates`` read it back (2-3x slower on CPU).

  Not native with several devices: the caller may shard the step under ``jit``, and XLA gathers
  a custom call's sharded operands."""
  if (rule.param_in_place and _runs_here("native") and jax.device_count() == 1
      and get("native").supports(layout.groups[gi].dtype)):
    return get("native")
  return get("jnp")


def auto_choice(layout, gi: int, rule) -> common.Backend:
  """``backend="auto"``, from the benchmarks (docs/performance.md):

  - CPU: the native kernels (float32, bfloat16, float16; where a C++ compiler is), else jnp.
  - GPU/TPU: Pallas when the group's flat buffer costs no copy (one leaf whose size is a
    multiple of the alignment: the buffer *is* the leaf), or when the rule's norms are fused
    into the kernel (LAMB). Otherwise jnp: XLA fuses the concatenation of the leaves into the
    update itself, which a kernel cannot.
  """
  group = layout.groups[gi]
  if _runs_here("pallas"):
    pallas = get("pallas")
    if not pallas.supports(group.dtype) or layout.align % pallas.unit:
      return get("jnp")
    one_leaf = (len(group.segments) == 1
                and layout.segments[group.segments[0]].size == group.size)
    return pallas if (one_leaf or rule.sumsq is not None) else get("jnp")
  if _runs_here("native") and get("native").supports(group.dtype):
    return get("native")
  return get("jnp")


def select_quantized(name: str, layout, gi: int, rule, leaf_state: bool = False
                     ) -> common.Backend:
  """The backend that runs ``rule`` over group ``gi`` whose state has quantized fields
  (``Backend.run_quantized``). ``auto``: the native kernels where ``auto_choice`` picks them
  (a CPU; with per-leaf state, as ``auto_leaf_choice``, only with one device), else jnp -- on a
  GPU/TPU too, where ``auto_choice`` may pick Pallas: its quantized kernel has not run on a
  device yet (``bench/gpu_run.sh`` with ``LOW_BIT=1`` measures it). An explicit backend without
  a quantized kernel warns once and runs the group on jnp."""
  if name == "auto" and leaf_state and jax.device_count() > 1:
    return get("jnp")   # the caller may shard the step; XLA would gather a custom call's operands
  if name == "auto":
    backend = auto_choice(layout, gi, rule)
    if backend.name != "native":
      return get("jnp")
  else:
    # a quantized group's segments start on whole blocks (``FlatLayout.unit``), wider than the
    # layout's alignment where that is under a block: leaf-direct rows of a block fit at any
    # alignment (a shard's slice too: ``fusedopt.sharding`` gives its layout the block)
    group, backend = layout.groups[gi], _explicit(name)
    unit = backend.group_alignment() if group.block else backend.unit
    backend = _fallback(backend, group.dtype, layout.unit(gi), unit, quantized=bool(group.block))
  if backend.run_quantized is None:
    if name != "auto" and backend.name != "jnp":
      _warn_once(f"backend={name!r} has no kernel for quantized state yet; groups with "
                 "quantized state run on the jnp backend")
    return get("jnp")
  return backend


_warned_flat = []


def select_flat(name: str, dtype, align: int) -> common.Backend:
  """The backend that runs a rule over flat buffers with per-unit tables (``Backend.flat_update``:
  each device's slice of sharded state): ``name``'s where it has a flat kernel for ``dtype`` and
  ``align``; ``auto``: Pallas on a GPU/TPU, else jnp. The native kernels address leaves at static
  offsets, which differ per shard: they have no flat form (a warning, then jnp)."""
  if name == "auto":
    name = "pallas" if _runs_here("pallas") else "jnp"
  backend = _explicit(name)
  if backend.flat_update is None:
    if not _warned_flat:
      _warned_flat.append(True)
      _warn_once(f"sharded state: rules with per-tensor scalars or sums (LAMB, LARS) run on the "
                 f"jnp backend per shard (the {name} kernels address whole leaves)")
    return get("jnp")
  return _fallback(backend, dtype, align, backend.unit)


def gradient_prepass(name: str, layout=None):
  """The checked step's gradient pre-pass as ``name``'s kernel, or None (the XLA one,
  ``fusedopt.norms.gradient_prepass``): also where ``layout``'s alignment is one the backend's
  group runs do not take (they run on jnp then)."""
  if name == "auto" or name not in MODULES:
    return None
  backend = _explicit(name)
  if layout is not None and layout.align % backend.group_alignment():
    return None
  return backend.gradient_prepass


# ----------------------------------------------------------------------------- transformations

def _sequential_vmap(fn):
  """``fn`` whose ``jax.vmap`` runs it once per batch element (``lax.map``): for kernels without
  a batching rule (jax-triton's ``triton_call`` raises under vmap)."""
  fn = jax.custom_batching.custom_vmap(fn)

  @fn.def_vmap
  def rule(axis_size, in_batched, *args):
    leaves, treedef = jax.tree_util.tree_flatten(args)
    flags = jax.tree_util.tree_leaves(list(in_batched))   # same leaf order as ``args``
    leaves = [x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))
              for x, b in zip(leaves, flags)]
    out = jax.lax.map(lambda xs: fn(*jax.tree_util.tree_unflatten(treedef, xs)), leaves)
    return out, jax.tree_util.tree_map(lambda _: True, out)

  return fn


def _runner(backend: common.Backend, leaf_state: bool, quantized: bool):
  if quantized:
    return backend.run_quantized
  return backend.leaf_runner() if leaf_state else backend.run_group


def differentiable(backend: common.Backend, leaf_state: bool = False, quantized: bool = False):
  """``backend.run_group`` (``leaf_state``: ``Backend.leaf_runner()``; ``quantized``:
  ``Backend.run_quantized``) with the jnp backend's derivatives.

  Kernels (FFI calls, Pallas, Triton) have no JVP rule; the jnp backend runs the same rule in
  ``jax.numpy``, so under ``jax.jvp``/``jax.grad`` (meta-learning: derivatives with respect to
  hyper-parameters or inputs) the step's value comes from the kernel and its tangent from the jnp
  path. ``jax.vmap`` batches the kernel itself (each backend's batching rule; one call per batch
  element for a ``sequential_vmap`` backend, the Triton kernels)."""
  run_fn = _runner(backend, leaf_state, quantized)
  if not backend.kernel:
    return run_fn
  reference_run = _runner(get("jnp"), leaf_state, quantized)

  def run_group(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state):
    def kernel(scalars, seg, p_leaves, g_leaves, state):
      return run_fn(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state)
    if backend.sequential_vmap:
      kernel = _sequential_vmap(kernel)

    @jax.custom_jvp
    def step(scalars, seg, p_leaves, g_leaves, state):
      return kernel(scalars, seg, p_leaves, g_leaves, state)

    def reference(scalars, seg, p_leaves, g_leaves, state):
      return reference_run(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state)

    @step.defjvp
    def step_jvp(primals, tangents):
      _, t_out = jax.jvp(reference, primals, tangents)
      return step(*primals), t_out

    return step(dict(scalars), dict(seg), list(p_leaves), list(g_leaves), tuple(state))

  return run_group


__all__ = ["NAMES", "MODULES", "get", "available_backends", "select", "auto_choice",
           "select_flat", "select_quantized", "gradient_prepass", "differentiable",
           "auto_leaf_choice"]
