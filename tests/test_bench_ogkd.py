"""bench/ogkd.py's bookkeeping: the summary over seeds and what the protocol leaves out."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("ogkd")


def _row(objective, seed, base, novel):
    hm = 2 * base * novel / (base + novel)
    scores = {"base": base, "novel": novel, "harmonic_mean": hm}
    return {"objective": objective, "seed": seed, "prompt_tuned": scores, "zero_shot": scores, "wall_s": 10.0}


def test_summary_is_mean_and_std_over_seeds_per_objective_in_protocol_order(bench):
    rows = [_row("coop", 0, 0.5, 0.1), _row("ogkd", 0, 0.6, 0.2), _row("ogkd", 1, 0.4, 0.4)]
    summary = bench.summarise(rows)
    assert [s["objective"] for s in summary] == ["ogkd", "coop"]
    ogkd = summary[0]
    assert ogkd["seeds"] == 2 and ogkd["base"]["mean"] == pytest.approx(0.5)
    assert ogkd["base"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert ogkd["novel"]["mean"] == pytest.approx(0.3) and summary[1]["novel"]["std"] == 0.0
    assert ogkd["harmonic_mean"]["mean"] == pytest.approx((0.3 + 0.4) / 2)


def test_protocol_is_every_objective_and_seed_at_default_settings(bench):
    full = [_row(o, s, 0.5, 0.5) for o in bench.OBJECTIVES for s in bench.SEEDS]
    assert bench.protocol_gaps(full, [], [None]) == []
    assert bench.protocol_gaps(full[1:], [], [None]) == ["ogkd seed 0 not run"]
    assert bench.protocol_gaps(full, ["recipe.shots=4"], [None])[-1].startswith("settings other than")


def test_few_shot_rows_group_by_shots_and_have_no_novel_scores(bench):
    def few(objective, shots, seed, accuracy):
        scores = {"base": accuracy, "novel": None, "harmonic_mean": None}
        return {"objective": objective, "shots": shots, "seed": seed, "prompt_tuned": scores,
                "zero_shot": scores, "wall_s": 1.0}

    rows = [few("coop", 4, 0, 0.3), few("ogkd", 4, 0, 0.5), few("ogkd", 4, 1, 0.7), few("ogkd", 1, 0, 0.2)]
    summary = bench.summarise(rows)
    assert [(s["objective"], s["shots"]) for s in summary] == [("ogkd", 1), ("ogkd", 4), ("coop", 4)]
    assert summary[1]["base"]["mean"] == pytest.approx(0.6) and summary[1]["seeds"] == 2
    assert summary[1]["novel"] is None and summary[1]["harmonic_mean"] is None
    gaps = bench.protocol_gaps(rows, [], [1, 4])
    assert "kd 1-shot seed 0 not run" in gaps and "ogkd 4-shot seed 0 not run" not in gaps
    assert len(gaps) == 2 * len(bench.OBJECTIVES) * len(bench.SEEDS) - len(rows)
    args = bench.parse_args(["--few-shot", "--shots", "1", "4"])
    assert args.output == bench.FEW_SHOT_RESULTS and args.shots == [1, 4]
    assert bench.parse_args([]).shots == [None] and bench.parse_args([]).output == bench.RESULTS
