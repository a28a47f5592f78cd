"""bnjax.interop: PyTorch state_dict entries ↔ bnjax's Flax layers, checked side by side against
the PyTorch modules (float32, CPU): evaluation outputs, continued training, round trips through
``load_state_dict(strict=True)``, and the error messages."""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx
from bnjax import interop

torch = pytest.importorskip("torch")
P = torch.nn.utils.parametrizations


def _rand(shape, seed, loc=0.0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + loc).astype(np.float32)


def _t(a):
    return torch.from_numpy(np.array(a))  # a writable copy, 0-d arrays included


def _sd(arrays):
    return {k: _t(v) for k, v in arrays.items()}


def _last(x):
    """PyTorch's channels-first layout (N, C, ...) as channels-last (N, ..., C)."""
    return np.moveaxis(np.asarray(x), 1, -1)


def _close(actual, expected, rtol=1e-5):
    """Agreement to ``rtol`` relative to the output's scale (entries near 0 are not divided by ~0)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(1.0, float(np.max(np.abs(expected)))))


def _torch_run(module, x, train):
    module.train(train)
    with torch.no_grad():
        return module(_t(x)).numpy()


def _trained_torch_bn(cls, c, batches, momentum=0.1, eps=1e-5):
    torch.manual_seed(0)
    bn = cls(c, eps=eps, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(_t(_rand(c, 10, 1.0, 0.3)))
        bn.bias.copy_(_t(_rand(c, 11)))
    for x in batches:
        _torch_run(bn, x, train=True)
    return bn


# ---------------------------------------------------------------------------------------------
# Momentum


def test_momentum_conversions_are_inverse_and_exact_in_decimal():
    assert interop.momentum_from_torch(0.1) == 0.9
    assert interop.momentum_to_torch(0.9) == 0.1
    assert interop.momentum_to_torch(0.99) == 0.01
    assert interop.momentum_from_torch(1.0) == 0.0
    assert interop.momentum_from_torch(None) is None and interop.momentum_to_torch(None) is None
    for p in (0.1, 0.01, 0.3, 0.001):
        assert interop.momentum_to_torch(interop.momentum_from_torch(p)) == p
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        interop.momentum_from_torch(0.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        interop.momentum_to_torch(1.0)


# ---------------------------------------------------------------------------------------------
# BatchNorm


BN_CASES = {
    "1d-NC": (torch.nn.BatchNorm1d, (16, 5)),
    "1d-NCL": (torch.nn.BatchNorm1d, (8, 5, 7)),
    "2d": (torch.nn.BatchNorm2d, (4, 5, 6, 6)),
    "3d": (torch.nn.BatchNorm3d, (2, 5, 3, 4, 4)),
}


@pytest.mark.parametrize("case", list(BN_CASES))
def test_linen_batch_norm_evaluates_trains_on_and_round_trips_like_torch(case):
    cls, shape = BN_CASES[case]
    c, p, eps = shape[1], 0.1, 1e-5
    tbn = _trained_torch_bn(cls, c, [_rand(shape, s, 2.0, 3.0) for s in range(4)], momentum=p, eps=eps)
    v = interop.from_torch_batch_norm(tbn.state_dict())
    assert int(v["batch_stats"]["count"]) == 4 and v["batch_stats"]["count"].dtype == np.int32
    np.testing.assert_array_equal(v["batch_stats"]["var"], tbn.running_var.numpy())  # copied as is

    layer = bnjax.linen.BatchNorm(
        momentum=interop.momentum_from_torch(p), epsilon=eps, unbiased_running_var=True, track_updates=True
    )
    x = _rand(shape, 20, 2.0, 3.0)
    y = layer.apply(v, _last(x), use_running_average=True)
    _close(y, _last(_torch_run(tbn, x, train=False)))
    # a plain evaluation layer reads the same variables (Flax's layout; the counters are unused)
    flax_layout = interop.from_torch_batch_norm(tbn.state_dict(), track_updates=False)
    y_eval = bnjax.linen.BatchNorm(use_running_average=True, epsilon=eps).apply(flax_layout, _last(x))
    _close(y_eval, _last(_torch_run(tbn, x, train=False)))

    for step in range(3):  # both train on
        x = _rand(shape, 30 + step, 1.0, 2.0)
        y, upd = layer.apply(v, _last(x), use_running_average=False, mutable=["batch_stats"])
        v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
        _close(y, _last(_torch_run(tbn, x, train=True)))
        _close(v["batch_stats"]["mean"], tbn.running_mean.numpy())
        _close(v["batch_stats"]["var"], tbn.running_var.numpy())
        assert int(v["batch_stats"]["count"]) == int(tbn.num_batches_tracked) == 5 + step
    _close(layer.apply(v, _last(x), use_running_average=True), _last(_torch_run(tbn, x, train=False)))

    sd = interop.to_torch_batch_norm(v)
    assert sorted(sd) == sorted(tbn.state_dict()) and sd["num_batches_tracked"].dtype == np.int64
    fresh = cls(c, eps=eps, momentum=p)
    fresh.load_state_dict(_sd(sd), strict=True)
    for k, a in tbn.state_dict().items():
        _close(fresh.state_dict()[k].numpy(), a.numpy())
    back = interop.from_torch_batch_norm(fresh.state_dict())
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, v))


def test_nnx_batch_norm_evaluates_trains_on_and_round_trips_like_torch():
    shape, p, eps = (4, 6, 5, 5), 0.1, 1e-3
    tbn = _trained_torch_bn(torch.nn.BatchNorm2d, 6, [_rand(shape, s, -1.0, 2.0) for s in range(3)], p, eps)
    layer = bnjax.nnx.BatchNorm(
        6, momentum=interop.momentum_from_torch(p), epsilon=eps, unbiased_running_var=True, track_updates=True,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    interop.update_nnx(layer, interop.from_torch_batch_norm(tbn.state_dict()))
    assert int(layer.count[...]) == 3 and layer.count[...].dtype == jnp.int32
    x = _rand(shape, 7, -1.0, 2.0)
    layer.eval()
    _close(layer(_last(x)), _last(_torch_run(tbn, x, train=False)))
    layer.train()
    for step in range(3):
        x = _rand(shape, 40 + step)
        _close(layer(_last(x)), _last(_torch_run(tbn, x, train=True)))
    _close(layer.mean[...], tbn.running_mean.numpy())
    _close(layer.var[...], tbn.running_var.numpy())
    assert int(layer.count[...]) == int(tbn.num_batches_tracked) == 6

    sd = interop.to_torch_batch_norm(layer, prefix="bn")
    assert sorted(sd) == sorted(f"bn.{k}" for k in tbn.state_dict())
    fresh = torch.nn.Sequential()
    fresh.add_module("bn", torch.nn.BatchNorm2d(6, eps=eps, momentum=p))
    fresh.load_state_dict(_sd(sd), strict=True)
    assert int(fresh.bn.num_batches_tracked) == 6
    _close(fresh.bn.running_var.numpy(), tbn.running_var.numpy())


def test_batch_norm_cumulative_average_momentum_none_matches_torch():
    shape = (8, 3)
    tbn = _trained_torch_bn(torch.nn.BatchNorm1d, 3, [_rand(shape, s, 1.0, 2.0) for s in range(2)], momentum=None)
    v = interop.from_torch_batch_norm(tbn.state_dict())
    layer = bnjax.linen.BatchNorm(momentum=interop.momentum_from_torch(None), epsilon=1e-5, unbiased_running_var=True)
    for step in range(3):
        x = _rand(shape, 50 + step, 1.0, 2.0)
        y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
        _close(y, _torch_run(tbn, x, train=True))
    _close(v["batch_stats"]["mean"], tbn.running_mean.numpy())
    _close(v["batch_stats"]["var"], tbn.running_var.numpy())


def test_batch_norm_without_affine_has_no_params_and_round_trips():
    tbn = torch.nn.BatchNorm1d(4, affine=False)
    _torch_run(tbn, _rand((6, 4), 0, 1.0, 2.0), train=True)
    v = interop.from_torch_batch_norm(tbn.state_dict())
    assert v["params"] == {}
    x = _rand((6, 4), 1)
    layer = bnjax.linen.BatchNorm(use_running_average=True, use_scale=False, use_bias=False, track_updates=True)
    _close(layer.apply(v, x), _torch_run(tbn, x, train=False))
    fresh = torch.nn.BatchNorm1d(4, affine=False)
    fresh.load_state_dict(_sd(interop.to_torch_batch_norm(v)), strict=True)
    _close(fresh.running_var.numpy(), tbn.running_var.numpy())


# ---------------------------------------------------------------------------------------------
# LayerNorm, GroupNorm, RMSNorm


def _affine_norm(module, seed):
    with torch.no_grad():
        module.weight.copy_(_t(_rand(tuple(module.weight.shape), seed, 1.0, 0.5)))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(_t(_rand(tuple(module.bias.shape), seed + 1)))
    return module


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_torch(bias):
    tln = _affine_norm(torch.nn.LayerNorm(16, eps=1e-5, bias=bias), 0)
    v = interop.from_torch_layer_norm({f"enc.norm.{k}": t for k, t in tln.state_dict().items()}, "enc.norm")
    x = _rand((3, 5, 16), 1, 2.0, 3.0)
    y = bnjax.linen.LayerNorm(epsilon=1e-5, use_bias=bias).apply(v, x)
    _close(y, _torch_run(tln, x, train=False))
    fresh = torch.nn.LayerNorm(16, bias=bias)
    fresh.load_state_dict(_sd(interop.to_torch_norm(v)), strict=True)
    nnx_ln = bnjax.nnx.LayerNorm(16, epsilon=1e-5, use_bias=bias, rngs=nnx.Rngs(0))
    interop.update_nnx(nnx_ln, v)
    _close(nnx_ln(x), _torch_run(tln, x, train=False))


def test_layer_norm_over_several_trailing_axes_matches_torch():
    tln = _affine_norm(torch.nn.LayerNorm((4, 6), eps=1e-5), 2)
    v = interop.from_torch_layer_norm(tln.state_dict())
    x = _rand((3, 5, 4, 6), 3, 1.0, 2.0)
    layer = bnjax.linen.LayerNorm(epsilon=1e-5, reduction_axes=(-2, -1), feature_axes=(-2, -1))
    _close(layer.apply(v, x), _torch_run(tln, x, train=False))


def test_group_norm_matches_torch_on_nhwc():
    tgn = _affine_norm(torch.nn.GroupNorm(3, 12, eps=1e-5), 4)
    v = interop.from_torch_group_norm(tgn.state_dict())
    x = _rand((2, 12, 5, 5), 5, 1.0, 3.0)
    _close(bnjax.linen.GroupNorm(num_groups=3, epsilon=1e-5).apply(v, _last(x)), _last(_torch_run(tgn, x, False)))
    nnx_gn = bnjax.nnx.GroupNorm(12, num_groups=3, epsilon=1e-5, rngs=nnx.Rngs(0))
    interop.update_nnx(nnx_gn, v)
    _close(nnx_gn(_last(x)), _last(_torch_run(tgn, x, False)))
    fresh = torch.nn.GroupNorm(3, 12)
    fresh.load_state_dict(_sd(interop.to_torch_norm(nnx_gn)), strict=True)


@pytest.mark.parametrize("eps", [1e-6, None])
def test_rms_norm_matches_torch(eps):
    trms = _affine_norm(torch.nn.RMSNorm(10, eps=eps), 6)
    v = interop.from_torch_rms_norm(trms.state_dict())
    epsilon = float(np.finfo(np.float32).eps) if eps is None else eps  # torch's eps=None
    x = _rand((4, 3, 10), 7, 0.5, 2.0)
    _close(bnjax.linen.RMSNorm(epsilon=epsilon).apply(v, x), _torch_run(trms, x, False))
    fresh = torch.nn.RMSNorm(10, eps=eps)
    fresh.load_state_dict(_sd(interop.to_torch_norm(v)), strict=True)


# ---------------------------------------------------------------------------------------------
# Conv and Linear


CONV_CASES = {
    # name: (torch class, in, out, kernel, dict of torch options, input spatial shape)
    "conv2d": (torch.nn.Conv2d, 4, 6, (3, 3), {}, (9, 9)),
    "conv2d-rect-stride-pad-dilation": (torch.nn.Conv2d, 3, 5, (3, 2), dict(stride=2, padding=1, dilation=2), (11, 10)),
    "conv2d-groups": (torch.nn.Conv2d, 6, 4, (3, 3), dict(groups=2, padding=1), (7, 7)),
    "conv2d-depthwise": (torch.nn.Conv2d, 4, 8, (3, 3), dict(groups=4, padding=1, bias=False), (6, 6)),
    "conv1d": (torch.nn.Conv1d, 3, 5, (4,), dict(stride=2, padding=1), (13,)),
    "conv3d": (torch.nn.Conv3d, 2, 3, (2, 3, 2), {}, (4, 5, 4)),
}


def _flax_conv(cls_args):
    _, _, out, kernel, opts, _ = cls_args
    n = len(kernel)
    pad, stride, dil = opts.get("padding", 0), opts.get("stride", 1), opts.get("dilation", 1)
    return nn.Conv(
        out,
        kernel,
        strides=stride,
        padding=[(pad, pad)] * n,
        kernel_dilation=dil,
        feature_group_count=opts.get("groups", 1),
        use_bias=opts.get("bias", True),
    )


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_matches_torch_and_round_trips(case):
    cls, cin, out, kernel, opts, spatial = CONV_CASES[case]
    torch.manual_seed(1)
    tconv = cls(cin, out, kernel, **opts)
    v = interop.from_torch_conv(tconv.state_dict())
    groups = opts.get("groups", 1)
    assert v["params"]["kernel"].shape == (*kernel, cin // groups, out)
    x = _rand((2, cin, *spatial), 8, 0.5, 2.0)
    y = _flax_conv(CONV_CASES[case]).apply(v, _last(x))
    _close(y, _last(_torch_run(tconv, x, False)))

    fresh = cls(cin, out, kernel, **opts)
    fresh.load_state_dict(_sd(interop.to_torch_conv(v)), strict=True)
    for k, a in tconv.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[k].numpy(), a.numpy())

    if len(kernel) == 2:  # nnx.Conv via update_nnx
        pad = opts.get("padding", 0)
        conv = nnx.Conv(
            cin, out, kernel, strides=opts.get("stride", 1), padding=[(pad, pad)] * 2,
            kernel_dilation=opts.get("dilation", 1), feature_group_count=groups, use_bias=opts.get("bias", True),
            rngs=nnx.Rngs(0),
        )  # fmt: skip
        interop.update_nnx(conv, v)
        _close(conv(_last(x)), _last(_torch_run(tconv, x, False)))
        np.testing.assert_array_equal(interop.to_torch_conv(conv)["weight"], tconv.weight.detach().numpy())


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch_and_round_trips(bias):
    torch.manual_seed(2)
    tlin = torch.nn.Linear(7, 5, bias=bias)
    v = interop.from_torch_linear(tlin.state_dict())
    x = _rand((3, 4, 7), 9, 1.0, 2.0)
    _close(nn.Dense(5, use_bias=bias).apply(v, x), _torch_run(tlin, x, False))
    lin = nnx.Linear(7, 5, use_bias=bias, rngs=nnx.Rngs(0))
    interop.update_nnx(lin, v)
    _close(lin(x), _torch_run(tlin, x, False))
    fresh = torch.nn.Linear(7, 5, bias=bias)
    fresh.load_state_dict(_sd(interop.to_torch_linear(lin)), strict=True)
    np.testing.assert_array_equal(fresh.weight.detach().numpy(), tlin.weight.detach().numpy())


def test_tensors_with_grad_and_bfloat16_are_converted():
    tlin = torch.nn.Linear(3, 2).to(torch.bfloat16)
    v = interop.from_torch_linear(tlin.state_dict(keep_vars=True))  # parameters that require grad
    assert v["params"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(v["params"]["kernel"], np.float32), tlin.weight.detach().float().numpy().T)


def test_importing_interop_does_not_import_torch():
    code = "import sys, bnjax.interop; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Weight norm and spectral norm


def _weight_norm_torch(module, dim=0):
    module = P.weight_norm(module, dim=dim)
    with torch.no_grad():  # g away from ‖v‖, so that g is really used
        g = module.parametrizations.weight.original0
        g.copy_(g * _t(_rand(tuple(g.shape), 12, 1.0, 0.3)))
    return module


def test_weight_norm_linear_matches_torch_in_linen_and_nnx():
    torch.manual_seed(3)
    twn = _weight_norm_torch(torch.nn.Linear(6, 4))
    v = interop.from_torch_weight_norm(twn.state_dict())
    x = _rand((5, 6), 13, 1.0, 2.0)
    expected = _torch_run(twn, x, False)
    _close(bnjax.linen.WeightNorm(nn.Dense(4)).apply(v, x), expected)
    wn = bnjax.nnx.WeightNorm(nnx.Linear(6, 4, rngs=nnx.Rngs(0)))
    interop.update_nnx(wn, v)
    _close(wn(x), expected)


def test_weight_norm_conv_and_dim_none_and_deprecated_keys_match_torch():
    torch.manual_seed(4)
    twn = _weight_norm_torch(torch.nn.Conv2d(3, 5, 3, padding=1))
    sd = {f"block.conv.{k}": t for k, t in twn.state_dict().items()}
    v = interop.from_torch_weight_norm(sd, "block.conv", name="Conv_0")
    assert v["params"]["Conv_0/kernel/scale"].shape == (5,)
    x = _rand((2, 3, 6, 6), 14)
    expected = _last(_torch_run(twn, x, False))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return bnjax.linen.WeightNorm(nn.Conv(5, (3, 3), padding=[(1, 1)] * 2))(x)

    # a layer built in a parent's compact method: Flax keeps its params beside the wrapper's
    params = {
        "Conv_0": v["params"]["Conv_0"],
        "WeightNorm_0": {"Conv_0/kernel/scale": v["params"]["Conv_0/kernel/scale"]},
    }
    _close(Block().apply({"params": params}, _last(x)), expected)
    # the deprecated torch.nn.utils.weight_norm's keys
    old = {
        "weight_g": twn.parametrizations.weight.original0,
        "weight_v": twn.parametrizations.weight.original1,
        "bias": twn.bias,
    }
    v_old = interop.from_torch_weight_norm(old)
    layer = bnjax.linen.WeightNorm(nn.Conv(5, (3, 3), padding=[(1, 1)] * 2))
    _close(layer.apply(v_old, _last(x)), expected)

    tall = _weight_norm_torch(torch.nn.Linear(4, 3), dim=None)  # one norm over all of v
    v_all = interop.from_torch_weight_norm(tall.state_dict())
    assert v_all["params"]["layer_instance/kernel/scale"].shape == ()
    x2 = _rand((3, 4), 15)
    _close(bnjax.linen.WeightNorm(nn.Dense(3), feature_axes=None).apply(v_all, x2), _torch_run(tall, x2, False))


def _converged_spectral_norm(module, x, calls=60):
    torch.manual_seed(5)
    module = P.spectral_norm(module)
    for _ in range(calls):  # power-iteration steps on the fixed weight: u and v converge
        _torch_run(module, x, train=True)
    return module


def test_spectral_norm_linear_matches_torch_in_eval():
    torch.manual_seed(6)
    x = _rand((5, 8), 16, 1.0, 2.0)
    tsn = _converged_spectral_norm(torch.nn.Linear(8, 6), x)
    v = interop.from_torch_spectral_norm(tsn.state_dict())
    u = tsn.parametrizations.weight[0]._u.numpy()
    np.testing.assert_array_equal(v["batch_stats"]["layer_instance/kernel/u"], u[None])
    expected = _torch_run(tsn, x, False)
    with torch.no_grad():
        sigma = float(tsn.parametrizations.weight.original[0, 0] / tsn.weight[0, 0])  # torch's eval σ
    _close(v["batch_stats"]["layer_instance/kernel/sigma"], sigma)
    _close(bnjax.linen.SpectralNorm(nn.Dense(6)).apply(v, x, update_stats=False), expected)
    sn = bnjax.nnx.SpectralNorm(nnx.Linear(8, 6, rngs=nnx.Rngs(0)), update_stats=False, rngs=nnx.Rngs(1))
    interop.update_nnx(sn, v)
    _close(sn(x), expected)


def test_spectral_norm_conv_matches_torch_in_eval():
    torch.manual_seed(7)
    x = _rand((2, 3, 7, 7), 17)
    tsn = _converged_spectral_norm(torch.nn.Conv2d(3, 4, 3, padding=1), x)
    v = interop.from_torch_spectral_norm({f"d.{k}": t for k, t in tsn.state_dict().items()}, "d.")
    layer = bnjax.linen.SpectralNorm(nn.Conv(4, (3, 3), padding=[(1, 1)] * 2))
    _close(layer.apply(v, _last(x), update_stats=False), _last(_torch_run(tsn, x, False)))


def test_spectral_norm_functional_form_is_exact_before_convergence():
    """A spectrum with σ₂/σ₁ = 0.97: PyTorch's 15 steps at registration leave u and v unconverged.
    The linen layer's extra step then moves σ (close, not exact), while
    ``bnjax.spectral_norm(..., training=False)`` divides by PyTorch's σ = uᵀWv exactly."""
    rng = np.random.default_rng(21)
    left, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    right, _ = np.linalg.qr(rng.standard_normal((10, 6)))
    tlin = torch.nn.Linear(10, 6)
    with torch.no_grad():
        tlin.weight.copy_(_t(((left * np.array([1.0, 0.97, 0.6, 0.4, 0.3, 0.2])) @ right.T).astype(np.float32)))
    torch.manual_seed(8)
    tsn = P.spectral_norm(tlin)
    v = interop.from_torch_spectral_norm(tsn.state_dict())
    kernel, u = v["params"]["layer_instance"]["kernel"], v["batch_stats"]["layer_instance/kernel/u"]
    w_sn, _ = bnjax.spectral_norm(kernel, u[0], training=False)
    tsn.eval()
    with torch.no_grad():
        _close(w_sn, tsn.weight.numpy().T, rtol=1e-6)
    x = _rand((4, 10), 18)
    expected = _torch_run(tsn, x, False)
    layer_y = np.asarray(bnjax.linen.SpectralNorm(nn.Dense(6)).apply(v, x, update_stats=False))
    gap = np.max(np.abs(layer_y - expected)) / np.max(np.abs(expected))
    assert 1e-5 < gap < 1e-2, gap  # one power-iteration step further than PyTorch


