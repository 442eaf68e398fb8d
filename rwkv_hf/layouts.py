"""Other libraries' RWKV folders, read into the official RWKV-LM key layout that the converter takes.

Supported so far: transformers' built-in RWKV-4 (``model_type="rwkv"``, ``RwkvForCausalLM``, the
``RWKV/rwkv-4-*-pile`` and Raven repos). Its weights are the official ones under other names, unscaled and in the
same shapes, so the mapping is a renaming (``RWKV4_NAMES``, one table read both ways); ``export_transformers_rwkv4`` is the
way back. Any other folder is refused naming what was found.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Tuple

import torch

# One table both ways: official name <-> transformers' RWKV-4 name ({i}: layer, {p}: parameter, e.g. "key.weight");
# the first entry that matches wins.
RWKV4_NAMES: Tuple[Tuple[str, str], ...] = (
    ("emb.weight", "rwkv.embeddings.weight"),
    ("blocks.0.ln0.{p}", "rwkv.blocks.0.pre_ln.{p}"),
    ("blocks.{i}.ln1.{p}", "rwkv.blocks.{i}.ln1.{p}"),
    ("blocks.{i}.ln2.{p}", "rwkv.blocks.{i}.ln2.{p}"),
    ("blocks.{i}.att.time_mix_k", "rwkv.blocks.{i}.attention.time_mix_key"),  # specific names before {p}
    ("blocks.{i}.att.time_mix_v", "rwkv.blocks.{i}.attention.time_mix_value"),
    ("blocks.{i}.att.time_mix_r", "rwkv.blocks.{i}.attention.time_mix_receptance"),
    ("blocks.{i}.ffn.time_mix_k", "rwkv.blocks.{i}.feed_forward.time_mix_key"),
    ("blocks.{i}.ffn.time_mix_r", "rwkv.blocks.{i}.feed_forward.time_mix_receptance"),
    ("blocks.{i}.att.{p}", "rwkv.blocks.{i}.attention.{p}"),
    ("blocks.{i}.ffn.{p}", "rwkv.blocks.{i}.feed_forward.{p}"),
    ("ln_out.{p}", "rwkv.ln_out.{p}"),
    ("head.weight", "head.weight"),
)


def _template_regex(template: str) -> "re.Pattern":
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[A-Za-z_][\w.]*)")
    return re.compile(pattern)


def rename_rwkv4_key(key: str, to_official: bool) -> "str | None":
    """``key`` in the other naming (official <-> transformers' RWKV-4), or None if no rule covers it."""
    for official, theirs in RWKV4_NAMES:
        source, target = (theirs, official) if to_official else (official, theirs)
        match = _template_regex(source).fullmatch(key)
        if match:
            return target.format(**match.groupdict())
    return None


KNOWN_ELSEWHERE = {
    "rwkv5": "the RWKV org's remote-code RWKV-5 repos (RWKV/v5-Eagle-*-HF)",
    "rwkv6": "the RWKV org's remote-code RWKV-6 repos (RWKV/v6-Finch-*-HF)",
    "rwkv7": "transformers' / flash-linear-attention's RWKV-7",
}


class LayoutError(ValueError):
    """A folder in a layout this package cannot read, or one whose parts disagree."""


def detect_folder_layout(folder: Path) -> str:
    """The layout of a model folder, from its config.json: "rwkv_hf" (ours), "transformers-rwkv4"; else an error."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LayoutError(f"{folder} has no config.json: expected a model folder (or an RWKV-LM .pth file)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LayoutError(f"{config_path} is not readable JSON ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type == "rwkv_hf":
        return "rwkv_hf"
    if model_type == "rwkv":
        return "transformers-rwkv4"
    where = KNOWN_ELSEWHERE.get(model_type, "not an RWKV layout this package knows")
    raise LayoutError(
        f"{folder}: model_type {model_type!r} ({where}) cannot be converted yet; readable layouts: an RWKV-LM .pth "
        "file, transformers' built-in RWKV-4 folder (model_type 'rwkv')"
    )


def read_transformers_rwkv4(folder: Path) -> Dict[str, torch.Tensor]:
    """The official state dict of a transformers RWKV-4 folder (safetensors, or weights_only .bin), checked:
    every key mapped, the config's sizes equal to the weights'."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise LayoutError(f"{folder}: transformers RWKV-4 folder without weights (no *.safetensors or pytorch_model*.bin)")
    weights: Dict[str, torch.Tensor] = {}
    for path in files:
        part = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
        weights.update(part)
    official, unknown = {}, []
    for key, tensor in weights.items():
        name = rename_rwkv4_key(key, to_official=True)
        if name is None:
            unknown.append(key)
        else:
            official[name] = tensor
    if unknown:
        raise LayoutError(
            f"{folder}: transformers RWKV-4 layout (model_type 'rwkv') with {len(unknown)} unexpected weight(s), "
            f"e.g. {sorted(unknown)[:3]}: a mixed or foreign layout"
        )
    if "head.weight" not in official and config.get("tie_word_embeddings"):
        official["head.weight"] = official.get("emb.weight")
    checks = {
        "vocab_size": ("emb.weight", 0),
        "hidden_size": ("emb.weight", 1),
        "intermediate_size": ("blocks.0.ffn.key.weight", 0),
        "attention_hidden_size": ("blocks.0.att.key.weight", 0),
    }
    for name, (key, dim) in checks.items():
        value = config.get(name)
        if value is not None and key in official and official[key].shape[dim] != value:
            raise LayoutError(
                f"{folder}: config.json says {name}={value} but {key} has shape {tuple(official[key].shape)}: the "
                "config disagrees with the weights"
            )
    layers = config.get("num_hidden_layers")
    found = len({k.split(".")[1] for k in official if k.startswith("blocks.")})
    if layers is not None and layers != found:
        raise LayoutError(f"{folder}: config.json says num_hidden_layers={layers} but the weights hold {found} blocks")
    return official


def export_transformers_rwkv4(model, output_dir) -> Path:
    """Write an RWKV-4 model of ours as a transformers built-in RWKV-4 folder (``model_type="rwkv"``)."""
    from transformers import RwkvConfig as TransformersRwkvConfig
    from transformers import RwkvForCausalLM as TransformersRwkvForCausalLM

    from .convert_rwkv_hf import export_official_state_dict

    config = model.config
    if str(config.rwkv_version) != "4":
        raise LayoutError(
            f"transformers' built-in RWKV layout is RWKV-4 only; this model is RWKV-{config.rwkv_version}"
        )
    official = export_official_state_dict(model)
    inverse = {}
    for key, tensor in official.items():
        name = rename_rwkv4_key(key, to_official=False)
        if name is None:
            raise LayoutError(f"no transformers RWKV-4 name for the official key {key!r}")
        inverse[name] = tensor
    target = TransformersRwkvConfig(
        vocab_size=config.vocab_size, context_length=getattr(config, "context_length", 1024),
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        attention_hidden_size=config.attention_hidden_size, intermediate_size=config.intermediate_size,
        layer_norm_epsilon=config.layer_norm_epsilon, rescale_every=config.rescale_every,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        out = TransformersRwkvForCausalLM(target)
    out.load_state_dict(inverse, strict=True, assign=True)
    out.save_pretrained(output_dir)
    return Path(output_dir)
