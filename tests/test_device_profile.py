"""On-device latency from trtexec exports: parsing real trtexec files, the report section, medkd-profile."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from medkd.export.device_profile import (
    LAYERS,
    PROFILE,
    TIMES,
    device_latency_section,
    identify_trtexec_file,
    parse_trtexec_layers,
    parse_trtexec_profile,
    parse_trtexec_times,
    render_device_latency,
)
from medkd.toolchain.errors import UserError
from medkd.toolchain.profile_cli import main
from medkd.toolchain.report import write_report

FIXTURES = Path(__file__).parent / "fixtures" / "trtexec"
HEAD = FIXTURES / "mobilenet.qat.onnx.engine.timing.head.json"
TAIL = FIXTURES / "mobilenet.qat.onnx.engine.timing.tail.json"
PROFILE_FILE = FIXTURES / "mobilenet.qat.onnx.engine.profile.json"
GRAPH = FIXTURES / "mobilenet.qat.onnx.engine.graph.json"
CLASSIFIER = (
    "classifier.1.weight + QuantizeLinear_860 + Gemm_864 + classifier.1.bias + (Unnamed Layer* 849) [Shuffle]"
    " + unsqueeze_node_after_classifier.1.bias + (Unnamed Layer* 849) [Shuffle]_(Unnamed Layer* 849) [Shuffle]_output"
    " + (Unnamed Layer* 850) [ElementWise]"
)


def _write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def _record(start: float, compute: float, latency: float | None = None) -> dict:
    """A --exportTimes record with trtexec's keys; no copies, so H2D/D2H take no time."""
    rec = {"startEnqMs": start, "endEnqMs": start, "startH2dMs": start, "endH2dMs": start,
           "startComputeMs": start, "endComputeMs": start + compute,
           "startD2hMs": start + compute, "endD2hMs": start + compute}
    if latency is not None:
        rec.update(h2dMs=0, computeMs=compute, d2hMs=0, latencyMs=latency)
    return rec


# ------------------------------------------------------------------------------- times


def test_real_times_file_percentiles_match_hand_computation():
    out = parse_trtexec_times(HEAD, batch_size=1)
    # computeMs of the 10 records, sorted: 0.442369 0.444064 0.444256 0.444416 0.444512
    # 0.444544 0.444799 0.44528 0.459041 0.900864. Linear interpolation at rank q/100 * 9:
    # p50 = (0.444512 + 0.444544) / 2; p90 = 0.459041 + 0.1 * (0.900864 - 0.459041);
    # p99 = 0.459041 + 0.91 * (0.900864 - 0.459041).
    assert out["p50_ms"] == pytest.approx(0.444528, abs=1e-9)
    assert out["p90_ms"] == pytest.approx(0.5032233, abs=1e-9)
    assert out["p99_ms"] == pytest.approx(0.86109993, abs=1e-9)
    assert out["min_ms"] == 0.442369 and out["max_ms"] == 0.900864 and out["count"] == 10
    assert out["mean_ms"] == pytest.approx(4.914145 / 10)
    # --noDataTransfers run: latencyMs == computeMs in every record
    assert out["latency"]["p50_ms"] == pytest.approx(out["p50_ms"])
    # trtexec's throughput: inferences over first startH2dMs .. last endD2hMs
    assert out["throughput_qps"] == pytest.approx(10 / (17.4702 - 12.5399) * 1000)


def test_compute_time_uses_trtexecs_duration_not_the_rounded_timestamps():
    # 3 s into the run, trtexec prints timestamps with 10 us resolution: end - start gives
    # 0.45 / 0.45 / 0.44 / 0.46 / 0.45, while computeMs keeps 0.447998 etc.
    out = parse_trtexec_times(TAIL)
    assert out["p50_ms"] == pytest.approx(0.447998, abs=1e-9)
    assert out["min_ms"] == pytest.approx(0.446533, abs=1e-9)


def test_synthetic_times_known_percentiles_batch_and_fallbacks(tmp_path):
    # compute times 1..5 ms: p50 = 3, p90 = 4 + 0.6, p99 = 4 + 0.96 (rank q/100 * 4)
    records = [_record(10.0 * i, float(c)) for i, c in enumerate([3, 1, 5, 2, 4])]
    out = parse_trtexec_times(_write(tmp_path / "t.json", records), batch_size=4)
    assert (out["p50_ms"], out["p90_ms"], out["p99_ms"]) == pytest.approx((3.0, 4.6, 4.96))
    assert "latency" not in out  # no latencyMs in these records: nothing invented
    wall = 40.0 + 4.0 - 0.0  # last endD2hMs - first startH2dMs
    assert out["throughput_qps"] == pytest.approx(5 / wall * 1000)
    assert out["throughput_samples_per_s"] == pytest.approx(4 * 5 / wall * 1000)
    assert out["batch_size"] == 4


def test_latency_statistics_come_from_latency_ms(tmp_path):
    records = [_record(10.0 * i, 1.0, latency=1.0 + i) for i in range(3)]  # latencies 1, 2, 3
    out = parse_trtexec_times(_write(tmp_path / "t.json", records))
    assert out["p50_ms"] == 1.0 and out["latency"]["p50_ms"] == 2.0 and out["latency"]["max_ms"] == 3.0


