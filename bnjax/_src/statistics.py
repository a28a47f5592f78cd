"""μ and σ²: the statistics every data-side method uses.

Two numerically equivalent methods, both two-pass, each with a shift K so that pass 2 has no
cancellation. Which one runs depends only on the shapes, because XLA compiles the two cases so
differently (on CPU, at least): many row reductions run inside one loop over each row, while a
column reduction (or a row reduction over few rows) is one pass over memory per ``reduce``.

Rows (the reduced axes are x's trailing axes, there is no mask, and there are enough rows: layer
norm; see ``uses_rows``). K is the plain mean, clamped into [min x, max x]:

    pass 1:  K = clamp(Σx/n, min x, max x)
    pass 2:  d = x − K,  δ = Σd/n,  μ = K + δ,  M₂ = Σd² − δ·Σd,  σ² = M₂/n

(the corrected two-pass of Chan, Golub & LeVeque 1983). K differs from μ only by the rounding of
Σx/n, so x − K is of order σ, δ is tiny and M₂ loses nothing to the correction δ·Σd. Pass 1
reads x alone and pass 2 needs only pass 1's K, so XLA fuses both passes, and the normalized
output, into one loop that reads each row once; x − μ is applied as (x − K) − δ, the very d of
pass 2. The clamp makes K = x exactly for a constant row (d = 0, σ² = 0, output exactly b) and
keeps K finite when Σx overflows.

Columns (every other layout, masks, and few rows: batch, instance, group norm). K is one valid
element of x (the first along the reduced axes); then

    pass 1:  δ = Σ(x − K)/n,                 μ = K + δ
    pass 2:  c = fl(K + δ),  r = (K − c) + δ,  M₂ = Σ(x − c)² − n·r²,   σ² = M₂/n,

with x − μ applied as (x − c) − r (see ``rounded_mean``). K lies within a few σ of μ, so x − K is
of order σ whatever |μ| is, δ keeps float32 accuracy, x − c is exact for x near c, and r (|r| ≤
ulp(μ)/2, exact) removes the rounding: M₂ has no cancellation at all. A constant feature gives
x − K = 0, hence μ = K exactly, σ² = 0. Each pass reads x once; the two passes use different shifts
(K, c) so that XLA does not write a shared x − K (or a shared broadcast) out to memory, and here
pass 1 takes one reduction, not three (XLA runs each column reduction as a pass of its own).

Either way μ is kept as the pair (K, δ) until it is used, and E[x²] − E[x]² (which loses
log₂(μ²/σ²) bits) is never formed. Across devices each participant contributes (n, K, δ, M₂) and
the parts are merged exactly (Chan, Golub & LeVeque 1979), relative to one participant's mean to
keep the merge just as stable.

Range. In float32, M₂ overflows once the spread of a statistic passes about 2⁶³, and x − K once
|x| nears the float32 maximum, although the normalized output is of order 1.
``global_scaled_moments`` then gives the moments of x·s, s = 2^−k a power of two per statistic
that brings the spread max |x − K| below 2^L (``spread_limit``): exact, since multiplying by a
power of two commutes with rounding; the output is invariant under x → x·s, ε → ε·s² (``Scaled``).
It is the columns method with one more pass over x (for the spread), and the transform runs it
only where the moments above came out non-finite. The rows method cannot test its moments
without splitting its loop: it marks each row beyond ``row_limit`` with NaN moments instead
(``local_moments``), and ``scaled_row_moments`` computes those rows again from x·s, a power of
two per row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._src import backend, collective
from bnjax._src.lazy import lazily
from bnjax._src.validation import Axes, canonical_axes, check_floating, check_mask


class Moments(NamedTuple):
    """Sufficient statistics of a set of values: count, mean = shift + offset, M₂ = Σ(x − mean)².

    The mean is kept as an unevaluated sum of a data value (``shift``, no gradient) and a small
    ``offset``: rounding shift + offset to one float would cost ulp(|μ|)/σ of accuracy in x − μ
    and in cross-device merges, while (x − shift) − offset keeps it at the float32 floor.
    Shapes are those of x with the reduced axes kept as size 1 (broadcastable against x).
    """

    count: jax.Array  # type: ignore[assignment]  # a field, shadowing tuple.count on purpose
    shift: jax.Array
    offset: jax.Array
    m2: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.shift + self.offset

    @property
    def var(self) -> jax.Array:
        """Population variance M₂/n (0 where n = 0)."""
        return self.m2 / jnp.maximum(self.count, 1)


def rounded_mean(shift: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """μ = K + δ as (c, r): c = fl(K + δ), the mean rounded to one float, and r = (K − c) + δ its
    rounding (exact: K and c are close), so that x − μ = (x − c) − r at the float32 floor."""
    center = shift + offset
    return center, (shift - center) + offset


class Scaled(NamedTuple):
    """The moments of x·s for a power of two 0 < s ≤ 1 per statistic (``scale``, the moments'
    shape). The normalized output is invariant under x → x·s,
    ε → ε·s², so the transform and its backward pass use these moments as they are;
    ``unscaled`` gives those of x itself."""

    moments: Moments
    scale: jax.Array


def spread_limit(dtype) -> int:
    """L: a statistic whose spread max |x − K| stays below 2^L is computed unscaled. Scaled data has
    a spread below 2^L, so M₂ < N·2^(2L) stays finite for N < 2⁷² elements, across participants
    too, and the autodiff path's derivative of (σ² + ε)^(−1/2), −½·(σ² + ε)^(−3/2) ≥ 2^(−3L−1),
    stays a normal number; with L = 42 (a third of the exponent range rather than a half) it fell
    below float32's, XLA flushed it to 0 and RMS norm's dx came out up to 10 % wrong
    (L = 28 in float32, 326 in float64)."""
    return (jnp.finfo(dtype).maxexp - 44) // 3


def power_of_two_scale(half_spread: jax.Array) -> jax.Array:
    """s = 2^−k, the largest power of two ≤ 1 with 2·``half_spread``·s < 2^L (``spread_limit``), read
    off the exponent bits. ``half_spread`` ≥ 0 is half of a spread (halved so that it cannot
    overflow); inf and NaN give the smallest s (their moments are non-finite anyway)."""
    half_spread = lax.stop_gradient(half_spread)
    dtype = half_spread.dtype
    info = jnp.finfo(dtype)
    bias, mant = info.maxexp - 1, info.nmant
    itype = jnp.int32 if info.bits == 32 else jnp.int64
    bits = lax.bitcast_convert_type(half_spread, itype)
    biased = lax.shift_right_logical(bits, itype(mant)) & itype(2 * bias + 1)
    # half_spread < 2^(e + 1) for e = biased − bias, so the spread is below 2^(e + 2): k = e + 2 − L
    k = jnp.maximum(biased - itype(bias - 2 + spread_limit(dtype)), itype(0))
    return lax.bitcast_convert_type(lax.shift_left(itype(bias) - k, itype(mant)), dtype)


def unscaled(scaled: Scaled) -> Moments:
    """The moments of x from those of x·s: shift and offset / s, M₂ / s². M₂ (so σ²) is inf where it
    is beyond float range; the running statistics then skip that update."""
    m, s = scaled
    return Moments(m.count, m.shift / s, m.offset / s, m.m2 / (s * s))


def overflowed(m: Moments) -> jax.Array:
    """Whether any statistic is non-finite (a scalar): for finite x, an overflow inside the moments."""
    return jnp.logical_not(jnp.all(jnp.isfinite(m.offset) & jnp.isfinite(m.m2)))


def reduced_size(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    """The number of elements of an array of ``shape`` that each statistic over ``axes`` covers."""
    return math.prod(shape[a] for a in axes)


def compute_dtype(dtype) -> jnp.dtype:
    """Statistics are computed in float32, or wider when x is wider."""
    return jnp.promote_types(dtype, jnp.float32)


def count(x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None, dtype) -> jax.Array:
    """The number of (valid) elements of each statistic, keepdims shape, in ``dtype``."""
    shape = tuple(1 if a in axes else s for a, s in enumerate(x.shape))
    if mask is None:
        return jnp.full(shape, reduced_size(x.shape, axes), dtype)
    # counted on the mask's own shape, times the reduced axes it is constant along (size 1): not on
    # its broadcast to x, which XLA would reduce element by element (and, for a constant mask,
    # fold at compile time, taking seconds for a large x)
    repeats = math.prod(x.shape[a] for a in axes if mask.shape[a] == 1)
    return jnp.broadcast_to(jnp.sum(mask, axis=axes, keepdims=True, dtype=dtype) * repeats, shape)


def _shift(x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None) -> jax.Array:
    """One valid element of x per statistic (the first along ``axes``), keepdims shape."""
    if mask is None:
        index = tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim))
        return lax.stop_gradient(x[index])
    kept = tuple(a for a in range(x.ndim) if a not in axes)
    perm = axes + kept
    kept_shape = tuple(x.shape[a] for a in kept)
    flat_x = jnp.transpose(x, perm).reshape((-1,) + kept_shape)
    # The first True in the order of ``axes`` (0 when there is none), found on the mask's own shape:
    # along a reduced axis where the mask has size 1 it is constant, so the first True lies at 0
    # there. And as the smallest valid index (a plain min), not an argmax, which is a variadic
    # reduction. Both matter when the mask is known at compile time (built from static lengths
    # inside jit): XLA folds it, and an argmax over the mask broadcast to x took about 45 s to
    # compile for a (64, 256, 512) layer norm; the argmax over the mask alone, 0.4-1.5 s.
    flat_m = jnp.transpose(mask, perm).reshape((-1,) + tuple(mask.shape[a] for a in kept))
    size = flat_m.shape[0]
    position = lax.broadcasted_iota(jnp.int32, flat_m.shape, 0)
    found = jnp.min(jnp.where(flat_m, position, size), axis=0)  # size where there is no valid element
    coords = jnp.unravel_index(jnp.where(found < size, found, 0), tuple(mask.shape[a] for a in axes))
    strides = [math.prod(x.shape[b] for b in axes[i + 1 :]) for i in range(len(axes))]
    first = sum(c * stride for c, stride in zip(coords, strides, strict=True))
    k = jnp.take_along_axis(flat_x, jnp.broadcast_to(first, kept_shape)[None], axis=0)[0]
    keep_shape = tuple(1 if a in axes else x.shape[a] for a in range(x.ndim))
    return lax.stop_gradient(k.reshape(keep_shape))


def _column_moments(
    x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None, scale: jax.Array | None = None
) -> Moments:
    """The shifted two-pass around a data element (any axes, masks), of x·``scale`` (a power of two
    per statistic; ``None``: 1)."""
    dtype = compute_dtype(x.dtype)
    zero = jnp.zeros((), dtype)
    # Two copies of x that XLA may not identify, one per pass: each reduction is a pass of its own,
    # and a float32 convert of low-precision x (or a broadcast s) that both shared would be written
    # out to memory.
    x1, x2, s1, s2 = backend.separate(x, x, scale, scale)
    x1, x2 = x1.astype(dtype), x2.astype(dtype)
    k = _shift(x, axes, mask).astype(dtype)
    n = count(x, axes, mask, dtype)
    if mask is not None:
        # no valid element: K = 0, not x's first (masked-out, possibly NaN) element, which would
        # otherwise reach M₂ as 0·NaN through the rounding term below
        k = jnp.where(n > 0, k, zero)
    if scale is not None:
        x1, x2, k = x1 * s1, x2 * s2, k * scale
    d = x1 - k
    if mask is not None:
        d = jnp.where(mask, d, zero)
    safe_n = jnp.maximum(n, 1)  # n = 0 only when masked out: its statistics are defined as 0
    offset = jnp.sum(d, axis=axes, keepdims=True) / safe_n
    # A second pass, around c = fl(K + δ), the mean rounded to one float: x − c is exact for x near
    # c, and the rounding r = μ − c = (K − c) + δ (exact: K and c are close) is taken out again,
    # M₂ = Σ(x − c)² − n·r², so no cancellation remains. A shift of its own (c, not K) lets each
    # reduction read x on its own: XLA writes a broadcast that two reductions share out to memory.
    # backend.minus: on CPU spelled x + (−c), since the output is spelled (x − c) − r and XLA:CPU
    # would write a shared x − c out to memory.
    center, rounding = rounded_mean(k, offset)
    e = backend.minus(x2, center)
    if mask is not None:
        e = jnp.where(mask, e, zero)
    m2 = jnp.maximum(jnp.sum(e * e, axis=axes, keepdims=True) - n * rounding * rounding, 0)
    valid = n > 0
    return Moments(n, jnp.where(valid, k, zero), jnp.where(valid, offset, zero), m2)


def row_limit(dtype, size: int, center: bool) -> float:
    """T: the rows method cannot overflow in ``dtype`` on a row of ``size`` elements with max |x| ≤ T.
    T = √(F/(16n)) (``center``) or √(F/(4n)), F the largest float: then |Σx| ≤ n·T, |x − K| ≤ 2T,
    and M₂ ≤ Σ(x − K)² ≤ 4n·T² = F/4 (Σx² ≤ n·T² = F/4 about 0)."""
    return math.sqrt(float(jnp.finfo(dtype).max) / ((16 if center else 4) * max(size, 1)))


def _extremes(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(min x, max x) over ``axes`` (keepdims), taken in x's own dtype and then converted to
    ``compute_dtype`` (exact: converting is monotone), which spares low-precision x two converts
    per element in the row loop (about 10 % of a bfloat16 forward pass on CPU)."""
    dtype = compute_dtype(x.dtype)
    return jnp.min(x, axis=axes, keepdims=True).astype(dtype), jnp.max(x, axis=axes, keepdims=True).astype(dtype)


