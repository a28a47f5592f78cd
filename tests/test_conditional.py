"""Per-example (conditional) affine parameters: g, b of x's rank that broadcast against it, e.g.
(N, 1, C) for x (N, T, C) (FiLM, conditional batch norm, AdaLN), in every data-side method,
through the fused backward pass, against float64 NumPy and against autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests import reference as ref
from tests.helpers import close, data

KEY = jax.random.key(0)


def _per_example(shape, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return bnjax.NormParams(1.0 + 0.5 * jax.random.normal(k1, shape), jax.random.normal(k2, shape))


# (method, x shape, param shape, call keywords, float64 reference of x̂ with unit params)
CASES = {
    "layer_norm": (
        (4, 6, 8),
        (4, 1, 8),
        {},
        lambda x: ref.layer_norm(x, None, None),
    ),
    "layer_norm_rows": (  # 4096 rows: the statistics' rows path, recomputed in the backward pass
        (4096, 8),
        (4096, 1),
        {},
        lambda x: ref.layer_norm(x, None, None),
    ),
    "rms_norm": ((4, 6, 8), (4, 1, 8), {}, lambda x: ref.rms_norm(x, None)),
    "group_norm": ((2, 3, 3, 8), (2, 1, 1, 8), {"num_groups": 4}, lambda x: ref.group_norm(x, None, None, 4)),
    "group_norm_scalar": ((2, 3, 3, 8), (2, 1, 1, 1), {"num_groups": 2}, lambda x: ref.group_norm(x, None, None, 2)),
    "instance_norm": ((2, 3, 3, 8), (2, 1, 1, 8), {}, lambda x: ref.instance_norm(x, None, None)),
    "batch_norm": ((6, 3, 3, 8), (6, 1, 1, 8), {}, lambda x: ref.batch_norm_train(x, None, None)[0]),
}


def _call(name, x, p, fused, **kw):
    method = name.split("_rows")[0].split("_scalar")[0]
    if method == "batch_norm":
        return bnjax.batch_norm(x, p, bnjax.init_stats(x.shape[-1]), training=True, fused_backward=fused, **kw)[0]
    return getattr(bnjax, method)(x, p, fused_backward=fused, **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_per_example_params_against_float64_and_autodiff(name):
    shape, pshape, kw, xhat_ref = CASES[name]
    x, _ = data(shape, seed=3)
    p = _per_example(pshape, seed=4)
    expected = xhat_ref(x) * ref.f64(p.scale) + ref.f64(p.bias)
    y = jax.jit(lambda x, p: _call(name, x, p, True, **kw))(x, p)
    close(y, expected)
    dy = jax.random.normal(KEY, shape)

    def loss(x, p, fused):
        return jnp.sum(_call(name, x, p, fused, **kw) * dy)

    def composed(x, p):  # the same loss, written as x̂ of unit params times g plus b
        unit = bnjax.NormParams(None, None)
        return jnp.sum((_call(name, x, unit, False, **kw) * p.scale + p.bias) * dy)

    fused = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, p, True)
    auto = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, p, False)
    want = jax.jit(jax.grad(composed, argnums=(0, 1)))(x, p)
    for got in (fused, auto):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)


def test_per_example_params_with_a_mask_and_nan_padding():
    x, _ = data((4, 6, 8), seed=5)
    mask = jnp.arange(6)[None, :, None] < jnp.array([6, 3, 1, 4])[:, None, None]
    poisoned = jnp.where(mask, x, jnp.nan)
    p = _per_example((4, 1, 8), seed=6)
    y = bnjax.layer_norm(poisoned, p, mask=mask)
    expected = ref.layer_norm(x, None, None) * ref.f64(p.scale) + ref.f64(p.bias)
    m = np.broadcast_to(np.asarray(mask), x.shape)
    close(np.asarray(y)[m], expected[m])
    g = jax.grad(lambda p: jnp.sum(jnp.where(mask, bnjax.layer_norm(poisoned, p, mask=mask), 0.0)))(p)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))


def test_conditional_batch_norm_leaves_the_running_statistics_as_plain_batch_norm():
    x, _ = data((6, 8), seed=7)
    stats = bnjax.init_stats(8)
    _, plain = bnjax.batch_norm(x, bnjax.init_params(8), stats, training=True)
    _, cond = bnjax.batch_norm(x, _per_example((6, 8), seed=8), stats, training=True)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(cond), strict=True):
        np.testing.assert_array_equal(a, b)
    # evaluation with per-example params uses them too
    y = bnjax.batch_norm(x, _per_example((6, 8), seed=8), cond, training=False)[0]
    p = _per_example((6, 8), seed=8)
    close(y, ref.batch_norm_eval(x, None, None, cond.mean, cond.var) * ref.f64(p.scale) + ref.f64(p.bias))


@pytest.mark.parametrize(
    "pshape",
    [(4, 8), (3, 1, 8), (4, 6, 1, 8), (1, 1, 7)],
)
def test_params_that_fit_neither_layout_are_refused_naming_both(pshape):
    x, _ = data((4, 6, 8), seed=9)
    with pytest.raises(
        ValueError, match=r"params.scale has shape .*per-example \(conditional\) params have x's rank 3"
    ):
        bnjax.layer_norm(x, bnjax.NormParams(jnp.ones(pshape), None))
