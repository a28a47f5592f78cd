"""The contract at its edges: padding that holds NaN, traced hyper-parameters, empty and
degenerate batches, configurations that contradict themselves, and which backward pass runs.

Each test here failed before the fix it guards (see the README's "Errors" and "Conventions").
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.linen
import bnjax.nnx
from tests import reference as ref
from tests.helpers import data, params

# ---------------------------------------------------------------------------------------------
# Padding never influences anything (statistics, running state, outputs at valid positions)


def _bn(x, stats, mask, **kw):
    return bnjax.batch_norm(x, params(x.shape[-1]), stats, training=True, mask=mask, **kw)


def test_all_masked_batch_with_nan_leaves_state_and_finite_positions_alone():
    x, _ = data((6, 3))
    x = x.at[0, 1].set(jnp.nan).at[2, 0].set(jnp.inf)
    stats = bnjax.init_stats(3)
    y, new = jax.jit(lambda x: _bn(x, stats, np.zeros((6, 1), bool)))(x)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(stats), strict=True):
        np.testing.assert_array_equal(a, b)
    finite = np.isfinite(np.asarray(x))
    assert np.isfinite(np.asarray(y)[finite]).all()


def test_sync_batch_norm_ignores_a_device_whose_shard_is_all_padding_and_nan():
    mesh = Mesh(np.array(jax.devices()), ("d",))
    x, x64 = data((8 * 4, 5))
    mask = np.ones((32, 1), bool)
    mask[8:12] = False  # device 2's whole shard
    poisoned = x.at[8:12].set(jnp.nan)
    stats = bnjax.init_stats(5)

    def local(x, mask):
        y, new = bnjax.batch_norm(x, params(5), stats, training=True, mask=mask, axis_name="d")
        return y, new

    run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=(P("d"), P())))
    y, new = run(poisoned, mask)
    mean, var, _ = ref.moments(x64, (0,), mask)
    np.testing.assert_allclose(new.mean, mean[0], rtol=1e-6)
    np.testing.assert_allclose(new.var, var[0], rtol=1e-5)
    np.testing.assert_array_equal(new.skipped, 0)
    assert int(new.count) == 1
    y_clean, new_clean = run(x, mask)
    np.testing.assert_array_equal(np.asarray(y)[mask[:, 0]], np.asarray(y_clean)[mask[:, 0]])
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new_clean), strict=True):
        np.testing.assert_array_equal(a, b)


def test_vmap_axis_name_with_one_example_all_padding_and_nan():
    x, x64 = data((4, 6, 3))
    mask = np.ones((4, 6, 1), bool)
    mask[1] = False
    poisoned = x.at[1].set(jnp.nan)
    stats = bnjax.init_stats(3)
    f = lambda x, m: bnjax.batch_norm(x, None, stats, training=True, mask=m, axis_name="b")  # noqa: E731
    y, new = jax.vmap(f, axis_name="b", out_axes=(0, None))(poisoned, mask)
    mean, var, _ = ref.moments(x64.reshape(24, 3), (0,), mask.reshape(24, 1))
    np.testing.assert_allclose(new.mean, mean[0], rtol=1e-6)
    np.testing.assert_allclose(new.var, var[0], rtol=1e-5)
    np.testing.assert_array_equal(new.skipped, 0)
    assert np.isfinite(np.asarray(y)[mask[:, :, 0]]).all()


@pytest.mark.parametrize("method", ["layer_norm", "rms_norm", "group_norm", "instance_norm"])
def test_a_row_with_no_valid_element_gives_finite_output(method):
    x, _ = data((3, 4, 4, 8))
    mask = np.ones((3, 4, 4, 1), bool)
    mask[1] = False  # example 1: nothing valid in any of its rows
    fn = {
        "layer_norm": lambda x, m: bnjax.layer_norm(x, params(8), mask=m),
        "rms_norm": lambda x, m: bnjax.rms_norm(x, params(8), mask=m),
        "group_norm": lambda x, m: bnjax.group_norm(x, params(8), num_groups=2, mask=m),
        "instance_norm": lambda x, m: bnjax.instance_norm(x, params(8), mask=m),
    }[method]
    y = jax.jit(fn)(x, mask)
    assert np.isfinite(np.asarray(y)).all()


# ---------------------------------------------------------------------------------------------
# The fused backward pass runs wherever it can (a silent fallback to autodiff is a defect)


def _has_custom_vjp(fn, *args) -> bool:
    return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


def test_custom_vjp_runs_under_shard_map_and_pmap_and_not_under_vmap():
    mesh = Mesh(np.array(jax.devices()), ("d",))
    x, _ = data((32, 5))
    p = params(5)
    stats = bnjax.init_stats(5)

    def local(x, p):
        return bnjax.batch_norm(x, p, stats, training=True, axis_name="d")[0]

    for check_vma in (True, False):
        sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"), check_vma=check_vma)
        assert _has_custom_vjp(sharded, x, p), f"check_vma={check_vma}"
    pmapped = jax.pmap(local, axis_name="d", in_axes=(0, None))
    assert _has_custom_vjp(pmapped, x.reshape(8, 4, 5), p)
    # vmap axes: JAX traces the backward rule outside them, so autodiff runs there (documented)
    vmapped = jax.vmap(local, axis_name="d", in_axes=(0, None))
    assert not _has_custom_vjp(vmapped, x.reshape(8, 4, 5), p)
    # and the layer norm of the plain (single-device) path
    assert _has_custom_vjp(lambda x: bnjax.layer_norm(x, p), x)
    assert not _has_custom_vjp(lambda x: bnjax.layer_norm(x, p, fused_backward=False), x)


def test_pmap_fused_backward_equals_autodiff():
    x, _ = data((8, 4, 5))
    p = params(5)
    ct = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape), jnp.float32)

    def loss(fb):
        def local(x, ct, p):
            y, _ = bnjax.batch_norm(x, p, bnjax.init_stats(5), training=True, axis_name="d", fused_backward=fb)
            return jax.lax.psum(jnp.sum(y * ct), "d")

        pm = jax.pmap(local, axis_name="d", in_axes=(0, 0, None))
        return lambda x, p: pm(x, ct, p)[0]

    fused = jax.grad(loss(True), argnums=(0, 1))(x, p)
    auto = jax.grad(loss(False), argnums=(0, 1))(x, p)
    for f, a in zip(jax.tree.leaves(fused), jax.tree.leaves(auto), strict=True):
        np.testing.assert_allclose(f, a, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Traced hyper-parameters

EPS_METHODS = {
    "batch_norm": lambda x, eps, fb: bnjax.batch_norm(
        x, params(8), bnjax.init_stats(8), training=True, eps=eps, fused_backward=fb
    )[0],
    "layer_norm": lambda x, eps, fb: bnjax.layer_norm(x, params(8), eps=eps, fused_backward=fb),
    "layer_norm_rows": lambda x, eps, fb: bnjax.layer_norm(
        jnp.tile(x, (2048, 1, 1, 1)).reshape(-1, 8), params(8), eps=eps, fused_backward=fb
    ),
    "rms_norm": lambda x, eps, fb: bnjax.rms_norm(x, params(8), eps=eps, fused_backward=fb),
    "group_norm": lambda x, eps, fb: bnjax.group_norm(x, params(8), num_groups=2, eps=eps, fused_backward=fb),
    "masked_batch_norm": lambda x, eps, fb: jnp.where(
        MASK,
        bnjax.batch_norm(x, params(8), bnjax.init_stats(8), training=True, eps=eps, mask=MASK, fused_backward=fb)[0],
        0,
    ),
}
MASK = np.arange(4)[:, None, None, None] < 3


@pytest.mark.parametrize("name", sorted(EPS_METHODS))
def test_traced_eps_works_and_has_the_right_gradient(name):
    fn = EPS_METHODS[name]
    x, _ = data((4, 3, 1, 8), loc=0.0, scale=0.05)  # σ² (and E[x²]) comparable to ε, so that ε matters
    eps = 1e-3
    static = fn(x, eps, True)
    # traced or not, the same value (up to XLA's own rounding differences between programs)
    np.testing.assert_allclose(jax.jit(lambda e: fn(x, e, True))(eps), static, rtol=1e-6, atol=1e-6)
    batched = jax.vmap(lambda e: fn(x, e, True))(jnp.array([eps, 1e-2]))
    np.testing.assert_allclose(batched[0], static, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batched[1], fn(x, 1e-2, True), rtol=1e-6, atol=1e-6)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(static.shape), jnp.float32)
    grads = [jax.grad(lambda e, fb=fb: jnp.sum(fn(x, e, fb) * ct))(jnp.float32(eps)) for fb in (True, False)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=2e-3)
    h = 1e-5  # central difference in float64 arithmetic of the float32 function
    numeric = (jnp.sum(fn(x, eps + h, True) * ct) - jnp.sum(fn(x, eps - h, True) * ct)) / (2 * h)
    np.testing.assert_allclose(grads[0], numeric, rtol=2e-2)


def test_traced_eps_inside_shard_map_sync_batch_norm():
    mesh = Mesh(np.array(jax.devices()), ("d",))
    x, _ = data((32, 5))

    def local(x, eps):
        return bnjax.batch_norm(x, params(5), bnjax.init_stats(5), training=True, axis_name="d", eps=eps)[0]

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d")))
    full = bnjax.batch_norm(x, params(5), bnjax.init_stats(5), training=True, eps=1e-2)[0]
    np.testing.assert_allclose(f(x, jnp.float32(1e-2)), full, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda e: jnp.sum(f(x, e) ** 3))(jnp.float32(1e-2))
    g_full = jax.grad(
        lambda e: jnp.sum(bnjax.batch_norm(x, params(5), bnjax.init_stats(5), training=True, eps=e)[0] ** 3)
    )(jnp.float32(1e-2))
    np.testing.assert_allclose(g, g_full, rtol=1e-4)


@pytest.mark.parametrize("momentum", [1.5, -0.2, 1.0, float("nan")])
def test_traced_momentum_out_of_range_applies_no_update(momentum):
    x, _ = data((8, 3))
    stats = bnjax.init_stats(3)
    warm = _bn(x, stats, None)[1]
    new = jax.jit(lambda m: _bn(x * 3.0, warm, None, momentum=m)[1])(momentum)
    np.testing.assert_array_equal(new.mean, warm.mean)
    np.testing.assert_array_equal(new.var, warm.var)
    np.testing.assert_array_equal(new.skipped, warm.skipped + 1)  # visible: counted as skipped
    assert int(new.count) == int(warm.count) + 1
    # a traced momentum in range is the static one (up to XLA's rounding differences between programs)
    good = jax.jit(lambda m: _bn(x * 3.0, warm, None, momentum=m)[1])(0.8)
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(_bn(x * 3.0, warm, None, momentum=0.8)[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_running_variance_never_becomes_negative_or_non_finite():
    x, _ = data((8, 3))
    stats = bnjax.BatchStats(jnp.zeros(3), jnp.full(3, 3e38), jnp.array(5), jnp.zeros(3, jnp.int32))
    new = _bn(x * 1e19, stats, None, debias=False)[1]  # var ≈ 9e38·(1 − m): overflows float32
    assert np.isfinite(np.asarray(new.var)).all() and (np.asarray(new.var) >= 0).all()


# ---------------------------------------------------------------------------------------------
# Checks that could be bypassed


def test_a_mask_does_not_bypass_the_single_element_check():
    with pytest.raises(ValueError, match="single element"):
        bnjax.batch_norm(jnp.ones((1, 3)), None, bnjax.init_stats(3), training=True, mask=np.ones((1, 1), bool))


def test_batch_stats_without_skipped_keep_the_debiased_start_after_a_bad_batch():
    x, x64 = data((8, 3))
    stats = bnjax.BatchStats(jnp.zeros(3), jnp.ones(3), jnp.array(0, jnp.int32))  # skipped=None
    after_bad = _bn(x.at[0, 1].set(jnp.nan), stats, None)[1]
    assert int(after_bad.count) == 0  # applied to no feature, so not counted
    after_good = _bn(x, after_bad, None)[1]
    mean, var, _ = ref.moments(x64, (0,))
    np.testing.assert_allclose(after_good.mean, mean[0], rtol=1e-6)  # the batch itself: first update
    np.testing.assert_allclose(after_good.var, var[0], rtol=1e-5)


@pytest.mark.parametrize("rule", [dict(debias=True), dict(momentum=None)])
def test_track_updates_false_with_a_rule_that_needs_counts_raises(rule):
    with pytest.raises(ValueError, match="track_updates=False"):
        bnjax.linen.BatchNorm(use_running_average=False, track_updates=False, **rule).init(
            jax.random.key(0), jnp.ones((4, 3))
        )
    with pytest.raises(ValueError, match="track_updates=False"):
        bnjax.nnx.BatchNorm(3, track_updates=False, rngs=nnx.Rngs(0), **rule)


def test_debiased_linen_batch_norm_refuses_to_discard_a_flax_checkpoint():
    x, _ = data((8, 3))
    flax_vars = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    flax_vars = {"params": flax_vars["params"], "batch_stats": {"mean": jnp.full(3, 2.0), "var": jnp.full(3, 4.0)}}
    layer = bnjax.linen.BatchNorm(debias=True)
    with pytest.raises(ValueError, match=r"no 'count'.*discard the loaded statistics"):
        layer.apply(flax_vars, x, use_running_average=False, mutable=["batch_stats"])
    # evaluation needs no count: the checkpoint's statistics are used as they are
    y = layer.apply(flax_vars, x, use_running_average=True)
    np.testing.assert_allclose(y, (x - 2.0) / np.sqrt(4.0 + 1e-5), rtol=1e-5, atol=1e-6)


def test_linen_spectral_norm_update_without_mutable_batch_stats_raises():
    layer = bnjax.linen.SpectralNorm(nn.Dense(3))
    v = layer.init(jax.random.key(0), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="mutable 'batch_stats'"):
        layer.apply(v, jnp.ones((2, 4)), update_stats=True)


# ---------------------------------------------------------------------------------------------
# Empty inputs (PyTorch's behaviour: an empty output, the statistics unchanged)


@pytest.mark.parametrize("masked", [False, True])
def test_empty_batch_gives_empty_output_and_leaves_the_state(masked):
    stats = bnjax.init_stats(3)
    mask = np.ones((0, 1), bool) if masked else None
    y, new = jax.jit(lambda x: bnjax.batch_norm(x, params(3), stats, training=True, mask=mask))(jnp.ones((0, 3)))
    assert y.shape == (0, 3)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(stats), strict=True):
        np.testing.assert_array_equal(a, b)
    g = jax.grad(lambda x: jnp.sum(bnjax.batch_norm(x, params(3), stats, training=True, mask=mask)[0]))
    assert g(jnp.ones((0, 3))).shape == (0, 3)


def test_empty_reductions_elsewhere():
    mean, var = bnjax.moments(jnp.ones((0, 3)), 0)
    assert mean.shape == var.shape == (3,) and not np.asarray(mean).any() and not np.asarray(var).any()
    mean, var = bnjax.moments(jnp.ones((0, 3)), 0, keepdims=True)
    assert mean.shape == var.shape == (1, 3)
    assert bnjax.layer_norm(jnp.ones((0, 5)), params(5)).shape == (0, 5)
    assert bnjax.rms_norm(jnp.ones((2, 0)), bnjax.init_params(0)).shape == (2, 0)
    assert bnjax.group_norm(jnp.ones((0, 4, 4, 8)), params(8), num_groups=2).shape == (0, 4, 4, 8)


def test_weights_with_no_output_unit_or_no_fan_in():
    """Empty weights give empty results (spectral norm raised a ZeroDivisionError from reshape)."""
    w_sn, u, sigma = bnjax.spectral_norm(jnp.zeros((3, 0)), jnp.zeros(0), return_sigma=True)
    assert w_sn.shape == (3, 0) and u.shape == (0,) and float(sigma) == 0
    assert bnjax.spectral_norm_init(jax.random.key(0), jnp.zeros((3, 0))).shape == (0,)
    assert bnjax.weight_norm(jnp.zeros((0, 4)), jnp.ones(4)).shape == (0, 4)
    assert bnjax.weight_norm_init(jnp.zeros((0, 4))).shape == (4,)
    assert bnjax.cosine_norm(jnp.ones((2, 3)), jnp.ones((3, 0))).shape == (2, 0)


# ---------------------------------------------------------------------------------------------
# Integer-like and structured arguments


def test_integer_like_arguments_are_accepted():
    x, _ = data((2, 4, 4, 8))
    expected = bnjax.group_norm(x, params(8), num_groups=2)
    np.testing.assert_array_equal(bnjax.group_norm(x, params(8), num_groups=np.int64(2)), expected)
    np.testing.assert_array_equal(bnjax.layer_norm(x, params(8), axis=jnp.array(-1)), bnjax.layer_norm(x, params(8)))
    np.testing.assert_array_equal(bnjax.layer_norm(x, params(8), axis=np.int32(3)), bnjax.layer_norm(x, params(8)))
    # Haiku's slice convention: every axis but the batch one
    p = params((4, 4, 8))
    np.testing.assert_array_equal(bnjax.layer_norm(x, p, axis=slice(1, None)), bnjax.layer_norm(x, p, axis=(1, 2, 3)))


def test_zero_one_masks_of_any_dtype_equal_the_boolean_one():
    x, _ = data((6, 3))
    mask = np.array([1, 0, 1, 1, 0, 1])[:, None]
    expected = _bn(x, bnjax.init_stats(3), mask.astype(bool))
    for m in (mask, mask.astype(np.float32), jnp.asarray(mask, jnp.int8)):
        for a, b in zip(jax.tree.leaves(_bn(x, bnjax.init_stats(3), m)), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)
    run = jax.jit(lambda m: _bn(x, bnjax.init_stats(3), m))
    traced_int, traced_bool = run(jnp.asarray(mask, jnp.int32)), run(jnp.asarray(mask, bool))
    for a, b in zip(jax.tree.leaves(traced_int), jax.tree.leaves(traced_bool), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Range: finite input whose spread overflows float32 statistics (σ² beyond 3.4e38, or x − μ near
# the float32 maximum). The columns method computes the moments of x·2^−k again (statistics,
# "Range"); the rows method (layer/RMS norm, 4096 rows or more, no mask) marks the rows beyond
# its range and computes those again from x·2^−k per row. The weight-side methods compute on w·s
# from the start (weights are small).


def _wide(shape, kind: str, seed: int = 0) -> np.ndarray:
    """float32 data whose spread overflows float32 moments: values up to ±3.3e38 ("max"), or a
    spread of about 1e25 around an offset of 1e25 ("spread")."""
    rng = np.random.default_rng(seed)
    if kind == "max":
        x = np.clip(rng.standard_normal(shape) * 1e38, -3.3e38, 3.3e38)
        x.reshape(-1, shape[-1])[0, :2] = 3.3e38, -3.3e38
    else:
        x = rng.standard_normal(shape) * 1e25 + 1e25
    return x.astype(np.float32)


_P8 = params(8)
_RANGE = {
    # name: (x shape, bnjax function of (x, mask), float64 reference of x)
    "layer_norm": ((8, 8), lambda x, m: bnjax.layer_norm(x, _P8, mask=m), lambda x: ref.layer_norm(x, *_P8)),
    "rms_norm": ((8, 8), lambda x, m: bnjax.rms_norm(x, _P8, mask=m), lambda x: ref.rms_norm(x, *_P8)),
    "batch_norm": (
        (16, 8),
        lambda x, m: bnjax.batch_norm(x, _P8, bnjax.init_stats(8), training=True, mask=m)[0],
        lambda x: ref.batch_norm_train(x, *_P8)[0],
    ),
    "group_norm": (
        (2, 4, 4, 8),
        lambda x, m: bnjax.group_norm(x, _P8, num_groups=2),
        lambda x: ref.group_norm(x, *_P8, num_groups=2),
    ),
    "instance_norm": (
        (2, 4, 4, 8),
        lambda x, m: bnjax.instance_norm(x, _P8),
        lambda x: ref.instance_norm(x, *_P8),
    ),
}


@pytest.mark.parametrize("kind", ["max", "spread"])
@pytest.mark.parametrize("name", sorted(_RANGE))
def test_finite_input_beyond_float32_moments_gives_the_right_output(name, kind):
    shape, f, reference = _RANGE[name]
    x = _wide(shape, kind)
    y = np.asarray(jax.jit(lambda x: f(x, None))(x), np.float64)
    np.testing.assert_allclose(y, reference(x), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "batch_norm"])
def test_overflow_fallback_with_nan_padding(name):
    """Masked, rows-shaped layer/RMS norm takes the columns method, checked; padding holds NaN."""
    shape, f, reference = _RANGE[name]
    x = _wide((4096, 8) if name != "batch_norm" else shape, "max")
    mask = np.ones((x.shape[0], 1), bool)
    mask[::3] = False
    poisoned = np.where(mask, x, np.nan).astype(np.float32)
    y = np.asarray(jax.jit(f)(poisoned, mask), np.float64)
    valid = np.broadcast_to(mask, x.shape)
    if name == "batch_norm":
        expected = ref.batch_norm_train(x, *_P8, mask=mask)[0]
    else:
        expected = reference(x)
    np.testing.assert_allclose(y[valid], expected[valid], atol=2e-5, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["max", "spread"])
def test_gradient_beyond_float32_moments_against_float64(kind, fused):
    """Batch norm's and (columns) layer norm's dx against the float64 closed form."""
    x = _wide((16, 8), kind)
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    g = jnp.asarray(np.random.default_rng(4).uniform(0.5, 1.5, 8), jnp.float32)
    p = bnjax.NormParams(g, jnp.zeros(8))

    def bn(x):
        return bnjax.batch_norm(x, p, bnjax.init_stats(8), training=True, fused_backward=fused)[0]

    def ln(x):  # g = 1: layer norm of x is batch norm of xᵀ
        return bnjax.layer_norm(x, bnjax.init_params(8), fused_backward=fused)

    for f, expected in (
        (bn, ref.batch_norm_train_vjp(x, g, dy)[0]),
        (ln, ref.batch_norm_train_vjp(x.T, None, dy.T)[0].T),
    ):
        dx = jax.jit(jax.grad(lambda x, f=f: jnp.sum(f(x) * dy)))(x)
        # dx ~ 1/σ: near the float32 maximum that is near the smallest normal number, below which
        # XLA flushes to zero
        atol = 2e-5 * np.max(np.abs(expected)) + 2 * np.finfo(np.float32).tiny
        np.testing.assert_allclose(np.asarray(dx, np.float64), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["max", "spread"])
def test_group_norm_gradient_beyond_float32_moments(kind):
    """Group norm's backward pass sums by parts (per channel over the spatial axes first), its
    fallback too: dx, dg and db against autodiff of the scaled forward pass (fused_backward=False),
    down to the subnormal floor that dx ~ 1/σ reaches near the float32 maximum."""
    x = _wide((2, 4, 4, 8), kind)
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    p = bnjax.NormParams(jnp.asarray(np.random.default_rng(4).uniform(0.5, 1.5, 8), jnp.float32), jnp.zeros(8))

    def grads(fused):
        loss = lambda x, p: jnp.sum(bnjax.group_norm(x, p, num_groups=2, fused_backward=fused) * dy)  # noqa: E731
        return jax.tree.leaves(jax.jit(jax.grad(loss, argnums=(0, 1)))(x, p))

    for got, expected in zip(grads(True), grads(False), strict=True):
        got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
        assert np.isfinite(got).all()
        atol = 2e-5 * np.max(np.abs(expected)) + 2 * np.finfo(np.float32).tiny
        np.testing.assert_allclose(got, expected, atol=atol, rtol=0)


def test_forward_mode_and_eps_gradient_beyond_float32_moments():
    x = _wide((16, 8), "max")
    t = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    f = lambda x: bnjax.layer_norm(x, _P8, fused_backward=False)  # noqa: E731
    y, dy = jax.jvp(f, (x,), (t,))
    assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(dy)).all()
    deps = jax.grad(lambda e: jnp.sum(bnjax.batch_norm(x, _P8, bnjax.init_stats(8), training=True, eps=e)[0] ** 2))
    assert np.isfinite(float(deps(1e-5)))


def test_running_statistics_skip_only_the_features_whose_variance_overflows():
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    x[:, 1] *= 1e25  # σ² ≈ 1e50: beyond float32, skipped
    x[:, 2] = x[:, 2] * 1e15 + 3e38  # near the maximum, σ² ≈ 1e30: representable, updated
    y, new = bnjax.batch_norm(x, params(4), bnjax.init_stats(4), training=True, momentum=0.5, debias=False)
    mean, var, _ = ref.moments(x, 0)
    np.testing.assert_array_equal(np.asarray(new.skipped), [0, 1, 0, 0])
    np.testing.assert_allclose(np.asarray(new.mean)[[0, 2, 3]], 0.5 * mean.ravel()[[0, 2, 3]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new.var)[[0, 2, 3]], 0.5 + 0.5 * var.ravel()[[0, 2, 3]], rtol=1e-5)
    assert float(new.mean[1]) == 0.0 and float(new.var[1]) == 1.0
    np.testing.assert_allclose(np.asarray(y, np.float64), ref.batch_norm_train(x, *params(4))[0], atol=2e-5)


def test_sync_batch_norm_where_only_the_union_overflows():
    """Each device's data is narrow (σ ≈ 1e20), but the devices sit at ±1e30: only the merged
    moments overflow. shard_map over 8 devices against float64 over the whole batch."""
    rng = np.random.default_rng(0)
    offsets = np.where(np.arange(8) % 2, 1e30, -1e30)[:, None, None]
    x = (rng.standard_normal((8, 4, 6)) * 1e20 + offsets).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    p = params(6)

    def local(x):
        return bnjax.batch_norm(x[0], p, bnjax.init_stats(6), training=True, axis_name="d")[0][None]

    def loss(x):
        return jnp.sum(jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=P("d"))(x) ** 2)

    y = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=P("d")))(x)
    expected = ref.batch_norm_train(x.reshape(32, 6), *p)[0].reshape(x.shape)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=2e-5, rtol=0)
    assert np.isfinite(np.asarray(jax.jit(jax.grad(loss))(x))).all()


def test_under_vmap_each_member_gets_its_own_result():
    """One member overflows, the others do not: theirs are bit-identical to the unbatched call."""
    x = np.random.default_rng(1).standard_normal((3, 16, 8)).astype(np.float32)
    x[1] = _wide((16, 8), "max")
    f = jax.jit(lambda x: bnjax.batch_norm(x, _P8, bnjax.init_stats(8), training=True)[0])
    batched = np.asarray(jax.vmap(f)(x))
    for i in range(3):
        np.testing.assert_array_equal(batched[i], np.asarray(f(x[i])))
    np.testing.assert_allclose(batched[1], ref.batch_norm_train(x[1], *_P8)[0], atol=2e-5)


def test_the_fallback_is_not_hoisted_out_of_its_loop():
    """XLA moves loop-invariant work out of a while loop; the fallback enters its loop through a
    barrier so that it cannot. Were it hoisted, it would run on every call (three passes over x),
    and its instructions would sit in the entry computation."""
    x = jnp.ones((64, 16))

    def step(x):
        (_, stats), vjp = jax.vjp(lambda x: bnjax.batch_norm(x, _P16, bnjax.init_stats(16), training=True), x)
        return vjp((x, jax.tree.map(jnp.zeros_like, stats)))[0]

    for fn in (step, jax.vmap(step)):
        hlo = jax.jit(fn).lower(x if fn is step else x[None]).compile().as_text()
        entry = hlo[hlo.index("ENTRY") :]
        assert "while/body" not in entry
        assert hlo.count("while/body") > 0


_P16 = params(16)


_ROWS = {  # layer and RMS norm over 4096 rows or more, unmasked: the statistics' rows method
    "layer_norm": (bnjax.layer_norm, ref.layer_norm),
    "rms_norm": (bnjax.rms_norm, ref.rms_norm),
}


@pytest.mark.parametrize("shape", [(4096, 8), (16, 256, 8)])
@pytest.mark.parametrize("kind", ["max", "spread"])
@pytest.mark.parametrize("name", sorted(_ROWS))
def test_rows_method_beyond_float32_moments(name, kind, shape):
    """The rows method marks each row beyond its range, and the output is computed again from
    moments scaled per row: right to float32's floor up to ±3.3e38, in 2-D and 3-D."""
    from bnjax._src import statistics

    f, reference = _ROWS[name]
    x = _wide(shape, kind)
    assert statistics.uses_rows(x.shape, (x.ndim - 1,), None)
    y = np.asarray(jax.jit(lambda x: f(x, _P8))(x), np.float64)
    np.testing.assert_allclose(y, reference(x, *_P8), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(_ROWS))
