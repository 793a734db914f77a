"""Sharded optimizer state (fusedopt.sharding): ZeRO-1, FSDP, reduce-scatter, checkpoints.

The 8-device checks need ``--xla_force_host_platform_device_count=8`` before jax starts, and this
pytest process has already started jax: they run in one subprocess (tests/sharding_checks.py)
that prints a JSON report; the tests here assert on it. In-process tests use a 1-device mesh.
"""
import json
import os
import signal
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import fusedopt as optim
from fusedopt import sharding
from fusedopt.layout import FlatLayout
from conftest import host_devices_flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def report():
  # OMP_NUM_THREADS=1: the native kernels' OpenMP threads (results do not depend on their
  # number) stay out of the way of XLA:CPU's 8 device threads on a 2-core machine.
  return _eight_device_report("sharding_checks.py")


# XLA:CPU's 8 device threads have been seen stuck in an all-gather rendezvous with the 8th
# device's program never launched (thread-pool starvation under a loaded pytest worker; gdb: 7
# threads in AllGatherThunk) -- a jaxlib runtime stall, not a result of ours. It can pass: runs
# took 52-63 s beside the other pytest worker against ~35 s alone, and XLA's 40 s collective
# timeout had to be raised; and it can last. The checks print a progress line at every step (at
# most 1.4 s apart alone): STALL_S without one dumps the script's Python stack into a warning
# and the run starts once more; 90 s costs no more than the wall-clock timeout it replaced
# (120 s). The dumps (2026-12-07) put the stall, twice at the same step, in a comparison's eager
# slices of sharded buffers, which now run on host copies (sharding_checks.on_host).
STALL_S = 90
TOTAL_S = 300


