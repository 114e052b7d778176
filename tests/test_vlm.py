"""Vision-language models (toolchain/models/vlm.py, lit_vlm.py, open_clip_vlm.py): the open_clip
loader against open_clip's own outputs on a small random CLIP written here, prompt placement,
folding parity, the embedded VLM's pieces, and one-line errors for bad teacher settings."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from medkd.recipes.ogkd import PromptLearner
from medkd.toolchain.errors import ConfigError, UserError
from medkd.toolchain.models.vlm import FoldedPromptClassifier, build_vlm

open_clip = pytest.importorskip("open_clip")

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def write_tiny_clip(folder) -> torch.nn.Module:
    """A randomly initialised open_clip CLIP saved as a local-dir: folder; returns the model."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model


BIOMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"  # never fetched: the test writes its files
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "x", "the", "a", "of", "thalamus", "insula", "putamen", "t1",
         "mri", "patch", "superior", "frontal", "gyrus", "amygdala", "."]
TINY_BIOMEDCLIP = {
    "embed_dim": 16,
    # timm's 160 px test ViT (10 x 10 patches, width 64) with open_clip's linear head, as BiomedCLIP's ViT-B/16.
    "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "image_size": 160},
    "text_cfg": {"hf_model_name": BIOMEDBERT, "hf_tokenizer_name": BIOMEDBERT, "hf_proj_type": "mlp",
                 "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 64},
}


def write_text_files(folder) -> None:
    """A 2-layer BERT's config.json and a WordPiece tokenizer over WORDS, as a local text_dir."""
    from transformers import BertConfig, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(str(folder))
    BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64).save_pretrained(str(folder))


def write_tiny_biomedclip(folder, text_dir) -> torch.nn.Module:
    """A randomly initialised BiomedCLIP-style CLIP (timm ViT + Hugging Face BERT) whose config
    names the hub model, as BiomedCLIP's does; the text architecture comes from text_dir."""
    write_text_files(text_dir)
    local_text = {**TINY_BIOMEDCLIP["text_cfg"], "hf_model_name": str(text_dir), "hf_model_pretrained": False}
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**{**TINY_BIOMEDCLIP, "text_cfg": local_text}).eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_BIOMEDCLIP}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model


