import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Kernel verification tools (tests/test_pallas_lowering.py): keep Triton's cache out of $HOME,
# keep its FP-fusion default (and silence the warning about it), and stop libtpu from querying
# a GCE metadata server for a TPU that is not there.
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fusedopt-triton"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
