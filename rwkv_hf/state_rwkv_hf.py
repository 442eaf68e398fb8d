"""Initial states ("state tuning" results): files, the model's initial-state module, and mounting.

An RWKV model can start every fresh sequence from a tuned initial WKV state instead of zeros. That state is
what RWKV-LM / RWKV-PEFT train with ``--train_type state`` and what Ai00 / RWKV-Runner "mount".

The three containers of the ecosystem hold the same per-layer matrix in two orientations, and the orientation
depends on the container, not on the RWKV version (a square matrix cannot tell):

========================  =========================================  ==========================================
container                 tensor ``blocks.{i}.att.time_state``       written by
========================  =========================================  ==========================================
``.pth``                  ``[heads, value, key]``, bf16              RWKV-LM / RWKV-PEFT (``torch.save``)
``.state`` / ``.st``      ``[heads, key, value]``, **F16 only**      web-rwkv / RWKV-Runner ``convert_safetensors.py``
                                                                     (safetensors, ``transpose(-2, -1).half()``)
``.safetensors`` (ours)   orientation in the metadata (``pth``),     this module and the converter's
                          fp32, plus a fingerprint of the base model  ``init_state.safetensors``
========================  =========================================  ==========================================

Our format also records the identity of the model a state was saved from: version, shapes and a hash of its
weights (``model_weights_hash``). ``load_init_state`` refuses a state from other weights of the same shape unless
``allow_other_model=True``; ``.pth`` / ``.state`` files carry no identity and load on shapes and version, as
everywhere in the ecosystem. A state with NaN/Inf is refused wherever it enters.

Inside the model the state lives in the cache layout (``cache_rwkv_hf``): RWKV-5.2/6 ``[key, value]``, RWKV-7
``[value, key]``. So a ``.pth`` tensor is transposed for v5.2/v6 and used as is for v7 (the official package
transposes for v5/v6 only; RWKV-Runner uses v7 states as is), and a ``.state`` tensor the other way round.
RWKV-4's state (aa, bb, pp) is not a matrix and nothing in the ecosystem tunes it: it is refused.

The model side is one module, ``RwkvInitState``, set as ``RwkvModel.init_state``. It holds named states
(plain tensors, not weights: they stay out of ``state_dict``) and, when trained without PEFT, one trainable
state (parameters). ``RwkvModel`` asks it for ``layer_states(batch, dtype, device, name)`` whenever a forward
starts a fresh sequence. ``name`` selects: ``None`` the default, ``"a"`` a named state, ``["a", "b", None]`` one
per batch row, ``{"a": 0.7, "b": 0.3}`` a weighted mix.

This file is copied next to the modeling code for ``trust_remote_code``: it imports only torch, safetensors,
transformers, the standard library and sibling modules.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .cache_rwkv_hf import RwkvCache

INIT_STATE_FILE = "init_state.safetensors"  # the converter writes a merged time_state here
FORMAT_TAG = "rwkv_hf.init_state"
DEFAULT_NAME = "default"  # the name an unnamed state is stored under
SUPPORTED_VERSIONS = ("5.2", "6", "7")

_STATE_KEY = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.att\.time_state$")
_TIME_SHIFT_KEY = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.att\.shift_state$")  # our extension: tuned token shifts
_CHANNEL_SHIFT_KEY = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.ffn\.shift_state$")
_FORMATS = ("pth", "state", "safetensors")
_EXTENSIONS = {
    ".pth": "pth",
    ".pt": "pth",
    ".bin": "pth",
    ".state": "state",
    ".st": "state",
    ".safetensors": "safetensors",
}

PathLike = Union[str, os.PathLike]

logger = logging.getLogger(__name__)


class StateFileError(ValueError):
    """A state file (or tensor dict) is unreadable, malformed, or made for another model; the message says which."""


# ---------------------------------------------------------------------------------------------------------
# The official naming scheme: rwkv7-g1-2.9b-20250519-ctx4096-<purpose>, rwkv-x060-<purpose>-3B-20240505-ctx1024
# ---------------------------------------------------------------------------------------------------------

_ARCH = re.compile(r"^rwkv[-_ ]?(?:x0?(\d)(\d)|(\d)(?:\.(\d))?)(?=[-_ ]|$)", re.IGNORECASE)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([bm])$|^(\d+)b(\d+)$", re.IGNORECASE)
_FAMILY = re.compile(r"^(world|pile|raven|novel|g\d[a-z]?)$", re.IGNORECASE)


def parse_state_name(name: str) -> Dict[str, str]:
    """Fields of an official state/model file name (reference: rwkv.cn "RWKV state file naming").

    Returns the fields that were found among ``version`` ("5.2"/"6"/"7"), ``family`` (World, G1 ...),
    ``data_version``, ``size`` ("2.9B"), ``purpose``, ``date``, ``ctx``. Unrecognised names give ``{}``.

    >>> parse_state_name("rwkv7-g1-2.9b-20250519-ctx4096-chat.pth")["size"]
    '2.9B'
    """
    stem = Path(str(name)).name
    for ext in _EXTENSIONS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    arch = _ARCH.match(stem)
    if arch is None:
        return {}
    major, minor = (arch.group(1), arch.group(2)) if arch.group(1) else (arch.group(3), arch.group(4) or "")
    # x060 -> 6, x070 -> 7, x052 -> 5.2; a bare "5" is RWKV-5.2 (the only RWKV-5 that was released as World).
    version = major if minor in ("", "0") else f"{major}.{minor}"
    out = {"version": "5.2" if version == "5" else version}
    purpose = []
    for seg in stem[arch.end() :].lstrip("-_ ").split("-"):
        if not seg:
            continue
        size = _SIZE.match(seg)
        if size:
            out["size"] = (
                f"{size.group(1)}{size.group(2).upper()}" if size.group(1) else f"{size.group(3)}.{size.group(4)}B"
            )
        elif re.fullmatch(r"20\d{6}", seg):
            out["date"] = seg
        elif re.fullmatch(r"ctx\d+", seg, re.IGNORECASE):
            out["ctx"] = seg[3:]
        elif re.fullmatch(r"v\d+(?:\.\d+)?", seg, re.IGNORECASE):
            out["data_version"] = seg[1:]
        elif _FAMILY.match(seg):
            out["family"] = seg.capitalize() if seg.isalpha() else seg.upper()
        else:
            purpose.append(seg)
    if purpose:
        out["purpose"] = "-".join(purpose)
    return out


def _describe_name(info: Mapping[str, str]) -> str:
    parts = [f"RWKV-{info['version']}"] + [info[k] for k in ("family", "size") if k in info]
    extra = ", ".join(f"{k} {info[k]}" for k in ("data_version", "purpose", "ctx", "date") if k in info)
    return " ".join(parts) + (f" ({extra})" if extra else "")


# ---------------------------------------------------------------------------------------------------------
# InitState: one state, in the model's cache layout
# ---------------------------------------------------------------------------------------------------------


@dataclass
class InitState:
    """One initial state for every layer, in the cache layout of ``rwkv_version`` (see the module docstring).

    ``wkv``: [layers, heads, N, N] fp32. ``time_shift`` / ``channel_shift``: [layers, width] or None (zeros:
    the ecosystem never stores them). ``source``: where it came from (for messages); ``base_model``: the
    name of the model it was tuned on, when known; ``model_hash``: ``model_weights_hash`` of that model, when
    known (loading the state into a model with other weights is then refused, see ``load_init_state``).
    """

    rwkv_version: str
    wkv: torch.Tensor
    time_shift: Optional[torch.Tensor] = None
    channel_shift: Optional[torch.Tensor] = None
    source: str = "tensors"
    base_model: Optional[str] = None
    name_info: Dict[str, str] = field(default_factory=dict)
    model_hash: Optional[str] = None

    @property
    def num_layers(self) -> int:
        return self.wkv.shape[0]

    @property
    def num_heads(self) -> int:
        return self.wkv.shape[1]

    @property
    def head_size(self) -> int:
        return self.wkv.shape[2]

    def to(self, device=None) -> "InitState":
        move = lambda t: None if t is None else t.to(device=device)  # noqa: E731
        return InitState(
            self.rwkv_version,
            move(self.wkv),
            move(self.time_shift),
            move(self.channel_shift),
            self.source,
            self.base_model,
            dict(self.name_info),
            self.model_hash,
        )

    def pth_tensors(self) -> List[torch.Tensor]:
        """Per-layer [heads, value, key] tensors (the ``.pth`` orientation)."""
        return [_cache_to_pth(self.rwkv_version, s) for s in self.wkv.unbind(0)]

    @classmethod
    def from_pth_tensors(cls, rwkv_version: str, tensors: Sequence[torch.Tensor], **kwargs) -> "InitState":
        wkv = torch.stack([_pth_to_cache(rwkv_version, t.float()) for t in tensors])
        return cls(rwkv_version, wkv.contiguous(), **kwargs)


def _pth_to_cache(version: str, t: torch.Tensor) -> torch.Tensor:
    # .pth is [h, value, key]; the cache is [h, key, value] for v5.2/v6 and [h, value, key] for v7.
    return t if version == "7" else t.transpose(-2, -1)


def _cache_to_pth(version: str, t: torch.Tensor) -> torch.Tensor:
    return t if version == "7" else t.transpose(-2, -1)


def _fingerprint_config(config) -> Dict[str, str]:
    return {
        "rwkv_version": str(config.rwkv_version),
        "num_hidden_layers": str(config.num_hidden_layers),
        "num_heads": str(config.num_attention_heads),
        "head_size": str(config.head_size),
        "hidden_size": str(config.hidden_size),
    }


def _human_size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _describe_config(config, n_params: Optional[int] = None) -> str:
    size = f", {_human_size(n_params)} parameters" if n_params else ""
    return (
        f"RWKV-{config.rwkv_version} with {config.num_hidden_layers} layers of {config.num_attention_heads} heads x "
        f"{config.head_size} (width {config.hidden_size}{size})"
    )


def _check_supported(config) -> None:
    if str(config.rwkv_version) not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"RWKV-{config.rwkv_version} has no matrix-valued WKV state (its state is aa/bb/pp per channel): initial "
            "states, state files and state tuning exist for RWKV-5.2, 6 and 7 only (Ai00 refuses v4 states too)."
        )


# ---------------------------------------------------------------------------------------------------------
# A state's identity: the version, the shapes and a hash of the weights it was tuned on / saved from
# ---------------------------------------------------------------------------------------------------------

HASH_KEY = "base_model_hash"  # metadata key (our .safetensors) and model_identity key (PEFT adapter config)
_HASH_SCHEME = "w1"  # bump when what model_weights_hash reads changes: other schemes are reported, not compared
_SAMPLES_PER_TENSOR = 64
_TINY = 2.0**-14  # below fp16's normal range: flushed to zero before hashing (see model_weights_hash)
# Components that wrappers add to parameter names (FSDP, activation checkpointing, torch.compile): not the model's.
_WRAPPER_NAMES = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


def _weight_tensors(module: nn.Module, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """The model's own weights as (name, tensor): PEFT wrappers are looked through (their ``base_layer`` /
    ``original_module`` counts, the adapter weights do not) and the initial-state slot is skipped."""
    for name, param in module.named_parameters(recurse=False):
        yield prefix + name, param
    for name, child in module.named_children():
        if name == "init_state":
            continue  # the states themselves (trainable or PEFT-wrapped) are not the base model
        for attr in ("base_layer", "original_module"):  # a LoRA layer / modules_to_save wrapper: what it wraps
            inner = getattr(child, attr, None)
            if isinstance(inner, nn.Module):
                child = inner
                break
        child_prefix = prefix if name in _WRAPPER_NAMES else f"{prefix}{name}."
        yield from _weight_tensors(child, child_prefix)


def _strided_sample(t: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` evenly spaced elements of ``t`` (all of them when it has fewer), gathered without copying ``t``."""
    n = t.numel()
    index = torch.arange(min(k, n), device=t.device, dtype=torch.long) * n // min(k, n)
    if t.is_contiguous():
        return t.reshape(-1)[index]  # a view, then a gather of k elements
    coords = []
    for size in reversed(t.shape):  # unravel by hand: torch.unravel_index needs torch 2.2
        coords.append(index % size)
        index = index // size
    return t[tuple(reversed(coords))]


