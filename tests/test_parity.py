"""Numerical parity with the official `rwkv` package (ChatRWKV's engine, `cpu fp32`) on random checkpoints.

Tolerances from the oracle's own spread (research notes §7): the official package's one-call and token-by-token
paths differ by up to ~1.5e-5, so logits must agree within 1e-4 and states within 1e-3.
"""

from __future__ import annotations

import pytest
import torch

from rwkv_checkpoints import CASES
from rwkv_hf import RwkvCache, convert_rwkv_checkpoint
from rwkv_hf.convert_rwkv_hf import CheckpointError

LOGITS_ATOL = 1e-4
STATE_ATOL = 1e-3

PLAIN_CASES = [(v, s) for v, s in CASES if s not in ("de", "state")]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert each case's .pth through the public converter (once per case)."""
    root = tmp_path_factory.mktemp("converted")
    models = {}

    def get(case):
        key = (case.version, case.shape)
        if key not in models:
            models[key] = convert_rwkv_checkpoint(case.ckpt_path, root / f"v{key[0]}-{key[1]}", progress=False).eval()
        return models[key]

    return get


def assert_state_close(cache: RwkvCache, official_state, atol=STATE_ATOL):
    ours = cache.to_official_state()
    assert len(ours) == len(official_state)
    for i, (a, b) in enumerate(zip(ours, official_state)):
        b = b.float()
        if cache.rwkv_version == "4" and i % 5 == 3:
            # pp is a log-scale: compare where it is finite-sized (the empty state is -1e30 in both)
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=f"state tensor {i} (pp)")
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=f"state tensor {i}")


@pytest.mark.parametrize("version,shape", PLAIN_CASES, ids=[f"v{v}-{s}" for v, s in PLAIN_CASES])
def test_whole_sequence_in_one_call(official_case, converted, version, shape):
    case = official_case(version, shape)
    model = converted(case)
    with torch.no_grad():
        out = model(case.tokens[None], use_cache=True)
    torch.testing.assert_close(out.logits[0], case.oracle["logits_full"], atol=LOGITS_ATOL, rtol=0)
    assert_state_close(out.cache, case.oracle["state_full"])


@pytest.mark.parametrize("version,shape", PLAIN_CASES, ids=[f"v{v}-{s}" for v, s in PLAIN_CASES])
def test_token_by_token_through_the_cache(official_case, converted, version, shape):
    case = official_case(version, shape)
    model = converted(case)
    cache, logits = None, []
    with torch.no_grad():
        for token in case.tokens:
            out = model(token.view(1, 1), cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(logits), case.oracle["logits_step"], atol=LOGITS_ATOL, rtol=0)
    assert_state_close(cache, case.oracle["state_step"])


@pytest.mark.parametrize("version,shape", PLAIN_CASES, ids=[f"v{v}-{s}" for v, s in PLAIN_CASES])
def test_chunked_prefill(official_case, converted, version, shape):
    case = official_case(version, shape)
    model = converted(case)
    cache, last, start = None, [], 0
    with torch.no_grad():
        for end in case.oracle["chunk_ends"]:
            out = model(case.tokens[None, start:end], cache=cache, use_cache=True)
            cache, start = out.cache, end
            last.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(last), case.oracle["logits_chunked"], atol=LOGITS_ATOL, rtol=0)
    assert_state_close(cache, case.oracle["state_chunked"])


@pytest.mark.parametrize("version", ["6", "7"])
def test_starting_from_a_tuned_state(official_case, converted, version):
    """The oracle starts from the checkpoint's time_state (official list layout); so do we, via that list."""
    case = official_case(version, "state")
    model = converted(case)
    init = RwkvCache.from_official_state(model.config, case.oracle["init_state"])
    with torch.no_grad():
        out = model(case.tokens[None], cache=init, use_cache=True)
    torch.testing.assert_close(out.logits[0], case.oracle["logits_full"], atol=LOGITS_ATOL, rtol=0)
    assert_state_close(out.cache, case.oracle["state_full"])


def test_deep_embed_is_refused_rather_than_silently_wrong(official_case, tmp_path):
    case = official_case("7", "de")
    with pytest.raises(CheckpointError, match="DeepEmbed"):
        convert_rwkv_checkpoint(case.ckpt_path, tmp_path / "de", progress=False)


def test_official_state_list_round_trips(official_case, converted):
    case = official_case("7", "base")
    model = converted(case)
    cache = RwkvCache.from_official_state(model.config, case.oracle["state_full"])
    for a, b in zip(cache.to_official_state(), case.oracle["state_full"]):
        assert torch.equal(a, b.float())
