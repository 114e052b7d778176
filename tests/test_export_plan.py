"""The export plan (precision x formats per target), the format table, and the fold stage."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medkd.export import fold_stage
from medkd.export.exporter import ModelExporter
from medkd.export.formats import FORMATS, PRECISIONS
from medkd.export.plan import plan_export
from medkd.toolchain.config import CONF_DIR, group_options, load_config
from medkd.toolchain.errors import ConfigError, UserError

SHAPE = (1, 32, 32)


def target(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "target" / f"{name}.yaml"))


def export_cfg(**overrides) -> dict:
    cfg = OmegaConf.to_container(load_config([]).export)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_cpu_best_builds_int8_with_fp32_fallback():
    plan = plan_export(target("cpu"), export_cfg(), 2000, 2800, SHAPE)
    assert plan.precisions == ("fp32", "int8") and plan.fallback_precision == "fp32"
    assert plan.formats == ("onnx", "onnx-int8", "firmware")
    assert plan.validation_images == 1000 and plan.calibration_images == 512


def test_gpu_best_builds_fp16_fallback_int8_and_tensorrt():
    plan = plan_export(target("jetson-orin"), export_cfg(), 2000, 2800, SHAPE)
    assert plan.precisions == ("fp32", "fp16", "int8") and plan.fallback_precision == "fp16"
    assert plan.formats == ("onnx", "onnx-fp16", "onnx-int8", "tensorrt", "firmware")


def test_fp32_needs_no_calibration_and_validation_is_capped_at_half_the_labels():
    plan = plan_export(target("datacenter-gpu"), export_cfg(precision="fp32"), 100, 100, SHAPE)
    assert plan.precisions == ("fp32",) and plan.calibration_images == 0
    assert plan.formats == ("onnx", "tensorrt", "firmware") and plan.validation_images == 50


@pytest.mark.parametrize("name, overrides, fragment", [
    ("cpu", {"precision": "fp16"}, "does not support precision fp16"),
    ("cpu", {"precision": "bset"}, "did you mean 'best'"),
    ("jetson-orin", {"formats": ["onnx", "firmwar"]}, "did you mean 'firmware'"),
    ("cpu", {"formats": ["tensorrt"]}, "not for target cpu"),
    ("jetson-orin", {"precision": "fp32", "formats": ["onnx-int8"]}, "needs export.precision=int8 or best"),
    ("cpu", {"calibration": {"images": 3000, "method": "minmax"}}, "export.calibration.images=1800"),
    ("cpu", {"calibration": {"images": 64, "method": "entropy"}}, "minmax or percentile"),
    ("cpu", {"latency_batches": [0]}, "export.latency_batches"),
    ("cpu", {"max_accuracy_drop": -1}, "export.max_accuracy_drop"),
])
def test_bad_plans_are_config_errors(name, overrides, fragment):
    with pytest.raises(ConfigError) as info:
        plan_export(target(name), export_cfg(**overrides), 2000, 2800, SHAPE)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_dla_is_checked_in_the_plan():
    plan_export(target("jetson-orin"), export_cfg(dla_core=1), 2000, 2800, SHAPE)
    with pytest.raises(UserError, match="no DLA"):
        plan_export(target("jetson-orin-nano"), export_cfg(dla_core=0), 2000, 2800, SHAPE)


def test_format_table_and_targets_agree():
    for name in FORMATS:
        assert callable(getattr(ModelExporter, "export_" + name.replace("-", "_"))), name
    for name in group_options("target"):
        t = target(name)
        assert t["precision"] in PRECISIONS and set(t["precisions"]) <= set(PRECISIONS)
        for fmt in t["formats"]:
            assert t["runtime"] in FORMATS[fmt].runtimes, (name, fmt)
    assert FORMATS["tensorrt"].fallback == "bundle" and FORMATS["onnx-int8"].needs_calibration
    assert {"cpu", "jetson-orin", "jetson-orin-nano", "datacenter-gpu"} <= set(group_options("target"))


def test_peft_lora_merge_matches_the_unmerged_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "3"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a merge test needs a non-zero update
            nn.init.normal_(param, std=0.5)
    x = torch.rand(5, 1, 8, 8)
    expected = model(x)
    folded, info = fold_stage.fold_for_export(model, x, max_abs_diff=1e-5)
    assert info["peft_merge"]["merged"] is True and not any("lora" in n for n, _ in folded.named_parameters())
    torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=0)
    assert any("lora_B" in n for n, _ in model.named_parameters())


def test_a_folder_that_changes_outputs_is_refused(monkeypatch):
    def broken(model):
        model = copy.deepcopy(model)
        with torch.no_grad():
            model[0].bias.add_(1.0)
        return model, {}

    monkeypatch.setattr(fold_stage, "FOLDERS", [("broken", broken)])
    with pytest.raises(UserError, match="fold stage 'broken' changed the model's outputs"):
        fold_stage.fold_for_export(nn.Sequential(nn.Linear(3, 2)), torch.rand(4, 3), max_abs_diff=1e-4)
