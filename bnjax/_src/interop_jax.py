"""Batch-norm state from the other JAX libraries (Haiku, Equinox) to bnjax's Flax layout and back.

bnjax's Flax modules use Flax's layout: ``params = {"scale": (C,), "bias": (C,)}`` and
``batch_stats = {"mean": (C,), "var": (C,)}`` (plus ``count`` and ``skipped`` when the layer keeps
them). Both libraries below evaluate with a stored mean and (biased) variance, as bnjax does, so
an evaluation-mode layer converts exactly; their update rules in training differ from bnjax's
(see each function).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np


def _get(tree: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in tree:
        near = sorted(k for k in tree if k.split("/")[-1] == key.split("/")[-1] or key.split("/")[0] in k)
        raise KeyError(f"{what}: no {key!r}; found {near or sorted(tree)[:8]} (wrong name or prefix?).")
    return tree[key]


def _feature_vector(a: Any, key: str) -> jnp.ndarray:
    """Haiku's (1, ..., 1, C) parameter and state shapes as (C,)."""
    a = jnp.asarray(a)
    if a.ndim == 0 or any(d != 1 for d in a.shape[:-1]):
        raise ValueError(
            f"{key} has shape {a.shape}, expected (1, ..., 1, C): a batch norm over every axis but the last."
        )
    return a.reshape(a.shape[-1])


def from_haiku_batch_norm(
    params: Mapping[str, Any], state: Mapping[str, Any], *, name: str = "batch_norm", track_updates: bool = False
) -> dict[str, dict[str, Any]]:
    """Converts a ``haiku.BatchNorm``'s parameters and state to a bnjax BatchNorm's variables.

    Conventions: Haiku's ``scale``/``offset`` of shape (1, ..., 1, C) → ``scale``/``bias`` (C,);
    the debiased averages of its ``mean_ema``/``var_ema`` (``average``: what Haiku evaluates with,
    the biased variance) → ``mean``/``var``; the EMA ``counter`` → ``count`` (with
    ``track_updates=True``, which also adds ``skipped`` = 0). Haiku's ``decay_rate`` is the weight
    of the old value, as bnjax's ``momentum``. In training Haiku debiases a zero-started EMA, which
    no bnjax rule reproduces exactly (``debias=True`` is closest); evaluation agrees exactly.

    Args:
      params: the Haiku params (a mapping from module names to their parameters).
      state: the Haiku state (``name + "/~/mean_ema"`` and ``"/~/var_ema"`` entries).
      name: the module's full Haiku name, e.g. ``"resnet/~/batch_norm"``.
      track_updates: also return ``count`` and ``skipped`` (for a layer that keeps them).

    Returns:
      ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"[, "count", "skipped"]}}``,
      float32 statistics; a missing ``scale``/``offset`` (``create_scale=False``) is left out.

    Example:
      >>> import numpy as np, bnjax.interop
      >>> c = np.ones((1, 1, 1, 2), np.float32)
      >>> ema = lambda v: {"average": v * c, "hidden": v * c, "counter": np.int32(3)}
      >>> v = bnjax.interop.from_haiku_batch_norm({"batch_norm": {"scale": c, "offset": 0 * c}},
      ...     {"batch_norm/~/mean_ema": ema(0.5), "batch_norm/~/var_ema": ema(2.0)})
      >>> v["batch_stats"]["var"]
      Array([2., 2.], dtype=float32)

    References:
      Haiku's ``hk.BatchNorm`` and ``hk.ExponentialMovingAverage`` documentation.
    """
    p = _get(params, name, "from_haiku_batch_norm(params)")
    out_params = {}
    for theirs, ours in (("scale", "scale"), ("offset", "bias")):
        if theirs in p:
            out_params[ours] = _feature_vector(p[theirs], f"params[{name!r}][{theirs!r}]")
    stats: dict[str, Any] = {}
    counters = []
    for which in ("mean", "var"):
        key = f"{name}/~/{which}_ema"
        ema = _get(state, key, "from_haiku_batch_norm(state)")
        stats[which] = _feature_vector(_get(ema, "average", f"state[{key!r}]"), f"state[{key!r}]['average']")
        stats[which] = stats[which].astype(jnp.promote_types(stats[which].dtype, jnp.float32))
        counters.append(int(np.asarray(_get(ema, "counter", f"state[{key!r}]"))))
    if counters[0] != counters[1]:
        raise ValueError(f"from_haiku_batch_norm: the mean and var EMAs of {name!r} disagree on counter: {counters}.")
    if track_updates:
        stats["count"] = jnp.int32(counters[0])
        stats["skipped"] = jnp.zeros(stats["mean"].shape, jnp.int32)
    return {"params": out_params, "batch_stats": stats}


