"""Every recipe's loss against values computed by hand on a tiny batch, term by term.

The students here are stubs whose features are the images themselves (identity backbone)
and whose head is the identity, so every logit is a number written in the test. Expected
values are plain-Python arithmetic (log-softmax, KL and CKA written out elementwise below),
never a call to the formula under test, so dropping a factor or a term, swapping two
weights or detaching the wrong side fails here. Later recipes follow the same rule.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medkd.kernels import cka_loss
from medkd.recipes import UNLABELLED, Batch, build_recipe
from medkd.toolchain.data.base import TaskInfo
from medkd.toolchain.models.students import Student

REL = 1e-5  # float32 recipe arithmetic against float64 hand arithmetic

# --------------------------------------------------------------------------- hand arithmetic


def log_softmax(z: list[float]) -> list[float]:
    top = max(z)
    log_sum = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - log_sum for v in z]


def cross_entropy(z: list[float], label: int) -> float:
    return -log_softmax(z)[label]


def softened_kl(student: list[float], teacher: list[float], t: float) -> float:
    """KL(softmax(teacher/t) || softmax(student/t)), one row, without the t^2 factor."""
    log_p = log_softmax([v / t for v in teacher])
    log_q = log_softmax([v / t for v in student])
    return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q))


def linear_cka(xs: list[list[float]], ys: list[list[float]]) -> float:
    """Textbook linear CKA from centred Gram matrices: <K, L> / (||K|| ||L||)."""
    def centred_gram(rows):
        means = [sum(col) / len(rows) for col in zip(*rows)]
        c = [[v - m for v, m in zip(row, means)] for row in rows]
        return [[sum(a * b for a, b in zip(r, s)) for s in c] for r in c]

    def inner(a, b):
        return sum(u * v for ra, rb in zip(a, b) for u, v in zip(ra, rb))

    k, l = centred_gram(xs), centred_gram(ys)
    return inner(k, l) / math.sqrt(inner(k, k) * inner(l, l))


def test_hand_helpers_on_numbers_written_out():
    # log-softmax of [0, ln 3]: probabilities 1/4, 3/4
    assert log_softmax([0.0, math.log(3)]) == pytest.approx([math.log(0.25), math.log(0.75)])
    # KL of (3/4, 1/4) from (1/2, 1/2) at t = 1
    assert softened_kl([0.0, 0.0], [math.log(3), 0.0], 1.0) == pytest.approx(
        0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    # 1-D features: linear CKA is the squared Pearson correlation. x = 0,1,2; y = 0,0,3:
    # centred x = -1,0,1, y = -1,-1,2; cov 3/3 = 1, var x 2/3, var y 6/3 -> corr^2 = 3/4.
    assert linear_cka([[0.0], [1.0], [2.0]], [[0.0], [0.0], [3.0]]) == pytest.approx(0.75)


# --------------------------------------------------------------------------- linear CKA


X_2D = [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
Y_1D = [[1.0], [0.0], [0.0]]
# Xc^T Xc = [[2/3, -1/3], [-1/3, 2/3]], Xc^T Yc = [2/3, -1/3], Yc^T Yc = 2/3 (the 1/n factors
# cancel): CKA = (4/9 + 1/9) / sqrt((4/9 + 1/9 + 1/9 + 4/9) * 4/9) = 5 / sqrt(40) = sqrt(10)/4.
CKA_2D = math.sqrt(10) / 4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cka_loss_on_hand_cases(backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton kernels run on the CPU interpreter
    x1, y1 = torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[0.0], [0.0], [3.0]])
    assert cka_loss(x1, y1, backend=backend).item() == pytest.approx(1 - 0.75, abs=1e-6)
    x, y = torch.tensor(X_2D), torch.tensor(Y_1D)
    assert cka_loss(x, y, backend=backend).item() == pytest.approx(1 - CKA_2D, abs=1e-6)
    # Constant columns change nothing; at 6 columns (n=3 < d) the reference takes its n x n
    # Gram form instead of the d x d covariance form, with the same value.
    wide_x = torch.cat([x, torch.full((3, 4), 5.0)], dim=1)
    wide_y = torch.cat([y, torch.full((3, 5), -2.0)], dim=1)
    assert cka_loss(wide_x, wide_y, backend=backend).item() == pytest.approx(1 - CKA_2D, abs=1e-6)
    assert linear_cka(X_2D, Y_1D) == pytest.approx(CKA_2D)  # the helper the rd test uses


# --------------------------------------------------------------------------- stub students


def identity_student(dim: int) -> Student:
    """features(x) = x, head = identity: logits are the images' own numbers."""
    student = Student("stub", "identity", nn.Identity(), dim, dim, 1, 1)
    with torch.no_grad():
        student.head.weight.copy_(torch.eye(dim))
        student.head.bias.zero_()
    return student


