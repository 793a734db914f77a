"""The sdist and wheel that `python -m build` makes, and the wheel installed in a fresh venv.

Built without build isolation (setuptools and build come with the `test` extra, so nothing is
downloaded) from a copy of the checkout as git sees it, so building writes nothing into the
checkout. `python -m build` makes the sdist and then the wheel from the unpacked sdist, so the
wheel also shows that the sdist is complete. The wheel is installed with `--no-deps --no-index`
into a venv of its own; the smoke run there finds jax and numpy through a `.pth` line naming this
interpreter's site-packages (appended after the venv's own, so `fusedopt` comes from the wheel,
and the project's editable install, activated only by its own `.pth`, stays off).

There are no static C++ files to ship: the native backend generates its C++ from each rule
(fusedopt/kernels/native.py with symbolic.py) and compiles it against jaxlib's FFI headers at run
time. The smoke run proves the installed modules are enough: with an empty kernel cache, the Adam
step compiles a kernel from the installed copy and equals the jnp step.
"""
import os
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import venv
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOT_SHIPPED = ("tests", "bench", "examples", "tools", "docs", "constraints", ".ci")


def _run(cmd, **kw):
  proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
  assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n"
                                f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
  return proc


def _copy_checkout(dst):
  """The checkout's tracked and untracked, not ignored files (a fresh clone plus work in
  progress): no .venv, build/ or *.egg-info that an earlier build or install left."""
  if (ROOT / ".git").exists() and shutil.which("git"):
    names = _run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                  "--exclude-standard"]).stdout.split("\0")
    for name in filter(None, names):
      if (ROOT / name).is_file():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dst / name)
  else:
    shutil.copytree(ROOT, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis", ".gpu_vendor"))


def _sources():
  """What the package must contain: every module under fusedopt/ and kernels/ (installed as
  fusedopt.kernels), and py.typed."""
  want = {"fusedopt/py.typed"}
  for top, installed in (("fusedopt", "fusedopt"), ("kernels", "fusedopt/kernels")):
    for f in (ROOT / top).rglob("*.py"):
      if "__pycache__" not in f.parts:
        want.add(f"{installed}/{f.relative_to(ROOT / top).as_posix()}")
  return want


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("packaging")
  src, out = tmp / "src", tmp / "dist"
  src.mkdir()
  _copy_checkout(src)
  try:
    import build  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise AssertionError("the `build` package is missing: pip install -c constraints/ci.txt "
                         "-e '.[test]' (make test does)") from e
  _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src])
  sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
  assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
  return tmp, sdists[0], wheels[0]


def test_wheel_contents(dists):
  _, _, wheel = dists
  assert wheel.name.endswith("-py3-none-any.whl"), wheel.name   # pure Python: no compiled code
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  package = {n for n in names if ".dist-info/" not in n}
  assert package == _sources(), (f"missing: {sorted(_sources() - package)}, "
                                 f"unexpected: {sorted(package - _sources())}")
  # Ranges, not pins: no `==` anywhere, and jax within the tested range.
  requires = [l for l in meta.splitlines() if l.startswith("Requires-Dist:")]
  pinned = [r for r in requires if "==" in r.split(";")[0]]   # the version, not the marker
  assert requires and not pinned, pinned
  assert "Requires-Dist: jax<0.13,>=0.10.2" in requires, requires


def test_sdist_contents(dists):
  _, sdist, _ = dists
  with tarfile.open(sdist) as t:
    names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
  for top in NOT_SHIPPED:
    assert not [n for n in names if n == top or n.startswith(top + "/")], (top, sorted(names))
  want = {n.replace("fusedopt/kernels/", "kernels/", 1) for n in _sources()}
  assert want | {"pyproject.toml", "README.md", "PKG-INFO"} <= names, sorted(want - names)
  assert not [n for n in names if n.endswith((".pyc", ".so"))], sorted(names)


SMOKE = textwrap.dedent("""
    import os, sys, warnings
    import numpy as np
    import jax, jax.numpy as jnp
    import fusedopt

    env = os.path.realpath(sys.argv[1])
    here = os.path.realpath(os.path.dirname(fusedopt.__file__))
    assert here.startswith(env + os.sep), (here, env)
    assert os.path.isfile(os.path.join(here, "py.typed"))
    assert "native" in fusedopt.available_backends(), fusedopt.available_backends()

    params = {"w": jnp.linspace(-1.0, 1.0, 3 * 1031, dtype=jnp.float32).reshape(3, 1031),
              "b": jnp.full((7,), 0.5, jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, params)
    out = {}
    with warnings.catch_warnings():
      warnings.simplefilter("error")   # a native kernel that falls back to jnp warns
      for backend in ("native", "jnp"):
        opt = fusedopt.Adam(learning_rate=0.01, weight_decay=1e-4, backend=backend).create(params)
        opt = jax.jit(lambda o, g: o.apply_gradient(g))(opt, grads)
        out[backend] = [np.asarray(x) for x in jax.tree.leaves(opt.target)]
    built = [f for f in os.listdir(os.environ["FUSEDOPT_CACHE_DIR"]) if f.endswith(".so")]
    assert built, "no native kernel was compiled"
    for p, a, b in zip(jax.tree.leaves(params), out["native"], out["jnp"]):
      assert not np.array_equal(a, np.asarray(p))          # the step moved the params
      # native and jnp differ by XLA:CPU's rewrites: FMA contraction, rsqrt (test_backends.py)
      np.testing.assert_allclose(a, b, rtol=0, atol=4 * np.spacing(np.float32(np.abs(b).max())))
    print("smoke ok:", here, "jax", jax.__version__, "kernels", len(built))
""")


def test_wheel_installs_and_runs(dists):
  if not any(shutil.which(c) for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c):
    pytest.skip("no C++ compiler for the native backend")   # a failure under CI=true
  tmp, _, wheel = dists
  env = tmp / "venv"
  venv.create(env, with_pip=False, symlinks=True)
  py = env / "bin" / "python"
  # This pip installs into the new venv (--python): the wheel only, nothing downloaded.
  _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index",
        "--disable-pip-version-check", "-q", wheel])
  env_site = _run([py, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                  ).stdout.strip()
  ours = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"],
                        sysconfig.get_paths()["platlib"]])
  (pathlib.Path(env_site) / "_fusedopt_test_deps.pth").write_text(
      "".join(f"{d}\n" for d in ours if os.path.isdir(d)))
  run_dir = tmp / "run"   # not the checkout: its fusedopt/ must not be importable
  run_dir.mkdir()
  env_vars = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
  env_vars.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1",
                  FUSEDOPT_CACHE_DIR=str(tmp / "kernel-cache"))
  proc = _run([py, "-I", "-c", SMOKE, env], cwd=run_dir, env=env_vars)
  assert "smoke ok:" in proc.stdout, proc.stdout
