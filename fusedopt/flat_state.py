"""``FlatState``: an optimizer's state as flat buffers, one per state field and dtype group."""
from typing import Any, Dict, Tuple

import jax
import numpy as np
import jax.numpy as jnp

from . import struct
from .layout import FlatLayout

F32 = jnp.float32


@struct.dataclass
class FlatState:
  """Optimizer state in flat buffers: ``fields[name][g]`` is field ``name`` for dtype group ``g``
  of ``layout`` (same offsets as the parameters)."""
  fields: Dict[str, Tuple[Any, ...]]
  layout: FlatLayout = struct.field(pytree_node=False)

  def leaf(self, name, i):
    """Field ``name`` of leaf ``i`` as an array of the leaf's shape."""
    return self.layout.view(self.fields[name], i)

  def from_per_leaf(self, leaves):
    """This state with its buffers rebuilt from ``leaves`` (one ``{field: array}`` per segment,
    leaf order), each field keeping its dtype: the inverse of ``per_leaf``."""
    fields = {k: tuple(self.layout.pack_group([leaf[k] for leaf in leaves], g, bufs[g].dtype)
                       for g in range(len(self.layout.groups)))
              for k, bufs in self.fields.items()}
    return self.replace(fields=fields)

  def restored_from(self, per_leaf_tree):
    """``from_per_leaf`` of a tree shaped like ``per_leaf()``'s, each buffer placed where this
    state's was (a sharded state stays sharded)."""
    new = self.from_per_leaf(self.layout.treedef.flatten_up_to(per_leaf_tree))
    return new.replace(fields={k: tuple(place_like(b, old) for b, old in zip(bufs, self.fields[k]))
                               for k, bufs in new.fields.items()})

  def with_master_from(self, target):
    """This state with its ``master`` field (master weights) packed from ``target`` in float32,
    each buffer placed where the old one was."""
    leaves = self.layout.check(target, "target", allow_other_float=False)
    master = tuple(place_like(self.layout.pack_group(leaves, g, F32), old)
                   for g, old in enumerate(self.fields["master"]))
    return self.replace(fields=dict(self.fields, master=master))

  def per_leaf(self):
    """The state as flax laid it out: a tree mirroring the params, each leaf a dict of fields."""
    leaves = [{k: self.leaf(k, i) for k in self.fields} for i in range(len(self.layout.segments))]
    return jax.tree_util.tree_unflatten(self.layout.treedef, leaves)


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
