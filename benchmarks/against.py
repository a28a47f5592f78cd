"""bnjax of this working tree against bnjax at another git revision: the same workloads, interleaved.

Answers "what did this change cost?" on one machine in one run, where the full suite
(``bench.py``) answers "how does bnjax compare with its peers?". The other revision's ``bnjax``
package is exported with ``git archive`` into a temporary directory under another name, so both
load in one process. Each workload is compiled for both, then timed round-robin (one call of
each per round, in a fresh order); the report gives each median, the median of the per-round
ratios (this tree / that revision) and XLA's temporary memory.

    .venv/bin/python benchmarks/against.py HEAD~1                    # every workload, 30 rounds
    .venv/bin/python benchmarks/against.py b7ca1f1 --only "BN train" --rounds 60
    .venv/bin/python benchmarks/against.py HEAD --quick              # tiny shapes (a smoke test)
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp

import bnjax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bnbench.timing import Timed, round_robin  # benchmarks/ is on the path now

Workload = tuple[str, Callable, jax.Array, int]  # name, fn(lib, x, params, ct), x, features


def load_revision(rev: str, into: str):
    """bnjax at ``rev``, importable as ``bnjax_at_rev`` (its own imports rewritten to that name)."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
    archive = subprocess.run(["git", "archive", rev, "bnjax"], cwd=root.stdout.strip(), capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    os.rename(os.path.join(into, "bnjax"), os.path.join(into, "bnjax_at_rev"))
    pattern = re.compile(r"\b(from|import) bnjax\b")
    for folder, _, files in os.walk(os.path.join(into, "bnjax_at_rev")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(pattern.sub(r"\1 bnjax_at_rev", text))
    for name in [m for m in sys.modules if m == "bnjax_at_rev" or m.startswith("bnjax_at_rev.")]:
        del sys.modules[name]  # a previous call's (its directory is gone)
    sys.path.insert(0, into)
    return importlib.import_module("bnjax_at_rev")


def _step(norm: Callable) -> Callable:
    """A training step: y and the vjp of y with respect to x and the parameters."""

    def run(lib, x, p, ct):
        y, vjp = jax.vjp(lambda x, p: norm(lib, x, p), x, p)
        return y, vjp(ct)

    return run


def _batch_norm_step(fused: bool) -> Callable:
    def run(lib, x, p, ct):
        s = lib.init_stats(x.shape[-1])
        (y, s2), vjp = jax.vjp(lambda x, p: lib.batch_norm(x, p, s, training=True, fused_backward=fused), x, p)
        return y, s2, vjp((ct, jax.tree.map(jnp.zeros_like, s2)))

    return run


def _vmapped(run: Callable) -> Callable:
    return lambda lib, x, p, ct: jax.vmap(lambda x, ct: run(lib, x, p, ct))(x, ct)


def workloads(quick: bool) -> list[Workload]:
    """Training steps (vjp with a fixed cotangent) and forward passes of the paths the core has:
    the rows method (layer/RMS norm), the columns method (batch/group norm, masked layer norm),
    the autodiff path, and batch norm under vmap."""
    rows, hidden = ((64, 16, 64), 64) if quick else ((64, 256, 512), 512)
    image = (4, 8, 8, 16) if quick else (64, 32, 32, 64)
    mask = (jnp.arange(rows[1]) < 3 * rows[1] // 4)[None, :, None]
    out: list[Workload] = []
    for dtype in (jnp.float32, jnp.bfloat16):
        tag = jnp.dtype(dtype).name
        x = jax.random.normal(jax.random.key(0), rows, dtype)
        xi = (jax.random.normal(jax.random.key(1), image, dtype) * 2 + 0.5).astype(dtype)
        channels = image[-1]
        out += [
            (f"LN forward {tag}", lambda lib, x, p, ct: lib.layer_norm(x, p), x, hidden),
            (f"LN train {tag}", _step(lambda lib, x, p: lib.layer_norm(x, p)), x, hidden),
            (f"RMS forward {tag}", lambda lib, x, p, ct: lib.rms_norm(x, p), x, hidden),
            (f"RMS train {tag}", _step(lambda lib, x, p: lib.rms_norm(x, p)), x, hidden),
            (f"LN masked train {tag}", _step(lambda lib, x, p: lib.layer_norm(x, p, mask=mask)), x, hidden),
            (f"BN train {tag}", _batch_norm_step(True), xi, channels),
            (f"BN autodiff train {tag}", _batch_norm_step(False), xi, channels),
            (f"GN train {tag}", _step(lambda lib, x, p: lib.group_norm(x, p, num_groups=8)), xi, channels),
            (f"BN train vmap×4 {tag}", _vmapped(_batch_norm_step(True)), xi.reshape((4, -1, *image[1:])), channels),
        ]
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the git revision to compare with (e.g. HEAD~1, a commit)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per workload (default 30)")
    parser.add_argument("--only", default="", help="run only the workloads whose name contains this")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds: a smoke test")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        other = load_revision(args.rev, tmp)
        lines = [
            f"bnjax (this tree) against bnjax at {args.rev}, {rounds} rounds, {jax.devices()[0].platform}",
            "",
            "| workload | this tree, ms | at rev, ms | ratio (median of rounds) | XLA temp MiB (this / rev) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, fn, x, c in workloads(args.quick):
            if args.only not in name:
                continue
            ct = jax.random.normal(jax.random.key(2), x.shape, x.dtype)
            timed, temp = {}, {}
            for label, lib in (("new", bnjax), ("rev", other)):
                p = lib.init_params(c)
                compiled = jax.jit(lambda x, p, ct, lib=lib, fn=fn: fn(lib, x, p, ct)).lower(x, p, ct).compile()
                temp[label] = compiled.memory_analysis().temp_size_in_bytes / 2**20
                timed[label] = Timed(compiled, lambda args=(x, p, ct): args)
            ts = round_robin(timed, rounds)
            ratio = statistics.median(a / b for a, b in zip(ts["new"], ts["rev"], strict=True))
            new, rev = (statistics.median(ts[k]) * 1e3 for k in ("new", "rev"))
            lines.append(f"| {name} | {new:.2f} | {rev:.2f} | {ratio:.2f} | {temp['new']:.1f} / {temp['rev']:.1f} |")
            print(lines[-1], flush=True)
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    main()
