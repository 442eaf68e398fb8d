"""GPU benchmark of the rwkv_hf WKV kernels alone, against the PyTorch chunked ops and other implementations.

For each generation (v4, v5.2/6, v7) it times, at B=8, T=4096, C=4096 (H=64 heads of N=64) by default:

* forward and forward+backward of the CUDA kernel (``kernels_rwkv_hf.wkv*_cuda``) and of the PyTorch
  chunked form (``ops_rwkv_hf.wkv*_chunked``);
* for RWKV-7 also flash-linear-attention's ``chunk_rwkv7`` (fwd, fwd+bwd) and ``fused_recurrent_rwkv7``
  (fwd) when ``fla`` is importable, and the official ``rwkv`` package's ``wkv7s`` CUDA op (fwd, B=1 only:
  that kernel does not support B > 1) when ``rwkv`` is importable;
* one decode step (T=1) of the kernel, eagerly (what a Python loop pays, launch overhead included) and
  replayed from a CUDA graph (the kernel's own time), against the PyTorch recurrent step.

Prints one table per generation; "x kernel" is the row's time divided by the kernel's time for the same
measurement (> 1: the kernel is faster). Without a GPU it prints a message and exits with status 0.

    python benchmarks/bench_gpu.py [--B 8] [--T 4096] [--C 4096] [--N 64] [--dtype bf16] [--only v7]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cuda_time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median wall time of fn() on the GPU, in ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def per_call_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Average time of back-to-back calls (eager decode loop), in microseconds."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / calls


def graph_us(fn: Callable[[], object], replays: int = 200) -> Optional[float]:
    """Time of one call replayed from a CUDA graph, in microseconds (None if capture fails)."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000.0 / replays
    except Exception as err:  # noqa: BLE001
        print(f"   (CUDA graph capture failed: {type(err).__name__}: {err})")
        return None


class Table:
    def __init__(self, title: str):
        self.title = title
        self.rows: List[tuple] = []

    def add(self, measure: str, impl: str, value: Optional[float], unit: str, base: Optional[float], note=""):
        self.rows.append((measure, impl, value, unit, base, note))

    def print(self):
        print(f"\n## {self.title}")
        print(f"| {'measurement':28s} | {'implementation':34s} | {'time':>12s} | {'x kernel':>8s} | note")
        print(f"|{'-' * 30}|{'-' * 36}|{'-' * 14}|{'-' * 10}|-----")
        for measure, impl, value, unit, base, note in self.rows:
            t = "n/a" if value is None else f"{value:10.3f} {unit}"
            ratio = "" if value is None or base is None or base == 0 else f"{value / base:8.2f}"
            print(f"| {measure:28s} | {impl:34s} | {t:>12s} | {ratio:>8s} | {note}")


def attempt(fn: Callable[[], float]):
    """Run a measurement; return (value, note) with OOM and missing features reported, not raised."""
    try:
        return fn(), ""
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "out of memory"
    except Exception as err:  # noqa: BLE001
        torch.cuda.empty_cache()
        return None, f"{type(err).__name__}: {str(err)[:80]}"


def fwd_bwd(fn: Callable[..., tuple], inputs: List[torch.Tensor]) -> Callable[[], None]:
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]

    def run():
        for x in leaves:
            x.grad = None
        y, s = fn(*leaves)
        (y.float().sum() + s.float().sum()).backward()

    return run


def fwd(fn: Callable[..., tuple], inputs: List[torch.Tensor]) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            fn(*inputs)

    return run


# ---------------------------------------------------------------------------------------------------------


def make_inputs(gen: str, B: int, T: int, H: int, N: int, dtype: torch.dtype) -> List[torch.Tensor]:
    dev = "cuda"
    C = H * N
    if gen == "v4":
        return [
            -torch.exp(torch.randn(C, device=dev) * 0.5),
            torch.randn(C, device=dev) * 0.5,
            torch.randn(B, T, C, device=dev).to(dtype),
            torch.randn(B, T, C, device=dev).to(dtype),
            torch.stack([torch.zeros(B, C, device=dev), torch.zeros(B, C, device=dev),
                         torch.full((B, C), -1e30, device=dev)], dim=1),
        ]
    r = (torch.randn(B, T, H, N, device=dev) * 0.5).to(dtype)
    k = (torch.randn(B, T, H, N, device=dev) * 0.5).to(dtype)
    v = torch.randn(B, T, H, N, device=dev).to(dtype)
    state = torch.randn(B, H, N, N, device=dev) * 0.1
    if gen == "v5":
        log_w = -torch.exp(torch.randn(B, T, H, N, device=dev) - 1.0)
        return [r, k, v, log_w, torch.randn(H, N, device=dev) * 0.5, state]
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, device=dev), dim=-1)
    a = (-kk).to(dtype)
    b = (kk * torch.rand(B, T, H, N, device=dev)).to(dtype)
    log_w = -0.6065306597 * torch.sigmoid(torch.randn(B, T, H, N, device=dev))
    return [r, log_w, k, v, a, b, state]


