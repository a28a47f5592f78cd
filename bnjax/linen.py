"""Flax linen modules: thin shells over bnjax's functional API.

Variable layout and keywords follow ``flax.linen``: parameters ``scale`` and ``bias`` in
``params``; running statistics ``mean`` and ``var`` in ``batch_stats``; ``use_running_average``,
``momentum``, ``epsilon``, ``axis_name``, ``use_scale``, ``use_bias`` with Flax's meanings and
defaults. A checkpoint of a model built with ``flax.linen.BatchNorm`` therefore loads into the
same model built with ``bnjax.linen.BatchNorm`` and back.

bnjax's extras are keywords: ``activation``; for ``BatchNorm`` also ``debias`` (bnjax's unbiased
start; off by default here, matching Flax), ``unbiased_running_var`` (PyTorch's convention),
``axis_index_groups`` and ``track_updates``. With ``debias=True`` or ``momentum=None`` the layer
also keeps ``count`` and ``skipped`` in ``batch_stats`` (see ``bnjax.BatchStats``). Every layer,
whatever its options, skips the running-statistics update of a feature whose batch statistic is
non-finite. ``use_fast_variance`` is accepted and ignored: bnjax's variance is always the stable
one, at the cost of the fast one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax._src import shells, weights
from bnjax._src.params import NormParams
from bnjax._src.running import BatchStats

Initializer = Callable[..., Any]
Axes = int | Sequence[int]


def _affine(module: nn.Module, shape: tuple[int, ...]) -> NormParams:
    return NormParams(
        module.param("scale", module.scale_init, shape, module.param_dtype) if module.use_scale else None,
        module.param("bias", module.bias_init, shape, module.param_dtype) if module.use_bias else None,
    )


class _Normalization(nn.Module):
    """Fields every shell shares, with Flax's names and defaults (ε = 1e-6 as Flax's LayerNorm,
    GroupNorm, InstanceNorm and RMSNorm); ``use_fast_variance`` and ``force_float32_reductions``
    are accepted for compatibility and ignored (the variance is always the stable one, in float32)."""

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    axis_name: str | tuple[str, ...] | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    activation: Callable[[jax.Array], jax.Array] | None = None
    fused_backward: bool = True


class BatchNorm(nn.Module):
    """Batch normalization (Ioffe & Szegedy 2015) as a linen module; see ``bnjax.batch_norm``.

    Math: y = f(g·(x − μ)/√(σ² + ε) + b) with batch statistics in training
    (``use_running_average=False``) and the running ones otherwise;
    running ← momentum·running + (1 − momentum)·batch (Flax's plain EMA unless ``debias=True``).
    ``mean_only=True``: y = f(g·(x − μ) + b), mean-only batch norm (Salimans & Kingma 2016; see
    ``bnjax.mean_only_batch_norm``), usually with ``use_scale=False`` after a ``WeightNorm``.

    Shapes: x of any rank with features on ``axis``; ``scale``, ``bias``, ``mean``, ``var`` of the
    feature shape. Output: x's shape, and x's dtype (or ``dtype``).

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.linen
      >>> layer = bnjax.linen.BatchNorm(use_running_average=False, momentum=0.9)
      >>> x = jnp.ones((4, 3)).at[0].set(2.0)
      >>> variables = layer.init(jax.random.key(0), x)
      >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
      >>> sorted(updates["batch_stats"])
      ['mean', 'var']
    """

    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    axis_name: str | tuple[str, ...] | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    activation: Callable[[jax.Array], jax.Array] | None = None
    fused_backward: bool = True
    debias: bool = False
    unbiased_running_var: bool = False
    track_updates: bool | None = None
    mean_only: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None) -> jax.Array:
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        shape = shells.feature_shape(x, self.axis)
        params = _affine(self, shape)
        loaded_without_count = self.has_variable("batch_stats", "mean") and not self.has_variable(
            "batch_stats", "count"
        )
        mean = self.variable("batch_stats", "mean", jnp.zeros, shape, jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, shape, jnp.float32)
        track = shells.tracks_updates(self)
        if track and loaded_without_count:
            # statistics without bnjax's counters: a checkpoint of flax.linen.BatchNorm, or of
            # track_updates=False. Evaluation needs no count; an update would read count = 0 and
            # replace the loaded statistics by this batch's.
            if not use_ra:
                raise ValueError(
                    "BatchNorm(debias=True or momentum=None) in training found batch_stats with 'mean' and "
                    "'var' but no 'count' (e.g. a flax.linen.BatchNorm checkpoint): its first update would "
                    "discard the loaded statistics. Train on with debias=False (Flax's EMA, which needs no "
                    "count), or add counts saying how many updates the statistics hold: "
                    "batch_stats[...]['count'] = jnp.int32(n) and ['skipped'] = jnp.zeros(C, jnp.int32)."
                )
            track = False
        if track:
            count = self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
            skipped = self.variable("batch_stats", "skipped", jnp.zeros, shape, jnp.int32)
            stats = BatchStats(mean.value, var.value, count.value, skipped.value)
        else:
            stats = BatchStats(mean.value, var.value, jnp.zeros((), jnp.int32))
        y, new = shells.batch_norm(self, x, params, stats, not use_ra, mask, self.is_initializing())
        if not use_ra and not self.is_initializing():  # as Flax: init does not update the statistics
            mean.value, var.value = new.mean, new.var
            if track:
                count.value = new.count
                skipped.value = jnp.asarray(new.skipped)  # tracked, so never None here
        return y


class LayerNorm(_Normalization):
    """Layer normalization (Ba et al. 2016) as a linen module; see ``bnjax.layer_norm``.

    Math: y = f(g·(x − μ)/√(σ² + ε) + b), μ, σ² over ``reduction_axes`` of each example;
    g, b over ``feature_axes``. Defaults as ``flax.linen.LayerNorm`` (ε = 1e-6).

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.linen
      >>> layer = bnjax.linen.LayerNorm()
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 5)))
      >>> layer.apply(variables, jnp.arange(10.0).reshape(2, 5)).shape
      (2, 5)
    """

    reduction_axes: Axes = -1
    feature_axes: Axes = -1

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: Any = None) -> jax.Array:
        """``mask``: optional boolean array of x's rank, True = valid (padding: see the functional method)."""
        return shells.layer_norm(self, x, _affine(self, shells.feature_shape(x, self.feature_axes)), mask)


