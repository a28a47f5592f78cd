"""Gradient accumulation (``accumulation_steps=k``): the running statistics are updated once per k
training calls with the exact pooled statistics of those k micro-batches, with a fixed state
structure; against batch norm on the concatenated batch, and an optax.MultiSteps loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
from tests.helpers import data

C, K = 3, 3


def _micro(seed):
    # micro-batches of unequal sizes and different means
    return [data((n, C), seed=seed + i, loc=float(i))[0] for i, n in enumerate((4, 6, 5))]


@pytest.mark.parametrize("debias", [True, False])
def test_k_micro_batches_make_one_update_with_their_pooled_statistics(debias):
    p = bnjax.init_params(C)
    st = bnjax.init_stats(C, accumulation_steps=K)
    structure = jax.tree.structure(st)
    reference = bnjax.init_stats(C)
    for step in range(2):  # two optimizer steps of K micro-batches each
        parts = _micro(10 * step)
        for i, x in enumerate(parts):
            y, st = bnjax.batch_norm(x, p, st, training=True, momentum=0.9, debias=debias, accumulation_steps=K)
            assert jax.tree.structure(st) == structure  # a fixed carry
            assert isinstance(st, bnjax.AccumulatingStats)
            np.testing.assert_array_equal(y, bnjax.batch_norm(x, p, bnjax.init_stats(C), training=True)[0])
            if i < K - 1:  # nothing applied before the K-th micro-batch
                assert int(st.stats.count) == step
        _, reference = bnjax.batch_norm(
            jnp.concatenate(parts), p, reference, training=True, momentum=0.9, debias=debias
        )
        np.testing.assert_allclose(st.mean, reference.mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(st.var, reference.var, rtol=1e-6)
        assert int(st.stats.count) == int(reference.count) == step + 1
        np.testing.assert_array_equal(st.phase, np.zeros(K, np.int32))  # cleared after the update


def test_accumulation_under_scan_and_jit_and_k_1_is_plain_batch_norm():
    p = bnjax.init_params(C)
    xs = jnp.stack([data((4, C), seed=i)[0] for i in range(6)])

    @jax.jit
    def run(st):
        def body(st, x):
            return bnjax.batch_norm(x, p, st, training=True, accumulation_steps=K)[1], None

        return jax.lax.scan(body, st, xs)[0]

    st = run(bnjax.init_stats(C, accumulation_steps=K))
    ref = bnjax.init_stats(C)
    for j in range(2):
        _, ref = bnjax.batch_norm(xs[3 * j : 3 * j + 3].reshape(-1, C), p, ref, training=True)
    np.testing.assert_allclose(st.mean, ref.mean, rtol=1e-6)
    np.testing.assert_allclose(st.var, ref.var, rtol=1e-6)
    one = bnjax.batch_norm(xs[0], p, bnjax.init_stats(C, accumulation_steps=1), training=True, accumulation_steps=1)[1]
    plain = bnjax.batch_norm(xs[0], p, bnjax.init_stats(C), training=True)[1]
    jax.tree.map(np.testing.assert_array_equal, one.stats, plain)
    # evaluation ignores the pending micro-batches
    half = bnjax.batch_norm(xs[0], p, bnjax.init_stats(C, accumulation_steps=K), training=True, accumulation_steps=K)[1]
    y_eval, same = bnjax.batch_norm(xs[1], p, half, training=False)
    assert same is half
    np.testing.assert_array_equal(y_eval, bnjax.batch_norm(xs[1], p, bnjax.init_stats(C), training=False)[0])


def test_with_optax_multisteps():
    # the recipe: optax.MultiSteps applies the optimizer every K calls; batch norm's statistics too
    key = jax.random.key(0)
    w = jax.random.normal(key, (C, C))
    p = bnjax.init_params(C)
    opt = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=K)
    state = (w, p, bnjax.init_stats(C, accumulation_steps=K), opt.init((w, p)))

    @jax.jit
    def step(state, x):
        w, p, st, opt_state = state

        def loss(params):
            y, new = bnjax.batch_norm(x @ params[0], params[1], st, training=True, accumulation_steps=K)
            return jnp.mean(y**2 - y), new

        (_, st), grads = jax.value_and_grad(loss, has_aux=True)((w, p))
        updates, opt_state = opt.update(grads, opt_state, (w, p))
        w, p = optax.apply_updates((w, p), updates)
        return (w, p, st, opt_state)

    w0 = w
    for i, x in enumerate(_micro(0) * 2):
        state = step(state, x)
        if i == K - 2:
            np.testing.assert_array_equal(state[0], w0)  # no optimizer step yet
            assert int(state[2].stats.count) == 0
    assert int(state[2].stats.count) == 2 and not np.array_equal(state[0], w0)


@pytest.mark.parametrize(
    "stats_k,call_k,err,match",
    [
        (None, K, ValueError, r"init_stats\(C, accumulation_steps=3\)"),
        (K, None, ValueError, "made for gradient accumulation over 3 micro-batches"),
        (K, 2, ValueError, "does not match the state, made with accumulation_steps=3"),
        (K, 0, ValueError, "accumulation_steps must be"),
        (K, 2.0, TypeError, "accumulation_steps must be"),
    ],
)
def test_accumulation_bad_input(stats_k, call_k, err, match):
    x, _ = data((4, C), seed=1)
    st = bnjax.init_stats(C, accumulation_steps=stats_k)
    with pytest.raises(err, match=match):
        bnjax.batch_norm(x, bnjax.init_params(C), st, training=True, accumulation_steps=call_k)
    with pytest.raises(ValueError, match="accumulation_steps must be"):
        bnjax.init_stats(C, accumulation_steps=0)


# ---------------------------------------------------------------------------------------------
# The Flax shells: BatchNorm(accumulation_steps=k), linen and nnx


def _ema64(parts, steps, momentum=0.9):
    """Flax's plain EMA from (0, 1), one update per optimizer step with the float64 statistics of
    that step's concatenated micro-batches."""
    mean, var = np.zeros(C), np.ones(C)
    for step in range(steps):
        x = np.concatenate([np.asarray(p, np.float64) for p in parts[step]])
        mean = momentum * mean + (1 - momentum) * x.mean(0)
        var = momentum * var + (1 - momentum) * x.var(0)
    return mean, var


