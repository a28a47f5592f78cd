"""Flax NNX modules: thin shells over bnjax's functional API.

Constructed like ``flax.nnx``'s own (``BatchNorm(num_features, *, rngs, ...)``), with the same
attribute names (``scale``, ``bias`` as ``nnx.Param``; ``mean``, ``var`` as ``nnx.BatchStat``) and
keywords with Flax's meanings and defaults; ``BatchNorm`` is in training mode by default and
``model.eval()`` / ``model.train()`` switch it, as in ``flax.nnx``. bnjax's extras are keywords:
``activation``; for ``BatchNorm`` also ``debias``, ``unbiased_running_var``,
``axis_index_groups`` and ``track_updates`` (see ``bnjax.linen``). ``use_fast_variance`` is
accepted and ignored: the variance is always the stable one. ``promote_dtype``, when given, is
called as Flax calls it; by default the output dtype is ``dtype`` or the promotion of x's and the
parameters' dtypes, as Flax.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bnjax._src import shells, weights
from bnjax._src.params import NormParams
from bnjax._src.running import BatchStats

Initializer = Callable[..., Any]
Axes = int | Sequence[int]
_zeros, _ones = nnx.initializers.zeros, nnx.initializers.ones
_lecun_normal = nnx.initializers.lecun_normal()
_EMPTY: Mapping[str, Any] = MappingProxyType({})
PromoteDtype = Callable[..., Any]  # Flax's promote_dtype signature: fn(arrays, *, dtype) -> arrays


def _value(v: nnx.Variable | None) -> jax.Array | None:
    return None if v is None else v[...]


class BatchNorm(nnx.Module):
    """Batch normalization (Ioffe & Szegedy 2015) as an NNX module; see ``bnjax.batch_norm``.

    Math: y = f(g·(x − μ)/√(σ² + ε) + b), batch statistics in training
    (``use_running_average=False``, the default) and the running ones after ``model.eval()``.
    ``mean_only=True``: y = f(g·(x − μ) + b), mean-only batch norm (Salimans & Kingma 2016; see
    ``bnjax.mean_only_batch_norm``), usually with ``use_scale=False`` after a ``WeightNorm``.

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
        use_running_average: bool | None = False,
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
        promote_dtype: PromoteDtype | None = None,
        bias_metadata: Mapping[str, Any] = _EMPTY,
        scale_metadata: Mapping[str, Any] = _EMPTY,
        activation: Callable[[jax.Array], jax.Array] | None = None,
        debias: bool = False,
        unbiased_running_var: bool = False,
        track_updates: bool | None = None,
        fused_backward: bool = True,
        mean_only: bool = False,
        rngs: nnx.Rngs,
    ):
        self.fused_backward, self.mean_only = fused_backward, mean_only
        self.use_running_average = use_running_average
        self.axis, self.momentum, self.epsilon, self.dtype = axis, momentum, epsilon, dtype
        self.axis_name, self.axis_index_groups, self.use_fast_variance = axis_name, axis_index_groups, use_fast_variance
        self.activation, self.debias, self.unbiased_running_var = activation, debias, unbiased_running_var
        self.track_updates, self.promote_dtype = track_updates, promote_dtype
        self.num_features, self.param_dtype = num_features, param_dtype
        self.use_scale, self.use_bias = use_scale, use_bias
        shape = (num_features,)
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata) if use_scale else None
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata) if use_bias else None
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        track = shells.tracks_updates(self)
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32)) if track else None
        self.skipped = nnx.BatchStat(jnp.zeros(shape, jnp.int32)) if track else None

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None) -> jax.Array:
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        if use_ra is None:
            raise ValueError(
                "BatchNorm: use_running_average is None both in the constructor and in the call; say which "
                "statistics to use: BatchNorm(..., use_running_average=False) for training (batch statistics), "
                "True for evaluation (running statistics), or pass it to the call, or switch with "
                "model.train() / model.eval()."
            )
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

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view(model, use_running_average=...)``, as Flax's BatchNorm."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class _Normalization(nnx.Module):
    """What the per-example shells share: configuration under Flax's attribute names, g and b as
    ``nnx.Param`` (with Flax's ``scale_metadata``/``bias_metadata``, e.g. sharding), and the call."""

    _method: Callable[..., jax.Array]

    def _configure(
        self,
        shape: tuple[int, ...],
        rngs: nnx.Rngs,
        *,
        use_scale: bool,
        use_bias: bool,
        scale_init: Initializer,
        bias_init: Initializer,
        param_dtype: Any,
        scale_metadata: Mapping[str, Any],
        bias_metadata: Mapping[str, Any],
        **config: Any,
    ) -> None:
        for name, value in config.items():
            setattr(self, name, value)
        self.use_scale, self.use_bias, self.param_dtype = use_scale, use_bias, param_dtype
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata) if use_scale else None
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata) if use_bias else None

    def __call__(self, x: jax.Array, *, mask: Any = None) -> jax.Array:
        """``mask``: optional boolean array of x's rank, True = valid (padding: see the functional method)."""
        return type(self)._method(self, x, NormParams(_value(self.scale), _value(self.bias)), mask)


