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
    "data.max_train=96",
    "data.max_test=48",
    "train.epochs=2",
    "train.batch_size=32",
    "teacher=efficientnet-lite0",
    "export.latency_runs=5",
    "export.latency_warmup=1",
    "progress=false",
]


@pytest.fixture
def small(tmp_path):
    def overrides(*extra):
        return SMALL + [f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", *extra]

    return overrides


def test_rd_build_writes_every_artifact_and_an_honest_report(small, tmp_path):
    report = run(load_config(small("recipe=rd", "target=jetson-orin")))
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "checkpoint.pt", "student.safetensors", "model.onnx", "report.json", "report.md", "log.txt"):
        assert (run_dir / name).is_file(), name
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["training"]["test_accuracy"] == pytest.approx(report["training"]["test_accuracy"])
    assert 0.0 <= on_disk["training"]["test_accuracy"] <= 1.0
    assert on_disk["export"]["parity"]["max_abs_diff"] < 1e-3
    assert on_disk["latency"]["p50_ms"] <= on_disk["latency"]["p99_ms"]
    assert on_disk["target"]["name"] == "jetson-orin" and on_disk["target"]["engine_built"] is False
    assert len(on_disk["training"]["history"]) == 2
    assert "teacher_test_accuracy" in on_disk["training"]["history"][-1]
    assert "jetson-orin" in (run_dir / "report.md").read_text()
    # The firmware container holds exactly the exported ONNX model.
    from medkd.export.firmware import read_firmware_blob

    header, payload = read_firmware_blob(run_dir / "firmware" / "medkd_model.bin")
    assert header["kind"] == "onnx" and payload == (run_dir / "model.onnx").read_bytes()
    assert on_disk["export"]["firmware"]["crc32"] == header["crc32"]
    assert "medkd_model.bin" in (run_dir / "report.md").read_text()


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
