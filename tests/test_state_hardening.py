"""A state's identity and sanity: it loads only into the model it belongs to, and never with NaN/Inf in it.

The identity is the RWKV version, the shapes and ``model_weights_hash`` of the weights the state was tuned on or
saved from. Our ``.safetensors`` files, the ``init_state.safetensors`` beside saved weights and state-tuning
adapters record it; loading checks it. Files of the ecosystem (.pth, .state) carry none and load on shapes and
version, as everywhere else.

"Another model of the same shape" is ``tiny_model("7", seed=1)``: same sizes as ``tiny_model("7")``, other weights.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_factory import random_ids, tiny_model
from rwkv_checkpoints import make_official_checkpoint
from rwkv_hf.state_rwkv_hf import (
    HASH_KEY,
    InitState,
    StateFileError,
    _strided_sample,
    convert_state_file,
    get_init_state,
    init_state_cache,
    list_init_states,
    load_init_state,
    make_init_state_trainable,
    mix_init_states,
    model_weights_hash,
    save_init_state,
    write_state_file,
)

LOGGER = "rwkv_hf.state_rwkv_hf"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def a_state(config, seed=0, nan_at=None) -> dict:
    """A random .pth-layout state; ``nan_at=(layer, value)`` puts NaN/Inf in that layer."""
    g = torch.Generator().manual_seed(seed)
    H, N = config.num_attention_heads, config.head_size
    state = {f"blocks.{i}.att.time_state": torch.randn(H, N, N, generator=g) * 0.3 for i in range(2)}
    if nan_at is not None:
        layer, value = nan_at
        state[f"blocks.{layer}.att.time_state"][1, 2, 3] = value
    return state


def with_state(version="7", seed=0, state_seed=5):
    model = tiny_model(version, seed=seed)
    load_init_state(model, a_state(model.config, state_seed))
    return model


def saved_state(tmp_path, name="tuned.safetensors", **kwargs):
    return save_init_state(with_state(**kwargs), tmp_path / name)


def snapshot(model):
    """What a failed load must leave as it was: the mounted names and the default state."""
    state = get_init_state(model)
    return list_init_states(model), None if state is None else state.wkv.clone()


def same(model, before) -> bool:
    names, wkv = snapshot(model)
    return names == before[0] and (wkv is None if before[1] is None else torch.equal(wkv, before[1]))


def warnings_from_us(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------------------------
# The hash
# ---------------------------------------------------------------------------------------------------------


def test_the_hash_tells_models_of_the_same_shape_apart():
    assert model_weights_hash(tiny_model("7")) == model_weights_hash(tiny_model("7"))
    assert model_weights_hash(tiny_model("7")) != model_weights_hash(tiny_model("7", seed=1))
    changed = copy.deepcopy(tiny_model("7"))  # tiny models may share storage with the factory's cached checkpoint
    before = model_weights_hash(changed)
    with torch.no_grad():
        changed.rwkv.blocks[1].att.key.weight[0, 0] += 0.5  # element 0 of every tensor is in the sample
    assert model_weights_hash(changed) != before


def test_the_hash_is_the_same_in_every_precision_for_weights_published_in_bf16():
    model = tiny_model("7").to(torch.bfloat16).float()  # as converted from an official bf16 checkpoint
    expected = model_weights_hash(model)
    for dtype in (torch.bfloat16, torch.float16):
        assert model_weights_hash(copy.deepcopy(model).to(dtype)) == expected, dtype


def test_the_hash_ignores_states_and_adapters():
    from peft import LoraConfig, get_peft_model

    from rwkv_hf.peft_rwkv_hf import StateTuningConfig

    expected = model_weights_hash(tiny_model("7"))
    mounted = with_state()
    make_init_state_trainable(mounted)
    assert model_weights_hash(mounted) == expected
    assert model_weights_hash(get_peft_model(tiny_model("7"), StateTuningConfig())) == expected
    lora = get_peft_model(tiny_model("7"), LoraConfig(r=4, target_modules=["key"], init_lora_weights=False))
    assert model_weights_hash(lora) == expected  # the base weights; the adapter is not the base model


def test_the_sample_is_bounded_and_independent_of_the_memory_layout():
    t = torch.arange(10_000.0).reshape(100, 100)
    sample = _strided_sample(t, 64)
    assert sample.shape == (64,) and sample[0] == 0 and sample[-1] > 9_800  # spread over the whole tensor
    assert torch.equal(_strided_sample(t.t(), 64), _strided_sample(t.t().contiguous(), 64))
    assert torch.equal(_strided_sample(torch.arange(5.0), 64), torch.arange(5.0))


# ---------------------------------------------------------------------------------------------------------
# State files: identity recorded and checked
# ---------------------------------------------------------------------------------------------------------


def test_our_files_record_the_weights_hash(tmp_path):
    path = saved_state(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta[HASH_KEY] == model_weights_hash(tiny_model("7")) and meta["rwkv_version"] == "7"


def test_a_state_from_another_model_of_the_same_shape_is_refused(tmp_path):
    path = saved_state(tmp_path)
    other = with_state(seed=1, state_seed=9)
    before = snapshot(other)
    with pytest.raises(StateFileError) as err:
        load_init_state(other, path)
    text = str(err.value)
    assert model_weights_hash(tiny_model("7")) in text and model_weights_hash(other) in text  # both models
    assert "RWKV-7 with 2 layers of 4 heads x 16" in text and "allow_other_model=True" in text
    assert same(other, before)


def test_the_override_loads_it_anyway(tmp_path, caplog):
    path = saved_state(tmp_path)
    other = tiny_model("7", seed=1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_init_state(other, path, allow_other_model=True)
    assert any("Loading it anyway" in m for m in warnings_from_us(caplog))
    assert torch.equal(get_init_state(other).wkv, get_init_state(with_state()).wkv)


def test_the_same_model_loads_its_state_without_a_word(tmp_path, caplog):
    path = saved_state(tmp_path)
    fresh = tiny_model("7")  # another instance of the same weights
    with caplog.at_level(logging.INFO, logger=LOGGER):
        load_init_state(fresh, path)
    assert warnings_from_us(caplog) == []


def test_an_in_memory_state_keeps_its_identity():
    state = get_init_state(with_state())
    assert state.model_hash == model_weights_hash(tiny_model("7"))
    with pytest.raises(StateFileError, match="allow_other_model=True"):
        load_init_state(tiny_model("7", seed=1), state)
    load_init_state(tiny_model("7"), state)


def test_another_version_is_refused_even_with_the_override(tmp_path):
    path = saved_state(tmp_path, version="6")  # same layers, heads and head size as the tiny v7
    with pytest.raises(StateFileError, match="made for RWKV-6 with 2 layers"):
        load_init_state(tiny_model("7"), path, allow_other_model=True)


def test_a_default_state_copied_beside_another_model_is_refused(tmp_path):
    from rwkv_hf import RwkvForCausalLM

    with_state().save_pretrained(tmp_path / "a")
    tiny_model("7", seed=1).save_pretrained(tmp_path / "b")
    assert RwkvForCausalLM.from_pretrained(tmp_path / "a").rwkv.init_state is not None  # its own state: fine
    shutil.copy(tmp_path / "a" / "init_state.safetensors", tmp_path / "b" / "init_state.safetensors")
    with pytest.raises(StateFileError, match="move it away to load the model without it"):
        RwkvForCausalLM.from_pretrained(tmp_path / "b")


@pytest.mark.parametrize("suffix", [".pth", ".state"])
def test_ecosystem_files_carry_no_identity_and_still_load_on_shape_and_version(tmp_path, suffix, caplog):
    path = saved_state(tmp_path, name=f"tuned{suffix}")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        load_init_state(tiny_model("7", seed=1), path)
    assert warnings_from_us(caplog) == []  # that is how the ecosystem works: nothing to warn about
    with pytest.raises(StateFileError, match="the state has 2 layers of 4 heads x 16"):
        load_init_state(tiny_model("7", n_layer=3), path)


def test_a_model_less_conversion_loads_anywhere(tmp_path, caplog):
    convert_state_file(saved_state(tmp_path, name="tuned.pth"), tmp_path / "converted.safetensors")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        load_init_state(tiny_model("7", seed=1), tmp_path / "converted.safetensors")
    assert warnings_from_us(caplog) == []


def test_our_files_from_an_older_rwkv_hf_load_with_a_warning(tmp_path, caplog):
    state = get_init_state(with_state())
    old = {"rwkv_version": "7", "num_hidden_layers": "2", "num_heads": "4", "head_size": "16", "hidden_size": "64"}
    path = write_state_file(state, tmp_path / "old.safetensors", fingerprint=old)  # no hash, as before
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_init_state(tiny_model("7", seed=1), path)
    assert any("records no hash" in m for m in warnings_from_us(caplog))


def test_the_converters_init_state_without_a_hash_keeps_loading(tmp_path, caplog):
    from rwkv_hf import RwkvForCausalLM, convert_rwkv_checkpoint

    checkpoint = make_official_checkpoint("7", n_layer=2, n_embd=64, head_size=16, vocab_size=300, seed=0)
    model = tiny_model("7")
    checkpoint.update(a_state(model.config))  # a state-tuned checkpoint: time_state merged into the weights
    convert_rwkv_checkpoint(checkpoint, tmp_path / "model", progress=False)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loaded = RwkvForCausalLM.from_pretrained(tmp_path / "model")
    assert list_init_states(loaded) == ["default"]
    assert warnings_from_us(caplog) == []  # beside its own weights: no warning on every load


# ---------------------------------------------------------------------------------------------------------
# State-tuning adapters (PEFT): identity recorded in adapter_config.json and checked
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A saved v7 state-tuning adapter (untrained: the check is about whose it is, not what it learned)."""
    from peft import get_peft_model

    from rwkv_hf.peft_rwkv_hf import StateTuningConfig

    model = get_peft_model(with_state(), StateTuningConfig())
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return folder


