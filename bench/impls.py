"""The implementations compared, for any optimizer in bench/optims.py.

  optax          the optax transformation per leaf (optax's usual use)
  optax-flatten  ``optax.flatten(tx)``: optax on one raveled vector (skipped where flattening
                 changes the algorithm: LAMB, Adafactor)
  flax-loop      flax 0.5.3's ``OptimizerDef.apply_gradient``: a Python loop over the leaves
                 calling ``apply_param_gradient`` with per-leaf state (fusedopt keeps this path
                 for user subclasses; its per-leaf rules are the flat path's)
  auto, native, jnp, pallas, triton
                 fusedopt's flat buffers with that backend (``auto`` = native on CPU, per group
                 jnp/pallas on GPU; ``triton`` = the jax-triton kernels, CUDA only); one row for
                 Adafactor, which runs per leaf on every backend. A backend that cannot run here
                 (``fusedopt.available_backends()``: pallas/triton on CPU, native on GPU) is
                 skipped, with the reason in the results
  tx             ``fusedopt.tx``'s alias (optax's state) + ``optax.apply_updates``: optax's two calls
  tx-onepass     ``fusedopt.tx.update_and_apply``: the same state, the new params in one pass
                 (``fusedopt.training.TrainState.apply_gradients``' step)
  torch-fused, torch-foreach
                 ``torch.optim.AdamW`` / ``SGD`` with ``fused=True`` / ``foreach=True``, only where
                 torch with CUDA is importable (adam and momentum)

A JAX implementation has a step function whose first ``n_carry`` arguments are the donated
training state and whose last two are the gradient tree and the learning rate (a float32 array,
so a runtime value everywhere); it returns the new carry. ``moment_of`` gives the optimizer's first
state field (Adam's m, Momentum's trace) as one host vector in leaf order, for the check;
``master_of`` the float32 master copy of a ``master_weights`` variant as host leaves in leaf order.

Mixed-precision variants (bench/optims.py): fusedopt rows and flax-loop step on params and grads
of the variant's ``param_dtype``; the peer rows (optax, optax-flatten, torch-*) on their
``Peer``'s (``Optim.input_dtype``), the same values upcast.
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fusedopt
from fusedopt.base import OptimizerDef, OptimizerState
from fusedopt.flat_state import ParamState

from . import optims, trees

FUSEDOPT_BACKENDS = ("auto", "native", "jnp", "pallas", "mosaic_gpu", "triton")
# Where the torch rows run. Only CUDA is benchmarked (torch_cuda gates them); the tests point it
# at "cpu" to check the torch runner against fusedopt where torch has no GPU.
TORCH_DEVICE = "cuda"
TORCH_IMPLS = ("torch-fused", "torch-foreach")
TX_IMPLS = ("tx", "tx-onepass")
ALL_IMPLS = ("optax", "optax-flatten", "flax-loop") + FUSEDOPT_BACKENDS + TX_IMPLS + TORCH_IMPLS


def torch_cuda():
  """True when torch with a CUDA device is importable (the torch rows run only then)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    return bool(torch.cuda.is_available())
  except Exception:  # pylint: disable=broad-except
    return False


def default_impls():
  """Every peer plus every fusedopt backend that runs here compiled (not interpreted).

  On CPU ``native`` is left out: ``auto`` is native there (its own row would time the same
  code twice); name it in ``--impls`` to see both.
  """
  avail = fusedopt.available_backends()
  out = ["optax", "optax-flatten", "flax-loop", "auto", "tx", "tx-onepass"]
  out += [b for b in ("jnp", "pallas", "mosaic_gpu", "triton") if b in avail]
  if jax.default_backend() != "cpu" and "native" in avail:
    out.append("native")
  if torch_cuda():
    out += list(TORCH_IMPLS)
  return tuple(out)


