"""Convert an official RWKV ``.pth`` checkpoint (RWKV-LM training format) into a transformers folder.

The version and every size are inferred from the keys and the shapes, never from key order or a table of
known model sizes (the official loader misdetects a 1-layer RWKV-5.2 because it scans keys in order).

A checkpoint is untrusted input: every check runs before anything is written, error messages list at most a few
names whatever the file holds, and no structure is sized by a number read from the file (only by what the file
actually contains). The folder is written into a hidden sibling and moved into place only when complete.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import secrets
import shutil
import signal
import threading
import zipfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Set, Tuple, Union

import torch
from tqdm.auto import tqdm

from .configuration_rwkv_hf import REMOTE_CODE_AUTO_MAP, RwkvConfig

INIT_STATE_FILE = "init_state.safetensors"
# At most 18 digits, no leading zero: "blocks.007.x" is not a block key, and int() never meets a 5000-digit index.
_BLOCK_KEY = re.compile(r"^blocks\.(0|[1-9]\d{0,17})\.(.+)$")
_STATE_KEY = re.compile(r"^blocks\.(0|[1-9]\d{0,17})\.att\.time_state$")
_LIST_LIMIT = 8  # names shown in an error message; the rest are counted

# What a stored tensor may be. Integers, quantised types and float8 are not RWKV-LM training weights: casting them
# would silently make a different model.
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_TOKENIZER_CHOICES = ("auto", "world", "20b", "none")


class CheckpointError(ValueError):
    """The file is not an RWKV checkpoint this converter can read; the message says what was wrong."""


def _brief(items, total: Optional[int] = None, limit: int = _LIST_LIMIT, width: int = 80) -> str:
    """``[a, b, ... N more]``: at most ``limit`` items, each cut to ``width`` characters, so that a message stays
    short however many (or however long) names a hostile file holds."""
    items = list(items)
    total = len(items) if total is None else total
    shown = [r if len(r) <= width else r[: width - 3] + "..." for r in map(repr, items[:limit])]
    more = f", ... {total - len(shown)} more" if total > len(shown) else ""
    return f"[{', '.join(shown)}{more}]"


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def load_official_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` with clear errors for the ways a ``.pth`` can be wrong.

    Memory stays within the file's size: zip archives are memory-mapped (after checking that no record is
    compressed), and tensors may not claim more bytes than the file holds.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected an RWKV-LM .pth file")
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    try:
        is_zip = zipfile.is_zipfile(path)
        if is_zip:
            _check_archive(path, size)
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"Could not read {path} as a PyTorch checkpoint ({type(err).__name__}: {_cut(str(err))}). "
            "The file may be truncated (an interrupted download?) or not a .pth file."
        ) from err
    except Exception as err:  # weights_only refuses arbitrary pickles with UnpicklingError
        raise CheckpointError(
            f"{path} is not a plain tensor checkpoint: torch.load(weights_only=True) refused it ({_cut(str(err))}). "
            "Expected a dict of tensors as saved by RWKV-LM."
        ) from err
    state_dict = validate_tensor_dict(state_dict, str(path))
    _check_stored_bytes(state_dict, size, path)
    return state_dict


def _cut(text: str, width: int = 300) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_archive(path: Path, size: int):
    """torch.save stores every record uncompressed; a compressed one (a zip bomb) would be inflated in memory."""
    with zipfile.ZipFile(path) as archive:
        compressed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(
            f"{path} has compressed records {_brief(compressed)}; expected the uncompressed records torch.save "
            f"writes (unpacking them could take far more memory than the file's {size} bytes)"
        )


def _check_stored_bytes(state_dict: Dict[str, torch.Tensor], size: int, path: Path):
    """A 1.5 KB file can hold a stride-0 view of one float claiming 100 million elements; writing it out would
    allocate 400 MB. RWKV-LM stores every tensor in full, so together they never exceed the file."""
    claimed = sum(t.numel() * t.element_size() for t in state_dict.values())
    if claimed > size:
        raise CheckpointError(
            f"{path}: its tensors claim {claimed} bytes in all, more than the file's {size} bytes (tensors that "
            "repeat or overlap the same data); expected every tensor stored in full, as RWKV-LM saves them"
        )


def validate_tensor_dict(state_dict, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """A dict of string keys to dense floating-point tensors, or a ``CheckpointError`` that says what it holds."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source} holds a {type(state_dict).__name__}, expected a dict of tensors (RWKV-LM's .pth)")
    odd_keys = [k for k in state_dict if not isinstance(k, str)]
    if odd_keys:
        raise CheckpointError(
            f"{source} has {len(odd_keys)} keys that are not strings: {_brief(odd_keys)}; expected parameter names "
            "such as 'emb.weight'"
        )
    if {"_strategy", "_version", "_rescale_layer"} & set(state_dict):
        raise CheckpointError(
            f"{source} was pre-converted by the rwkv package for strategy {_cut(repr(state_dict.get('_strategy')))} "
            "(transposed, rescaled and possibly quantised weights). Convert the original training .pth instead."
        )
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source} has non-tensor entries {_brief(bad)}: expected a dict of tensors")
    for key, tensor in state_dict.items():
        _check_tensor_kind(key, tensor)
    return state_dict


