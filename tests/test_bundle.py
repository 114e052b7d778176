"""On-device TensorRT build bundle: contents, hashes from disk, both build scripts, atomic write.

The scripts are run here, not only read: build_engine.sh against a fake `trtexec` that
records its argv, build_engine.py against the fake `tensorrt` module of test_tensorrt.py
(with a poisoned `medkd` on its path, so the script provably needs no medkd).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import py_compile
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medkd.export import bundle as bundle_module
from medkd.export.bundle import verify_bundle, write_bundle
from medkd.export.tensorrt import builder_settings, trtexec_build_command, trtexec_profile_command
from medkd.toolchain.errors import UserError

HERE = Path(__file__).resolve().parent


def _load_sibling(name: str):
    # By file path, so it works whatever pytest's import mode is.
    spec = importlib.util.spec_from_file_location(f"_medkd_{name}_helpers", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_trt_tests = _load_sibling("test_tensorrt")
target, SHAPE, FAKE_TENSORRT_SOURCE = _trt_tests.target, _trt_tests.SHAPE, _trt_tests.FAKE_TENSORRT_SOURCE
SCRIPTS = ("build_engine.sh", "build_engine.py")
EXTRA = {
    "preprocessing": {"resize": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    "class_names": ["normal", "tumour"],
    "expected_accuracy": {"fp32": 0.912, "int8": 0.905},
}
CASES = {
    "jetson-orin-int8": ("10.3", "jetson-orin", "int8", None),
    "datacenter-gpu-fp16": ("11.4", "datacenter-gpu", "fp16", None),
    "jetson-orin-dla-fp16": ("10.3", "jetson-orin", "fp16", 1),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return _trt_tests.make_models(tmp_path_factory.mktemp("onnx"))


def _settings(case: str):
    version, name, precision, dla = CASES[case]
    return builder_settings(version, target(name), precision, SHAPE, dla_core=dla)


@pytest.fixture(params=list(CASES))
def written(request, models, tmp_path):
    """(settings, bundle dir, returned manifest, source ONNX) for each target case."""
    settings = _settings(request.param)
    onnx_path = models[settings.precision]
    manifest = write_bundle(tmp_path / "bundle", onnx_path, settings, EXTRA)
    return settings, tmp_path / "bundle", manifest, onnx_path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------
# Contents
# --------------------------------------------------------------------------------------


def test_bundle_files_and_manifest(written):
    settings, folder, manifest, onnx_path = written
    onnx_name = onnx_path.name
    assert sorted(p.name for p in folder.iterdir()) == sorted([onnx_name, *SCRIPTS, "manifest.json"])
    assert (folder / onnx_name).read_bytes() == onnx_path.read_bytes()

    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk == manifest
    # every other file's sha256, recomputed here from disk
    assert on_disk["files"] == {name: _sha256(folder / name) for name in [onnx_name, *SCRIPTS]}
    body = {k: v for k, v in on_disk.items() if k != "manifest_sha256"}
    assert on_disk["manifest_sha256"] == hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()

    assert on_disk["onnx"]["inputs"] == [{"name": "images", "dtype": "float", "shape": ["batch", *SHAPE]}]
    assert on_disk["onnx"]["outputs"] == [{"name": "logits", "dtype": "float", "shape": ["batch", 2]}]
    assert on_disk["onnx"]["sha256"] == _sha256(onnx_path) and on_disk["onnx"]["opset"] == 17
    assert (on_disk["target"], on_disk["precision"]) == (settings.target, settings.precision)
    assert on_disk["builder_settings"] == settings.to_dict()
    stem = onnx_name[: -len(".onnx")]
    assert on_disk["trtexec"] == {
        "build": trtexec_build_command(settings, onnx_name, f"{stem}.engine", "timing.cache"),
        "profile": trtexec_profile_command(settings, f"{stem}.engine", stem),
    }
    for key, value in EXTRA.items():
        assert on_disk[key] == value
    assert verify_bundle(folder) == on_disk

    umask = _umask()
    for name in SCRIPTS:
        assert (folder / name).stat().st_mode & 0o777 == 0o777 & ~umask
    for name in (onnx_name, "manifest.json"):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask


EXPECTED_FLAGS = {
    "jetson-orin-int8": (
        ["--stronglyTyped", "--minShapes=images:1x3x16x16", "--maxShapes=images:8x3x16x16"],
        ["--fp16", "--useDLACore"],
    ),
    "datacenter-gpu-fp16": (
        ["--stronglyTyped", "--optShapes=images:8x3x16x16", "--maxShapes=images:32x3x16x16", "--useCudaGraph"],
        ["--fp16", "--useDLACore"],
    ),
    "jetson-orin-dla-fp16": (
        ["--fp16", "--useDLACore=1", "--allowGPUFallback", "--maxShapes=images:1x3x16x16"],
        ["--stronglyTyped", "--useCudaGraph"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scripts_compile_and_carry_the_exact_commands(case, models, tmp_path):
    settings = _settings(case)
    manifest = write_bundle(tmp_path / "b", models[settings.precision], settings, EXTRA)
    subprocess.run(["bash", "-n", str(tmp_path / "b" / "build_engine.sh")], check=True)
    py_compile.compile(str(tmp_path / "b" / "build_engine.py"), cfile=str(tmp_path / "c.pyc"), doraise=True)

    script = (tmp_path / "b" / "build_engine.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    one_line = script.replace(" \\\n    ", " ")
    for command in manifest["trtexec"].values():
        assert shlex.join(command) in one_line
    flags = set(manifest["trtexec"]["build"] + manifest["trtexec"]["profile"])
    present, absent = EXPECTED_FLAGS[case]
    assert all(f in flags for f in present)
    assert not any(a.startswith(f) for a in flags for f in absent)

    tree = ast.parse((tmp_path / "b" / "build_engine.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= set(sys.stdlib_module_names) | {"__future__", "tensorrt"}, imported


# --------------------------------------------------------------------------------------
# Running build_engine.sh with a fake trtexec
# --------------------------------------------------------------------------------------

FAKE_TRTEXEC = """#!/usr/bin/env bash
# Records its working directory and argv, one call per line, fields separated by \\x1f.
{ printf '%s\\x1f' "$PWD" "$@"; printf '\\n'; } >> "$TRTEXEC_LOG"
"""


def _run_shell(folder: Path, tmp_path: Path, with_trtexec: bool = True) -> tuple[subprocess.CompletedProcess, list]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if with_trtexec:
        (bin_dir / "trtexec").write_text(FAKE_TRTEXEC)
        (bin_dir / "trtexec").chmod(0o755)
    log = tmp_path / "trtexec.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TRTEXEC_LOG": str(log), "LC_ALL": "C"}
    # Run from elsewhere: the script must find its files relative to itself.
    result = subprocess.run(
        ["bash", str(folder / "build_engine.sh")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    calls = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def test_shell_script_runs_build_then_profile(written, tmp_path):
    settings, folder, manifest, _ = written
    result, calls = _run_shell(folder, tmp_path)
    assert result.returncode == 0, result.stderr
    assert [c[0] for c in calls] == [str(folder), str(folder)]
    assert [c[1:] for c in calls] == [manifest["trtexec"]["build"][1:], manifest["trtexec"]["profile"][1:]]


def test_shell_script_refuses_a_changed_onnx(written, tmp_path):
    _, folder, manifest, _ = written
    onnx_file = folder / manifest["onnx"]["file"]
    with open(onnx_file, "ab") as f:
        f.write(b"\0")
    result, calls = _run_shell(folder, tmp_path)
    assert result.returncode == 1 and calls == []
    assert f"{onnx_file.name} does not match the sha256 in manifest.json" in result.stderr


def test_shell_script_needs_trtexec(written, tmp_path):
    _, folder, _, _ = written
    result, calls = _run_shell(folder, tmp_path, with_trtexec=False)
    assert result.returncode == 127 and calls == []
    assert "trtexec is not on PATH" in result.stderr and "/usr/src/tensorrt/bin" in result.stderr


# --------------------------------------------------------------------------------------
# Running build_engine.py with the fake tensorrt module (and no medkd)
# --------------------------------------------------------------------------------------


def _python_env(tmp_path: Path, settings, tensorrt_source: str) -> dict:
    site = tmp_path / "device-site"
    (site / "medkd").mkdir(parents=True, exist_ok=True)
    (site / "medkd" / "__init__.py").write_text("raise ImportError('the bundle must not need medkd')\n")
    (site / "tensorrt.py").write_text(tensorrt_source)
    return {
        **os.environ,
        "PYTHONPATH": str(site),
        "FAKE_TENSORRT_VERSION": f"{settings.tensorrt_version}.0.7",
    }


def _run_python(folder: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(folder / "build_engine.py"), *args], env=env, capture_output=True, text=True
    )


def test_python_script_builds_as_the_manifest_says(written, tmp_path):
    settings, folder, manifest, _ = written
    env = _python_env(tmp_path, settings, FAKE_TENSORRT_SOURCE)
    result = _run_python(folder, env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    engine_file = folder / manifest["engine_files"]["engine"]
    assert summary["engine"] == str(engine_file) and summary["engine_sha256"] == _sha256(engine_file)
    assert summary["tensorrt_version"] == f"{settings.tensorrt_version}.0.7"
    built = json.loads(engine_file.read_text())
    assert built["network_flags"] == (2 if settings.strongly_typed else 0)
    assert built["builder_flags"] == list(settings.builder_flags) + (["GPU_FALLBACK"] if settings.gpu_fallback else [])
    assert built["device"] == ("GPU" if settings.dla_core is None else "DLA")
    assert built["profiles"][0]["max"] == [settings.max_batch, *SHAPE]
    assert (folder / "timing.cache").read_bytes() == b"|timed"
    # The engine and cache written beside the bundle do not invalidate it.
    verify_bundle(folder)


def test_python_script_refuses_changed_or_incomplete_bundles(written, tmp_path):
    settings, folder, manifest, _ = written
    env = _python_env(tmp_path, settings, "raise ImportError('libnvinfer.so.10: cannot open shared object file')\n")
    result = _run_python(folder, env)
    assert result.returncode == 1 and "tensorrt Python package is not installed" in result.stderr

    onnx_file = folder / manifest["onnx"]["file"]
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1])
    result = _run_python(folder, env)
    assert result.returncode == 1
    assert f"bundle file {onnx_file.name} was changed after it was written (sha256 mismatch)" in result.stderr

    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text.replace('"workspace_mib": 1024', '"workspace_mib": 4096'))
    result = _run_python(folder, env)
    assert result.returncode == 1 and "manifest.json was changed after it was written" in result.stderr


# --------------------------------------------------------------------------------------
# verify_bundle
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["onnx", "build_engine.sh", "build_engine.py"])
def test_tampering_one_byte_fails_verification(written, which):
    _, folder, manifest, _ = written
    name = manifest["onnx"]["file"] if which == "onnx" else which
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"^bundle file {name} was changed after it was written \(sha256 mismatch\)$"):
        verify_bundle(folder)


def test_missing_files_and_changed_manifest_fail_verification(written):
    _, folder, manifest, _ = written
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text.replace('"fp32": 0.912', '"fp32": 0.99'))
    with pytest.raises(UserError, match=r"^bundle file manifest.json was changed after it was written"):
        verify_bundle(folder)
    (folder / "manifest.json").write_text(text)
    (folder / "build_engine.py").unlink()
    with pytest.raises(UserError, match="^bundle file build_engine.py is missing$"):
        verify_bundle(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(UserError, match="manifest.json is missing"):
        verify_bundle(folder)


# --------------------------------------------------------------------------------------
# Atomic write
# --------------------------------------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_failure_mid_write_leaves_nothing(models, tmp_path, monkeypatch):
    settings = _settings("jetson-orin-int8")

    real_write = bundle_module._write

    def write(path, data, mode):
        # The ONNX and both scripts are already in the temp folder when the manifest fails.
        if path.name == "manifest.json":
            raise OSError("disk full while writing manifest.json")
        real_write(path, data, mode)

    monkeypatch.setattr(bundle_module, "_write", write)
    with pytest.raises(OSError, match="disk full"):
        write_bundle(tmp_path / "bundle", models["int8"], settings, EXTRA)
    assert not (tmp_path / "bundle").exists() and _leftovers(tmp_path) == []


def test_failed_rewrite_keeps_the_old_bundle(models, tmp_path, monkeypatch):
    old_settings = _settings("jetson-orin-int8")
    old = write_bundle(tmp_path / "bundle", models["int8"], old_settings, EXTRA)
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".tmp"):  # the finished new bundle moving into place
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(bundle_module.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        write_bundle(tmp_path / "bundle", models["fp16"], _settings("jetson-orin-dla-fp16"), EXTRA)
    monkeypatch.undo()
    assert verify_bundle(tmp_path / "bundle") == old and _leftovers(tmp_path) == []


def test_extra_may_repeat_reserved_values(models, tmp_path):
    settings = _settings("jetson-orin-int8")
    extra = {**EXTRA, "target": "jetson-orin", "precision": "int8", "model": "student"}
    manifest = write_bundle(tmp_path / "bundle", models["int8"], settings, extra)
    assert (manifest["target"], manifest["precision"], manifest["model"]) == ("jetson-orin", "int8", "student")


def test_rewrite_replaces_an_existing_bundle(models, tmp_path):
    write_bundle(tmp_path / "bundle", models["int8"], _settings("jetson-orin-int8"), EXTRA)
    (tmp_path / "bundle" / "model.int8.engine").write_bytes(b"stale engine built on the device")
    new = write_bundle(tmp_path / "bundle", models["fp16"], _settings("datacenter-gpu-fp16"), {})
    assert verify_bundle(tmp_path / "bundle") == new and new["precision"] == "fp16"
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == sorted(
        ["model.fp16.onnx", *SCRIPTS, "manifest.json"]
    )
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "precision_onnx,case,extra,message",
    [
        ("fp32", "jetson-orin-int8", {}, "precision int8 needs an explicit Q/DQ ONNX; model.onnx has no"),
        ("int8", "datacenter-gpu-fp16", {}, "model.int8.onnx is quantized"),
        ("int8", "jetson-orin-int8", {"files": {}}, "cannot change reserved manifest key"),
        ("int8", "jetson-orin-int8", {"precision": "fp16"}, r"cannot change reserved manifest key\(s\): precision"),
        ("int8", "jetson-orin-int8", {"when": object()}, "JSON-serialisable"),
        ("int8", "jetson-orin-int8", {"threshold": float("nan")}, "JSON-serialisable"),
    ],
)
def test_write_bundle_refuses_bad_inputs(models, tmp_path, precision_onnx, case, extra, message):
    with pytest.raises(UserError, match=message):
        write_bundle(tmp_path / "bundle", models[precision_onnx], _settings(case), extra)
    assert not (tmp_path / "bundle").exists() and _leftovers(tmp_path) == []


def test_write_bundle_refuses_mismatched_shapes_and_paths(models, tmp_path):
    big = builder_settings("10.3", target("jetson-orin"), "int8", (3, 32, 32))
    with pytest.raises(UserError, match=r"has shape \['batch', 3, 16, 16\]; the builder settings expect N x 3 x 32 x 32"):
        write_bundle(tmp_path / "bundle", models["int8"], big, {})
    settings = _settings("jetson-orin-int8")
    with pytest.raises(UserError, match="ONNX model not found"):
        write_bundle(tmp_path / "bundle", tmp_path / "absent.onnx", settings, {})
    spaced = tmp_path / "my model.onnx"
    shutil.copyfile(models["int8"], spaced)
    with pytest.raises(UserError, match="must be plain"):
        write_bundle(tmp_path / "bundle", spaced, settings, {})
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a medkd bundle; refusing to replace it"):
        write_bundle(tmp_path / "results", models["int8"], settings, {})
    assert (tmp_path / "results" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "bundle").exists()
