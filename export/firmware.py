"""Firmware-embeddable model container (``MKDB``) and its C-source form.

`write_firmware_blob` packs an exported model file (ONNX, or a serialized TensorRT
engine) into a small versioned container that firmware links in as a read-only byte
array and validates before use; the C side lives in ``runtime/medkd_blob.{h,c}``
(portable C99, no dependencies). `read_firmware_blob` is the Python reader/validator.

Container layout (format version 2, all integers little-endian, header = 48 bytes):

==========  ======  ==========  ===============================================
offset      size    type        field
==========  ======  ==========  ===============================================
0           4       char[4]     magic ``b"MKDB"``
4           2       u16         format version (= 2)
6           2       u16         kind code: 1 = ``onnx``, 2 = ``tensorrt-engine``
8           4       u32         header size in bytes (= 48; payload starts here)
12          4       u32         flags (none defined yet: must be 0)
16          8       u64         payload size in bytes (unpadded, > 0)
24          4       u32         CRC-32 of the payload (``zlib.crc32``, IEEE 802.3)
28          16      u8[16]      first 16 bytes of the payload's SHA-256
44          4       u32         CRC-32 of header bytes 0..43
48          n       u8[n]       payload (the model file, byte for byte)
48 + n      0..15   u8[]        zero padding: the container size is a multiple of 16
==========  ======  ==========  ===============================================

Version 1 (no header CRC, SHA-256 prefix at 32, flags and trailing bytes ignored) is no
longer read: readers reject every version they do not know, so a change of layout always
comes with a new version. The header is 48 bytes, a multiple of 16, so a 16-byte aligned
container has a 16-byte aligned payload (both linkable forms below align it to 16).

Both readers - `read_firmware_blob` here and ``medkd_blob_open`` in C - make the same
checks in the same order, and a container passes only if every byte is accounted for:
size >= 48, magic, version, header CRC, header size, flags, kind, payload size (non-zero,
inside the file), exact container size with zero padding (no trailing bytes), payload
CRC-32, payload SHA-256 prefix. Magic and version come before the header CRC because they
say which layout the rest of the header has. ``tests/test_firmware_fuzz.py`` checks that
the two readers agree on every input of a sanitizer-instrumented fuzz run.

Files written by `write_firmware_blob` into ``out_dir``:

* ``<symbol>.bin`` - the raw container;
* ``<symbol>.h``   - ``extern const unsigned char <symbol>[];`` and
  ``extern const unsigned long <symbol>_size;``;
* ``<symbol>.S``   - (default) assembly that pulls ``<symbol>.bin`` in with ``.incbin``
  into a read-only section and defines both symbols; assemble it with the ``.bin``'s
  folder on the include path (``-I``). ELF (GNU as or clang, any arch) and Mach-O;
* ``<symbol>.c``   - (optional) the container as a 16-byte aligned C array, ~5x the
  model's size but needing only a C compiler;
* ``<symbol>.manifest.json`` - (optional) a copy of the model's manifest, so it travels
  with the blob.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import zlib
from pathlib import Path
from string import Template
from typing import Any

import numpy as np

from medkd.toolchain.atomic import atomic_path, atomic_save, atomic_write_text
from medkd.toolchain.errors import UserError

__all__ = [
    "BLOB_CHECKS",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "KIND_CODES",
    "MAGIC",
    "FirmwareBlobError",
    "parse_firmware_blob",
    "read_firmware_blob",
    "write_firmware_blob",
]

MAGIC = b"MKDB"
FORMAT_VERSION = 2
ALIGN = 16
# magic, version, kind, header_size, flags, payload_size, crc32, sha256[:16]; then the
# header's own CRC-32 over these 44 bytes
_HEADER_FIELDS = struct.Struct("<4sHHIIQI16s")
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER_FIELDS.size + _HEADER_CRC.size  # 48
assert HEADER_SIZE == 48 and HEADER_SIZE % ALIGN == 0

KIND_CODES: dict[str, int] = {"onnx": 1, "tensorrt-engine": 2}
_KIND_NAMES = {code: name for name, code in KIND_CODES.items()}

_C_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_C_KEYWORDS = frozenset(
    "auto break case char const continue default do double else enum extern float for goto "
    "if inline int long register restrict return short signed sizeof static struct switch "
    "typedef union unsigned void volatile while _Alignas _Alignof _Atomic _Bool _Complex "
    "_Generic _Imaginary _Noreturn _Static_assert _Thread_local".split()
)

# "0xHH," for every byte value, as a (256, 5) uint8 lookup table for fast C emission.
_HEX_LUT = np.frombuffer(
    b"".join(f"0x{i:02x},".encode() for i in range(256)), dtype=np.uint8
).reshape(256, 5)
_C_CHUNK_LINES = 65536  # 1 MiB of payload per vectorised chunk


def _check_symbol(symbol: str) -> str:
    if not isinstance(symbol, str) or not _C_IDENT.match(symbol) or symbol in _C_KEYWORDS:
        raise UserError(f"invalid firmware symbol {symbol!r}: must be a C identifier (e.g. medkd_model)")
    return symbol


def _padding(n: int) -> int:
    return (-n) % ALIGN


def _c_array_lines(data: bytes, f) -> None:
    """Write `data` as C initializer lines (``  0x..,`` x16) to the binary file `f`."""
    arr = np.frombuffer(data, dtype=np.uint8)
    full = len(arr) - len(arr) % 16
    for start in range(0, full, 16 * _C_CHUNK_LINES):
        block = arr[start : min(full, start + 16 * _C_CHUNK_LINES)].reshape(-1, 16)
        text = _HEX_LUT[block].reshape(len(block), 80)  # 16 * "0xHH,"
        lines = np.empty((len(block), 83), dtype=np.uint8)
        lines[:, 0:2] = ord(" ")
        lines[:, 2:82] = text
        lines[:, 82] = ord("\n")
        f.write(lines.tobytes())
    if full < len(arr):
        f.write(b"  " + b"".join(_HEX_LUT[b].tobytes() for b in arr[full:]) + b"\n")


def _header_text(symbol: str, kind: str, container_size: int, crc: int) -> str:
    guard = f"MEDKD_FIRMWARE_{symbol.upper()}_H"
    return (
        f"/* Generated by medkd.export.firmware - do not edit.\n"
        f" * MKDB container v{FORMAT_VERSION}: kind={kind}, {container_size} bytes, "
        f"payload crc32=0x{crc:08x}.\n"
        f" * Validate with medkd_blob_open() from runtime/medkd_blob.h. */\n"
        f"#ifndef {guard}\n#define {guard}\n\n"
        f"#ifdef __cplusplus\nextern \"C\" {{\n#endif\n\n"
        f"extern const unsigned char {symbol}[];\n"
        f"extern const unsigned long {symbol}_size;\n\n"
        f"#ifdef __cplusplus\n}}\n#endif\n\n#endif /* {guard} */\n"
    )


def _write_c_source(tmp: Path, symbol: str, container: bytes, kind: str, crc: int) -> None:
    prologue = (
        f"/* Generated by medkd.export.firmware - do not edit.\n"
        f" * MKDB container v{FORMAT_VERSION}: kind={kind}, {len(container)} bytes, "
        f"payload crc32=0x{crc:08x}. */\n"
        f'#include "{symbol}.h"\n\n'
        "#if defined(__GNUC__) || defined(__clang__)\n"
        "#define MEDKD_BLOB_ALIGN16 __attribute__((aligned(16)))\n"
        "#elif defined(_MSC_VER)\n"
        "#define MEDKD_BLOB_ALIGN16 __declspec(align(16))\n"
        "#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L\n"
        "#define MEDKD_BLOB_ALIGN16 _Alignas(16)\n"
        "#else\n"
        "#define MEDKD_BLOB_ALIGN16\n"
        "#endif\n\n"
        f"MEDKD_BLOB_ALIGN16 const unsigned char {symbol}[{len(container)}] = {{\n"
    )
    with open(tmp, "wb") as f:
        f.write(prologue.encode())
        _c_array_lines(container, f)
        f.write(f"}};\n\nconst unsigned long {symbol}_size = {len(container)}UL;\n".encode())


# <symbol>.S bodies; $sym is the C symbol. .S (capital) goes through the C preprocessor.
_SIZE_WORD = """\
#if __SIZEOF_LONG__ == 8
        .quad $end - $label
