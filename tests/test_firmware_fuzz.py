"""Fuzz the C container reader under AddressSanitizer + UndefinedBehaviorSanitizer, and
check that it and the Python reader give the same verdict on every input.

The corpus (fixed seed) starts from real containers written by `write_firmware_blob`
(a small ONNX model, and an engine-kind payload that needs no padding) and mutates them:
bit flips, byte overwrites, truncation, extension, header fields set to edge values with
the header CRC fixed up (so the edit reaches the later checks), payload edits with the
CRC-32 fixed up (only the SHA-256 prefix can catch them) or with every checksum fixed up
(a valid container the readers must accept), plus random bytes with and without a valid
header. `runtime/fuzz_medkd_blob.c` runs all of them in one process, each input in a heap
block of exactly its size, so any read outside it stops the run.

Agreement is checked per check, not just accept/reject: both readers make the same
checks in the same order (export/firmware.py's module doc), so for every input the C
return code must name the same failed check as the Python `FirmwareBlobError.check`.
There are no documented exceptions: the only place the readers could differ is a payload
size above SIZE_MAX on a 32-bit target, where C's `size - 48` bound still rejects it.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from medkd.export.firmware import (
    BLOB_CHECKS,
    HEADER_SIZE,
    FirmwareBlobError,
    parse_firmware_blob,
    write_firmware_blob,
)

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "runtime"
SEED = 20240611
FUZZ_TIME_LIMIT_S = 30
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g", "-O1"]
# Any report (leaks included) ends the run with a non-zero status.
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=1:exitcode=86",
                 "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}

# runtime/medkd_blob.h's MEDKD_BLOB_E* codes, named like FirmwareBlobError.check.
C_CODES = {0: "ok", -2: "truncated", -3: "magic", -4: "version", -9: "header-crc", -5: "header-size",
           -10: "flags", -7: "kind", -6: "payload-size", -11: "trailing", -8: "crc", -12: "sha256"}


def _sanitizer_skip_reason(tmp: Path) -> str | None:
    """None when gcc can build and run an ASan+UBSan program here, else why not."""
    if shutil.which("gcc") is None:
        return "needs gcc (with libasan and libubsan) for the sanitizer fuzz test"
    probe = tmp / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    built = subprocess.run(["gcc", *SANITIZE, str(probe), "-o", str(tmp / "probe")],
                           capture_output=True, text=True, timeout=60)
    if built.returncode != 0:
        first = (built.stderr.strip().splitlines() or ["?"])[0]
        return f"gcc cannot link -fsanitize=address,undefined (sanitizer runtime missing?): {first}"
    ran = subprocess.run([str(tmp / "probe")], capture_output=True, text=True, timeout=60)
    if ran.returncode != 0:
        return f"an AddressSanitizer program cannot run here: {ran.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="module")
def fuzz_driver(tmp_path_factory) -> Path:
    """runtime/fuzz_medkd_blob.c + the reader, built with ASan and UBSan."""
    tmp = tmp_path_factory.mktemp("fuzz_build")
    reason = _sanitizer_skip_reason(tmp)
    if reason:
        pytest.skip(reason)
    exe = tmp / "fuzz_medkd_blob"
    sources = [RUNTIME / name for name in ("fuzz_medkd_blob.c", "medkd_blob.c", "medkd_sha256.c")]
    built = subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", *SANITIZE, f"-I{RUNTIME}",
                            *map(str, sources), "-o", str(exe)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    return exe


def _run_driver(exe: Path, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          timeout=FUZZ_TIME_LIMIT_S, env={**os.environ, **SANITIZER_ENV, **env})


def test_driver_is_sanitized(fuzz_driver):
    """The fuzz run is only worth something if the sanitizers are really linked in."""
    asan_help = _run_driver(fuzz_driver, "--sha256", ASAN_OPTIONS="help=1")
    assert asan_help.returncode == 0, asan_help.stderr
    assert "Available flags for AddressSanitizer" in asan_help.stdout + asan_help.stderr


def test_c_sha256_matches_hashlib(fuzz_driver, tmp_path):
    """Empty, one block, every padding edge (55/56/63/64 bytes: the length field spills
    into a second block at 56) and multi-block inputs, hashed by the sanitized build."""
    rng = random.Random(SEED)
    sizes = [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 4096, 100_003]
    paths = []
    for size in sizes:
        path = tmp_path / f"in{size}.bin"
        path.write_bytes(rng.randbytes(size))
        paths.append(path)
    out = _run_driver(fuzz_driver, "--sha256", *paths)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


# ----------------------------------------------------------------------------- corpus


def _tiny_onnx(path: Path) -> Path:
    """A real (small) ONNX model: Gemm + Relu with a 16x4 weight."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(SEED)
    weight = numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _fix_header_crc(raw: bytearray) -> bytearray:
    struct.pack_into("<I", raw, 44, zlib.crc32(bytes(raw[:44])))
    return raw


