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

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax._src import folding, shells, statistics, weights
from bnjax._src.params import NormParams
from bnjax._src.running import AccumulatingStats, BatchStats

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
    ``frozen=True``: always the stored statistics, never an update, no gradient to ``scale`` and
    ``bias``, whatever ``use_running_average`` says (fine-tuning; a call passing
    ``use_running_average=False`` is an error). ``virtual_batch_size``: ghost batch norm
    (Hoffer et al. 2017; see ``bnjax.batch_norm``). ``accumulation_steps=k``: gradient
    accumulation, one running update per k training calls with the pooled statistics of their
    micro-batches (see ``bnjax.batch_norm``); ``batch_stats`` then also holds ``pending_count``,
    ``pending_shift``, ``pending_offset``, ``pending_m2`` (feature shape) and ``phase`` (k,).

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
    frozen: bool = False
    virtual_batch_size: int | None = None
    accumulation_steps: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None) -> jax.Array:
        return self._normalize(x, _affine(self, shells.feature_shape(x, self.axis)), use_running_average, mask)

    def _normalize(
        self,
        x: jax.Array,
        params: NormParams,
        use_running_average: bool | None,
        mask: Any,
        renorm: tuple[Any, Any] | None = None,
    ) -> jax.Array:
        """The statistics and the call, for given g and b (the layer's own, or per-example ones)."""
        if self.frozen:
            params, use_ra = shells.frozen(params, use_running_average), True
        else:
            use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if self.is_mutable_collection(shells.PRECISE) and not (self.is_initializing() or self.frozen or use_ra):
            self.sow(shells.PRECISE, "moments", shells.input_moments(self, x, mask))  # precise_batch_stats
        shape = shells.feature_shape(x, self.axis)
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
        k = shells.accumulation_steps(self)
        state: Any = stats
        if k is not None:  # gradient accumulation: the pending micro-batches' moments and the phase
            pending = [self.variable("batch_stats", n, jnp.zeros, shape, jnp.float32) for n in shells.PENDING]
            phase = self.variable("batch_stats", "phase", jnp.zeros, (k,), jnp.int32)
            state = AccumulatingStats(stats, statistics.Moments(*(v.value for v in pending)), phase.value)
        y, new = shells.batch_norm(self, x, params, state, not use_ra, mask, self.is_initializing(), renorm)
        if not use_ra and not self.is_initializing():  # as Flax: init does not update the statistics
            if k is not None:
                for v, value in zip(pending, new.pending, strict=True):
                    v.value = value
                phase.value, new = new.phase, new.stats
            mean.value, var.value = new.mean, new.var
            if track:
                count.value = new.count
                skipped.value = jnp.asarray(new.skipped)  # tracked, so never None here
        return y


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe 2017) as a linen module; see ``bnjax.batch_renorm``.

    ``BatchNorm``'s fields, variables and conventions (Flax's momentum 0.99 and plain EMA by
    default), plus the bounds ``r_max`` (default 3) and ``d_max`` (default 5). The call may
    override them, with traced values too, for the paper's warm-up schedule inside a jitted step:
    ``layer.apply(v, x, r_max=r, d_max=d, mutable=["batch_stats"])``. In evaluation the running
    statistics are used, as batch norm.

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.linen
      >>> layer = bnjax.linen.BatchRenorm(use_running_average=False)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> y, upd = layer.apply(variables, x, r_max=1.0, d_max=0.0, mutable=["batch_stats"])
      >>> sorted(upd["batch_stats"])
      ['mean', 'var']

    References:
      Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in
      Batch-Normalized Models".
    """

    r_max: float = 3.0
    d_max: float = 5.0

    @nn.compact
    def __call__(  # type: ignore[override]
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: Any = None,
        r_max: Any = None,
        d_max: Any = None,
    ) -> jax.Array:
        """``r_max``, ``d_max``: this call's bounds (default: the fields), e.g. from a schedule."""
        bounds = (self.r_max if r_max is None else r_max, self.d_max if d_max is None else d_max)
        params = _affine(self, shells.feature_shape(x, self.axis))
        return self._normalize(x, params, use_running_average, mask, bounds)


