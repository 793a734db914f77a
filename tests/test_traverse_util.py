"""Tests for fusedopt.traverse_util and fusedopt.frozen_dict (flax 0.5.3 semantics)."""
import collections
import copy
import dataclasses
import pickle
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedopt import struct
from fusedopt import traverse_util as tu
from fusedopt.frozen_dict import FrozenDict, freeze, unfreeze

Point = collections.namedtuple("Point", ["x", "y"])


@dataclasses.dataclass
class Box:
  a: int
  b: int


@struct.dataclass
class Frozen:
  a: int
  b: int


class Plain:
  def __init__(self, foo):
    self.foo = foo


# ---------------------------------------------------------------------------------------------
# flatten_dict / unflatten_dict

NESTED = {"foo": 1, "bar": {"a": 2, "b": {}}, "baz": {"c": {"d": 3}}}


def test_flatten_drops_empty_nodes_by_default():
  assert tu.flatten_dict(NESTED) == {("foo",): 1, ("bar", "a"): 2, ("baz", "c", "d"): 3}
  assert tu.unflatten_dict(tu.flatten_dict(NESTED)) == {
      "foo": 1, "bar": {"a": 2}, "baz": {"c": {"d": 3}}}


def test_flatten_keeps_empty_nodes_and_round_trips():
  flat = tu.flatten_dict(NESTED, keep_empty_nodes=True)
  assert flat == {("foo",): 1, ("bar", "a"): 2, ("bar", "b"): tu.empty_node,
                  ("baz", "c", "d"): 3}
  assert flat[("bar", "b")] is tu.empty_node
  assert tu.unflatten_dict(flat) == NESTED


def test_flatten_preserves_depth_first_order():
  assert list(tu.flatten_dict(NESTED, keep_empty_nodes=True)) == [
      ("foo",), ("bar", "a"), ("bar", "b"), ("baz", "c", "d")]


def test_flatten_with_sep_round_trips():
  flat = tu.flatten_dict(NESTED, keep_empty_nodes=True, sep="/")
  assert flat == {"foo": 1, "bar/a": 2, "bar/b": tu.empty_node, "baz/c/d": 3}
  assert tu.unflatten_dict(flat, sep="/") == NESTED
  assert tu.flatten_dict({"a": {"b": 1}}, sep=".") == {"a.b": 1}
  assert tu.unflatten_dict({"a.b": 1, "a.c": 2, "d": 3}, sep=".") == {
      "a": {"b": 1, "c": 2}, "d": 3}


def test_flatten_is_leaf_stops_descent():
  xs = {"a": {"b": {"c": 1}}, "d": {"e": 2}}
  seen = []

  def is_leaf(path, value):
    seen.append(path)
    return path == ("a", "b")

  assert tu.flatten_dict(xs, is_leaf=is_leaf) == {("a", "b"): {"c": 1}, ("d", "e"): 2}
  # Called on every nested dict (including the root), never on non-dict leaves.
  assert seen == [(), ("a",), ("a", "b"), ("d",)]


def test_flatten_and_unflatten_of_empty_dict():
  assert tu.flatten_dict({}) == {}
  assert tu.flatten_dict({}, keep_empty_nodes=True) == {(): tu.empty_node}
  assert tu.unflatten_dict(tu.flatten_dict({}, keep_empty_nodes=True)) == {}
  assert tu.unflatten_dict({}) == {}


def test_flatten_frozen_dict_and_leaves_that_are_not_dicts():
  xs = FrozenDict({"a": {"b": [1, 2]}, "c": (3,)})
  assert tu.flatten_dict(xs) == {("a", "b"): [1, 2], ("c",): (3,)}


def test_unflatten_accepts_pickled_empty_node():
  node = pickle.loads(pickle.dumps(tu.empty_node))
  assert tu.unflatten_dict({("a",): node}) == {"a": {}}


def test_flatten_and_unflatten_reject_non_dicts():
  with pytest.raises(TypeError, match="dict"):
    tu.flatten_dict([1, 2])
  with pytest.raises(TypeError, match="dict"):
    tu.unflatten_dict([(("a",), 1)])


def test_empty_node_is_a_pytree_without_leaves():
  assert jax.tree_util.tree_leaves({"a": tu.empty_node, "b": 1}) == [1]


# ---------------------------------------------------------------------------------------------
# Traversal basics


