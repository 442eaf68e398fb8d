"""State tuning: the PEFT method, the plain-PyTorch path, LoRA + state, Trainer, checkpointing, the CUDA path.

The notebook (notebooks/state_tuning.ipynb) is executed by test_notebooks.py with the other notebooks.

Equalities: a save/load round trip must reproduce the adapter tensors and the logits exactly; two ways of
computing the same gradient agree within 1e-6 (fp32, different op order under checkpointing); an exported
bf16/fp16 file reproduces the logits within 5e-2 (bf16 keeps 8 bits of a state trained up to |s| ~ 10).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from model_factory import random_ids, tiny_model  # noqa: E402
from rwkv_hf.peft_rwkv_hf import StateTuningConfig, register_state_tuning  # noqa: E402
from rwkv_hf.state_rwkv_hf import (  # noqa: E402
    STATE_TUNING_DEFAULTS,
    create_state_optimizer,
    get_init_state,
    list_init_states,
    load_init_state,
    make_init_state_trainable,
    merge_trainable_init_state,
    save_init_state,
    state_tuning_training_arguments,
)

register_state_tuning()  # import rwkv_hf does this too; idempotent

REPO = Path(__file__).resolve().parents[1]
PATTERN = [7, 8, 9, 10, 11, 12]  # every sequence ends with these tokens: what the state has to learn


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def task_batch(batch=8, prompt_len=8, seed=0):
    """Random prompts followed by PATTERN; the loss only counts the pattern."""
    prompts = random_ids(batch, prompt_len, seed=seed, low=20)
    ids = torch.cat([prompts, torch.tensor(PATTERN).expand(batch, -1)], dim=1)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return ids, labels


def train(model, steps=25, lr=1.0, **optimizer_kwargs):
    """The community recipe (Adam, 1.0 -> 0.01) on the task; returns the losses."""
    optimizer, scheduler = create_state_optimizer(
        model, num_training_steps=steps, lr=lr, final_lr=lr / 100, **optimizer_kwargs
    )
    model.train()
    losses = []
    for step in range(steps):
        ids, labels = task_batch(seed=step)
        loss = model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def task_loss(model):
    ids, labels = task_batch(batch=16, seed=1000)  # prompts never seen in training
    return model(ids, labels=labels).loss.item()


def greedy(model, prompt, n=6, **kwargs):
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)
    return out[0, prompt.shape[1] :].tolist()


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One state-tuned PEFT model (v7), shared by the read-only tests below, and its saved adapter."""
    model = tiny_model("7")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    base_loss = task_loss(model)
    base_greedy = greedy(model, random_ids(1, 8, seed=2000, low=20))
    peft_model = get_peft_model(model, StateTuningConfig())
    losses = train(peft_model)
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    return dict(
        model=peft_model, weights=weights, base_loss=base_loss, base_greedy=base_greedy, losses=losses, folder=folder
    )


# ---------------------------------------------------------------------------------------------------------
# The PEFT method
# ---------------------------------------------------------------------------------------------------------


def test_only_the_initial_state_is_trainable(tuned):
    model = tuned["model"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.rwkv.init_state.state_tuning_wkv.default"
    ]
    base = model.get_base_model()
    for name, value in tuned["weights"].items():
        assert torch.equal(base.state_dict()[name], value), f"{name} changed during state tuning"


def test_a_tuned_state_lowers_the_task_loss_and_changes_generations(tuned):
    model = tuned["model"]
    after = task_loss(model)
    assert after < 0.5 * tuned["base_loss"], (tuned["base_loss"], after)
    ids, labels = task_batch(batch=16, seed=1001)
    predicted = logits(model, ids)[:, -len(PATTERN) : -1].argmax(-1)  # teacher-forced, held-out prompts
    accuracy = (predicted == labels[:, -len(PATTERN) + 1 :]).float().mean().item()
    assert accuracy > 0.8, accuracy  # the pattern is what the state learned
    prompt = random_ids(1, 8, seed=2000, low=20)
    assert greedy(model, prompt) != tuned["base_greedy"]
    with model.disable_adapter():
        assert greedy(model, prompt) == tuned["base_greedy"]


