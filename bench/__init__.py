"""CPU benchmark: fusedopt Adam (native and jnp backends) vs optax.adamw, side by side.

Run with ``python -m bench`` (``--help`` for the flags). See ``bench/__main__.py``.
"""
