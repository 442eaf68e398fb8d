"""The shipped demo model (demo/rwkv7-demo.pth): it is small, in the official layout, converts, and answers its
synthetic tasks correctly on prompts it was not trained on. Plus a smoke test of the training script."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_hf import demo

ROOT = Path(__file__).resolve().parent.parent
LOG = ROOT / "demo" / "train_log.json"
MAX_BYTES = 25 * 1000 * 1000


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo.demo_model_dir(tmp_path_factory.mktemp("demo_cache"))


@pytest.fixture(scope="module")
def demo_model(demo_dir):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return demo.load_demo(model_dir=demo_dir)


def test_shipped_checkpoint_is_small_and_in_the_official_layout():
    path = demo.demo_checkpoint_path()
    assert path.stat().st_size <= MAX_BYTES
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["emb.weight"].shape == (65536, state["emb.weight"].shape[1])
    assert state["head.weight"].shape == state["emb.weight"].shape
    assert "blocks.0.att.r_k" in state and "blocks.0.att.v0" in state  # RWKV-7, with layer 0's unused v LoRA
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_conversion_is_cached(tmp_path):
    first = demo.demo_model_dir(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert demo.demo_model_dir(tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not converted twice
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left behind
    config = json.loads((first / "config.json").read_text())
    assert config["rwkv_version"] == "7" and config["vocab_size"] == 65536


def test_held_out_prompts_never_occur_in_the_training_data():
    split = demo.make_split()
    held_fact = {(qa.key, qa.template) for task in demo.FACT_TASKS for qa in split.held_out[task]}
    held_instances = {qa.key for task in demo.INSTANCE_TASKS for qa in split.held_out[task]}
    held_followups = {(a.key, b.key) for a, b in split.held_out_followups}
    assert len(held_fact) == sum(len(split.held_out[t]) for t in demo.FACT_TASKS)
    rng = random.Random(0)
    seen_templates = 0
    for _ in range(3000):
        turns = demo.sample_conversation(rng, split)
        for k, qa in enumerate(turns):
            assert (qa.key, qa.template) not in held_fact, qa
            assert qa.key not in held_instances, qa
            if k and qa.task == "followup":
                assert (turns[k - 1].key, qa.key) not in held_followups, turns
            seen_templates += qa.template >= 0
    assert seen_templates > 3000
    # Every held-out fact is still taught, with other templates.
    for task in demo.FACT_TASKS:
        trained_keys = {qs[0].key for qs in split.train_facts[task] if qs}
        assert {qa.key for qa in split.held_out[task]} <= trained_keys


def test_held_out_accuracy(demo_model):
    model, tokenizer = demo_model
    conversations = demo.make_split().held_out_flat(per_task=6)  # 6 prompts of each of the 9 kinds: 54 prompts
    result = demo.evaluate(model, tokenizer, conversations)
    wrong = [(s["prompt"], s["expected"], s["got"]) for s in result["samples"] if not s["ok"]]
    print(json.dumps(result["per_task"], indent=1), *wrong, sep="\n")
    assert result["n"] == 54
    assert result["accuracy"] >= 0.8, (result["per_task"], wrong)


def test_recorded_training_log_matches_the_shipped_model():
    log = json.loads(LOG.read_text())
    assert log["checkpoint"]["bytes"] == demo.demo_checkpoint_path().stat().st_size
    assert log["held_out_accuracy"] >= 0.8
    assert log["held_out_loss_shipped_bf16"] < 0.5
    assert abs(log["loss_check"]["labels_loss"] - log["loss_check"]["loop_loss"]) < 1e-3
    assert log["curve"][-1]["loss"] < log["curve"][0]["loss"] / 10


def test_first_token_logits_use_the_full_vocabulary(demo_model):
    """The answer to a capital question starts with " The"; the model is sure of it over all 65536 tokens."""
    model, tokenizer = demo_model
    ids = tokenizer("User: What is the capital of Peru?\n\nAssistant:", return_tensors="pt").input_ids
    with torch.no_grad():
        probs = model(ids).logits[0, -1].float().softmax(-1)
    assert probs.shape == (65536,)
    assert int(probs.argmax()) == tokenizer.encode(" The", add_special_tokens=False)[0]
    assert float(probs.max()) > 0.9


def test_demo_command_streams_a_multi_turn_chat(demo_dir, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    demo.add_demo_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--model-dir", str(demo_dir), "--prompt", "What is the capital of Japan?",
                              "--prompt", "And Kenya?"])
    assert demo.main_demo(args) == 0
    out = capsys.readouterr().out
    assert "User: What is the capital of Japan?\nAssistant: The capital of Japan is Tokyo.\n" in out
    assert "User: And Kenya?\nAssistant: The capital of Kenya is Nairobi.\n" in out


def test_stream_reply_continues_from_the_state(demo_model):
    """Turn 2 with the state of turn 1 gives the same reply as turn 2 with the whole conversation re-read."""
    model, tokenizer = demo_model
    first = tokenizer("User: Spell the word horse.\n\nAssistant:", return_tensors="pt").input_ids
    reply, sequences, state = demo.stream_reply(model, tokenizer, first, out=None)
    assert reply == "h-o-r-s-e."
    follow = tokenizer("User: What about lamp?\n\nAssistant:", return_tensors="pt").input_ids
    whole = torch.cat([sequences, follow], dim=1)
    buffer = io.StringIO()
    with_state, _, _ = demo.stream_reply(model, tokenizer, whole, state, out=buffer)
    fresh, _, _ = demo.stream_reply(model, tokenizer, whole, None, out=None)
    assert with_state == fresh == "l-a-m-p." == buffer.getvalue().strip()


@pytest.mark.slow
def test_quick_training_run(tmp_path):
    """`scripts/train_demo.py --quick` trains, exports an official .pth that converts, and writes its log."""
    out = tmp_path / "quick"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--quick", "--out", str(out), "--steps", "60",
           "--eval-per-task", "1", "--threads", "1", "--log-every", "20"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["args"]["steps"] == 60 and log["model"]["hidden_size"] == 32
    assert abs(log["loss_check"]["labels_loss"] - log["loss_check"]["loop_loss"]) < 1e-3
    assert log["curve"][-1]["loss"] < log["curve"][0]["loss"] - 2
    assert abs(log["held_out_loss_shipped_bf16"] - log["held_out_loss"]) < 0.05  # tied head == full head (bf16)
    assert log["held_out_prompts"] == 9
    from rwkv_hf import convert_rwkv_checkpoint

    model = convert_rwkv_checkpoint(out / demo.DEMO_CHECKPOINT_NAME, tmp_path / "hf", progress=False)
    assert model.config.num_hidden_layers == 2


def test_quick_refuses_to_overwrite_the_shipped_model():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--quick", "--out", str(ROOT / "demo")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "must not" in result.stderr


def test_the_demo_command_asks_held_out_questions():
    split = demo.make_split()
    held = {qa.question for task in demo.FACT_TASKS + demo.INSTANCE_TASKS for qa in split.held_out[task]}
    pairs = {(a.question, b.question) for a, b in split.held_out_followups}
    for turns in demo.DEMO_PROMPTS[1:]:
        assert turns[0] in held, turns
        if len(turns) == 2:
            assert tuple(turns) in pairs, turns