def test_rows_method_beyond_float32_moments_in_bfloat16(name):
    f, reference = _ROWS[name]
    x = jnp.asarray(_wide((4096, 8), "max"), jnp.bfloat16)
    y = np.asarray(jax.jit(lambda x: f(x, _P8))(x).astype(jnp.float32), np.float64)
    np.testing.assert_allclose(y, reference(np.asarray(x.astype(jnp.float32)), *_P8), atol=2e-2, rtol=0)


@pytest.mark.parametrize("kind", ["max", "spread"])
@pytest.mark.parametrize("name", sorted(_ROWS))
def test_rows_method_gradient_beyond_float32_moments(name, kind):
    """dx, dg, db and dε of the rows method's fallback (fused, on x·s per row) against autodiff of
    the scaled forward pass (fused_backward=False), down to the subnormal floor that dx ~ 1/σ
    reaches near the float32 maximum; with parameters per feature (on a 2-D view of x) and per
    example (on x's own shape), and with g shared along one of the normalized axes."""
    f = _ROWS[name][0]
    rng = np.random.default_rng(4)
    cases = [
        ((16, 256, 8), dict(), (8,)),
        ((16, 256, 8), dict(), (16, 1, 8)),  # per example
        ((4096, 2, 4), dict(axis=(1, 2), feature_axis=-1), (4,)),  # g along the last axis only
    ]
    for shape, kwargs, pshape in cases:
        x = _wide(shape, kind)
        dy = rng.standard_normal(shape).astype(np.float32)
        p = bnjax.NormParams(jnp.asarray(rng.uniform(0.5, 1.5, pshape), jnp.float32), jnp.zeros(pshape))

        def grads(fused, x=x, dy=dy, p=p, kwargs=kwargs):
            loss = lambda x, p, e: jnp.sum(f(x, p, eps=e, fused_backward=fused, **kwargs) * dy)  # noqa: E731
            return jax.tree.leaves(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, p, 1e-5))

        for got, expected in zip(grads(True), grads(False), strict=True):
            got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
            assert np.isfinite(got).all()
            atol = 2e-5 * np.max(np.abs(expected)) + 4 * np.finfo(np.float32).tiny
            np.testing.assert_allclose(got, expected, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("rows", [4095, 4096])
@pytest.mark.parametrize("kind", ["max", "spread"])
@pytest.mark.parametrize("name", sorted(_ROWS))
def test_layer_and_rms_norm_gradient_beyond_float32_moments_against_float64(name, kind, rows, fused):
    """g = 1: layer norm's dx is batch norm's of xᵀ (float64 closed form); RMS norm's against a
    float64 vjp written out here: dx = (dy − x̂·mean(dy·x̂))/σ with x̂ = x/σ, σ² = mean x² + ε.
    4095 rows take the columns method, 4096 the rows method; fused_backward=False differentiates
    the scaled moments (with L = 42 its RMS norm dx was up to 10 % off: ``spread_limit``)."""
    f = _ROWS[name][0]
    x = _wide((rows, 8), kind)
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(f(x, bnjax.init_params(8), fused_backward=fused) * dy)))(x)
    if name == "layer_norm":
        expected = ref.batch_norm_train_vjp(x.T, None, dy.T)[0].T
    else:
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        sigma = np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6)
        xhat = x64 / sigma
        expected = (dy64 - xhat * (dy64 * xhat).mean(-1, keepdims=True)) / sigma
    atol = 2e-5 * np.max(np.abs(expected)) + 4 * np.finfo(np.float32).tiny
    np.testing.assert_allclose(np.asarray(dx, np.float64), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("center", [True, False])
def test_rows_method_marks_exactly_the_rows_beyond_its_range(center):
    """Rows within ``row_limit`` get the moments of the unmarked rows method bit for bit; a row
    just beyond it, a row with inf and a row with NaN get NaN moments."""
    from bnjax._src import statistics

    x = np.random.default_rng(0).standard_normal((4096, 8)).astype(np.float32)
    limit = statistics.row_limit(np.float32, 8, center)
    x[1, 3] = np.nextafter(np.float32(limit), np.float32(0))  # within
    x[2, 5] = -np.nextafter(np.float32(limit), np.float32(0))
    x[3, 0] = np.nextafter(np.float32(limit), np.float32(np.inf))  # beyond
    x[4, 7] = -np.nextafter(np.float32(limit), np.float32(np.inf))
    x[5, 2], x[6, 1] = np.inf, np.nan
    marked = jax.jit(lambda x: statistics.local_moments(x, (1,), center=center))(x)
    plain = jax.jit(lambda x: statistics.local_moments(x, (1,), center=center, marked=False))(x)
    beyond = np.zeros(4096, bool)
    beyond[3:7] = True
    for a, b in zip(marked, plain, strict=True):
        a, b = np.broadcast_to(np.asarray(a), (4096, 1))[:, 0], np.broadcast_to(np.asarray(b), (4096, 1))[:, 0]
        np.testing.assert_array_equal(a[~beyond], b[~beyond])
    # the mark: μ = K + δ is NaN for layer norm (K for x beyond the limit, δ for NaN in x), so
    # x − μ and the output are; M₂ about 0, so 1/σ and the output are
    carrier = marked.shift + marked.offset if center else marked.m2
    assert np.isnan(np.broadcast_to(np.asarray(carrier), (4096, 1))[beyond]).all()


@pytest.mark.parametrize("name", sorted(_ROWS))
def test_rows_method_fallback_leaves_the_other_rows_bit_identical(name):
    """One row beyond the range, one row NaN: the fallback scales only those (s = 1 elsewhere,
    exact), so every other row's output equals that of the same data without them, bit for bit;
    the NaN row is NaN throughout, the wide row right."""
    f, reference = _ROWS[name]
    x = np.random.default_rng(1).standard_normal((4096, 8)).astype(np.float32)
    plain = np.asarray(jax.jit(lambda x: f(x, _P8))(x))
    x[7] = _wide((1, 8), "max")
    x[9, 4] = np.nan
    y = np.asarray(jax.jit(lambda x: f(x, _P8))(x))
    others = np.setdiff1d(np.arange(4096), [7, 9])
    np.testing.assert_array_equal(y[others], plain[others])
    assert np.isnan(y[9]).all()
    np.testing.assert_allclose(y[7], reference(x[7:8], *_P8)[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(_ROWS))
def test_rows_method_under_vmap_each_member_gets_its_own_result(name):
    """One member beyond the range: the others' outputs and gradients are bit-identical to the
    unbatched call's (the fallback's loop runs for the batch, each member keeps its own)."""
    f = _ROWS[name][0]
    x = np.random.default_rng(1).standard_normal((3, 4096, 8)).astype(np.float32)
    x[1] = _wide((4096, 8), "max")
    one = jax.jit(lambda x: f(x, _P8))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(f(x, _P8)))))
    batched, batched_grad = np.asarray(jax.vmap(one)(x)), np.asarray(jax.vmap(grad)(x))
    for i in range(3):
        np.testing.assert_array_equal(batched[i], np.asarray(one(x[i])))
        np.testing.assert_array_equal(batched_grad[i], np.asarray(grad(x[i])))
    np.testing.assert_allclose(batched[1], _ROWS[name][1](x[1], *_P8), atol=2e-5)


