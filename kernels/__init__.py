"""Kernel backends for fusedopt's flat buffers (installed as ``fusedopt.kernels``).

- ``native``: C++ kernels for the CPU, generated from each optimizer's ``Rule`` and called
  through the XLA FFI: one pass over per-leaf params/grads and flat state, in place.
"""
