"""The record of the environment, and the Markdown tables of the results."""

from __future__ import annotations

import importlib.metadata
import math
import os
import pathlib
import platform
import subprocess
from typing import Any

import jax

import bnjax

from .workloads import MODES, is_training


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def bnjax_source() -> dict[str, Any]:
    """The git commit of the bnjax being measured and its uncommitted files (bnjax/ only), if any."""
    root = pathlib.Path(bnjax.__file__).resolve().parent.parent
    try:

        def git(*a):
            return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=30, check=True)

        commit = git("rev-parse", "HEAD").stdout.strip()
        dirty = [line[3:] for line in git("status", "--porcelain", "--", "bnjax").stdout.splitlines()]
    except (OSError, subprocess.SubprocessError):  # not a git checkout (an installed wheel), or no git
        return {"path": str(root), "commit": None, "uncommitted": None}
    return {"path": str(root), "commit": commit, "uncommitted": dirty}


def environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": str(dev),
        "device_kind": getattr(dev, "device_kind", None),
        "device_count": jax.device_count(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            d: _version(d) for d in ("bnjax", "jax", "jaxlib", "flax", "torch", "dm-haiku", "equinox", "numpy", "optax")
        },
        "bnjax_source": bnjax_source(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_numpy_rank_promotion": jax.config.jax_numpy_rank_promotion,
    }


