"""Training-time augmentation: K fixed views per training image, rendered on the fly.

`data.augment` says what a view may do to an image:

    null / none        no augmentation (the training images as they are)
    a preset           light  = crop=0.85,rotate=5,jitter=0.05
                       strong = crop=0.6,rotate=15,jitter=0.2
                       (presets never flip: a flip is right only where the anatomy allows it)
    a spec string      comma-separated items, applied left to right (a preset may come first):
                         crop=A      random resized crop keeping at least fraction A of the area
                                     (0 < A <= 1; aspect ratio 3/4..4/3), resized back
                         hflip[=P]   left-right flip with probability P (0.5)
                         vflip[=P]   up-down flip with probability P (0.5)
                         rotate=D    rotation by up to +-D degrees
                         jitter=J    brightness +-J and contrast 1 +- J (around the image mean)
                       e.g. "crop=0.8,hflip,rotate=10,jitter=0.1" or "light,hflip"; on the
                       command line quote it: "data.augment='crop=0.8,hflip'"

`data.augment_views` = K. View 0 of every image is the image itself; views 1..K-1 are random
views whose parameters are drawn once, from a torch.Generator seeded by `data.seed`, into a
K x N x len(PARAMS) table: view v of image i is a function of (data.seed, N, K, i, v) and the
spec, whatever the recipe, the device or the number of processes. Nothing K-times-the-data
is stored: `render` warps a batch (affine_grid + grid_sample, reflection padding; then the
intensity jitter, clamped to [0, 1]) wherever the batch is, from its rows of the table.

Why fixed views rather than fresh random ones every step: the distillation recipes need the
frozen teacher's features of exactly the pixels the student sees. With K fixed views the
teacher runs once per view (K x one extraction, view 0 being the un-augmented features
every run already has) and the content-keyed feature cache keeps them, so the teacher target
is exact, not an approximation; fresh views would need a teacher forward pass at every
training step. The price is variety: an image is seen in K poses, not a new one per epoch.
The training loop (train.fit) shows every image as one of its K views each epoch, the view
drawn from its shuffling generator (so resume and every recipe see the same sequence).

Validation, test, calibration and export images are never augmented. Multi-task data
(`data=multitask`) takes one spec for every task or a mapping task -> spec (see
augment_settings); each image is augmented by its own task's spec.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..errors import ConfigError

OFF = ("none", "off")
PRESETS = {
    "light": "crop=0.85,rotate=5,jitter=0.05",
    "strong": "crop=0.6,rotate=15,jitter=0.2",
}
DEFAULT_FLIP_P = 0.5
# One augmented view besides the image: each view costs a teacher extraction of the training set.
DEFAULT_VIEWS = 2
# Aspect-ratio range of the random resized crop (torchvision's RandomResizedCrop default).
CROP_RATIO = (3 / 4, 4 / 3)
# Columns of the view table: what one view of one image does.
PARAMS = ("flip_x", "flip_y", "angle", "scale_x", "scale_y", "shift_x", "shift_y", "brightness", "contrast")
_IDENTITY_ROW = (1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Rendering a whole view for the teacher goes in chunks of this many images.
RENDER_CHUNK = 1024


@dataclass(frozen=True)
class AugmentSpec:
    """What a view may do; the defaults do nothing."""

    crop: float = 1.0  # minimum kept area fraction of the random resized crop
    hflip: float = 0.0  # probability of a left-right flip
    vflip: float = 0.0  # probability of an up-down flip
    rotate: float = 0.0  # maximum rotation, degrees either way
    jitter: float = 0.0  # brightness amplitude; contrast is 1 +- jitter

    @property
    def is_identity(self) -> bool:
        return self == AugmentSpec()

    def describe(self) -> str:
        """The spec as the string that parses back to it ("none" when it does nothing)."""
        items = []
        if self.crop < 1:
            items.append(f"crop={self.crop:g}")
        for key in ("hflip", "vflip"):
            p = getattr(self, key)
            if p:
                items.append(key if p == DEFAULT_FLIP_P else f"{key}={p:g}")
        if self.rotate:
            items.append(f"rotate={self.rotate:g}")
        if self.jitter:
            items.append(f"jitter={self.jitter:g}")
        return ",".join(items) or "none"


# item -> (check, what it must be)
_RULES = {
    "crop": (lambda v: 0 < v <= 1, "a number in (0, 1], the minimum kept area fraction"),
    "hflip": (lambda v: 0 <= v <= 1, "a probability in [0, 1] (hflip alone = 0.5)"),
    "vflip": (lambda v: 0 <= v <= 1, "a probability in [0, 1] (vflip alone = 0.5)"),
    "rotate": (lambda v: 0 <= v <= 180, "a number of degrees in [0, 180]"),
    "jitter": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}
_FLAGS = ("hflip", "vflip")
_GRAMMAR = ("null/none, a preset (" + ", ".join(PRESETS) + ") or items crop=A, hflip[=P], vflip[=P], "
            "rotate=DEG, jitter=J, e.g. 'crop=0.8,hflip,rotate=10,jitter=0.1'")


def parse_augment(value, key: str = "data.augment") -> AugmentSpec | None:
    """`value` (null, "none", a preset or a spec string) as an AugmentSpec; None = off."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in OFF):
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be {_GRAMMAR}; got '{value}'")
    values = {f.name: f.default for f in fields(AugmentSpec)}
    for item in (part.strip() for part in value.split(",")):
        name, has_value, text = (part.strip() for part in item.partition("="))
        if name in PRESETS and not has_value:
            values.update(vars(parse_augment(PRESETS[name], key)))
            continue
        if name not in _RULES:
            raise ConfigError(f"{key}: unknown item '{item}'{_did_you_mean(name)}; {key} is {_GRAMMAR}")
        if not has_value and name not in _FLAGS:
            raise ConfigError(f"{key}: '{name}' needs a value ({name}=...: {_RULES[name][1]})")
        number = _number(text) if has_value else DEFAULT_FLIP_P
        check, what = _RULES[name]
        if number is None or not check(number):
            raise ConfigError(f"{key}: {name} must be {what}, got '{text}'")
        values[name] = number
    spec = AugmentSpec(**values)
    return None if spec.is_identity else spec


