"""Data-side methods: each chooses the axes its statistics run over, then calls the shared core.

batch norm      μ, σ² over every axis but the features (and across devices with axis_name)
layer norm      μ, σ² over the features of one example
group norm      μ, σ² per example over each group of channels (and the spatial axes)
instance norm   group norm with one channel per group
RMS norm        μ = 0, σ² = E[x²] over the features of one example
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bnjax._src import collective, running, statistics
from bnjax._src.params import NormParams, check_params, with_scale_offset
from bnjax._src.running import AccumulatingStats, BatchStats
from bnjax._src.statistics import Moments
from bnjax._src.transform import Activation, apply_normalization, normalize_with_statistics
from bnjax._src.validation import (
    Axes,
    _scalar_number,
    broadcast_shape_for,
    canonical_axes,
    check_eps,
    check_floating,
    check_int,
    check_mask,
    check_momentum,
)

S = TypeVar("S", BatchStats, AccumulatingStats)  # running statistics: the call returns the kind it was given


def _affine(params: NormParams, shape: tuple[int, ...]) -> tuple[jax.Array | None, jax.Array | None]:
    """Reshapes validated params to a broadcast shape against x; per-example params (x's rank,
    see ``check_params``) already broadcast and are left as they are."""
    return tuple(p if p is None or p.ndim == len(shape) else p.reshape(shape) for p in params)  # type: ignore[return-value]


def _activate(y: jax.Array, activation: Activation | None) -> jax.Array:
    return y if activation is None else activation(y)


def _require_several(size: int, what: str, method: str) -> None:
    """Raises unless each statistic covers several elements (counted statically, masks aside:
    a mask can only lower the count). Zero elements is allowed: x is then empty, and so is y."""
    if size == 1:
        raise ValueError(
            f"{method}: each statistic would be taken over a single element ({what}), so x − μ = 0 "
            "and the output would be the bias alone, with zero gradient. Use more elements per "
            "statistic (a larger batch or spatial extent, fewer groups) or a different method."
        )


def _participants(axis_name: collective.AxisName | None, axis_index_groups: collective.Groups | None) -> int:
    """How many participants share each statistic: 1 without ``axis_name``; the smallest group with
    ``axis_index_groups``."""
    if axis_name is None:
        return 1
    size = collective.axis_size(axis_name)
    if axis_index_groups is None:
        return size
    return int(collective.group_matrix(axis_index_groups, size).sum(1).min())


def batch_norm(
    x: ArrayLike,
    params: NormParams | None,
    stats: S,
    *,
    training: bool,
    axis: Axes = -1,
    momentum: float | None = 0.9,
    eps: float = 1e-5,
    axis_name: collective.AxisName | None = None,
    mask: ArrayLike | None = None,
    activation: Activation | None = None,
    axis_index_groups: collective.Groups | None = None,
    debias: bool = True,
    unbiased_running_var: bool = False,
    fused_backward: bool = True,
    virtual_batch_size: int | None = None,
    accumulation_steps: int | None = None,
) -> tuple[jax.Array, S]:
    """Batch normalization with explicit running statistics.

    Math (per feature c, over every axis of x except ``axis``, and over all participants of
    ``axis_name``; only the valid elements when ``mask`` is given):

        training:   μ_B = mean(x),  σ²_B = mean((x − μ_B)²)          (population variance)
                    y = f( g · (x − μ_B)/√(σ²_B + ε) + b )
                    stats ← decay · stats + (1 − decay) · (μ_B, σ²_B)
        evaluation: y = f( g · (x − stats.mean)/√(stats.var + ε) + b ),  stats unchanged

    ``decay`` is ``momentum`` (weight of the old value, Keras/Flax convention; PyTorch's ``p`` is
    ``1 − p`` here), except that by default (``debias=True``) the first updates are an exact
    average of the batches seen (decay = min(momentum, n/(n+1)) after n updates), so the stored
    statistics equal the first batch's after one step. ``momentum=None``: cumulative average.

    Running statistics are float32 (or wider) whatever x's dtype, carry ``stop_gradient``, and
    ``new_stats`` has exactly the structure, shapes and dtypes of ``stats`` (safe in ``lax.scan``,
    ``lax.cond`` and with buffer donation). A non-finite batch statistic leaves that feature's
    running values unchanged and increments ``stats.skipped``; a batch with no valid element
    leaves the state unchanged.

    Args:
      x: floating array, e.g. (N, H, W, C) with ``axis=-1`` or (N, C, H, W) with ``axis=1``.
      params: ``NormParams`` of the feature shape (or ``None``: no affine map), or per-example
        (conditional batch norm): x's rank, each dimension 1 or x's, e.g. (N, 1, 1, C).
      stats: ``BatchStats`` of the feature shape, e.g. from ``init_stats(C)``.
      training: Python bool: batch statistics and an update (True) or stored statistics (False).
      axis: the feature axis (or axes); statistics run over all the others.
      momentum: weight of the old running value in [0, 1), or ``None`` for a cumulative average.
      eps: ε > 0 added to the variance.
      axis_name: mapped axis name(s) to compute batch statistics across (sync batch norm) under
        ``pmap``, ``shard_map`` or ``vmap``; ``None`` under plain ``jit`` (sharded or not).
      mask: optional boolean array of x's rank (dims 1 or equal to x's); False elements are
        ignored by the statistics (their outputs are still computed).
      activation: optional f applied to the normalized output.
      axis_index_groups: optional partition of the participants of ``axis_name`` into groups
        (e.g. ``[[0, 1, 2, 3], [4, 5, 6, 7]]``): statistics over each device's group only.
      debias: ``False`` gives the plain EMA of Flax/PyTorch (first step biased toward mean 0, var 1).
      unbiased_running_var: store the unbiased variance M₂/(n−1) in the running statistics
        (PyTorch's convention; normalization in training still uses the population variance).
      fused_backward: differentiate in closed form with a custom VJP (default: one fused pass,
        only x and the per-statistic μ, 1/σ kept for the backward pass, one all-reduce across
        devices). Reverse mode of any order works; ``False`` leaves it to autodiff, which forward
        mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) needs.
      virtual_batch_size: ghost batch norm (Hoffer et al. 2017): axis 0 of the local x is split
        into consecutive sub-batches of this many examples, each normalized with its own
        statistics (local to this device, also with ``axis_name``); the running statistics are
        updated with the exact statistics of the whole batch (with ``axis_name``, the global
        ones), as without it. Must divide the local batch. No effect in evaluation.
      accumulation_steps: k for gradient accumulation (the stats from
        ``init_stats(C, accumulation_steps=k)``): each training call pools its batch moments into
        the state, and every k-th call applies one running update with the exact pooled
        statistics of those k micro-batches, so ``momentum`` means per optimizer step what it
        means without accumulation. No effect in evaluation.

    Returns:
      ``(y, new_stats)``: y of x's shape and dtype; ``new_stats`` like ``stats``.

    Example:
      >>> import jax, jax.numpy as jnp, bnjax
      >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 2.0 + 5.0
      >>> params, stats = bnjax.init_params(3), bnjax.init_stats(3)
      >>> y, stats = bnjax.batch_norm(x, params, stats, training=True)
      >>> bool(jnp.allclose(stats.mean, x.mean(axis=(0, 1, 2))))
      True
      >>> y_eval, _ = bnjax.batch_norm(x, params, stats, training=False)

    References:
      Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by Reducing
      Internal Covariate Shift".
    """
    return _batch_norm(
        x,
        params,
        stats,
        training=training,
        axis=axis,
        momentum=momentum,
        eps=eps,
        axis_name=axis_name,
        mask=mask,
        activation=activation,
        axis_index_groups=axis_index_groups,
        debias=debias,
        unbiased_running_var=unbiased_running_var,
        mean_only=False,
        fused_backward=fused_backward,
        virtual_batch_size=virtual_batch_size,
        accumulation_steps=accumulation_steps,
    )


def mean_only_batch_norm(
    x: ArrayLike,
    params: NormParams | None,
    stats: S,
    *,
    training: bool,
    axis: Axes = -1,
    momentum: float | None = 0.9,
    axis_name: collective.AxisName | None = None,
    mask: ArrayLike | None = None,
    activation: Activation | None = None,
    axis_index_groups: collective.Groups | None = None,
    debias: bool = True,
    accumulation_steps: int | None = None,
) -> tuple[jax.Array, S]:
    """Mean-only batch normalization: subtract the batch mean, do not divide (σ = 1).

    Math (per feature, over the same axes, devices and mask as ``batch_norm``):

        training:   y = f( g · (x − μ_B) + b ),     stats ← running update with (μ_B, σ²_B)
        evaluation: y = f( g · (x − stats.mean) + b )

    the core h = f(g·(x − μ)/σ + b) with σ = 1. Salimans & Kingma pair it with weight
    normalization: weight norm fixes the scale of each pre-activation through g, and centering
    by the batch mean removes the shift without the noise a batch σ adds. The running variance
    is tracked too (same rules as ``batch_norm``, for diagnostics) but never used; every
    running-statistics convention, the non-finite policy and sync statistics are those of
    ``batch_norm``.

    Args:
      x: floating array, e.g. (N, H, W, C) with ``axis=-1``.
      params: ``NormParams`` of the feature shape (or ``None``); with weight norm, usually
        ``init_params(C, use_scale=False)`` (g lives in the weight norm).
      stats: ``BatchStats`` of the feature shape.
      training: Python bool.
      axis, momentum, axis_name, mask, activation, axis_index_groups, debias, accumulation_steps:
        as ``batch_norm``.

    Returns:
      ``(y, new_stats)``: y of x's shape and dtype; ``new_stats`` like ``stats``.

    Example:
      >>> import jax.numpy as jnp, bnjax
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> y, stats = bnjax.mean_only_batch_norm(x, None, bnjax.init_stats(2), training=True)
      >>> y
      Array([[ -1., -10.],
             [  1.,  10.]], dtype=float32)

    References:
      Salimans & Kingma 2016, "Weight Normalization: A Simple Reparameterization to Accelerate
      Training of Deep Neural Networks", §2.2 (mean-only batch normalization).
    """
    return _batch_norm(
        x,
        params,
        stats,
        training=training,
        axis=axis,
        momentum=momentum,
        eps=1.0,
        axis_name=axis_name,
        mask=mask,
        activation=activation,
        axis_index_groups=axis_index_groups,
        debias=debias,
        unbiased_running_var=False,
        mean_only=True,
        fused_backward=False,
        accumulation_steps=accumulation_steps,
    )


def _batch_norm(
    x: ArrayLike,
    params: NormParams | None,
    stats: Any,
    *,
    training: bool,
    axis: Axes,
    momentum: float | None,
    eps: float,
    axis_name: collective.AxisName | None,
    mask: ArrayLike | None,
    activation: Activation | None,
    axis_index_groups: collective.Groups | None,
    debias: bool,
    unbiased_running_var: bool,
    mean_only: bool,
    fused_backward: bool,
    renorm: tuple[Any, Any] | None = None,
    virtual_batch_size: int | None = None,
    accumulation_steps: int | None = None,
) -> tuple[jax.Array, Any]:
    """batch_norm, mean_only_batch_norm and batch_renorm (``renorm=(r_max, d_max)``): validate,
    batch (or stored) statistics, transform, update. ``virtual_batch_size``: ghost batch norm."""
    method = "mean_only_batch_norm" if mean_only else "batch_norm"
    if not isinstance(training, bool):
        raise TypeError(
            f"training must be a Python bool, got {type(training).__name__}: it selects the "
            "computation at trace time. Use jax.lax.cond over two calls to switch on a traced value."
        )
    x = check_floating(x)
    feat = canonical_axes(axis, x.ndim, shape=x.shape)
    reduce = tuple(a for a in range(x.ndim) if a not in feat)
    feature_shape = tuple(x.shape[a] for a in feat)
    params = check_params(params, feature_shape, f"the feature axis {axis!r} of x {x.shape}", x.shape)
    stats = running.check_stats(stats, feature_shape)
    check_eps(eps, statistics.compute_dtype(x.dtype))
    check_momentum(momentum)
    mask = check_mask(mask, x)
    bshape = broadcast_shape_for(feature_shape, feat, x.ndim)
    scale, bias = _affine(params, bshape)
    with jax.named_scope(f"bnjax.{method}"):
        if not training:
            mean = jax.lax.stop_gradient(stats.mean).reshape(bshape)
            var = None if mean_only else jax.lax.stop_gradient(stats.var).reshape(bshape)
            return apply_normalization(x, mean, var, scale, bias, eps, activation), stats
        per_feature = statistics.reduced_size(x.shape, reduce) * _participants(axis_name, axis_index_groups)
        if virtual_batch_size is not None:
            virtual_batch_size = _check_virtual_batch(virtual_batch_size, x, reduce, mean_only)
            per_feature = statistics.reduced_size(x.shape, reduce) // (x.shape[0] // virtual_batch_size)
        _require_several(per_feature, f"x {x.shape} with feature axis {axis!r}", f"{method}(training=True)")
        if mean_only:  # σ = 1: autodiff of a mean subtraction is already minimal
            batch = statistics.global_moments(x, reduce, mask, axis_name, axis_index_groups)
            y = apply_normalization(x, (batch.shift, batch.offset), None, scale, bias, eps, activation)
        elif virtual_batch_size is not None:
            if renorm is not None:
                raise ValueError(
                    "virtual_batch_size is not supported by batch_renorm: r and d would need the running "
                    "statistics of each sub-batch; use batch_norm(..., virtual_batch_size=...)."
                )
            y, batch = _ghost(
                x, scale, bias, reduce, eps, mask, axis_name, axis_index_groups, fused_backward, virtual_batch_size
            )
            y = _activate(y, activation)
        else:
            if renorm is not None:
                scale, bias = _renorm_affine(
                    x, scale, bias, stats, renorm, reduce, eps, mask, axis_name, axis_index_groups, bshape
                )
            y, batch = normalize_with_statistics(
                x,
                scale,
                bias,
                reduce,
                eps,
                mask=mask,
                axis_name=axis_name,
                axis_index_groups=axis_index_groups,
                fused=fused_backward,
            )
            y = _activate(y, activation)
        flat = Moments(*(v.reshape(feature_shape) for v in batch))
        k = running.check_accumulation(stats, accumulation_steps)
        new: Any
        if k is None:
            new = running.update(
                stats, flat, momentum=momentum, debias=debias, unbiased_running_var=unbiased_running_var
            )
        else:
            new = running.accumulate(
                cast(running.AccumulatingStats, stats),
                flat,
                k,
                momentum=momentum,
                debias=debias,
                unbiased_running_var=unbiased_running_var,
            )
        return y, new


def _check_virtual_batch(virtual_batch_size: Any, x: jax.Array, reduce: tuple[int, ...], mean_only: bool) -> int:
    v = check_int(virtual_batch_size, "virtual_batch_size", 1, ": the number of consecutive examples per sub-batch")
    if mean_only:
        raise ValueError("virtual_batch_size is not supported by mean_only_batch_norm (use batch_norm).")
    if 0 not in reduce:
        raise ValueError(
            f"virtual_batch_size splits axis 0 of x {x.shape} into sub-batches, but axis 0 is a feature axis "
            "here: put the batch on axis 0."
        )
    if x.shape[0] % v:
        raise ValueError(
            f"virtual_batch_size={v} does not divide the local batch of {x.shape[0]} examples (axis 0 of x "
            f"{x.shape}): each sub-batch must be whole; use a divisor of {x.shape[0]}."
        )
    return v


def _ghost(x, scale, bias, reduce, eps, mask, axis_name, axis_index_groups, fused, v):
    """Ghost batch norm: consecutive sub-batches of ``v`` examples, each normalized with its own
    (local) statistics; returns (y, the moments of the whole batch, pooled exactly across the
    sub-batches and, with ``axis_name``, across participants) for the running update."""
    groups = x.shape[0] // v

    def split(a):  # (N, ...) -> (G, v, ...); a broadcast leading axis stays broadcast
        if a is None:
            return None
        if a.ndim == x.ndim and a.shape[0] == x.shape[0]:
            return a.reshape((groups, v) + a.shape[1:])
        return a.reshape((1,) + a.shape)

    xg = x.reshape((groups, v) + x.shape[1:])
    y, per_group = normalize_with_statistics(
        xg, split(scale), split(bias), tuple(a + 1 for a in reduce), eps, mask=split(mask), fused=fused
    )
    pooled = statistics.merge(per_group)  # over the sub-batches (axis 0), exact
    return y.reshape(x.shape), statistics.merge_across(pooled, axis_name, axis_index_groups)


def _renorm_affine(x, scale, bias, stats, renorm, reduce, eps, mask, axis_name, axis_index_groups, bshape):
    """Batch renorm as batch norm with the gain g·r and the shift g·d + b (r, d constants):
    g·(x̂_B·r + d) + b = (g·r)·x̂_B + (g·d + b), so the fused pass and its backward apply as is.
    The fused pass computes the same batch moments again (one more read of x unless XLA merges them)."""
    r_max, d_max = renorm
    dtype = statistics.compute_dtype(x.dtype)
    batch = statistics.global_moments(jax.lax.stop_gradient(x), reduce, mask, axis_name, axis_index_groups)
    eps_c = jnp.asarray(eps, dtype)
    sigma_b = jnp.sqrt(batch.var.astype(dtype) + eps_c)
    sigma = jnp.sqrt(stats.var.astype(dtype).reshape(bshape) + eps_c)
    r_max, d_max = jnp.asarray(r_max, dtype), jnp.asarray(d_max, dtype)
    r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / r_max, r_max))
    d = jax.lax.stop_gradient(jnp.clip((batch.mean.astype(dtype) - stats.mean.reshape(bshape)) / sigma, -d_max, d_max))
    gain = r if scale is None else scale * r
    shift = d if scale is None else scale * d
    return gain, (shift if bias is None else shift + bias)


def batch_renorm(
    x: ArrayLike,
    params: NormParams | None,
    stats: S,
    *,
    training: bool,
    r_max: float = 3.0,
    d_max: float = 5.0,
    axis: Axes = -1,
    momentum: float | None = 0.9,
    eps: float = 1e-5,
    axis_name: collective.AxisName | None = None,
    mask: ArrayLike | None = None,
    activation: Activation | None = None,
    axis_index_groups: collective.Groups | None = None,
    debias: bool = True,
    unbiased_running_var: bool = False,
    fused_backward: bool = True,
    accumulation_steps: int | None = None,
) -> tuple[jax.Array, S]:
    """Batch renormalization: batch norm whose training output is corrected toward the running
    statistics, so training and inference compute nearly the same function.

    Math (per feature; μ_B, σ²_B the batch statistics as in ``batch_norm``, μ, σ² the running ones
    *before* this update, σ_B = √(σ²_B + ε), σ = √(σ² + ε)):

        r = sg(clip(σ_B/σ, 1/r_max, r_max)),   d = sg(clip((μ_B − μ)/σ, −d_max, d_max))
        training:   y = f( g · ((x − μ_B)/σ_B · r + d) + b ),  stats updated as batch_norm
        evaluation: y = f( g · (x − μ)/σ + b ),                stats unchanged

    sg is ``stop_gradient``: r and d are constants for differentiation, so the gradient is batch
    norm's through x̂_B, with the gain g·r (and d enters only the shift). With r_max = 1 and
    d_max = 0, r = 1 and d = 0, and this is ``batch_norm`` exactly: outputs, gradients and state,
    bit for bit. ``r_max`` and ``d_max`` may be traced (a schedule inside ``jit``; the paper
    starts at 1 and 0 and relaxes them, see the README). Statistics span devices with
    ``axis_name`` as in ``batch_norm`` (r and d then use the global batch statistics).

    Args:
      x, params, stats, training, axis, momentum, eps, axis_name, mask, activation,
        axis_index_groups, debias, unbiased_running_var, fused_backward, accumulation_steps: as
        ``batch_norm`` (under accumulation, r and d come from the statistics of the last update).
      r_max: the bound on r, ≥ 1 (the paper's final value 3).
      d_max: the bound on |d|, ≥ 0 (the paper's final value 5).

    Returns:
      ``(y, new_stats)``: y of x's shape and dtype; ``new_stats`` like ``stats``.

    Example:
      >>> import jax, jax.numpy as jnp, bnjax
      >>> x = jax.random.normal(jax.random.key(0), (16, 3)) * 2.0 + 5.0
      >>> params, stats = bnjax.init_params(3), bnjax.init_stats(3)
      >>> y, new = bnjax.batch_renorm(x, params, stats, training=True, r_max=1.0, d_max=0.0)
      >>> y_bn, new_bn = bnjax.batch_norm(x, params, stats, training=True)
      >>> bool(jnp.array_equal(y, y_bn))  # r_max = 1, d_max = 0: batch norm exactly
      True

    References:
      Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in
      Batch-Normalized Models", Algorithm 1.
    """
    check_renorm_bounds(r_max, d_max)
    return _batch_norm(
        x,
        params,
        stats,
        training=training,
        axis=axis,
        momentum=momentum,
        eps=eps,
        axis_name=axis_name,
        mask=mask,
        activation=activation,
        axis_index_groups=axis_index_groups,
        debias=debias,
        unbiased_running_var=unbiased_running_var,
        mean_only=False,
        fused_backward=fused_backward,
        renorm=(r_max, d_max),
        accumulation_steps=accumulation_steps,
    )


def check_renorm_bounds(r_max: Any, d_max: Any) -> None:
    """r_max ≥ 1 and d_max ≥ 0 when known now (a traced bound is taken as given)."""
    r = _scalar_number(r_max, "r_max", ": the bound on r = sigma_B/sigma, >= 1 (1 gives batch norm)")
    d = _scalar_number(d_max, "d_max", ": the bound on |d| = |mu_B - mu|/sigma, >= 0 (0 gives batch norm)")
    if r is not None and not float(r) >= 1.0:
        raise ValueError(f"r_max must be >= 1, got {r_max!r}: r is clipped to [1/r_max, r_max] (1: batch norm).")
    if d is not None and not float(d) >= 0.0:
        raise ValueError(f"d_max must be >= 0, got {d_max!r}: d is clipped to [-d_max, d_max] (0: batch norm).")


def layer_norm(
    x: ArrayLike,
    params: NormParams | None,
    *,
    axis: Axes = -1,
    eps: float = 1e-5,
    activation: Activation | None = None,
    feature_axis: Axes | None = None,
    mask: ArrayLike | None = None,
    axis_name: collective.AxisName | None = None,
    axis_index_groups: collective.Groups | None = None,
    scale_offset: float = 0.0,
    fused_backward: bool = True,
) -> jax.Array:
    """Layer normalization: statistics over the features of each example.

    Math (for each position of the axes not in ``axis``):

        μ = mean over ``axis`` of x,   σ² = mean over ``axis`` of (x − μ)²
        y = f( g · (x − μ)/√(σ² + ε) + b )

    Same computation in training and evaluation; no running statistics.

    Args:
      x: floating array, e.g. (batch, ..., features).
      params: ``NormParams`` of shape ``x.shape[feature_axis]`` (or ``None``), or per-example
        (FiLM, AdaLN): x's rank, each dimension 1 or x's, e.g. (N, 1, C) for x (N, T, C).
      axis: normalized axis or axes, e.g. ``-1`` or ``(1, 2, 3)`` for (N, H, W, C).
      eps: ε > 0.
      activation: optional f.
      feature_axis: the axes g and b vary over; default ``axis`` (one g per normalized element,
        PyTorch's ``elementwise_affine``). Use ``feature_axis=-1`` for per-channel g, b when
        normalizing over (H, W, C) (Flax's ``feature_axes``).
      mask: optional boolean array of x's rank (dims 1 or equal to x's), True = valid: the
        statistics of each row are over its valid elements only (see "Masks" in the README).
      axis_name: mapped axis name(s) over which ``axis`` is split (a hidden axis sharded under
        ``shard_map``/``pmap``, tensor parallelism): each statistic then runs over the elements
        of every participant, with one all-reduce forward and one backward. ``None`` under plain
        ``jit`` (sharded or not: XLA reduces across shards itself).
      axis_index_groups: optional partition of the participants of ``axis_name`` into groups
        that each hold one whole row.
      scale_offset: a number c: the gain is c + g, formed in float32 (zero-centred g, as
        Gemma's and Qwen3-Next's RMS norm with c = 1; a small bfloat16 g is not lost in the
        addition). Needs ``params.scale``. Default 0: the gain is g itself.
      fused_backward: closed-form custom VJP (default) or autodiff (``False``, for forward mode).

    Returns:
      y, x's shape and dtype.

    Example:
      >>> import jax.numpy as jnp, bnjax
      >>> y = bnjax.layer_norm(jnp.array([[1.0, 2.0, 3.0]]), bnjax.init_params(3))
      >>> y.round(3)
      Array([[-1.225,  0.   ,  1.225]], dtype=float32)

    References:
      Ba, Kiros & Hinton 2016, "Layer Normalization".
    """
    x = check_floating(x)
    axes = canonical_axes(axis, x.ndim, shape=x.shape)
    feat = axes if feature_axis is None else canonical_axes(feature_axis, x.ndim, name="feature_axis", shape=x.shape)
    check_eps(eps, statistics.compute_dtype(x.dtype))
    feature_shape = tuple(x.shape[a] for a in feat)
    params = check_params(params, feature_shape, f"the normalized axes {axis!r} of x {x.shape}", x.shape)
    params = with_scale_offset(params, scale_offset, x.dtype)
    mask = check_mask(mask, x)
    size = statistics.reduced_size(x.shape, axes) * _participants(axis_name, axis_index_groups)
    _require_several(size, f"x {x.shape} over axis {axis!r}", "layer_norm")
    return _per_row(
        x, params, feat, axes, eps, activation, mask, axis_name, axis_index_groups, fused_backward, "layer_norm"
    )


def _per_row(
    x: jax.Array,
    params: NormParams,
    feat: tuple[int, ...],
    reduce: tuple[int, ...],
    eps,
    activation: Activation | None,
    mask: jax.Array | None,
    axis_name: collective.AxisName | None,
    axis_index_groups: collective.Groups | None,
    fused: bool,
    method: str,
    center: bool = True,
) -> jax.Array:
    """The shared tail of layer, instance and RMS norm: g and b laid out on the feature axes
    ``feat``, one statistic per position of the axes not in ``reduce``."""
    feature_shape = tuple(x.shape[a] for a in feat)
    with jax.named_scope(f"bnjax.{method}"):
        scale, bias = _affine(params, broadcast_shape_for(feature_shape, feat, x.ndim))
        y = normalize_with_statistics(
            x,
            scale,
            bias,
            reduce,
            eps,
            mask=mask,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            center=center,
            fused=fused,
        )[0]
        return _activate(y, activation)


def _grouped(
    x: jax.Array,
    params: NormParams,
    num_groups: int,
    axis: int,
    reduce: tuple[int, ...],
    eps,
    activation,
    mask: jax.Array | None,
    axis_name,
    axis_index_groups,
    fused: bool,
    what: str,
    method: str,
) -> jax.Array:
    """Group-wise normalization: split channels into groups, one statistic per group and position
    of the axes not in ``reduce`` (axes of x, the channel axis excluded). ``what`` names the
    elements of one statistic in the single-element error."""
    channels = x.shape[axis]
    split = (num_groups, channels // num_groups)
    shape = x.shape[:axis] + split + x.shape[axis + 1 :]
    xg = x.reshape(shape)
    # the axes of xg: those of x, with the channel axis split into (group, member)
    reduce_g = tuple(a if a < axis else a + 1 for a in reduce) + (axis + 1,)
    size = statistics.reduced_size(xg.shape, reduce_g) * _participants(axis_name, axis_index_groups)
    _require_several(size, what, method)
    if mask is not None:  # the mask's channel axis is split like x's (or stays broadcast)
        mask_split = split if mask.shape[axis] == channels else (1, 1)
        mask = mask.reshape(mask.shape[:axis] + mask_split + mask.shape[axis + 1 :])
    pshape = broadcast_shape_for(split, (axis, axis + 1), xg.ndim)

    def grouped(p: jax.Array | None) -> jax.Array | None:
        if p is None or p.ndim != x.ndim:  # channel params (C,): laid out by _affine
            return p
        # per-example params of x's rank: their channel axis is split like x's (or stays broadcast)
        return p.reshape(p.shape[:axis] + (split if p.shape[axis] == channels else (1, 1)) + p.shape[axis + 1 :])

    scale, bias = _affine(NormParams(grouped(params.scale), grouped(params.bias)), pshape)
    y = normalize_with_statistics(
        xg,
        scale,
        bias,
        tuple(sorted(reduce_g)),
        eps,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        fused=fused,
    )[0]
    return _activate(y, activation).reshape(x.shape)


def _channel_axis(x: jax.Array, axis: int, method: str, batch_axis: bool = True) -> int:
    if x.ndim < 2 and batch_axis:
        raise ValueError(f"{method} needs x with a leading batch axis and a channel axis, got shape {x.shape}.")
    (ax,) = canonical_axes(axis, x.ndim, shape=x.shape)
    if ax == 0 and batch_axis:
        raise ValueError(
            f"{method}: axis={axis} selects axis 0, which is the batch axis (statistics are per "
            "example): use axis=-1 for (N, ..., C) or axis=1 for (N, C, ...)."
        )
    return ax


def _reduction_axes(x: jax.Array, channel: int, reduction_axes: Axes | None, method: str) -> tuple[int, ...]:
    """The axes of x a statistic runs over besides the channels: by default all but 0 and the
    channel axis; given ones are checked (in range, no repeats, not the channel axis)."""
    if reduction_axes is None:
        return tuple(a for a in range(1, x.ndim) if a != channel)
    reduce = canonical_axes(reduction_axes, x.ndim, name="reduction_axes", shape=x.shape)
    if channel in reduce:
        raise ValueError(
            f"{method}: reduction_axes={reduction_axes!r} includes the channel axis {channel} of x {x.shape}; "
            "the group's channels are always reduced: list only the other axes."
        )
    return reduce


def group_norm(
    x: ArrayLike,
    params: NormParams | None,
    *,
    num_groups: int,
    axis: int = -1,
    eps: float = 1e-5,
    activation: Activation | None = None,
    mask: ArrayLike | None = None,
    reduction_axes: Axes | None = None,
    axis_name: collective.AxisName | None = None,
    axis_index_groups: collective.Groups | None = None,
    scale_offset: float = 0.0,
    fused_backward: bool = True,
) -> jax.Array:
    """Group normalization: per example, statistics over each group of channels and all spatial axes.

    Math: split the C channels into G groups of C/G; for example n and group k,

        μ_nk = mean of x[n, ..., channels of k],  σ²_nk likewise
        y = f( g_c · (x − μ_nk)/√(σ²_nk + ε) + b_c )        (g, b per channel)

    Axis 0 is the batch axis. G = 1 is layer norm over (spatial, C) with per-channel g, b;
    G = C is instance norm.

    Args:
      x: floating array (N, ..., C) (``axis=-1``) or (N, C, ...) (``axis=1``).
      params: ``NormParams`` of shape (C,) (or ``None``), or per-example: x's rank, each
        dimension 1 or x's, e.g. (N, 1, 1, C).
      num_groups: G, a divisor of C (an int; NumPy integers too).
      axis: channel axis (not 0).
      eps: ε > 0.
      activation: optional f.
      mask: optional boolean array of x's rank (dims 1 or equal to x's), True = valid:
        statistics over the valid elements of each (example, group) only.
      reduction_axes: the axes of x each statistic runs over besides the group's channels
        (default: every axis but 0 and ``axis``). Leave out more axes to keep them apart, e.g.
        ``(2, 3)`` on (N, T, H, W, C) for a statistic per example and frame; include 0 for
        unbatched input.
      axis_name: mapped axis name(s) over which the reduced axes are split (e.g. the spatial
        axes sharded under ``shard_map``): statistics over every participant's elements.
      axis_index_groups: optional partition of the participants of ``axis_name`` into groups.
      scale_offset: a number c: the gain is c + g, formed in float32 (zero-centred g, as
        Gemma's and Qwen3-Next's RMS norm with c = 1; a small bfloat16 g is not lost in the
        addition). Needs ``params.scale``. Default 0: the gain is g itself.
      fused_backward: closed-form custom VJP (default) or autodiff (``False``, for forward mode).

    Returns:
      y, x's shape and dtype.

    Example:
      >>> import jax, bnjax
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
      >>> bnjax.group_norm(x, bnjax.init_params(32), num_groups=8).shape
      (2, 8, 8, 32)

    References:
      Wu & He 2018, "Group Normalization".
    """
    x = check_floating(x)
    ax = _channel_axis(x, axis, "group_norm", batch_axis=reduction_axes is None)
    reduce = _reduction_axes(x, ax, reduction_axes, "group_norm")
    check_eps(eps, statistics.compute_dtype(x.dtype))
    channels = x.shape[ax]
    divisors = [g for g in range(1, channels + 1) if channels % g == 0]
    where = f"the {channels} channels of x {x.shape} (axis={axis})"
    num_groups = check_int(num_groups, "num_groups", 1, f": a divisor of {where}, one of {divisors}")
    if channels % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide {where}: use one of {divisors}.")
    params = check_params(params, (channels,), f"the channel axis {axis} of x {x.shape}", x.shape)
    params = with_scale_offset(params, scale_offset, x.dtype)
    mask = check_mask(mask, x)
    spatial = tuple(x.shape[a] for a in reduce)
    what = f"{channels // num_groups} channel(s) per group × {spatial} over the axes {reduce}"
    with jax.named_scope("bnjax.group_norm"):
        return _grouped(
            x,
            params,
            num_groups,
            ax,
            reduce,
            eps,
            activation,
            mask,
            axis_name,
            axis_index_groups,
            fused_backward,
            what,
            "group_norm",
        )


def instance_norm(
    x: ArrayLike,
    params: NormParams | None,
    *,
    axis: Axes = -1,
    eps: float = 1e-5,
    activation: Activation | None = None,
    mask: ArrayLike | None = None,
    axis_name: collective.AxisName | None = None,
    axis_index_groups: collective.Groups | None = None,
    scale_offset: float = 0.0,
    fused_backward: bool = True,
) -> jax.Array:
    """Instance normalization: statistics over the spatial axes, per example and channel.

    Math: for example n and channel c, μ_nc, σ²_nc over the spatial positions (every axis but 0
    and the channel axes); y = f( g_c · (x − μ_nc)/√(σ²_nc + ε) + b_c ). Equal to ``group_norm``
    with G = C.

    Args:
      x: floating array (N, ..., C) (``axis=-1``) or (N, C, ...) (``axis=1``) with at least one
        spatial axis of total size > 1.
      params: ``NormParams`` of the channel shape, (C,) (or ``None``), or per-example: x's
        rank, each dimension 1 or x's, e.g. (N, 1, 1, C).
      axis: the channel axis, or several (a tuple, e.g. ``(1, 2)``: one statistic and one g, b per
        entry of those axes); never axis 0, the batch axis.
      eps: ε > 0.
      activation: optional f.
      mask: optional boolean array of x's rank (dims 1 or equal to x's), True = valid:
        statistics over the valid spatial positions of each (example, channel) only.
      axis_name: mapped axis name(s) over which the spatial axes are split: statistics over every
        participant's positions.
      axis_index_groups: optional partition of the participants of ``axis_name`` into groups.
      scale_offset: a number c: the gain is c + g, formed in float32 (zero-centred g, as
        Gemma's and Qwen3-Next's RMS norm with c = 1; a small bfloat16 g is not lost in the
        addition). Needs ``params.scale``. Default 0: the gain is g itself.
      fused_backward: closed-form custom VJP (default) or autodiff (``False``, for forward mode).

    Returns:
      y, x's shape and dtype.

    Example:
      >>> import jax, bnjax
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> bnjax.instance_norm(x, bnjax.init_params(3)).shape
      (2, 8, 8, 3)

    References:
      Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization: The Missing Ingredient for Fast
      Stylization".
    """
    x = check_floating(x)
    if x.ndim < 2:
        raise ValueError(f"instance_norm needs x with a leading batch axis and a channel axis, got shape {x.shape}.")
    feat = canonical_axes(axis, x.ndim, shape=x.shape)
    if 0 in feat:
        raise ValueError(
            f"instance_norm: axis={axis!r} includes axis 0 of x {x.shape}. The channel axes cannot "
            "include the leading dimension as this is assumed to be the batch axis. Use axis=-1 for "
            "(N, ..., C) or axis=1 for (N, C, ...)."
        )
    check_eps(eps, statistics.compute_dtype(x.dtype))
    feature_shape = tuple(x.shape[a] for a in feat)
    params = check_params(params, feature_shape, f"the channel axis {axis!r} of x {x.shape}", x.shape)
    params = with_scale_offset(params, scale_offset, x.dtype)
    mask = check_mask(mask, x)
    reduce = tuple(a for a in range(1, x.ndim) if a not in feat)
    size = statistics.reduced_size(x.shape, reduce) * _participants(axis_name, axis_index_groups)
    what = f"the spatial axes of x {x.shape} (channel axis {axis!r}) hold one position"
    _require_several(size, what, "instance_norm")
    return _per_row(
        x, params, feat, reduce, eps, activation, mask, axis_name, axis_index_groups, fused_backward, "instance_norm"
    )


def rms_norm(
    x: ArrayLike,
    params: NormParams | None,
    *,
    axis: Axes = -1,
    eps: float = 1e-6,
    activation: Activation | None = None,
    mask: ArrayLike | None = None,
    feature_axis: Axes | None = None,
    axis_name: collective.AxisName | None = None,
    axis_index_groups: collective.Groups | None = None,
    scale_offset: float = 0.0,
    cast_before_scale: bool = False,
    fused_backward: bool = True,
) -> jax.Array:
    """Root-mean-square normalization: σ² = E[x²] over the features, no centering (μ = 0).

    Math:  y = f( g · x / √(mean over ``axis`` of x² + ε) + b )

    Args:
      x: floating array, e.g. (batch, ..., features).
      params: ``NormParams`` of shape ``x.shape[axis]`` (or per-example, x's rank, as for
        ``layer_norm``); ``bias`` usually ``None``
        (``init_params(C, use_bias=False)``).
      axis: normalized axis or axes.
      eps: ε > 0 (default 1e-6).
      activation: optional f.
      mask: optional boolean array of x's rank (dims 1 or equal to x's), True = valid:
        E[x²] over the valid elements of each row only.
      feature_axis: the axes g and b vary over; default ``axis`` (as ``layer_norm``).
      axis_name: mapped axis name(s) over which ``axis`` is split (a hidden axis sharded under
        ``shard_map``/``pmap``, tensor parallelism): each statistic then runs over the elements
        of every participant, with one all-reduce forward and one backward. ``None`` under plain
        ``jit`` (sharded or not: XLA reduces across shards itself).
      axis_index_groups: optional partition of the participants of ``axis_name`` into groups
        that each hold one whole row.
      scale_offset: a number c: the gain is c + g, formed in float32 (zero-centred g, as
        Gemma's and Qwen3-Next's RMS norm with c = 1; a small bfloat16 g is not lost in the
        addition). Needs ``params.scale``. Default 0: the gain is g itself.
      cast_before_scale: the order of the last two steps. ``False`` (default): g·x̂ + b in
        float32, then cast to x's dtype (the order of Gemma's and T5X/Flax's RMS norm).
        ``True``: x̂ is cast to x's dtype first, then multiplied by g in the promotion of x's and
        g's dtypes (Llama's and Hugging Face T5's order: with bfloat16 x and g the product is
        rounded in bfloat16), then cast to x's dtype. Ported weights give the original model's
        outputs only in its own order.
      fused_backward: closed-form custom VJP (default) or autodiff (``False``, for forward mode).

    Returns:
      y, x's shape and dtype.

    Example:
      >>> import jax.numpy as jnp, bnjax
      >>> y = bnjax.rms_norm(jnp.array([[3.0, 4.0]]), bnjax.init_params(2, use_bias=False), eps=1e-12)
      >>> [round(float(v), 4) for v in y[0]]  # x / sqrt((9 + 16)/2)
      [0.8485, 1.1314]

    References:
      Zhang & Sennrich 2019, "Root Mean Square Layer Normalization".
    """
    x = check_floating(x)
    axes = canonical_axes(axis, x.ndim, shape=x.shape)
    feat = axes if feature_axis is None else canonical_axes(feature_axis, x.ndim, name="feature_axis", shape=x.shape)
    check_eps(eps, statistics.compute_dtype(x.dtype))
    feature_shape = tuple(x.shape[a] for a in feat)
    params = check_params(params, feature_shape, f"the normalized axes {axis!r} of x {x.shape}", x.shape)
    params = with_scale_offset(params, scale_offset, x.dtype)
    mask = check_mask(mask, x)
    _participants(axis_name, axis_index_groups)  # a clear error for an unbound name, here too
    if not isinstance(cast_before_scale, bool):
        raise TypeError(f"cast_before_scale must be a Python bool, got {type(cast_before_scale).__name__}.")
    # cast_before_scale: the core gives x̂ in x's dtype, scaled here (outside the fused pass)
    y = _per_row(
        x,
        NormParams(None, None) if cast_before_scale else params,
        feat,
        axes,
        eps,
        None if cast_before_scale else activation,
        mask,
        axis_name,
        axis_index_groups,
        fused_backward,
        "rms_norm",
        center=False,
    )
    if not cast_before_scale:
        return y
    scale, bias = _affine(params, broadcast_shape_for(feature_shape, feat, x.ndim))

    def affine(v: jax.Array) -> jax.Array:
        v = v if scale is None else v * scale
        return v if bias is None else v + bias

    if mask is not None:  # padding stays a constant for differentiation, as in the core (no 0·NaN into dg)
        padding = jax.lax.stop_gradient(affine(y))
        return _activate(
            jnp.where(mask, affine(jnp.where(mask, y, jnp.zeros((), y.dtype))), padding).astype(x.dtype), activation
        )
    return _activate(affine(y).astype(x.dtype), activation)


def dyt(
    x: ArrayLike,
    alpha: ArrayLike,
    params: NormParams | None,
    *,
    axis: Axes = -1,
    activation: Activation | None = None,
) -> jax.Array:
    """Dynamic Tanh (DyT): the normalization-free replacement of layer norm in transformers.

    Math:  y = f( g · tanh(α · x) + b )

    with α a learned scalar (the paper initializes it to 0.5; larger models use smaller values)
    and g, b per feature. No statistics: each element is squashed on its own, so DyT has no
    running state, no mask (padding affects nothing anyway) and no collective under sharding.
    Computed in float32 (or wider) for low-precision x, returned in x's dtype; gradients by
    autodiff (an elementwise map, which XLA fuses into one loop).

    Args:
      x: floating array, e.g. (batch, tokens, features).
      alpha: α, a floating scalar (a parameter; traced, differentiated).
      params: ``NormParams`` of shape ``x.shape[axis]`` (or per-example, x's rank, each
        dimension 1 or x's), or ``None`` (g = 1, b = 0).
      axis: the feature axis or axes of g and b.
      activation: optional f.

    Returns:
      y, x's shape and dtype.

    Example:
      >>> import jax.numpy as jnp, bnjax
      >>> y = bnjax.dyt(jnp.array([[0.0, 2.0, -2.0]]), jnp.array(0.5), bnjax.init_params(3))
      >>> [round(float(v), 4) for v in y[0]]  # tanh(0.5·x)
      [0.0, 0.7616, -0.7616]

    References:
      Zhu, Chen, He, LeCun & Liu 2025, "Transformers without Normalization".
    """
    x = check_floating(x)
    alpha = check_floating(alpha, "alpha")
    if alpha.ndim != 0:
        raise ValueError(
            f"alpha must be a scalar (one learned α per layer, as in the paper), got shape {alpha.shape}; "
            "per-channel α is not DyT's form."
        )
    feat = canonical_axes(axis, x.ndim, shape=x.shape)
    feature_shape = tuple(x.shape[a] for a in feat)
    params = check_params(params, feature_shape, f"the feature axis {axis!r} of x {x.shape}", x.shape)
    scale, bias = _affine(params, broadcast_shape_for(feature_shape, feat, x.ndim))
    dtype = jnp.promote_types(statistics.compute_dtype(x.dtype), statistics.compute_dtype(alpha.dtype))
    with jax.named_scope("bnjax.dyt"):
        y = jnp.tanh(alpha.astype(dtype) * x.astype(dtype))
        if scale is not None:
            y = y * scale.astype(dtype)
        if bias is not None:
            y = y + bias.astype(dtype)
        return _activate(y, activation).astype(x.dtype)


def _residual_sum(x: ArrayLike, residual: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """(x, h = residual + x in the residual's dtype), validated: same shape, floating."""
    x = check_floating(x)
    residual = check_floating(residual, "residual")
    if residual.shape != x.shape:
        raise ValueError(
            f"residual has shape {residual.shape} but x has shape {x.shape}: the residual stream and the "
            "block output it is added to must have the same shape (no broadcasting)."
        )
    return x, residual + x.astype(residual.dtype)


def add_layer_norm(
    x: ArrayLike, residual: ArrayLike, params: NormParams | None, **kwargs: Any
) -> tuple[jax.Array, jax.Array]:
    """The residual add and layer norm of a pre-norm transformer block, as one call.

    Math:  h = residual + x (in the residual's dtype),   y = layer_norm(h)

    ``residual`` is the residual stream (often float32 while the blocks run in bfloat16); x is a
    block's output. Returns ``(y, h)``: h to carry on the residual stream, y (in x's dtype) to
    feed the next block. The gradient reaching h from y (through the fused backward pass of
    ``layer_norm``) and from the stream is summed once and cast to x's and the residual's dtypes.
    On XLA:CPU the add runs as its own pass (a loop with the two outputs h and y is split by XLA),
    so the forward pass reads h once more than the floor of reading x and residual and writing h
    and y (measured in the README, "Sequence models").

    Args:
      x: floating array, e.g. (batch, tokens, features), the block output.
      residual: floating array of x's shape, the residual stream.
      params: as ``layer_norm``.
      **kwargs: ``layer_norm``'s keywords (axis, eps, mask, axis_name, scale_offset, ...).

    Returns:
      ``(y, h)``: y of x's shape and dtype, h of the residual's dtype.

    Example:
      >>> import jax.numpy as jnp, bnjax
      >>> y, h = bnjax.add_layer_norm(jnp.array([[1.0, 2.0, 3.0]]), jnp.ones((1, 3)), bnjax.init_params(3))
      >>> h, y.round(3)
      (Array([[2., 3., 4.]], dtype=float32), Array([[-1.225,  0.   ,  1.225]], dtype=float32))

    References:
      Ba, Kiros & Hinton 2016, "Layer Normalization"; Xiong et al. 2020, "On Layer Normalization in
      the Transformer Architecture" (the pre-norm block).
    """
    x, h = _residual_sum(x, residual)
    return layer_norm(h, params, **kwargs).astype(x.dtype), h


def add_rms_norm(
    x: ArrayLike, residual: ArrayLike, params: NormParams | None, **kwargs: Any
) -> tuple[jax.Array, jax.Array]:
    """The residual add and RMS norm of a pre-norm transformer block (Llama), as one call.

    Math:  h = residual + x (in the residual's dtype),   y = rms_norm(h)

    As ``add_layer_norm``, with ``rms_norm``'s keywords (``cast_before_scale``, ``scale_offset``,
    ...). With ``cast_before_scale=True`` the normalized h is cast to h's dtype before g, then y
    to x's dtype.

    Args:
      x: floating array, the block output.
      residual: floating array of x's shape, the residual stream.
      params: as ``rms_norm``.
      **kwargs: ``rms_norm``'s keywords.

    Returns:
      ``(y, h)``: y of x's shape and dtype, h of the residual's dtype.

    Example:
      >>> import jax.numpy as jnp, bnjax
      >>> y, h = bnjax.add_rms_norm(jnp.array([[2.0, 3.0]]), jnp.ones((1, 2)), None, eps=1e-12)
      >>> [round(float(v), 4) for v in y[0]]  # h = (3, 4) over sqrt((9 + 16)/2)
      [0.8485, 1.1314]

    References:
      Zhang & Sennrich 2019, "Root Mean Square Layer Normalization".
    """
    x, h = _residual_sum(x, residual)
    return rms_norm(h, params, **kwargs).astype(x.dtype), h
