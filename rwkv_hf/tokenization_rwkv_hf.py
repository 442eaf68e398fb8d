"""Tokenizers for RWKV models, with a ChatGLM3-compatible chat interface.

* ``RwkvWorldTokenizer`` -- the RWKV World vocabulary (``rwkv_vocab_v20230424.txt``, used by every RWKV World /
  G-series model, v4 to v7). Token ids are identical to the official ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``: the
  text's UTF-8 bytes are cut greedily, left to right, into the longest vocabulary token. Id 0 is
  ``<|endoftext|>`` (bos = eos = pad); ids 1..65529 are byte strings.
* ``Rwkv20BTokenizer`` -- the GPT-NeoX 20B tokenizer of the RWKV-4 Pile / Raven models (``tokenizer.json``, run by
  the ``tokenizers`` library), plus ChatRWKV's ``fix_tokens``: a trailing ``"\\n\\n"`` token (535) is encoded as
  two ``"\\n"`` tokens (187, 187), because the models only saw ``"\\n\\n"`` that way inside a text.

Both tokenizers pad on the left (a recurrent model reads the padding first, where the attention mask can zero it)
and add no BOS. Both offer the chat helpers of ``RwkvChatMixin``: ``build_chat_input`` (ChatGLM3's signature),
``get_command``, ``turn_end_ids`` and a chat template that renders the same text.

This module is copied on its own for ``trust_remote_code``: it imports only the standard library, transformers and
tokenizers, never other project modules. The vocabulary files must sit next to it or in the loaded folder.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
from typing import Any

from tokenizers import AddedToken
from transformers import BatchEncoding, PreTrainedTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy


_HERE = os.path.dirname(os.path.abspath(__file__))

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
TOKENIZER_20B_FILE = "20B_tokenizer.json"
ENDOFTEXT = "<|endoftext|>"

# ----------------------------------------------------------------------------------------------------------------
# Chat format
# ----------------------------------------------------------------------------------------------------------------

# RWKV's chat format (ChatRWKV API_DEMO_CHAT, RWKV-Runner): "Role: content" turns separated by a blank line.
CHAT_ROLES = ("system", "user", "assistant", "observation")
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "observation": "Observation"}
TURN_END = "\n\n"  # ends every turn; a model reply is over when it writes this
GENERATION_PROMPT = "Assistant:"  # no trailing space: the models write the space themselves
# ChatGLM3's role tokens, accepted by get_command()
ROLE_COMMANDS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

_NEWLINE_RUNS = re.compile(r"\n{2,}")

# The same rendering as RwkvChatMixin.build_chat_prompt, for tokenizer.apply_chat_template. Jinja has no regex, so
# runs of newlines are collapsed by repeated replace("\n\n", "\n"): each pass halves a run, 64 passes are plenty.
# Errors are raised with raise_exception (transformers' chat template helper), as jinja2 TemplateError.
RWKV_CHAT_TEMPLATE = """\
{#- RWKV chat format (rwkv_hf): every message is "Role: content" + "\\n\\n"; the generation prompt is "Assistant:".
    Content is cleaned like RwkvChatMixin.build_chat_input: "\\r\\n" -> "\\n", stripped, and runs of newlines
    collapsed to one, so that a message cannot contain the blank line that ends a turn (raw=true keeps it as is).
    A "metadata" string goes on the line before the content (ChatGLM3 tool calls); "tools" on the system message,
    or passed to apply_chat_template, are appended to the system text as JSON. prefix_turn_end=true starts the text
    with "\n\n", to continue a recurrent state that ends right after a reply (see build_chat_input). An assistant
    message's " content\n\n" is marked {% generation %} (return_assistant_tokens_mask, TRL's assistant_only_loss). -#}
{%- set role_names = {"system": "System", "user": "User", "assistant": "Assistant", "observation": "Observation"} -%}
{%- set keep_raw = raw is defined and raw -%}
{%- set ns = namespace(tools=none) -%}
{%- if prefix_turn_end is defined and prefix_turn_end -%}
    {{- "\n\n" -}}
{%- endif -%}
{%- if tools is defined and tools is not none -%}
    {%- set ns.tools = tools | tojson(indent=4) -%}
    {%- if messages | length == 0 or messages[0] is not mapping or messages[0].role != "system" -%}
        {{- "System: " ~ ns.tools ~ "\\n\\n" -}}
        {%- set ns.tools = none -%}
    {%- endif -%}
{%- endif -%}
{%- for message in messages -%}
    {%- if message is not mapping -%}
        {{- raise_exception("chat message " ~ loop.index0 ~ " must be a dict with 'role' and 'content' keys") -}}
    {%- endif -%}
    {%- if message.role is not defined or message.role not in role_names -%}
        {{- raise_exception("chat message " ~ loop.index0 ~ ": unknown role " ~ (message.role | default("(missing)"))
            ~ "; expected one of 'system', 'user', 'assistant', 'observation'") -}}
    {%- endif -%}
    {%- if message.content is not defined or message.content is none -%}
        {{- raise_exception("chat message " ~ loop.index0 ~ " (role '" ~ message.role ~ "') has no 'content'") -}}
    {%- endif -%}
    {%- if message.content is not string -%}
        {{- raise_exception("chat message " ~ loop.index0 ~ ": 'content' must be a string") -}}
    {%- endif -%}
    {%- set text = message.content -%}
    {%- if message.tools is defined -%}
        {%- if message.role != "system" -%}
            {{- raise_exception("chat message " ~ loop.index0 ~ ": 'tools' are only allowed on a 'system' message") -}}
        {%- endif -%}
        {%- set text = text ~ "\\n" ~ (message.tools | tojson(indent=4)) -%}
    {%- endif -%}
    {%- if loop.first and ns.tools is not none -%}
        {%- set text = text ~ "\\n" ~ ns.tools -%}
    {%- endif -%}
    {%- if message.metadata is defined and message.metadata -%}
        {%- if message.metadata is not string -%}
            {{- raise_exception("chat message " ~ loop.index0 ~ ": 'metadata' must be a string") -}}
        {%- endif -%}
        {%- set text = message.metadata ~ "\\n" ~ text -%}
    {%- endif -%}
    {%- if not keep_raw -%}
        {%- set clean = namespace(text=(text.replace("\\r\\n", "\\n") | trim)) -%}
        {%- for _ in range(64) if "\\n\\n" in clean.text -%}
            {%- set clean.text = clean.text.replace("\\n\\n", "\\n") -%}
        {%- endfor -%}
        {%- set text = clean.text -%}
    {%- endif -%}
    {%- if loop.last and add_generation_prompt and message.role == "user" and text == "" -%}
        {{- raise_exception("the user message is empty") -}}
    {%- endif -%}
    {%- if message.role == "assistant" -%}
        {#- what the model writes after the "Assistant:" prompt, turn end included: the span TRL's
            assistant_only_loss trains on (return_assistant_tokens_mask) -#}
        {{- "Assistant:" -}}
        {%- generation -%}
        {{- " " ~ text ~ "\\n\\n" -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- role_names[message.role] ~ ": " ~ text ~ "\\n\\n" -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "Assistant:" -}}
{%- endif -%}
"""


def clean_chat_content(text: str) -> str:
    """Normalise one message for the RWKV chat format: CRLF -> LF, strip, collapse runs of newlines to one.

    A blank line ends a turn in this format, so message text must not contain one (ChatRWKV does the same).
    """
    return _NEWLINE_RUNS.sub("\n", text.replace("\r\n", "\n").strip())


def _type_name(value: Any) -> str:
    return type(value).__name__


class RwkvChatMixin:
    """ChatGLM3-style chat helpers shared by the RWKV tokenizers.

    The prompt is RWKV's plain-text format::

        System: {system}\\n\\nUser: {query}\\n\\nAssistant: {answer}\\n\\nUser: {query}\\n\\nAssistant:

    Every role token of ChatGLM3 (``<|user|>``, ``<|observation|>``, ``<|assistant|>``, ``<|system|>``) maps, in
    ``get_command``, to the id of ``"\\n\\n"``: in this format a turn ends with a blank line and the next role name
    follows it, so "the model is about to write the next role" is exactly "the model wrote \\n\\n". ChatGLM3 code that
    stops generation at ``[eos_token_id, get_command("<|user|>"), get_command("<|observation|>")]`` therefore stops
    at the end of the assistant's reply.
    """

    chat_roles = CHAT_ROLES
    turn_end_text = TURN_END

    # -- subclass hooks ----------------------------------------------------------------------------------------

    def _plain_token_ids(self, text: str) -> list[int]:
        """Ids of ``text`` as plain text, without any post-processing (implemented by each tokenizer)."""
        raise NotImplementedError

    def _vocab_texts(self):
        """Yield ``(id, bytes)`` for the base vocabulary (implemented by each tokenizer)."""
        raise NotImplementedError

    # -- turn ends ---------------------------------------------------------------------------------------------

    @property
    def turn_end_id(self) -> int:
        """The id of the ``"\\n\\n"`` token that ends a chat turn (World: 261, 20B: 535)."""
        ids = self._plain_token_ids(TURN_END)
        if len(ids) != 1:  # both RWKV vocabularies have it; a custom vocabulary might not
            raise ValueError(f"this vocabulary has no single token for {TURN_END!r} (it encodes as {ids})")
        return ids[0]

    @property
    def turn_end_ids(self) -> list[int]:
        """Every token id whose text contains ``"\\n\\n"``, ``turn_end_id`` first.

        A reply is over as soon as the model writes a blank line (ChatRWKV stops on ``"\\n\\n" in text``); the model
        may write it inside a longer whitespace token such as ``"\\n\\n\\n"`` or ``" \\n\\n"``, so use all of them as
        ``eos_token_id`` to stop at once. They are all pure whitespace, so dropping the stop token loses no text.
        A blank line written as two ``"\\n"`` tokens (which RWKV-4 Pile/Raven models usually do) is only caught by
        ``stop_strings=[tokenizer.turn_end_text]``.
        """
        cached = getattr(self, "_turn_end_ids_cache", None)
        if cached is None:
            first = self.turn_end_id
            others = sorted(i for i, b in self._vocab_texts() if b"\n\n" in b and i != first)
            cached = self._turn_end_ids_cache = [first] + others
        return list(cached)

    def get_command(self, token: str) -> int:
        """ChatGLM3's ``get_command``: the id to use for a role token or a named special token.

        ``"<|user|>"``, ``"<|observation|>"``, ``"<|assistant|>"`` and ``"<|system|>"`` all return ``turn_end_id``
        (the ``"\\n\\n"`` token; see the class docstring for why). ``"<bos>"``, ``"<eos>"`` and ``"<pad>"`` return the
        bos/eos/pad ids, and a special token's text (``"<|endoftext|>"``) returns its id.
        """
        if token in ROLE_COMMANDS:
            return self.turn_end_id
        named = {"<bos>": self.bos_token_id, "<eos>": self.eos_token_id, "<pad>": self.pad_token_id}
        if token in named and named[token] is not None:
            return named[token]
        specials = {t: i for t, i in self.added_tokens_encoder.items() if self.added_tokens_decoder[i].special}
        if token in specials:
            return specials[token]
        accepted = list(ROLE_COMMANDS) + [t for t in named if named[t] is not None] + sorted(specials)
        raise ValueError(f"get_command: unknown token {token!r}; accepted tokens are {', '.join(accepted)}")

    # -- prompt building ---------------------------------------------------------------------------------------

    @staticmethod
    def _message_text(index: str, message: Any, raw: bool, extra_tools: str | None = None) -> tuple[str, str]:
        """Validate one ChatGLM3 history entry and return ``(role, rendered text)``."""
        if not isinstance(message, dict):
            raise TypeError(
                f"{index} must be a dict like {{'role': 'user', 'content': '...'}}, got {_type_name(message)}"
            )
        if "role" not in message:
            raise ValueError(f"{index} has no 'role'; expected one of {', '.join(map(repr, CHAT_ROLES))}")
        role = message["role"]
        if not isinstance(role, str) or role not in ROLE_NAMES:
            raise ValueError(f"{index}: unknown role {role!r}; expected one of {', '.join(map(repr, CHAT_ROLES))}")
        if "content" not in message:
            raise ValueError(f"{index} (role {role!r}) has no 'content'")
        text = message["content"]
        if not isinstance(text, str):
            raise TypeError(f"{index}: 'content' must be a str, got {_type_name(text)}")
        if message.get("tools") is not None:
            if role != "system":
                raise ValueError(f"{index}: 'tools' are only allowed on a 'system' message, not on {role!r}")
            text = text + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        if extra_tools is not None:
            text = text + "\n" + extra_tools
        metadata = message.get("metadata")
        if metadata:  # ChatGLM3 puts the tool name of a tool call here, on the line before the content
            if not isinstance(metadata, str):
                raise TypeError(f"{index}: 'metadata' must be a str, got {_type_name(metadata)}")
            text = metadata + "\n" + text
        return role, text if raw else clean_chat_content(text)

    def build_chat_prompt(
        self,
        query: str,
        history: list[dict] | None = None,
        role: str = "user",
        *,
        raw: bool = False,
        add_generation_prompt: bool = True,
        tools: list | dict | None = None,
        prefix_turn_end: bool = False,
    ) -> str:
        """The prompt text that ``build_chat_input`` encodes (see there for the arguments)."""
        if history is None:
            history = []
        if not isinstance(history, (list, tuple)):
            raise TypeError(
                "history must be a list of dicts like {'role': 'user', 'content': '...'}, "
                f"got {_type_name(history)}"
            )
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {_type_name(query)}")
        if not isinstance(role, str) or role not in ROLE_NAMES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(map(repr, CHAT_ROLES))}")

        messages = [(f"history[{i}]", m) for i, m in enumerate(history)]
        messages.append(("the query", {"role": role, "content": query}))
        parts = [TURN_END] if prefix_turn_end else []
        tools_json = None if tools is None else json.dumps(tools, indent=4, ensure_ascii=False)
        first = messages[0][1]
        if tools_json is not None and not (isinstance(first, dict) and first.get("role") == "system"):
            parts.append(f"System: {tools_json}{TURN_END}")  # no system message to join: a turn of their own
            tools_json = None
        text = ""
        for n, (index, message) in enumerate(messages):
            msg_role, text = self._message_text(index, message, raw, tools_json if n == 0 else None)
            parts.append(f"{ROLE_NAMES[msg_role]}: {text}{TURN_END}")
        if role == "user" and add_generation_prompt and text == "":
            raise ValueError("the query is empty: a user turn needs some text (after stripping whitespace)")
        if add_generation_prompt:
            parts.append(GENERATION_PROMPT)
        return "".join(parts)

    def build_chat_input(
        self,
        query: str,
        history: list[dict] | None = None,
        role: str = "user",
        *,
        raw: bool = False,
        add_generation_prompt: bool = True,
        tools: list | dict | None = None,
        prefix_turn_end: bool = False,
    ) -> BatchEncoding:
        """Encode a chat turn, like ChatGLM3's ``tokenizer.build_chat_input``.

        Args:
            query: the new message.
            history: earlier messages, ChatGLM3 style: ``[{"role": ..., "content": ..., "metadata": ...}, ...]``;
                roles are ``system``, ``user``, ``assistant``, ``observation``. A system entry may carry
                ``"tools"``, which are appended to its text as JSON.
            role: the role of ``query`` (``"observation"`` for a tool result).
            raw: keep every message's text as given. By default text is cleaned (CRLF -> LF, stripped, runs of
                newlines collapsed) so that no message can contain the blank line that ends a turn.
            add_generation_prompt: end with ``"Assistant:"`` so that the model writes the reply.
            tools: tools for the model (as with ``apply_chat_template(tools=...)``), appended to the first system
                message, or sent as a system message of their own when the history does not start with one.
            prefix_turn_end: start with the turn separator ``"\n\n"``. For a turn that continues a recurrent
                state (``past_key_values``) which ends right after a reply: ``generate`` stops when it samples the
                ``"\n\n"`` token (``get_command("<|user|>")``) but never feeds it to the model, so the new turn
                must bring it. (ChatGLM3 needs nothing like this because its stop token is the next turn's role
                token.) Then cache + new input hold exactly the text of the whole conversation.

        Returns:
            ``BatchEncoding`` with ``input_ids`` and ``attention_mask``, torch tensors of shape ``[1, T]``. The text
            is encoded as plain text: a ``<|endoftext|>`` typed in a message does not become the special token.
            With the same messages, ``apply_chat_template(messages, add_generation_prompt=True)`` renders the same
            text and, for text without special tokens, gives the same ids.
        """
        text = self.build_chat_prompt(
            query,
            history,
            role,
            raw=raw,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            prefix_turn_end=prefix_turn_end,
        )
        return self(text, add_special_tokens=False, return_tensors="pt", split_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# RWKV World vocabulary
# ----------------------------------------------------------------------------------------------------------------


def _parse_vocab_literal(literal: str) -> bytes:
    """One vocabulary entry: a Python str or bytes literal. Never eval'd."""
    q = literal[:1]
    # Most entries are plain quoted text without escapes; slicing them is exact and ~20x faster than literal_eval.
    if q in ("'", '"') and len(literal) >= 2 and literal[-1] == q and "\\" not in literal and q not in literal[1:-1]:
        return literal[1:-1].encode("utf-8")
    value = ast.literal_eval(literal)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    raise ValueError(f"vocabulary entry {literal!r} is neither a str nor a bytes literal")