class GroupNorm(nn.Module):
    """Group normalization (Wu & He 2018) as a linen module; see ``bnjax.group_norm``.

    Math: per example, μ, σ² over each group of channels and the spatial axes; g, b per channel.
    Channels last; ``num_groups`` (default 32, as Flax) or ``group_size``. ε = 1e-6 as Flax.

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.linen
      >>> layer = bnjax.linen.GroupNorm(num_groups=2)
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 4, 4, 8)))
      >>> variables["params"]["scale"].shape
      (8,)
    """

    # Flax's field order (num_groups first: GroupNorm(8) is eight groups), then the shared fields
    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    reduction_axes: Axes | None = None
    axis_name: str | tuple[str, ...] | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    activation: Callable[[jax.Array], jax.Array] | None = None
    fused_backward: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: Any = None) -> jax.Array:
        """``mask``: optional boolean array of x's rank, True = valid (padding: see the functional method)."""
        return shells.group_norm(self, x, _affine(self, (jnp.shape(x)[-1],)), mask)


class InstanceNorm(_Normalization):
    """Instance normalization (Ulyanov et al. 2016) as a linen module; see ``bnjax.instance_norm``.

    Math: per example and channel, μ, σ² over the spatial axes (every axis but the batch axis 0
    and ``feature_axes``, default -1: channels last); g, b over ``feature_axes``; ε = 1e-6 as Flax.

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.linen
      >>> layer = bnjax.linen.InstanceNorm()
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 4, 4, 3)))
      >>> layer.apply(variables, jnp.ones((2, 4, 4, 3))).shape
      (2, 4, 4, 3)
    """

    feature_axes: Axes = -1

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: Any = None) -> jax.Array:
        """``mask``: optional boolean array of x's rank, True = valid (padding: see the functional method)."""
        return shells.instance_norm(self, x, _affine(self, shells.feature_shape(x, self.feature_axes)), mask)


class RMSNorm(_Normalization):
    """RMS normalization (Zhang & Sennrich 2019) as a linen module; see ``bnjax.rms_norm``.

    Math: y = f(g·x/√(mean(x²) + ε) + b), the mean over ``reduction_axes``; g (and b) over
    ``feature_axes``; b only with ``use_bias=True`` (Flax's RMSNorm has none); ε = 1e-6.

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.linen
      >>> layer = bnjax.linen.RMSNorm()
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 6)))
      >>> sorted(variables["params"])
      ['scale']
    """

    use_bias: bool = False  # no re-shift by default, as Flax (which has no bias at all)
    reduction_axes: Axes = -1
    feature_axes: Axes = -1

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: Any = None) -> jax.Array:
        """``mask``: optional boolean array of x's rank, True = valid (padding: see the functional method)."""
        return shells.rms_norm(self, x, _affine(self, shells.feature_shape(x, self.feature_axes)), mask)


