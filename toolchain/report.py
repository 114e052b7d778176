"""The run report: ``report.json`` (machine-readable) and ``report.md`` (for people).

:func:`write_report` takes one nested dict and writes both files into the run folder,
each atomically (medkd.toolchain.atomic). Every section and
every key is optional: whatever is missing renders as "n/a" in the markdown, and the
JSON is the dict as given (plus ``run.versions`` filled in from the writing process when
absent), with sorted keys and indent 2.

Schema (all values JSON-serialisable; ``Path`` and numpy scalars/arrays are converted;
non-finite floats are written as the strings "NaN"/"Infinity"/"-Infinity")::

    run:        recipe: str            e.g. "rd"
                target: str            e.g. "jetson-orin"
                data: str              e.g. "mri"
                student: str           e.g. "resnet18"
                teacher: str
                run_dir: str
                started_at, finished_at: str (ISO 8601)
                seeds: {name: int}     e.g. {"global": 0, "split": 0} (an int is accepted too)
                command: str           the command line that produced the run
                versions: {package: version}   python, torch, onnxruntime, onnx, timm, medkd
    data:       name, source: str      source = where the images came from (path / dataset id)
                split_rule: str        how train/val/test were made (e.g. "stratified 70/15/15, seed 0")
                num_classes: int, class_names: [str], channels: int, image_size: int
                sizes: {train: int, val: int, test: int}
    teacher:    name, weights: str     weights = file / hub id / checksum of the frozen teacher
                test_accuracy: float   accuracy of the teacher branch (teacher + probe head), 0..1
    student:    arch: str, params: int
                test_accuracy: float   0..1
    training:   epochs: int, best_epoch: int
                history: [{epoch: int, train_loss, val_loss, train_acc, val_acc: float, ...}]
                    (any per-epoch keys; the table shows the union, in the order above first)
    export:     written by medkd.export.run_export.export_deployables:
                plan: {requested_precision, precisions, fallback_precision, formats, ...}
                latency_note: str      what the CPU latency is (a host proxy for GPU targets)
                models: {name: {requested_precision, deployed_precision, deployed_file,
                                onnx: {precision: {path, size_bytes}},
                                test_metric: {precision: float}, validation_images: int,
                                formats: {format: what it produced (parity, guard, bundle, firmware)},
                                latency: {precision: [profile_onnx_matrix rows]},
                                plots: [relative PNG paths], stage_seconds: {stage: float}}}
    device_latency: added by `medkd-profile` from trtexec's exported JSON
    provenance: medkd_source: {commit: str | None, dirty: bool | None}   (None: not a git checkout)
                data: {sha256: str, parts: {name: sha256}}   digest of the train/test tensors
                teacher_weights: {file: str, sha256: str} | None
                manifest: str          where the run's file digests are (manifest.sha256)
    target:     name, description, runtime ("onnxruntime" | "tensorrt"), precision, arch
                remaining: str | [str]  what is still to do for this target; when absent it is
                    derived from `runtime`

Accuracies are fractions in [0, 1] and shown as percentages in the markdown.

Two kinds of build have sections of their own, and their own markdown: a segmentation build
(``segmentation``: test Dice/HD95 per class, overlays; toolchain/seg_pipeline.py) and a
prompt-tuning build (``vlm``: base/novel/harmonic-mean accuracy, prompt-tuned and zero-shot,
and the folding parity; toolchain/vlm_pipeline.py).

Also accepted (the spelling ``toolchain/pipeline.py`` uses), each only where the key
above is absent: ``run.seed``; ``student.name`` / ``student.parameters``;
``training.test_accuracy`` (student) and ``training.teacher_test_accuracy``;
``data.provenance.source`` / ``data.provenance.split_rule``; ``data.train`` /
``data.val`` / ``data.test`` (split sizes); ``teacher.checkpoint`` (weights);
``target.status`` (used as the "remaining" note).
"""

