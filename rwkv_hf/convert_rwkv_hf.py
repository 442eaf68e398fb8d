"""Convert an official RWKV ``.pth`` checkpoint (RWKV-LM training format) into a transformers folder.

The version and every size are inferred from the keys and the shapes, never from key order or a table of
known model sizes (the official loader misdetects a 1-layer RWKV-5.2 because it scans keys in order).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from tqdm.auto import tqdm

from .configuration_rwkv_hf import RwkvConfig

INIT_STATE_FILE = "init_state.safetensors"
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """The file is not an RWKV checkpoint this converter can read; the message says what was wrong."""


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def load_official_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` with clear errors for the ways a ``.pth`` can be wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"Could not read {path} as a PyTorch checkpoint ({type(err).__name__}: {err}). "
            "The file may be truncated (an interrupted download?) or not a .pth file."
        ) from err
    except Exception as err:  # weights_only refuses arbitrary pickles with UnpicklingError
        raise CheckpointError(
            f"{path} is not a plain tensor checkpoint: torch.load(weights_only=True) refused it ({err}). "
            "Expected a dict of tensors as saved by RWKV-LM."
        ) from err
    return validate_tensor_dict(state_dict, str(path))


def validate_tensor_dict(state_dict, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source} holds a {type(state_dict).__name__}, expected a dict of tensors (RWKV-LM's .pth)")
    if {"_strategy", "_version", "_rescale_layer"} & set(state_dict):
        raise CheckpointError(
            f"{source} was pre-converted by the rwkv package for strategy {state_dict.get('_strategy')!r} "
            "(transposed, rescaled and possibly quantised weights). Convert the original training .pth instead."
        )
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source} has non-tensor entries {bad[:5]}: expected a dict of tensors")
    return state_dict


# ---------------------------------------------------------------------------------------------------------
# Detection of the version and the sizes
# ---------------------------------------------------------------------------------------------------------


def detect_version(state_dict: Dict[str, torch.Tensor]) -> str:
    """RWKV generation from key *names and shapes* (order-independent)."""
    keys = set(state_dict)
    if "blocks.0.att.r_k" in keys or any(k.endswith(".att.r_k") for k in keys):
        if any(".ffn.s_emb" in k for k in keys):
            raise CheckpointError(
                "This is an RWKV-7 DeepEmbed (rwkv7a, 'ffn.s_emb') checkpoint. DeepEmbed is not supported yet: "
                "converting it as plain RWKV-7 would silently ignore s_emb and give wrong logits."
            )
        return "7"
    if any(".att.time_maa" in k for k in keys):
        return "6"
    if any(".att.ln_x." in k for k in keys):
        decay = state_dict.get("blocks.0.att.time_decay")
        if decay is not None and decay.dim() >= 2 and decay.shape[1] > 1:
            return "5.2"
        raise CheckpointError(
            "This looks like an RWKV-5.0/5.1 checkpoint (ln_x with a per-head scalar time_decay). Only RWKV-5.2 "
            "(time_decay of shape [heads, head_size]) is supported."
        )
    if "blocks.0.att.time_decay" in keys and "blocks.0.att.time_first" in keys:
        return "4"
    raise CheckpointError(
        "Cannot tell the RWKV version: none of the signature keys were found (att.r_k for RWKV-7, att.time_maa_* for "
        "RWKV-6, att.ln_x + 2-D att.time_decay for RWKV-5.2, att.time_decay + att.time_first for RWKV-4). "
        f"First keys: {sorted(keys)[:8]}"
    )


def infer_config(state_dict: Dict[str, torch.Tensor], version: Optional[str] = None, **overrides) -> RwkvConfig:
    """Every size from the shapes."""
    version = version or detect_version(state_dict)

    def shape(key):
        if key not in state_dict:
            raise CheckpointError(f"RWKV-{version} checkpoint is missing {key!r}")
        return tuple(state_dict[key].shape)

    vocab_size, hidden_size = shape("emb.weight")
    layer_ids = {int(m.group(1)) for m in map(_BLOCK_KEY.match, state_dict) if m}
    if not layer_ids:
        raise CheckpointError("The checkpoint has no 'blocks.N.*' keys")
    n_layer = max(layer_ids) + 1
    missing_layers = sorted(set(range(n_layer)) - layer_ids)
    if missing_layers:
        raise CheckpointError(f"Blocks {missing_layers} are missing (the checkpoint has blocks up to {n_layer - 1})")
    kwargs = dict(
        rwkv_version=version,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=n_layer,
        attention_hidden_size=shape("blocks.0.att.key.weight")[0],
        intermediate_size=shape("blocks.0.ffn.key.weight")[0],
    )
    if version in ("5.2", "6"):
        kwargs["head_size"] = shape("blocks.0.att.time_faaaa")[1]
    if version == "6":
        kwargs["time_mix_extra_dim"] = shape("blocks.0.att.time_maa_w1")[1] // 5
        kwargs["time_decay_extra_dim"] = shape("blocks.0.att.time_decay_w1")[1]
    if version == "7":
        kwargs["head_size"] = shape("blocks.0.att.r_k")[1]
        kwargs["decay_low_rank_dim"] = shape("blocks.0.att.w1")[1]
        kwargs["a_low_rank_dim"] = shape("blocks.0.att.a1")[1]
        kwargs["gate_low_rank_dim"] = shape("blocks.0.att.g1")[1]
        v_key = "blocks.1.att.v1" if n_layer > 1 else "blocks.0.att.v1"
        kwargs["v_low_rank_dim"] = shape(v_key)[1] if v_key in state_dict else 32
    kwargs.update(overrides)
    try:
        return RwkvConfig(**kwargs)
    except ValueError as err:
        raise CheckpointError(f"The checkpoint's shapes do not make a valid RWKV-{version} model: {err}") from err


# ---------------------------------------------------------------------------------------------------------
# Mapping official keys onto the model
# ---------------------------------------------------------------------------------------------------------


def official_to_hf_key(key: str) -> str:
    return "head.weight" if key == "head.weight" else f"rwkv.{key}"


def hf_to_official_key(key: str) -> str:
    return key[len("rwkv.") :] if key.startswith("rwkv.") else key


def _unused_official_keys(version: str, key: str) -> bool:
    # RWKV-LM gives RWKV-7 layer 0 a value-residual LoRA it never uses (layer 0 *defines* v_first); the official
    # loader replaces it with empty tensors, so dropping it loses nothing.
    return version == "7" and key in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def split_init_state(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Separate merged ``blocks.i.att.time_state`` tensors (a state-tuned model) from the weights."""
    states = {k: v for k, v in state_dict.items() if k.endswith(".att.time_state")}
    weights = {k: v for k, v in state_dict.items() if k not in states}
    return weights, states


