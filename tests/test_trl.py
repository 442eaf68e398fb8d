"""TRL's SFTTrainer given a converted folder's path, as its users run it.

TRL finds the model class with getattr(transformers, config.architectures[0]); when the folder named
"RwkvForCausalLM" that was transformers' built-in RWKV-4, which loaded with random weights while the loss still fell.
"""

import json
import subprocess
import textwrap

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is installed by the README's set-up command (extra 'integrations')")

from datasets import Dataset  # noqa: E402  (a TRL dependency)
from model_factory import tiny_world_folder  # noqa: E402
from test_remote_code import fresh_python  # noqa: E402,F401  (the fixture)
from transformers import AutoModelForCausalLM  # noqa: E402

from rwkv_hf import RwkvForCausalLM  # noqa: E402

TEXTS = [f"User: What is {a} plus {b}?\n\nAssistant: {a + b}.\n\n" for a in range(6) for b in range(4)]


def sft_config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, max_length=64,
    )
    settings.update(overrides)
    return trl.SFTConfig(**settings)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_world_folder(tmp_path_factory.mktemp("trl"), seed=3)


def folder_logits(model, folder, ids):
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model.eval()(ids).logits, reference(ids).logits


@pytest.mark.parametrize("packing", [False, True], ids=["plain", "packing"])
def test_sft_trainer_from_a_folder_path_trains_this_model(tmp_path, folder, packing):
    trainer = trl.SFTTrainer(model=str(folder), args=sft_config(tmp_path, packing=packing),
                             train_dataset=Dataset.from_list([{"text": t} for t in TEXTS]))
    assert isinstance(trainer.model, RwkvForCausalLM)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    ours, reference = folder_logits(trainer.model, folder, ids)
    torch.testing.assert_close(ours, reference, atol=0, rtol=0)  # the folder's weights, not random ones
    trainer.model.train()
    history = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert torch.isfinite(torch.tensor(history.training_loss)) and losses[-1] < losses[0], losses


def test_packed_sft_batches_reset_the_state_per_document(tmp_path, folder):
    trainer = trl.SFTTrainer(model=str(folder), args=sft_config(tmp_path, packing=True, padding_free=True),
                             train_dataset=Dataset.from_list([{"text": t} for t in TEXTS[:6]]))
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and int((batch["position_ids"] == 0).sum()) > 1
    model = trainer.model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        alone = torch.cat([model(batch["input_ids"][:, a:b]).logits[0] for a, b in zip(starts[:-1], starts[1:])])
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=0)


WITHOUT_PACKAGE = textwrap.dedent(
    """
    import json, sys
    try:
        import rwkv_hf
        sys.exit("rwkv_hf must not be importable here")
    except ImportError:
        pass
    import trl
    from datasets import Dataset
    texts = json.loads(sys.argv[2])
    args = trl.SFTConfig(output_dir=sys.argv[3], max_steps=2, per_device_train_batch_size=4, report_to=[],
                         save_strategy="no", use_cpu=True, disable_tqdm=True, max_length=64,
                         trust_remote_code=True)
    trainer = trl.SFTTrainer(model=sys.argv[1], args=args, train_dataset=Dataset.from_list([{"text": t} for t in texts]))
    result = trainer.train()
    print(json.dumps({"class": type(trainer.model).__module__ + "." + type(trainer.model).__name__,
                      "loss": result.training_loss}))
    """
)


def test_sft_trainer_without_the_package_uses_the_folders_code(tmp_path, folder, fresh_python):  # noqa: F811
    result = subprocess.run(
        [fresh_python, "-c", WITHOUT_PACKAGE, str(folder), json.dumps(TEXTS), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["class"].startswith("transformers_modules.") and out["class"].endswith(".RwkvHfForCausalLM"), out
    assert out["loss"] == out["loss"]  # not NaN


def test_assistant_only_loss_trains_on_the_replies_only(tmp_path, folder):
    """TRL refuses assistant_only_loss without {% generation %} markers and offsets (a fast tokenizer)."""
    chats = [
        {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}."}]}
        for a in range(6) for b in range(4)
    ]
    trainer = trl.SFTTrainer(model=str(folder), args=sft_config(tmp_path, assistant_only_loss=True),
                             train_dataset=Dataset.from_list(chats))
    batch = next(iter(trainer.get_train_dataloader()))
    tokenizer = trainer.processing_class
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        trained = [i for i, label in zip(ids, labels) if label != -100]
        text = tokenizer.decode(trained)
        assert text.endswith(".\n\n") and "User" not in text and "Assistant" not in text, text
    history = trainer.train()
    assert torch.isfinite(torch.tensor(history.training_loss))


def test_a_lora_adapter_trained_from_the_folder_path_fits_the_model(tmp_path, folder):
    """The adapter TRL saves must load on this package's model of the folder and give the trained logits (when TRL
    resolved the name to transformers' RWKV-4, the adapter belonged to a random model)."""
    from peft import LoraConfig, PeftModel

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["key", "value", "receptance"], task_type="CAUSAL_LM")
    # bf16=False: TRL's default bf16 wraps the trained model's forward in autocast, which a reload would not have
    trainer = trl.SFTTrainer(model=str(folder), args=sft_config(tmp_path, bf16=False), peft_config=lora,
                             train_dataset=Dataset.from_list([{"text": t} for t in TEXTS]))
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        trained = trainer.model.eval()(ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(tmp_path / "adapter"))
        torch.testing.assert_close(reloaded.eval()(ids).logits, trained, atol=1e-5, rtol=0)
        base = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
    assert (trained - base).abs().max() > 1e-4  # the adapter changed something