def test_spectral_norm_deprecated_keys():
    torch.manual_seed(9)
    tsn = _converged_spectral_norm(torch.nn.Linear(5, 4), _rand((2, 5), 19))
    pw = tsn.parametrizations.weight
    old = {"weight_orig": pw.original, "weight_u": pw[0]._u, "weight_v": pw[0]._v, "bias": tsn.bias}
    v, v_new = interop.from_torch_spectral_norm(old), interop.from_torch_spectral_norm(tsn.state_dict())
    jax.tree.map(np.testing.assert_array_equal, v, v_new)


# ---------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_file_is_read_without_unpickling(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    _torch_run(model, _rand((2, 3, 6, 6), 20, 1.0, 2.0), train=True)
    path = tmp_path / "model.safetensors"
    st.save_file(model.state_dict(), str(path))
    loaded = interop.load_safetensors(path)
    assert sorted(loaded) == sorted(model.state_dict())
    for convert, prefix in ((interop.from_torch_batch_norm, "1"), (interop.from_torch_conv, "0")):
        from_file, from_dict = convert(path, prefix), convert(model.state_dict(), prefix)
        jax.tree.map(np.testing.assert_array_equal, from_file, from_dict)


def test_load_safetensors_says_how_to_install_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        interop.load_safetensors("model.safetensors")


