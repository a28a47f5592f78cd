"""fold_batch_norm: an evaluation-mode batch norm folded into the dense/conv layer before it,
against PyTorch's torch.nn.utils.fusion (its layout, axis=0, grouped and depthwise kernels), and
in Flax's layout (axis=-1) against the unfolded layer pair and float64."""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx

torch = pytest.importorskip("torch")


def _trained_bn(bn, seed):
    """A torch BatchNorm with non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g) * 3)
        bn.running_var.copy_(torch.rand(c, generator=g) * 4 + 0.1)
    return bn.eval()


def _np(t):
    return t.detach().numpy()


@pytest.mark.parametrize("groups", [1, 2, 8])  # 8 = in channels: depthwise (out = 16, multiplier 2)
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_folding_matches_torch_fuse_conv_bn_eval(groups, with_bias):
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    torch.manual_seed(groups)
    conv = torch.nn.Conv2d(8, 16, 3, groups=groups, bias=with_bias).eval()
    bn = _trained_bn(torch.nn.BatchNorm2d(16, eps=1e-3), groups)
    fused = fuse_conv_bn_eval(conv, bn)
    params = bnjax.NormParams(jnp.asarray(_np(bn.weight)), jnp.asarray(_np(bn.bias)))
    stats = bnjax.BatchStats(jnp.asarray(_np(bn.running_mean)), jnp.asarray(_np(bn.running_var)), jnp.int32(1))
    bias = jnp.asarray(_np(conv.bias)) if with_bias else None
    w, b = bnjax.fold_batch_norm(jnp.asarray(_np(conv.weight)), bias, params, stats, eps=1e-3, axis=0)
    np.testing.assert_allclose(w, _np(fused.weight), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, _np(fused.bias), rtol=1e-5, atol=1e-6)
    # and the folded conv computes what conv -> bn computes
    x = torch.randn(2, 8, 7, 7)
    want = _np(bn(conv(x)))
    got = torch.nn.functional.conv2d(x, torch.tensor(np.asarray(w)), torch.tensor(np.asarray(b)), groups=groups)
    np.testing.assert_allclose(_np(got), want, rtol=1e-4, atol=1e-5)


def test_linear_folding_matches_torch_fuse_linear_bn_eval():
    from torch.nn.utils.fusion import fuse_linear_bn_eval

    lin = torch.nn.Linear(5, 4).eval()
    bn = _trained_bn(torch.nn.BatchNorm1d(4), 3)
    fused = fuse_linear_bn_eval(lin, bn)
    params = {"scale": _np(bn.weight), "bias": _np(bn.bias)}  # Flax-style mappings work too
    stats = {"mean": _np(bn.running_mean), "var": _np(bn.running_var)}
    w, b = bnjax.fold_batch_norm(_np(lin.weight), _np(lin.bias), params, stats, eps=bn.eps, axis=0)
    np.testing.assert_allclose(w, _np(fused.weight), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, _np(fused.bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_bias", [True, False])
def test_flax_layout_folded_conv_equals_conv_then_batch_norm(use_bias):
    conv = nn.Conv(6, (3, 3), feature_group_count=2, use_bias=use_bias)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4)) * 2 + 1
    vc = conv.init(jax.random.key(1), x)
    bn = bnjax.linen.BatchNorm(use_running_average=True, epsilon=1e-4)
    z = conv.apply(vc, x)
    vb = bn.init(jax.random.key(2), z)
    key = jax.random.split(jax.random.key(3), 4)
    vb = {
        "params": {"scale": jax.random.uniform(key[0], (6,)) + 0.5, "bias": jax.random.normal(key[1], (6,))},
        "batch_stats": {"mean": jax.random.normal(key[2], (6,)), "var": jax.random.uniform(key[3], (6,)) + 0.2},
    }
    want = bn.apply(vb, z)
    w, b = bnjax.fold_batch_norm(
        vc["params"]["kernel"], vc["params"].get("bias"), vb["params"], vb["batch_stats"], eps=1e-4
    )
    folded = nn.Conv(6, (3, 3), feature_group_count=2, use_bias=True)
    got = folded.apply({"params": {"kernel": w, "bias": b}}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # float64 reference of the folded parameters
    p, s = vb["params"], vb["batch_stats"]
    s64 = np.asarray(p["scale"], np.float64) / np.sqrt(np.asarray(s["var"], np.float64) + 1e-4)
    c = np.asarray(vc["params"]["bias"], np.float64) if use_bias else 0.0
    np.testing.assert_allclose(w, np.asarray(vc["params"]["kernel"], np.float64) * s64, rtol=2e-7)
    want_b = s64 * (c - np.asarray(s["mean"], np.float64)) + np.asarray(p["bias"], np.float64)
    np.testing.assert_allclose(b, want_b, rtol=1e-6, atol=1e-7)


def test_no_affine_and_bf16_kernel():
    stats = bnjax.BatchStats(jnp.array([1.0, -1.0]), jnp.array([0.25, 4.0]), jnp.int32(3))
    w = jnp.array([[1.0, 2.0], [3.0, 4.0]], jnp.bfloat16)
    w2, b2 = bnjax.fold_batch_norm(w, None, None, stats, eps=1e-5)
    assert w2.dtype == jnp.bfloat16 and b2.dtype == jnp.float32
    s = 1 / np.sqrt(np.array([0.25, 4.0]) + 1e-5)
    np.testing.assert_allclose(np.asarray(w2, np.float64), np.asarray(w, np.float64) * s[None], rtol=1e-2)
    np.testing.assert_allclose(b2, -np.array([1.0, -1.0]) * s, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (
            {"stats": {"mean": np.zeros(4), "var": np.ones(4)}},
            ValueError,
            r"stats.mean has shape \(4,\) but the kernel \(2, 3\) has 3 output features on axis=-1",
        ),
        ({"axis": 0}, ValueError, r"has 2 output features on axis=0 \(Flax: -1, PyTorch: 0\)"),
        ({"stats": {"mean": np.zeros(3)}}, KeyError, r"stats has no 'var'"),
        ({"params": {"scale": np.ones(3)}}, KeyError, r"params has no 'bias'"),
        ({"eps": 0.0}, ValueError, "eps must be a finite number > 0"),
        ({"stats": {"mean": np.zeros(3), "var": np.array([1.0, np.nan, 1.0])}}, ValueError, "non-finite var"),
        ({"stats": {"mean": np.array([np.inf, 0, 0]), "var": np.ones(3)}}, ValueError, "non-finite mean"),
        ({"kernel": np.ones((2, 3), np.int32)}, TypeError, "kernel"),
        ({"axis": 2}, ValueError, "axis"),
        ({"bias": np.zeros(2)}, ValueError, r"bias has shape \(2,\)"),
    ],
)
def test_fold_batch_norm_bad_input(kwargs, err, match):
    args = {
        "kernel": np.ones((2, 3), np.float32),
        "bias": None,
        "params": None,
        "stats": {"mean": np.zeros(3), "var": np.ones(3)},
        "eps": 1e-5,
        "axis": -1,
    }
    args.update(kwargs)
    with pytest.raises(err, match=match):
        bnjax.fold_batch_norm(args.pop("kernel"), args.pop("bias"), args.pop("params"), args.pop("stats"), **args)


# ---------------------------------------------------------------------------------------------
# The whole-model pass: bnjax.linen.fold_batch_norms


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        ra = not train
        h = nn.Conv(8, (3, 3), use_bias=False, name="conv1")(x)
        h = bnjax.linen.BatchNorm(use_running_average=ra, activation=jax.nn.relu, name="bn1")(h)
        h = nn.Conv(8, (3, 3), feature_group_count=8, name="dw")(h)  # depthwise, with a bias
        h = nn.BatchNorm(use_running_average=ra, name="bn_flax")(h)  # Flax's own BatchNorm
        z = nn.Conv(8, (1, 1), name="conv3")(h)
        h = bnjax.linen.BatchNorm(use_running_average=ra, name="bn_res")(z) + z  # z read twice: kept
        h = bnjax.linen.BatchNorm(use_running_average=ra, name="bn_after_relu")(jax.nn.relu(h))  # kept
        h = h.mean(axis=(1, 2))
        h = nn.Dense(5, name="dense")(h)
        return bnjax.linen.BatchRenorm(use_running_average=ra, name="bn_dense")(h)


def _trained_variables(net, x):
    v = net.init(jax.random.key(0), x)
    # non-trivial statistics and affine parameters everywhere
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(v))
    for i, (k, a) in enumerate(sorted(flat.items())):
        if k[0] == "batch_stats" or k[-1] in ("scale", "bias"):
            r = jax.random.uniform(jax.random.key(i), a.shape)
            flat[k] = r + 0.5 if k[-1] in ("var", "scale") else r * 2 - 1
    return flax.traverse_util.unflatten_dict(flat)


def test_fold_batch_norms_linen_folds_the_adjacent_pairs_and_keeps_the_logits():
    net = _Net()
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    v = _trained_variables(net, x)
    folded = bnjax.linen.fold_batch_norms(net, v, x)
    assert folded.pairs == {"bn1": "conv1", "bn_flax": "dw", "bn_dense": "dense"}
    assert "also read elsewhere" in folded.kept["bn_res"]
    assert "not the output of a Dense or Conv" in folded.kept["bn_after_relu"]
    for name in folded.pairs:
        assert name not in folded.variables["params"] and name not in folded.variables["batch_stats"]
    assert "bias" in folded.variables["params"]["conv1"]  # a layer without bias gets one
    want = net.apply(v, x)
    got = jax.jit(folded.apply)(folded.variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # in float64 by hand for the first pair: conv1 -> bn1 -> relu
    conv1 = nn.Conv(8, (3, 3), use_bias=True)
    h = conv1.apply({"params": folded.variables["params"]["conv1"]}, x)
    z = nn.Conv(8, (3, 3), use_bias=False).apply({"params": {"kernel": v["params"]["conv1"]["kernel"]}}, x)
    p, s = v["params"]["bn1"], v["batch_stats"]["bn1"]
    ref = (np.asarray(z, np.float64) - np.asarray(s["mean"], np.float64)) / np.sqrt(
        np.asarray(s["var"], np.float64) + 1e-5
    ) * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)
    np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-5)


def test_fold_batch_norms_in_training_mode_folds_nothing_and_says_why():
    net = _Net()
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    v = _trained_variables(net, x)
    folded = bnjax.linen.fold_batch_norms(net, v, x, train=True, mutable=["batch_stats"])
    assert folded.pairs == {}
    assert all("training mode" in r for k, r in folded.kept.items() if k != "bn_after_relu")
    out, _ = folded.apply(folded.variables, x, train=True, mutable=["batch_stats"])
    want, _ = net.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(out, want)


def test_fold_batch_norms_shared_layer_is_kept():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(3, name="dense")
            bn = bnjax.linen.BatchNorm(use_running_average=True, name="bn")
            return bn(dense(x)) + dense(x)

    x = jnp.ones((2, 3))
    v = Shared().init(jax.random.key(0), x)
    folded = bnjax.linen.fold_batch_norms(Shared(), v, x)
    assert folded.pairs == {} and "more than once" in folded.kept["bn"]


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = bnjax.nnx.BatchNorm(8, activation=jax.nn.relu, rngs=rngs)
        self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
        self.bn_flax = nnx.BatchNorm(8, rngs=rngs)  # Flax's own BatchNorm
        self.conv3 = nnx.Conv(8, 8, (1, 1), rngs=rngs)
        self.bn_res = bnjax.nnx.BatchNorm(8, rngs=rngs)
        self.bn_after_relu = bnjax.nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Sequential(nnx.Linear(8, 5, rngs=rngs), bnjax.nnx.BatchRenorm(5, rngs=rngs))

    def __call__(self, x):
        h = self.bn_flax(self.dw(self.bn1(self.conv1(x))))
        z = self.conv3(h)
        h = self.bn_after_relu(jax.nn.relu(self.bn_res(z) + z))
        return self.head(h.mean(axis=(1, 2)))


def test_fold_batch_norms_nnx_folds_the_adjacent_pairs_and_leaves_the_model_alone():
    model = _NnxNet(nnx.Rngs(0))
    for i, (_, var) in enumerate(sorted(nnx.iter_graph(model), key=lambda pv: str(pv[0]))):
        if isinstance(var, nnx.BatchStat) or (isinstance(var, nnx.Param) and var[...].ndim == 1):
            r = jax.random.uniform(jax.random.key(i), var[...].shape)
            var[...] = (r + 0.5) if var[...].dtype == jnp.float32 and i % 2 else r * 2 - 1
    for _, m in nnx.iter_graph(model):  # variances must stay positive
        if isinstance(m, (bnjax.nnx.BatchNorm, nnx.BatchNorm)):
            m.var[...] = jnp.abs(m.var[...]) + 0.2
    model.eval()
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    want = model(x)
    before = jax.tree.map(jnp.copy, nnx.state(model))
    folded = bnjax.nnx.fold_batch_norms(model, x)
    assert folded.pairs == {"bn1": "conv1", "bn_flax": "dw", "head/layers/1": "head/layers/0"}
    assert "also read elsewhere" in folded.kept["bn_res"]
    assert "not the output of a Dense or Conv" in folded.kept["bn_after_relu"]
    assert isinstance(folded.model.bn1, bnjax.nnx.Folded) and isinstance(folded.model.head.layers[1], bnjax.nnx.Folded)
    assert folded.model.conv1.bias is not None
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(folded.model, x), want, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)  # the model itself is unchanged
    assert isinstance(model.bn1, bnjax.nnx.BatchNorm) and type(model.conv1) is nnx.Conv
    # training mode: nothing folded, the reason given, the model's statistics untouched
    model.train()
    folded = bnjax.nnx.fold_batch_norms(model, x)
    assert folded.pairs == {} and "call model.eval() first" in folded.kept["bn1"]
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