def map_state_dict(
    state_dict: Dict[str, torch.Tensor], config: RwkvConfig, dtype: Optional[torch.dtype] = None, progress: bool = True
) -> Dict[str, torch.Tensor]:
    """Official tensors -> the model's parameter names and shapes, checking both key sets and every shape."""
    from .modeling_rwkv_hf import RwkvForCausalLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in RwkvForCausalLM(config).state_dict().items()}
    version = config.rwkv_version
    present = {official_to_hf_key(k) for k in state_dict if not _unused_official_keys(version, k)}
    missing = sorted(hf_to_official_key(k) for k in set(expected) - present)
    unexpected = sorted(hf_to_official_key(k) for k in present - set(expected))
    if missing or unexpected:
        hint = ""
        try:
            other = detect_version({k: state_dict[k] for k in state_dict})
            if other != version:
                hint = f" The keys look like RWKV-{other}."
        except CheckpointError:
            pass
        raise CheckpointError(
            f"The checkpoint does not match RWKV-{version} with {config.num_hidden_layers} layers."
            f" Missing keys ({len(missing)}): {missing[:10]}. Unexpected keys ({len(unexpected)}): {unexpected[:10]}.{hint}"
        )
    out = {}
    for key, tensor in tqdm(state_dict.items(), desc="Converting", disable=not progress, unit="tensor"):
        if _unused_official_keys(version, key):
            continue
        name = official_to_hf_key(key)
        want = expected[name]
        if tuple(tensor.shape) != want:
            if tensor.numel() != math_prod(want) or tensor.dim() < len(want):
                raise CheckpointError(f"{key} has shape {tuple(tensor.shape)}; RWKV-{version} with this config expects {want}")
            tensor = tensor.reshape(want)  # (1, 1, C) mixing vectors -> (C)
        if not tensor.is_floating_point():
            raise CheckpointError(f"{key} has dtype {tensor.dtype}; expected a floating-point tensor")
        out[name] = tensor.to(dtype) if dtype is not None else tensor
    return out


