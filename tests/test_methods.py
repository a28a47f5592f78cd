"""Every data-side method against its float64 NumPy reference, plus the framework's equivalences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import bnjax
from tests import reference as ref
from tests.helpers import close, data, params

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# (shape, feature axis): NHWC, NCHW, 2-D, 3-D sequence
BN_CASES = [((8, 5, 4, 6), -1), ((8, 6, 5, 4), 1), ((32, 7), -1), ((4, 9, 5), 2), ((4, 3, 5, 6), (2, 3))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", BN_CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_batch_norm_train_and_eval(shape, axis, dtype, jit):
    x, x64 = data(shape, dtype)
    feat = tuple(shape[a] for a in sorted(np.atleast_1d(axis) % len(shape)))
    p = params(feat)
    stats = bnjax.init_stats(feat)
    fn = lambda x, p, s, training: bnjax.batch_norm(x, p, s, training=training, axis=axis)  # noqa: E731
    if jit:
        fn = jax.jit(fn, static_argnames="training")
    y, new = fn(x, p, stats, True)
    y_ref, m_ref, v_ref, _ = ref.batch_norm_train(x64, p.scale, p.bias, axis=axis)
    assert y.dtype == dtype and y.shape == shape
    close(y, y_ref, dtype)
    # debiased default: the first update stores exactly the batch statistics, in float32
    assert new.mean.dtype == jnp.float32 and new.var.dtype == jnp.float32
    np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.var, v_ref, rtol=1e-5, atol=1e-6)
    assert int(new.count) == 1
    y_eval, same = fn(x, p, new, False)
    close(y_eval, ref.batch_norm_eval(x64, p.scale, p.bias, new.mean, new.var, axis=axis), dtype)
    jax.tree.map(np.testing.assert_array_equal, same, new)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_masked(dtype):
    x, x64 = data((10, 3, 4), dtype)
    rng = np.random.default_rng(3)
    mask = rng.random((10, 3, 1)) < 0.6
    x = x.at[~jnp.broadcast_to(mask, x.shape)].set(jnp.nan)  # masked-out garbage must not leak in
    p = params(4)
    y, new = bnjax.batch_norm(x, p, bnjax.init_stats(4), training=True, mask=mask)
    y_ref, m_ref, v_ref, _ = ref.batch_norm_train(x64, p.scale, p.bias, mask=mask)
    valid = np.broadcast_to(mask, x.shape)
    close(np.asarray(y.astype(jnp.float32))[valid], y_ref[valid], dtype)
    np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.var, v_ref, rtol=1e-5, atol=1e-6)


def test_batch_norm_feature_dependent_mask():
    """A mask that differs per feature gives each feature its own count."""
    x, x64 = data((12, 3))
    mask = np.random.default_rng(4).random((12, 3)) < 0.5
    mask[:2] = True
    y, new = bnjax.batch_norm(x, None, bnjax.init_stats(3), training=True, mask=mask)
    y_ref, m_ref, v_ref, _ = ref.batch_norm_train(x64, None, None, mask=mask)
    close(np.asarray(y)[mask], y_ref[mask])
    np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5)
    np.testing.assert_allclose(new.var, v_ref, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", BN_CASES[:3])
@pytest.mark.parametrize("masked", [False, True])
def test_mean_only_batch_norm(shape, axis, dtype, masked):
    x, x64 = data(shape, dtype, loc=1.5, scale=0.5)
    feat = tuple(shape[a] for a in sorted(np.atleast_1d(axis) % len(shape)))
    mask = None
    if masked:
        mask = np.random.default_rng(5).random(shape[:1] + (1,) * (len(shape) - 1)) < 0.6
        mask[0] = True
    p = params(feat)
    fn = jax.jit(
        lambda x, s, training: bnjax.mean_only_batch_norm(x, p, s, training=training, axis=axis, mask=mask),
        static_argnums=2,
    )
    y, new = fn(x, bnjax.init_stats(feat), True)
    y_ref, m_ref = ref.mean_only_batch_norm_train(x64, p.scale, p.bias, axis=axis, mask=mask)
    assert y.dtype == dtype
    close(y, y_ref, dtype)
    np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-6)
    _, _, v_ref, _ = ref.batch_norm_train(x64, None, None, axis=axis, mask=mask)
    np.testing.assert_allclose(new.var, v_ref, rtol=1e-5, atol=1e-6)  # tracked, not used
    # evaluation subtracts the stored mean and never divides, whatever the stored variance
    y_eval, _ = fn(x, new._replace(var=new.var * 7.0), False)
    shape_f = [x.shape[a] if a in np.atleast_1d(axis) % len(shape) else 1 for a in range(len(shape))]
    expected = (x64 - np.asarray(new.mean, np.float64).reshape(shape_f)) * np.asarray(p.scale).reshape(shape_f)
    close(y_eval, expected + np.asarray(p.bias).reshape(shape_f), dtype)


def test_mean_only_batch_norm_sync_under_vmap_equals_the_full_batch():
    x, x64 = data((4, 6, 5))  # 4 participants x 6 examples
    p = params(5)
    step = lambda x: bnjax.mean_only_batch_norm(x, p, bnjax.init_stats(5), training=True, axis_name="d")  # noqa: E731
    y, new = jax.vmap(step, axis_name="d", out_axes=(0, None))(x)
    y_ref, m_ref = ref.mean_only_batch_norm_train(x64.reshape(24, 5), p.scale, p.bias)
    close(y.reshape(24, 5), y_ref)
    np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-6)


def test_mean_only_batch_norm_gradient():
    x, _ = data((6, 5), loc=0.0, scale=1.0)
    p = params(5)
    fn = lambda x, scale, bias: bnjax.mean_only_batch_norm(  # noqa: E731
        x, bnjax.NormParams(scale, bias), bnjax.init_stats(5), training=True
    )[0]
    check_grads(fn, (x, p.scale, p.bias), order=2, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_mean_only_batch_norm_after_weight_norm_centres_each_unit():
    """Salimans & Kingma's pairing: WN fixes each unit's scale, mean-only BN removes its shift."""
    x, _ = data((64, 6), loc=2.0, scale=3.0)
    v, _ = data((6, 4), seed=2, loc=0.0, scale=0.05)
    g = jnp.asarray([0.5, 1.0, 2.0, 4.0])
    t = x @ bnjax.weight_norm(v, g)
    y, _ = bnjax.mean_only_batch_norm(t, None, bnjax.init_stats(4), training=True)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(0), t.std(0), rtol=1e-5)  # the scale is untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,axis,feature_axis",
    [((4, 7, 16), -1, None), ((4, 5, 6, 8), (1, 2, 3), None), ((4, 5, 6, 8), (1, 2, 3), -1), ((3, 8, 5), 1, None)],
)
def test_layer_norm(shape, axis, feature_axis, dtype):
    x, x64 = data(shape, dtype)
    fa = axis if feature_axis is None else feature_axis
    p = params(tuple(shape[a] for a in sorted(np.atleast_1d(fa) % len(shape))))
    y = jax.jit(lambda x, p: bnjax.layer_norm(x, p, axis=axis, feature_axis=feature_axis))(x, p)
    assert y.dtype == dtype
    close(y, ref.layer_norm(x64, p.scale, p.bias, axis=axis, feature_axis=feature_axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,axis,groups", [((2, 5, 4, 12), -1, 3), ((2, 12, 5, 4), 1, 4), ((3, 16), -1, 4), ((2, 6, 8), -1, 8)]
)
def test_group_norm(shape, axis, groups, dtype):
    x, x64 = data(shape, dtype)
    p = params(shape[axis])
    y = bnjax.group_norm(x, p, num_groups=groups, axis=axis)
    assert y.dtype == dtype
    close(y, ref.group_norm(x64, p.scale, p.bias, groups, axis=axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((2, 5, 4, 6), -1), ((2, 6, 5, 4), 1), ((3, 10, 4), -1)])
def test_instance_norm(shape, axis, dtype):
    x, x64 = data(shape, dtype)
    p = params(shape[axis])
    y = bnjax.instance_norm(x, p, axis=axis)
    close(y, ref.instance_norm(x64, p.scale, p.bias, axis=axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 7, 16), -1), ((3, 8, 5), 1), ((4, 3, 6), (1, 2))])
def test_rms_norm(shape, axis, dtype):
    x, x64 = data(shape, dtype)
    p = params(tuple(shape[a] for a in sorted(np.atleast_1d(axis) % len(shape))))
    y = bnjax.rms_norm(x, bnjax.NormParams(p.scale, None), axis=axis)
    close(y, ref.rms_norm(x64, p.scale, None, axis=axis), dtype)
    y = bnjax.rms_norm(x, p, axis=axis)
    close(y, ref.rms_norm(x64, p.scale, p.bias, axis=axis), dtype)


def test_normalize_and_moments_against_reference():
    x, x64 = data((6, 5, 4))
    mask = np.random.default_rng(0).random((6, 5, 1)) < 0.7
    mean, var = bnjax.moments(x, (0, 1), mask=mask, keepdims=True)
    m_ref, v_ref, _ = ref.moments(x64, (0, 1), mask)
    np.testing.assert_allclose(mean, m_ref, rtol=1e-5)
    np.testing.assert_allclose(var, v_ref, rtol=1e-5)
    mean, var = bnjax.moments(x, (0, 1), mask=mask)
    assert mean.shape == (4,)
    p = params(4)
    y = bnjax.normalize(x, mean, var, p.scale, p.bias, eps=1e-3, activation=jax.nn.relu)
    close(y, np.maximum(ref.normalize(x64, m_ref, v_ref, p.scale, p.bias, eps=1e-3), 0))


@pytest.mark.parametrize("name", ["batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"])
def test_activation_applied_after_affine(name):
    x, _ = data((4, 3, 3, 8))
    p = params(8)
    kw = {"num_groups": 2} if name == "group_norm" else {}
    call = getattr(bnjax, name)
    args = (x, p, bnjax.init_stats(8)) if name == "batch_norm" else (x, p)
    extra = {"training": True} if name == "batch_norm" else {}
    plain = call(*args, **extra, **kw)
    act = call(*args, **extra, **kw, activation=jax.nn.gelu)
    plain = plain[0] if name == "batch_norm" else plain
    act = act[0] if name == "batch_norm" else act
    np.testing.assert_allclose(act, jax.nn.gelu(plain), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Equivalences of the framework


def test_group_norm_one_group_is_layer_norm_over_hwc():
    x, _ = data((3, 4, 5, 6))
    p = params(6)
    gn = bnjax.group_norm(x, p, num_groups=1)
    ln = bnjax.layer_norm(x, p, axis=(1, 2, 3), feature_axis=-1)
    np.testing.assert_allclose(gn, ln, rtol=1e-6, atol=1e-6)


def test_group_norm_group_size_one_is_instance_norm():
    x, _ = data((3, 4, 5, 6))
    p = params(6)
    np.testing.assert_allclose(bnjax.group_norm(x, p, num_groups=6), bnjax.instance_norm(x, p), rtol=1e-6, atol=1e-6)


def test_batch_norm_eval_is_normalize_with_stored_statistics():
    x, _ = data((5, 4, 3))
    p = params(3)
    stats = bnjax.BatchStats(jnp.array([0.3, -1.0, 2.0]), jnp.array([0.5, 2.0, 1.5]), jnp.array(7, jnp.int32))
    y, _ = bnjax.batch_norm(x, p, stats, training=False, eps=1e-3, activation=jax.nn.relu)
    expected = bnjax.normalize(x, stats.mean, stats.var, p.scale, p.bias, eps=1e-3, activation=jax.nn.relu)
    np.testing.assert_array_equal(y, expected)


def test_batch_norm_train_is_normalize_with_moments():
    x, _ = data((16, 3, 5), loc=100.0)
    p = params(5)
    y, _ = bnjax.batch_norm(x, p, bnjax.init_stats(5), training=True)
    mean, var = bnjax.moments(x, (0, 1))
    np.testing.assert_allclose(y, bnjax.normalize(x, mean, var, p.scale, p.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loc", [1e4, 1e5])
def test_output_accurate_at_large_mean(loc):
    """y keeps float32 accuracy when |μ| ≫ σ: x − μ is applied as (x − K) − δ, never via a rounded μ."""
    x, x64 = data((256, 4), loc=loc, scale=1.0)
    y, _ = bnjax.batch_norm(x, None, bnjax.init_stats(4), training=True)
    y_ref, *_ = ref.batch_norm_train(x64, None, None)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=2e-6)
    y = bnjax.layer_norm(x.T, None)
    np.testing.assert_allclose(y, ref.layer_norm(x64.T, None, None), rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Gradients


GRAD_MASK = np.arange(6).reshape(6, 1, 1) % 3 != 0
GRAD_MASK_ROWS = np.arange(6 * 3 * 4).reshape(6, 3, 4) % 5 != 1

GRAD_CASES = {
    "batch_norm": lambda x, s, b: bnjax.batch_norm(x, bnjax.NormParams(s, b), bnjax.init_stats(4), training=True)[0],
    # masked: the padding's outputs are constants (no gradient), so the loss reads valid ones only
    "batch_norm_masked": lambda x, s, b: jnp.where(
        GRAD_MASK,
        bnjax.batch_norm(x, bnjax.NormParams(s, b), bnjax.init_stats(4), training=True, mask=GRAD_MASK)[0],
        0,
    ),
    "layer_norm_masked": lambda x, s, b: jnp.where(
        GRAD_MASK_ROWS, bnjax.layer_norm(x, bnjax.NormParams(s, b), mask=GRAD_MASK_ROWS), 0
    ),
    "rms_norm_masked": lambda x, s, b: jnp.where(
        GRAD_MASK_ROWS, bnjax.rms_norm(x, bnjax.NormParams(s, b), mask=GRAD_MASK_ROWS), 0
    ),
    "group_norm_masked": lambda x, s, b: jnp.where(
        GRAD_MASK, bnjax.group_norm(x, bnjax.NormParams(s, b), num_groups=2, mask=GRAD_MASK), 0
    ),
    "layer_norm": lambda x, s, b: bnjax.layer_norm(x, bnjax.NormParams(s, b)),
    "group_norm": lambda x, s, b: bnjax.group_norm(x, bnjax.NormParams(s, b), num_groups=2),
    "instance_norm": lambda x, s, b: bnjax.instance_norm(x, bnjax.NormParams(s, b)),
    "rms_norm": lambda x, s, b: bnjax.rms_norm(x, bnjax.NormParams(s, b)),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_numerically(name):
    x, _ = data((6, 3, 4), seed=5)
    p = params(4)
    # float32 finite differences: moderate eps and tolerance, first and second order
    check_grads(GRAD_CASES[name], (x, p.scale, p.bias), order=2, modes=["rev"], eps=1e-2, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("name", ["batch_norm", "layer_norm"])
def test_gradients_against_reference_math(name):
    """Input gradient vs the closed form ∂L/∂x = g/(mσ) (m·dy − Σdy − x̂·Σdy·x̂) in float64."""
    x, x64 = data((6, 3, 4), seed=6)
    p = params(4)
    dy = np.random.default_rng(7).standard_normal(x.shape)
    _, vjp = jax.vjp(GRAD_CASES[name], x, p.scale, p.bias)
    dx, dg, db = vjp(jnp.asarray(dy, jnp.float32))
    axes = (0, 1) if name == "batch_norm" else (2,)
    mean, var, _ = ref.moments(x64, axes)
    m = np.prod([x.shape[a] for a in axes])
    sigma = np.sqrt(var + 1e-5)
    xhat = (x64 - mean) / sigma
    g = np.asarray(p.scale, np.float64)
    dxhat = dy * g
    dx_ref = (m * dxhat - dxhat.sum(axes, keepdims=True) - xhat * (dxhat * xhat).sum(axes, keepdims=True)) / (m * sigma)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dg, (dy * xhat).sum((0, 1)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, dy.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_no_gradient_into_running_statistics():
    x, _ = data((6, 4))

    def loss(stats):
        _, new = bnjax.batch_norm(x, None, stats, training=True)
        y_eval, _ = bnjax.batch_norm(x, None, new, training=False)
        return jnp.sum(new.mean) + jnp.sum(new.var) + jnp.sum(y_eval)

    grads = jax.grad(loss, allow_int=True)(bnjax.init_stats(4))
    np.testing.assert_array_equal(grads.mean, 0)
    np.testing.assert_array_equal(grads.var, 0)


# ---------------------------------------------------------------------------------------------
# Invariances (BACKGROUND §5; Ba et al. 2016, Table 1): y = norm(x @ W) under rescalings of W and x,
# and the rescalings that must change y, so that these tests can fail.

_X_INV = data((16, 6), loc=0.5, scale=2.0)[0]
_W_INV = data((6, 8), seed=3, loc=0.0, scale=1.0)[0]
_P_INV = params(8)


def _bn(h):
    return bnjax.batch_norm(h, _P_INV, bnjax.init_stats(8), training=True, eps=1e-12)[0]


def _ln(h):
    return bnjax.layer_norm(h, _P_INV, eps=1e-12)


_NORMS = {"batch_norm": _bn, "layer_norm": _ln}
_INVARIANCE = settings(max_examples=20, deadline=None)


@pytest.mark.parametrize("name", sorted(_NORMS))
@_INVARIANCE
@given(lam=st.floats(0.05, 20.0))
def test_invariant_to_rescaling_the_weight_matrix_and_gradient_shrinks(name, lam):
    norm = _NORMS[name]
    loss = lambda w: jnp.sum(jnp.sin(norm(_X_INV @ w)))  # noqa: E731
    np.testing.assert_allclose(norm(_X_INV @ (lam * _W_INV)), norm(_X_INV @ _W_INV), rtol=1e-4, atol=1e-4)
    # L(λW) = L(W) for all W, so ∇L(λW) = ∇L(W)/λ: large weights learn slowly
    np.testing.assert_allclose(jax.grad(loss)(lam * _W_INV) * lam, jax.grad(loss)(_W_INV), rtol=2e-3, atol=2e-3)


@_INVARIANCE
@given(seed=st.integers(0, 2**16))
def test_batch_norm_invariant_to_per_unit_rescaling_and_recentring(seed):
    rng = np.random.default_rng(seed)
    lam, shift = rng.uniform(0.1, 10.0, 8), rng.uniform(-5.0, 5.0, 8)
    h = _X_INV @ _W_INV
    np.testing.assert_allclose(_bn(h * lam[None] + shift[None]), _bn(h), rtol=1e-4, atol=1e-4)


@_INVARIANCE
@given(seed=st.integers(0, 2**16))
def test_layer_norm_invariant_to_rescaling_each_example(seed):
    lam = np.random.default_rng(seed).uniform(0.1, 10.0, (16, 1))
    np.testing.assert_allclose(_ln((_X_INV * lam) @ _W_INV), _ln(_X_INV @ _W_INV), rtol=1e-4, atol=1e-4)


def test_the_invariances_are_specific():
    """Layer norm is not invariant to rescaling one unit's weights; batch norm is not invariant to
    rescaling one example."""
    h = _X_INV @ _W_INV
    lam = np.ones(8)
    lam[2] = 3.0
    assert np.max(np.abs(_ln(h * lam[None]) - _ln(h))) > 0.1
    scale_one = np.ones((16, 1))
    scale_one[0] = 3.0
    assert np.max(np.abs(_bn((_X_INV * scale_one) @ _W_INV) - _bn(h))) > 0.1
