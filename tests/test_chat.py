"""The ChatGLM3-style chat API (``model.chat`` / ``stream_chat`` / ``process_response``) on converted RWKV folders.

The models are tiny random ones (1 layer, 32 channels, World vocabulary 65536), converted to a folder and loaded
with the Auto classes, so the tests run the code path a user gets. Random models rarely write a blank line, so
tests that need a particular reply force it with a logits processor (passed as ``logits_processor=``, which runs
after the RWKV rules and before sampling) and decode greedily.
"""

from __future__ import annotations

import copy
import json
import math
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

import rwkv_hf
from model_factory import model_from_state_dict, tiny_world_folder
from rwkv_checkpoints import make_official_checkpoint
from rwkv_hf.chat_rwkv_hf import RwkvToolCallError, parse_tool_call
from rwkv_hf.logits_process_rwkv_hf import RwkvInvalidScoreLogitsProcessor, RwkvSamplingWarper
from rwkv_hf.tokenization_rwkv_hf import clean_chat_content

TINY = dict(n_layer=1, n_embd=32, head_size=16)
GREEDY = dict(do_sample=False)
HI_THERE = [3880, 39934, 47]  # " Hi", " there", "." in the World vocabulary
TURN_END_WORLD = 261  # "\n\n"
NEWLINE_WORLD = 11  # "\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_world_folder(tmp_path_factory.mktemp("chat_world"), seed=3)


@pytest.fixture(scope="module")
def tokenizer(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    tok.turn_end_ids  # noqa: B018 - computed once (a scan of the vocabulary)
    return tok


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


class Force(LogitsProcessor):
    """Makes the reply exactly `ids` (then repeats the last one): every other score becomes -inf."""

    def __init__(self, ids):
        self.ids = list(ids)
        self.start = None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        k = min(input_ids.shape[1] - self.start, len(self.ids) - 1)
        out = torch.full_like(scores, -math.inf)
        out[:, self.ids[k]] = 0.0
        return out


def run_stream(model, tokenizer, *args, **kwargs):
    """All the yields of one stream_chat call."""
    return list(model.stream_chat(tokenizer, *args, **kwargs))


def assert_same_state(a, b, atol=1e-5):
    assert a.get_seq_length() == b.get_seq_length()
    for layer in range(len(a.layers)):
        torch.testing.assert_close(a.wkv_state(layer), b.wkv_state(layer), atol=atol, rtol=0)
        for which in (0, 1):
            torch.testing.assert_close(a.shift_state(layer, which), b.shift_state(layer, which), atol=atol, rtol=0)


def state_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=True).cache


# --- ChatGLM3 code, unchanged ----------------------------------------------------------------------------------


