"""Benchmark: teacher features in PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8.

Features (default): for each teacher setting, on real `data=mri` training images:
  * per-image extraction cost of every backend, through the build's own loop
    (medkd.toolchain.features.teacher_features, no cache), timed in interleaved rounds so
    every backend sees the same machine load; ratios are the median over rounds of the
    per-round ratio torch / backend;
  * the one-off cost of exporting the ONNX graph and of int8 quantization (calibrated on
    training images disjoint from the measured ones, the export stage's `int8-cpu` quantizer);
  * fidelity of each ONNX Runtime backend against the PyTorch features: max abs diff, mean
    cosine, linear CKA (medkd.kernels.cka_loss), and whether CKA >= 0.99 holds;
  * the compute rate each backend reaches (the network's GFLOP per image, counted by
    torch.utils.flop_counter, over its time per image) beside the rate of a dense fp32 matmul
    on the same threads just before the rounds: how much a faster runtime could still gain.

--build: the default build end to end, cold (fresh cache_dir and run_dir in a temporary
folder), once per teacher backend: `medkd-build recipe=rd target=jetson-orin
teacher.backend=B`, with every stage's seconds and the test accuracy from the run's
report.json, plus whether the ONNX graph cache was really used (a pipeline that ignores
teacher.backend shows up as `used_onnxruntime: false`).

    python bench/teacher.py                             # features, 3 settings
    python bench/teacher.py --build                     # + the two cold builds (~10 min on 2 cores)
    python bench/teacher.py --settings litemedsam@56 --no-features --build

Prints tables and writes bench/results/teacher.json. Timings come from a machine that
other jobs share: absolute times are noisy (the load averages are recorded); quote the
same-run ratios.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/export.py's machine helpers

from export import cpu_info, load_average  # noqa: E402

from medkd.kernels import cka_loss  # noqa: E402
from medkd.toolchain.atomic import atomic_write_text  # noqa: E402
from medkd.toolchain.config import load_config  # noqa: E402
from medkd.toolchain.data import load_task  # noqa: E402
from medkd.toolchain.features import teacher_features  # noqa: E402
from medkd.toolchain.models.teacher_runtime import calibration_subset, runtime_extractor  # noqa: E402
from medkd.toolchain.models.teachers import build_teacher  # noqa: E402
from medkd.toolchain.report import collect_versions  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "teacher.json"
CKA_BAR = 0.99
# name@size -> what is measured. 256 px LiteMedSAM costs seconds per image in PyTorch, so a
# few dozen images give its per-image cost; its int8 is off by default: ONNX Runtime's
# calibrator keeps every intermediate activation of every calibration image in memory
# (GBs per image at 256 px), and int8 is judged at 56 px on the same network.
SETTINGS = {
    "litemedsam@56": dict(teacher="litemedsam", input_size=56, images=128, batch=32, calibration=128,
                          spin=True),
    "litemedsam@256": dict(teacher="litemedsam", input_size=256, images=16, batch=4, calibration=0, spin=False),
    "efficientnet-lite0@224": dict(teacher="efficientnet-lite0", input_size=224, images=64, batch=32,
                                   calibration=32, spin=False),
}
BUILD_COMMAND = ("recipe=rd", "target=jetson-orin")
GOAL_TEACHER_SPEEDUP = 3.0
GOAL_BUILD_SECONDS = 60.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds per setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-images", type=int, default=None, help="cap measured/calibration images (quick look)")
    parser.add_argument("--int8-256", action="store_true", help="also quantize LiteMedSAM at 256 px (memory!)")
    parser.add_argument("--no-features", action="store_true", help="skip the feature benchmark")
    parser.add_argument("--build", action="store_true", help="also run the default build cold per backend")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"], choices=["torch", "onnxruntime"])
    parser.add_argument("--build-overrides", nargs="*", default=[],
                        help="extra medkd-build overrides (a quick look; no longer the default build)")
    parser.add_argument("--note", default=None, help="free text stored with the results")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- features


def measured_and_calibration(images: torch.Tensor, n: int, n_cal: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spaced measured images from the even indices, calibration images from the odd ones
    (disjoint sets, both spread over every region of the ordered training split)."""
    return calibration_subset(images[0::2], n), calibration_subset(images[1::2], max(n_cal, 1))