def test_linen_batch_norm_accumulates_one_update_per_k_calls():
    import flax.linen as nn

    import bnjax.linen

    parts = [_micro(0), _micro(10)]
    layer = bnjax.linen.BatchNorm(use_running_average=False, momentum=0.9, accumulation_steps=K)
    v = layer.init(jax.random.key(0), parts[0][0])
    assert sorted(v["batch_stats"]) == [
        "mean",
        "pending_count",
        "pending_m2",
        "pending_offset",
        "pending_shift",
        "phase",
        "var",
    ]
    apply = jax.jit(lambda v, x: layer.apply(v, x, mutable=["batch_stats"]))
    plain = nn.BatchNorm(use_running_average=False, momentum=0.9)
    for step, micro in enumerate(parts):
        for i, x in enumerate(micro):
            y, upd = apply(v, x)
            v = {**v, **upd}
            flax_vars = {"params": v["params"], "batch_stats": {k: v["batch_stats"][k] for k in ("mean", "var")}}
            y_flax, _ = plain.apply(flax_vars, x, mutable=["batch_stats"])
            np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)  # each call: its micro-batch's statistics
            if i < K - 1:
                np.testing.assert_array_equal(v["batch_stats"]["phase"], (np.arange(K) <= i).astype(np.int32))
        mean, var = _ema64(parts, step + 1)
        np.testing.assert_allclose(v["batch_stats"]["mean"], mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(v["batch_stats"]["var"], var, rtol=1e-6)
        np.testing.assert_array_equal(v["batch_stats"]["pending_count"], np.zeros(C))
    # evaluation reads the running statistics and changes nothing
    y_eval = layer.clone(use_running_average=True).apply(v, parts[0][0])
    x64 = np.asarray(parts[0][0], np.float64)
    np.testing.assert_allclose(y_eval, (x64 - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("debias", [False, True])
def test_nnx_batch_norm_and_renorm_accumulate_like_the_functional_api(debias):
    from flax import nnx

    import bnjax.nnx

    layers = [
        bnjax.nnx.BatchNorm(C, momentum=0.9, debias=debias, accumulation_steps=K, rngs=nnx.Rngs(0)),
        bnjax.nnx.BatchRenorm(
            C, momentum=0.9, debias=debias, accumulation_steps=K, r_max=1.0, d_max=0.0, rngs=nnx.Rngs(0)
        ),
    ]
    ref = bnjax.init_stats(C, accumulation_steps=K)
    p = bnjax.init_params(C)
    step = nnx.jit(lambda m, x: m(x))
    functional = jax.jit(
        lambda x, st: bnjax.batch_norm(x, p, st, training=True, momentum=0.9, debias=debias, accumulation_steps=K)
    )
    for x in _micro(0) + _micro(10):
        y_ref, ref = functional(x, ref)
        for layer in layers:
            np.testing.assert_array_equal(step(layer, x), y_ref)
            np.testing.assert_array_equal(layer.mean[...], ref.mean)
            np.testing.assert_array_equal(layer.var[...], ref.var)
            np.testing.assert_array_equal(layer.pending_m2[...], ref.pending.m2)
            np.testing.assert_array_equal(layer.phase[...], ref.phase)
    mean, var = _ema64([_micro(0), _micro(10)], 2) if not debias else (None, None)
    if mean is not None:
        np.testing.assert_allclose(layers[0].mean[...], mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(layers[0].var[...], var, rtol=1e-6)
    layers[0].eval()
    before = nnx.state(layers[0], nnx.BatchStat)
    layers[0](_micro(0)[0])
    jax.tree.map(np.testing.assert_array_equal, nnx.state(layers[0], nnx.BatchStat), before)


def test_shell_accumulation_bad_input():
    from flax import nnx

    import bnjax.linen
    import bnjax.nnx

    x = _micro(0)[0]
    with pytest.raises(ValueError, match=r"frozen=True, accumulation_steps=3"):
        bnjax.nnx.BatchNorm(C, frozen=True, accumulation_steps=K, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"BatchNorm\(accumulation_steps\) must be an int >= 1"):
        bnjax.nnx.BatchNorm(C, accumulation_steps=0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"BatchNorm\(accumulation_steps\) must be a Python int"):
        bnjax.linen.BatchNorm(use_running_average=False, accumulation_steps=2.0).init(jax.random.key(0), x)
    # a state made for another k (a checkpoint of accumulation_steps=2) is refused, naming both
    v = bnjax.linen.BatchNorm(use_running_average=False, accumulation_steps=2).init(jax.random.key(0), x)
    with pytest.raises(
        ValueError, match="accumulation_steps=3 does not match the state, made with accumulation_steps=2"
    ):
        bnjax.linen.BatchNorm(use_running_average=False, accumulation_steps=K).apply(v, x, mutable=["batch_stats"])


def test_mean_only_and_renorm_accumulate_the_same_way():
    p = bnjax.init_params(C)
    parts = _micro(3)
    for fn, kw in ((bnjax.mean_only_batch_norm, {}), (bnjax.batch_renorm, {"r_max": 2.0, "d_max": 1.0})):
        st = bnjax.init_stats(C, accumulation_steps=K)
        for x in parts:
            _, st = fn(x, p, st, training=True, momentum=0.9, accumulation_steps=K, **kw)
        _, ref = fn(jnp.concatenate(parts), p, bnjax.init_stats(C), training=True, momentum=0.9, **kw)
        # the pooled mean vs the mean of the concatenation: float32 rounding at |mean| ~ 2
        np.testing.assert_allclose(st.mean, ref.mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(st.var, ref.var, rtol=1e-6)
        assert int(st.stats.count) == 1
