"""Weight-side methods: float64 references, gradients, the invariances of BACKGROUND §5, anchors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from bnjax._src.weights import (
    cosine_norm,
    cosine_norm_conv,
    spectral_norm,
    spectral_norm_init,
    weight_norm,
    weight_norm_data_init,
    weight_norm_init,
    weight_standardize,
)
from tests import reference as ref
from tests.helpers import close, data

# (kernel shape, output axis): Flax dense and conv, PyTorch dense and conv, an axis in the middle
KERNELS = [((5, 4), -1), ((3, 3, 4, 6), -1), ((6, 5), 0), ((6, 4, 3, 3), 0), ((3, 7, 2), 1)]
DTYPES = [jnp.float32, jnp.bfloat16]
HYPOTHESIS = settings(max_examples=25, deadline=None)


def kernel(shape, dtype=jnp.float32, seed=0):
    return data(shape, dtype, seed=seed, loc=0.0, scale=1.0)


def per_unit(shape, axis, seed=1, low=0.5, high=1.5):
    """A random positive vector of one value per output unit."""
    return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape[axis]), jnp.float32)


def unit_shape(shape, axis):
    return tuple(s if a == axis % len(shape) else 1 for a, s in enumerate(shape))


# ---------------------------------------------------------------------------------------------
# Weight normalization


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", KERNELS)
def test_weight_norm_against_reference(shape, axis, dtype):
    v, v64 = kernel(shape, dtype)
    g = jnp.asarray(np.random.default_rng(1).uniform(-2, 2, shape[axis]), jnp.float32)
    w = jax.jit(lambda v, g: weight_norm(v, g, axis=axis))(v, g)
    assert w.dtype == dtype and w.shape == shape
    close(w, ref.weight_norm(v64, g, axis=axis), dtype)


@pytest.mark.parametrize("shape,axis", KERNELS)
def test_weight_norm_init_leaves_the_kernel_unchanged(shape, axis):
    v, v64 = kernel(shape)
    g = weight_norm_init(v, axis=axis)
    norms = np.linalg.norm(ref.weight_matrix(v64, axis), axis=1)
    np.testing.assert_allclose(g, norms, rtol=1e-6)
    np.testing.assert_allclose(weight_norm(v, g, axis=axis), v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("init_scale", [1.0, 0.1])
def test_weight_norm_data_init(axis, init_scale):
    v, v64 = kernel((6, 4) if axis == -1 else (4, 6), seed=2)
    v, v64 = 0.05 * v, 0.05 * v64
    x, x64 = data((3, 40, 6), seed=3, loc=2.0, scale=3.0)  # two leading batch axes
    g, b = weight_norm_data_init(v, x, axis=axis, init_scale=init_scale)
    g_ref, b_ref = ref.weight_norm_data_init(v64, x64, axis=axis, init_scale=init_scale)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5)
    np.testing.assert_allclose(b, b_ref, rtol=1e-5, atol=1e-5)
    # the paper's goal: pre-activations with zero mean and standard deviation init_scale
    w = weight_norm(v, g, axis=axis)
    kern = w if axis == -1 else w.T
    y = np.asarray(x64.reshape(-1, 6) @ np.asarray(kern, np.float64) + np.asarray(b, np.float64)[None, :])
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5 * init_scale)
    np.testing.assert_allclose(y.std(0), init_scale, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Weight standardization


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", KERNELS)
def test_weight_standardize_against_reference(shape, axis, dtype):
    w, w64 = kernel(shape, dtype, seed=4)
    y = jax.jit(lambda w: weight_standardize(w, axis=axis))(w)
    assert y.dtype == dtype and y.shape == shape
    close(y, ref.weight_standardize(w64, axis=axis), dtype)


def test_weight_standardize_is_accurate_for_a_large_mean():
    w, w64 = data((3, 3, 8, 4), loc=1e3, scale=1.0, seed=5)
    np.testing.assert_allclose(weight_standardize(w), ref.weight_standardize(w64), rtol=0, atol=5e-4)


# ---------------------------------------------------------------------------------------------
# Spectral normalization


def _unit_vector(size, seed):
    u = np.random.default_rng(seed).standard_normal(size)
    return jnp.asarray(u / np.linalg.norm(u), jnp.float32)


@pytest.mark.parametrize("n_steps,training", [(0, True), (1, True), (3, True), (3, False)])
@pytest.mark.parametrize("shape,axis", KERNELS)
def test_spectral_norm_steps_against_reference(shape, axis, n_steps, training):
    w, w64 = kernel(shape, seed=6)
    u = _unit_vector(shape[axis], seed=7)
    fn = jax.jit(lambda w, u: spectral_norm(w, u, n_steps=n_steps, axis=axis, training=training))
    y, new_u = fn(w, u)
    y_ref, u_ref = ref.spectral_norm_power(w64, u, n_steps=n_steps, axis=axis, training=training)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(new_u, u_ref, rtol=2e-5, atol=2e-6)
    if not training or n_steps == 0:
        np.testing.assert_array_equal(new_u, u)  # evaluation (or no step) does not move the state
    # σ comes from the returned u, so evaluating with it reproduces the training output
    y_eval, _ = spectral_norm(w, new_u, axis=axis, training=False)
    np.testing.assert_allclose(y_eval, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,axis", [((5, 4), -1), ((3, 3, 4, 6), -1), ((6, 4, 3, 3), 0)])
def test_spectral_norm_converges_to_the_largest_singular_value(shape, axis):
    w, w64 = kernel(shape, seed=8)
    y_exact, sigma_max, left = ref.spectral_norm_exact(w64, axis)
    u = spectral_norm_init(jax.random.key(0), w, axis=axis, n_warmup=2)

    def train_step(u, _):  # the paper's regime: one step per training call
        y, u = spectral_norm(w, u, axis=axis)
        return u, jnp.linalg.norm(w) / jnp.linalg.norm(y)

    u, sigmas = jax.lax.scan(train_step, u, length=300)
    assert abs(float(sigmas[-1]) / sigma_max - 1) < 1e-3
    assert abs(float(sigmas[0]) / sigma_max - 1) > abs(float(sigmas[-1]) / sigma_max - 1)
    np.testing.assert_allclose(np.abs(np.asarray(u) @ left), 1.0, rtol=1e-3)
    y, _ = spectral_norm(w, u, axis=axis, training=False)
    np.testing.assert_allclose(y, y_exact, rtol=1e-3, atol=1e-5)
    assert abs(np.linalg.norm(ref.weight_matrix(y, axis), 2) - 1) < 1e-3


def test_spectral_norm_state_is_stable_under_scan():
    """bfloat16 weights, float32 state: new_u keeps u's shape and dtype, so it can be a scan carry."""
    w, _ = kernel((8, 5), jnp.bfloat16, seed=9)
    u = spectral_norm_init(jax.random.key(1), w)
    assert u.dtype == jnp.float32 and u.shape == (5,)
    u_end, ys = jax.lax.scan(lambda u, _: spectral_norm(w, u, n_steps=2)[::-1], u, length=4)
    assert u_end.dtype == jnp.float32 and ys.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.linalg.norm(u_end), 1.0, rtol=1e-6)


