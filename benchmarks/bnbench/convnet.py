"""Part 2: one SGD train step of a small ConvNet with each batch norm and without normalization
(compile time, XLA's memory analysis, step time), and its BN layers timed on their own."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .contenders import JAX_BUILDERS, JaxNorm, cached, make_equinox
from .timing import Timed, compile_timed, device_array, round_robin, summarize
from .workloads import train_step

CONV_BUILDERS: dict[str, Callable[..., JaxNorm] | None] = {
    "no BN": None,
    **{name: JAX_BUILDERS[name] for name in ("bnjax", "bnjax (autodiff)", "flax.linen", "flax.nnx", "haiku")},
    "equinox": cached(make_equinox, channels_first=False),  # NHWC activations: per-example transposes
}


def convnet(builder, widths: Sequence[int], strides: Sequence[int], in_ch: int, classes: int, lr: float = 0.05):
    """(params, state, step): a ConvNet of 3x3 convs (no conv bias), each followed by the norm (if
    any) and ReLU, then global average pooling and a dense classifier; one SGD train step."""
    rng = np.random.default_rng(0)  # host-side initialization (He normal): no XLA programs to compile
    kernels, chans = [], in_ch
    for w in widths:
        kernels.append(device_array(rng.standard_normal((3, 3, chans, w)) * math.sqrt(2.0 / (9 * chans)), jnp.float32))
        chans = w
    dense = {
        "w": device_array(rng.standard_normal((chans, classes)) / math.sqrt(chans), jnp.float32),
        "b": device_array(np.zeros((classes,)), jnp.float32),
    }
    norms = [builder("bn", w, 4, jnp.float32) for w in widths] if builder is not None else []
    params = {"conv": kernels, "norm": [n.params for n in norms], "dense": dense}
    state = [n.state for n in norms]

    def loss_fn(params, state, x, labels):
        h, new_state = x, []
        for i, (kernel, s) in enumerate(zip(params["conv"], strides, strict=True)):
            h = lax.conv_general_dilated(h, kernel, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            if norms:
                h, st = norms[i].apply(h, params["norm"][i], state[i], True)
                new_state.append(st)
            h = jax.nn.relu(h)
        feats = jnp.mean(h, axis=(1, 2))
        logits = feats @ params["dense"]["w"] + params["dense"]["b"][None, :]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1)), new_state

    def step(params, state, x, labels):
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, labels)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return params, new_state, loss

    return params, state, step


def run_convnet(quick: bool, repeats: int, skipped: dict[str, str], errors: list) -> dict[str, Any]:
    if quick:
        batch, hw, widths = 16, 16, (8, 8, 16, 16)
    else:
        batch, hw, widths = 128, 32, (32, 32, 64, 64)
    strides, classes = (1, 1, 2, 2), 10
    rng = np.random.default_rng(1)
    x = device_array(rng.standard_normal((batch, hw, hw, 3)), jnp.float32)
    labels = device_array(rng.integers(0, classes, batch), jnp.int32)
    contenders, info = {}, {}
    for name, builder in CONV_BUILDERS.items():
        if name in skipped:
            continue
        try:
            params, state, step = convnet(builder, widths, strides, 3, classes)
            args = (params, state, x, labels)
            compiled, secs, mem = compile_timed(step, args)
            out = jax.block_until_ready(compiled(*args))
            if not np.isfinite(float(out[2])):
                raise FloatingPointError(f"non-finite loss {out[2]}")
        except Exception as e:
            errors.append({"contender": name, "workload": ["convnet"], "error": repr(e)})
            print(f"  ! convnet {name}: {e!r}", file=sys.stderr)
            continue
        contenders[name] = Timed(lambda compiled=compiled, args=args: compiled(*args))
        info[name] = {"compile_s": secs, "memory": mem}
    times = round_robin(contenders, repeats)
    rows = {name: {**info[name], **summarize(ts)} for name, ts in times.items()}
    n_bn = len(widths)
    base = rows.get("no BN")
    for name, r in rows.items():
        if base is None or name == "no BN":
            continue
        r["per_bn_layer"] = {
            "time_ms": (r["median_ms"] - base["median_ms"]) / n_bn,
            "time_from_min_ms": (r["min_ms"] - base["min_ms"]) / n_bn,  # less sensitive to other load
            "temp_bytes": (r["memory"].get("temp_size_in_bytes", 0) - base["memory"].get("temp_size_in_bytes", 0))
            / n_bn,
        }
    vs_flax: dict[str, float | None] = {}
    if "bnjax" in rows and "flax.linen" in rows and "per_bn_layer" in rows["bnjax"]:
        for k in ("time_ms", "temp_bytes"):
            num, den = rows["bnjax"]["per_bn_layer"][k], rows["flax.linen"]["per_bn_layer"][k]
            vs_flax[k] = num / den if den > 0 else None  # undefined when Flax's cost is ≤ 0 (noise)
    return {
        "batch": batch,
        "input": [batch, hw, hw, 3],
        "widths": list(widths),
        "strides": list(strides),
        "bn_layers": n_bn,
        "dtype": "float32",
        "repeats": repeats,
        "contenders": rows,
        "bnjax_per_layer_to_flax_linen": vs_flax,
    }


def _with_relu(apply):
    """The layer as it sits in the ConvNet: the norm, then ReLU (its backward pass included)."""

    def layer(x, params, state, training):
        y, new_state = apply(x, params, state, training)
        return jax.nn.relu(y), new_state

    return layer


def run_conv_layers(conv: dict[str, Any], repeats: int, skipped: dict[str, str], errors: list) -> dict[str, Any]:
    """The ConvNet's BN layers on their own: BN → ReLU training step (vjp against a random
    cotangent, running statistics) at each layer's activation shape, every contender of the
    ConvNet, interleaved. The whole step's time is mostly convolutions, whose noise on a shared
    CPU is larger than a BN layer's cost; this measures the BN layers' cost directly."""
    batch, hw = conv["batch"], conv["input"][1]
    shapes = []
    for w, s in zip(conv["widths"], conv["strides"], strict=True):
        hw = -(-hw // s)  # "SAME" padding
        shapes.append((batch, hw, hw, w))
    layers = []
    for shape in shapes:
        rng = np.random.default_rng(2)
        x_np = rng.standard_normal(shape, dtype=np.float32)
        ct_np = rng.standard_normal(shape, dtype=np.float32)
        contenders: dict[str, Timed] = {}
        for name, builder in CONV_BUILDERS.items():
            if builder is None or name in skipped:
                continue
            try:
                norm = builder("bn", shape[-1], 4, jnp.float32)
                xs, cts = (device_array(a, jnp.float32) for a in (x_np, ct_np))
                args = (xs, cts, norm.params, norm.state)
                compiled, _, _ = compile_timed(train_step(_with_relu(norm.apply)), args)
                jax.block_until_ready(compiled(*args))
            except Exception as e:
                errors.append({"contender": name, "workload": ["conv layer", list(shape)], "error": repr(e)})
                print(f"  ! conv layer {name}: {e!r}", file=sys.stderr)
                continue
            contenders[name] = Timed(lambda compiled=compiled, args=args: compiled(*args))
        times = round_robin(contenders, repeats)
        layers.append({"shape": list(shape), "contenders": {n: summarize(ts) for n, ts in times.items()}})
    names = [n for n in CONV_BUILDERS if all(n in layer["contenders"] for layer in layers)]
    total = {n: sum(layer["contenders"][n]["median_ms"] for layer in layers) for n in names}
    flax = total.get("flax.linen")
    return {
        "repeats": repeats,
        "layers": layers,
        "sum_of_medians_ms": total,
        "to_flax_linen": {n: (t / flax if flax else None) for n, t in total.items()},
    }
