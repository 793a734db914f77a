"""Frozen dataclasses that are JAX pytrees (the subset of ``flax.struct`` that flax.optim used).

Fields are pytree children unless declared with ``field(pytree_node=False)``, in which case they
are static (part of the treedef, must be hashable).
"""
import dataclasses
from typing import Any, TypeVar

import jax

_T = TypeVar("_T")


def field(pytree_node: bool = True, **kwargs) -> Any:
  return dataclasses.field(metadata={"pytree_node": pytree_node}, **kwargs)


def dataclass(clz: _T) -> _T:
  """Makes ``clz`` a frozen dataclass registered as a pytree, with a ``replace`` method."""
  if "_fusedopt_dataclass" in clz.__dict__:
    return clz
  data_clz = dataclasses.dataclass(frozen=True)(clz)
  fields = dataclasses.fields(data_clz)
  data_fields = tuple(f.name for f in fields if f.metadata.get("pytree_node", True))
  meta_fields = tuple(f.name for f in fields if not f.metadata.get("pytree_node", True))

  def replace(self, **updates):
    return dataclasses.replace(self, **updates)

  if "replace" not in vars(data_clz):   # a class may define its own (Optimizer does)
    data_clz.replace = replace
  jax.tree_util.register_dataclass(data_clz, data_fields=list(data_fields),
                                   meta_fields=list(meta_fields))
  data_clz._fusedopt_dataclass = True
  return data_clz


class PyTreeNode:
  """Base class: subclasses become ``struct.dataclass``es automatically."""

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    dataclass(cls)

  def replace(self, **overrides):  # overridden by ``dataclass``; here for type checkers
    raise NotImplementedError
