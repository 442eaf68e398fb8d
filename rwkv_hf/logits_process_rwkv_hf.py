"""ChatRWKV's decoding rules as `transformers` logits processors, plus generation presets.

Each processor works on its own inside
``model.generate(logits_processor=LogitsProcessorList([...]))`` and handles a batch: ``scores`` is
``[B, V]`` and ``input_ids`` is ``[B, T]``, and rows never influence each other.

The sources mirrored here are:

* ChatRWKV ``v2/chat.py`` (BlinkDL/ChatRWKV @965e40b): ``run_rnn`` (the newline adjustment and
  AVOID_REPEAT), the chat reply loop (the newline_adj schedule, presence/frequency penalties with decay,
  and the END_OF_TEXT ban), and the constants CHAT_LEN_SHORT=40, CHAT_LEN_LONG=150, GEN_TEMP=1.2,
  GEN_TOP_P=0.5, GEN_alpha_presence=0.4, GEN_alpha_frequency=0.4 and GEN_penalty_decay=0.996.
* ``rwkv`` 0.8.32 ``rwkv/utils.py``: ``PIPELINE.sample_logits`` (top-p cut at temperature 1, then top-k,
  then ``probs ** (1/T)``) and ``PIPELINE.generate`` (digit and space tokens get occurrence weight 0).
* ChatGLM3 ``modeling_chatglm.py``: ``InvalidScoreLogitsProcessor``.

ChatRWKV changes the logits in this order before it samples, and `build_rwkv_logits_processors` keeps
that order:

    out = run_rnn([token], newline_adj)     # out[END_OF_LINE] += newline_adj; ban a repeated "，：？！"
    out[END_OF_TEXT] = -999999999           # chat only
    out[n] -= alpha_presence + occurrence[n] * alpha_frequency   # for every n in occurrence
    token = sample_logits(out, temperature, top_p)

transformers runs a user's ``logits_processor`` list *before* its own Temperature/TopK/TopP warpers
(``GenerationMixin._get_logits_processor``). So the penalties here see raw logits, just as in ChatRWKV.

This module is flat on purpose. It imports only torch, transformers and the standard library, because
transformers copies it alone for ``trust_remote_code``. The generation presets therefore live in this
module (`GENERATION_PRESETS`) and are the one source of truth. ``configs/generation/*.json`` are copies
written by `save_generation_presets`, and a test checks that they have not drifted.
"""

from __future__ import annotations

import copy
import json
import math
import os
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "AVOID_REPEAT_CHARS",
    "CHATRWKV_BAN_VALUE",
    "GENERATION_PRESETS",
    "RwkvAvoidRepeatLogitsProcessor",
    "RwkvBanTokensLogitsProcessor",
    "RwkvInvalidScoreLogitsProcessor",
    "RwkvNewlineAdjustLogitsProcessor",
    "RwkvPenaltyLogitsProcessor",
    "RwkvSamplingWarper",
    "WORLD_AVOID_REPEAT_TOKEN_IDS",
    "WORLD_DOUBLE_NEWLINE_TOKEN_ID",
    "WORLD_END_OF_LINE_TOKEN_ID",
    "WORLD_END_OF_TEXT_TOKEN_ID",
    "WORLD_ZERO_WEIGHT_TOKEN_IDS",
    "ZERO_WEIGHT_CHARS",
    "build_rwkv_logits_processors",
    "chatrwkv_newline_adjustment",
    "list_generation_presets",
    "load_generation_preset",
    "neutralize_hf_sampling",
    "prepare_rwkv_generation",
    "rwkv_sampling_probs",
    "save_generation_presets",
    "zero_weight_token_ids_from_tokenizer",
]

# --------------------------------------------------------------------------------------------------
# Constants (ChatRWKV v2/chat.py and rwkv/utils.py)
# --------------------------------------------------------------------------------------------------

# chat.py bans by assignment or addition of this finite value rather than -inf.
CHATRWKV_BAN_VALUE = -999999999.0
CHAT_LEN_SHORT = 40
CHAT_LEN_LONG = 150
AVOID_REPEAT_CHARS = "，：？！"
# PIPELINE.generate: `if decode([token]) in ' \t0123456789': www = 0`. This is a substring test.
ZERO_WEIGHT_CHARS = " \t0123456789"

# World vocabulary (rwkv_vocab_v20230424). A test checks these ids against the official TRIE tokenizer.
WORLD_END_OF_TEXT_TOKEN_ID = 0
WORLD_END_OF_LINE_TOKEN_ID = 11  # "\n"
WORLD_DOUBLE_NEWLINE_TOKEN_ID = 261  # "\n\n"
WORLD_AVOID_REPEAT_TOKEN_IDS = (19137, 19151, 19156, 19126)  # "，", "：", "？", "！"
# Every World token whose text is a substring of ' \t0123456789': '\t', ' ', the digits 0-9, ' \t',
# '01', '12', ..., '89'.
WORLD_ZERO_WEIGHT_TOKEN_IDS = (10, 33, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58,
                               264, 621, 632, 643, 654, 665, 676, 687, 698, 709)
# The 20B (Pile/Raven) vocabulary that chat.py uses for non-World models.
PILE_END_OF_LINE_TOKEN_ID = 187
PILE_DOUBLE_NEWLINE_TOKEN_ID = 535

# ChatGLM3's InvalidScoreLogitsProcessor writes this score on the forced token.
_INVALID_FORCED_SCORE = 5e4


# --------------------------------------------------------------------------------------------------
# Argument checks: every one names the parameter and the expected range
# --------------------------------------------------------------------------------------------------


