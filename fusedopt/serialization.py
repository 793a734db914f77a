"""Optimizer checkpoints in flax.optim's state-dict format, and flax's msgpack encoding of it.

``{'target': ..., 'state': {'step': ..., 'param_states': ...}}`` where containers become dicts
with string keys (lists and tuples keyed '0', '1', ...) and flat state is written per leaf
(``{field: array}`` mirroring the target), exactly what flax 0.5.3 wrote for its optimizers, so
checkpoints do not depend on the flat layout (block size, alignment, dtype grouping).

Restoring checks every key, shape and dtype against the live optimizer and raises ValueError
naming the first mismatching path. A dtype may only widen losslessly (a flax 0.5.3 checkpoint of
bfloat16 params holds bfloat16 moments; fusedopt keeps float32 ones): anything else is an error.
Restoring builds a new object, so a failed restore leaves the optimizer as it was.

``to_bytes``/``from_bytes`` need no flax: they write flax's msgpack format byte for byte
(arrays as msgpack extension 1 holding ``(shape, dtype name, C-order bytes)``, arrays over
``MAX_CHUNK_SIZE`` bytes split into chunks), so files written by ``flax.serialization.to_bytes``
from a flax 0.5.3 ``flax.optim.Optimizer`` restore here, and the other way round. When flax is
installed, ``flax.serialization.to_state_dict``/``from_state_dict``/``to_bytes``/``from_bytes``
also accept a fusedopt ``Optimizer`` (registered by ``register_with_flax``, called at import).
"""
import dataclasses
import enum
import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import base, quantization
from .flat_state import PARAM_STATE_CLASSES, FlatState, place_like


class CheckpointError(ValueError):
  """The bytes given to ``from_bytes``/``msgpack_restore`` are not a valid fusedopt/flax msgpack
  checkpoint (truncated, trailing bytes, a corrupted array entry, not msgpack at all)."""


_EXPECTED = ("expected flax's msgpack encoding of a state dict, as fusedopt.serialization.to_bytes "
             "and flax.serialization.to_bytes write it: one msgpack map with string keys, arrays "
             "as msgpack extension 1 holding (shape, dtype name, C-order bytes)")


def _is_optimizer(x):
  return hasattr(x, "optimizer_def") and hasattr(x, "restore_state")


