"""Sync batch norm and precise_batch_stats across 2 processes × 4 CPU devices with gloo collectives
on 127.0.0.1."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process_full_batch():
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(WORKER.parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            outputs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rc, out, err in outputs:
        assert rc == 0, f"worker failed (rc={rc}):\n{out}\n{err[-4000:]}"
        report = json.loads(out.strip().splitlines()[-1])
        assert report["ok"], report
        for mode in ("shard_map", "sharded_jit"):
            assert report[mode]["var_f64"] <= 1e-5
        assert report["precise"]["var_rel"] <= 1e-5  # precise_batch_stats over both processes
