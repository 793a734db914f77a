"""The native kernels for quantized state (``native.generate_quantized``) are bitwise equal to
NumPy: the stored codes decoded, the rule evaluated in float32 (``numpy_oracle``), each block's
absmax taken and the new values encoded as the anchors define it (``lowbit_reference``: nearest
map value by a full argmin, ml_dtypes' e4m3 cast). Every kind of rule and wrapper, ragged
leaves (their last block zero-padded), leaves over two work items, the checked step's skip,
fields a rule passes through, per-tensor sums over the state as stored."""
import pickle
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fusedopt as optim
from fusedopt import elementwise as ew
from fusedopt import quantization as Q
from fusedopt.adabelief import ADABELIEF_RULE
from fusedopt.adadelta import ADADELTA_RULE
from fusedopt.adagrad import ADAGRAD_RULE
from fusedopt.adam import ADAM_RULE
from fusedopt.adan import ADAN_RULE
from fusedopt.ademamix import ADEMAMIX_RULE
from fusedopt.adopt import adopt_rule
from fusedopt.kernels import jnp as jnp_backend
from fusedopt.lamb import APPLY_RULE, MOMENTS_RULE
from fusedopt.layout import FlatLayout
from fusedopt.lion import LION_RULE
from fusedopt.momentum import momentum_rule
from fusedopt.schedule_free import SCHEDULE_FREE_ADAMW_RULE

from lowbit_reference import B, np_dequantize, np_quantize
from numpy_oracle import NPX, evaluate, native_sums, random_scalars, same_bits, scalars_ns

pytestmark = pytest.mark.skipif("native" not in optim.available_backends(),
                                reason="no C++ compiler for the native backend")

BF16 = ml_dtypes.bfloat16
S8, U8, F8 = Q.INT8_SIGNED, Q.INT8_UNSIGNED, Q.FLOAT8_E4M3
# base rule, its never-negative state fields (unsigned map)
RULES = {
    "adam": (ADAM_RULE, (1,)), "momentum_nesterov": (momentum_rule(True), ()),
    "adagrad": (ADAGRAD_RULE, (0,)),
    "adabelief": (ADABELIEF_RULE, (1,)), "adadelta": (ADADELTA_RULE, (0, 1)),
    "lamb_moments": (MOMENTS_RULE, (1,)), "lamb_apply": (APPLY_RULE, (1,)),
    "lion": (LION_RULE, ()), "adan": (ADAN_RULE, (2,)), "ademamix": (ADEMAMIX_RULE, (2,)),
    "adopt_nesterov": (adopt_rule(nesterov=True), (1,)),
    "schedule_free_adamw": (SCHEDULE_FREE_ADAMW_RULE, (0,)),
}
WRAPPERS = {"master": ew.with_master, "guarded": ew.guarded, "sr": ew.with_stochastic_rounding,
            "delta": ew.as_delta, "per_segment": ew.per_segment}
# (rule, param dtype, storage: "int8", "fp8" or a per-field tuple of formats / float dtypes)
# (each case compiles a kernel: AdaBelief and AdEMAMix run as fp8 only; RMSProp's v is Adagrad's
# kind of field, and runs in the optimizer tests of test_quantized_state.py)
CASES = [(name, np.float32, "int8") for name in RULES
         if name not in ("adabelief", "ademamix")] + [
    ("adam", np.float32, "fp8"), ("adabelief", np.float32, "fp8"), ("ademamix", BF16, "fp8"),
    ("adam", np.float32, (F8, np.dtype(BF16))), ("adam+guarded", np.float16, "int8"),
    ("adam+master", BF16, "int8"), ("adam+guarded+sr", BF16, "fp8"),
    ("adam+delta", np.float32, "int8"), ("adam+per_segment", np.float32, "int8"),
    ("lamb_moments+master", BF16, "fp8"), ("lamb_apply+master+guarded", BF16, "int8"),
]
# ragged (one block and a bit), a partial block only, two work items of 32768, 2145 = 8.4 blocks
SHAPES = [(300,), (7,), (40000,), (33, 65)]


def _rule(name):
  base, *wraps = name.split("+")
  rule, unsigned = RULES[base]
  for w in wraps:
    rule = WRAPPERS[w](rule)
  return rule, unsigned


