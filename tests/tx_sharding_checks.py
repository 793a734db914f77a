"""fusedopt.tx state sharded like the params on 8 host devices (run by tests/test_tx.py in a
subprocess: ``--xla_force_host_platform_device_count=8`` must be set before jax starts).

The params carry partition specs (rows split over ``data`` where they divide, else replicated);
the optimizer state gets the same specs through ``optax.tree_map_params``, as large-model
codebases derive them. Each step (optax's two calls and ``update_and_apply``) is jitted with
those shardings in and out. Prints one JSON line: whether the compiled steps hold any collective
(resharding: all-gather, all-to-all, collective-permute, all-reduce), whether the output state
keeps the params' shardings, and the largest difference from the single-device result.
"""
import faulthandler
import json
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fusedopt import tx


def main():
  faulthandler.register(signal.SIGUSR1, all_threads=True)   # for the parent's stall watchdog
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.RandomState(0)
  params = {"w": jnp.asarray(rng.standard_normal((64, 48)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((48,)), jnp.float32),
            "odd": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
            "s": jnp.float32(0.5)}
  grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(jnp.shape(x)),
                                                        jnp.float32), params) for _ in range(3)]
  spec = lambda x: P("data") if jnp.ndim(x) >= 1 and jnp.shape(x)[0] % 8 == 0 else P()  # noqa
  p_shard = jax.tree_util.tree_map(lambda x: NamedSharding(mesh, spec(x)), params)
  out = {"collectives": {}, "state_sharded_like_params": {}, "max_rel_diff": {}}
  for name, make in (("adamw", lambda: tx.adamw(1e-2, weight_decay=1e-2)),
                     ("lamb", lambda: tx.lamb(1e-2, weight_decay=1e-2)),
                     ("sgd_momentum", lambda: tx.sgd(1e-2, momentum=0.9))):
    t = make()
    state0 = t.init(params)
    s_shard = optax.tree_map_params(t, lambda _, s: s, state0, p_shard,
                                    transform_non_params=lambda _: NamedSharding(mesh, P()))
    for form in ("two_calls", "one_pass"):
      print("progress", name, form, flush=True)   # for the parent's stall watchdog
      def step(p, s, g, form=form):
        if form == "one_pass":
          return tx.update_and_apply(t, g, s, p)
        u, s = t.update(g, s, p)
        return optax.apply_updates(p, u), s
      jitted = jax.jit(step, in_shardings=(p_shard, s_shard, p_shard),
                       out_shardings=(p_shard, s_shard), donate_argnums=(0, 1))
      ref_p, ref_s = params, state0
      for g in grads:   # one device, no shardings, nothing donated
        ref_p, ref_s = jax.jit(step)(ref_p, ref_s, g)
      host = lambda tree: jax.tree_util.tree_map(np.asarray, tree)   # noqa: E731  (fresh copies)
      p = jax.device_put(host(params), p_shard)
      s = jax.device_put(host(state0), s_shard)
      hlo = jitted.lower(p, s, grads[0]).compile().as_text()
      key = f"{name}/{form}"
      out["collectives"][key] = sorted(set(re.findall(
          r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)\b", hlo)))
      for g in grads:
        p, s = jitted(p, s, jax.device_put(g, p_shard))
      mu_like = [x for x in jax.tree_util.tree_leaves(s) if jnp.ndim(x) >= 1]
      out["state_sharded_like_params"][key] = all(
          x.sharding.spec == spec(x) for x in mu_like)
      out["max_rel_diff"][key] = max(
          float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (1e-30 + np.max(np.abs(b)))))
          for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(ref_p)))
  # quantized state (state_dtype="int8", not params-shaped): with several devices auto runs its
  # leaves on jnp (a native custom call would make XLA gather sharded operands); the step jits
  # with the params sharded and equals one device's
  qparams = {"big": jnp.asarray(rng.standard_normal((128, 64)), jnp.float32),
             "b": jnp.asarray(rng.standard_normal((48,)), jnp.float32)}
  q_shard = {"big": NamedSharding(mesh, P("data")), "b": NamedSharding(mesh, P())}
  t = tx.adamw(1e-2, weight_decay=1e-2, state_dtype="int8")
  qstate = t.init(qparams)
  qg = jax.tree_util.tree_map(lambda x: x * 0.1, qparams)
  step = lambda p, s, g: tx.update_and_apply(t, g, s, p)   # noqa: E731
  jitted = jax.jit(step, in_shardings=(q_shard, None, q_shard))
  hlo = jitted.lower(qparams, qstate, qg).compile().as_text()
  got, _ = jitted(jax.device_put(qparams, q_shard), qstate, jax.device_put(qg, q_shard))
  want, _ = jax.jit(step)(qparams, qstate, qg)
  out["quantized"] = {
      "custom_calls": sorted(set(re.findall(r'custom_call_target="(fusedopt[^"]*)"', hlo))),
      "max_rel_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))
                                       / (1e-30 + np.max(np.abs(b)))))
                          for a, b in zip(jax.tree_util.tree_leaves(got),
                                          jax.tree_util.tree_leaves(want)))}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