def model_weights_hash(model) -> Optional[str]:
    """A short content hash of an RWKV model's weights (e.g. ``"w1:3f9c0a..."``): the identity a saved state
    records, so that it is not mounted on another model of the same shape. None if the weights are not readable
    here (on the meta device: offloaded, or not loaded yet).

    What is hashed: the RWKV version, then for every weight tensor of the ``RwkvModel`` (embedding, blocks,
    final norm; sorted by name) its name, its shape and 64 evenly spaced elements. The LM head is left out:
    no state depends on it, and a state saved from ``RwkvForCausalLM`` must match an ``RwkvModel`` too.

    Why that suffices: two separately trained or fine-tuned models differ in practically every weight, so 64
    values from each of the hundreds of tensors cannot all agree by chance; this guards against an honest
    mix-up of same-sized models, not a forger (who could write any metadata anyway). A model that differs only
    where the sample does not look (say a few added embedding rows) counts as the same base, which for the state
    it is. Cost: 64 elements per tensor are read, nothing is copied, whatever the model size.

    Precision: elements are rounded to bfloat16, with magnitudes below 2^-14 taken as 0, so the fp32, bf16 and
    fp16 copies of weights published in bf16 (as official RWKV checkpoints are) hash alike: fp16 holds every
    such bf16 value exactly. Weights trained in fp32 and cast to fp16 round differently and hash differently;
    load their states with ``allow_other_model=True``.
    """
    base = _rwkv_model(model)
    digest = hashlib.sha256(f"{_HASH_SCHEME}|RWKV-{base.config.rwkv_version}".encode())
    for name, tensor in sorted(_weight_tensors(base), key=lambda item: item[0]):
        # Meta: offloaded or not loaded. Sharded (FSDP2 DTensor): reading it is a collective, and a rank's shard
        # is not the model; the caller records no hash rather than a wrong one or a hang.
        if tensor.device.type == "meta" or hasattr(tensor, "to_local"):
            return None
        sample = _strided_sample(tensor.detach(), _SAMPLES_PER_TENSOR).float()
        sample = torch.where(sample.abs() < _TINY, torch.zeros_like(sample), sample)  # also makes -0.0 +0.0
        bits = sample.to(torch.bfloat16).view(torch.int16).cpu()
        digest.update(f"|{name}{list(tensor.shape)}|".encode())
        digest.update(bits.numpy().tobytes())
    return f"{_HASH_SCHEME}:{digest.hexdigest()[:16]}"


