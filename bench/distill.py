"""Benchmark: RD vs KD vs scratch on the MRI task and Fashion-MNIST, full and data-scarce.

The paper's claim under test: RD beats KD and training from scratch, most of all when
labels are scarce. Every (dataset, label fraction, seed) trains all three recipes with
the same labelled images, the same student and the same frozen-teacher features (once
per dataset, indexed for subsets). With scarce labels the distillation recipes also
see the unlabelled rest of the training images (the transfer set; --no-transfer turns
that off), since withholding labels does not make the images disappear.

    python bench/distill.py                      # full protocol (3 seeds, 100% and 10%)
    python bench/distill.py --seeds 0 --epochs 2 --max-train 256   # quick look

Prints a table (mean ± std of test accuracy over seeds) and writes
bench/results/distill.json. Reports what it measures, whichever way it comes out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from medkd.recipes import RECIPES as RECIPE_CLASSES
from medkd.recipes import UNLABELLED, build_recipe
from medkd.toolchain.config import load_config
from medkd.toolchain.data import ImageSet, load_task
from medkd.toolchain.data.sampling import stratified_fraction
from medkd.toolchain.features import teacher_features
from medkd.toolchain.models.students import build_student
from medkd.toolchain.models.teachers import build_teacher
from medkd.toolchain.train import TrainSettings, accuracy, fit, predict, teacher_branch_accuracy

RECIPES = ("rd", "kd", "scratch")
RESULTS = Path(__file__).parent / "results" / "distill.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mri", "fashion-mnist"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's train.epochs")
    parser.add_argument(
        "--scarce-epoch-factor", type=float, default=3.0,
        help="a fraction-f run trains min(1/f, factor) times the epochs, so tiny sets still get enough steps",
    )
    parser.add_argument(
        "--no-transfer", dest="transfer", action="store_false",
        help="with scarce labels, train every recipe on the labelled images only "
        "(default: kd/rd also distil on the unlabelled rest, the transfer set)",
    )
    parser.add_argument("--max-train", type=int, default=None, help="cap on the full training set")
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--teacher", default="litemedsam")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def bench_config(args, dataset: str):
    overrides = [f"data={dataset}", f"teacher={args.teacher}", f"student={args.student}", "progress=false"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_train:
        overrides.append(f"data.max_train={args.max_train}")
    if args.max_test:
        overrides.append(f"data.max_test={args.max_test}")
    return load_config(overrides)


def scarce_training_set(task, labelled_index: torch.Tensor, recipe_cls, transfer: bool):
    """The training images and labels a recipe sees when only `labelled_index` keep labels.

    Distillation recipes (with `transfer`) keep every image as a transfer set, with the
    withheld labels set to UNLABELLED; the others train on the labelled images alone.
    Returns (image_index, labels).
    """
    if transfer and recipe_cls.uses_unlabelled:
        labels = torch.full_like(task.train.labels, UNLABELLED)
        labels[labelled_index] = task.train.labels[labelled_index]
        return torch.arange(len(task.train)), labels
    return labelled_index, task.train.labels[labelled_index]


def run_one(cfg, recipe_name: str, task, train: ImageSet, train_feats, test_feats, seed: int, epochs: int) -> dict:
    torch.manual_seed(seed)
    recipe_cfg = load_config([f"recipe={recipe_name}"]).recipe
    student = build_student(cfg.student, task.num_classes, task.in_chans, task.image_size)
    recipe = build_recipe(recipe_cfg, student, train_feats.shape[1])
    settings = TrainSettings(epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay, seed, False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        fit(recipe, train, None, settings, Path(run_dir), "bench",
            train_feats if recipe.needs_teacher else None, log=lambda line: None)
    # The test split is evaluated once, after training (fit never sees it).
    return {
        "test_accuracy": accuracy(predict(recipe.deployable(), task.test.images), task.test.labels),
        "teacher_test_accuracy": teacher_branch_accuracy(recipe, test_feats if recipe.needs_teacher else None,
                                                         task.test.labels),
        "train_size": len(train),
        "labelled": int((train.labels != UNLABELLED).sum()),
        "epochs": epochs,
        "train_seconds": round(time.perf_counter() - started, 1),
    }


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["fraction"], row["recipe"]), []).append(row["test_accuracy"])
    return [
        {"dataset": d, "fraction": f, "recipe": r, "seeds": len(accs),
         "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
        for (d, f, r), accs in groups.items()
    ]


def print_table(summary: list[dict]) -> None:
    print(f"\n{'dataset':<14}{'labels':>7}  " + "".join(f"{r:>16}" for r in RECIPES) + "   rd best?")
    keys = sorted({(s["dataset"], s["fraction"]) for s in summary}, key=lambda k: (k[0], -k[1]))
    for dataset, fraction in keys:
        cells = {s["recipe"]: s for s in summary if s["dataset"] == dataset and s["fraction"] == fraction}
        line = f"{dataset:<14}{fraction:>7.0%}  "
        line += "".join(f"{cells[r]['mean']:>9.4f}±{cells[r]['std']:.3f}" if r in cells else f"{'-':>16}" for r in RECIPES)
        if all(r in cells for r in RECIPES):
            others = max(cells[r]["mean"] for r in RECIPES if r != "rd")
            if cells["rd"]["mean"] > others:
                line += "   yes"
            else:
                best = max(RECIPES, key=lambda r: cells[r]["mean"])
                line += "   tie" if cells["rd"]["mean"] == others else f"   no ({best})"
        print(line)


def write_results(args, cfg, rows: list[dict], complete: bool) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "benchmark": "distill",
        "claim": "RD beats KD and scratch, most in the data-scarce setting",
        "complete": complete,
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "teacher": args.teacher, "student": args.student,
        "epochs_full_labels": cfg.train.epochs,
        "scarce_epoch_factor": args.scarce_epoch_factor,
        "unlabelled_transfer_set": args.transfer,
        "max_train": args.max_train, "max_test": args.max_test,
        "summary": summarise(rows), "runs": rows,
    }, indent=2))


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for dataset in args.datasets:
        cfg = bench_config(args, dataset)
        task = load_task(cfg.data)
        teacher = build_teacher(cfg.teacher)
        cache = Path(cfg.cache_dir)
        train_feats = teacher_features(teacher, task.train.images, cache, cfg.train.teacher_batch_size, "teacher (train)")
        test_feats = teacher_features(teacher, task.test.images, cache, cfg.train.teacher_batch_size, "teacher (test)")
        for fraction in args.fractions:
            for seed in args.seeds:
                labelled_index = torch.as_tensor(stratified_fraction(task.train.labels.numpy(), fraction, seed))
                for recipe_name in RECIPES:
                    index, labels = scarce_training_set(task, labelled_index, RECIPE_CLASSES[recipe_name], args.transfer)
                    train = ImageSet(task.train.images[index], labels)
                    # Few images -> few steps per epoch; give small sets more epochs.
                    epochs = round(cfg.train.epochs * min(len(task.train) / len(index), args.scarce_epoch_factor))
                    row = {"dataset": dataset, "fraction": fraction, "seed": seed, "recipe": recipe_name}
                    row.update(run_one(cfg, recipe_name, task, train, train_feats[index], test_feats, seed, epochs))
                    rows.append(row)
                    write_results(args, cfg, rows, complete=False)  # partial results survive a kill
                    print(f"{dataset} {fraction:.0%} seed {seed} {recipe_name:<8} "
                          f"acc {row['test_accuracy']:.4f}  ({row['train_seconds']} s, n={row['train_size']})",
                          flush=True)
    print_table(summarise(rows))
    write_results(args, cfg, rows, complete=True)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
