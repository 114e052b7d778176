"""What a quantized graph holds: which weighted nodes run in int8 and which do not."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

# Nodes whose weights decide the model's size and most of its compute.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class QuantizeResult:
    path: Path
    preset: str
    library: str  # e.g. "nvidia-modelopt 0.47.0"
    method: str | None = None
    # node name -> why it stays in high precision
    unquantized: dict[str, str] = field(default_factory=dict)
    quantized: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"path": str(self.path), "preset": self.preset, "library": self.library,
                "calibration_method": self.method, "quantized_nodes": len(self.quantized),
                "unquantized": dict(self.unquantized)}


def weighted_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in WEIGHTED_OPS]


def classifier_node(model: onnx.ModelProto) -> str | None:
    """The weighted node nearest the graph output (the logits layer), by walking back."""
    producers = {out: n for n in model.graph.node for out in n.output}
    frontier = [o.name for o in model.graph.output]
    seen: set[str] = set()
    while frontier:
        name = frontier.pop(0)
        node = producers.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in WEIGHTED_OPS:
            return node.name
        frontier.extend(node.input)
    return None


def int8_weight_status(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(quantized, unquantized) weighted node names: quantized = weight comes from a DequantizeLinear."""
    producers = {out: n for n in model.graph.node for out in n.output}
    quantized, unquantized = [], []
    for node in weighted_nodes(model):
        weight = node.input[1] if len(node.input) > 1 else ""
        src = producers.get(weight)
        while src is not None and src.op_type in ("Identity", "Cast", "Transpose", "Reshape"):
            src = producers.get(src.input[0])
        (quantized if src is not None and src.op_type == "DequantizeLinear" else unquantized).append(node.name)
    return quantized, unquantized


def describe(path: Path, preset: str, library: str, method: str | None, reasons: dict[str, str]) -> QuantizeResult:
    """Inspect the written model; every unquantized weighted node gets a reason."""
    model = onnx.load(str(path), load_external_data=False)
    quantized, unquantized = int8_weight_status(model)
    return QuantizeResult(
        path=path, preset=preset, library=library, method=method, quantized=quantized,
        unquantized={n: reasons.get(n, "left in high precision by the quantizer (no int8 kernel pattern)") for n in unquantized},
    )