def copy_adapter(adapter, tmp_path, edit_config=None, edit_weights=None):
    folder = tmp_path / "edited"
    shutil.copytree(adapter, folder)
    if edit_config:
        config = json.loads((folder / "adapter_config.json").read_text())
        edit_config(config)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    if edit_weights:
        weights = load_file(str(folder / "adapter_model.safetensors"))
        edit_weights(weights)
        save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def test_an_adapter_records_the_model_it_was_tuned_on(adapter):
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["model_identity"][HASH_KEY] == model_weights_hash(tiny_model("7"))
    assert config["model_identity"]["rwkv_version"] == "7"
    assert "allow_other_model" not in config  # an override is for one load, never saved


def test_an_adapter_loads_into_its_own_model(adapter, caplog):
    from peft import PeftModel

    with caplog.at_level(logging.INFO):
        PeftModel.from_pretrained(tiny_model("7"), adapter)
    assert warnings_from_us(caplog) == []


def test_an_adapter_from_another_model_of_the_same_shape_is_refused(adapter):
    from peft import PeftModel

    with pytest.raises(StateFileError, match="allow_other_model=True to PeftModel.from_pretrained") as err:
        PeftModel.from_pretrained(tiny_model("7", seed=1), adapter)
    assert model_weights_hash(tiny_model("7", seed=1)) in str(err.value)