# ---------------------------------------------------------------------------------------------
# Errors


def _bn_state(prefix="layer1.0.bn1.", c=3):
    bn = torch.nn.BatchNorm2d(c)
    return {prefix + k: t for k, t in bn.state_dict().items()}


def test_missing_key_names_it_and_the_keys_under_the_prefix():
    sd = _bn_state()
    del sd["layer1.0.bn1.running_var"]
    with pytest.raises(KeyError, match=r"no 'layer1\.0\.bn1\.running_var'.*prefix 'layer1\.0\.bn1\.'.*running_mean"):
        interop.from_torch_batch_norm(sd, "layer1.0.bn1")
    sd = _bn_state()
    del sd["layer1.0.bn1.bias"]
    with pytest.raises(KeyError, match=r"no 'layer1\.0\.bn1\.bias'.*affine=True has both"):
        interop.from_torch_batch_norm(sd, "layer1.0.bn1")
    with pytest.raises(KeyError, match=r"num_batches_tracked"):
        interop.from_torch_batch_norm({"running_mean": np.zeros(2), "running_var": np.ones(2)})
    interop.from_torch_batch_norm({"running_mean": np.zeros(2), "running_var": np.ones(2)}, track_updates=False)


def test_wrong_prefix_names_the_prefixes_that_hold_the_key():
    sd = {**_bn_state("layer1.0.bn1."), **_bn_state("layer1.0.bn2.")}
    with pytest.raises(KeyError, match=r"No key starts with 'layer1\.bn1\.'.*prefixes that hold 'running_mean'"):
        interop.from_torch_batch_norm(sd, "layer1.bn1")
    with pytest.raises(KeyError, match=r"layer1\.0\.bn1\..*layer1\.0\.bn2\."):
        interop.from_torch_batch_norm(sd, "layer1.bn1")
    with pytest.raises(KeyError, match=r"prefixes that hold 'weight': \['conv1\.', 'fc\.'\]"):
        interop.from_torch_conv({"conv1.weight": np.zeros((2, 2, 3, 3)), "fc.weight": np.zeros((2, 2))}, "conv")
    with pytest.raises(KeyError, match=r"Closest keys: \['block\.fc\.weight_v'"):
        interop.from_torch_weight_norm({"block.fc.weight_v": np.zeros((2, 2))}, "block.fc1")
    with pytest.raises(KeyError, match=r"parametrizations\.weight\.original1.*Keys with the prefix 'fc\.'"):
        interop.from_torch_weight_norm({"fc.weight": np.zeros((2, 3))}, "fc")


