"""Benchmark: fp32 / fp16 / int8 ONNX of the three students, against OpenVINO (+NNCF int8) on CPU.

For each student (resnet18, mobilenetv3, vit_tiny) on the embedded MRI task: train it
from scratch (recipe=scratch), fold + export fp32 ONNX, then fp16 and the two int8
layouts medkd ships (``int8-cpu``: ONNX Runtime, uint8 activations, the cpu target;
``int8-tensorrt``: explicit Q/DQ, the TensorRT targets), calibrated on 512 *training*
images (never test images). Every file gets its test accuracy (ONNX Runtime), its size
and its ONNX Runtime CPU latency (p50 at batch 1 and 32, all cores).

The int8 accuracy guard, as medkd-build runs it: the training side is split by medkd's own
rule (``export_stage.export_data``: 1000 labelled validation images, then 512 calibration
images, disjoint, seeded), and ``run_guard`` checks each int8 preset against fp32 on the
validation images with the config's thresholds (``export.max_accuracy_drop``,
``export.parity.int8_min_agreement``), keeping the most sensitive layers in high precision
until it holds or refusing int8. Both are reported: the bare preset (``int8-cpu``: what the
quantizer gives without the guard) and, when the guard kept layers, the guarded file as its
own variant (``int8-cpu+guard``), timed with the others. When the guard refuses, medkd
deploys the target's fallback (fp32 on cpu, fp16 on TensorRT targets). The goal
"accuracy drop <= 0.5 points with the guard" is measured on what medkd would deploy.

The peer a CPU user would pick instead: OpenVINO running the same fp32 ONNX, and
OpenVINO with NNCF's own int8 post-training quantization (``nncf.quantize`` on the
OpenVINO model, same 512 calibration images), on the same test images, thread count
and timing loop. Without openvino/nncf installed the medkd part still runs and the
results say why the peer is missing (install: ``pip install -e .[bench]``).

Timing: every variant's ``runs`` timed calls are split into ``--rounds`` chunks, and
the variants of one student take turns chunk by chunk, so a burst of load from another
process on this shared machine lands on all of them alike. Compare ratios measured
within one run; absolute milliseconds move with the machine's load.

    python bench/export.py                                      # full protocol
    python bench/export.py --students mobilenetv3 --epochs 1 --max-train 512 --calibration-images 128 \
        --runs 10                                               # quick look
    python bench/export.py --students vit_tiny --epochs 4 --merge  # redo one student, keep the others

Run time is mostly training; the guard adds, when the bare preset fails, one quantization
and validation run per unit (a block or a layer outside blocks: export/guard.py) plus one per
unit it keeps.
From the students.py step costs (idle 2-core box: ~3, ~4
and ~67 ms per image for resnet18, mobilenetv3, vit_tiny) 12 epochs x 2,800 images take
~2, ~2.5 and ~37 minutes: the full protocol cannot fit in 15 minutes because of vit_tiny
alone. Measured on the shared box (load ~4 on 2 cores): resnet18 15 min, mobilenetv3
30 min, vit_tiny ~6 min per epoch. Export, OpenVINO/NNCF and latency add 1-3 min per student.

Prints a table and the goals (met / not met, with the measured figure) and writes
bench/results/export.json. Reports what it measures, whichever way it comes out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from omegaconf import OmegaConf

from medkd.toolchain.atomic import atomic_write_text
from medkd.export.evaluate import accuracy, compare, onnx_logits
from medkd.export.fold_stage import fold_for_export
from medkd.export.guard import GuardThresholds, run_guard
from medkd.export.onnx_export import export_onnx
from medkd.export.plan import fallback_precision
from medkd.export.profile import available_cpus, profile_onnx_matrix
from medkd.export.quantize import quantize
from medkd.recipes import build_recipe
from medkd.toolchain.report import collect_versions
from medkd.toolchain.config import load_config
from medkd.toolchain.data import load_task
from medkd.toolchain.errors import UserError
from medkd.toolchain.export_stage import export_data, make_plan
from medkd.toolchain.models.students import build_student, count_parameters
from medkd.toolchain.train import TrainSettings, fit, predict

STUDENTS = ("resnet18", "mobilenetv3", "vit_tiny")
# Files medkd writes, in table order; the int8 ones are compared with "fp32".
MEDKD_VARIANTS = ("fp32", "fp16", "int8-cpu", "int8-tensorrt")
INT8_PRESETS = ("int8-cpu", "int8-tensorrt")
GUARDED = "+guard"  # suffix of the variant the guard changed (layers kept in high precision)
# The target whose int8 each preset is (medkd picks int8-cpu for runtime onnxruntime, else
# int8-tensorrt); its fallback precision is what medkd deploys when the guard refuses int8.
PRESET_TARGET = {"int8-cpu": "cpu", "int8-tensorrt": "jetson-orin"}
PEER_VARIANTS = ("openvino-fp32", "openvino-nncf-int8")
GUARD_NOT_MEASURED = "guard not measured (entry from an earlier run without the guard)"
BATCHES = (1, 32)
RESULTS = Path(__file__).parent / "results" / "export.json"

# The goals this benchmark reports against.
MAX_ACCURACY_DROP_POINTS = 0.5
MIN_INT8_SPEEDUP_B32 = 2.0
MIN_SIZE_REDUCTION = 3.5
VERSION_PACKAGES = ("torch", "timm", "onnx", "onnxruntime", "nvidia-modelopt",
                    "openvino", "nncf", "numpy")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=STUDENTS)
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's train.epochs (12)")
    parser.add_argument("--max-train", type=int, default=None, help="default: the mri config's cap (2800)")
    parser.add_argument("--max-test", type=int, default=None, help="default: the mri config's cap (700)")
    parser.add_argument("--calibration-images", type=int, default=512, help="training images, never test images")
    parser.add_argument("--validation-images", type=int, default=None,
                        help="labelled training images the int8 guard checks on, disjoint from the calibration "
                             "images (default: the config's export.validation_images, 1000)")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per (variant, batch size)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each round's timed ones")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed calls are split into this many interleaved rounds (see the module docstring)")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="skip OpenVINO / NNCF")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the ONNX / IR files here (default: a temporary folder, removed at the end)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: reprint the table of --output and recompute its goals")
    parser.add_argument("--merge", action="store_true",
                        help="keep the results already in --output for students this run does not measure "
                             "(each student's entry records the command, time and load it was measured with)")
    args = parser.parse_args(argv)
    if (args.runs < 1 or args.rounds < 1 or args.warmup < 0 or args.calibration_images < 1
            or (args.validation_images is not None and args.validation_images < 1)):
        parser.error("--runs, --rounds, --calibration-images and --validation-images must be >= 1 and --warmup >= 0")
    args.rounds = min(args.rounds, args.runs)
    return args


def bench_config(args, student: str):
    # export.precision=int8: the plan then splits validation + calibration images as medkd-build does.
    overrides = ["data=mri", "recipe=scratch", f"student={student}", "progress=false", "export.precision=int8",
                 f"export.calibration.images={args.calibration_images}"]
    if args.validation_images:
        overrides.append(f"export.validation_images={args.validation_images}")
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_train:
        overrides.append(f"data.max_train={args.max_train}")
    if args.max_test:
        overrides.append(f"data.max_test={args.max_test}")
    return load_config(overrides)


# ----------------------------------------------------------------------------- machine


def cpu_info() -> dict:
    """CPU model and the SIMD flags that decide int8 speed (VNNI / AMX), from /proc/cpuinfo."""
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    interesting = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "f16c", "fma")
    info.update({
        "model": fields.get("model name", info["model"]),
        "family": fields.get("cpu family"), "model_id": fields.get("model"),
        "flags": [f for f in interesting if f in fields.get("flags", "").split()],
        "logical_cpus_in_machine": text.count("processor\t:"),
    })
    return info


def versions() -> dict:
    return collect_versions(VERSION_PACKAGES)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------- medkd part


def export_images(cfg, task):
    """medkd-build's own split of the training side: labelled validation images for the guard,
    then calibration images, disjoint, by the seeded rule of export_stage.export_data."""
    plan = make_plan(cfg, task)
    return plan, export_data(task, plan, cfg.seed)


def guard_thresholds(cfg) -> GuardThresholds:
    """The thresholds medkd-build's exporter gives run_guard, from the same config keys."""
    return GuardThresholds(float(cfg.export.max_accuracy_drop), float(cfg.export.parity.int8_min_agreement))


