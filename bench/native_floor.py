"""The native kernels' compute floor: ns per element per thread on cache-resident data.

    python -m bench.native_floor [--elements 32768] [--reps 2000] [--tag cpu-DATE]

The step benchmarks (``bench.low_bit``) time whole steps over a model's parameters, where a
float32 kernel waits on memory. This one times the generated C++ alone, single-threaded, over
``--elements`` elements that stay in L2: the Adam kernel with float32 state
(``native.generate``) and with int8 and fp8 state (``native.generate_quantized``). A kernel
whose floor is above the memory-bound step's time per element is compute-bound, and no layout
or threading change makes it faster. Each kernel is compiled with the backend's own flags into
a small harness (``main`` calls the generated ``segment``/``block`` function in a loop; the
FFI entry point is left unused); the three run in rotation, ``--rounds`` times, and the
medians are reported.
"""
import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import tempfile

import jax

from fusedopt.adam import ADAM_RULE
from fusedopt.kernels import native

from . import report

RESULTS = os.path.join(os.path.dirname(__file__), "results")
# Adam's global scalars, in ADAM_RULE.scalars' order (values that keep every element finite)
SCALARS = "1e-3f, 0.9f, 0.1f, 0.999f, 0.001f, 0.5f, 0.5f, 1e-8f, 0.f"

_FLOAT_MAIN = r"""
#include <chrono>
#include <cstdio>
int main() {
  const int64_t N = %(n)d;
  std::vector<float> p(N, 0.5f), g(N, 0.01f), m(N, 0.1f), v(N, 0.01f);
  float S[16] = {%(scalars)s}, Q[1] = {0.f};
  auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < %(reps)d; ++r)
    segment(S, Q, p.data(), g.data(), m.data(), v.data(), N, nullptr);
  auto t1 = std::chrono::steady_clock::now();
  const double ns = std::chrono::duration<double, std::nano>(t1 - t0).count();
  std::printf("%%.4f\n", ns / (%(reps)d.0 * N));
}
"""

_QUANT_MAIN = r"""
#include <chrono>
#include <cstdio>
int main() {
  const int64_t N = %(n)d;
  std::vector<float> p(N, 0.5f), g(N, 0.01f), s0(N / 256, 0.1f), s1(N / 256, 0.01f);
  std::vector<uint8_t> c0(N, %(c0)d), c1(N, %(c1)d);
  float S[16] = {%(scalars)s}, Q[1] = {0.f}, acc[16];
  auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < %(reps)d; ++r)
    for (int64_t b = 0; b < N; b += 256)
      block(S, Q, p.data() + b, g.data() + b, c0.data() + b, s0.data() + b / 256,
            c1.data() + b, s1.data() + b / 256, true, acc);
  auto t1 = std::chrono::steady_clock::now();
  const double ns = std::chrono::duration<double, std::nano>(t1 - t0).count();
  std::printf("%%.4f\n", ns / (%(reps)d.0 * N));
}
"""


def _harness(kind, n, reps):
  """C++ source: the generated kernel for ``kind`` plus a timing ``main``."""
  args = dict(n=n, reps=reps, scalars=SCALARS)
  if kind == "float32":
    return native.generate(ADAM_RULE) + _FLOAT_MAIN % args
  kinds = (("int8_signed", "int8_unsigned") if kind == "int8"
           else ("float8_e4m3fn", "float8_e4m3fn"))
  src = native.generate_quantized(ADAM_RULE, "float32", "float32", kinds)
  # codes of moderate values (m ~ 0.4 scale, v ~ 0.3 scale) so that every element stays finite
  c0, c1 = (200, 180) if kind == "int8" else (0x30, 0x30)
  return src + _QUANT_MAIN % dict(args, c0=c0, c1=c1)


def build(kind, n, reps, workdir):
  src = os.path.join(workdir, f"{kind}.cc")
  exe = os.path.join(workdir, kind)
  with open(src, "w") as f:
    f.write(_harness(kind, n, reps))
  # pylint: disable=protected-access
  flags = [f for f in native._FLAGS if f != "-shared"]
  cmd = [native._compiler(), *flags, "-I", jax.ffi.include_dir(), src, "-o", exe]
  subprocess.run(cmd, check=True, capture_output=True, text=True)
  return exe


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--elements", type=int, default=32768, help="a multiple of 256")
  p.add_argument("--reps", type=int, default=2000)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--tag", default=None, help="write bench/results/<tag>-native-floor.{md,json}")
  args = p.parse_args(argv)
  kinds = ("float32", "int8", "float8_e4m3fn")
  env = dict(os.environ, OMP_NUM_THREADS="1")
  with tempfile.TemporaryDirectory(prefix="fusedopt-floor-") as d:
    exes = {k: build(k, args.elements, args.reps, d) for k in kinds}
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):
      for k in kinds:
        out = subprocess.run([exes[k]], check=True, capture_output=True, text=True, env=env)
        times[k].append(float(re.findall(r"[\d.]+", out.stdout)[-1]))
  med = {k: statistics.median(v) for k, v in times.items()}
  flags = " ".join(native._FLAGS)   # pylint: disable=protected-access
  lines = [f"# Native kernels' compute floor ({datetime.date.today().isoformat()})", "",
           f"`python -m bench.native_floor --elements {args.elements} --reps {args.reps}` on "
           f"{report._cpu_model()}, one thread, {args.rounds} rounds in rotation (medians). Flags: "
           f"`{flags}`.", "",
           "| Adam state | ns/element/thread | vs float32 |", "|---|---:|---:|"]
  for k in kinds:
    lines.append(f"| {k} | {med[k]:.3f} | {med[k] / med['float32']:.2f}x |")
  text = "\n".join(lines)
  print(text)
  if args.tag:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.tag}-native-floor.md"), "w") as f:
      f.write(text + "\n")
    with open(os.path.join(RESULTS, f"{args.tag}-native-floor.json"), "w") as f:
      json.dump({"times_ns": times, "median_ns": med, "cpu": report._cpu_model(),
                 "elements": args.elements, "reps": args.reps}, f, indent=1)


if __name__ == "__main__":
  main()