def for_optim(optim, names):
  """The implementations of ``names`` that apply to ``optim``: (kept, {skipped name: why})."""
  kept, skipped = [], {}
  fused_seen = None
  avail = fusedopt.available_backends() if any(
      n in FUSEDOPT_BACKENDS and n != "auto" for n in names) else ()
  for n in names:
    if n == "optax-flatten" and not optim.flatten_ok:
      skipped[n] = "optax.flatten would turn per-tensor statistics into global ones"
    elif n == "flax-loop" and not optim.flat:
      skipped[n] = "fusedopt runs this optimizer per leaf already (the same code)"
    elif n in TX_IMPLS and (optim.tx_fn is None or optim.variant):
      skipped[n] = f"fusedopt.tx has no alias for {optim.name} with these semantics"
    elif n in TORCH_IMPLS and optim.torch is None:
      skipped[n] = optim.torch_why or f"torch.optim has no {optim.name} with these semantics"
    elif n in FUSEDOPT_BACKENDS and not optim.flat and fused_seen:
      skipped[n] = f"runs per leaf on every backend: the {fused_seen!r} row stands for it"
    elif n in FUSEDOPT_BACKENDS and n != "auto" and n not in avail:
      skipped[n] = (f"backend {n!r} cannot run here (jax backend {jax.default_backend()!r}; "
                    f"available: {', '.join(avail)})")
    else:
      kept.append(n)
      if n in FUSEDOPT_BACKENDS:
        fused_seen = n
  return kept, skipped


def _flat_host(tree):
  """A tree's leaves raveled into one host vector, in ``tree_leaves`` order (``optax.flatten``'s
  order too), so per-leaf, flat-buffer and raveled states compare element by element."""
  leaves = [np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(tree)]
  return np.concatenate(leaves) if leaves else np.zeros((0,), np.float32)


def _find(state, attr):
  """The first node of an optax state having ``attr`` (ScaleByAdamState.mu, TraceState.trace)."""
  found = []

  def visit(x):
    if hasattr(x, attr) and not found:
      found.append(getattr(x, attr))
    return x
  jax.tree_util.tree_map(visit, state, is_leaf=lambda x: hasattr(x, attr))
  return found[0] if found else None


class JaxImpl:
  """Common parts of the JAX implementations."""
  kind = "jax"
  n_carry = 1

  def __init__(self, name, optim):
    self.name = name
    self.optim = optim

  def moment_of(self, carry):
    return None

  def master_of(self, carry):
    return None


class Optax(JaxImpl):
  """The optax transformation per leaf. It is built inside the jitted step with the traced
  learning rate (its state does not depend on it), so lr is a runtime input as for fusedopt."""
  n_carry = 2

  def __init__(self, optim, flatten=False):
    super().__init__("optax-flatten" if flatten else "optax", optim)
    self.flatten = flatten
    if optim.peer is None:
      self.label = f"optax.flatten({optim.name})" if flatten else f"optax {optim.name} (per-leaf)"
    else:  # a mixed-precision variant's peer: its formulation and its bytes model
      what, bpp = optim.peer.label, optim.peer.bytes_per_param
      self.label = (f"optax.flatten({what}; {bpp} B/param)" if flatten else
                    f"optax {what} (per-leaf; {bpp} B/param)")

  def _tx(self, lr):
    tx = self.optim.optax_tx(lr)
    return optax.flatten(tx) if self.flatten else tx

  def step(self, params, opt_state, grads, lr):
    updates, opt_state = self._tx(lr).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def init(self, params):
    # jit: eager tx.init on thousands of distinct shapes would compile one op per shape.
    return params, jax.jit(self._tx(optims.LR).init)(params)

  @staticmethod
  def params_of(carry):
    return carry[0]

  def moment_of(self, carry):
    if self.optim.moment is None:
      return None
    m = _find(carry[1], self.optim.moment[1])
    return None if m is None else _flat_host(m)


class Tx(Optax):
  """``fusedopt.tx``'s alias, optax's state: ``update`` + ``apply_updates`` (``tx``) or
  ``update_and_apply`` (``tx-onepass``)."""

  def __init__(self, optim, one_pass):
    JaxImpl.__init__(self, "tx-onepass" if one_pass else "tx", optim)
    self.flatten, self.one_pass = False, one_pass
    self.label = (f"fusedopt.tx {optim.name} " +
                  ("update_and_apply (one pass)" if one_pass else "update + apply_updates"))

  def _tx(self, lr):
    return self.optim.fusedopt_tx(lr)

  def step(self, params, opt_state, grads, lr):
    t = self._tx(lr)
    if self.one_pass:
      from fusedopt import tx  # pylint: disable=import-outside-toplevel
      return tx.update_and_apply(t, grads, opt_state, params)
    updates, opt_state = t.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