def _fix_payload_sums(raw: bytearray, sha: bool) -> bytearray:
    """Recompute the payload CRC-32 (and SHA-256 prefix) for the payload the header's size
    field now describes, then the header CRC."""
    (size,) = struct.unpack_from("<Q", raw, 16)
    payload = bytes(raw[HEADER_SIZE : HEADER_SIZE + size])
    struct.pack_into("<I", raw, 24, zlib.crc32(payload))
    if sha:
        raw[28:44] = hashlib.sha256(payload).digest()[:16]
    return _fix_header_crc(raw)


def _edge_values(container: bytes) -> dict[tuple[str, int], list[int]]:
    n = len(container)
    return {
        ("<H", 4): [0, 1, 3, 0x0102, 0xFFFF],  # version
        ("<H", 6): [0, 3, 0x0101, 0xFFFF],  # kind
        ("<I", 8): [0, 16, 32, 47, 49, 64, n, n + 16, 2**31, 2**32 - 1],  # header size
        ("<I", 12): [1, 2, 0x100, 2**31],  # flags
        ("<Q", 16): [0, 1, 15, n - 64, n - 49, n - 48, n - 47, n - 33, n - 32, n, 2**32, 2**32 + n - 48,
                     2**63, 2**64 - 1, 2**64 - 48],  # payload size
    }


def _mutate(rng: random.Random, container: bytes) -> bytes:
    raw = bytearray(container)
    op = rng.randrange(12)
    # Ops 4-10 edit a header and payload: on an input already cut short, extend instead.
    whole = len(raw) >= HEADER_SIZE + 32 and 0 < struct.unpack_from("<Q", raw, 16)[0] <= len(raw) - HEADER_SIZE
    if 4 <= op <= 10 and not whole:
        op = 3
    if op == 0:  # a few bit flips anywhere
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif op == 1:  # overwrite bytes with edge values; in the header, often with its CRC fixed up
        in_header = rng.random() < 0.5
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(min(len(raw), HEADER_SIZE - 4) if in_header else len(raw))
            raw[at] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        if in_header and len(raw) >= HEADER_SIZE:
            _fix_header_crc(raw)
    elif op == 2:  # truncate
        del raw[rng.randrange(len(raw)):]
    elif op == 3:  # extend with zeros or noise
        raw += bytes(rng.randint(1, 40)) if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 40))
    elif op in (4, 5, 6):  # a header field set to an edge value, header CRC fixed up
        (fmt, offset), values = rng.choice(list(_edge_values(container).items()))
        value = rng.choice(values + [rng.randrange(256 ** struct.calcsize(fmt))])
        struct.pack_into(fmt, raw, offset, value % 256 ** struct.calcsize(fmt))
        _fix_header_crc(raw)
    elif op == 7:  # payload edit with its CRC-32 fixed: only the SHA-256 prefix can tell
        raw[HEADER_SIZE + rng.randrange(struct.unpack_from("<Q", raw, 16)[0])] ^= 1 << rng.randrange(8)
        _fix_payload_sums(raw, sha=False)
    elif op == 8:  # payload edit with every checksum fixed: a valid container
        raw[HEADER_SIZE + rng.randrange(struct.unpack_from("<Q", raw, 16)[0])] ^= 1 << rng.randrange(8)
        _fix_payload_sums(raw, sha=True)
    elif op == 9:  # resize the payload and say so in the header, sums fixed
        size = rng.randint(1, len(raw) - HEADER_SIZE + 32)
        raw = raw[: HEADER_SIZE + size] + bytes(max(0, HEADER_SIZE + size - len(raw)))
        raw += bytes(rng.choice((0, (-len(raw)) % 16, rng.randint(0, 17))))
        struct.pack_into("<Q", raw, 16, size)
        _fix_payload_sums(raw, sha=rng.random() < 0.8)
    elif op == 10:  # random header fields behind a valid magic, version and header CRC
        raw[6:44] = rng.randbytes(38)
        if rng.random() < 0.5:
            struct.pack_into("<IIQ", raw, 8, HEADER_SIZE, 0, rng.randint(0, len(raw)))
        _fix_header_crc(raw)
    else:  # two mutations in a row
        return _mutate(rng, _mutate(rng, container))
    return bytes(raw)


