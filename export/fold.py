"""Fold BatchNorm layers into the convolution that feeds them.

In eval mode a BatchNorm is a fixed per-channel affine map ``y = s * x + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - s * running_mean``. When its
input is the output of a convolution (and nothing else reads that output) the map can
be baked into the convolution: ``W' = s * W`` (per output channel), ``b' = s * b + t``.
The BatchNorm is then replaced by ``nn.Identity`` — or, for timm's ``BatchNormAct2d``,
which applies dropout + activation after normalising, by that activation (and dropout,
if it is not an identity), so the forward pass computes the same function.

How conv→BN pairs are found (the design choice)
-----------------------------------------------
We use the *dataflow* of the forward pass, obtained with ``torch.fx`` symbolic tracing,
rather than pattern-matching the order in which children are registered. Registration
order says nothing about how ``forward`` wires modules together (timm's ResNet
``BasicBlock`` registers ``conv1, bn1, drop_block, act1, aa, conv2, bn2`` but a block
could just as well apply them in another order, share a conv, or read the conv output
twice, e.g. for a residual). With fx we fold a pair only when the graph proves it safe:

* the BN node's input is exactly the conv node's output, and that output has no other
  user (otherwise the other reader would see the scaled values);
* the conv and the BN module are each called exactly once (a shared module would be
  changed for its other call sites too);
* the conv is a plain ``nn.Conv1d/2d/3d`` (or timm's padding-only ``Conv2dSame``) —
  subclasses such as timm's ``StdConv2d`` re-standardise their weight in ``forward`` and
  cannot absorb a scale;
* the BN is a plain ``nn.BatchNorm1d/2d/3d``/``nn.SyncBatchNorm`` or timm's
  ``BatchNormAct2d``/``SyncBatchNormAct`` with running statistics (a BN without running
  stats normalises with batch statistics even in eval and is not a fixed affine map).

The tracer treats every BatchNorm and convolution as a leaf (timm's ``BatchNormAct2d``
lives outside ``torch.nn`` and would otherwise be traced through) and honours timm's own
"do not trace" registrations. The timm students (resnet18, mobilenetv3, vit) trace
cleanly. If the whole model does not trace (data-dependent control flow in some custom
wrapper), we trace its children one by one, recursively; BNs inside a part that cannot be
traced are left in place and reported as unfolded — never folded on a guess.
(Caveat of that fallback: it assumes a parent calls such a child through the child's own
``forward``.)

Anything not folded is counted and named, with the reason, in :class:`FoldStats`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = ["FoldStats", "fold_batchnorm", "fold_batchnorm_with_stats", "count_batchnorm"]


def _timm_types(*names: str) -> tuple[type, ...]:
    try:
        import timm.layers as tl
    except ImportError:  # timm is a dependency, but folding does not need it
        return ()
    return tuple(getattr(tl, n) for n in names if hasattr(tl, n))


# Convolutions whose forward uses `self.weight`/`self.bias` as stored (no re-parametrisation).
_FOLDABLE_CONVS: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d) + _timm_types(
    "Conv2dSame", "Conv2dSameExport"
)
# BatchNorms whose eval forward is exactly the running-stats affine map ...
_PLAIN_BNS: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# ... and those that follow it with `self.drop` then `self.act` (timm norm+act layers).
_ACT_BNS: tuple[type, ...] = _timm_types("BatchNormAct2d", "SyncBatchNormAct")


@dataclass
class FoldStats:
    """What :func:`fold_batchnorm_with_stats` did.

    ``folded`` lists ``(conv_name, bn_name)`` pairs; ``unfolded`` maps the name of every
    BatchNorm still present in the returned model to the reason it was kept.
    """

    folded: list[tuple[str, str]] = field(default_factory=list)
    unfolded: dict[str, str] = field(default_factory=dict)

    @property
    def num_folded(self) -> int:
        return len(self.folded)

    @property
    def num_unfolded(self) -> int:
        return len(self.unfolded)

    def as_dict(self) -> dict:
        """JSON-friendly summary (for the run report's ``export`` section)."""
        return {
            "bn_folded": self.num_folded,
            "bn_unfolded": self.num_unfolded,
            "unfolded": dict(self.unfolded),
        }


def count_batchnorm(model: nn.Module) -> int:
    """Number of BatchNorm modules (any ``_BatchNorm`` subclass) in ``model``."""
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps convs and BatchNorms (incl. timm's) as single call_module nodes."""

    def __init__(self) -> None:
        leaf: tuple[type, ...] = ()
        autowrap: tuple = ()
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules

            leaf = tuple(get_notrace_modules())
            autowrap = tuple(f for f in get_notrace_functions() if callable(f))
        except ImportError:
            pass
        super().__init__(autowrap_functions=autowrap)
        self._extra_leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (_BatchNorm, _ConvNd)):
            return True
        if self._extra_leaf and isinstance(m, self._extra_leaf):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace_graphs(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module, fx.Graph]]) -> None:
    """Trace `module`; if that fails, trace its children instead (recursively)."""
    try:
        graph = _LeafTracer().trace(module)
    except Exception:  # noqa: BLE001 - any tracing failure just means "look deeper"
        for name, child in module.named_children():
            if isinstance(child, (_BatchNorm, _ConvNd)):
                continue  # a lone leaf has no internal conv→BN dataflow
            _trace_graphs(child, f"{prefix}{name}.", out)
        return
    out.append((prefix, module, graph))


