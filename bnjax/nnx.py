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

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from bnjax._src import folding, shells, statistics, weights
from bnjax._src.params import NormParams
from bnjax._src.running import AccumulatingStats, BatchStats

Initializer = Callable[..., Any]
Axes = int | Sequence[int]
_zeros, _ones = nnx.initializers.zeros, nnx.initializers.ones
_lecun_normal = nnx.initializers.lecun_normal()
_EMPTY: Mapping[str, Any] = MappingProxyType({})
PromoteDtype = Callable[..., Any]  # Flax's promote_dtype signature: fn(arrays, *, dtype) -> arrays
_KERNEL = nnx.PathContains("kernel")  # the weight wrappers' default variable_filter, as Flax


def _value(v: nnx.Variable | None) -> jax.Array | None:
    return None if v is None else v[...]


class BatchNorm(nnx.Module):
    """Batch normalization (Ioffe & Szegedy 2015) as an NNX module; see ``bnjax.batch_norm``.

    Math: y = f(g·(x − μ)/√(σ² + ε) + b), batch statistics in training
    (``use_running_average=False``, the default) and the running ones after ``model.eval()``.
    ``mean_only=True``: y = f(g·(x − μ) + b), mean-only batch norm (Salimans & Kingma 2016; see
    ``bnjax.mean_only_batch_norm``), usually with ``use_scale=False`` after a ``WeightNorm``.
    ``frozen=True``: always the stored statistics, never an update, no gradient to ``scale`` and
    ``bias``, whatever ``model.train()`` or ``use_running_average`` say (fine-tuning; a call
    passing ``use_running_average=False`` is an error). ``virtual_batch_size``: ghost batch norm
    (Hoffer et al. 2017; see ``bnjax.batch_norm``). ``accumulation_steps=k``: gradient
    accumulation, one running update per k training calls with the pooled statistics of their
    micro-batches (see ``bnjax.batch_norm``); the layer then also holds the ``nnx.BatchStat``
    attributes ``pending_count``, ``pending_shift``, ``pending_offset``, ``pending_m2`` and ``phase``.

    Shapes: x (..., num_features) with the features on ``axis``; output x's shape and dtype.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> layer = bnjax.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
      >>> y = layer(jnp.ones((4, 3)).at[0].set(2.0))
      >>> round(float(layer.mean[...][0]), 4)  # plain EMA from 0: (1 - 0.9) * batch mean 1.25
      0.125
    """

    _precise_capture: Any = None  # a _Captured variable while precise_batch_stats runs

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
        frozen: bool = False,
        virtual_batch_size: int | None = None,
        accumulation_steps: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.fused_backward, self.mean_only, self.frozen = fused_backward, mean_only, frozen
        self.virtual_batch_size, self.accumulation_steps = virtual_batch_size, accumulation_steps
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
        k = shells.accumulation_steps(self)
        if k is not None:  # gradient accumulation: the pending micro-batches' moments and the phase
            for name in shells.PENDING:
                setattr(self, name, nnx.BatchStat(jnp.zeros(shape, jnp.float32)))
            self.phase = nnx.BatchStat(jnp.zeros((k,), jnp.int32))

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None) -> jax.Array:
        params = NormParams(_value(self.scale), _value(self.bias))
        return self._normalize(x, params, use_running_average, mask)

    def _normalize(
        self,
        x: jax.Array,
        params: NormParams,
        use_running_average: bool | None,
        mask: Any,
        renorm: tuple[Any, Any] | None = None,
    ) -> jax.Array:
        """The statistics and the call, for given g and b (the layer's own, or per-example ones)."""
        use_ra: bool | None = True
        if self.frozen:
            params = shells.frozen(params, use_running_average)
        else:
            use_ra = self.use_running_average if use_running_average is None else use_running_average
        capture = self._precise_capture
        if capture is not None and not self.frozen and not use_ra:  # set by precise_batch_stats for its pass
            capture.set_value(statistics.pool(capture.get_value(), shells.input_moments(self, x, mask)))
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
        k = shells.accumulation_steps(self)
        state: Any = stats
        if k is not None:
            pending = statistics.Moments(*(getattr(self, n)[...] for n in shells.PENDING))
            state = AccumulatingStats(stats, pending, self.phase[...])
        y, new = shells.batch_norm(self, x, params, state, not use_ra, mask, renorm=renorm)
        if not use_ra:
            if k is not None:
                for name, value in zip(shells.PENDING, new.pending, strict=True):
                    getattr(self, name)[...] = value
                self.phase[...], new = new.phase, new.stats
            self.mean[...], self.var[...] = new.mean, new.var
            if self.count is not None and self.skipped is not None:
                self.count[...], self.skipped[...] = new.count, new.skipped
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view(model, use_running_average=...)``, as Flax's BatchNorm."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe 2017) as an NNX module; see ``bnjax.batch_renorm``.

    ``BatchNorm``'s constructor, attributes and modes, plus the bounds ``r_max`` (default 3) and
    ``d_max`` (default 5), attributes that the call may override (traced values too, for the
    paper's warm-up schedule inside a jitted step).

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> layer = bnjax.nnx.BatchRenorm(3, rngs=nnx.Rngs(0))
      >>> layer(jnp.arange(12.0).reshape(4, 3), r_max=1.5, d_max=0.5).shape
      (4, 3)

    References:
      Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in
      Batch-Normalized Models".
    """

    def __init__(self, num_features: int, *, r_max: float = 3.0, d_max: float = 5.0, rngs: nnx.Rngs, **kwargs: Any):
        super().__init__(num_features, rngs=rngs, **kwargs)
        self.r_max, self.d_max = r_max, d_max

    def __call__(  # type: ignore[override]
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: Any = None,
        r_max: Any = None,
        d_max: Any = None,
    ) -> jax.Array:
        """``r_max``, ``d_max``: this call's bounds (default: the attributes), e.g. from a schedule."""
        bounds = (self.r_max if r_max is None else r_max, self.d_max if d_max is None else d_max)
        params = NormParams(_value(self.scale), _value(self.bias))
        return self._normalize(x, params, use_running_average, mask, bounds)


class ConditionalBatchNorm(BatchNorm):
    """Conditional batch normalization (de Vries et al. 2017; Dumoulin et al. 2017) as an NNX
    module: batch norm whose g and b are predicted per example from a condition vector.

    Math: y = f(γ(c)·(x − μ)/√(σ² + ε) + β(c)), γ(c) = 1 + c·W_γ + b_γ, β(c) = c·W_β + b_β; the
    statistics, running state and keywords are ``BatchNorm``'s. ``scale`` and ``bias`` are
    ``nnx.Linear(cond_features, num_features)`` layers, zero-initialized (``cond_kernel_init``,
    ``cond_bias_init``), so the layer starts as a plain batch norm. See
    ``bnjax.linen.ConditionalBatchNorm``.

    Shapes: x (N, ..., num_features) (features on ``axis``, batch on axis 0), cond (N, cond_features).

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> layer = bnjax.nnx.ConditionalBatchNorm(3, 10, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((4, 8, 8, 3)), jnp.ones((4, 10))).shape
      (4, 8, 8, 3)

    References:
      de Vries, Strub, Mary, Larochelle, Pietquin & Courville 2017, "Modulating early visual
      processing by language"; Dumoulin, Shlens & Kudlur 2017, "A Learned Representation for
      Artistic Style".
    """

    def __init__(
        self,
        num_features: int,
        cond_features: int,
        *,
        use_scale: bool = True,
        use_bias: bool = True,
        cond_kernel_init: Initializer = _zeros,
        cond_bias_init: Initializer = _zeros,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **batch_norm_kwargs: Any,
    ):
        super().__init__(
            num_features, use_scale=False, use_bias=False, param_dtype=param_dtype, rngs=rngs, **batch_norm_kwargs
        )
        self.use_scale, self.use_bias = use_scale, use_bias

        def linear() -> nnx.Linear:
            return nnx.Linear(
                cond_features,
                num_features,
                kernel_init=cond_kernel_init,
                bias_init=cond_bias_init,
                param_dtype=param_dtype,
                rngs=rngs,
            )

        # nnx.data: the base class stored None here, which nnx then treats as a static attribute
        self.scale = nnx.data(linear()) if use_scale else None  # type: ignore[assignment]
        self.bias = nnx.data(linear()) if use_bias else None  # type: ignore[assignment]

    def __call__(  # type: ignore[override]
        self, x: jax.Array, cond: jax.Array, use_running_average: bool | None = None, *, mask: Any = None
    ) -> jax.Array:
        shape, _ = shells.conditional_shape(x, cond, self.axis, "ConditionalBatchNorm")
        scale = None if self.scale is None else 1.0 + self.scale(cond).reshape(shape)  # type: ignore[operator]
        bias = None if self.bias is None else self.bias(cond).reshape(shape)  # type: ignore[operator]
        return self._normalize(x, NormParams(scale, bias), use_running_average, mask)


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
    shape ``(num_features,)`` on ``feature_axes``. Keywords and defaults as ``flax.nnx.LayerNorm``;
    bnjax's extra ``scale_offset`` c makes the gain c + g (formed in float32; g still starts at
    ``scale_init``: pass ``nnx.initializers.zeros`` with c = 1 for a zero-centred g).

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
        scale_offset: float = 0.0,
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
            scale_offset=scale_offset,
        )