#else
        .long $end - $label
#endif
"""
_ASM_ELF = """\
/* %progbits/%object rather than @: @ starts a comment on 32-bit ARM, and GNU as
 * and clang accept % on every ELF target. */
        .section .rodata.$sym,"a",%progbits
        .globl $sym
        .type $sym, %object
        .balign 16
$sym:
        .incbin "$sym.bin"
.L${sym}_end:
        .size $sym, .L${sym}_end - $sym

        .globl ${sym}_size
        .type ${sym}_size, %object
        .balign 8
${sym}_size: /* unsigned long: 8 bytes on LP64, 4 on ILP32 */
${size_word}        .size ${sym}_size, __SIZEOF_LONG__

/* Without this note GNU ld assumes the object needs an executable stack. */
        .section .note.GNU-stack,"",%progbits
"""
_ASM_MACHO = """\
/* Mach-O: C symbols carry a leading underscore; no .type/.size or ELF notes. */
        .section __TEXT,__const
        .globl _$sym
        .balign 16
_$sym:
        .incbin "$sym.bin"
L${sym}_end:
        .globl _${sym}_size
        .balign 8
_${sym}_size:
${size_word}"""


def _asm_text(symbol: str, kind: str, container_size: int, crc: int) -> str:
    """``<symbol>.S``: the ``.bin`` via ``.incbin``, so the toolchain copies bytes rather
    than parsing a 5x-larger C array."""
    size_word = Template(_SIZE_WORD)
    elf = Template(_ASM_ELF).substitute(
        sym=symbol, size_word=size_word.substitute(end=f".L{symbol}_end", label=symbol)
    )
    macho = Template(_ASM_MACHO).substitute(
        sym=symbol, size_word=size_word.substitute(end=f"L{symbol}_end", label=f"_{symbol}")
    )
    return (
        f"/* Generated by medkd.export.firmware - do not edit.\n"
        f" * MKDB container v{FORMAT_VERSION}: kind={kind}, {container_size} bytes, "
        f"payload crc32=0x{crc:08x}.\n"
        f" * Links {symbol}.bin into read-only data as the symbols declared in {symbol}.h;\n"
        f" * assemble with the folder of {symbol}.bin on the include path (-I).\n"
        f" * {symbol}_size is measured from the bytes .incbin pulled in, so a truncated\n"
        f" * .bin is caught by medkd_blob_open instead of being read past its end. */\n"
        f"#if defined(__ELF__)\n{elf}#elif defined(__APPLE__)\n{macho}#else\n"
        f"#error {symbol}.S supports ELF and Mach-O targets only: use the C array form (c_source=True)\n"
        f"#endif\n"
    )


def _check_manifest(manifest: str | os.PathLike) -> bytes:
    path = Path(manifest)
    if not path.is_file():
        raise UserError(f"firmware manifest not found: {path}")
    data = path.read_bytes()
    try:
        json.loads(data)
    except ValueError as e:
        raise UserError(f"firmware manifest {path} is not valid JSON: {e}") from None
    return data


def _remove_stale(paths: list[Path]) -> None:
    """Drop optional outputs of an earlier call that this call did not ask for: a stale
    ``.c`` array or manifest beside a new ``.bin`` would describe a different model."""
    for path in paths:
        path.unlink(missing_ok=True)


def write_firmware_blob(
    payload_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    kind: str,
    symbol: str = "medkd_model",
    c_source: bool = False,
    asm_source: bool = True,
    manifest: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Pack `payload_path` into ``<symbol>.bin/.h`` (+ ``.S``/``.c``/manifest) under
    `out_dir` (layout and files: module doc).

    Returns a JSON-friendly dict: ``bin``, ``header``, ``asm``, ``source``, ``manifest``
    (paths as str; None for a file not written), ``symbol``, ``kind``, ``kind_code``,
    ``format_version``, ``payload_size``, ``container_size``, ``crc32`` (int), ``sha256``
    (hex of the full digest).

    ``asm_source`` (default) writes ``<symbol>.S``, which links the ``.bin`` with
    ``.incbin``; ``c_source`` writes the ``.c`` array (~5x the model's size) for
    toolchains without a GNU-style assembler. ``manifest`` (a JSON file) is copied beside
    the blob as ``<symbol>.manifest.json``. Optional files of an earlier call into the
    same folder that are not requested now are removed.
    """
    symbol = _check_symbol(symbol)
    if kind not in KIND_CODES:
        raise UserError(f"unknown firmware payload kind {kind!r}; expected one of {sorted(KIND_CODES)}")
    payload_path = Path(payload_path)
    if not payload_path.is_file():
        raise UserError(f"firmware payload not found: {payload_path}")
    payload = payload_path.read_bytes()
    if not payload:
        raise UserError(f"firmware payload is empty: {payload_path}")
    manifest_data = None if manifest is None else _check_manifest(manifest)

    crc = zlib.crc32(payload) & 0xFFFFFFFF
    sha = hashlib.sha256(payload).digest()
    fields = _HEADER_FIELDS.pack(MAGIC, FORMAT_VERSION, KIND_CODES[kind], HEADER_SIZE, 0, len(payload), crc, sha[:16])
    header = fields + _HEADER_CRC.pack(zlib.crc32(fields))
    container = header + payload + b"\0" * _padding(HEADER_SIZE + len(payload))

    out_dir = Path(out_dir)
    bin_path, h_path, s_path, c_path, m_path = (
        out_dir / f"{symbol}{ext}" for ext in (".bin", ".h", ".S", ".c", ".manifest.json")
    )
    atomic_save(bin_path, lambda tmp: tmp.write_bytes(container))
    atomic_write_text(h_path, _header_text(symbol, kind, len(container), crc))
    if asm_source:
        atomic_write_text(s_path, _asm_text(symbol, kind, len(container), crc))
    if c_source:
        with atomic_path(c_path) as tmp:
            _write_c_source(tmp, symbol, container, kind, crc)
    if manifest_data is not None:
        atomic_save(m_path, lambda tmp: tmp.write_bytes(manifest_data))
    wanted = {s_path: asm_source, c_path: c_source, m_path: manifest_data is not None}
    _remove_stale([path for path, keep in wanted.items() if not keep])
    return {
        "bin": str(bin_path),
        "header": str(h_path),
        "asm": str(s_path) if asm_source else None,
        "source": str(c_path) if c_source else None,
        "manifest": str(m_path) if manifest_data is not None else None,
        "symbol": symbol,
        "kind": kind,
        "kind_code": KIND_CODES[kind],
        "format_version": FORMAT_VERSION,
        "payload_size": len(payload),
        "container_size": len(container),
        "crc32": crc,
        "sha256": sha.hex(),
    }


