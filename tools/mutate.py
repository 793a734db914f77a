#!/usr/bin/env python3
"""Mutation check: do the tests catch the bugs they claim to catch?

Each entry of ``MUTANTS`` is one targeted bug -- a text substitution in one library file -- and
the short pytest selection that must catch it. The script copies the repository's working tree
(tracked and untracked-but-not-ignored files, as they are on disk) to a temporary directory,
then for each mutant applies the substitution in that copy, runs the selection there with
``-x``, and restores the file. Nothing in the checkout itself is ever written.

    python tools/mutate.py            # every mutant; exit status 0 only if every one is caught
    python tools/mutate.py --list     # the mutants, their files and test selections
    python tools/mutate.py lars_no_clamp adam_eps_inside_sqrt     # some of them

Before the mutants, each distinct selection is run once on the unmodified copy (the baseline):
a selection that fails without a bug would "catch" every mutant, so the script stops there
(exit status 2). ``--no-baseline`` skips that.

The copy imports its own code: pytest runs from the copy's root with ``PYTHONPATH`` set to it
(the checkout's editable install would otherwise supply ``fusedopt``), ``fusedopt/kernels`` is
linked to ``kernels/`` as the install maps it, and before collecting anything the runner checks
that ``fusedopt`` and ``fusedopt.kernels`` were imported from the copy. Bytecode is not written
(a restored file could otherwise meet a stale .pyc of its mutant).

Run it before resolving an issue that touches the math (any rule, scalar, norm or guard): every
mutant must be caught. A new kind of bug found by hand belongs in ``MUTANTS``, with the test that
now catches it.
"""
import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str                 # relative to the repository root
  old: str                  # must occur exactly once in the file
  new: str
  tests: Tuple[str, ...]    # pytest arguments (files, -k expressions); -x is added
  what: str


def _k(files, expr):
  return tuple(files) + ("-k", expr)


NUMERICS = ("tests/test_numerics.py",)

