"""Relative error of the float32 batch variance at large |mean|/std, bnjax against the usual formulas.

Each column computes the per-feature variance of the same float32 data (default 4096 × 64, N(ratio, 1));
the reference is float64 arithmetic on those same float32 values. Also reports the output of a
constant feature (value 3000.5, bias 0): ideally exactly 0.

    python examples/variance_accuracy.py [--rows 4096] [--features 64] [--seed 0]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import bnjax


def one_pass(x):  # E[x²] − E[x]²  (Flax's default "fast variance")
    return jnp.maximum(jnp.mean(x * x, 0) - jnp.mean(x, 0) ** 2, 0)


def two_pass(x):  # E[(x − E[x])²]
    return jnp.mean((x - jnp.mean(x, 0)) ** 2, 0)


def contenders():
    out = {"bnjax": lambda x: bnjax.moments(x, 0)[1], "one-pass": one_pass, "two-pass": two_pass}
    try:
        import flax.linen as nn

        bn = nn.BatchNorm(use_running_average=False, momentum=0.0)

        def flax_default(x):
            v = bn.init(jax.random.key(0), x)
            _, upd = bn.apply(v, x, mutable=["batch_stats"])
            return upd["batch_stats"]["var"]  # momentum 0: the batch variance itself

        out["flax (default)"] = flax_default
    except ImportError:
        pass
    try:
        import torch

        out["torch"] = lambda x: jnp.asarray(torch.var(torch.tensor(np.asarray(x)), dim=0, unbiased=False).numpy())
    except ImportError:
        pass
    return out


def main(rows: int = 4096, features: int = 64, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    fns = contenders()
    results = {}
    print(f"{'|mean|/std':>10} " + " ".join(f"{k:>15}" for k in fns))
    for ratio in [0.0, 1e2, 1e3, 1e4, 3e4, 1e5]:
        x = (rng.standard_normal((rows, features)) + ratio).astype(np.float32)
        exact = x.astype(np.float64).var(0)
        row = {k: float(np.max(np.abs(np.asarray(f(jnp.asarray(x)), np.float64) / exact - 1))) for k, f in fns.items()}
        results[ratio] = row
        print(f"{ratio:>10.0e} " + " ".join(f"{v:>15.2e}" for v in row.values()))
    const = jnp.full((64, 4), 3000.5, jnp.float32)
    y, _ = bnjax.batch_norm(const, None, bnjax.init_stats(4), training=True)
    print(f"constant feature 3000.5 -> bnjax output max |y| = {float(jnp.max(jnp.abs(y)))}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4096, help="examples per batch")
    parser.add_argument("--features", type=int, default=64, help="features (columns) per batch")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the data")
    args = parser.parse_args()
    main(args.rows, args.features, args.seed)
