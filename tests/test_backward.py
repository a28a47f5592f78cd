"""The closed-form backward pass (custom VJP) of every data-side method.

References: autodiff of the same forward pass (``fused_backward=False``), the float64 closed form
of ``tests/reference.py``, and numerical differences (``check_grads``). Also what it keeps for the
backward pass (x itself, nothing else of x's size), second order, forward mode, and sync BN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import bnjax
from tests import reference as ref
from tests.helpers import data, params

# name -> (x shape, feature shape, fn(x, params, fused_backward))
METHODS = {
    "batch_norm_nhwc": (
        (8, 5, 4, 6),
        (6,),
        lambda x, p, fb: bnjax.batch_norm(x, p, bnjax.init_stats(6), training=True, fused_backward=fb)[0],
    ),
    "batch_norm_nchw": (
        (8, 6, 5, 4),
        (6,),
        lambda x, p, fb: bnjax.batch_norm(x, p, bnjax.init_stats(6), training=True, axis=1, fused_backward=fb)[0],
    ),
    # a masked loss (padding outputs read as 0), so that numerical differences see what a mask means
    "batch_norm_2d_masked": (
        (24, 6),
        (6,),
        lambda x, p, fb: jnp.where(
            MASK_2D,
            bnjax.batch_norm(
                x, p, bnjax.init_stats(6), training=True, mask=MASK_2D, fused_backward=fb, activation=jax.nn.gelu
            )[0],
            0,
        ),
    ),
    "layer_norm_masked": (
        (4, 7, 16),
        (16,),
        lambda x, p, fb: jnp.where(MASK_ROWS, bnjax.layer_norm(x, p, mask=MASK_ROWS, fused_backward=fb), 0),
    ),
    "rms_norm_masked": (
        (4, 7, 16),
        (16,),
        lambda x, p, fb: jnp.where(MASK_ROWS, bnjax.rms_norm(x, p, mask=MASK_ROWS, fused_backward=fb), 0),
    ),
    "group_norm_masked": (
        (3, 4, 5, 8),
        (8,),
        lambda x, p, fb: jnp.where(MASK_HW, bnjax.group_norm(x, p, num_groups=4, mask=MASK_HW, fused_backward=fb), 0),
    ),
    "layer_norm": ((4, 7, 16), (16,), lambda x, p, fb: bnjax.layer_norm(x, p, fused_backward=fb)),
    "layer_norm_hwc_per_channel": (
        (4, 5, 6, 8),
        (8,),
        lambda x, p, fb: bnjax.layer_norm(x, p, axis=(1, 2, 3), feature_axis=-1, fused_backward=fb),
    ),
    "group_norm": ((3, 4, 5, 8), (8,), lambda x, p, fb: bnjax.group_norm(x, p, num_groups=4, fused_backward=fb)),
    "group_norm_nchw": (
        (3, 8, 4, 5),
        (8,),
        lambda x, p, fb: bnjax.group_norm(x, p, num_groups=2, axis=1, fused_backward=fb),
    ),
    "instance_norm": ((3, 4, 5, 6), (6,), lambda x, p, fb: bnjax.instance_norm(x, p, fused_backward=fb)),
    "rms_norm": ((4, 7, 16), (16,), lambda x, p, fb: bnjax.rms_norm(x, p, fused_backward=fb)),
    # 4096 rows and more: the statistics' rows variant, whose backward pass recomputes μ and 1/σ
    "layer_norm_rows": ((64, 64, 16), (16,), lambda x, p, fb: bnjax.layer_norm(x, p, fused_backward=fb)),
    "layer_norm_rows_per_channel": (
        (4096, 3, 4),
        (4,),
        lambda x, p, fb: bnjax.layer_norm(x, p, axis=(1, 2), feature_axis=-1, fused_backward=fb),
    ),
    "rms_norm_rows": ((64, 64, 16), (16,), lambda x, p, fb: bnjax.rms_norm(x, p, fused_backward=fb)),
}
MASK_2D = np.random.default_rng(9).random((24, 1)) < 0.6
MASK_2D[0] = True
MASK_ROWS = np.random.default_rng(10).random((4, 7, 16)) < 0.7  # padding inside the rows (T5-style)
MASK_ROWS[:, :, 0] = True
MASK_HW = np.random.default_rng(11).random((3, 4, 5, 1)) < 0.7  # padded spatial positions
MASK_HW[:, 0, 0] = True
ROWS = sorted(METHODS)


def _loss(name, fb):
    shape, _, fn = METHODS[name]
    ct = jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)
    return lambda x, p: jnp.sum(fn(x, p, fb).astype(jnp.float32) * ct)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ROWS)
def test_fused_backward_equals_autodiff(name, dtype):
    shape, feat, _ = METHODS[name]
    x, _ = data(shape, dtype)
    p = params(feat)
    fused = jax.jit(jax.grad(_loss(name, True), argnums=(0, 1)))(x, p)
    auto = jax.jit(jax.grad(_loss(name, False), argnums=(0, 1)))(x, p)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else dict(rtol=3e-2, atol=3e-2)
    for f, a in zip(jax.tree.leaves(fused), jax.tree.leaves(auto), strict=True):
        assert f.dtype == a.dtype
        np.testing.assert_allclose(np.asarray(f, np.float32), np.asarray(a, np.float32), **tol)


@pytest.mark.parametrize("name", ROWS)
def test_fused_backward_numerically_to_second_order(name):
    shape, feat, fn = METHODS[name]
    x, _ = data(shape, loc=0.5, scale=1.0)
    p = params(feat)
    fused = lambda x, g, b: fn(x, bnjax.NormParams(g, b), True)  # noqa: E731
    check_grads(fused, (x, p.scale, p.bias), order=2, modes=["rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", ROWS)
def test_second_order_equals_autodiff(name):
    """Reverse over reverse: the gradient of a gradient norm (as in gradient penalties)."""
    shape, feat, _ = METHODS[name]
    x, _ = data(shape)
    p = params(feat)

    def penalty(fb):
        grad = jax.grad(_loss(name, fb))
        return lambda x, p: jnp.sum(grad(x, p) ** 2)

    fused = jax.grad(penalty(True), argnums=(0, 1))(x, p)
    auto = jax.grad(penalty(False), argnums=(0, 1))(x, p)
    for f, a in zip(jax.tree.leaves(fused), jax.tree.leaves(auto), strict=True):
        np.testing.assert_allclose(f, a, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_backward_against_the_float64_closed_form(masked):
    x, x64 = data((16, 3, 5))
    mask = None
    if masked:
        mask = np.random.default_rng(4).random((16, 1, 1)) < 0.5
        mask[0] = True
    p = params(5)
    dy = np.random.default_rng(5).standard_normal(x.shape)
    if masked:
        dy = np.where(np.broadcast_to(mask, x.shape), dy, 0.0)  # the reference's convention
    loss = lambda x, p: jnp.sum(  # noqa: E731
        bnjax.batch_norm(x, p, bnjax.init_stats(5), training=True, mask=mask)[0] * jnp.asarray(dy, jnp.float32)
    )
    gx, gp = jax.grad(loss, argnums=(0, 1))(x, p)
    dx, dscale, dbias = ref.batch_norm_train_vjp(x64, p.scale, dy, mask=mask)
    np.testing.assert_allclose(gx, dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gp.scale, dscale, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gp.bias, dbias, rtol=1e-4, atol=1e-4)


def test_masked_out_outputs_are_constants_for_differentiation():
    """Masked-out positions are padding: their outputs are computed (from the valid elements'
    statistics) but carry no gradient, to g, b, the statistics or their own x (dx = 0 there),
    even under a loss that reads them. Fused and autodiff agree."""
    x, _ = data((12, 3))
    mask = np.ones((12, 1), bool)
    mask[-4:] = False
    p = params(3)
    ct = jnp.asarray(np.random.default_rng(6).standard_normal((12, 3)), jnp.float32)

    def loss(fb, read_padding):
        def f(x, p):
            y = bnjax.batch_norm(x, p, bnjax.init_stats(3), training=True, mask=mask, fused_backward=fb)[0]
            return jnp.sum((y if read_padding else jnp.where(mask, y, 0)) * ct)

        return f

    grads = {(fb, rp): jax.grad(loss(fb, rp), argnums=(0, 1))(x, p) for fb in (True, False) for rp in (True, False)}
    for got in grads.values():
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(grads[False, False]), strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got[0][-4:], 0.0)
    # the valid part against the float64 closed form (dy zero on the padding)
    dy = np.where(mask, np.asarray(ct, np.float64), 0.0)
    dx, dscale, dbias = ref.batch_norm_train_vjp(np.asarray(x, np.float64), p.scale, dy, mask=mask)
    np.testing.assert_allclose(grads[True, True][0], dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[True, True][1].scale, dscale, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[True, True][1].bias, dbias, rtol=1e-4, atol=1e-4)


POISON = [np.nan, np.inf, -np.inf, 3e38, 0.0]


@pytest.mark.parametrize("fb", [True, False])
@pytest.mark.parametrize("name", ["batch_norm_2d_masked", "layer_norm_masked", "rms_norm_masked", "group_norm_masked"])
def test_padding_values_reach_no_gradient(name, fb):
    """Whatever the masked-out values are (NaN, ±inf, huge), the outputs at valid positions and
    every gradient of a masked loss are bit-identical."""
    shape, feat, fn = METHODS[name]
    mask = {"batch_norm_2d_masked": MASK_2D, "layer_norm_masked": MASK_ROWS, "rms_norm_masked": MASK_ROWS}.get(
        name, MASK_HW
    )
    valid = np.broadcast_to(mask, shape)
    x, _ = data(shape)
    p = params(feat)
    ct = jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)
    loss = lambda x, p: jnp.sum(fn(x, p, fb) * ct)  # noqa: E731
    run = jax.jit(lambda x, p: (fn(x, p, fb), jax.grad(loss, argnums=(0, 1))(x, p)))
    base = jax.tree.leaves(run(x, p))
    assert all(np.isfinite(v).all() for v in base)
    for poison in POISON:
        bad = jnp.where(valid, x, poison)
        for b, e in zip(jax.tree.leaves(run(bad, p)), base, strict=True):
            np.testing.assert_array_equal(b, e, err_msg=f"padding {poison}")


def _big_residuals(fn, *args, size):
    kept = saved_residuals(fn, *args)
    return [(aval.dtype, why) for aval, why in kept if int(np.prod(aval.shape)) >= size and why != "from a constant"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ROWS)
def test_only_x_is_kept_for_the_backward_pass(name, dtype):
    """The fused backward keeps x itself (in its own dtype), and nothing else of x's size, where
    autodiff keeps float32 intermediates of x's size."""
    shape, feat, _ = METHODS[name]
    x, _ = data(shape, dtype)
    p = params(feat)
    size = int(np.prod(shape))
    if name.endswith("_masked") and name != "batch_norm_2d_masked":
        # jax 0.10's saved_residuals trips over these (an internal assertion); count the arrays
        # the pullback closes over instead: x (or its reshape), and the boolean mask
        layer = {
            "layer_norm_masked": lambda x, p, fb: bnjax.layer_norm(x, p, mask=MASK_ROWS, fused_backward=fb),
            "rms_norm_masked": lambda x, p, fb: bnjax.rms_norm(x, p, mask=MASK_ROWS, fused_backward=fb),
            "group_norm_masked": lambda x, p, fb: bnjax.group_norm(x, p, num_groups=4, mask=MASK_HW, fused_backward=fb),
        }[name]

        def big(fb):  # the layer alone: the test's where() around it keeps a zeros array of its own
            pullback = jax.vjp(lambda x, p: layer(x, p, fb), x, p)[1]
            return [v.dtype for v in jax.tree.leaves(pullback) if v.size >= size and v.dtype != bool]

        assert big(True) == [jnp.dtype(dtype)]
        assert sum(d.itemsize for d in big(False)) > jnp.dtype(dtype).itemsize
        return
    kept = _big_residuals(_loss(name, True), x, p, size=size)
    if name == "batch_norm_2d_masked":  # the gelu after the layer keeps its input, as it would anyway
        kept = [k for k in kept if "argument" in k[1]]
    if name.startswith("group_norm"):  # x reshaped to (N, ..., groups, C/G, ...): no copy
        assert len(kept) == 1 and kept[0][0] == dtype and "reshape" in kept[0][1] and "_grouped" in kept[0][1]
    else:
        assert kept == [(jnp.dtype(dtype), "from the argument x")]
    autodiff = _big_residuals(_loss(name, False), x, p, size=size)
    assert sum(d.itemsize for d, _ in autodiff) > jnp.dtype(dtype).itemsize


