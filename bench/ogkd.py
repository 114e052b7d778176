"""Benchmark: OGKD vs CoOp prompt tuning vs plain KD to zero-shot, base-to-novel.

The OGKD paper's claim under test: geometry-aware distillation (class graph, GAD, LGD, SCCM)
generalises better to novel classes than prompt tuning with cross-entropy alone (CoOp) and
than distillation without geometry (plain KL), at no cost on the base classes. Every
(objective, seed) is one `medkd-build recipe=ogkd` run (toolchain/vlm_pipeline.py) on
data=mri-regions with the embedded demonstration VLM (teacher=lit-vlm) and the recipe's
defaults: 16 shots per base class, the same shots, alignment and classes for every objective
of a seed; seeds 0-2 (data.seed draws other patches, seed other context vectors). Export is
cut to an fp32 ONNX, parity on 32 images and a short latency loop: what is measured here is
accuracy (the deployed ONNX's all-class test accuracy is kept too).

    python bench/ogkd.py                        # objectives ogkd coop kd, seeds 0-2
    python bench/ogkd.py --seeds 0              # one look
    python bench/ogkd.py --resume               # add the missing runs to bench/results/ogkd.json
    python bench/ogkd.py --seeds 0 --override recipe.lr=0.02 --output bench/results/ogkd_lr0.02.json
                                                # a setting to compare on the validation accuracy
    python bench/ogkd.py --few-shot             # recipe.protocol=all (every class trains), 1/4/16
                                                # shots per class -> bench/results/ogkd_fewshot.json

Prints a table (test accuracy on base classes, on novel classes, their harmonic mean; mean
± std over seeds; the frozen VLM's zero-shot accuracy beside it) and writes
bench/results/ogkd.json after every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from _results import command_history

from medkd.toolchain.atomic import atomic_write_text
from medkd.toolchain.config import load_config
from medkd.toolchain.errors import UserError
from medkd.toolchain.pipeline import run

OBJECTIVES = ("ogkd", "coop", "kd")
SEEDS = (0, 1, 2)
SCORES = ("base", "novel", "harmonic_mean")
RESULTS = Path(__file__).parent / "results" / "ogkd.json"
FEW_SHOT_RESULTS = Path(__file__).parent / "results" / "ogkd_fewshot.json"
FEW_SHOTS = (1, 4, 16)
EXPORT = ["export.precision=fp32", "export.formats=[onnx]", "export.validation_images=32", "export.latency_runs=5",
          "export.latency_warmup=1", "export.latency_batches=[1]", "export.latency_threads=[0]", "progress=false"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--override", action="append", default=[], help="extra config override for every run")
    parser.add_argument("--few-shot", action="store_true",
                        help="recipe.protocol=all: every class trains on --shots images each (no novel classes)")
    parser.add_argument("--shots", nargs="+", type=int, default=list(FEW_SHOTS), help="--few-shot: shots per class")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"default {RESULTS.name}, with --few-shot {FEW_SHOT_RESULTS.name} (in bench/results)")
    parser.add_argument("--resume", action="store_true", help="keep the runs in --output and add the missing ones")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the image tokens are cached (default: a temporary folder per invocation)")
    args = parser.parse_args(argv)
    args.output = args.output or (FEW_SHOT_RESULTS if args.few_shot else RESULTS)
    args.shots = args.shots if args.few_shot else [None]  # None: the recipe's shots, base-to-novel
    return args


def run_key(row: dict) -> tuple:
    """(objective, shots, seed); shots None = the base-to-novel protocol's default."""
    return row["objective"], row.get("shots"), row["seed"]


def row_from_report(report: dict) -> dict:
    scores = report["vlm"]["test"]
    return {"prompt_tuned": scores["prompt_tuned"], "zero_shot": scores["zero_shot"],
            "validation": report["vlm"]["validation"],
            "deployed_all_class_accuracy": report["export"]["models"]["model"]["test_metric"]["fp32"],
            "classes": {"base": len(report["data"]["base_classes"]), "novel": len(report["data"]["novel_classes"])},
            "stage_seconds": report["run"]["stage_seconds"], "wall_s": report["run"]["wall_time_s"]}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (objective, shots); few-shot rows have no novel classes."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["objective"], row.get("shots")), []).append(row)

    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    ordered = sorted(groups.items(), key=lambda item: (item[0][1] or 0, OBJECTIVES.index(item[0][0])))
    return [{"objective": objective, **({"shots": shots} if shots is not None else {}), "seeds": len(runs),
             **{score: stats([r["prompt_tuned"][score] for r in runs]) for score in SCORES},
             "zero_shot": {score: stats([r["zero_shot"][score] for r in runs]) for score in SCORES}}
            for (objective, shots), runs in ordered]


