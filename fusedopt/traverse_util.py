"""Traversals of immutable data structures (the ``flax.traverse_util`` API of flax 0.5.3).

A Traversal selects a subset of the contents of an object, and can iterate over it or return
an updated copy::

  data = [{'foo': 1, 'bar': 2}, {'foo': 3, 'bar': 4}]
  traversal = t_identity.each()['foo']
  list(traversal.iterate(data))                # [1, 3]
  traversal.update(lambda x: x * 10, data)     # [{'foo': 10, 'bar': 2}, {'foo': 30, 'bar': 4}]

Traversals never mutate their input. ``flatten_dict``/``unflatten_dict`` convert between nested
and flat (tuple- or ``sep``-keyed) dicts.

Differences from flax 0.5.3, all of them cases where 0.5.3 raised, misbehaved or was
inconsistent:

* any ``collections.abc.Mapping`` (e.g. ``FrozenDict``) is a nested node, and an updated
  mapping is rebuilt with its own type (0.5.3 only knew ``dict``/``FrozenDict``, and
  ``TraverseItem``/``TraverseEach`` failed on immutable mappings);
* ``TraverseItem`` with a negative index on a tuple selects that item (0.5.3 selected
  nothing), and with a slice on a list calls ``fn`` per element, as ``iterate`` yields them
  (0.5.3 called ``fn`` once on the sub-list);
* ``TraverseEach`` also updates namedtuples and mappings;
* ``Traversal.set`` does not consume the caller's list of values;
* ``unflatten_dict`` turns the ``{(): empty_node}`` of ``flatten_dict({}, True)`` back into
  ``{}`` (0.5.3 raised IndexError; with ``sep`` the key ``''`` stays ambiguous and still reads
  as ``{'': {}}``, as in 0.5.3);
* no ``DeprecationWarning`` on construction (fusedopt supports this API), and dunder
  attribute look-ups on a Traversal raise ``AttributeError`` instead of composing a
  ``TraverseAttr`` (so ``copy``, ``pickle`` and ``hasattr`` probes behave).
"""
import abc
import collections.abc
import copy
import dataclasses
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import jax

from . import struct

__all__ = [
    "empty_node", "flatten_dict", "unflatten_dict",
    "Traversal", "TraverseId", "TraverseMerge", "TraverseCompose", "TraverseFilter",
    "TraverseAttr", "TraverseItem", "TraverseEach", "TraverseTree", "t_identity",
    "ModelParamTraversal",
]

Path = Tuple[Any, ...]


@struct.dataclass
class _EmptyNode:
  """Stand-in leaf for an empty nested dict (a pytree with no leaves, so JAX accepts it)."""


empty_node = _EmptyNode()


def _is_empty_node(x: Any) -> bool:
  # isinstance rather than identity, so a pickled/copied empty_node still counts.
  return isinstance(x, _EmptyNode)


def _rebuild_mapping(like: Mapping, items: Dict[Any, Any]) -> Mapping:
  """Returns a mapping of ``like``'s type holding ``items``."""
  if type(like) is dict:
    return items
  if isinstance(like, collections.abc.MutableMapping):
    # copy + refill keeps extra state such as a defaultdict's factory.
    new = copy.copy(like)
    new.clear()
    new.update(items)
    return new
  try:
    return type(like)(items)
  except TypeError as e:
    raise TypeError(
        f"Cannot rebuild a {type(like).__name__}: an immutable Mapping must be constructible "
        "from a dict of its items.") from e


