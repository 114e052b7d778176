"""Benchmark: LoRKD (low-rank task experts) vs per-task and shared KD students, multi-task data.

The paper's claim under test (Zhou et al., LoRKD): one shared student W0 with a low-rank
expert per task beats a shared multi-task student without experts and approaches or beats
one student per task, at a fraction of the per-task students' total size; the paper also
claims the experts surpass the frozen foundation model itself.

On `data=multitask` (mri, ct, fashion-mnist by default) every (label fraction, seed) trains:

  lorkd    recipe=lorkd: W0 + one expert per task (recipe config), per-task heads and
           BatchNorm statistics; each task scored with its own fused model (deployables()).
  shared   the same recipe and loss with every expert frozen at B_t = 0 (their delta
           s * B_t A_t stays exactly 0, so they compute nothing and are not counted):
           one shared kd-style student with per-task heads. recipe=lorkd cannot switch
           experts off (expert_layers matching nothing, or rank 0, is a ConfigError), so
           freezing them is the only way to get this baseline from the same code path.
  kd       one `kd` student per task (T models), each on its task alone (TaskData.task_view).
  scratch  one `scratch` student per task.

With a fraction f < 1 the same stratified labelled images are kept in every method; the
distillation methods (lorkd, shared, kd) also see the rest of the training images without
labels (the transfer set, as bench/distill.py and medkd-build do), scratch only the labelled
ones, with min(1/f, 3) times the epochs (bench/distill.py's rule). Every method trains on the
same fixed augmented views of each image (data=multitask's per-task data.augment; --no-augment
turns it off) with the teacher's features of each view, extracted by teacher.backend, as in
medkd-build.

Also reported: the frozen foundation model's own per-task linear probe (kd's
fit_linear_probe on the task's labelled training features, scored on its test features),
stored parameters (lorkd: W0 + T experts + T heads; shared: W0 + T heads; kd/scratch: the
sum of the T models), per-device parameters (the largest single deployed model), training
time (the sum over a method's models).

    python bench/lorkd.py                                   # full protocol (3 seeds, 100% and 10%)
    python bench/lorkd.py --seeds 0 --fractions 1.0 --epochs 2 --max-train 100   # quick look

Prints a table and writes bench/results/lorkd.json after every run (partial results survive
a kill; --resume adds the missing runs to it). `complete` says whether the results cover the
full protocol (3 seeds x 2 label fractions x 4 methods at the config's epochs, no caps);
`left_out` lists what they do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/distill.py, also when imported by tests

from distill import bench_config, run_one, scarce_training_set  # noqa: E402

from medkd.toolchain.data.augment import ViewTable, augmentation, training_views  # noqa: E402
from medkd.toolchain.features import view_teacher_features  # noqa: E402
from medkd.toolchain.models.teacher_runtime import runtime_extractor  # noqa: E402

from medkd.recipes import RECIPES as RECIPE_CLASSES  # noqa: E402
from medkd.recipes import UNLABELLED, build_recipe  # noqa: E402
from medkd.recipes.kd import fit_linear_probe  # noqa: E402
from medkd.toolchain.atomic import atomic_write_text  # noqa: E402
from medkd.toolchain.config import load_config  # noqa: E402
from medkd.toolchain.data import ImageSet, load_task  # noqa: E402
from medkd.toolchain.data.sampling import stratified_fraction  # noqa: E402
from medkd.toolchain.features import teacher_features  # noqa: E402
from medkd.toolchain.models.students import build_student  # noqa: E402
from medkd.toolchain.models.teachers import build_teacher  # noqa: E402
from medkd.toolchain.train import TrainSettings, accuracy, fit, predict  # noqa: E402

METHODS = ("lorkd", "shared", "kd", "scratch")
PER_TASK = ("kd", "scratch")  # one model per task
FULL_SEEDS, FULL_FRACTIONS = (0, 1, 2), (1.0, 0.1)
SCARCE_EPOCH_FACTOR = 3.0
RESULTS = Path(__file__).parent / "results" / "lorkd.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(FULL_SEEDS))
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FULL_FRACTIONS))
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's train.epochs")
    parser.add_argument("--max-train", type=int, default=None, help="cap on EACH task's training split "
                        "(default: data=multitask's max_train)")
    parser.add_argument("--max-test", type=int, default=None, help="cap on each task's test split")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="train on the images as they are (default: data=multitask's per-task data.augment)")
    parser.add_argument("--teacher", default="litemedsam")
    parser.add_argument("--student", default="mobilenetv3")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --output (same settings) and run only the missing ones")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- data


def scarce_multitask_set(task, fraction: float, seed: int, recipe_name: str) -> tuple[ImageSet, torch.Tensor]:
    """The multi-task training set `recipe_name` sees with `fraction` of the labels
    (stratified over the global classes, hence per task); returns it and the image index."""
    labelled = torch.as_tensor(stratified_fraction(task.train.labels.numpy(), fraction, seed))
    index, labels = scarce_training_set(task, labelled, RECIPE_CLASSES[recipe_name], transfer=True)
    return ImageSet(task.train.images[index], labels, task.train.task_ids[index]), index


def task_slice(task, images: ImageSet, t: int) -> tuple[ImageSet, torch.Tensor]:
    """Task t's images of a multi-task ImageSet as single-task data (local labels, UNLABELLED
    kept) and their positions in `images`. At fraction 1 this is task_view(name).train."""
    mine = torch.nonzero(images.task_ids == t).flatten()
    return ImageSet(images.images[mine], task.local_labels(images)[mine]), mine


def subset(train_feats: torch.Tensor, views: ViewTable | None, index: torch.Tensor):
    """Features and views of the images at `index` (features are K x N x D with views)."""
    if views is None:
        return train_feats[index], None
    return train_feats[:, index], ViewTable(views.params[:, index])


def epochs_for(base_epochs: int, full_size: int, train: ImageSet) -> int:
    """bench/distill.py's rule: a set of n < full_size images trains min(full/n, 3) x the epochs."""
    return round(base_epochs * min(full_size / len(train), SCARCE_EPOCH_FACTOR))