def test_identity():
  assert list(tu.t_identity.iterate(5)) == [5]
  assert tu.t_identity.update(lambda x: x + 1, 5) == 6
  assert tu.t_identity.set([7], 5) == 7


def test_attr_on_namedtuple_dataclass_struct_and_plain_object():
  t = tu.t_identity.x
  p = Point(1, 2)
  assert list(t.iterate(p)) == [1]
  assert t.update(lambda v: v * 10, p) == Point(10, 2)
  assert p == Point(1, 2)

  box = Box(1, 2)
  assert tu.t_identity.b.update(lambda v: -v, box) == Box(1, -2)
  assert box == Box(1, 2)

  frozen = Frozen(1, 2)
  assert tu.t_identity.a.set([5], frozen) == Frozen(5, 2)

  obj = Plain(3)
  new = tu.t_identity.foo.update(lambda v: v + 1, obj)
  assert (new.foo, obj.foo) == (4, 3)


def test_item_on_dict_list_tuple_namedtuple():
  d = {"a": 1, "b": 2}
  assert list(tu.t_identity["b"].iterate(d)) == [2]
  assert tu.t_identity["b"].update(lambda v: v + 1, d) == {"a": 1, "b": 3}
  assert d == {"a": 1, "b": 2}

  xs = [1, 2, 3]
  assert tu.t_identity[1].update(lambda v: v * 10, xs) == [1, 20, 3]
  assert xs == [1, 2, 3]

  t = (1, 2, 3)
  out = tu.t_identity[0].update(lambda v: v * 10, t)
  assert out == (10, 2, 3) and type(out) is tuple

  p = Point(1, 2)
  out = tu.t_identity[1].update(lambda v: v * 10, p)
  assert out == Point(1, 20) and type(out) is Point


def test_item_with_slices():
  t = tu.t_identity[1:3]
  assert list(t.iterate([1, 2, 3, 4])) == [2, 3]
  assert t.update(lambda v: -v, (1, 2, 3, 4)) == (1, -2, -3, 4)
  # On a list fn is applied per element, matching what iterate yields.
  assert t.update(lambda v: -v, [1, 2, 3, 4]) == [1, -2, -3, 4]
  assert t.set([20, 30], [1, 2, 3, 4]) == [1, 20, 30, 4]
  assert tu.t_identity[::2].set([10, 30], (1, 2, 3, 4)) == (10, 2, 30, 4)


def test_item_negative_index_on_tuple():
  assert tu.t_identity[-1].update(lambda v: v * 10, (1, 2, 3)) == (1, 2, 30)
  with pytest.raises(IndexError):
    tu.t_identity[5].update(lambda v: v, (1, 2))


def test_item_on_frozen_dict_keeps_type():
  fd = FrozenDict({"a": {"b": 1}, "c": 2})
  out = tu.t_identity["a"]["b"].update(lambda v: v + 1, fd)
  assert type(out) is FrozenDict and type(out["a"]) is FrozenDict
  assert out == {"a": {"b": 2}, "c": 2}
  assert fd == {"a": {"b": 1}, "c": 2}


def test_item_on_mapping_proxy_keeps_type():
  mp = types.MappingProxyType({"a": 1})
  out = tu.t_identity["a"].update(lambda v: v + 1, mp)
  assert type(out) is types.MappingProxyType and dict(out) == {"a": 2}


def test_each_on_containers():
  each = tu.t_identity.each()
  assert list(each.iterate([1, 2])) == [1, 2]
  assert list(each.iterate({"a": 1, "b": 2})) == [1, 2]
  assert list(each.iterate(FrozenDict({"a": 1, "b": 2}))) == [1, 2]
  assert each.update(lambda v: v + 1, [1, 2]) == [2, 3]
  out = each.update(lambda v: v + 1, (1, 2))
  assert out == (2, 3) and type(out) is tuple
  out = each.update(lambda v: v + 1, Point(1, 2))
  assert out == Point(2, 3) and type(out) is Point
  assert each.update(lambda v: v + 1, {"a": 1, "b": 2}) == {"a": 2, "b": 3}
  out = each.update(lambda v: v + 1, FrozenDict({"a": 1}))
  assert type(out) is FrozenDict and out == {"a": 2}
  out = each.update(lambda v: v + 1, collections.OrderedDict(a=1))
  assert type(out) is collections.OrderedDict and out == {"a": 2}
  dd = collections.defaultdict(list, a=1)
  out = each.update(lambda v: v + 1, dd)
  assert type(out) is collections.defaultdict and out.default_factory is list
  assert dd["a"] == 1
  with pytest.raises(ValueError, match="list, tuple or mapping"):
    each.update(lambda v: v, {1, 2})