MUTANTS = [
    Mutant("adam_wrong_beta_in_m", "fusedopt/adam.py",
           "    m = s.b1 * m + s.one_minus_b1 * g\n", "    m = s.b2 * m + s.one_minus_b1 * g\n",
           _k(NUMERICS, "test_optimizer_matches_reference and Adam and jnp-jit"),
           "Adam's first moment decays with beta2"),
    Mutant("bias_correction_off_by_one", "fusedopt/flat.py",
           "  t = jnp.asarray(step, F32) + 1.0\n", "  t = jnp.asarray(step, F32) + 2.0\n",
           _k(NUMERICS, "bias_correction"),
           "1 - beta**(t+1) instead of 1 - beta**t (Adam, LAMB, AdaBelief)"),
    Mutant("adam_eps_inside_sqrt", "fusedopt/adam.py",
           "(xp.sqrt(v_hat(s, v)) + s.eps)", "xp.sqrt(v_hat(s, v) + s.eps)",
           _k(NUMERICS, "test_optimizer_matches_reference and Adam and jnp-jit"),
           "Adam's eps under the square root"),
    Mutant("adam_decay_of_new_param", "fusedopt/adam.py",
           "    return new_p - s.lr_wd * p, (m, v)\n",
           "    return new_p - s.lr_wd * new_p, (m, v)\n",
           _k(NUMERICS, "test_optimizer_matches_reference and Adam and jnp-jit"),
           "Adam's weight decay applied to the updated param instead of the old one"),
    # the static variants fusedopt.tx runs (optax's forms), in the optimizers' own modules
    Mutant("tx_nadam_bias_correction_of_this_step", "fusedopt/adam.py",
           "s.b1 * (m / s.bias_corr1_next)", "s.b1 * (m / s.bias_corr1)",
           _k(("tests/test_tx.py",), "agrees_with_optax and nadamw"),
           "adam_rule(nesterov=True): Nadam's look-ahead m_hat with 1 - b1^t, not 1 - b1^(t+1)"),
    Mutant("tx_adam_eps_root_dropped", "fusedopt/adam.py",
           "v / s.bias_corr2 + s.eps_root if eps_root", "v / s.bias_corr2 if eps_root",
           _k(("tests/test_tx.py",), "agrees_with_optax and adam_eps_root"),
           "adam_rule(eps_root=True) (tx.adam(eps_root=...)) ignores eps_root"),
    Mutant("tx_rmsprop_eps_outside_sqrt", "fusedopt/rmsprop.py",
           "(g / xp.sqrt(w() + s.eps))", "(g / (xp.sqrt(w()) + s.eps))",
           _k(("tests/test_tx.py",), "agrees_with_optax and rmsprop"),
           "rmsprop_rule(eps_in_sqrt=True) (tx.rmsprop's default) with eps outside the root"),
    Mutant("tx_adagrad_eps_outside_sqrt", "fusedopt/adagrad.py",
           "g / xp.sqrt(acc + s.eps)", "g / (xp.sqrt(acc) + s.eps)",
           _k(("tests/test_tx.py",), "agrees_with_optax and adagrad"),
           "adagrad_rule(eps_in_sqrt=True) (tx.adagrad) with eps outside the root"),
    Mutant("momentum_ignores_nesterov", "fusedopt/momentum.py",
           "    d = g + s.beta * m if nesterov else m\n", "    d = m\n",
           _k(NUMERICS, "test_optimizer_matches_reference and Momentum and jnp-jit"),
           "Momentum(nesterov=True) runs plain momentum"),
    Mutant("rmsprop_centered_sign", "fusedopt/rmsprop.py",
           "else v - xp.abs_sq(mg)", "else v + xp.abs_sq(mg)",
           _k(NUMERICS, "test_optimizer_matches_reference and RMSProp and jnp-jit"),
           "centered RMSProp adds mg^2 instead of subtracting it"),
    Mutant("lamb_flax053_zero_norm_rule", "fusedopt/norms.py",
           "  ok = (num > 0) & (den > 0)\n  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 1.0)\n",
           "  return jnp.where(num + den > 0, num / den, 1.0)\n",
           _k(NUMERICS, "zero_norm and LAMB and jnp-jit"),
           "LAMB's trust ratio with flax 0.5.3's where(|p|+|u| > 0, |p|/|u|, 1): NaN for a zero "
           "update, 0 for a zero-initialised tensor"),
    Mutant("tx_lamb_flax053_zero_norm_rule", "fusedopt/norms.py",
           "  ok = (num > 0) & (den > 0)\n  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 1.0)\n",
           "  return jnp.where(num + den > 0, num / den, 1.0)\n",
           _k(("tests/test_tx.py",), "zero_norm and lamb]"),
           "the same, seen through fusedopt.tx.lamb (against optax)"),
    Mutant("lamb_clamp_only_update_norm", "fusedopt/norms.py",
           "  ok = (num > 0) & (den > 0)\n", "  ok = den > 0\n",
           _k(NUMERICS, "zero_norm and LAMB and jnp-jit"),
           "LAMB's trust ratio 0 (not 1) for a zero-initialised tensor: it never trains"),
    Mutant("lamb_decay_missing", "fusedopt/lamb.py",
           "(xp.sqrt(v_hat(s, v)) + s.eps) + s.wd * p", "(xp.sqrt(v_hat(s, v)) + s.eps)",
           _k(NUMERICS, "test_optimizer_matches_reference and LAMB and jnp-jit"),
           "LAMB's update without the weight-decay term"),
    Mutant("lars_no_clamp", "fusedopt/lars.py",
           "jnp.where((gn == 0.) | (pn == 0.), 1., ratio)", "ratio",
           _k(NUMERICS, "zero_norm and LARS and jnp-jit"),
           "LARS without the trust-ratio clamp: a zero tensor never moves, 0/0 = NaN"),
    Mutant("lars_clamp_only_grad_norm", "fusedopt/lars.py",
           "(gn == 0.) | (pn == 0.)", "(gn == 0.)",
           _k(NUMERICS, "zero_norm and LARS and jnp-jit"),
           "LARS's trust ratio 0 for a zero-initialised tensor"),
    Mutant("lars_clamp_only_param_norm", "fusedopt/lars.py",
           "(gn == 0.) | (pn == 0.)", "(pn == 0.)",
           _k(NUMERICS, "zero_norm and LARS and jnp-jit"),
           "LARS's trust ratio not 1 for zero gradients (inf, or tc/wd)"),
    Mutant("lars_decay_missing_from_ratio", "fusedopt/lars.py",
           "gn, gn + hp.weight_decay * pn + hp.eps)", "gn, gn + hp.eps)",
           _k(NUMERICS, "test_optimizer_matches_reference and LARS and jnp-jit"),
           "LARS's trust ratio without the wd * ||p|| term"),
    Mutant("tx_lars_no_clamp", "fusedopt/lars.py",
           "jnp.where((gn == 0.) | (pn == 0.), 1., ratio)", "ratio",
           _k(("tests/test_tx.py",), "zero_norm and not lamb]"),
           "fusedopt.tx.lars (optax's denominator, lars.trust_ratio's clamp) without the clamp"),
    Mutant("adafactor_ignores_step_offset", "fusedopt/adafactor.py",
           "t = jnp.asarray(step - hp.step_offset, F32) + 1.0", "t = jnp.asarray(step, F32) + 1.0",
           _k(NUMERICS, "step_offset_positive and jnp"),
           "Adafactor's decay schedule ignores step_offset (a restored step count)"),
    Mutant("master_weights_from_rounded_param", "fusedopt/elementwise.py",
           "    del p\n    *st, master = state\n    new_master, new_st = fn(xp, s, q, master, g, *st)\n",
           "    *st, master = state\n    new_master, new_st = fn(xp, s, q, p, g, *st)\n",
           ("tests/test_master_weights.py::test_small_updates_are_not_lost",),
           "master weights: the update reads the rounded bf16 param instead of the float32 master"),
    Mutant("skipped_step_still_writes", "fusedopt/elementwise.py",
           "    keep = lambda new, old: old if new is old else xp.where(s.ok, new, old)  # noqa: E731\n",
           "    keep = lambda new, old: new  # noqa: E731\n",
           _k(("tests/test_checked_update.py",), "non_finite and Adam-jnp"),
           "apply_gradient_checked: a non-finite step still writes params and state"),
    Mutant("clip_factor_inverted", "fusedopt/norms.py",
           "jnp.where(norm < max_norm, F32(1.0), max_norm / norm)",
           "jnp.where(norm < max_norm, F32(1.0), norm / max_norm)",
           _k(("tests/test_checked_update.py",), "clip_matches and Adam-jnp"),
           "clip_global_norm scales by norm/max instead of max/norm"),
    Mutant("stochastic_rounding_to_nearest", "fusedopt/elementwise.py",
           "    rounded = xp.from_bits((x + u) & _U32(0xFFFF0000))\n",
           "    rounded = xp.from_bits((x + _U32(0x8000)) & _U32(0xFFFF0000))\n",
           ("tests/test_stochastic_rounding.py::"
            "test_rounds_up_with_probability_equal_to_the_fraction",),
           "stochastic rounding that always rounds half up (biased, deterministic)"),
    Mutant("bf16_adam_step_is_a_no_op", "fusedopt/adam.py",
           "    return new_p - s.lr_wd * p, (m, v)\n", "    return p, (m, v)\n",
           ("tests/test_checkpoints.py::"
            "test_flax_053_adam_checkpoint_of_bf16_params_restores_and_trains",),
           "an Adam step that leaves the params unchanged (the bf16 checkpoint test must see it)"),
    # issue 14: the native kernels' CPU independence, the cache, the step plumbing
    Mutant("native_fma_contraction", "kernels/native.py",
           '"-ffp-contract=off"', '"-ffp-contract=fast"',
           _k(("tests/test_native_bitwise.py",), "adam-float32 or adadelta-float32"),
           "native kernels contract a*b+c into FMAs again (results depend on the CPU)"),
    Mutant("native_sums_in_any_order", "kernels/native.py",
           "acc{t}[l] += {v.name} * {v.name};", "acc{t}[0] += {v.name} * {v.name};",
           _k(("tests/test_native_bitwise.py",), "lamb_moments-float32-state_float32"),
           "per-tensor sums of squares not in the documented lane order"),
    Mutant("native_loads_unverified_library", "kernels/native.py",
           "      if not _verified(so):\n        _build(src, so)",
           "      if not os.path.exists(so):\n        _build(src, so)",
           ("tests/test_native_cache.py::test_truncated_library_is_rebuilt_not_loaded",),
           "a truncated library in the cache is loaded (SIGBUS)"),
    Mutant("global_norm_overflows", "fusedopt/norms.py",
           "  return jnp.where(jnp.isinf(sq), jnp.sqrt(sq_small) / _SMALL, jnp.sqrt(sq))",
           "  return jnp.sqrt(sq)",
           _k(("tests/test_checked_update.py",), "overflows and jnp"),
           "finite gradients whose sum of squares overflows are skipped, not clipped"),
    Mutant("exact_float_complement_from_float32", "fusedopt/exact_float.py",
           "      return jnp.asarray(self.one_minus, F32)",
           "      return F32(1.0) - jnp.asarray(self.hi, F32)",
           _k(("tests/test_api.py",), "python_float and Adam"),
           "an eager Python-float beta loses its float64 complement (1 - beta)"),
    Mutant("replace_target_keeps_stale_master", "fusedopt/flat.py",
           "    return state.replace(param_states=state.param_states.with_master_from(target))",
           "    return state",
           _k(("tests/test_target_edits.py",), "resyncs and jnp"),
           "opt.replace(target=...) leaves the float32 master as it was"),
    Mutant("layout_always_1024", "fusedopt/layout.py",
           "  while a > 1 and sum(_round_up(n, a) - n for n in sizes) > budget:",
           "  while False:",
           _k(("tests/test_state_memory.py",), "many_scalars"),
           "every leaf padded to 1024 elements whatever the tree"),
    Mutant("sr_hashes_state_low_bits", "fusedopt/elementwise.py",
           "tuple(xp.bits(v) & _U32(0xFFFF0000) for v in state)",
           "tuple(xp.bits(v) for v in state)",
           ("tests/test_bench.py::test_mixed_precision_variants",),
           "stochastic rounding hashes the state's low bits (native and jnp diverge)"),
    # not library code: the test suite's own rule that CI=true turns skips into failures
    Mutant("ci_skips_stay_skips", "tests/conftest.py",
           'CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")\n',
           "CI = False\n",
           ("tests/test_ci_policy.py",),
           "under CI=true a missing tool or venv skips instead of failing"),
    Mutant("ci_module_skip_stays_skip", "tests/conftest.py",
           "  if CI and rep.skipped:\n    _fail_skip(rep)\n", "  del rep\n",
           ("tests/test_ci_policy.py",),
           "under CI=true a module-level importorskip still skips the whole file"),
    Mutant("ci_remembers_failed_flax053_venv", "tests/flax053_env.py",
           ' and not _ci()):', '):',
           ("tests/test_ci_policy.py",),
           "under CI=true a failed flax 0.5.3 venv build is remembered for an hour (not retried)"),
    Mutant("h100_topology_errors_skip", "tests/kernel_tools.py",
           '  topo = topologies.get_topology_desc(platform="cuda", target_config=H100, '
           'topology="1x1x1")\n',
           '  try:\n    topo = topologies.get_topology_desc(platform="cuda", target_config=H100, '
           'topology="1x1x1")\n  except Exception as e:  # pylint: disable=broad-except\n'
           '    pytest.skip(f"no CUDA compile-only topology here: {e}")\n',
           ("tests/test_ci_policy.py",),
           "the H100 compile-only topology turns any error into a skip"),
    # Lion (issue 19): the interpolation whose sign is the update
    Mutant("lion_interpolates_with_beta2", "fusedopt/lion.py",
           "  c = s.one_minus_b1 * g + s.b1 * m\n", "  c = s.one_minus_b2 * g + s.b2 * m\n",
           _k(("tests/test_lion.py",), "float64_reference and wd-jnp"),
           "Lion's sign taken of the b2 interpolation (the EMA's), not b1's"),
    # complex params (fusedopt.tx): |g|^2 must be re^2 + im^2, optax's abs_sq
    Mutant("complex_square_without_conj", "fusedopt/norms.py",
           "    return (x.conj() * x).real\n", "    return (x * x).real\n",
           _k(("tests/test_tx.py",), "agrees_with_optax and adamw_mask"),
           "|g|^2 of a complex gradient computed as Re(g^2) = re^2 - im^2"),
    # the leaf-direct Triton kernels with per-leaf state: every leaf's own state pointer
    Mutant("triton_leaf_state_pointer_of_first_leaf", "kernels/triton.py",
           'sel += [(f"st{i}_in", [f"ST{i}_{j}" for j in range(k)], f"st{i}" in used)',
           'sel += [(f"st{i}_in", [f"ST{i}_0" for j in range(k)], f"st{i}" in used)',
           _k(("tests/test_triton_kernels.py",), "t1 and leaf-state"),
           "each program reads the first leaf's state instead of its own leaf's"),
    # issue 19: Adan's difference, AdEMAMix's slow average, ADOPT's first step and NaN-aware max
    Mutant("adan_difference_at_first_step", "fusedopt/adan.py",
           '"not_first": jnp.asarray(jnp.asarray(step) > 0, jnp.float32)',
           '"not_first": jnp.asarray(jnp.asarray(step) >= 0, jnp.float32)',
           _k(("tests/test_recent_optimizers.py",), "first_step_has_no_difference"),
           "Adan takes g - 0 as the first step's gradient difference (optax: 0)"),
    Mutant("ademamix_slow_average_bias_corrected", "fusedopt/ademamix.py",
           "  u = (m1 / s.bias_corr1 + s.alpha * m2)",
           "  u = (m1 / s.bias_corr1 + s.alpha * m2 / s.bias_corr1)",
           _k(("tests/test_recent_optimizers.py",), "float64_reference and AdEMAMix and jnp"),
           "AdEMAMix's slow average divided by a bias correction (the paper has none)"),
    # (with clipping the first step is a no-op either way: the bound is 0**0.25 = 0)
    Mutant("adopt_first_step_moves", "fusedopt/adopt.py",
           '"one_minus_b1": jnp.where(later, f32(1. - beta1), F32(0.0))',
           '"one_minus_b1": f32(1. - beta1)',
           _k(("tests/test_recent_optimizers.py",), "adopt_no_clip"),
           "ADOPT's first step averages g/eps into m (optax: b1 = 1 at t = 0)"),
    Mutant("native_maximum_drops_nan", "kernels/native.py",
           'maximum="(({a} > {b} || {a} != {a}) ? {a} : {b})"',
           'maximum="({a} > {b} ? {a} : {b})"',
           _k(("tests/test_native_bitwise.py",), "maximum_minimum_propagate_nan"),
           "the C++ maximum returns the other operand for a NaN (jnp.maximum: NaN)"),
    Mutant("planes_product_sign", "kernels/planes.py",
           "return CVal(self.re * o.re - self.im * o.im, self.re * o.im + self.im * o.re)",
           "return CVal(self.re * o.re + self.im * o.im, self.re * o.im + self.im * o.re)",
           ("tests/test_complex_planes.py",),
           "the complex product on planes adds re*re + im*im"),
    Mutant("planes_every_field_real", "kernels/planes.py",
           "    real = (True,) * rule.n_state\n",
           "    return Plan((True,) * rule.n_state, (True,) * 4)\n",
           ("tests/test_complex_planes.py",),
           "every state field of a complex group taken as real (first moments lose their im)"),
    Mutant("planes_sign_unscaled", "kernels/planes.py",
           "    r = xp.sqrt(a * a + b * b)\n    return CVal(xp.where(m, a / r, x.re)",
           "    r = xp.sqrt(x.re * x.re + x.im * x.im)\n    return CVal(xp.where(m, x.re / r, x.re)",
           _k(("tests/test_complex_planes.py",), "pair_arithmetic"),
           "the complex sign from an unscaled |z| (tiny z: 0/0; huge z: 0)"),
    Mutant("schedule_free_average_from_new_z", "fusedopt/schedule_free.py",
           "((y - s.one_minus_b1 * z) / s.b1)", "((y - s.one_minus_b1 * z_new) / s.b1)",
           _k(("tests/test_schedule_free.py",), "agrees_with_optax and defaults"),
           "schedule-free's old average x recovered from the new z instead of the old one"),
    Mutant("schedule_free_weight_from_current_lr", "fusedopt/schedule_free.py",
           "max_lr = jnp.maximum(max_lr, jnp.asarray(lr, max_lr.dtype))",
           "max_lr = jnp.asarray(lr, max_lr.dtype)",
           _k(("tests/test_schedule_free.py",), "agrees_with_optax and schedule"),
           "schedule-free's averaging weight from the current learning rate, not the maximum"),
]

