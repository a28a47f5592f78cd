"""Static (trace-time) checks shared by every public entry point.

Every check runs on shapes, dtypes and Python values only, so it costs nothing at run time and
fires while tracing, before any computation. Messages name the argument, what was received, and
what to do instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Axes = int | Sequence[int]


def canonical_axes(axis: Axes, ndim: int, *, name: str = "axis", shape: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Returns ``axis`` as a sorted tuple of non-negative ints, or raises naming ``name``."""
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
            raise TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{name}={axis!r} is out of range for x with {ndim} dimensions (shape {shape}): "
                f"use axes in [{-ndim}, {ndim - 1}], e.g. {name}=-1 for channels-last (NHWC) or "
                f"{name}=1 for channels-first (NCHW)."
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} names the same axis twice (shape {shape}).")
    return tuple(sorted(out))


def check_floating(x: Any, name: str = "x") -> jax.Array:
    """Converts ``x`` to an array and requires a floating dtype."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array, got dtype {x.dtype}: normalization of integer, "
            f"boolean or complex data is undefined; cast first, e.g. {name}.astype(jnp.float32)."
        )
    return x


def check_eps(eps: Any) -> None:
    if isinstance(eps, jax.core.Tracer):
        return  # a traced eps is the caller's responsibility; its value is unknown here
    value = float(np.asarray(eps))
    if not value > 0 or not np.isfinite(value):
        raise ValueError(
            f"eps must be a finite number > 0, got {eps!r}: it keeps 1/sqrt(var + eps) finite for "
            "constant features; typical values are 1e-5 (PyTorch, Flax) or 1e-3 (Keras)."
        )


def check_momentum(momentum: Any) -> None:
    if momentum is None or isinstance(momentum, jax.core.Tracer):
        return
    value = float(np.asarray(momentum))
    if not 0.0 <= value < 1.0:
        torch_hint = f" (PyTorch's momentum={value:g} is momentum={1 - value:g} here)" if 0 < value <= 1 else ""
        raise ValueError(
            f"momentum must be in [0, 1), got {momentum!r}: it is the weight of the OLD running value, "
            "new = momentum*old + (1 - momentum)*batch (Flax/Keras convention)"
            f"{torch_hint}; momentum=None gives a cumulative average over all updates."
        )


def check_param_shape(value: Any, expected: tuple[int, ...], name: str, fix: str) -> jax.Array | None:
    """Checks that a parameter or statistic has exactly the expected feature shape."""
    if value is None:
        return None
    value = jnp.asarray(value)
    if value.shape != expected:
        raise ValueError(f"{name} has shape {value.shape} but x needs shape {expected} here: {fix}")
    return value


def broadcast_shape_for(shape: tuple[int, ...], axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The shape that places ``shape`` (sizes along ``axes``) into an ``ndim``-array with 1s elsewhere."""
    out = [1] * ndim
    for a, s in zip(axes, shape, strict=True):
        out[a] = s
    return tuple(out)


def check_mask(mask: Any, x: jax.Array) -> jax.Array | None:
    """A mask must be boolean-like and broadcast to ``x`` dimension by dimension (same rank).

    NumPy's rule would right-align a ``(N,)`` mask against ``(N, C)`` and silently apply it to
    the features instead of the examples; requiring equal rank rules that out.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.ndim != x.ndim or any(m not in (1, s) for m, s in zip(mask.shape, x.shape, strict=True)):
        raise ValueError(
            f"mask has shape {mask.shape}, which does not broadcast to x's shape {x.shape} dimension "
            f"by dimension: give mask the rank of x ({x.ndim}) with size 1 where it is constant, "
            f"e.g. mask[:, None] for a per-example (N,) mask on (N, C) data."
        )
    if mask.dtype != jnp.bool_:
        if not (jnp.issubdtype(mask.dtype, jnp.integer) or jnp.issubdtype(mask.dtype, jnp.floating)):
            raise TypeError(f"mask must be boolean (True = valid element), got dtype {mask.dtype}.")
        mask = mask != 0
    return mask


def features_arg(shape: tuple[int, ...]) -> str:
    """How to pass a feature shape to ``init_params``/``init_stats`` in an error message."""
    return str(shape[0]) if len(shape) == 1 else str(shape)


def stats_dtype_ok(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32
