"""The benchmark's machinery (bench/): correctness gate, bytes model, HLO counter, outputs.

Runs `python -m bench`'s main() on tiny trees with one or two timed steps, so the whole file takes
seconds; the timings themselves are not checked.
"""
import dataclasses
import functools
import gc
import json
import os
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from bench import __main__ as cli  # noqa: E402
from bench import impls, measure, optims, trees  # noqa: E402
from fusedopt.flat_state import ParamState  # noqa: E402

TINY = {"dense": {"kernel": (16, 8), "bias": (8,)}, "ln": {"scale": (8,)}}


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap():
  """The bench calls ``gc.collect()`` as each runner closes (so a GPU frees its buffers before
  the next one allocates): in a pytest worker that has run other files first, each full
  collection walked a heap of ~700k objects (0.5 s; 41 s of the suite's CPU time, 2026-12-08).
  Frozen, what was alive before this file is not walked again; unfrozen after it, nothing
  leaks."""
  gc.collect()
  gc.freeze()
  yield
  gc.unfreeze()


@pytest.fixture
def tiny_trees(monkeypatch):
  """Three tiny trees, two of them a 'scale-' sweep (so the time plot has a line to draw)."""
  monkeypatch.setitem(trees.TREES, "tiny", lambda: TINY)
  monkeypatch.setitem(trees.TREES, "scale-t1", lambda: trees.gpt2_shapes(64, 8, 8, 1))
  monkeypatch.setitem(trees.TREES, "scale-t2", lambda: trees.gpt2_shapes(128, 16, 16, 2))


def run(tmp_path, *args):
  return cli.main(["--repeats", "2", "--warmup", "0", "--copy-mib", "1", "--no-progress",
                   "--out", str(tmp_path), *args])


def _rec(group, impl):
  return next(r for r in group["impls"] if r["impl"] == impl)


# ----------------------------------------------------------------------------- correctness gate

def test_check_catches_a_wrong_implementation(tmp_path, tiny_trees, monkeypatch):
  """An optax peer whose learning rate is 1% off is reported as a mismatch and not timed."""
  good = optims.OPTIMS["adam"]
  wrong = dataclasses.replace(
      good, optax_fn=lambda lr, h: optax.adamw(1.01 * lr, b1=h["beta1"], b2=h["beta2"],
                                               eps=h["eps"], weight_decay=h["weight_decay"]))
  monkeypatch.setitem(optims.OPTIMS, "adam", wrong)
  out = run(tmp_path, "--trees", "tiny", "--optims", "adam", "--impls", "optax,flax-loop,jnp",
            "--no-plots")
  (group,) = out["results"]
  assert group["reference"] == "jnp"
  bad = _rec(group, "optax")
  assert not bad["check"]["ok"] and bad["check"]["mismatched_elements"] > 0
  assert 5e-3 < bad["check"]["update_rel_err"] < 2e-2
  assert "step" not in bad
  assert _rec(group, "flax-loop")["check"]["ok"] and "step" in _rec(group, "flax-loop")
  assert any("optax: does not match jnp" in n for n in out["notes"])
  md = open(tmp_path / f"cpu-{out['date']}-custom.md").read()
  assert "MISMATCH vs jnp" in md and "not timed" in md


def test_update_check_catches_a_small_error(tmp_path, tiny_trees, monkeypatch):
  """A weight decay 10x too large moves the params by less than rtol, but not the update."""
  o = optims.OPTIMS["momentum"]
  wrong = dataclasses.replace(
      o, optax_fn=lambda lr, h: optax.chain(optax.add_decayed_weights(10 * h["weight_decay"]),
                                            optax.sgd(lr, momentum=h["beta"])))
  monkeypatch.setitem(optims.OPTIMS, "momentum", wrong)
  out = run(tmp_path, "--trees", "tiny", "--optims", "momentum", "--impls", "optax,jnp",
            "--no-plots")
  chk = _rec(out["results"][0], "optax")["check"]
  assert chk["mismatched_elements"] == 0  # the params alone pass rtol
  assert chk["update_rel_err"] > 1e-3 and not chk["ok"]


def test_first_moment_mismatch_is_caught():
  ref = np.arange(6, dtype=np.float32)
  assert measure.compare_vectors(ref, ref.copy(), 1e-4, 1e-6)["ok"]
  assert not measure.compare_vectors(ref, ref + 1e-2, 1e-4, 1e-6)["ok"]
  assert not measure.compare_vectors(ref, ref[:5], 1e-4, 1e-6)["ok"]
  assert measure.compare_vectors(None, ref, 1e-4, 1e-6) is None


@pytest.mark.parametrize("name", ["optax", "optax-flatten", "flax-loop", "jnp"])
@pytest.mark.parametrize("optim", ["adam", "momentum"])
def test_moment_extraction_agrees(name, optim):
  """Every implementation's first moment comes out in the same (tree_leaves) order."""
  o = optims.OPTIMS[optim]
  p0 = trees.host_tree(TINY, seed=0, scale=0.02)
  g = jax.device_put(trees.host_tree(TINY, seed=1, scale=0.01))
  r = measure.Runner(impls.make(name, o), p0, g, impls.lr_array())
  r.compile()
  r.sync_step()
  # After one step from zero state the first moment is (1-b1)*g for Adam, g + wd*p for Momentum.
  want = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])
  if optim == "adam":
    want = (1 - o.hp["beta1"]) * want
  else:
    want = want + o.hp["weight_decay"] * np.concatenate(
        [np.ravel(x) for x in jax.tree_util.tree_leaves(p0)])
  np.testing.assert_allclose(r.moment_host(), want, rtol=1e-5, atol=1e-9)


