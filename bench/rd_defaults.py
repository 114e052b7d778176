"""Choose rd's switch defaults by measurement: validation accuracy of each variant.

Every variant of a small grid over rd's switches (recipes/rd.py: cka_detach_teacher,
logit_weight, reprogram_lr_scale, ...) trains as `medkd-build recipe=rd` would, on the
training side minus a held-out validation split, and is scored on that split after its
last epoch. The split is medkd.toolchain.pipeline.split_validation's (the one
`train.val_fraction` makes, with the config's `train.val_split` rule), so it is whatever
that function holds out (the JSON records how, per label fraction and seed). The test
split is never evaluated here: choosing defaults on it would leak it into every later test
number.

For each (label fraction, seed) the data, the split and the frozen-teacher features are
made once and shared by every variant; every variant starts from the same student weights
(the seed). With a label fraction below 1 the withheld-label images are rd's transfer set,
as in medkd-build. Each variant is compared with the configured defaults seed by seed: the same split, features and initialisation, so the split's difficulty,
which moves accuracy more between seeds than any switch does, cancels. A variant is
recommended only where its paired gain exceeds the gains' standard deviation over seeds
(`beats_defaults`); otherwise the defaults stay. Timings on the shared 2-core machine are noisy.
Training sees what medkd-build's training sees: the data set's augmented views
(data.augment, data.augment_views; `--override data.augment=none` turns them off) with the
teacher's features of each view, extracted by the configured teacher.backend.

    python bench/rd_defaults.py                    # full grid: 16 variants x 3 seeds x 100%/10% labels (long)
    python bench/rd_defaults.py --design one-at-a-time --fractions 1.0   # 5 variants x 3 seeds
    python bench/rd_defaults.py --epochs 1 --seeds 0 --fractions 1.0 --max-train 256 \\
        --output /tmp/rd_defaults.json             # smoke run
    python bench/rd_defaults.py --grid logit_weight=0,0.5,1 --grid logit_temperature=2,4
    python bench/rd_defaults.py --recompute        # re-summarise the runs in --output

Prints a table and writes bench/results/rd_defaults.json after every run (partial results
survive a kill; `complete` says whether they cover the full protocol: the default grid,
seeds 0-2, 100% and 10% labels, the config's epochs, no cap on the training images; either
design).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from medkd.recipes import RECIPES, UNLABELLED, build_recipe
from medkd.toolchain.atomic import atomic_write_text
from medkd.toolchain.config import load_config
from medkd.toolchain.data import load_task
from medkd.toolchain.errors import UserError
from medkd.toolchain.data.augment import augmentation, training_views
from medkd.toolchain.features import teacher_features, view_teacher_features
from medkd.toolchain.models.teacher_runtime import runtime_extractor
from medkd.toolchain.models.students import Student, build_student
from medkd.toolchain.models.teachers import build_teacher
from medkd.toolchain.pipeline import split_validation, training_set
from medkd.toolchain.train import TrainSettings, fit

RESULTS = Path(__file__).parent / "results" / "rd_defaults.json"
# rd.yaml key -> values tried (Hydra override syntax). The first value of each is the
# configured default, so the first variant is the defaults.
DEFAULT_GRID = {
    "cka_detach_teacher": ["false", "true"],
    "logit_weight": ["1.0", "0.0"],
    "logit_when": ["transfer_set", "always"],
    "reprogram_lr_scale": ["1.0", "5.0"],
}
DESIGNS = ("full", "one-at-a-time")


def parse_grid(items: list[str] | None) -> dict[str, list[str]]:
    """`KEY=V1,V2` items -> {KEY: [V1, V2]}; none given -> DEFAULT_GRID."""
    if not items:
        return dict(DEFAULT_GRID)
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UserError(f"--grid expects KEY=V1,V2,..., got '{item}'")
        grid[key.removeprefix("recipe.")] = values.split(",")
    return grid


def variants(grid: dict[str, list[str]], design: str = "full") -> list[dict[str, str]]:
    """The variants to train; the first is the current defaults (every key's first value).

    full: every combination. one-at-a-time: the defaults, then each other value of one key
    with the rest at their defaults (1 + sum(len - 1) runs instead of the product; it
    measures each switch alone, not their interactions)."""
    keys = list(grid)
    if design == "full":
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    defaults = {k: grid[k][0] for k in keys}
    return [defaults] + [{**defaults, k: v} for k in keys for v in grid[k][1:]]


def variant_name(variant: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in variant.items())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mri", help="data= option (default: mri)")
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.1],
                        help="data.train_fraction values (labels kept)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the labelled training images held out (as train.val_fraction)")
    parser.add_argument("--val-split", default=None,
                        help="train.val_split rule (auto | spatial | random); default: the config's")
    parser.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                        help=f"rd key and values to try (repeatable); default: "
                             f"{' '.join(k + '=' + ','.join(v) for k, v in DEFAULT_GRID.items())}")
    parser.add_argument("--design", choices=DESIGNS, default="full",
                        help="full: every combination of the grid; one-at-a-time: the defaults and each "
                             "key changed alone (default: full)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's train.epochs")
    parser.add_argument("--max-train", type=int, default=None, help="cap on the training images")
    parser.add_argument("--teacher", default="litemedsam")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--override", action="append", default=[],
                        help="extra config override for every run, e.g. data.augment=none")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--recompute", action="store_true",
                        help="train nothing: re-summarise the runs already in --output and rewrite it")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error("--val-fraction must lie in (0, 1): the defaults are chosen on held-out images")
    return args


def base_overrides(args, fraction: float, seed: int) -> list[str]:
    overrides = ["recipe=rd", f"data={args.data}", f"teacher={args.teacher}", f"student={args.student}",
                 f"data.train_fraction={fraction}", f"seed={seed}", "progress=false"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_train:
        overrides.append(f"data.max_train={args.max_train}")
    if args.val_split:
        overrides.append(f"train.val_split={args.val_split}")
    return overrides + list(args.override)


def run_variant(cfg, task, train, val, train_feats, val_feats, teacher_dim: int, views=None) -> dict:
    """Train one rd variant on `train` (task's training side without `val`, with the transfer
    set); score it on `val` after the last epoch."""
    torch.manual_seed(cfg.seed)  # the same student initialisation for every variant
    student = build_student(cfg.student, task.num_classes, task.in_chans, task.image_size)
    recipe = build_recipe(cfg.recipe, student, teacher_dim)
    settings = TrainSettings(cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay,
                             cfg.seed, False, cfg.train.precision)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        result = fit(recipe, train, val, settings, Path(run_dir), "rd-defaults", train_feats, val_feats,
                     log=lambda line: None, augment=views)
    last = result.history[-1]
    return {
        "val_accuracy": last["val_accuracy"],
        "teacher_val_accuracy": last.get("teacher_val_accuracy"),
        "final_loss": last["loss"],
        "train_size": len(train),
        "labelled": int((train.labels != UNLABELLED).sum()),
        "val_size": len(val),
        "epochs": cfg.train.epochs,
        "train_seconds": round(time.perf_counter() - started, 1),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_gains(rows: list[dict], name: str, current: str) -> list[float]:
    """Validation accuracy of `name` minus the current defaults' on the same (fraction, seed):
    the same split, teacher features and student initialisation, so the split's difficulty
    (which varies far more between seeds than the variants do) cancels."""
    base = {(r["fraction"], r["seed"]): r["val_accuracy"] for r in rows if r["variant"] == current}
    return [r["val_accuracy"] - base[(r["fraction"], r["seed"])] for r in rows
            if r["variant"] == name and (r["fraction"], r["seed"]) in base]


def _entry(rows: list[dict], name: str, current: str, **key) -> dict:
    """`name`'s accuracy over its runs in `rows` and its paired gain over `current`'s."""
    mean, std = _mean_std([r["val_accuracy"] for r in rows if r["variant"] == name])
    gains = paired_gains(rows, name, current)
    gain, gain_std = _mean_std(gains) if gains else (None, None)
    return {**key, "variant": name, "seeds": sum(r["variant"] == name for r in rows), "mean": mean, "std": std,
            "gain_over_defaults": gain, "gain_std": gain_std, "wins": sum(g > 0 for g in gains),
            "pairs": len(gains)}


def beats_defaults(entry: dict) -> bool:
    """The adoption rule: a paired gain over the current defaults larger than its standard
    deviation over seeds, from at least 2 seeds. Anything less keeps the defaults."""
    gain, spread = entry["gain_over_defaults"], entry["gain_std"]
    return entry["pairs"] >= 2 and gain is not None and gain > 0 and gain > spread


def summarise(rows: list[dict], names: list[str]) -> dict:
    """Per fraction and overall: every variant's mean/std validation accuracy, its paired
    gain over the current defaults (names[0]), and the choice."""
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    table = []
    for fraction in fractions:
        here = [r for r in rows if r["fraction"] == fraction]
        table += [_entry(here, name, names[0], fraction=fraction) for name in names
                  if any(r["variant"] == name for r in here)]
    choices = {str(f): _choice([t for t in table if t["fraction"] == f], names[0]) for f in fractions}
    # Overall: a variant's runs over every fraction (its mean is the mean of its per-fraction means).
    overall = []
    for name in names:
        means = [t["mean"] for t in table if t["variant"] == name]
        if len(means) == len(fractions):
            overall.append(_entry(rows, name, names[0]) | {"mean": statistics.mean(means)})
    choices["overall"] = _choice(overall, names[0])
    return {"rule": " ".join(beats_defaults.__doc__.split("The adoption rule: ")[1].split()),
            "table": table, "overall": overall, "choice": choices}


def _choice(entries: list[dict], current: str) -> dict | None:
    """The best variant by mean, and the recommendation: the variant with the largest paired
    gain among those that beat the defaults by the rule, else the defaults."""
    if not entries:
        return None
    best = max(entries, key=lambda e: e["mean"])
    winners = sorted((e for e in entries if e["variant"] != current and beats_defaults(e)),
                     key=lambda e: e["gain_over_defaults"], reverse=True)
    return {
        "best_by_mean": best["variant"], "mean": best["mean"],
        "beat_the_defaults": [e["variant"] for e in winners],
        "recommended": winners[0]["variant"] if winners else current,
    }


def print_table(summary: dict, names: list[str]) -> None:
    fractions = sorted({t["fraction"] for t in summary["table"]}, reverse=True)
    width = max(len(n) for n in names) + 2
    print("\nvalidation accuracy, mean ± std over seeds; [paired gain over the defaults ± std, wins/seeds]"
          " (test split not evaluated)")
    print(f"{'variant':<{width}}" + "".join(f"{f:>34.0%}" for f in fractions))
    for name in names:
        line = f"{name:<{width}}"
        for f in fractions:
            cell = next((t for t in summary["table"] if t["fraction"] == f and t["variant"] == name), None)
            if cell is None:
                line += f"{'-':>34}"
            elif name == names[0]:
                line += f"{cell['mean']:>9.4f}±{cell['std']:.3f}{'(current defaults)':>19}"
            else:
                line += (f"{cell['mean']:>9.4f}±{cell['std']:.3f} [{cell['gain_over_defaults']:+.3f}±"
                         f"{cell['gain_std']:.3f}, {cell['wins']}/{cell['pairs']}]")
        print(line)
    print(f"rule: {summary['rule']}")
    for key, choice in summary["choice"].items():
        if choice:
            label = "overall" if key == "overall" else f"{float(key):.0%} labels"
            beat = ", ".join(choice["beat_the_defaults"]) or "none"
            print(f"{label}: best by mean {choice['best_by_mean']}; beat the defaults: {beat}; "
                  f"recommended: {choice['recommended']}")


def full_protocol(args, grid) -> bool:
    """The default grid, 3 seeds, 100% and 10% labels, the config's epochs, no cap."""
    return (grid == DEFAULT_GRID and set(args.seeds) >= {0, 1, 2} and set(args.fractions) >= {1.0, 0.1}
            and not args.epochs and not args.max_train and not args.override)


def write_results(args, grid, names, rows, splits: dict, finished: bool) -> None:
    payload = {
        "benchmark": "rd_defaults",
        "purpose": "choose rd's switch defaults on a validation split carved from the training side",
        "finished": finished,  # every run of this invocation done
        "complete": finished and full_protocol(args, grid),
        "test_split_evaluated": False,
        "validation_split": {"function": "medkd.toolchain.pipeline.split_validation",
                             "doc": (split_validation.__doc__ or "").strip().splitlines()[0],
                             "val_fraction": args.val_fraction,
                             "rule": args.val_split or "the config's train.val_split",
                             "described": splits},
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "data": args.data, "teacher": args.teacher, "student": args.student,
        "epochs": args.epochs or "config", "max_train": args.max_train, "overrides": args.override,
        "fractions": args.fractions, "seeds": args.seeds,
        "grid": grid, "design": args.design, "current_defaults": names[0],
        "summary": summarise(rows, names) if rows else None,
        "runs": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(payload, indent=2) + "\n")


def recompute(path: Path) -> int:
    """Re-summarise the runs in `path` with this script's summary and rule (e.g. after the
    rule changed), keeping everything else."""
    if not path.is_file():
        raise UserError(f"--recompute: no results at {path}")
    payload = json.loads(path.read_text())
    names = list(dict.fromkeys(r["variant"] for r in payload["runs"]))
    names.remove(payload["current_defaults"])
    names.insert(0, payload["current_defaults"])
    payload["summary"] = summarise(payload["runs"], names)
    print_table(payload["summary"], names)
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    print(f"\nrewrote the summary in {path}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.recompute:
        return recompute(args.output)
    grid = parse_grid(args.grid)
    grid_variants = variants(grid, args.design)
    names = [variant_name(v) for v in grid_variants]
    # Every key and value must compose and build before anything loads or trains: an unknown
    # key or a bad value is a one-line ConfigError now, not after the first hours of runs.
    for variant in grid_variants:
        cfg = load_config(base_overrides(args, args.fractions[0], args.seeds[0])
                          + [f"recipe.{k}={v}" for k, v in variant.items()])
        build_recipe(cfg.recipe, Student("check", "identity", nn.Identity(), 1, 2, 1, 1), 1)
    print(f"{len(grid_variants)} variants x {len(args.seeds)} seeds x {len(args.fractions)} label fractions "
          f"= {len(grid_variants) * len(args.seeds) * len(args.fractions)} runs", flush=True)
    teacher = None
    rows: list[dict] = []
    splits: dict[str, str] = {}  # "fraction/seed" -> how split_validation held out the images
    for fraction in args.fractions:
        for seed in args.seeds:
            cfg = load_config(base_overrides(args, fraction, seed))
            described: list[str] = []
            task, val = split_validation(load_task(cfg.data), args.val_fraction, seed, cfg.train.val_split,
                                         log=described.append)
            splits[f"{fraction}/{seed}"] = " ".join(described)
            teacher = teacher or build_teacher(cfg.teacher)
            pool = training_set(task, RECIPES["rd"])  # with the withheld-label images, as medkd-build
            # rd caches the frozen teacher's pooled features (Recipe.feature_extractor's default).
            # As medkd-build: the data set's augmented views, the teacher run by teacher.backend.
            cache = Path(cfg.cache_dir) if cfg.cache_dir else None
            extractor = runtime_extractor(teacher, cfg.teacher.backend, cfg.teacher.precision, cache,
                                          calibration_images=pool.images)
            views = training_views(augmentation(cfg.data), pool, task, cfg.data.seed)

            def features(images, desc):
                return teacher_features(extractor, images, cache, cfg.train.teacher_batch_size, desc, progress=False)

            train_feats = (features(pool.images, "teacher (train)") if views is None
                           else view_teacher_features(features, pool.images, views, "train"))
            val_feats = features(val.images, "teacher (val)")
            for variant, name in zip(grid_variants, names):
                run_cfg = load_config(base_overrides(args, fraction, seed)
                                      + [f"recipe.{k}={v}" for k, v in variant.items()])
                row = {"fraction": fraction, "seed": seed, "variant": name, **variant}
                row.update(run_variant(run_cfg, task, pool, val, train_feats, val_feats, teacher.feature_dim, views))
                rows.append(row)
                write_results(args, grid, names, rows, splits, finished=False)
                print(f"{fraction:.0%} seed {seed} {name:<60} val acc {row['val_accuracy']:.4f}  "
                      f"teacher branch {row['teacher_val_accuracy']:.4f}  ({row['train_seconds']} s)", flush=True)
    print_table(summarise(rows, names), names)
    write_results(args, grid, names, rows, splits, finished=True)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