def to_haiku_batch_norm(
    variables: Mapping[str, Any], *, decay_rate: float, name: str = "batch_norm", ndim: int = 4, count: int = 1
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Converts a bnjax BatchNorm's variables to ``haiku.BatchNorm`` params and state.

    Conventions: ``scale``/``bias`` (C,) → ``scale``/``offset`` of shape (1, ..., 1, C) (``ndim``
    axes, the input's rank); ``mean``/``var`` → the EMAs' ``average``, with ``counter`` = the
    stored ``count`` (else ``count``, at least 1) and ``hidden`` = average·(1 − decay_rate^counter),
    so that Haiku's own training continues from the same statistics.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of one bnjax (or Flax) BatchNorm.
      decay_rate: the Haiku module's ``decay_rate`` (needed for ``hidden``).
      name: the Haiku module's full name.
      ndim: the rank of the layer's input (4 for NHWC).
      count: the counter to store when ``batch_stats`` has no ``count``.

    Returns:
      ``(params, state)`` for ``hk.transform_with_state(...).apply``.

    Example:
      >>> import numpy as np, bnjax.interop
      >>> v = {"params": {"scale": np.ones(2), "bias": np.zeros(2)},
      ...      "batch_stats": {"mean": np.zeros(2), "var": np.ones(2)}}
      >>> params, state = bnjax.interop.to_haiku_batch_norm(v, decay_rate=0.9)
      >>> params["batch_norm"]["scale"].shape, sorted(state)
      ((1, 1, 1, 2), ['batch_norm/~/mean_ema', 'batch_norm/~/var_ema'])

    References:
      Haiku's ``hk.BatchNorm`` and ``hk.ExponentialMovingAverage`` documentation.
    """
    p = _get(variables, "params", "to_haiku_batch_norm(variables)") if "params" in variables else {}
    s = _get(variables, "batch_stats", "to_haiku_batch_norm(variables)")
    shape = (1,) * (ndim - 1)
    params = {
        theirs: jnp.asarray(p[ours]).reshape((*shape, -1))
        for ours, theirs in (("scale", "scale"), ("bias", "offset"))
        if ours in p
    }
    n = int(np.asarray(s["count"])) if "count" in s else count
    n = max(n, 1)
    state = {}
    for which in ("mean", "var"):
        avg = jnp.asarray(_get(s, which, "to_haiku_batch_norm(batch_stats)"), jnp.float32).reshape((*shape, -1))
        state[f"{name}/~/{which}_ema"] = {
            "average": avg,
            "hidden": avg * jnp.float32(1 - decay_rate**n),
            "counter": jnp.int32(n),
        }
    return {name: params} if params else {}, state


def from_equinox_batch_norm(bn: Any, state: Any) -> dict[str, dict[str, Any]]:
    """Converts an ``equinox.nn.BatchNorm`` and its ``eqx.nn.State`` to a bnjax BatchNorm's variables.

    Conventions: ``weight``/``bias`` (C,) → ``scale``/``bias``; the running statistics → ``mean``/
    ``var``: in ``mode="ema"`` the stored running mean and variance, as Equinox evaluates with
    them (a layer never trained holds Equinox's initial buffers, mean 0 and var 0); in
    ``mode="batch"`` the zero-debiased ones Equinox evaluates with, hidden/(1 − momentum^counter).
    Equinox's ``momentum`` is the weight of the old value, as bnjax's. Evaluation agrees exactly;
    in training Equinox's ``"ema"`` mode normalizes with the updated running statistics, not the
    batch's, which no bnjax rule does.

    Returns:
      ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`` (no ``params`` entries
      without ``channelwise_affine``).

    Example:
      >>> import equinox as eqx, bnjax.interop
      >>> bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, axis_name="batch", mode="ema")
      >>> bnjax.interop.from_equinox_batch_norm(bn, state)["batch_stats"]["var"]  # never trained
      Array([0., 0., 0.], dtype=float32)

    References:
      Equinox's ``eqx.nn.BatchNorm`` documentation.
    """
    params = {}
    if bn.weight is not None:
        params["scale"] = jnp.asarray(bn.weight)
    if bn.bias is not None:
        params["bias"] = jnp.asarray(bn.bias)
    if bn.mode == "ema":
        mean, var = state.get(bn.ema_state_index)
    else:
        hidden_mean, hidden_var = state.get(bn.batch_state_index)
        counter = state.get(bn.batch_counter)
        scale = jnp.where(counter == 0, 1.0, 1.0 - bn.momentum ** counter.astype(jnp.float32))
        mean, var = hidden_mean / scale, hidden_var / scale
    f32 = jnp.promote_types(jnp.asarray(mean).dtype, jnp.float32)
    return {"params": params, "batch_stats": {"mean": jnp.asarray(mean, f32), "var": jnp.asarray(var, f32)}}


def to_equinox_batch_norm(variables: Mapping[str, Any], bn: Any, state: Any) -> tuple[Any, Any]:
    """Writes a bnjax BatchNorm's variables into an ``equinox.nn.BatchNorm`` (``mode="ema"``) and
    its state: ``scale``/``bias`` → ``weight``/``bias``, ``mean``/``var`` → the running
    statistics, marked as populated (not the first time). Returns ``(bn, state)``, new objects.

    Example:
      >>> import numpy as np, equinox as eqx, bnjax.interop
      >>> bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, axis_name="batch", mode="ema")
      >>> v = {"params": {"scale": np.full(2, 2.0), "bias": np.zeros(2)},
      ...      "batch_stats": {"mean": np.ones(2), "var": np.full(2, 4.0)}}
      >>> bn, state = bnjax.interop.to_equinox_batch_norm(v, bn, state)
      >>> state.get(bn.ema_state_index)[1]
      Array([4., 4.], dtype=float32)

    References:
      Equinox's ``eqx.nn.BatchNorm`` documentation.
    """
    import equinox as eqx

    if bn.mode != "ema":
        raise ValueError(
            f"to_equinox_batch_norm: the layer has mode={bn.mode!r}; only mode='ema' stores the statistics "
            "themselves (mode='batch' keeps zero-debiased hidden sums)."
        )
    s = _get(variables, "batch_stats", "to_equinox_batch_norm(variables)")
    running = state.get(bn.ema_state_index)
    new = []
    for which, old in zip(("mean", "var"), running, strict=True):
        value = jnp.asarray(_get(s, which, "to_equinox_batch_norm(batch_stats)"), old.dtype)
        if value.shape != old.shape:
            raise ValueError(
                f"to_equinox_batch_norm: batch_stats[{which!r}] has shape {value.shape}, the layer {old.shape}."
            )
        new.append(value)
    state = state.set(bn.ema_state_index, tuple(new)).set(bn.ema_first_time_index, jnp.array(False))
    p = variables.get("params", {})
    if bn.weight is not None and "scale" in p:
        bn = eqx.tree_at(lambda m: m.weight, bn, jnp.asarray(p["scale"], bn.weight.dtype))
    if bn.bias is not None and "bias" in p:
        bn = eqx.tree_at(lambda m: m.bias, bn, jnp.asarray(p["bias"], bn.bias.dtype))
    return bn, state
