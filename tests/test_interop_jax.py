"""Haiku and Equinox batch-norm state to bnjax's Flax layout and back, run side by side with the
libraries' own modules: evaluation outputs agree, and the round trips are exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax.linen
from bnjax import interop

hk = pytest.importorskip("haiku")
eqx = pytest.importorskip("equinox")

X = jax.random.normal(jax.random.key(0), (6, 4, 4, 3)) * 2.0 + 1.0


def _haiku_trained(decay=0.9, steps=4):
    def f(x, is_training):
        return hk.BatchNorm(True, True, decay, eps=1e-3, name="bn")(x, is_training)

    t = hk.transform_with_state(f)
    params, state = t.init(jax.random.key(1), X, True)
    params = jax.tree.map(lambda a: a + jax.random.uniform(jax.random.key(2), a.shape), params)
    for i in range(steps):
        _, state = t.apply(params, state, None, X * (1 + 0.1 * i) + i, True)
    return t, params, state


def test_haiku_batch_norm_converts_for_evaluation_and_round_trips():
    t, params, state = _haiku_trained()
    want, _ = t.apply(params, state, None, X, False)
    v = interop.from_haiku_batch_norm(params, state, name="bn", track_updates=True)
    assert int(v["batch_stats"]["count"]) == 4
    layer = bnjax.linen.BatchNorm(use_running_average=True, epsilon=1e-3, track_updates=True)
    np.testing.assert_allclose(layer.apply(v, X), want, rtol=1e-5, atol=1e-5)
    # float64: Haiku evaluates with its debiased averages
    avg = np.asarray(state["bn/~/var_ema"]["average"], np.float64).reshape(-1)
    np.testing.assert_array_equal(v["batch_stats"]["var"], avg.astype(np.float32))
    # back to Haiku: same evaluation, and Haiku's own training continues from the same state
    p2, s2 = interop.to_haiku_batch_norm(v, decay_rate=0.9, name="bn")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s2, state)
    jax.tree.map(np.testing.assert_array_equal, p2, params)
    y2, s3 = t.apply(p2, s2, None, X, True)
    y1, s1 = t.apply(params, state, None, X, True)
    np.testing.assert_allclose(y2, y1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), s3, s1)


def test_haiku_errors_name_the_key_and_the_shape():
    _, params, state = _haiku_trained(steps=1)
    with pytest.raises(KeyError, match=r"no 'batch_norm'; found"):
        interop.from_haiku_batch_norm(params, state)  # the module is called "bn"
    bad = {"bn": {**params["bn"], "scale": jnp.ones((1, 2, 1, 3))}}
    with pytest.raises(ValueError, match=r"\(1, 2, 1, 3\), expected \(1, ..., 1, C\)"):
        interop.from_haiku_batch_norm(bad, state, name="bn")
    with pytest.raises(KeyError, match="bn/~/var_ema"):
        interop.from_haiku_batch_norm(params, {"bn/~/mean_ema": state["bn/~/mean_ema"]}, name="bn")


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_equinox_batch_norm_converts_for_evaluation(mode):
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, axis_name="batch", mode=mode, momentum=0.9)
    bn = eqx.tree_at(lambda m: (m.weight, m.bias), bn, (jnp.array([0.5, 1.0, 2.0]), jnp.array([0.1, -0.2, 0.3])))
    x_nchw = jnp.moveaxis(X, -1, 1)  # Equinox: channels first, per example under vmap
    train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    for i in range(3):
        _, state = train(x_nchw + i, state)
    infer = eqx.nn.inference_mode(bn)
    want, _ = jax.vmap(infer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x_nchw, state)
    v = interop.from_equinox_batch_norm(bn, state)
    got = bnjax.linen.BatchNorm(use_running_average=True, epsilon=bn.eps).apply(v, X)
    np.testing.assert_allclose(jnp.moveaxis(got, -1, 1), want, rtol=1e-5, atol=1e-5)
    if mode == "ema":  # and back into a fresh Equinox layer
        fresh, fresh_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, axis_name="batch", mode="ema")
        fresh, fresh_state = interop.to_equinox_batch_norm(v, fresh, fresh_state)
        infer = eqx.nn.inference_mode(fresh)
        back, _ = jax.vmap(infer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x_nchw, fresh_state)
        np.testing.assert_allclose(back, want, rtol=1e-6, atol=1e-6)
        assert not bool(fresh_state.get(fresh.ema_first_time_index))
    else:
        with pytest.raises(ValueError, match="only mode='ema'"):
            interop.to_equinox_batch_norm(v, bn, state)
