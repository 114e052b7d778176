"""The fold stage every recipe's model goes through before ONNX: merge, then fold.

Each folder takes a model and returns ``(folded_copy, info)``; the stage runs them in
order and checks after each that the outputs did not move (fp32 max abs diff), so a
wrong merge fails here, by name, instead of as a mysterious accuracy loss on the device.
Recipes that bring adapters add their merge here: one function plus one FOLDERS line.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from medkd.toolchain.errors import UserError

from .fold import fold_batchnorm_with_stats


def merge_peft_adapters(model: nn.Module) -> tuple[nn.Module, dict]:
    """PEFT LoRA adapters merged into their base layers with PEFT's own merge_and_unload."""
    if not hasattr(model, "merge_and_unload"):
        return model, {"merged": False}
    merged = copy.deepcopy(model).merge_and_unload()
    return merged.eval(), {"merged": True, "library": "peft"}


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, dict]:
    folded, stats = fold_batchnorm_with_stats(model)
    return folded, stats.as_dict()


FOLDERS: list[tuple[str, Callable[[nn.Module], tuple[nn.Module, dict]]]] = [
    ("peft_merge", merge_peft_adapters),
    ("batchnorm", fold_batchnorm),
]


@torch.no_grad()
def fold_for_export(model: nn.Module, sample: torch.Tensor, max_abs_diff: float) -> tuple[nn.Module, dict]:
    """Run every folder on an eval copy of `model`; raise UserError if one changes the outputs."""
    current = copy.deepcopy(model).eval()
    reference = current(sample)
    info = {}
    for name, folder in FOLDERS:
        current, info[name] = folder(current)
        diff = float((current.eval()(sample) - reference).abs().max())
        info[name]["max_abs_diff"] = diff
        if not diff <= max_abs_diff:
            raise UserError(f"fold stage '{name}' changed the model's outputs by {diff:.3g} "
                            f"(> export.parity.fp32_max_abs_diff={max_abs_diff:g}); nothing was exported")
    return current, info
