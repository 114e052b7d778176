"""Benchmark: what recipe=lora (the PEFT baseline) costs on CPU, beside the distilled student.

One `medkd-build recipe=lora` on data=mri at the default teacher input size, from a cold
feature cache, trained for `--epochs` epochs (default: the config's), exported in fp32 with the
latency loop cut to `--latency-runs` runs. Its stage times give the cost of the
intermediate-feature cache (cold), of one training epoch, of the test evaluation and of the
export; from them the budget of a default build is derived (train.epochs, latency_runs and
latency_warmup from the config; the latency loop extrapolated from the measured rows).

Then the `--baseline-recipe` (rd) is built with the same data, epochs and export settings
(its own cold cache), and on the two finished runs:
  * fp32 ONNX Runtime latency of the fine-tuned foundation model and of the distilled
    student, measured in alternating rounds so load from other jobs hits both alike;
  * one pass of the int8 accuracy guard on the lora model as `export.precision=best|int8`
    runs it (quantize with the export's 512 calibration images, evaluate on its 1000
    validation images): the guard runs 1 such pass when fully quantized int8 holds, and up
    to 2 x (quantized layers) more when it does not (each layer's sensitivity, then
    keeping layers back one by one).

    python bench/lora_budget.py                                  # default protocol
    python bench/lora_budget.py --epochs 1 --max-train 600 --max-test 64 --latency-runs 2 \\
        --override export.validation_images=64                  # quick look

Prints a table and writes bench/results/lora_budget.json. The machine is shared (2 cores,
other jobs running): absolute seconds move with its load (recorded before and after);
quote ratios measured within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from medkd.toolchain.atomic import atomic_write_text
from medkd.export.evaluate import accuracy, compare, onnx_logits
from medkd.export.profile import profile_onnx_matrix
from medkd.export.quantize import quantize
from medkd.toolchain.config import load_config
from medkd.toolchain.data import load_task
from medkd.toolchain.export_stage import export_data, make_plan
from medkd.toolchain.models.teachers import LITEMEDSAM_DEFAULT_INPUT_SIZE, LITEMEDSAM_ENCODER_KWARGS
from medkd.toolchain.pipeline import run

RESULTS = Path(__file__).parent / "results" / "lora_budget.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mri")
    parser.add_argument("--input-size", type=int, default=None, help="teacher.input_size; default: the teacher's")
    parser.add_argument("--augment", default="none", help="data.augment (K views multiply the feature cache by K)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's train.epochs")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="alternating latency rounds, lora vs student")
    parser.add_argument("--baseline-recipe", default="rd",
                        help="the distilling recipe built beside it with the same settings (its student is timed)")
    parser.add_argument("--override", action="append", default=[], help="any extra medkd-build key=value")
    parser.add_argument("--run-dir", type=Path, default=None, help="keep the run here (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def build_overrides(args, run_dir: Path, cache_dir: Path, recipe: str = "lora") -> list[str]:
    overrides = [f"recipe={recipe}", f"data={args.data}", f"data.augment={args.augment}", f"train.epochs={args.epochs}",
                 "export.precision=fp32", f"export.latency_runs={args.latency_runs}", "export.latency_warmup=1",
                 "progress=false", "overwrite=true", f"run_dir={run_dir}", f"cache_dir={cache_dir}"]
    if args.input_size:
        overrides.append(f"teacher.input_size={args.input_size}")
    if args.max_train:
        overrides.append(f"data.max_train={args.max_train}")
    if args.max_test:
        overrides.append(f"data.max_test={args.max_test}")
    return overrides + list(args.override)


def latency_seconds(rows: list[dict], runs: int, warmup: int) -> float:
    """Wall time of the export's latency loop for these rows at `runs` + `warmup` calls each."""
    return sum((runs + warmup) * row["mean_ms"] / 1000 for row in rows)