def flatten_dict(xs: Mapping, keep_empty_nodes: bool = False,
                 is_leaf: Optional[Callable[[Path, Any], bool]] = None,
                 sep: Optional[str] = None) -> Dict[Any, Any]:
  """Flattens a nested dictionary; nested keys become tuples (or ``sep``-joined strings).

  Example::

    flatten_dict({'foo': 1, 'bar': {'a': 2, 'b': {}}})
    # {('foo',): 1, ('bar', 'a'): 2}

  Args:
    xs: a nested dict (or any nested ``Mapping``, e.g. ``FrozenDict``).
    keep_empty_nodes: replace empty dicts with ``empty_node`` instead of dropping them, so
      that ``unflatten_dict`` can restore them.
    is_leaf: optional ``is_leaf(path, value)``; when it returns True, ``value`` (a nested
      mapping at tuple ``path``) is kept whole instead of being flattened further.
    sep: if given, keys are ``sep.join(path)`` strings instead of tuples.
  Returns:
    The flat dict, in depth-first insertion order.
  """
  if not isinstance(xs, collections.abc.Mapping):
    raise TypeError(f"flatten_dict expects a (frozen) dict, got {type(xs).__name__}.")

  def make_key(path):
    return path if sep is None else sep.join(path)

  def flatten(x, prefix, out):
    if not isinstance(x, collections.abc.Mapping) or (is_leaf and is_leaf(prefix, x)):
      out[make_key(prefix)] = x
    elif len(x) == 0:
      if keep_empty_nodes:
        out[make_key(prefix)] = empty_node
    else:
      for key, value in x.items():
        flatten(value, prefix + (key,), out)
    return out

  return flatten(xs, (), {})


def unflatten_dict(xs: Mapping, sep: Optional[str] = None) -> Dict[Any, Any]:
  """Inverse of ``flatten_dict``: rebuilds nested plain dicts from a flat dict.

  Example::

    unflatten_dict({('foo',): 1, ('bar', 'a'): 2})
    # {'foo': 1, 'bar': {'a': 2}}

  Args:
    xs: a flat dict keyed by tuples (or by ``sep``-joined strings if ``sep`` is given).
      ``empty_node`` values become empty dicts.
    sep: the separator used with ``flatten_dict``.
  Returns:
    The nested dict.
  """
  if not isinstance(xs, collections.abc.Mapping):
    raise TypeError(f"unflatten_dict expects a dict, got {type(xs).__name__}.")
  result = {}
  for path, value in xs.items():
    if sep is not None:
      path = tuple(path.split(sep))
    if not path:
      # Only flatten_dict({}, keep_empty_nodes=True) makes this key: the result is just {}.
      if not _is_empty_node(value):
        raise ValueError(f"Only empty_node can have the empty path (), got {value!r}.")
      continue
    if _is_empty_node(value):
      value = {}
    cursor = result
    for key in path[:-1]:
      cursor = cursor.setdefault(key, {})
    cursor[path[-1]] = value
  return result


class Traversal(abc.ABC):
  """Base class of all traversals: selects parts of an object to iterate or update."""

  @abc.abstractmethod
  def update(self, fn: Callable[[Any], Any], inputs: Any) -> Any:
    """Returns a copy of ``inputs`` with each selected item ``x`` replaced by ``fn(x)``."""

  @abc.abstractmethod
  def iterate(self, inputs: Any) -> Iterator[Any]:
    """Returns an iterator over the items of ``inputs`` selected by this traversal."""

  def set(self, values: Iterable[Any], inputs: Any) -> Any:
    """Returns a copy of ``inputs`` whose selected items are ``values``, in iteration order.

    Raises:
      ValueError: if there are fewer or more values than selected items.
    """
    remaining = iter(list(values))
    sentinel = object()

    def next_value(_):
      value = next(remaining, sentinel)
      if value is sentinel:
        raise ValueError("Not enough values provided")
      return value

    result = self.update(next_value, inputs)
    if next(remaining, sentinel) is not sentinel:
      raise ValueError("Too many values provided")
    return result

  def compose(self, other: "Traversal") -> "Traversal":
    """Returns the traversal applying ``other`` to each item this one selects."""
    return TraverseCompose(self, other)

  def merge(self, *traversals: "Traversal") -> "Traversal":
    """Composes with several traversals and merges their selections."""
    return self.compose(TraverseMerge(*traversals))

  def each(self) -> "Traversal":
    """Selects each entry of the selected containers."""
    return self.compose(TraverseEach())

  def tree(self) -> "Traversal":
    """Selects each leaf of the selected pytrees."""
    return self.compose(TraverseTree())

  def filter(self, fn: Callable[[Any], bool]) -> "Traversal":
    """Keeps only the selected items for which ``fn`` is true."""
    return self.compose(TraverseFilter(fn))

  def __getattr__(self, attr: str) -> "Traversal":
    # Only reached for missing attributes. Dunders are protocol probes (copy, pickle,
    # numpy/jax checks), not attribute traversals: answering them would break those tools.
    if attr.startswith("__") and attr.endswith("__"):
      raise AttributeError(attr)
    return self.compose(TraverseAttr(attr))

  def __getitem__(self, key: Any) -> "Traversal":
    return self.compose(TraverseItem(key))


