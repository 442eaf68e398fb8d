"""Encoding speed of RwkvWorldTokenizer (slow) and RwkvWorldTokenizerFast against the official TRIE_TOKENIZER.

    python benchmarks/bench_tokenizer.py [--chars 1500000] [--repeat 2]

Offline and under a minute on 2 CPU cores. The corpus is built here, deterministically:

* code + English: the Python standard library's own sources (comments, docstrings, code, indentation);
* CJK / Cyrillic / Arabic / Devanagari / Greek / Thai "prose": words drawn (seeded) from the World vocabulary's
  tokens of each script, with the script's punctuation and spaces;
* a mix of everything plus emoji (with ZWJ sequences and skin tones), numbers, and runs of spaces, tabs and
  newlines.

Printed for each part and for the whole corpus: chars/s of the official ``TRIE_TOKENIZER.encode``, of
``RwkvWorldTokenizer.encode_ordinary`` (the same ids) and of ``tokenizer(text)["input_ids"]`` (the transformers
path: added-token splitting, token strings, ids), and the ratios to the official speed. Ids are checked equal.
Also: decode speed, a corpus of documents joined by ``<|endoftext|>``, and a batch of short texts.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import sysconfig
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from rwkv_hf.tokenization_rwkv_hf import RwkvWorldTokenizer, RwkvWorldTokenizerFast  # noqa: E402

SCRIPTS = {  # (first, last) code points of the script's letters, and its punctuation
    "cjk": ((0x4E00, 0x9FFF), "，。、？！：；"),
    "cyrillic": ((0x0400, 0x04FF), ",.?!:;"),
    "arabic": ((0x0600, 0x06FF), "،.؟!:"),
    "devanagari": ((0x0900, 0x097F), "।,?"),
    "greek": ((0x0370, 0x03FF), ",.;"),
    "thai": ((0x0E00, 0x0E7F), " "),
    "hangul": ((0xAC00, 0xD7AF), ",.?"),
}
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🧑🏿‍💻", "🇯🇵", "✨", "🤖", "👩‍❤️‍💋‍👨"]
SPACES = [" ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", "\n    ", "\t\t", " \n"]


def stdlib_text(n_chars: int) -> str:
    """English + code: the standard library's .py files, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib", "site-packages"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
            total += len(parts[-1])
            if total >= n_chars:
                return "".join(parts)[:n_chars]
    return "".join(parts)[:n_chars]


def script_words(tokenizer: RwkvWorldTokenizer) -> dict[str, list[str]]:
    """Each script's vocabulary tokens that are whole words of that script (natural-looking pieces of text)."""
    words: dict[str, list[str]] = {name: [] for name in SCRIPTS}
    for token in tokenizer._vocab.id_to_bytes[1:]:
        try:
            text = token.decode("utf-8").strip()
        except UnicodeDecodeError:
            continue
        if not text:
            continue
        for name, ((lo, hi), _) in SCRIPTS.items():
            if all(lo <= ord(c) <= hi for c in text):
                words[name].append(text)
    return words


def prose(rng: random.Random, words: list[str], punct: str, n_chars: int, spaced: bool) -> str:
    out, total = [], 0
    while total < n_chars:
        sentence = (" " if spaced else "").join(rng.choice(words) for _ in range(rng.randint(3, 15)))
        piece = sentence + rng.choice(punct) + rng.choice([" ", " ", "\n", ""])
        out.append(piece)
        total += len(piece)
    return "".join(out)[:n_chars]


def mixed(rng: random.Random, pools: list[str], n_chars: int) -> str:
    out, total = [], 0
    while total < n_chars:
        kind = rng.random()
        if kind < 0.1:
            piece = rng.choice(EMOJI)
        elif kind < 0.2:
            piece = rng.choice(SPACES)
        elif kind < 0.3:
            piece = str(rng.randint(0, 10**rng.randint(1, 9)))
        else:
            pool = rng.choice(pools)
            start = rng.randrange(max(1, len(pool) - 80))
            piece = pool[start : start + rng.randint(5, 80)]
        out.append(piece)
        total += len(piece)
    return "".join(out)[:n_chars]