def test_forward_mode_needs_fused_backward_false():
    x, _ = data((8, 6))
    p = params(6)
    stats = bnjax.init_stats(6)
    f = lambda fb: lambda x: bnjax.batch_norm(x, p, stats, training=True, fused_backward=fb)[0]  # noqa: E731
    with pytest.raises(TypeError, match=r"forward-mode differentiation .* fused_backward=False"):
        jax.jvp(f(True), (x,), (x,))
    for name in ("layer_norm", "rms_norm"):
        method = getattr(bnjax, name)
        with pytest.raises(TypeError, match="Pass fused_backward=False"):
            jax.jacfwd(lambda x, method=method: method(x, p))(x)
        # forward over reverse differentiates the fused backward rule itself: same Hessian
        hessians = [
            jax.hessian(lambda x, method=method, fb=fb: jnp.sum(jnp.sin(method(x, p, fused_backward=fb))))(x)
            for fb in (True, False)
        ]
        np.testing.assert_allclose(hessians[0], hessians[1], atol=1e-5, rtol=1e-5)
    check_grads(f(False), (x,), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
    hessian = jax.hessian(lambda x: jnp.sum(jnp.sin(f(False)(x))))(x)
    assert hessian.shape == (8, 6, 8, 6) and np.isfinite(hessian).all()


@pytest.mark.parametrize("groups", [None, [[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 5], [1, 2, 3, 4, 6, 7]]])
def test_sync_fused_backward_equals_autodiff_under_shard_map(groups):
    mesh = Mesh(np.array(jax.devices()), ("d",))
    x, _ = data((8 * 4, 5))
    mask = np.random.default_rng(8).random((8 * 4, 1)) < 0.7
    mask[:4] = False  # participant 0 holds no valid element
    p = params(5)
    ct = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape), jnp.float32)

    def loss(fb):
        def local(x, mask, ct, p):
            y, _ = bnjax.batch_norm(
                x, p, bnjax.init_stats(5), training=True, mask=mask, axis_name="d", axis_index_groups=groups,
                fused_backward=fb,
            )  # fmt: skip
            return jax.lax.psum(jnp.sum(y * ct), "d")

        sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d"), P("d"), P()), out_specs=P())
        return lambda x, p: sharded(x, mask, ct, p)

    fused = jax.jit(jax.grad(loss(True), argnums=(0, 1)))(x, p)
    auto = jax.jit(jax.grad(loss(False), argnums=(0, 1)))(x, p)
    for f, a in zip(jax.tree.leaves(fused), jax.tree.leaves(auto), strict=True):
        np.testing.assert_allclose(f, a, rtol=1e-4, atol=1e-5)