def test_save_pretrained_round_trip_is_exact(tuned):
    saved = json.loads((tuned["folder"] / "adapter_config.json").read_text())
    assert saved["peft_type"] == "STATE_TUNING"
    reloaded = PeftModel.from_pretrained(tiny_model("7"), tuned["folder"])
    original = tuned["model"].get_base_model().rwkv.init_state.state_tuning_wkv["default"]
    assert torch.equal(reloaded.get_base_model().rwkv.init_state.state_tuning_wkv["default"], original)
    ids = random_ids(2, 12, seed=5)
    assert torch.equal(logits(reloaded, ids), logits(tuned["model"], ids))


def test_transformers_load_adapter(tuned):
    model = tiny_model("7")
    model.load_adapter(str(tuned["folder"]))
    ids = random_ids(1, 10, seed=6)
    assert torch.equal(logits(model, ids), logits(tuned["model"], ids))


def test_adapter_loads_in_a_fresh_process_after_import_rwkv_hf(tuned, tmp_path):
    """Registration happens at ``import rwkv_hf``: nothing else is needed before PeftModel.from_pretrained."""
    ids = random_ids(1, 10, seed=7)
    expected = logits(tuned["model"], ids)[0, -1].tolist()
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        sys.path.insert(0, {str(REPO / "tests")!r})
        import rwkv_hf
        from peft import PeftModel
        from model_factory import tiny_model
        model = PeftModel.from_pretrained(tiny_model("7"), {str(tuned["folder"])!r})
        with torch.no_grad():
            print(json.dumps(model(torch.tensor({ids.tolist()})).logits[0, -1].tolist()))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_export_to_pth_and_state_and_mount(tuned, tmp_path):
    model, ids = tuned["model"], random_ids(1, 12, seed=8)
    expected = logits(model, ids)
    save_init_state(model, tmp_path / "s.pth", dtype=torch.float32)  # fp32 .pth: exact
    save_init_state(model, tmp_path / "s.state")  # F16, as Ai00 wants it
    save_init_state(model, tmp_path / "s-bf16.pth")  # bf16, as RWKV-PEFT writes it
    fresh = tiny_model("7")
    load_init_state(fresh, tmp_path / "s.pth")
    assert torch.equal(logits(fresh, ids), expected)
    for name in ("s.state", "s-bf16.pth"):
        load_init_state(fresh, tmp_path / name, name=name)
        torch.testing.assert_close(logits(fresh, ids, init_state=name), expected, atol=5e-2, rtol=0)
    prompt = random_ids(1, 8, seed=2000, low=20)
    assert greedy(fresh, prompt, init_state="s.state") == greedy(model, prompt)


def test_several_adapters_switch_and_mix(tuned):
    model = PeftModel.from_pretrained(tiny_model("7"), tuned["folder"], adapter_name="meow")
    model.add_adapter("zero", StateTuningConfig(init="zeros"))
    ids = random_ids(1, 10, seed=9)
    tuned_logits = logits(model, ids)
    with model.disable_adapter():
        base_logits = logits(model, ids)
    model.set_adapter("zero")
    assert torch.equal(logits(model, ids), base_logits)  # a fresh zero adapter is the base model
    model.base_model.set_adapter(["meow", "zero"])  # both active: the mean of the two states
    half = get_init_state(model.get_base_model())
    torch.testing.assert_close(half.wkv, 0.5 * model.get_base_model().rwkv.init_state.state_tuning_wkv["meow"].detach())
    model.set_adapter("meow")
    assert torch.equal(logits(model, ids), tuned_logits)


def test_merge_and_unload_makes_the_state_the_default(tuned):
    model = PeftModel.from_pretrained(tiny_model("7"), tuned["folder"])
    ids = random_ids(1, 10, seed=10)
    expected = logits(model, ids)
    model.merge_adapter()  # the state becomes the base's default; the adapter is bypassed while merged
    assert torch.equal(logits(model, ids), expected)
    model.unmerge_adapter()
    assert list_init_states(model) == [] and torch.equal(logits(model, ids), expected)
    merged = model.merge_and_unload()
    assert type(merged.rwkv.init_state).__name__ == "RwkvInitState"
    assert torch.equal(logits(merged, ids), expected)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in tiny_model("7").parameters())


