"""The learned re-scale g and re-shift b of h = f(g·x̂ + b)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax._src.statistics import compute_dtype
from bnjax._src.validation import _scalar_number, check_param_shape, features_arg


class NormParams(NamedTuple):
    """Learned affine parameters of a normalization layer: ``y = scale · x̂ + bias``.

    Attributes:
      scale: g, shape ``(features,)`` (or the shape of the feature axes), or ``None`` for g = 1.
      bias: b, same shape as ``scale``, or ``None`` for b = 0.

    Either may instead be per-example (conditional): an array of x's rank whose every dimension is
    1 or x's, e.g. (N, 1, C) for x (N, T, C), computed from a condition (FiLM, Perez et al. 2018;
    conditional batch norm, de Vries et al. 2017; AdaLN, Peebles & Xie 2023), applied by
    broadcasting; its gradient has its own shape.

    A NamedTuple, hence a pytree: it jits, tree-maps, checkpoints and takes gradients as is.
    """

    scale: jax.Array | None = None
    bias: jax.Array | None = None


def init_params(
    features: int | tuple[int, ...],
    *,
    dtype: Any = jnp.float32,
    use_scale: bool = True,
    use_bias: bool = True,
) -> NormParams:
    """Identity affine parameters: g = 1, b = 0.

    With these the layer outputs x̂ itself; training moves g and b, and g = √Var[x], b = E[x]
    recovers the identity map (Ioffe & Szegedy 2015, §3), so normalization costs no expressive power.

    Args:
      features: number of features (the size of the channel axis), or a shape tuple.
      dtype: parameter dtype.
      use_scale: create g; otherwise ``scale`` is ``None`` (g = 1).
      use_bias: create b; otherwise ``bias`` is ``None`` (b = 0).

    Returns:
      ``NormParams(scale, bias)``, each of shape ``(features,)`` or ``None``.

    Example:
      >>> import bnjax
      >>> bnjax.init_params(3)
      NormParams(scale=Array([1., 1., 1.], dtype=float32), bias=Array([0., 0., 0.], dtype=float32))

    References:
      Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by Reducing
      Internal Covariate Shift".
    """
    shape = (features,) if isinstance(features, int) else tuple(features)
    return NormParams(
        scale=jnp.ones(shape, dtype) if use_scale else None,
        bias=jnp.zeros(shape, dtype) if use_bias else None,
    )


def _per_example(value: jax.Array, x_shape: tuple[int, ...] | None) -> bool:
    """Whether ``value`` is a per-example (conditional) parameter: x's rank, each dimension 1 or x's."""
    return (
        x_shape is not None
        and value.ndim == len(x_shape)
        and all(v in (1, s) for v, s in zip(value.shape, x_shape, strict=True))
    )


def check_params(
    params: NormParams | None, feature_shape: tuple[int, ...], what: str, x_shape: tuple[int, ...] | None = None
) -> NormParams:
    """Validates ``params``; ``None`` means no affine map.

    Each of g and b has the feature shape, or, given ``x_shape``, x's rank with every dimension 1
    or equal to x's: a per-example (conditional) parameter such as (N, 1, C) for x (N, T, C)
    (FiLM, conditional batch norm, AdaLN), applied elementwise by broadcasting.
    """
    if params is None:
        return NormParams(None, None)
    if not isinstance(params, NormParams):
        if isinstance(params, tuple) and len(params) == 2:
            params = NormParams(*params)
        else:
            raise TypeError(
                f"params must be a bnjax.NormParams(scale, bias) (or None), got {type(params).__name__}; "
                f"create one with bnjax.init_params({features_arg(feature_shape)})."
            )
    fix = (
        f"{what} has shape {feature_shape}; create matching params with "
        f"bnjax.init_params({features_arg(feature_shape)}), or pass "
        "the axis argument that selects the features these params were made for"
    )
    if x_shape is not None:
        example = tuple(1 if i else s for i, s in enumerate(x_shape))
        fix += (
            f"; per-example (conditional) params have x's rank {len(x_shape)}, each dimension 1 or x's "
            f"(e.g. {example} with the batch axis, for x {tuple(x_shape)})"
        )
    fix += "."

    def one(value: Any, name: str) -> jax.Array | None:
        if value is not None:
            value = jnp.asarray(value)
            if value.shape != feature_shape and _per_example(value, x_shape):
                return value
        return check_param_shape(value, feature_shape, name, fix)

    return NormParams(one(params.scale, "params.scale"), one(params.bias, "params.bias"))


def with_scale_offset(params: NormParams, scale_offset: Any, x_dtype: Any) -> NormParams:
    """``params`` with the gain ``scale_offset + scale``, formed in float32 (or wider); unchanged for
    a concrete offset of 0. A traced offset is allowed (it enters as an operand)."""
    concrete = _scalar_number(scale_offset, "scale_offset", ": e.g. 1.0 for a zero-centred scale (Gemma)")
    if concrete is not None and float(concrete) == 0.0:
        return params
    if params.scale is None:
        raise ValueError(
            f"scale_offset={scale_offset!r} offsets params.scale, which is None: give params a scale "
            "(init_params(C) with scale zeros for a zero-centred gain), or leave scale_offset at 0."
        )
    dtype = jnp.promote_types(compute_dtype(jnp.dtype(x_dtype)), compute_dtype(params.scale.dtype))
    return NormParams(jnp.asarray(scale_offset, dtype) + params.scale.astype(dtype), params.bias)
