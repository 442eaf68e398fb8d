"""ChatGLM3-style chat API for RWKV causal LMs: ``model.chat``, ``model.stream_chat``, ``model.process_response``.

The API is ChatGLM3's (``THUDM/chatglm3-6b`` remote code), so code written for it runs unchanged::

    response, history = model.chat(tokenizer, "Hello", history=[])
    for response, history, past_key_values in model.stream_chat(
        tokenizer, query, history, past_key_values=past_key_values, return_past_key_values=True
    ):
        ...

What differs from ChatGLM3, and why:

* **Built on public APIs only.** ChatGLM3's ``stream_chat`` used a hand-written sampling loop over private
  ``GenerationMixin`` helpers and broke on several transformers upgrades. Here everything goes through the public
  ``generate()``; streaming runs it in a thread with a ``BaseStreamer`` (the ``TextIteratorStreamer`` mechanism:
  a queue read with a timeout) that hands over token ids, so the text is decoded here and a partial UTF-8
  character is never shown. An exception in the generate thread is re-raised in the caller, a stalled thread
  raises ``TimeoutError`` after ``timeout`` seconds, and leaving the loop early stops the thread.
* **The RWKV chat format.** Turns are ``"Role: content\\n\\n"`` (see the tokenizer's ``build_chat_input``); a reply
  ends when the model writes a blank line. The eos ids are ``tokenizer.turn_end_ids`` (every token containing
  ``"\\n\\n"``) plus the end-of-text id 0, and a stopping criterion catches ``"\\n"`` ``"\\n"`` written as two tokens
  (the usual case for RWKV-4 Pile/Raven models and the 20B tokenizer). The reply is cut at the first blank line
  and stripped.
* **ChatRWKV's decoding by default.** Settings come from the ``chat`` generation preset and the RWKV logits
  processors (``prepare_rwkv_generation``: NaN/Inf guard first, newline schedule, ``，：？！`` repeat ban,
  end-of-text ban, presence/frequency penalties with decay, ChatRWKV's top-p-then-temperature sampler). Any
  ``generate`` keyword overrides them (``temperature``, ``top_p``, ``max_new_tokens``, ``do_sample``,
  ``generation_config``, ``logits_processor``, ``stopping_criteria``, ...); ``preset=`` picks another preset and
  ``alpha_presence`` / ``alpha_frequency`` / ``penalty_decay`` / ``exact_sampling`` tune the RWKV processors.
  ``max_length`` (ChatGLM3's knob) is honoured when ``max_new_tokens`` is not given.
* **The state.** With ``past_key_values`` from the last turn only the new turn is encoded. ``generate`` never
  feeds the last sampled token, so after a reply the stop token(s) are fed through the model (and ``"\\n\\n"`` is
  fed when the reply ended without one: token limit or end-of-text), so the returned state holds exactly the
  conversation text up to and including the closing ``"\\n\\n"``. It is a frozen ``RwkvCache``: forwards given it
  work on a copy, so a saved state can seed any number of later turns (regenerate, fork) unchanged. Intermediate
  yields of ``stream_chat`` carry ``None`` for it (the state is being written by the generate thread); a caller
  that stops early therefore falls back to re-encoding the history, which holds the partial reply.
* **History is not mutated.** ChatGLM3's ``chat`` appends the query to the caller's list; here every call returns
  new lists and leaves the argument alone.
* **Tool calls** (``process_response``): a reply is parsed as a call only when the first history message is a
  ``system`` message with ``tools`` and the reply has ChatGLM3's shape ``name\\n```python\\ntool_call(...)\\n```\\ ``.
  The call is read with ``ast`` (never ``eval``): keyword arguments with literal values only. A reply of that shape
  that is not a valid call raises ``RwkvToolCallError`` (ChatGLM3 would raise from ``eval``), naming what was wrong;
  nothing is executed. Any other reply is plain text. ChatGLM3's code-interpreter result
  ``{"name": ..., "content": ...}`` (a reply with metadata but no tools) is not produced: ChatGLM3 knows a reply has
  metadata from its ``<|assistant|>`` channel, while an RWKV reply is free text whose first line may be anything.

This file is copied next to the modeling code for ``trust_remote_code``: it imports only torch, transformers, the
standard library and sibling modules.
"""

from __future__ import annotations

