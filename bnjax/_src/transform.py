"""The core of every method: h = f(g · (x − μ)/√(σ² + ε) + b). No parameters, no state, no Flax."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from bnjax._src.statistics import compute_dtype
from bnjax._src.validation import check_eps, check_floating

Activation = Callable[[jax.Array], jax.Array]


def _aligned(value: ArrayLike | None, x: jax.Array, name: str) -> jax.Array | None:
    """Right-aligns ``value`` against x (NumPy's rule), explicitly, with a clear error.

    Done here so callers under ``jax_numpy_rank_promotion="raise"`` may pass (C,) statistics for
    (..., C) data, and so a mismatch names the argument instead of failing deep inside XLA.
    """
    if value is None:
        return None
    value = jnp.asarray(value)
    if value.ndim > x.ndim or any(
        v not in (1, s) for v, s in zip(value.shape[::-1], x.shape[::-1][: value.ndim], strict=True)
    ):
        raise ValueError(
            f"{name} has shape {value.shape}, which does not broadcast against x's shape {x.shape} "
            f"(NumPy rule, aligned on the right): give {name} x's rank with size 1 on the reduced "
            "axes, e.g. moments(..., keepdims=True), or shape (C,) for channels-last data."
        )
    return value.reshape((1,) * (x.ndim - value.ndim) + value.shape)


def apply_normalization(
    x: jax.Array,
    mean: jax.Array | tuple[jax.Array, jax.Array] | None,
    var: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    eps,
    activation: Activation | None,
) -> jax.Array:
    """The transform on pre-validated, broadcast-ready operands (used by every method).

    Written as (x − μ)·(g/σ) + b rather than x·a + (b − μ·a): the folded form cancels
    catastrophically when |μ| ≫ σ, while x − μ is exact for nearby values and makes a constant
    feature give exactly b. ``var=None`` means σ = 1 (mean-only batch norm; ``eps`` unused).
    """
    dtype = compute_dtype(x.dtype)
    inv = None if var is None else lax.rsqrt(var.astype(dtype) + jnp.asarray(eps, dtype))
    if scale is not None:
        inv = scale.astype(dtype) if inv is None else inv * scale.astype(dtype)
    xc = x.astype(dtype)
    if isinstance(mean, tuple):  # (shift, offset): x − μ as (x − K) − δ, exact for nearby x and K
        xc = (xc - mean[0].astype(dtype)) - mean[1].astype(dtype)
    elif mean is not None:
        xc = xc - mean.astype(dtype)
    y = xc if inv is None else xc * inv
    if bias is not None:
        y = y + bias.astype(dtype)
    if activation is not None:
        y = activation(y)
    return y.astype(x.dtype)


def normalize(
    x: ArrayLike,
    mean: ArrayLike | None,
    var: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    activation: Activation | None = None,
) -> jax.Array:
    """The general transform that every bnjax method is an instance of.

    Math:

        h = f( g · (x − μ) / √(σ² + ε) + b )

    computed in float32 (or wider) for low-precision x, returned in x's dtype.

    Args:
      x: floating array, any shape.
      mean: μ, broadcastable against x (NumPy rule, right-aligned), or ``None`` for μ = 0
        (RMS norm, weight norm).
      var: σ², broadcastable against x.
      scale: g, broadcastable against x, or ``None`` for g = 1.
      bias: b, broadcastable against x, or ``None`` for b = 0.
      eps: ε > 0, added to σ² inside the square root.
      activation: optional f, applied in float32 before the cast back to x's dtype.

    Returns:
      h, same shape and dtype as x.

    Example:
      >>> import jax.numpy as jnp, bnjax
      >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
      >>> mean, var = bnjax.moments(x, axis=0)
      >>> bnjax.normalize(x, mean, var, eps=1e-12)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)

    References:
      Ioffe & Szegedy 2015, "Batch Normalization", Algorithm 1.
    """
    x = check_floating(x)
    check_eps(eps)
    if var is None:
        raise TypeError("var is required (σ²); for RMS-style scaling pass mean=None and var=mean(x²).")
    with jax.named_scope("bnjax.normalize"):
        return apply_normalization(
            x,
            _aligned(mean, x, "mean"),
            jnp.asarray(_aligned(var, x, "var")),
            _aligned(scale, x, "scale"),
            _aligned(bias, x, "bias"),
            eps,
            activation,
        )
