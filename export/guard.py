"""The int8 accuracy guard: keep int8 only where it costs at most `max_drop` points.

All decisions use validation images carved from the training side; the test split is
measured once afterwards and only reported.

If the fully quantized model fails, each quantized layer's sensitivity is measured one
at a time (the model quantized with just that layer kept in high precision: how much of
the drop it wins back), and layers are kept in high precision in that order, most
sensitive first, until the guard holds. If it never holds, int8 is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .evaluate import Comparison

Quantizer = Callable[[tuple[str, ...]], "object"]  # exclude -> QuantizeResult
Evaluator = Callable[[Path], Comparison]


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
    kept_high_precision: list[str] = field(default_factory=list)
    # node -> (metric points, top-1 agreement) won back by keeping just that node in high precision
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


def run_guard(quantize: Quantizer, evaluate: Evaluator, thresholds: GuardThresholds, log=print) -> GuardResult:
    full = quantize(())
    comparison = evaluate(full.path)
    failures = thresholds.failures(comparison)
    if not failures:
        return GuardResult(True, comparison, full)
    log(f"int8 guard: fully quantized model fails ({'; '.join(failures)}); measuring layer sensitivity")

    base_drop, base_agree = _badness(comparison)
    won_back: dict[str, tuple[float, float]] = {}
    for node in full.quantized:
        drop, agree = _badness(evaluate(quantize((node,)).path))
        won_back[node] = (base_drop - drop, base_agree - agree)
    ranked = sorted(won_back, key=lambda n: won_back[n], reverse=True)

    kept: list[str] = []
    result = full
    for node in ranked[:-1]:  # keeping every layer in high precision is not int8 any more
        kept.append(node)
        result = quantize(tuple(kept))
        comparison = evaluate(result.path)
        if not thresholds.failures(comparison):
            log(f"int8 guard: holds with {len(kept)} layer(s) in high precision: {', '.join(kept)}")
            return GuardResult(True, comparison, result, kept, won_back, failures)
    return GuardResult(False, comparison, result, kept, won_back, failures)