def protocol_gaps(rows: list[dict], overrides: list[str], shots: list) -> list[str]:
    done = {run_key(r) for r in rows}
    gaps = [f"{objective}{'' if k is None else f' {k}-shot'} seed {seed} not run"
            for k in shots for seed in SEEDS for objective in OBJECTIVES if (objective, k, seed) not in done]
    if overrides:
        gaps.append(f"settings other than the protocol's: {overrides}")
    return gaps


def print_table(summary: list[dict]) -> None:
    def cell(stat):
        return f"{'-':>13}" if stat is None else f"{stat['mean']:>7.4f}±{stat['std']:.3f}"

    print(f"\n{'objective':<10}{'shots':>6}{'seeds':>6}  {'base':>13}  {'novel':>13}  {'HM':>13}  "
          f"{'zero-shot base':>14}  {'zero-shot HM':>13}")
    for s in summary:
        print(f"{s['objective']:<10}{s.get('shots', '-'):>6}{s['seeds']:>6}  "
              + "  ".join(cell(s[k]) for k in SCORES)
              + f"  {cell(s['zero_shot']['base']):>14}  {cell(s['zero_shot']['harmonic_mean'])}")


def write_results(args, rows: list[dict], command: str, finished: bool) -> None:
    gaps = protocol_gaps(rows, args.override, args.shots)
    if not finished:
        gaps.append("run stopped before the end (partial results)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps({
        "benchmark": "ogkd-few-shot" if args.few_shot else "ogkd",
        "claim": ("OGKD beats CoOp and plain KD in few-shot accuracy (every class trains)" if args.few_shot else
                  "OGKD beats CoOp and plain KD on novel classes (harmonic mean) without losing base accuracy"),
        "protocol": "all (few-shot), shots per class: " + ", ".join(map(str, args.shots)) if args.few_shot
        else "base2novel, the recipe's shots",
        "command": command,
        "complete": not gaps, "left_out": gaps,
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "teacher": "lit-vlm (embedded demonstration VLM, aligned on the base classes)",
        "overrides": args.override, "wall_seconds_all_runs": round(sum(r["wall_s"] for r in rows), 1),
        "summary": summarise(rows), "runs": rows,
    }, indent=2) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, previous = [], {}
    if args.resume and args.output.is_file():
        previous = json.loads(args.output.read_text())
        if previous.get("overrides") != args.override:
            raise UserError(f"--resume: {args.output} was measured with overrides {previous.get('overrides')}, "
                            f"this run uses {args.override}; use another --output")
        rows = previous["runs"]
    command = command_history(previous, "bench/ogkd.py", sys.argv[1:] if argv is None else argv)
    done = {run_key(r) for r in rows}
    with tempfile.TemporaryDirectory(prefix="medkd-bench-ogkd-") as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"  # the frozen image encoder's tokens, shared by every run
        # seed outermost: a stopped run has every objective and shot count of its first seeds
        for seed in args.seeds:
            for shots in args.shots:
                protocol = [] if shots is None else ["recipe.protocol=all", f"recipe.shots={shots}"]
                for objective in args.objectives:
                    if (objective, shots, seed) in done:
                        continue
                    run_dir = Path(tmp) / f"{objective}-{shots}-{seed}"
                    report = run(load_config(["recipe=ogkd", f"recipe.objective={objective}", f"seed={seed}",
                                              f"data.seed={seed}", f"run_dir={run_dir}", f"cache_dir={cache}",
                                              *protocol, *EXPORT, *args.override]))
                    rows.append({"objective": objective, **({"shots": shots} if shots is not None else {}),
                                 "seed": seed, **row_from_report(report)})
                    write_results(args, rows, command, finished=False)
                    tuned = rows[-1]["prompt_tuned"]
                    print(f"seed {seed} {objective:<5} {'' if shots is None else f'{shots}-shot '}"
                          + " ".join(f"{k} {tuned[k]:.4f}" for k in SCORES if tuned[k] is not None)
                          + f" ({rows[-1]['wall_s']} s)", flush=True)
    print_table(summarise(rows))
    write_results(args, rows, command, finished=True)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
