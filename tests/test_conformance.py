"""One row per method; every method earns every column.

Columns: jit == eager; bfloat16 in -> bfloat16 out; vmap over an extra leading axis == a loop;
no retrace when only values change; finite gradients; works on ShapeDtypeStruct (eval_shape).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests.helpers import data, params

SHAPE = (6, 4, 3, 8)
P = params(8)
S = bnjax.init_stats(8)
W = data((8, 8), seed=7, loc=0.0, scale=1.0)[0]  # a dense kernel (in, out) for cosine norm
U = bnjax.spectral_norm_init(jax.random.key(0), data(SHAPE)[0])


def _per_unit(y, v):
    """y · v along the last axis, in y's dtype (the weight-side rows use p as per-unit values)."""
    return y * v.astype(y.dtype).reshape((1,) * (y.ndim - 1) + v.shape)


METHODS = {
    "batch_norm_train": lambda x, p: bnjax.batch_norm(x, p, S, training=True)[0],
    "batch_norm_eval": lambda x, p: bnjax.batch_norm(x, p, S._replace(var=jnp.full(8, 2.0)), training=False)[0],
    "layer_norm": lambda x, p: bnjax.layer_norm(x, p),
    "group_norm": lambda x, p: bnjax.group_norm(x, p, num_groups=4),
    "instance_norm": lambda x, p: bnjax.instance_norm(x, p),
    "rms_norm": lambda x, p: bnjax.rms_norm(x, p),
    "normalize": lambda x, p: bnjax.normalize(x, jnp.float32(0.5), jnp.float32(2.0), p.scale, p.bias),
    # σ = 1 keeps the data's scale (3): bring the output to unit scale, as the shared tolerances assume
    "mean_only_batch_norm": lambda x, p: bnjax.mean_only_batch_norm(x / 3, p, S, training=True)[0],
    # weight-side methods: x plays the kernel (kh, kw, in, out) = SHAPE, or the input of cosine norm
    "weight_norm": lambda x, p: bnjax.weight_norm(x, p.scale),
    "weight_standardize": lambda x, p: _per_unit(bnjax.weight_standardize(x), p.scale),
    "spectral_norm": lambda x, p: _per_unit(bnjax.spectral_norm(x, U)[0], p.scale),
    "cosine_norm": lambda x, p: _per_unit(bnjax.cosine_norm(x, W), p.scale),
}
ROWS = sorted(METHODS)


@pytest.mark.parametrize("name", ROWS)
def test_jit_equals_eager(name):
    x, _ = data(SHAPE)
    f = METHODS[name]
    np.testing.assert_allclose(jax.jit(f)(x, P), f(x, P), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ROWS)
def test_bfloat16_in_bfloat16_out(name):
    x, _ = data(SHAPE, jnp.bfloat16)
    y = METHODS[name](x, P)
    assert y.dtype == jnp.bfloat16
    y32 = METHODS[name](x.astype(jnp.float32), P)
    np.testing.assert_allclose(y.astype(jnp.float32), y32, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("name", ROWS)
def test_vmap_equals_loop(name):
    xs, _ = data((3,) + SHAPE)
    f = METHODS[name]
    batched = jax.vmap(f, in_axes=(0, None))(xs, P)
    looped = jnp.stack([f(x, P) for x in xs])
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ROWS)
def test_no_retrace_when_only_values_change(name):
    traces = []

    @jax.jit
    def f(x, p):
        traces.append(1)  # runs once per trace, not per call
        return METHODS[name](x, p)

    for seed in range(3):
        f(data(SHAPE, seed=seed)[0], params(8, seed=seed))
    assert len(traces) == 1


@pytest.mark.parametrize("name", ROWS)
def test_finite_gradients(name):
    x, _ = data(SHAPE)
    grads = jax.grad(lambda x, p: jnp.sum(METHODS[name](x, p) ** 3), argnums=(0, 1))(x, P)
    for g in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("name", ROWS)
def test_eval_shape(name):
    out = jax.eval_shape(METHODS[name], jax.ShapeDtypeStruct(SHAPE, jnp.float16), P)
    assert out.shape == SHAPE and out.dtype == jnp.float16