def _brief(value, limit: int = 80) -> str:
    """repr(value), cut to ``limit`` characters: error messages about hostile files stay short."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _WorldVocab:
    """The parsed World vocabulary plus the compiled greedy matcher (shared by tokenizers of the same file)."""

    def __init__(self, data: bytes, source: str):
        id_to_bytes: dict[int, bytes] = {}
        # split lines like the official reader (text mode): on \n, \r\n and \r only, not on str.splitlines()'s others
        lines = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                first, last = line.index(" "), line.rindex(" ")
                idx, token, length = int(line[:first]), _parse_vocab_literal(line[first + 1 : last]), int(line[last:])
            except (ValueError, SyntaxError) as err:
                raise ValueError(f"{source}:{line_no}: bad vocabulary line {_brief(line)} ({_brief(str(err))})") from None
            if len(token) != length:
                raise ValueError(f"{source}:{line_no}: token {_brief(token)} has {len(token)} bytes, the line says {length}")
            if idx <= 0 or idx in id_to_bytes:
                raise ValueError(f"{source}:{line_no}: id {idx} is reserved (0) or repeated")
            # The tables below are as long as the largest id: a single huge id must not allocate gigabytes. Real
            # vocabularies are dense (the official one: ids 1..65529 on 65529 lines), so allow as many gaps as
            # entries and no more.
            if idx > 2 * (len(lines) + 256):
                raise ValueError(
                    f"{source}:{line_no}: id {idx} is far beyond a vocabulary of {len(lines)} lines (ids must stay "
                    f"below {2 * (len(lines) + 256)}); the file is corrupt or not an RWKV vocabulary"
                )
            id_to_bytes[idx] = token
        if not id_to_bytes:
            raise ValueError(f"{source}: the vocabulary file has no entries")
        size = max(id_to_bytes) + 1
        # Token text as latin-1 str: one char per byte, so it is lossless and str-based machinery works on it.
        self.id_to_bytes = [b""] * size  # id 0 (<|endoftext|>) and gaps decode to nothing here
        self.id_to_str = [""] * size
        self.str_to_id: dict[str, int] = {}
        for idx, token in id_to_bytes.items():
            self.id_to_bytes[idx] = token
            self.id_to_str[idx] = s = token.decode("latin-1")
            self.str_to_id[s] = idx
        if len(self.str_to_id) != len(id_to_bytes):
            raise ValueError(f"{source}: the vocabulary has repeated tokens")
        missing = [b for b in range(256) if chr(b) not in self.str_to_id]
        if missing:  # every byte must be a token, or some text could not be encoded at all
            raise ValueError(f"{source}: no single-byte token for bytes {missing[:8]}")
        self.size = size
        self._data, self._source = data, source
        self._matcher = None
        self._backend_json = None

    def __reduce__(self):  # pickle the file's bytes; unpickling finds the parsed copy in the per-process cache
        return (_world_vocab_from_bytes, (self._data, self._source))

    def __deepcopy__(self, memo):  # read-only, so a copied tokenizer can share it
        return self

    @property
    def backend_json(self) -> str:
        """This vocabulary as a ``tokenizers`` tokenizer (JSON, built once): the same greedy longest match, in Rust.

        ByteLevel maps the text's UTF-8 bytes to one char each (GPT-2's byte alphabet, so tokens are byte-level
        strs: "Ġworld"); a Split whose regex is the token trie (see ``_trie_pattern``) cuts out the longest token
        at each position, as ``matcher`` does; WordLevel looks each piece up. ``<|endoftext|>`` is id 0.
        """
        if self._backend_json is None:
            from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

            to_char = _byte_level_alphabet()
            vocab = {"".join(to_char[b] for b in token): idx for idx, token in enumerate(self.id_to_bytes) if token}
            vocab[ENDOFTEXT] = 0
            backend = Tokenizer(models.WordLevel(vocab, unk_token=None))
            pattern = _trie_pattern(vocab, lambda ch: "\\x{%x}" % ord(ch), lambda ch: "\\x{%x}" % ord(ch))
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            ])
            backend.decoder = decoders.ByteLevel()
            backend.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
            self._backend_json = backend.to_str()
        return self._backend_json

    @property
    def matcher(self):
        """``findall`` of a regex that matches the longest vocabulary token at each position (compiled lazily, ~1 s)."""
        if self._matcher is None:
            self._matcher = _compile_longest_match(self.str_to_id).findall
        return self._matcher


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-char table, the one ``tokenizers``' ByteLevel uses: printable bytes map to themselves."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _compile_longest_match(tokens) -> re.Pattern:
    """A regex that matches, at any position, the longest of ``tokens`` (latin-1 strs) starting there.

    The pattern is the token trie written as nested groups: ``a(?:b(?:c|)|d|)`` for {"a", "abc", "ad"}. A node that
    ends a token gets an empty last alternative, so the regex engine goes as deep as the text allows and falls back
    to the last token end it passed (``(?:...)?`` does the same, about 10% slower). Sibling branches start with
    different characters, so at most one of them can match. ``findall`` then cuts a whole text, in C, exactly like
    the official greedy byte-trie loop, because every single byte is a token.
    """
    return re.compile(_trie_pattern(tokens, re.escape, _class_char), re.DOTALL)


def _trie_pattern(tokens, escape, class_char) -> str:
    """The trie regex of ``_compile_longest_match``, with ``escape`` / ``class_char`` writing one char outside /
    inside a ``[...]`` class (Python's ``re`` and Oniguruma, which ``tokenizers`` uses, escape differently)."""
    root: dict = {}
    for token in tokens:
        node = root
        for ch in token:
            node = node.setdefault(ch, {})
        node[None] = True  # token end

    weights: dict[int, int] = {}

    def weight(node) -> int:  # tokens below a node: try likely branches first (sre scans alternatives in order)
        key = id(node)
        if key not in weights:
            weights[key] = (None in node) + sum(weight(child) for ch, child in node.items() if ch is not None)
        return weights[key]

    def emit(node) -> str:
        # Children with the same sub-pattern (most often: leaves, the last bytes of tokens) share one branch
        # "[abc]sub": sre tests a character class in one step, but tries alternatives one by one.
        groups: dict[str, list[str]] = {}
        for ch in node:
            if ch is not None:
                groups.setdefault(emit(node[ch]), []).append(ch)
        ordered = sorted(groups.items(), key=lambda item: -sum(weight(node[ch]) for ch in item[1]))
        branches = [
            (escape(chars[0]) if len(chars) == 1 else "[" + "".join(map(class_char, sorted(chars))) + "]") + sub
            for sub, chars in ordered
        ]
        if None in node:  # a token ends here: the empty alternative
            return "(?:" + "|".join(branches) + "|)" if branches else ""
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"

    return emit(root)


def _class_char(ch: str) -> str:
    return "\\x%02x" % ord(ch)  # every char here is a byte (latin-1); hex escapes are safe inside [...]


_WORLD_VOCABS: dict[str, _WorldVocab] = {}


def _world_vocab_from_bytes(data: bytes, source: str) -> _WorldVocab:
    key = hashlib.sha256(data).hexdigest()
    if key not in _WORLD_VOCABS:  # parse (~0.1 s) and compile (~1.5 s) once per process per vocabulary
        _WORLD_VOCABS[key] = _WorldVocab(data, source)
    return _WORLD_VOCABS[key]


def _load_world_vocab(path: str) -> _WorldVocab:
    with open(path, "rb") as f:
        return _world_vocab_from_bytes(f.read(), path)


def _refuse_a_smaller_model_vocabulary(tokenizer, folder) -> None:
    config_file = os.path.join(str(folder), "config.json")
    if not os.path.isfile(config_file):
        return
    try:
        with open(config_file, encoding="utf-8") as f:
            model_vocab = json.load(f).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(model_vocab, int) and model_vocab < tokenizer._vocab.size:
        raise ValueError(
            f"{folder}: the model has a vocabulary of {model_vocab} tokens, but the RWKV World tokenizer needs "
            f"{tokenizer._vocab.size} (ids up to {tokenizer._vocab.size - 1}). The folder lacks its own tokenizer "
            "files: for a GPT-NeoX 20B model, convert again with --tokenizer 20b (or copy its tokenizer.json in)"
        )


def _world_vocab_file(vocab_file: str | None) -> str:
    if vocab_file is None:
        vocab_file = os.path.join(_HERE, WORLD_VOCAB_FILE)
    if not os.path.isfile(vocab_file):
        raise FileNotFoundError(
            f"RWKV World vocabulary not found at {vocab_file}: pass vocab_file=, or load from a folder that has "
            f"{WORLD_VOCAB_FILE} (save_pretrained writes it)"
        )
    return vocab_file


class _WorldVocabMethods:
    """What both World tokenizers read straight off the parsed vocabulary (``self._vocab``): sizes, the official
    trie's ids, the vocabulary file. First in their bases, before ``RwkvChatMixin``'s hooks."""

    @property
    def vocab_size(self) -> int:
        return self._vocab.size

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids exactly as the official ``TRIE_TOKENIZER.encode(text)``: no special tokens, nothing added."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids of raw bytes (need not be valid UTF-8), as the official ``TRIE_TOKENIZER.encodeBytes(data)``."""
        return list(map(self._vocab.str_to_id.__getitem__, self._vocab.matcher(bytes(data).decode("latin-1"))))

    def _plain_token_ids(self, text: str) -> list[int]:
        return self.encode_ordinary(text)

    def _vocab_texts(self):
        return enumerate(self._vocab.id_to_bytes)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"save_vocabulary: {save_directory} is not a directory")
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + WORLD_VOCAB_FILE)
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(out):
                shutil.copyfile(self.vocab_file, out)
        else:  # the source file is gone: write the same format from memory
            with open(out, "w", encoding="utf-8") as f:
                for idx in range(1, self._vocab.size):
                    token = self._vocab.id_to_bytes[idx]
                    try:
                        literal = repr(token.decode("utf-8"))
                    except UnicodeDecodeError:
                        literal = repr(token)
                    f.write(f"{idx} {literal} {len(token)}\n")
        return (out,)


