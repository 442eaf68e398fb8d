"""The contract with transformers, on whichever release is installed (CI runs the newest and the oldest supported).

transformers 5.24 renamed the cache argument and a model reading the old name silently decoded every step from a
zero state. So: generate is checked against hand-written loops that carry the state themselves (never generate
against generate), and every way the contract could change again must raise instead of emitting text.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DynamicCache,
    GenerationMixin,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from model_factory import VERSIONS, random_ids, tiny_model
from rwkv_hf import compat_rwkv_hf as compat
from rwkv_hf.compat_rwkv_hf import CACHE_ARG, cache_kwargs, model_output_cache

NO_EOS = dict(eos_token_id=None, pad_token_id=0)


@pytest.fixture(params=VERSIONS, ids=lambda v: f"v{v}")
def model(request):
    return tiny_model(request.param)


# --- generate against loops that carry the state by hand ----------------------------------------------------


@torch.no_grad()
def state_carrying_loop(model, ids, steps, choose):
    """Feed the prompt once, then one token per step through the returned cache; ``choose(logits) -> ids``."""
    out = model(ids, use_cache=True)
    sequence = ids
    for _ in range(steps):
        token = choose(sequence, out.logits[:, -1].float())
        sequence = torch.cat([sequence, token], 1)
        out = model(token, cache=out.cache, use_cache=True)
    return sequence


@torch.no_grad()
def test_greedy_generate_equals_an_argmax_loop(model):
    ids = random_ids(2, 7, seed=1)
    expected = state_carrying_loop(model, ids, 12, lambda seq, logits: logits.argmax(-1, keepdim=True))
    assert model.generate(ids, max_new_tokens=12, do_sample=False, **NO_EOS).tolist() == expected.tolist()


@torch.no_grad()
def test_sampling_generate_equals_the_same_sampler_in_a_loop(model):
    ids = random_ids(1, 5, seed=2)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.9)])

    def sample(seq, logits):
        return torch.multinomial(torch.softmax(warpers(seq, logits), dim=-1), num_samples=1)

    torch.manual_seed(123)
    expected = state_carrying_loop(model, ids, 10, sample)
    torch.manual_seed(123)
    got = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.7, top_k=40, top_p=0.9, **NO_EOS)
    assert got.tolist() == expected.tolist()


@torch.no_grad()
def test_beam_search_equals_a_beam_loop_that_reorders_the_state(model):
    ids, beams, steps = random_ids(1, 6, seed=3), 3, 6
    out = model(ids, use_cache=True)
    cache, sequences = out.cache, ids
    scores = torch.zeros(1)
    logits = out.logits[:, -1].float()
    for _ in range(steps):
        candidates = (scores[:, None] + torch.log_softmax(logits, -1)).view(-1)
        scores, flat = candidates.topk(beams)
        parent, token = flat // logits.shape[-1], flat % logits.shape[-1]
        if cache.batch_size != parent.numel():  # the first step forks the prompt's state into the beams
            cache.batch_repeat_interleave(parent.numel())
        cache.reorder_cache(parent)
        sequences = torch.cat([sequences[parent], token[:, None]], 1)
        out = model(token[:, None], cache=cache, use_cache=True)
        logits = out.logits[:, -1].float()
    best = sequences[scores.argmax()]
    got = model.generate(ids, max_new_tokens=steps, num_beams=beams, do_sample=False, length_penalty=1.0, **NO_EOS)
    assert got[0].tolist() == best.tolist()


@torch.no_grad()
def test_generate_continues_from_a_cache_passed_under_the_installed_name():
    model = tiny_model("7")
    ids = random_ids(1, 9, seed=4)
    first = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, **NO_EOS)
    state = model_output_cache(first)
    assert state is not None and state.get_seq_length() == ids.shape[1] + 3
    continued = model.generate(first.sequences, **cache_kwargs(state), max_new_tokens=4, do_sample=False, **NO_EOS)
    expected = state_carrying_loop(model, ids, 8, lambda seq, logits: logits.argmax(-1, keepdim=True))
    assert continued.tolist() == expected.tolist()


@torch.no_grad()
def test_chunked_prefill_equals_one_prefill():
    model = tiny_model("6")
    ids = random_ids(2, 13, seed=8)
    kwargs = dict(max_new_tokens=5, do_sample=False, **NO_EOS)
    assert model.generate(ids, prefill_chunk_size=4, **kwargs).tolist() == model.generate(ids, **kwargs).tolist()


def test_outputs_carry_the_state_as_cache_on_every_supported_release():
    model = tiny_model("6")
    out = model(random_ids(1, 3), use_cache=True)
    assert out.cache is out[CACHE_ARG]
    assert isinstance(out, CausalLMOutputWithPast)
    assert out.cache.get_seq_length() == 3
    assert model.rwkv(random_ids(1, 3), use_cache=True).cache.get_seq_length() == 3
    logits, cache = model(random_ids(1, 3), use_cache=True, return_dict=False)
    assert cache.get_seq_length() == 3


def test_forward_takes_the_state_under_both_names_but_not_twice():
    model = tiny_model("5.2")
    prompt, more = random_ids(1, 4, seed=5), random_ids(1, 2, seed=6)
    a = model(more, cache=model(prompt, use_cache=True).cache).logits
    b = model(more, past_key_values=model(prompt, use_cache=True).cache).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    one, other = model(prompt, use_cache=True).cache, model(prompt, use_cache=True).cache
    with pytest.raises(ValueError, match="once"):
        model(more, cache=one, past_key_values=other)


# --- a changed contract raises ------------------------------------------------------------------------------


def test_an_unknown_keyword_is_a_type_error_naming_it():
    model = tiny_model("7")
    with pytest.raises(TypeError, match="state_v2"):
        model(random_ids(1, 3), state_v2=None)
    with pytest.raises(TypeError, match="cache_params"):
        model.rwkv(random_ids(1, 3), cache_params=None)
    # the loss keywords transformers' Trainer passes are not unknown
    ids = random_ids(2, 5)
    assert torch.isfinite(model(ids, labels=ids, num_items_in_batch=torch.tensor(8)).loss)
    with pytest.raises(ValueError, match="no attention weights"):
        model(ids, output_attentions=True)


def test_a_cache_of_the_wrong_kind_is_refused():
    model = tiny_model("7")
    with pytest.raises(TypeError, match="RwkvCache"):
        model(random_ids(1, 3), cache=DynamicCache())
    with pytest.raises(ValueError, match="RWKV-6 state"):
        model(random_ids(1, 3), cache=tiny_model("6")(random_ids(1, 3), use_cache=True).cache)


def test_generate_raises_when_transformers_renames_the_cache_argument(monkeypatch):
    """As if a release passed the state under a new name: the forward refuses it instead of starting from zeros."""
    model = tiny_model("7")
    original = GenerationMixin.prepare_inputs_for_generation

    def renaming(self, input_ids, **kwargs):
        inputs = original(self, input_ids, **kwargs)
        inputs["state_v2"] = inputs.pop(CACHE_ARG, None)
        return inputs

    monkeypatch.setattr(GenerationMixin, "prepare_inputs_for_generation", renaming)
    with pytest.raises(TypeError, match="state_v2"):
        model.generate(random_ids(1, 4), max_new_tokens=3, do_sample=False, **NO_EOS)


def test_generate_raises_when_transformers_stops_carrying_the_state(monkeypatch):
    """As if a release forgot the cache between steps: the second step raises and names the installed version."""
    model = tiny_model("7")
    original = GenerationMixin.prepare_inputs_for_generation

    def forgetful(self, input_ids, **kwargs):
        inputs = original(self, input_ids, **kwargs)
        inputs.pop(CACHE_ARG, None)
        return inputs

    monkeypatch.setattr(GenerationMixin, "prepare_inputs_for_generation", forgetful)
    with pytest.raises(RuntimeError, match=f"without the recurrent state.*{compat.TRANSFORMERS_VERSION}"):
        model.generate(random_ids(1, 4), max_new_tokens=3, do_sample=False, **NO_EOS)
    # use_cache=False re-reads the whole sequence at every step: slow, but right, and allowed
    ids = random_ids(1, 4)
    expected = state_carrying_loop(model, ids, 3, lambda seq, logits: logits.argmax(-1, keepdim=True))
    assert model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False, **NO_EOS).tolist() == expected.tolist()


@pytest.mark.skipif(CACHE_ARG == "cache", reason="this transformers takes generate(cache=...)")
def test_generate_with_the_new_name_on_an_older_transformers_raises():
    model = tiny_model("7")
    state = model(random_ids(1, 4), use_cache=True).cache
    with pytest.raises(TypeError, match="past_key_values"):
        model.generate(random_ids(1, 5), cache=state, max_new_tokens=2, do_sample=False, **NO_EOS)


@pytest.mark.skipif(CACHE_ARG != "cache", reason="this transformers has no cache argument yet")
def test_generate_with_the_old_name_still_works_with_transformers_own_warning():
    model = tiny_model("7")
    ids = random_ids(1, 6, seed=7)
    state = model(ids[:, :-1], use_cache=True).cache.freeze()
    with pytest.warns(FutureWarning, match="past_key_values"):
        got = model.generate(ids, past_key_values=state, max_new_tokens=3, do_sample=False, **NO_EOS)
    assert got.tolist() == model.generate(ids, max_new_tokens=3, do_sample=False, **NO_EOS).tolist()


# --- the supported range and the feature detection -----------------------------------------------------------


@pytest.mark.parametrize("release", ["4.57.6", "5.13.1", "6.0.0"])
def test_a_transformers_outside_the_supported_range_is_a_clear_error(release, monkeypatch):
    monkeypatch.delenv(compat.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(compat.TransformersContractError, match=r">=5\.14,<6") as error:
        compat._check_supported_range(release)
    assert "rwkv_hf cannot run on transformers" in str(error.value)


def test_an_untested_major_release_can_be_tried_on_purpose(monkeypatch):
    monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "1")
    compat._check_supported_range("6.0.0")
    compat._check_supported_range("5.14.0")
    compat._check_supported_range("5.99.0")


def test_a_generate_and_outputs_that_disagree_on_the_name_are_an_error():
    from dataclasses import dataclass

    @dataclass
    class OldOutput(CausalLMOutputWithPast.__mro__[1]):  # ModelOutput
        logits: object = None
        past_key_values: object = None

    @dataclass
    class NewOutput(CausalLMOutputWithPast.__mro__[1]):
        logits: object = None
        cache: object = None

    def prepare_new(self, input_ids, cache=None, **kwargs): ...

    def prepare_old(self, input_ids, past_key_values=None, **kwargs): ...

    assert compat._detect_cache_arg(prepare_new, (NewOutput, NewOutput)) == "cache"
    assert compat._detect_cache_arg(prepare_old, (OldOutput, OldOutput)) == "past_key_values"
    with pytest.raises(compat.TransformersContractError, match="generate passes the recurrent state as"):
        compat._detect_cache_arg(prepare_new, (OldOutput, OldOutput))


def test_the_private_seams_we_still_use_are_where_we_left_them():
    assert compat.private_seam_problems() == []


def test_the_package_overrides_no_private_generation_hook():
    from rwkv_hf import RwkvForCausalLM

    private = [
        name
        for name in vars(RwkvForCausalLM)
        if name.startswith("_") and not name.startswith("__") and hasattr(GenerationMixin, name)
    ]
    assert private == []