def test_shape_mismatch_names_both_shapes_and_the_key():
    sd = _bn_state("")
    sd["running_var"] = torch.ones(4)
    with pytest.raises(ValueError, match=r"'running_var' has shape \(4,\).*shape \(3,\)"):
        interop.from_torch_batch_norm(sd)
    with pytest.raises(ValueError, match=r"'fc\.bias' has shape \(3,\).*shape \(2,\)"):
        interop.from_torch_linear({"fc.weight": np.zeros((2, 5)), "fc.bias": np.zeros(3)}, "fc")
    with pytest.raises(ValueError, match=r"'weight' has shape \(2, 5\).*from_torch_linear"):
        interop.from_torch_conv({"weight": np.zeros((2, 5))})
    with pytest.raises(ValueError, match=r"'weight' has shape \(2, 5, 3\).*from_torch_conv"):
        interop.from_torch_linear({"weight": np.zeros((2, 5, 3))})
    wn = {"parametrizations.weight.original0": np.ones((1, 5)), "parametrizations.weight.original1": np.ones((2, 5))}
    with pytest.raises(ValueError, match=r"original0' has shape \(1, 5\).*shape \(2, 1\)"):
        interop.from_torch_weight_norm(wn)
    sn = {"weight_orig": np.ones((3, 4)), "weight_u": np.ones(4), "weight_v": np.ones(4)}
    with pytest.raises(ValueError, match=r"'weight_u' has shape \(4,\).*shape \(3,\)"):
        interop.from_torch_spectral_norm(sn)


