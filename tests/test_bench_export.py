"""Smoke test of bench/export.py's pieces on a tiny CNN (no training, no MRI data): < 30 s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medkd.export.onnx_export import export_onnx



@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("export")


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
    assert goals["int8-cpu without the guard: accuracy drop <= 0.5 points"]["met"] is True
    assert goals["int8-cpu >= 2x faster than fp32 at batch 32"]["met"] is True
    assert goals["int8-cpu at least as fast as OpenVINO+NNCF int8 at batch 32"]["met"] is False  # 15 < 16 ms
    assert goals["int8-cpu file <= 1/3.5 of fp32"]["met"] is True
    assert goals["int8-tensorrt without the guard: accuracy drop <= 0.5 points"]["met"] is None  # failed preset
    # No guard record (an entry from before the guard): said so, never guessed from the bare drop.
    guarded = goals["int8-cpu with the guard: accuracy drop <= 0.5 points"]
    assert guarded["met"] is None and guarded["figure"] == bench.GUARD_NOT_MEASURED

    missing = bench.goals_for("tiny", {"fp32": fp32}, "openvino/nncf not importable")
    peer_goal = next(g for g in missing if "OpenVINO" in g["goal"])
    assert peer_goal["met"] is None and "not importable" in peer_goal["figure"]


def _guard(held, deploys, kept=(), bare_drop=5.0, drop=0.2):
    return {"held": held, "deploys": deploys, "kept_high_precision": list(kept), "seconds": 12.0,
            "quantizations": 4, "thresholds": {"max_accuracy_drop_points": 0.5, "min_agreement": 0.98},
            "validation_bare": {"metric_drop_points": bare_drop, "top1_agreement": 0.9},
            "comparison": {"metric_drop_points": drop, "top1_agreement": 0.99}}


def _with_ratios(bench, variants):
    for name, v in variants.items():
        if name != "fp32":
            v["vs_fp32"] = bench.int8_ratios(variants["fp32"], v)
    return variants


def test_goal_with_the_guard_uses_what_medkd_deploys(bench):
    """Synthetic numbers: the cpu preset needs the guard's kept layers, the TensorRT one is refused."""
    variants = _with_ratios(bench, {
        "fp32": _variant(0.900, 4000, 2.0, 40.0),
        "fp16": _variant(0.899, 2000, 2.0, 40.0),
        "int8-cpu": {**_variant(0.800, 1000, 1.0, 16.0), "guard": _guard(True, "int8-cpu+guard", ["conv2"])},
        "int8-cpu+guard": _variant(0.896, 1100, 1.2, 25.0),
        "int8-tensorrt": {**_variant(0.700, 1000, 5.0, 90.0), "guard": _guard(False, "fp16", ["a", "b"], drop=3.0)},
    })
    goals = {g["goal"]: g for g in bench.goals_for("tiny", variants, None)}
    cpu = goals["int8-cpu with the guard: accuracy drop <= 0.5 points"]
    assert cpu["met"] is True and cpu["measured"] == pytest.approx(0.4)  # 0.900 - 0.896, not the bare 10 points
    assert "int8-cpu+guard" in cpu["figure"]
    trt = goals["int8-tensorrt with the guard: accuracy drop <= 0.5 points"]
    assert trt["measured"] == pytest.approx(0.1) and "refused" in trt["figure"] and "fp16" in trt["figure"]
    # The bare presets stay in the report: they are why the guard exists.
    assert goals["int8-cpu without the guard: accuracy drop <= 0.5 points"]["measured"] == pytest.approx(10.0)
    assert goals["int8-tensorrt without the guard: accuracy drop <= 0.5 points"]["met"] is False
    # The guarded file gets its own speed and size goals: 40 / 25 ms = 1.6x, 1100 / 4000 bytes.
    assert goals["int8-cpu+guard >= 2x faster than fp32 at batch 32"]["measured"] == pytest.approx(1.6)
    assert goals["int8-cpu+guard file <= 1/3.5 of fp32"]["met"] is True
    assert "int8-tensorrt+guard file <= 1/3.5 of fp32" not in goals  # refused: no guarded file

    # The guard decides on validation images; a test drop above 0.5 points is reported as not met.
    variants["int8-cpu+guard"] = _variant(0.890, 1300, 1.2, 25.0)
    _with_ratios(bench, variants)
    cpu = next(g for g in bench.goals_for("tiny", variants, None) if g["goal"].startswith("int8-cpu with the guard"))
    assert cpu["met"] is False and cpu["measured"] == pytest.approx(1.0)

    # Refused on a cpu target: fp32 is deployed, which drops nothing.
    variants["int8-cpu"]["guard"] = _guard(False, "fp32", ["conv2"], drop=2.0)
    assert bench.deployed(variants, "int8-cpu")[0] == "fp32"
    assert bench.deployed_drop(variants, "fp32") == 0.0

    lines = bench.guard_lines([{"student": "tiny", "variants": variants},
                               {"student": "old", "variants": {"int8-cpu": _variant(0.8, 1, 1, 1)}}])
    assert "REFUSED" in lines[0] and "medkd deploys fp32" in lines[0] and "+5.00 -> +2.00" in lines[0]
    assert "REFUSED" in lines[1] and "medkd deploys fp16" in lines[1]
    assert bench.GUARD_NOT_MEASURED in lines[2]


