"""On-device latency read from trtexec's JSON exports (TensorRT runs on the target; we read files).

The bundle's ``build_engine.sh`` runs trtexec with ``--exportTimes``, ``--exportProfile`` and
``--exportLayerInfo``. The formats, as written by trtexec (``samples/common/sampleReporting.cpp``
and the engine inspector in NVIDIA/TensorRT; real examples in ``tests/fixtures/trtexec/``):

``--exportTimes``
    ``[{startEnqMs, endEnqMs, startH2dMs, endH2dMs, startComputeMs, endComputeMs, startD2hMs,
    endD2hMs, h2dMs, computeMs, d2hMs, latencyMs}, ...]``: one record per timed inference. The
    ``start*``/``end*`` values are timestamps (ms since trtexec started), the others durations;
    ``latencyMs = h2dMs + computeMs + d2hMs``. Recent trtexec releases leave the warm-up
    inferences out of this file; older ones wrote them too (they cannot be told apart here).
``--exportProfile``
    ``[{"count": N}, {name, timeMs, averageMs, [medianMs,] percentage}, ...]``: per-layer time
    summed over N profiled inferences; ``percentage`` is of the summed time of all layers.
``--exportLayerInfo``
    ``{"Layers": [...], "Bindings": [...]}``. With ``--profilingVerbosity=detailed`` each layer
    is a dict (``Name``, ``LayerType``, ``ParameterType``, ``Inputs``/``Outputs`` with a
    ``Format/Datatype`` string, ``TacticName``, ...); otherwise each layer is just its name.

:func:`device_latency_section` combines them into the ``device_latency`` section of
``report.json``; :func:`render_device_latency` renders that section as markdown. Anything
malformed or of the wrong kind is a :class:`UserError` naming the file and what was expected.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from medkd.toolchain.errors import UserError

from .tensorrt import sha256_file

__all__ = [
    "TIMES",
    "PROFILE",
    "LAYERS",
    "KIND_NAMES",
    "EXPECTED",
    "identify_trtexec_file",
    "parse_trtexec_times",
    "parse_trtexec_profile",
    "parse_trtexec_layers",
    "device_latency_section",
    "render_device_latency",
]

TIMES, PROFILE, LAYERS = "times", "profile", "layers"
KIND_NAMES = {
    TIMES: "a trtexec --exportTimes file",
    PROFILE: "a trtexec --exportProfile file",
    LAYERS: "a trtexec --exportLayerInfo file",
}
_SHAPES = {
    TIMES: "a JSON list of per-inference records with startComputeMs/endComputeMs",
    PROFILE: 'a JSON list: {"count": N}, then per-layer records with name/timeMs/averageMs',
    LAYERS: 'a JSON object with a "Layers" list',
}
EXPECTED = {kind: f"{name} ({_SHAPES[kind]})" for kind, name in KIND_NAMES.items()}
PERCENTILES = (50, 90, 99)
TOP_LAYERS = 10
_NA = "n/a"
PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- loading


def _load_json(path: PathLike) -> Any:
    """The parsed JSON of `path`; every way of failing becomes one UserError line."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a trtexec JSON file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file, expected a trtexec JSON file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror})") from None


def _kind(data: Any) -> str | None:
    """Which trtexec export `data` is, judged by content; None if none of them."""
    if isinstance(data, dict) and isinstance(data.get("Layers"), list):
        return LAYERS
    if isinstance(data, list) and data and isinstance(data[0], dict):
        if set(data[0]) == {"count"}:
            return PROFILE
        if "startComputeMs" in data[0] or "computeMs" in data[0]:
            return TIMES
    return None


def _describe(data: Any) -> str:
    """What `data` is, for error messages: "is empty", "is a trtexec --exportProfile file", ..."""
    if data in ([], {}):
        return "is empty"
    found = _kind(data)
    return f"is {KIND_NAMES[found]}" if found else "is not a trtexec export"


def _load_kind(path: PathLike, wanted: str) -> Any:
    data = _load_json(path)
    if _kind(data) != wanted:
        raise UserError(f"{path}: {_describe(data)}, expected {EXPECTED[wanted]}")
    return data


def identify_trtexec_file(path: PathLike) -> str:
    """``TIMES``, ``PROFILE`` or ``LAYERS``: which trtexec export `path` holds (by content)."""
    data = _load_json(path)
    kind = _kind(data)
    if kind is None:
        raise UserError(f"{path}: {_describe(data)}; expected one of: " + "; ".join(EXPECTED.values()))
    return kind