# --------------------------------------------------------------------------- scratch


def scratch_recipe():
    return build_recipe(OmegaConf.create({"name": "scratch"}), identity_student(3), None)


def test_scratch_is_the_mean_cross_entropy_over_labelled_rows():
    images = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    recipe = scratch_recipe()

    loss, parts = recipe.loss(Batch(images, torch.tensor([2, UNLABELLED])))
    expected = cross_entropy([1.0, 0.0, -1.0], 2)  # the unlabelled row adds nothing
    assert loss.item() == pytest.approx(expected, rel=REL)
    assert parts["ce"].item() == pytest.approx(expected, rel=REL)

    loss, _ = recipe.loss(Batch(images, torch.tensor([2, 1])))  # both labelled: their mean
    expected = (cross_entropy([1.0, 0.0, -1.0], 2) + cross_entropy([0.5, 2.0, 0.0], 1)) / 2
    assert loss.item() == pytest.approx(expected, rel=REL)


# --------------------------------------------------------------------------- kd


KD_STUDENT = [[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]]
KD_TEACHER = [[3.0, 1.0, 0.0], [-1.0, 0.0, 2.0]]  # the probe's logits (identity probe)


def kd_recipe(temperature=2.0, alpha=0.25):
    cfg = {"name": "kd", "temperature": temperature, "alpha": alpha, "probe_epochs": 1, "probe_lr": 0.01}
    recipe = build_recipe(OmegaConf.create(cfg), identity_student(3), 3)
    with torch.no_grad():  # the probe prepare() would fit, set by hand instead
        recipe.teacher_head.weight.copy_(torch.eye(3))
        recipe.teacher_head.bias.zero_()
    return recipe


def test_kd_loss_term_by_term():
    # Row 0 labelled (class 2), row 1 unlabelled; T = 2, alpha = 0.25 (not 0.5, so a swap of
    # alpha and 1 - alpha between the two terms changes the total).
    recipe = kd_recipe()
    images = torch.tensor(KD_STUDENT, requires_grad=True)
    loss, parts = recipe.loss(Batch(images, torch.tensor([2, UNLABELLED]), torch.tensor(KD_TEACHER)))

    t = 2.0
    kl = (softened_kl(KD_STUDENT[0], KD_TEACHER[0], t) + softened_kl(KD_STUDENT[1], KD_TEACHER[1], t)) / 2 * t * t
    ce = cross_entropy(KD_STUDENT[0], 2)
    assert parts["kl"].item() == pytest.approx(kl, rel=REL)
    assert parts["ce"].item() == pytest.approx(ce, rel=REL)
    assert loss.item() == pytest.approx(0.25 * kl + 0.75 * ce, rel=REL)
    assert not parts["kl"].requires_grad and not parts["ce"].requires_grad

    loss.backward()  # the unlabelled row learns from the KL term alone
    assert images.grad[1].abs().sum() > 0
    assert recipe.teacher_head.weight.grad is None  # the probe is a fixed target


def test_kd_temperature_enters_squared_and_inside_the_softmax():
    # At T = 1 the same batch gives the plain KL (factor 1); at T = 4 a different softening
    # and a factor 16.
    batch = Batch(torch.tensor(KD_STUDENT), torch.tensor([2, UNLABELLED]), torch.tensor(KD_TEACHER))
    for t in (1.0, 4.0):
        _, parts = kd_recipe(temperature=t).loss(batch)
        kl = (softened_kl(KD_STUDENT[0], KD_TEACHER[0], t) + softened_kl(KD_STUDENT[1], KD_TEACHER[1], t)) / 2
        assert parts["kl"].item() == pytest.approx(kl * t * t, rel=REL)


# --------------------------------------------------------------------------- rd


# Three rows (with two, linear CKA is 1 for any pair of features, so its term would be 0):
# rows 0, 1 labelled (classes 0, 1), row 2 unlabelled. Student features = images; teacher
# features pass through a reprogramming stub set to the identity, so f_t = the numbers below.
RD_STUDENT = [[1.0, 0.0], [0.0, 1.0], [0.5, 2.0]]
RD_TEACHER = [[1.0, 1.0], [2.0, -1.0], [0.0, 0.5]]
RD_LABELS = [0, 1, UNLABELLED]
RD_WEIGHTS = {"teacher_ce_weight": 0.5, "cka_weight": 2.0, "logit_weight": 0.25, "logit_temperature": 3.0}


