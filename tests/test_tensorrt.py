"""TensorRT engine settings, cache keys, trtexec command lines and the Python API build.

The settings rules are tested as a pure function over (TensorRT version, target config,
precision), with the target dicts loaded from the real yaml files. The engine build needs
TensorRT and a GPU: that test skips with the reason where they are missing. The build code
itself still runs here against FAKE_TENSORRT_SOURCE, a small stand-in module that records
what the builder was told (network flags, builder flags, profile, DLA) in the "engine".
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch
from omegaconf import OmegaConf
from onnx import TensorProto, helper
from torch import nn

from medkd.export import export_onnx
from medkd.export import tensorrt as trt_module
from medkd.export.tensorrt import (
    build_engine,
    build_engine_cached,
    builder_settings,
    check_onnx_precision,
    engine_cache_key,
    engine_cache_path,
    gpu_mismatch,
    local_compute_capability,
    local_l4t_release,
    parse_tensorrt_version,
    tensorrt_available,
    trtexec_build_command,
    trtexec_profile_command,
)
from medkd.toolchain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHAPE = (3, 16, 16)


def target(name: str, **override) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "toolchain" / "conf" / "target" / f"{name}.yaml"))
    cfg.update(override)
    return cfg


# --------------------------------------------------------------------------------------
# Tiny real ONNX models (fp32, fp16 with fp32 I/O, int8 explicit Q/DQ); test_bundle reuses these
# --------------------------------------------------------------------------------------


def _fp16(fp32: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(copy.deepcopy(fp32), keep_io_types=True)


def _int8_qdq(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """Quantize the input explicitly (Q -> DQ before the first conv), the layout TensorRT reads."""
    model = copy.deepcopy(fp32)
    graph = model.graph
    name = graph.input[0].name
    graph.initializer.extend(
        [
            helper.make_tensor("x_scale", TensorProto.FLOAT, [], [0.02]),
            helper.make_tensor("x_zero", TensorProto.INT8, [], [0]),
        ]
    )
    for node in graph.node:
        node.input[:] = ["x_dq" if i == name else i for i in node.input]
    graph.node.insert(0, helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]))
    graph.node.insert(0, helper.make_node("QuantizeLinear", [name, "x_scale", "x_zero"], ["x_q"]))
    onnx.checker.check_model(model)
    return model


def make_models(folder: Path) -> dict[str, Path]:
    """{"fp32" | "fp16" | "int8": path} of a Conv/ReLU/Flatten/Linear classifier on 3x16x16 images."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 2))
    paths = {"fp32": export_onnx(net, torch.randn(2, *SHAPE), folder / "model.onnx")}
    fp32 = onnx.load(str(paths["fp32"]))
    for precision, convert in (("fp16", _fp16), ("int8", _int8_qdq)):
        paths[precision] = folder / f"model.{precision}.onnx"
        onnx.save(convert(fp32), str(paths[precision]))
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("onnx"))


# --------------------------------------------------------------------------------------
# builder_settings: a pure function of (version, target, precision, shape, dla_core)
# --------------------------------------------------------------------------------------

# version, target, precision, dla_core -> strongly_typed, builder_flags, (min, opt, max), dla_core, gpu_fallback
SETTINGS_TABLE = [
    ("10.3", "jetson-orin", "int8", None, True, (), (1, 1, 8), None, False),
    ("10.3", "jetson-orin", "fp16", None, False, ("FP16",), (1, 1, 8), None, False),
    ("10.3", "jetson-orin", "fp32", None, False, (), (1, 1, 8), None, False),
    ("11.4", "jetson-orin", "fp16", None, True, (), (1, 1, 8), None, False),
    ("11.4", "datacenter-gpu", "int8", None, True, (), (1, 8, 32), None, False),
    ("11.4.0.106", "datacenter-gpu", "fp32", None, True, (), (1, 8, 32), None, False),
    ("10.3", "jetson-orin-nano", "fp16", None, False, ("FP16",), (1, 1, 4), None, False),
    ("10.3", "jetson-orin", "fp16", 1, False, ("FP16",), (1, 1, 1), 1, True),
    ("10.3", "jetson-orin", "int8", 0, True, (), (1, 1, 1), 0, True),
    ("11.4", "jetson-orin", "int8", 0, True, (), (1, 1, 1), 0, True),
]