@pytest.mark.ci_may_skip("torch is not in the `test` extra: runs where torch is installed")
def test_torch_rows(tmp_path, tiny_trees, monkeypatch):
  """torch.optim.AdamW / SGD (fused and foreach) agree with fusedopt and get the torch ratios.
  torch on CPU stands in for CUDA here (the bench runs the torch rows only with CUDA)."""
  pytest.importorskip("torch")
  monkeypatch.setattr(impls, "TORCH_DEVICE", "cpu")
  monkeypatch.setattr(impls, "torch_cuda", lambda: True)
  out = run(tmp_path, "--trees", "tiny", "--optims",
            "adam,momentum,lamb,adam-bf16-master,momentum-bf16-master,adam-state-bf16",
            "--impls", "optax,jnp,torch-fused,torch-foreach", "--no-plots")
  for g in out["results"]:
    if g["optim"] in ("lamb", "adam-state-bf16"):
      assert set(g["skipped"]) == {"torch-fused", "torch-foreach"}
      continue
    for name in ("torch-fused", "torch-foreach"):
      rec = _rec(g, name)
      assert rec["check"]["ok"], (g["optim"], name, rec["check"])
      assert "first_moment" in rec["check"] and rec["vs_torch_fused"]["runs"] == 2
      if g["optim"].endswith("-master"):   # torch on float32 params vs fusedopt's master
        assert rec["check"]["compared_as"] == "float32 master" and "float32 params" in rec["label"]
    assert _rec(g, "jnp")["vs_torch_fused"]["runs"] == 2


# ----------------------------------------------------------------------------- bytes model

def test_bytes_model():
  shapes = [(10,), (3, 4)]
  for name, bpp in (("adam", 28), ("momentum", 20), ("lamb", 40), ("sgd", 12)):
    assert optims.OPTIMS[name].bytes_per_step(shapes) == bpp * 22
  af = optims.OPTIMS["adafactor"]
  # 256 x 128: factored (24 B/param) + v_row, v_col read and written
  assert af.bytes_per_step([(256, 128)]) == 24 * 256 * 128 + 8 * (256 + 128)
  # 1-D and narrow 2-D leaves keep a full v: 32 B/param
  assert af.bytes_per_step([(5,), (4, 300)]) == 32 * (5 + 1200)
  assert optims.adafactor_leaf_bytes((256, 128), momentum=True) == 32 * 256 * 128 + 8 * 384


def test_bytes_model_mixed_precision():
  """The variants' models (B/param) and their peers' (the GB/s of the peer rows)."""
  shapes = [(10,), (3, 4)]
  want = {"adam-bf16-master": (28, 28), "adam-bf16-sr": (22, 28), "adam-state-bf16": (20, 24),
          "momentum-bf16-master": (20, 20), "lamb-bf16-master": (40, 40)}
  assert set(want) == set(optims.MIXED_OPTIMS)
  for name, (bpp, peer_bpp) in want.items():
    o = optims.OPTIMS[name]
    assert o.bytes_per_step(shapes) == bpp * 22, name
    assert o.bytes_per_step(shapes, "jnp") == o.bytes_per_step(shapes, "flax-loop") == bpp * 22
    for peer in ("optax", "optax-flatten", "torch-fused"):
      assert o.bytes_per_step(shapes, peer) == peer_bpp * 22, (name, peer)
    assert o.bytes_note and o.desc
  assert optims.OPTIMS["adam"].bytes_per_step(shapes, "optax") == 28 * 22


def test_adafactor_factoring_matches_fusedopt():
  """The bytes model factors exactly the leaves fusedopt's Adafactor factors."""
  opt = optims.OPTIMS["adafactor"].fusedopt_def("jnp")
  for shape in [(5,), (4, 300), (128, 128), (3, 200, 129), (127, 500)]:
    theirs = opt._factored_dims(shape)  # pylint: disable=protected-access
    assert (optims.factored_dims(shape) is None) == (theirs is None), shape


def test_every_optimizer_agrees_with_its_peers():
  """Two steps of each optimizer's optax spelling match fusedopt's jnp path (the hp mapping).
  Mixed-precision variants: fusedopt on the variant's dtype, optax on its peer's (the same values
  upcast), fusedopt's float32 master vs optax's params; a peer of another formulation (not
  compared by the bench) must differ, or it would not need excusing."""
  shapes = TINY | {"w": (130, 129)}
  for name, o in optims.OPTIMS.items():
    dt, peer_dt = o.input_dtype("jnp"), o.input_dtype("optax")
    p = impls.cast(trees.host_tree(shapes, seed=0, scale=0.5), dt)
    g = impls.cast(trees.host_tree(shapes, seed=1, scale=0.1), dt)
    tx = o.optax_tx(optims.LR)
    params, g_peer = impls.cast(p, peer_dt), impls.cast(g, peer_dt)
    state = tx.init(params)
    opt = o.fusedopt_def("jnp").create(jax.tree_util.tree_map(jnp.asarray, p))
    for _ in range(2):
      u, state = tx.update(g_peer, state, params)
      params = optax.apply_updates(params, u)
      opt = opt.apply_gradient(jax.tree_util.tree_map(jnp.asarray, g))
    ours = opt.target
    if o.master_weights:
      ours = opt.state.param_states.per_leaf()
      ours = jax.tree_util.tree_map(lambda s: s["master"], ours,
                                    is_leaf=lambda x: isinstance(x, ParamState))
    pairs = list(zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ours)))
    close = all(np.allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5,
                            atol=1e-7) for a, b in pairs)
    if o.compared("optax"):
      assert close and all(np.asarray(b).dtype == np.float32 for _, b in pairs), name
    else:
      assert not close and o.peer.why, name


MIXED = ",".join(optims.MIXED_OPTIMS)