def _check_tensor_kind(key: str, tensor: torch.Tensor):
    if tensor.layout != torch.strided:
        raise CheckpointError(f"{_cut(key, 80)} is a {tensor.layout} tensor; expected a dense (strided) tensor")
    if tensor.dtype not in _WEIGHT_DTYPES:
        raise CheckpointError(
            f"{_cut(key, 80)} has dtype {tensor.dtype}; expected a floating-point dtype (float32, bfloat16, float16 "
            "or float64). Integer, quantised and float8 tensors are not RWKV-LM weights, and casting them would "
            "silently change the model."
        )


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
        f"First keys: {_brief(sorted(keys)[:_LIST_LIMIT], total=len(keys))}"
    )


def infer_config(state_dict: Dict[str, torch.Tensor], version: Optional[str] = None, **overrides) -> RwkvConfig:
    """Every size from the shapes."""
    version = version or detect_version(state_dict)

    def dims(key, what):
        return _dims(state_dict, key, what, version)

    vocab_size, hidden_size = dims("emb.weight", "[vocab_size, hidden_size]")
    n_layer = _layer_count(state_dict)
    kwargs = dict(
        rwkv_version=version,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=n_layer,
        attention_hidden_size=dims("blocks.0.att.key.weight", "[attention_hidden_size, hidden_size]")[0],
        intermediate_size=dims("blocks.0.ffn.key.weight", "[intermediate_size, hidden_size]")[0],
    )
    if version in ("5.2", "6"):
        kwargs["head_size"] = dims("blocks.0.att.time_faaaa", "[heads, head_size]")[1]
    if version == "6":
        kwargs["time_mix_extra_dim"] = dims("blocks.0.att.time_maa_w1", "[hidden_size, 5 * extra_dim]")[1] // 5
        kwargs["time_decay_extra_dim"] = dims("blocks.0.att.time_decay_w1", "[hidden_size, extra_dim]")[1]
    if version == "7":
        kwargs["head_size"] = dims("blocks.0.att.r_k", "[heads, head_size]")[1]
        kwargs["decay_low_rank_dim"] = dims("blocks.0.att.w1", "[hidden_size, rank]")[1]
        kwargs["a_low_rank_dim"] = dims("blocks.0.att.a1", "[hidden_size, rank]")[1]
        kwargs["gate_low_rank_dim"] = dims("blocks.0.att.g1", "[hidden_size, rank]")[1]
        v_key = "blocks.1.att.v1" if n_layer > 1 else "blocks.0.att.v1"
        kwargs["v_low_rank_dim"] = dims(v_key, "[hidden_size, rank]")[1] if v_key in state_dict else 32
    kwargs.update(overrides)
    try:
        return RwkvConfig(**kwargs)
    except ValueError as err:
        raise CheckpointError(f"The checkpoint's shapes do not make a valid RWKV-{version} model: {err}") from err


