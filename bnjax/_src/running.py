"""Running statistics: explicit state in, explicit state out.

Update rule (per feature, the Keras/Flax convention: ``momentum`` is the weight of the OLD value):

    new = decay · old + (1 − decay) · batch,   decay = min(momentum, n/(n + 1))   (debias=True)
                                               decay = momentum                   (debias=False)
                                               decay = n/(n + 1)                  (momentum=None)

where n is the number of updates this feature has received so far. With ``debias=True`` the
first update stores the batch statistics themselves and the early ones are an exact average of
the batches seen, so the stored mean/var are always directly usable; afterwards it is the plain
EMA. ``debias=False`` is the plain EMA of Flax and PyTorch, starting from mean 0, var 1.

Non-finite policy: if a feature's batch mean or variance is NaN or ±inf, or its updated running
values would be (or the variance negative), that feature's running values are left unchanged and
its ``skipped`` counter is incremented, so one bad batch can never poison the statistics and
``stats.skipped`` tells the user it happened. A traced ``momentum`` outside [0, 1) (which cannot
be rejected at trace time) is applied to no feature and counts as skipped for all of them. A batch
with no valid element at all (everything masked, or an empty batch) leaves the whole state
unchanged. Without ``skipped`` (``BatchStats(mean, var, count)``), the debiased and cumulative
rules, which read the decay off ``count``, apply a batch to all features or (if any feature's
update is bad) to none, and count only the batches applied.
"""

from __future__ import annotations

from typing import Any, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax._src.statistics import Moments, empty_moments, pool
from bnjax._src.validation import check_int, features_arg, stats_dtype_ok


class BatchStats(NamedTuple):
    """Running statistics of a batch-norm layer.

    Attributes:
      mean: running mean, shape ``(features,)``, float32 (or wider).
      var: running variance, same shape; the population (biased) one unless the layer was
        updated with ``unbiased_running_var=True`` (PyTorch's convention).
      count: number of training updates applied, an int32 scalar.
      skipped: per-feature int32 count of updates in which that feature's batch statistic was
        non-finite (or it had no valid element) and was therefore not applied; ``None`` if not
        tracked. ``count - skipped`` is the number of updates each feature actually received.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array  # type: ignore[assignment]  # the API's name; shadows tuple.count
    skipped: jax.Array | None = None


class AccumulatingStats(NamedTuple):
    """Running statistics under gradient accumulation (``init_stats(C, accumulation_steps=k)``).

    Attributes:
      stats: the ``BatchStats`` (updated once per k training calls).
      pending: the pooled moments (count, shift, offset, M₂ per feature) of the micro-batches seen
        since the last update.
      phase: an int32 vector of length k whose first entries are 1 for the micro-batches already
        pooled (its length is k, so a mismatch with a call's ``accumulation_steps`` is caught at
        trace time).

    ``mean``, ``var`` and ``skipped`` read those of ``stats`` (``stats.count`` is the number of
    running updates applied).
    """

    stats: BatchStats
    pending: Moments
    phase: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.stats.mean

    @property
    def var(self) -> jax.Array:
        return self.stats.var

    @property
    def skipped(self) -> jax.Array | None:
        return self.stats.skipped


@overload
def init_stats(features: int | tuple[int, ...], *, dtype: Any = ..., accumulation_steps: None = None) -> BatchStats: ...


@overload
def init_stats(features: int | tuple[int, ...], *, dtype: Any = ..., accumulation_steps: int) -> AccumulatingStats: ...


def init_stats(
    features: int | tuple[int, ...], *, dtype: Any = jnp.float32, accumulation_steps: int | None = None
) -> BatchStats | AccumulatingStats:
    """Fresh running statistics: mean 0, var 1, count 0, skipped 0.

    Args:
      features: number of features (size of the channel axis), or a shape tuple.
      dtype: float32 or wider; statistics and their EMA are never kept in low precision.
      accumulation_steps: k for gradient accumulation (``batch_norm(..., accumulation_steps=k)``):
        returns an ``AccumulatingStats``, which also holds the pooled moments of the pending
        micro-batches and a phase vector of length k (fixed structure: a ``lax.scan`` carry).

    Returns:
      ``BatchStats`` with ``mean``, ``var`` and ``skipped`` of shape ``(features,)`` and an int32
      scalar ``count``.

    Example:
      >>> import bnjax
      >>> stats = bnjax.init_stats(2)
      >>> stats.mean, stats.var, stats.count
      (Array([0., 0.], dtype=float32), Array([1., 1.], dtype=float32), Array(0, dtype=int32))

    References:
      Ioffe & Szegedy 2015, "Batch Normalization", §3.1 (inference with population statistics).
    """
    if not stats_dtype_ok(dtype):
        raise TypeError(
            f"init_stats(dtype={jnp.dtype(dtype)}): running statistics must be float32 or wider; "
            "low-precision EMAs stall and lose the variance. The layer's output keeps x's dtype anyway."
        )
    shape = (features,) if isinstance(features, int) else tuple(features)
    stats = BatchStats(
        mean=jnp.zeros(shape, dtype),
        var=jnp.ones(shape, dtype),
        count=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros(shape, jnp.int32),
    )
    if accumulation_steps is None:
        return stats
    k = check_int(accumulation_steps, "accumulation_steps", 1, ": the number of micro-batches per update")
    return AccumulatingStats(stats, empty_moments(shape, dtype), jnp.zeros((k,), jnp.int32))


def check_accumulation(stats: Any, accumulation_steps: Any) -> int | None:
    """The k of a call against the state's: both absent, or equal (k is the length of stats.phase)."""
    accumulating = isinstance(stats, AccumulatingStats)
    if accumulation_steps is None:
        if accumulating:
            raise ValueError(
                f"stats were made for gradient accumulation over {jnp.shape(stats.phase)[0]} micro-batches "
                "(init_stats(..., accumulation_steps=k)) but this call has accumulation_steps=None: pass "
                "the same accumulation_steps, or use init_stats without it."
            )
        return None
    k = check_int(accumulation_steps, "accumulation_steps", 1, ": the number of micro-batches per update")
    if not accumulating:
        raise ValueError(
            f"accumulation_steps={k} needs running statistics that hold the pending micro-batches: create "
            f"them with bnjax.init_stats(C, accumulation_steps={k})."
        )
    if jnp.shape(stats.phase) != (k,):
        raise ValueError(
            f"accumulation_steps={k} does not match the state, made with accumulation_steps="
            f"{jnp.shape(stats.phase)[0]}: pass the same k as to init_stats."
        )
    return k


