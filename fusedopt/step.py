"""``StepContext``: what one step's group updates need to know besides the rule and the buffers.

A step of a built-in optimizer runs ``update_leaves(hp, ctx, layout, p, g, fields)``, which runs
rules with ``run_rule(rule, scalars, seg, ctx, layout, p, g, fields)`` (``fusedopt.flat``). The
context travels down that chain as an explicit, frozen argument -- never as attributes set on
copies of the optimizer -- and says:

- ``step``: the step count (traced); it seeds stochastic rounding.
- ``guard``: inside ``apply_gradient_checked``, the scalars ``{"gscale", "ok"}``: every rule runs
  ``elementwise.guarded`` (gradient scaled; a non-finite step keeps params and state bitwise).
- ``deltas``: ``fusedopt.tx``'s update: float32 groups write ``p' - p`` and the others their new
  params, each to a fresh buffer (the params are not donated).
- ``leaf_state``: None for flat state (``fields[k][gi]``, a buffer per dtype group), or the
  names of per-leaf state fields in the rule's state order (``fields[k][i]`` the state of leaf
  ``i``: optax's params-shaped state, ``fusedopt.tx``, named as optax names them); backends run
  them with ``Backend.run_leaves``. The order is explicit: a dict that passed through ``jit``
  comes back with its keys sorted.
- ``outer``: values computed from optimizer-wide state for this step (schedule-free's averaging
  weight and the new ``weight_sum``/``max_lr``: ``fusedopt.schedule_free``), or None.
- ``run_group``, ``reduce_sums``, ``leaf_norms``: where the step runs. By default on this
  device (``fusedopt.flat.run_group``, no reduction, ``norms.per_leaf``); the sharded driver
  (``fusedopt.sharding``) supplies a group runner over its local slices, a ``psum`` of the
  per-tensor sums and per-tensor norms from per-shard partial sums.
"""
import dataclasses
from typing import Any, Callable, Mapping, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class StepContext:
  """The explicit context of one optimizer step (see the module docstring).

  Attributes:
    step: the step count.
    guard: ``{"gscale": ..., "ok": ...}`` in a checked step, else None.
    deltas: write ``p' - p`` (float32) / new params (other dtypes) to fresh buffers.
    leaf_state: None (flat state), or the per-leaf state fields' names in the rule's order.
    outer: name -> value of this step, from optimizer-wide state (``FlatOptimizerDef
      .step_context``), or None.
    run_group: ``run_group(opt_def, rule, scalars, seg, layout, gi, p_leaves, g_leaves, state)
      -> (new params as (index into p_leaves, value) pairs or None, new state, per-tensor sums
      or None)``, the sums float32 [num_leaves] vectors; None: ``fusedopt.flat.run_group``.
    reduce_sums: combines the per-tensor sums of all groups across devices; None: as they are.
    leaf_norms: ``leaf_norms(layout, *leaf_lists) -> tuple of [num_leaves] L2 norms``, one per
      list; None: ``norms.per_leaf`` of each list.
  """
  step: Any
  guard: Optional[Mapping[str, Any]] = None
  deltas: bool = False
  leaf_state: Optional[Tuple[str, ...]] = None
  outer: Optional[Mapping[str, Any]] = None
  run_group: Optional[Callable] = None
  reduce_sums: Optional[Callable] = None
  leaf_norms: Optional[Callable] = None

  def replace(self, **changes) -> "StepContext":
    return dataclasses.replace(self, **changes)
