"""ChatRWKV decoding rules as logits processors: each checked against ChatRWKV's own formula.

Expected values are either written out by hand from the formula, or come from a line-by-line port of the
ChatRWKV loop (v2/chat.py) or of rwkv's `PIPELINE.sample_logits` (rwkv/utils.py, CPU branch). The
ports are kept in this file on purpose: they are the specification, not shared code.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    SuppressTokensLogitsProcessor,
)

from rwkv_hf.logits_process_rwkv_hf import (
    CHATRWKV_BAN_VALUE,
    GENERATION_PRESETS,
    WORLD_AVOID_REPEAT_TOKEN_IDS,
    WORLD_DOUBLE_NEWLINE_TOKEN_ID,
    WORLD_END_OF_LINE_TOKEN_ID,
    WORLD_ZERO_WEIGHT_TOKEN_IDS,
    RwkvAvoidRepeatLogitsProcessor,
    RwkvBanTokensLogitsProcessor,
    RwkvInvalidScoreLogitsProcessor,
    RwkvNewlineAdjustLogitsProcessor,
    RwkvPenaltyLogitsProcessor,
    RwkvSamplingWarper,
    build_rwkv_logits_processors,
    chatrwkv_newline_adjustment,
    list_generation_presets,
    load_generation_preset,
    neutralize_hf_sampling,
    prepare_rwkv_generation,
    rwkv_sampling_probs,
    zero_weight_token_ids_from_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
PRESET_DIR = REPO / "configs" / "generation"


# ---------------------------------------------------------------------------------------------------
# Specification ports
# ---------------------------------------------------------------------------------------------------


def official_sample_probs(logits, temperature=1.0, top_p=0.85, top_k=0):
    """rwkv 0.8.32 PIPELINE.sample_logits, CPU branch, verbatim up to the final draw (returns its `p`)."""
    if temperature == 0:
        temperature = 1.0
        top_p = 0
    probs = torch.softmax(torch.as_tensor(logits).float(), dim=-1).numpy()
    sorted_ids = np.argsort(probs)
    sorted_probs = probs[sorted_ids][::-1]
    cumulative_probs = np.cumsum(sorted_probs)
    cutoff = float(sorted_probs[np.argmax(cumulative_probs >= top_p)])
    probs[probs < cutoff] = 0
    if top_k < len(probs) and top_k > 0:
        probs[sorted_ids[:-top_k]] = 0
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    return probs / np.sum(probs)


def chatrwkv_occurrence(generated, decay, zero_weight=()):
    """The occurrence dict of the ChatRWKV loop after sampling `generated` (chat.py / PIPELINE.generate)."""
    occurrence = {}
    for token in generated:
        for xxx in occurrence:
            occurrence[xxx] *= decay
        www = 0 if token in zero_weight else 1
        occurrence[token] = occurrence.get(token, 0) + www
    return occurrence


def chatrwkv_penalised(logits, occurrence, presence, frequency):
    out = logits.clone()
    for n in occurrence:
        out[n] -= presence + occurrence[n] * frequency
    return out


def world_like_tokenizer():
    """A word-level tokenizer built in memory (no download) that holds the tokens ChatRWKV cares about."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    words = ["<eot>", "<unk>", "\n", "\n\n", " ", "\t", "1", "12", "a1", "，", "：", "？", "！", "!"]
    words += [f"w{i}" for i in range(64 - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")))
    tok.add_special_tokens({"eos_token": "<eot>", "unk_token": "<unk>"})
    return tok, vocab


# ---------------------------------------------------------------------------------------------------
# 1. NaN / inf guard
# ---------------------------------------------------------------------------------------------------


def test_invalid_score_replaces_only_the_broken_rows():
    scores = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0],
            [1.0, float("nan"), 3.0, 4.0],
            [1.0, 2.0, float("inf"), 4.0],
            [-float("inf")] * 4,
            [0.5, -float("inf"), 0.2, 0.1],  # banned entries alone are valid
        ]
    )
    out = RwkvInvalidScoreLogitsProcessor(end_token_id=2)(torch.zeros(5, 3, dtype=torch.long), scores.clone())
    safe = torch.tensor([0.0, 0.0, 5e4, 0.0])  # ChatGLM3: scores.zero_(); scores[..., id] = 5e4
    torch.testing.assert_close(out[0], scores[0])
    for row in (1, 2, 3):
        torch.testing.assert_close(out[row], safe)
        assert torch.softmax(out[row], -1)[2] == 1.0  # all mass on the end token
    torch.testing.assert_close(out[4], scores[4])