def _model_identity(base) -> Dict[str, str]:
    """What our files and adapters record about the model: version, shapes, and the weights hash if readable."""
    identity = _fingerprint_config(base.config)
    weights = model_weights_hash(base)
    if weights is not None:
        identity[HASH_KEY] = weights
    return identity


def _describe_fingerprint(meta: Mapping[str, str]) -> str:
    return (
        f"RWKV-{meta.get('rwkv_version', '?')} with {meta.get('num_hidden_layers', '?')} layers of "
        f"{meta.get('num_heads', '?')} heads x {meta.get('head_size', '?')} (width {meta.get('hidden_size', '?')})"
    )


def _check_same_weights(
    recorded: Mapping[str, str],
    model_hash: Callable[[], Optional[str]],
    *,
    what: str,
    model_desc: str,
    allow_other_model: bool,
    override: str,
    quiet_if_unrecorded: bool = False,
) -> None:
    """Refuse ``what`` when the weights hash it records is not this model's (``model_hash()``, computed only
    when there is something to compare). ``override``: how the caller's user says "load it anyway".
    ``quiet_if_unrecorded``: no hash is expected (log at INFO, not WARNING)."""
    theirs = recorded.get(HASH_KEY)
    if not theirs:
        # The hash is new: what older rwkv_hf versions saved records version and shapes only. Accepted, as
        # before, but said: nothing tells it apart from a state of another model of the same shape.
        logger.log(
            logging.INFO if quiet_if_unrecorded else logging.WARNING,
            "%s records no hash of the weights it was saved from (saved by an older rwkv_hf?), so it cannot be "
            "told apart from a state of another model of the same shape: loading it unchecked. Saving it again "
            "records this model's hash.",
            what,
        )
        return
    if not theirs.startswith(_HASH_SCHEME + ":"):
        logger.warning(
            "%s records a weights hash of an unknown kind (%s; this rwkv_hf writes %s:...): not compared. "
            "Upgrade rwkv_hf to check it.",
            what,
            theirs,
            _HASH_SCHEME,
        )
        return
    ours = model_hash()
    if ours is None:
        logger.warning("%s: this model's weights are not readable here (meta device): not compared.", what)
        return
    if ours == theirs:
        return
    tuned_on = f" ({recorded['base_model']})" if recorded.get("base_model") else ""
    message = (
        f"{what} was saved from a model{tuned_on} whose weights hash to {theirs}, but this model's weights hash to "
        f"{ours} ({model_desc}). The shapes fit, but a state only works with the weights it was tuned on. If this "
        f"is the same model in another precision or lightly fine-tuned, {override} to load it anyway."
    )
    if not allow_other_model:
        raise StateFileError(message)
    logger.warning("%s Loading it anyway, as asked.", message)


_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _require_finite(tensor: torch.Tensor, what: str, source: str) -> None:
    """Refuse NaN/Inf in ``tensor`` (one row per layer along dim 0), naming the layers that have them."""
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    rows = (~finite.reshape(tensor.shape[0], -1).all(1)).nonzero().flatten().tolist()
    layers = ", ".join(map(str, rows[:8])) + ("..." if len(rows) > 8 else "")
    found = " and ".join(k for k, f in (("NaN", torch.isnan), ("Inf", torch.isinf)) if bool(f(tensor).any()))
    raise StateFileError(
        f"{source}: {what} of layer{'s' if len(rows) > 1 else ''} {layers} contains {found}; a state must hold "
        "finite numbers only"
    )


def _require_finite_triple(triple, source: str) -> None:
    """The same for a state's (wkv, time_shift, channel_shift), each [layers, ...] or None."""
    for tensor, what in zip(triple, ("the WKV state", "the time-mix shift state", "the channel-mix shift state")):
        if tensor is not None:
            _require_finite(tensor.detach(), what, source)


# ---------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _RawState:
    """What a file holds, before it is checked against a model."""

    layers: Dict[int, torch.Tensor]  # layer -> [H, N, N] in ``orientation``
    orientation: str  # "pth" ([h, value, key]) or "state" ([h, key, value])
    source: str
    metadata: Dict[str, str] = field(default_factory=dict)
    time_shift: Dict[int, torch.Tensor] = field(default_factory=dict)
    channel_shift: Dict[int, torch.Tensor] = field(default_factory=dict)
    from_file: bool = True  # False for an InitState in memory: "no hash" then means nothing about rwkv_hf versions


