"""bench/kernels.py's CPU-reachable parts: the LoRKD expert shapes it times and its
interpreter smoke run (the timed GPU run needs a CUDA device)."""

from __future__ import annotations


import pytest

from medkd.toolchain.config import load_config



@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("kernels")


def test_lorkd_shapes_cover_every_pointwise_and_linear_expert(bench):
    shapes = bench.lorkd_shapes("mobilenetv3", batch_size=6)
    cfg = load_config(["recipe=lorkd", "data=multitask", "student=mobilenetv3"])
    # Every 1x1 conv and linear with an expert is one call of the fused op per forward.
    from medkd.recipes import build_recipe
    from medkd.toolchain.data.base import TaskInfo
    from medkd.toolchain.models.experts import ExpertConv2d, ExpertLinear
    from medkd.toolchain.models.students import build_student

    tasks = [TaskInfo(name=n, class_names=[f"{n}:{k}" for k in range(4)], offset=4 * i)
             for i, n in enumerate(cfg.data.tasks)]
    size = int(cfg.data.image_size)
    recipe = build_recipe(cfg.recipe, build_student(cfg.student, 4 * len(tasks), 3, size), 8, tasks=tasks)
    fused_layers = [m for _, m in recipe.student.modules_with_experts()
                    if isinstance(m, ExpertLinear) or (isinstance(m, ExpertConv2d) and m.pointwise)]
    assert sum(s["layers"] for s in shapes) == len(fused_layers) > 10
    assert all(s["rank"] == cfg.recipe.rank and s["tasks"] == len(tasks) for s in shapes)
    # Rows are batch x H x W of a 1x1 conv's input: a multiple of the batch, at most batch x size^2.
    assert all(s["n"] % 6 == 0 and s["n"] <= 6 * size * size for s in shapes)
    assert any(s["d_in"] != s["d_out"] for s in shapes)  # the point: LoRKD's layers are not square


def test_interpreter_smoke_runs_a_non_square_case(bench, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main() sets it; restored after the test
    assert bench.main(["--interpret-smoke", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "d=32>24" in out and " yes " in out  # fused matched eager on the CPU interpreter


def test_tuner_keeps_the_fastest_candidate_whose_output_is_right(bench, monkeypatch, tmp_path):
    """--tune's bookkeeping on the CPU interpreter with a stand-in timer (cost = a function of
    the tiles): a candidate that gives wrong output is refused even though it is the
    cheapest, the score weights each shape by its layer count, and float16 takes
    bfloat16's winner."""
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launched = []
    run_kernel = bench._run_kernel

    def spying(kernel, case, tiles):
        launched.append(tiles)
        out = run_kernel(kernel, case, tiles)
        if tiles is not None and tiles.block_n == 16 and tiles.block_m == 16:  # the "broken" candidate
            out = tuple(o * 1.5 for o in out)
        return out

    def timer(fn):
        fn()
        t = launched[-1]
        return t.block_m + t.block_n / 10

    monkeypatch.setattr(bench, "_run_kernel", spying)
    shapes = [{"n": 40, "d_in": 24, "d_out": 20, "rank": 2, "tasks": 3, "layers": 2},
              {"n": 17, "d_in": 16, "d_out": 16, "rank": 2, "tasks": 3, "layers": 1}]
    candidates = [(16, 16, 16, 1, 1), (32, 16, 16, 1, 1), (16, 32, 16, 1, 1)]
    written = []
    report = bench.tune_lowrank(shapes, ["bfloat16"], torch.device("cpu"), written.append,
                                timer=timer, candidates=candidates)
    assert len(written) == 2  # after the forward, after the backward
    for kernel in ("fwd", "bwd"):
        rows = report["scores"][kernel]["bfloat16"]["candidates"]
        assert rows[0]["step_ms"] is None and "max rel err" in rows[0]["error"]
        assert rows[1]["step_ms"] == pytest.approx(3 * (32 + 1.6))
        assert rows[2]["step_ms"] == pytest.approx(3 * (16 + 3.2))
        best = report["best"]["lowrank_expert_linear"][kernel]
        assert best["bfloat16"] == best["float16"] == {"block_m": 16, "block_n": 32, "block_k": 16,
                                                       "num_warps": 1, "num_stages": 1}
        current = report["scores"][kernel]["bfloat16"]["current_step_ms"]
        assert report["speedup_over_current"][kernel]["bfloat16"] == pytest.approx(current / (3 * 19.2))
