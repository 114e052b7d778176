"""Training-time augmentation (toolchain/data/augment.py): the data.augment grammar, the seeded
view table, the renderer's geometry and intensity by hand, the training loop showing the student
the very view whose teacher features it gets, resume, and a medkd-build with data.augment."""

import json
import math

import pytest
import torch
from torch import nn

from medkd.recipes import Batch, Recipe
from medkd.toolchain import train as train_module
from medkd.toolchain.cli import main
from medkd.toolchain.config import load_config
from medkd.toolchain.data.augment import (
    PARAMS,
    AugmentSpec,
    augmentation,
    draw_view_table,
    image_specs,
    parse_augment,
    render,
)
from medkd.toolchain.data.base import ImageSet
from medkd.toolchain.data.config import parse_data_config
from medkd.toolchain.distributed import DistContext
from medkd.toolchain.errors import ConfigError
from medkd.toolchain.features import teacher_features
from medkd.toolchain.models.students import Student
from medkd.toolchain.features import view_teacher_features
from medkd.toolchain.pipeline import run
from medkd.toolchain.train import TrainSettings, fit

from test_device import count_host_reads
from test_pipeline import SMALL

IDENTITY = dict(flip_x=1.0, flip_y=1.0, angle=0.0, scale_x=1.0, scale_y=1.0, shift_x=0.0, shift_y=0.0,
                brightness=0.0, contrast=1.0)


def params(**changes) -> torch.Tensor:
    """One row of the view table: the identity with `changes`."""
    row = {**IDENTITY, **changes}
    return torch.tensor([[row[name] for name in PARAMS]])


# --------------------------------------------------------------------------- the data.augment grammar


@pytest.mark.parametrize("value, expected", [
    ("crop=0.8,hflip,rotate=10,jitter=0.1", AugmentSpec(crop=0.8, hflip=0.5, rotate=10, jitter=0.1)),
    (" vflip=0.25 , crop=0.5 ", AugmentSpec(crop=0.5, vflip=0.25)),
    ("light", AugmentSpec(crop=0.85, rotate=5, jitter=0.05)),
    ("light,hflip,rotate=20", AugmentSpec(crop=0.85, hflip=0.5, rotate=20, jitter=0.05)),  # left to right
])
def test_specs_and_presets_parse(value, expected):
    spec = parse_augment(value)
    assert spec == expected
    assert parse_augment(spec.describe()) == spec  # what the report records parses back


@pytest.mark.parametrize("value", [None, "none", "off", "None", "crop=1", "hflip=0,rotate=0"])
def test_off_and_do_nothing_specs_are_no_augmentation(value):
    assert parse_augment(value) is None


@pytest.mark.parametrize("value, fragment", [
    ("hfilp", "unknown item 'hfilp' (did you mean 'hflip'?)"),
    ("crop=0.8,rotat=10", "unknown item 'rotat=10' (did you mean 'rotate'?)"),
    ("ligth", "did you mean 'light'?"),
    ("crop", "'crop' needs a value"),
    ("crop=0", "crop must be a number in (0, 1]"),
    ("crop=1.5", "crop must be a number in (0, 1]"),
    ("rotate=ten", "rotate must be a number of degrees in [0, 180], got 'ten'"),
    ("jitter=1", "jitter must be a number in [0, 1)"),
    ("hflip=2", "hflip must be a probability"),
    ("crop=nan", "crop must be"),
    (3, "data.augment must be null/none, a preset"),
])
def test_bad_specs_are_one_line_config_errors(value, fragment):
    with pytest.raises(ConfigError) as info:
        parse_augment(value)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_data_config_checks_augment_and_views():
    cfg = parse_data_config({"name": "mri", "augment": "light,hflip", "augment_views": 3}, ["mri"])
    assert cfg.augment == AugmentSpec(crop=0.85, hflip=0.5, rotate=5, jitter=0.05) and cfg.augment_views == 3
    for views in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="data.augment_views must be a positive integer"):
            parse_data_config({"name": "mri", "augment_views": views}, ["mri"])


def test_dataset_defaults_flip_only_where_the_yaml_says_the_anatomy_allows():
    specs = {name: augmentation(load_config([f"data={name}"] + (["data.path=x"] if name in ("npz", "folder") else []))
                                .data).specs[None] for name in ("mri", "ct", "fashion-mnist", "npz", "folder")}
    assert specs["ct"].hflip == specs["fashion-mnist"].hflip == 0.5
    assert all(spec.vflip == 0 for spec in specs.values() if spec)
    # mri: off (measured: no gain on the validation split); npz/folder: off (anatomy unknown)
    assert specs["mri"] is None and specs["npz"] is None and specs["folder"] is None