def _sniff_format(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: a little-endian u64 header length, then the JSON header. Checked first: that length's low
    # byte may well be 0x80, a pickle's first byte.
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save zip, or a legacy pickle
        return "pth"
    ext = _EXTENSIONS.get(path.suffix.lower())
    if ext is None:
        raise StateFileError(f"{path} is neither a PyTorch .pth file nor a safetensors (.state/.safetensors) file")
    return "pth" if ext == "pth" else "safetensors"


def _read_pth(path: Path) -> _RawState:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # truncated zip, not a pickle, or a pickle weights_only refuses
        raise StateFileError(
            f"Could not read {path} as a PyTorch .pth state ({type(err).__name__}: {err}). The file may be truncated "
            "or not a state file."
        ) from err
    return _raw_from_dict(data, str(path), orientation="pth")


def _read_safetensors(path: Path) -> _RawState:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # SafetensorError for a corrupted header, OSError for a short file
        raise StateFileError(
            f"Could not read {path} as a safetensors state ({type(err).__name__}: {err}). The file is corrupted or "
            "truncated, or not a safetensors file."
        ) from err
    if metadata.get("format") == FORMAT_TAG:
        orientation = metadata.get("orientation", "pth")
        if orientation not in ("pth", "state"):
            raise StateFileError(
                f"{path}: unknown orientation {orientation!r} in the metadata (expected 'pth' or 'state')"
            )
    else:
        orientation = "state"  # web-rwkv / Ai00 .state: convert_safetensors.py transposed time_state to [h, key, value]
    return _raw_from_dict(tensors, str(path), orientation=orientation, metadata=metadata)


def _raw_from_dict(data, source: str, orientation: str, metadata: Optional[Dict[str, str]] = None) -> _RawState:
    if not isinstance(data, Mapping):
        raise StateFileError(f"{source} holds a {type(data).__name__}; a state file is a dict of tensors")
    raw = _RawState({}, orientation, source, dict(metadata or {}))
    for key, value in data.items():
        for pattern, target in (
            (_STATE_KEY, raw.layers),
            (_TIME_SHIFT_KEY, raw.time_shift),
            (_CHANNEL_SHIFT_KEY, raw.channel_shift),
        ):
            match = pattern.match(str(key))
            if match:
                if not isinstance(value, torch.Tensor) or value.dtype not in _STATE_DTYPES:
                    found = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                    raise StateFileError(
                        f"{source}: {key} is {found}; expected a float32, bfloat16, float16 or float64 tensor "
                        "(a float8 or quantised state would lose the precision a state needs)"
                    )
                target[int(match.group(1))] = value
                break
    if not raw.layers:
        keys = list(data)[:5]
        hint = (
            " It looks like model weights without a tuned state."
            if any(str(k).startswith(("emb.", "blocks.", "rwkv.")) for k in keys)
            else ""
        )
        raise StateFileError(
            f"{source} is not an RWKV state: it has no 'blocks.N.att.time_state' tensors (first keys: {keys}).{hint}"
        )
    return raw


def read_state_file(path: PathLike, format: str = "auto") -> "_RawState":
    """Read a ``.pth`` / ``.state`` / ``.safetensors`` state file without checking it against a model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No state file at {path}")
    if path.stat().st_size == 0:
        raise StateFileError(f"{path} is empty (0 bytes)")
    kind = (
        _sniff_format(path)
        if format == "auto"
        else {"pth": "pth", "state": "safetensors", "safetensors": "safetensors"}.get(format)
    )
    if kind is None:
        raise ValueError(f"Unknown state format {format!r}: expected 'auto', 'pth', 'state' or 'safetensors'")
    return _read_pth(path) if kind == "pth" else _read_safetensors(path)


def _raw_to_init_state(
    raw: _RawState,
    config,
    strict: bool = True,
    n_params: Optional[int] = None,
    *,
    model_hash: Optional[Callable[[], Optional[str]]] = None,
    allow_other_model: bool = False,
) -> InitState:
    """Check a file's content against a model and turn it into the cache layout; raises before changing anything.

    ``model_hash``: computes the model's ``model_weights_hash``, called only if the file records one to compare.
    """
    _check_supported(config)
    version = str(config.rwkv_version)
    L, H, N, C = config.num_hidden_layers, config.num_attention_heads, config.head_size, config.hidden_size
    model_desc = _describe_config(config, n_params)
    name_info = parse_state_name(raw.source)
    named = f" Its name says {_describe_name(name_info)}." if name_info else ""

    def mismatch(what: str) -> StateFileError:
        return StateFileError(
            f"The state {Path(raw.source).name!r} does not fit this model: {what}.{named} This model is {model_desc}. "
            "A state only works with the base model it was tuned on."
        )

    meta = raw.metadata
    ours = meta.get("format") == FORMAT_TAG
    if ours:  # our fingerprint: version and shapes always refuse; the weights hash is checked below
        expected = _fingerprint_config(config)
        diffs = {k: (meta[k], expected[k]) for k in expected if k in meta and meta[k] != expected[k]}
        if diffs:
            raise mismatch(f"it was made for {_describe_fingerprint(meta)}")

    layer_ids = sorted(raw.layers)
    shapes = {tuple(t.shape) for t in raw.layers.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[1] != next(iter(shapes))[2]:
        raise mismatch(
            f"its time_state tensors have shapes {sorted(shapes)[:3]}, expected [heads, head_size, head_size]"
        )
    fh, fn, _ = next(iter(shapes))
    if layer_ids != list(range(len(layer_ids))):
        raise mismatch(
            f"its layers are {layer_ids[:8]}{'...' if len(layer_ids) > 8 else ''}, not 0..{len(layer_ids) - 1}"
        )
    if (len(layer_ids), fh, fn) != (L, H, N):
        raise mismatch(f"the state has {len(layer_ids)} layers of {fh} heads x {fn} (width {fh * fn})")
    if name_info.get("version") and name_info["version"] != version:
        message = mismatch(f"its name says RWKV-{name_info['version']} and the shapes alone cannot tell versions apart")
        if strict:
            raise message
        warnings.warn(str(message) + " Loading it anyway (strict=False).")
    # Files from RWKV-LM / RWKV-PEFT / Ai00 record no identity at all: shapes and version are all there is.
    # A model-less conversion (convert_state_file) records no version either: nothing to compare it with.
    if ours and "rwkv_version" in meta and (raw.from_file or HASH_KEY in meta):
        _check_same_weights(
            meta,
            model_hash or (lambda: None),
            what=f"The state {Path(raw.source).name!r}",
            model_desc=model_desc,
            allow_other_model=allow_other_model,
            override="pass allow_other_model=True to load_init_state",
            # The converter's init_state.safetensors (no "source" key) is written beside the very weights it
            # belongs to and records no hash: a warning on every from_pretrained would be noise.
            quiet_if_unrecorded="source" not in meta,
        )

    stacked = torch.stack([raw.layers[i].float() for i in layer_ids])
    _require_finite(stacked, "the WKV state (blocks.N.att.time_state)", raw.source)
    shifts = {}
    for label, part in (("att.shift_state", raw.time_shift), ("ffn.shift_state", raw.channel_shift)):
        if not part:
            shifts[label] = None
            continue
        if sorted(part) != list(range(L)) or any(tuple(t.reshape(-1).shape) != (C,) for t in part.values()):
            raise StateFileError(
                f"{raw.source}: the {label} tensors must be one [width={C}] tensor per layer 0..{L - 1}"
            )
        shifts[label] = torch.stack([part[i].reshape(C).float() for i in range(L)])
        _require_finite(shifts[label], f"the token-shift state (blocks.N.{label})", raw.source)

    if raw.orientation == "pth":
        wkv = _pth_to_cache(version, stacked)
    else:  # [h, key, value]: the v5.2/v6 cache layout, transposed for v7
        wkv = stacked if version != "7" else stacked.transpose(-2, -1)
    return InitState(
        version,
        wkv.contiguous(),
        shifts["att.shift_state"],
        shifts["ffn.shift_state"],
        source=raw.source,
        base_model=meta.get("base_model") or None,
        name_info=name_info,
        model_hash=meta.get(HASH_KEY) or None,
    )


# ---------------------------------------------------------------------------------------------------------
# Writing files
# ---------------------------------------------------------------------------------------------------------


def _format_for(path: Path, format: Optional[str]) -> str:
    if format is not None:
        if format not in _FORMATS:
            raise ValueError(f"Unknown state format {format!r}: expected one of {_FORMATS}")
        return format
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"Cannot tell the format from {path.name!r}: use a .pth, .state or .safetensors name, or pass format="
        )
    return fmt


def _atomic_write(path: Path, write) -> None:
    # Write next to the target, then rename: an interrupted save never leaves a half-written state file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_state_file(
    state: InitState,
    path: PathLike,
    format: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    fingerprint: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write ``state`` as ``.pth`` (bf16, [h, value, key]), ``.state`` (F16, [h, key, value]) or our safetensors.

    ``format`` defaults to the file extension. ``dtype`` overrides the format's default (the ``.state`` format
    is F16 by definition: web-rwkv refuses anything else). Token-shift states only fit our format; the others
    drop them with a warning. ``fingerprint``: the model identity our format records (version, shapes and
    ``base_model_hash``, see ``model_weights_hash``); None: what the state itself knows. ``.pth`` and ``.state``
    files have no room for it, as in the rest of the ecosystem.
    """
    from safetensors.torch import save_file

    path = Path(path)
    fmt = _format_for(path, format)
    tensors = state.pth_tensors()
    has_shift = any(t is not None and bool(t.any()) for t in (state.time_shift, state.channel_shift))
    if fmt != "safetensors" and has_shift:
        warnings.warn(
            f"The {fmt} format has no token-shift states: the tuned shift states are dropped from {path.name} "
            "(save as .safetensors to keep them)."
        )
    keys = [f"blocks.{i}.att.time_state" for i in range(len(tensors))]
    if fmt == "pth":
        out = {k: t.detach().to("cpu", dtype or torch.bfloat16).contiguous() for k, t in zip(keys, tensors)}
        _atomic_write(path, lambda p: torch.save(out, p))
    elif fmt == "state":
        out = {
            k: t.detach().transpose(-2, -1).to("cpu", dtype or torch.float16).contiguous()
            for k, t in zip(keys, tensors)
        }
        bad = [k for k, t in out.items() if not torch.isfinite(t).all()]
        if bad:
            raise ValueError(
                f"The state does not fit in {out[bad[0]].dtype} (|values| > 65504 in {bad[0]}); "
                f"cannot write {path.name}"
            )
        _atomic_write(path, lambda p: save_file(out, p, metadata={"format": "pt"}))
    else:
        out = {k: t.detach().to("cpu", dtype or torch.float32).contiguous() for k, t in zip(keys, tensors)}
        for prefix, shift in (("att", state.time_shift), ("ffn", state.channel_shift)):
            if shift is not None:
                for i, row in enumerate(shift.detach().to("cpu", dtype or torch.float32)):
                    out[f"blocks.{i}.{prefix}.shift_state"] = row.contiguous()
        if fingerprint is None:  # what the state itself tells (callers with the model pass its config's)
            fingerprint = {
                "rwkv_version": state.rwkv_version,
                "num_hidden_layers": str(state.num_layers),
                "num_heads": str(state.num_heads),
                "head_size": str(state.head_size),
                "hidden_size": str(state.num_heads * state.head_size),
            }
            if state.model_hash:
                fingerprint[HASH_KEY] = state.model_hash
        metadata = {"format": FORMAT_TAG, "orientation": "pth", "source": Path(state.source).name, **fingerprint}
        if state.base_model:
            metadata["base_model"] = state.base_model
        _atomic_write(path, lambda p: save_file(out, p, metadata=metadata))
    return path


def convert_state_file(src: PathLike, dst: PathLike, format: Optional[str] = None) -> Path:
    """Convert between ``.pth``, ``.state`` and our ``.safetensors`` without a model (the orientation rule is the
    same for v5.2/6/7). The result carries no fingerprint: nothing here says which model the state belongs to."""
    raw = read_state_file(src)
    tensors = [raw.layers[i].float() for i in sorted(raw.layers)]
    if raw.orientation == "state":
        tensors = [t.transpose(-2, -1) for t in tensors]
    # Any version with the [h, value, key] = pth orientation in cache layout: "7" keeps tensors as they are.
    state = InitState.from_pth_tensors("7", tensors, source=str(src))
    return write_state_file(state, dst, format=format, fingerprint={})


# ---------------------------------------------------------------------------------------------------------
# The model's initial-state module
# ---------------------------------------------------------------------------------------------------------

StateName = Union[None, str, Sequence[Optional[str]], Mapping[str, float]]
_Triple = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]  # wkv [L,H,N,N], time/channel shift [L,C]


