"""RWKV-4, 5.2, 6 and 7 as transformers models.

Read top to bottom: helpers -> time mix of each generation -> channel mix of each generation -> block ->
``RwkvPreTrainedModel`` -> ``RwkvModel`` -> ``RwkvForCausalLM``.

Parameter names follow the official checkpoint keys (``blocks.3.att.time_decay``, ``blocks.3.ffn.key.weight``
...) so this file can be read next to the paper and the ``.pth`` file; the converter only squeezes the
``(1, 1, C)`` mixing vectors. The parameters are stored raw (as trained): every derived quantity (decays,
bonuses) is computed in fp32 in ``forward``, so ``save_pretrained`` always writes what was loaded.

The WKV recurrences themselves live in ``ops_rwkv_hf`` (PyTorch reference + chunked form + CUDA dispatch).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .cache_rwkv_hf import CHANNEL_SHIFT, TIME_SHIFT, RwkvCache
from .chat_rwkv_hf import RwkvChatModelMixin
from .compat_rwkv_hf import CACHE_ARG, TRANSFORMERS_VERSION, cache_kwargs, reject_unknown_kwargs
from .configuration_rwkv_hf import RwkvConfig
from .ops_rwkv_hf import empty_wkv4_state, wkv4, wkv5, wkv7
from .state_rwkv_hf import (
    get_init_state,
    init_state_cache,
    list_init_states,
    load_init_state,
    mix_init_states,
    save_init_state,
    set_default_init_state,
    unload_init_state,
)

logger = logging.get_logger(__name__)

V4_PAD_KEY = -1e30  # a key so negative that a padded token carries no weight in the RWKV-4 WKV
V7_DECAY_SCALE = math.exp(-0.5)  # RWKV-7 decay = exp(-e^-0.5 * sigmoid(w)), in (0.545, 1)


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def token_shift(x: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
    """x_{t-1} for every t: the cached previous token for t = 0 (zeros for a fresh state). x: [B, T, C]."""
    if previous is None:
        previous = torch.zeros_like(x[:, 0])
    if x.shape[1] == 1:  # decoding: the previous token is all there is
        return previous.to(x.dtype).unsqueeze(1)
    return torch.cat([previous.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)


def mix(x: torch.Tensor, shifted: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """RWKV-4/5's token shift x * ratio + prev * (1 - ratio), as one lerp (RWKV-6/7 write x + (prev - x) * maa)."""
    return torch.lerp(shifted, x, ratio)


