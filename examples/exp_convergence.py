"""Experiment: convergence speed of one MLP on digits with no normalization, BN, LN, GN (and WN).

The same network (64 → 128 → 128 → 10, ReLU) on scikit-learn's ``load_digits`` (8×8 grey
images, pixels scaled to [0, 1]; 25% held out), trained with the same plain SGD learning rate,
batch size and number of steps, once per normalization method and seed:

- ``none``:  dense layers with biases, nothing else;
- ``batch``: ``bnjax.batch_norm`` after each hidden dense layer (Ioffe & Szegedy 2015), running
  statistics threaded through the step by hand and used for every test evaluation;
- ``layer``: ``bnjax.layer_norm`` over the 128 features of each example (Ba et al. 2016);
- ``group``: ``bnjax.group_norm`` with 8 groups of 16 features (Wu & He 2018);
- ``weight``: weight normalization w = g·v/‖v‖ (Salimans & Kingma 2016), only if this version of
  bnjax exports ``weight_norm`` (it is skipped otherwise).

Per step the training loss is recorded, every ``--eval-every`` steps the test accuracy; the
report gives, mean ± std over seeds, the number of steps until the test accuracy first reaches
``--target`` and the final test accuracy. All seeds of one method train together in one jit-compiled,
``vmap``-ed step. Writes ``exp_convergence.png`` and ``exp_convergence.md`` to ``--out``.

    python examples/exp_convergence.py [--seeds 3] [--steps 1500] [--lr 0.05] [--out examples/out]
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

HIDDEN = (128, 128)
GROUPS = 8
LABELS = {
    "none": "no normalization",
    "batch": "batch norm",
    "layer": "layer norm",
    "group": f"group norm ({GROUPS} groups)",
    "weight": "weight norm",
}


def available_methods() -> list[str]:
    methods = ["none", "batch", "layer", "group"]
    if hasattr(bnjax, "weight_norm"):
        methods.append("weight")
    return methods


def load(split_seed: int = 0):
    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    return train_test_split(
        x, digits.target.astype(np.int32), test_size=0.25, random_state=split_seed, stratify=digits.target
    )


def _wn_init_g(v):
    if hasattr(bnjax, "weight_norm_init"):
        return bnjax.weight_norm_init(v)
    return jnp.sqrt(jnp.sum(v * v, axis=0))


def init(seed: int, method: str, sizes):
    """Parameters (a pytree) and batch-norm running statistics (a list, empty unless BN).

    He-normal weights drawn with NumPy (compiling JAX's PRNG costs seconds on a small CPU); the same
    seed gives the same weights for every method.
    """
    rng = np.random.default_rng(seed)
    layers, norms, stats = [], [], []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = jnp.asarray(rng.normal(size=(fan_in, fan_out)).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in)))
        last = i == len(sizes) - 2
        layer = {"w": w, "b": jnp.zeros(fan_out)}
        if not last:
            if method in ("batch", "layer", "group"):
                layer = {"w": w}  # the normalization's b replaces the dense bias
                norms.append(bnjax.init_params(fan_out))
            if method == "batch":
                stats.append(bnjax.init_stats(fan_out))
            if method == "weight":
                layer = {"v": w, "g": _wn_init_g(w), "b": jnp.zeros(fan_out)}
        layers.append(layer)
    return {"layers": layers, "norms": norms}, stats


def forward(method: str, params, stats, x, training: bool):
    """Logits and the new running statistics (unchanged list for every method but BN)."""
    new_stats = []
    for i, layer in enumerate(params["layers"][:-1]):
        if method == "weight":
            x = jax.nn.relu(x @ bnjax.weight_norm(layer["v"], layer["g"]) + layer["b"][None])
            continue
        z = x @ layer["w"]
        if method == "none":
            x = jax.nn.relu(z + layer["b"][None])
        elif method == "batch":
            x, st = bnjax.batch_norm(z, params["norms"][i], stats[i], training=training, activation=jax.nn.relu)
            new_stats.append(st)
        elif method == "layer":
            x = bnjax.layer_norm(z, params["norms"][i], activation=jax.nn.relu)
        elif method == "group":
            x = bnjax.group_norm(z, params["norms"][i], num_groups=GROUPS, activation=jax.nn.relu)
        else:
            raise ValueError(f"unknown method {method!r}")
    last = params["layers"][-1]
    return x @ last["w"] + last["b"][None], new_stats


def make_fns(method: str, x_train, y_train, x_test, y_test, *, lr: float):
    """``init(seeds)`` (stacked over seeds) and jit-compiled, seed-vmapped ``step(state, idx)``, ``accuracy(state)``.

    A Python loop over a small compiled step compiles far faster on CPU than one ``lax.scan`` over
    the whole run, and the per-step dispatch is negligible at this size.
    """
    opt = optax.sgd(lr)
    sizes = (x_train.shape[1], *HIDDEN, 10)

    def init_all(seeds):
        states = []
        for seed in seeds:
            params, stats = init(seed, method, sizes)
            states.append((params, stats, opt.init(params)))
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    def loss_fn(params, stats, idx):
        logits, new_stats = forward(method, params, stats, x_train[idx], training=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_train[idx]).mean(), new_stats

    def step(state, idx):
        params, stats, opt_state = state
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, idx)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), loss

    def accuracy(state):
        params, stats, _ = state
        logits, _ = forward(method, params, stats, x_test, training=False)  # BN: running statistics
        return jnp.mean(jnp.argmax(logits, -1) == y_test)

    return init_all, jax.jit(jax.vmap(step)), jax.jit(jax.vmap(accuracy))


def train(method: str, data, seeds, idx: np.ndarray, *, lr: float, eval_every: int):
    """Train every seed of one method; idx is (seeds, steps, batch). Returns (losses, accuracies)."""
    init_fn, step_fn, acc_fn = make_fns(method, *data, lr=lr)
    state = init_fn(seeds)
    losses, accs = [], []
    for t in range(idx.shape[1]):
        state, loss = step_fn(state, idx[:, t])
        losses.append(loss)
        if (t + 1) % eval_every == 0:
            accs.append(acc_fn(state))
    return np.stack(jax.device_get(losses), axis=1), np.stack(jax.device_get(accs), axis=1)


def batch_indices(n_train: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch) indices: shuffled epochs without replacement, as an ordinary data loader."""
    rng = np.random.default_rng(seed)
    per_epoch = n_train // batch
    epochs = -(-steps // per_epoch)
    rows = [rng.permutation(n_train)[: per_epoch * batch].reshape(per_epoch, batch) for _ in range(epochs)]
    return np.concatenate(rows)[:steps]


def steps_to_target(accs: np.ndarray, eval_steps: np.ndarray, target: float) -> float:
    hit = np.nonzero(accs >= target)[0]
    return float(eval_steps[hit[0]]) if hit.size else float("nan")


def _pm(values) -> str:
    values = np.asarray(values, dtype=float)
    ok = values[np.isfinite(values)]
    if ok.size == 0:
        return "not reached"
    text = f"{ok.mean():.0f} ± {ok.std():.0f}" if ok.mean() > 1.5 else f"{ok.mean():.4f} ± {ok.std():.4f}"
    return text if ok.size == values.size else f"{text} (reached by {ok.size}/{values.size} seeds)"


def write_table(results: dict, args, path: pathlib.Path) -> str:
    lines = [
        f"Digits MLP 64-128-128-10, SGD lr={args.lr}, batch {args.batch}, {args.steps} steps, "
        f"{args.seeds} seeds (mean ± std); test accuracy every {args.eval_every} steps, BN with running "
        "statistics.",
        "",
        f"| method | steps to {args.target:.0%} test accuracy | final test accuracy | final train loss "
        f"(mean of last {args.eval_every} steps) |",
        "| --- | --- | --- | --- |",
    ]
    for method, r in results.items():
        steps = r["steps_to_target"]
        steps_text = _pm(steps) if np.isfinite(steps).any() else f"not reached in {args.steps}"
        lines.append(f"| {LABELS[method]} | {steps_text} | {_pm(r['final_accuracy'])} | {_pm(r['final_loss'])} |")
    table = "\n".join(lines) + "\n"
    path.write_text(table)
    return table


def plot(results: dict, args, path: pathlib.Path) -> None:
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, r in results.items():
        acc = np.asarray(r["accuracy"])
        (line,) = ax_acc.plot(r["eval_steps"], acc.mean(0), label=LABELS[method])
        ax_acc.fill_between(r["eval_steps"], acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
        loss = np.asarray(r["loss"]).mean(0)
        window = max(1, args.eval_every // 2)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax_loss.plot(np.arange(window, len(loss) + 1), smooth, label=LABELS[method], color=line.get_color())
    ax_acc.axhline(args.target, color="grey", ls=":", lw=1, label=f"target {args.target:.0%}")
    ax_acc.set(xlabel="training step", ylabel="test accuracy", title="Test accuracy (mean over seeds, band: min-max)")
    ax_acc.set_ylim(max(0.0, min(float(np.min(r["accuracy"])) for r in results.values()) - 0.02), 1.0)
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right")
    ax_loss.set(
        xlabel="training step", ylabel="training loss", yscale="log", title="Training loss (mean over seeds, smoothed)"
    )
    ax_loss.grid(alpha=0.3, which="both")
    ax_loss.legend(loc="upper right")
    fig.suptitle(f"Digits MLP, plain SGD lr={args.lr}, batch {args.batch}, {args.seeds} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (independent runs per setting)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps")
    parser.add_argument("--batch", type=int, default=64, help="mini-batch size")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate")
    parser.add_argument("--eval-every", type=int, default=25, help="evaluate every this many steps")
    parser.add_argument("--target", type=float, default=0.95, help="test accuracy that counts as reached")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("examples/out"), help="output folder for tables and figures"
    )
    parser.add_argument("--quick", action="store_true", help="a short run for the smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every = 2, 200, 20
    if args.steps % args.eval_every:
        parser.error("--steps must be a multiple of --eval-every")
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    x_train, x_test, y_train, y_test = (jnp.asarray(a) for a in load())
    n_evals = args.steps // args.eval_every
    idx = np.stack([batch_indices(len(x_train), args.batch, args.steps, 1000 + s) for s in range(args.seeds)])
    seeds = list(range(args.seeds))  # seed s: the same initial weights for every method
    eval_steps = np.arange(1, n_evals + 1) * args.eval_every

    results = {}
    for method in available_methods():
        data = (x_train, y_train, x_test, y_test)
        losses, accs = train(method, data, seeds, idx, lr=args.lr, eval_every=args.eval_every)
        results[method] = {
            "eval_steps": eval_steps,
            "loss": losses,  # (seeds, steps)
            "accuracy": accs,  # (seeds, n_evals)
            "steps_to_target": np.array([steps_to_target(a, eval_steps, args.target) for a in accs]),
            "final_accuracy": accs[:, -1],
            "final_loss": losses[:, -args.eval_every :].mean(1),
        }

    table = write_table(results, args, args.out / "exp_convergence.md")
    plot(results, args, args.out / "exp_convergence.png")
    print(table)
    print(f"wrote {args.out / 'exp_convergence.png'} and {args.out / 'exp_convergence.md'}")
    print(f"total {time.perf_counter() - start:.1f}s")
    return results


if __name__ == "__main__":
    main()
