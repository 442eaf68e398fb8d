"""The test harness itself: random official checkpoints and the official-package oracle.

If these fail, every parity test built on ``official_case`` is meaningless, so they pin down:
the checkpoint layout (keys, shapes, order) against RWKV-LM, a non-degenerate initialisation,
determinism, and the oracle's self-consistency (full / step / chunked agree, states as documented).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from official_oracle import OracleError, official_detected_version, run_official, run_official_many
from rwkv_checkpoints import (
    CASE_CHUNK,
    CASES,
    default_ffn_dim,
    describe_checkpoint,
    make_official_checkpoint,
    normalize_version,
    official_state_from_time_state,
    v7_lora_dims,
)

# fp32 on CPU: the official seq and one-token paths differ by a few 1e-6 (different matmul shapes);
# 1e-4 on logits and 1e-3 on states leave two orders of magnitude of head-room.
LOGIT_ATOL = 1e-4
STATE_ATOL = 1e-3

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------------
# checkpoint builder: layout
# --------------------------------------------------------------------------------------------------

# Hand-written from RWKV-LM (RWKV-v4neo RWKV_TimeMix/ChannelMix, RWKV-v5 x052/x060, RWKV-v7 train_temp
# x070): per-module parameter registration order and shapes, for C=128, A=C, N=64 (H=2), V=1000.
C, H, N, V = 128, 2, 64, 1000
LN = {"weight": (C,), "bias": (C,)}
EXPECTED_ATT = {
    "4": [("time_decay", (C,)), ("time_first", (C,)), ("time_mix_k", (1, 1, C)), ("time_mix_v", (1, 1, C)),
          ("time_mix_r", (1, 1, C)), ("key.weight", (C, C)), ("value.weight", (C, C)),
          ("receptance.weight", (C, C)), ("output.weight", (C, C))],
    "5.2": [("time_mix_k", (1, 1, C)), ("time_mix_v", (1, 1, C)), ("time_mix_r", (1, 1, C)),
            ("time_mix_g", (1, 1, C)), ("time_decay", (H, N)), ("time_faaaa", (H, N)),
            ("receptance.weight", (C, C)), ("key.weight", (C, C)), ("value.weight", (C, C)),
            ("output.weight", (C, C)), ("gate.weight", (C, C)), ("ln_x.weight", (C,)), ("ln_x.bias", (C,))],
    "6": [("time_maa_x", (1, 1, C)), ("time_maa_w", (1, 1, C)), ("time_maa_k", (1, 1, C)),
          ("time_maa_v", (1, 1, C)), ("time_maa_r", (1, 1, C)), ("time_maa_g", (1, 1, C)),
          ("time_maa_w1", (C, 5 * 32)), ("time_maa_w2", (5, 32, C)), ("time_decay", (1, 1, C)),
          ("time_decay_w1", (C, 64)), ("time_decay_w2", (64, C)), ("time_faaaa", (H, N)),
          ("receptance.weight", (C, C)), ("key.weight", (C, C)), ("value.weight", (C, C)),
          ("output.weight", (C, C)), ("gate.weight", (C, C)), ("ln_x.weight", (C,)), ("ln_x.bias", (C,))],
    # v7 LoRA dims at C=128 by RWKV-LM's formula: w=a=v=32, g=64
    "7": [("x_r", (1, 1, C)), ("x_w", (1, 1, C)), ("x_k", (1, 1, C)), ("x_v", (1, 1, C)), ("x_a", (1, 1, C)),
          ("x_g", (1, 1, C)), ("w1", (C, 32)), ("w2", (32, C)), ("w0", (1, 1, C)), ("a1", (C, 32)),
          ("a2", (32, C)), ("a0", (1, 1, C)), ("v1", (C, 32)), ("v2", (32, C)), ("v0", (1, 1, C)),
          ("g1", (C, 64)), ("g2", (64, C)), ("k_k", (1, 1, C)), ("k_a", (1, 1, C)), ("r_k", (H, N)),
          ("receptance.weight", (C, C)), ("key.weight", (C, C)), ("value.weight", (C, C)),
          ("output.weight", (C, C)), ("ln_x.weight", (C,)), ("ln_x.bias", (C,))],
}
F_DEFAULT = {"4": 4 * C, "5.2": 448, "6": 448, "7": 4 * C}
EXPECTED_FFN = {
    "4": [("time_mix_k", (1, 1, C)), ("time_mix_r", (1, 1, C)), ("key.weight", ("F", C)),
          ("receptance.weight", (C, C)), ("value.weight", (C, "F"))],
    "6": [("time_maa_k", (1, 1, C)), ("time_maa_r", (1, 1, C)), ("key.weight", ("F", C)),
          ("receptance.weight", (C, C)), ("value.weight", (C, "F"))],
    "7": [("x_k", (1, 1, C)), ("key.weight", ("F", C)), ("value.weight", (C, "F"))],
}
EXPECTED_FFN["5.2"] = EXPECTED_FFN["4"]


def _expected_layout(version: str, n_layer: int) -> list[tuple[str, tuple]]:
    F = F_DEFAULT[version]
    out = [("emb.weight", (V, C))]
    for i in range(n_layer):
        b = f"blocks.{i}."
        out += [(b + "ln1." + k, s) for k, s in LN.items()]
        out += [(b + "ln2." + k, s) for k, s in LN.items()]
        if i == 0:
            out += [(b + "ln0." + k, s) for k, s in LN.items()]
        out += [(b + "att." + k, s) for k, s in EXPECTED_ATT[version]]
        out += [(b + "ffn." + k, tuple(F if d == "F" else d for d in s)) for k, s in EXPECTED_FFN[version]]
    out += [("ln_out." + k, s) for k, s in LN.items()]
    out += [("head.weight", (V, C))]
    return out


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_keys_shapes_and_order_follow_rwkv_lm(version):
    sd = make_official_checkpoint(version, n_layer=2, n_embd=C, head_size=N, vocab_size=V)
    assert [(k, tuple(t.shape)) for k, t in sd.items()] == _expected_layout(version, 2)


@pytest.mark.parametrize("version", [4, 5.2, "6", "v7", "6.0", 7.0])
def test_version_accepts_numbers_and_strings(version):
    assert normalize_version(version) in ("4", "5.2", "6", "7")


def test_unknown_version_is_refused():
    with pytest.raises(ValueError):
        make_official_checkpoint("5.1")


def test_v7_layer0_carries_the_unused_value_residual_lora():
    sd = make_official_checkpoint("7", n_layer=2)
    for name in ("v0", "v1", "v2"):
        assert f"blocks.0.att.{name}" in sd
        assert sd[f"blocks.0.att.{name}"].shape == sd[f"blocks.1.att.{name}"].shape


def test_ffn_width_defaults_and_overrides():
    assert [default_ffn_dim(v, 128) for v in ("4", "5.2", "6", "7")] == [512, 448, 448, 512]
    assert default_ffn_dim("6", 768) == 2688  # World v6 3.5x
    sd = make_official_checkpoint("5.2", ffn_dim=200)
    assert sd["blocks.0.ffn.key.weight"].shape == (200, 128)
    assert sd["blocks.1.ffn.value.weight"].shape == (128, 200)


def test_v7_lora_dims_follow_rwkv_lm_formula():
    assert v7_lora_dims(768) == {"w": 64, "a": 64, "v": 32, "g": 128}  # RWKV-7 0.1B
    assert v7_lora_dims(128) == {"w": 32, "a": 32, "v": 32, "g": 64}
    sd = make_official_checkpoint("7", w_lora=16, a_lora=48, v_lora=8, g_lora=24)
    assert sd["blocks.1.att.w1"].shape == (128, 16) and sd["blocks.1.att.w2"].shape == (16, 128)
    assert sd["blocks.1.att.a1"].shape == (128, 48) and sd["blocks.1.att.v2"].shape == (8, 128)
    assert sd["blocks.1.att.g1"].shape == (128, 24)


def test_v6_lora_dims_are_configurable():
    sd = make_official_checkpoint("6", mix_lora=16, decay_lora=24)
    assert sd["blocks.0.att.time_maa_w1"].shape == (128, 80)
    assert sd["blocks.0.att.time_maa_w2"].shape == (5, 16, 128)
    assert sd["blocks.0.att.time_decay_w1"].shape == (128, 24)
    assert sd["blocks.0.att.time_decay_w2"].shape == (24, 128)


@pytest.mark.parametrize("version", ["6", "7"])
def test_time_state_is_added_per_layer(version):
    sd = make_official_checkpoint(version, n_layer=3, head_size=32, time_state=True)
    shapes = [tuple(sd[f"blocks.{i}.att.time_state"].shape) for i in range(3)]
    assert shapes == [(4, 32, 32)] * 3
    keys = list(sd)
    anchor = "time_faaaa" if version == "6" else "r_k"  # registered right after it
    assert keys.index("blocks.1.att.time_state") == keys.index(f"blocks.1.att.{anchor}") + 1


@pytest.mark.parametrize("version", ["4", "5.2"])
def test_time_state_is_refused_before_v6(version):
    with pytest.raises(ValueError):
        make_official_checkpoint(version, time_state=True)


def test_v7_deep_embed_keys():
    sd = make_official_checkpoint("7", n_layer=2, deep_embed=True, ffn_dim=256)
    for i in range(2):
        f = f"blocks.{i}.ffn."
        assert sd[f + "s_emb.weight"].shape == (1000, 1024)
        assert sd[f + "s_emb_x.weight"].shape == (1024, 128)
        assert sd[f + "s1"].shape == (128, 32)
        assert sd[f + "s2"].shape == (32, 256)
        assert sd[f + "s0"].squeeze().shape == (256,)
    assert describe_checkpoint(sd)["deep_embed"]


def test_v7_requires_dim_att_equal_n_embd():
    with pytest.raises(ValueError):
        make_official_checkpoint("7", dim_att=64)


def test_dim_att_changes_attention_shapes():
    sd = make_official_checkpoint("6", dim_att=64, head_size=32)
    assert sd["blocks.0.att.key.weight"].shape == (64, 128)
    assert sd["blocks.0.att.output.weight"].shape == (128, 64)
    assert sd["blocks.0.att.time_decay"].shape == (1, 1, 64)
    assert sd["blocks.0.att.time_faaaa"].shape == (2, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_is_applied_to_every_tensor(dtype):
    sd = make_official_checkpoint("7", dtype=dtype, time_state=True)
    assert {t.dtype for t in sd.values()} == {dtype}


# --------------------------------------------------------------------------------------------------
# checkpoint builder: determinism and a non-degenerate init
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_builder_is_deterministic_for_a_seed(version):
    a = make_official_checkpoint(version, seed=3, time_state=version in ("6", "7"))
    b = make_official_checkpoint(version, seed=3, time_state=version in ("6", "7"))
    c = make_official_checkpoint(version, seed=4, time_state=version in ("6", "7"))
    assert list(a) == list(b) == list(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_no_tensor_is_constant(version):
    # RWKV-LM zero-inits output/value/receptance and LoRA matrices, and gives equal init to e.g.
    # ffn.time_mix_k and ffn.time_mix_r; here every tensor varies, so no code path is invisible
    # and two swapped parameters change the result.
    sd = make_official_checkpoint(version, time_state=version in ("6", "7"))
    for k, t in sd.items():
        assert t.float().std() > 1e-3, k
    seen = {}
    for k, t in sd.items():
        if t.dim() == 3 and t.shape[:2] == (1, 1):
            sig = tuple(t.flatten()[:8].tolist())
            assert sig not in seen, f"{k} equals {seen.get(sig)}"
            seen[sig] = k


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_layernorm_biases_are_nonzero_and_weights_near_one(version):
    sd = make_official_checkpoint(version)
    for k, t in sd.items():
        if k.endswith(("ln0.bias", "ln1.bias", "ln2.bias", "ln_out.bias", "ln_x.bias")):
            assert t.abs().mean() > 0.03, k
        if k.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight")):
            assert 0.8 < t.mean() < 1.2 and t.std() > 0.03, k


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_mixing_ratios_are_in_unit_interval_and_depend_on_layer(version):
    sd = make_official_checkpoint(version, n_layer=3)
    names = [k for k in sd if k.split(".")[-1].startswith(("time_mix_", "time_maa_", "x_"))
             and not k.endswith(("_w1", "_w2"))]
    assert names
    for k in names:
        assert 0.0 <= sd[k].min() and sd[k].max() <= 1.0, k
    first, last = names[0], names[0].replace("blocks.0.", "blocks.2.")
    assert (sd[first] - sd[last]).abs().mean() > 0.05


def test_decay_spreads_over_channels():
    for version, key in (("4", "time_decay"), ("5.2", "time_decay"), ("6", "time_decay"), ("7", "w0")):
        td = make_official_checkpoint(version)[f"blocks.1.att.{key}"].flatten()
        assert td.max() - td.min() > 3.0, version


def test_describe_checkpoint_does_not_depend_on_key_order():
    sd = make_official_checkpoint("5.2", n_layer=1, head_size=32, ffn_dim=200)
    shuffled = dict(reversed(list(sd.items())))
    for d in (describe_checkpoint(sd), describe_checkpoint(shuffled)):
        assert d["version"] == "5.2" and d["n_layer"] == 1 and d["n_head"] == 4 and d["head_size"] == 32
        assert d["ffn_dim"] == 200 and d["vocab_size"] == 1000 and d["n_embd"] == 128


def test_official_loader_misdetects_single_layer_v52_in_rwkv_lm_order():
    # Documented pitfall: the official loader scans keys in order; block 0's time_decay comes
    # before its ln_x/gate, so with one layer the 5.2 test never fires (-> 5.1, then a crash).
    one = make_official_checkpoint("5.2", n_layer=1)
    two = make_official_checkpoint("5.2", n_layer=2)
    shapes = lambda sd: {k: tuple(t.shape) for k, t in sd.items()}  # noqa: E731
    assert official_detected_version(list(one), shapes(one)) == 5.1
    assert official_detected_version(list(two), shapes(two)) == 5.2
    reordered = [k for k in one if ".ln_x." in k] + [k for k in one if ".ln_x." not in k]
    assert official_detected_version(reordered, shapes(one)) == 5.2


# --------------------------------------------------------------------------------------------------
# the oracle on the shared cases
# --------------------------------------------------------------------------------------------------


def test_full_and_step_logits_agree(official_case_params):
    o = official_case_params.oracle
    T = len(official_case_params.tokens)
    assert o["logits_full"].shape == o["logits_step"].shape == (T, o["vocab_size"])
    torch.testing.assert_close(o["logits_step"], o["logits_full"], atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(o["logits_last"], o["logits_full"][-1], atol=LOGIT_ATOL, rtol=0)


def test_chunked_prefill_agrees_with_full(official_case_params):
    o = official_case_params.oracle
    T = len(official_case_params.tokens)
    ends = o["chunk_ends"]
    assert o["chunk"] == CASE_CHUNK and ends[-1] == T and len(ends) == -(-T // CASE_CHUNK)
    assert o["logits_chunked"].shape == (len(ends), o["vocab_size"])
    idx = torch.tensor(ends) - 1
    torch.testing.assert_close(o["logits_chunked"], o["logits_full"][idx], atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(o["logits_chunked_last"], o["logits_full"][-1], atol=LOGIT_ATOL, rtol=0)


def test_final_states_agree_across_variants(official_case_params):
    o = official_case_params.oracle
    assert len(o["state_after_chunk"]) == len(o["chunk_ends"])
    for a, b in zip(o["state_after_chunk"][-1], o["state_chunked"]):
        assert torch.equal(a, b)
    for name in ("state_step", "state_chunked"):
        assert len(o[name]) == len(o["state_full"])
        for a, b in zip(o[name], o["state_full"]):
            torch.testing.assert_close(a, b, atol=STATE_ATOL, rtol=1e-4)


def test_logits_are_realistic_and_not_degenerate(official_case_params):
    o = official_case_params.oracle
    logits = o["logits_full"]
    T = logits.shape[0]
    assert torch.isfinite(logits).all()
    assert 1.0 < logits.std() < 4.0
    assert logits.abs().max() < 30
    # different positions predict different things: the model is not a constant function
    assert len(set(logits.argmax(-1).tolist())) >= 0.75 * T
    assert (logits[1:] - logits[:-1]).abs().mean() > 0.5


def test_state_layout_is_as_documented(official_case_params):
    o = official_case_params.oracle
    L, Cm, K = o["n_layer"], o["n_embd"], o["state_per_layer"]
    assert K == (5 if o["version"] == "4" else 3)
    for name in ("state_full", "state_step", "state_chunked"):
        st = o[name]
        assert len(st) == K * L
        for i in range(L):
            layer = st[i * K : (i + 1) * K]
            assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in layer)
            if K == 5:  # att x_prev, aa, bb, pp, ffn x_prev
                assert [tuple(t.shape) for t in layer] == [(Cm,)] * 5
                assert (layer[2] > 0).all()  # bb: a sum of positive weights
                assert layer[3].max() > -1e29  # pp left its -1e30 start
            else:  # att x_prev, S, ffn x_prev
                H_, N_ = o["n_head"], o["head_size"]
                assert [tuple(t.shape) for t in layer] == [(Cm,), (H_, N_, N_), (Cm,)]
                assert layer[1].abs().max() > 0


def test_metadata_matches_the_builder(official_case_params):
    case = official_case_params
    o, kw = case.oracle, case.kwargs
    assert o["version"] == normalize_version(case.version)
    assert o["official_version"] == {"4": 4.0, "5.2": 5.2, "6": 6.0, "7": 7.0}[o["version"]]
    assert o["n_layer"] == kw["n_layer"] and o["n_embd"] == kw["n_embd"] and o["vocab_size"] == kw["vocab_size"]
    assert o["ffn_dim"] == kw.get("ffn_dim", default_ffn_dim(o["version"], kw["n_embd"]))
    if o["version"] != "4":
        assert o["head_size"] == kw["head_size"]
    assert o["reordered_keys"] == (o["version"] == "5.2" and o["n_layer"] == 1)
    assert o["has_time_state"] == bool(kw.get("time_state")) == (o["init_state"] is not None)
    assert o["deep_embed"] == bool(kw.get("deep_embed"))
    assert o["rwkv_version"] == "0.8.32"
    assert torch.equal(o["tokens"], case.tokens) and case.ckpt_path.exists()


def test_cases_cover_the_required_shapes():
    shapes = {(v, s) for v, s in CASES}
    for v in ("4", "5.2", "6", "7"):
        assert {(v, "base"), (v, "L1"), (v, "hs32")} <= shapes
    # head size 64 and 32, 1 and several layers, an FFN that is not 4x
    from rwkv_checkpoints import case_kwargs

    assert {case_kwargs("6", s)["head_size"] for s in ("base", "hs32")} == {64, 32}
    assert {case_kwargs("7", s)["n_layer"] for s in ("base", "L1")} == {3, 1}
    assert case_kwargs("4", "hs32")["ffn_dim"] == 200


def test_time_state_case_starts_from_the_time_state(official_case):
    for version in ("6", "7"):
        case = official_case(version, "state")
        expected = official_state_from_time_state(case.state_dict())
        assert len(case.oracle["init_state"]) == len(expected)
        for a, b in zip(case.oracle["init_state"], expected):
            assert torch.equal(a, b)


@pytest.fixture(scope="module")
def extra_runs(official_case):
    """Oracle runs beyond the shared cases, batched into one call (one subprocess per family)."""
    v6 = official_case("6", "state")
    zero = [torch.zeros_like(t) for t in official_state_from_time_state(v6.state_dict())]
    requests = {
        # the official default initial state of a state-tuned v6 checkpoint, and a zero start
        "v6_default": {"ckpt_path": v6.ckpt_path, "tokens": v6.tokens.tolist()},
        "v6_zero": {"ckpt_path": v6.ckpt_path, "tokens": v6.tokens.tolist(), "init_state": zero},
        # one-token prompts take the *_one code paths
        "v4_one": {"ckpt_path": official_case("4", "L1").ckpt_path, "tokens": [7]},
        "v7_one": {"ckpt_path": official_case("7", "L1").ckpt_path, "tokens": [7]},
    }
    # resume after the second chunk from the state the oracle recorded there
    for version in ("4", "5.2", "7"):
        case = official_case(version, "hs32")
        start = case.oracle["chunk_ends"][1]
        requests[f"v{version}_resume"] = {
            "ckpt_path": case.ckpt_path,
            "tokens": case.tokens[start:].tolist(),
            "init_state": case.oracle["state_after_chunk"][1],
        }
    return dict(zip(requests, run_official_many(list(requests.values()))))


def test_v6_default_initial_state_is_the_transposed_time_state(official_case, extra_runs):
    # The official v5/v6 class auto-loads time_state.transpose(1, 2); official_state_from_time_state
    # (also used for the v7 case) must reproduce it, and the time_state must actually matter.
    case = official_case("6", "state")
    default, from_zero = extra_runs["v6_default"], extra_runs["v6_zero"]
    assert default["init_state"] is None and case.oracle["init_state"] is not None
    torch.testing.assert_close(default["logits_full"], case.oracle["logits_full"], atol=0, rtol=0)
    assert (from_zero["logits_full"] - default["logits_full"]).abs().max() > 0.05


@pytest.mark.parametrize("version", ["4", "7"])
def test_single_token_prompt_has_one_row(extra_runs, version):
    o = extra_runs[f"v{version}_one"]
    assert o["logits_full"].shape == o["logits_step"].shape == (1, o["vocab_size"])
    torch.testing.assert_close(o["logits_full"], o["logits_step"], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("version", ["4", "5.2", "7"])
def test_explicit_initial_state_continues_a_prompt(official_case, extra_runs, version):
    # Resuming from the state after the first chunks reproduces the one-shot logits of the rest.
    o = official_case(version, "hs32").oracle
    start = o["chunk_ends"][1]
    rest = extra_runs[f"v{version}_resume"]
    assert rest["init_state"] is not None
    torch.testing.assert_close(rest["logits_full"], o["logits_full"][start:], atol=LOGIT_ATOL, rtol=0)
    for a, b in zip(rest["state_full"], o["state_full"]):
        torch.testing.assert_close(a, b, atol=STATE_ATOL, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# the oracle's entry points and refusals
# --------------------------------------------------------------------------------------------------


def test_cli_runs_v7_without_any_rwkv_environment(official_checkpoint, tmp_path):
    ckpt = official_checkpoint("7", n_layer=1, n_embd=64, head_size=32, vocab_size=300)
    out = tmp_path / "out.pt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_")}
    cmd = [sys.executable, str(HERE / "official_oracle.py"), str(ckpt), "--tokens", "1,2,3,299,0", "--out", str(out),
           "--chunk", "2"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    o = torch.load(out, weights_only=True)
    assert o["version"] == "7" and o["logits_full"].shape == (5, 300)
    assert o["chunk_ends"] == [2, 4, 5] and o["logits_chunked"].shape == (3, 300)
    torch.testing.assert_close(o["logits_step"], o["logits_full"], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("version", ["4", "5.2", "6"])
def test_oracle_refuses_dim_att_different_from_n_embd(official_checkpoint, version):
    ckpt = official_checkpoint(version, dim_att=64, head_size=32)
    with pytest.raises(OracleError, match="dim_att"):
        run_official(ckpt, [1, 2, 3])


def test_oracle_refuses_time_state_init_without_time_state(official_checkpoint):
    ckpt = official_checkpoint("7", n_layer=1, n_embd=64, head_size=32, vocab_size=300)
    with pytest.raises(OracleError, match="time_state"):
        run_official(ckpt, [1, 2], init_state="time_state")


@pytest.mark.gpu
def test_gpu_marker_only_runs_with_cuda():
    assert torch.cuda.is_available()