def _row_mark(low: jax.Array, high: jax.Array, limit: float) -> jax.Array:
    """Per row of extremes (``_extremes``): 0 if max |x| ≤ ``limit`` (``row_limit``), NaN beyond it
    or for non-finite x: √(T − max x)·0 + √(T + min x)·0. Spelled so that XLA keeps the row loop
    whole and cannot fold the mark away (measured, jax 0.10 on CPU): two terms, each from x's own
    max or min (for layer norm, the ones its clamp uses); a spread max x − min x costs 13 % of a
    bfloat16 layer norm, marking M₂ or 1/σ from their own sums splits the loop, and
    (max x · F/T)·0 is reassociated by XLA into max x · 0, which drops the limit."""
    return lax.stop_gradient(jnp.sqrt(limit - high) * 0 + jnp.sqrt(limit + low) * 0)


def _row_moments(x: jax.Array, axes: tuple[int, ...], marked: bool) -> Moments:
    """The corrected two-pass around the clamped plain mean (trailing axes, no mask); ``marked``:
    see ``local_moments``."""
    dtype = compute_dtype(x.dtype)
    xc = x.astype(dtype)
    size = reduced_size(x.shape, axes)
    n = jnp.full(tuple(1 if a in axes else s for a, s in enumerate(x.shape)), size, dtype)
    total = jnp.sum(xc, axis=axes, keepdims=True)
    low, high = _extremes(x, axes)
    # Pass 1: the plain mean, clamped into [min x, max x], used only as the shift K of pass 2: its
    # rounding error costs nothing there. The clamp makes K = x exactly for a constant row and keeps
    # K finite if Σx overflows. It is written with max/min, not a select: XLA on CPU does not fuse
    # a select into the row loop, and everything here (and the output) must stay in that one loop.
    k = lax.stop_gradient(jnp.minimum(jnp.maximum(total / size, low), high))
    if marked:
        k = k + _row_mark(low, high, row_limit(dtype, size, True))
    # Pass 2 (corrected two-pass): d = x − K, δ = Σd/n, M₂ = Σd² − δ·Σd. K differs from μ only by
    # the rounding error of Σx/n, so the correction δ·Σd is tiny: no cancellation to speak of.
    d = xc - k
    s1 = jnp.sum(d, axis=axes, keepdims=True)
    s2 = jnp.sum(d * d, axis=axes, keepdims=True)
    offset = s1 / size
    m2 = jnp.maximum(s2 - s1 * offset, 0)
    return Moments(n, k, offset, m2)


