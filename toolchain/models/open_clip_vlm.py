"""teacher=open_clip: any open_clip CLIP from local weights (BiomedCLIP-style checkpoints, MobileCLIP, ...).

    teacher=open_clip teacher.model=ViT-B-16 teacher.weights=/models/clip.safetensors
    teacher=open_clip teacher.model=local-dir:/models/my-clip     # open_clip_config.json + weights
    teacher=open_clip teacher.model=local-dir:/models/biomedclip teacher.text_dir=/models/biomedbert

Nothing is downloaded: a model name alone (no weights) is refused, and a `local-dir:` folder
must hold open_clip_config.json and its weights. Towers (prompt tuning and LGD need the text
encoder's input embeddings and the image encoder's patch tokens):
  image  open_clip's own VisionTransformer (class-token or average pooling, no attention
         pooling), or a timm VisionTransformer trunk (BiomedCLIP's ViT-B/16) with open_clip's
         linear/MLP projection head
  text   open_clip's own text transformer with its built-in BPE tokenizer, or a Hugging Face
         encoder (BiomedCLIP's PubMedBERT). Its architecture (config.json) and tokenizer files
         come from `teacher.text_dir` (default: the local-dir folder), which replaces the hub
         name in the config; its weights come from the CLIP checkpoint, as for every tower.
"""

from __future__ import annotations

import json
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


