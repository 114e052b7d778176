"""Multi-process training through the real torchrun (gloo backend, CPU).

One torchrun launch with 2 processes runs every distributed scenario (process start-up
dominates the cost): training k steps, resuming under DDP, and the shared-result helpers.
The pytest process then compares with a single process training on the full batches.

Run as a script (`torchrun ... tests/test_ddp.py worker OUT RUN`) this file is the worker.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medkd.recipes import build_recipe
from medkd.toolchain.data.base import ImageSet
from medkd.toolchain.distributed import (
    DistContext,
    broadcast_tensor,
    compute_once,
    main_process_first,
    setup,
    teardown,
    torchrun_env,
)
from medkd.toolchain.errors import UserError
from medkd.toolchain.models.students import Student
from medkd.toolchain import train as train_module
from medkd.toolchain.train import TrainSettings, fit

NUM_CLASSES = 3
# 20 images in global batches of 8: steps of 8, 8 and 4 images (2, 2 and 1 rows a rank ...
# times 2 ranks), 2 epochs = k = 6 optimizer steps.
TRAIN_N, VAL_N, BATCH, EPOCHS = 20, 10, 8, 2


def tiny_recipe(seed):
    """BatchNorm-free 1x4x4 -> 5 -> 3 student, trained by the scratch recipe."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Tanh())
    student = Student("tiny", "mlp", backbone, 5, NUM_CLASSES, 1, 4)
    return build_recipe(OmegaConf.create({"name": "scratch"}), student, None)


def tiny_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    return ImageSet(torch.rand(n, 1, 4, 4, generator=g) + labels.view(-1, 1, 1, 1) * 0.2, labels)


def settings(epochs=EPOCHS):
    return TrainSettings(epochs=epochs, batch_size=BATCH, lr=0.05, weight_decay=0.01, seed=3, progress=False)


def train(run_dir, epochs=EPOCHS, resume=False, init_seed=0, log=lambda line: None, dist=None):
    recipe = tiny_recipe(init_seed)
    result = fit(recipe, tiny_data(TRAIN_N, 1), tiny_data(VAL_N, 2), settings(epochs), Path(run_dir), "fp",
                 resume=resume, log=log, dist=dist)
    return recipe.state_dict(), result


# --------------------------------------------------------------------------- the worker


def worker(out_dir: Path, run_dir: Path) -> None:
    ctx = setup("cpu")
    lines, rows_per_step = [], []
    real_forward = train_module.RecipeLoss.forward

    def counting_forward(self, images, *rest):
        rows_per_step.append(len(images))
        return real_forward(self, images, *rest)

    train_module.RecipeLoss.forward = counting_forward
    weights, result = train(run_dir / "train", log=lines.append, dist=ctx)
    train_module.RecipeLoss.forward = real_forward

    # Resume under DDP: both ranks are killed in epoch 2 (after rank 0 checkpointed epoch
    # 1), then a fresh, differently initialised recipe resumes on both ranks.
    real_sync, epochs_seen = train_module.sync_buffers, []

    def sync_then_die_in_epoch_2(*args):
        epochs_seen.append(1)
        if len(epochs_seen) == 2:
            raise KeyboardInterrupt
        real_sync(*args)

    train_module.sync_buffers = sync_then_die_in_epoch_2
    try:
        train(run_dir / "resume", dist=ctx)
    except KeyboardInterrupt:
        pass
    train_module.sync_buffers = real_sync
    resumed_weights, resumed = train(run_dir / "resume", resume=True, init_seed=99, dist=ctx)

    calls = []
    shared = compute_once(ctx, lambda: calls.append(1) or torch.full((3, 2), 10.0 + ctx.rank))
    flag = run_dir / "written-by-rank-0.txt"
    with main_process_first(ctx):
        if ctx.is_main:
            flag.write_text("cache")
        seen_cache = flag.exists()
    echoed = broadcast_tensor(ctx, torch.arange(4.0) * 7 if ctx.rank == 0 else None)
    torch.save({"weights": weights, "history": result.history, "log": lines, "rows_per_step": rows_per_step, "world_size": result.world_size,
                "resumed_weights": resumed_weights, "resumed_from": resumed.resumed_from_epoch,
                "killed": len(epochs_seen) == 2,
                "compute_calls": len(calls), "shared": shared, "seen_cache": seen_cache, "echoed": echoed},
               out_dir / f"rank{ctx.rank}.pt")
    teardown(ctx)


