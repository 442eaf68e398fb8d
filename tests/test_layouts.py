"""Other libraries' RWKV folders: transformers' built-in RWKV-4 (``model_type="rwkv"``).

The checkpoint is built and run with transformers' own RWKV-4 class (the peer), converted with ``rwkv-hf convert``,
and the logits compared in one call and token by token; the way back (export) loads in transformers' class again.
"""

import json

import pytest
import torch
from model_factory import random_ids
from transformers import AutoModelForCausalLM
from transformers import RwkvConfig as TransformersRwkvConfig
from transformers import RwkvForCausalLM as TransformersRwkvForCausalLM

from rwkv_hf import RwkvForCausalLM, convert_rwkv_checkpoint
from rwkv_hf.cli import main as cli_main
from rwkv_hf.convert_rwkv_hf import CheckpointError
from rwkv_hf.layouts import LayoutError, export_transformers_rwkv4

ATOL = 1e-4


@pytest.fixture(scope="module")
def peer_folder(tmp_path_factory):
    """A random transformers RWKV-4 (every parameter drawn, not the library's init), saved in its own layout."""
    torch.manual_seed(0)
    config = TransformersRwkvConfig(vocab_size=300, context_length=64, hidden_size=64, num_hidden_layers=3,
                                    attention_hidden_size=64, intermediate_size=192, tie_word_embeddings=False)
    model = TransformersRwkvForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "time_decay" in name:
                p.copy_(torch.randn_like(p) * 0.5 - 1)
            elif "time_mix" in name:
                p.copy_(torch.rand_like(p))
            elif "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp("peer") / "rwkv4-transformers"
    model.save_pretrained(path)
    return path


def peer(folder):
    return TransformersRwkvForCausalLM.from_pretrained(folder).eval()


def test_converted_model_gives_the_peers_logits_in_one_call_and_token_by_token(peer_folder, tmp_path):
    ours = convert_rwkv_checkpoint(peer_folder, tmp_path / "ours", tokenizer="none", progress=False)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["rwkv_version"] == "4"
    theirs = peer(peer_folder)
    ids = random_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=ATOL, rtol=0)
        # token by token on one row: transformers' RWKV-4 returns [B, B, V] logits for a batch of single tokens
        ids, state, cache = ids[:1], None, None
        for t in range(ids.shape[1]):
            out_theirs = theirs(ids[:, t : t + 1], state=state, use_cache=True)
            state = out_theirs.state
            out_ours = ours(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out_ours.cache
            torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=ATOL, rtol=0)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert isinstance(reloaded, RwkvForCausalLM)


