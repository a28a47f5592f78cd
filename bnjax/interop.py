"""Converters between PyTorch ``state_dict`` entries (and Haiku's and Equinox's batch-norm state)
and bnjax's Flax layers.

Each ``from_torch_*`` function reads the entries of one PyTorch module (the keys under ``prefix``)
and returns the Flax variables of the matching layer, as NumPy arrays, in ``flax.linen``'s
layout: ``{"params": {...}}`` or ``{"params": {...}, "batch_stats": {...}}``, ready for
``layer.apply(variables, x)``. ``update_nnx`` writes such variables into the matching
``flax.nnx`` / ``bnjax.nnx`` module instead. Each ``to_torch_*`` function goes the other way and
returns ``{name: np.ndarray}`` with PyTorch's keys (make tensors with ``torch.from_numpy`` and
call ``module.load_state_dict``).

The state is a mapping of names to ``torch.Tensor`` or NumPy arrays (e.g. ``module.state_dict()``)
or the path of a ``.safetensors`` file. Nothing is ever unpickled: this module never calls
``torch.load``, and never imports torch (a tensor is converted with ``.detach().cpu().numpy()``
only when torch, which made it, is already imported).

Conventions converted (PyTorch → bnjax/Flax):

================================  ==============================================================
PyTorch                           bnjax / Flax
================================  ==============================================================
``BatchNorm*d`` momentum p        ``momentum = 1 − p`` (the weight of the OLD value), or ``None``
                                  for p = None (the cumulative average): ``momentum_from_torch``
``running_var`` (EMA of the       ``var`` copied as is; train on with
unbiased batch variance)          ``unbiased_running_var=True`` (PyTorch's convention)
``num_batches_tracked`` (int64)   ``count`` (int32 scalar) and ``skipped`` (int32 zeros (C,))
``weight``, ``bias``              ``scale``, ``bias`` (BatchNorm, LayerNorm, GroupNorm, RMSNorm)
``eps``                           ``epsilon`` (a layer field: pass it; Flax's LayerNorm,
                                  GroupNorm and RMSNorm default to 1e-6, PyTorch's to 1e-5;
                                  ``RMSNorm(eps=None)`` is ``finfo(dtype).eps``)
Conv weight (out, in/g, *k)       ``kernel`` (*k, in/g, out); NCHW input ↔ NHWC;
                                  ``groups`` ↔ ``feature_group_count``, ``stride`` ↔
                                  ``strides``, ``padding=p`` ↔ ``padding=[(p, p)] * ndim``,
                                  ``dilation`` ↔ ``kernel_dilation``
Linear weight (out, in)           ``kernel`` (in, out)
``weight_norm`` (dim=0): g        ``"<layer>/kernel/scale"`` (out,) in ``params``; v is the
(out, 1, …), v                    wrapped layer's ``kernel``; dim=None: g of shape ()
``spectral_norm``: ``_u`` (out,)  ``"<layer>/kernel/u"`` (1, out) in ``batch_stats``; ``_v`` is
                                  not stored (bnjax recomputes it from u)
================================  ==============================================================

Sources: the PyTorch documentation of ``torch.nn.BatchNorm2d``, ``LayerNorm``, ``GroupNorm``,
``RMSNorm``, ``Conv2d``, ``Linear``, ``torch.nn.utils.parametrizations.weight_norm`` and
``spectral_norm`` (https://pytorch.org/docs/stable/nn.html).
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from typing import Any

import numpy as np

from bnjax._src.interop_jax import from_equinox_batch_norm as from_equinox_batch_norm
from bnjax._src.interop_jax import from_haiku_batch_norm as from_haiku_batch_norm
from bnjax._src.interop_jax import to_equinox_batch_norm as to_equinox_batch_norm
from bnjax._src.interop_jax import to_haiku_batch_norm as to_haiku_batch_norm

State = Mapping[str, Any] | str | os.PathLike[str]
"""A ``state_dict``-like mapping of names to tensors or arrays, or a ``.safetensors`` path."""

Variables = dict[str, dict[str, Any]]
"""Flax variables in ``flax.linen``'s layout: ``{"params": {...}, "batch_stats": {...}}``."""

_INT32_MAX = int(np.iinfo(np.int32).max)

_WN = ("parametrizations.weight.original0", "parametrizations.weight.original1")  # g, v
_WN_OLD = ("weight_g", "weight_v")  # torch.nn.utils.weight_norm (deprecated)
_SN = ("parametrizations.weight.original", "parametrizations.weight.0._u", "parametrizations.weight.0._v")
_SN_OLD = ("weight_orig", "weight_u", "weight_v")  # torch.nn.utils.spectral_norm (deprecated)