def test_invalid_score_can_treat_any_inf_as_invalid_like_chatglm():
    scores = torch.tensor([[0.5, -float("inf"), 0.2]])
    proc = RwkvInvalidScoreLogitsProcessor(0, treat_neg_inf_as_invalid=True)
    out = proc(torch.zeros(1, 1, dtype=torch.long), scores)
    torch.testing.assert_close(out, torch.tensor([[5e4, 0.0, 0.0]]))


# ---------------------------------------------------------------------------------------------------
# 2. Presence / frequency penalty with decay
# ---------------------------------------------------------------------------------------------------


def test_penalty_matches_hand_computed_chatrwkv_occurrence():
    # Prompt [5, 5] is not counted. Generated 1, 2, 1, 3 with decay 0.5 (ChatRWKV: decay all, then +1):
    #   after 1: {1: 1}; after 2: {1: .5, 2: 1}; after 1: {1: 1.25, 2: .5}; after 3: {1: .625, 2: .25, 3: 1}
    # penalty = 0.3 + occ * 0.7  ->  1: 0.7375, 2: 0.475, 3: 1.0; 0, 4, 5: untouched
    proc = RwkvPenaltyLogitsProcessor(alpha_presence=0.3, alpha_frequency=0.7, penalty_decay=0.5, prompt_length=2)
    input_ids = torch.tensor([[5, 5, 1, 2, 1, 3]])
    out = proc(input_ids, torch.zeros(1, 6))
    torch.testing.assert_close(out, -torch.tensor([[0.0, 0.7375, 0.475, 1.0, 0.0, 0.0]]))


def test_penalty_zero_weight_tokens_keep_the_presence_part():
    # Same sequence, token 2 has weight 0 (PIPELINE.generate's digit/space rule): it stays in `occurrence`
    # with value 0, so it still pays alpha_presence (0.3) but no frequency part.
    proc = RwkvPenaltyLogitsProcessor(0.3, 0.7, 0.5, prompt_length=2, zero_weight_token_ids=[2])
    out = proc(torch.tensor([[5, 5, 1, 2, 1, 3]]), torch.zeros(1, 6))
    torch.testing.assert_close(out, -torch.tensor([[0.0, 0.7375, 0.3, 1.0, 0.0, 0.0]]))


def test_penalty_equals_the_chatrwkv_loop_on_long_random_batches():
    # 300 tokens at decay 0.996 against a port of the loop. Python floats vs float64 tensors: atol 1e-5.
    gen = torch.Generator().manual_seed(0)
    vocab, prompt = 50, 7
    ids = torch.randint(0, vocab, (3, prompt + 300), generator=gen)
    logits = torch.randn(3, vocab, generator=gen)
    zero_weight = {3, 4, 9}
    proc = RwkvPenaltyLogitsProcessor(0.4, 0.4, 0.996, prompt_length=prompt, zero_weight_token_ids=zero_weight)
    out = proc(ids, logits.clone())
    for row in range(3):
        occ = chatrwkv_occurrence(ids[row, prompt:].tolist(), 0.996, zero_weight)
        torch.testing.assert_close(out[row], chatrwkv_penalised(logits[row], occ, 0.4, 0.4), atol=1e-5, rtol=0)