def masked(x: torch.Tensor, mask: Optional[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
    """Replace padded positions (mask False) by ``fill``; ``where`` so that a NaN there cannot leak through."""
    if mask is None:
        return x
    mask = mask.view(mask.shape + (1,) * (x.dim() - mask.dim()))
    return torch.where(mask, x, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


def last_real(x: torch.Tensor, trailing: Optional[torch.Tensor], previous: Optional[torch.Tensor]) -> torch.Tensor:
    """x at each row's last real token: the last position, or before the row's right padding (``trailing`` [B]
    pads at its end). A row with no real token at all keeps ``previous`` (zeros for a fresh state)."""
    if trailing is None:
        return x[:, -1]
    B, T = x.shape[:2]
    rows = torch.arange(B, device=x.device)
    last = x[rows, (T - 1 - trailing).clamp(min=0)]
    empty = (trailing >= T).view(B, *([1] * (x.dim() - 2)))
    keep = torch.zeros_like(last) if previous is None else previous.to(last.dtype)
    return torch.where(empty, keep, last)


def scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x * scale, skipping the op for the usual scale of 1 (fp16 rescaling is the only other case)."""
    return x if scale == 1.0 else x * scale


def group_norm_heads(y: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """RWKV's ``ln_x``: GroupNorm with one group per head over y [B, T, H, N], in the norm's dtype (fp32 as
    loaded). Called as a module, so that accelerate's offload hooks bring its weights in first."""
    B, T, H, N = y.shape
    return norm(y.reshape(B * T, H * N).to(norm.weight.dtype)).view(B, T, H * N)


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


# What generate hands on to the model's inputs without the model needing it (see prepare_inputs_for_generation).
GENERATE_ONLY_INPUTS = ("tokenizer", "assistant_tokenizer")


def one_cache_argument(cache, past_key_values, output_attentions=None):
    """The state passed as ``cache`` (transformers >= 5.24) or ``past_key_values`` (the older name), not both."""
    if output_attentions:
        raise ValueError("output_attentions=True: RWKV has no attention weights to return")
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the recurrent state once, as `cache` (or its older name `past_key_values`), not both")
    return cache if cache is not None else past_key_values


def document_starts(attention_mask, batch_size, seq_len, position_ids=None, seq_idx=None, cu_seq_lens_q=None, cu_seq_lens_k=None):
    """Where packed documents start: a bool [B, T] (True at each document's first token, always at t = 0), or None
    when every row holds one document (the usual case, and every generate step).

    Each marker transformers' and TRL's packing collators send is read: a position 0, a change of ``seq_idx``, an
    offset in ``cu_seq_lens`` (over the flattened [B * T] tokens). A start counts only at a real token with a real
    token before it in its row, so left padding (generate's positions restart at the first real token) is not a
    document boundary. Markers that disagree about a start are refused, naming where.
    """
    B, T = batch_size, seq_len
    markers = {}
    for name, value in (("position_ids", position_ids), ("seq_idx", seq_idx)):
        if value is None:
            continue
        if value.dim() != 2 or value.shape[-1] != T or value.shape[0] not in (1, B):
            raise ValueError(f"{name} must be [batch, tokens] = [{B}, {T}], got {tuple(value.shape)}")
        value = value.expand(B, T)
        if name == "position_ids":
            markers[name] = value == 0
        else:
            markers[name] = torch.cat([torch.ones_like(value[:, :1], dtype=torch.bool), value[:, 1:] != value[:, :-1]], 1)
    for name, value in (("cu_seq_lens_q", cu_seq_lens_q), ("cu_seq_lens_k", cu_seq_lens_k)):
        if value is None:
            continue
        offsets = value.tolist() if value.dim() == 1 else None
        row_starts = set(range(0, B * T, T))
        if (
            not offsets
            or offsets[0] != 0
            or offsets[-1] != B * T
            or any(b <= a for a, b in zip(offsets, offsets[1:]))
            or not row_starts <= set(offsets)
        ):
            raise ValueError(
                f"{name} must be increasing offsets into the {B} x {T} flattened tokens, from 0 to {B * T}, with a "
                f"document starting at every row start {sorted(row_starts)[:8]}; got {value.tolist() if value.numel() <= 16 else tuple(value.shape)}"
            )
        flat = torch.zeros(B * T, dtype=torch.bool, device=value.device)
        flat[torch.tensor(offsets[:-1], device=value.device)] = True
        markers[name] = flat.view(B, T)
    if not markers:
        return None

    real = attention_mask[:, -T:].bool() if attention_mask is not None else None
    if real is None:
        real = torch.ones(B, T, dtype=torch.bool, device=next(iter(markers.values())).device)
    real_before = (real.long().cumsum(1) - real.long()) > 0
    counted = {name: (m.to(real.device) & real & real_before) for name, m in markers.items()}
    names = list(counted)
    for other in names[1:]:
        disagree = counted[names[0]] != counted[other]
        if bool(disagree.any()):
            row, col = (int(i) for i in disagree.nonzero()[0])
            starts_in = names[0] if bool(counted[names[0]][row, col]) else other
            raise ValueError(
                f"packed-batch markers disagree: {starts_in} starts a document at row {row}, token {col}, "
                f"{other if starts_in == names[0] else names[0]} does not"
            )
    starts = counted[names[0]]
    if not bool(starts.any()):
        return None
    starts = starts.clone()
    starts[:, 0] = True
    return starts


class LayerState:
    """The state one block reads and writes: shift inputs of both mixes and the WKV state."""

    __slots__ = ("time_shift", "channel_shift", "wkv")

    def __init__(self, time_shift=None, channel_shift=None, wkv=None):
        self.time_shift, self.channel_shift, self.wkv = time_shift, channel_shift, wkv


# transformers' output classes, readable as ``.cache`` on every supported release: from 5.24 that is their field
# (``.past_key_values`` a deprecated alias), before it an alias of their ``past_key_values`` field.
@dataclass
class RwkvModelOutput(BaseModelOutputWithPast):
    if CACHE_ARG != "cache":
        cache = property(lambda self: self.past_key_values, doc="The recurrent state (an RwkvCache).")


@dataclass
class RwkvCausalLMOutput(CausalLMOutputWithPast):
    if CACHE_ARG != "cache":
        cache = property(lambda self: self.past_key_values, doc="The recurrent state (an RwkvCache).")


# ---------------------------------------------------------------------------------------------------------
# Time mix (the "attention" of RWKV), one class per generation
# ---------------------------------------------------------------------------------------------------------


class Rwkv4TimeMix(nn.Module):
    """RWKV-4: per-channel WKV with decay w = -exp(time_decay) and current-token bonus u = time_first."""

    def __init__(self, config: RwkvConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, A = config.hidden_size, config.attention_hidden_size
        self.time_decay = nn.Parameter(torch.empty(A))
        self.time_first = nn.Parameter(torch.empty(A))
        self.time_mix_k = nn.Parameter(torch.empty(C))
        self.time_mix_v = nn.Parameter(torch.empty(C))
        self.time_mix_r = nn.Parameter(torch.empty(C))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)

    def forward(self, x, state: LayerState, mask, out_scale: float = 1.0, trailing=None):
        shifted = token_shift(x, state.time_shift)
        r = torch.sigmoid(self.receptance(mix(x, shifted, self.time_mix_r)))
        k = self.key(mix(x, shifted, self.time_mix_k)).float()
        v = self.value(mix(x, shifted, self.time_mix_v)).float()
        k = masked(k, mask, V4_PAD_KEY)
        wkv_state = state.wkv if state.wkv is not None else empty_wkv4_state(x.shape[0], k.shape[-1], x.device)
        decay = torch.exp(self.time_decay.float())
        y, new_wkv = wkv4(-decay, self.time_first.float(), k, v, wkv_state)
        if trailing is not None:
            # A pad writes nothing (k = -1e30) but still decays the state: each one lowers the log-scale pp by
            # exp(time_decay). Undo that for right padding, so the state is the one after the last real token.
            new_wkv = torch.cat([new_wkv[:, :2], (new_wkv[:, 2] + trailing[:, None] * decay).unsqueeze(1)], 1)
        return self.output(scaled(r * y.to(r.dtype), out_scale)), new_wkv


class Rwkv5TimeMix(nn.Module):
    """RWKV-5.2: matrix-valued WKV per head with a per-channel constant decay and bonus ``time_faaaa``."""

    def __init__(self, config: RwkvConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, A = config.hidden_size, config.attention_hidden_size
        self.num_heads, self.head_size = config.num_attention_heads, config.head_size
        self.gn_eps = config.group_norm_epsilon
        self.init_token_shift_and_decay(config)
        self.time_faaaa = nn.Parameter(torch.empty(self.num_heads, self.head_size))
        self.receptance = nn.Linear(C, A, bias=False)
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.gate = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.ln_x = nn.GroupNorm(self.num_heads, A, eps=self.gn_eps)

    def init_token_shift_and_decay(self, config: RwkvConfig):
        """The parameters where 5.2 and 6 differ: static mixes and a constant per-channel decay here."""
        for name in ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g"):
            setattr(self, name, nn.Parameter(torch.empty(config.hidden_size)))
        self.time_decay = nn.Parameter(torch.empty(self.num_heads, self.head_size))

    def mixed_inputs(self, x, shifted):
        return tuple(mix(x, shifted, m) for m in (self.time_mix_r, self.time_mix_k, self.time_mix_v, self.time_mix_g))

    def log_decay(self, x, shifted, xw):
        return -torch.exp(self.time_decay.float()).expand(x.shape[0], x.shape[1], -1, -1)

    def forward(self, x, state: LayerState, mask, out_scale: float = 1.0):
        B, T, _ = x.shape
        H, N = self.num_heads, self.head_size
        shifted = token_shift(x, state.time_shift)
        xr, xk, xv, xg, *xw = self.mixed_inputs(x, shifted)
        r = self.receptance(xr).view(B, T, H, N)
        k = self.key(xk).view(B, T, H, N)
        v = self.value(xv).view(B, T, H, N)
        g = F.silu(self.gate(xg))
        log_w = self.log_decay(x, shifted, xw[0] if xw else None)
        # Padding: k = 0 writes nothing and log_w = 0 keeps the state, so a pad step is the identity.
        k, log_w = masked(k, mask), masked(log_w, mask)
        wkv_state = state.wkv if state.wkv is not None else x.new_zeros(B, H, N, N, dtype=torch.float32)
        y, new_wkv = wkv5(r, k, v, log_w, self.time_faaaa.float(), wkv_state)
        y = group_norm_heads(y, self.ln_x).to(x.dtype)
        return self.output(scaled(y * g, out_scale)), new_wkv


class Rwkv6TimeMix(Rwkv5TimeMix):
    """RWKV-6: RWKV-5.2 with data-dependent token shift (LoRA ``time_maa_w1/w2``) and per-token decay."""

    def init_token_shift_and_decay(self, config: RwkvConfig):
        C, A = config.hidden_size, config.attention_hidden_size
        Dm, Dd = config.time_mix_extra_dim, config.time_decay_extra_dim
        for name in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g"):
            setattr(self, name, nn.Parameter(torch.empty(C)))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * Dm))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, Dm, C))
        self.time_decay = nn.Parameter(torch.empty(A))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, Dd))
        self.time_decay_w2 = nn.Parameter(torch.empty(Dd, A))

    def mixed_inputs(self, x, shifted):
        B, T, C = x.shape
        delta = shifted - x  # v6/v7 convention: x + (prev - x) * maa
        lora = torch.tanh((x + delta * self.time_maa_x) @ self.time_maa_w1).view(B * T, 5, -1).transpose(0, 1)
        mw, mk, mv, mr, mg = torch.bmm(lora, self.time_maa_w2).view(5, B, T, C).unbind(0)
        return (
            x + delta * (self.time_maa_r + mr),
            x + delta * (self.time_maa_k + mk),
            x + delta * (self.time_maa_v + mv),
            x + delta * (self.time_maa_g + mg),
            x + delta * (self.time_maa_w + mw),
        )

    def log_decay(self, x, shifted, xw):
        B, T, _ = x.shape
        decay = self.time_decay.float() + (torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2).float()
        return -torch.exp(decay).view(B, T, self.num_heads, self.head_size)


