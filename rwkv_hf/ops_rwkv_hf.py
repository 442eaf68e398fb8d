"""The WKV recurrences of every RWKV generation, as pure functions on tensors.

Three ops, one per family of recurrence, each in two forms with the same signature:

* ``*_recurrent``: the token-by-token recurrence, written as in the official package. It is the numeric
  reference (the oracle the chunked forms and the CUDA kernels are tested against) and the decode path.
* ``*_chunked``: the same maths regrouped into chunks of ``chunk_size`` tokens, so that prefill and training
  run as a few large tensor ops instead of a Python loop over tokens. Only the hand-over of the state from
  one chunk to the next stays sequential.

``wkv4``, ``wkv5`` and ``wkv7`` dispatch: the compiled CUDA kernel for CUDA tensors when it is available
(and not disabled with ``RWKV_HF_WKV_BACKEND=torch``), else the chunked form for sequences, else the
recurrence.

Layouts (``B`` batch, ``T`` tokens, ``H`` heads, ``N`` head size, ``C = H*N``):

* v4      ``k, v``: [B, T, C]; ``state``: [B, 3, C] fp32 holding (aa, bb, pp) of the stable WKV form.
* v5.2/v6 ``r, k, v, log_w``: [B, T, H, N]; ``u``: [H, N]; ``state``: [B, H, N, N] fp32 indexed [key, value]
  (the official package's v5/v6 layout).
* v7      ``r, log_w, k, v, a, b``: [B, T, H, N]; ``state``: [B, H, N, N] fp32 indexed [value, key]
  (the official package's v7 layout: transposed relative to v5/v6).

Decays are passed as ``log_w`` = log of the per-step decay factor (<= 0), so the chunked forms can build
products of decays as sums without ever exponentiating a positive number. Every op computes in fp32 and
returns ``(y, new_state)`` with ``y`` fp32 and ``new_state`` fp32; the input ``state`` is never modified.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

try:  # the compiled CUDA extension is optional: without it every op runs in PyTorch
    from .kernels_rwkv_hf import cuda_wkv_available, wkv4_cuda, wkv5_cuda, wkv7_cuda
except Exception:  # noqa: BLE001 - remote-code copies and CPU installs have no kernel module
    cuda_wkv_available = None
    wkv4_cuda = wkv5_cuda = wkv7_cuda = None

# Chunk lengths of the chunked forms. v7 solves a triangular system per chunk, whose conditioning
# worsens with the chunk length: 16 keeps it within fp32 tolerance of the recurrence.
CHUNK_V4 = 32
CHUNK_V5 = 32
CHUNK_V7 = 16

V4_EMPTY_PP = -1e30  # the "log of zero" the official package starts pp from
V4_MAX_EXPONENT = 600.0  # largest exponent the v4 chunked form builds in fp64 (see wkv4_chunked)
V5_MIN_LOG_W = -40.0  # per-step decay floor of the v5/v6 chunked form (see wkv5_chunked)
V7_MIN_LOG_W = -5.0  # per-step decay floor of the v7 chunked form; RWKV-7 itself never goes below -0.61


def _use_kernel(*tensors: torch.Tensor) -> bool:
    if cuda_wkv_available is None or os.environ.get("RWKV_HF_WKV_BACKEND", "auto") == "torch":
        return False
    return tensors[0].is_cuda and cuda_wkv_available()


def _chunks(x: torch.Tensor, n: int, L: int) -> torch.Tensor:
    """[B, T, H, N] -> [B, n, H, L, N] fp32, zero-padding the tail (a zero-padded step is the identity when
    k = 0 (and a = b = 0) with log_w = 0)."""
    B, T, H, N = x.shape
    return _pad_time(x.float(), n * L).view(B, n, L, H, N).transpose(2, 3)


def _pad_time(x: torch.Tensor, length: int, value: float = 0.0) -> torch.Tensor:
    """Pad dim 1 (time) at the end to ``length``."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    pad = x.new_full((x.shape[0], extra) + tuple(x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


