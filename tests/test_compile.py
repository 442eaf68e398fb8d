"""torch.compile on a freshly loaded model: the eager logits and tokens, in one graph where asked (fullgraph=True).

A fresh model used to fail its first compiled call: the first CPU forward re-laid the weights (see
``RwkvHfForCausalLM.train``), after the graph had been traced with their old strides. The per-call id check and
the cache's thread guard are skipped while tracing, so the forward and the decode step compile whole.
"""

import pytest
import torch
from model_factory import random_ids, tiny_model
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "model"
    tiny_model("7").save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def eager_greedy(model, ids, steps):
    with torch.no_grad():
        out = model(ids, use_cache=True)
        tokens, cache = [], out.cache
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            out = model(token, cache=cache, use_cache=True)
    return torch.cat(tokens, 1)


def test_a_freshly_loaded_model_compiles_and_gives_the_eager_logits(folder):
    eager = AutoModelForCausalLM.from_pretrained(folder)
    compiled = torch.compile(AutoModelForCausalLM.from_pretrained(folder))  # nothing run eagerly before
    ids = random_ids(2, 8)
    with torch.no_grad():
        expected = eager(ids).logits
        torch.testing.assert_close(compiled(ids).logits, expected, atol=2e-5, rtol=0)
        torch.testing.assert_close(compiled(ids).logits, expected, atol=2e-5, rtol=0)


def test_fullgraph_forward_and_decode_step(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = random_ids(1, 8, seed=1)
    expected_logits = model(ids, use_cache=False).logits.detach()
    expected_tokens = eager_greedy(model, ids, steps=4)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, expected_logits, atol=2e-5, rtol=0)
        out = compiled(ids, use_cache=True)  # the prefill makes its cache inside the graph
        tokens, cache = [], out.cache
        for _ in range(4):
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            out = compiled(token, cache=cache, use_cache=True)
    assert torch.equal(torch.cat(tokens, 1), expected_tokens)


def test_compiled_code_still_refuses_ids_outside_the_vocabulary(folder):
    compiled = torch.compile(AutoModelForCausalLM.from_pretrained(folder))
    with pytest.raises(Exception, match="(?i)index|out of (bounds|range)|vocabulary"):
        with torch.no_grad():
            compiled(torch.tensor([[1, 2, 300]]))
