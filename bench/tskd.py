"""Benchmark: TS-KD vs task-agnostic KD vs scratch for segmentation, over label budgets.

The TS-KD paper's claim under test: distilling a task-specific (LoRA-tuned) foundation model
beats distilling the un-tuned one, and both beat training from scratch, most with few labels.
Every (label budget, seed, mode) is one `medkd-build recipe=tskd` run (toolchain/seg_pipeline.py)
on data=mri-seg with the recipe's defaults: the same evenly spaced labelled slices for every
mode (the budget is data.train_fraction = slices / training slices), the same student, seeds
0-2. Export is cut to fp32 with a short latency loop: what is measured here is accuracy.

    python bench/tskd.py                          # modes tskd agnostic scratch, 10/20/40 slices, seeds 0-2
    python bench/tskd.py --budgets 10 --seeds 0   # one look
    python bench/tskd.py --resume                 # add the missing runs to bench/results/tskd.json

Prints a table (test mean Dice and HD95, mean ± std over seeds; the teacher's Dice for tskd)
and writes bench/results/tskd.json after every run, with the CPU seconds of every stage, so
the protocol's CPU budget is on record. `complete` says whether the runs cover the protocol.
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
from medkd.toolchain.data import load_segmentation_task
from medkd.toolchain.errors import UserError
from medkd.toolchain.pipeline import run

MODES = ("tskd", "agnostic", "scratch")
BUDGETS = (10, 20, 40)
SEEDS = (0, 1, 2)
RESULTS = Path(__file__).parent / "results" / "tskd.json"
# Export is not what this benchmark measures: fp32 only, a short latency loop.
EXPORT = ["export.precision=fp32", "export.latency_runs=5", "export.latency_warmup=1",
          "export.latency_batches=[1]", "export.latency_threads=[0]", "progress=false"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS), help="labelled training slices")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--override", action="append", default=[], help="extra config override for every run")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true", help="keep the runs in --output and add the missing ones")
    return parser.parse_args(argv)


def budget_fraction(slices: int, available: int) -> float:
    """data.train_fraction that keeps exactly `slices` of `available` training slices labelled."""
    if not 1 <= slices <= available:
        raise UserError(f"a budget of {slices} slices is outside 1..{available} (the training slices)")
    return slices / available


def run_overrides(args, mode: str, slices: int, available: int, seed: int, run_dir: Path, cache: Path) -> list[str]:
    return ["recipe=tskd", f"recipe.mode={mode}", f"data.train_fraction={budget_fraction(slices, available)}",
            f"seed={seed}", f"data.seed={seed}", f"run_dir={run_dir}", f"cache_dir={cache}", *EXPORT,
            *args.override]


def row_from_report(report: dict) -> dict:
    test = report["segmentation"]["test"]
    teacher = report.get("teacher") or {}
    return {"test_mean_dice": test["mean_dice"], "test_mean_hd95_mm": test["mean_hd95_mm"],
            "per_class_dice": {k: v["dice"] for k, v in test["per_class"].items()},
            "teacher_test_mean_dice": (teacher.get("test") or {}).get("mean_dice"),
            "labelled": report["data"]["train"], "transfer_images": report["transfer_set"]["images"],
            "stage_seconds": report["run"]["stage_seconds"], "wall_s": report["run"]["wall_time_s"]}


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["budget"], row["mode"]), []).append(row)

    def spread(values):
        return statistics.stdev(values) if len(values) > 1 else 0.0

    summary = []
    for (budget, mode), runs in sorted(groups.items()):
        dice = [r["test_mean_dice"] for r in runs]
        hd95 = [r["test_mean_hd95_mm"] for r in runs]
        teacher = [r["teacher_test_mean_dice"] for r in runs if r["teacher_test_mean_dice"] is not None]
        summary.append({"budget": budget, "mode": mode, "seeds": len(runs),
                        "dice": statistics.mean(dice), "dice_std": spread(dice),
                        "hd95_mm": statistics.mean(hd95), "hd95_std": spread(hd95),
                        "teacher_dice": statistics.mean(teacher) if teacher else None,
                        "wall_s": statistics.mean(r["wall_s"] for r in runs)})
    return summary


def protocol_gaps(rows: list[dict], overrides: list[str]) -> list[str]:
    """What the runs leave out of the protocol (every mode x budget x seed, default settings)."""
    done = {(r["mode"], r["budget"], r["seed"]) for r in rows}
    gaps = [f"{mode} {budget} slices seed {seed} not run" for budget in BUDGETS for seed in SEEDS for mode in MODES
            if (mode, budget, seed) not in done]
    if overrides:
        gaps.append(f"settings other than the protocol's: {overrides}")
    return gaps


def print_table(summary: list[dict]) -> None:
    print(f"\n{'slices':>6}  {'mode':<9}{'seeds':>6}  {'test Dice':>16}  {'HD95 (mm)':>16}  {'teacher Dice':>12}")
    for s in summary:
        teacher = f"{s['teacher_dice']:.4f}" if s["teacher_dice"] is not None else "-"
        print(f"{s['budget']:>6}  {s['mode']:<9}{s['seeds']:>6}  {s['dice']:>9.4f}±{s['dice_std']:.3f}  "
              f"{s['hd95_mm']:>9.2f}±{s['hd95_std']:.2f}  {teacher:>12}")


def write_results(args, rows: list[dict], command: str, finished: bool) -> None:
    gaps = protocol_gaps(rows, args.override)
    if not finished:
        gaps.append("run stopped before the end (partial results)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    cpu_s = sum(r["wall_s"] for r in rows)
    atomic_write_text(args.output, json.dumps({
        "benchmark": "tskd",
        "claim": "TS-KD beats task-agnostic KD and scratch, most with few labels",
        "command": command,
        "complete": not gaps, "left_out": gaps,
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "overrides": args.override, "wall_seconds_all_runs": round(cpu_s, 1),
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
    command = command_history(previous, "bench/tskd.py", sys.argv[1:] if argv is None else argv)
    done = {(r["mode"], r["budget"], r["seed"]) for r in rows}
    available = len(load_segmentation_task(load_config(["recipe=tskd", *args.override]).data).train)
    with tempfile.TemporaryDirectory(prefix="medkd-bench-tskd-") as tmp:
        cache = Path(tmp) / "cache"  # the teacher's early-stage tokens, shared by every run
        # Seed outermost: a run stopped early still has every budget and mode for its first seeds.
        for seed in args.seeds:
            for budget in args.budgets:
                for mode in args.modes:
                    if (mode, budget, seed) in done:
                        continue
                    run_dir = Path(tmp) / f"{mode}-{budget}-{seed}"
                    report = run(load_config(run_overrides(args, mode, budget, available, seed, run_dir, cache)))
                    rows.append({"mode": mode, "budget": budget, "seed": seed, **row_from_report(report)})
                    write_results(args, rows, command, finished=False)
                    print(f"{budget} slices seed {seed} {mode:<9} Dice {rows[-1]['test_mean_dice']:.4f} "
                          f"({rows[-1]['wall_s']} s)", flush=True)
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
