"""Cases and tolerances shared by the backend tests (tests/test_backends.py,
tests/test_pallas_numerics.py, tests/triton_cases.py): every built-in flat optimizer with each of
its option branches, ragged leaf shapes, and the ulp distance the kernels are held to."""
import jax.numpy as jnp
import numpy as np

CONFIGS = [
    ("GradientDescent", {}),
    ("Momentum", {}),
    ("Momentum", {"nesterov": True, "weight_decay": 0.01}),
    ("Adam", {}),
    ("Adam", {"weight_decay": 0.1}),
    ("Adagrad", {}),
    ("RMSProp", {}),
    ("RMSProp", {"centered": True}),
    ("LAMB", {}),
    ("LAMB", {"weight_decay": 0.01}),
    ("LARS", {}),
    ("LARS", {"nesterov": True, "weight_decay": 0.01, "eps": 1e-6}),
    ("AdaBelief", {}),
    ("AdaBelief", {"weight_decay": 0.01}),
    ("Adadelta", {"weight_decay": 0.01}),
]


def config_id(name, kw):
  return f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"


IDS = [config_id(n, kw) for n, kw in CONFIGS]

# Ragged shapes: nothing a multiple of the 1024-element alignment unit but by accident; (0,) an
# empty leaf.
SHAPES = [(), (1,), (7,), (3, 5), (1025,), (0,), (33, 65), (2, 3, 4), (4097,), (3000,)]


def ulps_error(a, b, old, step_size=0.0):
  """|a - b| per element, in ulps (of a's dtype) of |old| + max(|a|, |b|) + step_size: the scale
  of the terms an update adds, so a kernel that contracts a*b+c into an FMA where the oracle
  does not stays within a couple of these."""
  dtype = np.dtype(a.dtype)
  a64, b64, old64 = (np.asarray(x, np.float32).astype(np.float64) for x in (a, b, old))
  scale = np.abs(old64) + np.maximum(np.abs(a64), np.abs(b64)) + step_size
  spacing = np.spacing(scale.astype(np.float32)).astype(np.float64)
  if dtype != np.float32:   # ulp of the storage dtype
    spacing = spacing * 2.0 ** (23 - jnp.finfo(dtype).nmant)
  return np.abs(a64 - b64) / spacing
