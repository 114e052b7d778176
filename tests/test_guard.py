"""The int8 accuracy guard and the comparison it decides on."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from medkd.export import export_onnx
from medkd.export.evaluate import Comparison, accuracy, compare, onnx_logits
from medkd.export.guard import GuardThresholds, run_guard, unit_of, units
from medkd.export.quantize import quantize

torch.set_num_threads(1)


def test_compare_by_hand():
    reference = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]], dtype=np.float32)
    candidate = np.array([[2.5, 1.0], [0.0, 2.0], [0.4, 0.5], [0.2, 0.1]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1])
    c = compare(reference, candidate, labels, accuracy)
    assert c.max_abs_diff == pytest.approx(1.0)  # |3.0 - 2.0| in row 1
    assert c.top1_agreement == pytest.approx(3 / 4)  # row 2 flips from class 0 to 1
    assert c.reference_metric == pytest.approx(3 / 4)  # rows 0, 1, 2 right; row 3 wrong
    assert c.candidate_metric == pytest.approx(2 / 4)  # rows 0, 1 right
    assert c.metric_drop_points == pytest.approx(25.0)
    assert c.num_samples == 4


def test_thresholds_fail_on_each_term_alone():
    thresholds = GuardThresholds(max_drop_points=0.5, min_agreement=0.98)
    ok = Comparison(0.1, 0.99, 0.900, 0.896, 1000)  # drop 0.4 points
    assert thresholds.failures(ok) == []
    drop = Comparison(0.1, 0.99, 0.900, 0.894, 1000)  # drop 0.6 points
    assert thresholds.failures(drop) == ["metric drop 0.60 points > 0.5"]
    disagree = Comparison(0.1, 0.97, 0.900, 0.900, 1000)
    assert thresholds.failures(disagree) == ["top-1 agreement 97.00% < 98.00%"]


def planted_model() -> nn.Sequential:
    """Three convs and a classifier; only the first conv is sensitive to int8.

    The input has two channels: the image and an all-zero channel. Conv 0 weighs the zero
    channel by 1000 (it contributes nothing) and the image by +-1. Its per-channel weight
    scale is set by the 1000, so the +-1 weights round to zero in int8 and the class
    signal (mean brightness above or below 0.5) vanishes; keeping conv 0 in high
    precision restores it. Every activation is well-behaved; conv 2, conv 3 and the
    classifier are harmless.
    """
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1000.0], [-1.0, 1000.0]]).view(2, 2, 1, 1))
        model[0].bias.copy_(torch.tensor([-0.5, 0.5]))
        for index in (2, 3):
            model[index].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            model[index].bias.zero_()
        model[6].weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        model[6].bias.zero_()
    return model.eval()


def images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    offset = rng.choice([-0.25, 0.25], size=(n, 1, 1, 1))
    image = np.clip(rng.random((n, 1, 8, 8)) + offset, 0, 1)
    return np.concatenate([image, np.zeros_like(image)], axis=1).astype(np.float32)


def test_guard_keeps_exactly_the_planted_sensitive_layer(tmp_path):
    fp32 = export_onnx(planted_model(), torch.rand(2, 2, 8, 8), tmp_path / "model.onnx")
    conv_names = {n.input[1]: n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"}
    sensitive = conv_names["0.weight"]
    calibration, validation = images(128, 0), images(200, 1)
    reference = onnx_logits(fp32, validation)
    labels = reference.argmax(1)  # fp32 is right by construction; both classes occur
    assert 0.3 < labels.mean() < 0.7

    calls = []

    def quantize_excluding(exclude):
        calls.append(tuple(exclude))
        return quantize("int8-cpu", fp32, tmp_path / "model.int8.onnx", calibration, "minmax", exclude)

    def evaluate(path):
        return compare(reference, onnx_logits(path, validation), labels, accuracy)

    result = run_guard(quantize_excluding, evaluate, GuardThresholds(0.5, 0.98), log=lambda _: None)
    assert result.first_failure, "the fully quantized planted model must fail the guard"
    assert result.held
    assert result.kept_high_precision == [sensitive]
    assert set(result.result.unquantized) == {sensitive, next(n.name for n in onnx.load(str(fp32)).graph.node
                                                              if n.op_type == "Gemm")}
    assert result.comparison.metric_drop_points <= 0.5 and result.comparison.top1_agreement >= 0.98
    # its sensitivity is the largest: keeping it alone wins back the whole drop
    ranked = sorted(result.sensitivity, key=lambda n: result.sensitivity[n], reverse=True)
    assert ranked[0] == sensitive and len(ranked) == 3
    assert calls[0] == () and calls[-1] == (sensitive,)


def test_guard_passes_through_a_model_that_quantizes_well(tmp_path):
    model = planted_model()
    with torch.no_grad():
        model[0].weight[:, 1] = 0.0  # no outlier weight: nothing is sensitive
    fp32 = export_onnx(model, torch.rand(2, 2, 8, 8), tmp_path / "model.onnx")
    validation = images(200, 1)
    reference = onnx_logits(fp32, validation)
    calls = []

    def quantize_excluding(exclude):
        calls.append(exclude)
        return quantize("int8-cpu", fp32, tmp_path / "q.onnx", images(128, 0), "minmax", exclude)

    result = run_guard(quantize_excluding, lambda p: compare(reference, onnx_logits(p, validation),
                                                                reference.argmax(1), accuracy),
                       GuardThresholds(0.5, 0.98), log=lambda _: None)
    assert result.held and result.kept_high_precision == [] and calls == [()]


@pytest.mark.parametrize("node, unit", [
    ("/blocks/blocks.3/attn/qkv/MatMul", "/blocks/blocks.3"),
    ("/layer1/layer1.0/conv1/Conv", "/layer1/layer1.0"),
    ("/decoder/blocks/blocks.11/fc/Gemm", "/decoder/blocks/blocks.11"),
    ("/patch_embed/proj/Conv", "/patch_embed/proj/Conv"),  # outside any block: its own unit
    ("/0/Conv", "/0/Conv"),
    ("/blocks.2/Conv", "/blocks.2"),
])
def test_guard_units_are_indexed_blocks_or_single_layers(node, unit):
    assert unit_of(node) == unit


class BlockedPlanted(nn.Module):
    """planted_model() with its convs in two indexed blocks: blocks.0 = (sensitive conv, ReLU,
    conv 2), blocks.1 = (conv 3)."""

    def __init__(self):
        super().__init__()
        planted = planted_model()
        self.blocks = nn.ModuleList([nn.Sequential(planted[0], planted[1], planted[2]), nn.Sequential(planted[3])])
        self.head = nn.Sequential(planted[4], planted[5], planted[6])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_guard_measures_and_keeps_whole_blocks(tmp_path):
    fp32 = export_onnx(BlockedPlanted().eval(), torch.rand(2, 2, 8, 8), tmp_path / "model.onnx")
    convs = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"]
    first_block = tuple(n for n in convs if unit_of(n) == unit_of(convs[0]))
    assert len(first_block) == 2 and len(units(convs)) == 2
    validation = images(200, 1)
    reference = onnx_logits(fp32, validation)
    calls = []

    def quantize_excluding(exclude):
        calls.append(tuple(exclude))
        return quantize("int8-cpu", fp32, tmp_path / "q.onnx", images(128, 0), "minmax", exclude)

    result = run_guard(quantize_excluding, lambda p: compare(reference, onnx_logits(p, validation),
                                                                reference.argmax(1), accuracy),
                       GuardThresholds(0.5, 0.98), log=lambda _: None)
    # full, one try per block (not per conv), then the sensitive block kept whole
    assert result.held and calls == [(), first_block, (convs[2],), first_block]
    assert result.kept_high_precision == list(first_block)
    assert set(result.sensitivity) == {unit_of(convs[0]), unit_of(convs[2])}
