"""The ``triton`` backend: hand-written Triton kernels (via jax-triton), bodies generated from Rules.

Why a second GPU backend next to Pallas: a ``@triton.jit`` kernel controls what Pallas decides for
us -- masked loads and stores of any length, int64 addressing, the tile shape, ``num_warps``, and
which inputs are read at all -- and is the same kind of kernel apex and torch's fused optimizers
are. The optimizer math is still written once: each ``Rule.fn`` is traced with symbolic values
(``fusedopt.kernels.symbolic``, as ``fusedopt.kernels.native`` does for C++) that print
Triton-Python statements (the dialect ``TRITON``), and the statements are pasted into one of
the hand-written driver templates:

- ``_UPDATE_LEAVES`` (what ``backend="triton"`` runs): the element-wise update of a rule over one
  dtype group, **leaf-direct** -- like apex's ``multi_tensor_apply`` and the native CPU kernel, a
  launch takes up to ``LEAVES_PER_LAUNCH`` leaves' own param and grad buffers as pointer
  arguments and the group's flat state buffers -- or, for optax's params-shaped state
  (``fusedopt.tx``, ``Backend.run_leaves``), each leaf's own state buffers too, chosen per program
  like its params (``leaves_per_launch``: fewer leaves as state fields add pointers, within
  CUDA's 4 KB of kernel parameters) -- so the step packs nothing: no concatenated copy
  of the grads or params, no slicing back (a packed copy costs the jnp step on GPT-2-124M half of
  the copy bandwidth on an H100). Every variant (``guarded``/``with_master``/``per_segment``/
  stochastic rounding); for a rule with ``sumsq`` (LAMB's moment pass), per-row partial sums of
  squares of its terms, summed per leaf in XLA (``Backend.run_group``'s form);
- ``_PREPASS_LEAVES``: per-program sum of squares and non-finite count of ``grad_scale * g`` read
  from the gradient leaves (the global-norm and finite pre-pass of ``apply_gradient_checked``);
- ``_UPDATE``: the update over one flat buffer (``flat_update``, a low-level API with
  ``fusedopt.kernels.pallas.flat_update``'s contract; the optimizers' steps use the leaf-direct
  kernel, a sharded one included: each device's slice is a one-leaf group of its local layout).

Layout of a program. The flat state of ``fusedopt.layout`` holds whole alignment units (1024
elements, less for a tree of many small leaves), and every segment (tensor) starts on a unit.
A program handles a ``(R, C)`` tile of ``R * C = BLOCK`` elements, ``C = min(BLOCK, 1024)``
(leaf-direct: no wider than the largest power of two dividing the alignment, at least
``MIN_ROW``; the flat kernel needs whole 1024-element units), of one tensor: per-tensor scalars (LAMB/LARS trust ratios)
are one load, and LAMB's norms per-row ``tl.sum``s. Leaf-direct: host-built tables (``plan_launches``)
give each program its leaf (slot) and chunk, each leaf its size, padded rows and first state row;
the program picks its leaf's pointers with branch-free ``tl.where`` selects. The state is
updated over the leaf's whole padded segment (as the flat kernels do: zero padding stays zero),
the leaf's own buffers over its n elements with a mask ``offs < n``. That mask is constant over
runs of VEC elements because leaves are launched by vector width (n a multiple of VEC = 4 float32
or 8 bf16 elements, or less), so loads and stores stay 16-byte vectors (checked in the tests).
Offsets are int64 (a chunk index widened before the multiply) so tensors and buffers past 2^31
elements address correctly.

Numerics. Every value is float32 in the kernel (loads widen the storage dtype, stores round to
nearest even). ``/`` is ``tl.div_rn`` and ``sqrt`` is ``tl.sqrt_rn`` (Triton's defaults are
``div.full`` and an approximate sqrt), and kernels are compiled with ``enable_fp_fusion=False``,
so the PTX holds ``mul.rn``/``add.rn`` -- explicitly rounded, which neither ptxas nor the driver's
JIT contracts into FMAs. A step therefore rounds every operation like the jnp oracle does.
Bit-level wrappers (``elementwise.with_stochastic_rounding``) trace into uint32 values
(``symbolic.UInt``): ``xp.bits``/``xp.from_bits`` are ``.to(..., bitcast=True)``, ``xp.u32`` a
float -> uint32 conversion, and every integer literal a ``tl.uint32`` constant, so ``*``/``+`` wrap
modulo 2^32 and ``>>`` is logical -- the hash gives the jnp oracle's bits exactly.

Runtime scalars. The step's scalars (lr, betas, bias corrections, grad scale, ok flag) are one
float32 vector read by the kernel, per-tensor scalars a per-leaf (flat: per-unit) table: changing
the learning rate every step neither retraces nor recompiles anything. A kernel's source depends
on the rule, the dtypes, the leaves per launch and VEC only, so a model compiles at most a couple
of variants per dtype group (full launches of 64 leaves and the last one).

In place. Each param leaf and each state buffer is an ``input_output_aliases`` pair of the
jax-triton call: donate the optimizer at the jit boundary and they are updated where they are. An input the rule never reads
(the params under ``master_weights``, the grads of LAMB's apply stage) is not loaded.

Interpret mode. ``platform="interpret"`` runs the *same generated source* in Triton's interpreter
(``TRITON_INTERPRET=1`` must be set before ``triton`` is imported) on host numpy buffers through
``jax.pure_callback``: slow, for verification on a CPU (tests/test_triton_kernels.py). The
interpreter's float32 -> bfloat16 conversion truncates; ``_round_bf16_like_the_gpu`` makes it
round to nearest even like the compiled kernel, so bf16 results can be checked bit for bit.

Generated sources are written to ``$FUSEDOPT_CACHE_DIR/triton`` (default
``~/.cache/fusedopt/triton``), named by their hash, and imported from there: Triton reads a
kernel's source with ``inspect``, so it must live in a real file.

Tuning (``DEFAULT_TUNING``): 4096 elements (4 rows) per program, as for the Pallas kernels, with 8 warps:
16 float32 per thread per buffer, four 16-byte vectors. With 4 warps (32 per thread) ptxas
spilled for AdaBelief and LAMB's moment pass (168 registers, sm_90; tests/test_triton_kernels.py
checks every rule for zero spills); stochastically rounding rules get 16 warps
(``default_tuning``: the hash's registers). ``python -m bench.kernels --device gpu --sweep`` on
a GPU sweeps BLOCK x num_warps for this backend too. ``backend="auto"`` does not pick this backend: it
keeps its measured choices until an H100 run of ``bench/gpu_run.sh`` shows this one faster.
"""
import dataclasses
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import threading
import warnings
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fusedopt import elementwise, norms, quantization
from fusedopt.kernels import common, symbolic

F32 = jnp.float32
ALIGN = common.ALIGN
Tuning = common.Tuning
supports = common.supports


class TritonUnavailable(RuntimeError):
  """triton / jax-triton missing, or no CUDA GPU: the triton backend cannot run here."""


# (platform, storage itemsize of the params) -> Tuning. GPU: the Pallas kernels' measured block
# (4096 elements; docs/performance.md) with 8 warps, the fewest with zero spills for every rule
# (see the module docstring), until an H100 sweep of this backend
# (python -m bench.kernels --device gpu --sweep) says otherwise. Interpret mode costs Python per
# program, so it takes big blocks.
DEFAULT_TUNING: Dict[Tuple[str, int], Tuning] = {
    ("gpu", 4): Tuning(block=4096, num_warps=8),
    ("gpu", 2): Tuning(block=4096, num_warps=8),
    ("interpret", 4): Tuning(block=16384),
    ("interpret", 2): Tuning(block=16384),
}


def default_tuning(rule, p_dtype, platform: Optional[str] = None) -> Tuning:
  """The ``Tuning`` the kernels use for ``rule`` on params of ``p_dtype``
  (``common.default_tuning`` over ``DEFAULT_TUNING``: at 16 elements per thread the guarded,
  stochastically rounding Adam kernel spills on sm_90, at 8 none does)."""
  return common.default_tuning(DEFAULT_TUNING, rule, p_dtype, _platform(platform))


def targeting(platform: str = "gpu", compute_capability: Optional[int] = 90):
  """``common.targeting`` with an H100 by default: jax-triton lowers and compiles the kernels
  for ``compute_capability`` (90 = H100, 80 = A100) on a machine without a GPU."""
  return common.targeting(platform, compute_capability)


def _platform(platform: Optional[str]) -> str:
  return common.platform(platform, ("gpu", "interpret"), "Triton")


# ----------------------------------------------------------------------------- lazy imports

_lock = threading.RLock()


def _triton():
  import triton  # pylint: disable=import-outside-toplevel
  return triton


@functools.lru_cache(maxsize=None)
def _jax_triton():
  """jax_triton, imported with ``TRITON_CACHE_DIR`` kept (its import sets it to "", after which
  ``triton.compile`` cannot find a cache dir)."""
  saved = os.environ.get("TRITON_CACHE_DIR")
  try:
    import jax_triton  # pylint: disable=import-outside-toplevel
  finally:
    if saved is None:
      os.environ.pop("TRITON_CACHE_DIR", None)
    else:
      os.environ["TRITON_CACHE_DIR"] = saved
  _adapt_dce_rule(jax_triton)
  return jax_triton


