"""Deployment targets: what each `target=` means and what this build produced for it."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def target_summary(cfg: DictConfig) -> dict:
    summary = OmegaConf.to_container(cfg)
    if cfg.runtime == "tensorrt":
        # Engine building lands with the TensorRT/firmware work; say so rather than pretend.
        summary["status"] = (
            "ONNX exported and packed as a firmware container (firmware/medkd_model.bin, ONNX "
            "payload); TensorRT engine not built yet (planned: export/tensorrt). Build it on the "
            "device with `trtexec --onnx=model.onnx --fp16 --saveEngine=model.engine`."
        )
        summary["engine_built"] = False
    else:
        summary["status"] = "ONNX Runtime model ready"
        summary["engine_built"] = False
    return summary