ROW_LOOP_MIN_ROWS = 4096


def uses_rows(x_shape: tuple[int, ...], axes: tuple[int, ...], mask: jax.Array | None) -> bool:
    """Whether ``local_moments`` takes the "rows" method: no mask, x reduced over its trailing axes
    only, as layer norm does, so that each statistic is one contiguous row, and at least
    ``ROW_LOOP_MIN_ROWS`` rows. XLA on CPU (jax 0.10) fuses a chain of row reductions and their
    consumers into one loop only from 4096 rows on (measured; Flax's layer norm splits the same way
    below it); with fewer rows every reduction is a pass of its own, and the columns method, with
    two reductions instead of five, reads x fewer times."""
    reduced = [a for a in axes if x_shape[a] != 1]
    if mask is not None or not reduced:
        return False
    kept = [a for a in range(len(x_shape)) if a not in axes]
    if any(a > min(reduced) and x_shape[a] != 1 for a in kept):
        return False
    return math.prod(x_shape[a] for a in kept) >= ROW_LOOP_MIN_ROWS


def _uncentred_moments(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None,
    scale: jax.Array | None = None,
    marked: bool = False,
) -> Moments:
    """Moments about 0 (RMS norm) of x·``scale``: mean 0 and M₂ = Σx², so that M₂/n = E[x²]; they
    merge across participants like any other moments (all shifts are 0, so the merge is a plain sum).
    ``marked`` (rows, no mask, no scale): see ``local_moments``."""
    dtype = compute_dtype(x.dtype)
    xc = x.astype(dtype)
    if scale is not None:
        xc = xc * scale
    if mask is not None:
        xc = jnp.where(mask, xc, jnp.zeros((), dtype))
    n = count(x, axes, mask, dtype)
    zero = jnp.zeros(n.shape, dtype)
    m2 = jnp.sum(xc * xc, axis=axes, keepdims=True)
    if marked:
        m2 = m2 + _row_mark(*_extremes(x, axes), row_limit(dtype, reduced_size(x.shape, axes), False))
    return Moments(n, zero, zero, m2)


