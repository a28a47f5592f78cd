"""Deployment: an evaluation-mode batch norm folded into the dense or conv layer before it.

In evaluation, batch norm is a fixed affine map per output feature, y = s·z + (b − s·μ) with
s = g/√(σ² + ε) (μ, σ² the running statistics). Applied to z = W∗x + c it is again a dense or
conv layer: W' = s·W along W's output-feature axis, c' = s·(c − μ) + b. Grouped and depthwise
convolutions fold the same way, since each output channel still has its own slice of W.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Literal
from jax.typing import ArrayLike

from bnjax._src.params import NormParams
from bnjax._src.validation import canonical_axes, check_eps, check_floating


def _field(container: Any, name: str, what: str) -> Any:
    if container is None:
        return None
    if isinstance(container, Mapping):
        if name not in container:
            raise KeyError(f"fold_batch_norm: {what} has no {name!r} (keys: {sorted(container)}).")
        return container[name]
    if not hasattr(container, name):
        raise TypeError(
            f"fold_batch_norm: {what} must be a bnjax.{'NormParams' if what == 'params' else 'BatchStats'} "
            f"or a mapping with {name!r}, got {type(container).__name__}."
        )
    return getattr(container, name)


def fold_batch_norm(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    params: NormParams | Mapping[str, Any] | None,
    stats: Any,
    *,
    eps: float = 1e-5,
    axis: int = -1,
) -> tuple[jax.Array, jax.Array]:
    """Folds an evaluation-mode batch norm into the dense or conv layer that feeds it.

    Math: with s = g/√(σ² + ε) per output feature (μ, σ² the running statistics as stored),

        BN(W∗x + c) = (s·W)∗x + (s·(c − μ) + b)

    so the folded layer has kernel W' = s·W (s applied along ``axis``, the output features) and
    bias c' = s·(c − μ) + b. Exact up to float32 rounding: s and c' are computed in float32 (or
    the kernel's wider dtype), W' is returned in the kernel's dtype, c' in float32 or wider.

    Args:
      kernel: the layer's weight, with the output features on ``axis``: Flax's Dense (in, out)
        and Conv (..., in/groups, out) with ``axis=-1``; PyTorch's Linear (out, in) and Conv
        (out, in/groups, ...) with ``axis=0``. Grouped and depthwise kernels fold the same way.
      bias: the layer's bias (C,), or ``None`` for a layer without one (c = 0).
      params: the batch norm's ``NormParams`` (g, b), a mapping with ``scale``/``bias`` (Flax's
        ``params`` of the layer), or ``None`` (g = 1, b = 0); either entry may be ``None``.
      stats: the running statistics: a ``BatchStats`` (or ``AccumulatingStats``) or a mapping
        with ``mean`` and ``var`` (Flax's ``batch_stats`` of the layer), each (C,).
      eps: the batch norm's ε (Flax's ``epsilon``, PyTorch's ``eps``).
      axis: the kernel's output-feature axis.

    Returns:
      ``(kernel', bias')``: kernel' of the kernel's shape and dtype; bias' of shape (C,).

    Example:
      >>> import jax.numpy as jnp, bnjax
      >>> w, c = jnp.ones((2, 3)), jnp.zeros(3)
      >>> stats = bnjax.BatchStats(jnp.array([1.0, 2.0, 3.0]), jnp.full(3, 4.0), jnp.int32(1))
      >>> w2, c2 = bnjax.fold_batch_norm(w, c, None, stats, eps=1e-5)  # s = 1/sqrt(4 + eps)
      >>> jnp.round(w2[0], 4), jnp.round(c2, 4)
      (Array([0.5, 0.5, 0.5], dtype=float32), Array([-0.5, -1. , -1.5], dtype=float32))

    References:
      Ioffe & Szegedy 2015, "Batch Normalization", §3.1 (the inference transform is linear);
      Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
      Integer-Arithmetic-Only Inference", §3.2 (batch normalization folding).
    """
    kernel = check_floating(kernel, "kernel")
    (ax,) = canonical_axes(axis, kernel.ndim, name="axis", shape=kernel.shape)
    c = kernel.shape[ax]
    work = jnp.promote_types(kernel.dtype, jnp.float32)
    check_eps(eps, work)
    mean, var = _field(stats, "mean", "stats"), _field(stats, "var", "stats")
    scale, shift = _field(params, "scale", "params"), _field(params, "bias", "params")
    named = {"bias": bias, "params.scale": scale, "params.bias": shift, "stats.mean": mean, "stats.var": var}
    for name, value in named.items():
        if value is not None and jnp.shape(value) != (c,):
            raise ValueError(
                f"fold_batch_norm: {name} has shape {jnp.shape(value)} but the kernel {kernel.shape} has {c} "
                f"output features on axis={axis} (Flax: -1, PyTorch: 0): pass the batch norm that follows "
                "this layer, or the kernel's output axis."
            )
    if mean is None or var is None:
        raise ValueError("fold_batch_norm: stats needs both mean and var (the running statistics).")
    concrete = not any(isinstance(v, jax.core.Tracer) for v in (mean, var))
    if concrete and not (bool(jnp.all(jnp.isfinite(jnp.asarray(mean)))) and bool(jnp.all(jnp.asarray(var) >= 0))):
        raise ValueError(
            "fold_batch_norm: the running statistics hold a non-finite mean or a negative or non-finite var: "
            "the folded layer would compute NaN. Check stats (e.g. stats.skipped for skipped updates)."
        )
    s = jax.lax.rsqrt(jnp.asarray(var, work) + jnp.asarray(eps, work))
    if scale is not None:
        s = s * jnp.asarray(scale, work)
    c_in = jnp.zeros((c,), work) if bias is None else jnp.asarray(bias, work)
    new_bias = s * (c_in - jnp.asarray(mean, work))
    if shift is not None:
        new_bias = new_bias + jnp.asarray(shift, work)
    shape = [1] * kernel.ndim
    shape[ax] = c
    new_kernel = (kernel.astype(work) * s.reshape(shape)).astype(kernel.dtype)
    return new_kernel, new_bias


def used_inputs(closed_jaxpr: Any) -> list[bool]:
    """For each input of a traced function, whether its outputs depend on it structurally (a
    backward walk from the outputs over the equations; an equation with any needed output needs
    all its inputs, so nested calls count conservatively). The whole-model folding uses it to
    prove that a layer's output feeds nothing but the batch norm after it."""
    jaxpr = closed_jaxpr.jaxpr
    needed = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars):
            needed.update(v for v in eqn.invars if not isinstance(v, Literal))
    return [v in needed for v in jaxpr.invars]