def _dims(state_dict, key: str, what: str, version: str) -> Tuple[int, ...]:
    """The shape of a tensor a size is read from, checked to have the dimensions ``what`` names, none zero."""
    if key not in state_dict:
        raise CheckpointError(f"RWKV-{version} checkpoint is missing {key!r}")
    shape = tuple(state_dict[key].shape)
    if len(shape) != what.count(",") + 1 or 0 in shape:
        raise CheckpointError(f"{key} has shape {shape}; expected {what.count(',') + 1} non-zero dimensions {what}")
    return shape


def _layer_count(keys: Iterable[str]) -> int:
    """The number of blocks, from the block indices actually present, which must be 0..L-1 without gaps.

    Never ``max(index) + 1`` first: one key ``blocks.2000000000.ln1.weight`` would then size a two-billion-element
    structure and a 1.5 MB list of missing blocks.
    """
    ids = sorted({int(m.group(1)) for m in map(_BLOCK_KEY.match, keys) if m})
    if not ids:
        raise CheckpointError("The checkpoint has no 'blocks.N.*' keys; expected blocks 0..L-1")
    if ids[-1] != len(ids) - 1:
        first, count = _gaps(ids)
        raise CheckpointError(
            f"Blocks {_brief(first, total=count)} are missing: the checkpoint has {len(ids)} blocks numbered "
            f"{_brief(ids)}; expected blocks 0..{len(ids) - 1} without gaps"
        )
    return len(ids)


def _gaps(ids: List[int]) -> Tuple[List[int], int]:
    """The first few integers missing from sorted ``ids`` (from 0 on) and how many are missing in all."""
    first, count, previous = [], 0, -1
    for i in ids:
        count += i - previous - 1
        first.extend(range(previous + 1, min(i, previous + 1 + _LIST_LIMIT - len(first))))
        previous = i
    return first, count


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


class _ModelLayout:
    """The official keys and the model's shapes for a config, without building all of its layers.

    A meta model of at most two blocks gives block 0 (the only one with ``ln0``, and in RWKV-7 without the
    value-residual LoRA) and block 1, which every later block repeats: a file claiming 200000 blocks costs two
    here, and the expected keys are generated one at a time rather than held.
    """

    def __init__(self, config: RwkvConfig):
        from .modeling_rwkv_hf import RwkvForCausalLM

        small = copy.deepcopy(config)
        small.num_hidden_layers = min(config.num_hidden_layers, 2)
        with torch.device("meta"):
            shapes = {hf_to_official_key(k): tuple(v.shape) for k, v in RwkvForCausalLM(small).state_dict().items()}
        self.num_layers = config.num_hidden_layers
        self.top: Dict[str, tuple] = {}
        self.blocks: Tuple[Dict[str, tuple], Dict[str, tuple]] = ({}, {})
        for key, shape in shapes.items():
            m = _BLOCK_KEY.match(key)
            if m is None:
                self.top[key] = shape
            else:
                self.blocks[min(int(m.group(1)), 1)][m.group(2)] = shape

    def shape(self, key: str) -> Optional[tuple]:
        """The model's shape for an official key, or None if the model has no such key."""
        m = _BLOCK_KEY.match(key)
        if m is None:
            return self.top.get(key)
        i = int(m.group(1))
        return self.blocks[min(i, 1)].get(m.group(2)) if i < self.num_layers else None

    def keys(self) -> Iterator[str]:
        yield from self.top
        for i in range(self.num_layers):
            for suffix in self.blocks[min(i, 1)]:
                yield f"blocks.{i}.{suffix}"