def test_compose_each_then_item():
  data = [{"foo": 1, "bar": 2}, {"foo": 3, "bar": 4}]
  t = tu.t_identity.each()["foo"]
  assert list(t.iterate(data)) == [1, 3]
  assert t.update(lambda v: v * 10, data) == [{"foo": 10, "bar": 2}, {"foo": 30, "bar": 4}]
  assert t.set([5, 6], data) == [{"foo": 5, "bar": 2}, {"foo": 6, "bar": 4}]
  assert data == [{"foo": 1, "bar": 2}, {"foo": 3, "bar": 4}]


def test_compose_attr_item_attr():
  data = {"foo": Box(a=Point(1, 2), b=3)}
  t = tu.t_identity["foo"].a.y
  assert list(t.iterate(data)) == [2]
  assert t.update(lambda v: v + 40, data) == {"foo": Box(a=Point(1, 42), b=3)}


def test_merge():
  t = tu.t_identity.merge(tu.t_identity["a"], tu.t_identity["c"])
  d = {"a": 1, "b": 2, "c": 3}
  assert list(t.iterate(d)) == [1, 3]
  assert t.update(lambda v: -v, d) == {"a": -1, "b": 2, "c": -3}
  assert t.set([10, 30], d) == {"a": 10, "b": 2, "c": 30}
  assert isinstance(t, tu.TraverseCompose)


def test_filter():
  t = tu.t_identity.each().filter(lambda v: v % 2 == 0)
  assert list(t.iterate([1, 2, 3, 4])) == [2, 4]
  assert t.update(lambda v: v * 10, [1, 2, 3, 4]) == [1, 20, 3, 40]
  assert list(tu.TraverseFilter(lambda v: v > 0).iterate(-1)) == []


def test_tree_on_pytrees():
  tree = {"a": [1, (2, 3)], "b": FrozenDict({"d": 5, "c": 4}), "e": Point(6, 7)}
  t = tu.t_identity.tree()
  assert list(t.iterate(tree)) == [1, 2, 3, 4, 5, 6, 7]
  out = t.update(lambda v: v * 10, tree)
  assert out == {"a": [10, (20, 30)], "b": {"c": 40, "d": 50}, "e": Point(60, 70)}
  assert type(out["b"]) is FrozenDict and type(out["e"]) is Point
  assert t.set(list(range(7)), tree)["b"] == {"c": 3, "d": 4}


def test_set_checks_count_and_does_not_consume_values():
  t = tu.t_identity.each()
  values = [7, 8]
  assert t.set(values, [1, 2]) == [7, 8]
  assert values == [7, 8]
  with pytest.raises(ValueError, match="Not enough values"):
    t.set([1], [1, 2])
  with pytest.raises(ValueError, match="Too many values"):
    t.set([1, 2, 3], [1, 2])


def test_traversal_is_abstract_and_dunders_are_not_traversals():
  with pytest.raises(TypeError):
    tu.Traversal()
  t = tu.t_identity["a"]
  assert not hasattr(t, "__array__")
  assert copy.deepcopy(t).update(lambda v: v + 1, {"a": 1}) == {"a": 2}
  assert isinstance(tu.t_identity.foo, tu.TraverseCompose)
  assert isinstance(tu.t_identity._private, tu.TraverseCompose)


def test_explicit_traversal_classes():
  assert list(tu.TraverseAttr("y").iterate(Point(1, 2))) == [2]
  assert list(tu.TraverseItem(0).iterate([5])) == [5]
  assert list(tu.TraverseEach().iterate((1, 2))) == [1, 2]
  assert list(tu.TraverseTree().iterate([[1], 2])) == [1, 2]
  assert list(tu.TraverseMerge(tu.TraverseId(), tu.TraverseId()).iterate(1)) == [1, 1]
  composed = tu.TraverseCompose(tu.TraverseItem("a"), tu.TraverseItem("b"))
  assert composed.update(lambda v: v + 1, {"a": {"b": 1}}) == {"a": {"b": 2}}


# ---------------------------------------------------------------------------------------------
# ModelParamTraversal

PARAMS = {
    "Dense_1": {"kernel": 3, "bias": 4},
    "Dense_0": {"kernel": 1, "bias": 2},
    "scale": 5,
    "Empty": {},
}


