"""A Python interpreter with the real flax 0.5.3 (``flax.optim``), for the differential test.

``flax053_python()`` returns ``(python, None)`` or ``(None, reason)``; it never raises and never
waits longer than its timeouts. The interpreter is, in this order:

* ``$FUSEDOPT_FLAX053_PYTHON`` if set: an existing interpreter that has flax 0.5.3 (checked, one
  short import); ``FUSEDOPT_FLAX053_PYTHON=skip`` skips the differential test (fails under CI=true);
* ``<repo>/.venv-flax053/bin/python``, created on first use and reused while its stamp file
  (``.venv-flax053/.fusedopt-flax053-<key>``; key: the pinned requirements and the base
  interpreter's version) exists, so later runs cost nothing.

Creating it takes about a minute (two ``pip install`` calls, from the configured index). flax
0.5.3 (July 2022) needs a jax that still has the APIs it uses; jax/jaxlib 0.4.13 is the oldest with
wheels for CPython 3.11 and the newest flax 0.5.3 still imports with (numpy < 2, scipy < 1.12,
ml_dtypes 0.2.0 pinned to match). flax, optax and chex are installed with ``--no-deps`` because
their declared dependencies would pull a newer jax (and tensorstore/orbax, not needed here);
pip's complaint about them is harmless. jaxlib 0.4.13 has wheels for CPython 3.8-3.11 only: when
the interpreter running the tests is newer, a python3.11/3.10/3.9 on PATH is used instead.

A failed creation is remembered for an hour (``.venv-flax053/.failed-<key>`` holds the reason)
so that every local test run does not pay the pip timeouts again; delete the folder, or set
``FUSEDOPT_FLAX053_RETRY=1``, to retry at once. Under CI (``CI=true``) it is never remembered:
every run tries again, and the differential test fails instead of skipping (tests/conftest.py).
Concurrent test runs wait for one another through a lock file in the temp directory.
"""
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV_VAR = "FUSEDOPT_FLAX053_PYTHON"
REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-flax053"

# Installed in this order; the second group with --no-deps (see the module docstring).
REQUIREMENTS = ["jax==0.4.13", "jaxlib==0.4.13", "numpy<2", "scipy<1.12", "ml_dtypes==0.2.0",
                "msgpack", "typing_extensions", "PyYAML", "rich", "toolz"]
REQUIREMENTS_NO_DEPS = ["flax==0.5.3", "optax==0.1.5", "chex==0.1.7"]

# The check that an interpreter is usable: imports what the scenarios import.
CHECK = ("import flax; from flax import optim, serialization; from flax.core import FrozenDict; "
         "from flax.optim.dynamic_scale import DynamicScale; "
         "assert flax.__version__ == '0.5.3', flax.__version__; print(flax.__version__)")

PIP_TIMEOUT_S = 900        # each pip install (downloads included)
STEP_TIMEOUT_S = 180       # venv creation, the import check
LOCK_TIMEOUT_S = 2 * PIP_TIMEOUT_S + 3 * STEP_TIMEOUT_S
FAILURE_TTL_S = 3600


def _ci():
  """CI=true: a failed venv creation is not remembered (each CI run retries)."""
  return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _run(cmd, timeout, env=None):
  """(ok, output tail) of ``cmd``; a timeout is a failure, not a hang."""
  try:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)
  except subprocess.TimeoutExpired:
    return False, f"timed out after {timeout} s: {' '.join(map(str, cmd))}"
  except OSError as e:
    return False, f"{type(e).__name__}: {e}"
  lines = [l for l in proc.stdout.splitlines()
           if not l.startswith("WARNING: Location 'file:///opt/pypi")]
  return proc.returncode == 0, "\n".join(lines[-15:])


# XLA flags jaxlib 0.4.13 knows, of those make test sets: it aborts on an unknown one
LEGACY_XLA_FLAGS = ("xla_llvm_disable_expensive_passes", "xla_force_host_platform_device_count")


def legacy_env(env):
  """``env`` for a process of the flax 0.5.3 venv: no PYTHONPATH (nothing of fusedopt's
  environment leaks into flax's) and only the XLA_FLAGS its jaxlib knows."""
  env = dict(env)
  env.pop("PYTHONPATH", None)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if f.lstrip("-").split("=")[0] in LEGACY_XLA_FLAGS]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def _quiet_env():
  return legacy_env(dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore",
                         TF_CPP_MIN_LOG_LEVEL="3"))


