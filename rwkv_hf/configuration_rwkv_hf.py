"""Configuration of every RWKV generation (4, 5.2, 6, 7) in one class."""

from __future__ import annotations

import math
from typing import Optional

from transformers import PretrainedConfig

SUPPORTED_VERSIONS = ("4", "5.2", "6", "7")


def normalize_version(version) -> str:
    """4 / 4.0 / "4" / "v4" -> "4";  5.2 -> "5.2";  7 / "7.0" -> "7". Anything else is refused."""
    text = str(version).strip().lower().lstrip("v")
    try:
        number = float(text)
    except ValueError:
        number = None
    for known in SUPPORTED_VERSIONS:
        if number is not None and math.isclose(number, float(known)):
            return known
    hint = ""
    if number is not None and 5.0 <= number < 5.2:
        hint = " RWKV-5.0/5.1 were research previews without released models; only 5.2 is supported."
    raise ValueError(
        f"Unknown RWKV version {version!r}: expected one of {', '.join(SUPPORTED_VERSIONS)}.{hint}"
    )


REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_rwkv_hf.RwkvConfig",
    "AutoModel": "modeling_rwkv_hf.RwkvHfModel",
    "AutoModelForCausalLM": "modeling_rwkv_hf.RwkvHfForCausalLM",
}


RENAMED_ARCHITECTURES = {"RwkvForCausalLM": "RwkvHfForCausalLM", "RwkvModel": "RwkvHfModel"}


class RwkvConfig(PretrainedConfig):
    r"""
    Configuration of an RWKV language model of any generation.

    Every size is a field (nothing is looked up in a table), and the converter fills each one from the
    checkpoint's shapes.

    Args:
        rwkv_version (`str` or number): 4, 5.2, 6 or 7.
        vocab_size (`int`): rows of the embedding and the head.
        hidden_size (`int`): model width (`n_embd`).
        num_hidden_layers (`int`): number of blocks.
        attention_hidden_size (`int`, *optional*): width of the time-mix (`dim_att`); defaults to `hidden_size`.
        head_size (`int`): size of one WKV head (v5.2, v6, v7); heads = attention_hidden_size // head_size.
        intermediate_size (`int`, *optional*): channel-mix width (`dim_ffn`); default 4x for v4/v7,
            `int(3.5 * hidden_size) // 32 * 32` for v5.2/v6 (RWKV-LM's defaults).
        time_mix_extra_dim (`int`): v6 token-shift LoRA rank (`time_maa_w1` is [C, 5 * this]).
        time_decay_extra_dim (`int`): v6 decay LoRA rank.
        decay_low_rank_dim, a_low_rank_dim, v_low_rank_dim, gate_low_rank_dim (`int`, *optional*): v7 LoRA ranks
            (w, a, v, g); default to RWKV-LM's `max(32, round(k * sqrt(C) / 32) * 32)` rule.
        layer_norm_epsilon (`float`): LayerNorm eps (1e-5 in every released model).
        head_size_divisor (`int`): RWKV-LM's `GroupNorm(x / 8, eps=1e-5)` is `GroupNorm(x, eps=64e-5)`.
        rescale_every (`int`): fp16 only. Every `rescale_every` blocks the residual stream is halved (RWKV-4's
            `RWKV_RESCALE_LAYER`) so it stays inside fp16's range. Applied to activations only, never to
            stored weights. 0 disables it; it is never applied in fp32/bf16.
        wkv_backend (`str`): "auto" (CUDA kernel on GPU when it builds, PyTorch otherwise) or "torch"
            (always the PyTorch reference).
    """

    model_type = "rwkv_hf"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        rwkv_version="7",
        vocab_size: int = 65536,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        attention_hidden_size: Optional[int] = None,
        head_size: int = 64,
        intermediate_size: Optional[int] = None,
        time_mix_extra_dim: int = 32,
        time_decay_extra_dim: int = 64,
        decay_low_rank_dim: Optional[int] = None,
        a_low_rank_dim: Optional[int] = None,
        v_low_rank_dim: Optional[int] = None,
        gate_low_rank_dim: Optional[int] = None,
        layer_norm_epsilon: float = 1e-5,
        head_size_divisor: int = 8,
        rescale_every: int = 6,
        wkv_backend: str = "auto",
        bos_token_id: int = 0,
        eos_token_id: int = 0,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        self.rwkv_version = normalize_version(rwkv_version)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.attention_hidden_size = attention_hidden_size or hidden_size
        self.head_size = head_size
        if intermediate_size is None:
            if self.rwkv_version in ("4", "7"):
                intermediate_size = 4 * hidden_size
            else:
                intermediate_size = int(hidden_size * 3.5) // 32 * 32
        self.intermediate_size = intermediate_size
        self.time_mix_extra_dim = time_mix_extra_dim
        self.time_decay_extra_dim = time_decay_extra_dim

        def lora_dim(given, factor):
            return given if given is not None else max(32, int(round(factor * hidden_size**0.5 / 32) * 32))

        self.decay_low_rank_dim = lora_dim(decay_low_rank_dim, 2.5)
        self.a_low_rank_dim = lora_dim(a_low_rank_dim, 2.5)
        self.v_low_rank_dim = lora_dim(v_low_rank_dim, 1.7)
        self.gate_low_rank_dim = lora_dim(gate_low_rank_dim, 5)
        self.layer_norm_epsilon = layer_norm_epsilon
        self.head_size_divisor = head_size_divisor
        self.rescale_every = rescale_every
        if wkv_backend not in ("auto", "torch"):
            raise ValueError(f"wkv_backend must be 'auto' or 'torch', got {wkv_backend!r}")
        self.wkv_backend = wkv_backend
        self.use_cache = use_cache
        self._check_sizes()
        # Where a folder without this package finds the code (save_pretrained copies the files next to it): a
        # saved or pushed model always carries its remote code, whether converted or built here.
        kwargs.setdefault("auto_map", dict(REMOTE_CODE_AUTO_MAP))
        # Folders written by rwkv_hf 0.2.0 and before name the model class "RwkvForCausalLM", which is transformers'
        # built-in RWKV-4 to every tool that resolves the class by name; a re-save writes the name of our own class.
        if kwargs.get("architectures"):
            kwargs["architectures"] = [RENAMED_ARCHITECTURES.get(name, name) for name in kwargs["architectures"]]
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _check_sizes(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "attention_hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"RwkvConfig.{name} must be a positive integer, got {value!r}")
        if self.rwkv_version != "4":
            if self.head_size <= 0 or self.attention_hidden_size % self.head_size:
                raise ValueError(
                    f"attention_hidden_size ({self.attention_hidden_size}) must be a multiple of head_size "
                    f"({self.head_size}) for RWKV-{self.rwkv_version}"
                )
        if self.rwkv_version == "7" and self.attention_hidden_size != self.hidden_size:
            raise ValueError("RWKV-7 requires attention_hidden_size == hidden_size")

    @property
    def num_attention_heads(self) -> int:
        """WKV heads (RWKV-4 has one value per channel; it is reported as one head per channel)."""
        if self.rwkv_version == "4":
            return self.attention_hidden_size
        return self.attention_hidden_size // self.head_size

    @property
    def group_norm_epsilon(self) -> float:
        return 1e-5 * self.head_size_divisor**2
