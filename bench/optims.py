"""The optimizers benchmarked, each as the same update in every library, and its traffic model.

Hyper-parameters are chosen where fusedopt (flax 0.5.3 semantics) and optax 0.2.8 compute the
same numbers, so the bench's correctness check compares like with like; the mapping is derived
and tested in tests/test_optax_agreement.py:

  adam       fusedopt.Adam(lr, b1, b2, eps, wd)    optax.adamw(lr, b1, b2, eps, weight_decay=wd)
             (flax's ``- lr*wd*p`` on the un-updated p is adamw's decoupled decay; so is
             torch.optim.AdamW's ``p *= 1 - lr*wd`` before the Adam step)
  lamb       fusedopt.LAMB(lr, b1, b2, wd, eps)    optax.lamb(lr, b1, b2, eps, weight_decay=wd)
             (per-tensor trust ratio in both; leaves are never all-zero here, where they differ)
  momentum   fusedopt.Momentum(lr, beta, wd)       chain(add_decayed_weights(wd),
                                                         sgd(lr, momentum=beta))
             (coupled L2: wd*p joins the gradient before the trace; so does torch.optim.SGD's
             weight_decay)
  sgd        fusedopt.GradientDescent(lr)          optax.sgd(lr)
  lion       fusedopt.Lion(lr, b1, b2, wd)         optax.lion(lr, b1, b2, weight_decay=wd)
             (Chen et al. 2023; the same decoupled decay lr*wd*p; torch.optim has no Lion)
  adan       fusedopt.Adan(lr, b1, b2, b3, wd)     optax.adan(lr, b1, b2, b3, weight_decay=wd)
             (Xie et al. 2022 in optax's form: decays as betas, additive decay lr*wd*p)
  ademamix   fusedopt.AdEMAMix(lr, b1, b2, b3,     optax.contrib.ademamix(lr, b1, b2, b3, alpha,
             alpha, wd)                            weight_decay=wd)   (Pagliardini et al. 2024)
  adopt      fusedopt.ADOPT(lr, b1, b2, eps)       optax.contrib.adopt(lr, b1, b2, eps)
             (Taniguchi et al. 2024; clipping at step**0.25 in both)
  schedule-free  fusedopt.ScheduleFreeAdamW(lr, b1,  optax.contrib.schedule_free_adamw(lr, b1, b2,
             b2, wd)                               weight_decay=wd)   (Defazio et al. 2024; a
             constant learning rate, where the two read it alike)
  adafactor  fusedopt.Adafactor(lr) (defaults)     optax.adafactor(lr, decay_rate=0.8,
                                                   multiply_by_parameter_scale=True, ...)
             (same chain; flax's epsilon2 is optax's fixed 1e-3 floor, kept at its default)

The learning rate is a runtime input of every jitted step (a float32 array), as a schedule would be.

Mixed-precision variants (``MIXED_OPTIMS``; not in the default run, in ``--full`` and by name).
Each is a float32 optimizer above with one of fusedopt's mixed-precision options, on generated
trees of its ``param_dtype`` (params and grads alike: the float32 trees rounded to it):

  adam-bf16-master      Adam(master_weights=True), bf16 params and grads: the state holds a float32
                        master copy (+ float32 m, v); the bf16 params are the master rounded.
                        28 B/param: read g (2) + master, m, v (12); write master, m, v (12) +
                        the bf16 params (2; written, never read)
  adam-bf16-sr          Adam(stochastic_rounding=True), bf16 params and grads, float32 m, v; new
                        params rounded stochastically (the bits: a hash of the element's inputs).
                        22 B/param: read p, g (4) + m, v (8); write p (2) + m, v (8)
  adam-state-bf16       Adam(state_dtype=bfloat16), float32 params and grads, bf16 m, v (float32
                        math, rounded when stored). 20 B/param: read p, g (8) + m, v (4); write
                        p (4) + m, v (4)
  momentum-bf16-master  Momentum(master_weights=True), bf16 params and grads. 20 B/param: read g
                        (2) + master, m (8); write master, m (8) + bf16 params (2)
  lamb-bf16-master      LAMB(master_weights=True), bf16 params and grads. 40 B/param: pass 1
                        reads g (2) + master, m, v (12), writes m, v (8); pass 2 reads master,
                        m, v (12), writes master (4) + bf16 params (2)

Peers (``Peer``): optax has no master weights and no stochastic rounding, and torch.optim's fused
AdamW keeps bf16 moments for bf16 params and rounds to nearest, so no library runs these updates
on bf16 params. The peer rows (optax, optax-flatten, torch-*) therefore step on the inputs of the
closest formulation a library has, with their own bytes model, and the check compares them only
where formulas and precision agree:

  *-bf16-master  the peer is the same optimizer on float32 params and grads (the bf16 values
                 upcast: the same starting point): the same math in the same precision as the
                 master copy, which is how mixed-precision training keeps its weights without
                 master-weight support (flax modules with ``param_dtype=float32,
                 dtype=bfloat16`` cast inside the forward pass). Compared: the peer's params vs
                 fusedopt's float32 master, and the first moments. Chosen over
                 ``optax.adamw(mu_dtype=float32)`` on bf16 params, whose second moment is bf16
                 and whose bf16 params are rounded to nearest with no master: a different
                 algorithm (it stalls once updates fall below half a bf16 ulp). The peer moves
                 28 B/param (adam; momentum 20, lamb 40) like fusedopt, with float32 grads
                 (+2 B) and no bf16 params written (-2 B); outside the step its forward pass
                 reads float32 params and its backward pass writes float32 grads.
  adam-bf16-sr   the same float32 peer: the float32 training that stochastic rounding stands in
                 for (22 vs 28 B/param, and 4 B/param less memory than master weights). Timed,
                 not compared: bf16 params rounded stochastically are not float32 params.
  adam-state-bf16  ``optax.adamw(mu_dtype=bfloat16)`` on float32 params, optax's only
                 reduced-precision state: its second moment stays float32 (24 B/param). Timed,
                 not compared. No torch row (torch.optim.AdamW has no reduced-precision state
                 for float32 params).

Between fusedopt's backends (and the flax-loop per-leaf path of the same variant) everything is
compared: params, first moment and the float32 master where there is one; bf16 values within one
bf16 ulp (``measure.compare``'s dtype-aware tolerance), float32 ones within rtol/atol.
"""
import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax.numpy as jnp
import numpy as np
import optax

