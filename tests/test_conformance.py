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

METHODS = {
    "batch_norm_train": lambda x, p: bnjax.batch_norm(x, p, S, training=True)[0],
    "batch_norm_eval": lambda x, p: bnjax.batch_norm(x, p, S._replace(var=jnp.full(8, 2.0)), training=False)[0],
    "layer_norm": lambda x, p: bnjax.layer_norm(x, p),
    "group_norm": lambda x, p: bnjax.group_norm(x, p, num_groups=4),
    "instance_norm": lambda x, p: bnjax.instance_norm(x, p),
    "rms_norm": lambda x, p: bnjax.rms_norm(x, p),
    "normalize": lambda x, p: bnjax.normalize(x, jnp.float32(0.5), jnp.float32(2.0), p.scale, p.bias),
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
