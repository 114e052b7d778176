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

from medkd.export.firmware import (
    BLOB_CHECKS,
    HEADER_SIZE,
    MAGIC,
    FirmwareBlobError,
    parse_firmware_blob,
    read_firmware_blob,
    write_firmware_blob,
)
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
    assert sorted(p.name for p in fw.iterdir()) == ["medkd_model.S", "medkd_model.bin", "medkd_model.h"]
    assert out["bin"] == str(fw / "medkd_model.bin") and out["asm"] == str(fw / "medkd_model.S")
    assert out["source"] is None and out["manifest"] is None
    assert out["kind"] == "onnx" and out["kind_code"] == 1 and out["format_version"] == 2
    assert out["payload_size"] == len(payload)
    assert out["crc32"] == zlib.crc32(payload)
    assert out["sha256"] == hashlib.sha256(payload).hexdigest()

    raw = (fw / "medkd_model.bin").read_bytes()
    assert len(raw) == out["container_size"] and len(raw) % 16 == 0
    assert raw[:4] == MAGIC and raw[HEADER_SIZE : HEADER_SIZE + len(payload)] == payload
    assert raw[HEADER_SIZE + len(payload) :] == b"\0" * (len(raw) - HEADER_SIZE - len(payload))
    # documented layout, decoded independently of the module's struct
    assert struct.unpack_from("<HHIIQI", raw, 4) == (2, 1, 48, 0, len(payload), zlib.crc32(payload))
    assert raw[28:44] == hashlib.sha256(payload).digest()[:16]
    assert struct.unpack_from("<I", raw, 44)[0] == zlib.crc32(raw[:44])  # header CRC

    header, got = read_firmware_blob(fw / "medkd_model.bin")
    assert got == payload
    assert header["kind"] == "onnx" and header["format_version"] == 2 and header["header_size"] == 48
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


def _with_header_crc(raw: bytearray) -> bytes:
    """`raw` with its header CRC recomputed, so a header edit reaches the later checks."""
    struct.pack_into("<I", raw, 44, zlib.crc32(bytes(raw[:44])))
    return bytes(raw)


def _edited_blob(tmp_path: Path, edit, fix_header_crc: bool = True) -> Path:
    out = write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="onnx")
    raw = bytearray(Path(out["bin"]).read_bytes())
    raw = edit(raw) or raw
    bad = tmp_path / "edited.bin"
    bad.write_bytes(_with_header_crc(raw) if fix_header_crc else bytes(raw))
    return bad


def _pack(fmt: str, offset: int, value: int):
    return lambda raw: struct.pack_into(fmt, raw, offset, value)


@pytest.mark.parametrize("edit, fix_crc, check, message", [
    (lambda raw: raw.__setitem__(20, raw[20] ^ 1), False, "header-crc", "header CRC-32"),  # payload size bit
    (lambda raw: raw.__setitem__(30, raw[30] ^ 1), False, "header-crc", "header CRC-32"),  # SHA-256 prefix bit
    (_pack("<I", 8, 64), True, "header-size", "invalid header size 64"),
    (_pack("<I", 12, 1), True, "flags", "unknown header flags 0x00000001"),
    (_pack("<I", 12, 0x80000000), True, "flags", "unknown header flags"),
    (_pack("<H", 6, 3), True, "kind", "unknown kind code 3"),
    (_pack("<Q", 16, 0), True, "payload-size", "empty payload"),
    (_pack("<Q", 16, 2**64 - 1), True, "payload-size", "truncated"),
    (_pack("<Q", 16, 3000), True, "trailing", "bytes after its payload"),  # one payload byte left over
    (lambda raw: raw + b"\0" * 16, False, "trailing", "23 bytes after its payload"),
    (lambda raw: raw.__setitem__(-1, 1), False, "trailing", "expected 7 zero padding bytes"),
    (lambda raw: raw.__setitem__(30, raw[30] ^ 1), True, "sha256", "SHA-256"),
])
def test_header_edits_are_rejected(tmp_path, edit, fix_crc, check, message):
    """Every header field is checked: flips without a fixed-up header CRC fail that CRC,
    edits with one fail the field's own check (3001-byte payload: 7 padding bytes)."""
    bad = _edited_blob(tmp_path, edit, fix_crc)
    with pytest.raises(FirmwareBlobError, match=re.escape(message)) as err:
        read_firmware_blob(bad)
    assert err.value.check == check and isinstance(err.value, UserError)
    assert "\n" not in str(err.value)