class _FakeQuantizer:
    """Stands in for medkd.export.quantize: writes which nodes it kept out, so files can be told apart."""

    def __init__(self, nodes=("conv1", "conv2", "fc"), fail_on_exclude=False):
        self.nodes, self.fail_on_exclude = nodes, fail_on_exclude

    def __call__(self, preset, fp32_onnx, out_path, calibration, method, exclude):
        from medkd.export.quantize import QuantizeResult

        if exclude and self.fail_on_exclude:
            raise RuntimeError("calibration blew up")
        Path(out_path).write_text(",".join(exclude))
        return QuantizeResult(Path(out_path), preset, "fake 1.0", method,
                              {n: "kept by the guard" for n in exclude},
                              [n for n in self.nodes if n not in exclude])


def _fake_evaluate(drop_of):
    """Validation check whose accuracy drop is drop_of(set of excluded nodes), read back from the file."""
    from medkd.export.evaluate import Comparison

    def evaluate(path):
        text = Path(path).read_text()
        drop = drop_of(set(text.split(",")) - {""})
        return Comparison(0.1, 0.99, 0.9, 0.9 - drop / 100, 100)
    return evaluate


@pytest.mark.parametrize("case", ["sensitive-layer", "holds", "refused", "search-fails"])
def test_guarded_int8_files_and_outcome(bench, tmp_path, monkeypatch, case):
    fake = _FakeQuantizer(fail_on_exclude=case == "search-fails")
    monkeypatch.setattr(bench, "quantize", fake)
    drop_of = {"sensitive-layer": lambda kept: 0.1 if "conv2" in kept else 4.0,
               "holds": lambda kept: 0.3,
               "refused": lambda kept: 4.0,
               "search-fails": lambda kept: 4.0}[case]
    bare, guarded = tmp_path / "m.int8.onnx", tmp_path / "m.int8.guard.onnx"
    files, info = bench.guarded_int8("int8-cpu", tmp_path / "m.onnx", bare, guarded, np.zeros((2, 1, 4, 4)),
                                     "minmax", _fake_evaluate(drop_of), bench.GuardThresholds(0.5, 0.98), "fp32",
                                     log=lambda line: None)
    assert files["int8-cpu"] == bare and bare.read_text() == ""  # the bare preset: nothing kept out
    assert info["int8-cpu"]["library"] == "fake 1.0" and "path" not in info["int8-cpu"]
    guard = info["int8-cpu"]["guard"]
    if case == "sensitive-layer":
        # Exactly the planted layer stays in high precision, in a file of its own.
        assert guard["held"] and guard["kept_high_precision"] == ["conv2"] and guard["deploys"] == "int8-cpu+guard"
        assert files["int8-cpu+guard"] == guarded and guarded.read_text() == "conv2"
        assert info["int8-cpu+guard"]["kept_high_precision"] == ["conv2"]
        assert guard["validation_bare"]["metric_drop_points"] == pytest.approx(4.0)
        assert guard["comparison"]["metric_drop_points"] == pytest.approx(0.1)
        assert guard["quantizations"] == 1 + 3 + 1  # bare, one per layer's sensitivity, then conv2 kept
    elif case == "holds":
        assert guard["held"] and guard["deploys"] == "int8-cpu" and guard["quantizations"] == 1
        assert "int8-cpu+guard" not in files and not guarded.exists()
    elif case == "refused":
        assert not guard["held"] and guard["deploys"] == "fp32" and len(guard["kept_high_precision"]) == 2
        assert "int8-cpu+guard" not in files and not guarded.exists()  # no half-kept candidate left behind
    else:
        assert "calibration blew up" in guard["error"] and "int8-cpu+guard" not in files
        assert bench.deployed({"int8-cpu": {"test_accuracy": 0.8, **info["int8-cpu"]}}, "int8-cpu")[0] is None