def build_corpus(tokenizer: RwkvWorldTokenizer, n_chars: int, seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    words = script_words(tokenizer)
    n_code = n_chars * 2 // 5
    n_script = n_chars * 2 // (5 * len(SCRIPTS))
    parts = {"code+english": stdlib_text(n_code)}
    for name, (_, punct) in SCRIPTS.items():
        parts[name] = prose(rng, words[name], punct, n_script, spaced=name not in ("cjk", "thai"))
    parts["mixed+emoji+whitespace"] = mixed(rng, list(parts.values()), n_chars - sum(map(len, parts.values())))
    return parts


def best_times(fns: dict, arg, repeat: int) -> tuple[dict, dict]:
    """Best wall time of each function over ``repeat`` rounds, the functions taking turns within a round, so that a
    busy machine slows them alike; and each function's result."""
    best = {name: float("inf") for name in fns}
    results = {}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn(arg)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=1_500_000, help="corpus size in characters")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per measurement (the best is kept)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    tokenizer = RwkvWorldTokenizer()
    tokenizer.encode_ordinary("warm up")  # compiles the matcher
    print(f"RwkvWorldTokenizer: load + matcher compile {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    fast = RwkvWorldTokenizerFast()
    print(f"RwkvWorldTokenizerFast (tokenizers backend, what AutoTokenizer returns): load {time.perf_counter() - t0:.2f} s")
    try:
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    except ImportError:
        official = None
        print("official rwkv package not installed: printing rwkv_hf speeds only")
    else:
        t0 = time.perf_counter()
        official = TRIE_TOKENIZER(tokenizer.vocab_file)
        print(f"official TRIE_TOKENIZER: load {time.perf_counter() - t0:.2f} s")

    parts = build_corpus(tokenizer, args.chars)
    parts["ALL"] = "".join(parts.values())
    hf_call = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    fast_call = lambda text: fast(text)["input_ids"]  # noqa: E731

    print(f"{'part':24s} {'chars':>9s} {'tokens':>8s} {'official c/s':>13s} {'encode_ordinary':>16s} {'ratio':>6s}", end="")
    print(f" {'tokenizer()':>12s} {'ratio':>6s} {'fast()':>12s} {'ratio':>6s}")
    for name, text in parts.items():
        fns = {"ours": tokenizer.encode_ordinary, "call": hf_call, "fast": fast_call}
        if official is not None:
            fns["official"] = official.encode
        t, ids = best_times(fns, text, args.repeat)
        assert ids["call"] == ids["ours"], f"{name}: tokenizer() and encode_ordinary differ"
        assert ids["fast"] == ids["ours"], f"{name}: the fast tokenizer differs"
        row = f"{name:24s} {len(text):9d} {len(ids['ours']):8d} "
        if official is not None:
            assert ids["official"] == ids["ours"], f"{name}: ids differ from the official tokenizer"
            row += f"{len(text) / t['official']:13,.0f} {len(text) / t['ours']:16,.0f} {t['official'] / t['ours']:5.1f}x "
            row += f"{len(text) / t['call']:12,.0f} {t['official'] / t['call']:5.1f}x"
            row += f" {len(text) / t['fast']:12,.0f} {t['official'] / t['fast']:5.1f}x"
        else:
            row += f"{'-':>13s} {len(text) / t['ours']:16,.0f} {'-':>6s} {len(text) / t['call']:12,.0f} {'-':>6s}"
            row += f" {len(text) / t['fast']:12,.0f} {'-':>6s}"
        print(row)

    text = parts["ALL"]
    ids = tokenizer.encode_ordinary(text)
    fns = {"ours": tokenizer.decode, "fast": fast.decode}
    if official is not None:
        fns["official"] = official.decode
    t, decoded = best_times(fns, ids, args.repeat)
    assert decoded["ours"] == text == decoded["fast"]
    line = f"decode ALL: {len(ids) / t['ours']:,.0f} tokens/s (fast {len(ids) / t['fast']:,.0f})"
    if official is not None:
        line += f" (official {len(ids) / t['official']:,.0f} tokens/s, {t['official'] / t['ours']:.1f}x)"
    print(line)

    docs = tokenizer.eos_token.join(text[i : i + 2000] for i in range(0, len(text), 2000))
    t, _ = best_times({"call": hf_call}, docs, args.repeat)
    print(f"tokenizer() on 2000-char documents joined by <|endoftext|>: {len(docs) / t['call']:,.0f} chars/s")

    lines = [line for line in parts["code+english"].splitlines() if line.strip()][:20000]
    fns = {
        "call": lambda batch: tokenizer(batch)["input_ids"],
        "fast": lambda batch: fast(batch)["input_ids"],
        "ours": lambda batch: [tokenizer.encode_ordinary(line) for line in batch],
    }
    if official is not None:
        fns["official"] = lambda batch: [official.encode(line) for line in batch]
    t, _ = best_times(fns, lines, args.repeat)
    line = f"batch of {len(lines)} short lines: tokenizer(list) {len(lines) / t['call']:,.0f} texts/s, "
    line += f"fast(list) {len(lines) / t['fast']:,.0f} texts/s, "
    line += f"encode_ordinary loop {len(lines) / t['ours']:,.0f} texts/s"
    if official is not None:
        line += f", official loop {len(lines) / t['official']:,.0f} texts/s"
    print(line)


if __name__ == "__main__":
    main()