def test_model_param_traversal_paths_in_sorted_order():
  seen = []

  def record(path, value):
    seen.append((path, value))
    return True

  assert list(tu.ModelParamTraversal(record).iterate(PARAMS)) == [2, 1, 4, 3, 5]
  assert seen == [("/Dense_0/bias", 2), ("/Dense_0/kernel", 1), ("/Dense_1/bias", 4),
                  ("/Dense_1/kernel", 3), ("/scale", 5)]


def test_model_param_traversal_filter_update_set():
  kernels = tu.ModelParamTraversal(lambda path, _: path.endswith("/kernel"))
  assert list(kernels.iterate(PARAMS)) == [1, 3]
  out = kernels.update(lambda v: v * 10, PARAMS)
  assert out == {"Dense_1": {"kernel": 30, "bias": 4}, "Dense_0": {"kernel": 10, "bias": 2},
                 "scale": 5, "Empty": {}}
  assert PARAMS["Dense_0"]["kernel"] == 1
  # set assigns in sorted path order: Dense_0 first, even though Dense_1 is first in the dict.
  out = kernels.set([100, 300], PARAMS)
  assert (out["Dense_0"]["kernel"], out["Dense_1"]["kernel"]) == (100, 300)
  by_value = tu.ModelParamTraversal(lambda _, v: v > 3)
  assert list(by_value.iterate(PARAMS)) == [4, 5]


def test_model_param_traversal_on_frozen_dict_keeps_types():
  params = freeze(PARAMS)
  biases = tu.ModelParamTraversal(lambda path, _: "bias" in path)
  assert list(biases.iterate(params)) == [2, 4]
  out = biases.update(lambda v: -v, params)
  assert type(out) is FrozenDict and type(out["Dense_0"]) is FrozenDict
  assert type(out["Empty"]) is FrozenDict
  assert unfreeze(out) == {"Dense_1": {"kernel": 3, "bias": -4},
                           "Dense_0": {"kernel": 1, "bias": -2}, "scale": 5, "Empty": {}}
  assert params["Dense_0"]["bias"] == 2


def test_model_param_traversal_on_mixed_and_custom_mappings():
  params = {"outer": FrozenDict({"w": 1}),
            "proxy": types.MappingProxyType({"w": 2}),
            "od": collections.OrderedDict(w=3)}
  out = tu.ModelParamTraversal(lambda *_: True).update(lambda v: v + 1, params)
  assert type(out) is dict and type(out["outer"]) is FrozenDict
  assert type(out["proxy"]) is types.MappingProxyType and type(out["od"]) is collections.OrderedDict
  assert {k: dict(v) for k, v in out.items()} == {"outer": {"w": 2}, "proxy": {"w": 3},
                                                   "od": {"w": 4}}


