"""Compilation (with XLA's memory analysis), interleaved timing rounds and their summaries."""

from __future__ import annotations

import dataclasses
import gc
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np


def device_array(a: np.ndarray, dtype) -> jax.Array:
    """Host-side dtype conversion (ml_dtypes for bfloat16), then one transfer: no XLA program."""
    dtype = np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)
    return jax.device_put(np.ascontiguousarray(a.astype(dtype)))


def compile_timed(fn, args, donate: bool = False):
    """(compiled, seconds to lower + compile, memory analysis dict)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=(0,) if donate else ()).lower(*args).compile()
    seconds = time.perf_counter() - t0
    return compiled, seconds, memory_dict(compiled)


def memory_dict(compiled) -> dict[str, int]:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if ma is None:
        return {}
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes")
    out = {k: int(getattr(ma, k)) for k in keys if hasattr(ma, k)}
    peak = getattr(ma, "peak_memory_in_bytes", None)
    if peak is not None:
        out["peak_memory_in_bytes"] = int(peak)
    return out


@dataclasses.dataclass
class Timed:
    """A callable to time: ``call(*fresh())`` is timed; ``fresh`` runs outside the timed region."""

    call: Callable[..., Any]
    fresh: Callable[[], tuple] = lambda: ()
    block: Callable[[Any], Any] = jax.block_until_ready


def round_robin(contenders: dict[str, Timed], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Warm every contender up, then time one call of each per round, seconds.

    The order within each round is a fresh (seeded) permutation, so no contender always runs right
    after the same neighbour (e.g. PyTorch, whose OpenMP threads spin for a while after a call).
    """
    for t in contenders.values():
        for _ in range(warmup):
            t.block(t.call(*t.fresh()))
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    order = random.Random(0)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name in order.sample(names, len(names)):
                t = contenders[name]
                args = t.fresh()
                t0 = time.perf_counter()
                t.block(t.call(*args))
                times[name].append(time.perf_counter() - t0)
                del args
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def summarize(ts: Sequence[float]) -> dict[str, Any]:
    return {
        "median_ms": 1e3 * statistics.median(ts),
        "min_ms": 1e3 * min(ts),
        "max_ms": 1e3 * max(ts),
        "times_s": list(ts),
    }


def block_none(out):
    """``Timed.block`` for results that are ready when returned (PyTorch CPU)."""
    return out


def run_donated(fns: dict[str, tuple[Callable, tuple]], repeats: int) -> dict[str, Any]:
    """name -> (fn, args): each fn compiled again with its first argument donated (an output can
    reuse its buffer) and timed in interleaved rounds; a fresh copy of that argument is made before
    each call, outside the timed region."""
    contenders, info = {}, {}
    for name, (fn, args) in fns.items():
        compiled, secs, mem = compile_timed(fn, args, donate=True)
        x0, rest = args[0], args[1:]
        contenders[name] = Timed(
            lambda *a, compiled=compiled, rest=rest: compiled(*a, *rest),
            fresh=lambda x0=x0: (jax.block_until_ready(jnp.array(x0, copy=True)),),
        )
        info[name] = {"compile_s": secs, "memory": mem}
    times = round_robin(contenders, repeats)
    return {name: {**info[name], **summarize(ts)} for name, ts in times.items()}