def fidelity(reference: torch.Tensor, features: torch.Tensor) -> dict:
    cka = 1.0 - float(cka_loss(reference.double(), features.double(), backend="torch"))
    return {
        "max_abs_diff": float((reference - features).abs().max()),
        "mean_cosine": float(F.cosine_similarity(reference, features).mean()),
        "linear_cka": cka,
        "cka_bar_met": cka >= CKA_BAR,
    }


def gflop_per_image(teacher, shape: tuple[int, ...]) -> float:
    """The network's multiply-adds x 2 per preprocessed image (matmuls and convolutions; the
    elementwise work is not counted, so achieved rates are a lower bound)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        teacher.extract(torch.rand(1, *shape))
    return counter.get_total_flops() / 1e9


def matmul_gflops(size: int = 1024, seconds: float = 2.0) -> float:
    """GFLOP/s of a dense fp32 matmul in PyTorch on the current threads: what this CPU gives the
    best-suited work right now (best of repeated timings)."""
    a, b = torch.rand(size, size), torch.rand(size, size)
    a @ b  # warm-up
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def timed_pass(module, images: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    feats = teacher_features(module, images, None, batch_size=batch, progress=False)
    return (time.perf_counter() - started) / len(images), feats


def bench_setting(name: str, spec: dict, train_images: torch.Tensor, rounds: int, threads: int, work: Path,
                  int8_256: bool, max_images: int | None = None, log=print) -> dict:
    teacher = build_teacher({"name": spec["teacher"], "input_size": spec["input_size"]})
    n_cal = spec["calibration"] or (32 if int8_256 and spec["input_size"] == 256 else 0)
    n = spec["images"]
    if max_images:
        n, n_cal = min(n, max_images), min(n_cal, max_images)
    images, calibration = measured_and_calibration(train_images, n, n_cal)
    shape = tuple(teacher.preprocess(images[:1]).shape[1:])
    cache = work / name
    variants = {"torch": teacher}
    one_off: dict[str, dict] = {}

    fp32 = runtime_extractor(teacher, "onnxruntime", "fp32", cache, threads=threads)
    fp32.session(shape)  # exported now, so the timed passes measure extraction only
    variants["onnxruntime-fp32"] = fp32
    one_off["onnxruntime-fp32"] = dict(fp32.build_seconds)
    if spec["spin"]:
        spinning = runtime_extractor(teacher, "onnxruntime", "fp32", cache, threads=threads, spin=True)
        spinning.session(shape)
        variants["onnxruntime-fp32-spin"] = spinning
    if n_cal:
        int8 = runtime_extractor(teacher, "onnxruntime", "int8", cache, calibration_images=calibration,
                                 calibration_count=n_cal, threads=threads)
        int8.session(shape)  # quantized from the cached fp32 graph
        variants["onnxruntime-int8"] = int8
        one_off["onnxruntime-int8"] = dict(int8.build_seconds)
    log(f"{name}: one-off {json.dumps({k: {s: round(v, 1) for s, v in d.items()} for k, d in one_off.items()})}")

    for module in variants.values():  # warm-up: first-run allocations are not extraction cost
        teacher_features(module, images[:2], None, batch_size=2, progress=False)
    gflop, matmul_rate = gflop_per_image(teacher, shape), matmul_gflops()
    per_image: dict[str, list[float]] = {v: [] for v in variants}
    features: dict[str, torch.Tensor] = {}
    for r in range(rounds):
        for variant, module in variants.items():
            seconds, features[variant] = timed_pass(module, images, spec["batch"])
            per_image[variant].append(seconds)
        log(f"{name} round {r + 1}: " + "  ".join(f"{v} {s[-1] * 1000:.1f} ms/img" for v, s in per_image.items()))

    result = {"teacher": spec["teacher"], "input_size": spec["input_size"], "images": len(images),
              "batch": spec["batch"], "calibration_images": n_cal, "graph_input": list(shape),
              "fingerprints": {v: m.fingerprint for v, m in variants.items()}, "one_off_seconds": one_off,
              "gflop_per_image": round(gflop, 3), "dense_matmul_gflops": round(matmul_rate, 1), "variants": {}}
    if not n_cal:
        result["int8_not_measured"] = ("off by default at 256 px: ONNX Runtime's calibrator holds every "
                                       "activation of every calibration image in memory (--int8-256 runs it)")
    for variant in variants:
        median = statistics.median(per_image[variant])
        entry = {"ms_per_image_rounds": [round(s * 1000, 2) for s in per_image[variant]],
                 "ms_per_image_median": round(median * 1000, 2),
                 "achieved_gflops": round(gflop / median, 1),
                 "fraction_of_matmul_rate": round(gflop / median / matmul_rate, 3)}
        if variant != "torch":
            ratios = [t / s for t, s in zip(per_image["torch"], per_image[variant])]
            entry["speedup_vs_torch"] = round(statistics.median(ratios), 2)
            entry["fidelity_vs_torch"] = fidelity(features["torch"], features[variant])
        result["variants"][variant] = entry
    return result


def print_features(results: list[dict]) -> None:
    print("\n| teacher | px | images | variant | ms/img (median) | speed-up vs torch | GFLOP/s (of matmul's) | "
          "one-off s | max abs diff | mean cosine | linear CKA | CKA >= 0.99 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for res in results:
        for variant, entry in res["variants"].items():
            fid = entry.get("fidelity_vs_torch")
            cost = res["one_off_seconds"].get(variant, {})
            one_off = " + ".join(f"{k} {v:.0f}" for k, v in cost.items()) or "-"
            print(f"| {res['teacher']} | {res['input_size']} | {res['images']} | {variant} | "
                  f"{entry['ms_per_image_median']:.1f} | {entry.get('speedup_vs_torch', 1.0):.2f}x | "
                  f"{entry['achieved_gflops']:.0f} ({entry['fraction_of_matmul_rate']:.0%} of "
                  f"{res['dense_matmul_gflops']:.0f}) | "
                  f"{one_off} | "
                  + (f"{fid['max_abs_diff']:.1e} | {fid['mean_cosine']:.4f} | {fid['linear_cka']:.4f} | "
                     f"{'yes' if fid['cka_bar_met'] else 'no'} |" if fid else "- | - | - | - |"))


# ----------------------------------------------------------------------------- default build


def run_build(backend: str, work: Path, threads: int, extra: list[str] = (), log=print) -> dict:
    """One cold `medkd-build recipe=rd target=jetson-orin` with teacher.backend=backend."""
    cache, run_dir = work / f"build-{backend}-cache", work / f"build-{backend}-run"
    overrides = [*BUILD_COMMAND, f"teacher.backend={backend}", *extra, f"cache_dir={cache}", f"run_dir={run_dir}",
                 f"threads={threads}", "progress=false"]
    command = [sys.executable, "-m", "medkd.toolchain.cli", *overrides]
    log("build: " + shlex.join(["medkd-build", *overrides]))
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    process_seconds = time.perf_counter() - started
    if proc.returncode:
        return {"backend": backend, "error": (proc.stderr.strip().splitlines() or ["?"])[-1],
                "process_seconds": round(process_seconds, 1)}
    report = json.loads((run_dir / "report.json").read_text())
    graphs = sorted(p.name for p in (cache / "teacher-onnx").glob("*.onnx"))
    return {
        "backend": backend,
        "command": shlex.join(["medkd-build", *BUILD_COMMAND, f"teacher.backend={backend}", *extra]) + " (cold cache)",
        **report_summary(report),
        "process_seconds": round(process_seconds, 1),  # + interpreter start and imports
        "teacher_graphs": graphs,
        "used_onnxruntime": bool(graphs),
    }


def report_summary(report: dict) -> dict:
    """What a build's report.json says about its cost and result."""
    return {
        "stage_seconds": report["run"]["stage_seconds"],
        "wall_time_s": report["run"]["wall_time_s"],
        "test_accuracy": report["training"]["test_accuracy"],
        "teacher_test_accuracy": report["training"].get("teacher_test_accuracy"),
        # The precision each deployable shipped as (the int8 guard may refuse int8).
        "deployed": {name: model.get("deployed_precision")
                     for name, model in report.get("export", {}).get("models", {}).items()},
    }


