"""Low-bit optimizer state (``state_dtype="int8"`` / ``jnp.float8_e4m3fn``; fusedopt.quantization).

References are independent of the library: the dynamic map rebuilt from bitsandbytes'
``create_dynamic_map`` in float32 (as bitsandbytes computes it), nearest-value codes found by a
full argmin over the map, e4m3 codes from ml_dtypes' cast, and a NumPy Adam that stores its
moments blockwise quantized after every step (the anchors' algorithm: bitsandbytes' 8-bit Adam,
torchao's AdamW8bit / AdamWFp8).
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fusedopt as optim
from fusedopt import quantization as Q
from fusedopt import tx
from fusedopt import serialization
from fusedopt.layout import QUANTIZED_TILE_BLOCKS

from lowbit_reference import B, bnb_dynamic_map, np_dequantize, np_quantize



FORMATS = [Q.INT8_SIGNED, Q.INT8_UNSIGNED, Q.FLOAT8_E4M3]


def _blocks(seed, fmt, n_blocks=64):
  """Blocks over every magnitude: normal, heavy-tailed, tiny, huge, zeros, a lone spike."""
  rng = np.random.RandomState(seed)
  x = rng.standard_normal((n_blocks, B)).astype(np.float32)
  x[1] *= 1e-30
  x[2] *= 1e30
  x[3] = 0
  x[4] = 0
  x[4, 7] = -3.0
  x[5] = rng.standard_cauchy(B)
  x[6] = np.exp(rng.uniform(-40, 0, B))
  if not fmt.name == "int8_signed" and not fmt.is_fp8:
    x = np.abs(x)
  return x.reshape(-1)


# ----------------------------------------------------------------------------- the map and codes

@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes(signed):
  ours, theirs = Q.dynamic_map(signed), bnb_dynamic_map(signed)
  assert ours.shape == (256,) and np.all(np.diff(ours) > 0)
  assert ours[-1] == 1.0 and 0.0 in ours
  assert (ours < 0).sum() == (127 if signed else 0)
  ulps = np.abs(ours.view(np.int32).astype(np.int64) - theirs.view(np.int32).astype(np.int64))
  assert ulps.max() <= 2, ulps.max()   # one rounding (ours) vs three in float32 (theirs)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_quantize_matches_numpy_reference(fmt):
  x = _blocks(0, fmt)
  codes, scales = Q.quantize(jnp.asarray(x), fmt)
  ref_codes, ref_scales = np_quantize(x, fmt)
  np.testing.assert_array_equal(np.asarray(scales), ref_scales)
  np.testing.assert_array_equal(np.asarray(codes), ref_codes)
  back = np.asarray(Q.dequantize(codes, scales, fmt))
  np.testing.assert_array_equal(back, np_dequantize(ref_codes, ref_scales, fmt))


@pytest.mark.parametrize("signed", [True, False])
def test_bucket_table_encodes_as_the_binary_search(signed):
  """The native kernels' one-lookup encoder (``bucket_table``) gives the jnp path's binary
  search's codes and the reference's on every midpoint, its float32 neighbours, both signs,
  zeros, NaN and values down to 1e-17."""
  fmt = Q.INT8_SIGNED if signed else Q.INT8_UNSIGNED
  mid = Q.thresholds(signed)[:255]
  rng = np.random.RandomState(5)
  y = np.concatenate([mid, np.nextafter(mid, np.float32(-1)), np.nextafter(mid, np.float32(1)),
                      np.exp(rng.uniform(-40, 0, 5000)), [0.0, 1.0, 1e-38]]).astype(np.float32)
  y = np.concatenate([y, -y, [np.nan]]).astype(np.float32)
  got = Q.encode_by_buckets(Q.bucket_table(signed), y)
  take = lambda t, i: jnp.take(jnp.asarray(t), i.astype(jnp.int32), mode="clip")  # noqa: E731
  np.testing.assert_array_equal(got, np.asarray(Q.encode(take, jnp.where, fmt, jnp.asarray(y))))
  finite = y[:-1]
  nb = -(-finite.size // (B - 1))
  body = np.zeros(nb * (B - 1), np.float32)
  body[:finite.size] = finite
  blocks = np.concatenate([np.ones((nb, 1), np.float32), body.reshape(nb, B - 1)], axis=1)
  ref_codes, _ = np_quantize(blocks.reshape(-1), fmt)   # absmax 1: encoded as they are
  np.testing.assert_array_equal(got[:-1], ref_codes.reshape(nb, B)[:, 1:].reshape(-1)[
      :finite.size])
  assert got[-1] == 0   # NaN


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_round_trip_error_within_the_maps_bound(fmt):
  x = _blocks(1, fmt, 256)
  codes, scales = Q.quantize(jnp.asarray(x), fmt)
  back = np.asarray(Q.dequantize(codes, scales, fmt)).reshape(-1, B)
  xb = x.reshape(-1, B).astype(np.float64)
  absmax = np.abs(xb).max(axis=1, keepdims=True)
  err = np.abs(back - xb)
  if fmt.is_fp8:   # e4m3: half an ulp relative (3 mantissa bits), 2^-10 * scale below 2^-6
    bound = np.maximum(np.abs(xb) * 2.0 ** -4, absmax / 448 * 2.0 ** -10) * (1 + 1e-6)
  else:            # half the widest gap between neighbouring map values around x / absmax
    table = Q.dynamic_map(fmt.name == "int8_signed").astype(np.float64)
    i = np.clip(np.searchsorted(table, xb / np.where(absmax > 0, absmax, 1)), 1, 255)
    bound = (table[i] - table[i - 1]) / 2 * absmax * (1 + 1e-4) + absmax * 1e-7 + 1e-45
  assert np.all(err <= bound), float(np.max(err / bound))
  # the element at a block's absmax comes back exactly (it defines the scale)
  k = np.argmax(np.abs(xb), axis=1)
  top = xb[np.arange(len(xb)), k]
  got = back[np.arange(len(xb)), k]
  if fmt.is_fp8:   # 448 * (absmax * float32(1/448)): within an ulp
    np.testing.assert_allclose(got, top.astype(np.float32), rtol=2.5e-7)
  else:
    exact = top >= 0      # the signed map has 1 but not -1
    np.testing.assert_array_equal(got[exact], top[exact].astype(np.float32))
  # typical error on normal data: well under the worst case
  typical = np.median(err[0] / absmax[0])
  assert typical < (0.02 if fmt.is_fp8 else 0.01), typical


# ----------------------------------------------------------------------------- the layout

def _tree(dtype=jnp.float32):
  rng = np.random.RandomState(0)
  return {"w": jnp.asarray(rng.standard_normal((70, 90)), dtype),     # 6300: quantized
          "b": jnp.asarray(rng.standard_normal((90,)), dtype),        # small: float32
          "e": jnp.asarray(rng.standard_normal((4097,)), dtype),      # ragged last block
          "s": jnp.asarray(1.5, dtype)}


def _grads(seed, dtype=jnp.float32):
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape) * 10.0 ** rng.uniform(-2, 1, x.shape),
                            dtype), _tree(dtype))


def test_small_tensors_keep_float32_and_blocks_never_straddle():
  opt = optim.Adam(1e-2, state_dtype="int8").create(_tree())
  st = opt.state.param_states
  layout = st.layout
  big = {layout.segments[i].path for g in layout.groups if g.block for i in g.segments}
  assert big == {"['e']", "['w']"}
  for g, group in enumerate(layout.groups):
    for k in ("grad_ema", "grad_sq_ema"):
      buf = st.fields[k][g]
      if group.block:
        assert Q.is_quantized(buf) and buf.codes.dtype == jnp.uint8
        assert buf.fmt == (Q.INT8_UNSIGNED if k == "grad_sq_ema" else Q.INT8_SIGNED)
        assert all(layout.segments[i].offset % B == 0 for i in group.segments)
      else:
        assert buf.dtype == jnp.float32
  with pytest.raises(ValueError, match="int8"):
    optim.Adam(1e-2, state_dtype="int4")
  with pytest.raises(ValueError, match="float8_e4m3fn"):
    optim.Adam(1e-2, state_dtype=jnp.int32)


# ----------------------------------------------------------------------------- against NumPy Adam

def np_adam_quantized(params, grads_seq, fmts, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8):
  """The anchors' 8-bit Adam on one flat float32 buffer (a multiple of B): decode m and v,
  float32 Adam (flax's form, fusedopt's operation order), encode them again."""
  p = np.asarray(params, np.float32).copy()
  m_c, m_s = np_quantize(np.zeros_like(p), fmts[0])
  v_c, v_s = np_quantize(np.zeros_like(p), fmts[1])
  f = np.float32
  for t, g in enumerate(grads_seq):
    m = np_dequantize(m_c, m_s, fmts[0])
    v = np_dequantize(v_c, v_s, fmts[1])
    g = np.asarray(g, np.float32)
    m = f(b1) * m + f(1 - b1) * g
    v = f(b2) * v + f(1 - b2) * (g * g)
    c1 = f(-np.expm1((t + 1) * np.log1p(-(1 - b1))))
    c2 = f(-np.expm1((t + 1) * np.log1p(-(1 - b2))))
    p = p - f(lr) * (m / c1) / (np.sqrt(v / c2) + f(eps))
    m_c, m_s = np_quantize(m, fmts[0])
    v_c, v_s = np_quantize(v, fmts[1])
  return p, (m_c, m_s), (v_c, v_s)


@pytest.mark.parametrize("kind", ["int8", "float8_e4m3fn"])
def test_adam_matches_numpy_anchor_algorithm(kind):
  n, steps = QUANTIZED_TILE_BLOCKS * B, 8   # one whole group (at least quantization.MIN_SIZE)
  rng = np.random.RandomState(3)
  p0 = rng.standard_normal(n).astype(np.float32)
  gs = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 0, n)).astype(np.float32)
        for _ in range(steps)]
  opt = optim.Adam(1e-2, state_dtype=kind, backend="jnp").create(jnp.asarray(p0))
  step = jax.jit(lambda o, g: o.apply_gradient(g))
  for g in gs:
    opt = step(opt, jnp.asarray(g))
  fmts = (Q.format_for(kind, False), Q.format_for(kind, True))
  p, (m_c, m_s), (v_c, v_s) = np_adam_quantized(p0, gs, fmts)
  st = opt.state.param_states.fields
  m, v = st["grad_ema"][0], st["grad_sq_ema"][0]
  # the same codes and scales; float32 rounding (XLA may contract a multiply-add) can move a
  # value sitting on a code boundary by one code in a rare element
  for got, want_c, want_s in ((m, m_c, m_s), (v, v_c, v_s)):
    np.testing.assert_allclose(np.asarray(got.scales), want_s, rtol=2e-6)
    diff = np.asarray(got.codes).astype(int) - want_c.astype(int)
    assert np.abs(diff).max() <= 1 and np.count_nonzero(diff) <= n // 500, np.count_nonzero(diff)
  # ... and such an element's param moves by that code's share of an update (under lr = 1e-2)
  got_p = np.asarray(opt.target)
  off = ~np.isclose(got_p, p, rtol=1e-5, atol=1e-6)
  assert np.count_nonzero(off) <= n // 1000, np.count_nonzero(off)
  np.testing.assert_allclose(got_p, p, rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------- every optimizer

OPTIMIZERS = {
    "Adam": lambda **k: optim.Adam(1e-2, weight_decay=1e-3, **k),
    "LAMB": lambda **k: optim.LAMB(1e-2, **k),
    "LARS": lambda **k: optim.LARS(1e-2, **k),
    "Momentum": lambda **k: optim.Momentum(1e-2, beta=0.9, nesterov=True, **k),
    "RMSProp": lambda **k: optim.RMSProp(1e-3, **k),   # (centered: refused, see the tx test)
    "Adagrad": lambda **k: optim.Adagrad(1e-2, **k),
    "AdaBelief": lambda **k: optim.AdaBelief(1e-2, **k),
    "Adadelta": lambda **k: optim.Adadelta(1.0, **k),
    "Lion": lambda **k: optim.Lion(1e-3, **k),
    "Adan": lambda **k: optim.Adan(1e-2, **k),
    "AdEMAMix": lambda **k: optim.AdEMAMix(1e-2, **k),
    "ADOPT": lambda **k: optim.ADOPT(1e-2, **k),
    "ScheduleFreeAdamW": lambda **k: optim.ScheduleFreeAdamW(1e-2, **k),
}


SINGLE_PASS = sorted(set(OPTIMIZERS) - {"LAMB"})


@pytest.mark.parametrize("name", SINGLE_PASS)
def test_every_optimizer_runs_on_quantized_state(name):
  """Each single-pass optimizer on int8 state, step by step against its float32 self: the
  float32 optimizer restored from the int8 one's checkpoint (the dequantized state, exactly)
  takes the same step; the params agree, and the int8 optimizer's new codes and scales are the
  float32 one's new state quantized (restored into an int8 optimizer)."""
  make = OPTIMIZERS[name]
  q_opt = make(state_dtype="int8").create(_tree())
  assert any(Q.is_quantized(b) for bufs in q_opt.state.param_states.fields.values()
             for b in bufs)
  f_opt = make().create(_tree())
  step = jax.jit(lambda o, g: o.apply_gradient(g))
  n_leaves = len(q_opt.state.param_states.layout.segments)
  for s in range(2):
    g = _grads(s)
    f_opt = serialization.from_state_dict(f_opt, serialization.to_state_dict(q_opt))
    q_opt, f_opt = step(q_opt, g), step(f_opt, g)
    for a, b in zip(jax.tree_util.tree_leaves(q_opt.target),
                    jax.tree_util.tree_leaves(f_opt.target)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    want = serialization.from_state_dict(q_opt, serialization.to_state_dict(f_opt))
    for k in q_opt.state.param_states.fields:
      for i in range(n_leaves):
        got = q_opt.state.param_states.stored_leaf(k, i)
        ref = want.state.param_states.stored_leaf(k, i)
        if Q.is_quantized(got):
          np.testing.assert_allclose(np.asarray(got.scales), np.asarray(ref.scales), rtol=1e-6)
          diff = np.abs(np.asarray(got.codes, int) - np.asarray(ref.codes, int))
          assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size // 1000, (k, diff.max())
        else:
          np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-30)
  for leaf in jax.tree_util.tree_leaves(q_opt.state.param_states.per_leaf()):
    assert leaf.dtype == jnp.float32


