#!/bin/bash
# The GPU checks for a lent machine whose python3 already has jax with CUDA (no network needed),
# in order of what they decide, each stage under its own timeout so that the whole run fits one
# device call (600 s; a session is lent 15 min of device time in all, start-up included) and every
# finished stage has written its results under OUTDIR:
#   1. the full-step tree benchmark (GPT-2-124M, ResNet-50, 2000 small leaves; Adam and LAMB;
#      optax, auto, jnp, pallas, triton -- and torch's fused/foreach where the image has torch
#      with CUDA -- side by side, each checked against jnp before timing):
#      what `backend="auto"` should pick on a GPU (`python -m bench.decide` prints it);
#   2. the kernel roofline on one flat buffer (pallas, triton -- when triton and jax-triton are
#      importable -- jnp, torch fused/foreach AdamW; SWEEP=1 adds the block x num_warps sweeps);
#   3. the Triton and Pallas numerics tests compiled for the GPU against the CPU oracle;
#   4. with MOSAIC=1 (Hopper and newer), the Mosaic GPU kernels (kernels/mosaic_gpu.py, issue 20):
#      the Pallas numerics tests on them, then the GPT-2-124M Adam step and the kernel roofline
#      beside the Triton-lowered Pallas kernels and jax-triton's (180 s);
#   5. with LOW_BIT=1, Adam's step with int8/fp8 state on the Triton kernels against float32,
#      the jnp path and bitsandbytes/torchao 8-bit Adams where the image has them (bench.low_bit
#      --anchors; 90 s), then the Pallas kernel's: compiled, bitwise against
#      NumPy (tests/test_pallas_numerics.py -k quantized; 60 s), and its step (40 s).
#   Stages 4 and 5 make a second call, when the first used its 550 s. The session's 900 s of
#   device time (start-ups included) rarely hold both in full: issue 21's first call comes
#   first; then `NO_TREES=1 NO_KERNELS=1 NO_TESTS=1 MOSAIC=1 bash bench/gpu_run.sh OUTDIR`
#   (180 s; its numerics tests first), and LOW_BIT=1 (190 s) only if time is left.
#   bash bench/gpu_run.sh OUTDIR [bench.kernels args...]
# Variables: TREES, OPTIMS, IMPLS, KERNEL_OPTIMS, KERNEL_IMPLS, NO_TREES=1, NO_KERNELS=1,
# NO_TESTS=1, LOW_BIT=1, MOSAIC=1 (MOSAIC_SWEEP=1 adds its tuning sweep, 120 s), *_TIMEOUT (s).
set -u
OUTDIR=${1:-bench/results}; shift || true
REPO=$(cd "$(dirname "$0")/.." && pwd)
case "$OUTDIR" in /*) ;; *) OUTDIR="$REPO/$OUTDIR";; esac
SITE=$(mktemp -d)
# fusedopt as installed (kernels/ is the subpackage fusedopt.kernels); run from $SITE so the
# checkout's own fusedopt/ (without kernels) is not first on sys.path.
cp -r "$REPO/fusedopt" "$REPO/bench" "$SITE/" && cp -r "$REPO/kernels" "$SITE/fusedopt/kernels"
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda,cpu
# jax-triton is pure Python: where the image lacks it, use the copy `make gpu-vendor` put in
# .gpu_vendor (carried to the device machine with the working tree; git ignores it)
if ! python3 -c "import jax_triton" 2>/dev/null && [ -d "$REPO/.gpu_vendor" ]; then
  export PYTHONPATH="$SITE:$REPO/.gpu_vendor"
fi
stage() { echo "=== $(date +%T) $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"
python3 -c "import triton, jax_triton; print('triton', triton.__version__, 'jax_triton', jax_triton.__version__, jax_triton.__file__)"
cd "$SITE"
# jax-triton 0.3 hands XLA Triton's PTX in the ISA of Triton's own ptxas (9.4 with Triton 3.9),
# which an older ptxas on XLA's side rejects; with 0.4 fusedopt writes the target's ISA (8.0).
# For 0.3, point Triton at XLA's ptxas (kernels/triton.py ptx_mismatch), unless already set.
if [ -z "${TRITON_PTXAS_BLACKWELL_PATH:-}${TRITON_PTXAS_PATH:-}" ]; then
  XLA_PTXAS=$(python3 -c "from fusedopt.kernels import triton as t; print(t.xla_ptxas() or '')" \
    2>/dev/null | tail -1)
  if [ -n "$XLA_PTXAS" ]; then
    export TRITON_PTXAS_PATH="$XLA_PTXAS" TRITON_PTXAS_BLACKWELL_PATH="$XLA_PTXAS"
  fi
fi
echo "XLA's ptxas: ${XLA_PTXAS:-not found}; Triton's: ${TRITON_PTXAS_BLACKWELL_PATH:-its own}"
# issue 21 asks for torch's fused and foreach AdamW on the trees' own shapes beside ours
TORCH_ROWS=$(python3 -c "import torch; assert torch.cuda.is_available(); print(',torch-fused,torch-foreach')" 2>/dev/null | tail -1)
if [ "${NO_TREES:-0}" != 1 ]; then
  stage "trees"
  # SIGTERM at the timeout: the bench writes the (tree, optimizer) groups it finished, in the
  # order below (small-2000 last: compiling its jnp step for an H100 took 141-173 s on 2 CPU cores,
  # bench/compile_only), -k: a hard kill 20 s later
  timeout -k 20 ${TREES_TIMEOUT:-210} python3 -m bench --device gpu \
    --trees ${TREES:-gpt2-124m,resnet50,small-2000} --optims ${OPTIMS:-adam,lamb} \
    --impls ${IMPLS:-optax,auto,jnp,pallas,triton$TORCH_ROWS} --no-progress --out "$OUTDIR" 2>&1
  stage "decide"   # per optimizer: the backend fastest on most trees (for kernels/registry.py auto_choice)
  python3 -m bench.decide $(ls -t "$OUTDIR"/gpu-*.json | head -1) 2>&1
fi
if [ "${NO_KERNELS:-0}" != 1 ]; then
  stage "kernels"
  timeout ${KERNELS_TIMEOUT:-130} python3 -m bench.kernels --device gpu --out "$OUTDIR" \
    --optims ${KERNEL_OPTIMS:-adam,momentum,lamb} --impls ${KERNEL_IMPLS:-pallas,triton,jnp,torch} \
    $([ "${SWEEP:-0}" = 1 ] && echo --sweep) "$@" 2>&1
fi
if [ "${NO_TESTS:-0}" != 1 ]; then
  stage "triton tests"
  (cd /tmp && timeout ${TRITON_TESTS_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider -x \
    "$REPO/tests/test_triton_kernels.py" -k "t1 or t3" 2>&1 | tail -30
    echo "pytest exit ${PIPESTATUS[0]} (124: timed out)")
  stage "pallas tests"
  (cd /tmp && timeout ${PALLAS_TESTS_TIMEOUT:-90} python3 -m pytest -q -p no:cacheprovider \
    "$REPO/tests/test_pallas_numerics.py" -k "not quantized" 2>&1 | tail -25
    echo "pytest exit ${PIPESTATUS[0]} (124: timed out)")
fi
if [ "${MOSAIC:-0}" = 1 ]; then
  stage "mosaic gpu tests"   # the Pallas numerics tests, run on the Mosaic GPU kernels
  (cd /tmp && FUSEDOPT_TEST_GPU_BACKEND=mosaic_gpu timeout ${MOSAIC_TESTS_TIMEOUT:-60} \
    python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_pallas_numerics.py" 2>&1 | tail -25
    echo "pytest exit ${PIPESTATUS[0]} (124: timed out)")
  stage "mosaic gpu step"
  timeout ${MOSAIC_TREES_TIMEOUT:-60} python3 -m bench --device gpu --trees gpt2-124m --optims adam \
    --impls pallas,mosaic_gpu,triton --no-progress --out "$OUTDIR" --tag mosaic 2>&1
  stage "mosaic gpu kernels"
  timeout ${MOSAIC_KERNELS_TIMEOUT:-60} python3 -m bench.kernels --device gpu --out "$OUTDIR" \
    --optims adam --impls pallas,mosaic_gpu,triton --tag mosaic 2>&1
  if [ "${MOSAIC_SWEEP:-0}" = 1 ]; then   # units per CTA x units per step x stages (18)
    stage "mosaic gpu sweep"
    timeout ${MOSAIC_SWEEP_TIMEOUT:-120} python3 -m bench.kernels --device gpu --out "$OUTDIR" \
      --optims adam --impls mosaic_gpu --sweep --tag mosaic-sweep 2>&1
  fi
fi
if [ "${LOW_BIT:-0}" = 1 ]; then
  stage "low-bit state"
  timeout ${LOW_BIT_TIMEOUT:-90} python3 -m bench.low_bit --trees gpt2-124m --runs 5 \
    --backend triton --jnp-path --anchors --out "$OUTDIR" --tag "gpu-$(date +%F)" 2>&1
  # the Pallas kernel (packed flat buffers; int8 maps read by address): bitwise against NumPy,
  # then its step
  (cd /tmp && timeout ${LOW_BIT_TESTS_TIMEOUT:-60} python3 -m pytest -q -p no:cacheprovider \
    "$REPO/tests/test_pallas_numerics.py" -k quantized 2>&1 | tail -25
    echo "pytest exit ${PIPESTATUS[0]} (124: timed out)")
  timeout ${LOW_BIT_PALLAS_TIMEOUT:-40} python3 -m bench.low_bit --trees gpt2-124m --runs 5 \
    --backend pallas --out "$OUTDIR" --tag "gpu-pallas-$(date +%F)" 2>&1
fi
stage "done"
