"""The converter: version and sizes from shapes, round trips, merged states, and every way a file can be wrong."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import rwkv_hf  # noqa: F401 - registers the Auto classes
from model_factory import VERSIONS, model_from_state_dict, random_ids
from rwkv_checkpoints import make_official_checkpoint, save_official_checkpoint
from rwkv_hf import RwkvForCausalLM, convert_rwkv_checkpoint
from rwkv_hf.cli import main as cli_main
from rwkv_hf.convert_rwkv_hf import INIT_STATE_FILE, CheckpointError, detect_version, infer_config


def small(version, **kwargs):
    kwargs = {"n_layer": 2, "n_embd": 64, "head_size": 16, "vocab_size": 300, **kwargs}
    return make_official_checkpoint(version, **kwargs)


@pytest.mark.parametrize("version", VERSIONS)
def test_cli_convert_then_auto_load_gives_the_same_logits(tmp_path, version):
    sd = small(version)
    pth = save_official_checkpoint(sd, tmp_path / "model.pth")
    assert cli_main(["convert", str(pth), str(tmp_path / "hf")]) == 0
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.model_type == "rwkv_hf" and config.rwkv_version == version
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(model, RwkvForCausalLM)
    ids = random_ids(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model_from_state_dict(sd)(ids).logits, atol=0, rtol=0)
        base = AutoModel.from_pretrained(tmp_path / "hf")
        assert base(ids).last_hidden_state.shape == (1, 9, 64)


def test_save_pretrained_round_trip_is_exact(tmp_path):
    model = model_from_state_dict(small("6"))
    model.save_pretrained(tmp_path)
    again = RwkvForCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "version,expected",
    [("4", dict(intermediate_size=200)), ("5.2", dict(head_size=32)), ("6", dict(time_mix_extra_dim=32, time_decay_extra_dim=64)),
     ("7", dict(decay_low_rank_dim=32, a_low_rank_dim=32, v_low_rank_dim=32, gate_low_rank_dim=32))],
)
def test_every_size_is_read_from_the_shapes(version, expected):
    sd = small(version, ffn_dim=200 if version == "4" else None, head_size=32 if version == "5.2" else 16, n_layer=3)
    config = infer_config(sd)
    assert (config.rwkv_version, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (version, 3, 64, 300)
    for key, value in expected.items():
        assert getattr(config, key) == value, key


def test_one_layer_v52_is_detected_whatever_the_key_order():
    """The official loader scans keys in order and calls this RWKV-5.1 (time_decay precedes ln_x in block 0)."""
    sd = small("5.2", n_layer=1)
    assert detect_version(sd) == "5.2"
    assert detect_version(OrderedDict(reversed(list(sd.items())))) == "5.2"


def test_bf16_checkpoint_converts_and_keeps_its_dtype(tmp_path):
    sd = small("7", dtype=torch.bfloat16)
    model = convert_rwkv_checkpoint(sd, tmp_path, progress=False)
    assert model.rwkv.blocks[0].att.key.weight.dtype == torch.bfloat16
    fp32 = convert_rwkv_checkpoint(sd, tmp_path / "fp32", dtype="float32", progress=False)
    assert fp32.rwkv.blocks[0].att.key.weight.dtype == torch.float32


def test_merged_time_state_is_kept_in_its_own_file(tmp_path):
    sd = small("7", time_state=True)
    convert_rwkv_checkpoint(sd, tmp_path, progress=False)
    states = load_file(tmp_path / INIT_STATE_FILE)
    assert sorted(states) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    assert torch.equal(states["blocks.1.att.time_state"], sd["blocks.1.att.time_state"])
    weights = load_file(tmp_path / "model.safetensors")
    assert not any("time_state" in k for k in weights)


def test_converted_folder_carries_its_code_and_auto_map(tmp_path):
    convert_rwkv_checkpoint(small("4"), tmp_path, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rwkv_hf.RwkvHfForCausalLM"
    assert config["auto_map"]["AutoModel"] == "modeling_rwkv_hf.RwkvHfModel"
    for name in ("modeling_rwkv_hf.py", "configuration_rwkv_hf.py", "ops_rwkv_hf.py", "cache_rwkv_hf.py"):
        assert (tmp_path / name).is_file(), name


# --- bad input ---------------------------------------------------------------------------------------------


def test_truncated_file_is_reported(tmp_path):
    pth = save_official_checkpoint(small("4"), tmp_path / "m.pth")
    data = pth.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        convert_rwkv_checkpoint(tmp_path / "cut.pth", tmp_path / "out", progress=False)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        convert_rwkv_checkpoint(tmp_path / "empty.pth", tmp_path / "out", progress=False)


class NotATensor:
    pass


def test_a_pickle_of_objects_is_refused_without_running_it(tmp_path):
    torch.save({"emb.weight": NotATensor()}, tmp_path / "obj.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        convert_rwkv_checkpoint(tmp_path / "obj.pth", tmp_path / "out", progress=False)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        convert_rwkv_checkpoint(tmp_path / "list.pth", tmp_path / "out", progress=False)
    torch.save({"emb.weight": 3}, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match="non-tensor"):
        convert_rwkv_checkpoint(tmp_path / "int.pth", tmp_path / "out", progress=False)


def test_unknown_keys_name_what_was_expected():
    with pytest.raises(CheckpointError, match="Cannot tell the RWKV version"):
        detect_version({"transformer.h.0.attn.weight": torch.zeros(2)})


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = small("6")
    del sd["blocks.1.att.time_maa_w2"]
    sd["blocks.0.att.mystery"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"Missing keys \(1\): \['blocks.1.att.time_maa_w2'\].*Unexpected keys \(1\): \['blocks.0.att.mystery'\]"):
        convert_rwkv_checkpoint(sd, tmp_path, progress=False)


def test_a_missing_block_is_named(tmp_path):
    sd = {k: v for k, v in small("4", n_layer=3).items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match=r"Blocks \[1\] are missing"):
        convert_rwkv_checkpoint(sd, tmp_path, progress=False)


def test_a_shape_that_disagrees_is_named(tmp_path):
    sd = small("7")
    sd["blocks.1.att.r_k"] = torch.zeros(4, 17)
    with pytest.raises(CheckpointError, match=r"blocks.1.att.r_k has shape \(4, 17\)"):
        convert_rwkv_checkpoint(sd, tmp_path, progress=False)


def test_deep_embed_and_rwkv51_are_refused_clearly():
    with pytest.raises(CheckpointError, match="DeepEmbed"):
        detect_version(small("7", deep_embed=True))
    sd = small("5.2")
    sd = {k: (v[:, :1] if k.endswith("att.time_decay") else v) for k, v in sd.items()}
    with pytest.raises(CheckpointError, match="5.0/5.1"):
        detect_version(sd)


def test_a_file_preconverted_by_the_rwkv_package_is_refused(tmp_path):
    sd = dict(small("4"), _strategy="cuda fp16", _version=0.7, _rescale_layer=6)
    with pytest.raises(CheckpointError, match="pre-converted"):
        convert_rwkv_checkpoint(sd, tmp_path, progress=False)


def test_config_that_disagrees_with_the_weights_is_an_error(tmp_path):
    convert_rwkv_checkpoint(small("7"), tmp_path, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=1)))
    with pytest.raises(ValueError, match="weights do not match the config"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    with pytest.raises(Exception, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_unknown_version_in_a_config_is_refused():
    with pytest.raises(ValueError, match="Unknown RWKV version '8'"):
        rwkv_hf.RwkvConfig(rwkv_version="8")
    with pytest.raises(ValueError, match="only 5.2 is supported"):
        rwkv_hf.RwkvConfig(rwkv_version=5.1)


def test_existing_output_is_never_overwritten_silently(tmp_path, capsys):
    pth = save_official_checkpoint(small("4"), tmp_path / "m.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli_main(["convert", str(pth), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert cli_main(["convert", str(pth), str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("version", VERSIONS)
def test_export_gives_back_the_official_layout(version):
    from rwkv_hf.convert_rwkv_hf import export_official_state_dict

    sd = small(version)
    exported = export_official_state_dict(model_from_state_dict(sd))
    assert set(exported) == set(sd)
    for key, tensor in sd.items():
        assert exported[key].shape == tensor.shape, key
        if not (version == "7" and key.startswith("blocks.0.att.v")):  # layer 0's unused LoRA comes back as zeros
            assert torch.equal(exported[key], tensor), key


def test_decays_and_group_norm_stay_fp32_when_loading_in_bf16(tmp_path):
    convert_rwkv_checkpoint(small("6"), tmp_path, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    att = model.rwkv.blocks[1].att
    assert att.time_decay.dtype == att.time_faaaa.dtype == att.ln_x.weight.dtype == torch.float32
    assert att.key.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("version,vocab,expected", [("7", 65536, "RwkvWorldTokenizerFast"), ("4", 50277, "Rwkv20BTokenizer")])
def test_the_converter_writes_the_tokenizer_the_vocabulary_size_implies(tmp_path, version, vocab, expected):
    from transformers import AutoTokenizer

    sd = make_official_checkpoint(version, n_layer=1, n_embd=32, head_size=16, vocab_size=vocab)
    convert_rwkv_checkpoint(sd, tmp_path, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert type(tokenizer).__name__ == expected
    assert tokenizer.decode(tokenizer("User: hi\n\nAssistant:").input_ids) == "User: hi\n\nAssistant:"
    assert (tmp_path / "tokenization_rwkv_hf.py").is_file()
