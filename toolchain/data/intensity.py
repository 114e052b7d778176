"""One intensity rule for every image that is not 8-bit: `data.intensity`.

8-bit images are divided by 255: the format fixes their scale. Nothing fixes it for 16-bit
PNG/TIFF, uint16/int16/float arrays or an MRI/CT volume (a 12-bit detector stored in 16 bits
uses 0..4095, Hounsfield units go negative), so dividing by 65535 would leave most images near
black. Every loader maps such images to [0, 1] with `scale_to_unit` and bounds from one rule:

    range               the min..max of the data set maps to 0..1
    window:LEVEL,WIDTH  CT-style: [LEVEL - WIDTH/2, LEVEL + WIDTH/2] maps to 0..1, values
                        outside are clipped (e.g. window:40,400 soft tissue, window:-600,1500 lung)

`range` is per data set, not per image: stretching each image on its own would erase the
intensity differences between images (in CT and X-ray the density is often the finding) and is
undefined for a flat image. Only the training images set it (the MRI task: its one volume), so
no statistic comes from the test split; test values outside it are clipped. Loaders record the
bounds in the provenance, so a deployment can apply the same mapping.

Values that are NaN or infinite are left as they are, so validate.py can name those images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

ACCEPTED_FORMS = "range, or window:LEVEL,WIDTH with WIDTH > 0 (e.g. window:40,400)"


@dataclass(frozen=True)
class IntensityRule:
    kind: str  # "range" or "window"
    level: float = 0.0
    width: float = 0.0

    def __str__(self) -> str:
        return "range" if self.kind == "range" else f"window:{self.level:g},{self.width:g}"

    def bounds(self, reference: Iterable[np.ndarray]) -> tuple[float, float]:
        """(low, high) that map to 0 and 1; `range` takes them from the reference arrays."""
        if self.kind == "window":
            return self.level - self.width / 2, self.level + self.width / 2
        return finite_range(reference)

    def describe(self, low: float, high: float) -> dict:
        """What the provenance records: the rule and the bounds it resolved to."""
        return {"rule": str(self), "low": float(low), "high": float(high)}


def parse_intensity(value) -> IntensityRule | None:
    """`data.intensity` as given (None = the data set's default) -> a rule, or a ConfigError."""
    if value is None:
        return None
    text = str(value).strip() if isinstance(value, str) else None
    if text == "range":
        return IntensityRule("range")
    if text is not None and text.startswith("window:"):
        numbers = _two_numbers(text[len("window:"):])
        if numbers is None:
            raise ConfigError(
                f"data.intensity '{value}': LEVEL and WIDTH must be two numbers; accepted: {ACCEPTED_FORMS}"
            )
        level, width = numbers
        if width <= 0:
            raise ConfigError(f"data.intensity '{value}': WIDTH must be > 0; accepted: {ACCEPTED_FORMS}")
        return IntensityRule("window", level, width)
    raise ConfigError(f"unknown data.intensity '{value}'; accepted: {ACCEPTED_FORMS}")


def _two_numbers(text: str) -> tuple[float, float] | None:
    parts = text.split(",")
    if len(parts) != 2:
        return None
    try:
        numbers = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    return numbers if all(math.isfinite(n) for n in numbers) else None


def finite_range(arrays: Iterable[np.ndarray]) -> tuple[float, float]:
    """Min and max over the finite values of all arrays (NaN/Inf are validate.py's to report)."""
    low, high = math.inf, -math.inf
    for array in arrays:
        if array.size == 0:
            continue
        if not np.isfinite(array).all():
            array = array[np.isfinite(array)]
            if array.size == 0:
                continue
        low, high = min(low, float(array.min())), max(high, float(array.max()))
    if low > high:  # nothing finite: any bounds do, the NaN/Inf check refuses the data
        return 0.0, 1.0
    return low, high


def scale_to_unit(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """float32 copy of `array` with low -> 0 and high -> 1, clipped to [0, 1]; NaN/Inf kept.

    A data set of one value (high == low) maps to 0.
    """
    out = np.asarray(array, dtype=np.float32).copy()
    finite = np.isfinite(out)
    span = high - low
    if span > 0:
        out -= np.float32(low)
        out /= np.float32(span)
        np.clip(out, 0.0, 1.0, out=out)
    else:
        out[...] = 0.0
    if not finite.all():
        out[~finite] = np.asarray(array, dtype=np.float32)[~finite]  # clip would turn Inf into 1
    return out
