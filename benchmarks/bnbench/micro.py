"""Part 1: every contender on every workload of ``workloads``, one result record each."""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .contenders import PEERS, JaxNorm, jax_contenders, limit, torch_contenders
from .report import fmt_shape
from .timing import Timed, compile_timed, device_array, round_robin, run_donated, summarize
from .workloads import is_training, step_args, step_fn, workloads


def run_micro(quick: bool, repeats: int, skipped: dict[str, str], errors: list) -> list[dict[str, Any]]:
    micro = []
    for mode, kind, shape, dtype, reps in workloads(quick, repeats):
        print(f"[bench] {mode} {fmt_shape(shape)} {dtype} ({reps} rounds)", file=sys.stderr, flush=True)
        micro.append(run_workload(kind, shape, dtype, mode, reps, skipped, errors))
    return micro


def run_workload(kind: str, shape, dtype: str, mode: str, repeats: int, skipped: dict[str, str], errors: list):
    """Times every contender on one workload and mode; returns the result record."""
    c, ndim = shape[-1], len(shape)
    rng = np.random.default_rng(0)
    x_np = (rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5).astype(np.float32)
    ct_np = rng.standard_normal(shape, dtype=np.float32)
    jdtype = jnp.dtype(dtype)
    x, ct = device_array(x_np, jdtype), device_array(ct_np, jdtype)
    training = is_training(mode)
    contenders: dict[str, Timed] = {}
    info: dict[str, dict[str, Any]] = {}
    built: dict[str, tuple[JaxNorm, tuple]] = {}

    for name, builder in jax_contenders(kind, training, skipped).items():
        try:
            norm = builder(kind, c, ndim, jdtype)
            xs, cts = x, ct
            if norm.channels_first:
                xs, cts = (device_array(np.moveaxis(a, -1, 1), jdtype) for a in (x_np, ct_np))
            args = step_args(mode, xs, cts, norm.params, norm.state)
            compiled, secs, mem = compile_timed(step_fn(mode, norm.apply), args)
            jax.block_until_ready(compiled(*args))
        except Exception as e:
            errors.append({"contender": name, "workload": [kind, list(shape), dtype, mode], "error": repr(e)})
            print(f"  ! {name}: {e!r}", file=sys.stderr)
            continue
        contenders[name] = Timed(lambda compiled=compiled, args=args: compiled(*args))
        info[name] = {"compile_s": secs, "memory": mem, "note": norm.note}
        built[name] = (norm, args)

    if "torch" not in skipped:
        try:
            for name, t in torch_contenders(kind, mode, x_np, ct_np, dtype).items():
                contenders[name] = t
                info[name] = {"note": f"{__import__('torch').get_num_threads()} threads"}
        except Exception as e:
            errors.append({"contender": "torch", "workload": [kind, list(shape), dtype, mode], "error": repr(e)})
            print(f"  ! torch: {e!r}", file=sys.stderr)

    fn, limit_args = limit(kind, mode, x, ct)
    compiled, secs, mem = compile_timed(fn, limit_args)
    contenders["limit"] = Timed(lambda compiled=compiled: compiled(*limit_args))
    info["limit"] = {"compile_s": secs, "memory": mem}

    times = round_robin(contenders, repeats)
    results = {name: {**info[name], **summarize(ts)} for name, ts in times.items()}
    record: dict[str, Any] = {
        "layer": kind,
        "shape": list(shape),
        "dtype": dtype,
        "mode": mode,
        "repeats": repeats,
        "contenders": results,
    }
    record["ratios"] = ratios(results)
    # bnjax and the fastest JAX peer again, with x donated (dx or y can reuse its buffer)
    donated = [n for n in ("bnjax", record["ratios"]["best_peer"]) if n in built]
    record["donated"] = run_donated({n: (step_fn(mode, built[n][0].apply), built[n][1]) for n in donated}, repeats)
    return record


def ratios(results: dict[str, dict]) -> dict[str, Any]:
    med = {n: r["median_ms"] for n, r in results.items()}
    peers = {n: med[n] for n in PEERS if n in med}
    torch_ = {n: m for n, m in med.items() if n.startswith("torch")}
    out: dict[str, Any] = {"best_peer": min(peers, key=peers.get) if peers else None}
    out["best_torch"] = min(torch_, key=torch_.get) if torch_ else None
    for who in ("bnjax", "bnjax (autodiff)"):
        if who not in med:
            continue
        out[who] = {
            "to_best_peer": med[who] / peers[out["best_peer"]] if peers else None,
            "to_torch": med[who] / torch_[out["best_torch"]] if torch_ else None,
            "to_limit": med[who] / med["limit"],
        }
    out["to_limit"] = {n: m / med["limit"] for n, m in med.items()}
    return out