# --------------------------------------------------------------------------- models


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def freeze_experts(recipe) -> int:
    """Turn recipe=lorkd into the shared baseline: every expert's factors frozen, B_t = 0
    (its init), so s * B_t A_t is exactly 0 throughout training (fit's optimiser only takes
    parameters that require grad). Returns how many expert parameters were frozen."""
    frozen = 0
    for _, layer in recipe.student.modules_with_experts():
        with torch.no_grad():
            layer.lora_B.zero_()
        for p in (layer.lora_A, layer.lora_B):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def run_multitask(cfg, method: str, task, train: ImageSet, train_feats, seed: int, epochs: int,
                  views: ViewTable | None = None) -> dict:
    """Train lorkd (or the shared baseline) once on all tasks; score each task's fused model.
    train_feats: K x N x D with `views` (the augmented views of `train`), else N x D."""
    torch.manual_seed(seed)
    recipe_cfg = load_config(["recipe=lorkd"]).recipe
    student = build_student(cfg.student, task.num_classes, task.in_chans, task.image_size)
    recipe = build_recipe(recipe_cfg, student, train_feats.shape[-1], tasks=task.tasks)
    if method == "shared":
        freeze_experts(recipe)
    settings = TrainSettings(epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay, seed, False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        fit(recipe, train, None, settings, Path(run_dir), "bench", train_feats, log=lambda line: None, augment=views)
    seconds = time.perf_counter() - started
    counts = recipe.student.parameter_counts()
    stored = counts["stored"] - (counts["experts"] if method == "shared" else 0)
    per_task = {}
    for info, model in zip(task.tasks, recipe.deployables().values()):
        test = task.task_view(info.name).test
        per_task[info.name] = accuracy(predict(model, test.images), test.labels)
    return {"per_task": per_task, "stored_params": stored, "per_device_params": max(counts["deployed"]),
            "expert_params": counts["experts"] if method == "lorkd" else 0,
            "epochs": {info.name: epochs for info in task.tasks}, "train_seconds": round(seconds, 1)}


def run_per_task(cfg, method: str, task, train: ImageSet, train_feats, test_feats, full_sizes: dict,
                 seed: int, base_epochs: int, views: ViewTable | None = None) -> dict:
    """One `method` student per task, each trained on its task alone (bench/distill.run_one),
    on the same augmented views as the multi-task students."""
    per_task, epochs, sizes, seconds = {}, {}, {}, 0.0
    for t, info in enumerate(task.tasks):
        view = task.task_view(info.name)
        own_train, mine = task_slice(task, train, t)
        own_test_feats = test_feats[task.test.task_ids == t]
        epochs[info.name] = epochs_for(base_epochs, full_sizes[info.name], own_train)
        own_feats, own_views = subset(train_feats, views, mine)
        row = run_one(cfg, method, view, own_train, own_feats, own_test_feats, seed, epochs[info.name],
                      views=own_views)
        per_task[info.name] = row["test_accuracy"]
        seconds += row["train_seconds"]
        sizes[info.name] = parameter_count(build_student(cfg.student, info.num_classes, task.in_chans,
                                                         task.image_size))
    return {"per_task": per_task, "stored_params": sum(sizes.values()), "per_device_params": max(sizes.values()),
            "expert_params": 0, "epochs": epochs, "train_seconds": round(seconds, 1)}


def teacher_probe_accuracy(task, train: ImageSet, train_feats, test_feats, seed: int) -> dict:
    """The frozen foundation model's per-task linear probe (kd's), fitted on the task's
    labelled training features, scored on its test features."""
    kd_cfg = load_config(["recipe=kd"]).recipe
    torch.manual_seed(seed)
    scores = {}
    for t, info in enumerate(task.tasks):
        own_train, mine = task_slice(task, train, t)
        labelled = own_train.labels != UNLABELLED
        probe = fit_linear_probe(train_feats[mine][labelled], own_train.labels[labelled], info.num_classes,
                                 int(kd_cfg.probe_epochs), float(kd_cfg.probe_lr))
        test = task.task_view(info.name).test
        with torch.no_grad():
            scores[info.name] = accuracy(probe(test_feats[task.test.task_ids == t]), test.labels)
    return scores


# --------------------------------------------------------------------------- results


def summarise(rows: list[dict], tasks: list[str]) -> list[dict]:
    """Mean ± std over seeds per (fraction, method): each task, the mean over tasks, sizes, time."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["fraction"], row["method"]), []).append(row)
    out = []
    for (fraction, method), runs in groups.items():
        entry = {"fraction": fraction, "method": method, "seeds": len(runs)}
        for name in tasks + ["mean"]:
            accs = [run["mean_accuracy"] if name == "mean" else run["per_task"][name] for run in runs]
            entry[name] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
        for key in ("stored_params", "per_device_params"):
            entry[key] = runs[0].get(key)
        seconds = [run["train_seconds"] for run in runs if run.get("train_seconds") is not None]
        entry["train_seconds"] = statistics.mean(seconds) if seconds else None
        out.append(entry)
    return out


def with_mean(row: dict) -> dict:
    row["mean_accuracy"] = statistics.mean(row["per_task"].values())
    return row


def table_lines(summary: list[dict], tasks: list[str]) -> list[str]:
    """Markdown table, one row per (fraction, method), as in the README."""
    head = ["labels", "method", "seeds", *tasks, "mean", "stored params", "per-device params", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    order = {m: i for i, m in enumerate(("teacher probe",) + METHODS)}
    for s in sorted(summary, key=lambda s: (-s["fraction"], order.get(s["method"], 99))):
        cells = [f"{s['fraction']:.0%}", s["method"], str(s["seeds"])]
        cells += [f"{s[n]['mean']:.3f} ± {s[n]['std']:.3f}" if s["seeds"] > 1 else f"{s[n]['mean']:.3f}"
                  for n in tasks + ["mean"]]
        cells += [f"{s['stored_params'] / 1e6:.2f}M" if s.get("stored_params") else "-",
                  f"{s['per_device_params'] / 1e6:.2f}M" if s.get("per_device_params") else "-",
                  f"{s['train_seconds']:.0f}" if s.get("train_seconds") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def protocol_gaps(rows: list[dict], settings: dict, cfg_epochs: int) -> list[str]:
    """What the results leave out of the full protocol (empty: complete): every method for
    every seed and label fraction, at the config's epochs, without caps."""
    gaps = []
    done = {(r["fraction"], r["seed"], r["method"]) for r in rows}
    for fraction in FULL_FRACTIONS:
        for seed in FULL_SEEDS:
            missing = [m for m in METHODS if (fraction, seed, m) not in done]
            if missing:
                what = "not run" if len(missing) == len(METHODS) else f"{', '.join(missing)} not run"
                gaps.append(f"{fraction:.0%} labels, seed {seed}: {what}")
    if settings.get("epochs") and settings["epochs"] != cfg_epochs:
        gaps.append(f"{settings['epochs']} epochs instead of the config's {cfg_epochs}")
    if settings.get("max_train") or settings.get("max_test"):
        gaps.append(f"caps max_train={settings.get('max_train')} max_test={settings.get('max_test')} per task")
    return gaps


def run_settings(args) -> dict:
    """What must match for results to be pooled (--resume)."""
    cfg = bench_config(args, "multitask")
    return {"teacher": args.teacher, "student": args.student, "epochs": args.epochs,
            "max_train": args.max_train, "max_test": args.max_test,
            "augment": augmentation(cfg.data).describe(),
            "teacher_backend": f"{cfg.teacher.backend} {cfg.teacher.precision}"}


def load_previous(args) -> dict | None:
    """With --resume, the earlier results in --output (None without it or without a file);
    a one-line error if they were measured with other settings."""
    if not args.resume or not args.output.is_file():
        return None
    previous = json.loads(args.output.read_text())
    if previous.get("settings") != run_settings(args):
        raise SystemExit(f"--resume: {args.output} was measured with {previous.get('settings')}, "
                         f"this run uses {run_settings(args)}; use another --output")
    return previous


def versions() -> dict:
    import timm

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "medkd_commit": commit}


