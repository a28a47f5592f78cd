"""Swap a Flax model's normalization layers for bnjax's and keep its checkpoint.

Two Flax models written the usual way, with the normalization modules taken from one namespace:

- a small ResNet (``Conv`` → ``BatchNorm`` → relu blocks with a residual, then ``GroupNorm``),
- a pre-norm Transformer block (``LayerNorm`` before attention, ``RMSNorm`` before the MLP, a
  padding mask on the sequence).

Each is built with ``flax.linen`` (the original) and with ``bnjax.linen`` (the same code, the
namespace swapped). The Flax model is initialized and trained for a few steps, its checkpoint is
written with ``flax.serialization`` and read into the bnjax model unchanged; then both must give
the same evaluation outputs, the same training-mode outputs and gradients, and the same updated
running statistics. The same is shown for an NNX block, moving ``nnx.state`` across.

    python examples/flax_swap.py [--steps 3]
"""

from __future__ import annotations

import argparse
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, serialization

import bnjax.linen
import bnjax.nnx


class ResNet(nn.Module):
    norms: types.ModuleType  # flax.linen or bnjax.linen: where BatchNorm and GroupNorm come from
    width: int = 16

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda: self.norms.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        x = nn.relu(bn()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
        for _ in range(2):
            h = nn.relu(bn()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
            x = nn.relu(x + bn()(nn.Conv(self.width, (3, 3), use_bias=False)(h)))
        x = self.norms.GroupNorm(num_groups=4)(x)
        return nn.Dense(10)(x.mean((1, 2)))


class TransformerBlock(nn.Module):
    norms: types.ModuleType
    heads: int = 4

    @nn.compact
    def __call__(self, x, mask):
        # mask: (N, T) True = real token; norms see it with x's rank, attention as (N, 1, T, T)
        m = mask[..., None]
        h = self.norms.LayerNorm()(x, mask=m)
        attn = mask[:, None, None, :] & mask[:, None, :, None]
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, mask=attn)
        h = self.norms.RMSNorm()(x, mask=m)
        return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(4 * x.shape[-1])(h)))


class NNXBlock(nnx.Module):
    def __init__(self, norms, features, rngs):
        self.norm1 = norms.LayerNorm(features, rngs=rngs)
        self.dense = nnx.Linear(features, features, rngs=rngs)
        self.norm2 = norms.BatchNorm(features, momentum=0.9, rngs=rngs)

    def __call__(self, x):
        return self.norm2(self.dense(self.norm1(x)))


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def resnet(steps: int, key) -> dict[str, float]:
    x = jax.random.normal(key, (8, 12, 12, 3)) * 2 + 1
    labels = jnp.arange(8) % 10
    flax_model, ours = ResNet(nn), ResNet(bnjax.linen)
    variables = flax_model.init(jax.random.key(0), x, train=False)

    def loss(params, stats, model):
        logits, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels]), upd["batch_stats"]

    params, stats = variables["params"], variables["batch_stats"]
    for _ in range(steps):  # train the Flax model: this is the checkpoint a user already has
        grads, stats = jax.grad(loss, has_aux=True)(params, stats, flax_model)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    checkpoint = serialization.to_bytes({"params": params, "batch_stats": stats})

    template = ours.init(jax.random.key(1), x, train=False)  # bnjax's layout: identical to Flax's
    restored = serialization.from_bytes(template, checkpoint)
    g_flax, s_flax = jax.grad(loss, has_aux=True)(params, stats, flax_model)
    g_ours, s_ours = jax.grad(loss, has_aux=True)(restored["params"], restored["batch_stats"], ours)
    return {
        "eval logits": _max_diff(
            flax_model.apply({"params": params, "batch_stats": stats}, x, train=False),
            ours.apply(restored, x, train=False),
        ),
        "gradients": _max_diff(g_flax, g_ours),
        "updated running statistics": _max_diff(s_flax, s_ours),
    }


def transformer(key) -> dict[str, float]:
    x = jax.random.normal(key, (2, 7, 16))
    mask = jnp.arange(7)[None, :] < jnp.array([[7], [4]])  # the second sequence is padded
    x = jnp.where(mask[..., None], x, 1e4)  # padding holds garbage: it must not matter
    flax_model, ours = TransformerBlock(nn), TransformerBlock(bnjax.linen)
    variables = flax_model.init(jax.random.key(0), x, mask)
    restored = serialization.from_bytes(ours.init(jax.random.key(1), x, mask), serialization.to_bytes(variables))
    y_ours = ours.apply(restored, x, mask)
    # Flax on the unpadded sequences is the reference (its masked LayerNorm gives NaN on an
    # all-padding row, which attention then spreads to the real tokens: counted below)
    full = flax_model.apply(variables, x[:1], mask[:1])
    short = flax_model.apply(variables, x[1:, :4], mask[1:, :4])
    y_other_padding = ours.apply(restored, jnp.where(mask[..., None], x, -3e4), mask)
    valid = mask[..., None]
    return {
        "transformer, full sequence": float(jnp.max(jnp.abs(full - y_ours[:1]))),
        "transformer, padded sequence vs Flax on it unpadded": float(jnp.max(jnp.abs(short - y_ours[1:, :4]))),
        "bnjax, other padding values (at real tokens)": float(
            jnp.max(jnp.where(valid, jnp.abs(y_other_padding - y_ours), 0.0))
        ),
        "flax on the padded batch: NaN outputs at real tokens": float(
            jnp.sum(jnp.isnan(jnp.where(valid, flax_model.apply(variables, x, mask), 0.0)))
        ),
    }


def nnx_block(key) -> dict[str, float]:
    x = jax.random.normal(key, (6, 8)) * 3 + 2
    theirs, ours = NNXBlock(nnx, 8, nnx.Rngs(0)), NNXBlock(bnjax.nnx, 8, nnx.Rngs(1))
    theirs(x)  # one training step's statistics in the Flax model
    nnx.update(ours, nnx.state(theirs))  # the same state tree moves across unchanged
    y_train = _max_diff(theirs(x), ours(x))
    theirs.eval()
    ours.eval()
    return {"nnx training outputs": y_train, "nnx eval outputs": _max_diff(theirs(x), ours(x))}


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="training steps of the Flax ResNet before the swap")
    args = parser.parse_args(argv)
    keys = jax.random.split(jax.random.key(42), 3)
    diffs = {**resnet(args.steps, keys[0]), **transformer(keys[1]), **nnx_block(keys[2])}
    for name, d in diffs.items():
        print(f"{name:55s} {int(d)}" if "NaN" in name else f"{name:55s} max |flax - bnjax| = {d:.2e}")
    return diffs


if __name__ == "__main__":
    main()