class TraverseId(Traversal):
  """The identity traversal: selects its input."""

  def update(self, fn, inputs):
    return fn(inputs)

  def iterate(self, inputs):
    yield inputs


t_identity = TraverseId()


class TraverseMerge(Traversal):
  """Merges the selections of several traversals (updates apply in order)."""

  def __init__(self, *traversals: Traversal):
    self._traversals = traversals

  def update(self, fn, inputs):
    for traversal in self._traversals:
      inputs = traversal.update(fn, inputs)
    return inputs

  def iterate(self, inputs):
    for traversal in self._traversals:
      yield from traversal.iterate(inputs)


class TraverseCompose(Traversal):
  """Applies traversal ``y`` to each item selected by traversal ``x``."""

  def __init__(self, x: Traversal, y: Traversal):
    self._x = x
    self._y = y

  def update(self, fn, inputs):
    return self._x.update(lambda item: self._y.update(fn, item), inputs)

  def iterate(self, inputs):
    for item in self._x.iterate(inputs):
      yield from self._y.iterate(item)


class TraverseFilter(Traversal):
  """Selects its input only if ``fn(input)`` is true."""

  def __init__(self, fn: Callable[[Any], bool]):
    self._fn = fn

  def update(self, fn, inputs):
    return fn(inputs) if self._fn(inputs) else inputs

  def iterate(self, inputs):
    if self._fn(inputs):
      yield inputs


def _is_namedtuple(ty: type) -> bool:
  return issubclass(ty, tuple) and hasattr(ty, "_fields")


def _rebuild_tuple(like: tuple, items: Iterable[Any]) -> tuple:
  ty = type(like)
  return ty(*items) if _is_namedtuple(ty) else ty(items)


class TraverseAttr(Traversal):
  """Selects attribute ``attr`` of its input (namedtuple, dataclass or plain object)."""

  def __init__(self, attr: str):
    self._attr = attr

  def update(self, fn, inputs):
    value = fn(getattr(inputs, self._attr))
    if _is_namedtuple(type(inputs)):
      return inputs._replace(**{self._attr: value})
    if dataclasses.is_dataclass(inputs):
      return dataclasses.replace(inputs, **{self._attr: value})
    inputs = copy.copy(inputs)
    setattr(inputs, self._attr, value)
    return inputs

  def iterate(self, inputs):
    yield getattr(inputs, self._attr)


class TraverseItem(Traversal):
  """Selects ``inputs[key]``; a slice key selects each item of the slice."""

  def __init__(self, key: Any):
    self._key = key

  def update(self, fn, inputs):
    key = self._key
    if isinstance(inputs, tuple):
      n = len(inputs)
      # range() normalises negative indices and raises IndexError like indexing would.
      selected = set(range(n)[key]) if isinstance(key, slice) else {range(n)[key]}
      return _rebuild_tuple(inputs, (fn(x) if i in selected else x for i, x in enumerate(inputs)))
    if isinstance(inputs, collections.abc.Mapping):
      return _rebuild_mapping(inputs, {**inputs, key: fn(inputs[key])})
    xs = copy.copy(inputs)
    if isinstance(key, slice):
      xs[key] = [fn(x) for x in xs[key]]
    else:
      xs[key] = fn(xs[key])
    return xs

  def iterate(self, inputs):
    if isinstance(self._key, slice):
      yield from inputs[self._key]
    else:
      yield inputs[self._key]