def to_state_dict(x):
  """The state dict of ``x``: an ``Optimizer``, its state, or any tree of containers/arrays."""
  if _is_optimizer(x):
    return x.state_dict()
  if isinstance(x, FlatState):
    return to_state_dict(x.per_leaf_dicts())
  if quantization.is_quantized(x):
    return _quantized_to_dict(x)
  if hasattr(x, "as_flax_tree"):   # a container checkpointed as another tree (FlatParams)
    return to_state_dict(x.as_flax_tree())
  if isinstance(x, Mapping):
    return {str(k): to_state_dict(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
    return {str(i): to_state_dict(v) for i, v in enumerate(x)}
  if hasattr(x, "_fields"):  # namedtuple
    return {k: to_state_dict(getattr(x, k)) for k in x._fields}
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {f.name: to_state_dict(getattr(x, f.name)) for f in dataclasses.fields(x)
            if f.metadata.get("pytree_node", True)}
  return x


def _keys_match(path, want, got):
  missing, unknown = set(want) - set(got), set(got) - set(want)
  if missing or unknown:
    raise ValueError(f"checkpoint does not match the optimizer at {path or '/'}: missing "
                     f"{sorted(missing)}, unknown {sorted(unknown)}")


def from_state_dict(template, sd, path=""):
  """A copy of ``template`` with values from state dict ``sd`` (structure, shapes, dtypes
  checked; ValueError naming the first mismatch)."""
  if _is_optimizer(template) and not path:
    return template.restore_state(sd)
  if isinstance(template, FlatState):
    return template.restored_from(from_state_dict(template.per_leaf_dicts(), sd, path))
  if quantization.is_quantized(template) or _is_quantized_dict(sd):
    return _restore_maybe_quantized(template, sd, path)
  if hasattr(template, "as_flax_tree"):
    return template.from_flax_tree(from_state_dict(template.as_flax_tree(), sd, path))
  if isinstance(template, Mapping):
    if not isinstance(sd, Mapping):
      raise ValueError(f"checkpoint has a leaf at {path or '/'} where the optimizer has a dict")
    _keys_match(path, [str(k) for k in template], sd)
    restored = {k: from_state_dict(v, sd[str(k)], f"{path}/{k}") for k, v in template.items()}
    return restored if type(template) is dict else type(template)(restored)
  if isinstance(template, (list, tuple)) and not hasattr(template, "_fields"):
    _keys_match(path, [str(i) for i in range(len(template))], sd)
    return type(template)(from_state_dict(v, sd[str(i)], f"{path}/{i}")
                          for i, v in enumerate(template))
  if hasattr(template, "_fields"):
    _keys_match(path, template._fields, sd)
    return type(template)(*(from_state_dict(getattr(template, k), sd[k], f"{path}/{k}")
                            for k in template._fields))
  if dataclasses.is_dataclass(template) and not isinstance(template, type):
    names = [f.name for f in dataclasses.fields(template) if f.metadata.get("pytree_node", True)]
    _keys_match(path, names, sd)
    return template.replace(**{k: from_state_dict(getattr(template, k), sd[k], f"{path}/{k}")
                               for k in names})
  if template is None or sd is None:
    if template is not None or sd is not None:
      raise ValueError(f"checkpoint and optimizer disagree on an empty entry at {path or '/'}")
    return None
  return _restore_leaf(template, sd, path)


# ----------------------------------------------------------------------------- quantized state

_QKEYS = ("codes", "scales", "format")


def _quantized_to_dict(q):
  """One leaf's quantized state: its codes (uint8, the leaf's shape), its blocks' scales and
  ``format`` = [format id, block] (``quantization.FORMAT_IDS``), so a checkpoint says how to
  read its codes whatever optimizer restores it."""
  return {"codes": q.codes, "scales": q.scales,
          "format": np.asarray([quantization.FORMAT_IDS[q.fmt.name], q.block], np.int32)}


def _is_quantized_dict(sd):
  return isinstance(sd, Mapping) and set(sd) == set(_QKEYS)


def _quantized_from_dict(sd, shape, path):
  fmt_id, block = (int(v) for v in np.asarray(sd["format"]).reshape(-1)[:2])
  names = {v: k for k, v in quantization.FORMAT_IDS.items()}
  if fmt_id not in names or block < 1:
    raise ValueError(f"checkpoint leaf {path}: unknown quantized state format {fmt_id}/{block}")
  codes = np.asarray(sd["codes"])
  scales = np.asarray(sd["scales"])
  n = int(np.prod(shape, dtype=np.int64))
  if codes.dtype != np.uint8 or codes.shape != tuple(shape):
    raise ValueError(f"checkpoint leaf {path}/codes is {codes.dtype}{list(codes.shape)}, the "
                     f"optimizer expects uint8{list(shape)}")
  if scales.dtype != np.float32 or scales.shape != (-(-n // block),):
    raise ValueError(f"checkpoint leaf {path}/scales is {scales.dtype}{list(scales.shape)}, "
                     f"expected float32[{-(-n // block)}] (blocks of {block})")
  return quantization.QuantizedArray(jnp.asarray(codes), jnp.asarray(scales),
                                     quantization.FORMATS[names[fmt_id]], block)


def _quantized_into(template, sd):
  """A ``QuantizedArray`` restored from its checkpoint dict (``_quantized_to_dict``) in
  ``template``'s format and block: codes and scales as they are, or, from another format,
  decoded and encoded again. Wrong shapes or an unknown format raise ``ValueError``."""
  if not _is_quantized_dict(sd):
    raise ValueError(f"expected a quantized state dict with keys {list(_QKEYS)}, got "
                     f"{type(sd).__name__}")
  got = _quantized_from_dict(sd, template.shape, "QuantizedArray")
  if (got.fmt, got.block) == (template.fmt, template.block):
    return got
  return quantization.quantize_like(got.dequantize(), template)


def _restore_maybe_quantized(template, sd, path):
  """A state leaf where the optimizer or the checkpoint stores quantized state: codes and
  scales as they are, or float values the caller's state quantizes (and quantized ones it
  decodes: ``FlatState.from_per_leaf``)."""
  shape = template.shape if quantization.is_quantized(template) else np.shape(template)
  if _is_quantized_dict(sd):
    return _quantized_from_dict(sd, shape, path or "/")
  if isinstance(sd, Mapping):
    raise ValueError(f"checkpoint has a dict at {path or '/'} where the optimizer has state "
                     "(an array, or quantized codes, scales and format)")
  value = np.asarray(sd)
  if value.shape != tuple(shape) or not jnp.issubdtype(value.dtype, jnp.floating):
    raise ValueError(f"checkpoint leaf {path or '/'} is {value.dtype}{list(value.shape)}, the "
                     f"optimizer expects float state of shape {list(shape)}")
  return jnp.asarray(value, jnp.float32)


def _kind(dtype):
  if jnp.issubdtype(dtype, jnp.floating):
    return "float"
  if jnp.issubdtype(dtype, jnp.integer):
    return "int"
  return np.dtype(dtype).kind


def _restore_leaf(template, value, path):
  want = np.dtype(jnp.result_type(template))
  if isinstance(value, (bool, numbers.Number)) and not isinstance(value, np.generic):
    # a Python scalar (hand-written state dicts): its value must fit, its type is weak
    kind_ok = isinstance(value, numbers.Integral) or _kind(want) == "float"
    if not kind_ok or np.shape(template) != ():
      raise ValueError(f"checkpoint leaf {path or '/'} is the Python scalar {value!r}; the "
                       f"optimizer expects {want.name}{list(np.shape(template))}")
    return place_like(jnp.asarray(value, want), template)
  value = value if isinstance(value, jax.Array) else np.asarray(value)
  if np.shape(template) != value.shape:
    raise ValueError(f"checkpoint leaf {path or '/'} has shape {value.shape}, the optimizer "
                     f"expects {np.shape(template)}")
  got = np.dtype(value.dtype)
  if got != want and (_kind(got) != _kind(want) or jnp.promote_types(got, want) != want):
    raise ValueError(f"checkpoint leaf {path or '/'} has dtype {got.name}, the optimizer expects "
                     f"{want.name} (only lossless widening, e.g. bfloat16 -> float32, is done)")
  return place_like(jnp.asarray(value, want), template)


def optimizer_state_dict(opt_def, target, state):
  return {"target": to_state_dict(target),
          "state": {"step": to_state_dict(state.step),
                    "param_states": to_state_dict(opt_def.flax_param_states(
                        target, state.param_states)),
                    **{k: to_state_dict(getattr(state, k)) for k in base.outer_fields(state)}}}


def optimizer_restore_state(opt_def, target, state, state_dict):
  """(target, state) from ``state_dict``; every check runs before anything is built."""
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"an optimizer checkpoint is a dict, got {type(state_dict).__name__}")
  _keys_match("", ["target", "state"], state_dict)
  sd_state = state_dict["state"]
  if not isinstance(sd_state, Mapping):
    raise ValueError("checkpoint entry /state is not a dict")
  outer = base.outer_fields(state)
  _keys_match("/state", ["step", "param_states"] + outer, sd_state)
  new_target = from_state_dict(target, state_dict["target"], "/target")
  step = from_state_dict(state.step, sd_state["step"], "/state/step")
  values = {k: from_state_dict(getattr(state, k), sd_state[k], f"/state/{k}") for k in outer}
  template = opt_def.flax_param_states(target, state.param_states)
  restored = from_state_dict(template, sd_state["param_states"], "/state/param_states")
  param_states = opt_def.from_flax_param_states(target, state.param_states, restored)
  return new_target, state.replace(step=step, param_states=param_states, **values)


# ----------------------------------------------------------------------------- msgpack (flax's format)

# msgpack limits one object to 2**31 - 1 bytes; flax splits larger arrays into flat chunks.
MAX_CHUNK_SIZE = 2**30
_CHUNKED = "__msgpack_chunked_array__"


class _Ext(enum.IntEnum):
  """flax.serialization's msgpack extension type codes."""
  ndarray = 1
  native_complex = 2
  npscalar = 3


def _ndarray_to_bytes(arr) -> bytes:
  import msgpack  # pylint: disable=import-outside-toplevel
  arr = np.asarray(arr)
  if arr.dtype.hasobject or arr.dtype.isalignedstruct:
    raise ValueError("object and structured dtypes cannot be serialized")
  return msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True)


def _ndarray_from_bytes(data: bytes) -> np.ndarray:
  """An array extension's payload ``(shape, dtype name, C-order bytes)``; CheckpointError
  saying what is wrong with a malformed one (the caller adds where)."""
  import msgpack  # pylint: disable=import-outside-toplevel
  try:
    shape, name, buf = msgpack.unpackb(data, raw=True)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"an array entry is not (shape, dtype name, bytes): {e}") from e
  if (not isinstance(shape, (list, tuple)) or not isinstance(name, bytes)
      or not isinstance(buf, bytes)
      or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
    raise CheckpointError(f"an array entry is not (shape, dtype name, bytes): got "
                          f"({type(shape).__name__}, {type(name).__name__}, "
                          f"{type(buf).__name__}) with shape {shape!r}")
  try:
    dtype = np.dtype(jnp.bfloat16) if name == b"bfloat16" else np.dtype(name.decode("ascii"))
  except Exception as e:  # pylint: disable=broad-except  (TypeError, UnicodeDecodeError)
    raise CheckpointError(f"an array entry has the unknown dtype name {name!r}") from e
  if dtype.hasobject or dtype.fields is not None:
    raise CheckpointError(f"an array entry has the dtype {dtype}: object and structured dtypes "
                          "are never written")
  want = math.prod(shape) * dtype.itemsize
  if len(buf) != want:
    raise CheckpointError(f"an array entry of shape {tuple(shape)} and dtype {dtype.name} needs "
                          f"{want} bytes, it holds {len(buf)}")
  return np.frombuffer(buf, dtype=dtype).reshape(shape, order="C")


def _ext_pack(x):
  import msgpack  # pylint: disable=import-outside-toplevel
  if isinstance(x, (np.ndarray, jax.Array)):
    return msgpack.ExtType(_Ext.ndarray, _ndarray_to_bytes(x))
  if isinstance(x, np.generic):
    return msgpack.ExtType(_Ext.npscalar, _ndarray_to_bytes(np.asarray(x)))
  if isinstance(x, complex):
    return msgpack.ExtType(_Ext.native_complex, msgpack.packb((x.real, x.imag)))
  raise TypeError(f"cannot serialize a {type(x).__name__} to msgpack")


def _ext_unpack(code, data):
  import msgpack  # pylint: disable=import-outside-toplevel
  if code == _Ext.ndarray:
    return _ndarray_from_bytes(data)
  if code == _Ext.npscalar:
    return _ndarray_from_bytes(data)[()]
  if code == _Ext.native_complex:
    re, im = msgpack.unpackb(data)
    return complex(re, im)
  return msgpack.ExtType(code, data)


def _to_host(tree):
  """Containers copied (dicts), arrays on the host, oversized ones chunked as flax does."""
  if isinstance(tree, dict):
    return {k: _to_host(v) for k, v in tree.items()}
  if isinstance(tree, jax.Array):
    tree = np.asarray(tree)
  if isinstance(tree, np.ndarray) and tree.nbytes > MAX_CHUNK_SIZE:
    step = max(1, MAX_CHUNK_SIZE // tree.dtype.itemsize)
    flat = tree.reshape(-1)
    return {_CHUNKED: True, "shape": {str(i): d for i, d in enumerate(tree.shape)},
            "chunks": {str(i): flat[j:j + step]
                       for i, j in enumerate(range(0, flat.size, step))}}
  return tree


def _unchunk(tree):
  if isinstance(tree, dict):
    if _CHUNKED in tree:
      shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
      chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
      return np.concatenate(chunks).reshape(shape)
    return {k: _unchunk(v) for k, v in tree.items()}
  return tree


def msgpack_serialize(state_dict) -> bytes:
  """A state dict (nested dicts of arrays and Python scalars) as flax's msgpack bytes."""
  import msgpack  # pylint: disable=import-outside-toplevel
  return msgpack.packb(_to_host(state_dict), default=_ext_pack, strict_types=True)


def msgpack_restore(encoded: bytes):
  """The state dict encoded by ``msgpack_serialize`` (or flax's), arrays as NumPy arrays.

  Bytes that do not decode (truncated, trailing data, a corrupted array entry, not msgpack)
  raise ``CheckpointError`` (a ValueError) saying what was expected; a decoded state dict of
  the wrong structure is reported later, by ``from_state_dict``, naming the path."""
  import msgpack  # pylint: disable=import-outside-toplevel
  if not isinstance(encoded, (bytes, bytearray, memoryview)):
    raise TypeError(f"a checkpoint is bytes, got {type(encoded).__name__}")
  try:
    return _unchunk(msgpack.unpackb(encoded, ext_hook=_ext_unpack, raw=False))
  except CheckpointError as e:
    raise CheckpointError(f"not a valid fusedopt/flax checkpoint ({len(encoded)} bytes): {e}; "
                          f"{_EXPECTED}") from e
  except Exception as e:  # pylint: disable=broad-except  (msgpack's errors, UnicodeDecodeError...)
    raise CheckpointError(f"not a valid fusedopt/flax checkpoint ({len(encoded)} bytes; "
                          f"truncated or corrupted?): {type(e).__name__}: {e}; "
                          f"{_EXPECTED}") from e


def to_bytes(target) -> bytes:
  """``target`` (an ``Optimizer``, or any tree) as msgpack bytes of its state dict.

  Example::

    blob = fusedopt.serialization.to_bytes(optimizer)
    optimizer = fusedopt.serialization.from_bytes(optimizer, blob)
  """
  return msgpack_serialize(to_state_dict(target))


def from_bytes(target, encoded: bytes):
  """A copy of ``target`` restored from ``to_bytes`` output (or flax's): structure, shapes and
  dtypes are checked first, so a mismatch raises ValueError and nothing is half-restored.
  Bytes that are not a valid checkpoint raise ``CheckpointError`` (a ValueError)."""
  return from_state_dict(target, msgpack_restore(encoded))


# ----------------------------------------------------------------------------- flax interop

def register_with_flax() -> bool:
  """Registers ``Optimizer`` with ``flax.serialization`` (as flax 0.5.3 registered its own), so
  ``flax.serialization.to_bytes(optimizer)`` and friends work. Returns False without flax."""
  try:
    from flax import serialization as flax_ser  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  from .base import Optimizer  # pylint: disable=import-outside-toplevel
  flax_ser.register_serialization_state(
      Optimizer, lambda opt: opt.state_dict(), lambda opt, sd: opt.restore_state(sd),
      override=True)
  # flat state inside other containers (an optax state of fusedopt.tx): per leaf, layout-free
  flax_ser.register_serialization_state(
      FlatState, lambda st: to_state_dict(st), lambda st, sd: from_state_dict(st, sd),
      override=True)
  # quantized state leaves (an optax state of fusedopt.tx with state_dtype="int8"): codes,
  # scales and format, as fusedopt's own checkpoints store them
  flax_ser.register_serialization_state(
      quantization.QuantizedArray, _quantized_to_dict, _quantized_into, override=True)
  # the per-parameter state classes, as flax 0.5.3 registered its struct dataclasses: a dict of
  # the data fields (Adafactor's per-leaf states in an optax state of fusedopt.tx)
  for cls in PARAM_STATE_CLASSES:
    flax_ser.register_serialization_state(
        cls, functools.partial(_param_state_to_dict, flax_ser),
        functools.partial(_param_state_from_dict, flax_ser), override=True)
  return True


def _data_fields(x):
  return [f.name for f in dataclasses.fields(x) if f.metadata.get("pytree_node", True)]


def _param_state_to_dict(flax_ser, x):
  return {k: flax_ser.to_state_dict(getattr(x, k)) for k in _data_fields(x)}


def _param_state_from_dict(flax_ser, x, sd):
  names = _data_fields(x)
  _keys_match("", names, sd)
  return x.replace(**{k: flax_ser.from_state_dict(getattr(x, k), sd[k], name=k) for k in names})


def state_dict_like(target) -> Any:
  """The state dict ``target`` would write, as ``jax.ShapeDtypeStruct``s (for restoring with
  orbax or any array store into this optimizer's shapes, dtypes and shardings)."""
  def spec(x):
    if isinstance(x, (jax.Array, np.ndarray)) or np.isscalar(x):
      sharding = x.sharding if isinstance(x, jax.Array) else None
      return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=sharding)
    return x
  return jax.tree_util.tree_map(spec, to_state_dict(target))


# ----------------------------------------------------------------------------- orbax

def save_orbax(directory, target, *, force=False):
  """Saves ``target``'s state dict (layout-free, flax's format) with orbax-checkpoint.

  Each array is written by the process(es) holding it, so a sharded state is saved shard by
  shard without a gather to one host. Blocks until the checkpoint is committed."""
  import os  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(directory), to_state_dict(target), force=force)
  ckptr.wait_until_finished()


def restore_orbax(directory, target):
  """A copy of ``target`` restored from ``save_orbax``'s checkpoint.

  Keys and shapes are compared with the checkpoint's metadata before any array is read (a
  mismatch raises ValueError naming the first path); arrays are read straight into ``target``'s
  shardings, then dtypes are checked as in ``from_state_dict``."""
  import os  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  saved = ckptr.metadata(path).item_metadata.tree
  want = state_dict_like(target)
  spec = _orbax_spec(want, saved, "")
  return from_state_dict(target, ckptr.restore(path, spec))


def _orbax_spec(want, saved, path):
  """The restore spec: ``want``'s structure, the checkpoint's dtypes (checked later), ``want``'s
  shardings; ValueError at the first key or shape mismatch."""
  if isinstance(want, Mapping):
    if not isinstance(saved, Mapping):
      raise ValueError(f"checkpoint has a leaf at {path or '/'} where the optimizer has a dict")
    _keys_match(path, list(want), saved)
    return {k: _orbax_spec(v, saved[k], f"{path}/{k}") for k, v in want.items()}
  if want is None:
    return None
  if isinstance(saved, Mapping) or not hasattr(saved, "shape"):
    raise ValueError(f"checkpoint has no array at {path}")
  if tuple(saved.shape) != tuple(want.shape):
    raise ValueError(f"checkpoint leaf {path} has shape {tuple(saved.shape)}, the optimizer "
                     f"expects {tuple(want.shape)}")
  return jax.ShapeDtypeStruct(want.shape, saved.dtype, sharding=want.sharding)


base.PROVIDED["state_dict"] = optimizer_state_dict
base.PROVIDED["restore_state"] = optimizer_restore_state
