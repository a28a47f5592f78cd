"""Float64 NumPy references: the executable specification of every method.

Written independently of bnjax (plain two-pass formulas and explicit loops in float64), so a bug
shared between the library's shared core and its methods cannot hide here.
"""

from __future__ import annotations

import numpy as np


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def moments(x, axes, mask=None):
    """Population mean and variance over ``axes`` (keepdims), valid elements only."""
    x = f64(x)
    axes = tuple(a % x.ndim for a in np.atleast_1d(axes))
    w = np.ones_like(x) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape).astype(np.float64)
    xs = np.where(w > 0, x, 0.0)
    n = w.sum(axis=axes, keepdims=True)
    mean = np.divide(xs.sum(axis=axes, keepdims=True), n, out=np.zeros_like(n), where=n > 0)
    dev = np.where(w > 0, x - mean, 0.0)
    var = np.divide((dev**2).sum(axis=axes, keepdims=True), n, out=np.zeros_like(n), where=n > 0)
    return mean, var, n


def normalize(x, mean, var, scale=None, bias=None, eps=1e-5, activation=None):
    y = (f64(x) - (0.0 if mean is None else f64(mean))) / np.sqrt(f64(var) + eps)
    if scale is not None:
        y = y * f64(scale)
    if bias is not None:
        y = y + f64(bias)
    return y if activation is None else activation(y)


def _feature_shape(x, feature_axes):
    return [x.shape[a] if a in feature_axes else 1 for a in range(x.ndim)]


def batch_norm_train(x, scale, bias, axis=-1, eps=1e-5, mask=None):
    """Returns (y, batch_mean, batch_var, n) with statistics flattened to the feature shape."""
    x = f64(x)
    feat = tuple(sorted(a % x.ndim for a in np.atleast_1d(axis)))
    red = tuple(a for a in range(x.ndim) if a not in feat)
    mean, var, n = moments(x, red, mask)
    shape = _feature_shape(x, feat)
    s = None if scale is None else f64(scale).reshape(shape)
    b = None if bias is None else f64(bias).reshape(shape)
    y = normalize(x, mean, var, s, b, eps)
    fshape = tuple(x.shape[a] for a in feat)
    return y, mean.reshape(fshape), var.reshape(fshape), n.reshape(fshape)


def batch_norm_eval(x, scale, bias, mean, var, axis=-1, eps=1e-5):
    x = f64(x)
    feat = tuple(sorted(a % x.ndim for a in np.atleast_1d(axis)))
    shape = _feature_shape(x, feat)
    r = lambda a: None if a is None else f64(a).reshape(shape)  # noqa: E731
    return normalize(x, r(mean), r(var), r(scale), r(bias), eps)


def ema(old, new, momentum):
    return momentum * f64(old) + (1.0 - momentum) * f64(new)


def running_sequence(batches_stats, momentum, debias=True, init_mean=0.0, init_var=1.0):
    """Running (mean, var) after each of a list of (batch_mean, batch_var), per the conventions."""
    mean, var = init_mean, init_var
    out = []
    for k, (bm, bv) in enumerate(batches_stats):
        if momentum is None:
            decay = k / (k + 1)
        elif debias:
            decay = min(momentum, k / (k + 1))
        else:
            decay = momentum
        mean, var = ema(mean, bm, decay), ema(var, bv, decay)
        out.append((mean, var))
    return out


def layer_norm(x, scale, bias, axis=-1, eps=1e-5, feature_axis=None):
    x = f64(x)
    axes = tuple(sorted(a % x.ndim for a in np.atleast_1d(axis)))
    feat = axes if feature_axis is None else tuple(sorted(a % x.ndim for a in np.atleast_1d(feature_axis)))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    shape = _feature_shape(x, feat)
    return normalize(
        x,
        mean,
        var,
        None if scale is None else f64(scale).reshape(shape),
        None if bias is None else f64(bias).reshape(shape),
        eps,
    )


def group_norm(x, scale, bias, num_groups, axis=-1, eps=1e-5):
    """Explicit loops over examples and groups."""
    x = np.moveaxis(f64(x), axis, -1)  # (N, ..., C)
    n, c = x.shape[0], x.shape[-1]
    per = c // num_groups
    y = np.empty_like(x)
    for i in range(n):
        for g in range(num_groups):
            block = x[i, ..., g * per : (g + 1) * per]
            mu, var = block.mean(), block.var()
            y[i, ..., g * per : (g + 1) * per] = (block - mu) / np.sqrt(var + eps)
    if scale is not None:
        y = y * f64(scale)
    if bias is not None:
        y = y + f64(bias)
    return np.moveaxis(y, -1, axis)


def instance_norm(x, scale, bias, axis=-1, eps=1e-5):
    x = np.moveaxis(f64(x), axis, -1)
    spatial = tuple(range(1, x.ndim - 1))
    mu = x.mean(axis=spatial, keepdims=True)
    var = x.var(axis=spatial, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if scale is not None:
        y = y * f64(scale)
    if bias is not None:
        y = y + f64(bias)
    return np.moveaxis(y, -1, axis)


def rms_norm(x, scale, bias=None, axis=-1, eps=1e-6):
    x = f64(x)
    axes = tuple(sorted(a % x.ndim for a in np.atleast_1d(axis)))
    ms = (x**2).mean(axis=axes, keepdims=True)
    shape = _feature_shape(x, axes)
    return normalize(
        x,
        None,
        ms,
        None if scale is None else f64(scale).reshape(shape),
        None if bias is None else f64(bias).reshape(shape),
        eps,
    )


def batch_norm_train_vjp(x, scale, dy, axis=-1, eps=1e-5, mask=None):
    """Closed-form gradients of batch norm in training mode (Ioffe & Szegedy 2015, §3):

        dx = g/(n σ) · (n·dy − Σdy − x̂·Σ(dy·x̂)),   dg = Σ dy·x̂,   db = Σ dy

    with sums over the valid elements of each feature. ``dy`` must be zero on invalid elements
    (their outputs are not used), whose dx is then zero. Returns (dx, dscale, dbias).
    """
    x, dy = f64(x), f64(dy)
    feat = tuple(sorted(a % x.ndim for a in np.atleast_1d(axis)))
    red = tuple(a for a in range(x.ndim) if a not in feat)
    mean, var, n = moments(x, red, mask)
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    assert not np.any(dy[~valid]), "dy must vanish on masked elements"
    sigma = np.sqrt(var + eps)
    xhat = np.where(valid, (x - mean) / sigma, 0.0)
    g = np.ones(n.shape) if scale is None else f64(scale).reshape(n.shape)
    s1 = dy.sum(axis=red, keepdims=True)
    s2 = (dy * xhat).sum(axis=red, keepdims=True)
    safe_n = np.maximum(n, 1)
    dx = np.where(valid, g / (safe_n * sigma) * (safe_n * dy - s1 - xhat * s2), 0.0)
    fshape = tuple(x.shape[a] for a in feat)
    return dx, s2.reshape(fshape), s1.reshape(fshape)
