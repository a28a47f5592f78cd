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


def _static_int(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer known at trace time (int, NumPy integer, a
    concrete 0-d integer array), else None. Booleans are not integers here."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and jnp.issubdtype(value.dtype, jnp.integer):
        return int(value)
    return None


def check_int(value: Any, name: str, minimum: int, hint: str = "") -> int:
    """An integer hyper-parameter known at trace time (int-like, not bool), at least ``minimum``."""
    number = _static_int(value)
    if number is None:
        kind = "a traced value" if isinstance(value, jax.core.Tracer) else f"{value!r} ({type(value).__name__})"
        raise TypeError(f"{name} must be a Python int known at trace time (it fixes shapes), got {kind}{hint}.")
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}{hint}.")
    return number


def canonical_axes(axis: Axes, ndim: int, *, name: str = "axis", shape: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Returns ``axis`` as a sorted tuple of non-negative ints, or raises naming ``name``.

    Accepts an int (or NumPy integer, or concrete 0-d integer array), a sequence of them, or a
    ``slice`` over x's axes (Haiku's convention, e.g. ``slice(1, None)``: every axis but the first).
    """
    fix = f"{name} must be an int, a tuple of ints or a slice of x's axes (e.g. {name}=-1 or {name}=(1, 2, 3))"
    if isinstance(axis, slice):
        axes: tuple[Any, ...] = tuple(range(ndim))[axis]
        if not axes:
            raise ValueError(f"{name}={axis!r} selects no axis of x with {ndim} dimensions (shape {shape}).")
    elif _static_int(axis) is not None:
        axes = (axis,)
    elif isinstance(axis, (list, tuple)):
        axes = tuple(axis)
    else:
        raise TypeError(f"{fix}, got {axis!r} ({type(axis).__name__}).")
    out = []
    for a in axes:
        number = _static_int(a)
        if number is None:
            raise TypeError(f"{fix}, got {axis!r}, whose entry {a!r} is not an int.")
        if not -ndim <= number < ndim:
            raise ValueError(
                f"{name}={axis!r} is out of range for x with {ndim} dimensions (shape {shape}): "
                f"use axes in [{-ndim}, {ndim - 1}], e.g. {name}=-1 for channels-last (NHWC) or "
                f"{name}=1 for channels-first (NCHW)."
            )
        out.append(number % ndim)
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


def _scalar_number(value: Any, name: str, hint: str) -> np.ndarray | None:
    """A real scalar hyper-parameter: its concrete value (a 0-d NumPy array), or None when traced.

    Raises a ``TypeError`` naming ``name`` for anything but a real number (None, strings, bools,
    complex), and a ``ValueError`` for an array that is not a scalar, traced or not.
    """
    if value is None or isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__}){hint}.")
    if isinstance(value, jax.core.Tracer):
        dtype, shape, concrete = value.dtype, value.shape, None
    else:
        try:
            concrete = np.asarray(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__}){hint}.") from e
        dtype, shape = concrete.dtype, concrete.shape
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)) or dtype == np.bool_:
        raise TypeError(f"{name} must be a real number, got {value!r} of dtype {dtype}{hint}.")
    if shape != ():
        raise ValueError(
            f"{name} must be a scalar, got an array of shape {shape}: one value serves every "
            f"feature (to vary {name} over a batch of models, jax.vmap over it)."
        )
    return concrete


def check_eps(eps: Any, dtype: Any = jnp.float32) -> None:
    """ε > 0, finite, and a normal number of the compute ``dtype`` (float32 for float32 and
    low-precision data): a smaller ε vanishes in σ² + ε (denormals are flushed to zero on CPU
    and GPU), and a constant feature would then give 0/0. A traced ε is allowed (its value is
    checked by nobody; it enters the computation as an operand)."""
    hint = ": typical values are 1e-5 (PyTorch, Flax) or 1e-3 (Keras)"
    concrete = _scalar_number(eps, "eps", hint)
    if concrete is None:
        return
    value = float(concrete)
    if not value > 0 or not np.isfinite(value):
        raise ValueError(
            f"eps must be a finite number > 0, got {eps!r}: it keeps 1/sqrt(var + eps) finite for "
            "constant features; typical values are 1e-5 (PyTorch, Flax) or 1e-3 (Keras)."
        )
    tiny = float(jnp.finfo(dtype).tiny)
    if value < tiny:
        raise ValueError(
            f"eps={eps!r} is below the smallest normal {jnp.dtype(dtype).name} number ({tiny:.3g}), the "
            "dtype the statistics are computed in: it would vanish in var + eps, and a constant feature "
            "would give 0/0 = NaN. Use eps >= 1e-12 or so (1e-5 is the usual value)."
        )


def check_momentum(momentum: Any) -> None:
    """momentum ∈ [0, 1) or None, checked now when known; a traced momentum is checked at run time
    (``running.update`` applies no update for a value outside [0, 1) and counts it as skipped)."""
    if momentum is None:
        return
    hint = ": the weight of the old running value, in [0, 1), or None for a cumulative average"
    concrete = _scalar_number(momentum, "momentum", hint)
    if concrete is None:
        return
    value = float(concrete)
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
    # the values of a mask known now (NumPy, or a concrete array), read before jnp.asarray, which
    # under jit turns a NumPy constant into a traced value
    concrete = None if isinstance(mask, jax.core.Tracer) else np.asarray(mask)
    mask = jnp.asarray(mask)
    if mask.ndim != x.ndim or any(m not in (1, s) for m, s in zip(mask.shape, x.shape, strict=True)):
        raise ValueError(
            f"mask has shape {mask.shape}, which does not broadcast to x's shape {x.shape} dimension "
            f"by dimension: give mask the rank of x ({x.ndim}) with size 1 where it is constant, "
            f"e.g. mask[:, None] for a per-example (N,) mask on (N, C) data."
        )
    if mask.dtype != jnp.bool_:
        numeric = jnp.issubdtype(mask.dtype, jnp.integer) or jnp.issubdtype(mask.dtype, jnp.floating)
        if not numeric:
            raise TypeError(f"mask must be boolean (True = valid element), got dtype {mask.dtype}.")
        if concrete is None:
            if jnp.issubdtype(mask.dtype, jnp.floating):
                raise TypeError(
                    f"mask has dtype {mask.dtype} and is traced, so bnjax cannot check that it holds only "
                    "0 and 1: a fractional entry (a sample weight) would silently count as valid. Pass a "
                    "boolean mask, e.g. mask > 0 (masks select elements; they do not weight them)."
                )
        else:
            values = np.unique(concrete)
            if not np.isin(values, (0, 1)).all():
                raise ValueError(
                    f"mask must be boolean or hold only 0 and 1, got the values {values[:8].tolist()}: masks "
                    "select the valid elements, they do not weight them (no sample weights); pass "
                    "mask > 0 to select the nonzero entries."
                )
        mask = mask != 0
    return mask


def features_arg(shape: tuple[int, ...]) -> str:
    """How to pass a feature shape to ``init_params``/``init_stats`` in an error message."""
    return str(shape[0]) if len(shape) == 1 else str(shape)


def stats_dtype_ok(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32