def write_results(args, cfg, task, rows, probes, invocations, finished: bool) -> None:
    names = [t.name for t in task.tasks]
    gaps = protocol_gaps(rows, run_settings(args), cfg.train.epochs)
    if not finished:
        gaps.append("run stopped before the end (partial results)")
    invocations[-1]["load_average_end"] = list(os.getloadavg())
    probe_rows = [{"fraction": p["fraction"], "method": "teacher probe", "per_task": p["per_task"],
                   "train_seconds": None} for p in probes]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps({
        "benchmark": "lorkd",
        "claim": "LoRKD experts beat the shared model and approach or beat per-task models at a fraction "
                 "of their total size (and surpass the foundation model's own probe)",
        "command": " && ".join(inv["command"] for inv in invocations),
        "complete": not gaps,
        "left_out": gaps,
        "versions": versions(),
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                  f"{os.cpu_count()} cores)",
        "invocations": invocations,  # each with the machine's load average (1, 5, 15 min) at start and end
        "settings": run_settings(args),
        "tasks": {t.name: {"classes": t.num_classes, "train": int((task.train.task_ids == i).sum()),
                           "test": int((task.test.task_ids == i).sum())} for i, t in enumerate(task.tasks)},
        "image_shape": [task.in_chans, task.image_size, task.image_size],
        "epochs_full_labels": cfg.train.epochs,
        "scarce_epoch_factor": SCARCE_EPOCH_FACTOR,
        "unlabelled_transfer_set": True,
        "shared_baseline": "recipe=lorkd with every expert frozen at B_t=0 (delta exactly 0): shared W0 "
                           "(incl. BatchNorm affine) + per-task heads + per-task BatchNorm statistics",
        "summary": summarise([with_mean(dict(r)) for r in probe_rows], names) + summarise(rows, names),
        "teacher_probe_runs": probes,
        "runs": rows,
    }, indent=2))