def accumulate(acc: AccumulatingStats, batch: Moments, k: int, **update_kwargs: Any) -> AccumulatingStats:
    """Gradient accumulation: pools ``batch`` into ``acc.pending``; every k-th call applies one
    update (``update``) with the pooled moments of the k micro-batches and clears them."""
    acc = jax.tree.map(lax.stop_gradient, acc)
    batch = jax.tree.map(lax.stop_gradient, batch)
    pending = jax.tree.map(lambda p, b: p.astype(b.dtype), acc.pending, batch)
    pooled = pool(pending, batch)
    seen = jnp.sum(acc.phase)
    done = seen + 1 >= k
    updated = update(acc.stats, pooled, **update_kwargs)
    new_stats = jax.tree.map(lambda a, b: jnp.where(done, a, b), updated, acc.stats)
    cleared = empty_moments(jnp.shape(acc.stats.mean), jnp.result_type(acc.pending.m2))
    new_pending = jax.tree.map(lambda c, p: jnp.where(done, c, p.astype(c.dtype)), cleared, pooled)
    marked = jnp.where(jnp.arange(k) == seen, 1, acc.phase).astype(acc.phase.dtype)
    return AccumulatingStats(new_stats, new_pending, jnp.where(done, jnp.zeros_like(acc.phase), marked))