from __future__ import annotations

import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from medkd.toolchain.atomic import atomic_write_text
from medkd.toolchain.errors import UserError

__all__ = ["write_report", "render_markdown", "collect_versions", "SECTIONS"]

SECTIONS = ("run", "data", "teacher", "student", "training", "export", "latency", "target")
NA = "n/a"
_VERSION_PACKAGES = ("torch", "onnxruntime", "onnx", "timm", "medkd")


def collect_versions(packages=_VERSION_PACKAGES) -> dict[str, str]:
    """Versions of python and the packages that determine the results."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = NA
    return out


# ----------------------------------------------------------------------------- json


def _jsonable(obj: Any) -> Any:
    """Deep-convert to plain JSON types (raises UserError naming the offending key)."""

    def conv(o: Any, where: str) -> Any:
        if isinstance(o, dict):
            return {str(k): conv(v, f"{where}.{k}") for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v, f"{where}[{i}]") for i, v in enumerate(o)]
        if isinstance(o, bool) or o is None or isinstance(o, (str, int)):
            return o
        if isinstance(o, float):
            if math.isnan(o):
                return "NaN"
            if math.isinf(o):
                return "Infinity" if o > 0 else "-Infinity"
            return o
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        if hasattr(o, "tolist") and callable(o.tolist):  # numpy / torch scalars and arrays
            return conv(o.tolist(), where)
        raise UserError(f"report value at {where} is not JSON-serialisable ({type(o).__name__})")

    return conv(obj, "report")


# ------------------------------------------------------------------------- markdown


def _sec(report: dict, name: str) -> dict:
    v = report.get(name)
    return v if isinstance(v, dict) else {}


def _num(v: Any, fmt: str = "{:.4g}") -> str:
    if isinstance(v, bool) or v is None:
        return NA if v is None else str(v)
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return fmt.format(v)
    return str(v) if v != "" else NA


def _pct(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return f"{100 * v:.2f} %"
    return _num(v)


def _int(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return _num(v)


def _parameters(v: Any) -> str:
    """A count, a task-expert student's {stored, shared, experts, deployed: [per task]}, or a
    fine-tuned foundation model's {total, trainable, lora, head} (recipe=lora)."""
    if not isinstance(v, dict):
        return _int(v)
    if "trainable" in v:
        return (f"{_int(v.get('total'))} deployed (LoRA merged); {_int(v.get('trainable'))} trained "
                f"(LoRA {_int(v.get('lora'))} + head {_int(v.get('head'))})")
    deployed = v.get("deployed") if isinstance(v.get("deployed"), list) else []
    return (f"{_int(v.get('stored'))} stored (shared {_int(v.get('shared'))} + experts {_int(v.get('experts'))} "
            f"+ heads); each fused task model {' / '.join(_int(d) for d in deployed) or NA}")