def main(argv=None) -> int:
    args = parse_args(argv)
    previous = load_previous(args) or {}
    invocations = previous.get("invocations", []) + [{
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_start": list(os.getloadavg())}]
    cfg = bench_config(args, "multitask")
    task = load_task(cfg.data)
    names = [t.name for t in task.tasks]
    teacher = build_teacher(cfg.teacher)
    cache = Path(cfg.cache_dir)
    # As medkd-build: the teacher run by teacher.backend, each training image's fixed augmented
    # views (drawn once over the whole training set; subsets index them) with their features.
    extractor = runtime_extractor(teacher, cfg.teacher.backend, cfg.teacher.precision, cache,
                                  calibration_images=task.train.images)
    views = training_views(augmentation(cfg.data), task.train, task, int(cfg.data.seed))

    def extract(images, desc):
        return teacher_features(extractor, images, cache, cfg.train.teacher_batch_size, f"teacher ({desc})")

    train_feats = (extract(task.train.images, "train") if views is None
                   else view_teacher_features(extract, task.train.images, views, "train"))
    test_feats = extract(task.test.images, "test")
    plain_train_feats = train_feats if views is None else train_feats[0]  # view 0: the images themselves
    full_sizes = {t.name: int((task.train.task_ids == i).sum()) for i, t in enumerate(task.tasks)}
    rows, probes = previous.get("runs", []), previous.get("teacher_probe_runs", [])
    done = {(r["fraction"], r["seed"], r["method"]) for r in rows}
    for fraction in args.fractions:
        for seed in args.seeds:
            if not any(p["fraction"] == fraction and p["seed"] == seed for p in probes):
                distil_train, index = scarce_multitask_set(task, fraction, seed, "kd")
                probe = teacher_probe_accuracy(task, distil_train, plain_train_feats[index], test_feats, seed)
                probes.append({"fraction": fraction, "seed": seed, "per_task": probe})
                print(f"{fraction:.0%} seed {seed} teacher probe "
                      + " ".join(f"{n} {a:.4f}" for n, a in probe.items()), flush=True)
            for method in args.methods:
                if (fraction, seed, method) in done:
                    continue
                recipe_name = "lorkd" if method in ("lorkd", "shared") else method
                train, index = scarce_multitask_set(task, fraction, seed, recipe_name)
                row = {"fraction": fraction, "seed": seed, "method": method,
                       "labelled": int((train.labels != UNLABELLED).sum()), "train_size": len(train)}
                feats, train_views = subset(train_feats, views, index)
                if method in PER_TASK:
                    row.update(run_per_task(cfg, method, task, train, feats, test_feats, full_sizes,
                                            seed, cfg.train.epochs, train_views))
                else:
                    epochs = epochs_for(cfg.train.epochs, len(task.train), train)
                    row.update(run_multitask(cfg, method, task, train, feats, seed, epochs, train_views))
                row["load_average_1min"] = os.getloadavg()[0]
                rows.append(with_mean(row))
                write_results(args, cfg, task, rows, probes, invocations, finished=False)
                print(f"{fraction:.0%} seed {seed} {method:<8} "
                      + " ".join(f"{n} {a:.4f}" for n, a in row["per_task"].items())
                      + f"  mean {row['mean_accuracy']:.4f}  ({row['train_seconds']} s)", flush=True)
    write_results(args, cfg, task, rows, probes, invocations, finished=True)
    summary = json.loads(args.output.read_text())["summary"]
    print("\n" + "\n".join(table_lines(summary, names)))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
