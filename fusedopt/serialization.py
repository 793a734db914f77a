"""Optimizer checkpoints in flax.optim's state-dict format.

``{'target': ..., 'state': {'step': ..., 'param_states': ...}}`` where containers become dicts
with string keys (lists and tuples keyed '0', '1', ...) and flat state is written per leaf
(``{field: array}`` mirroring the target), exactly what flax 0.5.3 wrote for its optimizers, so
checkpoints do not depend on the flat layout. Restoring checks every key, shape and dtype class
against the live optimizer and raises ValueError naming the path.
"""
import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from .flat import FlatState


def to_state_dict(x):
  if isinstance(x, FlatState):
    return to_state_dict(x.per_leaf())
  if hasattr(x, "as_flax_tree"):   # state whose checkpoint format is another tree (MultiOptimizer)
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
  """A copy of ``template`` with values from state dict ``sd`` (structure checked)."""
  if isinstance(template, FlatState):
    per_leaf = from_state_dict(template.per_leaf(), sd, path)
    return template.from_per_leaf(template.layout.treedef.flatten_up_to(per_leaf))
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
  value = jnp.asarray(sd)
  if np.shape(template) != value.shape:
    raise ValueError(f"checkpoint leaf {path} has shape {value.shape}, the optimizer expects "
                     f"{np.shape(template)}")
  return value.astype(jnp.result_type(template))


def optimizer_state_dict(opt_def, target, state):
  del opt_def
  return {"target": to_state_dict(target), "state": to_state_dict(state)}


def optimizer_restore_state(opt_def, target, state, state_dict):
  del opt_def
  _keys_match("", ["target", "state"], state_dict)
  return (from_state_dict(target, state_dict["target"], "/target"),
          from_state_dict(state, state_dict["state"], "/state"))
