"""Tests of the WKV kernels (kernels/*.cu, rwkv_hf/kernels_rwkv_hf.py) against the reference recurrences.

Three groups:

* CPU, always: importing the kernel module builds nothing, ``cuda_wkv_available()`` is False (one warning)
  without CUDA, and the ``ops_rwkv_hf`` dispatch still works on the CPU with the kernel module imported.
* CPU, ``slow``: ``.ci/compile_kernels.sh`` (nvcc compile check), and the kernel maths run on the CPU
  through the host emulation (the same ``.cu`` sources compiled as C++ with every CUDA block's threads
  run as CPU threads, see kernels/wkv_host_emu.h), compared with the ``*_recurrent`` references:
  outputs, final state and the gradients of every input including the initial state.
* GPU, ``gpu``: the same comparisons with the real CUDA build, over dtypes, head sizes 64 and 128,
  T = 1 / multiples / non-multiples of the checkpoint interval, B > 1; plus CUDA-graph capture of a decode
  step, argument errors and the head-size fallback.

Tolerances are relative to the largest magnitude of the reference tensor. fp32: 1e-4 for outputs and
states (the kernel and the reference only sum in different orders), 1e-3 for gradients (long reverse
accumulations). bf16/fp16 inputs: the kernel and the reference both widen the *same* rounded inputs to
fp32 and compute in fp32, so outputs and states keep the fp32 tolerance; gradients are returned in the
input dtype by both, so they may differ by one rounding of the low-precision format (2^-8 relative for
bf16, 2^-11 for fp16, plus the fp32 noise that can flip a rounding): 2e-2 for bf16, 5e-3 for fp16.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rwkv_hf import kernels_rwkv_hf as K
from rwkv_hf import ops_rwkv_hf as ops

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()

REFERENCE = {"v4": ops.wkv4_recurrent, "v5": ops.wkv5_recurrent, "v7": ops.wkv7_recurrent}
KERNEL = {"v4": K._wkv4, "v5": K._wkv5, "v7": K._wkv7}
NAMES = {
    "v4": ("w", "u", "k", "v", "state"),
    "v5": ("r", "k", "v", "log_w", "u", "state"),
    "v7": ("r", "log_w", "k", "v", "a", "b", "state"),
}
FWD_TOL = 1e-4
GRAD_TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def make_inputs(gen, B, T, H, N, dtype=torch.float32, device="cpu", seed=0, decay="model", empty_state=False):
    """Leaves for one op call, in its argument order. ``decay``: "model" (the range RWKV produces),
    "strong" (down to e^-30 per step), or for v5 "constant" (a per-channel [H, N] decay, as RWKV-5.2)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    def act(x):  # the activation dtype
        return x.to(dtype)

    C = H * N
    if gen == "v4":
        w = -torch.exp(rnd(C, scale=0.5))
        u = rnd(C, scale=0.5)
        k, v = act(rnd(B, T, C)), act(rnd(B, T, C))
        if empty_state:
            state = ops.empty_wkv4_state(B, C, device=device)
        else:
            state = torch.stack([rnd(B, C), rnd(B, C).abs() + 0.5, rnd(B, C)], dim=1)
        return [w, u, k, v, state]
    r, k, v = act(rnd(B, T, H, N, scale=0.5)), act(rnd(B, T, H, N, scale=0.5)), act(rnd(B, T, H, N))
    state = torch.zeros(B, H, N, N, device=device) if empty_state else rnd(B, H, N, N, scale=0.3)
    if gen == "v5":
        if decay == "constant":
            log_w = -torch.exp(rnd(H, N) - 1.0)
        elif decay == "strong":
            log_w = -torch.rand(B, T, H, N, generator=g).to(device) * 30.0
        else:
            log_w = -torch.exp(rnd(B, T, H, N) - 1.0)
        return [r, k, v, log_w, rnd(H, N, scale=0.5), state]
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    a = act(-kk)
    b = act(kk * torch.rand(B, T, H, N, generator=g).to(device))
    if decay == "strong":
        log_w = -torch.rand(B, T, H, N, generator=g).to(device) * 5.0
    else:
        log_w = -0.6065306597 * torch.sigmoid(rnd(B, T, H, N))  # RWKV-7's own range
    return [r, log_w, k, v, a, b, state]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def compare_with_reference(gen, ext, inputs, grad_tol=None, fwd_tol=FWD_TOL, grads=True):
    """Run the kernel (through ``ext``) and the reference on the same leaves; compare everything."""
    dtype = inputs[2].dtype
    grad_tol = GRAD_TOL[dtype] if grad_tol is None else grad_tol
    before = [x.clone() for x in inputs]
    leaves_k = [x.detach().clone().requires_grad_(grads) for x in inputs]
    leaves_r = [x.detach().clone().requires_grad_(grads) for x in inputs]
    y_k, s_k = KERNEL[gen](ext, *leaves_k)
    y_r, s_r = REFERENCE[gen](*leaves_r)
    assert y_k.dtype == torch.float32 and s_k.dtype == torch.float32
    assert y_k.shape == y_r.shape and s_k.shape == s_r.shape
    errors = {"y": rel_err(y_k, y_r), "state": rel_err(s_k, s_r)}
    assert errors["y"] < fwd_tol and errors["state"] < fwd_tol, errors
    if grads:
        g = torch.Generator().manual_seed(1)
        gy = torch.randn(y_r.shape, generator=g).to(y_r.device)
        gs = torch.randn(s_r.shape, generator=g).to(s_r.device)
        ((y_k * gy).sum() + (s_k * gs).sum()).backward()
        ((y_r * gy).sum() + (s_r * gs).sum()).backward()
        for name, lk, lr in zip(NAMES[gen], leaves_k, leaves_r):
            assert lk.grad is not None, f"no gradient for {name}"
            assert lk.grad.dtype == lr.grad.dtype and lk.grad.shape == lr.grad.shape, name
            errors[f"d{name}"] = rel_err(lk.grad, lr.grad)
            assert errors[f"d{name}"] < grad_tol, (name, errors)
    for x, x0 in zip(inputs, before):
        assert torch.equal(x, x0), "an input (the caller's state?) was modified in place"
    return errors