def bench_generation(gen: str, args, K, ops) -> Table:
    B, T, C, N, dtype = args.B, args.T, args.C, args.N, DTYPES[args.dtype]
    H = C // N
    kernel = {"v4": K.wkv4_cuda, "v5": K.wkv5_cuda, "v7": K.wkv7_cuda}[gen]
    chunked = {"v4": ops.wkv4_chunked, "v5": ops.wkv5_chunked, "v7": ops.wkv7_chunked}[gen]
    recurrent = {"v4": ops.wkv4_recurrent, "v5": ops.wkv5_recurrent, "v7": ops.wkv7_recurrent}[gen]
    title = {"v4": "RWKV-4", "v5": "RWKV-5.2/6", "v7": "RWKV-7"}[gen]
    shape = f"B={B} T={T} C={C}" + ("" if gen == "v4" else f" H={H} N={N}") + f" {args.dtype}"
    table = Table(f"{title} WKV, {shape}")
    inputs = make_inputs(gen, B, T, H, N, dtype)
    w, i = args.warmup, args.iters

    base_f, note = attempt(lambda: cuda_time_ms(fwd(kernel, inputs), w, i))
    table.add("forward", "rwkv_hf CUDA kernel", base_f, "ms", base_f, note)
    val, note = attempt(lambda: cuda_time_ms(fwd(chunked, inputs), w, i))
    table.add("forward", "rwkv_hf PyTorch chunked", val, "ms", base_f, note)
    base_b, note = attempt(lambda: cuda_time_ms(fwd_bwd(kernel, inputs), w, i))
    table.add("forward+backward", "rwkv_hf CUDA kernel", base_b, "ms", base_b, note)
    val, note = attempt(lambda: cuda_time_ms(fwd_bwd(chunked, inputs), w, i))
    table.add("forward+backward", "rwkv_hf PyTorch chunked", val, "ms", base_b, note)

    if gen == "v7":
        bench_fla(table, inputs, base_f, base_b, w, i)
        bench_official_v7(table, args, K, dtype, w, i)

    for Bd in sorted({1, B}):
        step = make_inputs(gen, Bd, 1, H, N, dtype)
        eager, note = attempt(lambda: per_call_us(fwd(kernel, step)))
        table.add(f"decode step B={Bd}, eager", "rwkv_hf CUDA kernel", eager, "us", eager, note)
        graphed, note = attempt(lambda: graph_us(lambda: kernel(*step)))
        table.add(f"decode step B={Bd}, CUDA graph", "rwkv_hf CUDA kernel", graphed, "us", graphed, note)
        val, note = attempt(lambda: per_call_us(fwd(recurrent, step)))
        table.add(f"decode step B={Bd}, eager", "rwkv_hf PyTorch recurrent", val, "us", eager, note)
        val, note = attempt(lambda: graph_us(lambda: recurrent(*step)))
        table.add(f"decode step B={Bd}, CUDA graph", "rwkv_hf PyTorch recurrent", val, "us", graphed, note)
    del inputs
    torch.cuda.empty_cache()
    return table


def bench_fla(table: Table, inputs, base_f, base_b, w, i):
    try:
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    except Exception as err:  # noqa: BLE001
        table.add("forward", "fla chunk_rwkv7", None, "ms", None, f"fla not importable ({type(err).__name__})")
        return
    # fla: log decay named w, state [B, H, K(key), V(value)] = the transpose of rwkv_hf's v7 state.
    def call(fn):
        def run(r, log_w, k, v, a, b, state):
            return fn(r, log_w, k, v, a, b, scale=1.0, initial_state=state.transpose(-1, -2),
                      output_final_state=True)
        return run

    val, note = attempt(lambda: cuda_time_ms(fwd(call(chunk_rwkv7), inputs), w, i))
    table.add("forward", "fla chunk_rwkv7", val, "ms", base_f, note)
    val, note = attempt(lambda: cuda_time_ms(fwd(call(fused_recurrent_rwkv7), inputs), w, i))
    table.add("forward", "fla fused_recurrent_rwkv7", val, "ms", base_f, note)
    val, note = attempt(lambda: cuda_time_ms(fwd_bwd(call(chunk_rwkv7), inputs), w, i))
    table.add("forward+backward", "fla chunk_rwkv7", val, "ms", base_b, note)