@pytest.mark.parametrize("version,name,precision,dla,typed,flags,batch,dla_core,fallback", SETTINGS_TABLE)
def test_builder_settings_table(version, name, precision, dla, typed, flags, batch, dla_core, fallback):
    s = builder_settings(version, target(name), precision, SHAPE, dla_core=dla)
    assert (s.strongly_typed, s.builder_flags) == (typed, flags)
    assert (s.min_batch, s.opt_batch, s.max_batch) == batch
    assert (s.dla_core, s.gpu_fallback) == (dla_core, fallback)
    assert s.tensorrt_version == ".".join(version.split(".")[:2])
    assert (s.target, s.precision, s.input_shape) == (name, precision, SHAPE)
    # TensorRT 11 has no precision flags at all; strongly typed networks take none anywhere.
    assert not (s.strongly_typed and s.builder_flags)


def test_dla_collapses_the_profile_to_the_opt_batch():
    orin = target("jetson-orin", batch={"min": 1, "opt": 4, "max": 8})
    gpu = builder_settings("10.3", orin, "int8", SHAPE)
    dla = builder_settings("10.3", orin, "int8", SHAPE, dla_core=1)
    assert (gpu.min_batch, gpu.opt_batch, gpu.max_batch) == (1, 4, 8)
    assert (dla.min_batch, dla.opt_batch, dla.max_batch) == (4, 4, 4)