def test_mixed_precision_variants(tmp_path, tiny_trees):
  """Every variant on the tiny tree: the fusedopt backends and the flax-loop per-leaf path agree
  with the jnp reference (params in bf16 within one ulp, master and moments in float32); the
  master variants' float32 peers agree with the master; the other peers are timed, not compared;
  GB/s uses each row's own bytes model."""
  # (on a CPU with a compiler ``auto`` runs the native kernels: that row stands for them;
  # optax.flatten's row is optax's peer handling again, on one buffer)
  names = ["optax", "flax-loop", "jnp", "auto"]
  out = run(tmp_path, "--trees", "tiny", "--optims", MIXED, "--impls", ",".join(names),
            "--no-plots")
  n = trees.num_params(TINY)
  assert [g["optim"] for g in out["results"]] == list(optims.MIXED_OPTIMS)
  for g in out["results"]:
    o = optims.OPTIMS[g["optim"]]
    assert g["reference"] == "jnp" and g["param_dtype"] == o.param_dtype
    assert g["bytes_per_step"] == o.bytes_per_param * n
    for rec in g["impls"]:
      chk, where = rec["check"], (g["optim"], rec["impl"])
      assert "step" in rec and chk["ok"], (where, chk)
      bytes_ = o.bytes_per_step([TINY["dense"]["kernel"], TINY["dense"]["bias"],
                                 TINY["ln"]["scale"]], rec["impl"])
      assert rec.get("bytes_per_step", g["bytes_per_step"]) == bytes_, where
      assert abs(rec["gb_s"] - bytes_ / rec["step"]["median_s"] / 1e9) <= 1e-9 * rec["gb_s"]
      if rec["impl"] == "jnp":
        continue
      if rec["impl"].startswith("optax") and o.peer is not None and not o.peer.compared:
        assert chk["compared"] is False and chk["note"] == o.peer.why, where
        assert "bytes_per_step" in rec and f"{o.peer.bytes_per_param} B/param" in rec["label"]
        continue
      assert chk["compared_as"] == ("float32 master" if o.master_weights else "params"), where
      assert chk["update_rel_err"] <= 1e-3, where
      assert chk["first_moment"]["ok"], where
      # between fusedopt's own paths the bf16 params are compared too
      if o.master_weights and not rec["impl"].startswith("optax"):
        assert chk["params"]["ok"], where
  md = (tmp_path / f"cpu-{out['date']}-custom.md").read_text()
  assert "## adam-bf16-sr (22 B/param" in md and "## adam-state-bf16 (20 B/param" in md
  assert "not compared (below)" in md and "- not compared for adam-bf16-sr: optax" in md
  assert "MISMATCH" not in md
  data = json.loads((tmp_path / f"cpu-{out['date']}-custom.json").read_text())
  v = data["settings"]["variants"]["adam-bf16-master"]
  assert v["param_dtype"] == "bfloat16" and v["fusedopt_options"] == {"master_weights": True}
  assert v["peer"]["compared"] and v["peer"]["param_dtype"] == "float32"


def test_mixed_precision_inputs():
  """A variant's fusedopt rows step on its dtype; its float32 peers on the same values upcast."""
  o = optims.OPTIMS["adam-bf16-master"]
  inp = impls.Inputs(TINY, o)
  p, g = inp.for_impl("jnp")
  pp, gp = inp.for_impl("optax")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves((p, g)))
  assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves((pp, gp)))
  for a, b in zip(jax.tree_util.tree_leaves((p, g)), jax.tree_util.tree_leaves((pp, gp))):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))
  assert inp.for_impl("flax-loop")[0] is p and inp.for_impl("torch-fused")[0] is pp
  f32 = impls.Inputs(TINY, optims.OPTIMS["adam-state-bf16"])
  assert f32.for_impl("jnp")[0] is f32.for_impl("optax")[0]        # float32 both: one copy
  assert optims.OPTIMS["adam-state-bf16"].fusedopt_def("jnp").state_storage == jnp.bfloat16


def test_mixed_precision_peer_mismatch_is_caught(tmp_path, tiny_trees, monkeypatch):
  """A compared peer (adam-bf16-master's float32 adamw) with a 1% wrong learning rate fails the
  check against fusedopt's float32 master; a 1-ulp bf16 difference passes ``compare``."""
  o = optims.OPTIMS["adam-bf16-master"]
  wrong = dataclasses.replace(
      o, optax_fn=lambda lr, h: optax.adamw(1.01 * lr, b1=h["beta1"], b2=h["beta2"],
                                            eps=h["eps"], weight_decay=h["weight_decay"]))
  monkeypatch.setitem(optims.OPTIMS, "adam-bf16-master", wrong)
  out = run(tmp_path, "--trees", "tiny", "--optims", "adam-bf16-master", "--impls", "optax,jnp",
            "--no-plots")
  chk = _rec(out["results"][0], "optax")["check"]
  assert not chk["ok"] and chk["compared_as"] == "float32 master"
  x = np.array([1.0, 3.0], jnp.bfloat16)
  up = (x.view(np.uint16) + 1).view(jnp.bfloat16)
  assert measure.compare({"a": x}, {"a": up}, 1e-4, 1e-6)["ok"]
  assert not measure.compare({"a": x.astype(np.float32)}, {"a": up.astype(np.float32)}, 1e-4,
                             1e-6)["ok"]
  assert not measure.compare({"a": x}, {"a": (up.view(np.uint16) + 1).view(jnp.bfloat16)},
                             1e-4, 1e-6)["ok"]


def _snap(params, moment=None, master=None):
  return {"params": params, "moment": moment, "master": master}