def test_lamb_trust_ratio_reads_the_stored_moments():
  """LAMB's apply stage reads the moments as stored, so its per-tensor ||u|| is taken over the
  dequantized new moments too (run_quantized): on gradients of one magnitude, where 8 bits
  lose little, the update is the float32 LAMB's within 2%; and ||u|| is exactly the norm of the
  u the apply stage computes from the stored state."""
  rng = np.random.RandomState(0)
  g = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.choice([-1, 1], x.shape) * rng.uniform(0.5, 2, x.shape),
                            jnp.float32), _tree())
  q_opt = optim.LAMB(1e-2, state_dtype="int8").create(_tree())
  f_opt = optim.LAMB(1e-2).create(_tree())
  q_new, f_new = q_opt.apply_gradient(g), f_opt.apply_gradient(g)
  for k in ("w", "e", "b"):
    dq = np.asarray(q_new.target[k] - q_opt.target[k])
    df = np.asarray(f_new.target[k] - f_opt.target[k])
    assert np.linalg.norm(dq - df) <= 0.02 * np.linalg.norm(df), k
  # the trust ratio from the stored moments: |update| = lr * ||p|| / ||u|| * |u|
  st = q_new.state.param_states
  m, v = np.asarray(st["e"].grad_ema), np.asarray(st["e"].grad_sq_ema)
  u = (m / 0.1) / (np.sqrt(v / 0.001) + 1e-6)
  p = np.asarray(q_opt.target["e"])
  want = -1e-2 * np.linalg.norm(p) / np.linalg.norm(u) * u
  np.testing.assert_allclose(np.asarray(q_new.target["e"]) - p, want, rtol=2e-4, atol=1e-8)


