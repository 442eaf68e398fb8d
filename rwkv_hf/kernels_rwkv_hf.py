"""CUDA WKV kernels for RWKV-4, RWKV-5.2/6 and RWKV-7: lazy build, loading and autograd wrappers.

``ops_rwkv_hf`` imports this module inside ``try:`` and dispatches CUDA tensors to ``wkv4_cuda``,
``wkv5_cuda`` and ``wkv7_cuda`` when ``cuda_wkv_available()`` says the extension is usable. Importing the
module never compiles anything; the extension is built with ``torch.utils.cpp_extension.load`` (ninja) on
the first call of ``cuda_wkv_available()`` (or ``build_extension()``) and cached on disk.

Contract (identical to the ``*_recurrent`` reference ops, see ``ops_rwkv_hf``):

* ``wkv4_cuda(w, u, k, v, state)``: ``w = -exp(time_decay)`` and ``u`` [C], ``k, v`` [B,T,C],
  ``state`` [B,3,C] = (aa, bb, pp).
* ``wkv5_cuda(r, k, v, log_w, u, state)``: ``r, k, v`` [B,T,H,N], ``log_w`` [B,T,H,N] or anything that
  broadcasts to it (a per-channel constant is read in place, never materialised), ``u`` [H,N],
  ``state`` [B,H,N(key),N(value)].
* ``wkv7_cuda(r, log_w, k, v, a, b, state)``: all [B,T,H,N], ``state`` [B,H,N(value),N(key)].

Each returns ``(y, new_state)``, both fp32; the caller's ``state`` is never written. Inputs may be fp32,
fp16 or bf16 (mixed input dtypes are computed in fp32); decays, bonuses and states are used in fp32, and
all maths is fp32. With autograd enabled the ops are ``torch.autograd.Function``s whose backward returns
gradients for every tensor input, the initial state included (state tuning). Supported head sizes are 64
and 128; another head size falls back (with one warning) to the PyTorch forms of ``ops_rwkv_hf``.

The ops launch on the current CUDA stream, never synchronise with the host and allocate only their
outputs (plus the checkpoints a backward needs), so they can be captured in CUDA graphs.

Environment:

* ``RWKV_HF_KERNEL_DIR``: folder holding the ``.cu``/``.cpp`` sources (default: ``rwkv_hf/kernels`` of an
  installed package, else the repository's top-level ``kernels/``).
* ``RWKV_HF_KERNEL_CACHE``: build cache root (default ``$TORCH_EXTENSIONS_DIR/rwkv_hf`` when that is set,
  else ``$XDG_CACHE_HOME/rwkv_hf/kernels`` = ``~/.cache/rwkv_hf/kernels``). Each build lives in a folder
  named by a hash of the sources, torch and CUDA versions, target archs, flags and Python version, so a
  change of any of them builds anew and an unchanged setup loads the cached library without compiling.
* ``RWKV_HF_WKV_BACKEND``: ``torch`` makes ``ops_rwkv_hf`` skip the kernels; ``cuda`` makes a failed build
  raise instead of warning and falling back.
* ``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS``, ``CUDA_HOME``: as for any torch extension.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_SIZES",
    "build_extension",
    "cuda_wkv_available",
    "kernel_cache_root",
    "kernel_source_dir",
    "wkv4_cuda",
    "wkv5_cuda",
    "wkv7_cuda",
]

KERNEL_SOURCES = ("wkv_ops.cpp", "wkv4.cu", "wkv5.cu", "wkv7.cu")
KERNEL_HEADERS = ("wkv_common.cuh", "wkv_launchers.h", "wkv_host_emu.h")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_SIZES = (64, 128)
NVCC_FLAGS = ("-O3", "-Xptxas=-O3", "--extra-device-vectorization")
CXX_FLAGS = ("-O3",)
EMU_CXX_FLAGS = ("-O2", "-fno-strict-aliasing", "-DWKV_HOST_EMU", "-pthread", "-Wno-unknown-pragmas")

_lock = threading.Lock()
_ext = None  # the CUDA extension module, once built
_available: Optional[bool] = None  # cached answer of cuda_wkv_available()
_emu_ext = None  # the host-emulation extension (tests only)
_warned: set = set()


# ---------------------------------------------------------------------------------------------------------
# Sources, cache and build
# ---------------------------------------------------------------------------------------------------------


def kernel_source_dir() -> Optional[Path]:
    """The folder holding the kernel sources, or None when they are not shipped with this copy."""
    here = Path(__file__).resolve().parent
    candidates = []
    if os.environ.get("RWKV_HF_KERNEL_DIR"):
        candidates.append(Path(os.environ["RWKV_HF_KERNEL_DIR"]))
    candidates += [here / "kernels", here.parent / "kernels"]
    for folder in candidates:
        if all((folder / name).is_file() for name in KERNEL_SOURCES + KERNEL_HEADERS):
            return folder
    return None


def kernel_cache_root() -> Path:
    if os.environ.get("RWKV_HF_KERNEL_CACHE"):
        return Path(os.environ["RWKV_HF_KERNEL_CACHE"]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "rwkv_hf"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "rwkv_hf" / "kernels"


def _arch_list() -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return ""


def _build_key(src: Path, host_emulation: bool) -> str:
    h = hashlib.sha256()
    for name in KERNEL_SOURCES + KERNEL_HEADERS:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    parts = [
        torch.__version__,
        str(torch.version.cuda),
        "" if host_emulation else _arch_list(),
        " ".join(EMU_CXX_FLAGS if host_emulation else NVCC_FLAGS + CXX_FLAGS),
        f"{sys.implementation.cache_tag}-{sys.platform}",
        "emu" if host_emulation else "cuda",
    ]
    h.update("\n".join(parts).encode())
    return h.hexdigest()[:16]


def _load(host_emulation: bool, verbose: bool):
    from torch.utils.cpp_extension import load

    src = kernel_source_dir()
    if src is None:
        raise RuntimeError(
            "the WKV kernel sources (kernels/*.cu, *.cpp) were not found next to rwkv_hf; set RWKV_HF_KERNEL_DIR"
        )
    key = _build_key(src, host_emulation)
    name = f"rwkv_hf_wkv_{'emu_' if host_emulation else ''}{key}"
    build_dir = kernel_cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if host_emulation:
        # One translation unit that compiles the binding and the kernel sources as host C++.
        unit = build_dir / "wkv_host_emulation.cpp"
        text = "".join(f'#include "{(src / n).as_posix()}"\n' for n in KERNEL_SOURCES)
        if not unit.is_file() or unit.read_text() != text:
            unit.write_text(text)
        return load(
            name=name,
            sources=[str(unit)],
            extra_cflags=list(EMU_CXX_FLAGS),
            extra_ldflags=["-pthread"],
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            verbose=verbose,
            with_cuda=False,
        )
    return load(
        name=name,
        sources=[str(src / n) for n in KERNEL_SOURCES],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS),
        extra_include_paths=[str(src)],
        build_directory=str(build_dir),
        verbose=verbose,
        with_cuda=True,
    )


def _unavailable_reason() -> Optional[str]:
    if torch.version.hip is not None:
        return "ROCm builds of torch are not supported by these kernels"
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) was found; install it or set CUDA_HOME"
    if kernel_source_dir() is None:
        return "the kernel sources are not shipped with this copy of rwkv_hf"
    return None


def build_extension(verbose: bool = False):
    """Build (or load from the cache) the CUDA extension and return it; raises with the reason on failure."""
    global _ext, _available
    with _lock:
        if _ext is not None:
            return _ext
        reason = _unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"rwkv_hf WKV CUDA kernels cannot be built: {reason}")
        _ext = _load(host_emulation=False, verbose=verbose)
        _available = True
        return _ext


def cuda_wkv_available() -> bool:
    """True when CUDA is usable and the WKV extension is built (building it on the first call).

    Without CUDA, without a compiler, or when the build fails: one warning, then False (cached), and the
    ops run in PyTorch. ``RWKV_HF_WKV_BACKEND=cuda`` turns the failure into an exception.
    """
    global _available
    if _available is not None:
        return _available
    try:
        build_extension()
    except Exception as err:  # noqa: BLE001 - any failure means "use the PyTorch path"
        if os.environ.get("RWKV_HF_WKV_BACKEND") == "cuda":
            raise
        with _lock:
            if _available is None:
                warnings.warn(
                    f"rwkv_hf: the WKV CUDA kernels are not available ({err}); using the PyTorch implementation.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _available = False
    return bool(_available)


def _host_emulation_extension(verbose: bool = False):
    """The kernels compiled as host C++ that runs each CUDA block's threads on the CPU (for tests only)."""
    global _emu_ext
    with _lock:
        if _emu_ext is None:
            _emu_ext = _load(host_emulation=True, verbose=verbose)
        return _emu_ext


