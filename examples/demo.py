"""bnjax's main demo: a small CNN with sync batch norm, data-parallel over 8 devices, on real digits.

A jit-compiled optax training loop of a CNN with ``bnjax.linen.BatchNorm`` on scikit-learn's
``load_digits`` (8×8 grey images, 10 classes, shipped with scikit-learn: nothing is downloaded).
Each global batch is split over 8 devices (forced CPU devices here) with ``jax.shard_map``; batch
statistics are synchronized across them (``axis_name="batch"``), so training is the same as on
one device with the full batch. After each epoch: train loss, and test accuracy with the running
statistics (evaluation mode). The same network without normalization is trained for comparison,
and a plot of both training curves is written.

    python examples/demo.py [--epochs 15] [--out examples/out]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

import bnjax.linen

DEVICES = 8


class CNN(nn.Module):
    """conv-BN-ReLU ×3 (16, 32, 64 channels), global average pool, dense; BN synced over devices."""

    use_bn: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        for i, features in enumerate((16, 32, 64)):
            x = nn.Conv(features, (3, 3), use_bias=not self.use_bn)(x)
            if self.use_bn:
                x = bnjax.linen.BatchNorm(use_running_average=not train, momentum=0.9, debias=True, axis_name="batch")(
                    x
                )
            x = nn.relu(x)
            if i == 1:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def load(seed: int):
    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype(np.float32)  # (N, 8, 8, 1)
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def train(use_bn: bool, epochs: int, batch: int, lr: float, seed: int, progress: bool = True) -> dict:
    x_train, x_test, y_train, y_test = load(seed)
    model = CNN(use_bn=use_bn)
    variables = model.init(jax.random.key(seed), x_train[:batch], train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    opt = optax.adam(lr)
    opt_state = opt.init(params)
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("batch",))

    def local_step(params, batch_stats, opt_state, x, y):
        """Runs on each device with its slice of the batch; params and state are replicated."""

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            # sum over the local slice / global batch: the per-device losses add up to the mean
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum() / batch
            return loss, updates.get("batch_stats", {})

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # params enter shard_map replicated (P()): JAX sums their gradients across devices itself
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, jax.lax.psum(loss, "batch")

    train_step = jax.jit(
        jax.shard_map(
            local_step, mesh=mesh, in_specs=(P(), P(), P(), P("batch"), P("batch")), out_specs=(P(), P(), P(), P())
        ),
        donate_argnums=(0, 1, 2),
    )

    @jax.jit
    def accuracy(params, batch_stats, x, y):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    rng = np.random.default_rng(seed)
    steps = len(x_train) // batch
    history = {"train_loss": [], "test_accuracy": []}
    name = "with BN" if use_bn else "without BN"
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))
        losses = []
        bar = tqdm(range(steps), desc=f"{name:10s} epoch {epoch:2d}/{epochs}", leave=False, disable=not progress)
        for i in bar:
            idx = order[i * batch : (i + 1) * batch]
            params, batch_stats, opt_state, loss = train_step(
                params, batch_stats, opt_state, x_train[idx], y_train[idx]
            )
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        acc = float(accuracy(params, batch_stats, x_test, y_test))
        history["train_loss"].append(float(np.mean(losses)))
        history["test_accuracy"].append(acc)
        tqdm.write(f"{name:10s} epoch {epoch:2d}  train loss {history['train_loss'][-1]:.4f}  test accuracy {acc:.4f}")
    return history


def plot(histories: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, h in histories.items():
        epochs = np.arange(1, len(h["train_loss"]) + 1)
        ax1.plot(epochs, h["train_loss"], marker="o", label=name)
        ax2.plot(epochs, h["test_accuracy"], marker="o", label=name)
    ax1.set(xlabel="epoch", ylabel="train loss (cross-entropy)", yscale="log", title="Training loss")
    ax2.set(xlabel="epoch", ylabel="test accuracy (running statistics)", title="Test accuracy, load_digits")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"CNN on load_digits, global batch split over {DEVICES} devices (sync BN)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=15, help="training epochs")
    parser.add_argument("--batch", type=int, default=128, help="mini-batch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "out"), help="output folder for tables and figures"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without batch norm")
    args = parser.parse_args(argv)
    if jax.device_count() < DEVICES:
        raise SystemExit(f"needs {DEVICES} devices: set XLA_FLAGS=--xla_force_host_platform_device_count=8")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    histories = {"with BN": train(True, args.epochs, args.batch, args.lr, args.seed)}
    if not args.no_baseline:
        histories["without BN"] = train(False, args.epochs, args.batch, args.lr, args.seed)
    plot(histories, out / "demo_curves.png")
    for name, h in histories.items():
        print(
            f"{name:10s}: final test accuracy {h['test_accuracy'][-1]:.4f}, final train loss {h['train_loss'][-1]:.4f}"
        )
    print(f"plot: {out / 'demo_curves.png'}  ({time.perf_counter() - start:.0f}s)")
    return histories


if __name__ == "__main__":
    main()
