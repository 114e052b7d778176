"""Teacher features through ONNX Runtime (toolchain/models/teacher_runtime.py): same features as
PyTorch, fingerprints that keep backends and precisions apart, the exported graph cached on disk."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medkd.export.onnx_export as onnx_export
from medkd.toolchain.config import load_config
from medkd.toolchain.errors import ConfigError, UserError
from medkd.toolchain.features import cache_path, teacher_features
from medkd.toolchain.models.teacher_runtime import (
    OnnxRuntimeExtractor,
    calibration_subset,
    runtime_extractor,
)
from medkd.toolchain.models.teachers import build_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyExtractor(nn.Module):
    """What a recipe may supply: any module with fingerprint, feature_dim and forward(images)."""

    fingerprint = "tiny-conv-v1"
    feature_dim = 6

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 6, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.copy_(torch.randn(6, generator=generator))

    def forward(self, images):
        return F.relu(self.conv(images)).mean(dim=(2, 3))


class TinyTeacher(TinyExtractor):
    """Splits like a FrozenTeacher: preprocess (antialiased downsizing to 8 px) + extract."""

    fingerprint = "tiny-teacher-v1"

    def preprocess(self, images):
        return F.interpolate(images.float(), size=(8, 8), mode="bilinear", antialias=True)

    def extract(self, x):
        return super().forward(x)

    def forward(self, images):
        return self.extract(self.preprocess(images))


def images(n=5, size=12, seed=1):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def export_calls(monkeypatch):
    calls = []
    real = onnx_export.export_onnx

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", spy)
    return calls


def test_litemedsam_features_match_pytorch_at_any_batch(tmp_path):
    teacher = build_teacher({"name": "litemedsam", "input_size": 32})
    runtime = runtime_extractor(teacher, "onnxruntime", "fp32", tmp_path)
    x = images(4, size=28)
    with torch.no_grad():
        expected = teacher(x)
    # Batch 3 then 1: the graph's batch is dynamic (TinyViT's patch merging is made traceable).
    got = torch.cat([runtime(x[:3]), runtime(x[3:])])
    assert got.shape == (4, 256) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # Preprocessing stays in PyTorch: the graph takes 3 x 32 x 32 whatever the images' size.
    assert [p.name.split("-")[-3] for p in (tmp_path / "teacher-onnx").glob("*.onnx")] == ["3x32x32"]


def test_recipe_supplied_extractor_matches_pytorch(tmp_path):
    module = TinyExtractor().eval()
    runtime = runtime_extractor(module, "onnxruntime", "fp32", tmp_path)
    x = images()
    torch.testing.assert_close(runtime(x), module(x).detach(), atol=1e-5, rtol=0)
    assert runtime.feature_dim == 6 and list(runtime.parameters()) == []


def test_teacher_preprocessing_runs_in_pytorch_so_antialiased_resize_works(tmp_path):
    teacher = TinyTeacher().eval()
    runtime = runtime_extractor(teacher, "onnxruntime", "fp32", tmp_path)
    x = images(size=20)  # downsized with antialias, which the ONNX exporter cannot express
    torch.testing.assert_close(runtime(x), teacher(x).detach(), atol=1e-5, rtol=0)
    assert runtime.onnx_path((1, 8, 8)).is_file()


def test_fingerprint_names_backend_precision_and_calibration():
    module, cal = TinyExtractor(), images(40)
    assert runtime_extractor(module, "torch", "fp32") is module  # torch features keep their cache
    fp32 = runtime_extractor(module, "onnxruntime", "fp32").fingerprint
    int8 = runtime_extractor(module, "onnxruntime", "int8", calibration_images=cal).fingerprint
    other_cal = runtime_extractor(module, "onnxruntime", "int8", calibration_images=images(40, seed=2)).fingerprint
    assert len({module.fingerprint, fp32, int8, other_cal}) == 4
    assert fp32.startswith(module.fingerprint) and "ort" in fp32 and "fp32" in fp32 and "int8" in int8
    x = images()
    assert cache_path(module, x, "c") != cache_path(runtime_extractor(module, "onnxruntime", "fp32"), x, "c")


def test_feature_cache_keeps_backends_apart(tmp_path):
    module = TinyExtractor().eval()
    x = images(7)
    torch_feats = teacher_features(module, x, tmp_path, batch_size=3, progress=False)
    runtime = runtime_extractor(module, "onnxruntime", "fp32", tmp_path)
    ort_feats = teacher_features(runtime, x, tmp_path, batch_size=3, progress=False)
    torch.testing.assert_close(ort_feats, torch_feats, atol=1e-5, rtol=0)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_exported_graph_is_reused_from_the_cache(tmp_path, export_calls):
    module, x = TinyExtractor().eval(), images()
    first = runtime_extractor(module, "onnxruntime", "fp32", tmp_path)
    first(x)
    first(x)  # the session is kept
    assert len(export_calls) == 1 and first.build_seconds["export"] > 0
    path = first.onnx_path((1, 12, 12))
    stamp = path.stat().st_mtime_ns
    second = runtime_extractor(module, "onnxruntime", "fp32", tmp_path)
    torch.testing.assert_close(second(x), first(x))
    assert len(export_calls) == 1 and second.build_seconds == {} and path.stat().st_mtime_ns == stamp
    second(images(size=10))  # another input shape is another graph
    assert len(export_calls) == 2


def test_a_cold_export_leaves_the_global_rng_alone(tmp_path):
    # Whether the graph was cached must not change the student's init or the shuffling
    # (a resumed run loads a warm cache where the interrupted one exported).
    module, x = TinyExtractor().eval(), images()
    torch.manual_seed(123)
    runtime_extractor(module, "onnxruntime", "fp32", tmp_path)(x)  # cold: exports
    after_cold = torch.rand(3)
    torch.manual_seed(123)
    runtime_extractor(module, "onnxruntime", "fp32", tmp_path)(x)  # warm: loads
    torch.testing.assert_close(torch.rand(3), after_cold, rtol=0, atol=0)


def test_corrupt_cached_graph_is_rebuilt_with_a_warning(tmp_path, export_calls):
    module, x = TinyExtractor().eval(), images()
    runtime_extractor(module, "onnxruntime", "fp32", tmp_path)(x)
    path = runtime_extractor(module, "onnxruntime", "fp32", tmp_path).onnx_path((1, 12, 12))
    path.write_bytes(path.read_bytes()[:100])  # truncated by a crash or a full disk
    fresh = runtime_extractor(module, "onnxruntime", "fp32", tmp_path)
    with pytest.warns(RuntimeWarning, match="unusable.*rebuilding"):
        got = fresh(x)
    torch.testing.assert_close(got, module(x).detach(), atol=1e-5, rtol=0)
    assert len(export_calls) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt file opens without a warning
        runtime_extractor(module, "onnxruntime", "fp32", tmp_path)(x)


def test_an_extractor_onnx_cannot_express_is_a_one_line_error(tmp_path):
    class Spectral(TinyExtractor):
        fingerprint = "spectral-v1"

        def forward(self, images):  # SVD has no ONNX operator
            return torch.linalg.svdvals(images.flatten(2)).flatten(1)

    runtime = runtime_extractor(Spectral(), "onnxruntime", "fp32", tmp_path)
    with pytest.raises(UserError) as info:
        runtime(images())
    assert "use teacher.backend=torch" in str(info.value) and "svdvals" in str(info.value)
    assert "\n" not in str(info.value) and not list(tmp_path.rglob("*.onnx"))


def test_int8_is_calibrated_and_close_to_fp32(tmp_path):
    module = TinyExtractor().eval()
    cal = images(64, seed=3)
    int8 = runtime_extractor(module, "onnxruntime", "int8", tmp_path, calibration_images=cal, calibration_count=32)
    x = images(16, seed=4)
    got, fp32 = int8(x), module(x).detach()
    assert int8.build_seconds["quantize"] > 0 and int8.onnx_path((1, 12, 12)).name.endswith(".onnx")
    assert "int8-cal" in int8.onnx_path((1, 12, 12)).name
    assert not torch.equal(got, fp32)  # really quantized ...
    assert F.cosine_similarity(got, fp32).min() > 0.99  # ... and still the same features
    with pytest.raises(UserError, match="calibration images of that shape"):
        int8(images(2, size=10))


def test_default_calibration_count_shrinks_with_the_input_size():
    module = TinyExtractor()

    def count(n, size):  # zeros expanded from one image: no memory for the large ones
        cal = torch.zeros(1, 1, size, size).expand(n, -1, -1, -1)
        return runtime_extractor(module, "onnxruntime", "int8", calibration_images=cal).calibration_count

    assert count(300, 12) == 256  # 144 values per image: the full count
    assert count(20, 400) == 256 * 3 * 56 * 56 // (400 * 400) == 15  # the same number of values
    assert count(10, 900) == 8  # never fewer
    assert count(5, 12) == 5  # never more than there are
    assert runtime_extractor(module, "onnxruntime", "fp32").calibration_count == 0


def test_calibration_subset_is_evenly_spaced():
    x = torch.arange(10.0).view(10, 1, 1, 1)
    assert calibration_subset(x, 4).flatten().tolist() == [0.0, 3.0, 6.0, 9.0]
    assert calibration_subset(x, 20) is x


def test_threads_follow_torch_or_the_argument(tmp_path):
    module = TinyExtractor().eval()
    default = runtime_extractor(module, "onnxruntime", "fp32", tmp_path)
    assert default.session((1, 12, 12)).get_session_options().intra_op_num_threads == torch.get_num_threads()
    two = runtime_extractor(module, "onnxruntime", "fp32", tmp_path, threads=2)
    assert two.session((1, 12, 12)).get_session_options().intra_op_num_threads == 2


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("teacher.backend=tensorrt", "teacher.backend must be one of torch, onnxruntime, got 'tensorrt'"),
        ("teacher.precision=fp16", "teacher.precision must be one of fp32, int8, got 'fp16'"),
    ],
)
def test_bad_backend_or_precision_is_a_one_line_config_error(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_int8_needs_onnxruntime_and_calibration_images():
    with pytest.raises(ConfigError, match="teacher.precision=int8 needs teacher.backend=onnxruntime"):
        load_config(["teacher.precision=int8", "teacher.backend=torch"])
    with pytest.raises(ConfigError, match="teacher.backend must be one of"):
        runtime_extractor(TinyExtractor(), "openvino", "fp32")
    with pytest.raises(UserError, match="needs calibration images"):
        runtime_extractor(TinyExtractor(), "onnxruntime", "int8")


def test_default_config_runs_the_teacher_through_onnxruntime_fp32():
    cfg = load_config([])
    assert (cfg.teacher.backend, cfg.teacher.precision) == ("onnxruntime", "fp32")
    assert isinstance(runtime_extractor(TinyExtractor(), cfg.teacher.backend, cfg.teacher.precision),
                      OnnxRuntimeExtractor)


# ----------------------------------------------------------------------------- bench/teacher.py


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("teacher")


def test_bench_fidelity_measures_against_the_reference(bench):
    a = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    scaled = bench.fidelity(a, 2 * a)  # same geometry, different scale
    assert scaled["linear_cka"] == pytest.approx(1.0) and scaled["mean_cosine"] == pytest.approx(1.0)
    assert scaled["max_abs_diff"] == pytest.approx(float(a.abs().max())) and scaled["cka_bar_met"]
    flipped = torch.cat([a[:, :1], -a[:, 1:]], dim=1)  # one column kept: cosine drops, CKA does not
    assert bench.fidelity(a, flipped)["linear_cka"] == pytest.approx(1.0)
    assert bench.fidelity(a, flipped)["mean_cosine"] < 0.9
    shuffled = bench.fidelity(a, a[torch.randperm(20, generator=torch.Generator().manual_seed(1))])
    assert shuffled["linear_cka"] < 0.99 and not shuffled["cka_bar_met"]


def test_bench_measured_and_calibration_images_are_disjoint(bench):
    x = torch.arange(40.0).view(40, 1, 1, 1)
    measured, calibration = bench.measured_and_calibration(x, 5, 4)
    assert len(measured) == 5 and len(calibration) == 4
    assert not set(measured.flatten().tolist()) & set(calibration.flatten().tolist())


def test_bench_build_goals_compare_the_two_cold_builds(bench):
    runs = {"torch": {"stage_seconds": {"teacher_features": 300.0}, "wall_time_s": 380.0, "test_accuracy": 0.80},
            "onnxruntime": {"stage_seconds": {"teacher_features": 100.0}, "wall_time_s": 90.0, "test_accuracy": 0.81}}
    goals = {g["goal"]: g for g in bench.build_goals(runs)}
    assert [g["met"] for g in goals.values()] == [True, False, True]
    assert next(iter(goals.values()))["measured"] == "3.00x"
    runs["onnxruntime"]["stage_seconds"]["teacher_features"] = 101.0
    runs["onnxruntime"]["test_accuracy"] = 0.79
    assert [g["met"] for g in bench.build_goals(runs)] == [False, False, False]
    assert bench.build_goals({"torch": runs["torch"]}) == []


class DeviceRecorder(nn.Module):
    """A torch teacher that records where it was moved and where its inputs arrived."""

    feature_dim, fingerprint = 3, "device-recorder"

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.moves, self.inputs = [], []

    def to(self, device):
        self.moves.append(str(device))
        return self

    def forward(self, x):
        self.inputs.append(str(x.device))
        return torch.ones(len(x), self.feature_dim)


def test_a_torch_teacher_extracts_on_the_training_device_and_goes_back(tmp_path):
    teacher = DeviceRecorder()
    feats = teacher_features(teacher, images(5), None, batch_size=2, progress=False, device="meta")
    assert teacher.inputs == ["meta"] * 3 and teacher.moves == ["meta", "cpu"]  # there, then home
    assert torch.equal(feats, torch.ones(5, 3))
    stay = DeviceRecorder()
    teacher_features(stay, images(2), None, progress=False)  # no device: it runs where it is
    assert stay.inputs == ["cpu"] and set(stay.moves) == {"cpu"}
