"""Other libraries' RWKV folders, read into the official RWKV-LM key layout that the converter takes.

Supported so far:

* transformers' built-in RWKV-4 (``model_type="rwkv"``, ``RwkvForCausalLM``, the ``RWKV/rwkv-4-*-pile`` and Raven
  repos): the official weights under other names, unscaled and in the same shapes, so the mapping is a renaming
  (``HF_RWKV_NAMES``, one table read both ways); ``export_transformers_rwkv4`` is the way back. The RWKV org's
  remote-code RWKV-5/6 repos (``model_type="rwkv5"/"rwkv6"``) were converted with the same renaming.
* RWKV-7 in flash-linear-attention's names (``model_type="rwkv7"``; the ``rwkv7-hf`` package's folders use them
  too): a renaming plus the LoRA matrices transposed (``FLA_RWKV7_NAMES``). The weights are the official ones;
  the numbers of a converted folder are RWKV-LM's (rwkv7-hf's own ``ln_x`` epsilon differs at head sizes other
  than 64).

Any other folder is refused naming what was found.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Dict, Tuple

import torch

# One table both ways: official name <-> transformers' RWKV-4 name ({i}: layer, {p}: parameter, e.g. "key.weight");
# the first entry that matches wins.
# Written after transformers' RWKV-4 class and the RWKV-5 conversion script (convert_rwkv5_checkpoint_to_hf.py),
# which the RWKV org's remote-code RWKV-5/6 repos (model_type "rwkv5"/"rwkv6") were made with: the same names, plus
# time_mix_g -> time_mix_gate; RWKV-6's time_maa_* and the LoRA matrices keep their RWKV-LM names.
HF_RWKV_NAMES: Tuple[Tuple[str, str], ...] = (
    ("emb.weight", "rwkv.embeddings.weight"),
    ("blocks.0.ln0.{p}", "rwkv.blocks.0.pre_ln.{p}"),
    ("blocks.{i}.ln1.{p}", "rwkv.blocks.{i}.ln1.{p}"),
    ("blocks.{i}.ln2.{p}", "rwkv.blocks.{i}.ln2.{p}"),
    ("blocks.{i}.att.time_mix_k", "rwkv.blocks.{i}.attention.time_mix_key"),  # specific names before {p}
    ("blocks.{i}.att.time_mix_v", "rwkv.blocks.{i}.attention.time_mix_value"),
    ("blocks.{i}.att.time_mix_r", "rwkv.blocks.{i}.attention.time_mix_receptance"),
    ("blocks.{i}.att.time_mix_g", "rwkv.blocks.{i}.attention.time_mix_gate"),
    ("blocks.{i}.ffn.time_mix_k", "rwkv.blocks.{i}.feed_forward.time_mix_key"),
    ("blocks.{i}.ffn.time_mix_r", "rwkv.blocks.{i}.feed_forward.time_mix_receptance"),
    ("blocks.{i}.att.{p}", "rwkv.blocks.{i}.attention.{p}"),
    ("blocks.{i}.ffn.{p}", "rwkv.blocks.{i}.feed_forward.{p}"),
    ("ln_out.{p}", "rwkv.ln_out.{p}"),
    ("head.weight", "head.weight"),
)


# flash-linear-attention's RWKV-7 names, which the ``rwkv7-hf`` package (PyPI) uses too. The third field marks
# the LoRA matrices, stored transposed there (nn.Linear [out, in]) and as [in, out] in RWKV-LM ({x}: w, a, v, g).
FLA_RWKV7_NAMES: Tuple[Tuple[str, str, bool], ...] = (
    ("emb.weight", "model.embeddings.weight", False),
    ("ln_out.{p}", "model.norm.{p}", False),
    ("head.weight", "lm_head.weight", False),
    ("blocks.0.ln0.{p}", "model.layers.0.pre_norm.{p}", False),
    ("blocks.{i}.ln1.{p}", "model.layers.{i}.attn_norm.{p}", False),
    ("blocks.{i}.ln2.{p}", "model.layers.{i}.ffn_norm.{p}", False),
    ("blocks.{i}.att.receptance.weight", "model.layers.{i}.attn.r_proj.weight", False),
    ("blocks.{i}.att.key.weight", "model.layers.{i}.attn.k_proj.weight", False),
    ("blocks.{i}.att.value.weight", "model.layers.{i}.attn.v_proj.weight", False),
    ("blocks.{i}.att.output.weight", "model.layers.{i}.attn.o_proj.weight", False),
    ("blocks.{i}.att.ln_x.{p}", "model.layers.{i}.attn.g_norm.{p}", False),
    ("blocks.{i}.att.{x}0", "model.layers.{i}.attn.{x}_lora.lora.2.bias", False),
    ("blocks.{i}.att.{x}1", "model.layers.{i}.attn.{x}_lora.lora.0.weight", True),
    ("blocks.{i}.att.{x}2", "model.layers.{i}.attn.{x}_lora.lora.2.weight", True),
    ("blocks.{i}.att.{p}", "model.layers.{i}.attn.{p}", False),  # x_r ... x_g, k_k, k_a, r_k
    ("blocks.{i}.ffn.{p}", "model.layers.{i}.ffn.{p}", False),
)


@functools.lru_cache(maxsize=None)  # every key of a folder is tried against the same few templates
def _template_regex(template: str) -> "re.Pattern":
    pattern = re.escape(template)
    for name, group in (("i", r"\d+"), ("x", "[wavg]"), ("p", r"[A-Za-z_][\w.]*")):
        pattern = pattern.replace(r"\{" + name + r"\}", f"(?P<{name}>{group})")
    return re.compile(pattern)


def _rename(table, key: str, to_official: bool):
    """``(name, transposed)`` of ``key`` in the other naming of ``table``, or None if no rule covers it."""
    for entry in table:
        official, theirs = entry[0], entry[1]
        source, target = (theirs, official) if to_official else (official, theirs)
        match = _template_regex(source).fullmatch(key)
        if match:
            return target.format(**match.groupdict()), (entry[2] if len(entry) > 2 else False)
    return None


def rename_hf_rwkv_key(key: str, to_official: bool) -> "str | None":
    """``key`` in the other naming (official <-> transformers' RWKV-4 / the RWKV org's v5, v6), or None."""
    found = _rename(HF_RWKV_NAMES, key, to_official)
    return found[0] if found else None


KNOWN_ELSEWHERE = {
    "rwkv7": "transformers' / flash-linear-attention's RWKV-7",
}
HF_RWKV_MODEL_TYPES = {
    "rwkv": "transformers' built-in RWKV-4",
    "rwkv5": "the RWKV org's remote-code RWKV-5 (RWKV/v5-Eagle-*-HF)",
    "rwkv6": "the RWKV org's remote-code RWKV-6 (RWKV/v6-Finch-*-HF)",
}


class LayoutError(ValueError):
    """A folder in a layout this package cannot read, or one whose parts disagree."""


def detect_folder_layout(folder: Path) -> str:
    """The layout of a model folder, from its config.json (and weight names): "rwkv_hf" (ours), "hf-rwkv"
    (transformers' RWKV-4, the RWKV org's v5/v6), "fla-rwkv7"; anything else is an error naming it."""
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
    if model_type in HF_RWKV_MODEL_TYPES:
        return "hf-rwkv"
    if model_type == "rwkv7" and FLA_RWKV7_MARKER in _weight_names(folder):
        return "fla-rwkv7"
    where = KNOWN_ELSEWHERE.get(model_type, "not an RWKV layout this package knows")
    raise LayoutError(
        f"{folder}: model_type {model_type!r} ({where}) cannot be converted yet; readable layouts: an RWKV-LM .pth "
        "file, transformers' built-in RWKV-4 and the RWKV org's v5/v6 folders (model_type 'rwkv', 'rwkv5', "
        "'rwkv6'), flash-linear-attention / rwkv7-hf RWKV-7 "
        f"folders (model_type 'rwkv7' with weights named like {FLA_RWKV7_MARKER!r})"
    )


FLA_RWKV7_MARKER = "model.layers.0.attn.w_lora.lora.0.weight"


def _weight_files(folder: Path):
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def _weight_names(folder: Path) -> set:
    from safetensors import safe_open

    names = set()
    for path in _weight_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                names.update(f.keys())
    return names


def _read_weights(folder: Path, layout: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = _weight_files(folder)
    if not files:
        raise LayoutError(f"{folder}: {layout} folder without weights (no *.safetensors or pytorch_model*.bin)")
    weights: Dict[str, torch.Tensor] = {}
    for path in files:
        part = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
        weights.update(part)
    return weights


def read_folder(folder: Path) -> Dict[str, torch.Tensor]:
    """The official RWKV-LM state dict of another library's folder (see ``detect_folder_layout``)."""
    layout = detect_folder_layout(folder)
    if layout == "rwkv_hf":
        raise LayoutError(f"{folder} is already an rwkv_hf folder: load it with from_pretrained")
    if layout == "hf-rwkv":
        return read_hf_rwkv(folder)
    return read_fla_rwkv7(folder)