def _cuda_ext():
    if _ext is None and not cuda_wkv_available():
        raise RuntimeError("rwkv_hf WKV CUDA kernels are not available (see the warning above)")
    return _ext


# ---------------------------------------------------------------------------------------------------------
# Argument handling
# ---------------------------------------------------------------------------------------------------------


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _check_devices(op: str, ext, named: Sequence[Tuple[str, torch.Tensor]]) -> None:
    emulated = bool(getattr(ext, "host_emulation", False))
    device = named[0][1].device
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if emulated:
            if t.device.type != "cpu":
                raise ValueError(f"{op} (host emulation): {name} must be on the CPU, got {t.device}")
        elif t.device.type != "cuda":
            raise ValueError(f"{op}: {name} must be a CUDA tensor, got a tensor on {t.device}")
        if t.device != device:
            raise ValueError(f"{op}: all inputs must be on one device; {name} is on {t.device}, not {device}")


def _compute_dtype(op: str, named: Sequence[Tuple[str, torch.Tensor]]) -> torch.dtype:
    """The element type the kernel reads the main inputs in: theirs when they agree, else fp32."""
    for name, t in named:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    dtypes = {t.dtype for _, t in named}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _check_float(op: str, named: Sequence[Tuple[str, torch.Tensor]]) -> None:
    for name, t in named:
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _fit_grad(g: torch.Tensor, like: Tuple[torch.Size, torch.dtype]) -> torch.Tensor:
    """A gradient computed for the broadcast shape, brought back to the (shape, dtype) of the input."""
    shape, dtype = like
    if g.shape != shape:
        g = g.reshape(shape) if g.numel() == shape.numel() else g.sum_to_size(shape)
    return g.to(dtype)


