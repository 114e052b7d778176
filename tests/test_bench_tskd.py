"""bench/tskd.py's bookkeeping: label budgets, the summary, what the protocol leaves out."""

from __future__ import annotations

import pytest

from medkd.toolchain.data.segmentation import budget_size
from medkd.toolchain.errors import UserError


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("tskd")


def test_a_budget_of_n_slices_keeps_exactly_n_labelled(bench):
    for available in (70, 71):
        for slices in range(1, available + 1):
            assert budget_size(available, bench.budget_fraction(slices, available)) == slices
    with pytest.raises(UserError, match="outside 1..70"):
        bench.budget_fraction(80, 70)


def _row(mode, budget, seed, dice, teacher=None):
    return {"mode": mode, "budget": budget, "seed": seed, "test_mean_dice": dice, "test_mean_hd95_mm": 10.0 * dice,
            "teacher_test_mean_dice": teacher, "wall_s": 100.0}


def test_summary_is_mean_and_std_over_seeds_per_budget_and_mode(bench):
    rows = [_row("tskd", 10, 0, 0.5, 0.6), _row("tskd", 10, 1, 0.7, 0.8), _row("scratch", 10, 0, 0.2)]
    summary = {(s["budget"], s["mode"]): s for s in bench.summarise(rows)}
    tskd = summary[(10, "tskd")]
    assert tskd["dice"] == pytest.approx(0.6) and tskd["dice_std"] == pytest.approx(0.1414, abs=1e-4)
    assert tskd["teacher_dice"] == pytest.approx(0.7) and tskd["seeds"] == 2
    assert summary[(10, "scratch")]["teacher_dice"] is None and summary[(10, "scratch")]["dice_std"] == 0.0


def test_protocol_is_every_mode_budget_and_seed_at_default_settings(bench):
    full = [_row(m, b, s, 0.5) for m in bench.MODES for b in bench.BUDGETS for s in bench.SEEDS]
    assert bench.protocol_gaps(full, []) == []
    assert bench.protocol_gaps(full[1:], []) == [f"{full[0]['mode']} 10 slices seed 0 not run"]
    assert bench.protocol_gaps(full, ["data.image_size=64"])[-1].startswith("settings other than")