class AdaLNZero(nnx.Module):
    """The adaLN-Zero residual branch of DiT (Peebles & Xie 2023) as an NNX module; see
    ``bnjax.linen.AdaLNZero`` for the math: out = x + g ⊙ inner(layer_norm(x)·(1 + a) + s),
    (s, a, g) from ``modulation``, an ``nnx.Linear(cond_features, 3·features)`` applied to SiLU(c)
    and zero-initialized, so the branch starts as the identity.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> branch = bnjax.nnx.AdaLNZero(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), 16, 8, rngs=nnx.Rngs(1))
      >>> x = jnp.ones((2, 5, 8))
      >>> bool(jnp.array_equal(branch(x, jnp.ones((2, 16))), x))  # the identity at init
      True

    References:
      Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", §3.2 (adaLN-Zero).
    """

    def __init__(
        self,
        inner: Any,
        cond_features: int,
        features: int,
        *,
        epsilon: float = 1e-6,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer = _zeros,
        bias_init: Initializer = _zeros,
        rngs: nnx.Rngs,
    ):
        self.inner, self.epsilon = inner, epsilon
        self.modulation = nnx.Linear(
            cond_features,
            3 * features,
            kernel_init=kernel_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, cond: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        shape, _ = shells.conditional_shape(x, cond, -1, "AdaLNZero")
        return shells.ada_ln_zero(self, x, self.modulation(nnx.silu(cond)), shape, self.inner, *args, **kwargs)


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
    ``(num_features,)`` on ``feature_axes``; no bias (as Flax). bnjax's extras:
    ``scale_offset`` c (gain c + g, formed in float32; Gemma: c = 1 with
    ``scale_init=nnx.initializers.zeros``) and ``cast_before_scale`` (Llama's order); see
    ``bnjax.rms_norm``.

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
        scale_offset: float = 0.0,
        cast_before_scale: bool = False,
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
            scale_offset=scale_offset,
            cast_before_scale=cast_before_scale,
        )


class DyT(nnx.Module):
    """Dynamic Tanh (Zhu et al. 2025) as an NNX module, a drop-in for LayerNorm in transformers;
    see ``bnjax.dyt``.

    Math: y = f(g·tanh(α·x) + b), α a learned scalar ``nnx.Param`` (``alpha``, initialized to
    ``alpha_init_value``, the paper's 0.5), g (``scale``) and b (``bias``) of shape
    ``(num_features,)`` on ``feature_axes``.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> layer = bnjax.nnx.DyT(4, rngs=nnx.Rngs(0))
      >>> float(layer.alpha[...]), layer(jnp.ones((2, 4))).shape
      (0.5, (2, 4))

    References:
      Zhu, Chen, He, LeCun & Liu 2025, "Transformers without Normalization".
    """

    def __init__(
        self,
        num_features: int,
        *,
        alpha_init_value: float = 0.5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        feature_axes: Axes = -1,
        activation: Callable[[jax.Array], jax.Array] | None = None,
        rngs: nnx.Rngs,
    ):
        self.num_features, self.dtype, self.param_dtype = num_features, dtype, param_dtype
        self.feature_axes, self.activation = feature_axes, activation
        self.promote_dtype = None
        shape = (num_features,)
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype)) if use_scale else None
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype)) if use_bias else None
        self.alpha = nnx.Param(jnp.full((), alpha_init_value, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return shells.dyt(self, x, self.alpha[...], NormParams(_value(self.scale), _value(self.bias)))


class _Captured(nnx.Variable):
    """The pooled input moments of one BatchNorm during ``precise_batch_stats``."""


def precise_batch_stats(model: nnx.Module, batches: Iterable[Any], *, progress: bool = True) -> nnx.Module:
    """Population statistics after training, in place: every bnjax ``BatchNorm`` of ``model``
    (``BatchRenorm``, ``ConditionalBatchNorm`` too; frozen ones are left alone) gets the exact
    mean and variance of its inputs over all ``batches``; see ``bnjax.linen.precise_batch_stats``
    for the math.

    The model runs in training mode for the pass (``model.train()``) on each batch, the first
    positional argument of ``model(batch)``, under ``nnx.jit``; afterwards every module's
    ``use_running_average`` and ``deterministic`` attribute is restored, and so is every
    ``nnx.BatchStat`` but the new means and variances (a random stream the model draws from, e.g.
    dropout's, has advanced). Batches may differ in size; a one-pass iterable is read once.
    Returns ``model``.

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), bnjax.nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> batches = [jax.random.normal(jax.random.key(i), (8, 3)) for i in range(3)]
      >>> model = bnjax.nnx.precise_batch_stats(model, batches, progress=False)
      >>> model.layers[1].var[...].shape
      (4,)

    References:
      Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", §3 (precise BN).
    """
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, BatchNorm) and not m.frozen]
    if not layers:
        raise ValueError("precise_batch_stats found no (unfrozen) bnjax.nnx.BatchNorm in the model.")
    modes = [
        (m, name, getattr(m, name))
        for _, m in nnx.iter_graph(model)
        if isinstance(m, nnx.Module)
        for name in ("use_running_average", "deterministic")
        if hasattr(m, name)
    ]
    saved = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))

    step = nnx.jit(lambda m, batch: m(batch))
    totals: list[Any] = [None] * len(layers)
    model.train()
    try:
        for batch in shells.progress(batches, progress, "precise batch statistics"):
            for layer in layers:
                layer._precise_capture = _Captured(statistics.empty_moments((layer.num_features,)))
            step(model, batch)
            for i, layer in enumerate(layers):
                totals[i] = statistics.pool(totals[i], layer._precise_capture.get_value())
    finally:
        for layer in layers:
            if "_precise_capture" in vars(layer):
                del layer._precise_capture  # back to the class's None
        for m, name, value in modes:
            setattr(m, name, value)
        nnx.update(model, saved)
    for layer, total in zip(layers, totals, strict=True):
        if total is not None:
            layer.mean[...], layer.var[...] = total.mean, total.var
    return model


