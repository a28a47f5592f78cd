"""precise_batch_stats (linen and nnx): the exact population statistics of every BatchNorm's
inputs over all batches (unequal sizes), against float64 statistics of the captured inputs, and
different from the average of per-batch variances."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx

SIZES = (8, 5, 11)


def _batches():
    # batches with different means: the spread of the batch means is part of the population variance
    return [jax.random.normal(jax.random.key(i), (n, 3)) + 2.0 * i for i, n in enumerate(SIZES)]


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(4)(x)
        x = bnjax.linen.BatchNorm(use_running_average=not train, name="bn1")(x)
        x = nn.Dense(2)(jax.nn.relu(x))
        return bnjax.linen.BatchNorm(use_running_average=not train, name="bn2")(x)


def _layer_inputs(params, batch):
    """The inputs of bn1 and bn2 in training mode, by hand with the functional API."""
    h1 = batch @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None]
    p1 = bnjax.NormParams(params["bn1"]["scale"], params["bn1"]["bias"])
    y1 = bnjax.batch_norm(h1, p1, bnjax.init_stats(4), training=True, eps=1e-5)[0]
    h2 = jax.nn.relu(y1) @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"][None]
    return np.asarray(h1, np.float64), np.asarray(h2, np.float64)


def test_linen_precise_batch_stats_are_the_population_statistics():
    net = Net()
    v = net.init(jax.random.key(0), jnp.ones((2, 3)))
    batches = _batches()
    new = bnjax.linen.precise_batch_stats(net, v, iter(batches), progress=False, train=True)  # one-pass iterable
    inputs = [_layer_inputs(v["params"], b) for b in batches]
    for i, name in enumerate(("bn1", "bn2")):
        pop = np.concatenate([inp[i] for inp in inputs])
        np.testing.assert_allclose(new["batch_stats"][name]["mean"], pop.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new["batch_stats"][name]["var"], pop.var(0), rtol=1e-5, atol=1e-6)
        averaged = np.mean([inp[i].var(0) for inp in inputs], axis=0)  # fvcore's precise BN
        assert np.max(np.abs(averaged - pop.var(0)) / pop.var(0)) > 0.05
    jax.tree.map(np.testing.assert_array_equal, new["params"], v["params"])
    with pytest.raises(ValueError, match="found no bnjax BatchNorm in training mode"):
        bnjax.linen.precise_batch_stats(net, v, batches, progress=False)  # train=False: no batch statistics


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.dense0 = nnx.Linear(3, 4, rngs=rngs)
        self.bn1 = bnjax.nnx.BatchNorm(4, rngs=rngs)
        self.dense1 = nnx.Linear(4, 2, rngs=rngs)
        self.bn2 = bnjax.nnx.BatchNorm(2, track_updates=True, rngs=rngs)

    def __call__(self, x):
        return self.bn2(self.dense1(jax.nn.relu(self.bn1(self.dense0(x)))))


def test_nnx_precise_batch_stats_in_place_and_the_mode_restored():
    net = Net()
    v = net.init(jax.random.key(0), jnp.ones((2, 3)))
    want = bnjax.linen.precise_batch_stats(net, v, _batches(), progress=False, train=True)
    model = NnxNet(nnx.Rngs(0))
    for ours, theirs in (("dense0", "Dense_0"), ("dense1", "Dense_1")):
        getattr(model, ours).kernel[...] = v["params"][theirs]["kernel"]
        getattr(model, ours).bias[...] = v["params"][theirs]["bias"]
    model.eval()
    count = model.bn2.count[...]
    out = bnjax.nnx.precise_batch_stats(model, _batches(), progress=False)
    assert out is model and model.bn1.use_running_average is True  # still in evaluation mode
    np.testing.assert_array_equal(model.bn2.count[...], count)  # the pass updated nothing else
    for name in ("bn1", "bn2"):
        np.testing.assert_allclose(getattr(model, name).mean[...], want["batch_stats"][name]["mean"], rtol=1e-6)
        np.testing.assert_allclose(getattr(model, name).var[...], want["batch_stats"][name]["var"], rtol=1e-6)
    assert model.bn1._precise_capture is None and "_precise_capture" not in vars(model.bn1)


def test_precise_batch_stats_over_batches_sharded_across_devices():
    # batches sharded over the 8 CPU devices (jit over sharded arrays): the moments are global,
    # the same as on one device and as float64 statistics of the layers' inputs
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = NamedSharding(mesh, PartitionSpec("data"))
    batches = [jax.random.normal(jax.random.key(i), (n, 3)) + 2.0 * i for i, n in enumerate((16, 8, 24))]
    sharded = [jax.device_put(b, shard) for b in batches]
    assert len(sharded[0].sharding.device_set) == len(jax.devices()) > 1
    net = Net()
    v = net.init(jax.random.key(0), jnp.ones((2, 3)))
    got = bnjax.linen.precise_batch_stats(net, v, sharded, progress=False, train=True)
    local = bnjax.linen.precise_batch_stats(net, v, batches, progress=False, train=True)
    inputs = [_layer_inputs(v["params"], b) for b in batches]
    for i, name in enumerate(("bn1", "bn2")):
        pop = np.concatenate([inp[i] for inp in inputs])
        for stats in (got, local):
            np.testing.assert_allclose(stats["batch_stats"][name]["mean"], pop.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stats["batch_stats"][name]["var"], pop.var(0), rtol=1e-5, atol=1e-6)
    model = NnxNet(nnx.Rngs(0))
    for ours, theirs in (("dense0", "Dense_0"), ("dense1", "Dense_1")):
        getattr(model, ours).kernel[...] = v["params"][theirs]["kernel"]
        getattr(model, ours).bias[...] = v["params"][theirs]["bias"]
    bnjax.nnx.precise_batch_stats(model, sharded, progress=False)
    for name in ("bn1", "bn2"):
        np.testing.assert_allclose(getattr(model, name).var[...], local["batch_stats"][name]["var"], rtol=1e-5)
        np.testing.assert_allclose(
            getattr(model, name).mean[...], local["batch_stats"][name]["mean"], rtol=1e-5, atol=1e-6
        )
