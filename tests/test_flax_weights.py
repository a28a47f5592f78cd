"""Flax shells of the weight-side methods: equal to the functional API, never overwriting the
wrapped kernel, trainable, and working under jit/grad."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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


def test_nnx_weight_norm_keeps_the_kernel_and_trains_under_jit():
    dense = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    kernel0 = dense.kernel[...]
    layer = bnjax.nnx.WeightNorm(dense)
    np.testing.assert_allclose(layer(X2), X2 @ kernel0 + dense.bias[...][None], rtol=1e-5, atol=1e-6)

    @nnx.jit
    def step(layer, x):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
        return grads

    grads = step(layer, X2)
    assert float(jnp.abs(grads.scale[...]).sum()) > 0
    assert float(jnp.abs(grads.layer.kernel[...]).sum()) > 0
    np.testing.assert_array_equal(layer.layer.kernel[...], kernel0)  # never overwritten


def test_nnx_standardized_conv_cosine_and_spectral_norm():
    conv = bnjax.nnx.StandardizedConv(3, 5, (3, 3), rngs=nnx.Rngs(0))
    expected = _conv(X4, weights.weight_standardize(conv.layer.kernel[...])) + conv.layer.bias[...][None, None, None]
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
    for _ in range(30):
        sn(X2)
    w_sn, _ = weights.spectral_norm(sn.layer.kernel[...], sn.u[...], training=False)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(w_sn), compute_uv=False)[0], 1.0, rtol=1e-4)
    sn.eval()
    u = sn.u[...]
    sn(X2)
    np.testing.assert_array_equal(sn.u[...], u)


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
