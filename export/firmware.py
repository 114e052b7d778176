"""Firmware-embeddable model container (``MKDB``) and its C-source form.

`write_firmware_blob` packs an exported model file (ONNX, or a serialized TensorRT
engine) into a small versioned container that firmware links in as a read-only byte
array and validates before use; the C side lives in ``runtime/medkd_blob.{h,c}``
(portable C99, no dependencies). `read_firmware_blob` is the Python reader/validator.

Container layout (format version 1, all integers little-endian, header = 48 bytes):

==========  ======  ==========  ===============================================
offset      size    type        field
==========  ======  ==========  ===============================================
0           4       char[4]     magic ``b"MKDB"``
4           2       u16         format version (= 1)
6           2       u16         kind code: 1 = ``onnx``, 2 = ``tensorrt-engine``
8           4       u32         header size in bytes (= 48; payload starts here)
12          4       u32         flags (reserved, 0; readers ignore it)
16          8       u64         payload size in bytes (unpadded)
24          4       u32         CRC-32 of the payload (``zlib.crc32``, IEEE 802.3)
28          4       u32         reserved (0)
32          16      u8[16]      first 16 bytes of the payload's SHA-256
48          n       u8[n]       payload (the model file, byte for byte)
48 + n      0..15   u8[]        zero padding: the container size is a multiple of 16
==========  ======  ==========  ===============================================

The header size is a multiple of 16, so a 16-byte aligned container has a 16-byte
aligned payload (both linkable forms below align the container to 16). Readers accept a
larger header size (future fields) as long as it is a multiple of 16 and fits.

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
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "KIND_CODES",
    "MAGIC",
    "read_firmware_blob",
    "write_firmware_blob",
]

MAGIC = b"MKDB"
FORMAT_VERSION = 1
ALIGN = 16
# magic, version, kind, header_size, flags, payload_size, crc32, reserved, sha256[:16]
_HEADER = struct.Struct("<4sHHIIQII16s")
HEADER_SIZE = _HEADER.size  # 48
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
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, KIND_CODES[kind], HEADER_SIZE, 0, len(payload), crc, 0, sha[:16])
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


def read_firmware_blob(path: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
    """Read and validate a ``.bin`` container; return ``(header, payload)``.

    Raises `UserError` if the file is missing, truncated, has a wrong magic/version/kind
    or header size, or its payload fails the CRC-32 or SHA-256 check.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"firmware blob not found: {path}")
    data = path.read_bytes()
    if len(data) < HEADER_SIZE:
        raise UserError(f"firmware blob {path} is truncated: {len(data)} bytes < {HEADER_SIZE}-byte header")
    magic, version, kind_code, header_size, flags, payload_size, crc, _reserved, sha16 = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise UserError(f"{path} is not a medkd firmware blob (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise UserError(f"firmware blob {path} has unsupported format version {version} (expected {FORMAT_VERSION})")
    if kind_code not in _KIND_NAMES:
        raise UserError(f"firmware blob {path} has unknown kind code {kind_code}")
    if header_size < HEADER_SIZE or header_size % ALIGN:
        raise UserError(f"firmware blob {path} has invalid header size {header_size}")
    if header_size + payload_size > len(data):
        raise UserError(
            f"firmware blob {path} is truncated: header says {payload_size} payload bytes, "
            f"file has {max(0, len(data) - header_size)}"
        )
    payload = data[header_size : header_size + payload_size]
    actual_crc = zlib.crc32(payload) & 0xFFFFFFFF
    if actual_crc != crc:
        raise UserError(f"firmware blob {path} is corrupt: payload CRC-32 0x{actual_crc:08x} != header 0x{crc:08x}")
    if hashlib.sha256(payload).digest()[:16] != sha16:
        raise UserError(f"firmware blob {path} is corrupt: payload SHA-256 does not match the header")
    header = {
        "magic": magic.decode("ascii"),
        "format_version": version,
        "kind": _KIND_NAMES[kind_code],
        "kind_code": kind_code,
        "header_size": header_size,
        "flags": flags,
        "payload_size": payload_size,
        "crc32": crc,
        "sha256_prefix": sha16.hex(),
        "container_size": len(data),
    }
    return header, payload
