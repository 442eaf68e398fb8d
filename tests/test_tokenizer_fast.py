"""The fast World tokenizer (``tokenizers`` backend) against the slow one and the official TRIE_TOKENIZER.

The slow ``RwkvWorldTokenizer`` stays the reference; the fast one must give its ids on every vocabulary entry and on
the generated multilingual corpus of test_tokenizer.py, decode the same, and add what only a ``tokenizers``
backend gives (offsets, assistant masks, ``tokenizer.json``).
"""

import json
import pickle
import random

import pytest
from test_tokenizer import corpus, decodable_vocab_texts, official, world  # noqa: F401  (fixtures)
from transformers import AutoTokenizer

from rwkv_hf import RwkvConfig
from rwkv_hf.tokenization_rwkv_hf import WORLD_VOCAB_FILE, RwkvWorldTokenizer, RwkvWorldTokenizerFast


@pytest.fixture(scope="module")
def fast() -> RwkvWorldTokenizerFast:
    return RwkvWorldTokenizerFast()


def test_every_decodable_vocab_token_encodes_like_official(fast, world, official):  # noqa: F811
    texts = decodable_vocab_texts(world)
    expected = [official.encode(text) for text in texts]
    assert fast(texts, add_special_tokens=False)["input_ids"] == expected


def test_corpus_encodes_like_official_and_the_slow_tokenizer(fast, world, official, corpus):  # noqa: F811
    expected = [official.encode(t) for t in corpus]
    assert fast(corpus)["input_ids"] == expected
    assert world(corpus)["input_ids"] == expected
    assert [fast.encode(t) for t in corpus[-20:]] == expected[-20:]


def test_endoftext_is_the_special_id_0_and_text_around_it_encodes_alone(fast, world):  # noqa: F811
    text = "Hello\n\n<|endoftext|>User: hi"
    assert fast(text)["input_ids"] == world(text)["input_ids"]
    assert 0 in fast(text)["input_ids"]
    assert fast.decode(fast(text)["input_ids"], skip_special_tokens=True) == "Hello\n\nUser: hi"


def test_decoding_equals_the_slow_tokenizer_even_on_broken_utf8(fast, world, corpus):  # noqa: F811
    rng = random.Random(7)
    for text in corpus[:300]:
        ids = world.encode(text)
        assert fast.decode(ids) == world.decode(ids) == text
    for _ in range(300):  # random ids: cut-off and invalid UTF-8, id 0, ids past the vocabulary
        ids = [rng.choice([0, rng.randrange(1, 257), rng.randrange(257, 65536)]) for _ in range(rng.randint(1, 12))]
        assert fast.decode(ids) == world.decode(ids), ids


def test_sizes_and_chat_helpers_match(fast, world):  # noqa: F811
    assert fast.vocab_size == world.vocab_size == 65530 and len(fast) == len(world)
    assert fast.turn_end_id == world.turn_end_id == 261 and fast.turn_end_ids == world.turn_end_ids
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert fast.build_chat_input("2+2?", history)["input_ids"].tolist() == world.build_chat_input("2+2?", history)["input_ids"].tolist()
    assert fast.encode_ordinary("<|endoftext|>") == world.encode_ordinary("<|endoftext|>")


def test_offsets_point_at_each_tokens_text(fast):
    text = "Hello world, 你好! 🚀 ok"
    encoding = fast(text, return_offsets_mapping=True)
    for idx, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        piece = fast._vocab.id_to_bytes[idx]
        if text[start:end].encode("utf-8") == piece:
            continue
        # a token holding part of a character maps to that whole character
        assert piece in text[start:end].encode("utf-8"), (idx, piece, text[start:end])


def test_auto_tokenizer_gives_the_fast_one_and_saves_both_files(tmp_path, fast):
    fast.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / WORLD_VOCAB_FILE).is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, RwkvWorldTokenizerFast)
    assert loaded("a b\n\nc")["input_ids"] == fast("a b\n\nc")["input_ids"]
    assert isinstance(RwkvWorldTokenizer.from_pretrained(tmp_path), RwkvWorldTokenizer)  # the reference, on request
    assert AutoTokenizer.from_pretrained(tmp_path, config=RwkvConfig()).__class__ is RwkvWorldTokenizerFast


def test_pickles_for_datasets_map(fast):
    clone = pickle.loads(pickle.dumps(fast))
    assert clone("pickled ok")["input_ids"] == fast("pickled ok")["input_ids"]


# ---------------------------------------------------------------------------------------------------------
# Bad input: a tokenizer.json that is not the vocabulary's
# ---------------------------------------------------------------------------------------------------------


def test_a_tokenizer_json_for_another_vocabulary_is_refused(tmp_path, fast):
    fast.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġand"] = vocab["Ġand"], vocab["Ġthe"]  # two ids swapped
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"does not match the vocabulary .*rwkv_vocab_v20230424.txt: 4 \(token, id\) pairs differ"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_a_tokenizer_json_with_another_split_is_refused(tmp_path, fast):
    fast.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="its pre_tokenizer differs from the RWKV World tokenizer"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_an_unreadable_tokenizer_json_is_refused(tmp_path, fast):
    fast.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_the_chat_template_marks_what_the_assistant_writes(fast):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]
    out = fast.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert fast.decode(ids) == "User: What is 2+2?\n\nAssistant: 4.\n\nUser: And 3+3?\n\nAssistant: 6.\n\n"
    marked = [i for i, m in zip(ids, mask) if m]
    assert fast.decode(marked) == " 4.\n\n 6.\n\n"  # the replies and their turn ends, never a prompt
    assert fast.turn_end_id in marked