class FlaxLoop(JaxImpl):
  """flax 0.5.3's per-leaf loop: ``OptimizerDef.apply_gradient`` (the base class's, not the flat
  override) over per-leaf state ``tree_map(init_param_state, params)``."""
  n_carry = 2

  def __init__(self, optim):
    super().__init__("flax-loop", optim)
    self.label = f"flax 0.5.3-style per-leaf loop ({optim.fusedopt_cls})"
    self.opt_def = optim.fusedopt_def("jnp")

  def step(self, params, state, grads, lr):
    hp = self.opt_def.hyper_params.replace(learning_rate=lr)
    return OptimizerDef.apply_gradient(self.opt_def, hp, params, state, grads)

  def init(self, params):
    per_leaf = jax.jit(lambda p: jax.tree_util.tree_map(self.opt_def.init_param_state, p))(params)
    return params, OptimizerState(jnp.asarray(0, jnp.int32), per_leaf)

  @staticmethod
  def params_of(carry):
    return carry[0]

  def moment_of(self, carry):
    if self.optim.moment is None:
      return None
    field = self.optim.moment[0]
    is_state = lambda x: isinstance(x, (dict, ParamState)) and field in x
    return _flat_host(jax.tree_util.tree_map(lambda s: s[field], carry[1].param_states,
                                             is_leaf=is_state))

  def master_of(self, carry):
    if not self.optim.master_weights:
      return None
    is_state = lambda x: isinstance(x, (dict, ParamState)) and "master" in x
    return [np.asarray(s["master"]) for s in jax.tree_util.tree_leaves(
        carry[1].param_states, is_leaf=is_state)]


class Fusedopt(JaxImpl):
  """``fusedopt.<Optim>(...).create(params)``, stepped with
  ``apply_gradient(g, learning_rate=lr)``."""

  def __init__(self, backend, optim):
    super().__init__(backend, optim)
    self.backend = backend
    self.opt_def = optim.fusedopt_def(backend)
    self.label = (f"fusedopt {optim.fusedopt_cls} backend={backend!r}" if optim.flat else
                  f"fusedopt {optim.fusedopt_cls} (per-leaf on every backend)")

  @staticmethod
  def step(opt, grads, lr):
    return opt.apply_gradient(grads, learning_rate=lr)

  def init(self, params):
    # Optimizer is a pytree, so create() runs under jit (one compile for the whole tree).
    return (jax.jit(self.opt_def.create)(params),)

  @staticmethod
  def params_of(carry):
    return carry[0].target

  def moment_of(self, carry):
    """The first state field in leaf order, sliced out of the flat buffers in numpy (eager
    per-leaf slicing on device would compile once per shape)."""
    if self.optim.moment is None or not self.optim.flat:
      return None
    st = carry[0].state.param_states
    layout = st.layout
    bufs = [np.asarray(b) for b in st.fields[self.optim.moment[0]]]
    return np.concatenate([bufs[s.group][s.offset:s.offset + s.size] for s in layout.segments])

  def master_of(self, carry):
    """The float32 master copy (``master_weights`` variants), one host array per leaf."""
    if not self.optim.master_weights:
      return None
    st = carry[0].state.param_states
    bufs = [np.asarray(b) for b in st.fields["master"]]
    return [bufs[s.group][s.offset:s.offset + s.size].reshape(s.shape)
            for s in st.layout.segments]


def make(name, optim):
  """The JAX implementation ``name`` of ``optim`` (torch ones: ``TorchRunner``)."""
  if name in ("optax", "optax-flatten"):
    return Optax(optim, flatten=name == "optax-flatten")
  if name == "flax-loop":
    return FlaxLoop(optim)
  if name in TX_IMPLS:
    return Tx(optim, one_pass=name == "tx-onepass")
  if name in FUSEDOPT_BACKENDS:
    return Fusedopt(name, optim)
  raise ValueError(f"unknown implementation {name!r}; expected one of {ALL_IMPLS}")