# ---------------------------------------------------------------------------------------------------------
# RWKV-4: per-channel scalar WKV with the running-max (aa, bb, pp) form
# ---------------------------------------------------------------------------------------------------------


def wkv4_recurrent(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RWKV-4 WKV, token by token (the official ``att_seq`` loop).

    ``w`` = -exp(time_decay) (the log decay), ``u`` = time_first, both [C]. The true numerator and
    denominator are aa*e^pp and bb*e^pp.
    """
    w, u = w.float(), u.float()
    k, v = k.float(), v.float()
    aa, bb, pp = state.float().unbind(1)
    out = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        ww = u + kt
        q = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - q), torch.exp(ww - q)
        out.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        ww = w + pp
        q = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - q), torch.exp(kt - q)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, q
    return torch.stack(out, dim=1), torch.stack([aa, bb, pp], dim=1)


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Sums over the earlier positions of dim 2 (0 at the first)."""
    return torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1].cumsum(dim=2)], dim=2)


def wkv4_chunked(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int = CHUNK_V4,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RWKV-4 WKV over chunks, with the pair weights factored so the intra-chunk sums are cumulative sums.

    Token t of a chunk (0-based) reads the carried state decayed t times, earlier tokens s<t decayed
    (t-1-s) times, and itself with the bonus u. The weight e^{(t-1-s)w + k_s} = e^{(t-1)w + m} e^{k_s - m - s w}
    (m = the chunk's max k) splits into a t-part and an s-part; the s-part stays finite in fp64 as long as
    (L-1)|w| < 700, so the chunk is shortened for strongly decaying channels (and the recurrence is used when
    even 4 tokens would not fit). Keys of one chunk must lie within ~700 of each other, which real activations
    do by hundreds of orders of magnitude (padding keys of -1e30 are meant to vanish). The three sources
    (state, earlier tokens, own token) are merged with a max-shift like the recurrence's pp, and the carried
    pp equals the official package's running max.
    """
    B, T, C = k.shape
    w = w.float()
    max_decay = float(-w.detach().min()) if w.numel() else 0.0
    if max_decay > 0:
        chunk_size = min(chunk_size, int(V4_MAX_EXPONENT / max_decay) + 1)
    if chunk_size < 4:
        return wkv4_recurrent(w, u, k, v, state)
    L = min(chunk_size, T)
    n = -(-T // L)
    u = u.float()
    # Padded tail tokens get k = -1e30: no weight. The extra decays they cause are undone at the end.
    k = _pad_time(k.float(), n * L, V4_EMPTY_PP).view(B, n, L, C)
    v = _pad_time(v.float(), n * L).view(B, n, L, C)
    pos = torch.arange(L, device=k.device, dtype=torch.float32)[:, None]  # [L, 1]

    z = k - pos * w  # per-token part of the exponent: e^{(t-1-s)w + k_s} = e^{(t-1)w} e^{z_s}
    m = z.amax(dim=2, keepdim=True)  # [B, n, 1, C]
    k_rel = torch.exp((z - m).double())
    # Sums over s < t, as a shifted cumsum rather than cumsum - own term: the own term's gradient would pass
    # through the subtraction at the (possibly huge) scale of f_prev below and cancel inexactly.
    prefix_den = _exclusive_cumsum(k_rel)
    prefix_num = _exclusive_cumsum(k_rel * v.double())
    # The largest exponent among earlier tokens (exclusive running max), so that the max-shift below is taken
    # over exponents that are really present: the chunk's max may belong to a later token.
    prefix_max = torch.cat([torch.full_like(z[:, :, :1], float("-inf")), z.cummax(dim=2).values[:, :, :-1]], dim=2)
    # Each token's own end-of-chunk exponent, and the chunk's contribution to the carried state.
    expo_end = k + (L - 1 - pos) * w
    m_end = expo_end.amax(dim=2)  # [B, n, C]
    p_end = torch.exp(expo_end - m_end[:, :, None])
    num_end, den_end = (p_end * v).sum(2), p_end.sum(2)

    aa, bb, pp = state.float().unbind(1)
    starts = []
    for c in range(n):
        starts.append((aa, bb, pp))
        pp_l = pp + L * w
        q = torch.maximum(pp_l, m_end[:, c])
        e1, e2 = torch.exp(pp_l - q), torch.exp(m_end[:, c] - q)
        aa, bb, pp = e1 * aa + e2 * num_end[:, c], e1 * bb + e2 * den_end[:, c], q
    aa0, bb0, pp0 = (torch.stack(x, dim=1)[:, :, None] for x in zip(*starts))  # [B, n, 1, C]

    x_state = pp0 + pos * w  # exponent of the carried state at token t
    x_self = u + k
    q = torch.maximum(torch.maximum(x_state, x_self), prefix_max + (pos - 1) * w)
    f_state, f_self = torch.exp(x_state - q), torch.exp(x_self - q)
    # Scale of the prefix sums; fp64 as it may exceed 1. Where no earlier token carries weight (the first token,
    # or only padding before it: k = -1e30) the sums are 0 and the scale may overflow, and inf * 0 would be NaN,
    # in the output and in every gradient: use exponent 0 there (the where sits inside the exp, so that its
    # unused branch stays finite for autograd too).
    has_prefix = prefix_den > 0
    f_prev = torch.exp(torch.where(has_prefix, (m + (pos - 1) * w - q).double(), 0.0))
    num = f_state * aa0 + (f_prev * prefix_num).float() + f_self * v
    den = f_state * bb0 + (f_prev * prefix_den).float() + f_self
    y = (num / den).reshape(B, n * L, C)[:, :T]
    if n * L != T:
        pp = pp - (n * L - T) * w
    return y, torch.stack([aa, bb, pp], dim=1)


def wkv4(w, u, k, v, state):
    """RWKV-4 WKV: kernel on CUDA, chunked for sequences, recurrent for single tokens."""
    if _use_kernel(k):
        return wkv4_cuda(w, u, k, v, state)
    if k.shape[1] == 1:
        return wkv4_recurrent(w, u, k, v, state)
    return wkv4_chunked(w, u, k, v, state)


# ---------------------------------------------------------------------------------------------------------
# RWKV-5.2 and RWKV-6: matrix-valued state per head, per-key-channel decay, bonus u for the current token
# ---------------------------------------------------------------------------------------------------------


def wkv5_recurrent(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_w: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RWKV-5.2/6 WKV, token by token. S is [key i, value j]:

    y_j = sum_i r_i (u_i k_i v_j + S_ij);   S <- k v^T + w_i S
    """
    r, k, v = r.float(), k.float(), v.float()
    B, T, H, N = r.shape
    w = torch.exp(log_w.float()).expand_as(k)
    bonus = (r * u.float() * k).sum(-1, keepdim=True) * v  # r^T (u k v^T) = (r . u . k) v
    S = state.float().reshape(B * H, N, N)
    out = []
    for t in range(T):
        out.append(torch.bmm(r[:, t].reshape(B * H, 1, N), S).view(B, H, N))
        # S <- w S + k v^T in one fused op (the decode hot path)
        S = torch.baddbmm(w[:, t].reshape(B * H, N, 1) * S, k[:, t].reshape(B * H, N, 1), v[:, t].reshape(B * H, 1, N))
    return torch.stack(out, dim=1) + bonus, S.view(B, H, N, N)


def wkv5_chunked(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_w: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int = CHUNK_V5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RWKV-5.2/6 WKV over chunks.

    With c_t the inclusive cumulative log decay inside a chunk and e_t = c_{t-1} the exclusive one:
      y_t = sum_{s<t} (r_t . exp(e_t - c_s) . k_s) v_s + (r_t . u . k_t) v_t + (r_t . exp(e_t)) S_0
      S_L = exp(c_L) S_0 + sum_s (exp(c_L - c_s) . k_s) v_s^T
    Every exponent is a sum of log decays over an interval, hence <= 0: no overflow however strong the decay.
    """
    B, T, H, N = r.shape
    L = min(chunk_size, T)
    n = -(-T // L)
    u = u.float()
    r, k, v, log_w = (_chunks(x.expand(B, T, H, N), n, L) for x in (r, k, v, log_w))  # each [B, n, H, L, N]
    # exp(e_t - c_s) is factored as exp(e_t) * exp(-c_s) so the pair weights are one matmul. In fp64 with a
    # per-step floor of e^-40 on the decay, exp(-c_s) stays finite over a chunk; a decay below e^-40 (4e-18)
    # already erases the state to fp32 precision, so the floor changes nothing visible.
    c = log_w.double().clamp(min=V5_MIN_LOG_W).cumsum(dim=3)
    e = c - log_w.double().clamp(min=V5_MIN_LOG_W)
    r_in = r.double() * torch.exp(e)
    k_out = k.double() * torch.exp(-c)
    attn = (r_in @ k_out.transpose(-1, -2)).float().tril(-1)
    attn = attn + torch.diag_embed((r * u[:, None, :] * k).sum(-1))
    y = attn @ v  # intra-chunk part [B, n, H, L, N]

    r_decayed = r_in.float()
    k_to_end = (k_out * torch.exp(c[..., -1:, :])).float()
    chunk_kv = k_to_end.transpose(-1, -2) @ v  # [B, n, H, N, N]
    chunk_decay = torch.exp(c[..., -1, :]).float()  # [B, n, H, N]

    S = state.float()
    starts = []
    for ci in range(n):
        starts.append(S)
        S = chunk_decay[:, ci, :, :, None] * S + chunk_kv[:, ci]
    y = y + r_decayed @ torch.stack(starts, dim=1)
    y = y.transpose(2, 3).reshape(B, n * L, H, N)[:, :T]
    return y, S


def wkv5(r, k, v, log_w, u, state):
    """RWKV-5.2/6 WKV: kernel on CUDA, chunked for sequences, recurrent for single tokens."""
    if _use_kernel(r):
        return wkv5_cuda(r, k, v, log_w, u, state)
    if r.shape[1] == 1:
        return wkv5_recurrent(r, k, v, log_w, u, state)
    return wkv5_chunked(r, k, v, log_w, u, state)


# ---------------------------------------------------------------------------------------------------------
# RWKV-7: generalised delta rule, S <- S (diag(w) + a b^T) + v k^T, read after the update
# ---------------------------------------------------------------------------------------------------------


def wkv7_recurrent(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7 WKV, token by token, as the official package. S is [value j, key i]:

    S <- S diag(w) + (S a) b^T + v k^T;   y = S r       (RWKV-7 passes a = -kk, b = kk * iclr)
    """
    r, k, v, a, b = (x.float() for x in (r, k, v, a, b))
    B, T, H, N = r.shape
    w = torch.exp(log_w.float())
    S = state.float().reshape(B * H, N, N)
    out = []
    for t in range(T):
        sa = torch.bmm(S, a[:, t].reshape(B * H, N, 1))  # S a, [BH, N(value), 1]
        # S <- S diag(w) + (S a) b^T + v k^T as one mul and one batched rank-2 update (the decode hot path)
        left = torch.cat([sa, v[:, t].reshape(B * H, N, 1)], dim=2)
        right = torch.stack([b[:, t], k[:, t]], dim=2).reshape(B * H, 2, N)
        S = torch.baddbmm(S * w[:, t].reshape(B * H, 1, N), left, right)
        out.append(torch.bmm(S, r[:, t].reshape(B * H, N, 1)).view(B, H, N))
    return torch.stack(out, dim=1), S.view(B, H, N, N)


def wkv7_chunked(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int = CHUNK_V7,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7 WKV over chunks (the WY / delta-rule form).

    Transposing to M = S^T ([key, value]): M_t = D_t M_{t-1} + b_t u_t + k_t v_t^T with the row vector
    u_t = a_t^T M_{t-1}. That is a plain decayed linear recurrence driven by two rank-1 inputs, so inside
    a chunk (c_t inclusive cumulative log decay, e_t = c_{t-1}):
      u_t = (a_t . exp(e_t))^T M_0 + sum_{s<t} (a_t . exp(e_t - c_s) . b_s) u_s + (a_t . exp(e_t - c_s) . k_s) v_s
    i.e. a unit lower-triangular system (I - A_ab) U = W M_0 + A_ak V for the chunk's u's, then
      y_t = (r_t . exp(c_t))^T M_0 + sum_{s<=t} (r_t . exp(c_t - c_s) . b_s) u_s + (r_t . exp(c_t - c_s) . k_s) v_s
      M_L = exp(c_L) M_0 + sum_s exp(c_L - c_s) (b_s u_s + k_s v_s^T)
    """
    B, T, H, N = r.shape
    L = min(chunk_size, T)
    n = -(-T // L)
    r, log_w, k, v, a, b = (_chunks(x, n, L) for x in (r, log_w, k, v, a, b))  # each [B, n, H, L, N]
    # RWKV-7's decay is at least exp(-e^-0.5) per step, so over a chunk exp(-c_s) <= e^(0.61 L) and the pair
    # weights exp(e_t - c_s) can be factored into two matmul operands in fp32. The floor only guards callers
    # that pass a stronger decay than RWKV-7 can produce.
    log_w = log_w.clamp(min=V7_MIN_LOG_W)
    c = log_w.cumsum(dim=3)
    e = c - log_w
    a_in, r_in = a * torch.exp(e), r * torch.exp(c)
    b_out, k_out = b * torch.exp(-c), k * torch.exp(-c)
    A_ab = (a_in @ b_out.transpose(-1, -2)).tril(-1)
    A_ak = (a_in @ k_out.transpose(-1, -2)).tril(-1)
    A_rb = (r_in @ b_out.transpose(-1, -2)).tril(0)
    A_rk = (r_in @ k_out.transpose(-1, -2)).tril(0)

    eye = torch.eye(L, device=r.device, dtype=torch.float32)
    solve = lambda rhs: torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)  # noqa: E731
    # U = P M_0 + Q: the part of the u's that depends on the incoming state, and the part that does not.
    P = solve(a_in)  # [B, n, H, L, N(key)]
    Q = solve(A_ak @ v)  # [B, n, H, L, N(value)]

    to_end = torch.exp(c[..., -1:, :] - c)  # [B, n, H, L, N]
    b_end, k_end = b * to_end, k * to_end
    chunk_decay = torch.exp(c[..., -1, :])  # [B, n, H, N]

    M = state.float().transpose(-1, -2)  # [B, H, key, value]
    ys = []
    for ci in range(n):
        U = P[:, ci] @ M + Q[:, ci]  # [B, H, L, N(value)]
        ys.append(r_in[:, ci] @ M + A_rb[:, ci] @ U + A_rk[:, ci] @ v[:, ci])
        M = (
            chunk_decay[:, ci, :, :, None] * M
            + b_end[:, ci].transpose(-1, -2) @ U
            + k_end[:, ci].transpose(-1, -2) @ v[:, ci]
        )
    y = torch.stack(ys, dim=1).transpose(2, 3).reshape(B, n * L, H, N)[:, :T]
    return y, M.transpose(-1, -2).contiguous()


def wkv7(r, log_w, k, v, a, b, state):
    """RWKV-7 WKV: kernel on CUDA, chunked for sequences, recurrent for single tokens."""
    if _use_kernel(r):
        return wkv7_cuda(r, log_w, k, v, a, b, state)
    if r.shape[1] == 1:
        return wkv7_recurrent(r, log_w, k, v, a, b, state)
    return wkv7_chunked(r, log_w, k, v, a, b, state)


def empty_wkv4_state(batch_size: int, channels: int, device=None) -> torch.Tensor:
    state = torch.zeros(batch_size, 3, channels, dtype=torch.float32, device=device)
    state[:, 2] = V4_EMPTY_PP
    return state
