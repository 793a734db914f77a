"""The native kernel cache never breaks the default backend.

Each case runs a fresh Python process (the kernel cache and XLA's FFI registry are per process):
an Adam step on ``backend="auto"`` (the native kernels on CPU) against the jnp backend.
- the temporary directory and the cache on different filesystems (a tmpfs ``/tmp``);
- a truncated library in the cache (loading it would be a SIGBUS): rebuilt, not loaded;
- a cache directory that cannot be created, a compiler that fails: one warning naming the cause
  and the fix, and the jnp backend's results.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import fusedopt as optim

pytestmark = pytest.mark.skipif("native" not in optim.available_backends(),
                                reason="no C++ compiler for the native backend")

_SCRIPT = textwrap.dedent("""
    import json, warnings
    import jax, jax.numpy as jnp, numpy as np
    import fusedopt as optim
    p = {"w": jnp.linspace(-1.0, 1.0, 3001), "b": jnp.ones((7,))}
    g = jax.tree.map(lambda x: jnp.cos(3.0 * x) + 0.5, p)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      a = optim.Adam(1e-2).create(p).apply_gradient(g).apply_gradient(g)
    b = optim.Adam(1e-2, backend="jnp").create(p).apply_gradient(g).apply_gradient(g)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a.target),
                                                             jax.tree.leaves(b.target)))
    print(json.dumps({"diff": diff, "warnings": [str(w.message) for w in caught
                                                  if "native" in str(w.message)]}))
""")


def _run(env_updates):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_updates)
  if "FUSEDOPT_CACHE_DIR" not in env_updates:   # the default cache, under $HOME
    env.pop("FUSEDOPT_CACHE_DIR", None)
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["diff"] < 1e-6, out
  return out


def _libraries(d):
  return sorted(f for f in os.listdir(d) if f.endswith(".so"))


def _other_filesystem(tmp_path):
  shm = "/dev/shm"
  assert os.path.isdir(shm) and os.stat(shm).st_dev != os.stat(tmp_path).st_dev, (
      "this test needs /dev/shm on another filesystem than pytest's tmp_path")
  d = os.path.join(shm, f"fusedopt-test-{os.getpid()}-{tmp_path.name}")
  os.makedirs(d, exist_ok=True)
  return d


@pytest.mark.parametrize("where", ["tmpdir_on_tmpfs", "cache_on_tmpfs"])
def test_cache_on_another_filesystem_than_tmpdir(tmp_path, where):
  other = _other_filesystem(tmp_path)
  try:
    if where == "tmpdir_on_tmpfs":   # HOME's default cache on disk, TMPDIR on a tmpfs
      env = {"HOME": str(tmp_path), "TMPDIR": other}
      cache = os.path.join(tmp_path, ".cache", "fusedopt")
    else:                            # the cache on a tmpfs, TMPDIR on disk
      env = {"FUSEDOPT_CACHE_DIR": other, "TMPDIR": str(tmp_path)}
      cache = other
    out = _run(env)
    assert out["warnings"] == []
    libs = _libraries(cache)
    assert libs, "no kernel was cached"
    assert not [f for f in os.listdir(cache) if f.startswith(".build-")], "build files left over"
  finally:
    subprocess.run(["rm", "-rf", other], check=False)


def test_truncated_library_is_rebuilt_not_loaded(tmp_path):
  env = {"FUSEDOPT_CACHE_DIR": str(tmp_path)}
  assert _run(env)["warnings"] == []
  libs = _libraries(tmp_path)
  sizes = {}
  for f in libs:
    path = os.path.join(tmp_path, f)
    sizes[f] = os.path.getsize(path)
    with open(path, "r+b") as fh:
      fh.truncate(sizes[f] // 2)
  assert _run(env)["warnings"] == []   # a truncated library loaded would kill it (SIGBUS)
  for f in libs:
    assert os.path.getsize(os.path.join(tmp_path, f)) == sizes[f]


@pytest.mark.parametrize("case", ["uncreatable_cache_dir", "compiler_fails"])
def test_build_failure_falls_back_to_jnp_with_one_warning(tmp_path, case):
  if case == "uncreatable_cache_dir":
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    env, cause = {"FUSEDOPT_CACHE_DIR": str(blocker / "cache")}, "FUSEDOPT_CACHE_DIR"
  else:
    env, cause = {"FUSEDOPT_CACHE_DIR": str(tmp_path), "CXX": "false"}, "compiling a native kernel"
  out = _run(env)
  assert len(out["warnings"]) == 1, out["warnings"]
  assert "jnp backend" in out["warnings"][0] and cause in out["warnings"][0], out["warnings"]


def test_concurrent_processes_building_one_cache_agree(tmp_path):
  """Two processes build the same kernels into one empty cache at once: the same source gives
  the same library bytes in each (compiled under the library's name), so whichever digest lands
  last matches whichever library did: no warning, no rebuild loop, the native results."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", FUSEDOPT_CACHE_DIR=str(tmp_path))
  procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert res["warnings"] == [] and res["diff"] < 1e-6, res
  libs = _libraries(tmp_path)
  assert libs
  for f in libs:
    with open(os.path.join(tmp_path, f + ".sha256")) as fh:
      size, _ = fh.read().split()
    assert int(size) == os.path.getsize(os.path.join(tmp_path, f))