def rd_recipe(**overrides):
    cfg = {"name": "rd", "reprogram_hidden": 4, **RD_WEIGHTS, "cka_detach_teacher": False,
           "reprogram_lr_scale": 1.0, "head_lr_scale": 1.0, **overrides}
    recipe = build_recipe(OmegaConf.create(cfg), identity_student(2), 2)
    recipe.reprogram = nn.Linear(2, 2)
    with torch.no_grad():
        recipe.reprogram.weight.copy_(torch.eye(2))
        recipe.reprogram.bias.zero_()
    return recipe


def rd_batch(images_grad: bool = False) -> Batch:
    images = torch.tensor(RD_STUDENT, requires_grad=images_grad)
    return Batch(images, torch.tensor(RD_LABELS), torch.tensor(RD_TEACHER))


def rd_expected_terms(t: float = RD_WEIGHTS["logit_temperature"]) -> dict[str, float]:
    labelled = [0, 1]
    return {
        "ce": sum(cross_entropy(RD_STUDENT[i], RD_LABELS[i]) for i in labelled) / 2,
        "ce_teacher": sum(cross_entropy(RD_TEACHER[i], RD_LABELS[i]) for i in labelled) / 2,
        "cka_loss": 1 - linear_cka(RD_STUDENT, RD_TEACHER),
        "kl": sum(softened_kl(RD_STUDENT[i], RD_TEACHER[i], t) for i in range(3)) / 3 * t * t,
    }


@pytest.mark.parametrize("detach", [False, True])  # the switch moves gradients, not values
def test_rd_loss_term_by_term(detach):
    expected = rd_expected_terms()
    assert 0.05 < expected["cka_loss"] < 0.95  # a non-trivial CKA pair
    loss, parts = rd_recipe(cka_detach_teacher=detach).loss(rd_batch())
    assert set(parts) == {"ce", "ce_teacher", "cka_loss", "kl"}
    for name, value in expected.items():
        assert parts[name].item() == pytest.approx(value, rel=REL), name
        assert not parts[name].requires_grad
    total = (expected["ce"] + 0.5 * expected["ce_teacher"] + 2.0 * expected["cka_loss"]
             + 0.25 * expected["kl"])
    assert loss.item() == pytest.approx(total, rel=REL)


def test_rd_without_the_logit_term_keeps_the_old_loss():
    expected = rd_expected_terms()
    loss, parts = rd_recipe(logit_weight=0.0).loss(rd_batch())
    assert set(parts) == {"ce", "ce_teacher", "cka_loss"}  # nothing computed, nothing logged
    assert loss.item() == pytest.approx(
        expected["ce"] + 0.5 * expected["ce_teacher"] + 2.0 * expected["cka_loss"], rel=REL)


def test_rd_logit_term_only_with_a_transfer_set_when_so_configured():
    """logit_when=transfer_set: prepare() sees the training labels; all present -> no term."""
    expected = rd_expected_terms()
    paper = expected["ce"] + 0.5 * expected["ce_teacher"] + 2.0 * expected["cka_loss"]
    recipe = rd_recipe(logit_when="transfer_set")
    recipe.prepare(None, torch.tensor([0, 1, 1, 0]))  # every label present
    loss, parts = recipe.loss(rd_batch())
    assert "kl" not in parts and loss.item() == pytest.approx(paper, rel=REL)
    recipe.prepare(None, torch.tensor([0, UNLABELLED, 1]))  # some withheld: a transfer set
    loss, parts = recipe.loss(rd_batch())
    assert loss.item() == pytest.approx(paper + 0.25 * expected["kl"], rel=REL)
    always = rd_recipe(logit_when="always")
    always.prepare(None, torch.tensor([0, 1, 1, 0]))
    assert always.loss(rd_batch())[1]["kl"].item() == pytest.approx(expected["kl"], rel=REL)