def test_penalty_rows_are_independent_and_follow_beam_reordering():
    proc = RwkvPenaltyLogitsProcessor(0.4, 0.4, 0.996, prompt_length=1)
    ids = torch.tensor([[9, 1, 1, 2], [9, 3, 4, 4]])
    scores = torch.randn(2, 10)
    both = proc(ids, scores)
    for row in range(2):
        torch.testing.assert_close(both[row : row + 1], proc(ids[row : row + 1], scores[row : row + 1]))
    swapped = proc(ids.flip(0), scores.flip(0))  # beam search reorders rows between steps
    torch.testing.assert_close(swapped, both.flip(0))


def test_penalty_learns_the_prompt_length_on_the_first_call_and_restarts_per_generate_call():
    proc = RwkvPenaltyLogitsProcessor(1.0, 0.0, 1.0)  # presence only: -1 for every generated token
    zeros = torch.zeros(1, 8)
    # A generate loop: the first call sees exactly the prompt [7, 7, 7].
    assert proc(torch.tensor([[7, 7, 7]]), zeros).eq(0).all()
    out = proc(torch.tensor([[7, 7, 7, 2]]), zeros)
    assert out[0, 2] == -1 and out[0, 7] == 0
    out = proc(torch.tensor([[7, 7, 7, 2, 5]]), zeros)
    assert out[0, 2] == -1 and out[0, 5] == -1 and out[0, 7] == 0
    # A new call with another prompt (different length) starts from scratch.
    assert proc(torch.tensor([[2, 5, 1, 1]]), zeros).eq(0).all()
    # Same length as a continuation but a different prompt prefix: also a new call.
    assert proc(torch.tensor([[3, 5, 1, 1, 6]]), zeros).eq(0).all()
    # `reset()` forgets the prompt explicitly.
    proc.reset()
    assert proc(torch.tensor([[3, 5, 1, 1, 6, 4]]), zeros).eq(0).all()


# ---------------------------------------------------------------------------------------------------
# 3. Newline schedule
# ---------------------------------------------------------------------------------------------------


def chat_py_newline_adj_per_reply_token(n_tokens):
    """Port of the chat.py reply loop: which newline_adj reaches the logits that sample reply token k."""
    applied = [-999999999]  # out = run_rnn(pipeline.encode(new), newline_adj=-999999999)
    for i in range(n_tokens - 1):
        if i <= 0:
            newline_adj = -999999999
        elif i <= 40:
            newline_adj = (i - 40) / 10
        elif i <= 150:
            newline_adj = 0
        else:
            newline_adj = min(3, (i - 150) * 0.25)
        applied.append(newline_adj)  # out = run_rnn([token], newline_adj=newline_adj) -> samples token i+1
    return applied


@pytest.mark.parametrize(
    "k, expected",
    [(0, -999999999), (1, -999999999), (2, -3.9), (3, -3.8), (40, -0.1), (41, 0.0), (42, 0.0), (151, 0.0),
     (152, 0.25), (155, 1.0), (163, 3.0), (500, 3.0)],
)
def test_newline_schedule_by_hand(k, expected):
    assert chatrwkv_newline_adjustment(k) == pytest.approx(expected, abs=1e-12)


def test_newline_schedule_equals_the_chat_py_loop_for_every_length():
    expected = chat_py_newline_adj_per_reply_token(400)
    assert [chatrwkv_newline_adjustment(k) for k in range(400)] == pytest.approx(expected, abs=1e-12)


def test_newline_schedule_without_the_one_step_lag():
    assert chatrwkv_newline_adjustment(0, faithful_offset=False) == CHATRWKV_BAN_VALUE
    assert chatrwkv_newline_adjustment(1, faithful_offset=False) == pytest.approx(-3.9)
    assert chatrwkv_newline_adjustment(151, faithful_offset=False) == pytest.approx(0.25)


@pytest.mark.parametrize("generated, adj", [(0, -999999999.0), (2, -3.9), (45, 0.0), (160, 2.25)])
def test_newline_processor_adds_the_schedule_to_end_of_line_only_in_every_row(generated, adj):
    eol, prompt = 11, 4
    proc = RwkvNewlineAdjustLogitsProcessor(eol, prompt_length=prompt)
    scores = torch.randn(2, 20)
    ids = torch.zeros(2, prompt + generated, dtype=torch.long)
    out = proc(ids, scores.clone())
    expected = scores.clone()
    expected[:, eol] += adj
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------------------
# 4. AVOID_REPEAT and bans
# ---------------------------------------------------------------------------------------------------


