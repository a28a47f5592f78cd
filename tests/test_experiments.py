"""Smoke tests: the experiment scripts run (``--quick``) under the strict test configuration.

They check that each script writes its figure and table and returns finite, well-formed results;
they deliberately do not assert the scientific claims (which method converges faster, tolerates
larger learning rates or is smoother), which a short run cannot establish without flakiness.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from tests.helpers import load_script

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))


def _load(name):
    return load_script("examples", name)


def _outputs_exist(tmp_path, stem):
    assert (tmp_path / f"{stem}.png").stat().st_size > 10_000
    table = (tmp_path / f"{stem}.md").read_text()
    assert table.count("|") > 10
    return table


def test_exp_convergence_quick(tmp_path, capsys):
    module = _load("exp_convergence")
    results = module.main(["--quick", "--out", str(tmp_path)])
    table = _outputs_exist(tmp_path, "exp_convergence")
    assert table in capsys.readouterr().out
    assert {"none", "batch", "layer", "group"} <= set(results) <= {"none", "batch", "layer", "group", "weight"}
    for r in results.values():
        assert np.all(np.isfinite(r["loss"])) and r["loss"].shape[0] == 2  # two seeds in --quick
        assert np.all((r["accuracy"] >= 0) & (r["accuracy"] <= 1))
        assert np.all(np.isfinite(r["final_loss"]))
        steps = r["steps_to_target"]
        assert np.all(np.isnan(steps) | ((steps > 0) & (steps <= r["eval_steps"][-1])))
    assert np.all(results["batch"]["final_accuracy"] > 0.8)


def test_exp_lr_tolerance_quick(tmp_path, capsys):
    module = _load("exp_lr_tolerance")
    results = module.main(["--quick", "--out", str(tmp_path)])
    table = _outputs_exist(tmp_path, "exp_lr_tolerance")
    assert table in capsys.readouterr().out
    assert set(results) == {"without BN", "with BN"}
    for r in results.values():
        n_lrs = len(r["lrs"])
        assert r["final_loss"].shape == r["peak_loss"].shape == r["test_accuracy"].shape == (n_lrs, 2)
        assert np.all(np.diff(np.log(r["lrs"])) > 0)
        # the zero output layer makes the first mini-batch loss exactly ln 2, so the peak is at least that
        peak = r["peak_loss"]
        assert np.all(np.isposinf(peak) | (peak >= module.INITIAL_LOSS * (1 - 1e-6)))
        assert np.all(np.isfinite(r["final_loss"][0]))  # the smallest learning rate cannot overflow
        assert r["stable"].shape == r["learned"].shape == (n_lrs,)
        if r["stable"].any():
            assert r["largest_stable_lr"] in r["lrs"]
            assert 0 <= r["best_loss"] <= module.INITIAL_LOSS
            assert 0 <= r["best_accuracy"] <= 1
        else:
            assert np.isnan(r["largest_stable_lr"])


def test_exp_smoothness_quick(tmp_path, capsys):
    module = _load("exp_smoothness")
    out = module.main(["--quick", "--out", str(tmp_path)])
    table = _outputs_exist(tmp_path, "exp_smoothness")
    assert table in capsys.readouterr().out
    assert set(out["curves"]) == set(out["summary"]) == {"without BN", "with BN"}
    n_layers = len(module.HIDDEN) + 1
    for r in out["curves"].values():
        n_probes = len(r["probe_steps"])
        assert n_probes >= 2
        for key in ("beta_eff", "grad_change", "loss_range", "grad_norm", "loss"):
            assert r[key].shape == (2, n_probes)
            assert np.all(np.isfinite(r[key])) and np.all(r[key] >= 0)
        assert np.all(r["beta_eff"] > 0)
        assert r["input_sq_norm"].shape == (2, n_probes, n_layers)
        assert r["pre_sq_norm"].shape == (2, n_probes, n_layers - 1)
        assert np.all(np.isfinite(r["input_sq_norm"])) and np.all(r["input_sq_norm"] > 0)
        assert np.all(np.isfinite(r["train_loss"]))
    # the first layer's input is the data: the same batches for both variants, so the same E‖x‖²
    np.testing.assert_allclose(
        out["curves"]["with BN"]["input_sq_norm"][..., 0], out["curves"]["without BN"]["input_sq_norm"][..., 0]
    )