def deploy_fallback(preset: str) -> str:
    """What medkd deploys when the guard refuses `preset` (the fallback of the preset's target)."""
    target = load_config([f"target={PRESET_TARGET[preset]}"]).target
    return fallback_precision(OmegaConf.to_container(target))


def train_student(cfg, task, threads: int, log=print):
    torch.manual_seed(cfg.seed)
    student = build_student(cfg.student, task.num_classes, task.in_chans, task.image_size)
    recipe = build_recipe(cfg.recipe, student, None)
    settings = TrainSettings(cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay,
                             cfg.seed, False)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        fit(recipe, task.train, None, settings, Path(run_dir), "bench-export", log=log)
    seconds = time.perf_counter() - started
    model = recipe.deployable().eval()
    test_accuracy = (predict(model, task.test.images).argmax(1) == task.test.labels).float().mean().item()
    return model, {
        "epochs": cfg.train.epochs, "train_images": len(task.train), "test_images": len(task.test),
        "parameters": count_parameters(model), "train_seconds": round(seconds, 1),
        "torch_test_accuracy": test_accuracy,
    }


def validation_check(fp32_onnx: Path, images: np.ndarray, labels: np.ndarray):
    """evaluate(path) -> Comparison against the fp32 ONNX on the validation images (the guard's check)."""
    reference = onnx_logits(fp32_onnx, images)
    return lambda path: compare(reference, onnx_logits(path, images), labels, accuracy)


