"""Careless and hostile use of the model, the cache, the tokenizer, the chat API and the chat CLI.

Each test is one attack from the hardening review (or one of its family), named for what it proves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from model_factory import VERSIONS, random_ids, tiny_model
from rwkv_hf import RwkvCache
from rwkv_hf.chat_rwkv_hf import parse_tool_call


@pytest.fixture(params=VERSIONS, ids=lambda v: f"v{v}")
def model(request):
    return tiny_model(request.param)


# --- the cache ----------------------------------------------------------------------------------------------


def test_cache_operations_work_with_autograd_on():
    model = tiny_model("7")
    state = model(random_ids(1, 4), use_cache=True).cache  # grad is on, as after from_pretrained
    assert state.wkv_state(0).requires_grad or state.shift_state(0, 0).requires_grad
    copy = state.clone()
    frozen = state.clone().freeze()
    model(random_ids(1, 2), cache=frozen, use_cache=True)
    both = RwkvCache.stack([state, copy])
    assert both.batch_size == 2 and frozen.get_seq_length() == 4


def test_a_cache_from_a_model_of_another_width_is_refused_naming_both_shapes():
    narrow = tiny_model("7", n_embd=64)
    wide = tiny_model("7", n_embd=96)
    state = narrow(random_ids(1, 3), use_cache=True).cache
    with pytest.raises(ValueError, match=r"\[64\].*this model needs \[96\]"):
        wide(random_ids(1, 3), cache=state)
    other_heads = tiny_model("6", head_size=32)
    with pytest.raises(ValueError, match="another model"):
        other_heads(random_ids(1, 3), cache=tiny_model("6")(random_ids(1, 3), use_cache=True).cache)


def test_a_cache_being_advanced_by_another_forward_is_refused():
    model = tiny_model("7")
    state = model(random_ids(1, 3), use_cache=True).cache
    with state.exclusive():  # as if another thread were inside a forward with it
        with pytest.raises(RuntimeError, match="another forward"):
            model(random_ids(1, 2), cache=state)
    model(random_ids(1, 2), cache=state)  # released again afterwards
    assert state.get_seq_length() == 5


@torch.no_grad()
def test_a_frozen_state_can_be_shared_by_threads():
    model = tiny_model("7")
    shared = model(random_ids(1, 5), use_cache=True).cache.freeze()
    prompts = [random_ids(1, 3, seed=s) for s in range(8)]
    sequential = [model(p, cache=shared).logits for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda p: model(p, cache=shared).logits, prompts))
    for a, b in zip(sequential, parallel):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert shared.get_seq_length() == 5


# --- masks --------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_a_mask_with_a_hole_is_refused(model):
    ids = random_ids(1, 5)
    with pytest.raises(ValueError, match="between real tokens"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0, 1, 1]]))


@torch.no_grad()
def test_right_padding_gives_the_unpadded_logits_and_state(model):
    ids = random_ids(2, 6, seed=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    padded = model(ids, attention_mask=mask, use_cache=True)
    alone = model(ids[:1, :4], use_cache=True)
    torch.testing.assert_close(padded.logits[0, :4], alone.logits[0], atol=1e-5, rtol=0)
    # the kept state is the state after the last real token: continuing from it equals continuing unpadded
    more = random_ids(1, 3, seed=2)
    row0 = padded.cache.clone()
    row0.batch_select_indices(torch.tensor([0]))
    torch.testing.assert_close(
        model(more, cache=row0).logits, model(more, cache=alone.cache).logits, atol=1e-4, rtol=0
    )


@torch.no_grad()
def test_right_padding_at_batch_one_changes_nothing(model):
    ids = random_ids(1, 7, seed=3)
    padded = model(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0, 0]]), use_cache=True)
    alone = model(ids[:, :5], use_cache=True)
    torch.testing.assert_close(padded.logits[:, :5], alone.logits, atol=1e-5, rtol=0)
    nxt = random_ids(1, 1, seed=4)
    torch.testing.assert_close(model(nxt, cache=padded.cache).logits, model(nxt, cache=alone.cache).logits,
                               atol=1e-4, rtol=0)


@torch.no_grad()
def test_left_padding_on_a_continued_rwkv4_state_is_refused():
    model = tiny_model("4")
    state = model(random_ids(2, 3), use_cache=True).cache
    with pytest.raises(ValueError, match="continued RWKV-4 state"):
        model(random_ids(2, 3), attention_mask=torch.tensor([[1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]]), cache=state)


def test_a_negative_token_id_is_named():
    model = tiny_model("7")
    with pytest.raises(ValueError, match="token id -1 outside"):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match=f"token id {model.config.vocab_size} outside"):
        model(torch.tensor([[1, model.config.vocab_size]]))


# --- tokenizer files ----------------------------------------------------------------------------------------


def test_a_huge_id_in_a_vocabulary_file_is_refused_without_allocating_it(tmp_path):
    from rwkv_hf.tokenization_rwkv_hf import WORLD_VOCAB_FILE, RwkvWorldTokenizer, _HERE

    lines = open(f"{_HERE}/{WORLD_VOCAB_FILE}", encoding="utf-8").read().splitlines()
    lines.append("300000000 'zzzz' 4")
    (tmp_path / WORLD_VOCAB_FILE).write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match="300000000 is far beyond") as error:
        RwkvWorldTokenizer(vocab_file=str(tmp_path / WORLD_VOCAB_FILE))
    assert len(str(error.value)) < 400


def test_a_huge_vocabulary_line_gives_a_short_error(tmp_path):
    from rwkv_hf.tokenization_rwkv_hf import RwkvWorldTokenizer

    (tmp_path / "vocab.txt").write_text("1 " + "'a" * 200_000 + " 3\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        RwkvWorldTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    assert len(str(error.value)) < 600


def test_a_20b_folder_without_tokenizer_files_does_not_get_the_world_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from rwkv_checkpoints import make_official_checkpoint
    from rwkv_hf import convert_rwkv_checkpoint

    sd = make_official_checkpoint("4", n_layer=1, n_embd=32, vocab_size=50277, seed=1)
    convert_rwkv_checkpoint(sd, tmp_path / "m", tokenizer="none", progress=False)
    with pytest.raises(ValueError, match="vocabulary of 50277 tokens.*--tokenizer 20b"):
        AutoTokenizer.from_pretrained(tmp_path / "m")


# --- chat ---------------------------------------------------------------------------------------------------


def test_tool_call_detection_is_linear_on_long_whitespace():
    for text in ("f\n```" + " " * 262_144, "f\n```" + "a" * 262_144, "f\n" + " " * 262_144 + "x"):
        start = time.perf_counter()
        assert parse_tool_call(text) is None
        # quadratic matching took 10 s on 64k characters; linear takes milliseconds on 256k
        assert time.perf_counter() - start < 5


def test_a_stream_that_times_out_leaves_no_generation_thread_behind(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

    from model_factory import tiny_world_folder

    folder = tiny_world_folder(tmp_path, seed=5)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)

    class Slow(LogitsProcessor):
        def __call__(self, input_ids, scores):
            time.sleep(0.3)
            return scores

    with pytest.raises(TimeoutError):
        for _ in model.stream_chat(tokenizer, "Hi", logits_processor=[Slow()], timeout=0.05, max_new_tokens=50):
            pass
    assert not [t for t in threading.enumerate() if t.name == "rwkv-chat-generate"]


# --- the chat CLI -------------------------------------------------------------------------------------------


def test_the_chat_cli_never_runs_a_folders_code_unasked(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "evil.EvilConfig",
                                                                  "AutoModelForCausalLM": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    result = subprocess.run([sys.executable, "-m", "rwkv_hf.cli", "chat", str(folder)], input="y\ny\ny\n",
                            capture_output=True, text=True, timeout=120)
    assert not marker.exists()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot load" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_the_chat_cli_asked_for_cuda_without_it_says_so(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    result = subprocess.run([sys.executable, "-m", "rwkv_hf.cli", "chat", str(folder), "--device", "cuda"],
                            input="", capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr


def test_an_integer_tensor_in_a_folders_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from rwkv_checkpoints import make_official_checkpoint
    from rwkv_hf import convert_rwkv_checkpoint

    convert_rwkv_checkpoint(make_official_checkpoint("7", n_layer=1, n_embd=32, head_size=16, vocab_size=300), tmp_path,
                            tokenizer="none", progress=False)
    weights = load_file(tmp_path / "model.safetensors")
    key = next(k for k in weights if k.endswith("ln_out.weight"))
    weights[key] = weights[key].to(torch.int32)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{key} is stored as I32"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"v{v}")
def test_a_left_padded_training_batch_has_the_gradients_of_its_unpadded_rows(version):
    """RWKV-4's padding keys (-1e30) once made the chunked WKV compute inf * 0: NaN logits, loss and gradients."""
    rows = [random_ids(1, 9, seed=7), random_ids(1, 5, seed=8)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 9 - row.shape[1]:], mask[i, 9 - row.shape[1]:] = row[0], 1
    # -100 on the pads, and on each row's first token (alone, nothing predicts it; padded, a pad position would)
    labels = ids.masked_fill(torch.cat([torch.zeros(2, 1, dtype=torch.long), mask[:, :-1]], 1) == 0, -100)

    def summed_loss(model, x, attention_mask, y):
        logits = model(x, attention_mask=attention_mask).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")

    padded, alone = tiny_model(version).train(), tiny_model(version).train()
    loss = summed_loss(padded, ids, mask, labels)
    assert torch.isfinite(loss)
    assert torch.isfinite(padded(ids, attention_mask=mask).logits).all()
    loss.backward()
    expected = sum(summed_loss(alone, row, None, row) for row in rows)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-5)
    for (name, p), q in zip(padded.named_parameters(), alone.parameters()):
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)