class LayerNorm(_Normalization):
    """Layer normalization (Ba et al. 2016) as an NNX module; see ``bnjax.layer_norm``.

    Math: y = f(g·(x − μ)/√(σ² + ε) + b), μ, σ² over ``reduction_axes`` of each example, g and b of
    shape ``(num_features,)`` on ``feature_axes``. Keywords and defaults as ``flax.nnx.LayerNorm``.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> bnjax.nnx.LayerNorm(5, rngs=nnx.Rngs(0))(jnp.ones((2, 5))).shape
      (2, 5)
    """

    _method = shells.layer_norm

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
        axis_name: str | tuple[str, ...] | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtype | None = None,
        bias_metadata: Mapping[str, Any] = _EMPTY,
        scale_metadata: Mapping[str, Any] = _EMPTY,
        activation: Callable[[jax.Array], jax.Array] | None = None,
        fused_backward: bool = True,
        rngs: nnx.Rngs,
    ):
        self._configure(
            (num_features,),
            rngs,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
            num_features=num_features,
            epsilon=epsilon,
            dtype=dtype,
            reduction_axes=reduction_axes,
            feature_axes=feature_axes,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            activation=activation,
            fused_backward=fused_backward,
        )


class GroupNorm(_Normalization):
    """Group normalization (Wu & He 2018) as an NNX module; see ``bnjax.group_norm``.

    Math: per example, μ, σ² over each group of channels (channels last) and the other axes of
    ``reduction_axes`` (Flax's meaning: the axes of one statistic, -1 among them; default every axis
    but the batch axis 0); g, b per channel. ``num_groups`` (default 32) or ``group_size``.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> bnjax.nnx.GroupNorm(8, num_groups=2, rngs=nnx.Rngs(0))(jnp.ones((2, 4, 4, 8))).shape
      (2, 4, 4, 8)
    """

    _method = shells.group_norm

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
        reduction_axes: Axes | None = None,
        axis_name: str | tuple[str, ...] | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtype | None = None,
        bias_metadata: Mapping[str, Any] = _EMPTY,
        scale_metadata: Mapping[str, Any] = _EMPTY,
        activation: Callable[[jax.Array], jax.Array] | None = None,
        fused_backward: bool = True,
        rngs: nnx.Rngs,
    ):
        self.num_groups, self.group_size = num_groups, group_size
        self.num_groups = shells.num_groups(self, num_features)  # validated at construction, as Flax
        self._configure(
            (num_features,),
            rngs,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
            num_features=num_features,
            epsilon=epsilon,
            dtype=dtype,
            reduction_axes=reduction_axes,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            activation=activation,
            fused_backward=fused_backward,
        )


class InstanceNorm(_Normalization):
    """Instance normalization (Ulyanov et al. 2016) as an NNX module; see ``bnjax.instance_norm``.

    Math: per example and channel, μ, σ² over every axis but the batch axis 0 and ``feature_axes``
    (default -1, channels last); g, b of shape ``(num_features,)`` on ``feature_axes``.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> bnjax.nnx.InstanceNorm(3, rngs=nnx.Rngs(0))(jnp.ones((2, 4, 4, 3))).shape
      (2, 4, 4, 3)
    """

    _method = shells.instance_norm

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
        feature_axes: Axes = -1,
        axis_name: str | tuple[str, ...] | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtype | None = None,
        bias_metadata: Mapping[str, Any] = _EMPTY,
        scale_metadata: Mapping[str, Any] = _EMPTY,
        activation: Callable[[jax.Array], jax.Array] | None = None,
        fused_backward: bool = True,
        rngs: nnx.Rngs,
    ):
        self._configure(
            (num_features,),
            rngs,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
            num_features=num_features,
            epsilon=epsilon,
            dtype=dtype,
            feature_axes=feature_axes,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            activation=activation,
            fused_backward=fused_backward,
        )


