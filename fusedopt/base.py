"""The flax.optim core: ``OptimizerDef``, ``Optimizer``, ``OptimizerState``.

Semantics follow flax 0.5.3 (``flax/optim/base.py``): an ``OptimizerDef`` holds hyper-parameters
and defines ``init_param_state``/``apply_param_gradient`` per leaf; ``apply_gradient`` maps them over
the tree. A user's own subclass that implements only those two methods runs exactly that per-leaf
path. The built-in optimizers (``fusedopt.flat.FlatOptimizerDef``) override ``init_state`` and
``apply_gradient`` to keep their state in flat buffers and run fused updates.
"""
import dataclasses
import functools
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import exact_float, struct
from .exact_float import ExactFloat


# What the flax API here needs from modules above it (docs/design.md, "Layers"): ``focus`` from
# fusedopt.multi, ``state_dict``/``restore_state`` from fusedopt.serialization. Those modules put
# their functions here when imported -- ``import fusedopt`` imports both -- so this module never
# imports upwards.
PROVIDED = {}


def _provided(name):
  if name not in PROVIDED:
    raise RuntimeError(f"{name} needs the rest of the package: import fusedopt")
  return PROVIDED[name]


class HyperParamError(ValueError):
  """A hyper-parameter is missing or out of range."""


@struct.dataclass
class OptimizerState:
  step: jnp.ndarray
  param_states: Any


def outer_fields(state):
  """The names of a state's optimizer-wide fields: those of an ``OptimizerState`` subclass beyond
  flax's ``step`` and ``param_states`` (``ScheduleFreeOptimizerState``'s ``weight_sum``,
  ``max_lr``); none for flax's own."""
  return [f.name for f in dataclasses.fields(state) if f.name not in ("step", "param_states")]


def _check_tree(params, grads):
  """flax raises ValueError for a grads tree of another structure; name both structures."""
  p_def = jax.tree_util.tree_structure(params)
  g_def = jax.tree_util.tree_structure(grads)
  if p_def != g_def:
    raise ValueError(f"grads have a different tree structure than the target:\n"
                     f"  target: {p_def}\n  grads:  {g_def}")
  return p_def


def ordered_fields(state, order):
  """One parameter's state dict with its keys in ``order`` (any others after them)."""
  rank = {k: i for i, k in enumerate(order)}
  return {k: state[k] for k in sorted(state, key=lambda k: rank.get(k, len(rank)))}


