"""Signs of life: periodic progress lines off a terminal, heartbeats, stage start/end lines."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from medkd.toolchain.features import teacher_features
from medkd.toolchain.progress import LineProgress, ProgressPolicy, StageTimer, as_policy


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_line_progress_prints_at_most_once_per_interval_with_eta():
    clock, lines = FakeClock(), []
    bar = LineProgress(total=100, desc="teacher features", unit="img", interval_s=30, write=lines.append, clock=clock)
    clock.now += 10
    bar.update(10)
    assert lines == []  # 10 s < 30 s: quiet
    clock.now += 20
    bar.update(15)  # 30 s since start: one line
    assert lines == ["teacher features: 25/100 img (25%), 30 s elapsed, ~1 min 30 s left"]
    clock.now += 29
    bar.update(25)
    assert len(lines) == 1  # 29 s since the last line
    clock.now += 1
    bar.set_postfix(loss="0.512")
    bar.update(0)
    assert lines[-1] == "teacher features: 50/100 img (50%), 1 min 00 s elapsed, ~1 min 00 s left, loss 0.512"
    bar.close()
    bar.close()  # idempotent
    assert lines[-1] == "teacher features: done, 50 img in 1 min 00 s"
    assert len(lines) == 3


def test_short_work_prints_no_line_at_all():
    clock, lines = FakeClock(), []
    with LineProgress(total=3, desc="x", unit="img", interval_s=30, write=lines.append, clock=clock) as bar:
        for _ in range(3):
            clock.now += 1
            bar.update(1)
    assert lines == []


def test_iterating_a_line_progress_counts_every_item():
    clock, lines = FakeClock(), []
    bar = LineProgress(total=None, desc="runs", unit="run", interval_s=5, write=lines.append,
                       iterable=range(4), clock=clock)
    for _ in bar:
        clock.now += 3
    assert bar.count == 4 and bar.closed
    # lines at 6 s and 12 s after the start (no total: no percentage, no ETA), then the closing line
    assert lines == ["runs: 2 run, 6 s elapsed", "runs: 4 run, 12 s elapsed", "runs: done, 4 run in 12 s"]


def test_policy_picks_bars_lines_or_silence(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert type(as_policy("auto").bar(total=3)) is LineProgress
    assert type(as_policy(None).bar(total=3)) is LineProgress
    quiet = as_policy(False).bar(total=3)
    assert not isinstance(quiet, tqdm) and type(quiet) is not LineProgress
    forced = as_policy(True).bar(total=3)
    assert isinstance(forced, tqdm)
    forced.close()
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    auto_on_terminal = as_policy("auto").bar(total=3)
    assert isinstance(auto_on_terminal, tqdm)
    auto_on_terminal.close()


def test_silent_bar_prints_nothing_even_after_the_interval():
    lines = []
    bar = ProgressPolicy(False, interval_s=0.0, write=lines.append).bar(total=2, desc="x")
    bar.update(2)
    bar.close()
    assert lines == [] and bar.count == 2


def test_heartbeat_beats_while_the_body_runs_and_stops_after(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    lines = []
    policy = ProgressPolicy(None, interval_s=0.05, write=lines.append)
    with policy.heartbeat("int8 calibration"):
        time.sleep(0.32)
    count = len(lines)
    assert count >= 3, lines
    assert all(line.startswith("int8 calibration: still running, ") for line in lines)
    time.sleep(0.15)
    assert len(lines) == count  # the thread stopped with the body


@pytest.mark.parametrize("mode,terminal", [(False, False), (None, True), (True, False)])
def test_no_heartbeat_when_quiet_or_when_bars_show_life(monkeypatch, mode, terminal):
    monkeypatch.setattr("sys.stderr.isatty", lambda: terminal, raising=False)
    lines = []
    with ProgressPolicy(mode, interval_s=0.02, write=lines.append).heartbeat("x"):
        time.sleep(0.1)
    assert lines == []


def test_stage_timer_logs_start_and_end_and_keeps_seconds():
    lines = []
    stages = StageTimer(lines.append, digits=2)
    with stages("training"):
        time.sleep(0.05)
    assert lines[0] == "stage training: started"
    assert lines[1].startswith("stage training: done in ") and lines[1].endswith(" s")
    assert 0.0 < stages.seconds["training"] < 5


def test_stage_timer_logs_a_failure_and_reraises():
    lines = []
    stages = StageTimer(lines.append, prefix="export model")
    with pytest.raises(ValueError):
        with stages("onnx-int8"):
            raise ValueError("boom")
    assert lines[-1].startswith("export model onnx-int8: failed after ")
    assert "onnx-int8" in stages.seconds


class SlowTeacher(nn.Module):
    feature_dim = 4
    fingerprint = "slow-test-teacher"

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(1, 4)

    def forward(self, x):
        time.sleep(0.03)
        return self.proj(x.mean(dim=(1, 2, 3)).unsqueeze(1))


def test_teacher_features_print_progress_lines_off_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    lines = []
    policy = ProgressPolicy(None, interval_s=0.05, write=lines.append)
    feats = teacher_features(SlowTeacher(), torch.rand(16, 1, 4, 4), None, batch_size=2,
                             desc="teacher features (train)", progress=policy)
    assert feats.shape == (16, 4)
    progress_lines = [line for line in lines if "/16 img" in line]
    assert progress_lines and all(line.startswith("teacher features (train): ") for line in progress_lines)
    assert lines[-1] == f"teacher features (train): done, 16 img in {lines[-1].split(' in ')[-1]}"


def test_a_build_off_a_terminal_logs_every_stage_and_progress_lines(tmp_path, capsys, monkeypatch):
    """The signs of life of a real (tiny) build whose output is not a terminal."""
    from test_pipeline import SMALL

    from medkd.toolchain.cli import main

    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    overrides = [o for o in SMALL if not o.startswith("progress=")]
    code = main([*overrides, "recipe=kd", "progress=auto", "progress_interval=0.001",
                 f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for stage in ("teacher_features", "training", "export"):
        assert f"stage {stage}: started" in out and f"stage {stage}: done in " in out
    assert "stage setup: done in " in out
    for fmt in ("onnx", "firmware"):
        assert f"export model {fmt}: started" in out
    # Long-running parts print progress lines (here every 1 ms): teacher features, epochs, latency.
    assert "teacher features (train, view 1/2): " in err and " img (" in err  # data=mri: 2 augmented views
    assert "epoch 1/2: " in err and "latency: " in err
