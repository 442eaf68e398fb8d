"""The chunked WKV forms equal the token-by-token references (outputs, final states, gradients).

Tolerances: fp32 sums taken in different orders agree to ~1e-5 relative; 2e-4 absolute on O(1..30) values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rwkv_hf.ops_rwkv_hf import (
    empty_wkv4_state,
    wkv4_chunked,
    wkv4_recurrent,
    wkv5_chunked,
    wkv5_recurrent,
    wkv7_chunked,
    wkv7_recurrent,
)

ATOL = 2e-4


def gen(seed):
    return torch.Generator().manual_seed(seed)


def v4_inputs(B=2, T=45, C=24, decay_scale=1.0, seed=0):
    g = gen(seed)
    w = -torch.exp(torch.randn(C, generator=g) * decay_scale)
    u = torch.randn(C, generator=g)
    k = torch.randn(B, T, C, generator=g) * 3
    v = torch.randn(B, T, C, generator=g)
    return w, u, k, v


def v5_inputs(B=2, T=45, H=3, N=16, decay_scale=2.0, seed=0):
    g = gen(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    log_w = -torch.exp(torch.randn(B, T, H, N, generator=g) * decay_scale)
    u = torch.randn(H, N, generator=g)
    return r, k, v, log_w, u


def v7_inputs(B=2, T=45, H=3, N=16, seed=0):
    g = gen(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    kk = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    iclr = torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    log_w = -0.606531 * torch.sigmoid(torch.randn(B, T, H, N, generator=g) * 3)
    return r, log_w, k, v, -kk, kk * iclr


@pytest.mark.parametrize("decay_scale", [0.1, 1.0, 3.0], ids=["slow-decay", "mixed-decay", "fast-decay"])
@pytest.mark.parametrize("chunk", [8, 32, 64])
def test_wkv4_chunked_equals_recurrent(decay_scale, chunk):
    w, u, k, v = v4_inputs(decay_scale=decay_scale)
    state = empty_wkv4_state(2, 24)
    y_ref, s_ref = wkv4_recurrent(w, u, k, v, state)
    y, s = wkv4_chunked(w, u, k, v, state, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=ATOL, rtol=1e-5)
    # continuing from a carried (non-empty) state
    y2_ref, _ = wkv4_recurrent(w, u, k, v, s_ref)
    y2, _ = wkv4_chunked(w, u, k, v, s, chunk_size=chunk)
    torch.testing.assert_close(y2, y2_ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("decay_scale", [0.5, 2.0, 4.0], ids=["slow", "mixed", "very-fast"])
def test_wkv5_chunked_equals_recurrent(decay_scale):
    r, k, v, log_w, u = v5_inputs(decay_scale=decay_scale)
    state = torch.randn(2, 3, 16, 16, generator=gen(1))
    y_ref, s_ref = wkv5_recurrent(r, k, v, log_w, u, state)
    y, s = wkv5_chunked(r, k, v, log_w, u, state, chunk_size=16)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=ATOL, rtol=1e-5)


def test_wkv5_accepts_a_broadcast_constant_decay():
    """RWKV-5.2 passes one decay per channel expanded over batch and time."""
    r, k, v, _, u = v5_inputs()
    log_w = -torch.exp(torch.randn(3, 16, generator=gen(2))).expand(2, 45, 3, 16)
    state = torch.zeros(2, 3, 16, 16)
    y_ref, s_ref = wkv5_recurrent(r, k, v, log_w, u, state)
    y, s = wkv5_chunked(r, k, v, log_w, u, state)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("chunk", [4, 16, 32])
def test_wkv7_chunked_equals_recurrent(chunk):
    inputs = v7_inputs()
    state = torch.randn(2, 3, 16, 16, generator=gen(3)) * 0.3
    y_ref, s_ref = wkv7_recurrent(*inputs, state)
    y, s = wkv7_chunked(*inputs, state, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=ATOL, rtol=1e-5)


def test_identity_steps_leave_the_state_untouched():
    """What padding relies on: k = 0 (v7 also a = b = 0) and log_w = 0 is a step that changes nothing."""
    r, k, v, log_w, u = v5_inputs(T=5)
    state = torch.randn(2, 3, 16, 16, generator=gen(4))
    _, s = wkv5_chunked(r, torch.zeros_like(k), v, torch.zeros_like(log_w), u, state)
    torch.testing.assert_close(s, state, atol=0, rtol=0)
    r, log_w, k, v, a, b = v7_inputs(T=5)
    zero = torch.zeros_like(k)
    _, s = wkv7_chunked(r, zero, zero, v, a, zero, state)
    torch.testing.assert_close(s, state, atol=0, rtol=0)


def test_gradients_of_the_chunked_forms_match_the_references():
    """State tuning trains the initial state through the chunked path: its gradient must be the reference's."""
    cases = [
        (wkv5_recurrent, wkv5_chunked, v5_inputs(T=21), torch.randn(2, 3, 16, 16, generator=gen(5))),
        (wkv7_recurrent, wkv7_chunked, v7_inputs(T=21), torch.randn(2, 3, 16, 16, generator=gen(6)) * 0.3),
    ]
    for ref_fn, fast_fn, inputs, state in cases:
        grads = []
        for fn in (ref_fn, fast_fn):
            leaves = [x.clone().requires_grad_(True) for x in (*inputs, state)]
            y, s = fn(*leaves)
            (y.sin().sum() + s.cos().sum()).backward()
            grads.append([leaf.grad for leaf in leaves])
        for g_ref, g in zip(*grads):
            torch.testing.assert_close(g, g_ref, atol=1e-3, rtol=1e-4)


def test_rwkv4_chunked_gradients_equal_the_recurrence_with_strong_decays():
    """Decays like a trained model's (|w| up to ~20) once made the chunked backward lose 8% of the value gradient
    to cancellation (cumsum minus the own term, at a scale of e^100)."""
    from rwkv_hf.ops_rwkv_hf import empty_wkv4_state, wkv4_chunked, wkv4_recurrent

    gen = torch.Generator().manual_seed(0)
    B, T, C = 2, 11, 16
    w = -torch.exp(torch.linspace(-5, 3, C))  # -0.007 ... -20
    u, k, v = torch.randn(C, generator=gen), torch.randn(B, T, C, generator=gen), torch.randn(B, T, C, generator=gen)
    k[1, :4] = -1e30  # left padding keys
    g = torch.randn(B, T, C, generator=gen)
    g[1, :4] = 0
    grads = []
    for fn in (wkv4_recurrent, wkv4_chunked):
        inputs = [t.clone().requires_grad_() for t in (w, u, k, v)]
        y, _ = fn(*inputs, empty_wkv4_state(B, C))
        (y * g).sum().backward()
        grads.append([t.grad for t in inputs])
    for name, a, b in zip("wukv", *grads):
        assert torch.isfinite(b).all(), name
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)