def layer_states_from(resolve, num_layers: int, batch_size: int, dtype, device, name: StateName):
    """Shared by ``RwkvInitState`` and the PEFT layer: turn ``name`` into one (time_shift, channel_shift, wkv)
    triple per layer, batched. ``resolve(name)`` returns a ``_Triple`` or None (zeros)."""
    if isinstance(name, Mapping):
        rows = [_mix(resolve, name)] * batch_size
    elif isinstance(name, (list, tuple)):
        if len(name) != batch_size:
            raise ValueError(f"init_state has {len(name)} names but the batch has {batch_size} rows")
        rows = [_mix(resolve, n) if isinstance(n, Mapping) else resolve(n) for n in name]
    else:
        single = resolve(name)
        if single is None:
            return [(None, None, None)] * num_layers
        rows = None
    if rows is not None and all(r is None for r in rows):
        return [(None, None, None)] * num_layers

    # .to(device) here: mounted states are plain tensors, which model.to() does not move.
    def batched(index: int, cast):
        if rows is None:
            t = single[index]
            return None if t is None else cast(t.to(device)).unsqueeze(0).expand(batch_size, *t.shape)
        parts = [r[index] if r is not None else None for r in rows]
        if all(p is None for p in parts):
            return None
        like = next(p for p in parts if p is not None)
        return torch.stack([cast((p if p is not None else torch.zeros_like(like)).to(device)) for p in parts])

    # clone(): the ops must never share storage with the stored state (an in-place kernel would change it).
    wkv = batched(0, lambda t: t.float()).clone()
    time_shift, channel_shift = batched(1, lambda t: t.to(dtype)), batched(2, lambda t: t.to(dtype))
    return [
        (
            None if time_shift is None else time_shift[:, i],
            None if channel_shift is None else channel_shift[:, i],
            wkv[:, i],
        )
        for i in range(num_layers)
    ]


def _mix(resolve, weights: Mapping[str, float]) -> Optional[_Triple]:
    """sum(w * state) over the named states (the zero state adds nothing); None when all are zero."""
    if not weights:
        raise ValueError("A mix of initial states needs at least one {name: weight}")
    # Checked here, not only in mix_init_states: forward(init_state={...}) mixes through this too.
    bad = {n: w for n, w in weights.items() if not _is_finite_number(w)}
    if bad:
        raise ValueError(f"Mix weights must be finite numbers; got {bad} in {dict(weights)}")
    total = None
    for n, w in weights.items():
        part = resolve(n)
        if part is None:
            continue
        scaled = tuple(None if t is None else t * float(w) for t in part)
        total = (
            scaled
            if total is None
            else tuple(b if a is None else a if b is None else a + b for a, b in zip(total, scaled))
        )
    return total


def _is_finite_number(w) -> bool:
    try:
        return math.isfinite(float(w))
    except (TypeError, ValueError):  # not a number, or a tensor with several elements
        return False


class RwkvInitState(nn.Module):
    """The initial state(s) of a model: set as ``RwkvModel.init_state`` (see the module docstring).

    ``states``: the mounted states by name (plain tensors in a dict: data, not weights, so ``state_dict`` and
    ``save_pretrained`` never see them). ``default_name``: which one fresh sequences start from when no name is
    given (None: zeros). ``wkv`` / ``time_shift`` / ``channel_shift``: trainable parameters set by
    ``make_init_state_trainable`` (or LoRA's ``modules_to_save``); when present they are the default state.
    """

    def __init__(self, config):
        super().__init__()
        _check_supported(config)
        self.rwkv_version = str(config.rwkv_version)
        self.num_layers, self.num_heads = config.num_hidden_layers, config.num_attention_heads
        self.head_size, self.hidden_size = config.head_size, config.hidden_size
        self.states: Dict[str, InitState] = {}
        self.default_name: Optional[str] = None
        for name in ("wkv", "time_shift", "channel_shift"):
            self.register_parameter(name, None)

    def extra_repr(self) -> str:
        trainable = ", trainable" if self.wkv is not None else ""
        return f"RWKV-{self.rwkv_version}, states={sorted(self.states)}, default={self.default_name!r}{trainable}"

    def resolve(self, name: Optional[str]) -> Optional[_Triple]:
        """The unbatched state for ``name`` (None: the default), or None for the zero state."""
        if name is None:
            if self.wkv is not None:
                return (self.wkv, self.time_shift, self.channel_shift)
            if self.default_name is None:
                return None
            name = self.default_name
        state = self.states.get(name)
        if state is None:
            raise KeyError(
                f"No initial state named {name!r}; loaded: {sorted(self.states) or 'none'} (see load_init_state)"
            )
        return (state.wkv, state.time_shift, state.channel_shift)

    def layer_states(self, batch_size: int, dtype: torch.dtype, device, name: StateName = None):
        return layer_states_from(self.resolve, self.num_layers, batch_size, dtype, device, name)

    # Calling the module is the same; going through __call__ lets module hooks run (FSDP / DeepSpeed ZeRO-3
    # gathering, accelerate's device-map hooks, PEFT's modules_to_save wrapper).
    forward = layer_states


