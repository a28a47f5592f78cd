"""A PyTorch ResNet-18 converted to a Flax twin with bnjax layers, trained side by side, then folded.

The PyTorch model is written here with torchvision's layer names (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``, ...), so its ``state_dict`` is the one a
torchvision ResNet-18 has; torchvision's own model is used instead when torchvision imports. It
starts from a random initialization (no download). Then:

1. its ``state_dict`` is converted with ``bnjax.interop`` into the variables of a Flax linen
   twin (``flax.linen.Conv``/``Dense`` and ``bnjax.linen.BatchNorm`` with PyTorch's options:
   momentum 1 − 0.1, eps 1e-5, the unbiased running variance, ``num_batches_tracked`` as
   ``count``), and the evaluation logits of both are compared;
2. both train for ``--steps`` SGD steps on the same batches (each framework its own copy), and
   the running statistics and the evaluation logits are compared again;
3. the twin's batch norms are folded into the convolutions (``bnjax.linen.fold_batch_norms``),
   and the folded logits are compared with PyTorch's;
4. the trained twin is converted back to a PyTorch ``state_dict`` and loaded with ``strict=True``.

    python examples/torch_to_flax.py [--steps 3] [--batch 8] [--size 64] [--classes 10]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bnjax.interop
import bnjax.linen

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (width, stride of the first block) per stage
TORCH_MOMENTUM, EPS = 0.1, 1e-5


# ---------------------------------------------------------------------------------------------
# PyTorch: ResNet-18 with torchvision's names


def torch_resnet18(classes: int):
    import torch
    from torch import nn as tnn

    try:  # torchvision's own model, where it imports (its CPU build may not, see the README)
        import torchvision

        return torchvision.models.resnet18(num_classes=classes), "torchvision"
    except Exception:  # any import failure (e.g. its CPU build's missing operators): the twin below
        pass

    class BasicBlock(tnn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout)
            self.relu = tnn.ReLU(inplace=True)
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    class ResNet18(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = tnn.BatchNorm2d(64)
            self.relu = tnn.ReLU(inplace=True)
            self.maxpool = tnn.MaxPool2d(3, 2, 1)
            cin = 64
            for i, (width, stride) in enumerate(STAGES, start=1):
                setattr(self, f"layer{i}", tnn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)))
                cin = width
            self.avgpool = tnn.AdaptiveAvgPool2d(1)
            self.fc = tnn.Linear(512, classes)
            for m in self.modules():  # torchvision's initialization
                if isinstance(m, tnn.Conv2d):
                    tnn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for i in range(1, 5):
                x = getattr(self, f"layer{i}")(x)
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet18(), "written here"


# ---------------------------------------------------------------------------------------------
# Flax: the twin, module names = PyTorch's module paths


def _bn(train: bool, name: str) -> bnjax.linen.BatchNorm:
    return bnjax.linen.BatchNorm(
        use_running_average=not train,
        momentum=1 - TORCH_MOMENTUM,  # Flax's momentum weighs the old value, PyTorch's the new one
        epsilon=EPS,
        unbiased_running_var=True,  # PyTorch stores the unbiased batch variance in its EMA
        track_updates=True,  # count = num_batches_tracked
        name=name,
    )


class BasicBlock(nn.Module):
    width: int
    stride: int
    downsample: bool

    @nn.compact
    def __call__(self, x, train: bool):
        s = (self.stride, self.stride)
        identity = x
        if self.downsample:
            identity = nn.Conv(self.width, (1, 1), s, padding="VALID", use_bias=False, name="downsample.0")(x)
            identity = _bn(train, "downsample.1")(identity)
        out = nn.Conv(self.width, (3, 3), s, padding=((1, 1), (1, 1)), use_bias=False, name="conv1")(x)
        out = nn.relu(_bn(train, "bn1")(out))
        out = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv2")(out)
        return nn.relu(_bn(train, "bn2")(out) + identity)


class ResNet18(nn.Module):
    classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):  # x: NHWC
        x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, name="conv1")(x)
        x = nn.relu(_bn(train, "bn1")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        cin = 64
        for i, (width, stride) in enumerate(STAGES, start=1):
            for j in range(2):
                first = j == 0
                down = first and (stride != 1 or cin != width)
                x = BasicBlock(width, stride if first else 1, down, name=f"layer{i}.{j}")(x, train)
            cin = width
        return nn.Dense(self.classes, name="fc")(x.mean(axis=(1, 2)))


# ---------------------------------------------------------------------------------------------
# Conversion, by module path: the Flax module "layer1.0/conv1" is PyTorch's "layer1.0.conv1"


def _kind(name: str) -> str:
    if name.startswith("bn") or name == "downsample.1":
        return "bn"
    return "linear" if name == "fc" else "conv"


def _module_paths(variables) -> list[tuple[str, ...]]:
    flat = flax.traverse_util.flatten_dict(variables["params"])
    return sorted({path[:-1] for path in flat})


def from_torch(state, template) -> dict:
    """The twin's variables from a PyTorch state_dict (``template``: the twin's initial variables,
    whose module paths and shapes the result must have)."""
    convert = {
        "bn": bnjax.interop.from_torch_batch_norm,
        "conv": bnjax.interop.from_torch_conv,
        "linear": bnjax.interop.from_torch_linear,
    }
    out: dict = {"params": {}, "batch_stats": {}}
    for path in _module_paths(template):
        v = convert[_kind(path[-1])](state, ".".join(path))
        for collection, leaves in v.items():
            node = out[collection]
            for name in path:
                node = node.setdefault(name, {})
            node.update({k: jnp.asarray(a) for k, a in leaves.items()})
    same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, out, dict(template))
    assert all(jax.tree.leaves(same)), "the converted variables do not match the twin's"
    return out


def to_torch(variables) -> dict[str, np.ndarray]:
    convert = {
        "bn": bnjax.interop.to_torch_batch_norm,
        "conv": bnjax.interop.to_torch_conv,
        "linear": bnjax.interop.to_torch_linear,
    }
    state: dict[str, np.ndarray] = {}
    for path in _module_paths(variables):
        module = {c: _subtree(variables[c], path) for c in variables if _subtree(variables[c], path) is not None}
        state.update(convert[_kind(path[-1])](module, ".".join(path)))
    return state


def _subtree(tree, path):
    for name in path:
        if not isinstance(tree, dict) or name not in tree:
            return None
        tree = tree[name]
    return tree


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main(argv: Sequence[str] | None = None) -> dict:
    import optax
    import torch

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="training steps of both models")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--classes", type=int, default=10, help="classes")
    parser.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tmodel, origin = torch_resnet18(args.classes)
    twin = ResNet18(args.classes)

    def batch():
        x = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
        return x, rng.integers(0, args.classes, args.batch)

    nhwc = lambda x: jnp.asarray(x.transpose(0, 2, 3, 1))  # noqa: E731
    x_eval, _ = batch()
    template = jax.eval_shape(twin.init, jax.random.key(0), nhwc(x_eval))
    variables = from_torch({k: v for k, v in tmodel.state_dict().items()}, template)
    results: dict = {"torch_model": origin}

    def torch_eval(x):
        tmodel.eval()
        with torch.no_grad():
            return tmodel(torch.from_numpy(x)).numpy()

    flax_eval = jax.jit(lambda v, x: twin.apply(v, x, train=False))
    results["logits_rel_diff_converted"] = _relative(flax_eval(variables, nhwc(x_eval)), torch_eval(x_eval))

    # train both for a few steps on the same batches, each with its own copy of the weights
    topt = torch.optim.SGD(tmodel.parameters(), lr=args.lr)
    opt = optax.sgd(args.lr)
    opt_state = opt.init(variables["params"])

    @jax.jit
    def flax_step(variables, opt_state, x, y):
        def loss_fn(params):
            logits, upd = twin.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = opt.update(grads, opt_state, variables["params"])
        return {"params": optax.apply_updates(variables["params"], updates), "batch_stats": stats}, opt_state, loss

    losses = []
    for _ in range(args.steps):
        x, y = batch()
        tmodel.train()
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(y))
        tloss.backward()
        topt.step()
        variables, opt_state, loss = flax_step(variables, opt_state, nhwc(x), jnp.asarray(y))
        losses.append((tloss.item(), float(loss)))
    results["losses"] = losses
    trained = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    ours = to_torch(variables)
    stats_diff = {"running_mean": 0.0, "running_var": 0.0}
    for key, value in trained.items():
        kind = key.rsplit(".", 1)[-1]
        if kind in stats_diff:
            stats_diff[kind] = max(stats_diff[kind], _relative(ours[key], value))
        elif kind == "num_batches_tracked":
            assert int(ours[key]) == int(value) == args.steps, (key, ours[key], value)
    results["running_stats_rel_diff"] = stats_diff
    results["logits_rel_diff_trained"] = _relative(flax_eval(variables, nhwc(x_eval)), torch_eval(x_eval))

    # fold every batch norm into its convolution, and compare with PyTorch again
    folded = bnjax.linen.fold_batch_norms(twin, variables, nhwc(x_eval), train=False)
    results["folded_pairs"], results["kept"] = len(folded.pairs), folded.kept
    folded_logits = jax.jit(lambda v, x: folded.apply(v, x, train=False))(folded.variables, nhwc(x_eval))
    results["logits_rel_diff_folded"] = _relative(folded_logits, torch_eval(x_eval))

    # and back: the trained twin as a PyTorch state_dict, loaded strictly into a fresh model
    fresh, _ = torch_resnet18(args.classes)
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ours.items()}, strict=True)
    fresh.eval()
    with torch.no_grad():
        back = fresh(torch.from_numpy(x_eval)).numpy()
    results["logits_rel_diff_round_trip"] = _relative(back, flax_eval(variables, nhwc(x_eval)))

    print(f"PyTorch ResNet-18 ({origin}), {sum(p.numel() for p in tmodel.parameters()):,} parameters")
    print(f"input {args.batch}x3x{args.size}x{args.size}, {args.steps} SGD steps at lr {args.lr}\n")
    print("| comparison | max relative difference |")
    print("| --- | --- |")
    print(f"| eval logits after conversion | {results['logits_rel_diff_converted']:.2g} |")
    print(f"| running means after {args.steps} steps | {stats_diff['running_mean']:.2g} |")
    print(f"| running variances after {args.steps} steps | {stats_diff['running_var']:.2g} |")
    print(f"| eval logits after {args.steps} steps | {results['logits_rel_diff_trained']:.2g} |")
    print(f"| eval logits, {len(folded.pairs)} batch norms folded | {results['logits_rel_diff_folded']:.2g} |")
    print(f"| PyTorch logits of the twin's state_dict (strict load) | {results['logits_rel_diff_round_trip']:.2g} |")
    print(f"\nlosses (PyTorch, Flax): {', '.join(f'{a:.4f}/{b:.4f}' for a, b in losses)}")
    print(f"{time.perf_counter() - start:.1f}s in all")
    return results


if __name__ == "__main__":
    main()
