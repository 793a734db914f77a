"""Benchmarks: one full optimizer step of fusedopt against its peers (``python -m bench``), and
the kernel roofline over one flat buffer (``python -m bench.kernels``). See bench/README.md.
"""