def test_avoid_repeat_bans_the_last_token_only_in_rows_that_end_with_it():
    proc = RwkvAvoidRepeatLogitsProcessor([4, 6])
    ids = torch.tensor([[1, 4], [1, 2], [4, 6]])  # rows end with: avoided 4, plain 2, avoided 6
    scores = torch.randn(3, 8)
    out = proc(ids, scores.clone())
    expected = scores.clone()
    expected[0, 4] = -math.inf
    expected[2, 6] = -math.inf
    torch.testing.assert_close(out, expected)


def test_avoid_repeat_ids_come_from_the_tokenizer():
    tok, vocab = world_like_tokenizer()
    proc = RwkvAvoidRepeatLogitsProcessor(tok)
    assert set(proc.token_ids) == {vocab["，"], vocab["："], vocab["？"], vocab["！"]}
    assert RwkvAvoidRepeatLogitsProcessor(tok, chars="!").token_ids == (vocab["!"],)


def test_ban_tokens_is_what_suppress_tokens_does():
    scores = torch.randn(2, 9)
    ids = torch.zeros(2, 1, dtype=torch.long)
    ours = RwkvBanTokensLogitsProcessor([0, 5])(ids, scores.clone())
    theirs = SuppressTokensLogitsProcessor([0, 5])(ids, scores.clone())
    torch.testing.assert_close(ours, theirs)


# ---------------------------------------------------------------------------------------------------
# 5. Sampling warper vs the official sample_logits
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "temperature, top_p, top_k",
    [(1.0, 0.85, 0), (1.2, 0.5, 0), (2.0, 0.2, 0), (0.7, 0.9, 0), (1.4, 0.3, 5), (1.0, 0.0, 0), (1.0, 0.99, 3)],
)
def test_sampling_warper_distribution_equals_official_sample_logits(temperature, top_p, top_k):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 300, generator=gen) * 3
    warped = RwkvSamplingWarper(temperature, top_p, top_k)(torch.zeros(4, 1, dtype=torch.long), logits)
    probs = torch.softmax(warped, -1)  # what transformers samples from with T=1, top_p=1, top_k=0
    for row in range(4):
        expected = official_sample_probs(logits[row], temperature, top_p, top_k)
        np.testing.assert_allclose(probs[row].numpy(), expected, atol=1e-6, rtol=1e-5)
        assert ((expected == 0) == torch.isneginf(warped[row]).numpy()).all()  # same kept set


def test_sampling_toy_matches_the_measured_official_frequencies_shape():
    # top-p is computed at T=1 and keeps ties with the cutoff; temperature only reshapes the kept set.
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    p = rwkv_sampling_probs(logits, temperature=1.0, top_p=0.6)
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.2, 0.2, 0.0]]) / 0.9)
    p = rwkv_sampling_probs(logits, temperature=2.0, top_p=0.6)  # (p ** 0.5) renormalised on the kept set
    kept = torch.tensor([0.5, 0.2, 0.2]) ** 0.5
    torch.testing.assert_close(p[0, :3], kept / kept.sum())


def find_fp32_cumsum_short_of_one():
    """A 65536-way distribution whose fp32 cumsum stays below 1.0 in numpy and in torch."""
    for seed in range(50):
        logits = torch.randn(65536, generator=torch.Generator().manual_seed(seed))
        probs = torch.softmax(logits, -1)
        sorted_np = np.sort(probs.numpy())[::-1]
        if np.cumsum(sorted_np)[-1] < 1.0 and torch.cumsum(probs.sort(descending=True).values, 0)[-1] < 1.0:
            return logits
    pytest.skip("no fp32 distribution with a cumsum below 1.0 found")


