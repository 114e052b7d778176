"""teacher=open_clip: any open_clip CLIP from local weights (BiomedCLIP-style checkpoints, MobileCLIP, ...).

    teacher=open_clip teacher.model=ViT-B-16 teacher.weights=/models/clip.safetensors
    teacher=open_clip teacher.model=local-dir:/models/my-clip     # open_clip_config.json + weights

Nothing is downloaded: a model name alone (no weights) is refused, a `local-dir:` folder must
hold open_clip_config.json and its weights, and the tokenizer must be open_clip's built-in
BPE tokenizer (shipped in the wheel). Supported towers: open_clip's own VisionTransformer
(class-token or average pooling, no attention pooling) and its own text transformer, which is
what prompt tuning and LGD need to reach (input embeddings, patch tokens). Towers built from
timm or Hugging Face models (BiomedCLIP's PubMedBERT text) are refused with that reason; they
have not been wired in.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UserError
from .teachers import _sha256
from .vlm import VisionLanguageModel, register_vlm

LOCAL_DIR = "local-dir:"
# open_clip's defaults (OpenAI CLIP) when a model carries no preprocessing config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenCLIPTokens(nn.Module):
    """Images in [0, 1] -> N x (1 + P) * width (flat rows of tokens): the vision transformer's tokens after its final
    norm, pooled (global) token first, before the projection."""

    def __init__(self, visual: nn.Module, fingerprint: str):
        super().__init__()
        self.visual = visual
        size = visual.image_size
        self.input_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        preprocess = getattr(visual, "preprocess_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(preprocess.get("mean", CLIP_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.get("std", CLIP_STD)).view(1, 3, 1, 1), persistent=False)
        self.width = visual.ln_post.normalized_shape[0]
        grid = visual.grid_size
        self.tokens = 1 + grid[0] * grid[1]
        self.feature_dim = self.tokens * self.width  # flat rows, as every cached extractor gives them
        self.fingerprint = fingerprint

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        # nn.MultiheadAttention's inference fast path is one fused op ONNX cannot express.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            x = visual.transformer(visual._embeds(x))
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        pooled, tokens = visual._global_pool(visual.ln_post(x))
        return torch.cat([pooled[:, None], tokens], dim=1).reshape(-1, self.feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(self.preprocess(images))


class MatrixProjection(nn.Module):
    """x @ proj, as open_clip projects (a Parameter, not a Linear)."""

    def __init__(self, proj: torch.Tensor):
        super().__init__()
        self.proj = nn.Parameter(proj.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj


class OpenCLIPVLM(VisionLanguageModel):
    name = "open_clip"

    def __init__(self, model: nn.Module, tokenizer, fingerprint: str):
        check_supported(model)
        super().__init__(OpenCLIPTokens(model.visual, fingerprint), MatrixProjection(model.visual.proj),
                         float(model.logit_scale.detach()))
        self.text_model = model
        model.visual = None  # its weights now live in image_encoder; the text tower stays here
        self.tokenizer = tokenizer

    @property
    def embed_dim(self) -> int:
        return self.image_projection.proj.shape[1]

    def tokenize(self, texts):
        ids = self.tokenizer(texts)
        return ids, (ids != 0).long()

    def token_embedding(self, ids):
        return self.text_model.token_embedding(ids)

    def encode_text_embeddings(self, embeddings, ids, mask):
        from open_clip.transformer import text_global_pool

        model = self.text_model
        x = embeddings + model.positional_embedding[: embeddings.shape[1]]
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        x = text_global_pool(x, ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        projection = model.text_projection
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def check_supported(model: nn.Module) -> None:
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.final_ln_after_pool:
        raise ConfigError(f"teacher=open_clip supports open_clip's own VisionTransformer image tower (no attention "
                          f"pooling); this model has {type(visual).__name__}")
    if not hasattr(model, "token_embedding") or visual.proj is None:
        raise ConfigError("teacher=open_clip supports open_clip's own text transformer (CLIP); this model's text "
                          "tower is a timm/Hugging Face one (e.g. BiomedCLIP), which is not wired in")


@register_vlm("open_clip")
def build_open_clip_vlm(cfg: dict) -> OpenCLIPVLM:
    try:
        import open_clip
    except ImportError:
        raise UserError("teacher=open_clip needs open-clip-torch; run `bash scripts/setup.sh`") from None
    name, weights = cfg.get("model"), cfg.get("weights")
    if not name:
        raise ConfigError("teacher=open_clip needs teacher.model: an open_clip model name with teacher.weights, "
                          "or local-dir:/path/to/folder")
    if str(name).startswith(LOCAL_DIR):
        folder = Path(str(name)[len(LOCAL_DIR):]).expanduser()
        files = sorted(folder.glob("open_clip_*model*")) if folder.is_dir() else []
        if not (folder / "open_clip_config.json").is_file() or not files:
            raise UserError(f"teacher.model={name}: {folder} must hold open_clip_config.json and "
                            f"open_clip_model.safetensors (or open_clip_pytorch_model.bin)")
        digest_source, pretrained = files[0], None
    else:
        if not weights:
            raise ConfigError(f"teacher.model={name} needs teacher.weights=/path/to/weights: nothing is downloaded")
        digest_source = Path(str(weights)).expanduser()
        if not digest_source.is_file():
            raise UserError(f"teacher.weights={weights} is not a file")
        pretrained = str(digest_source)
    try:
        model = open_clip.create_model(str(name), pretrained=pretrained, load_weights=True, device="cpu")
        tokenizer = open_clip.get_tokenizer(str(name))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise UserError(f"open_clip could not load teacher.model={name}: {str(exc).splitlines()[0]}") from None
    if not isinstance(tokenizer, open_clip.SimpleTokenizer):
        raise ConfigError(f"teacher.model={name} uses a {type(tokenizer).__name__}; only open_clip's built-in "
                          f"BPE tokenizer is supported (it needs no download)")
    # Names cache files: no path characters, the model name and the weights by digest.
    fingerprint = f"open_clip-{_sha256(str(name).encode())[:8]}-{_sha256(digest_source.read_bytes())[:16]}"
    return OpenCLIPVLM(model.float().eval(), tokenizer, fingerprint).freeze()
