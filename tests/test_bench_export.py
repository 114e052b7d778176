"""Smoke test of bench/export.py's pieces on a tiny CNN (no training, no MRI data): < 30 s."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medkd.export.onnx_export import export_onnx

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "export.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_export", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3)).eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(model, torch.rand(2, 1, 8, 8), path)
    return path


def _variant(acc, size, b1, b32):
    return {"test_accuracy": acc, "size_bytes": size,
            "latency": {1: {"p50_ms": b1}, 32: {"p50_ms": b32}}}


def test_ratios_and_goals(bench):
    fp32 = _variant(0.90, 4000, 2.0, 40.0)
    int8 = _variant(0.897, 1000, 1.0, 16.0)
    ratios = bench.int8_ratios(fp32, int8)
    assert ratios["speedup_b1"] == pytest.approx(2.0)
    assert ratios["speedup_b32"] == pytest.approx(2.5)
    assert ratios["size_ratio"] == pytest.approx(0.25)
    assert ratios["accuracy_drop_points"] == pytest.approx(0.3)

    variants = {"fp32": fp32, "int8-cpu": {**int8, "vs_fp32": ratios},
                "int8-tensorrt": {"error": "boom"},
                "openvino-nncf-int8": _variant(0.9, 1100, 0.9, 15.0)}
    goals = {g["goal"]: g for g in bench.goals_for("tiny", variants, None)}
    assert goals["int8-cpu accuracy drop <= 0.5 points"]["met"] is True
    assert goals["int8-cpu >= 2x faster than fp32 at batch 32"]["met"] is True
    assert goals["int8-cpu at least as fast as OpenVINO+NNCF int8 at batch 32"]["met"] is False  # 15 < 16 ms
    assert goals["int8-cpu file <= 1/3.5 of fp32"]["met"] is True
    assert goals["int8-tensorrt accuracy drop <= 0.5 points"]["met"] is None  # failed preset: not measured

    missing = bench.goals_for("tiny", {"fp32": fp32}, "openvino/nncf not importable")
    peer_goal = next(g for g in missing if "OpenVINO" in g["goal"])
    assert peer_goal["met"] is None and "not importable" in peer_goal["figure"]


def test_interleaved_latency_pools_rounds_and_reports_failures(bench):
    calls = []

    class Fake:
        def __init__(self, name, ms):
            self.name, self.ms = name, ms

        def times(self, batch, warmup, runs):
            calls.append((self.name, batch, runs))
            return np.full(runs, self.ms * batch)

    class Broken:
        def times(self, batch, warmup, runs):
            raise RuntimeError("no kernel")

    out = bench.interleaved_latency({"a": Fake("a", 1.0), "b": Fake("b", 2.0), "x": Broken()},
                                    (1, 32), runs=7, warmup=0, rounds=3, log=lambda line: None)
    assert out["a"][32]["p50_ms"] == 32.0 and out["b"][1]["p50_ms"] == 2.0
    assert out["a"][1]["runs"] == 7 and len(out["a"][1]["round_p50_ms"]) == 3
    assert out["x"] == {"error": "RuntimeError: no kernel"}
    # Variants take turns within each round: a, b, a, b, ... never all of a first.
    assert [c[0] for c in calls[:4]] == ["a", "b", "a", "b"]


def test_calibration_comes_from_training_indices(bench):
    index = bench.calibration_split(100, 30, seed=0)
    assert len(index) == 30 and len(set(index.tolist())) == 30 and int(index.max()) < 100
    assert torch.equal(index, bench.calibration_split(100, 30, seed=0))


def test_int8_cpu_and_ort_timer(bench, tiny_onnx, tmp_path):
    calibration = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    from medkd.export.quantize import quantize

    int8 = tmp_path / "tiny.int8.onnx"
    quantize("int8-cpu", tiny_onnx, int8, calibration)
    timer = bench.OrtTimer(int8, (1, 8, 8), threads=1)
    times = timer.times(batch=4, warmup=1, runs=3)
    assert times.shape == (3,) and (times > 0).all()
    assert bench.onnx_size(int8) > 0  # a model this tiny is all Q/DQ overhead: no size claim


def test_openvino_peer(bench, tiny_onnx, tmp_path):
    if bench.peer_unavailable():
        pytest.skip(f"openvino/nncf not installed: {bench.peer_unavailable()}")
    import openvino as ov

    images = np.random.default_rng(1).random((8, 1, 8, 8), dtype=np.float32)
    compiled, props = bench.openvino_compiled(ov.Core().read_model(str(tiny_onnx)), threads=1)
    assert props["INFERENCE_NUM_THREADS"] == "1" and "LATENCY" in props["PERFORMANCE_HINT"]
    from medkd.export.evaluate import onnx_logits

    np.testing.assert_allclose(bench.openvino_logits(compiled, images, batch=3), onnx_logits(tiny_onnx, images),
                               atol=1e-4)
    quantized, info = bench.nncf_int8(tiny_onnx, images, transformer=False, out_xml=tmp_path / "q.xml")
    assert info["nncf_options"]["subset_size"] == 8 and bench.ir_size(tmp_path / "q.xml") > 0
    compiled_q, _ = bench.openvino_compiled(quantized, threads=1)
    assert bench.OpenVinoTimer(compiled_q, (1, 8, 8)).times(batch=2, warmup=1, runs=2).shape == (2,)


def test_cli_arguments(bench):
    args = bench.parse_args(["--students", "mobilenetv3", "--epochs", "1", "--runs", "3", "--rounds", "5"])
    assert args.students == ["mobilenetv3"] and args.rounds == 3  # never more rounds than runs
    cfg = bench.bench_config(args, "mobilenetv3")
    assert cfg.recipe.name == "scratch" and cfg.train.epochs == 1 and cfg.data.name == "mri"


def test_merge_keeps_other_students(bench, tmp_path):
    import json

    earlier = {"command": "python bench/export.py", "complete": False, "results": [
        {"student": "resnet18", "variants": {"fp32": {"test_accuracy": 0.9, "size_bytes": 4,
                                                      "latency": {"1": {"p50_ms": 1.0}, "32": {"p50_ms": 9.0}}}}},
        {"student": "vit_tiny", "variants": {}},
    ]}
    path = tmp_path / "export.json"
    path.write_text(json.dumps(earlier))
    kept = bench.previous_results(path, ["vit_tiny"])
    assert [r["student"] for r in kept] == ["resnet18"]
    assert kept[0]["variants"]["fp32"]["latency"][32]["p50_ms"] == 9.0  # batch keys back to ints
    assert kept[0]["provenance"]["command"] == "python bench/export.py"
    assert bench.previous_results(tmp_path / "missing.json", ["vit_tiny"]) == []
    assert [r["student"] for r in bench.ordered([{"student": "vit_tiny"}, *kept])] == ["resnet18", "vit_tiny"]


def test_chance_level_fp32_makes_no_accuracy_claim(bench):
    variants = {"fp32": _variant(1 / 7, 4000, 2.0, 40.0),
                "int8-cpu": {**_variant(1 / 7, 1000, 1.0, 16.0), "vs_fp32": {"accuracy_drop_points": 0.0}}}
    goals = {g["goal"]: g for g in bench.goals_for("vit", variants, None, chance=1 / 7)}
    assert goals["int8-cpu accuracy drop <= 0.5 points"]["met"] is None
    assert "chance level" in goals["int8-cpu accuracy drop <= 0.5 points"]["figure"]
