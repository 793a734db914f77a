"""A minimal immutable dict, compatible with ``flax.core.FrozenDict`` (flax 0.5.3).

Only what users of the legacy ``flax.optim`` API rely on is provided: an immutable
``Mapping`` that is a JAX pytree (leaves ordered by sorted keys, exactly like a plain
``dict`` and like flax's ``FrozenDict``), plus ``freeze``/``unfreeze``, ``copy`` and ``pop``.
"""
import collections.abc
from typing import Any, Dict, Mapping, Tuple, TypeVar

import jax

K = TypeVar("K")
V = TypeVar("V")

__all__ = ["FrozenDict", "freeze", "unfreeze"]


class FrozenKeysView(collections.abc.KeysView):
  """Keys view with a readable repr."""

  def __repr__(self):
    return f"frozen_dict_keys({list(self)})"


class FrozenValuesView(collections.abc.ValuesView):
  """Values view with a readable repr."""

  def __repr__(self):
    return f"frozen_dict_values({list(self)})"


def _to_plain(xs: Any) -> Any:
  """Deep-copies nested dicts / FrozenDicts into fresh plain dicts; other values are shared.

  The internal storage of a FrozenDict is plain dicts that nobody else references, which is
  what makes it safe to hand out nested views without copying (see ``__getitem__``).
  """
  if isinstance(xs, FrozenDict):
    return xs._dict  # already private and never mutated: safe to share
  if isinstance(xs, dict):
    return {key: _to_plain(value) for key, value in xs.items()}
  return xs


def _sorted_keys(xs: Dict[Any, Any]) -> Tuple[Any, ...]:
  # Same leaf order as a plain dict pytree (and as flax's FrozenDict, which flattened its dict).
  return tuple(sorted(xs))


class FrozenDict(Mapping[K, V]):
  """An immutable variant of the Python dict (nested dicts are frozen too)."""
  __slots__ = ("_dict", "_hash")

  def __init__(self, *args, __unsafe_skip_copy__=False, **kwargs):  # noqa: N803 (flax's name)
    xs = dict(*args, **kwargs)
    # skip_copy is only for callers that hand over freshly built plain dicts (tree_unflatten).
    object.__setattr__(self, "_dict", xs if __unsafe_skip_copy__ else _to_plain(xs))
    object.__setattr__(self, "_hash", None)

  def __setattr__(self, name, value):
    raise AttributeError("FrozenDict is immutable.")

  def __getitem__(self, key):
    value = self._dict[key]
    if isinstance(value, dict):
      # The nested dict is private storage, so a view needs no deep copy.
      return FrozenDict(value, __unsafe_skip_copy__=True)
    return value

  def __setitem__(self, key, value):
    raise ValueError("FrozenDict is immutable.")

  def __delitem__(self, key):
    raise ValueError("FrozenDict is immutable.")

  def __contains__(self, key):
    return key in self._dict

  def __iter__(self):
    return iter(self._dict)

  def __len__(self):
    return len(self._dict)

  def __repr__(self):
    return self.pretty_repr()

  def __reduce__(self):
    return FrozenDict, (self.unfreeze(),)

  def __hash__(self):
    if self._hash is None:
      h = 0
      for item in self.items():
        h ^= hash(item)
      object.__setattr__(self, "_hash", h)
    return self._hash

  def pretty_repr(self, num_spaces: int = 4) -> str:
    """Returns an indented representation of the nested dictionary."""
    pad = " " * num_spaces

    def pretty(x, depth):
      if not isinstance(x, dict):
        return repr(x)
      if not x:
        return "{}"
      inner = "".join(f"{pad * (depth + 1)}{key}: {pretty(value, depth + 1)},\n"
                      for key, value in x.items())
      return "{\n" + inner + pad * depth + "}"

    return f"FrozenDict({pretty(self._dict, 0)})"

  def keys(self):
    return FrozenKeysView(self)

  def values(self):
    return FrozenValuesView(self)

  def items(self):
    for key in self._dict:
      yield key, self[key]

  def copy(self, add_or_replace: Mapping[K, V]) -> "FrozenDict[K, V]":
    """Returns a new FrozenDict with entries added or replaced; ``self`` is unchanged."""
    return type(self)({**self._dict, **add_or_replace})

  def pop(self, key: K) -> Tuple["FrozenDict[K, V]", V]:
    """Returns ``(a FrozenDict without key, the removed value)``; ``self`` is unchanged.

    Example::

      state, params = variables.pop('params')
    """
    value = self[key]
    rest = dict(self._dict)
    del rest[key]
    return type(self)(rest, __unsafe_skip_copy__=True), value

  def unfreeze(self) -> Dict[K, V]:
    """Returns a mutable deep copy as nested plain dicts."""
    return unfreeze(self)

  def tree_flatten_with_keys(self):
    keys = _sorted_keys(self._dict)
    children = tuple((jax.tree_util.DictKey(key), self._dict[key]) for key in keys)
    return children, keys

  def tree_flatten(self):
    keys = _sorted_keys(self._dict)
    return tuple(self._dict[key] for key in keys), keys

  @classmethod
  def tree_unflatten(cls, keys, children):
    # Children come fresh out of jax's unflatten, so there is nothing to protect by copying.
    return cls(zip(keys, children), __unsafe_skip_copy__=True)


jax.tree_util.register_pytree_with_keys(
    FrozenDict,
    lambda x: x.tree_flatten_with_keys(),
    FrozenDict.tree_unflatten,
    lambda x: x.tree_flatten())


def freeze(xs: Mapping[Any, Any]) -> FrozenDict:
  """Makes a nested dict immutable by turning it into a ``FrozenDict``."""
  return FrozenDict(xs)


def unfreeze(x: Any) -> Any:
  """Returns a mutable deep copy of a (nested) FrozenDict or dict; other values as they are."""
  if isinstance(x, FrozenDict):
    return _copy_dicts(x._dict)
  if isinstance(x, dict):
    return {key: unfreeze(value) for key, value in x.items()}
  return x


def _copy_dicts(xs: Any) -> Any:
  """Copies the dict skeleton of internal storage (leaves are shared, as in flax)."""
  if isinstance(xs, dict):
    return {key: _copy_dicts(value) for key, value in xs.items()}
  return xs
