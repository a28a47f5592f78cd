"""The learned re-scale g and re-shift b of h = f(g·x̂ + b)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax._src.validation import check_param_shape, features_arg


class NormParams(NamedTuple):
    """Learned affine parameters of a normalization layer: ``y = scale · x̂ + bias``.

    Attributes:
      scale: g, shape ``(features,)`` (or the shape of the feature axes), or ``None`` for g = 1.
      bias: b, same shape as ``scale``, or ``None`` for b = 0.

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


def check_params(params: NormParams | None, feature_shape: tuple[int, ...], what: str) -> NormParams:
    """Validates ``params`` against the feature shape; ``None`` means no affine map."""
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
        "the axis argument that selects the features these params were made for."
    )
    return NormParams(
        check_param_shape(params.scale, feature_shape, "params.scale", fix),
        check_param_shape(params.bias, feature_shape, "params.bias", fix),
    )
