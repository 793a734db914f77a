"""tests/conftest.py's rule: under CI=true (.ci/run sets it) a skipped test fails -- the `test`
extra pins every tool, so a skip there means a broken environment -- except tests marked
``ci_may_skip`` and xfails; locally skips stay skips. Run on a small sample suite in a
subprocess with a copy of the conftest (no jax imported: about a second)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

SAMPLE = '''
import pytest

@pytest.mark.skipif(True, reason="tool not installed")
def test_skipif_marker():
  pass

def test_skip_call():
  pytest.skip("venv not built")

def test_importorskip():
  pytest.importorskip("fusedopt_no_such_module")

@pytest.fixture(scope="session")
def interpreter():
  pytest.skip("no interpreter")

def test_fixture_skip(interpreter):
  pass

@pytest.mark.ci_may_skip("torch is not pinned")
def test_may_skip():
  pytest.importorskip("fusedopt_no_such_module")

@pytest.mark.xfail(strict=True, reason="a known bug")
def test_known_bug():
  assert False

def test_passes():
  pass
'''


MODULE_SKIP = """
import pytest
pytest.importorskip("fusedopt_no_such_module")   # the whole module, at collection

def test_never_collected():
  pass
"""


@pytest.mark.parametrize("ci", [False, True], ids=["local", "CI=true"])
def test_skips_fail_under_ci(tmp_path, ci):
  shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path / "conftest.py")
  (tmp_path / "test_sample.py").write_text(SAMPLE)
  (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
  env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
  if ci:
    env["CI"] = "true"
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "--continue-on-collection-errors"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  summary = proc.stdout.strip().splitlines()[-1]
  got = {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", summary)}
  if ci:   # setup-time skips (marker, fixture) and the module's become errors, others failures
    assert (proc.returncode, got) == (1, {"failed": 2, "errors": 3, "passed": 1, "skipped": 1,
                                          "xfailed": 1}), summary
  else:
    assert (proc.returncode, got) == (0, {"passed": 1, "skipped": 6, "xfailed": 1}), summary


def test_failed_flax053_venv_is_remembered_locally_but_retried_under_ci(tmp_path, monkeypatch):
  """flax053_env remembers a failed venv creation for an hour (local runs do not pay pip's
  timeouts again); under CI=true every run tries again."""
  import flax053_env  # pylint: disable=import-outside-toplevel
  tries = []
  monkeypatch.setattr(flax053_env, "VENV", tmp_path / "venv")
  monkeypatch.setattr(flax053_env, "_base_python", lambda: sys.executable)
  monkeypatch.setattr(flax053_env, "_key", lambda base: "key")
  monkeypatch.setattr(flax053_env, "_create", lambda base, key: tries.append(1) or "pip failed")
  for var in (flax053_env.ENV_VAR, "FUSEDOPT_FLAX053_RETRY", "CI"):
    monkeypatch.delenv(var, raising=False)
  assert flax053_env.flax053_python() == (None, f"could not create the flax 0.5.3 venv at "
                                                f"{tmp_path / 'venv'}: pip failed")
  python, reason = flax053_env.flax053_python()
  assert python is None and "less than an hour ago" in reason and len(tries) == 1
  monkeypatch.setenv("CI", "true")
  python, reason = flax053_env.flax053_python()
  assert python is None and "pip failed" in reason and len(tries) == 2


def test_flax053_processes_get_only_the_xla_flags_their_jaxlib_knows():
  """make test's XLA flags reach the flax 0.5.3 venv's processes filtered (jaxlib 0.4.13 aborts
  on a flag it does not know, such as --xla_cpu_use_fusion_emitters), without PYTHONPATH."""
  import flax053_env  # pylint: disable=import-outside-toplevel
  env = flax053_env.legacy_env({"XLA_FLAGS": "--xla_llvm_disable_expensive_passes=true "
                                "--xla_cpu_use_fusion_emitters=false "
                                "--xla_force_host_platform_device_count=4",
                                "PYTHONPATH": "tests", "HOME": "/h"})
  assert env == {"XLA_FLAGS": "--xla_llvm_disable_expensive_passes=true "
                              "--xla_force_host_platform_device_count=4", "HOME": "/h"}


def test_h100_topology_errors_are_not_skips(monkeypatch):
  """kernel_tools.h100_replicated skips only where jax-cuda12-plugin is missing; any other error
  building the compile-only topology fails the calling test (it used to skip on any exception)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import kernel_tools  # pylint: disable=import-outside-toplevel
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    pytest.skip("jax-cuda12-plugin not installed")

  def broken(**kw):
    raise RuntimeError("broken topology")
  monkeypatch.setattr(topologies, "get_topology_desc", broken)
  try:
    kernel_tools.h100_replicated()
  except pytest.skip.Exception as e:
    pytest.fail(f"a broken topology skipped the test: {e}")
  except RuntimeError as e:
    assert "broken topology" in str(e)
  else:
    pytest.fail("no error")


def test_every_mutant_still_applies():
  """``tools/mutate.py`` substitutes each mutant's text in its file; a refactor that changes that
  text silently retires the mutant (the script then stops on it). Each must occur exactly once."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.join(root, "tools"))
  try:
    import mutate  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  stale = []
  for m in mutate.MUTANTS:
    with open(os.path.join(root, m.path)) as f:
      n = f.read().count(m.old)
    if n != 1:
      stale.append(f"{m.name}: {m.path} has its text {n} times")
  assert stale == []