def _ms(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _ratio(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.2f}"


def fmt_shape(shape) -> str:
    return "(" + ",".join(str(s) for s in shape) + ")"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    v = env["versions"]
    src = env["bnjax_source"]
    if src["commit"]:
        where = f"bnjax at commit {src['commit'][:10]}"
        where += f" with uncommitted changes to {', '.join(src['uncommitted'])}" if src["uncommitted"] else ""
    else:
        where = f"bnjax from {src['path']}"
    lines = [
        "# bnjax benchmarks",
        "",
        f"Backend **{env['backend']}** ({env['device']}, {env['device_kind']}); CPU {env['cpu_model']}, "
        f"{env['cpu_affinity']} cores usable; jax {v['jax']}, flax {v['flax']}, torch {v['torch']}, "
        f"haiku {v['dm-haiku']}, equinox {v['equinox']}, bnjax {v['bnjax']}. "
        f"{where}. {'Quick run. ' if results['quick'] else ''}Wall time {results['wall_time_s']:.0f} s.",
        "",
        "Medians in ms over interleaved rounds (rounds per row in `rounds`); ratios are medians divided by "
        "medians (< 1: bnjax is faster). `best peer`: the fastest of flax.linen, flax.nnx, haiku, equinox and "
        "naive jnp. `limit`: plain jitted kernels over the same bytes (forward: read x, write y; training: one "
        "pass reading x and ct for per-statistic sums, then one reading x and ct and writing one array of x's size). "
        "`donated`: bnjax / best peer with x donated (`donate_argnums`), ms.",
    ]
    if results["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {r}" for k, r in results["skipped"].items()) + "."]
    for mode, (_, title) in MODES.items():
        recs = [r for r in results["micro"] if r["mode"] == mode]
        if not recs:
            continue
        names: list[str] = []
        for r in recs:
            names += [n for n in r["contenders"] if n not in names]
        train = is_training(mode)
        header = ["workload", "dtype", "rounds", *names, "best peer", "bnjax ÷ best peer"]
        if train:
            header.append("autodiff ÷ best peer")
        header += ["bnjax ÷ torch", "bnjax ÷ limit", "best peer ÷ limit", "donated (ms)"]
        rows, spread = [], []
        for r in recs:
            c, q = r["contenders"], r["ratios"]
            bj = q.get("bnjax", {})
            row = [fmt_shape(r["shape"]), r["dtype"], str(r["repeats"])]
            row += [_ms(c[n]["median_ms"]) if n in c else "—" for n in names]
            row += [q["best_peer"] or "—", _ratio(bj.get("to_best_peer"))]
            if train:
                row.append(_ratio(q.get("bnjax (autodiff)", {}).get("to_best_peer")))
            row += [_ratio(bj.get("to_torch")), _ratio(bj.get("to_limit"))]
            row.append(_ratio(q["to_limit"].get(q["best_peer"])) if q["best_peer"] else "—")
            d = r["donated"]
            row.append(" / ".join(_ms(d[n]["median_ms"]) for n in d) if d else "—")
            rows.append(row)
            spread.append(
                [fmt_shape(r["shape"]), r["dtype"]]
                + [f"{_ms(c[n]['min_ms'])}–{_ms(c[n]['max_ms'])}" if n in c else "—" for n in names]
            )
        lines += ["", f"## {title}", "", *_table(header, rows)]
        lines += ["", "<details><summary>min–max (ms)</summary>", "", *_table(["workload", "dtype", *names], spread)]
        if train:
            mem_rows = [
                [fmt_shape(r["shape"]), r["dtype"]]
                + [
                    f"{r['contenders'][n]['memory'].get('temp_size_in_bytes', float('nan')) / 2**20:.1f}"
                    if n in r["contenders"] and r["contenders"][n].get("memory")
                    else "—"
                    for n in names
                ]
                for r in recs
            ]
            lines += [
                "",
                "XLA temp memory of the compiled step (MiB):",
                "",
                *_table(["workload", "dtype", *names], mem_rows),
            ]
        lines += ["", "</details>"]
    cn = results.get("convnet")
    if cn:
        lines += [
            "",
            f"## ConvNet SGD train step (batch {cn['batch']}, input {fmt_shape(cn['input'][1:])}, convs "
            f"{'-'.join(map(str, cn['widths']))}, strides {'-'.join(map(str, cn['strides']))}, float32, "
            f"{cn['repeats']} rounds)",
            "",
        ]
        header = [
            "contender",
            "step median (ms)",
            "min–max (ms)",
            "compile (s)",
            "temp (MiB)",
            "arguments (MiB)",
            "outputs (MiB)",
            "per BN layer: time (ms), from medians / from minima",
            "per BN layer: temp (MiB)",
        ]
        rows = []
        for name, r in cn["contenders"].items():
            m, p = r["memory"], r.get("per_bn_layer")
            rows.append(
                [
                    name,
                    _ms(r["median_ms"]),
                    f"{_ms(r['min_ms'])}–{_ms(r['max_ms'])}",
                    f"{r['compile_s']:.2f}",
                    f"{m.get('temp_size_in_bytes', float('nan')) / 2**20:.2f}",
                    f"{m.get('argument_size_in_bytes', float('nan')) / 2**20:.2f}",
                    f"{m.get('output_size_in_bytes', float('nan')) / 2**20:.2f}",
                    f"{p['time_ms']:.3g} / {p['time_from_min_ms']:.3g}" if p else "—",
                    f"{p['temp_bytes'] / 2**20:.2f}" if p else "—",
                ]
            )
        lines += _table(header, rows)
        vf = cn["bnjax_per_layer_to_flax_linen"]
        if vf:
            lines += [
                "",
                f"bnjax ÷ flax.linen, per BN layer: time {_ratio(vf.get('time_ms'))}, "
                f"temp memory {_ratio(vf.get('temp_bytes'))} (— where Flax's per-layer cost is ≤ 0).",
            ]
        cl = cn.get("layers")
        if cl:
            names = list(cl["sum_of_medians_ms"])
            lines += [
                "",
                f"The ConvNet's BN layers on their own (BN → ReLU training step at each layer's activation shape, "
                f"float32, {cl['repeats']} rounds; medians in ms):",
                "",
                *_table(
                    ["contender", *(fmt_shape(layer["shape"]) for layer in cl["layers"]), "sum", "sum ÷ flax.linen"],
                    [
                        [
                            n,
                            *(_ms(layer["contenders"][n]["median_ms"]) for layer in cl["layers"]),
                            _ms(cl["sum_of_medians_ms"][n]),
                            _ratio(cl["to_flax_linen"][n]),
                        ]
                        for n in names
                    ],
                ),
            ]
    if results["errors"]:
        lines += ["", "## Errors", ""] + [
            f"- {e['contender']} {e['workload']}: `{e['error']}`" for e in results["errors"]
        ]
    return "\n".join(lines) + "\n"
