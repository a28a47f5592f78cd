"""Per-example methods with the normalized axis split across devices (``axis_name``).

Layer and RMS norm with the hidden axis sharded over a ``shard_map`` mesh axis (tensor
parallelism), and group/instance norm with the spatial axes sharded (spatial parallelism): the
output and every gradient must equal the unsharded computation on the whole row, and the float64
reference. Runs on the 8 forced CPU devices of conftest.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import bnjax
from tests import reference as ref

D = 4  # devices sharing one row


def _mesh():
    return Mesh(np.array(jax.devices()[:D]), ("t",))


def _rows(n=3, t=5, h=16, seed=0):
    """Rows of x (n, t, h): ordinary ones, a constant row and rows with |mean|/std = 1e4."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, t, h))
    x[0, 1] = 2.5  # constant row: exactly b after normalization
    x[1, 2] = 1e4 + rng.standard_normal(h)
    x[2, 3] = -3e4 + 3.0 * rng.standard_normal(h)
    w = rng.standard_normal((n, t, h))
    p = bnjax.NormParams(
        jnp.asarray(rng.uniform(0.5, 1.5, h), jnp.float32), jnp.asarray(rng.standard_normal(h), jnp.float32)
    )
    return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), p


METHODS = {
    "layer_norm": (lambda x, p, **kw: bnjax.layer_norm(x, p, eps=1e-5, **kw), ref.layer_norm),
    "rms_norm": (
        lambda x, p, **kw: bnjax.rms_norm(x, p, eps=1e-5, **kw),
        lambda x, s, b: ref.rms_norm(x, s, b, eps=1e-5),
    ),
}


def _sharded_hidden(fn, x, w, p, fused):
    mesh = _mesh()

    def per_shard(x, w, scale, bias):
        y = fn(x, bnjax.NormParams(scale, bias), axis_name="t", fused_backward=fused)
        return jax.lax.psum(jnp.sum(w * y), "t"), y

    def loss(x, scale, bias):
        spec = P(None, None, "t")
        return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, spec, P("t"), P("t")), out_specs=(P(), spec))(
            x, w, scale, bias
        )

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, p.scale, p.bias)


def _unsharded(fn, x, w, p):
    def loss(x, scale, bias):
        y = fn(x, bnjax.NormParams(scale, bias))
        return jnp.sum(w * y), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, p.scale, p.bias)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_hidden_axis_sharded_equals_the_whole_row(method, fused):
    fn, reference = METHODS[method]
    x, w, p = _rows()
    (_, y), grads = _sharded_hidden(fn, x, w, p, fused)
    (_, y_full), grads_full = _unsharded(fn, x, w, p)
    np.testing.assert_allclose(y, y_full, rtol=2e-5, atol=2e-5)
    for g, g_full in zip(grads, grads_full, strict=True):
        np.testing.assert_allclose(g, g_full, rtol=1e-4, atol=1e-4)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(y, reference(x64, p.scale, p.bias), rtol=1e-4, atol=1e-4)
    if method == "layer_norm":  # the constant row is exactly b, and its gradient is exactly 0
        np.testing.assert_array_equal(y[0, 1], p.bias)
    # the gradient of x, against float64 central differences of the reference along a direction
    v = np.random.default_rng(7).standard_normal(x.shape)
    h = 1e-6
    w64 = np.asarray(w, np.float64)

    def f(z):
        return float(np.sum(w64 * reference(z, np.asarray(p.scale, np.float64), np.asarray(p.bias, np.float64))))

    numeric = (f(x64 + h * v) - f(x64 - h * v)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(grads[0], v)), numeric, rtol=2e-3)


