"""Benchmark: what training-time augmentation (data.augment, toolchain/data/augment.py) costs.

  (a) rendering: one batch of views (affine_grid + grid_sample + jitter) against one training
      step of the default student (resnet18, train.batch_size 128, data=mri images,
      cross-entropy + fused AdamW), timed in interleaved rounds on the same device;
  (b) teacher: cold feature extraction (no cache) of the default teacher (litemedsam) per view:
      K views cost K x one extraction (view 0 = the images themselves, which every run
      extracts anyway), paid once and then cached. Extrapolated to the default build (all
      data=mri training images, data.augment_views, train.epochs) and set against its training.

    python bench/augment.py                          # defaults: under ~3 minutes on 2 CPU cores
    python bench/augment.py --rounds 2 --teacher-images 16    # quicker look

Prints a table and writes bench/results/augment.json. Ratios come from one run on one machine;
absolute times depend on the machine and on what else runs on it (the load average at the
start and end is recorded: a shared machine makes every number here noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medkd.toolchain.atomic import atomic_write_text
from medkd.toolchain.config import load_config
from medkd.toolchain.data import load_task
from medkd.toolchain.data.augment import augmentation, draw_view_table, image_specs
from medkd.toolchain.features import teacher_features
from medkd.toolchain.models.students import build_student
from medkd.toolchain.models.teachers import build_teacher

RESULTS = Path(__file__).resolve().parent / "results" / "augment.json"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds for (a)")
    parser.add_argument("--steps", type=int, default=2, help="training steps / renders timed per round")
    parser.add_argument("--teacher-images", type=int, default=32, help="images per cold extraction in (b)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def render_vs_step(cfg, task, views, args) -> dict:
    """(a): seconds per rendered batch and per training step, interleaved, and their ratio."""
    batch = cfg.train.batch_size
    student = build_student(cfg.student, task.num_classes, task.in_chans, task.image_size)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, fused=True)
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(task.train), generator=generator)[:batch]
    images, labels = task.train.images[index], task.train.labels[index]
    view = torch.randint(views.views, (batch,), generator=generator)

    def step():
        loss = F.cross_entropy(student(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def render():
        views.render(images, view, index)

    step(), render()  # warm-up
    steps, renders = [], []
    for _ in range(args.rounds):
        steps.append(timed(step, args.steps))
        renders.append(timed(render, args.steps))
    step_s, render_s = statistics.median(steps), statistics.median(renders)
    return {"batch_size": batch, "image_shape": list(images.shape[1:]), "student": cfg.student.name,
            "train_step_s": step_s, "render_batch_s": render_s, "render_over_step": render_s / step_s,
            "rounds": args.rounds, "per_round": args.steps}


def teacher_per_view(cfg, task, views, args) -> dict:
    """(b): cold extraction seconds per image, on the images themselves and on a rendered view."""
    teacher = build_teacher(cfg.teacher)
    count = min(args.teacher_images, len(task.train))
    images = task.train.images[:count]
    table = draw_view_table(image_specs(augmentation(cfg.data), count), views.views, cfg.data.seed)

    def extract(batch):  # no cache_dir: every call is a cold extraction
        return teacher_features(teacher, batch, None, cfg.train.teacher_batch_size, progress=False)

    extract(images[: cfg.train.teacher_batch_size])  # warm-up
    start = time.perf_counter()
    rendered = table.render_view(images, 1)
    render_s = time.perf_counter() - start
    original_s = timed(lambda: extract(images), 1)
    view_s = timed(lambda: extract(rendered), 1)
    per_image = (original_s + view_s) / (2 * count)
    return {"teacher": cfg.teacher.name, "images": count, "extract_original_s": original_s,
            "extract_view_s": view_s, "extract_s_per_image": per_image,
            "render_view_s_per_image": render_s / count, "render_over_extract": render_s / count / per_image}


def default_build(cfg, task, views, a: dict, b: dict) -> dict:
    """The default build's extra first-run teacher time against its training time (estimate)."""
    n, k = len(task.train), views.views
    steps = cfg.train.epochs * -(-n // cfg.train.batch_size)
    training_s = steps * (a["train_step_s"] + a["render_batch_s"])
    extra_teacher_s = (k - 1) * n * (b["extract_s_per_image"] + b["render_view_s_per_image"])
    return {"train_images": n, "views": k, "epochs": cfg.train.epochs, "steps": steps,
            "training_s_estimate": training_s, "extra_teacher_s_estimate": extra_teacher_s,
            "extra_teacher_over_training": extra_teacher_s / training_s,
            "rendering_over_training": steps * a["render_batch_s"] / training_s}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    cfg = load_config([])  # the default build: data=mri, student=resnet18, teacher=litemedsam
    task = load_task(cfg.data)
    settings = augmentation(cfg.data)
    views = draw_view_table(image_specs(settings, len(task.train)), settings.views, cfg.data.seed)
    a = render_vs_step(cfg, task, views, args)
    b = teacher_per_view(cfg, task, views, args)
    build = default_build(cfg, task, views, a, b)
    result = {
        "augment": settings.describe(), "render_vs_step": a, "teacher_per_view": b, "default_build": build,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "command": "python bench/augment.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "note": "ratios from one run; absolute times depend on the machine and its load",
    }
    atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.output}")
    return 0


def table(result: dict) -> str:
    a, b, d = result["render_vs_step"], result["teacher_per_view"], result["default_build"]
    rows = [
        ("augment", f"{result['augment']['spec']}, {result['augment']['views']} views"),
        (f"training step ({a['student']}, batch {a['batch_size']}, {'x'.join(map(str, a['image_shape']))})",
         f"{a['train_step_s'] * 1e3:.1f} ms"),
        ("rendering one batch of views", f"{a['render_batch_s'] * 1e3:.2f} ms"),
        ("rendering / training step", f"{a['render_over_step']:.3f}"),
        (f"{b['teacher']} cold extraction per image (one view)", f"{b['extract_s_per_image'] * 1e3:.2f} ms"),
        ("rendering a view for the teacher / its extraction", f"{b['render_over_extract']:.4f}"),
        (f"default build: teacher time of its {d['views'] - 1} extra view(s) / training "
         f"({d['train_images']} images, {d['epochs']} epochs)", f"{d['extra_teacher_over_training']:.2f}"),
        ("default build: rendering / training", f"{d['rendering_over_training']:.3f}"),
        ("load average start -> end",
         f"{result['machine']['load_average_start'][0]:.1f} -> {result['machine']['load_average_end'][0]:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'measure'.ljust(width)} | value |", f"| {'-' * width} | --- |"]
    return "\n".join([*lines, *(f"| {name.ljust(width)} | {value} |" for name, value in rows)])


if __name__ == "__main__":
    raise SystemExit(main())
