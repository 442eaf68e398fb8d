"""Specification of the RWKV tokenizers (rwkv_hf/tokenization_rwkv_hf.py).

* ``RwkvWorldTokenizer`` gives the ids of the official ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER`` on every vocabulary
  token and on a generated multilingual / code / emoji / whitespace / random-unicode corpus; id 0 is the special
  ``<|endoftext|>``; decoding never fails (invalid UTF-8 -> U+FFFD, ids without a token -> "").
* ``Rwkv20BTokenizer`` is the ``tokenizers`` 20B tokenizer plus ChatRWKV's ``fix_tokens``.
* Both: ChatGLM3-style ``build_chat_input`` / ``get_command``, and a chat template that renders the same text.

Official-parity tests skip when the ``rwkv`` package is not installed.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random

import pytest
import torch
from jinja2.exceptions import TemplateError
from tokenizers import AddedToken
from transformers import PreTrainedTokenizer

from rwkv_hf import tokenization_rwkv_hf
from rwkv_hf.tokenization_rwkv_hf import (
    RWKV_CHAT_TEMPLATE,
    TOKENIZER_20B_FILE,
    WORLD_VOCAB_FILE,
    Rwkv20BTokenizer,
    RwkvWorldTokenizer,
    clean_chat_content,
)


# ------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> RwkvWorldTokenizer:
    return RwkvWorldTokenizer()


@pytest.fixture(scope="module")
def neox() -> Rwkv20BTokenizer:
    return Rwkv20BTokenizer()


@pytest.fixture(scope="module")
def official(world):
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    return rwkv_tokenizer.TRIE_TOKENIZER(world.vocab_file)


@pytest.fixture(scope="module", params=["world", "20b"])
def any_tokenizer(request, world, neox):
    return world if request.param == "world" else neox


def vocab_bytes(world: RwkvWorldTokenizer) -> list[tuple[int, bytes]]:
    return [(i, world._vocab.id_to_bytes[i]) for i in range(1, world.vocab_size)]


# ------------------------------------------------------------------------------------------------------------
# a generated corpus: scripts, emoji, code, whitespace, random unicode
# ------------------------------------------------------------------------------------------------------------

SCRIPT_RANGES = {
    "cjk": (0x4E00, 0x9FFF),
    "hiragana": (0x3040, 0x309F),
    "hangul": (0xAC00, 0xD7A3),
    "cyrillic": (0x0400, 0x04FF),
    "arabic": (0x0600, 0x06FF),
    "devanagari": (0x0900, 0x097F),
    "greek": (0x0370, 0x03FF),
    "thai": (0x0E00, 0x0E7F),
    "latin-ext": (0x00C0, 0x024F),
}
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🧑🏿‍💻", "🇯🇵", "✨", "👩‍❤️‍💋‍👨", "🫠", "1️⃣"]
CODE = [
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    '{"key": [1, 2.5, null], "k2": "v"}',
    "SELECT * FROM t WHERE id = 42;",
    "<div class=\"a\">&nbsp;</div>",
    "x = y if z else w  # comment\n",
    "    \n\t\n",
    "http://example.com/path?q=1&r=%20",
]
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", " \n ", "\n    ", "\u3000", "\u00a0"]
WORDS = ["the", " the", "The", " and", "unbelievable", "你好", "世界", "Привет", "мир", "مرحبا", "नमस्ते", "12345", " 7"]


def random_unicode(rng: random.Random, n: int) -> str:
    """Random code points: mostly BMP, some astral, no surrogates (UTF-8 cannot encode them)."""
    chars = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            cp = rng.randint(0x20, 0x7E)
        elif kind < 0.85:
            cp = rng.randint(0x80, 0xFFFF)
        else:
            cp = rng.randint(0x10000, 0x10FFFF)
        if 0xD800 <= cp <= 0xDFFF:
            cp = 0xFFFD
        chars.append(chr(cp))
    return "".join(chars)


def random_text(rng: random.Random, n_pieces: int) -> str:
    pieces = []
    for _ in range(n_pieces):
        kind = rng.random()
        if kind < 0.3:
            lo, hi = rng.choice(list(SCRIPT_RANGES.values()))
            pieces.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12))))
        elif kind < 0.4:
            pieces.append(rng.choice(EMOJI))
        elif kind < 0.5:
            pieces.append(rng.choice(CODE))
        elif kind < 0.65:
            pieces.append(rng.choice(WHITESPACE))
        elif kind < 0.85:
            pieces.append(rng.choice(WORDS))
        else:
            pieces.append(random_unicode(rng, rng.randint(1, 8)))
    return "".join(pieces)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """2000 short texts and 20 long ones (about 250k characters in all), seeded."""
    rng = random.Random(20230424)
    texts = [random_text(rng, rng.randint(1, 12)) for _ in range(2000)]
    texts += [random_text(rng, 1000) for _ in range(20)]
    assert not any("<|endoftext|>" in t for t in texts)
    return texts


# ------------------------------------------------------------------------------------------------------------
# World: encoding parity with the official TRIE_TOKENIZER
# ------------------------------------------------------------------------------------------------------------


def test_world_every_vocab_token_encodes_to_itself_like_official(world, official):
    for idx, token in vocab_bytes(world):
        assert world.encode_bytes(token) == official.encodeBytes(token) == [idx], (idx, token)


def decodable_vocab_texts(world: RwkvWorldTokenizer) -> list[str]:
    """Every vocabulary token that is valid UTF-8 on its own, as text."""
    texts = []
    for _, token in vocab_bytes(world):
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text != "<|endoftext|>":  # not in this vocabulary, but it would be split out as the special token
            texts.append(text)
    assert len(texts) > 65000
    return texts


def test_world_every_decodable_vocab_token_encodes_like_official_through_every_path(world, official):
    texts = decodable_vocab_texts(world)
    expected = [official.encode(text) for text in texts]
    assert [world.encode_ordinary(t) for t in texts] == expected
    assert world(texts)["input_ids"] == expected  # the transformers path: __call__ -> tokenize -> ids


def test_world_corpus_encodes_like_official(world, official, corpus):
    for text in corpus:
        assert world.encode_ordinary(text) == official.encode(text), repr(text)


def test_world_corpus_encodes_like_official_through_tokenizer_call(world, official, corpus):
    assert world(corpus)["input_ids"] == [official.encode(t) for t in corpus]
    assert world.encode(corpus[-1]) == official.encode(corpus[-1])


def test_world_random_bytes_encode_like_official(world, official):
    rng = random.Random(7)
    for _ in range(300):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        assert world.encode_bytes(data) == official.encodeBytes(data), data


def test_world_concatenated_vocabulary_encodes_like_official(world, official):
    # every token followed by every other: greedy matching across token boundaries
    data = b"".join(token for _, token in vocab_bytes(world))
    assert world.encode_bytes(data) == official.encodeBytes(data)


def test_world_double_newline_is_token_261(world):
    assert world.encode("\n\n") == [261]
    assert world("\n\n")["input_ids"] == [261]


def test_world_greedy_longest_match_is_not_bpe(world):
    assert world.tokenize("unbelievable") == ["un", "bel", "iev", "able"]


def test_world_tokenize_returns_token_bytes_as_latin1(world):
    tokens = world.tokenize("é你")
    assert "".join(tokens).encode("latin-1") == "é你".encode("utf-8")
    assert world.convert_tokens_to_string(tokens) == "é你"


def test_world_adds_no_bos_or_eos(world):
    assert world("hello")["input_ids"] == world.encode_ordinary("hello")
    assert world.encode("hello", add_special_tokens=True) == world.encode_ordinary("hello")


# ------------------------------------------------------------------------------------------------------------
# World: special token, vocabulary size, padding
# ------------------------------------------------------------------------------------------------------------


def test_world_endoftext_is_special_id_0(world):
    assert world.eos_token == world.bos_token == world.pad_token == "<|endoftext|>"
    assert world.eos_token_id == world.bos_token_id == world.pad_token_id == 0
    assert world("a<|endoftext|>b")["input_ids"] == world.encode_ordinary("a") + [0] + world.encode_ordinary("b")


def test_world_split_special_tokens_encodes_endoftext_as_plain_text_like_official(world, official):
    text = "doc one<|endoftext|>doc two"
    assert world(text, split_special_tokens=True)["input_ids"] == official.encode(text)
    assert world.encode_ordinary(text) == official.encode(text)


def test_world_vocab_size_is_65530_ids_including_0(world):
    assert world.vocab_size == 65530
    assert len(world) == 65530
    vocab = world.get_vocab()
    assert len(vocab) == 65530 and vocab["<|endoftext|>"] == 0 and vocab["\n\n"] == 261


def test_world_added_tokens_get_ids_from_65530_and_split_like_base_class():
    tok = RwkvWorldTokenizer()
    tok.add_tokens(["<|user|>", "<tool>", AddedToken("<sep>", lstrip=True, rstrip=True)])
    assert tok.convert_tokens_to_ids(["<|user|>", "<tool>", "<sep>"]) == [65530, 65531, 65532]
    texts = ["hi<|user|>there", "<tool> x <tool><|endoftext|>", "no added tokens", "<|user|>", "a  <sep>  b<sep>"]
    for text in texts:
        assert tok.tokenize(text) == PreTrainedTokenizer.tokenize(tok, text), text
    assert tok.decode(tok.encode("a<tool>b")) == "a<tool>b"


def test_world_pads_on_the_left_with_id_0(world):
    batch = world(["hi", "hello world, how are you"], padding=True, return_tensors="pt")
    short = world.encode_ordinary("hi")
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][0].tolist() == [0] * (width - len(short)) + short
    assert batch["attention_mask"][0].tolist() == [0] * (width - len(short)) + [1] * len(short)


# ------------------------------------------------------------------------------------------------------------
# World: decoding
# ------------------------------------------------------------------------------------------------------------


def test_world_decodes_every_id_like_official_where_official_succeeds(world, official):
    for idx, token in vocab_bytes(world):
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            # official: one U+FFFD for the whole text; here: U+FFFD for the broken bytes only
            assert official.decode([idx]) == "\ufffd"
            assert world.decode([idx]) == token.decode("utf-8", errors="replace")
        else:
            assert world.decode([idx]) == official.decode([idx]) == text


def test_world_decodes_all_ids_together(world, official):
    ids = list(range(1, world.vocab_size))
    assert world.decode(ids) == official.decodeBytes(ids).decode("utf-8", errors="replace")


def test_world_corpus_round_trips(world, corpus):
    for text in corpus:
        assert world.decode(world.encode(text)) == text


def test_world_invalid_utf8_decodes_with_replacement_characters(world, official):
    ids = world.encode_ordinary("ab") + world.encode_bytes("你".encode("utf-8")[:2])  # a cut-off character
    assert world.decode(ids) == "ab\ufffd"
    assert official.decode(ids) == "\ufffd"  # the official one gives up on the whole text
    assert world.decode(world.encode_bytes(b"\xff\xfe") + world.encode_ordinary("ok")) == "\ufffd\ufffdok"


def test_world_decode_of_id_0_is_endoftext_or_nothing(world):
    assert world.decode([0]) == "<|endoftext|>"
    assert world.decode([0] + world.encode_ordinary("x"), skip_special_tokens=True) == "x"


@pytest.mark.parametrize("idx", range(65530, 65536))
def test_world_ids_beyond_the_vocabulary_decode_to_nothing(world, idx):
    assert world.decode([idx]) == ""
    assert world.decode(world.encode_ordinary("a") + [idx] + world.encode_ordinary("b")) == "ab"
    assert world.convert_ids_to_tokens([idx]) == [""]


def test_world_decode_of_growing_prefixes_never_fails(world):
    ids = world.encode("Grüße 你好 👨‍👩‍👧‍👦!")
    for n in range(len(ids) + 1):
        assert isinstance(world.decode(ids[:n]), str)  # what a streamer does on every new token


# ------------------------------------------------------------------------------------------------------------
# World: saving and loading
# ------------------------------------------------------------------------------------------------------------


def test_world_save_and_from_pretrained_round_trip(world, tmp_path):
    files = world.save_pretrained(tmp_path)
    assert (tmp_path / WORLD_VOCAB_FILE).read_bytes() == open(world.vocab_file, "rb").read()
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == RWKV_CHAT_TEMPLATE
    assert str(tmp_path / "tokenizer_config.json") in files
    loaded = RwkvWorldTokenizer.from_pretrained(tmp_path)
    assert loaded.vocab_file == str(tmp_path / WORLD_VOCAB_FILE)
    text = "Hello 你好<|endoftext|>\n\n"
    assert loaded(text)["input_ids"] == world(text)["input_ids"]
    assert loaded.decode([0, 261]) == "<|endoftext|>\n\n"
    assert loaded.padding_side == "left" and loaded.chat_template == RWKV_CHAT_TEMPLATE
    assert loaded.eos_token_id == loaded.pad_token_id == 0


def test_world_saved_added_tokens_reload(tmp_path):
    tok = RwkvWorldTokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(tmp_path)
    loaded = RwkvWorldTokenizer.from_pretrained(tmp_path)
    assert loaded.encode("a<|tool|>") == tok.encode("a<|tool|>") == loaded.encode_ordinary("a") + [65530]


def test_world_save_vocabulary_writes_the_file_format_when_the_source_is_gone(world, tmp_path):
    tok = RwkvWorldTokenizer()
    tok.vocab_file = str(tmp_path / "deleted.txt")
    (out,) = tok.save_vocabulary(str(tmp_path))
    again = RwkvWorldTokenizer(vocab_file=out)
    assert again._vocab.id_to_bytes == world._vocab.id_to_bytes


def test_world_pickles_and_deep_copies(world):
    world.decode([261])
    for copied in (pickle.loads(pickle.dumps(world)), copy.deepcopy(world)):
        assert copied("Hi\n\n<|endoftext|>")["input_ids"] == world("Hi\n\n<|endoftext|>")["input_ids"]
        assert copied.decode([0, 261]) == "<|endoftext|>\n\n"


def test_world_missing_vocab_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=WORLD_VOCAB_FILE):
        RwkvWorldTokenizer(vocab_file=str(tmp_path / "nope.txt"))


# ------------------------------------------------------------------------------------------------------------
# 20B tokenizer and fix_tokens
# ------------------------------------------------------------------------------------------------------------


def test_20b_trailing_double_newline_token_becomes_two_newlines(neox):
    assert neox.backend_tokenizer.encode("Hello\n\n").ids[-1] == 535
    assert neox("Hello\n\n")["input_ids"] == neox.backend_tokenizer.encode("Hello").ids + [187, 187]
    assert neox.encode("\n\n") == [187, 187]


def test_20b_double_newline_inside_the_text_is_untouched(neox):
    ids = neox("a\n\nb")["input_ids"]
    assert ids == neox.backend_tokenizer.encode("a\n\nb").ids == [66, 187, 187, 67]


def test_20b_only_a_final_535_is_fixed(neox):
    assert neox("a\n\n\n")["input_ids"] == neox.backend_tokenizer.encode("a\n\n\n").ids  # one token, 2756
    assert neox("a\n\n<|endoftext|>")["input_ids"][-2:] == [535, 0]  # 535 is not last


def test_20b_fix_can_be_turned_off(neox):
    tok = Rwkv20BTokenizer(fix_trailing_double_newline=False)
    assert tok("Hello\n\n")["input_ids"][-1] == 535


def test_20b_fix_tokens_is_chatrwkvs_rule():
    assert Rwkv20BTokenizer.fix_tokens([1, 535]) == [1, 187, 187]
    assert Rwkv20BTokenizer.fix_tokens([535, 1]) == [535, 1]
    assert Rwkv20BTokenizer.fix_tokens([]) == []


def test_20b_matches_chatrwkv_pipeline_on_corpus(neox, corpus):
    from tokenizers import Tokenizer

    pipeline = Tokenizer.from_file(os.path.join(os.path.dirname(tokenization_rwkv_hf.__file__), TOKENIZER_20B_FILE))
    texts = corpus[:500] + [t + "\n\n" for t in corpus[:100]]
    assert neox(texts)["input_ids"] == [Rwkv20BTokenizer.fix_tokens(e.ids) for e in pipeline.encode_batch(texts)]


def test_20b_batch_with_a_fixed_row_pads_on_the_left(neox):
    batch = neox(["x\n\n", "hello there my friend"], padding=True, return_tensors="pt")
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][0].tolist() == [0] * (width - 3) + [89, 187, 187]
    assert batch["attention_mask"][0].tolist() == [0] * (width - 3) + [1, 1, 1]


def test_20b_single_fixed_text_as_tensors_has_batch_axis(neox):
    out = neox("x\n\n", return_tensors="pt")
    assert out["input_ids"].tolist() == [[89, 187, 187]]
    assert out["attention_mask"].tolist() == [[1, 1, 1]]


def test_20b_fixed_offsets_cover_one_newline_each(neox):
    out = neox("x\n\n", return_offsets_mapping=True)
    assert out["offset_mapping"] == [(0, 1), (1, 2), (2, 3)]


def test_20b_tokenize_shows_the_fixed_tokens(neox):
    assert neox.tokenize("a\n\n") == ["a", "Ċ", "Ċ"]


def test_20b_decodes_ids_beyond_the_vocabulary_to_nothing(neox):
    assert neox.decode([66, 50277, 50300, 187]) == "a\n"


def test_20b_adds_no_bos_and_pads_left(neox):
    assert neox("hi")["input_ids"] == neox.backend_tokenizer.encode("hi").ids
    assert neox.padding_side == "left" and neox.pad_token_id == 0 and neox.eos_token_id == 0


def test_20b_pickles_with_its_options():
    tok = pickle.loads(pickle.dumps(Rwkv20BTokenizer(fix_trailing_double_newline=False)))
    assert tok("a\n\n")["input_ids"] == [66, 535]


def test_20b_save_and_from_pretrained_round_trip(tmp_path):
    tok = Rwkv20BTokenizer(fix_trailing_double_newline=False)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = Rwkv20BTokenizer.from_pretrained(tmp_path)
    assert loaded.fix_trailing_double_newline is False
    assert loaded("a\n\n")["input_ids"] == [66, 535]
    assert loaded.chat_template == RWKV_CHAT_TEMPLATE and loaded.padding_side == "left"
    forced = Rwkv20BTokenizer.from_pretrained(tmp_path, fix_trailing_double_newline=True)
    assert forced("a\n\n")["input_ids"] == [66, 187, 187]


# ------------------------------------------------------------------------------------------------------------
# chat: rendering
# ------------------------------------------------------------------------------------------------------------

HISTORY = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
]


def test_build_chat_input_renders_rwkv_format(any_tokenizer):
    out = any_tokenizer.build_chat_input("What is 2+2?", history=HISTORY)
    expected = (
        "System: You are helpful.\n\nUser: Hi\n\nAssistant: Hello! How can I help?\n\n"
        "User: What is 2+2?\n\nAssistant:"
    )
    assert any_tokenizer.build_chat_prompt("What is 2+2?", history=HISTORY) == expected
    assert any_tokenizer.decode(out["input_ids"][0]) == expected


def test_build_chat_input_returns_batch_of_one_as_tensors(any_tokenizer):
    out = any_tokenizer.build_chat_input("hi")
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    assert isinstance(out["input_ids"], torch.Tensor) and out["input_ids"].shape[0] == 1
    assert out["attention_mask"].tolist() == [[1] * out["input_ids"].shape[1]]


def test_build_chat_input_without_history(world):
    assert world.build_chat_prompt("你好") == "User: 你好\n\nAssistant:"
    assert world.build_chat_input("你好")["input_ids"][0].tolist() == world.encode_ordinary("User: 你好\n\nAssistant:")


def test_observation_role_is_rendered_as_observation(world):
    prompt = world.build_chat_prompt('{"temp": 20}', history=HISTORY[1:], role="observation")
    assert prompt.endswith('\n\nObservation: {"temp": 20}\n\nAssistant:')


def test_chat_content_is_stripped_and_blank_lines_collapsed(world):
    prompt = world.build_chat_prompt("  line one\r\n\r\n\r\nline two\n\n\n\nthree  ")
    assert prompt == "User: line one\nline two\nthree\n\nAssistant:"


def test_clean_chat_content_rules():
    assert clean_chat_content("\r\n a\r\n\r\nb \n") == "a\nb"
    assert clean_chat_content("a\n \nb") == "a\n \nb"  # not a blank line: the turn cannot end there


def test_raw_keeps_content_as_given(world):
    assert world.build_chat_prompt(" a\n\nb ", raw=True) == "User:  a\n\nb \n\nAssistant:"


def test_no_generation_prompt_ends_with_the_turn_separator(world, neox):
    assert world.build_chat_prompt("hi", add_generation_prompt=False) == "User: hi\n\n"
    assert world.build_chat_input("hi", add_generation_prompt=False)["input_ids"][0, -1].item() == 261
    assert neox.build_chat_input("hi", add_generation_prompt=False)["input_ids"][0, -2:].tolist() == [187, 187]


def test_system_tools_are_appended_as_json(world):
    tools = [{"name": "get_weather", "description": "天气", "parameters": {"city": "str"}}]
    history = [{"role": "system", "content": "Use tools.", "tools": tools}]
    prompt = world.build_chat_prompt("Weather in Paris?", history=history)
    assert prompt.startswith("System: Use tools.\n" + json.dumps(tools, indent=4, ensure_ascii=False) + "\n\nUser:")


def test_tools_argument_without_system_message_becomes_a_system_turn(world):
    prompt = world.build_chat_prompt("hi", tools=[{"name": "f"}])
    assert prompt == 'System: [\n    {\n        "name": "f"\n    }\n]\n\nUser: hi\n\nAssistant:'


def test_metadata_goes_on_the_line_before_the_content(world):
    history = [{"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='Paris')\n```"}]
    prompt = world.build_chat_prompt("{}", history=history, role="observation")
    assert prompt.startswith("Assistant: get_weather\n```python\ntool_call(city='Paris')\n```\n\nObservation: {}")


def test_endoftext_typed_in_a_message_stays_text(world):
    ids = world.build_chat_input("say <|endoftext|>")["input_ids"][0].tolist()
    assert 0 not in ids
    assert world.decode(ids) == "User: say <|endoftext|>\n\nAssistant:"


def test_prefix_turn_end_starts_the_turn_with_the_separator_a_state_is_missing(world, neox):
    assert world.build_chat_prompt("hi", prefix_turn_end=True) == "\n\nUser: hi\n\nAssistant:"
    ids = world.build_chat_input("hi", prefix_turn_end=True)["input_ids"][0].tolist()
    assert ids == [261] + world.encode_ordinary("User: hi\n\nAssistant:")
    assert neox.build_chat_input("hi", prefix_turn_end=True)["input_ids"][0, :2].tolist() == [187, 187]


def test_build_chat_input_leaves_special_token_handling_as_it_was(neox):
    neox.build_chat_input("say <|endoftext|>")
    assert neox.backend_tokenizer.encode("a<|endoftext|>").ids[-1] == 0
    assert neox("a<|endoftext|>")["input_ids"][-1] == 0


def test_empty_observation_query_is_allowed(world):
    assert world.build_chat_prompt("", role="observation") == "Observation: \n\nAssistant:"


# ------------------------------------------------------------------------------------------------------------
# chat: template == build_chat_input
# ------------------------------------------------------------------------------------------------------------


def random_conversation(rng: random.Random) -> tuple[list[dict], str, str]:
    def text() -> str:
        pieces = ["a", " b", "你好", "\n", "\n\n\n", "\r\n", "  ", "\t", "é", "😀", "x\n\ny"]
        return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))

    history = []
    if rng.random() < 0.5:
        system = {"role": "system", "content": text()}
        if rng.random() < 0.5:
            system["tools"] = [{"name": "f", "description": text(), "parameters": {"x": "int"}}]
        history.append(system)
    for _ in range(rng.randint(0, 5)):
        message = {"role": rng.choice(["user", "assistant", "observation"]), "content": text()}
        if message["role"] == "assistant" and rng.random() < 0.3:
            message["metadata"] = rng.choice(["get_weather", "", " tool "])
        history.append(message)
    role = rng.choice(["user", "user", "observation"])
    query = text() + "q"
    return history, query, role


def test_chat_template_renders_the_same_text_as_build_chat_prompt(any_tokenizer):
    rng = random.Random(3)
    for _ in range(200):
        history, query, role = random_conversation(rng)
        messages = history + [{"role": role, "content": query}]
        for gen in (True, False):
            rendered = any_tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert rendered == any_tokenizer.build_chat_prompt(query, history, role, add_generation_prompt=gen)


def test_chat_template_gives_the_same_ids_as_build_chat_input(any_tokenizer):
    rng = random.Random(4)
    for _ in range(50):
        history, query, role = random_conversation(rng)
        messages = history + [{"role": role, "content": query}]
        ids = any_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        assert torch.equal(ids["input_ids"], any_tokenizer.build_chat_input(query, history, role)["input_ids"])


def test_chat_template_collapses_blank_lines_like_python(world):
    messages = [{"role": "user", "content": "a\n\n\nb\n\n\n\n\n\n\n\n\n\nc"}]
    rendered = world.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == world.build_chat_prompt(messages[0]["content"]) == "User: a\nb\nc\n\nAssistant:"


def test_chat_template_raw_keeps_blank_lines(world):
    messages = [{"role": "user", "content": "a\n\n\nb"}]
    rendered = world.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, raw=True)
    assert rendered == world.build_chat_prompt("a\n\n\nb", raw=True) == "User: a\n\n\nb\n\nAssistant:"


def test_chat_template_tools_argument_matches_build_chat_prompt(world):
    tools = [{"name": "f", "description": "d"}]
    user = {"role": "user", "content": "hi"}
    for messages in ([user], [{"role": "system", "content": "S"}, user]):
        rendered = world.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        assert rendered == world.build_chat_prompt("hi", messages[:-1], tools=tools)


def test_chat_template_prefix_turn_end_matches_build_chat_prompt(world):
    messages = [{"role": "observation", "content": "42"}]
    rendered = world.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, prefix_turn_end=True)
    assert rendered == world.build_chat_prompt("42", role="observation", prefix_turn_end=True)


def test_chat_template_continues_a_final_assistant_message(world):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "The answer is"}]
    rendered = world.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert rendered == "User: 2+2?\n\nAssistant: The answer is"


def test_chat_template_is_set_without_any_file(world, neox):
    assert world.chat_template == neox.chat_template == RWKV_CHAT_TEMPLATE


# ------------------------------------------------------------------------------------------------------------
# chat: get_command and turn ends
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["<|user|>", "<|observation|>", "<|assistant|>", "<|system|>"])
def test_get_command_role_tokens_return_the_double_newline_id(world, neox, command):
    assert world.get_command(command) == 261
    assert neox.get_command(command) == 535


def test_chatglm3_stop_ids_stop_at_the_end_of_the_reply(world):
    eos = [world.eos_token_id, world.get_command("<|user|>"), world.get_command("<|observation|>")]
    assert eos == [0, 261, 261]
    # what the model writes: the reply, the blank line, the next role; generation stops at the first stop id
    written = world.encode_ordinary(" Four.\n\nUser:")
    stop = next(i for i, t in enumerate(written) if t in eos)
    assert world.decode(written[:stop]) == " Four." and world.decode(written[stop + 1 :]) == "User:"


def test_get_command_named_special_tokens(world):
    assert world.get_command("<eos>") == world.get_command("<bos>") == world.get_command("<pad>") == 0
    assert world.get_command("<|endoftext|>") == 0


def test_get_command_unknown_token_lists_the_accepted_ones(world):
    with pytest.raises(ValueError, match=r"unknown token '\[gMASK\]'.*<\|user\|>.*<\|observation\|>"):
        world.get_command("[gMASK]")


def test_turn_end_ids_are_the_whitespace_tokens_containing_a_blank_line(world, neox):
    assert world.turn_end_id == 261 and neox.turn_end_id == 535
    for tok in (world, neox):
        ids = tok.turn_end_ids
        assert ids[0] == tok.turn_end_id and len(ids) == len(set(ids)) > 10
        for idx in ids:
            text = tok.decode([idx])
            assert "\n\n" in text and text.strip() == ""
    assert 3328 in world.turn_end_ids  # "\n\n\n"
    assert world.turn_end_text == "\n\n"


# ------------------------------------------------------------------------------------------------------------
# chat: bad input
# ------------------------------------------------------------------------------------------------------------

EXPECTED_ROLES = r"expected one of 'system', 'user', 'assistant', 'observation'"

BAD_INPUTS = [  # (build_chat_input kwargs, error, message), id = the mistake
    pytest.param(
        dict(query="hi", history={"role": "user", "content": "x"}), TypeError, r"history must be a list of dicts",
        id="history-not-a-list",
    ),
    pytest.param(
        dict(query="hi", history=[("hi", "hello")]), TypeError, r"history\[0\] must be a dict",
        id="history-item-not-a-dict",
    ),
    pytest.param(
        dict(query="hi", history=[{"content": "x"}]), ValueError, r"history\[0\] has no 'role'; " + EXPECTED_ROLES,
        id="missing-role",
    ),
    pytest.param(
        dict(query="hi", history=[{"role": "bot", "content": "x"}]), ValueError,
        r"history\[0\]: unknown role 'bot'; " + EXPECTED_ROLES,
        id="unknown-history-role",
    ),
    pytest.param(dict(query="hi", role="tool"), ValueError, r"unknown role 'tool'; " + EXPECTED_ROLES, id="unknown-query-role"),
    pytest.param(
        dict(query="hi", history=[{"role": "user"}]), ValueError, r"history\[0\] \(role 'user'\) has no 'content'",
        id="missing-content",
    ),
    pytest.param(
        dict(query="hi", history=[{"role": "user", "content": ["a"]}]), TypeError,
        r"history\[0\]: 'content' must be a str, got list",
        id="content-not-str",
    ),
    pytest.param(
        dict(query="hi", history=[{"role": "assistant", "content": None}]), TypeError,
        r"'content' must be a str, got NoneType",
        id="content-none",
    ),
    pytest.param(dict(query=None), TypeError, r"query must be a str, got NoneType", id="query-not-str"),
    pytest.param(dict(query=""), ValueError, r"the query is empty", id="empty-query"),
    pytest.param(dict(query=" \r\n\n "), ValueError, r"the query is empty", id="whitespace-query"),
    pytest.param(dict(query="", raw=True), ValueError, r"the query is empty", id="empty-raw-query"),
    pytest.param(
        dict(query="hi", history=[{"role": "user", "content": "x", "tools": []}]), ValueError,
        r"'tools' are only allowed on a 'system' message",
        id="tools-not-on-system",
    ),
    pytest.param(
        dict(query="hi", history=[{"role": "assistant", "content": "x", "metadata": 3}]), TypeError,
        r"'metadata' must be a str, got int",
        id="metadata-not-str",
    ),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_INPUTS)
def test_build_chat_input_rejects_bad_input(any_tokenizer, kwargs, error, message):
    with pytest.raises(error, match=message):
        any_tokenizer.build_chat_input(**kwargs)


BAD_TEMPLATE_INPUTS = [  # (messages, message), id = the mistake
    pytest.param([{"role": "bot", "content": "x"}], r"unknown role bot; " + EXPECTED_ROLES, id="unknown-role"),
    pytest.param([{"content": "x"}], r"unknown role \(missing\)", id="missing-role"),
    pytest.param([{"role": "user"}], r"has no 'content'", id="missing-content"),
    pytest.param([{"role": "user", "content": None}], r"has no 'content'", id="content-none"),
    pytest.param([{"role": "user", "content": 5}], r"'content' must be a string", id="content-not-str"),
    pytest.param(
        [{"role": "user", "content": "x", "tools": []}], r"'tools' are only allowed on a 'system' message",
        id="tools-not-on-system",
    ),
    pytest.param(
        [{"role": "assistant", "content": "x", "metadata": 3}], r"'metadata' must be a string", id="metadata-not-str"
    ),
    pytest.param([{"role": "user", "content": "  "}], r"the user message is empty", id="empty-user-message"),
]


@pytest.mark.parametrize("messages, message", BAD_TEMPLATE_INPUTS)
def test_chat_template_rejects_bad_input(world, messages, message):
    with pytest.raises(TemplateError, match=message):
        world.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
