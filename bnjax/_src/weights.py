"""Weight-side methods: σ (and μ) come from the weights, not from the data.

weight norm           w = g · v/‖v‖, ‖v‖ over the fan-in of each output unit (μ = 0, σ = ‖v‖)
weight standardize    ŵ = (w − μ)/√(σ² + ε), μ, σ² over the fan-in of each output unit
spectral norm         w/σ_max(W), σ_max by power iteration with explicit state u
cosine norm           cos θ = x·w / (‖x‖ ‖w‖): the pre-activation itself is normalized

Layout: the output-unit axis is ``axis`` (default -1: Flax kernels, dense (in, out) and conv
(kh, kw, in, out)); every other axis of the weight is fan-in. ``axis=0`` reads PyTorch weights
(out, in, ...).

Range: weights of any finite size give the right w. Each method computes on w·s, s = 2^−k
(``_range_scale``: one power of two per norm, 1 for weights below 2^28), which no sum of squares
or product can overflow: exact, and every method here is invariant under w → w·s, ε → ε·s². The
scale costs one pass over the weights. Cosine norm's x is not scaled (see ``cosine_norm``).

Zero-norm policy: every method is finite, with finite gradients, on all-zero weights (and, for
cosine norm, on all-zero inputs). Weight norm and cosine norm put ε inside the square root,
‖v‖_ε = √(Σv² + ε), which is smooth everywhere (no ``where``, hence no NaN-gradient trap) and
changes nothing measurable for weights of ordinary size; spectral norm returns 0 for a zero
weight and leaves its power-iteration state unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from bnjax._src import statistics
from bnjax._src.statistics import compute_dtype
from bnjax._src.transform import apply_normalization
from bnjax._src.validation import check_eps, check_floating, check_int

_HIGHEST = lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Validation


def _output_axis(axis: Any, w: jax.Array, name: str) -> int:
    """The output-unit axis of a weight, as a non-negative int, or a clear error."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(
            f"axis must be a single int, the output-unit axis of {name}, got {axis!r}: e.g. axis=-1 "
            "for Flax kernels (..., in, out) or axis=0 for PyTorch weights (out, in, ...)."
        )
    if w.ndim < 2:
        raise ValueError(
            f"{name} has shape {w.shape}: a weight needs at least 2 dimensions, its fan-in axes and "
            "its output axis, e.g. (in, out) for a dense kernel or (kh, kw, in, out) for a conv kernel."
        )
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(
            f"axis={axis!r} is out of range for {name} with {w.ndim} dimensions (shape {w.shape}): use "
            f"the output-unit axis in [{-w.ndim}, {w.ndim - 1}], e.g. axis=-1 for Flax kernels "
            "(..., in, out) or axis=0 for PyTorch weights (out, in, ...)."
        )
    return int(axis) % w.ndim