def parse_views(value, key: str = "data.augment_views") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive integer (views per training image, the first being the "
                          f"image itself), got '{value}'")
    return value


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, [*_RULES, *PRESETS, *OFF], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True)
class AugmentSettings:
    """The augmentation of a build: one spec (single task) or one per task, and K views."""

    specs: dict[str | None, AugmentSpec | None]  # single task: {None: spec}; multi-task: by task name
    views: int

    @property
    def enabled(self) -> bool:
        return self.views > 1 and any(spec is not None for spec in self.specs.values())

    def describe(self) -> dict:
        """For the build report."""
        by_task = {name: (spec.describe() if spec else "none") for name, spec in self.specs.items()}
        return {
            "spec": by_task[None] if None in by_task else by_task,
            "views": self.views if self.enabled else 1,
            "teacher_features": ("exact: the teacher's features of every view (view 0 = the image itself), "
                                 "computed once per view and cached" if self.enabled else "un-augmented images"),
        }


def augmentation(data_cfg) -> AugmentSettings:
    """The augmentation a `data` config asks for (any data set, multitask included)."""
    from .config import config_mapping  # config.py imports this module for its checks
    from .multitask import NAME as MULTITASK
    from .multitask import multitask_augmentation

    raw = config_mapping(data_cfg)
    return multitask_augmentation(raw) if raw.get("name") == MULTITASK else augment_settings(raw)


# Multi-task mapping key that stands for every npz task the mapping does not name.
NPZ_TASKS = "npz"


def augment_settings(data_cfg, task_names: Sequence[str] | None = None,
                     npz_tasks: Sequence[str] = ()) -> AugmentSettings:
    """The `augment` / `augment_views` keys of a data config (DictConfig or mapping).

    Multi-task data (task_names given; npz_tasks: those loaded from npz files): `augment` is
    null (off), one spec for every task, or a mapping task -> spec, where the key `npz` covers
    every npz task not named and a task left out is not augmented. Entries naming a built-in
    task that is not in the build are ignored, so the default mapping serves any data.tasks.
    """
    from .config import config_mapping  # config.py imports this module for its checks

    raw = config_mapping(data_cfg)
    views = parse_views(raw.get("augment_views", DEFAULT_VIEWS))
    value = raw.get("augment")
    if task_names is None:
        return AugmentSettings({None: parse_augment(value)}, views)
    if not isinstance(value, Mapping):
        spec = parse_augment(value)
        return AugmentSettings({name: spec for name in task_names}, views)
    from .multitask import BUILTIN_TASKS

    stray = sorted(set(value) - set(task_names) - set(BUILTIN_TASKS) - {NPZ_TASKS})
    if stray:
        raise ConfigError(f"data.augment names unknown task(s) {', '.join(stray)}; tasks: {', '.join(task_names)} "
                          f"({NPZ_TASKS}: every npz task)")

    def spec(name):
        key = name if name in value or name not in npz_tasks else NPZ_TASKS
        return parse_augment(value.get(key), f"data.augment.{key}")

    return AugmentSettings({name: spec(name) for name in task_names}, views)


def image_specs(settings: AugmentSettings, count: int, task_ids: torch.Tensor | None = None,
                task_names: Sequence[str] | None = None) -> list[AugmentSpec | None]:
    """The spec of each of `count` images (by its task on multi-task data)."""
    if task_ids is None:
        return [settings.specs[None]] * count
    by_task = [settings.specs[name] for name in task_names]
    return [by_task[t] for t in task_ids.tolist()]


