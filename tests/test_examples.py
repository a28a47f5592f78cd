"""Smoke tests: the examples run (shortened) under the strict test configuration and learn."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import load_script

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))  # examples import each other, as when run as scripts


def _load(name):
    return load_script("examples", name)


def test_train_digits_learns(capsys):
    acc = _load("train_digits").main(["--epochs", "3"])
    assert acc >= 0.9  # three epochs already separate the digits; the full demo reaches ~0.98
    assert "final test accuracy" in capsys.readouterr().out


def test_data_parallel_equals_single_device_training(capsys):
    errors = _load("data_parallel").main(["--steps", "8"])
    assert set(errors) == {"pmap", "shard_map", "sharded_jit"}
    assert max(errors.values()) <= 1e-5


def test_main_demo_shortened(tmp_path):
    histories = _load("demo").main(["--epochs", "3", "--out", str(tmp_path)])
    assert set(histories) == {"with BN", "without BN"}
    assert histories["with BN"]["test_accuracy"][-1] >= 0.85  # the full 15 epochs reach ~0.99
    assert (tmp_path / "demo_curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_help_lists_defaults_and_runs_nothing(script):
    # --help must print every option with its default and exit at once (not run the computation)
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    options = [line for line in run.stdout.splitlines() if line.strip().startswith("--") and "--help" not in line]
    assert options, run.stdout
    assert " ".join(run.stdout.split()).count("(default:") == len(options), run.stdout


def test_flax_swap_keeps_checkpoints_and_outputs(capsys):
    diffs = _load("flax_swap").main(["--steps", "2"])
    nan_count = diffs.pop("flax on the padded batch: NaN outputs at real tokens")
    assert nan_count >= 0  # Flax's behaviour, reported; bnjax's outputs are compared below
    assert len(diffs) == 8 and max(diffs.values()) <= 2e-5, diffs
    assert diffs["bnjax, other padding values (at real tokens)"] == 0.0


def test_train_lm_tensor_parallel_bnjax_equals_flax(tmp_path):
    args = ["--steps", "4", "--batch", "4", "--seq", "16", "--hidden", "32", "--corpus-bytes", "100000"]
    curves = _load("train_lm").main([*args, "--out", str(tmp_path)])
    bn, fx = curves["bnjax"]["train"], curves["flax"]["train"]
    assert len(bn) == 4 and bn[-1] < bn[0]  # it learns
    np.testing.assert_allclose(bn, fx, rtol=1e-5)  # the same function, on a sharded hidden axis
    assert curves["max_abs_difference"]["train"][0] <= 1e-4
    assert (tmp_path / "train_lm.png").stat().st_size > 10_000


def test_precise_bn_recovers_population_statistics(capsys):
    # one short epoch of batch-8 training with momentum 0.999: the EMA statistics lag far behind
    r = _load("precise_bn").main(["--epochs", "1", "--batch", "8", "--momentum", "0.999"])
    assert "precise (population) statistics" in capsys.readouterr().out
    assert r["precise"]["accuracy"] >= r["ema"]["accuracy"] + 0.02  # typically 0.94-0.96 against 0.73-0.90
    assert r["precise"]["loss"] < 0.5 * r["ema"]["loss"]
    assert r["precise_vs_float64"] <= 1e-4
    # the first batch norm's inputs are x @ W: its population statistics in float64, from the weights
    x_train = np.asarray(r["data"][0], np.float64)
    ema, precise = r["variables"]["ema"], r["variables"]["precise"]
    h = x_train @ np.asarray(precise["params"]["Dense_0"]["kernel"], np.float64)
    stats = precise["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(np.asarray(stats["mean"]), h.mean(0), rtol=1e-4, atol=1e-5 * h.std(0).max())
    np.testing.assert_allclose(np.asarray(stats["var"]), h.var(0), rtol=1e-4)
    assert np.max(np.abs(np.asarray(ema["batch_stats"]["BatchNorm_0"]["var"]) / h.var(0) - 1)) > 0.5
    # precise_batch_stats leaves the weights alone
    for a, b in zip(jax.tree.leaves(ema["params"]), jax.tree.leaves(precise["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_torch_to_flax_resnet18_agrees_before_and_after_training_and_folding(capsys):
    # batch 8: with batch 4 at 32x32 the last stage's batch norms see 4 values per channel, and
    # the eval logits after training amplify float32 differences to ~1e-2 (the statistics still
    # agree to 2e-5)
    r = _load("torch_to_flax").main(["--steps", "2", "--batch", "8", "--size", "32"])
    assert "strict load" in capsys.readouterr().out
    for key in (
        "logits_rel_diff_converted",
        "logits_rel_diff_trained",
        "logits_rel_diff_folded",
        "logits_rel_diff_round_trip",
    ):
        assert r[key] <= 1e-4, (key, r[key])
    assert max(r["running_stats_rel_diff"].values()) <= 1e-4
    assert r["folded_pairs"] == 20 and r["kept"] == {}  # every BatchNorm of ResNet-18 follows its conv
    for torch_loss, flax_loss in r["losses"]:
        assert abs(torch_loss - flax_loss) <= 1e-4 * abs(torch_loss)