# Runs in the copy: checks where fusedopt comes from, then runs pytest in this process.
RUNNER = r"""
import os, sys
root = os.path.realpath(sys.argv[1])
import fusedopt, fusedopt.kernels
for m in (fusedopt, fusedopt.kernels):
  f = os.path.realpath(m.__file__)
  if not f.startswith(root + os.sep):
    print(f"mutate: {m.__name__} was imported from {f}, not from the copy {root}")
    sys.exit(99)
print(f"mutate: fusedopt from {os.path.dirname(fusedopt.__file__)}, fusedopt.kernels from "
      f"{os.path.realpath(os.path.dirname(fusedopt.kernels.__file__))}", flush=True)
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""
WRONG_IMPORT = 99


def copy_tree(dst):
  """The working tree's tracked and untracked, not ignored, files into ``dst``."""
  out = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others",
                        "--exclude-standard"], check=True, capture_output=True).stdout
  for rel in sorted(set(p for p in out.decode().split("\0") if p)):
    src = os.path.join(REPO, rel)
    if not os.path.isfile(src):      # deleted in the working tree, or a submodule
      continue
    os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
    shutil.copy2(src, os.path.join(dst, rel), follow_symlinks=False)
  # pyproject.toml installs kernels/ as the subpackage fusedopt.kernels
  link = os.path.join(dst, "fusedopt", "kernels")
  if not os.path.exists(link):
    os.symlink(os.path.join("..", "kernels"), link)