def _number(value: Any, path: PathLike, where: str) -> float:
    """`value` as a finite float, or a UserError naming the file and the record field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{path}: {where} is {value!r}, expected a finite number of milliseconds")
    return float(value)


def _file_ref(path: PathLike) -> dict:
    """Name and sha256 of a source file, so the report says exactly what it was built from."""
    return {"name": Path(path).name, "sha256": sha256_file(path)}


# ------------------------------------------------------------------------------- times


def _stats(values_ms: list[float]) -> dict:
    # Linear interpolation (numpy's default), as profile_onnx_cpu uses for the CPU numbers,
    # so both sections mean the same by "p90". trtexec's console summary uses a nearest-rank
    # rule instead, so its printed percentiles can differ from these in the last digits.
    arr = np.asarray(values_ms, dtype=float)
    p = np.percentile(arr, PERCENTILES)
    stats = {f"p{q}_ms": float(v) for q, v in zip(PERCENTILES, p)}
    stats.update(mean_ms=float(arr.mean()), min_ms=float(arr.min()), max_ms=float(arr.max()), count=int(arr.size))
    return stats


def _compute_ms(rec: dict, path: PathLike, i: int) -> float:
    # GPU compute time = endComputeMs - startComputeMs, the quantity trtexec's "GPU Compute
    # Time" summary reports. trtexec also writes that difference itself as computeMs, taken
    # before printing; the timestamps are printed with 6 significant digits, so after 1 s of
    # run their difference is only good to 10 us (100 us after 10 s). Hence computeMs first.
    if "computeMs" in rec:
        value = _number(rec["computeMs"], path, f"record {i} computeMs")
    else:
        end = _number(rec.get("endComputeMs"), path, f"record {i} endComputeMs")
        value = end - _number(rec.get("startComputeMs"), path, f"record {i} startComputeMs")
    if value < 0:
        raise UserError(f"{path}: record {i} has a negative GPU compute time ({value} ms)")
    return value


def _throughput(records: list[dict], path: PathLike, batch_size: int) -> dict:
    """trtexec's throughput: inferences over the host wall time from first H2D to last D2H."""
    if not all("startH2dMs" in r and "endD2hMs" in r for r in records):
        return {}
    first = min(_number(r["startH2dMs"], path, f"record {i} startH2dMs") for i, r in enumerate(records))
    last = max(_number(r["endD2hMs"], path, f"record {i} endD2hMs") for i, r in enumerate(records))
    if last <= first:
        return {}
    qps = len(records) / (last - first) * 1000.0
    return {"wall_ms": last - first, "throughput_qps": qps, "throughput_samples_per_s": qps * batch_size}