# ------------------------------------------------------------------------ profile, layers


def test_real_profile_layers_and_percentages():
    layers = parse_trtexec_profile(PROFILE_FILE)
    assert len(layers) == 85
    assert layers[0] == {"name": "QuantizeLinear_2", "total_ms": 51.4526, "average_ms": 0.0122041,
                         "median_ms": None, "percentage": 1.88608}
    assert sum(x["percentage"] for x in layers) == pytest.approx(100.0, abs=0.01)
    total = sum(x["total_ms"] for x in layers)
    for x in layers:  # trtexec's percentage is the share of the summed layer time
        assert x["percentage"] == pytest.approx(100 * x["total_ms"] / total, abs=1e-3)


def test_profile_without_percentages_and_with_median(tmp_path):
    data = [{"count": 10}, {"name": "a", "timeMs": 1.0, "averageMs": 0.1, "medianMs": 0.09},
            {"name": "b", "timeMs": 3.0, "averageMs": 0.3, "medianMs": 0.31}]
    layers = parse_trtexec_profile(_write(tmp_path / "p.json", data))
    assert [x["percentage"] for x in layers] == pytest.approx([25.0, 75.0])
    assert [x["median_ms"] for x in layers] == [0.09, 0.31]


def test_real_detailed_layer_info():
    info = parse_trtexec_layers(GRAPH)
    assert len(info) == 8
    assert info["QuantizeLinear_2"]["type"] == "Reformat"
    assert info["QuantizeLinear_2"]["precision"] == "FP32->INT8"
    conv = info["features.0.0.weight + QuantizeLinear_8 + Conv_12 + PWN(Clip_16)"]
    assert conv["type"] == "CaskConvolution" and conv["precision"] == "INT8"
    assert conv["tactic"] == "volta_int8x4_icudnn_int8x4_128x32_relu_xregs_medium_c32_nn_v1"
    assert info["GlobalAveragePool_843"] == {"type": "TiledPooling", "precision": "FP16", "tactic": None}
    assert info[CLASSIFIER]["precision"] == "INT8->FP32"


def test_names_only_layer_info(tmp_path):
    path = _write(tmp_path / "l.json", {"Layers": ["conv1 + relu1", "fc"], "Bindings": ["x", "y"]})
    assert parse_trtexec_layers(path) == {
        "conv1 + relu1": {"type": None, "precision": None, "tactic": None},
        "fc": {"type": None, "precision": None, "tactic": None},
    }


def test_files_are_identified_by_content():
    assert [identify_trtexec_file(p) for p in (GRAPH, HEAD, PROFILE_FILE)] == [LAYERS, TIMES, PROFILE]


_MISSING = object()
BAD_FILES = [  # (parser, file: a fixture Path, or content to write as bad.json, or _MISSING), message fragments
    (parse_trtexec_times, PROFILE_FILE, ["profile.json", "is a trtexec --exportProfile file",
                                         "expected a trtexec --exportTimes file"]),
    (parse_trtexec_profile, HEAD, ["timing.head.json", "is a trtexec --exportTimes file",
                                   "expected a trtexec --exportProfile file"]),
    (parse_trtexec_layers, HEAD, ["expected a trtexec --exportLayerInfo file"]),
    (parse_trtexec_times, "[]\n", ["bad.json", "is empty"]),
    (parse_trtexec_times, HEAD.read_text()[:300], ["bad.json", "not valid JSON"]),
    (parse_trtexec_times, '[{"computeMs" : nan}]', ["not valid JSON"]),  # how C++ prints a NaN
    (parse_trtexec_times, _MISSING, ["bad.json", "file not found"]),
    (parse_trtexec_times, [_record(0, 1, 1), {**_record(5, 1, 1), "computeMs": "x"}], ["record 1 computeMs", "'x'"]),
    (parse_trtexec_profile, [{"count": 0}, {"name": "a", "timeMs": 1}], ['"count" is 0']),
    (parse_trtexec_profile, [{"count": 3}], ["no per-layer records"]),
    (parse_trtexec_profile, [{"count": 3}, {"timeMs": 1}], ['record 1 has no "name"']),
    (parse_trtexec_layers, {"Layers": []}, ['"Layers" list is empty']),
    (parse_trtexec_layers, {"Layers": [{"LayerType": "X"}]}, ['layer 0 has no "Name"']),
]


