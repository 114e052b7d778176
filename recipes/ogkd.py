"""OGKD: geometry-aware distillation for prompt tuning a frozen vision-language model.

Paper: ../shared/seeds/ogkd-geometry-aware-distillation-vlm.txt; official code
tientrandinh/OGKD (trainers/method/{trainer,losses,geometry}.py), read for every term below.
Only the prompt context vectors train (CoOp); the image and text encoders stay frozen, and the
frozen model's zero-shot predictions are the teacher. With s = exp(logit_scale), image feature
f (normalised global token), patch features f_j, tuned class text features t_c and the frozen
prompt-ensemble prototypes e_c (all normalised):

    logits      z_c  = s f.t_c          patch logits z_jc = s f_j.t_c
    teacher     q_c  = s f.e'_c         e' = the template ensemble after outlier filtering:
                score_k = mean over the batch of max_c s f.e_c^(k) per template k;
                z_k = (score_k - median) / MAD; keep |(z_k - mean z) / std z| <= tau
    class graph W = softmax_row(alpha cos(P, P)) over the prototypes P of every class; with the
                novel classes in the graph (the official code's default), the base block is
                W_eff = W_bb + lambda_novel W_bn W_nb (rows no longer sum to 1, as there)
    CE          cross_entropy(z, y)
    SCCM        lambda_sccm * MSE(t, mean_k e^(k))          (prototype consistency)
    GAD         lambda_gad * KL(q~ || p) summed / (B C), where log q~ = (1 - gamma) log q +
                gamma (log q) W_eff: the teacher's LOG-probabilities diffused along the graph
                (not renormalised, as in the official code), p = softmax(z)
    LGD         lambda_lgd * the same KL restricted to the ground-truth channel, over the
                k = round(N * top_k_ratio) patches with the largest |teacher patch logit of the
                true class|, summed / (B k)

    loss = CE + SCCM + GAD + LGD                      (recipe.loss=ogkd)
    baselines: coop = CE only; kd = CE + lambda_gad * KL(softmax q || p) (gamma = 0: no graph)

Deployment (recipe.deploy=student, not in the paper's code): GeometryStudent distils the folded
prompt-tuned model into a small image classifier with the same graph-diffused targets; see its
docstring for the loss and why it is scaled as KD is.

Departures from the official code, and why:
  - If the template scores have zero MAD or zero spread (identical scores: e.g. one template),
    every template is kept; the official code divides by zero there.
  - The image features are cached (the encoders are frozen), so a batch carries features, not
    images; the maths is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Recipe, labelled_cross_entropy

LOSSES = ("ogkd", "coop", "kd")


# ---------------------------------------------------------------------------------------
# The terms, each a plain function (tests pin them against hand-computed values)


def class_graph(prototypes: torch.Tensor, alpha: float) -> torch.Tensor:
    """W = softmax_row(alpha * cos(P_i, P_j)): C x C, rows sum to 1."""
    p = F.normalize(prototypes.float(), dim=-1)
    return torch.softmax(alpha * p @ p.t(), dim=-1)


def effective_base_graph(graph: torch.Tensor, base: torch.Tensor, lambda_novel: float) -> torch.Tensor:
    """W_bb + lambda_novel * W_bn @ W_nb: the novel classes' structure folded into the base block."""
    novel = torch.tensor([i for i in range(len(graph)) if i not in set(base.tolist())], dtype=torch.long)
    w_bb = graph[base][:, base]
    if len(novel) == 0:
        return w_bb
    return w_bb + lambda_novel * graph[base][:, novel] @ graph[novel][:, base]


def smoothed_log_targets(teacher_logits: torch.Tensor, graph: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 - gamma) log q + gamma (log q) W, q = softmax(teacher logits) over the last axis."""
    log_q = F.log_softmax(teacher_logits.detach(), dim=-1)
    return (1.0 - gamma) * log_q + gamma * log_q @ graph


def gad_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, graph: torch.Tensor,
             gamma: float) -> torch.Tensor:
    """Global geometry-aware distillation: sum of KL(q~ || p) over the batch / (B * C)."""
    log_p = F.log_softmax(student_logits, dim=-1)
    target = smoothed_log_targets(teacher_logits, graph, gamma)
    return F.kl_div(log_p, target, reduction="sum", log_target=True) / log_p.numel()


def top_k_patches(patch_teacher_logits: torch.Tensor, labels: torch.Tensor, ratio: float) -> torch.Tensor:
    """B x k indices of the patches whose teacher logit for the true class is largest in magnitude."""
    b, n, _ = patch_teacher_logits.shape
    k = max(1, int(round(n * ratio)))
    true_class = patch_teacher_logits.gather(-1, labels.view(b, 1, 1).expand(b, n, 1)).squeeze(-1)
    return true_class.abs().topk(k, dim=1).indices


def lgd_loss(patch_student_logits: torch.Tensor, patch_teacher_logits: torch.Tensor, graph: torch.Tensor,
             labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """Label-guided geometry distillation over given patches (B x k x C): the KL's pointwise term
    at the true class only, summed / (B * k)."""
    b, k, _ = patch_student_logits.shape
    index = labels.view(b, 1, 1).expand(b, k, 1)
    log_p = F.log_softmax(patch_student_logits, dim=-1).gather(-1, index).squeeze(-1)
    target = smoothed_log_targets(patch_teacher_logits, graph, gamma).gather(-1, index).squeeze(-1)
    return F.kl_div(log_p, target, reduction="sum", log_target=True) / log_p.numel()


def sccm_loss(text_features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Prototype consistency: mean squared error between tuned and frozen class text features."""
    return F.mse_loss(text_features, prototypes)