def _local_scaled_moments(x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None, center: bool) -> Scaled:
    """Moments of this participant's x·s by the columns method (any layout), each statistic
    scaled by the power of two its spread max |x − K| calls for (max |x| for ``center=False``):
    one pass for the spread, two for the moments."""
    dtype = compute_dtype(x.dtype)
    (xc,) = backend.separate(x)  # a pass of its own, not merged with the moments' passes
    xc = xc.astype(dtype)
    half = jnp.abs(xc * 0.5 - _shift(x, axes, mask).astype(dtype) * 0.5) if center else jnp.abs(xc * 0.5)
    if mask is not None:
        half = jnp.where(mask, half, jnp.zeros((), dtype))
    s = power_of_two_scale(jnp.max(half, axis=axes, keepdims=True))
    return Scaled((_column_moments if center else _uncentred_moments)(x, axes, mask, s), s)


def local_moments(
    x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None = None, *, center: bool = True, marked: bool = True
) -> Moments:
    """Moments over ``axes`` of this participant's data, in ``compute_dtype(x.dtype)``.

    Two numerically equivalent methods, chosen by shape for speed (see the module docstring):
    rows (``uses_rows``) and columns (everything else). ``center=False``: moments about 0
    (μ = 0, σ² = E[x²]). An empty reduction (a reduced axis of size 0) has n = 0 and moments 0.

    The rows method marks each row beyond its range (``row_limit``): its μ (K + δ) or, about 0,
    its M₂ is NaN, never a finite wrong value (see ``_row_mark``), so that ``overflowed`` and the
    transform's check on its output see it. ``marked=False`` leaves the mark out, for callers
    that know the data is within range (the backward pass, which follows the forward's check).
    """
    dtype = compute_dtype(x.dtype)
    if reduced_size(x.shape, axes) == 0:
        zero = jnp.zeros(tuple(1 if a in axes else s for a, s in enumerate(x.shape)), dtype)
        return Moments(zero, zero, zero, zero)
    rows = uses_rows(x.shape, axes, mask)
    if not center:
        return _uncentred_moments(x, axes, mask, marked=marked and rows)
    if rows:
        return _row_moments(x, axes, marked=marked)
    return _column_moments(x, axes, mask)