# ---------------------------------------------------------------------------------------------
# Reading a state


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file into ``{name: np.ndarray}`` with ``safetensors.numpy.load_file``.

    The safetensors format holds raw arrays and a JSON header only: reading it runs no code (unlike
    ``torch.load`` of a pickled checkpoint, which this module never does). Every ``from_torch_*``
    function also accepts the path itself; reading the file once and passing the dictionary avoids
    reading it again for each layer. Needs the ``safetensors`` package (``pip install
    safetensors``), imported only when called.

    Example:
      >>> import os, tempfile, numpy as np, pytest
      >>> st = pytest.importorskip("safetensors.numpy")  # the optional dependency
      >>> from bnjax import interop
      >>> path = os.path.join(tempfile.mkdtemp(), "bn.safetensors")
      >>> st.save_file({"bn.running_mean": np.zeros(3, np.float32)}, path)
      >>> interop.load_safetensors(path)
      {'bn.running_mean': array([0., 0., 0.], dtype=float32)}

    Source: https://huggingface.co/docs/safetensors (``safetensors.numpy.load_file``).
    """
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # the optional dependency
        raise ImportError(
            "bnjax.interop.load_safetensors needs the safetensors package: pip install safetensors "
            "(or read the file yourself and pass the dictionary of arrays)."
        ) from e
    return dict(load_file(os.fspath(path)))


def _to_numpy(value: Any) -> np.ndarray:
    """A tensor or array as a NumPy array (bfloat16 tensors as ml_dtypes' bfloat16)."""
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: reinterpret the bits
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(value)


def _prefix(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def _listing(keys: Iterable[str], limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{f', … ({len(keys) - limit} more)' if len(keys) > limit else ''}]"


class _Reader:
    """The entries of one PyTorch module: the keys of ``state`` under ``prefix``."""

    def __init__(self, state: State, prefix: str, owner: str):
        if isinstance(state, (str, os.PathLike)):
            state = load_safetensors(state)
        if not isinstance(state, Mapping):
            raise TypeError(
                f"{owner}: state must be a mapping of names to tensors or arrays (e.g. module.state_dict()) "
                f"or the path of a .safetensors file, got {type(state).__name__}."
            )
        if not isinstance(prefix, str):
            raise TypeError(f"{owner}: prefix must be a str such as 'layer1.0.bn1', got {type(prefix).__name__}.")
        self.state, self.prefix, self.owner = state, _prefix(prefix), owner

    def has(self, name: str) -> bool:
        return self.prefix + name in self.state

    def take(self, required: Iterable[str], optional: Iterable[str] = ()) -> dict[str, np.ndarray]:
        """The named entries as NumPy arrays; a KeyError names every missing required one."""
        required = list(required)
        missing = [n for n in required if not self.has(n)]
        if missing:
            raise KeyError(self.missing_message(missing))
        return {n: _to_numpy(self.state[self.prefix + n]) for n in [*required, *optional] if self.has(n)}

    def missing_message(self, names: list[str], alternative: str = "") -> str:
        keys = [str(k) for k in self.state]
        full = [self.prefix + n for n in names]
        msg = f"{self.owner}: the state has no {', '.join(repr(k) for k in full)}{alternative}. "
        under = [k for k in keys if k.startswith(self.prefix)]
        if self.prefix and under:
            msg += f"Keys with the prefix {self.prefix!r}: {_listing(under)}."
        elif self.prefix:
            msg += f"No key starts with {self.prefix!r}."
        else:
            msg += f"Its keys: {_listing(keys)}."
        name = names[0]
        holders = sorted({k[: len(k) - len(name)] for k in keys if k == name or k.endswith("." + name)})
        if holders and self.prefix not in holders:
            msg += f" The prefixes that hold {name!r}: {_listing(holders)}."
        elif self.prefix and not under:
            close = difflib.get_close_matches(full[0], keys, n=5, cutoff=0.3)
            if close:
                msg += f" Closest keys: {_listing(close)}."
        return msg

    def key(self, name: str) -> str:
        return self.prefix + name


def _check_shape(owner: str, key: str, got: tuple[int, ...], expected: tuple[int, ...], why: str) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(f"{owner}: {key!r} has shape {tuple(got)} but {why} needs shape {tuple(expected)}.")


def _host(a: Any) -> np.ndarray:
    """A writable, C-contiguous NumPy copy (``torch.from_numpy`` warns on the read-only views of jax arrays)."""
    return np.array(a, order="C")


def _stat(a: np.ndarray) -> np.ndarray:
    """Running statistics are kept in float32 or wider in bnjax."""
    return a.astype(np.float32) if a.dtype.itemsize < 4 else a


# ---------------------------------------------------------------------------------------------
# Momentum


def momentum_from_torch(momentum: float | None) -> float | None:
    """bnjax's (and Flax's) ``momentum`` for a PyTorch batch-norm ``momentum``.

    PyTorch's momentum p is the weight of the NEW value, running ← (1 − p)·running + p·batch;
    bnjax's and Flax's m the weight of the OLD one, running ← m·running + (1 − m)·batch; so
    m = 1 − p (computed in decimal, so 0.1 gives 0.9 exactly as written). PyTorch's ``None``, the
    cumulative average, is bnjax's ``momentum=None``.

    Example:
      >>> from bnjax import interop
      >>> interop.momentum_from_torch(0.1), interop.momentum_from_torch(None)
      (0.9, None)

    Source: https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm2d.html (the note on
    momentum).
    """
    if momentum is None:
        return None
    p = float(momentum)
    if not 0.0 < p <= 1.0:
        raise ValueError(
            f"momentum_from_torch({momentum!r}): PyTorch's momentum, the weight of the new batch, must be "
            "in (0, 1] for a bnjax momentum 1 - p in [0, 1) (or None, the cumulative average)."
        )
    return float(Decimal(1) - Decimal(repr(p)))


def momentum_to_torch(momentum: float | None) -> float | None:
    """PyTorch's batch-norm ``momentum`` for a bnjax (or Flax) ``momentum``: p = 1 − m; ``None``
    (the cumulative average) stays ``None``. The inverse of ``momentum_from_torch``.

    Example:
      >>> from bnjax import interop
      >>> interop.momentum_to_torch(0.9), interop.momentum_to_torch(0.99)
      (0.1, 0.01)

    Source: https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm2d.html.
    """
    if momentum is None:
        return None
    m = float(momentum)
    if not 0.0 <= m < 1.0:
        raise ValueError(
            f"momentum_to_torch({momentum!r}): bnjax's momentum, the weight of the old value, must be in "
            "[0, 1) (or None, the cumulative average)."
        )
    return float(Decimal(1) - Decimal(repr(m)))


# ---------------------------------------------------------------------------------------------
# Batch norm


def from_torch_batch_norm(state: State, prefix: str = "", *, track_updates: bool = True) -> Variables:
    """The variables of a ``bnjax.linen.BatchNorm`` (or ``bnjax.nnx.BatchNorm``, via
    ``update_nnx``) from a PyTorch ``BatchNorm1d/2d/3d``'s entries.

    Keys read under ``prefix``: ``running_mean``, ``running_var`` (C,); ``weight``, ``bias`` (C,),
    absent for ``affine=False`` (then ``use_scale=False, use_bias=False``); ``num_batches_tracked``
    (int64 scalar). Returns ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``, plus
    ``"count"`` (int32 scalar, = num_batches_tracked) and ``"skipped"`` (int32 zeros (C,)) in
    ``batch_stats`` when ``track_updates`` (the layout of ``BatchNorm(track_updates=True)``, and
    of ``debias=True`` or ``momentum=None``, which need the count). ``track_updates=False``:
    Flax's layout, mean and var only (num_batches_tracked is then not read).

    Conventions: the stored variance is copied as is. PyTorch's running_var is the EMA of the
    unbiased batch variance M₂/(n − 1); both evaluate with it directly, so evaluation matches
    with ``BatchNorm(use_running_average=True, epsilon=eps)``. To train on as PyTorch does, build
    ``BatchNorm(momentum=momentum_from_torch(p), epsilon=eps, unbiased_running_var=True,
    track_updates=True)`` (``debias`` off: PyTorch's EMA starts from mean 0, var 1 as Flax's);
    PyTorch's ``momentum=None`` (the cumulative average over num_batches_tracked batches) is
    ``momentum=None`` with the count converted here. Means and variances in float16/bfloat16 are
    widened to float32 (bnjax keeps statistics in float32 or wider). Layout: channels on the last
    axis, so a PyTorch NCHW input is NHWC here (``x.transpose(0, 2, 3, 1)``).

    Raises KeyError naming the missing keys and the keys there are under ``prefix``; ValueError
    for a shape mismatch (naming both shapes and the key) or a num_batches_tracked beyond int32.

    Example:
      >>> import numpy as np
      >>> from bnjax import interop
      >>> state = {"bn.weight": np.ones(3, np.float32), "bn.bias": np.zeros(3, np.float32),
      ...          "bn.running_mean": np.zeros(3, np.float32), "bn.running_var": np.ones(3, np.float32),
      ...          "bn.num_batches_tracked": np.array(7)}
      >>> v = interop.from_torch_batch_norm(state, "bn")
      >>> sorted(v["params"]), sorted(v["batch_stats"]), v["batch_stats"]["count"]
      (['bias', 'scale'], ['count', 'mean', 'skipped', 'var'], array(7, dtype=int32))

    Source: https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm2d.html.
    """
    owner = "from_torch_batch_norm"
    r = _Reader(state, prefix, owner)
    counted = ("num_batches_tracked",) if track_updates else ()
    a = r.take(("running_mean", "running_var", *counted), ("weight", "bias"))
    if a["running_mean"].ndim != 1:
        raise ValueError(
            f"{owner}: {r.key('running_mean')!r} has shape {a['running_mean'].shape} but a batch norm's "
            "running mean has shape (C,)."
        )
    shape = a["running_mean"].shape
    for name in ("running_var", "weight", "bias"):
        if name in a:
            _check_shape(owner, r.key(name), a[name].shape, shape, f"{r.key('running_mean')!r} of shape {shape}")
    if ("weight" in a) != ("bias" in a):
        have, lack = ("weight", "bias") if "weight" in a else ("bias", "weight")
        raise KeyError(r.missing_message([lack], f" (the state has {r.key(have)!r}: affine=True has both)"))
    params = {"scale": a["weight"], "bias": a["bias"]} if "weight" in a else {}
    stats: dict[str, np.ndarray] = {"mean": _stat(a["running_mean"]), "var": _stat(a["running_var"])}
    if track_updates:
        stats["count"] = _count(owner, r.key("num_batches_tracked"), a["num_batches_tracked"])
        stats["skipped"] = np.zeros(shape, np.int32)
    return {"params": params, "batch_stats": stats}


def _count(owner: str, key: str, n: np.ndarray) -> np.ndarray:
    if n.shape != () or not np.issubdtype(n.dtype, np.integer):
        raise ValueError(f"{owner}: {key!r} must be an integer scalar, got shape {n.shape} and dtype {n.dtype}.")
    value = int(n)
    if not 0 <= value <= _INT32_MAX:
        raise ValueError(
            f"{owner}: {key!r} = {value} does not fit bnjax's int32 count (0 to {_INT32_MAX}). Convert with "
            "track_updates=False (PyTorch's EMA and Flax's need no count), or set the count yourself."
        )
    return np.asarray(value, np.int32)


def to_torch_batch_norm(variables: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """A PyTorch ``BatchNorm*d``'s entries from a bnjax/Flax BatchNorm's variables (a linen
    ``{"params", "batch_stats"}`` dict, or a ``bnjax.nnx.BatchNorm`` / ``flax.nnx.BatchNorm``).

    Returns ``weight``, ``bias`` (when the layer has ``scale`` and ``bias``), ``running_mean``,
    ``running_var`` (copied as is) and ``num_batches_tracked`` (int64 scalar: bnjax's ``count``,
    or 0 for a layer that keeps none), each key under ``prefix``. ``skipped`` and the pending
    moments of gradient accumulation have no PyTorch counterpart and are dropped. For training
    parity the variance should be PyTorch's (``unbiased_running_var=True``); PyTorch's momentum is
    ``momentum_to_torch(m)``.

    Example:
      >>> import numpy as np
      >>> from bnjax import interop
      >>> v = {"params": {"scale": np.ones(2), "bias": np.zeros(2)},
      ...      "batch_stats": {"mean": np.zeros(2), "var": np.ones(2), "count": np.int32(3)}}
      >>> sd = interop.to_torch_batch_norm(v, "bn")
      >>> sorted(sd), sd["bn.num_batches_tracked"]
      (['bn.bias', 'bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var', 'bn.weight'], array(3))

    Source: https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm2d.html.
    """
    owner = "to_torch_batch_norm"
    v = _variables(variables, owner)
    params, stats = v.get("params", {}), v.get("batch_stats", {})
    for name in ("mean", "var"):
        if name not in stats:
            raise KeyError(f"{owner}: the variables have no batch_stats[{name!r}]; batch_stats: {_listing(stats)}.")
    p = _prefix(prefix)
    out = {}
    if "scale" in params:
        out[p + "weight"] = _host(params["scale"])
    if "bias" in params:
        out[p + "bias"] = _host(params["bias"])
    out[p + "running_mean"] = _host(stats["mean"])
    out[p + "running_var"] = _host(stats["var"])
    out[p + "num_batches_tracked"] = np.array(stats.get("count", 0), np.int64)
    return out


# ---------------------------------------------------------------------------------------------
# Layer, group and RMS norm


def _affine_from_torch(owner: str, state: State, prefix: str, bias: str) -> Variables:
    r = _Reader(state, prefix, owner)
    a = r.take(("weight", "bias") if bias == "required" else ("weight",), ("bias",) if bias == "optional" else ())
    params = {"scale": a["weight"]}
    if "bias" in a:
        _check_shape(owner, r.key("bias"), a["bias"].shape, a["weight"].shape, f"{r.key('weight')!r}")
        params["bias"] = a["bias"]
    return {"params": params}


def from_torch_layer_norm(state: State, prefix: str = "") -> Variables:
    """The variables of a ``bnjax.linen.LayerNorm`` (or ``flax.linen.LayerNorm``) from a PyTorch
    ``LayerNorm``'s entries: ``weight`` → ``scale``, ``bias`` → ``bias`` (absent for
    ``LayerNorm(bias=False)``: then ``use_bias=False``), both of ``normalized_shape``.

    Conventions: PyTorch normalizes over the last ``len(normalized_shape)`` axes, as
    ``LayerNorm(reduction_axes=..., feature_axes=...)`` over the same trailing axes does, for an
    input laid out alike (e.g. (N, L, D)); ``eps`` (PyTorch's default 1e-5) is the layer's
    ``epsilon`` (bnjax's and Flax's default 1e-6: pass it). ``elementwise_affine=False`` has no
    entries: build the layer with ``use_scale=False, use_bias=False`` and no params.

    Example:
      >>> import numpy as np
      >>> from bnjax import interop
      >>> v = interop.from_torch_layer_norm({"ln.weight": np.ones(4), "ln.bias": np.zeros(4)}, "ln")
      >>> {k: a.shape for k, a in v["params"].items()}
      {'scale': (4,), 'bias': (4,)}

    Source: https://pytorch.org/docs/stable/generated/torch.nn.LayerNorm.html.
    """
    return _affine_from_torch("from_torch_layer_norm", state, prefix, "optional")


def from_torch_group_norm(state: State, prefix: str = "") -> Variables:
    """The variables of a ``bnjax.linen.GroupNorm`` (or ``flax.linen.GroupNorm``) from a PyTorch
    ``GroupNorm``'s entries: ``weight`` → ``scale``, ``bias`` → ``bias``, both (C,).

    Conventions: PyTorch groups the C channels of an NCHW input into ``num_groups`` contiguous
    groups, as ``GroupNorm(num_groups=G)`` does on the channels-last (NHWC) input; ``eps``
    (PyTorch's default 1e-5) is ``epsilon`` (default 1e-6 here: pass it), and ``num_groups`` is a
    field of the layer (not in the state). ``affine=False`` has no entries: build the layer with
    ``use_scale=False, use_bias=False``.

    Example:
      >>> import numpy as np
      >>> from bnjax import interop
      >>> v = interop.from_torch_group_norm({"weight": np.ones(8), "bias": np.zeros(8)})
      >>> v["params"]["scale"].shape
      (8,)

    Source: https://pytorch.org/docs/stable/generated/torch.nn.GroupNorm.html.
    """
    return _affine_from_torch("from_torch_group_norm", state, prefix, "required")


def from_torch_rms_norm(state: State, prefix: str = "") -> Variables:
    """The variables of a ``bnjax.linen.RMSNorm`` (or ``flax.linen.RMSNorm``) from a PyTorch
    ``torch.nn.RMSNorm``'s entries: ``weight`` (``normalized_shape``) → ``scale``.

    Conventions: y = x/√(mean(x²) + ε)·g in both, over the trailing ``normalized_shape`` axes;
    PyTorch's ``eps=None`` means ``torch.finfo(x.dtype).eps`` (1.19e-7 in float32), bnjax's
    default is 1e-6: pass ``epsilon`` explicitly. PyTorch's RMSNorm has no bias (bnjax's default
    ``use_bias=False`` matches).

    Example:
      >>> import numpy as np
      >>> from bnjax import interop
      >>> interop.from_torch_rms_norm({"norm.weight": np.full(3, 2.0)}, "norm")
      {'params': {'scale': array([2., 2., 2.])}}

    Source: https://pytorch.org/docs/stable/generated/torch.nn.RMSNorm.html.
    """
    return _affine_from_torch("from_torch_rms_norm", state, prefix, "none")


def to_torch_norm(variables: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """A PyTorch ``LayerNorm``/``GroupNorm``/``RMSNorm``'s entries from a bnjax/Flax LayerNorm,
    GroupNorm or RMSNorm's variables (a linen ``{"params": ...}`` dict or an nnx module):
    ``scale`` → ``weight``, ``bias`` → ``bias`` (when present), under ``prefix``.

    Example:
      >>> import numpy as np
      >>> from bnjax import interop
      >>> sorted(interop.to_torch_norm({"params": {"scale": np.ones(4), "bias": np.zeros(4)}}, "ln"))
      ['ln.bias', 'ln.weight']

    Source: https://pytorch.org/docs/stable/generated/torch.nn.LayerNorm.html.
    """
    params = _variables(variables, "to_torch_norm").get("params", {})
    if "scale" not in params and "bias" not in params:
        raise KeyError(f"to_torch_norm: the variables have no params 'scale' nor 'bias'; params: {_listing(params)}.")
    p = _prefix(prefix)
    names = (("scale", "weight"), ("bias", "bias"))
    return {p + torch_name: _host(params[name]) for name, torch_name in names if name in params}


# ---------------------------------------------------------------------------------------------
# Conv and Linear


def _kernel_from_torch(w: np.ndarray) -> np.ndarray:
    """(out, in, *k) → (*k, in, out); (out, in) → (in, out)."""
    nd = w.ndim
    return np.ascontiguousarray(np.transpose(w, (*range(2, nd), 1, 0)))


def _kernel_to_torch(k: np.ndarray) -> np.ndarray:
    """(*k, in, out) → (out, in, *k); (in, out) → (out, in)."""
    nd = k.ndim
    return _host(np.transpose(k, (nd - 1, nd - 2, *range(nd - 2))))


def _weight_dims(owner: str, key: str, w: np.ndarray, conv: bool) -> None:
    if conv and not 3 <= w.ndim <= 5:
        raise ValueError(
            f"{owner}: {key!r} has shape {w.shape}; a Conv1d/2d/3d weight (out, in/groups, *kernel_size) has "
            "3 to 5 dimensions (a Linear weight: use from_torch_linear)."
        )
    if not conv and w.ndim != 2:
        raise ValueError(
            f"{owner}: {key!r} has shape {w.shape}; a Linear weight has shape (out_features, in_features) "
            "(a Conv weight: use from_torch_conv)."
        )


def _layer_from_torch(owner: str, state: State, prefix: str, conv: bool) -> Variables:
    r = _Reader(state, prefix, owner)
    a = r.take(("weight",), ("bias",))
    w = a["weight"]
    _weight_dims(owner, r.key("weight"), w, conv)
    params = {"kernel": _kernel_from_torch(w)}
    if "bias" in a:
        _check_shape(owner, r.key("bias"), a["bias"].shape, w.shape[:1], f"{r.key('weight')!r} {w.shape}")
        params["bias"] = a["bias"]
    return {"params": params}


def from_torch_conv(state: State, prefix: str = "") -> Variables:
    """The variables of a ``flax.linen.Conv`` (or ``flax.nnx.Conv``, via ``update_nnx``) from a
    PyTorch ``Conv1d``/``Conv2d``/``Conv3d``'s entries.

    Conventions: ``weight`` (out, in/groups, *kernel_size) → ``kernel`` (*kernel_size, in/groups,
    out); ``bias`` (out,) as is (absent for ``bias=False``: ``use_bias=False``). The Flax conv
    takes channels-last input (NHWC for NCHW; (N, L, C) for (N, C, L)); ``groups`` is
    ``feature_group_count`` (depthwise: ``feature_group_count=in``), ``stride`` ``strides``,
    ``padding=p`` ``padding=[(p, p)] * n`` (``"same"`` / ``"valid"`` alike), ``dilation``
    ``kernel_dilation``. PyTorch's convolution is a cross-correlation, as Flax's: no flip.
    ``ConvTranspose*d`` (weight (in, out/groups, *k)) is not handled.

    Example:
      >>> import numpy as np
      >>> from bnjax import interop
      >>> state = {"conv.weight": np.zeros((8, 3, 5, 5)), "conv.bias": np.zeros(8)}
      >>> interop.from_torch_conv(state, "conv")["params"]["kernel"].shape
      (5, 5, 3, 8)

    Source: https://pytorch.org/docs/stable/generated/torch.nn.Conv2d.html.
    """
    return _layer_from_torch("from_torch_conv", state, prefix, conv=True)


def from_torch_linear(state: State, prefix: str = "") -> Variables:
    """The variables of a ``flax.linen.Dense`` (or ``flax.nnx.Linear``, via ``update_nnx``) from a
    PyTorch ``Linear``'s entries: ``weight`` (out, in) → ``kernel`` (in, out) (PyTorch computes
    x Wᵀ + b, Flax x K + b); ``bias`` (out,) as is (absent for ``bias=False``).

    Example:
      >>> import numpy as np
      >>> from bnjax import interop
      >>> v = interop.from_torch_linear({"fc.weight": np.arange(6.0).reshape(2, 3)}, "fc")
      >>> v["params"]["kernel"]
      array([[0., 3.],
             [1., 4.],
             [2., 5.]])

    Source: https://pytorch.org/docs/stable/generated/torch.nn.Linear.html.
    """
    return _layer_from_torch("from_torch_linear", state, prefix, conv=False)


def _layer_to_torch(owner: str, variables: Any, prefix: str, conv: bool) -> dict[str, np.ndarray]:
    params = _variables(variables, owner).get("params", {})
    if "kernel" not in params:
        raise KeyError(f"{owner}: the variables have no params 'kernel'; params: {_listing(params)}.")
    k = np.asarray(params["kernel"])
    if conv and not 3 <= k.ndim <= 5:
        raise ValueError(f"{owner}: the kernel has shape {k.shape}; a conv kernel (*kernel_size, in, out) has 3 to 5.")
    if not conv and k.ndim != 2:
        raise ValueError(f"{owner}: the kernel has shape {k.shape}; a Dense kernel has shape (in, out).")
    p = _prefix(prefix)
    out = {p + "weight": _kernel_to_torch(k)}
    if "bias" in params:
        out[p + "bias"] = _host(params["bias"])
    return out


def to_torch_conv(variables: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """A PyTorch ``Conv1d/2d/3d``'s entries from a Flax conv's variables (a linen ``{"params":
    ...}`` dict or an ``nnx.Conv``): ``kernel`` (*kernel_size, in/groups, out) → ``weight`` (out,
    in/groups, *kernel_size); ``bias`` as is. The inverse of ``from_torch_conv``.

    Example:
      >>> import numpy as np
      >>> from bnjax import interop
      >>> interop.to_torch_conv({"params": {"kernel": np.zeros((3, 3, 4, 8))}}, "conv")["conv.weight"].shape
      (8, 4, 3, 3)

    Source: https://pytorch.org/docs/stable/generated/torch.nn.Conv2d.html.
    """
    return _layer_to_torch("to_torch_conv", variables, prefix, conv=True)


def to_torch_linear(variables: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """A PyTorch ``Linear``'s entries from a Flax dense layer's variables (a linen ``{"params":
    ...}`` dict or an ``nnx.Linear``): ``kernel`` (in, out) → ``weight`` (out, in); ``bias`` as
    is. The inverse of ``from_torch_linear``.

    Example:
      >>> import numpy as np
      >>> from bnjax import interop
      >>> interop.to_torch_linear({"params": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}})["weight"].shape
      (2, 3)

    Source: https://pytorch.org/docs/stable/generated/torch.nn.Linear.html.
    """
    return _layer_to_torch("to_torch_linear", variables, prefix, conv=False)


# ---------------------------------------------------------------------------------------------
# Weight norm and spectral norm


def _pick(r: _Reader, new: tuple[str, ...], old: tuple[str, ...]) -> tuple[str, ...]:
    """The parametrization's key names: the current ones, else the deprecated ones if present."""
    if not all(r.has(n) for n in new) and all(r.has(n) for n in old):
        return old
    return new


def _wrapped_kernel(owner: str, r: _Reader, key: str, w: np.ndarray, bias: np.ndarray | None) -> dict[str, Any]:
    if not 2 <= w.ndim <= 5:
        raise ValueError(
            f"{owner}: {r.key(key)!r} has shape {w.shape}; the wrapped layer's weight must be a Linear (out, in) "
            "or Conv (out, in/groups, *kernel_size) weight."
        )
    inner = {"kernel": _kernel_from_torch(w)}
    if bias is not None:
        _check_shape(owner, r.key("bias"), bias.shape, w.shape[:1], f"{r.key(key)!r} {w.shape}")
        inner["bias"] = bias
    return inner


def from_torch_weight_norm(state: State, prefix: str = "", *, name: str = "layer_instance") -> Variables:
    """The variables of a ``bnjax.linen.WeightNorm`` wrapping an ``nn.Dense`` or ``nn.Conv`` (or of
    a ``bnjax.nnx.WeightNorm``, via ``update_nnx``) from a PyTorch layer with a weight-norm
    parametrization (``torch.nn.utils.parametrizations.weight_norm``).

    Keys read under ``prefix``: ``parametrizations.weight.original0`` (g) and ``.original1`` (v),
    or the deprecated ``torch.nn.utils.weight_norm``'s ``weight_g`` and ``weight_v``; ``bias``
    when present. Both compute w = g·v/‖v‖.

    Conventions: v is converted as the wrapped layer's weight (``from_torch_conv`` /
    ``from_torch_linear``) into its ``kernel``; g, of shape (out, 1, …, 1) for PyTorch's
    ``dim=0`` (the norm over all axes but the output one), becomes the (out,) parameter
    ``"<name>/kernel/scale"`` of the wrapper, the default ``WeightNorm(feature_axes=-1)`` (the
    output axis of a Flax kernel). ``dim=None`` (one norm over all of v, g of shape ()) maps to
    ``WeightNorm(feature_axes=None)``. ``name`` is the wrapped layer's name: ``"layer_instance"``
    for a layer given to the wrapper as a field (``WeightNorm(nn.Dense(n))`` built outside any
    compact method; both entries then sit in the wrapper's ``params``); Flax's automatic name,
    e.g. ``"Conv_0"``, for one built inside a parent's compact method, where Flax keeps the
    layer's ``params[name]`` in the parent's params and ``params[name + "/kernel/scale"]`` in the
    wrapper's (e.g. ``"WeightNorm_0"``). bnjax adds ε = 1e-12 under the square root (PyTorch
    none): the outputs agree to float32 rounding.

    Returns ``{"params": {name: {"kernel", "bias"}, name + "/kernel/scale": g}}``.

    Example:
      >>> import numpy as np
      >>> from bnjax import interop
      >>> state = {"fc.parametrizations.weight.original0": np.ones((2, 1)),
      ...          "fc.parametrizations.weight.original1": np.ones((2, 3)), "fc.bias": np.zeros(2)}
      >>> p = interop.from_torch_weight_norm(state, "fc")["params"]
      >>> p["layer_instance"]["kernel"].shape, p["layer_instance/kernel/scale"].shape
      ((3, 2), (2,))

    Source: https://pytorch.org/docs/stable/generated/torch.nn.utils.parametrizations.weight_norm.html.
    """
    owner = "from_torch_weight_norm"
    r = _Reader(state, prefix, owner)
    g_key, v_key = _pick(r, _WN, _WN_OLD)
    a = r.take((g_key, v_key), ("bias",))
    g, v = a[g_key], a[v_key]
    inner = _wrapped_kernel(owner, r, v_key, v, a.get("bias"))
    if g.ndim == 0:  # dim=None: one norm over all of v
        scale = g
    else:
        _check_shape(
            owner, r.key(g_key), g.shape, (v.shape[0],) + (1,) * (v.ndim - 1), f"weight_norm(dim=0) of v {v.shape}"
        )
        scale = g.reshape(v.shape[0])
    return {"params": {name: inner, f"{name}/kernel/scale": scale}}


def from_torch_spectral_norm(state: State, prefix: str = "", *, name: str = "layer_instance") -> Variables:
    """The variables of a ``bnjax.linen.SpectralNorm`` wrapping an ``nn.Dense`` or ``nn.Conv`` (or
    of a ``bnjax.nnx.SpectralNorm``, via ``update_nnx``) from a PyTorch layer with a
    spectral-norm parametrization (``torch.nn.utils.parametrizations.spectral_norm``).

    Keys read under ``prefix``: ``parametrizations.weight.original`` (the raw weight W) and the
    power-iteration buffers ``parametrizations.weight.0._u`` (out,) and ``._v`` (fan_in,), or the
    deprecated ``torch.nn.utils.spectral_norm``'s ``weight_orig``, ``weight_u``, ``weight_v``;
    ``bias`` when present.

    Conventions: W becomes the wrapped layer's ``kernel`` (as ``from_torch_conv`` /
    ``from_torch_linear``). PyTorch's u has the size of W's dim 0 (out), W read as the matrix
    (out, −1): it is the left singular-vector estimate, the same vector as bnjax's u for the
    kernel read as (fan_in, out); it is stored as ``"<name>/kernel/u"`` of shape (1, out) in
    ``batch_stats``. bnjax keeps no v (it recomputes it from u); ``"<name>/kernel/sigma"`` is set
    to PyTorch's σ = uᵀ W v, the one its evaluation divides by.

    Evaluation: PyTorch divides by σ = uᵀWv with the stored u and v; bnjax's
    ``SpectralNorm(update_stats=False)`` runs one power-iteration step from u (Flax's rule) and
    divides by ‖W v'‖, v' = Wᵀu/‖Wᵀu‖: one step further, so the two agree once u and v have
    converged. For a random weight PyTorch's 15 steps at registration already bring the outputs
    to float32 rounding (≈1e-7 relative); for close top singular values (σ₂/σ₁ = 0.97) the gap
    was 3e-4. ``bnjax.spectral_norm(kernel, u[0], training=False)`` divides by ‖Wᵀu‖, exactly
    PyTorch's σ whenever its stored v came from the stored u and the current W (the state of its
    last training call, before any optimizer step). Only PyTorch's default ``dim=0`` is
    handled (``ConvTranspose``'s ``dim=1`` is not). ``name``: as ``from_torch_weight_norm`` (for a
    layer built in a parent's compact method, ``batch_stats`` goes under the wrapper's name and
    ``params[name]`` under the parent).

    Returns ``{"params": {name: {"kernel", "bias"}}, "batch_stats": {name + "/kernel/u": (1, out),
    name + "/kernel/sigma": ()}}``.

    Example:
      >>> import numpy as np
      >>> from bnjax import interop
      >>> state = {"parametrizations.weight.original": np.diag([3.0, 1.0]),
      ...          "parametrizations.weight.0._u": np.array([1.0, 0.0]),
      ...          "parametrizations.weight.0._v": np.array([1.0, 0.0])}
      >>> stats = interop.from_torch_spectral_norm(state)["batch_stats"]
      >>> stats["layer_instance/kernel/u"], float(stats["layer_instance/kernel/sigma"])
      (array([[1., 0.]]), 3.0)

    Source: https://pytorch.org/docs/stable/generated/torch.nn.utils.parametrizations.spectral_norm.html.
    """
    owner = "from_torch_spectral_norm"
    r = _Reader(state, prefix, owner)
    w_key, u_key, v_key = _pick(r, _SN, _SN_OLD)
    a = r.take((w_key, u_key, v_key), ("bias",))
    w, u, v = a[w_key], a[u_key], a[v_key]
    inner = _wrapped_kernel(owner, r, w_key, w, a.get("bias"))
    mat = w.reshape(w.shape[0], -1)
    why = f"spectral_norm(dim=0) of the weight {w.shape}"
    _check_shape(owner, r.key(u_key), u.shape, mat.shape[:1], why)
    _check_shape(owner, r.key(v_key), v.shape, mat.shape[1:], why)
    sigma = np.asarray(u.astype(np.float64) @ (mat.astype(np.float64) @ v.astype(np.float64)), u.dtype)
    stats = {f"{name}/kernel/u": u.reshape(1, -1), f"{name}/kernel/sigma": sigma}
    return {"params": {name: inner}, "batch_stats": stats}


# ---------------------------------------------------------------------------------------------
# nnx


def _variables(variables: Any, owner: str) -> Mapping[str, Any]:
    """Linen-layout variables: a mapping as given, or an nnx module's params and batch stats."""
    if isinstance(variables, Mapping):
        return variables
    from flax import nnx

    if isinstance(variables, nnx.Module):
        return {
            "params": nnx.to_pure_dict(nnx.state(variables, nnx.Param)),
            "batch_stats": nnx.to_pure_dict(nnx.state(variables, nnx.BatchStat)),
        }
    raise TypeError(
        f"{owner}: variables must be a Flax variables dict ({{'params': ..., 'batch_stats': ...}}) or an nnx "
        f"module, got {type(variables).__name__}."
    )


def _flat(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flat(v, (*path, str(k)))
        else:
            yield (*path, str(k)), v


def _path_str(path: Iterable[Any]) -> tuple[str, ...]:
    """An nnx graph path with nested tuple keys (``('scales', ('kernel',))``) as flat strings."""
    out: list[str] = []
    for k in path:
        out.extend(_path_str(k) if isinstance(k, tuple) else [str(k)])
    return tuple(out)


def update_nnx(module: Any, variables: Mapping[str, Any]) -> None:
    """Writes linen-layout variables (a ``from_torch_*`` result) into an nnx module, in place.

    The module is the nnx counterpart of the converted layer: ``bnjax.nnx.BatchNorm``,
    ``LayerNorm``, ``GroupNorm``, ``RMSNorm``, ``flax.nnx.Conv``, ``flax.nnx.Linear`` (their
    attributes have the linen names: ``scale``, ``bias``, ``mean``, ``var``, ``count``,
    ``skipped``, ``kernel``), or ``bnjax.nnx.WeightNorm`` / ``bnjax.nnx.SpectralNorm`` wrapping a
    Linear or Conv (linen's ``"<layer>/kernel/scale"`` is ``scales[("kernel",)]``, linen's
    ``"<layer>/kernel/u"`` is ``batch_stats[("kernel", "u")]``, the layer's own variables are
    ``layer_instance``'s). The collections (``params``, ``batch_stats``) are not part of the nnx
    names. Each value is cast to the dtype of the variable it replaces.

    Every variable of the module must get a value and every value must land on one: a KeyError
    names those without a counterpart (e.g. ``count``, when the nnx BatchNorm tracks updates and
    the conversion had ``track_updates=False``); a ValueError names a shape mismatch. Build the
    nnx layer with the options of the PyTorch one (``num_features``, ``use_bias``, ...).

    Example:
      >>> import numpy as np, bnjax.nnx
      >>> from flax import nnx
      >>> from bnjax import interop
      >>> state = {"weight": np.full(3, 2.0, np.float32), "bias": np.zeros(3, np.float32),
      ...          "running_mean": np.ones(3, np.float32), "running_var": np.ones(3, np.float32),
      ...          "num_batches_tracked": np.array(4)}
      >>> layer = bnjax.nnx.BatchNorm(3, track_updates=True, rngs=nnx.Rngs(0))
      >>> interop.update_nnx(layer, interop.from_torch_batch_norm(state))
      >>> layer.scale[...], int(layer.count[...])
      (Array([2., 2., 2.], dtype=float32), 4)

    Source: https://flax.readthedocs.io/en/latest/api_reference/flax.nnx/graph.html (``nnx.update``).
    """
    import jax.numpy as jnp
    from flax import nnx

    from bnjax import nnx as bnnx

    owner = "update_nnx"
    if not isinstance(module, nnx.Module):
        raise TypeError(f"{owner}: module must be an nnx module, got {type(module).__name__}.")
    if not isinstance(variables, Mapping):
        raise TypeError(f"{owner}: variables must be a Flax variables dict, got {type(variables).__name__}.")
    rng = getattr(nnx, "RngState", ())
    targets = {
        _path_str(path): node
        for path, node in nnx.iter_graph(module)
        if isinstance(node, nnx.Variable) and not isinstance(node, rng)
    }
    wrapper = isinstance(module, (bnnx.WeightNorm, bnnx.SpectralNorm))
    source: dict[tuple[str, ...], Any] = {}
    for _collection, tree in variables.items():
        for keys, value in _flat(tree):
            head = keys[0]
            if wrapper and "/" in head:  # linen's "<layer>/<path>/scale", ".../u", ".../sigma"
                _, *inner = head.split("/")
                if isinstance(module, bnnx.WeightNorm) and inner[-1] == "scale":
                    path: tuple[str, ...] = ("scales", *inner[:-1])
                else:
                    path = ("batch_stats", *inner)
            elif wrapper:
                path = ("layer_instance", *keys[1:])
            else:
                path = keys
            source[path] = value
    unknown = [p for p in source if p not in targets]
    lacking = [p for p in targets if p not in source]
    if unknown or lacking:
        names = lambda paths: _listing("/".join(p) for p in paths)  # noqa: E731
        msg = f"{owner}: the variables do not match the {type(module).__name__}'s."
        if unknown:
            msg += f" Without a counterpart in the module: {names(unknown)}."
        if lacking:
            msg += f" The module's variables without a value: {names(lacking)}."
        msg += f" The module has {names(targets)}: build it with the options of the converted layer."
        raise KeyError(msg)
    new = {}
    for path, value in source.items():
        old = targets[path].get_value()
        value = np.asarray(value)
        if value.shape != jnp.shape(old):
            raise ValueError(
                f"{owner}: the value for {'/'.join(path)!r} has shape {value.shape} but the module's variable has "
                f"shape {jnp.shape(old)}: build the nnx layer with the sizes of the converted one."
            )
        new[path] = jnp.asarray(value, jnp.result_type(old))
    for path, value in new.items():  # only once every value is checked: all or nothing
        targets[path].set_value(value)


__all__ = [
    "State",
    "Variables",
    "from_equinox_batch_norm",
    "from_haiku_batch_norm",
    "from_torch_batch_norm",
    "from_torch_conv",
    "from_torch_group_norm",
    "from_torch_layer_norm",
    "from_torch_linear",
    "from_torch_rms_norm",
    "from_torch_spectral_norm",
    "from_torch_weight_norm",
    "load_safetensors",
    "momentum_from_torch",
    "momentum_to_torch",
    "to_equinox_batch_norm",
    "to_haiku_batch_norm",
    "to_torch_batch_norm",
    "to_torch_conv",
    "to_torch_linear",
    "to_torch_norm",
    "update_nnx",
]
