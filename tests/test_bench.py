"""The benchmark's machinery (bench/): correctness gate, bytes model, HLO counter, outputs.

Runs `python -m bench`'s main() on tiny trees with one or two timed steps, so the whole file takes
seconds; the timings themselves are not checked.
"""
import dataclasses
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

TINY = {"dense": {"kernel": (16, 8), "bias": (8,)}, "ln": {"scale": (8,)}}


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


def test_torch_rows(tmp_path, tiny_trees, monkeypatch):
  """torch.optim.AdamW / SGD (fused and foreach) agree with fusedopt and get the torch ratios.
  torch on CPU stands in for CUDA here (the bench runs the torch rows only with CUDA)."""
  pytest.importorskip("torch")
  monkeypatch.setattr(impls, "TORCH_DEVICE", "cpu")
  monkeypatch.setattr(impls, "torch_cuda", lambda: True)
  out = run(tmp_path, "--trees", "tiny", "--optims", "adam,momentum,lamb",
            "--impls", "optax,jnp,torch-fused,torch-foreach", "--no-plots")
  for g in out["results"]:
    if g["optim"] == "lamb":
      assert set(g["skipped"]) == {"torch-fused", "torch-foreach"}
      continue
    for name in ("torch-fused", "torch-foreach"):
      rec = _rec(g, name)
      assert rec["check"]["ok"], (g["optim"], name, rec["check"])
      assert "first_moment" in rec["check"] and rec["vs_torch_fused"]["runs"] == 2
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


def test_adafactor_factoring_matches_fusedopt():
  """The bytes model factors exactly the leaves fusedopt's Adafactor factors."""
  opt = optims.OPTIMS["adafactor"].fusedopt_def("jnp")
  for shape in [(5,), (4, 300), (128, 128), (3, 200, 129), (127, 500)]:
    theirs = opt._factored_dims(shape)  # pylint: disable=protected-access
    assert (optims.factored_dims(shape) is None) == (theirs is None), shape


def test_every_optimizer_agrees_with_its_peers():
  """Two steps of each optimizer's optax spelling match fusedopt's jnp path (the hp mapping)."""
  p = trees.host_tree(TINY | {"w": (130, 129)}, seed=0, scale=0.5)
  g = trees.host_tree(TINY | {"w": (130, 129)}, seed=1, scale=0.1)
  for name, o in optims.OPTIMS.items():
    tx = o.optax_tx(optims.LR)
    state, params = tx.init(p), p
    opt = o.fusedopt_def("jnp").create(p)
    for _ in range(2):
      u, state = tx.update(g, state, params)
      params = optax.apply_updates(params, u)
      opt = opt.apply_gradient(g)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(opt.target)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7,
                                 err_msg=name)


def test_implementations_per_optimizer():
  names = ["optax", "optax-flatten", "flax-loop", "auto", "native", "jnp"]
  kept, skipped = impls.for_optim(optims.OPTIMS["adafactor"], names)
  assert kept == ["optax", "auto"] and set(skipped) == {"optax-flatten", "flax-loop", "native",
                                                        "jnp"}
  kept, skipped = impls.for_optim(optims.OPTIMS["lamb"], names + ["torch-fused"])
  assert "optax-flatten" not in kept and set(skipped) == {"optax-flatten", "torch-fused"}
  assert impls.for_optim(optims.OPTIMS["adam"], names)[0] == names


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
  out = run(tmp_path, "--trees", "scale-t1,scale-t2", "--optims", "adam,momentum",
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
      ("scale-t1", "adam"), ("scale-t1", "momentum"), ("scale-t2", "adam"), ("scale-t2", "momentum")]
  for g in data["results"]:
    jnp_rec = _rec(g, "jnp")
    assert jnp_rec["check"]["reference"] and jnp_rec["step"]["runs"] == 2
    assert jnp_rec["vs_optax"]["runs"] == 2 and jnp_rec["compile"]["hlo"]["kernels"] > 0
    assert g["copy"]["gb_s"] > 0 and jnp_rec["pct_copy_bw"] > 0
  # a second run with the same tag does not replace the first
  out2 = run(tmp_path, "--trees", "tiny", "--optims", "sgd", "--impls", "jnp", "--tag", "t",
             "--no-plots")
  assert (tmp_path / f"{stem}-2.json").exists() and out2["results"][0]["optim"] == "sgd"
  assert json.loads((tmp_path / f"{stem}.json").read_text())["settings"]["optims"] == [
      "adam", "momentum"]


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