def test_num_batches_tracked_beyond_int32_is_an_error():
    sd = _bn_state("")
    sd["num_batches_tracked"] = torch.tensor(2**31, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"'num_batches_tracked' = 2147483648 does not fit bnjax's int32 count"):
        interop.from_torch_batch_norm(sd)
    sd["num_batches_tracked"] = torch.tensor(2**31 - 1, dtype=torch.int64)
    assert int(interop.from_torch_batch_norm(sd)["batch_stats"]["count"]) == 2**31 - 1
    assert "count" not in interop.from_torch_batch_norm({**sd, "num_batches_tracked": 2**40}, track_updates=False)


def test_update_nnx_refuses_mismatched_variables_and_changes_nothing():
    v = interop.from_torch_batch_norm(_bn_state(""), track_updates=False)
    layer = bnjax.nnx.BatchNorm(3, track_updates=True, rngs=nnx.Rngs(0))
    with pytest.raises(KeyError, match=r"without a value: \['count', 'skipped'\].*track_updates|options"):
        interop.update_nnx(layer, v)
    v = interop.from_torch_batch_norm(_bn_state("", c=4))
    before = np.asarray(layer.mean[...]).copy()
    with pytest.raises(ValueError, match=r"'scale' has shape \(4,\).*shape \(3,\)"):
        interop.update_nnx(layer, v)
    np.testing.assert_array_equal(layer.mean[...], before)
    with pytest.raises(TypeError, match="state must be a mapping"):
        interop.from_torch_layer_norm([np.ones(3)])
