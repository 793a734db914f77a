"""Trace+compile time of one implementation's step in a fresh process (``--fresh-compile``).

In one long benchmark process, XLA compiles of a big step get slower after other big compiles
(fusedopt native on the 2000-leaf tree: 1.0 s fresh, 2.2 s after optax's and jnp's steps), so
the main run's numbers depend on the order of implementations. A user compiles one optimizer;
this measures that.

  python -m bench.compile_probe --tree small-2000 --optim adam --impl native   # prints JSON
"""
import argparse
import json

from . import impls as impls_mod
from . import measure, optims, trees


def probe(tree, optim, impl):
  o = optims.OPTIMS[optim]
  p0, grads = impls_mod.Inputs(trees.shapes(tree), o).for_impl(impl)
  r = measure.Runner(impls_mod.make(impl, o), p0, grads, impls_mod.lr_array())
  r.compile()
  return {k: r.info[k] for k in ("trace_s", "lower_s", "compile_s", "trace_compile_s")}


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m bench.compile_probe", description=__doc__)
  ap.add_argument("--tree", required=True)
  ap.add_argument("--optim", required=True)
  ap.add_argument("--impl", required=True)
  a = ap.parse_args(argv)
  print(json.dumps(probe(a.tree, a.optim, a.impl)))


if __name__ == "__main__":
  main()
