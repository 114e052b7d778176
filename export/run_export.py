"""Export every deployable of a run, profile it, plot it, and publish the files atomically.

Files are produced in a staging folder inside the run directory. Only when every model
exported, passed its checks and was profiled do they replace the previous export's files;
on any failure the staging folder is removed and the run directory is unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from medkd.toolchain.atomic import atomic_write_text
from medkd.toolchain.progress import as_policy

from .exporter import Deployable, ExportData, ModelExporter, output_name
from .formats import FORMATS
from .plan import ExportPlan
from .profile import profile_onnx_matrix

STAGING = ".export.staging"
PLOTS = "plots"
# Which deployable (task) is in which files: {name: {deployed_file, deployed_precision, files, test_metric}}.
DEPLOYABLES = "deployables.json"


def previous_artifacts(run_dir: Path, model: str) -> list[Path]:
    """Every file or folder an export of `model` may have left in `run_dir`."""
    names = {output_name(model, fmt) for fmt in FORMATS} | {f"{model}.manifest.json", PLOTS}
    return [run_dir / name for name in sorted(names)]


def recorded_models(run_dir: Path) -> list[str]:
    """The deployables the run directory's last export wrote ("model" for single-model runs)."""
    try:
        names = list(json.loads((Path(run_dir) / DEPLOYABLES).read_text()))
    except (OSError, ValueError, TypeError):
        return ["model"]
    return sorted({"model", *(str(n) for n in names)})


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def publish(staging: Path, run_dir: Path, models: list[str]) -> None:
    for model in sorted(set(models) | set(recorded_models(run_dir))):
        for stale in previous_artifacts(run_dir, model):
            _remove(stale)
    for entry in staging.iterdir():
        os.replace(entry, run_dir / entry.name)
    staging.rmdir()


def profile_latency(onnx_files: dict[str, Path], input_shape, export_cfg: dict, progress) -> tuple[dict, dict]:
    """ONNX Runtime CPU latency matrix per precision, plus batch-1 raw times for the plot."""
    threads = [t or None for t in export_cfg["latency_threads"]]  # 0 = all CPUs
    rows, batch1_times = {}, {}
    timed_runs = len(onnx_files) * len(export_cfg["latency_batches"]) * len(threads) * export_cfg["latency_runs"]
    with as_policy(progress).bar(total=timed_runs, desc="latency", unit="run") as bar:  # one bar, every precision
        for precision, path in onnx_files.items():
            rows[precision], batch1_times[precision] = _profile_one(path, input_shape, export_cfg, threads, bar)
    return rows, batch1_times


def _profile_one(path: Path, input_shape, export_cfg: dict, threads, bar) -> tuple[list[dict], list]:
    matrix = profile_onnx_matrix(path, input_shape, batch_sizes=export_cfg["latency_batches"], threads=threads,
                                 warmup=export_cfg["latency_warmup"], runs=export_cfg["latency_runs"],
                                 keep_times=True, bar=bar)
    batch1 = [r for r in matrix if r["batch_size"] == min(export_cfg["latency_batches"])]
    batch1_times = max(batch1, key=lambda r: r["threads"])["times_ms"]
    return [{k: v for k, v in r.items() if k != "times_ms"} for r in matrix], batch1_times


def plot_model(staging: Path, model: str, summary: dict, latency: dict, batch1_times: dict, size_of) -> list[str]:
    from .plots import plot_accuracy_size_latency, plot_latency_distribution

    plots_dir = staging / PLOTS
    plots_dir.mkdir(exist_ok=True)
    distribution = plot_latency_distribution(batch1_times, plots_dir / f"{model}-latency.png",
                                             title=f"{model}: ONNX Runtime CPU latency, batch 1")
    points = []
    for precision, rows in latency.items():
        single = min(rows, key=lambda r: (r["batch_size"], -r["threads"]))
        points.append({"precision": precision, "accuracy": summary["test_metric"][precision],
                       "size_bytes": size_of(precision), "p50_ms": single["p50_ms"]})
    tradeoff = plot_accuracy_size_latency(points, plots_dir / f"{model}-accuracy-size-latency.png")
    return [str(p.relative_to(staging)) for p in (distribution, tradeoff)]


def deployables_index(models: dict) -> dict:
    """Task (or model) name -> the files that deploy it: the manifest a device build reads."""
    return {name: {"deployed_file": m["deployed_file"], "deployed_precision": m["deployed_precision"],
                   "onnx": {p: o["path"] for p, o in m["onnx"].items()},
                   "test_metric": m["test_metric"].get(m["deployed_precision"])}
            for name, m in models.items()}


def export_deployables(run_dir: Path, target: dict, export_cfg: dict, plan: ExportPlan,
                       deployables: list[Deployable], data: ExportData, log=print, progress=None) -> dict:
    run_dir = Path(run_dir)
    staging = run_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        models = {}
        for deployable in deployables:
            own_data = deployable.data or data
            exporter = ModelExporter(staging, target, export_cfg, plan, deployable, own_data, log, progress)
            summary = exporter.run()
            with exporter.stages("latency+plots"):
                latency, batch1_times = profile_latency(exporter.onnx, own_data.input_shape, export_cfg, progress)
                summary["latency"] = latency
                summary["plots"] = plot_model(staging, deployable.name, summary, latency, batch1_times,
                                              lambda p: exporter.onnx[p].stat().st_size)
            models[deployable.name] = summary
        atomic_write_text(staging / DEPLOYABLES, json.dumps(deployables_index(models), indent=1))
        publish(staging, run_dir, [d.name for d in deployables])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "plan": asdict(plan),
        "models": models,
        "latency_note": ("ONNX Runtime on this host's CPU: a host proxy, not device latency "
                         "(run bundle/build_engine.sh on the device and medkd-profile for that)"
                         if target["runtime"] == "tensorrt" else "ONNX Runtime on this host's CPU"),
    }