def test_the_override_loads_an_adapter_anyway(adapter, caplog):
    from peft import PeftModel

    with caplog.at_level(logging.WARNING):
        model = PeftModel.from_pretrained(tiny_model("7", seed=1), adapter, allow_other_model=True)
    assert any("Loading it anyway" in m for m in warnings_from_us(caplog))
    ids = random_ids(1, 6)
    with torch.no_grad():
        assert model(ids).logits.isfinite().all()


def test_a_v7_adapter_does_not_load_into_a_v6_model(adapter):
    from peft import PeftModel

    for override in (False, True):
        with pytest.raises(StateFileError, match="tuned on RWKV-7 .* this model is RWKV-6.*differs: rwkv_version"):
            PeftModel.from_pretrained(tiny_model("6"), adapter, allow_other_model=override)


def test_an_adapter_saved_without_identity_loads_with_a_warning(adapter, tmp_path, caplog):
    from peft import PeftModel

    old = copy_adapter(adapter, tmp_path, edit_config=lambda c: c.pop("model_identity"))
    with caplog.at_level(logging.WARNING):
        PeftModel.from_pretrained(tiny_model("7", seed=1), old)
    assert any("records no hash" in m for m in warnings_from_us(caplog))


def test_a_new_config_object_used_again_records_the_next_model():
    """PEFT does not copy configs: reusing one for another model is a new adapter there, not a foreign one."""
    from peft import get_peft_model

    from rwkv_hf.peft_rwkv_hf import StateTuningConfig

    config = StateTuningConfig()
    get_peft_model(tiny_model("7"), config)
    get_peft_model(tiny_model("7", seed=1), config)
    assert config.model_identity[HASH_KEY] == model_weights_hash(tiny_model("7", seed=1))

# ---------------------------------------------------------------------------------------------------------
# NaN / Inf: refused wherever a state gets in, naming the layer and the tensor
# ---------------------------------------------------------------------------------------------------------


def _pth_file(model, tmp_path):
    path = tmp_path / "nan.pth"
    torch.save(a_state(model.config, nan_at=(1, float("nan"))), path)
    load_init_state(model, path, name="x")


def _state_file(model, tmp_path):
    # As Ai00 / RWKV-Runner write it: [h, key, value] F16; an overflowed F16 value reads as Inf.
    state = {
        k: v.transpose(-2, -1).half().contiguous() for k, v in a_state(model.config, nan_at=(1, float("inf"))).items()
    }
    save_file(state, str(tmp_path / "inf.state"), metadata={"format": "pt"})
    load_init_state(model, tmp_path / "inf.state", name="x")


def _our_file_shift_state(model, tmp_path):
    C = model.config.hidden_size
    state = {**a_state(model.config), **{f"blocks.{i}.ffn.shift_state": torch.zeros(C) for i in range(2)}}
    state["blocks.1.ffn.shift_state"][7] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"), metadata={"format": "rwkv_hf.init_state"})
    load_init_state(model, tmp_path / "nan.safetensors", name="x")