import fusedopt

LR = 1e-3


PEER_IMPLS = ("optax", "optax-flatten", "torch-fused", "torch-foreach")


@dataclasses.dataclass(frozen=True)
class Peer:
  """What the peer rows (``PEER_IMPLS``) of a mixed-precision variant run: the closest formulation
  a library has (see the module docstring), on params and grads of ``param_dtype``, moving
  ``bytes_per_param``. ``compared``: the formulas and precision agree with fusedopt's, so the
  check compares them (else ``why`` says why not, and the rows are timed only). ``optax_fn``
  replaces the optimizer's own optax spelling (None: the float32 optimizer's)."""
  param_dtype: str
  bytes_per_param: int
  label: str
  compared: bool
  why: str = ""
  optax_fn: Optional[Callable[[Any, Dict[str, Any]], optax.GradientTransformation]] = None


@dataclasses.dataclass(frozen=True)
class Optim:
  """One optimizer as each library spells it.

  ``moment``: (fusedopt state field, optax state attribute, torch state key) of the first moment,
  compared by the correctness check besides the params (None: params only). ``flat``: fusedopt
  runs it on flat buffers with a per-backend kernel (False for Adafactor, which runs per leaf on
  the tensors' own shapes whatever the backend, so one fusedopt row stands for all backends).
  ``flatten_ok``: ``optax.flatten`` keeps the algorithm (False where per-tensor statistics would
  become statistics of one global vector: LAMB's trust ratio, Adafactor's factored moments).
  Mixed precision: ``param_dtype`` of the generated params and grads, ``variant`` the fusedopt
  keyword arguments (``master_weights``, ``stochastic_rounding``, ``state_dtype`` as a dtype
  name), ``peer`` what the optax/torch rows run instead (None: the same update on the same
  inputs, compared), ``torch_why`` why there is no torch row.
  """
  name: str
  fusedopt_cls: str
  hp: Dict[str, Any]
  optax_fn: Callable[[Any, Dict[str, Any]], optax.GradientTransformation]
  bytes_per_param: Optional[int]          # None: depends on the shapes (bytes_per_step)
  bytes_note: str
  state_buffers: int = 0                  # full-size float32 state arrays (memory planning)
  moment: Optional[Tuple[str, str, str]] = None
  torch: Optional[Callable[[Dict[str, Any]], Tuple[str, Dict[str, Any]]]] = None
  flat: bool = True
  flatten_ok: bool = True
  param_dtype: str = "float32"
  variant: Dict[str, Any] = dataclasses.field(default_factory=dict)
  peer: Optional[Peer] = None
  torch_why: str = ""
  desc: str = ""                          # the variant in words (the table's heading)
  # fusedopt.tx's alias with optax_fn's arguments (the tx rows), or None where there is none
  tx_fn: Optional[Callable[[Any, Dict[str, Any]], optax.GradientTransformation]] = None

  def fusedopt_def(self, backend):
    kw = dict(self.variant)
    if "state_dtype" in kw:
      kw["state_dtype"] = jnp.dtype(kw["state_dtype"])
    return getattr(fusedopt, self.fusedopt_cls)(learning_rate=LR, backend=backend, **self.hp,
                                                **kw)

  def optax_tx(self, lr):
    fn = self.peer.optax_fn if self.peer is not None and self.peer.optax_fn else self.optax_fn
    return fn(lr, self.hp)

  def fusedopt_tx(self, lr):
    """``fusedopt.tx``'s transformation for the same update (the ``tx`` rows)."""
    return self.tx_fn(lr, self.hp)

  def torch_optimizer(self):
    """(torch.optim class name, kwargs besides lr) for the same update, or None."""
    return None if self.torch is None else self.torch(self.hp)

  @property
  def state_dtype(self):
    """The dtype fusedopt stores the optimizer's state in (float32 unless ``state_dtype``)."""
    return jnp.dtype(self.variant.get("state_dtype", "float32"))

  @property
  def master_weights(self):
    return bool(self.variant.get("master_weights"))

  def input_dtype(self, impl):
    """The dtype of the params and grads implementation ``impl`` steps on."""
    if impl in PEER_IMPLS and self.peer is not None:
      return jnp.dtype(self.peer.param_dtype)
    return jnp.dtype(self.param_dtype)

  def compared(self, impl):
    """Whether the check compares ``impl`` with the others (False: a peer of another formula)."""
    return not (impl in PEER_IMPLS and self.peer is not None and not self.peer.compared)

  def bytes_per_step(self, shapes_list, impl=None):
    """Bytes a minimal-pass implementation must move for one step over these leaves: the
    optimizer's model, or its peer's for a peer row ``impl``."""
    n = sum(int(np.prod(s, dtype=np.int64)) for s in shapes_list)
    if impl in PEER_IMPLS and self.peer is not None:
      return self.peer.bytes_per_param * n
    if self.bytes_per_param is not None:
      return self.bytes_per_param * n
    return sum(adafactor_leaf_bytes(s, **_adafactor_model_kw(self.hp)) for s in shapes_list)


