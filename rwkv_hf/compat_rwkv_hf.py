"""What this package relies on in transformers, found by looking at transformers' public interfaces.

Remote code on the Hub runs against whatever transformers each user has, so nothing here compares version
strings to pick a behaviour: each fact is read off the installed library (a signature, a dataclass field), and
a combination this package does not know is an ``ImportError`` that names the installed version, never a
silently wrong model. The one version check is the supported range itself (``SUPPORTED_TRANSFORMERS``).

The facts:

* ``CACHE_ARG``: the keyword under which ``generate`` hands the recurrent state to ``forward`` and the field
  under which model outputs carry it back. transformers up to 5.23 says ``past_key_values``; 5.24 renamed it
  to ``cache`` (the old name deprecated until 5.40). A model that takes the wrong one loses its state at every
  decode step without any error, which is why both sides are checked and must agree.
* ``LinearAttentionLayer(number_of_states=...)``: the multi-state cache layer (5.14+) that ``RwkvCache`` is
  built from.
"""

from __future__ import annotations

import inspect
import os
import re

import transformers
from packaging import version
from transformers import GenerationMixin
from transformers.cache_utils import LinearAttentionLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

SUPPORTED_TRANSFORMERS = (">=5.14", "<6")  # keep in step with pyproject.toml
TRANSFORMERS_VERSION = transformers.__version__
ALLOW_UNTESTED_ENV = "RWKV_HF_ALLOW_UNTESTED_TRANSFORMERS"
CACHE_NAMES = ("cache", "past_key_values")  # newest first


class TransformersContractError(ImportError):
    """The installed transformers does not offer what this package was written against."""


def _fail(what: str) -> TransformersContractError:
    return TransformersContractError(
        f"rwkv_hf cannot run on transformers {TRANSFORMERS_VERSION}: {what}. Supported: transformers"
        f"{','.join(SUPPORTED_TRANSFORMERS)} (pip install 'transformers{','.join(SUPPORTED_TRANSFORMERS)}'), "
        "or a newer rwkv_hf."
    )


def _check_supported_range(installed: str = TRANSFORMERS_VERSION) -> None:
    installed = version.parse(installed)
    low, high = (version.parse(bound.lstrip("<>=")) for bound in SUPPORTED_TRANSFORMERS)
    if installed.release[:2] < low.release[:2]:
        raise _fail(f"it is older than {low}")
    if installed.release[:1] >= high.release[:1] and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        raise _fail(
            f"major version {installed.major} is untested, and a renamed argument there would give wrong answers "
            f"rather than errors; set {ALLOW_UNTESTED_ENV}=1 to try anyway"
        )


def _detect_cache_arg(
    prepare_inputs=GenerationMixin.prepare_inputs_for_generation,
    output_classes=(CausalLMOutputWithPast, BaseModelOutputWithPast),
) -> str:
    generate_side = [n for n in CACHE_NAMES if n in inspect.signature(prepare_inputs).parameters]
    output_side, base_side = (
        [n for n in CACHE_NAMES if n in getattr(cls, "__dataclass_fields__", {})] for cls in output_classes
    )
    if len(generate_side) != 1 or generate_side != output_side or output_side != base_side:
        raise _fail(
            "generate passes the recurrent state as "
            f"{generate_side or 'none of ' + str(list(CACHE_NAMES))} but model outputs carry it as "
            f"{output_side or 'none of ' + str(list(CACHE_NAMES))}"
        )
    return generate_side[0]


def _check_cache_layer() -> None:
    if "number_of_states" not in inspect.signature(LinearAttentionLayer.__init__).parameters:
        raise _fail("its LinearAttentionLayer has no number_of_states (multi-state cache layers arrived in 5.14)")


_check_supported_range()
_check_cache_layer()
CACHE_ARG = _detect_cache_arg()
OLD_CACHE_ARG = "past_key_values"