def _formats(rule, unsigned, storage):
  """The storage of each state field; a master copy (the last field) stays float32."""
  n_own = rule.n_state - (1 if "_master" in rule.name else 0)
  if isinstance(storage, tuple):
    out = list(storage)
  elif storage == "fp8":
    out = [F8] * n_own
  else:
    out = [U8 if k in unsigned else S8 for k in range(n_own)]
  return out + [np.dtype(np.float32)] * (rule.n_state - n_own)


def _random_field(rng, fmt, n, nonnegative):
  """A stored field of n elements (n a multiple of B): random codes (no e4m3 NaN; e4m3 of both
  signs unless the field is never negative), scales over several decades, a block of zeros."""
  if not isinstance(fmt, Q.Format):
    return jnp.asarray(np.abs(rng.standard_normal(n)).astype(np.float32).astype(fmt))
  if fmt is F8:
    codes = rng.randint(0, 0x7F, n)
    if not nonnegative:
      codes |= rng.randint(0, 2, n) << 7
  else:
    codes = rng.randint(0, 256, n)
  scales = (rng.uniform(0.5, 2.0, n // B) * 10.0 ** rng.uniform(-3, 1, n // B)).astype(np.float32)
  scales[1] = 0
  codes[B:2 * B] = Q.zero_code(fmt)
  return Q.QuantizedArray(jnp.asarray(codes.astype(np.uint8)), jnp.asarray(scales), fmt)


def _real_blocks(layout):
  """bool [blocks]: the blocks of the group that hold a tensor's elements (the others pad
  between tensors to the layout's alignment)."""
  real = np.zeros(layout.groups[0].size // B, bool)
  for sg in layout.segments:
    real[sg.offset // B:-(-(sg.offset + sg.size) // B)] = True
  return real


def _zero_padding(x, real):
  """State field ``x`` with its padding-only blocks zero, as a real state is there (the flat
  kernels' per-tensor sums run over them, native's do not)."""
  elems = jnp.asarray(np.repeat(real, B))
  if not Q.is_quantized(x):
    return jnp.where(elems, x, jnp.zeros((), x.dtype))
  return Q.QuantizedArray(jnp.where(elems, x.codes, jnp.uint8(Q.zero_code(x.fmt))),
                          jnp.where(jnp.asarray(real), x.scales, 0.0), x.fmt)


def _decoded(buf, fmt, a, e):
  if isinstance(fmt, Q.Format):
    codes, scales = np.asarray(buf.codes), np.asarray(buf.scales)
    return np_dequantize(codes[a:a + e], scales[a // B:(a + e) // B], fmt)
  return np.asarray(buf)[a:a + e].astype(np.float32)


def _reference(rule, fmts, scalars, seg, layout, p_leaves, g_leaves, state, pdt):
  """Per leaf: its blocks decoded, the rule in NumPy float32, new values quantized by NumPy.
  Returns {leaf: (new p, [new field values over the leaf's blocks], sums)}."""
  no_sums = ew.Rule(**{**rule.__dict__, "sumsq": None})
  out = {}
  for i in layout.groups[0].segments:
    sg = layout.segments[i]
    e = -(-sg.size // B) * B
    p = np.zeros(e, np.float32)
    g = np.zeros(e, np.float32)
    p[:sg.size] = np.asarray(p_leaves[i], np.float32).ravel()
    g[:sg.size] = np.asarray(g_leaves[i], np.float32).ravel()
    st = [_decoded(buf, f, sg.offset, e) for buf, f in zip(state, fmts)]
    q = {k: np.asarray(v)[i] for k, v in seg.items()}
    new_p, new_st, _ = evaluate(no_sums, scalars, q, p, g, st)
    fields, stored = [], []
    for k, (new, old, f) in enumerate(zip(new_st, st, fmts)):
      if not isinstance(f, Q.Format):
        new = np.asarray(new, np.float32).astype(f)
        fields.append(new)
        stored.append(new.astype(np.float32))
        continue
      old_codes = np.asarray(state[k].codes)[sg.offset:sg.offset + e]
      old_scales = np.asarray(state[k].scales)[sg.offset // B:(sg.offset + e) // B]
      if new is old or scalars.get("ok", 1.0) == 0:   # passed through, or a skipped step
        codes, scales = old_codes, old_scales
      else:
        codes, scales = np_quantize(new, f)
      fields.append((codes, scales))
      stored.append(np_dequantize(codes, scales, f))
    sums = ()
    if rule.sumsq is not None:
      with np.errstate(all="ignore"):
        terms = rule.sumsq(NPX, scalars_ns(scalars), scalars_ns(q), p, g, *stored)
      from fusedopt.kernels import native   # pylint: disable=import-outside-toplevel
      sums = [native_sums(np.broadcast_to(np.asarray(t, np.float32), p.shape), native._CHUNK,
                          native.LANES) for t in terms]
    new_p = None if new_p is None else np.asarray(new_p, np.float32)[:sg.size].astype(pdt)
    out[i] = (new_p, fields, sums)
  return out


def _leading(q, n):
  """The first ``n`` elements of quantized buffer ``q`` (a one-leaf group's leaf: the layout
  pads a quantized group to whole 32-block tiles)."""
  return Q.QuantizedArray(q.codes[:n], q.scales[:n // q.block], q.fmt, q.block)


def _padded(q, n):
  """``q`` followed by zero codes and scales 1 up to ``n`` elements (a one-leaf group)."""
  extra = n - q.codes.shape[0]
  return Q.QuantizedArray(jnp.concatenate([q.codes, jnp.zeros(extra, jnp.uint8)]),
                          jnp.concatenate([q.scales, jnp.ones(extra // q.block, jnp.float32)]),
                          q.fmt, q.block)


def check_against_numpy(run, name, pdt, storage, sums_rtol=None, flat=False):
  """``run`` (a ``Backend.run_quantized``) on case ``name`` (a rule of ``RULES`` and wrappers),
  params of ``pdt``, state ``storage`` (see ``CASES``), from random codes and scales over the
  ``SHAPES`` leaves: params, codes, scales and float fields bitwise equal to ``_reference``'s,
  per-tensor sums bitwise in the native kernel's order (``sums_rtol``: within it, for kernels
  summing in another order). Guarded rules run with ``ok`` 1 and 0. ``flat``: a kernel over
  the whole flat buffer (Pallas), whose sums include the padding-only blocks: they are zero."""
  rule, unsigned = _rule(name)
  fmts = _formats(rule, unsigned, storage)
  rng = np.random.RandomState(zlib.crc32(name.encode()))
  tree = {f"l{i}": rng.standard_normal(s).astype(pdt) for i, s in enumerate(SHAPES)}
  layout = FlatLayout.build(tree, quantize=(1, B))
  assert len(layout.groups) == 1 and layout.groups[0].block == B
  n = layout.groups[0].size
  p_leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
  g_leaves = [jnp.asarray((rng.standard_normal(x.shape) * 3).astype(pdt)) for x in p_leaves]
  state = tuple(_random_field(rng, f, n, k in unsigned) for k, f in enumerate(fmts))
  if flat:
    state = tuple(_zero_padding(x, _real_blocks(layout)) for x in state)
  if "_master" in rule.name:   # the master copy equal to the params in float32
    state = state[:-1] + (layout.pack_group(p_leaves, 0, jnp.float32),)
  seg = {k: jnp.asarray(rng.uniform(0.05, 0.9, len(p_leaves)).astype(np.float32))
         for k in rule.seg_scalars}
  for ok in ((1.0, 0.0) if "guarded" in name else (1.0,)):
    scalars = random_scalars(rule, rng, ok)
    ref = _reference(rule, fmts, scalars, seg, layout, p_leaves, g_leaves, state, pdt)
    out_p, out_state, sums = run(rule, {k: jnp.float32(v) for k, v in scalars.items()}, seg,
                                 layout, 0, p_leaves, g_leaves, state)
    for pos, i in enumerate(layout.groups[0].segments):
      sg = layout.segments[i]
      e = -(-sg.size // B) * B
      want_p, want_fields, want_sums = ref[i]
      if rule.writes_param:
        assert same_bits(np.asarray(out_p[pos]).ravel(), want_p), (name, sg.path, "param")
      for k, (got, want) in enumerate(zip(out_state, want_fields)):
        if isinstance(want, tuple):
          codes = np.asarray(got.codes)[sg.offset:sg.offset + e]
          scales = np.asarray(got.scales)[sg.offset // B:(sg.offset + e) // B]
          np.testing.assert_array_equal(codes, want[0], err_msg=f"{name} {sg.path} codes {k}")
          assert same_bits(scales, want[1]), (name, sg.path, "scales", k)
        else:
          assert same_bits(np.asarray(got)[sg.offset:sg.offset + e], want), (name, sg.path, k)
      for t, want in enumerate(want_sums):
        got = np.asarray(sums[t][pos])
        if sums_rtol is None:
          assert same_bits(got, want), (name, sg.path, "sumsq", t)
        else:
          np.testing.assert_allclose(got, want, rtol=sums_rtol, err_msg=f"{name} sumsq {t}")


@pytest.mark.parametrize("name, pdt, storage", CASES, ids=[
    f"{n}-{np.dtype(p).name}-{s if isinstance(s, str) else 'mixed'}" for n, p, s in CASES])
def test_native_quantized_bitwise_equals_numpy(name, pdt, storage):
  from fusedopt.kernels import native   # pylint: disable=import-outside-toplevel
  check_against_numpy(native.run_quantized, name, pdt, storage)


# ----------------------------------------------------------------------------- the encoders

STORE_GRAD = ew.Rule("store_grad", lambda xp, s, q, p, g, m: (None, (g,)), (), 1,
                     writes_param=False)


def _edge_values(fmt):
  """Values where a code changes: the map's midpoints and their float32 neighbours (e4m3: the
  midpoints between e4m3 values, subnormal ones included), the map's values, zeros, and
  log-uniform values down to 1e-17."""
  if fmt.is_fp8:
    v = np.arange(0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    mid = ((v[:-1] + v[1:]) / 2).astype(np.float32)
    table = v.astype(np.float32)
  else:
    table = Q.dynamic_map(fmt == S8)
    mid = Q.thresholds(fmt == S8)[:255]
  edges = np.concatenate([mid, np.nextafter(mid, np.float32(-np.inf)),
                          np.nextafter(mid, np.float32(np.inf)), table, [0.0, -0.0]])
  rng = np.random.RandomState(1)
  edges = np.concatenate([edges, np.exp(rng.uniform(-40, 0, 4000)) * table.max()])
  if fmt != U8:
    edges = np.concatenate([edges, -edges])
  return np.clip(edges.astype(np.float32), -fmt.fmax, fmt.fmax)


# factors for check_encoder(scaled=True): blocks whose absmax is not fmax, of either sign
BLOCK_FACTORS = np.array([-0.7324, 3.1e-3, 2.5, -1e-5, 1.0 / 3.0], np.float32)


def check_encoder(run, fmt, scaled=False):
  """Blocks led by +fmax (so absmax = fmax and the values are encoded as they are) holding every
  value where a code changes (``_edge_values``): ``run``'s codes and scales (a
  ``Backend.run_quantized`` storing the gradient, ``STORE_GRAD``) equal the reference's.
  ``scaled``: each block multiplied by one of ``BLOCK_FACTORS`` first, so that the scaling
  ``x * (fmax / absmax)`` is exercised too (the reference does it in the same float32
  operations)."""
  vals = _edge_values(fmt)
  per = B - 1
  nb = -(-vals.size // per)
  body = np.zeros(nb * per, np.float32)
  body[:vals.size] = vals
  x = np.concatenate([np.full((nb, 1), fmt.fmax, np.float32), body.reshape(nb, per)], axis=1)
  if scaled:
    x = x * np.resize(BLOCK_FACTORS, nb)[:, None]
  x = x.reshape(-1)
  assert scaled or np.isin(vals, x).all()
  layout = FlatLayout.build({"x": np.zeros(x.size, np.float32)}, quantize=(1, B))
  state = (Q.QuantizedArray.zeros(layout.groups[0].size, fmt),)
  want_codes, want_scales = np_quantize(x, fmt)
  _, (got,), _ = run(STORE_GRAD, {}, {}, layout, 0, [jnp.zeros(x.size, jnp.float32)],
                     [jnp.asarray(x)], state)
  got = _leading(got, x.size)
  np.testing.assert_array_equal(np.asarray(got.codes), want_codes, err_msg=str(run))
  assert same_bits(np.asarray(got.scales), want_scales)


@pytest.mark.parametrize("fmt", [S8, U8, F8], ids=lambda f: f.name)
def test_native_encoder_codes_every_edge_as_numpy(fmt):
  """The kernel's codes (the bucket table; e4m3 in integer arithmetic) on every value where a
  code changes equal the reference's and the jnp path's binary search's."""
  from fusedopt.kernels import native   # pylint: disable=import-outside-toplevel
  for run in (native.run_quantized, jnp_backend.run_quantized):
    check_encoder(run, fmt)
    check_encoder(run, fmt, scaled=True)


READ_STATE = ew.Rule("read_state", lambda xp, s, q, p, g, m: (m, (m,)), (), 1)


def check_decoder(run, fmt):
  """``run``'s decode of each of the 256 codes is the format's value (the map's, ml_dtypes'
  e4m3), NaN where it is NaN: a rule writing the decoded state into the params, scale 1 and
  0.5; the codes passed through stay."""
  codes = np.tile(np.arange(256, dtype=np.uint8), 4)
  scales = np.array([1.0, 0.5, 1.0, 0.5], np.float32)
  layout = FlatLayout.build({"x": np.zeros(1024, np.float32)}, quantize=(1, B))
  state = (_padded(Q.QuantizedArray(jnp.asarray(codes), jnp.asarray(scales), fmt),
                   layout.groups[0].size),)
  out_p, (kept,), _ = run(READ_STATE, {}, {}, layout, 0, [jnp.zeros(1024, jnp.float32)],
                          [jnp.zeros(1024)], state)
  kept = _leading(kept, 1024)
  if fmt.is_fp8:
    values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
  else:
    values = Q.dynamic_map(fmt == S8)
  want = np.tile(np.concatenate([values, values * np.float32(0.5)]), 2)
  assert same_bits(np.asarray(out_p[0]), want)
  np.testing.assert_array_equal(np.asarray(kept.codes), codes)   # passed through


@pytest.mark.parametrize("fmt", [S8, U8, F8], ids=lambda f: f.name)
def test_native_decodes_every_code(fmt):
  """A table read for the dynamic maps, integer arithmetic for e4m3."""
  from fusedopt.kernels import native   # pylint: disable=import-outside-toplevel
  check_decoder(native.run_quantized, fmt)
  check_decoder(native.run_quantized, pickle.loads(pickle.dumps(fmt)))


@pytest.mark.parametrize("lookup, view", [("gather", "rows"), ("lanes", "tiles")])
def test_pallas_codecs_in_interpret_mode(lookup, view):
  """The Pallas quantized kernel (``pallas.flat_update_quantized``) in interpret mode, with the
  int8 maps read either way the devices read them (``gather``: at computed addresses, the GPU's
  bucket encode; ``lanes``: 128-lane gathers and the binary search, a TPU's), and the buffers
  viewed as each device views them (``rows``; ``tiles``: 128 lanes, the scales moved between
  lanes and a column): it decodes every code and encodes every value where a code changes
  bitwise as the reference does (e4m3, in integer arithmetic, once), also in blocks whose
  absmax is not the format's largest value, and with a Format unpickled (equal to the
  module's, another object)."""
  from fusedopt.kernels import pallas   # pylint: disable=import-outside-toplevel
  run = pallas._run_quantized("interpret", lookup, view)   # pylint: disable=protected-access
  for fmt in (S8, U8, F8) if lookup == "gather" else (S8, U8):
    check_decoder(run, fmt)
    check_decoder(run, pickle.loads(pickle.dumps(fmt)))   # a Format equal, not identical
    check_encoder(run, fmt)
    check_encoder(run, fmt, scaled=True)


# (rule, state formats, lookup, view): int8 maps, e4m3 and a float field, both lookups, both
# views (a GPU's: gather, rows; a TPU's: lanes, tiles)
PALLAS_CASES = [
    (ew.guarded(ADAM_RULE), (S8, U8), "gather", "rows"),
    (ew.with_master(APPLY_RULE), (F8, F8), "gather", "tiles"),
    (MOMENTS_RULE, (S8, U8), "lanes", "tiles"),
    (ew.per_segment(ADAM_RULE), (F8, U8), "lanes", "tiles"),
    (ew.guarded(ew.with_master(ADAM_RULE)), (S8, np.dtype(BF16)), "lanes", "tiles"),
    (ew.guarded(ADAM_RULE), (S8, U8), "lanes", "tiles"), (MOMENTS_RULE, (S8, U8), "gather", "rows")]


@pytest.mark.parametrize("rule, fmts, lookup, view", PALLAS_CASES,
                         ids=[f"{r.name}-{l}-{v}" for r, _, l, v in PALLAS_CASES])
def test_pallas_quantized_kernel_in_interpret_mode(rule, fmts, lookup, view):
  """The Pallas quantized kernel in interpret mode against the native kernel (bitwise equal to
  NumPy): Adam with a checked skip, per-tensor scalars, LAMB's moment pass (its sums over the
  stored moments) and its apply pass under master weights (a pass-through field), int8 and
  e4m3 fields and a bf16 one, both int8 lookups and both views (the per-block scales, tables
  and sums as a column or as lanes). Equal within XLA:CPU's contractions (the interpreted
  kernel's multiply-adds are contracted; the GPU kernel rounds each operation): params and
  float fields within an ulp of the leaf's scale, codes in at most 1 of 1000."""
  from fusedopt.kernels import native, pallas   # pylint: disable=import-outside-toplevel
  run = pallas._run_quantized("interpret", lookup, view)   # pylint: disable=protected-access
  rng = np.random.RandomState(7)
  tree = {f"l{i}": np.abs(rng.standard_normal(s)).astype(np.float32)   # (interpret mode: small)
          for i, s in enumerate([(300,), (7,), (33, 65)])}
  layout = FlatLayout.build(tree, quantize=(1, B))
  n = layout.groups[0].size
  p = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
  g = [jnp.asarray(np.abs(rng.standard_normal(x.shape)).astype(np.float32)) for x in p]
  real = _real_blocks(layout)

  def field(fmt):
    """All positive (nothing cancels); zero in the padding-only blocks."""
    x = _random_field(rng, fmt, n, True)
    if isinstance(fmt, Q.Format) and fmt is not F8:   # the codes of positive values
      x = Q.QuantizedArray(jnp.asarray(rng.randint(Q.zero_code(fmt), 256, n), jnp.uint8),
                           x.scales, fmt)
    return _zero_padding(x, real)
  st = tuple(field(f) for f in fmts)
  if "master" in rule.name:
    st += (layout.pack_group(p, 0, jnp.float32),)
  for ok in ((1.0, 0.0) if "ok" in rule.scalars else (1.0,)):
    sc = {k: jnp.float32(v) for k, v in random_scalars(rule, rng, ok).items()}
    seg = {k: jnp.asarray(rng.uniform(0.05, 0.9, len(p)), jnp.float32) for k in rule.seg_scalars}
    got = run(rule, sc, seg, layout, 0, p, g, st)
    want = native.run_quantized(rule, sc, seg, layout, 0, p, g, st)
    for x, y in zip(got[2] or (), want[2] or ()):   # LAMB's sums over the stored moments
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(got[:2]), jax.tree.leaves(want[:2])):
      a, b = np.asarray(a), np.asarray(b)
      if a.shape == (n // B,) or a.shape == (n,):   # a state field: its real blocks
        # (the flat kernel also runs the padding-only blocks, which native leaves alone)
        keep = np.repeat(real, B) if a.shape == (n,) else real
        a, b = a[keep], b[keep]
      if a.dtype == np.uint8:
        assert np.count_nonzero(a != b) <= a.size // 1000, (rule.name, ok)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, (rule.name, ok)
        if ok == 0:
          np.testing.assert_array_equal(a, b)
      else:
        # within an ulp of the leaf's scale (p' - p near zero: the ulp is p's)
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-6,
                                   atol=2e-7 * float(np.max(np.abs(b.astype(np.float32)))),
                                   err_msg=rule.name)


@pytest.mark.parametrize("backend", ["native", "pallas-gather", "pallas-lanes"])
@pytest.mark.parametrize("fmt", [S8, U8, F8], ids=lambda f: f.name)
def test_non_finite_blocks_as_numpy_and_the_jnp_path(fmt, backend):
  """A block holding NaN or inf is stored as NumPy and the jnp path store it (scale NaN/inf,
  so the whole block reads back as NaN or inf): the checked step exists to skip those steps,
  but an unchecked one must not differ by backend. 20 blocks: XLA:CPU's vectorised row max
  drops a NaN from 16 blocks on, which the jnp path now guards against."""
  from fusedopt.kernels import native, pallas   # pylint: disable=import-outside-toplevel
  # pylint: disable-next=protected-access
  run = (native.run_quantized if backend == "native" else
         pallas._run_quantized("interpret", backend.split("-")[1]))
  rng = np.random.RandomState(2)
  x = np.abs(rng.standard_normal((20, B))).astype(np.float32)
  x[0, 3], x[1, 5], x[2, 7], x[17, 100] = np.nan, np.inf, -np.inf, np.nan
  x = x.reshape(-1)
  layout = FlatLayout.build({"x": np.zeros(x.size, np.float32)}, quantize=(1, B))
  state = (Q.QuantizedArray.zeros(layout.groups[0].size, fmt),)
  args = ({}, {}, layout, 0, [jnp.zeros(x.size)], [jnp.asarray(x)], state)
  _, (got,), _ = run(STORE_GRAD, *args)
  _, (want,), _ = jnp_backend.run_quantized(STORE_GRAD, *args)
  got, want = _leading(got, x.size), _leading(want, x.size)
  with np.errstate(invalid="ignore"):   # (inf * 0 in the inf blocks, as in the kernels)
    ref_codes, ref_scales = np_quantize(x, fmt)
  assert same_bits(np.asarray(got.scales), ref_scales)
  assert same_bits(np.asarray(want.scales), ref_scales)
  back, ref = np.asarray(got.dequantize()), np.asarray(want.dequantize())
  assert same_bits(back, ref)
  bad = np.zeros((20, B), bool)
  bad[[0, 1, 2, 17]] = True
  assert not np.isfinite(back[bad.reshape(-1)]).any() and np.isfinite(back[~bad.reshape(-1)]).all()
  finite = ~bad.reshape(-1)
  np.testing.assert_array_equal(np.asarray(got.codes)[finite], ref_codes[finite])
  np.testing.assert_array_equal(np.asarray(want.codes)[finite], ref_codes[finite])


# ----------------------------------------------------------------------------- both backends

@pytest.mark.parametrize("backend", ["native", "jnp", "pallas_interpret"])
def test_fields_passed_through_keep_their_codes(backend):
  """LAMB's apply stage under master weights writes the master and passes the moments through:
  their codes stay as they were, bitwise, on both backends -- storing the decoded values again
  would move codes wherever a block's absmax is negative (the signed map has no -1)."""
  from fusedopt.kernels import registry   # pylint: disable=import-outside-toplevel
  rule = ew.with_master(APPLY_RULE)
  rng = np.random.RandomState(3)
  n = 4 * B
  layout = FlatLayout.build({"x": np.zeros(n, np.float32)}, quantize=(1, B))
  size = layout.groups[0].size   # whole 32-block tiles: zero blocks after the leaf's
  codes = rng.randint(0, 128, size).astype(np.uint8)   # every block's values negative
  m = Q.QuantizedArray(jnp.asarray(codes), jnp.ones(size // B, jnp.float32), S8)
  v = Q.QuantizedArray(jnp.asarray(rng.randint(0, 256, size).astype(np.uint8)),
                       jnp.ones(size // B, jnp.float32), U8)
  p = [jnp.asarray(rng.standard_normal(n).astype(BF16))]
  master = layout.pack_group(p, 0, jnp.float32)
  scalars = {k: jnp.float32(0.5) for k in rule.scalars}
  seg = {k: jnp.ones((1,), jnp.float32) for k in rule.seg_scalars}
  _, (m1, v1, master1), _ = registry.get(backend).run_quantized(
      rule, scalars, seg, layout, 0, p, [jnp.zeros(n)], (m, v, master))
  np.testing.assert_array_equal(np.asarray(m1.codes), codes)
  np.testing.assert_array_equal(np.asarray(m1.scales), np.ones(size // B, np.float32))
  np.testing.assert_array_equal(np.asarray(v1.codes), np.asarray(v.codes))
  assert not np.array_equal(np.asarray(master1), np.asarray(master))   # the master did move


def test_auto_runs_quantized_groups_on_native_and_checkpoints_agree_with_jnp():
  """``backend="auto"`` on a CPU runs quantized groups on the native kernels (no warning), and
  an int8 Adam there takes the jnp path's steps: codes equal but for XLA's contractions (at most
  one code apart, in at most 1 of 1000), params within float32 rounding."""
  import warnings   # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(4)
  params = {"w": jnp.asarray(rng.standard_normal((96, 96)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((96,)), jnp.float32)}
  opts = {b: optim.Adam(1e-3, state_dtype="int8", backend=b).create(params)
          for b in ("auto", "jnp")}
  step = jax.jit(lambda o, g: o.apply_gradient(g))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for s in range(3):
      g = jax.tree.map(lambda x: jnp.asarray(np.random.RandomState(s).standard_normal(x.shape),
                                             jnp.float32), params)
      opts = {b: step(o, g) for b, o in opts.items()}
  for a, b in zip(jax.tree.leaves(opts["auto"].target), jax.tree.leaves(opts["jnp"].target)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  fa, fj = opts["auto"].state.param_states, opts["jnp"].state.param_states
  for k in fa.fields:
    for qa, qj in zip(fa.fields[k], fj.fields[k]):
      if Q.is_quantized(qa):
        diff = np.abs(np.asarray(qa.codes, int) - np.asarray(qj.codes, int))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size // 1000
        np.testing.assert_allclose(np.asarray(qa.scales), np.asarray(qj.scales), rtol=1e-6)


@pytest.mark.parametrize("rule, fmts", [(ew.per_segment(ADAM_RULE), (S8, U8)),
                                        (MOMENTS_RULE, (F8, U8))],
                         ids=["adam_per_segment-s8-u8", "lamb_moments-fp8-u8"])
def test_pallas_quantized_views_agree(rule, fmts):
  """The TPU's view of the flat buffers (``tiles``: 128 lanes a row, each block's scale, table
  entry and sum moved between a lane and a column inside the kernel) gives what the row view
  gives, over two grid steps of two lane rows each (512 blocks), the per-block tables read in
  the right block: equal within XLA:CPU's contractions and summation order, which differ
  between the two interpreted programs (floats within 2 ulp, codes in at most 1 of 1000, by
  at most one; LAMB's per-block sums of 256 squares within 1e-6). A
  view a platform cannot take is refused, naming it."""
  # pylint: disable=import-outside-toplevel,protected-access
  from fusedopt.kernels import common, pallas
  rng = np.random.RandomState(3)
  n = 512 * B
  p, g = (jnp.asarray(rng.standard_normal(n).astype(np.float32)) for _ in range(2))
  state = tuple(_random_field(rng, f, n, f is U8) for f in fmts)
  sc = {k: jnp.float32(v) for k, v in random_scalars(rule, rng, 1.0).items()}
  seg = {k: jnp.asarray(rng.uniform(0.05, 0.9, n // B), jnp.float32) for k in rule.seg_scalars}
  tuning = common.Tuning(block=256 * B)
  got = {v: pallas.flat_update_quantized(rule, sc, seg, p, g, state, platform="interpret",
                                         tuning=tuning, lookup="gather", view=v)
         for v in ("rows", "tiles")}
  flat = lambda out: [np.asarray(x) for x in jax.tree.leaves(out)]  # noqa: E731
  n_sums = 2 if rule.sumsq else 0
  assert len(flat(got["rows"])) == (1 if rule.writes_param else 0) + 4 + n_sums
  pairs = list(zip(flat(got["rows"]), flat(got["tiles"])))
  for a, b in pairs[len(pairs) - n_sums:]:
    np.testing.assert_allclose(a, b, rtol=1e-6)
  for a, b in pairs[:len(pairs) - n_sums]:
    if a.dtype == np.uint8:
      assert np.count_nonzero(a != b) <= a.size // 1000
      assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    else:
      np.testing.assert_allclose(a, b, rtol=2.4e-7, atol=0)
  with pytest.raises(ValueError, match="view='tiles' needs whole 128-block rows"):
    pallas.flat_update_quantized(rule, sc, {k: x[:-B] for k, x in seg.items()}, p[:-B], g[:-B],
                                 tuple(Q.QuantizedArray(x.codes[:-B], x.scales[:-1], x.fmt)
                                       for x in state), platform="interpret", view="tiles")
  with pytest.raises(ValueError, match="view='rows' on 'tpu'"):
    pallas.flat_update_quantized(rule, sc, seg, p, g, state, platform="tpu", view="rows")
