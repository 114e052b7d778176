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
    assert bench.protocol_gaps(full, []) == []
    assert bench.protocol_gaps(full[1:], []) == ["ogkd seed 0 not run"]
    assert bench.protocol_gaps(full, ["recipe.shots=4"])[-1].startswith("settings other than")