def _adapt_dce_rule(jt):
  """jax-triton 0.4.1 registers its dead-code rule in the two-argument form ``(used_outs, eqn)``
  of jax 0.11; jax 0.12 calls rules with ``(used_outs, live_ins, eqn)`` (a TypeError as soon as a
  jaxpr holding a kernel call is pruned, e.g. a ``custom_jvp``'s). Wrapped here, only when the
  two forms differ."""
  import inspect   # pylint: disable=import-outside-toplevel
  from jax._src.interpreters import partial_eval as pe   # pylint: disable=import-outside-toplevel
  prim = getattr(getattr(jt, "triton_lib", None), "triton_kernel_call_p", None)
  rule = pe.dce_rules.get(prim)
  if rule is None or getattr(rule, "_fusedopt_adapted", False):
    return
  n = lambda f: len(inspect.signature(f).parameters)  # noqa: E731
  if n(rule) == 2 and n(getattr(pe, "_default_dce_rule", rule)) == 3:
    def adapted(used_outs, live_ins, eqn):
      del live_ins
      return rule(used_outs, eqn)
    adapted._fusedopt_adapted = True   # pylint: disable=protected-access
    pe.dce_rules[prim] = adapted


def interpreting() -> bool:
  """Whether the imported ``triton`` runs kernels in its interpreter (TRITON_INTERPRET=1 at import)."""
  try:
    return bool(_triton().knobs.runtime.interpret)
  except ImportError:
    return False


@functools.lru_cache(maxsize=None)
def _importable() -> bool:
  try:
    _triton()
    _jax_triton()
    return True
  except Exception:  # pylint: disable=broad-except  (ImportError, or jax-triton refusing a CPU jaxlib)
    return False


def _on_cuda() -> bool:
  try:
    return jax.default_backend() == "gpu" and jax.devices()[0].platform in ("gpu", "cuda") and (
        "rocm" not in jax.devices()[0].client.platform_version.lower())
  except Exception:  # pylint: disable=broad-except
    return False


def available() -> bool:
  """Whether compiled Triton kernels can run here: a CUDA GPU (or ``targeting("gpu", cc)`` for
  ahead-of-time lowering), triton and jax-triton."""
  if common.targeted() in ("gpu", "cuda"):
    return _importable() and not interpreting()
  return _on_cuda() and _importable() and not interpreting()


def unavailable_reason() -> str:
  if not _on_cuda():
    return f"it needs an NVIDIA GPU (jax's default backend is {jax.default_backend()!r})"
  if not _importable():
    return "it needs the packages triton and jax-triton (pip install 'fusedopt[gpu]')"
  return "triton was imported with TRITON_INTERPRET=1 (interpreter only)"


# ----------------------------------------------------------------------------- code generation

_TL_DTYPES = {"float32": "tl.float32", "bfloat16": "tl.bfloat16", "float16": "tl.float16"}


def _float_lit(v):
  return repr(v) if np.isfinite(v) else f"float('{v}')"


# Triton-Python. Literals are named typed constants (``tl.full``): a float32 one keeps a constant
# operand from changing a scalar's type, and a ``tl.uint32`` one keeps every uint32 operation
# (``*``/``+`` wrapping modulo 2^32, logical ``>>``) from being promoted to int32/int64 or signed.
# Division and square root are the IEEE round-to-nearest ones (``div_rn``/``sqrt_rn``).
TRITON = symbolic.Dialect(
    backend="triton", float_type="tl.float32", uint_type="tl.uint32",
    statement="{name} = {expr}", constant="tl.full([], {lit}, {type})",
    float_literal=_float_lit, uint_literal=lambda v: f"{v:#x}",
    div="tl.div_rn({a}, {b})", sqrt="tl.sqrt_rn({x})", where="tl.where({c} != {zero}, {a}, {b})",
    bits="{x}.to(tl.uint32, bitcast=True)", from_bits="{x}.to(tl.float32, bitcast=True)",
    u32="{x}.to(tl.uint32)",
    sign="tl.where({x} > 0.0, 1.0, tl.where({x} < 0.0, -1.0, {x}))",
    maximum="tl.where(({a} > {b}) | ({a} != {a}), {a}, {b})",
    minimum="tl.where(({a} < {b}) | ({a} != {a}), {a}, {b})")


_HEADER = '''"""Generated by fusedopt.kernels.triton ({what}). Do not edit: regenerated from the rule."""
import triton
import triton.language as tl

'''

# The driver template of the element-wise update. {params}: S, per-segment tables Q*, P, (G),
# state ST*, then N_ROWS (a runtime scalar), then the outputs (jax-triton appends output pointers
# after the inputs), then the tile shape.
_UPDATE = '''
@triton.jit
def {name}({params}, R: tl.constexpr, C: tl.constexpr, ROWS_PER_UNIT: tl.constexpr):
    # this program's rows of C elements; int64 so that offsets past 2^31 elements are exact
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    rmask = rows < N_ROWS
    offs = rows[:, None] * C + tl.arange(0, C)[None, :]
    # full-shape mask: constant over runs of C elements (N_ROWS * C is a multiple of C), so loads
    # stay 16-byte vectors; and a real [R, C] array in the interpreter, whose masked loads read a
    # broadcast [R, 1] mask out of bounds. N_ROWS is an int32 argument: widened before the
    # multiply, or a buffer past 2^31 elements would mask everything out
    mask = offs < N_ROWS.to(tl.int64) * C
{loads}
{body}
{stores}
'''

# The leaf-direct update: params and grads are read (and params written, in place) in each
# leaf's own buffer, the state in the group's flat buffers at the leaf's segment. A launch takes
# up to ``LEAVES_PER_LAUNCH`` leaves; host-built tables give each program its leaf (SLOT) and its
# chunk of R rows of C elements in it (CHUNK), and each leaf its padded rows (NROWS, whole
# alignment units), its padding in units of VEC elements (PADV: n = NROWS * C - PADV * VEC is then
# a multiple of VEC, so the leaf mask is constant over VEC elements and loads stay 16-byte
# vectors) and its first row in the flat state (ROW0). The tables are int32 (jax's default
# integer; every entry counts rows or less than a row, so it fits for leaves and groups past 2^31
# elements) and widened to int64 before any multiply.
_LEAF_PROLOGUE = '''
@triton.jit
def {name}({params}, R: tl.constexpr, C: tl.constexpr, VEC: tl.constexpr):
    pid = tl.program_id(0)
    slot = tl.load(SLOT + pid)
    lrows = tl.load(CHUNK + pid).to(tl.int64) * R + tl.arange(0, R)
    prow = pid.to(tl.int64) * R + tl.arange(0, R)
    nrows = tl.load(NROWS + slot).to(tl.int64)
    n = nrows * C - tl.load(PADV + slot).to(tl.int64) * VEC
    row0 = tl.load(ROW0 + slot).to(tl.int64)
    base = row0 * C
    rmask = lrows < nrows
    offs = lrows[:, None] * C + tl.arange(0, C)[None, :]
    # the state over the leaf's whole padded segment (as the flat kernels update it), the leaf's
    # own buffers over its n elements
    mask = offs < nrows * C
    lmask = offs < n
'''
_UPDATE_LEAVES = _LEAF_PROLOGUE + '''{loads}
{body}
{stores}
'''

# The pre-pass over gradient leaves (tables as in _UPDATE_LEAVES): one partial sum and one
# non-finite count per program.
_PREPASS_LEAVES = '''
@triton.jit
def {name}(S, SLOT, CHUNK, NROWS, PADV, {grads}, SUMSQ, BAD, R: tl.constexpr, C: tl.constexpr,
           VEC: tl.constexpr):
    pid = tl.program_id(0)
    slot = tl.load(SLOT + pid)
    lrows = tl.load(CHUNK + pid).to(tl.int64) * R + tl.arange(0, R)
    n = tl.load(NROWS + slot).to(tl.int64) * C - tl.load(PADV + slot).to(tl.int64) * VEC
    offs = lrows[:, None] * C + tl.arange(0, C)[None, :]
{select}
    x = tl.load(g_in + offs, mask=offs < n, other=0.0).to(tl.float32) * tl.load(S)
    tl.store(SUMSQ + pid, tl.sum(tl.sum(x * x, axis=1), axis=0))
    bad = tl.where(tl.abs(x) < float("inf"), 0.0, 1.0)
    tl.store(BAD + pid, tl.sum(tl.sum(bad, axis=1), axis=0))
'''


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  """What one generated update kernel is: the rule, the storage dtypes of its buffers, and, for
  a leaf-direct kernel (``leaves`` > 0), how many leaves one launch takes and the vector width
  ``vec`` (elements) that every one of their sizes is a multiple of."""
  rule: elementwise.Rule
  p_dtype: str
  g_dtype: Optional[str]            # None when the rule does not read the gradient
  st_dtypes: Tuple[str, ...]
  leaves: int = 0                   # 0: the flat-buffer kernel (_UPDATE)
  vec: int = 1
  leaf_state: bool = False          # leaf-direct state: each leaf's own state buffers

  @property
  def name(self):
    base = "fusedopt_" + re.sub(r"\W", "_", self.rule.name)
    if not self.leaves:
      return base
    return f"{base}_x{self.leaves}_v{self.vec}" + ("_ls" if self.leaf_state else "")


def _store(ptr, offs, mask, val, dtype):
  v = val if dtype == "float32" else f'{val}.to({_TL_DTYPES[dtype]}, fp_downcast_rounding="rtne")'
  return f"tl.store({ptr} + {offs}, {v}, mask={mask})"


def _trace(rule):
  """The rule traced into Triton statements: (emitter, new p, new state, sumsq terms)."""
  em = symbolic.Emitter(TRITON)
  p, g = symbolic.Float("p", em), (symbolic.Float("g", em) if rule.reads_grad else 0.0)
  new_p, new_state, terms = symbolic.trace(
      rule, em, [f"s{i}" for i in range(len(rule.scalars))],
      [f"q{i}" for i in range(len(rule.seg_scalars))], p, g,
      [symbolic.Float(f"st{k}", em) for k in range(rule.n_state)])
  return em, new_p, new_state, terms


def _pointer_selects(sel, k):
  """This program's leaf pointers: for each (variable, the launch's k pointers, needed), a
  branch-free chain of ``tl.where(slot == j, ...)`` selects."""
  out = []
  for var, ptrs, needed in sel:
    if needed:
      out.append(f"{var} = {ptrs[0]}")
      out += [f"{var} = tl.where(slot == {j}, {ptrs[j]}, {var})" for j in range(1, k)]
  return out


