"""PNG overlays of segmentation results: image | truth | prediction, side by side.

People check a segmenter by looking at masks. `write_overlays` draws a few test slices,
evenly spaced through the split, each as three panels (the gray image, the image with the
true mask blended in, the image with the predicted mask) and a legend row of class colours.
Background (class 0) is left unpainted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .atomic import atomic_save
from .data.segmentation import evenly_spaced

# Distinct colours for classes 1..; background gets none. Cycles past 10 classes.
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)], dtype=np.float32)
ALPHA = 0.45
SCALE = 2  # pixels per image pixel in the PNG: 128 px slices come out 256 px wide per panel
LEGEND_ROW = 14


def gray_rgb(image: torch.Tensor) -> np.ndarray:
    """C x H x W in [0, 1] -> H x W x 3 float in [0, 255] (the channel mean for colour images)."""
    gray = image.float().mean(0).clamp(0, 1).numpy() * 255.0
    return np.repeat(gray[..., None], 3, axis=2)


def blend(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = rgb.copy()
    painted = mask > 0
    colours = PALETTE[(mask[painted] - 1) % len(PALETTE)]
    out[painted] = (1 - ALPHA) * out[painted] + ALPHA * colours
    return out


def overlay_panel(image: torch.Tensor, truth: torch.Tensor, predicted: torch.Tensor,
                  class_names: list[str]) -> Image.Image:
    rgb = gray_rgb(image)
    panels = np.concatenate([rgb, blend(rgb, truth.numpy()), blend(rgb, predicted.numpy())], axis=1)
    picture = Image.fromarray(panels.round().astype(np.uint8)).resize(
        (panels.shape[1] * SCALE, panels.shape[0] * SCALE), Image.NEAREST)
    legend_rows = 1 + (len(class_names) - 1) // 4
    canvas = Image.new("RGB", (picture.width, picture.height + LEGEND_ROW * (legend_rows + 1)), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, picture.height + 1), "image | truth | prediction", fill="black")
    column = picture.width // 4
    for k, name in enumerate(class_names[1:]):
        x, y = 4 + (k % 4) * column, picture.height + LEGEND_ROW * (1 + k // 4) + 1
        draw.rectangle([x, y + 2, x + 9, y + 11], fill=tuple(int(c) for c in PALETTE[k % len(PALETTE)]))
        draw.text((x + 13, y), name, fill="black")
    return canvas


def write_overlays(folder: Path, images: torch.Tensor, truth: torch.Tensor, predicted: torch.Tensor,
                   class_names: list[str], count: int = 4) -> list[str]:
    """Overlay PNGs of `count` test slices, evenly spaced; returns their paths relative to
    folder's parent (as the report lists them)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in evenly_spaced(len(images), count):
        path = folder / f"test_{int(index):04d}.png"
        picture = overlay_panel(images[index], truth[index], predicted[index], class_names)
        atomic_save(path, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
        written.append(str(path.relative_to(folder.parent)))
    return written