import ast
import copy
import queue
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation import BaseStreamer

from .compat_rwkv_hf import cache_kwargs, model_output_cache

from .logits_process_rwkv_hf import (
    RwkvInvalidScoreLogitsProcessor,
    RwkvSamplingWarper,
    load_generation_preset,
    prepare_rwkv_generation,
)

__all__ = ["RwkvChatModelMixin", "RwkvToolCallError", "parse_tool_call"]

CHAT_ROLES = ("system", "user", "assistant", "observation")
TURN_END = "\n\n"
DEFAULT_CHAT_PRESET = "chat"
DEFAULT_STREAM_TIMEOUT = 600.0  # seconds to wait for the next token before giving up on the generate thread
# keyword arguments that tune the RWKV logits processors rather than GenerationConfig
_RWKV_PROCESSOR_KWARGS = ("alpha_presence", "alpha_frequency", "penalty_decay", "exact_sampling")
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}  # transformers' own: no warning when greedy


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return type(value).__name__


def _roles_text() -> str:
    return ", ".join(map(repr, CHAT_ROLES))


def _check_role(role: Any, what: str = "role") -> str:
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise ValueError(f"unknown {what} {role!r}; expected one of {_roles_text()}")
    return role


def _check_history(history: Any) -> list[dict]:
    """A copy of ``history`` after checking it is ChatGLM3's list of ``{"role", "content", ...}`` dicts."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise TypeError(
            "history must be a list of dicts like {'role': 'user', 'content': '...'} (ChatGLM3's format), "
            f"got {_type_name(history)}"
        )
    for i, item in enumerate(history):
        if not isinstance(item, dict):
            hint = " (history is a list of dicts, not of (query, response) pairs)" if isinstance(item, (tuple, list)) else ""
            raise TypeError(
                f"history[{i}] must be a dict like {{'role': 'user', 'content': '...'}}, got {_type_name(item)}{hint}"
            )
        if "role" not in item:
            raise ValueError(f"history[{i}] has no 'role'; expected one of {_roles_text()}")
        _check_role(item["role"], f"role in history[{i}]:")
        if "content" not in item:
            raise ValueError(f"history[{i}] (role {item['role']!r}) has no 'content'")
        if not isinstance(item["content"], str):
            raise TypeError(
                f"history[{i}]['content'] must be a str, got {_type_name(item['content'])} (a parsed tool call "
                "returned by process_response is not history content: keep the history it returns)"
            )
    return copy.deepcopy(list(history))


def _check_query(query: Any) -> str:
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {_type_name(query)}")
    if not query.strip():
        raise ValueError("the query is empty: a chat turn needs some text (after stripping whitespace)")
    return query


def _check_tokenizer(tokenizer: Any) -> None:
    if not hasattr(tokenizer, "build_chat_input") or not hasattr(tokenizer, "turn_end_ids"):
        raise TypeError(
            "chat needs an rwkv_hf tokenizer (RwkvWorldTokenizer or Rwkv20BTokenizer, with build_chat_input and "
            f"turn_end_ids); got {_type_name(tokenizer)}. Load it with AutoTokenizer.from_pretrained(model_folder)."
        )


def _check_cache(past_key_values: Any) -> Any:
    if not (hasattr(past_key_values, "get_seq_length") and hasattr(past_key_values, "clone")):
        raise TypeError(
            "past_key_values must be the state returned by stream_chat(..., return_past_key_values=True) "
            f"(an RwkvCache), got {_type_name(past_key_values)}"
        )
    batch = getattr(past_key_values, "batch_size", None)
    if batch not in (None, 1):
        raise ValueError(f"past_key_values holds {batch} rows; chat continues a single conversation (batch size 1)")
    return past_key_values


# ----------------------------------------------------------------------------------------------------------------
# Tool calls
# ----------------------------------------------------------------------------------------------------------------


class RwkvToolCallError(ValueError):
    """A reply shaped like a tool call that is not a valid one. ``text`` is the reply, ``name`` the tool name."""

    def __init__(self, message: str, text: str = "", name: Optional[str] = None):
        super().__init__(message)
        self.text = text
        self.name = name


_EXPECTED_CALL = "name\\n```python\\ntool_call(key=value, ...)\\n``` with literal values (str, number, list, dict, ...)"
# The shape RWKV-Runner also detects: a bare name on the first line, then a fence whose code starts with tool_call(.
# (No two adjacent repeats can match the same characters: a reply of 64k spaces must not cost quadratic time.)
_CALL_INTENT = re.compile(r"\A([A-Za-z_][\w.\-]*)[ \t]*\n[ \t]*```\w*[ \t]*(?:\n[ \t\n]*)?tool_call[ \t]*\(", re.S)
_CALL_SHAPE = re.compile(r"\A([A-Za-z_][\w.\-]*)[ \t]*\n[ \t]*```(?:[\w+\-]*[ \t]*\n)?(.*?)```[ \t]*\Z", re.S)


def _tool_names(tools: Any) -> Optional[set]:
    """Names declared in ChatGLM3 (``{"name": ...}``) or OpenAI (``{"function": {"name": ...}}``) tool lists."""
    items = tools if isinstance(tools, (list, tuple)) else [tools]
    names = set()
    for tool in items:
        if isinstance(tool, dict):
            if isinstance(tool.get("name"), str):
                names.add(tool["name"])
            elif isinstance(tool.get("function"), dict) and isinstance(tool["function"].get("name"), str):
                names.add(tool["function"]["name"])
    return names or None


def parse_tool_call(text: str, tool_names: Optional[set] = None) -> Optional[tuple[str, dict, str]]:
    """Read a ChatGLM3 tool call ``name\\n```python\\ntool_call(k=v, ...)\\n```\\ `` without executing anything.

    Returns ``(name, parameters, code_block)`` or None when the text does not try to call a tool (no
    ``name`` line followed by a fenced ``tool_call(``). Raises ``RwkvToolCallError`` when it tries and fails: an
    unclosed fence, text after it, code that is not exactly one ``tool_call(...)`` expression, positional or
    ``**`` arguments, a repeated keyword, a value that is not a Python literal (names, calls, attribute access,
    operators other than literal arithmetic are refused by ``ast.literal_eval``), or a name not in
    ``tool_names`` (when given).
    """
    text = text.strip()
    intent = _CALL_INTENT.match(text)
    if intent is None:
        return None
    name = intent.group(1)

    def fail(why: str) -> RwkvToolCallError:
        return RwkvToolCallError(f"invalid tool call to {name!r}: {why}; expected {_EXPECTED_CALL}", text, name)

    shape = _CALL_SHAPE.match(text)
    if shape is None:
        if text.count("```") < 2:
            raise fail("the ``` code block is not closed (the reply may have hit the token limit)")
        raise fail("there is text after the closing ```")
    block = text.split("\n", 1)[1].strip()
    code = shape.group(2).strip()
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError as err:
        raise fail(f"the code is not a single Python expression ({err.msg})") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id != "tool_call":
        raise fail(f"the code must be one call of tool_call(...), got {code[:60]!r}")
    if call.args:
        raise fail("tool_call takes keyword arguments only (got a positional argument)")
    params: dict = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise fail("tool_call(**...) is not allowed: name every argument")
        if kw.arg in params:
            raise fail(f"argument {kw.arg!r} is given twice")
        try:
            params[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise fail(f"the value of {kw.arg!r} is not a literal ({ast.unparse(kw.value)[:60]!r})") from None
    if tool_names is not None and name not in tool_names:
        raise fail(f"no tool named {name!r} was declared (declared: {', '.join(sorted(tool_names))})")
    return name, params, block


# ----------------------------------------------------------------------------------------------------------------
# Generation plumbing: stopping criteria, the token streamer, the settings of one call
# ----------------------------------------------------------------------------------------------------------------


class _TextStopCriteria(StoppingCriteria):
    """Stops a row once its last `window` generated tokens decode to text containing `stop_text`.

    The eos ids catch every single token that contains "\\n\\n"; this catches the blank line written as two
    tokens ("\\n" then "\\n", or "x\\n" then "\\n"), which tokens cannot express.
    """

    def __init__(self, tokenizer: Any, prompt_length: int, stop_text: str = TURN_END, window: int = 2):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.stop_text = stop_text
        self.window = window

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = []
        for row in input_ids:
            tail = row[self.prompt_length :][-self.window :].tolist()
            done.append(bool(tail) and self.stop_text in self.tokenizer.decode(tail, skip_special_tokens=True))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _CancelCriteria(StoppingCriteria):
    """Stops every row once `event` is set (the consumer of a stream went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


_END = object()


class _TokenQueueStreamer(BaseStreamer):
    """Hands the generated token ids to another thread (``TextIteratorStreamer``'s queue, without its decoding)."""

    def __init__(self):
        self.queue: "queue.Queue[Any]" = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate's first put is the prompt
            self._prompt_seen = True
            return
        if value.dim() > 1 and value.shape[0] != 1:
            raise ValueError("chat streaming handles one sequence (batch size 1, no beam search)")
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(_END)


@dataclass
class _GenerationPlan:
    """Everything one chat/completion ``generate`` call needs, built by ``_chat_plan``."""

    input_ids: torch.LongTensor  # cached prefix ids (or filler) + the new ids
    new_ids: list[int]
    cache: Any  # a private clone of the caller's state, or None
    start_state: Any  # the caller's state itself (never written to)
    generation_config: GenerationConfig
    logits_processor: LogitsProcessorList
    stopping_criteria: StoppingCriteriaList
    model_kwargs: dict
    tokenizer: Any
    eos_ids: list[int]
    turn_end_ids: frozenset
    end_of_text_id: int
    turn_end_feed: list[int]  # the ids of "\n\n", fed when a reply ends without one
    stop_at_turn_end: bool
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class _GenerationResult:
    token_ids: list[int]  # generated ids, stop token included
    stop: str  # "turn_end", "eos" or "length" (token limit, or a caller's stopping criterion)
    cache_before_last: Any  # generate's state: prompt + every generated token but the last one
    full_ids: list[int]  # every id the state has seen, then the generated ones


# ----------------------------------------------------------------------------------------------------------------
# Text helpers
# ----------------------------------------------------------------------------------------------------------------


def _visible(text: str, cut_at_turn_end: bool) -> str:
    """The part of a decoded reply to show: up to the first blank line, stripped, never a partial character."""
    if cut_at_turn_end:
        text = text.split(TURN_END, 1)[0].strip()
    return text.rstrip("\ufffd")


# ----------------------------------------------------------------------------------------------------------------
# The mixin
# ----------------------------------------------------------------------------------------------------------------


class RwkvChatModelMixin:
    """``chat``, ``stream_chat`` and ``process_response`` for ``RwkvForCausalLM`` (see the module docstring)."""

    # -- ChatGLM3's API ------------------------------------------------------------------------------------------

    def chat(
        self,
        tokenizer,
        query: str,
        history: Optional[list] = None,
        role: str = "user",
        past_key_values=None,
        return_past_key_values: bool = False,
        init_state=None,
        **gen_kwargs,
    ):
        """One chat turn: ``(response, history)``, or ``(response, history, past_key_values)``.

        ``response`` is the stripped reply, or ``{"name": ..., "parameters": {...}}`` for a tool call (see
        ``process_response``); ``history`` is a new list: the old one plus the query and the reply. With
        ``past_key_values`` (a state returned by an earlier turn) only the new turn is encoded and ``history`` is
        used for the returned history and the tool list only. ``init_state`` names a mounted initial state to
        start a fresh conversation from. ``gen_kwargs`` go to ``generate`` (see the module docstring).
        The same seed gives the same reply as ``stream_chat``.
        """
        result = None
        for result in self.stream_chat(
            tokenizer,
            query,
            history,
            role,
            past_key_values=past_key_values,
            return_past_key_values=return_past_key_values,
            init_state=init_state,
            _stream=False,
            **gen_kwargs,
        ):
            pass
        return result

    def stream_chat(
        self,
        tokenizer,
        query: str,
        history: Optional[list] = None,
        role: str = "user",
        past_key_values=None,
        return_past_key_values: bool = False,
        init_state=None,
        timeout: Optional[float] = DEFAULT_STREAM_TIMEOUT,
        _stream: bool = True,
        **gen_kwargs,
    ) -> Iterator[tuple]:
        """Yield ``(response, history)`` (or ``(response, history, past_key_values)``) as the reply grows.

        Each ``response`` extends the previous one (stripped, cut at the blank line that ends the reply, never
        ending in a partial UTF-8 character); the last yield is the final reply after ``process_response`` (a
        dict for a tool call). ``past_key_values`` is None on every yield but the last, which carries a frozen
        state holding the whole conversation up to the closing ``"\\n\\n"``: pass it to the next turn.
        ``timeout``: seconds to wait for each token before raising ``TimeoutError``. Errors in ``generate`` are
        raised here. Breaking out of the loop stops the generation.
        """
        _check_tokenizer(tokenizer)
        query = _check_query(query)
        role = _check_role(role)
        history = _check_history(history)
        if past_key_values is not None:
            _check_cache(past_key_values)
            if past_key_values.get_seq_length() == 0:
                past_key_values = None
        if past_key_values is None:
            inputs = tokenizer.build_chat_input(query, history=history, role=role)
        else:  # the state already holds the history, up to and including its closing "\n\n"
            inputs = tokenizer.build_chat_input(query, role=role)
        new_ids = inputs["input_ids"][0].tolist()
        turn_history = history + [{"role": role, "content": query}]

        plan = self._chat_plan(
            tokenizer, new_ids, past_key_values, gen_kwargs, chat_rules=True, stop_at_turn_end=True,
            init_state=init_state,
        )
        shown = ""
        result = None
        events = self._chat_run(tokenizer, plan, timeout=timeout, stream=_stream)
        try:
            for event in events:
                if isinstance(event, _GenerationResult):
                    result = event
                    break
                text = _visible(event, cut_at_turn_end=True)
                if text and text != shown:
                    shown = text
                    partial = turn_history + [{"role": "assistant", "metadata": "", "content": text}]
                    yield (text, partial, None) if return_past_key_values else (text, partial)
        finally:
            events.close()  # stops the generate thread when the caller leaves early

        text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
        response, new_history = self.process_response(text.split(TURN_END, 1)[0], turn_history)
        if return_past_key_values:
            state = self._chat_close_turn(plan, result)
            yield response, new_history, state
        else:
            yield response, new_history

    def process_response(self, output: str, history: Optional[list]):
        """ChatGLM3's ``process_response``: ``(content, history + [assistant turn])``.

        A plain reply gives its stripped text and ``{"role": "assistant", "metadata": "", "content": text}``.
        When ``history[0]`` is a ``system`` message with ``tools`` and the reply is a tool call
        (``name\\n```python\\ntool_call(k=v, ...)\\n```\\ ``), the content is ``{"name": name, "parameters": {k: v}}``
        and the turn is ``{"role": "assistant", "metadata": name, "content": code_block}``. The call is parsed with
        ``ast`` and never executed; a reply of that shape that is not a valid call raises ``RwkvToolCallError``.
        """
        if not isinstance(output, str):
            raise TypeError(f"output must be the decoded reply (a str), got {_type_name(output)}")
        history = _check_history(history)
        text = output.strip()
        first = history[0] if history else None
        if first is not None and first["role"] == "system" and first.get("tools") is not None:
            call = parse_tool_call(text, _tool_names(first["tools"]))
            if call is not None:
                name, params, block = call
                history.append({"role": "assistant", "metadata": name, "content": block})
                return {"name": name, "parameters": params}, history
        history.append({"role": "assistant", "metadata": "", "content": text})
        return text, history

    # -- the engine (also used by ``rwkv-hf chat`` for free generation) -------------------------------------------

    def _chat_plan(
        self,
        tokenizer,
        new_ids: list[int],
        past_key_values,
        gen_kwargs: dict,
        *,
        chat_rules: bool,
        stop_at_turn_end: bool,
        init_state=None,
        extra_processors=None,
    ) -> _GenerationPlan:
        """Settings, processors, stopping rules and inputs for one ``generate`` call continuing ``past_key_values``."""
        if not new_ids:
            raise ValueError("nothing to generate from: the new input has no tokens")
        gen_kwargs = dict(gen_kwargs)
        preset = gen_kwargs.pop("preset", None)
        base = gen_kwargs.pop("generation_config", None)
        if base is not None and preset is not None:
            raise ValueError("pass either preset= or generation_config=, not both")
        if base is None:
            base = load_generation_preset(preset or DEFAULT_CHAT_PRESET)
        elif not isinstance(base, GenerationConfig):
            raise TypeError(f"generation_config must be a GenerationConfig, got {_type_name(base)}")
        config = copy.deepcopy(base)
        rwkv_kwargs = {k: gen_kwargs.pop(k) for k in _RWKV_PROCESSOR_KWARGS if k in gen_kwargs}
        user_processors = gen_kwargs.pop("logits_processor", None)
        user_stops = gen_kwargs.pop("stopping_criteria", None)
        user_eos = gen_kwargs.pop("eos_token_id", None)
        for forced in ("return_dict_in_generate", "use_cache", "streamer"):
            if forced in gen_kwargs:
                raise ValueError(f"{forced} is set by chat itself; do not pass it")
        # ChatGLM3 code bounds the whole sequence with max_length; turned into max_new_tokens below, because a
        # model's generation_config.json max_new_tokens would otherwise take precedence over it
        max_length = gen_kwargs.pop("max_length", None) if "max_new_tokens" not in gen_kwargs else None
        model_kwargs = config.update(**gen_kwargs)  # what is not a GenerationConfig field goes to the model
        if config.do_sample is False:  # greedy: sampling values would only draw "not valid" warnings
            config.update(**_SAMPLING_DEFAULTS)
        config.return_dict_in_generate = True
        config.use_cache = True
        config.num_return_sequences = 1

        config, processors = prepare_rwkv_generation(tokenizer, config, chat=chat_rules, **rwkv_kwargs)
        if not processors or not isinstance(processors[0], RwkvInvalidScoreLogitsProcessor):  # pragma: no cover
            processors.insert(0, RwkvInvalidScoreLogitsProcessor(tokenizer.turn_end_id))
        extra = list(extra_processors or []) + list(user_processors or [])
        at = next((i for i, p in enumerate(processors) if isinstance(p, RwkvSamplingWarper)), len(processors))
        processors = LogitsProcessorList(list(processors[:at]) + extra + list(processors[at:]))

        end_of_text = getattr(tokenizer, "eos_token_id", None)
        end_of_text = 0 if end_of_text is None else int(end_of_text)
        turn_end_ids = list(tokenizer.turn_end_ids) if stop_at_turn_end else []
        eos_ids = turn_end_ids + [end_of_text]
        if user_eos is not None:
            eos_ids += [user_eos] if isinstance(user_eos, int) else list(user_eos)
        eos_ids = list(dict.fromkeys(int(i) for i in eos_ids))
        config.eos_token_id = eos_ids
        if config.pad_token_id is None:
            pad = getattr(tokenizer, "pad_token_id", None)
            config.pad_token_id = end_of_text if pad is None else pad

        cache = None
        prefix: list[int] = []
        if past_key_values is not None:
            cache = past_key_values.clone()  # never write into the caller's state
            seen = cache.get_seq_length()
            known = getattr(past_key_values, "_chat_token_ids", None)
            # generate skips the first get_seq_length() ids; processors see them, so give the real ones if known
            prefix = list(known) if known is not None and len(known) == seen else [0] * seen
        input_ids = torch.tensor([prefix + list(new_ids)], dtype=torch.long, device=self.device)
        if max_length is not None:
            if int(max_length) <= input_ids.shape[1]:
                raise ValueError(
                    f"max_length={max_length} leaves no room for a reply: the conversation is already "
                    f"{input_ids.shape[1]} tokens (use max_new_tokens to bound the reply alone)"
                )
            config.max_new_tokens = int(max_length) - input_ids.shape[1]
        model_kwargs["attention_mask"] = torch.ones_like(input_ids)
        if init_state is not None:
            model_kwargs["init_state"] = init_state

        cancel = threading.Event()
        stops = StoppingCriteriaList([_CancelCriteria(cancel)])
        if stop_at_turn_end:
            stops.append(_TextStopCriteria(tokenizer, input_ids.shape[1]))
        stops.extend(user_stops or [])
        turn_end_feed = tokenizer(TURN_END, add_special_tokens=False)["input_ids"]
        return _GenerationPlan(
            input_ids=input_ids,
            new_ids=list(new_ids),
            cache=cache,
            start_state=past_key_values,
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=stops,
            model_kwargs=model_kwargs,
            tokenizer=tokenizer,
            eos_ids=eos_ids,
            turn_end_ids=frozenset(turn_end_ids),
            end_of_text_id=end_of_text,
            turn_end_feed=list(turn_end_feed),
            stop_at_turn_end=stop_at_turn_end,
            cancel=cancel,
        )

    def _chat_run(self, tokenizer, plan: _GenerationPlan, *, timeout: Optional[float] = DEFAULT_STREAM_TIMEOUT,
                  stream: bool = True):
        """Run ``generate`` for ``plan``. Yields the decoded text so far (when streaming), then a ``_GenerationResult``."""
        kwargs = dict(
            input_ids=plan.input_ids,
            **cache_kwargs(plan.cache),
            generation_config=plan.generation_config,
            logits_processor=plan.logits_processor,
            stopping_criteria=plan.stopping_criteria,
            **plan.model_kwargs,
        )
        if not stream:
            output = self.generate(**kwargs)
            yield self._chat_result(plan, output)
            return

        streamer = _TokenQueueStreamer()
        box: dict = {}

        def work():
            try:
                box["output"] = self.generate(streamer=streamer, **kwargs)
            except BaseException as err:  # re-raised in the caller's thread
                box["error"] = err
            finally:
                streamer.end()

        thread = threading.Thread(target=work, name="rwkv-chat-generate", daemon=True)
        thread.start()
        generated: list[int] = []
        try:
            while True:
                try:
                    item = streamer.queue.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(
                        f"generate produced no token for {timeout} s (pass a larger timeout= for a slow model)"
                    ) from None
                if item is _END:
                    break
                generated.extend(item)
                yield tokenizer.decode(generated, skip_special_tokens=True)
            thread.join()
            if "error" in box:
                raise box["error"]
            yield self._chat_result(plan, box["output"])
        finally:
            if thread.is_alive():  # the caller stopped early or an error happened: stop generating
                plan.cancel.set()
                # generate checks the cancel flag after every token: wait for that rather than leave a thread
                # inside torch, which aborts the interpreter (SIGABRT) if it is still running at exit
                thread.join()

    def _chat_result(self, plan: _GenerationPlan, output) -> _GenerationResult:
        sequences = output.sequences if hasattr(output, "sequences") else output
        start = plan.input_ids.shape[1]
        token_ids = sequences[0, start:].tolist()
        last = token_ids[-1] if token_ids else None
        if plan.stop_at_turn_end and token_ids and (
            last in plan.turn_end_ids
            or TURN_END in plan.tokenizer.decode(token_ids[-2:], skip_special_tokens=True)
        ):
            stop = "turn_end"
        elif last is not None and last == plan.end_of_text_id:
            stop = "eos"
        else:
            stop = "length"
        cache = model_output_cache(output)
        return _GenerationResult(token_ids, stop, cache, plan.input_ids[0].tolist() + token_ids)

    @torch.no_grad()
    def _chat_close_turn(self, plan: _GenerationPlan, result: _GenerationResult):
        """Feed what ``generate`` left unfed so the state holds the text up to the closing "\\n\\n"; freeze it.

        ``generate`` returns the state after the prompt and every generated token but the last. The last token is
        fed when it is the stop token or text (a reply cut by the token limit); an end-of-text token is not (it is
        no part of the conversation text). A reply that did not end with a blank line gets one fed.
        """
        cache = result.cache_before_last
        if cache is None:  # pragma: no cover - generate returns the cache with return_dict_in_generate
            raise RuntimeError("generate returned no state")
        feed: list[int] = []
        if result.token_ids and result.stop != "eos":
            feed.append(result.token_ids[-1])
        if result.stop != "turn_end":
            feed += plan.turn_end_feed
        ids = result.full_ids[:-1] + feed
        start = {}
        if getattr(cache, "batch_size", 1) != 1:
            # beam search: the state rows follow the beams; run the turn again from the state it started from
            feed = plan.new_ids + result.token_ids[:-1] + feed
            cache = plan.start_state.clone() if plan.start_state is not None else None
            if cache is None and "init_state" in plan.model_kwargs:
                start["init_state"] = plan.model_kwargs["init_state"]
        if feed:
            cache = model_output_cache(
                self(input_ids=torch.tensor([feed], dtype=torch.long, device=self.device), cache=cache, use_cache=True, **start)
            )
        if len(ids) == cache.get_seq_length():
            cache._chat_token_ids = ids  # carried by clone(); the next turn shows them to the logits processors
        return cache.freeze()