def _grad_or_zeros(g: Optional[torch.Tensor], shape, device) -> torch.Tensor:
    if g is None:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    return g.float().contiguous()


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _fallback(op: str, head_size: int) -> None:
    _warn_once(
        f"{op}-{head_size}",
        f"rwkv_hf {op}: head size {head_size} has no CUDA kernel (supported: "
        f"{', '.join(map(str, SUPPORTED_HEAD_SIZES))}); using the PyTorch implementation.",
    )


# ---------------------------------------------------------------------------------------------------------
# RWKV-4
# ---------------------------------------------------------------------------------------------------------


def _wkv4_prepare(w, u, k, v, state):
    B, T, C = k.shape
    dtype = _compute_dtype("wkv4", [("k", k), ("v", v)])
    kc, vc = k.to(dtype).contiguous(), v.to(dtype).contiguous()
    wc = w.float().reshape(C).contiguous()
    uc = u.float().reshape(C).contiguous()
    sc = state.float().contiguous()
    return wc, uc, kc, vc, sc


class _WKV4Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, w, u, k, v, state):
        wc, uc, kc, vc, sc = _wkv4_prepare(w, u, k, v, state)
        y, sT, ckpt = ext.wkv4_forward(wc, uc, kc, vc, sc, True)
        ctx.ext = ext
        ctx.like = tuple((t.shape, t.dtype) for t in (w, u, k, v, state))
        ctx.save_for_backward(wc, uc, kc, vc, ckpt)
        return y, sT

    @staticmethod
    def backward(ctx, gy, gsT):
        wc, uc, kc, vc, ckpt = ctx.saved_tensors
        B, T, C = kc.shape
        gy = _grad_or_zeros(gy, (B, T, C), kc.device)
        gsT = _grad_or_zeros(gsT, (B, 3, C), kc.device)
        grads = ctx.ext.wkv4_backward(wc, uc, kc, vc, ckpt, gy, gsT)
        out = [None]
        for need, g, like in zip(ctx.needs_input_grad[1:], grads, ctx.like):
            out.append(_fit_grad(g, like) if need else None)
        return tuple(out)