def bench_official_v7(table: Table, args, K, dtype, w, i):
    """The official package's wkv7s kernel (forward only, B=1, state updated in place)."""
    try:
        import rwkv
        from torch.utils.cpp_extension import load
    except Exception as err:  # noqa: BLE001
        table.add("forward B=1", "rwkv pip wkv7s", None, "ms", None, f"rwkv not importable ({type(err).__name__})")
        return
    N, T = args.N, args.T
    H = args.C // N
    src = Path(rwkv.__file__).parent / "cuda"
    try:
        load(name=f"wkv7s_bench_{N}", sources=[str(src / "rwkv7_op.cpp"), str(src / "rwkv7.cu")],
             is_python_module=False, verbose=False,
             extra_cuda_cflags=["-O3", "-Xptxas -O3", "--extra-device-vectorization", f"-D_N_={N}"])
    except Exception as err:  # noqa: BLE001
        table.add("forward B=1", "rwkv pip wkv7s", None, "ms", None, f"build failed ({type(err).__name__})")
        return
    op = {torch.float16: torch.ops.wkv7s.forward_fp16, torch.bfloat16: torch.ops.wkv7s.forward_bf16,
          torch.float32: torch.ops.wkv7s.forward_fp32}[dtype]
    r, log_w, k, v, a, b, state = make_inputs("v7", 1, T, H, N, dtype)
    # wkv7s computes the decay as exp(-exp(w)): w = log(-log_w).
    w_raw = torch.log(-log_w).to(dtype)
    flat = [x.reshape(T, H * N).contiguous() for x in (r, w_raw, k, v, a, b)]
    y = torch.empty(T, H * N, device="cuda", dtype=dtype)
    s = state.clone()

    def official():
        op(1, T, H * N, H, s, *flat, y)

    ours_f, note = attempt(lambda: cuda_time_ms(fwd(K.wkv7_cuda, [r, log_w, k, v, a, b, state]), w, i))
    table.add(f"forward B=1 T={T}", "rwkv_hf CUDA kernel", ours_f, "ms", ours_f, note)
    val, note = attempt(lambda: cuda_time_ms(official, w, i))
    table.add(f"forward B=1 T={T}", "rwkv pip wkv7s (in place)", val, "ms", ours_f, note)
    flat1 = [x[:1].contiguous() for x in flat]
    y1 = torch.empty(1, H * N, device="cuda", dtype=dtype)
    step = [x[:, :1].contiguous() for x in (r, log_w, k, v, a, b)] + [state]
    ours_d = graph_us(lambda: K.wkv7_cuda(*step))
    table.add("decode step B=1, CUDA graph", "rwkv_hf CUDA kernel", ours_d, "us", ours_d)
    val = graph_us(lambda: op(1, 1, H * N, H, s, *flat1, y1))
    table.add("decode step B=1, CUDA graph", "rwkv pip wkv7s (in place)", val, "us", ours_d)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--C", type=int, default=4096)
    parser.add_argument("--N", type=int, default=64, help="head size (v5/v6/v7)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--only", choices=["v4", "v5", "v7"], action="append", help="generation(s) to run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device available; nothing to benchmark.")
        return 0
    os.environ.setdefault("RWKV_HF_WKV_BACKEND", "cuda")  # a failed kernel build raises instead of falling back
    from rwkv_hf import kernels_rwkv_hf as K
    from rwkv_hf import ops_rwkv_hf as ops

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
    print("building / loading the kernels ...", flush=True)
    K.build_extension(verbose=False)
    if args.C % args.N:
        print(f"bench_gpu: C={args.C} is not a multiple of N={args.N}")
        return 2
    for gen in args.only or ["v7", "v5", "v4"]:
        bench_generation(gen, args, K, ops).print()
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