def cast(tree, dtype):
  """A host tree with every leaf in ``dtype`` (leaves already in it are kept, not copied)."""
  dtype = np.dtype(dtype)
  return jax.tree_util.tree_map(lambda x: x if x.dtype == dtype else x.astype(dtype), tree)


class Inputs:
  """The params (host) and grads (device) each implementation of ``optim`` steps on.

  The seeded float32 trees (params N(0, 0.02^2), grads N(0, 0.01^2)) rounded to the optimizer's
  ``param_dtype``; a peer row stepping on another dtype (``Optim.input_dtype``) gets those values
  converted (for the float32 peers of the bf16 variants: upcast, the same starting point). One
  copy per dtype, built when first asked for."""

  def __init__(self, shapes, optim):
    self.optim = optim
    dt = np.dtype(optim.param_dtype)
    self.p0 = cast(trees.host_tree(shapes, seed=0, scale=0.02), dt)
    self._g = cast(trees.host_tree(shapes, seed=1, scale=0.01), dt)
    self._by_dtype = {}

  def for_impl(self, name):
    """(params host tree, grads device tree) for implementation ``name``."""
    dt = np.dtype(self.optim.input_dtype(name))
    if dt not in self._by_dtype:
      self._by_dtype[dt] = (cast(self.p0, dt), jax.device_put(cast(self._g, dt)))
    return self._by_dtype[dt]


def lr_array():
  return jnp.asarray(optims.LR, jnp.float32)


class TorchRunner:
  """``torch.optim.AdamW`` / ``SGD`` with ``fused=True`` or ``foreach=True`` on CUDA tensors, with
  the ``measure.Runner`` interface (compile is a no-op; the grads stay set, as the JAX runners
  reuse theirs). Leaves are kept in ``tree_leaves`` order for the check."""
  kind = "torch"

  def __init__(self, name, optim, params_host, grads_host):
    import torch  # pylint: disable=import-outside-toplevel
    self.torch = torch
    self.impl = self
    self.name = name
    self.optim = optim
    mode = name.split("-", 1)[1]  # fused / foreach
    cls, kw = optim.torch_optimizer()
    self.label = f"torch.optim.{cls}({mode}=True)" + (
        f", {optim.peer.param_dtype} params ({optim.peer.bytes_per_param} B/param)"
        if optim.peer is not None else "")
    self.times, self.info = [], {}
    t = time.perf_counter()
    leaves, self.treedef = jax.tree_util.tree_flatten(params_host)
    dev = TORCH_DEVICE
    self.params = [torch.nn.Parameter(torch.tensor(np.array(x), device=dev)) for x in leaves]
    for p, g in zip(self.params, jax.tree_util.tree_leaves(grads_host)):
      p.grad = torch.tensor(np.array(g), device=dev)
    self.opt = getattr(torch.optim, cls)(self.params, lr=optims.LR, **kw, **{mode: True})
    self._sync()
    self.info.update(init_s=time.perf_counter() - t, trace_s=0.0, lower_s=0.0, compile_s=0.0,
                     trace_compile_s=0.0, temp_bytes=0, hlo=None)

  def _sync(self):
    if TORCH_DEVICE == "cuda":
      self.torch.cuda.synchronize()

  def compile(self):
    pass

  def sync_step(self):
    self.opt.step()
    self._sync()

  def timed_step(self):
    t = time.perf_counter()
    self.opt.step()
    self._sync()
    dt = time.perf_counter() - t
    self.times.append(dt)
    return dt

  def params_host(self):
    return jax.tree_util.tree_unflatten(self.treedef,
                                        [p.detach().cpu().numpy() for p in self.params])

  def master_host(self):
    return None

  def moment_host(self):
    key = self.optim.moment[2] if self.optim.moment else None
    if key is None:
      return None
    return np.concatenate([self.opt.state[p][key].detach().cpu().numpy().ravel()
                           for p in self.params])

  def close(self):
    self.opt = self.params = None
    if TORCH_DEVICE == "cuda":
      self.torch.cuda.empty_cache()


@functools.lru_cache(maxsize=None)
def torch_version():
  try:
    import torch  # pylint: disable=import-outside-toplevel
    return torch.__version__
  except Exception:  # pylint: disable=broad-except
    return None
