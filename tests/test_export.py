"""Export slice: BN folding, ONNX export (dynamic batch, atomic), parity, latency, report."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medkd.export import (
    ExportError,
    count_batchnorm,
    count_parameters,
    export_onnx,
    fold_batchnorm,
    fold_batchnorm_with_stats,
    model_file_size_bytes,
    onnx_parity,
    profile_onnx_cpu,
)
from medkd.toolchain.errors import UserError
from medkd.toolchain.report import write_report

torch.set_num_threads(1)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics, so a wrong fold cannot pass by accident
    (with the default mean 0 / var 1 / gamma 1 / beta 0 a BN is almost the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def _student(name: str) -> nn.Module:
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8) if name.startswith("vit") else {}
    m = timm.create_model(name, pretrained=False, num_classes=7, in_chans=1, **kw)
    return _randomise_bn(m).eval()


@pytest.fixture(scope="module")
def students() -> dict[str, nn.Module]:
    return {n: _student(n) for n in ("resnet18", "mobilenetv3_small_100", "vit_tiny_patch16_224")}


def _x(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean((2, 3)))


# --------------------------------------------------------------------------- folding


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100"])
def test_fold_cnn_removes_every_bn_and_keeps_outputs(students, name):
    model = students[name]
    n_bn = count_batchnorm(model)
    assert n_bn > 0
    model.train()  # the copy must come back in eval mode; the original is untouched
    folded, stats = fold_batchnorm_with_stats(model)
    model.eval()

    assert stats.num_folded == n_bn and stats.num_unfolded == 0, stats.unfolded
    assert count_batchnorm(folded) == 0
    assert count_batchnorm(model) == n_bn  # deep copy: original still has its BNs
    assert not folded.training and not any(m.training for m in folded.modules())
    assert count_parameters(folded) < count_parameters(model)  # BN affine params are gone

    x = _x(4)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()
    assert ref.abs().max() > 1e-2  # outputs are not trivially tiny


def test_fold_keeps_timm_bnact_activation(students):
    model = students["mobilenetv3_small_100"]
    assert type(model.bn1).__name__ == "BatchNormAct2d"
    act_type = type(model.bn1.act)
    assert act_type is not nn.Identity
    folded = fold_batchnorm(model)
    # BatchNormAct2d(conv_stem) became exactly its activation, not an Identity.
    assert type(folded.bn1) is act_type
    # The conv that absorbed it now carries a bias.
    assert folded.conv_stem.bias is not None and model.conv_stem.bias is None


def test_fold_vit_is_unaffected(students):
    model = students["vit_tiny_patch16_224"]
    folded, stats = fold_batchnorm_with_stats(model)
    assert (stats.num_folded, stats.num_unfolded) == (0, 0)
    assert count_parameters(folded) == count_parameters(model)
    x = _x(2)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


class _Tricky(nn.Module):
    """BNs that must NOT be folded next to one that must."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(1)  # not after a conv
        self.conv_a = nn.Conv2d(1, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)  # foldable
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(4)  # conv_b output also feeds the residual
        self.conv_s = nn.Conv2d(4, 4, 1)  # called twice
        self.bn_s = nn.BatchNorm2d(4)
        self.bn_nostats = nn.BatchNorm2d(4, track_running_stats=False)
        self.conv_c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.bn_a(self.conv_a(self.bn_in(x)))
        y = self.conv_b(x)
        x = self.bn_b(y) + y
        x = self.bn_s(self.conv_s(x)) + self.conv_s(x)
        return self.bn_nostats(self.conv_c(x))


def test_fold_only_provably_safe_pairs():
    model = _randomise_bn(_Tricky()).eval()
    folded, stats = fold_batchnorm_with_stats(model)
    assert stats.folded == [("conv_a", "bn_a")]
    assert set(stats.unfolded) == {"bn_in", "bn_b", "bn_s", "bn_nostats"}
    assert "elsewhere" in stats.unfolded["bn_b"]
    assert "more than once" in stats.unfolded["bn_s"]
    assert "running statistics" in stats.unfolded["bn_nostats"]
    assert isinstance(folded.bn_a, nn.Identity) and isinstance(folded.bn_b, nn.BatchNorm2d)
    x = _x(3)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