def select_templates(image_features: torch.Tensor, template_features: torch.Tensor, scale: torch.Tensor,
                     tau: float) -> torch.Tensor:
    """Teacher class features from the template ensemble without outlier templates.

    image_features B x D and template_features C x K x D normalised. Returns C x D normalised:
    the mean over the kept templates (see the module docstring for the rule)."""
    scores = torch.stack([(scale * image_features @ template_features[:, k].t()).max(dim=1).values.mean()
                          for k in range(template_features.shape[1])])
    median = scores.median()
    mad = (scores - median).abs().median()
    z = (scores - median) / mad
    if mad == 0 or not torch.isfinite(z.std()) or z.std() == 0:
        keep = torch.ones_like(scores, dtype=torch.bool)
    else:
        keep = ((z - z.mean()) / z.std()).abs() <= tau
    return F.normalize(template_features[:, keep].mean(dim=1), dim=-1)


# ---------------------------------------------------------------------------------------
# Prompt learner and the training module


class PromptLearner(nn.Module):
    """CoOp context: n_ctx learnt vectors in the text encoder's input-embedding space, shared by
    every class or one set per class, in place of the placeholder tokens of "X X X X {name}."."""

    def __init__(self, vlm, class_names: list[str], n_ctx: int, class_specific: bool, init_std: float = 0.02):
        super().__init__()
        prompts = [" ".join(["X"] * n_ctx) + f" {name}." for name in class_names]
        ids, mask = vlm.tokenize(prompts)
        with torch.no_grad():
            embeddings = vlm.token_embedding(ids)
        shape = (len(class_names), n_ctx, embeddings.shape[-1]) if class_specific else (n_ctx, embeddings.shape[-1])
        self.ctx = nn.Parameter(torch.randn(shape) * init_std)
        # Token 0 is the start token ([CLS] / <start_of_text>); the context fills 1 .. n_ctx.
        self.register_buffer("prefix", embeddings[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embeddings[:, 1 + n_ctx:].clone(), persistent=False)
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self) -> torch.Tensor:
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(len(self.prefix), -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)

    def for_classes(self, vlm, class_names: list[str]) -> "PromptLearner":
        """The same (shared) context in front of other class names: novel-class evaluation, folding."""
        if self.ctx.dim() == 3:
            raise ValueError("class-specific context cannot serve classes it was not trained for")
        other = PromptLearner(vlm, class_names, self.ctx.shape[0], class_specific=False)
        other.ctx = self.ctx
        return other


@dataclass(frozen=True)
class OGKDWeights:
    loss: str
    lambda_sccm: float
    lambda_gad: float
    lambda_lgd: float
    gamma: float
    top_k_ratio: float
    tau: float


class _Frozen:
    """Holds a module outside the recipe's module tree: the frozen VLM is neither checkpointed
    with the prompts nor handed to the optimizer."""

    def __init__(self, module: nn.Module):
        self.module = module