def _corpus(containers: list[bytes], rng: random.Random, count: int) -> list[bytes]:
    inputs = list(containers) + [b"", b"MKDB", containers[0][:HEADER_SIZE], containers[0][: HEADER_SIZE - 1]]
    while len(inputs) < count:
        roll = rng.random()
        if roll < 0.05:  # plain noise
            inputs.append(rng.randbytes(rng.randint(0, 200)))
        elif roll < 0.08:  # noise behind the magic and version
            inputs.append(b"MKDB\x02\x00" + rng.randbytes(rng.randint(0, 120)))
        else:
            inputs.append(_mutate(rng, rng.choice(containers)))
    return inputs


def _python_verdict(data: bytes) -> str:
    try:
        header, payload = parse_firmware_blob(data, "input")
    except FirmwareBlobError as e:
        return e.check
    return f"ok {header['kind_code']} {len(payload)}"


def _c_verdict(line: str) -> str:
    code, *rest = line.split()
    return " ".join([C_CODES[int(code)], *rest])


def test_c_codes_name_every_python_check():
    """Every check has one C code and one Python name (EARG, a NULL pointer, is C-only)."""
    assert set(C_CODES.values()) == {"ok", *BLOB_CHECKS}
    header = (RUNTIME / "medkd_blob.h").read_text()
    codes = {int(code) for code in re.findall(r"#define MEDKD_BLOB_E[A-Z0-9]+ \((-\d+)\)", header)}
    assert codes == set(C_CODES) - {0} | {-1}


def test_fuzzed_containers_under_sanitizers_agree_with_python(fuzz_driver, tmp_path):
    onnx_blob = write_firmware_blob(_tiny_onnx(tmp_path / "tiny.onnx"), tmp_path / "fw", kind="onnx")
    engine = tmp_path / "model.engine"
    engine.write_bytes(random.Random(SEED).randbytes(512))  # 48 + 512: no padding
    engine_blob = write_firmware_blob(engine, tmp_path / "fw", kind="tensorrt-engine", symbol="engine")
    containers = [Path(b["bin"]).read_bytes() for b in (onnx_blob, engine_blob)]
    assert onnx_blob["payload_size"] % 16 and onnx_blob["container_size"] % 16 == 0  # has padding

    inputs = _corpus(containers, random.Random(SEED), count=40_000)
    corpus = tmp_path / "corpus.bin"
    corpus.write_bytes(b"".join(struct.pack("<I", len(data)) + data for data in inputs))

    start = time.monotonic()
    run = _run_driver(fuzz_driver, corpus)
    elapsed = time.monotonic() - start
    assert run.returncode == 0, f"sanitizer or invariant failure (rc {run.returncode}):\n{run.stderr[-4000:]}"
    assert "runtime error" not in run.stderr and "Sanitizer" not in run.stderr, run.stderr[-4000:]
    c_verdicts = [_c_verdict(line) for line in run.stdout.splitlines()]
    assert len(c_verdicts) == len(inputs)

    py_verdicts = [_python_verdict(data) for data in inputs]
    disagree = [(i, c, p) for i, (c, p) in enumerate(zip(c_verdicts, py_verdicts)) if c != p]
    assert not disagree, f"{len(disagree)} inputs judged differently (index, C, Python): {disagree[:10]}"

    # The corpus must reach every check, and accept some mutated (re-summed) containers.
    seen = {v.split()[0] for v in py_verdicts}
    assert seen == {"ok", *BLOB_CHECKS}, sorted(seen)
    accepted_mutants = [d for d, v in zip(inputs, py_verdicts) if v.startswith("ok") and d not in containers]
    assert accepted_mutants
    print(f"fuzz: {len(inputs)} inputs in {elapsed:.1f} s under ASan+UBSan, "
          f"{sum(v.startswith('ok') for v in py_verdicts)} accepted, verdicts agree")