@pytest.mark.parametrize(("shape", "axis"), [((4096, 8), -1), ((16, 8), -1), ((16, 8), 0)])
@pytest.mark.parametrize("kind", ["max", "spread"])
def test_moments_beyond_float32_range(kind, shape, axis):
    """``moments`` on data whose moments overflow float32: μ right, σ² inf where σ² itself is
    beyond float32 (here everywhere), both through the rows method (4096 rows, where σ² came out
    finite and wrong: M₂ = ∞ − ∞, and XLA's row loop takes max(NaN, 0) as 0) and the columns one
    (where it came out NaN)."""
    x = _wide(shape, kind)
    mean, var = jax.jit(lambda x: bnjax.moments(x, axis))(x)
    x64 = x.astype(np.float64)
    std = np.sqrt(x64.var(axis))
    assert np.all(np.abs(np.asarray(mean, np.float64) - x64.mean(axis)) <= 1e-6 * std)
    assert np.all(x64.var(axis) > np.finfo(np.float32).max) and np.isposinf(np.asarray(var)).all()


def test_moments_beyond_the_float32_sums_but_not_the_variance():
    """M₂ overflows but σ² = M₂/n does not (4096 values, σ = 1e19): σ² right, not inf."""
    x = np.random.default_rng(2).standard_normal((2, 4096)).astype(np.float32) * np.float32(1e19)
    mean, var = jax.jit(lambda x: bnjax.moments(x, -1))(x)
    np.testing.assert_allclose(np.asarray(var, np.float64), x.astype(np.float64).var(-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mean, np.float64), x.astype(np.float64).mean(-1), atol=1e-6 * 1e19)