class ConditionalBatchNorm(BatchNorm):
    """Conditional batch normalization (de Vries et al. 2017; Dumoulin et al. 2017): batch norm
    whose g and b are predicted per example from a condition vector.

    Math: y = f(γ(c)·(x − μ)/√(σ² + ε) + β(c)), γ(c) = 1 + c·W_γ + b_γ, β(c) = c·W_β + b_β, with
    μ, σ² and the running statistics exactly those of ``BatchNorm`` (same fields, same
    ``batch_stats``). W and b start at zero (``cond_kernel_init``, ``cond_bias_init``), so the layer
    starts as a plain batch norm with g = 1, b = 0. ``use_scale=False`` / ``use_bias=False``: no
    γ / β. The per-example γ, β go through the fused pass of ``bnjax.batch_norm`` (one pass).

    Shapes: x (N, ..., C) with the batch on axis 0 and the features on ``axis`` (a single axis);
    ``cond`` (N, D). Params: ``scale`` and ``bias``, each an ``nn.Dense(C)`` (``kernel`` (D, C),
    ``bias`` (C,)).

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.linen
      >>> layer = bnjax.linen.ConditionalBatchNorm(use_running_average=False)
      >>> x, cond = jnp.ones((4, 8, 8, 3)), jnp.ones((4, 10))
      >>> variables = layer.init(jax.random.key(0), x, cond)
      >>> jax.tree.map(jnp.shape, variables["params"]["scale"])
      {'bias': (3,), 'kernel': (10, 3)}

    References:
      de Vries, Strub, Mary, Larochelle, Pietquin & Courville 2017, "Modulating early visual
      processing by language"; Dumoulin, Shlens & Kudlur 2017, "A Learned Representation for
      Artistic Style".
    """

    cond_kernel_init: Initializer = nn.initializers.zeros
    cond_bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(  # type: ignore[override]
        self, x: jax.Array, cond: jax.Array, use_running_average: bool | None = None, *, mask: Any = None
    ) -> jax.Array:
        shape, features = shells.conditional_shape(x, cond, self.axis, "ConditionalBatchNorm")

        def predicted(name: str) -> jax.Array:
            dense = nn.Dense(
                features,
                kernel_init=self.cond_kernel_init,
                bias_init=self.cond_bias_init,
                param_dtype=self.param_dtype,
                name=name,
            )
            return dense(cond).reshape(shape)

        scale = 1.0 + predicted("scale") if self.use_scale else None
        bias = predicted("bias") if self.use_bias else None
        return self._normalize(x, NormParams(scale, bias), use_running_average, mask)


class LayerNorm(_Normalization):
    """Layer normalization (Ba et al. 2016) as a linen module; see ``bnjax.layer_norm``.

    Math: y = f(g·(x − μ)/√(σ² + ε) + b), μ, σ² over ``reduction_axes`` of each example;
    g, b over ``feature_axes``. Defaults as ``flax.linen.LayerNorm`` (ε = 1e-6). bnjax's extra
    ``scale_offset`` c makes the gain c + g (formed in float32); g still starts at
    ``scale_init`` (pass ``nn.initializers.zeros`` with c = 1 for a zero-centred g).

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.linen
      >>> layer = bnjax.linen.LayerNorm()
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 5)))
      >>> layer.apply(variables, jnp.arange(10.0).reshape(2, 5)).shape
      (2, 5)
    """

    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    scale_offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: Any = None) -> jax.Array:
        """``mask``: optional boolean array of x's rank, True = valid (padding: see the functional method)."""
        return shells.layer_norm(self, x, _affine(self, shells.feature_shape(x, self.feature_axes)), mask)


