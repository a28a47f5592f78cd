"""The one place that talks across devices.

Statistics are merged across a named mapped axis (``pmap``, ``shard_map``, ``vmap(axis_name=...)``)
by gathering every participant's sufficient statistics (count, mean, M2) and merging them with the
same deterministic arithmetic on every participant. The gather is written as a single ``psum`` of
a one-hot slotted buffer: one collective, and a result that is replicated by construction (so
``shard_map(check_vma=True)`` accepts it as unvarying). The closed-form backward pass sends its
two per-feature sums in one more collective (``group_sum``); under autodiff (``vmap`` axes,
``fused_backward=False``) the transpose of the gather's ``psum`` is again a single ``psum``.

Device groups need no collective of their own: every participant already holds every part, and
merges only the parts of its own group.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

AxisName = str | Sequence[str]
Groups = Sequence[Sequence[int]]


def static_groups(axis_index_groups: Groups | None) -> tuple[tuple[int, ...], ...] | None:
    """``axis_index_groups`` as nested tuples of ints: hashable, for the settings of a custom VJP
    or of a ``lazily`` fallback, which JAX caches by value."""
    return None if axis_index_groups is None else tuple(tuple(int(i) for i in g) for g in axis_index_groups)


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


def linear_index(axis_name: AxisName) -> jax.Array:
    """Row-major index of this participant over the names (the slot it fills in a gather).

    Built from one ``axis_index`` per name, so the order is the order of ``axis_name``.
    """
    index = jnp.zeros((), jnp.int32)
    for name in _names(axis_name):
        index = index * axis_size(name) + lax.axis_index(name)
    return index


def group_matrix(axis_index_groups: Groups, size: int) -> np.ndarray:
    """Static (size, size) boolean matrix: entry [i, j] is True when i and j share a group.

    Raises unless the groups partition ``range(size)``: every index in exactly one group.
    """
    try:
        groups = [[int(i) for i in g] for g in axis_index_groups]
    except TypeError as e:
        raise TypeError(f"axis_index_groups must be a list of lists of ints, got {axis_index_groups!r}.") from e
    flat = [i for g in groups for i in g]
    if sorted(flat) != list(range(size)) or any(not g for g in groups):
        missing = sorted(set(range(size)) - set(flat))
        repeated = sorted({i for i in flat if flat.count(i) > 1})
        outside = sorted({i for i in flat if not 0 <= i < size})
        raise ValueError(
            f"axis_index_groups={axis_index_groups!r} must partition the {size} participants of the "
            f"axis into non-empty groups (each index 0..{size - 1} exactly once); missing: {missing}, "
            f"repeated: {repeated}, out of range: {outside}. Example for {size} participants in pairs: "
            f"{[list(range(i, min(i + 2, size))) for i in range(0, size, 2)]}."
        )
    member = np.zeros((size, size), bool)
    for g in groups:
        member[np.ix_(g, g)] = True
    return member


def my_group(axis_name: AxisName, axis_index_groups: Groups) -> jax.Array:
    """(axis_size,) boolean row: which participants share this participant's group."""
    names = _names(axis_name)
    member = group_matrix(axis_index_groups, axis_size(names))
    return jnp.asarray(member)[linear_index(names)]


def gather_replicated(values: jax.Array, axis_name: AxisName) -> jax.Array:
    """Stacks every participant's ``values`` along a new leading axis, identically on all of them.

    Returns an array of shape ``(axis_size,) + values.shape``; row i holds participant i's values.
    ``where`` (not a multiply) fills the other rows so a NaN on one participant stays in its row.
    """
    names = _names(axis_name)
    size = axis_size(names)
    index = linear_index(names)
    slot = (jnp.arange(size) == index).reshape((size,) + (1,) * values.ndim)
    slotted = jnp.where(slot, values[None], jnp.zeros((), values.dtype))
    try:
        return lax.psum(slotted, names if len(names) > 1 else names[0])
    except (AssertionError, ValueError) as e:
        # jax 0.10, a vmap axis inside shard_map(check_vma=True): an AssertionError in pvary for a
        # vmap name alone, a ValueError about the "state of the input" for mesh and vmap names mixed
        if isinstance(e, ValueError) and "state of the input" not in str(e):
            raise
        raise ValueError(
            f"axis_name={axis_name!r}: JAX could not reduce over these axes here. A known JAX "
            "limitation: collectives over a vmap axis inside jax.shard_map fail when check_vma=True "
            "(the default). Pass check_vma=False to shard_map, or make the vmapped axis a mesh axis "
            "(a 2-D mesh and axis_name=(mesh_axis_1, mesh_axis_2))."
        ) from e


