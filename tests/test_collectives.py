"""Cross-device traffic of sync batch norm, counted in the optimized HLO.

One collective per batch-norm layer in the forward pass and one in the backward pass, under
pmap and shard_map, for a network of several layers (not counting the overflow fallback's, in a
while loop that runs only when the moments overflow float32).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import bnjax

C = 16
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all", "collective-broadcast")


def without_loop_bodies(hlo: str) -> str:
    """The HLO text less the bodies of while loops: bnjax's only loops are the lazy overflow
    fallbacks (statistics, "Range"), whose collectives run only when the moments overflowed."""
    bodies = set(re.findall(r"\bbody=%([\w.\-]+)", hlo))
    blocks = re.split(r"\n(?=%|ENTRY)", hlo)
    return "\n".join(b for b in blocks if not any(b.startswith(f"%{name} ") for name in bodies))


def count_collectives(hlo: str, fallback: bool = False) -> int:
    """Number of cross-device collective instructions (async pairs counted once) in HLO text; those
    of the overflow fallback only with ``fallback``."""
    if not fallback:
        hlo = without_loop_bodies(hlo)
    total = 0
    for op in COLLECTIVES:
        total += len(re.findall(rf"= [^=\n]*\b{op}(?:-start)?\(", hlo))
    return total


def _net(x, layers, axis_name):
    """`layers` batch-norm layers with a fixed mixing matrix between them; returns (y, stats)."""
    mix = jnp.asarray(np.random.default_rng(0).standard_normal((C, C)), jnp.float32) / 4
    all_stats = []
    for i in range(layers):
        p = bnjax.NormParams(jnp.full(C, 1.0 + i), jnp.full(C, 0.1 * i))
        x, st = bnjax.batch_norm(x, p, bnjax.init_stats(C), training=True, axis_name=axis_name, activation=jnp.tanh)
        x = x @ mix
        all_stats.append(st)
    return x, all_stats


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize("layers", [1, 3])
def test_shard_map_one_collective_each_way_per_layer(layers):
    mesh = Mesh(np.array(jax.devices()), ("d",))
    x = jnp.ones((64, 4, C))

    def forward(x):
        f = jax.shard_map(
            lambda x: _net(x, layers, "d"), mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P()), check_vma=True
        )
        return f(x)

    def train_step(x):
        return jax.grad(lambda x: jnp.sum(forward(x)[0] ** 2))(x)

    assert count_collectives(_compiled(forward, x)) == layers
    assert count_collectives(_compiled(train_step, x)) == 2 * layers
    # and the overflow fallback (run only when needed) one of its own in the forward pass (the
    # moments again, with each participant's scale); the backward pass shares its all-reduce
    assert count_collectives(_compiled(forward, x), fallback=True) == 2 * layers
    assert count_collectives(_compiled(train_step, x), fallback=True) == 3 * layers


@pytest.mark.parametrize("layers", [1, 3])
def test_pmap_one_collective_each_way_per_layer(layers):
    x = jnp.ones((8, 8, 4, C))
    forward = jax.pmap(lambda x: _net(x, layers, "d"), axis_name="d")
    train_step = jax.pmap(jax.grad(lambda x: jnp.sum(_net(x, layers, "d")[0] ** 2)), axis_name="d")
    assert count_collectives(forward.lower(x).compile().as_text()) == layers
    assert count_collectives(train_step.lower(x).compile().as_text()) == 2 * layers


def _all_reduce_sizes(hlo: str) -> list[int]:
    """Number of float32 elements moved by each all-reduce instruction."""
    sizes = []
    for line in hlo.splitlines():
        m = re.search(r"= ([^=\n]*)\ball-reduce(?:-start)?\(", line)
        if m:
            shapes = re.findall(r"f32\[([\d,]*)\]", m.group(1))
            sizes.append(sum(int(np.prod([int(d) for d in dims.split(",") if d])) for dims in shapes))
    return sizes


def test_backward_collective_carries_two_feature_vectors():
    """The backward all-reduce moves the two per-feature sums (2·C floats), not the gathered buffer."""
    mesh = Mesh(np.array(jax.devices()), ("d",))

    def train_step(x):
        f = jax.shard_map(lambda x: _net(x, 1, "d")[0], mesh=mesh, in_specs=P("d"), out_specs=P("d"))
        return jax.grad(lambda x: jnp.sum(f(x) ** 2))(x)

    hlo = _compiled(train_step, jnp.ones((64, 4, C)))
    # forward: 8 devices × (n, K, δ, M₂) × C; backward: (Σdy, Σdy·x̂) × C
    assert sorted(_all_reduce_sizes(without_loop_bodies(hlo))) == [2 * C, 8 * 4 * C]
    # the overflow fallback's, the moments with each device's scale: 8 × (n, K, δ, M₂, s) × C
    assert sorted(_all_reduce_sizes(hlo)) == [2 * C, 8 * 4 * C, 8 * 5 * C]


def test_masked_layer_with_replicated_params_still_one_collective_each_way():
    """Masks and invariant (P()) parameters whose gradients must be summed add no collective."""
    mesh = Mesh(np.array(jax.devices()), ("d",))

    def layer(x, m, p):
        return bnjax.batch_norm(x, p, bnjax.init_stats(C), training=True, axis_name="d", mask=m)[0]

    sharded = jax.shard_map(layer, mesh=mesh, in_specs=(P("d"), P("d"), P()), out_specs=P("d"))

    def train_step(x, m, p):
        return jax.grad(lambda x, p: jnp.sum(sharded(x, m, p) ** 2), argnums=(0, 1))(x, p)

    args = (jnp.ones((64, 4, C)), jnp.ones((64, 1, 1), bool), bnjax.init_params(C))
    assert count_collectives(_compiled(lambda x, m, p: sharded(x, m, p), *args)) == 1
    assert count_collectives(_compiled(train_step, *args)) == 2


@pytest.mark.parametrize("method", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("masked", [False, True])
def test_sharded_hidden_axis_one_collective_each_way(method, masked):
    # tensor parallelism: the hidden axis split over "t", g and b sharded like it. The forward
    # pass has one all-reduce (the row statistics), the backward one more (its two sums together).
    # For RMS norm the backward sum, Σ dz·x, does not need the forward's result (1/σ factors out of
    # Σ dz·x̂), and XLA's all-reduce combiner sends both in a single all-reduce.
    mesh = Mesh(np.array(jax.devices()[:4]), ("t",))
    fn = getattr(bnjax, method)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 6, 32)), jnp.float32)
    mask = jnp.arange(6)[None, :, None] < jnp.arange(1, 9)[:, None, None] if masked else None
    spec = P(None, None, "t")

    def norm(x, scale, bias):
        return fn(x, bnjax.NormParams(scale, bias), axis_name="t", mask=mask)

    def forward(x, scale, bias):
        return jax.shard_map(norm, mesh=mesh, in_specs=(spec, P("t"), P("t")), out_specs=spec)(x, scale, bias)

    def vjp(x, scale, bias, dy):
        def local(x, scale, bias, dy):
            return jax.vjp(norm, x, scale, bias)[1](dy)

        return jax.shard_map(local, mesh=mesh, in_specs=(spec, P("t"), P("t"), spec), out_specs=(spec, P("t"), P("t")))(
            x, scale, bias, dy
        )

    g, b = jnp.ones(32), jnp.zeros(32)
    dy = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)
    assert count_collectives(_compiled(forward, x, g, b)) == 1
    assert count_collectives(_compiled(vjp, x, g, b, dy)) == (2 if method == "layer_norm" else 1)
