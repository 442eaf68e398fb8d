"""Random RWKV checkpoints in the official RWKV-LM ``.pth`` layout (v4, v5.2, v6, v7).

The state dicts built here look like what ``RWKV-LM`` saves: the same key names, the same
(sometimes odd) shapes and the same key order (``emb``, then per block ``ln1, ln2, [ln0], att.*,
ffn.*``, then ``ln_out``, ``head``; inside a module, parameters in the order RWKV-LM registers
them).  They are read both by the official ``rwkv`` pip package (see ``official_oracle.py``) and by
``rwkv_hf``'s converter, so the two can be compared on the same weights.

Initialisation follows RWKV-LM's "fancy init" per generation (decay spread over channels, layer-
dependent mixing ratios, v7's ``w0/a0/v0/k_k/k_a/r_k``), with two deliberate departures so that a
random model exercises every code path and is not degenerate:

* everything RWKV-LM zero-initialises (``att.output``, ``ffn.value``, ``ffn.receptance``, the LoRA
  down-projections ``*_w1``/``w1``/``a1``/..., ...) gets a small random value instead;
* every per-channel vector (mixing ratios, decays, LayerNorm affine terms, ...) gets a random
  perturbation, so two parameters that RWKV-LM initialises identically (e.g. ``ffn.time_mix_k`` and
  ``ffn.time_mix_r``) differ and a swapped pair is caught.  LayerNorm/GroupNorm biases are non-zero
  on purpose: they make padding and masking bugs visible.

Linear weights are (scaled) orthogonal, so activations stay O(1) and the logits of a random prompt
have a standard deviation of about 2-3 with many distinct argmaxes.

The builder is deterministic for a given ``seed`` (it draws from its own ``torch.Generator``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch

__all__ = [
    "VERSIONS",
    "normalize_version",
    "default_ffn_dim",
    "v7_lora_dims",
    "make_official_checkpoint",
    "save_official_checkpoint",
    "describe_checkpoint",
    "official_state_from_time_state",
    "CASE_SHAPES",
    "CASES",
    "case_kwargs",
    "case_tokens",
    "CASE_CHUNK",
]

VERSIONS = ("4", "5.2", "6", "7")

# RWKV-LM registers the DeepEmbed (rwkv7a) projection with this width; the inference code then views
# a (32*32)-wide row of ``s_emb`` as a 32x32 matrix.
DE_EMB_DIM = 1024
DE_LORA = 32


def normalize_version(version) -> str:
    """Accept 4 / 5.2 / 6 / 7 as numbers or strings ("v6", "6.0", 7.0, ...) and return the canonical string."""
    v = str(version).strip().lower().lstrip("v")
    aliases = {"4": "4", "4.0": "4", "5.2": "5.2", "6": "6", "6.0": "6", "7": "7", "7.0": "7"}
    if v not in aliases:
        raise ValueError(f"unsupported RWKV version {version!r}; expected one of {VERSIONS}")
    return aliases[v]


def default_ffn_dim(version, n_embd: int) -> int:
    """RWKV-LM's default FFN width: 4C for v4 and v7, ``int(3.5C)//32*32`` for v5.2 and v6."""
    v = normalize_version(version)
    if v in ("4", "7"):
        return 4 * n_embd
    return int((n_embd * 3.5) // 32 * 32)


def v7_lora_dims(n_embd: int) -> dict[str, int]:
    """RWKV-LM's suggested v7 LoRA widths ``max(32, round(k*sqrt(C)/32)*32)``, k = 2.5/2.5/1.7/5 (w/a/v/g)."""

    def dim(k: float) -> int:
        return max(32, int(round((k * (n_embd**0.5)) / 32) * 32))

    return {"w": dim(2.5), "a": dim(2.5), "v": dim(1.7), "g": dim(5.0)}


# --------------------------------------------------------------------------------------------------
# random draws
# --------------------------------------------------------------------------------------------------


class _Rng:
    """All random draws of one checkpoint, from one private generator (deterministic for a seed)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(int(seed))

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)

    def uniform(self, shape, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g) * (hi - lo) + lo

    def orthogonal(self, rows: int, cols: int) -> torch.Tensor:
        """A (rows, cols) matrix with orthonormal rows or columns (whichever there are fewer of)."""
        big, small = max(rows, cols), min(rows, cols)
        q, r = torch.linalg.qr(self.randn(big, small))
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique Q (Haar-distributed)
        return q if rows >= cols else q.t().contiguous()

    def linear(self, out_dim: int, in_dim: int, gain: float = 1.0) -> torch.Tensor:
        """nn.Linear layout (out, in). For unit-scale inputs, outputs have elements of size ~gain."""
        return self.orthogonal(out_dim, in_dim) * (gain * max(1.0, math.sqrt(out_dim / in_dim)))

    def lora_down(self, in_dim: int, rank: int, scale: float = 0.5) -> torch.Tensor:
        """RWKV-LM stores LoRA down-projections as (in, rank) and zero-inits them; we use small normals."""
        return self.randn(in_dim, rank) * (scale / math.sqrt(in_dim))

    def lora_up(self, rank: int, out_dim: int, gain: float) -> torch.Tensor:
        """(rank, out) up-projection, orthogonal like RWKV-LM's ``ortho_init``."""
        return self.orthogonal(rank, out_dim) * (gain * max(1.0, math.sqrt(rank / out_dim)))

    def jitter(self, base: torch.Tensor, scale: float) -> torch.Tensor:
        return base + self.randn(*base.shape) * scale

    def ratio(self, base: torch.Tensor, scale: float = 0.1) -> torch.Tensor:
        """A mixing ratio: RWKV-LM's value, perturbed, kept in [0, 1]."""
        return self.jitter(base, scale).clamp(0.0, 1.0)


def _layer_ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    # RWKV-LM divides by (n_layer - 1), which is 0 for a 1-layer model; use 0 there.
    ratio_0_to_1 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - (layer_id / n_layer)
    return ratio_0_to_1, ratio_1_to_almost0


def _ddd(n_embd: int) -> torch.Tensor:
    return (torch.arange(n_embd, dtype=torch.float32) / n_embd).reshape(1, 1, n_embd)


def _layernorm(sd, rng: _Rng, prefix: str, dim: int, weight_center: float = 1.0) -> None:
    sd[f"{prefix}.weight"] = rng.jitter(torch.full((dim,), float(weight_center)), 0.1)
    sd[f"{prefix}.bias"] = rng.randn(dim) * 0.1


# --------------------------------------------------------------------------------------------------
# per-generation blocks (key order = RWKV-LM's parameter registration order)
# --------------------------------------------------------------------------------------------------


def _att_v4(sd, rng, p, i, L, C, A):
    r01, r1a0 = _layer_ratios(i, L)
    ddd = _ddd(C)
    n = torch.arange(A, dtype=torch.float32)
    decay_speed = -5 + 8 * (n / max(A - 1, 1)) ** (0.7 + 1.3 * r01)
    sd[p + "time_decay"] = rng.jitter(decay_speed, 0.1)  # (A)
    zigzag = torch.tensor([(j + 1) % 3 - 1 for j in range(A)], dtype=torch.float32) * 0.5
    sd[p + "time_first"] = rng.jitter(torch.ones(A) * math.log(0.3) + zigzag, 0.1)  # (A)
    sd[p + "time_mix_k"] = rng.ratio(torch.pow(ddd, r1a0))
    sd[p + "time_mix_v"] = rng.ratio(torch.pow(ddd, r1a0) + 0.3 * r01)
    sd[p + "time_mix_r"] = rng.ratio(torch.pow(ddd, 0.5 * r1a0))
    sd[p + "key.weight"] = rng.linear(A, C, 0.5)
    sd[p + "value.weight"] = rng.linear(A, C, 1.0)
    sd[p + "receptance.weight"] = rng.linear(A, C, 1.0)
    sd[p + "output.weight"] = rng.linear(C, A, 0.5)


def _faaaa(rng, A, H, N, r01):
    n = torch.arange(A, dtype=torch.float32)
    zigzag = ((n + 1) % 3 - 1) * 0.1
    tmp = r01 * (1 - (n / max(A - 1, 1))) + zigzag
    return rng.jitter(tmp, 0.1).reshape(H, N)


def _att_v5_2(sd, rng, p, i, L, C, A, N):
    H = A // N
    r01, r1a0 = _layer_ratios(i, L)
    ddd = _ddd(C)
    sd[p + "time_mix_k"] = rng.ratio(torch.pow(ddd, r1a0))
    sd[p + "time_mix_v"] = rng.ratio(torch.pow(ddd, r1a0) + 0.3 * r01)
    sd[p + "time_mix_r"] = rng.ratio(torch.pow(ddd, 0.5 * r1a0))
    sd[p + "time_mix_g"] = rng.ratio(torch.pow(ddd, 0.5 * r1a0))
    n = torch.arange(A, dtype=torch.float32)
    decay_speed = -6 + 5 * (n / max(A - 1, 1)) ** (0.7 + 1.3 * r01)
    sd[p + "time_decay"] = rng.jitter(decay_speed, 0.1).reshape(H, N)
    sd[p + "time_faaaa"] = _faaaa(rng, A, H, N, r01)
    sd[p + "receptance.weight"] = rng.linear(A, C, 1.0)
    sd[p + "key.weight"] = rng.linear(A, C, 0.5)
    sd[p + "value.weight"] = rng.linear(A, C, 1.0)
    sd[p + "output.weight"] = rng.linear(C, A, 0.5)
    sd[p + "gate.weight"] = rng.linear(A, C, 0.5)
    _layernorm(sd, rng, p + "ln_x", A, ((1 + i) / L) ** 0.7)


def _att_v6(sd, rng, p, i, L, C, A, N, mix_lora, decay_lora, time_state):
    H = A // N
    r01, r1a0 = _layer_ratios(i, L)
    ddd = _ddd(C)
    sd[p + "time_maa_x"] = rng.ratio(1.0 - torch.pow(ddd, r1a0))
    sd[p + "time_maa_w"] = rng.ratio(1.0 - torch.pow(ddd, r1a0))
    sd[p + "time_maa_k"] = rng.ratio(1.0 - torch.pow(ddd, r1a0))
    sd[p + "time_maa_v"] = rng.ratio(1.0 - (torch.pow(ddd, r1a0) + 0.3 * r01))
    sd[p + "time_maa_r"] = rng.ratio(1.0 - torch.pow(ddd, 0.5 * r1a0))
    sd[p + "time_maa_g"] = rng.ratio(1.0 - torch.pow(ddd, 0.5 * r1a0))
    sd[p + "time_maa_w1"] = rng.lora_down(C, mix_lora * 5)  # (C, 5*Dm); zeros in RWKV-LM
    sd[p + "time_maa_w2"] = rng.uniform((5, mix_lora, C), -0.1, 0.1)  # (5, Dm, C); +-0.01 in RWKV-LM
    n = torch.arange(A, dtype=torch.float32)
    decay_speed = -6 + 5 * (n / max(A - 1, 1)) ** (0.7 + 1.3 * r01)
    sd[p + "time_decay"] = rng.jitter(decay_speed, 0.1).reshape(1, 1, A)
    sd[p + "time_decay_w1"] = rng.lora_down(C, decay_lora, 1.0)  # (C, Dd); zeros in RWKV-LM
    # +-0.01 in RWKV-LM; larger here so the data-dependent decay visibly matters
    sd[p + "time_decay_w2"] = rng.uniform((decay_lora, A), -0.4, 0.4)  # (Dd, A)
    sd[p + "time_faaaa"] = _faaaa(rng, A, H, N, r01)
    if time_state:  # RWKV_Tmix_x060_state registers it right after time_faaaa
        sd[p + "time_state"] = rng.randn(H, N, N) * 0.3
    sd[p + "receptance.weight"] = rng.linear(A, C, 1.0)
    sd[p + "key.weight"] = rng.linear(A, C, 0.5)
    sd[p + "value.weight"] = rng.linear(A, C, 1.0)
    sd[p + "output.weight"] = rng.linear(C, A, 0.5)
    sd[p + "gate.weight"] = rng.linear(A, C, 0.5)
    _layernorm(sd, rng, p + "ln_x", A, ((1 + i) / L) ** 0.7)


def _att_v7(sd, rng, p, i, L, C, N, lora, time_state):
    H = C // N
    r01, r1a0 = _layer_ratios(i, L)
    ddd = _ddd(C)
    sd[p + "x_r"] = rng.ratio(1.0 - torch.pow(ddd, 0.2 * r1a0))
    sd[p + "x_w"] = rng.ratio(1.0 - torch.pow(ddd, 0.9 * r1a0))
    sd[p + "x_k"] = rng.ratio(1.0 - torch.pow(ddd, 0.7 * r1a0))
    sd[p + "x_v"] = rng.ratio(1.0 - torch.pow(ddd, 0.7 * r1a0))
    sd[p + "x_a"] = rng.ratio(1.0 - torch.pow(ddd, 0.9 * r1a0))
    sd[p + "x_g"] = rng.ratio(1.0 - torch.pow(ddd, 0.2 * r1a0))

    n = torch.arange(C, dtype=torch.float32)
    linear = n / (C - 1) - 0.5
    zigzag = ((n % N) - ((N - 1) / 2)) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()
    www = -6 + 6 * (n / (C - 1)) ** (1 + 1 * r01**0.3)

    # RWKV-LM registers w1, w2 before w0 (and likewise for a, v); the *1 matrices are zeros there.
    sd[p + "w1"] = rng.lora_down(C, lora["w"])
    sd[p + "w2"] = rng.lora_up(lora["w"], C, 1.0)
    sd[p + "w0"] = rng.jitter(www + 0.5 + zigzag * 2.5, 0.1).reshape(1, 1, C)
    sd[p + "a1"] = rng.lora_down(C, lora["a"])
    sd[p + "a2"] = rng.lora_up(lora["a"], C, 1.0)
    sd[p + "a0"] = rng.jitter(torch.zeros(C) - 0.19 + zigzag * 0.3 + linear * 0.4, 0.1).reshape(1, 1, C)
    # Layer 0 carries v0/v1/v2 too although they are unused there (the official loader drops them).
    sd[p + "v1"] = rng.lora_down(C, lora["v"])
    sd[p + "v2"] = rng.lora_up(lora["v"], C, 1.0)
    sd[p + "v0"] = rng.jitter(torch.zeros(C) + 0.73 - linear * 0.4, 0.1).reshape(1, 1, C)
    sd[p + "g1"] = rng.lora_down(C, lora["g"])
    sd[p + "g2"] = rng.lora_up(lora["g"], C, 2.0)
    sd[p + "k_k"] = rng.jitter(torch.zeros(C) + 0.71 - linear * 0.1, 0.05).reshape(1, 1, C)
    sd[p + "k_a"] = rng.jitter(torch.zeros(C) + 1.02, 0.05).reshape(1, 1, C)
    sd[p + "r_k"] = rng.jitter(torch.zeros(H, N) - 0.04, 0.1)  # (H, N)
    if time_state:  # RWKV-PEFT's RWKV_Tmix_x070_State; .pth orientation is [H, value, key]
        sd[p + "time_state"] = rng.randn(H, N, N) * 0.3
    sd[p + "receptance.weight"] = rng.linear(C, C, 1.0)
    sd[p + "key.weight"] = rng.linear(C, C, 0.5)
    sd[p + "value.weight"] = rng.linear(C, C, 1.0)
    sd[p + "output.weight"] = rng.linear(C, C, 1.0)
    _layernorm(sd, rng, p + "ln_x", C, ((1 + i) / L) ** 0.7)


def _ffn_v4_v5(sd, rng, p, i, L, C, F):
    _, r1a0 = _layer_ratios(i, L)
    ddd = _ddd(C)
    sd[p + "time_mix_k"] = rng.ratio(torch.pow(ddd, r1a0))
    sd[p + "time_mix_r"] = rng.ratio(torch.pow(ddd, r1a0))
    sd[p + "key.weight"] = rng.linear(F, C, 1.0)
    sd[p + "receptance.weight"] = rng.linear(C, C, 1.0)
    sd[p + "value.weight"] = rng.linear(C, F, 0.5)


def _ffn_v6(sd, rng, p, i, L, C, F):
    _, r1a0 = _layer_ratios(i, L)
    ddd = _ddd(C)
    sd[p + "time_maa_k"] = rng.ratio(1.0 - torch.pow(ddd, r1a0**3))
    sd[p + "time_maa_r"] = rng.ratio(1.0 - torch.pow(ddd, r1a0**3))
    sd[p + "key.weight"] = rng.linear(F, C, 1.0)
    sd[p + "receptance.weight"] = rng.linear(C, C, 1.0)
    sd[p + "value.weight"] = rng.linear(C, F, 0.5)


def _ffn_v7(sd, rng, p, i, L, C, F, V, deep_embed):
    _, r1a0 = _layer_ratios(i, L)
    ddd = _ddd(C)
    sd[p + "x_k"] = rng.ratio(1.0 - torch.pow(ddd, r1a0**4))
    sd[p + "key.weight"] = rng.linear(F, C, 1.0)
    sd[p + "value.weight"] = rng.linear(C, F, 0.5)
    if deep_embed:
        # rwkv7a DeepEmbed; shapes inferred from the official inference code (no public training code):
        # k *= ((LN2(x) @ s1) @ semb[tok].view(32,32)) @ s2 + s0, semb[tok] = s_emb[tok] + s_emb_x(emb_ln0[tok]).
        sd[p + "s_emb.weight"] = rng.randn(V, DE_EMB_DIM) * 0.1
        sd[p + "s_emb_x.weight"] = rng.randn(DE_EMB_DIM, C) * (0.1 / math.sqrt(C))
        sd[p + "s1"] = rng.randn(C, DE_LORA) * (1.0 / math.sqrt(C))
        sd[p + "s2"] = rng.randn(DE_LORA, F) * 0.05
        sd[p + "s0"] = rng.jitter(torch.ones(F), 0.1).reshape(1, 1, F)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def make_official_checkpoint(
    version,
    *,
    n_layer: int = 2,
    n_embd: int = 128,
    head_size: int = 64,
    ffn_dim: int | None = None,
    vocab_size: int = 1000,
    dim_att: int | None = None,
    mix_lora: int = 32,
    decay_lora: int = 64,
    w_lora: int | None = None,
    a_lora: int | None = None,
    v_lora: int | None = None,
    g_lora: int | None = None,
    time_state: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    deep_embed: bool = False,
) -> dict[str, torch.Tensor]:
    """Build a random state dict exactly as RWKV-LM would save it (key names, shapes, key order).

    ``head_size`` is ignored for v4.  ``dim_att`` (default ``n_embd``) may differ from ``n_embd`` for
    v4/5.2/6 (RWKV-LM allows it, but the official package cannot run such checkpoints, so there is no
    oracle for them, see ``official_oracle.py``); v7 requires ``dim_att == n_embd``.  ``mix_lora``/``decay_lora`` are the v6
    LoRA widths (RWKV-LM: 32/64); ``w_lora``/``a_lora``/``v_lora``/``g_lora`` are v7's, defaulting to
    RWKV-LM's formula ``v7_lora_dims(n_embd)``.  ``time_state`` adds ``blocks.i.att.time_state`` (H, N, N)
    in the .pth orientation [H, value, key] (v6 and v7 only).  ``deep_embed`` adds v7 DeepEmbed keys.
    """
    v = normalize_version(version)
    L, C, V = int(n_layer), int(n_embd), int(vocab_size)
    A = C if dim_att is None else int(dim_att)
    F = default_ffn_dim(v, C) if ffn_dim is None else int(ffn_dim)
    N = int(head_size)
    if L < 1 or C < 2 or V < 2 or F < 1:
        raise ValueError("n_layer, n_embd, vocab_size and ffn_dim must be positive")
    if v != "4" and A % N:
        raise ValueError(f"dim_att={A} is not a multiple of head_size={N}")
    if v == "7" and A != C:
        raise ValueError("RWKV-7 requires dim_att == n_embd")
    if time_state and v not in ("6", "7"):
        raise ValueError("time_state is only defined for v6 and v7")
    if deep_embed and v != "7":
        raise ValueError("deep_embed is only defined for v7")

    lora = v7_lora_dims(C)
    for key, override in (("w", w_lora), ("a", a_lora), ("v", v_lora), ("g", g_lora)):
        if override is not None:
            lora[key] = int(override)

    # One thread: the draws are many tiny ops (QR of small matrices) for which extra OpenMP threads
    # only add contention (10-50x slower on a busy 2-core machine), and results stay reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(v, L, C, V, A, F, N, lora, int(mix_lora), int(decay_lora), time_state, deep_embed, seed, dtype)
    finally:
        torch.set_num_threads(threads)


def _build(v, L, C, V, A, F, N, lora, mix_lora, decay_lora, time_state, deep_embed, seed, dtype):
    rng = _Rng(seed)
    sd: dict[str, torch.Tensor] = OrderedDict()
    sd["emb.weight"] = rng.randn(V, C)  # RWKV-LM: uniform(+-1e-4); ln0 rescales it anyway
    for i in range(L):
        b = f"blocks.{i}."
        _layernorm(sd, rng, b + "ln1", C)
        _layernorm(sd, rng, b + "ln2", C)
        if i == 0:
            _layernorm(sd, rng, b + "ln0", C)
        att, ffn = b + "att.", b + "ffn."
        if v == "4":
            _att_v4(sd, rng, att, i, L, C, A)
            _ffn_v4_v5(sd, rng, ffn, i, L, C, F)
        elif v == "5.2":
            _att_v5_2(sd, rng, att, i, L, C, A, N)
            _ffn_v4_v5(sd, rng, ffn, i, L, C, F)
        elif v == "6":
            _att_v6(sd, rng, att, i, L, C, A, N, mix_lora, decay_lora, time_state)
            _ffn_v6(sd, rng, ffn, i, L, C, F)
        else:
            _att_v7(sd, rng, att, i, L, C, N, lora, time_state)
            _ffn_v7(sd, rng, ffn, i, L, C, F, V, deep_embed)
    _layernorm(sd, rng, "ln_out", C)
    sd["head.weight"] = rng.linear(V, C, 2.5)
    return OrderedDict((k, t.to(dtype).contiguous()) for k, t in sd.items())


def save_official_checkpoint(sd: dict[str, torch.Tensor], path) -> Path:
    """``torch.save`` the dict (key order preserved), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(sd), str(path))
    return path


def describe_checkpoint(sd: dict[str, torch.Tensor]) -> dict:
    """Version and sizes of an official checkpoint, detected from key names and shapes (never key order).

    Returns a dict with ``version`` ("4" / "5.2" / "6" / "7"), ``deep_embed``, ``has_time_state``,
    ``n_layer``, ``n_embd``, ``dim_att``, ``ffn_dim``, ``vocab_size``, ``n_head``, ``head_size``
    (the last two are None for v4).
    """
    keys = list(sd.keys())
    vocab_size, n_embd = sd["emb.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
    dim_att = sd["blocks.0.att.key.weight"].shape[0]
    ffn_dim = sd["blocks.0.ffn.key.weight"].shape[0]
    if "blocks.0.att.r_k" in sd:
        version = "7"
        n_head, head_size = sd["blocks.0.att.r_k"].shape
    elif any(".time_maa" in k for k in keys):
        version = "6"
        n_head, head_size = sd["blocks.0.att.time_faaaa"].shape
    elif "blocks.0.att.ln_x.weight" in sd:
        td = sd["blocks.0.att.time_decay"]
        if td.dim() < 2 or td.shape[1] <= 1:
            raise ValueError("RWKV-5.0/5.1 checkpoints are not produced by these tests")
        version = "5.2"
        n_head, head_size = td.shape[:2]
    else:
        version = "4"
        n_head = head_size = None
    return {
        "version": version,
        "deep_embed": "blocks.0.ffn.s_emb.weight" in sd,
        "has_time_state": any(k.endswith(".att.time_state") for k in keys),
        "n_layer": int(n_layer),
        "n_embd": int(n_embd),
        "dim_att": int(dim_att),
        "ffn_dim": int(ffn_dim),
        "vocab_size": int(vocab_size),
        "n_head": None if n_head is None else int(n_head),
        "head_size": None if head_size is None else int(head_size),
    }


def official_state_from_time_state(sd: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The official list-layout initial state a ``time_state`` checkpoint implies (shifts zero, fp32).

    v5/v6: the official package auto-loads ``time_state.transpose(1, 2)`` (its S is [h, key, value]).
    v7: the official package ignores ``time_state``; RWKV-Runner (and RWKV-PEFT) use the .pth tensor
    as is, since v7's S is already [h, value, key].
    """
    info = describe_checkpoint(sd)
    if not info["has_time_state"]:
        raise ValueError("checkpoint has no time_state")
    C = info["n_embd"]
    state = []
    for i in range(info["n_layer"]):
        ts = sd[f"blocks.{i}.att.time_state"].float()
        s = ts.clone() if info["version"] == "7" else ts.transpose(1, 2).contiguous()
        state += [torch.zeros(C), s, torch.zeros(C)]
    return state


# --------------------------------------------------------------------------------------------------
# the standard oracle cases shared by the test-suite (see conftest.py: ``official_case``)
# --------------------------------------------------------------------------------------------------

#: shape name -> (builder kwargs on top of the defaults n_embd=128, head_size=64, vocab_size=1000,
#: prompt length T, versions it applies to)
CASE_SHAPES: dict[str, dict] = {
    # 3 layers, C=128, N=64 (2 heads), RWKV-LM's default FFN (4C=512 for v4/v7, 3.5C=448 for v5.2/v6)
    "base": {"kwargs": {"n_layer": 3}, "T": 32, "versions": VERSIONS},
    # 1 layer (for v5.2 this is the case the official loader misdetects in RWKV-LM key order)
    "L1": {"kwargs": {"n_layer": 1}, "T": 24, "versions": VERSIONS},
    # head size 32 (4 heads) and an FFN width that is neither 4C nor a multiple of 32 (v4: no heads)
    "hs32": {"kwargs": {"n_layer": 2, "head_size": 32, "ffn_dim": 200}, "T": 40, "versions": VERSIONS},
    # state-tuned checkpoint; the oracle starts from the time_state (official auto-load for v6,
    # RWKV-Runner's convention for v7, whose official class ignores time_state)
    "state": {"kwargs": {"n_layer": 2, "time_state": True}, "T": 28, "versions": ("6", "7")},
    # v7 DeepEmbed (rwkv7a); the oracle runs with RWKV_DE_VERSION=1
    "de": {"kwargs": {"n_layer": 2, "deep_embed": True}, "T": 32, "versions": ("7",)},
}

#: every (version, shape) pair the shared oracle fixtures provide
CASES: list[tuple[str, str]] = [(v, s) for s, spec in CASE_SHAPES.items() for v in VERSIONS if v in spec["versions"]]

#: chunk length of the chunked-prefill oracle variant for the standard cases
CASE_CHUNK = 7


def _case_seed(version: str, shape: str) -> int:
    import zlib

    return zlib.crc32(f"rwkv-case/{version}/{shape}".encode()) & 0x7FFFFFFF


def case_kwargs(version, shape: str) -> dict:
    """``make_official_checkpoint`` keyword arguments (including the seed) of a standard case."""
    v = normalize_version(version)
    spec = CASE_SHAPES[shape]
    if v not in spec["versions"]:
        raise KeyError(f"shape {shape!r} is not defined for v{v}")
    return {"n_embd": 128, "head_size": 64, "vocab_size": 1000, **spec["kwargs"], "seed": _case_seed(v, shape)}


def case_tokens(version, shape: str) -> list[int]:
    """The prompt of a standard case: T random ids that include 0 and vocab_size-1 (edge rows)."""
    v = normalize_version(version)
    spec = CASE_SHAPES[shape]
    vocab = case_kwargs(v, shape)["vocab_size"]
    g = torch.Generator().manual_seed(_case_seed(v, shape) + 1)
    tokens = torch.randint(0, vocab, (spec["T"],), generator=g).tolist()
    tokens[1], tokens[-3] = 0, vocab - 1
    return tokens