def test_payload_with_matching_crc_fails_sha256(tmp_path):
    """A payload change that keeps the CRC-32 (fixed up in the header) is caught by the
    SHA-256 prefix."""
    def edit(raw):
        raw[HEADER_SIZE] ^= 0xFF
        struct.pack_into("<I", raw, 24, zlib.crc32(bytes(raw[HEADER_SIZE : HEADER_SIZE + 3001])))
    with pytest.raises(FirmwareBlobError, match="SHA-256") as err:
        read_firmware_blob(_edited_blob(tmp_path, edit))
    assert err.value.check == "sha256"


@pytest.mark.parametrize("version", [0, 1, 3, 0xFFFF])
def test_unknown_versions_are_rejected_in_one_line(tmp_path, version):
    bad = _edited_blob(tmp_path, _pack("<H", 4, version))
    with pytest.raises(UserError, match=f"format version {version}, but this medkd reads version 2 only") as err:
        read_firmware_blob(bad)
    assert err.value.check == "version" and "\n" not in str(err.value)


def test_parse_firmware_blob_in_memory(tmp_path):
    out = write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="tensorrt-engine")
    header, payload = parse_firmware_blob(Path(out["bin"]).read_bytes())
    assert header["kind"] == "tensorrt-engine" and payload == _payload(tmp_path).read_bytes()
    with pytest.raises(FirmwareBlobError, match="^engine.bin is truncated: 3 bytes") as err:
        parse_firmware_blob(b"MKD", "engine.bin")
    assert err.value.check == "truncated" and err.value.check in BLOB_CHECKS


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
    out = write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="onnx", c_source=True)
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


@pytest.mark.parametrize("symbol", ["medkd_model", "seg_v2"])
def test_asm_source_incbins_the_bin(tmp_path, symbol):
    out = write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="onnx", symbol=symbol)
    asm = Path(out["asm"]).read_text()
    assert Path(out["asm"]).name == f"{symbol}.S"
    elf = asm[asm.index("#if defined(__ELF__)") : asm.index("#elif defined(__APPLE__)")]
    for line in (
        f'.section .rodata.{symbol},"a",%progbits',
        ".balign 16",
        f".globl {symbol}\n",
        f".type {symbol}, %object",
        f"{symbol}:\n        .incbin \"{symbol}.bin\"\n.L{symbol}_end:",
        f".size {symbol}, .L{symbol}_end - {symbol}",
        f".globl {symbol}_size",
        f".type {symbol}_size, %object",
        f"#if __SIZEOF_LONG__ == 8\n        .quad .L{symbol}_end - {symbol}\n#else\n"
        f"        .long .L{symbol}_end - {symbol}\n#endif",
        f".size {symbol}_size, __SIZEOF_LONG__",
        '.section .note.GNU-stack,"",%progbits',
    ):
        assert line in elf, line
    assert elf.index(".balign 16") < elf.index(".incbin")
    assert f"_{symbol}:" in asm and "__TEXT,__const" in asm  # Mach-O branch
    assert "#error" in asm  # other object formats: use the C array form


def test_optional_outputs_and_stale_ones_removed(tmp_path):
    fw = tmp_path / "fw"
    write_firmware_blob(_payload(tmp_path), fw, kind="onnx", c_source=True)
    assert sorted(p.name for p in fw.iterdir()) == [f"medkd_model{e}" for e in (".S", ".bin", ".c", ".h")]
    out = write_firmware_blob(_payload(tmp_path), fw, kind="onnx", asm_source=False)
    assert out["asm"] is None and out["source"] is None
    assert sorted(p.name for p in fw.iterdir()) == ["medkd_model.bin", "medkd_model.h"]


def test_manifest_travels_beside_blob(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"model": "model.onnx", "classes": ["a", "b"]}\n')
    fw = tmp_path / "fw"
    out = write_firmware_blob(_payload(tmp_path), fw, kind="onnx", manifest=manifest)
    assert out["manifest"] == str(fw / "medkd_model.manifest.json")
    assert Path(out["manifest"]).read_bytes() == manifest.read_bytes()
    # a later call without a manifest must not leave the old one beside a new blob
    assert write_firmware_blob(_payload(tmp_path), fw, kind="onnx")["manifest"] is None
    assert not (fw / "medkd_model.manifest.json").exists()