def group_sum(
    values: tuple[jax.Array, ...], axis_name: AxisName, axis_index_groups: Groups | None = None
) -> tuple[jax.Array, ...]:
    """Σ of each of ``values`` over the participants of ``axis_name`` (of this participant's group
    only, when groups are given), all in one collective: a ``psum`` of the tuple (one all-reduce),
    or with groups a slotted gather (``gather_replicated``) summed over the group, since ``psum``'s
    own groups work only under pmap.
    """
    names = _names(axis_name)
    axis_size(names)  # a clear error for an unbound name
    if axis_index_groups is None:
        return tuple(lax.psum(tuple(values), names if len(names) > 1 else names[0]))
    parts = gather_replicated(jnp.stack(values), axis_name)
    include = my_group(axis_name, axis_index_groups).reshape((-1,) + (1,) * (parts.ndim - 1))
    total = jnp.sum(jnp.where(include, parts, jnp.zeros((), parts.dtype)), axis=0)
    return tuple(total[i] for i in range(len(values)))


def varying_axes(like: jax.Array) -> frozenset[str]:
    """The ``shard_map``/``pmap`` axes that ``like`` varies over (empty outside them).

    JAX has spelled this two ways within bnjax's supported range: ``aval.vma`` (a frozenset) and,
    in jax 0.10, ``aval.manual_axis_type.varying``. A JAX with neither raises here rather than
    answering "none": a silent empty answer would switch off the fused backward pass under
    ``shard_map`` (``tests/test_backward.py`` checks that the custom VJP runs there).
    """
    aval = jax.typeof(like)
    vma = getattr(aval, "vma", None)
    if vma is not None:
        return frozenset(vma)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    raise RuntimeError(
        f"bnjax cannot tell which mapped axes an array varies over with jax {jax.__version__} "
        f"({type(aval).__name__} has neither 'vma' nor 'manual_axis_type'); please report this. "
        "Meanwhile fused_backward=False avoids the question."
    )


def is_manual(axis_name: AxisName) -> bool:
    """Whether every name is a mesh axis of an enclosing ``shard_map`` (``pmap`` is one in jax ≥
    0.10), as opposed to a ``vmap`` axis: read off the abstract mesh, whose manual axes are
    exactly those, whether or not ``check_vma`` is on. Raises if this JAX's mesh does not say."""
    mesh = jax.sharding.get_abstract_mesh()
    manual = getattr(mesh, "manual_axes", None)
    if manual is None:
        raise RuntimeError(
            f"bnjax cannot tell shard_map axes from vmap axes with jax {jax.__version__} (its abstract "
            "mesh has no 'manual_axes'); please report this. Meanwhile fused_backward=False avoids the question."
        )
    return set(_names(axis_name)) <= set(manual)


def match_varying(value: jax.Array, like: jax.Array) -> jax.Array:
    """Marks ``value`` as varying over the same ``shard_map`` axes as ``like`` (a no-op elsewhere).

    A custom VJP under ``shard_map(check_vma=True)`` must return each cotangent with its primal's
    type; the cotangent of a replicated parameter is this device's share (varying), so the
    parameter enters varying and JAX sums the shares when it transposes this cast.
    """
    return match_axes(value, varying_axes(like))


def match_axes(value: jax.Array, axes: frozenset[str]) -> jax.Array:
    """Marks ``value`` as varying over ``axes`` too (a cast, no data; a no-op where it already is)."""
    missing = tuple(sorted(axes - varying_axes(value)))
    return lax.pcast(value, missing, to="varying") if missing else value