def _check_key_sets(state_dict: Dict[str, torch.Tensor], layout: _ModelLayout, version: str):
    """Every key the model needs is there and nothing else, reported in a message of bounded length."""
    unexpected = sorted(k for k in state_dict if layout.shape(k) is None and not _unused_official_keys(version, k))
    missing, n_missing = [], 0
    for key in layout.keys():
        if key not in state_dict:
            n_missing += 1
            if len(missing) < _LIST_LIMIT:
                missing.append(key)
    if not (n_missing or unexpected):
        return
    hint = ""
    try:
        other = detect_version(state_dict)
        if other != version:
            hint = f" The keys look like RWKV-{other}."
    except CheckpointError:
        pass
    raise CheckpointError(
        f"The checkpoint does not match RWKV-{version} with {layout.num_layers} layers."
        f" Missing keys ({n_missing}): {_brief(missing, total=n_missing)}."
        f" Unexpected keys ({len(unexpected)}): {_brief(unexpected)}.{hint}"
    )


def map_state_dict(
    state_dict: Dict[str, torch.Tensor], config: RwkvConfig, dtype: Optional[torch.dtype] = None, progress: bool = True
) -> Dict[str, torch.Tensor]:
    """Official tensors -> the model's parameter names and shapes, checking both key sets, every shape and that
    every value is finite (in the target dtype too: float16 overflows where bfloat16 does not)."""
    version = config.rwkv_version
    layout = _ModelLayout(config)
    _check_key_sets(state_dict, layout, version)
    out = {}
    for key, tensor in tqdm(state_dict.items(), desc="Converting", disable=not progress, unit="tensor"):
        if _unused_official_keys(version, key):
            continue
        tensor = _fit_shape(key, tensor, layout.shape(key), version)
        out[official_to_hf_key(key)] = _cast_checked(key, tensor, dtype)
    return out


def _fit_shape(key: str, tensor: torch.Tensor, want: tuple, version: str) -> torch.Tensor:
    if tuple(tensor.shape) == want:
        return tensor
    if tensor.numel() != math_prod(want) or tensor.dim() < len(want):
        raise CheckpointError(f"{key} has shape {tuple(tensor.shape)}; RWKV-{version} with this config expects {want}")
    return tensor.reshape(want)  # (1, 1, C) mixing vectors -> (C)


def _cast_checked(key: str, tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    if not tensor.is_floating_point():  # validate_tensor_dict refuses these; callers with their own dicts may not
        raise CheckpointError(f"{key} has dtype {tensor.dtype}; expected a floating-point tensor")
    out = tensor.to(dtype) if dtype is not None else tensor
    if _all_finite(out):
        return out
    if out is not tensor and _all_finite(tensor):
        raise CheckpointError(
            f"{key} does not fit in {dtype}: some of its values are beyond that dtype's range and would become Inf. "
            f"Expected weights within range; convert with dtype bfloat16 or float32, or keep the stored {tensor.dtype}."
        )
    raise CheckpointError(f"{key} contains NaN or Inf values; expected finite weights (a diverged run or a damaged file?)")


_FINITE_CHUNK = 1 << 24  # elements per isfinite pass: the temporary stays 16 MB whatever the tensor's size


def _all_finite(tensor: torch.Tensor) -> bool:
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK))