_OFFICIAL_BROADCAST_VECTORS = re.compile(r"\.(time_mix_[kvrg]|time_maa_[xwkvrg]|x_[rwkvag]|w0|a0|v0|k_k|k_a)$")


def export_official_state_dict(model) -> Dict[str, torch.Tensor]:
    """The model's weights in the official RWKV-LM ``.pth`` layout (the inverse of ``map_state_dict``).

    Mixing vectors go back to RWKV-LM's ``(1, 1, C)`` shape, as does RWKV-6's ``time_decay`` (RWKV-4's stays
    ``(C,)`` and RWKV-5.2's ``(H, N)``).
    """
    version = model.config.rwkv_version
    out = {}
    for name, tensor in model.state_dict().items():
        key = hf_to_official_key(name)
        broadcast = _OFFICIAL_BROADCAST_VECTORS.search(key) or (version == "6" and key.endswith(".att.time_decay"))
        if broadcast and tensor.dim() == 1:
            tensor = tensor.reshape(1, 1, -1)
        out[key] = tensor.detach().clone()
    if version == "7":  # RWKV-LM saves layer 0's unused value-residual LoRA; the official loader expects the keys
        C = model.config.hidden_size
        out["blocks.0.att.v0"] = torch.zeros(1, 1, C)
        out["blocks.0.att.v1"] = torch.zeros(C, model.config.v_low_rank_dim)
        out["blocks.0.att.v2"] = torch.zeros(model.config.v_low_rank_dim, C)
    return out


def math_prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------------------------
# The whole conversion
# ---------------------------------------------------------------------------------------------------------


def convert_rwkv_checkpoint(
    checkpoint: Union[str, os.PathLike, Dict[str, torch.Tensor]],
    output_dir: Union[str, os.PathLike],
    *,
    dtype: Optional[Union[str, torch.dtype]] = None,
    tokenizer: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
):
    """Convert an official ``.pth`` (or its state dict) into ``output_dir`` and return the loaded model.

    Args:
        dtype: store the weights in this dtype ("float32", "bfloat16", "float16"); default: as stored.
        tokenizer: "auto" (World vocabulary for 65536-row embeddings, GPT-NeoX 20B for 50277/50304),
            "world", "20b" or "none".
        overwrite: allow writing into a non-empty folder (never deletes files that are not ours).
    """
    from .modeling_rwkv_hf import RwkvForCausalLM, RwkvModel

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass overwrite=True (--overwrite) to write into it")
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}.get(dtype.lower()) or _bad_dtype(dtype)

    source = str(checkpoint) if not isinstance(checkpoint, dict) else "state dict"
    state_dict = load_official_checkpoint(checkpoint) if not isinstance(checkpoint, dict) else validate_tensor_dict(checkpoint)
    weights, init_states = split_init_state(state_dict)
    config = infer_config(weights)
    config.architectures = ["RwkvForCausalLM"]
    tensors = map_state_dict(weights, config, dtype=dtype, progress=progress)

    with torch.device("meta"):
        model = RwkvForCausalLM(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.eval()

    output_dir.mkdir(parents=True, exist_ok=True)
    RwkvConfig.register_for_auto_class()
    RwkvModel.register_for_auto_class("AutoModel")
    RwkvForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    model.config.auto_map = {
        "AutoConfig": "configuration_rwkv_hf.RwkvConfig",
        "AutoModel": "modeling_rwkv_hf.RwkvModel",
        "AutoModelForCausalLM": "modeling_rwkv_hf.RwkvForCausalLM",
    }
    from . import __version__

    model.config.rwkv_hf_version = __version__
    model.config.converted_from = os.path.basename(source)
    model.generation_config = default_generation_config(config)
    model.save_pretrained(output_dir)

    if init_states:
        save_merged_init_state(init_states, config, output_dir / INIT_STATE_FILE)
    _save_tokenizer(tokenizer, config, output_dir)
    return model


def _bad_dtype(dtype):
    raise ValueError(f"Unknown dtype {dtype!r}: expected float32, bfloat16 or float16")


def default_generation_config(config: RwkvConfig):
    from transformers import GenerationConfig

    # No max_new_tokens here: transformers lets a saved max_new_tokens win over a caller's max_length, which
    # cut ChatGLM3-style generate(max_length=500) calls short. chat/stream_chat bring their own length defaults.
    return GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=True, temperature=1.0, top_p=0.3)