# ---------------------------------------------------------------------------------------------------------
# Mounting: functions taking the model (the lead attaches them as RwkvForCausalLM methods)
# ---------------------------------------------------------------------------------------------------------


def _rwkv_model(model) -> nn.Module:
    """The ``RwkvModel`` inside ``model`` (RwkvForCausalLM, RwkvModel, a PeftModel, a DDP wrapper ...)."""
    seen = model
    for _ in range(4):
        if hasattr(seen, "_initial_layer_states") and hasattr(seen, "blocks"):
            return seen
        inner = None
        if hasattr(seen, "get_base_model"):  # PeftModel
            inner = seen.get_base_model()
        elif hasattr(seen, "module") and isinstance(getattr(seen, "module"), nn.Module):  # DDP / accelerate wrappers
            inner = seen.module
        elif hasattr(seen, "rwkv"):
            inner = seen.rwkv
        if inner is None or inner is seen:
            break
        seen = inner
    raise TypeError(f"{type(model).__name__} is not an rwkv_hf RWKV model (no RwkvModel inside)")


def _slots(rwkv_model) -> List[RwkvInitState]:
    """Every RwkvInitState under the model's ``init_state`` (PEFT wrappers keep the original and copies)."""
    top = rwkv_model.init_state
    if top is None:
        return []
    # By class name, not isinstance: a trust_remote_code copy of this file defines its own RwkvInitState.
    return [m for m in top.modules() if type(m).__name__ == "RwkvInitState"]


def _ensure_slot(model) -> nn.Module:
    base = _rwkv_model(model)
    if base.init_state is None:
        _check_supported(base.config)
        slot = RwkvInitState(base.config)
        base.init_state = slot
    return base


def _model_device(base) -> torch.device:
    return base.get_input_embeddings().weight.device


def _n_params(base) -> Optional[int]:
    try:
        return sum(p.numel() for p in base.parameters() if p.device.type != "meta")
    except Exception:  # noqa: BLE001 - only used in messages
        return None


def _to_init_state(
    model, source, *, format: str = "auto", strict: bool = True, allow_other_model: bool = False
) -> InitState:
    base = _rwkv_model(model)
    config = base.config
    _check_supported(config)
    if isinstance(source, InitState):
        raw = _RawState({i: t for i, t in enumerate(source.pth_tensors())}, "pth", source.source, from_file=False)
        raw.metadata = {"format": FORMAT_TAG, "rwkv_version": source.rwkv_version}
        if source.model_hash:
            raw.metadata[HASH_KEY] = source.model_hash
        if source.time_shift is not None:
            raw.time_shift = dict(enumerate(source.time_shift))
        if source.channel_shift is not None:
            raw.channel_shift = dict(enumerate(source.channel_shift))
    elif isinstance(source, RwkvCache) or hasattr(source, "to_official_state"):
        if not source.is_initialized:
            raise ValueError("The cache is empty: run the model on a prompt first")
        if str(getattr(source, "rwkv_version", config.rwkv_version)) != str(config.rwkv_version):
            raise StateFileError(
                f"The cache holds an RWKV-{source.rwkv_version} state; this model is RWKV-{config.rwkv_version}"
            )
        if source.batch_size != 1:
            raise ValueError(f"An initial state comes from a batch-1 cache; this one has {source.batch_size} rows")
        return _from_official_list(config, source.to_official_state(), "cache")
    elif isinstance(source, (list, tuple)):
        return _from_official_list(config, list(source), "official state list")
    elif isinstance(source, Mapping):
        raw = _raw_from_dict(source, "tensor dict", orientation="pth")
    elif isinstance(source, (str, os.PathLike)):
        raw = read_state_file(source, format=format)
    else:
        raise TypeError(
            f"Cannot load an initial state from a {type(source).__name__}: pass a file path, a dict of "
            "'blocks.N.att.time_state' tensors ([heads, value, key], as in a .pth), an InitState, an RwkvCache or an "
            "official state list"
        )
    return _raw_to_init_state(
        raw,
        config,
        strict=strict,
        n_params=_n_params(base),
        model_hash=lambda: model_weights_hash(base),
        allow_other_model=allow_other_model,
    )


def _from_official_list(config, state: List[torch.Tensor], source: str) -> InitState:
    # The official package's list (att shift, S, ffn shift per layer) is already in the cache layout.
    L, H, N, C = config.num_hidden_layers, config.num_attention_heads, config.head_size, config.hidden_size
    if len(state) != 3 * L:
        raise StateFileError(
            f"An RWKV-{config.rwkv_version} state list for {L} layers has {3 * L} tensors, got {len(state)}"
        )
    wkv = torch.stack([state[3 * i + 1].float() for i in range(L)])
    if tuple(wkv.shape[1:]) != (H, N, N):
        raise StateFileError(f"The state list's WKV tensors are {tuple(wkv.shape[1:])}; this model needs {(H, N, N)}")
    ts = torch.stack([state[3 * i].reshape(C).float() for i in range(L)])
    cs = torch.stack([state[3 * i + 2].reshape(C).float() for i in range(L)])
    _require_finite_triple((wkv, ts, cs), f"The {source}")
    return InitState(str(config.rwkv_version), wkv.contiguous(), ts, cs, source=source)


def load_init_state(
    model,
    source,
    name: Optional[str] = None,
    *,
    format: str = "auto",
    strict: bool = True,
    default: Optional[bool] = None,
    allow_other_model: bool = False,
) -> str:
    """Mount an initial state: fresh sequences start from it (``name=None``) or when asked for by ``name``.

    ``source``: a ``.pth`` (RWKV-LM/RWKV-PEFT), ``.state``/``.st`` (Ai00/web-rwkv) or ``.safetensors`` (ours) file;
    a dict of ``blocks.N.att.time_state`` tensors as in a ``.pth``; an ``InitState``; a batch-1 ``RwkvCache``
    (e.g. the state after a system prompt); or the official package's state list.
    ``default``: also make it the default (True when ``name`` is None).
    ``strict``: a file whose *name* says another RWKV version is refused (a warning with strict=False); shape and
    version mismatches are always refused.
    ``allow_other_model``: our ``.safetensors`` files (and ``InitState``s) record a hash of the weights they were
    saved from (``model_weights_hash``); a state from other weights of the same shape is refused unless this is
    True (then it loads with a logged warning). ``.pth`` / ``.state`` files carry no identity and load on shapes
    and version alone; our files from older rwkv_hf versions, without the hash, load with a logged warning.
    NaN/Inf anywhere in the state is always refused.
    Everything is checked before anything changes: on error the model's states are as before. Returns the name
    it was stored under.
    """
    state = _to_init_state(model, source, format=format, strict=strict, allow_other_model=allow_other_model)
    base = _rwkv_model(model)
    if state.base_model is None:
        state.base_model = _base_model_name(base)
    state = state.to(_model_device(base))
    key = DEFAULT_NAME if name is None else str(name)
    base = _ensure_slot(model)
    for slot in _slots(base):
        slot.states[key] = state
        if default or (default is None and name is None):
            slot.default_name = key
    return key