def check_init_states(init_states: Dict[str, torch.Tensor], config: RwkvConfig):
    """A merged tuned state is one finite ``[heads, head_size, head_size]`` tensor for each layer 0..L-1 (what
    RWKV-PEFT saves, and what loading the converted folder requires)."""
    if not init_states:
        return
    version = config.rwkv_version
    if version not in ("5.2", "6", "7"):
        raise CheckpointError(
            f"RWKV-{version} has no matrix state, yet the checkpoint carries time_state keys {_brief(sorted(init_states))}"
        )
    L, H, N = config.num_hidden_layers, config.num_attention_heads, config.head_size
    wanted = [f"blocks.{i}.att.time_state" for i in range(L)]
    missing = [k for k in wanted if k not in init_states]
    unexpected = sorted(set(init_states) - set(wanted))
    if missing or unexpected:
        raise CheckpointError(
            f"The merged time_state keys must be exactly one per layer, blocks 0..{L - 1}. Missing "
            f"({len(missing)}): {_brief(missing)}. Unexpected ({len(unexpected)}): {_brief(unexpected)}."
        )
    for key, tensor in init_states.items():
        if tuple(tensor.shape) != (H, N, N):
            raise CheckpointError(f"{key} has shape {tuple(tensor.shape)}; expected [heads, head_size, head_size] = {[H, N, N]}")
        if not _all_finite(tensor):
            raise CheckpointError(f"{key} contains NaN or Inf values; expected a finite tuned state")


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
    """Convert an official ``.pth`` (or its state dict, or another library's folder: see ``layouts.py``) into
    ``output_dir`` and return the loaded model.

    Args:
        dtype: store the weights in this dtype ("float32", "bfloat16", "float16"); default: as stored.
        tokenizer: "auto" (World vocabulary for 65536-row embeddings, GPT-NeoX 20B for 50277/50304),
            "world", "20b" or "none".
        overwrite: allow converting into a non-empty folder. Only the converter's own files change there:
            a file this conversion writes replaces the one of the same name (a symlink of that name is replaced
            by a regular file; its target is left alone); a file an earlier ``rwkv_hf`` conversion wrote there
            (its config.json says so) and this one does not is removed: a stale ``init_state.safetensors``
            (only if the converter wrote it), ``model.safetensors`` or a shard index with the shards it lists,
            the files of a tokenizer of ours. Everything else stays. A file this conversion does not write but
            ``from_pretrained`` would load with the new weights (a foreign ``init_state.safetensors``) is
            refused rather than kept or deleted, and so is a folder named like one of our files.

    Every argument and the destination are checked before any work; the folder is written into a hidden
    sibling and moved into place only when complete, so an error or Ctrl-C leaves the destination as it was.
    """
    dtype = _parse_dtype(dtype)
    tokenizer_choice = _parse_tokenizer_choice(tokenizer)
    dest = _check_destination(output_dir, overwrite)
    with _staging_folder(dest) as staging:
        model, init_states, tokenizer_obj = _convert_in_memory(checkpoint, dtype, tokenizer_choice, progress)
        _write_folder(staging, model, init_states, tokenizer_obj)
        _move_into_place(staging, dest)
    return model


def model_from_folder(folder, dtype=None):
    """Another library's folder (see ``layouts.py``) as this package's model, in memory: what
    ``RwkvForCausalLM.from_pretrained`` returns for such a folder. ``dtype``: as in ``convert_rwkv_checkpoint``."""
    model, _, _ = _convert_in_memory(Path(folder), _parse_dtype(None if dtype == "auto" else dtype), "none", False)
    return model


def _parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    raise ValueError(f"Unknown dtype {dtype!r}: expected float32, bfloat16 or float16 (or none to keep the stored one)")


def _parse_tokenizer_choice(choice) -> str:
    if choice is None:
        return "none"
    if isinstance(choice, str) and choice.lower() in _TOKENIZER_CHOICES:
        return choice.lower()
    raise ValueError(f"Unknown tokenizer {choice!r}: expected auto, world, 20b or none")