def merge(parts: Moments, include: jax.Array | None = None) -> Moments:
    """Merges moments stacked along axis 0 into the moments of the union (exact, count-weighted).

    Relative to a reference part r (the one with the most elements), dᵢ = μᵢ − μ_r is formed as
    (Kᵢ − K_r) + (δᵢ − δ_r) from shifts K and offsets δ, both exact for nearby values; then
    μ = K_r + (δ_r + d̄) with d̄ = Σ nᵢdᵢ/N, and M₂ = Σ M₂ᵢ + Σ nᵢ (dᵢ − d̄)². Parts with nᵢ = 0
    contribute nothing, and so do parts left out by the boolean ``include`` (shape: parts,).
    """
    n, shift, offset, m2 = parts
    if include is not None:
        include = include.reshape(include.shape + (1,) * (n.ndim - 1))
        n = jnp.where(include, n, jnp.zeros((), n.dtype))
    zero = jnp.zeros((), shift.dtype)
    m2 = jnp.where(n > 0, m2, zero)  # a part without elements adds nothing (its M₂ is never read)
    total = jnp.sum(n, axis=0, keepdims=True)
    r = jnp.argmax(n, axis=0)[None]
    shift_r = jnp.take_along_axis(shift, r, axis=0)
    offset_r = jnp.take_along_axis(offset, r, axis=0)
    d = jnp.where(n > 0, (shift - shift_r) + (offset - offset_r), zero)
    d_bar = jnp.sum(n * d, axis=0, keepdims=True) / jnp.maximum(total, 1)
    centered = jnp.where(n > 0, d - d_bar, zero)
    m2_total = jnp.sum(m2, axis=0) + jnp.sum(n * centered * centered, axis=0)
    valid = total > 0
    return Moments(total[0], jnp.where(valid, shift_r, zero)[0], jnp.where(valid, offset_r + d_bar, zero)[0], m2_total)


