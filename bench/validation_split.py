"""What the spatial validation split (train.val_split=auto on mri and ct) costs and holds out.

For each data set, training cap (data.max_train), label fraction (data.train_fraction) and
train.val_fraction, over seeds: the validation share of the labelled training images (asked
vs got, and the least and most any class got), the labelled images lost to the guard slabs,
the withheld-label (transfer set) images dropped, and how many slices separate the nearest
validation and training patches. Counts only, no timings: the numbers are exact and repeat
on any machine.

    python bench/validation_split.py

Prints a table and writes bench/results/validation_split.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medkd.toolchain.atomic import atomic_write_text
from medkd.toolchain.data import load_task
from medkd.toolchain.data.val_split import split_validation

RESULTS = Path(__file__).parent / "results" / "validation_split.json"
SETTINGS = [  # (data set, max_train, train_fraction)
    ("mri", None, 1.0), ("mri", 800, 1.0), ("mri", 800, 0.25),
    ("ct", None, 1.0), ("ct", 800, 1.0), ("ct", 800, 0.25),
]


def measure(name: str, max_train: int | None, train_fraction: float, val_fraction: float, seed: int) -> dict:
    task = load_task({"name": name, "max_train": max_train, "max_test": 8, "train_fraction": train_fraction,
                      "image_size": 8, "seed": seed})
    split = split_validation(task, val_fraction, seed)
    labels, val_labels = task.train.labels.numpy(), split.val.labels.numpy()
    per_class = [float((val_labels == c).sum() / (labels == c).sum()) for c in range(task.num_classes)]
    val_slabs = split.val.spatial_group.numpy()
    train_slabs = split.task.train.spatial_group.numpy()
    unlabelled = 0 if task.unlabelled is None else len(task.unlabelled)
    return {
        "labelled": len(labels),
        "validation": len(val_labels) / len(labels),
        "class_min": min(per_class),
        "class_max": max(per_class),
        "guard": split.summary["guard_dropped"] / len(labels),
        "unlabelled_dropped": split.summary["unlabelled_dropped"] / unlabelled if unlabelled else 0.0,
        "min_slab_gap": int(np.abs(val_slabs[:, None] - train_slabs[None, :]).min()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--val-fractions", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    header = (f"{'data':5} {'max_train':>9} {'labels':>6} {'asked':>5} | {'val':>5} {'class min-max':>13} "
              f"{'guard':>5} {'transfer dropped':>16} {'min slab gap':>12}")
    print(header)
    print("-" * len(header))
    for name, max_train, train_fraction in SETTINGS:
        for val_fraction in args.val_fractions:
            runs = [measure(name, max_train, train_fraction, val_fraction, seed) for seed in args.seeds]
            mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
            row = {"data": name, "max_train": max_train, "train_fraction": train_fraction,
                   "val_fraction": val_fraction, "seeds": args.seeds, "mean": mean,
                   "class_min": min(r["class_min"] for r in runs), "class_max": max(r["class_max"] for r in runs),
                   "min_slab_gap": min(r["min_slab_gap"] for r in runs), "runs": runs}
            rows.append(row)
            print(f"{name:5} {str(max_train):>9} {train_fraction:>6.2f} {val_fraction:>5.2f} | "
                  f"{mean['validation']:>5.3f} {row['class_min']:>6.3f}-{row['class_max']:.3f} "
                  f"{mean['guard']:>5.3f} {mean['unlabelled_dropped']:>16.3f} {row['min_slab_gap']:>12d}")
    print("val, guard: shares of the labelled training images (mean over seeds); class min-max: "
          "least/most validation share of any class over all seeds; transfer dropped: share of the "
          "withheld-label images in validation or guard slabs; min slab gap: 2 = one guard slab between.")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps({
        "what": "spatial validation split (train.val_split=auto): validation share, guard cost, per-class spread",
        "command": "python bench/validation_split.py",
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
