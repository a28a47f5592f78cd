"""Running statistics are updated exactly once per training call, under the transformations that
re-run a forward pass (jax.checkpoint / nn.remat / nnx.remat recompute it in the backward pass)
or trace it several times (nn.scan and nnx.scan over layers, lax.cond's two branches). The state is a value
returned by the forward pass, so a recomputation cannot apply it twice; these tests hold that."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx
from tests.helpers import data

C = 3
X, X64 = data((16, C), seed=1, loc=2.0)
MOMENTUM = 0.9


def _one_update(mean0=0.0):
    """The running mean after exactly one plain-EMA update from mean0 with this batch."""
    return MOMENTUM * mean0 + (1 - MOMENTUM) * X64.mean(0)


def test_jax_checkpoint_functional():
    p, st = bnjax.init_params(C), bnjax.init_stats(C)

    @jax.checkpoint
    def f(x, p, st):
        y, new = bnjax.batch_norm(x, p, st, training=True, momentum=MOMENTUM, debias=False)
        return jnp.sum(y**3), new

    (_, new), _ = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(X, p, st)
    np.testing.assert_allclose(new.mean, _one_update(), rtol=1e-6)
    assert int(new.count) == 1


def test_linen_remat_and_scan_over_layers():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return bnjax.linen.BatchNorm(use_running_average=False, momentum=MOMENTUM)(x), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.remat(bnjax.linen.BatchNorm)(use_running_average=False, momentum=MOMENTUM, name="remat_bn")(x)
            scan = nn.scan(
                Block,
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True},
                length=3,
            )
            x, _ = scan(name="scanned")(x, None)
            return x

    net = Net()
    v = net.init(jax.random.key(0), X)

    def loss(params):
        y, upd = net.apply({"params": params, "batch_stats": v["batch_stats"]}, X, mutable=["batch_stats"])
        return jnp.sum(y**3), upd

    (_, upd), _ = jax.value_and_grad(loss, has_aux=True)(v["params"])
    # the same layers unrolled by hand with the functional API: one update each
    h, expected = X, []
    for _ in range(4):
        h, new = bnjax.batch_norm(
            h, bnjax.init_params(C), bnjax.init_stats(C), training=True, momentum=MOMENTUM, debias=False
        )
        expected.append(new)
    got = upd["batch_stats"]
    np.testing.assert_allclose(got["remat_bn"]["mean"], _one_update(), rtol=1e-6)
    np.testing.assert_allclose(got["remat_bn"]["mean"], expected[0].mean, rtol=1e-6)
    scanned = got["scanned"]["BatchNorm_0"]
    assert scanned["mean"].shape == (3, C)
    for i in range(3):
        np.testing.assert_allclose(scanned["mean"][i], expected[i + 1].mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(scanned["var"][i], expected[i + 1].var, rtol=1e-5)


def test_nnx_remat():
    layer = bnjax.nnx.BatchNorm(C, momentum=MOMENTUM, rngs=nnx.Rngs(0))

    @nnx.remat
    def forward(m, x):
        return m(x)

    nnx.grad(lambda m: jnp.sum(forward(m, X) ** 3))(layer)
    np.testing.assert_allclose(layer.mean[...], _one_update(), rtol=1e-6)


def test_lax_cond_applies_the_update_of_the_branch_taken_once():
    p, st = bnjax.init_params(C), bnjax.init_stats(C)

    def train(x, st):
        return bnjax.batch_norm(x, p, st, training=True, momentum=MOMENTUM, debias=False)

    def evaluate(x, st):
        return bnjax.batch_norm(x, p, st, training=False)

    run = jax.jit(lambda flag, x, st: jax.lax.cond(flag, train, evaluate, x, st))
    _, new = run(True, X, st)
    np.testing.assert_allclose(new.mean, _one_update(), rtol=1e-6)
    _, same = run(False, X, new)
    jax.tree.map(np.testing.assert_array_equal, same, new)
    g = jax.grad(lambda x: jnp.sum(run(True, x, st)[0] ** 3))(X)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_nnx_scan_over_layers_with_remat():
    layers_n = 3

    @nnx.split_rngs(splits=layers_n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return bnjax.nnx.BatchNorm(C, momentum=MOMENTUM, rngs=rngs)

    stack = make(nnx.Rngs(0))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    @nnx.remat
    def forward(layer, x):
        return layer(x)

    nnx.grad(lambda m: jnp.sum(forward(m, X) ** 3))(stack)
    h = X
    assert stack.mean[...].shape == (layers_n, C)
    for i in range(layers_n):
        h, new = bnjax.batch_norm(
            h, bnjax.init_params(C), bnjax.init_stats(C), training=True, momentum=MOMENTUM, debias=False
        )
        np.testing.assert_allclose(stack.mean[...][i], new.mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stack.var[...][i], new.var, rtol=1e-5)
    np.testing.assert_allclose(stack.mean[...][0], _one_update(), rtol=1e-6)