# ---------------------------------------------------------------------------------------------
# Statistics from the weights


def _reparametrize(module: nn.Module, fn: Callable[[str, jax.Array], jax.Array]) -> Callable[..., Any]:
    """Applies ``module.layer_instance`` with every filtered parameter v read as ``fn(name, v)``.

    ``nn.map_variables`` transforms only the view the wrapped layer reads: its stored kernel stays
    the raw parameter v, and gradients flow to v and to whatever ``fn`` adds.
    """

    def view(variables):
        def one(path, v):
            keys = [str(getattr(k, "key", k)) for k in path]  # (collection, ..., name)
            if keys[0] != "params" or keys[-1] not in module.variable_filter:
                return v
            return fn("/".join(keys[1:]), v)

        return jax.tree_util.tree_map_with_path(one, variables)

    def forward(layer, *args, **kwargs):
        return layer(*args, **kwargs)

    return lambda *args, **kwargs: nn.map_variables(forward, trans_in_fn=view, init=module.is_initializing())(
        module.layer_instance, *args, **kwargs
    )


class WeightNorm(nn.Module):
    """Weight normalization (Salimans & Kingma 2016) of a wrapped layer; see ``bnjax.weight_norm``.

    Math: the layer computes with w = g · v/‖v‖ (norm over every axis but ``feature_axis``) for each
    parameter named in ``variable_filter`` (default: ``kernel``). The layer's own kernel v stays as
    it is (never overwritten); g is a parameter of this wrapper, ``"<path>/scale"``, initialized to
    ‖v‖ so that wrapping leaves the layer's output unchanged (PyTorch's behaviour; Flax starts g at 1).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax.linen
      >>> layer = bnjax.linen.WeightNorm(nn.Dense(3))
      >>> x = jnp.ones((2, 4))
      >>> v = layer.init(jax.random.key(0), x)
      >>> sorted(v["params"])
      ['kernel/scale', 'layer_instance']
      >>> dense = {"params": v["params"]["layer_instance"]}
      >>> bool(jnp.allclose(layer.apply(v, x), nn.Dense(3).apply(dense, x), atol=1e-6))
      True
    """

    layer_instance: nn.Module
    feature_axis: int = -1
    epsilon: float = 1e-12
    variable_filter: frozenset[str] = frozenset({"kernel"})

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        def normalize(name: str, v: jax.Array) -> jax.Array:
            g = self.param(f"{name}/scale", lambda _: weights.weight_norm_init(v, axis=self.feature_axis))
            return weights.weight_norm(v, g, axis=self.feature_axis, eps=self.epsilon)

        return _reparametrize(self, normalize)(*args, **kwargs)


class WeightStandardization(nn.Module):
    """Weight standardization (Qiao et al. 2019) of a wrapped layer; see ``bnjax.weight_standardize``.

    Math: the layer computes with ŵ = (w − μ)/√(σ² + ε), μ, σ² over the fan-in of each output unit
    (every axis but ``feature_axis``), for each parameter named in ``variable_filter``. The stored
    kernel stays the raw w.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax.linen
      >>> layer = bnjax.linen.WeightStandardization(nn.Conv(4, (3, 3)))
      >>> v = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
      >>> layer.apply(v, jnp.ones((1, 8, 8, 3))).shape
      (1, 8, 8, 4)
    """

    layer_instance: nn.Module
    feature_axis: int = -1
    epsilon: float = 1e-5
    variable_filter: frozenset[str] = frozenset({"kernel"})

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        def standardize(name: str, w: jax.Array) -> jax.Array:
            return weights.weight_standardize(w, axis=self.feature_axis, eps=self.epsilon)

        return _reparametrize(self, standardize)(*args, **kwargs)