def test_top_p_one_is_not_greedy_by_default_but_the_official_bug_can_be_reproduced():
    logits = find_fp32_cumsum_short_of_one()
    official = official_sample_probs(logits, 1.0, 1.0, 0)
    assert (official > 0).sum() == 1  # the official code degenerates to greedy
    bug = rwkv_sampling_probs(logits[None], 1.0, 1.0, reproduce_top_p_bug=True)[0].numpy()
    np.testing.assert_allclose(bug, official, atol=1e-7)
    fixed = rwkv_sampling_probs(logits[None], 1.0, 1.0)[0]
    torch.testing.assert_close(fixed, torch.softmax(logits, -1))


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, name, expected_range",
    [
        (lambda: RwkvPenaltyLogitsProcessor(alpha_presence=-0.1), "alpha_presence", ">= 0"),
        (lambda: RwkvPenaltyLogitsProcessor(alpha_frequency=float("nan")), "alpha_frequency", "NaN"),
        (lambda: RwkvPenaltyLogitsProcessor(alpha_frequency=float("inf")), "alpha_frequency", ">= 0"),
        (lambda: RwkvPenaltyLogitsProcessor(penalty_decay=0.0), "penalty_decay", "(0, 1]"),
        (lambda: RwkvPenaltyLogitsProcessor(penalty_decay=1.5), "penalty_decay", "(0, 1]"),
        (lambda: RwkvSamplingWarper(temperature=0.0), "temperature", "> 0"),
        (lambda: RwkvSamplingWarper(temperature=-1.0), "temperature", "> 0"),
        (lambda: RwkvSamplingWarper(top_p=1.5), "top_p", "[0, 1]"),
        (lambda: RwkvSamplingWarper(top_p=-0.1), "top_p", "[0, 1]"),
        (lambda: RwkvSamplingWarper(top_p=float("nan")), "top_p", "NaN"),
        (lambda: RwkvSamplingWarper(top_k=-1), "top_k", ">= 0"),
        (lambda: RwkvInvalidScoreLogitsProcessor(-3), "end_token_id", ">= 0"),
        (lambda: RwkvNewlineAdjustLogitsProcessor(11, chat_len_short=50, chat_len_long=10), "chat_len_long", ">="),
        (lambda: build_rwkv_logits_processors(alpha_presence=-1), "alpha_presence", ">= 0"),
    ],
)
def test_bad_parameters_raise_a_value_error_naming_the_parameter_and_range(make, name, expected_range):
    with pytest.raises(ValueError) as err:
        make()
    assert f"`{name}`" in str(err.value) and expected_range in str(err.value)


# ---------------------------------------------------------------------------------------------------
# Tokenizer helpers and World constants
# ---------------------------------------------------------------------------------------------------


def test_zero_weight_ids_use_the_substring_rule():
    tok, vocab = world_like_tokenizer()
    ids = zero_weight_token_ids_from_tokenizer(tok)
    assert ids == sorted([vocab[" "], vocab["\t"], vocab["1"], vocab["12"]])  # not "a1", not "\n"


@pytest.mark.slow
def test_world_constants_match_the_official_trie_tokenizer():
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    import rwkv

    tok = rwkv_tokenizer.TRIE_TOKENIZER(str(Path(rwkv.__path__[0]) / "rwkv_vocab_v20230424.txt"))
    assert tok.encode("\n") == [WORLD_END_OF_LINE_TOKEN_ID]
    assert tok.encode("\n\n") == [WORLD_DOUBLE_NEWLINE_TOKEN_ID]
    assert tuple(tok.encode("，：？！")) == WORLD_AVOID_REPEAT_TOKEN_IDS
    assert tuple(zero_weight_token_ids_from_tokenizer(tok, vocab_size=65530)) == WORLD_ZERO_WEIGHT_TOKEN_IDS


# ---------------------------------------------------------------------------------------------------
# Assembly, presets
# ---------------------------------------------------------------------------------------------------


