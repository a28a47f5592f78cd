"""A small transformer language model, data- and tensor-parallel on 8 (forced CPU) devices, with
bnjax's RMS norm on a sharded hidden axis and the fused residual path; against Flax's RMSNorm.

The text is real and needs no download: the Python standard library's own source files (the
``.py`` files next to the ``os`` module), read as bytes (a 256-symbol vocabulary); the last 10%
is held out. The model is a pre-norm decoder (token and position embeddings, ``--layers``
blocks of causal self-attention and a GELU MLP, a final norm, logits tied to the embedding),
written as plain functions under ``jax.shard_map`` over a mesh ("data", "model") = (2, 4):

- data parallelism: the batch is split over "data"; JAX sums the parameter gradients;
- tensor parallelism: the residual stream (batch, tokens, hidden) is split over "model" along
  its hidden axis. Each block gathers its input, runs its heads (attention) or hidden units
  (MLP) locally, and scatters its output back to the hidden-sharded layout; the norms run on the
  sharded hidden axis itself, with ``axis_name="model"``: exact statistics of the whole row.

Two runs from the same initialization and data order, differing only in the norm:

- ``bnjax``: ``bnjax.add_rms_norm(block_out, residual, g, axis_name="model")`` for every
  residual add and the norm after it, and ``bnjax.rms_norm`` for the first and the final norm;
- ``flax``: ``residual + block_out`` then ``flax.linen.RMSNorm(axis_name="model")``.

They compute the same function, so their loss curves agree to float32 rounding (printed and
drawn in the PNG).

    python examples/train_lm.py [--steps 300] [--batch 16] [--seq 64] [--hidden 64] [--out examples/out]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import bnjax

DATA, MODEL = 2, 4  # the mesh: 2-way data parallel, 4-way tensor parallel
EPS = 1e-6
VOCAB = 256


def corpus(max_bytes: int) -> np.ndarray:
    """The standard library's .py sources as bytes, in a fixed (sorted) order."""
    files = sorted(pathlib.Path(os.__file__).parent.glob("*.py"))
    chunks, size = [], 0
    for f in files:
        data = f.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8).astype(np.int32)


def init(key: jax.Array, hidden: int, layers: int, seq: int, heads: int) -> dict:
    keys = iter(jax.random.split(key, 4 + 4 * layers))

    def dense(fan_in, fan_out):
        return jax.random.normal(next(keys), (fan_in, fan_out)) / np.sqrt(fan_in)

    blocks = [
        {
            "attn_norm": jnp.ones(hidden),
            "qkv": dense(hidden, 3 * hidden),
            "out": dense(hidden, hidden) / np.sqrt(2 * layers),
            "mlp_norm": jnp.ones(hidden),
            "up": dense(hidden, 4 * hidden),
            "down": dense(4 * hidden, hidden) / np.sqrt(2 * layers),
        }
        for _ in range(layers)
    ]
    return {
        "embed": jax.random.normal(next(keys), (VOCAB, hidden)) / np.sqrt(hidden),  # tied: logits of O(1)
        "pos": jax.random.normal(next(keys), (seq, hidden)) * 0.1,
        "blocks": blocks,
        "final_norm": jnp.ones(hidden),
    }


def param_specs(params: dict) -> dict:
    """How each parameter is laid out over "model" (replicated over "data"): the hidden axis of
    embeddings and norms is split like the residual stream; q/k/v and the MLP's up projection are
    split by output (heads, hidden units), the out and down projections by input."""
    hidden = P(None, "model")

    def block(_):
        return {
            "attn_norm": P("model"),
            "qkv": P(None, None, "model"),  # reshaped (hidden, 3, hidden): each of q, k, v by heads
            "out": P("model", None),
            "mlp_norm": P("model"),
            "up": P(None, "model"),
            "down": P("model", None),
        }

    return {"embed": hidden, "pos": hidden, "blocks": [block(b) for b in params["blocks"]], "final_norm": P("model")}


def _rms(kind: str, x: jax.Array, g: jax.Array) -> jax.Array:
    if kind == "bnjax":
        return bnjax.rms_norm(x, bnjax.NormParams(g, None), eps=EPS, axis_name="model")
    return nn.RMSNorm(epsilon=EPS, axis_name="model").apply({"params": {"scale": g}}, x)