def check_stats(stats: Any, feature_shape: tuple[int, ...]) -> Any:
    """Validates shapes and dtypes of ``stats`` (a ``BatchStats``, or an ``AccumulatingStats``)."""
    if isinstance(stats, AccumulatingStats):
        check_stats(stats.stats, feature_shape)
        for name, value in zip(Moments._fields, stats.pending, strict=True):
            if jnp.shape(value) != feature_shape:
                raise ValueError(
                    f"stats.pending.{name} has shape {jnp.shape(value)} but x's features have shape "
                    f"{feature_shape}: create the statistics with init_stats(C, accumulation_steps=k)."
                )
        if jnp.ndim(stats.phase) != 1:
            raise ValueError(
                f"stats.phase must be a vector of length accumulation_steps, got {jnp.shape(stats.phase)}."
            )
        return stats
    if not isinstance(stats, BatchStats):
        raise TypeError(
            f"stats must be a bnjax.BatchStats, got {type(stats).__name__}; create it with "
            f"bnjax.init_stats({features_arg(feature_shape)})."
        )
    fix = (
        f"create matching stats with bnjax.init_stats({features_arg(feature_shape)}), "
        "or pass the axis argument that selects the features these stats were made for."
    )
    for name in ("mean", "var", "count") + (("skipped",) if stats.skipped is not None else ()):
        value = getattr(stats, name)
        if not isinstance(value, (jax.Array, np.ndarray, np.generic)) and not (
            name == "count" and isinstance(value, int)
        ):
            raise TypeError(
                f"stats.{name} must be an array (jax or NumPy), got {type(value).__name__}: "
                f"create the statistics with bnjax.init_stats({features_arg(feature_shape)})."
            )
    for name in ("mean", "var") + (("skipped",) if stats.skipped is not None else ()):
        got = jnp.shape(getattr(stats, name))
        if got != feature_shape:
            raise ValueError(f"stats.{name} has shape {got} but x's features have shape {feature_shape}: {fix}")
    for name in ("mean", "var"):
        dtype = jnp.result_type(getattr(stats, name))
        if not stats_dtype_ok(dtype):
            raise TypeError(
                f"stats.{name} has dtype {dtype}: running statistics must be float32 or wider; "
                "create them with bnjax.init_stats (float32 by default)."
            )
    if jnp.shape(stats.count) != ():
        raise ValueError(f"stats.count must be a scalar, got shape {jnp.shape(stats.count)}.")
    return stats


def update(
    stats: BatchStats,
    batch: Moments,
    *,
    momentum: float | None,
    debias: bool = True,
    unbiased_running_var: bool = False,
) -> BatchStats:
    """Applies one update from batch moments (feature-shaped) to ``stats``; see the module docstring.

    Returns state of exactly the structure, shapes and dtypes of ``stats``, with stopped gradients.
    """
    stats = jax.tree.map(lax.stop_gradient, stats)
    batch = jax.tree.map(lax.stop_gradient, batch)
    n_batch, batch_mean, m2 = batch.count, batch.mean, batch.m2
    dtype = jnp.result_type(stats.mean)
    batch_var = m2 / jnp.maximum(n_batch, 1)
    if unbiased_running_var:
        # PyTorch stores M₂/(n − 1); undefined for n ≤ 1, which the non-finite policy then skips.
        batch_var = jnp.where(n_batch > 1, m2 / jnp.maximum(n_batch - 1, 1), jnp.inf)
    any_valid = jnp.any(n_batch > 0)
    apply = (n_batch > 0) & jnp.isfinite(batch_mean) & jnp.isfinite(batch_var)
    if momentum is not None and isinstance(momentum, jax.core.Tracer):
        # a traced momentum is checked here, at run time: outside [0, 1) nothing is applied
        apply = apply & (momentum >= 0) & (momentum < 1)

    if momentum is None or debias:
        seen = stats.count if stats.skipped is None else stats.count - stats.skipped
        seen = seen.astype(dtype)
        decay = seen / (seen + 1)
        if momentum is not None:
            decay = jnp.minimum(jnp.asarray(momentum, dtype), decay)
        mean = decay * stats.mean + (1 - decay) * batch_mean.astype(dtype)
        var = decay * stats.var + (1 - decay) * batch_var.astype(dtype)
    else:
        # The exact expression of Flax and PyTorch, for bit-level parity of the EMA itself.
        mean = momentum * stats.mean + (1 - momentum) * batch_mean.astype(dtype)
        var = momentum * stats.var + (1 - momentum) * batch_var.astype(dtype)
    # Whatever the inputs, the stored statistics stay finite and the variance non-negative.
    apply = apply & jnp.isfinite(mean) & jnp.isfinite(var) & (var >= 0)
    if stats.skipped is None and (momentum is None or debias):
        # The decay is read off the count, and without a per-feature record of skipped updates one
        # count must hold for every feature: a batch that cannot be applied to every feature is
        # applied to none, and not counted (the debiased start survives a bad batch).
        apply = jnp.broadcast_to(jnp.all(apply), apply.shape)
        any_valid = any_valid & jnp.all(apply)

    new_mean = jnp.where(apply & any_valid, mean, stats.mean).astype(jnp.result_type(stats.mean))
    new_var = jnp.where(apply & any_valid, var, stats.var).astype(jnp.result_type(stats.var))
    count_dtype = jnp.result_type(stats.count)
    new_count = (stats.count + any_valid.astype(count_dtype)).astype(count_dtype)
    new_skipped = None
    if stats.skipped is not None:
        skipped_dtype = jnp.result_type(stats.skipped)
        new_skipped = (stats.skipped + (any_valid & ~apply).astype(skipped_dtype)).astype(skipped_dtype)
    return BatchStats(new_mean, new_var, new_count, new_skipped)