def test_chatglm3_client_code_runs_unchanged(model, tokenizer):
    # composite_demo-style use of the low-level pieces: build_chat_input + generate + decode + process_response
    history = []
    query = "Who are you?"
    role = "user"
    inputs = tokenizer.build_chat_input(query, history=history, role=role)
    inputs = inputs.to(model.device)
    eos_token_id = [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    gen_kwargs = {"max_length": 500, "num_beams": 1, "do_sample": True, "top_p": 0.8, "temperature": 0.8}
    outputs = model.generate(**inputs, **gen_kwargs, eos_token_id=eos_token_id)
    # generate honours the caller's max_length (the folder's generation_config.json must not cap it): the reply
    # ends on one of the stop tokens or runs to exactly 500 tokens in all
    assert outputs.shape[1] == 500 or outputs[0, -1].item() in eos_token_id, outputs.shape
    outputs = outputs.tolist()[0][len(inputs["input_ids"][0]) : -1]
    response = tokenizer.decode(outputs)
    history.append({"role": role, "content": query})
    response, history = model.process_response(response, history)
    assert isinstance(response, str)
    assert [h["role"] for h in history] == ["user", "assistant"]

    # the next turn renders the reply into the prompt: "Assistant: {reply}\n\nUser: {query}\n\nAssistant:"
    prompt = tokenizer.build_chat_prompt("And then?", history=history)
    assert prompt.endswith(f"Assistant: {clean_chat_content(history[1]['content'])}\n\nUser: And then?\n\nAssistant:")

    # model.chat with ChatGLM3's keyword arguments
    length = tokenizer.build_chat_input("And then?", history=history)["input_ids"].shape[1]
    response, history, state = model.chat(tokenizer, "And then?", history=history, max_length=length + 10, num_beams=1,
                                          do_sample=True, top_p=0.8, temperature=0.8, return_past_key_values=True)
    assert isinstance(response, str) and [h["role"] for h in history] == ["user", "assistant", "user", "assistant"]
    assert state.get_seq_length() <= length + 10 + 1  # max_length bounds prompt + reply (+ the closing blank line)
    with pytest.raises(ValueError, match="leaves no room for a reply"):
        model.chat(tokenizer, "And then?", history=history, max_length=5)


def test_chatglm3_stream_chat_demo_loop_runs_unchanged(model, tokenizer):
    # ChatGLM3 composite_demo: keep past_key_values between turns, reset_state() -> [], None
    history, past_key_values = [], None
    for query in ("Hello", "Tell me more"):
        for response, history, past_key_values in model.stream_chat(
            tokenizer, query, history, past_key_values=past_key_values, return_past_key_values=True,
            max_new_tokens=6, top_p=0.8, temperature=0.8,
        ):
            assert isinstance(response, str)
    assert [h["role"] for h in history] == ["user", "assistant"] * 2
    assert past_key_values.frozen
    # the state holds the whole conversation text: both turns, both replies, both closing blank lines
    assert past_key_values._chat_token_ids[-1] == TURN_END_WORLD
    assert past_key_values.get_seq_length() == len(past_key_values._chat_token_ids)


# --- streaming ------------------------------------------------------------------------------------------------


def test_stream_chunks_concatenate_to_the_chat_reply_with_the_same_seed(model, tokenizer):
    kwargs = dict(history=[{"role": "system", "content": "Be brief."}], max_new_tokens=40, do_sample=True)
    torch.manual_seed(1234)
    reply, history = model.chat(tokenizer, "Hi!", **kwargs)
    torch.manual_seed(1234)
    yields = run_stream(model, tokenizer, "Hi!", **kwargs)

    responses = [r for r, _ in yields]
    assert responses[-1] == reply and yields[-1][1] == history
    assert len(responses) > 5  # it streamed
    chunks = [responses[0]] + [b[len(a) :] for a, b in zip(responses, responses[1:])]
    for a, b in zip(responses, responses[1:]):
        assert b.startswith(a)  # each yield extends the last one
    assert "".join(chunks) == reply
    # a partial UTF-8 character is held back (random byte tokens produce many)
    assert not any(r.endswith("\ufffd") for r in responses[:-1])
    # intermediate histories carry the partial reply; the caller's list is not touched
    assert yields[0][1][-1] == {"role": "assistant", "metadata": "", "content": responses[0]}
    assert kwargs["history"] == [{"role": "system", "content": "Be brief."}]


def test_leaving_the_stream_early_stops_the_generate_thread(model, tokenizer):
    stream = model.stream_chat(tokenizer, "Hi", max_new_tokens=5000)
    next(stream)
    stream.close()
    deadline = time.time() + 10
    while any(t.name == "rwkv-chat-generate" and t.is_alive() for t in threading.enumerate()):
        assert time.time() < deadline, "the generate thread kept running"
        time.sleep(0.02)


def test_errors_in_the_generate_thread_reach_the_caller(model, tokenizer):
    class Boom(LogitsProcessor):
        def __call__(self, input_ids, scores):
            raise RuntimeError("boom in a logits processor")

    with pytest.raises(RuntimeError, match="boom"):
        run_stream(model, tokenizer, "Hi", logits_processor=[Boom()])
    # init_state is passed on to generate; with none mounted the model refuses it (raised from the thread)
    with pytest.raises(ValueError, match="no initial state is loaded"):
        run_stream(model, tokenizer, "Hi", init_state="nope", max_new_tokens=2)
    with pytest.raises(ValueError, match="not used by the model"):  # a misspelt generate argument
        run_stream(model, tokenizer, "Hi", temprature=0.5)


def test_a_stalled_generate_thread_raises_timeout(model, tokenizer):
    class Slow(LogitsProcessor):
        def __call__(self, input_ids, scores):
            time.sleep(0.5)
            return scores

    with pytest.raises(TimeoutError, match="no token"):
        run_stream(model, tokenizer, "Hi", logits_processor=[Slow()], timeout=0.1, max_new_tokens=3)


# --- the state ------------------------------------------------------------------------------------------------


def test_state_continuation_equals_reencoding_the_history(model, tokenizer):
    first = run_stream(model, tokenizer, "hi", return_past_key_values=True, logits_processor=[Force(HI_THERE + [TURN_END_WORLD])], **GREEDY)
    reply, history, state = first[-1]
    assert reply == "Hi there." and history[-1]["content"] == "Hi there."
    assert all(s is None for _, _, s in first[:-1])
    # the state is the text up to and including the closing "\n\n", token for token
    ids = tokenizer.build_chat_input("hi")["input_ids"][0].tolist() + HI_THERE + [TURN_END_WORLD]
    assert state._chat_token_ids == ids
    assert_same_state(state, state_of(model, ids))
    snapshot = state.clone()

    kwargs = dict(max_new_tokens=12, return_past_key_values=True, **GREEDY)
    cont = run_stream(model, tokenizer, "What now?", history, past_key_values=state, **kwargs)[-1]
    fresh = run_stream(model, tokenizer, "What now?", history, **kwargs)[-1]
    assert cont[0] == fresh[0] and cont[1] == fresh[1]
    assert cont[2]._chat_token_ids == fresh[2]._chat_token_ids
    assert_same_state(cont[2], fresh[2])
    probe = torch.tensor([[5585, 41693, 59]])
    with torch.no_grad():
        torch.testing.assert_close(model(probe, cache=cont[2]).logits, model(probe, cache=fresh[2]).logits,
                                   atol=1e-5, rtol=0)
    # the saved state of turn 1 was not changed by turn 2 (nor by the probe forwards)
    assert_same_state(state, snapshot, atol=0)
    # and it can seed the same turn again: regenerate gives the same greedy reply
    again = run_stream(model, tokenizer, "What now?", history, past_key_values=state, **kwargs)[-1]
    assert again[0] == cont[0]


def test_a_reply_cut_by_the_token_limit_gets_its_blank_line_in_the_state(model, tokenizer):
    reply, history, state = model.chat(tokenizer, "hi", max_new_tokens=3, return_past_key_values=True,
                                       logits_processor=[Force([1000, 1001, 1002, 1003])], **GREEDY)
    ids = tokenizer.build_chat_input("hi")["input_ids"][0].tolist() + [1000, 1001, 1002, TURN_END_WORLD]
    assert state._chat_token_ids == ids
    assert_same_state(state, state_of(model, ids))
    assert reply == tokenizer.decode([1000, 1001, 1002]).strip()


@pytest.mark.parametrize(
    "forced, reply_ids",
    [
        (HI_THERE + [TURN_END_WORLD, 1000], HI_THERE),  # the "\n\n" token
        (HI_THERE + [NEWLINE_WORLD, NEWLINE_WORLD, 1000], HI_THERE),  # "\n" "\n" as two tokens
        (HI_THERE + [0, 1000], HI_THERE),  # end of text: not fed; a blank line is fed instead
    ],
    ids=["turn-end-token", "two-newlines", "end-of-text"],
)
def test_the_reply_stops_at_the_end_of_the_turn(model, tokenizer, forced, reply_ids):
    reply, history, state = model.chat(tokenizer, "hi", max_new_tokens=20, return_past_key_values=True,
                                       logits_processor=[Force(forced)], **GREEDY)
    assert reply == "Hi there."
    prompt = tokenizer.build_chat_input("hi")["input_ids"][0].tolist()
    stop = forced[len(reply_ids) : forced.index(1000)]
    expected = prompt + reply_ids + ([TURN_END_WORLD] if stop == [0] else stop)
    assert state._chat_token_ids == expected
    assert_same_state(state, state_of(model, expected))


def test_beam_search_chat_returns_the_state_of_the_chosen_reply(model, tokenizer):
    kwargs = dict(max_new_tokens=4, num_beams=2, do_sample=False, return_past_key_values=True)
    reply, history, state = model.chat(tokenizer, "hi", **kwargs)
    assert state.batch_size == 1
    assert_same_state(state, state_of(model, state._chat_token_ids))
    _, _, state2 = model.chat(tokenizer, "more", history, past_key_values=state, **kwargs)
    assert state2._chat_token_ids[: len(state._chat_token_ids)] == state._chat_token_ids
    assert_same_state(state2, state_of(model, state2._chat_token_ids))
    with pytest.raises(ValueError, match="beam search"):  # transformers streams one sequence only
        run_stream(model, tokenizer, "hi", **kwargs)


def test_every_token_containing_a_blank_line_ends_the_reply(model, tokenizer):
    others = tokenizer.turn_end_ids[1:]
    assert others and all("\n\n" in tokenizer.decode([i]) for i in others)
    reply, _ = model.chat(tokenizer, "hi", max_new_tokens=20, logits_processor=[Force(HI_THERE + [others[0], 1000])],
                          **GREEDY)
    assert reply == (tokenizer.decode(HI_THERE + [others[0]]).split("\n\n")[0]).strip()


def test_20b_tokenizer_model_stops_on_two_newline_tokens(tmp_path):
    from rwkv_hf.tokenization_rwkv_hf import Rwkv20BTokenizer

    tok = Rwkv20BTokenizer()
    model = model_from_state_dict(make_official_checkpoint("4", vocab_size=50277, seed=5, **TINY))
    hi = tok(" Hi there.", add_special_tokens=False)["input_ids"]
    reply, _, state = model.chat(tok, "hi", max_new_tokens=20, return_past_key_values=True,
                                 logits_processor=[Force(hi + [187, 187, 1000])], **GREEDY)
    assert reply == "Hi there."
    ids = tok.build_chat_input("hi")["input_ids"][0].tolist() + hi + [187, 187]
    assert state._chat_token_ids == ids
    assert_same_state(state, state_of(model, ids))
    reply, _ = model.chat(tok, "hi", max_new_tokens=20, logits_processor=[Force(hi + [535, 1000])], **GREEDY)
    assert reply == "Hi there."


# --- generation settings --------------------------------------------------------------------------------------


def test_chat_settings_come_from_the_preset_and_gen_kwargs_override_them(model, tokenizer):
    plan = model._chat_plan(tokenizer, [1, 2], None, {}, chat_rules=True, stop_at_turn_end=True)
    procs = plan.logits_processor
    assert isinstance(procs[0], RwkvInvalidScoreLogitsProcessor)  # the NaN/Inf guard sees raw logits
    assert isinstance(procs[-1], RwkvSamplingWarper)  # ChatRWKV's sampler, chat preset: T 1.2, top_p 0.5
    assert (procs[-1].temperature, procs[-1].top_p) == (1.2, 0.5)
    assert plan.generation_config.max_new_tokens == 999
    assert plan.eos_ids[: len(tokenizer.turn_end_ids)] == tokenizer.turn_end_ids and 0 in plan.eos_ids

    mine = Force([5])
    plan = model._chat_plan(tokenizer, [1, 2], None, dict(temperature=0.7, top_p=0.9, max_new_tokens=7,
                                  logits_processor=[mine], alpha_presence=0.0), chat_rules=True, stop_at_turn_end=True)
    procs = plan.logits_processor
    assert isinstance(procs[0], RwkvInvalidScoreLogitsProcessor)
    assert procs[-2] is mine and (procs[-1].temperature, procs[-1].top_p) == (0.7, 0.9)
    assert plan.generation_config.max_new_tokens == 7
    assert next(p for p in procs if type(p).__name__ == "RwkvPenaltyLogitsProcessor").alpha_presence == 0.0

    plan = model._chat_plan(tokenizer, [1, 2], None, dict(do_sample=False, max_length=50), chat_rules=True,
                                  stop_at_turn_end=True)
    assert not any(isinstance(p, RwkvSamplingWarper) for p in plan.logits_processor)
    assert plan.generation_config.max_new_tokens == 48  # max_length counts the prompt (2 tokens here)
    plan = model._chat_plan(tokenizer, [1, 2], None, dict(preset="chat_g1"), chat_rules=True, stop_at_turn_end=True)
    assert plan.logits_processor[-1].top_p == 0.3


def test_invalid_logits_end_the_reply(folder, tokenizer):
    broken = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        broken.head.weight[:, 0] = float("nan")  # every logit is NaN
    reply, history = broken.chat(tokenizer, "hi", max_new_tokens=20)
    assert reply == "" and history[-1]["content"] == ""


# --- process_response: tool calls -----------------------------------------------------------------------------

TOOLS = [{"name": "get_weather", "description": "Weather of a city", "parameters": {"city": {"type": "string"}}}]
TOOL_HISTORY = [
    {"role": "system", "content": "Answer with the tools when needed.", "tools": TOOLS},
    {"role": "user", "content": "Weather in Paris?"},
]


def test_process_response_parses_a_tool_call_without_executing_it(model, tokenizer):
    output = ('get_weather\n```python\ntool_call(city="Paris", days=3, units=["c", "f"], opts={"a": 1.5}, '
              "ok=True, none=None, neg=-2)\n```")
    history = copy.deepcopy(TOOL_HISTORY)
    content, new_history = model.process_response(output, history)
    assert content == {"name": "get_weather", "parameters": {"city": "Paris", "days": 3, "units": ["c", "f"],
                                                             "opts": {"a": 1.5}, "ok": True, "none": None, "neg": -2}}
    assert new_history[-1] == {"role": "assistant", "metadata": "get_weather", "content": output.split("\n", 1)[1]}
    assert history == TOOL_HISTORY  # not mutated
    # the call renders back as ChatGLM3's "name\n```python ..." turn; the tool result goes back as an observation
    observation = json.dumps({"temperature": 21})
    prompt = tokenizer.build_chat_prompt(observation, new_history, role="observation")
    assert prompt.endswith(f"Assistant: {output}\n\nObservation: {observation}\n\nAssistant:")


@pytest.mark.parametrize(
    "code, why",
    [
        ('tool_call(city=__import__("os").system("echo pwned"))', "not a literal"),
        ("tool_call(city=open('/etc/passwd').read())", "not a literal"),
        ('tool_call("Paris")', "keyword arguments only"),
        ("tool_call(**{'city': 'Paris'})", r"\*\*"),
        ('tool_call(city="a", city="b")', "given twice"),
        ('tool_call(city="Paris"', "not a single Python expression"),
        ('tool_call(city="Paris"); print(1)', "not a single Python expression"),
    ],
)
def test_process_response_refuses_invalid_tool_calls(model, code, why):
    with pytest.raises(RwkvToolCallError, match=why) as err:
        model.process_response(f"get_weather\n```python\n{code}\n```", TOOL_HISTORY)
    assert "expected" in str(err.value) and err.value.name == "get_weather"


def test_process_response_tool_call_shape_errors_and_plain_text(model):
    with pytest.raises(RwkvToolCallError, match="not closed"):
        model.process_response('get_weather\n```python\ntool_call(city="Paris")', TOOL_HISTORY)
    with pytest.raises(RwkvToolCallError, match="after the closing"):
        model.process_response('get_weather\n```python\ntool_call(city="Paris")\n```\nDone!', TOOL_HISTORY)
    with pytest.raises(RwkvToolCallError, match="no tool named 'search'"):
        model.process_response('search\n```python\ntool_call(q="x")\n```', TOOL_HISTORY)
    # not an attempt to call a tool: plain text, with or without tools
    text = "Sure!\n```python\nprint('hello')\n```"
    assert model.process_response(text, TOOL_HISTORY)[0] == text
    call = 'get_weather\n```python\ntool_call(city="Paris")\n```'
    content, history = model.process_response("  " + call + "\n", TOOL_HISTORY[1:])  # no tools declared
    assert content == call and history[-1] == {"role": "assistant", "metadata": "", "content": call}
    assert parse_tool_call("just text") is None
    # OpenAI-style tool lists name their tools too
    openai = [{"role": "system", "content": "", "tools": [{"type": "function", "function": {"name": "f"}}]}]
    assert model.process_response("f\n```\ntool_call(x=1)\n```", openai)[0] == {"name": "f", "parameters": {"x": 1}}


def test_a_tool_call_reply_from_chat(model, tokenizer):
    call = 'get_weather\n```python\ntool_call(city="Paris")\n```'
    ids = tokenizer(" " + call + "\n\n", add_special_tokens=False)["input_ids"]
    response, history = model.chat(tokenizer, "Weather in Paris?", TOOL_HISTORY[:1], logits_processor=[Force(ids)],
                                   max_new_tokens=len(ids) + 2, **GREEDY)
    assert response == {"name": "get_weather", "parameters": {"city": "Paris"}}
    assert history[-1]["metadata"] == "get_weather"
    # the observation turn continues the conversation
    reply, history = model.chat(tokenizer, json.dumps({"temp": 21}), history, role="observation", max_new_tokens=3)
    assert [h["role"] for h in history] == ["system", "user", "assistant", "observation", "assistant"]


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(role="bot"), ValueError, "unknown role 'bot'; expected one of 'system', 'user'"),
        (dict(history="hello"), TypeError, "history must be a list of dicts"),
        (dict(history=[("hi", "hello")]), TypeError, r"not of \(query, response\) pairs"),
        (dict(history=[{"role": "user"}]), ValueError, r"history\[0\] \(role 'user'\) has no 'content'"),
        (dict(history=[{"role": "robot", "content": "x"}]), ValueError, r"unknown role in history\[0\]"),
        (dict(history=[{"content": "x"}]), ValueError, r"history\[0\] has no 'role'"),
        (dict(query=""), ValueError, "the query is empty"),
        (dict(query="  \n "), ValueError, "the query is empty"),
        (dict(query=None), TypeError, "query must be a str"),
        (dict(past_key_values=[torch.zeros(1)]), TypeError, "past_key_values must be the state returned"),
        (dict(tokenizer=None), TypeError, "rwkv_hf tokenizer"),
        (dict(preset="nope"), ValueError, "unknown generation preset 'nope'"),
        (dict(streamer=object()), ValueError, "streamer is set by chat itself"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_is_refused_with_a_clear_error(model, tokenizer, kwargs, error, match):
    call = dict(tokenizer=tokenizer, query="hi", max_new_tokens=2)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        model.chat(**call)
    with pytest.raises(error, match=match):
        next(model.stream_chat(**call))