def build_goals(builds: dict) -> list[dict]:
    torch_run, ort_run = builds.get("torch"), builds.get("onnxruntime")
    if not (torch_run and ort_run) or "error" in torch_run or "error" in ort_run:
        return []
    teacher = torch_run["stage_seconds"]["teacher_features"] / ort_run["stage_seconds"]["teacher_features"]
    drop = torch_run["test_accuracy"] - ort_run["test_accuracy"]
    return [
        {"goal": f"teacher stage >= {GOAL_TEACHER_SPEEDUP:.0f}x faster cold", "measured": f"{teacher:.2f}x",
         "met": teacher >= GOAL_TEACHER_SPEEDUP},
        {"goal": f"default build cold ~{GOAL_BUILD_SECONDS:.0f} s", "measured": f"{ort_run['wall_time_s']:.0f} s",
         "met": ort_run["wall_time_s"] <= GOAL_BUILD_SECONDS},
        {"goal": "same or better test accuracy", "measured": f"{-drop * 100:+.2f} points",
         "met": drop <= 0},
    ]


def print_builds(builds: dict, goals: list[dict]) -> None:
    stages = sorted({s for b in builds.values() for s in b.get("stage_seconds", {})},
                    key=lambda s: max(b.get("stage_seconds", {}).get(s, 0) for b in builds.values()), reverse=True)
    print("\n| backend | " + " | ".join(stages) + " | build wall s | test acc | ONNX used |")
    print("| --- |" + " --- |" * (len(stages) + 3))
    for backend, b in builds.items():
        if "error" in b:
            print(f"| {backend} | failed: {b['error']} |")
            continue
        print(f"| {backend} | " + " | ".join(f"{b['stage_seconds'].get(s, 0):.1f}" for s in stages)
              + f" | {b['wall_time_s']:.1f} | {b['test_accuracy']:.4f} | {'yes' if b['used_onnxruntime'] else 'no'} |")
    for goal in goals:
        print(f"goal: {goal['goal']}: {goal['measured']} ({'met' if goal['met'] else 'NOT met'})")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
            "cpu": cpu_info(), "load_average_start": load_average(),
            "versions": collect_versions(("torch", "onnx", "onnxruntime", "timm")),
            "command": shlex.join(["python", "bench/teacher.py", *(argv if argv is not None else sys.argv[1:])]),
            "note": args.note}
    # A part that is not run keeps its previous results (each part carries its own meta).
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="medkd-bench-teacher-") as tmp:
        work = Path(tmp)
        if not args.no_features:
            part = results["features"] = {"meta": meta, "settings": []}
            task = load_task(load_config(["data=mri"]).data)
            for name in args.settings:
                part["settings"].append(bench_setting(name, SETTINGS[name], task.train.images, args.rounds,
                                                      args.threads, work, args.int8_256, args.max_images))
                write(args.out, results)
            print_features(part["settings"])
        if args.build:
            part = results["build"] = {"meta": meta, "overrides": args.build_overrides, "runs": {}, "goals": []}
            for backend in args.backends:
                part["runs"][backend] = run_build(backend, work, args.threads, args.build_overrides)
                write(args.out, results)
            part["goals"] = [] if args.build_overrides else build_goals(part["runs"])  # goals: the default build
            print_builds(part["runs"], part["goals"])
    meta["load_average_end"] = load_average()
    write(args.out, results)
    return results


def write(path: Path, results: dict) -> None:
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
