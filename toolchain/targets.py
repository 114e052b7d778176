"""Deployment targets: what each `target=` means and what this build produced for it."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def target_summary(cfg: DictConfig, export: dict) -> dict:
    """The target's settings plus, per deployable, what is ready and what is left to do on the device."""
    summary = OmegaConf.to_container(cfg)
    remaining, built = [], False
    for name, model in export["models"].items():
        formats = model["formats"]
        if "tensorrt" in formats:
            built = True
        elif "bundle" in formats:
            remaining.append(
                f"{name}: TensorRT is not installed on the build host, so no engine was built. Copy "
                f"{formats['bundle']['path']} to the {cfg.name} and run build_engine.sh there, then "
                "`medkd-profile RUN_DIR <trtexec JSON files>` to add on-device latency to this report."
            )
    summary["engine_built"] = built
    if cfg.runtime == "onnxruntime":
        remaining.append("nothing: the deployed ONNX model runs as-is with ONNX Runtime")
    summary["remaining"] = remaining
    return summary