def _adafactor_model_kw(hp):
  return {"factored": hp.get("factored", True), "momentum": hp.get("beta1") is not None,
          "min_dim_size_to_factor": hp.get("min_dim_size_to_factor", 128)}


def factored_dims(shape, min_dim_size_to_factor=128):
  """Adafactor's choice (flax and optax alike): the two largest axes if the second is large."""
  if len(shape) < 2:
    return None
  order = np.argsort(shape, kind="stable")
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])


def adafactor_leaf_bytes(shape, factored=True, momentum=False, min_dim_size_to_factor=128):
  """float32 bytes of one Adafactor step on one leaf, in the fewest passes its reductions allow.

  Factored leaf (n elements, r x c statistics):
    pass 1 reads p, g: row/column means of g^2 and rms(p)                 8 B/elem
    pass 2 reads g: rms of the update y = g * row_factor * col_factor     4 B/elem
             (y depends on the *new* row/column statistics of pass 1: a second pass)
    pass 3 reads p, g, writes p                                          12 B/elem
    => 24 B/elem, plus the r + c statistics read and written (negligible).
  Unfactored leaf (full second moment v):
    pass 1 reads p, g, v, writes v; v_new is element-wise, so rms(y) and rms(p) come in the
           same pass                                                      16 B/elem
    pass 2 reads p, g, v, writes p                                        16 B/elem
    => 32 B/elem.
  With momentum (beta1), pass 2/3 also reads and writes m: + 8 B/elem.
  """
  n = int(np.prod(shape, dtype=np.int64))
  dims = factored_dims(shape, min_dim_size_to_factor) if factored else None
  if dims is None:
    per = 32
    stats = 0
  else:
    per = 24
    stats = 2 * 4 * (n // shape[dims[1]] + n // shape[dims[0]])  # v_row, v_col read + written
  if momentum:
    per += 8
  return per * n + stats


def _tx():
  from fusedopt import tx  # pylint: disable=import-outside-toplevel
  return tx


def _adam_hp(wd):
  return dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd)