@pytest.mark.parametrize("parse, content, fragments", BAD_FILES)
def test_bad_files_are_one_line_user_errors(tmp_path, parse, content, fragments):
    path = content if isinstance(content, Path) else tmp_path / "bad.json"
    if content is not _MISSING and not isinstance(content, Path):
        _write(path, content)
    with pytest.raises(UserError) as info:
        parse(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# ----------------------------------------------------------------------- section, render


def test_section_joins_profile_with_layer_info_and_records_sources():
    section = device_latency_section(HEAD, PROFILE_FILE, GRAPH, batch_size=2)
    assert section["source"] == "trtexec" and section["batch_size"] == 2 and section["profile_runs"] == 4216
    by_name = {x["name"]: x for x in section["layers"]}
    assert by_name["QuantizeLinear_2"]["type"] == "Reformat"
    assert by_name[CLASSIFIER]["precision"] == "INT8->FP32"
    assert by_name["QuantizeLinear_98"]["type"] is None  # not in the graph excerpt
    for kind, path in ((TIMES, HEAD), (PROFILE, PROFILE_FILE), (LAYERS, GRAPH)):
        assert section["files"][kind] == {"name": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_render_has_percentile_table_and_top_layers():
    section = device_latency_section(HEAD, PROFILE_FILE, GRAPH)
    lines = render_device_latency(section, top=3)
    text = "\n".join(lines)
    assert lines[0] == "## On-device latency (trtexec)"
    assert "| GPU compute | 0.445 | 0.503 | 0.861 | 0.491 | 0.442 | 0.901 |" in lines
    assert "top 3 of 85" in text and "4,216 profiled runs" in text
    rows = [line for line in lines if line.startswith("| `")]
    assert len(rows) == 3  # the three slowest by average time, slowest first
    assert rows[0].startswith("| `features.16.conv.2.weight + QuantizeLinear_771 + Conv_775 + Add_777`")
    assert "The other 82 layers" in text


def test_render_survives_a_hand_edited_section():
    lines = render_device_latency({"p50_ms": "NaN", "layers": [{"name": "a|b", "average_ms": "x"}]})
    text = "\n".join(lines)
    assert "| GPU compute | NaN | n/a |" in text and "`a\\|b`" in text


# -------------------------------------------------------------------------------- CLI


def _run_dir(tmp_path, export=None) -> Path:
    run = tmp_path / "run"
    write_report(run, {"run": {"recipe": "rd", "target": "jetson-orin", "versions": {"python": "3"}},
                       "export": export or {"opset": 17}})
    return run


def test_cli_adds_device_latency_to_report(tmp_path, capsys):
    run = _run_dir(tmp_path, export={"opset": 17, "profile_batch": 4})
    # layer info first, times in the middle: roles come from content, not position
    assert main([str(run), str(GRAPH), str(HEAD), str(PROFILE_FILE)]) == 0
    report = json.loads((run / "report.json").read_text())
    section = report["device_latency"]
    assert section["source"] == "trtexec" and section["batch_size"] == 4
    assert section["batch_source"] == "report.json export.profile_batch"
    assert section["p50_ms"] == pytest.approx(0.444528)
    assert set(section["files"]) == {"times", "profile", "layers"}
    assert report["export"]["opset"] == 17 and report["run"]["versions"] == {"python": "3"}  # rest kept
    md = (run / "report.md").read_text()
    assert md.index("## On-device latency (trtexec)") < md.index("## Provenance")
    assert "QuantizeLinear_2" in md
    out = capsys.readouterr().out
    assert "0.445 / 0.503 / 0.861 ms" in out and "batch 4" in out


def test_cli_batch_flag_overrides_report(tmp_path, capsys):
    run = _run_dir(tmp_path, export={"profile_batch": 4})
    assert main([str(run), str(HEAD), "--batch", "8"]) == 0
    section = json.loads((run / "report.json").read_text())["device_latency"]
    assert section["batch_size"] == 8 and section["batch_source"] == "--batch" and "layers" not in section


CLI_ERRORS = [  # (argv after RUN_DIR, with {run}/{tmp} filled in, message fragment)
    (["{tmp}/missing", str(HEAD)], "run folder not found"),
    (["{tmp}/no_report", str(HEAD)], "no report.json"),
    (["{tmp}/broken", str(HEAD)], "not valid JSON"),
    (["{run}", str(HEAD), "--batch", "0"], "--batch"),
    (["{run}"], "required"),
    (["{run}", str(HEAD), str(TAIL)], "are both a trtexec --exportTimes file"),
    (["{run}", str(PROFILE_FILE)], "none of the files is a trtexec --exportTimes file"),
    (["{run}", str(HEAD), "{tmp}/junk.json"], "junk.json: is not a trtexec export"),
    (["{run}", "{tmp}/cut.json"], "cut.json: not valid JSON"),
]


@pytest.mark.parametrize("argv, fragment", CLI_ERRORS)
def test_cli_errors_are_one_line(tmp_path, capsys, argv, fragment):
    run = _run_dir(tmp_path)
    (tmp_path / "no_report").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "report.json").write_text("{not json")
    _write(tmp_path / "junk.json", {"hello": 1})
    _write(tmp_path / "cut.json", HEAD.read_text()[:300])
    before = (run / "report.json").read_bytes()
    assert main([a.format(run=run, tmp=tmp_path) for a in argv]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medkd-profile: error: ") and fragment in err
    assert "Traceback" not in err
    assert (run / "report.json").read_bytes() == before  # nothing half-written


def test_cli_process_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "medkd.toolchain.profile_cli", str(tmp_path / "nope"), "t.json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"medkd-profile: error: run folder not found: {tmp_path / 'nope'}"]