def guarded_int8(preset: str, fp32_onnx: Path, bare_path: Path, guarded_path: Path, calibration: np.ndarray,
                 method: str, evaluate, thresholds: GuardThresholds, fallback: str, log=print) -> tuple[dict, dict]:
    """Quantize with `preset` under the accuracy guard, as medkd-build's exporter does.

    The guard's first candidate (nothing excluded) is the bare preset, written to
    `bare_path`; every later candidate goes to `guarded_path`, so that file ends as the
    model the guard kept when it held with layers in high precision (else it is removed).
    Returns ({variant: path}, {variant: info}) with the bare preset and, when the guard
    changed the model, preset+GUARDED. Raises only when the bare preset itself fails.
    """
    bare: dict = {}
    calls = {"quantize": 0, "evaluate": 0}

    def quantize_excluding(exclude):
        calls["quantize"] += 1
        started = time.perf_counter()
        result = quantize(preset, fp32_onnx, guarded_path if exclude else bare_path, calibration, method, exclude)
        if not exclude:
            bare.update(result=result, seconds=round(time.perf_counter() - started, 1))
        return result

    def evaluate_counted(path):
        calls["evaluate"] += 1
        comparison = evaluate(path)
        bare.setdefault("validation", comparison.as_dict())  # the first check is the bare preset's
        return comparison

    started = time.perf_counter()
    try:
        guard = run_guard(quantize_excluding, evaluate_counted, thresholds, log=lambda line: log(f"  {preset}: {line}"))
    except Exception as exc:  # noqa: BLE001 - a failed guard search must not lose the bare preset
        if "result" not in bare:
            raise
        guarded_path.unlink(missing_ok=True)
        error = f"{type(exc).__name__}: {exc}"
        log(f"  {preset}: guard FAILED {error}")
        return {preset: bare_path}, {preset: {**_quantize_info(bare), "guard": {"error": error}}}
    seconds = round(time.perf_counter() - started, 1)
    files, info = {preset: bare_path}, {preset: _quantize_info(bare)}
    kept = list(guard.kept_high_precision)
    if not guard.held:
        deploys = fallback
        guarded_path.unlink(missing_ok=True)
    elif kept:
        deploys = preset + GUARDED
        files[deploys] = guarded_path
        info[deploys] = {**guard.result.as_dict(), "guard_of": preset, "kept_high_precision": kept}
        info[deploys].pop("path", None)
    else:
        deploys = preset
    info[preset]["guard"] = {
        **guard.as_dict(), "deploys": deploys, "validation_bare": bare["validation"],
        "thresholds": {"max_accuracy_drop_points": thresholds.max_drop_points,
                       "min_agreement": thresholds.min_agreement},
        "validation_images": guard.comparison.num_samples, "seconds": seconds,
        "quantizations": calls["quantize"], "evaluations": calls["evaluate"]}
    outcome = ("refused" if not guard.held else f"held with {len(kept)} layer(s) kept in high precision" if kept
               else "held as is")
    log(f"  {preset}: guard {outcome}; medkd deploys {deploys} ({calls['quantize']} quantizations, {seconds:.0f} s)")
    return files, info


def _quantize_info(bare: dict) -> dict:
    info = {**bare["result"].as_dict(), "seconds": bare["seconds"]}
    info.pop("path", None)
    return info


def export_variants(model, data, out_dir: Path, name: str, cfg, log=print) -> tuple[dict[str, Path], dict]:
    """fp32 (folded), fp16 and both int8 layouts under the guard; a preset that fails is recorded, not fatal."""
    files, info = {}, {}
    sample = torch.from_numpy(data.validation_images[:64])
    folded, fold_info = fold_for_export(model, sample, cfg.export.parity.fp32_max_abs_diff)
    files["fp32"] = export_onnx(folded, sample[:8], out_dir / f"{name}.onnx", opset=cfg.export.opset)
    info["fp32"] = {"fold": fold_info}
    started = time.perf_counter()
    try:
        path = out_dir / f"{name}.fp16.onnx"
        result = quantize("fp16", files["fp32"], path)
        files["fp16"] = path
        info["fp16"] = {**result.as_dict(), "seconds": round(time.perf_counter() - started, 1)}
        info["fp16"].pop("path", None)
    except Exception as exc:  # noqa: BLE001 - report every failure, keep benchmarking the rest
        info["fp16"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"  {name} fp16: FAILED {info['fp16']['error']}")
    evaluate = validation_check(files["fp32"], data.validation_images, data.validation_labels)
    thresholds = guard_thresholds(cfg)
    for preset, suffix in (("int8-cpu", "int8-cpu"), ("int8-tensorrt", "int8-trt")):
        try:
            got_files, got_info = guarded_int8(
                preset, files["fp32"], out_dir / f"{name}.{suffix}.onnx", out_dir / f"{name}.{suffix}.guard.onnx",
                data.calibration, cfg.export.calibration.method, evaluate, thresholds, deploy_fallback(preset), log=log)
        except Exception as exc:  # noqa: BLE001
            info[preset] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"  {name} {preset}: FAILED {info[preset]['error']}")
            continue
        files.update(got_files)
        info.update(got_info)
    return files, info


def medkd_variants(present) -> list[str]:
    """medkd's variants in table order: each int8 preset followed by its guarded file, if any."""
    order = []
    for name in MEDKD_VARIANTS:
        order.append(name)
        if name in INT8_PRESETS:
            order.append(name + GUARDED)
    return [v for v in order if v in present or v in MEDKD_VARIANTS]


def variant_order(variants) -> list[str]:
    known = medkd_variants(variants) + list(PEER_VARIANTS)
    return [v for v in known if v in variants] + [v for v in variants if v not in known]


def onnx_size(path: Path) -> int:
    return path.stat().st_size


# ----------------------------------------------------------------------------- OpenVINO peer


