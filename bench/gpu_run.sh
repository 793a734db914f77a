#!/bin/bash
# Runs the GPU checks on a machine whose python3 already has jax with CUDA (no network needed):
# the Pallas and Triton numerics tests compiled for the GPU, the kernel roofline benchmark (pallas,
# triton -- when triton and jax-triton are importable -- jnp and torch fused AdamW side by side,
# plus the block x num_warps sweep of both kernels with SWEEP=1), then (unless NO_TREES=1) the
# full-step tree benchmark (optax, auto, jnp, pallas, triton; a backend that cannot run is skipped).
#   bash bench/gpu_run.sh OUTDIR [bench.kernels args...]
set -u
OUTDIR=${1:-bench/results}; shift || true
REPO=$(cd "$(dirname "$0")/.." && pwd)
SITE=$(mktemp -d)
# fusedopt as installed (kernels/ is the subpackage fusedopt.kernels); run from $SITE so the
# checkout's own fusedopt/ (without kernels) is not first on sys.path.
cp -r "$REPO/fusedopt" "$REPO/bench" "$SITE/" && cp -r "$REPO/kernels" "$SITE/fusedopt/kernels"
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda,cpu
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"
(cd /tmp && timeout 300 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_pallas_numerics.py" 2>&1 | tail -25)
# the triton backend: numerics compiled on the GPU against the CPU oracle, plus its compile checks
python3 -c "import triton, jax_triton; print('triton', triton.__version__, 'jax_triton', jax_triton.__version__)" \
  && (cd /tmp && timeout 400 python3 -m pytest -q -p no:cacheprovider -rP "$REPO/tests/test_triton_kernels.py" 2>&1 | tail -40)
case "$OUTDIR" in /*) ;; *) OUTDIR="$REPO/$OUTDIR";; esac
cd "$SITE" && timeout ${KERNELS_TIMEOUT:-500} python3 -m bench.kernels --device gpu --out "$OUTDIR" \
  $([ "${SWEEP:-0}" = 1 ] && echo --sweep) "$@" 2>&1
[ "${NO_TREES:-0}" = 1 ] || timeout ${TREES_TIMEOUT:-500} python3 -m bench \
  --device gpu --trees ${TREES:-gpt2-124m,resnet50,small-2000} --optims ${OPTIMS:-adam} \
  --impls optax,auto,jnp,pallas,triton --no-progress --out "$OUTDIR" 2>&1
