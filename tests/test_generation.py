"""Generation behaviour: padding, beam search, continuing from a cache, streaming, pipelines, batching."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import TextIteratorStreamer, pipeline

from model_factory import VERSIONS, random_ids, tiny_model
from rwkv_hf import RwkvCache
from rwkv_hf.compat_rwkv_hf import cache_kwargs, model_output_cache

# Greedy/beam comparisons are token-exact; logits comparisons use fp32 tolerance (1e-5: the chunked and the
# recurrent forms of the WKV sum in different orders).
ATOL = 1e-5
NO_EOS = dict(eos_token_id=None, pad_token_id=0)


@pytest.fixture(params=VERSIONS, ids=lambda v: f"v{v}")
def model(request):
    return tiny_model(request.param)


def left_pad(rows):
    """Left-pad a list of [1, T] id tensors with 0 and build the attention mask."""
    length = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - r.shape[1] :] = r[0]
        mask[i, length - r.shape[1] :] = 1
    return ids, mask


@torch.no_grad()
def test_left_padded_batch_rows_equal_single_runs(model):
    rows = [random_ids(1, 5, seed=1), random_ids(1, 13, seed=2), random_ids(1, 9, seed=3)]
    ids, mask = left_pad(rows)
    batch_logits = model(ids, attention_mask=mask).logits[:, -1]
    for i, row in enumerate(rows):
        torch.testing.assert_close(batch_logits[i], model(row).logits[0, -1], atol=ATOL, rtol=0)

    batch_out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **NO_EOS)
    for i, row in enumerate(rows):
        alone = model.generate(row, max_new_tokens=8, do_sample=False, **NO_EOS)
        assert batch_out[i, ids.shape[1] :].tolist() == alone[0, row.shape[1] :].tolist()


@torch.no_grad()
def test_left_padded_state_equals_unpadded_state(model):
    row = random_ids(1, 7, seed=4)
    ids, mask = left_pad([row, random_ids(1, 12, seed=5)])
    padded = model(ids, attention_mask=mask, use_cache=True).cache
    alone = model(row, use_cache=True).cache
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(padded.wkv_state(layer)[0], alone.wkv_state(layer)[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(padded.shift_state(layer, 0)[0], alone.shift_state(layer, 0)[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_batched_decode_equals_per_row_decode(model):
    """transformers' built-in RWKV-4 broadcasts [B, C] against [B, 1, C] here and returns [B, B, V] logits."""
    ids = random_ids(3, 6, seed=6)
    batch = model.generate(ids, max_new_tokens=10, do_sample=False, **NO_EOS)
    for i in range(3):
        alone = model.generate(ids[i : i + 1], max_new_tokens=10, do_sample=False, **NO_EOS)
        assert batch[i].tolist() == alone[0].tolist()


@torch.no_grad()
def test_beam_search_with_cache_equals_without(model):
    ids = random_ids(2, 6, seed=7)
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, **NO_EOS)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


@torch.no_grad()
def test_generate_continued_from_returned_cache_equals_full_generation(model):
    ids = random_ids(1, 9, seed=8)
    first = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, **NO_EOS)
    assert model_output_cache(first).get_seq_length() == ids.shape[1] + 5 - 1  # the last sampled token is not fed yet
    continued = model.generate(first.sequences, **cache_kwargs(model_output_cache(first)), max_new_tokens=5, do_sample=False, **NO_EOS)
    full = model.generate(ids, max_new_tokens=10, do_sample=False, **NO_EOS)
    assert continued.tolist() == full.tolist()