def _convert_in_memory(checkpoint, dtype, tokenizer_choice: str, progress: bool):
    """Read and check everything, build the model on the checkpoint's tensors; nothing is written yet."""
    from .modeling_rwkv_hf import RwkvForCausalLM

    if isinstance(checkpoint, dict):
        source, state_dict = "state dict", validate_tensor_dict(checkpoint)
    elif Path(checkpoint).is_dir():  # another library's model folder (see layouts.py)
        from .layouts import read_folder

        source, state_dict = str(checkpoint), validate_tensor_dict(read_folder(Path(checkpoint)), str(checkpoint))
    else:
        source, state_dict = str(checkpoint), load_official_checkpoint(checkpoint)
    weights, init_states = split_init_state(state_dict)
    config = infer_config(weights)
    config.architectures = [RwkvForCausalLM.__name__]  # the class's own name, RwkvHfForCausalLM (not the alias)
    tensors = map_state_dict(weights, config, dtype=dtype, progress=progress)
    check_init_states(init_states, config)
    tokenizer = _make_tokenizer(tokenizer_choice, config)

    with torch.device("meta"):
        model = RwkvForCausalLM(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.eval()
    model.config.auto_map = dict(REMOTE_CODE_AUTO_MAP)
    from . import __version__

    model.config.rwkv_hf_version = __version__
    model.config.converted_from = os.path.basename(source)  # also marks the folder as ours for a later --overwrite
    model.generation_config = default_generation_config(config)
    return model, init_states, tokenizer


def _make_tokenizer(choice: str, config: RwkvConfig):
    """The tokenizer to ship, or None; one whose ids would index past the embedding is refused."""
    if choice == "auto":
        choice = "world" if config.vocab_size == 65536 else "20b" if config.vocab_size in (50277, 50304) else "none"
    if choice == "none":
        return None
    from .tokenization_rwkv_hf import Rwkv20BTokenizer, RwkvWorldTokenizerFast

    # World: the fast class, so the folder carries a tokenizer.json too (and the vocabulary file it is built from)
    tokenizer = RwkvWorldTokenizerFast() if choice == "world" else Rwkv20BTokenizer()
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"The {choice} tokenizer has {len(tokenizer)} tokens but the model's embedding has {config.vocab_size} "
            f"rows, so its ids would index past the embedding; expected at least {len(tokenizer)} rows. Pick the "
            "model's own tokenizer, or tokenizer none."
        )
    return tokenizer


def _write_folder(folder: Path, model, init_states: Dict[str, torch.Tensor], tokenizer):
    from .modeling_rwkv_hf import RwkvForCausalLM, RwkvModel

    RwkvConfig.register_for_auto_class()
    RwkvModel.register_for_auto_class("AutoModel")
    RwkvForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(folder)
    if init_states:
        save_merged_init_state(init_states, model.config, folder / INIT_STATE_FILE)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, folder)


def default_generation_config(config: RwkvConfig):
    from transformers import GenerationConfig

    # No max_new_tokens here: transformers lets a saved max_new_tokens win over a caller's max_length, which
    # cut ChatGLM3-style generate(max_length=500) calls short. chat/stream_chat bring their own length defaults.
    return GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=True, temperature=1.0, top_p=0.3)


_INIT_STATE_FORMAT = "rwkv_hf.init_state"  # state_rwkv_hf.FORMAT_TAG
_CONVERTER_MARK = "rwkv_hf convert"


def save_merged_init_state(init_states: Dict[str, torch.Tensor], config: RwkvConfig, path: Path):
    """Keep a state-tuned model's ``time_state`` tensors beside the weights, in the official .pth orientation."""
    from safetensors.torch import save_file

    check_init_states(init_states, config)
    H, N = config.num_attention_heads, config.head_size
    metadata = {
        "format": _INIT_STATE_FORMAT,
        "orientation": "pth",  # [head, value, key], as RWKV-LM / RWKV-PEFT save time_state
        "written_by": _CONVERTER_MARK,  # a later --overwrite may remove this file, not one the user saved there
        "rwkv_version": config.rwkv_version,
        "num_hidden_layers": str(config.num_hidden_layers),
        "num_heads": str(H),
        "head_size": str(N),
        "hidden_size": str(config.hidden_size),
    }
    save_file({k: v.contiguous() for k, v in init_states.items()}, str(path), metadata=metadata)


def _save_tokenizer(tokenizer, folder: Path):
    type(tokenizer).register_for_auto_class("AutoTokenizer")
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------
# The destination: checked first, written through a hidden sibling, replaced file by file at the end
# ---------------------------------------------------------------------------------------------------------


