"""Backend choice shared by the fused kernels.

Every public op in ``medkd.kernels`` takes ``backend="auto" | "triton" | "torch"``:

* ``"auto"``   -- the Triton kernels for CUDA tensors; the PyTorch reference elsewhere
  (CPU), except that ``TRITON_INTERPRET=1`` routes CPU tensors through the Triton
  kernels too (triton's numpy interpreter; that is how the tests exercise them).
* ``"triton"`` -- force the kernels (CUDA tensors, or any tensors under TRITON_INTERPRET=1).
* ``"torch"``  -- force the pure-PyTorch reference (autograd does the backward).

Triton is optional: without it, ``"auto"`` always picks the reference.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (e.g. macOS) still get the references.
    triton = None
    tl = None

BACKENDS = ("auto", "triton", "torch")

# torch.library namespace of the kernels' custom ops: torch.ops.medkd.<op>.
OP_NAMESPACE = "medkd"


def triton_available() -> bool:
    return triton is not None


@torch.compiler.assume_constant_result
def interpret_enabled() -> bool:
    """True when TRITON_INTERPRET asks triton to run kernels in its CPU interpreter.

    Read at every call (not cached at import): the tests set it per test. torch.compile
    takes it as a constant of the traced graph (dynamo cannot trace triton's C getenv);
    the backend of a compiled graph is fixed when it is traced, like its shapes.
    """
    if triton is None:
        return False
    return bool(triton.knobs.runtime.interpret)


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map the user's ``backend`` keyword to the backend that runs: "triton" or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    usable = triton is not None and (on_cuda or interpret_enabled())
    if backend == "triton" and not usable:
        why = "triton is not installed" if triton is None else (
            "the tensors are not on a CUDA device and TRITON_INTERPRET=1 is not set")
        raise RuntimeError(f"backend='triton' cannot run here: {why}")
    return "triton" if usable else "torch"


# The backend each op last ran, e.g. {"cka": "triton"}: written by the ops at dispatch
# (plain Python, no tensor touched, so no host sync), read by the training loop to log
# once per run which backend actually ran.
_backends_run: dict[str, str] = {}


def note_backend(op: str, chosen: str) -> None:
    _backends_run[op] = chosen


def backends_run() -> dict[str, str]:
    """{op: "triton" | "torch"} for every op run since the last reset_backends_run()."""
    return dict(_backends_run)


def reset_backends_run() -> None:
    _backends_run.clear()


class LazyKernel:
    """A Triton kernel function that is decorated with ``triton.jit`` on first launch.

    triton 3.8 decides *when ``@triton.jit`` runs* whether a kernel is compiled or
    interpreted (``knobs.runtime.interpret`` is read in the decorator). Decorating at
    import would freeze the mode of whichever code imported ``medkd.kernels`` first, so a
    test module that sets TRITON_INTERPRET=1 after another module imported the package
    would get GPU-only kernels. We keep one decorated copy per mode instead.

    The same freeze hits triton's own ``@jit``-written standard library (``tl.zeros``,
    ``tl.cdiv``, ``tl.sum``, ``tl.cumsum``, ...): those are decorated when ``triton`` is
    imported. So kernels behind this wrapper call only triton *builtins* (``tl.full``,
    ``tl.load``, ``tl.dot``, ``tl.reduce`` ... -- ``tl.core.is_builtin`` is true for
    them), which the interpreter patches at launch, reduce with ``combine_add`` below,
    and have no ``@triton.jit`` helpers of their own.
    """

    def __init__(self, fn):
        self.fn = fn
        self._by_mode: dict[bool, object] = {}
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def jitted(self):
        mode = interpret_enabled()
        kernel = self._by_mode.get(mode)
        if kernel is None:
            kernel = self._by_mode[mode] = triton.jit(self.fn)
        return kernel

    def __getitem__(self, grid):
        return self.jitted()[grid]


lazy_kernel = LazyKernel  # used as the decorator: @lazy_kernel


def _add(a, b):
    return a + b


# Combine function for tl.reduce / tl.associative_scan (sums, prefix sums) inside the
# lazily decorated kernels. Built as a JITFunction once, whatever the mode: compiled
# kernels inline it, and triton's interpreter evaluates combine functions through their
# ``.fn`` (plain Python), so it works both ways -- unlike tl.sum / tl.cumsum (see above).
combine_add = triton.runtime.jit.JITFunction(_add) if triton is not None else None


def dot_dtype(dtype: torch.dtype):
    """Operand dtype for ``tl.dot``: the input dtype (tensor cores, fp32 accumulate).

    Exception: triton's interpreter stores bfloat16 as raw uint16 and multiplies the bit
    patterns in ``tl.dot`` (triton-lang/triton#11584, "not supported yet"), so under
    TRITON_INTERPRET bf16 operands are widened to fp32. On a GPU this is never taken.
    """
    if dtype == torch.bfloat16 and interpret_enabled():
        return tl.float32
    return triton_dtype(dtype)


def triton_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def fp32_dot_precision() -> str:
    """``tl.dot`` precision for fp32 operands, following PyTorch's own matmul setting, so
    the kernels are exactly as (im)precise as the cuBLAS GEMM they replace: TF32 only
    when ``torch.backends.cuda.matmul.allow_tf32`` is on."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (a small stand-in under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_PTR_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
              torch.int32: "*i32", torch.int64: "*i64"}


def compile_for_gpu(kernel: LazyKernel, *, capability: int = 90, num_warps: int = 4,
                    num_stages: int = 3, **args):
    """Compile ``kernel`` ahead of time for an NVIDIA GPU of compute ``capability``.

    Needs no GPU (triton ships ptxas), so a CPU machine can prove that the GPU path
    lowers all the way to a cubin, and inspect it (shared memory, software pipelining,
    wgmma). ``args`` gives every kernel argument by name: tensors stand for pointers
    (only their dtype matters; assumed 16-byte aligned like torch allocations), ints and
    floats for scalars (ints divisible by 16 get the alignment hint the JIT would give),
    constexpr arguments their values. Returns triton's CompiledKernel.
    """
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(kernel.fn)  # compiled form, whatever TRITON_INTERPRET says
    names = list(inspect.signature(kernel.fn).parameters)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = args[name]
        if fn.params[i].is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = _PTR_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


__all__ = [
    "BACKENDS", "OP_NAMESPACE", "LazyKernel", "lazy_kernel", "resolve_backend", "interpret_enabled",
    "triton_available", "dot_dtype", "fp32_dot_precision", "num_sms", "next_power_of_2",
    "cdiv", "SUPPORTED_DTYPES", "compile_for_gpu", "combine_add", "triton_dtype",
    "note_backend", "backends_run", "reset_backends_run",
]