class CLIPImageTokens(nn.Module):
    """Images in [0, 1] -> N x (1 + P) * width (flat rows of tokens): the pooled (global) token
    first, then the patch tokens, after the tower's final norm and before the projection.
    Subclasses say how their tower gives them (`extract`)."""

    def __init__(self, visual: nn.Module, fingerprint: str, width: int, patches: int):
        super().__init__()
        self.visual = visual
        size = visual.image_size
        self.input_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        preprocess = getattr(visual, "preprocess_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(preprocess.get("mean", CLIP_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.get("std", CLIP_STD)).view(1, 3, 1, 1), persistent=False)
        self.width = width
        self.tokens = 1 + patches
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
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(self.preprocess(images))


class OpenCLIPTokens(CLIPImageTokens):
    """open_clip's own VisionTransformer."""

    def __init__(self, visual: nn.Module, fingerprint: str):
        grid = visual.grid_size
        super().__init__(visual, fingerprint, visual.ln_post.normalized_shape[0], grid[0] * grid[1])

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


class TimmViTTokens(CLIPImageTokens):
    """A timm VisionTransformer trunk inside open_clip's TimmModel (BiomedCLIP): its own pooling
    (class token or average, timm's forward_head without the classifier) gives the global token;
    the prefix (class/register) tokens are dropped from the patch tokens."""

    def __init__(self, visual: nn.Module, fingerprint: str):
        trunk = visual.trunk
        super().__init__(visual, fingerprint, trunk.num_features, trunk.patch_embed.num_patches)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.visual.trunk
        tokens = trunk.forward_features(x)
        pooled = trunk.forward_head(tokens, pre_logits=True)
        return torch.cat([pooled[:, None], tokens[:, trunk.num_prefix_tokens:]], dim=1).reshape(-1, self.feature_dim)


class MatrixProjection(nn.Module):
    """x @ proj, as open_clip projects (a Parameter, not a Linear)."""

    def __init__(self, proj: torch.Tensor):
        super().__init__()
        self.proj = nn.Parameter(proj.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj


class OpenCLIPVLM(VisionLanguageModel):
    """open_clip's own text transformer (CLIP) with its BPE tokenizer."""

    name = "open_clip"

    def __init__(self, model: nn.Module, tokenizer, fingerprint: str):
        image_encoder, image_projection = image_tower(model.visual, fingerprint)
        super().__init__(image_encoder, image_projection, float(model.logit_scale.detach()))
        self.text_model = model
        model.visual = None  # its weights now live in image_encoder; the text tower stays here
        self.tokenizer = tokenizer

    @property
    def embed_dim(self) -> int:
        with torch.no_grad():  # the projection's output width, whatever form the head takes
            return self.image_projection(torch.zeros(1, self.image_encoder.width)).shape[-1]

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


class HFTextCLIPVLM(OpenCLIPVLM):
    """A Hugging Face text encoder (open_clip's HFTextEncoder: BiomedCLIP's PubMedBERT), fed
    input embeddings; its pooler and projection as open_clip applies them."""

    def tokenize(self, texts):
        ids = self.tokenizer(texts)  # padded to the context length
        mask = (ids != self.text_model.text.config.pad_token_id).long()
        longest = int(mask.sum(1).max())
        return ids[:, :longest], mask[:, :longest]

    def token_embedding(self, ids):
        return self.text_model.text.transformer.get_input_embeddings()(ids)

    def encode_text_embeddings(self, embeddings, ids, mask):
        text = self.text_model.text
        out = text.transformer(inputs_embeds=embeddings, attention_mask=mask)
        return text.proj(text.pooler(out, mask))


def image_tower(visual: nn.Module, fingerprint: str) -> tuple[CLIPImageTokens, nn.Module]:
    """(token extractor, projection applied to every token) for a supported image tower; a
    one-line ConfigError for any other."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    if isinstance(visual, VisionTransformer) and visual.attn_pool is None and not visual.final_ln_after_pool \
            and visual.proj is not None:
        return OpenCLIPTokens(visual, fingerprint), MatrixProjection(visual.proj)
    if isinstance(visual, TimmModel) and isinstance(visual.trunk, TimmVisionTransformer) and "pool" not in visual.head:
        # Projection: the trunk's own classifier (Identity when open_clip adds a head) then open_clip's head.
        return TimmViTTokens(visual, fingerprint), nn.Sequential(visual.trunk.head, visual.head)
    tower = type(getattr(visual, "trunk", visual)).__name__
    raise ConfigError(f"teacher=open_clip supports a VisionTransformer image tower (open_clip's own without "
                      f"attention pooling, or a timm ViT); this model has {tower}")


def _text_tower(model_cfg: dict, text_dir: Path | None) -> dict | None:
    """The config's text_cfg with its Hugging Face tower pointed at local files (None: open_clip's
    own text transformer). One-line UserError where the files are missing."""
    text_cfg = dict(model_cfg.get("text_cfg") or {})
    hub_name = text_cfg.get("hf_model_name")
    if not hub_name:
        return None
    if text_dir is None or not (text_dir / "config.json").is_file():
        raise UserError(f"this CLIP's text tower is the Hugging Face model '{hub_name}' and nothing is downloaded: "
                        f"set teacher.text_dir to a folder with its config.json and tokenizer files")
    # The CLIP checkpoint holds the text weights: build the architecture from config.json only.
    return {**text_cfg, "hf_model_name": str(text_dir), "hf_tokenizer_name": str(text_dir),
            "hf_model_pretrained": False}


@register_vlm("open_clip")
def build_open_clip_vlm(cfg: dict) -> OpenCLIPVLM:
    try:
        import open_clip
    except ImportError:
        raise UserError("teacher=open_clip needs open-clip-torch; run `bash scripts/setup.sh`") from None
    name, weights = cfg.get("model"), cfg.get("weights")
    text_dir = Path(str(cfg["text_dir"])).expanduser() if cfg.get("text_dir") else None
    if not name:
        raise ConfigError("teacher=open_clip needs teacher.model: an open_clip model name with teacher.weights, "
                          "or local-dir:/path/to/folder")
    if str(name).startswith(LOCAL_DIR):
        folder = Path(str(name)[len(LOCAL_DIR):]).expanduser()
        files = sorted(folder.glob("open_clip_*model*")) if folder.is_dir() else []
        if not (folder / "open_clip_config.json").is_file() or not files:
            raise UserError(f"teacher.model={name}: {folder} must hold open_clip_config.json and "
                            f"open_clip_model.safetensors (or open_clip_pytorch_model.bin)")
        digest_source, pretrained, text_dir = files[0], None, text_dir or folder
        try:
            model_cfg = json.loads((folder / "open_clip_config.json").read_text()).get("model_cfg") or {}
        except (ValueError, AttributeError):
            raise UserError(f"teacher.model={name}: {folder / 'open_clip_config.json'} is not an open_clip config") from None
    else:
        if not weights:
            raise ConfigError(f"teacher.model={name} needs teacher.weights=/path/to/weights: nothing is downloaded")
        digest_source = Path(str(weights)).expanduser()
        if not digest_source.is_file():
            raise UserError(f"teacher.weights={weights} is not a file")
        pretrained, model_cfg = str(digest_source), open_clip.get_model_config(str(name)) or {}
    hf_text = _text_tower(model_cfg, text_dir)
    try:
        if hf_text is None:
            model = open_clip.create_model(str(name), pretrained=pretrained, load_weights=True, device="cpu")
            tokenizer = open_clip.get_tokenizer(str(name))
        else:
            model = open_clip.create_model(str(name), pretrained=pretrained, load_weights=True, device="cpu",
                                           text_cfg=hf_text)
            tokenizer = open_clip.tokenizer.HFTokenizer(str(text_dir), context_length=hf_text.get("context_length", 77))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise UserError(f"open_clip could not load teacher.model={name}: {str(exc).splitlines()[0]}") from None
    if hf_text is None and not hasattr(model, "token_embedding"):
        tower = type(getattr(model, "text", None)).__name__
        raise ConfigError(f"teacher.model={name}: teacher=open_clip supports open_clip's own text transformer inside "
                          f"a CLIP, or a Hugging Face text encoder; this model's text tower is {tower}")
    if hf_text is None and not isinstance(tokenizer, open_clip.SimpleTokenizer):
        raise ConfigError(f"teacher.model={name} uses a {type(tokenizer).__name__}; only open_clip's built-in "
                          f"BPE tokenizer is supported for its own text transformer (it needs no download)")
    # Names cache files: no path characters, the model name, the weights and any text config by digest.
    digest = _sha256(digest_source.read_bytes() + (b"" if hf_text is None else (text_dir / "config.json").read_bytes()))
    fingerprint = f"open_clip-{_sha256(str(name).encode())[:8]}-{digest[:16]}"
    vlm_class = OpenCLIPVLM if hf_text is None else HFTextCLIPVLM
    return vlm_class(model.float().eval(), tokenizer, fingerprint).freeze()