class Rwkv7TimeMix(nn.Module):
    """RWKV-7: generalised delta rule with in-context learning rate ``a`` and value residual from layer 0."""

    def __init__(self, config: RwkvConfig, layer_id: int):
        super().__init__()
        C = config.hidden_size
        self.layer_id = layer_id
        self.num_heads, self.head_size = config.num_attention_heads, config.head_size
        self.gn_eps = config.group_norm_epsilon
        H, N = self.num_heads, self.head_size
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.empty(C)))
        self.w1 = nn.Parameter(torch.empty(C, config.decay_low_rank_dim))
        self.w2 = nn.Parameter(torch.empty(config.decay_low_rank_dim, C))
        self.a1 = nn.Parameter(torch.empty(C, config.a_low_rank_dim))
        self.a2 = nn.Parameter(torch.empty(config.a_low_rank_dim, C))
        if layer_id > 0:  # layer 0 defines v_first; the value-residual LoRA only exists after it
            self.v0 = nn.Parameter(torch.empty(C))
            self.v1 = nn.Parameter(torch.empty(C, config.v_low_rank_dim))
            self.v2 = nn.Parameter(torch.empty(config.v_low_rank_dim, C))
        self.g1 = nn.Parameter(torch.empty(C, config.gate_low_rank_dim))
        self.g2 = nn.Parameter(torch.empty(config.gate_low_rank_dim, C))
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=self.gn_eps)

    def forward(self, x, state: LayerState, mask, v_first, out_scale: float = 1.0):
        B, T, C = x.shape
        H, N = self.num_heads, self.head_size
        delta = token_shift(x, state.time_shift) - x
        # x + delta * mix for the six mixes in one op (decode is bound by per-op overhead on CPU)
        mixes = torch.stack([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g])[:, None, None, :]
        xr, xw, xk, xv, xa, xg = torch.addcmul(x, delta, mixes).unbind(0)

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        w = torch.tanh(xw @ self.w1) @ self.w2
        iclr = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate "a"
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)
        k = k * (1 + (iclr - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        log_w = -V7_DECAY_SCALE * torch.sigmoid((self.w0 + w).float())

        k, v4d, r4d = k.view(B, T, H, N), v.view(B, T, H, N), r.view(B, T, H, N)
        a, b = -kk, kk * iclr.view(B, T, H, N)
        # Padding: no write (k = 0, b = 0), no decay (log_w = 0): the pad step is the identity.
        wkv_k, log_w, b = masked(k, mask), masked(log_w.view(B, T, H, N), mask), masked(b, mask)
        wkv_state = state.wkv if state.wkv is not None else x.new_zeros(B, H, N, N, dtype=torch.float32)
        y, new_wkv = wkv7(r4d, log_w, wkv_k, v4d, a, b, wkv_state)

        y = group_norm_heads(y, self.ln_x).to(x.dtype)
        bonus = (r4d * k * self.r_k).sum(dim=-1, keepdim=True) * v4d  # the current token's own term
        y = y + bonus.view(B, T, C)
        return self.output(scaled(y * g, out_scale)), new_wkv, v_first


# ---------------------------------------------------------------------------------------------------------
# Channel mix (the "FFN" of RWKV)
# ---------------------------------------------------------------------------------------------------------


class Rwkv4ChannelMix(nn.Module):
    """RWKV-4 and 5.2: sigmoid(R x_r) * V relu(K x_k)^2."""

    def __init__(self, config: RwkvConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, F_ = config.hidden_size, config.intermediate_size
        self.time_mix_k = nn.Parameter(torch.empty(C))
        self.time_mix_r = nn.Parameter(torch.empty(C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def mixed_inputs(self, x, shifted):
        return mix(x, shifted, self.time_mix_k), mix(x, shifted, self.time_mix_r)

    def forward(self, x, previous, out_scale: float = 1.0):
        xk, xr = self.mixed_inputs(x, token_shift(x, previous))
        k = torch.relu(self.key(xk)) ** 2
        return torch.sigmoid(self.receptance(xr)) * self.value(scaled(k, out_scale))


class Rwkv6ChannelMix(Rwkv4ChannelMix):
    """RWKV-6: the same maths with the maa convention (maa = 1 - mix)."""

    def __init__(self, config: RwkvConfig, layer_id: int):
        nn.Module.__init__(self)
        self.layer_id = layer_id
        C, F_ = config.hidden_size, config.intermediate_size
        self.time_maa_k = nn.Parameter(torch.empty(C))
        self.time_maa_r = nn.Parameter(torch.empty(C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def mixed_inputs(self, x, shifted):
        delta = shifted - x
        return x + delta * self.time_maa_k, x + delta * self.time_maa_r


class Rwkv7ChannelMix(nn.Module):
    """RWKV-7: V relu(K x_k)^2, no receptance."""

    def __init__(self, config: RwkvConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, F_ = config.hidden_size, config.intermediate_size
        self.x_k = nn.Parameter(torch.empty(C))
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x, previous, out_scale: float = 1.0):
        xk = x + (token_shift(x, previous) - x) * self.x_k
        return self.value(scaled(torch.relu(self.key(xk)) ** 2, out_scale))


TIME_MIX = {"4": Rwkv4TimeMix, "5.2": Rwkv5TimeMix, "6": Rwkv6TimeMix, "7": Rwkv7TimeMix}
CHANNEL_MIX = {"4": Rwkv4ChannelMix, "5.2": Rwkv4ChannelMix, "6": Rwkv6ChannelMix, "7": Rwkv7ChannelMix}


# ---------------------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------------------


class RwkvBlock(nn.Module):
    """Pre-LN block: x += TimeMix(LN1(x)); x += ChannelMix(LN2(x)). Block 0 also owns ``ln0`` (after the embedding)."""

    def __init__(self, config: RwkvConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.is_v7 = config.rwkv_version == "7"
        eps = config.layer_norm_epsilon
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.att = TIME_MIX[config.rwkv_version](config, layer_id)
        self.ffn = CHANNEL_MIX[config.rwkv_version](config, layer_id)

    def forward(self, hidden, state: LayerState, mask, v_first=None, out_scale: float = 1.0, trailing=None):
        """``mask``: [B, T] real tokens (None: all real); ``trailing``: [B] right-padding lengths (None: none)."""
        # The shift states are the LN outputs; padded positions are zeroed *after* LN (LN(0) = bias != 0) so the
        # first real token sees the same zero "previous token" as an unpadded run.
        x = masked(self.ln1(hidden), mask)
        if self.is_v7:
            att_out, wkv, v_first = self.att(x, state, mask, v_first, out_scale)
        elif trailing is not None and isinstance(self.att, Rwkv4TimeMix):
            att_out, wkv = self.att(x, state, mask, out_scale, trailing)
        else:
            att_out, wkv = self.att(x, state, mask, out_scale)
        hidden = hidden + att_out
        time_shift = last_real(x, trailing, state.time_shift)
        x = masked(self.ln2(hidden), mask)
        hidden = hidden + self.ffn(x, state.channel_shift, out_scale)
        return hidden, LayerState(time_shift, last_real(x, trailing, state.channel_shift), wkv), v_first


# ---------------------------------------------------------------------------------------------------------
# Pre-trained model base
# ---------------------------------------------------------------------------------------------------------


def _foreign_model_type(folder: str) -> Optional[str]:
    """The model_type of a folder of another library's model (transformers' RWKV-4, an RWKV-7 in
    flash-linear-attention's names, ...), None for ours or for no readable config (transformers reports that)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if model_type not in (None, RwkvConfig.model_type) else None


def _from_foreign_layout(cls, folder: str, model_type: str, kwargs: dict):
    """Another library's folder, loaded by renaming its weights to RWKV-LM's and building this model on them (the
    converter's path, in memory). Loaded as this model directly, every differently named weight would be random."""
    try:
        from .convert_rwkv_hf import model_from_folder
    except ImportError:  # the remote-code copy of this file travels without the converter
        raise ValueError(
            f"{folder} holds a model of type {model_type!r}, not {RwkvConfig.model_type!r}: convert it with "
            "`rwkv-hf convert FOLDER OUT` (pip install rwkv_hf)"
        ) from None
    unsupported = sorted(k for k in kwargs if k not in ("dtype", "torch_dtype", "trust_remote_code"))
    if unsupported:
        raise ValueError(
            f"{folder} is a {model_type!r} folder, read by renaming its weights; only dtype applies there, not "
            f"{unsupported}: convert it once (`rwkv-hf convert FOLDER OUT`) and load the result with these"
        )
    model = model_from_folder(folder, dtype=kwargs.get("dtype", kwargs.get("torch_dtype")))
    return model if isinstance(model, cls) else model.rwkv


def _check_weight_dtypes(folder: str) -> None:
    """Every tensor in a folder's safetensors files is floating point: transformers would cast an integer tensor
    (a corrupt or tampered file) to the parameter dtype without a word. Reads the headers only."""
    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):  # sharded: the files the index names, not whatever else the folder holds
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f).get("weight_map", {}).values()))
    else:
        names = ["model.safetensors"] if os.path.isfile(os.path.join(folder, "model.safetensors")) else []
    for name in names:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if dtype not in ("F32", "F16", "BF16", "F64"):
                    raise ValueError(
                        f"{name}: weight {key} is stored as {dtype}; expected a floating-point tensor (F32, BF16 "
                        "or F16). The file is corrupt or not an RWKV checkpoint"
                    )


class RwkvPreTrainedModel(PreTrainedModel):
    config_class = RwkvConfig
    base_model_prefix = "rwkv"
    _no_split_modules = ["RwkvBlock"]
    _is_stateful = True
    supports_gradient_checkpointing = True
    # Decays and bonuses are exponentiated: keep them fp32 whatever dtype the model loads in (as the official
    # package does), along with the per-head GroupNorm.
    _keep_in_fp32_modules_strict = ["time_decay", "time_first", "time_faaaa", "ln_x"]

    # Initial states (state files, mounting, tuning; see state_rwkv_hf): functions of the model, used as methods.
    load_init_state = load_init_state
    save_init_state = save_init_state
    unload_init_state = unload_init_state
    mix_init_states = mix_init_states
    list_init_states = list_init_states
    set_default_init_state = set_default_init_state
    get_init_state = get_init_state
    init_state_cache = init_state_cache

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers', but a checkpoint whose weights disagree with its config is an error, not a warning.

        transformers only warns about missing or unexpected weights and then initialises the missing ones at
        random: for a folder whose config.json says 12 layers but whose weights hold 24, that is a silently
        wrong model.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if path is not None and os.path.isdir(str(path)):
            foreign = _foreign_model_type(str(path))
            if foreign is not None:
                rest = {k: v for k, v in kwargs.items() if k != "pretrained_model_name_or_path"}
                model = _from_foreign_layout(cls, str(path), foreign, rest)
                return (model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}) if wants_info else model
            _check_weight_dtypes(str(path))
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(problems.values()):
            config = model.config
            details = "; ".join(f"{k.replace('_', ' ')}: {v[:8]}" for k, v in problems.items() if v)
            raise ValueError(
                f"The weights do not match the config (RWKV-{config.rwkv_version}, {config.num_hidden_layers} layers, "
                f"hidden_size {config.hidden_size}, vocab {config.vocab_size}): {details}. Was config.json edited, or "
                "are the weights from another model?"
            )
        if model.config.rwkv_version != "4" and path is not None:
            # A converted state-tuned checkpoint keeps its merged time_state beside the weights: start from it.
            from .state_rwkv_hf import attach_default_init_state

            attach_default_init_state(model, path, **kwargs)
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers', with a mounted default initial state saved beside the weights (not inside them)."""
        base = getattr(self, "rwkv", self)
        if getattr(base, "init_state", None) is not None and kwargs.get("state_dict") is None:
            kwargs["state_dict"] = {k: v for k, v in self.state_dict().items() if ".init_state." not in f".{k}"}
        super().save_pretrained(save_directory, *args, **kwargs)
        from .state_rwkv_hf import save_default_init_state

        save_default_init_state(self, save_directory)

    @torch.no_grad()
    def _init_weights(self, module):
        """RWKV-LM's initialisation, so that ``from_config`` models train like the official ones."""
        config = self.config
        if isinstance(module, nn.Embedding):
            module.weight.uniform_(-1e-4, 1e-4)
        elif isinstance(module, nn.Linear):
            if module is getattr(self, "head", None):
                module.weight.normal_(0.0, 0.5 / math.sqrt(config.hidden_size))
            else:
                module.weight.normal_(0.0, 0.02)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, (Rwkv4TimeMix, Rwkv5TimeMix, Rwkv7TimeMix, Rwkv4ChannelMix, Rwkv7ChannelMix)):
            _init_rwkv_mix(module, config)


def _init_rwkv_mix(module: nn.Module, config: RwkvConfig):
    """Ratios and curves of RWKV-LM (``RWKV-v4neo``, ``x052``, ``x060``, ``x070`` model code). Runs after
    ``nn.Module.apply`` has initialised the module's Linear children, so it may override them."""
    layer_id, L, C = module.layer_id, config.num_hidden_layers, config.hidden_size
    ratio_0_to_1 = layer_id / max(L - 1, 1)
    ratio_1_to_almost0 = 1.0 - layer_id / L
    ddd = torch.arange(C, dtype=torch.float32) / C
    A = config.attention_hidden_size
    n = torch.arange(A, dtype=torch.float32)
    linear = n / max(A - 1, 1) - 0.5
    params = dict(module.named_parameters(recurse=False))

    def put(name, value):
        if name in params:
            params[name].copy_(torch.as_tensor(value, dtype=torch.float32).expand(params[name].numel()).view_as(params[name]))

    def uniform(linear_module, scale):
        linear_module.weight.uniform_(-scale / math.sqrt(C), scale / math.sqrt(C))

    # Token-shift mixes: early layers lean on the current token, deep layers on the previous one.
    for name in ("time_mix_k", "time_mix_g"):
        put(name, ddd**ratio_1_to_almost0)
    put("time_mix_v", ddd**ratio_1_to_almost0 + 0.3 * ratio_0_to_1)
    put("time_mix_r", ddd ** (0.5 * ratio_1_to_almost0))
    for name in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_g", "time_maa_r", "time_maa_v"):
        put(name, 1.0 - ddd**ratio_1_to_almost0)
    for name in ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2"):
        if name in params:
            params[name].uniform_(-0.01, 0.01)

    if isinstance(module, Rwkv4TimeMix):
        put("time_decay", -5 + 8 * (n / max(A - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1))
        zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(A)], dtype=torch.float32) * 0.5
        put("time_first", math.log(0.3) + zigzag)
    elif isinstance(module, Rwkv5TimeMix):
        put("time_decay", -6 + 5 * (n / max(A - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1))
        zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(A)], dtype=torch.float32) * 0.1
        put("time_faaaa", ratio_0_to_1 * (1 - n / max(A - 1, 1)) + zigzag)
    elif isinstance(module, Rwkv7TimeMix):
        N = config.head_size
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            put(name, 1.0 - ddd ** (power * ratio_1_to_almost0))
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        put("w0", -6 + 6 * (n / max(A - 1, 1)) ** (1 + ratio_0_to_1**0.3) + 0.5 + zigzag * 2.5)
        put("a0", -0.19 + zigzag * 0.3 + linear * 0.4)
        put("v0", 0.73 - linear * 0.4)
        put("k_k", 0.71 - linear * 0.1)
        put("k_a", 1.02)
        put("r_k", -0.04)
        # RWKV-LM zero-inits the first LoRA factors and gives the second a small orthogonal scale.
        for name in ("w1", "a1", "v1", "g1"):
            if name in params:
                params[name].zero_()
        for name in ("w2", "a2", "v2", "g2"):
            if name in params:
                params[name].uniform_(-0.1 / math.sqrt(params[name].shape[0]), 0.1 / math.sqrt(params[name].shape[0]))
        uniform(module.receptance, 0.5)
        uniform(module.key, 0.05)
        uniform(module.value, 0.5)
        module.output.weight.zero_()
        module.ln_x.weight.fill_(((1 + layer_id) / L) ** 0.7)
    elif isinstance(module, Rwkv7ChannelMix):
        put("x_k", 1.0 - ddd ** (ratio_1_to_almost0**4))
        uniform(module.key, 0.5)
        module.value.weight.zero_()


# ---------------------------------------------------------------------------------------------------------
# Base model
# ---------------------------------------------------------------------------------------------------------


class RwkvHfModel(RwkvPreTrainedModel):
    # Loading the base model from a causal-LM folder leaves the head out on purpose.
    _keys_to_ignore_on_load_unexpected = [r"^head\."]

    def __init__(self, config: RwkvConfig):
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList([RwkvBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        # The state a fresh sequence starts from: None (zeros), or a module set by ``load_init_state`` / state
        # tuning whose ``layer_states(batch_size, dtype, device, name)`` returns one
        # (time_shift, channel_shift, wkv) triple per layer. Kept out of the default state dict on purpose.
        self.init_state = None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.emb

    def set_input_embeddings(self, value):
        self.emb = value

    def _rescale_every(self, dtype: torch.dtype) -> int:
        # RWKV-4/5/6 halve the residual every `rescale_every` blocks in fp16 so it stays in range (the official
        # package's RWKV_RESCALE_LAYER). Here the activations are scaled, never the stored weights.
        if dtype == torch.float16 and self.config.rwkv_version != "7":
            return self.config.rescale_every
        return 0

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        cache: Optional[RwkvCache] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        init_state: Optional[str] = None,
        past_key_values: Optional[RwkvCache] = None,
        output_attentions: Optional[bool] = None,
        position_ids: Optional[torch.LongTensor] = None,
        seq_idx: Optional[torch.Tensor] = None,
        cu_seq_lens_q: Optional[torch.Tensor] = None,
        cu_seq_lens_k: Optional[torch.Tensor] = None,
        max_length_q: Optional[int] = None,
        max_length_k: Optional[int] = None,
        **kwargs,
    ) -> Union[Tuple, RwkvModelOutput]:
        r"""
        cache (`RwkvCache`, *optional*): the recurrent state to continue from (also accepted as
            ``past_key_values``, the name transformers used before 5.24); updated in place unless frozen.
        init_state (`str`, *optional*): name of a mounted initial state to start fresh sequences from (see
            ``load_init_state``); ignored when ``cache`` already holds a state.
        position_ids, seq_idx, cu_seq_lens_q, cu_seq_lens_k (*optional*): packed documents, as transformers'
            ``DataCollatorWithFlattening`` and TRL's packing / padding-free collators mark them. RWKV has no
            positions; these only say where a new document starts (a position 0, a new ``seq_idx``, a
            ``cu_seq_lens`` offset), and every document then starts from the initial state, exactly as if run
            alone. ``max_length_q/k`` are accepted and unused.
        """
        reject_unknown_kwargs(type(self).__name__, kwargs)
        given_cache = one_cache_argument(cache, past_key_values, output_attentions)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.shape[1] == 0:
                raise ValueError(
                    f"input_ids must be [batch, tokens] with at least one token, got shape {tuple(input_ids.shape)}"
                )
            # A host sync, skipped while torch.compile traces (it would break the graph); compiled code checks
            # the embedding's indices itself.
            low, high = (0, 0) if _compiling() else (int(input_ids.min()), int(input_ids.max()))
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids contain token id {low if low < 0 else high} outside the vocabulary "
                    f"[0, {self.config.vocab_size})"
                )
            inputs_embeds = self.emb(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"inputs_embeds must be [batch, tokens, hidden] with tokens >= 1, got {tuple(inputs_embeds.shape)}")
        B, T, _ = inputs_embeds.shape

        hidden = self.blocks[0].ln0(inputs_embeds)
        starts = document_starts(attention_mask, B, T, position_ids, seq_idx, cu_seq_lens_q, cu_seq_lens_k)
        if starts is not None:
            if given_cache is not None:
                raise ValueError(
                    "a packed batch (a document starting after the first token of a row, from position_ids / seq_idx "
                    "/ cu_seq_lens) cannot continue a recurrent state: pass no cache, or one document per row"
                )
            cache = None  # each document's final state is its own: a packed call hands back no cache
            hidden, all_hidden = self._run_packed(hidden, starts, attention_mask, init_state, output_hidden_states)
        else:
            cache = self._cache_for(given_cache, use_cache, B)
            continuing = cache is not None and cache.is_initialized
            mask, trailing = self._padding(attention_mask, B, T, continuing and self.config.rwkv_version == "4")
            # One forward at a time may advance a cache (a frozen one is copied instead, see _cache_for).
            # (Not checked while torch.compile traces: a lock cannot be traced; compiled callers own their cache.)
            with cache.exclusive() if cache is not None and not _compiling() else contextlib.nullcontext():
                hidden, all_hidden = self._run_blocks(hidden, cache, mask, trailing, init_state, output_hidden_states)
        hidden = self.ln_out(hidden)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden,)

        if not return_dict:
            return tuple(x for x in (hidden, cache, all_hidden) if x is not None)
        return RwkvModelOutput(last_hidden_state=hidden, hidden_states=all_hidden, **cache_kwargs(cache))

    def _run_blocks(self, hidden, cache, mask, trailing, init_state, output_hidden_states):
        B, T = hidden.shape[:2]
        # Decided once, before layer 0 writes into the cache: a fresh sequence starts every layer from the
        # initial state (zeros, or a mounted / tuned one); a continued one reads every layer from the cache.
        fresh = cache is None or not cache.is_initialized
        start = self._initial_layer_states(B, hidden.dtype, hidden.device, init_state) if fresh else None
        rescale = self._rescale_every(hidden.dtype)
        all_hidden = (hidden,) if output_hidden_states else None
        v_first = None
        for i, block in enumerate(self.blocks):
            if fresh:
                state = start[i] if start is not None else LayerState()
            else:
                state = LayerState(cache.shift_state(i, TIME_SHIFT), cache.shift_state(i, CHANNEL_SHIFT), cache.wkv_state(i))
            out_scale = 2.0 ** -(i // rescale) if rescale else 1.0
            if self.gradient_checkpointing and self.training:
                hidden, new_state, v_first = self._gradient_checkpointing_func(
                    block.__call__, hidden, state, mask, v_first, out_scale, trailing
                )
            else:
                hidden, new_state, v_first = block(hidden, state, mask, v_first, out_scale, trailing)
            if rescale and (i + 1) % rescale == 0:
                hidden = hidden / 2
            if cache is not None:
                cache.update(i, new_state.time_shift, new_state.wkv, new_state.channel_shift)
            if output_hidden_states:
                all_hidden += (hidden,)
        if cache is not None:
            cache.seen_tokens += T
        return hidden, all_hidden

    def _run_packed(self, hidden, starts, attention_mask, init_state, output_hidden_states):
        """Each packed document run from the initial state, as if alone: the documents are cut out of the rows,
        those of equal length batched together (no padding added), and their outputs put back in place."""
        B, T, C = hidden.shape
        by_length = {}
        for row in range(B):
            bounds = starts[row].nonzero().flatten().tolist() + [T]
            for begin, end in zip(bounds[:-1], bounds[1:]):
                by_length.setdefault(end - begin, []).append(row * T + begin)
        flat = hidden.reshape(B * T, C)
        real = attention_mask[:, -T:].reshape(B * T) if attention_mask is not None else None
        order, outputs = [], []
        for length, firsts in by_length.items():
            index = (torch.tensor(firsts, device=hidden.device)[:, None] + torch.arange(length, device=hidden.device)).reshape(-1)
            n = len(firsts)
            mask, trailing = self._padding(real[index].view(n, length) if real is not None else None, n, length)
            out, layers = self._run_blocks(flat[index].view(n, length, C), None, mask, trailing, init_state, output_hidden_states)
            order.append(index)
            outputs.append((out, layers))
        inverse = torch.cat(order).argsort()

        def put_back(pieces):  # [n, L, C] pieces in group order -> [B, T, C] in token order
            return torch.cat([p.reshape(-1, C) for p in pieces])[inverse].view(B, T, C)

        hidden = put_back([out for out, _ in outputs])
        all_hidden = None
        if output_hidden_states:
            all_hidden = tuple(put_back([layers[i] for _, layers in outputs]) for i in range(len(outputs[0][1])))
        return hidden, all_hidden

    def _initial_layer_states(self, batch_size, dtype, device, name):
        if self.init_state is None:
            if name is not None:
                raise ValueError(f"init_state={name!r} was requested but no initial state is loaded (see load_init_state)")
            return None
        # Called as a module so that hooks (FSDP, ZeRO-3, accelerate device maps) run.
        return [LayerState(*triple) for triple in self.init_state(batch_size, dtype, device, name)]

    @staticmethod
    def _padding(attention_mask, batch_size, seq_len, continuing_v4: bool = False):
        """``(mask, trailing)``: the boolean [B, T] mask of real tokens (None when nothing is padded) and each row's
        right-padding length [B] (None when no row is right-padded).

        Left padding is exact (a pad step leaves the state as it was); right padding too (the state kept is the one
        after each row's last real token). A pad *between* real tokens is refused: the text on both sides of it
        would be read as adjacent. RWKV-4's pads still decay its state, so left padding on top of a continued
        RWKV-4 state is refused as well.
        """
        if attention_mask is None:
            return None, None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] < seq_len:
            raise ValueError(
                f"attention_mask must be [batch, >= tokens] = [{batch_size}, >= {seq_len}], got {tuple(attention_mask.shape)}"
            )
        # generate passes the mask of the whole sequence so far; the last T columns belong to these tokens.
        mask = attention_mask[:, -seq_len:].bool()
        if bool(mask.all()):
            return None, None
        pad = ~mask
        real_before = mask.cumsum(1) > 0
        real_after = mask.flip(1).cumsum(1).flip(1) > 0
        holes = pad & real_before & real_after
        if bool(holes.any()):
            row, col = (int(i) for i in holes.nonzero()[0])
            raise ValueError(
                f"attention_mask has a padded position between real tokens (row {row}, position {col} of the "
                f"{seq_len} new tokens); expected padding only at the start (left, the tokenizer's default) or the "
                "end of each row (generate infers a mask from input_ids == pad_token_id when pad differs from eos; "
                "if those ids are real tokens, pass attention_mask=torch.ones_like(input_ids))"
            )
        if continuing_v4 and bool((pad & ~real_before).any()):
            raise ValueError(
                "left padding on top of a continued RWKV-4 state is not exact (an RWKV-4 pad still decays the "
                "state); pass the new tokens unpadded, one row at a time, or start from a fresh state"
            )
        trailing = (pad & real_before).sum(1) + (~real_before[:, -1]) * seq_len  # a row with no real token: T
        return mask, (trailing if bool(trailing.any()) else None)

    def _check_cache_shapes(self, cache):
        """A state from another model of the same version and depth (another width or head size) is refused here,
        with both shapes, rather than failing deep inside a matrix product."""
        if not cache.is_initialized:
            return
        config = self.config
        C, H, N = config.hidden_size, config.num_attention_heads, config.head_size
        wkv = (3, config.attention_hidden_size) if config.rwkv_version == "4" else (H, N, N)
        # layer 0 tells: every layer of a model has the same shapes (and this runs at every decoding step)
        found = (tuple(cache.shift_state(0, TIME_SHIFT).shape[1:]), tuple(cache.wkv_state(0).shape[1:]))
        if found != ((C,), wkv):
            raise ValueError(
                f"the cache holds a token shift of shape {list(found[0])} and a WKV state of shape "
                f"{list(found[1])}; this model needs {[C]} and {list(wkv)} (per batch row): the state comes "
                "from another model"
            )

    def _cache_for(self, given, use_cache, batch_size) -> Optional[RwkvCache]:
        if given is None:
            return RwkvCache(self.config) if use_cache else None
        if not hasattr(given, "shift_state"):  # duck-typed: remote-code copies have their own class
            raise TypeError(
                f"cache must be an RwkvCache (the state returned by this model), got {type(given).__name__}"
            )
        if getattr(given, "rwkv_version", self.config.rwkv_version) != self.config.rwkv_version or len(
            given.layers
        ) != self.config.num_hidden_layers:
            raise ValueError(
                f"cache holds an RWKV-{given.rwkv_version} state with {len(given.layers)} "
                f"layers; this model is RWKV-{self.config.rwkv_version} with {self.config.num_hidden_layers} layers"
            )
        self._check_cache_shapes(given)
        cache = given.ensure_writable()
        if cache.is_initialized and cache.batch_size != batch_size:
            if cache.batch_size == 1:  # one saved prompt state seeding several rows (beams, samples)
                cache = cache.clone() if cache is given and given.frozen else cache
                cache.batch_repeat_interleave(batch_size)
            else:
                raise ValueError(f"cache has batch size {cache.batch_size} but the input has {batch_size}")
        return cache


