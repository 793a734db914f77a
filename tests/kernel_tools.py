"""Helpers for verifying GPU/TPU kernels on a machine without either (see tests/test_pallas_lowering.py).

- ``lower_cuda``: lowers a jitted function for CUDA on a CPU-only jaxlib (Pallas -> Triton IR
  inside a ``__gpu$xla.gpu.triton`` custom call), under an abstract H100 (``gpu_abstract_mesh``).
- ``ttir_texts``: the Triton IR of every such custom call in a lowered module.
- ``compile_ttir`` / ``ptxas_stats``: compile that IR to PTX and cubin for a chosen SM with the
  ``triton`` package (it ships ptxas), and read ptxas's register/spill report.
- ``lower_tpu``: lowers for TPU under an abstract TPU mesh (no libtpu needed).
Patterns from ../shared/reference/kernel-verification (jax 0.10.2, triton 3.9.0).
"""
import contextlib
import importlib.util
import os
import re
import subprocess
import tempfile

import jax
import pytest


def gpu_abstract_mesh(device_kind="NVIDIA H100 80GB HBM3"):
  """A one-device abstract mesh of a GPU: jax >= 0.12 asks it of a CUDA lowering on a host
  without a GPU (Pallas' Triton lowering reads the GPU's compute capability from it)."""
  return jax.sharding.AbstractMesh(
      (1,), ("x",), (jax.sharding.AxisType.Explicit,),
      abstract_device=jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1,
                                                  platform="gpu"))


@contextlib.contextmanager
def h100_target(compute_capability=None):
  """Trace for a GPU from a CPU host, for an ahead-of-time compile to the H100 topology
  (``h100_replicated``): fusedopt's kernels target a GPU (``common.targeting``) and jax >= 0.12
  reads the GPU from the context's abstract mesh (the topology's own)."""
  from fusedopt.kernels import common  # pylint: disable=import-outside-toplevel
  with common.targeting("gpu", compute_capability), \
       jax.sharding.use_abstract_mesh(h100_replicated().mesh.abstract_mesh):
    yield


def lower_cuda(f, *args, donate_argnums=()):
  with jax.sharding.use_abstract_mesh(gpu_abstract_mesh()):
    return jax.jit(f, donate_argnums=donate_argnums).trace(*args).lower(
        lowering_platforms=("cuda",))


def ttir_texts(lowered):
  """[(kernel_name, ttir_text)] for every Pallas/Triton custom call in ``lowered``."""
  from jax._src.lib.mlir import ir  # pylint: disable=import-outside-toplevel
  from jax._src.pallas.triton import lowering as tl  # pylint: disable=import-outside-toplevel
  out = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for o in block.operations:
          if o.operation.name == "stablehlo.custom_call":
            if ir.StringAttr(o.attributes["call_target_name"]).value == "__gpu$xla.gpu.triton":
              cfg = ir.DictAttr(o.attributes["mhlo.backend_config"])
              with tl._new_ir_context():  # pylint: disable=protected-access
                out.append((ir.StringAttr(cfg["name"]).value,
                            str(ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes))))
          walk(o.operation)
  walk(lowered.compiler_ir("stablehlo").operation)
  return out


def compile_ttir(ttir, arch, num_warps=4, num_stages=1):
  """Triton IR text -> compiled kernel (``.asm['ptx']``, ``.asm['cubin']``) for sm_<arch>."""
  import triton  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory(prefix="fusedopt-ttir-") as d:
    path = os.path.join(d, "k.ttir")
    with open(path, "w") as f:
      f.write(ttir)
    return triton.compile(path, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def ptxas_stats(ptx, arch):
  """ptxas -v's report for ``ptx``: {'registers': int, 'spill_stores': int, 'spill_loads': int}."""
  from triton.backends.nvidia.compiler import get_ptxas  # pylint: disable=import-outside-toplevel
  sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
  with tempfile.TemporaryDirectory(prefix="fusedopt-ptx-") as d:
    p = os.path.join(d, "k.ptx")
    with open(p, "w") as f:
      f.write(ptx)
    r = subprocess.run([get_ptxas(arch).path, "-v", f"-arch={sm}", p, "-o",
                        os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
  text = r.stdout + r.stderr
  return {"registers": int(re.search(r"Used (\d+) registers", text).group(1)),
          "spill_stores": int(re.search(r"(\d+) bytes spill stores", text).group(1)),
          "spill_loads": int(re.search(r"(\d+) bytes spill loads", text).group(1)),
          "text": text}


def tpu_abstract_mesh(device_kind="TPU v5 lite"):
  return jax.sharding.AbstractMesh(
      (1,), ("x",), (jax.sharding.AxisType.Explicit,),
      abstract_device=jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1,
                                                  platform="tpu"))


def lower_tpu(f, *args, donate_argnums=()):
  with jax.sharding.use_abstract_mesh(tpu_abstract_mesh()):
    return jax.jit(f, donate_argnums=donate_argnums).trace(*args).lower(
        lowering_platforms=("tpu",))


# An H100's device description for XLA:GPU's compile-only topology (jax-cuda12-plugin): the
# whole optimizer step compiles for it on a machine without a GPU.
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def h100_replicated():
  """A replicated ``NamedSharding`` on one H100 of XLA:GPU's compile-only topology, for
  ahead-of-time compiles of whole steps. Skips the calling test only where jax-cuda12-plugin (the
  `test` extra has it) is not installed (under CI=true that fails: tests/conftest.py); any
  other error building the topology fails the test."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    pytest.skip("jax-cuda12-plugin not installed: no CUDA compile-only topology")
  topo = topologies.get_topology_desc(platform="cuda", target_config=H100, topology="1x1x1")
  mesh = topologies.make_mesh(topo, (1,), ("x",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
