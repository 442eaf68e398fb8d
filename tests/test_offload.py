"""accelerate's big-model offload: a model split between memory and disk gives the in-memory logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from model_factory import VERSIONS, random_ids
from rwkv_checkpoints import make_official_checkpoint
from rwkv_hf import convert_rwkv_checkpoint


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"v{v}")
def test_disk_offload_gives_the_in_memory_logits(tmp_path, version):
    sd = make_official_checkpoint(version, n_layer=4, n_embd=64, head_size=16, vocab_size=300, seed=2)
    convert_rwkv_checkpoint(sd, tmp_path / "m", tokenizer="none", progress=False)
    ids = random_ids(2, 7)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits
        # a budget that keeps the embedding and the first block in memory and puts the rest on disk
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "m", device_map="auto", max_memory={"cpu": "600KB"}, offload_folder=tmp_path / "offload"
        )
        placed = set(model.hf_device_map.values())
        assert placed == {"cpu", "disk"}, model.hf_device_map
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", ["4", "7"], ids=lambda v: f"v{v}")
def test_a_device_map_that_splits_a_block_is_exact(tmp_path, version):
    """A hand-written map may put a block's time mix and channel mix in different places: every submodule is
    called as a module (its offload hook loads it), so the split is exact rather than refused."""
    sd = make_official_checkpoint(version, n_layer=2, n_embd=64, head_size=16, vocab_size=300, seed=2)
    convert_rwkv_checkpoint(sd, tmp_path / "m", tokenizer="none", progress=False)
    ids = random_ids(2, 7)
    device_map = {
        "rwkv.emb": "cpu", "rwkv.blocks.0.ln0": "cpu", "rwkv.blocks.0.ln1": "cpu", "rwkv.blocks.0.att": "disk",
        "rwkv.blocks.0.ln2": "cpu", "rwkv.blocks.0.ffn": "disk", "rwkv.blocks.1": "disk", "rwkv.ln_out": "cpu",
        "head": "cpu",
    }
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map,
                                                     offload_folder=tmp_path / "offload")
        assert model.hf_device_map["rwkv.blocks.0.att"] == "disk" and model.hf_device_map["rwkv.blocks.0.ln1"] == "cpu"
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