def test_bare_preset_failure_is_raised(bench, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no calibration")

    monkeypatch.setattr(bench, "quantize", broken)
    with pytest.raises(RuntimeError, match="no calibration"):
        bench.guarded_int8("int8-cpu", tmp_path / "m.onnx", tmp_path / "a.onnx", tmp_path / "b.onnx",
                           np.zeros((1, 1, 2, 2)), "minmax", _fake_evaluate(lambda kept: 0.0),
                           bench.GuardThresholds(0.5, 0.98), "fp32", log=lambda line: None)


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


def test_guard_images_are_medkd_builds_split(bench):
    """Validation (labelled) and calibration images: disjoint, from the training side, seeded."""
    from medkd.toolchain.data.base import ImageSet, TaskData

    n = 60
    # Each image holds its own index, so the split can be read back from the pixels.
    train = ImageSet(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous(),
                     torch.arange(n) % 3)
    test = ImageSet(torch.full((9, 1, 4, 4), -1.0), torch.arange(9) % 3)
    task = TaskData("synthetic", train, test, ["a", "b", "c"])
    args = bench.parse_args(["--students", "resnet18", "--calibration-images", "10", "--validation-images", "20"])
    plan, data = bench.export_images(bench.bench_config(args, "resnet18"), task)
    validation = data.validation_images[:, 0, 0, 0].astype(int)
    calibration = data.calibration[:, 0, 0, 0].astype(int)
    assert plan.validation_images == 20 and len(validation) == 20 and len(calibration) == 10
    assert not set(validation) & set(calibration) and min(validation.min(), calibration.min()) >= 0  # no test image
    np.testing.assert_array_equal(data.validation_labels, validation % 3)  # labels travel with their images
    _, again = bench.export_images(bench.bench_config(args, "resnet18"), task)
    np.testing.assert_array_equal(again.calibration, data.calibration)

    from medkd.toolchain.errors import ConfigError

    too_many = bench.parse_args(["--calibration-images", "41", "--validation-images", "20"])  # 60 - 20 left
    with pytest.raises(ConfigError, match="calibration.images=41"):
        bench.export_images(bench.bench_config(too_many, "resnet18"), task)


def test_guard_settings_come_from_the_config(bench):
    cfg = bench.bench_config(bench.parse_args([]), "resnet18")
    thresholds = bench.guard_thresholds(cfg)
    assert thresholds.max_drop_points == cfg.export.max_accuracy_drop
    assert thresholds.min_agreement == cfg.export.parity.int8_min_agreement
    # cpu deploys fp32 when int8 is refused; a TensorRT target has fp16 to fall back on.
    assert bench.deploy_fallback("int8-cpu") == "fp32" and bench.deploy_fallback("int8-tensorrt") == "fp16"


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
                "int8-cpu": {**_variant(1 / 7, 1000, 1.0, 16.0), "vs_fp32": {"accuracy_drop_points": 0.0},
                             "guard": _guard(True, "int8-cpu")}}
    goals = {g["goal"]: g for g in bench.goals_for("vit", variants, None, chance=1 / 7)}
    for goal in ("int8-cpu without the guard: accuracy drop <= 0.5 points",
                 "int8-cpu with the guard: accuracy drop <= 0.5 points"):
        assert goals[goal]["met"] is None and "chance level" in goals[goal]["figure"]


def test_report_reprints_old_and_guarded_entries(bench, tmp_path, capsys):
    import json

    def entry(student, guard):
        cpu = {**_variant(0.80, 1000, 1.0, 16.0), **({"guard": guard} if guard else {})}
        variants = {"fp32": _variant(0.90, 4000, 2.0, 40.0), "int8-cpu": cpu}
        if guard and guard["deploys"].endswith("+guard"):
            variants["int8-cpu+guard"] = _variant(0.899, 1300, 1.2, 25.0)
        _with_ratios(bench, variants)
        for v in variants.values():  # as JSON stores them: batch sizes as strings
            v["latency"] = {str(b): s for b, s in v["latency"].items()}
        return {"student": student, "training": {"epochs": 1, "train_images": 8, "train_seconds": 1.0},
                "variants": variants}

    path = tmp_path / "export.json"
    path.write_text(json.dumps({"threads": 2, "results": [
        entry("mobilenetv3", _guard(True, "int8-cpu+guard", ["conv2"])), entry("vit_tiny", None)]}))
    assert bench.main(["--report", "--output", str(path)]) == 0
    out = capsys.readouterr().out
    assert "int8-cpu+guard" in out and "held, 1 layer(s) kept" in out and bench.GUARD_NOT_MEASURED in out
    goals = {(g["student"], g["goal"]): g for g in json.loads(path.read_text())["goals"]}
    with_guard = "int8-cpu with the guard: accuracy drop <= 0.5 points"
    assert goals[("mobilenetv3", with_guard)]["met"] is True
    assert goals[("mobilenetv3", with_guard)]["measured"] == pytest.approx(0.1)
    assert goals[("vit_tiny", with_guard)]["met"] is None  # merged without guard data: not guessed
