"""The backends that run an optimizer's ``Rule`` over a flat layout (installed as
``fusedopt.kernels``). Each is a ``common.Backend`` in its module's ``BACKENDS``:

- ``jnp`` (``jnp.py``): ``jax.numpy``, one XLA fusion per group; the oracle of every kernel;
- ``native`` (``native.py``): C++ kernels for the CPU generated from the rule, called through the
  XLA FFI, reading each leaf in place;
- ``pallas``, ``pallas_interpret`` (``pallas.py``): one ``pallas_call`` per group (Triton on GPUs,
  Mosaic on TPUs);
- ``triton``, ``triton_interpret`` (``triton.py``): hand-written Triton kernels via jax-triton,
  leaf-direct.

``registry.py`` names them, decides which one runs a group (``auto`` included) and gives kernels
jnp's derivatives; ``common.py`` holds the interface and what the kernels share; ``symbolic.py``
traces a rule into C++ or Triton source.
"""