def test_bad_manifest(tmp_path):
    with pytest.raises(UserError, match="manifest not found"):
        write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="onnx", manifest=tmp_path / "nope.json")
    bad = tmp_path / "manifest.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="onnx", manifest=bad)
    assert not (tmp_path / "fw").exists()  # checked before anything is written


# ----------------------------------------------------------------------------- C runtime


def _c_compiler() -> str | None:
    return next((cc for cc in ("cc", "gcc", "clang") if shutil.which(cc)), None)


needs_cmake = pytest.mark.skipif(
    shutil.which("cmake") is None or _c_compiler() is None, reason="needs cmake and a C compiler"
)
needs_aarch64 = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("aarch64-linux-gnu-gcc") is None
    or shutil.which("qemu-aarch64") is None,
    reason="needs cmake, aarch64-linux-gnu-gcc and qemu-aarch64 (scripts/setup.sh installs them)",
)
AARCH64_TOOLCHAIN = REPO / "cmake" / "aarch64-linux-gnu.cmake"


def _run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)


def _configure(build: Path, blob_dir: Path, *options: str) -> subprocess.CompletedProcess:
    return _run("cmake", "-S", REPO, "-B", build, f"-DMEDKD_EMBEDDED_BLOB_DIR={blob_dir}", *options)


def _build(build: Path, *targets: str) -> None:
    """Build (all targets unless named) and require a warning-free log."""
    target_args = ["--target", *targets] if targets else []
    bld = _run("cmake", "--build", build, "-j2", *target_args)
    log = bld.stdout + bld.stderr
    assert bld.returncode == 0, log
    assert "warning" not in log.lower(), log


def _cmake_build(build: Path, blob_dir: Path, *options: str) -> None:
    cfg = _configure(build, blob_dir, *options)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    _build(build)


def _ctest(build: Path) -> subprocess.CompletedProcess:
    return _run("ctest", "--output-on-failure", "-V", cwd=build)


def _unwrapped(cmake_message: str) -> str:
    return " ".join(cmake_message.split())  # CMake wraps long messages


def _expected_check_line(out: dict) -> str:
    return f"ok kind={out['kind']} payload={out['payload_size']} crc=0x{out['crc32']:08x} aligned16=1"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # legacy TorchScript ONNX exporter
@needs_cmake
def test_c_runtime_validates_embedded_and_file_blobs(tmp_path):
    import torch
    from torch import nn

    onnx_path = tmp_path / "model.onnx"
    torch.onnx.export(nn.Linear(8, 4).eval(), (torch.randn(1, 8),), str(onnx_path), dynamo=False)
    out = write_firmware_blob(onnx_path, tmp_path / "fw", kind="onnx")
    assert 100 < out["payload_size"] < 64_000

    build = tmp_path / "build"
    _cmake_build(build, tmp_path / "fw")  # default form: medkd_model.S

    check = _run(build / "medkd_embedded_check")
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith(_expected_check_line(out))

    good = _run(build / "medkd_blob_inspect", out["bin"])
    assert good.returncode == 0, good.stderr
    assert (f"kind=onnx version=2 payload={out['payload_size']} crc=0x{out['crc32']:08x} "
            f"sha256_prefix={out['sha256'][:32]}") in good.stdout

    # The C reader rejects what the Python reader rejects, with the same reason.
    original = Path(out["bin"]).read_bytes()
    v1 = bytearray(original)
    struct.pack_into("<H", v1, 4, 1)
    for name, data, c_words in (("v1.bin", bytes(v1), "unsupported MKDB format version"),
                                ("trailing.bin", original + bytes(16), "trailing bytes"),
                                ("header.bin", original[:20] + b"\xff" + original[21:], "header crc32")):
        (tmp_path / name).write_bytes(data)
        rejected = _run(build / "medkd_blob_inspect", tmp_path / name)
        assert rejected.returncode == 1 and c_words in rejected.stderr, rejected.stderr
        with pytest.raises(FirmwareBlobError):
            read_firmware_blob(tmp_path / name)

    raw = bytearray(Path(out["bin"]).read_bytes())
    raw[HEADER_SIZE + 10] ^= 0xFF
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(bytes(raw))
    bad = _run(build / "medkd_blob_inspect", corrupt)
    assert bad.returncode != 0
    assert "crc" in bad.stderr.lower()

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(bytes(raw[:40]))
    cut = _run(build / "medkd_blob_inspect", truncated)
    assert cut.returncode != 0 and "truncated" in cut.stderr

    ctest = _run("ctest", "--output-on-failure", "-V", cwd=build)
    assert ctest.returncode == 0, ctest.stdout + ctest.stderr
    assert "ok sha256 and crc32 known answers" in ctest.stdout  # medkd_blob_selftest


