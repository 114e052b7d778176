"""bench/rd_defaults.py's design and choice rule on hand-made runs (no training)."""

from __future__ import annotations

import json

import pytest

GRID = {"a": ["0", "1"], "b": ["x", "y", "z"]}


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("rd_defaults")


def test_one_at_a_time_changes_one_key_from_the_defaults(bench):
    design = bench.variants(GRID, "one-at-a-time")
    assert design == [{"a": "0", "b": "x"}, {"a": "1", "b": "x"}, {"a": "0", "b": "y"}, {"a": "0", "b": "z"}]
    full = bench.variants(GRID, "full")
    assert len(full) == 6 and full[0] == design[0]  # the defaults come first in both


def _runs(accuracies: dict[str, list[float]]) -> list[dict]:
    return [{"fraction": 1.0, "seed": seed, "variant": name, "val_accuracy": acc}
            for name, accs in accuracies.items() for seed, acc in enumerate(accs)]


def test_gains_are_paired_by_seed(bench):
    # The split's difficulty moves every variant by seed; the switch adds 0.02 on every seed.
    rows = _runs({"default": [0.60, 0.80, 0.70], "switch": [0.62, 0.82, 0.72]})
    summary = bench.summarise(rows, ["default", "switch"])
    entry = next(t for t in summary["table"] if t["variant"] == "switch")
    assert entry["gain_over_defaults"] == pytest.approx(0.02)
    assert entry["gain_std"] == pytest.approx(0.0, abs=1e-12)
    assert entry["wins"] == 3 and entry["pairs"] == 3
    assert entry["std"] == pytest.approx(0.1)  # unpaired spread: 5x the gain
    assert summary["choice"]["1.0"]["recommended"] == "switch"
    assert summary["choice"]["overall"]["recommended"] == "switch"


def test_a_gain_within_its_spread_keeps_the_defaults(bench):
    # gains +0.05, -0.01, +0.02: mean 0.02, sample std sqrt((0.03^2 + 0.03^2 + 0) / 2) = 0.03 -> not adopted
    rows = _runs({"default": [0.70, 0.70, 0.70], "switch": [0.75, 0.69, 0.72]})
    summary = bench.summarise(rows, ["default", "switch"])
    entry = next(t for t in summary["table"] if t["variant"] == "switch")
    assert entry["gain_over_defaults"] == pytest.approx(0.02)
    assert entry["gain_std"] == pytest.approx(0.03)
    choice = summary["choice"]["1.0"]
    assert choice["best_by_mean"] == "switch" and choice["beat_the_defaults"] == []
    assert choice["recommended"] == "default"


def test_one_seed_never_changes_a_default(bench):
    summary = bench.summarise(_runs({"default": [0.5], "switch": [0.9]}), ["default", "switch"])
    assert summary["choice"]["1.0"]["recommended"] == "default"


def test_the_largest_paired_gain_is_recommended(bench):
    rows = _runs({"default": [0.6, 0.7], "small": [0.62, 0.72], "large": [0.65, 0.76], "worse": [0.5, 0.6]})
    choice = bench.summarise(rows, ["default", "small", "large", "worse"])["choice"]["1.0"]
    assert choice["beat_the_defaults"] == ["large", "small"] and choice["recommended"] == "large"


def test_recompute_rewrites_only_the_summary(bench, tmp_path, capsys):
    path = tmp_path / "r.json"
    rows = _runs({"default": [0.6, 0.7], "switch": [0.65, 0.76]})
    path.write_text(json.dumps({"current_defaults": "default", "runs": rows, "summary": None, "other": 1}))
    assert bench.main(["--recompute", "--output", str(path)]) == 0
    payload = json.loads(path.read_text())
    assert payload["other"] == 1 and payload["runs"] == rows
    assert payload["summary"]["choice"]["1.0"]["recommended"] == "switch"
    with pytest.raises(bench.UserError, match="no results"):
        bench.main(["--recompute", "--output", str(tmp_path / "missing.json")])