class TraverseEach(Traversal):
  """Selects each entry of a list, tuple (incl. namedtuple) or the values of a mapping."""

  def update(self, fn, inputs):
    if isinstance(inputs, collections.abc.Mapping):
      return _rebuild_mapping(inputs, {key: fn(value) for key, value in inputs.items()})
    if isinstance(inputs, tuple):
      return _rebuild_tuple(inputs, [fn(x) for x in inputs])
    if isinstance(inputs, list):
      return type(inputs)(fn(x) for x in inputs)
    raise ValueError("Only the entries of a list, tuple or mapping can be traversed, "
                     f"not a {type(inputs).__name__}.")

  def iterate(self, inputs):
    if isinstance(inputs, collections.abc.Mapping):
      yield from inputs.values()
    else:
      yield from inputs


class TraverseTree(Traversal):
  """Selects every leaf of a pytree."""

  def update(self, fn, inputs):
    return jax.tree_util.tree_map(fn, inputs)

  def iterate(self, inputs):
    yield from jax.tree_util.tree_leaves(inputs)


def _check_params(inputs: Any) -> None:
  if not isinstance(inputs, collections.abc.Mapping):
    raise ValueError(
        "ModelParamTraversal can only traverse a nested dict or Mapping of parameters "
        f"(e.g. a FrozenDict), not {type(inputs).__name__}.")


def _param_name(path: Path) -> str:
  return "/" + "/".join(str(key) for key in path)


def _sorted_flat_params(inputs: Mapping) -> Iterable[Tuple[Path, Any]]:
  # Sorted by path, as in 0.5.3: this fixes the order that ``set`` assigns values in.
  return sorted(flatten_dict(inputs).items(), key=lambda item: item[0])


def _replace_leaves(xs: Mapping, prefix: Path, new_leaves: Dict[Path, Any]) -> Mapping:
  """Rebuilds ``xs`` with its own container types, taking leaves from ``new_leaves``."""
  items = {}
  for key, value in xs.items():
    path = prefix + (key,)
    if isinstance(value, collections.abc.Mapping):
      items[key] = _replace_leaves(value, path, new_leaves)
    else:
      items[key] = new_leaves[path]
  return _rebuild_mapping(xs, items)


class ModelParamTraversal(Traversal):
  """Selects model parameters of a nested dict by name.

  A parameter's name is its path of keys, e.g. ``'/Dense_0/kernel'``. Typically used with
  ``MultiOptimizer`` to give subsets of the parameters different optimizers::

    kernels = ModelParamTraversal(lambda path, _: path.endswith('/kernel'))

  Works on plain dicts and on any (possibly immutable) ``Mapping`` such as ``FrozenDict``;
  ``update`` rebuilds every container with its own type. Leaves are visited in sorted path
  order, both by ``iterate`` and by ``update`` (hence by ``set``).
  """

  def __init__(self, filter_fn: Callable[[str, Any], bool]):
    """Args:
      filter_fn: ``filter_fn(name, value)`` returns whether the parameter is selected.
    """
    self._filter_fn = filter_fn

  def iterate(self, inputs):
    _check_params(inputs)  # eagerly, not at the first next()
    return (value for path, value in _sorted_flat_params(inputs)
            if self._filter_fn(_param_name(path), value))

  def update(self, fn, inputs):
    _check_params(inputs)
    new_leaves = {}
    for path, value in _sorted_flat_params(inputs):
      new_leaves[path] = fn(value) if self._filter_fn(_param_name(path), value) else value
    return _replace_leaves(inputs, (), new_leaves)
