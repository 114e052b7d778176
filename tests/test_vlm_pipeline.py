"""`medkd-build recipe=ogkd` end to end on tiny settings (the embedded lit-vlm and a small random
open_clip CLIP from a local folder): stages, base/novel scores, folding, export, resume, the
base-to-novel split, and one-line errors for bad settings."""

from __future__ import annotations

import pytest
import torch

from medkd.toolchain.cli import main
from medkd.toolchain.config import load_config
from medkd.toolchain.data import load_task
from medkd.toolchain.pipeline import run
from medkd.toolchain.verify_cli import main as verify
from medkd.toolchain.vlm_pipeline import few_shots, remap, split_classes, training_side_split

TINY = ["recipe=ogkd", "data.max_train=204", "data.max_test=102", "recipe.shots=2", "recipe.epochs=2",
        "recipe.align_epochs=2", "recipe.batch_size=16", "progress=false", "export.precision=fp32",
        "export.validation_images=8", "export.calibration.images=4", "export.latency_runs=2",
        "export.latency_warmup=1", "export.latency_batches=[1]", "export.latency_threads=[1]"]


@pytest.fixture
def tiny(tmp_path):
    def overrides(*extra):
        return TINY + [f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", *extra]
    return overrides


def test_ogkd_aligns_tunes_prompts_folds_and_exports(tiny, tmp_path):
    report = run(load_config(tiny("data.image_size=32", "teacher.input_size=32")))
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "prompts.safetensors", "vlm_alignment.safetensors", "report.json", "report.md",
                 "manifest.sha256", "stages/alignment/checkpoint.pt", "stages/prompt_tuning/checkpoint.pt"):
        assert (run_dir / name).is_file(), name
    data = report["data"]
    assert len(data["base_classes"]) + len(data["novel_classes"]) == data["num_classes"] > 40
    assert not set(data["base_classes"]) & set(data["novel_classes"])
    assert data["prompt_tuning_images"] == 2 * len(data["base_classes"])
    assert report["vlm"]["validation"]["images"] > 0 and 0 <= report["vlm"]["validation"]["base"] <= 1
    scores = report["vlm"]["test"]
    for kind in ("prompt_tuned", "zero_shot"):
        assert all(0 <= scores[kind][k] <= 1 for k in ("base", "novel", "harmonic_mean"))
    assert report["vlm"]["fold"]["max_abs_diff"] <= 1e-5 * 100  # logits up to the scale, 100
    assert set(report["training"]["history"][-1]) >= {"ce", "sccm", "gad", "lgd"}
    assert report["training"]["trainable_parameters"] == 4 * 384  # n_ctx x MiniLM width
    model = report["export"]["models"]["model"]
    assert model["formats"]["onnx"]["parity"]["top1_agreement"] >= 0.999
    assert (run_dir / model["deployed_file"]).is_file() and 0 <= model["test_metric"]["fp32"] <= 1
    markdown = (run_dir / "report.md").read_text()
    assert "| prompt-tuned |" in markdown and "Harmonic mean" in markdown and "demonstration VLM" in markdown
    assert verify([str(run_dir)]) == 0
    resumed = run(load_config(tiny("data.image_size=32", "teacher.input_size=32", "resume=true")))
    assert resumed["vlm"]["test"] == scores  # nothing trains again
    # A new run on the same inputs takes the alignment from the cache (keyed by its inputs).
    assert report["teacher"]["alignment"]["from_cache"] is False
    again = run(load_config(TINY + [f"run_dir={tmp_path / 'again'}", f"cache_dir={tmp_path / 'cache'}",
                                    "data.image_size=32", "teacher.input_size=32"]))
    assert again["teacher"]["alignment"]["from_cache"] is True
    assert not (tmp_path / "again" / "stages" / "alignment").exists()
    assert again["teacher"]["alignment"]["logit_scale"] == report["teacher"]["alignment"]["logit_scale"]
    assert again["vlm"]["test"] == scores


def test_ogkd_takes_an_open_clip_model_from_a_local_folder_and_deploys_a_student(tiny, tmp_path):
    from test_vlm import write_tiny_clip

    write_tiny_clip(tmp_path / "clip")
    report = run(load_config(tiny("teacher=open_clip", f"teacher.model=local-dir:{tmp_path / 'clip'}",
                                  "data.image_size=32", "recipe.objective=kd", "recipe.deploy=student",
                                  "student=mobilenetv3", "recipe.student_epochs=2", "recipe.val_per_class=1")))
    assert report["teacher"]["alignment"] is None  # a pretrained VLM is not aligned again
    assert set(report["training"]["history"][-1]) >= {"ce", "kd"}
    # recipe.deploy=student: a small student learnt the folded model's logits and is what deploys.
    student = report["student"]
    assert student["name"] == "mobilenetv3" and 0 < student["parameters"] < 5e6
    distillation = student["distillation"]
    assert set(distillation["history"][-1]) >= {"ce", "gad"} and len(distillation["history"]) == 2
    assert distillation["labelled"] == 2 * len(report["data"]["base_classes"]) < distillation["train_images"]
    for kind in ("student", "folded_teacher"):
        assert all(0 <= distillation["test"][kind][k] <= 1 for k in ("all", "base", "novel"))
    assert (tmp_path / "run" / "stages/student_distillation/checkpoint.pt").is_file()
    model = report["export"]["models"]["model"]
    assert model["formats"]["onnx"]["parity"]["top1_agreement"] >= 0.999
    assert "Student distilled from the folded model (mobilenetv3)" in (tmp_path / "run" / "report.md").read_text()