class PromptTuning(Recipe):
    """recipe=ogkd's training stage on cached normalised image features (Batch.teacher_features:
    B x (1 + P) x D, the global feature first). The Recipe's `student` is the prompt learner."""

    name = "ogkd"
    needs_teacher = True

    def __init__(self, vlm, learner: PromptLearner, template_features: torch.Tensor, graph: torch.Tensor,
                 weights: OGKDWeights):
        super().__init__(learner)
        self._vlm = _Frozen(vlm)
        self.weights = weights
        self.register_buffer("templates", F.normalize(template_features, dim=-1), persistent=False)  # C x K x D
        self.register_buffer("prototypes", F.normalize(self.templates.mean(dim=1), dim=-1), persistent=False)
        self.register_buffer("graph", graph, persistent=False)

    def text_features(self) -> torch.Tensor:
        vlm, learner = self._vlm.module, self.student
        return F.normalize(vlm.encode_text_embeddings(learner(), learner.ids, learner.mask), dim=-1)

    def loss(self, batch: Batch):
        w, vlm = self.weights, self._vlm.module
        scale = vlm.logit_scale.exp().detach()
        image, patches = batch.teacher_features[:, 0], batch.teacher_features[:, 1:]
        text = self.text_features()
        logits = scale * image @ text.t()
        parts = {"ce": F.cross_entropy(logits, batch.labels)}
        if w.loss != "coop":
            with torch.no_grad():
                teacher_text = select_templates(image, self.templates, scale, w.tau)
                teacher_logits = scale * image @ teacher_text.t()
            if w.loss == "kd":
                eye = torch.eye(len(text), device=logits.device)
                parts["kd"] = w.lambda_gad * gad_loss(logits, teacher_logits, eye, 0.0)
            else:
                parts["sccm"] = w.lambda_sccm * sccm_loss(text, self.prototypes)
                parts["gad"] = w.lambda_gad * gad_loss(logits, teacher_logits, self.graph, w.gamma)
                with torch.no_grad():
                    patch_teacher = scale * patches @ teacher_text.t()
                    chosen = top_k_patches(patch_teacher, batch.labels, w.top_k_ratio)
                picked = patches.gather(1, chosen[..., None].expand(-1, -1, patches.shape[-1]))
                parts["lgd"] = w.lambda_lgd * lgd_loss(scale * picked @ text.t(),
                                                       patch_teacher.gather(1, chosen[..., None].expand(
                                                           -1, -1, len(text))),
                                                       self.graph, batch.labels, w.gamma)
        total = sum(parts.values())
        return total, {k: v.detach() for k, v in parts.items()}


class Alignment(Recipe):
    """The embedded VLM's first stage (teacher=lit-vlm): its image and text projections and logit
    scale, trained so that base-class images match their class descriptions. Cross-entropy over
    the base classes of s * f_image . t_class, where t_class is the normalised mean of the
    class's projected, normalised description features (the zero-shot ensemble's own rule).
    Batch.teacher_features: cached flat encoder tokens (only the global one, first, is used)."""

    name = "vlm-align"
    needs_teacher = True

    def __init__(self, vlm, description_hidden: torch.Tensor):
        super().__init__(nn.ModuleDict({"image_projection": vlm.image_projection,
                                        "text_projection": vlm.text_projection}))
        self.logit_scale = vlm.logit_scale
        self.register_buffer("descriptions", description_hidden, persistent=False)  # C x K x Dt, frozen encoder

    def class_text(self) -> torch.Tensor:
        projected = F.normalize(self.student["text_projection"](self.descriptions), dim=-1)
        return F.normalize(projected.mean(dim=1), dim=-1)

    def loss(self, batch: Batch):
        width = self.student["image_projection"].in_features
        image = F.normalize(self.student["image_projection"](batch.teacher_features[:, :width]), dim=-1)
        scale = self.logit_scale.clamp(max=4.6052).exp()  # at most 100, as CLIP caps it
        ce = F.cross_entropy(scale * image @ self.class_text().t(), batch.labels)
        return ce, {"ce": ce.detach()}


class GeometryStudent(Recipe):
    """Distils the folded prompt-tuned VLM (its logits over every class, Batch.teacher_features
    B x C) into a small image classifier, for devices that cannot run the VLM's encoder:

        loss = (1 - w) CE(z, y) + w T^2 KL(q~ || softmax(z / T)) summed over classes / B
        log q~ = (1 - gamma) log q_T + gamma (log q_T) W,   q_T = softmax(teacher logits / T)

    GAD's geometry (the teacher's log-probabilities diffused along the class graph W over every
    class, not renormalised) with KD's temperature and batch-mean scaling. Departure from
    prompt-tuning GAD, and why: its sum / (B C) would make the term C times weaker beside the
    cross-entropy of a student that starts from random weights, and the folded teacher's logits
    (cosines times a scale near 100) need softening. Unlabelled rows (UNLABELLED) carry the KL
    term only, so the base classes' training images beyond the few shots serve as a transfer set.
    As in GAD, q~ is not renormalised, so the KL term (and the logged loss) can be negative; its
    minimiser is still the student distribution proportional to exp(log q~)."""

    name = "ogkd-student"
    needs_teacher = True
    uses_unlabelled = True

    def __init__(self, student: nn.Module, graph: torch.Tensor, gamma: float, kd_weight: float, temperature: float):
        super().__init__(student)
        self.gamma, self.kd_weight, self.temperature = float(gamma), float(kd_weight), float(temperature)
        self.register_buffer("graph", graph.float(), persistent=False)

    def loss(self, batch: Batch):
        t = self.temperature
        logits = self.student(batch.images)
        target = smoothed_log_targets(batch.teacher_features / t, self.graph, self.gamma)
        gad = F.kl_div(F.log_softmax(logits / t, dim=-1), target, reduction="batchmean", log_target=True) * t * t
        ce = labelled_cross_entropy(logits, batch.labels)
        total = (1.0 - self.kd_weight) * ce + self.kd_weight * gad
        return total, {"ce": ce.detach(), "gad": gad.detach()}