@torch.no_grad()
def test_prefix_cache_plus_rest_equals_whole_prompt(model):
    ids = random_ids(2, 20, seed=9)
    whole = model(ids).logits
    prefix = model(ids[:, :11], use_cache=True)
    rest = model(ids[:, 11:], cache=prefix.cache, use_cache=True)
    torch.testing.assert_close(rest.logits, whole[:, 11:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_token_by_token_equals_one_call(model):
    ids = random_ids(2, 12, seed=10)
    whole = model(ids).logits
    cache, steps = None, []
    for t in range(ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), whole, atol=ATOL, rtol=0)
    assert cache.get_seq_length() == ids.shape[1]


@torch.no_grad()
def test_frozen_state_is_never_mutated_and_seeds_many_generations(model):
    prompt = random_ids(1, 8, seed=11)
    state = model(prompt, use_cache=True).cache.freeze()
    snapshot = state.clone()
    cont = random_ids(1, 1, seed=12)
    a = model.generate(torch.cat([prompt, cont], 1), **cache_kwargs(state), max_new_tokens=4, do_sample=False, **NO_EOS)
    b = model.generate(torch.cat([prompt, cont], 1), **cache_kwargs(state), max_new_tokens=4, do_sample=False, **NO_EOS)
    assert a.tolist() == b.tolist()
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(state.wkv_state(layer), snapshot.wkv_state(layer))
        assert torch.equal(state.shift_state(layer, 1), snapshot.shift_state(layer, 1))
    assert state.get_seq_length() == snapshot.get_seq_length() == 8


@torch.no_grad()
def test_clone_forks_an_independent_state(model):
    out = model(random_ids(1, 6, seed=13), use_cache=True)
    fork = out.cache.clone()
    model(random_ids(1, 3, seed=14), cache=out.cache, use_cache=True)
    assert fork.get_seq_length() == 6
    assert not torch.equal(fork.wkv_state(0), out.cache.wkv_state(0))


@torch.no_grad()
def test_one_saved_state_expands_to_beams(model):
    prompt = random_ids(1, 7, seed=15)
    state = model(prompt[:, :-1], use_cache=True).cache.freeze()
    kwargs = dict(max_new_tokens=5, num_beams=2, do_sample=False, **NO_EOS)
    assert model.generate(prompt, **cache_kwargs(state), **kwargs).tolist() == model.generate(prompt, **kwargs).tolist()


@torch.no_grad()
def test_stacked_states_give_each_row_its_own_history(model):
    a, b = random_ids(1, 5, seed=16), random_ids(1, 5, seed=17)
    sa = model(a, use_cache=True).cache
    sb = model(b, use_cache=True).cache
    nxt = random_ids(2, 3, seed=18)
    both = model(nxt, cache=RwkvCache.stack([sa, sb]), use_cache=True).logits
    torch.testing.assert_close(both[0], model(torch.cat([a, nxt[:1]], 1)).logits[0, 5:], atol=ATOL, rtol=0)
    torch.testing.assert_close(both[1], model(torch.cat([b, nxt[1:]], 1)).logits[0, 5:], atol=ATOL, rtol=0)


def test_sampling_is_reproducible_with_a_seed(model):
    ids = random_ids(1, 5, seed=19)
    torch.manual_seed(0)
    a = model.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.9, **NO_EOS)
    torch.manual_seed(0)
    b = model.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.9, **NO_EOS)
    assert a.tolist() == b.tolist()



def test_streamer_text_equals_decoded_output():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {chr(0x4E00 + i) if i else "<eos>": i for i in range(300)}  # one CJK char per id, 0 is eos
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")

    model = tiny_model("7")
    ids = random_ids(1, 6, seed=20)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(out=model.generate(ids, streamer=streamer, max_new_tokens=12, do_sample=False, **NO_EOS))
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == tokenizer.decode(result["out"][0, ids.shape[1] :], skip_special_tokens=True)
    assert len(streamed) == 12

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = tokenizer.decode(ids[0])
    out = generator(text, max_new_tokens=6, do_sample=False, return_full_text=False)
    expected = model.generate(tokenizer(text, return_tensors="pt").input_ids, max_new_tokens=6, do_sample=False, **NO_EOS)
    assert out[0]["generated_text"] == tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)


# --- training-side behaviour ------------------------------------------------------------------------------


def test_labels_give_the_shifted_causal_lm_loss(model):
    ids = random_ids(2, 10, seed=21)
    out = model(ids, labels=ids)
    logits = model(ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    ids = random_ids(2, 10, seed=22)
    model.train()
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_half_precision_runs_close_to_fp32():
    for version in VERSIONS:
        model = tiny_model(version)
        ids = random_ids(1, 12, seed=23)
        with torch.no_grad():
            ref = model(ids).logits.float()
            for dtype in (torch.bfloat16, torch.float16):
                out = tiny_model(version).to(dtype)(ids).logits.float()
                assert torch.isfinite(out).all()
                # bf16 has 8 mantissa bits: a few percent of the logit scale
                assert (out - ref).abs().max() < 0.1 * ref.abs().max(), (version, dtype)


def test_fp16_rescaling_never_changes_saved_weights(tmp_path):
    model = tiny_model("4", n_layer=4, rescale_every=1).to(torch.float16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(random_ids(1, 5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- bad input -----------------------------------------------------------------------------------------------


def test_token_ids_beyond_the_vocabulary_are_refused(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, model.config.vocab_size]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1]]))


def test_empty_input_is_refused(model):
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_a_state_from_another_model_is_refused():
    v7, v6 = tiny_model("7"), tiny_model("6")
    state = v6(random_ids(1, 3), use_cache=True).cache
    with pytest.raises(ValueError, match="RWKV-6 state"):
        v7(random_ids(1, 3), cache=state)
    with pytest.raises(TypeError, match="RwkvCache"):
        v7(random_ids(1, 3), cache=[torch.zeros(1)])


def test_a_cache_cannot_be_cropped(model):
    cache = model(random_ids(1, 3), use_cache=True).cache
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(1)


def test_stop_strings_with_the_tokenizer_passed_to_generate(tmp_path):
    """generate(tokenizer=...) (stop_strings, transformers serve) must not hand the tokenizer to forward."""
    from model_factory import tiny_world_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_world_folder(tmp_path, seed=5)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("User: hello\n\nAssistant:", return_tensors="pt")
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    full = model.generate(**prompt, max_new_tokens=12, **kw)[0, prompt["input_ids"].shape[1]:].tolist()
    stop = tokenizer.decode(full[3:5])
    stopped = model.generate(**prompt, max_new_tokens=12, stop_strings=[stop], tokenizer=tokenizer, **kw)
    stopped = stopped[0, prompt["input_ids"].shape[1]:].tolist()
    assert stopped == full[: len(stopped)] and len(stopped) < len(full)
    assert tokenizer.decode(stopped).endswith(stop)
