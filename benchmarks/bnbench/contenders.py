"""The contenders: one builder per JAX library, PyTorch CPU, and the memory-traffic limit.

A JAX builder ``(layer, features, ndim, dtype) -> JaxNorm`` gives the layer as pure data and a
function; the shared code (``micro``, ``convnet``) jits and times it. Adding a contender: its
builder and one ``JAX_CONTENDERS`` entry (with the layers it has); a JAX library the fastest of
which bnjax is compared to also goes in ``PEERS``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import bnjax
from bnjax._src import backend

from .timing import Timed, block_none, device_array
from .workloads import D_MAX, EPS, R_MAX, is_training, stat_axes

PEERS = ("flax.linen", "flax.nnx", "haiku", "equinox", "naive jnp")  # the JAX peers bnjax is compared to


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


def make_bnjax(kind: str, c: int, ndim: int, dtype, *, fused: bool = True, formulation=None, **_) -> JaxNorm:
    """bnjax's layer; ``formulation="plain"``: traced with the formulation that backends other than
    the CPU compile (no CPU-specific spellings, the same numbers), to see what those spellings buy."""
    norm = _make_bnjax(kind, c, fused)
    if formulation is None:
        return norm
    inner = norm.apply

    def apply(x, params, state, training):
        with backend.force(formulation):  # active while jit traces the layer
            return inner(x, params, state, training)

    return dataclasses.replace(norm, apply=apply)


def _make_bnjax(kind: str, c: int, fused: bool) -> JaxNorm:
    params = bnjax.init_params(c)
    if kind == "bn":
        stats = bnjax.init_stats(c)

        def apply(x, params, state, training):
            return bnjax.batch_norm(x, params, state, training=training, eps=EPS, fused_backward=fused)

        return JaxNorm(params, stats, apply)

    if kind == "renorm":

        def apply_renorm(x, params, state, training):
            return bnjax.batch_renorm(
                x, params, state, training=training, r_max=R_MAX, d_max=D_MAX, eps=EPS, fused_backward=fused
            )

        return JaxNorm(params, bnjax.init_stats(c), apply_renorm)

    def apply_ln(x, params, state, training):
        return bnjax.layer_norm(x, params, eps=EPS, fused_backward=fused), state

    return JaxNorm(params, (), apply_ln)


def make_bnjax_batch_norm(kind: str, c: int, ndim: int, dtype, **kw) -> JaxNorm:
    """``bnjax.batch_norm`` on a batch renorm workload: the reference for what r and d cost."""
    return make_bnjax("bn", c, ndim, dtype, **kw)


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
    """Two-pass mean/variance in float32, autodiff; what one writes without a library.

    Batch renorm (Ioffe 2017, Algorithm 1): x̂ = (x − μ_B)/σ_B · r + d with r = σ_B/σ clipped to
    [1/r_max, r_max] and d = (μ_B − μ)/σ clipped to [−d_max, d_max], from the running statistics
    μ, σ² before this step's update, both under ``stop_gradient``; the update is batch norm's.
    """
    bshape = (1,) * (ndim - 1) + (c,)
    axes = stat_axes(kind, ndim)
    stateful = kind != "ln"
    params = (jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32))
    state = (jnp.zeros((c,), jnp.float32), jnp.ones((c,), jnp.float32)) if stateful else ()

    def apply(x, params, state, training):
        xf = x.astype(jnp.float32)
        new_state = state
        if stateful and not training:
            mean, var = (s.reshape(bshape) for s in state)
            xhat = (xf - mean) * lax.rsqrt(var + EPS)
        else:
            mean = jnp.mean(xf, axes, keepdims=True)
            var = jnp.mean(jnp.square(xf - mean), axes, keepdims=True)
            xhat = (xf - mean) * lax.rsqrt(var + EPS)
            if kind == "renorm":
                mu, sigma = state[0].reshape(bshape), jnp.sqrt(state[1].reshape(bshape) + EPS)
                r = lax.stop_gradient(jnp.clip(jnp.sqrt(var + EPS) / sigma, 1 / R_MAX, R_MAX))
                d = lax.stop_gradient(jnp.clip((mean - mu) / sigma, -D_MAX, D_MAX))
                xhat = xhat * r + d
            if stateful:
                new_state = tuple(
                    0.9 * s + 0.1 * lax.stop_gradient(v.reshape(c)) for s, v in zip(state, (mean, var), strict=True)
                )
        y = xhat * params[0].reshape(bshape) + params[1].reshape(bshape)
        return y.astype(x.dtype), new_state

    return JaxNorm(params, state, apply)


def cached(builder, **fixed) -> Callable[..., JaxNorm]:
    """Builds each (kind, features, ndim, dtype) once: the modes and ConvNet layers share initial
    values (immutable arrays), and eager module initialization compiles small XLA programs."""

    @functools.cache
    def build(kind: str, c: int, ndim: int, dtype) -> JaxNorm:
        return builder(kind, c, ndim, jnp.dtype(dtype), **fixed)

    return build


@dataclasses.dataclass(frozen=True)
class Contender:
    """A JAX contender: its (cached) builder, the layers it has (``workloads.MODES``' layer
    kinds; it is absent from the other modes) and whether it differs from another contender only
    in the backward pass (then it is left out of the evaluation modes)."""

    build: Callable[..., JaxNorm]
    layers: tuple[str, ...] = ("bn", "ln")
    training_only: bool = False


JAX_CONTENDERS: dict[str, Contender] = {
    "bnjax": Contender(cached(make_bnjax), ("bn", "renorm", "ln")),
    # fused_backward changes only the backward pass
    "bnjax (autodiff)": Contender(cached(make_bnjax, fused=False), ("bn", "renorm", "ln"), training_only=True),
    # the same numbers with the formulation GPU and TPU compile: what the CPU spellings buy here
    "bnjax (plain)": Contender(cached(make_bnjax, formulation="plain"), ("bn", "ln")),
    "bnjax.batch_norm": Contender(cached(make_bnjax_batch_norm), ("renorm",)),
    "flax.linen": Contender(cached(make_linen)),
    "flax.nnx": Contender(cached(make_nnx)),
    "haiku": Contender(cached(make_haiku)),
    "equinox": Contender(cached(make_equinox)),
    "naive jnp": Contender(cached(make_naive), ("bn", "renorm", "ln")),
}
JAX_BUILDERS: dict[str, Callable[..., JaxNorm]] = {n: c.build for n, c in JAX_CONTENDERS.items()}


def jax_contenders(layer: str, training: bool, skipped: dict[str, str]) -> dict[str, Callable[..., JaxNorm]]:
    """name -> builder of the JAX contenders that run this layer in this mode, in table order."""
    return {
        name: c.build
        for name, c in JAX_CONTENDERS.items()
        if name not in skipped and layer in c.layers and (training or not c.training_only)
    }


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
# PyTorch CPU

TORCH_LAYERS = ("bn", "ln")  # PyTorch has no batch renorm


def torch_contenders(kind: str, mode: str, x_np: np.ndarray, ct_np: np.ndarray, dtype: str) -> dict[str, Timed]:
    """PyTorch CPU functional batch_norm / layer_norm, autograd for the backward pass; none for a
    layer PyTorch does not have."""
    if kind not in TORCH_LAYERS:
        return {}
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

        if is_training(mode):

            def call(fwd=fwd, xg=xg, ct=ct, w=w, b=b):
                return torch.autograd.grad(fwd(xg, True), (xg, w, b), ct)
        else:

            def call(fwd=fwd, x=x):
                with torch.no_grad():
                    return fwd(x, False)

        out[name] = Timed(call, block=block_none)
    return out


# ---------------------------------------------------------------------------------------------
# The memory-traffic limit


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


def limit(kind: str, mode: str, x: jax.Array, ct: jax.Array) -> tuple[Callable, tuple]:
    """(function, arguments) of the limit for this workload (the statistics' axes of ``kind``)."""
    ndim, c = x.ndim, x.shape[-1]
    bshape = (1,) * (ndim - 1) + (c,)
    a, b = (device_array(np.full(bshape, v, np.float32), jnp.float32) for v in (1.01, 0.1))
    if is_training(mode):
        return functools.partial(limit_train, axes=stat_axes(kind, ndim)), (x, ct, a, b)
    return limit_fwd, (x, a, b)
