"""Benchmarks for bnjax: normalization-layer microbenchmarks and a small ConvNet train step.

The command line of ``benchmarks/bench.py`` and ``main``: runs parts 1 and 2, writes
``results.json`` and ``results.md`` to ``--out`` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from .contenders import availability
from .convnet import run_conv_layers, run_convnet
from .micro import run_micro
from .report import cores, environment, markdown

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results"  # benchmarks/results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and 3 rounds (a smoke test, ~1.5 min on 2 cores)")
    p.add_argument("--out", default=str(RESULTS), help="output folder")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per workload (default 20; quick 3)")
    p.add_argument("--torch-threads", type=int, default=None, help="PyTorch intra-op threads (default: usable cores)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    env = environment()  # now: the bnjax source state that was imported, not the one at the end
    repeats = args.repeats or (3 if args.quick else 20)
    skipped = availability()
    if "torch" not in skipped:
        import torch

        torch.set_num_threads(args.torch_threads or cores())
    errors: list[dict[str, Any]] = []
    micro = run_micro(args.quick, repeats, skipped, errors)
    print("[bench] convnet", file=sys.stderr, flush=True)
    conv = run_convnet(args.quick, repeats, skipped, errors)
    print("[bench] convnet layers", file=sys.stderr, flush=True)
    conv["layers"] = run_conv_layers(conv, repeats, skipped, errors)
    results = {
        "command": ["benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])],
        "quick": args.quick,
        "environment": env,
        "torch_threads": None if "torch" in skipped else __import__("torch").get_num_threads(),
        "skipped": skipped,
        "errors": errors,
        "micro": micro,
        "convnet": conv,
    }
    results["wall_time_s"] = time.perf_counter() - start
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    return results
