"""Flax NNX modules: thin shells over bnjax's functional API.

Constructed like ``flax.nnx``'s own (``BatchNorm(num_features, *, rngs, ...)``), with the same
attribute names (``scale``, ``bias`` as ``nnx.Param``; ``mean``, ``var`` as ``nnx.BatchStat``) and
keywords with Flax's meanings and defaults; ``BatchNorm`` is in training mode by default and
``model.eval()`` / ``model.train()`` switch it, as in ``flax.nnx``. bnjax's extras are keywords:
``activation``; for ``BatchNorm`` also ``debias``, ``unbiased_running_var``,
``axis_index_groups`` and ``track_updates`` (see ``bnjax.linen``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bnjax._src import shells
from bnjax._src.params import NormParams
from bnjax._src.running import BatchStats

Initializer = Callable[..., Any]
Axes = int | Sequence[int]
_zeros, _ones = nnx.initializers.zeros, nnx.initializers.ones


def _value(v: nnx.Variable | None) -> jax.Array | None:
    return None if v is None else v[...]


def _params(shape, rngs, use_scale, use_bias, scale_init, bias_init, param_dtype):
    scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype)) if use_scale else None
    bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype)) if use_bias else None
    return scale, bias


class BatchNorm(nnx.Module):
    """Batch normalization (Ioffe & Szegedy 2015) as an NNX module; see ``bnjax.batch_norm``.

    Math: y = f(g·(x − μ)/√(σ² + ε) + b), batch statistics in training
    (``use_running_average=False``, the default) and the running ones after ``model.eval()``.

    Shapes: x (..., num_features) with the features on ``axis``; output x's shape and dtype.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> layer = bnjax.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
      >>> y = layer(jnp.ones((4, 3)).at[0].set(2.0))
      >>> round(float(layer.mean[...][0]), 4)  # plain EMA from 0: (1 - 0.9) * batch mean 1.25
      0.125
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        axis: int = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        axis_name: str | tuple[str, ...] | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        activation: Callable[[jax.Array], jax.Array] | None = None,
        debias: bool = False,
        unbiased_running_var: bool = False,
        track_updates: bool | None = None,
        rngs: nnx.Rngs,
    ):
        self.use_running_average = use_running_average
        self.axis, self.momentum, self.epsilon, self.dtype = axis, momentum, epsilon, dtype
        self.axis_name, self.axis_index_groups, self.use_fast_variance = axis_name, axis_index_groups, use_fast_variance
        self.activation, self.debias, self.unbiased_running_var = activation, debias, unbiased_running_var
        self.track_updates = track_updates
        shape = (num_features,)
        self.scale, self.bias = _params(shape, rngs, use_scale, use_bias, scale_init, bias_init, param_dtype)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        track = shells.tracks_updates(self)
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32)) if track else None
        self.skipped = nnx.BatchStat(jnp.zeros(shape, jnp.int32)) if track else None

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None) -> jax.Array:
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        count = _value(self.count)
        stats = BatchStats(self.mean[...], self.var[...], jnp.zeros((), jnp.int32) if count is None else count)
        stats = stats._replace(skipped=_value(self.skipped))
        params = NormParams(_value(self.scale), _value(self.bias))
        y, new = shells.batch_norm(self, x, params, stats, not use_ra, mask)
        if not use_ra:
            self.mean[...], self.var[...] = new.mean, new.var
            if self.count is not None and self.skipped is not None:
                self.count[...], self.skipped[...] = new.count, new.skipped
        return y


class LayerNorm(nnx.Module):
    """Layer normalization (Ba et al. 2016) as an NNX module; see ``bnjax.layer_norm``.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> bnjax.nnx.LayerNorm(5, rngs=nnx.Rngs(0))(jnp.ones((2, 5))).shape
      (2, 5)
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        use_fast_variance: bool = True,
        activation: Callable[[jax.Array], jax.Array] | None = None,
        rngs: nnx.Rngs,
    ):
        self.epsilon, self.dtype, self.activation = epsilon, dtype, activation
        self.reduction_axes, self.feature_axes, self.use_fast_variance = reduction_axes, feature_axes, use_fast_variance
        self.scale, self.bias = _params((num_features,), rngs, use_scale, use_bias, scale_init, bias_init, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return shells.layer_norm(self, x, NormParams(_value(self.scale), _value(self.bias)))


class GroupNorm(nnx.Module):
    """Group normalization (Wu & He 2018) as an NNX module; see ``bnjax.group_norm``.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> bnjax.nnx.GroupNorm(8, num_groups=2, rngs=nnx.Rngs(0))(jnp.ones((2, 4, 4, 8))).shape
      (2, 4, 4, 8)
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        use_fast_variance: bool = True,
        activation: Callable[[jax.Array], jax.Array] | None = None,
        rngs: nnx.Rngs,
    ):
        self.num_groups, self.group_size, self.epsilon, self.dtype = num_groups, group_size, epsilon, dtype
        self.activation, self.use_fast_variance = activation, use_fast_variance
        shells.num_groups(self, num_features)  # validate at construction
        self.scale, self.bias = _params((num_features,), rngs, use_scale, use_bias, scale_init, bias_init, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return shells.group_norm(self, x, NormParams(_value(self.scale), _value(self.bias)))


class InstanceNorm(nnx.Module):
    """Instance normalization (Ulyanov et al. 2016) as an NNX module; see ``bnjax.instance_norm``.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> bnjax.nnx.InstanceNorm(3, rngs=nnx.Rngs(0))(jnp.ones((2, 4, 4, 3))).shape
      (2, 4, 4, 3)
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        use_fast_variance: bool = True,
        activation: Callable[[jax.Array], jax.Array] | None = None,
        rngs: nnx.Rngs,
    ):
        self.epsilon, self.dtype, self.activation, self.use_fast_variance = (
            epsilon,
            dtype,
            activation,
            use_fast_variance,
        )
        self.scale, self.bias = _params((num_features,), rngs, use_scale, use_bias, scale_init, bias_init, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return shells.instance_norm(self, x, NormParams(_value(self.scale), _value(self.bias)))


class RMSNorm(nnx.Module):
    """RMS normalization (Zhang & Sennrich 2019) as an NNX module; see ``bnjax.rms_norm``.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> bnjax.nnx.RMSNorm(6, rngs=nnx.Rngs(0))(jnp.ones((2, 6))).shape
      (2, 6)
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = _ones,
        reduction_axes: Axes = -1,
        use_fast_variance: bool = True,
        activation: Callable[[jax.Array], jax.Array] | None = None,
        rngs: nnx.Rngs,
    ):
        self.epsilon, self.dtype, self.activation = epsilon, dtype, activation
        self.reduction_axes, self.use_fast_variance = reduction_axes, use_fast_variance
        self.scale, _ = _params((num_features,), rngs, use_scale, False, scale_init, _zeros, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return shells.rms_norm(self, x, NormParams(_value(self.scale), None))


__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]
