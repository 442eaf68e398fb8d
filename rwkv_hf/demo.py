"""The demo model: a tiny RWKV-7 trained by ``scripts/train_demo.py`` on synthetic chat data, shipped in the
official ``.pth`` layout, converted on first use, and the ``rwkv-hf demo`` command.

Everything the demo needs lives here so that the training script, the tests, the notebooks and the command line
agree on one definition of the tasks:

* the synthetic tasks (capitals, addition, unit conversion, spelling, next/previous day and month, number
  comparison, repeating and reversing word lists, greetings) and their question templates;
* the split into training data and **held-out** prompts. For the fact tasks (capitals, sums, conversions,
  spellings, days/months) every fact is seen in training, but each fact has one question template that is never
  shown with it: the held-out prompt asks a known fact in a phrasing the model has seen only with *other* facts.
  For comparison, repeat and reverse the held-out prompts are new instances (number pairs, word lists) that do not
  occur in the training data at all. Follow-up turns ("And Spain?") are held out by their (first, second) pair;
* ``demo_checkpoint_path()`` (the shipped ``.pth``) and ``demo_model_dir()`` (converts it once into a cached
  transformers folder and returns the folder);
* ``evaluate()``: greedy accuracy on prompts, the measure the tests and the training log report.

The chat format is RWKV's: ``User: {question}\\n\\nAssistant: {answer}\\n\\n``; the model ends its reply with the
blank line (token 261) and, at the end of a conversation, ``<|endoftext|>`` (token 0).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .compat_rwkv_hf import cache_kwargs, model_output_cache

DEMO_CHECKPOINT_NAME = "rwkv7-demo.pth"
DEMO_SEED = 20241210  # the data seed of the shipped model (the split below depends on it)
TURN_END = "\n\n"

# ---------------------------------------------------------------------------------------------------------
# Where the shipped checkpoint is, and its converted folder
# ---------------------------------------------------------------------------------------------------------

_HERE = Path(__file__).resolve().parent


def _candidate_checkpoints() -> List[Path]:
    env = os.environ.get("RWKV_HF_DEMO_CHECKPOINT")
    candidates = [Path(env)] if env else []
    candidates += [
        _HERE / "demo_data" / DEMO_CHECKPOINT_NAME,  # package data (a non-editable install)
        _HERE.parent / "demo" / DEMO_CHECKPOINT_NAME,  # the repository's demo/ folder (editable install, checkout)
    ]
    return candidates


def demo_checkpoint_path() -> Path:
    """The shipped demo checkpoint (official RWKV-LM ``.pth`` layout, bf16).

    Looked up in ``$RWKV_HF_DEMO_CHECKPOINT``, then ``rwkv_hf/demo_data/`` (package data), then the repository's
    ``demo/`` folder.
    """
    candidates = _candidate_checkpoints()
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The demo checkpoint {DEMO_CHECKPOINT_NAME} was not found (looked in: {', '.join(map(str, candidates))}). "
        "It ships in the repository's demo/ folder; install from a checkout (pip install -e .), or rebuild it with "
        "`python scripts/train_demo.py`."
    )


def default_cache_dir() -> Path:
    """``$RWKV_HF_CACHE`` or ``$XDG_CACHE_HOME/rwkv_hf`` (default ``~/.cache/rwkv_hf``)."""
    if os.environ.get("RWKV_HF_CACHE"):
        return Path(os.environ["RWKV_HF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rwkv_hf"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_CONVERT_LOCK = threading.Lock()


def demo_model_dir(
    cache_dir: Optional[os.PathLike] = None,
    *,
    checkpoint: Optional[os.PathLike] = None,
    dtype: str = "float32",
    verbose: bool = False,
) -> Path:
    """Convert the demo checkpoint into a transformers folder once and return the folder.

    The folder is ``{cache_dir}/rwkv7-demo-{sha256[:12]}-{dtype}-v{rwkv_hf version}`` (``cache_dir`` defaults to
    ``default_cache_dir()``), named after the checkpoint's digest so that a retrained checkpoint gets a fresh
    folder. The conversion is ``convert_rwkv_checkpoint`` (what ``rwkv-hf convert`` runs) into a temporary folder
    that is renamed when complete, so an interrupted first run never leaves a half-written model behind.
    ``dtype`` defaults to float32 (fast on CPU; the checkpoint is stored in bf16).
    """
    checkpoint = Path(checkpoint) if checkpoint is not None else demo_checkpoint_path()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    from . import __version__

    # the package version is part of the name: a folder converted by an older rwkv_hf carries its code and
    # generation config
    target = cache_dir / f"rwkv7-demo-{_file_digest(checkpoint)[:12]}-{dtype}-v{__version__}"
    if (target / "config.json").is_file():
        return target
    with _CONVERT_LOCK:
        if (target / "config.json").is_file():
            return target
        cache_dir.mkdir(parents=True, exist_ok=True)
        from .convert_rwkv_hf import convert_rwkv_checkpoint

        if verbose:
            print(f"Converting {checkpoint} -> {target} (once)", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=".rwkv7-demo-", dir=cache_dir))
        try:
            convert_rwkv_checkpoint(checkpoint, tmp, dtype=dtype, tokenizer="world", overwrite=True, progress=False)
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished first
                if not (target / "config.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_demo(cache_dir: Optional[os.PathLike] = None, *, model_dir: Optional[os.PathLike] = None, **kwargs):
    """``(model, tokenizer)`` of the demo (converted on first use), model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import RwkvConfig  # noqa: F401 - registers the Auto classes

    folder = Path(model_dir) if model_dir is not None else demo_model_dir(cache_dir, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------
# The synthetic tasks
# ---------------------------------------------------------------------------------------------------------

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Russia", "Moscow"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Australia", "Canberra"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"),
    ("Indonesia", "Jakarta"), ("Iran", "Tehran"), ("Cuba", "Havana"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"),
    ("Iceland", "Reykjavik"), ("Belgium", "Brussels"), ("Switzerland", "Bern"), ("Ukraine", "Kyiv"),
]
CAPITAL_TEMPLATES = [
    "What is the capital of {0}?",
    "Which city is the capital of {0}?",
    "Name the capital of {0}.",
    "Tell me the capital city of {0}.",
    "What city is the capital of {0}?",
]
ADD_TEMPLATES = ["What is {0} + {1}?", "What is {0} plus {1}?", "Add {0} and {1}.", "How much is {0} plus {1}?"]
UNITS = [  # (from, from singular, to, factor)
    ("hours", "hour", "minutes", 60), ("minutes", "minute", "seconds", 60), ("days", "day", "hours", 24),
    ("weeks", "week", "days", 7), ("meters", "meter", "centimeters", 100), ("kilometers", "kilometer", "meters", 1000),
    ("feet", "foot", "inches", 12), ("kilograms", "kilogram", "grams", 1000),
]
UNIT_TEMPLATES = [
    "How many {2} are in {0} {1}?",
    "Convert {0} {1} to {2}.",
    "What is {0} {1} in {2}?",
    "How many {2} is {0} {1}?",
]
WORDS = [
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "book", "milk", "rain", "star", "door", "frog", "lamp",
    "ship", "bear", "cake", "king", "gold", "rose", "wolf", "duck", "lion", "apple", "water", "green", "house",
    "horse", "river", "mouse", "table", "chair", "bread", "plant", "snake", "tiger", "cloud", "light", "stone",
    "music",
]
SPELL_TEMPLATES = ["How do you spell {0}?", "Spell the word {0}.", "Spell {0}, please."]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
]
NEXT_TEMPLATES = {
    "after": ["What {0} comes after {1}?", "Which {0} follows {1}?", "What is the {0} after {1}?"],
    "before": ["What {0} comes before {1}?", "Which {0} precedes {1}?", "What is the {0} before {1}?"],
}
COMPARE_TEMPLATES = ["Which is larger, {0} or {1}?", "Which number is bigger: {0} or {1}?", "Is {0} or {1} greater?"]
LIST_WORDS = [
    "red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "book", "milk", "rain", "star",
    "door", "frog", "lamp", "ship", "bear", "cake", "king", "gold", "rose", "wolf", "duck", "lion", "apple", "water",
    "house", "horse", "river", "mouse", "table", "chair", "bread", "snow", "cloud", "light", "stone", "music",
]
REPEAT_TEMPLATES = ["Repeat after me: {0}", "Say this back: {0}", "Echo: {0}"]
REVERSE_TEMPLATES = ["Reverse the words: {0}", "Say these words backwards: {0}", "Reverse this list: {0}"]
FOLLOWUP_TEMPLATES = ["And {0}?", "What about {0}?"]
GREETINGS = ["Hi", "Hello", "Hi there", "Hello!", "Hey", "Who are you?", "What can you do?", "What are you?"]
GREETING_ANSWER = (
    "Hello! I am a tiny RWKV-7 demo model. I can tell you capitals, add small numbers, convert units, spell words, "
    "name the next or previous day or month, compare numbers, and repeat or reverse a list of words."
)

