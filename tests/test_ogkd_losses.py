"""OGKD's terms (recipes/ogkd.py) against values computed by hand on tiny inputs, term by term.

Each expected value is written out from the definition (module docstring of recipes/ogkd.py,
official code tientrandinh/OGKD), so dropping one factor (gamma, the graph product, the
normalisation, the true-class gather) changes the number and fails the test.
"""

from __future__ import annotations

import math

import pytest
import torch

from torch import nn

from medkd.recipes.base import UNLABELLED, Batch
from medkd.recipes.ogkd import (GeometryStudent, OGKDWeights, PromptTuning, class_graph, effective_base_graph, gad_loss, lgd_loss,
                                sccm_loss, select_templates, top_k_patches)


def test_class_graph_is_a_row_softmax_of_alpha_times_cosine():
    prototypes = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])  # not unit length: cosine normalises
    graph = class_graph(prototypes, alpha=2.0)
    c = 1 / math.sqrt(2)  # cos between an axis and the diagonal
    row0 = torch.tensor([math.exp(2 * 1), math.exp(2 * 0), math.exp(2 * c)])
    row2 = torch.tensor([math.exp(2 * c), math.exp(2 * c), math.exp(2 * 1)])
    assert torch.allclose(graph[0], row0 / row0.sum(), atol=1e-6)
    assert torch.allclose(graph[2], row2 / row2.sum(), atol=1e-6)


def test_effective_graph_adds_the_novel_detour_to_the_base_block():
    w = torch.tensor([[0.5, 0.3, 0.2],
                      [0.1, 0.6, 0.3],
                      [0.2, 0.2, 0.6]])
    base = torch.tensor([0, 2])  # class 1 is novel
    got = effective_base_graph(w, base, lambda_novel=0.1)
    # W_bb + 0.1 * W_bn W_nb with W_bn = [[0.3], [0.2]], W_nb = [[0.1, 0.3]]
    expected = torch.tensor([[0.5 + 0.1 * 0.3 * 0.1, 0.2 + 0.1 * 0.3 * 0.3],
                             [0.2 + 0.1 * 0.2 * 0.1, 0.6 + 0.1 * 0.2 * 0.3]])
    assert torch.allclose(got, expected, atol=1e-7)
    assert torch.equal(effective_base_graph(w, torch.arange(3), 0.1), w)  # no novel class: W itself


def kl_by_hand(log_target: list[float], log_student: list[float]) -> float:
    """sum_c exp(t_c) (t_c - s_c): kl_div with log targets, written out."""
    return sum(math.exp(t) * (t - s) for t, s in zip(log_target, log_student))


def test_gad_diffuses_teacher_log_probabilities_along_the_graph():
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # q = (1/4, 3/4)
    student = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    graph = torch.tensor([[0.9, 0.1], [0.4, 0.6]])  # not symmetric: (log q) W != W (log q)
    gamma = 0.25
    lq = [math.log(0.25), math.log(0.75)]
    diffused = [lq[0] * 0.9 + lq[1] * 0.4, lq[0] * 0.1 + lq[1] * 0.6]  # row vector log q times W
    target = [(1 - gamma) * lq[c] + gamma * diffused[c] for c in range(2)]
    expected = kl_by_hand(target, [math.log(0.5)] * 2) / 2  # / (B * C)
    assert gad_loss(student, teacher, graph, gamma).item() == pytest.approx(expected, rel=1e-5)
    # gamma = 0 is plain KL(q || p) / (B * C)
    assert gad_loss(student, teacher, graph, 0.0).item() == pytest.approx(kl_by_hand(lq, [math.log(0.5)] * 2) / 2,
                                                                          rel=1e-5)


def test_gad_gradient_reaches_the_student_only():
    student = torch.zeros(1, 2, requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0]], requires_grad=True)
    gad_loss(student, teacher, torch.eye(2), 0.5).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_top_k_patches_rank_by_magnitude_of_the_true_class_logit():
    patches = torch.tensor([[[5.0, -0.1], [0.0, 0.2], [1.0, -3.0], [0.0, 1.0]]])  # 4 patches, 2 classes
    chosen = top_k_patches(patches, torch.tensor([1]), ratio=0.5)  # k = round(4 * 0.5) = 2
    assert sorted(chosen[0].tolist()) == [2, 3]  # |-3| and |1|, not patch 0's large class-0 logit


def test_lgd_keeps_only_the_true_class_term_and_averages_over_patches():
    student = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])  # B=1, k=2 patches, C=2
    teacher = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    graph = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    gamma, label = 0.5, 1
    total = 0.0
    for s_row, t_row in zip(student[0].tolist(), teacher[0].tolist()):
        lq = [t - math.log(sum(math.exp(v) for v in t_row)) for t in t_row]
        ls = [s - math.log(sum(math.exp(v) for v in s_row)) for s in s_row]
        smoothed_true = (1 - gamma) * lq[label] + gamma * (lq[0] * graph[0, label].item() + lq[1] * graph[1, label].item())
        total += math.exp(smoothed_true) * (smoothed_true - ls[label])  # the true class's pointwise term only
    expected = total / 2  # / (B * k)
    got = lgd_loss(student, teacher, graph, torch.tensor([label]), gamma)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_sccm_is_the_mean_squared_distance_to_the_prototypes():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    prototypes = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert sccm_loss(text, prototypes).item() == pytest.approx((1 + 0 + 0 + 4) / 4)


