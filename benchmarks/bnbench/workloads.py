"""Part 1's workloads: the shapes, the modes, and the function each mode jits.

A mode is a key of ``MODES``: ``(layer, title)``. ``layer`` is the kind of layer the contenders
build (``contenders.Contender.layers`` says who has it) and picks the shapes; a key ending in
``train`` times the training step, any other the evaluation forward pass. Adding a workload: a
``MODES`` entry (and, for a new layer, its shapes here and its builders in ``contenders``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax

BN_SHAPES = [(64, 32, 32, 64), (256, 16, 16, 128), (32, 56, 56, 64), (4096, 1024)]
LN_SHAPES = [(64, 256, 512), (16, 1024, 1024)]
QUICK_BN_SHAPES = [(8, 8, 8, 16)]
QUICK_LN_SHAPES = [(8, 64)]
DTYPES = ("float32", "bfloat16")
LARGE = 8 * 2**20  # elements; workloads above this get fewer rounds
EPS = 1e-5
R_MAX, D_MAX = 3.0, 5.0  # batch renorm's bounds on r and |d| (the paper's final values)

MODES = {  # mode key -> (layer, title)
    "bn_train": ("bn", "Batch norm, training step (fwd + bwd + running statistics)"),
    "bn_eval": ("bn", "Batch norm, evaluation forward (running statistics)"),
    "renorm_train": (
        "renorm",
        f"Batch renorm, training step (r_max {R_MAX:g}, d_max {D_MAX:g}; fwd + bwd + running statistics)",
    ),
    "ln_train": ("ln", "Layer norm, training step (fwd + bwd)"),
    "ln_fwd": ("ln", "Layer norm, forward"),
}
SHAPES = {"bn": BN_SHAPES, "renorm": BN_SHAPES, "ln": LN_SHAPES}  # layer -> shapes
QUICK_SHAPES = {"bn": QUICK_BN_SHAPES, "renorm": QUICK_BN_SHAPES, "ln": QUICK_LN_SHAPES}


def is_training(mode: str) -> bool:
    return mode.endswith("train")


def stat_axes(layer: str, ndim: int) -> tuple[int, ...]:
    """The axes each statistic reduces over: all but the (last) feature axis for the batch norms,
    the last axis for layer norm."""
    return (ndim - 1,) if layer == "ln" else tuple(range(ndim - 1))


def workloads(quick: bool, repeats: int) -> Iterator[tuple[str, str, tuple[int, ...], str, int]]:
    """(mode, layer, shape, dtype, rounds) for every workload of part 1, in run order."""
    shapes = QUICK_SHAPES if quick else SHAPES
    for mode, (layer, _) in MODES.items():
        for shape in shapes[layer]:
            for dtype in DTYPES:
                yield mode, layer, shape, dtype, repeats if math.prod(shape) <= LARGE else max(3, (2 * repeats) // 3)


def train_step(apply):
    """The training step: vjp of y w.r.t. (x, params) against ct (= grad of sum(y * ct)), plus the
    updated state (running statistics), all returned from one jitted function."""

    def step(x, ct, params, state):
        y, vjp, new_state = jax.vjp(lambda x, p: apply(x, p, state, True), x, params, has_aux=True)
        dx, dparams = vjp(ct.astype(y.dtype))
        return dx, dparams, new_state

    return step


def eval_step(apply):
    def step(x, params, state):
        return apply(x, params, state, False)[0]

    return step


def step_fn(mode: str, apply):
    """The function ``mode`` jits for a layer's ``apply``; its arguments are ``step_args``."""
    return train_step(apply) if is_training(mode) else eval_step(apply)


def step_args(mode: str, x, ct, params, state) -> tuple:
    return (x, ct, params, state) if is_training(mode) else (x, params, state)