def test_check_tolerances_of_lossy_variants():
  """Stochastic rounding: a few elements diverged by <= SR_MAX_ULPS pass (counted), many do not;
  bf16 state: a param element may differ by BF16_STATE_UPDATE_EPS of its own change, which the
  float32 variant does not allow."""
  rng = np.random.default_rng(0)
  n = 200_000
  p0 = {"w": (rng.standard_normal(n) * 0.02).astype(jnp.bfloat16)}
  ref = {"w": (p0["w"].astype(np.float32) + np.float32(3e-3)).astype(jnp.bfloat16)}
  sr = optims.OPTIMS["adam-bf16-sr"]

  def bumped(idx, ulps=2):
    w = ref["w"].copy().view(np.uint16)
    w[idx] += ulps
    return {"w": w.view(jnp.bfloat16)}

  chk = cli.check("native", "jnp", {"jnp": _snap(ref), "native": _snap(bumped([5, 77, 999]))},
                  p0, sr)
  assert chk["ok"] and chk["sr_diverged"] == 3 and chk["update_rel_err_over"] == "the whole tree"
  assert not cli.check("native", "jnp", {"jnp": _snap(ref), "native": _snap(bumped([5], 9))},
                       p0, sr)["ok"]                           # beyond SR_MAX_ULPS
  assert not cli.check("native", "jnp", {"jnp": _snap(ref),
                                         "native": _snap(bumped(np.arange(0, n, 100)))},
                       p0, sr)["ok"]                           # 1% of the elements
  assert not cli.check("native", "jnp", {"jnp": _snap(ref), "native": _snap(bumped([5, 77]))},
                       p0, optims.OPTIMS["adam"])["ok"]        # not stochastic: no allowance
  # bf16 state: float32 params, 100 of whose changes differ by 1% (< 2^-6) of themselves
  q0 = {"w": (rng.standard_normal(n) * 0.02).astype(np.float32)}
  qr = {"w": q0["w"] + np.float32(3e-3) * np.sign(rng.standard_normal(n)).astype(np.float32)}
  some = np.zeros(n, np.float32)
  some[::n // 100] = 1
  qg = {"w": qr["w"] + np.float32(0.01) * some * (qr["w"] - q0["w"])}
  snaps = {"jnp": _snap(qr), "native": _snap(qg)}
  chk = cli.check("native", "jnp", snaps, q0, optims.OPTIMS["adam-state-bf16"])
  assert chk["ok"] and chk["update_eps"] == cli.BF16_STATE_UPDATE_EPS
  assert not cli.check("native", "jnp", snaps, q0, optims.OPTIMS["adam"])["ok"]
  qg5 = {"w": qr["w"] + np.float32(0.05) * some * (qr["w"] - q0["w"])}
  assert not cli.check("native", "jnp", {"jnp": _snap(qr), "native": _snap(qg5)}, q0,
                       optims.OPTIMS["adam-state-bf16"])["ok"]


def test_implementations_per_optimizer():
  names = ["optax", "optax-flatten", "flax-loop", "auto", "native", "jnp"]
  kept, skipped = impls.for_optim(optims.OPTIMS["adafactor"], names)
  assert kept == ["optax", "auto"] and set(skipped) == {"optax-flatten", "flax-loop", "native",
                                                        "jnp"}
  kept, skipped = impls.for_optim(optims.OPTIMS["lamb"], names + ["torch-fused"])
  assert "optax-flatten" not in kept and set(skipped) == {"optax-flatten", "torch-fused"}
  assert impls.for_optim(optims.OPTIMS["adam"], names)[0] == names


def test_backends_that_cannot_run_here_are_skipped(tmp_path, tiny_trees, monkeypatch):
  """``--impls ...,pallas,triton`` on a CPU: those rows are skipped with the reason (a GPU runs
  them); ``auto`` always runs."""
  monkeypatch.setattr(impls.fusedopt, "available_backends",
                      lambda: ["jnp", "native", "pallas_interpret"])
  assert "triton" in impls.FUSEDOPT_BACKENDS and "triton" in impls.ALL_IMPLS
  kept, skipped = impls.for_optim(optims.OPTIMS["adam"], ["auto", "jnp", "pallas", "triton"])
  assert kept == ["auto", "jnp"] and set(skipped) == {"pallas", "triton"}
  assert "cannot run here" in skipped["triton"]
  assert "triton" not in impls.default_impls()
  out = run(tmp_path, "--trees", "tiny", "--optims", "adam", "--impls", "jnp,triton",
            "--no-plots")
  (group,) = out["results"]
  assert [r["impl"] for r in group["impls"]] == ["jnp"] and set(group["skipped"]) == {"triton"}
  assert not any("triton" in n for n in out["notes"])   # not a failure


# ----------------------------------------------------------------------------- HLO counter

_HLO = """HloModule m

%fused_computation (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  ROOT %m = f32[4]{0} multiply(%a, %a)
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4]{0} get-tuple-element(%t), index=1
  %f2 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation
  ROOT %r = (s32[], f32[4]{0}) tuple(%i, %f2)
}

%cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %c = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (p: f32[4]) -> (f32[4], f32[4]) {
  %p = f32[4]{0} parameter(0)
  %f = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_computation
  %cc = (f32[4]{0}, f32[4]{0}) custom-call(%f, %p), custom_call_target="k"
  %g0 = f32[4]{0} get-tuple-element(%cc), index=0
  %z = s32[] constant(0)
  %t = (s32[], f32[4]{0}) tuple(%z, %g0)
  %w = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%body
  %b = f32[4]{0} bitcast(%g0)
  %cp = f32[4]{0} copy(%b)
  ROOT %out = (f32[4]{0}, f32[4]{0}) tuple(%cp, %g0)
}
"""


def test_hlo_counts_synthetic():
  """ENTRY's fusion, custom-call and copy, plus the while body's fusion and condition's compare;
  not the fused computation's multiply, nor parameters, tuples, constants, bitcasts."""
  c = measure.hlo_counts(_HLO)
  assert c["by_op"] == {"compare": 1, "copy": 1, "custom-call": 1, "fusion": 2}
  assert (c["kernels"], c["fusions"], c["custom_calls"]) == (5, 2, 1)


def test_hlo_counts_compiled():
  """A compiled step: per-leaf optax has at least one fusion per leaf; fusedopt's flat step few."""
  leaves = {f"w{i}": jnp.ones((32, 8)) for i in range(6)}
  tx = optax.sgd(0.1)
  f = jax.jit(lambda p, g: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))
  c = measure.hlo_counts(f.lower(leaves, leaves).compile().as_text())
  assert c["fusions"] >= 6 and c["kernels"] >= c["fusions"]
  with pytest.raises(ValueError):
    measure.hlo_counts("not hlo")


