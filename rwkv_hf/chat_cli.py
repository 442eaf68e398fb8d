"""``rwkv-hf chat MODEL_DIR``: an interactive streaming chat in the terminal, with ChatRWKV's commands.

The conversation state is kept between turns (``stream_chat(..., past_key_values=state,
return_past_key_values=True)``), so each turn feeds only its own tokens and the history is never re-read.
Saved states are frozen snapshots, which is what makes ``+`` (regenerate), ``++`` and ``+++`` cheap.

Commands follow ChatRWKV ``v2/chat.py`` (type ``+help``):

* plain text: a chat turn; ``+``: regenerate the last reply from the state saved before it; ``+reset``: new chat.
* ``+gen TEXT`` / ``+i TEXT`` / ``+qq TEXT``: free generation from a fresh state (``"\\n" + TEXT``, the Alpaca
  instruction prompt, ``"\\nQ: TEXT\\nA:"``); ``+qa TEXT``: one chat turn from the start state, generated freely with
  the ``"\\n"`` logit lowered by 2 (as ChatRWKV does).
* ``++``: retry the last free generation; ``+++``: continue the last free generation (ChatRWKV), or, when the last
  thing written was a chat reply, continue that reply (useful when it hit ``--max-new-tokens``).
* ``-temp=X`` / ``-top_p=Y`` anywhere in a message: sampling for that message only (clamped like ChatRWKV:
  temperature 0.2..5, top_p 0..1). ``\\n`` typed as two characters is a line break.

Ctrl-D or Ctrl-C at the prompt quits (exit status 0, no traceback); Ctrl-C while text is being written stops it
and drops that turn. Input is read from stdin and output written to stdout, so the chat also runs in a pipe.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

FREE_GEN_LEN = 256  # ChatRWKV's free generation length
TEMP_RANGE = (0.2, 5.0)  # ChatRWKV clamps -temp= to this range
QA_NEWLINE_BIAS = -2.0  # ChatRWKV's +qa: run_rnn([token], newline_adj=-2)

INSTRUCTION_TEMPLATE = (
    "\nBelow is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n# Instruction:\n{msg}\n\n# Response:\n"
)

HELP = """\
Commands (ChatRWKV's):
  TEXT           chat: the reply streams as it is written
  +              regenerate the last reply (from the state saved before it)
  +reset         start a new conversation
  +gen TEXT      free generation: continue TEXT, from a fresh state
  +i TEXT        instruction (Alpaca prompt "# Instruction: ... # Response:"), fresh state
  +qq TEXT       question, as "Q: TEXT / A:", fresh state
  +qa TEXT       one chat turn "User: TEXT / Assistant:" from the start state, generated freely
  ++             retry the last free generation
  +++            continue the last free generation, or the last reply
  +help          this help
  -temp=X -top_p=Y   anywhere in a message: sampling for this message only (temp 0.2..5, top_p 0..1)
  \\n             (backslash n) a line break inside a message
Ctrl-D or Ctrl-C at the prompt quits; Ctrl-C while text is written stops it (that turn is dropped)."""

_COMMAND = re.compile(r"\A\+(?:[a-z]*|\+\+?)\Z")
_WITH_TEXT = ("+gen", "+i", "+qq", "+qa")
_ALONE = ("+", "+reset", "++", "+++", "+help")


def add_chat_parser(sub):
    chat = sub.add_parser(
        "chat",
        help="interactive streaming chat with a converted model",
        description="Chat with a converted RWKV folder in the terminal (ChatRWKV's commands; type +help).",
    )
    chat.add_argument("model_dir", help="a folder written by `rwkv-hf convert` (config, weights, tokenizer)")
    chat.add_argument("--preset", default="chat", help="generation preset (default: chat = ChatRWKV's settings)")
    chat.add_argument(
        "--init-state",
        default=None,
        metavar="PATH_OR_NAME",
        help="start the conversation from a tuned initial state: a .pth/.state/.safetensors file, or the name of "
        "a state mounted with the model",
    )
    chat.add_argument("--max-new-tokens", type=int, default=None, help="limit for each reply / free generation")
    chat.add_argument("--system", default=None, help="a system message at the start of the conversation")
    chat.add_argument("--seed", type=int, default=None, help="seed torch's random generator (reproducible replies)")
    chat.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    chat.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    chat.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each token (default 600)")
    chat.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow Python code from the model folder to run (off by default: the installed rwkv_hf classes are used)",
    )


def main_chat(args) -> int:
    try:
        session = _load(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except _CliError as err:
        print(f"rwkv-hf chat: error: {err}", file=sys.stderr)
        return 2
    return session.loop()


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


class _CliError(Exception):
    pass


def _load(args) -> "_ChatSession":
    if not os.path.isdir(args.model_dir):  # before the slow imports
        raise _CliError(f"{args.model_dir} is not a folder (expected one written by `rwkv-hf convert`)")
    import torch

    import rwkv_hf  # noqa: F401  (registers the local classes with the Auto* factories)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .logits_process_rwkv_hf import list_generation_presets

    if args.preset not in list_generation_presets():
        raise _CliError(f"unknown preset {args.preset!r}; expected one of {', '.join(list_generation_presets())}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise _CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    dtypes = {None: None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if args.dtype not in dtypes:
        raise _CliError(f"unknown --dtype {args.dtype!r}; expected float32, bfloat16 or float16")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise _CliError(f"unknown --device {args.device!r} ({err}); expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _CliError(f"--device {args.device} was asked for, but this torch has no CUDA device; use --device cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        # Never ask on stdin whether to run the folder's code: the chat's first line would be the answer.
        trust = dict(trust_remote_code=bool(args.trust_remote_code))
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir, **trust)
        kwargs = {"dtype": dtypes[args.dtype]} if args.dtype else {}
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kwargs, **trust).to(device).eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise _CliError(f"cannot load {args.model_dir}: {err}") from None
    if not hasattr(model, "stream_chat") or not hasattr(tokenizer, "build_chat_input"):
        raise _CliError(f"{args.model_dir} is not an rwkv_hf model with an rwkv_hf tokenizer")
    init_state = _mount_init_state(model, args.init_state) if args.init_state else None
    if args.seed is not None:
        torch.manual_seed(args.seed)
    return _ChatSession(model, tokenizer, args, init_state)


def _mount_init_state(model, source: str) -> str:
    """Mount a state file under a name of its own, or check that `source` names a mounted state."""
    try:
        from .state_rwkv_hf import list_init_states, load_init_state
    except ImportError as err:  # pragma: no cover - the module ships with the package
        raise _CliError(f"initial states are not supported by this installation ({err})") from None
    if os.path.isfile(source):
        try:
            return load_init_state(model, source, name="rwkv-hf-chat", default=False)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise _CliError(f"cannot load the initial state {source}: {err}") from None
    mounted = list_init_states(model)
    if source not in mounted:
        raise _CliError(
            f"--init-state {source!r} is neither a file nor a mounted state; mounted: {', '.join(mounted) or 'none'}"
        )
    return source


# ----------------------------------------------------------------------------------------------------------------
# The session
# ----------------------------------------------------------------------------------------------------------------


def _parse_overrides(msg: str) -> tuple[str, dict]:
    """Take ChatRWKV's inline ``-temp=X`` / ``-top_p=Y`` out of a message: (message, generate overrides)."""
    overrides: dict = {}
    for flag, key in (("-temp=", "temperature"), ("-top_p=", "top_p")):
        pattern = re.compile(r"(?:\A|\s+)" + re.escape(flag) + r"(\S*)")
        match = pattern.search(msg)
        if match is None:
            continue
        try:
            value = float(match.group(1))
        except ValueError:
            raise _CliError(f"{flag}{match.group(1)}: {flag} takes a number, e.g. {flag}0.8") from None
        if value != value:
            raise _CliError(f"{flag}: not a number")
        if key == "temperature":
            value = min(max(value, TEMP_RANGE[0]), TEMP_RANGE[1])
        else:
            value = min(max(value, 0.0), 1.0)
        overrides[key] = value
        msg = pattern.sub("", msg)
    return msg.strip(), overrides


@dataclass
class _ChatTurn:
    """What ``+`` and ``+++`` need to redo or extend the last chat reply."""

    history: list  # before the query
    state: Any  # frozen state before the query (None: encode the history)
    query: str
    reply: str = ""


@dataclass
class _FreeGen:
    """What ``++`` (retry) and ``+++`` (continue) need for free generation."""

    start_state: Any  # frozen state before the prompt, None for a fresh one
    prompt_ids: list
    chat_rules: bool = False
    newline_bias: float = 0.0
    init_state: Any = None
    # after the last run: generate's state (all but the last token) and the token still to feed
    end_state: Any = None
    pending: list = field(default_factory=list)


class _ChatSession:
    def __init__(self, model, tokenizer, args, init_state):
        self.model = model
        self.tokenizer = tokenizer
        self.args = args
        self.init_state = init_state
        self.start_history = [{"role": "system", "content": args.system}] if args.system else []
        self.out = sys.stdout
        self.mid_line = False
        self.reset()

    def reset(self):
        self.history = list(self.start_history)
        self.state = None
        self.last_turn: Optional[_ChatTurn] = None
        self.free: Optional[_FreeGen] = None
        self.last_kind: Optional[str] = None  # "chat" or "gen": what +++ continues

    # -- terminal ----------------------------------------------------------------------------------------------

    def write(self, text: str):
        if text:
            self.out.write(text)
            self.out.flush()
            self.mid_line = not text.endswith("\n")

    def report(self, text: str):
        """A message on a line of its own (the reply being written may have stopped mid-line)."""
        self.write(("\n" if self.mid_line else "") + text + "\n\n")

    def loop(self) -> int:
        name = os.path.basename(os.path.normpath(self.args.model_dir))
        self.write(f"rwkv-hf chat: {name} ready. Type +help for commands, Ctrl-D to quit.\n\n")
        while True:
            try:
                line = input("User: ")
            except EOFError:
                self.write("\n")
                return 0
            except KeyboardInterrupt:
                self.write("\n")
                return 0
            try:
                self.handle(line)
            except KeyboardInterrupt:
                self.report("[stopped]")
            except _CliError as err:
                self.report(f"error: {err}")
            except Exception as err:  # a REPL reports and goes on; the conversation state is unchanged
                self.report(f"error: {type(err).__name__}: {err}")

    # -- dispatch ----------------------------------------------------------------------------------------------

    def gen_kwargs(self, overrides: dict, free: bool) -> dict:
        kwargs = {"preset": self.args.preset}
        if self.args.max_new_tokens is not None:
            kwargs["max_new_tokens"] = self.args.max_new_tokens
        elif free:
            kwargs["max_new_tokens"] = FREE_GEN_LEN
        kwargs.update(overrides)
        return kwargs

    def handle(self, line: str):
        msg, overrides = _parse_overrides(line.replace("\\n", "\n").strip())
        if not msg:
            return
        head, rest = re.match(r"(\S+)\s*(.*)", msg, re.S).groups()
        command = head.lower()
        if not _COMMAND.match(command):
            return self.chat(msg, overrides)
        if command not in _WITH_TEXT and command not in _ALONE:
            raise _CliError(f"unknown command {head}; type +help for the list")
        rest = rest.strip()
        if command in _ALONE and rest:
            raise _CliError(f"{command} takes no text (did you mean a chat message? don't start it with +)")
        if command in _WITH_TEXT and not rest:
            raise _CliError(f"{command} needs some text, e.g. {command} hello")
        if command == "+help":
            self.write(HELP + "\n\n")
        elif command == "+reset":
            self.reset()
            self.write("Chat reset.\n\n")
        elif command == "+":
            self.regenerate(overrides)
        elif command == "+gen":
            self.free_gen(self.encode("\n" + rest), None, overrides)
        elif command == "+i":
            text = re.sub(r"\n+", "\n", rest.replace("\r\n", "\n"))
            self.free_gen(self.encode(INSTRUCTION_TEMPLATE.format(msg=text)), None, overrides)
        elif command == "+qq":
            self.free_gen(self.encode("\nQ: " + rest + "\nA:"), None, overrides)
        elif command == "+qa":
            prompt = self.tokenizer.build_chat_prompt(rest, self.start_history)
            self.free_gen(self.encode(prompt), None, overrides, chat_rules=False, newline_bias=QA_NEWLINE_BIAS,
                          init_state=self.init_state)
        elif command == "++":
            if self.free is None:
                raise _CliError("++ retries a free generation (+gen, +i, +qq, +qa); there is none yet")
            f = self.free
            self.free_gen(f.prompt_ids, f.start_state, overrides, chat_rules=f.chat_rules,
                          newline_bias=f.newline_bias, init_state=f.init_state)
        elif command == "+++":
            self.continue_last(overrides)

    def encode(self, text: str) -> list:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- chat turns --------------------------------------------------------------------------------------------

    def chat(self, msg: str, overrides: dict, turn: Optional[_ChatTurn] = None):
        turn = turn or _ChatTurn(list(self.history), self.state, msg)
        stream = self.model.stream_chat(
            self.tokenizer,
            turn.query,
            turn.history,
            past_key_values=turn.state,
            return_past_key_values=True,
            init_state=self.init_state if turn.state is None else None,
            timeout=self.args.timeout,
            **self.gen_kwargs(overrides, free=False),
        )
        response, history, state = self.show_reply(stream)
        turn.reply = response if isinstance(response, str) else history[-1]["content"]
        self.history, self.state, self.last_turn, self.last_kind = history, state, turn, "chat"

    def show_reply(self, stream, already: str = ""):
        self.write("Assistant: " + already)
        shown, last = "", None
        for last in stream:
            response = last[0]
            if isinstance(response, str):
                if response.startswith(shown):
                    self.write(response[len(shown) :])
                else:  # not expected: the reply is always extended; show it whole rather than garbled
                    self.write("\n" + response)
                shown = response
        response = last[0]
        if not isinstance(response, str):  # a parsed tool call
            self.write("\n" + json.dumps(response, ensure_ascii=False))
        self.write("\n\n")
        return last

    def regenerate(self, overrides: dict):
        if self.last_turn is None:
            raise _CliError("+ regenerates the last reply; there is none yet")
        t = self.last_turn
        self.chat(t.query, overrides, _ChatTurn(t.history, t.state, t.query))

    def continue_last(self, overrides: dict):
        if self.last_kind == "gen" and self.free is not None and self.free.end_state is not None:
            f = self.free
            self.free_gen(f.pending, f.end_state, overrides, chat_rules=f.chat_rules, newline_bias=f.newline_bias,
                          retry=False)
        elif self.last_kind == "chat" and self.last_turn is not None:
            self.continue_reply(overrides)
        else:
            raise _CliError("+++ continues the last free generation or reply; there is none yet")

    def continue_reply(self, overrides: dict):
        """Re-feed the last turn with the reply so far (no closing blank line) and let the model go on."""
        t = self.last_turn
        prompt = self.tokenizer.build_chat_prompt(t.query, None if t.state is not None else t.history)
        reply = t.reply
        ids = self.encode(prompt + " " + reply)
        model = self.model
        plan = model._chat_plan(
            self.tokenizer, ids, t.state, self.gen_kwargs(overrides, free=False), chat_rules=True,
            stop_at_turn_end=True, init_state=self.init_state if t.state is None else None,
        )
        self.write("Assistant: " + reply)
        shown, result = "", None
        for event in model._chat_run(self.tokenizer, plan, timeout=self.args.timeout):
            if not isinstance(event, str):
                result = event
                break
            text = event.split("\n\n", 1)[0].rstrip().rstrip("\ufffd")
            if text.startswith(shown) and len(text) > len(shown):
                self.write(text[len(shown) :])
                shown = text
        more = self.tokenizer.decode(result.token_ids, skip_special_tokens=True).split("\n\n", 1)[0]
        response, history = model.process_response(reply + more, t.history + [{"role": "user", "content": t.query}])
        if not isinstance(response, str):
            self.write("\n" + json.dumps(response, ensure_ascii=False))
        self.write("\n\n")
        t.reply = response if isinstance(response, str) else history[-1]["content"]
        self.history, self.state = history, model._chat_close_turn(plan, result)
        self.last_kind = "chat"

    # -- free generation ---------------------------------------------------------------------------------------

    def free_gen(self, ids, start_state, overrides, *, chat_rules=False, newline_bias=0.0, init_state=None,
                 retry=True):
        model = self.model
        extra = [_newline_bias_processor(self.tokenizer, newline_bias)] if newline_bias else None
        plan = model._chat_plan(
            self.tokenizer, list(ids), start_state, self.gen_kwargs(overrides, free=True), chat_rules=chat_rules,
            stop_at_turn_end=False, init_state=init_state if start_state is None else None, extra_processors=extra,
        )
        shown, result = "", None
        for event in model._chat_run(self.tokenizer, plan, timeout=self.args.timeout):
            if not isinstance(event, str):
                result = event
                break
            text = event.rstrip("\ufffd")
            if text.startswith(shown) and len(text) > len(shown):
                self.write(text[len(shown) :])
                shown = text
        text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        if text.startswith(shown):
            self.write(text[len(shown) :])
        self.write("\n\n")
        if retry:  # a new free generation: ++ retries it from the same start
            self.free = _FreeGen(start_state, list(ids), chat_rules, newline_bias, init_state)
        self.free.end_state = result.cache_before_last.freeze() if result.cache_before_last is not None else None
        self.free.pending = result.token_ids[-1:]
        self.last_kind = "gen"


def _newline_bias_processor(tokenizer, bias: float):
    """A processor adding `bias` to the "\\n" logit (ChatRWKV's ``+qa``: ``newline_adj=-2`` on every token)."""
    from transformers import LogitsProcessor

    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    token_id = ids[0] if len(ids) == 1 else None

    class NewlineBias(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if token_id is None or token_id >= scores.shape[-1]:
                return scores
            scores = scores.clone()
            scores[:, token_id] += bias
            return scores

    return NewlineBias()