def _tensor_dict(model, tmp_path):
    load_init_state(model, a_state(model.config, nan_at=(1, float("-inf"))), name="x")


def _init_state_object(model, tmp_path):
    state = InitState.from_pth_tensors("7", list(a_state(model.config, nan_at=(1, float("nan"))).values()))
    load_init_state(model, state, name="x")


def _official_state_list(model, tmp_path):
    state = init_state_cache(model).to_official_state()
    state[3 * 1 + 1] = state[3 * 1 + 1].clone().fill_(float("nan"))  # layer 1's WKV matrix
    load_init_state(model, state, name="x")


def _mix_result(model, tmp_path):
    mix_init_states(model, {"default": 1e39, "b": 1.0}, name="x")  # a finite weight that overflows fp32


def _mix_weight(model, tmp_path):
    mix_init_states(model, {"default": float("nan"), "b": 0.5}, name="x")


def _trainable_from_a_nan_default(model, tmp_path):
    _plant_nan_default(model)
    make_init_state_trainable(model)


def _peft_from_a_nan_default(model, tmp_path):
    from peft import get_peft_model

    from rwkv_hf.peft_rwkv_hf import StateTuningConfig

    _plant_nan_default(model)
    get_peft_model(model, StateTuningConfig(init="base"))


def _plant_nan_default(model):
    """A NaN default state that got past every check (e.g. a PEFT merge without safe_merge of a diverged run)."""
    good = get_init_state(model)
    bad = good.wkv.clone()
    bad[1, 0, 0, 0] = float("nan")
    model.rwkv.init_state.states["default"] = InitState("7", bad)


NAN_ENTRIES = [
    (_pth_file, "WKV state .* of layer 1 contains NaN"),
    (_state_file, "WKV state .* of layer 1 contains Inf"),
    (_our_file_shift_state, "ffn.shift_state.* of layer 1 contains NaN"),
    (_tensor_dict, "WKV state .* of layer 1 contains Inf"),
    (_init_state_object, "WKV state .* of layer 1 contains NaN"),
    (_official_state_list, "official state list: the WKV state of layer 1 contains NaN"),
    (_mix_result, "The mix .*: the WKV state of layers 0, 1 contains Inf"),
    (_mix_weight, "Mix weights must be finite numbers; got \\{'default': nan\\}"),
    (_trainable_from_a_nan_default, "initial state to train from: the WKV state of layer 1 contains NaN"),
    (_peft_from_a_nan_default, "adapter 'default' would start from: the WKV state of layer 1 contains NaN"),
]


@pytest.mark.parametrize("enter,message", NAN_ENTRIES, ids=[f.__name__.strip("_") for f, _ in NAN_ENTRIES])
def test_nan_states_are_refused_at_every_entry(tmp_path, enter, message):
    model = with_state()
    load_init_state(model, a_state(model.config, seed=6), name="b")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        enter(model, tmp_path)
    if enter not in (_trainable_from_a_nan_default, _peft_from_a_nan_default):  # those planted the NaN themselves
        assert same(model, before)


def test_nan_adapter_weights_are_refused_before_they_replace_anything(adapter, tmp_path):
    from peft import PeftModel

    def poison(weights):
        key = next(k for k in weights if "state_tuning_wkv" in k)
        weights[key][1, 2, 3, 4] = float("nan")

    bad = copy_adapter(adapter, tmp_path, edit_weights=poison)
    message = "adapter weight 'state_tuning_wkv.default': the WKV state of layer 1 contains NaN"
    with pytest.raises(StateFileError, match=message):
        PeftModel.from_pretrained(tiny_model("7"), bad)
    model = PeftModel.from_pretrained(tiny_model("7"), adapter)
    before = model.get_base_model().rwkv.init_state.state_tuning_wkv["default"].detach().clone()
    with pytest.raises(StateFileError, match="layer 1 contains NaN"):
        model.load_adapter(bad, adapter_name="default")  # reloading into the live adapter: it keeps its values
    assert torch.equal(model.get_base_model().rwkv.init_state.state_tuning_wkv["default"], before)



def test_a_float8_state_file_is_refused_with_its_dtype(tmp_path):
    from safetensors.torch import save_file

    from rwkv_hf.state_rwkv_hf import StateFileError

    model = tiny_model("7")
    H, N = model.config.num_attention_heads, model.config.head_size
    save_file({f"blocks.{i}.att.time_state": torch.zeros(H, N, N).to(torch.float8_e4m3fn)
               for i in range(model.config.num_hidden_layers)}, tmp_path / "s.safetensors")
    with pytest.raises(StateFileError, match="float8_e4m3fn; expected a float32"):
        model.load_init_state(tmp_path / "s.safetensors")