_ADAFACTOR_HP = dict(factored=True, multiply_by_parameter_scale=True, beta1=None, decay_rate=0.8,
                     step_offset=0, clipping_threshold=1.0, min_dim_size_to_factor=128,
                     epsilon1=1e-30)

OPTIMS = {
    "adam": Optim(
        "adam", "Adam", _adam_hp(1e-4),
        lambda lr, h: optax.adamw(lr, b1=h["beta1"], b2=h["beta2"], eps=h["eps"],
                                  weight_decay=h["weight_decay"]),
        28, "read p, g, m, v; write p, m, v", state_buffers=2,
        moment=("grad_ema", "mu", "exp_avg"),
        torch=lambda h: ("AdamW", dict(betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                                       weight_decay=h["weight_decay"])),
        tx_fn=lambda lr, h: _tx().adamw(lr, b1=h["beta1"], b2=h["beta2"], eps=h["eps"],
                                        weight_decay=h["weight_decay"])),
    "lamb": Optim(
        "lamb", "LAMB", dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=1e-2),
        lambda lr, h: optax.lamb(lr, b1=h["beta1"], b2=h["beta2"], eps=h["eps"],
                                 weight_decay=h["weight_decay"]),
        40, "pass 1 reads p, g, m, v, writes m, v (+ per-tensor norms); pass 2 reads p, m, v, "
        "writes p: the trust ratio needs the norms of the new update before any p is written",
        state_buffers=2, moment=("grad_ema", "mu", None), flatten_ok=False,
        tx_fn=lambda lr, h: _tx().lamb(lr, b1=h["beta1"], b2=h["beta2"], eps=h["eps"],
                                       weight_decay=h["weight_decay"])),
    "momentum": Optim(
        "momentum", "Momentum", dict(beta=0.9, weight_decay=1e-4),
        lambda lr, h: optax.chain(optax.add_decayed_weights(h["weight_decay"]),
                                  optax.sgd(lr, momentum=h["beta"])),
        20, "read p, g, m; write p, m", state_buffers=1,
        moment=("momentum", "trace", "momentum_buffer"),
        torch=lambda h: ("SGD", dict(momentum=h["beta"], weight_decay=h["weight_decay"]))),
    "sgd": Optim(
        "sgd", "GradientDescent", {}, lambda lr, h: optax.sgd(lr),
        12, "read p, g; write p", tx_fn=lambda lr, h: _tx().sgd(lr)),
    "lion": Optim(
        "lion", "Lion", dict(beta1=0.9, beta2=0.99, weight_decay=1e-2),
        lambda lr, h: optax.lion(lr, b1=h["beta1"], b2=h["beta2"],
                                 weight_decay=h["weight_decay"]),
        20, "read p, g, m; write p, m", state_buffers=1, moment=("grad_ema", "mu", None),
        torch_why="torch.optim has no Lion",
        tx_fn=lambda lr, h: _tx().lion(lr, b1=h["beta1"], b2=h["beta2"],
                                       weight_decay=h["weight_decay"])),
    "adan": Optim(
        "adan", "Adan", dict(beta1=0.98, beta2=0.92, beta3=0.99, weight_decay=1e-2),
        lambda lr, h: optax.adan(lr, b1=h["beta1"], b2=h["beta2"], b3=h["beta3"],
                                 weight_decay=h["weight_decay"]),
        44, "read p, g, m, v, n, g_prev; write p, m, v, n, g_prev", state_buffers=4,
        moment=("grad_ema", "m", None), torch_why="torch.optim has no Adan",
        tx_fn=lambda lr, h: _tx().adan(lr, b1=h["beta1"], b2=h["beta2"], b3=h["beta3"],
                                       weight_decay=h["weight_decay"])),
    "ademamix": Optim(
        "ademamix", "AdEMAMix", dict(beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0,
                                     weight_decay=1e-2),
        lambda lr, h: optax.contrib.ademamix(lr, b1=h["beta1"], b2=h["beta2"], b3=h["beta3"],
                                             alpha=h["alpha"], weight_decay=h["weight_decay"]),
        36, "read p, g, m1, m2, nu; write p, m1, m2, nu", state_buffers=3,
        moment=("fast_ema", "m1", None), torch_why="torch.optim has no AdEMAMix",
        tx_fn=lambda lr, h: _tx().ademamix(lr, b1=h["beta1"], b2=h["beta2"], b3=h["beta3"],
                                           alpha=h["alpha"], weight_decay=h["weight_decay"])),
    "adopt": Optim(
        "adopt", "ADOPT", dict(beta1=0.9, beta2=0.9999, eps=1e-6),
        lambda lr, h: optax.contrib.adopt(lr, b1=h["beta1"], b2=h["beta2"], eps=h["eps"]),
        28, "read p, g, m, v; write p, m, v", state_buffers=2,
        moment=("grad_ema", "mu", None), torch_why="torch.optim has no ADOPT",
        tx_fn=lambda lr, h: _tx().adopt(lr, b1=h["beta1"], b2=h["beta2"], eps=h["eps"])),
    "schedule-free": Optim(
        "schedule-free", "ScheduleFreeAdamW", dict(beta1=0.9, beta2=0.999, weight_decay=1e-2),
        lambda lr, h: optax.contrib.schedule_free_adamw(lr, b1=h["beta1"], b2=h["beta2"],
                                                        weight_decay=h["weight_decay"]),
        28, "read p, g, v, z; write p, v, z", state_buffers=2, moment=("z", "z", None),
        torch_why="torch.optim has no schedule-free AdamW",
        tx_fn=lambda lr, h: _tx().schedule_free_adamw(lr, b1=h["beta1"], b2=h["beta2"],
                                                      weight_decay=h["weight_decay"])),
    "adafactor": Optim(
        "adafactor", "Adafactor", _ADAFACTOR_HP,
        lambda lr, h: optax.adafactor(
            lr, min_dim_size_to_factor=h["min_dim_size_to_factor"], decay_rate=h["decay_rate"],
            decay_offset=h["step_offset"],
            multiply_by_parameter_scale=h["multiply_by_parameter_scale"],
            clipping_threshold=h["clipping_threshold"], momentum=h["beta1"],
            eps=h["epsilon1"], factored=h["factored"]),
        None, "per leaf, by its shape: 24 B/param factored (3 passes: statistics, update rms, "
        "apply), 32 unfactored (2 passes with v), +8 with momentum; see adafactor_leaf_bytes",
        state_buffers=1, flat=False, flatten_ok=False),
}