class OptimizerDef:
  """Base class for an optimizer definition: initialization and gradient application logic."""

  def __init__(self, hyper_params):
    self.hyper_params = hyper_params

  def apply_param_gradient(self, step, hyper_params, param, state, grad):
    """Applies a gradient to a single parameter; returns ``(new_param, new_state)``."""
    raise NotImplementedError()

  def init_param_state(self, param):
    """Returns the initial optimizer state of a single parameter."""
    raise NotImplementedError()

  def apply_gradient(self, hyper_params, params, state, grads):
    """Applies ``grads`` to ``params`` leaf by leaf; returns ``(new_params, new_state)``."""
    # the per-leaf rules of a user's subclass see float32 arrays, not ExactFloats
    return self.apply_leaf_by_leaf(exact_float.plain(hyper_params), params, state, grads)

  def apply_leaf_by_leaf(self, hyper_params, params, state, grads):
    """``apply_param_gradient`` on every leaf (``state.param_states`` mirrors ``params``);
    returns ``(new_params, OptimizerState(step + 1, new per-leaf states))``."""
    step = state.step
    treedef = _check_tree(params, grads)
    params_flat = treedef.flatten_up_to(params)
    states_flat = treedef.flatten_up_to(state.param_states)
    grads_flat = treedef.flatten_up_to(grads)
    out = [self.apply_param_gradient(step, hyper_params, p, s, g)
           for p, s, g in zip(params_flat, states_flat, grads_flat)]
    new_params_flat, new_states_flat = list(zip(*out)) if out else ((), ())
    new_params = jax.tree_util.tree_unflatten(treedef, new_params_flat)
    new_param_states = jax.tree_util.tree_unflatten(treedef, new_states_flat)
    return new_params, OptimizerState(step + 1, new_param_states)

  def validate_for_jit(self, hyper_params) -> bool:
    """Whether an eager ``Optimizer.apply_gradient`` may run as one compiled step (after checking
    ``hyper_params`` here, on concrete values). Built-in optimizers say yes: op-by-op execution
    compiles every operation once per leaf shape, minutes for a tree of 2000 shapes. A user's
    subclass keeps flax's eager per-leaf behaviour unless it overrides this."""
    del hyper_params
    return False

  def init_state(self, params):
    param_states = jax.tree_util.tree_map(self.init_param_state, params)
    return OptimizerState(jnp.asarray(0, dtype=jnp.int32), param_states)

  def update_hyper_params(self, **hyper_param_overrides):
    """The hyper-parameters for one step: defaults with ``hyper_param_overrides`` applied.

    ``hyper_params=...`` replaces all of them: it must be of the kind ``self.hyper_params`` is
    (TypeError otherwise). An unknown name raises TypeError. Values are checked by the
    optimizer's ``validate`` when the step runs, before anything changes.
    """
    hp = hyper_param_overrides.pop("hyper_params", self.hyper_params)
    want = getattr(self.hyper_params, "__dataclass_fields__", None)
    if hp is not self.hyper_params and want is not None:
      # a dataclass with the same fields (a user's optimizer whose hyper-parameters are not a
      # dataclass is not checked: flax accepted anything there)
      got = getattr(hp, "__dataclass_fields__", None)
      if got is None or list(got) != list(want) or not hasattr(hp, "replace"):
        raise TypeError(
            f"hyper_params={hp!r} is not this optimizer's hyper-parameters: expected a "
            f"{type(self.hyper_params).__name__} with fields {list(want)} (e.g. "
            f"opt_def.hyper_params.replace(...)); to change single values pass them as "
            f"keywords, e.g. apply_gradient(grads, {next(iter(want), 'name')}=...)")
    if hyper_param_overrides:
      hp = _replace_checked(hp, hyper_param_overrides)
    return hp

  def create(self, target, focus: Optional[Any] = None):
    """Creates an ``Optimizer`` for ``target``; ``focus`` (a Traversal) selects a subset."""
    opt_def = self
    if focus:
      opt_def = _provided("focus")(focus, opt_def)   # MultiOptimizer((focus, self))
    state = opt_def.init_state(target)
    return Optimizer(opt_def, state, target)

  # -- checkpoints: flax 0.5.3's layout, whatever the in-memory state looks like
  def flax_param_states(self, target, param_states):
    """``param_states`` as flax 0.5.3 laid them out in a checkpoint: a tree mirroring ``target``,
    each leaf that parameter's state. The per-leaf default already is that layout; optimizers
    with flat or fused state convert (and ``from_flax_param_states`` converts back)."""
    del target
    return param_states

  @staticmethod
  def fields_in_order(target, per_leaf_states, order):
    """``per_leaf_states`` (a tree mirroring ``target``, each leaf a dict of fields) with each
    dict's keys in ``order`` (any others after them): flax 0.5.3 wrote a parameter's state in its
    dataclass's field order, and a dict that went through ``jax.jit`` comes back sorted, so a
    checkpoint would change bytes after a step (``rmsprop``'s ``v, mg`` written ``mg, v``)."""
    return jax.tree_util.tree_map(lambda _, st: ordered_fields(st, order), target,
                                  per_leaf_states)

  def from_flax_param_states(self, target, param_states, restored):
    """The in-memory state for ``restored``: a tree shaped like ``flax_param_states``'s output
    (already checked against it and filled with the checkpoint's arrays)."""
    del target, param_states
    return restored

  def state_for_target(self, target, state):
    """The state to keep when the target is replaced by ``target`` (``Optimizer.replace``).
    Unchanged here; optimizers whose state holds a copy of the params (master weights) copy
    ``target`` into it, so that loading, editing or clamping the params is never undone."""
    del target
    return state

  def state_dict(self, target, state):
    return _provided("state_dict")(self, target, state)

  def restore_state(self, opt_target, opt_state, state_dict):
    return _provided("restore_state")(self, opt_target, opt_state, state_dict)


def _replace_checked(hp, overrides):
  if not hasattr(hp, "replace"):
    raise TypeError(f"cannot override {sorted(overrides)}: this optimizer's hyper-parameters "
                    f"({type(hp).__name__}) have no replace(); pass hyper_params= instead")
  try:
    return hp.replace(**overrides)
  except TypeError as e:
    names = [f for f in getattr(hp, "__dataclass_fields__", {})]
    unknown = sorted(set(overrides) - set(names))
    raise TypeError(f"unknown hyper-parameter override(s) {unknown}; this optimizer's "
                    f"hyper-parameters are {names}") from e


def _tracing(tree) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _is_static(x) -> bool:
  # Flags, sizes and names (None, bools, ints, strings) shape the computation: compile-time
  # constants. Floats and arrays are runtime values: a new learning rate never recompiles.
  return x is None or isinstance(x, (bool, int, str, np.bool_, np.integer))