def test_builder_uses_chatrwkv_order_and_tokenizer_ids():
    tok, vocab = world_like_tokenizer()
    procs = build_rwkv_logits_processors(
        tok, zero_weight_token_ids="auto", exact_sampling=True, temperature=1.2, top_p=0.5
    )
    assert [type(p) for p in procs] == [
        RwkvInvalidScoreLogitsProcessor,
        RwkvNewlineAdjustLogitsProcessor,
        RwkvAvoidRepeatLogitsProcessor,
        RwkvBanTokensLogitsProcessor,
        RwkvPenaltyLogitsProcessor,
        RwkvSamplingWarper,
    ]
    invalid, newline, _, ban, penalty, sampler = procs
    assert invalid.end_token_id == vocab["\n\n"] and newline.end_of_line_token_id == vocab["\n"]
    assert ban.token_ids == (0,)
    assert (penalty.alpha_presence, penalty.alpha_frequency, penalty.penalty_decay) == (0.4, 0.4, 0.996)
    assert set(penalty.zero_weight_token_ids) == {vocab[" "], vocab["\t"], vocab["1"], vocab["12"]}
    assert (sampler.temperature, sampler.top_p, sampler.top_k) == (1.2, 0.5, 0)


def test_builder_reads_rwkv_keys_from_a_generation_config():
    cfg = load_generation_preset("mechanical_qa")
    procs = build_rwkv_logits_processors(generation_config=cfg)
    assert [type(p) for p in procs] == [RwkvInvalidScoreLogitsProcessor, RwkvPenaltyLogitsProcessor]
    assert (procs[1].alpha_presence, procs[1].alpha_frequency) == (0.2, 0.2)


def test_prepare_moves_sampling_into_the_warper_and_neutralises_transformers_warpers():
    cfg, procs = prepare_rwkv_generation(None, load_generation_preset("chat"))
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k) == (True, 1.0, 1.0, 0)
    assert (procs[-1].temperature, procs[-1].top_p) == (1.2, 0.5)
    greedy_cfg, greedy_procs = prepare_rwkv_generation(None, load_generation_preset("extraction"))
    assert greedy_cfg.do_sample is False and not isinstance(greedy_procs[-1], RwkvSamplingWarper)
    assert neutralize_hf_sampling(GenerationConfig(min_p=0.1)).min_p == 0.0


def test_shipped_preset_files_are_copies_of_the_module_presets():
    shipped = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
    assert shipped == list_generation_presets()
    for name in shipped:
        assert json.loads((PRESET_DIR / f"{name}.json").read_text(encoding="utf-8")) == GENERATION_PRESETS[name]


@pytest.mark.parametrize("name", ["chat", "creative_writing", "mechanical_qa", "extraction", "chat_g1"])
def test_presets_load_with_generation_config_from_pretrained(name):
    cfg = GenerationConfig.from_pretrained(PRESET_DIR, config_file_name=f"{name}.json")
    preset = GENERATION_PRESETS[name]
    for key, value in preset.items():
        assert getattr(cfg, key) == value
    cfg.validate(strict=True)


def test_preset_numbers_follow_the_decoding_guide():
    chat, creative, qa = (GENERATION_PRESETS[n] for n in ("chat", "creative_writing", "mechanical_qa"))
    assert (chat["temperature"], chat["top_p"], chat["rwkv_alpha_presence"]) == (1.2, 0.5, 0.4)
    assert (creative["temperature"], creative["top_p"]) == (2.0, 0.2)
    assert (qa["temperature"], qa["top_p"]) == (1.0, 0.2)


