"""Training on a device: device/precision choice, no host sync per step, bf16 autocast,
the kernel-backend log, per-epoch validation (never the test split), DDP batch shares.

CUDA tests at the end run only with a GPU; elsewhere they skip with the reason."""

import collections
import contextlib
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medkd.recipes import UNLABELLED, build_recipe, labelled_cross_entropy
from medkd.toolchain import train as train_module
from medkd.toolchain.config import load_config
from medkd.toolchain.data.base import ImageSet
from medkd.toolchain.device import autocast, check_precision, grad_scaler, resolve_device
from medkd.toolchain.distributed import DistContext
from medkd.toolchain.errors import ConfigError, UserError
from medkd.toolchain.models.students import Student
from medkd.toolchain.train import TrainSettings, accuracy, fit, predict, step_indices, teacher_branch_accuracy

NUM_CLASSES, TEACHER_DIM, FEATURE_DIM = 3, 6, 4
RECIPE_CFG = {
    "scratch": {},
    "kd": {"temperature": 2.0, "alpha": 0.5, "probe_epochs": 3, "probe_lr": 0.01},
    "rd": {"reprogram_hidden": 8, "teacher_ce_weight": 1.0, "cka_weight": 1.0},
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to PyTorch)")


def tiny_recipe(name="scratch", seed=0):
    """A BatchNorm-free 1x4x4 -> FEATURE_DIM -> NUM_CLASSES student inside the real recipe."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(16, FEATURE_DIM), nn.Tanh())
    student = Student("tiny", "mlp", backbone, FEATURE_DIM, NUM_CLASSES, 1, 4)
    return build_recipe(OmegaConf.create({"name": name, **RECIPE_CFG[name]}), student, TEACHER_DIM)


def tiny_data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = torch.rand(n, 1, 4, 4, generator=g) + labels.view(-1, 1, 1, 1) * 0.3
    features = torch.randn(n, TEACHER_DIM, generator=g) + labels.view(-1, 1).float()
    return ImageSet(images, labels), features


def settings(**overrides):
    values = {"epochs": 2, "batch_size": 8, "lr": 0.01, "weight_decay": 0.0, "seed": 0, "progress": False}
    return TrainSettings(**{**values, **overrides})


def train_tiny(tmp_path, name="scratch", n=32, val_n=0, log=lambda line: None, on_epoch_end=None, **overrides):
    recipe = tiny_recipe(name)
    train, features = tiny_data(n)
    val, val_features = tiny_data(val_n, seed=2) if val_n else (None, None)
    teacher = recipe.needs_teacher
    result = fit(recipe, train, val, settings(**overrides), tmp_path, "fp",
                 features if teacher else None, val_features if teacher else None, log=log,
                 on_epoch_end=on_epoch_end)
    return recipe, result


# --------------------------------------------------------------------------- device and precision


def test_device_auto_picks_cuda_only_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)  # torchrun: GPU = LOCAL_RANK
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")
    with pytest.raises(ConfigError, match="LOCAL_RANK=2 needs GPU 2, but only 2"):
        resolve_device("cuda", local_rank=2)


def test_cuda_without_a_gpu_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device=cuda but no CUDA GPU") as info:
        resolve_device("cuda")
    assert "\n" not in str(info.value)


def test_config_accepts_device_and_precision_and_rejects_others():
    cfg = load_config(["device=cpu", "train.precision=bf16"])
    assert (cfg.device, cfg.train.precision) == ("cpu", "bf16")
    assert load_config([]).train.precision == "fp32"
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda, got 'gpu'"):
        load_config(["device=gpu"])
    with pytest.raises(ConfigError, match="train.precision must be one of fp32, bf16, fp16, got 'fp8'"):
        load_config(["train.precision=fp8"])


def test_fp16_needs_cuda_and_fit_refuses_it_before_writing_anything(tmp_path):
    check_precision("bf16", torch.device("cpu"))
    check_precision("fp16", torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        train_tiny(tmp_path, precision="fp16")
    assert list(tmp_path.iterdir()) == []


def test_only_fp16_gets_a_loss_scaler():
    assert not grad_scaler("fp32", torch.device("cpu")).is_enabled()
    assert not grad_scaler("bf16", torch.device("cpu")).is_enabled()
    with autocast("bf16", torch.device("cpu")):
        assert nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.bfloat16
    with autocast("fp32", torch.device("cpu")):
        assert nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float32


def test_bf16_autocast_trains_on_cpu_with_fp32_master_weights(tmp_path):
    recipe = tiny_recipe()
    seen = []
    recipe.student.head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype) if mod.training else None)
    train, _ = tiny_data(32)
    before = recipe.student.head.weight.detach().clone()
    bf16 = fit(recipe, train, None, settings(precision="bf16"), tmp_path, "fp", log=lambda line: None)
    assert seen and set(seen) == {torch.bfloat16}
    assert recipe.student.head.weight.dtype == torch.float32
    assert not torch.equal(recipe.student.head.weight, before)
    _, fp32 = train_tiny(tmp_path / "fp32")
    bf16_loss, fp32_loss = bf16.history[-1]["loss"], fp32.history[-1]["loss"]
    assert math.isfinite(bf16_loss) and bf16_loss != fp32_loss  # bf16 really ran ...
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.05)  # ... and trains the same model
    assert bf16.precision == "bf16" and bf16.device == "cpu"


# --------------------------------------------------------------------------- no host sync per step

SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def count_host_reads():
    """Count every Tensor -> Python/host conversion (each is a device sync on a GPU)."""
    counts = collections.Counter()
    with pytest.MonkeyPatch.context() as patch:
        for name in SYNCING:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                counts[_name] += 1
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        yield counts


@pytest.mark.parametrize("name", ["scratch", "kd", "rd"])
def test_host_reads_do_not_grow_with_the_number_of_steps(tmp_path, name):
    totals = {}
    for n in (16, 64):  # 2 and 8 steps per epoch, same epochs and validation set
        with count_host_reads() as counts:
            _, result = train_tiny(tmp_path / str(n), name, n=n, val_n=12)
        assert len(result.history) == 2 and "val_accuracy" in result.history[-1]
        totals[n] = sum(counts.values())
    assert totals[16] == totals[64], totals


def test_the_host_read_counter_sees_the_progress_postfix(tmp_path, monkeypatch):
    """The counter is not blind: a running loss every 2 steps adds one read per 2 steps
    (progress lines on; with progress=false nothing is shown, so nothing is read)."""
    monkeypatch.setattr(train_module, "POSTFIX_EVERY", 2)
    totals = {}
    for progress in (None, False):
        for n in (16, 64):
            with count_host_reads() as counts:
                train_tiny(tmp_path / f"{progress}-{n}", n=n, epochs=1, progress=progress)
            totals[progress, n] = counts["item"]
    assert totals[None, 64] - totals[None, 16] == (8 - 2) // 2
    assert totals[False, 64] == totals[False, 16]


# --------------------------------------------------------------------------- kernel backend log


@pytest.mark.parametrize("interpret, expected", [("1", "triton"), ("0", "torch")])
def test_rd_logs_which_cka_backend_ran(tmp_path, monkeypatch, interpret, expected):
    # batch 8 > feature widths 4: the d x d form is the cheaper one, so "auto" takes Triton
    # wherever it can run (CUDA tensors, or CPU tensors in triton's interpreter).
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    lines = []
    _, result = train_tiny(tmp_path, "rd", n=16, epochs=1, log=lines.append)
    assert result.kernel_backends == {"cka": expected}
    assert sum("backend" in line for line in lines) == 1 and f"cka backend: {expected}" in lines


def test_recipes_without_kernels_log_no_backend(tmp_path):
    lines = []
    _, result = train_tiny(tmp_path, "kd", n=16, epochs=1, log=lines.append)
    assert result.kernel_backends == {} and not any("backend" in line for line in lines)


# --------------------------------------------------------------------------- validation, not test


def test_val_is_evaluated_every_epoch_and_matches_a_direct_evaluation(tmp_path):
    recipe = tiny_recipe("rd")
    train, features = tiny_data(24)
    val, val_features = tiny_data(10, seed=5)
    lines = []
    result = fit(recipe, train, val, settings(epochs=3), tmp_path, "fp", features, val_features, log=lines.append)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert all("val_accuracy" in r and "teacher_val_accuracy" in r for r in result.history)
    assert not any(key.startswith("test") for r in result.history for key in r)
    assert result.history[-1]["val_accuracy"] == pytest.approx(accuracy(predict(recipe.deployable(), val.images),
                                                                        val.labels))
    with torch.no_grad():
        teacher = (recipe.teacher_logits(val_features).argmax(1) == val.labels).float().mean().item()
    assert result.history[-1]["teacher_val_accuracy"] == pytest.approx(teacher)
    assert teacher_branch_accuracy(recipe, val_features, val.labels) == pytest.approx(teacher)
    assert teacher_branch_accuracy(tiny_recipe("scratch"), val_features, val.labels) is None
    assert sum("val acc" in line for line in lines) == 3
    assert next(recipe.parameters()).device.type == "cpu" and not recipe.training  # ready for export


def test_on_epoch_end_gets_each_checkpointed_record(tmp_path):
    seen = []

    def check(record):
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == record["epoch"]
        seen.append(record)

    _, result = train_tiny(tmp_path, val_n=6, epochs=3, on_epoch_end=check)
    assert seen == result.history and [r["epoch"] for r in seen] == [1, 2, 3]


def test_without_val_only_losses_are_recorded(tmp_path):
    _, result = train_tiny(tmp_path, "kd", epochs=1)
    assert set(result.history[0]) == {"epoch", "loss", "kl", "ce"}


def test_epoch_loss_is_the_mean_of_the_step_losses(tmp_path, monkeypatch):
    step_losses = []
    real_forward = train_module.RecipeLoss.forward

    def recording(self, *args):
        loss, parts = real_forward(self, *args)
        step_losses.append(loss.detach().clone())
        return loss, parts

    monkeypatch.setattr(train_module.RecipeLoss, "forward", recording)
    _, result = train_tiny(tmp_path, n=20, epochs=1)  # steps of 8, 8 and 4 images
    assert len(step_losses) == 3
    assert result.history[0]["loss"] == pytest.approx(torch.stack(step_losses).mean().item(), rel=1e-6)


# --------------------------------------------------------------------------- losses


def test_labelled_cross_entropy_by_hand():
    # Zero logits over 3 classes: every labelled row costs ln 3. Row 1 has logit 2 on its
    # class: ln(e^2 + 2) - 2. Unlabelled rows count for nothing.
    logits = torch.zeros(4, 3)
    logits[1, 2] = 2.0
    labels = torch.tensor([0, 2, UNLABELLED, UNLABELLED])
    expected = (math.log(3) + math.log(math.exp(2) + 2) - 2) / 2
    assert labelled_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    none = labelled_cross_entropy(logits.requires_grad_(), torch.full((4,), UNLABELLED))
    assert none.item() == 0.0 and none.requires_grad


@pytest.mark.parametrize("name", ["scratch", "kd", "rd"])
def test_loss_parts_are_detached_tensors(name):
    recipe = tiny_recipe(name)
    train, features = tiny_data(6)
    recipe.prepare(features, train.labels)
    from medkd.recipes import Batch

    loss, parts = recipe.loss(Batch(train.images, train.labels, features if recipe.needs_teacher else None))
    assert loss.requires_grad and parts
    for value in parts.values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad


# --------------------------------------------------------------------------- DDP batch shares


def test_step_indices_split_each_global_batch_into_equal_shares():
    order = torch.tensor([7, 3, 9, 0, 5, 1, 8, 2, 6, 4])
    assert step_indices(order, 0, 4).tolist() == [7, 3, 9, 0]
    assert step_indices(order, 2, 4).tolist() == [6, 4]  # a single process keeps the short last batch
    assert [step_indices(order, 0, 4, r, 2).tolist() for r in range(2)] == [[7, 3], [9, 0]]
    assert [step_indices(order, 2, 4, r, 2).tolist() for r in range(2)] == [[6], [4]]
    # 2 rows for 4 ranks: padded from the start of the permutation, one row each
    assert [step_indices(order, 2, 4, r, 4).tolist() for r in range(4)] == [[6], [4], [7], [3]]
    # every rank takes the same number of steps: ceil(10 / 4) global batches
    assert all(len(step_indices(order, s, 4, r, 4)) == 1 for s in range(3) for r in range(4))


def test_batch_size_must_split_evenly_over_processes(tmp_path):
    # Checked before any collective, so a plain context with world_size=2 is enough.
    with pytest.raises(UserError, match="multiple of the number of processes \\(2\\)"):
        fit(tiny_recipe(), tiny_data(8)[0], None, settings(batch_size=7), tmp_path, "fp",
            dist=DistContext(rank=0, world_size=2))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- CUDA (skipped without a GPU)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_moves_everything_to_the_gpu_and_back(tmp_path, precision):
    recipe = tiny_recipe("kd")
    train, features = tiny_data(64)
    val, val_features = tiny_data(12, seed=2)
    result = fit(recipe, train, val, settings(precision=precision), tmp_path, "fp", features, val_features,
                 log=lambda line: None, device="cuda")
    assert result.device.startswith("cuda") and math.isfinite(result.history[-1]["loss"])
    assert next(recipe.parameters()).device.type == "cpu"
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert "cuda_rng" in state and bool(state["grad_scaler"]) == (precision == "fp16")


@needs_cuda
def test_cuda_steps_do_not_synchronise(tmp_path):
    """torch's own sync detector: warnings per run must not grow with the steps."""
    import warnings

    totals = {}
    for n in (16, 64):
        recipe = tiny_recipe("rd")
        train, features = tiny_data(n)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fit(recipe, train, None, settings(), tmp_path / str(n), "fp", features, log=lambda line: None,
                    device="cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        totals[n] = sum("synchroniz" in str(w.message) for w in caught)
    assert totals[16] == totals[64], totals


@needs_cuda
def test_rd_runs_the_triton_cka_on_cuda(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lines = []
    recipe = tiny_recipe("rd")
    train, features = tiny_data(32)
    result = fit(recipe, train, None, settings(epochs=1), tmp_path, "fp", features, log=lines.append, device="cuda")
    assert result.kernel_backends == {"cka": "triton"} and "cka backend: triton" in lines


@needs_cuda
def test_teacher_features_on_the_gpu_match_the_cpus_and_the_teacher_stays_on_the_cpu():
    from medkd.toolchain.features import teacher_features
    from medkd.toolchain.models.teachers import build_teacher

    teacher = build_teacher({"name": "litemedsam", "input_size": 32})
    images = torch.rand(6, 1, 32, 32)
    on_cpu = teacher_features(teacher, images, None, batch_size=4, progress=False)
    on_gpu = teacher_features(teacher, images, None, batch_size=4, progress=False, device="cuda")
    assert next(teacher.parameters()).device.type == "cpu"
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-3, rtol=1e-3)  # cuDNN may use TF32
