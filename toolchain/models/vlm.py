"""CLIP-style vision-language models, split the way prompt tuning needs them.

    vlm = build_vlm(cfg.teacher)                 # teacher=lit-vlm (embedded) | teacher=open_clip
    tokens = vlm.image_encoder(images)           # frozen: N x (1 + P) * Dv flat, the global token first
    features = vlm.image_features(tokens)        # N x (1 + P) x D normalised: global and patch features
    ids, mask = vlm.tokenize(["a photo of a thalamus."])
    text = vlm.encode_text_embeddings(vlm.token_embedding(ids), ids, mask)   # T x D

Prompt learning (recipes/ogkd.py) replaces some rows of token_embedding(ids) by learnt
context vectors, so the text encoder must accept input embeddings, not only token ids. The
image encoder is frozen, so its tokens are cached (features.py); the projection is a linear
map applied to every token (the global token and the patches share it, as BiomedCLIP's head
does in the OGKD code), so folding (FoldedPromptClassifier) needs only the global token.

Two implementations, each in its own module, registered by name:
    lit-vlm    the embedded default (lit_vlm.py): LiteMedSAM image encoder + MiniLM text
               encoder, both frozen, with projections trained contrastively on base classes
               (a demonstration VLM, not a pretrained biomedical CLIP)
    open_clip  any open_clip model from a local file or local-dir: folder (open_clip_vlm.py)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import _register
from .teachers import _cfg_dict

_VLMS: dict[str, Callable[[dict], "VisionLanguageModel"]] = {}


def register_vlm(name: str):
    """Decorator: register `fn(cfg: dict) -> VisionLanguageModel` under `name`."""
    return _register(_VLMS, "vision-language model", name)


class VisionLanguageModel(nn.Module):
    """What the vision-language recipes use; subclasses fill in the encoders."""

    name: str = "vlm"
    # True when image_projection, text_projection and logit_scale start untrained (lit-vlm):
    # the recipe then aligns them on base-class image-text pairs before prompt tuning.
    needs_alignment: bool = False

    def __init__(self, image_encoder: nn.Module, image_projection: nn.Module, logit_scale: float):
        super().__init__()
        self.image_encoder = image_encoder  # frozen, with .fingerprint for the token cache
        self.image_projection = image_projection
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))  # log of the scale, as CLIP

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids T x L, attention mask T x L), padded to the longest text."""
        raise NotImplementedError

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's input embeddings of token ids: T x L x Dt."""
        raise NotImplementedError

    def encode_text_embeddings(self, embeddings: torch.Tensor, ids: torch.Tensor,
                               mask: torch.Tensor) -> torch.Tensor:
        """Text features (T x D, not normalised) from input embeddings; ids and mask say where
        the sequence ends (pooling), as they were tokenized."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(texts)
        return self.encode_text_embeddings(self.token_embedding(ids), ids, mask)

    def image_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised projected features N x (1 + P) x D of (cached, flat) encoder tokens."""
        tokens = tokens.reshape(len(tokens), -1, self.image_encoder.width)
        return F.normalize(self.image_projection(tokens), dim=-1)

    def freeze(self) -> "VisionLanguageModel":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()


class FoldedPromptClassifier(nn.Module):
    """Images -> class logits with the prompts folded in: the tuned text features, normalised
    and scaled, are the weight of a linear layer after the image encoder. No text encoder is
    left in the deployed model."""

    def __init__(self, image_encoder: nn.Module, image_projection: nn.Module, text_features: torch.Tensor,
                 logit_scale: float):
        super().__init__()
        self.image_encoder = image_encoder
        self.image_projection = image_projection
        self.width = image_encoder.width
        self.classifier = nn.Linear(text_features.shape[1], text_features.shape[0], bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(math.exp(logit_scale) * F.normalize(text_features, dim=-1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        global_token = self.image_encoder(images)[:, : self.width]  # the first token of the flat row
        return self.classifier(F.normalize(self.image_projection(global_token), dim=-1))


def available_vlms() -> list[str]:
    from . import lit_vlm, open_clip_vlm  # noqa: F401 (register the builders)

    return sorted(_VLMS)


def build_vlm(cfg) -> VisionLanguageModel:
    """The VLM `teacher` names (lit-vlm, open_clip); one-line ConfigError otherwise."""
    available_vlms()
    values = _cfg_dict(cfg)
    name = values.get("name")
    if name not in _VLMS:
        raise ConfigError(f"recipe=ogkd needs a vision-language teacher: teacher=lit-vlm (embedded) or "
                          f"teacher=open_clip (local weights), not teacher={name}")
    return _VLMS[name](values)