def _f32_peer(bytes_per_param, label, compared=True, why=""):
  return Peer("float32", bytes_per_param, label, compared, why)


_SR_WHY = ("optax and torch have no stochastic rounding: the peer is the float32 training it "
           "stands in for (float32 params and grads)")
_MASTER_NOTE = "; the bf16 params are written, never read"


def _mixed():
  a, m, l = OPTIMS["adam"], OPTIMS["momentum"], OPTIMS["lamb"]
  rep = dataclasses.replace
  return {
      "adam-bf16-master": rep(
          a, name="adam-bf16-master", param_dtype="bfloat16",
          variant=dict(master_weights=True), bytes_per_param=28,
          bytes_note="read g (bf16, 2) + master, m, v (12); write master, m, v (12) + p (bf16, "
          "2)" + _MASTER_NOTE, state_buffers=3,
          peer=_f32_peer(28, "adamw, float32 params and grads"),
          desc="Adam(master_weights=True), bfloat16 params and grads, float32 master + m, v"),
      "adam-bf16-sr": rep(
          a, name="adam-bf16-sr", param_dtype="bfloat16",
          variant=dict(stochastic_rounding=True), bytes_per_param=22,
          bytes_note="read p, g (bf16, 4) + m, v (8); write p (bf16, 2) + m, v (8); the random "
          "bits are a hash of the element's inputs: no extra traffic",
          peer=_f32_peer(28, "adamw, float32 params and grads", False, _SR_WHY),
          desc="Adam(stochastic_rounding=True), bfloat16 params and grads, float32 m, v"),
      "adam-state-bf16": rep(
          a, name="adam-state-bf16", variant=dict(state_dtype="bfloat16"), bytes_per_param=20,
          bytes_note="read p, g (8) + m, v (bf16, 4); write p (4) + m, v (bf16, 4)",
          peer=Peer("float32", 24, "adamw(mu_dtype=bfloat16), float32 params: bf16 m, float32 v",
                    False, "optax's only reduced-precision Adam state is mu_dtype: its second "
                    "moment stays float32",
                    optax_fn=lambda lr, h: optax.adamw(
                        lr, b1=h["beta1"], b2=h["beta2"], eps=h["eps"],
                        weight_decay=h["weight_decay"], mu_dtype=jnp.bfloat16)),
          torch=None, torch_why="torch.optim.AdamW has no reduced-precision state for float32 "
          "params", desc="Adam(state_dtype=bfloat16), float32 params and grads, bfloat16 m, v"),
      "momentum-bf16-master": rep(
          m, name="momentum-bf16-master", param_dtype="bfloat16",
          variant=dict(master_weights=True), bytes_per_param=20,
          bytes_note="read g (bf16, 2) + master, m (8); write master, m (8) + p (bf16, 2)"
          + _MASTER_NOTE, state_buffers=2,
          peer=_f32_peer(20, "add_decayed_weights + sgd(momentum), float32 params and grads"),
          desc="Momentum(master_weights=True), bfloat16 params and grads, float32 master + m"),
      "lamb-bf16-master": rep(
          l, name="lamb-bf16-master", param_dtype="bfloat16",
          variant=dict(master_weights=True), bytes_per_param=40,
          bytes_note="pass 1 reads g (bf16, 2) + master, m, v (12), writes m, v (8) (+ "
          "per-tensor norms); pass 2 reads master, m, v (12), writes master (4) + p (bf16, 2)",
          state_buffers=3,
          peer=_f32_peer(40, "lamb, float32 params and grads"),
          desc="LAMB(master_weights=True), bfloat16 params and grads, float32 master + m, v"),
  }


MIXED_OPTIMS = ("adam-bf16-master", "adam-bf16-sr", "adam-state-bf16", "momentum-bf16-master",
                "lamb-bf16-master")
OPTIMS.update(_mixed())
DEFAULT_OPTIMS = ("adam", "momentum", "lamb")
FULL_OPTIMS = (("adam", "lamb", "momentum", "adafactor", "lion", "adan", "ademamix", "adopt",
                "schedule-free")
               + MIXED_OPTIMS)
