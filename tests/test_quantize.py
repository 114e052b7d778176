"""Quantization presets: the Q/DQ graph each layout must have, fp16, and the library plumbing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from medkd.export import export_onnx
from medkd.export.evaluate import onnx_logits
from medkd.export.quantize import quantize
from medkd.export.quantize._common import ranges_cache_supported
from medkd.export.quantize.inspection import classifier_node
from medkd.toolchain.errors import UserError

torch.set_num_threads(1)


class Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), Residual(32), nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
        Residual(64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5),
    ).eval()


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "model.onnx"
    export_onnx(small_cnn(), torch.rand(4, 1, 16, 16), path)
    return path


@pytest.fixture(scope="module")
def calibration():
    return np.random.default_rng(0).random((64, 1, 16, 16), dtype=np.float32)


@pytest.fixture(scope="module")
def tensorrt_int8(fp32_onnx, calibration):
    return quantize("int8-tensorrt", fp32_onnx, fp32_onnx.with_name("trt.int8.onnx"), calibration, "minmax")


def _graph(path):
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    return model, inits, producers


def _weight_dq(node, producers):
    src = producers.get(node.input[1])
    while src is not None and src.op_type in ("Identity", "Cast"):
        src = producers.get(src.input[0])
    return src if src is not None and src.op_type == "DequantizeLinear" else None


def test_tensorrt_layout_per_channel_int8_weights_zero_points_and_fp32_logits(tensorrt_int8):
    model, inits, producers = _graph(tensorrt_int8.path)
    assert tensorrt_int8.library.startswith("nvidia-modelopt")
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 6
    for conv in convs:
        dq = _weight_dq(conv, producers)
        assert dq is not None, f"{conv.name} weight is not quantized"
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert weight.dtype == np.int8  # stored as int8 (DQ only), not fp32 + Q/DQ
        assert scale.shape == (weight.shape[0],)  # one scale per output channel
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        assert axis == 0
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            assert np.all(inits.get(node.input[2], np.zeros(1)) == 0), f"{node.name} has a zero point"
            assert inits.get(node.input[2], np.zeros(1, np.int8)).dtype == np.int8
    head = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert _weight_dq(head, producers) is None
    assert set(tensorrt_int8.unquantized) == {head.name}
    assert "classifier" in tensorrt_int8.unquantized[head.name]
    # No Q/DQ on the logits: the graph output is not produced by a DequantizeLinear.
    out = producers[model.graph.output[0].name]
    assert out.op_type not in ("DequantizeLinear", "QuantizeLinear")


def test_tensorrt_layout_keeps_unquantized_layers_and_io_in_fp32(tensorrt_int8):
    """fp16 for the unquantized layers cost accuracy on the default student (see int8_tensorrt.py)."""
    model, inits, _ = _graph(tensorrt_int8.path)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    floats = {a.dtype for a in inits.values() if a.dtype.kind == "f"}
    assert floats == {np.dtype(np.float32)}


def test_cpu_layout_uint8_activations_int8_per_channel_weights(fp32_onnx, calibration, tmp_path):
    result = quantize("int8-cpu", fp32_onnx, tmp_path / "cpu.int8.onnx", calibration, "minmax")
    model, inits, producers = _graph(result.path)
    activation_zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_zero_points and all(z.dtype == np.uint8 for z in activation_zero_points)
    assert any(np.any(z != 0) for z in activation_zero_points)  # asymmetric: real zero points
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        dq = _weight_dq(conv, producers)
        assert inits[dq.input[0]].dtype == np.int8 and np.all(inits[dq.input[2]] == 0)
        assert inits[dq.input[1]].shape == (inits[dq.input[0]].shape[0],)
    assert result.library.startswith("onnxruntime") and len(result.quantized) == 6


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_int8_tracks_fp32_and_is_small(fp32_onnx, calibration, tmp_path, method, tensorrt_int8):
    """Also: ORT quantization still works after ModelOpt ran in this process (it patches ORT)."""
    reference = onnx_logits(fp32_onnx, calibration)
    for preset in ("int8-cpu", "int8-tensorrt"):
        result = quantize(preset, fp32_onnx, tmp_path / f"{preset}.onnx", calibration, method)
        got = onnx_logits(result.path, calibration)
        assert np.corrcoef(got.ravel(), reference.ravel())[0, 1] > 0.95
        assert result.path.stat().st_size < fp32_onnx.stat().st_size / 3.0


def test_fp16_weights_half_io_float(fp32_onnx, calibration, tmp_path):
    result = quantize("fp16", fp32_onnx, tmp_path / "m.fp16.onnx")
    model, inits, _ = _graph(result.path)
    assert {a.dtype for a in inits.values() if a.dtype.kind == "f"} == {np.dtype(np.float16)}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    np.testing.assert_allclose(onnx_logits(result.path, calibration), onnx_logits(fp32_onnx, calibration), atol=2e-2)


def test_classifier_node_is_found_by_walking_back_from_the_output(fp32_onnx):
    model = onnx.load(str(fp32_onnx))
    assert classifier_node(model) == next(n.name for n in model.graph.node if n.op_type == "Gemm")


def test_bad_preset_method_or_missing_calibration(fp32_onnx, tmp_path, calibration):
    with pytest.raises(UserError, match="unknown quantization preset"):
        quantize("int4", fp32_onnx, tmp_path / "x.onnx", calibration)
    with pytest.raises(UserError, match="minmax, percentile"):
        quantize("int8-cpu", fp32_onnx, tmp_path / "x.onnx", calibration, method="entropy")
    with pytest.raises(UserError, match="calibration images"):
        quantize("int8-cpu", fp32_onnx, tmp_path / "x.onnx", calibration[:0])
    assert not (tmp_path / "x.onnx").exists()


def test_torch_stays_at_the_pinned_version():
    """nvidia-modelopt and its dependencies must not replace the torch this project pins."""
    assert torch.__version__.split("+")[0] == "2.14.1"


def test_fp16_vit_loads_and_matches(tmp_path):
    """The attention scale's Cast in timm ViTs broke onnxconverter-common's fp16 graphs."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, in_chans=1,
                            img_size=32, patch_size=8).eval()
    fp32 = export_onnx(vit, torch.rand(2, 1, 32, 32), tmp_path / "vit.onnx")
    result = quantize("fp16", fp32, tmp_path / "vit.fp16.onnx")
    x = np.random.default_rng(0).random((4, 1, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(onnx_logits(result.path, x), onnx_logits(fp32, x), atol=1e-2)


@pytest.mark.skipif(not ranges_cache_supported(), reason="this ONNX Runtime has no calibration cache (needs >= 1.32)")
def test_ranges_cache_calibrates_once_and_later_calls_reuse_it(fp32_onnx, calibration, tmp_path):
    cache = tmp_path / "ranges.json"
    first = quantize("int8-cpu", fp32_onnx, tmp_path / "a.onnx", calibration, "minmax", ranges_cache=cache)
    assert cache.is_file()
    # Brighter images would calibrate wider ranges; with the cache they are not looked at.
    brighter = calibration * 4.0
    cached = quantize("int8-cpu", fp32_onnx, tmp_path / "b.onnx", brighter, "minmax", ranges_cache=cache)
    fresh = quantize("int8-cpu", fp32_onnx, tmp_path / "c.onnx", brighter, "minmax")
    probe = calibration[:8]
    np.testing.assert_array_equal(onnx_logits(cached.path, probe), onnx_logits(first.path, probe))
    assert not np.array_equal(onnx_logits(fresh.path, probe), onnx_logits(first.path, probe))