def test_quantized_group_runs_on_jnp_with_a_warning_for_kernel_backends(monkeypatch):
  """An explicit backend without a quantized kernel (here Pallas interpret mode with its
  kernel removed) warns and runs quantized groups on jnp."""
  import dataclasses   # pylint: disable=import-outside-toplevel
  from fusedopt.kernels import pallas   # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(pallas.BACKENDS, "pallas_interpret", dataclasses.replace(
      pallas.BACKENDS["pallas_interpret"], run_quantized=None))
  opt = optim.Adam(1e-2, state_dtype="int8", backend="pallas_interpret").create(_tree())
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    new = opt.apply_gradient(_grads(0))
  assert any("no kernel for quantized state" in str(x.message) for x in w)
  ref = optim.Adam(1e-2, state_dtype="int8", backend="jnp").create(_tree()).apply_gradient(
      _grads(0))
  for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pallas_interpret_takes_the_jnp_paths_int8_steps():
  """``backend="pallas_interpret"`` runs int8 groups on the Pallas kernel (no warning): three
  Adam steps equal the jnp path's but for XLA's contractions (codes at most one apart, in at
  most 1 of 1000; params within float32 rounding)."""
  opts = {b: optim.Adam(1e-2, weight_decay=0.01, state_dtype="int8", backend=b).create(_tree())
          for b in ("pallas_interpret", "jnp")}
  step = jax.jit(lambda o, g: o.apply_gradient(g))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for s in range(3):
      opts = {b: step(o, _grads(s)) for b, o in opts.items()}
  a, b = opts["pallas_interpret"], opts["jnp"]
  for x, y in zip(jax.tree_util.tree_leaves(a.target), jax.tree_util.tree_leaves(b.target)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  quantized = 0
  for k in a.state.param_states.fields:
    for qa, qb in zip(a.state.param_states.fields[k], b.state.param_states.fields[k]):
      if Q.is_quantized(qa):
        quantized += 1
        diff = np.abs(np.asarray(qa.codes, int) - np.asarray(qb.codes, int))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size // 1000
        np.testing.assert_allclose(np.asarray(qa.scales), np.asarray(qb.scales), rtol=1e-6)
  assert quantized == 2


# ----------------------------------------------------------------------------- checked step, master

def test_skipped_checked_step_keeps_codes_and_scales_bitwise():
  opt = optim.Adam(1e-2, state_dtype="int8").create(_tree())
  opt = opt.apply_gradient(_grads(0))
  bad = _grads(1)
  bad["w"] = bad["w"].at[3, 4].set(jnp.nan)
  new, finite, _ = opt.apply_gradient_checked(bad)
  assert not bool(finite)
  for a, b in zip(jax.tree_util.tree_leaves(new.state), jax.tree_util.tree_leaves(opt.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  good, finite, _ = opt.apply_gradient_checked(_grads(1))
  plain = opt.apply_gradient(_grads(1))
  assert bool(finite)   # a finite step is the plain step (XLA may contract multiply-adds
  for a, b in zip(jax.tree_util.tree_leaves(good), jax.tree_util.tree_leaves(plain)):  # apart)
    tol = 1 if a.dtype == jnp.uint8 else 0
    if tol:
      assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1
    else:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["int8", "float8_e4m3fn"])
def test_master_weights_with_quantized_moments(kind):
  """bf16 params, float32 master (never quantized), quantized moments: the master follows the
  float32-param optimizer with the same quantized state."""
  opt = optim.Adam(1e-2, state_dtype=kind, master_weights=True).create(_tree(jnp.bfloat16))
  ref = optim.Adam(1e-2, state_dtype=kind).create(
      jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), _tree(jnp.bfloat16)))
  assert not any(Q.is_quantized(b) for b in opt.state.param_states.fields["master"])
  for s in range(3):
    opt = opt.apply_gradient(_grads(s, jnp.bfloat16))
    ref = ref.apply_gradient(jax.tree_util.tree_map(lambda x: x.astype(jnp.float32),
                                                    _grads(s, jnp.bfloat16)))
  master = opt.state.param_states.per_leaf()
  for k in ("w", "e", "b"):
    np.testing.assert_array_equal(np.asarray(master[k].master), np.asarray(ref.target[k]))
    assert opt.target[k].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- checkpoints