class AdaLNZero(nn.Module):
    """The adaLN-Zero residual branch of DiT (Peebles & Xie 2023): a sublayer under a layer norm
    whose shift, scale and gate come from a condition vector, zero-initialized so that the branch
    starts as the identity.

    Math: with (s, a, g) = split(SiLU(c)·W + b, 3) per example (``modulation``, an
    ``nn.Dense(3·C)``, W and b zero at init),

        out = x + g ⊙ inner( layer_norm(x)·(1 + a) + s )

    the layer norm over the last axis without learned affine (ε = ``epsilon``, DiT's 1e-6) and the
    modulation applied inside it as per-example g, b (one pass, see ``bnjax.layer_norm``). At
    init g = 0, so out = x exactly. A DiT block is two of these (attention, then MLP); DiT's one
    ``Linear(C, 6C)`` holds both, in the order (shift, scale, gate) of the attention branch and
    then of the MLP branch, so its first and second halves port to the two ``modulation`` layers.

    Shapes: x (N, ..., C), cond (N, D); ``inner`` maps (N, ..., C) to (N, ..., C) and receives
    the call's extra arguments.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax.linen
      >>> branch = bnjax.linen.AdaLNZero(nn.Dense(8))
      >>> x, cond = jnp.ones((2, 5, 8)), jnp.ones((2, 16))
      >>> variables = branch.init(jax.random.key(0), x, cond)
      >>> bool(jnp.array_equal(branch.apply(variables, x, cond), x))  # the identity at init
      True

    References:
      Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", §3.2 (adaLN-Zero).
    """

    inner: nn.Module
    epsilon: float = 1e-6
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.zeros
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        shape, features = shells.conditional_shape(x, cond, -1, "AdaLNZero")
        dense = nn.Dense(
            3 * features,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            param_dtype=self.param_dtype,
            name="modulation",
        )
        return shells.ada_ln_zero(self, x, dense(nn.silu(cond)), shape, self.inner, *args, **kwargs)


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
    bnjax's extras: ``scale_offset`` c (gain c + g, formed in float32; Gemma: c = 1 with
    ``scale_init=nn.initializers.zeros``) and ``cast_before_scale`` (Llama's order); see
    ``bnjax.rms_norm``.

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
    scale_offset: float = 0.0
    cast_before_scale: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: Any = None) -> jax.Array:
        """``mask``: optional boolean array of x's rank, True = valid (padding: see the functional method)."""
        return shells.rms_norm(self, x, _affine(self, shells.feature_shape(x, self.feature_axes)), mask)


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025) as a linen module, a drop-in for LayerNorm in transformers;
    see ``bnjax.dyt``.

    Math: y = f(g·tanh(α·x) + b), α a learned scalar (param ``alpha``, initialized to
    ``alpha_init_value``, the paper's 0.5), g (``scale``) and b (``bias``) over ``feature_axes``.
    Output dtype as the other shells (``dtype``, or the promotion of x's and the parameters').

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.linen
      >>> layer = bnjax.linen.DyT()
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 4)))
      >>> jax.tree.map(jnp.shape, variables["params"])
      {'alpha': (), 'bias': (4,), 'scale': (4,)}

    References:
      Zhu, Chen, He, LeCun & Liu 2025, "Transformers without Normalization".
    """

    alpha_init_value: float = 0.5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    feature_axes: Axes = -1
    activation: Callable[[jax.Array], jax.Array] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        alpha = self.param("alpha", nn.initializers.constant(self.alpha_init_value), (), self.param_dtype)
        return shells.dyt(self, x, alpha, _affine(self, shells.feature_shape(x, self.feature_axes)))


def precise_batch_stats(
    model: nn.Module,
    variables: Any,
    batches: Iterable[Any],
    *,
    progress: bool = True,
    **apply_kwargs: Any,
) -> Any:
    """Population statistics after training: every bnjax ``BatchNorm`` of ``model`` gets the exact
    mean and variance of its inputs over all ``batches``.

    Math: for each layer and feature, with the layer's inputs over all batches as one population
    (nᵢ elements in batch i, pooled count N = Σnᵢ),

        mean = Σᵢ nᵢ μᵢ / N,   var = (Σᵢ M₂ᵢ + Σᵢ nᵢ (μᵢ − mean)²) / N

    the exact pooled moments (Chan et al.), not the average of per-batch variances (which misses
    the spread of the batch means; fvcore's precise BN averages those). The model runs in
    training mode on each batch (pass e.g. ``train=True`` or ``use_running_average=False``
    through ``apply_kwargs``), so each layer sees the inputs it sees in training; batches may
    differ in size, and a one-pass iterable is read once. Each batch is the first positional
    argument of ``model.apply``, jit-compiled once per batch shape. Under ``jit`` over sharded
    arrays the moments are global (XLA reduces across devices and hosts).

    Returns a copy of ``variables`` whose ``batch_stats`` hold, for every bnjax ``BatchNorm``
    (and ``BatchRenorm``, ``ConditionalBatchNorm``), ``mean`` and ``var`` = the population ones;
    everything else (``params``, counters) is unchanged.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax.linen
      >>> model = nn.Sequential([nn.Dense(4), bnjax.linen.BatchNorm(use_running_average=False)])
      >>> v = model.init(jax.random.key(0), jnp.ones((2, 3)))
      >>> batches = [jax.random.normal(jax.random.key(i), (8, 3)) for i in range(3)]
      >>> v = bnjax.linen.precise_batch_stats(model, v, batches, progress=False)
      >>> v["batch_stats"]["layers_1"]["var"].shape
      (4,)

    References:
      Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", §3 (precise BN); Chan, Golub &
      LeVeque 1979 (the pooled variance).
    """

    @jax.jit
    def moments(variables, batch):
        _, state = model.apply(variables, batch, mutable=[shells.PRECISE, "batch_stats"], **apply_kwargs)
        return state.get(shells.PRECISE, {})

    totals: dict[tuple[str, ...], Any] = {}
    for batch in shells.progress(batches, progress, "precise batch statistics"):
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(moments(variables, batch)))
        for path, sown in flat.items():  # path ends in "moments"; sown: a tuple of the calls' moments
            for part in sown:
                totals[path[:-1]] = statistics.pool(totals.get(path[:-1]), part)
    if not totals:
        raise ValueError(
            "precise_batch_stats found no bnjax BatchNorm in training mode: pass what puts the model in "
            "training mode through apply_kwargs (e.g. train=True or use_running_average=False), and use "
            "bnjax.linen.BatchNorm layers."
        )
    new = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    for path, total in totals.items():
        for name, value in (("mean", total.mean), ("var", total.var)):
            key = ("batch_stats", *path, name)
            if key not in new:
                raise KeyError(f"precise_batch_stats: the layer at {'/'.join(path)} has no batch_stats/{name}.")
            new[key] = value.astype(jnp.asarray(new[key]).dtype)
    return flax.traverse_util.unflatten_dict(new)


class FoldedModel(NamedTuple):
    """The result of ``fold_batch_norms``: ``apply(variables, *args, **kwargs)`` runs the model
    with every folded batch norm removed; ``variables`` are the folded ones; ``pairs`` maps each
    folded batch norm's path to the path of the layer it was folded into; ``kept`` maps each
    batch norm left as it was to the reason."""

    apply: Callable[..., Any]
    variables: Any
    pairs: dict[str, str]
    kept: dict[str, str]


_FOLDABLE_BN = (BatchNorm, nn.BatchNorm)


def _path(module: nn.Module) -> tuple[str, ...]:
    return tuple(module.scope.path) if module.scope is not None else ()


def fold_batch_norms(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> FoldedModel:
    """Folds every evaluation-mode batch norm that directly follows a ``Dense`` or ``Conv`` into it.

    Math: per pair, ``bnjax.fold_batch_norm``: BN(W∗x + c) = (s·W)∗x + (s·(c − μ) + b),
    s = g/√(σ² + ε); the folded model computes the same function as the model in evaluation
    mode, up to float32 rounding, with one layer fewer per pair.

    The pairs are found by tracing ``model.apply(variables, *args, **kwargs)`` (pass what puts the
    model in evaluation mode, e.g. ``train=False``): a ``bnjax.linen.BatchNorm`` (``BatchRenorm``
    too) or ``flax.linen.BatchNorm`` is folded into a ``flax.linen.Dense`` or ``Conv`` when its
    input is that layer's output, that output feeds nothing else (proved on the traced
    computation), each is called once, the features are on the last axis, and the batch norm is
    in evaluation mode. Every other batch norm is kept as it is, with the reason in ``kept``
    (e.g. a residual that reads the conv output too, a batch norm in training mode,
    ``ConditionalBatchNorm``, ``mean_only``). A batch norm's ``activation`` stays in place of the
    batch norm. A layer without a bias gets one: ``bias`` in its ``params``, added after the call.

    Returns a ``FoldedModel``: call ``folded.apply(folded.variables, *args, **kwargs)``; the folded
    batch norms' variables are gone from ``folded.variables``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax.linen
      >>> model = nn.Sequential([nn.Dense(4, use_bias=False), bnjax.linen.BatchNorm(use_running_average=True)])
      >>> x = jnp.ones((2, 3))
      >>> v = model.init(jax.random.key(0), x)
      >>> folded = bnjax.linen.fold_batch_norms(model, v, x)
      >>> folded.pairs
      {'layers_1': 'layers_0'}
      >>> bool(jnp.allclose(folded.apply(folded.variables, x), model.apply(v, x), atol=1e-5))
      True

    References:
      Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
      Integer-Arithmetic-Only Inference", §3.2 (batch normalization folding).
    """

    def run(hook: folding.Hook) -> Any:
        def intercept(call: Any, a: tuple, kw: dict, ctx: Any) -> Any:
            if ctx.method_name != "__call__":
                return call(*a, **kw)
            return hook("/".join(_path(ctx.module)), ctx.module, call, a, kw)

        with nn.intercept_methods(intercept):
            return model.apply(variables, *args, **kwargs)

    def kind(m: nn.Module) -> str | None:
        if isinstance(m, _FOLDABLE_BN):
            return "bn"
        return "layer" if type(m) in (nn.Dense, nn.Conv) else None

    pairs, kept = folding.find_pairs(run, kind, _unfoldable)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    done: dict[tuple[str, ...], tuple[str, ...]] = {}
    for bn_key, layer_key, bn in pairs:
        bn_path, layer_path = tuple(bn_key.split("/")), tuple(layer_key.split("/"))
        get = lambda col, path, name: flat.get((col, *path, name))  # noqa: E731
        params = NormParams(get("params", bn_path, "scale"), get("params", bn_path, "bias"))
        stats = {"mean": get("batch_stats", bn_path, "mean"), "var": get("batch_stats", bn_path, "var")}
        kernel, bias = folding.fold_batch_norm(
            get("params", layer_path, "kernel"), get("params", layer_path, "bias"), params, stats, eps=bn.epsilon
        )
        flat[("params", *layer_path, "kernel")], flat[("params", *layer_path, "bias")] = kernel, bias
        for key in [k for k in flat if k[1 : 1 + len(bn_path)] == bn_path and len(k) == len(bn_path) + 2]:
            del flat[key]
        done[bn_path] = layer_path
    folded_vars = flax.traverse_util.unflatten_dict(flat)

    def apply(variables: Any, *args: Any, **kwargs: Any) -> Any:
        def without_bn(next_fun: Any, a: tuple, kw: dict, ctx: Any) -> Any:
            path = _path(ctx.module)
            if ctx.method_name == "__call__" and path in done:
                f = getattr(ctx.module, "activation", None)
                return a[0] if f is None else f(a[0])
            out = next_fun(*a, **kw)
            if ctx.method_name == "__call__" and path in layer_paths and not ctx.module.use_bias:
                bias = ctx.module.get_variable("params", "bias").astype(out.dtype)
                out = out + bias.reshape((1,) * (out.ndim - 1) + bias.shape)
            return out

        with nn.intercept_methods(without_bn):
            return model.apply(variables, *args, **kwargs)

    layer_paths = set(done.values())
    return FoldedModel(apply, folded_vars, {"/".join(b): "/".join(layer) for b, layer in done.items()}, kept)


def _unfoldable(m: nn.Module, a: tuple, kw: dict) -> str:
    return folding.why_kept(
        m, a, kw, conditional=isinstance(m, ConditionalBatchNorm), mode_hint="pass what selects evaluation mode"
    )


# ---------------------------------------------------------------------------------------------
# Statistics from the weights


def _reparametrize(module: nn.Module, fn: Callable[[str, tuple[str, ...], jax.Array], jax.Array]) -> Callable[..., Any]:
    """Applies ``module.layer_instance`` with every leaf v of its ``params`` read as ``fn(name, keys, v)``.

    ``name`` is Flax's name for the leaf, ``"<layer name>/<path in the layer>"`` joined by ``/``
    (a leaf boxed by ``nn.with_partitioning`` ends in ``/value``, the box's field, as in Flax);
    ``keys`` are the dictionary keys of the path in the layer (without box fields). ``fn`` returns
    v itself to leave a leaf alone. Boxes (``nn.Partitioned``) keep their metadata: only the leaf
    inside is transformed.

    ``nn.map_variables`` transforms only the view the wrapped layer reads, and only the ``params``
    collection (the layer's other collections, e.g. batch statistics, pass through unchanged and
    stay mutable as usual). As in Flax, ``init`` stores the view's values (the normalized kernel);
    ``apply`` never writes the wrapped layer's parameters, and gradients flow to v and to
    whatever ``fn`` adds.
    """
    prefix = module.layer_instance.name

    def view(variables):
        def one(path, v):
            if str(getattr(path[0], "key", path[0])) != "params":
                return v
            name = f"{prefix}/{jax.tree_util.keystr(tuple(path[1:]), simple=True, separator='/')}"
            keys = tuple(str(k.key) for k in path[1:] if isinstance(k, jax.tree_util.DictKey))
            return fn(name, keys, v)

        return jax.tree_util.tree_map_with_path(one, variables)

    def forward(layer, *args, **kwargs):
        return layer(*args, **kwargs)

    def call(*args, **kwargs):
        mapped = nn.map_variables(forward, "params", trans_in_fn=view, init=module.is_initializing())
        return mapped(module.layer_instance, *args, **kwargs)

    return call


def _selected(name: str, variable_filter: Any) -> bool:
    """Flax's rule: an empty or ``None`` filter selects every leaf, else a leaf is selected when
    any filter string occurs in its name (``"Dense_0/kernel"``: ``"kernel"``, ``"Dense"`` and
    ``"0/k"`` all select it)."""
    return not variable_filter or any(str(f) in name for f in variable_filter)


class WeightNorm(nn.Module):
    """Weight normalization (Salimans & Kingma 2016) of a wrapped layer; see ``bnjax.weight_norm``.

    A drop-in for ``flax.linen.WeightNorm``: the same fields, the same variable names, the same
    output for the same variables.

    Math: for each parameter v of the layer selected by ``variable_filter``, the layer computes
    with

        w = g · v / √(Σ v² + ε)

    the sum running over every axis of v *not* in ``feature_axes`` (default -1: one norm per
    output unit of a kernel (..., in, out); ``None`` or ``()``: one norm over all of v). g has
    shape ``tuple(v.shape[a] for a in feature_axes)`` (sorted axes; ``()`` for ``None``) and is
    a parameter of this wrapper named ``"<layer name>/<path in the layer>/scale"``, e.g.
    ``"layer_instance/kernel/scale"`` for a layer given as a field, ``"Dense_1/kernel/scale"``
    for a layer built inside a parent's compact method (Flax's names).

    ``scale_init=None`` (bnjax's default) starts g at √(Σv² + ε) ≈ ‖v‖, so wrapping a layer
    leaves its output unchanged (PyTorch's convention); Flax's default is
    ``nn.initializers.ones``, which bnjax gives exactly when passed. ``use_scale=False``: no g,
    w = v/‖v‖. The result is cast to ``dtype``, or to the promotion of v's and g's dtypes;
    statistics are computed in float32 or wider.

    ``variable_filter``: the leaves whose name (as above, without ``/scale``) contains any of
    these strings; empty or ``None``: every parameter (biases too: a 1-D bias with
    ``feature_axes=-1`` is normalized element by element, w = g·sign(v), as in Flax). A filter
    that matches nothing leaves the layer unchanged and creates no g (as in Flax). Parameters
    boxed by ``nn.with_partitioning`` are normalized inside their box (Flax names their g
    ``".../kernel/value/scale"``, and so does bnjax). Only the ``params`` collection is read:
    the layer's other collections (e.g. a BatchNorm's statistics) pass through untouched, where
    Flax would also rescale them.

    As in Flax, ``init`` stores the view the layer computed with (the normalized kernel, equal to
    v when g starts at ‖v‖); ``apply`` never writes the layer's parameters.

    ``feature_axis`` (bnjax's former name) is an alias of ``feature_axes``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax.linen
      >>> layer = bnjax.linen.WeightNorm(nn.Dense(3))
      >>> x = jnp.ones((2, 4))
      >>> v = layer.init(jax.random.key(0), x)
      >>> jax.tree.map(jnp.shape, v["params"])
      {'layer_instance': {'bias': (3,), 'kernel': (4, 3)}, 'layer_instance/kernel/scale': (3,)}
      >>> dense = {"params": v["params"]["layer_instance"]}
      >>> bool(jnp.allclose(layer.apply(v, x), nn.Dense(3).apply(dense, x), atol=1e-6))
      True
      >>> flax_vars = nn.WeightNorm(nn.Dense(3)).init(jax.random.key(0), x)  # a Flax checkpoint
      >>> flax_like = bnjax.linen.WeightNorm(nn.Dense(3), scale_init=nn.initializers.ones)
      >>> ys = flax_like.apply(flax_vars, x), nn.WeightNorm(nn.Dense(3)).apply(flax_vars, x)
      >>> bool(jnp.allclose(*ys, atol=1e-6))
      True

    References:
      Salimans & Kingma 2016, "Weight Normalization: A Simple Reparameterization to Accelerate
      Training of Deep Neural Networks", eq. 2.
    """

    layer_instance: nn.Module
    epsilon: float = 1e-12
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    scale_init: Initializer | None = None
    feature_axes: Axes | None = -1
    variable_filter: Any = frozenset({"kernel"})
    feature_axis: Axes | None = None  # alias of feature_axes (bnjax's former name)

    def _axes(self) -> Axes | None:
        if self.feature_axis is None:
            return self.feature_axes
        if self.feature_axes != -1:
            raise ValueError(
                f"WeightNorm got feature_axis={self.feature_axis!r} and feature_axes={self.feature_axes!r}: "
                "feature_axis is only an alias of feature_axes (Flax's name); pass feature_axes alone."
            )
        return self.feature_axis

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        axes = self._axes()

        def normalize(name: str, keys: tuple[str, ...], v: jax.Array) -> jax.Array:
            if not _selected(name, self.variable_filter):
                return v
            v = jnp.asarray(v)
            feature, shape = shells.weight_norm_axes(axes, v, name)
            g = None
            if self.use_scale:
                if self.scale_init is None:

                    def init(_key, shape, dtype):
                        return weights.weight_norm_init(v, axis=feature, eps=self.epsilon).astype(dtype)

                else:
                    init = self.scale_init
                g = self.param(f"{name}/scale", init, shape, self.param_dtype)
            return shells.weight_norm_view(v, g, feature, self.epsilon, self.dtype)

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
        def standardize(name: str, keys: tuple[str, ...], w: jax.Array) -> jax.Array:
            if not keys or keys[-1] not in self.variable_filter:
                return w
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

    A drop-in for ``flax.linen.SpectralNorm``: the same fields, the same variable names, the same
    output and state updates for the same variables.

    Math: every parameter w of the layer with at least 2 dimensions (a kernel (in, out); a
    ≥3-D one is read as the matrix (Π leading, last)) is replaced by w/σ, σ ≈ σ_max(w) from
    ``n_steps`` steps of power iteration per call, starting from the stored u:

        v ← normalize(u Wᵀ),   u ← normalize(v W),   σ = v W uᵀ   (W = w as (fan_in, out))

    (Flax's order, ``bnjax.spectral_norm(..., sigma_from="v")``; the iteration is under
    ``stop_gradient``). 1-D parameters are left alone; ``n_steps=0`` normalizes nothing.
    ``error_on_non_matrix=True`` refuses ≥3-D parameters.

    State, in ``collection_name`` (default ``batch_stats``), per parameter:
    ``"<layer name>/<path in the layer>/u"`` of shape (1, out), initialized N(0, 1) (as Flax), and
    ``".../sigma"`` of shape (), initialized 1, both in ``param_dtype``. ``update_stats=True``
    stores the new u and σ (make the collection mutable); ``update_stats=False`` still runs the
    iteration from the stored u (as Flax) but stores nothing, so evaluation is deterministic.
    The result is cast to ``dtype``, or to the promotion of w's and u's dtypes.

    bnjax's extras, off by default: ``n_warmup`` > 0 warms u up at init with that many steps
    (``bnjax.spectral_norm_init``, unit norm); ``variable_filter`` (as ``WeightNorm``'s; ``None``:
    every parameter, Flax's behaviour); ``feature_axis``, the output axis of each parameter
    (default -1, Flax's). Parameters boxed by ``nn.with_partitioning`` are normalized inside
    their box (state ``".../kernel/value/u"``; Flax fails on them). Only the ``params``
    collection is normalized (Flax also reads the layer's other collections). As in Flax, a
    power-iteration step on an all-zero weight sets u to 0, after which σ = 0 and that weight is
    left unnormalized: a zero-initialized 2-D bias is never normalized.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax.linen
      >>> layer = bnjax.linen.SpectralNorm(nn.Dense(3))
      >>> v = layer.init(jax.random.key(0), jnp.ones((2, 4)), update_stats=False)
      >>> jax.tree.map(jnp.shape, v["batch_stats"])
      {'layer_instance/kernel/sigma': (), 'layer_instance/kernel/u': (1, 3)}
      >>> y, upd = layer.apply(v, jnp.ones((2, 4)), update_stats=True, mutable=["batch_stats"])
      >>> flax_y, flax_upd = nn.SpectralNorm(nn.Dense(3)).apply(
      ...     v, jnp.ones((2, 4)), update_stats=True, mutable=["batch_stats"])
      >>> bool(jnp.allclose(y, flax_y, atol=1e-6))
      True

    References:
      Miyato, Kataoka, Koyama & Yoshida 2018, "Spectral Normalization for Generative Adversarial
      Networks", Algorithm 1.
    """

    layer_instance: nn.Module
    n_steps: int = 1
    epsilon: float = 1e-12
    dtype: Any = None
    param_dtype: Any = jnp.float32
    error_on_non_matrix: bool = False
    collection_name: str = "batch_stats"
    n_warmup: int = 0
    variable_filter: Any = None
    feature_axis: int = -1

    @nn.compact
    def __call__(self, *args: Any, update_stats: bool = False, **kwargs: Any) -> Any:
        """Calls the layer with spectrally normalized parameters; ``update_stats``: store u and σ."""
        if not isinstance(update_stats, bool):
            raise TypeError(
                f"SpectralNorm: update_stats must be a Python bool, got {type(update_stats).__name__}: "
                "True while training (stores u and sigma), False for evaluation."
            )
        if update_stats and not self.is_mutable_collection(self.collection_name):
            raise ValueError(
                f"SpectralNorm(...).apply(..., update_stats=True) needs a mutable {self.collection_name!r} "
                "collection to store the new power-iteration vector u and sigma: pass "
                f"mutable=[{self.collection_name!r}] (or update_stats=False to use the stored u). "
                "This applies to the default collection 'batch_stats' as well."
            )
        coll = self.collection_name

        def normalize(name: str, keys: tuple[str, ...], w: jax.Array) -> jax.Array:
            w = jnp.asarray(w)
            if not _selected(name, self.variable_filter) or not shells.spectral_selected(self, w, name, "Input"):
                return w
            out = w.shape[self.feature_axis]

            def init_u():
                key = self.make_rng("params")
                if self.n_warmup:
                    u = weights.spectral_norm_init(
                        key, w, axis=self.feature_axis, n_warmup=self.n_warmup, eps=self.epsilon, dtype=self.param_dtype
                    )
                    return u.reshape(1, out)
                return jax.random.normal(key, (1, out), self.param_dtype)

            u_var = self.variable(coll, f"{name}/u", init_u)
            sigma_var = self.variable(coll, f"{name}/sigma", jnp.ones, (), self.param_dtype)
            w_sn, new_u, sigma = shells.spectral_view(self, w, u_var.value, name, f"{coll}/{name}/u")
            if update_stats:
                u_var.value = new_u
                sigma_var.value = sigma.astype(jnp.asarray(sigma_var.value).dtype)
            return w_sn

        return _reparametrize(self, normalize)(*args, **kwargs)


__all__ = [
    "AdaLNZero",
    "BatchNorm",
    "BatchRenorm",
    "ConditionalBatchNorm",
    "CosineConv",
    "CosineDense",
    "DyT",
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
