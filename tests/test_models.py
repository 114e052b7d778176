"""Students, frozen teachers (real shipped weights) and the teacher-feature cache.

LiteMedSAM is slow on CPU: it is built once per module and only fed a few images.
"""

from __future__ import annotations

import warnings
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medkd.toolchain.errors import UserError
from medkd.toolchain.features import cache_path, images_digest, teacher_features
from medkd.toolchain.models import (
    FrozenTeacher,
    Student,
    available_students,
    available_teachers,
    build_student,
    build_teacher,
    count_parameters,
)
from medkd.toolchain.models.teachers import (
    LITEMEDSAM_DEFAULT_INPUT_SIZE,
    LITEMEDSAM_ENCODER_KWARGS,
    LiteMedSAMTeacher,
    TimmTeacher,
    _import_tinyvit,
    efficientnet_lite0_weights_path,
    litemedsam_packaged_weights,
    load_state_bytes,
    make_fingerprint,
)


@pytest.fixture(autouse=True)
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def litemedsam():
    return build_teacher({"name": "litemedsam", "checkpoint": None, "arch": None, "input_size": None})


@pytest.fixture(scope="module")
def effnet():
    return build_teacher({"name": "efficientnet-lite0", "checkpoint": None, "arch": None, "input_size": None})


def _images(n=3, c=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g)


# ---------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_names():
    assert available_teachers() == ["efficientnet-lite0", "litemedsam", "timm"]
    assert available_students() == ["mobilenetv3", "resnet18", "vit_tiny"]
    with pytest.raises(UserError, match="efficientnet-lite0, litemedsam, timm"):
        build_teacher({"name": "sam-huge"})
    with pytest.raises(UserError, match="mobilenetv3, resnet18, vit_tiny"):
        build_student({"name": "resnet50"}, 3, 1, 32)


# ---------------------------------------------------------------------------- students


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3", "vit_tiny"])
def test_student_shapes(name, in_chans):
    student = build_student({"name": name, "pretrained_checkpoint": None, "patch_size": 4}, 5, in_chans, 32)
    assert isinstance(student, Student) and isinstance(student.head, nn.Linear)
    assert student.head.in_features == student.feature_dim and student.head.out_features == 5
    student.eval()
    x = _images(2, in_chans, 32)
    with torch.no_grad():
        feats, logits = student.features(x), student(x)
    assert feats.shape == (2, student.feature_dim)
    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits, student.head(feats))
    assert count_parameters(student) == sum(p.numel() for p in student.parameters())
    assert count_parameters(student, trainable_only=True) == count_parameters(student)


def test_student_feature_dims_and_archs():
    dims = {n: build_student({"name": n}, 2, 1, 32) for n in available_students()}
    assert {n: (s.arch, s.feature_dim) for n, s in dims.items()} == {
        "mobilenetv3": ("mobilenetv3_small_100", 1024),
        "resnet18": ("resnet18", 512),
        "vit_tiny": ("vit_tiny_patch16_224", 192),
    }


def test_small_input_stem_default_and_override():
    small = build_student({"name": "resnet18"}, 2, 1, 32)
    assert small.backbone.conv1.kernel_size == (3, 3) and small.backbone.conv1.stride == (1, 1)
    assert isinstance(small.backbone.maxpool, nn.Identity)
    big = build_student({"name": "resnet18"}, 2, 3, 96)
    assert big.backbone.conv1.kernel_size == (7, 7) and isinstance(big.backbone.maxpool, nn.MaxPool2d)
    off = build_student({"name": "resnet18", "small_input_stem": False}, 2, 1, 32)
    assert off.backbone.conv1.kernel_size == (7, 7)
    assert build_student({"name": "mobilenetv3"}, 2, 1, 32).backbone.conv_stem.stride == (1, 1)
    assert build_student({"name": "mobilenetv3"}, 2, 1, 128).backbone.conv_stem.stride == (2, 2)
    with pytest.raises(UserError, match="small_input_stem"):
        build_student({"name": "resnet18", "small_input_stem": "yes"}, 2, 1, 32)


def test_vit_patch_size():
    assert build_student({"name": "vit_tiny", "patch_size": None}, 2, 1, 28).patch_size == 4
    vit = build_student({"name": "vit_tiny", "patch_size": 8}, 2, 1, 64)
    assert vit.backbone.patch_embed.grid_size == (8, 8)
    with pytest.raises(UserError, match="divisible"):
        build_student({"name": "vit_tiny", "patch_size": 5}, 2, 1, 32)


def test_student_pretrained_checkpoint_round_trip(tmp_path):
    src = build_student({"name": "mobilenetv3"}, 4, 1, 32)
    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = build_student({"name": "mobilenetv3", "pretrained_checkpoint": str(path)}, 4, 1, 32)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    # a bare timm backbone state dict saved with torch.save also loads (weights_only)
    pth = tmp_path / "backbone.pth"
    torch.save(src.backbone.state_dict(), pth)
    again = build_student({"name": "mobilenetv3", "pretrained_checkpoint": str(pth)}, 7, 1, 32)
    assert torch.equal(again.backbone.conv_stem.weight, src.backbone.conv_stem.weight)
    with pytest.raises(UserError, match="does not match"):
        build_student({"name": "resnet18", "pretrained_checkpoint": str(path)}, 4, 1, 32)
    with pytest.raises(UserError, match="does not exist"):
        build_student({"name": "resnet18", "pretrained_checkpoint": str(tmp_path / "nope.pt")}, 4, 1, 32)


