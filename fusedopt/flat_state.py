"""``FlatState``: an optimizer's state as flat buffers, one per state field and dtype group;
and the per-parameter state classes (``ParamState``) that it reads as, like flax 0.5.3's."""
import dataclasses
import functools
import sys
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import jax.numpy as jnp

from . import quantization, struct
from .layout import FlatLayout

F32 = jnp.float32


# ----------------------------------------------------------------------------- per-parameter state

# every ``param_state`` class, for ``serialization.register_with_flax``
PARAM_STATE_CLASSES = []
# a state class -> its subclass with the ``master`` field (``with_master``)
_WITH_MASTER = {}


class ParamState:
  """Base of the per-parameter state classes (``_AdamParamState``, ...): flax 0.5.3's
  ``struct.dataclass``es with the same names, fields and field order. With
  ``master_weights=True`` a state is an instance of the subclass ``<name>WithMaster``
  (``_AdamParamStateWithMaster(grad_ema, grad_sq_ema, master)``: flax's fields, then the float32
  copy of the param), still an instance of flax's class.

  Besides attribute access (``state.grad_ema``, as in flax), a state also reads by field name
  (``state['grad_ema']``, ``'master' in state``, iteration and ``keys()``/``items()``/``values()``
  over the fields that are not None): the dict form fusedopt used before; read-only."""

  @classmethod
  def from_fields(cls, values):
    """An instance from ``{field: value}`` (fields not given are None)."""
    names = _field_names(cls)
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {list(names)}")
    return cls(**{k: values.get(k) for k in names})

  def as_fields(self):
    """``{field: value}`` of the fields that are not None, in field order."""
    return {k: getattr(self, k) for k in _field_names(type(self)) if getattr(self, k) is not None}

  def __getitem__(self, name):
    if not isinstance(name, str) or name not in _field_names(type(self)):
      raise KeyError(name)
    return getattr(self, name)

  def __contains__(self, name):
    return isinstance(name, str) and name in _field_names(type(self)) and \
        getattr(self, name) is not None

  def __iter__(self):
    return iter(self.as_fields())

  def keys(self):
    return self.as_fields().keys()

  def items(self):
    return self.as_fields().items()

  def values(self):
    return self.as_fields().values()


@functools.lru_cache(maxsize=None)
def _field_names(cls):
  return tuple(f.name for f in dataclasses.fields(cls))


def param_state(cls=None, *, master=True):
  """Class decorator: ``cls`` (a ``ParamState`` subclass) as a ``struct.dataclass``, registered
  for ``flax.serialization`` when flax is installed (flax 0.5.3's struct dataclasses were).
  With ``master`` (the default) also defines ``<name>WithMaster`` in ``cls``'s module: ``cls``
  with one more field, ``master`` (``with_master``)."""
  if cls is None:
    return functools.partial(param_state, master=master)
  cls = struct.dataclass(cls)
  PARAM_STATE_CLASSES.append(cls)
  if master and "master" not in _field_names(cls):
    name = cls.__name__ + "WithMaster"
    sub = type(name, (cls,), {
        "__annotations__": {"master": Any}, "__module__": cls.__module__, "__qualname__": name,
        "__doc__": f"``{cls.__name__}`` with ``master``, the float32 copy of the param "
                   "(``master_weights=True``)."})
    sub = struct.dataclass(sub)
    setattr(sys.modules[cls.__module__], name, sub)   # found by name: pickles of a FlatState
    PARAM_STATE_CLASSES.append(sub)
    _WITH_MASTER[cls] = sub
  return cls


def with_master(cls):
  """``cls``'s subclass with the ``master`` field (``cls`` itself if it has one; None: None)."""
  if cls is None or "master" in _field_names(cls):
    return cls
  return _WITH_MASTER[cls]


def make_param_state(cls, values):
  """One parameter's state from ``{field: value}``: an instance of ``cls`` (a ``ParamState``
  class), or the dict itself when ``cls`` is None (a ``FlatState`` built without its class)."""
  if cls is None:
    return dict(values)
  return cls.from_fields(values)


def fields_of(state):
  """``{field: value}`` of one parameter's state: a ``ParamState`` (its fields that are not
  None), a dict (as is), ``()`` or None (no fields)."""
  if state is None or (isinstance(state, tuple) and not state):
    return {}
  if isinstance(state, ParamState):
    return state.as_fields()
  return dict(state)


