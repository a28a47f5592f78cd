"""Flax shells: equal to the functional API bit for bit, equal to Flax's own modules with the
parity options, checkpoint-compatible with Flax, and working under Flax's transforms."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax import serialization as ser
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.linen
import bnjax.nnx
from tests.helpers import data

X, _ = data((8, 6, 6, 4), seed=3, loc=2.0)


def _bitwise(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ---------------------------------------------------------------------------------------------
# Shells == functional API, bit for bit


@pytest.mark.parametrize("debias", [False, True])
def test_linen_batch_norm_is_the_functional_call(debias):
    layer = bnjax.linen.BatchNorm(use_running_average=False, momentum=0.9, debias=debias, activation=jax.nn.relu)
    v = layer.init(jax.random.key(0), X)
    assert set(v["batch_stats"]) == ({"mean", "var", "count", "skipped"} if debias else {"mean", "var"})
    p = bnjax.NormParams(jnp.linspace(0.5, 2, 4), jnp.linspace(-1, 1, 4))
    v = {"params": {"scale": p.scale, "bias": p.bias}, "batch_stats": v["batch_stats"]}
    stats = bnjax.init_stats(4)
    for _ in range(3):
        y, upd = layer.apply(v, X, mutable=["batch_stats"])
        y_ref, stats = bnjax.batch_norm(X, p, stats, training=True, momentum=0.9, debias=debias, activation=jax.nn.relu)
        _bitwise(y, y_ref)
        v = {"params": v["params"], **upd}
        _bitwise(v["batch_stats"]["mean"], stats.mean)
        _bitwise(v["batch_stats"]["var"], stats.var)
        if debias:
            _bitwise(v["batch_stats"]["count"], stats.count)
    y = layer.clone(use_running_average=True).apply(v, X)
    _bitwise(y, bnjax.batch_norm(X, p, stats, training=False, activation=jax.nn.relu)[0])


def test_nnx_batch_norm_is_the_functional_call_and_switches_with_eval():
    layer = bnjax.nnx.BatchNorm(4, momentum=0.9, debias=True, rngs=nnx.Rngs(0))
    stats = bnjax.init_stats(4)
    p = bnjax.init_params(4)
    for _ in range(3):
        y = layer(X)
        y_ref, stats = bnjax.batch_norm(X, p, stats, training=True, momentum=0.9, debias=True)
        _bitwise(y, y_ref)
    _bitwise((layer.mean[...], layer.var[...], layer.count[...], layer.skipped[...]), tuple(stats))
    layer.eval()
    _bitwise(layer(X), bnjax.batch_norm(X, p, stats, training=False)[0])
    _bitwise(layer.mean[...], stats.mean)  # eval leaves statistics alone
    layer.train()
    layer(X)
    assert int(layer.count[...]) == 4


def test_mean_only_batch_norm_shells_are_the_functional_call():
    """``mean_only=True`` (linen and nnx): bnjax.mean_only_batch_norm, training and evaluation."""
    p = bnjax.NormParams(None, jnp.linspace(-1, 1, 4))
    stats = bnjax.init_stats(4)
    layer = bnjax.linen.BatchNorm(use_running_average=False, momentum=0.9, mean_only=True, use_scale=False)
    v = layer.init(jax.random.key(0), X)
    v = {"params": {"bias": p.bias}, "batch_stats": v["batch_stats"]}
    module = bnjax.nnx.BatchNorm(4, momentum=0.9, mean_only=True, use_scale=False, rngs=nnx.Rngs(0))
    module.bias[...] = p.bias
    for step in range(3):
        x = X * (1 + step)
        y, upd = layer.apply(v, x, mutable=["batch_stats"])
        y_ref, stats = bnjax.mean_only_batch_norm(x, p, stats, training=True, momentum=0.9, debias=False)
        _bitwise(y, y_ref)
        _bitwise(module(x), y_ref)
        v = {"params": v["params"], **upd}
        _bitwise((v["batch_stats"]["mean"], v["batch_stats"]["var"]), (stats.mean, stats.var))
        _bitwise((module.mean[...], module.var[...]), (stats.mean, stats.var))
    # centred, not scaled: the batch mean is removed, the spread kept
    np.testing.assert_allclose(
        np.std(np.asarray(y) - np.asarray(p.bias), axis=(0, 1, 2)), np.std(np.asarray(x), axis=(0, 1, 2)), rtol=1e-5
    )
    y_eval = bnjax.mean_only_batch_norm(X, p, stats, training=False)[0]
    _bitwise(layer.clone(use_running_average=True).apply(v, X), y_eval)
    module.eval()
    _bitwise(module(X), y_eval)
    with pytest.raises(ValueError, match="unbiased_running_var"):
        bnjax.linen.BatchNorm(use_running_average=False, mean_only=True, unbiased_running_var=True).init(
            jax.random.key(0), X
        )


SIMPLE = {
    "LayerNorm": (dict(), lambda x, p: bnjax.layer_norm(x, p, eps=1e-6)),
    "GroupNorm": (dict(num_groups=2), lambda x, p: bnjax.group_norm(x, p, num_groups=2, eps=1e-6)),
    "InstanceNorm": (dict(), lambda x, p: bnjax.instance_norm(x, p, eps=1e-6)),
    "RMSNorm": (dict(), lambda x, p: bnjax.rms_norm(x, bnjax.NormParams(p.scale, None), eps=1e-6)),
}


@pytest.mark.parametrize("name", sorted(SIMPLE))
def test_linen_and_nnx_simple_layers_are_the_functional_call(name):
    kw, functional = SIMPLE[name]
    p = bnjax.init_params(4)
    layer = getattr(bnjax.linen, name)(**kw)
    _bitwise(layer.apply(layer.init(jax.random.key(0), X), X), functional(X, p))
    _bitwise(getattr(bnjax.nnx, name)(4, **kw, rngs=nnx.Rngs(0))(X), functional(X, p))


# ---------------------------------------------------------------------------------------------
# Parity with Flax's own modules (use_fast_variance=False, plain EMA) in a small ResNet


class ResNet(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x, train: bool):
        bn = functools.partial(self.norm, use_running_average=not train, momentum=0.9, use_fast_variance=False)
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = nn.relu(bn()(x))
        for _ in range(2):
            h = nn.relu(bn()(nn.Conv(8, (3, 3), use_bias=False)(x)))
            h = bn(scale_init=nn.initializers.zeros)(nn.Conv(8, (3, 3), use_bias=False)(h))
            x = nn.relu(x + h)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(3)(x)


def test_linen_resnet_matches_flax_over_training_steps():
    xs = [data((8, 8, 8, 3), seed=20 + i, loc=0.5)[0] for i in range(4)]
    labels = jnp.arange(8) % 3
    models = {"flax": ResNet(nn.BatchNorm), "bnjax": ResNet(bnjax.linen.BatchNorm)}
    variables = models["flax"].init(jax.random.key(0), xs[0], train=False)
    assert jax.tree.structure(variables) == jax.tree.structure(
        models["bnjax"].init(jax.random.key(0), xs[0], train=False)
    )
    opt = optax.sgd(0.1)
    state = {k: (variables, opt.init(variables["params"])) for k in models}

    def step(model, variables, opt_state, x):
        def loss_fn(params):
            logits, upd = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (upd, logits)

        (_, (upd, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = opt.update(grads, opt_state)
        params = optax.apply_updates(variables["params"], updates)
        return {"params": params, **upd}, opt_state, logits, grads

    for x in xs:
        out = {k: jax.jit(functools.partial(step, m))(*state[k], x) for k, m in models.items()}
        state = {k: o[:2] for k, o in out.items()}
        np.testing.assert_allclose(out["bnjax"][2], out["flax"][2], rtol=1e-4, atol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), out["bnjax"][3], out["flax"][3]
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), state["bnjax"][0], state["flax"][0]
        )
    evals = {k: m.apply(state[k][0], xs[0], train=False) for k, m in models.items()}
    np.testing.assert_allclose(evals["bnjax"], evals["flax"], rtol=1e-4, atol=1e-5)


def test_nnx_batch_norm_matches_flax_nnx():
    ours = bnjax.nnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(4, momentum=0.9, use_fast_variance=False, rngs=nnx.Rngs(0))
    for i in range(4):
        x = data((8, 5, 4), seed=i, loc=float(i))[0]
        np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.mean[...], theirs.mean[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-5, atol=1e-6)
    ours.eval(), theirs.eval()
    np.testing.assert_allclose(ours(X[..., :4].reshape(-1, 4)), theirs(X[..., :4].reshape(-1, 4)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (bnjax.linen.LayerNorm(), nn.LayerNorm(use_fast_variance=False)),
        (bnjax.linen.GroupNorm(num_groups=2), nn.GroupNorm(num_groups=2, use_fast_variance=False)),
        (bnjax.linen.InstanceNorm(), nn.InstanceNorm(use_fast_variance=False)),
        (bnjax.linen.RMSNorm(), nn.RMSNorm()),
    ],
)
def test_linen_simple_layers_match_flax(ours, theirs):
    v = theirs.init(jax.random.key(0), X)
    v = jax.tree.map(lambda a: a + jnp.linspace(0.1, 0.4, a.shape[-1]), v)  # non-trivial g, b
    np.testing.assert_allclose(ours.apply(v, X), theirs.apply(v, X), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _trained(model, x):
    v = model.init(jax.random.key(1), x, train=False)
    _, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    return {"params": jax.tree.map(lambda a: a + 0.01, v["params"]), **upd}


def test_flax_serialization_round_trip_both_ways():
    x = data((4, 8, 8, 3), seed=5)[0]
    theirs, ours = ResNet(nn.BatchNorm), ResNet(bnjax.linen.BatchNorm)
    flax_vars = _trained(theirs, x)
    loaded = ser.from_bytes(ours.init(jax.random.key(9), x, train=False), ser.to_bytes(flax_vars))
    _bitwise(loaded, flax_vars)
    np.testing.assert_allclose(
        ours.apply(loaded, x, train=False), theirs.apply(flax_vars, x, train=False), rtol=1e-5, atol=1e-5
    )
    back = ser.from_bytes(theirs.init(jax.random.key(9), x, train=False), ser.to_bytes(_trained(ours, x)))
    _bitwise(back, _trained(ours, x))


def test_orbax_round_trip_both_ways(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    x = data((4, 8, 8, 3), seed=6)[0]
    theirs, ours = ResNet(nn.BatchNorm), ResNet(bnjax.linen.BatchNorm)
    for i, (src, dst) in enumerate([(theirs, ours), (ours, theirs)]):
        saved = _trained(src, x)
        path = tmp_path / f"ckpt{i}"
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path, saved)
            ckpt.wait_until_finished()
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, dst.init(jax.random.key(9), x, train=False))
            restored = ckpt.restore(path, target)
        _bitwise(restored, saved)
        dst.apply(restored, x, train=False)


# ---------------------------------------------------------------------------------------------
# Transforms


def test_linen_under_nn_jit_and_nn_scan_over_layers():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.relu(bnjax.linen.BatchNorm(use_running_average=False, debias=True)(nn.Dense(4)(x))), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(
                Block,
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True},
                length=3,
            )
            return nn.jit(scan)()(x, None)[0]

    x = data((16, 4), seed=7)[0]
    v = Stack().init(jax.random.key(0), x)
    (bn,) = [d["BatchNorm_0"] for d in v["batch_stats"].values()]
    assert bn["mean"].shape == (3, 4)
    y, upd = Stack().apply(v, x, mutable=["batch_stats"])
    assert y.shape == x.shape
    (bn,) = [d["BatchNorm_0"] for d in upd["batch_stats"].values()]
    np.testing.assert_array_equal(bn["count"], [1, 1, 1])


def test_linen_under_nn_vmap_with_axis_name():
    """nn.vmap over an ensemble axis, statistics synced over a second, named vmapped batch axis."""
    layer = nn.vmap(
        bnjax.linen.BatchNorm,
        in_axes=0,
        out_axes=0,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        axis_name="batch",
    )(use_running_average=False, axis_name="batch", momentum=0.9)
    x = data((6, 4), seed=8)[0]  # vmapped over the 6 examples: each call sees one (4,) example
    v = layer.init(jax.random.key(0), x)
    y, upd = layer.apply(v, x, mutable=["batch_stats"])
    y_ref, stats = bnjax.batch_norm(
        x, bnjax.init_params(4), bnjax.init_stats(4), training=True, momentum=0.9, debias=False
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], stats.mean, rtol=1e-6)


def test_nnx_under_scan_vmap_and_eval_shape():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return bnjax.nnx.BatchNorm(4, debias=True, rngs=nnx.Rngs(key))

    layers = make(jax.random.split(jax.random.key(0), 3))
    assert layers.mean[...].shape == (3, 4)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(layer, x):
        return layer(x)

    x = data((16, 4), seed=9)[0]
    y = forward(layers, x)
    assert y.shape == x.shape
    np.testing.assert_array_equal(layers.count[...], [1, 1, 1])

    abstract = nnx.eval_shape(lambda: bnjax.nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    assert abstract.mean.shape == (4,)


def test_linen_inside_shard_map():
    layer = bnjax.linen.BatchNorm(use_running_average=False, axis_name="d", momentum=0.9)
    x = data((32, 4), seed=10, loc=5.0)[0]
    v = layer.init(jax.random.key(0), x)
    mesh = Mesh(np.array(jax.devices()), ("d",))

    def per_shard(x):
        return layer.apply(v, x, mutable=["batch_stats"])

    y, upd = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P())))(x)
    y_ref, stats = bnjax.batch_norm(
        x, bnjax.init_params(4), bnjax.init_stats(4), training=True, momentum=0.9, debias=False
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], stats.var, rtol=1e-5)


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"])
def test_shells_take_a_mask_at_call_time_like_flax(name):
    # Flax's normalization layers take mask= at call time; bnjax's shells (linen and nnx) must
    # give the same outputs at the valid positions, with NaN padding changing nothing there
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 5, 8)).astype(np.float32) * 2 + 1
    mask = rng.random((3, 4, 5, 8)) > 0.3
    if name in ("GroupNorm", "InstanceNorm"):
        mask = np.broadcast_to(rng.random((3, 4, 5, 1)) > 0.3, x.shape).copy()
    poisoned = np.where(mask, x, np.nan).astype(np.float32)
    kw = {"num_groups": 2} if name == "GroupNorm" else {}
    flax_layer = getattr(nn, name)(**kw)
    variables = flax_layer.init(jax.random.key(0), x)
    expected = np.asarray(flax_layer.apply(variables, x, mask=jnp.asarray(mask)))
    ours = getattr(bnjax.linen, name)(**kw)
    for values in (x, poisoned):
        got = np.asarray(ours.apply(variables, jnp.asarray(values), mask=jnp.asarray(mask)))
        np.testing.assert_allclose(got[mask], expected[mask], atol=2e-5, rtol=2e-5)
    flax_nnx = getattr(nnx, name)(8, rngs=nnx.Rngs(0), **kw)
    ours_nnx = getattr(bnjax.nnx, name)(8, rngs=nnx.Rngs(0), **kw)
    expected_nnx = np.asarray(flax_nnx(jnp.asarray(x), mask=jnp.asarray(mask)))
    got_nnx = np.asarray(ours_nnx(jnp.asarray(poisoned), mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got_nnx[mask], expected_nnx[mask], atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="mask"):
        ours.apply(variables, jnp.asarray(x), mask=jnp.asarray(mask[..., 0]))


# ---------------------------------------------------------------------------------------------
# Where bnjax departs from Flax on purpose, the reasons hold


@pytest.mark.parametrize(
    ("name", "shape", "loc", "axes"), [("LayerNorm", (2, 3, 4), 1e6, (2,)), ("InstanceNorm", (2, 3, 4, 5), 1e4, (1, 2))]
)
def test_stable_variance_at_large_mean_where_flax_reference_is_float32(name, shape, loc, axes):
    # Flax's own tests of use_fast_variance=False (these shapes and means) compare with a float32
    # one-liner; that reference is off float64 by far more than bnjax is (a deliberate difference)
    x = jax.random.normal(jax.random.key(1), shape) + loc
    kw = dict(use_bias=False, use_scale=False, epsilon=1e-5, use_fast_variance=False)
    y, _ = getattr(bnjax.linen, name)(**kw).init_with_output(jax.random.key(0), x)
    x64 = np.asarray(x, np.float64)
    truth = (x64 - x64.mean(axes, keepdims=True)) / np.sqrt(x64.var(axes, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, truth, atol=1e-6)
    one_liner = (x - x.mean(axes, keepdims=True)) * jax.lax.rsqrt(x.var(axes, keepdims=True) + 1e-5)
    assert np.abs(np.asarray(one_liner) - truth).max() > 1e-4  # the float32 reference is the inexact one


@pytest.mark.parametrize(
    "dtype,param_dtype,expected",
    [
        (None, jnp.float32, jnp.float32),  # bf16 x, float32 g, b: promoted, as Flax
        (jnp.bfloat16, jnp.float32, jnp.bfloat16),
        (None, jnp.bfloat16, jnp.bfloat16),
    ],
)
def test_output_dtype_follows_flax_promotion(dtype, param_dtype, expected):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)) * 3 + 1, jnp.bfloat16)
    for ours, theirs in [(bnjax.linen.LayerNorm, nn.LayerNorm), (bnjax.linen.GroupNorm, nn.GroupNorm)]:
        kw = dict(dtype=dtype, param_dtype=param_dtype, **({"num_groups": 2} if ours is bnjax.linen.GroupNorm else {}))
        y, _ = ours(**kw).init_with_output(jax.random.key(0), x)
        z, _ = theirs(**kw).init_with_output(jax.random.key(0), x)
        assert y.dtype == z.dtype == expected
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(z, np.float32), atol=2e-2)
    layer = bnjax.nnx.LayerNorm(6, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    assert layer(x).dtype == expected


def test_linen_batch_norm_init_in_training_normalizes_with_the_batch():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((16, 3)) * 4 + 7, jnp.float32)
    y, v = bnjax.linen.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x)
    z, w = nn.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y, z, atol=1e-5)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
    _bitwise(v["batch_stats"], w["batch_stats"])  # init stores nothing: zeros and ones, as Flax
    # one example per statistic at init (a common init batch): the running statistics, no error
    y1, _ = bnjax.linen.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x[:1])
    np.testing.assert_allclose(y1, x[:1] / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_group_norm_reduction_axes_flax_meaning():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 5, 6)) * 2 + 1, jnp.float32)
    for axes in [(2, 3), (1, 2, 3), (-1,)]:
        kw = dict(num_groups=3, reduction_axes=axes)
        y, _ = bnjax.linen.GroupNorm(**kw).init_with_output(jax.random.key(0), x)
        z, _ = nn.GroupNorm(**kw, use_fast_variance=False).init_with_output(jax.random.key(0), x)
        np.testing.assert_allclose(y, z, atol=1e-5)
    with pytest.raises(ValueError, match="must include the channel axis"):
        bnjax.linen.GroupNorm(num_groups=3, reduction_axes=(1, 2)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="num_groups=7"):
        bnjax.linen.GroupNorm(7).init(jax.random.key(0), x)  # positional num_groups, as Flax


def test_nnx_batch_norm_needs_a_mode():
    layer = bnjax.nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_running_average is None"):
        layer(jnp.ones((4, 3)))
    assert layer(jnp.ones((4, 3)), use_running_average=True).shape == (4, 3)