def compare_latency(models: dict[str, Path], shape_chw, cfg, runs: int, rounds: int) -> dict:
    """{model: {(batch, threads): [p50 per round]}}, the models taking turns round by round."""
    out: dict[str, dict] = {name: {} for name in models}
    for _ in range(rounds):
        for name, path in models.items():
            for row in profile_onnx_matrix(path, shape_chw, batch_sizes=list(cfg.export.latency_batches),
                                           threads=[t or None for t in cfg.export.latency_threads],
                                           warmup=1, runs=runs, progress=False):
                out[name].setdefault((row["batch_size"], row["threads"]), []).append(row["p50_ms"])
    return out


def int8_guard_pass(run_dir: Path, cfg) -> dict:
    """One quantize + evaluate pass of the int8 guard, on the export's own calibration/validation split."""
    cfg = OmegaConf.merge(cfg, {"export": {"precision": "int8"}})
    task = load_task(cfg.data)
    data = export_data(task, make_plan(cfg, task), cfg.seed)
    fp32 = run_dir / "model.onnx"
    started = time.perf_counter()
    reference = onnx_logits(fp32, data.validation_images)
    reference_s = time.perf_counter() - started
    started = time.perf_counter()
    result = quantize("int8-cpu", fp32, run_dir / "bench.int8.onnx", data.calibration)
    quantize_s = time.perf_counter() - started
    started = time.perf_counter()
    candidate = onnx_logits(run_dir / "bench.int8.onnx", data.validation_images)
    evaluate_s = time.perf_counter() - started
    comparison = compare(reference, candidate, data.validation_labels, accuracy)
    layers = len(result.quantized)
    return {"calibration_images": len(data.calibration), "validation_images": len(data.validation_images),
            "fp32_reference_s": round(reference_s, 1), "quantize_s": round(quantize_s, 1),
            "evaluate_s": round(evaluate_s, 1), "pass_s": round(quantize_s + evaluate_s, 1),
            "quantized_layers": layers, "worst_case_passes": 1 + layers + (layers - 1),
            "full_int8": comparison.as_dict()}