def _check_batch(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    return batch_size


def parse_trtexec_times(path: PathLike, batch_size: int = 1) -> dict:
    """GPU compute time percentiles (and H2D+compute+D2H latency where present) from --exportTimes.

    Returns ``p50_ms, p90_ms, p99_ms, mean_ms, min_ms, max_ms, count`` of the GPU compute time
    per inference, ``batch_size``, ``metric``, ``latency`` (the same statistics of
    ``latencyMs`` when every record has it, else absent) and ``throughput_qps`` /
    ``throughput_samples_per_s`` / ``wall_ms`` when the records carry the H2D/D2H timestamps.
    """
    batch_size = _check_batch(batch_size)
    records = _load_kind(path, TIMES)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record {i} is {type(rec).__name__}, expected an object ({EXPECTED[TIMES]})")
    out = {"metric": "gpu_compute_time", "batch_size": batch_size}
    out.update(_stats([_compute_ms(r, path, i) for i, r in enumerate(records)]))
    if all("latencyMs" in r for r in records):
        out["latency"] = _stats([_number(r["latencyMs"], path, f"record {i} latencyMs") for i, r in enumerate(records)])
    out.update(_throughput(records, path, batch_size))
    return out


# ----------------------------------------------------------------------------- profile


def _profile_records(path: PathLike) -> tuple[int, list[dict]]:
    """(number of profiled inferences, per-layer records) of an --exportProfile file."""
    data = _load_kind(path, PROFILE)
    runs = data[0]["count"]
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise UserError(f'{path}: "count" is {runs!r}, expected a positive number of profiled inferences')
    layers = data[1:]
    if not layers:
        raise UserError(f"{path}: no per-layer records after the count; expected {EXPECTED[PROFILE]}")
    return runs, [_layer_record(rec, runs, path, i) for i, rec in enumerate(layers, start=1)]


def _layer_record(rec: Any, runs: int, path: PathLike, i: int) -> dict:
    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
        raise UserError(f'{path}: record {i} has no "name"; expected {EXPECTED[PROFILE]}')
    total = _number(rec.get("timeMs"), path, f"record {i} timeMs")
    avg = rec.get("averageMs", total / runs)
    median = rec.get("medianMs")  # written by newer trtexec releases only
    return {
        "name": rec["name"],
        "total_ms": total,
        "average_ms": _number(avg, path, f"record {i} averageMs"),
        "median_ms": None if median is None else _number(median, path, f"record {i} medianMs"),
        "percentage": None if "percentage" not in rec else _number(rec["percentage"], path, f"record {i} percentage"),
    }


def _fill_percentages(layers: list[dict]) -> list[dict]:
    """Use trtexec's percentages; compute them from the totals only where it wrote none."""
    total = sum(layer["total_ms"] for layer in layers)
    for layer in layers:
        if layer["percentage"] is None:
            layer["percentage"] = 100.0 * layer["total_ms"] / total if total > 0 else 0.0
    return layers


def parse_trtexec_profile(path: PathLike) -> list[dict]:
    """Per-layer records of an --exportProfile file, in engine order.

    Each is ``{name, total_ms, average_ms, median_ms (None when not exported), percentage}``;
    ``percentage`` is the layer's share of the summed layer time (sums to ~100).
    """
    return _fill_percentages(_profile_records(path)[1])


# ------------------------------------------------------------------------------ layers

_DTYPES = {
    "fp32": "FP32", "float": "FP32", "fp16": "FP16", "half": "FP16", "bf16": "BF16",
    "bfloat16": "BF16", "fp8": "FP8", "fp4": "FP4", "int8": "INT8", "int4": "INT4",
    "int16": "INT16", "int32": "INT32", "int64": "INT64", "uint8": "UINT8", "bool": "BOOL",
    "double": "FP64",
}
_DTYPE_RE = re.compile(r"\b(" + "|".join(_DTYPES) + r")\b", re.IGNORECASE)


def _dtype(tensors: Any) -> str | None:
    """Data type of the first tensor, from its ``Format/Datatype`` text (e.g. "Row major linear FP32")."""
    if not isinstance(tensors, list) or not tensors or not isinstance(tensors[0], dict):
        return None
    match = _DTYPE_RE.search(str(tensors[0].get("Format/Datatype", "")))
    return _DTYPES[match.group(1).lower()] if match else None


def _precision(layer: dict) -> str | None:
    # The layer info gives tensor formats, not a layer precision; like trt-engine-explorer we read
    # it off the tensors. "INT8->FP16" marks layers that convert (reformats, Q/DQ, mixed convs).
    src, dst = _dtype(layer.get("Inputs")), _dtype(layer.get("Outputs"))
    if src and dst and src != dst:
        return f"{src}->{dst}"
    return src or dst


def _layer_info(layer: Any, path: PathLike, i: int) -> tuple[str, dict]:
    if isinstance(layer, str):  # exported without --profilingVerbosity=detailed: names only
        return layer, {"type": None, "precision": None, "tactic": None}
    if not isinstance(layer, dict) or not isinstance(layer.get("Name"), str):
        raise UserError(f'{path}: layer {i} has no "Name"; expected {EXPECTED[LAYERS]}')
    return layer["Name"], {
        "type": layer.get("LayerType") or layer.get("ParameterType"),
        "precision": _precision(layer),
        "tactic": layer.get("TacticName"),
    }


def parse_trtexec_layers(path: PathLike) -> dict[str, dict]:
    """``{layer name: {type, precision, tactic}}`` from an --exportLayerInfo file.

    Values are None where the file does not say (always so for the names-only form).
    """
    layers = _load_kind(path, LAYERS)["Layers"]
    if not layers:
        raise UserError(f'{path}: the "Layers" list is empty; expected {EXPECTED[LAYERS]}')
    info: dict[str, dict] = {}
    for i, layer in enumerate(layers):
        name, details = _layer_info(layer, path, i)
        info.setdefault(name, details)
    return info


# ----------------------------------------------------------------------------- section


def _with_info(layers: list[dict], info: dict[str, dict]) -> list[dict]:
    blank = {"type": None, "precision": None}
    return [{**layer, **{k: info.get(layer["name"], blank)[k] for k in ("type", "precision")}} for layer in layers]


def device_latency_section(
    times: PathLike,
    profile: PathLike | None = None,
    layers: PathLike | None = None,
    batch_size: int = 1,
) -> dict:
    """The ``device_latency`` report section built from trtexec's export files (paths).

    Holds :func:`parse_trtexec_times`' statistics, ``source: "trtexec"``, ``files`` (name and
    sha256 of each file used) and, with a profile, ``layers`` (per-layer records joined with
    type/precision from the layer-info file where given) and ``profile_runs``.
    """
    section = {"source": "trtexec", **parse_trtexec_times(times, batch_size)}
    files = {TIMES: _file_ref(times)}
    info = parse_trtexec_layers(layers) if layers is not None else {}
    if layers is not None:
        files[LAYERS] = _file_ref(layers)
        section["engine_layer_count"] = len(info)
    if profile is not None:
        runs, records = _profile_records(profile)
        section["profile_runs"] = runs
        section["layers"] = _with_info(_fill_percentages(records), info)
        files[PROFILE] = _file_ref(profile)
    section["files"] = files
    return section


# ---------------------------------------------------------------------------- markdown


def _fmt(value: Any, spec: str = "{:.3f}") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _NA if value in (None, "") else _cell(str(value))
    return spec.format(value) if math.isfinite(value) else str(value)


def _num(value: Any) -> float:
    """`value` if it is a finite number, else 0 (for sorting and sums over hand-edited reports)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else 0.0


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _layer_name(name: Any, width: int = 70) -> str:
    # Fused layer names run to hundreds of characters; a code span keeps "*", "_" and "[]"
    # in them from turning into markdown.
    text = str(name).replace("`", "'")
    text = text if len(text) <= width else text[: width - 1] + "…"
    return f"`{_cell(text)}`"


def _stats_row(label: str, stats: Any) -> list[str]:
    stats = stats if isinstance(stats, dict) else {}
    keys = [f"p{q}_ms" for q in PERCENTILES] + ["mean_ms", "min_ms", "max_ms"]
    return [label] + [_fmt(stats.get(k)) for k in keys]


def _summary_lines(section: dict) -> list[str]:
    header = ["Time per inference (ms)"] + [f"p{q}" for q in PERCENTILES] + ["mean", "min", "max"]
    rows = [_stats_row("GPU compute", section)]
    if isinstance(section.get("latency"), dict):
        rows.append(_stats_row("Latency (H2D + compute + D2H)", section["latency"]))
    out = _md_table(header, rows)
    batch = section.get("batch_size", 1)
    out += [
        "",
        f"- Batch {_fmt(batch, '{}')}, {_fmt(section.get('count'), '{:,}')} timed inferences; "
        f"throughput {_fmt(section.get('throughput_qps'), '{:,.1f}')} inferences/s "
        f"({_fmt(section.get('throughput_samples_per_s'), '{:,.1f}')} samples/s)",
        "- Percentiles interpolate linearly over trtexec's per-inference records "
        "(trtexec's own summary uses nearest rank, so its printout may differ slightly)",
    ]
    return out


def _files_line(section: dict) -> list[str]:
    files = section.get("files")
    if not isinstance(files, dict) or not files:
        return ["- Source files: n/a"]
    refs = [
        f"{_cell(str(ref.get('name', _NA)))} (sha256 {str(ref.get('sha256', _NA))[:12]})"
        for ref in files.values()
        if isinstance(ref, dict)
    ]
    return ["- Source files: " + ", ".join(refs)]


def _layer_lines(section: dict, top: int) -> list[str]:
    layers = [x for x in section.get("layers") or [] if isinstance(x, dict)]
    if not layers:
        return []
    ranked = sorted(layers, key=lambda x: _num(x.get("average_ms")), reverse=True)
    shown, rest = ranked[:top], ranked[top:]
    runs = _fmt(section.get("profile_runs"), "{:,}")
    out = ["", f"### Slowest layers (top {len(shown)} of {len(layers)} by average time, {runs} profiled runs)", ""]
    rows = [
        [_layer_name(x.get("name")), _fmt(x.get("type")), _fmt(x.get("precision")),
         _fmt(x.get("average_ms"), "{:.4f}"), _fmt(x.get("percentage"), "{:.1f} %")]
        for x in shown
    ]
    out += _md_table(["Layer", "Type", "Precision", "Avg (ms)", "% of total"], rows)
    total_avg = sum(_num(x.get("average_ms")) for x in layers)
    out.append("")
    if rest:
        rest_pct = sum(_num(x.get("percentage")) for x in rest)
        out.append(f"- The other {len(rest)} layers: {rest_pct:.1f} % of the total")
    # Per-layer timing syncs after every layer, so its sum overstates the end-to-end time.
    out.append(f"- Sum of per-layer averages: {total_avg:.3f} ms (profiled run; per-layer timing adds overhead)")
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def render_device_latency(section: dict, top: int = TOP_LAYERS) -> list[str]:
    """Markdown lines for a ``device_latency`` section; missing values show as "n/a"."""
    section = section if isinstance(section, dict) else {}
    out = [f"## On-device latency ({_cell(str(section.get('source', 'trtexec')))})", ""]
    out += _summary_lines(section)
    out += _files_line(section)
    out += _layer_lines(section, top)
    return out
