"""Running statistics: conventions, parity options, state hygiene and the non-finite policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests import reference as ref
from tests.helpers import data


def _batches(k=5, shape=(16, 3, 4), seed=0):
    return [data(shape, seed=seed + i, loc=float(i), scale=1.0 + i)[0] for i in range(k)]


def _run(batches, **kw):
    stats = bnjax.init_stats(batches[0].shape[-1])
    history = []
    for x in batches:
        _, stats = bnjax.batch_norm(x, None, stats, training=True, **kw)
        history.append(stats)
    return history


def _batch_stats(batches, unbiased=False):
    out = []
    for x in batches:
        x64 = np.asarray(x, np.float64)
        n = x64.size // x64.shape[-1]
        var = x64.var(axis=(0, 1))
        out.append((x64.mean(axis=(0, 1)), var * n / (n - 1) if unbiased else var))
    return out


@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0, None])
@pytest.mark.parametrize("debias", [True, False])
def test_update_rule_against_reference(momentum, debias):
    batches = _batches()
    history = _run(batches, momentum=momentum, debias=debias)
    expected = ref.running_sequence(_batch_stats(batches), momentum, debias)
    for got, (m, v) in zip(history, expected, strict=True):
        np.testing.assert_allclose(got.mean, m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.var, v, rtol=1e-5, atol=1e-6)
    assert [int(s.count) for s in history] == list(range(1, 6))


def test_first_step_equals_batch_statistics_by_default():
    (x,) = _batches(1)
    (stats,) = _run([x])
    np.testing.assert_allclose(stats.mean, np.asarray(x, np.float64).mean((0, 1)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.var, np.asarray(x, np.float64).var((0, 1)), rtol=1e-5)
    mean, var = bnjax.moments(x, (0, 1))  # and bit for bit the batch statistics
    np.testing.assert_array_equal(stats.mean, mean)
    np.testing.assert_array_equal(stats.var, var)


def test_cumulative_average_is_the_mean_of_batch_statistics():
    batches = _batches()
    final = _run(batches, momentum=None)[-1]
    bs = _batch_stats(batches)
    np.testing.assert_allclose(final.mean, np.mean([m for m, _ in bs], 0), rtol=1e-5)
    np.testing.assert_allclose(final.var, np.mean([v for _, v in bs], 0), rtol=1e-5)


def test_unbiased_running_variance():
    batches = _batches()
    final = _run(batches, momentum=0.9, debias=False, unbiased_running_var=True)[-1]
    expected = ref.running_sequence(_batch_stats(batches, unbiased=True), 0.9, debias=False)[-1]
    np.testing.assert_allclose(final.var, expected[1], rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_state_structure_and_dtypes_are_stable_under_scan_and_cond(dtype):
    xs = jnp.stack(_batches(4)).astype(dtype)
    p = bnjax.init_params(4, dtype=dtype)
    stats = bnjax.init_stats(4)

    def step(stats, x):
        y, stats = bnjax.batch_norm(x, p, stats, training=True)
        return stats, y

    final, ys = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(stats, xs)
    assert ys.dtype == dtype
    assert jax.tree.structure(final) == jax.tree.structure(stats)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(stats), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert not getattr(a, "weak_type", False)
    assert int(final.count) == 4

    def branch(training):
        return lambda s: bnjax.batch_norm(xs[0], p, s, training=training)[1]

    out = jax.jit(lambda flag, s: jax.lax.cond(flag, branch(True), branch(False), s))(True, stats)
    assert int(out.count) == 1


def test_buffer_donation_of_state():
    x = _batches(1)[0]
    stats = bnjax.init_stats(4)
    step = jax.jit(lambda s, x: bnjax.batch_norm(x, None, s, training=True)[1], donate_argnums=0)
    new = step(stats, x)
    new = step(new, x)
    assert int(new.count) == 2


def test_non_finite_batch_leaves_that_feature_unchanged_and_is_counted():
    batches = _batches(3)
    stats = _run(batches[:2])[-1]
    bad = batches[2].at[3, 1, 2].set(jnp.nan).at[0, 0, 0].set(jnp.inf)
    _, new = bnjax.batch_norm(bad, None, stats, training=True)
    new, stats = jax.tree.map(np.asarray, new), jax.tree.map(np.asarray, stats)
    np.testing.assert_array_equal(new.mean[[0, 2]], stats.mean[[0, 2]])
    np.testing.assert_array_equal(new.var[[0, 2]], stats.var[[0, 2]])
    assert np.all(new.mean[[1, 3]] != stats.mean[[1, 3]])
    np.testing.assert_array_equal(new.skipped, [1, 0, 1, 0])
    assert int(new.count) == 3
    assert np.isfinite(np.asarray(new.mean)).all() and np.isfinite(np.asarray(new.var)).all()
    # the next clean batch continues the average as if the bad one never reached features 0 and 2
    _, after = bnjax.batch_norm(batches[0], None, new, training=True)
    clean = _run(batches[:2] + [batches[0]])[-1]
    after, clean = np.asarray(after.mean), np.asarray(clean.mean)
    np.testing.assert_allclose(after[[0, 2]], clean[[0, 2]], rtol=1e-6)


def test_all_nan_batch_is_detectable_and_harmless():
    stats = _run(_batches(1))[-1]
    _, new = bnjax.batch_norm(jnp.full((8, 4), jnp.nan), None, stats, training=True)
    np.testing.assert_array_equal(new.mean, stats.mean)
    np.testing.assert_array_equal(new.skipped, 1)


def test_unbiased_variance_with_one_valid_element_is_skipped():
    x, _ = data((6, 2))
    mask = jnp.array([True, False, False, False, False, False])[:, None]
    stats = bnjax.init_stats(2)
    _, new = bnjax.batch_norm(x, None, stats, training=True, mask=mask, unbiased_running_var=True)
    np.testing.assert_array_equal(new.var, stats.var)
    np.testing.assert_array_equal(new.skipped, 1)


def test_stats_without_skipped_field_still_work():
    """Without ``skipped``, a batch that is bad for one feature is applied to none under the
    debiased rule (one count serves every feature), and not counted; the plain EMA, which does not
    read the count, still updates the good features."""
    x, _ = data((6, 2))
    stats = bnjax.BatchStats(jnp.zeros(2), jnp.ones(2), jnp.zeros((), jnp.int32))
    bad = x.at[0, 0].set(jnp.nan)
    _, new = bnjax.batch_norm(bad, None, stats, training=True)
    assert new.skipped is None and int(new.count) == 0
    np.testing.assert_array_equal(new.mean, stats.mean)
    _, new = bnjax.batch_norm(bad, None, stats, training=True, debias=False)
    assert new.skipped is None and int(new.count) == 1
    assert new.mean[0] == 0 and new.mean[1] != 0


def test_float64_state_is_kept_when_requested():
    jax.config.update("jax_enable_x64", True)
    try:
        stats = bnjax.init_stats(3, dtype=jnp.float64)
        _, new = bnjax.batch_norm(jnp.ones((4, 3)).at[0].set(2.0), None, stats, training=True)
        assert new.mean.dtype == jnp.float64 and new.var.dtype == jnp.float64
    finally:
        jax.config.update("jax_enable_x64", False)


def test_init_stats_on_shape_dtype_struct_and_eval_shape():
    spec = jax.ShapeDtypeStruct((8, 5, 5, 3), jnp.bfloat16)
    out = jax.eval_shape(lambda x: bnjax.batch_norm(x, bnjax.init_params(3), bnjax.init_stats(3), training=True), spec)
    assert out[0].shape == spec.shape and out[0].dtype == jnp.bfloat16
    assert out[1].mean.dtype == jnp.float32
