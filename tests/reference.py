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


def mean_only_batch_norm_train(x, scale, bias, axis=-1, mask=None):
    """y = g·(x − μ_B) + b (σ = 1); returns (y, batch_mean) with the mean in the feature shape."""
    x = f64(x)
    feat = tuple(sorted(a % x.ndim for a in np.atleast_1d(axis)))
    red = tuple(a for a in range(x.ndim) if a not in feat)
    mean, _, _ = moments(x, red, mask)
    shape = _feature_shape(x, feat)
    y = x - mean
    if scale is not None:
        y = y * f64(scale).reshape(shape)
    if bias is not None:
        y = y + f64(bias).reshape(shape)
    return y, mean.reshape(tuple(x.shape[a] for a in feat))


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


# ---------------------------------------------------------------------------------------------
# Weight-side methods: the output-unit axis is ``axis``, every other axis is fan-in.


def _units(w, axis):
    """The weight as a list of per-output-unit float64 arrays (explicit, no reshape tricks)."""
    w = f64(w)
    return [np.take(w, j, axis=axis) for j in range(w.shape[axis])]


def _from_units(units, axis):
    return np.stack(units, axis=axis % (units[0].ndim + 1))


def weight_norm(v, g, axis=-1, eps=1e-12):
    """w_j = g_j v_j / sqrt(sum(v_j^2) + eps), unit by unit (Salimans & Kingma 2016, eq. 2)."""
    g = f64(g)
    units = [g[j] * u / np.sqrt(np.sum(u * u) + eps) for j, u in enumerate(_units(v, axis))]
    return _from_units(units, axis)


def weight_norm_data_init(v, x, axis=-1, eps=1e-5, init_scale=1.0, norm_eps=1e-12):
    """(g, b) with g = s/sqrt(var(t) + eps), b = -mean(t) g, t = x . v_j/|v_j| (Salimans & Kingma §3)."""
    x = f64(x).reshape(-1, np.shape(x)[-1])
    g, b = [], []
    for u in _units(v, axis):
        t = x @ (u / np.sqrt(np.sum(u * u) + norm_eps))
        mu = t.mean()
        var = ((t - mu) ** 2).mean()
        g.append(init_scale / np.sqrt(var + eps))
        b.append(-mu * g[-1])
    return np.array(g), np.array(b)


def weight_standardize(w, axis=-1, eps=1e-5):
    """(w_j - mean(w_j)) / sqrt(var(w_j) + eps), unit by unit, two-pass (Qiao et al. 2019)."""
    units = []
    for u in _units(w, axis):
        mu = u.mean()
        var = ((u - mu) ** 2).mean()
        units.append((u - mu) / np.sqrt(var + eps))
    return _from_units(units, axis)


def weight_matrix(w, axis=-1):
    """W of shape (out, fan_in): row j is the flattened weights of output unit j."""
    return np.stack([u.reshape(-1) for u in _units(w, axis)])


def spectral_norm_power(w, u, n_steps=1, axis=-1, eps=1e-12, training=True):
    """Power iteration as in Miyato et al. 2018, Algorithm 1, in float64: returns (w / sigma, u)."""
    mat = weight_matrix(w, axis)
    u = f64(u).copy()

    def unit(a):
        return a / max(np.linalg.norm(a), eps)

    for _ in range(n_steps if training else 0):
        v = unit(mat.T @ u)
        u = unit(mat @ v)
    v = unit(mat.T @ u)
    sigma = u @ mat @ v
    return f64(w) / sigma, u


def spectral_norm_exact(w, axis=-1):
    """(w / sigma_max, sigma_max, left singular vector) from the SVD of the (out, fan_in) matrix."""
    mat = weight_matrix(w, axis)
    left, s, _ = np.linalg.svd(mat)
    return f64(w) / s[0], s[0], left[:, 0]


def cosine_norm(x, w, eps=1e-8):
    """y[n, j] = x_n . w_j / (sqrt(|x_n|^2 + eps) sqrt(|w_j|^2 + eps)), explicit loops (Luo et al. 2017)."""
    x, w = f64(x), f64(w)
    flat = x.reshape(-1, x.shape[-1])
    y = np.empty((flat.shape[0], w.shape[1]))
    for n in range(flat.shape[0]):
        for j in range(w.shape[1]):
            xn, wj = flat[n], w[:, j]
            y[n, j] = xn @ wj / (np.sqrt(xn @ xn + eps) * np.sqrt(wj @ wj + eps))
    return y.reshape(x.shape[:-1] + (w.shape[1],))


def _same_padding(size, k, stride):
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def cosine_norm_conv2d(x, kernel, strides=(1, 1), padding="SAME", eps=1e-8):
    """Cosine between each zero-padded input patch and each filter, NHWC x and (kh, kw, in, out)
    kernel, by explicit loops over output positions."""
    x, kernel = f64(x), f64(kernel)
    kh, kw, _, out = kernel.shape
    if padding == "SAME":
        pads = [_same_padding(x.shape[1], kh, strides[0]), _same_padding(x.shape[2], kw, strides[1])]
    elif padding == "VALID":
        pads = [(0, 0), (0, 0)]
    else:
        pads = [tuple(p) for p in padding]
    xp = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    oh = (xp.shape[1] - kh) // strides[0] + 1
    ow = (xp.shape[2] - kw) // strides[1] + 1
    filters = kernel.reshape(-1, out)
    y = np.empty((x.shape[0], oh, ow, out))
    for n in range(x.shape[0]):
        for i in range(oh):
            for j in range(ow):
                r, c = i * strides[0], j * strides[1]
                patch = xp[n, r : r + kh, c : c + kw, :].reshape(-1)
                for k in range(out):
                    f = filters[:, k]
                    y[n, i, j, k] = patch @ f / (np.sqrt(patch @ patch + eps) * np.sqrt(f @ f + eps))
    return y