# ---------------------------------------------------------------------------- export


def _ort_run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x.numpy()})[0]


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100", "vit_tiny_patch16_224"])
def test_export_dynamic_batch_and_parity(students, name, tmp_path):
    model = students[name]
    folded = fold_batchnorm(model)
    out = tmp_path / "sub" / "model.onnx"
    # A batch-1 sample must still give a dynamic batch dimension.
    got = export_onnx(folded, _x(1), out)
    assert got == out and out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no side/temp files

    proto = onnx.load(str(out))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert model_file_size_bytes(out) == out.stat().st_size > 4 * count_parameters(folded) * 0.9

    for n in (1, 5):
        assert _ort_run(out, _x(n, seed=n)).shape == (n, 7)
    # Parity against the *unfolded* original: covers folding and export together.
    parity = onnx_parity(model, out, [_x(5, seed=2), _x(1, seed=3)])
    assert parity["num_samples"] == 6
    assert parity["max_abs_diff"] < 1e-4
    assert 0 <= parity["mean_abs_diff"] <= parity["max_abs_diff"]
    assert parity["top1_agreement"] == 1.0


def test_export_restores_train_flags_and_exports_eval_graph(tmp_path):
    model = _randomise_bn(TinyCNN())
    model.train()
    model.head.eval()  # a deliberately mixed state must survive
    path = export_onnx(model, _x(2), tmp_path / "m.onnx")
    assert model.training and model.bn.training and not model.head.training
    # The graph uses running stats (eval BN): matches eval-mode PyTorch, not train-mode.
    parity = onnx_parity(model, path, _x(4))
    assert parity["max_abs_diff"] < 1e-5
    assert model.training  # parity restored the flags too


