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