@pytest.mark.parametrize("name", sorted(_ROWS))
def test_rows_method_with_a_sharded_hidden_axis_beyond_float32_moments(name):
    """Layer / RMS norm with the normalized axis split over 4 devices (axis_name): each device's
    rows method marks its rows beyond range, the merged moments show it and the fallback runs."""
    f, reference = _ROWS[name]
    x = _wide((4096, 32), "max")
    p = params(32)
    mesh = Mesh(np.array(jax.devices()[:4]), ("t",))

    def per_shard(x, scale, bias):
        return f(x, bnjax.NormParams(scale, bias), axis_name="t")

    spec = P(None, "t")
    sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, P("t"), P("t")), out_specs=spec)
    y = np.asarray(jax.jit(sharded)(x, *p), np.float64)
    np.testing.assert_allclose(y, reference(x, *p), atol=2e-5, rtol=0)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(sharded(x, *p)))))(x)
    assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_an_all_true_mask_takes_the_checked_columns_method(name):
    """A mask, all True, selects the columns method for rows-shaped data: also right beyond the
    float32 moments, by its own check."""
    _, f, reference = _RANGE[name]
    x = _wide((4096, 8), "max")
    mask = jnp.ones((4096, 1), bool)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x, mask), np.float64), reference(x), atol=2e-5)