def test_the_cli_converts_a_folder(peer_folder, tmp_path):
    assert cli_main(["convert", str(peer_folder), str(tmp_path / "cli"), "--tokenizer", "none"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file()


def test_export_back_to_the_transformers_layout_is_exact(peer_folder, tmp_path):
    ours = convert_rwkv_checkpoint(peer_folder, tmp_path / "ours", tokenizer="none", progress=False)
    export_transformers_rwkv4(ours, tmp_path / "back")
    original, back = peer(peer_folder), peer(tmp_path / "back")
    for (name, a), (name_b, b) in zip(sorted(original.state_dict().items()), sorted(back.state_dict().items())):
        assert name == name_b and torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_from_pretrained_reads_the_peers_folder_directly(peer_folder):
    from rwkv_hf import RwkvModel

    model = RwkvForCausalLM.from_pretrained(peer_folder)
    base = RwkvModel.from_pretrained(peer_folder, dtype=torch.bfloat16)
    assert isinstance(model, RwkvForCausalLM) and isinstance(base, RwkvModel)
    assert base.emb.weight.dtype == torch.bfloat16
    ids = random_ids(1, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peer(peer_folder)(ids).logits, atol=ATOL, rtol=0)


def test_from_pretrained_of_a_peers_folder_refuses_options_it_cannot_apply(peer_folder):
    with pytest.raises(ValueError, match=r"only dtype applies there, not \['device_map'\]: convert it once"):
        RwkvForCausalLM.from_pretrained(peer_folder, device_map="cpu")


def test_an_unknown_layout_is_named(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "rwkv7"}))
    with pytest.raises(LayoutError, match=r"model_type 'rwkv7' \(transformers' / flash-linear-attention's RWKV-7\) cannot be converted yet"):
        convert_rwkv_checkpoint(tmp_path / "x", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_config_that_disagrees_with_the_weights_is_refused(peer_folder, tmp_path):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(peer_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayoutError, match="num_hidden_layers=5 but the weights hold 3 blocks"):
        convert_rwkv_checkpoint(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_foreign_weight_in_the_folder_is_refused(peer_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "mixed"
    import shutil

    shutil.copytree(peer_folder, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.mlp.weight"] = torch.zeros(2, 2)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(LayoutError, match=r"1 unexpected weight\(s\), e.g. \['model.layers.0.mlp.weight'\]"):
        convert_rwkv_checkpoint(folder, tmp_path / "out", progress=False)


def test_the_cli_exports_both_ways_and_refuses_a_v7_model_for_the_rwkv4_layout(peer_folder, tmp_path, capsys):
    from model_factory import tiny_model

    from rwkv_hf.convert_rwkv_hf import load_official_checkpoint

    convert_rwkv_checkpoint(peer_folder, tmp_path / "ours", tokenizer="none", progress=False)
    assert cli_main(["export", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "rwkv"]) == 0
    assert isinstance(peer(tmp_path / "back"), TransformersRwkvForCausalLM)
    assert cli_main(["export", str(tmp_path / "ours"), str(tmp_path / "m.pth"), "--to", "official"]) == 0
    again = convert_rwkv_checkpoint(load_official_checkpoint(tmp_path / "m.pth"), tmp_path / "again", progress=False,
                                    tokenizer="none")
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, peer(peer_folder)(ids).logits, atol=ATOL, rtol=0)
    tiny_model("7").save_pretrained(tmp_path / "v7")
    assert cli_main(["export", str(tmp_path / "v7"), str(tmp_path / "v7-back"), "--to", "rwkv"]) == 2
    assert "RWKV-4 only; this model is RWKV-7" in capsys.readouterr().err
    assert not (tmp_path / "v7-back").exists()
    assert cli_main(["export", str(tmp_path / "ours"), str(tmp_path / "m.pth"), "--to", "official"]) == 2  # exists


# ---------------------------------------------------------------------------------------------------------
# RWKV-7 in flash-linear-attention's names, as the rwkv7-hf package (PyPI, pure PyTorch) writes and runs it
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rwkv7_hf_case(tmp_path_factory):
    converter = pytest.importorskip("rwkv7_hf.converter", reason="rwkv7-hf is in the 'integrations' extra")
    from rwkv_checkpoints import make_official_checkpoint

    root = tmp_path_factory.mktemp("rwkv7hf")
    # head size 64, as every released RWKV-7: rwkv7-hf's ln_x epsilon is head_dim * 1e-5 where RWKV-LM's is a fixed
    # 64e-5, so at other head sizes it differs from the official package (by up to 1.1 in the logits at 16)
    official = make_official_checkpoint("7", n_layer=3, n_embd=128, head_size=64, vocab_size=300, seed=11)
    torch.save(official, root / "model.pth")
    converter.convert(converter.parse_args(["--input", str(root / "model.pth"), "--output", str(root / "theirs"),
                                            "--precision", "fp32"]))
    return official, root


@pytest.mark.peer_code
def test_rwkv7_hf_folder_gives_the_peers_logits_and_round_trips_exactly(rwkv7_hf_case, tmp_path):
    from rwkv7_hf.modeling_rwkv7 import RWKV7ForCausalLM

    from rwkv_hf.convert_rwkv_hf import export_official_state_dict

    official, root = rwkv7_hf_case
    theirs = RWKV7ForCausalLM.from_pretrained(root / "theirs").eval()
    ours = convert_rwkv_checkpoint(root / "theirs", tmp_path / "ours", tokenizer="none", progress=False)
    ids = random_ids(2, 10, seed=4)
    with torch.no_grad():
        expected = theirs(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, atol=ATOL, rtol=0)
        cache = None  # token by token against the peer's one-call logits at each position
        for t in range(ids.shape[1]):
            out = ours(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            torch.testing.assert_close(out.logits[:, 0], expected[:, t], atol=ATOL, rtol=0)
    direct = RwkvForCausalLM.from_pretrained(root / "theirs")  # the same renaming, in memory
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, ours(ids).logits)
    # official -> rwkv7-hf -> ours -> official: every tensor bit for bit, except layer 0's value-residual LoRA,
    # which RWKV-LM saves but never uses (rwkv7-hf drops it, the official loader empties it, the export writes zeros)
    back = export_official_state_dict(ours)
    assert set(back) == set(official)
    unused = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    for key, tensor in official.items():
        if key not in unused:
            assert torch.equal(back[key].reshape(tensor.shape), tensor), key


def test_rwkv7_hf_folder_with_a_foreign_weight_is_refused(rwkv7_hf_case, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, root = rwkv7_hf_case
    folder = tmp_path / "mixed"
    shutil.copytree(root / "theirs", folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.attn.x_x"] = torch.zeros(6, 128)  # a fused mixing tensor this mapping does not know
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"Unexpected keys \(1\): \['blocks.0.att.x_x'\]"):
        convert_rwkv_checkpoint(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# The RWKV org's remote-code RWKV-5 / RWKV-6 repos (model_type "rwkv5" / "rwkv6"). Their code is not installable
# here, so the folder is made the way their published conversion script made it (transcribed below, independently
# of layouts.py's table) and the logits are checked against the official package.
# ---------------------------------------------------------------------------------------------------------


def published_rwkv5_conversion(state_dict):
    """transformers' convert_rwkv5_checkpoint_to_hf.py, convert_state_dict: the renaming the v5/v6 repos used."""
    import re

    out = {}
    for name, weight in state_dict.items():
        if name.startswith("emb."):
            name = name.replace("emb.", "embeddings.")
        if name.startswith("blocks.0.ln0"):
            name = name.replace("blocks.0.ln0", "blocks.0.pre_ln")
        name = re.sub(r"blocks\.(\d+)\.att", r"blocks.\1.attention", name)
        name = re.sub(r"blocks\.(\d+)\.ffn", r"blocks.\1.feed_forward", name)
        for short, long in (("k", "key"), ("v", "value"), ("r", "receptance"), ("g", "gate")):
            if name.endswith(f".time_mix_{short}"):
                name = name.replace(f".time_mix_{short}", f".time_mix_{long}")
        if name != "head.weight":
            name = "rwkv." + name
        out[name] = weight
    return out


@pytest.mark.parametrize("version,model_type", [("5.2", "rwkv5"), ("6", "rwkv6")])
def test_rwkv_org_v5_v6_folders_give_the_official_logits(official_case, tmp_path, version, model_type):
    from safetensors.torch import save_file

    from rwkv_hf.convert_rwkv_hf import load_official_checkpoint

    case = official_case(version)
    official = load_official_checkpoint(case.ckpt_path)
    folder = tmp_path / model_type
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in published_rwkv5_conversion(official).items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": model_type, "vocab_size": official["emb.weight"].shape[0],
        "hidden_size": official["emb.weight"].shape[1],
        "num_hidden_layers": len({k.split(".")[1] for k in official if k.startswith("blocks.")}),
    }))
    model = RwkvForCausalLM.from_pretrained(folder)
    assert model.config.rwkv_version == version
    with torch.no_grad():
        torch.testing.assert_close(model(case.tokens[None]).logits[0], case.oracle["logits_full"], atol=ATOL, rtol=0)