def peer_unavailable() -> str | None:
    """None when openvino and nncf import, else why not (the bench still runs the medkd part)."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return None


def openvino_config(threads: int) -> dict:
    """Compile options that make OpenVINO comparable with the ONNX Runtime sessions.

    INFERENCE_NUM_THREADS = the same thread count ONNX Runtime gets (all cores).
    PERFORMANCE_HINT = LATENCY: one stream, every thread on one inference request — what
    ONNX Runtime's sequential session does; the THROUGHPUT hint would split the cores
    into several streams meant for parallel requests, which a one-request-at-a-time
    timing loop never uses. INFERENCE_PRECISION_HINT = f32: OpenVINO may otherwise run an
    fp32 model in bf16 on CPUs that have it, which would no longer be the fp32 baseline
    (NNCF's int8 model keeps its non-quantized layers in f32 too, as ORT's does).
    """
    return {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


def openvino_compiled(model, threads: int):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(model, "CPU", openvino_config(threads))
    actual = {}
    for key in ("INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "INFERENCE_PRECISION_HINT", "NUM_STREAMS"):
        try:
            actual[key] = str(compiled.get_property(key))
        except Exception:  # noqa: BLE001 - a property this version does not report
            actual[key] = None
    return compiled, actual


def openvino_logits(compiled, images: np.ndarray, batch: int = 64) -> np.ndarray:
    request = compiled.create_infer_request()
    out = [np.array(request.infer({0: images[i : i + batch]})[0]) for i in range(0, len(images), batch)]
    return np.concatenate(out).astype(np.float32)


def nncf_int8(fp32_onnx: Path, calibration: np.ndarray, transformer: bool, out_xml: Path):
    """NNCF post-training int8 of the OpenVINO model read from the fp32 ONNX; saved as IR."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_onnx))
    # One image per item, so subset_size counts images: all `calibration` images are used.
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration), target_device=nncf.TargetDevice.CPU,
                              **kwargs)
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return quantized, {"nncf_options": {"subset_size": len(calibration), "target_device": "CPU",
                                        "model_type": "TRANSFORMER" if transformer else None,
                                        "preset": "nncf default"}}


def ir_size(xml: Path) -> int:
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


# ----------------------------------------------------------------------------- latency


class OrtTimer:
    """ONNX Runtime CPU timing through medkd's own profiler (a fresh session each round)."""

    def __init__(self, path: Path, shape_chw, threads: int):
        self.path, self.shape_chw, self.threads = path, tuple(shape_chw), threads

    def times(self, batch: int, warmup: int, runs: int) -> np.ndarray:
        import onnxruntime as ort

        # medkd's quantizers put ORT's default log level back to warnings; the fp16-bearing
        # int8-tensorrt graph would then log one constant-folding warning per node per session.
        ort.set_default_logger_severity(3)
        rows = profile_onnx_matrix(self.path, self.shape_chw, batch_sizes=(batch,), threads=(self.threads,),
                                   warmup=warmup, runs=runs, progress=False, keep_times=True)
        return np.asarray(rows[0]["times_ms"])


class OpenVinoTimer:
    """The same loop for OpenVINO: one fixed random input, perf_counter around each infer call."""

    def __init__(self, compiled, shape_chw):
        self.request = compiled.create_infer_request()
        self.shape_chw = tuple(shape_chw)

    def times(self, batch: int, warmup: int, runs: int) -> np.ndarray:
        # Same input as medkd.export.profile: standard normal, seed 0, float32.
        x = np.random.default_rng(0).standard_normal((batch, *self.shape_chw)).astype(np.float32)
        for _ in range(warmup):
            self.request.infer({0: x})
        out = np.empty(runs)
        for i in range(runs):
            t0 = time.perf_counter()
            self.request.infer({0: x})
            out[i] = (time.perf_counter() - t0) * 1e3
        return out


def interleaved_latency(timers: dict, batches, runs: int, warmup: int, rounds: int, log=print) -> dict:
    """{variant: {batch: stats}}; each round gives every variant runs/rounds timed calls in turn."""
    chunks = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    collected = {name: {b: [] for b in batches} for name in timers}
    failed = {}
    for chunk in chunks:
        for batch in batches:
            for name, timer in timers.items():
                if name in failed:
                    continue
                try:
                    collected[name][batch].append(timer.times(batch, warmup, chunk))
                except Exception as exc:  # noqa: BLE001
                    failed[name] = f"{type(exc).__name__}: {exc}"
                    log(f"  latency {name}: FAILED {failed[name]}")
    out = {}
    for name in timers:
        if name in failed:
            out[name] = {"error": failed[name]}
            continue
        out[name] = {}
        for batch in batches:
            times = np.concatenate(collected[name][batch])
            p50, p90 = np.percentile(times, [50, 90])
            out[name][batch] = {
                "p50_ms": float(p50), "p90_ms": float(p90), "mean_ms": float(times.mean()),
                "min_ms": float(times.min()), "max_ms": float(times.max()), "runs": int(len(times)),
                "round_p50_ms": [float(np.median(t)) for t in collected[name][batch]],
                "images_per_s_at_p50": batch / (float(p50) / 1e3),
            }
    return out


# ----------------------------------------------------------------------------- ratios / goals


def int8_ratios(fp32: dict, int8: dict) -> dict:
    """speedup = fp32 p50 / int8 p50 (>1 = int8 faster); size = int8 bytes / fp32 bytes."""
    out = {}
    for batch in BATCHES:
        a, b = fp32.get("latency", {}).get(batch), int8.get("latency", {}).get(batch)
        out[f"speedup_b{batch}"] = a["p50_ms"] / b["p50_ms"] if a and b and "p50_ms" in a and "p50_ms" in b else None
    out["size_ratio"] = int8["size_bytes"] / fp32["size_bytes"] if "size_bytes" in int8 and "size_bytes" in fp32 else None
    out["accuracy_drop_points"] = (100.0 * (fp32["test_accuracy"] - int8["test_accuracy"])
                                   if "test_accuracy" in int8 and "test_accuracy" in fp32 else None)
    return out