def get_init_state(model, name: StateName = None) -> Optional[InitState]:
    """The state fresh sequences would start from for ``name`` (a detached copy), or None for zeros."""
    base = _rwkv_model(model)
    if base.init_state is None:
        if name is not None:
            raise KeyError(f"No initial state named {name!r}: none is loaded")
        return None
    triples = base.init_state.layer_states(1, torch.float32, _model_device(base), name)
    if triples[0][2] is None:
        return None

    def stack(j):
        return None if triples[0][j] is None else torch.stack([t[j][0].detach().float() for t in triples])

    src = name if isinstance(name, str) else "model"
    return InitState(
        str(base.config.rwkv_version),
        stack(2),
        stack(0),
        stack(1),
        source=str(src),
        base_model=_base_model_name(base),
        model_hash=model_weights_hash(base),
    )


def save_init_state(
    model, path: PathLike, name: StateName = None, *, format: Optional[str] = None, dtype: Optional[torch.dtype] = None
) -> Path:
    """Write the state for ``name`` (None: the default, i.e. the trained one) as .pth, .state or .safetensors.
    Our ``.safetensors`` records this model's identity (version, shapes, ``model_weights_hash``), which
    ``load_init_state`` checks."""
    state = get_init_state(model, name)
    base = _rwkv_model(model)
    if state is None:
        raise ValueError(f"There is no initial state to save for {name!r} (the model starts from zeros)")
    return write_state_file(state, path, format=format, dtype=dtype, fingerprint=_model_identity(base))


def unload_init_state(model, name: Optional[str] = None) -> None:
    """Remove the state ``name``, or every mounted state (``name=None``); the model then starts from zeros."""
    base = _rwkv_model(model)
    slots = _slots(base)
    if name is not None:
        if not any(name in s.states for s in slots):
            raise KeyError(f"No initial state named {name!r}; loaded: {list_init_states(model) or 'none'}")
        for s in slots:
            s.states.pop(name, None)
            if s.default_name == name:
                s.default_name = None
        return
    for s in slots:
        s.states.clear()
        s.default_name = None
    top = base.init_state
    if top is not None and type(top).__name__ == "RwkvInitState" and top.wkv is None:
        base.init_state = None  # nothing trainable or wrapped left: back to the plain model


def list_init_states(model) -> List[str]:
    slots = _slots(_rwkv_model(model))
    return sorted(slots[0].states) if slots else []


def set_default_init_state(model, name: Optional[str]) -> None:
    """Choose which mounted state fresh sequences start from (None: zeros)."""
    base = _rwkv_model(model)
    if name is not None and name not in list_init_states(model):
        raise KeyError(f"No initial state named {name!r}; loaded: {list_init_states(model) or 'none'}")
    for s in _slots(base):
        s.default_name = name


def mix_init_states(model, weights: Mapping[str, float], name: str = "mix", *, default: bool = False) -> str:
    """Store ``sum(w * state)`` over mounted states under ``name`` (weights as given: 0.7/0.3 for a convex mix).
    ``forward(init_state={"a": 0.7, "b": 0.3})`` / ``generate(...)`` mixes on the fly instead. Weights must be
    finite numbers and so must the mix (huge weights can overflow it): anything else is refused."""
    base = _rwkv_model(model)
    if base.init_state is None:
        raise KeyError("No initial states are loaded to mix")
    mixed = _mix(base.init_state.resolve, weights)
    if mixed is None:
        raise ValueError("Every state in the mix is the zero state")
    _require_finite_triple(mixed, f"The mix {dict(weights)}")
    version = str(base.config.rwkv_version)
    state = InitState(
        version,
        mixed[0].detach().clone(),
        *(None if t is None else t.detach().clone() for t in mixed[1:]),
        source=f"mix{dict(weights)}",
        base_model=_base_model_name(base),
    )
    for s in _slots(base):
        s.states[name] = state
        if default:
            s.default_name = name
    return name


def init_state_cache(model, name: StateName = None, batch_size: int = 1) -> RwkvCache:
    """An ``RwkvCache`` holding the initial state (``seen_tokens`` 0): pass it as ``past_key_values``, or
    ``RwkvCache.stack`` several to give each row of a batch its own state."""
    base = _rwkv_model(model)
    config = base.config
    _check_supported(config)
    dtype = base.get_input_embeddings().weight.dtype
    device = _model_device(base)
    triples = base.init_state.layer_states(batch_size, dtype, device, name) if base.init_state is not None else None
    if triples is None and name is not None:
        raise KeyError(f"No initial state named {name!r}: none is loaded")
    cache = RwkvCache(config)
    H, N, C = config.num_attention_heads, config.head_size, config.hidden_size
    for i in range(config.num_hidden_layers):
        ts, cs, wkv = triples[i] if triples is not None else (None, None, None)
        zeros = torch.zeros(batch_size, C, dtype=dtype, device=device)
        wkv = wkv if wkv is not None else torch.zeros(batch_size, H, N, N, device=device)
        cache.update(
            i, (ts if ts is not None else zeros).detach(), wkv.detach(), (cs if cs is not None else zeros).detach()
        )
    return cache


def _base_model_name(base) -> Optional[str]:
    config = base.config
    name = getattr(config, "converted_from", None) or getattr(config, "_name_or_path", None) or None
    return Path(str(name)).name if name else None


# ---------------------------------------------------------------------------------------------------------
# from_pretrained / save_pretrained integration
# ---------------------------------------------------------------------------------------------------------


def attach_default_init_state(model, pretrained_model_name_or_path, **hub_kwargs) -> bool:
    """If the folder (or Hub repo) has ``init_state.safetensors`` (a converted state-tuned model), mount it as the
    model's default state. Returns whether one was found. ``hub_kwargs``: cache_dir, revision, token, ..."""
    base = _rwkv_model(model)
    if str(base.config.rwkv_version) not in SUPPORTED_VERSIONS:
        return False
    folder = Path(str(pretrained_model_name_or_path)) / (hub_kwargs.get("subfolder") or "")
    path = folder / INIT_STATE_FILE
    if not path.is_file():
        if folder.is_dir():
            return False
        try:
            from transformers.utils import cached_file

            keep = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
            found = cached_file(
                str(pretrained_model_name_or_path),
                INIT_STATE_FILE,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **{k: v for k, v in hub_kwargs.items() if k in keep},
            )
        except Exception:  # noqa: BLE001 - no Hub access: the weights loaded, the optional state is just absent
            found = None
        if not found:
            return False
        path = Path(found)
    try:
        load_init_state(model, path, name=None)
    except StateFileError as err:  # from_pretrained takes no override: say how to get the model loaded anyway
        raise StateFileError(
            f"{err} from_pretrained mounts {path} as the default initial state: move it away to load the model "
            "without it (and mount it with load_init_state if you mean to)."
        ) from err
    return True


