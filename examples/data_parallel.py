"""Data-parallel training with sync batch norm on 8 (forced CPU) devices, three ways, checked
against single-device training on the full batch.

The same MLP as ``train_digits.py`` (two batch-norm layers) is trained for N steps of SGD on
scikit-learn's digits with a global batch split over 8 devices:

- ``pmap``: ``axis_name="d"``; parameter gradients summed with ``lax.psum``.
- ``shard_map`` over a 1-D mesh: ``axis_name="d"``; parameters replicated (``P()``), so JAX sums
  their gradients itself.
- ``jit`` over the batch sharded with ``NamedSharding``: no ``axis_name``; XLA computes global
  statistics.

After N steps each run's parameters and running statistics must equal those of single-device
training on the full batch, to float32 tolerance.

    python examples/data_parallel.py [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from train_digits import HIDDEN, forward, init, load

DEVICES = 8


def make_loss(global_batch: int, axis_name=None):
    """Sum of per-example losses / global batch size, so per-device losses add up to the full one."""

    def loss_fn(params, stats, x, y):
        logits, new_stats = forward(params, stats, x, training=True, axis_name=axis_name)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum() / global_batch, new_stats

    return loss_fn


def run(mode: str, steps: int, batch: int, lr: float, seed: int):
    x_train, _, y_train, _ = load(seed)
    params, stats = init(jax.random.key(seed), (x_train.shape[1], *HIDDEN, 10))
    opt = optax.sgd(lr, momentum=0.9)
    opt_state = opt.init(params)
    rng = np.random.default_rng(seed)
    batches = [rng.choice(len(x_train), batch, replace=False) for _ in range(steps)]
    grad_fn = jax.value_and_grad(make_loss(batch, None if mode in ("single", "sharded_jit") else "d"), has_aux=True)

    def apply(params, opt_state, grads):
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    if mode in ("single", "sharded_jit"):

        @jax.jit
        def step(params, stats, opt_state, x, y):
            (_, stats), grads = grad_fn(params, stats, x, y)
            return *apply(params, opt_state, grads), stats

        put = (lambda a: a) if mode == "single" else None
        if mode == "sharded_jit":
            sharding = NamedSharding(Mesh(np.array(jax.devices()[:DEVICES]), ("d",)), P("d"))
            put = lambda a: jax.device_put(a, sharding)  # noqa: E731
    elif mode == "pmap":

        def per_device(params, stats, opt_state, x, y):
            (_, stats), grads = grad_fn(params, stats, x, y)
            grads = jax.lax.psum(grads, "d")  # per-device partial gradients -> full-batch gradient
            return *apply(params, opt_state, grads), stats

        pstep = jax.pmap(per_device, axis_name="d", in_axes=(None, None, None, 0, 0), out_axes=None)

        def step(params, stats, opt_state, x, y):
            return pstep(params, stats, opt_state, x, y)

        put = lambda a: a.reshape((DEVICES, -1) + a.shape[1:])  # noqa: E731
    elif mode == "shard_map":
        mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("d",))

        def per_shard(params, stats, opt_state, x, y):
            (_, stats), grads = grad_fn(params, stats, x, y)  # grads of P() params arrive summed
            return *apply(params, opt_state, grads), stats

        step = jax.jit(
            jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(), P(), P("d"), P("d")), out_specs=(P(), P(), P()))
        )
        put = lambda a: a  # noqa: E731
    else:
        raise ValueError(f"unknown mode {mode!r}")

    for idx in batches:
        params, opt_state, stats = step(params, stats, opt_state, put(x_train[idx]), put(y_train[idx]))
    return params, stats


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--batch", type=int, default=128, help="mini-batch size")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if jax.device_count() < DEVICES:
        raise SystemExit(f"needs {DEVICES} devices; set XLA_FLAGS=--xla_force_host_platform_device_count=8")

    reference = run("single", args.steps, args.batch, args.lr, args.seed)
    errors = {}
    for mode in ("pmap", "shard_map", "sharded_jit"):
        result = run(mode, args.steps, args.batch, args.lr, args.seed)
        diffs = jax.tree.map(
            lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))),
            result,
            reference,
        )
        errors[mode] = max(jax.tree.leaves(diffs))
        print(
            f"{mode:12s} max |difference| from single-device full-batch training after {args.steps} steps: "
            f"{errors[mode]:.2e} (parameters and running statistics)"
        )
    return errors


if __name__ == "__main__":
    errs = main()
    sys.exit(0 if max(errs.values()) <= 1e-4 else 1)
