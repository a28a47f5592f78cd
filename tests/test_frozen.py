"""Frozen batch norm (``frozen=True`` on the Flax shells): the stored statistics, no update, no
gradient to scale and bias, whatever use_running_average or model.train() say; and the
fine-tuning recipe of the README."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax.linen
import bnjax.nnx
from tests import reference as ref
from tests.helpers import close, data

C = 4
X, X64 = data((8, 3, C), seed=1, loc=2.0)
STATS = {"mean": jnp.linspace(0.0, 1.0, C), "var": jnp.linspace(1.0, 2.0, C)}


def test_linen_frozen_uses_stored_statistics_updates_nothing_and_blocks_gradients():
    layer = bnjax.linen.BatchNorm(use_running_average=False, frozen=True)
    v = layer.init(jax.random.key(0), X)
    v = {"params": {"scale": jnp.full(C, 2.0), "bias": jnp.full(C, 0.5)}, "batch_stats": STATS}
    y, upd = layer.apply(v, X, mutable=["batch_stats"])
    close(y, ref.batch_norm_eval(X64, np.full(C, 2.0), np.full(C, 0.5), STATS["mean"], STATS["var"]))
    jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], STATS)
    gp, gx = jax.grad(lambda p, x: jnp.sum(layer.apply({"params": p, "batch_stats": STATS}, x) ** 2), argnums=(0, 1))(
        v["params"], X
    )
    assert float(jnp.abs(gp["scale"]).max()) == 0.0 and float(jnp.abs(gp["bias"]).max()) == 0.0
    assert float(jnp.abs(gx).max()) > 0  # the input still gets its gradient (layers below train)
    with pytest.raises(ValueError, match=r"frozen=True\) was called with use_running_average=False"):
        bnjax.linen.BatchNorm(frozen=True).apply(v, X, use_running_average=False)


def test_nnx_frozen_ignores_train_mode():
    layer = bnjax.nnx.BatchNorm(C, frozen=True, rngs=nnx.Rngs(0))
    layer.mean[...], layer.var[...] = STATS["mean"], STATS["var"]
    layer.train()
    y = layer(X)
    close(y, ref.batch_norm_eval(X64, np.ones(C), np.zeros(C), STATS["mean"], STATS["var"]))
    np.testing.assert_array_equal(layer.mean[...], STATS["mean"])
    grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2))(layer)
    assert float(jnp.abs(grads.scale[...]).max()) == 0.0 and float(jnp.abs(grads.bias[...]).max()) == 0.0
    with pytest.raises(ValueError, match="frozen layer never uses batch statistics"):
        layer(X, use_running_average=False)


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.dense1 = nnx.Linear(C, 8, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.dense2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.dense2(jax.nn.relu(self.bn(self.dense1(x))))


def test_fine_tuning_recipe_freezes_every_batch_norm():
    model = _Net(nnx.Rngs(0))
    x, y = X.reshape(-1, C), (X.reshape(-1, C).sum(-1) > 6).astype(jnp.int32)

    def loss(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.jit
    def step(model, opt, x, y):
        grads = nnx.grad(loss)(model, x, y)
        opt.update(model, grads)

    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    for _ in range(3):  # "pretraining": the statistics move
        step(model, opt, x, y)
    # the recipe: freeze every bnjax BatchNorm, then fine-tune the rest as usual
    for _, module in nnx.iter_graph(model):
        if isinstance(module, bnjax.nnx.BatchNorm):
            module.frozen = True
    frozen_state = jax.tree.map(jnp.copy, nnx.state(model.bn))
    dense1 = model.dense1.kernel[...].copy()
    model.train()
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    for _ in range(3):
        step(model, opt, x, y)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model.bn), frozen_state)
    assert not np.array_equal(model.dense1.kernel[...], dense1)
