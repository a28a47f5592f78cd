"""Sequence-model options of layer and RMS norm: scale_offset (zero-centred gains) and
rms_norm's cast_before_scale, against float64 NumPy and transcriptions of the PyTorch reference
formulas of Llama's and Gemma's RMS norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests import reference as ref
from tests.helpers import close, data

METHODS = {
    "layer_norm": (bnjax.layer_norm, lambda x, g: ref.layer_norm(x, g, None)),
    "rms_norm": (bnjax.rms_norm, lambda x, g: ref.rms_norm(x, g, eps=1e-6)),
    "group_norm": (
        lambda x, p, **k: bnjax.group_norm(x, p, num_groups=2, **k),
        lambda x, g: ref.group_norm(x, g, None, 2),
    ),
    "instance_norm": (bnjax.instance_norm, lambda x, g: ref.instance_norm(x, g, None)),
}


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("fused", [True, False])
def test_scale_offset_is_the_gain_offset_plus_scale(name, fused):
    method, reference = METHODS[name]
    x, _ = data((3, 4, 8), seed=1)
    g = jax.random.normal(jax.random.key(0), (8,)) * 0.1
    p = bnjax.NormParams(g, None)
    y = method(x, p, scale_offset=1.0, fused_backward=fused)
    close(y, reference(x, 1.0 + ref.f64(g)))
    # the gradient with respect to g is that of the gain 1 + g
    dy = jax.random.normal(jax.random.key(1), x.shape)
    got = jax.grad(
        lambda g: jnp.sum(method(x, bnjax.NormParams(g, None), scale_offset=1.0, fused_backward=fused) * dy)
    )(g)
    want = jax.grad(lambda g: jnp.sum(method(x, bnjax.NormParams(1.0 + g, None), fused_backward=fused) * dy))(g)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # traced offset: an operand like eps
    y_traced = jax.jit(lambda c: method(x, p, scale_offset=c, fused_backward=fused))(1.0)
    np.testing.assert_allclose(y_traced, y, rtol=1e-6, atol=1e-6)


def test_scale_offset_keeps_a_small_bfloat16_scale():
    # 1 + 1e-3 is 1 in bfloat16 (its spacing at 1 is 2^-7): formed in float32 the gain keeps it
    x, _ = data((2, 64), seed=2)
    g = jnp.full((64,), 1e-3, jnp.bfloat16)
    y = bnjax.rms_norm(x, bnjax.NormParams(g, None), scale_offset=1.0)
    lost = bnjax.rms_norm(x, bnjax.NormParams(jnp.ones((64,), jnp.bfloat16) + g, None))
    close(y, ref.rms_norm(x, 1.0 + ref.f64(g), eps=1e-6))
    assert float(jnp.max(jnp.abs(y - lost))) > 1e-3


def test_scale_offset_and_cast_before_scale_errors():
    x, _ = data((2, 8), seed=3)
    with pytest.raises(TypeError, match="scale_offset must be a real number"):
        bnjax.rms_norm(x, bnjax.init_params(8), scale_offset="1")
    with pytest.raises(ValueError, match=r"scale_offset=1\.0 offsets params\.scale, which is None"):
        bnjax.layer_norm(x, None, scale_offset=1.0)
    with pytest.raises(ValueError, match="scale_offset must be a scalar"):
        bnjax.layer_norm(x, bnjax.init_params(8), scale_offset=jnp.ones(8))
    with pytest.raises(TypeError, match="cast_before_scale must be a Python bool"):
        bnjax.rms_norm(x, bnjax.init_params(8), cast_before_scale=1)
    # scale_offset=0 is the plain method, bit for bit
    p = bnjax.init_params(8)
    np.testing.assert_array_equal(bnjax.layer_norm(x, p, scale_offset=0.0), bnjax.layer_norm(x, p))


def test_cast_before_scale_against_float64_with_mask_and_gradients():
    x, x64 = data((4, 6, 16), dtype=jnp.bfloat16, seed=4)
    mask = jnp.arange(6)[None, :, None] < jnp.array([6, 2, 0, 5])[:, None, None]
    poisoned = jnp.where(mask, x, jnp.asarray(jnp.nan, x.dtype))
    g = (1.0 + 0.1 * jax.random.normal(jax.random.key(5), (16,))).astype(jnp.bfloat16)
    p = bnjax.NormParams(g, None)
    y = bnjax.rms_norm(poisoned, p, mask=mask, cast_before_scale=True)
    xhat = ref.rms_norm(x64, None, eps=1e-6).astype(np.float32)
    expected = np.asarray((jnp.asarray(xhat).astype(jnp.bfloat16) * g[None, None]).astype(jnp.float32), np.float64)
    m = np.broadcast_to(np.asarray(mask), x.shape)
    np.testing.assert_allclose(np.asarray(y, np.float64)[m], expected[m], rtol=2**-7, atol=0)
    for fused in (True, False):

        def loss(x, g, fused=fused):
            y = bnjax.rms_norm(x, bnjax.NormParams(g, None), mask=mask, cast_before_scale=True, fused_backward=fused)
            return jnp.sum(jnp.where(mask, y, 0).astype(jnp.float32) ** 2)

        gx, gg = jax.grad(loss, argnums=(0, 1))(poisoned, g)
        assert bool(jnp.all(jnp.isfinite(gg))) and bool(jnp.all(jnp.isfinite(jnp.where(mask, gx, 0))))
        clean = jax.grad(loss, argnums=(0, 1))(jnp.where(mask, x, 0), g)
        np.testing.assert_array_equal(gg, clean[1])  # padding values reach no gradient


# --- the PyTorch reference formulas, transcribed -----------------------------------------------


def _llama_rms_norm(torch, hidden, weight, eps):
    # Llama (Hugging Face LlamaRMSNorm.forward): normalize in float32, cast back, then scale
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(dtype)


def _gemma_rms_norm(torch, x, weight, eps):
    # Gemma (Hugging Face GemmaRMSNorm.forward): zero-centred weight, scaled in float32, cast last
    out = x.float()
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + weight.float())
    return out.type_as(x)


def test_rms_norm_orders_reproduce_llama_and_gemma_in_bfloat16():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    n, c = 256, 512
    xt = torch.tensor(rng.standard_normal((n, c)).astype(np.float32) * 3).to(torch.bfloat16)
    w_llama = torch.tensor((1 + 0.1 * rng.standard_normal(c)).astype(np.float32)).to(torch.bfloat16)
    w_gemma = torch.tensor((0.1 * rng.standard_normal(c)).astype(np.float32)).to(torch.bfloat16)

    def jx(t):
        return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)

    def bits_differ(a, b):
        return int((np.asarray(a.astype(jnp.float32)) != b.float().numpy()).sum())

    rms = jax.jit(bnjax.rms_norm, static_argnames=("cast_before_scale",))
    llama = _llama_rms_norm(torch, xt, w_llama, 1e-6)
    gemma = _gemma_rms_norm(torch, xt, w_gemma, 1e-6)
    llama_ours = rms(jx(xt), bnjax.NormParams(jx(w_llama), None), eps=1e-6, cast_before_scale=True)
    gemma_ours = rms(jx(xt), bnjax.NormParams(jx(w_gemma), None), eps=1e-6, scale_offset=1.0)
    # Llama's order: bit-exact. Gemma's: the float32 statistics differ from PyTorch's by a few
    # units in the last place (the order of the sum in mean(x²), and rsqrt), which moves a
    # handful of elements that sit on a bfloat16 rounding boundary by one bfloat16 unit.
    assert bits_differ(llama_ours, llama) == 0
    assert bits_differ(gemma_ours, gemma) <= n * c * 1e-4
    ulp = np.abs(np.asarray(gemma_ours.astype(jnp.float32)) - gemma.float().numpy()) / np.maximum(
        np.abs(gemma.float().numpy()), 1e-30
    )
    assert ulp.max() <= 2**-7
    # the other order is not a rounding away: a quarter of the elements differ
    wrong_llama = rms(jx(xt), bnjax.NormParams(jx(w_llama), None), eps=1e-6)
    wrong_gemma = rms(jx(xt), bnjax.NormParams(jx(w_gemma), None), eps=1e-6, scale_offset=1.0, cast_before_scale=True)
    assert bits_differ(wrong_llama, llama) > n * c // 10
    assert bits_differ(wrong_gemma, gemma) > n * c // 10


# --- DyT -------------------------------------------------------------------------------------


def _np_dyt(x, alpha, g, b):
    return np.tanh(float(alpha) * ref.f64(x)) * ref.f64(g) + ref.f64(b)


def test_dyt_against_float64_values_and_gradients():
    x, x64 = data((3, 5, 8), seed=7, loc=0.0, scale=2.0)
    alpha = jnp.asarray(0.7)
    p = bnjax.NormParams(
        1.0 + 0.1 * jax.random.normal(jax.random.key(0), (8,)), jax.random.normal(jax.random.key(1), (8,))
    )
    close(bnjax.dyt(x, alpha, p), _np_dyt(x64, alpha, p.scale, p.bias))
    dy = np.asarray(jax.random.normal(jax.random.key(2), x.shape), np.float64)
    ga, gg, gb, gx = jax.grad(
        lambda a, g, b, x: jnp.sum(bnjax.dyt(x, a, bnjax.NormParams(g, b)) * dy), argnums=(0, 1, 2, 3)
    )(alpha, p.scale, p.bias, x)
    t = np.tanh(0.7 * x64)
    g64 = ref.f64(p.scale)
    np.testing.assert_allclose(ga, np.sum(dy * g64 * x64 * (1 - t * t)), rtol=1e-4)
    np.testing.assert_allclose(gg, np.sum(dy * t, axis=(0, 1)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gb, np.sum(dy, axis=(0, 1)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, dy * g64 * 0.7 * (1 - t * t), rtol=1e-4, atol=1e-6)
    # bfloat16 in, bfloat16 out, computed in float32; per-example params broadcast
    xb = x.astype(jnp.bfloat16)
    yb = bnjax.dyt(xb, alpha, p)
    assert yb.dtype == jnp.bfloat16
    close(yb, _np_dyt(xb.astype(jnp.float32), alpha, p.scale, p.bias), jnp.bfloat16)
    per = bnjax.NormParams(jnp.ones((3, 1, 8)) * 2.0, None)
    close(bnjax.dyt(x, alpha, per), 2.0 * np.tanh(0.7 * x64))


def test_dyt_against_the_papers_pytorch_module():
    torch = pytest.importorskip("torch")
    x, _ = data((4, 6), seed=8)
    g, b = np.linspace(0.5, 1.5, 6).astype(np.float32), np.linspace(-1, 1, 6).astype(np.float32)
    # the paper's DynamicTanh (channels last): x = tanh(alpha * x); x * weight + bias
    xt = torch.tanh(torch.tensor(0.5) * torch.tensor(np.asarray(x)))
    expected = (xt * torch.tensor(g) + torch.tensor(b)).numpy()
    np.testing.assert_allclose(bnjax.dyt(x, jnp.asarray(0.5), bnjax.NormParams(g, b)), expected, rtol=1e-6, atol=1e-6)


def test_dyt_errors():
    x, _ = data((2, 4), seed=9)
    with pytest.raises(ValueError, match="alpha must be a scalar"):
        bnjax.dyt(x, jnp.ones(4), None)
    with pytest.raises(TypeError, match="alpha must be a floating-point array"):
        bnjax.dyt(x, jnp.asarray(1), None)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        bnjax.dyt(jnp.ones((2, 4), jnp.int32), jnp.asarray(0.5), None)
    with pytest.raises(ValueError, match=r"params.scale has shape \(3,\)"):
        bnjax.dyt(x, jnp.asarray(0.5), bnjax.init_params(3))


# --- the Flax shells -------------------------------------------------------------------------


def test_flax_shells_take_scale_offset_cast_before_scale_and_dyt():
    import flax.linen as nn
    from flax import nnx

    import bnjax.linen
    import bnjax.nnx

    x, x64 = data((3, 8), dtype=jnp.bfloat16, seed=10)
    zeros = nn.initializers.zeros
    lin = bnjax.linen.RMSNorm(scale_offset=1.0, scale_init=zeros, cast_before_scale=True, param_dtype=jnp.bfloat16)
    v = lin.init(jax.random.key(0), x)
    g = v["params"]["scale"]
    assert g.dtype == jnp.bfloat16 and float(jnp.abs(g).max()) == 0.0  # zero-centred: the gain starts at 1
    want = bnjax.rms_norm(x, bnjax.NormParams(g, None), scale_offset=1.0, cast_before_scale=True)
    np.testing.assert_array_equal(lin.apply(v, x), want)
    mod = bnjax.nnx.RMSNorm(
        8, scale_offset=1.0, scale_init=zeros, cast_before_scale=True, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
    )
    np.testing.assert_array_equal(mod(x), want)

    ln = bnjax.linen.LayerNorm(scale_offset=1.0, scale_init=zeros)
    v = ln.init(jax.random.key(0), x)
    close(ln.apply(v, x), ref.layer_norm(x64, np.ones(8), np.zeros(8), eps=1e-6), jnp.bfloat16)
    mod = bnjax.nnx.LayerNorm(8, scale_offset=1.0, scale_init=zeros, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(mod(x), ln.apply(v, x))

    dl = bnjax.linen.DyT()
    v = dl.init(jax.random.key(0), x)
    assert float(v["params"]["alpha"]) == 0.5 and v["params"]["scale"].shape == (8,)
    dn = bnjax.nnx.DyT(8, rngs=nnx.Rngs(0))
    y = dl.apply(v, x)
    assert y.dtype == jnp.float32  # Flax's dtype rule: bf16 x with float32 params
    np.testing.assert_array_equal(y, dn(x))
    close(y, _np_dyt(x64, 0.5, np.ones(8), np.zeros(8)))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(dn)
    assert float(jnp.abs(grads.alpha[...])) > 0


# --- residual add + norm ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["add_layer_norm", "add_rms_norm"])
def test_add_norm_values_dtypes_and_gradients(name):
    fn = getattr(bnjax, name)
    plain = bnjax.layer_norm if name == "add_layer_norm" else bnjax.rms_norm
    reference = (
        (lambda h: ref.layer_norm(h, None, None)) if name == "add_layer_norm" else (lambda h: ref.rms_norm(h, None))
    )
    x, _ = data((3, 5, 16), dtype=jnp.bfloat16, seed=11)
    r, r64 = data((3, 5, 16), seed=12)  # a float32 residual stream with a bfloat16 block output
    p = bnjax.init_params(16, use_bias=name == "add_layer_norm")
    y, h = fn(x, r, p)
    assert h.dtype == jnp.float32 and y.dtype == jnp.bfloat16
    h64 = r64 + np.asarray(x.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(h, h64, rtol=1e-7)
    close(y, reference(h64), jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(0), x.shape).astype(jnp.bfloat16)
    dh = jax.random.normal(jax.random.key(1), x.shape)

    def loss(x, r, p, fused):
        y, h = fn(x, r, p, fused_backward=fused)
        return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(h * dh)

    def composed(x, r, p):  # the pair written out by hand, differentiated by autodiff
        h = r + x.astype(jnp.float32)
        return jnp.sum(plain(h, p, fused_backward=False).astype(jnp.bfloat16).astype(jnp.float32) * dy) + jnp.sum(
            h * dh
        )

    want = jax.grad(composed, argnums=(0, 1, 2))(x, r, p)
    for fused in (True, False):
        got = jax.grad(loss, argnums=(0, 1, 2))(x, r, p, fused)
        assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)
    # keywords pass through: a mask, NaN in the padding of both inputs
    mask = jnp.arange(5)[None, :, None] < 3
    y_m, _ = fn(jnp.where(mask, x, jnp.nan), jnp.where(mask, r, jnp.nan), p, mask=mask)
    m = np.broadcast_to(np.asarray(mask), x.shape)
    np.testing.assert_array_equal(
        np.asarray(y_m.astype(jnp.float32))[m], np.asarray(fn(x, r, p, mask=mask)[0].astype(jnp.float32))[m]
    )


def test_add_norm_errors():
    x, _ = data((2, 8), seed=13)
    with pytest.raises(ValueError, match=r"residual has shape \(1, 8\) but x has shape \(2, 8\)"):
        bnjax.add_layer_norm(x, jnp.ones((1, 8)), None)
    with pytest.raises(TypeError, match="residual must be a floating-point array"):
        bnjax.add_rms_norm(x, jnp.ones((2, 8), jnp.int32), None)
    with pytest.raises(TypeError, match="unexpected keyword"):
        bnjax.add_layer_norm(x, x, None, cast_before_scale=True)  # a keyword of rms_norm only


# --- QK-norm recipe ----------------------------------------------------------------------------


def test_qk_norm_recipe_in_an_attention_block():
    # q, k: (batch, tokens, heads, head_dim); RMS norm over head_dim only, one g of shape
    # (head_dim,) shared by the heads (as in OLMo 2 / Qwen3 / Gemma 3's QK-norm)
    b, t, h, d = 2, 6, 4, 8
    key = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(key[0], (b, t, h * d)) * 3.0
    wq, wk = (jax.random.normal(k, (h * d, h * d)) / np.sqrt(h * d) for k in key[1:3])
    gq, gk = (1.0 + 0.1 * jax.random.normal(k, (d,)) for k in key[3:5])

    def logits(x, per_head=True):
        q = (x @ wq).reshape(b, t, h, d)
        k = (x @ wk).reshape(b, t, h, d)
        axis = -1 if per_head else (-2, -1)
        fa = -1  # g over head_dim in both variants
        q = bnjax.rms_norm(q, bnjax.NormParams(gq, None), axis=axis, feature_axis=fa)
        k = bnjax.rms_norm(k, bnjax.NormParams(gk, None), axis=axis, feature_axis=fa)
        return jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)

    q64 = (ref.f64(x) @ ref.f64(wq)).reshape(b, t, h, d)
    k64 = (ref.f64(x) @ ref.f64(wk)).reshape(b, t, h, d)

    def np_rms(v, g):  # per head: the mean of squares over head_dim alone
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + 1e-6) * ref.f64(g)

    expected = np.einsum("bqhd,bkhd->bhqk", np_rms(q64, gq), np_rms(k64, gk)) / np.sqrt(d)
    np.testing.assert_allclose(logits(x), expected, rtol=1e-4, atol=1e-4)
    # the logits of each head are bounded by |g_q|·|g_k|·sqrt(d) whatever the scale of x
    big = logits(x * 1e3)
    np.testing.assert_allclose(big, logits(x), rtol=1e-3, atol=1e-3)
    # normalizing over all heads flattened is a different layer: not the recipe
    assert float(jnp.max(jnp.abs(logits(x, per_head=False) - logits(x)))) > 1e-2