def _wkv4(ext, w, u, k, v, state):
    named = [("w", w), ("u", u), ("k", k), ("v", v), ("state", state)]
    _check_devices("wkv4", ext, named)
    _check_float("wkv4", named)
    if k.dim() != 3:
        raise ValueError(f"wkv4: k must be [B, T, C], got shape {tuple(k.shape)}")
    B, T, C = k.shape
    if T == 0 or B == 0:
        return k.new_zeros(B, T, C, dtype=torch.float32), state.float().clone()
    if _needs_grad(w, u, k, v, state):
        return _WKV4Function.apply(ext, w, u, k, v, state)
    y, sT, _ = ext.wkv4_forward(*_wkv4_prepare(w, u, k, v, state), False)
    return y, sT


def wkv4_cuda(w, u, k, v, state):
    """RWKV-4 WKV on CUDA: same contract as ``ops_rwkv_hf.wkv4_recurrent``."""
    return _wkv4(_cuda_ext(), w, u, k, v, state)


# ---------------------------------------------------------------------------------------------------------
# RWKV-5.2 / RWKV-6
# ---------------------------------------------------------------------------------------------------------


def _decay_operand(log_w: torch.Tensor, B: int, T: int, H: int, N: int):
    """log_w as fp32 with (batch, time) element strides; dimensions it is broadcast over are read in place."""
    full = log_w.expand(B, T, H, N)
    b_bcast = B == 1 or full.stride(0) == 0
    t_bcast = T == 1 or full.stride(1) == 0
    base = full[:1] if b_bcast else full
    base = base[:, :1] if t_bcast else base
    base = base.float().contiguous()
    st = 0 if t_bcast else H * N
    sb = 0 if b_bcast else base.shape[1] * H * N
    return base, sb, st


def _wkv5_prepare(r, k, v, log_w, u, state):
    B, T, H, N = r.shape
    dtype = _compute_dtype("wkv5", [("r", r), ("k", k), ("v", v)])
    rc, kc, vc = (x.to(dtype).contiguous() for x in (r, k, v))
    lw, sb, st = _decay_operand(log_w, B, T, H, N)
    uc = u.float().reshape(H, N).contiguous()
    sc = state.float().contiguous()
    return rc, kc, vc, lw, sb, st, uc, sc


class _WKV5Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, r, k, v, log_w, u, state):
        rc, kc, vc, lw, sb, st, uc, sc = _wkv5_prepare(r, k, v, log_w, u, state)
        y, sT = ext.wkv5_forward(rc, kc, vc, lw, sb, st, uc, sc)
        ctx.ext, ctx.strides = ext, (sb, st)
        ctx.like = tuple((t.shape, t.dtype) for t in (r, k, v, log_w, u, state))
        ctx.save_for_backward(rc, kc, vc, lw, uc, sc)
        return y, sT

    @staticmethod
    def backward(ctx, gy, gsT):
        rc, kc, vc, lw, uc, sc = ctx.saved_tensors
        B, T, H, N = rc.shape
        gy = _grad_or_zeros(gy, (B, T, H, N), rc.device)
        gsT = _grad_or_zeros(gsT, (B, H, N, N), rc.device)
        grads = ctx.ext.wkv5_backward(rc, kc, vc, lw, *ctx.strides, uc, sc, gy, gsT)
        out = [None]
        for need, g, like in zip(ctx.needs_input_grad[1:], grads, ctx.like):
            out.append(_fit_grad(g, like) if need else None)
        return tuple(out)


