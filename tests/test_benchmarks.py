"""Smoke test: the benchmark suite runs (``--quick``) under the strict test configuration.

It checks the structure of ``results.json`` and ``results.md`` and that every timing is finite and
positive; it deliberately asserts no speed ratio (timings on a shared machine are noise).
"""

from __future__ import annotations

import json
import math

from tests.helpers import load_script


def _load(name):
    return load_script("benchmarks", name)


def _positive_timings(entry):
    assert entry["times_s"] and all(math.isfinite(t) and t > 0 for t in entry["times_s"])
    for key in ("median_ms", "min_ms", "max_ms"):
        assert math.isfinite(entry[key]) and entry[key] > 0
    assert entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]


def test_bench_quick(tmp_path, capsys):
    bench = _load("bench")
    returned = bench.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    assert md in capsys.readouterr().out
    assert results["quick"] and results["errors"] == [] and returned["errors"] == []

    env = results["environment"]
    assert env["backend"] and env["cpu_model"] and env["versions"]["jax"] and env["versions"]["flax"]
    skipped = results["skipped"]
    assert all(isinstance(reason, str) and reason for reason in skipped.values())

    micro = results["micro"]
    assert {r["mode"] for r in micro} == set(bench.MODES)
    assert "renorm_train" in bench.MODES
    assert {r["dtype"] for r in micro} == {"float32", "bfloat16"}
    for r in micro:
        names = set(r["contenders"])
        if r["layer"] == "renorm":  # only bnjax and the naive jnp version have batch renorm
            expected = {"bnjax", "bnjax (autodiff)", "bnjax.batch_norm", "naive jnp", "limit"}
            assert names == expected, (r["mode"], names)
        else:
            expected = {"bnjax", "flax.linen", "flax.nnx", "naive jnp", "limit"}
            expected |= {n for n in ("haiku", "equinox") if n not in skipped}
            if r["mode"].endswith("train"):
                expected.add("bnjax (autodiff)")
            assert expected <= names, (r["mode"], names)
        assert any(n.startswith("torch") for n in names) == ("torch" not in skipped and r["layer"] != "renorm")
        for entry in r["contenders"].values():
            _positive_timings(entry)
            assert len(entry["times_s"]) == r["repeats"]
        q = r["ratios"]
        assert q["best_peer"] in bench.PEERS and q["best_peer"] in names
        for key in ("to_best_peer", "to_limit"):
            assert math.isfinite(q["bnjax"][key]) and q["bnjax"][key] > 0
        assert set(r["donated"]) == {"bnjax", q["best_peer"]}
        for entry in r["donated"].values():
            _positive_timings(entry)
        for name, entry in r["contenders"].items():
            if not name.startswith("torch"):
                assert entry["compile_s"] > 0 and entry["memory"]["output_size_in_bytes"] > 0

    conv = results["convnet"]
    rows = conv["contenders"]
    assert {"no BN", "bnjax", "flax.linen", "flax.nnx"} <= set(rows)
    for name, row in rows.items():
        _positive_timings(row)
        assert row["compile_s"] > 0 and row["memory"]["argument_size_in_bytes"] > 0
        assert ("per_bn_layer" in row) == (name != "no BN")
        if name != "no BN":
            assert all(math.isfinite(v) for v in row["per_bn_layer"].values())

    layers = conv["layers"]
    assert [layer["shape"][1:] for layer in layers["layers"]] == [[16, 16, 8], [16, 16, 8], [8, 8, 16], [4, 4, 16]]
    for layer in layers["layers"]:
        assert {"bnjax", "flax.linen"} <= set(layer["contenders"])
        for entry in layer["contenders"].values():
            _positive_timings(entry)
    assert layers["to_flax_linen"]["flax.linen"] == 1.0 and layers["to_flax_linen"]["bnjax"] > 0

    for title in (t for _, t in bench.MODES.values()):
        assert f"## {title}" in md
    assert "## ConvNet SGD train step" in md and "BN layers on their own" in md
    assert md.count("|") > 200


def test_sequence_bench_quick(tmp_path, capsys):
    seq = _load("sequence")
    seq.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "sequence.json").read_text())
    assert (tmp_path / "sequence.md").read_text() in capsys.readouterr().out
    assert len(results["residual"]) == 2  # float32 and bfloat16 x
    for rec in results["residual"]:
        for mode in ("train", "fwd"):
            assert set(rec[mode]) == {*seq._rms_pairs(rec["dtype"]), "memory floor"}
            for entry in rec[mode].values():
                _positive_timings(entry)
    (sharded,) = results["sharded"]
    assert "skipped" not in sharded, sharded  # the test configuration has 8 devices
    for entry in sharded["train"].values():
        _positive_timings(entry)


def test_ln_bound_runs_and_its_formula_is_bnjax(capsys):
    """The layer-norm ablation runs, and its written-out formula still gives bnjax.layer_norm's
    output bit for bit (``run`` raises otherwise), in both dtypes and on the rows method."""
    bound = _load("ln_bound")
    bound.main(["--shape", "4096,16", "--rounds", "1"])
    out = capsys.readouterr().out
    for name in ("  bnjax formula ", "  without the clamp ", "  without the correction ", "  floor (read x, write y) "):
        assert out.count(name) == 2, name  # float32 and bfloat16


def test_against_revision_quick(capsys):
    """benchmarks/against.py loads HEAD's bnjax beside this tree's and times both on a workload."""
    against = _load("against")
    report = against.main(["HEAD", "--quick", "--only", "BN train float32"])
    rows = [line for line in report.splitlines() if line.startswith("| BN train float32")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert all(math.isfinite(float(c)) and float(c) > 0 for c in cells[1:4])
    assert report in capsys.readouterr().out
