"""What the Flax shells (linen and nnx) share: the call into the functional API.

Both shells hold their configuration under the same attribute names, so one function per method
maps a shell's configuration and variables to the functional call. The shells themselves only
declare variables; there is no normalization math outside bnjax's functional core.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bnjax._src import methods
from bnjax._src.params import NormParams
from bnjax._src.running import BatchStats
from bnjax._src.validation import canonical_axes


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


def _out(cfg: Any, y: jax.Array) -> jax.Array:
    return y if cfg.dtype is None else y.astype(cfg.dtype)


def batch_norm(
    cfg: Any, x: jax.Array, params: NormParams, stats: BatchStats, training: bool, mask: Any, initializing: bool = False
) -> tuple[jax.Array, BatchStats]:
    """``initializing``: variables are being created, usually outside the transform that binds
    ``axis_name`` and with a per-device batch that may hold one example; like Flax, nothing is
    reduced across devices or updated then, so the running statistics normalize (shapes only).
    ``cfg.mean_only``: mean-only batch norm (σ = 1; ``epsilon`` and ``fused_backward`` unused)."""
    common: dict[str, Any] = dict(
        training=training and not initializing,
        axis=cfg.axis,
        momentum=cfg.momentum,
        axis_name=cfg.axis_name,
        axis_index_groups=cfg.axis_index_groups,
        mask=mask,
        activation=cfg.activation,
        debias=cfg.debias,
    )
    if cfg.mean_only:
        if cfg.unbiased_running_var:
            raise ValueError(
                "BatchNorm(mean_only=True) never uses the running variance, so unbiased_running_var=True "
                "has no effect there: leave it False."
            )
        y, new = methods.mean_only_batch_norm(x, params, stats, **common)
    else:
        y, new = methods.batch_norm(
            x,
            params,
            stats,
            eps=cfg.epsilon,
            unbiased_running_var=cfg.unbiased_running_var,
            fused_backward=cfg.fused_backward,
            **common,
        )
    return _out(cfg, y), new


def layer_norm(cfg: Any, x: jax.Array, params: NormParams, mask: Any = None) -> jax.Array:
    y = methods.layer_norm(
        x,
        params,
        mask=mask,
        axis=cfg.reduction_axes,
        feature_axis=cfg.feature_axes,
        eps=cfg.epsilon,
        activation=cfg.activation,
        fused_backward=cfg.fused_backward,
    )
    return _out(cfg, y)


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


def group_norm(cfg: Any, x: jax.Array, params: NormParams, mask: Any = None) -> jax.Array:
    g = num_groups(cfg, x.shape[-1])
    return _out(
        cfg,
        methods.group_norm(
            x,
            params,
            num_groups=g,
            eps=cfg.epsilon,
            activation=cfg.activation,
            mask=mask,
            fused_backward=cfg.fused_backward,
        ),
    )


def instance_norm(cfg: Any, x: jax.Array, params: NormParams, mask: Any = None) -> jax.Array:
    return _out(
        cfg,
        methods.instance_norm(
            x, params, eps=cfg.epsilon, activation=cfg.activation, mask=mask, fused_backward=cfg.fused_backward
        ),
    )


def rms_norm(cfg: Any, x: jax.Array, params: NormParams, mask: Any = None) -> jax.Array:
    return _out(
        cfg,
        methods.rms_norm(
            x,
            params,
            mask=mask,
            axis=cfg.reduction_axes,
            eps=cfg.epsilon,
            activation=cfg.activation,
            fused_backward=cfg.fused_backward,
        ),
    )


def feature_shape(x: jax.Array, axes: Any) -> tuple[int, ...]:
    x = jnp.asarray(x)
    return tuple(x.shape[a] for a in canonical_axes(axes, x.ndim, shape=x.shape))
