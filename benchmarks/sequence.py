"""Benchmarks of the sequence-model paths: the residual add + RMS norm, and layer norm with the
hidden axis sharded across devices.

    python benchmarks/sequence.py [--quick] [--out benchmarks/results] [--repeats N]

Part 1, residual + RMS norm (h = residual + x, y = rms_norm(h); float32 residual, x float32 or
bfloat16), a jitted training step (gradients for x, the residual and g against fixed cotangents
of y and h) and a forward pass. Contenders: ``bnjax.add_rms_norm``; the unfused pair (the add,
then ``bnjax.rms_norm``, in one jit); the same pair with ``flax.linen.RMSNorm``; a naive jnp
version; and the memory-traffic floor (elementwise kernels over the same bytes: forward reads x
and the residual and writes h and y).

Part 2, layer norm of (rows, hidden) with the hidden axis split over 4 devices under
``shard_map`` (tensor parallelism), training step: ``bnjax.layer_norm(axis_name=...)`` against
``flax.linen.LayerNorm(axis_name=...)``, and the unsharded bnjax layer norm on one device for
scale. Needs 4 devices: on CPU the script forces 4 host devices (before JAX starts), which share
the same cores, so this part measures the cost of the collectives and of the layout, not a speedup.

Timing as ``bench.py``: after compilation and warm-up, one call of each contender per round in a
fresh random order, medians and min–max; writes ``sequence.json`` and ``sequence.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from bnbench.report import environment
from bnbench.timing import Timed, round_robin, summarize
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import bnjax

SHAPES = {"residual": [(8192, 1024), (16, 512, 1024)], "sharded": [(8192, 1024)]}
QUICK = {"residual": [(64, 128)], "sharded": [(64, 128)]}
EPS = 1e-6
SHARDS = 4


def _rms_pairs(dtype):
    """name -> f(x, r, g) -> (y, h): the contenders of part 1."""
    flax_rms = nn.RMSNorm(epsilon=EPS)

    def naive(x, r, g):
        h = r + x.astype(r.dtype)
        y = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + EPS) * g.reshape((1,) * (h.ndim - 1) + g.shape)
        return y.astype(x.dtype), h

    return {
        "bnjax add_rms_norm": lambda x, r, g: bnjax.add_rms_norm(x, r, bnjax.NormParams(g, None), eps=EPS),
        "unfused: add, bnjax.rms_norm": lambda x, r, g: (
            bnjax.rms_norm(r + x.astype(r.dtype), bnjax.NormParams(g, None), eps=EPS).astype(x.dtype),
            r + x.astype(r.dtype),
        ),
        "add, flax.linen.RMSNorm": lambda x, r, g: (
            flax_rms.apply({"params": {"scale": g}}, r + x.astype(r.dtype)).astype(x.dtype),
            r + x.astype(r.dtype),
        ),
        "naive jnp": naive,
    }


def run_residual(shape, dtype: str, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    r = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    g = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32)
    cy = jnp.asarray(rng.standard_normal(shape), dtype)
    ch = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    out: dict[str, Any] = {"shape": list(shape), "dtype": dtype}
    for mode in ("train", "fwd"):
        contenders = {}
        for name, f in _rms_pairs(dtype).items():
            if mode == "fwd":
                fn = jax.jit(f)
                contenders[name] = Timed(lambda fn=fn: fn(x, r, g))
            else:

                def step(x, r, g, f=f):
                    (_, _), vjp = jax.vjp(f, x, r, g)
                    return vjp((cy, ch))

                fn = jax.jit(step)
                contenders[name] = Timed(lambda fn=fn: fn(x, r, g))
        if mode == "fwd":  # read x and r, write h and y
            floor = jax.jit(lambda x, r: ((x.astype(jnp.float32) * 2.0).astype(x.dtype), r + 1.0))
        else:  # read x, r, cy, ch; write dx, dr (one pass)
            floor = jax.jit(lambda x, r, cy, ch: ((cy.astype(jnp.float32) + ch).astype(x.dtype), r * ch))
        args = (x, r) if mode == "fwd" else (x, r, cy, ch)
        contenders["memory floor"] = Timed(lambda floor=floor, args=args: floor(*args))
        times = round_robin(contenders, repeats)
        out[mode] = {name: summarize(ts) for name, ts in times.items()}
    return out


def run_sharded(shape, repeats: int) -> dict[str, Any]:
    if len(jax.devices()) < SHARDS:
        return {"shape": list(shape), "skipped": f"needs {SHARDS} devices, have {len(jax.devices())}"}
    mesh = Mesh(np.array(jax.devices()[:SHARDS]), ("t",))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    ct = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    g, b = jnp.ones(shape[-1]), jnp.zeros(shape[-1])
    flax_ln = nn.LayerNorm(epsilon=EPS, axis_name="t")
    local = {
        "bnjax layer_norm(axis_name)": lambda x, g, b: bnjax.layer_norm(
            x, bnjax.NormParams(g, b), eps=EPS, axis_name="t"
        ),
        "flax.linen.LayerNorm(axis_name)": lambda x, g, b: flax_ln.apply({"params": {"scale": g, "bias": b}}, x),
    }
    spec = P(None, "t")
    contenders = {}
    for name, f in local.items():

        def step(x, g, b, ct, f=f):
            return jax.vjp(f, x, g, b)[1](ct)

        sharded = jax.jit(
            jax.shard_map(step, mesh=mesh, in_specs=(spec, P("t"), P("t"), spec), out_specs=(spec, P("t"), P("t")))
        )
        contenders[name] = Timed(lambda sharded=sharded: sharded(x, g, b, ct))
    whole = jax.jit(
        lambda x, g, b, ct: jax.vjp(lambda x, g, b: bnjax.layer_norm(x, bnjax.NormParams(g, b), eps=EPS), x, g, b)[1](
            ct
        )
    )
    contenders["bnjax layer_norm, unsharded, 1 device"] = Timed(lambda: whole(x, g, b, ct))
    # the sharded outputs agree with the unsharded computation (a benchmark of wrong code is no use)
    for name, t in contenders.items():
        np.testing.assert_allclose(t.call()[0], whole(x, g, b, ct)[0], rtol=2e-4, atol=2e-4, err_msg=name)
    times = round_robin(contenders, repeats)
    return {"shape": list(shape), "devices": SHARDS, "train": {n: summarize(ts) for n, ts in times.items()}}


def _row(name: str, s: dict[str, Any], base: float) -> str:
    return f"| {name} | {s['median_ms']:.3g} | {s['min_ms']:.3g}–{s['max_ms']:.3g} | {s['median_ms'] / base:.2f} |"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    src = env["bnjax_source"]
    lines = [
        f"Backend **{env['backend']}** ({env['device_count']} devices); CPU {env['cpu_model']}, "
        f"{env['cpu_affinity']} cores usable; jax {env['versions']['jax']}, flax {env['versions']['flax']}. "
        f"bnjax at commit {(src['commit'] or '?')[:10]}"
        + (f" with uncommitted changes to {', '.join(src['uncommitted'])}" if src.get("uncommitted") else "")
        + f". {results['repeats']} interleaved rounds, median ms (ratio to bnjax).",
        "",
    ]
    for rec in results["residual"]:
        for mode in ("train", "fwd"):
            title = "training step" if mode == "train" else "forward"
            lines += [f"Residual + RMS norm, {title}, x {tuple(rec['shape'])} {rec['dtype']}, residual float32:", ""]
            base = rec[mode]["bnjax add_rms_norm"]["median_ms"]
            lines += ["| contender | median ms | min–max | ratio |", "|---|---|---|---|"]
            lines += [_row(name, s, base) for name, s in rec[mode].items()] + [""]
    for rec in results["sharded"]:
        if "skipped" in rec:
            lines += [f"Sharded layer norm {tuple(rec['shape'])}: skipped ({rec['skipped']})", ""]
            continue
        lines += [
            f"Layer norm, training step, x {tuple(rec['shape'])} float32, hidden axis over {rec['devices']} devices:",
            "",
        ]
        base = rec["train"]["bnjax layer_norm(axis_name)"]["median_ms"]
        lines += ["| contender | median ms | min–max | ratio |", "|---|---|---|---|"]
        lines += [_row(name, s, base) for name, s in rec["train"].items()] + [""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes and 3 rounds (a smoke test)")
    p.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results"), help="output folder")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds per workload (quick: 3)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    repeats = 3 if args.quick else args.repeats
    shapes = QUICK if args.quick else SHAPES
    results: dict[str, Any] = {"environment": environment(), "quick": args.quick, "repeats": repeats}
    results["residual"] = [
        run_residual(shape, dtype, repeats) for shape in shapes["residual"] for dtype in ("float32", "bfloat16")
    ]
    results["sharded"] = [run_sharded(shape, repeats) for shape in shapes["sharded"]]
    results["wall_time_s"] = time.perf_counter() - start
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sequence.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    (out / "sequence.md").write_text(md)
    print(md)
    return results


if __name__ == "__main__":
    main()