def save_default_init_state(model, save_directory: PathLike) -> Optional[Path]:
    """Write the model's default initial state to ``save_directory/init_state.safetensors`` (if it has one), so
    that ``from_pretrained`` mounts it again. For ``save_pretrained``."""
    base = _rwkv_model(model)
    if base.init_state is None:
        return None
    state = get_init_state(model, None)
    if state is None:
        return None
    return write_state_file(
        state,
        Path(save_directory) / INIT_STATE_FILE,
        format="safetensors",
        fingerprint=_model_identity(base),  # checked when from_pretrained mounts it again
    )


# ---------------------------------------------------------------------------------------------------------
# Training without PEFT (plain PyTorch / Trainer / LoRA's modules_to_save)
# ---------------------------------------------------------------------------------------------------------


def make_init_state_trainable(
    model, *, tune_shift_states: bool = False, init: str = "base", freeze_model: bool = True
) -> List[nn.Parameter]:
    """Give the model a trainable initial state (fp32 parameters at ``rwkv.init_state``) and return them.

    ``init``: "base" starts from the current default state (zeros if none), "zeros" from zeros.
    ``freeze_model``: freeze every other weight (state tuning). With LoRA, call this first, then
    ``get_peft_model(model, LoraConfig(..., modules_to_save=["init_state"]))``; also call it on the base model
    before ``PeftModel.from_pretrained`` of such an adapter.
    """
    if init not in ("base", "zeros"):
        raise ValueError(f"init must be 'base' or 'zeros', got {init!r}")
    base = _ensure_slot(model)
    slot = base.init_state
    if type(slot).__name__ != "RwkvInitState":
        raise ValueError("The initial state is wrapped by PEFT already; train it through the PEFT adapter instead")
    start = get_init_state(model, None) if init == "base" else None
    if start is not None:  # training from NaN gives NaN: refuse it here, with the layer, not after a step
        _require_finite_triple((start.wkv, start.time_shift, start.channel_shift), "The initial state to train from")
    L, H, N, C = (
        base.config.num_hidden_layers,
        base.config.num_attention_heads,
        base.config.head_size,
        base.config.hidden_size,
    )
    device = _model_device(base)
    if freeze_model:
        base_top = model.get_base_model() if hasattr(model, "get_base_model") else model
        for p in base_top.parameters():
            p.requires_grad_(False)
    slot.wkv = nn.Parameter(start.wkv.clone() if start is not None else torch.zeros(L, H, N, N, device=device))
    params = [slot.wkv]
    if tune_shift_states:
        for attr in ("time_shift", "channel_shift"):
            value = getattr(start, attr) if start is not None else None
            setattr(slot, attr, nn.Parameter(value.clone() if value is not None else torch.zeros(L, C, device=device)))
            params.append(getattr(slot, attr))
    return params


def merge_trainable_init_state(model, name: Optional[str] = None) -> str:
    """Turn the trained parameters into a mounted state (the default when ``name`` is None) and drop the
    parameters, so the model's ``state_dict`` is the plain model again."""
    base = _rwkv_model(model)
    slot = base.init_state
    if slot is None or getattr(slot, "wkv", None) is None:
        raise ValueError("The model has no trainable initial state (see make_init_state_trainable)")
    state = get_init_state(model, None)
    for attr in ("wkv", "time_shift", "channel_shift"):
        setattr(slot, attr, None)
    key = DEFAULT_NAME if name is None else name
    slot.states[key] = state
    if name is None:
        slot.default_name = key
    return key


STATE_TUNING_DEFAULTS = dict(
    # RWKV-LM README for --train_type states: "--lr_init 1 --lr_final 0.01 (yes, use very high LR)";
    # RWKV-PEFT's demo-state-tuning.sh: Adam(0.9, 0.99), eps 1e-8, warmup 0, no weight decay.
    learning_rate=1.0,
    lr_scheduler_type="cosine_with_min_lr",
    lr_scheduler_kwargs={"min_lr": 0.01},
    warmup_steps=0,
    weight_decay=0.0,
    adam_beta1=0.9,
    adam_beta2=0.99,
    adam_epsilon=1e-8,
)


def state_tuning_training_arguments(output_dir: PathLike, **overrides):
    """``transformers.TrainingArguments`` with the community's state-tuning recipe (``STATE_TUNING_DEFAULTS``)."""
    from transformers import TrainingArguments

    kwargs = {**STATE_TUNING_DEFAULTS, "lr_scheduler_kwargs": dict(STATE_TUNING_DEFAULTS["lr_scheduler_kwargs"])}
    kwargs.update(overrides)
    return TrainingArguments(output_dir=str(output_dir), **kwargs)


def _is_state_param(name: str) -> bool:
    return "init_state" in name.split(".") or ".init_state." in name or "state_tuning_" in name


def create_state_optimizer(
    model,
    num_training_steps: int,
    *,
    lr: float = 1.0,
    final_lr: float = 0.01,
    warmup_steps: int = 0,
    other_lr: float = 1e-4,
    schedule: str = "cosine",
    betas=(0.9, 0.99),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
):
    """AdamW + LR schedule for state tuning: states at ``lr`` decaying to ``final_lr``; any other trainable
    parameter (LoRA) at ``other_lr`` with the same decay factor. ``schedule``: "cosine" (RWKV-LM with
    ``--my_exit_tokens``, HF ``cosine_with_min_lr``) or "exponential" (RWKV-LM's default). Warmup follows
    RWKV-LM: ``lr * (0.01 + 0.99 * step / warmup_steps)``. Returns ``(optimizer, scheduler)`` for
    ``Trainer(optimizers=...)`` or a plain loop."""
    if schedule not in ("cosine", "exponential"):
        raise ValueError(f"schedule must be 'cosine' or 'exponential', got {schedule!r}")
    states, others = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (states if _is_state_param(n) else others).append(p)
    if not states:
        raise ValueError(
            "No trainable initial state found (get_peft_model(model, StateTuningConfig()) or "
            "make_init_state_trainable(model) first)"
        )
    groups = [{"params": states, "lr": lr}]
    if others:
        groups.append({"params": others, "lr": other_lr})
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    ratio = final_lr / lr

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return 0.01 + 0.99 * step / warmup_steps
        progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, num_training_steps - warmup_steps)))
        if schedule == "exponential":
            return math.exp(math.log(ratio) * progress)
        return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


__all__ = [
    "INIT_STATE_FILE",
    "InitState",
    "RwkvInitState",
    "StateFileError",
    "STATE_TUNING_DEFAULTS",
    "attach_default_init_state",
    "convert_state_file",
    "create_state_optimizer",
    "get_init_state",
    "init_state_cache",
    "list_init_states",
    "load_init_state",
    "make_init_state_trainable",
    "merge_trainable_init_state",
    "mix_init_states",
    "model_weights_hash",
    "parse_state_name",
    "read_state_file",
    "save_default_init_state",
    "save_init_state",
    "set_default_init_state",
    "state_tuning_training_arguments",
    "unload_init_state",
    "write_state_file",
]
