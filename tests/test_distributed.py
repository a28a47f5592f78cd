"""Cross-device batch statistics (sync batch norm) against the full-batch result.

Runs on 8 forced CPU devices (conftest.py); fails, never skips, if they are missing.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from tests import reference as ref

D = 8
C = 5


def test_eight_devices_present():
    assert jax.device_count() == D, "conftest.py must force 8 CPU devices before jax is imported"


def _problem(local=6, seed=0, masked=False, loc=3.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((D, local, 2, C)) * 2.0 + loc).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)  # fixed cotangent: L = Σ w·y
    mask = None
    if masked:
        counts = rng.integers(0, local + 1, D)
        counts[2] = 0  # one device holds no valid example
        counts[5] = local
        mask = (np.arange(local)[None, :] < counts[:, None])[:, :, None, None]
    params = bnjax.NormParams(
        jnp.asarray(rng.uniform(0.5, 1.5, C), jnp.float32), jnp.asarray(rng.standard_normal(C), jnp.float32)
    )
    stats = bnjax.init_stats(C)._replace(mean=jnp.full(C, 0.5), var=jnp.full(C, 2.0), count=jnp.array(3, jnp.int32))
    return x, w, mask, params, stats


def _full_batch(x, w, mask, params, stats):
    """The single-device result on the whole batch (reshape devices into the batch axis)."""
    xf = x.reshape((-1,) + x.shape[2:])
    wf = w.reshape(xf.shape)
    mf = None if mask is None else mask.reshape((-1,) + mask.shape[2:])

    def loss(x, params):
        y, new = bnjax.batch_norm(x, params, stats, training=True, mask=mf)
        return jnp.sum(jnp.where(True if mf is None else mf, wf * y, 0.0)), (y, new)

    (_, (y, new)), (gx, gp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(xf, params)
    return y.reshape(x.shape), new, gx.reshape(x.shape), gp


def _float64(x, w, mask, params):
    """Global float64 NumPy reference: y, batch mean/var, dx, (dscale, dbias) for L = Σ w·y (valid)."""
    xf = x.reshape((-1,) + x.shape[2:])
    mf = None if mask is None else mask.reshape((-1,) + mask.shape[2:])
    dy = w.reshape(xf.shape).astype(np.float64)
    if mf is not None:
        dy = np.where(np.broadcast_to(mf, xf.shape), dy, 0.0)
    y, mean, var, _ = ref.batch_norm_train(xf, params.scale, params.bias, mask=mf)
    dx, dscale, dbias = ref.batch_norm_train_vjp(xf, params.scale, dy, mask=mf)
    return y.reshape(x.shape), mean, var, dx.reshape(x.shape), (dscale, dbias)


def _local_loss(x, w, mask, params, stats, axis_name, **kw):
    y, new = bnjax.batch_norm(x, params, stats, training=True, mask=mask, axis_name=axis_name, **kw)
    return jnp.sum(jnp.where(True if mask is None else mask, w * y, 0.0)), (y, new)


def _check(y, new, gx, gp, expected, mask, f64=None):
    """Against the single-device full-batch run (tight) and, given f64, the float64 reference."""
    y_ref, new_ref, gx_ref, gp_ref = expected
    valid = np.ones(y.shape, bool) if mask is None else np.broadcast_to(mask, y.shape)
    if f64 is not None:
        y64, mean64, var64, gx64, gp64 = f64
        decay = 3 / 4  # _problem's stats: count 3, mean 0.5, var 2.0 -> decay min(0.9, 3/4)
        np.testing.assert_allclose(new.mean, decay * 0.5 + (1 - decay) * mean64, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new.var, decay * 2.0 + (1 - decay) * var64, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(y)[valid], y64[valid], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gx, gx64, rtol=1e-4, atol=1e-5)
        for a, b in zip(gp, gp64, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y_ref)[valid], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(y)).all()
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(gp, gp_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(new, new_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_pmap(masked):
    x, w, mask, params, stats = _problem(masked=masked)
    expected = _full_batch(x, w, mask, params, stats)

    @partial(jax.pmap, axis_name="d", in_axes=(0, 0, 0 if masked else None, None, None))
    def step(x, w, mask, params, stats):
        grad = jax.grad(_local_loss, argnums=(0, 3), has_aux=True)
        (gx, gp), (y, new) = grad(x, w, mask, params, stats, "d")
        return y, new, gx, jax.lax.psum(gp, "d")

    y, new, gx, gp = step(x, w, mask, params, stats)
    new, gp = jax.tree.map(lambda a: a[0], (new, gp))
    _check(y, new, gx, gp, expected, mask, _float64(x, w, mask, params))


@pytest.mark.parametrize("masked", [False, True])
def test_vmap_axis_name(masked):
    x, w, mask, params, stats = _problem(masked=masked, seed=1)
    expected = _full_batch(x, w, mask, params, stats)

    def total(x, params):
        f = jax.vmap(
            lambda x, w, m: _local_loss(x, w, m, params, stats, "b"),
            in_axes=(0, 0, 0 if masked else None),
            axis_name="b",
            out_axes=(0, (0, None)),
        )
        losses, (y, new) = f(x, w, mask)
        return jnp.sum(losses), (y, new)

    (gx, gp), (y, new) = jax.grad(total, argnums=(0, 1), has_aux=True)(x, params)
    _check(y, new, gx, gp, expected, mask, _float64(x, w, mask, params))


def test_shard_map_with_default_check_vma():
    x, w, mask, params, stats = _problem(masked=True, seed=2)
    expected = _full_batch(x, w, mask, params, stats)
    mesh = Mesh(np.array(jax.devices()), ("d",))

    def total(x, params):
        def per_shard(x, w, mask):
            loss, (y, new) = _local_loss(x[0], w[0], mask[0], params, stats, "d")
            return jax.lax.psum(loss, "d"), y[None], new

        loss, y, new = jax.shard_map(
            per_shard, mesh=mesh, in_specs=(P("d"), P("d"), P("d")), out_specs=(P(), P("d"), P())
        )(x, w, mask)
        return loss, (y, new)

    (gx, gp), (y, new) = jax.jit(jax.grad(total, argnums=(0, 1), has_aux=True))(x, params)
    _check(y, new, gx, gp, expected, mask, _float64(x, w, mask, params))


def test_nested_axis_names_tuple():
    """Statistics over two mapped axes at once: pmap over 4 devices × vmap over 2."""
    x, w, mask, params, stats = _problem(masked=True, seed=3)
    expected = _full_batch(x, w, mask, params, stats)
    xs, ws, ms = (a.reshape((4, 2) + a.shape[1:]) for a in (x, w, mask))

    def inner(x, w, m):
        grad = jax.grad(_local_loss, argnums=(0, 3), has_aux=True)
        (gx, gp), (y, new) = grad(x, w, m, params, stats, ("p", "v"))
        return y, new, gx, jax.lax.psum(gp, ("p", "v"))

    f = jax.pmap(jax.vmap(inner, axis_name="v"), axis_name="p", devices=jax.devices()[:4])
    y, new, gx, gp = f(xs, ws, ms)
    new, gp = jax.tree.map(lambda a: a[0, 0], (new, gp))
    _check(y.reshape(x.shape), new, gx.reshape(x.shape), gp, expected, mask, _float64(x, w, mask, params))


def test_jit_over_sharded_batch_without_axis_name():
    x, w, mask, params, stats = _problem(masked=True, seed=4)
    expected = _full_batch(x, w, mask, params, stats)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    sharding = NamedSharding(mesh, P("d"))
    xf, wf, mf = (jax.device_put(a.reshape((-1,) + a.shape[2:]), sharding) for a in (x, w, mask))

    def loss(x, params):
        y, new = bnjax.batch_norm(x, params, stats, training=True, mask=mf)
        return jnp.sum(jnp.where(mf, wf * y, 0.0)), (y, new)

    (gx, gp), (y, new) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(xf, params)
    assert y.sharding.is_equivalent_to(sharding, y.ndim)
    _check(y.reshape(x.shape), new, gx.reshape(x.shape), gp, expected, mask, _float64(x, w, mask, params))


def test_all_devices_empty_leaves_state_unchanged():
    x, _, _, params, stats = _problem()
    mask = np.zeros((D, 6, 1, 1), bool)
    y, new = jax.pmap(
        lambda x, m: bnjax.batch_norm(x, params, stats, training=True, mask=m, axis_name="d"), axis_name="d"
    )(x, mask)
    assert np.isfinite(np.asarray(y)).all()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0], b), new, stats)


def test_stability_across_devices_at_large_mean():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((D, 512, 4)) + 1e4).astype(np.float32)
    mean, var = jax.pmap(lambda x: bnjax.moments(x, 0, axis_name="d"), axis_name="d")(x)
    exact = x.reshape(-1, 4).astype(np.float64).var(0)
    assert np.max(np.abs(np.asarray(var[0], np.float64) / exact - 1)) <= 1e-5
    # replicated: bit-identical on every device
    np.testing.assert_array_equal(var, np.broadcast_to(var[0], var.shape))
    np.testing.assert_array_equal(mean, np.broadcast_to(mean[0], mean.shape))


@pytest.mark.parametrize(
    "groups", [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 5], [1, 2, 3, 4, 6, 7]], [[i] for i in range(8)]]
)
def test_device_groups(groups):
    """Statistics over each device's group only, checked against each group's full batch."""
    x, w, mask, params, stats = _problem(masked=True, seed=5)
    mask[:, 0] = True  # every device holds at least one valid example
    for transform in ("pmap", "shard_map"):
        if transform == "pmap":

            @partial(jax.pmap, axis_name="d")
            def step(x, w, mask):
                grad = jax.grad(_local_loss, argnums=0, has_aux=True)
                return grad(x, w, mask, params, stats, "d", axis_index_groups=groups)

        else:
            mesh = Mesh(np.array(jax.devices()), ("d",))

            def per_shard(x, w, mask):
                grad = jax.grad(_local_loss, argnums=0, has_aux=True)
                gx, (y, new) = grad(x[0], w[0], mask[0], params, stats, "d", axis_index_groups=groups)
                return gx[None], (y[None], jax.tree.map(lambda leaf: leaf[None], new))

            step = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
        gx, (y, new) = step(x, w, mask)
        for g in groups:
            y_ref, new_ref, gx_ref, _ = _full_batch(x[g], w[g], mask[g], params, stats)
            for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new_ref), strict=True):
                a = np.asarray(a)[np.array(g)]
                np.testing.assert_array_equal(a, np.broadcast_to(a[0], a.shape))  # replicated in the group
                np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6)
            valid = np.broadcast_to(mask[g], y_ref.shape)
            np.testing.assert_allclose(
                np.asarray(y)[np.array(g)][valid], np.asarray(y_ref)[valid], rtol=1e-5, atol=1e-5
            )
            np.testing.assert_allclose(np.asarray(gx)[np.array(g)], gx_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "groups,match",
    [
        ([[0, 1, 2], [4, 5, 6, 7]], r"missing: \[3\]"),
        ([[0, 1, 2, 3], [3, 4, 5, 6, 7]], r"repeated: \[3\]"),
        ([[0, 1, 2, 3, 4, 5, 6, 7, 8]], r"out of range: \[8\]"),
        ([[0, 1, 2, 3, 4, 5, 6, 7], []], r"non-empty groups"),
    ],
)
def test_device_groups_must_partition_the_axis(groups, match):
    x, _, _, params, stats = _problem()
    with pytest.raises(ValueError, match=r"axis_index_groups=.* must partition the 8 participants.*" + match):
        jax.pmap(
            lambda x: bnjax.batch_norm(x, params, stats, training=True, axis_name="d", axis_index_groups=groups),
            axis_name="d",
        )(x)


def test_device_groups_need_axis_name():
    with pytest.raises(ValueError, match="axis_index_groups needs axis_name"):
        bnjax.moments(jnp.ones((4, 3)), 0, axis_index_groups=[[0]])


def test_shard_map_two_dimensional_mesh_tuple_axis_name():
    x, w, mask, params, stats = _problem(masked=True, seed=6)
    expected = _full_batch(x, w, mask, params, stats)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    spec = P(("a", "b"))

    def per_shard(x, w, mask):
        grad = jax.grad(_local_loss, argnums=0, has_aux=True)
        gx, (y, new) = grad(x[0], w[0], mask[0], params, stats, ("a", "b"))
        return gx[None], y[None], new

    gx, y, new = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=spec, out_specs=(spec, spec, P())))(x, w, mask)
    _check(y, new, gx, expected[3], expected, mask, _float64(x, w, mask, params))


def test_vmap_inside_shard_map():
    """Statistics over a mesh axis and a vmap axis at once (needs check_vma=False in jax 0.10)."""
    x, w, mask, params, stats = _problem(masked=True, seed=7)
    expected = _full_batch(x, w, mask, params, stats)
    xs, ws, ms = (a.reshape((4, 2) + a.shape[1:]) for a in (x, w, mask))
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))

    def per_shard(x, w, m):
        grad = jax.grad(_local_loss, argnums=0, has_aux=True)
        per_example = jax.vmap(
            lambda x, w, m: grad(x, w, m, params, stats, ("d", "v")), axis_name="v", out_axes=(0, (0, None))
        )
        gx, (y, new) = per_example(x[0], w[0], m[0])
        return gx[None], y[None], new

    def run(check_vma):
        f = jax.shard_map(per_shard, mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P("d"), P()), check_vma=check_vma)
        return jax.jit(f)(xs, ws, ms)

    gx, y, new = run(check_vma=False)
    _check(y.reshape(x.shape), new, gx.reshape(x.shape), expected[3], expected, mask, _float64(x, w, mask, params))
    with pytest.raises(ValueError, match=r"vmap axis inside jax.shard_map fail when check_vma=True.*check_vma=False"):
        run(check_vma=True)


def test_vmap_axis_alone_inside_shard_map_explains_the_jax_limitation():
    mesh = Mesh(np.array(jax.devices()), ("d",))

    def per_shard(x):
        return jax.vmap(lambda xi: bnjax.moments(xi, 0, axis_name="v")[1], axis_name="v", out_axes=None)(x)

    with pytest.raises(ValueError, match=r"axis_name='v'.*check_vma=False"):
        jax.shard_map(per_shard, mesh=mesh, in_specs=P("d"), out_specs=P())(jnp.ones((16, 2, 3)))