def empty_moments(shape: tuple[int, ...], dtype: Any = jnp.float32) -> Moments:
    """The moments of no element (count 0), of the given per-statistic shape: the unit of ``pool``."""
    zero = jnp.zeros(shape, dtype)
    return Moments(zero, zero, zero, zero)


def pool(total: Moments | None, part: Moments) -> Moments:
    """The exact union of two sets of moments of the same shape (``merge`` of the two; ``None``:
    nothing yet, giving ``part``). Used to pool micro-batches (gradient accumulation) and batches
    (precise statistics)."""
    if total is None:
        return part
    return merge(Moments(*(jnp.stack([a, b]) for a, b in zip(total, part, strict=True))))


def merge_scaled(parts: Scaled, include: jax.Array | None = None) -> Scaled:
    """``merge`` of parts that carry scales of their own (stacked along axis 0, as the moments).

    Each part is brought to the smallest scale among the parts that count, then all of them once
    more by the power of two that the spread of their means calls for (parts can lie far apart
    although none of them is spread: participants whose data sit at +1e30 and −1e30); both exact.
    The union carries the resulting scale. ``include``: as for ``merge``."""
    m, s = parts
    n = m.count
    if include is not None:
        n = jnp.where(include.reshape(include.shape + (1,) * (n.ndim - 1)), n, jnp.zeros((), n.dtype))
    one = jnp.ones((), s.dtype)
    common = jnp.min(jnp.where(n > 0, s, one), axis=0, keepdims=True)
    t = common / s
    shift, offset = m.shift * t, m.offset * t
    r = jnp.argmax(n, axis=0)[None]
    half = (shift * 0.5 - jnp.take_along_axis(shift, r, axis=0) * 0.5) + (
        offset * 0.5 - jnp.take_along_axis(offset, r, axis=0) * 0.5
    )
    u = power_of_two_scale(jnp.max(jnp.where(n > 0, jnp.abs(half), 0 * one), axis=0, keepdims=True))
    t = t * u
    rescaled = Moments(m.count, m.shift * t, m.offset * t, m.m2 * (t * t))
    return Scaled(merge(rescaled, include), (common * u)[0])