def generate(spec: KernelSpec) -> Tuple[str, Tuple[str, ...], Tuple[str, ...]]:
  """(Python source of the ``@triton.jit`` update kernel, input names, output names).

  The rule is traced with ``symbolic.Float`` values; the inputs it never reads are not loaded.
  The flat kernel (``spec.leaves == 0``) addresses one buffer per operand; the leaf-direct one
  (``_UPDATE_LEAVES``) reads and writes the params and grads in the leaves' own buffers
  (``p_in``/``g_in``/``p_out``, chosen per program) and the state in its flat buffers, or, with
  ``spec.leaf_state`` (optax's params-shaped state, ``fusedopt.tx``), in each leaf's own state
  buffers too (``st<i>_in``/``st<i>_out``, chosen the same way, over the leaf's n elements)."""
  rule, k = spec.rule, spec.leaves
  ls = bool(k and spec.leaf_state)
  em, new_p, new_state, terms = _trace(rule)
  n_terms = len(terms)
  if k:
    p_ins, g_ins = [f"P{j}" for j in range(k)], [f"G{j}" for j in range(k)]
    p_outs = [f"P{j}_OUT" for j in range(k)]
    tables = list(TABLES)
    leaf_offs, leaf_mask, st_offs = "offs", "lmask", "base + offs"
    p_ptr, g_ptr, p_out = "p_in", "g_in", "p_out"
  else:
    p_ins, g_ins, p_outs, tables = ["P"], ["G"], ["P_OUT"], []
    leaf_offs, leaf_mask, st_offs = "offs", "mask", "offs"
    p_ptr, g_ptr, p_out = "P", "G", "P_OUT"
  if ls:   # field-major: every leaf's buffer of field 0, then of field 1, ...
    st_ins = [f"ST{i}_{j}" for i in range(rule.n_state) for j in range(k)]
    st_outs = [f"ST{i}_{j}_OUT" for i in range(len(new_state)) for j in range(k)]
    st_offs, st_mask, st_in, st_out = "offs", "lmask", "st{i}_in", "st{i}_out"
  else:
    st_ins = [f"ST{i}" for i in range(rule.n_state)]
    st_outs = [f"ST{i}_OUT" for i in range(len(new_state))]
    st_mask, st_in, st_out = "mask", "ST{i}", "ST{i}_OUT"
  ins = (["S"] + [f"Q{i}" for i in range(len(rule.seg_scalars))] + tables + p_ins
         + (g_ins if rule.reads_grad else []) + st_ins)
  outs = ((p_outs if rule.writes_param else []) + st_outs
          + [f"SUM{t}" for t in range(n_terms)])

  stores = []
  for i, v in enumerate(new_state):
    stores.append(_store(st_out.format(i=i), st_offs, st_mask, em.operand(v),
                         spec.st_dtypes[i]))
  if rule.writes_param:
    stores.append(_store(p_out, leaf_offs, leaf_mask, em.operand(new_p), spec.p_dtype))
  for t, v in enumerate(terms):
    sq = em.operand(v * v)
    if k:   # one sum per row of the program's tile: 0 for rows past the leaf, no garbage
      stores.append(f"tl.store(SUM{t} + prow, tl.where(rmask, tl.sum({sq}, axis=1), 0.0))")
    else:
      stores.append(f"tl.store(SUM{t} + rows, tl.sum({sq}, axis=1), mask=rmask)")

  # Loads of what the body uses, and nothing else.
  text = "\n".join(em.lines + stores)
  used = set(re.findall(r"\b[a-z]+\d*\b", text))
  loads = []
  if k:   # this program's leaf: branch-free selects among the launch's leaf pointers
    sel = [("p_in", p_ins, "p" in used)] + [("g_in", g_ins, rule.reads_grad and "g" in used)]
    sel += [("p_out", p_outs, rule.writes_param)]
    if ls:
      sel += [(f"st{i}_in", [f"ST{i}_{j}" for j in range(k)], f"st{i}" in used)
              for i in range(rule.n_state)]
      sel += [(f"st{i}_out", [f"ST{i}_{j}_OUT" for j in range(k)], True)
              for i in range(len(new_state))]
    loads += _pointer_selects(sel, k)
  loads += [f"{name} = {expr}" for name, expr in em.consts.values()]
  loads += [f"s{i} = tl.load(S + {i})" for i in range(len(rule.scalars)) if f"s{i}" in used]
  q_load = ("tl.load(Q{i} + slot)" if k   # one per leaf, or one per row of the flat buffer
            else "tl.load(Q{i} + rows // ROWS_PER_UNIT, mask=rmask, other=0.0)[:, None]")
  loads += [f"q{i} = " + q_load.format(i=i) for i in range(len(rule.seg_scalars))
            if f"q{i}" in used]
  bufs = [("p", p_ptr, leaf_offs, leaf_mask)]
  bufs += [("g", g_ptr, leaf_offs, leaf_mask)] if rule.reads_grad else []
  bufs += [(f"st{i}", st_in.format(i=i), st_offs, st_mask) for i in range(rule.n_state)]
  loads += [f"{v} = tl.load({ptr} + {offs}, mask={mask}, other=0.0).to(tl.float32)"
            for v, ptr, offs, mask in bufs if v in used]
  indent = lambda xs: "\n".join("    " + x for x in xs) or "    pass"  # noqa: E731
  params = ", ".join(ins + ([] if k else ["N_ROWS"]) + outs)
  what = (f"rule {rule.name!r}, params {spec.p_dtype}, grads {spec.g_dtype}, "
          f"state {', '.join(spec.st_dtypes) or '-'}")
  if k:
    what += f", {k} leaves a launch, sizes multiples of {spec.vec}"
    what += ", per-leaf state" if ls else ""
  src = _HEADER.format(what=what)
  src += (_UPDATE_LEAVES if k else _UPDATE).format(
      name=spec.name, params=params, loads=indent(loads), body=indent(em.lines),
      stores=indent(stores))
  return src, tuple(ins), tuple(outs)


