"""Train a small MLP with bnjax batch norm on scikit-learn's digits, state threaded by hand.

The model is plain functions and pytrees: dense weights, ``bnjax.NormParams`` for each batch-norm
layer, and ``bnjax.BatchStats`` passed into and returned from the jit-compiled training step.
Evaluation uses the running statistics (``training=False``).

    python examples/train_digits.py [--epochs 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import bnjax

HIDDEN = (128, 128)


def load(seed: int):
    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0  # pixel intensities 0..16
    return train_test_split(
        x, digits.target.astype(np.int32), test_size=0.25, random_state=seed, stratify=digits.target
    )


def init(key, sizes):
    layers, norms, stats = [], [], []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in)
        last = i == len(sizes) - 2
        # hidden layers: no dense bias, batch norm's b takes its place
        layers.append({"w": w, "b": jnp.zeros(fan_out) if last else None})
        if not last:
            norms.append(bnjax.init_params(fan_out))
            stats.append(bnjax.init_stats(fan_out))
    return {"layers": layers, "norms": norms}, stats


def forward(params, stats, x, training: bool, axis_name=None):
    new_stats = []
    for layer, norm, st in zip(params["layers"][:-1], params["norms"], stats, strict=True):
        x, st = bnjax.batch_norm(
            x @ layer["w"], norm, st, training=training, activation=jax.nn.relu, axis_name=axis_name
        )
        new_stats.append(st)
    last = params["layers"][-1]
    return x @ last["w"] + last["b"][None], new_stats


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("--batch", type=int, default=64, help="mini-batch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)

    x_train, x_test, y_train, y_test = load(args.seed)
    params, stats = init(jax.random.key(args.seed), (x_train.shape[1], *HIDDEN, 10))
    opt = optax.adam(args.lr)
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, stats, opt_state, x, y):
        def loss_fn(params):
            logits, new_stats = forward(params, stats, x, training=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    @jax.jit
    def accuracy(params, stats, x, y):
        logits, _ = forward(params, stats, x, training=False)  # running statistics
        return jnp.mean(jnp.argmax(logits, -1) == y)

    rng = np.random.default_rng(args.seed)
    steps = len(x_train) // args.batch
    start = time.perf_counter()
    acc = 0.0
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        losses = []
        for i in range(steps):
            idx = order[i * args.batch : (i + 1) * args.batch]
            params, stats, opt_state, loss = train_step(params, stats, opt_state, x_train[idx], y_train[idx])
            losses.append(loss)
        acc = float(accuracy(params, stats, x_test, y_test))
        print(f"epoch {epoch:3d}  train loss {float(np.mean(losses)):.4f}  test accuracy {acc:.4f}")
    print(f"final test accuracy {acc:.4f} ({len(x_test)} held-out digits, {time.perf_counter() - start:.1f}s)")
    return acc


if __name__ == "__main__":
    main()
