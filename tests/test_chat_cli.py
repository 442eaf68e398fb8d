"""``rwkv-hf chat``: the command parsing and state handling in-process, then the real program in a pseudo-terminal.

The pty tests start ``python -m rwkv_hf.cli chat FOLDER`` on a tiny converted World model and type into it like a
user: every ChatRWKV command once, inline ``-temp=`` / ``-top_p=``, Ctrl-C during a reply, and Ctrl-D / Ctrl-C at
the prompt (exit status 0, no traceback). The two programs start together so their (slow) imports overlap.
"""

from __future__ import annotations

import io
import os
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import rwkv_hf
from model_factory import tiny_world_folder
from rwkv_hf.chat_cli import _ChatSession, _CliError, _parse_overrides, main_chat
from rwkv_hf.cli import build_parser

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_world_folder(tmp_path_factory.mktemp("chat_cli"), seed=4)


@pytest.fixture(scope="module")
def loaded(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.turn_end_ids  # noqa: B018
    return AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer


def make_session(folder, loaded, *extra):
    model, tokenizer = loaded
    args = build_parser().parse_args(["chat", str(folder), "--max-new-tokens", "4", *extra])
    session = _ChatSession(model, tokenizer, args, None)
    session.out = io.StringIO()
    return session


def said(session) -> str:
    text = session.out.getvalue()
    session.out.seek(0)
    session.out.truncate()
    return text


# --- in-process ----------------------------------------------------------------------------------------------


def test_inline_sampling_overrides_are_parsed_and_clamped():
    assert _parse_overrides("hello -temp=0.7 there -top_p=0.3") == ("hello there", {"temperature": 0.7, "top_p": 0.3})
    assert _parse_overrides("-temp=0.01 hi -top_p=-1") == ("hi", {"temperature": 0.2, "top_p": 0.0})
    assert _parse_overrides("hi -temp=9 -top_p=3") == ("hi", {"temperature": 5.0, "top_p": 1.0})
    assert _parse_overrides("x-temp=3 stays") == ("x-temp=3 stays", {})
    with pytest.raises(_CliError, match="-temp= takes a number"):
        _parse_overrides("hi -temp=hot")


def test_chat_turns_keep_the_state_and_never_reencode_the_history(folder, loaded, monkeypatch):
    session = make_session(folder, loaded, "--system", "You are terse.")
    tokenizer = session.tokenizer
    calls = []
    original = type(tokenizer).build_chat_input

    def spy(self, query, history=None, role="user", **kw):
        calls.append(history)
        return original(self, query, history=history, role=role, **kw)

    monkeypatch.setattr(type(tokenizer), "build_chat_input", spy)
    session.handle("Hello there")
    first_state, first_history = session.state, session.history
    assert said(session).startswith("Assistant: ")
    assert [h["role"] for h in first_history] == ["system", "user", "assistant"]
    assert first_state.frozen and first_state._chat_token_ids[-1] == tokenizer.turn_end_id

    session.handle("And now? -temp=0.5")
    assert calls[0] == [{"role": "system", "content": "You are terse."}]  # turn 1 encodes the system message
    assert calls[1] is None  # turn 2 encodes only itself: the history is in the state
    assert session.history[-2] == {"role": "user", "content": "And now?"}
    assert session.state._chat_token_ids[: len(first_state._chat_token_ids)] == first_state._chat_token_ids

    # "+" regenerates the last reply from the state saved before it
    before = session.last_turn
    session.handle("+")
    assert said(session).count("Assistant: ") == 2
    assert session.last_turn.state is before.state is first_state
    assert len(session.history) == 5 and session.history[:3] == first_history

    # "+++" after a reply continues that reply
    reply = session.history[-1]["content"]
    session.handle("+++")
    assert session.history[-1]["content"].startswith(reply) and len(session.history) == 5

    session.handle("+reset")
    assert "Chat reset." in said(session)
    assert session.state is None and session.history == [{"role": "system", "content": "You are terse."}]


def test_free_generation_commands(folder, loaded):
    session = make_session(folder, loaded)
    torch.manual_seed(0)
    session.handle("+gen Once upon a time")
    first = said(session)
    assert first.strip() and "Assistant:" not in first
    free = session.free
    prompt_len = len(free.prompt_ids)
    assert free.start_state is None and free.end_state.get_seq_length() == prompt_len + 4 - 1
    session.handle("++")  # retry: same start, same prompt
    assert session.free is not free and session.free.prompt_ids == free.prompt_ids
    end = session.free.end_state
    session.handle("+++")  # continue: from the end of the last one
    assert session.free.end_state.get_seq_length() == end.get_seq_length() + 4
    assert session.free.prompt_ids == free.prompt_ids
    for command, fragment in (("+i Summarise RWKV", "# Instruction:\nSummarise RWKV"), ("+qq What is RWKV?", "Q: What is RWKV?\nA:"),
                              ("+qa Who are you?", "User: Who are you?\n\nAssistant:")):
        session.handle(command)
        assert fragment in session.tokenizer.decode(session.free.prompt_ids)
    assert session.history == [] and session.state is None  # free generation leaves the chat alone
    said(session)


def test_command_errors_are_reported_and_the_session_goes_on(folder, loaded):
    session = make_session(folder, loaded)
    for line, message in (("+", "there is none yet"), ("++", "there is none yet"), ("+++", "there is none yet"),
                          ("+bogus", r"unknown command \+bogus"), ("+gen", "needs some text"),
                          ("+reset now", "takes no text"), ("hi -temp=x", "takes a number")):
        with pytest.raises(_CliError, match=message):
            session.handle(line)
    session.handle("+1 is a chat message, not a command")
    assert said(session).startswith("Assistant: ")
    session.handle("+help")
    assert "+gen TEXT" in said(session)


def test_a_bad_model_folder_exits_with_status_2(tmp_path, capsys):
    args = build_parser().parse_args(["chat", str(tmp_path / "missing")])
    assert main_chat(args) == 2
    assert "is not a folder" in capsys.readouterr().err
    args = build_parser().parse_args(["chat", str(tmp_path), "--preset", "nope"])
    assert main_chat(args) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_init_state_file_or_name(folder, tmp_path, capsys):
    from rwkv_hf.chat_cli import _load

    path = tmp_path / "tuned.pth"
    torch.save({"blocks.0.att.time_state": torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))}, path)
    states = []
    for extra in ([], ["--init-state", str(path)]):
        session = _load(build_parser().parse_args(["chat", str(folder), "--max-new-tokens", "2", "--seed", "0", *extra]))
        session.out = io.StringIO()
        session.handle("Hello")
        states.append(session.state)
    assert session.init_state == "rwkv-hf-chat"  # mounted under its own name, used for the chat only
    assert states[0]._chat_token_ids[:5] == states[1]._chat_token_ids[:5]
    assert not torch.equal(states[0].wkv_state(0), states[1].wkv_state(0))  # the conversation started from it

    args = build_parser().parse_args(["chat", str(folder), "--init-state", "nope"])
    assert main_chat(args) == 2
    assert "'nope' is neither a file nor a mounted state" in capsys.readouterr().err