def test_ogkd_tunes_and_folds_a_biomedclip_style_model_from_local_files(tiny, tmp_path):
    from test_vlm import write_tiny_biomedclip

    write_tiny_biomedclip(tmp_path / "clip", text_dir=tmp_path / "biomedbert")
    report = run(load_config(tiny("teacher=open_clip", f"teacher.model=local-dir:{tmp_path / 'clip'}",
                                  f"teacher.text_dir={tmp_path / 'biomedbert'}", "data.image_size=32")))
    assert report["teacher"]["alignment"] is None
    assert set(report["training"]["history"][-1]) >= {"ce", "gad", "lgd"}  # LGD reached the timm ViT's patches
    assert report["vlm"]["fold"]["max_abs_diff"] <= 1e-5
    assert report["export"]["models"]["model"]["formats"]["onnx"]["parity"]["top1_agreement"] >= 0.999


@pytest.mark.parametrize("extra, fragment", [
    (["recipe.objective=fancy"], "recipe.objective must be one of"),
    (["recipe.class_specific=true"], "cannot serve novel classes"),
    (["recipe.top_k_ratio=0"], "recipe.top_k_ratio must be a number > 0"),
    (["recipe.top_k_ratio=1.5"], "recipe.top_k_ratio must be in (0, 1]"),
    (["recipe.deploy=tiny"], "recipe.deploy must be one of folded, student"),
    (["recipe.student_kd_weight=1.5"], "recipe.student_kd_weight must be in (0, 1]"),
    (["teacher=litemedsam"], "needs a vision-language teacher"),
    (["teacher=open_clip"], "needs teacher.model"),
])
def test_bad_ogkd_settings_exit_2_with_one_line_and_write_nothing(tiny, tmp_path, capsys, extra, fragment):
    assert main(tiny(*extra)) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_base_and_novel_classes_alternate_and_shots_are_spread_through_each_class():
    assert split_classes(5, "base2novel") == ([0, 2, 4], [1, 3])
    assert split_classes(3, "all") == ([0, 1, 2], [])
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 2, 0])
    assert few_shots(labels, [0, 2], 3).tolist() == [0, 4, 8, 7]  # first, middle, last of class 0
    assert few_shots(labels, [1], None).tolist() == [1, 3, 5]
    assert remap(torch.tensor([4, 0, 2]), [0, 2, 4]).tolist() == [2, 0, 1]


def test_validation_images_are_neither_shots_nor_aligned_on():
    labels = torch.arange(3).repeat_interleave(10)  # 3 classes x 10 images
    shots, validation, aligned = training_side_split(labels, 3, shots=4, val_per_class=3)
    assert len(shots) == 12 and len(validation) == 9 and len(aligned) == 21
    assert not set(validation.tolist()) & set(shots.tolist())
    assert not set(validation.tolist()) & set(aligned.tolist())
    assert set(shots.tolist()) <= set(aligned.tolist())
    assert torch.bincount(labels[validation]).tolist() == [3, 3, 3]
    assert len(training_side_split(labels, 3, shots=4, val_per_class=0)[1]) == 0


def test_mri_regions_merges_hemispheres_and_keeps_train_and_test_apart():
    task = load_task(load_config(["data=mri-regions"]).data)
    assert len(task.class_names) == len(set(task.class_names)) > 40
    assert not any(name.startswith("vermis") for name in task.class_names)  # on the midline: no side
    assert "Vermis_1_2" in task.provenance["dropped_regions"]
    counts = torch.bincount(task.test.labels, minlength=len(task.class_names))
    assert counts.min() == counts.max() == 24  # balanced test classes
    assert set(task.provenance["class_lobe"]) == set(task.class_names)
    assert "zero shared voxels" in task.provenance["split_rule"]


def test_an_image_recipe_refuses_a_vision_language_teacher_in_one_line(tmp_path, capsys):
    assert main(["recipe=kd", "teacher=open_clip", f"run_dir={tmp_path / 'run'}", "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert "teacher=open_clip is a vision-language model, used by recipe=ogkd only" in err
    assert "litemedsam" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_damaged_alignment_cache_entry_is_trained_again_with_a_warning(tmp_path):
    from types import SimpleNamespace

    from medkd.toolchain.vlm_pipeline import _load_alignment

    vlm = SimpleNamespace(image_projection=torch.nn.Linear(4, 3, bias=False),
                          text_projection=torch.nn.Linear(5, 3, bias=False),
                          logit_scale=torch.nn.Parameter(torch.zeros(())))
    before = vlm.image_projection.weight.detach().clone()
    path = tmp_path / "vlm-alignment-x.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(RuntimeWarning, match="alignment cache .* is unreadable"):
        assert _load_alignment(path, vlm) is None
    assert torch.equal(vlm.image_projection.weight, before)