def test_builder_settings_is_pure(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # any `import tensorrt` would now fail
    orin = target("jetson-orin")
    before = copy.deepcopy(orin)
    a = builder_settings("10.3", orin, "fp16", SHAPE, dla_core=0)
    b = builder_settings("10.3", target("jetson-orin"), "fp16", [3, 16, 16], dla_core=0)
    assert a == b and hash(a) == hash(b)
    assert orin == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.precision = "int8"  # type: ignore[misc]


@pytest.mark.parametrize(
    "version,name,precision,dla,message",
    [
        ("10.3", "jetson-orin-nano", "fp16", 0, "jetson-orin-nano has no DLA"),
        ("11.2", "jetson-orin", "fp16", 0, "TensorRT 11.2 has no DLA support"),
        ("11.0.1", "jetson-orin", "int8", 1, "TensorRT 11.0 has no DLA support"),
        ("10.3", "jetson-orin", "fp16", 2, "jetson-orin has 2 DLA cores"),
        ("10.3", "jetson-orin", "fp32", 0, "DLA runs fp16 or int8 only"),
        ("10.3", "datacenter-gpu", "fp16", 0, "datacenter-gpu has no DLA"),
        ("10.3", "cpu", "fp16", None, "target cpu runs onnxruntime, not TensorRT"),
        ("10.3", "cpu", "int8", None, "target cpu runs onnxruntime, not TensorRT"),
        ("10.3", "jetson-orin", "best", None, "resolve 'best'"),
        ("10.3", "jetson-orin", "bf16", None, "must be one of fp32, fp16, int8"),
        ("8.6", "jetson-orin", "fp16", None, "TensorRT 8.6 is not supported"),
        ("12.0", "datacenter-gpu", "fp16", None, "TensorRT 12.0 is not supported"),
        ("ten", "jetson-orin", "fp16", None, "cannot read TensorRT version"),
    ],
)
def test_builder_settings_refuses(version, name, precision, dla, message):
    with pytest.raises(UserError, match=message):
        builder_settings(version, target(name), precision, SHAPE, dla_core=dla)


def test_precision_must_be_one_the_target_lists():
    no_int8 = target("jetson-orin", precisions=["fp32", "fp16"])
    builder_settings("10.3", no_int8, "fp16", SHAPE)
    with pytest.raises(UserError, match="target jetson-orin does not support precision int8"):
        builder_settings("10.3", no_int8, "int8", SHAPE)


@pytest.mark.parametrize(
    "override,shape,message",
    [
        ({"batch": {"min": 4, "opt": 2, "max": 8}}, SHAPE, "min <= opt <= max"),
        ({"batch": {"min": 0, "opt": 1, "max": 8}}, SHAPE, "positive integers"),
        ({}, (3, 16), "three positive integers"),
        ({}, (3, 0, 16), "three positive integers"),
    ],
)
def test_builder_settings_refuses_bad_profiles(override, shape, message):
    with pytest.raises(UserError, match=message):
        builder_settings("10.3", target("jetson-orin", **override), "fp16", shape)


def test_parse_tensorrt_version():
    assert parse_tensorrt_version("10.3") == (10, 3)
    assert parse_tensorrt_version("11.4.0.106") == (11, 4)
    assert parse_tensorrt_version(" 10.13.2 ") == (10, 13)
    for bad in ("10", "", "v10.3", "10.x", "10.3-ea"):
        with pytest.raises(UserError):
            parse_tensorrt_version(bad)


# --------------------------------------------------------------------------------------
# Engine cache key
# --------------------------------------------------------------------------------------

ONNX_SHA = hashlib.sha256(b"model").hexdigest()


def _key(settings=None, sha=ONNX_SHA, cc="8.7", l4t="36.4.3", full=None) -> str:
    settings = settings or builder_settings("10.3", target("jetson-orin"), "int8", SHAPE)
    return engine_cache_key(settings, sha, cc, l4t, tensorrt_full_version=full)


def test_cache_key_is_deterministic():
    key = _key()
    assert len(key) == 64 and int(key, 16) >= 0
    assert _key() == key  # settings rebuilt from scratch, same inputs
    assert _key(sha=ONNX_SHA.upper()) == key  # a hex digest is case-insensitive


def _settings(**kw):
    base = {"version": "10.3", "target": target("jetson-orin"), "precision": "int8", "shape": SHAPE, "dla": None}
    base.update(kw)
    return builder_settings(base["version"], base["target"], base["precision"], base["shape"], dla_core=base["dla"])


@pytest.mark.parametrize(
    "change",
    [
        {"sha": hashlib.sha256(b"other model").hexdigest()},
        {"cc": "8.6"},
        {"l4t": "36.3.0"},
        {"l4t": None},
        {"full": "10.3.0.30"},
        {"settings": _settings(version="10.4")},
        {"settings": _settings(precision="fp16")},
        {"settings": _settings(shape=(3, 32, 32))},
        {"settings": _settings(target=target("jetson-orin", batch={"min": 1, "opt": 1, "max": 16}))},
        {"settings": _settings(dla=0)},
        {"settings": _settings(dla=1)},
        {"settings": dataclasses.replace(_settings(), workspace_mib=2048)},
        {"settings": dataclasses.replace(_settings(), timing_cache=False)},
        {"settings": dataclasses.replace(_settings(), target="jetson-agx-orin-64gb")},
    ],
    ids=["onnx", "gpu", "l4t", "no-l4t", "trt-patch", "trt-minor", "precision", "input-shape", "batch-profile",
         "dla0", "dla1", "workspace", "timing-cache", "target"],  # fmt: skip
)
def test_cache_key_changes_with_every_input(change):
    assert _key(**change) != _key()


def test_cache_key_refuses_bad_inputs():
    with pytest.raises(UserError, match="64 hex digits"):
        _key(sha="abc")
    with pytest.raises(UserError, match="compute capability"):
        _key(cc="sm_87")
    with pytest.raises(UserError, match="does not match"):
        _key(full="11.4.0.106")  # settings are for TensorRT 10.3


def test_engine_cache_path(tmp_path):
    key = _key()
    path = engine_cache_path(tmp_path / "engines", key)
    assert path == tmp_path / "engines" / f"{key}.engine"
    assert not path.parent.exists()  # a path, not a side effect
    for bad in ("../../etc/passwd", key[:-1], key.upper()):
        with pytest.raises(UserError):
            engine_cache_path(tmp_path, bad)


# --------------------------------------------------------------------------------------
# trtexec command lines
# --------------------------------------------------------------------------------------

BUILD_COMMANDS = [
    (
        ("10.3", "jetson-orin", "int8", None),
        ["--minShapes=images:1x3x16x16", "--optShapes=images:1x3x16x16", "--maxShapes=images:8x3x16x16",
         "--stronglyTyped"],
    ),
    (
        ("10.3", "jetson-orin", "fp16", None),
        ["--minShapes=images:1x3x16x16", "--optShapes=images:1x3x16x16", "--maxShapes=images:8x3x16x16", "--fp16"],
    ),
    (
        ("11.4", "datacenter-gpu", "fp16", None),
        ["--minShapes=images:1x3x16x16", "--optShapes=images:8x3x16x16", "--maxShapes=images:32x3x16x16",
         "--stronglyTyped"],
    ),
    (
        ("10.3", "jetson-orin-nano", "fp32", None),
        ["--minShapes=images:1x3x16x16", "--optShapes=images:1x3x16x16", "--maxShapes=images:4x3x16x16"],
    ),
    (
        ("10.3", "jetson-orin", "fp16", 1),
        ["--minShapes=images:1x3x16x16", "--optShapes=images:1x3x16x16", "--maxShapes=images:1x3x16x16", "--fp16"],
    ),
]


@pytest.mark.parametrize("args,middle", BUILD_COMMANDS, ids=["orin-int8", "orin-fp16", "dgpu-fp16", "nano-fp32", "orin-dla"])
def test_trtexec_build_command(args, middle):
    version, name, precision, dla = args
    s = builder_settings(version, target(name), precision, SHAPE, dla_core=dla)
    dla_flags = [] if dla is None else [f"--useDLACore={dla}", "--allowGPUFallback"]
    assert trtexec_build_command(s, "m.onnx", "m.engine", "timing.cache") == [
        "trtexec", "--onnx=m.onnx", "--saveEngine=m.engine", *middle,
        "--memPoolSize=workspace:1024M", "--timingCacheFile=timing.cache", *dla_flags,
        "--profilingVerbosity=detailed", "--skipInference",
    ]  # fmt: skip


PROFILE_TAIL = [
    "--noDataTransfers", "--useSpinWait", "--separateProfileRun", "--percentile=50,90,99",
    "--profilingVerbosity=detailed", "--exportTimes=out/m.times.json", "--exportProfile=out/m.profile.json",
    "--exportLayerInfo=out/m.layers.json",
]  # fmt: skip


def test_trtexec_profile_command_gpu_and_dla():
    gpu = builder_settings("11.4", target("datacenter-gpu"), "int8", SHAPE)
    assert trtexec_profile_command(gpu, "m.engine", "out/m") == [
        "trtexec", "--loadEngine=m.engine", "--shapes=images:8x3x16x16", "--useCudaGraph", *PROFILE_TAIL
    ]
    dla = builder_settings("10.3", target("jetson-orin"), "fp16", SHAPE, dla_core=0)
    # CUDA graphs cannot capture DLA work: dropped, and the engine's DLA core is selected.
    assert trtexec_profile_command(dla, "m.engine", "out/m") == [
        "trtexec", "--loadEngine=m.engine", "--shapes=images:1x3x16x16", "--useDLACore=0", *PROFILE_TAIL
    ]


def test_trtexec_input_names_and_timing_cache_off():
    s = builder_settings("10.3", target("jetson-orin"), "fp16", SHAPE, timing_cache=False, workspace_mib=256)
    cmd = trtexec_build_command(s, "m.onnx", "m.engine", None, input_name="input:0")
    assert "--minShapes='input:0':1x3x16x16" in cmd and "--memPoolSize=workspace:256M" in cmd
    assert not any(a.startswith("--timingCacheFile") for a in cmd)
    assert trtexec_profile_command(s, "m.engine", "p", input_name="x")[2] == "--shapes=x:1x3x16x16"
    with pytest.raises(UserError, match="no commas"):
        trtexec_build_command(s, "m.onnx", "m.engine", None, input_name="a,b")


# --------------------------------------------------------------------------------------
# ONNX precision check
# --------------------------------------------------------------------------------------


def test_check_onnx_precision(models):
    loaded = {p: onnx.load(str(path)) for p, path in models.items()}
    assert check_onnx_precision(loaded["int8"], "int8")["qdq_nodes"] == 2
    assert check_onnx_precision(loaded["fp16"], "fp16")["fp16_tensors"] > 0
    assert check_onnx_precision(loaded["fp32"], "fp32") == {"qdq_nodes": 0, "fp16_tensors": 0}
    for onnx_precision, wanted, message in [
        ("fp32", "int8", "explicit Q/DQ"),
        ("fp32", "fp16", "needs the fp16 ONNX"),
        ("fp16", "fp32", "holds fp16 tensors"),
        ("int8", "fp16", "is quantized"),
    ]:
        with pytest.raises(UserError, match=message):
            check_onnx_precision(loaded[onnx_precision], wanted)


# --------------------------------------------------------------------------------------
# Building an engine
# --------------------------------------------------------------------------------------


def test_build_engine_with_tensorrt(models, tmp_path):
    reason = tensorrt_available()
    if reason:
        pytest.skip(reason)
    import tensorrt as trt

    version = ".".join(trt.__version__.split(".")[:2])
    s = builder_settings(version, target("datacenter-gpu"), "fp16", SHAPE)
    info = build_engine(models["fp16"], s, tmp_path / "m.engine", tmp_path / "timing.cache")
    data = (tmp_path / "m.engine").read_bytes()
    assert info["engine_sha256"] == hashlib.sha256(data).hexdigest() and (tmp_path / "timing.cache").stat().st_size
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(data)
    name = engine.get_tensor_name(0)
    assert tuple(engine.get_tensor_profile_shape(name, 0)[2]) == (s.max_batch, *SHAPE)


def test_build_engine_without_tensorrt_says_why(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert tensorrt_available() == "tensorrt is not installed"
    s = builder_settings("10.3", target("jetson-orin"), "fp16", SHAPE)
    with pytest.raises(UserError, match="tensorrt is not installed; write an on-device bundle"):
        build_engine(models["fp16"], s, tmp_path / "m.engine", tmp_path / "timing.cache")
    assert not (tmp_path / "m.engine").exists()


# A stand-in for the `tensorrt` package with the API surface medkd uses. Its "engine" is
# JSON describing how the network and builder were configured.
FAKE_TENSORRT_SOURCE = '''
import json
import os

import onnx

__version__ = os.environ.get("FAKE_TENSORRT_VERSION", "10.3.0.30")


class Logger:
    ERROR, WARNING = 1, 2

    def __init__(self, severity=2):
        self.severity = severity


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = 1


class BuilderFlag:
    FP16 = "FP16"
    GPU_FALLBACK = "GPU_FALLBACK"


class DeviceType:
    GPU, DLA = "GPU", "DLA"


class MemoryPoolType:
    WORKSPACE = "WORKSPACE"


class ProfilingVerbosity:
    DETAILED = "DETAILED"


class _Tensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


class _Network:
    def __init__(self, flags):
        self.flags, self.inputs, self.num_layers = flags, [], 0

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class OnnxParser:
    """Reads the real ONNX; like TensorRT, it has no importer for ops outside the default domain."""

    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path):
        model = onnx.load(path)
        self.errors = [
            "In node %d with name: %s and operator: %s (parseNode): UNSUPPORTED_NODE: No importer registered for op: %s"
            % (i, n.name, n.op_type, n.op_type)
            for i, n in enumerate(model.graph.node) if n.domain not in ("", "ai.onnx")
        ]
        weights = {t.name for t in model.graph.initializer}
        for v in model.graph.input:
            if v.name not in weights:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
                self.network.inputs.append(_Tensor(v.name, dims))
        self.network.num_layers = len(model.graph.node)
        return not self.errors

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class _Profile:
    def set_shape(self, name, lo, opt, hi):
        self.shapes = {"input": name, "min": list(lo), "opt": list(opt), "max": list(hi)}


class _TimingCache:
    def __init__(self, data):
        self.data = data

    def serialize(self):
        return self.data + b"|timed"


class _Config:
    def __init__(self):
        self.flags, self.profiles, self.pools, self.cache = [], [], {}, None
        self.default_device_type, self.DLA_core, self.profiling_verbosity = DeviceType.GPU, -1, None

    def add_optimization_profile(self, profile):
        self.profiles.append(profile.shapes)
        return 0

    def set_flag(self, flag):
        self.flags.append(flag)

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def create_timing_cache(self, data):
        return None if data.startswith(b"corrupt") else _TimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    num_DLA_cores = int(os.environ.get("FAKE_TENSORRT_DLA_CORES", "2"))

    def __init__(self, logger):
        pass

    def create_network(self, flags=0):
        return _Network(flags)

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        return json.dumps({
            "network_flags": network.flags,
            "builder_flags": config.flags,
            "profiles": config.profiles,
            "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
            "device": config.default_device_type,
            "dla_core": config.DLA_core,
            "profiling_verbosity": config.profiling_verbosity,
            "timing_cache_in": None if config.cache is None else config.cache.data.decode(),
        }).encode()
'''


@pytest.fixture
def fake_trt(monkeypatch):
    module = types.ModuleType("tensorrt")
    module.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch probes find_spec("tensorrt")
    exec(compile(FAKE_TENSORRT_SOURCE, "fake_tensorrt.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def _fake_build(models, tmp_path, settings, precision):
    info = build_engine(models[precision], settings, tmp_path / "m.engine", tmp_path / "timing.cache")
    return info, json.loads((tmp_path / "m.engine").read_text())


STRONGLY_TYPED_FLAGS = 1 << 1  # 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED) in the fake


@pytest.mark.parametrize(
    "version,name,precision,dla,network_flags,builder_flags,device,batches",
    [
        ("10.3", "jetson-orin", "fp16", None, 0, ["FP16"], "GPU", (1, 1, 8)),
        ("10.3", "jetson-orin", "int8", None, STRONGLY_TYPED_FLAGS, [], "GPU", (1, 1, 8)),
        ("11.4", "datacenter-gpu", "fp32", None, STRONGLY_TYPED_FLAGS, [], "GPU", (1, 8, 32)),
        ("10.3", "jetson-orin", "fp16", 1, 0, ["FP16", "GPU_FALLBACK"], "DLA", (1, 1, 1)),
        ("10.3", "jetson-orin", "int8", 0, STRONGLY_TYPED_FLAGS, ["GPU_FALLBACK"], "DLA", (1, 1, 1)),
    ],
)
def test_build_engine_configures_tensorrt_as_the_settings_say(
    fake_trt, models, tmp_path, version, name, precision, dla, network_flags, builder_flags, device, batches
):
    fake_trt.__version__ = version + ".0.1"
    s = builder_settings(version, target(name), precision, SHAPE, dla_core=dla)
    assert tensorrt_available() is None
    info, engine = _fake_build(models, tmp_path, s, precision)
    assert engine["network_flags"] == network_flags
    assert engine["builder_flags"] == builder_flags
    assert engine["device"] == device and engine["dla_core"] == (-1 if dla is None else dla)
    assert engine["profiles"] == [
        {"input": "images", "min": [batches[0], *SHAPE], "opt": [batches[1], *SHAPE], "max": [batches[2], *SHAPE]}
    ]
    assert engine["workspace"] == 1024 << 20 and engine["profiling_verbosity"] == "DETAILED"
    data = (tmp_path / "m.engine").read_bytes()
    assert info["engine_sha256"] == hashlib.sha256(data).hexdigest() and info["engine_size"] == len(data)
    assert info["onnx_sha256"] == hashlib.sha256(models[precision].read_bytes()).hexdigest()
    assert info["tensorrt_version"] == version + ".0.1" and info["input_name"] == "images"


def test_build_engine_loads_and_saves_the_timing_cache(fake_trt, models, tmp_path):
    s = builder_settings("10.3", target("jetson-orin"), "fp16", SHAPE)
    _, first = _fake_build(models, tmp_path, s, "fp16")
    _, second = _fake_build(models, tmp_path, s, "fp16")
    assert (first["timing_cache_in"], second["timing_cache_in"]) == ("", "|timed")
    assert (tmp_path / "timing.cache").read_bytes() == b"|timed|timed"
    (tmp_path / "timing.cache").write_bytes(b"corrupt cache from another device")
    _, third = _fake_build(models, tmp_path, s, "fp16")
    assert third["timing_cache_in"] == ""  # a stale cache is replaced, not fatal
    off_dir = tmp_path / "off"
    off_dir.mkdir()
    _, fourth = _fake_build(models, off_dir, dataclasses.replace(s, timing_cache=False), "fp16")
    assert fourth["timing_cache_in"] is None and not (tmp_path / "off" / "timing.cache").exists()


def test_build_engine_reports_parser_errors(fake_trt, tmp_path):
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", *SHAPE])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", *SHAPE])
    node = helper.make_node("MedicalPlugin", ["images"], ["out"], name="plugin0", domain="com.example")
    graph = helper.make_graph([node], "g", [images], [out])
    path = tmp_path / "plugin.onnx"
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    s = builder_settings("10.3", target("jetson-orin"), "fp32", SHAPE)
    with pytest.raises(UserError, match="could not parse .*No importer registered for op: MedicalPlugin") as err:
        build_engine(path, s, tmp_path / "m.engine", tmp_path / "timing.cache")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "m.engine").exists()


def test_build_engine_refuses_mismatches(fake_trt, models, tmp_path, monkeypatch):
    s = builder_settings("11.4", target("jetson-orin"), "fp16", SHAPE)
    with pytest.raises(UserError, match="settings are for TensorRT 11.4 but TensorRT 10.3.0.30 is installed"):
        build_engine(models["fp16"], s, tmp_path / "m.engine", tmp_path / "t.cache")
    with pytest.raises(UserError, match="needs the fp16 ONNX"):
        fp16 = builder_settings("10.3", target("jetson-orin"), "fp16", SHAPE)
        build_engine(models["fp32"], fp16, tmp_path / "m.engine", tmp_path / "t.cache")
    monkeypatch.setattr(fake_trt.Builder, "num_DLA_cores", 1)
    dla1 = builder_settings("10.3", target("jetson-orin"), "fp16", SHAPE, dla_core=1)
    with pytest.raises(UserError, match="DLA core 1 requested but this device has 1 DLA cores"):
        build_engine(models["fp16"], dla1, tmp_path / "m.engine", tmp_path / "t.cache")
    wrong_shape = builder_settings("10.3", target("jetson-orin"), "fp16", (3, 32, 32))
    with pytest.raises(UserError, match=r"has shape \(-1, 3, 16, 16\), the settings expect N x \(3, 32, 32\)"):
        build_engine(models["fp16"], wrong_shape, tmp_path / "m.engine", tmp_path / "t.cache")
    assert not (tmp_path / "m.engine").exists()


def test_tensorrt_available_explains(fake_trt, monkeypatch):
    assert tensorrt_available() is None

    def no_gpu(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    monkeypatch.setattr(fake_trt, "Builder", no_gpu)
    assert tensorrt_available().startswith("no CUDA GPU")
    monkeypatch.delattr(fake_trt, "Builder")
    assert "lean runtime only" in tensorrt_available()


# --------------------------------------------------------------------------------------
# This machine's device kind and the engine cache
# --------------------------------------------------------------------------------------


def test_local_l4t_release(tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8\n")
    assert local_l4t_release(release) == "36.4.3"
    release.write_text("not a release line\n")
    assert local_l4t_release(release) is None
    assert local_l4t_release(tmp_path / "absent") is None


def test_local_compute_capability_falls_back_to_nvidia_smi(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    answers = iter(["8.7\n", "8.6\n9.0\n"])

    def nvidia_smi(cmd, **kwargs):
        assert cmd[:2] == ["nvidia-smi", "--query-gpu=compute_cap"]
        return types.SimpleNamespace(stdout=next(answers))

    monkeypatch.setattr(trt_module.subprocess, "run", nvidia_smi)
    assert local_compute_capability() == "8.7"
    assert local_compute_capability() is None  # two different GPUs: which one TensorRT uses is unclear

    def missing(cmd, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(trt_module.subprocess, "run", missing)
    assert local_compute_capability() is None


@pytest.fixture
def on_orin(fake_trt, monkeypatch):
    """This machine pretends to be a Jetson AGX Orin on JetPack 6.2 (TensorRT 10.3)."""
    device = {"cc": "8.7", "l4t": "36.4.3"}
    monkeypatch.setattr(trt_module, "local_compute_capability", lambda: device["cc"])
    monkeypatch.setattr(trt_module, "local_l4t_release", lambda: device["l4t"])
    return device


def test_gpu_mismatch(on_orin, fake_trt):
    assert gpu_mismatch(target("jetson-orin")) is None
    assert gpu_mismatch(target("datacenter-gpu")) == "this GPU has compute capability 8.7, target datacenter-gpu has 9.0"
    fake_trt.__version__ = "10.7.0.23"
    assert gpu_mismatch(target("jetson-orin")) == "TensorRT 10.7.0.23 is installed, target jetson-orin deploys TensorRT 10.3"
    on_orin["l4t"] = None
    assert gpu_mismatch(target("jetson-orin")) == "target jetson-orin is a Jetson (JetPack 6.2) and this machine is not"
    on_orin["cc"] = None
    assert gpu_mismatch(target("jetson-orin")) == "cannot read this machine's GPU compute capability"


def test_build_engine_cached_reuses_only_same_device_kind(on_orin, models, tmp_path, monkeypatch):
    builds = []
    real_build = trt_module.trt_build_serialized
    monkeypatch.setattr(trt_module, "trt_build_serialized", lambda *a: builds.append(a[2]) or real_build(*a))
    s = builder_settings("10.3", target("jetson-orin"), "int8", SHAPE)
    cache = tmp_path / "engines"

    first = build_engine_cached(models["int8"], s, tmp_path / "a.engine", cache)
    second = build_engine_cached(models["int8"], s, tmp_path / "b.engine", cache)
    assert (first["cache_hit"], second["cache_hit"], len(builds)) == (False, True, 1)
    assert first["cache_key"] == second["cache_key"]
    assert (tmp_path / "a.engine").read_bytes() == (tmp_path / "b.engine").read_bytes()
    assert second["engine_sha256"] == hashlib.sha256((tmp_path / "b.engine").read_bytes()).hexdigest()
    assert (cache / "timing-sm8.7-trt10.3.0.30-l4t36.4.3.cache").is_file()

    on_orin["cc"] = "8.6"  # another GPU model: its own engine, never the 8.7 one
    third = build_engine_cached(models["int8"], s, tmp_path / "c.engine", cache)
    assert (third["cache_hit"], len(builds)) == (False, 2) and third["cache_key"] != first["cache_key"]
    on_orin["cc"] = None
    with pytest.raises(UserError, match="compute capability"):
        build_engine_cached(models["int8"], s, tmp_path / "d.engine", cache)


def test_pipeline_builds_an_engine_and_embeds_it_where_tensorrt_is_present(on_orin, fake_trt, tmp_path):
    """With TensorRT and a matching GPU (here the fake TensorRT on a pretend Orin), the
    export builds the engine instead of a bundle and the firmware carries the engine."""
    from medkd.export.firmware import read_firmware_blob
    from medkd.toolchain.config import load_config
    from medkd.toolchain.pipeline import run

    report = run(load_config([
        "recipe=scratch", "target=jetson-orin", "export.precision=fp16", "data.max_train=64", "data.max_test=32",
        "train.epochs=1", "train.batch_size=32", "export.latency_runs=2", "export.latency_warmup=0",
        "export.latency_batches=[1]", "export.latency_threads=[1]", "progress=false",
        f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
        f"export.engine_cache_dir={tmp_path / 'engines'}",
    ]))
    run_dir = tmp_path / "run"
    model = report["export"]["models"]["model"]
    assert model["deployed_file"] == "model.engine" and "bundle" not in model["formats"]
    assert report["target"]["engine_built"] is True and not (run_dir / "bundle").exists()
    engine = json.loads((run_dir / "model.engine").read_text())  # the fake records its build settings
    assert engine["builder_flags"] == ["FP16"] and engine["profiles"][0]["max"][0] == 8
    header, payload = read_firmware_blob(run_dir / "firmware" / "medkd_model.bin")
    assert header["kind"] == "tensorrt-engine" and payload == (run_dir / "model.engine").read_bytes()
    assert "TensorRT engine: model.engine" in (run_dir / "report.md").read_text()
