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
  adafactor  fusedopt.Adafactor(lr) (defaults)     optax.adafactor(lr, decay_rate=0.8,
                                                   multiply_by_parameter_scale=True, ...)
             (same chain; flax's epsilon2 is optax's fixed 1e-3 floor, kept at its default)

The learning rate is a runtime input of every jitted step (a float32 array), as a schedule would be.
"""
import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import optax

import fusedopt

LR = 1e-3


@dataclasses.dataclass(frozen=True)
class Optim:
  """One optimizer as each library spells it.

  ``moment``: (fusedopt state field, optax state attribute, torch state key) of the first moment,
  compared by the correctness check besides the params (None: params only). ``flat``: fusedopt
  runs it on flat buffers with a per-backend kernel (False for Adafactor, which runs per leaf on
  the tensors' own shapes whatever the backend, so one fusedopt row stands for all backends).
  ``flatten_ok``: ``optax.flatten`` keeps the algorithm (False where per-tensor statistics would
  become statistics of one global vector: LAMB's trust ratio, Adafactor's factored moments).
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

  def fusedopt_def(self, backend):
    return getattr(fusedopt, self.fusedopt_cls)(learning_rate=LR, backend=backend, **self.hp)

  def optax_tx(self, lr):
    return self.optax_fn(lr, self.hp)

  def torch_optimizer(self):
    """(torch.optim class name, kwargs besides lr) for the same update, or None."""
    return None if self.torch is None else self.torch(self.hp)

  def bytes_per_step(self, shapes_list):
    """Bytes a minimal-pass float32 implementation must move for one step over these leaves."""
    if self.bytes_per_param is not None:
      return self.bytes_per_param * sum(int(np.prod(s, dtype=np.int64)) for s in shapes_list)
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
                                       weight_decay=h["weight_decay"]))),
    "lamb": Optim(
        "lamb", "LAMB", dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=1e-2),
        lambda lr, h: optax.lamb(lr, b1=h["beta1"], b2=h["beta2"], eps=h["eps"],
                                 weight_decay=h["weight_decay"]),
        40, "pass 1 reads p, g, m, v, writes m, v (+ per-tensor norms); pass 2 reads p, m, v, "
        "writes p: the trust ratio needs the norms of the new update before any p is written",
        state_buffers=2, moment=("grad_ema", "mu", None), flatten_ok=False),
    "momentum": Optim(
        "momentum", "Momentum", dict(beta=0.9, weight_decay=1e-4),
        lambda lr, h: optax.chain(optax.add_decayed_weights(h["weight_decay"]),
                                  optax.sgd(lr, momentum=h["beta"])),
        20, "read p, g, m; write p, m", state_buffers=1,
        moment=("momentum", "trace", "momentum_buffer"),
        torch=lambda h: ("SGD", dict(momentum=h["beta"], weight_decay=h["weight_decay"]))),
    "sgd": Optim(
        "sgd", "GradientDescent", {}, lambda lr, h: optax.sgd(lr),
        12, "read p, g; write p"),
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
DEFAULT_OPTIMS = ("adam", "momentum", "lamb")
FULL_OPTIMS = ("adam", "lamb", "momentum", "adafactor")