def _add_rms(kind: str, out: jax.Array, residual: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(norm(residual + out), residual + out)."""
    if kind == "bnjax":
        return bnjax.add_rms_norm(out, residual, bnjax.NormParams(g, None), eps=EPS, axis_name="model")
    h = residual + out
    return _rms(kind, h, g), h


def _attention(h: jax.Array, qkv: jax.Array, out: jax.Array, heads: int) -> jax.Array:
    """Causal self-attention over this device's heads; h is the gathered (full-hidden) input."""
    b, t, _ = h.shape
    q, k, v = jnp.einsum("btc,cjd->jbtd", h, qkv)  # each (b, t, local hidden)
    d = q.shape[-1] // heads
    q, k, v = (a.reshape(b, t, heads, d) for a in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, heads * d)
    return o @ out  # partial sums over this device's heads


def _forward(kind: str, params: dict, tokens: jax.Array, heads_per_device: int) -> jax.Array:
    """Logits (local batch, tokens, vocab), inside shard_map; the residual stream is hidden-sharded."""

    def gather(x):  # hidden-sharded -> full hidden
        return lax.all_gather(x, "model", axis=2, tiled=True)

    def scatter(partial):  # partial sums over the full hidden -> summed, hidden-sharded
        return lax.psum_scatter(partial, "model", scatter_dimension=2, tiled=True)

    x = params["embed"][tokens] + params["pos"][None, : tokens.shape[1]]
    blocks = params["blocks"]
    y = _rms(kind, x, blocks[0]["attn_norm"])
    for i, blk in enumerate(blocks):
        a = scatter(_attention(gather(y), blk["qkv"], blk["out"], heads_per_device))
        y, x = _add_rms(kind, a, x, blk["mlp_norm"])
        m = scatter(jax.nn.gelu(gather(y) @ blk["up"]) @ blk["down"])
        g = blocks[i + 1]["attn_norm"] if i + 1 < len(blocks) else params["final_norm"]
        y, x = _add_rms(kind, m, x, g)
    # tied unembedding: (b, t, hidden/M) @ (hidden/M, vocab), summed over the hidden shards
    return lax.psum(jnp.einsum("btc,vc->btv", y, params["embed"]), "model")


def make_step(kind: str, mesh: Mesh, specs: dict, tx: optax.GradientTransformation, heads: int, batch: int):
    heads_per_device = heads // MODEL

    def local_loss(params, tokens):
        logits = _forward(kind, params, tokens[:, :-1], heads_per_device)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        # mean over the global batch: local sums over the data shards, divided by the global count
        return lax.psum(jnp.sum(nll), "data") / (batch * nll.shape[1])

    loss_fn = jax.shard_map(local_loss, mesh=mesh, in_specs=(specs, P("data")), out_specs=P())

    @jax.jit
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, jax.jit(loss_fn)


def batches(data: np.ndarray, batch: int, seq: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(data) - seq - 1, batch)
        yield np.stack([data[s : s + seq + 1] for s in starts])


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=300, help="training steps per run")
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences), a multiple of 2")
    ap.add_argument("--seq", type=int, default=64, help="tokens (bytes) per sequence")
    ap.add_argument("--hidden", type=int, default=64, help="model width, a multiple of 4 x heads")
    ap.add_argument("--heads", type=int, default=4, help="attention heads, a multiple of 4")
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    ap.add_argument("--corpus-bytes", type=int, default=2_000_000, help="bytes of standard-library source to read")
    ap.add_argument("--seed", type=int, default=0, help="initialization and data-order seed")
    ap.add_argument("--out", default="examples/out", help="folder for train_lm.png")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if len(jax.devices()) < DATA * MODEL:
        sys.exit(
            f"needs {DATA * MODEL} devices (set XLA_FLAGS=--xla_force_host_platform_device_count=8 before "
            f"JAX starts), got {len(jax.devices())}"
        )
    mesh = Mesh(np.array(jax.devices()[: DATA * MODEL]).reshape(DATA, MODEL), ("data", "model"))
    data = corpus(args.corpus_bytes)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    params0 = init(jax.random.key(args.seed), args.hidden, args.layers, args.seq, args.heads)
    for blk in params0["blocks"]:
        blk["qkv"] = blk["qkv"].reshape(args.hidden, 3, args.hidden)
    specs = param_specs(params0)
    tx = optax.adam(args.lr)
    held_batch = next(batches(held, args.batch, args.seq, 1, seed=12345))
    curves: dict[str, dict[str, list[float]]] = {}
    for kind in ("bnjax", "flax"):
        step, loss_fn = make_step(kind, mesh, specs, tx, args.heads, args.batch)
        params, opt_state = params0, tx.init(params0)
        losses: list[float] = []
        start = time.perf_counter()
        for tokens in tqdm(batches(train, args.batch, args.seq, args.steps, args.seed), total=args.steps, desc=kind):
            params, opt_state, loss = step(params, opt_state, tokens)
            losses.append(float(loss))
        curves[kind] = {"train": losses, "held_out": [float(loss_fn(params, held_batch))]}
        print(
            f"{kind}: final train loss {losses[-1]:.4f} nats/byte, held-out {curves[kind]['held_out'][0]:.4f}, "
            f"{time.perf_counter() - start:.1f} s"
        )
    diff = float(np.max(np.abs(np.subtract(curves["bnjax"]["train"], curves["flax"]["train"]))))
    print(f"largest difference between the two loss curves: {diff:.2e} (start {curves['bnjax']['train'][0]:.3f})")
    curves["max_abs_difference"] = {"train": [diff]}
    plot(curves, pathlib.Path(args.out))
    return curves


def plot(curves: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(curves["bnjax"]["train"], label="bnjax rms_norm / add_rms_norm", linewidth=2.5)
    ax.plot(curves["flax"]["train"], "--", label="flax.linen.RMSNorm", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per byte)")
    ax.set_title("Byte-level LM on the Python standard library, 2x4 mesh")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "train_lm.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