class RwkvWorldTokenizer(_WorldVocabMethods, RwkvChatMixin, PreTrainedTokenizer):
    """The RWKV World tokenizer (``rwkv_vocab_v20230424.txt``), id-for-id equal to the official TRIE_TOKENIZER.

    * Encoding: UTF-8 bytes, greedy longest-prefix match. ``"\\n\\n"`` is one token (261). ``<|endoftext|>`` in the
      text becomes the special id 0 (the official tokenizer treats it as plain text: pass
      ``split_special_tokens=True``, or use ``encode_ordinary``, to get that).
    * ``tokenize()`` returns each token's bytes as a latin-1 str (lossless; ``"é"`` is ``"Ã©"``).
    * Decoding joins the token bytes and decodes them as UTF-8 with ``errors="replace"``: the same text as the
      official ``decode`` whenever that succeeds. Where the official one fails (invalid or cut-off UTF-8, or id 0)
      it returns a single ``"\\ufffd"`` for the whole text; this one keeps the valid text and replaces only the
      broken bytes, which streaming needs. Id 0 decodes to ``<|endoftext|>`` (dropped with
      ``skip_special_tokens=True``), ids without a token (65530..65535: the model's embedding has 65536 rows) to "".
    * ``vocab_size`` is 65530 (ids 0..65529); tokens added later get ids from 65530 up.
    """

    vocab_files_names = {"vocab_file": WORLD_VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        bos_token: str | AddedToken = ENDOFTEXT,
        eos_token: str | AddedToken = ENDOFTEXT,
        pad_token: str | AddedToken = ENDOFTEXT,
        unk_token: str | AddedToken | None = None,
        **kwargs,
    ):
        self.vocab_file = vocab_file = _world_vocab_file(vocab_file)
        self._vocab = _load_world_vocab(vocab_file)
        # id 0 is not in the vocabulary file; registering it first makes it special (split out of text, skipped by
        # skip_special_tokens) and keeps it at id 0
        self._added_tokens_decoder = {
            0: AddedToken(ENDOFTEXT, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        }
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("chat_template", RWKV_CHAT_TEMPLATE)
        self._split_cache: tuple[tuple[str, ...], re.Pattern | None] = ((), None)
        super().__init__(
            bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token, **kwargs
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers', and refused for a model folder whose vocabulary is too small for the World ids: a
        GPT-NeoX 20B folder (50277 tokens) without its tokenizer files would otherwise get this tokenizer and
        chat on wrong ids."""
        tokenizer = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        _refuse_a_smaller_model_vocabulary(tokenizer, pretrained_model_name_or_path)
        return tokenizer

    def __getstate__(self):  # pickled by datasets.map(num_proc=...): leave out the rebuildable decode table
        state = self.__dict__.copy()
        state.pop("_decode_table_cache", None)
        return state

    # -- vocabulary ----------------------------------------------------------------------------------------------

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._vocab.str_to_id)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int | None:
        return self._vocab.str_to_id.get(token)

    def _convert_id_to_token(self, index: int) -> str:
        index = int(index)
        return self._vocab.id_to_str[index] if 0 <= index < self._vocab.size else ""

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return super().convert_tokens_to_ids(tokens)
        # the base class makes two method calls per token; this is the hot loop of tokenizer(text)
        added, vocab = self._added_tokens_encoder, self._vocab.str_to_id
        return [added[t] if t in added else vocab.get(t) for t in tokens]

    # -- encoding ------------------------------------------------------------------------------------------------

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # Match on the UTF-8 bytes seen as a latin-1 str (one char per byte): the matched pieces are the tokens.
        return self._vocab.matcher(text.encode("utf-8").decode("latin-1"))

    def _added_tokens_splitter(self) -> re.Pattern | None:
        """Regex splitting text on the added tokens (longest first), rebuilt when they change."""
        tokens = tuple(self._added_tokens_encoder)
        if self._split_cache[0] != tokens:
            ordered = sorted(tokens, key=len, reverse=True)
            pattern = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None
            self._split_cache = (tokens, pattern)
        return self._split_cache[1]

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Split on added tokens, then encode the text between them.

        Same result as the base class, but the base class walks the text character by character in Python to
        find added tokens (slower than encoding itself); a regex does it here, and text without any is encoded
        in one piece.
        """
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        splitter = None if split_special_tokens else self._added_tokens_splitter()
        if splitter is None or splitter.search(text) is None:
            return self._tokenize(text)

        pieces = [p for p in splitter.split(text) if p]
        added = self._added_tokens_encoder
        # honour the AddedToken options exactly as PreTrainedTokenizer.tokenize does
        for i, piece in enumerate(pieces):
            if piece not in added:
                continue
            tok = self._added_tokens_decoder.get(added[piece])
            left = pieces[i - 1] if i > 0 else None
            right = pieces[i + 1] if i < len(pieces) - 1 else None
            if isinstance(tok, AddedToken):
                if tok.rstrip and right:
                    pieces[i + 1] = right.lstrip()
                if tok.lstrip and left:
                    pieces[i - 1] = left.rstrip()
                if tok.single_word:
                    if left and left[-1] != " ":
                        pieces[i - 1] += piece
                        pieces[i] = ""
                    elif right and right[0] != " ":
                        pieces[i + 1] = piece + pieces[i + 1]
                        pieces[i] = ""
        result: list[str] = []
        for piece in pieces:
            if not piece:
                continue
            if piece in added:
                result.append(piece)
            else:
                result.extend(self._tokenize(piece))
        return result

    # -- decoding ------------------------------------------------------------------------------------------------

    def _decode_table(self) -> list[bytes]:
        """Bytes of every id: the vocabulary plus the added tokens (id 0 and later ones), b"" where none."""
        key = tuple((i, t.content) for i, t in self._added_tokens_decoder.items())
        cached = getattr(self, "_decode_table_cache", None)
        if cached is None or cached[0] != key:
            table = list(self._vocab.id_to_bytes)
            for i, content in key:
                if i >= len(table):
                    table.extend([b""] * (i + 1 - len(table)))
                table[i] = content.encode("utf-8")
            cached = self._decode_table_cache = (key, table)
        return cached[1]

    def _token_bytes(self, token: str) -> bytes:
        if token in self._added_tokens_encoder:
            return token.encode("utf-8")
        try:
            return token.encode("latin-1")
        except UnicodeEncodeError:  # not a byte token (a stray str from the caller): keep its text
            return token.encode("utf-8")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return b"".join(map(self._token_bytes, tokens)).decode("utf-8", errors="replace")

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if isinstance(token_ids, list) and (not token_ids or type(token_ids[0]) is int):
            # a flat list of ids: skip the base class's per-element type scan (to_py_obj), half the decode time
            return self._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        if skip_special_tokens:
            skip = set(self.all_special_ids)
            ids = [i for i in ids if i not in skip]
        table = self._decode_table()
        try:
            if len(ids) and min(ids) < 0:  # a negative index would silently pick a token from the end
                raise IndexError
            data = b"".join(map(table.__getitem__, ids))
        except (IndexError, TypeError):
            # ids without a token (65530..65535: the model's vocabulary is larger than ours; negative) decode to ""
            data = b"".join(table[i] if 0 <= i < len(table) else b"" for i in map(int, ids))
        text = data.decode("utf-8", errors="replace")
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text


class RwkvWorldTokenizerFast(_WorldVocabMethods, RwkvChatMixin, PreTrainedTokenizerFast):
    """The RWKV World tokenizer run by the ``tokenizers`` library: the ids of ``RwkvWorldTokenizer`` (the reference,
    id-for-id the official TRIE_TOKENIZER), plus what only a ``tokenizers`` backend gives: offsets
    (``return_offsets_mapping``, ``apply_chat_template(return_assistant_tokens_mask=True)``, TRL's
    ``assistant_only_loss``), ``backend_tokenizer`` (``transformers serve``'s streaming decoder), and a plain
    ``tokenizer.json`` other runtimes read. ``AutoTokenizer`` returns this one.

    Built from ``rwkv_vocab_v20230424.txt`` (see ``_WorldVocab.backend_json``); a ``tokenizer.json`` next to it must
    describe the same tokenizer, or loading fails naming the first difference. Tokens are byte-level strs ("Ġworld"
    for " world"; the slow tokenizer's are latin-1). Decoding replaces broken UTF-8 per invalid sequence, like the
    slow one; ids without a token decode to "".
    """

    vocab_files_names = {"vocab_file": WORLD_VOCAB_FILE, "tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    slow_tokenizer_class = RwkvWorldTokenizer

    def __init__(
        self,
        vocab_file: str | None = None,
        tokenizer_file: str | None = None,
        bos_token: str | AddedToken = ENDOFTEXT,
        eos_token: str | AddedToken = ENDOFTEXT,
        pad_token: str | AddedToken = ENDOFTEXT,
        unk_token: str | AddedToken | None = None,
        **kwargs,
    ):
        from tokenizers import Tokenizer

        self.vocab_file = vocab_file = _world_vocab_file(vocab_file)
        self._vocab = _load_world_vocab(vocab_file)
        expected = self._vocab.backend_json
        if tokenizer_file is not None:
            _check_tokenizer_file(tokenizer_file, expected, vocab_file)
        for name in ("tokenizer_object", "vocab", "merges"):  # built from the vocabulary file, nothing else
            kwargs.pop(name, None)
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("chat_template", RWKV_CHAT_TEMPLATE)
        super().__init__(
            tokenizer_object=Tokenizer.from_str(expected),
            bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token, **kwargs,
        )

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        # keep the files for __init__, which builds the backend from the vocabulary and checks tokenizer.json
        return kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers', and refused for a folder whose model vocabulary is too small (see the slow class)."""
        try:
            tokenizer = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except json.JSONDecodeError as err:  # transformers reads tokenizer.json first, and names no file
            raise ValueError(
                f"{pretrained_model_name_or_path}: not a readable tokenizer.json ({err}); delete it to rebuild it from "
                f"the vocabulary {WORLD_VOCAB_FILE}"
            ) from None
        _refuse_a_smaller_model_vocabulary(tokenizer, pretrained_model_name_or_path)
        return tokenizer

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers', plus the vocabulary file: it is the source tokenizer.json is checked against (and the
        slow tokenizer's only file); transformers' fast save writes tokenizer.json alone."""
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        if os.path.isdir(str(save_directory)):
            prefix = kwargs.get("filename_prefix")
            written = self.save_vocabulary(str(save_directory), filename_prefix=prefix)
            saved = tuple(saved) + tuple(f for f in written if f not in saved)
        return saved


def _check_tokenizer_file(path: str, expected_json: str, vocab_file: str) -> None:
    """A folder's tokenizer.json must be the tokenizer its vocabulary file builds: same tokens and ids, same split."""
    try:
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable tokenizer.json ({_brief(str(err))})") from None
    expected = json.loads(expected_json)
    if not isinstance(found, dict):
        raise ValueError(f"{path}: not a tokenizer.json (a JSON object expected)")
    vocab, want = (found.get("model") or {}).get("vocab"), expected["model"]["vocab"]
    if vocab != want:
        if not isinstance(vocab, dict):
            raise ValueError(f"{path}: no WordLevel vocabulary; expected the RWKV World tokenizer built from {vocab_file}")
        differ = sorted(set(vocab.items()) ^ set(want.items()), key=lambda item: item[1])
        token, idx = differ[0]
        where = "the tokenizer.json" if (token, idx) in vocab.items() else vocab_file
        raise ValueError(
            f"{path} does not match the vocabulary {vocab_file}: {len(differ)} (token, id) pairs differ, the first "
            f"{_brief(token)} = {idx} only in {where}. Delete tokenizer.json to rebuild it from the vocabulary"
        )
    for part in ("pre_tokenizer", "decoder", "normalizer", "added_tokens"):
        if found.get(part) != expected[part]:
            raise ValueError(
                f"{path}: its {part} differs from the RWKV World tokenizer built from {vocab_file}; delete "
                "tokenizer.json to rebuild it from the vocabulary"
            )


# ----------------------------------------------------------------------------------------------------------------
# GPT-NeoX 20B tokenizer (RWKV-4 Pile / Raven)
# ----------------------------------------------------------------------------------------------------------------

NEWLINE_20B = 187  # "\n"
DOUBLE_NEWLINE_20B = 535  # "\n\n"


class Rwkv20BTokenizer(RwkvChatMixin, PreTrainedTokenizerFast):
    """The GPT-NeoX 20B tokenizer of RWKV-4 Pile / Raven models, with ChatRWKV's ``fix_tokens``.

    Byte-level BPE run by the ``tokenizers`` library (``tokenizer.json``; by default the ``20B_tokenizer.json``
    shipped next to this module). When an encoded sequence ends with the ``"\\n\\n"`` token 535, it is replaced by
    ``"\\n"`` ``"\\n"`` (187, 187), as ChatRWKV's ``fix_tokens`` does (``v2/chat.py``): the pre-tokenizer keeps the
    last whitespace character with the text after it, so a blank line followed by text, which is how the models saw
    blank lines in training, is 187, 187, while a blank line at the end of a prompt would be 535. Only the last
    token is changed. Set ``fix_trailing_double_newline=False`` to get the tokenizer's own ids. The fix is not
    applied with ``return_overflowing_tokens=True``.

    Decoding is the tokenizer's byte-level decoding; ids without a token decode to "".
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    slow_tokenizer_class = None

    def __init__(
        self,
        tokenizer_file: str | None = None,
        bos_token: str = ENDOFTEXT,
        eos_token: str = ENDOFTEXT,
        unk_token: str = ENDOFTEXT,
        pad_token: str = ENDOFTEXT,
        fix_trailing_double_newline: bool = True,
        **kwargs,
    ):
        if tokenizer_file is None and kwargs.get("tokenizer_object") is None:
            tokenizer_file = os.path.join(_HERE, TOKENIZER_20B_FILE)
            if not os.path.isfile(tokenizer_file):
                raise FileNotFoundError(
                    f"20B tokenizer not found at {tokenizer_file}: pass tokenizer_file=, or load from a folder that "
                    "has tokenizer.json (save_pretrained writes it)"
                )
        # vocab/merges extracted by other loading paths would rebuild a bare BPE without the byte-level parts
        kwargs.pop("vocab", None)
        kwargs.pop("merges", None)
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("chat_template", RWKV_CHAT_TEMPLATE)
        self.fix_trailing_double_newline = fix_trailing_double_newline
        super().__init__(
            tokenizer_file=tokenizer_file,
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            fix_trailing_double_newline=fix_trailing_double_newline,
            **kwargs,
        )

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        # Keep tokenizer.json as a file for __init__: the base class would otherwise (for a class with its own
        # __init__) pass only its vocab and merges, losing the NFC normaliser and the byte-level pre-tokenizer.
        return kwargs

    @staticmethod
    def fix_tokens(ids: list[int]) -> list[int]:
        """ChatRWKV's ``fix_tokens``: a final 535 (``"\\n\\n"``) becomes 187, 187 (``"\\n"``, ``"\\n"``)."""
        if len(ids) > 0 and ids[-1] == DOUBLE_NEWLINE_20B:
            return list(ids[:-1]) + [NEWLINE_20B, NEWLINE_20B]
        return list(ids)

    def _plain_token_ids(self, text: str) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def _vocab_texts(self):
        decoder = self.backend_tokenizer.decoder
        for token, idx in self.backend_tokenizer.get_vocab(with_added_tokens=False).items():
            yield idx, decoder.decode([token]).encode("utf-8")

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False, **kwargs) -> list[str]:
        # from the ids, since a fixed sequence has no tokenizers.Encoding to read the tokens from
        ids = self._encode_plus(text=text, text_pair=pair, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]
        return self.convert_ids_to_tokens(ids)

    def _encode_plus(self, *args, **kwargs) -> BatchEncoding:
        # The base class switches the backend's encode_special_tokens for split_special_tokens=... and leaves it so;
        # put it back, so that build_chat_input (which encodes special tokens as text) changes nothing for later.
        saved = self._tokenizer.encode_special_tokens
        try:
            return self._encode_plus_fixed(*args, **kwargs)
        finally:
            self._tokenizer.encode_special_tokens = saved

    def _encode_plus_fixed(
        self,
        text,
        text_pair=None,
        add_special_tokens: bool = True,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors=None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        **kwargs,
    ) -> BatchEncoding:
        args = dict(
            text=text,
            text_pair=text_pair,
            add_special_tokens=add_special_tokens,
            truncation_strategy=truncation_strategy,
            max_length=max_length,
            stride=stride,
            is_split_into_words=is_split_into_words,
            return_token_type_ids=return_token_type_ids,
            return_attention_mask=return_attention_mask,
            return_overflowing_tokens=return_overflowing_tokens,
            return_special_tokens_mask=return_special_tokens_mask,
            return_offsets_mapping=return_offsets_mapping,
            return_length=return_length,
            verbose=verbose,
            **kwargs,
        )
        padding = dict(
            padding_strategy=padding_strategy,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_tensors=return_tensors,
        )
        if not self.fix_trailing_double_newline or return_overflowing_tokens:
            return super()._encode_plus(**args, **padding)

        # Encode without padding or tensors, so that the last token of every sequence is at the end of its list.
        plain = super()._encode_plus(**args, padding_strategy=PaddingStrategy.DO_NOT_PAD, return_tensors=None)
        ids = plain["input_ids"]
        batched = len(ids) > 0 and isinstance(ids[0], list)
        rows = ids if batched else [ids]
        if not any(row and row[-1] == DOUBLE_NEWLINE_20B for row in rows):
            if padding_strategy == PaddingStrategy.DO_NOT_PAD and return_tensors is None:
                return plain
            return super()._encode_plus(**args, **padding)  # keeps the tokenizers.Encoding objects

        fixed: dict[str, list] = {}
        for key, value in plain.items():
            value_rows = value if batched else [value]
            if key not in ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask", "offset_mapping"):
                fixed[key] = value_rows
                continue
            new_rows = []
            for row, id_row in zip(value_rows, rows):
                row = list(row)
                if id_row and id_row[-1] == DOUBLE_NEWLINE_20B:
                    if key == "input_ids":
                        row[-1:] = [NEWLINE_20B, NEWLINE_20B]
                    elif key == "offset_mapping":  # one character each
                        start, end = row[-1]
                        row[-1:] = [(start, start + 1), (start + 1, end)]
                    else:  # attention / type / special mask: repeat the value
                        row.append(row[-1])
                new_rows.append(row)
            fixed[key] = new_rows
        if "length" in fixed:
            fixed["length"] = [len(row) for row in fixed["input_ids"]]
        if truncation_strategy != TruncationStrategy.DO_NOT_TRUNCATE and max_length is not None:
            cut = (lambda r: r[-max_length:]) if self.truncation_side == "left" else (lambda r: r[:max_length])
            for key in ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask", "offset_mapping"):
                if key in fixed:
                    fixed[key] = [cut(row) for row in fixed[key]]
        offsets = fixed.pop("offset_mapping", None)
        flat = not batched and return_tensors is None  # a single text without tensors comes back unbatched
        out = self.pad(
            {key: (value[0] if value and isinstance(value[0], list) else value) for key, value in fixed.items()}
            if flat
            else fixed,
            padding=padding_strategy,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
        )
        if offsets is not None:  # pad() does not know offsets: pad them with (0, 0) like the tokenizers library
            lengths = [len(row) for row in ([out["input_ids"]] if flat else out["input_ids"])]
            side = padding_side or self.padding_side
            offsets = [
                ([(0, 0)] * (n - len(o)) + o) if side == "left" else (o + [(0, 0)] * (n - len(o)))
                for o, n in zip(offsets, lengths)
            ]
            out["offset_mapping"] = offsets[0] if flat else offsets
        return BatchEncoding(dict(out), tensor_type=return_tensors)
