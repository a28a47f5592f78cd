"""What bnjax's stable layer-norm statistics cost in the forward pass: an ablation, interleaved.

bnjax's rows method (layer norm over the last axis, 4096 rows or more) computes, in one loop per
row, K = clamp(Σx/n, min x, max x), d = x − K, δ = Σd/n, M₂ = Σd² − δ·Σd and y = (d − δ)·g/σ + b.
This script times that formula written out in jnp (checked to give bnjax's output bit for bit),
then the same with one safeguard dropped at a time, down to the plain two-pass and one-pass
(E[x²] − E[x]²) formulas, next to bnjax itself, flax.linen.LayerNorm and the memory floor (read x,
write y). What each safeguard buys:

- the clamp: K = x exactly on a constant row, and K finite when Σx overflows;
- the correction δ: x − μ applied as (x − K) − δ keeps the output at float32 accuracy when |μ|/σ is
  large (the rounding of Σx/n alone costs ulp(μ)/σ in every output).

    .venv/bin/python benchmarks/ln_bound.py                      # (64,256,512) and (16,1024,1024)
    .venv/bin/python benchmarks/ln_bound.py --shape 4096,64 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import bnjax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bnbench.timing import Timed, round_robin  # benchmarks/ is on the path now

EPS = 1e-5


def variants(g: jax.Array, b: jax.Array, ndim: int, dtype) -> dict[str, Callable[[jax.Array], jax.Array]]:
    c = g.shape[-1]
    g, b = (v.reshape((1,) * (ndim - 1) + (c,)) for v in (g, b))  # explicit ranks (no rank promotion)

    def output(d, var):
        return (d * (jax.lax.rsqrt(var + EPS) * g) + b).astype(dtype)

    def corrected(xc, k):
        d = xc - k
        s1 = jnp.sum(d, -1, keepdims=True)
        s2 = jnp.sum(d * d, -1, keepdims=True)
        offset = s1 / c
        return output(d - offset, jnp.maximum(s2 - s1 * offset, 0) / c)

    def clamped_mean(x, xc):
        low = jnp.min(x, -1, keepdims=True).astype(jnp.float32)
        high = jnp.max(x, -1, keepdims=True).astype(jnp.float32)
        return jnp.minimum(jnp.maximum(jnp.sum(xc, -1, keepdims=True) / c, low), high)

    def full(x):
        xc = x.astype(jnp.float32)
        return corrected(xc, clamped_mean(x, xc))

    def no_clamp(x):
        xc = x.astype(jnp.float32)
        return corrected(xc, jnp.sum(xc, -1, keepdims=True) / c)

    def no_correction(x):
        xc = x.astype(jnp.float32)
        d = xc - clamped_mean(x, xc)
        return output(d, jnp.mean(d * d, -1, keepdims=True))

    def two_pass(x):
        xc = x.astype(jnp.float32)
        d = xc - jnp.mean(xc, -1, keepdims=True)
        return output(d, jnp.mean(d * d, -1, keepdims=True))

    def one_pass(x):
        xc = x.astype(jnp.float32)
        mean = jnp.mean(xc, -1, keepdims=True)
        return output(xc - mean, jnp.maximum(jnp.mean(xc * xc, -1, keepdims=True) - mean * mean, 0))

    return {
        "bnjax formula": full,
        "without the clamp": no_clamp,
        "without the correction": no_correction,
        "plain two-pass": two_pass,
        "one-pass E[x²]−E[x]²": one_pass,
    }


def run(shape: tuple[int, ...], dtype, rounds: int) -> list[tuple[str, float]]:
    c = shape[-1]
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(*shape) + 0.5, dtype)
    g = jnp.asarray(1 + 0.1 * rng.randn(c), jnp.float32)
    b = jnp.asarray(rng.randn(c), jnp.float32)
    fns = {"bnjax.layer_norm": lambda x: bnjax.layer_norm(x, bnjax.NormParams(g, b), eps=EPS)}
    fns.update(variants(g, b, x.ndim, dtype))
    try:
        import flax.linen as nn

        ln = nn.LayerNorm(epsilon=EPS, dtype=dtype)
        fns["flax.linen.LayerNorm"] = lambda x: ln.apply({"params": {"scale": g, "bias": b}}, x)
    except ImportError:
        pass
    fns["floor (read x, write y)"] = lambda x: (x * 2).astype(dtype)
    compiled = {k: jax.jit(f).lower(x).compile() for k, f in fns.items()}
    same = np.array_equal(np.asarray(compiled["bnjax.layer_norm"](x)), np.asarray(compiled["bnjax formula"](x)))
    if not same:
        raise AssertionError("the written-out formula no longer matches bnjax.layer_norm: update this script")
    times = round_robin({k: Timed(f, lambda: (x,)) for k, f in compiled.items()}, rounds)
    return [(k, float(np.median(v)) * 1e3) for k, v in times.items()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", help="x's shape, e.g. 64,256,512 (repeatable; default: two)")
    p.add_argument("--dtype", action="append", help="float32 or bfloat16 (repeatable; default: both)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    args = p.parse_args(argv)
    shapes = [tuple(int(s) for s in a.split(",")) for a in (args.shape or ["64,256,512", "16,1024,1024"])]
    for shape in shapes:
        for dtype in args.dtype or ["float32", "bfloat16"]:
            rows = run(shape, jnp.dtype(dtype), args.rounds)
            ref = dict(rows)["bnjax.layer_norm"]
            print(f"\n{shape} {dtype}, {args.rounds} rounds: median ms, ÷ bnjax.layer_norm")
            for name, ms in rows:
                print(f"  {name:26s} {ms:8.2f}  {ms / ref:5.2f}")


if __name__ == "__main__":
    main()
