"""ZeRO-1 data-parallel training over several processes with ``jax.distributed``.

Runs as two processes on one machine, on CPU (4 CPU devices each, cross-process collectives
over gloo), or one process per host on GPUs. Each of the 8 devices holds 1/8 of the Adam state;
grads are all-reduced by the data-parallel step (batch sharded over ``data``), each device updates
its slice of the flat buffers inside ``shard_map``, and the new params are all-gathered.

  python examples/multihost_zero1.py                  # launches 2 local processes and waits
  # by hand, one command per process (or per host, with the first host's address):
  python examples/multihost_zero1.py --process-id 0 --num-processes 2 --coordinator localhost:12355
  python examples/multihost_zero1.py --process-id 1 --num-processes 2 --coordinator localhost:12355
  # GPUs: one process per host, every local GPU in the mesh:
  python examples/multihost_zero1.py --platform gpu --process-id $RANK --num-processes $N \\
      --coordinator $HOST0:12355

Each process prints its view; process 0 checks the result against a single-device run of the
same steps and writes a checkpoint (``--checkpoint``, flax's msgpack format, layout-free).
"""
import argparse
import os
import socket
import subprocess
import sys
import time


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(num_processes=2, timeout=120, extra=()):
  """Starts ``num_processes`` workers on localhost; returns (exit codes, outputs)."""
  addr = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "--process-id", str(i), "--num-processes",
       str(num_processes), "--coordinator", addr, *extra],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(num_processes)]
  deadline = time.time() + timeout
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      out = (p.communicate()[0] or "") + "\n[timed out]"
    outs.append(out)
  return [p.returncode for p in procs], outs


def _finish_every_device(mesh):
  """Returns once every device of every process has run all it was given: a sum over the whole
  mesh, read back from each local device. ``multihost_utils.sync_global_devices`` reads one
  local device only; the others can still be running an earlier step's collectives (each
  ``process_allgather`` runs one on every device), and a process that exits while its peer
  still has such a collective to set up leaves the peer waiting for it in gloo forever: a hang
  at exit, in the CPU client's destructor, behind a thread in gloo's ``connectFullMesh`` (gdb;
  5 of 33 runs of this script on a loaded 2-core machine, none of 25 with this barrier)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  n = mesh.devices.size
  ones = jax.make_array_from_callback((n,), NamedSharding(mesh, P(mesh.axis_names)),
                                      lambda i: np.ones((1,), np.float32))
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones)
  for shard in total.addressable_shards:   # every local device: each waited for all n
    assert float(np.asarray(shard.data)) == n


def worker(args):
  if args.platform == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.local_devices}")
  import jax  # pylint: disable=import-outside-toplevel
  if args.platform == "cpu":
    # XLA:CPU's cross-process collectives (all-reduce, all-gather, ...) need an implementation
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes, process_id=args.process_id)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  import fusedopt  # pylint: disable=import-outside-toplevel
  from fusedopt import serialization, sharding  # pylint: disable=import-outside-toplevel

  me = jax.process_index()
  say = lambda *a: print(f"[process {me}]", *a, flush=True)  # noqa: E731
  mesh = Mesh(np.array(jax.devices()), ("data",))       # every device of every process
  n = mesh.shape["data"]
  say(f"{jax.process_count()} processes, {len(jax.local_devices())} local / {n} global devices")

  # the same data and initial params on every process (same seeds)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 16)).astype(np.float32)
  y = np.tanh(x @ rng.normal(size=(16, 1))).astype(np.float32)
  params = {"w1": rng.normal(size=(16, 64)).astype(np.float32) * 0.3,
            "b1": np.zeros((64,), np.float32),
            "w2": rng.normal(size=(64, 1)).astype(np.float32) * 0.3}

  def loss_fn(p, xb, yb):
    h = jnp.tanh(xb @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - yb) ** 2)

  def train_step(opt, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(opt.target, xb, yb)
    return opt.apply_gradient(grads), loss

  # batch sharded over the data axis: each process holds only its devices' rows
  batch_sharding = NamedSharding(mesh, P("data"))
  xg = jax.make_array_from_callback(x.shape, batch_sharding, lambda i: x[i])
  yg = jax.make_array_from_callback(y.shape, batch_sharding, lambda i: y[i])

  opt_def = sharding.shard_optimizer(fusedopt.Adam(1e-2, weight_decay=1e-4), mesh, "data")
  opt = opt_def.create(params)
  step = jax.jit(train_step, donate_argnums=0)
  for t in range(args.steps):
    opt, loss = step(opt, xg, yg)
    if t % 10 == 0 or t == args.steps - 1:
      say(f"step {t:3d}  loss {float(loss):.6f}")

  # each device of this process holds 1/n of every state buffer
  ok = True
  for name, g, sizes, total in sharding.state_fraction(opt):
    ok &= len(sizes) == len(jax.local_devices()) and all(s * n == total for s in sizes)
  say(f"state buffers: {[(k, g, s[0], t) for k, g, s, t in sharding.state_fraction(opt)]} "
      f"(per-device slice, global size) -> 1/{n} per device: {ok}")

  # the same steps on one local device, unsharded
  dev = jax.local_devices()[0]
  ref = fusedopt.Adam(1e-2, weight_decay=1e-4).create(jax.device_put(params, dev))
  ref_step = jax.jit(train_step)
  xl, yl = jax.device_put(x, dev), jax.device_put(y, dev)
  for _ in range(args.steps):
    ref, _ = ref_step(ref, xl, yl)
  err = max(float(np.max(np.abs(np.asarray(a.addressable_shards[0].data) - np.asarray(b))))
            for a, b in zip(jax.tree_util.tree_leaves(opt.target),
                            jax.tree_util.tree_leaves(ref.target)))
  say(f"max |params - single-device params| = {err:.2e}")   # all-reduce order: not bitwise
  ok &= err < 1e-4

  # checkpoint: gather the (layout-free, per-leaf) state dict to every host, write on process 0
  sd = multihost_utils.process_allgather(opt.state_dict(), tiled=True)
  if args.checkpoint and me == 0:
    with open(args.checkpoint, "wb") as f:
      f.write(serialization.msgpack_serialize(sd))
    say(f"wrote {args.checkpoint}")
  back = sharding.restore_state(opt_def.create(params), sd)   # re-sharded onto the mesh
  same = all(np.array_equal(np.asarray(a.addressable_shards[0].data),
                            np.asarray(b.addressable_shards[0].data))
             for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(opt)))
  say(f"checkpoint round trip bitwise: {same}")
  ok &= same
  _finish_every_device(mesh)
  say("OK" if ok else "FAILED")
  jax.distributed.shutdown()
  return 0 if ok else 1


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--process-id", type=int)
  ap.add_argument("--num-processes", type=int, default=2)
  ap.add_argument("--coordinator", default="localhost:12355")
  ap.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
  ap.add_argument("--local-devices", type=int, default=4, help="CPU devices per process")
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--checkpoint", default=None, help="msgpack file written by process 0")
  ap.add_argument("--timeout", type=float, default=180)
  args = ap.parse_args()
  if args.process_id is not None:
    return worker(args)
  extra = ["--steps", str(args.steps), "--local-devices", str(args.local_devices)]
  if args.checkpoint:
    extra += ["--checkpoint", args.checkpoint]
  codes, outs = launch(args.num_processes, args.timeout, extra)
  for out in outs:
    print("\n".join(l for l in out.splitlines() if l.startswith("[process")))
  print("exit codes:", codes)
  return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
  sys.exit(main())