def _as_float(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number, got {value!r}") from None
    if math.isnan(value):
        raise ValueError(f"`{name}` must be a number, got NaN")
    return value


def _check_alpha(name: str, value: Any) -> float:
    value = _as_float(name, value)
    if not (0.0 <= value < math.inf):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value}")
    return value


def _check_decay(value: Any) -> float:
    value = _as_float("penalty_decay", value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"`penalty_decay` must be in (0, 1], got {value}")
    return value


def _check_temperature(value: Any) -> float:
    value = _as_float("temperature", value)
    if not (0.0 < value < math.inf):
        raise ValueError(
            f"`temperature` must be a finite number > 0, got {value} (ChatRWKV reads temperature=0 as "
            "greedy. Here use do_sample=False or top_p=0 instead)"
        )
    return value


def _check_top_p(value: Any) -> float:
    value = _as_float("top_p", value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"`top_p` must be in [0, 1] (0 = keep only the most likely token(s)), got {value}")
    return value


def _check_top_k(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise ValueError(f"`top_k` must be an integer >= 0 (0 = disabled), got {value!r}")
    return int(value)


def _check_token_id(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be a token id (an integer >= 0), got {value!r}")
    return value


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}")
    return value


def _check_token_ids(name: str, values: Iterable[int]) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    return tuple(sorted({_check_token_id(name, v) for v in values}))


def _vocab_mask(token_ids: Sequence[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] bool mask of `token_ids`. Ids >= V are dropped, because scores may be narrower than a tokenizer."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    ids = [i for i in token_ids if i < vocab_size]
    if ids:
        mask[torch.tensor(ids, device=device)] = True
    return mask


# --------------------------------------------------------------------------------------------------
# Tokenizer helpers (duck-typed: an HF tokenizer or the official TRIE_TOKENIZER both work)
# --------------------------------------------------------------------------------------------------


def _encode_plain(tokenizer: Any, text: str) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # rwkv's TRIE_TOKENIZER.encode(text) takes no keyword arguments
        ids = tokenizer.encode(text)
    if hasattr(ids, "ids"):  # a `tokenizers.Encoding`
        ids = ids.ids
    return [int(i) for i in ids]


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = _encode_plain(tokenizer, text)
    return ids[0] if len(ids) == 1 else None


def _decode_each(tokenizer: Any, n: int) -> list[str | None]:
    batch = [[i] for i in range(n)]
    if hasattr(tokenizer, "batch_decode"):
        try:
            return list(tokenizer.batch_decode(batch, skip_special_tokens=False,
                                               clean_up_tokenization_spaces=False))
        except TypeError:
            return list(tokenizer.batch_decode(batch))
    texts: list[str | None] = []
    for ids in batch:
        try:
            texts.append(tokenizer.decode(ids))
        except Exception:  # e.g. TRIE_TOKENIZER has no id 0; such an id never gets weight 0
            texts.append(None)
    return texts


def zero_weight_token_ids_from_tokenizer(
    tokenizer: Any, vocab_size: int | None = None, chars: str = ZERO_WEIGHT_CHARS
) -> list[int]:
    """Every id whose one-token decoding is a substring of `chars` (rwkv's ``PIPELINE.generate``).

    The official test is ``decode([token]) in ' \\t0123456789'``. That is a substring test, so ' ', '\\t',
    the digits and digit runs such as '12' all match, and so does the empty string. Those tokens still
    enter ``occurrence`` with weight 0: the presence penalty applies to them, the frequency part does not.
    `vocab_size` defaults to ``len(tokenizer)``.
    """
    if vocab_size is None:
        vocab_size = len(tokenizer)
    texts = _decode_each(tokenizer, int(vocab_size))
    return [i for i, text in enumerate(texts) if text is not None and text in chars]


_ZERO_WEIGHT_CACHE: "weakref.WeakKeyDictionary[Any, list[int]]" = weakref.WeakKeyDictionary()


def _cached_zero_weight_ids(tokenizer: Any) -> list[int]:
    # Decoding every id of a 65k vocabulary takes a while, and builders run once per generate call.
    try:
        return _ZERO_WEIGHT_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = zero_weight_token_ids_from_tokenizer(tokenizer)
    try:
        _ZERO_WEIGHT_CACHE[tokenizer] = ids
    except TypeError:
        pass
    return ids


# --------------------------------------------------------------------------------------------------
# Prompt-length tracking, needed to count generated tokens only
# --------------------------------------------------------------------------------------------------


class _GenerationTracker:
    """Works out the prompt length of the current `generate` call from the ``input_ids`` it sees.

    The first call of a generate loop sees exactly the prompt. Each later call sees one more token. A call
    that does not continue the previous one starts a new generation: the batch size changed, the length
    is not the previous length + 1, or the prompt prefix differs. One case cannot be told apart:
    ``generate(previous_output)`` when the new prompt is exactly the old prompt plus every generated
    token. For that case call ``reset()``, pass ``prompt_length=``, or build fresh processors per call.
    """

    def __init__(self, prompt_length: int | None = None):
        if prompt_length is not None:
            prompt_length = _check_count("prompt_length", prompt_length)
        self.fixed_prompt_length = prompt_length
        self.reset()

    def reset(self) -> None:
        self._prompt_ids: torch.Tensor | None = None
        self._last_length = -1

    def prompt_length(self, input_ids: torch.Tensor) -> int:
        if self.fixed_prompt_length is not None:
            return min(self.fixed_prompt_length, input_ids.shape[-1])
        length = input_ids.shape[-1]
        prompt = self._prompt_ids
        continues = (
            prompt is not None
            and length == self._last_length + 1
            and input_ids.shape[0] == prompt.shape[0]
            and torch.equal(input_ids[:, : prompt.shape[1]], prompt.to(input_ids.device))
        )
        if not continues:
            self._prompt_ids = input_ids.detach().clone()
        self._last_length = length
        return self._prompt_ids.shape[1]


class _ReprMixin:
    _repr_fields: tuple[str, ...] = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._repr_fields)
        return f"{type(self).__name__}({fields})"


# --------------------------------------------------------------------------------------------------
# 1. NaN / inf guard
# --------------------------------------------------------------------------------------------------


class RwkvInvalidScoreLogitsProcessor(_ReprMixin, LogitsProcessor):
    """Replaces every row that holds a NaN or +inf with a distribution that ends the turn.

    This copies ChatGLM3's ``InvalidScoreLogitsProcessor``: ``scores.zero_(); scores[..., 5] = 5e4``.
    Here it works per row, so one broken row in a batch leaves the other rows alone. A row with no finite
    score at all counts as broken too. -inf alone does not: transformers' own processors (suppress_tokens,
    min_new_tokens) and the bans in this module use -inf, so a row with some -inf entries is valid. Pass
    ``treat_neg_inf_as_invalid=True`` to get ChatGLM's any-inf rule.

    Put this processor first, so that it sees the model's raw logits. Pick `end_token_id` among tokens
    that are not banned later: 0 (EOS) for free generation, the "\\n\\n" id (World: 261) for chat, where
    token 0 is banned. The rest of the row is set to 0, not -inf, so if a later processor bans the forced
    token, sampling still works instead of hitting NaN.
    """

    supports_continuous_batching = True
    _repr_fields = ("end_token_id", "treat_neg_inf_as_invalid")

    def __init__(self, end_token_id: int = 0, *, treat_neg_inf_as_invalid: bool = False):
        self.end_token_id = _check_token_id("end_token_id", end_token_id)
        self.treat_neg_inf_as_invalid = bool(treat_neg_inf_as_invalid)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.end_token_id >= scores.shape[-1]:
            raise ValueError(
                f"`end_token_id` must be < the vocabulary size {scores.shape[-1]}, got {self.end_token_id}"
            )
        finite = torch.isfinite(scores)
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | ~finite.any(-1)
        if self.treat_neg_inf_as_invalid:
            bad = bad | ~finite.all(-1)
        if not bool(bad.any()):
            return scores
        safe = torch.zeros_like(scores[:1])
        safe[0, self.end_token_id] = _INVALID_FORCED_SCORE
        return torch.where(bad[:, None], safe, scores)


# --------------------------------------------------------------------------------------------------
# 2. Presence / frequency penalty with decay
# --------------------------------------------------------------------------------------------------


class RwkvPenaltyLogitsProcessor(_ReprMixin, LogitsProcessor):
    r"""ChatRWKV's presence and frequency penalty, with the frequency counts decaying over time.

    ChatRWKV (v2/chat.py reply loop, and ``PIPELINE.generate``) does, for each generated token:

        for n in occurrence: out[n] -= alpha_presence + occurrence[n] * alpha_frequency
        token = sample_logits(out, ...)
        for n in occurrence: occurrence[n] *= penalty_decay
        occurrence[token] = occurrence.get(token, 0) + www      # www = 1, or 0 for zero-weight tokens

    Only the tokens generated in this call count; the prompt does not, and ``occurrence`` starts empty for
    each reply. Unrolled, after generated tokens :math:`t_0 \dots t_{G-1}`:

    .. math:: occurrence[n] = \sum_{j:\,t_j = n} www(n)\, decay^{G-1-j}

    and every n that appeared at all gets the presence part, even when its weight is 0. This processor
    rebuilds that table from ``input_ids[:, prompt_length:]`` on every call. It keeps no per-token state,
    so it is exact, handles every row on its own, and still works when beam search reorders rows.

    `zero_weight_token_ids`: the default None gives every token weight 1, as in chat.py. Pass
    `zero_weight_token_ids_from_tokenizer(tok)` (or `WORLD_ZERO_WEIGHT_TOKEN_IDS`) to get the
    ``PIPELINE.generate`` rule, where a token whose text is a substring of ' \t0123456789' has weight 0.

    `prompt_length`: None records it on the first call of each generate loop (see `_GenerationTracker`);
    an int fixes it. Call `reset()` before reusing an instance for a prompt that continues the last output.
    """

    supports_continuous_batching = False
    _repr_fields = ("alpha_presence", "alpha_frequency", "penalty_decay")

    def __init__(
        self,
        alpha_presence: float = 0.4,
        alpha_frequency: float = 0.4,
        penalty_decay: float = 0.996,
        prompt_length: int | None = None,
        zero_weight_token_ids: Iterable[int] | None = None,
    ):
        self.alpha_presence = _check_alpha("alpha_presence", alpha_presence)
        self.alpha_frequency = _check_alpha("alpha_frequency", alpha_frequency)
        self.penalty_decay = _check_decay(penalty_decay)
        self.zero_weight_token_ids = _check_token_ids("zero_weight_token_ids", zero_weight_token_ids or ())
        self._tracker = _GenerationTracker(prompt_length)
        self._zero_mask: torch.Tensor | None = None

    def reset(self) -> None:
        self._tracker.reset()

    def occurrence(self, generated_ids: torch.LongTensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(occurrence [B, V] float, present [B, V] bool) after the tokens in `generated_ids` [B, G]."""
        device = generated_ids.device
        # float64 where the device has it: ChatRWKV accumulates occurrence as Python floats.
        dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        batch, length = generated_ids.shape
        occurrence = torch.zeros(batch, vocab_size, dtype=dtype, device=device)
        present = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
        if length == 0:
            return occurrence, present
        in_vocab = (generated_ids >= 0) & (generated_ids < vocab_size)
        ids = torch.where(in_vocab, generated_ids, torch.zeros_like(generated_ids))
        age = torch.arange(length - 1, -1, -1, device=device, dtype=dtype)
        weight = (self.penalty_decay ** age).expand(batch, length) * in_vocab
        if self.zero_weight_token_ids:
            if self._zero_mask is None or self._zero_mask.shape[0] != vocab_size or self._zero_mask.device != device:
                self._zero_mask = _vocab_mask(self.zero_weight_token_ids, vocab_size, device)
            weight = weight * ~self._zero_mask[ids]
        occurrence.scatter_add_(1, ids, weight)
        present.scatter_(1, ids, in_vocab)
        return occurrence, present

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        prompt_length = self._tracker.prompt_length(input_ids)
        if self.alpha_presence == 0.0 and self.alpha_frequency == 0.0:
            return scores
        generated = input_ids[:, prompt_length:]
        if generated.shape[1] == 0:
            return scores
        occurrence, present = self.occurrence(generated, scores.shape[-1])
        # One combined subtraction, as chat.py does: out[n] -= (presence + occurrence[n] * frequency)
        penalty = present * self.alpha_presence + occurrence * self.alpha_frequency
        return scores - penalty.to(scores.dtype)


# --------------------------------------------------------------------------------------------------
# 3. Newline schedule of the chat reply loop
# --------------------------------------------------------------------------------------------------


def chatrwkv_newline_adjustment(
    num_generated: int,
    *,
    chat_len_short: int = CHAT_LEN_SHORT,
    chat_len_long: int = CHAT_LEN_LONG,
    faithful_offset: bool = True,
) -> float:
    """What ChatRWKV v2/chat.py adds to the "\\n" logit before it samples reply token `num_generated`.

    chat.py (BlinkDL/ChatRWKV v2/chat.py, the reply loop)::

        out = run_rnn(pipeline.encode(new), newline_adj=-999999999)   # logits for reply token 0
        for i in range(999):
            if i <= 0:                newline_adj = -999999999
            elif i <= CHAT_LEN_SHORT: newline_adj = (i - CHAT_LEN_SHORT) / 10
            elif i <= CHAT_LEN_LONG:  newline_adj = 0
            else:                     newline_adj = min(3, (i - CHAT_LEN_LONG) * 0.25)  # MUST END THE GENERATION
            ... sample token i ...
            out = run_rnn([token], newline_adj=newline_adj)   # -> these logits sample token i + 1

    So the adjustment worked out at step i reaches the logits of token i + 1. With k = `num_generated`,
    that gives: k = 0 and 1 banned; k = 2..41 get (k - 41) / 10, i.e. -3.9 .. 0; k = 42..151 get 0;
    k >= 152 get min(3, (k - 151) * 0.25). ``faithful_offset=False`` drops the one-step lag (i = k).
    """
    if faithful_offset:
        if num_generated <= 0:
            return CHATRWKV_BAN_VALUE  # run_rnn(prompt, newline_adj=-999999999)
        i = num_generated - 1
    else:
        i = num_generated
    if i <= 0:
        return CHATRWKV_BAN_VALUE
    if i <= chat_len_short:
        return (i - chat_len_short) / 10
    if i <= chat_len_long:
        return 0.0
    return min(3.0, (i - chat_len_long) * 0.25)


class RwkvNewlineAdjustLogitsProcessor(_ReprMixin, LogitsProcessor):
    """Adds ChatRWKV's chat newline schedule (`chatrwkv_newline_adjustment`) to the single "\\n" token.

    The schedule bans "\\n" on the first tokens of a reply, discourages it gently up to CHAT_LEN_SHORT
    tokens, leaves it alone up to CHAT_LEN_LONG, and then pushes it up by as much as +3 so the reply ends.
    It acts only on END_OF_LINE (World: 11, 20B: 187), as chat.py does. The model can still emit the
    "\\n\\n" token directly. The value is added, not assigned, so the ban is the finite -999999999 that
    chat.py uses.
    """

    supports_continuous_batching = False
    _repr_fields = ("end_of_line_token_id", "chat_len_short", "chat_len_long", "faithful_offset")

    def __init__(
        self,
        end_of_line_token_id: int = WORLD_END_OF_LINE_TOKEN_ID,
        *,
        chat_len_short: int = CHAT_LEN_SHORT,
        chat_len_long: int = CHAT_LEN_LONG,
        faithful_offset: bool = True,
        prompt_length: int | None = None,
    ):
        self.end_of_line_token_id = _check_token_id("end_of_line_token_id", end_of_line_token_id)
        self.chat_len_short = _check_count("chat_len_short", chat_len_short)
        self.chat_len_long = _check_count("chat_len_long", chat_len_long)
        if self.chat_len_long < self.chat_len_short:
            raise ValueError(
                f"`chat_len_long` must be >= `chat_len_short` ({chat_len_short}), got {chat_len_long}"
            )
        self.faithful_offset = bool(faithful_offset)
        self._tracker = _GenerationTracker(prompt_length)

    def reset(self) -> None:
        self._tracker.reset()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        num_generated = input_ids.shape[-1] - self._tracker.prompt_length(input_ids)
        adj = chatrwkv_newline_adjustment(
            num_generated,
            chat_len_short=self.chat_len_short,
            chat_len_long=self.chat_len_long,
            faithful_offset=self.faithful_offset,
        )
        if adj == 0.0 or self.end_of_line_token_id >= scores.shape[-1]:
            return scores
        scores = scores.clone()
        scores[:, self.end_of_line_token_id] += adj
        return scores


# --------------------------------------------------------------------------------------------------
# 4. AVOID_REPEAT and token bans
# --------------------------------------------------------------------------------------------------


def _resolve_token_ids(tokenizer_or_token_ids: Any, chars: str, what: str) -> tuple[int, ...]:
    if tokenizer_or_token_ids is None:
        if chars != AVOID_REPEAT_CHARS:
            raise ValueError(f"{what}: pass a tokenizer (or token ids) to map custom `chars` {chars!r} to ids")
        return WORLD_AVOID_REPEAT_TOKEN_IDS
    if isinstance(tokenizer_or_token_ids, (torch.Tensor, list, tuple, set, frozenset, range)):
        return _check_token_ids("token_ids", tokenizer_or_token_ids)
    ids = []
    for ch in chars:
        token = _single_token_id(tokenizer_or_token_ids, ch)
        if token is None:
            # chat.py asserts one token per character. Here such a character is skipped instead, so that
            # a tokenizer without these tokens still works.
            logger.warning(f"{what}: {ch!r} is not a single token for this tokenizer; it is not avoided")
        else:
            ids.append(token)
    return tuple(sorted(set(ids)))


class RwkvAvoidRepeatLogitsProcessor(_ReprMixin, LogitsProcessor):
    """Bans an immediate repeat of "，：？！" (ChatRWKV's AVOID_REPEAT).

    chat.py ``run_rnn``: ``if model_tokens[-1] in AVOID_REPEAT_TOKENS: out[model_tokens[-1]] = -999999999``.
    The test is on the last token fed, which may be the last prompt token on the first step, so it looks
    at ``input_ids[:, -1]`` whether that token came from the prompt or was generated. A banned score is
    -inf, as transformers' own bans use. After softmax, -inf and -999999999 both give probability 0.

    The first argument is either a tokenizer, whose encoding of each character in `chars` gives the ids
    (only characters that are one token are used), or the token ids themselves. None means the World
    vocabulary ids of the default characters.
    """

    supports_continuous_batching = False
    _repr_fields = ("token_ids",)

    def __init__(self, tokenizer_or_token_ids: Any = None, chars: str = AVOID_REPEAT_CHARS):
        self.token_ids = _resolve_token_ids(tokenizer_or_token_ids, chars, type(self).__name__)
        self._ids: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.token_ids or input_ids.shape[-1] == 0:
            return scores
        if self._ids is None or self._ids.device != input_ids.device:
            self._ids = torch.tensor(self.token_ids, dtype=input_ids.dtype, device=input_ids.device)
        last = input_ids[:, -1]
        hit = torch.isin(last, self._ids) & (last < scores.shape[-1])
        if not bool(hit.any()):
            return scores
        ban = torch.zeros_like(scores, dtype=torch.bool)
        ban.scatter_(1, last.clamp(0, scores.shape[-1] - 1)[:, None], hit[:, None])
        return scores.masked_fill(ban, -math.inf)


class RwkvBanTokensLogitsProcessor(_ReprMixin, LogitsProcessor):
    """Sets the scores of `token_ids` to -inf on every step. Use it for the END_OF_TEXT (id 0) ban in chat.

    chat.py: ``out[END_OF_TEXT] = -999999999  # disable <|endoftext|>``; API_DEMO_CHAT.py: ``out[0] -= 1e10``.
    transformers' ``SuppressTokensLogitsProcessor`` (``generate(suppress_tokens=[0])``) has the same effect
    and is a fine alternative. This class is used instead because in transformers 5 a custom processor
    of the same type as a built-in one replaces it (``_merge_criteria_processor_list``). That would
    silently override a checkpoint's own ``suppress_tokens``.

    One difference from chat.py: it does not ban END_OF_TEXT for reply token 0, because the ban follows
    ``run_rnn([token])`` inside the loop. This class bans it on every step, as API_DEMO_CHAT.py does.
    """

    supports_continuous_batching = True
    _repr_fields = ("token_ids",)

    def __init__(self, token_ids: Iterable[int] = (WORLD_END_OF_TEXT_TOKEN_ID,)):
        self.token_ids = _check_token_ids("token_ids", token_ids)
        self._mask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.token_ids:
            return scores
        if self._mask is None or self._mask.shape[0] != scores.shape[-1] or self._mask.device != scores.device:
            self._mask = _vocab_mask(self.token_ids, scores.shape[-1], scores.device)
        return scores.masked_fill(self._mask, -math.inf)


# --------------------------------------------------------------------------------------------------
# 5. ChatRWKV's sampler: top-p at T=1, then top-k, then probs ** (1/T)
# --------------------------------------------------------------------------------------------------


def rwkv_sampling_probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 0.85,
    top_k: int = 0,
    *,
    reproduce_top_p_bug: bool = False,
) -> torch.Tensor:
    """The distribution that rwkv's ``PIPELINE.sample_logits`` draws from, batched over rows. Returns [B, V].

    The official order (rwkv/utils.py):
      1. ``probs = softmax(logits.float())``, at temperature 1.
      2. ``cutoff = sorted_desc[argmax(cumsum >= top_p)]``, then ``probs[probs < cutoff] = 0``. Ties with
         the cutoff survive.
      3. If ``0 < top_k < V``, zero everything except the top_k most likely (ranked on the step-1 probs).
      4. ``probs = probs ** (1 / temperature)``, then normalise.

    The official ``top_p=1.0`` bug: fp32 cumsum often stops just short of 1.0. argmax of an all-False
    array is 0, so the cutoff becomes the largest probability and sampling turns greedy. By default this
    function treats ``top_p >= 1`` as "no top-p cut", and when the cumsum never reaches `top_p` it keeps
    every token. ``reproduce_top_p_bug=True`` keeps the official behaviour instead, for parity tests.
    """
    temperature = _check_temperature(temperature)
    top_p = _check_top_p(top_p)
    top_k = _check_top_k(top_k)
    probs = torch.softmax(logits.float(), dim=-1)
    vocab = probs.shape[-1]
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True)
    if reproduce_top_p_bug or top_p < 1.0:
        reached = torch.cumsum(sorted_probs, dim=-1) >= top_p
        cut_index = reached.int().argmax(dim=-1, keepdim=True)  # first True; 0 when none, as np.argmax
        if not reproduce_top_p_bug:
            cut_index = torch.where(reached.any(-1, keepdim=True), cut_index, torch.full_like(cut_index, vocab - 1))
        cutoff = sorted_probs.gather(-1, cut_index)
        probs = probs.masked_fill(probs < cutoff, 0.0)
    if 0 < top_k < vocab:
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, sorted_ids[..., :top_k], True)
        probs = probs.masked_fill(~keep, 0.0)
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    return probs / probs.sum(dim=-1, keepdim=True)


class RwkvSamplingWarper(_ReprMixin, LogitsProcessor):
    """ChatRWKV's exact sampler as a warper. It returns log-probabilities, with -inf for removed tokens.

    transformers applies temperature *before* top-p. ChatRWKV cuts top-p on the T=1 distribution and
    applies temperature afterwards, so the same (T, top_p) gives different text. To sample ChatRWKV's
    distribution, put this warper last and turn transformers' own warpers off: ``do_sample=True,
    temperature=1.0, top_p=1.0, top_k=0`` (`neutralize_hf_sampling` does this, and `prepare_rwkv_generation`
    wires up both). With ``do_sample=False`` it leaves the argmax unchanged.

    ``temperature`` must be > 0, ``top_p`` in [0, 1] (0 keeps only the most likely token and its ties, as
    the official code does) and ``top_k`` >= 0 (0 = off). See `rwkv_sampling_probs` for
    `reproduce_top_p_bug`.
    """

    supports_continuous_batching = True
    _repr_fields = ("temperature", "top_p", "top_k", "reproduce_top_p_bug")

    def __init__(self, temperature: float = 1.0, top_p: float = 0.85, top_k: int = 0, *,
                 reproduce_top_p_bug: bool = False):
        self.temperature = _check_temperature(temperature)
        self.top_p = _check_top_p(top_p)
        self.top_k = _check_top_k(top_k)
        self.reproduce_top_p_bug = bool(reproduce_top_p_bug)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = rwkv_sampling_probs(scores, self.temperature, self.top_p, self.top_k,
                                    reproduce_top_p_bug=self.reproduce_top_p_bug)
        return torch.log(probs).to(scores.dtype)


# --------------------------------------------------------------------------------------------------
# 6. Assembling the ChatRWKV chat set
# --------------------------------------------------------------------------------------------------


def _config_value(config: GenerationConfig | None, key: str, default: Any) -> Any:
    value = getattr(config, key, None) if config is not None else None
    return default if value is None else value


def build_rwkv_logits_processors(
    tokenizer: Any = None,
    *,
    generation_config: GenerationConfig | None = None,
    alpha_presence: float | None = None,
    alpha_frequency: float | None = None,
    penalty_decay: float | None = None,
    chat: bool | None = None,
    prompt_length: int | None = None,
    end_of_line_token_id: int | None = None,
    ban_token_ids: Iterable[int] | None = None,
    invalid_end_token_id: int | None = None,
    avoid_repeat_chars: str = AVOID_REPEAT_CHARS,
    zero_weight_token_ids: Iterable[int] | str | None = None,
    exact_sampling: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    reproduce_top_p_bug: bool = False,
) -> LogitsProcessorList:
    """ChatRWKV's logits rules as a `LogitsProcessorList`, in the order ChatRWKV applies them.

    The order is: `RwkvInvalidScoreLogitsProcessor` (sees the raw logits) → `RwkvNewlineAdjustLogitsProcessor`
    → `RwkvAvoidRepeatLogitsProcessor` (both from chat.py ``run_rnn``) → `RwkvBanTokensLogitsProcessor`
    (``out[END_OF_TEXT] = -999999999``) → `RwkvPenaltyLogitsProcessor` → `RwkvSamplingWarper` (only with
    ``exact_sampling``). With ``chat=False`` the newline, avoid-repeat and default END_OF_TEXT ban are
    left out, which matches ``PIPELINE.generate`` (``token_ban`` defaults to empty).

    A value not passed here is read from `generation_config` (``rwkv_alpha_presence``,
    ``rwkv_alpha_frequency``, ``rwkv_penalty_decay``, ``rwkv_chat_rules``, ``rwkv_ban_token_ids``,
    ``rwkv_zero_weight_token_ids``, and ``temperature``/``top_p``/``top_k`` for the exact sampler). Failing
    that it falls back to chat.py: 0.4 / 0.4 / 0.996, chat on. Token ids come from `tokenizer`: "\\n" →
    END_OF_LINE, and "\\n\\n" is the forced token for invalid rows. Without a tokenizer the World ids are
    used (11, 261, "，：？！" → 19137, 19151, 19156, 19126).

    ``zero_weight_token_ids``: None means every token has weight 1 (chat.py), ``"auto"`` means the
    ``PIPELINE.generate`` digit and space rule, derived from `tokenizer` (or the World ids), and a list
    is used as given.

    ``exact_sampling=True`` appends `RwkvSamplingWarper`. The caller must then switch off transformers'
    own warpers (`neutralize_hf_sampling`). This is why the builder never turns it on from a config's
    ``rwkv_exact_sampling``: `prepare_rwkv_generation` reads that key and does both steps.

    The processors that count generated tokens record the prompt length on their first call. Build a
    fresh list for each generate call (cheap: the zero-weight ids are cached per tokenizer), or pass
    `prompt_length`.
    """
    cfg = generation_config
    alpha_presence = alpha_presence if alpha_presence is not None else _config_value(cfg, "rwkv_alpha_presence", 0.4)
    alpha_frequency = (
        alpha_frequency if alpha_frequency is not None else _config_value(cfg, "rwkv_alpha_frequency", 0.4)
    )
    penalty_decay = penalty_decay if penalty_decay is not None else _config_value(cfg, "rwkv_penalty_decay", 0.996)
    chat = bool(chat if chat is not None else _config_value(cfg, "rwkv_chat_rules", True))
    if zero_weight_token_ids is None:
        zero_weight_token_ids = _config_value(cfg, "rwkv_zero_weight_token_ids", None)

    newline_id = _single_token_id(tokenizer, "\n") if tokenizer is not None else WORLD_END_OF_LINE_TOKEN_ID
    double_newline_id = (
        _single_token_id(tokenizer, "\n\n") if tokenizer is not None else WORLD_DOUBLE_NEWLINE_TOKEN_ID
    )
    if end_of_line_token_id is None:
        end_of_line_token_id = newline_id
    if ban_token_ids is None:
        ban_token_ids = _config_value(cfg, "rwkv_ban_token_ids", [WORLD_END_OF_TEXT_TOKEN_ID] if chat else [])
    ban_token_ids = _check_token_ids("ban_token_ids", ban_token_ids)
    if invalid_end_token_id is None:
        # End the turn: "\n\n" when it is one token, otherwise EOS, and never a token banned later on.
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else WORLD_END_OF_TEXT_TOKEN_ID
        candidates = [c for c in (double_newline_id, eos, end_of_line_token_id) if c is not None] or [0]
        invalid_end_token_id = next((c for c in candidates if c not in ban_token_ids), candidates[0])

    if isinstance(zero_weight_token_ids, str):
        if zero_weight_token_ids != "auto":
            raise ValueError(
                f"`zero_weight_token_ids` must be None, 'auto' or a list of ids, got {zero_weight_token_ids!r}"
            )
        zero_weight_token_ids = (
            _cached_zero_weight_ids(tokenizer) if tokenizer is not None else WORLD_ZERO_WEIGHT_TOKEN_IDS
        )

    processors = LogitsProcessorList([RwkvInvalidScoreLogitsProcessor(invalid_end_token_id)])
    if chat:
        if end_of_line_token_id is None:
            logger.warning("build_rwkv_logits_processors: '\\n' is not one token; the newline schedule is off")
        else:
            processors.append(RwkvNewlineAdjustLogitsProcessor(end_of_line_token_id, prompt_length=prompt_length))
        processors.append(RwkvAvoidRepeatLogitsProcessor(tokenizer, avoid_repeat_chars))
    if ban_token_ids:
        processors.append(RwkvBanTokensLogitsProcessor(ban_token_ids))
    processors.append(
        RwkvPenaltyLogitsProcessor(
            alpha_presence,
            alpha_frequency,
            penalty_decay,
            prompt_length=prompt_length,
            zero_weight_token_ids=zero_weight_token_ids,
        )
    )
    if exact_sampling:
        processors.append(
            RwkvSamplingWarper(
                temperature if temperature is not None else _config_value(cfg, "temperature", 1.0),
                top_p if top_p is not None else _config_value(cfg, "top_p", 1.0),
                top_k if top_k is not None else _config_value(cfg, "top_k", 0),
                reproduce_top_p_bug=reproduce_top_p_bug,
            )
        )
    return processors


def neutralize_hf_sampling(generation_config: GenerationConfig) -> GenerationConfig:
    """A copy of `generation_config` in which transformers' own sampling warpers do nothing.

    The copy keeps ``do_sample=True`` and sets temperature=1, top_k=0 (transformers' default is 50),
    top_p=1 and typical_p=1, with the epsilon and eta cutoffs off. `RwkvSamplingWarper` then decides the
    distribution alone. A min_p set in this config becomes 0.0 (an identity filter). A min_p that exists
    only in the model's own generation_config is not visible here, so it would still be applied.
    """
    cfg = copy.deepcopy(generation_config)
    cfg.do_sample = True
    cfg.temperature = 1.0
    cfg.top_k = 0
    cfg.top_p = 1.0
    cfg.typical_p = 1.0
    cfg.epsilon_cutoff = 0.0
    cfg.eta_cutoff = 0.0
    if getattr(cfg, "min_p", None) is not None:
        cfg.min_p = 0.0
    if getattr(cfg, "top_h", None) is not None:
        cfg.top_h = None
    return cfg


def prepare_rwkv_generation(
    tokenizer: Any = None, generation_config: GenerationConfig | None = None, **kwargs: Any
) -> tuple[GenerationConfig, LogitsProcessorList]:
    """``(generation_config, logits_processor)`` to pass to ``model.generate`` for ChatRWKV-style decoding.

    `kwargs` go to `build_rwkv_logits_processors`. When exact sampling is on (the ``exact_sampling``
    kwarg, else ``rwkv_exact_sampling`` from the config) and the config samples, the sampler's T, top_p
    and top_k move into `RwkvSamplingWarper`. The returned config is then neutralised, so that transformers
    does not apply them a second time, in its own order. Otherwise the config is returned as a copy.

        gen_cfg, procs = prepare_rwkv_generation(tok, load_generation_preset("chat"))
        model.generate(**inputs, generation_config=gen_cfg, logits_processor=procs)
    """
    cfg = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    exact = kwargs.pop("exact_sampling", None)
    exact = bool(exact if exact is not None else _config_value(cfg, "rwkv_exact_sampling", False))
    exact = exact and bool(cfg.do_sample)
    processors = build_rwkv_logits_processors(tokenizer, generation_config=cfg, exact_sampling=exact, **kwargs)
    return (neutralize_hf_sampling(cfg) if exact else cfg), processors


# --------------------------------------------------------------------------------------------------
# 7. Generation presets (the one source of truth; configs/generation/*.json are copies of these)
# --------------------------------------------------------------------------------------------------

# The temperature/top_p values are meant for ChatRWKV's order (top-p first, temperature after).
# `rwkv_exact_sampling: true` makes `prepare_rwkv_generation` honour that. Passed straight to `generate`,
# transformers applies temperature first, which only approximates these values.
GENERATION_PRESETS: dict[str, dict[str, Any]] = {
    # ChatRWKV v2/chat.py: GEN_TEMP=1.2, GEN_TOP_P=0.5, presence/frequency 0.4, decay 0.996, reply loop
    # `for i in range(999)`. Also the first creative pair in the decoding guide (T 1.2, top_p 0.5).
    "chat": {
        "do_sample": True,
        "temperature": 1.2,
        "top_p": 0.5,
        "top_k": 0,
        "max_new_tokens": 999,
        "rwkv_alpha_presence": 0.4,
        "rwkv_alpha_frequency": 0.4,
        "rwkv_penalty_decay": 0.996,
        "rwkv_chat_rules": True,
        "rwkv_exact_sampling": True,
        "rwkv_preset_source": "ChatRWKV v2/chat.py GEN_* constants",
    },
    # ChatRWKV API_DEMO_CHAT.py (the RWKV-7 G1 reference): GEN_TEMP=1.0, GEN_TOP_P=0.3, presence/frequency
    # 0.5, decay 0.996, `out[0] -= 1e10` on every step, no newline schedule.
    "chat_g1": {
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 0.3,
        "top_k": 0,
        "max_new_tokens": 999,
        "rwkv_alpha_presence": 0.5,
        "rwkv_alpha_frequency": 0.5,
        "rwkv_penalty_decay": 0.996,
        "rwkv_chat_rules": False,
        "rwkv_ban_token_ids": [0],
        "rwkv_exact_sampling": True,
        "rwkv_preset_source": "ChatRWKV API_DEMO_CHAT.py GEN_* constants",
    },
    # Decoding guide, creative tasks (novels, dialogue): high temperature with low top_p; "for novel
    # continuation try Temperature 2, Top_P 0.1~0.2". Presence 0.4 is the top of the guide's 0.2~0.4 range.
    # 256 = chat.py FREE_GEN_LEN.
    "creative_writing": {
        "do_sample": True,
        "temperature": 2.0,
        "top_p": 0.2,
        "top_k": 0,
        "max_new_tokens": 256,
        "rwkv_alpha_presence": 0.4,
        "rwkv_alpha_frequency": 0.4,
        "rwkv_penalty_decay": 0.996,
        "rwkv_chat_rules": False,
        "rwkv_exact_sampling": True,
        "rwkv_preset_source": "RWKV decoding guide: creative writing (T 2, top_p 0.2)",
    },
    # Decoding guide, mechanical tasks (QA over material, summaries): "Temperature 1, Top_P 0.2". Presence
    # 0.2 is the bottom of the guide's 0.2~0.4 range; 0.2/0.2 are also the rwkv PIPELINE_ARGS defaults.
    # 500 = RWKV-Runner's max_tokens default.
    "mechanical_qa": {
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 0.2,
        "top_k": 0,
        "max_new_tokens": 500,
        "rwkv_alpha_presence": 0.2,
        "rwkv_alpha_frequency": 0.2,
        "rwkv_penalty_decay": 0.996,
        "rwkv_chat_rules": False,
        "rwkv_exact_sampling": True,
        "rwkv_preset_source": "RWKV decoding guide: mechanical QA / summary (T 1, top_p 0.2)",
    },
    # Decoding guide, very mechanical answers (keyword extraction, yes/no, ABCD): "Temperature 1, Top_P 0,
    # presence and frequency 0". top_p=0 is greedy in ChatRWKV, so here do_sample=False.
    "extraction": {
        "do_sample": False,
        "max_new_tokens": 100,
        "rwkv_alpha_presence": 0.0,
        "rwkv_alpha_frequency": 0.0,
        "rwkv_penalty_decay": 0.996,
        "rwkv_chat_rules": False,
        "rwkv_exact_sampling": False,
        "rwkv_preset_source": "RWKV decoding guide: keyword extraction (T 1, top_p 0, penalties 0)",
    },
}


def list_generation_presets() -> list[str]:
    return sorted(GENERATION_PRESETS)


def load_generation_preset(name: str, **overrides: Any) -> GenerationConfig:
    """A `GenerationConfig` for preset `name` (see `GENERATION_PRESETS`), with `overrides` applied on top."""
    if name not in GENERATION_PRESETS:
        raise ValueError(f"unknown generation preset {name!r}; expected one of {list_generation_presets()}")
    return GenerationConfig(**{**copy.deepcopy(GENERATION_PRESETS[name]), **overrides})


def save_generation_presets(directory: str | os.PathLike, names: Iterable[str] | None = None) -> list[str]:
    """Writes ``<directory>/<name>.json`` for each preset. Each file is readable with
    ``GenerationConfig.from_pretrained(directory, config_file_name="<name>.json")``."""
    os.makedirs(directory, exist_ok=True)
    written = []
    for name in names if names is not None else list_generation_presets():
        load_generation_preset(name).validate()  # fail early on a preset transformers rejects
        path = os.path.join(directory, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(GENERATION_PRESETS[name], indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":  # python rwkv_hf/logits_process_rwkv_hf.py configs/generation
    import sys

    for written_path in save_generation_presets(sys.argv[1] if len(sys.argv) > 1 else "configs/generation"):
        print(written_path)