def _fold_into_conv(conv: _ConvNd, bn: _BatchNorm) -> None:
    """Scale conv weight / shift conv bias in place (computed in float64)."""
    w = conv.weight.detach()
    dtype = w.dtype
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    new_w = w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = (bias - mean) * scale + beta
    conv.weight = nn.Parameter(new_w.to(dtype), requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(new_b.to(dtype), requires_grad=conv.weight.requires_grad)


def _bn_replacement(bn: _BatchNorm) -> nn.Module:
    if type(bn) in _ACT_BNS:
        drop = getattr(bn, "drop", nn.Identity())
        act = getattr(bn, "act", nn.Identity())
        if isinstance(drop, nn.Identity):
            return act
        return nn.Sequential(drop, act)
    return nn.Identity()


def _set_submodule(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, attr = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _why_not_foldable(conv: nn.Module, bn: nn.Module) -> str | None:
    if type(bn) not in _PLAIN_BNS + _ACT_BNS:  # exact types: a subclass may change forward
        return f"{type(bn).__name__} is not a BatchNorm type known to be foldable"
    if bn.running_mean is None or bn.running_var is None:
        return "BatchNorm has no running statistics (uses batch statistics in eval)"
    if type(conv) not in _FOLDABLE_CONVS:
        return f"producer {type(conv).__name__} is not a plain convolution"
    if conv.out_channels != bn.num_features:
        return "conv out_channels != BatchNorm num_features"
    return None


def fold_batchnorm_with_stats(model: nn.Module) -> tuple[nn.Module, FoldStats]:
    """Return an eval-mode deep copy of `model` with conv→BN pairs folded, plus stats.

    `model` itself is not modified. See the module docstring for the exact rules.
    """
    folded_model = copy.deepcopy(model).eval()
    graphs: list[tuple[str, nn.Module, fx.Graph]] = []
    _trace_graphs(folded_model, "", graphs)

    # How often each module object is called across all traced graphs.
    calls: dict[int, int] = {}
    for _, root, graph in graphs:
        for node in graph.nodes:
            if node.op == "call_module":
                mod = root.get_submodule(node.target)
                calls[id(mod)] = calls.get(id(mod), 0) + 1

    stats = FoldStats()
    reasons: dict[int, str] = {}
    done: set[int] = set()
    to_fold: list[tuple[str, str, _ConvNd, _BatchNorm]] = []
    for prefix, root, graph in graphs:
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            bn = root.get_submodule(node.target)
            if not isinstance(bn, _BatchNorm) or id(bn) in done:
                continue
            src = node.args[0] if node.args else None
            if len(node.args) != 1 or node.kwargs or not isinstance(src, fx.Node):
                reasons[id(bn)] = "unexpected call signature"
                continue
            if src.op != "call_module":
                reasons[id(bn)] = "input is not produced by a convolution module"
                continue
            conv = root.get_submodule(src.target)
            if not isinstance(conv, _ConvNd):
                reasons[id(bn)] = f"input is produced by {type(conv).__name__}, not a convolution"
                continue
            if len(src.users) != 1:
                reasons[id(bn)] = "the conv output is also used elsewhere"
                continue
            if calls.get(id(conv), 0) != 1 or calls.get(id(bn), 0) != 1:
                reasons[id(bn)] = "conv or BatchNorm module is called more than once"
                continue
            why = _why_not_foldable(conv, bn)
            if why is not None:
                reasons[id(bn)] = why
                continue
            done.add(id(bn))
            to_fold.append((prefix + src.target, prefix + node.target, conv, bn))

    for conv_name, bn_name, conv, bn in to_fold:
        _fold_into_conv(conv, bn)
        _set_submodule(folded_model, bn_name, _bn_replacement(bn))
        stats.folded.append((conv_name, bn_name))

    for name, mod in folded_model.named_modules():
        if isinstance(mod, _BatchNorm):
            stats.unfolded[name] = reasons.get(id(mod), "not reached by a traceable forward")
    folded_model.eval()
    return folded_model, stats


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Eval-mode deep copy of `model` with every conv→BatchNorm pair folded into the conv.

    Use :func:`fold_batchnorm_with_stats` to also get how many BNs were folded / kept.
    """
    return fold_batchnorm_with_stats(model)[0]