@pytest.mark.parametrize("transfer_set", [False, True])
def test_rd_effective_config_trains_as_the_config_does(transfer_set):
    """The benchmark pools runs by effective config: it must give the same loss as the config."""
    labels = torch.tensor([0, UNLABELLED] if transfer_set else [0, 1])
    config = {**RD_WEIGHTS, "logit_when": "transfer_set"}
    effective = type(rd_recipe()).effective_config(config, transfer_set)
    assert "logit_when" not in effective and effective["logit_weight"] == (0.25 if transfer_set else 0.0)
    losses = []
    for cfg in (config, effective):
        recipe = rd_recipe(**cfg)
        recipe.prepare(None, labels)
        losses.append(recipe.loss(rd_batch())[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=REL)


def test_rd_logit_decision_survives_a_checkpoint():
    """Resume does not call prepare() again: the decision travels in the recipe's state."""
    trained = rd_recipe(logit_when="transfer_set")
    trained.prepare(None, torch.tensor([0, 1]))
    resumed = rd_recipe(logit_when="transfer_set")
    resumed.prepare(None, torch.tensor([0, UNLABELLED]))
    resumed.load_state_dict(trained.state_dict())
    assert "kl" not in resumed.loss(rd_batch())[1]


def test_rd_logit_temperature():
    for t in (1.0, 5.0):
        _, parts = rd_recipe(logit_temperature=t).loss(rd_batch())
        assert parts["kl"].item() == pytest.approx(rd_expected_terms(t)["kl"], rel=REL)


def _reprogram_grad(recipe, batch) -> torch.Tensor:
    loss, _ = recipe.loss(batch)
    loss.backward()
    grad = recipe.reprogram.weight.grad
    return torch.zeros(2, 2) if grad is None else grad


def test_rd_cka_reaches_the_reprogramming_module_only_without_the_detach():
    only_cka = {"teacher_ce_weight": 0.0, "logit_weight": 0.0}
    assert _reprogram_grad(rd_recipe(**only_cka), rd_batch()).abs().max() > 1e-4  # the old behaviour
    detached = rd_recipe(**only_cka, cka_detach_teacher=True)
    batch = rd_batch(images_grad=True)
    assert torch.equal(_reprogram_grad(detached, batch), torch.zeros(2, 2))
    assert batch.images.grad.abs().max() > 1e-4  # it still teaches the student


def test_rd_logit_term_teaches_the_student_only_and_covers_unlabelled_rows():
    recipe = rd_recipe(teacher_ce_weight=0.0, cka_weight=0.0, cka_detach_teacher=True, logit_weight=1.0)
    batch = rd_batch(images_grad=True)
    assert torch.equal(_reprogram_grad(recipe, batch), torch.zeros(2, 2))  # teacher side detached
    assert recipe.student.head.weight.grad.abs().max() > 1e-4  # the head, through the student branch
    assert batch.images.grad[2].abs().max() > 1e-4  # the unlabelled row

    no_logit = rd_recipe(cka_weight=0.0, logit_weight=0.0)  # CE terms alone: nothing from row 2
    batch = rd_batch(images_grad=True)
    no_logit.loss(batch)[0].backward()
    assert torch.equal(batch.images.grad[2], torch.zeros(2))


def test_rd_reprogramming_gradient_is_the_teacher_cross_entropy_by_hand():
    # With the CKA teacher side detached, R learns from the co-training CE alone:
    # d/dW [w * mean_i CE(head(W t_i), y_i)] = w / 2 * sum_i (softmax(t_i) - onehot(y_i)) t_i^T
    # for the identity head and W = I (rows 0 and 1 are the labelled ones).
    grad = _reprogram_grad(rd_recipe(cka_detach_teacher=True), rd_batch())
    expected = [[0.0, 0.0], [0.0, 0.0]]
    for i in (0, 1):
        p = [math.exp(v) for v in log_softmax(RD_TEACHER[i])]
        p[RD_LABELS[i]] -= 1
        for j in range(2):
            for k in range(2):
                expected[j][k] += RD_WEIGHTS["teacher_ce_weight"] / 2 * p[j] * RD_TEACHER[i][k]
    assert grad.tolist() == [pytest.approx(row, rel=REL, abs=1e-7) for row in expected]


def test_rd_without_the_shared_head_the_teacher_branch_uses_its_own():
    recipe = rd_recipe(shared_head=False)
    with torch.no_grad():  # teacher head: swaps the two logits, so its CE is the swapped one
        recipe.teacher_head.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        recipe.teacher_head.bias.zero_()
    _, parts = recipe.loss(rd_batch())
    swapped = [row[::-1] for row in RD_TEACHER]
    expected_ce_teacher = sum(cross_entropy(swapped[i], RD_LABELS[i]) for i in (0, 1)) / 2
    assert parts["ce_teacher"].item() == pytest.approx(expected_ce_teacher, rel=REL)
    assert parts["ce"].item() == pytest.approx(rd_expected_terms()["ce"], rel=REL)  # the student's head
    # The teacher branch's CE trains its own head, which is in an optimizer group.
    only_teacher_ce = rd_recipe(shared_head=False, cka_weight=0.0, logit_weight=0.0)
    batch = Batch(torch.tensor(RD_STUDENT), torch.tensor(RD_LABELS), torch.tensor(RD_TEACHER))
    only_teacher_ce.loss(batch)[0].backward()
    assert only_teacher_ce.teacher_head.weight.grad.abs().max() > 1e-4
    groups = only_teacher_ce.parameter_groups(1.0)
    assert sum(len(g["params"]) for g in groups) == len([q for q in only_teacher_ce.parameters() if q.requires_grad])


def test_rd_unlabelled_only_batch_has_no_cross_entropy():
    batch = Batch(torch.tensor(RD_STUDENT), torch.full((3,), UNLABELLED), torch.tensor(RD_TEACHER))
    expected = rd_expected_terms()
    loss, parts = rd_recipe().loss(batch)
    assert parts["ce"].item() == 0.0 and parts["ce_teacher"].item() == 0.0
    assert loss.item() == pytest.approx(2.0 * expected["cka_loss"] + 0.25 * expected["kl"], rel=REL)


# --------------------------------------------------------------------------- lorkd


LORKD_TASKS = [TaskInfo("a", ("a0", "a1"), 0), TaskInfo("b", ("b0", "b1", "b2"), 2)]
LORKD_STUDENT = [[1.0, -1.0, 0.0, 2.0, 1.0], [0.5, 0.0, 1.0, -1.0, 0.0]]  # N x (2 + 3) global classes
LORKD_TEACHER = [[2.0, 0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 3.0, -2.0]]  # the probes' logits, side by side


def lorkd_recipe(monkeypatch, kd_weight=0.5, temperature=2.0):
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    cfg = {"name": "lorkd", "rank": 1, "lora_alpha": 1, "expert_layers": "all", "kd_weight": kd_weight,
           "temperature": temperature, "probe_epochs": 1, "probe_lr": 0.01}
    recipe = build_recipe(OmegaConf.create(cfg), Student("stub", "mlp", backbone, 3, 5, 1, 2), 5, LORKD_TASKS)
    student_logits = torch.tensor(LORKD_STUDENT)
    monkeypatch.setattr(recipe.student, "task_logits", lambda images, ids: student_logits)
    with torch.no_grad():  # probe t reads task t's columns of the teacher features
        for head, columns in zip(recipe.teacher_heads, (slice(0, 2), slice(2, 5))):
            head.weight.copy_(torch.eye(5)[columns])
            head.bias.zero_()
    return recipe


def test_lorkd_loss_term_by_term(monkeypatch):
    # Row 0: task a, global label 1 (task-local 1). Row 1: task b, unlabelled.
    # CE_a = CE of row 0's task-a logits; CE_b = 0 (no labelled task-b row);
    # KL_t = T^2 * mean over task-t rows of KL(probe_t || head_t) on task t's own columns.
    recipe = lorkd_recipe(monkeypatch)
    batch = Batch(torch.zeros(2, 1, 2, 2), torch.tensor([1, UNLABELLED]), torch.tensor(LORKD_TEACHER),
                  torch.tensor([0, 1]))
    t = 2.0
    ce = cross_entropy(LORKD_STUDENT[0][0:2], 1)
    kl_a = softened_kl(LORKD_STUDENT[0][0:2], LORKD_TEACHER[0][0:2], t) * t * t
    kl_b = softened_kl(LORKD_STUDENT[1][2:5], LORKD_TEACHER[1][2:5], t) * t * t
    loss, parts = recipe.loss(batch)
    assert parts["ce"].item() == pytest.approx(ce, rel=REL)
    assert parts["kl"].item() == pytest.approx(kl_a + kl_b, rel=REL)
    assert loss.item() == pytest.approx(ce + 0.5 * (kl_a + kl_b), rel=REL)


def test_lorkd_terms_are_per_task_means(monkeypatch):
    # Both rows task a (row 1 unlabelled): KL_a is their mean, task b is absent (adds 0).
    recipe = lorkd_recipe(monkeypatch, kd_weight=2.0, temperature=1.0)
    batch = Batch(torch.zeros(2, 1, 2, 2), torch.tensor([0, UNLABELLED]), torch.tensor(LORKD_TEACHER),
                  torch.tensor([0, 0]))
    ce = cross_entropy(LORKD_STUDENT[0][0:2], 0)
    kl = sum(softened_kl(LORKD_STUDENT[i][0:2], LORKD_TEACHER[i][0:2], 1.0) for i in (0, 1)) / 2
    loss, parts = recipe.loss(batch)
    assert parts["ce"].item() == pytest.approx(ce, rel=REL)
    assert parts["kl"].item() == pytest.approx(kl, rel=REL)
    assert loss.item() == pytest.approx(ce + 2.0 * kl, rel=REL)
