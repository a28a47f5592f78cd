"""moments: accuracy against float64, numerical stability, masks, low precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnjax
from bnjax._src import statistics
from tests import reference as ref
from tests.helpers import data


def _rel_var_error(ratio, n=4096, features=8, seed=0):
    rng = np.random.default_rng(seed)
    std = 1.0
    x = (rng.standard_normal((n, features)) * std + ratio * std).astype(np.float32)
    _, var = bnjax.moments(jnp.asarray(x), 0)
    exact = x.astype(np.float64).var(axis=0)  # float64 reference of the same float32 values
    return float(np.max(np.abs(np.asarray(var, np.float64) / exact - 1)))


@pytest.mark.parametrize("ratio", [0.0, 1e2, 1e3, 1e4])
def test_variance_stable_at_large_mean_issue_bound(ratio):
    assert _rel_var_error(ratio) <= 1e-3


@pytest.mark.parametrize("ratio", [1e4, 3e4, 1e5])
def test_variance_at_float32_floor(ratio):
    # E[x²] − E[x]² returns 0 here; two-pass reaches ~2.5e-4 at 1e5
    assert _rel_var_error(ratio, seed=int(ratio) % 97) <= 1e-5


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 1e3, 1e4, 1e5])
def test_row_variance_at_float32_floor(ratio, rows):
    """Statistics along the minor-most axes (layer norm), an outlier row included; with 32 rows
    (the columns variant) and with 4096 (the rows variant)."""
    rng = np.random.default_rng(int(ratio) % 89)
    x = (rng.standard_normal((4096, 2, 128) if rows else (32, 2, 2048)) + ratio).astype(np.float32)
    assert statistics.uses_rows(x.shape, (1, 2), None) == rows
    x[0, 0, 7] += 40.0  # an outlier row: a wide range, so a shift far from its mean
    mean, var = bnjax.moments(jnp.asarray(x), (1, 2))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(var, x64.var(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(mean, x64.mean(axis=(1, 2)), rtol=1e-7, atol=1e-6)
    y = bnjax.layer_norm(jnp.asarray(x), None, axis=(1, 2), eps=1e-12)
    y64 = (x64 - x64.mean(axis=(1, 2), keepdims=True)) / x64.std(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(y, y64, atol=3e-6 if ratio < 1e5 else 2e-2)


def test_variance_stable_with_mask_and_many_elements():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 32, 32, 4)) + 1e4).astype(np.float32)
    mask = rng.random((64, 32, 32, 1)) < 0.5
    _, var = bnjax.moments(jnp.asarray(x), (0, 1, 2), mask=mask)
    _, v_ref, _ = ref.moments(x, (0, 1, 2), mask)
    np.testing.assert_allclose(var, v_ref.reshape(-1), rtol=1e-5)


@pytest.mark.parametrize(
    "value,dtype",
    [(v, d) for v in [0.0, 1.0, -3.7, 1234.567, 3.3e6, -1e30] for d in [jnp.float32, jnp.bfloat16]]
    + [(v, jnp.float16) for v in [0.0, 1.0, -3.7, 1234.567, -6e4]],
)
def test_constant_feature_gives_exactly_the_bias(value, dtype):
    x = jnp.full((16, 5, 3), value, dtype)
    bias = jnp.array([0.25, -2.0, 7.5], jnp.float32)
    y, stats = bnjax.batch_norm(x, bnjax.NormParams(jnp.full(3, 3.0), bias), bnjax.init_stats(3), training=True)
    np.testing.assert_array_equal(y, jnp.broadcast_to(bias.astype(dtype), x.shape))
    np.testing.assert_array_equal(stats.var, 0.0)
    np.testing.assert_array_equal(stats.mean, jnp.asarray(value, dtype).astype(jnp.float32))
    y_ln = bnjax.layer_norm(x, bnjax.NormParams(None, bias))
    np.testing.assert_array_equal(y_ln, jnp.broadcast_to(bias.astype(dtype), x.shape))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("which", ["max", "-max", "-1e30", "tiny", "3.3e6"])
@pytest.mark.parametrize("rows", [False, True])
def test_constant_rows_are_exact_at_any_magnitude(which, dtype, rows):
    """Layer norm, both statistics variants. Rows: the plain mean of a constant row is rounded,
    and Σx overflows near the largest float; the clamp of pass 1 into [min x, max x] must still
    give K = x exactly, so σ² = 0, μ = x and an output of exactly b, with no inf − inf."""
    big = float(jnp.finfo(dtype).max)
    value = {"max": big, "-max": -big, "-1e30": -1e30, "tiny": 3e-38, "3.3e6": 3.3e6}[which]
    shape = (64, 64, 97) if rows else (6, 3, 97)  # 97: no power of two, so Σx/n is rounded
    assert statistics.uses_rows(shape, (2,), None) == rows
    x = jnp.full(shape, value, dtype)
    bias = jnp.linspace(-2.0, 3.0, 97, dtype=jnp.float32)
    mean, var = bnjax.moments(x, axis=-1)
    np.testing.assert_array_equal(var, 0.0)
    np.testing.assert_array_equal(mean, jnp.asarray(value, dtype).astype(jnp.float32))
    for fused in (True, False):
        y = bnjax.layer_norm(x, bnjax.NormParams(jnp.full(97, 2.0), bias), fused_backward=fused)
        np.testing.assert_array_equal(y, jnp.broadcast_to(bias.astype(dtype), x.shape))


def test_row_moments_with_a_rounded_plain_mean_are_at_the_float32_floor():
    """Rows whose plain mean Σx/n is far off in relative terms: huge |μ|/σ, and one row with a
    single huge outlier (σ from one element). The corrected second pass must repair K's error."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4096, 1000)).astype(np.float32)
    assert statistics.uses_rows(x.shape, (1,), None)  # the rows variant is the one under test
    x[0] += 3e5  # |μ|/σ = 3e5: Σx/n is off by many ulp(σ)
    x[1] *= 1e-17  # tiny values: σ² = 1e-34, near the smallest normal float
    x[2, 17] = 1e18  # one element carries all of σ
    x[3] = np.float32(1e7) + np.arange(1000, dtype=np.float32)  # integers beyond 2^23: exact data
    mean, var = bnjax.moments(jnp.asarray(x), axis=-1)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(var, x64.var(axis=-1), rtol=2e-6)
    scale = np.abs(x64.mean(axis=-1)) + x64.std(axis=-1)  # the mean's error is relative to |μ| + σ
    np.testing.assert_array_less(np.abs(mean - x64.mean(axis=-1)), 2e-7 * scale)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input_has_float32_statistics(dtype):
    x, x64 = data((64, 6), dtype, loc=50.0, scale=2.0)
    mean, var = bnjax.moments(x, 0)
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32
    m_ref, v_ref, _ = ref.moments(x64, 0)
    np.testing.assert_allclose(mean, m_ref.reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(var, v_ref.reshape(-1), rtol=1e-5)


def test_mask_with_no_valid_element_gives_zero_statistics_and_finite_output():
    x, _ = data((5, 3))
    mask = jnp.zeros((5, 1), bool)
    mean, var = bnjax.moments(x, 0, mask=mask)
    np.testing.assert_array_equal(mean, 0)
    np.testing.assert_array_equal(var, 0)
    stats = bnjax.init_stats(3)
    y, new = bnjax.batch_norm(x, bnjax.init_params(3), stats, training=True, mask=mask)
    assert np.isfinite(np.asarray(y)).all()
    jax.tree.map(np.testing.assert_array_equal, new, stats)


def _equations(jaxpr):
    """Every equation of a jaxpr, those of the jaxprs inside its equations included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize(
    "shape, axes, mask_shape",
    [
        ((4, 3, 5), (2,), (4, 3, 1)),  # layer norm with a per-token mask: constant along the statistic
        ((4, 3, 5), (0,), (4, 1, 1)),  # batch norm with a per-example mask
        ((4, 3, 5), (0, 2), (4, 1, 5)),
        ((4, 3, 5), (0, 1, 2), (1, 3, 1)),
        ((2, 4, 3, 5), (1, 3), (2, 4, 1, 1)),
        ((2, 4, 3, 5), (0, 2, 3), (1, 1, 3, 5)),
    ],
)
def test_shift_and_count_search_the_mask_at_its_own_shape(shape, axes, mask_shape):
    """The columns method's shift K is x's first valid element in the order of the reduced axes,
    and n the number of valid elements. Both are found on the mask's own shape (the first valid
    index is 0 along a reduced axis where the mask has size 1), never on its broadcast to x: that
    was an argmax over all of x and, for a mask known at compile time, a constant fold that took
    about 45 s to compile a (64, 256, 512) layer norm."""
    rng = np.random.default_rng(sum(shape) + len(axes))
    x = rng.standard_normal(shape).astype(np.float32)
    for trial in range(4):
        mask = rng.random(mask_shape) < (0.3 if trial else 0.0)  # the first trial has no valid element
        k = np.asarray(statistics._shift(jnp.asarray(x), axes, jnp.asarray(mask)))
        n = np.asarray(statistics.count(jnp.asarray(x), axes, jnp.asarray(mask), jnp.float32))
        kept = [a for a in range(x.ndim) if a not in axes]
        perm = list(axes) + kept
        flat_mask = np.transpose(np.broadcast_to(mask, shape), perm).reshape(-1, *(shape[a] for a in kept))
        flat_x = np.transpose(x, perm).reshape(flat_mask.shape)
        first = np.take_along_axis(flat_x, np.argmax(flat_mask, axis=0)[None], axis=0)[0]
        keep_shape = tuple(1 if a in axes else shape[a] for a in range(x.ndim))
        np.testing.assert_array_equal(k, first.reshape(keep_shape))
        np.testing.assert_array_equal(n, flat_mask.sum(axis=0).reshape(keep_shape))
    big = jnp.zeros((64, 16, 32), jnp.float32)
    token_mask = jnp.ones((64, 16, 1), bool)
    jaxpr = jax.make_jaxpr(lambda x, m: bnjax.layer_norm(x, bnjax.init_params(32), mask=m))(big, token_mask)
    # the search: a reduction over integers (indices), however it is spelled
    searched = [
        e.invars[0].aval.size
        for e in _equations(jaxpr.jaxpr)
        if e.primitive.name in ("argmax", "argmin", "reduce_min", "reduce_max")
        and jnp.issubdtype(e.invars[0].aval.dtype, jnp.integer)
    ]
    assert searched and max(searched) <= token_mask.size, searched


def test_moments_gradient_matches_float64_formula():
    x, x64 = data((7, 3), seed=2)
    dvar = jax.grad(lambda x: jnp.sum(bnjax.moments(x, 0)[1] * jnp.arange(1.0, 4.0)))(x)
    n = x.shape[0]
    expected = 2 * (x64 - x64.mean(0)) / n * np.arange(1.0, 4.0)
    np.testing.assert_allclose(dvar, expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    data_=st.data(),
)
def test_moments_property_any_axes_and_mask(shape, data_):
    shape = tuple(shape)
    axes = tuple(sorted(data_.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
    seed = data_.draw(st.integers(0, 2**16))
    loc = data_.draw(st.sampled_from([0.0, 10.0, -3e3]))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) + loc).astype(np.float32)
    mask_shape = tuple(s if data_.draw(st.booleans()) else 1 for s in shape)
    mask = rng.random(mask_shape) < 0.7
    mean, var = bnjax.moments(jnp.asarray(x), axes, mask=mask, keepdims=True)
    m_ref, v_ref, _ = ref.moments(x, axes, mask)
    np.testing.assert_allclose(mean, m_ref, rtol=1e-5, atol=1e-5 * (1 + abs(loc)))
    np.testing.assert_allclose(var, v_ref, rtol=2e-5, atol=1e-5)