_RNG_W = np.random.default_rng(11)
_U16 = (lambda u: u / np.linalg.norm(u))(_RNG_W.standard_normal(16)).astype(np.float32)
_X32 = _RNG_W.standard_normal((8, 32)).astype(np.float32)
_XI = _RNG_W.standard_normal((2, 6, 6, 3)).astype(np.float32)
_V_INIT = _RNG_W.standard_normal((32, 16)).astype(np.float32)
_WEIGHT_RANGE = {
    # name: (bnjax function of the wide argument, float64 reference, wide argument's shape, kind)
    "weight_norm": (
        lambda v: bnjax.weight_norm(v, jnp.linspace(0.5, 2.0, 16)),
        lambda v: ref.weight_norm(v, np.linspace(0.5, 2.0, 16)),
        (32, 16),
    ),
    "weight_norm axis=None": (
        lambda v: bnjax.weight_norm(v, jnp.asarray(3.0), axis=None),
        lambda v: 3.0 * v.astype(np.float64) / np.linalg.norm(v.astype(np.float64)),
        (32, 16),
    ),
    "weight_norm PyTorch layout": (
        lambda v: bnjax.weight_norm(v, jnp.ones(16), axis=0),
        lambda v: ref.weight_norm(v, np.ones(16), axis=0),
        (16, 3, 3, 4),
    ),
    "weight_standardize": (bnjax.weight_standardize, ref.weight_standardize, (32, 16)),
    "weight_standardize conv": (bnjax.weight_standardize, ref.weight_standardize, (3, 3, 4, 16)),
    "spectral_norm": (
        lambda w: bnjax.spectral_norm(w, _U16, n_steps=3)[0],
        lambda w: ref.spectral_norm_power(w, _U16, n_steps=3)[0],
        (32, 16),
    ),
    "cosine_norm w": (lambda w: bnjax.cosine_norm(_X32, w), lambda w: ref.cosine_norm(_X32, w), (32, 16)),
    "cosine_norm_conv kernel": (
        lambda k: bnjax.cosine_norm_conv(_XI, k),
        lambda k: ref.cosine_norm_conv2d(_XI, k),
        (3, 3, 3, 16),
    ),
    "weight_norm_data_init x": (
        lambda x: jnp.stack(bnjax.weight_norm_data_init(_V_INIT, x)),
        lambda x: np.stack(ref.weight_norm_data_init(_V_INIT, x)),
        (64, 32),
    ),
}