# ---------------------------------------------------------------------------------------------------------
# CPU: no CUDA
# ---------------------------------------------------------------------------------------------------------


def test_kernel_sources_are_found():
    folder = K.kernel_source_dir()
    assert folder is not None
    for name in K.KERNEL_SOURCES + K.KERNEL_HEADERS:
        assert (folder / name).is_file()


def test_import_builds_nothing(tmp_path):
    code = (
        "import rwkv_hf.kernels_rwkv_hf as K, rwkv_hf.ops_rwkv_hf as ops; "
        "assert K._ext is None and K._available is None; assert ops.wkv7_cuda is K.wkv7_cuda"
    )
    env = dict(os.environ, RWKV_HF_KERNEL_CACHE=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without CUDA")
def test_cuda_wkv_available_is_false_without_cuda(monkeypatch):
    monkeypatch.setattr(K, "_available", None)
    monkeypatch.setattr(K, "_ext", None)
    monkeypatch.delenv("RWKV_HF_WKV_BACKEND", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = K.cuda_wkv_available(), K.cuda_wkv_available()
    assert first is False and second is False
    ours = [w for w in caught if "rwkv_hf" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "torch.cuda.is_available() is False" in str(ours[0].message) or "no CUDA" in str(ours[0].message)
    with pytest.raises(RuntimeError, match="not available"):
        K.wkv7_cuda(*make_inputs("v7", 1, 2, 1, 64))


@pytest.mark.parametrize("gen", ["v4", "v5", "v7"])
@pytest.mark.parametrize("T", [1, 19])
def test_dispatch_runs_on_cpu_with_kernel_module_imported(gen, T):
    assert ops.cuda_wkv_available is K.cuda_wkv_available
    inputs = make_inputs(gen, 2, T, 2, 64)
    y, s = {"v4": ops.wkv4, "v5": ops.wkv5, "v7": ops.wkv7}[gen](*inputs)
    y_r, s_r = REFERENCE[gen](*inputs)
    assert rel_err(y, y_r) < 1e-4 and rel_err(s, s_r) < 1e-4


# ---------------------------------------------------------------------------------------------------------
# CPU, slow: compile check and the kernels run through the host emulation
# ---------------------------------------------------------------------------------------------------------


def _nvcc_present() -> bool:
    return bool(shutil.which("nvcc") or os.environ.get("NVCC") or (os.environ.get("CUDA_HOME") and
                Path(os.environ["CUDA_HOME"], "bin", "nvcc").exists()))


@pytest.mark.slow
@pytest.mark.skipif(not _nvcc_present(), reason="nvcc is not installed")
def test_compile_kernels_script():
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "1"), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "compile_kernels.sh")], env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "compile_kernels: OK" in proc.stdout