def _fan_in(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return tuple(a for a in range(len(shape)) if a != axis)


def _feature_axes(axis: Any, v: jax.Array, name: str) -> tuple[int, ...]:
    """Weight norm's feature axes as a sorted tuple of non-negative ints, or a clear error.

    ``axis`` is an int (the output-unit axis), a tuple of ints, or ``()`` / ``None`` (no feature
    axis: one norm over the whole of v).
    """
    fix = (
        "e.g. axis=-1 for Flax kernels (..., in, out), axis=0 for PyTorch weights (out, in, ...), "
        "a tuple such as axis=(0, 1) for several feature axes, or axis=None for one norm over the whole weight"
    )
    if v.ndim < 1:
        raise ValueError(f"{name} has shape (): weight_norm needs at least 1 dimension (a kernel or a bias).")
    if axis is None:
        return ()
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, (bool, np.bool_)):
        entries: tuple[Any, ...] = (axis,)
    elif isinstance(axis, (tuple, list)):
        entries = tuple(axis)
    else:
        raise TypeError(f"axis must be an int, a tuple of ints, () or None, got {axis!r}: {fix}.")
    out = []
    for a in entries:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"axis must be an int, a tuple of ints, () or None, got {axis!r}: {fix}.")
        if not -v.ndim <= a < v.ndim:
            raise ValueError(
                f"axis={axis!r} is out of range for {name} with {v.ndim} dimensions (shape {v.shape}): use "
                f"axes in [{-v.ndim}, {v.ndim - 1}], {fix}."
            )
        out.append(int(a) % v.ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis={axis!r} names the same axis of {name} (shape {v.shape}) twice.")
    return tuple(sorted(out))


def _check_feature_vector(g: Any, v: jax.Array, axes: tuple[int, ...], axis: Any) -> jax.Array:
    """g of shape ``tuple(v.shape[a] for a in axes)``, or a clear error."""
    g = check_floating(g, "g")
    expected = tuple(v.shape[a] for a in axes)
    if g.shape != expected:
        where = (
            f"the output axis {axes[0]} of the weight {v.shape} has size {v.shape[axes[0]]}"
            if len(axes) == 1
            else f"the feature axes {axes} of the weight {v.shape} have sizes {expected}"
        )
        raise ValueError(
            f"g has shape {g.shape} but {where}, so g needs shape {expected}: create it with "
            f"weight_norm_init(v, axis={axis!r})."
        )
    return g


def _check_unit_vector(value: Any, w: jax.Array, axis: int, name: str, fix: str) -> jax.Array:
    value = check_floating(value, name)
    expected = (w.shape[axis],)
    if value.shape != expected:
        raise ValueError(
            f"{name} has shape {value.shape} but the output axis {axis} of the weight {w.shape} has "
            f"size {w.shape[axis]}, so {name} needs shape {expected}: {fix}"
        )
    return value


# ---------------------------------------------------------------------------------------------
# Weight normalization


def _range_scale(a: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """s = 2^−k per slice of ``a`` (keepdims over ``axes``), in ``compute_dtype``: the largest power
    of two ≤ 1 with max |a·s| < 2^L (``statistics.spread_limit``, L = 28 in float32), so that
    Σ(a·s)² and the products of scaled operands stay finite; 1 for an empty reduction. No
    gradient (s is piecewise constant)."""
    if statistics.reduced_size(a.shape, axes) == 0:
        return jnp.ones(tuple(1 if i in axes else n for i, n in enumerate(a.shape)), compute_dtype(a.dtype))
    return statistics.row_scale(a, axes, False)


def _sum_squares(v: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(Σ (v·s)² over every axis not in ``axes`` (keepdims), s): σ² of weight norm, of v·s
    (``_range_scale``), in ``compute_dtype``."""
    reduced = tuple(a for a in range(v.ndim) if a not in axes)
    s = _range_scale(v, reduced)
    vc = v.astype(compute_dtype(v.dtype)) * s
    return jnp.sum(vc * vc, axis=reduced, keepdims=True), s


def weight_norm(
    v: ArrayLike,
    g: ArrayLike | None,
    *,
    axis: int | Sequence[int] | None = -1,
    eps: float = 1e-12,
) -> jax.Array:
    """Weight normalization: decouple each output unit's weight vector into length g and direction v.

    Math (for each output unit j, the norm over every axis of v except ``axis``):

        w_j = g_j · v_j / √(‖v_j‖² + ε)

    ``axis`` may also be a tuple of feature axes (one norm, and one g, per combination of their
    indices: g has shape ``tuple(v.shape[a] for a in sorted(axis))``), or ``()`` / ``None``: one
    norm over the whole of v, with a scalar g (Flax's ``feature_axes``). Every axis of v that is
    not a feature axis is reduced; with every axis a feature axis each element is normalized on
    its own, w = g · v/√(v² + ε).

    the core h = g·(x − μ)/√(σ² + ε) with x = v, μ = 0 and σ² = ‖v_j‖² (Flax's ``WeightNorm``
    formula; PyTorch's has ε = 0). ε keeps an all-zero unit finite: its w is 0, the gradient with
    respect to g is 0 and with respect to v is g/√ε (finite; the first update moves v off zero,
    after which w no longer depends on ‖v‖). For ‖v_j‖² ≫ ε, w_j is g_j v_j/‖v_j‖ to rounding, so
    w is invariant to v → λv (λ > 0, per unit) and the gradient with respect to v scales by 1/λ.

    Computed in float32 (or wider) for low-precision v; returned in v's dtype. Any finite v: the
    norm is taken of v·s, s a power of two per unit (1 below 2^28), so Σv² cannot overflow.

    Args:
      v: the direction, a floating array of rank ≥ 1, e.g. a kernel (in, out) or
        (kh, kw, in, out), or a bias.
      g: the per-unit length, shape ``(v.shape[axis],)`` (``tuple(v.shape[a] for a in axes)`` for
        a tuple of axes, ``()`` for ``axis=None``); ``weight_norm_init(v)`` leaves the layer
        unchanged, ``weight_norm_data_init`` gives the paper's data-dependent init. ``None``: no
        length, w = v/‖v‖ (Flax's ``use_scale=False``).
      axis: the output-unit axis of v (-1 for Flax kernels, 0 for PyTorch's (out, in, ...)), a
        tuple of feature axes, or ``()`` / ``None`` for one norm over all of v.
      eps: ε > 0 added to ‖v_j‖² (default 1e-12, as Flax's ``WeightNorm``).

    Returns:
      w, v's shape and dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from bnjax import weight_norm
      >>> v = jnp.array([[3.0, 0.0], [4.0, 0.0]])  # (in=2, out=2); the second unit is all zero
      >>> weight_norm(v, jnp.array([2.0, 5.0]))
      Array([[1.2, 0. ],
             [1.6, 0. ]], dtype=float32)
      >>> weight_norm(v, jnp.array(10.0), axis=None)  # one norm over the whole kernel: ‖v‖ = 5
      Array([[6., 0.],
             [8., 0.]], dtype=float32)

    References:
      Salimans & Kingma 2016, "Weight Normalization: A Simple Reparameterization to Accelerate
      Training of Deep Neural Networks", eq. 2.
    """
    v = check_floating(v, "v")
    axes = _feature_axes(axis, v, "v")
    scale = None if g is None else _check_feature_vector(g, v, axes, axis)
    check_eps(eps)
    with jax.named_scope("bnjax.weight_norm"):
        shape = tuple(s if a in axes else 1 for a, s in enumerate(v.shape))
        scale = None if scale is None else scale.reshape(shape)
        sum_squares, s = _sum_squares(v, axes)
        return apply_normalization(v, None, sum_squares, scale, None, eps, None, x_scale=s)


def weight_norm_init(v: ArrayLike, *, axis: int | Sequence[int] | None = -1, eps: float = 1e-12) -> jax.Array:
    """The g that makes ``weight_norm(v, g)`` equal to v: g_j = √(‖v_j‖² + ε) ≈ ‖v_j‖.

    Wrapping an existing kernel in weight norm this way leaves the layer's output unchanged
    (PyTorch's ``weight_norm`` initializes g = ‖v‖ the same way).

    Args:
      v: a floating kernel (or bias), rank ≥ 1.
      axis: its output-unit axis, a tuple of feature axes, or ``()`` / ``None`` (as ``weight_norm``).
      eps: the same ε that ``weight_norm`` will be called with.

    Returns:
      g, shape ``tuple(v.shape[a] for a in axes)`` (``(v.shape[axis],)`` for an int axis), v's dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from bnjax import weight_norm, weight_norm_init
      >>> v = jnp.array([[3.0, 1.0], [4.0, 0.0]])
      >>> g = weight_norm_init(v)
      >>> g
      Array([5., 1.], dtype=float32)
      >>> bool(jnp.allclose(weight_norm(v, g), v))
      True

    References:
      Salimans & Kingma 2016, "Weight Normalization", §2.
    """
    v = check_floating(v, "v")
    axes = _feature_axes(axis, v, "v")
    check_eps(eps)
    ss, s = _sum_squares(v, axes)
    # √(Σ(v·s)² + ε·s²)/s: inf only where ‖v‖ itself is beyond v's dtype
    g = jnp.sqrt(ss + jnp.asarray(eps, ss.dtype) * (s * s)) / s
    return g.reshape(tuple(v.shape[a] for a in axes)).astype(v.dtype)


def weight_norm_data_init(
    v: ArrayLike,
    x: ArrayLike,
    *,
    axis: int = -1,
    eps: float = 1e-5,
    init_scale: float = 1.0,
    norm_eps: float = 1e-12,
) -> tuple[jax.Array, jax.Array]:
    """Data-dependent initialization of a weight-normalized dense layer (Salimans & Kingma, §3).

    Math: with the normalized pre-activation of one batch, t = x · v̂, v̂_j = v_j/√(‖v_j‖² + ε_v)
    (the direction ``weight_norm`` uses), and its per-unit mean μ_j and variance σ²_j over the
    batch,

        g_j = s / √(σ²_j + ε),        b_j = −μ_j · s / √(σ²_j + ε)        (s = ``init_scale``)

    so that ``x @ weight_norm(v, g) + b`` = s·(t − μ)/√(σ² + ε) has zero mean and standard deviation
    s (to within ε) per unit on that batch. v itself is kept (the paper samples it from
    N(0, 0.05²)).

    Args:
      v: the dense kernel, 2-D: (in, out) with ``axis=-1`` (Flax) or (out, in) with ``axis=0``
        (PyTorch).
      x: one batch of the layer's inputs, (..., in); every leading axis is a batch axis, with at
        least 2 elements in all.
      axis: the output-unit axis of v.
      eps: ε > 0 added to the batch variance of t.
      init_scale: s, the target standard deviation of the initial pre-activations.
      norm_eps: the ε of ``weight_norm`` (keep the two equal).

    Returns:
      ``(g, b)``, each of shape ``(out,)`` and v's dtype; b is the layer's bias.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnjax import weight_norm, weight_norm_data_init
      >>> v = 0.05 * jax.random.normal(jax.random.key(0), (4, 3))
      >>> x = 2.0 + 3.0 * jax.random.normal(jax.random.key(1), (256, 4))
      >>> g, b = weight_norm_data_init(v, x, eps=1e-12)
      >>> y = x @ weight_norm(v, g) + b[None, :]
      >>> bool(jnp.allclose(y.mean(0), 0.0, atol=1e-4)), bool(jnp.allclose(y.std(0), 1.0, atol=1e-4))
      (True, True)

    References:
      Salimans & Kingma 2016, "Weight Normalization: A Simple Reparameterization to Accelerate
      Training of Deep Neural Networks", §3 (data-dependent initialization).
    """
    v = check_floating(v, "v")
    x = check_floating(x, "x")
    ax = _output_axis(axis, v, "v")
    if v.ndim != 2:
        raise ValueError(
            f"weight_norm_data_init: v has shape {v.shape}, but only dense kernels (2-D: (in, out) "
            "with axis=-1, or (out, in) with axis=0) are supported; for a conv kernel, initialize "
            "from the conv's output statistics instead."
        )
    check_eps(eps)
    check_eps(norm_eps)
    fan_in = v.shape[1 - ax]
    if x.ndim < 2 or x.shape[-1] != fan_in:
        raise ValueError(
            f"weight_norm_data_init: x has shape {x.shape}, but v {v.shape} (axis={axis}) has fan-in "
            f"{fan_in}: x must be a batch of inputs of shape (..., {fan_in})."
        )
    batch = int(np.prod(x.shape[:-1]))
    if batch < 2:
        raise ValueError(
            f"weight_norm_data_init: x {x.shape} holds {batch} example(s); the statistics of the "
            "pre-activations need at least 2 (use a typical training batch)."
        )
    with jax.named_scope("bnjax.weight_norm_data_init"):
        direction = weight_norm(v, jnp.ones(v.shape[ax], v.dtype), axis=ax, eps=norm_eps)
        dtype = compute_dtype(jnp.promote_types(v.dtype, x.dtype))
        kernel = jnp.moveaxis(direction.astype(dtype), ax, -1)  # (in, out)
        # t·s from x·s, one power of two for the batch (``_range_scale``): |t·s| ≤ ‖x·s‖ (‖v‖ = 1
        # columns), finite; 1/σ = s/√(σ²(t·s) + ε·s²), and μ·(1/σ) = μ(t·s)/√(σ²(t·s) + ε·s²)
        s = _range_scale(x, tuple(range(x.ndim))).reshape(())
        t = jnp.matmul(x.astype(dtype) * s, kernel, precision=_HIGHEST)
        m = statistics.local_moments(t, tuple(range(t.ndim - 1)))
        inv = init_scale * lax.rsqrt(m.var + jnp.asarray(eps, dtype) * (s * s))
        g = (inv * s).reshape(-1)
        b = (-m.mean * inv).reshape(-1)
        return g.astype(v.dtype), b.astype(v.dtype)


# ---------------------------------------------------------------------------------------------
# Weight standardization


def weight_standardize(w: ArrayLike, *, axis: int = -1, eps: float = 1e-5) -> jax.Array:
    """Weight standardization: each output unit's weights to zero mean and unit variance.

    Math (for each output unit j, μ_j and σ²_j over every axis of w except ``axis``, i.e. the
    fan-in: (in,) of a dense kernel, (kh, kw, in) of a conv kernel):

        ŵ_j = (w_j − μ_j) / √(σ²_j + ε)          (σ² the population variance)

    the core h = (x − μ)/√(σ² + ε) with x = w; μ and σ² by the same stable routine as layer
    norm, from w·s (s a power of two per unit, 1 for ordinary w: any finite w). Invariant to
    w_j → λ_j w_j + c_j (λ_j > 0) up to ε. A constant unit gives ŵ_j = 0 with finite gradients.

    Args:
      w: floating kernel of rank ≥ 2, e.g. (in, out) or (kh, kw, in, out).
      axis: the output-unit axis (-1 for Flax kernels, 0 for PyTorch's (out, in, ...)).
      eps: ε > 0 added to σ² (default 1e-5, as in the paper's code).

    Returns:
      ŵ, w's shape and dtype (statistics in float32 or wider).

    Example:
      >>> import jax.numpy as jnp
      >>> from bnjax import weight_standardize
      >>> w = jnp.array([[1.0, 10.0], [3.0, 10.0]])  # (in=2, out=2); the second unit is constant
      >>> weight_standardize(w, eps=1e-12)
      Array([[-1.,  0.],
             [ 1.,  0.]], dtype=float32)

    References:
      Qiao, Wang, Liu, Shen & Yuille 2019, "Micro-Batch Training with Batch-Channel Normalization
      and Weight Standardization", eq. 5–6.
    """
    w = check_floating(w, "w")
    ax = _output_axis(axis, w, "w")
    check_eps(eps)
    fan_in = _fan_in(w.shape, ax)
    if int(np.prod([w.shape[a] for a in fan_in])) < 2:
        raise ValueError(
            f"weight_standardize: each output unit of w {w.shape} (axis={axis}) has a single fan-in "
            "weight, so w − μ = 0 and every standardized weight would be 0. Use it on kernels with "
            "a fan-in of at least 2, or check axis."
        )
    with jax.named_scope("bnjax.weight_standardize"):
        m, s = statistics.global_scaled_moments(w, fan_in)  # of w·s: any finite w
        return apply_normalization(w, (m.shift, m.offset), m.var, None, None, eps, None, x_scale=s)


# ---------------------------------------------------------------------------------------------
# Spectral normalization


def _as_matrix(w: jax.Array, axis: int) -> jax.Array:
    """W of shape (out, fan_in): row j is output unit j's weights (PyTorch's orientation)."""
    # the fan-in size spelled out: reshape's -1 cannot be inferred for a weight with no output unit
    return jnp.moveaxis(w, axis, 0).reshape(w.shape[axis], math.prod(n for a, n in enumerate(w.shape) if a != axis))


def _scaled_whole(w: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(w·s in ``dtype``, s): one power of two for all of w (``_range_scale``), on which the power
    iteration runs: Wv and its norms stay finite, u and v are those of w, σ(W·s) = σ·s."""
    s = _range_scale(w, tuple(range(w.ndim))).reshape(()).astype(dtype)
    return w.astype(dtype) * s, s


def _l2_normalize(x: jax.Array, eps) -> tuple[jax.Array, jax.Array]:
    """x / max(‖x‖, ε), as Miyato et al.'s and PyTorch's power iteration (finite for x = 0)."""
    norm = jnp.sqrt(jnp.sum(x * x))
    return x / jnp.maximum(norm, eps), norm


@functools.partial(jax.jit, static_argnums=(2, 4, 5))  # eager callers reuse one compiled loop per shape
def _power_iteration(
    mat: jax.Array, u: jax.Array, n_steps: int, eps, last_v: bool = False, keep_u: bool = True
) -> tuple[jax.Array, jax.Array]:
    """n_steps of v ← Wᵀu/‖Wᵀu‖, u ← Wv/‖Wv‖ (no gradient); returns (u, v).

    v is recomputed from the final u, or, with ``last_v``, is the last step's v (computed from
    the u before the last update; from u itself when n_steps = 0). A step whose Wv is exactly
    zero (an all-zero W) keeps the previous u, so a zero weight never wipes the state (with
    ``keep_u=False`` it sets u to 0, as Flax does).
    """
    mat = lax.stop_gradient(mat)

    def half_step(u):
        return _l2_normalize(jnp.matmul(mat.T, u, precision=_HIGHEST), eps)[0]

    def step(_, carry):
        u, v = carry
        v_new = half_step(u)
        new_u, norm = _l2_normalize(jnp.matmul(mat, v_new, precision=_HIGHEST), eps)
        if not keep_u:
            return new_u, v_new
        keep = norm > 0
        return jnp.where(keep, new_u, u), jnp.where(keep, v_new, v)

    u0 = lax.stop_gradient(u)
    u, v = lax.fori_loop(0, n_steps, step, (u0, half_step(u0)))
    return u, (v if last_v else half_step(u))


def spectral_norm(
    w: ArrayLike,
    u: ArrayLike,
    *,
    n_steps: int = 1,
    axis: int = -1,
    eps: float = 1e-12,
    training: bool = True,
    sigma_from: str = "u",
    return_sigma: bool = False,
    keep_u: bool = True,
) -> Any:
    """Spectral normalization: divide w by its largest singular value, estimated by power iteration.

    Math: W = w reshaped to (out, fan_in), row j the weights of output unit j (w's ``axis``
    moved first; PyTorch's orientation, so ``u`` is PyTorch's ``_u`` buffer). With the state u
    (a unit vector of size out, the left singular vector estimate), each step is

        v ← Wᵀu / ‖Wᵀu‖,        u ← W v / ‖W v‖

    and then, from the final u,

        v = Wᵀu / ‖Wᵀu‖,        σ = uᵀ W v  (= ‖Wᵀu‖),        w_SN = w / σ.

    The power iteration runs under ``stop_gradient``: the gradient flows only through W in
    σ = uᵀWv with u and v fixed, as in Miyato et al. and PyTorch (at convergence this is the exact
    gradient of σ_max, u vᵀ). σ is computed from the returned u (PyTorch's order; Miyato et al.'s
    Algorithm 1 uses the v before the last u update, a lower estimate), so evaluating with the
    new u reproduces the training output exactly. ``sigma_from="v"`` instead keeps the last
    step's v, σ = uᵀWv = ‖Wv‖ with v from the u before the last update: Miyato et al.'s
    Algorithm 1 and the order of Flax's ``SpectralNorm`` (and of PyTorch's older
    ``torch.nn.utils.spectral_norm``); with no step to take (``n_steps=0`` or
    ``training=False``) both orders compute v from u.

    ``training=True`` runs ``n_steps`` steps and returns the new u (``n_steps=0``: no step, u
    unchanged); ``training=False`` runs none and returns u unchanged. Norms are floored at ε as
    in PyTorch; a step on an all-zero W keeps u, and an all-zero W (σ = 0) gives w_SN = 0 with
    finite gradients. Any finite w: the iteration runs on W·s, one power of two (1 below 2^28),
    and σ = σ(W·s)/s (inf only where σ itself is beyond the dtype).

    Args:
      w: floating weight of rank ≥ 2, e.g. a Flax kernel (in, out) / (kh, kw, in, out) with
        ``axis=-1``, or a PyTorch weight (out, in, ...) with ``axis=0``.
      u: the power-iteration state, shape ``(w.shape[axis],)``, from ``spectral_norm_init``;
        it must not be zero. Keep it in float32.
      n_steps: power-iteration steps per training call, an int ≥ 0 (1 is the paper's choice:
        the estimate improves across training steps as w changes slowly).
      axis: the output-unit axis of w.
      eps: ε > 0, the floor on ‖Wᵀu‖ and ‖Wv‖ (PyTorch's default 1e-12).
      training: Python bool: update u (True) or use it as is (False).
      sigma_from: ``"u"`` (default: v from the returned u, PyTorch's parametrization) or ``"v"``
        (the last step's v: Miyato et al.'s Algorithm 1, Flax).
      return_sigma: also return the estimate σ (a scalar in u's dtype).
      keep_u: a step on an all-zero W keeps u (default). ``False`` is Flax's rule: u becomes 0,
        and stays 0 from then on, so σ = 0 and w is returned unnormalized (for a parameter that
        starts at zero, e.g. a bias, spectral normalization then never starts).

    Returns:
      ``(w_SN, new_u)``, or ``(w_SN, new_u, sigma)`` with ``return_sigma=True``: w_SN of w's
      shape and dtype; new_u of u's shape and dtype (u itself when ``training=False``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnjax import spectral_norm, spectral_norm_init
      >>> w = jnp.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # (in=3, out=2): σ_max = 3
      >>> u = spectral_norm_init(jax.random.key(0), w)
      >>> w_sn, u = spectral_norm(w, u)
      >>> w_sn.round(4)
      Array([[1.    , 0.    ],
             [0.    , 0.3333],
             [0.    , 0.    ]], dtype=float32)

    References:
      Miyato, Kataoka, Koyama & Yoshida 2018, "Spectral Normalization for Generative Adversarial
      Networks", Algorithm 1.
    """
    if not isinstance(training, bool):
        raise TypeError(
            f"training must be a Python bool, got {type(training).__name__}: it selects the "
            "computation at trace time. Use jax.lax.cond over two calls to switch on a traced value."
        )
    w = check_floating(w, "w")
    ax = _output_axis(axis, w, "w")
    u = _check_unit_vector(u, w, ax, "u", f"create it with spectral_norm_init(key, w, axis={axis}).")
    n_steps = check_int(n_steps, "n_steps", 0)
    check_eps(eps)
    if sigma_from not in ("u", "v"):
        raise ValueError(
            f"sigma_from must be 'u' (σ from the returned u, PyTorch's order) or 'v' (σ from the last "
            f"step's v, Miyato et al.'s Algorithm 1 and Flax's order), got {sigma_from!r}."
        )
    for flag, value in (("return_sigma", return_sigma), ("keep_u", keep_u)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a Python bool, got {type(value).__name__}.")
    with jax.named_scope("bnjax.spectral_norm"):
        dtype = compute_dtype(jnp.promote_types(w.dtype, u.dtype))
        ws, s = _scaled_whole(w, dtype)  # w/σ = (w·s)/σ(W·s)
        mat = _as_matrix(ws, ax)
        steps = n_steps if training else 0
        new_u, v = _power_iteration(mat, u.astype(dtype), steps, eps, sigma_from == "v", keep_u)
        sigma = jnp.dot(new_u, jnp.matmul(mat, v, precision=_HIGHEST), precision=_HIGHEST)
        # σ = 0 only for an all-zero W (or a zero u): divide by 1 there, so w_SN = w = 0 and the
        # gradient is finite, where a floor max(σ, ε) would give gradients of order 1/ε.
        y = ws / jnp.where(sigma > 0, sigma, jnp.ones((), dtype))
        out = y.astype(w.dtype), (new_u.astype(u.dtype) if training else u)
        return (*out, (sigma / s).astype(u.dtype)) if return_sigma else out


def spectral_norm_init(
    key: jax.Array,
    w: ArrayLike,
    *,
    axis: int = -1,
    n_warmup: int = 15,
    eps: float = 1e-12,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """The initial power-iteration state u for ``spectral_norm``: a random unit vector, warmed up.

    u₀ ~ N(0, I) normalized, then ``n_warmup`` steps of the power iteration on w (15, as
    PyTorch does on registration), so the first ``spectral_norm`` call already divides by a good
    estimate of σ_max.

    Args:
      key: a ``jax.random`` key.
      w: the weight that will be normalized (only its values at init are used).
      axis: its output-unit axis.
      n_warmup: power-iteration steps, an int ≥ 0.
      eps: the ε of ``spectral_norm``.
      dtype: dtype of u (float32 or wider recommended, like running statistics).

    Returns:
      u, shape ``(w.shape[axis],)``, unit norm.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnjax import spectral_norm_init
      >>> u = spectral_norm_init(jax.random.key(0), jnp.array([[3.0, 0.0], [0.0, 1.0]]))
      >>> [round(abs(float(c)), 4) for c in u]  # the top left singular vector, up to sign
      [1.0, 0.0]

    References:
      Miyato, Kataoka, Koyama & Yoshida 2018, "Spectral Normalization for Generative Adversarial
      Networks", Algorithm 1.
    """
    w = check_floating(w, "w")
    ax = _output_axis(axis, w, "w")
    n_warmup = check_int(n_warmup, "n_warmup", 0)
    check_eps(eps)
    cdtype = compute_dtype(jnp.promote_types(w.dtype, dtype))
    u0 = _l2_normalize(jax.random.normal(key, (w.shape[ax],), cdtype), eps)[0]
    u, _ = _power_iteration(_as_matrix(_scaled_whole(w, cdtype)[0], ax), u0, n_warmup, eps)
    return u.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Cosine normalization


def _safe_norm(sum_squares: jax.Array, eps) -> jax.Array:
    # ε inside the root keeps the norm smooth at 0 (no NaN gradient); the clamp absorbs sums of
    # squares that a fast (e.g. Winograd) convolution rounds slightly below 0.
    return jnp.sqrt(jnp.maximum(sum_squares, 0) + jnp.asarray(eps, sum_squares.dtype))


def _scaled_filters(w: jax.Array, dtype, eps) -> tuple[jax.Array, jax.Array]:
    """(w·s, √(Σ(w·s)² + ε·s²) = s·‖w‖_ε) in ``dtype`` for a kernel whose last axis is the output
    units: s a power of two per unit (``_range_scale``), so the norm (shape (out,)) stays finite
    and the cosine, taken of w·s, is that of w."""
    reduced = tuple(range(w.ndim - 1))
    s = _range_scale(w, reduced).astype(dtype)
    ws = w.astype(dtype) * s
    return ws, _safe_norm(jnp.sum(ws * ws, axis=reduced), jnp.asarray(eps, dtype) * (s * s).reshape(-1))


def _cosine(num: jax.Array, x_norm: jax.Array, w_norm: jax.Array, dtype) -> jax.Array:
    # |x·w| ≤ ‖x‖_ε ‖w‖_ε holds exactly; the clip only absorbs rounding. w is scaled (finite
    # norms), x is not: where ‖x‖² overflowed, num/∞ would be a silent 0, so ‖x‖ + (‖x‖ − ‖x‖)·0
    # makes that row NaN instead. On ‖x‖ (a value per row), not on y: a term on y costs 7 % of a
    # float32 training step (measured); a test checks that the clip passes the NaN on.
    x_norm = x_norm + lax.stop_gradient(x_norm - x_norm) * 0
    return jnp.clip(num / (x_norm * w_norm), -1.0, 1.0).astype(dtype)


def cosine_norm(
    x: ArrayLike,
    w: ArrayLike,
    *,
    eps: float = 1e-8,
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """Cosine normalization of a dense layer: the cosine between each input and each weight column.

    Math (x of shape (..., in), w of shape (in, out)):

        y[..., j] = Σᵢ x[..., i] w[i, j] / ( ‖x[...]‖_ε · ‖w[:, j]‖_ε ),   ‖a‖_ε = √(Σ a² + ε)

    bounded in [−1, 1] (clipped against rounding); no g, b. ε keeps a zero input or a zero column
    finite: it gives y = 0 with finite gradients. For ‖x‖², ‖w_j‖² ≫ ε, y is cos θ to rounding,
    invariant to x → λx (per example) and w[:, j] → λ_j w[:, j] (λ > 0).

    Range: any finite w (each column is scaled by a power of two, exact). x is not scaled, since
    that costs an x-sized pass on every call (1.1–1.6× a float32 training step, measured): an
    example whose ‖x‖² overflows the compute dtype (‖x‖ above about 1.8e19 in float32) gives
    NaN in its row, never a finite wrong value; divide such x by a power of two first (y does
    not change).

    Args:
      x: floating inputs (..., in).
      w: floating kernel (in, out), Flax's Dense layout.
      eps: ε > 0 added to both squared norms.
      precision: matmul precision (``jax.lax.Precision``), JAX's default if ``None``.

    Returns:
      y, shape (..., out), x's dtype (computed in float32 or wider).

    Example:
      >>> import jax.numpy as jnp
      >>> from bnjax import cosine_norm
      >>> x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
      >>> w = jnp.array([[1.0, 0.0, -6.0], [0.0, 0.0, -8.0]])  # second column all zero
      >>> cosine_norm(x, w)
      Array([[ 0.6,  0. , -1. ],
             [ 0. ,  0. ,  0. ]], dtype=float32)

    References:
      Luo, Zhan, Wang & Yang 2017, "Cosine Normalization: Using Cosine Similarity Instead of Dot
      Product in Neural Networks", eq. 3.
    """
    x = check_floating(x, "x")
    w = check_floating(w, "w")
    check_eps(eps)
    if w.ndim != 2:
        raise ValueError(f"cosine_norm: w has shape {w.shape}; it must be a dense kernel (in, out).")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"cosine_norm: x has shape {x.shape} but w has shape {w.shape}: x's last axis (the "
            f"inputs) must match w's first axis, i.e. x of shape (..., {w.shape[0]}) with w (in, out)."
        )
    with jax.named_scope("bnjax.cosine_norm"):
        dtype = compute_dtype(jnp.promote_types(x.dtype, w.dtype))
        xc = x.astype(dtype)
        wc, w_norm = _scaled_filters(w, dtype, eps)  # any finite w
        num = jnp.matmul(xc, wc, precision=precision)
        x_norm = _safe_norm(jnp.sum(xc * xc, axis=-1, keepdims=True), eps)  # (..., 1)
        w_norm = w_norm.reshape((1,) * (num.ndim - 1) + w_norm.shape)
        return _cosine(num, x_norm, w_norm, x.dtype)


def _check_padding(padding: Any, spatial: int) -> str | tuple[tuple[int, int], ...]:
    """``"SAME"``/``"VALID"`` (any case) or one (low, high) pair of ints per spatial axis."""
    fix = f"padding must be 'SAME', 'VALID' or {spatial} (low, high) pairs of ints, one per spatial axis"
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{fix}, got {padding!r}.")
        return padding.upper()
    try:
        pairs = tuple((check_int(lo, "padding", 0), check_int(hi, "padding", 0)) for lo, hi in padding)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{fix}, got {padding!r}.") from e
    if len(pairs) != spatial:
        raise ValueError(f"{fix}, got {len(pairs)} pair(s): {padding!r}.")
    return pairs


def cosine_norm_conv(
    x: ArrayLike,
    kernel: ArrayLike,
    *,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    eps: float = 1e-8,
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """Cosine normalization of a convolution: the cosine between each input patch and each filter.

    Math (channels-last x (N, *spatial, in), Flax kernel (*window, in, out)):

        y[n, p, j] = ⟨patch_p(x_n), k_j⟩ / ( ‖patch_p(x_n)‖_ε · ‖k_j‖_ε ),   ‖a‖_ε = √(Σ a² + ε)

    where patch_p is the (zero-padded) input window under output position p and k_j filter j.
    ‖patch‖² is itself a convolution: x² with a one-filter kernel of ones. Bounded in [−1, 1];
    a zero patch or a zero filter gives 0 with finite gradients. With a 1×1 window this is
    ``cosine_norm`` applied at every position. Range as ``cosine_norm``: any finite kernel; a
    patch whose ‖patch‖² overflows gives NaN at that position.

    Args:
      x: floating input (N, *spatial, in), e.g. NHWC.
      kernel: floating kernel (*window, in, out), e.g. (kh, kw, in, out).
      strides: int or one int per spatial axis.
      padding: ``"SAME"``, ``"VALID"`` or one (low, high) pair per spatial axis (zeros).
      eps: ε > 0 added to both squared norms.
      precision: convolution precision (``jax.lax.Precision``), JAX's default if ``None``.

    Returns:
      y, shape (N, *out_spatial, out), x's dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnjax import cosine_norm_conv
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> y = cosine_norm_conv(x, jax.random.normal(jax.random.key(1), (3, 3, 3, 16)))
      >>> y.shape, bool(jnp.all(jnp.abs(y) <= 1.0))
      ((2, 8, 8, 16), True)

    References:
      Luo, Zhan, Wang & Yang 2017, "Cosine Normalization: Using Cosine Similarity Instead of Dot
      Product in Neural Networks", §3.
    """
    x = check_floating(x, "x")
    kernel = check_floating(kernel, "kernel")
    check_eps(eps)
    if kernel.ndim < 3 or x.ndim != kernel.ndim:
        raise ValueError(
            f"cosine_norm_conv: x has shape {x.shape} and kernel {kernel.shape}: expected channels-last "
            "x (N, *spatial, in) and a kernel (*window, in, out) with one window axis per spatial "
            "axis, e.g. x (N, H, W, C) with kernel (kh, kw, C, out)."
        )
    if x.shape[-1] != kernel.shape[-2]:
        raise ValueError(
            f"cosine_norm_conv: x has {x.shape[-1]} input channels (shape {x.shape}) but kernel "
            f"{kernel.shape} expects {kernel.shape[-2]}: kernel must be (*window, {x.shape[-1]}, out)."
        )
    spatial = x.ndim - 2
    if isinstance(strides, (int, np.integer)):
        strides = (int(strides),) * spatial
    strides = tuple(strides)
    if len(strides) != spatial or any(isinstance(s, bool) or int(s) < 1 for s in strides):
        raise ValueError(f"strides={strides!r} must be an int ≥ 1 or {spatial} of them (one per spatial axis).")
    padding = _check_padding(padding, spatial)
    with jax.named_scope("bnjax.cosine_norm_conv"):
        dtype = compute_dtype(jnp.promote_types(x.dtype, kernel.dtype))
        xc = x.astype(dtype)
        kc, k_norm = _scaled_filters(kernel, dtype, eps)  # any finite kernel
        channels_last = tuple(range(1, spatial + 1))
        dims = lax.ConvDimensionNumbers(
            lhs_spec=(0, spatial + 1, *channels_last),
            rhs_spec=(spatial + 1, spatial, *range(spatial)),
            out_spec=(0, spatial + 1, *channels_last),
        )

        def conv(lhs, rhs):
            return lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=dims, precision=precision)

        num = conv(xc, kc)
        ones = jnp.ones(kernel.shape[:-1] + (1,), dtype)
        patch_norm = _safe_norm(conv(xc * xc, ones), eps)  # (N, *out_spatial, 1)
        return _cosine(num, patch_norm, k_norm.reshape((1,) * (num.ndim - 1) + k_norm.shape), x.dtype)