# ----------------------------------------------------------------------------- outputs

def test_outputs_plots_and_links(tmp_path, tiny_trees):
  pytest.importorskip("matplotlib")
  out = run(tmp_path, "--trees", "scale-t1,scale-t2", "--optims", "adam",
            "--impls", "optax,jnp", "--tag", "t")
  stem = f"cpu-{out['date']}-t"
  for ext in ("json", "md", "time.png", "roofline.png"):
    path = tmp_path / (f"{stem}.{ext}" if ext in ("json", "md") else f"{stem}-{ext}")
    assert path.exists(), path
    if ext.endswith("png"):
      assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  md = (tmp_path / f"{stem}.md").read_text()
  assert f"]({stem}-time.png)" in md and f"]({stem}-roofline.png)" in md
  data = json.loads((tmp_path / f"{stem}.json").read_text())
  assert data["plots"] == {"time": f"{stem}-time.png", "roofline": f"{stem}-roofline.png"}
  assert [(g["tree"], g["optim"]) for g in data["results"]] == [
      ("scale-t1", "adam"), ("scale-t2", "adam")]
  for g in data["results"]:
    jnp_rec = _rec(g, "jnp")
    assert jnp_rec["check"]["reference"] and jnp_rec["step"]["runs"] == 2
    assert jnp_rec["vs_optax"]["runs"] == 2 and jnp_rec["compile"]["hlo"]["kernels"] > 0
    assert g["copy"]["gb_s"] > 0 and jnp_rec["pct_copy_bw"] > 0
  # a second run with the same tag does not replace the first
  out2 = run(tmp_path, "--trees", "tiny", "--optims", "sgd", "--impls", "jnp", "--tag", "t",
             "--no-plots")
  assert (tmp_path / f"{stem}-2.json").exists() and out2["results"][0]["optim"] == "sgd"
  assert json.loads((tmp_path / f"{stem}.json").read_text())["settings"]["optims"] == ["adam"]


def test_memory_batches(tmp_path, tiny_trees):
  """Over the memory budget the implementations run in batches: each still checked against the
  reference, ratios to optax across batches as a ratio of medians."""
  args = cli.resolve(cli.parse_args(["--trees", "scale-t2", "--optims", "adam",
                                     "--impls", "optax,flax-loop,jnp", "--copy-mib", "1"]))
  n = trees.num_params(trees.shapes("scale-t2"))
  args.mem_budget_gib = (4 * n * (1 + 5) + (1 << 20)) / (1 << 30)  # grads, one impl, copy
  ((_, _, batches, _),) = cli.plan(args)
  assert batches == [["jnp"], ["optax"], ["flax-loop"]]
  out = run(tmp_path, "--trees", "scale-t2", "--optims", "adam", "--impls", "optax,flax-loop,jnp",
            "--mem-budget-gib", str(args.mem_budget_gib), "--no-plots")
  (g,) = out["results"]
  assert g["reference"] == "jnp" and [r["impl"] for r in g["impls"]] == ["optax", "flax-loop",
                                                                         "jnp"]
  assert all(r["check"]["ok"] and r["step"]["runs"] == 2 for r in g["impls"])
  assert _rec(g, "flax-loop")["vs_optax"]["paired"] is False
  assert _rec(g, "optax")["vs_optax"]["runs"] == 2  # itself, same batch
  assert cli.split(["a", "b", "c"], 10, optims.OPTIMS["adam"], 1e12, 1) == [["a", "b", "c"]]


def test_paired_ratio():
  r = measure.paired_ratio([2.0, 4.0, 3.0], [1.0, 2.0, 1.0])
  assert r == {"median": 2.0, "min": 2.0, "max": 3.0, "runs": 3}
  assert measure.paired_ratio([1.0], None) is None


# ----------------------------------------------------------------------------- command line