def test_mounted_named_states_still_work_under_peft(tuned, tmp_path):
    model = tuned["model"]
    other = tiny_model("7")
    load_init_state(other, {f"blocks.{i}.att.time_state": torch.randn(4, 16, 16) * 0.3 for i in range(2)}, name="x")
    save_init_state(other, tmp_path / "x.safetensors", name="x")
    load_init_state(model, tmp_path / "x.safetensors", name="x")
    try:
        ids = random_ids(2, 8, seed=11)
        rows = logits(model, ids, init_state=[None, "x"])  # row 0: the adapter's state, row 1: the mounted one
        torch.testing.assert_close(rows[0], logits(model, ids[:1])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(rows[1], logits(other, ids[1:], init_state="x")[0], atol=1e-5, rtol=0)
    finally:
        from rwkv_hf.state_rwkv_hf import unload_init_state

        unload_init_state(model, "x")


def test_rwkv4_is_refused():
    with pytest.raises(ValueError, match="RWKV-4 has no matrix-valued WKV state"):
        get_peft_model(tiny_model("4"), StateTuningConfig())


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_state_tuning_trains_v5_and_v6(version):
    model = get_peft_model(tiny_model(version), StateTuningConfig())
    before = task_loss(model)
    losses = train(model, steps=8)
    assert task_loss(model) < before and losses[-1] < losses[0]


def test_shift_states_can_be_tuned_too(tmp_path):
    model = get_peft_model(tiny_model("7"), StateTuningConfig(tune_shift_states=True))
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "base_model.model.rwkv.init_state.state_tuning_shift.default",
        "base_model.model.rwkv.init_state.state_tuning_wkv.default",
    ]
    train(model, steps=3)
    assert model.get_base_model().rwkv.init_state.state_tuning_shift["default"].abs().sum() > 0
    save_init_state(model, tmp_path / "s.safetensors")
    fresh = tiny_model("7")
    load_init_state(fresh, tmp_path / "s.safetensors")
    ids = random_ids(1, 9, seed=12)
    assert torch.equal(logits(fresh, ids), logits(model, ids))


# ---------------------------------------------------------------------------------------------------------
# Trainer, gradient checkpointing, plain PyTorch
# ---------------------------------------------------------------------------------------------------------