def global_scaled_moments(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None = None,
    axis_name: collective.AxisName | None = None,
    axis_index_groups: collective.Groups | None = None,
    *,
    center: bool = True,
) -> Scaled:
    """The moments of x·s (``Scaled``; see the module docstring, "Range"), merged across
    ``axis_name`` (within this participant's group) when given: the slow path, for moments that
    overflowed. An empty reduction has n = 0, moments 0 and s = 1."""
    if reduced_size(x.shape, axes) == 0:
        m = local_moments(x, axes, mask, center=center)
        local = Scaled(m, jnp.ones_like(m.m2))
    else:
        local = _local_scaled_moments(x, axes, mask, center)
    return merge_scaled_across(local, axis_name, axis_index_groups)


def scaled_row_moments(x: jax.Array, axes: tuple[int, ...], center: bool) -> tuple[Scaled, jax.Array]:
    """The rows method on x·s, s = 2^−k a power of two per row (``power_of_two_scale``) that brings
    its spread max x − min x (max |x| for ``center=False``) below 2^L: (the moments of x·s, x·s).
    x·s is taken in x's own dtype, exact for a power of two down to the subnormal range (2^−126,
    2^−L·2^−126 of the row's spread, far below float32's resolution of it); so it needs no float32
    copy of low-precision x, and XLA computes the moments and the output of x·s in one loop per
    row again. One more pass over x, for the spread: the overflow fallback of the rows method."""
    s = row_scale(x, axes, center)
    scaled = x * s.astype(x.dtype)
    return Scaled(local_moments(scaled, axes, None, center=center, marked=False), s), scaled


def row_scale(x: jax.Array, axes: tuple[int, ...], center: bool) -> jax.Array:
    """s of ``scaled_row_moments``, in ``compute_dtype(x.dtype)``: a pass of its own over x."""
    (xc,) = backend.separate(x)
    low, high = _extremes(xc, axes)
    low, high = low * 0.5, high * 0.5
    return power_of_two_scale(high - low if center else jnp.maximum(high, -low))


def global_moments(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None = None,
    axis_name: collective.AxisName | None = None,
    axis_index_groups: collective.Groups | None = None,
    *,
    center: bool = True,
) -> Moments:
    """Local moments, merged across ``axis_name`` (within this participant's group) when given."""
    return merge_across(local_moments(x, axes, mask, center=center), axis_name, axis_index_groups)


def merge_across(
    local: Moments, axis_name: collective.AxisName | None, axis_index_groups: collective.Groups | None = None
) -> Moments:
    """Merges each participant's moments over ``axis_name`` (within its group): exact, as ``merge``."""
    gathered = _gather(list(local), axis_name, axis_index_groups)
    if gathered is None:
        return local
    parts, include = gathered
    return merge(Moments(*parts), include)


def _gather(
    fields: list[jax.Array], axis_name: collective.AxisName | None, axis_index_groups: collective.Groups | None
) -> tuple[list[jax.Array], jax.Array | None] | None:
    """Every participant's ``fields``, stacked along a new axis 0 in one collective, and which of
    them are in this participant's group (``None``: all); ``None`` without ``axis_name``."""
    if axis_name is None:
        if axis_index_groups is not None:
            raise ValueError("axis_index_groups needs axis_name: the groups index the participants of that axis.")
        return None
    stacked = collective.gather_replicated(jnp.stack(fields), axis_name)
    include = None if axis_index_groups is None else collective.my_group(axis_name, axis_index_groups)
    return [stacked[:, i] for i in range(len(fields))], include


def merge_scaled_across(
    local: Scaled, axis_name: collective.AxisName | None, axis_index_groups: collective.Groups | None = None
) -> Scaled:
    """``merge_across`` for scaled moments: one collective, which carries each participant's scale."""
    gathered = _gather([*local.moments, local.scale], axis_name, axis_index_groups)
    if gathered is None:
        return local
    parts, include = gathered
    return merge_scaled(Scaled(Moments(*parts[:4]), parts[4]), include)