def split_static(tree, exact=True):
  """``tree``'s leaves as ``((treedef, static), dynamic)``: flags, sizes and names (None, bools,
  ints, strings) are compile-time constants kept in ``static``; floats and arrays are runtime
  values in ``dynamic`` -- Python floats as ``ExactFloat`` (keeping their float64 accuracy where
  it matters: 1 - beta, bias corrections), or as they are with ``exact=False``."""
  leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is None)
  static = tuple((True, x) if _is_static(x) else (False, None) for x in leaves)
  dynamic = [ExactFloat.of(x) if exact and isinstance(x, float) else x
             for x in leaves if not _is_static(x)]
  return (treedef, static), dynamic


def join_static(static_part, dynamic):
  """The tree ``split_static`` split."""
  treedef, static = static_part
  it = iter(dynamic)
  return jax.tree_util.tree_unflatten(treedef, [v if is_static else next(it)
                                                for is_static, v in static])


def _compiled_step(opt, grads, hyper_params):
  static_part, dynamic = split_static(hyper_params)
  return _jitted_step(static_part, opt, grads, dynamic)


@functools.partial(jax.jit, static_argnums=(0,))
def _jitted_step(static_part, opt, grads, dynamic):
  hp = join_static(static_part, dynamic)
  new_target, new_state = opt.optimizer_def.apply_gradient(hp, opt.target, opt.state, grads)
  return opt.replace(target=new_target, state=new_state)


class _NoAux:
  """Placeholder for the lack of auxiliary outputs."""