def is_param_state(x):
  """Whether ``x`` is one parameter's state (for ``is_leaf`` in tree maps over per-leaf state)."""
  return isinstance(x, ParamState)


@functools.lru_cache(maxsize=256)
def _index_tree(layout):
  """The params' tree with each leaf replaced by its leaf index (for views into a state)."""
  return jax.tree_util.tree_unflatten(layout.treedef, list(range(len(layout.segments))))


@struct.dataclass
class FlatState:
  """Optimizer state in flat buffers: ``fields[name][g]`` is field ``name`` for dtype group ``g``
  of ``layout`` (same offsets as the parameters)."""
  fields: Dict[str, Tuple[Any, ...]]
  layout: FlatLayout = struct.field(pytree_node=False)
  # the optimizer's per-parameter state class (``_AdamParamState``, ...), what ``per_leaf`` and
  # the views give per leaf; None (a state built without it, an old pickle): dicts
  param_state: Optional[type] = struct.field(pytree_node=False, default=None)

  def leaf(self, name, i):
    """Field ``name`` of leaf ``i`` as an array of the leaf's shape (quantized state:
    dequantized, float32)."""
    x = self.stored_leaf(name, i)
    return quantization.leaf_values(x) if quantization.is_quantized(x) else x

  def stored_leaf(self, name, i):
    """Field ``name`` of leaf ``i`` as stored: an array of the leaf's shape, or for quantized
    state the leaf's codes (its shape) and its blocks' scales (a ``QuantizedArray``)."""
    seg = self.layout.segments[i]
    buf = self.fields[name][seg.group]
    if quantization.is_quantized(buf):
      return quantization.leaf_of(buf, seg.offset, seg.size, seg.shape)
    return self.layout.view(self.fields[name], i)

  def from_per_leaf(self, leaves):
    """This state with its buffers rebuilt from ``leaves`` (one ``{field: value}`` per segment,
    leaf order), each field keeping its storage: the inverse of ``per_leaf`` and of
    ``per_leaf_dicts``. A value is an array or a per-leaf ``QuantizedArray``; one stored
    otherwise than its buffer is converted (float values quantized, quantized ones decoded)."""
    fields = {k: tuple(self._pack_field([leaf[k] for leaf in leaves], g, bufs[g])
                       for g in range(len(self.layout.groups)))
              for k, bufs in self.fields.items()}
    return self.replace(fields=fields)

  def _pack_field(self, values, g, like):
    layout, members = self.layout, self.layout.groups[g].segments
    if not quantization.is_quantized(like):
      return layout.pack_group(_decoded(values), g, like.dtype)
    same = [values[i] for i in members]
    if same and all(quantization.is_quantized(v) and v.fmt == like.fmt and v.block == like.block
                    for v in same):   # codes and scales as they are: lossless
      codes = layout.pack_group([jnp.ravel(v.codes) if quantization.is_quantized(v) else None
                                 for v in values], g, jnp.uint8)
      pad = quantization.zero_code(like.fmt)
      if pad:   # padding holds the code of 0
        mask = layout.pack_group([None if i not in members else jnp.ones(layout.segments[i].shape,
                                                                         jnp.uint8)
                                  for i in range(len(values))], g, jnp.uint8)
        codes = jnp.where(mask != 0, codes, jnp.uint8(pad))
      return quantization.QuantizedArray(codes, self._place_scales(g, same, like), like.fmt,
                                         like.block)
    return quantization.quantize_like(layout.pack_group(_decoded(values), g, jnp.float32), like)

  def _place_scales(self, g, leaf_values, like):
    """Each member's block scales at its segment's first block, zeros between and after."""
    parts, at = [], 0
    for i, v in zip(self.layout.groups[g].segments, leaf_values):
      start = self.layout.segments[i].offset // like.block
      if start > at:
        parts.append(jnp.zeros((start - at,), jnp.float32))
      parts.append(jnp.asarray(v.scales, jnp.float32))
      at = start + v.scales.shape[0]
    if like.scales.shape[0] > at:
      parts.append(jnp.zeros((like.scales.shape[0] - at,), jnp.float32))
    return jnp.concatenate(parts)

  def restored_from(self, per_leaf_tree):
    """``from_per_leaf`` of a tree shaped like ``per_leaf()``'s, each buffer placed where this
    state's was (a sharded state stays sharded)."""
    new = self.from_per_leaf(self.layout.treedef.flatten_up_to(per_leaf_tree))
    return new.replace(fields={k: tuple(jax.tree_util.tree_map(place_like, b, old)
                                        for b, old in zip(bufs, self.fields[k]))
                               for k, bufs in new.fields.items()})

  def with_master_from(self, target):
    """This state with its ``master`` field (master weights) packed from ``target`` in float32,
    each buffer placed where the old one was."""
    leaves = self.layout.check(target, "target", allow_other_float=False)
    master = tuple(place_like(self.layout.pack_group(leaves, g, F32), old)
                   for g, old in enumerate(self.fields["master"]))
    return self.replace(fields=dict(self.fields, master=master))

  def leaf_state(self, i):
    """Leaf ``i``'s state: a ``param_state`` instance (flax's per-parameter state), or a dict of
    fields when the class is not known."""
    return make_param_state(self.param_state, {k: self.leaf(k, i) for k in self.fields})

  def per_leaf(self):
    """The state as flax laid it out: a tree mirroring the params, each leaf that parameter's
    state (``_AdamParamState(grad_ema, grad_sq_ema)``, ...; a dict of fields when this state
    was built without its class)."""
    leaves = [self.leaf_state(i) for i in range(len(self.layout.segments))]
    return jax.tree_util.tree_unflatten(self.layout.treedef, leaves)

  def per_leaf_dicts(self):
    """``per_leaf`` with each leaf a dict ``{field: array}`` (in ``fields``' order): the
    checkpoint form (``serialization``, ``flax_param_states``)."""
    leaves = [{k: self.stored_leaf(k, i) for k in self.fields}
              for i in range(len(self.layout.segments))]
    return jax.tree_util.tree_unflatten(self.layout.treedef, leaves)

  # -- reading like the per-leaf tree: ``param_states['Dense_0']['kernel'].grad_ema``
  def _view(self, sub):
    """The per-leaf states of the subtree ``sub`` of the index tree (only those leaves)."""
    return jax.tree_util.tree_map(self.leaf_state, sub)

  def __getitem__(self, key):
    """``per_leaf()[key]``, computing only the leaves under ``key``."""
    root = _index_tree(self.layout)
    if isinstance(root, int):
      return self.leaf_state(0)[key]
    return self._view(root[key])

  def keys(self):
    return _index_tree(self.layout).keys()

  def values(self):
    return self.per_leaf().values()

  def items(self):
    return self.per_leaf().items()

  def __getattr__(self, name):
    # only called when normal lookup fails: a single-array target reads as its state
    # (``param_states.grad_ema``); dunders and the dataclass fields never come here by design
    if name.startswith("_") or name in ("fields", "layout", "param_state"):
      raise AttributeError(name)
    layout = self.__dict__.get("layout")
    if layout is not None and isinstance(_index_tree(layout), int):
      return getattr(self.leaf_state(0), name)
    raise AttributeError(f"{type(self).__name__} has no attribute {name!r}: read a parameter's "
                         f"state through the tree, e.g. param_states['Dense_0']['kernel'].{name}")

  def __eq__(self, other):
    """As flax's equality of the per-leaf form: ``self.per_leaf() == other`` (``other``'s own
    ``per_leaf()`` for a FlatState). Equal buffers (the same arrays) are equal at once."""
    if other is self:
      return True
    if isinstance(other, FlatState):
      if (other.layout == self.layout and other.param_state is self.param_state
          and other.fields.keys() == self.fields.keys()
          and all(a is b for k in self.fields
                  for a, b in zip(self.fields[k], other.fields[k]))):
        return True
      other = other.per_leaf()
    return self.per_leaf() == other


def _decoded(values):
  """Per-leaf state values with each ``QuantizedArray`` decoded to float32."""
  return [quantization.leaf_values(v) if quantization.is_quantized(v) else v for v in values]


def place_like(new, old):
  """``new`` on ``old``'s devices with its sharding (for concrete arrays; tracers as they are)."""
  if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer):
    return put(new, old.sharding)
  return new


def put(x, sharding):
  """``x`` with ``sharding`` (also across processes: every process passes the same value)."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.sharding == sharding:
    return x
  if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