def _eight_device_report(script):
  """Runs ``script`` on 8 host devices, once more if it stalls (above), and returns the JSON
  report it prints last."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1",
             XLA_FLAGS=host_devices_flags(8))
  for attempt in range(2):
    out, err, stalled = _run_watched([sys.executable, os.path.join(HERE, script)], env)
    if not stalled:
      break
    assert not attempt, f"{script} stalled twice ({stalled}):\n{out[-2000:]}{err[-4000:]}"
    # shown in pytest's warnings summary, so a CI log says how often and where it stalls
    last = [l for l in out.splitlines() if l.startswith("progress")][-1:]
    warnings.warn(f"{script} stalled ({stalled}) after {last}, rerun; its Python stack:\n"
                  f"{_stack_dump(err)}", RuntimeWarning)
  lines = [l for l in out.splitlines() if l.startswith("{")]
  assert lines, out[-3000:] + err[-6000:]
  return json.loads(lines[-1])


def _stack_dump(err):
  """The main thread's part of a faulthandler dump in ``err`` (a script's stderr), or a note."""
  i = err.rfind("Current thread")
  if i < 0:
    i = err.rfind("Thread 0x")
  return err[i:i + 3000] if i >= 0 else "(no faulthandler dump)"


def _run_watched(cmd, env):
  """(stdout, stderr, why it was killed or "") of ``cmd``, killed when it prints no line for
  ``STALL_S`` or runs past ``TOTAL_S``; a non-zero exit otherwise fails the calling test."""
  import tempfile   # pylint: disable=import-outside-toplevel
  import threading   # pylint: disable=import-outside-toplevel
  import time   # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryFile("w+") as err:   # (a pipe XLA's logs could fill)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                            text=True)
    lines, last = [], [time.monotonic()]

    def read():
      for line in proc.stdout:
        lines.append(line)
        last[0] = time.monotonic()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    start, why = time.monotonic(), ""
    while proc.poll() is None:
      now = time.monotonic()
      if now - last[0] > STALL_S or now - start > TOTAL_S:
        why = (f"no line for {now - last[0]:.0f} s" if now - last[0] > STALL_S
               else f"over {TOTAL_S} s")
        proc.send_signal(signal.SIGUSR1)   # a script registering faulthandler dumps its stack
        time.sleep(1.0)
        proc.kill()
        proc.wait()
        break
      time.sleep(0.2)
    reader.join(timeout=10)
    err.seek(0)
    out, errs = "".join(lines), err.read()
  assert why or proc.returncode == 0, f"rc {proc.returncode}:\n{out[-3000:]}{errs[-6000:]}"
  return out, errs, why


def test_stall_watchdog_kills_a_silent_run_and_keeps_a_talking_one(monkeypatch):
  """``_run_watched``: a process that stops printing is killed after ``STALL_S`` (the hang's
  signature), its Python stack dumped first; one that keeps printing runs to its end, its
  output kept."""
  # (2 s: five times the talking child's gaps, so a loaded machine does not stall it)
  monkeypatch.setattr(sys.modules[__name__], "STALL_S", 2.0)
  talk = ("import time\nfor i in range(6):\n  print('progress', i, flush=True)\n"
          "  time.sleep(0.4)\nprint('{}')")   # 2.4 s in all: longer than STALL_S
  out, _, why = _run_watched([sys.executable, "-c", talk], dict(os.environ))
  assert why == "" and out.splitlines()[-1] == "{}" and out.count("progress") == 6
  silent = ("import faulthandler, signal, time\n"
            "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
            "print('progress', flush=True)\ntime.sleep(60)")
  out, err, why = _run_watched([sys.executable, "-c", silent], dict(os.environ))
  assert why.startswith("no line for") and out == "progress\n"
  assert 'File "<string>", line 4' in _stack_dump(err)   # where it stalled


ELEMENTWISE = ("GradientDescent", "Momentum", "Adam", "Adagrad", "RMSProp", "AdaBelief",
               "Adadelta", "Lion", "Adan", "AdEMAMix", "ADOPT", "ScheduleFreeAdamW")


def test_every_optimizer_matches_the_single_device_path(report):
  num = report["numerics"]
  fsdp_only = ("Lion", "Adan", "AdEMAMix", "ADOPT", "ScheduleFreeAdamW")   # sharding_checks
  for name in ELEMENTWISE + ("LAMB", "LARS"):
    modes = ("sharded",) if name in fsdp_only else ("replicated", "sharded")
    for key in (f"{name}/jnp/{mode}" for mode in modes):
      assert key in num, key
  for name in ("Adam", "Momentum", "LAMB", "LARS"):   # sharding_checks.AUTO_CHECKED
    assert f"{name}/auto/replicated" in num, name
  for key, r in num.items():
    assert r["step"], key
    name, backend, mode = (key.split("/") + ["", ""])[:3]
    if r["reducing"]:
      # per-tensor norms from psum-ed per-shard partial sums: the sums are reordered
      assert r["ulps"] <= 4, (key, r)
    elif backend == "jnp" and mode == "replicated":
      assert r["bitwise"], (key, r)          # ZeRO-1, jnp: the same XLA code, bitwise
    else:
      # FSDP with bf16 grads / interpret-mode kernels: XLA:CPU contracts a*b+c into an FMA
      # differently for other fusion shapes (1 ulp); float32 groups are bitwise. ADOPT with
      # nesterov has two contracted averages in a row, the second divided by the contracted
      # sqrt(v): measured 1.3 ulp after 3 steps
      assert r["ulps"] <= (2 if name == "ADOPT" else 1), (key, r)
  for label in ("Adam/master", "Adam/state_bf16", "Adam/stochastic_rounding",
                "Momentum/stochastic_rounding/auto"):
    assert num[label]["bitwise"], label
  assert num["Adam/stochastic_rounding"]["differs_from_nearest"]
  assert num["LAMB/master"]["ulps"] <= 4


def test_quantized_state_is_sharded_with_its_scales(report):
  """int8/fp8 Adam (ZeRO-1, FSDP; jnp and the native kernels) and int8 LAMB sharded 8 ways:
  each device holds 1/8 of the codes and 1/8 of the scales (a block never straddles two
  shards), and the codes and scales equal one device's bitwise. LAMB's per-tensor norms are
  psum-ed partial sums (reordered): its params within a few ulps; FSDP's within one. A sharded int8 checkpoint
  restores into one device and back bitwise."""
  q = report["quantized"]
  assert set(q) == {"Adam/int8/jnp/sharded", "Adam/fp8/auto/replicated",
                    "LAMB/int8/jnp/replicated", "checkpoint"}, q
  for key, r in q.items():
    if key == "checkpoint":
      assert r == {"single": True, "back": True, "split": True, "same_bytes": True}, r
      continue
    assert r["quantized"] and r["split"] and r["cmp"]["step"], (key, r)
    assert r["codes_differing"] == 0, (key, r)
    if r["reducing"]:
      assert r["cmp"]["ulps"] <= 4, (key, r)
    elif key.endswith("/sharded"):
      # FSDP: XLA:CPU may contract a*b+c into an FMA differently for the partitioned program's
      # fusion shapes (as in test_every_optimizer_matches_the_single_device_path): params
      # within 1 ulp (measured 0.22 with make test's IR fusion emitters, bitwise with the MLIR
      # ones), codes and scales bitwise
      assert r["cmp"]["ulps"] <= 1, (key, r)
    else:
      assert r["cmp"]["bitwise"], (key, r)


def test_each_device_holds_one_eighth_of_the_state(report):
  assert report["split"] and all(report["split"].values()), report["split"]


def test_adafactor_state_is_replicated_and_equal(report):
  assert report["adafactor"] == {"equal": True, "replicated": True}


def test_compiled_step_never_gathers_the_state(report):
  for key, h in report["hlo"].items():
    name, mode = key.split("/")
    assert h["state_out_specs"] == ["P('data',)"], (key, h)
    if mode == "sharded":     # FSDP: no all-gather at all
      assert h["all_gather_results"] == [], (key, h)
    else:                     # ZeRO-1: exactly one all-gather per param dtype group
      assert len(h["all_gather_results"]) == len(h["param_groups"]), (key, h)
      assert sorted(int(s.split("[")[1][:-1]) for s in h["all_gather_results"]) == \
          sorted(int(s.split("[")[1][:-1]) for s in h["param_groups"]), (key, h)
      # each device packs only its slice of p and g, never the full buffer
      assert h["max_concatenate"] <= h["max_shard"], (key, h)
    assert "reduce-scatter" not in h["collectives"] and "all-to-all" not in h["collectives"]
    if name == "LAMB":   # one psum of the small [2, num_leaves] vector of sums of squares
      assert h["collectives"]["all-reduce"] == ["f32[10]"], (key, h)
    elif name == "LARS":  # the same for ||p||, ||g||, each as norms.sum_squares' pair
      assert h["collectives"]["all-reduce"] == ["f32[20]"], (key, h)
    else:
      assert "all-reduce" not in h["collectives"], (key, h)


def test_grads_reduce_scattered_in_shard_map(report):
  for name in ("Adam", "LAMB"):
    r = report[f"reduce_scatter/{name}"]
    assert r["split"] and r["cmp"]["step"]
    assert r["cmp"]["ulps"] <= (4 if name == "LAMB" else 1), r
    assert "reduce-scatter" in r["collectives"], r
    assert "all-reduce" not in r["collectives"] or r["collectives"]["all-reduce"] == ["f32[10]"]


def test_checked_update_sharded(report):
  for name in ("Adam", "LARS"):
    r = report[f"checked/{name}"]
    assert r["finite"] and r["clipped"] and r["norm_rel"] < 1e-6, r
    assert r["cmp"]["ulps"] <= 4 and r["cmp"]["step"], r   # clip factor from a reordered norm
    assert not r["skip_finite_flag"] and r["skip_unchanged"] and r["skip_step"] and r["split"]


def test_lars_norms_do_not_overflow_sharded(report):
  """Params and grads of |x| ~ 1e20: their float32 sums of squares overflow, their norms do not;
  the sharded step equals the single-device one (LARS's trust ratio from both norms)."""
  r = report["overflow/LARS"]
  assert r["finite"] and r["cmp"]["ulps"] <= 4 and r["cmp"]["step"], r


def test_sharded_checkpoint_round_trips(report):
  for mode in ("replicated", "sharded"):
    r = report[f"checkpoint/{mode}"]
    assert all(r[k] for k in ("vs_single", "restored", "restore_state", "step", "split",
                              "split_restore_state", "same_bytes", "continues", "orbax")), r
    assert r["target_sharding"] == ("P()" if mode == "replicated" else "P('data',)"), r


def test_multihost_example_two_processes():
  sys.path.insert(0, os.path.join(ROOT, "examples"))
  try:
    import multihost_zero1  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  # ~6 s alone. Its processes used to hang at exit now and then (a gloo collective still being
  # set up on one side: multihost_zero1._finish_every_device), which a rerun papered over; a
  # hang now fails the test.
  codes, outs = multihost_zero1.launch(2, timeout=120, extra=["--steps", "5"])
  assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
  for out in outs:
    assert "1/8 per device: True" in out and "round trip bitwise: True" in out and "OK" in out


def test_tx_state_sharded_like_the_params_on_8_devices():
  """fusedopt.tx (here, not in test_tx.py: one 8-device subprocess at a time per pytest worker,
  the other is ``report``'s). The state takes the params' partition specs
  (``optax.tree_map_params``) and the compiled steps (two calls and one pass) hold no
  collective: nothing is resharded. LAMB's per-tensor
  norms of a sharded tensor are partial sums: they need an all-reduce, the one collective
  allowed (XLA inserts it for the norms, not for the state). The values equal one device's."""
  pytest.importorskip("optax")
  rep = _eight_device_report("tx_sharding_checks.py")   # (~7 s)
  for key, colls in rep["collectives"].items():
    allowed = ["all-reduce"] if key.startswith("lamb") else []
    assert colls == allowed or (allowed and colls == []), (key, colls)
  assert all(rep["state_sharded_like_params"].values()), rep["state_sharded_like_params"]
  for key, d in rep["max_rel_diff"].items():
    assert d <= 1e-6, (key, d)
  # quantized tx state on 8 devices: auto runs it on jnp (no custom call to gather operands for)
  assert rep["quantized"]["custom_calls"] == [], rep["quantized"]
  assert rep["quantized"]["max_rel_diff"] <= 1e-6, rep["quantized"]


# ----------------------------------------------------------------------------- in process

def _tree():
  return {"a": jnp.arange(3000.0).reshape(30, 100), "b": jnp.ones((5,), jnp.bfloat16),
          "c": jnp.ones((2100,))}


def test_layout_shard_padding():
  t = _tree()
  base, lay = FlatLayout.build(t), FlatLayout.build(t, shards=8)
  assert base.shards == 1 and lay.shards == 8 and base != lay
  assert FlatLayout.build(t, shards=1) is base and base.with_shards(8) is lay
  assert [s.offset for s in lay.segments] == [s.offset for s in base.segments]
  for g, gb in zip(lay.groups, base.groups):
    assert g.size % (8 * lay.align) == 0 and g.size >= gb.size
  assert lay.shard_size(0) * 8 == lay.groups[0].size
  bufs = lay.pack(t)
  assert [b.shape[0] for b in bufs] == [g.size for g in lay.groups]
  back = lay.unpack(bufs)
  for x, y in zip(jax.tree_util.tree_leaves(t), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  ids = lay.block_segment_ids(0)
  assert len(ids) == lay.groups[0].size // lay.align and np.all(np.diff(ids) >= 0)
  assert ids[-1] == lay.groups[0].segments[-1]   # trailing padding: the last segment's
  assert "shards=8" in repr(lay) and "shards" not in repr(base)


def test_one_device_mesh_matches_and_rejects_misuse():
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  t = _tree()
  g = jax.tree_util.tree_map(lambda x: (x * 0.01 + 1).astype(x.dtype), t)
  for mode in ("replicated", "sharded"):
    o1 = optim.LAMB(1e-2, backend="jnp").create(t)
    o2 = sharding.shard_optimizer(optim.LAMB(1e-2, backend="jnp"), mesh, "data",
                                  params=mode).create(t)
    for _ in range(2):
      o1 = o1.apply_gradient(g)
      o2 = o2.apply_gradient(g if mode == "replicated"
                             else sharding.FlatParams.pack(g, o2.target.layout))
    t2 = o2.target.tree() if mode == "sharded" else o2.target
    for x, y in zip(jax.tree_util.tree_leaves(o1.target), jax.tree_util.tree_leaves(t2)):
      np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                 rtol=1e-6, atol=1e-7)
  with pytest.raises(TypeError, match="no flat state"):
    sharding.shard_optimizer(optim.MultiOptimizer(
        (optim.ModelParamTraversal(lambda p, _: True), optim.Adam(1e-3))), mesh, "data")
  with pytest.raises(ValueError, match="no axis"):
    sharding.shard_optimizer(optim.Adam(1e-3), mesh, "model")
  with pytest.raises(ValueError, match="params="):
    sharding.shard_optimizer(optim.Adam(1e-3), mesh, "data", params="fsdp")
  opt = sharding.shard_optimizer(optim.Adam(1e-3), mesh, "data").create(t)
  with pytest.raises(TypeError, match="created by"):
    opt.optimizer_def.apply_gradient(opt.optimizer_def.hyper_params, t,
                                     optim.Adafactor(1e-3).init_state(t), g)