def test_trainer_with_labels_and_gradient_checkpointing(tmp_path):
    from transformers import Trainer

    model = get_peft_model(tiny_model("7"), StateTuningConfig())
    ids, labels = task_batch(batch=16, seed=3)
    data = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]
    args = state_tuning_training_arguments(
        tmp_path,
        per_device_train_batch_size=8,
        max_steps=6,
        gradient_checkpointing=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    before = task_loss(model)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert task_loss(model) < before
    assert args.learning_rate == 1.0 and args.lr_scheduler_kwargs == {"min_lr": 0.01}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_frozen_weights_gives_the_same_gradient(reentrant):
    """With every weight frozen, the init state is the only leaf needing a gradient: checkpointed blocks must
    still pass it on (RWKV-LM#246 is the failure mode with reentrant checkpointing and nothing else)."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("7")
        (state,) = make_init_state_trainable(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        ids, labels = task_batch(seed=4)
        model(ids, labels=labels).loss.backward()
        assert state.grad is not None and state.grad.abs().sum() > 0
        grads.append(state.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=0)


def test_plain_pytorch_loop_then_merge(tmp_path):
    model = tiny_model("6")
    plain_keys = set(model.state_dict())
    params = make_init_state_trainable(model)
    assert [p for p in model.parameters() if p.requires_grad] == params
    before = task_loss(model)
    train(model, steps=10)
    assert task_loss(model) < before
    ids = random_ids(1, 10, seed=13)
    expected = logits(model, ids)
    merge_trainable_init_state(model)
    assert set(model.state_dict()) == plain_keys  # the state is mounted data again, not a weight
    assert list_init_states(model) == ["default"]
    assert torch.equal(logits(model, ids), expected)


def test_save_pretrained_keeps_the_default_state(tmp_path):
    from rwkv_hf import RwkvForCausalLM

    model = tiny_model("7")
    make_init_state_trainable(model)
    train(model, steps=3)
    ids = random_ids(1, 10, seed=14)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "init_state.safetensors").is_file()
    reloaded = RwkvForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(logits(reloaded, ids), expected)


# ---------------------------------------------------------------------------------------------------------
# LoRA + state
# ---------------------------------------------------------------------------------------------------------


def test_lora_and_state_in_one_adapter(tmp_path):
    model = tiny_model("7")
    make_init_state_trainable(model)  # gives the slot a real parameter for modules_to_save
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["receptance", "key"], modules_to_save=["init_state"]))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert "base_model.model.rwkv.init_state.modules_to_save.default.wkv" in trainable
    assert any("lora_A" in n for n in trainable)
    optimizer, _ = create_state_optimizer(lora, num_training_steps=5, other_lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1e-3]  # states and LoRA at their own rates
    before = task_loss(lora)
    train(lora, steps=5, other_lr=1e-3)
    assert task_loss(lora) < before
    lora.save_pretrained(tmp_path / "lora")
    base = tiny_model("7")
    make_init_state_trainable(base)  # the slot must exist before loading, as for get_peft_model
    reloaded = PeftModel.from_pretrained(base, tmp_path / "lora")
    ids = random_ids(1, 10, seed=15)
    assert torch.equal(logits(reloaded, ids), logits(lora, ids))
    save_init_state(lora, tmp_path / "from-lora.state")  # the trained state exports like any other
    assert get_init_state(lora) is not None


def test_a_state_adapter_cannot_be_stacked_on_a_lora_adapter():
    lora = get_peft_model(tiny_model("7"), LoraConfig(r=4, target_modules=["key"]))
    with pytest.raises(ValueError, match="different peft types"):
        lora.add_adapter("other", StateTuningConfig())


# ---------------------------------------------------------------------------------------------------------
# The learning-rate recipe
# ---------------------------------------------------------------------------------------------------------


def test_default_schedule_decays_from_1_to_0_01():
    model = tiny_model("7")
    make_init_state_trainable(model)
    for schedule in ("cosine", "exponential"):
        optimizer, scheduler = create_state_optimizer(model, num_training_steps=10, schedule=schedule)
        lrs = []
        for _ in range(11):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert lrs[0] == 1.0 and abs(lrs[-1] - 0.01) < 1e-12
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    optimizer, scheduler = create_state_optimizer(model, num_training_steps=10, warmup_steps=4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # RWKV-LM warmup starts at 1% of lr
    assert optimizer.defaults["betas"] == (0.9, 0.99) and optimizer.defaults["eps"] == 1e-8
    assert STATE_TUNING_DEFAULTS["learning_rate"] == 1.0


def test_optimizer_needs_a_trainable_state():
    with pytest.raises(ValueError, match="No trainable initial state"):
        create_state_optimizer(tiny_model("7"), num_training_steps=3)


# ---------------------------------------------------------------------------------------------------------
# GPU: the CUDA kernels pass the gradient on to the initial state
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["5.2", "6", "7"])
def test_state_gradient_through_the_cuda_kernel_equals_pytorch(version, monkeypatch):
    from rwkv_hf.kernels_rwkv_hf import cuda_wkv_available

    if not cuda_wkv_available():
        pytest.skip("the WKV CUDA extension is not built")
    model = tiny_model(version, n_embd=128, head_size=64).cuda()  # the kernels support head sizes 64 and 128
    (state,) = make_init_state_trainable(model)
    model.train()
    ids, labels = (t.cuda() for t in task_batch(seed=4))
    grads = []
    for backend in ("auto", "torch"):  # auto: the kernel for CUDA tensors
        monkeypatch.setenv("RWKV_HF_WKV_BACKEND", backend)
        state.grad = None
        model(ids, labels=labels).loss.backward()
        grads.append(state.grad.clone())
    assert grads[1].abs().sum() > 0
    # test_kernels' gradient budget: 1e-3 of the largest magnitude (long reverse accumulations in fp32)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-3 * grads[1].abs().max().item(), rtol=0)