def test_template_selection_drops_the_outlier_template():
    image = torch.tensor([[1.0, 0.0]])
    # 2 classes x 5 templates; template 4 points away from the image for both classes.
    good = [[1.0, 0.0], [0.99, 0.141], [0.98, 0.199], [0.97, 0.243]]
    templates = torch.tensor([good + [[-1.0, 0.0]], [[0.0, 1.0]] * 4 + [[-0.6, 0.8]]])
    templates = torch.nn.functional.normalize(templates, dim=-1)
    # scores_k = max_c (s f.e_c^k): 1, .99, .98, .97, -.6 -> median .98, MAD .01 -> z = 2, 1, 0, -1, -158;
    # standardised (mean -31.2, sd 70.9): .47, .45, .44, .43, -1.79: tau = 1.25 drops template 4 alone.
    selected = select_templates(image, templates, torch.tensor(1.0), tau=1.25)
    expected = torch.nn.functional.normalize(templates[:, :4].mean(dim=1), dim=-1)
    assert torch.allclose(selected, expected, atol=1e-6)
    every = torch.nn.functional.normalize(templates.mean(dim=1), dim=-1)
    assert torch.allclose(select_templates(image, templates, torch.tensor(1.0), tau=100.0), every, atol=1e-6)


def test_template_selection_keeps_everything_when_scores_do_not_spread():
    templates = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), dim=-1)  # one template
    selected = select_templates(torch.tensor([[1.0, 0.0]]), templates, torch.tensor(1.0), tau=1.25)
    assert torch.allclose(selected, templates[:, 0])


class LinearTextVLM(torch.nn.Module):
    """A stand-in VLM whose text feature is the mean of its input embeddings: enough to check
    which terms a PromptTuning objective adds and where gradients go."""

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(0.0), requires_grad=False)

    def encode_text_embeddings(self, embeddings, ids, mask):
        return embeddings.mean(dim=1)


class FixedLearner(torch.nn.Module):
    def __init__(self, classes: int, dim: int):
        super().__init__()
        self.ctx = torch.nn.Parameter(torch.randn(classes, 2, dim))
        self.ids = torch.zeros(classes, 2, dtype=torch.long)
        self.mask = torch.ones(classes, 2, dtype=torch.long)

    def forward(self):
        return self.ctx


@pytest.mark.parametrize("objective, terms", [("coop", {"ce"}), ("kd", {"ce", "kd"}),
                                              ("ogkd", {"ce", "sccm", "gad", "lgd"})])
def test_each_objective_adds_its_terms_and_trains_the_context_only(objective, terms):
    torch.manual_seed(0)
    vlm = LinearTextVLM()
    learner = FixedLearner(classes=3, dim=4)
    weights = OGKDWeights(objective, lambda_sccm=0.5, lambda_gad=0.5, lambda_lgd=0.1, gamma=0.8,
                          top_k_ratio=0.5, tau=1.25)
    recipe = PromptTuning(vlm, learner, torch.randn(3, 5, 4), torch.eye(3), weights)
    features = torch.nn.functional.normalize(torch.randn(6, 1 + 4, 4), dim=-1)
    total, parts = recipe.loss(Batch(torch.zeros(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2]), features))
    assert set(parts) == terms
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)
    total.backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert [name for name, _ in recipe.named_parameters()] == ["student.ctx"]  # nothing of the VLM


def test_student_distillation_is_ce_on_labelled_rows_plus_tempered_graph_kl():
    """GeometryStudent on 2 images (the student is the identity on 2 "pixels" = its logits):
    row 0 labelled 1, row 1 unlabelled; T = 2, gamma = 0.25, w = 0.7."""
    t, gamma, w = 2.0, 0.25, 0.7
    graph = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    student_logits = torch.tensor([[0.0, 2 * math.log(2.0)], [0.0, 0.0]])  # / T: p = (1/3, 2/3), (1/2, 1/2)
    teacher_logits = torch.tensor([[0.0, 2 * math.log(3.0)], [0.0, 0.0]])  # / T: q = (1/4, 3/4), (1/2, 1/2)
    recipe = GeometryStudent(nn.Flatten(), graph, gamma, w, t)
    batch = Batch(student_logits, torch.tensor([1, UNLABELLED]), teacher_logits)
    total, parts = recipe.loss(batch)

    def smoothed(q):
        lq = [math.log(v) for v in q]
        diffused = [lq[0] * 0.9 + lq[1] * 0.4, lq[0] * 0.1 + lq[1] * 0.6]
        return [(1 - gamma) * lq[c] + gamma * diffused[c] for c in range(2)]

    kl_rows = [kl_by_hand(smoothed([0.25, 0.75]), [math.log(1 / 3), math.log(2 / 3)]),
               kl_by_hand(smoothed([0.5, 0.5]), [math.log(0.5)] * 2)]
    gad = t * t * sum(kl_rows) / 2  # batch mean, both rows
    ce = -math.log(0.8)  # row 0 only, at T = 1: softmax(0, 2 ln 2) = (1/5, 4/5)
    assert parts["gad"].item() == pytest.approx(gad, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert total.item() == pytest.approx((1 - w) * ce + w * gad, rel=1e-5)
