"""Experiment: smoothness of the loss along the training trajectory, with and without batch norm.

In the spirit of Santurkar et al. 2018 ("How Does Batch Normalization Help Optimization?",
section 3.1 and figure 4): an MLP 64 → 128 → 128 → 128 → 10 on scikit-learn's ``load_digits``
(pixels scaled to [0, 1]) is trained with plain SGD at one learning rate η, with and without
``bnjax.batch_norm`` between each hidden dense layer and its ReLU. Every ``--probe-every`` steps,
at the current parameters θ and on the current mini-batch B (BN in training mode, i.e. the very
function SGD differentiates), with g = ∇L_B(θ) and for each step multiplier k in ``--multipliers``:

- effective β-smoothness  β_eff = max_k ‖∇L_B(θ − ηkg) − ∇L_B(θ)‖ / (ηk‖g‖), the largest
  Lipschitz ratio of the gradient observed along the update direction;
- gradient predictiveness  max_k ‖∇L_B(θ − ηkg) − ∇L_B(θ)‖ (Santurkar et al.'s ℓ2 change);
- loss range  max − min of L_B over {θ} ∪ {θ − ηkg};

and (b) E‖x‖² over the batch of the input x of every dense layer (the data, then each hidden
ReLU output) and of every hidden pre-activation z = xW (the batch norm's input, or the ReLU's
input without BN): the quantity that bounds the gradient's Lipschitz constant
(for a linear layer, ‖∂²L/∂W²‖ grows with E‖x‖², Santurkar et al. 2018).
Probes never change the training trajectory (running statistics are not updated by them). Each
variant's seeds train together in one jit-compiled, ``vmap``-ed step. Writes
``exp_smoothness.png`` and ``exp_smoothness.md`` to ``--out``.

    python examples/exp_smoothness.py [--seeds 3] [--steps 1000] [--lr 0.1] [--out examples/out]
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
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import bnjax

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HIDDEN = (128, 128, 128)
VARIANTS = ("without BN", "with BN")


def load(split_seed: int = 0):
    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    return train_test_split(
        x, digits.target.astype(np.int32), test_size=0.25, random_state=split_seed, stratify=digits.target
    )


def init(seed: int, use_bn: bool, sizes):
    """He-normal weights (NumPy RNG: the same initial weights for both variants), BN params/stats."""
    rng = np.random.default_rng(seed)
    layers, norms, stats = [], [], []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = jnp.asarray(rng.normal(size=(fan_in, fan_out)).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in)))
        last = i == len(sizes) - 2
        if use_bn and not last:
            layers.append({"w": w})  # BN's b replaces the dense bias
            norms.append(bnjax.init_params(fan_out))
            stats.append(bnjax.init_stats(fan_out))
        else:
            layers.append({"w": w, "b": jnp.zeros(fan_out)})
    return {"layers": layers, "norms": norms}, stats


def _mean_sq_norm(a):
    return jnp.mean(jnp.sum(a * a, axis=-1))


def forward(params, stats, x, training: bool):
    """Logits, new running statistics, and E‖x‖² of each dense layer's input and hidden pre-activation."""
    use_bn = bool(params["norms"])
    new_stats, inputs, pre = [], [], []
    for i, layer in enumerate(params["layers"][:-1]):
        inputs.append(_mean_sq_norm(x))
        z = x @ layer["w"]
        if use_bn:
            pre.append(_mean_sq_norm(z))
            x, st = bnjax.batch_norm(z, params["norms"][i], stats[i], training=training, activation=jax.nn.relu)
            new_stats.append(st)
        else:
            z = z + layer["b"][None]
            pre.append(_mean_sq_norm(z))
            x = jax.nn.relu(z)
    last = params["layers"][-1]
    inputs.append(_mean_sq_norm(x))
    return x @ last["w"] + last["b"][None], new_stats, {"inputs": jnp.stack(inputs), "pre": jnp.stack(pre)}


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(leaf * leaf) for leaf in jax.tree.leaves(tree)))


def make_fns(x_train, y_train, x_test, y_test, *, lr: float, multipliers):
    """Seed-vmapped, jit-compiled ``step(state, idx)``, ``probe(state, idx)`` and ``accuracy(state)``."""
    opt = optax.sgd(lr)

    def loss_fn(params, stats, idx):
        logits, new_stats, diag = forward(params, stats, x_train[idx], training=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_train[idx]).mean()
        return loss, (new_stats, diag)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, idx):
        params, stats, opt_state = state
        (loss, (stats, _)), grads = grad_fn(params, stats, idx)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), loss

    def probe(state, idx):
        params, stats, _ = state
        (loss0, (_, diag)), g = grad_fn(params, stats, idx)
        g_norm = _global_norm(g)
        losses, ratios, changes = [loss0], [], []
        for k in multipliers:
            moved = jax.tree.map(lambda p, d, k=k: p - lr * k * d, params, g)
            (loss_k, _), g_k = grad_fn(moved, stats, idx)  # the same batch; new statistics discarded
            change = _global_norm(jax.tree.map(jnp.subtract, g_k, g))
            losses.append(loss_k)
            changes.append(change)
            ratios.append(change / (lr * k * g_norm))
        losses = jnp.stack(losses)
        return {
            "loss": loss0,
            "grad_norm": g_norm,
            "beta_eff": jnp.max(jnp.stack(ratios)),
            "grad_change": jnp.max(jnp.stack(changes)),
            "loss_range": jnp.max(losses) - jnp.min(losses),
            "input_sq_norm": diag["inputs"],
            "pre_sq_norm": diag["pre"],
        }

    def accuracy(state):
        params, stats, _ = state
        logits, _, _ = forward(params, stats, x_test, training=False)  # BN: running statistics
        return jnp.mean(jnp.argmax(logits, -1) == y_test)

    return jax.jit(jax.vmap(step)), jax.jit(jax.vmap(probe)), jax.jit(jax.vmap(accuracy)), opt