# --------------------------------------------------------------------------- the test


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out_dir, run_dir = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("run")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, "worker",
               str(out_dir), str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return ranks, run_dir


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return train(tmp_path_factory.mktemp("single"))


def test_two_processes_train_the_same_weights_as_one_process_on_the_full_batch(two_processes, single_process):
    (rank0, rank1), _ = two_processes
    weights, result = single_process
    assert rank0["world_size"] == 2
    # Each rank takes half of every global batch (8, 8, 4 images): one pass over the data
    # per epoch between them. Overlapping shares would move the weights off the reference.
    assert rank0["rows_per_step"] == rank1["rows_per_step"] == [4, 4, 2] * EPOCHS
    for name, tensor in weights.items():
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name  # ranks in lockstep
        assert (rank0["weights"][name] - tensor).abs().max() <= 1e-5, name
        assert not torch.equal(tensor, tiny_recipe(0).state_dict()[name]), name  # it did train
    # Per-epoch metrics are all-reduced: the full-batch loss and the whole validation set.
    assert rank0["history"] == rank1["history"]
    for got, want in zip(rank0["history"], result.history, strict=True):
        assert got == pytest.approx(want, rel=1e-5)


def test_only_rank_0_writes_artifacts_and_logs(two_processes):
    (rank0, rank1), run_dir = two_processes
    assert sorted(p.name for p in (run_dir / "train").iterdir()) == ["checkpoint.pt"]
    assert rank1["log"] == []
    assert sum(line.startswith("epoch ") for line in rank0["log"]) == EPOCHS
    assert any("2 processes" in line for line in rank0["log"])


def test_resume_under_ddp_ends_where_an_uninterrupted_run_does(two_processes):
    (rank0, rank1), _ = two_processes
    for rank in (rank0, rank1):
        assert rank["resumed_from"] == 1 and rank["killed"]
        for name, tensor in rank0["weights"].items():
            torch.testing.assert_close(rank["resumed_weights"][name], tensor, rtol=0, atol=1e-6)


def test_shared_results_are_computed_once_on_rank_0(two_processes):
    (rank0, rank1), _ = two_processes
    assert (rank0["compute_calls"], rank1["compute_calls"]) == (1, 0)
    assert torch.equal(rank1["shared"], torch.full((3, 2), 10.0)) and rank1["shared"].device.type == "cpu"
    assert rank0["seen_cache"] and rank1["seen_cache"]  # rank 1 ran its block after rank 0's
    assert torch.equal(rank1["echoed"], torch.arange(4.0) * 7)


def test_single_process_helpers_are_no_ops():
    ctx = DistContext()
    assert not ctx.enabled and ctx.is_main
    assert compute_once(ctx, lambda: torch.ones(2)).tolist() == [1.0, 1.0]
    with main_process_first(ctx):
        pass


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "must be integers"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=2 WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR/MASTER_PORT are not set"),
])
def test_a_broken_torchrun_environment_is_a_one_line_error(env, message):
    with pytest.raises(UserError, match=message):
        torchrun_env(env)


def test_torchrun_environment_is_read():
    assert torchrun_env({}) == (0, 1, 0)
    env = {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert torchrun_env(env) == (5, 8, 1)
    assert setup("cpu", environ={}) == DistContext()  # no torchrun: one process, no process group


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(Path(sys.argv[2]), Path(sys.argv[3]))


def test_medkd_build_under_torchrun_writes_one_run_and_shares_teacher_features(tmp_path):
    """The whole build with 2 processes: rank 0 locks, computes teacher features once,
    writes every artifact; the report records both processes; the manifest verifies."""
    from test_pipeline import SMALL

    from medkd.toolchain.verify_cli import main as verify

    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    build = str(Path(sys.executable).with_name("medkd-build"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", build, *SMALL, "recipe=kd",
               f"run_dir={run_dir}", f"cache_dir={cache_dir}"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["training"]["world_size"] == 2
    assert done.stdout.count("stage teacher_features: started") == 1  # rank 1 logs nothing
    # Train (one file per augmented view, data.augment_views) + test features, computed by rank 0 only.
    assert len(list(cache_dir.glob("*.safetensors"))) == report["data"]["augment"]["views"] + 1 == 3
    assert not list(tmp_path.glob("*/.medkd.lock")) and verify([str(run_dir)]) == 0
