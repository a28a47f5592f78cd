"""Experiment: learning-rate tolerance with and without batch norm on raw, badly scaled features.

scikit-learn's ``load_breast_cancer`` (569 tumours, 30 features, benign/malignant) is used with
its RAW features, deliberately not standardized: they range from ~1e-3 (fractal dimension) to
~4e3 (worst area): inputs on wildly different scales, the situation in which normalizing a
layer's input is expected to help most.
A small MLP 30 → 64 → 64 → 1 with ReLU and the logistic loss is trained with plain SGD
(``optax.sgd``, no momentum) for a fixed number of mini-batch steps, for a log-spaced sweep of
learning rates and several seeds, in two variants:

- ``without BN``: dense layers with biases;
- ``with BN``: ``bnjax.batch_norm`` right after the first (input-facing) dense layer, before its
  ReLU (Ioffe & Szegedy 2015); the rest of the network is unchanged.

The output layer starts at zero in both variants, so both start from the same loss, ln 2 (with
random output weights the unnormalized network would start at a loss in the hundreds on these
inputs, which would make the divergence criterion meaningless). The final training loss is the
mean mini-batch loss over the last 10% of the steps; a run counts as diverged if that loss is not
finite or is above the initial loss ln 2. That criterion alone misses a second failure: a run that
blows up and then settles on the constant prediction (dead ReLUs, loss ≈ the class-prior entropy
0.66) passes it. So a run also counts as having *learned* only if its final loss is below
``--learned-below`` (default 0.5), and the peak mini-batch loss over the run is recorded too.

Reported per learning rate and variant: the final loss (mean ± std over seeds), how many seeds
learned and how many diverged, the peak loss (largest over seeds, and how many seeds' peaks rose
above ln 2) and the test accuracy (mean ± std over seeds). Reported per variant: the largest
learning rate at which every seed is stable, the learning rates at which every seed learned, and
the best learning rate (lowest mean final loss among the stable ones) with its test accuracy.
Outcomes near the edge of a variant's working range are chaotic: rounding differences (another
machine, another vmap width) or another set of seeds move single seeds across the thresholds, so
compare seed sets with ``--seed-offset`` before drawing conclusions. Seed ``s`` sets both the
initial weights and the mini-batch order (NumPy seed ``1000 + s``); the train/test split is fixed.
Every (learning rate, seed) pair of a variant trains in one jit-compiled, doubly ``vmap``-ed step.
Writes ``exp_lr_tolerance.png`` and ``exp_lr_tolerance.md`` to ``--out``.

    python examples/exp_lr_tolerance.py [--seeds 10] [--seed-offset 0] [--steps 500] [--out examples/out]
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import bnjax

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HIDDEN = (64, 64)
VARIANTS = ("without BN", "with BN")
INITIAL_LOSS = float(np.log(2.0))  # zero output layer: p = 1/2 for every example


def load(split_seed: int = 0):
    data = load_breast_cancer()
    x = data.data.astype(np.float32)  # raw: NOT standardized, on purpose
    return train_test_split(
        x, data.target.astype(np.float32), test_size=0.25, random_state=split_seed, stratify=data.target
    )


def init(seed: int, use_bn: bool, n_in: int):
    """He-normal hidden weights (NumPy RNG), zero output layer; BN params/stats if ``use_bn``."""
    rng = np.random.default_rng(seed)
    sizes = (n_in, *HIDDEN)
    layers = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = rng.normal(size=(fan_in, fan_out)).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        layer = {"w": jnp.asarray(w)}
        if not (use_bn and i == 0):  # BN's b replaces the first dense bias
            layer["b"] = jnp.zeros(fan_out)
        layers.append(layer)
    params = {"layers": layers, "out": {"w": jnp.zeros((HIDDEN[-1], 1)), "b": jnp.zeros(1)}}
    if use_bn:
        params["bn"] = bnjax.init_params(HIDDEN[0])
        return params, bnjax.init_stats(HIDDEN[0])
    return params, None


def forward(params, stats, x, training: bool):
    """Logits (N,) and the new BN running statistics (None without BN)."""
    first, second = params["layers"]
    z = x @ first["w"]
    if "bn" in params:
        h, stats = bnjax.batch_norm(z, params["bn"], stats, training=training, activation=jax.nn.relu)
    else:
        h = jax.nn.relu(z + first["b"][None])
    h = jax.nn.relu(h @ second["w"] + second["b"][None])
    out = params["out"]
    return (h @ out["w"] + out["b"][None])[:, 0], stats


def make_step(x_train, y_train):
    """One plain-SGD step of one run; the learning rate is an argument so runs can be vmapped over it."""

    def loss_fn(params, stats, idx):
        logits, new_stats = forward(params, stats, x_train[idx], training=True)
        return optax.sigmoid_binary_cross_entropy(logits, y_train[idx]).mean(), new_stats

    def step(params, stats, lr, idx):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, idx)
        opt = optax.sgd(lr)
        updates, _ = opt.update(grads, opt.init(params), params)
        return optax.apply_updates(params, updates), stats, loss

    return step


def make_accuracy(x_test, y_test):
    def accuracy(params, stats):
        logits, _ = forward(params, stats, x_test, training=False)  # BN: running statistics
        return jnp.mean((logits > 0) == (y_test > 0.5))

    return accuracy


def run_variant(use_bn: bool, data, lrs: np.ndarray, seeds: list[int], idx: np.ndarray):
    """Train every (lr, seed); idx is (seeds, steps, batch). Returns losses (lrs, seeds, steps), accuracy."""
    x_train, y_train, x_test, y_test = data
    states = [init(s, use_bn, x_train.shape[1]) for s in seeds]
    params, stats = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    # replicate over learning rates: leading axes (lrs, seeds)
    params, stats = jax.tree.map(lambda a: jnp.broadcast_to(a[None], (len(lrs), *a.shape)), (params, stats))
    lr_grid = jnp.broadcast_to(jnp.asarray(lrs, jnp.float32)[:, None], (len(lrs), len(seeds)))
    step = jax.jit(
        jax.vmap(jax.vmap(make_step(x_train, y_train), in_axes=(0, 0, 0, 0)), in_axes=(0, 0, 0, None))
    )  # outer: learning rate (same batches), inner: seed
    losses = []
    for t in range(idx.shape[1]):
        params, stats, loss = step(params, stats, lr_grid, idx[:, t])
        losses.append(loss)
    accuracy = jax.jit(jax.vmap(jax.vmap(make_accuracy(x_test, y_test))))(params, stats)
    return np.stack(jax.device_get(losses), axis=-1), np.asarray(accuracy)


def batch_indices(n_train: int, batch: int, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per_epoch = n_train // batch
    epochs = -(-steps // per_epoch)
    rows = [rng.permutation(n_train)[: per_epoch * batch].reshape(per_epoch, batch) for _ in range(epochs)]
    return np.concatenate(rows)[:steps]


def summarize(lrs: np.ndarray, final: np.ndarray, peak: np.ndarray, accuracy: np.ndarray, learned_below: float):
    """final, peak, accuracy: (lrs, seeds). Stable: finite and at most the initial loss, for every seed;
    learned: final loss below ``learned_below`` for every seed. Also counts, per learning rate, the seeds
    that learned, diverged, and whose peak loss rose above the initial loss."""
    seed_stable = np.isfinite(final) & (final <= INITIAL_LOSS)
    seed_learned = np.isfinite(final) & (final < learned_below)
    stable = seed_stable.all(axis=1)
    learned = seed_learned.all(axis=1)
    with np.errstate(invalid="ignore"):
        mean = np.where(stable, final.mean(axis=1), np.nan)
    best = int(np.nanargmin(mean)) if stable.any() else None
    return {
        "lrs": lrs,
        "final_loss": final,
        "peak_loss": peak,
        "test_accuracy": accuracy,
        "stable": stable,
        "learned": learned,
        "n_learned": seed_learned.sum(axis=1),
        "n_diverged": (~seed_stable).sum(axis=1),
        "n_peak_above_initial": (~(peak <= INITIAL_LOSS * (1 + 1e-6))).sum(axis=1),
        "largest_stable_lr": float(lrs[stable].max()) if stable.any() else float("nan"),
        "smallest_learned_lr": float(lrs[learned].min()) if learned.any() else float("nan"),
        "largest_learned_lr": float(lrs[learned].max()) if learned.any() else float("nan"),
        "best_lr": float(lrs[best]) if best is not None else float("nan"),
        "best_loss": float(mean[best]) if best is not None else float("nan"),
        "best_accuracy": float(accuracy[best].mean()) if best is not None else float("nan"),
        "best_accuracy_std": float(accuracy[best].std()) if best is not None else float("nan"),
    }


def _fmt_loss(values: np.ndarray) -> str:
    ok = np.isfinite(values)
    if not ok.any():
        return "non-finite (all seeds)"
    text = f"{values[ok].mean():.3g} ± {values[ok].std():.2g}"
    return text if ok.all() else f"{text} (finite seeds only)"


def _fmt_counts(r: dict, i: int, n: int) -> str:
    return f"{int(r['n_learned'][i])}/{n} / {int(r['n_diverged'][i])}/{n}"


def _fmt_peak(values: np.ndarray, n_above: int) -> str:
    top = f"{values.max():.3g}" if np.isfinite(values).all() else "inf/NaN"
    return f"{top} ({n_above}/{values.size})"


def _fmt_acc(values: np.ndarray) -> str:
    return f"{values.mean():.3f} ± {values.std():.3f}"


def _fmt_lr(value: float) -> str:
    return f"{value:.3g}" if np.isfinite(value) else "none"


def write_table(results: dict, args, path: pathlib.Path) -> str:
    n = args.seeds
    lines = [
        f"Breast cancer, RAW features; MLP 30-64-64-1, plain SGD, batch {args.batch}, {args.steps} steps, "
        f"{n} seeds ({args.seed_offset} to {args.seed_offset + n - 1}). Final training loss: mean of the last "
        f"10% of mini-batch losses, mean ± std over seeds; learned: final loss below {args.learned_below}; "
        f"diverged: non-finite or above the initial loss ln 2 = {INITIAL_LOSS:.3f}; the constant prediction "
        f"of the class prior scores {args.prior_loss:.3f}; peak: the largest mini-batch loss of any seed "
        "during the run (in brackets: how many seeds' peaks rose above ln 2); test accuracy (mean ± std "
        "over seeds) with BN's running statistics.",
        "",
        "| learning rate | "
        + " | ".join(
            f"{v}: final train loss | {v}: seeds learned / diverged | {v}: peak loss | {v}: test acc." for v in results
        )
        + " |",
        "| --- | " + " | ".join("--- | --- | --- | ---" for _ in results) + " |",
    ]
    lrs = next(iter(results.values()))["lrs"]
    for i, lr in enumerate(lrs):
        cells = [
            f"{_fmt_loss(r['final_loss'][i])} | {_fmt_counts(r, i, n)} | "
            f"{_fmt_peak(r['peak_loss'][i], int(r['n_peak_above_initial'][i]))} | {_fmt_acc(r['test_accuracy'][i])}"
            for r in results.values()
        ]
        lines.append(f"| {lr:.3g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| variant | largest stable learning rate | learning rates where every seed learned "
        f"(final loss < {args.learned_below}) | best learning rate | loss at best | test accuracy at best |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        learned = r["learned"]
        span = ", ".join(_fmt_lr(v) for v in r["lrs"][learned]) if learned.any() else "none"
        lines.append(
            f"| {name} | {_fmt_lr(r['largest_stable_lr'])} | {span} | {_fmt_lr(r['best_lr'])} | "
            f"{r['best_loss']:.3g} | {r['best_accuracy']:.3f} ± {r['best_accuracy_std']:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    path.write_text(table)
    return table


def plot(results: dict, args, path: pathlib.Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    panels = (
        ("final_loss", axes[0], "final training loss (mean of last 10% of steps)", "Final training loss"),
        ("peak_loss", axes[1], "peak mini-batch loss during training", "Peak loss during training"),
    )
    for key, ax, ylabel, title in panels:
        finite_max = max(float(np.max(r[key][np.isfinite(r[key])], initial=1.0)) for r in results.values())
        ceiling = 3.0 * finite_max  # where non-finite runs are drawn
        for offset, (name, r) in zip((-0.03, 0.03), results.items(), strict=False):
            lrs, values = r["lrs"], r[key]
            ok = np.isfinite(values)
            with np.errstate(invalid="ignore"):
                reduced = values.mean(axis=1) if key == "final_loss" else values.max(axis=1)
            curve = np.where(ok.all(axis=1), reduced, np.nan)
            label = f"{name} ({'mean' if key == 'final_loss' else 'max'} over seeds)"
            (line,) = ax.plot(lrs, curve, marker="o", label=label)
            x = np.repeat(lrs[:, None] * 10**offset, values.shape[1], axis=1)
            ax.scatter(x[ok], values[ok], s=12, color=line.get_color(), alpha=0.5)
            if (~ok).any():
                ax.scatter(
                    x[~ok],
                    np.full(int((~ok).sum()), ceiling),
                    s=50,
                    marker="x",
                    color=line.get_color(),
                    label=f"{name}: non-finite (drawn at the top)",
                )
        ax.axhline(INITIAL_LOSS, color="grey", ls="--", lw=1, label="initial loss ln 2 (divergence threshold)")
        if key == "final_loss":
            ax.axhline(args.prior_loss, color="black", ls=":", lw=1, label="constant prediction (class prior)")
            ax.axhline(
                args.learned_below, color="green", ls=":", lw=1, label=f"'learned' threshold {args.learned_below}"
            )
        ax.set(xscale="log", yscale="log", xlabel="learning rate (plain SGD)", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"Breast cancer, RAW features, MLP 30-64-64-1: {args.steps} SGD steps, batch {args.batch}, "
        f"{args.seeds} seeds from {args.seed_offset} (dots: single seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds (independent runs per setting)")
    parser.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="first seed: runs seeds offset .. offset+seeds-1 (disjoint offsets give independent seed sets)",
    )
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    parser.add_argument("--batch", type=int, default=64, help="mini-batch size")
    parser.add_argument("--lr-min", type=float, default=1e-5, help="smallest learning rate of the sweep")
    parser.add_argument("--lr-max", type=float, default=10.0, help="largest learning rate of the sweep")
    parser.add_argument("--num-lrs", type=int, default=13, help="number of log-spaced learning rates")
    parser.add_argument("--learned-below", type=float, default=0.5, help="final loss that counts as learned")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("examples/out"), help="output folder for tables and figures"
    )
    parser.add_argument("--quick", action="store_true", help="a short run for the smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.num_lrs = 2, 60, 7
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load()
    data = tuple(jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))
    lrs = np.logspace(np.log10(args.lr_min), np.log10(args.lr_max), args.num_lrs)
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    idx = np.stack([batch_indices(len(x_train), args.batch, args.steps, 1000 + s) for s in seeds])
    tail = max(1, args.steps // 10)
    prior = float(np.mean(y_train))
    args.prior_loss = float(-(prior * np.log(prior) + (1 - prior) * np.log(1 - prior)))

    results = {}
    for name in VARIANTS:
        losses, accuracy = run_variant(name == "with BN", data, lrs, seeds, idx)
        with np.errstate(invalid="ignore", over="ignore"):
            final = losses[..., -tail:].mean(axis=-1)  # (lrs, seeds)
            peak = np.where(np.isfinite(losses).all(axis=-1), losses.max(axis=-1), np.inf)
        results[name] = summarize(lrs, final, peak, accuracy, args.learned_below)

    table = write_table(results, args, args.out / "exp_lr_tolerance.md")
    plot(results, args, args.out / "exp_lr_tolerance.png")
    print(table)
    print(f"wrote {args.out / 'exp_lr_tolerance.png'} and {args.out / 'exp_lr_tolerance.md'}")
    print(f"total {time.perf_counter() - start:.1f}s")
    return results


if __name__ == "__main__":
    main()