def save_merged_init_state(init_states: Dict[str, torch.Tensor], config: RwkvConfig, path: Path):
    """Keep a state-tuned model's ``time_state`` tensors beside the weights, in the official .pth orientation."""
    from safetensors.torch import save_file

    if config.rwkv_version not in ("6", "7") and config.rwkv_version != "5.2":
        raise CheckpointError(f"RWKV-{config.rwkv_version} has no matrix state, yet the checkpoint carries time_state keys")
    H, N = config.num_attention_heads, config.head_size
    for key, tensor in init_states.items():
        if tuple(tensor.shape) != (H, N, N):
            raise CheckpointError(f"{key} has shape {tuple(tensor.shape)}; expected [heads, head_size, head_size] = {[H, N, N]}")
    metadata = {
        "format": "rwkv_hf.init_state",
        "orientation": "pth",  # [head, value, key], as RWKV-LM / RWKV-PEFT save time_state
        "rwkv_version": config.rwkv_version,
        "num_hidden_layers": str(config.num_hidden_layers),
        "num_heads": str(H),
        "head_size": str(N),
        "hidden_size": str(config.hidden_size),
    }
    save_file({k: v.contiguous() for k, v in init_states.items()}, str(path), metadata=metadata)


def _save_tokenizer(choice: str, config: RwkvConfig, output_dir: Path):
    choice = (choice or "none").lower()
    if choice == "auto":
        choice = "world" if config.vocab_size == 65536 else "20b" if config.vocab_size in (50277, 50304) else "none"
    if choice == "none":
        return
    try:
        from .tokenization_rwkv_hf import Rwkv20BTokenizer, RwkvWorldTokenizer
    except ImportError as err:  # pragma: no cover - the tokenizer module ships with the package
        raise RuntimeError(f"The tokenizer module is unavailable: {err}") from err
    if choice == "world":
        tokenizer = RwkvWorldTokenizer()
    elif choice == "20b":
        tokenizer = Rwkv20BTokenizer()
    else:
        raise ValueError(f"Unknown tokenizer {choice!r}: expected auto, world, 20b or none")
    type(tokenizer).register_for_auto_class("AutoTokenizer")
    tokenizer.save_pretrained(output_dir)


def main_convert(args) -> int:
    model = convert_rwkv_checkpoint(
        args.checkpoint, args.output_dir, dtype=args.dtype, tokenizer=args.tokenizer, overwrite=args.overwrite
    )
    config = model.config
    print(
        f"Converted RWKV-{config.rwkv_version}: {config.num_hidden_layers} layers, width {config.hidden_size}, "
        f"vocab {config.vocab_size} -> {args.output_dir}"
    )
    return 0