def _source_dir():
  d = os.path.join(os.environ.get("FUSEDOPT_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "fusedopt"), "triton")
  os.makedirs(d, exist_ok=True)
  return d


@functools.lru_cache(maxsize=None)
def _load(src: str, fn_name: str, interpret: bool):
  """The ``@triton.jit`` function ``fn_name`` of ``src``, imported from a file (Triton needs the
  source through ``inspect``). Cached per source; ``interpret`` only keys the cache (the kind of
  function ``triton.jit`` makes is decided by how triton was imported)."""
  del interpret
  key = hashlib.sha256(src.encode()).hexdigest()[:20]
  path = os.path.join(_source_dir(), f"fusedopt_triton_{key}.py")
  with _lock:
    if not os.path.exists(path):
      tmp = f"{path}.{os.getpid()}.tmp"
      with open(tmp, "w") as f:
        f.write(src)
      os.replace(tmp, path)   # atomic: another process never imports a half-written file
    spec = importlib.util.spec_from_file_location(f"fusedopt_triton_{key}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
  kernel = getattr(mod, fn_name)
  _SOURCES[kernel] = (src, fn_name)
  return kernel


_SOURCES = {}   # kernel -> (its source, its name): _without_aliased_outputs rewrites it


@functools.lru_cache(maxsize=None)
def update_kernel(spec: KernelSpec):
  """(the ``@triton.jit`` kernel, input names, output names) for ``spec``."""
  src, ins, outs = generate(spec)
  return _load(src, spec.name, interpreting()), ins, outs


def prepass_leaves_source(k: int) -> str:
  gs = [f"G{j}" for j in range(k)]
  select = ["g_in = G0"] + [f"g_in = tl.where(slot == {j}, G{j}, g_in)" for j in range(1, k)]
  return _HEADER.format(what=f"gradient pre-pass, {k} leaves a launch") + _PREPASS_LEAVES.format(
      name=f"fusedopt_grad_prepass_x{k}", grads=", ".join(gs),
      select="\n".join("    " + x for x in select))


def prepass_kernel_leaves(k: int):
  return _load(prepass_leaves_source(k), f"fusedopt_grad_prepass_x{k}", interpreting())


# ----------------------------------------------------------------------------- launching

def _rows_per_program(tuning: Tuning, c: int, n_rows: int) -> int:
  """R: rows of ``c`` elements per program, ``tuning.block`` elements (a power of two) or no
  more than the ``n_rows`` rows need."""
  block = tuning.block
  if block & (block - 1) or block < 16:
    raise ValueError(f"block={block} must be a power of two >= 16")
  r = max(1, block // c)
  while r > 1 and r // 2 >= n_rows:
    r //= 2
  return r


def _tile(n_rows: int, tuning: Tuning):
  """(R, C): C = min(block, ALIGN) elements per row, R rows per program (a power of two, no more
  than the buffer needs)."""
  c = min(tuning.block, ALIGN)
  return _rows_per_program(tuning, c, n_rows), c


class _NpTensor:
  """The little of a torch tensor that Triton's interpreter reads (pointer, dtype, storage), over
  a C-contiguous numpy array that the kernel reads and writes in place (after
  ../shared/reference/kernel-verification/np_triton_shim.py)."""

  class _Dtype:
    def __init__(self, dt):
      self.name = np.dtype(dt).name

    def __str__(self):             # triton maps "torch.float32" -> fp32, "torch.bfloat16" -> bf16
      return f"torch.{self.name}"
    __repr__ = __str__

  class _Storage:
    def __init__(self, owner):
      self.owner = owner

    def data_ptr(self):
      return self.owner.a.ctypes.data

    def cpu(self):
      return self

    def copy_(self, other):
      del other
      return self

  # One dtype object per dtype, alive for good: Triton's native specialisation caches type names
  # by the dtype object's address (torch dtypes are singletons), so a freed per-tensor dtype
  # object whose address is reused would give a later tensor a stale type.
  _DTYPES = {}

  def __init__(self, a):
    assert a.flags.c_contiguous and a.flags.writeable
    name = np.dtype(a.dtype).name
    self.a = a
    self.dtype = self._DTYPES.setdefault(name, self._Dtype(a.dtype))

  def data_ptr(self):
    return self.a.ctypes.data

  def untyped_storage(self):
    return self._Storage(self)

  def new_empty(self, *_, **__):
    return _NpTensor(self.a)

  def set_(self, storage, offset, size, stride):
    del offset, size, stride
    self.a = storage.owner.a
    return self

  def storage_offset(self):
    return 0

  def size(self):
    return self.a.shape

  def stride(self):
    return tuple(s // self.a.itemsize for s in self.a.strides)

  def copy_(self, other):
    del other
    return self


@functools.lru_cache(maxsize=None)
def _round_bf16_like_the_gpu():
  """Makes Triton's interpreter convert float32 -> bfloat16 to nearest even, as the GPU does.

  Triton lowers a float32 -> bfloat16 ``.to`` (default rounding: to nearest even) to ``fp_trunc``,
  which compiles to ``cvt.rn.bf16.f32``, but the interpreter (3.6-3.9) evaluates it with its
  bit-level ``_convert_float`` and no rounding mode: it *truncates* (0.0314166 -> 0.03125 where
  the GPU gives 0.0314941), one ulp off in about half the stores. Here that one conversion is
  ml_dtypes' round-to-nearest-even (what XLA does too), so interpreted bf16 kernels can be held
  to the oracle bitwise; any other conversion, and an explicit round-toward-zero, are left as
  they were."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel  (a jax dependency)
  from triton.runtime import interpreter  # pylint: disable=import-outside-toplevel
  tl = _triton().language
  original = interpreter._convert_float  # pylint: disable=protected-access
  rtz = interpreter._ir.ROUNDING_MODE.RTZ  # pylint: disable=protected-access

  def convert(data, src, dst, rounding_mode):
    if src == tl.float32 and dst == tl.bfloat16 and rounding_mode != rtz:
      return np.asarray(data, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    return original(data, src, dst, rounding_mode)

  interpreter._convert_float = convert  # pylint: disable=protected-access
  return True


def _launch_numpy(kernel, grid, args, outs_np, consts):
  """Runs an interpreted kernel on host buffers (``args``: numpy arrays or Python scalars)."""
  _round_bf16_like_the_gpu()
  wrapped = [_NpTensor(a) if isinstance(a, np.ndarray) else a for a in args]
  wrapped += [_NpTensor(o) for o in outs_np]
  # XLA:CPU may run two groups' callbacks at once, and the interpreter is not thread-safe (it
  # patches triton.language while a kernel runs): one interpreted kernel at a time.
  with _lock:
    kernel[grid](*wrapped, **consts)


def _new_api(jt) -> bool:
  """Whether jax-triton is 0.4 or later: an aliased output gets no kernel parameter, and
  ``input_output_aliases``/``out_shape`` are deprecated (for ``Ref`` arguments, ``out_type``)."""
  version = tuple(int(x) for x in re.findall(r"\d+", jt.__version__)[:2])
  return version >= (0, 4)


@functools.lru_cache(maxsize=None)
def _without_aliased_outputs(kernel, n_before, aliased):
  """``kernel`` with its aliased output parameters dropped and their stores going to the input
  they alias (jax-triton 0.4's calling convention): ``aliased`` is ((input index, output index), ...),
  an output's parameter index being ``n_before`` (the inputs and the scalars after them) plus
  its index. The source is ``_load``'s, rewritten by names."""
  src, fn_name = _SOURCES[kernel]
  head = re.search(rf"def {fn_name}\(([^)]*)\):", src)
  params = [x.strip() for x in head.group(1).split(",")]
  rename = {params[n_before + j]: params[i] for i, j in aliased}
  kept = ", ".join(x for x in params if x not in rename)
  body = re.sub(r"\b(" + "|".join(map(re.escape, rename)) + r")\b",
                lambda m: rename[m.group(1)], src[head.end():])
  return _load(src[:head.start()] + f"def {fn_name}({kept}):" + body, fn_name, False)


def _call_aliased(jt, kernel, ins, out_shapes, aliases, scalars_after, **kw):
  """``triton_call`` for jax-triton 0.4 on: the kernel without its aliased output parameters
  (0.4 passes an aliased output no pointer: the kernel stores to the input), the outputs in
  ``out_shapes``' order. In place through ``input_output_aliases``, which 0.4 deprecates for
  ``Ref`` arguments; but a ``Ref`` cannot be discharged inside the ``custom_jvp`` the kernel
  calls run in (jax 0.12: "No state discharge rule ... custom_jvp_call"), so the aliases stay,
  their deprecation warning silenced here."""
  pairs = tuple(sorted(aliases.items()))
  if pairs:
    kernel = _without_aliased_outputs(kernel, len(ins) + len(scalars_after), pairs)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "input_output_aliases is deprecated", DeprecationWarning)
    return jt.triton_call(*ins, *scalars_after, kernel=kernel, out_type=list(out_shapes),
                          input_output_aliases=dict(aliases), **kw)


# jax-triton hands the kernels on as PTX (to XLA with 0.4, to jaxlib's launch with 0.3), which
# is compiled there by whatever ptxas XLA finds (or nvJitLink, or the driver), often older than
# Triton's own: Triton 3.9 writes PTX ISA 9.4 for sm_90 (its bundled CUDA 13.4 ptxas), CUDA
# 13.0's ptxas takes up to 9.0 and CUDA 12.x's 8.x ("Unsupported .version"). The kernels use
# nothing newer than the ISA that brought their target, so they are written in that one, which
# every toolchain able to compile for the target accepts: 8.0 (CUDA 12.0) for sm_80 to sm_90a,
# CUDA 12.8's 8.7 for the first Blackwells. A target not listed gets Triton's default.
PTX_FOR_TARGET = {100: 87, 101: 87, 103: 88, 110: 90, 120: 87, 121: 88}
PTX_ENV = "FUSEDOPT_TRITON_PTX_VERSION"   # e.g. 90: the PTX ISA to write instead


def ptx_version(cc: Optional[int]) -> Optional[int]:
  """The PTX ISA version (e.g. 80 = 8.0) the kernels are written in for compute capability
  ``cc`` (``PTX_FOR_TARGET``; ``$FUSEDOPT_TRITON_PTX_VERSION`` overrides), or None: Triton's."""
  env = os.environ.get(PTX_ENV, "").strip()
  if env:
    if not env.isdigit() or not 60 <= int(env) < 200:
      raise ValueError(f"{PTX_ENV}={env!r}: a PTX ISA version as major*10+minor, e.g. 80 or 90")
    return int(env)
  if cc is None:
    return None
  return 80 if cc < 100 else PTX_FOR_TARGET.get(cc)


def xla_ptxas() -> Optional[str]:
  """The ptxas XLA compiles PTX with, looked for where XLA looks: ``--xla_gpu_cuda_data_dir``
  (in ``$XLA_FLAGS``, else jax's CUDA path: the ``nvidia-cuda-nvcc`` wheel), /usr/local/cuda,
  then ``$PATH``; or None."""
  flags = re.search(r"--xla_gpu_cuda_data_dir=(\S+)", os.environ.get("XLA_FLAGS", ""))
  try:
    from jax._src import lib as jax_lib  # pylint: disable=import-outside-toplevel
    jax_cuda = getattr(jax_lib, "cuda_path", None)
  except ImportError:
    jax_cuda = None
  for root in (flags.group(1) if flags else jax_cuda, "/usr/local/cuda"):
    path = os.path.join(root, "bin", "ptxas") if root else None
    if path and os.access(path, os.X_OK):
      return path
  return shutil.which("ptxas")


@functools.lru_cache(maxsize=None)
def ptxas_isa(path: str) -> Optional[int]:
  """The newest PTX ISA (e.g. 90) the ptxas at ``path`` takes, from its CUDA release (Triton's
  table), or None where it does not say."""
  try:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  release = re.search(r"release (\d+)\.(\d+)", out)
  if not release:
    return None
  from triton.backends.nvidia import compiler as nv  # pylint: disable=import-outside-toplevel
  return nv.ptx_get_version(f"{release.group(1)}.{release.group(2)}")


def triton_isa(cc: int) -> Optional[int]:
  """The PTX ISA Triton writes for ``cc`` by default (its own ptxas's; jax-triton 0.3 gives it
  no other), or None where that ptxas does not say."""
  from triton.backends.nvidia import compiler as nv  # pylint: disable=import-outside-toplevel
  return ptxas_isa(nv.get_ptxas(cc).path)


def ptx_mismatch(cc: Optional[int]) -> Optional[str]:
  """Why XLA's ptxas would reject what jax-triton 0.3 hands it for ``cc`` (Triton's default PTX
  ISA, newer than that ptxas takes), with the fix; or None (fine, or unknown)."""
  xla = xla_ptxas()
  if cc is None or xla is None:
    return None
  ours, theirs = triton_isa(cc), ptxas_isa(xla)
  if ours is None or theirs is None or ours <= theirs:
    return None
  isa = lambda v: f"{v // 10}.{v % 10}"  # noqa: E731
  fix = f" (with jax>=0.11; fusedopt then writes ISA {isa(ptx_version(cc))})" if ptx_version(
      cc) else " (with jax>=0.11)"
  return (f"jax-triton 0.3 hands XLA Triton's PTX for sm_{cc} in ISA {isa(ours)}, which the "
          f"ptxas XLA uses ({xla}: ISA {isa(theirs)}) rejects ('Unsupported .version'). Install "
          f"jax-triton>=0.4{fix}, or point Triton at that ptxas: TRITON_PTXAS_PATH={xla} "
          f"TRITON_PTXAS_BLACKWELL_PATH={xla}")


_MISMATCH_WARNED = set()


def _call(kernel, ins, out_shapes, aliases, scalars_after, grid, consts, tuning, plat, name):
  """One kernel call over jax arrays: jax-triton on a GPU, the interpreter via a host callback."""
  if plat == "gpu":
    jt = _jax_triton()
    cc = common.compute_capability()
    kw = dict(grid=grid, name=name, num_warps=tuning.num_warps, num_stages=tuning.num_stages,
              enable_fp_fusion=False, **({"compute_capability": cc} if cc else {}), **consts)
    if _new_api(jt):   # compile options as backend options: a keyword would be a metaparam
      ptx = ptx_version(common.device_compute_capability())
      kw["backend_options"] = {"enable_fp_fusion": kw.pop("enable_fp_fusion"),
                               **({"ptx_version": ptx} if ptx else {})}
      return _call_aliased(jt, kernel, ins, out_shapes, aliases, scalars_after, **kw)
    # jax-triton 0.3 takes no PTX version: say so where XLA's ptxas here will reject Triton's
    # (once; not for an ahead-of-time compile, which 0.3 leaves to the machine that runs it)
    why = None if common.targeted() else ptx_mismatch(common.device_compute_capability())
    if why and why not in _MISMATCH_WARNED:
      _MISMATCH_WARNED.add(why)
      warnings.warn(why, RuntimeWarning, stacklevel=2)
    return jt.triton_call(*ins, *scalars_after, kernel=kernel, out_shape=out_shapes,
                          input_output_aliases=aliases, **kw)
  if not interpreting():
    raise TritonUnavailable(
        "Triton interpret mode needs TRITON_INTERPRET=1 in the environment before triton is "
        "imported (e.g. `TRITON_INTERPRET=1 python ...`)")

  parts = [_callback_parts(x) for x in ins]

  def host(*flat):
    arrays, i = [], 0
    for x, ps in zip(ins, parts):
      got = [np.asarray(a) for a in flat[i:i + len(ps)]]
      i += len(ps)
      arrays.append(np.ascontiguousarray(np.array(got[0]) if len(got) == 1
                                         else np.concatenate(got)).reshape(x.shape))
    outs_np = []
    for j, o in enumerate(out_shapes):
      src = next((i for i, oj in aliases.items() if oj == j), None)
      outs_np.append(arrays[src].copy() if src is not None else np.zeros(o.shape, o.dtype))
    _launch_numpy(kernel, grid, list(arrays) + list(scalars_after), outs_np, consts)
    return tuple(outs_np)
  return list(jax.pure_callback(host, tuple(out_shapes), *[q for ps in parts for q in ps]))


# With jaxlib 0.10, a callback in the programs of several host devices hangs when an operand is
# larger than about 100 KB: each device thread waits for the copy of its operands onto cpu:0
# (the callback's device_put), which never completes, as if it were queued on the thread pool
# whose threads are all inside callbacks. 2 cores, a shard_map of one callback per device on 4
# host devices: parts of 128 KB hung 6 runs in 6, of 96 KB 0 in 6; jaxlib 0.12 never hung.
# So operands pass in parts small enough (docs/verification.md, T1). Results return whole (no
# hang was seen from them: 128 KB ones in the sharded int8 case).
_CALLBACK_PART_BYTES = 1 << 16


def _callback_parts(x):
  """``x`` as one or more flat operands of at most ``_CALLBACK_PART_BYTES`` each."""
  n = max(1, _CALLBACK_PART_BYTES // np.dtype(x.dtype).itemsize)
  if x.size <= n:
    return [x]
  flat = x.reshape(-1)
  return [flat[i:i + n] for i in range(0, x.size, n)]


def flat_update(rule, scalars, seg_units, p, g, state, *, platform=None, tuning=None):
  """Runs ``rule`` over flat buffers with one Triton kernel.

  Args:
    rule: a ``fusedopt.elementwise.Rule``.
    scalars: name -> float32 scalar (traced values welcome) for ``rule.scalars``.
    seg_units: name -> float32 [n // ALIGN], the per-segment scalar of each alignment unit.
    p, g: 1-D buffers of n elements, n a multiple of ALIGN; ``g`` None for a rule not reading it.
    state: ``rule.n_state`` 1-D buffers of n elements.
    platform: "gpu" (jax-triton) or "interpret" (Triton's interpreter, CPU); default: jax's.
    tuning: a ``Tuning`` overriding ``DEFAULT_TUNING``.
  Returns:
    (new p or None, tuple of new state, tuple of float32 [n // ALIGN] per-unit sums of squares of
    ``rule.sumsq``'s terms or None) -- the contract of ``fusedopt.kernels.pallas.flat_update``.
  """
  plat = _platform(platform)
  n = p.shape[0]
  common.check_flat_buffers(rule, p, g, state, ALIGN)
  for x in (p, g) + tuple(state):
    if x is not None and not supports(x.dtype):
      raise ValueError(f"no Triton kernel for buffers of dtype {np.dtype(x.dtype).name}")
  n_sums = elementwise.num_sumsq_terms(rule)
  if n == 0:
    return ((p if rule.writes_param else None), tuple(state),
            tuple(jnp.zeros((0,), F32) for _ in range(n_sums)) if rule.sumsq else None)
  tuning = tuning or default_tuning(rule, p.dtype, plat)

  spec = KernelSpec(rule, np.dtype(p.dtype).name,
                    np.dtype(g.dtype).name if rule.reads_grad else None,
                    tuple(np.dtype(x.dtype).name for x in state))
  kernel, in_names, _ = update_kernel(spec)
  r, c = _tile(n // min(tuning.block, ALIGN), tuning)
  n_rows = n // c
  s_vec = jnp.stack([jnp.asarray(scalars[k], F32) for k in rule.scalars]
                    or [jnp.zeros((), F32)])
  ins = [s_vec] + [jnp.asarray(seg_units[k], F32) for k in rule.seg_scalars] + [p]
  ins += ([g] if rule.reads_grad else []) + list(state)
  assert len(ins) == len(in_names)
  first_state = len(ins) - rule.n_state
  out_shapes, aliases = [], {}
  if rule.writes_param:
    if rule.param_in_place:
      aliases[in_names.index("P")] = 0
    out_shapes.append(jax.ShapeDtypeStruct(p.shape, p.dtype))
  if rule.writes_state:
    for j, x in enumerate(state):
      aliases[first_state + j] = len(out_shapes)
      out_shapes.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
  n_big = len(out_shapes)
  out_shapes += [jax.ShapeDtypeStruct((n_rows,), F32)] * n_sums
  outs = _call(kernel, ins, out_shapes, aliases, [n_rows], (pl_cdiv(n_rows, r),),
               {"R": r, "C": c, "ROWS_PER_UNIT": ALIGN // c}, tuning, plat, spec.name)
  big = list(outs[:n_big])
  new_p = big.pop(0) if rule.writes_param else None
  new_state = tuple(big) if rule.writes_state else tuple(state)
  sums = None
  if rule.sumsq is not None:
    units = n // ALIGN
    sums = tuple(o.reshape(units, ALIGN // c).sum(axis=1) if c < ALIGN else o
                 for o in outs[n_big:])
  return new_p, new_state, sums


def pl_cdiv(a, b):
  return -(-a // b)


def bytes_per_element(rule, p_dtype=F32, g_dtype=F32, state_dtype=F32) -> int:
  """HBM traffic of one ``flat_update`` per parameter: the buffers the generated kernel loads
  (inputs the rule never reads are skipped) plus those it stores."""
  spec = KernelSpec(rule, np.dtype(p_dtype).name,
                    np.dtype(g_dtype).name if rule.reads_grad else None,
                    (np.dtype(state_dtype).name,) * rule.n_state)
  src, _, _ = generate(spec)
  loads = set(re.findall(r"^    (\w+) = tl\.load", src, re.M))
  return common.bytes_per_element(rule, p_dtype, g_dtype, state_dtype, loads=loads)


# ----------------------------------------------------------------------------- group executor

# The host-built int32 tables of a leaf-direct kernel, in argument order (see _UPDATE_LEAVES).
TABLES = ("SLOT", "CHUNK", "NROWS", "PADV", "ROW0")

# Leaves per leaf-direct launch. Each leaf costs three pointer parameters (params, grads, the
# params written), 8 bytes each: 64 leaves stay well inside CUDA's 4 KB of kernel parameters,
# and a model needs at most two kernel variants per (rule, dtypes, vector width): one for full
# launches, one for the last.
LEAVES_PER_LAUNCH = 64
# The narrowest row of a leaf-direct tile: the alignment a layout needs for the leaf-direct
# kernels (rows of min(block, ALIGN, the largest power of two dividing align) elements). 2000 leaves of 5K-15K elements are aligned
# to 256 (padding to 1024 would cost over 1%); smaller alignments run on jnp.
MIN_ROW = 128
# With per-leaf state each leaf adds two pointers per state field: launches take fewer leaves so
# that a kernel's pointer parameters stay within ``_PARAM_POINTERS`` (4 KB less room for the
# scalars and tables).
_PARAM_POINTERS = (4096 - 256) // 8


def leaves_per_launch(rule, leaf_state: bool) -> int:
  """Leaves per launch for ``rule``: ``LEAVES_PER_LAUNCH``, fewer where per-leaf state pointers
  would exceed the kernel-parameter budget."""
  if not leaf_state:
    return LEAVES_PER_LAUNCH
  per_leaf = 3 + 2 * rule.n_state   # param in and out, grad, each state field in and out
  return max(1, min(LEAVES_PER_LAUNCH, _PARAM_POINTERS // per_leaf))


@dataclasses.dataclass(frozen=True)
class _Launch:
  """One leaf-direct launch: ``positions`` (indices into the group's segments), their vector
  width ``vec``, the tile (``r`` rows of ``c`` elements), and the host tables of the kernel."""
  positions: Tuple[int, ...]
  vec: int
  r: int
  c: int
  programs: Tuple[int, ...]         # programs per leaf
  tables: Tuple[np.ndarray, ...]    # int32 ``TABLES``: SLOT, CHUNK (per program), NROWS, PADV, ROW0

  @property
  def grid(self):
    return (int(sum(self.programs)),)

  def row_ids(self):
    """The group position owning each row of the per-program-row outputs (sorted)."""
    return np.repeat(np.asarray(self.positions, np.int32),
                     np.asarray(self.programs, np.int64) * self.r)


def _vector_width(dtypes) -> int:
  """Elements in 16 bytes of the narrowest of ``dtypes``."""
  return 16 // min(np.dtype(d).itemsize for d in dtypes)


def plan_launches(layout, gi, tuning: Tuning, leaf_dtypes=None, leaves_per_launch=None,
                  row=None):
  """The leaf-direct launches over group ``gi``'s non-empty leaves.

  ``leaf_dtypes[j]``: the dtypes of the leaf buffers the kernel reads or writes for the group's
  j-th leaf (default: the group's dtype). Leaves launched together have the same ones (one
  pointer type per argument) and the same vector width: the largest power of two dividing the
  leaf's size, up to 16 bytes of its narrowest buffer. In group order within a launch,
  ``leaves_per_launch`` (default ``LEAVES_PER_LAUNCH``) at most. Rows of ``min(block, ALIGN,
  the largest power of two dividing layout.align)`` elements over each leaf's padded segment: a
  layout of many small leaves is aligned to less than ``ALIGN`` (``layout.choose_align``), down
  to ``MIN_ROW``; a hand-made one may be aligned to a non-power of two (1536). ``row``: rows
  of that many elements over each leaf's size rounded up to ``row`` (quantized state: a row per
  block) instead."""
  per_launch = leaves_per_launch or LEAVES_PER_LAUNCH
  group = layout.groups[gi]
  widest = min(ALIGN, layout.align & -layout.align)   # a power of two dividing every offset
  c = row or min(tuning.block, widest)
  unit = row or layout.align
  if row and any(layout.segments[i].offset % row for i in group.segments):
    raise ValueError(f"rows of {row} elements need segments starting on multiples of {row}")
  if not row and widest < MIN_ROW:
    raise ValueError(f"the triton backend needs a layout aligned to a multiple of {MIN_ROW} "
                     f"elements (rows of a tile); this one has align={layout.align}")
  classes = {}
  for pos, i in enumerate(group.segments):
    size = layout.segments[i].size
    if size:
      dts = tuple(np.dtype(d).name for d in (leaf_dtypes[pos] if leaf_dtypes else (group.dtype,)))
      vec = int(np.gcd(size, _vector_width(dts)))
      classes.setdefault((-vec, dts), []).append(pos)
  out = []
  for (neg_vec, _), members in sorted(classes.items()):
    for s in range(0, len(members), per_launch):
      pos = tuple(members[s:s + per_launch])
      segs = [layout.segments[group.segments[j]] for j in pos]
      nrows = np.asarray([-(-seg.size // unit) * unit // c for seg in segs], np.int64)
      r = _rows_per_program(tuning, c, int(nrows.max()))
      programs = -(-nrows // r)
      vec = -neg_vec
      tables = (np.repeat(np.arange(len(pos)), programs), np.concatenate(
          [np.arange(k) for k in programs]), nrows, (nrows * c - [s.size for s in segs]) // vec,
                np.asarray([seg.offset // c for seg in segs], np.int64))
      if max(int(t.max()) for t in tables) > np.iinfo(np.int32).max:
        raise ValueError(f"a leaf-direct launch table overflows int32 (rows of {c} elements)")
      out.append(_Launch(pos, vec, r, c, tuple(int(k) for k in programs),
                         tuple(t.astype(np.int32) for t in tables)))
  return out


def _group_grads(layout, gi, g_leaves):
  """The group's gradient leaves, each flattened and (where no kernel reads its dtype) float32."""
  out = []
  for i in layout.groups[gi].segments:
    g = jnp.reshape(g_leaves[i], (-1,))
    out.append(g if supports(g.dtype) else g.astype(F32))
  return out


def _param_outputs(rule, layout, gi, launch, first_p):
  """The leaf-direct launch's first outputs, its leaves' new params (flat), and their aliases
  to the param inputs (from index ``first_p``) where the rule writes them in place."""
  group = layout.groups[gi]
  out_shapes, aliases = [], {}
  if rule.writes_param:
    for j, pos in enumerate(launch.positions):
      if rule.param_in_place:
        aliases[first_p + j] = len(out_shapes)
      out_shapes.append(jax.ShapeDtypeStruct((layout.segments[group.segments[pos]].size,),
                                             group.dtype))
  return out_shapes, aliases


def run(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state, *, platform=None,
        tuning=None, leaf_state=False):
  """The ``triton`` backend's ``Backend.run_group``: leaf-direct kernels (``_UPDATE_LEAVES``) that
  read the params and grads in their own buffers and write the params in place -- no packed copy
  of either, so a step moves the rule's bytes per parameter and nothing more -- and update the
  flat state in place. ``leaf_state`` (``Backend.run_leaves``): ``state`` per field the group's
  own state leaves, each read and written by its address in the same pass (aliased in place),
  as apex's multi_tensor_apply takes per-tensor state lists."""
  plat = _platform(platform)
  group = layout.groups[gi]
  state = tuple(tuple(f) for f in state) if leaf_state else tuple(state)
  for x in (x for f in state for x in f) if leaf_state else state:
    if not supports(x.dtype):
      raise ValueError(f"no Triton kernel for state of dtype {np.dtype(x.dtype).name}")
  n_sums = elementwise.num_sumsq_terms(rule) if rule.sumsq is not None else 0
  new_p = [p_leaves[i] for i in group.segments]
  sums = [jnp.zeros((len(group.segments),), F32) for _ in range(n_sums)]
  grads = _group_grads(layout, gi, g_leaves) if rule.reads_grad else None
  tuning = tuning or default_tuning(rule, group.dtype, plat)
  leaf_dtypes = [(group.dtype,) + ((grads[j].dtype,) if grads else ())
                 + (tuple(f[j].dtype for f in state) if leaf_state else ())
                 for j in range(len(group.segments))]
  s_vec = jnp.stack([jnp.asarray(scalars[k], F32) for k in rule.scalars]
                    or [jnp.zeros((), F32)])
  new_state = [list(f) for f in state] if leaf_state else None
  for launch in plan_launches(layout, gi, tuning, leaf_dtypes,
                              leaves_per_launch(rule, leaf_state)):
    k, leaf_ids = len(launch.positions), [group.segments[j] for j in launch.positions]
    first = launch.positions[0]
    st_names = tuple(np.dtype(f[first].dtype if leaf_state else f.dtype).name for f in state)
    spec = KernelSpec(rule, np.dtype(group.dtype).name,
                      np.dtype(grads[first].dtype).name if grads else None,
                      st_names, leaves=k, vec=launch.vec, leaf_state=leaf_state)
    kernel, in_names, _ = update_kernel(spec)
    ins = [s_vec] + [jnp.asarray(seg[q], F32)[np.asarray(leaf_ids)] for q in rule.seg_scalars]
    ins += [jnp.asarray(t) for t in launch.tables]
    ins += [jnp.reshape(new_p[j], (-1,)) for j in launch.positions]
    ins += [grads[j] for j in launch.positions] if rule.reads_grad else []
    if leaf_state:   # field-major, as the kernel's parameters
      st_ins = [jnp.reshape(new_state[f][j], (-1,)) for f in range(rule.n_state)
                for j in launch.positions]
    else:
      st_ins = list(state)
    ins += st_ins
    assert len(ins) == len(in_names)
    first_state = len(ins) - len(st_ins)
    out_shapes, aliases = _param_outputs(rule, layout, gi, launch, in_names.index("P0"))
    if rule.writes_state:
      for j, x in enumerate(st_ins):
        aliases[first_state + j] = len(out_shapes)
        out_shapes.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
    n_p, n_big = (k if rule.writes_param else 0), len(out_shapes)
    out_shapes += [jax.ShapeDtypeStruct((launch.grid[0] * launch.r,), F32)] * n_sums
    outs = _call(kernel, ins, out_shapes, aliases, [], launch.grid,
                 {"R": launch.r, "C": launch.c, "VEC": launch.vec}, tuning, plat, spec.name)
    for pos, x in zip(launch.positions, outs[:n_p]):
      new_p[pos] = x.reshape(layout.segments[group.segments[pos]].shape)
    if rule.writes_state and leaf_state:
      for f in range(rule.n_state):
        for j, pos in enumerate(launch.positions):
          new_state[f][pos] = outs[n_p + f * k + j].reshape(state[f][pos].shape)
    elif rule.writes_state:
      state = tuple(outs[n_p:n_big])
    ids = jnp.asarray(launch.row_ids())
    sums = [acc + jax.ops.segment_sum(x, ids, num_segments=len(group.segments),
                                      indices_are_sorted=True)
            for acc, x in zip(sums, outs[n_big:])]
  if leaf_state:
    state = tuple(tuple(f) for f in new_state)
  return (new_p if rule.writes_param else None), state, (tuple(sums) if n_sums else None)


# ----------------------------------------------------------------------------- quantized state

# The leaf-direct update over state whose fields may be quantized (``fusedopt.quantization``):
# rows of C = 256 elements, one quantization block each, so a block's absmax is a row's max. A
# quantized field k arrives as its codes (uint8, the group's flat buffer), its scales (float32,
# one per block), the format's 256-entry table MAPk and, for the dynamic maps, its bucket table
# BKTk (``quantization.bucket_table``): decode is a gather from MAPk times the row's scale; the
# new values' row absmax gives the new scale; encode is a gather from BKTk and integer compares
# (e4m3: integer rounding). A leaf is run over its blocks -- its size rounded up to 256, padding
# read as zero, as the flat buffers hold it -- like the native kernel.
_UPDATE_QUANTIZED = _LEAF_PROLOGUE + """    srow = row0 + lrows
{loads}
{body}
{stores}
"""


def _encode_lines(k, fmt, y, guarded):
  """Triton statements storing field ``k``'s new values ``y`` ([R, C] float32) as codes and
  scales (``guarded``: keep the old ones where the checked step's ``ok`` is false): the native
  encoder, line for line."""
  u32 = lambda v: f"tl.full([], {v:#x}, tl.uint32)"  # noqa: E731
  fmax = _float_lit(float(fmt.fmax))
  lines = [
      f"am{k} = tl.max(tl.abs({y}), axis=1)",
      f"bad{k} = tl.max(tl.where({y} != {y}, 1, 0), axis=1)",
      f"am{k} = tl.where(bad{k} > 0, float('nan'), am{k})",
      f"inv{k} = tl.where(am{k} > 0.0, tl.div_rn(tl.full([], {fmax}, tl.float32), am{k}), 0.0)",
      f"zu{k} = ({y} * inv{k}[:, None]).to(tl.uint32, bitcast=True)",
      f"za{k} = zu{k} & {u32(0x7fffffff)}",
      # jnp.clip(y, -fmax, fmax) on the magnitude's bits; NaN stays NaN
      f"za{k} = tl.where(za{k} > {u32(0x7f800000)}, za{k}, "
      f"tl.minimum(za{k}, {u32(int(np.float32(fmt.fmax).view(np.uint32)))}))",
      f"zu{k} = (zu{k} & {u32(0x80000000)}) | za{k}"]
  if fmt.is_fp8:
    lines += [
        f"nrm{k} = ((za{k} + {u32(0x7ffff)} + ((za{k} >> 20) & {u32(1)})) >> 20) - {u32(960)}",
        f"sx{k} = za{k}.to(tl.float32, bitcast=True) * 512.0",
        f"sub{k} = ((sx{k} + 8388608.0) - 8388608.0).to(tl.uint32)",
        f"code{k} = ((zu{k} >> 24) & {u32(0x80)}) | tl.where(za{k} > {u32(0x7f800000)}, "
        f"{u32(0x7f)}, tl.where(za{k} >= {u32(0x3c800000)}, nrm{k}, sub{k}))",
        f"scale{k} = am{k} * {_float_lit(float(np.float32(1.0 / fmt.fmax)))}"]
  else:
    nb, lo = quantization.NUM_BUCKETS, quantization.BUCKET_EXPONENT * 128
    lines += [
        f"bk{k} = tl.minimum(tl.maximum((za{k} >> 16).to(tl.int32) - {lo}, -1), {nb})",
        f"e{k} = tl.load(BKT{k} + ((zu{k} >> 31).to(tl.int32) * {nb + 2} + bk{k} + 1))"
        f".to(tl.uint32, bitcast=True)",
        f"code{k} = (e{k} & {u32(0xff)}) + (((zu{k} & {u32(0xffff)}) >= (e{k} >> 9))"
        f".to(tl.uint32) ^ ((e{k} >> 8) & {u32(1)}))",
        f"scale{k} = am{k}"]
  lines.append(f"code{k} = code{k}.to(tl.int32)")
  if guarded:
    lines += [f"code{k} = tl.where(ok, code{k}, cd{k})",
              f"scale{k} = tl.where(ok, scale{k}, sc{k})"]
  lines += [
      f"tl.store(CODES{k}_OUT + base + offs, code{k}.to(tl.uint8), mask=mask)",
      f"tl.store(SCALES{k}_OUT + srow, scale{k}, mask=rmask)"]
  return lines


@dataclasses.dataclass(frozen=True)
class QuantizedKernelSpec:
  """A leaf-direct update kernel over state fields stored as ``kinds`` (a float dtype name, or a
  ``quantization.Format`` name)."""
  rule: elementwise.Rule
  p_dtype: str
  g_dtype: Optional[str]
  kinds: Tuple[str, ...]
  leaves: int
  vec: int

  @property
  def name(self):
    return (f"fusedopt_q_{re.sub(chr(92) + 'W', '_', self.rule.name)}_x{self.leaves}"
            f"_v{self.vec}")


def generate_quantized(spec: QuantizedKernelSpec):
  """(Python source of the ``@triton.jit`` kernel, input names, output names) of
  ``_UPDATE_QUANTIZED`` for ``spec``: the rule traced as for ``generate``, quantized fields
  decoded after their loads and encoded before their stores (``_encode_lines``); a field the rule
  passes through is not stored; per-row sums of ``rule.sumsq``'s terms over the state as stored
  (decoded again)."""
  rule, k = spec.rule, spec.leaves
  fmts = [quantization.FORMATS.get(kind) for kind in spec.kinds]
  em = symbolic.Emitter(TRITON)
  p, g = symbolic.Float("p", em), (symbolic.Float("g", em) if rule.reads_grad else 0.0)
  st = [symbolic.Float(f"st{i}", em) for i in range(rule.n_state)]
  scal = [f"s{i}" for i in range(len(rule.scalars))]
  segs = [f"q{i}" for i in range(len(rule.seg_scalars))]
  new_p, new_state, _ = symbolic.trace(dataclasses.replace(rule, sumsq=None), em, scal, segs,
                                       p, g, st)
  stored = [i for i in range(rule.n_state) if rule.writes_state and new_state[i] is not st[i]]
  p_ins, g_ins, p_outs = ([f"P{j}" for j in range(k)], [f"G{j}" for j in range(k)],
                          [f"P{j}_OUT" for j in range(k)])
  st_ins, st_outs = [], []
  for i, f in enumerate(fmts):
    if f is None:
      st_ins.append(f"ST{i}")
      st_outs.append(f"ST{i}_OUT")
    else:
      st_ins += [f"CODES{i}", f"SCALES{i}", f"MAP{i}"] + ([] if f.is_fp8 else [f"BKT{i}"])
      st_outs += [f"CODES{i}_OUT", f"SCALES{i}_OUT"]
  n_terms = elementwise.num_sumsq_terms(rule)
  ins = (["S"] + [f"Q{i}" for i in range(len(rule.seg_scalars))] + list(TABLES) + p_ins
         + (g_ins if rule.reads_grad else []) + st_ins)
  outs = ((p_outs if rule.writes_param else []) + (st_outs if rule.writes_state else [])
          + [f"SUM{t}" for t in range(n_terms)])
  stores = []
  for i in stored:
    v = em.operand(new_state[i])
    if fmts[i] is None:
      stores.append(_store(f"ST{i}_OUT", "base + offs", "mask", v, spec.kinds[i]))
    else:
      stores += _encode_lines(i, fmts[i], v, "ok" in rule.scalars)
  if rule.writes_param:
    stores.append(_store("p_out", "offs", "lmask", em.operand(new_p), spec.p_dtype))
  if n_terms:   # the sums over the state as stored: what the next stage reads
    em2 = symbolic.Emitter(TRITON, prefix="u")
    values = []
    for i, f in enumerate(fmts):
      if i not in stored:        # as loaded (decoded)
        values.append(symbolic.Float(f"st{i}", em2))
      elif f is not None:        # the new codes decoded again
        values.append(em2.new(f"tl.load(MAP{i} + code{i}) * scale{i}[:, None]"))
      elif spec.kinds[i] != "float32":   # the value rounded to its storage dtype
        values.append(em2.new(f"{em.operand(new_state[i])}.to({_TL_DTYPES[spec.kinds[i]]}, "
                              'fp_downcast_rounding="rtne").to(tl.float32)'))
      else:
        values.append(symbolic.Float(em.operand(new_state[i]), em2))
    terms = symbolic.trace_terms(rule, em2, scal, segs, symbolic.Float("p", em2),
                                 symbolic.Float("g", em2) if rule.reads_grad else 0.0, values)
    squares = [em2.operand(v * v) for v in terms]
    stores += [f"{name} = {expr}" for name, expr in em2.consts.values()] + em2.lines
    stores += [f"tl.store(SUM{t} + prow, tl.where(rmask, tl.sum({sq}, axis=1), 0.0))"
               for t, sq in enumerate(squares)]
  text = "\n".join(em.lines + stores)
  used = set(re.findall(r"\b[a-z]+\d*\b", text))
  loads = []
  sel = [("p_in", p_ins, "p" in used), ("g_in", g_ins, rule.reads_grad and "g" in used),
         ("p_out", p_outs, rule.writes_param)]
  loads += _pointer_selects(sel, k)
  loads += [f"{name} = {expr}" for name, expr in em.consts.values()]
  loads += [f"s{i} = tl.load(S + {i})" for i in range(len(rule.scalars)) if f"s{i}" in used]
  loads += [f"q{i} = tl.load(Q{i} + slot)" for i in range(len(rule.seg_scalars))
            if f"q{i}" in used]
  if "ok" in rule.scalars:
    loads.append(f"ok = tl.load(S + {rule.scalars.index('ok')}) != 0.0")
  loads.append("p = tl.load(p_in + offs, mask=lmask, other=0.0).to(tl.float32)"
               if "p" in used else "")
  if rule.reads_grad and "g" in used:
    loads.append("g = tl.load(g_in + offs, mask=lmask, other=0.0).to(tl.float32)")
  for i, f in enumerate(fmts):
    if f is None:
      loads.append(f"st{i} = tl.load(ST{i} + base + offs, mask=mask, other=0.0).to(tl.float32)")
    else:
      loads += [f"cd{i} = tl.load(CODES{i} + base + offs, mask=mask, other=0).to(tl.int32)",
                f"sc{i} = tl.load(SCALES{i} + srow, mask=rmask, other=0.0)",
                f"st{i} = tl.load(MAP{i} + cd{i}) * sc{i}[:, None]"]
  loads = [x for x in loads if x]
  indent = lambda xs: "\n".join("    " + x for x in xs) or "    pass"  # noqa: E731
  what = (f"rule {rule.name!r}, params {spec.p_dtype}, grads {spec.g_dtype}, "
          f"state {', '.join(spec.kinds)}, {k} leaves a launch, sizes multiples of {spec.vec}")
  src = _HEADER.format(what=what) + _UPDATE_QUANTIZED.format(
      name=spec.name, params=", ".join(ins + outs), loads=indent(loads),
      body=indent(em.lines), stores=indent(stores))
  return src, tuple(ins), tuple(outs)


@functools.lru_cache(maxsize=None)
def quantized_kernel(spec: QuantizedKernelSpec):
  src, ins, outs = generate_quantized(spec)
  return _load(src, spec.name, interpreting()), ins, outs


@functools.lru_cache(maxsize=None)
def _format_tables(fmt):
  """The decode table (float32 [256]) and, for the dynamic maps, the bucket table (int32) of
  ``fmt``, as NumPy arrays (jax constants where a kernel takes them)."""
  if fmt.is_fp8:
    return np.arange(256, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float32), None
  signed = fmt.name == "int8_signed"   # (by name: a pickled or copied Format is another object)
  return quantization.dynamic_map(signed), quantization.bucket_table(signed)


def run_quantized(rule, scalars, seg, layout, gi, p_leaves, g_leaves, state, *, platform=None,
                  tuning=None):
  """``Backend.run_quantized``: leaf-direct kernels (``_UPDATE_QUANTIZED``) over a group whose
  state fields may be ``quantization.QuantizedArray``s: params and grads read in their own
  buffers, codes, scales and float fields updated in place in the group's flat buffers, one
  pass per block of 256."""
  plat = _platform(platform)
  group = layout.groups[gi]
  state = tuple(state)
  for x in state:
    if quantization.is_quantized(x):
      if x.block != quantization.BLOCK:
        raise ValueError(f"the Triton kernels quantize in blocks of {quantization.BLOCK}")
    elif not supports(x.dtype):
      raise ValueError(f"no Triton kernel for state of dtype {np.dtype(x.dtype).name}")
  kinds = tuple(x.fmt.name if quantization.is_quantized(x) else np.dtype(x.dtype).name
                for x in state)
  n_sums = elementwise.num_sumsq_terms(rule) if rule.sumsq is not None else 0
  new_p = [p_leaves[i] for i in group.segments]
  sums = [jnp.zeros((len(group.segments),), F32) for _ in range(n_sums)]
  grads = _group_grads(layout, gi, g_leaves) if rule.reads_grad else None
  tuning = tuning or default_tuning(rule, group.dtype, plat)
  leaf_dtypes = [(group.dtype,) + ((grads[j].dtype,) if grads else ())
                 for j in range(len(group.segments))]
  s_vec = jnp.stack([jnp.asarray(scalars[k], F32) for k in rule.scalars]
                    or [jnp.zeros((), F32)])
  for launch in plan_launches(layout, gi, tuning, leaf_dtypes, row=quantization.BLOCK):
    k, leaf_ids = len(launch.positions), [group.segments[j] for j in launch.positions]
    first = launch.positions[0]
    spec = QuantizedKernelSpec(rule, np.dtype(group.dtype).name,
                               np.dtype(grads[first].dtype).name if grads else None, kinds,
                               leaves=k, vec=launch.vec)
    kernel, in_names, _ = quantized_kernel(spec)
    ins = [s_vec] + [jnp.asarray(seg[q], F32)[np.asarray(leaf_ids)] for q in rule.seg_scalars]
    ins += [jnp.asarray(t) for t in launch.tables]
    ins += [jnp.reshape(new_p[j], (-1,)) for j in launch.positions]
    ins += [grads[j] for j in launch.positions] if rule.reads_grad else []
    written = []   # (input index, array) of every state buffer the kernel writes
    for x in state:
      if quantization.is_quantized(x):
        table, buckets = _format_tables(x.fmt)
        written += [(len(ins), x.codes), (len(ins) + 1, x.scales)]
        ins += [x.codes, x.scales, jnp.asarray(table)]
        ins += [] if buckets is None else [jnp.asarray(buckets)]
      else:
        written.append((len(ins), x))
        ins.append(x)
    assert len(ins) == len(in_names)
    out_shapes, aliases = _param_outputs(rule, layout, gi, launch, in_names.index("P0"))
    if rule.writes_state:
      for idx, x in written:
        aliases[idx] = len(out_shapes)
        out_shapes.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
    n_p, n_big = (k if rule.writes_param else 0), len(out_shapes)
    out_shapes += [jax.ShapeDtypeStruct((launch.grid[0] * launch.r,), F32)] * n_sums
    outs = _call(kernel, ins, out_shapes, aliases, [], launch.grid,
                 {"R": launch.r, "C": launch.c, "VEC": launch.vec}, tuning, plat, spec.name)
    for pos, x in zip(launch.positions, outs[:n_p]):
      new_p[pos] = x.reshape(layout.segments[group.segments[pos]].shape)
    if rule.writes_state:   # the next launch reads this one's buffers
      new_bufs = iter(outs[n_p:n_big])
      state = tuple(quantization.QuantizedArray(next(new_bufs), next(new_bufs), x.fmt, x.block)
                    if quantization.is_quantized(x) else next(new_bufs) for x in state)
    ids = jnp.asarray(launch.row_ids())
    sums = [acc + jax.ops.segment_sum(x, ids, num_segments=len(group.segments),
                                      indices_are_sorted=True)
            for acc, x in zip(sums, outs[n_big:])]
  return (new_p if rule.writes_param else None), state, (tuple(sums) if n_sums else None)


def gradient_prepass(layout, g_leaves, grad_scale=None, clip_global_norm=None, *, platform=None):
  """``fusedopt.norms.gradient_prepass`` with the work in leaf-direct Triton kernels
  (``_PREPASS_LEAVES``: each program's sum of (scale*g)^2 and count of non-finite values, read
  from the gradient leaves themselves) and the per-program partial results reduced in XLA.
  Returns (all finite, global norm, g factor)."""
  plat = _platform(platform)
  scale = F32(1.0) if grad_scale is None else jnp.asarray(grad_scale, F32)
  s_vec = jnp.reshape(scale, (1,))
  sq, bad = [], []
  for gi, group in enumerate(layout.groups):
    if group.size == 0:
      continue
    grads = _group_grads(layout, gi, g_leaves)
    tuning = DEFAULT_TUNING[(plat, min(g.dtype.itemsize for g in grads))]
    for launch in plan_launches(layout, gi, tuning, [(g.dtype,) for g in grads]):
      kernel = prepass_kernel_leaves(len(launch.positions))
      ins = [s_vec] + [jnp.asarray(t) for t in launch.tables[:4]]
      ins += [grads[j] for j in launch.positions]
      out_shapes = [jax.ShapeDtypeStruct(launch.grid, F32)] * 2
      s, b = _call(kernel, ins, out_shapes, {}, [], launch.grid,
                   {"R": launch.r, "C": launch.c, "VEC": launch.vec}, tuning, plat,
                   f"fusedopt_grad_prepass_x{len(launch.positions)}")
      sq.append(jnp.sum(s))
      bad.append(jnp.sum(b))
  sumsq = jnp.sum(jnp.stack(sq)) if sq else F32(0.0)
  finite = (jnp.sum(jnp.stack(bad)) == 0) if bad else jnp.asarray(True)
  # the kernel sums plain squares: where that overflowed (finite |g| ~ 1e20), the norm is read
  # again without overflow (a second pass over the gradients, only then)
  norm = jax.lax.cond(jnp.isinf(sumsq), lambda: norms.gradient_prepass(g_leaves, scale)[1],
                      lambda: jnp.sqrt(sumsq))
  return norms.prepass_result(finite, norm, scale, clip_global_norm)


def _unavailable():
  return None if available() else (f"backend='triton' cannot run here: {unavailable_reason()}; "
                                   "use backend='auto' (or 'jnp')")


def _interpret_unavailable():
  # the variable first: asking the interpreter imports triton
  if os.environ.get("TRITON_INTERPRET") == "1" and interpreting():
    return None
  return ("backend='triton_interpret' runs the Triton kernels in Triton's interpreter: set "
          "TRITON_INTERPRET=1 before triton is first imported (slow: for verification); or use "
          "backend='auto'")


BACKENDS = {
    # triton_call has no batching rule: under jax.vmap the kernels run once per batch element
    name: common.Backend(
        name, functools.partial(run, platform=plat),
        common.at_unit(functools.partial(flat_update, platform=plat), ALIGN), unit=ALIGN,
        group_unit=MIN_ROW,
        supports=supports, unavailable=why, sequential_vmap=True,
        gradient_prepass=functools.partial(gradient_prepass, platform=plat),
        run_leaves=functools.partial(run, platform=plat, leaf_state=True),
        run_quantized=functools.partial(run_quantized, platform=plat))
    for name, plat, why in (("triton", None, _unavailable),
                            ("triton_interpret", "interpret", _interpret_unavailable))}

__all__ = ["flat_update", "gradient_prepass", "targeting", "run", "available",
           "supports", "interpreting", "DEFAULT_TUNING", "Tuning", "KernelSpec", "generate",
           "update_kernel", "bytes_per_element", "ALIGN", "default_tuning", "TritonUnavailable",
           "BACKENDS"]