def deployed(variants: dict, preset: str) -> tuple[str | None, str]:
    """The variant medkd-build would deploy on `preset`'s targets, and why, from the guard's record.

    (None, why not) when that is not known: the preset failed, its entry predates the
    guard (merged from an earlier run), or the guard search itself failed.
    """
    info = variants.get(preset, {})
    if "test_accuracy" not in info:
        return None, f"{preset} not measured ({info.get('error', 'missing')})"
    guard = info.get("guard")
    if guard is None:
        return None, GUARD_NOT_MEASURED
    if "error" in guard:
        return None, f"guard failed: {guard['error']}"
    deploys = guard["deploys"]
    if not guard["held"]:
        return deploys, f"int8 refused by the guard; medkd deploys {deploys}"
    if deploys != preset:
        return deploys, f"guard kept {len(guard['kept_high_precision'])} layer(s) in high precision: {deploys}"
    return deploys, f"guard held as is: {preset}"


def deployed_drop(variants: dict, name: str) -> float | None:
    """Test accuracy drop (points) of a deployed variant against fp32; fp32 itself drops 0."""
    if name == "fp32":
        return 0.0 if "test_accuracy" in variants.get("fp32", {}) else None
    return variants.get(name, {}).get("vs_fp32", {}).get("accuracy_drop_points")


def goals_for(student: str, variants: dict, peer_missing: str | None, chance: float | None = None) -> list[dict]:
    """Each goal: what, measured figure, met (True / False / None when it could not be measured).

    The accuracy goal is judged on what medkd would deploy (the guard's outcome); the bare
    presets' drops are reported beside it ("without the guard"). `chance`: the test
    accuracy of always answering the most frequent class; an fp32 model no better than
    that (an untrained student) makes "no accuracy drop" meaningless, so the accuracy goals
    are then reported as not measured.
    """
    goals = []

    def add(goal, measured, met, figure):
        goals.append({"student": student, "goal": goal, "measured": measured, "met": met, "figure": figure})

    fp32_acc = variants.get("fp32", {}).get("test_accuracy")
    at_chance = chance is not None and fp32_acc is not None and fp32_acc <= chance + 0.02

    def accuracy_goal(goal, drop, figure):
        if at_chance:
            add(goal, drop, None, f"fp32 test accuracy {fp32_acc:.4f} is chance level ({chance:.4f}): no accuracy "
                                  "claim" + ("" if drop is None else f" (drop {drop:+.2f} points)"))
        elif drop is None:
            add(goal, None, None, figure or "n/a")
        else:
            add(goal, drop, drop <= MAX_ACCURACY_DROP_POINTS, f"{drop:+.2f} points" + (f" ({figure})" if figure else ""))

    for preset in INT8_PRESETS:
        name, why = deployed(variants, preset)
        accuracy_goal(f"{preset} with the guard: accuracy drop <= {MAX_ACCURACY_DROP_POINTS} points",
                      None if name is None else deployed_drop(variants, name), why)
    for preset in INT8_PRESETS:
        accuracy_goal(f"{preset} without the guard: accuracy drop <= {MAX_ACCURACY_DROP_POINTS} points",
                      variants.get(preset, {}).get("vs_fp32", {}).get("accuracy_drop_points"), None)
    cpu_int8 = [v for v in ("int8-cpu", "int8-cpu" + GUARDED) if v == "int8-cpu" or v in variants]
    for variant in cpu_int8:
        speed = variants.get(variant, {}).get("vs_fp32", {}).get("speedup_b32")
        add(f"{variant} >= {MIN_INT8_SPEEDUP_B32:g}x faster than fp32 at batch 32", speed,
            None if speed is None else speed >= MIN_INT8_SPEEDUP_B32, "n/a" if speed is None else f"{speed:.2f}x")
    peer = variants.get("openvino-nncf-int8", {}).get("latency", {}).get(32, {}).get("p50_ms")
    for variant in cpu_int8:
        ours = variants.get(variant, {}).get("latency", {}).get(32, {}).get("p50_ms")
        ratio = peer / ours if ours and peer else None
        figure = (f"OpenVINO+NNCF p50 / {variant} p50 = {ratio:.2f}x" if ratio is not None
                  else f"n/a ({peer_missing or 'a latency is missing'})")
        add(f"{variant} at least as fast as OpenVINO+NNCF int8 at batch 32", ratio,
            None if ratio is None else ratio >= 1.0, figure)
    for variant in [v for p in INT8_PRESETS for v in (p, p + GUARDED) if v == p or v in variants]:
        size = variants.get(variant, {}).get("vs_fp32", {}).get("size_ratio")
        add(f"{variant} file <= 1/{MIN_SIZE_REDUCTION:g} of fp32", size,
            None if size is None else size <= 1 / MIN_SIZE_REDUCTION,
            "n/a" if size is None else f"1/{1 / size:.2f} of fp32" if size else "0")
    return goals


# ----------------------------------------------------------------------------- report


def _ms(variant: dict, batch: int) -> str:
    stats = variant.get("latency", {}).get(batch)
    return f"{stats['p50_ms']:.2f}" if stats and "p50_ms" in stats else "-"


def _ratio(value, fmt="{:.2f}x") -> str:
    return "-" if value is None else fmt.format(value)