# --- in a pseudo-terminal --------------------------------------------------------------------------------------


class Terminal:
    """A child process on a pty: ``expect`` a regex in its output, ``line`` types a line, ``key`` a control key."""

    def __init__(self, argv, env):
        import pty

        pid, fd = pty.fork()
        if pid == 0:  # the child: become the program (no Python code of the test runs here after exec)
            try:
                os.chdir(REPO)
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd, self.buffer, self.status = pid, fd, "", None

    def read(self, timeout):
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            return None
        self.buffer += data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        return True

    def expect(self, pattern, timeout=90.0):
        regex = re.compile(pattern, re.S)
        deadline = time.time() + timeout
        while True:
            match = regex.search(self.buffer)
            if match:
                consumed, self.buffer = self.buffer[: match.end()], self.buffer[match.end() :]
                return consumed
            left = deadline - time.time()
            if left <= 0 or self.read(left) is None:
                raise AssertionError(f"waited for {pattern!r}; the program wrote:\n{self.buffer[-3000:]}")

    def line(self, text):
        os.write(self.fd, text.encode() + b"\r")

    def key(self, char):
        os.write(self.fd, char.encode())

    def wait(self, timeout=30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self.read(0.05):
                    pass
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            self.read(0.05)
        raise AssertionError(f"the program did not exit; it wrote:\n{self.buffer[-3000:]}")

    def close(self):
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


PROMPT = r"User: $"


def test_the_chat_program_in_a_terminal(folder):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    base = [sys.executable, "-m", "rwkv_hf.cli", "chat", str(folder), "--seed", "0"]
    a = Terminal(base + ["--max-new-tokens", "5", "--system", "Be nice."], env)
    b = Terminal(base + ["--max-new-tokens", "100000"], env)
    try:
        a.expect(r"ready\. Type \+help.*" + PROMPT, timeout=180)
        # every command once; each answer ends at the next prompt
        steps = [
            ("Hello there -temp=0.8 -top_p=0.4", r"Assistant: .*?\n\n"),
            ("+", r"Assistant: .*?\n\n"),
            ("+++", r"Assistant: .*?\n\n"),
            ("Tell me more", r"Assistant: .*?\n\n"),
            ("+gen Once upon a time", r"."),
            ("++", r"."),
            ("+++", r"."),
            ("+i Summarise this text", r"."),
            ("+qq What is RWKV?", r"."),
            ("+qa Who are you?", r"."),
            ("+help", r"Commands \(ChatRWKV's\).*\+qa TEXT.*Ctrl-D"),
            ("+bogus", r"error: unknown command \+bogus"),
            ("hi -temp=warm", r"error: -temp=warm"),
            ("+reset", r"Chat reset\."),
            ("Hi again", r"Assistant: .*?\n\n"),
        ]
        for text, answer in steps:
            a.line(text)
            a.expect(re.escape(text) + r"\n" + answer + r".*?" + PROMPT)
        a.key("\x04")  # Ctrl-D at the prompt
        assert a.wait() == 0
        assert "Traceback" not in a.buffer

        b.expect(PROMPT, timeout=180)
        b.line("+gen The long story")
        b.expect(r"The long story\n.")  # text is streaming
        b.key("\x03")  # Ctrl-C while writing: stops the generation, keeps the program
        b.expect(r"\[stopped\]\n\n" + PROMPT, timeout=60)
        b.line("+help")
        b.expect(r"Commands.*" + PROMPT)
        b.key("\x03")  # Ctrl-C at the prompt: quits
        assert b.wait() == 0
        assert "Traceback" not in b.buffer and "KeyboardInterrupt" not in b.buffer
    finally:
        a.close()
        b.close()
