"""Benchmark: RD vs KD vs PEFT-LoRA vs scratch, full and scarce labels, with RD's ablations.

The paper's claim under test: RD beats PEFT and KD (and training from scratch), most of all
when labels are scarce. Every (teacher, dataset, label fraction, seed) trains every arm with
the same labelled images, the same student, the same augmented views and the same cached
frozen-teacher features (once per dataset and feature extractor, indexed for subsets). With
scarce labels the distillation recipes also see the unlabelled rest of the training images
(the transfer set; --no-transfer turns that off), since withholding labels does not make the
images disappear.

Arms (ARMS): scratch, kd, lora (the foundation model fine-tuned with PEFT LoRA + a linear
head), rd-paper (RD with every switch off: the loss before the issue's changes) and rd (the
configured defaults, chosen on validation splits by bench/rd_defaults.py: rd-paper plus the
logit term where there is a transfer set). --ablation adds rd-paper without each of its parts:
co-training (teacher-branch CE), the shared head, CKA; and rd-paper with the logit term
(rd-with-logit, which the paper's loss lacks). The test split is evaluated once per run, after
training, and never used to choose anything. Each row records its resolved recipe config. An
arm that would train what a run already made on the same labels and seed trained (by the
recipe's effective config: rd is rd-with-logit with 10% labels and rd-paper with all) is not
trained again: its row copies that run's and names it in `same_run_as`. A row whose arm now
means something else (a default moved) moves to `superseded_runs` and its arm trains again.

    python bench/distill.py                      # main arms, mri + ct + fashion-mnist, 3 seeds
    python bench/distill.py --ablation --datasets mri ct
    python bench/distill.py --seeds 0 --epochs 2 --max-train 256   # quick look

    python bench/distill.py --resume --datasets ct   # add ct's runs to the results already there
    python bench/distill.py --resume --arms lora --device cuda   # train on a GPU (rows record where)
    python bench/distill.py --merge gpu/distill.json   # pool another machine's runs (same settings)

Prints a table (mean ± std of test accuracy over seeds) and writes bench/results/distill.json
after every run (partial results survive a kill; --resume adds the missing runs to it).
`complete` says whether the runs cover the full protocol (the main arms on mri, ct and
fashion-mnist, 100% and 10% labels, seeds 0-2, the litemedsam teacher, default settings);
`left_out` lists what they do not. Reports what it measures, whichever way it comes out.
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
from _results import command_history
from omegaconf import OmegaConf

from medkd.recipes import RECIPES as RECIPE_CLASSES
from medkd.recipes import UNLABELLED, build_recipe
from medkd.toolchain.atomic import atomic_write_text
from medkd.toolchain.config import load_config
from medkd.toolchain.errors import UserError
from medkd.toolchain.data import ImageSet, load_task
from medkd.toolchain.data.augment import ViewTable, augmentation, draw_view_table, image_specs
from medkd.toolchain.data.sampling import stratified_fraction
from medkd.toolchain.device import resolve_device
from medkd.toolchain.features import teacher_features, view_teacher_features
from medkd.toolchain.models.students import build_student
from medkd.toolchain.models.teacher_runtime import runtime_extractor
from medkd.toolchain.models.teachers import build_teacher
from medkd.toolchain.train import TrainSettings, accuracy, fit, predict, teacher_branch_accuracy


def override_key(override: str) -> str:
    return override.split("=", 1)[0]


def with_override(base: list[str], override: str) -> list[str]:
    """`base` with `override` replacing any override of the same key (Hydra refuses a key twice)."""
    return [o for o in base if override_key(o) != override_key(override)] + [override]


# The paper's RD: every switch added for the issue off (the loss before the changes).
PAPER_RD = ["recipe.cka_detach_teacher=false", "recipe.logit_weight=0", "recipe.logit_when=always",
            "recipe.reprogram_lr_scale=1", "recipe.head_lr_scale=1", "recipe.shared_head=true"]
# name -> (recipe, config overrides).
ARMS = {
    "scratch": ("scratch", []),
    "kd": ("kd", []),
    "lora": ("lora", []),
    "rd-paper": ("rd", PAPER_RD),
    "rd": ("rd", []),
}
# RD's parts, each removed from the paper's RD or, for the logit term the paper lacks, added to it:
# defined on rd-paper so that they keep their meaning when rd's configured defaults move.
ABLATIONS = {
    "rd-no-cotrain": ("rd", with_override(PAPER_RD, "recipe.teacher_ce_weight=0")),
    "rd-no-shared-head": ("rd", with_override(PAPER_RD, "recipe.shared_head=false")),
    "rd-no-cka": ("rd", with_override(PAPER_RD, "recipe.cka_weight=0")),
    "rd-with-logit": ("rd", with_override(PAPER_RD, "recipe.logit_weight=1")),
}
ALL_ARMS = {**ARMS, **ABLATIONS}
# The arms RD is compared against in the "rd best?" column.
BASELINES = ("scratch", "kd", "lora")
RESULTS = Path(__file__).parent / "results" / "distill.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mri", "ct", "fashion-mnist"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ALL_ARMS), default=list(ARMS))
    parser.add_argument("--ablation", action="store_true",
                        help="also run RD without each of its parts (and with the logit term)")
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
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="train on the images as they are (default: each data set's data.augment)")
    parser.add_argument("--max-train", type=int, default=None, help="cap on the full training set")
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--teachers", nargs="+", default=["litemedsam"],
                        help="teacher configs, optionally NAME@INPUT_SIZE, e.g. litemedsam@256 efficientnet-lite0")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--override", action="append", default=[],
                        help="extra config override for every run, e.g. teacher.backend=onnxruntime")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where training and test evaluation run (each row records it), and the teacher "
                             "features with --override teacher.backend=torch; latency stays on the CPU")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --output (same settings) and add only the missing ones; "
                             "lets the protocol be measured over several sessions")
    parser.add_argument("--merge", nargs="+", type=Path, default=[], metavar="FILE",
                        help="add the runs of other results files measured with the same settings (another "
                             "machine's or process's share of the protocol) to --output, and train nothing")
    args = parser.parse_args(argv)
    if args.ablation:
        args.arms = list(dict.fromkeys(args.arms + list(ABLATIONS)))
    return args


def teacher_overrides(spec: str) -> list[str]:
    name, _, size = spec.partition("@")
    return [f"teacher={name}"] + ([f"teacher.input_size={int(size)}"] if size else [])


def bench_config(args, dataset: str, teacher: str | None = None, arm: str | None = None, extra: tuple = ()):
    """The config of one run (`extra`: overrides after the arm's); bench/lorkd.py calls it too
    (its args: no arms, one --teacher)."""
    teacher = teacher or args.teacher
    overrides = [f"data={dataset}", *teacher_overrides(teacher), f"student={args.student}", "progress=false"]
    if arm is not None:
        recipe, arm_overrides = ALL_ARMS[arm]
        overrides += [f"recipe={recipe}", *arm_overrides, *extra]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_train:
        overrides.append(f"data.max_train={args.max_train}")
    if args.max_test:
        overrides.append(f"data.max_test={args.max_test}")
    if not getattr(args, "augment", True):
        overrides.append("data.augment=none")
    return load_config(overrides + list(getattr(args, "override", [])))


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


class DatasetContext:
    """One (teacher, data set): the task, the augmented views of its training images, and the
    teacher features of every extractor a recipe asks for (computed once, cached on disk; a
    torch-backend teacher runs on `device`)."""

    def __init__(self, cfg, device: str = "cpu"):
        self.cfg, self.device = cfg, device
        self.task = load_task(cfg.data)
        self.teacher = build_teacher(cfg.teacher)
        settings = augmentation(cfg.data)
        self.augment = settings.describe()
        self.views = (draw_view_table(image_specs(settings, len(self.task.train)), settings.views, int(cfg.data.seed))
                      if settings.enabled else None)
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def features(self, extractor) -> tuple[torch.Tensor, torch.Tensor]:
        """(train features, K x N x D with views else N x D; test features N x D)."""
        cache, batch = Path(self.cfg.cache_dir), self.cfg.train.teacher_batch_size
        extractor = runtime_extractor(extractor, self.cfg.teacher.backend, self.cfg.teacher.precision, cache,
                                      calibration_images=self.task.train.images)
        key = extractor.fingerprint
        if key not in self._features:

            def extract(images, desc):
                return teacher_features(extractor, images, cache, batch, f"teacher ({desc})", device=self.device)

            train = (extract(self.task.train.images, "train") if self.views is None
                     else view_teacher_features(extract, self.task.train.images, self.views, "train"))
            self._features[key] = (train, extract(self.task.test.images, "test"))
        return self._features[key]


def device_description(device: str, teacher_backend: str = "onnxruntime") -> str:
    """Where a run trained, as recorded in every row: the CPU (and its threads), or the GPU
    (with the teacher features only for teacher.backend=torch; the latency is the CPU's)."""
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    if torch.device(device).type == "cuda":
        on_cpu = "latency" if teacher_backend == "torch" else "features and latency"
        return f"CUDA ({torch.cuda.get_device_name()}); {on_cpu} on {cpu}"
    return cpu


def cpu_latency_ms(model: torch.nn.Module, image_shape, runs: int = 20) -> float:
    """Median batch-1 eager PyTorch latency on the CPU: a like-for-like cost of the deployables."""
    model.eval()
    x = torch.rand(1, *image_shape)
    times = []
    with torch.no_grad():
        for i in range(runs + 3):
            started = time.perf_counter()
            model(x)
            if i >= 3:
                times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def run_one(cfg, recipe_name: str, task, train: ImageSet, train_feats, test_feats, seed: int, epochs: int, *,
            recipe_cfg=None, teacher=None, views: ViewTable | None = None, measure_cost: bool = False,
            device: str = "cpu") -> dict:
    """Train one recipe (recipe_cfg, default: the config file of recipe_name) on `train` and score
    it on the test split, once; bench/lorkd.py calls it for its per-task students.
    train_feats: K x N x D with `views`, else N x D; teacher: the frozen module (recipe=lora);
    device: where training and the test evaluation run (the latency is always the CPU's)."""
    torch.manual_seed(seed)
    recipe_cfg = recipe_cfg if recipe_cfg is not None else load_config([f"recipe={recipe_name}"]).recipe
    student = build_student(cfg.student, task.num_classes, task.in_chans, task.image_size)
    teacher_dim = None if train_feats is None else train_feats.shape[-1]
    recipe = build_recipe(recipe_cfg, student, teacher_dim, teacher=teacher)
    settings = TrainSettings(epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay, seed, False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        fit(recipe, train, None, settings, Path(run_dir), "bench", train_feats if recipe.needs_teacher else None,
            log=lambda line: None, augment=views, device=device)
    train_seconds = time.perf_counter() - started
    recipe.to(device)  # fit returns it on the CPU
    # The test split is evaluated once, after training (fit never sees it).
    row = {
        "test_accuracy": accuracy(predict(recipe.evaluation_model(), task.test.images), task.test.labels),
        "teacher_test_accuracy": teacher_branch_accuracy(recipe, test_feats if recipe.needs_teacher else None,
                                                         task.test.labels),
        "train_size": len(train),
        "labelled": int((train.labels != UNLABELLED).sum()),
        "epochs": epochs,
        "train_seconds": round(train_seconds, 1),
        "device": device_description(device, cfg.teacher.backend),
    }
    recipe.to("cpu")
    deployed = recipe.deployable()
    row["deployed_parameters"] = sum(p.numel() for p in deployed.parameters())
    if measure_cost:
        row["cpu_latency_ms_batch1"] = round(cpu_latency_ms(deployed, task.test.images.shape[1:]), 3)
    return row


def run_arm(args, data: DatasetContext, dataset: str, teacher: str, arm: str, labelled_index: torch.Tensor,
            seed: int, measure_cost: bool) -> dict:
    """One arm on one (teacher, data set, label subset, seed)."""
    cfg = bench_config(args, dataset, teacher, arm)
    task = data.task
    recipe_cls = RECIPE_CLASSES[cfg.recipe.name]
    index, labels = scarce_training_set(task, labelled_index, recipe_cls, args.transfer)
    train = ImageSet(task.train.images[index], labels)
    # Few images -> few steps per epoch; give small sets more epochs.
    epochs = round(cfg.train.epochs * min(len(task.train) / len(index), args.scarce_epoch_factor))
    train_feats = test_feats = None
    if recipe_cls.needs_teacher:
        # The recipe decides what is cached (recipe=lora: an intermediate output), so build it first.
        probe = build_recipe(cfg.recipe, build_student(cfg.student, task.num_classes, task.in_chans, task.image_size),
                             data.teacher.feature_dim, teacher=data.teacher)
        all_train, test_feats = data.features(probe.feature_extractor(data.teacher))
        train_feats = all_train[index] if data.views is None else all_train[:, index]
    views = None if data.views is None else ViewTable(data.views.params[:, index])
    return run_one(cfg, cfg.recipe.name, task, train, train_feats, test_feats, seed, epochs, recipe_cfg=cfg.recipe,
                   teacher=data.teacher, views=views, measure_cost=measure_cost, device=args.device)


def recipe_identity(args, dataset: str, teacher: str, arm: str, extra: tuple = ()) -> dict:
    """The arm's resolved recipe config, which each row records. A dict, compared by value, so
    that an override's 0 equals the config file's 0.0. Cached: composing a config costs ~0.1 s."""
    identities = vars(args).setdefault("_recipe_identities", {})
    key = (dataset, teacher, arm, extra)
    if key not in identities:
        identities[key] = OmegaConf.to_container(bench_config(args, dataset, teacher, arm, extra).recipe, resolve=True)
    return identities[key]


# Rows written before rows recorded their recipe config were trained while recipe/rd.yaml's
# logit_weight was 0 (the only recipe default that changed since the benchmark's first row).
LEGACY_RD_DEFAULTS = ("recipe.logit_weight=0",)


def legacy_recipe(args, row: dict) -> dict | None:
    """The recipe config a row without one was trained with; None if its arm is gone."""
    if row["arm"] not in ALL_ARMS:
        return None
    recipe, overrides = ALL_ARMS[row["arm"]]
    keys = {override_key(o) for o in overrides}
    extra = tuple(o for o in LEGACY_RD_DEFAULTS if recipe == "rd" and override_key(o) not in keys)
    return recipe_identity(args, row["dataset"], row["teacher"], row["arm"], extra)


def effective_recipe(args, row: dict) -> dict | None:
    """The row's recipe config as its recipe trains with it on the row's training set
    (recipes/base.py effective_config): what decides whether two rows are the same run."""
    recipe = row["recipe"]
    if recipe is None:
        return None
    cls = RECIPE_CLASSES[recipe["name"]]
    return cls.effective_config(recipe, row["fraction"] < 1 and args.transfer and cls.uses_unlabelled)


def split_superseded(args, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows that trained what their arm means now, the others). The others trained a config
    their arm no longer names (a default moved, an arm was redefined or dropped): they stay in
    the file, out of the summary, and their arm trains again, unless a later change makes the
    arm mean their config again. Of two current rows for one run the later counts."""
    current: dict[tuple, dict] = {}
    superseded = []
    for row in rows:
        key = run_key(row)
        if row["arm"] in ALL_ARMS and effective_recipe(args, row) == effective_recipe(
                args, {**row, "recipe": recipe_identity(args, row["dataset"], row["teacher"], row["arm"])}):
            if key in current:
                superseded.append(current[key])
            current[key] = row
        else:
            superseded.append(row)
    return list(current.values()), superseded


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        key = (row["teacher"], row["dataset"], row["fraction"], row["arm"])
        groups.setdefault(key, []).append(row["test_accuracy"])
    return [
        {"teacher": t, "dataset": d, "fraction": f, "arm": a, "seeds": len(accs),
         "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
        for (t, d, f, a), accs in groups.items()
    ]


def rd_verdict(cells: dict) -> str:
    """Is tuned rd above every baseline present? ('-' when rd or every baseline is missing)."""
    baselines = [a for a in BASELINES if a in cells]
    if "rd" not in cells or not baselines:
        return "-"
    best = max(baselines, key=lambda a: cells[a]["mean"])
    if cells["rd"]["mean"] > cells[best]["mean"]:
        return "yes"
    return "tie" if cells["rd"]["mean"] == cells[best]["mean"] else f"no ({best})"


def print_table(summary: list[dict]) -> None:
    arms = [a for a in ALL_ARMS if any(s["arm"] == a for s in summary)]
    keys = sorted({(s["teacher"], s["dataset"], s["fraction"]) for s in summary}, key=lambda k: (k[0], k[1], -k[2]))
    width = max([len("teacher"), *(len(k[0]) for k in keys)]) + 2  # teacher names vary: fit the longest
    print(f"\n{'teacher':<{width}}{'dataset':<14}{'labels':>7}  " + "".join(f"{a:>18}" for a in arms) + "   rd best?")
    for teacher, dataset, fraction in keys:
        cells = {s["arm"]: s for s in summary
                 if (s["teacher"], s["dataset"], s["fraction"]) == (teacher, dataset, fraction)}
        line = f"{teacher:<{width}}{dataset:<14}{fraction:>7.0%}  "
        line += "".join(table_cell(cells.get(a)) for a in arms)
        print(line + "   " + rd_verdict(cells))


def table_cell(cell: dict | None) -> str:
    """mean ± std over seeds, 18 wide; one run has no spread to show, so it says so."""
    if cell is None:
        return f"{'-':>18}"
    if cell["seeds"] == 1:
        return f"{cell['mean']:>10.4f} (1 run)"
    return f"{cell['mean']:>11.4f}±{cell['std']:.3f}"


# The full protocol: every main arm on every data set, both label fractions, 3 seeds, with the
# default teacher at the config's epochs and without caps (ablation and other teachers are extra).
FULL_DATASETS, FULL_FRACTIONS, FULL_SEEDS, FULL_TEACHER = ("mri", "ct", "fashion-mnist"), (1.0, 0.1), (0, 1, 2), "litemedsam"


def run_settings(args) -> dict:
    """What must match for runs to be pooled in one results file (--resume)."""
    return {"student": args.student, "epochs": args.epochs, "scarce_epoch_factor": args.scarce_epoch_factor,
            "transfer": args.transfer, "augment": args.augment, "max_train": args.max_train,
            "max_test": args.max_test, "overrides": list(args.override)}


def protocol_gaps(rows: list[dict], settings: dict) -> list[str]:
    """What the runs leave out of the full protocol (empty: complete), for each teacher they use:
    the default teacher owes every main arm; another teacher (a file of its own, e.g.
    litemedsam@256) only the arms whose recipe learns from a teacher (not scratch)."""
    done = {run_key(r) for r in rows}
    gaps = []
    for teacher in sorted({r["teacher"] for r in rows}) or [FULL_TEACHER]:
        arms = [a for a, (recipe, _) in ARMS.items() if teacher == FULL_TEACHER or RECIPE_CLASSES[recipe].needs_teacher]
        prefix = "" if teacher == FULL_TEACHER else f"{teacher} "
        for dataset in FULL_DATASETS:
            for fraction in FULL_FRACTIONS:
                missing = [f"{arm} seed {seed}" for seed in FULL_SEEDS for arm in arms
                           if (teacher, dataset, fraction, seed, arm) not in done]
                if len(missing) == len(FULL_SEEDS) * len(arms):
                    gaps.append(f"{prefix}{dataset} {fraction:.0%} labels: not run")
                elif missing:
                    gaps.append(f"{prefix}{dataset} {fraction:.0%} labels: {', '.join(missing)} not run")
    protocol = run_settings(parse_args([]))
    changed = {k: v for k, v in settings.items() if protocol[k] != v}
    if changed:
        gaps.append(f"settings other than the protocol's: {changed}")
    return gaps


def load_previous(args) -> dict:
    """With --resume or --merge, the earlier results in --output ({} without them or without a
    file); a one-line error if they were measured with other settings."""
    if not (args.resume or args.merge) or not args.output.is_file():
        return {}
    return read_results(args, args.output, "--resume" if args.resume else "--merge", "use another --output")


def read_results(args, path: Path, option: str, remedy: str) -> dict:
    """A results file whose runs can be pooled with this run's (the same settings), its rows
    completed as they are now written."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{option}: cannot read {path}: {exc}") from None
    if results.get("settings") != run_settings(args):
        raise UserError(f"{option}: {path} was measured with {results.get('settings')}, this run "
                        f"uses {run_settings(args)}; {remedy}")
    for row in results.get("runs", []):
        row.setdefault("device", results["device"])  # files from before rows named their device
        if "recipe" not in row:  # ... or their recipe config
            row["recipe"] = legacy_recipe(args, row)
    return results


def run_key(row: dict) -> tuple:
    return row["teacher"], row["dataset"], row["fraction"], row["seed"], row["arm"]


def merge_results(args, rows: list[dict], superseded: list[dict], augment: dict) -> list[str]:
    """Add the rows of each --merge file that `rows` lack (a run in both: ours is kept) to `rows`,
    its superseded runs to `superseded` and its augmentation settings to `augment`; returns the
    merged files' commands, each marked with its file, for the command history."""
    commands = []
    for path in args.merge:
        other = read_results(args, path, "--merge", "only files measured with the same settings can be pooled")
        theirs, their_superseded = split_superseded(args, other.get("superseded_runs", []) + other.get("runs", []))
        have = {run_key(r) for r in rows}
        added = [r for r in theirs if run_key(r) not in have]
        rows += added
        superseded += their_superseded
        augment.update(other.get("augmentation", {}))
        commands += [f"[{path.name}] {c}" for c in other.get("command", "").split(" && ") if c]
        print(f"--merge {path}: {len(added)} runs added, {len(theirs) - len(added)} already here (kept ours)")
    return commands


def write_results(args, rows: list[dict], augment: dict, command: str, finished: bool,
                  superseded: list[dict] = ()) -> None:
    gaps = protocol_gaps(rows, run_settings(args))
    if not finished:
        gaps.append("run stopped before the end (partial results)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps({
        "benchmark": "distill",
        "claim": "RD beats PEFT (lora), KD and scratch, most in the data-scarce setting",
        "command": command,
        "complete": not gaps,
        "left_out": gaps,
        "device": "; ".join(sorted({r["device"] for r in rows})) or device_description(args.device),
        "torch": torch.__version__,
        "settings": run_settings(args),
        "teachers": sorted({r["teacher"] for r in rows}), "student": args.student,
        "arm_overrides": {a: ALL_ARMS[a][1] for a in ALL_ARMS if any(r["arm"] == a for r in rows)},
        "epochs_full_labels": args.epochs or int(load_config([]).train.epochs),
        "scarce_epoch_factor": args.scarce_epoch_factor,
        "unlabelled_transfer_set": args.transfer,
        "augmentation": augment,
        "max_train": args.max_train, "max_test": args.max_test, "overrides": args.override,
        "summary": summarise(rows), "runs": rows,
        "superseded_runs": list(superseded),
    }, indent=2) + "\n")