class StandardizedConv(nn.Module):
    """A convolution with a standardized kernel (Qiao et al. 2019): ``nn.Conv`` under
    ``WeightStandardization``, the pairing with group norm the paper recommends.

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.linen
      >>> conv = bnjax.linen.StandardizedConv(8, (3, 3))
      >>> v = conv.init(jax.random.key(0), jnp.ones((2, 6, 6, 3)))
      >>> conv.apply(v, jnp.ones((2, 6, 6, 3))).shape
      (2, 6, 6, 8)
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    use_bias: bool = True
    epsilon: float = 1e-5
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = nn.Conv(
            self.features,
            tuple(self.kernel_size),
            strides=self.strides,
            padding=self.padding,
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
        )
        return WeightStandardization(conv, epsilon=self.epsilon)(x)


class CosineDense(nn.Module):
    """Cosine normalization (Luo et al. 2017) of a dense layer; see ``bnjax.cosine_norm``.

    Math: y_j = cos θ_j = x·w_j / (‖x‖ ‖w_j‖) ∈ [−1, 1]; no bias and no scale (the paper's form).

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.linen
      >>> layer = bnjax.linen.CosineDense(3)
      >>> v = layer.init(jax.random.key(0), jnp.ones((2, 5)))
      >>> bool(jnp.all(jnp.abs(layer.apply(v, jnp.ones((2, 5)))) <= 1))
      True
    """

    features: int
    epsilon: float = 1e-8
    kernel_init: Initializer = nn.initializers.lecun_normal()
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(x)[-1], self.features), self.param_dtype)
        return weights.cosine_norm(x, kernel, eps=self.epsilon)


class CosineConv(nn.Module):
    """Cosine normalization of a convolution: cos θ between each input patch and each filter
    (Luo et al. 2017); see ``bnjax.cosine_norm_conv``. NHWC input, kernel (kh, kw, in, out).

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.linen
      >>> layer = bnjax.linen.CosineConv(4, (3, 3))
      >>> v = layer.init(jax.random.key(0), jnp.ones((1, 6, 6, 2)))
      >>> layer.apply(v, jnp.ones((1, 6, 6, 2))).shape
      (1, 6, 6, 4)
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    epsilon: float = 1e-8
    kernel_init: Initializer = nn.initializers.lecun_normal()
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*tuple(self.kernel_size), jnp.shape(x)[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        return weights.cosine_norm_conv(x, kernel, strides=self.strides, padding=self.padding, eps=self.epsilon)


class SpectralNorm(nn.Module):
    """Spectral normalization (Miyato et al. 2018) of a wrapped layer; see ``bnjax.spectral_norm``.

    Math: the layer computes with w/σ_max(w) for each parameter named in ``variable_filter``;
    σ_max is estimated by power iteration whose vector u lives in ``batch_stats`` as
    ``"<path>/u"`` (explicit state, warmed up at init). ``update_stats=True`` (training) runs
    ``n_steps`` iterations and stores u (make ``batch_stats`` mutable); ``False`` (evaluation)
    uses the stored u without iterating. The stored kernel stays the raw w.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax.linen
      >>> layer = bnjax.linen.SpectralNorm(nn.Dense(3))
      >>> v = layer.init(jax.random.key(0), jnp.ones((2, 4)))
      >>> y, upd = layer.apply(v, jnp.ones((2, 4)), update_stats=True, mutable=["batch_stats"])
      >>> sorted(upd["batch_stats"])
      ['kernel/u']
    """

    layer_instance: nn.Module
    n_steps: int = 1
    feature_axis: int = -1
    epsilon: float = 1e-12
    n_warmup: int = 15
    variable_filter: frozenset[str] = frozenset({"kernel"})

    @nn.compact
    def __call__(self, *args: Any, update_stats: bool = False, **kwargs: Any) -> Any:
        def normalize(name: str, w: jax.Array) -> jax.Array:
            u = self.variable(
                "batch_stats",
                f"{name}/u",
                lambda: weights.spectral_norm_init(
                    self.make_rng("params"), w, axis=self.feature_axis, n_warmup=self.n_warmup
                ),
            )
            training = update_stats and not self.is_initializing()
            if training and not self.is_mutable_collection("batch_stats"):
                raise ValueError(
                    "SpectralNorm(...).apply(..., update_stats=True) needs a mutable 'batch_stats' "
                    "collection to store the new power-iteration vector u: pass mutable=['batch_stats'] "
                    "(or update_stats=False to use the stored u)."
                )
            w_sn, new_u = weights.spectral_norm(
                w, u.value, n_steps=self.n_steps, axis=self.feature_axis, eps=self.epsilon, training=training
            )
            if training:
                u.value = new_u
            return w_sn

        return _reparametrize(self, normalize)(*args, **kwargs)


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