def _trained(kind, steps=2):
  opt = optim.Adam(1e-2, state_dtype=kind).create(_tree())
  for s in range(steps):
    opt = opt.apply_gradient(_grads(s))
  return opt


@pytest.mark.parametrize("kind", ["int8", "float8_e4m3fn"])
def test_checkpoint_round_trip_is_lossless(kind):
  opt = _trained(kind)
  sd = serialization.to_state_dict(opt)
  leaf = sd["state"]["param_states"]["w"]["grad_ema"]
  assert set(leaf) == {"codes", "scales", "format"} and leaf["codes"].dtype == jnp.uint8
  assert sd["state"]["param_states"]["b"]["grad_ema"].dtype == jnp.float32
  fresh = optim.Adam(1e-2, state_dtype=kind).create(_tree())
  back = serialization.from_bytes(fresh, serialization.to_bytes(opt))
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(opt)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(back.apply_gradient(_grads(5)).target["w"]),
                                np.asarray(opt.apply_gradient(_grads(5)).target["w"]))


def test_float_checkpoint_into_int8_quantizes_and_back_dequantizes():
  f_opt = _trained(None)
  q_opt = optim.Adam(1e-2, state_dtype="int8").create(_tree())
  q_back = serialization.from_bytes(q_opt, serialization.to_bytes(f_opt))
  for name in ("w", "e"):
    ref = np.asarray(f_opt.state.param_states[name].grad_sq_ema).reshape(-1)
    n = ref.size
    padded = np.zeros(-(-n // B) * B, np.float32)
    padded[:n] = ref
    c, s = np_quantize(padded, Q.INT8_UNSIGNED)
    leaf = q_back.state.param_states.stored_leaf(
        "grad_sq_ema", [seg.path for seg in q_back.state.param_states.layout.segments].index(
            f"['{name}']"))
    np.testing.assert_array_equal(np.asarray(leaf.codes).reshape(-1), c[:n])
    np.testing.assert_array_equal(np.asarray(leaf.scales), s)
  np.testing.assert_array_equal(np.asarray(q_back.state.param_states["b"].grad_ema),
                                np.asarray(f_opt.state.param_states["b"].grad_ema))
  # and an int8 checkpoint into a float32 optimizer: the dequantized values
  q_opt = _trained("int8")
  f_back = serialization.from_bytes(optim.Adam(1e-2).create(_tree()), serialization.to_bytes(q_opt))
  for name in ("w", "e", "b", "s"):
    np.testing.assert_array_equal(np.asarray(f_back.state.param_states[name].grad_ema),
                                  np.asarray(q_opt.state.param_states[name].grad_ema))


def test_checkpoint_with_wrong_codes_is_an_error_and_changes_nothing():
  opt = _trained("int8")
  sd = serialization.to_state_dict(opt)
  sd["state"]["param_states"]["w"]["grad_ema"]["codes"] = np.zeros((70, 91), np.uint8)
  with pytest.raises(ValueError, match="codes"):
    opt.restore_state(sd)
  sd = serialization.to_state_dict(opt)
  sd["state"]["param_states"]["w"]["grad_ema"]["scales"] = np.zeros((3,), np.float32)
  with pytest.raises(ValueError, match="scales"):
    opt.restore_state(sd)
  sd = serialization.to_state_dict(opt)
  sd["state"]["param_states"]["w"]["grad_ema"]["format"] = np.asarray([9, 256], np.int32)
  with pytest.raises(ValueError, match="format"):
    opt.restore_state(sd)


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("kind", ["int8", "float8_e4m3fn"])
def test_adam_state_bytes_per_param(kind):
  """A GPT-2-like tree (big matrices, small biases and norms): int8/fp8 Adam state within
  2.05 B/param (float32: 8), besides the quantized group's padding to whole 128-block rows
  (``QUANTIZED_TILE_BLOCKS``; at most 127 blocks: on this 3.1M-parameter tree 0.02 B/param, on
  GPT-2 124M 0.0005)."""
  params = {"emb": jax.ShapeDtypeStruct((5000, 256), jnp.float32),
            **{f"h{i}": {"qkv": jax.ShapeDtypeStruct((256, 768), jnp.float32),
                         "mlp": jax.ShapeDtypeStruct((256, 1024), jnp.float32),
                         "bias": jax.ShapeDtypeStruct((1024,), jnp.float32),
                         "ln": jax.ShapeDtypeStruct((256,), jnp.float32)} for i in range(4)}}
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  state = jax.eval_shape(optim.Adam(1e-3, state_dtype=kind).init_state, params)
  nbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(state.param_states))
  layout = state.param_states.layout
  (qi,) = [i for i, g in enumerate(layout.groups) if g.block]
  q, unit = layout.groups[qi], layout.unit(qi)
  tiles = q.size - sum(-(-layout.segments[i].size // unit) * unit for i in q.segments)
  assert 0 <= tiles < QUANTIZED_TILE_BLOCKS * q.block
  assert (nbytes - 2 * tiles * (1 + 4 / q.block)) / n <= 2.05, nbytes / n


def test_flax_per_leaf_form_is_refused():
  with pytest.raises(NotImplementedError, match="per-leaf"):
    optim.Adam(1e-2, state_dtype="int8").init_param_state(jnp.ones((3,)))


# ----------------------------------------------------------------------------- training

def test_digits_mlp_reaches_float32_adams_loss():
  """Digits MLP, 3 epochs: int8 and fp8 Adam state reach float32 Adam's final loss (mean over
  the last epoch) within 2% (and not suspiciously far below it)."""
  from fusedopt.demo import init_mlp, load_data, loss_fn
  (x, y), _ = load_data(0)
  bs = 64
  n = len(x) // bs
  rng = np.random.default_rng(0)
  idx = np.concatenate([rng.permutation(len(x))[:n * bs] for _ in range(3)]).reshape(-1, bs)
  xs, ys = jnp.asarray(x[idx]), jnp.asarray(y[idx])
  sizes = [64, 128, 128, 10]

  def train(kind):
    opt = optim.Adam(3e-3, state_dtype=kind).create(init_mlp(0, sizes))

    def body(opt, batch):
      loss, g = jax.value_and_grad(loss_fn)(opt.target, batch)
      return opt.apply_gradient(g), loss
    _, losses = jax.jit(lambda o: jax.lax.scan(body, o, (xs, ys)))(opt)
    return float(jnp.mean(losses[-n:]))

  base = train(None)
  for kind in ("int8", "float8_e4m3fn"):
    got = train(kind)
    assert got <= 1.02 * base and got >= 0.8 * base, (kind, got, base)


def test_tiny_transformer_lm_reaches_float32_adams_loss():
  """examples/tiny_lm.py with a smaller budget (300 steps of 8 sequences, through the loss
  drop where the model learns the chain): int8 and fp8 Adam state end within 2% of float32's
  loss (one-sided), and not suspiciously far below it."""
  import importlib.util   # pylint: disable=import-outside-toplevel
  import os   # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_lm.py")
  spec = importlib.util.spec_from_file_location("tiny_lm", path)
  lm = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lm)
  data = lm.sample_batches(lm.markov_chain(0), 300, 8, 1)
  base = lm.final(lm.train(None, data, 3e-3))
  assert base < 0.6 * np.log(lm.VOCAB)   # it learned (uniform: log 16 = 2.77)
  for kind in ("int8", "float8_e4m3fn"):
    got = lm.final(lm.train(kind, data, 3e-3))
    assert 0.8 * base <= got <= 1.02 * base, (kind, got, base)


# ----------------------------------------------------------------------------- composition

def test_multi_optimizer_fused_equals_unfused():
  """Two int8 Adams with their own learning rates fuse into one pass over one quantized
  layout; the result is the unfused MultiOptimizer's (each part on its own state)."""
  big = optim.ModelParamTraversal(lambda path, _: path in ("/w", "/b"))
  rest = optim.ModelParamTraversal(lambda path, _: path not in ("/w", "/b"))

  def make(fuse):
    return optim.MultiOptimizer((big, optim.Adam(1e-2, state_dtype="int8")),
                                (rest, optim.Adam(3e-3, state_dtype="int8")), fuse=fuse)
  fused, unfused = make(True).create(_tree()), make(False).create(_tree())
  assert any(Q.is_quantized(b) for b in fused.state.param_states.flat.fields["grad_ema"])
  for s in range(3):
    fused, unfused = fused.apply_gradient(_grads(s)), unfused.apply_gradient(_grads(s))
  for a, b in zip(jax.tree_util.tree_leaves(fused.target),
                  jax.tree_util.tree_leaves(unfused.target)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  for k in ("w", "e"):
    np.testing.assert_allclose(np.asarray(fused.state.param_states[k].grad_sq_ema),
                               np.asarray(unfused.state.param_states[k].grad_sq_ema), rtol=1e-6)


# ----------------------------------------------------------------------------- fusedopt.tx

def _tx_codes(f_state, q_state):
  """Pairs (a quantized leaf of ``q_state``, NumPy's (codes, scales) of the float32 state
  ``f_state``'s leaf in its place, over its zero-padded blocks): what storing ``f_state`` as
  ``q_state`` is stored gives."""
  qs = jax.tree_util.tree_leaves(q_state, is_leaf=Q.is_quantized)
  fs = jax.tree_util.tree_leaves(f_state)
  assert len(qs) == len(fs)
  for q, f in zip(qs, fs):
    if Q.is_quantized(q):
      flat = np.zeros(q.size, np.float32)
      flat[:np.size(f)] = np.asarray(f, np.float32).ravel()
      yield q, np_quantize(flat, q.fmt)


TX_CASES = {
    "adamw-int8": lambda **kw: tx.adamw(1e-2, weight_decay=1e-2, **kw),
    "rmsprop-momentum-int8": lambda **kw: tx.rmsprop(1e-2, momentum=0.9, **kw),
    "adam-fp8-mu-bf16-nu": lambda **kw: tx.adam(1e-2, **kw),
}


@pytest.mark.parametrize("case, backend", [(c, "native") for c in sorted(TX_CASES)]
                         + [("adamw-int8", "jnp")])
def test_tx_quantized_state_takes_the_float32_step(case, backend):
  """``fusedopt.tx`` with ``state_dtype="int8"`` (or per field): optax's structure, each large
  leaf's field a ``QuantizedArray`` (signed map for ``mu``/``trace``, unsigned for ``nu``),
  small leaves float32. Step by step it takes the float32 transformation's step from its
  decoded state (``tx.dequantized``), and stores that step's new state quantized: codes equal
  NumPy's but for XLA's contractions on the jnp path (at most 1 in 1000, by one)."""
  storage = ({"mu": jnp.float8_e4m3fn, "nu": jnp.bfloat16} if "fp8" in case else "int8")
  make = TX_CASES[case]
  t_q = make(state_dtype=storage, backend=backend)
  t_f = make(backend=backend)
  params = {k: v for k, v in _tree().items() if k != "s"}
  st = t_q.init(params)
  node = st[0] if isinstance(st, tuple) else st
  first = node.mu if "rmsprop" not in case else node.nu
  assert Q.is_quantized(first["w"]) and not Q.is_quantized(first["b"])
  assert first["b"].dtype == jnp.float32
  if "int8" in case:
    assert {node.nu["w"].fmt} == {Q.INT8_UNSIGNED}
  p = params
  for k in range(3):
    g = {n: v for n, v in _grads(k).items() if n != "s"}
    f_state = tx.dequantized(st, params)
    u_f, st_f = t_f.update(g, f_state, p)
    u_q, st = t_q.update(g, st, p)
    for a, b in zip(jax.tree_util.tree_leaves(u_q), jax.tree_util.tree_leaves(u_f)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    for x, (codes, scales) in _tx_codes(st_f, st):
      np.testing.assert_allclose(np.asarray(x.scales), scales, rtol=1e-6)
      diff = np.abs(np.asarray(x.codes, int) - codes.astype(int))
      assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size // 1000, diff.max()
    p = optax.apply_updates(p, u_q)
  new_p, _ = jax.jit(lambda g, s, p: tx.update_and_apply(t_q, g, s, p))(g, st, p)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(new_p))


def test_tx_quantized_state_errors_are_clear():
  with pytest.raises(optim.HyperParamError, match="int8"):
    tx.adam(1e-2, state_dtype=jnp.int32)
  with pytest.raises(optim.HyperParamError, match="schedule_free"):
    tx.schedule_free_adamw(1e-2, state_dtype="int8")
  with pytest.raises(optim.HyperParamError, match="centered RMSProp"):
    tx.rmsprop(1e-2, centered=True, state_dtype="int8")
  with pytest.raises(optim.HyperParamError, match="centered RMSProp"):
    optim.RMSProp(1e-2, centered=True, state_dtype={"v": jnp.float32, "mg": "int8"})
  t = tx.adam(1e-2, state_dtype="int8")
  params = {"w": jnp.zeros((5000,))}
  st = t.init(params)
  wrong = (st[0]._replace(mu={"w": Q.QuantizedArray.zeros(512, Q.INT8_SIGNED)}),) + st[1:]
  with pytest.raises(optim.LayoutError, match="codes"):
    t.update(params, wrong, params)


def test_tx_lamb_quantized_native_equals_jnp():
  """``tx.lamb(state_dtype="int8")``: the trust ratio's norms come from the moments as stored
  (per leaf, in the same call as the moments); the native kernels and the jnp path agree."""
  params = {k: v for k, v in _tree().items() if k != "s"}
  outs = {}
  for backend in ("native", "jnp"):
    t = tx.lamb(1e-2, weight_decay=1e-2, state_dtype="int8", backend=backend)
    st, p = t.init(params), params
    for k in range(2):
      u, st = t.update({n: v for n, v in _grads(k).items() if n != "s"}, st, p)
      p = optax.apply_updates(p, u)
    outs[backend] = p
  for a, b in zip(jax.tree_util.tree_leaves(outs["native"]),
                  jax.tree_util.tree_leaves(outs["jnp"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_tx_quantized_state_through_flax_serialization():
  """An optax state of ``tx.adamw(state_dtype="int8")`` goes through ``flax.serialization``
  (``to_bytes``/``from_bytes``, what flax's TrainState checkpoints use) bitwise; restored into
  an fp8 template it is decoded and encoded again; a wrong shape raises."""
  flax_ser = pytest.importorskip("flax.serialization")
  params = {"w": jnp.asarray(np.random.RandomState(0).standard_normal((70, 90)), jnp.float32),
            "b": jnp.zeros((90,))}
  t = tx.adamw(1e-2, state_dtype="int8")
  _, st = t.update(params, t.init(params), params)
  blob = flax_ser.to_bytes(st)
  back = flax_ser.from_bytes(t.init(params), blob)
  for a, b in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  fp8 = tx.adamw(1e-2, state_dtype=jnp.float8_e4m3fn).init(params)
  conv = flax_ser.from_bytes(fp8, blob)
  mu = conv[0].mu["w"]
  assert mu.fmt is Q.FLOAT8_E4M3
  want = np.asarray(st[0].mu["w"].dequantize())
  np.testing.assert_allclose(np.asarray(mu.dequantize()), want, rtol=2 ** -3,
                             atol=float(np.abs(want).max()) * 2 ** -9)
  small = tx.adamw(1e-2, state_dtype="int8").init({"w": jnp.zeros((80, 90)), "b": params["b"]})
  with pytest.raises(ValueError, match="codes"):
    flax_ser.from_bytes(small, blob)