FACT_TASKS = ("capital", "add", "convert", "spell", "next")
INSTANCE_TASKS = ("compare", "repeat", "reverse")
TASKS = FACT_TASKS + INSTANCE_TASKS + ("followup",)


@dataclass(frozen=True)
class QA:
    """One question and its exact expected answer. ``key`` identifies the fact (or instance) asked."""

    task: str
    question: str
    answer: str
    key: Tuple = ()
    template: int = 0


def _unit_count(n: int, plural: str, singular: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def fact_questions() -> Dict[str, List[List[QA]]]:
    """For each fact task, the facts, each as the list of its questions (one per template)."""
    out: Dict[str, List[List[QA]]] = {}
    out["capital"] = [
        [QA("capital", t.format(c), f"The capital of {c} is {cap}.", ("capital", c), i) for i, t in enumerate(CAPITAL_TEMPLATES)]
        for c, cap in CAPITALS
    ]
    out["add"] = [
        [QA("add", t.format(a, b), f"{a} + {b} = {a + b}.", ("add", a, b), i) for i, t in enumerate(ADD_TEMPLATES)]
        for a in range(10)
        for b in range(10)
    ]
    convert = []
    for plural, singular, to, factor in UNITS:
        for n in range(1, 13):
            amount = _unit_count(n, plural, singular)
            answer = f"{amount} is {n * factor} {to}."
            convert.append(
                [QA("convert", t.format(n, singular if n == 1 else plural, to), answer, ("convert", plural, n), i)
                 for i, t in enumerate(UNIT_TEMPLATES)]
            )
    out["convert"] = convert
    out["spell"] = [
        [QA("spell", t.format(w), f"{'-'.join(w)}.", ("spell", w), i) for i, t in enumerate(SPELL_TEMPLATES)]
        for w in WORDS
    ]
    nxt = []
    for kind, names in (("day", DAYS), ("month", MONTHS)):
        for direction, templates in NEXT_TEMPLATES.items():
            for j, name in enumerate(names):
                other = names[(j + (1 if direction == "after" else -1)) % len(names)]
                answer = f"The {kind} {direction} {name} is {other}."
                nxt.append(
                    [QA("next", t.format(kind, name), answer, ("next", kind, direction, name), i)
                     for i, t in enumerate(templates)]
                )
    out["next"] = nxt
    return out


def compare_qa(a: int, b: int, template: int) -> QA:
    return QA("compare", COMPARE_TEMPLATES[template].format(a, b), f"{max(a, b)} is larger.", ("compare", min(a, b), max(a, b)), template)


def repeat_qa(words: Sequence[str], template: int) -> QA:
    text = " ".join(words)
    return QA("repeat", REPEAT_TEMPLATES[template].format(text), text, ("repeat",) + tuple(words), template)


def reverse_qa(words: Sequence[str], template: int) -> QA:
    return QA(
        "reverse", REVERSE_TEMPLATES[template].format(" ".join(words)), " ".join(reversed(words)),
        ("reverse",) + tuple(words), template,
    )


def greeting_qa(i: int) -> QA:
    return QA("greeting", GREETINGS[i], GREETING_ANSWER, ("greeting",), i)


def _random_words(rng: random.Random, lo: int, hi: int) -> Tuple[str, ...]:
    return tuple(rng.sample(LIST_WORDS, rng.randint(lo, hi)))


REPEAT_LENGTHS = (2, 5)
REVERSE_LENGTHS = (2, 4)


@dataclass
class DemoSplit:
    """Training facts/templates and held-out prompts (see the module docstring)."""

    train_facts: Dict[str, List[List[QA]]]  # per task: per fact, the templates shown in training
    held_out: Dict[str, List[QA]]  # per task: held-out single-turn prompts
    held_out_followups: List[Tuple[QA, QA]]  # (first turn, follow-up) pairs never trained on
    excluded: set = field(default_factory=set)  # instance keys reserved for evaluation

    def held_out_flat(self, per_task: Optional[int] = None, tasks: Iterable[str] = TASKS) -> List[Tuple[str, List[QA]]]:
        """``[(task, turns)]``: each a conversation whose *last* answer is scored; ``per_task`` caps each task."""
        out = []
        for task in tasks:
            if task == "followup":
                items = [(task, [first, second]) for first, second in self.held_out_followups]
            else:
                items = [(task, [qa]) for qa in self.held_out.get(task, [])]
            out += items[:per_task] if per_task else items
        return out


def make_split(seed: int = DEMO_SEED, n_instance_eval: int = 60) -> DemoSplit:
    """The deterministic train / held-out split of the demo tasks."""
    rng = random.Random(seed)
    facts = fact_questions()
    train_facts: Dict[str, List[List[QA]]] = {}
    held_out: Dict[str, List[QA]] = {}
    for task, fact_list in facts.items():
        n_templates = len(fact_list[0])
        # Each fact hides one template; the hidden template cycles over facts (shuffled) so that every template
        # is still seen with most facts.
        order = list(range(len(fact_list)))
        rng.shuffle(order)
        hidden = {f: k % n_templates for k, f in enumerate(order)}
        train_facts[task] = [[qa for qa in qs if qa.template != hidden[f]] for f, qs in enumerate(fact_list)]
        held = [qs[hidden[f]] for f, qs in enumerate(fact_list)]
        rng.shuffle(held)
        held_out[task] = held

    excluded: set = set()
    compare_eval = []
    pairs = [(a, b) for a in range(1, 100) for b in range(a + 1, 100)]
    rng.shuffle(pairs)
    for a, b in pairs[:n_instance_eval]:
        if rng.random() < 0.5:
            a, b = b, a
        qa = compare_qa(a, b, rng.randrange(len(COMPARE_TEMPLATES)))
        compare_eval.append(qa)
        excluded.add(qa.key)
    held_out["compare"] = compare_eval
    for task, make, (lo, hi) in (("repeat", repeat_qa, REPEAT_LENGTHS), ("reverse", reverse_qa, REVERSE_LENGTHS)):
        items = []
        while len(items) < n_instance_eval:
            words = _random_words(rng, lo, hi)
            qa = make(words, rng.randrange(3))
            if qa.key in excluded:
                continue
            excluded.add(qa.key)
            excluded.add((("repeat" if task == "reverse" else "reverse"),) + words)  # nor the same list in the other task
            items.append(qa)
        held_out[task] = items

    followups = []
    seen_pairs = set()
    while len(followups) < n_instance_eval:
        first, second = _followup_pair(rng, facts)
        if (first.key, second.key) in seen_pairs:
            continue
        seen_pairs.add((first.key, second.key))
        excluded.add(("followup", first.key, second.key))
        followups.append((first, second))
    return DemoSplit(train_facts, held_out, followups, excluded)


def _followup_pair(rng: random.Random, facts) -> Tuple[QA, QA]:
    """A first question (capital, spelling or day/month) and a follow-up "And X?" of the same kind."""
    kind = rng.choice(("capital", "spell", "next"))
    first = rng.choice(rng.choice(facts[kind]))
    return first, _followup(rng, facts, first)


def _followup(rng: random.Random, facts, previous: QA) -> QA:
    """A follow-up ("And X?") to ``previous``: the same question about another entity. For days and months the
    kind (day/month) and the direction (after/before) carry over too."""
    kind = previous.key[0]
    same = [qs[0] for qs in facts[kind] if qs[0].key != previous.key and qs[0].key[1:-1] == previous.key[1:-1]]
    target = rng.choice(same)
    return QA("followup", rng.choice(FOLLOWUP_TEMPLATES).format(target.key[-1]), target.answer, target.key, -1)


# ---------------------------------------------------------------------------------------------------------
# Training conversations
# ---------------------------------------------------------------------------------------------------------

TASK_WEIGHTS = {  # sampling weights of a turn's task in the training data
    "capital": 2.0, "add": 2.0, "convert": 2.5, "spell": 1.5, "next": 1.5,
    "compare": 2.0, "repeat": 1.5, "reverse": 2.5, "greeting": 0.3,
}


def sample_turn(rng: random.Random, split: DemoSplit, task: Optional[str] = None) -> QA:
    """One training question (never a held-out prompt)."""
    if task is None:
        names = list(TASK_WEIGHTS)
        task = rng.choices(names, weights=[TASK_WEIGHTS[n] for n in names])[0]
    if task in split.train_facts:
        return rng.choice(rng.choice(split.train_facts[task]))
    if task == "greeting":
        return greeting_qa(rng.randrange(len(GREETINGS)))
    while True:
        if task == "compare":
            a, b = rng.sample(range(1, 100), 2)
            qa = compare_qa(a, b, rng.randrange(len(COMPARE_TEMPLATES)))
        elif task == "repeat":
            qa = repeat_qa(_random_words(rng, *REPEAT_LENGTHS), rng.randrange(len(REPEAT_TEMPLATES)))
        elif task == "reverse":
            qa = reverse_qa(_random_words(rng, *REVERSE_LENGTHS), rng.randrange(len(REVERSE_TEMPLATES)))
        else:
            raise ValueError(f"unknown task {task!r}")
        if qa.key not in split.excluded:
            return qa


_FACTS = None


def _all_facts():
    global _FACTS
    if _FACTS is None:
        _FACTS = fact_questions()
    return _FACTS


def sample_conversation(rng: random.Random, split: DemoSplit, max_turns: int = 3) -> List[QA]:
    """1 to ``max_turns`` turns; a turn after a capital / spelling / day-month question is often a follow-up."""
    n = min(rng.choice((1, 1, 2, 2, 3)), max_turns)
    turns: List[QA] = []
    while len(turns) < n:
        last = turns[-1] if turns else None
        if last is not None and last.key[0] in ("capital", "spell", "next") and rng.random() < 0.4:
            follow = _followup(rng, _all_facts(), last)
            if ("followup", last.key, follow.key) not in split.excluded:
                turns.append(follow)
            continue
        turns.append(sample_turn(rng, split))
    return turns


def conversation_text(turns: Sequence[QA], *, final_answer: bool = True) -> List[Tuple[str, bool]]:
    """The conversation as ``[(text, supervised)]`` pieces in RWKV's chat format.

    Questions and the role names are context (not supervised); each answer, from the space after ``Assistant:``
    through its closing blank line, is supervised. ``final_answer=False`` stops after the last ``Assistant:``.
    """
    pieces: List[Tuple[str, bool]] = []
    for k, qa in enumerate(turns):
        pieces.append((f"User: {qa.question}{TURN_END}Assistant:", False))
        if k < len(turns) - 1 or final_answer:
            pieces.append((f" {qa.answer}{TURN_END}", True))
    return pieces


def encode_conversation(tokenizer, turns: Sequence[QA], *, end_of_text: bool = True) -> Tuple[List[int], List[int]]:
    """``(input_ids, labels)``: labels are the ids on answers (and the final ``<|endoftext|>``), -100 elsewhere.

    Each piece is encoded on its own; RWKV World tokenization is greedy longest-match and every piece boundary
    here is one the tokenizer also makes in the whole text ("\\n\\n" before "User"/"Assistant", ":" before " "), so
    the ids equal those of the whole text.
    """
    ids: List[int] = []
    labels: List[int] = []
    for text, supervised in conversation_text(turns):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if supervised else [-100] * len(piece)
    if end_of_text:
        ids.append(0)
        labels.append(0)
    return ids, labels


def prompt_text(turns: Sequence[QA]) -> str:
    """The prompt that asks the last question of ``turns`` (earlier turns answered), ending in ``Assistant:``."""
    return "".join(text for text, _ in conversation_text(turns, final_answer=False))


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


# transformers' own defaults: with them set, greedy decoding draws no "flags are not valid" warning about the
# sampling values of the model's generation_config.json (top_p=0.3)
GREEDY = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}