def test_spectral_norm_vmap_over_an_ensemble_equals_a_loop():
    ws = jnp.stack([kernel((6, 4), seed=s)[0] for s in range(3)])
    us = jnp.stack([_unit_vector(4, seed=s) for s in range(3)])
    ys, new = jax.vmap(lambda w, u: spectral_norm(w, u, n_steps=2))(ws, us)
    for i in range(3):
        y, u = spectral_norm(ws[i], us[i], n_steps=2)
        np.testing.assert_allclose(ys[i], y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(new[i], u, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,axis", [((5, 4), -1), ((3, 3, 4, 6), -1), ((6, 4, 3, 3), 0)])
def test_spectral_norm_gradient_treats_u_and_v_as_constants(shape, axis):
    """∂L/∂W = C/σ − ⟨C, W⟩/σ² · u vᵀ with u, v the (fixed) power-iteration vectors, in float64."""
    w, w64 = kernel(shape, seed=10)
    u = _unit_vector(shape[axis], seed=11)
    cot = np.random.default_rng(12).standard_normal(shape)
    _, vjp = jax.vjp(lambda w: spectral_norm(w, u, axis=axis)[0], w)
    (grad,) = vjp(jnp.asarray(cot, jnp.float32))
    _, u1 = ref.spectral_norm_power(w64, u, n_steps=1, axis=axis)
    mat, c = ref.weight_matrix(w64, axis), ref.weight_matrix(cot, axis)
    v1 = mat.T @ u1 / np.linalg.norm(mat.T @ u1)
    sigma = u1 @ mat @ v1
    g_mat = c / sigma - np.sum(c * mat) / sigma**2 * np.outer(u1, v1)
    moved = np.moveaxis(w64, axis, 0).shape
    expected = np.moveaxis(g_mat.reshape(moved), 0, axis)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Cosine normalization


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(7, 5), (2, 3, 5), (5,)])
def test_cosine_norm_against_reference(x_shape, dtype):
    x, x64 = data(x_shape, dtype, seed=13)
    w, w64 = kernel((5, 3), dtype, seed=14)
    y = jax.jit(cosine_norm)(x, w)
    assert y.dtype == dtype and y.shape == x_shape[:-1] + (3,)
    close(y, ref.cosine_norm(x64, w64), dtype)