@pytest.mark.parametrize("kind", ["max", "spread"])
@pytest.mark.parametrize("name", sorted(_WEIGHT_RANGE))
def test_weight_side_methods_beyond_float32_range(name, kind):
    """Weights (or, for the data-dependent init, x) whose sums of squares and products overflow
    float32, up to ±3.3e38: computed on w·s, a power of two per norm, right against float64 (before:
    NaN, or w = 0 from v/∞). weight_norm_data_init's μ and 1/σ are tiny there: compared relatively."""
    f, reference, shape = _WEIGHT_RANGE[name]
    w = _wide(shape, kind)
    got, expected = np.asarray(jax.jit(f)(w), np.float64), reference(w)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * np.max(np.abs(expected)))


def test_weight_norm_init_beyond_float32_range():
    """g = ‖v‖: right where the norm fits float32 although Σv² does not, inf where it does not fit."""
    v = np.random.default_rng(5).standard_normal((64, 4)).astype(np.float32) * np.float32(1e30)
    v[:, 3] = 3e38
    g = np.asarray(bnjax.weight_norm_init(v), np.float64)
    norms = np.linalg.norm(v.astype(np.float64), axis=0)
    np.testing.assert_allclose(g[:3], norms[:3], rtol=1e-6)
    assert np.isposinf(g[3])


