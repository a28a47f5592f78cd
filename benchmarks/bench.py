"""Benchmarks for bnjax: normalization-layer microbenchmarks and a small ConvNet train step.

    python benchmarks/bench.py [--quick] [--out benchmarks/results] [--repeats N] [--torch-threads N]

Part 1 times batch norm (training mode, NHWC, feature axis -1) and layer norm (last axis) in
float32 and bfloat16, in two modes each: a jitted training step (the gradients w.r.t. x, scale and
bias of sum(y * ct) for a fixed cotangent ct, plus the updated running statistics for batch norm)
and an evaluation forward pass. Contenders: bnjax (fused closed-form backward, the default, and
``fused_backward=False``), flax.linen, flax.nnx, Haiku, Equinox, a naive jnp version, PyTorch CPU
(only when JAX's default backend is the CPU) and a memory-traffic limit (plain elementwise kernels
over the same bytes). After compilation and warm-up, calls are interleaved: one call of each
contender per round, in a random order each round; medians, min–max and ratios are reported.
Part 2 compiles and times one SGD train step of a 4-layer ConvNet with each batch norm and
without normalization, with XLA's memory analysis.

Writes ``results.json`` (everything, raw timings included) and ``results.md`` (tables) to ``--out``
and prints the Markdown. Runs unchanged on a GPU (JAX's default backend; PyTorch CPU is skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

import bnjax

# ---------------------------------------------------------------------------------------------
# Workloads

BN_SHAPES = [(64, 32, 32, 64), (256, 16, 16, 128), (32, 56, 56, 64), (4096, 1024)]
LN_SHAPES = [(64, 256, 512), (16, 1024, 1024)]
QUICK_BN_SHAPES = [(8, 8, 8, 16)]
QUICK_LN_SHAPES = [(8, 64)]
DTYPES = ("float32", "bfloat16")
LARGE = 8 * 2**20  # elements; workloads above this get fewer rounds

MODES = {  # mode key -> (layer, title)
    "bn_train": ("bn", "Batch norm, training step (fwd + bwd + running statistics)"),
    "bn_eval": ("bn", "Batch norm, evaluation forward (running statistics)"),
    "ln_train": ("ln", "Layer norm, training step (fwd + bwd)"),
    "ln_fwd": ("ln", "Layer norm, forward"),
}
PEERS = ("flax.linen", "flax.nnx", "haiku", "equinox", "naive jnp")  # the JAX peers bnjax is compared to
EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# JAX contenders: each builder returns pure callables; the shared code below jits them


@dataclasses.dataclass
class JaxNorm:
    """One normalization layer as pure data + function.

    ``apply(x, params, state, training) -> (y, new_state)``; ``state`` is ``()`` for layer norm.
    ``channels_first``: the layer takes (N, C, ...) data (Equinox's native layout); the data are
    transposed once, outside the timed region, so the same bytes are normalized.
    """

    params: Any
    state: Any
    apply: Callable[..., tuple[jax.Array, Any]]
    channels_first: bool = False
    note: str = ""


def _dummy(ndim: int, c: int, dtype) -> jax.Array:
    """A small input with the right rank and feature size, for initializing modules."""
    return jnp.zeros((2,) * (ndim - 1) + (c,), dtype)


def make_bnjax(kind: str, c: int, ndim: int, dtype, *, fused: bool = True, **_) -> JaxNorm:
    params = bnjax.init_params(c)
    if kind == "bn":
        stats = bnjax.init_stats(c)

        def apply(x, params, state, training):
            return bnjax.batch_norm(x, params, state, training=training, eps=EPS, fused_backward=fused)

        return JaxNorm(params, stats, apply)

    def apply_ln(x, params, state, training):
        return bnjax.layer_norm(x, params, eps=EPS, fused_backward=fused), state

    return JaxNorm(params, (), apply_ln)


def make_linen(kind: str, c: int, ndim: int, dtype, **_) -> JaxNorm:
    import flax.linen as nn

    # Flax defaults (use_fast_variance=True, momentum 0.99); dtype=x's dtype so y is bf16 for bf16 x
    # (statistics are still float32 inside Flax), like bnjax.
    if kind == "bn":
        train_mod = nn.BatchNorm(use_running_average=False, epsilon=EPS, dtype=dtype)
        eval_mod = nn.BatchNorm(use_running_average=True, epsilon=EPS, dtype=dtype)
        variables = train_mod.init(jax.random.key(0), _dummy(ndim, c, dtype))

        def apply(x, params, state, training):
            if training:
                y, updates = train_mod.apply({"params": params, "batch_stats": state}, x, mutable=["batch_stats"])
                return y, updates["batch_stats"]
            return eval_mod.apply({"params": params, "batch_stats": state}, x), state

        return JaxNorm(variables["params"], variables["batch_stats"], apply)

    mod = nn.LayerNorm(epsilon=EPS, dtype=dtype)
    variables = mod.init(jax.random.key(0), _dummy(ndim, c, dtype))

    def apply_ln(x, params, state, training):
        return mod.apply({"params": params}, x), state

    return JaxNorm(variables["params"], (), apply_ln)


def make_nnx(kind: str, c: int, ndim: int, dtype, **_) -> JaxNorm:
    from flax import nnx

    rngs = nnx.Rngs(0)
    if kind == "bn":
        model = nnx.BatchNorm(c, epsilon=EPS, dtype=dtype, rngs=rngs)
    else:
        model = nnx.LayerNorm(c, epsilon=EPS, dtype=dtype, rngs=rngs)
    graphdef, params, state = nnx.split(model, nnx.Param, nnx.BatchStat)

    def apply(x, params, state, training):
        # the pure-JAX NNX pattern (split/merge inside the traced function, no nnx.jit overhead);
        # the tree.map gives fresh Variables at this trace level, which BatchNorm may then mutate
        m = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, state))
        if kind == "bn":
            y = m(x, use_running_average=not training)
            return y, nnx.state(m, nnx.BatchStat)
        return m(x), state

    return JaxNorm(params, state, apply)


def make_haiku(kind: str, c: int, ndim: int, dtype, **_) -> JaxNorm:
    import haiku as hk

    # Haiku creates scale/offset (and its EMA state) in x's dtype; that is its design, kept as is.
    if kind == "bn":

        def fwd(x, training):
            return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.99, eps=EPS)(
                x, is_training=training
            )

    else:

        def fwd(x, training):
            return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=EPS)(x)

    t = hk.transform_with_state(fwd)
    params, state = t.init(jax.random.key(0), _dummy(ndim, c, dtype), True)

    def apply(x, params, state, training):
        y, new_state = t.apply(params, state, None, x, training)
        return y, (new_state if kind == "bn" else state)

    return JaxNorm(params, state, apply)


def make_equinox(kind: str, c: int, ndim: int, dtype, *, channels_first: bool = True, **_) -> JaxNorm:
    import equinox as eqx

    if kind == "ln":
        ln = eqx.nn.LayerNorm(c, eps=EPS)

        def apply_ln(x, params, state, training):
            m = eqx.tree_at(lambda m: (m.weight, m.bias), ln, params)
            y = jax.vmap(m)(x.reshape(-1, c)).reshape(x.shape)
            return y.astype(x.dtype), state

        return JaxNorm((ln.weight, ln.bias), (), apply_ln)

    # mode="batch": batch statistics in training, EMA for inference (PyTorch/Flax/Haiku semantics,
    # and the mode Equinox recommends; the legacy default "ema" warns).
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, axis_name="batch", eps=EPS, mode="batch")
    moved = ndim > 2 and not channels_first  # NHWC data: per example (H, W, C) -> (C, H, W) and back

    def per_example(m, xi, st, training):
        xi = jnp.moveaxis(xi, -1, 0) if moved else xi
        y, st = m(xi, st, inference=not training)
        return (jnp.moveaxis(y, 0, -1) if moved else y), st

    def apply(x, params, state, training):
        m = eqx.tree_at(lambda m: (m.weight, m.bias), bn, params)
        y, new_state = jax.vmap(
            lambda xi, st: per_example(m, xi, st, training), axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)
        return y.astype(x.dtype), new_state

    note = "NHWC via per-example transposes" if moved else ("native (N, C, H, W) data" if ndim > 2 else "")
    return JaxNorm((bn.weight, bn.bias), state, apply, channels_first=ndim > 2 and channels_first, note=note)


def make_naive(kind: str, c: int, ndim: int, dtype, **_) -> JaxNorm:
    """Two-pass mean/variance in float32, autodiff; what one writes without a library."""
    bshape = (1,) * (ndim - 1) + (c,)
    axes = tuple(range(ndim - 1)) if kind == "bn" else (ndim - 1,)
    params = (jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32))
    state = (jnp.zeros((c,), jnp.float32), jnp.ones((c,), jnp.float32)) if kind == "bn" else ()

    def apply(x, params, state, training):
        xf = x.astype(jnp.float32)
        if kind == "bn" and not training:
            mean, var = (s.reshape(bshape) for s in state)
            new_state = state
        else:
            mean = jnp.mean(xf, axes, keepdims=True)
            var = jnp.mean(jnp.square(xf - mean), axes, keepdims=True)
            new_state = state
            if kind == "bn":
                new_state = tuple(
                    0.9 * s + 0.1 * lax.stop_gradient(v.reshape(c)) for s, v in zip(state, (mean, var), strict=True)
                )
        y = (xf - mean) * lax.rsqrt(var + EPS) * params[0].reshape(bshape) + params[1].reshape(bshape)
        return y.astype(x.dtype), new_state

    return JaxNorm(params, state, apply)


def _cached(builder, **fixed) -> Callable[..., JaxNorm]:
    """Builds each (kind, features, ndim, dtype) once: the modes and ConvNet layers share initial
    values (immutable arrays), and eager module initialization compiles small XLA programs."""

    @functools.cache
    def build(kind: str, c: int, ndim: int, dtype) -> JaxNorm:
        return builder(kind, c, ndim, jnp.dtype(dtype), **fixed)

    return build


JAX_BUILDERS: dict[str, Callable[..., JaxNorm]] = {
    "bnjax": _cached(make_bnjax),
    "bnjax (autodiff)": _cached(make_bnjax, fused=False),
    "flax.linen": _cached(make_linen),
    "flax.nnx": _cached(make_nnx),
    "haiku": _cached(make_haiku),
    "equinox": _cached(make_equinox),
    "naive jnp": _cached(make_naive),
}
FWD_ONLY_SKIP = ("bnjax (autodiff)",)  # fused_backward changes only the backward pass


def availability() -> dict[str, str]:
    """Contender name -> reason it is skipped (empty when everything is available)."""
    skipped = {}
    for name, module in (("haiku", "haiku"), ("equinox", "equinox")):
        try:
            __import__(module)
        except Exception as e:  # ImportError, or an incompatibility with this jax at import time
            skipped[name] = f"import {module} failed: {type(e).__name__}: {e}"
    if jax.default_backend() != "cpu":
        skipped["torch"] = f"JAX's default backend is {jax.default_backend()!r}, not the CPU"
    else:
        try:
            import torch  # noqa: F401
        except Exception as e:
            skipped["torch"] = f"import torch failed: {type(e).__name__}: {e}"
    return skipped


# ---------------------------------------------------------------------------------------------
# Shared: the jitted step functions, timing


def device_array(a: np.ndarray, dtype) -> jax.Array:
    """Host-side dtype conversion (ml_dtypes for bfloat16), then one transfer: no XLA program."""
    dtype = np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)
    return jax.device_put(np.ascontiguousarray(a.astype(dtype)))


def train_step(apply):
    """The training step: vjp of y w.r.t. (x, params) against ct (= grad of sum(y * ct)), plus the
    updated state (running statistics), all returned from one jitted function."""

    def step(x, ct, params, state):
        y, vjp, new_state = jax.vjp(lambda x, p: apply(x, p, state, True), x, params, has_aux=True)
        dx, dparams = vjp(ct.astype(y.dtype))
        return dx, dparams, new_state

    return step


def eval_step(apply):
    def step(x, params, state):
        return apply(x, params, state, False)[0]

    return step


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


def _block_none(out):
    return out


# ---------------------------------------------------------------------------------------------
# Part 1: microbenchmarks


def limit_fwd(x, a, b):
    """Reads x, writes y (2 |x| bytes): the traffic of any forward normalization with known
    statistics. Arithmetic in float32 (a, b are float32), as the normalizations do for bfloat16."""
    return (x.astype(jnp.float32) * a + b).astype(x.dtype)


def limit_train(x, ct, a, b, *, axes):
    """About the least a fused training step must move (5 |x| bytes, one x-sized output): one pass
    that reads x and ct for per-statistic sums (the statistics and the backward sums can all be
    taken in it), then one pass that reads x and ct again and writes dx."""
    xf, cf = x.astype(jnp.float32), ct.astype(jnp.float32)
    s = jnp.sum(xf * cf, axis=axes, keepdims=True)
    return (xf * s + cf * a + b).astype(x.dtype)


def torch_contenders(kind: str, mode: str, x_np: np.ndarray, ct_np: np.ndarray, dtype: str) -> dict[str, Timed]:
    """PyTorch CPU functional batch_norm / layer_norm, autograd for the backward pass."""
    import torch
    import torch.nn.functional as F

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    c = x_np.shape[-1]
    layouts: dict[str, Callable[[np.ndarray], Any]] = {}
    if kind == "bn" and x_np.ndim == 4:  # NHWC numpy -> NCHW logical (the view is channels_last already)
        layouts["torch NCHW"] = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
        layouts["torch channels_last"] = lambda a: (
            torch.from_numpy(a).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        )
    else:
        layouts["torch NCHW" if kind == "bn" else "torch"] = lambda a: torch.from_numpy(a).contiguous()
    out = {}
    for name, layout in layouts.items():
        x = layout(x_np).to(tdtype)
        ct = layout(ct_np).to(tdtype)
        w = torch.ones(c, requires_grad=True)
        b = torch.zeros(c, requires_grad=True)
        rm, rv = torch.zeros(c), torch.ones(c)
        xg = x.detach().clone().requires_grad_(True)

        if kind == "bn":

            def fwd(x, training, w=w, b=b, rm=rm, rv=rv):
                return F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=EPS)
        else:

            def fwd(x, training, w=w, b=b):
                return F.layer_norm(x, (c,), w, b, eps=EPS)

        if mode.endswith("train"):

            def call(fwd=fwd, xg=xg, ct=ct, w=w, b=b):
                return torch.autograd.grad(fwd(xg, True), (xg, w, b), ct)
        else:

            def call(fwd=fwd, x=x):
                with torch.no_grad():
                    return fwd(x, False)

        out[name] = Timed(call, block=_block_none)
    return out


def run_workload(kind: str, shape, dtype: str, mode: str, repeats: int, skipped: dict[str, str], errors: list):
    """Times every contender on one workload and mode; returns the result record."""
    c, ndim = shape[-1], len(shape)
    rng = np.random.default_rng(0)
    x_np = (rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5).astype(np.float32)
    ct_np = rng.standard_normal(shape, dtype=np.float32)
    jdtype = jnp.dtype(dtype)
    x, ct = device_array(x_np, jdtype), device_array(ct_np, jdtype)
    training = mode.endswith("train")
    contenders: dict[str, Timed] = {}
    info: dict[str, dict[str, Any]] = {}
    built: dict[str, tuple[JaxNorm, tuple]] = {}

    for name, builder in JAX_BUILDERS.items():
        if name in skipped or (not training and name in FWD_ONLY_SKIP):
            continue
        try:
            norm = builder(kind, c, ndim, jdtype)
            xs, cts = x, ct
            if norm.channels_first:
                xs, cts = (device_array(np.moveaxis(a, -1, 1), jdtype) for a in (x_np, ct_np))
            fn = train_step(norm.apply) if training else eval_step(norm.apply)
            args = (xs, cts, norm.params, norm.state) if training else (xs, norm.params, norm.state)
            compiled, secs, mem = compile_timed(fn, args)
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

    bshape = (1,) * (ndim - 1) + (c,)
    a, b = (device_array(np.full(bshape, v, np.float32), jnp.float32) for v in (1.01, 0.1))
    limit_args = (x, ct, a, b) if training else (x, a, b)
    axes = tuple(range(ndim - 1)) if kind == "bn" else (ndim - 1,)  # the statistics' axes
    limit = functools.partial(limit_train, axes=axes) if training else limit_fwd
    compiled, secs, mem = compile_timed(limit, limit_args)
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
    record["donated"] = run_donated(record, built, training, repeats)
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


def run_donated(record: dict, built: dict, training: bool, repeats: int) -> dict[str, Any]:
    """bnjax and the fastest JAX peer again, with x donated (dx or y can reuse its buffer); a fresh
    copy of x is made before each call, outside the timed region."""
    peer = record["ratios"]["best_peer"]
    names = [n for n in ("bnjax", peer) if n in built]
    contenders, info = {}, {}
    for name in names:
        norm, args = built[name]
        fn = train_step(norm.apply) if training else eval_step(norm.apply)
        compiled, secs, mem = compile_timed(fn, args, donate=True)
        x0, rest = args[0], args[1:]
        contenders[name] = Timed(
            lambda *a, compiled=compiled, rest=rest: compiled(*a, *rest),
            fresh=lambda x0=x0: (jax.block_until_ready(jnp.array(x0, copy=True)),),
        )
        info[name] = {"compile_s": secs, "memory": mem}
    times = round_robin(contenders, repeats)
    return {name: {**info[name], **summarize(ts)} for name, ts in times.items()}


# ---------------------------------------------------------------------------------------------
# Part 2: ConvNet train step

CONV_BUILDERS: dict[str, Callable[..., JaxNorm] | None] = {
    "no BN": None,
    **{name: JAX_BUILDERS[name] for name in ("bnjax", "bnjax (autodiff)", "flax.linen", "flax.nnx", "haiku")},
    "equinox": _cached(make_equinox, channels_first=False),  # NHWC activations: per-example transposes
}


def convnet(builder, widths: Sequence[int], strides: Sequence[int], in_ch: int, classes: int, lr: float = 0.05):
    """(params, state, step): a ConvNet of 3x3 convs (no conv bias), each followed by the norm (if
    any) and ReLU, then global average pooling and a dense classifier; one SGD train step."""
    rng = np.random.default_rng(0)  # host-side initialization (He normal): no XLA programs to compile
    kernels, chans = [], in_ch
    for w in widths:
        kernels.append(device_array(rng.standard_normal((3, 3, chans, w)) * math.sqrt(2.0 / (9 * chans)), jnp.float32))
        chans = w
    dense = {
        "w": device_array(rng.standard_normal((chans, classes)) / math.sqrt(chans), jnp.float32),
        "b": device_array(np.zeros((classes,)), jnp.float32),
    }
    norms = [builder("bn", w, 4, jnp.float32) for w in widths] if builder is not None else []
    params = {"conv": kernels, "norm": [n.params for n in norms], "dense": dense}
    state = [n.state for n in norms]

    def loss_fn(params, state, x, labels):
        h, new_state = x, []
        for i, (kernel, s) in enumerate(zip(params["conv"], strides, strict=True)):
            h = lax.conv_general_dilated(h, kernel, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            if norms:
                h, st = norms[i].apply(h, params["norm"][i], state[i], True)
                new_state.append(st)
            h = jax.nn.relu(h)
        feats = jnp.mean(h, axis=(1, 2))
        logits = feats @ params["dense"]["w"] + params["dense"]["b"][None, :]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1)), new_state

    def step(params, state, x, labels):
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, labels)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return params, new_state, loss

    return params, state, step


def run_convnet(quick: bool, repeats: int, skipped: dict[str, str], errors: list) -> dict[str, Any]:
    if quick:
        batch, hw, widths = 16, 16, (8, 8, 16, 16)
    else:
        batch, hw, widths = 128, 32, (32, 32, 64, 64)
    strides, classes = (1, 1, 2, 2), 10
    rng = np.random.default_rng(1)
    x = device_array(rng.standard_normal((batch, hw, hw, 3)), jnp.float32)
    labels = device_array(rng.integers(0, classes, batch), jnp.int32)
    contenders, info = {}, {}
    for name, builder in CONV_BUILDERS.items():
        if name in skipped:
            continue
        try:
            params, state, step = convnet(builder, widths, strides, 3, classes)
            args = (params, state, x, labels)
            compiled, secs, mem = compile_timed(step, args)
            out = jax.block_until_ready(compiled(*args))
            if not np.isfinite(float(out[2])):
                raise FloatingPointError(f"non-finite loss {out[2]}")
        except Exception as e:
            errors.append({"contender": name, "workload": ["convnet"], "error": repr(e)})
            print(f"  ! convnet {name}: {e!r}", file=sys.stderr)
            continue
        contenders[name] = Timed(lambda compiled=compiled, args=args: compiled(*args))
        info[name] = {"compile_s": secs, "memory": mem}
    times = round_robin(contenders, repeats)
    rows = {name: {**info[name], **summarize(ts)} for name, ts in times.items()}
    n_bn = len(widths)
    base = rows.get("no BN")
    for name, r in rows.items():
        if base is None or name == "no BN":
            continue
        r["per_bn_layer"] = {
            "time_ms": (r["median_ms"] - base["median_ms"]) / n_bn,
            "time_from_min_ms": (r["min_ms"] - base["min_ms"]) / n_bn,  # less sensitive to other load
            "temp_bytes": (r["memory"].get("temp_size_in_bytes", 0) - base["memory"].get("temp_size_in_bytes", 0))
            / n_bn,
        }
    vs_flax: dict[str, float | None] = {}
    if "bnjax" in rows and "flax.linen" in rows and "per_bn_layer" in rows["bnjax"]:
        for k in ("time_ms", "temp_bytes"):
            num, den = rows["bnjax"]["per_bn_layer"][k], rows["flax.linen"]["per_bn_layer"][k]
            vs_flax[k] = num / den if den > 0 else None  # undefined when Flax's cost is ≤ 0 (noise)
    return {
        "batch": batch,
        "input": [batch, hw, hw, 3],
        "widths": list(widths),
        "strides": list(strides),
        "bn_layers": n_bn,
        "dtype": "float32",
        "repeats": repeats,
        "contenders": rows,
        "bnjax_per_layer_to_flax_linen": vs_flax,
    }


def _with_relu(apply):
    """The layer as it sits in the ConvNet: the norm, then ReLU (its backward pass included)."""

    def layer(x, params, state, training):
        y, new_state = apply(x, params, state, training)
        return jax.nn.relu(y), new_state

    return layer


def run_conv_layers(conv: dict[str, Any], repeats: int, skipped: dict[str, str], errors: list) -> dict[str, Any]:
    """The ConvNet's BN layers on their own: BN → ReLU training step (vjp against a random
    cotangent, running statistics) at each layer's activation shape, every contender of the
    ConvNet, interleaved. The whole step's time is mostly convolutions, whose noise on a shared
    CPU is larger than a BN layer's cost; this measures the BN layers' cost directly."""
    batch, hw = conv["batch"], conv["input"][1]
    shapes = []
    for w, s in zip(conv["widths"], conv["strides"], strict=True):
        hw = -(-hw // s)  # "SAME" padding
        shapes.append((batch, hw, hw, w))
    layers = []
    for shape in shapes:
        rng = np.random.default_rng(2)
        x_np = rng.standard_normal(shape, dtype=np.float32)
        ct_np = rng.standard_normal(shape, dtype=np.float32)
        contenders: dict[str, Timed] = {}
        for name, builder in CONV_BUILDERS.items():
            if builder is None or name in skipped:
                continue
            try:
                norm = builder("bn", shape[-1], 4, jnp.float32)
                xs, cts = (device_array(a, jnp.float32) for a in (x_np, ct_np))
                args = (xs, cts, norm.params, norm.state)
                compiled, _, _ = compile_timed(train_step(_with_relu(norm.apply)), args)
                jax.block_until_ready(compiled(*args))
            except Exception as e:
                errors.append({"contender": name, "workload": ["conv layer", list(shape)], "error": repr(e)})
                print(f"  ! conv layer {name}: {e!r}", file=sys.stderr)
                continue
            contenders[name] = Timed(lambda compiled=compiled, args=args: compiled(*args))
        times = round_robin(contenders, repeats)
        layers.append({"shape": list(shape), "contenders": {n: summarize(ts) for n, ts in times.items()}})
    names = [n for n in CONV_BUILDERS if all(n in layer["contenders"] for layer in layers)]
    total = {n: sum(layer["contenders"][n]["median_ms"] for layer in layers) for n in names}
    flax = total.get("flax.linen")
    return {
        "repeats": repeats,
        "layers": layers,
        "sum_of_medians_ms": total,
        "to_flax_linen": {n: (t / flax if flax else None) for n, t in total.items()},
    }


# ---------------------------------------------------------------------------------------------
# Environment, Markdown, main


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def bnjax_source() -> dict[str, Any]:
    """The git commit of the bnjax being measured and its uncommitted files (bnjax/ only), if any."""
    root = pathlib.Path(bnjax.__file__).resolve().parent.parent
    try:

        def git(*a):
            return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=30, check=True)

        commit = git("rev-parse", "HEAD").stdout.strip()
        dirty = [line[3:] for line in git("status", "--porcelain", "--", "bnjax").stdout.splitlines()]
    except (OSError, subprocess.SubprocessError):  # not a git checkout (an installed wheel), or no git
        return {"path": str(root), "commit": None, "uncommitted": None}
    return {"path": str(root), "commit": commit, "uncommitted": dirty}


def environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": str(dev),
        "device_kind": getattr(dev, "device_kind", None),
        "device_count": jax.device_count(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": _cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            d: _version(d) for d in ("bnjax", "jax", "jaxlib", "flax", "torch", "dm-haiku", "equinox", "numpy", "optax")
        },
        "bnjax_source": bnjax_source(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_numpy_rank_promotion": jax.config.jax_numpy_rank_promotion,
    }


def _ms(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _ratio(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.2f}"


def _shape(shape) -> str:
    return "(" + ",".join(str(s) for s in shape) + ")"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    v = env["versions"]
    src = env["bnjax_source"]
    if src["commit"]:
        where = f"bnjax at commit {src['commit'][:10]}"
        where += f" with uncommitted changes to {', '.join(src['uncommitted'])}" if src["uncommitted"] else ""
    else:
        where = f"bnjax from {src['path']}"
    lines = [
        "# bnjax benchmarks",
        "",
        f"Backend **{env['backend']}** ({env['device']}, {env['device_kind']}); CPU {env['cpu_model']}, "
        f"{env['cpu_affinity']} cores usable; jax {v['jax']}, flax {v['flax']}, torch {v['torch']}, "
        f"haiku {v['dm-haiku']}, equinox {v['equinox']}, bnjax {v['bnjax']}. "
        f"{where}. {'Quick run. ' if results['quick'] else ''}Wall time {results['wall_time_s']:.0f} s.",
        "",
        "Medians in ms over interleaved rounds (rounds per row in `rounds`); ratios are medians divided by "
        "medians (< 1: bnjax is faster). `best peer`: the fastest of flax.linen, flax.nnx, haiku, equinox and "
        "naive jnp. `limit`: plain jitted kernels over the same bytes (forward: read x, write y; training: one "
        "pass reading x and ct for per-statistic sums, then one reading x and ct and writing one array of x's size). "
        "`donated`: bnjax / best peer with x donated (`donate_argnums`), ms.",
    ]
    if results["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {r}" for k, r in results["skipped"].items()) + "."]
    for mode, (_, title) in MODES.items():
        recs = [r for r in results["micro"] if r["mode"] == mode]
        if not recs:
            continue
        names: list[str] = []
        for r in recs:
            names += [n for n in r["contenders"] if n not in names]
        train = mode.endswith("train")
        header = ["workload", "dtype", "rounds", *names, "best peer", "bnjax ÷ best peer"]
        if train:
            header.append("autodiff ÷ best peer")
        header += ["bnjax ÷ torch", "bnjax ÷ limit", "best peer ÷ limit", "donated (ms)"]
        rows, spread = [], []
        for r in recs:
            c, q = r["contenders"], r["ratios"]
            bj = q.get("bnjax", {})
            row = [_shape(r["shape"]), r["dtype"], str(r["repeats"])]
            row += [_ms(c[n]["median_ms"]) if n in c else "—" for n in names]
            row += [q["best_peer"] or "—", _ratio(bj.get("to_best_peer"))]
            if train:
                row.append(_ratio(q.get("bnjax (autodiff)", {}).get("to_best_peer")))
            row += [_ratio(bj.get("to_torch")), _ratio(bj.get("to_limit"))]
            row.append(_ratio(q["to_limit"].get(q["best_peer"])) if q["best_peer"] else "—")
            d = r["donated"]
            row.append(" / ".join(_ms(d[n]["median_ms"]) for n in d) if d else "—")
            rows.append(row)
            spread.append(
                [_shape(r["shape"]), r["dtype"]]
                + [f"{_ms(c[n]['min_ms'])}–{_ms(c[n]['max_ms'])}" if n in c else "—" for n in names]
            )
        lines += ["", f"## {title}", "", *_table(header, rows)]
        lines += ["", "<details><summary>min–max (ms)</summary>", "", *_table(["workload", "dtype", *names], spread)]
        if train:
            mem_rows = [
                [_shape(r["shape"]), r["dtype"]]
                + [
                    f"{r['contenders'][n]['memory'].get('temp_size_in_bytes', float('nan')) / 2**20:.1f}"
                    if n in r["contenders"] and r["contenders"][n].get("memory")
                    else "—"
                    for n in names
                ]
                for r in recs
            ]
            lines += [
                "",
                "XLA temp memory of the compiled step (MiB):",
                "",
                *_table(["workload", "dtype", *names], mem_rows),
            ]
        lines += ["", "</details>"]
    cn = results.get("convnet")
    if cn:
        lines += [
            "",
            f"## ConvNet SGD train step (batch {cn['batch']}, input {_shape(cn['input'][1:])}, convs "
            f"{'-'.join(map(str, cn['widths']))}, strides {'-'.join(map(str, cn['strides']))}, float32, "
            f"{cn['repeats']} rounds)",
            "",
        ]
        header = [
            "contender",
            "step median (ms)",
            "min–max (ms)",
            "compile (s)",
            "temp (MiB)",
            "arguments (MiB)",
            "outputs (MiB)",
            "per BN layer: time (ms), from medians / from minima",
            "per BN layer: temp (MiB)",
        ]
        rows = []
        for name, r in cn["contenders"].items():
            m, p = r["memory"], r.get("per_bn_layer")
            rows.append(
                [
                    name,
                    _ms(r["median_ms"]),
                    f"{_ms(r['min_ms'])}–{_ms(r['max_ms'])}",
                    f"{r['compile_s']:.2f}",
                    f"{m.get('temp_size_in_bytes', float('nan')) / 2**20:.2f}",
                    f"{m.get('argument_size_in_bytes', float('nan')) / 2**20:.2f}",
                    f"{m.get('output_size_in_bytes', float('nan')) / 2**20:.2f}",
                    f"{p['time_ms']:.3g} / {p['time_from_min_ms']:.3g}" if p else "—",
                    f"{p['temp_bytes'] / 2**20:.2f}" if p else "—",
                ]
            )
        lines += _table(header, rows)
        vf = cn["bnjax_per_layer_to_flax_linen"]
        if vf:
            lines += [
                "",
                f"bnjax ÷ flax.linen, per BN layer: time {_ratio(vf.get('time_ms'))}, "
                f"temp memory {_ratio(vf.get('temp_bytes'))} (— where Flax's per-layer cost is ≤ 0).",
            ]
        cl = cn.get("layers")
        if cl:
            names = list(cl["sum_of_medians_ms"])
            lines += [
                "",
                f"The ConvNet's BN layers on their own (BN → ReLU training step at each layer's activation shape, "
                f"float32, {cl['repeats']} rounds; medians in ms):",
                "",
                *_table(
                    ["contender", *(_shape(layer["shape"]) for layer in cl["layers"]), "sum", "sum ÷ flax.linen"],
                    [
                        [
                            n,
                            *(_ms(layer["contenders"][n]["median_ms"]) for layer in cl["layers"]),
                            _ms(cl["sum_of_medians_ms"][n]),
                            _ratio(cl["to_flax_linen"][n]),
                        ]
                        for n in names
                    ],
                ),
            ]
    if results["errors"]:
        lines += ["", "## Errors", ""] + [
            f"- {e['contender']} {e['workload']}: `{e['error']}`" for e in results["errors"]
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and 3 rounds (a smoke test, < 1 min)")
    p.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results"), help="output folder")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per workload (default 20; quick 3)")
    p.add_argument("--torch-threads", type=int, default=None, help="PyTorch intra-op threads (default: usable cores)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    env = environment()  # now: the bnjax source state that was imported, not the one at the end
    repeats = args.repeats or (3 if args.quick else 20)
    skipped = availability()
    if "torch" not in skipped:
        import torch

        torch.set_num_threads(args.torch_threads or _cores())
    errors: list[dict[str, Any]] = []
    bn_shapes = QUICK_BN_SHAPES if args.quick else BN_SHAPES
    ln_shapes = QUICK_LN_SHAPES if args.quick else LN_SHAPES
    micro = []
    for mode, (kind, _) in MODES.items():
        for shape in bn_shapes if kind == "bn" else ln_shapes:
            for dtype in DTYPES:
                reps = repeats if math.prod(shape) <= LARGE else max(3, (2 * repeats) // 3)
                print(f"[bench] {mode} {_shape(shape)} {dtype} ({reps} rounds)", file=sys.stderr, flush=True)
                micro.append(run_workload(kind, shape, dtype, mode, reps, skipped, errors))
    print("[bench] convnet", file=sys.stderr, flush=True)
    conv = run_convnet(args.quick, repeats, skipped, errors)
    print("[bench] convnet layers", file=sys.stderr, flush=True)
    conv["layers"] = run_conv_layers(conv, repeats, skipped, errors)
    results = {
        "command": ["benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])],
        "quick": args.quick,
        "environment": env,
        "torch_threads": None if "torch" in skipped else __import__("torch").get_num_threads(),
        "skipped": skipped,
        "errors": errors,
        "micro": micro,
        "convnet": conv,
    }
    results["wall_time_s"] = time.perf_counter() - start
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    return results


if __name__ == "__main__":
    main()