class Optimizer(struct.PyTreeNode):
  """An optimizer definition with its state and target (the parameters being optimized).

  A pytree: it passes through ``jax.jit`` (and can be donated), ``jax.lax.scan`` and friends.

  Example::

    optimizer = fusedopt.Adam(learning_rate=1e-3).create(params)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(optimizer, batch, lr):
      grad = jax.grad(loss_fn)(optimizer.target, batch)
      return optimizer.apply_gradient(grad, learning_rate=lr)
  """
  optimizer_def: OptimizerDef = struct.field(pytree_node=False)
  state: Any = struct.field(pytree_node=True)
  target: Any = struct.field(pytree_node=True)

  def replace(self, **updates):
    """A copy with some fields replaced. ``replace(target=new_params)`` without a ``state``
    also brings the state in line with the new target: with ``master_weights=True`` the float32
    master copy becomes ``new_params`` (so loading pretrained weights or clamping the params
    takes effect; the next step starts from them). Pass ``state=`` too to keep a state as is
    (e.g. both restored from one checkpoint)."""
    if "target" in updates and "state" not in updates:
      updates["state"] = self.optimizer_def.state_for_target(updates["target"], self.state)
    return dataclasses.replace(self, **updates)

  def apply_gradient(self, grads, **hyper_param_overrides):
    """Applies a pytree of gradients to the target; returns a new Optimizer.

    Keyword arguments override hyper-parameters for this step (``hyper_params=`` replaces all).
    Pass changing values (schedules) as arrays or traced values: they are runtime inputs of the
    compiled update and never cause a recompile.
    """
    hyper_params = self.optimizer_def.update_hyper_params(**hyper_param_overrides)
    if not _tracing((self, grads, hyper_params)) and self.optimizer_def.validate_for_jit(
        hyper_params):
      return _compiled_step(self, grads, hyper_params)
    new_target, new_state = self.optimizer_def.apply_gradient(
        hyper_params, self.target, self.state, grads)
    return self.replace(target=new_target, state=new_state)

  def apply_gradient_checked(self, grads, *, grad_scale=None, clip_global_norm=None,
                             **hyper_param_overrides):
    """``apply_gradient`` for mixed precision and clipping, fused into the update.

    Args:
      grads: the gradients, possibly multiplied by a loss scale.
      grad_scale: multiplies the gradients first (``1 / dynamic_scale.scale`` for loss-scaled
        gradients); None for 1.
      clip_global_norm: if given, clip the (unscaled) gradients to this global L2 norm, as
        ``optax.clip_by_global_norm``.
      **hyper_param_overrides: as for ``apply_gradient``.
    Returns:
      ``(new_optimizer, finite, global_norm)``. When any gradient is not finite, the new
      optimizer's target, state and step equal the old ones bitwise (skipped on the device, no
      host synchronisation); feed ``finite`` to ``DynamicScale.update``. ``global_norm`` is the
      norm of the unscaled gradients before clipping.

    Example (float16 loss scaling without the extra passes of unscaling and checking)::

      def train_step(opt, ds, batch):
        grads = jax.grad(lambda p: ds.scale * loss_fn(p, batch))(opt.target)
        opt, finite, _ = opt.apply_gradient_checked(grads, grad_scale=1 / ds.scale,
                                                    clip_global_norm=1.0)
        return opt, ds.update(finite)
    """
    opt_def = self.optimizer_def
    if not hasattr(opt_def, "apply_gradient_checked"):
      raise TypeError(f"{type(opt_def).__name__} has no fused checked update; use "
                      "apply_gradient with DynamicScale.value_and_grad")
    hyper_params = opt_def.update_hyper_params(**hyper_param_overrides)
    new_target, new_state, finite, norm = opt_def.apply_gradient_checked(
        hyper_params, self.target, self.state, grads, grad_scale, clip_global_norm)
    return self.replace(target=new_target, state=new_state), finite, norm

  def compute_gradient(self, loss_fn):
    """Deprecated (as in flax): use ``jax.grad`` or ``jax.value_and_grad``.

    Returns ``(loss, grad)`` or ``(loss, aux, grad)`` when ``loss_fn`` returns ``(loss, aux)``.
    """
    warnings.warn("compute_gradient() will be removed soon. Use jax.grad() or "
                  "jax.value_and_grad() instead.", DeprecationWarning, stacklevel=2)

    def loss_wrapper(target):
      loss_and_aux = loss_fn(target)
      if isinstance(loss_and_aux, (jnp.ndarray, jax.Array, float, int)):
        return loss_and_aux, _NoAux
      return loss_and_aux

    (loss, aux), grad = jax.value_and_grad(loss_wrapper, has_aux=True)(self.target)
    return (loss, grad) if aux is _NoAux else (loss, aux, grad)

  compute_gradients = compute_gradient

  def optimize(self, loss_fn, **hyper_param_overrides):
    """Deprecated (as in flax): returns ``(new_optimizer, loss[, aux])``."""
    warnings.warn("optimize() will be removed soon. Use jax.grad() or jax.value_and_grad() "
                  "and apply_gradient() instead.", DeprecationWarning, stacklevel=2)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      output_and_grad = self.compute_gradient(loss_fn)
    optimizer = self.apply_gradient(output_and_grad[-1], **hyper_param_overrides)
    return (optimizer,) + tuple(output_and_grad[:-1])

  def replicate(self, devices=None, axis_name="batch"):
    """Deprecated (as in flax 0.5.3): replicates the optimizer for data-parallel ``jax.pmap``.

    Target and state get a leading axis of ``len(devices)`` (default: all local devices), one
    copy per device, and the definition is wrapped in a ``ReplicatedOptimizer``, whose
    ``apply_gradient`` averages the gradients over the pmap axis ``axis_name``
    (``lax.psum(g) / lax.psum(1)``) before the update: call it inside
    ``jax.pmap(..., axis_name=axis_name)``. ``state_dict()`` writes the first copy, as an
    unreplicated optimizer would; ``restore_state`` replicates what it reads.

    Prefer ``flax.jax_utils.replicate(optimizer)`` and ``jax.lax.pmean`` on the gradients (what
    0.5.3's docstring recommends), or sharded state (``fusedopt.sharding``). Warns
    ``DeprecationWarning`` with the text flax 0.5.3 emitted here.
    """
    warnings.warn(OPTAX_DEPRECATION, DeprecationWarning, stacklevel=2)
    if devices is None:
      devices = jax.local_devices()
    optimizer_def = ReplicatedOptimizer(self.optimizer_def, devices, axis_name)
    return dataclasses.replace(replicate_tree(self, devices), optimizer_def=optimizer_def)

  def unreplicate(self):
    """Deprecated (as in flax 0.5.3): the optimizer of the first device's copy of a replicated
    optimizer (``replicate``), usable outside ``jax.pmap``. ValueError if it is not replicated."""
    if not isinstance(self.optimizer_def, ReplicatedOptimizer):
      raise ValueError("Cannot unreplicate an optimizer that is not replicated.")
    return dataclasses.replace(unreplicate_tree(self),
                               optimizer_def=self.optimizer_def.optimizer_def)

  def state_dict(self):
    return self.optimizer_def.state_dict(self.target, self.state)

  def restore_state(self, state):
    target, state = self.optimizer_def.restore_state(self.target, self.state, state)
    return self.replace(target=target, state=state)


# What flax 0.5.3 warned (DeprecationWarning) whenever an OptimizerDef was built -- and so in
# Optimizer.replicate, which builds a ReplicatedOptimizer. fusedopt warns only there.
OPTAX_DEPRECATION = (
    "Use `optax` instead of `flax.optim`. Refer to the update guide "
    "https://flax.readthedocs.io/en/latest/howtos/optax_update_guide.html "
    "for detailed instructions.")


