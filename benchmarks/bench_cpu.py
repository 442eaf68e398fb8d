"""CPU fp32 speed of rwkv_hf against the official `rwkv` package and transformers' built-in RWKV-4.

Random models shaped like RWKV-7 0.1B (L12 D768, vocab 65536) and RWKV-4 169M (L12 D768, vocab 50277). For each
implementation, in one run on the same weights:

* decode: ms per token, one token per forward with the state carried (after a warm-up);
* prefill: tokens/s for a 512-token prompt in one call (only the last logits are computed).

The official package runs in its own process (RWKV-7 needs RWKV_V7_ON set before import). Ratios are
"this package vs the other": > 1 means rwkv_hf is faster.

    python benchmarks/bench_cpu.py [--models v7,v4] [--threads 2] [--prefill 512] [--decode 50] [--repeats 3] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from rwkv_hf import RwkvConfig, RwkvForCausalLM
from rwkv_hf.convert_rwkv_hf import export_official_state_dict

SHAPES = {
    "v7": dict(rwkv_version="7", vocab_size=65536, hidden_size=768, num_hidden_layers=12, head_size=64),
    "v4": dict(rwkv_version="4", vocab_size=50277, hidden_size=768, num_hidden_layers=12),
}


def random_model(name: str) -> RwkvForCausalLM:
    torch.manual_seed(0)
    model = RwkvForCausalLM(RwkvConfig(**SHAPES[name])).eval()
    with torch.no_grad():  # RWKV-LM zero-initialises some projections; give every weight a value
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0, 0.02)
    return model


def timed(fn, repeats: int):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def bench_ours(model, prompt, decode_tokens, repeats, compiled=False):
    """``compiled``: the same calls through ``torch.compile(model)`` (compiled during the warm-up, not timed)."""
    run = torch.compile(model) if compiled else model
    with torch.inference_mode():
        model(prompt[:, :16], logits_to_keep=1)  # warm-up

        def prefill():
            run(prompt, logits_to_keep=1, use_cache=True)

        def decode():
            cache = model(prompt[:, :8], use_cache=True, logits_to_keep=1).cache
            token = prompt[:, 8:9]
            for _ in range(decode_tokens):
                out = run(token, cache=cache, use_cache=True)
                cache = out.cache

        if compiled:  # compile both shapes before timing
            prefill()
            decode()

        p_best, p_med = timed(prefill, repeats)
        d_best, d_med = timed(decode, repeats)
    T = prompt.shape[1]
    return dict(prefill_tok_s=(T / p_best, T / p_med), decode_ms=(1e3 * d_best / decode_tokens, 1e3 * d_med / decode_tokens))


OFFICIAL_SCRIPT = textwrap.dedent(
    """
    import json, statistics, sys, time, torch
    torch.set_num_threads({threads})
    from rwkv.model import RWKV
    path, version = {path!r}, {version!r}
    model = RWKV(path[:-4], 'cpu fp32') if version == '7' else RWKV(path[:-4], 'cpu fp32', verbose=False)
    prompt = {prompt}
    def timed(fn):
        t = []
        for _ in range({repeats}):
            s = time.perf_counter(); fn(); t.append(time.perf_counter() - s)
        return min(t), statistics.median(t)
    model.forward(prompt[:16], None)
    def prefill():
        model.forward(prompt, None)
    def decode():
        _, state = model.forward(prompt[:8], None)
        for _ in range({decode}):
            _, state = model.forward([prompt[8]], state)
    p = timed(prefill); d = timed(decode)
    T = len(prompt)
    print(json.dumps(dict(prefill_tok_s=(T / p[0], T / p[1]), decode_ms=(1e3 * d[0] / {decode}, 1e3 * d[1] / {decode}))))
    """
)


def bench_official(model, name, prompt, decode_tokens, repeats, threads):
    try:
        import rwkv  # noqa: F401
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pth")
        torch.save(export_official_state_dict(model), path)
        env = dict(os.environ, RWKV_JIT_ON="1", RWKV_CUDA_ON="0", RWKV_RESCALE_LAYER="0")
        if name == "v7":
            env["RWKV_V7_ON"] = "1"
        script = OFFICIAL_SCRIPT.format(
            threads=threads, path=path, version=model.config.rwkv_version, prompt=prompt[0].tolist(),
            repeats=repeats, decode=decode_tokens,
        )
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])


def transformers_builtin_v4(model):
    """transformers' own RwkvForCausalLM with the same weights (rescale_every=0, as fp32 needs no rescaling)."""
    from transformers import RwkvConfig as HFRwkvConfig
    from transformers import RwkvForCausalLM as HFRwkv

    c = model.config
    hf = HFRwkv(HFRwkvConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                             attention_hidden_size=c.attention_hidden_size, intermediate_size=c.intermediate_size,
                             rescale_every=0)).eval()
    names = {"emb.weight": "embeddings.weight", "ln0": "pre_ln", ".att.": ".attention.", ".ffn.": ".feed_forward.",
             "time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value", "time_mix_r": "time_mix_receptance"}
    mapped = {}
    for key, tensor in model.state_dict().items():
        for old, new in names.items():
            key = key.replace(old, new)
        mapped[key] = tensor.reshape(hf.state_dict()[key].shape)
    hf.load_state_dict(mapped, strict=True)
    return hf


