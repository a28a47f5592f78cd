"""The one place where bnjax spells its computations for a particular XLA backend.

Every formulation here computes the same expression on every backend: what differs is only how
XLA is steered to fuse it. The results agree to a few units in the last place (XLA may order a
reduction differently when it fuses differently), and bit for bit where nothing is reduced. Two
spellings are in use, both for XLA:CPU (jax 0.10's CPU compiler):

``separate(*operands)``: the operands go through one ``lax.optimization_barrier``, so that XLA
cannot identify them with each other or with equal values elsewhere. XLA's common-subexpression
elimination merges equal expressions (even two converts of bfloat16 x to float32, or two
broadcasts of g); on CPU the merged value then feeds two loops and is written out to memory as a
full x-sized float32 array instead of being recomputed inside each loop. Used where one pass over
x would otherwise share its x − K, its float32 x or its broadcast g with another pass: the two
statistics passes of the columns method and the backward passes of the fused VJP.

``minus(x, c)``: x − c spelled x + (−c) (the same IEEE result). The output is spelled (x − c) − r;
a second x − c in the statistics would be merged with it and written out, as above.

On every other backend the plain formulation is compiled: no barrier, x − c. GPU and TPU fuse
differently, and a barrier there could only block fusions XLA would otherwise make. The choice is
made by ``lax.platform_dependent`` when the program is lowered for its platform, so a function
traced once and lowered (or exported) for another backend gets that backend's formulation.

To check whether a CPU spelling still pays on a newer XLA, compile the same call in both
formulations (``with backend.force("plain"):``) and compare XLA's temporary memory
(``compiled.memory_analysis().temp_size_in_bytes``) and the time: the benchmark suite has the
contender "bnjax (plain)" for this, run in the same rounds as the default, and
``tests/test_backend.py`` fails when the memory they save is no longer saved. Measured with jax
0.10.2 (XLA temporaries of a training step, forward and backward, cotangent given): layer norm of
(64, 256, 512) takes 0.25 MiB with the CPU spellings and 64 MiB (float32) or 96 MiB (bfloat16)
without, that is two or three float32 copies of x; batch norm of bfloat16 (64, 32, 32, 64) takes
0 against 32 MiB (x in float32). Float32 batch norm needs no temporary either way.

``force`` exists for those comparisons and for the tests, which run both formulations on CPU and
require the same numbers to within 4 units in the last place of each output's scale.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax
from jax import lax

from bnjax._src import collective

Formulation = Literal["cpu", "plain"]
FORMULATIONS: tuple[Formulation, ...] = ("cpu", "plain")

_forced: contextvars.ContextVar[Formulation | None] = contextvars.ContextVar("bnjax_formulation", default=None)


@contextlib.contextmanager
def force(formulation: Formulation) -> Iterator[None]:
    """Within the block, functions traced use ``formulation`` whatever the platform ("cpu": XLA:CPU's
    spellings; "plain": the one for every other backend). The expression is the same; only the
    compiled program differs (and with it, possibly, the order of a reduction's additions).
    Affects tracing only: a function jitted before keeps its cached program unless its arguments
    change."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}.")
    token = _forced.set(formulation)
    try:
        yield
    finally:
        _forced.reset(token)


def forced() -> Formulation | None:
    """The formulation ``force`` imposes now, or ``None`` (chosen per platform at lowering)."""
    return _forced.get()


def choose(cpu: Callable[..., Any], plain: Callable[..., Any], *args: Any) -> Any:
    """``cpu(*args)`` in programs lowered for CPU, ``plain(*args)`` for every other platform (or the
    one ``force`` imposes). Both must compute the same values, with the same output types."""
    which = _forced.get()
    if which == "cpu":
        return cpu(*args)
    if which == "plain":
        return plain(*args)
    return lax.platform_dependent(*args, cpu=cpu, default=plain)


def _barrier(*operands: Any) -> Any:
    return lax.optimization_barrier(operands)


def _joined(*operands: Any) -> Any:
    """The operands, with the types the barrier gives them: under ``shard_map(check_vma=True)`` an
    optimization barrier makes every operand vary over the union of the operands' varying axes,
    and both branches of the platform switch must have the same output types. A cast, no data."""
    leaves, tree = jax.tree.flatten(operands)
    union = frozenset().union(*(collective.varying_axes(v) for v in leaves))
    return jax.tree.unflatten(tree, [collective.match_axes(v, union) for v in leaves])


def separate(*operands: Any) -> Any:
    """The operands (a tuple, pytrees allowed), unchanged; on CPU through one optimization barrier,
    so that XLA may not identify them with each other or with equal values elsewhere."""
    return choose(_barrier, _joined, *operands)


def _plus_negated(x: Any, c: Any) -> Any:
    return x + (-c)


def _minus(x: Any, c: Any) -> Any:
    return x - c


def minus(x: Any, c: Any) -> Any:
    """x − c; on CPU spelled x + (−c), so that XLA does not merge it with another x − c."""
    return choose(_plus_negated, _minus, x, c)