def test_vmap_axis_name_falls_back_to_autodiff_and_is_exact():
    """Under vmap(axis_name=...) the backward's all-reduce cannot live in a custom VJP (JAX traces
    it outside vmap's names), so bnjax differentiates by autodiff there; still the full batch's."""
    x, _ = data((4, 6, 5))
    p = params(5)
    ct = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape), jnp.float32)

    def vmapped(x, p):
        f = lambda x: bnjax.batch_norm(x, p, bnjax.init_stats(5), training=True, axis_name="b")[0]  # noqa: E731
        return jnp.sum(jax.vmap(f, axis_name="b")(x) * ct)

    def full(x, p):
        y = bnjax.batch_norm(x.reshape(24, 5), p, bnjax.init_stats(5), training=True)[0]
        return jnp.sum(y.reshape(x.shape) * ct)

    got, expected = jax.grad(vmapped, (0, 1))(x, p), jax.grad(full, (0, 1))(x, p)
    for f, a in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(f, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_flax_shells_pass_fused_backward_through(fused):
    import flax.linen as nn
    from flax import nnx

    import bnjax.linen
    import bnjax.nnx

    x, _ = data((8, 6))
    layer = bnjax.linen.BatchNorm(use_running_average=False, fused_backward=fused)
    variables = layer.init(jax.random.key(0), x)

    def linen_out(x):
        return layer.apply(variables, x, mutable=["batch_stats"])[0]

    expected = lambda x: bnjax.batch_norm(x, bnjax.init_params(6), bnjax.init_stats(6), training=True)[0]  # noqa: E731
    module = bnjax.nnx.LayerNorm(6, fused_backward=fused, rngs=nnx.Rngs(0))
    assert isinstance(layer, nn.Module) and module.fused_backward is fused
    for f, ref_f in [(linen_out, expected), (module, lambda x: bnjax.layer_norm(x, bnjax.init_params(6)))]:
        grad = jax.grad(lambda x, f=f: jnp.sum(jnp.sin(f(x))))(x)
        np.testing.assert_allclose(grad, jax.grad(lambda x, r=ref_f: jnp.sum(jnp.sin(r(x))))(x), rtol=1e-5, atol=1e-5)
        if fused:
            with pytest.raises(TypeError, match="forward-mode"):
                jax.jvp(f, (x,), (x,))
        else:
            jax.jvp(f, (x,), (x,))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's fusion decisions differ by backend")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("center", [True, False])
def test_row_training_step_has_no_temporary_of_x_size(center, dtype):
    """Layer / RMS norm: the forward pass is one loop over each row and the backward pass
    recomputes the row statistics inside the loops for dx and dg, so a whole training step (y, dx,
    dg, db) needs no temporary buffer of x's size. Guards the spelling in statistics and transform:
    a shared x − K, a shared float32 convert, or statistics saved for the backward pass each make
    XLA (on CPU) write one out to memory, as autodiff does."""
    shape = (64, 64, 128)  # 4096 rows: statistics.ROW_LOOP_MIN_ROWS, XLA's threshold for the row loop
    x, _ = data(shape, dtype)
    p = params((128,))
    ct = jnp.asarray(np.random.default_rng(3).standard_normal(shape), dtype)
    norm = bnjax.layer_norm if center else bnjax.rms_norm

    def step(x, p, ct, fused):
        y, vjp = jax.vjp(lambda x, p: norm(x, p, fused_backward=fused), x, p)
        return y, vjp(ct)

    def temp_bytes(fused):
        return jax.jit(step, static_argnums=3).lower(x, p, ct, fused).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(True) < x.size * 2  # less than one bfloat16 copy of x
    assert temp_bytes(False) >= x.size * 4  # autodiff writes float32 intermediates of x's size
    forward = jax.jit(lambda x, p: norm(x, p)).lower(x, p).compile().memory_analysis()
    assert forward.temp_size_in_bytes < x.size * 2


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's fusion decisions differ by backend")
@pytest.mark.parametrize("shape", [(4096, 128), (64, 64, 128)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("center", [True, False])
def test_row_method_reads_x_once_per_output(center, dtype, shape):
    """Layer / RMS norm, rows method: outside the overflow fallback's loops, the compiled program
    has one computation over x's size per output of that size (y; y and dx for a training step),
    each of them one loop per row, and the overflow check reads one element per row. Guards the
    spelling of the rows method's range mark (statistics.local_moments): the spellings that
    XLA splits into several passes over x (a mark on M₂ or 1/σ) or folds away fail here."""
    import math
    import re

    x, _ = data(shape, dtype)
    p = params((128,))
    norm = bnjax.layer_norm if center else bnjax.rms_norm

    def step(x, p, ct):
        y, vjp = jax.vjp(lambda x, p: norm(x, p), x, p)
        return y, vjp(ct)

    for fn, outputs in ((lambda x, p, ct: norm(x, p), 1), (step, 2)):
        hlo = jax.jit(fn).lower(x, p, x).compile().as_text()
        entry = hlo[hlo.index("ENTRY") :]
        sized = []
        for line in entry.splitlines():
            m = re.search(r"= \w+\[([\d,]+)\]\S* fusion\(", line)
            if m and math.prod(int(d) for d in m.group(1).split(",")) == x.size:
                sized.append(line)
        assert len(sized) == outputs, sized
        assert all("kind=kCustom" in line for line in sized), sized  # XLA's one-loop-per-row fusion
        assert " while(" in entry  # the fallback is there, in its loop


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's fusion decisions differ by backend")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_training_step_has_no_temporary_of_x_size(dtype):
    """Batch norm (columns): every reduction is a pass of its own, and each pass (and each output)
    reads its own copy of x and dy, so no float32 convert of bfloat16 x or dy, no x − μ and no
    broadcast is written out (autodiff writes converts of x's size for bfloat16)."""
    shape = (16, 16, 16, 32)
    x, _ = data(shape, dtype)
    p = params((32,))
    ct = jnp.asarray(np.random.default_rng(3).standard_normal(shape), dtype)

    def step(x, p, ct):
        (y, stats), vjp = jax.vjp(lambda x, p: bnjax.batch_norm(x, p, bnjax.init_stats(32), training=True), x, p)
        return y, stats, vjp((ct, jax.tree.map(jnp.zeros_like, stats)))

    temp = jax.jit(step).lower(x, p, ct).compile().memory_analysis().temp_size_in_bytes
    assert temp < x.size * 2  # less than one bfloat16 copy of x


def test_rows_entries_take_the_rows_variant():
    """The *_rows methods above exist to exercise the rows variant (and its backward pass)."""
    from bnjax._src import statistics

    for name, axes in [("layer_norm_rows", (2,)), ("layer_norm_rows_per_channel", (1, 2)), ("rms_norm_rows", (2,))]:
        assert statistics.uses_rows(METHODS[name][0], axes, None), name
    assert not statistics.uses_rows(METHODS["layer_norm"][0], (2,), None)


def _reductions_of_size(jaxpr, size):
    """The reduce_sum equations over ``size`` elements, outside while loops and conds (the overflow
    fallback's recomputations live there and run only when needed)."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "reduce_sum" and eqn.invars[0].aval.size == size:
            count += 1
        if eqn.primitive.name in ("while", "cond"):
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _reductions_of_size(inner, size)
    return count


@pytest.mark.parametrize("masked", [False, True])
def test_group_norm_backward_sums_the_spatial_axes_first(masked):
    """g varies over the channels of a group but not over the spatial axes: the backward pass sums
    dy and dy·(x − μ) over the spatial axes per channel (two passes over x's size), and takes
    Σdz, Σ dz·x̂, dg and db from those small sums, instead of one pass over x's size for each
    of the four. The forward pass makes two (the statistics)."""
    shape = (4, 6, 6, 16)
    x, _ = data(shape)
    p = params((16,))
    mask = np.random.default_rng(12).random((4, 6, 6, 1)) < 0.7 if masked else None

    def step(x, ct):
        _, vjp = jax.vjp(lambda x: bnjax.group_norm(x, p, num_groups=4, mask=mask), x)
        return vjp(ct)

    jaxpr = jax.make_jaxpr(step)(x, x)
    assert _reductions_of_size(jaxpr.jaxpr, x.size) == 4