@pytest.mark.parametrize(
    "strides,padding",
    [(1, "SAME"), (2, "SAME"), ((1, 2), "VALID"), (1, ((1, 0), (2, 1)))],
)
def test_cosine_norm_conv_against_reference(strides, padding):
    x, x64 = data((2, 6, 5, 3), seed=15)
    k, k64 = kernel((3, 2, 3, 4), seed=16)
    y = jax.jit(lambda x, k: cosine_norm_conv(x, k, strides=strides, padding=padding))(x, k)
    s = (strides, strides) if isinstance(strides, int) else strides
    expected = ref.cosine_norm_conv2d(x64, k64, strides=s, padding=padding)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_cosine_norm_conv_1x1_is_dense_cosine_norm_at_every_position():
    x, _ = data((2, 4, 5, 3), seed=17)
    k, _ = kernel((1, 1, 3, 6), seed=18)
    np.testing.assert_allclose(cosine_norm_conv(x, k), cosine_norm(x, k[0, 0]), rtol=1e-5, atol=1e-6)


def test_cosine_norm_conv_1d_is_2d_with_height_one():
    x, _ = data((2, 9, 3), seed=19)
    k, _ = kernel((4, 3, 5), seed=20)
    y1 = cosine_norm_conv(x, k, strides=2)
    y2 = cosine_norm_conv(x[:, None], k[None], strides=(1, 2))
    np.testing.assert_allclose(y1, y2[:, 0], rtol=1e-6, atol=1e-6)


