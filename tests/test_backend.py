"""The backend switch (bnjax/_src/backend.py): XLA:CPU's spellings and the plain formulation that
every other backend compiles give the same numbers (to a few ulps: XLA may order reductions
differently), the switch picks per platform at lowering, and the CPU spellings still do what they
are there for on the XLA that is installed."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import bnjax
from bnjax._src import backend


def _x(shape, dtype, seed=0):
    rng = np.random.RandomState(seed)
    return jnp.asarray(rng.randn(*shape) * 3.0 + 100.0, dtype)


def _params(c, seed=1):
    rng = np.random.RandomState(seed)
    return bnjax.NormParams(jnp.asarray(1 + 0.1 * rng.randn(c), jnp.float32), jnp.asarray(rng.randn(c), jnp.float32))


def _batch_norm(x, p, mask=None):
    y, s = bnjax.batch_norm(x, p, bnjax.init_stats(x.shape[-1]), training=True, mask=mask)
    return y, s.mean, s.var


def _masked_batch_norm(x, p):
    mask = (jnp.arange(x.shape[0]) % 3 != 0)[:, None]
    return _batch_norm(x, p, mask)


def _masked_layer_norm(x, p):
    mask = (jnp.arange(x.shape[-1]) < x.shape[-1] - 5)[None, :]
    return bnjax.layer_norm(x, p, mask=mask)


# (name, function of (x, params), x's shape): every path that a backend spelling touches
CASES = [
    ("layer_norm, rows (4096 rows)", lambda x, p: bnjax.layer_norm(x, p), (4096, 48)),
    ("layer_norm, columns (few rows)", lambda x, p: bnjax.layer_norm(x, p), (16, 48)),
    ("layer_norm, masked", _masked_layer_norm, (32, 48)),
    ("rms_norm, rows", lambda x, p: bnjax.rms_norm(x, bnjax.NormParams(p.scale, None)), (4096, 48)),
    ("batch_norm", _batch_norm, (8, 4, 4, 48)),
    ("batch_norm, masked", _masked_batch_norm, (24, 48)),
    ("group_norm", lambda x, p: bnjax.group_norm(x, p, num_groups=4), (4, 6, 6, 48)),
    ("instance_norm", lambda x, p: bnjax.instance_norm(x, p), (4, 6, 6, 48)),
]


def _step(fn):
    """Outputs and the gradients of a fixed linear functional of the first output."""

    def step(x, p):
        out, vjp = jax.vjp(fn, x, p)
        first = out[0] if isinstance(out, tuple) else out
        ct = jnp.cos(jnp.arange(first.size, dtype=jnp.float32)).reshape(first.shape).astype(first.dtype)
        cts = (ct, *(jnp.zeros_like(o) for o in out[1:])) if isinstance(out, tuple) else ct
        return out, vjp(cts)

    return step


def _forcing(formulation):
    """``backend.force(formulation)``, or no override for ``None`` (the platform's choice)."""
    return contextlib.nullcontext() if formulation is None else backend.force(formulation)


def _run(fn, x, p, formulation):
    # a fresh function object per formulation: jit caches traces per function, and the formulation
    # is chosen while tracing
    with _forcing(formulation):
        return jax.jit(lambda x, p: _step(fn)(x, p))(x, p)


def _ulps(dtype) -> float:
    return float(jnp.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("name", "fn", "shape"), CASES, ids=[c[0] for c in CASES])
def test_formulations_agree(name, fn, shape, dtype):
    """The same formulas in both formulations. Not always bit for bit: without the barriers XLA
    fuses the program differently and may add terms in another order, so results may differ by
    rounding: up to 4 ulps of the result's scale, times √(terms per element) for a result that sums
    over x (a parameter's gradient sums over every row: 13 ulps seen over 4096 rows)."""
    x, p = _x(shape, dtype), _params(shape[-1])
    results = {f: _run(fn, x, p, f) for f in (*backend.FORMULATIONS, None)}
    ref = jax.tree.leaves(results["cpu"])
    for formulation in ("plain", None):
        leaves = jax.tree.leaves(results[formulation])
        assert len(leaves) == len(ref)
        for a, b in zip(leaves, ref, strict=True):
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if formulation is None:  # the default on CPU is the CPU formulation, the same program
                np.testing.assert_array_equal(a64, b64)
                continue
            scale = float(np.max(np.abs(b64))) if b64.size else 0.0
            terms = max(x.size // max(b64.size, 1), 1)
            atol = 4 * _ulps(a.dtype) * scale * np.sqrt(terms)
            np.testing.assert_allclose(a64, b64, rtol=0, atol=atol, err_msg=name)


def test_formulations_agree_on_float64_reference():
    x, p = _x((4096, 48), jnp.float32), _params(48)
    xd = np.asarray(x, np.float64)
    mu, var = xd.mean(-1, keepdims=True), xd.var(-1, keepdims=True)
    ref = (xd - mu) / np.sqrt(var + 1e-5) * np.asarray(p.scale, np.float64) + np.asarray(p.bias, np.float64)
    for f in backend.FORMULATIONS:
        y = _run(lambda x, p: bnjax.layer_norm(x, p), x, p, f)[0]
        np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=2e-5, rtol=0)


def _bn_step(x, p, s, ct):
    (_, s2), vjp = jax.vjp(lambda x, p: bnjax.batch_norm(x, p, s, training=True), x, p)
    return vjp((ct, jax.tree.map(jnp.zeros_like, s2)))


def _bn_args(shape=(64, 16), dtype=jnp.float32):
    c = shape[-1]
    return _x(shape, dtype), bnjax.init_params(c), bnjax.init_stats(c), jnp.ones(shape, dtype)


def _barriers(platforms, formulation=None):
    """Optimization barriers beyond the one in each lazy fallback's while loop (lazy.lazily, every
    platform: it keeps XLA from hoisting the fallback out of the loop)."""
    fn = jax.jit(lambda *a: _bn_step(*a))
    with _forcing(formulation):
        text = export.export(fn, platforms=platforms)(*_bn_args()).mlir_module()
    loops = text.count("stablehlo.while")
    assert loops == 2, "the forward and the backward pass each have one lazy fallback (statistics, Range)"
    return text.count("stablehlo.optimization_barrier") - loops


def test_switch_chooses_per_platform_at_lowering():
    """CPU programs get the barriers; programs lowered for GPU or TPU (exported from this CPU-only
    machine) get the plain formulation; force overrides the platform both ways."""
    assert _barriers(["cpu"]) > 0
    assert _barriers(["cuda"]) == 0
    assert _barriers(["tpu"]) == 0
    assert _barriers(["cpu"], "plain") == 0
    assert _barriers(["cuda"], "cpu") > 0
    # and jit on this (CPU) machine lowers the CPU formulation by default
    text = jax.jit(lambda *a: _bn_step(*a)).lower(*_bn_args()).as_text()
    assert text.count("stablehlo.optimization_barrier") > text.count("stablehlo.while")


def test_force_rejects_unknown_formulation():
    with pytest.raises(ValueError, match="formulation must be one of"), backend.force("gpu"):  # type: ignore[arg-type]
        pass
    assert backend.forced() is None


def _temp_mib(fn, args, formulation):
    with backend.force(formulation):
        compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def _ln_step(x, p, ct):
    # y is an output too, as in a model: the rows method's overflow check reads y, so a program that
    # discarded y would still compute it (an x-sized buffer the spellings are not about)
    y, vjp = jax.vjp(lambda x, p: bnjax.layer_norm(x, p), x, p)
    return y, vjp(ct)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_spellings_still_pay_on_this_xla(dtype):
    """What the CPU spellings are for, checked on the installed XLA (memory, not time: it is
    deterministic). If this fails after a JAX upgrade, XLA now fuses the plain formulation as well
    (or the barriers now cost memory): re-measure with the benchmark's "bnjax (plain)" contender and
    drop or change the spelling in bnjax/_src/backend.py."""
    if dtype == jnp.bfloat16:  # batch norm: the barrier keeps float32 x from being written out
        bn_args = _bn_args((64, 16, 16, 32), dtype)  # x in float32: 2 MiB
        assert _temp_mib(_bn_step, bn_args, "cpu") < 0.5
        assert _temp_mib(_bn_step, bn_args, "plain") >= 1.9
    x = _x((4096, 256), dtype)  # layer norm, rows: x − K would be written out (4 MiB in float32)
    ln_args = (x, bnjax.init_params(256), jnp.ones_like(x))
    assert _temp_mib(_ln_step, ln_args, "cpu") < 0.5
    assert _temp_mib(_ln_step, ln_args, "plain") >= 3.9
