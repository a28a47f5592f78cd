"""Ghost batch norm (``virtual_batch_size``, Hoffer et al. 2017): each consecutive sub-batch
normalized with its own statistics; the running statistics those of the whole batch, pooled
exactly; local sub-batches with global running statistics across devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.linen
from tests import reference as ref
from tests.helpers import close, data

C = 3


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_ghost_batch_norm_against_float64(fused, masked):
    x, x64 = data((12, 2, C), seed=1, loc=2.0)
    mask = (jnp.arange(12) % 5 != 0)[:, None, None] if masked else None
    p, st = bnjax.init_params(C), bnjax.init_stats(C)
    y, new = bnjax.batch_norm(x, p, st, training=True, virtual_batch_size=4, mask=mask, fused_backward=fused)
    m64 = None if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
    for g in range(3):  # each sub-batch of 4 examples with its own statistics
        sl = slice(4 * g, 4 * g + 4)
        expected = ref.batch_norm_train(x64[sl], None, None, mask=None if m64 is None else m64[sl])[0]
        valid = np.ones(expected.shape, bool) if m64 is None else m64[sl]
        close(np.asarray(y[sl])[valid], expected[valid])
    # the running statistics: those of the whole batch (exactly what batch_norm stores)
    _, whole = bnjax.batch_norm(x, p, st, training=True, mask=mask)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # gradients: batch norm of each sub-batch on its own
    dy = jax.random.normal(jax.random.key(0), x.shape)

    def ghost(x):
        y = bnjax.batch_norm(x, p, st, training=True, virtual_batch_size=4, mask=mask, fused_backward=fused)[0]
        return jnp.sum(y * dy)

    def by_hand(x):
        parts = [
            bnjax.batch_norm(
                x[4 * g : 4 * g + 4], p, st, training=True, mask=None if mask is None else mask[4 * g : 4 * g + 4]
            )[0]
            for g in range(3)
        ]
        return jnp.sum(jnp.concatenate(parts) * dy)

    np.testing.assert_allclose(jax.grad(ghost)(x), jax.grad(by_hand)(x), rtol=1e-5, atol=1e-6)


def test_ghost_with_the_whole_batch_is_batch_norm_and_evaluation_ignores_it():
    x, _ = data((8, C), seed=2)
    p, st = bnjax.init_params(C), bnjax.init_stats(C)
    y, new = bnjax.batch_norm(x, p, st, training=True, virtual_batch_size=8)
    y_bn, new_bn = bnjax.batch_norm(x, p, st, training=True)
    np.testing.assert_allclose(y, y_bn, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new, new_bn)
    np.testing.assert_array_equal(
        bnjax.batch_norm(x, p, new, training=False, virtual_batch_size=3)[0],
        bnjax.batch_norm(x, p, new, training=False)[0],
    )


def test_ghost_sub_batches_are_local_running_statistics_global():
    x, _ = data((32, C), seed=3, loc=1.0)
    x = x.at[16:].add(3.0)  # the devices see different data
    p, st = bnjax.init_params(C), bnjax.init_stats(C)
    mesh = Mesh(np.array(jax.devices()), ("d",))  # 8 devices, 4 examples each, sub-batches of 2
    f = jax.shard_map(
        lambda x: bnjax.batch_norm(x, p, st, training=True, virtual_batch_size=2, axis_name="d"),
        mesh=mesh,
        in_specs=P("d"),
        out_specs=(P("d"), P()),
    )
    y, new = jax.jit(f)(x)
    local = jnp.concatenate([bnjax.batch_norm(x[2 * i : 2 * i + 2], p, st, training=True)[0] for i in range(16)])
    np.testing.assert_allclose(y, local, rtol=1e-5, atol=1e-5)
    _, whole = bnjax.batch_norm(x, p, st, training=True)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw,x_shape,err,match",
    [
        ({"virtual_batch_size": 3}, (8, C), ValueError, "does not divide the local batch of 8"),
        ({"virtual_batch_size": 0}, (8, C), ValueError, "virtual_batch_size must be"),
        ({"virtual_batch_size": 2.0}, (8, C), TypeError, "virtual_batch_size must be"),
        ({"virtual_batch_size": 1}, (8, C), ValueError, "single element"),
        ({"virtual_batch_size": 2, "axis": 0}, (8, C), ValueError, "axis 0 is a feature axis"),
    ],
)
def test_ghost_bad_input(kw, x_shape, err, match):
    x = jnp.ones(x_shape).at[0].set(2.0)
    feat = x_shape[kw.get("axis", -1)]
    with pytest.raises(err, match=match):
        bnjax.batch_norm(x, bnjax.init_params(feat), bnjax.init_stats(feat), training=True, **kw)


def test_ghost_batch_norm_shells():
    from flax import nnx

    import bnjax.nnx

    x, _ = data((8, C), seed=4, loc=2.0)
    layer = bnjax.linen.BatchNorm(use_running_average=False, momentum=0.9, virtual_batch_size=4)
    v = layer.init(jax.random.key(0), x[:3])  # init: only shapes matter (3 is not a multiple of 4)
    y, upd = layer.apply(v, x, mutable=["batch_stats"])
    p, st = bnjax.NormParams(v["params"]["scale"], v["params"]["bias"]), bnjax.init_stats(C)
    want, new = bnjax.batch_norm(x, p, st, training=True, momentum=0.9, debias=False, virtual_batch_size=4)
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(upd["batch_stats"]["mean"], new.mean)
    mod = bnjax.nnx.BatchNorm(C, momentum=0.9, virtual_batch_size=4, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(mod(x), want)
    with pytest.raises(ValueError, match="does not divide the local batch of 6"):
        mod(x[:6])
    with pytest.raises(ValueError, match="BatchRenorm does not take virtual_batch_size"):
        bnjax.nnx.BatchRenorm(C, virtual_batch_size=4, rngs=nnx.Rngs(0))(x)