def print_table(results: list[dict], threads: int) -> None:
    print(f"\nONNX Runtime CPU / OpenVINO CPU, {threads} threads (all cores), p50 of timed calls in ms; "
          "speed = fp32 p50 / variant p50, size = variant / fp32")
    header = (f"{'student':<12}{'variant':<22}{'test acc':>9}{'size MB':>9}{'b1 ms':>9}{'b32 ms':>9}"
              f"{'speed b1':>10}{'speed b32':>10}{'size':>8}{'acc drop':>10}")
    print(header)
    print("-" * len(header))
    for student in results:
        variants = student["variants"]
        fp32 = variants.get("fp32", {})
        for name in variant_order(variants):
            v = variants.get(name)
            if v is None:
                continue
            if "error" in v and "test_accuracy" not in v:
                size = f"{v['size_bytes'] / 1e6:.2f}" if "size_bytes" in v else "-"
                print(f"{student['student']:<12}{name:<22}{'-':>9}{size:>9}  FAILED: {v['error'].splitlines()[0][:160]}")
                continue
            r = int8_ratios(fp32, v) if name != "fp32" else {}
            acc = f"{v['test_accuracy']:.4f}" if "test_accuracy" in v else "-"
            size = f"{v['size_bytes'] / 1e6:.2f}" if "size_bytes" in v else "-"
            drop = r.get("accuracy_drop_points")
            print(f"{student['student']:<12}{name:<22}{acc:>9}{size:>9}{_ms(v, 1):>9}{_ms(v, 32):>9}"
                  f"{_ratio(r.get('speedup_b1')):>10}{_ratio(r.get('speedup_b32')):>10}"
                  f"{_ratio(r.get('size_ratio'), '{:.3f}'):>8}{_ratio(drop, '{:+.2f}pt'):>10}")
        if student.get("peer_missing"):
            print(f"{student['student']:<12}{'openvino peer':<22}  missing: {student['peer_missing']}")
    print("\nTrained (recipe=scratch):  " + ";  ".join(
        f"{s['student']} {s['training']['epochs']} epochs x {s['training']['train_images']} images, "
        f"{s['training']['train_seconds']:.0f} s" for s in results))
    for student in results:
        peer = student["variants"].get("openvino-nncf-int8", {}).get("vs_openvino_fp32")
        if peer:
            print(f"{student['student']}: OpenVINO+NNCF int8 vs OpenVINO fp32: speed b1 {_ratio(peer['speedup_b1'])}, "
                  f"b32 {_ratio(peer['speedup_b32'])}, size {_ratio(peer['size_ratio'], '{:.3f}')}, "
                  f"accuracy drop {_ratio(peer['accuracy_drop_points'], '{:+.2f}')} points")


def guard_lines(results: list[dict]) -> list[str]:
    """One line per student and int8 preset: what the accuracy guard did."""
    lines = []
    for student in results:
        variants = student["variants"]
        for preset in INT8_PRESETS:
            info = variants.get(preset, {})
            guard = info.get("guard")
            head = f"  {student['student']:<12}{preset:<15}"
            if "test_accuracy" not in info:
                lines.append(head + f"not measured ({info.get('error', 'missing')})")
            elif guard is None:
                lines.append(head + GUARD_NOT_MEASURED)
            elif "error" in guard:
                lines.append(head + f"guard FAILED: {guard['error'].splitlines()[0][:160]}")
            else:
                bare, last = guard["validation_bare"], guard["comparison"]
                kept = guard["kept_high_precision"]
                outcome = ("REFUSED" if not guard["held"] else f"held, {len(kept)} layer(s) kept" if kept
                           else "held as is")
                lines.append(
                    head + f"{outcome}; validation drop {bare['metric_drop_points']:+.2f} -> "
                    f"{last['metric_drop_points']:+.2f} points, agreement {bare['top1_agreement']:.2%} -> "
                    f"{last['top1_agreement']:.2%}; {guard['quantizations']} quantizations in {guard['seconds']:.0f} s; "
                    f"medkd deploys {guard['deploys']}" + (f"; kept: {', '.join(kept)}" if kept else ""))
    return lines


def print_guard(results: list[dict]) -> None:
    thresholds = next((v["guard"]["thresholds"] for r in results for v in r["variants"].values()
                       if "thresholds" in v.get("guard", {})), None)
    rule = (f"max drop {thresholds['max_accuracy_drop_points']:g} points, min top-1 agreement "
            f"{thresholds['min_agreement']:.0%} with fp32" if thresholds else "no guard data")
    print(f"\nAccuracy guard on the validation images ({rule}); bare preset -> what the guard kept:")
    for line in guard_lines(results):
        print(line)


def print_goals(goals: list[dict]) -> None:
    print("\nGoals (met / not met, measured):")
    for g in goals:
        verdict = "not measured" if g["met"] is None else "met" if g["met"] else "NOT MET"
        print(f"  {g['student']:<12}{g['goal']:<68}{verdict:<13}{g['figure']}")