def _elf_symbols(binary: Path) -> dict[str, str]:
    """{name: nm type letter}; R/r = read-only data."""
    nm = _run("nm", binary)
    assert nm.returncode == 0, nm.stderr
    return {f[2]: f[1] for f in (line.split() for line in nm.stdout.splitlines()) if len(f) == 3}


@needs_cmake
@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("readelf") is None, reason="needs binutils (nm, readelf)")
def test_host_build_links_asm_form_into_rodata(tmp_path):
    out = write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="tensorrt-engine")
    build = tmp_path / "build"
    _cmake_build(build, tmp_path / "fw")
    ctest = _ctest(build)
    assert ctest.returncode == 0, ctest.stdout + ctest.stderr
    assert _expected_check_line(out) in ctest.stdout

    check = build / "medkd_embedded_check"
    symbols = _elf_symbols(check)
    assert symbols["medkd_model"] == "R" and symbols["medkd_model_size"] == "R"
    stack = [line for line in _run("readelf", "-lW", check).stdout.splitlines() if "GNU_STACK" in line]
    assert stack and "RWE" not in stack[0], stack  # the .note.GNU-stack line keeps it non-executable


@needs_cmake
def test_corrupted_bin_fails_embedded_check(tmp_path):
    out = write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="onnx")
    bin_path = Path(out["bin"])
    good = bin_path.read_bytes()
    raw = bytearray(good)
    raw[HEADER_SIZE + 10] ^= 0xFF
    bin_path.write_bytes(bytes(raw))

    build = tmp_path / "build"
    _cmake_build(build, tmp_path / "fw")
    check = _run(build / "medkd_embedded_check")
    assert check.returncode == 1 and "crc" in check.stderr.lower(), check.stdout + check.stderr
    assert _ctest(build).returncode != 0

    # Truncated: the size comes from what .incbin embedded, so it is caught, not over-read;
    # the .bin is a build dependency of the .S, so no reconfigure is needed.
    bin_path.write_bytes(good[:1000])
    _build(build)
    check = _run(build / "medkd_embedded_check")
    assert check.returncode == 1 and "truncated" in check.stderr, check.stdout + check.stderr

    bin_path.write_bytes(good)
    _build(build)
    ctest = _ctest(build)
    assert ctest.returncode == 0 and _expected_check_line(out) in ctest.stdout, ctest.stdout + ctest.stderr


@needs_cmake
def test_c_array_form_builds(tmp_path):
    fw = tmp_path / "fw"
    out = write_firmware_blob(_payload(tmp_path), fw, kind="onnx", c_source=True, asm_source=False)
    build = tmp_path / "build"
    cfg = _configure(build, fw)  # default form is asm, and no .S was written
    assert cfg.returncode != 0 and "medkd_model.S not found" in _unwrapped(cfg.stderr), cfg.stderr
    cfg = _configure(build, fw, "-DMEDKD_EMBEDDED_FORM=cpp")
    assert cfg.returncode != 0 and "MEDKD_EMBEDDED_FORM must be asm or c" in _unwrapped(cfg.stderr), cfg.stderr

    _cmake_build(build, fw, "-DMEDKD_EMBEDDED_FORM=c")
    ctest = _ctest(build)
    assert ctest.returncode == 0, ctest.stdout + ctest.stderr
    assert _expected_check_line(out) in ctest.stdout


@needs_aarch64
def test_aarch64_cross_build_runs_under_qemu(tmp_path):
    out = write_firmware_blob(_payload(tmp_path), tmp_path / "fw", kind="tensorrt-engine")
    build = tmp_path / "build-aarch64"
    _cmake_build(build, tmp_path / "fw", f"-DCMAKE_TOOLCHAIN_FILE={AARCH64_TOOLCHAIN}")
    elf = (build / "medkd_embedded_check").read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and struct.unpack_from("<H", elf, 18)[0] == 183  # e_machine EM_AARCH64

    ctest = _ctest(build)
    assert ctest.returncode == 0, ctest.stdout + ctest.stderr
    assert "qemu-aarch64" in ctest.stdout  # ran through CMAKE_CROSSCOMPILING_EMULATOR
    assert _expected_check_line(out) in ctest.stdout
    assert "ok sha256 and crc32 known answers" in ctest.stdout  # SHA-256/CRC-32 right on aarch64 too