def check_python(python, timeout=STEP_TIMEOUT_S):
  """None if ``python`` imports flax 0.5.3's optim, else the reason."""
  ok, out = _run([python, "-c", CHECK], timeout, env=_quiet_env())
  return None if ok else f"{python} cannot import flax 0.5.3's optim: {out}"


def _base_python():
  """A CPython 3.8-3.11 (jaxlib 0.4.13's wheels) to build the venv from, or None."""
  if (3, 8) <= sys.version_info[:2] <= (3, 11):
    return getattr(sys, "_base_executable", None) or sys.executable
  for name in ("python3.11", "python3.10", "python3.9"):
    found = shutil.which(name)
    if found:
      return found
  return None


def _key(base):
  ok, version = _run([base, "-c", "import sys; print(sys.version.split()[0])"], STEP_TIMEOUT_S)
  text = "\n".join(REQUIREMENTS + ["--no-deps"] + REQUIREMENTS_NO_DEPS + [version.strip()])
  return hashlib.sha1(text.encode()).hexdigest()[:12]


def _create(base, key):
  """Builds the venv; None on success, else the reason."""
  shutil.rmtree(VENV, ignore_errors=True)
  ok, out = _run([base, "-m", "venv", str(VENV)], STEP_TIMEOUT_S, env=_quiet_env())
  if not ok:
    return f"python -m venv failed: {out}"
  py = str(VENV / "bin" / "python")
  # --no-compile: the scenarios import a small part of what is installed; Python compiles that
  # on first import instead of pip compiling every module up front (~10 s of CPU)
  pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
  ok, out = _run(pip + REQUIREMENTS, PIP_TIMEOUT_S, env=_quiet_env())
  if not ok:
    return f"pip install {' '.join(REQUIREMENTS)} failed: {out}"
  ok, out = _run(pip + ["--no-deps"] + REQUIREMENTS_NO_DEPS, PIP_TIMEOUT_S, env=_quiet_env())
  if not ok:
    return f"pip install --no-deps {' '.join(REQUIREMENTS_NO_DEPS)} failed: {out}"
  reason = check_python(py)
  if reason:
    return reason
  (VENV / f".fusedopt-flax053-{key}").write_text(
      "created by tests/flax053_env.py; delete this folder to rebuild\n")
  return None


def flax053_python():
  """``(python, None)``: an interpreter with flax 0.5.3; or ``(None, reason)``."""
  override = os.environ.get(ENV_VAR)
  if override:
    if override == "skip":
      return None, f"{ENV_VAR}=skip"
    reason = check_python(override)
    return (None, reason) if reason else (override, None)

  base = _base_python()
  if base is None:
    return None, ("no CPython 3.8-3.11 found (jaxlib 0.4.13, which flax 0.5.3 needs, has no "
                  f"wheels for Python {sys.version_info[0]}.{sys.version_info[1]}); set {ENV_VAR}")
  key = _key(base)
  python = VENV / "bin" / "python"
  stamp = VENV / f".fusedopt-flax053-{key}"
  failed = VENV / f".failed-{key}"
  if stamp.exists() and python.exists():
    return str(python), None

  lock_path = Path(tempfile.gettempdir()) / (
      "fusedopt-flax053-" + hashlib.sha1(str(VENV).encode()).hexdigest()[:12] + ".lock")
  with open(lock_path, "w") as lock:
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except OSError:
        if time.monotonic() > deadline:
          return None, f"timed out waiting for another run creating {VENV} ({lock_path})"
        time.sleep(1)
    try:
      if stamp.exists() and python.exists():      # created meanwhile by another run
        return str(python), None
      if (failed.exists() and time.time() - failed.stat().st_mtime < FAILURE_TTL_S
          and not os.environ.get("FUSEDOPT_FLAX053_RETRY") and not _ci()):
        return None, ("creating the flax 0.5.3 venv failed less than an hour ago (set "
                      f"FUSEDOPT_FLAX053_RETRY=1 to retry now): {failed.read_text()}")
      reason = _create(base, key)
      if reason is None:
        return str(python), None
      VENV.mkdir(exist_ok=True)
      failed.write_text(reason)
      return None, f"could not create the flax 0.5.3 venv at {VENV}: {reason}"
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


if __name__ == "__main__":
  py, why = flax053_python()
  print(py or f"unavailable: {why}")
  sys.exit(0 if py else 1)