def write_results(args, meta: dict, results: list[dict], goals: list[dict], complete: bool) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def jsonable(obj):
        if isinstance(obj, dict):
            return {str(k): jsonable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [jsonable(v) for v in obj]
        if isinstance(obj, (np.floating, np.integer)):
            return obj.item()
        if isinstance(obj, Path):
            return str(obj)
        return obj

    atomic_write_text(args.output, json.dumps(jsonable({
        "benchmark": "export",
        "complete": complete,
        "students": [r["student"] for r in results],
        **meta,
        "results": results,
        "goals": goals,
    }), indent=2))


# ----------------------------------------------------------------------------- main


def ordered(results: list[dict]) -> list[dict]:
    return sorted(results, key=lambda r: STUDENTS.index(r["student"]))


def all_goals(results: list[dict]) -> list[dict]:
    # Entries written before chance_accuracy was recorded: the mri task's 7 balanced test classes.
    return [g for r in results
            for g in goals_for(r["student"], r["variants"], r.get("peer_missing"), r.get("chance_accuracy", 1 / 7))]


def previous_results(path: Path, replacing) -> list[dict]:
    """Student entries of an earlier results file that this run does not replace (for --merge)."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    kept = []
    for result in earlier.get("results", []):
        if result["student"] in replacing:
            continue
        for variant in result["variants"].values():  # JSON turned the batch-size keys into strings
            if "latency" in variant:
                variant["latency"] = {int(b): stats for b, stats in variant["latency"].items()}
        # Entries written before per-student provenance existed: the file's own command.
        result.setdefault("provenance", {"command": earlier.get("command"),
                                         "file_complete": earlier.get("complete"),
                                         "load_average_start": earlier.get("load_average_start")})
        kept.append(result)
    return kept


def log_line(line: str) -> None:
    print(line, flush=True)


def run_student(args, name: str, task, threads: int, work: Path, peer_missing: str | None,
                log=log_line) -> dict:
    cfg = bench_config(args, name)
    log(f"\n== {name}: training from scratch, {cfg.train.epochs} epochs on {len(task.train)} images")
    plan, data = export_images(cfg, task)  # before training: a bad split size fails in seconds
    model, training = train_student(cfg, task, threads, log=lambda line: log(f"  {line}"))
    calibration = np.ascontiguousarray(data.calibration)
    test_images = np.ascontiguousarray(data.test_images)
    test_labels = data.test_labels
    shape_chw = test_images.shape[1:]

    phase = time.perf_counter()
    log(f"  trained in {training['train_seconds']:.0f} s, torch test accuracy {training['torch_test_accuracy']:.4f}")
    log(f"  exporting: fp32 ONNX, fp16, int8-cpu, int8-tensorrt ({len(calibration)} calibration images), "
        f"each int8 under the accuracy guard ({len(data.validation_labels)} validation images)")
    summary = {"student": name, "training": training, "calibration_images": len(calibration),
               "validation_images": len(data.validation_labels),
               "split": ("medkd.toolchain.export_stage.export_data (seed "
                         f"{cfg.seed}): validation = first {plan.validation_images} labelled images of a seeded "
                         f"permutation of the training side, calibration = the next {plan.calibration_images}"),
               "test_images": len(test_images), "input_shape_chw": list(shape_chw),
               "chance_accuracy": float(np.bincount(test_labels).max() / len(test_labels))}
    try:
        files, export_info = export_variants(model, data, work, name, cfg, log=log)
    except Exception as exc:  # noqa: BLE001 - no fp32 ONNX, nothing to compare: report and go on
        error = f"fp32 fold/export failed: {type(exc).__name__}: {exc}"
        log(f"  {name}: {error}")
        return {**summary, "peer_missing": peer_missing, "variants": {"fp32": {"error": error}}}
    variants: dict[str, dict] = {}
    for variant in medkd_variants(export_info):
        if variant not in files:
            variants[variant] = dict(export_info.get(variant, {"error": "not produced"}))
            continue
        variants[variant] = {"runtime": "onnxruntime", "file": files[variant].name,
                             "size_bytes": onnx_size(files[variant]), **export_info.get(variant, {})}
        try:
            variants[variant]["test_accuracy"] = accuracy(onnx_logits(files[variant], test_images), test_labels)
        except Exception as exc:  # noqa: BLE001 - e.g. a written file ONNX Runtime refuses to load
            variants[variant]["error"] = f"ONNX Runtime could not run it: {type(exc).__name__}: {exc}"
            log(f"  {name} {variant}: FAILED {variants[variant]['error']}")
    log(f"  exported, guarded and evaluated in {time.perf_counter() - phase:.0f} s")

    timers = {v: OrtTimer(files[v], shape_chw, threads) for v in variants
              if v in files and "test_accuracy" in variants[v]}
    peer_error = peer_missing
    if peer_missing is None:
        try:
            import openvino as ov

            log("  OpenVINO: fp32 ONNX as is; NNCF int8 PTQ on the same calibration images")
            phase = time.perf_counter()
            compiled, props = openvino_compiled(ov.Core().read_model(str(files["fp32"])), threads)
            variants["openvino-fp32"] = {
                "runtime": f"openvino {ov.__version__}", "file": files["fp32"].name,
                "size_bytes": onnx_size(files["fp32"]), "compiled_properties": props,
                "test_accuracy": accuracy(openvino_logits(compiled, test_images), test_labels)}
            timers["openvino-fp32"] = OpenVinoTimer(compiled, shape_chw)
            started = time.perf_counter()
            xml = work / f"{name}.nncf-int8.xml"
            quantized, nncf_info = nncf_int8(files["fp32"], calibration, name == "vit_tiny", xml)
            seconds = round(time.perf_counter() - started, 1)
            compiled_q, props_q = openvino_compiled(quantized, threads)
            variants["openvino-nncf-int8"] = {
                "runtime": f"openvino {ov.__version__}", "file": f"{xml.name} + .bin", "size_bytes": ir_size(xml),
                "compiled_properties": props_q, "seconds": seconds, **nncf_info,
                "test_accuracy": accuracy(openvino_logits(compiled_q, test_images), test_labels)}
            timers["openvino-nncf-int8"] = OpenVinoTimer(compiled_q, shape_chw)
            log(f"  OpenVINO peer ready in {time.perf_counter() - phase:.0f} s")
        except Exception as exc:  # noqa: BLE001 - the peer failing must not lose the medkd numbers
            peer_error = f"{type(exc).__name__}: {exc}"
            log(f"  OpenVINO peer FAILED: {peer_error}")
            for v in PEER_VARIANTS:
                variants.setdefault(v, {"error": peer_error})

    log(f"  latency: {args.runs} timed calls per variant and batch in {args.rounds} interleaved rounds, "
        f"{args.warmup} warmup calls per round, {threads} threads")
    phase = time.perf_counter()
    latency = interleaved_latency(timers, BATCHES, args.runs, args.warmup, args.rounds, log=log)
    log(f"  latency measured in {time.perf_counter() - phase:.0f} s")
    for variant, stats in latency.items():
        if "error" in stats:
            variants[variant]["latency_error"] = stats["error"]
        else:
            variants[variant]["latency"] = stats
    for variant in [v for v in variants if v != "fp32"]:
        if variant in variants and "test_accuracy" in variants[variant] and "test_accuracy" in variants["fp32"]:
            variants[variant]["vs_fp32"] = int8_ratios(variants["fp32"], variants[variant])
    if "test_accuracy" in variants.get("openvino-nncf-int8", {}) and "test_accuracy" in variants["openvino-fp32"]:
        # The peer's own int8/fp32 ratios (OpenVINO int8 against OpenVINO fp32).
        variants["openvino-nncf-int8"]["vs_openvino_fp32"] = int8_ratios(variants["openvino-fp32"],
                                                                         variants["openvino-nncf-int8"])
    return {**summary, "peer_missing": peer_error, "variants": {v: variants[v] for v in variant_order(variants)}}


def main(argv=None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw_argv)
    started = time.perf_counter()
    threads = available_cpus()
    if args.report:
        earlier = json.loads(args.output.read_text())
        results = ordered(previous_results(args.output, []))
        earlier["goals"] = all_goals(results)
        print_table(results, earlier.get("threads", threads))
        print_guard(results)
        print_goals(earlier["goals"])
        atomic_write_text(args.output, json.dumps(earlier, indent=2))
        print(f"\nrecomputed the goals in {args.output}")
        return 0
    peer_missing = None if args.peer else "skipped (--no-peer)"
    if args.peer:
        peer_missing = peer_unavailable()
        if peer_missing:
            peer_missing = f"openvino/nncf not importable ({peer_missing}); install with pip install -e .[bench]"
            print(f"OpenVINO peer missing: {peer_missing}")

    try:
        cfg = bench_config(args, args.students[0])
        task = load_task(cfg.data)
        export_images(cfg, task)  # the validation / calibration sizes fit the training side
    except UserError as exc:  # ConfigError included: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *([sys.argv[0]] if argv is None else
                                                                        ["bench/export.py"]), *raw_argv]),
        "cwd": os.getcwd(),
        "versions": versions(),
        "cpu": cpu_info(),
        "threads": threads,
        "threads_note": ("ONNX Runtime intra_op_num_threads and OpenVINO INFERENCE_NUM_THREADS = all CPUs this "
                         "process may run on (os.sched_getaffinity); torch training uses the same count"),
        "timing": {"runs": args.runs, "warmup_per_round": args.warmup, "rounds": args.rounds,
                   "batch_sizes": list(BATCHES),
                   "method": "time.perf_counter around each session.run / infer call on one fixed random input; "
                             "variants of a student interleaved round by round; p50 over all timed calls"},
        "openvino_config": openvino_config(threads) if peer_missing is None else None,
        "data": {"name": "mri", "train_images": len(task.train), "test_images": len(task.test),
                 "calibration_images": args.calibration_images,
                 "validation_images": args.validation_images or cfg.export.validation_images,
                 "calibration_source": ("medkd-build's split (export_stage.export_data): labelled validation "
                                        "images for the int8 guard, then calibration images, disjoint, from a "
                                        "seeded permutation of the training side (never test images); entries "
                                        "merged from earlier runs record their own split or lack one"),
                 "guard": {"max_accuracy_drop_points": cfg.export.max_accuracy_drop,
                           "int8_min_agreement": cfg.export.parity.int8_min_agreement,
                           "calibration_method": cfg.export.calibration.method,
                           "fallback": {p: deploy_fallback(p) for p in INT8_PRESETS}}},
        "load_average_start": load_average(),
    }
    kept = previous_results(args.output, args.students) if args.merge else []
    if kept:
        print(f"--merge: keeping {', '.join(r['student'] for r in kept)} from {args.output}")
    results, goals = [], []
    work_ctx = tempfile.TemporaryDirectory(prefix="medkd-bench-export-") if args.work_dir is None else None
    work = Path(work_ctx.name) if work_ctx else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.students:
            student_started = time.perf_counter()
            result = run_student(args, name, task, threads, work, peer_missing)
            result["provenance"] = {"command": meta["command"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "seconds": round(time.perf_counter() - student_started, 1),
                                    "load_average_end": load_average()}
            results.append(result)
            meta["elapsed_seconds"] = round(time.perf_counter() - started, 1)
            merged = ordered(kept + results)
            write_results(args, meta, merged, all_goals(merged), complete=False)  # partial results survive a kill
    finally:
        if work_ctx:
            work_ctx.cleanup()
    merged = ordered(kept + results)
    goals = all_goals(merged)
    print_table(merged, threads)
    print_guard(merged)
    print_goals(goals)
    meta["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    meta["load_average_end"] = load_average()
    if kept:
        meta["merged_from_earlier_runs"] = {r["student"]: r["provenance"] for r in kept}
    write_results(args, meta, merged, goals, complete=True)
    print(f"\n{meta['elapsed_seconds']:.0f} s in all; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