# ---------------------------------------------------------------------------- LiteMedSAM


def test_litemedsam_features(litemedsam):
    t = litemedsam
    assert isinstance(t, FrozenTeacher) and t.name == "litemedsam"
    assert t.feature_dim == 256 and t.input_size == LITEMEDSAM_DEFAULT_INPUT_SIZE
    assert not any(p.requires_grad for p in t.parameters())
    t.train()  # a parent's .train() must not unfreeze BN / attention-bias caches
    assert not t.training and not any(m.training for m in t.modules())
    gray = _images(2, 1, 28)
    with torch.no_grad():
        f_gray = t(gray)
        f_rgb = t(gray.repeat(1, 3, 1, 1))
        f_big = t(_images(1, 3, 64))
    assert f_gray.shape == (2, 256) and f_big.shape == (1, 256)
    assert torch.isfinite(f_gray).all()
    torch.testing.assert_close(f_gray, f_rgb)  # gray is repeated to 3 channels
    with torch.no_grad():
        emb = t.embedding(t.preprocess(gray[:1]))
    assert emb.shape == (1, 256, t.input_size // 4, t.input_size // 4)
    with pytest.raises(UserError, match="C = 1 or 3"):
        t(torch.rand(1, 2, 28, 28))


def test_litemedsam_weights_really_load(litemedsam):
    data, _ = litemedsam_packaged_weights()
    state = load_state_bytes(data, "lite_medsam.pth")
    enc = litemedsam.encoder
    assert torch.equal(enc.neck[0].weight, state["image_encoder.neck.0.weight"])
    assert torch.equal(enc.layers[2].blocks[3].attn.attention_biases, state["image_encoder.layers.2.blocks.3.attn.attention_biases"])
    # eval()-time cache of the attention biases was taken after loading, not before
    attn = enc.layers[1].blocks[0].attn
    torch.testing.assert_close(attn.ab, attn.attention_biases[:, attn.attention_bias_idxs])
    TinyViT, _ = _import_tinyvit()
    torch.manual_seed(0)
    random = LiteMedSAMTeacher(TinyViT(img_size=litemedsam.input_size, **LITEMEDSAM_ENCODER_KWARGS), litemedsam.input_size, "random").freeze()
    x = _images(2, 1, 32)
    with torch.no_grad():
        assert not torch.allclose(litemedsam(x), random(x), atol=1e-3)


def test_litemedsam_bad_checkpoints(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_teacher({"name": "litemedsam", "checkpoint": str(tmp_path / "missing.pth")})
    bad = tmp_path / "wrong.safetensors"
    save_file({"image_encoder.neck.0.weight": torch.zeros(256, 320, 1, 1)}, str(bad))
    with pytest.raises(UserError, match="does not match the LiteMedSAM image encoder"):
        build_teacher({"name": "litemedsam", "checkpoint": str(bad)})
    with pytest.raises(UserError, match="multiple of 4"):
        build_teacher({"name": "litemedsam", "input_size": 50})


# ---------------------------------------------------------------------------- EfficientNet-Lite0


def test_efficientnet_lite0_features_and_weights(effnet):
    t = effnet
    assert isinstance(t, TimmTeacher) and t.feature_dim == 1280 and t.input_size == 224
    assert not any(p.requires_grad for p in t.parameters()) and not t.training
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(t.model.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(t.model.blocks[5][2].conv_pwl.weight, state["_blocks.13._project_conv.weight"])
    assert torch.equal(t.model.bn2.running_var, state["_bn1.running_var"])
    x = _images(2, 1, 32)
    with torch.no_grad():
        feats = t(x)
        random = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
        rand_feats = random(t.preprocess(x))
    assert feats.shape == (2, 1280) and torch.isfinite(feats).all()
    assert not torch.allclose(feats, rand_feats, atol=1e-3)


def test_efficientnet_lite0_wrong_checkpoint(tmp_path):
    bad = tmp_path / "lite0.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_blocks.0._bn1.weight": torch.zeros(32)}, bad)
    with pytest.raises(UserError, match="missing"):
        build_teacher({"name": "efficientnet-lite0", "checkpoint": str(bad)})


# ---------------------------------------------------------------------------- timm teacher


def test_timm_teacher_round_trip(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))  # includes fc.*
    t = build_teacher({"name": "timm", "arch": "test_resnet", "checkpoint": str(path), "input_size": 32})
    assert t.feature_dim == ref.num_features and t.input_size == 32
    assert not any(p.requires_grad for p in t.parameters())
    x = _images(2, 1, 20)
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(t.preprocess(x)), pre_logits=True)
        torch.testing.assert_close(t(x), expected)
    # same weights through torch.save + weights_only, wrapped in {"state_dict": ...}
    pth = tmp_path / "test_resnet.pth"
    torch.save({"state_dict": ref.state_dict(), "epoch": 3}, pth)
    t2 = build_teacher({"name": "timm", "arch": "test_resnet", "checkpoint": str(pth), "input_size": 32})
    assert t2.fingerprint != t.fingerprint  # the fingerprint follows the file's bytes
    with torch.no_grad():
        torch.testing.assert_close(t2(x), t(x))