def test_defaults_and_help(capsys):
  args = cli.resolve(cli.parse_args([]))
  assert args.tree_list == list(cli.default_trees("cpu"))
  assert args.optim_list == list(optims.DEFAULT_OPTIMS) and args.tag is None
  assert "native" not in args.impl_list and "auto" in args.impl_list
  q = cli.resolve(cli.parse_args(["--quick"]))
  assert q.tree_list == list(trees.QUICK_TREES) and q.optim_list == ["adam"] and q.tag == "quick"
  f = cli.resolve(cli.parse_args(["--full"]))
  assert "bert-base" in f.tree_list and f.tree_list[-1] == trees.SWEEP_MAX_CPU
  assert f.tag == "full" and "adafactor" in f.optim_list
  assert set(optims.MIXED_OPTIMS) <= set(f.optim_list)
  assert not set(optims.MIXED_OPTIMS) & set(args.optim_list)   # the default run is unchanged
  s = cli.resolve(cli.parse_args(["--sweep", "--sweep-max", "scale-3m", "--trees", "gpt-10m"]))
  assert s.tree_list == ["gpt-10m", "scale-1m", "scale-3m"] and s.tag == "custom"
  for bad in (["--trees", "nope"], ["--optims", "nope"], ["--impls", "nope"]):
    with pytest.raises(SystemExit):
      cli.resolve(cli.parse_args(bad))
  with pytest.raises(SystemExit) as e:
    cli.parse_args(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for opt in ("--device", "--optims", "--impls", "--sweep", "--full", "--out", "--no-progress"):
    assert opt in text


def test_trees():
  bert = trees.shapes("bert-base")
  assert trees.num_leaves(bert) == 199 and abs(trees.num_params(bert) - 109.48e6) < 0.1e6
  sizes = [trees.num_params(trees.shapes(t)) for t in trees.SWEEP]
  assert sizes == sorted(sizes) and 0.8e9 < sizes[-1] < 1.2e9
  assert trees.sweep("cpu")[-1] == "scale-100m" and trees.sweep("gpu")[-1] == "scale-1b"


def test_fresh_compile_probe_runs_in_a_subprocess():
  """--fresh-compile: each implementation's trace+compile timed in its own process."""
  out = cli.fresh_compile("scale-1m", "adam", "jnp")
  assert set(out) == {"trace_s", "lower_s", "compile_s", "trace_compile_s"}, out
  assert 0 < out["trace_compile_s"] < 120
  assert abs(out["trace_compile_s"] - (out["trace_s"] + out["lower_s"] + out["compile_s"])) < 1e-6
  bad = cli.fresh_compile("scale-1m", "adam", "no-such-impl")
  assert "error" in bad


def test_decide_ranks_backends_and_chooses_per_optimizer(tmp_path):
  """bench.decide: per (tree, optimizer) the checked backends fastest first (failed checks and
  peers left out), and per optimizer the backend fastest on most trees."""
  from bench import decide  # pylint: disable=import-outside-toplevel

  def row(impl, ms, ok=True, temp=0):
    return {"impl": impl, "step": {"median_s": ms / 1e3}, "check": {"ok": ok},
            "compile": {"temp_bytes": temp}}
  payload = {"results": [
      {"tree": "a", "optim": "adam", "impls": [row("optax", 1.0), row("jnp", 4.0, temp=2**20),
                                                row("triton", 2.0), row("pallas", 1.5, ok=False),
                                                row("auto", 0.1)]},
      {"tree": "b", "optim": "adam", "impls": [row("jnp", 3.0), row("triton", 3.5)]},
      {"tree": "c", "optim": "adam", "impls": [row("jnp", 5.0), row("triton", 1.0)]},
      {"tree": "a", "optim": "lamb", "impls": [row("pallas", 2.0), row("triton", 2.5)]}]}
  ranked = decide.rankings(payload)
  assert [(t, o, [b for b, *_ in rows]) for t, o, rows in ranked] == [
      ("a", "adam", ["triton", "jnp"]), ("b", "adam", ["jnp", "triton"]),
      ("c", "adam", ["triton", "jnp"]), ("a", "lamb", ["pallas", "triton"])]
  assert decide.choose(ranked) == {"adam": "triton", "lamb": "pallas"}
  path = tmp_path / "r.json"
  path.write_text(json.dumps(payload))
  text = decide.report([json.loads(path.read_text())])
  assert "auto for adam: triton" in text and "jnp 4.00 ms (2.00x, temp 1.0 MiB)" in text
  assert decide.main([str(path)]) == 0


def test_native_floor_builds_and_times_every_state_kind(tmp_path, monkeypatch):
  """bench.native_floor compiles the generated float32, int8 and fp8 Adam kernels into its
  harness and reports a positive time for each (a short run)."""
  import fusedopt   # pylint: disable=import-outside-toplevel
  if "native" not in fusedopt.available_backends():
    pytest.skip("no C++ compiler")
  from bench import native_floor   # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(native_floor, "RESULTS", str(tmp_path))
  native_floor.main(["--elements", "1024", "--reps", "2", "--rounds", "1", "--tag", "t"])
  text = (tmp_path / "t-native-floor.md").read_text()
  for kind in ("float32", "int8", "float8_e4m3fn"):
    row = next(l for l in text.splitlines() if l.startswith(f"| {kind} |"))
    assert float(row.split("|")[2]) > 0, row


# ----------------------------------------------------------------------------- low-bit state

def test_low_bit_rows_and_anchor_plumbing(tmp_path, monkeypatch):
  """``python -m bench.low_bit`` on a small tree (a 32768-element matrix, quantized: one whole
  128-block row of scales, and a small vector, float32 state): a row per storage with the
  state's bytes (int8 ~2 B/param on the matrix, float32 8), and with ``--anchors`` each anchor
  found (here a stand-in for the torch 8-bit Adams, which need a GPU) timed in a round-robin of
  its own with fusedopt's float32 and int8: its bytes and fusedopt int8's time over its own; an
  anchor not found is named, with why."""
  import time   # pylint: disable=import-outside-toplevel
  from bench import low_bit   # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(trees.TREES, "lowbit", lambda: {"w": (256, 128), "b": (80,)})
  calls = []

  def fake_anchors(leaves, grads):
    assert [x.shape for x in leaves] == [(80,), (256, 128)] and len(grads) == 2
    return ({"stand-in 8-bit Adam": (lambda: calls.append(time.sleep(0.002)), 32768 * 2 + 640)},
            {"torchao AdamW8bit": "no torch with CUDA"})
  monkeypatch.setattr(low_bit, "run", functools.partial(low_bit.run, find_anchors=fake_anchors))
  low_bit.main(["--trees", "lowbit", "--runs", "3", "--backend", "jnp", "--anchors", "--tag",
                "t", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "t-low-bit.json").read_text())
  (res,) = data["results"]
  rows = {r["storage"]: r for r in res["rows"]}
  assert list(rows) == ["float32", "bfloat16", "int8", "float8_e4m3fn", "stand-in 8-bit Adam"]
  assert res["params"] == 32848
  from fusedopt.layout import FlatLayout   # pylint: disable=import-outside-toplevel
  padded = sum(g.size for g in FlatLayout.build(
      {"w": np.zeros((256, 128), np.float32), "b": np.zeros(80, np.float32)}).groups)
  assert rows["float32"]["state_B_per_param"] == 8 * padded / 32848   # two fields, padding too
  # (the small vector keeps float32 state in a group of its own, padded)
  assert rows["int8"]["state_B_per_param"] < 0.4 * rows["float32"]["state_B_per_param"]
  anchor = rows["stand-in 8-bit Adam"]
  assert anchor["state_B_per_param"] == (32768 * 2 + 640) / 32848
  assert anchor["step_B_per_param"] is None
  assert len(calls) == 3 and anchor["time"]["median_s"] >= 0.002
  assert anchor["int8_over_anchor"]["runs"] == 3
  md = (tmp_path / "t-low-bit.md").read_text()
  assert "- fusedopt int8 / stand-in 8-bit Adam:" in md
  assert "- torchao AdamW8bit: not run (no torch with CUDA)" in md


def test_sigterm_writes_the_groups_finished_so_far(tmp_path, tiny_trees, monkeypatch):
  """``timeout`` around a stage of bench/gpu_run.sh sends SIGTERM: the run stops there -- also
  when it arrives while an implementation compiles, inside the ``except Exception`` that
  records a failed implementation -- and writes the (tree, optimizer) groups it finished,
  marked as partial at the top of the Markdown; SIGTERM's previous handler is back afterwards.
  After each group the files hold what is done (what a SIGKILL would leave)."""
  import signal   # pylint: disable=import-outside-toplevel
  real_setup, real_group, calls, seen = cli.setup, cli.bench_group, [], []

  def setup_then_term(name, optim, *a, **k):
    calls.append(optim.name)
    if optim.name == "momentum":   # the signal arrives while the second group compiles
      signal.raise_signal(signal.SIGTERM)
    return real_setup(name, optim, *a, **k)

  def group_and_files(*a, **k):
    seen.append(sorted(p.name for p in tmp_path.glob("*.json")))
    return real_group(*a, **k)
  monkeypatch.setattr(cli, "setup", setup_then_term)
  monkeypatch.setattr(cli, "bench_group", group_and_files)
  before = signal.getsignal(signal.SIGTERM)
  out = run(tmp_path, "--trees", "tiny", "--optims", "adam,momentum", "--impls", "jnp,optax",
            "--no-plots")
  assert seen[0] == [] and len(seen[1]) == 1   # the first group was on disk before the second
  assert signal.getsignal(signal.SIGTERM) is before
  assert [g["optim"] for g in out["results"]] == ["adam"]
  assert out["notes"][0].startswith("PARTIAL RUN: stopped by signal")
  assert "after 1 of 2 (tree, optimizer) groups" in out["notes"][0]
  md = (tmp_path / f"cpu-{out['date']}-custom.md").read_text()
  assert md.index("**PARTIAL RUN") < md.index("## adam")
  assert json.loads((tmp_path / f"cpu-{out['date']}-custom.json").read_text())["notes"] == \
      out["notes"]


def test_compile_only_reports_temp_memory_and_kernels(tmp_path, monkeypatch):
  """``python -m bench.compile_only`` compiles the donated step for the H100 topology: the
  leaf-direct Triton step holds under 1% of the params' bytes in temporaries and its kernels
  are custom calls; jnp packs (a temporary the size of the params) and launches none; the
  per-leaf candidate writes a fusion per leaf at least. Both files are written. (Leaves whose
  padding to 1024 elements costs under 1%: the kernels' alignment.)"""
  from bench import compile_only   # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(trees.TREES, "two", lambda: {"w": (256, 512), "b": (512,)})
  out = compile_only.main(["--trees", "two", "--optims", "adam", "--backends", "jnp,triton",
                           "--candidate", "--out", str(tmp_path)])
  rows = {r["backend"]: r for r in out["rows"]}
  assert not any("error" in r for r in rows.values()), rows
  n_bytes = 4 * (256 * 512 + 512)
  assert all(r["param_bytes"] == n_bytes for r in rows.values())
  assert rows["triton"]["temp_pct"] < 1 and rows["triton"]["custom_calls"] >= 1
  assert rows["jnp"]["custom_calls"] == 0 and rows["jnp"]["temp_pct"] >= 99
  assert rows[compile_only.CANDIDATE]["fusions"] >= 2
  md = (tmp_path / f"cpu-{out['env']['date']}-h100-compile.md").read_text()
  assert md.count("| two | adam |") == 3



def test_block_size_adam_takes_fusedopts_int8_steps_at_256():
  """bench.block_size's Adam (moments decoded, ``ADAM_RULE``, encoded again, with the block as
  an argument) takes ``fusedopt.Adam(state_dtype="int8")``'s steps at the library's block of
  256: the same codes (but for a rare element where XLA contracts a multiply-add), scales and
  params; and its state bytes per tree are those of the optimizer's own state buffers (int8
  and float32)."""
  import fusedopt as optim   # pylint: disable=import-outside-toplevel
  from bench import block_size as bs   # pylint: disable=import-outside-toplevel
  from fusedopt import quantization as Q   # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  params = {"w": jnp.asarray(rng.standard_normal((50, 100)), jnp.float32),   # quantized
            "e": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32),    # MIN_SIZE: too
            "b": jnp.asarray(rng.standard_normal((30,)), jnp.float32)}       # float32 state
  opt = optim.Adam(1e-2, state_dtype="int8", backend="jnp").create(params)
  p, st = params, bs.init_state(params, Q.BLOCK)
  step = jax.jit(lambda o, g: o.apply_gradient(g))
  mine = jax.jit(bs.adam_step)
  for t in range(1, 4):
    g = jax.tree.map(lambda x, t=t: jnp.asarray(
        np.random.RandomState(t).standard_normal(x.shape) * 10.0 ** -t, jnp.float32), params)
    opt, (p, st) = step(opt, g), mine(p, st, g, t - 1, 1e-2)
  for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(opt.target)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
  fields, layout = opt.state.param_states.fields, opt.state.param_states.layout
  for k, name in enumerate(("grad_ema", "grad_sq_ema")):
    for i, seg in enumerate(layout.segments):   # leaf order, as init_state's list
      mine_q, theirs = st[i][k], fields[name][seg.group]
      assert Q.is_quantized(mine_q) == Q.is_quantized(theirs) == (seg.size >= Q.MIN_SIZE)
      if not Q.is_quantized(theirs):
        np.testing.assert_allclose(np.asarray(theirs[seg.offset:seg.offset + seg.size]),
                                   np.asarray(mine_q).ravel(), rtol=1e-6)
        continue
      assert mine_q.block == 256 and theirs.fmt == mine_q.fmt
      n, o = mine_q.size, seg.offset   # the leaf's whole blocks, where its segment starts
      diff = np.abs(np.asarray(theirs.codes[o:o + n], int) - np.asarray(mine_q.codes, int))
      assert diff.max() <= 1 and np.count_nonzero(diff) <= n // 500, (name, seg.path)
      np.testing.assert_allclose(np.asarray(theirs.scales[o // 256:(o + n) // 256]),
                                 np.asarray(mine_q.scales), rtol=2e-6)
  shapes = {"a": (50, 100), "b": (30,), "c": (3, 3, 64, 64)}
  tree = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
  for block, kw in ((256, {"state_dtype": "int8"}), (None, {})):
    real = optim.Adam(1e-3, **kw).create(tree).state.param_states
    assert bs.adam_state_bytes(shapes, block) == sum(
        x.nbytes for f in real.fields.values() for x in f), block


def test_block_size_moment_errors_by_hand():
  """``moment_errors`` on moments whose decoded values are known: m and v constant in every
  block decode exactly (the maps hold 1); a v of one 1.0 among 1e-9s (under the unsigned map's
  smallest step of its block's absmax) flushes the rest of that value's block to 0: 255 of the
  4096 nonzero values at blocks of 256, 4095 at one block of 4096."""
  from bench import block_size as bs   # pylint: disable=import-outside-toplevel
  m = np.full(4096, 0.3, np.float32)
  v = np.full(4096, 2.0, np.float32)
  for b in (256, 4096):
    e = bs.moment_errors([m], [v], 10, b)
    assert e["m_err"] == 0.0 and e["v_err"] == 0.0 and e["u_err"] == 0.0 and \
        e["v_flushed"] == 0.0
  v = np.full(4096, 1e-9, np.float32)
  v[0] = 1.0
  assert bs.moment_errors([m], [v], 10, 256)["v_flushed"] == 255 / 4096
  assert bs.moment_errors([m], [v], 10, 4096)["v_flushed"] == 4095 / 4096
  assert bs.moment_errors([m[:100]], [v[:100]], 10, 256) == {   # small tensors: float32 state
      "m_err": 0.0, "v_err": 0.0, "u_err": 0.0, "v_flushed": 0.0}


def test_block_size_run_and_report():
  """The bench's run on a few steps of the LM and a small Zipf embedding: losses for float32
  and each block, accuracy rows for the embedding and both LM snapshots, memory rows, and a
  report naming them; the embedding's moments are Adam's (v >= 0, a row never drawn is 0 in
  both)."""
  from bench import block_size as bs   # pylint: disable=import-outside-toplevel
  m, v = (np.asarray(x) for x in bs.zipf_embedding_moments(vocab=300, width=16, steps=3,
                                                              tokens=64))
  assert m.shape == v.shape == (300, 16) and v.min() >= 0 and np.any(v.max(axis=1) == 0)
  assert np.array_equal(m.any(axis=1), v.any(axis=1))
  assert v[0].mean() > v[299].mean()   # the first token is drawn most often
  res = bs.run(steps=2, batch=2, lr=3e-3, seeds=[0], blocks=[2048], mem_trees=["resnet50"],
               embedding=(300, 16, 2))
  runs = res["training"]["0"]
  assert set(runs) == {"float32", "2048"}
  assert all(len(r["curve"]) == 2 and np.isfinite(r["final"]) for r in runs.values())
  labels = list(res["accuracy"])
  assert len(labels) == 3 and "300x16 token embedding" in labels[0]
  assert labels[1:] == ["the LM's float32 Adam moments at step 1",
                        "the LM's float32 Adam moments at step 2"]
  assert all(set(row) == {"2048"} for row in res["accuracy"].values())
  mem = res["memory"]["resnet50"]
  assert 2.0 < mem["2048"] < mem["float32"] / 3.5
  text = bs.markdown(res, {"date": "d", "blocks": [2048], "jax": jax.__version__,
                           "command": "c", "host": "h", "commit": "x"})
  assert "| resnet50 |" in text and "B=2048" in text and "step 2" in text