def test_handler_rejects_malformed_calls():
  """The handler decodes XLA's FFI C call frame itself (no C++ binding): a call with the wrong
  number of operands, or without its ``offs``/``sizes`` attributes, is an error naming it, never
  a read past the operand list."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from fusedopt.kernels import native  # pylint: disable=import-outside-toplevel
  from fusedopt.sgd import SGD_RULE  # pylint: disable=import-outside-toplevel
  name = native.target_for(SGD_RULE)
  out = [jax.ShapeDtypeStruct((4,), jnp.float32)]
  s, seg, x = jnp.ones(2), jnp.zeros(1), jnp.ones(4)
  one = dict(offs=np.array([0], np.int64), sizes=np.array([4], np.int64))
  # in place: the param (operand 2) is aliased to the output; p - lr * g with lr = S[0] = 1
  good = jax.ffi.ffi_call(name, out, input_output_aliases={2: 0})(s, seg, x, x, **one)[0]
  np.testing.assert_array_equal(np.asarray(good), np.zeros(4))
  with pytest.raises(Exception, match="wrong number of operands"):
    jax.block_until_ready(jax.ffi.ffi_call(name, out)(s, seg, x, **one))
  with pytest.raises(Exception, match="int64 array attributes offs and sizes"):
    jax.block_until_ready(jax.ffi.ffi_call(name, out)(s, seg, x, x,
                                                     offs=np.array([0], np.int64)))


def test_precompiled_header_changes_nothing_but_the_compile_time(tmp_path, monkeypatch):
  """GCC: the kernels' standard headers are precompiled once per cache directory and used (``-H``
  marks a used PCH ``!``); a library built with it has the bytes of one built without; a
  truncated PCH is rebuilt, and a foreign one that passes its digest is ignored by GCC (or the
  build retried without it): the same library either way."""
  # pylint: disable=protected-access,import-outside-toplevel
  import jax
  from fusedopt.adam import ADAM_RULE
  from fusedopt.kernels import native
  if not native._is_gcc(native._compiler()):
    pytest.skip("the precompiled header is built for GCC only")
  src = native.generate(ADAM_RULE)

  def build(d, pch):
    os.makedirs(d, exist_ok=True)
    so = os.path.join(d, "fusedopt_k.so")
    if os.path.exists(so):
      os.remove(so)
    native._build(src, so, pch=pch)
    with open(so, "rb") as f:
      return f.read()

  plain = build(str(tmp_path / "plain"), False)
  d = str(tmp_path / "pch")
  cmds, run = [], subprocess.run
  monkeypatch.setattr(native.subprocess, "run",
                      lambda cmd, **kw: cmds.append(cmd) or run(cmd, **kw))
  assert build(d, True) == plain
  monkeypatch.undo()
  args = native._pch_args(d)
  assert args and args[0] == "-include"
  kernel_cmd = next(c for c in cmds if c[-1].endswith(".so"))   # the kernel's compile used it
  assert kernel_cmd[kernel_cmd.index("-include") + 1] == args[1]
  gch = args[1] + ".gch"
  assert native._verified(gch)
  probe = subprocess.run([native._compiler(), *native._FLAGS_NO_LINK, *args, "-I",
                          jax.ffi.include_dir(), "-H", "-fsyntax-only", "-x", "c++", "-"],
                         input=src, capture_output=True, text=True, check=True)
  assert f"! {gch}" in probe.stderr, probe.stderr[:500]
  with open(gch, "r+b") as fh:     # truncated: not verified, so rebuilt by the next process
    fh.truncate(1000)
  native._pch_args.cache_clear()
  assert native._pch_args(d) == args and native._verified(gch)
  with open(gch, "wb") as fh:      # foreign bytes with a matching digest
    fh.write(b"not a precompiled header")
  with open(gch + ".sha256", "w") as fh:
    fh.write(native._digest(gch))
  assert build(d, True) == plain
