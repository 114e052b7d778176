"""Segmentation models: the ViT-Tiny student and LiteMedSAM as a prompt-free K-class teacher."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

from medkd.export.onnx_export import export_onnx
from medkd.toolchain.errors import UserError
from medkd.toolchain.models import build_teacher
from medkd.toolchain.models.sam_segmenter import (PRETRAINED_MASK_TOKENS, build_foundation_segmenter,
                                                  litemedsam_decoder_and_prompt, with_segmenter_lora)
from medkd.toolchain.models.segmenters import build_segmenter
from medkd.toolchain.models.teachers import litemedsam_packaged_weights, load_state_bytes


# ---------------------------------------------------------------- student


def test_vit_tiny_seg_maps_images_to_class_logits_at_their_size():
    model = build_segmenter({"name": "vit_tiny_seg", "patch_size": 4}, 5, 1, 32)
    x = torch.rand(3, 1, 32, 32)
    assert model(x).shape == (3, 5, 32, 32)
    assert model.tokens(x).shape == (3, 8 * 8, 192)  # no class token: one token per patch
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert 5.0e6 < encoder < 5.8e6  # ViT-Tiny's 12 x 192-d blocks


def test_vit_tiny_seg_exports_to_onnx_with_matching_outputs(tmp_path):
    model = build_segmenter({"name": "vit_tiny_seg", "patch_size": 8}, 3, 1, 32).eval()
    x = torch.rand(2, 1, 32, 32)
    path = export_onnx(model, x, tmp_path / "seg.onnx")  # the export stage's exporter (checks 2 batch sizes)
    out = ort.InferenceSession(str(path)).run(None, {"images": x.numpy()})[0]
    assert out.shape == (2, 3, 32, 32)
    assert abs(out - model(x).detach().numpy()).max() < 1e-4


@pytest.mark.parametrize("cfg, size, fragment", [
    ({"name": "vit_tiny_seg", "patch_size": 6}, 36, "power of 2"),
    ({"name": "vit_tiny_seg", "patch_size": 8}, 36, "divisible by student.patch_size"),
    ({"name": "unet9000"}, 32, "choose one of: vit_tiny_seg"),
])
def test_bad_segmenter_settings_are_one_line_errors(cfg, size, fragment):
    with pytest.raises(UserError, match=fragment):
        build_segmenter(cfg, 3, 1, size)


# ---------------------------------------------------------------- teacher


@pytest.fixture(scope="module")
def teacher():
    return build_teacher({"name": "litemedsam", "input_size": 64})


def test_prompt_free_decoder_is_sams_decoder_without_prompts(teacher):
    """With K = 4 classes the class tokens are SAM's 4 mask tokens, so the masks must equal the
    vendored MaskDecoder.predict_masks given no sparse prompt and the no-mask dense prompt."""
    model = build_foundation_segmenter(teacher, PRETRAINED_MASK_TOKENS, 64)
    data, source = litemedsam_packaged_weights()
    decoder, prompt = litemedsam_decoder_and_prompt(load_state_bytes(data, source), source)
    with torch.no_grad():
        embedding = model.late.embedding(model.early(torch.rand(2, 1, 64, 64)))
        n, _, g, _ = embedding.shape
        reference, _ = decoder.eval().predict_masks(
            embedding, prompt.pe_layer((g, g)).unsqueeze(0), embedding.new_zeros(n, 0, 256),
            prompt.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, g, g))
        ours = model.late.decoder(embedding)
    assert ours.shape == (2, 4, 4 * g, 4 * g) == reference.shape
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)


def test_teacher_segmenter_outputs_k_classes_at_the_image_size(teacher):
    model = build_foundation_segmenter(teacher, 6, 32)  # 6 classes: tokens 4, 5 copy pretrained 0, 1
    tokens = model.late.decoder.mask_tokens.weight
    torch.testing.assert_close(tokens[4], tokens[0])
    assert not torch.equal(tokens[1], tokens[0])
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 6, 32, 32)  # 64 px masks resized to 32
    assert not any(p.requires_grad for p in model.parameters())  # nothing trains before LoRA


def test_split_segmenter_gives_the_frozen_encoders_own_embedding(teacher):
    # Task-agnostic KD distils early stages + the copied last stage and neck: that must be the
    # un-tuned encoder's embedding, not an approximation of it.
    model = build_foundation_segmenter(teacher, 4, 32)
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        split = model.late.embedding(model.early(images))
        whole = teacher.embedding(teacher.preprocess(images))
    grid = teacher.input_size // 4
    assert split.shape == whole.shape == (2, 256, grid, grid)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


def test_lora_trains_adapters_and_class_head_and_merges_to_the_same_outputs(teacher):
    model = with_segmenter_lora(build_foundation_segmenter(teacher, 3, 64), rank=4, alpha=8, dropout=0.0)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("stage.blocks" in n and "lora_" in n for n in trained)  # encoder attention/MLP
    assert any("transformer.layers" in n and "lora_" in n for n in trained)  # decoder
    assert any("mask_tokens" in n for n in trained) and any("output_hypernetworks_mlps.2" in n for n in trained)
    assert all("lora_" in n or "modules_to_save" in n for n in trained)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # PEFT starts B at 0: make the adapters matter
    model.late.double().eval()  # float64: the merge's arithmetic, not fp32 rounding, is under test
    with torch.no_grad():
        tokens = model.early(torch.rand(2, 1, 64, 64)).double()
        unmerged = model.from_intermediate(tokens)
        base = model.late.get_base_model()
        with model.late.disable_adapter():
            plain = model.from_intermediate(tokens)
        merged = model.merge_and_unload().from_intermediate(tokens)
    assert base is model.late and (unmerged - plain).abs().max() > 1e-2  # the adapters change the masks
    assert (merged - unmerged).abs().max() <= 1e-5


def test_only_litemedsam_can_be_the_segmentation_teacher():
    other = build_teacher({"name": "efficientnet-lite0"})
    with pytest.raises(UserError, match="LiteMedSAM"):
        build_foundation_segmenter(other, 3, 32)