class RMSNorm(_Normalization):
    """RMS normalization (Zhang & Sennrich 2019) as an NNX module; see ``bnjax.rms_norm``.

    Math: y = f(g·x/√(mean(x²) + ε)), the mean over ``reduction_axes``, g of shape
    ``(num_features,)`` on ``feature_axes``; no bias (as Flax).

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> bnjax.nnx.RMSNorm(6, rngs=nnx.Rngs(0))(jnp.ones((2, 6))).shape
      (2, 6)
    """

    _method = shells.rms_norm

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
        feature_axes: Axes = -1,
        axis_name: str | tuple[str, ...] | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtype | None = None,
        scale_metadata: Mapping[str, Any] = _EMPTY,
        activation: Callable[[jax.Array], jax.Array] | None = None,
        fused_backward: bool = True,
        rngs: nnx.Rngs,
    ):
        self._configure(
            (num_features,),
            rngs,
            use_scale=use_scale,
            use_bias=False,
            scale_init=scale_init,
            bias_init=_zeros,
            param_dtype=param_dtype,
            scale_metadata=scale_metadata,
            bias_metadata=_EMPTY,
            num_features=num_features,
            epsilon=epsilon,
            dtype=dtype,
            reduction_axes=reduction_axes,
            feature_axes=feature_axes,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            activation=activation,
            fused_backward=fused_backward,
        )


# ---------------------------------------------------------------------------------------------
# Statistics from the weights


def _kernel(layer: nnx.Module) -> jax.Array:
    """The wrapped layer's ``kernel`` value, or a clear error for a layer that has none."""
    kernel = getattr(layer, "kernel", None)
    if not isinstance(kernel, nnx.Param):
        raise TypeError(
            f"{type(layer).__name__} has no nnx.Param named 'kernel': the weight-side wrappers "
            "normalize a layer's kernel, e.g. nnx.Linear or nnx.Conv."
        )
    return kernel[...]


def _call_with_kernel(layer: nnx.Module, kernel: jax.Array, *args: Any, **kwargs: Any) -> Any:
    """Calls a copy of ``layer`` whose ``kernel`` reads ``kernel``; ``layer`` itself is untouched."""
    copy = nnx.merge(*nnx.split(layer))
    # rebinds the copy's attribute; in-place writes would reach layer's
    copy.kernel = nnx.Param(kernel)  # type: ignore[attr-defined]
    return copy(*args, **kwargs)


class WeightNorm(nnx.Module):
    """Weight normalization (Salimans & Kingma 2016) of a wrapped layer's ``kernel``.

    Math: the layer computes with w = g · v/‖v‖ (norm over every axis but ``feature_axis``); its own
    kernel v is never overwritten; g (``scale``) starts at ‖v‖, so wrapping leaves the output
    unchanged. See ``bnjax.weight_norm``.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> dense = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> layer = bnjax.nnx.WeightNorm(dense)
      >>> bool(jnp.allclose(layer(jnp.ones((2, 4))), dense(jnp.ones((2, 4))), atol=1e-6))
      True
    """

    def __init__(self, layer: nnx.Module, *, feature_axis: int = -1, epsilon: float = 1e-12):
        self.layer, self.feature_axis, self.epsilon = layer, feature_axis, epsilon
        self.scale = nnx.Param(weights.weight_norm_init(_kernel(layer), axis=feature_axis))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        w = weights.weight_norm(_kernel(self.layer), self.scale[...], axis=self.feature_axis, eps=self.epsilon)
        return _call_with_kernel(self.layer, w, *args, **kwargs)


class WeightStandardization(nnx.Module):
    """Weight standardization (Qiao et al. 2019) of a wrapped layer's ``kernel``.

    Math: the layer computes with ŵ = (w − μ)/√(σ² + ε) over the fan-in of each output unit;
    its own kernel stays the raw w. See ``bnjax.weight_standardize``.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> conv = bnjax.nnx.WeightStandardization(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)))
      >>> conv(jnp.ones((1, 6, 6, 3))).shape
      (1, 6, 6, 4)
    """

    def __init__(self, layer: nnx.Module, *, feature_axis: int = -1, epsilon: float = 1e-5):
        self.layer, self.feature_axis, self.epsilon = layer, feature_axis, epsilon

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        w = weights.weight_standardize(_kernel(self.layer), axis=self.feature_axis, eps=self.epsilon)
        return _call_with_kernel(self.layer, w, *args, **kwargs)