def model_output_cache(output):
    """The recurrent state a model or ``generate`` output carries, under whichever name transformers uses."""
    return output.get(CACHE_ARG) if hasattr(output, "get") else getattr(output, CACHE_ARG, None)


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` for calling ``forward`` or ``generate`` with a state, in the installed convention."""
    return {CACHE_ARG: cache}


# Keyword arguments transformers' Trainer and loss functions pass to ``forward`` besides the model inputs.
LOSS_KWARGS = frozenset({"num_items_in_batch", "ignore_index", "shift_labels"})


def reject_unknown_kwargs(owner: str, kwargs: dict, allowed: frozenset = LOSS_KWARGS) -> None:
    """A ``forward`` that silently swallows an argument it does not know is how a renamed cache argument turns
    into a zero state at every step; name the argument instead."""
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        raise TypeError(
            f"{owner}.forward() got unexpected keyword argument(s) {unknown}. It takes the recurrent state as "
            f"{CACHE_ARG!r} (transformers {TRANSFORMERS_VERSION}) or 'past_key_values', plus the usual input_ids, "
            f"attention_mask, inputs_embeds, labels, use_cache, logits_to_keep, output_hidden_states, return_dict, "
            f"init_state, and the packed-batch markers position_ids, seq_idx, cu_seq_lens_q/k, max_length_q/k. "
            f"If transformers passed this, it changed its contract: upgrade rwkv_hf."
        )


# The private parts of transformers this package still relies on, each because no public hook does the job.
# ``private_seam_problems()`` checks them all; a test calls it, so a transformers release that moves one fails
# CI by name instead of changing behaviour quietly.
PRIVATE_SEAMS = {
    # The GPT-NeoX 20B tokenizer applies ChatRWKV's fix_tokens (a final "\n\n" becomes "\n", "\n") on every
    # encode path; this is the one method they all go through (12 of transformers' own tokenizers override it).
    "PreTrainedTokenizerFast._encode_plus": (
        "transformers.PreTrainedTokenizerFast",
        "_encode_plus",
        ("text", "text_pair", "add_special_tokens", "padding_strategy", "truncation_strategy", "max_length",
         "stride", "is_split_into_words", "pad_to_multiple_of", "padding_side", "return_tensors",
         "return_overflowing_tokens", "return_offsets_mapping", "return_length", "verbose"),
    ),
    # ... and restores the backend's encode_special_tokens flag, which the base class flips and leaves flipped.
    "PreTrainedTokenizerFast._tokenizer": ("transformers.PreTrainedTokenizerFast", "_tokenizer", None),
    # The World tokenizer registers <|endoftext|> before the base __init__ runs (the documented slow-tokenizer
    # pattern) and reads the added-token tables to split text on them.
    "PreTrainedTokenizer._added_tokens_decoder": ("transformers.PreTrainedTokenizer", "_added_tokens_decoder", None),
    "PreTrainedTokenizer._added_tokens_encoder": ("transformers.PreTrainedTokenizer", "_added_tokens_encoder", None),
    # Byte-level decoding: the base class would decode each token to str separately and break UTF-8 sequences.
    "PreTrainedTokenizer._decode": ("transformers.PreTrainedTokenizer", "_decode", ("token_ids", "skip_special_tokens")),
}


def private_seam_problems() -> list:
    """Every entry of ``PRIVATE_SEAMS`` that the installed transformers no longer offers, as readable lines."""
    import importlib

    problems = []
    for seam, (owner, attribute, parameters) in PRIVATE_SEAMS.items():
        module_name, class_name = owner.rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
        if parameters is None:  # an instance attribute: look for where transformers' classes set it
            assignment = re.compile(rf"self\.{attribute}\s*(:[^=\n]+)?=[^=]")
            found = hasattr(cls, attribute) or any(
                assignment.search(inspect.getsource(base))
                for base in cls.__mro__
                if base.__module__.startswith("transformers")
            )
            if not found:
                problems.append(f"{seam}: transformers {TRANSFORMERS_VERSION} no longer sets {attribute}")
            continue
        member = getattr(cls, attribute, None)
        if member is None:
            problems.append(f"{seam}: transformers {TRANSFORMERS_VERSION} has no {owner}.{attribute}")
            continue
        missing = [p for p in parameters if p not in inspect.signature(member).parameters]
        if missing:
            problems.append(f"{seam}: transformers {TRANSFORMERS_VERSION} dropped parameters {missing}")
    return problems


__all__ = [
    "CACHE_ARG",
    "LOSS_KWARGS",
    "SUPPORTED_TRANSFORMERS",
    "TRANSFORMERS_VERSION",
    "TransformersContractError",
    "cache_kwargs",
    "model_output_cache",
    "private_seam_problems",
    "reject_unknown_kwargs",
]