@pytest.fixture(scope="module", params=["clip", "biomedclip"])
def tiny_clip(request, tmp_path_factory):
    """(open_clip model, our VLM of the same folder, (image size, patches)) for open_clip's own
    towers and for BiomedCLIP's timm + Hugging Face towers (text files in the folder itself)."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "clip":
        model, grid = write_tiny_clip(folder), (32, 16)
    else:
        model, grid = write_tiny_biomedclip(folder, text_dir=folder), (160, 100)
    return model, build_vlm({"name": "open_clip", "model": f"local-dir:{folder}"}), grid


def test_open_clip_text_from_embeddings_equals_open_clip_encode_text(tiny_clip):
    model, vlm, _ = tiny_clip
    ids, mask = vlm.tokenize(["the thalamus.", "a T1 MRI patch of the superior frontal gyrus."])
    assert (mask.sum(1) > 3).all()  # real words, not only start/end tokens
    ours = vlm.encode_text_embeddings(vlm.token_embedding(ids), ids, mask)
    assert torch.allclose(ours, model.encode_text(ids), atol=1e-5)


def test_open_clip_global_token_projected_equals_encode_image(tiny_clip):
    model, vlm, (size, patches) = tiny_clip
    images = torch.rand(3, 3, size, size)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    features = vlm.image_features(vlm.image_encoder(images))
    assert features.shape == (3, 1 + patches, 16) and vlm.embed_dim == 16  # global + patches, embed_dim 16
    with torch.no_grad():
        reference = F.normalize(model.encode_image((images - mean) / std), dim=-1)
    assert torch.allclose(features[:, 0], reference, atol=1e-5)


def test_a_hugging_face_text_tower_needs_its_files_locally(tmp_path):
    folder, text_dir = tmp_path / "clip", tmp_path / "biomedbert"
    model = write_tiny_biomedclip(folder, text_dir)  # text files beside, not in the folder
    with pytest.raises(UserError, match=f"Hugging Face model '{BIOMEDBERT}' and nothing is downloaded: set teacher.text_dir"):
        build_vlm({"name": "open_clip", "model": f"local-dir:{folder}"})
    vlm = build_vlm({"name": "open_clip", "model": f"local-dir:{folder}", "text_dir": str(text_dir)})
    ids, mask = vlm.tokenize(["the insula."])
    assert torch.allclose(vlm.encode_text_embeddings(vlm.token_embedding(ids), ids, mask), model.encode_text(ids),
                          atol=1e-5)


def test_an_image_tower_other_than_a_vision_transformer_is_refused(tmp_path):
    cfg = {**TINY_BIOMEDCLIP, "vision_cfg": {**TINY_BIOMEDCLIP["vision_cfg"], "timm_model_name": "test_convnext",
                                             "timm_pool": "avg"}}
    write_text_files(tmp_path)
    local_text = {**cfg["text_cfg"], "hf_model_name": str(tmp_path), "hf_model_pretrained": False}
    model = open_clip.CustomTextCLIP(**{**cfg, "text_cfg": local_text})
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(ConfigError, match="VisionTransformer image tower.*ConvNeXt"):
        build_vlm({"name": "open_clip", "model": f"local-dir:{tmp_path}"})


def test_prompt_learner_puts_the_context_after_the_start_token(tiny_clip):
    _, vlm, _ = tiny_clip
    learner = PromptLearner(vlm, ["thalamus", "insula"], n_ctx=3, class_specific=False)
    prompts = learner()
    ids, _ = vlm.tokenize(["X X X thalamus.", "X X X insula."])
    words = vlm.token_embedding(ids)
    assert torch.equal(prompts[:, 0], words[:, 0])
    assert torch.equal(prompts[:, 1:4], learner.ctx.expand(2, -1, -1))
    assert torch.equal(prompts[:, 4:], words[:, 4:])
    novel = learner.for_classes(vlm, ["amygdala"])
    assert novel.ctx is learner.ctx  # the same parameter serves novel classes
    with pytest.raises(ValueError):
        PromptLearner(vlm, ["a", "b"], 2, class_specific=True).for_classes(vlm, ["c"])


def test_folded_classifier_equals_the_prompt_tuned_logits(tiny_clip):
    _, vlm, _ = tiny_clip
    learner = PromptLearner(vlm, ["thalamus", "insula", "putamen"], n_ctx=2, class_specific=False)
    with torch.no_grad():
        learner.ctx.normal_()  # tuned-looking, non-zero context
        text = vlm.encode_text_embeddings(learner(), learner.ids, learner.mask)
        folded = FoldedPromptClassifier(vlm.image_encoder, vlm.image_projection, text, float(vlm.logit_scale))
        images = torch.rand(5, 1, 32, 32)
        tuned = vlm.logit_scale.exp() * vlm.image_features(vlm.image_encoder(images))[:, 0] @ F.normalize(text, dim=-1).t()
        assert (folded(images) - tuned).abs().max() <= 1e-5
    assert not any(name.startswith("text") for name, _ in folded.named_modules() if name)  # no text encoder


@pytest.mark.parametrize("cfg, error, fragment", [
    ({"name": "litemedsam"}, ConfigError, "needs a vision-language teacher"),
    ({"name": "open_clip", "model": None}, ConfigError, "needs teacher.model"),
    ({"name": "open_clip", "model": "ViT-B-16"}, ConfigError, "nothing is downloaded"),
    ({"name": "open_clip", "model": "ViT-B-16", "weights": "/nonexistent.safetensors"}, UserError, "is not a file"),
    ({"name": "open_clip", "model": "local-dir:/nonexistent"}, UserError, "must hold open_clip_config.json"),
])
def test_bad_vlm_settings_raise_one_line_errors(cfg, error, fragment):
    with pytest.raises(error, match=fragment):
        build_vlm(cfg)


@pytest.fixture(scope="module")
def lit_vlm():
    return build_vlm({"name": "lit-vlm", "input_size": 32, "token_pool": 2})


def test_lit_vlm_text_is_minilm_mean_pooling(lit_vlm):
    ids, mask = lit_vlm.tokenize(["thalamus.", "the superior frontal gyrus, a region of the frontal lobe."])
    assert mask[0].sum() < mask[1].sum()  # padded to the longest
    hidden = lit_vlm.text.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(lit_vlm.text_hidden(lit_vlm.token_embedding(ids), mask), expected, atol=1e-5)


def test_lit_vlm_tokens_are_the_global_mean_then_pooled_patches(lit_vlm):
    encoder = lit_vlm.image_encoder  # 32 px: an 8 x 8 embedding, pooled 2 x 2 -> 16 patch tokens
    with torch.no_grad():
        tokens = encoder(torch.rand(2, 1, 32, 32)).view(2, -1, encoder.width)
    assert tokens.shape == (2, 17, 256)
    assert torch.allclose(tokens[:, 0], tokens[:, 1:].mean(dim=1), atol=1e-5)  # equal-size pools: same mean
    assert not any(p.requires_grad for p in lit_vlm.image_encoder.parameters())
    assert not any(p.requires_grad for p in lit_vlm.text.parameters())
    assert lit_vlm.image_projection.weight.requires_grad and lit_vlm.text_projection.weight.requires_grad


def test_a_folder_whose_config_is_not_open_clips_is_a_one_line_error(tmp_path):
    (tmp_path / "open_clip_config.json").write_text("this is not json")
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="is not an open_clip config"):
        build_vlm({"name": "open_clip", "model": f"local-dir:{tmp_path}"})