def _wkv5(ext, r, k, v, log_w, u, state):
    named = [("r", r), ("k", k), ("v", v), ("log_w", log_w), ("u", u), ("state", state)]
    _check_devices("wkv5", ext, named)
    _check_float("wkv5", named)
    if r.dim() != 4:
        raise ValueError(f"wkv5: r must be [B, T, H, N], got shape {tuple(r.shape)}")
    B, T, H, N = r.shape
    if N not in SUPPORTED_HEAD_SIZES:
        from . import ops_rwkv_hf as ops

        _fallback("wkv5", N)
        fn = ops.wkv5_recurrent if T == 1 else ops.wkv5_chunked
        return fn(r, k, v, log_w, u, state)
    if T == 0 or B == 0:
        return r.new_zeros(B, T, H, N, dtype=torch.float32), state.float().clone()
    if _needs_grad(r, k, v, log_w, u, state):
        return _WKV5Function.apply(ext, r, k, v, log_w, u, state)
    return tuple(ext.wkv5_forward(*_wkv5_prepare(r, k, v, log_w, u, state)))


def wkv5_cuda(r, k, v, log_w, u, state):
    """RWKV-5.2/6 WKV on CUDA: same contract as ``ops_rwkv_hf.wkv5_recurrent``."""
    return _wkv5(_cuda_ext(), r, k, v, log_w, u, state)


# ---------------------------------------------------------------------------------------------------------
# RWKV-7
# ---------------------------------------------------------------------------------------------------------


def _wkv7_prepare(r, log_w, k, v, a, b, state):
    B, T, H, N = r.shape
    dtype = _compute_dtype("wkv7", [("r", r), ("k", k), ("v", v), ("a", a), ("b", b)])
    rc, kc, vc, ac, bc = (x.to(dtype).contiguous() for x in (r, k, v, a, b))
    lw = log_w.expand(B, T, H, N).float().contiguous()
    sc = state.float().contiguous()
    return rc, lw, kc, vc, ac, bc, sc


class _WKV7Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, r, log_w, k, v, a, b, state):
        rc, lw, kc, vc, ac, bc, sc = _wkv7_prepare(r, log_w, k, v, a, b, state)
        y, sT, ckpt, sa = ext.wkv7_forward(rc, lw, kc, vc, ac, bc, sc, True)
        ctx.ext = ext
        ctx.like = tuple((t.shape, t.dtype) for t in (r, log_w, k, v, a, b, state))
        ctx.save_for_backward(rc, lw, kc, vc, ac, bc, ckpt, sa)
        return y, sT

    @staticmethod
    def backward(ctx, gy, gsT):
        rc, lw, kc, vc, ac, bc, ckpt, sa = ctx.saved_tensors
        B, T, H, N = rc.shape
        gy = _grad_or_zeros(gy, (B, T, H, N), rc.device)
        gsT = _grad_or_zeros(gsT, (B, H, N, N), rc.device)
        grads = ctx.ext.wkv7_backward(rc, lw, kc, vc, ac, bc, gy, gsT, ckpt, sa)
        out = [None]
        for need, g, like in zip(ctx.needs_input_grad[1:], grads, ctx.like):
            out.append(_fit_grad(g, like) if need else None)
        return tuple(out)


def _wkv7(ext, r, log_w, k, v, a, b, state):
    named = [("r", r), ("log_w", log_w), ("k", k), ("v", v), ("a", a), ("b", b), ("state", state)]
    _check_devices("wkv7", ext, named)
    _check_float("wkv7", named)
    if r.dim() != 4:
        raise ValueError(f"wkv7: r must be [B, T, H, N], got shape {tuple(r.shape)}")
    B, T, H, N = r.shape
    if N not in SUPPORTED_HEAD_SIZES:
        from . import ops_rwkv_hf as ops

        _fallback("wkv7", N)
        fn = ops.wkv7_recurrent if T == 1 else ops.wkv7_chunked
        return fn(r, log_w, k, v, a, b, state)
    if T == 0 or B == 0:
        return r.new_zeros(B, T, H, N, dtype=torch.float32), state.float().clone()
    if _needs_grad(r, log_w, k, v, a, b, state):
        return _WKV7Function.apply(ext, r, log_w, k, v, a, b, state)
    y, sT, _, _ = ext.wkv7_forward(*_wkv7_prepare(r, log_w, k, v, a, b, state), False)
    return y, sT


def wkv7_cuda(r, log_w, k, v, a, b, state):
    """RWKV-7 WKV on CUDA: same contract as ``ops_rwkv_hf.wkv7_recurrent``."""
    return _wkv7(_cuda_ext(), r, log_w, k, v, a, b, state)
