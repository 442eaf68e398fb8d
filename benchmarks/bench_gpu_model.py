"""Model-level GPU benchmark (bf16): decode, prefill and a training step for RWKV-7 shaped 0.1B / 1.5B / 2.9B.

Prints, per model and in one run: decode tokens/s at batch 1 and 64, prefill tokens/s at 4096 tokens, a fwd+bwd
training step (batch 8 x 4096 tokens for 0.1B, fewer rows for the larger ones), against the official `rwkv`
package with its CUDA kernel (RWKV_CUDA_ON=1, batch 1 only: its inference kernels are single-sequence) in a
subprocess, and flash-linear-attention's RWKV-7 model when it imports. Also the fraction of the batch-1 decode
bandwidth bound: weight bytes per step / step time, against the card's measured device-to-device copy bandwidth.

    python benchmarks/bench_gpu_model.py [--models 0.1b,1.5b,2.9b] [--no-official] [--no-fla]

Without a CUDA device it prints a message and exits 0. The kernel-level benchmark is benchmarks/bench_gpu.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import torch

SHAPES = {  # RWKV-7 "Goose" release shapes (LoRA ranks follow RwkvConfig's RWKV-LM rule)
    "0.1b": dict(hidden_size=768, num_hidden_layers=12),
    "1.5b": dict(hidden_size=2048, num_hidden_layers=24),
    "2.9b": dict(hidden_size=2560, num_hidden_layers=32),
}


def cuda_time(fn, repeats=5, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (reads + writes), the practical roofline of a decode step."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), repeats=10)
    return 2 * x.numel() / t


def build(name):
    from rwkv_hf import RwkvConfig, RwkvForCausalLM

    config = RwkvConfig(rwkv_version="7", vocab_size=65536, head_size=64, **SHAPES[name])
    with torch.device("cuda"):
        model = RwkvForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0, 0.02)
    return model


@torch.inference_mode()
def decode_tokens_per_s(model, batch, steps=64):
    ids = torch.randint(1, 65536, (batch, 16), device="cuda")
    cache = model(ids, use_cache=True, logits_to_keep=1).cache
    token = ids[:, -1:]

    def run():
        nonlocal cache
        for _ in range(steps):
            cache = model(token, cache=cache, use_cache=True).cache

    t = cuda_time(run, repeats=3)
    return batch * steps / t, t / steps


@torch.inference_mode()
def prefill_tokens_per_s(model, length=4096):
    ids = torch.randint(1, 65536, (1, length), device="cuda")
    return length / cuda_time(lambda: model(ids, use_cache=True, logits_to_keep=1), repeats=3)


def train_step_s(model, batch, length=4096):
    model.train()
    ids = torch.randint(1, 65536, (batch, length), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    t = cuda_time(step, repeats=3, warmup=1)
    model.eval()
    return t


OFFICIAL = textwrap.dedent(
    """
    import json, time, torch
    from rwkv.model import RWKV
    model = RWKV({path!r}, 'cuda bf16')
    prompt = list(range(1, 4097))
    def timed(fn, n=3):
        fn(); torch.cuda.synchronize(); best = 1e9
        for _ in range(n):
            s = time.perf_counter(); fn(); torch.cuda.synchronize(); best = min(best, time.perf_counter() - s)
        return best
    _, state = model.forward(prompt[:16], None)
    def decode():
        st = [s.clone() for s in state]
        for _ in range(64):
            model.forward([5], st)
    d = timed(decode)
    p = timed(lambda: model.forward(prompt, None))
    print(json.dumps(dict(decode_tok_s=64 / d, prefill_tok_s=4096 / p)))
    """
)


def official(model):
    try:
        import rwkv  # noqa: F401
    except ImportError:
        return None
    from rwkv_hf.convert_rwkv_hf import export_official_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model")
        torch.save({k: v.cpu() for k, v in export_official_state_dict(model).items()}, path + ".pth")
        env = dict(os.environ, RWKV_V7_ON="1", RWKV_CUDA_ON="1", RWKV_JIT_ON="1")
        out = subprocess.run([sys.executable, "-c", OFFICIAL.format(path=path)], env=env, capture_output=True, text=True)
        if out.returncode:
            print("official package failed:", out.stderr[-1500:], file=sys.stderr)
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])


def fla_model(model):
    try:
        from fla.models import RWKV7Config, RWKV7ForCausalLM
    except Exception:  # noqa: BLE001 - optional peer
        return None
    c = model.config
    config = RWKV7Config(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers, head_dim=c.head_size,
                         vocab_size=c.vocab_size, intermediate_size=c.intermediate_size)
    with torch.device("cuda"):
        return RWKV7ForCausalLM(config).to(torch.bfloat16).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="0.1b,1.5b,2.9b")
    parser.add_argument("--no-official", action="store_true")
    parser.add_argument("--no-fla", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu_model: no CUDA device; nothing to measure.")
        return 0
    from rwkv_hf.kernels_rwkv_hf import cuda_wkv_available

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, WKV kernel: {cuda_wkv_available()}")
    bandwidth = copy_bandwidth()
    print(f"measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    for name in args.models.split(","):
        model = build(name)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        d1, step = decode_tokens_per_s(model, 1)
        d64, _ = decode_tokens_per_s(model, 64)
        pre = prefill_tokens_per_s(model)
        train_rows = 8 if name == "0.1b" else 2
        train = train_step_s(model, train_rows)
        bound = weight_bytes / step / bandwidth
        params = weight_bytes / 2 / 1e9
        flops = 6 * params * 1e9 * train_rows * 4096
        print(f"\n{name} ({params:.2f}B params)")
        print(f"  rwkv_hf   decode b1 {d1:8.1f} tok/s ({bound:5.1%} of bandwidth bound)   decode b64 {d64:9.0f} tok/s"
              f"   prefill 4096 {pre:9.0f} tok/s   train {train_rows}x4096 {train * 1e3:7.1f} ms ({flops / train / 1e12:.0f} TFLOP/s)")
        if not args.no_official and (ref := official(model)):
            print(f"  official  decode b1 {ref['decode_tok_s']:8.1f} tok/s   prefill 4096 {ref['prefill_tok_s']:9.0f} tok/s"
                  f"   -> rwkv_hf x{d1 / ref['decode_tok_s']:.2f} decode, x{pre / ref['prefill_tok_s']:.2f} prefill")
        if not args.no_fla and (peer := fla_model(model)) is not None:
            f1, _ = decode_tokens_per_s(peer, 1)
            fpre = prefill_tokens_per_s(peer)
            ftrain = train_step_s(peer, train_rows)
            print(f"  fla       decode b1 {f1:8.1f} tok/s   prefill 4096 {fpre:9.0f} tok/s   train {ftrain * 1e3:7.1f} ms"
                  f"   -> rwkv_hf x{d1 / f1:.2f} decode, x{pre / fpre:.2f} prefill, x{ftrain / train:.2f} train")
            del peer
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