def test_cosine_norm_is_bounded_and_exact_at_the_extremes():
    w, _ = kernel((5, 3), seed=21)
    x = jnp.stack([100.0 * w[:, 0], -0.5 * w[:, 1]])  # parallel and antiparallel to a column
    y = cosine_norm(x, w)
    assert np.all(np.abs(np.asarray(y)) <= 1.0)
    np.testing.assert_allclose([y[0, 0], y[1, 1]], [1.0, -1.0], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Gradients: finite differences (float32: moderate eps and tolerance)


GRAD_CASES = {
    "weight_norm": (lambda v, g: weight_norm(v, g), lambda: (kernel((4, 3))[0], per_unit((4, 3), -1))),
    "weight_norm_conv_torch_layout": (
        lambda v, g: weight_norm(v, g, axis=0),
        lambda: (kernel((3, 2, 2, 2))[0], per_unit((3, 2, 2, 2), 0)),
    ),
    "weight_standardize": (lambda w: weight_standardize(w), lambda: (kernel((2, 2, 3, 3))[0],)),
    "cosine_norm": (cosine_norm, lambda: (data((4, 5), seed=22)[0], kernel((5, 3), seed=23)[0])),
    "cosine_norm_conv": (
        lambda x, k: cosine_norm_conv(x, k, strides=2),
        lambda: (data((1, 5, 4, 2), seed=24)[0], kernel((3, 3, 2, 2), seed=25)[0]),
    ),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_numerically(name):
    fn, args = GRAD_CASES[name]
    order = 1 if name == "cosine_norm_conv" else 2  # second order through a conv: slow to compile
    check_grads(jax.jit(fn), args(), order=order, modes=["rev"], eps=1e-2, atol=5e-2, rtol=5e-2)


def test_spectral_norm_gradient_numerically_at_convergence():
    """With a converged u, σ(W) is σ_max and the fixed-(u, v) gradient is its exact gradient."""
    w, _ = kernel((5, 4), seed=26)
    u = spectral_norm_init(jax.random.key(2), w, n_warmup=500)
    check_grads(lambda w: spectral_norm(w, u)[0], (w,), order=1, modes=["rev"], eps=1e-2, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------------------------
# Zero norms: finite output, finite gradients


def _finite_grads(fn, *args):
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args)))))(*args)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    return grads


def test_weight_norm_zero_unit():
    v = kernel((4, 3))[0].at[:, 1].set(0.0)
    g = per_unit((4, 3), -1)
    w = weight_norm(v, g)
    assert np.isfinite(np.asarray(w)).all()
    np.testing.assert_array_equal(w[:, 1], 0.0)
    _, gg = _finite_grads(weight_norm, v, g)
    assert gg[1] == 0.0  # a zero unit's w does not depend on its g
    _finite_grads(weight_norm, jnp.zeros((4, 3)), g)


def test_weight_standardize_constant_unit():
    w = kernel((3, 3, 2, 4))[0].at[..., 2].set(7.0)
    y = weight_standardize(w)
    np.testing.assert_array_equal(y[..., 2], 0.0)
    _finite_grads(weight_standardize, w)
    _finite_grads(weight_standardize, jnp.zeros((3, 4)))


def test_spectral_norm_zero_weight_keeps_u():
    u = _unit_vector(3, seed=27)
    y, new_u = spectral_norm(jnp.zeros((5, 3)), u, n_steps=3)
    np.testing.assert_array_equal(y, 0.0)
    np.testing.assert_array_equal(new_u, u)
    (grad,) = _finite_grads(lambda w: spectral_norm(w, u)[0], jnp.zeros((5, 3)))
    np.testing.assert_allclose(grad, 1.0)  # d(w/1)/dw, cos(0) = 1


def test_cosine_norm_zero_input_and_zero_column():
    x = data((4, 5), seed=28)[0].at[2].set(0.0)
    w = kernel((5, 3), seed=29)[0].at[:, 0].set(0.0)
    y = cosine_norm(x, w)
    np.testing.assert_array_equal(y[2], 0.0)
    np.testing.assert_array_equal(y[:, 0], 0.0)
    _finite_grads(cosine_norm, x, w)
    _finite_grads(cosine_norm, jnp.zeros((4, 5)), jnp.zeros((5, 3)))


def test_cosine_norm_conv_zero_patches():
    x = jnp.zeros((1, 6, 6, 2)).at[0, 0, 0, 0].set(1.0)  # most patches are all zero
    k = kernel((3, 3, 2, 3), seed=30)[0].at[..., 1].set(0.0)
    y = cosine_norm_conv(x, k)
    assert np.isfinite(np.asarray(y)).all()
    np.testing.assert_array_equal(y[0, 3:, 3:], 0.0)
    np.testing.assert_array_equal(y[..., 1], 0.0)
    _finite_grads(cosine_norm_conv, x, k)


