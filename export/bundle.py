"""On-device TensorRT build bundle: what medkd ships where TensorRT (or a GPU) is absent.

An engine only runs on the GPU model, TensorRT version and JetPack release it was built
with, so for a Jetson the engine is built on the Jetson. `write_bundle` writes a folder
holding everything that build needs:

=====================  =================================================================
file                   content
=====================  =================================================================
``<model>.onnx``       the chosen ONNX (fp32, fp16 or int8 Q/DQ), byte for byte
``build_engine.sh``    bash: checks ``trtexec`` and the ONNX's sha256, builds the engine
                       with the exact trtexec command, then profiles it (JSON reports)
``build_engine.py``    the same build with the TensorRT Python API; needs no medkd
                       (its build code is `medkd.export.tensorrt`'s, copied verbatim)
``manifest.json``      sha256 of every other file, ONNX input/output names and shapes,
                       precision, target, builder settings, trtexec commands, the
                       caller's extra fields, and its own sha256 (``manifest_sha256``)
=====================  =================================================================

The bundle is written into a temporary folder beside `bundle_dir` and renamed into place
at the end: a failure leaves nothing (and an existing bundle untouched). `verify_bundle`
re-hashes the files from disk. Engines and reports the scripts write on the device land
beside them and are not part of the manifest.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import secrets
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medkd.toolchain.atomic import atomic_path
from medkd.toolchain.errors import UserError

from .tensorrt import (
    BuilderSettings,
    check_onnx_precision,
    profile_output_names,
    sha256_file,
    standalone_build_source,
    trtexec_build_command,
    trtexec_profile_command,
)

__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "MANIFEST", "verify_bundle", "write_bundle"]

BUNDLE_FORMAT = "medkd-tensorrt-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
SHELL_SCRIPT = "build_engine.sh"
PYTHON_SCRIPT = "build_engine.py"
TIMING_CACHE = "timing.cache"
# Names end up unquoted in trtexec flags and in a sed pattern: keep them plain.
_ONNX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*\.onnx\Z")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_RESERVED_KEYS = frozenset(
    {"format", "format_version", "target", "precision", "tensorrt_version", "onnx", "builder_settings",
     "engine_files", "trtexec", "files", "manifest_sha256"}
)


# --------------------------------------------------------------------------------------
# Reading the ONNX
# --------------------------------------------------------------------------------------


def _load_onnx(onnx_path: Path):
    import onnx

    if not onnx_path.is_file():
        raise UserError(f"ONNX model not found: {onnx_path}")
    if not _ONNX_NAME.match(onnx_path.name):
        raise UserError(f"ONNX file name {onnx_path.name!r} must be plain (letters, digits, . _ -) and end in .onnx")
    data = onnx_path.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except Exception as e:  # protobuf DecodeError and friends
        raise UserError(f"{onnx_path} is not a readable ONNX model: {e}") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise UserError(f"{onnx_path} keeps its weights in external data files; the bundle needs a single-file ONNX")
    return data, model


def _value_info(value) -> dict[str, Any]:
    import onnx

    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    return {"name": value.name, "dtype": onnx.TensorProto.DataType.Name(tensor.elem_type).lower(), "shape": dims}


def _onnx_io(model) -> dict[str, list[dict[str, Any]]]:
    # Old exporters list initializers among the graph inputs; those are weights, not inputs.
    weights = {t.name for t in model.graph.initializer}
    return {
        "inputs": [_value_info(v) for v in model.graph.input if v.name not in weights],
        "outputs": [_value_info(v) for v in model.graph.output],
    }


def _check_input(io: dict, settings: BuilderSettings, label: str) -> str:
    """The one image input must be N x C x H x W with the settings' C, H, W; return its name."""
    if len(io["inputs"]) != 1:
        raise UserError(f"{label} has {len(io['inputs'])} inputs; a TensorRT bundle expects one image input")
    inp = io["inputs"][0]
    shape = inp["shape"]
    if len(shape) != 4 or tuple(shape[1:]) != tuple(settings.input_shape):
        raise UserError(
            f"{label} input {inp['name']!r} has shape {shape}; the builder settings expect "
            f"N x {' x '.join(map(str, settings.input_shape))}"
        )
    static = isinstance(shape[0], int) and shape[0] > 0
    if static and not settings.min_batch == settings.opt_batch == settings.max_batch == shape[0]:
        raise UserError(f"{label} has a static batch of {shape[0]}; export it with a dynamic batch")
    return inp["name"]


