"""Firmware container (MKDB): Python writer/reader and the C runtime that validates it."""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from medkd.export.firmware import HEADER_SIZE, MAGIC, read_firmware_blob, write_firmware_blob
from medkd.toolchain.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _payload(tmp_path: Path, n: int = 3001, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes((i * 131 + 7) % 251 for i in range(n)))  # size not a multiple of 16
    return path


def test_round_trip_header_and_files(tmp_path):
    src = _payload(tmp_path)
    payload = src.read_bytes()
    out = write_firmware_blob(src, tmp_path / "fw", kind="onnx")

    fw = tmp_path / "fw"
    assert sorted(p.name for p in fw.iterdir()) == ["medkd_model.bin", "medkd_model.c", "medkd_model.h"]
    assert out["bin"] == str(fw / "medkd_model.bin")
    assert out["kind"] == "onnx" and out["kind_code"] == 1 and out["format_version"] == 1
    assert out["payload_size"] == len(payload)
    assert out["crc32"] == zlib.crc32(payload)
    assert out["sha256"] == hashlib.sha256(payload).hexdigest()

    raw = (fw / "medkd_model.bin").read_bytes()
    assert len(raw) == out["container_size"] and len(raw) % 16 == 0
    assert raw[:4] == MAGIC and raw[HEADER_SIZE : HEADER_SIZE + len(payload)] == payload
    assert raw[HEADER_SIZE + len(payload) :] == b"\0" * (len(raw) - HEADER_SIZE - len(payload))
    # documented layout, decoded independently of the module's struct
    assert struct.unpack_from("<HHIIQII", raw, 4) == (1, 1, 48, 0, len(payload), zlib.crc32(payload), 0)
    assert raw[32:48] == hashlib.sha256(payload).digest()[:16]

    header, got = read_firmware_blob(fw / "medkd_model.bin")
    assert got == payload
    assert header["kind"] == "onnx" and header["format_version"] == 1 and header["header_size"] == 48
    assert header["payload_size"] == len(payload) and header["crc32"] == out["crc32"]
    assert header["container_size"] == len(raw)

    h = (fw / "medkd_model.h").read_text()
    assert "extern const unsigned char medkd_model[];" in h
    assert "extern const unsigned long medkd_model_size;" in h


def test_engine_kind_and_custom_symbol(tmp_path):
    src = _payload(tmp_path, 64, "model.engine")  # payload already 16-aligned: no padding
    out = write_firmware_blob(src, tmp_path / "fw", kind="tensorrt-engine", symbol="seg_v2")
    assert Path(out["bin"]).name == "seg_v2.bin" and out["container_size"] == HEADER_SIZE + 64
    header, payload = read_firmware_blob(out["bin"])
    assert header["kind"] == "tensorrt-engine" and header["kind_code"] == 2 and payload == src.read_bytes()


def test_corrupted_payload_byte_fails_crc(tmp_path):
    out = write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="onnx")
    raw = bytearray(Path(out["bin"]).read_bytes())
    raw[HEADER_SIZE + 1000] ^= 0x01
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="CRC"):
        read_firmware_blob(bad)


@pytest.mark.parametrize("keep", [20, HEADER_SIZE + 100])
def test_truncated_blob(tmp_path, keep):
    out = write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="onnx")
    cut = tmp_path / "cut.bin"
    cut.write_bytes(Path(out["bin"]).read_bytes()[:keep])
    with pytest.raises(UserError, match="truncated"):
        read_firmware_blob(cut)


def test_bad_magic_and_missing_blob(tmp_path):
    out = write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="onnx")
    raw = bytearray(Path(out["bin"]).read_bytes())
    raw[:4] = b"ONNX"
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="magic"):
        read_firmware_blob(bad)
    with pytest.raises(UserError, match="not found"):
        read_firmware_blob(tmp_path / "nope.bin")


@pytest.mark.parametrize("symbol", ["", "1model", "my-model", "model.v1", "int", "a b"])
def test_bad_symbol(tmp_path, symbol):
    with pytest.raises(UserError, match="C identifier"):
        write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="onnx", symbol=symbol)
    assert not (tmp_path / "fw").exists()


def test_missing_empty_payload_and_bad_kind(tmp_path):
    with pytest.raises(UserError, match="not found"):
        write_firmware_blob(tmp_path / "missing.onnx", tmp_path / "fw", kind="onnx")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        write_firmware_blob(empty, tmp_path / "fw", kind="onnx")
    with pytest.raises(UserError, match="kind"):
        write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="tflite")


def test_c_array_decodes_to_container(tmp_path):
    out = write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="onnx")
    src = Path(out["source"]).read_text()
    raw = Path(out["bin"]).read_bytes()
    assert "__attribute__((aligned(16)))" in src and "_Alignas(16)" in src
    assert f"medkd_model[{len(raw)}] = {{" in src
    assert f"const unsigned long medkd_model_size = {len(raw)}UL;" in src
    body = src[src.index("= {\n") + 4 : src.index("};")]
    lines = body.splitlines()
    assert all(len(line.split(",")) - 1 == 16 for line in lines)  # 16 bytes per line
    decoded = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2}),", body))
    assert decoded == raw


# ----------------------------------------------------------------------------- C runtime


def _c_compiler() -> str | None:
    return next((cc for cc in ("cc", "gcc", "clang") if shutil.which(cc)), None)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # legacy TorchScript ONNX exporter
@pytest.mark.skipif(shutil.which("cmake") is None or _c_compiler() is None, reason="needs cmake and a C compiler")
def test_c_runtime_validates_embedded_and_file_blobs(tmp_path):
    import torch
    from torch import nn

    onnx_path = tmp_path / "model.onnx"
    torch.onnx.export(nn.Linear(8, 4).eval(), (torch.randn(1, 8),), str(onnx_path), dynamo=False)
    out = write_firmware_blob(onnx_path, tmp_path / "fw", kind="onnx")
    assert 100 < out["payload_size"] < 64_000

    build = tmp_path / "build"
    run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)  # noqa: E731
    cfg = run("cmake", "-S", str(REPO), "-B", str(build), f"-DMEDKD_EMBEDDED_BLOB_DIR={tmp_path / 'fw'}")
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    bld = run("cmake", "--build", str(build), "--target", "medkd_embedded_check", "medkd_blob_inspect")
    assert bld.returncode == 0, bld.stdout + bld.stderr
    assert "warning" not in (bld.stdout + bld.stderr).lower(), bld.stdout + bld.stderr

    check = run(str(build / "medkd_embedded_check"))
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith(f"ok kind=onnx payload={out['payload_size']} crc=0x{out['crc32']:08x}")
    assert "aligned16=1" in check.stdout

    good = run(str(build / "medkd_blob_inspect"), out["bin"])
    assert good.returncode == 0, good.stderr
    assert f"kind=onnx version=1 payload={out['payload_size']} crc=0x{out['crc32']:08x}" in good.stdout

    raw = bytearray(Path(out["bin"]).read_bytes())
    raw[HEADER_SIZE + 10] ^= 0xFF
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(bytes(raw))
    bad = run(str(build / "medkd_blob_inspect"), str(corrupt))
    assert bad.returncode != 0
    assert "crc" in bad.stderr.lower()

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(bytes(raw[:40]))
    cut = run(str(build / "medkd_blob_inspect"), str(truncated))
    assert cut.returncode != 0 and "truncated" in cut.stderr

    ctest = run("ctest", "--output-on-failure", cwd=build)
    assert ctest.returncode == 0, ctest.stdout + ctest.stderr