def _check_destination(output_dir, overwrite: bool) -> Path:
    """The folder to convert into, as a real path; refused before any work if it cannot be used."""
    path = Path(output_dir)
    if os.path.lexists(path) and not path.is_dir():
        what = "a broken symlink" if not path.exists() else "a file"
        raise NotADirectoryError(f"{path} is {what}; expected a folder to convert into (or a path that does not exist yet)")
    # A symlink to a folder means that folder; staging beside its real path keeps the final renames on one filesystem.
    dest = Path(os.path.realpath(path))
    if dest.is_dir():
        _require_writable(dest, "the output folder")
        if not overwrite and any(dest.iterdir()):
            raise FileExistsError(f"{dest} is not empty; pass overwrite=True (--overwrite) to write into it")
    _require_writable(_nearest_existing(dest.parent), "where the output folder and its temporary sibling go")
    return dest


def _nearest_existing(folder: Path) -> Path:
    while not os.path.lexists(folder):
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, so no folder can be created inside it; expected a folder")
    return folder


def _require_writable(folder: Path, role: str):
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write to {folder} ({role}): it is read-only or not yours; expected a writable folder")


@contextlib.contextmanager
def _staging_folder(dest: Path):
    """A hidden, empty sibling of ``dest`` (same filesystem, so moving out of it is a rename) to write the whole
    conversion into. Removed on the way out whatever happens; so are the parents made for it if no output came."""
    created = _make_parents(dest.parent)
    staging = dest.parent / f".{dest.name}.rwkv_hf-convert-{secrets.token_hex(4)}"
    try:
        staging.mkdir()  # with the umask, unlike mkdtemp's 0o700: it may become the output folder itself
        yield staging
    finally:
        if os.path.lexists(staging):
            shutil.rmtree(staging, ignore_errors=True)
        if not os.path.lexists(dest):
            _remove_empty_folders(created)


