"""The package's modules form layers without cycles (docs/design.md, "Layers").

Every ``fusedopt`` import -- module-level or inside a function -- goes to the same or a lower
layer, and the import graph (read from the sources, so lazy imports count) has no cycle.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lowest first: values and rules; kernels; the driver and the flax API; the optimizers; what
# composes them
LAYERS = [
    ("fusedopt.struct", "fusedopt.frozen_dict", "fusedopt.exact_float", "fusedopt.step",
     "fusedopt.layout", "fusedopt.norms", "fusedopt.elementwise", "fusedopt.traverse_util",
     "fusedopt.quantization"),
    ("fusedopt.kernels", "fusedopt.kernels.symbolic", "fusedopt.kernels.common"),
    ("fusedopt.kernels.jnp",),
    ("fusedopt.kernels.native", "fusedopt.kernels.pallas", "fusedopt.kernels.triton",
     "fusedopt.kernels.planes"),
    ("fusedopt.kernels.mosaic_gpu",),   # the Pallas driver's rule evaluation, on Mosaic GPU
    ("fusedopt.kernels.registry",),
    ("fusedopt.base",),
    ("fusedopt.flat_state",),
    ("fusedopt.flat",),
    ("fusedopt.sgd", "fusedopt.momentum", "fusedopt.adam", "fusedopt.adagrad", "fusedopt.rmsprop",
     "fusedopt.adadelta", "fusedopt.adafactor", "fusedopt.dynamic_scale", "fusedopt.weight_norm",
     "fusedopt.lars", "fusedopt.lion", "fusedopt.adan",
     "fusedopt.ademamix", "fusedopt.adopt", "fusedopt.schedule_free"),
    ("fusedopt.adabelief", "fusedopt.lamb"),
    ("fusedopt.multi", "fusedopt.serialization", "fusedopt.sharding"),
    ("fusedopt.tx",),
    ("fusedopt.training",),
    ("fusedopt", "fusedopt.demo"),
]
LEVEL = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def _modules():
  out = {}
  for folder, pkg in (("fusedopt", "fusedopt"), ("kernels", "fusedopt.kernels")):
    for f in sorted(os.listdir(os.path.join(ROOT, folder))):
      if f.endswith(".py"):
        out[pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"] = os.path.join(ROOT, folder, f)
  return out


MODULES = _modules()


def _imports(name, path):
  """The fusedopt modules ``name`` imports anywhere in its source."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("fusedopt"))
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = name.split(".")
        if not path.endswith("__init__.py"):
          base = base[:-1]
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
      else:
        mod = node.module or ""
      if mod.startswith("fusedopt"):
        for a in node.names:
          out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
  out.discard(name)
  return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
  assert sorted(set(MODULES) - set(LEVEL)) == [], "add the new module to LAYERS"
  assert sorted(set(LEVEL) - set(MODULES)) == [], "LAYERS names a module that does not exist"


def test_imports_go_down_the_layers():
  up = [f"{m} (layer {LEVEL[m]}) imports {t} (layer {LEVEL[t]})"
        for m, targets in GRAPH.items() for t in targets
        if t in LEVEL and LEVEL[t] > LEVEL[m]]
  assert up == []


def test_no_import_cycles():
  state, stack, cycles = {}, [], []

  def visit(u):
    state[u] = 1
    stack.append(u)
    for v in sorted(GRAPH.get(u, ())):
      if v == "fusedopt" or v not in GRAPH:
        continue
      if state.get(v) == 1:
        cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
      elif not state.get(v):
        visit(v)
    state[u] = 2
    stack.pop()

  for m in sorted(GRAPH):
    if not state.get(m):
      visit(m)
  assert cycles == []


def test_registry_names_every_backend_from_below():
  """``kernels/registry.py`` imports the backend modules by name (``MODULES``, on first use):
  each lies in a lower layer and exports a ``Backend`` of that name in ``BACKENDS``; every
  ``BACKENDS`` entry of a kernels module is registered; "auto" and the registered names are the
  names a ``backend=`` argument accepts."""
  import importlib  # pylint: disable=import-outside-toplevel
  from fusedopt.kernels import common, registry  # pylint: disable=import-outside-toplevel
  level = LEVEL["fusedopt.kernels.registry"]
  exported = {}
  for mod in sorted(set(registry.MODULES.values())):
    full = f"fusedopt.kernels.{mod}"
    assert LEVEL[full] < level, full
    for name, backend in importlib.import_module(full).BACKENDS.items():
      assert isinstance(backend, common.Backend) and backend.name == name, (full, name)
      exported[name] = mod
  assert exported == registry.MODULES
  assert registry.NAMES == ("auto",) + tuple(registry.MODULES)