def _to_official(table, weights: Dict[str, torch.Tensor], folder: Path, layout: str) -> Dict[str, torch.Tensor]:
    """``weights`` under RWKV-LM's names by ``table`` (transposed where it says so); a weight no rule covers is an
    error naming it."""
    official, unknown = {}, []
    for key, tensor in weights.items():
        found = _rename(table, key, to_official=True)
        if found is None:
            unknown.append(key)
            continue
        name, transposed = found
        official[name] = tensor.t().contiguous() if transposed else tensor
    if unknown:
        raise LayoutError(
            f"{folder}: {layout} with {len(unknown)} unexpected weight(s), e.g. {sorted(unknown)[:3]}: a mixed or "
            "foreign layout"
        )
    return official


def read_fla_rwkv7(folder: Path) -> Dict[str, torch.Tensor]:
    """flash-linear-attention / rwkv7-hf RWKV-7 weights renamed to RWKV-LM's, the LoRA matrices transposed back."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    layout = "RWKV-7 in the flash-linear-attention layout"
    official = _to_official(FLA_RWKV7_NAMES, _read_weights(folder, layout), folder, layout)
    _check_config_against(folder, config, official, {
        "vocab_size": ("emb.weight", 0),
        "hidden_size": ("emb.weight", 1),
        "intermediate_size": ("blocks.0.ffn.key.weight", 0),
    })
    return official


def _check_config_against(folder: Path, config: dict, official: Dict[str, torch.Tensor], checks: dict) -> None:
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


def read_hf_rwkv(folder: Path) -> Dict[str, torch.Tensor]:
    """The official state dict of a transformers RWKV-4 / RWKV org v5, v6 folder (safetensors, or weights_only
    .bin), checked: every key mapped, the config's sizes equal to the weights'."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    what = HF_RWKV_MODEL_TYPES[config["model_type"]]
    layout = f"{what} layout (model_type {config['model_type']!r})"
    official = _to_official(HF_RWKV_NAMES, _read_weights(folder, what), folder, layout)
    if "head.weight" not in official and config.get("tie_word_embeddings"):
        official["head.weight"] = official.get("emb.weight")
    _check_config_against(folder, config, official, {
        "vocab_size": ("emb.weight", 0),
        "hidden_size": ("emb.weight", 1),
        "intermediate_size": ("blocks.0.ffn.key.weight", 0),
        "attention_hidden_size": ("blocks.0.att.key.weight", 0),
    })
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
        name = rename_hf_rwkv_key(key, to_official=False)
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