def main(argv=None) -> int:
    args = parse_args(argv)
    defaults = load_config(["recipe=lora"])
    args.epochs = args.epochs or defaults.train.epochs
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="medkd-lora-bench-"))
    run_dir = args.run_dir or tmp / "run"
    try:
        cfg = load_config(build_overrides(args, run_dir, tmp / "cache"))  # a fresh cache: the cold cost
        started = time.perf_counter()
        report = run(cfg)
        wall = time.perf_counter() - started
        # The distilling recipe with the same data, epochs and export settings (fresh cache too).
        started = time.perf_counter()
        baseline = run(load_config(build_overrides(args, tmp / "baseline", tmp / "cache", args.baseline_recipe)))
        baseline_wall = time.perf_counter() - started
        c, h, _ = report["data"]["image_shape"]
        latency = compare_latency({"lora": run_dir / "model.onnx", "student": tmp / "baseline" / "model.onnx"},
                                  (c, h, h), cfg, args.latency_runs, args.rounds)
        guard = int8_guard_pass(run_dir, cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()

    stages = report["run"]["stage_seconds"]
    model = report["export"]["models"]["model"]
    measured_latency = latency_seconds(model["latency"]["fp32"], args.latency_runs, 1)
    default_latency = latency_seconds(model["latency"]["fp32"], defaults.export.latency_runs,
                                      defaults.export.latency_warmup)
    epoch_s = stages["training"] / args.epochs
    budget = {
        "setup_s": stages["setup"],
        "features_cold_s": stages["teacher_features"],
        "training_s": epoch_s * defaults.train.epochs,
        "test_evaluation_s": stages["test_evaluation"],
        "export_fp32_without_latency_s": stages["export"] - measured_latency,
        "latency_loop_fp32_s": default_latency,
    }
    budget["total_fp32_s"] = sum(budget.values())
    n_train, n_test = report["data"]["train"], report["data"]["test"]
    size = report["teacher"].get("input_size") or LITEMEDSAM_DEFAULT_INPUT_SIZE
    params = report["student"]["parameters"]
    student_params = baseline["student"]["parameters"]
    student_name = f"{baseline['student']['name']} ({args.baseline_recipe})"
    rows = []
    for key in sorted(latency["lora"]):
        lora_ms = sum(latency["lora"][key]) / len(latency["lora"][key])
        student_ms = sum(latency["student"][key]) / len(latency["student"][key])
        rows.append({"batch_size": key[0], "threads": key[1], "lora_p50_ms": lora_ms, "student_p50_ms": student_ms,
                     "ratio": lora_ms / student_ms})
    result = {
        "benchmark": "lora_budget",
        "command": "python bench/lora_budget.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "overrides": build_overrides(args, Path("RUN"), Path("CACHE")),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs",
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "torch": torch.__version__,
        "teacher_input_size": size,
        "train_images": n_train, "test_images": n_test, "epochs_run": args.epochs,
        "stage_seconds": stages, "wall_seconds": round(wall, 1),
        "per_image_seconds": {"features_cold": stages["teacher_features"] / (n_train + n_test),
                              "training_epoch": epoch_s / n_train,
                              "test_evaluation_full_model": stages["test_evaluation"] / n_test},
        "default_build_budget": {**{k: round(v, 1) for k, v in budget.items()},
                                 "epochs": defaults.train.epochs, "latency_runs": defaults.export.latency_runs,
                                 "cpu_hours_fp32": round(budget["total_fp32_s"] * 2 / 3600, 2)},
        # float32 last-stage input tokens of every train + test image: (S/4)^2 x 320 each.
        "intermediate_cache_bytes": (n_train + n_test) * 4 * (size // 4) ** 2 * LITEMEDSAM_ENCODER_KWARGS["embed_dims"][-1],
        "int8_guard_pass": guard,
        "lora": {"parameters": params, "test_accuracy_after_epochs_run": report["training"]["test_accuracy"],
                 "fold": model["formats"]["onnx"]["fold"]},
        "student": {"name": student_name, "parameters": student_params,
                    "test_accuracy_after_epochs_run": baseline["training"]["test_accuracy"],
                    "stage_seconds": baseline["run"]["stage_seconds"], "wall_seconds": round(baseline_wall, 1)},
        "parameter_ratio_lora_over_student": params["total"] / student_params,
        "latency_fp32_p50_alternating_rounds": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(result, indent=1, sort_keys=True) + "\n")

    print(f"recipe=lora on {args.data}: {n_train} train / {n_test} test images, teacher {size} px, "
          f"{args.epochs} epoch(s) run; 1-min load {result['load_average_1min_before_after']}")
    print(f"{'default-build stage (fp32 export)':36s} {'seconds':>9s}")
    for key, value in budget.items():
        print(f"{key:36s} {value:9.1f}")
    print(f"= {budget['total_fp32_s'] / 3600:.2f} h on this 2-core box, {result['default_build_budget']['cpu_hours_fp32']} "
          f"CPU-hours; int8 guard: {guard['pass_s']:.0f} s per pass, {guard['quantized_layers']} layers "
          f"(full int8 agreement {guard['full_int8']['top1_agreement']:.1%}, worst case "
          f"{guard['worst_case_passes']} passes = {guard['worst_case_passes'] * guard['pass_s'] / 3600:.1f} h)")
    print(f"parameters: lora {params['total']:,} deployed ({params['trainable']:,} trained) vs "
          f"{student_name} {student_params:,}")
    print(f"{'batch':>5s} {'threads':>7s} {'lora p50 ms':>12s} {'student p50 ms':>16s} {'ratio':>7s}")
    for row in rows:
        print(f"{row['batch_size']:5d} {row['threads']:7d} {row['lora_p50_ms']:12.2f} {row['student_p50_ms']:16.2f} "
              f"{row['ratio']:7.1f}")
    print(f"test accuracy after {args.epochs} epoch(s): lora {report['training']['test_accuracy']:.4f}, "
          f"{student_name} {baseline['training']['test_accuracy']:.4f} (build {baseline_wall:.0f} s vs {wall:.0f} s); "
          f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