# ---------------------------------------------------------------------------------------------
# Invariances (BACKGROUND §5) as properties, with negative controls that must change the output


def _log_uniform(n):
    return st.lists(st.floats(-2.0, 2.0), min_size=n, max_size=n).map(lambda e: np.float32(10.0) ** np.array(e))


_WN_SHAPE = (6, 4)
_wn = jax.jit(weight_norm)
_wn_grad = jax.jit(jax.grad(lambda v, g, c: jnp.sum(c * weight_norm(v, g))))


@HYPOTHESIS
@given(seed=st.integers(0, 2**16), lam=_log_uniform(_WN_SHAPE[1]))
def test_weight_norm_invariant_to_per_unit_rescaling_of_v(seed, lam):
    v, _ = kernel(_WN_SHAPE, seed=seed)
    g = per_unit(_WN_SHAPE, -1, seed=seed + 1)
    c = data(_WN_SHAPE, seed=seed + 2)[0]
    scaled = v * jnp.asarray(lam)[None, :]
    np.testing.assert_allclose(_wn(scaled, g), _wn(v, g), rtol=1e-5, atol=1e-6)
    # the gradient w.r.t. the scaled weights shrinks by 1/λ: large weights learn slowly
    np.testing.assert_allclose(_wn_grad(scaled, g, c) * lam[None, :], _wn_grad(v, g, c), rtol=2e-4, atol=1e-5)


@HYPOTHESIS
@given(seed=st.integers(0, 2**16), lam=st.floats(0.1, 10.0))
def test_weight_norm_not_invariant_to_negative_or_per_input_rescaling(seed, lam):
    v, _ = kernel(_WN_SHAPE, seed=seed)
    g = per_unit(_WN_SHAPE, -1, seed=seed + 1)
    w = np.asarray(_wn(v, g))
    np.testing.assert_allclose(_wn(-lam * v, g), -w, rtol=1e-5, atol=1e-6)  # λ < 0 flips w
    rows = jnp.asarray(np.linspace(0.5, 2.0, _WN_SHAPE[0]), jnp.float32)[:, None]
    assert np.max(np.abs(np.asarray(_wn(v * rows, g)) - w)) > 1e-2  # fan-in rescaling changes w


_WS_SHAPE = (3, 3, 2, 4)
_ws = jax.jit(lambda w: weight_standardize(w, eps=1e-12))


@HYPOTHESIS
@given(seed=st.integers(0, 2**16), lam=_log_uniform(_WS_SHAPE[-1]), shift=st.floats(-10.0, 10.0))
def test_weight_standardize_invariant_to_per_unit_affine_maps(seed, lam, shift):
    w, _ = kernel(_WS_SHAPE, seed=seed)
    offsets = shift * np.linspace(-1.0, 1.0, _WS_SHAPE[-1], dtype=np.float32)
    moved = w * jnp.asarray(lam).reshape(1, 1, 1, -1) + jnp.asarray(offsets).reshape(1, 1, 1, -1)
    np.testing.assert_allclose(_ws(moved), _ws(w), rtol=1e-4, atol=2e-4)


@HYPOTHESIS
@given(seed=st.integers(0, 2**16), shift=st.floats(0.5, 10.0))
def test_weight_standardize_not_invariant_to_fan_in_dependent_changes(seed, shift):
    w, _ = kernel(_WS_SHAPE, seed=seed)
    y = np.asarray(_ws(w))
    np.testing.assert_allclose(_ws(-w), -y, rtol=1e-5, atol=1e-5)  # a negative scale flips it
    ramp = shift * jnp.arange(_WS_SHAPE[2], dtype=jnp.float32).reshape(1, 1, -1, 1)
    assert np.max(np.abs(np.asarray(_ws(w + ramp)) - y)) > 1e-2  # offsets that vary over the fan-in


_CN_X, _CN_W = (5, 6), (6, 3)
# exact invariance needs ‖x‖², ‖w_j‖² ≫ ε; λ down to 1e-2 makes them ~1e-4, hence a smaller ε here
_cn = jax.jit(lambda x, w: cosine_norm(x, w, eps=1e-14))