def test_parity_detects_a_different_model(tmp_path):
    model = _randomise_bn(TinyCNN()).eval()
    path = export_onnx(model, _x(2), tmp_path / "m.onnx")
    with torch.no_grad():
        model.head.bias.add_(1.0)
    parity = onnx_parity(model, path, _x(4))
    assert parity["max_abs_diff"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(UserError):
        onnx_parity(model, tmp_path / "missing.onnx", _x(1))


class _Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        x = self.conv(x)
        raise RuntimeError("boom in forward")


def test_failed_export_leaves_nothing(tmp_path):
    target = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="boom in forward"):
        export_onnx(_Boom(), _x(1), target)
    assert list(tmp_path.iterdir()) == []  # no file at the path, no temp file/folder

    # An existing file at the path survives a failed export unchanged.
    target.write_bytes(b"previous good model")
    with pytest.raises(ExportError):
        export_onnx(_Boom(), _x(1), target)
    assert target.read_bytes() == b"previous good model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_export_rejects_static_batch_graph(tmp_path):
    class FixedBatch(nn.Module):
        def forward(self, x):  # bakes the sample's batch size into a Reshape
            return x.reshape(2, -1)[:, :3]

    with pytest.raises(ExportError, match="batch"):
        export_onnx(FixedBatch(), _x(2), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_dynamo_exporter_dynamic_batch_and_opset_check(tmp_path):
    model = _randomise_bn(TinyCNN()).eval()
    path = export_onnx(model, _x(1), tmp_path / "d.onnx", opset=18, exporter="dynamo")
    for n in (1, 5):
        assert _ort_run(path, _x(n)).shape == (n, 3)
    assert onnx_parity(model, path, _x(5))["max_abs_diff"] < 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["d.onnx"]
    # torch.export's exporter cannot down-convert this CNN to opset 17 and would silently
    # keep 18: that must be an error, not a mislabelled file.
    with pytest.raises(UserError, match="opset 18, not the requested 17"):
        export_onnx(model, _x(2), tmp_path / "d17.onnx", opset=17, exporter="dynamo")
    assert [p.name for p in tmp_path.iterdir()] == ["d.onnx"]


# --------------------------------------------------------------------------- latency


def test_profile_percentiles(tmp_path):
    path = export_onnx(_randomise_bn(TinyCNN()), _x(1), tmp_path / "m.onnx")
    res = profile_onnx_cpu(path, (1, 32, 32), warmup=2, runs=25, threads=1, progress=False)
    assert 0 < res["p50_ms"] <= res["p90_ms"] <= res["p99_ms"] <= res["max_ms"]
    assert res["min_ms"] <= res["mean_ms"] <= res["max_ms"]
    assert res["runs"] == 25 and res["threads"] == 1 and res["batch_size"] == 1
    assert res["provider"] == "CPUExecutionProvider"
    assert res["session_options"]["intra_op_num_threads"] == 1
    assert res["input_shape"] == [1, 1, 32, 32]

    with pytest.raises(UserError, match="does not match"):
        profile_onnx_cpu(path, (3, 32, 32), runs=1, progress=False)
    with pytest.raises(UserError):
        profile_onnx_cpu(path, (4, 1, 32, 32), runs=1, progress=False)


# ---------------------------------------------------------------------------- report


def _full_report() -> dict:
    return {
        "run": {"recipe": "rd", "target": "jetson-orin", "data": "mri", "student": "resnet18",
                "seeds": {"global": 0, "split": 7}, "command": "medkd-build recipe=rd"},
        "data": {"name": "mri", "source": "/data/brain-mri", "split_rule": "stratified 70/15/15 (seed 7)",
                 "num_classes": 4, "sizes": {"train": 700, "val": 150, "test": 150}},
        "teacher": {"name": "litemedsam", "weights": "lite_medsam.pth", "test_accuracy": 0.9133},
        "student": {"arch": "resnet18", "params": 11171271, "test_accuracy": 0.8765},
        "training": {"epochs": 2, "best_epoch": 2, "history": [
            {"epoch": 1, "train_loss": 1.3861, "val_acc": 0.52},
            {"epoch": 2, "train_loss": 0.7312, "val_acc": 0.81},
        ]},
        "export": {"latency_note": "ONNX Runtime on this host's CPU: a host proxy", "models": {"model": {
            "requested_precision": "best", "deployed_precision": "int8", "deployed_file": "model.int8.onnx",
            "validation_images": 300,
            "onnx": {"fp32": {"path": "model.onnx", "size_bytes": 44_700_000},
                     "int8": {"path": "model.int8.onnx", "size_bytes": 11_300_000}},
            "test_metric": {"fp32": 0.8765, "int8": 0.8712},
            "formats": {
                "onnx": {"fold": {"batchnorm": {"bn_folded": 20, "bn_unfolded": 0}},
                         "parity": {"max_abs_diff": 3.2e-06, "top1_agreement": 1.0}},
                "onnx-int8": {"preset": "int8-tensorrt", "library": "nvidia-modelopt 0.47.0",
                              "calibration_method": "minmax", "quantized_nodes": 20,
                              "unquantized": {"/fc/Gemm": "final classifier: logits kept in fp32"},
                              "guard": {"held": True, "kept_high_precision": [],
                                        "comparison": {"top1_agreement": 0.99, "metric_drop_points": 0.33}}},
                "bundle": {"path": "bundle/"},
                "firmware": {"bin": "firmware/medkd_model.bin", "kind": "onnx", "container_size": 11_300_048,
                             "crc32": 0xDEADBEEF}},
            "latency": {p: [{"batch_size": 1, "threads": 2, "p50_ms": ms, "p90_ms": 2.5, "p99_ms": 3.75,
                             "throughput_ips": 810.0}] for p, ms in (("fp32", 1.234), ("int8", 0.5))},
            "stage_seconds": {"onnx": 1.5, "onnx-int8": 7.25},
        }}},
        "target": {"name": "jetson-orin", "runtime": "tensorrt", "precision": "best",
                   "remaining": ["model: copy bundle/ to the jetson-orin and run build_engine.sh there"]},
    }


def test_report_writes_both_files(tmp_path):
    report = _full_report()
    md_path, json_path = write_report(tmp_path / "run", report)
    assert (md_path.name, json_path.name) == ("report.md", "report.json")
    assert sorted(p.name for p in md_path.parent.iterdir()) == ["report.json", "report.md"]

    text = json_path.read_text()
    loaded = json.loads(text)
    versions = loaded["run"].pop("versions")
    assert versions["torch"] == torch.__version__.split("+")[0]
    assert versions["onnxruntime"] == ort.__version__
    assert loaded == report
    assert "versions" not in report["run"]  # the caller's dict is not modified
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"

    md = md_path.read_text()
    assert md.startswith("# ") and "rd" in md.splitlines()[0] and "jetson-orin" in md.splitlines()[0]
    for needle in ["87.65 %", "91.33 %", "11,171,271", "| Test accuracy, deployed model (int8) | 87.12 % |",
                   "| int8 (deployed) | model.int8.onnx | 11.30 MB | 87.12 % | 99.00 % | 0.33 | 0.500 | n/a |",
                   "| fp32 | model.onnx | 44.70 MB | 87.65 % | 100.00 % | reference | 1.234 | n/a |",
                   "BatchNorm folded 20 / kept 0", "| /fc/Gemm | final classifier: logits kept in fp32 |",
                   "nvidia-modelopt 0.47.0", "Accuracy guard: holds", "| onnx-int8 | 7.2 |",
                   "firmware/medkd_model.bin (onnx payload, 11,300,048 bytes, crc32 0xdeadbeef)",
                   "On-device bundle: bundle/", "a host proxy", "| int8 | 1 | 2 | 0.500 | 2.500 | 3.750 | 810.0 |",
                   "- model: copy bundle/ to the jetson-orin and run build_engine.sh there",
                   "| 2 | 0.7312 | 81.00 % |", "/data/brain-mri", "stratified 70/15/15 (seed 7)",
                   "split=7", f"onnxruntime {ort.__version__}"]:
        assert needle in md, needle


def test_report_missing_sections_render_na(tmp_path):
    md_path, json_path = write_report(tmp_path, {"run": {"recipe": "kd"}, "latency": None})
    md = md_path.read_text()
    assert "| Test accuracy (student, PyTorch fp32) | n/a |" in md
    assert "## Deployment" in md and "Test accuracy, deployed" not in md
    assert "teacher branch" not in md  # row only when the teacher section has an accuracy
    assert "## Training history\n\nn/a" in md
    assert json.loads(json_path.read_text())["latency"] is None

    md_path, _ = write_report(tmp_path / "cpu", {"target": {"name": "cpu", "runtime": "onnxruntime"}})
    assert "runs as-is with ONNX Runtime on cpu" in md_path.read_text()


def test_report_rejects_unserialisable_without_writing(tmp_path):
    with pytest.raises(UserError, match="report.student.model"):
        write_report(tmp_path, {"student": {"model": object()}})
    assert list(tmp_path.iterdir()) == []
    # numpy scalars and non-finite floats are handled, the JSON stays strict.
    _, json_path = write_report(tmp_path, {"training": {"history": [{"epoch": 1, "train_loss": math.nan}]},
                                           "student": {"test_accuracy": np.float32(0.5)}})
    data = json.loads(json_path.read_text())
    assert data["student"]["test_accuracy"] == 0.5
    assert data["training"]["history"][0]["train_loss"] == "NaN"


def test_report_accepts_pipeline_spelling(tmp_path):
    """The keys toolchain/pipeline.py writes (seed, student.name/parameters, accuracies
    under training, data.provenance, target.status) render too."""
    report = {
        "run": {"recipe": "kd", "seed": 3, "versions": {"torch": "2.14.1"}},
        "data": {"name": "npz", "train": 80, "test": 20,
                 "provenance": {"source": "/d/x.npz", "split_rule": "the file's own arrays"}},
        "teacher": {"name": "timm", "checkpoint": "t.pth"},
        "student": {"name": "mobilenetv3", "parameters": 1234567},
        "training": {"epochs": 1, "test_accuracy": 0.625, "teacher_test_accuracy": 0.75,
                     "history": [{"epoch": 1, "loss": 0.5, "test_accuracy": 0.625}]},
        "target": {"name": "datacenter-gpu", "runtime": "tensorrt", "status": "engine not built yet"},
    }
    md = write_report(tmp_path, report)[0].read_text()
    for needle in ["kd → datacenter-gpu (npz)", "Student: mobilenetv3", "62.50 %", "75.00 %",
                   "1,234,567", "/d/x.npz", "the file's own arrays", "train=80, test=20",
                   "weights: t.pth", "Seeds: 3", "- engine not built yet", "| epoch | loss | test_accuracy |",
                   "torch 2.14.1"]:
        assert needle in md, needle