def same_run(args, rows: list[dict], row: dict) -> dict | None:
    """A run already in `rows` that trained what `row` (which carries its `recipe`) would, on the
    same (teacher, data set, labels, seed), or None."""
    for other in rows:
        if (all(other[k] == row[k] for k in ("teacher", "dataset", "fraction", "seed")) and "same_run_as" not in other
                and effective_recipe(args, other) == effective_recipe(args, row)):
            return other
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    args.device = str(resolve_device(args.device))  # --device cuda without a GPU: a one-line error
    previous = load_previous(args)
    earlier = previous.get("superseded_runs", [])
    rows, superseded = split_superseded(args, earlier + previous.get("runs", []))
    moved_out = sum(1 for r in superseded if not any(r is e for e in earlier))
    back = len(earlier) + moved_out - len(superseded)
    if moved_out or back:
        print(f"{moved_out} runs trained what their arm no longer means (moved to superseded_runs, out of "
              f"the summary; their arms train again); {back} superseded runs count again")
    augment = previous.get("augmentation", {})
    merged_commands = merge_results(args, rows, superseded, augment)
    history = {"command": " && ".join(c for c in [previous.get("command", ""), *merged_commands] if c)}
    command = command_history(history, "bench/distill.py", sys.argv[1:] if argv is None else argv)
    if args.merge:  # pool, don't train
        print_table(summarise(rows))
        write_results(args, rows, augment, command, True, superseded)
        print(f"\nwrote {args.output}")
        return 0
    done = {run_key(r) for r in rows}
    for teacher in args.teachers:
        for dataset in args.datasets:
            data = DatasetContext(bench_config(args, dataset, teacher), args.device)
            augment[dataset] = data.augment
            measured_cost = {r["arm"] for r in rows if (r["teacher"], r["dataset"]) == (teacher, dataset)
                             and "cpu_latency_ms_batch1" in r}
            for fraction in args.fractions:
                for seed in args.seeds:
                    labelled_index = torch.as_tensor(stratified_fraction(data.task.train.labels.numpy(), fraction, seed))
                    for arm in args.arms:
                        if (teacher, dataset, fraction, seed, arm) in done:
                            continue
                        row = {"teacher": teacher, "dataset": dataset, "fraction": fraction, "seed": seed, "arm": arm,
                               "recipe": recipe_identity(args, dataset, teacher, arm)}
                        # A superseded run still trained what its recipe config says: it can stand in.
                        twin = same_run(args, rows + superseded, row)
                        if twin is not None:  # an identical config already ran: record it, don't train it again
                            row.update({k: v for k, v in twin.items() if k not in row}, same_run_as=twin["arm"]
                                       + (" (superseded)" if any(twin is r for r in superseded) else ""))
                        else:
                            row.update(run_arm(args, data, dataset, teacher, arm, labelled_index, seed,
                                               arm not in measured_cost))
                            measured_cost.add(arm)
                        rows.append(row)
                        write_results(args, rows, augment, command, False, superseded)  # partial results survive a kill
                        print(f"{teacher} {dataset} {fraction:.0%} seed {seed} {arm:<18} "
                              f"acc {row['test_accuracy']:.4f}  ({row['train_seconds']} s, n={row['train_size']}"
                              + (f"; the same run as {row['same_run_as']})" if twin is not None else ")"), flush=True)
    print_table(summarise(rows))
    write_results(args, rows, augment, command, True, superseded)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
