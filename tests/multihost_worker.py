"""One process of the 2-process × 4-CPU-device sync batch norm check (run by test_multihost.py).

    python tests/multihost_worker.py PROCESS_ID PORT

Builds the global batch on a mesh that spans both processes, runs batch norm forward+backward
with sync statistics (shard_map with ``axis_name``, and plain jit over the sharded array), and
compares outputs, input and parameter gradients and running statistics with the single-process
full-batch result, and precise_batch_stats over batches sharded across both processes against
float64 population statistics. Prints one JSON line with the largest errors and exits non-zero on mismatch.
"""

from __future__ import annotations

import json
import os
import sys


def main(process_id: int, port: int) -> int:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import bnjax

    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    c, per_device = 5, 6
    rng = np.random.default_rng(0)  # same data on both processes; each contributes its own rows
    x = (rng.standard_normal((8 * per_device, 3, c)) * 2 + 7).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    counts = np.array([6, 2, 0, 5, 6, 1, 3, 4])  # unequal valid counts, one empty device
    mask = (np.arange(per_device)[None] < counts[:, None]).reshape(-1, 1, 1)
    params = bnjax.NormParams(jnp.linspace(0.5, 1.5, c), jnp.linspace(-1.0, 1.0, c))
    stats = bnjax.init_stats(c)

    def full_batch_loss(x, w, m, params):  # no axis_name: one process, or XLA over a sharded batch
        y, new = bnjax.batch_norm(x, params, stats, training=True, mask=m)
        return jnp.sum(jnp.where(m, y * w, 0.0)), (y, new)

    grad_full = jax.jit(jax.grad(full_batch_loss, argnums=(0, 3), has_aux=True))
    # --- single-process full-batch reference (unsharded, on this process's first local device)
    (ref_gx, ref_gp), (ref_y, ref_stats) = grad_full(jnp.asarray(x), jnp.asarray(w), jnp.asarray(mask), params)

    mesh = Mesh(np.array(jax.devices()), ("d",))
    sharded = NamedSharding(mesh, P("d"))

    def global_array(a):
        return jax.make_array_from_callback(a.shape, sharded, lambda idx: a[idx])

    gx_, gw, gm = global_array(x), global_array(w), global_array(mask)
    results = {}

    # --- shard_map with axis_name (params replicated: P())
    def shard_loss(x, w, m, params):
        def per_device(x, w, m, params):
            y, new = bnjax.batch_norm(x, params, stats, training=True, mask=m, axis_name="d")
            return jax.lax.psum(jnp.sum(jnp.where(m, y * w, 0.0)), "d"), y, new

        total, y, new = jax.shard_map(
            per_device, mesh=mesh, in_specs=(P("d"), P("d"), P("d"), P()), out_specs=(P(), P("d"), P())
        )(x, w, m, params)
        return total, (y, new)

    grad_shard = jax.jit(jax.grad(shard_loss, argnums=(0, 3), has_aux=True))
    results["shard_map"] = grad_shard(gx_, gw, gm, params)

    # --- plain jit over the sharded global batch, no axis_name
    results["sharded_jit"] = grad_full(gx_, gw, gm, params)

    # --- precise_batch_stats over batches sharded across both processes: population statistics
    import flax.linen as nn

    import bnjax.linen

    model = nn.Sequential([bnjax.linen.BatchNorm(use_running_average=False)])
    flat = [(rng.standard_normal((8 * per_device, c)) * (1 + i) + 3 * i).astype(np.float32) for i in range(2)]
    variables = model.init(jax.random.key(0), flat[0][:2])
    precise = bnjax.linen.precise_batch_stats(model, variables, [global_array(b) for b in flat], progress=False)
    population = np.concatenate(flat).astype(np.float64)
    stored = precise["batch_stats"]["layers_0"]
    assert all(v.is_fully_replicated for v in stored.values()), {k: v.sharding for k, v in stored.items()}
    got = {k: np.asarray(v.addressable_data(0)) for k, v in stored.items()}
    precise_err = {
        "mean": float(np.abs(got["mean"] - population.mean(0)).max()),
        "var_rel": float(np.abs(got["var"] / population.var(0) - 1).max()),
    }

    report, ok = {"process": process_id, "precise": precise_err}, True
    ok &= precise_err["mean"] <= 1e-5 and precise_err["var_rel"] <= 1e-5
    valid = np.broadcast_to(mask, x.shape)
    for mode, ((gx, gp), (y, new)) in results.items():
        y_full = np.asarray(multihost_utils.process_allgather(y, tiled=True))
        gx_full = np.asarray(multihost_utils.process_allgather(gx, tiled=True))
        errs = {
            "y": float(np.abs(y_full[valid] - np.asarray(ref_y)[valid]).max()),
            "dx": float(np.abs(gx_full - np.asarray(ref_gx)).max()),
            "dscale": float(np.abs(np.asarray(gp.scale) - np.asarray(ref_gp.scale)).max()),
            "dbias": float(np.abs(np.asarray(gp.bias) - np.asarray(ref_gp.bias)).max()),
            "mean": float(np.abs(np.asarray(new.mean) - np.asarray(ref_stats.mean)).max()),
            "var": float(np.abs(np.asarray(new.var) - np.asarray(ref_stats.var)).max()),
        }
        # float64 check of the running statistics: one debiased step stores the batch statistics
        xv = x[np.broadcast_to(mask, x.shape)].reshape(-1, c).astype(np.float64)
        errs["mean_f64"] = float(np.abs(np.asarray(new.mean) - xv.mean(0)).max() / np.abs(xv.mean(0)).max())
        errs["var_f64"] = float(np.abs(np.asarray(new.var) / xv.var(0) - 1).max())
        ok &= all(v <= 2e-5 for k, v in errs.items() if not k.endswith("f64")) and errs["var_f64"] <= 1e-5
        ok &= errs["mean_f64"] <= 1e-6
        report[mode] = errs
    report["ok"] = bool(ok)
    print(json.dumps(report), flush=True)
    jax.distributed.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
