"""Packed training batches: several documents in one row must each run from the initial state, as if alone.

transformers' ``DataCollatorWithFlattening`` and TRL's packing / padding-free collators mark the documents with
``position_ids`` (a 0 at each start), ``seq_idx`` and ``cu_seq_lens_q/k``. Before this was handled, the markers
fell into ``**kwargs`` and the recurrent state leaked from one document into the next.
"""

import copy

import pytest
import torch
from model_factory import random_ids, tiny_model
from transformers import DataCollatorWithFlattening

from rwkv_hf import RwkvCache, load_init_state

VERSIONS = ["4", "5.2", "6", "7"]
ATOL = 2e-5  # the same tokens in batches of other shapes: fp32 rounding of the chunked WKV only


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def documents(lengths, seed=0):
    return [random_ids(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]


def each_alone(model, docs, **kwargs):
    with torch.no_grad():
        return torch.cat([model(d[None], **kwargs).logits[0] for d in docs])


def flattened(docs, **collator_kwargs):
    collator = DataCollatorWithFlattening(**collator_kwargs)
    return collator([{"input_ids": d.tolist()} for d in docs])


@pytest.mark.parametrize("version", VERSIONS)
def test_packed_documents_give_each_documents_own_logits(version):
    model = tiny_model(version).eval()
    docs = documents([5, 9, 1, 9, 3])  # two of equal length share a batch inside; a one-token document too
    batch = flattened(docs)
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        leaked = model(batch["input_ids"]).logits[0]
    alone = each_alone(model, docs)
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=0)
    assert (leaked[5:] - alone[5:]).abs().max() > 1e-2  # the test can tell a leak from a reset


@pytest.mark.parametrize("version", ["4", "7"])
def test_every_marker_of_the_collators_gives_the_same_documents(version):
    model = tiny_model(version).eval()
    docs = documents([4, 6, 3], seed=10)
    batch = flattened(docs, return_flash_attn_kwargs=True, return_seq_idx=True)
    assert {"cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "max_length_q"} <= set(batch)
    alone = each_alone(model, docs)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        every = model(**inputs).logits[0]
        for marker in ("position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k"):
            one = model(batch["input_ids"], **{marker: batch[marker]}).logits[0]
            torch.testing.assert_close(one, alone, atol=ATOL, rtol=0, msg=marker)
    torch.testing.assert_close(every, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("version", ["4", "6"])
def test_rows_with_several_documents_and_padding(version):
    """TRL's packing without padding-free: rows of documents, an all-ones mask, right padding with position 0."""
    model = tiny_model(version).eval()
    row0, row1 = documents([3, 5], seed=20), documents([6], seed=30)
    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[0] = torch.cat(row0)
    ids[1, :6] = row1[0]
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(out[0], each_alone(model, row0), atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, :6], each_alone(model, row1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("version", ["4", "7"])
def test_packed_gradients_equal_the_sum_over_documents(version):
    docs = documents([4, 7, 4], seed=40)
    batch = flattened(docs)
    packed_model, alone_model = tiny_model(version).train(), tiny_model(version).train()
    packed_model(batch["input_ids"], position_ids=batch["position_ids"]).logits.pow(2).mean().mul(15).backward()
    sum(alone_model(d[None]).logits.pow(2).sum() / 300 for d in docs).backward()
    for (name, a), b in zip(packed_model.named_parameters(), alone_model.parameters()):
        if a.grad is None and b.grad is None:
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_every_packed_document_starts_from_the_mounted_state():
    """State tuning with packing: each document starts from the tuned initial state, not from zeros."""
    from test_state_files import exact_state

    model = tiny_model("7").eval()
    load_init_state(model, exact_state(model.config))
    docs = documents([5, 3, 6], seed=50)
    batch = flattened(docs)
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    torch.testing.assert_close(packed, each_alone(model, docs), atol=ATOL, rtol=0)


def test_trainer_trains_on_a_flattened_batch(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = copy.deepcopy(tiny_model("7"))  # trained in place: not on the storage tiny_model shares between tests
    data = [{"input_ids": d.tolist()} for d in documents([6, 9, 4, 7, 5, 8], seed=60)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_left_padded_generation_is_not_read_as_packing():
    """generate hands the model position_ids that restart at each row's first real token: not a document start."""
    model = tiny_model("6").eval()
    a, b = random_ids(1, 3, seed=70), random_ids(1, 6, seed=71)
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    together = model.generate(ids, attention_mask=mask, **kw)
    assert together[0, 3:].tolist() == model.generate(a, **kw)[0].tolist()
    assert together[1].tolist() == model.generate(b, **kw)[0].tolist()


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_markers_that_disagree_are_refused_naming_where():
    model = tiny_model("7")
    batch = flattened(documents([3, 4]), return_seq_idx=True)
    seq_idx = batch["seq_idx"].clone()
    seq_idx[0, 5:] = 2  # a third document that position_ids do not know
    with pytest.raises(ValueError, match=r"seq_idx starts a document at row 0, token 5, position_ids does not"):
        model(batch["input_ids"], position_ids=batch["position_ids"], seq_idx=seq_idx)


@pytest.mark.parametrize(
    "cu_seq_lens, why",
    [([0, 3, 6], "ends short of the tokens"), ([0, 4, 2, 7], "not increasing"), ([1, 7], "not from 0")],
)
def test_malformed_cu_seq_lens_are_refused(cu_seq_lens, why):
    model = tiny_model("7")
    with pytest.raises(ValueError, match="cu_seq_lens_q must be increasing offsets into the 1 x 7 flattened tokens"):
        model(random_ids(1, 7), cu_seq_lens_q=torch.tensor(cu_seq_lens, dtype=torch.int32))


def test_a_document_may_not_span_two_rows():
    model = tiny_model("7")
    with pytest.raises(ValueError, match=r"document starting at every row start \[0, 4\]"):
        model(random_ids(2, 4), cu_seq_lens_k=torch.tensor([0, 2, 8], dtype=torch.int32))


def test_a_packed_batch_cannot_continue_a_state():
    model = tiny_model("7").eval()
    batch = flattened(documents([3, 4]))
    cache = model(random_ids(1, 2), use_cache=True).cache
    with pytest.raises(ValueError, match="a packed batch .* cannot continue a recurrent state"):
        model(batch["input_ids"], position_ids=batch["position_ids"], cache=cache)
    assert model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).cache is None
    assert isinstance(cache, RwkvCache)


def test_position_ids_of_the_wrong_shape_are_refused():
    model = tiny_model("7")
    with pytest.raises(ValueError, match=r"position_ids must be \[batch, tokens\] = \[2, 5\], got \(2, 4\)"):
        model(random_ids(2, 5), position_ids=torch.zeros(2, 4, dtype=torch.long))