def default_python():
  venv = os.path.join(REPO, ".venv", "bin", "python")
  return venv if os.path.exists(venv) else sys.executable


def run_tests(python, root, args, timeout, log):
  env = dict(os.environ, PYTHONPATH=root, PYTHONDONTWRITEBYTECODE="1", JAX_PLATFORMS="cpu")
  flax053 = os.path.join(REPO, ".venv-flax053", "bin", "python")
  if os.path.exists(flax053):            # the copy would otherwise build its own
    env.setdefault("FUSEDOPT_FLAX053_PYTHON", flax053)
  cmd = [python, "-c", RUNNER, root, "-q", "-p", "no:cacheprovider", "-rf", *args]
  t0 = time.monotonic()
  with open(log, "w") as f:
    try:
      rc = subprocess.run(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
  return rc, time.monotonic() - t0


def first_failure(log):
  with open(log) as f:
    lines = f.read().splitlines()
  for line in lines:
    if line.startswith(("FAILED ", "ERROR ")):
      return line.split(" - ")[0]
  return (lines[-1] if lines else "(no output)")[:160]


def tail(log, n=25):
  with open(log) as f:
    return "\n".join(f.read().splitlines()[-n:])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
  ap.add_argument("--list", action="store_true", help="list the mutants and exit")
  ap.add_argument("--python", default=default_python(),
                  help="interpreter with the test dependencies (default: .venv/bin/python)")
  ap.add_argument("--timeout", type=float, default=300, help="seconds per pytest run")
  ap.add_argument("--no-baseline", action="store_true",
                  help="do not first check that each selection passes without a mutant")
  ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
  a = ap.parse_args(argv)

  by_name = {m.name: m for m in MUTANTS}
  assert len(by_name) == len(MUTANTS), "duplicate mutant names"
  unknown = [n for n in a.names if n not in by_name]
  if unknown:
    ap.error(f"unknown mutant(s) {unknown}; --list shows them")
  chosen = [by_name[n] for n in a.names] if a.names else MUTANTS
  if a.list:
    for m in chosen:
      print(f"{m.name}\n    {m.what}\n    {m.path}: {m.old.strip()!r} -> {m.new.strip()!r}\n"
            f"    pytest -x {' '.join(repr(t) if ' ' in t else t for t in m.tests)}")
    return 0

  root = tempfile.mkdtemp(prefix="fusedopt-mutate-")
  t_start = time.monotonic()
  try:
    copy_tree(root)
    print(f"copy of {REPO} (working tree) in {root}; python {a.python}", flush=True)

    stale = []
    for m in chosen:
      with open(os.path.join(root, m.path)) as f:
        n = f.read().count(m.old)
      if n != 1:
        stale.append(f"{m.name}: the text to replace occurs {n} times in {m.path}")
    if stale:
      print("stale mutants (update MUTANTS to the current code):\n  " + "\n  ".join(stale))
      return 2

    if not a.no_baseline:
      for sel in dict.fromkeys(m.tests for m in chosen):
        log = os.path.join(root, "baseline.log")
        rc, dt = run_tests(a.python, root, sel, a.timeout, log)
        print(f"baseline   {'ok' if rc == 0 else 'FAILED'} {dt:5.0f} s  {' '.join(sel)}",
              flush=True)
        if rc != 0:
          print(f"the selection fails without any mutant (rc {rc}); nothing to learn from the "
                f"mutants until it passes:\n{tail(log)}")
          return 2

    results = []
    for m in chosen:
      path = os.path.join(root, m.path)
      with open(path) as f:
        original = f.read()
      log = os.path.join(root, f"mutant-{m.name}.log")
      try:
        with open(path, "w") as f:
          f.write(original.replace(m.old, m.new))
        rc, dt = run_tests(a.python, root, ("-x",) + m.tests, a.timeout, log)
      finally:
        with open(path, "w") as f:
          f.write(original)
      if rc == 1:
        status, detail = "caught", first_failure(log)
      elif rc == 0:
        status, detail = "SURVIVED", "every selected test passed"
      elif rc == WRONG_IMPORT:
        status, detail = "ERROR", tail(log, 3)
      else:
        status, detail = "ERROR", f"pytest rc {rc}: {first_failure(log)}"
      results.append((m, status))
      print(f"{status:9s}  {dt:5.0f} s  {m.name}: {detail}", flush=True)
      if status != "caught" and rc != 0:
        print(tail(log))

    bad = [m.name for m, s in results if s != "caught"]
    print(f"\n{len(results) - len(bad)}/{len(results)} mutants caught in "
          f"{time.monotonic() - t_start:.0f} s" + (f"; not caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0
  finally:
    if a.keep:
      print(f"kept {root}")
    else:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