def replicate_tree(tree, devices):
  """Every array leaf of ``tree`` stacked ``len(devices)`` times along a new leading axis, copy
  ``i`` on ``devices[i]`` (flax's ``jax_utils.replicate``; what ``jax.pmap`` takes as input)."""
  devices = list(devices)
  if not devices:
    raise ValueError("replicate needs at least one device")
  mesh = jax.sharding.Mesh(np.array(devices), ("replica",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("replica"))

  def rep(x):
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    one = x[None]   # each device gets its own copy of [1, ...]: no stacked copy on one device
    return jax.make_array_from_single_device_arrays(
        (len(devices),) + one.shape[1:], sharding, [jax.device_put(one, d) for d in devices])
  return jax.tree_util.tree_map(rep, tree)


def unreplicate_tree(tree):
  """The first copy (``x[0]``) of every leaf of a replicated tree (flax's
  ``jax_utils.unreplicate``), read from the device holding it without a gather."""
  def first(x):
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and np.ndim(x) > 0:
      for shard in x.addressable_shards:   # the shard holding exactly copy 0, if there is one
        i = shard.index[0] if shard.index else slice(None)
        start = i if isinstance(i, int) else (i.start or 0)
        if start == 0 and shard.data.size * x.shape[0] == x.size:
          return shard.data.reshape(x.shape[1:])
    return x[0]
  return jax.tree_util.tree_map(first, tree)


def _is_replicated(state):
  """A replicated optimizer's state outside ``pmap`` has a step of shape [n_devices]; inside
  ``pmap`` (each device's copy) the step is a scalar."""
  return np.ndim(state.step) > 0


class ReplicatedOptimizer(OptimizerDef):
  """Data-parallel optimizer (flax 0.5.3's, deprecated there): what ``Optimizer.replicate``
  wraps the definition in. ``apply_gradient`` averages the gradients over the pmap axis
  ``axis_name`` and then runs the wrapped definition; checkpoints hold one copy.

  Use ``jax_utils.replicate(optimizer)`` and ``lax.pmean(grads, axis_name)`` to control the
  replication and the averaging explicitly instead.
  """

  def __init__(self, optimizer_def, devices=None, axis_name="batch"):
    super().__init__(optimizer_def.hyper_params)
    if devices is None:
      devices = jax.local_devices()
    self.optimizer_def = optimizer_def
    self.devices = devices
    self.axis_name = axis_name

  def init_state(self, params):
    return self.optimizer_def.init_state(params)

  def _cross_replica_mean(self, grad):
    axis_size = jax.lax.psum(1, axis_name=self.axis_name)
    return jax.lax.psum(grad, axis_name=self.axis_name) / axis_size

  def apply_gradient(self, hyper_params, params, state, grads):
    grads = jax.tree_util.tree_map(self._cross_replica_mean, grads)
    return self.optimizer_def.apply_gradient(hyper_params, params, state, grads)

  def apply_gradient_checked(self, hyper_params, params, state, grads, grad_scale=None,
                             clip_global_norm=None):
    if not hasattr(self.optimizer_def, "apply_gradient_checked"):
      raise TypeError(f"{type(self.optimizer_def).__name__} has no fused checked update; use "
                      "apply_gradient with DynamicScale.value_and_grad")
    grads = jax.tree_util.tree_map(self._cross_replica_mean, grads)
    return self.optimizer_def.apply_gradient_checked(hyper_params, params, state, grads,
                                                     grad_scale, clip_global_norm)

  def update_hyper_params(self, **hyper_param_overrides):
    return self.optimizer_def.update_hyper_params(**hyper_param_overrides)

  def state_for_target(self, target, state):
    if not _is_replicated(state):   # inside pmap: one device's copy
      return self.optimizer_def.state_for_target(target, state)
    first = unreplicate_tree(state)
    new = self.optimizer_def.state_for_target(unreplicate_tree(target), first)
    return state if new is first else replicate_tree(new, self.devices)

  def state_dict(self, target, state):
    # only the first copy of the parameters and optimizer state is stored
    if _is_replicated(state):
      target, state = unreplicate_tree((target, state))
    return self.optimizer_def.state_dict(target, state)

  def restore_state(self, opt_target, opt_state, state_dict):
    if not _is_replicated(opt_state):
      return self.optimizer_def.restore_state(opt_target, opt_state, state_dict)
    target, state = self.optimizer_def.restore_state(
        *unreplicate_tree((opt_target, opt_state)), state_dict)
    # the restored parameters and state, replicated to every device
    return replicate_tree((target, state), self.devices)
