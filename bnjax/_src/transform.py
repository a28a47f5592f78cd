"""The core of every method: h = f(g · (x − μ)/√(σ² + ε) + b). No parameters, no state, no Flax."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from bnjax._src import backend, collective, statistics
from bnjax._src.lazy import lazily
from bnjax._src.statistics import Moments, Scaled, compute_dtype
from bnjax._src.validation import check_eps, check_floating

Activation = Callable[[jax.Array], jax.Array]


def _aligned(value: ArrayLike | None, x: jax.Array, name: str) -> jax.Array | None:
    """Right-aligns ``value`` against x (NumPy's rule), explicitly, with a clear error.

    Done here so callers under ``jax_numpy_rank_promotion="raise"`` may pass (C,) statistics for
    (..., C) data, and so a mismatch names the argument instead of failing deep inside XLA.
    """
    if value is None:
        return None
    value = jnp.asarray(value)
    if value.ndim > x.ndim or any(
        v not in (1, s) for v, s in zip(value.shape[::-1], x.shape[::-1][: value.ndim], strict=True)
    ):
        raise ValueError(
            f"{name} has shape {value.shape}, which does not broadcast against x's shape {x.shape} "
            f"(NumPy rule, aligned on the right): give {name} x's rank with size 1 on the reduced "
            "axes, e.g. moments(..., keepdims=True), or shape (C,) for channels-last data."
        )
    return value.reshape((1,) * (x.ndim - value.ndim) + value.shape)


def apply_normalization(
    x: jax.Array,
    mean: jax.Array | tuple[jax.Array, jax.Array] | None,
    var: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    eps,
    activation: Activation | None,
    *,
    rows: bool = False,
    x_scale: jax.Array | None = None,
) -> jax.Array:
    """The transform on pre-validated, broadcast-ready operands (used by every method).

    Written as (x − μ)·(g/σ) + b rather than x·a + (b − μ·a): the folded form cancels
    catastrophically when |μ| ≫ σ, while x − μ is exact for nearby values and makes a constant
    feature give exactly b. ``var=None`` means σ = 1 (mean-only batch norm; ``eps`` unused).
    ``rows``: ``mean`` = (K, δ) comes from the statistics' rows method, which fixes how x − μ is
    spelled (for XLA's fusion only; both spellings are at the float32 floor). ``x_scale``: the
    statistics are those of x·s (``statistics.Scaled``), and so is the transform, which is
    invariant under x → x·s, ε → ε·s².
    """
    dtype = compute_dtype(x.dtype)
    eps = jnp.asarray(eps, dtype)
    if x_scale is not None:
        eps = eps * (x_scale * x_scale)
    inv = None if var is None else lax.rsqrt(var.astype(dtype) + eps)
    if scale is not None:
        inv = scale.astype(dtype) if inv is None else inv * scale.astype(dtype)
    xc = x.astype(dtype)
    if x_scale is not None:
        xc = xc * x_scale
    if isinstance(mean, tuple):  # (K, δ): μ = K + δ unrounded; x − μ at the float32 floor
        shift, offset = mean[0].astype(dtype), mean[1].astype(dtype)
        if rows:
            # rows: (x − K) − δ, the statistics' own d = x − K, so that XLA computes pass 2 and
            # the output in one loop over each row (see statistics, "Rows")
            xc = (xc - shift) - offset
        else:
            # columns: (x − c) − r with c = fl(K + δ), r = (K − c) + δ (exact): x − c is exact
            # for x near c. Not (x − K) − δ: that is the statistics' first pass, and XLA would
            # merge the two and write the shared x − K out to memory (see statistics, "Columns").
            center, rounding = statistics.rounded_mean(shift, offset)
            xc = (xc - center) - rounding
    elif mean is not None:
        xc = xc - mean.astype(dtype)
    y = xc if inv is None else xc * inv
    if bias is not None:
        y = y + bias.astype(dtype)
    if activation is not None:
        y = activation(y)
    return y.astype(x.dtype)


def normalize(
    x: ArrayLike,
    mean: ArrayLike | None,
    var: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    activation: Activation | None = None,
) -> jax.Array:
    """The general transform that every bnjax method is an instance of.

    Math:

        h = f( g · (x − μ) / √(σ² + ε) + b )

    computed in float32 (or wider) for low-precision x, returned in x's dtype.

    Args:
      x: floating array, any shape.
      mean: μ, broadcastable against x (NumPy rule, right-aligned), or ``None`` for μ = 0
        (RMS norm, weight norm).
      var: σ², broadcastable against x.
      scale: g, broadcastable against x, or ``None`` for g = 1.
      bias: b, broadcastable against x, or ``None`` for b = 0.
      eps: ε > 0, added to σ² inside the square root.
      activation: optional f, applied in float32 before the cast back to x's dtype.

    Returns:
      h, same shape and dtype as x.

    Example:
      >>> import jax.numpy as jnp, bnjax
      >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
      >>> mean, var = bnjax.moments(x, axis=0)
      >>> bnjax.normalize(x, mean, var, eps=1e-12)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)

    References:
      Ioffe & Szegedy 2015, "Batch Normalization", Algorithm 1.
    """
    x = check_floating(x)
    check_eps(eps)
    if var is None:
        raise TypeError("var is required (σ²); for RMS-style scaling pass mean=None and var=mean(x²).")
    with jax.named_scope("bnjax.normalize"):
        return apply_normalization(
            x,
            _aligned(mean, x, "mean"),
            jnp.asarray(_aligned(var, x, "var")),
            _aligned(scale, x, "scale"),
            _aligned(bias, x, "bias"),
            eps,
            activation,
        )


# ---------------------------------------------------------------------------------------------
# The core with statistics of x itself, and its closed-form backward pass


def normalize_with_statistics(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    axes: tuple[int, ...],
    eps,
    *,
    mask: jax.Array | None = None,
    axis_name=None,
    axis_index_groups=None,
    center: bool = True,
    fused: bool = True,
) -> tuple[jax.Array, Moments]:
    """(y, moments): y = g·(x − μ)/√(σ² + ε) + b with μ, σ² over ``axes`` of x itself.

    Operands are pre-validated and broadcast-ready (x's rank). μ, σ² are the stable statistics
    of ``statistics.global_moments`` (``center=False``: μ = 0, σ² = E[x²], RMS norm); the
    returned moments (keepdims) are for the running statistics and carry no gradient. ``eps``
    is an operand like any other: it may be traced (a schedule, ``vmap`` over ε) and has a
    gradient.

    Masked-out positions (``mask`` False) are padding: their outputs are computed, with the
    statistics of the valid elements, but are constants for differentiation. No gradient flows
    from them to anything (not to g, b, the statistics, nor their own x, whose gradient is 0),
    so their values, NaN and inf included, cannot reach any gradient; with a loss over the valid
    outputs only, which is what a mask is for, this is the exact gradient.

    The backward pass is written in closed form (Ioffe & Szegedy 2015, §3) instead of being
    derived by autodiff: with x̂ = (x − μ)/σ, dz = g·dy, m the mask, n the (global) count,

        dx = (m/σ) · (dz − (Σdz + x̂·Σ dz·x̂)/n),   dg = Σ dy·x̂,   db = Σ dy,   dε = −½ Σ dz·x̂/σ²

    (the Σdz term drops for ``center=False``), every Σ over the valid elements of ``axes`` and,
    with ``axis_name``, over every participant: one all-reduce of both sums together. dg, db and
    dε are this participant's shares (summed over the axes g does not vary over), as autodiff
    gives. The residuals are x itself (in its own dtype), μ and 1/σ: x̂ is recomputed, not
    stored; for rows (``statistics.uses_rows``: layer and RMS norm over 4096 rows or more) only
    x, and the backward pass recomputes μ and 1/σ too, which lets XLA keep each pass in one loop
    per row. Second order (``jax.hessian``: forward over reverse; reverse over reverse)
    differentiates the backward rule; forward mode first (``jax.jvp``, ``jax.jacfwd``) is not
    available through a custom VJP (a clear error says so), so ``fused=False`` computes the same
    forward pass and leaves the derivatives to autodiff. A closed-form custom JVP instead, from
    which JAX would derive reverse mode by transposition, was measured and rejected: on layer norm
    of (8192, 1024) on CPU its training step took 1.65× (float32) to 1.9× (bfloat16) the time of
    this custom VJP and 4× (128 against 32 MiB) to 2.7× the XLA temporary memory, since JAX keeps
    x̂ in float32 as a residual where this rule keeps x.
    """
    eps = jnp.asarray(eps, compute_dtype(x.dtype))
    groups = collective.static_groups(axis_index_groups)
    names = None if axis_name is None else (axis_name if isinstance(axis_name, str) else tuple(axis_name))
    if names is not None and not collective.is_manual(names):
        # a vmap axis (not a shard_map/pmap one): JAX traces a custom VJP's backward rule outside
        # vmap's named axes, where the backward all-reduce cannot be written; autodiff can
        fused = False
    if not fused:
        return _forward(x, scale, bias, mask, eps, axes, names, groups, center, autodiff=True)[0]
    # under shard_map(check_vma=True) a custom VJP returns each cotangent with its primal's type;
    # the cotangents of replicated operands are this participant's shares (varying), so the
    # operands enter varying and JAX sums the shares when it transposes the cast
    scale, bias, eps = (None if v is None else collective.match_varying(v, x) for v in (scale, bias, eps))
    try:
        return _fused(x, scale, bias, mask, eps, axes, names, groups, center)
    except TypeError as e:
        if "forward-mode" not in str(e):
            raise
        raise TypeError(
            "bnjax: forward-mode differentiation (jax.jvp, jax.jacfwd) of a layer with the fused "
            "backward pass (the default) is not available: it is a custom VJP, which JAX differentiates "
            "in reverse mode first. Pass fused_backward=False to this call (same forward pass, "
            "derivatives by autodiff, every mode). jax.grad and jax.hessian (forward over reverse) "
            "work with the fused pass."
        ) from e


def _statistics(x, mask, axes, axis_name, groups, center) -> Moments:
    return statistics.global_moments(x, axes, mask, axis_name, groups, center=center)


def _output(x, m: Moments, scale, bias, eps, center, rows, mask, autodiff, s=None):
    """y from the moments (of x·s, for s not None). ``autodiff`` with a mask: two selects, so that
    no masked-out value meets a gradient: the valid branch reads 0 where x is masked out (a NaN
    there would give 0·NaN in its backward pass), and the masked-out branch carries no gradient."""
    mean = (m.shift, m.offset) if center else None

    def output(x):
        return apply_normalization(x, mean, m.var, scale, bias, eps, None, rows=rows, x_scale=s)

    if not autodiff or mask is None:
        return output(x)
    valid = output(jnp.where(mask, x, jnp.zeros((), x.dtype)))
    return jnp.where(mask, valid, lax.stop_gradient(output(x)))


def _forward(x, scale, bias, mask, eps, axes, axis_name, groups, center, autodiff=False):
    """The forward pass: ((y, moments), residuals). ``autodiff``: the output is differentiated
    by JAX, so masked-out positions are made constants here (the custom VJP's backward pass
    does the same in closed form).

    Checked for overflow (see statistics, "Range"): where the moments came out non-finite, y
    and the moments are computed again from the moments of x·s (``lazily``: only then). Under
    ``autodiff`` the moments of x·s are used from the start (one more pass over x): JAX would
    differentiate the unchecked moments too, and their non-finite partial derivatives times a
    zero cotangent make NaN. The rows method (without ``axis_name``) is checked on its output
    instead: XLA computes its statistics and y in one loop per row, which a check on the moments
    would split, so the moments mark every row beyond their range and the output shows the mark."""
    rows = statistics.uses_rows(x.shape, axes, mask)
    if rows and axis_name is None and not autodiff:
        m = _statistics(x, mask, axes, axis_name, groups, center)  # rows beyond range marked
        y = _output(x, m, scale, bias, eps, center, rows, mask, autodiff)
        overflow = _some_row_marked(y, axes)
        redo = _ScaledForward(axes, axis_name, groups, center)
        y, checked = lazily(overflow, (y, Scaled(m, jnp.ones_like(m.m2))), redo, x, scale, bias, mask, eps)
        return (y, statistics.unscaled(checked)), (x, scale, bias, mask, eps, None, None, overflow)
    if autodiff:
        checked = statistics.global_scaled_moments(x, axes, mask, axis_name, groups, center=center)
        y = _output(x, checked.moments, scale, bias, eps, center, False, mask, autodiff, checked.scale)
        return (y, statistics.unscaled(checked)), None
    m = _statistics(x, mask, axes, axis_name, groups, center)
    y = _output(x, m, scale, bias, eps, center, rows, mask, autodiff)

    overflow = statistics.overflowed(m)
    one = collective.match_varying(jnp.ones_like(m.m2), m.m2)
    redo = _ScaledForward(axes, axis_name, groups, center)
    y, checked = lazily(overflow, (y, Scaled(m, one)), redo, x, scale, bias, mask, eps)
    return (y, statistics.unscaled(checked)), (x, scale, bias, mask, eps, m, checked, overflow)


def _some_row_marked(y: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Whether the rows method marked some row of its output y (``statistics.local_moments``: a
    marked row is NaN throughout), read off the first element of each row: one element per row,
    not a pass over y. Through a barrier, so that XLA does not take the read into the row loop as
    a second output, which would split it."""
    (y,) = backend.separate(y)
    rows = math.prod(n for a, n in enumerate(y.shape) if a not in axes)
    return jnp.any(jnp.isnan(y.reshape(rows, -1)[:, 0]))


class _ScaledForward(NamedTuple):
    """The forward pass's overflow fallback: y and the moments from those of x·s (a value, for
    ``lazily``'s caches)."""

    axes: tuple[int, ...]
    axis_name: Any
    groups: Any
    center: bool

    def __call__(self, x, scale, bias, mask, eps):
        if self.axis_name is None and statistics.uses_rows(x.shape, self.axes, mask):
            checked, scaled = statistics.scaled_row_moments(x, self.axes, self.center)
            s = checked.scale
            y = _output(scaled, checked.moments, scale, bias, eps * (s * s), self.center, True, None, False)
            return y, checked
        checked = statistics.global_scaled_moments(x, self.axes, mask, self.axis_name, self.groups, center=self.center)
        y = _output(x, checked.moments, scale, bias, eps, self.center, False, mask, False, checked.scale)
        return y, checked


class _RawSum(NamedTuple):
    """Σ d·(x·s − c) for d = dy·gain (about 0 for ``center=False``; s ``None``: 1), over ``axes``:
    this participant's share."""

    axes: tuple[int, ...]
    center: bool
    dtype: Any

    def __call__(self, x, dy, gain, c, s=None):
        d = dy.astype(self.dtype) if gain is None else dy.astype(self.dtype) * gain
        xs = x.astype(self.dtype) if s is None else x.astype(self.dtype) * s
        return jnp.sum(d * (xs - c if self.center else xs), axis=self.axes, keepdims=True)


class _RawTotal(NamedTuple):
    """(this participant's, the total) of (Σd, Σ d·x·s) (about 0: RMS norm), for the fallback."""

    raw: _RawSum
    axis_name: Any
    groups: Any

    def __call__(self, x, dy, gain, sum_d, s):
        local = (sum_d, self.raw(x, dy, gain, 0, s))
        return local, _total(local, self.axis_name, self.groups)


def _total(pair, axis_name, groups):
    """The two sums over every participant, in one all-reduce."""
    return pair if axis_name is None else collective.group_sum(pair, axis_name, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _fused(x, scale, bias, mask, eps, axes, axis_name, groups, center):
    return _forward(x, scale, bias, mask, eps, axes, axis_name, groups, center)[0]


def _fused_fwd(x, scale, bias, mask, eps, axes, axis_name, groups, center):
    return _forward(x, scale, bias, mask, eps, axes, axis_name, groups, center)


# The backward pass recomputes the statistics from x, instead of saving them, for rows
# (statistics.uses_rows) without axis_name (layer norm, RMS norm): there XLA computes them and
# whatever uses them inside one loop over each row, provided that loop has a single output (on
# CPU). Saving μ and 1/σ for the backward pass would give the forward pass a second output and
# split it into passes that write x − K out to memory; this way the forward pass reads x once and
# writes y, and each backward output (dx, dg) is again one loop that recomputes the (cheap)
# statistics of its row.


def _param_cotangent(param, values):
    """Σ of ``values`` over the axes ``param`` is broadcast along, in param's shape and dtype."""
    over = tuple(a for a in range(values.ndim) if param.shape[a] == 1 and values.shape[a] != 1)
    return jnp.sum(values, axis=over, keepdims=True).reshape(param.shape).astype(param.dtype)


def _eps_cotangent(eps, inv, sum_dz_xhat):
    """dε = Σ over statistics of −½·(Σ dz·x̂)/(σ² + ε), from y = g·(x − μ)·(σ² + ε)^(−1/2) + b."""
    return (-0.5 * jnp.sum(inv * inv * sum_dz_xhat)).astype(eps.dtype)


def _row_bwd(axes, center, x, scale, bias, eps, dy, s=None):
    """The backward pass for rows, the statistics recomputed (see above); the same formulas. ``s``
    (the overflow fallback): a power of two per row (``statistics.scaled_row_moments``); the
    passes work on x·s, whose output with ε·s² is the same, so dx is s times the derivative with
    respect to x·s, and dε carries s² per row."""
    dtype = compute_dtype(x.dtype)
    eps_rows = eps if s is None else eps * (s * s)
    # Copies of x, dy and g that XLA may not identify with each other or with the forward pass's:
    # dx and dg each recompute the statistics inside their own loop. Shared, the statistics would
    # be computed once, with several outputs, and split apart; a shared float32 convert of
    # low-precision dy, or a shared broadcast of g, would be written out to memory.
    x_dx, x_dg, dy_dx, dy_dg, dy_db, scale = backend.separate(x, x, dy, dy, dy, scale)
    if s is not None:  # each pass scales its own copy (exact, in x's dtype): none is written out
        s_dx, s_dg = backend.separate(s.astype(x.dtype), s.astype(x.dtype))
        x_dx, x_dg = x_dx * s_dx, x_dg * s_dg

    def normalized(xv):  # x̂ = ((x − K) − δ)/σ, spelled as in the forward pass and statistics
        m = statistics.local_moments(xv, axes, None, center=center, marked=False)  # checked forward
        inv = lax.rsqrt(m.var + eps_rows)
        xc = xv.astype(dtype)
        return (((xc - m.shift) - m.offset) if center else xc) * inv, inv, m.count

    xhat, inv, n = normalized(x_dx)
    d = dy_dx.astype(dtype)
    if scale is not None:
        d = d * scale.astype(dtype)
    sum_d_xhat = jnp.sum(d * xhat, axis=axes, keepdims=True)
    coupled = xhat * sum_d_xhat
    if center:
        coupled = coupled + jnp.sum(d, axis=axes, keepdims=True)
    dx = inv * (d - coupled / n)
    dscale = None if scale is None else _param_cotangent(scale, dy_dg.astype(dtype) * normalized(x_dg)[0])
    dbias = None if bias is None else _param_cotangent(bias, dy_db.astype(dtype))
    if s is None:
        return dx.astype(x.dtype), dscale, dbias, None, _eps_cotangent(eps, inv, sum_d_xhat)
    # 1/σ = s·inv: s last, so that a dx in float32's normal range does not pass through a subnormal
    return (dx * s).astype(x.dtype), dscale, dbias, None, _eps_cotangent(eps, inv * s, sum_d_xhat)


def _fused_bwd(axes, axis_name, groups, center, residuals, cotangents):
    x, scale, bias, _, eps, unchecked, _, overflow = residuals
    dy = cotangents[0]  # the moments feed only stop_gradient'ed running statistics
    if unchecked is None:
        fast = _row_bwd(axes, center, x, scale, bias, eps, dy)
        return lazily(overflow, fast, _RowFallbackBwd(axes, center), x, scale, bias, eps, dy)
    return _checked_bwd(axes, axis_name, groups, center, residuals, dy)


class _RowFallbackBwd(NamedTuple):
    """The rows method's backward pass where some row of x was beyond its range: on x·s, each row
    scaled by its own power of two (1 for the rows within range), through a 2-D view of x where
    g and b allow it."""

    axes: tuple[int, ...]
    center: bool

    def __call__(self, x, scale, bias, eps, dy):
        kept = [a for a in range(x.ndim) if a not in self.axes]
        if any(p is not None and any(p.shape[a] != 1 for a in kept) for p in (scale, bias)):
            # per-example g or b: on x's own shape
            s = statistics.row_scale(x, self.axes, self.center)
            return _row_bwd(self.axes, self.center, x, scale, bias, eps, dy, s)
        # as (rows, features): XLA keeps a per-row multiply inside the row loops of 2-D data only
        reduced = tuple(1 if a in kept else n for a, n in enumerate(x.shape))
        rows = (-1, math.prod(reduced))
        flat = [None if p is None else jnp.broadcast_to(p, reduced).reshape(1, -1) for p in (scale, bias)]
        x2, dy2 = x.reshape(rows), dy.reshape(rows)
        s = statistics.row_scale(x2, (1,), self.center)
        dx, dscale, dbias, _, deps = _row_bwd((1,), self.center, x2, *flat, eps, dy2, s)
        dscale, dbias = (
            None if p is None else _param_cotangent(p, d.reshape(reduced)) for p, d in ((scale, dscale), (bias, dbias))
        )
        return dx.reshape(x.shape), dscale, dbias, None, deps


def _checked_bwd(axes, axis_name, groups, center, residuals, dy):
    x, scale, bias, mask, eps, unchecked, checked, overflow = residuals
    # The moments the forward pass used (statistics.Scaled: of x·s, s = 1 unless they overflowed):
    # x̂ = ((x·s − c) − r)·inv with inv = 1/√(σ²s² + εs²), and 1/σ = s·inv.
    m, s = checked
    inv = lax.rsqrt(m.var + eps * (s * s))
    dtype = inv.dtype
    if mask is not None:
        # masked-out positions are constants (see normalize_with_statistics): they enter no sum,
        # and x is read as 0 there so that no NaN or inf of theirs meets a multiplication
        dy = jnp.where(mask, dy, jnp.zeros((), dy.dtype))
        x = jnp.where(mask, x, jnp.zeros((), x.dtype))
    if center:
        c, r = statistics.rounded_mean(m.shift, m.offset)  # μ = c + r, as in the forward pass
        first = statistics.rounded_mean(unchecked.shift, unchecked.offset)[0]
    else:
        c = r = first = jnp.zeros((), dtype)
    # x̂ is needed up to three times (in Σ d·x̂, in dx, in dg), and so are dy, g, μ and 1/σ. Each
    # use gets copies of its own that XLA may not identify with the others or with the forward
    # pass's: XLA merges equal expressions, even equal broadcasts or converts, and then writes the
    # shared one out to memory as a full float32 tensor instead of recomputing it in each loop.
    (x_sum, c_sum), (x_out, c_out, r_out, inv_out, s_out), (x_dg, c_dg, r_dg, inv_dg, s_dg), copies = backend.separate(
        (x, first), (x, c, r, inv, s), (x, c, r, inv, s), (dy, dy, dy, dy, dy, scale)
    )
    dy_sum, dy_raw, dy_out, dy_dg, dy_db, scale_out = copies

    def normalized(xv, c, r, inv, s):  # x̂, spelled as the forward pass's output
        xv = xv.astype(dtype) * s
        return (((xv - c) - r) if center else xv) * inv

    def total(pair):
        return _total(pair, axis_name, groups)

    def sum_d_over(over, gain=None):
        d_sum = dy_sum.astype(dtype)  # each reduction converts on its own
        return jnp.sum(d_sum if gain is None else d_sum * gain, axis=over, keepdims=True)

    def centred_sums(over, gain=None):
        """(Σd, Σ d·(x·s − c)) over ``over`` for d = dy·gain: this participant's share. Σ d·(x − c)
        is taken around the mean as first computed (equal to the checked one unless the moments
        overflowed), so that this pass need not wait for the check; again with x·s if they did."""
        raw = _RawSum(over, center, dtype)
        return sum_d_over(over, gain), lazily(overflow, raw(x_sum, dy_raw, gain, c_sum), raw, x, dy, gain, c, s)

    def sums(gain=None):
        """(Σd, Σ d·(x·s − c)) for d = dy·gain, this participant's and the total; then
        Σ d·x̂ = inv·(Σ d·(x·s − c) − r·Σd)."""
        if center:
            local = centred_sums(axes, gain)
            return local, total(local)
        sum_d, raw_sum = sum_d_over(axes, gain), _RawSum(axes, center, dtype)
        # about 0 (RMS norm): Σ d·x·s = s·Σ d·x exactly, unless Σ d·x overflows. So the sum and its
        # all-reduce need not wait for the forward pass (XLA sends that all-reduce together with
        # the forward's); taken again with x·s only if the total overflowed.
        local = (sum_d, raw_sum(x_sum, dy_raw, gain, 0))
        summed = total(local)
        fast = ((local[0], local[1] * s), (summed[0], summed[1] * s))
        overflowed = jnp.logical_not(jnp.all(jnp.isfinite(summed[1])))
        return lazily(overflowed, fast, _RawTotal(raw_sum, axis_name, groups), x, dy, gain, sum_d, s)

    def finish(sum_d, raw):
        return inv * ((raw - r * sum_d) if center else raw)

    affine = [p for p in (scale, bias) if p is not None]
    inner = tuple(a for a in axes if all(p.shape[a] == 1 for p in affine))  # the axes g and b are constant along
    if inner == axes:
        # g and b constant within each statistic (batch, instance norm): Σdz = g·Σdy, so the same
        # two reductions give dx, dg and db (XLA on CPU runs each reduction as its own pass)
        (sum_d, raw), (total_d, total_raw) = sums()
        local = finish(sum_d, raw)  # Σ dy·x̂
        dscale = None if scale is None else _param_cotangent(scale, local)
        dbias = None if bias is None else _param_cotangent(bias, sum_d)
        deps = _eps_cotangent(eps, inv * s, local if scale is None else local * scale.astype(dtype))
        d = dy_out.astype(dtype)
        gain = inv_out if scale is None else inv_out * scale_out.astype(dtype)
    elif center and inner:
        # g varies within a statistic but is constant along some of its axes (group norm: along
        # the spatial axes, varying over the channels of a group). Sums over those axes first,
        # per position of the rest: P_d = Σdy and P_r = Σ dy·(x·s − c); then Σdz, Σ dz·(x·s − c),
        # dg and db are small sums of them, and the backward pass reads x and dy twice plus dx,
        # not four times (Σdz, Σ dz·x̂, dg, db each a pass over x's size)
        outer = tuple(a for a in axes if a not in inner)
        part_d, part_r = centred_sums(inner)
        gain_p = 1 if scale is None else scale.astype(dtype)
        sum_d = jnp.sum(part_d * gain_p, axis=outer, keepdims=True)
        raw = jnp.sum(part_r * gain_p, axis=outer, keepdims=True)
        total_d, total_raw = total((sum_d, raw))
        deps = _eps_cotangent(eps, inv * s, finish(sum_d, raw))
        dscale = None if scale is None else _param_cotangent(scale, inv * (part_r - r * part_d))
        dbias = None if bias is None else _param_cotangent(bias, part_d)
        d = dy_out.astype(dtype) if scale is None else dy_out.astype(dtype) * scale_out.astype(dtype)
        gain = inv_out
    else:  # g varies along every axis of a statistic (layer norm), or RMS norm: dz = g·dy
        (sum_d, raw), (total_d, total_raw) = sums(None if scale is None else scale.astype(dtype))
        deps = _eps_cotangent(eps, inv * s, finish(sum_d, raw))
        xhat_dg = normalized(x_dg, c_dg, r_dg, inv_dg, s_dg)
        dscale = None if scale is None else _param_cotangent(scale, dy_dg.astype(dtype) * xhat_dg)
        dbias = None if bias is None else _param_cotangent(bias, dy_db.astype(dtype))
        d = dy_out.astype(dtype) if scale is None else dy_out.astype(dtype) * scale_out.astype(dtype)
        gain = inv_out
    sum_d_xhat = finish(total_d, total_raw)
    coupled = normalized(x_out, c_out, r_out, inv_out, s_out) * sum_d_xhat + (total_d if center else 0)
    # 1/σ = s·inv: s last, so that a dx in float32's normal range does not pass through a subnormal
    dx = (gain * (d - coupled / jnp.maximum(m.count, 1))) * s_out
    if mask is not None:
        dx = jnp.where(mask, dx, jnp.zeros((), dtype))
    return dx.astype(x.dtype), dscale, dbias, None, deps


_fused.defvjp(_fused_fwd, _fused_bwd)
