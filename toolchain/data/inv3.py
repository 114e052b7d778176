"""Read the CT volume of an InVesalius 3 project file (`.inv3`), without InVesalius.

An .inv3 file (the format of Debian's `invesalius-examples`, e.g.
/usr/share/doc/invesalius-examples/examples/Cranium.inv3) is a gzipped tar holding one folder:

    main.plist     Apple XML property list: modality, name, spacing [x, y, z] in mm, and
                   matrix = {filename, dtype, shape [z, y, x]}
    matrix.dat     the volume as raw C-order values of that dtype (numpy memmap layout,
                   little-endian as InVesalius writes it on x86), Hounsfield units for CT
    mask_*.dat, surface_*.vtp   segmentations and meshes made in InVesalius (not read)

The volume is read straight from the archive (no files are extracted), with the standard
library's tarfile and plistlib: no DICOM reader is needed.
"""

from __future__ import annotations

import plistlib
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from xml.parsers.expat import ExpatError

import numpy as np

from ..errors import UserError

# Volume value types InVesalius writes (int16 for CT); anything else is not a scan we know.
DTYPES = {"int16", "uint16", "int32", "uint8", "float32"}


@dataclass
class Inv3Volume:
    hu: np.ndarray  # Z x Y x X (axial slices), the stored values (Hounsfield units for CT)
    spacing_mm: tuple[float, float, float]  # (x, y, z) voxel size as main.plist gives it
    modality: str
    name: str
    source: str


def read_inv3(path: Path) -> Inv3Volume:
    """The volume of the .inv3 project at `path`, or a UserError saying what is wrong."""
    if not path.is_file():
        raise UserError(f"InVesalius project not found: {path}")
    try:
        with tarfile.open(path, "r:*") as archive:
            members = {PurePosixPath(m.name).name: m for m in archive.getmembers() if m.isfile()}
            if "main.plist" not in members:
                raise UserError(f"{path} has no main.plist; is it an InVesalius 3 (.inv3) project?")
            main = plistlib.loads(archive.extractfile(members["main.plist"]).read())
            if not isinstance(main, dict):
                raise UserError(f"{path}: main.plist holds no dictionary; is it an InVesalius 3 project?")
            matrix = main.get("matrix") or {}
            filename, dtype, shape = matrix.get("filename"), matrix.get("dtype"), matrix.get("shape")
            if filename not in members or dtype not in DTYPES or not _is_shape(shape):
                raise UserError(
                    f"{path}: main.plist's matrix entry {matrix!r} does not name a volume in the "
                    f"archive with a known dtype ({', '.join(sorted(DTYPES))}) and a 3-D shape"
                )
            raw = archive.extractfile(members[filename]).read()
    except (tarfile.TarError, OSError, EOFError, ValueError, ExpatError) as exc:  # ValueError: bad plist
        raise UserError(f"cannot read {path} as an InVesalius project: {str(exc).splitlines()[0]}") from None
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise UserError(f"{path}: {filename} has {len(raw)} bytes; shape {shape} of {dtype} needs {expected}")
    spacing = main.get("spacing")
    if not (isinstance(spacing, list) and len(spacing) == 3 and all(_positive(s) for s in spacing)):
        raise UserError(f"{path}: main.plist's spacing {spacing!r} is not three positive voxel sizes")
    hu = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return Inv3Volume(
        hu=hu.astype(np.dtype(dtype), copy=True),  # native byte order, writable
        spacing_mm=tuple(float(s) for s in spacing),
        modality=str(main.get("modality", "")),
        name=str(main.get("name", "")),
        source=str(path),
    )


def _is_shape(shape) -> bool:
    return isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