def test_timm_teacher_errors(tmp_path):
    other = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(UserError, match="does not match timm 'test_resnet'"):
        build_teacher({"name": "timm", "arch": "test_resnet", "checkpoint": str(path)})
    with pytest.raises(UserError, match="does not exist"):
        build_teacher({"name": "timm", "arch": "test_resnet", "checkpoint": str(tmp_path / "x.safetensors")})
    with pytest.raises(UserError, match="teacher.arch"):
        build_teacher({"name": "timm", "arch": "???", "checkpoint": str(path)})
    with pytest.raises(UserError, match="unknown timm architecture"):
        build_teacher({"name": "timm", "arch": "resnet_does_not_exist", "checkpoint": str(path)})
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        build_teacher({"name": "timm", "arch": "test_resnet", "checkpoint": str(garbage)})
    pickled = tmp_path / "module.pt"
    torch.save(other, pickled)  # a pickled nn.Module: refused by weights_only
    with pytest.raises(UserError, match="weights_only"):
        build_teacher({"name": "timm", "arch": "test_efficientnet", "checkpoint": str(pickled)})


def test_fingerprint_changes_with_weights_and_size():
    a = make_fingerprint("timm", "test_resnet", 32, "0" * 64)
    assert a == make_fingerprint("timm", "test_resnet", 32, "0" * 64)
    assert a != make_fingerprint("timm", "test_resnet", 64, "0" * 64)
    assert a != make_fingerprint("timm", "test_resnet", 32, "1" * 64)
    assert a.startswith("timm-test_resnet-32px-")


# ---------------------------------------------------------------------------- feature cache


class CountingTeacher(nn.Module):
    """A cheap stand-in with the FrozenTeacher attributes; counts forward calls."""

    def __init__(self, dim=6, fingerprint="counting-v1"):
        super().__init__()
        self.proj = nn.Linear(3, dim)
        self.feature_dim = dim
        self.fingerprint = fingerprint
        self.calls = 0
        self.requires_grad_(False)

    def forward(self, images):
        self.calls += 1
        return self.proj(images.mean(dim=(2, 3)).expand(-1, 3))


def test_feature_cache_hit(tmp_path):
    teacher, images = CountingTeacher(), _images(10, 1, 16)
    first = teacher_features(teacher, images, tmp_path, batch_size=4, progress=False)
    assert teacher.calls == 3 and first.shape == (10, 6) and first.dtype == torch.float32
    path = cache_path(teacher, images, tmp_path)
    assert path.name == f"counting-v1-{images_digest(images)}.safetensors" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left
    second = teacher_features(teacher, images, tmp_path, batch_size=4, progress=False)
    assert teacher.calls == 3  # served from the cache
    torch.testing.assert_close(second, first)
    teacher_features(teacher, images[:9], tmp_path, progress=False)  # other images: other entry
    assert teacher.calls == 4 and len(list(tmp_path.iterdir())) == 2
    teacher_features(teacher, images, None, batch_size=4, progress=False)  # no cache dir: computed
    assert teacher.calls == 7


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape"])
def test_corrupt_cache_is_recomputed(tmp_path, damage):
    teacher, images = CountingTeacher(), _images(5, 3, 16)
    good = teacher_features(teacher, images, tmp_path, progress=False)
    path = cache_path(teacher, images, tmp_path)
    if damage == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    else:
        save_file({"features": torch.zeros(4, 6)}, str(path))
    calls = teacher.calls
    with pytest.warns(RuntimeWarning, match="recomputing"):
        again = teacher_features(teacher, images, tmp_path, progress=False)
    assert teacher.calls == calls + 1
    torch.testing.assert_close(again, good)
    torch.testing.assert_close(load_file(str(path))["features"], good)  # repaired on disk


def test_failed_extraction_leaves_no_cache_file(tmp_path):
    class Exploding(CountingTeacher):
        def forward(self, images):
            if self.calls == 1:
                raise KeyboardInterrupt  # a kill mid-extraction
            return super().forward(images)

    with pytest.raises(KeyboardInterrupt):
        teacher_features(Exploding(), _images(8, 1, 16), tmp_path, batch_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_teacher_features_with_real_teacher(litemedsam, tmp_path):
    images = _images(3, 1, 32, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feats = teacher_features(litemedsam, images, tmp_path, batch_size=2, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(feats, litemedsam(images))
    assert cache_path(litemedsam, images, tmp_path).name.startswith(f"litemedsam-tinyvit-{litemedsam.input_size}px-")
