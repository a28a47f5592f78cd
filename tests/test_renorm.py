"""Batch renormalization (Ioffe 2017): float64 reference, the reduction to batch norm at
r_max = 1, d_max = 0 (bit for bit), gradients with r and d held constant, traced bounds, and sync
statistics across devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import bnjax
from tests import reference as ref
from tests.helpers import close, data

C = 4


def _state(mean=1.0, var=4.0):
    st = bnjax.init_stats(C)
    return st._replace(mean=jnp.full(C, mean), var=jnp.full(C, var), count=jnp.asarray(10, jnp.int32))


def _params():
    return bnjax.NormParams(jnp.linspace(0.5, 1.5, C), jnp.linspace(-1.0, 1.0, C))


def _np_renorm(x, p, st, r_max, d_max, eps=1e-5):
    x = ref.f64(x).reshape(-1, C)
    mu_b, var_b = x.mean(0), x.var(0)
    sigma_b, sigma = np.sqrt(var_b + eps), np.sqrt(ref.f64(st.var) + eps)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu_b - ref.f64(st.mean)) / sigma, -d_max, d_max)
    y = ref.f64(p.scale) * ((x - mu_b) / sigma_b * r + d) + ref.f64(p.bias)
    return y, r, d


@pytest.mark.parametrize("r_max,d_max", [(1.5, 0.25), (100.0, 100.0), (3.0, 5.0)])
def test_batch_renorm_against_float64(r_max, d_max):
    x, _ = data((6, 5, C), seed=1, loc=3.0, scale=1.0)
    p, st = _params(), _state()
    y, new = bnjax.batch_renorm(x, p, st, training=True, r_max=r_max, d_max=d_max)
    expected, r, d = _np_renorm(x, p, st, r_max, d_max)
    close(y.reshape(-1, C), expected)
    if r_max == 1.5:  # the clipping is active in this case (a test that could pass without it is no test)
        assert np.any(r == 1 / 1.5) and np.any(np.abs(d) == 0.25)
    _, bn_new = bnjax.batch_norm(x, p, st, training=True)
    jax.tree.map(np.testing.assert_array_equal, new, bn_new)  # the running update is batch norm's
    y_eval, same = bnjax.batch_renorm(x, p, new, training=False)
    np.testing.assert_array_equal(y_eval, bnjax.batch_norm(x, p, new, training=False)[0])
    jax.tree.map(np.testing.assert_array_equal, same, new)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_batch_renorm_is_batch_norm_bit_for_bit_at_r_max_1_d_max_0(fused, dtype, masked):
    x, _ = data((6, 5, C), dtype=dtype, seed=2, loc=3.0)
    mask = (jnp.arange(6)[:, None, None] < 4) if masked else None
    p, st = _params(), _state()
    dy = jax.random.normal(jax.random.key(0), x.shape).astype(dtype)

    def run(fn, **kw):
        def loss(x, p):
            y, new = fn(x, p, st, training=True, mask=mask, fused_backward=fused, **kw)
            return jnp.sum((y * dy).astype(jnp.float32)), (y, new)

        (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, p)
        return y, new, grads

    got = run(bnjax.batch_renorm, r_max=1.0, d_max=0.0)
    want = run(bnjax.batch_norm)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_renorm_gradients_hold_r_and_d_constant():
    x, _ = data((8, C), seed=3, loc=2.0)
    p, st = _params(), _state()
    _, r, d = _np_renorm(x, p, st, 1.2, 0.3)
    dy = jax.random.normal(jax.random.key(1), x.shape)
    r32, d32 = jnp.asarray(r, jnp.float32), jnp.asarray(d, jnp.float32)

    def renorm_loss(x, p):
        return jnp.sum(bnjax.batch_renorm(x, p, st, training=True, r_max=1.2, d_max=0.3)[0] * dy)

    def composed(x, p):  # batch norm with the gain g·r and shift g·d + b, r and d given
        q = bnjax.NormParams(p.scale * r32, p.scale * d32 + p.bias)
        return jnp.sum(bnjax.batch_norm(x, q, st, training=True, fused_backward=False)[0] * dy)

    got = jax.grad(renorm_loss, argnums=(0, 1))(x, p)
    want = jax.grad(composed, argnums=(0, 1))(x, p)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_batch_renorm_traced_bounds_and_sync_across_devices():
    x, _ = data((16, 3, C), seed=4, loc=2.0)
    p, st = _params(), _state()
    static = bnjax.batch_renorm(x, p, st, training=True, r_max=1.3, d_max=0.2)
    traced = jax.jit(lambda r, d: bnjax.batch_renorm(x, p, st, training=True, r_max=r, d_max=d))(1.3, 0.2)
    for a, b in zip(jax.tree.leaves(traced), jax.tree.leaves(static), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # a schedule: vmap over the bounds
    ys = jax.vmap(lambda r: bnjax.batch_renorm(x, p, st, training=True, r_max=r, d_max=0.0)[0])(jnp.array([1.0, 3.0]))
    np.testing.assert_array_equal(ys[0], bnjax.batch_norm(x, p, st, training=True)[0])

    mesh = Mesh(np.array(jax.devices()), ("d",))
    dy = jax.random.normal(jax.random.key(2), x.shape)

    def local(x, dy):
        def loss(x, p):
            y, new = bnjax.batch_renorm(x, p, st, training=True, r_max=1.3, d_max=0.2, axis_name="d")
            return jax.lax.psum(jnp.sum(y * dy), "d"), new

        (_, new), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, p)
        return g, new

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=((P("d"), P()), P()))
    (gx, gp), new = jax.jit(sharded)(x, dy)

    def whole(x, p):
        y, new = bnjax.batch_renorm(x, p, st, training=True, r_max=1.3, d_max=0.2)
        return jnp.sum(y * dy), new

    (_, new_w), (gx_w, gp_w) = jax.value_and_grad(whole, argnums=(0, 1), has_aux=True)(x, p)
    for a, b in zip(jax.tree.leaves((gx, gp, new)), jax.tree.leaves((gx_w, gp_w, new_w)), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "kw,err,match",
    [
        ({"r_max": 0.5}, ValueError, "r_max must be >= 1"),
        ({"d_max": -1.0}, ValueError, "d_max must be >= 0"),
        ({"r_max": "3"}, TypeError, "r_max must be a real number"),
        ({"d_max": jnp.ones(C)}, ValueError, "d_max must be a scalar"),
    ],
)
def test_batch_renorm_bad_bounds(kw, err, match):
    x, _ = data((8, C), seed=5)
    with pytest.raises(err, match=match):
        bnjax.batch_renorm(x, _params(), _state(), training=True, **kw)


def test_batch_renorm_shells_follow_the_functional_api_and_take_scheduled_bounds():
    from flax import nnx

    import bnjax.linen
    import bnjax.nnx

    x, _ = data((8, C), seed=6, loc=2.0)
    layer = bnjax.linen.BatchRenorm(use_running_average=False, momentum=0.9)
    v = layer.init(jax.random.key(0), x)
    v = {"params": v["params"], "batch_stats": {"mean": jnp.full(C, 1.0), "var": jnp.full(C, 4.0)}}
    step = jax.jit(lambda v, r, d: layer.apply(v, x, r_max=r, d_max=d, mutable=["batch_stats"]))
    y, upd = step(v, 1.2, 0.3)
    st = bnjax.init_stats(C)._replace(mean=jnp.full(C, 1.0), var=jnp.full(C, 4.0))
    p = bnjax.NormParams(v["params"]["scale"], v["params"]["bias"])
    want, new = bnjax.batch_renorm(x, p, st, training=True, r_max=1.2, d_max=0.3, momentum=0.9, debias=False)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], new.mean, rtol=1e-6)
    # at r_max = 1, d_max = 0 the module is BatchNorm, bit for bit (outputs and updates)
    bn = bnjax.linen.BatchNorm(use_running_average=False, momentum=0.9)
    y1, upd1 = step(v, 1.0, 0.0)
    y2, upd2 = jax.jit(lambda v: bn.apply(v, x, mutable=["batch_stats"]))(v)  # both jitted: one XLA
    np.testing.assert_array_equal(y1, y2)
    jax.tree.map(np.testing.assert_array_equal, upd1, upd2)
    # evaluation: the running statistics
    y_eval = layer.clone(use_running_average=True).apply(v, x)
    np.testing.assert_array_equal(y_eval, bn.clone(use_running_average=True).apply(v, x))

    mod = bnjax.nnx.BatchRenorm(C, momentum=0.9, rngs=nnx.Rngs(0))
    mod.mean[...], mod.var[...] = jnp.full(C, 1.0), jnp.full(C, 4.0)
    np.testing.assert_allclose(mod(x, r_max=1.2, d_max=0.3), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mod.mean[...], new.mean, rtol=1e-6)
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        mod(x, r_max=0.9)


def test_the_readme_warm_up_schedule_runs_inside_jit():
    import optax

    import bnjax.linen

    r_sched = optax.linear_schedule(1.0, 3.0, transition_steps=35_000, transition_begin=5_000)
    d_sched = optax.linear_schedule(0.0, 5.0, transition_steps=20_000, transition_begin=5_000)
    layer = bnjax.linen.BatchRenorm(use_running_average=False)
    x, _ = data((8, C), seed=7)
    v = layer.init(jax.random.key(0), x)

    @jax.jit
    def step(v, i):
        return layer.apply(v, x, r_max=r_sched(i), d_max=d_sched(i), mutable=["batch_stats"])

    bn = bnjax.linen.BatchNorm(use_running_average=False)
    y0, _ = step(v, 0)  # before step 5000: r_max = 1, d_max = 0, batch norm
    np.testing.assert_allclose(y0, bn.apply(v, x, mutable=["batch_stats"])[0], rtol=1e-6, atol=1e-6)
    assert float(r_sched(40_000)) == 3.0 and float(d_sched(25_000)) == 5.0
    step(v, 30_000)