def bench_transformers_v4(hf, prompt, decode_tokens, repeats):
    with torch.inference_mode():
        hf(prompt[:, :16])

        def prefill():
            hf(prompt, use_cache=True)

        def decode():
            state = hf(prompt[:, :8], use_cache=True).state
            for _ in range(decode_tokens):
                state = hf(prompt[:, 8:9], state=state, use_cache=True).state

        p_best, p_med = timed(prefill, repeats)
        d_best, d_med = timed(decode, repeats)
    T = prompt.shape[1]
    return dict(prefill_tok_s=(T / p_best, T / p_med), decode_ms=(1e3 * d_best / decode_tokens, 1e3 * d_med / decode_tokens))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="v7,v4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time rwkv_hf through torch.compile(model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} threads, prefill {args.prefill} tokens, decode {args.decode} tokens, "
          f"best / median of {args.repeats}")
    header = f"{'model':<8}{'implementation':<26}{'decode ms/tok':>16}{'prefill tok/s':>16}{'decode x':>10}{'prefill x':>11}"
    for name in args.models.split(","):
        model = random_model(name)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        prompt = torch.randint(1, model.config.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(0))
        results = {"rwkv_hf": bench_ours(model, prompt, args.decode, args.repeats)}
        if args.compile:
            results["rwkv_hf + torch.compile"] = bench_ours(model, prompt, args.decode, args.repeats, compiled=True)
        official = bench_official(model, name, prompt, args.decode, args.repeats, args.threads)
        if official:
            results["official rwkv 0.8.32"] = official
        if name == "v4":
            results["transformers RwkvForCausalLM"] = bench_transformers_v4(transformers_builtin_v4(model), prompt, args.decode, args.repeats)
        print(f"\n{name}: {params:.1f}M parameters")
        print(header)
        ours = results["rwkv_hf"]
        for impl, r in results.items():
            dec = r["decode_ms"][0]
            pre = r["prefill_tok_s"][0]
            dx = r["decode_ms"][0] / ours["decode_ms"][0]
            px = ours["prefill_tok_s"][0] / r["prefill_tok_s"][0]
            print(f"{name:<8}{impl:<26}{dec:>9.1f} /{r['decode_ms'][1]:>5.1f}{pre:>9.0f} /{r['prefill_tok_s'][1]:>5.0f}"
                  f"{'' if impl == 'rwkv_hf' else f'{dx:>9.2f}x':>10}{'' if impl == 'rwkv_hf' else f'{px:>10.2f}x':>11}")
    print("\n'decode x' = other's ms/token / rwkv_hf's; 'prefill x' = rwkv_hf's tokens/s / other's (> 1: rwkv_hf faster)")


if __name__ == "__main__":
    main()
