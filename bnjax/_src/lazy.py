"""Work that runs only when its result is needed: the fallback of a fast computation.

``lazily(condition, value, recompute, *operands)`` is ``value`` where ``condition`` is False and
``recompute(*operands)`` where it is True, with recompute run only when needed. Used where a fast
result can overflow and a slower, scaled one must then replace it (see ``statistics``, "Range").

Why not ``lax.cond``: under ``vmap`` a cond whose condition is batched becomes a select, and both
branches run on every call. A while loop of at most one iteration runs its body only when some
member of the batch needs it (its batched condition is reduced with ``any``), and the members that
do not keep their value. Two details make the loop lazy in fact: XLA hoists loop-invariant
computations out of a while loop (the recompute would then run on every call), so the operands
enter the body through an optimization barrier together with the loop's condition; and a while
loop cannot be differentiated in reverse mode, so derivatives are taken through the equivalent
``lax.cond`` (a custom JVP; reverse mode is its transpose), whose values are the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._src import backend, collective

T = TypeVar("T")


def lazily(condition: jax.Array, value: T, recompute: Callable[..., T], *operands: Any) -> T:
    """``recompute(*operands)`` if ``condition`` (a scalar bool) else ``value``; recompute runs only
    when the condition holds (for a batched condition under ``vmap``: when it holds for some member).
    ``value`` and the result of recompute must have the same types. Every array recompute reads
    must be among the operands, and ``recompute`` must compare and hash by value (a NamedTuple
    of static settings with a ``__call__``, say): JAX caches the loop's traced body, and XLA's
    compiled program, by it, so that eager calls do not compile the loop anew each time."""
    # under shard_map(check_vma=True) the loop's condition must vary over the axes that the barrier
    # gives it (those of the operands): a cast, no data
    axes = frozenset().union(*(collective.varying_axes(v) for v in jax.tree.leaves((condition, operands))))
    return _lazily(recompute, collective.match_axes(condition, axes), value, operands)


@functools.cache
def _loop(recompute: Callable[..., Any], formulation: Any) -> tuple[Callable, Callable]:
    """The loop's condition and body for ``recompute``: one pair of function objects each, so that
    JAX's caches (keyed by function) hit. One pair per ``backend.force`` formulation too, since
    what recompute traces to depends on it and JAX's caches do not know that."""

    def condition(carry: tuple[jax.Array, Any, Any]) -> jax.Array:
        return carry[0]

    def body(carry: tuple[jax.Array, Any, Any]) -> tuple[jax.Array, Any, Any]:
        again, _, operands = carry
        again, inputs = lax.optimization_barrier((again, operands))
        return jnp.logical_and(again, False), recompute(*inputs), operands

    return condition, body


@functools.cache
def _branch(recompute: Callable[..., Any], formulation: Any) -> Callable:
    return lambda value, operands: recompute(*operands)


def _keep(value: Any, operands: Any) -> Any:
    return value


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _lazily(recompute: Callable[..., Any], condition: jax.Array, value: Any, operands: tuple[Any, ...]) -> Any:
    return lax.while_loop(*_loop(recompute, backend.forced()), (condition, value, operands))[1]


def _eager(recompute: Callable[..., Any], condition: jax.Array, value: Any, operands: tuple[Any, ...]) -> Any:
    return lax.cond(condition, _branch(recompute, backend.forced()), _keep, value, operands)


@_lazily.defjvp
def _lazily_jvp(recompute, primals, tangents):
    return jax.jvp(functools.partial(_eager, recompute), primals, tangents)
