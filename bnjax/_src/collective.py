"""The one place that talks across devices.

Statistics are merged across a named mapped axis (``pmap``, ``shard_map``, ``vmap(axis_name=...)``)
by gathering every participant's sufficient statistics (count, mean, M2) and merging them with the
same deterministic arithmetic on every participant. The gather is written as a single ``psum`` of
a one-hot slotted buffer: one collective, a result that is replicated by construction (so
``shard_map(check_vma=True)`` accepts it as unvarying), and one ``psum`` again in the backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

AxisName = str | Sequence[str]


def _names(axis_name: AxisName) -> tuple[str, ...]:
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def axis_size(axis_name: AxisName) -> int:
    """Static number of participants in ``axis_name``; a clear error if a name is not bound."""
    size = 1
    for name in _names(axis_name):
        try:
            size *= int(lax.axis_size(name))
        except NameError as e:
            raise ValueError(
                f"axis_name={axis_name!r}: the axis {name!r} is not bound here. Batch statistics "
                "across devices need the call to run inside a transform that binds that name: "
                f"jax.pmap(..., axis_name={name!r}), jax.shard_map over a mesh with an axis {name!r}, "
                f"or jax.vmap(..., axis_name={name!r}). Under plain jax.jit over sharded arrays, pass "
                "axis_name=None: XLA then computes the global statistics itself."
            ) from e
    return size


def gather_replicated(values: jax.Array, axis_name: AxisName) -> jax.Array:
    """Stacks every participant's ``values`` along a new leading axis, identically on all of them.

    Returns an array of shape ``(axis_size,) + values.shape``; row i holds participant i's values.
    ``where`` (not a multiply) fills the other rows so a NaN on one participant stays in its row.
    """
    names = _names(axis_name)
    size = axis_size(names)
    index = lax.axis_index(names if len(names) > 1 else names[0])
    slot = (jnp.arange(size) == index).reshape((size,) + (1,) * values.ndim)
    slotted = jnp.where(slot, values[None], jnp.zeros((), values.dtype))
    return lax.psum(slotted, names if len(names) > 1 else names[0])