def batch_indices(n_train: int, batch: int, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per_epoch = n_train // batch
    epochs = -(-steps // per_epoch)
    rows = [rng.permutation(n_train)[: per_epoch * batch].reshape(per_epoch, batch) for _ in range(epochs)]
    return np.concatenate(rows)[:steps]


def run_variant(use_bn: bool, data, seeds, idx: np.ndarray, args) -> dict:
    x_train = data[0]
    step_fn, probe_fn, acc_fn, opt = make_fns(*data, lr=args.lr, multipliers=args.multipliers)
    sizes = (x_train.shape[1], *HIDDEN, 10)
    states = []
    for seed in seeds:
        params, stats = init(seed, use_bn, sizes)
        states.append((params, stats, opt.init(params)))
    state = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    probes, probe_steps, losses = [], [], []
    for t in range(idx.shape[1]):
        if t % args.probe_every == 0:
            probes.append(probe_fn(state, idx[:, t]))
            probe_steps.append(t)
        state, loss = step_fn(state, idx[:, t])
        losses.append(loss)
    probes = jax.device_get(probes)
    out = {k: np.stack([p[k] for p in probes], axis=1) for k in probes[0]}  # (seeds, probes, ...)
    out["probe_steps"] = np.asarray(probe_steps)
    out["train_loss"] = np.stack(jax.device_get(losses), axis=1)  # (seeds, steps)
    out["test_accuracy"] = np.asarray(acc_fn(state))  # (seeds,)
    return out


def _window_mean(values: np.ndarray, probe_steps: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Per-seed mean over the probes with lo <= step < hi; values (seeds, probes)."""
    sel = (probe_steps >= lo) & (probe_steps < hi)
    return values[:, sel].mean(axis=1)


def _pm(values: np.ndarray, fmt: str = ".3g") -> str:
    return f"{np.mean(values):{fmt}} ± {np.std(values):.2g}"


def summarize(results: dict, args) -> dict:
    """Windowed means: early (first 10% of steps) and late (last half), per seed."""
    early, late = (0, max(args.probe_every, args.steps // 10)), (args.steps // 2, args.steps)
    summary = {}
    for name, r in results.items():
        s = {}
        for key in ("beta_eff", "grad_change", "loss_range", "grad_norm"):
            s[f"{key}_early"] = _window_mean(r[key], r["probe_steps"], *early)
            s[f"{key}_late"] = _window_mean(r[key], r["probe_steps"], *late)
        s["input_sq_norm_final"] = r["input_sq_norm"][:, -1]  # (seeds, layers)
        s["pre_sq_norm_final"] = r["pre_sq_norm"][:, -1]
        s["input_sq_norm_first"] = r["input_sq_norm"][:, 0]
        s["final_train_loss"] = r["train_loss"][:, -max(1, args.steps // 20) :].mean(axis=1)
        s["test_accuracy"] = r["test_accuracy"]
        summary[name] = s
    return summary


def write_table(summary: dict, args, path: pathlib.Path) -> str:
    early_hi = max(args.probe_every, args.steps // 10)
    ks = ", ".join(f"{k:g}" for k in args.multipliers)
    lines = [
        f"Digits MLP 64-128-128-128-10, plain SGD η={args.lr}, batch {args.batch}, {args.steps} steps, "
        f"{args.seeds} seeds (mean ± std over seeds of per-seed window means); probes every "
        f"{args.probe_every} steps along −g with step multipliers k ∈ {{{ks}}}.",
        "",
        "| quantity | window | " + " | ".join(summary) + " |",
        "| --- | --- | " + " | ".join("---" for _ in summary) + " |",
    ]
    names = {
        "beta_eff": "effective β-smoothness max‖Δ∇L‖/(ηk‖g‖)",
        "grad_change": "gradient change max‖Δ∇L‖",
        "loss_range": "loss range along −g",
        "grad_norm": "gradient norm ‖g‖",
    }
    for key, label in names.items():
        for window, text in (("early", f"steps 0–{early_hi}"), ("late", f"steps {args.steps // 2}–{args.steps}")):
            cells = [_pm(s[f"{key}_{window}"]) for s in summary.values()]
            lines.append(f"| {label} | {text} | " + " | ".join(cells) + " |")
    n_layers = len(HIDDEN) + 1
    for layer in range(n_layers):
        what = "data (layer 1 input)" if layer == 0 else f"layer {layer + 1} input (hidden ReLU output {layer})"
        cells = [
            f"{_pm(s['input_sq_norm_first'][:, layer])} → {_pm(s['input_sq_norm_final'][:, layer])}"
            for s in summary.values()
        ]
        lines.append(f"| E‖x‖², {what} | start → end | " + " | ".join(cells) + " |")
    for layer in range(len(HIDDEN)):
        cells = [_pm(s["pre_sq_norm_final"][:, layer]) for s in summary.values()]
        lines.append(
            f"| E‖z‖², hidden pre-activation {layer + 1} (BN input / ReLU input) | end | " + " | ".join(cells) + " |"
        )
    lines.append(
        "| final train loss | last 5% of steps | "
        + " | ".join(_pm(s["final_train_loss"]) for s in summary.values())
        + " |"
    )
    lines.append(
        "| test accuracy (BN: running statistics) | end | "
        + " | ".join(_pm(s["test_accuracy"], ".4f") for s in summary.values())
        + " |"
    )
    table = "\n".join(lines) + "\n"
    path.write_text(table)
    return table


def _band(ax, x, values, label, color=None, ls="-"):
    """Median over seeds with a min–max band; values (seeds, points)."""
    (line,) = ax.plot(x, np.median(values, axis=0), label=label, color=color, ls=ls)
    ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
    return line.get_color()


def plot(results: dict, args, path: pathlib.Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    colors = {"without BN": "tab:blue", "with BN": "tab:orange"}
    panels = (
        ("beta_eff", axes[0, 0], "effective β-smoothness", "max_k ‖∇L(θ−ηkg) − ∇L(θ)‖ / (ηk‖g‖)"),
        ("loss_range", axes[0, 1], "loss range along the gradient step", "max − min of L over θ − ηkg"),
        ("grad_change", axes[0, 2], "gradient predictiveness", "max_k ‖∇L(θ−ηkg) − ∇L(θ)‖"),
    )
    for name, r in results.items():
        for key, ax, title, ylabel in panels:
            _band(ax, r["probe_steps"], r[key], name, colors[name])
            ax.set(title=title, ylabel=ylabel, xlabel="training step", yscale="log")
        loss = r["train_loss"]
        window = max(1, args.probe_every)
        kernel = np.ones(window) / window
        smooth = np.stack([np.convolve(row, kernel, mode="valid") for row in loss])
        _band(axes[1, 0], np.arange(window, loss.shape[1] + 1), smooth, name, colors[name])
        for layer, ls in zip(range(1, len(HIDDEN) + 1), ("-", "--", ":"), strict=True):
            _band(
                axes[1, 1],
                r["probe_steps"],
                r["input_sq_norm"][..., layer],
                f"{name}, layer {layer + 1} input",
                colors[name],
                ls,
            )
            _band(
                axes[1, 2],
                r["probe_steps"],
                r["pre_sq_norm"][..., layer - 1],
                f"{name}, pre-activation {layer}",
                colors[name],
                ls,
            )
    axes[1, 0].set(title="training loss (smoothed)", xlabel="training step", ylabel="loss", yscale="log")
    axes[1, 1].set(
        title="E‖x‖² of hidden dense-layer inputs (ReLU outputs)", xlabel="training step", ylabel="E‖x‖²", yscale="log"
    )
    axes[1, 2].set(
        title="E‖z‖² of hidden pre-activations (BN input / ReLU input)",
        xlabel="training step",
        ylabel="E‖z‖²",
        yscale="log",
    )
    for ax in axes.flat:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ks = ", ".join(f"{k:g}" for k in args.multipliers)
    fig.suptitle(
        f"Digits MLP 64-128-128-128-10, plain SGD η={args.lr}, batch {args.batch}, {args.seeds} seeds "
        f"(line: median, band: min–max); probes every {args.probe_every} steps, k ∈ {{{ks}}}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (independent runs per setting)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--batch", type=int, default=64, help="mini-batch size")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate")
    parser.add_argument("--probe-every", type=int, default=10, help="probe the loss landscape every this many steps")
    parser.add_argument(
        "--multipliers",
        type=float,
        nargs="+",
        default=[0.5, 1.0, 2.0, 4.0],
        help="step multipliers k of the probes along the update direction",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("examples/out"), help="output folder for tables and figures"
    )
    parser.add_argument("--quick", action="store_true", help="a short run for the smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 2, 60
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load()
    data = tuple(jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))
    seeds = list(range(args.seeds))
    idx = np.stack([batch_indices(len(x_train), args.batch, args.steps, 1000 + s) for s in seeds])

    results = {name: run_variant(name == "with BN", data, seeds, idx, args) for name in VARIANTS}
    summary = summarize(results, args)
    table = write_table(summary, args, args.out / "exp_smoothness.md")
    plot(results, args, args.out / "exp_smoothness.png")
    print(table)
    print(f"wrote {args.out / 'exp_smoothness.png'} and {args.out / 'exp_smoothness.md'}")
    print(f"total {time.perf_counter() - start:.1f}s")
    return {"curves": results, "summary": summary}


if __name__ == "__main__":
    main()