def _check_extra(extra: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """The caller's fields, JSON-clean; a reserved key may only repeat the manifest's own value."""
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise UserError(f"manifest_extra must be a dict, got {type(extra).__name__}")
    try:
        extra = json.loads(json.dumps(extra, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise UserError(f"manifest_extra must be JSON-serialisable: {e}") from None
    clash = sorted(k for k in _RESERVED_KEYS & set(extra) if manifest.get(k, object()) != extra[k])
    if clash:
        raise UserError(f"manifest_extra cannot change reserved manifest key(s): {', '.join(clash)}")
    return extra


# --------------------------------------------------------------------------------------
# The scripts
# --------------------------------------------------------------------------------------


def _shell_command(argv: list[str]) -> str:
    return " \\\n    ".join(shlex.quote(a) for a in argv)


def _shell_script(
    settings: BuilderSettings, onnx_name: str, engine_name: str, build: list[str], profile: list[str]
) -> str:
    sed_name = onnx_name.replace(".", r"\.")
    reports = ", ".join(profile_output_names(engine_name[: -len(".engine")]).values())
    return f"""#!/usr/bin/env bash
# Build and profile the TensorRT engine for {settings.target} ({settings.precision}, TensorRT {settings.tensorrt_version}).
# Generated by medkd.export.bundle - do not edit: manifest.json records this file's sha256.
# Run it on the device itself: an engine only works on the GPU, TensorRT and JetPack it was built with.
set -euo pipefail
cd -- "$(dirname -- "${{BASH_SOURCE[0]}}")"

if ! command -v trtexec >/dev/null 2>&1; then
  echo "error: trtexec is not on PATH. On JetPack it is /usr/src/tensorrt/bin/trtexec:" >&2
  echo "       export PATH=\\"\\$PATH:/usr/src/tensorrt/bin\\" (or use python3 build_engine.py)" >&2
  exit 127
fi
if ! command -v sha256sum >/dev/null 2>&1; then
  echo "error: sha256sum (coreutils) is needed to check {onnx_name} before building" >&2
  exit 127
fi

# Refuse to build from an ONNX that is not the one this bundle was written with
# (its sha256 is read from the "files" block of the manifest).
expected="$(sed -n '/^  "files": {{$/,/^  }}/s/^ *"{sed_name}": "\\([0-9a-f]\\{{64\\}}\\)",\\{{0,1\\}}$/\\1/p' {MANIFEST})"
if [ -z "$expected" ]; then
  echo "error: {MANIFEST} records no sha256 for {onnx_name}" >&2
  exit 1
fi
if ! echo "$expected  {onnx_name}" | sha256sum --check --status; then
  echo "error: {onnx_name} does not match the sha256 in {MANIFEST} (corrupt or replaced); not building" >&2
  exit 1
fi

echo "== building {engine_name} =="
{_shell_command(build)}

echo "== profiling =="
{_shell_command(profile)}

echo "done: {engine_name}; reports: {reports}"
"""


_PYTHON_HEADER = '''#!/usr/bin/env python3
"""Build this bundle's TensorRT engine with the TensorRT Python API.

Generated by medkd.export.bundle - do not edit: manifest.json records this file's sha256.
Runs on the device (e.g. a Jetson with JetPack's python3-libnvinfer) and needs no medkd:
it reads the builder settings from manifest.json beside it, checks the ONNX's sha256,
builds, and writes the engine and the timing cache atomically. For trtexec, and for the
profiling reports, run build_engine.sh instead.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"


class BundleError(Exception):
    """The bundle is incomplete or was changed after it was written."""

'''

_PYTHON_MAIN = '''

def load_manifest():
    if not MANIFEST.is_file():
        raise BundleError("manifest.json is missing beside build_engine.py")
    manifest = json.loads(MANIFEST.read_text())
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise BundleError("manifest.json was changed after it was written (sha256 mismatch)")
    return manifest


def verified_onnx(manifest):
    name = manifest["onnx"]["file"]
    path = HERE / name
    if not path.is_file():
        raise BundleError("bundle file %s is missing" % name)
    if sha256_file(path) != manifest["files"][name]:
        raise BundleError("bundle file %s was changed after it was written (sha256 mismatch)" % name)
    return path


def build(args):
    manifest = load_manifest()
    onnx_path = verified_onnx(manifest)
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BundleError(
            "the tensorrt Python package is not installed (%s); on JetPack: sudo apt install python3-libnvinfer, "
            "or run build_engine.sh with trtexec" % e
        ) from None
    s = manifest["builder_settings"]
    engine_path = Path(args.engine) if args.engine else HERE / manifest["engine_files"]["engine"]
    cache_path = Path(args.timing_cache) if args.timing_cache else HERE / manifest["engine_files"]["timing_cache"]
    cache_in = cache_path.read_bytes() if s["timing_cache"] and cache_path.is_file() else b""
    engine, cache_out, info = trt_build_serialized(trt, onnx_path, s, cache_in)
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(engine)
    if cache_out is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(cache_out)
    return {
        "engine": str(engine_path),
        "engine_size": len(engine),
        "engine_sha256": hashlib.sha256(engine).hexdigest(),
        "timing_cache": str(cache_path) if cache_out is not None else None,
        "target": manifest["target"],
        "precision": manifest["precision"],
        **info,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build this bundle's TensorRT engine with the TensorRT Python API.")
    parser.add_argument("--engine", help="engine file to write (default: the manifest's engine name, beside this script)")
    parser.add_argument("--timing-cache", help="timing cache file to read and update (default: beside this script)")
    args = parser.parse_args(argv)
    try:
        result = build(args)
    except (BundleError, TensorRTBuildError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _python_script() -> str:
    # medkd's own helpers and build code, copied verbatim so the device runs the tested code.
    shared = (atomic_path, sha256_file, manifest_digest)
    return (
        _PYTHON_HEADER
        + "\n"
        + "\n\n".join(inspect.getsource(obj) for obj in shared)
        + "\n\n"
        + standalone_build_source()
        + _PYTHON_MAIN
    )


# --------------------------------------------------------------------------------------
# Writing and verifying
# --------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write(path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    path.chmod(mode & ~_umask())


def _check_destination(bundle_dir: Path) -> None:
    if bundle_dir.exists() and not bundle_dir.is_dir():
        raise UserError(f"bundle path {bundle_dir} exists and is not a folder")
    if bundle_dir.is_dir() and any(bundle_dir.iterdir()) and not (bundle_dir / MANIFEST).is_file():
        raise UserError(f"{bundle_dir} is a non-empty folder that is not a medkd bundle; refusing to replace it")


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished folder to `dest`; an existing bundle is swapped out, then removed."""
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.old")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fill_bundle(folder: Path, onnx_name: str, onnx_bytes: bytes, manifest: dict, scripts: dict[str, str]) -> dict:
    _write(folder / onnx_name, onnx_bytes, 0o666)
    for name, text in scripts.items():
        _write(folder / name, text.encode(), 0o777)
    files = {name: sha256_file(folder / name) for name in sorted((onnx_name, *scripts))}
    manifest = {**manifest, "files": files}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    _write(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), 0o666)
    return manifest


def write_bundle(
    bundle_dir: str | os.PathLike,
    onnx_path: str | os.PathLike,
    settings: BuilderSettings,
    manifest_extra: dict | None = None,
) -> dict[str, Any]:
    """Write the on-device build bundle for `onnx_path` built with `settings`; return its manifest.

    `manifest_extra` (JSON-serialisable, e.g. preprocessing, class names, expected
    accuracy) is merged into the manifest's top level; it may repeat a manifest field
    (``target``, ``precision``) but not change it. An existing bundle at `bundle_dir`
    is replaced only once the new one is complete; any other non-empty folder is refused.
    """
    bundle_dir, onnx_path = Path(bundle_dir), Path(onnx_path)
    _check_destination(bundle_dir)
    onnx_bytes, model = _load_onnx(onnx_path)
    onnx_name = onnx_path.name
    io = _onnx_io(model)
    input_name = _check_input(io, settings, onnx_name)
    evidence = check_onnx_precision(model, settings.precision, onnx_name)

    stem = onnx_name[: -len(".onnx")]
    engine_files = {"engine": f"{stem}.engine", "timing_cache": TIMING_CACHE, **profile_output_names(stem)}
    cache_name = TIMING_CACHE if settings.timing_cache else None
    build = trtexec_build_command(settings, onnx_name, engine_files["engine"], cache_name, input_name=input_name)
    profile = trtexec_profile_command(settings, engine_files["engine"], stem, input_name=input_name)
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "target": settings.target,
        "precision": settings.precision,
        "tensorrt_version": settings.tensorrt_version,
        "onnx": {
            "file": onnx_name,
            "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "size": len(onnx_bytes),
            "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
            **io,
            "precision_evidence": evidence,
        },
        "builder_settings": settings.to_dict(),
        "engine_files": engine_files,
        "trtexec": {"build": build, "profile": profile},
    }
    manifest.update(_check_extra(manifest_extra, manifest))
    scripts = {
        SHELL_SCRIPT: _shell_script(settings, onnx_name, engine_files["engine"], build, profile),
        PYTHON_SCRIPT: _python_script(),
    }

    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.", suffix=".tmp", dir=bundle_dir.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a bundle is an ordinary folder
        manifest = _fill_bundle(tmp, onnx_name, onnx_bytes, manifest, scripts)
        _move_into_place(tmp, bundle_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed into place
    return manifest


def _read_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"{bundle_dir} is not a medkd bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"bundle file {MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{path} is not a medkd TensorRT bundle manifest")
    if manifest.get("format_version") != BUNDLE_VERSION:
        found = manifest.get("format_version")
        raise UserError(f"bundle format version {found!r} is not supported (expected {BUNDLE_VERSION})")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise UserError(f"bundle file {MANIFEST} was changed after it was written (sha256 mismatch)")
    return manifest


def verify_bundle(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Re-hash every file the manifest lists; return the manifest, or raise `UserError` naming the bad file."""
    bundle_dir = Path(bundle_dir)
    manifest = _read_manifest(bundle_dir)
    files = manifest.get("files")
    onnx_name = (manifest.get("onnx") or {}).get("file")
    if not isinstance(files, dict) or not {SHELL_SCRIPT, PYTHON_SCRIPT, onnx_name} <= set(files):
        raise UserError(f"bundle {MANIFEST} does not list the ONNX and both build scripts")
    for name, expected in sorted(files.items()):
        if not isinstance(name, str) or not _PLAIN_NAME.match(name) or name == MANIFEST:
            raise UserError(f"bundle {MANIFEST} lists an invalid file name {name!r}")
        path = bundle_dir / name
        if not path.is_file():
            raise UserError(f"bundle file {name} is missing")
        if sha256_file(path) != expected:
            raise UserError(f"bundle file {name} was changed after it was written (sha256 mismatch)")
    if manifest["onnx"].get("sha256") != files[onnx_name]:
        raise UserError(f"bundle {MANIFEST} records two different sha256 values for {onnx_name}")
    return manifest
