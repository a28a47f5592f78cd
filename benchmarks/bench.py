"""Benchmarks for bnjax: normalization-layer microbenchmarks and a small ConvNet train step.

    python benchmarks/bench.py [--quick] [--out benchmarks/results] [--repeats N] [--torch-threads N]

Part 1 times batch norm (training mode, NHWC, feature axis -1) and layer norm (last axis) in
float32 and bfloat16, in two modes each: a jitted training step (the gradients w.r.t. x, scale and
bias of sum(y * ct) for a fixed cotangent ct, plus the updated running statistics for batch norm)
and an evaluation forward pass; and the batch renorm training step (``bnjax.batch_renorm``, r_max 3,
d_max 5) against a naive jnp renorm and ``bnjax.batch_norm``. Contenders: bnjax (fused closed-form
backward, the default, and ``fused_backward=False``), flax.linen, flax.nnx, Haiku, Equinox, a naive
jnp version, PyTorch CPU (only when JAX's default backend is the CPU) and a memory-traffic limit
(plain elementwise kernels over the same bytes). After compilation and warm-up, calls are
interleaved: one call of each contender per round, in a random order each round; medians, min–max
and ratios are reported. Part 2 compiles and times one SGD train step of a 4-layer ConvNet with
each batch norm and without normalization, with XLA's memory analysis.

Writes ``results.json`` (everything, raw timings included) and ``results.md`` (tables) to ``--out``
and prints the Markdown. Runs unchanged on a GPU (JAX's default backend; PyTorch CPU is skipped).

This file is the entry point; the suite is the package ``benchmarks/bnbench`` (see
``benchmarks/README.md``), whose main names are re-exported here.
"""

from __future__ import annotations

import os
import sys

# the package next to this file, also when this file is imported by path (the tests) rather than run
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bnbench.cli import main, parse_args
from bnbench.contenders import JAX_BUILDERS, JAX_CONTENDERS, PEERS, JaxNorm, availability
from bnbench.convnet import CONV_BUILDERS, run_conv_layers, run_convnet
from bnbench.micro import ratios, run_micro, run_workload
from bnbench.report import environment, markdown
from bnbench.timing import Timed, compile_timed, round_robin, summarize
from bnbench.workloads import DTYPES, EPS, MODES

__all__ = [
    "CONV_BUILDERS",
    "DTYPES",
    "EPS",
    "JAX_BUILDERS",
    "JAX_CONTENDERS",
    "MODES",
    "PEERS",
    "JaxNorm",
    "Timed",
    "availability",
    "compile_timed",
    "environment",
    "main",
    "markdown",
    "parse_args",
    "ratios",
    "round_robin",
    "run_conv_layers",
    "run_convnet",
    "run_micro",
    "run_workload",
    "summarize",
]

if __name__ == "__main__":
    main()