# ---------------------------------------------------------------------------------------------------------
# Causal LM head
# ---------------------------------------------------------------------------------------------------------


class RwkvHfForCausalLM(RwkvPreTrainedModel, GenerationMixin, RwkvChatModelMixin):
    _tied_weights_keys = {}

    def __init__(self, config: RwkvConfig):
        super().__init__(config)
        self.rwkv = RwkvHfModel(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._cpu_layout_done = False
        self.post_init()

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, new_embeddings):
        self.head = new_embeddings

    def get_decoder(self):
        return self.rwkv

    def train(self, mode: bool = True):
        # The CPU layout is chosen when the model enters eval mode (from_pretrained ends in eval()), not inside a
        # forward: torch.compile traces the weights' strides, and a forward that changed them afterwards failed
        # the compiled graph's stride checks.
        super().train(mode)
        if not mode:
            self._cpu_inference_layout()
        return self

    @torch.no_grad()
    def _cpu_inference_layout(self):
        """Once, for CPU inference: store the tall and square matrices column-major (same values, same memory).

        A single-token step is a mat-vec per weight, bound by memory bandwidth. For an [out, in] weight with
        out >= in (the head, the attention projections, the channel-mix key), CPU BLAS reads a column-major copy
        faster (2 cores: 65536 x 768 head 9.8 ms vs 15.8 ms; 12 x [3072, 768] 5.5 ms vs 8.9 ms), which is what the
        official package gets by transposing its weights at load; wide matrices ([C, F] values) read slower that
        way, and 512-token prefill measured the same either way.
        """
        if self._cpu_layout_done or self.training or self.head.weight.device.type != "cpu":
            return
        self._cpu_layout_done = True
        for module in self.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, nn.Linear) or type(weight.data) is not torch.Tensor:  # leave quantised weights be
                continue
            if weight.is_contiguous() and weight.shape[0] >= weight.shape[1]:
                weight.data = weight.data.t().contiguous().t()

    @functools.wraps(GenerationMixin.generate)
    def generate(self, *args, **kwargs):
        # transformers gives models named "*Rwkv*" no default cache, and chunked prefill (prefill_chunk_size)
        # refuses to run without one: start such a call from a fresh state, as any call without one does.
        config = kwargs.get("generation_config") or self.generation_config
        chunked = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
        if chunked and kwargs.get("use_cache", True) is not False and all(
            kwargs.get(name) is None for name in ("cache", "past_key_values")
        ):
            kwargs[CACHE_ARG] = RwkvCache(self.config)
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """transformers' own preparation, then a check that the state is really being carried between steps.

        A recurrent model that loses its state still produces fluent text, just wrong text: if transformers ever
        stops handing the cache back (as 5.24's rename of ``past_key_values`` to ``cache`` would have done to a
        model reading the old name), fail on the first step that feeds fewer tokens than the sequence holds.
        """
        if CACHE_ARG != "cache" and kwargs.get("cache") is not None:
            # generate(cache=...) on a transformers that does not know the name yet: it would feed the whole
            # prompt again on top of the state instead of only the new tokens
            raise TypeError(
                f"generate got the state as 'cache', but transformers {TRANSFORMERS_VERSION} carries it as "
                f"{CACHE_ARG!r}: pass generate({CACHE_ARG}=...)"
            )
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        # generate(tokenizer=...) (stop_strings, transformers serve) leaves the tokenizer among the model inputs, for
        # models whose forward swallows any keyword; this one names unknown keywords instead, so drop it here
        for name in GENERATE_ONLY_INPUTS:
            model_inputs.pop(name, None)
        fed = model_inputs.get("input_ids")
        if fed is None:
            fed = model_inputs.get("inputs_embeds")
        if (
            model_inputs.get(CACHE_ARG) is None
            and model_inputs.get("use_cache", True) is not False
            and fed is not None
            and fed.shape[1] < input_ids.shape[1]
        ):
            raise RuntimeError(
                f"generate fed {fed.shape[1]} of {input_ids.shape[1]} tokens without the recurrent state (expected "
                f"under {CACHE_ARG!r}): this transformers ({TRANSFORMERS_VERSION}) carries the cache differently "
                "from what rwkv_hf knows. Upgrade rwkv_hf, or pass use_cache=False (slow but correct)."
            )
        return model_inputs

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        cache: Optional[RwkvCache] = None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        init_state: Optional[str] = None,
        past_key_values: Optional[RwkvCache] = None,
        output_attentions: Optional[bool] = None,
        position_ids: Optional[torch.LongTensor] = None,
        seq_idx: Optional[torch.Tensor] = None,
        cu_seq_lens_q: Optional[torch.Tensor] = None,
        cu_seq_lens_k: Optional[torch.Tensor] = None,
        max_length_q: Optional[int] = None,
        max_length_k: Optional[int] = None,
        **kwargs,
    ) -> Union[Tuple, RwkvCausalLMOutput]:
        r"""
        cache (`RwkvCache`, *optional*): the recurrent state (see ``RwkvModel.forward``); ``past_key_values`` is
            the same argument under its pre-5.24 name. The output carries the new state under the name the
            installed transformers uses (``cache`` from 5.24, ``past_key_values`` before).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids for the causal-LM loss (shifted inside: position t predicts labels[t+1]); -100 is ignored.
        logits_to_keep (`int` or `torch.Tensor`): compute logits only for the last `logits_to_keep` positions
            (0 = all), or for the given indices.
        position_ids, seq_idx, cu_seq_lens_q/k, max_length_q/k: packed documents (see ``RwkvModel.forward``).
        """
        # Only the loss keywords transformers' Trainer passes may go unnamed; anything else is a caller (or a
        # transformers release) speaking a different contract, and must not be silently dropped.
        reject_unknown_kwargs(type(self).__name__, kwargs)
        cache = one_cache_argument(cache, past_key_values, output_attentions)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.rwkv(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            init_state=init_state,
            position_ids=position_ids,
            seq_idx=seq_idx,
            cu_seq_lens_q=cu_seq_lens_q,
            cu_seq_lens_k=cu_seq_lens_k,
        )
        hidden = outputs.last_hidden_state
        if not _compiling():  # a model moved to the CPU after eval(); never while torch.compile traces (see train)
            self._cpu_inference_layout()
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.head(hidden[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)

        new_cache = outputs.cache
        if not return_dict:
            output = (logits, new_cache, outputs.hidden_states)
            output = tuple(x for x in output if x is not None)
            return ((loss,) + output) if loss is not None else output
        return RwkvCausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states, **cache_kwargs(new_cache))


# The names users import. The classes carry names of their own because tools find a model's class from the
# ``architectures`` name that save_pretrained writes (``getattr(transformers, name)``: TRL, ``transformers serve``,
# vLLM), and "RwkvForCausalLM" there is transformers' built-in RWKV-4: it loaded with random weights, silently.
RwkvModel = RwkvHfModel
RwkvForCausalLM = RwkvHfForCausalLM

__all__ = ["RwkvPreTrainedModel", "RwkvModel", "RwkvForCausalLM", "RwkvHfModel", "RwkvHfForCausalLM", "RwkvCache", "RwkvModelOutput", "RwkvCausalLMOutput"]
