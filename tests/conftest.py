import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Kernel verification tools (tests/test_pallas_lowering.py): keep Triton's cache out of $HOME,
# keep its FP-fusion default (and silence the warning about it), and stop libtpu from querying
# a GCE metadata server for a TPU that is not there.
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fusedopt-triton"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

# Under CI (CI=true; .ci/run sets it) the `test` extra, installed with constraints/ci.txt, pins
# every tool the tests use (triton, libtpu, jax-cuda12-plugin, optax, flax, a C++ compiler for
# the native kernels, the flax 0.5.3 venv): a test that skips there hides a broken environment,
# so every skip fails instead, with its reason. Only tests marked ``ci_may_skip(reason)`` may
# skip: they need a tool the extra does not pin (torch), or test another platform's behaviour
# (CPU-only checks on a GPU machine).
CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")



def host_devices_flags(n):
  """XLA_FLAGS (appended to the environment's) for a subprocess with ``n`` host devices. XLA:CPU
  aborts a collective whose threads have not all arrived within 40 s, which n device threads on
  2 cores beside another pytest worker can exceed: they wait up to 900 s instead. (Only for
  subprocesses of today's jaxlib: the flax 0.5.3 venv's jaxlib rejects these flags.)"""
  return (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
          " --xla_cpu_collective_call_terminate_timeout_seconds=900"
          " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300").strip()


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "ci_may_skip(reason): may skip under CI=true (a tool the `test` extra does "
      "not pin, or another platform's behaviour)")


def _fail_skip(rep):
  reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
  rep.outcome = "failed"
  rep.longrepr = (f"skipped under CI=true, which fails instead (the `test` extra pins every "
                  f"tool; a test that can never run is removed, not skipped): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  rep = outcome.get_result()
  if (CI and rep.skipped and not hasattr(rep, "wasxfail")
      and item.get_closest_marker("ci_may_skip") is None):
    _fail_skip(rep)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  """A whole module skipped at import (``pytest.importorskip`` at module level)."""
  outcome = yield
  rep = outcome.get_result()
  if CI and rep.skipped:
    _fail_skip(rep)


# The longest files first (measured: cold `make test` on 2 cores, 2026-12-07). pytest-xdist's
# --dist loadfile hands files to the workers in collection order, so a long file collected last
# (alphabetically, test_triton_kernels.py with its ~110 s interpreter subprocess) ran alone at
# the end while the other core idled; longest-first keeps both workers busy to the end.
LONGEST_FIRST = ("test_triton_kernels.py", "test_tx.py", "test_numerics.py", "test_sharding.py",
                 "test_bench.py", "test_quantized_state.py", "test_backends.py",
                 "test_stochastic_rounding.py", "test_recent_optimizers.py",
                 "test_flax_conformance.py", "test_flax053_differential.py",
                 "test_pallas_lowering.py", "test_pallas_numerics.py", "test_mosaic_gpu_lowering.py",
                 "test_native_cache.py",
                 "test_checked_update.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  order = {id(item): k for k, item in enumerate(items)}
  items.sort(key=lambda it: (rank.get(it.path.name, len(rank)), order[id(it)]))