def test_model_param_traversal_with_arrays_and_jit():
  params = freeze({"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}})
  kernels = tu.ModelParamTraversal(lambda path, _: path.endswith("kernel"))

  @jax.jit
  def scale_kernels(p):
    return kernels.update(lambda x: 3.0 * x, p)

  out = scale_kernels(params)
  np.testing.assert_array_equal(out["Dense_0"]["kernel"], np.full((2, 2), 3.0))
  np.testing.assert_array_equal(out["Dense_0"]["bias"], np.zeros(2))


def test_model_param_traversal_rejects_non_dicts():
  t = tu.ModelParamTraversal(lambda *_: True)
  for bad in ([1, 2], Point(1, 2), 3):
    with pytest.raises(ValueError, match="nested dict or Mapping"):
      t.iterate(bad)
    with pytest.raises(ValueError, match="nested dict or Mapping"):
      t.update(lambda v: v, bad)


def test_model_param_traversal_composes_with_traversals():
  data = {"params": {"a": {"w": 1}, "b": {"w": 2}}, "other": 0}
  t = tu.t_identity["params"].compose(tu.ModelParamTraversal(lambda p, _: p.startswith("/b")))
  assert t.update(lambda v: v * 5, data) == {"params": {"a": {"w": 1}, "b": {"w": 10}},
                                             "other": 0}


# ---------------------------------------------------------------------------------------------
# FrozenDict


def test_frozen_dict_is_immutable_and_nested_frozen():
  fd = FrozenDict({"a": {"b": 1}}, c=2)
  assert fd == {"a": {"b": 1}, "c": 2} and len(fd) == 2 and "c" in fd
  assert type(fd["a"]) is FrozenDict
  with pytest.raises(ValueError, match="immutable"):
    fd["c"] = 3
  with pytest.raises(ValueError, match="immutable"):
    del fd["c"]
  with pytest.raises(AttributeError):
    fd._dict = {}


def test_frozen_dict_copies_its_input():
  src = {"a": {"b": 1}}
  fd = FrozenDict(src)
  src["a"]["b"] = 99
  assert fd["a"]["b"] == 1
  thawed = fd.unfreeze()
  thawed["a"]["b"] = 7
  assert fd["a"]["b"] == 1 and type(thawed["a"]) is dict


def test_frozen_dict_copy_pop_hash_pickle_repr():
  fd = FrozenDict({"a": 1, "b": {"c": 2}})
  assert fd.copy({"a": 5, "d": {"e": 6}}) == {"a": 5, "b": {"c": 2}, "d": {"e": 6}}
  rest, value = fd.pop("b")
  assert rest == {"a": 1} and value == {"c": 2} and type(value) is FrozenDict
  assert fd == {"a": 1, "b": {"c": 2}}
  assert hash(fd) == hash(FrozenDict({"b": {"c": 2}, "a": 1}))
  assert pickle.loads(pickle.dumps(fd)) == fd
  assert repr(FrozenDict({"a": {"b": 1}})) == "FrozenDict({\n    a: {\n        b: 1,\n    },\n})"
  assert repr(fd.keys()) == "frozen_dict_keys(['a', 'b'])"


def test_freeze_unfreeze():
  nested = {"a": {"b": [1]}, "c": FrozenDict({"d": 2})}
  frozen = freeze(nested)
  assert type(frozen) is FrozenDict and type(frozen["c"]) is FrozenDict
  thawed = unfreeze(frozen)
  assert thawed == {"a": {"b": [1]}, "c": {"d": 2}} and type(thawed["c"]) is dict
  assert type(unfreeze(nested)["c"]) is dict
  assert unfreeze(3) == 3


def test_frozen_dict_pytree_sorted_like_dict():
  fd = FrozenDict({"b": 2, "a": {"y": 4, "x": 3}})
  assert jax.tree_util.tree_leaves(fd) == [3, 4, 2]
  assert jax.tree_util.tree_leaves(fd) == jax.tree_util.tree_leaves(unfreeze(fd))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(fd)[0]]
  assert paths == ["['a']['x']", "['a']['y']", "['b']"]
  out = jax.tree_util.tree_map(lambda v: v + 1, fd)
  assert type(out) is FrozenDict and out == {"a": {"x": 4, "y": 5}, "b": 3}
  assert jax.tree_util.tree_structure(fd) == jax.tree_util.tree_structure(out)
  assert jax.tree_util.tree_structure(fd) != jax.tree_util.tree_structure(FrozenDict(b=2, a=1))


def test_frozen_dict_through_jit():
  fd = FrozenDict({"w": jnp.arange(3.0), "b": {"c": jnp.ones(())}})
  out = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: 2 * x, p))(fd)
  assert type(out) is FrozenDict
  np.testing.assert_array_equal(out["w"], [0.0, 2.0, 4.0])
  assert float(out["b"]["c"]) == 2.0


# ---------------------------------------------------------------------------------------------
# Round-trip property

from hypothesis import given, settings, strategies as st  # noqa: E402

_nested_dicts = st.recursive(
    st.integers(),
    lambda children: st.dictionaries(st.text("abc", min_size=1, max_size=2), children,
                                     max_size=3),
    max_leaves=10)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("abc", min_size=1, max_size=2), _nested_dicts, max_size=3))
def test_flatten_unflatten_round_trip_property(xs):
  assert tu.unflatten_dict(tu.flatten_dict(xs, keep_empty_nodes=True)) == xs
  if xs:  # with sep, {} and {'': {}} both flatten to {'': empty_node}; 0.5.3 reads {'': {}}
    assert tu.unflatten_dict(tu.flatten_dict(xs, keep_empty_nodes=True, sep="/"), sep="/") == xs
  frozen = tu.flatten_dict(freeze(xs), keep_empty_nodes=True)
  assert frozen == tu.flatten_dict(xs, keep_empty_nodes=True)
  leaves = list(tu.ModelParamTraversal(lambda *_: True).iterate(xs))
  assert leaves == [v for _, v in sorted(tu.flatten_dict(xs).items())]