class FoldedModel(NamedTuple):
    """The result of ``fold_batch_norms``: the folded ``model`` (a copy); ``pairs`` maps each
    folded batch norm's path to the path of the layer it was folded into; ``kept`` maps each
    batch norm left as it was to the reason."""

    model: nnx.Module
    pairs: dict[str, str]
    kept: dict[str, str]


class Folded(nnx.Module):
    """What a folded batch norm becomes: its ``activation`` (or the identity)."""

    def __init__(self, activation: Callable[[jax.Array], jax.Array] | None = None):
        self.activation = activation

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        return x if self.activation is None else self.activation(x)


_ROUTE: contextvars.ContextVar[Any] = contextvars.ContextVar("bnjax_nnx_route", default=None)
_ROUTING: dict[type, type] = {}


def _routing_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` goes through the active route (``_routed``)."""
    if cls not in _ROUTING:

        def __call__(self: Any, *a: Any, **kw: Any) -> Any:
            hook, keys = _ROUTE.get()
            return hook(keys[id(self)], self, functools.partial(cls.__call__, self), a, kw)

        namespace = {"__call__": __call__, "__module__": cls.__module__, "_bnjax_routed": cls}
        _ROUTING[cls] = type(cls)(cls.__name__, (cls,), namespace)
    return _ROUTING[cls]


def _module_paths(model: nnx.Module) -> dict[str, nnx.Module]:
    return {"/".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}


@contextlib.contextmanager
def _routed(model: nnx.Module, hook: Any) -> Iterator[None]:
    """Routes every module call of ``model`` through ``hook(path, module, call, args, kwargs)``."""
    modules = _module_paths(model)
    classes = {path: type(m) for path, m in modules.items()}
    token = _ROUTE.set((hook, {id(m): path for path, m in modules.items()}))
    try:
        for path, m in modules.items():
            object.__setattr__(m, "__class__", _routing_class(classes[path]))
        yield
    finally:
        for path, m in modules.items():
            object.__setattr__(m, "__class__", classes[path])
        _ROUTE.reset(token)


def fold_batch_norms(model: nnx.Module, *args: Any, **kwargs: Any) -> FoldedModel:
    """Folds every evaluation-mode batch norm that directly follows an ``nnx.Linear`` or
    ``nnx.Conv`` into it; see ``bnjax.linen.fold_batch_norms`` for the math and the rules.

    The pairs are found by calling copies of the model on ``*args, **kwargs`` (put it in
    evaluation mode first: ``model.eval()``); ``model`` itself is left unchanged. In the returned
    copy each folded batch norm (``bnjax.nnx.BatchNorm``, ``BatchRenorm``, or
    ``flax.nnx.BatchNorm``) is replaced by a ``Folded`` module (its activation, or the identity),
    and the layer before it holds the folded kernel and bias (a layer without a bias gets one).

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(3, 4, use_bias=False, rngs=nnx.Rngs(0)),
      ...                        bnjax.nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> model.eval()
      >>> x = jnp.ones((2, 3))
      >>> folded = bnjax.nnx.fold_batch_norms(model, x)
      >>> folded.pairs, type(folded.model.layers[1]).__name__
      ({'layers/1': 'layers/0'}, 'Folded')
      >>> bool(jnp.allclose(folded.model(x), model(x), atol=1e-5))
      True

    References:
      Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
      Integer-Arithmetic-Only Inference", §3.2 (batch normalization folding).
    """

    def run(hook: folding.Hook) -> Any:
        copy = nnx.clone(model)  # a call in training mode updates statistics: never the model's
        with _routed(copy, hook):
            return copy(*args, **kwargs)

    def kind(m: nnx.Module) -> str | None:
        if isinstance(m, (BatchNorm, nnx.BatchNorm)):
            return "bn"
        cls = getattr(type(m), "_bnjax_routed", type(m))  # the class under the routing one
        return "layer" if issubclass(cls, (nnx.Linear, nnx.Conv)) and cls.__call__ in _PLAIN_CALLS else None

    pairs, kept = folding.find_pairs(run, kind, _unfoldable)
    out = nnx.clone(model)
    modules: dict[str, Any] = _module_paths(out)
    done = {}
    for bn_key, layer_key, _ in pairs:
        bn, layer = modules[bn_key], modules[layer_key]
        params = NormParams(_value(bn.scale), _value(bn.bias))
        stats = {"mean": bn.mean[...], "var": bn.var[...]}
        kernel, bias = folding.fold_batch_norm(layer.kernel[...], _value(layer.bias), params, stats, eps=bn.epsilon)
        layer.kernel[...] = kernel
        if layer.bias is None:
            layer.bias, layer.use_bias = nnx.Param(bias.astype(layer.param_dtype)), True
        else:
            layer.bias[...] = bias.astype(layer.bias[...].dtype)
        *parent_path, last = bn_key.split("/")
        parent = modules["/".join(parent_path)]
        replacement = Folded(getattr(bn, "activation", None))
        if last.isdigit() and not hasattr(parent, last):
            parent[int(last)] = replacement
        else:
            setattr(parent, last, replacement)
        done[bn_key] = layer_key
    return FoldedModel(out, done, kept)


_PLAIN_CALLS = (nnx.Linear.__call__, nnx.Conv.__call__)


def _unfoldable(m: Any, a: tuple, kw: dict) -> str:
    return folding.why_kept(
        m, a, kw, conditional=isinstance(m, ConditionalBatchNorm), mode_hint="call model.eval() first"
    )


# ---------------------------------------------------------------------------------------------
# Statistics from the weights


Path = tuple[Any, ...]


def _selected_params(layer: nnx.Module, variable_filter: Any) -> list[tuple[Path, nnx.Param]]:
    """The ``nnx.Param`` variables of ``layer`` that ``variable_filter`` selects (an nnx filter,
    called as Flax calls it, with the path inside the layer and the variable), in graph order."""
    select = nnx.filterlib.to_predicate(variable_filter)
    return [(path, var) for path, var in nnx.iter_graph(layer) if isinstance(var, nnx.Param) and select(path, var)]


def _call_with(layer: nnx.Module, values: Sequence[tuple[nnx.Param, jax.Array]], *args: Any, **kwargs: Any) -> Any:
    """Calls ``layer`` with each variable of ``values`` reading its value there, then restores them.

    The swap is in place, so everything else the layer does in the call (a BatchNorm inside it
    updating its statistics, an ``nnx.Rngs`` advancing) lands in the layer itself, and a layer
    shared with another part of the model sees the normalized weights only during this call. The
    layer's own parameters are never overwritten: after the call they hold the raw v again (a
    wrapper that wrote w into them, as Flax's do, would normalize the already normalized weight
    on the next call, and an optimizer would update w rather than v).
    """
    saved = [(var, var.get_value()) for var, _ in values]
    try:
        for var, value in values:
            var.set_value(value)
        return layer(*args, **kwargs)
    finally:
        for var, value in saved:
            var.set_value(value)


def _feature_axes_alias(feature_axes: Any, feature_axis: Any, owner: str) -> Any:
    if feature_axis is None:
        return feature_axes
    if feature_axes != -1:
        raise ValueError(
            f"{owner} got feature_axis={feature_axis!r} and feature_axes={feature_axes!r}: feature_axis is "
            "only an alias of feature_axes (Flax's name); pass feature_axes alone."
        )
    return feature_axis


class WeightNorm(nnx.Module):
    """Weight normalization (Salimans & Kingma 2016) of a wrapped layer; see ``bnjax.weight_norm``.

    A drop-in for ``flax.nnx.WeightNorm``: the same constructor, the same attribute names
    (``layer_instance``; g in ``scales``, a dict keyed by each parameter's path in the layer, e.g.
    ``scales[('kernel',)]``), the same output for the same values.

    Math: for each ``nnx.Param`` v of the layer selected by ``variable_filter`` (default
    ``nnx.PathContains('kernel')``), the layer computes with

        w = g · v / √(Σ v² + ε)

    the sum running over every axis of v *not* in ``feature_axes`` (default -1: one norm per
    output unit of a kernel (..., in, out); ``None`` or ``()``: one norm over all of v); g has
    shape ``tuple(v.shape[a] for a in feature_axes)`` (sorted axes).

    Differences from Flax, each deliberate:

    - ``scale_init=None`` (bnjax's default) starts g at √(Σv² + ε) ≈ ‖v‖, so wrapping a layer
      leaves its output unchanged (PyTorch's convention); Flax's default, ``ones``, is exact
      when passed (then ``rngs`` is needed, as in Flax; with ``scale_init=None`` it is optional).
    - g is an ``nnx.Param`` in ``param_dtype`` (Flax stores a bare array, which
      ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` does not train, and ignores ``param_dtype``).
    - The layer's parameters are never overwritten: the normalized w is swapped in for the call
      only (Flax writes w into the layer on every call, so the next call normalizes w again and
      an optimizer updates w, not v). Gradients flow to v and g.

    The result is cast to ``dtype``, or to the promotion of v's and g's dtypes. ``promote_dtype``,
    when given, is called on ``(v, g)`` with ``dtype=dtype`` before normalizing (Flax accepts the
    argument and does not use it). ``use_scale=False``: no g, w = v/‖v‖. ``feature_axis``
    (bnjax's former name) is an alias of ``feature_axes``.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> dense = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> layer = bnjax.nnx.WeightNorm(dense)
      >>> layer.scales[("kernel",)].shape
      (3,)
      >>> bool(jnp.allclose(layer(jnp.ones((2, 4))), dense(jnp.ones((2, 4))), atol=1e-6))
      True

    References:
      Salimans & Kingma 2016, "Weight Normalization: A Simple Reparameterization to Accelerate
      Training of Deep Neural Networks", eq. 2.
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        feature_axes: Axes | None = -1,
        use_scale: bool = True,
        scale_init: Initializer | None = None,
        epsilon: float = 1e-12,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        variable_filter: Any = _KERNEL,
        promote_dtype: PromoteDtype | None = None,
        rngs: nnx.Rngs | None = None,
        feature_axis: Axes | None = None,
    ):
        self.layer_instance = layer_instance
        self.feature_axes = _feature_axes_alias(feature_axes, feature_axis, "WeightNorm")
        self.use_scale, self.epsilon, self.dtype, self.param_dtype = use_scale, epsilon, dtype, param_dtype
        self.variable_filter, self.promote_dtype = variable_filter, promote_dtype
        scales: dict[Path, nnx.Param] = {}
        if use_scale:
            if scale_init is not None and rngs is None:
                raise TypeError(
                    "WeightNorm(scale_init=...) needs rngs=nnx.Rngs(...) to draw g from; leave scale_init "
                    "unset (g starts at ||v||, which needs no key) or pass rngs."
                )
            for path, var in _selected_params(layer_instance, variable_filter):
                v = var.get_value()
                axes, shape = shells.weight_norm_axes(self.feature_axes, v, _name(path))
                if scale_init is None:
                    g = weights.weight_norm_init(v, axis=axes, eps=epsilon).astype(param_dtype)
                else:
                    assert rngs is not None
                    g = scale_init(rngs.params(), shape, param_dtype)
                scales[path] = nnx.Param(g)
        self.scales = nnx.data(scales)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values = []
        for path, var in _selected_params(self.layer_instance, self.variable_filter):
            v = var.get_value()
            axes, _ = shells.weight_norm_axes(self.feature_axes, v, _name(path))
            g = None
            if self.use_scale:
                if path not in self.scales:
                    raise KeyError(
                        f"WeightNorm has no g for the parameter {_name(path)!r}: the wrapped layer gained "
                        "parameters after the wrapper was built; build WeightNorm after the layer is complete."
                    )
                g = self.scales[path].get_value()
            if self.promote_dtype is not None:
                v, *rest = self.promote_dtype((v, *(() if g is None else (g,))), dtype=self.dtype)
                g = rest[0] if rest else None
            values.append((var, shells.weight_norm_view(v, g, axes, self.epsilon, self.dtype)))
        return _call_with(self.layer_instance, values, *args, **kwargs)