class StandardizedConv(WeightStandardization):
    """``nnx.Conv`` with a standardized kernel (Qiao et al. 2019); arguments as ``nnx.Conv``.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> bnjax.nnx.StandardizedConv(3, 8, (3, 3), rngs=nnx.Rngs(0))(jnp.ones((2, 6, 6, 3))).shape
      (2, 6, 6, 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        epsilon: float = 1e-5,
        rngs: nnx.Rngs,
        **conv_kwargs: Any,
    ):
        super().__init__(nnx.Conv(in_features, out_features, kernel_size, rngs=rngs, **conv_kwargs), epsilon=epsilon)


class CosineDense(nnx.Module):
    """Cosine normalization (Luo et al. 2017) of a dense layer: y_j = x·w_j/(‖x‖‖w_j‖) ∈ [−1, 1].

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> bnjax.nnx.CosineDense(5, 3, rngs=nnx.Rngs(0))(jnp.ones((2, 5))).shape
      (2, 3)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        epsilon: float = 1e-8,
        kernel_init: Initializer = _lecun_normal,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.epsilon = epsilon
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return weights.cosine_norm(x, self.kernel[...], eps=self.epsilon)


class CosineConv(nnx.Module):
    """Cosine normalization of a convolution: cos θ between each input patch and each filter
    (Luo et al. 2017); see ``bnjax.cosine_norm_conv``. NHWC input, kernel (kh, kw, in, out).

    Math: y = (patch · w_j) / (‖patch‖ ‖w_j‖) ∈ [−1, 1] for every output position and filter j;
    no bias and no scale (the paper's form).

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> bnjax.nnx.CosineConv(2, 4, (3, 3), rngs=nnx.Rngs(0))(jnp.ones((1, 6, 6, 2))).shape
      (1, 6, 6, 4)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        padding: Any = "SAME",
        epsilon: float = 1e-8,
        kernel_init: Initializer = _lecun_normal,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.strides, self.padding, self.epsilon = strides, padding, epsilon
        shape = (*tuple(kernel_size), in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        return weights.cosine_norm_conv(x, kernel, strides=self.strides, padding=self.padding, eps=self.epsilon)


class SpectralNorm(nnx.Module):
    """Spectral normalization (Miyato et al. 2018) of a wrapped layer's ``kernel``.

    Math: the layer computes with w/σ_max(w), σ_max by power iteration with state ``u``
    (``nnx.BatchStat``, warmed up at construction). In training (``use_running_average=False``,
    the default; named as BatchNorm's so that ``model.eval()`` freezes it) each call runs
    ``n_steps`` iterations and stores u; in evaluation u is used as stored.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> layer = bnjax.nnx.SpectralNorm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
      >>> layer(jnp.ones((2, 4))).shape
      (2, 3)
    """

    def __init__(
        self,
        layer: nnx.Module,
        *,
        n_steps: int = 1,
        feature_axis: int = -1,
        epsilon: float = 1e-12,
        n_warmup: int = 15,
        use_running_average: bool = False,
        rngs: nnx.Rngs,
    ):
        self.layer, self.n_steps, self.feature_axis, self.epsilon = layer, n_steps, feature_axis, epsilon
        self.use_running_average = use_running_average
        kernel = _kernel(layer)
        self.u = nnx.BatchStat(weights.spectral_norm_init(rngs.params(), kernel, axis=feature_axis, n_warmup=n_warmup))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        w, u = weights.spectral_norm(
            _kernel(self.layer),
            self.u[...],
            n_steps=self.n_steps,
            axis=self.feature_axis,
            eps=self.epsilon,
            training=not self.use_running_average,
        )
        if not self.use_running_average:
            self.u[...] = u
        return _call_with_kernel(self.layer, w, *args, **kwargs)


__all__ = [
    "BatchNorm",
    "CosineConv",
    "CosineDense",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "SpectralNorm",
    "StandardizedConv",
    "WeightNorm",
    "WeightStandardization",
]