@HYPOTHESIS
@given(seed=st.integers(0, 2**16), lam_x=_log_uniform(_CN_X[0]), lam_w=_log_uniform(_CN_W[1]))
def test_cosine_norm_invariant_to_rescaling_inputs_and_columns(seed, lam_x, lam_w):
    x, _ = data(_CN_X, seed=seed)
    w, _ = kernel(_CN_W, seed=seed + 1)
    y = _cn(x, w)
    np.testing.assert_allclose(_cn(x * jnp.asarray(lam_x)[:, None], w), y, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(_cn(x, w * jnp.asarray(lam_w)[None, :]), y, rtol=1e-5, atol=2e-6)
    assert np.all(np.abs(np.asarray(y)) <= 1.0)


@HYPOTHESIS
@given(seed=st.integers(0, 2**16), shift=st.floats(1.0, 10.0))
def test_cosine_norm_not_invariant_to_recentering_inputs(seed, shift):
    x, _ = data(_CN_X, seed=seed)
    w, _ = kernel(_CN_W, seed=seed + 1)
    y = np.asarray(_cn(x, w))
    np.testing.assert_allclose(_cn(-x, w), -y, rtol=1e-5, atol=1e-6)  # λ < 0 flips the cosine
    assert np.max(np.abs(np.asarray(_cn(x + shift, w)) - y)) > 1e-2  # re-centering changes it


# ---------------------------------------------------------------------------------------------
# Anchors: PyTorch and Flax, where the semantics match


@pytest.fixture(name="torch")
def _torch():
    return pytest.importorskip("torch")  # only the anchor tests need it


def _t(a):
    import torch

    return torch.tensor(np.asarray(jnp.asarray(a, jnp.float32)), dtype=torch.float32)


@pytest.mark.parametrize("conv", [False, True])
def test_torch_weight_norm(conv, torch):
    """torch weight (out, in, ...) with dim=0 is our axis=0 on the same array, and axis=-1 on the
    Flax layout (..., in, out); g (out, 1, ...) is our g (out,)."""
    module = torch.nn.Conv2d(3, 5, 3) if conv else torch.nn.Linear(4, 5)
    with torch.no_grad():
        v_t = module.weight.detach().clone()
    module = torch.nn.utils.parametrizations.weight_norm(module, dim=0)
    g_init = module.parametrizations.weight.original0.detach().numpy().reshape(-1)
    np.testing.assert_allclose(weight_norm_init(v_t.numpy(), axis=0), g_init, rtol=1e-6)
    g = per_unit(tuple(v_t.shape), 0, seed=31)
    with torch.no_grad():
        module.parametrizations.weight.original0.copy_(_t(g).reshape((-1,) + (1,) * (v_t.ndim - 1)))
    w_t = module.weight
    cot = np.random.default_rng(32).standard_normal(tuple(w_t.shape)).astype(np.float32)
    w_t.backward(torch.tensor(cot))
    to_flax = (2, 3, 1, 0) if conv else (1, 0)
    for perm, axis in [((0, 1, 2, 3)[: v_t.ndim], 0), (to_flax, -1)]:  # torch layout, Flax layout
        v = jnp.transpose(jnp.asarray(v_t.numpy()), perm)
        w, vjp = jax.vjp(lambda v, g, axis=axis: weight_norm(v, g, axis=axis), v, g)
        gv, gg = vjp(jnp.asarray(np.transpose(cot, perm)))
        undo = np.argsort(perm)
        np.testing.assert_allclose(np.transpose(w, undo), w_t.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.transpose(gv, undo), module.parametrizations.weight.original1.grad, atol=1e-5)
        np.testing.assert_allclose(gg, module.parametrizations.weight.original0.grad.reshape(-1), rtol=1e-4, atol=1e-5)


def test_torch_spectral_norm_one_step_from_the_same_u(torch):
    module = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(7, 5))
    param = module.parametrizations.weight
    u = _unit_vector(5, seed=33)
    with torch.no_grad():  # torch keeps (u, v) with v = N(Wᵀu); our state is u alone
        param[0]._u.copy_(_t(u))
        param[0]._v.copy_(torch.nn.functional.normalize(param.original.T @ _t(u), dim=0))
    w_t = module.weight  # training mode: one power-iteration step, then W / σ
    cot = np.random.default_rng(34).standard_normal((5, 7)).astype(np.float32)
    w_t.backward(torch.tensor(cot))
    w = jnp.asarray(param.original.detach().numpy())
    (y, new_u), vjp = jax.vjp(lambda w: spectral_norm(w, u, axis=0), w)
    (grad,) = vjp((jnp.asarray(cot), jnp.zeros_like(new_u)))
    np.testing.assert_allclose(y, w_t.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_u, param[0]._u.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, param.original.grad.numpy(), rtol=1e-4, atol=1e-5)
    # the Flax layout (in, out) with axis=-1 is the same normalization
    y_flax, u_flax = spectral_norm(w.T, u)
    np.testing.assert_allclose(y_flax.T, y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(u_flax, new_u, rtol=1e-6, atol=1e-7)


def test_torch_spectral_norm_after_both_iterations_converge(torch):
    torch.manual_seed(0)
    module = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Conv2d(3, 6, 3))
    for _ in range(200):  # each training-mode access runs one power-iteration step
        w_t = module.weight
    w = np.transpose(module.parametrizations.weight.original.detach().numpy(), (2, 3, 1, 0))  # Flax layout
    u = spectral_norm_init(jax.random.key(3), w, n_warmup=200)
    y, _ = spectral_norm(w, u)
    w_ref, _, _ = ref.spectral_norm_exact(w)
    np.testing.assert_allclose(y, np.transpose(w_t.detach().numpy(), (2, 3, 1, 0)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(y, w_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.abs(u), np.abs(module.parametrizations.weight[0]._u.numpy()), atol=1e-4)


def test_flax_weight_norm_dense():
    x, _ = data((6, 4), seed=35)
    module = nn.WeightNorm(nn.Dense(3))
    variables = module.init(jax.random.key(4), x)
    g = per_unit((4, 3), -1, seed=36)
    prm = variables["params"]
    prm = {"layer_instance": prm["layer_instance"], "layer_instance/kernel/scale": g}
    y_flax = module.apply({"params": prm}, x)
    layer = prm["layer_instance"]
    y = x @ weight_norm(layer["kernel"], g) + layer["bias"][None, :]
    np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input: trace-time errors that name the argument and the fix

V = jnp.ones((4, 3))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: weight_norm(jnp.ones((4, 3), jnp.int32), jnp.ones(3)), TypeError, r"v must be a floating-point"),
        (lambda: weight_norm(V, jnp.ones(3, jnp.int32)), TypeError, r"g must be a floating-point"),
        (
            lambda: weight_norm(V, jnp.ones(3), axis=2),
            ValueError,
            r"axis=2 is out of range for v with 2 dimensions \(shape \(4, 3\)\).*axis=0 for PyTorch",
        ),
        (
            lambda: weight_norm(V, jnp.ones(3), axis=(0, 1)),
            ValueError,
            r"g has shape \(3,\) but the feature axes \(0, 1\) .* g needs shape \(4, 3\).*axis=\(0, 1\)",
        ),
        (
            lambda: weight_norm(V, jnp.ones(3), axis=1.0),
            TypeError,
            r"axis must be an int, a tuple of ints, \(\) or None",
        ),
        (lambda: weight_norm(V, jnp.ones(3), axis=(1, -1)), ValueError, r"names the same axis of v"),
        (lambda: weight_norm(V, jnp.ones(3), axis=None), ValueError, r"g needs shape \(\)"),
        (
            lambda: weight_norm(V, jnp.ones(4)),
            ValueError,
            r"g has shape \(4,\) but the output axis 1 of the weight \(4, 3\) has size 3.*weight_norm_init",
        ),
        (
            lambda: weight_norm(jnp.ones(()), jnp.ones(())),
            ValueError,
            r"v has shape \(\): weight_norm needs at least 1",
        ),
        (lambda: spectral_norm(V, jnp.ones(3), sigma_from="w"), ValueError, r"sigma_from must be 'u'"),
        (lambda: weight_norm(V, jnp.ones(3), eps=0.0), ValueError, r"eps must be a finite number > 0"),
        (lambda: weight_norm_init(V, axis=-3), ValueError, r"axis=-3 is out of range for v"),
        (
            lambda: weight_norm_data_init(V, jnp.ones((8, 3))),
            ValueError,
            r"x has shape \(8, 3\), but v \(4, 3\) \(axis=-1\) has fan-in 4",
        ),
        (lambda: weight_norm_data_init(V, jnp.ones((1, 4))), ValueError, r"holds 1 example"),
        (lambda: weight_norm_data_init(jnp.ones((2, 2, 3)), jnp.ones((8, 4))), ValueError, r"only dense kernels"),
        (lambda: weight_standardize(jnp.ones((4, 3), jnp.int8)), TypeError, r"w must be a floating-point"),
        (lambda: weight_standardize(V, axis=5), ValueError, r"axis=5 is out of range for w"),
        (lambda: weight_standardize(jnp.ones((1, 3))), ValueError, r"single fan-in weight"),
        (lambda: weight_standardize(V, eps=-1.0), ValueError, r"eps must be a finite number > 0"),
        (
            lambda: spectral_norm(V, jnp.ones(4)),
            ValueError,
            r"u has shape \(4,\) but the output axis 1 of the weight \(4, 3\).*spectral_norm_init\(key, w, axis=-1\)",
        ),
        (lambda: spectral_norm(V, jnp.ones((1, 3))), ValueError, r"u has shape \(1, 3\)"),
        (lambda: spectral_norm(V, jnp.ones(3, jnp.int32)), TypeError, r"u must be a floating-point"),
        (lambda: spectral_norm(V, jnp.ones(3), n_steps=-1), ValueError, r"n_steps must be an int >= 0, got -1"),
        (lambda: spectral_norm(V, jnp.ones(3), n_steps=1.5), TypeError, r"n_steps must be a Python int"),
        (lambda: spectral_norm(V, jnp.ones(3), training=None), TypeError, r"training must be a Python bool"),
        (lambda: spectral_norm(V, jnp.ones(3), axis=2), ValueError, r"axis=2 is out of range for w"),
        (lambda: spectral_norm_init(jax.random.key(0), V, n_warmup=-2), ValueError, r"n_warmup must be an int >= 0"),
        (
            lambda: cosine_norm(jnp.ones((2, 5)), V),
            ValueError,
            r"x has shape \(2, 5\) but w has shape \(4, 3\): x's last axis .* \(\.\.\., 4\)",
        ),
        (lambda: cosine_norm(jnp.ones((2, 4)), jnp.ones((4, 3, 1))), ValueError, r"dense kernel \(in, out\)"),
        (lambda: cosine_norm(jnp.ones((2, 4), jnp.int32), V), TypeError, r"x must be a floating-point"),
        (lambda: cosine_norm(jnp.ones((2, 4)), V, eps=0), ValueError, r"eps must be a finite number > 0"),
        (
            lambda: cosine_norm_conv(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 3, 4))),
            ValueError,
            r"x has 2 input channels .* kernel must be \(\*window, 2, out\)",
        ),
        (lambda: cosine_norm_conv(jnp.ones((5, 5, 2)), jnp.ones((3, 3, 2, 4))), ValueError, r"one window axis per"),
        (
            lambda: cosine_norm_conv(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4)), strides=(1, 2, 1)),
            ValueError,
            r"strides=\(1, 2, 1\) must be an int",
        ),
    ],
)
def test_bad_input_message(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
