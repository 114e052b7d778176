"""Fused Triton kernels used by the recipes, each beside its PyTorch reference.

Public ops (the recipes call these, never a backend directly):

* ``lowrank_expert_linear(x, task_ids, weight, bias, lora_A, lora_B, scale=1.0, *, backend="auto")``
  -- ``x W0^T + s (x A_t^T) B_t^T + b`` with a per-row expert t (LoRKD; T=1 is LoRA).
* ``LowRankExpertLinear`` -- the nn.Module around it, with ``fuse(task) -> nn.Linear``.
* ``cka_loss(x, y, eps=1e-12, *, backend="auto")`` -- ``1 - linear CKA(x, y)``.

``backend``: "auto" runs the Triton kernels on CUDA tensors (and on CPU tensors when
TRITON_INTERPRET=1, which is how the tests run them) and the PyTorch reference
otherwise; "triton" / "torch" force one. The references are exported for tests and
benchmarks: ``lowrank_expert_linear_reference``, ``cka_loss_reference``.
"""

from ._dispatch import BACKENDS, interpret_enabled, resolve_backend, triton_available
from .cka import DEFAULT_EPS as CKA_DEFAULT_EPS
from .cka import cka_loss, cka_loss_reference
from .lowrank_expert_linear import (
    LowRankExpertLinear,
    lowrank_expert_linear,
    lowrank_expert_linear_reference,
)

__all__ = [
    "BACKENDS",
    "CKA_DEFAULT_EPS",
    "LowRankExpertLinear",
    "cka_loss",
    "cka_loss_reference",
    "interpret_enabled",
    "lowrank_expert_linear",
    "lowrank_expert_linear_reference",
    "resolve_backend",
    "triton_available",
]