@pytest.mark.parametrize(
    "name", ["weight_norm", "weight_standardize", "spectral_norm", "cosine_norm w", "cosine_norm_conv kernel"]
)
def test_weight_side_gradients_beyond_float32_range(name):
    """Each method is invariant under w → w·2^−100 (per unit for weight norm and standardization, as a
    whole for spectral norm, per column or filter for cosine norm), so its gradient at w (σ ~ 1e30,
    Σw² beyond float32) is 2^−100 times the gradient at w·2^−100 (ordinary size): exact in float32."""
    f, _, shape = _WEIGHT_RANGE[name]
    w = np.random.default_rng(6).standard_normal(shape).astype(np.float32) * np.float32(1e30)
    dy = np.random.default_rng(7).standard_normal(np.shape(f(w))).astype(np.float32)
    grad = jax.jit(jax.grad(lambda w: jnp.sum(f(w) * dy)))
    small = np.float32(2.0**-100)
    got, expected = np.asarray(grad(w), np.float64), np.asarray(grad(w * small), np.float64) * float(small)
    assert np.isfinite(got).all() and np.all(got != 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.max(np.abs(expected)))


def test_cosine_norm_rows_beyond_float32_are_nan_not_zero():
    """cosine_norm does not scale x: a row whose ‖x‖² overflows float32 is NaN (before: a silent
    0 = num/∞ where the products did not overflow), and every other row is right; the same for
    a patch of cosine_norm_conv (its positions NaN, the others right)."""
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((8, 32)).astype(np.float32), rng.standard_normal((32, 16)).astype(np.float32)
    x[2] *= np.float32(1e19)  # ‖x‖² about 3e39, x·w about 1e20: the products fit, the norm does not
    y = np.asarray(jax.jit(bnjax.cosine_norm)(x, w), np.float64)
    assert np.isnan(y[2]).all()
    others = np.arange(8) != 2
    np.testing.assert_allclose(y[others], ref.cosine_norm(x[others], w), atol=1e-6)
    xi, k = rng.standard_normal((1, 6, 6, 3)).astype(np.float32), rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    xi[0, 0, 0] = 3e19  # Σ over the patch about 2.7e39
    y = np.asarray(jax.jit(bnjax.cosine_norm_conv)(xi, k), np.float64)
    near = np.zeros((6, 6), bool)
    near[:2, :2] = True  # the SAME-padded 3×3 patches that hold x[0, 0]
    assert np.isnan(y[0][near]).all()
    np.testing.assert_allclose(y[0][~near], ref.cosine_norm_conv2d(xi, k)[0][~near], atol=1e-6)


def test_the_fallback_is_cached_not_rebuilt_per_call():
    """Its loop body and branch are cached by value: eager calls do not trace and compile a new
    loop each time (a closure per call would: 0.2 s per eager call instead of 5 ms)."""
    from bnjax._src import lazy

    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 8)), jnp.float32)
    bnjax.layer_norm(x, _P8)
    jax.grad(lambda x: jnp.sum(bnjax.batch_norm(x, _P8, bnjax.init_stats(8), training=True)[0] ** 2))(x)
    before = lazy._loop.cache_info().currsize, lazy._branch.cache_info().currsize
    for _ in range(2):
        bnjax.layer_norm(x + 1.0, _P8)
        jax.grad(lambda x: jnp.sum(bnjax.batch_norm(x, _P8, bnjax.init_stats(8), training=True)[0] ** 2))(x)
    assert (lazy._loop.cache_info().currsize, lazy._branch.cache_info().currsize) == before
