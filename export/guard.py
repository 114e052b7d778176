"""The int8 accuracy guard: keep int8 only where it costs at most `max_drop` points.

All decisions use validation images carved from the training side; the test split is
measured once afterwards and only reported.

If the fully quantized model fails, sensitivity is measured one unit at a time (the model
quantized with just that unit kept in high precision: how much of the drop it wins back),
and units are kept in high precision in that order, most sensitive first, until the guard
holds. If it never holds, int8 is refused.

A unit is a repeated block (every node under `/blocks/blocks.3/...` or `/layer1/layer1.0/...`
in the exported names) or a layer outside any block. One quantization costs seconds on a
transformer (ONNX Runtime's quantizer is Python), so a ViT-Tiny's 76 layers would take ten
minutes where its 12 blocks and a few other layers take two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .evaluate import Comparison

Quantizer = Callable[[tuple[str, ...]], "object"]  # exclude -> QuantizeResult
Evaluator = Callable[[Path], Comparison]


# A path component that is an indexed child, e.g. "blocks.3" or "layer1.0".
_INDEXED = re.compile(r".+\.\d+$")


def unit_of(node: str) -> str:
    """The guard's unit for an ONNX node name: the path up to its first indexed block, or the
    node itself outside any block."""
    parts = node.split("/")
    for i, part in enumerate(parts[:-1]):  # the last part is the op, never a block
        if _INDEXED.match(part):
            return "/".join(parts[:i + 1])
    return node


def units(nodes) -> dict[str, tuple[str, ...]]:
    """unit -> its nodes, in the nodes' order."""
    grouped: dict[str, list[str]] = {}
    for node in nodes:
        grouped.setdefault(unit_of(node), []).append(node)
    return {unit: tuple(members) for unit, members in grouped.items()}


@dataclass(frozen=True)
class GuardThresholds:
    max_drop_points: float
    min_agreement: float

    def failures(self, comparison: Comparison) -> list[str]:
        out = []
        if comparison.metric_drop_points > self.max_drop_points:
            out.append(f"metric drop {comparison.metric_drop_points:.2f} points > {self.max_drop_points}")
        if comparison.top1_agreement < self.min_agreement:
            out.append(f"top-1 agreement {comparison.top1_agreement:.2%} < {self.min_agreement:.2%}")
        return out


@dataclass
class GuardResult:
    held: bool
    comparison: Comparison  # of the last candidate tried (the kept one when held)
    result: object  # QuantizeResult of that candidate
    kept_high_precision: list[str] = field(default_factory=list)  # nodes
    # unit -> (metric points, top-1 agreement) won back by keeping just that unit in high precision
    sensitivity: dict[str, tuple[float, float]] = field(default_factory=dict)
    first_failure: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"held": self.held, "comparison": self.comparison.as_dict(),
                "kept_high_precision": list(self.kept_high_precision),
                "sensitivity": {n: {"metric_points_won_back": p, "agreement_won_back": a}
                                for n, (p, a) in self.sensitivity.items()},
                "first_failure": list(self.first_failure)}


def _badness(comparison: Comparison) -> tuple[float, float]:
    return (comparison.metric_drop_points, -comparison.top1_agreement)


def run_guard(quantize: Quantizer, evaluate: Evaluator, thresholds: GuardThresholds, log=print,
              progress=None) -> GuardResult:
    """`progress` (a toolchain.progress.ProgressPolicy; None = quiet): a bar over the
    sensitivity search, one quantize + evaluate per unit, the long part on a big model."""
    full = quantize(())
    comparison = evaluate(full.path)
    failures = thresholds.failures(comparison)
    if not failures:
        return GuardResult(True, comparison, full)
    log(f"int8 guard: fully quantized model fails ({'; '.join(failures)}); measuring layer sensitivity")

    base_drop, base_agree = _badness(comparison)
    grouped = units(full.quantized)
    won_back: dict[str, tuple[float, float]] = {}
    names = list(grouped) if progress is None else progress.bar(
        total=len(grouped), desc="int8 guard: sensitivity", unit="unit", iterable=list(grouped))
    for unit in names:
        drop, agree = _badness(evaluate(quantize(grouped[unit]).path))
        won_back[unit] = (base_drop - drop, base_agree - agree)
    ranked = sorted(won_back, key=lambda u: won_back[u], reverse=True)

    kept: list[str] = []
    result = full
    for unit in ranked[:-1]:  # keeping every unit in high precision is not int8 any more
        kept.extend(grouped[unit])
        result = quantize(tuple(kept))
        comparison = evaluate(result.path)
        if not thresholds.failures(comparison):
            log(f"int8 guard: holds with {len(kept)} layer(s) in high precision: {', '.join(kept)}")
            return GuardResult(True, comparison, result, kept, won_back, failures)
    return GuardResult(False, comparison, result, kept, won_back, failures)