def _make_parents(folder: Path) -> List[Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first."""
    created = []
    while not os.path.lexists(folder):
        created.append(folder)
        folder = folder.parent
    if created:
        created[0].mkdir(parents=True)
    return created


def _remove_empty_folders(folders: List[Path]):
    for folder in folders:  # deepest first; stops at the first one something else has put files in
        try:
            folder.rmdir()
        except OSError:
            break


def _move_into_place(staging: Path, dest: Path):
    """Make the finished conversion the destination: one rename for a new folder, otherwise a swap of the files
    involved that is undone if anything fails. Ctrl-C waits until either is complete."""
    produced = sorted(os.listdir(staging))
    if not os.path.lexists(dest):
        with _ctrl_c_deferred():
            os.rename(staging, dest)
        return
    displaced = _files_to_displace(dest, set(produced))
    aside = staging / ".rwkv_hf-replaced"  # leaves with the staging folder once the swap succeeds
    aside.mkdir()
    with _ctrl_c_deferred():
        _swap_files(staging, dest, produced, displaced, aside)


def _swap_files(staging: Path, dest: Path, produced: List[str], displaced: List[str], aside: Path):
    """Move the old files aside (renames move a symlink itself, never its target), then the new ones in; on any
    failure, put everything back as it was."""
    moved_aside, moved_in = [], []
    try:
        for name in displaced:
            os.replace(dest / name, aside / name)
            moved_aside.append(name)
        for name in produced:
            os.replace(staging / name, dest / name)
            moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            os.replace(dest / name, staging / name)
        for name in reversed(moved_aside):
            os.replace(aside / name, dest / name)
        raise


# Files transformers would load with the new weights if they were left beside them, and why that would be wrong.
_LOADED_WITH_THE_MODEL = {
    INIT_STATE_FILE: "from_pretrained would mount it as the new model's default initial state",
    "model.safetensors": "from_pretrained would load it instead of the new sharded weights",
}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _files_to_displace(dest: Path, produced: Set[str]) -> List[str]:
    """The names in ``dest`` that make way for the new files: those we write now, and those an earlier conversion
    wrote that we do not write now. Raises, before anything moves, for what we may neither keep nor remove."""
    stale = _written_by_a_previous_conversion(dest) - produced
    foreign = sorted(n for n in set(_LOADED_WITH_THE_MODEL) - produced - stale if os.path.lexists(dest / n))
    if foreign:
        reasons = "; ".join(f"{n}: {_LOADED_WITH_THE_MODEL[n]}" for n in foreign)
        raise FileExistsError(
            f"{dest} has files that no rwkv_hf conversion wrote and that this one does not replace ({reasons}). "
            "Move them away or convert into another folder; the converter does not delete files it did not write."
        )
    displaced = sorted({n for n in produced if os.path.lexists(dest / n)} | stale)
    folders = [n for n in displaced if (dest / n).is_dir() and not (dest / n).is_symlink()]
    if folders:
        raise IsADirectoryError(
            f"{dest} has folders named like files the conversion writes: {_brief(folders)}; expected files (or "
            "nothing) there. Move them away; the converter does not delete folders."
        )
    return displaced


def _written_by_a_previous_conversion(dest: Path) -> Set[str]:
    """The names in ``dest`` that an earlier ``rwkv_hf`` conversion wrote, judged from what its files record
    (its config.json's ``converted_from``, the shards its index lists, the init state's and the tokenizer's own
    markers); empty if the folder was not converted by us."""
    config = _read_small_json(dest / "config.json")
    if not (isinstance(config, dict) and config.get("model_type") == "rwkv_hf" and "converted_from" in config):
        return set()
    names = {"config.json", "generation_config.json", *_WEIGHT_FILES, *_listed_shards(dest)}
    if _init_state_by_the_converter(dest / INIT_STATE_FILE):
        names.add(INIT_STATE_FILE)
    names |= _our_tokenizer_files(dest)
    return {n for n in names if os.path.lexists(dest / n)}


def _read_small_json(path: Path, limit: int = 16 << 20):
    """A JSON file we may have written, or None: never through a symlink (we write regular files), never a huge one."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > limit:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _listed_shards(dest: Path) -> Set[str]:
    index = _read_small_json(dest / "model.safetensors.index.json")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return set()
    # plain shard names only: an index naming "../x" must not make us remove files outside the folder
    return {v for v in weight_map.values() if isinstance(v, str) and _SHARD_NAME.fullmatch(v)}


def _init_state_by_the_converter(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable: not something we can vouch for
        return False
    # Converters before the "written_by" mark wrote our format without the "source" that save_pretrained's states have.
    return meta.get("written_by") == _CONVERTER_MARK or (meta.get("format") == _INIT_STATE_FORMAT and "source" not in meta)


def _our_tokenizer_files(dest: Path) -> Set[str]:
    from .tokenization_rwkv_hf import Rwkv20BTokenizer, RwkvWorldTokenizerFast

    config = _read_small_json(dest / "tokenizer_config.json")
    name = config.get("tokenizer_class") if isinstance(config, dict) else None
    # "RwkvWorldTokenizer" is what transformers writes for either World class: own the fast one's files too
    ours = {"RwkvWorldTokenizer": RwkvWorldTokenizerFast, "RwkvWorldTokenizerFast": RwkvWorldTokenizerFast,
            "Rwkv20BTokenizer": Rwkv20BTokenizer}
    if name not in ours:
        return set()  # the user's own tokenizer (e.g. kept with tokenizer none) stays
    common = {"tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenization_rwkv_hf.py"}
    return common | set(ours[name].vocab_files_names.values())


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Hold Ctrl-C for the few renames of the final move, so that the folder is never left half old, half new;
    it is delivered as soon as they are done (or undone)."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None:  # not the main thread, or a handler installed outside Python: nothing to hold
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)


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