# ---------------------------------------------------------------------------------------------------
# Integration: inside generate() of a tiny random GPT-2
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=256, n_embd=32, n_layer=1, n_head=2, initializer_range=0.5,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def replay_chat_py(raw_logits, prompt, generated, *, eol, avoid, eot, presence, frequency, decay, sample_probs=None):
    """Replays chat.py's reply loop on the raw logits of each step. Returns the per-step penalised logits
    and, for greedy runs, checks that each token is the argmax ChatRWKV would pick."""
    outs = []
    occurrence = {}
    out = raw_logits[0].clone()
    out[eol] += -999999999  # run_rnn(prompt, newline_adj=-999999999)
    if prompt[-1] in avoid:
        out[prompt[-1]] = -999999999
    out[eot] = -999999999  # our ban covers reply token 0 as well (documented deviation from chat.py)
    for i, token in enumerate(generated):
        for n in occurrence:
            out[n] -= presence + occurrence[n] * frequency
        outs.append(out)
        if sample_probs is None:
            assert token == int(out.argmax())
        for xxx in occurrence:
            occurrence[xxx] *= decay
        occurrence[token] = occurrence.get(token, 0) + 1
        if i + 1 == len(generated):
            break
        newline_adj = chat_py_newline_adj_per_reply_token(i + 2)[-1]
        out = raw_logits[i + 1].clone()
        out[eol] += newline_adj
        if token in avoid:
            out[token] = -999999999
        out[eot] = -999999999
    return outs


def test_greedy_generate_with_the_chat_set_equals_the_chat_py_loop(tiny_lm):
    tok, vocab = world_like_tokenizer()
    prompt = torch.tensor([[5, 9, 7, 9], [3, 4, 10, 2]])  # two different prompts, decoded independently
    procs = build_rwkv_logits_processors(tok, alpha_presence=0.4, alpha_frequency=0.4, penalty_decay=0.996)
    out = tiny_lm.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=procs, do_sample=False,
                           max_new_tokens=60, min_new_tokens=60, output_logits=True, output_scores=True,
                           return_dict_in_generate=True)
    raw = torch.stack(out.logits, 1)
    processed = torch.stack(out.scores, 1)
    avoid = {vocab[c] for c in "，：？！"}
    for row in range(2):
        generated = out.sequences[row, 4:].tolist()
        expected = replay_chat_py(raw[row], prompt[row].tolist(), generated, eol=vocab["\n"], avoid=avoid, eot=0,
                                  presence=0.4, frequency=0.4, decay=0.996)
        # Compare as distributions: ChatRWKV's -999999999 and our -inf are both probability 0.
        torch.testing.assert_close(torch.softmax(processed[row], -1), torch.softmax(torch.stack(expected), -1),
                                   atol=1e-6, rtol=1e-5)


def test_sampling_generate_with_a_preset_samples_chatrwkvs_distribution(tiny_lm):
    tok, vocab = world_like_tokenizer()
    cfg, procs = prepare_rwkv_generation(tok, load_generation_preset("chat", max_new_tokens=30))
    prompt = torch.tensor([[5, 9, 7, 9], [3, 4, 10, 2]])
    torch.manual_seed(123)
    cfg.update(output_logits=True, output_scores=True, return_dict_in_generate=True)
    out = tiny_lm.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=cfg, logits_processor=procs)
    raw = torch.stack(out.logits, 1)
    processed = torch.stack(out.scores, 1)
    avoid = {vocab[c] for c in "，：？！"}
    for row in range(2):
        generated = out.sequences[row, 4:].tolist()
        penalised = replay_chat_py(raw[row], prompt[row].tolist(), generated, eol=vocab["\n"], avoid=avoid, eot=0,
                                   presence=0.4, frequency=0.4, decay=0.996, sample_probs=True)
        for step, logits in enumerate(penalised):
            expected = official_sample_probs(logits, temperature=1.2, top_p=0.5)
            np.testing.assert_allclose(torch.softmax(processed[row, step], -1).numpy(), expected, atol=1e-6)
            assert expected[generated[step]] > 0  # the sampled token is one ChatRWKV could have drawn


def test_nan_logits_inside_generate_end_the_turn(tiny_lm):
    class NaNRow:
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[1] = float("nan")
            return scores

    tok, vocab = world_like_tokenizer()
    procs = build_rwkv_logits_processors(tok)
    procs.insert(0, NaNRow())  # stands in for a model whose second row overflowed
    prompt = torch.tensor([[5, 9, 7], [3, 4, 10]])
    out = tiny_lm.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=LogitsProcessorList(procs),
                           do_sample=True, max_new_tokens=3, eos_token_id=vocab["\n\n"], pad_token_id=0)
    assert out[1, 3] == vocab["\n\n"]