def test_hidden_axis_sharded_statistics_are_merged_stably():
    # a shard-local shift would lose the row's variance at |mean|/std = 1e4 in float32 sums of x²
    x, w, p = _rows(seed=3)
    (_, y), _ = _sharded_hidden(METHODS["layer_norm"][0], x, w, p, True)
    row = np.asarray(x[1, 2], np.float64)
    expected = (row - row.mean()) / np.sqrt(row.var() + 1e-5) * np.asarray(p.scale) + np.asarray(p.bias)
    np.testing.assert_allclose(y[1, 2], expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("method", ["group_norm", "instance_norm"])
def test_spatial_axis_sharded_equals_unsharded(method):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 3, 6)) * 2 + 1, jnp.float32)  # (N, H, W, C), H sharded
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    p = bnjax.NormParams(jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32), jnp.zeros(6, jnp.float32))
    kw = {"num_groups": 3} if method == "group_norm" else {}
    fn = getattr(bnjax, method)

    def per_shard(x, w, scale, bias):
        y = fn(x, bnjax.NormParams(scale, bias), axis_name="t", **kw)
        return jax.lax.psum(jnp.sum(w * y), "t"), y

    def sharded(x, scale, bias):
        spec = P(None, "t")
        return jax.shard_map(per_shard, mesh=_mesh(), in_specs=(spec, spec, P(), P()), out_specs=(P(), spec))(
            x, w, scale, bias
        )

    def whole(x, scale, bias):
        y = fn(x, bnjax.NormParams(scale, bias), **kw)
        return jnp.sum(w * y), y

    (_, y), g = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2), has_aux=True))(x, p.scale, p.bias)
    (_, y_full), g_full = jax.value_and_grad(whole, argnums=(0, 1, 2), has_aux=True)(x, p.scale, p.bias)
    np.testing.assert_allclose(y, y_full, rtol=2e-5, atol=2e-5)
    for a, b in zip(g, g_full, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_device_groups_each_hold_a_row():
    # 8 devices, two groups of 4: each group normalizes its own rows; equal to two separate runs
    x, _, p = _rows(seed=5)
    xs = jnp.stack([x, 3.0 * x + 1.0])  # (group, n, t, h): a different problem per group
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("g", "t"))
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def per_shard(x, scale, bias):
        y = bnjax.layer_norm(x[0], bnjax.NormParams(scale, bias), axis_name=("g", "t"), axis_index_groups=groups)
        return y[None]

    spec = P("g", None, None, "t")
    y = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, P("t"), P("t")), out_specs=spec))(xs, *p)
    for i in range(2):
        np.testing.assert_allclose(y[i], bnjax.layer_norm(xs[i], p), rtol=2e-5, atol=2e-5)


def test_group_norm_reduction_axes_against_float64():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 5, 6)) * 3 + 2
    p = bnjax.NormParams(
        jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32), jnp.asarray(rng.standard_normal(6), jnp.float32)
    )
    y = bnjax.group_norm(jnp.asarray(x, jnp.float32), p, num_groups=3, reduction_axes=(2,))
    # statistics per (example, row, group): over the columns and the 2 channels of each group
    xg = x.reshape(2, 4, 5, 3, 2)
    mean = xg.mean(axis=(2, 4), keepdims=True)
    var = xg.var(axis=(2, 4), keepdims=True)
    expected = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * np.asarray(p.scale) + np.asarray(p.bias)
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)
    # the Flax default (every axis after the batch) is the plain group norm
    np.testing.assert_allclose(
        bnjax.group_norm(jnp.asarray(x, jnp.float32), p, num_groups=3, reduction_axes=(1, 2)),
        bnjax.group_norm(jnp.asarray(x, jnp.float32), p, num_groups=3),
        rtol=1e-6,
        atol=1e-6,
    )


def test_instance_norm_channel_axes_tuple_against_float64():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 5)) * 2 - 1  # channels on axes (1, 3), spatial axis 2
    scale = rng.uniform(0.5, 1.5, (3, 5))
    p = bnjax.NormParams(jnp.asarray(scale, jnp.float32), None)
    y = bnjax.instance_norm(jnp.asarray(x, jnp.float32), p, axis=(1, 3))
    mean, var = x.mean(2, keepdims=True), x.var(2, keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-5) * scale[:, None, :]
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, p: bnjax.group_norm(x, p, num_groups=2, reduction_axes=(3,)), "reduction_axes"),
        (lambda x, p: bnjax.group_norm(x, p, num_groups=2, reduction_axes=(7,)), "reduction_axes"),
        (lambda x, p: bnjax.instance_norm(x, p, axis=(0, 3)), "leading dimension"),
        (lambda x, p: bnjax.layer_norm(x, None, axis_name="nope"), "nope"),
        (lambda x, p: bnjax.rms_norm(x, None, axis_name="nope"), "nope"),
        (lambda x, p: bnjax.group_norm(x, p, num_groups=2, axis_name="nope"), "nope"),
        (lambda x, p: bnjax.instance_norm(x, p, axis_name="nope"), "nope"),
    ],
)
def test_bad_reduction_axes_and_unbound_axis_names(call, match):
    x = jnp.ones((2, 3, 4, 6))
    p = bnjax.init_params(6)
    with pytest.raises((ValueError, NameError), match=match):
        call(x, p)
