"""End to end through `medkd-build`: real data, real teacher, train, export, report, resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from medkd.toolchain import train as train_module
from medkd.toolchain.cli import main
from medkd.toolchain.config import load_config
from medkd.toolchain.pipeline import run

# Small enough for 2 CPU cores in seconds; the teacher is the fast timm one.
SMALL = [
    # data=mri's former default augmentation (now off), so the end-to-end tests cover augmented views
    "data.augment='crop=0.8,hflip,rotate=10,jitter=0.1'",
    "data.max_train=96",
    "data.max_test=48",
    "train.epochs=2",
    "train.batch_size=32",
    "teacher=efficientnet-lite0",
    "export.latency_runs=3",
    "export.latency_warmup=1",
    "export.latency_batches=[1,4]",
    "export.latency_threads=[1]",
    "export.calibration.images=32",
    "export.precision=fp32",
    "progress=false",
]


@pytest.fixture
def small(tmp_path):
    def overrides(*extra):
        return SMALL + [f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", *extra]

    return overrides


def test_rd_build_for_jetson_writes_bundle_firmware_and_an_honest_report(small, tmp_path):
    report = run(load_config(small("recipe=rd", "target=jetson-orin", "export.precision=fp16")))
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "checkpoint.pt", "student.safetensors", "model.onnx", "model.fp16.onnx",
                 "report.json", "report.md", "log.txt", "bundle/manifest.json", "bundle/build_engine.sh",
                 "firmware/medkd_model.bin", "firmware/medkd_model.S", "firmware/medkd_model.manifest.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "model.int8.onnx").exists() and not (run_dir / ".export.staging").exists()
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["training"]["test_accuracy"] == pytest.approx(report["training"]["test_accuracy"])
    model = on_disk["export"]["models"]["model"]
    assert model["deployed_precision"] == "fp16" and model["deployed_file"] == "model.fp16.onnx"
    assert model["formats"]["onnx"]["parity"]["max_abs_diff"] <= 1e-4
    assert model["formats"]["onnx-fp16"]["parity"]["top1_agreement"] >= 0.995
    assert set(model["test_metric"]) == {"fp32", "fp16"}
    assert {(r["batch_size"], r["threads"]) for r in model["latency"]["fp16"]} == {(1, 1), (4, 1)}
    assert "host proxy" in on_disk["export"]["latency_note"]
    assert on_disk["target"]["name"] == "jetson-orin" and on_disk["target"]["engine_built"] is False
    assert any("build_engine.sh" in line for line in on_disk["target"]["remaining"])
    # The bundle verifies from disk and ships the deployed ONNX; so does the firmware blob.
    from medkd.export.bundle import verify_bundle
    from medkd.export.firmware import read_firmware_blob

    manifest = verify_bundle(run_dir / "bundle")
    assert manifest["precision"] == "fp16" and manifest["class_names"] == report["data"]["class_names"]
    header, payload = read_firmware_blob(run_dir / "firmware" / "medkd_model.bin")
    assert header["kind"] == "onnx" and payload == (run_dir / "model.fp16.onnx").read_bytes()
    assert (run_dir / "bundle" / "model.fp16.onnx").read_bytes() == payload
    md = (run_dir / "report.md").read_text()
    for needle in ("jetson-orin", "medkd_model.bin", "fp16 (deployed)", "build_engine.sh", "host proxy"):
        assert needle in md, needle
    for plot in model["plots"]:
        assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot})" in md


def test_cpu_int8_build_deploys_the_guarded_int8_model(small, tmp_path):
    # The guard's decisions are tested in test_guard.py; here a 2-epoch model only has to pass through.
    report = run(load_config(small("recipe=scratch", "export.precision=int8", "export.max_accuracy_drop=100",
                                   "export.parity.int8_min_agreement=0")))
    model = report["export"]["models"]["model"]
    run_dir = tmp_path / "run"
    assert model["deployed_file"] == "model.int8.onnx" and model["formats"]["onnx-int8"]["preset"] == "int8-cpu"
    assert model["formats"]["onnx-int8"]["unquantized"] == {"/head/Gemm": "final classifier: logits kept in fp32"}
    assert (run_dir / "model.int8.onnx").stat().st_size < (run_dir / "model.onnx").stat().st_size / 3.5
    from medkd.export.firmware import read_firmware_blob

    assert read_firmware_blob(run_dir / "firmware" / "medkd_model.bin")[1] == (run_dir / "model.int8.onnx").read_bytes()
    assert not (run_dir / "bundle").exists()
    assert "Layers left unquantized" in (run_dir / "report.md").read_text()


def test_existing_run_is_not_clobbered(small, capsys):
    assert main(small("recipe=scratch")) == 0
    assert main(small("recipe=scratch")) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_resume_after_kill_matches_an_uninterrupted_run(small, tmp_path, monkeypatch):
    reference = run(load_config(small("recipe=kd", "overwrite=true")))
    reference_weights = load_file(str(tmp_path / "run" / "student.safetensors"))

    real_save = train_module.save_checkpoint
    calls = {"n": 0}

    def save_then_die(run_dir, state):
        real_save(run_dir, state)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # killed right after epoch 1 was checkpointed

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(load_config(small("recipe=kd", "overwrite=true")))
    assert not (tmp_path / "run" / "report.json").exists()

    resumed = run(load_config(small("recipe=kd", "resume=true")))
    assert resumed["run"]["resumed_from_epoch"] == 1
    resumed_weights = load_file(str(tmp_path / "run" / "student.safetensors"))
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6)
    for got, want in zip(resumed["training"]["history"], reference["training"]["history"], strict=True):
        assert got == pytest.approx(want)


def test_corrupt_checkpoint_is_a_clear_error(small, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(small("recipe=scratch", "resume=true")) == 1
    err = capsys.readouterr().err
    assert "corrupt" in err and "Traceback" not in err


def test_bad_data_path_leaves_no_run_dir(small, tmp_path, capsys):
    assert main(small("data=npz", f"data.path={tmp_path / 'missing.npz'}")) == 1
    assert "missing.npz" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_scarce_labels_keep_withheld_images_as_a_transfer_set(small, tmp_path):
    report = run(load_config(small("recipe=kd", "data.train_fraction=0.25")))
    labelled = report["data"]["train"]
    assert report["data"]["unlabelled_transfer_set"] == 96 - labelled > 0
    scratch = run(load_config(small("recipe=scratch", "data.train_fraction=0.25", f"run_dir={tmp_path / 's'}")))
    assert scratch["data"]["unlabelled_transfer_set"] == 0  # nothing to learn from without labels
    off = run(load_config(small("recipe=kd", "data.train_fraction=0.25", "data.unlabelled_transfer=false",
                                f"run_dir={tmp_path / 'off'}")))
    assert off["data"]["unlabelled_transfer_set"] == 0


@pytest.mark.parametrize("overrides, fragment", [
    (["target=cpu", "export.precision=fp16"], "target cpu does not support precision fp16"),
    (["export.precision=int4"], "unknown export.precision 'int4'"),
    (["target=jetson-orin", "export.formats=[tensorrtt]"], "did you mean 'tensorrt'"),
    (["target=cpu", "export.formats=[bundle]"], "format 'bundle' is not for target cpu"),
    (["export.precision=int8", "export.calibration.images=0"], "must be a positive integer"),
    (["export.precision=int8", "export.calibration.images=100000"], "training images left"),
    (["export.opset=9"], "export.opset must be between 13"),
    (["target=jetson-orin-nano", "export.dla_core=0"], "has no DLA"),
])
def test_bad_export_options_fail_before_the_run_directory_is_touched(small, tmp_path, capsys, overrides, fragment):
    assert main(small(*overrides)) == (1 if "DLA" in fragment else 2)  # DLA: a device fact, not a typo
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_reexport_for_another_target_without_retraining(small, tmp_path, capsys):
    from medkd.export.bundle import verify_bundle
    from medkd.toolchain.export_cli import main as export_main

    run(load_config(small("recipe=scratch")))  # cpu, fp32
    run_dir = tmp_path / "run"
    student = (run_dir / "student.safetensors").read_bytes()
    assert export_main([str(run_dir), "target=jetson-orin", "export.precision=fp16"]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["target"]["name"] == "jetson-orin"
    assert report["export"]["models"]["model"]["deployed_file"] == "model.fp16.onnx"
    assert report["run"]["exports"][0]["command"].endswith("target=jetson-orin export.precision=fp16")
    assert verify_bundle(run_dir / "bundle")["precision"] == "fp16"
    assert (run_dir / "student.safetensors").read_bytes() == student  # no retraining
    assert "name: jetson-orin" in (run_dir / "config.yaml").read_text()
    from medkd.toolchain.verify_cli import main as verify_main

    assert verify_main([str(run_dir)]) == 0  # the manifest follows the new export

    capsys.readouterr()
    assert export_main([str(run_dir), "train.epochs=3"]) == 2
    assert export_main([str(run_dir), "target=jetsn-orin"]) == 2
    assert export_main([str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "only target= and export.*" in err[0] and "did you mean 'jetson-orin'" in err[1]
    assert "Traceback" not in "".join(err)


def test_failed_export_keeps_the_training_and_the_previous_export(small, tmp_path, monkeypatch, capsys):
    from medkd.export import exporter
    from medkd.toolchain.export_cli import main as export_main

    run(load_config(small("recipe=scratch")))
    run_dir = tmp_path / "run"
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*")
              if p.is_file() and p.name != "log.txt"}

    real_parity = exporter.onnx_parity

    def drifting_parity(*args, **kwargs):
        return {**real_parity(*args, **kwargs), "max_abs_diff": 0.5}

    monkeypatch.setattr(exporter, "onnx_parity", drifting_parity)
    assert export_main([str(run_dir), "export.precision=int8"]) == 1
    err = capsys.readouterr().err
    assert "fp32 ONNX parity check failed (max abs diff 0.5 > 0.0001)" in err and "Traceback" not in err
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "log.txt"}
    assert after == before  # checkpoint, student, previous ONNX/firmware/report all untouched, no staging left
    from medkd.toolchain.verify_cli import main as verify_main

    assert verify_main([str(run_dir)]) == 0  # and the manifest still holds
