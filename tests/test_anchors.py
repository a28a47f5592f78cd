"""Agreement with the anchor libraries where their semantics match ours.

Flax (linen) with ``use_fast_variance=False``, and PyTorch CPU. Parity options: Flax's plain EMA
is ``debias=False``; PyTorch's ``momentum=p`` is our ``momentum=1-p`` with ``debias=False`` and
``unbiased_running_var=True``; PyTorch's ``momentum=None`` is our ``momentum=None`` with
``unbiased_running_var=True``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests.helpers import data, params

torch = pytest.importorskip("torch")

STEPS = 5


def _batches(shape, k=STEPS):
    return [data(shape, seed=10 + i, loc=0.5 * i, scale=1.0 + 0.3 * i)[0] for i in range(k)]


# ---------------------------------------------------------------------------------------------
# Flax


def test_flax_batch_norm_outputs_gradients_and_running_stats():
    shape, c = (8, 4, 4, 6), 6
    p = params(c)
    module = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, use_fast_variance=False)
    variables = module.init(jax.random.key(0), jnp.zeros(shape))
    variables = {"params": {"scale": p.scale, "bias": p.bias}, "batch_stats": variables["batch_stats"]}
    stats = bnjax.init_stats(c)
    cot = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    for x in _batches(shape):

        def flax_loss(x, prm, bs):
            y, upd = module.apply({"params": prm, "batch_stats": bs}, x, mutable=["batch_stats"])
            return jnp.sum(y * cot), (y, upd["batch_stats"])

        def ours_loss(x, prm, st):
            y, st = bnjax.batch_norm(x, prm, st, training=True, momentum=0.9, debias=False)
            return jnp.sum(y * cot), (y, st)

        (gx_f, gp_f), (y_f, bs) = jax.grad(flax_loss, argnums=(0, 1), has_aux=True)(
            x, variables["params"], variables["batch_stats"]
        )
        (gx, gp), (y, stats) = jax.grad(ours_loss, argnums=(0, 1), has_aux=True)(x, p, stats)
        variables["batch_stats"] = bs
        np.testing.assert_allclose(y, y_f, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gx, gx_f, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(gp.scale, gp_f["scale"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(gp.bias, gp_f["bias"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.mean, bs["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.var, bs["var"], rtol=1e-5, atol=1e-6)
    y_f = module.clone(use_running_average=True).apply(variables, x)
    y, _ = bnjax.batch_norm(x, p, stats, training=False)
    np.testing.assert_allclose(y, y_f, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flax_layer_norm(dtype):
    x, _ = data((4, 7, 16), dtype)
    p = params(16)
    module = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype)
    vs = {"params": {"scale": p.scale, "bias": p.bias}}
    y_f, vjp_f = jax.vjp(lambda x, v: module.apply(v, x), x, vs)
    y, vjp = jax.vjp(lambda x, p: bnjax.layer_norm(x, p), x, p)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=3e-2)
    np.testing.assert_allclose(y.astype(jnp.float32), y_f.astype(jnp.float32), **tol)
    if dtype == jnp.float32:
        cot = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), dtype)
        (gx, gp), (gx_f, gv) = vjp(cot), vjp_f(cot)
        np.testing.assert_allclose(gx, gx_f, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(gp.scale, gv["params"]["scale"], rtol=1e-4, atol=1e-4)


def test_flax_group_norm():
    x, _ = data((3, 5, 4, 12))
    p = params(12)
    module = nn.GroupNorm(num_groups=4, epsilon=1e-5, use_fast_variance=False)
    y_f = module.apply({"params": {"scale": p.scale, "bias": p.bias}}, x)
    np.testing.assert_allclose(bnjax.group_norm(x, p, num_groups=4), y_f, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# PyTorch (NCHW, our axis=1)


def _t(a):
    return torch.tensor(np.asarray(jnp.asarray(a, jnp.float32)), dtype=torch.float32)


@pytest.mark.parametrize("torch_momentum", [0.1, None])
def test_torch_batch_norm_outputs_gradients_and_running_stats(torch_momentum):
    shape, c = (6, 5, 4, 3), 5
    p = params(c)
    tbn = torch.nn.BatchNorm2d(c, eps=1e-5, momentum=torch_momentum)
    with torch.no_grad():
        tbn.weight.copy_(_t(p.scale))
        tbn.bias.copy_(_t(p.bias))
    stats = bnjax.init_stats(c)
    momentum = None if torch_momentum is None else 1 - torch_momentum
    cot = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    for x in _batches(shape):
        xt = _t(x).requires_grad_(True)
        tbn.weight.grad = tbn.bias.grad = None
        yt = tbn(xt)
        yt.backward(torch.tensor(cot))

        def loss(x, prm, st):
            y, st = bnjax.batch_norm(
                x, prm, st, training=True, axis=1, momentum=momentum, debias=False, unbiased_running_var=True
            )
            return jnp.sum(y * cot), (y, st)

        (gx, gp), (y, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, p, stats)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(gp.scale, tbn.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(gp.bias, tbn.bias.grad.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.mean, tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.var, tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    assert int(stats.count) == int(tbn.num_batches_tracked)
    tbn.eval()
    y, _ = bnjax.batch_norm(x, p, stats, training=False, axis=1)
    np.testing.assert_allclose(y, tbn(_t(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_torch_layer_norm():
    x, _ = data((4, 7, 16))
    p = params(16)
    tln = torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        tln.weight.copy_(_t(p.scale))
        tln.bias.copy_(_t(p.bias))
    xt = _t(x).requires_grad_(True)
    yt = tln(xt)
    cot = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    yt.backward(torch.tensor(cot))
    y, vjp = jax.vjp(lambda x, p: bnjax.layer_norm(x, p), x, p)
    gx, gp = vjp(jnp.asarray(cot))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gp.scale, tln.weight.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_torch_group_and_instance_norm():
    x, _ = data((3, 12, 5, 4))
    p = params(12)
    tgn = torch.nn.GroupNorm(4, 12, eps=1e-5)
    tin = torch.nn.InstanceNorm2d(12, eps=1e-5, affine=True)
    with torch.no_grad():
        for m in (tgn, tin):
            m.weight.copy_(_t(p.scale))
            m.bias.copy_(_t(p.bias))
    xt = _t(x).requires_grad_(True)
    yt = tgn(xt)
    cot = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    yt.backward(torch.tensor(cot))
    y, vjp = jax.vjp(lambda x, p: bnjax.group_norm(x, p, num_groups=4, axis=1), x, p)
    gx, gp = vjp(jnp.asarray(cot))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gp.scale, tgn.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gp.bias, tgn.bias.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bnjax.instance_norm(x, p, axis=1), tin(_t(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_torch_rms_norm():
    x, _ = data((4, 16))
    p = params(16)
    trms = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        trms.weight.copy_(_t(p.scale))
    y = bnjax.rms_norm(x, bnjax.NormParams(p.scale, None), eps=1e-6)
    np.testing.assert_allclose(y, trms(_t(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