def greedy_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 40, batch_size: int = 32) -> List[str]:
    """Greedy replies to chat prompts (left-padded batches, which are exact for RWKV), cut at the blank line."""
    import torch
    from transformers import GenerationConfig

    stop = [tokenizer.encode(TURN_END, add_special_tokens=False)[0], 0]
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=0, **GREEDY)
    answers: List[str] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**batch, generation_config=config)
            for row in out[:, batch["input_ids"].shape[1] :]:
                text = tokenizer.decode([int(t) for t in row if int(t) != 0])
                answers.append(text.split(TURN_END)[0].strip())
    finally:
        tokenizer.padding_side = old_side
    return answers


def evaluate(model, tokenizer, conversations: Sequence[Tuple[str, List[QA]]], **kwargs) -> Dict[str, object]:
    """Greedy exact-match accuracy of the last answer of each conversation, overall and per task.

    Returns ``{"accuracy": float, "per_task": {task: float}, "n": int, "samples": [...]}``.
    """
    prompts = [prompt_text(turns) for _, turns in conversations]
    answers = greedy_answers(model, tokenizer, prompts, **kwargs)
    per_task: Dict[str, List[bool]] = {}
    samples = []
    for (task, turns), got in zip(conversations, answers):
        ok = got == turns[-1].answer
        per_task.setdefault(task, []).append(ok)
        samples.append({"task": task, "prompt": [t.question for t in turns], "expected": turns[-1].answer, "got": got, "ok": ok})
    total = sum(sum(v) for v in per_task.values())
    n = sum(len(v) for v in per_task.values())
    return {
        "accuracy": total / max(n, 1),
        "per_task": {k: sum(v) / len(v) for k, v in per_task.items()},
        "n": n,
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------------------
# `rwkv-hf demo`
# ---------------------------------------------------------------------------------------------------------

# What `rwkv-hf demo` asks. Apart from the greeting, every question is a held-out prompt of ``make_split()`` (never
# in the training data), and so is each follow-up pair (tests/test_demo.py checks this).
DEMO_PROMPTS = [
    ["Hi"],
    ["What is the capital of Cuba?", "What about Finland?"],
    ["What is 4 hours in minutes?"],
    ["How much is 7 plus 4?"],
    ["Spell the word house.", "What about horse?"],
    ["What month comes after July?"],
    ["Which is larger, 72 or 97?"],
    ["Say this back: cat water apple light rain"],
    ["Reverse the words: light chair milk bear"],
]


def add_demo_parser(sub):
    demo = sub.add_parser(
        "demo",
        help="convert the shipped tiny RWKV-7 demo model (once, cached) and stream its answers, offline",
        description="Converts demo/rwkv7-demo.pth with the same code as `rwkv-hf convert` into a cached folder "
        "(first run only), then streams the model's replies to a few chat prompts, or to --prompt.",
    )
    demo.add_argument("--prompt", action="append", help="a user message (repeat for a multi-turn chat)")
    demo.add_argument("--model-dir", default=None, help="an already converted folder (default: the cached demo)")
    demo.add_argument("--cache-dir", default=None, help=f"where to keep the converted model (default: {default_cache_dir()})")
    demo.add_argument("--max-new-tokens", type=int, default=60)
    demo.add_argument("--sample", action="store_true", help="sample (top_p 0.3) instead of greedy decoding")
    demo.add_argument("--path-only", action="store_true", help="convert if needed, print the folder and exit")
    return demo


_STDOUT = object()


def stream_reply(model, tokenizer, input_ids, past_key_values=None, *, max_new_tokens=60, do_sample=False, out=_STDOUT):
    """Stream one reply to ``out`` with ``TextIteratorStreamer`` while ``generate`` runs in a thread.

    ``input_ids`` is the whole conversation so far ([1, T]); with ``past_key_values`` (the state returned by the
    previous call) only the tokens the state has not seen are run. Returns ``(reply, sequences, state)``:
    ``sequences`` is the conversation including the reply (and the blank line that ended it), ready to be
    extended with the next turn. ``out``: where to print the reply as it grows (default ``sys.stdout``; None:
    nowhere).
    """
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = [tokenizer.encode(TURN_END, add_special_tokens=False)[0], 0]
    sampling = dict(do_sample=True, top_p=0.3, temperature=1.0, top_k=0) if do_sample else dict(do_sample=False, **GREEDY)
    result = {}

    def run():
        try:
            result["out"] = model.generate(
                input_ids=input_ids, attention_mask=input_ids.new_ones(input_ids.shape), **cache_kwargs(past_key_values),
                max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=0, streamer=streamer,
                return_dict_in_generate=True, **sampling,
            )
        except BaseException as err:  # surface errors of the generation thread in the caller
            result["error"] = err
            streamer.end()

    out = sys.stdout if out is _STDOUT else out
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    pieces = []
    for text in streamer:
        pieces.append(text)
        if out is not None:
            out.write(text.rstrip("\n") if TURN_END in text else text)
            out.flush()
    thread.join()
    if "error" in result:
        raise result["error"]
    generated = result["out"]
    return "".join(pieces).split(TURN_END)[0].strip(), generated.sequences, model_output_cache(generated)


def main_demo(args) -> int:
    import torch

    folder = Path(args.model_dir) if args.model_dir else demo_model_dir(args.cache_dir, verbose=True)
    if args.path_only:
        print(folder)
        return 0
    model, tokenizer = load_demo(model_dir=folder)
    conversations = [args.prompt] if args.prompt else DEMO_PROMPTS
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"RWKV-7 demo model ({n_params:.1f}M parameters), converted folder: {folder}")
    if not args.prompt:
        print("Apart from the greeting, these questions were never in its training data. Ask your own with --prompt;")
        print("it only knows its nine kinds of question (see demo/train_log.json).")
    print()
    for turns in conversations:
        sequences, state = None, None
        for question in turns:
            new = tokenizer(f"User: {question}{TURN_END}Assistant:", return_tensors="pt", add_special_tokens=False).input_ids
            ids = new if sequences is None else torch.cat([sequences, new], dim=1)
            print(f"User: {question}\nAssistant:", end="", flush=True)
            _, sequences, state = stream_reply(
                model, tokenizer, ids, state, max_new_tokens=args.max_new_tokens, do_sample=args.sample
            )
            print()
        print()
    return 0


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rwkv_hf.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    return main_demo(parser.parse_args(["demo"] + list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