Hook = Callable[[Any, Any, Callable[..., Any], tuple, dict], Any]


def find_pairs(
    run: Callable[[Hook], Any],
    kind: Callable[[Any], str | None],
    unfoldable: Callable[[Any, tuple, dict], str],
) -> tuple[list[tuple[Any, Any, Any]], dict[Any, str]]:
    """The batch norms of a model that can be folded into the layer before them (linen and nnx).

    ``run(hook)`` runs the model once with every module call routed through
    ``hook(key, module, call, args, kwargs)`` (``key``: the module's path; ``call``: the call
    itself); ``kind(module)`` is ``"bn"``, ``"layer"`` (a Dense or Conv) or None;
    ``unfoldable(bn, args, kwargs)`` says why a batch norm cannot be folded ('' if it can).

    A pair (batch norm, layer) is folded when the batch norm's input is the layer's output (the
    same traced value), both are called once, and the rest of the model does not read that
    output: proved by a second trace in which the rest sees output + e and the batch norm the
    output itself, and the traced computation does not use e (``used_inputs``).

    Returns ([(bn key, layer key, bn module)], {bn key: why it is kept})."""
    calls: dict[Any, int] = {}
    outputs: dict[int, tuple[Any, Any]] = {}  # id(layer output) -> (layer key, the output, kept alive)
    found: list[tuple[Any, Any, Any, Any]] = []
    kept: dict[Any, str] = {}

    def spy(key: Any, m: Any, call: Callable[..., Any], a: tuple, kw: dict) -> Any:
        calls[key] = calls.get(key, 0) + 1
        k = kind(m)
        if k == "bn":
            source = outputs.get(id(a[0])) if a else None
            reason = unfoldable(m, a, kw)
            if not reason and source is None:
                reason = "its input is not the output of a Dense or Conv"
            if reason:
                kept[key] = reason
            else:
                assert source is not None
                found.append((key, source[0], m, jax.ShapeDtypeStruct(a[0].shape, a[0].dtype)))
        out = call(*a, **kw)
        if k == "layer":
            outputs[id(out)] = (key, out)
        return out

    jax.make_jaxpr(lambda: run(spy))()
    candidates = []
    for bn, layer, m, shape in found:
        if calls[bn] > 1 or calls[layer] > 1:
            kept[bn] = "the batch norm or the layer before it is called more than once"
        else:
            candidates.append((bn, layer, m, shape))
    if not candidates:
        return [], kept
    by_layer = {c[1]: i for i, c in enumerate(candidates)}
    by_bn = {c[0]: i for i, c in enumerate(candidates)}

    def probed(probes: list[Any]) -> Any:
        clean: dict[int, Any] = {}

        def hook(key: Any, m: Any, call: Callable[..., Any], a: tuple, kw: dict) -> Any:
            if key in by_bn:
                return call(clean[by_bn[key]], *a[1:], **kw)
            out = call(*a, **kw)
            if key in by_layer:
                clean[by_layer[key]] = out
                return out + probes[by_layer[key]]
            return out

        return run(hook)

    used = used_inputs(jax.make_jaxpr(probed)([c[3] for c in candidates]))
    pairs = []
    for (bn, layer, m, _), other_use in zip(candidates, used, strict=True):
        if other_use:
            kept[bn] = f"the output of {layer} is also read elsewhere (e.g. by a residual)"
        else:
            pairs.append((bn, layer, m))
    return pairs, kept


def why_kept(bn: Any, a: tuple, kw: dict, *, conditional: bool, mode_hint: str) -> str:
    """Why a batch norm module (linen or nnx, bnjax's or Flax's), called with ``a``, ``kw``,
    cannot be folded; '' if it can. ``conditional``: a ConditionalBatchNorm."""
    if conditional:
        return "ConditionalBatchNorm: its scale and bias depend on the example"
    if getattr(bn, "mean_only", False):
        return "mean_only batch norm"
    call = kw.get("use_running_average", a[1] if len(a) > 1 else None)
    use_ra = True if getattr(bn, "frozen", False) else (call if call is not None else bn.use_running_average)
    if use_ra is not True:
        return f"in training mode (batch statistics): {mode_hint}"
    ndim = jnp.ndim(a[0])
    axes = (bn.axis,) if isinstance(bn.axis, int) else tuple(bn.axis)
    if len(axes) != 1 or axes[0] % ndim != ndim - 1:
        return f"its features are not on the last axis (axis={bn.axis!r})"
    return ""