@dataclass
class ViewTable:
    """View parameters of N images x K views (`params`: K x N x len(PARAMS)), and the renderer.

    Move it to the training device with `.to(device)`; `render` then runs there without
    reading anything back to the host.
    """

    params: torch.Tensor

    @property
    def views(self) -> int:
        return self.params.shape[0]

    @property
    def num_images(self) -> int:
        return self.params.shape[1]

    def to(self, device) -> "ViewTable":
        return ViewTable(self.params.to(device))

    def epoch_views(self, generator: torch.Generator) -> torch.Tensor:
        """Which view each image is shown as this epoch (int64 N, on the CPU)."""
        return torch.randint(self.views, (self.num_images,), generator=generator)

    def render(self, images: torch.Tensor, view: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Images `index` (a batch B x C x H x W, already gathered) shown as views `view` (B)."""
        return render(images, self.params[view, index])

    def render_view(self, images: torch.Tensor, view: int) -> torch.Tensor:
        """View `view` of every image (N x C x H x W, CPU), for the teacher; one copy of the set."""
        out = torch.empty_like(images)
        rows = self.params[view].to(images.device)
        for start in range(0, len(images), RENDER_CHUNK):
            out[start : start + RENDER_CHUNK] = render(images[start : start + RENDER_CHUNK],
                                                       rows[start : start + RENDER_CHUNK])
        return out


def draw_view_table(specs: Sequence[AugmentSpec | None], views: int, seed: int) -> ViewTable:
    """K = `views` views of len(specs) images; view 0 is the identity. The uniform draws do not
    depend on the specs, so two specs over the same images differ in amplitude, not in luck."""
    n = len(specs)
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(views, n, 9, generator=generator, dtype=torch.float64)
    spec = torch.tensor([[s.crop, s.hflip, s.vflip, s.rotate, s.jitter] if s else [1.0, 0, 0, 0, 0] for s in specs],
                        dtype=torch.float64).reshape(n, 5)
    crop, hflip, vflip, rotate, jitter = spec.unbind(1)
    area = crop + (1 - crop) * u[..., 0]
    log_ratio = torch.where(crop < 1, (2 * u[..., 1] - 1) * math.log(CROP_RATIO[1]), torch.zeros_like(crop))
    scale_x = (area * log_ratio.exp()).sqrt().clamp(max=1)
    scale_y = (area / log_ratio.exp()).sqrt().clamp(max=1)
    params = torch.stack([
        1 - 2 * (u[..., 5] < hflip).double(),  # -1 flips
        1 - 2 * (u[..., 6] < vflip).double(),
        (2 * u[..., 4] - 1) * torch.deg2rad(rotate),
        scale_x,
        scale_y,
        (2 * u[..., 2] - 1) * (1 - scale_x),  # the crop stays inside the image
        (2 * u[..., 3] - 1) * (1 - scale_y),
        (2 * u[..., 7] - 1) * jitter,
        1 + (2 * u[..., 8] - 1) * jitter,
    ], dim=-1).float()
    params[0] = torch.tensor(_IDENTITY_ROW)
    return ViewTable(params)


def render(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Images B x C x H x W in [0, 1] flipped, warped and jittered by their rows of PARAMS (B x 9).

    Exact where a part does nothing: flips are index flips, rows without rotation, crop or
    shift skip the resampling (affine_grid's pixel centres can be a rounding error off), and
    the jitter x * 1 + 0 is x. So the identity row returns its images bit for bit: view 0 of
    an image is the image the un-augmented run sees and whose cached teacher features it gets.
    """
    flip_x, flip_y, angle, scale_x, scale_y, shift_x, shift_y, brightness, contrast = params.float().unbind(1)
    flipped = torch.where((flip_x < 0).view(-1, 1, 1, 1), images.flip(-1), images)
    flipped = torch.where((flip_y < 0).view(-1, 1, 1, 1), flipped.flip(-2), flipped)
    cos, sin = angle.cos(), angle.sin()
    # theta maps output coordinates ([-1, 1]^2) to where they are sampled from in the input.
    theta = torch.stack([
        torch.stack([cos * scale_x, -sin * scale_y, shift_x], dim=1),
        torch.stack([sin * scale_x, cos * scale_y, shift_y], dim=1),
    ], dim=1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(flipped, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    still = (angle == 0) & (scale_x == 1) & (scale_y == 1) & (shift_x == 0) & (shift_y == 0)
    warped = torch.where(still.view(-1, 1, 1, 1), flipped, warped)
    contrast = contrast.to(images.dtype).view(-1, 1, 1, 1)
    mean = warped.mean(dim=(1, 2, 3), keepdim=True)
    jittered = warped * contrast + (1 - contrast) * mean + brightness.to(images.dtype).view(-1, 1, 1, 1)
    return jittered.clamp(0.0, 1.0)


def training_views(augment: AugmentSettings, train, task, seed: int) -> ViewTable | None:
    """The K fixed views of every image of `train` (an ImageSet of `task`, a TaskData; transfer
    set included), each by its task's spec on multi-task data; None when augmentation is off."""
    if not augment.enabled:
        return None
    names = [info.name for info in task.tasks] if task.tasks else None
    return draw_view_table(image_specs(augment, len(train), train.task_ids if names else None, names),
                           augment.views, seed)
