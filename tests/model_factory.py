"""Small RWKV models for the tests: random official checkpoints turned into RwkvForCausalLM in memory."""

from __future__ import annotations

import functools

import torch

from rwkv_checkpoints import make_official_checkpoint
from rwkv_hf import RwkvForCausalLM
from rwkv_hf.convert_rwkv_hf import infer_config, map_state_dict, split_init_state

VERSIONS = ("4", "5.2", "6", "7")


def model_from_state_dict(state_dict, **config_overrides) -> RwkvForCausalLM:
    weights, _ = split_init_state(state_dict)
    config = infer_config(weights, **config_overrides)
    tensors = map_state_dict(weights, config, progress=False)
    with torch.device("meta"):
        model = RwkvForCausalLM(config)
    model.load_state_dict(tensors, assign=True, strict=True)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _cached(version, n_layer, n_embd, head_size, vocab_size, seed):
    return make_official_checkpoint(
        version, n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab_size=vocab_size, seed=seed
    )


def tiny_model(version, *, n_layer=2, n_embd=64, head_size=16, vocab_size=300, seed=0, **overrides) -> RwkvForCausalLM:
    """A fresh model each call (tests may change it), built from a cached random checkpoint."""
    state_dict = _cached(version, n_layer, n_embd, head_size, vocab_size, seed)
    return model_from_state_dict(dict(state_dict), **overrides)


def random_ids(batch, length, vocab_size=300, seed=0, low=1) -> torch.Tensor:
    """Token ids avoiding 0 (end of text), so greedy runs are not cut short by an early end-of-text."""
    return torch.randint(low, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny_world_folder(root, seed):
    """A converted 1-layer RWKV-7 folder with the World vocabulary and tokenizer (for chat tests)."""
    from rwkv_hf import convert_rwkv_checkpoint

    path = root / "tiny-world"
    state_dict = make_official_checkpoint("7", vocab_size=65536, seed=seed, n_layer=1, n_embd=32, head_size=16)
    convert_rwkv_checkpoint(state_dict, path, tokenizer="world", progress=False)
    return path