def _name(path: Path) -> str:
    return "/".join(str(k) for k in path)


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

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        feature_axis: int = -1,
        epsilon: float = 1e-5,
        variable_filter: Any = _KERNEL,
    ):
        self.layer_instance, self.feature_axis, self.epsilon = layer_instance, feature_axis, epsilon
        self.variable_filter = variable_filter

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values = [
            (var, weights.weight_standardize(var.get_value(), axis=self.feature_axis, eps=self.epsilon))
            for _, var in _selected_params(self.layer_instance, self.variable_filter)
        ]
        return _call_with(self.layer_instance, values, *args, **kwargs)


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
    """Spectral normalization (Miyato et al. 2018) of a wrapped layer; see ``bnjax.spectral_norm``.

    A drop-in for ``flax.nnx.SpectralNorm``: the same constructor, the same attribute names
    (``layer_instance``; ``batch_stats``, a dict keyed by each parameter's path in the layer plus
    ``'u'`` or ``'sigma'``, e.g. ``batch_stats[('kernel', 'u')]``, of ``nnx.BatchStat``), the same
    output and state updates for the same values. Layers of any structure are wrapped (an
    ``nnx.Sequential`` too): every ``nnx.Param`` of rank ≥ 2 is normalized.

    Math: each such parameter w (a ≥3-D one read as the matrix (Π leading, last)) is replaced by
    w/σ, σ ≈ σ_max(w) from ``n_steps`` power-iteration steps per call starting from the stored u:

        v ← normalize(u Wᵀ),   u ← normalize(v W),   σ = v W uᵀ   (W = w as (fan_in, out))

    (Flax's order, ``bnjax.spectral_norm(..., sigma_from="v")``; the iteration is under
    ``stop_gradient``, so gradients flow through w in σ = vWuᵀ). 1-D parameters are left alone;
    ``n_steps=0`` normalizes nothing; ``error_on_non_matrix=True`` refuses ≥3-D parameters.

    State per parameter: u of shape (1, out), drawn N(0, 1) from ``rngs.params()`` (as Flax), and
    σ of shape (), starting at 1, both ``nnx.BatchStat`` in ``param_dtype``. ``update_stats``
    (default True) stores the new u and σ after each call; ``False`` still runs the iteration from
    the stored u (as Flax) but stores nothing. The per-call ``update_stats`` overrides it, and
    ``model.eval()`` / ``model.train()`` switch it (the attribute is ``use_running_average =
    not update_stats``, as in Flax). The result is cast to ``dtype``, or to the promotion of w's
    and u's dtypes.

    Differences from Flax, each deliberate: the layer's parameters are never overwritten (w/σ is
    swapped in for the call only; Flax writes it into the layer, so the next call divides an
    already divided weight and an optimizer updates w/σ rather than w); ``update_stats`` at call
    time is keyword-only (positional arguments go to the layer).

    bnjax's extras: ``n_warmup`` > 0 warms u up at construction with that many steps
    (``bnjax.spectral_norm_init``); ``variable_filter`` (an nnx filter, default every
    ``nnx.Param``); ``feature_axis``, each parameter's output axis (default -1, Flax's).

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> layer = bnjax.nnx.SpectralNorm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
      >>> layer.batch_stats[("kernel", "u")].shape
      (1, 3)
      >>> layer(jnp.ones((2, 4))).shape
      (2, 3)

    References:
      Miyato, Kataoka, Koyama & Yoshida 2018, "Spectral Normalization for Generative Adversarial
      Networks", Algorithm 1.
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        n_steps: int = 1,
        epsilon: float = 1e-12,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        error_on_non_matrix: bool = False,
        update_stats: bool = True,
        rngs: nnx.Rngs,
        n_warmup: int = 0,
        variable_filter: Any = nnx.Param,
        feature_axis: int = -1,
    ):
        if not isinstance(update_stats, bool):
            raise TypeError(f"SpectralNorm(update_stats=...) must be a Python bool, got {type(update_stats).__name__}.")
        self.layer_instance, self.n_steps, self.epsilon = layer_instance, n_steps, epsilon
        self.dtype, self.param_dtype, self.error_on_non_matrix = dtype, param_dtype, error_on_non_matrix
        self.n_warmup, self.variable_filter, self.feature_axis = n_warmup, variable_filter, feature_axis
        self.use_running_average = not update_stats
        stats: dict[Path, nnx.BatchStat] = {}
        for path, var in self._params():
            w = var.get_value()
            out = w.shape[feature_axis]
            key = rngs.params()
            if n_warmup:
                u = weights.spectral_norm_init(
                    key, w, axis=feature_axis, n_warmup=n_warmup, eps=epsilon, dtype=param_dtype
                ).reshape(1, out)
            else:
                u = jax.random.normal(key, (1, out), param_dtype)
            stats[(*path, "u")] = nnx.BatchStat(u)
            stats[(*path, "sigma")] = nnx.BatchStat(jnp.ones((), param_dtype))
        self.batch_stats = nnx.data(stats)

    def _params(self) -> list[tuple[Path, nnx.Param]]:
        return [
            (path, var)
            for path, var in _selected_params(self.layer_instance, self.variable_filter)
            if shells.spectral_selected(self, jnp.asarray(var.get_value()), _name(path), "Layer instance parameter")
        ]

    def __call__(self, *args: Any, update_stats: bool | None = None, **kwargs: Any) -> Any:
        """Calls the layer with spectrally normalized parameters; ``update_stats`` (default: the
        module's, ``not use_running_average``): store the new u and σ."""
        if update_stats is None:
            update_stats = not self.use_running_average
        if not isinstance(update_stats, bool):
            raise TypeError(
                f"SpectralNorm: update_stats must be a Python bool or None, got {type(update_stats).__name__}: "
                "True while training (stores u and sigma), False for evaluation."
            )
        values, updates = [], []
        for path, var in self._params():
            u_path, sigma_path = (*path, "u"), (*path, "sigma")
            if u_path not in self.batch_stats or sigma_path not in self.batch_stats:
                raise KeyError(
                    f"SpectralNorm has no u/sigma for the parameter {_name(path)!r}: the wrapped layer gained "
                    "parameters after the wrapper was built; build SpectralNorm after the layer is complete."
                )
            u_var, sigma_var = self.batch_stats[u_path], self.batch_stats[sigma_path]
            where = f"batch_stats[{u_path!r}]"
            w_sn, new_u, sigma = shells.spectral_view(self, var.get_value(), u_var.get_value(), _name(path), where)
            values.append((var, w_sn))
            updates.append((u_var, new_u, sigma_var, sigma))
        y = _call_with(self.layer_instance, values, *args, **kwargs)
        if update_stats:
            for u_var, new_u, sigma_var, sigma in updates:
                u_var.set_value(new_u)
                sigma_var.set_value(sigma.astype(jnp.asarray(sigma_var.get_value()).dtype))
        return y


__all__ = [
    "AdaLNZero",
    "BatchNorm",
    "BatchRenorm",
    "ConditionalBatchNorm",
    "CosineConv",
    "CosineDense",
    "DyT",
    "Folded",
    "FoldedModel",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "SpectralNorm",
    "StandardizedConv",
    "WeightNorm",
    "WeightStandardization",
    "fold_batch_norms",
    "precise_batch_stats",
]
