"""Flax shells of the weight-side methods: equal to the functional API, never overwriting the
wrapped kernel, trainable, and working under jit/grad."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax.linen
import bnjax.nnx
from bnjax._src import weights
from tests.helpers import data

X2, _ = data((5, 6), seed=1)
X4, _ = data((2, 7, 7, 3), seed=2)


def _conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_linen_weight_norm_starts_as_the_wrapped_layer_and_trains_g_and_v():
    layer = bnjax.linen.WeightNorm(nn.Dense(4))
    v = layer.init(jax.random.key(0), X2)
    inner = v["params"]["layer_instance"]
    np.testing.assert_allclose(layer.apply(v, X2), nn.Dense(4).apply({"params": inner}, X2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        v["params"]["layer_instance/kernel/scale"], jnp.linalg.norm(inner["kernel"], axis=0), rtol=1e-6
    )
    # equals the functional form with other values of g
    v["params"]["layer_instance/kernel/scale"] = v["params"]["layer_instance/kernel/scale"] * jnp.arange(1.0, 5.0)
    w = weights.weight_norm(inner["kernel"], v["params"]["layer_instance/kernel/scale"])
    np.testing.assert_allclose(layer.apply(v, X2), X2 @ w + inner["bias"][None], rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, X2) ** 2))(v["params"])
    assert (
        float(jnp.abs(grads["layer_instance/kernel/scale"]).sum()) > 0
        and float(jnp.abs(grads["layer_instance"]["kernel"]).sum()) > 0
    )


def test_linen_weight_standardized_conv_and_cosine_layers_equal_functional_api():
    conv = bnjax.linen.StandardizedConv(5, (3, 3))
    v = conv.init(jax.random.key(0), X4)
    inner = v["params"]["Conv_0"]  # the wrapped conv's own, raw kernel
    expected = _conv(X4, weights.weight_standardize(inner["kernel"])) + inner["bias"][None, None, None]
    np.testing.assert_allclose(conv.apply(v, X4), expected, rtol=1e-5, atol=1e-5)

    dense = bnjax.linen.CosineDense(3)
    v = dense.init(jax.random.key(1), X2)
    y = dense.apply(v, X2)
    np.testing.assert_array_equal(y, weights.cosine_norm(X2, v["params"]["kernel"]))
    assert float(jnp.max(jnp.abs(y))) <= 1.0

    cconv = bnjax.linen.CosineConv(4, (3, 3))
    v = cconv.init(jax.random.key(2), X4)
    np.testing.assert_array_equal(cconv.apply(v, X4), weights.cosine_norm_conv(X4, v["params"]["kernel"]))


def test_linen_spectral_norm_converges_and_eval_leaves_u():
    layer = bnjax.linen.SpectralNorm(nn.Dense(6), n_steps=1)
    v = layer.init(jax.random.key(0), X2)
    kernel = v["params"]["layer_instance"]["kernel"]
    step = jax.jit(lambda v: layer.apply(v, X2, update_stats=True, mutable=["batch_stats"])[1])
    for _ in range(30):
        v = {"params": v["params"], **step(v)}
    w_sn, _ = weights.spectral_norm(kernel, v["batch_stats"]["layer_instance/kernel/u"].reshape(-1), training=False)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(w_sn), compute_uv=False)[0], 1.0, rtol=1e-4)
    np.testing.assert_allclose(layer.apply(v, X2), X2 @ w_sn + v["params"]["layer_instance"]["bias"][None], rtol=1e-5)
    _, upd = layer.apply(v, X2, update_stats=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(
        upd["batch_stats"]["layer_instance/kernel/u"], v["batch_stats"]["layer_instance/kernel/u"]
    )


def _np_weight_norm(v, g, axes, eps=1e-12):
    """float64 reference: w = g·v/sqrt(sum of v² over the non-feature axes + eps)."""
    v = np.asarray(v, np.float64)
    red = tuple(a for a in range(v.ndim) if a not in axes)
    shape = [v.shape[a] if a in axes else 1 for a in range(v.ndim)]
    w = v / np.sqrt(np.sum(v * v, axis=red, keepdims=True) + eps)
    return w if g is None else w * np.asarray(g, np.float64).reshape(shape)


def test_nnx_weight_norm_keeps_the_kernel_and_trains_under_jit():
    dense = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    kernel0, bias = dense.kernel[...], dense.bias[...]
    layer = bnjax.nnx.WeightNorm(dense)
    np.testing.assert_allclose(layer(X2), X2 @ kernel0 + bias[None], rtol=1e-5, atol=1e-6)

    @nnx.jit
    def step(layer, x):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)

    grads = step(layer, X2)

    def loss(v, g):  # the same loss through the functional API
        return jnp.sum((X2 @ weights.weight_norm(v, g) + bias[None]) ** 2)

    g0 = layer.scales[("kernel",)][...]
    gv, gg = jax.grad(loss, argnums=(0, 1))(kernel0, g0)
    np.testing.assert_allclose(grads.scales[("kernel",)][...], gg, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads.layer_instance.kernel[...], gv, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(layer.layer_instance.kernel[...], kernel0)  # never overwritten
    layer(X2)
    np.testing.assert_array_equal(dense.kernel[...], kernel0)

    # g is an nnx.Param, so an optimizer over nnx.Param trains it (and v)
    opt = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)
    opt.update(layer, grads)
    np.testing.assert_allclose(layer.scales[("kernel",)][...], g0 - 0.1 * gg, rtol=1e-5)
    np.testing.assert_allclose(layer.layer_instance.kernel[...], kernel0 - 0.1 * gv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("feature_axes", [-1, (0, 2), (), None, (0, 1, 2)])
@pytest.mark.parametrize("use_scale", [True, False])
def test_nnx_weight_norm_feature_axes_against_float64(feature_axes, use_scale):
    conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))  # kernel (3, 3, 3, 4); axes (0, 2) -> g (3, 3)
    v = conv.kernel[...]
    layer = bnjax.nnx.WeightNorm(
        conv, feature_axes=feature_axes, use_scale=use_scale, scale_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(1)
    )
    axes = () if feature_axes is None else tuple(sorted(a % 4 for a in np.atleast_1d(feature_axes)))
    g = layer.scales[("kernel",)][...] if use_scale else None
    assert (g.shape if use_scale else None) == ((tuple(v.shape[a] for a in axes)) if use_scale else None)
    assert len(layer.scales) == int(use_scale)
    expected = _conv(X4, _np_weight_norm(v, g, axes).astype(np.float32)) + conv.bias[...][None, None, None]
    np.testing.assert_allclose(layer(X4), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("scale_init", [None, nnx.initializers.ones, nnx.initializers.constant(0.5)])
def test_nnx_weight_norm_agrees_with_flax(scale_init):
    # Flax's wrapper writes w into its layer, so it gets its own copy of the same layer
    ours_dense, theirs_dense = nnx.Linear(6, 4, rngs=nnx.Rngs(0)), nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    extra = {} if scale_init is None else {"scale_init": scale_init}
    ours = bnjax.nnx.WeightNorm(ours_dense, rngs=nnx.Rngs(1), **extra)
    theirs = nnx.WeightNorm(theirs_dense, rngs=nnx.Rngs(1), scale_init=scale_init or nnx.initializers.ones)
    if scale_init is None:  # bnjax's g = ||v||: the wrapped layer's output unchanged; set Flax's to it
        theirs.scales[("kernel",)] = ours.scales[("kernel",)][...]
    np.testing.assert_allclose(ours(X2), theirs(X2), rtol=1e-6, atol=1e-6)


def test_nnx_weight_wrappers_keep_inner_state_and_shared_layers():
    # a BatchNorm inside the wrapped layer updates its statistics (momentum 0.99) in the layer itself, and a
    # layer shared with the parent sees the normalized weight only during the wrapper's call
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.seq = nnx.Sequential(nnx.Linear(6, 4, rngs=rngs), bnjax.nnx.BatchNorm(4, rngs=rngs))
            self.norm = bnjax.nnx.SpectralNorm(self.seq, rngs=rngs)

    model = Model(nnx.Rngs(0))
    kernel0 = model.seq.layers[0].kernel[...]
    u0 = model.norm.batch_stats[("layers", 0, "kernel", "u")][...]
    assert set(model.norm.batch_stats) == {("layers", 0, "kernel", "u"), ("layers", 0, "kernel", "sigma")}
    y = nnx.jit(lambda m, x: m.norm(x))(model, X2)
    w_sn, _, sigma = weights.spectral_norm(kernel0, u0.reshape(-1), sigma_from="v", return_sigma=True, keep_u=False)
    h = X2 @ w_sn + model.seq.layers[0].bias[...][None]
    np.testing.assert_allclose(model.seq.layers[1].mean[...], 0.01 * h.mean(0), rtol=1e-5, atol=1e-6)
    h64 = np.asarray(h, np.float64)
    expected = (h64 - h64.mean(0, keepdims=True)) / np.sqrt(h64.var(0, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.norm.batch_stats[("layers", 0, "kernel", "sigma")][...], sigma, rtol=1e-6)
    np.testing.assert_array_equal(model.seq.layers[0].kernel[...], kernel0)

    class Boom(Exception):
        pass

    class Failing(nnx.Module):
        def __init__(self):
            self.kernel = nnx.Param(jnp.asarray(kernel0))

        def __call__(self, x):
            raise Boom

    failing = Failing()
    with pytest.raises(Boom):
        bnjax.nnx.WeightNorm(failing)(X2)
    np.testing.assert_array_equal(failing.kernel[...], kernel0)  # restored on the way out


def test_nnx_standardized_conv_cosine_and_spectral_norm():
    conv = bnjax.nnx.StandardizedConv(3, 5, (3, 3), rngs=nnx.Rngs(0))
    inner = conv.layer_instance
    expected = _conv(X4, weights.weight_standardize(inner.kernel[...])) + inner.bias[...][None, None, None]
    np.testing.assert_allclose(conv(X4), expected, rtol=1e-5, atol=1e-5)

    dense = bnjax.nnx.CosineDense(6, 3, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(dense(X2), weights.cosine_norm(X2, dense.kernel[...]))

    cconv = bnjax.nnx.CosineConv(X4.shape[-1], 4, (3, 3), strides=2, rngs=nnx.Rngs(4))
    y = cconv(X4)
    np.testing.assert_array_equal(y, weights.cosine_norm_conv(X4, cconv.kernel[...], strides=2))
    assert y.shape == (X4.shape[0], 4, 4, 4) and float(jnp.max(jnp.abs(y))) <= 1.0
    grads = nnx.grad(lambda m: jnp.sum(m(X4) ** 2))(cconv)
    assert float(jnp.abs(grads.kernel[...]).sum()) > 0

    sn = bnjax.nnx.SpectralNorm(nnx.Linear(6, 4, rngs=nnx.Rngs(2)), rngs=nnx.Rngs(3))
    u_path = ("kernel", "u")
    for _ in range(30):
        sn(X2)
    w_sn, _ = weights.spectral_norm(sn.layer_instance.kernel[...], sn.batch_stats[u_path][...][0], training=False)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(w_sn), compute_uv=False)[0], 1.0, rtol=1e-4)
    sn.eval()
    u = sn.batch_stats[u_path][...]
    sn(X2)
    np.testing.assert_array_equal(sn.batch_stats[u_path][...], u)
    sn(X2, update_stats=True)  # the call's update_stats overrides the mode
    assert not np.array_equal(sn.batch_stats[u_path][...], u)
    sn.train()
    u = sn.batch_stats[u_path][...]
    sn(X2, update_stats=False)
    np.testing.assert_array_equal(sn.batch_stats[u_path][...], u)


@pytest.mark.parametrize("update_stats", [True, False])
def test_nnx_spectral_norm_agrees_with_flax(update_stats):
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 5))
    outs = []
    for cls in (bnjax.nnx.SpectralNorm, nnx.SpectralNorm):
        conv = nnx.Conv(2, 5, (3, 3), rngs=nnx.Rngs(0))
        conv.kernel[...] = kernel
        outs.append((cls(conv, n_steps=3, update_stats=update_stats, rngs=nnx.Rngs(7)), conv))
    (ours, _), (theirs, _) = outs
    for key in theirs.batch_stats:
        ours.batch_stats[key][...] = theirs.batch_stats[key][...]
    x = X4[..., :2]
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    for key in theirs.batch_stats:
        np.testing.assert_allclose(ours.batch_stats[key][...], theirs.batch_stats[key][...], rtol=1e-5, atol=1e-6)


def test_nnx_weight_wrappers_hostile_input():
    dense = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="needs rngs"):
        bnjax.nnx.WeightNorm(dense, scale_init=nnx.initializers.ones)
    with pytest.raises(ValueError, match="out of range"):
        bnjax.nnx.WeightNorm(dense, feature_axes=2)
    with pytest.raises(ValueError, match="alias"):
        bnjax.nnx.WeightNorm(dense, feature_axes=0, feature_axis=1)
    with pytest.raises(ValueError, match=r"eps"):
        bnjax.nnx.WeightNorm(dense, epsilon=-1.0)(X2)
    conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Layer instance parameter is 4D but error_on_non_matrix is True"):
        bnjax.nnx.SpectralNorm(conv, error_on_non_matrix=True, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="update_stats"):
        bnjax.nnx.SpectralNorm(dense, rngs=nnx.Rngs(0))(X2, update_stats=jnp.array(True))
    sn = bnjax.nnx.SpectralNorm(dense, rngs=nnx.Rngs(0))
    sn.batch_stats[("kernel", "u")].set_value(jnp.ones((1, 5)))  # a checkpoint of another layer
    with pytest.raises(ValueError, match=r"has shape \(1, 5\) but the parameter 'kernel' \(6, 4\) needs \(1, 4\)"):
        sn(X2)
    # a filter that selects nothing: no g, the layer unchanged
    none = bnjax.nnx.WeightNorm(dense, variable_filter=nnx.PathContains("nothing"))
    assert len(none.scales) == 0
    np.testing.assert_array_equal(none(X2), dense(X2))


@pytest.mark.parametrize("kind", ["WeightNorm", "SpectralNorm"])
@pytest.mark.parametrize("boxed", [False, True])
def test_flax_checkpoint_loads_unchanged_into_bnjax_wrapper(kind, boxed):
    # Flax's variables (names, shapes, dtypes) must be bnjax's, and give the same output
    init = nn.initializers.lecun_normal()
    kernel_init = nn.with_partitioning(init, (None, "model")) if boxed else init

    class Model(nn.Module):
        wrap: type

        @nn.compact
        def __call__(self, x, update_stats=False):
            extra = (
                {"scale_init": nn.initializers.ones}
                if kind == "WeightNorm" and self.wrap is bnjax.linen.WeightNorm
                else {}
            )
            call = {"update_stats": update_stats} if kind == "SpectralNorm" else {}
            h = self.wrap(nn.Dense(5, kernel_init=kernel_init), **extra)(x, **call)
            return self.wrap(nn.Dense(3), **extra)(nn.relu(h), **call)

    x = jax.random.normal(jax.random.key(3), (4, 6))
    theirs, ours = Model(getattr(nn, kind)), Model(getattr(bnjax.linen, kind))
    if kind == "SpectralNorm" and boxed:  # Flax's SpectralNorm fails on a boxed kernel; bnjax's has its u
        stats = ours.init(jax.random.key(0), x)["batch_stats"]
        assert stats["SpectralNorm_0"]["Dense_0/kernel/value/u"].shape == (1, 5), jax.tree.map(jnp.shape, stats)
        return
    v_theirs = theirs.init(jax.random.key(0), x)
    v_ours = ours.init(jax.random.key(0), x)
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_theirs)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), v_ours) == jax.tree.map(lambda a: (a.shape, a.dtype), v_theirs)
    if kind == "SpectralNorm":
        y_t, u_t = theirs.apply(v_theirs, x, update_stats=True, mutable=["batch_stats"])
        y_o, u_o = ours.apply(v_theirs, x, update_stats=True, mutable=["batch_stats"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), u_o, u_t)
    else:
        y_t, y_o = theirs.apply(v_theirs, x), ours.apply(v_theirs, x)
    np.testing.assert_allclose(y_o, y_t, rtol=1e-5, atol=1e-6)