def test_multitask_augments_each_task_by_its_own_spec():
    cfg = load_config(["data=multitask", "data.tasks=[mri,fashion-mnist]", "data.npz_paths=[/x/path.npz]",
                       "data.augment.npz=light", "data.augment.mri=null"])
    settings = augmentation(cfg.data)
    assert settings.specs == {"mri": None, "fashion-mnist": parse_augment("crop=0.8,hflip"),
                              "path": parse_augment("light")}  # ct's default entry: not in the build, ignored
    task_ids = torch.tensor([0, 1, 2, 1, 0])
    table = draw_view_table(image_specs(settings, 5, task_ids, ["mri", "fashion-mnist", "path"]), 3, seed=0)
    identity = params()[0]
    for view in range(3):
        assert torch.equal(table.params[view, 0], identity) and torch.equal(table.params[view, 4], identity)
    assert not torch.equal(table.params[1, 2], identity)  # the npz task (light) is augmented
    with pytest.raises(ConfigError, match="data.augment names unknown task"):
        augmentation({"name": "multitask", "tasks": ["mri", "ct"], "augment": {"brain": "light"}})


def test_a_bad_spec_stops_medkd_build_in_one_line_before_anything_is_written(tmp_path, capsys):
    assert main([f"run_dir={tmp_path / 'run'}", "data.augment='crop=0.8,hflp'"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'hflip'" in err[0]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the view table and the renderer


def spec_list(text, n):
    return [parse_augment(text)] * n


def test_views_are_a_function_of_the_seed():
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    specs = spec_list("crop=0.7,hflip,rotate=15,jitter=0.2", 6)
    a, b, other = (draw_view_table(specs, 4, seed) for seed in (0, 0, 1))
    for view in range(1, 4):
        assert torch.equal(a.render_view(images, view), b.render_view(images, view))
        assert not torch.equal(a.render_view(images, view), other.render_view(images, view))


def test_views_keep_shape_and_range_and_view_0_is_the_image_bit_for_bit():
    images = torch.rand(7, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    table = draw_view_table(spec_list("strong,hflip,vflip,jitter=0.9", 7), 5, seed=2)
    assert torch.equal(table.render_view(images, 0), images)
    for view in range(1, 5):
        out = table.render_view(images, view)
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
        assert not torch.allclose(out, images)


def test_the_identity_row_returns_the_images_unchanged():
    images = torch.rand(3, 2, 9, 9)
    assert torch.equal(render(images, params().expand(3, -1)), images)


def test_hflip_and_vflip_with_probability_1_flip_every_view():
    images = torch.rand(4, 1, 6, 6)
    h = draw_view_table(spec_list("hflip=1", 4), 3, seed=0)
    v = draw_view_table(spec_list("vflip=1", 4), 3, seed=0)
    for view in (1, 2):
        assert torch.equal(h.render_view(images, view), images.flip(-1))
        assert torch.equal(v.render_view(images, view), images.flip(-2))


def test_rotation_turns_the_image():
    images = torch.arange(16.0).view(1, 1, 4, 4) / 15
    out = render(images, params(angle=math.pi / 2))
    torch.testing.assert_close(out, torch.rot90(images, 1, (-2, -1)), atol=1e-6, rtol=0)


def test_crop_and_shift_sample_where_the_geometry_says():
    """A linear ramp stays linear under bilinear sampling: output column j reads input position
    p_j = ((s * x_j + t + 1) * W - 1) / 2 with x_j = (2j + 1) / W - 1, so its value is p_j / (W - 1)."""
    width, s, t = 8, 0.5, 0.25
    ramp = (torch.arange(width, dtype=torch.float32) / (width - 1)).expand(1, 1, width, width)
    out = render(ramp.contiguous(), params(scale_x=s, scale_y=s, shift_x=t))
    expected = [(((s * ((2 * j + 1) / width - 1) + t + 1) * width - 1) / 2) / (width - 1) for j in range(width)]
    assert expected[0] == pytest.approx(2.75 / 7)  # the formula by hand for column 0
    torch.testing.assert_close(out[0, 0], torch.tensor(expected).expand(width, width), atol=1e-6, rtol=0)


def test_jitter_is_contrast_around_the_mean_plus_brightness_then_clamped():
    image = torch.tensor([0.2, 0.6]).view(1, 1, 1, 2)  # mean 0.4
    # 0.2 * 1.5 - 0.5 * 0.4 + 0.05 = 0.15;  0.6 * 1.5 - 0.2 + 0.05 = 0.75
    torch.testing.assert_close(render(image, params(contrast=1.5, brightness=0.05)),
                               torch.tensor([0.15, 0.75]).view(1, 1, 1, 2))
    # contrast 3: 0.6 - 0.8 + 0.05 = -0.15 -> 0;  1.8 - 0.8 + 0.05 = 1.05 -> 1
    assert render(image, params(contrast=3.0, brightness=0.05)).flatten().tolist() == [0.0, 1.0]


def test_table_parameters_stay_within_the_spec():
    n = 2000
    table = draw_view_table(spec_list("crop=0.5,hflip,rotate=10,jitter=0.2", n), 3, seed=0)
    p = dict(zip(PARAMS, table.params[1:].reshape(-1, len(PARAMS)).unbind(1)))
    area = p["scale_x"] * p["scale_y"]
    assert area.min() >= 0.5 - 1e-6 and area.max() <= 1 + 1e-6 and area.min() < 0.55
    assert p["angle"].abs().max() <= math.radians(10) + 1e-6 and p["angle"].abs().max() > math.radians(9.5)
    for axis in "xy":  # the crop stays inside the image
        assert (p[f"shift_{axis}"].abs() <= 1 - p[f"scale_{axis}"] + 1e-6).all()
    assert p["brightness"].abs().max() <= 0.2 + 1e-6 and ((p["contrast"] - 1).abs() <= 0.2 + 1e-6).all()
    assert 0.45 < (p["flip_x"] < 0).float().mean() < 0.55 and (p["flip_y"] == 1).all()


# --------------------------------------------------------------------------- the training loop


class PixelStats(nn.Module):
    """A fake teacher whose "features" are statistics of the pixels it is shown."""

    fingerprint = "pixel-stats"
    feature_dim = 3

    def forward(self, images):
        flat = images.flatten(1)
        return torch.stack([flat.mean(1), flat[:, 0], flat[:, -1]], dim=1)


class Spy(Recipe):
    """Records what the loop hands the loss (and prepare)."""

    name = "spy"
    needs_teacher = True

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(Student("tiny", "mlp", nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), 4, 3, 1, 4))
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.prepared = None

    def prepare(self, teacher_features, labels):
        self.prepared = teacher_features.clone()

    def loss(self, batch: Batch):
        self.batches.append((batch.images.detach().clone(), batch.teacher_features.clone()))
        loss = self.student(batch.images).pow(2).mean()
        return loss, {"l2": loss.detach()}


def augmented_data(n=24, views=3):
    images = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    table = draw_view_table(spec_list("crop=0.6,hflip,rotate=30,jitter=0.3", n), views, seed=0)
    features = view_teacher_features(
        lambda images, desc: teacher_features(PixelStats(), images, None, progress=False), images, table, "train")
    return ImageSet(images, torch.arange(n) % 3), table, features


def spy_fit(tmp_path, train, table, features, epochs=3, resume=False):
    recipe = Spy()
    settings = TrainSettings(epochs=epochs, batch_size=8, lr=0.01, weight_decay=0.0, seed=0, progress=False)
    fit(recipe, train, None, settings, tmp_path, "fp", features, resume=resume, log=lambda line: None, augment=table)
    return recipe


def test_the_student_sees_the_view_whose_teacher_features_it_gets(tmp_path):
    train, table, features = augmented_data()
    assert features.shape == (3, 24, 3)
    recipe = spy_fit(tmp_path, train, table, features)
    assert len(recipe.batches) == 3 * 3
    originals = {tuple(image.flatten().tolist()) for image in train.images}
    shown_augmented = 0
    for images, feats in recipe.batches:
        torch.testing.assert_close(feats, PixelStats()(images), atol=1e-6, rtol=0)
        shown_augmented += sum(tuple(image.flatten().tolist()) not in originals for image in images)
    assert 0 < shown_augmented < 3 * 24  # a mix of views 1..K-1 and view 0 (the image itself)
    torch.testing.assert_close(recipe.prepared, PixelStats()(train.images))  # prepare: the un-augmented features


def test_without_augment_the_loop_shows_the_images_as_they_are(tmp_path):
    train, _, features = augmented_data()
    recipe = Spy()
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.01, weight_decay=0.0, seed=0, progress=False)
    fit(recipe, train, None, settings, tmp_path, "fp", features[0], log=lambda line: None)
    seen = torch.cat([images for images, _ in recipe.batches])
    assert sorted(map(tuple, seen.flatten(1).tolist())) == sorted(map(tuple, train.images.flatten(1).tolist()))
    with pytest.raises(ValueError, match="3 x 24 x D"):
        fit(Spy(), train, None, settings, tmp_path / "x", "fp", features[0], augment=_table_of(train))


def _table_of(train):
    return draw_view_table(spec_list("hflip", len(train)), 3, seed=0)


def test_resume_shows_the_same_views_as_an_uninterrupted_run(tmp_path, monkeypatch):
    train, table, features = augmented_data()
    reference = spy_fit(tmp_path / "ref", train, table, features).batches

    real_save = train_module.save_checkpoint

    def save_then_die(run_dir, state):
        real_save(run_dir, state)
        raise KeyboardInterrupt  # killed right after epoch 1 was checkpointed

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        spy_fit(tmp_path / "run", train, table, features)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    resumed = spy_fit(tmp_path / "run", train, table, features, resume=True).batches
    assert len(resumed) == 2 * 3  # epochs 2 and 3
    for (got, got_features), (want, want_features) in zip(resumed, reference[3:], strict=True):
        assert torch.equal(got, want) and torch.equal(got_features, want_features)


def test_every_process_renders_its_share_of_the_single_process_batch(tmp_path, monkeypatch):
    """Under torchrun each rank takes a share of each global batch: the shares, rendered on each
    rank from the same table and the same shuffling generator, are the single process's views.
    (The collectives are stubbed: only what each rank is shown is compared.)"""
    train, table, features = augmented_data(n=20)
    single = spy_fit(tmp_path / "one", train, table, features, epochs=2).batches
    monkeypatch.setattr(train_module, "DistributedDataParallel", lambda model, **kwargs: model)
    for name in ("all_reduce_sum", "sync_buffers"):
        monkeypatch.setattr(train_module, name, lambda ctx, value: value)
    monkeypatch.setattr(train_module, "barrier", lambda ctx: None)
    shares = []
    for rank in range(2):
        recipe = Spy()
        settings = TrainSettings(epochs=2, batch_size=8, lr=0.01, weight_decay=0.0, seed=0, progress=False)
        fit(recipe, train, None, settings, tmp_path / str(rank), "fp", features, log=lambda line: None,
            dist=DistContext(rank=rank, world_size=2), augment=table)
        shares.append(recipe.batches)
    for (want, want_features), (a, a_features), (b, b_features) in zip(single, *shares, strict=True):
        assert torch.equal(torch.cat([a, b]), want) and torch.equal(torch.cat([a_features, b_features]), want_features)


def test_rendering_adds_no_host_reads_per_step(tmp_path):
    totals = {}
    for n in (16, 64):
        train, table, features = augmented_data(n)
        with count_host_reads() as counts:
            spy_fit(tmp_path / str(n), train, table, features, epochs=1)
        totals[n] = sum(counts.values())
    assert totals[16] == totals[64], totals


# --------------------------------------------------------------------------- medkd-build


def test_build_with_augment_trains_on_teacher_features_of_every_view(tmp_path, capsys):
    cache = tmp_path / "cache"
    report = run(load_config(SMALL + [f"run_dir={tmp_path / 'run'}", f"cache_dir={cache}", "recipe=kd",
                                      "data.augment='crop=0.8,hflip,rotate=10'", "data.augment_views=3",
                                      "train.epochs=1", "export.formats=[onnx]", "data.max_train=28",
                                      "data.max_test=14", "teacher.input_size=64", "threads=1"]))
    assert report["data"]["augment"]["spec"] == "crop=0.8,hflip,rotate=10"
    assert report["data"]["augment"]["views"] == 3
    assert json.loads((tmp_path / "run" / "report.json").read_text())["data"]["augment"]["views"] == 3
    # One cache entry per view of the training images, plus the test split.
    assert len(list(cache.glob("*.safetensors"))) == 3 + 1
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "augment: crop=0.8,hflip,rotate=10, 3 views per training image" in log
    assert report["training"]["history"][0]["loss"] > 0


# --------------------------------------------------------------------------- bench/augment.py


def test_bench_extrapolates_the_extra_teacher_time_of_the_default_build(load_bench):
    from types import SimpleNamespace

    bench = load_bench("augment")
    cfg = SimpleNamespace(train=SimpleNamespace(epochs=2, batch_size=128))
    task = SimpleNamespace(train=list(range(300)))  # 3 steps per epoch
    build = bench.default_build(cfg, task, SimpleNamespace(views=4), {"train_step_s": 0.9, "render_batch_s": 0.1},
                                {"extract_s_per_image": 0.02, "render_view_s_per_image": 0.005})
    assert build["steps"] == 6 and build["training_s_estimate"] == pytest.approx(6 * 1.0)
    assert build["extra_teacher_s_estimate"] == pytest.approx(3 * 300 * 0.025)  # views 1..3, not view 0
    assert build["extra_teacher_over_training"] == pytest.approx(22.5 / 6)
    assert build["rendering_over_training"] == pytest.approx(0.1)
    assert "| rendering / training step" in bench.table({
        "augment": {"spec": "hflip", "views": 4},
        "default_build": {**build, "train_images": 300, "views": 4, "epochs": 2},
        "render_vs_step": {"student": "s", "batch_size": 128, "image_shape": [1, 8, 8], "train_step_s": 0.9,
                           "render_batch_s": 0.1, "render_over_step": 0.111},
        "teacher_per_view": {"teacher": "t", "extract_s_per_image": 0.02, "render_over_extract": 0.25},
        "machine": {"load_average_start": [1.0], "load_average_end": [1.0]}})