@pytest.fixture(scope="module")
def emu():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no host C++ compiler")
    try:
        import ninja  # noqa: F401
    except ImportError:
        pytest.skip("ninja is not installed")
    return K._host_emulation_extension()


EMU_CASES = [
    # gen, B, T, H, N, dtype, options
    ("v4", 2, 37, 1, 96, torch.float32, {}),
    ("v4", 3, 1, 1, 64, torch.float32, {"empty_state": True}),
    ("v4", 2, 16, 1, 64, torch.bfloat16, {"empty_state": True}),
    ("v5", 2, 37, 2, 64, torch.float32, {}),
    ("v5", 2, 21, 1, 64, torch.float32, {"decay": "constant"}),
    ("v5", 1, 23, 1, 64, torch.float32, {"decay": "strong"}),
    ("v5", 2, 1, 1, 64, torch.float16, {}),
    ("v5", 1, 9, 1, 128, torch.bfloat16, {}),
    ("v7", 2, 37, 2, 64, torch.float32, {}),
    ("v7", 1, 32, 1, 64, torch.float32, {"decay": "strong"}),
    ("v7", 3, 1, 1, 64, torch.float32, {}),
    ("v7", 1, 17, 1, 64, torch.bfloat16, {"empty_state": True}),
    ("v7", 1, 20, 1, 128, torch.float16, {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: f"{c[0]}-B{c[1]}-T{c[2]}-H{c[3]}-N{c[4]}-{str(c[5])[6:]}")
def test_emulated_kernel_matches_reference(emu, case):
    gen, B, T, H, N, dtype, options = case
    compare_with_reference(gen, emu, make_inputs(gen, B, T, H, N, dtype=dtype, **options))


@pytest.mark.slow
def test_emulated_v5_decay_expanded_view(emu):
    """RWKV-5.2 passes its per-channel decay as a stride-0 view; the gradient must reach the [H, N] leaf."""
    r, k, v, log_w, u, s = make_inputs("v5", 2, 13, 1, 64, decay="constant")
    leaf_k = log_w.clone().requires_grad_(True)
    leaf_r = log_w.clone().requires_grad_(True)
    y_k, _ = K._wkv5(emu, r, k, v, leaf_k.expand(2, 13, 1, 64), u, s)
    y_r, _ = ops.wkv5_recurrent(r, k, v, leaf_r.expand(2, 13, 1, 64), u, s)
    y_k.square().sum().backward()
    y_r.square().sum().backward()
    assert rel_err(y_k, y_r) < FWD_TOL and rel_err(leaf_k.grad, leaf_r.grad) < 1e-3


@pytest.mark.slow
def test_emulated_v4_padding_tokens(emu):
    """Left padding writes k = -1e30 (no weight) into the v4 recurrence."""
    w, u, k, v, s = make_inputs("v4", 2, 12, 1, 64, empty_state=True)
    k[0, :5] = ops.V4_EMPTY_PP
    compare_with_reference("v4", emu, [w, u, k, v, s])


@pytest.mark.slow
def test_emulated_partial_gradients_and_no_grad_path(emu):
    r, log_w, k, v, a, b, s = make_inputs("v7", 1, 18, 1, 64)
    s_leaf = s.clone().requires_grad_(True)  # state tuning: only the initial state is trained
    y, s_out = K._wkv7(emu, r, log_w, k, v, a, b, s_leaf)
    (y.sum() + s_out.sum()).backward()
    s_ref = s.clone().requires_grad_(True)
    y_r, s_out_r = ops.wkv7_recurrent(r, log_w, k, v, a, b, s_ref)
    (y_r.sum() + s_out_r.sum()).backward()
    assert rel_err(s_leaf.grad, s_ref.grad) < 1e-3
    with torch.no_grad():
        y2, s2 = K._wkv7(emu, r, log_w, k, v, a, b, s)
    assert torch.equal(y2, y.detach()) and torch.equal(s2, s_out.detach())


@pytest.mark.slow
def test_emulated_argument_errors(emu):
    inputs = make_inputs("v7", 1, 3, 1, 64)
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        K._wkv7(emu, *[x.double() if i == 0 else x for i, x in enumerate(inputs)])
    with pytest.raises(ValueError, match=r"\[B, T, H, N\]"):
        K._wkv7(emu, inputs[0][0], *inputs[1:])
    with pytest.warns(RuntimeWarning, match="head size 32"):
        y, s = K._wkv7(emu, *make_inputs("v7", 1, 3, 2, 32))
    y_r, s_r = ops.wkv7_recurrent(*make_inputs("v7", 1, 3, 2, 32))
    assert rel_err(y, y_r) < FWD_TOL


# ---------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------

gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def cuda_ext():
    assert K.cuda_wkv_available(), "CUDA is present but the WKV kernels did not build (see the warning)"
    return K._ext


GPU_SHAPES = [  # B, T, H, N
    (1, 1, 2, 64),
    (3, 1, 2, 128),
    (2, 16, 2, 64),
    (3, 33, 2, 64),
    (2, 100, 1, 128),
    (1, 257, 4, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}-T{}-H{}-N{}".format(*s))
@pytest.mark.parametrize("gen", ["v4", "v5", "v7"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_kernel_matches_reference(cuda_ext, gen, shape, dtype):
    B, T, H, N = shape
    compare_with_reference(gen, cuda_ext, make_inputs(gen, B, T, H, N, dtype=dtype, device="cuda", seed=T * 7 + B))


@pytest.mark.parametrize(
    "gen,options",
    [("v4", {"empty_state": True}), ("v5", {"decay": "constant"}), ("v5", {"decay": "strong"}),
     ("v7", {"decay": "strong"}), ("v7", {"empty_state": True})],
)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_kernel_special_inputs(cuda_ext, gen, options):
    compare_with_reference(gen, cuda_ext, make_inputs(gen, 2, 45, 2, 64, device="cuda", **options))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_public_ops_and_dispatch(cuda_ext):
    inputs = make_inputs("v7", 2, 20, 2, 64, device="cuda", dtype=torch.bfloat16)
    y, s = K.wkv7_cuda(*inputs)
    y2, s2 = ops.wkv7(*inputs)  # the dispatch picks the kernel for CUDA tensors
    assert torch.equal(y, y2) and torch.equal(s, s2)
    # Non-contiguous inputs are accepted (made contiguous).
    r, log_w, k, v, a, b, st = inputs
    nc = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in (r, log_w, k, v, a, b)]
    assert not nc[0].is_contiguous()
    y3, s3 = K.wkv7_cuda(*nc, st)
    assert torch.allclose(y3, y) and torch.allclose(s3, s)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_argument_errors(cuda_ext):
    cpu_inputs = make_inputs("v7", 1, 3, 1, 64)
    with pytest.raises(ValueError, match="CUDA tensor"):
        K.wkv7_cuda(*cpu_inputs)
    gpu_inputs = [x.cuda() for x in cpu_inputs]
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        K.wkv7_cuda(*[x.double() if i == 2 else x for i, x in enumerate(gpu_inputs)])
    with pytest.warns(RuntimeWarning, match="head size 16"):
        y, _ = K.wkv5_cuda(*[x.cuda() for x in make_inputs("v5", 1, 4, 2, 16)])
    y_r, _ = ops.wkv5_recurrent(*[x.cuda() for x in make_inputs("v5", 1, 4, 2, 16)])
    assert rel_err(y, y_r) < FWD_TOL


@pytest.mark.parametrize("gen", ["v4", "v5", "v7"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_decode_step_is_graph_capturable(cuda_ext, gen):
    """A T=1 step captured in a CUDA graph, replayed on new inputs, equals the eager step."""
    fn = {"v4": K.wkv4_cuda, "v5": K.wkv5_cuda, "v7": K.wkv7_cuda}[gen]
    static = make_inputs(gen, 4, 1, 2, 64, dtype=torch.bfloat16, device="cuda", seed=3)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(*static)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static, s_static = fn(*static)
        fresh = make_inputs(gen, 4, 1, 2, 64, dtype=torch.bfloat16, device="cuda", seed=4)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        y_eager, s_eager = fn(*fresh)
    torch.cuda.synchronize()
    assert torch.equal(y_static, y_eager) and torch.equal(s_static, s_eager)