def _txt(v: Any) -> str:
    if v is None or v == "" or v == [] or v == {}:
        return NA
    if isinstance(v, dict):
        return ", ".join(f"{k}={_txt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_txt(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _first(*candidates: tuple[dict, str]) -> Any:
    """The value of the first (section, key) present and not None."""
    for section, key in candidates:
        if isinstance(section, dict) and section.get(key) is not None:
            return section[key]
    return None


def _remaining(target: dict) -> list[str]:
    rem = _first((target, "remaining"), (target, "status"))
    if isinstance(rem, str):
        return [rem]
    if isinstance(rem, (list, tuple)):
        return [str(r) for r in rem]
    runtime = str(target.get("runtime", "")).lower()
    name = target.get("name", NA)
    if runtime == "tensorrt":
        return [f"Build the TensorRT engine on the {name} (see the bundle) and profile it there."]
    if runtime == "onnxruntime":
        return [f"Nothing: the ONNX model runs as-is with ONNX Runtime on {name}."]
    return [NA]


def _models(export: dict) -> dict:
    models = export.get("models")
    return {k: v for k, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else {}


def _mb(size) -> str:
    return _num(size / 1e6, "{:.2f} MB") if isinstance(size, (int, float)) and not isinstance(size, bool) else NA


def _latency_p50(rows, batch: int) -> str:
    """p50 at `batch` with the most threads measured."""
    rows = [r for r in rows or [] if isinstance(r, dict) and r.get("batch_size") == batch]
    return _num(max(rows, key=lambda r: r.get("threads", 0))["p50_ms"], "{:.3f}") if rows else NA


def _precision_rows(model: dict) -> list[list[str]]:
    formats = model.get("formats") if isinstance(model.get("formats"), dict) else {}
    parity = {"fp32": (formats.get("onnx") or {}).get("parity"),
              "fp16": (formats.get("onnx-fp16") or {}).get("parity"),
              "int8": ((formats.get("onnx-int8") or {}).get("guard") or {}).get("comparison")}
    latency = model.get("latency") if isinstance(model.get("latency"), dict) else {}
    rows = []
    for precision, info in (model.get("onnx") or {}).items():
        check = parity.get(precision) or {}
        rows.append([
            precision + (" (deployed)" if precision == model.get("deployed_precision") else ""),
            _txt(info.get("path")), _mb(info.get("size_bytes")),
            _pct((model.get("test_metric") or {}).get(precision)),
            _pct(check.get("top1_agreement")),
            _num(check.get("metric_drop_points"), "{:.2f}") if precision != "fp32" else "reference",
            _latency_p50(latency.get(precision), 1), _latency_p50(latency.get(precision), 32),
        ])
    return rows


def _int8_lines(int8: dict) -> list[str]:
    guard = int8.get("guard") if isinstance(int8.get("guard"), dict) else {}
    out = ["", "### int8", "",
           f"- Layout: {_txt(int8.get('preset'))}, quantized with {_txt(int8.get('library'))}, "
           f"calibration {_txt(int8.get('calibration_method'))} on training images; "
           f"{_txt(int8.get('quantized_nodes'))} weighted layers in int8",
           f"- Accuracy guard: {'holds' if guard.get('held') else 'does NOT hold: int8 refused'}"
           + (f" (first try failed: {_txt(guard.get('first_failure'))})" if guard.get("first_failure") else "")]
    kept = guard.get("kept_high_precision") or []
    if kept:
        out.append(f"- Kept in high precision by the guard, most sensitive first: {_txt(kept)}")
    unquantized = int8.get("unquantized") if isinstance(int8.get("unquantized"), dict) else {}
    if unquantized:
        out += ["", "Layers left unquantized:", ""]
        out += _table(["Node", "Why"], [[_txt(n), _txt(why)] for n, why in unquantized.items()])
    return out


def _per_task_table(models: dict) -> list[str]:
    """One row per deployed model when a recipe exports several (one fused model per task)."""
    if len(models) < 2:
        return []
    rows = []
    for name, model in models.items():
        deployed = model.get("deployed_precision")
        onnx = (model.get("onnx") or {}).get(deployed) or {}
        metric = (model.get("test_metric") or {}).get(deployed)
        rows.append([_txt(name), _txt(model.get("deployed_file")), _txt(deployed), _mb(onnx.get("size_bytes")),
                     _pct(metric)])
    return ["", "Per task (one fused model each; `deployables.json` maps tasks to files):", "",
            *_table(["Task", "Deployed file", "Precision", "Size", "Test accuracy"], rows)]


def _render_deployment(export: dict, target: dict, target_name) -> list[str]:
    out = ["", "## Deployment", "",
           f"- Target: {_txt(target_name)} — {_txt(target.get('description'))} "
           f"(runtime {_txt(target.get('runtime'))})"]
    out += _per_task_table(_models(export))
    for name, model in _models(export).items():
        formats = model.get("formats") if isinstance(model.get("formats"), dict) else {}
        out += ["", f"### {name}: {_txt(model.get('requested_precision'))} requested, "
                    f"{_txt(model.get('deployed_precision'))} deployed ({_txt(model.get('deployed_file'))})", "",
                f"Checks use {_txt(model.get('validation_images'))} validation images carved from the training side; "
                "the test split is evaluated once per precision and only reported.", ""]
        # Segmenters report Dice, and agree per pixel rather than per image.
        metric = "Dice" if export.get("metric") == "dice" else "accuracy"
        agreement = "pixel agreement" if export.get("metric") == "dice" else "top-1 agreement"
        out += _table(["Precision", "File", "Size", f"Test {metric}", f"Validation {agreement} vs fp32",
                       "Validation drop (points)", "CPU p50 batch 1 (ms)", "CPU p50 batch 32 (ms)"],
                      _precision_rows(model))
        fold = (formats.get("onnx") or {}).get("fold") or {}
        bn = fold.get("batchnorm") or {}
        out += ["", f"- Fold stage: BatchNorm folded {_txt(bn.get('bn_folded'))} / kept {_txt(bn.get('bn_unfolded'))}; "
                    f"PEFT adapters merged: {_txt((fold.get('peft_merge') or {}).get('merged'))}"]
        if "tensorrt" in formats:
            out.append(f"- TensorRT engine: {_txt(formats['tensorrt'].get('path'))}")
        if "bundle" in formats:
            out.append(f"- On-device bundle: {_txt(formats['bundle'].get('path'))} (build_engine.sh, build_engine.py, "
                       "manifest.json); TensorRT engine not built on this host")
        out.append(f"- Firmware container: {_firmware_line(formats.get('firmware'))}")
        if isinstance(formats.get("onnx-int8"), dict):
            out += _int8_lines(formats["onnx-int8"])
        stages = model.get("stage_seconds") if isinstance(model.get("stage_seconds"), dict) else {}
        if stages:
            out += ["", "Stage wall times:", ""]
            out += _table(["Stage", "Seconds"], [[_txt(k), _num(v, "{:.1f}")] for k, v in stages.items()])
        out += _latency_lines(model, export.get("latency_note"))
    out += ["", "Remaining for this target:"]
    out += [f"- {_txt(r)}" for r in _remaining(target)]
    return out


def _latency_lines(model: dict, note) -> list[str]:
    latency = model.get("latency") if isinstance(model.get("latency"), dict) else {}
    rows = [{"precision": p, **r} for p, matrix in latency.items() for r in matrix or [] if isinstance(r, dict)]
    if not rows:
        return []
    from medkd.export.plots import latency_table_markdown  # lazy: matplotlib

    out = ["", f"Latency: {_txt(note)}.", ""] + latency_table_markdown(rows)
    for plot in model.get("plots") or []:
        out += ["", f"![{Path(plot).stem}]({plot})"]
    return out


def _firmware_line(firmware) -> str:
    if not isinstance(firmware, dict):
        return NA
    crc = firmware.get("crc32")
    crc_text = f"{crc:#010x}" if isinstance(crc, int) else NA
    return (
        f"{_txt(firmware.get('bin'))} ({_txt(firmware.get('kind'))} payload, "
        f"{_int(firmware.get('container_size'))} bytes, crc32 {crc_text})"
    )


def _stage_losses(histories: dict) -> list[str]:
    """One row per training stage: epochs, first and last loss."""
    return _table(["Stage", "Epochs", "First loss", "Last loss"],
                  [[stage, _int(len(h)), _num(h[0].get("loss")), _num(h[-1].get("loss"))]
                   for stage, h in histories.items() if isinstance(h, list) and h])


def render_segmentation_markdown(report: dict) -> str:
    """The human-readable report of a segmentation build (toolchain/seg_pipeline.py)."""
    run, data, teacher, student = (_sec(report, s) for s in ("run", "data", "teacher", "student"))
    seg, training, transfer = _sec(report, "segmentation"), _sec(report, "training"), _sec(report, "transfer_set")
    provenance = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    unit = "mm" if provenance.get("pixel_spacing_mm") else "px"
    test = seg.get("test") if isinstance(seg.get("test"), dict) else {}
    out = [f"# medkd run report: {_txt(run.get('recipe'))} (mode {_txt(run.get('mode'))}) on {_txt(data.get('name'))}",
           "",
           f"- Student: {_txt(student.get('name'))} ({_parameters(student.get('parameters'))} parameters)",
           f"- Teacher: {_txt(teacher.get('name')) if teacher else 'none (mode scratch)'}",
           f"- Run folder: {_txt(run.get('run_dir'))}",
           f"- Finished: {_txt(run.get('finished_at'))}",
           f"- Wall time: {_txt(run.get('wall_time_s'))} s ({_txt(run.get('stage_seconds'))})",
           "", "## Test segmentation (student, PyTorch fp32)", ""]
    rows = [[name, _num(c.get("dice")), _num(c.get("hd95_mm")), _int(c.get("images_scored")),
             _int(c.get("one_empty")), _int(c.get("both_empty"))]
            for name, c in (test.get("per_class") or {}).items()]
    rows.append(["**mean**", _num(test.get("mean_dice")), _num(test.get("mean_hd95_mm")), "", "", ""])
    out += _table(["Class", "Dice", f"HD95 ({unit})", "Slices scored", "One mask empty", "Both empty"], rows)
    out += ["", f"Dice and HD95 are means over test slices. Empty masks: {_txt(test.get('empty_mask_policy'))}. "
                f"Pixel agreement {_pct(test.get('pixel_agreement'))}. The deployment tables below score Dice "
                "pooled over all test pixels per class (the int8 guard's metric), so they differ from this mean."]
    teacher_test = teacher.get("test") if isinstance(teacher.get("test"), dict) else None
    if teacher_test:
        parity = teacher.get("merge_parity") or {}
        out += ["", f"Teacher (LoRA-tuned, merged; {_txt(teacher.get('weights'))}): test mean Dice "
                    f"{_num(teacher_test.get('mean_dice'))}, mean HD95 {_num(teacher_test.get('mean_hd95_mm'))} {unit}; "
                    f"merge parity {_num(parity.get('relative'))} of the logits' range."]
    overlays = seg.get("overlays") or []
    out += ["", "## Overlays (image | truth | prediction)", ""] + [f"![{p}]({p})" for p in overlays]
    out += ["", "## Training", ""]
    histories = training.get("histories") if isinstance(training.get("histories"), dict) else {}
    if teacher.get("history"):
        histories = {"teacher_tuning": teacher["history"], **histories}
    out += _stage_losses(histories)
    out += _render_deployment(_sec(report, "export"), _sec(report, "target"), _sec(report, "target").get("name"))
    out += ["", "## Provenance", "",
            f"- Data source: {_txt(provenance.get('source'))}",
            f"- Split rule: {_txt(provenance.get('split_rule'))}",
            f"- Labelled training slices: {_txt(data.get('train'))} (positions {_txt(provenance.get('labelled_slice_positions'))}); "
            f"unlabelled {_txt(data.get('unlabelled'))}; test {_txt(data.get('test'))}",
            f"- Classes: {_txt(data.get('class_names'))}",
            f"- Transfer set: {_txt(transfer)}",
            *_source_lines(_sec(report, "provenance")), ""]
    return "\n".join(out)


def render_vlm_markdown(report: dict) -> str:
    """The human-readable report of a prompt-tuning build (toolchain/vlm_pipeline.py)."""
    run, data, teacher, student = (_sec(report, s) for s in ("run", "data", "teacher", "student"))
    vlm, training = _sec(report, "vlm"), _sec(report, "training")
    provenance = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    test = vlm.get("test") if isinstance(vlm.get("test"), dict) else {}
    fold = vlm.get("fold") if isinstance(vlm.get("fold"), dict) else {}
    demo = " (embedded demonstration VLM, not a pretrained biomedical CLIP)" if teacher.get("demonstration_vlm") else ""
    out = [f"# medkd run report: {_txt(run.get('recipe'))} (objective {_txt(run.get('objective'))}, "
           f"{_txt(run.get('protocol'))}) on {_txt(data.get('name'))}",
           "",
           f"- VLM: {_txt(teacher.get('name'))}{demo}",
           f"- Deployed: {_txt(student.get('name'))} ({_parameters(student.get('parameters'))} parameters), "
           f"{_txt(vlm.get('deployed_classes'))} classes",
           f"- Trained: {_int(training.get('trainable_parameters'))} context parameters on "
           f"{_txt(data.get('prompt_tuning_images'))} images ({_txt(data.get('shots_per_class'))} per base class)",
           f"- Run folder: {_txt(run.get('run_dir'))}",
           f"- Wall time: {_txt(run.get('wall_time_s'))} s ({_txt(run.get('stage_seconds'))})",
           "", "## Test accuracy (each split among its own classes)", ""]
    rows = []
    for kind, label in (("prompt_tuned", "prompt-tuned"), ("zero_shot", "zero-shot (frozen VLM)")):
        scores = test.get(kind) if isinstance(test.get(kind), dict) else {}
        rows.append([label, _num(scores.get("base")), _num(scores.get("novel")), _num(scores.get("harmonic_mean"))])
    out += _table(["Model", f"Base ({len(data.get('base_classes') or [])} classes)",
                   f"Novel ({len(data.get('novel_classes') or [])} classes)", "Harmonic mean"], rows)
    out += ["", f"Folding: the prompts as a linear classifier over every class; largest logit difference to "
                f"the prompt-tuned model {_num(fold.get('max_abs_diff'))} on {_txt(fold.get('images'))} test images. "
                "The deployment tables below score all classes at once, so they differ from the table above."]
    distillation = student.get("distillation") if isinstance(student.get("distillation"), dict) else None
    if distillation:
        scored = distillation.get("test") if isinstance(distillation.get("test"), dict) else {}
        out += ["", f"## Student distilled from the folded model ({_txt(student.get('name'))})", "",
                f"Trained on {_txt(distillation.get('train_images'))} base-class training images, "
                f"{_txt(distillation.get('labelled'))} of them labelled (the shots), to the folded model's logits "
                "over every class with the geometry-aware loss. Test accuracy:", ""]
        rows = []
        for kind, label in (("folded_teacher", "folded prompt-tuned VLM (teacher)"), ("student", "student")):
            scores = scored.get(kind) if isinstance(scored.get(kind), dict) else {}
            rows.append([label, _num(scores.get("all")), _num(scores.get("base")), _num(scores.get("novel")),
                         _num(scores.get("harmonic_mean"))])
        out += _table(["Model", "All classes", "Base", "Novel", "Harmonic mean"], rows)
    history = training.get("history") if isinstance(training.get("history"), list) else []
    alignment = teacher.get("alignment") if isinstance(teacher.get("alignment"), dict) else None
    stages = {"alignment": alignment.get("history")} if alignment else {}
    stages["prompt_tuning"] = history
    if distillation:
        stages["student_distillation"] = distillation.get("history")
    out += ["", "## Training", ""]
    out += _stage_losses(stages)
    out += _render_deployment(_sec(report, "export"), _sec(report, "target"), _sec(report, "target").get("name"))
    out += ["", "## Provenance", "",
            f"- Data source: {_txt(provenance.get('source'))}",
            f"- Split rule: {_txt(provenance.get('split_rule'))}",
            f"- Base classes: {_txt(data.get('base_classes'))}",
            f"- Novel classes: {_txt(data.get('novel_classes'))}",
            f"- Novel class names in the class graph: {_txt(training.get('class_graph_novel_names'))}",
            *_source_lines(_sec(report, "provenance")), ""]
    return "\n".join(out)


def render_markdown(report: dict) -> str:
    """The human-readable report for `report` (see the module docstring for the schema)."""
    if isinstance(report.get("segmentation"), dict):
        return render_segmentation_markdown(report)
    if isinstance(report.get("vlm"), dict):
        return render_vlm_markdown(report)
    run, data, teacher, student = (_sec(report, s) for s in ("run", "data", "teacher", "student"))
    training, export, target = (_sec(report, s) for s in ("training", "export", "target"))
    provenance = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    student_name = _first((student, "arch"), (student, "name"), (run, "student"))
    counts = _first((student, "params"), (student, "parameters"))
    if isinstance(counts, dict) and counts.get("model"):  # recipe=lora deploys the foundation model itself
        student_name = counts["model"]
    teacher_name = _first((teacher, "name"), (run, "teacher"))
    student_acc = _first((student, "test_accuracy"), (training, "test_accuracy"))
    teacher_acc = _first((teacher, "test_accuracy"), (training, "teacher_test_accuracy"))
    sizes = data.get("sizes")
    if not isinstance(sizes, dict):
        sizes = {k: data[k] for k in ("train", "val", "test") if isinstance(data.get(k), int)}

    recipe = run.get("recipe", NA)
    target_name = target.get("name", run.get("target", NA))
    data_name = data.get("name", run.get("data", NA))
    out = [f"# medkd run report: {_txt(recipe)} → {_txt(target_name)} ({_txt(data_name)})", ""]
    out += [
        f"- Student: {_txt(student_name)}",
        f"- Teacher: {_txt(teacher_name)}",
        f"- Run folder: {_txt(run.get('run_dir'))}",
        f"- Finished: {_txt(run.get('finished_at'))}",
        f"- Wall time: {_txt(run.get('wall_time_s'))} s ({_txt(run.get('stage_seconds'))})",
        "",
        "## Metrics",
        "",
    ]
    rows = [["Test accuracy (student, PyTorch fp32)", _pct(student_acc)]]
    if teacher_acc is not None:
        rows.append(["Test accuracy (teacher branch)", _pct(teacher_acc)])
    rows.append(["Parameters (student)", _parameters(counts)])
    for name, model in _models(export).items():
        deployed = model.get("deployed_precision")
        metric = model.get("test_metric") if isinstance(model.get("test_metric"), dict) else {}
        rows.append([f"Test accuracy, deployed {name} ({_txt(deployed)})", _pct(metric.get(deployed))])
    out += _table(["Metric", "Value"], rows)
    out += _render_deployment(export, target, target_name)

    out += ["", "## Training history", ""]
    history = training.get("history")
    if isinstance(history, list) and history and all(isinstance(h, dict) for h in history):
        preferred = ["epoch", "loss", "train_loss", "val_loss", "train_acc", "val_acc",
                     "test_accuracy", "teacher_test_accuracy"]
        keys = [k for k in preferred if any(k in h for h in history)]
        keys += sorted({k for h in history for k in h} - set(keys))
        fmt = {k: (_pct if k.endswith("acc") or k.endswith("accuracy") else _num) for k in keys}
        fmt["epoch"] = _txt
        out += _table(keys, [[fmt[k](h.get(k)) for k in keys] for h in history])
        if "best_epoch" in training:
            out += ["", f"Best epoch: {_txt(training.get('best_epoch'))}"]
    else:
        out.append(NA)

    if isinstance(report.get("device_latency"), dict):  # added by medkd-profile from trtexec files
        from medkd.export.device_profile import render_device_latency  # lazy: medkd.export loads torch

        out += [""] + render_device_latency(report["device_latency"])

    seeds = _first((run, "seeds"), (run, "seed"))
    versions = run.get("versions") if isinstance(run.get("versions"), dict) else {}
    out += ["", "## Provenance", ""]
    out += [
        f"- Data source: {_txt(_first((data, 'source'), (provenance, 'source')))}",
        f"- Split rule: {_txt(_first((data, 'split_rule'), (provenance, 'split_rule')))}",
        f"- Split sizes: {_txt(sizes)}",
        f"- Classes: {_txt(data.get('num_classes'))} ({_txt(data.get('class_names'))})",
        *_baseline_lines(provenance.get("intensity_baseline")),
        f"- Teacher: {_txt(teacher_name)} (weights: {_txt(_first((teacher, 'weights'), (teacher, 'checkpoint')))})",
        f"- Seeds: {_txt(seeds)}",
        f"- Command: {_txt(run.get('command'))}",
        "- Versions: " + (", ".join(f"{k} {_txt(v)}" for k, v in versions.items()) if versions else NA),
        *_source_lines(_sec(report, "provenance")),
        "",
    ]
    return "\n".join(out)


def _baseline_lines(baseline) -> list[str]:
    """The one-feature intensity baseline (medkd.toolchain.data.baseline), per task if several."""
    if not isinstance(baseline, dict) or not baseline:
        return []
    per_task = baseline if "best" not in baseline else {None: baseline}
    lines = []
    for task, b in per_task.items():
        if isinstance(b, dict):
            lines.append(
                f"- Mean-intensity baseline{f' ({task})' if task else ''} (fitted on train, test accuracy): "
                f"best {_pct(b.get('best'))} (nearest class mean {_pct(b.get('nearest_class_mean'))}, "
                f"{_txt(b.get('bins'))} bins {_pct(b.get('binned_majority'))}, "
                f"majority class {_pct(b.get('majority_class'))})"
            )
    return lines


def _source_lines(provenance: dict) -> list[str]:
    """medkd's git commit, data and teacher-weights digests, the manifest (see medkd.toolchain.provenance)."""
    if not provenance:
        return []
    source = provenance.get("medkd_source") if isinstance(provenance.get("medkd_source"), dict) else {}
    if source.get("commit"):
        code = f"git {source['commit']}" + (" (with uncommitted changes)" if source.get("dirty") else "")
    else:
        code = "not a git checkout (no commit recorded)"
    data = provenance.get("data") if isinstance(provenance.get("data"), dict) else {}
    weights = provenance.get("teacher_weights") if isinstance(provenance.get("teacher_weights"), dict) else {}
    return [
        f"- medkd source: {code}",
        f"- Data sha256 (train/test images and labels): {_txt(data.get('sha256'))}",
        f"- Teacher weights sha256: {_txt(weights.get('sha256'))} ({_txt(weights.get('file'))})" if weights
        else "- Teacher weights sha256: n/a (no teacher)",
        f"- File digests: {_txt(provenance.get('manifest'))}",
    ]


def write_report(run_dir: str | os.PathLike, report: dict) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` into `run_dir`; return ``(md_path, json_path)``.

    `report` is not modified. ``run.versions`` is filled with :func:`collect_versions`
    when absent.
    """
    if not isinstance(report, dict):
        raise UserError(f"report must be a dict, got {type(report).__name__}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = _jsonable(report)
    run = data.get("run")
    if run is None:
        data["run"] = run = {}
    if isinstance(run, dict) and "versions" not in run:
        run["versions"] = collect_versions()
    json_text = json.dumps(data, sort_keys=True, indent=2, allow_nan=False) + "\n"
    md_text = render_markdown(data)
    json_path, md_path = run_dir / "report.json", run_dir / "report.md"
    atomic_write_text(json_path, json_text)
    atomic_write_text(md_path, md_text)
    return md_path, json_path