class FirmwareBlobError(UserError):
    """A container that fails validation. ``check`` names the failed check, one of
    `BLOB_CHECKS` (the C reader's ``MEDKD_BLOB_E*`` codes, in the order both readers
    make them)."""

    def __init__(self, message: str, check: str):
        super().__init__(message)
        self.check = check


BLOB_CHECKS = ("truncated", "magic", "version", "header-crc", "header-size", "flags", "kind",
               "payload-size", "trailing", "crc", "sha256")


def parse_firmware_blob(data: bytes, name: str = "firmware blob") -> tuple[dict[str, Any], bytes]:
    """Validate the container `data` (checks and their order: module doc); return
    ``(header, payload)``. `name` starts every error message (e.g. the file's path).

    Raises `FirmwareBlobError` (a `UserError`) naming the first check that failed.
    """
    if len(data) < HEADER_SIZE:
        raise FirmwareBlobError(f"{name} is truncated: {len(data)} bytes < {HEADER_SIZE}-byte header", "truncated")
    if data[:4] != MAGIC:
        raise FirmwareBlobError(f"{name} is not a medkd firmware blob (magic {data[:4]!r}, expected {MAGIC!r})",
                                "magic")
    version = int.from_bytes(data[4:6], "little")
    if version != FORMAT_VERSION:
        raise FirmwareBlobError(
            f"{name} has MKDB format version {version}, but this medkd reads version {FORMAT_VERSION} only: "
            f"rebuild the firmware container with this medkd", "version")
    fields = data[: _HEADER_FIELDS.size]
    (header_crc,) = _HEADER_CRC.unpack_from(data, _HEADER_FIELDS.size)
    if zlib.crc32(fields) != header_crc:
        raise FirmwareBlobError(f"{name} is corrupt: header CRC-32 0x{zlib.crc32(fields):08x} != stored "
                                f"0x{header_crc:08x}", "header-crc")
    _magic, _version, kind_code, header_size, flags, payload_size, crc, sha16 = _HEADER_FIELDS.unpack(fields)
    if header_size != HEADER_SIZE:
        raise FirmwareBlobError(f"{name} has invalid header size {header_size} (expected {HEADER_SIZE})",
                                "header-size")
    if flags:
        raise FirmwareBlobError(f"{name} has unknown header flags 0x{flags:08x} (none are defined)", "flags")
    if kind_code not in _KIND_NAMES:
        raise FirmwareBlobError(f"{name} has unknown kind code {kind_code}", "kind")
    if payload_size == 0:
        raise FirmwareBlobError(f"{name} has an empty payload", "payload-size")
    if payload_size > len(data) - HEADER_SIZE:
        raise FirmwareBlobError(f"{name} is truncated: header says {payload_size} payload bytes, "
                                f"file has {len(data) - HEADER_SIZE}", "payload-size")
    end = HEADER_SIZE + payload_size
    if len(data) != end + _padding(end) or any(data[end:]):
        raise FirmwareBlobError(f"{name} has {len(data) - end} bytes after its payload; expected "
                                f"{_padding(end)} zero padding bytes", "trailing")
    payload = data[HEADER_SIZE:end]
    actual_crc = zlib.crc32(payload)
    if actual_crc != crc:
        raise FirmwareBlobError(f"{name} is corrupt: payload CRC-32 0x{actual_crc:08x} != header 0x{crc:08x}", "crc")
    if hashlib.sha256(payload).digest()[:16] != sha16:
        raise FirmwareBlobError(f"{name} is corrupt: payload SHA-256 does not match the header", "sha256")
    header = {
        "magic": MAGIC.decode("ascii"),
        "format_version": version,
        "kind": _KIND_NAMES[kind_code],
        "kind_code": kind_code,
        "header_size": header_size,
        "flags": flags,
        "payload_size": payload_size,
        "crc32": crc,
        "sha256_prefix": sha16.hex(),
        "header_crc32": header_crc,
        "container_size": len(data),
    }
    return header, payload


def read_firmware_blob(path: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
    """Read and validate the ``.bin`` container at `path`; return ``(header, payload)``.

    Raises `UserError` if the file is missing, or `FirmwareBlobError` (a `UserError`)
    if it fails any check of `parse_firmware_blob`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"firmware blob not found: {path}")
    return parse_firmware_blob(path.read_bytes(), f"firmware blob {path}")