@dataclasses.dataclass(frozen=True)
class _ScaledMoments:
    """``moments``' overflow fallback (a value, for ``lazily``'s caches: a frozen dataclass, which
    hashes by value like the transform's NamedTuples and, unlike them, type-checks as callable)."""

    axes: tuple[int, ...]
    axis_name: Any
    groups: Any

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> Scaled:
        if self.axis_name is None and uses_rows(x.shape, self.axes, mask):
            # rows: each row scaled by its own power of two, s = 1 (exact) for the rows in range,
            # whose moments stay those of the rows method, bit for bit
            return scaled_row_moments(x, self.axes, True)[0]
        return global_scaled_moments(x, self.axes, mask, self.axis_name, self.groups)


def moments(
    x: jax.Array,
    axis: Axes,
    *,
    mask: jax.Array | None = None,
    axis_name: collective.AxisName | None = None,
    axis_index_groups: collective.Groups | None = None,
    keepdims: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Mean and population variance of ``x`` over ``axis``, numerically stable.

    Math (per statistic, over the valid elements i):

        μ = (1/n) Σᵢ xᵢ,        σ² = (1/n) Σᵢ (xᵢ − μ)²

    computed by a two-pass method with a shift (see the module docstring): stable in float32 for |μ| ≫ σ (relative
    error of σ² at the float32 floor, ~1e-6, up to |μ|/σ = 1e5), exact for constant features, and
    in float32 for bfloat16/float16 input. With ``mask``, only elements where ``mask`` is True
    count, each statistic weighted by its own count; a statistic with no valid element is 0. With
    ``axis_name``, the statistics are over the union of the data of every participant of that
    mapped axis, count-weighted, and identical (replicated) on every participant. Beyond float32's
    range for the moments (a spread past about 1e19): where they come out non-finite, they are
    computed again from x·2^−k, a power of two per statistic (only then), so μ stays right and σ²
    is right, or inf where σ² itself is beyond the dtype (not merely M₂ = n·σ²).

    Args:
      x: floating array of any shape.
      axis: the reduced axis or axes (int or tuple).
      mask: optional boolean array of x's rank, each dimension 1 or equal to x's.
      axis_name: a mapped axis name (or a tuple of them) bound by ``pmap``, ``shard_map`` or
        ``vmap(axis_name=...)``; one collective per call.
      axis_index_groups: optional partition of the participants of ``axis_name`` (by index; for
        a tuple of names, the row-major index over them) into groups; statistics are then over
        each participant's group only. No extra collective.
      keepdims: keep the reduced axes as size 1 (broadcastable against x, e.g. for ``normalize``).

    Returns:
      ``(mean, var)``, float32 (or x's dtype if wider), of x's shape without ``axis``
      (or with size-1 axes when ``keepdims``).

    Example:
      >>> import jax.numpy as jnp, bnjax
      >>> mean, var = bnjax.moments(jnp.array([[1.0, 10.0], [3.0, 30.0]]), axis=0)
      >>> mean, var
      (Array([ 2., 20.], dtype=float32), Array([  1., 100.], dtype=float32))

    References:
      Chan, Golub & LeVeque 1979/1983, "Algorithms for computing the sample variance";
      Ioffe & Szegedy 2015, "Batch Normalization".
    """
    x = check_floating(x)
    axes = canonical_axes(axis, x.ndim, shape=x.shape)
    mask = check_mask(mask, x)
    m = global_moments(x, axes, mask, axis_name, axis_index_groups)
    redo = _ScaledMoments(axes, axis_name, collective.static_groups(axis_index_groups))
    scaled, s = lazily(overflowed(m), Scaled(m, jnp.ones_like(m.m2)), redo, x, mask)
    # σ² = (σ²s²/s)/s, not M₂/s² over n: M₂ = n·σ² may be beyond the dtype where σ² is not
    mean, var = scaled.mean / s, (scaled.var / s) / s
    if not keepdims:
        mean, var = jnp.squeeze(mean, axes), jnp.squeeze(var, axes)
    return mean, var
