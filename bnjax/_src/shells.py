"""What the Flax shells (linen and nnx) share: the call into the functional API.

Both shells hold their configuration under the same attribute names, so one function per method
maps a shell's configuration and variables to the functional call. The shells themselves only
declare variables; there is no normalization math outside bnjax's functional core.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bnjax._src import methods, statistics, weights
from bnjax._src.params import NormParams
from bnjax._src.validation import canonical_axes, check_int, check_mask


def tracks_updates(cfg: Any) -> bool:
    """Whether the shell keeps ``count``/``skipped`` beside Flax's ``mean``/``var``.

    Needed by the debiased update and the cumulative average; the plain EMA (Flax's own rule)
    needs neither, so by default the variable layout is exactly Flax's.
    """
    needed = cfg.debias or cfg.momentum is None
    if cfg.track_updates is False and needed:
        rule = "debias=True" if cfg.debias else "momentum=None (a cumulative average)"
        raise ValueError(
            f"BatchNorm(track_updates=False, {rule}): that rule reads the number of updates so far "
            "from the stored count, which track_updates=False does not keep, so every update would act "
            "as the first. Leave track_updates unset (or True), or use the plain EMA (debias=False "
            "with a momentum)."
        )
    return cfg.track_updates if cfg.track_updates is not None else needed


def frozen(params: NormParams, use_running_average: bool | None) -> NormParams:
    """A ``frozen=True`` BatchNorm: g and b without gradient; a call that asks to update is an error.

    The layer then always normalizes with its stored statistics and never updates them, whatever
    its ``use_running_average`` attribute or field says (``model.train()`` sets that), so that a
    pretrained network's batch norms stay fixed while the rest of it trains."""
    if use_running_average is False:
        raise ValueError(
            "BatchNorm(frozen=True) was called with use_running_average=False: a frozen layer never "
            "uses batch statistics nor updates its running ones. Drop the argument (frozen layers "
            "ignore model.train() and the field), or build the layer with frozen=False to train it."
        )
    return NormParams(*(None if p is None else jax.lax.stop_gradient(p) for p in params))


PENDING = ("pending_count", "pending_shift", "pending_offset", "pending_m2")  # batch_stats names under accumulation


def accumulation_steps(cfg: Any) -> int | None:
    """A BatchNorm shell's ``accumulation_steps`` k, checked (its state holds the pending
    micro-batches' moments under ``PENDING`` and a ``phase`` vector of length k)."""
    if cfg.accumulation_steps is None:
        return None
    hint = ": the number of micro-batches per update"
    k = check_int(cfg.accumulation_steps, "BatchNorm(accumulation_steps)", 1, hint)
    if cfg.frozen:
        raise ValueError(
            f"BatchNorm(frozen=True, accumulation_steps={k}): a frozen layer never updates its statistics, "
            "so there is nothing to accumulate; drop accumulation_steps (or frozen)."
        )
    return k


def promote(cfg: Any, x: Any, params: NormParams, extra: tuple = ()) -> tuple[jax.Array, NormParams, Any]:
    """Flax's dtype rule: the output dtype is ``cfg.dtype``, or else the promotion of x's and the
    parameters' dtypes (bf16 x with float32 g, b gives float32 y, as Flax).

    Returns (x, params, output dtype). x is cast up to the output dtype when that is wider (so a
    float32 output is not a bf16 result widened), never down: the statistics always come from x as
    given, in float32. An nnx shell's ``promote_dtype`` function, when set, is called as Flax calls
    it, on ``(x, *extra, scale, bias)`` with ``dtype=cfg.dtype`` (``extra``: BatchNorm's running
    mean and var, whose promoted values are not used), and what it returns is used as is.
    """
    fn = getattr(cfg, "promote_dtype", None)
    if fn is not None:
        out = fn((x, *extra, params.scale, params.bias), dtype=cfg.dtype)
        x, params = out[0], NormParams(out[-2], out[-1])
    x = jnp.asarray(x)
    if cfg.dtype is not None:
        out_dtype = jnp.dtype(cfg.dtype)
    else:
        out_dtype = jnp.result_type(x, *(p for p in params if p is not None))
    floating = jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(out_dtype, jnp.floating)
    if fn is None and floating:
        x = x.astype(jnp.promote_types(x.dtype, out_dtype))
    return x, params, out_dtype


def batch_norm(
    cfg: Any,
    x: jax.Array,
    params: NormParams,
    stats: Any,
    training: bool,
    mask: Any,
    initializing: bool = False,
    renorm: tuple[Any, Any] | None = None,
) -> tuple[jax.Array, Any]:
    """``initializing``: variables are being created, usually outside the transform that binds
    ``axis_name``. As Flax, nothing is reduced across devices and nothing is stored then; in
    training mode x is normalized by its own (local) batch statistics, as it will be in training,
    unless each statistic would cover a single element (e.g. one example of a dense layer at
    init), where the running statistics normalize instead (only the shapes matter then).
    ``cfg.mean_only``: mean-only batch norm (σ = 1; ``epsilon`` and ``fused_backward`` unused).
    ``renorm=(r_max, d_max)``: batch renormalization (``methods.batch_renorm``)."""
    x, params, out_dtype = promote(cfg, x, params, (stats.mean, stats.var))
    if initializing and training:
        feat = canonical_axes(cfg.axis, x.ndim, shape=x.shape)
        training = statistics.reduced_size(x.shape, tuple(a for a in range(x.ndim) if a not in feat)) > 1
    sync = not initializing
    common: dict[str, Any] = dict(
        training=training,
        axis=cfg.axis,
        momentum=cfg.momentum,
        axis_name=cfg.axis_name if sync else None,
        axis_index_groups=cfg.axis_index_groups if sync else None,
        mask=mask,
        activation=cfg.activation,
        debias=cfg.debias,
        accumulation_steps=cfg.accumulation_steps,
    )
    if cfg.mean_only:
        if cfg.virtual_batch_size is not None:
            raise ValueError("BatchNorm(mean_only=True) does not take virtual_batch_size (ghost batch norm).")
        if cfg.unbiased_running_var:
            raise ValueError(
                "BatchNorm(mean_only=True) never uses the running variance, so unbiased_running_var=True "
                "has no effect there: leave it False."
            )
        y, new = methods.mean_only_batch_norm(x, params, stats, **common)
    elif renorm is not None:
        if cfg.virtual_batch_size is not None:
            raise ValueError("BatchRenorm does not take virtual_batch_size (ghost batch norm): use BatchNorm.")
        if initializing:  # only shapes matter at init, and the bounds may be tracers of the caller's
            renorm = (1.0, 0.0)
        y, new = methods.batch_renorm(
            x,
            params,
            stats,
            r_max=renorm[0],
            d_max=renorm[1],
            eps=cfg.epsilon,
            unbiased_running_var=cfg.unbiased_running_var,
            fused_backward=cfg.fused_backward,
            **common,
        )
    else:
        y, new = methods.batch_norm(
            x,
            params,
            stats,
            eps=cfg.epsilon,
            unbiased_running_var=cfg.unbiased_running_var,
            fused_backward=cfg.fused_backward,
            virtual_batch_size=None if initializing else cfg.virtual_batch_size,
            **common,
        )
    return y.astype(out_dtype), new


def _per_example(method: Any, cfg: Any, x: Any, params: NormParams, mask: Any, **specific: Any) -> jax.Array:
    """The call every per-example shell makes: Flax's dtype rule around the functional method,
    with the configuration the shells share plus the method's own keywords."""
    x, params, out_dtype = promote(cfg, x, params)
    y = method(
        x,
        params,
        mask=mask,
        eps=cfg.epsilon,
        activation=cfg.activation,
        fused_backward=cfg.fused_backward,
        axis_name=cfg.axis_name,
        axis_index_groups=cfg.axis_index_groups,
        **specific,
    )
    return y.astype(out_dtype)


def _rows(method: Any, cfg: Any, x: Any, params: NormParams, mask: Any, **specific: Any) -> jax.Array:
    """Layer and RMS norm: the row axes, the feature axes and the gain offset of the shell."""
    return _per_example(
        method,
        cfg,
        x,
        params,
        mask,
        axis=cfg.reduction_axes,
        feature_axis=cfg.feature_axes,
        scale_offset=cfg.scale_offset,
        **specific,
    )


def layer_norm(cfg: Any, x: jax.Array, params: NormParams, mask: Any = None) -> jax.Array:
    return _rows(methods.layer_norm, cfg, x, params, mask)


def num_groups(cfg: Any, channels: int) -> int:
    if cfg.group_size is not None:
        if cfg.num_groups is not None and cfg.num_groups * cfg.group_size != channels:
            raise ValueError(
                f"GroupNorm: num_groups={cfg.num_groups} and group_size={cfg.group_size} disagree for "
                f"{channels} channels; give one of them (num_groups=None with group_size)."
            )
        if channels % cfg.group_size:
            raise ValueError(f"GroupNorm: group_size={cfg.group_size} must divide the {channels} channels.")
        return channels // cfg.group_size
    if cfg.num_groups is None:
        raise ValueError("GroupNorm: give num_groups or group_size.")
    return cfg.num_groups


def _group_reduction_axes(cfg: Any, x: jax.Array) -> tuple[int, ...] | None:
    """Flax's GroupNorm ``reduction_axes`` (the axes of one statistic, the channel axis -1 among
    them) as the functional ``reduction_axes`` (the axes besides the group's channels)."""
    if cfg.reduction_axes is None:
        return None
    axes = canonical_axes(cfg.reduction_axes, x.ndim, name="GroupNorm(reduction_axes)", shape=x.shape)
    if x.ndim - 1 not in axes:
        raise ValueError(
            f"GroupNorm(reduction_axes={cfg.reduction_axes!r}) must include the channel axis (the last "
            f"axis of x {x.shape}): the statistics of a group always run over its channels. "
            f"Add -1, e.g. reduction_axes={(*axes, -1)!r}."
        )
    return tuple(a for a in axes if a != x.ndim - 1)


def group_norm(cfg: Any, x: jax.Array, params: NormParams, mask: Any = None) -> jax.Array:
    x = jnp.asarray(x)
    groups = num_groups(cfg, x.shape[-1])
    return _per_example(
        methods.group_norm, cfg, x, params, mask, num_groups=groups, reduction_axes=_group_reduction_axes(cfg, x)
    )


def instance_norm(cfg: Any, x: jax.Array, params: NormParams, mask: Any = None) -> jax.Array:
    return _per_example(methods.instance_norm, cfg, x, params, mask, axis=cfg.feature_axes)


def rms_norm(cfg: Any, x: jax.Array, params: NormParams, mask: Any = None) -> jax.Array:
    return _rows(methods.rms_norm, cfg, x, params, mask, cast_before_scale=cfg.cast_before_scale)


def dyt(cfg: Any, x: jax.Array, alpha: jax.Array, params: NormParams) -> jax.Array:
    """DyT with Flax's dtype rule (``promote``, α included in the promotion)."""
    x, params, out_dtype = promote(cfg, x, params, extra=(alpha,))
    return methods.dyt(x, alpha, params, axis=cfg.feature_axes, activation=cfg.activation).astype(out_dtype)


def feature_shape(x: jax.Array, axes: Any) -> tuple[int, ...]:
    x = jnp.asarray(x)
    return tuple(x.shape[a] for a in canonical_axes(axes, x.ndim, shape=x.shape))


# ---------------------------------------------------------------------------------------------
# The weight-side wrappers: what linen's and nnx's WeightNorm / SpectralNorm compute per parameter


def weight_norm_axes(feature_axes: Any, v: jax.Array, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Flax's ``feature_axes`` of one parameter as (sorted axes, the shape of its g)."""
    axes = weights._feature_axes(feature_axes, v, f"the parameter {name!r}")
    return axes, tuple(v.shape[a] for a in axes)


def weight_norm_view(v: jax.Array, g: jax.Array | None, axes: tuple[int, ...], eps: float, dtype: Any) -> jax.Array:
    """w = g·v/‖v‖ computed in the promotion of v's and g's dtypes, returned in ``dtype`` or, when
    that is None, in that promotion (Flax's dtype rule)."""
    v = jnp.asarray(v)
    work = v.dtype if g is None else jnp.promote_types(v.dtype, jnp.asarray(g).dtype)
    out = work if dtype is None else jnp.dtype(dtype)
    return weights.weight_norm(v.astype(work), g, axis=axes, eps=eps).astype(out)


def spectral_selected(cfg: Any, w: jax.Array, name: str, subject: str) -> bool:
    """Whether SpectralNorm normalizes this parameter: rank ≥ 2 and ``n_steps`` ≥ 1 (Flax's rule);
    a ≥3-D one is refused with ``error_on_non_matrix`` (Flax's message begins the error)."""
    if w.ndim <= 1 or cfg.n_steps < 1:
        return False
    if w.ndim > 2 and cfg.error_on_non_matrix:
        raise ValueError(
            f"{subject} is {w.ndim}D but error_on_non_matrix is True: the parameter {name!r} has shape "
            f"{w.shape}; pass error_on_non_matrix=False to normalize it as the matrix "
            f"(-1, {w.shape[-1]}), or keep it out with variable_filter."
        )
    return True


def spectral_view(
    cfg: Any, w: jax.Array, u: jax.Array, name: str, where: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One SpectralNorm call on one parameter, in Flax's order: ``n_steps`` power iterations from
    the stored u of shape (1, out), σ from the last step's v (``sigma_from="v"``), a zero weight
    setting u to 0 (``keep_u=False``). Returns (w/σ in ``cfg.dtype`` or the promotion of w's and
    u's dtypes, the new u (1, out) and σ, both in u's dtype)."""
    w, u = jnp.asarray(w), jnp.asarray(u)
    out = w.shape[cfg.feature_axis]
    if u.shape != (1, out):
        raise ValueError(
            f"SpectralNorm: the stored {where} has shape {u.shape} but the parameter {name!r} {w.shape} "
            f"needs (1, {out}): the state belongs to another layer."
        )
    w_sn, new_u, sigma = weights.spectral_norm(
        w.astype(jnp.promote_types(w.dtype, u.dtype)),
        u.reshape(out),
        n_steps=cfg.n_steps,
        axis=cfg.feature_axis,
        eps=cfg.epsilon,
        training=True,
        sigma_from="v",
        return_sigma=True,
        keep_u=False,
    )
    dtype = cfg.dtype if cfg.dtype is not None else jnp.result_type(w, u)
    return w_sn.astype(dtype), new_u.reshape(1, out).astype(u.dtype), sigma.astype(u.dtype)


def conditional_shape(x: Any, cond: Any, axis: Any, owner: str) -> tuple[tuple[int, ...], int]:
    """The per-example parameter shape for a condition ``cond`` (N, D) and x with the batch on
    axis 0 and one feature axis: N on axis 0, the features on ``axis``, 1 elsewhere; and the
    number of features."""
    shape_x, shape_c = jnp.shape(x), jnp.shape(cond)
    feat = canonical_axes(axis, len(shape_x), name=f"{owner}(axis)", shape=shape_x)
    if len(feat) != 1 or feat[0] == 0:
        raise ValueError(f"{owner}: axis={axis!r} must be one feature axis other than the batch axis 0 of x {shape_x}.")
    if len(shape_c) != 2 or (shape_x and shape_c[0] != shape_x[0]):
        raise ValueError(
            f"{owner}: cond has shape {shape_c} but must be (N, D) with N = {shape_x[0] if shape_x else '?'}, "
            f"the batch size of x {shape_x}: one condition vector per example."
        )
    shape = [1] * len(shape_x)
    shape[0], shape[feat[0]] = shape_x[0], shape_x[feat[0]]
    return tuple(shape), shape_x[feat[0]]


def ada_ln_zero(
    cfg: Any, x: Any, modulation: jax.Array, shape: tuple[int, ...], inner: Any, *args: Any, **kw: Any
) -> Any:
    """x + gate·inner(layer_norm(x)·(1 + scale) + shift), (shift, scale, gate) = split(modulation, 3)."""
    shift, scale, gate = (m.reshape(shape) for m in jnp.split(modulation, 3, axis=-1))
    h = methods.layer_norm(x, NormParams(scale, shift), eps=cfg.epsilon, scale_offset=1.0)
    return x + gate * inner(h, *args, **kw)


# ---------------------------------------------------------------------------------------------
# Precise (population) batch statistics


PRECISE = "precise_batch_stats"  # the linen collection a capturing BatchNorm sows its input moments into


def input_moments(cfg: Any, x: Any, mask: Any) -> statistics.Moments:
    """The moments (count, shift, offset, M₂) of a BatchNorm's input over its batch axes, per
    feature (flattened to the feature shape): the part of one batch in the population statistics.
    Global over sharded arrays under ``jit`` (XLA reduces across shards)."""
    x = jnp.asarray(x)
    feat = canonical_axes(cfg.axis, x.ndim, shape=x.shape)
    shape = tuple(x.shape[a] for a in feat)
    m = statistics.local_moments(
        jax.lax.stop_gradient(x), tuple(a for a in range(x.ndim) if a not in feat), check_mask(mask, x)
    )
    return statistics.Moments(*(v.reshape(shape) for v in m))


def progress(iterable: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc)
