"""Initial-state files (.pth / .state / ours) and mounting them: orientation, round trips, refusals, selection.

Orientation ground truth comes from outside this project: the official package auto-loading a checkpoint's
``time_state`` (v5.2/v6), RWKV-Runner's rule for v7 (the oracle fixture's ``"state"`` cases), and web-rwkv's
``convert_safetensors.py`` rule for ``.state`` (``transpose(-2, -1).half()``).

Tolerances: logits against the official package within 1e-4 (as test_parity); our own paths that only move a
state around must agree exactly (same tensors) or within 1e-5 (chunked vs recurrent WKV sums).
"""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file

from model_factory import model_from_state_dict, random_ids, tiny_model
from official_oracle import run_official_many
from rwkv_checkpoints import make_official_checkpoint, save_official_checkpoint
from rwkv_hf import RwkvCache, convert_rwkv_checkpoint
from rwkv_hf.compat_rwkv_hf import cache_kwargs
from rwkv_hf.state_rwkv_hf import (
    StateFileError,
    attach_default_init_state,
    convert_state_file,
    get_init_state,
    init_state_cache,
    list_init_states,
    load_init_state,
    mix_init_states,
    parse_state_name,
    read_state_file,
    save_init_state,
    set_default_init_state,
    unload_init_state,
)

LOGITS_ATOL = 1e-4  # against the official package (test_parity's budget)
ATOL = 1e-5  # our own paths: chunked vs recurrent WKV
STATE_VERSIONS = ("5.2", "6", "7")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def exact_state(config, seed=0, scale=0.3) -> dict:
    """A random .pth-layout state whose values survive bf16 (.pth) and fp16 (.state) unchanged, so every
    format round-trips bit for bit: bf16-rounded, with magnitudes where fp16 is exact (>= 2^-14)."""
    g = torch.Generator().manual_seed(seed)
    H, N = config.num_attention_heads, config.head_size
    out = {}
    for i in range(config.num_hidden_layers):
        t = (torch.randn(H, N, N, generator=g) * scale).to(torch.bfloat16).float()
        out[f"blocks.{i}.att.time_state"] = torch.where(t.abs() < 2**-14, torch.zeros_like(t), t)
    return out


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


# ---------------------------------------------------------------------------------------------------------
# Orientation against the official package
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["6", "7"])
def test_pth_state_gives_the_official_logits(official_case, tmp_path, version):
    """A state-tuned checkpoint's time_state, saved alone as RWKV-PEFT does, mounted: the oracle started
    from the same time_state (official auto-load for v6, RWKV-Runner's convention for v7)."""
    case = official_case(version, "state")
    sd = case.state_dict()
    model = model_from_state_dict(sd)
    torch.save({k: v for k, v in sd.items() if k.endswith(".att.time_state")}, tmp_path / "tuned.pth")
    assert load_init_state(model, tmp_path / "tuned.pth") == "default"
    torch.testing.assert_close(
        logits(model, case.tokens[None])[0], case.oracle["logits_full"], atol=LOGITS_ATOL, rtol=0
    )
    # token by token through the cache: only the first step starts from the mounted state
    cache, steps = None, []
    with torch.no_grad():
        for token in case.tokens:
            out = model(token.view(1, 1), cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(steps), case.oracle["logits_step"], atol=LOGITS_ATOL, rtol=0)


def test_converted_state_tuned_model_starts_from_its_state(official_case, tmp_path):
    case = official_case("7", "state")
    convert_rwkv_checkpoint(case.ckpt_path, tmp_path / "model", progress=False)
    model = model_from_state_dict(case.state_dict())
    assert attach_default_init_state(model, tmp_path / "model")
    torch.testing.assert_close(
        logits(model, case.tokens[None])[0], case.oracle["logits_full"], atol=LOGITS_ATOL, rtol=0
    )
    assert not attach_default_init_state(tiny_model("7"), tmp_path)  # no init_state.safetensors there


def test_from_pretrained_mounts_the_converted_state(official_case, tmp_path):
    from rwkv_hf import RwkvForCausalLM

    case = official_case("6", "state")
    convert_rwkv_checkpoint(case.ckpt_path, tmp_path / "model", progress=False)
    model = RwkvForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert list_init_states(model) == ["default"]
    torch.testing.assert_close(
        logits(model, case.tokens[None])[0], case.oracle["logits_full"], atol=LOGITS_ATOL, rtol=0
    )


def test_state_files_give_the_official_logits_for_every_version(tmp_path):
    """One oracle run per family. For each version a .state file written by us is read back *independently*
    (safetensors + web-rwkv's [head, key, value] rule) into the official state list; a v5.2 checkpoint with a
    merged time_state checks the .pth orientation through the official auto-load."""
    requests, ours = [], []
    for version in STATE_VERSIONS:
        sd = make_official_checkpoint(version, n_layer=2, n_embd=64, head_size=32, vocab_size=300, seed=11)
        model = model_from_state_dict(sd)
        state = exact_state(model.config, seed=int(float(version) * 10))
        tokens = random_ids(1, 20, seed=3)[0].tolist()
        load_init_state(model, state)
        save_init_state(model, tmp_path / f"v{version}.state")
        file_tensors = load_file(str(tmp_path / f"v{version}.state"))
        official = []
        for i in range(model.config.num_hidden_layers):
            s = file_tensors[f"blocks.{i}.att.time_state"].float()  # [head, key, value]
            official += [torch.zeros(64), s.transpose(-1, -2) if version == "7" else s, torch.zeros(64)]
        ckpt = save_official_checkpoint(sd, tmp_path / f"v{version}.pth")
        requests.append({"ckpt_path": ckpt, "tokens": tokens, "init_state": official})
        reloaded = model_from_state_dict(sd)
        load_init_state(reloaded, tmp_path / f"v{version}.state")
        ours.append(logits(reloaded, torch.tensor([tokens]))[0])
        if version == "5.2":
            merged = save_official_checkpoint({**sd, **state}, tmp_path / "v5.2-merged.pth")
            requests.append({"ckpt_path": merged, "tokens": tokens, "init_state": None})  # official auto-load
            ours.append(ours[-1])
    results = run_official_many(requests)
    for request, mine, oracle in zip(requests, ours, results):
        torch.testing.assert_close(mine, oracle["logits_full"], atol=LOGITS_ATOL, rtol=0, msg=str(request["ckpt_path"]))


@pytest.mark.parametrize("version", STATE_VERSIONS)
def test_state_file_is_the_webrwkv_transpose_of_the_pth(tmp_path, version):
    model = tiny_model(version)
    pth = exact_state(model.config)
    # What RWKV-Runner's / web-rwkv's convert_safetensors.py makes of a .pth state:
    save_file(
        {k: v.transpose(-2, -1).half().contiguous() for k, v in pth.items()},
        str(tmp_path / "runner.state"),
        metadata={"format": "pt"},
    )
    load_init_state(model, tmp_path / "runner.state", name="runner")
    load_init_state(model, pth, name="pth")
    assert torch.equal(get_init_state(model, "runner").wkv, get_init_state(model, "pth").wkv)
    save_init_state(model, tmp_path / "ours.state", name="pth")
    ours = load_file(str(tmp_path / "ours.state"))
    for key, tensor in pth.items():
        assert ours[key].dtype == torch.float16  # web-rwkv's load_matrix_f16 accepts nothing else
        assert torch.equal(ours[key], tensor.transpose(-2, -1).half())


def test_the_slot_answers_the_modeling_hook_when_called_too(two_states):
    """RwkvModel may call ``init_state.layer_states(...)`` or the module itself (so module hooks run)."""
    slot = two_states.rwkv.init_state
    called, direct = slot(2, torch.float32, "cpu", ["a", "b"]), slot.layer_states(2, torch.float32, "cpu", ["a", "b"])
    assert all(torch.equal(x[2], y[2]) for x, y in zip(called, direct))


def test_official_state_list_orientation(tmp_path):
    """The cache layout is the official package's list layout: v5.2/v6 S = pth^T, v7 S = pth."""
    for version in STATE_VERSIONS:
        model = tiny_model(version)
        pth = exact_state(model.config)
        load_init_state(model, pth)
        official = init_state_cache(model).to_official_state()
        for i in range(model.config.num_hidden_layers):
            t = pth[f"blocks.{i}.att.time_state"]
            assert torch.equal(official[3 * i + 1], t if version == "7" else t.transpose(-1, -2))


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", STATE_VERSIONS)
@pytest.mark.parametrize("suffix", [".pth", ".state", ".safetensors"])
def test_round_trip_is_exact(tmp_path, version, suffix):
    model = tiny_model(version)
    load_init_state(model, exact_state(model.config))
    before = get_init_state(model)
    save_init_state(model, tmp_path / f"a{suffix}")
    other = tiny_model(version)
    load_init_state(other, tmp_path / f"a{suffix}")
    assert torch.equal(get_init_state(other).wkv, before.wkv)
    ids = random_ids(2, 9)
    assert torch.equal(logits(other, ids), logits(model, ids))
    save_init_state(other, tmp_path / f"b{suffix}")  # saving what was loaded writes the same tensors again
    a, b = read_state_file(tmp_path / f"a{suffix}"), read_state_file(tmp_path / f"b{suffix}")
    assert a.layers.keys() == b.layers.keys()
    assert all(a.layers[i].dtype == b.layers[i].dtype and torch.equal(a.layers[i], b.layers[i]) for i in a.layers)


def test_our_format_keeps_shift_states_and_fp32(tmp_path):
    model = tiny_model("7")
    C = model.config.hidden_size
    state = exact_state(model.config)
    state.update({f"blocks.{i}.att.shift_state": torch.randn(C) for i in range(2)})
    state.update({f"blocks.{i}.ffn.shift_state": torch.randn(C) for i in range(2)})
    load_init_state(model, state)
    save_init_state(model, tmp_path / "s.safetensors")
    other = tiny_model("7")
    load_init_state(other, tmp_path / "s.safetensors")
    a, b = get_init_state(model), get_init_state(other)
    assert torch.equal(a.time_shift, b.time_shift) and torch.equal(a.channel_shift, b.channel_shift)
    ids = random_ids(1, 7)
    assert torch.equal(logits(model, ids), logits(other, ids))
    with pytest.warns(UserWarning, match="shift states are dropped"):
        save_init_state(model, tmp_path / "s.pth")


def test_convert_between_pth_and_state_without_a_model(tmp_path):
    model = tiny_model("6")
    load_init_state(model, exact_state(model.config))
    save_init_state(model, tmp_path / "a.pth")
    convert_state_file(tmp_path / "a.pth", tmp_path / "a.state")
    convert_state_file(tmp_path / "a.state", tmp_path / "b.pth")
    a, b = torch.load(tmp_path / "a.pth"), torch.load(tmp_path / "b.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    load_init_state(model, tmp_path / "a.state", name="converted")
    assert torch.equal(get_init_state(model, "converted").wkv, get_init_state(model).wkv)


# ---------------------------------------------------------------------------------------------------------
# Selecting states: by name, per row, mixed, from a prompt
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def two_states():
    model = tiny_model("7")
    load_init_state(model, exact_state(model.config, seed=1), name="a")
    load_init_state(model, exact_state(model.config, seed=2), name="b")
    return model


def test_named_states_are_chosen_per_call(two_states):
    model, ids = two_states, random_ids(1, 10)
    zero = logits(model, ids)  # named states do not change the default
    via_cache = logits(model, ids, cache=init_state_cache(model, "a"), use_cache=True)
    torch.testing.assert_close(logits(model, ids, init_state="a"), via_cache, atol=ATOL, rtol=0)
    assert not torch.allclose(logits(model, ids, init_state="a"), zero)
    assert not torch.allclose(logits(model, ids, init_state="a"), logits(model, ids, init_state="b"))
    set_default_init_state(model, "b")
    assert torch.equal(logits(model, ids), logits(model, ids, init_state="b"))
    with pytest.raises(KeyError, match="'c'.*loaded: \\['a', 'b'\\]"):
        model(ids, init_state="c")


def test_generate_takes_init_state(two_states):
    model, ids = two_states, random_ids(1, 6)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    named = model.generate(ids, init_state="b", **kw)
    seeded = model.generate(ids, **cache_kwargs(init_state_cache(model, "b")), **kw)
    assert named.tolist() == seeded.tolist()
    assert named.tolist() != model.generate(ids, **kw).tolist()


def test_each_row_of_a_batch_can_use_its_own_state(two_states):
    model, ids = two_states, random_ids(3, 8)
    rows = logits(model, ids, init_state=["a", None, "b"])
    for i, name in enumerate(["a", None, "b"]):
        torch.testing.assert_close(rows[i], logits(model, ids[i : i + 1], init_state=name)[0], atol=ATOL, rtol=0)
    stacked = RwkvCache.stack([init_state_cache(model, n) for n in ("a", None, "b")])
    torch.testing.assert_close(logits(model, ids, cache=stacked, use_cache=True), rows, atol=ATOL, rtol=0)


def test_states_can_be_mixed(two_states):
    model, ids = two_states, random_ids(1, 8)
    mix_init_states(model, {"a": 0.7, "b": 0.3}, name="mix")
    expected = 0.7 * get_init_state(model, "a").wkv + 0.3 * get_init_state(model, "b").wkv
    torch.testing.assert_close(get_init_state(model, "mix").wkv, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        logits(model, ids, init_state={"a": 0.7, "b": 0.3}), logits(model, ids, init_state="mix"), atol=ATOL, rtol=0
    )


def test_a_prompt_state_becomes_a_named_initial_state(two_states):
    model = two_states
    prompt, rest = random_ids(1, 12, seed=7), random_ids(1, 5, seed=8)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).cache
    load_init_state(model, cache, name="system")
    whole = logits(model, torch.cat([prompt, rest], dim=1))[:, -rest.shape[1] :]
    torch.testing.assert_close(logits(model, rest, init_state="system"), whole, atol=ATOL, rtol=0)


def test_unload(two_states):
    model, ids = two_states, random_ids(1, 8)
    zero = logits(model, ids)
    unload_init_state(model, "a")
    assert list_init_states(model) == ["b"]
    with pytest.raises(KeyError):
        unload_init_state(model, "a")
    unload_init_state(model)
    assert model.rwkv.init_state is None and torch.equal(logits(model, ids), zero)


# ---------------------------------------------------------------------------------------------------------
# Refusals: wrong model, bad files; nothing loaded half-way
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def mounted():
    """A model with a known mounted state, to check that failed loads change nothing."""
    model = tiny_model("7")
    load_init_state(model, exact_state(model.config, seed=5))
    return model


def unchanged(model, before_names, before_wkv):
    return list_init_states(model) == before_names and torch.equal(get_init_state(model).wkv, before_wkv)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(n_layer=3), "the state has 3 layers of 4 heads x 16"),
        (dict(head_size=32), "2 heads x 32"),
        (dict(n_embd=128, head_size=32), "4 heads x 32 \\(width 128\\)"),
    ],
)
def test_a_state_for_another_model_is_refused(tmp_path, mounted, kwargs, message):
    other = model_from_state_dict(
        make_official_checkpoint("7", **{"n_layer": 2, "n_embd": 64, "head_size": 16, "vocab_size": 300, **kwargs})
    )
    load_init_state(other, exact_state(other.config))
    save_init_state(other, tmp_path / "rwkv7-g1-2.9b-20250519-ctx4096-chat.pth")
    names, wkv = list_init_states(mounted), get_init_state(mounted).wkv
    with pytest.raises(StateFileError, match=message) as err:
        load_init_state(mounted, tmp_path / "rwkv7-g1-2.9b-20250519-ctx4096-chat.pth")
    text = str(err.value)
    assert "This model is RWKV-7 with 2 layers of 4 heads x 16 (width 64" in text
    assert "Its name says RWKV-7 G1 2.9B" in text  # the official naming scheme, parsed
    assert unchanged(mounted, names, wkv)


def test_the_fingerprint_catches_a_version_mismatch_that_shapes_cannot(tmp_path, mounted):
    v6 = tiny_model("6")  # same layers, heads and head size as the tiny v7
    load_init_state(v6, exact_state(v6.config))
    save_init_state(v6, tmp_path / "tuned.safetensors")
    names, wkv = list_init_states(mounted), get_init_state(mounted).wkv
    with pytest.raises(StateFileError, match="made for RWKV-6 with 2 layers"):
        load_init_state(mounted, tmp_path / "tuned.safetensors")
    assert unchanged(mounted, names, wkv)


def test_a_file_name_naming_another_version_is_refused_unless_not_strict(tmp_path, mounted):
    v6 = tiny_model("6")
    load_init_state(v6, exact_state(v6.config))
    path = save_init_state(v6, tmp_path / "rwkv-x060-chn_single_round_qa-3B-20240505-ctx1024.state")
    with pytest.raises(StateFileError, match="name says RWKV-6"):
        load_init_state(mounted, path)
    with pytest.warns(UserWarning, match="name says RWKV-6"):
        load_init_state(mounted, path, name="forced", strict=False)
    assert "forced" in list_init_states(mounted)


def write_nan_state(path, config):
    bad = exact_state(config)
    bad["blocks.1.att.time_state"][0, 0, 0] = float("nan")
    torch.save(bad, path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "make,message",
    [
        (
            lambda p, c: torch.save(
                make_official_checkpoint("7", n_layer=2, n_embd=64, head_size=16, vocab_size=300), p
            ),
            "not an RWKV state: it has no 'blocks.N.att.time_state'.*model weights",
        ),
        (lambda p, c: torch.save([torch.zeros(3)], p), "holds a list"),
        (write_nan_state, "layer 1 contains NaN"),
        (lambda p, c: p.write_bytes(b"\x80\x04garbage that is not a pickle"), "Could not read .* as a PyTorch .pth"),
        (lambda p, c: p.write_bytes(b""), "empty"),
    ],
    ids=["model-weights", "not-a-dict", "nan", "garbage", "empty"],
)
def test_bad_pth_files_are_refused_and_nothing_changes(tmp_path, mounted, make, message):
    path = tmp_path / "bad.pth"
    make(path, mounted.config)
    names, wkv = list_init_states(mounted), get_init_state(mounted).wkv
    with pytest.raises(StateFileError, match=message):
        load_init_state(mounted, path, name="bad")
    assert unchanged(mounted, names, wkv)


def test_corrupted_safetensors_is_refused_and_nothing_changes(tmp_path, mounted):
    save_init_state(mounted, tmp_path / "good.state")
    data = (tmp_path / "good.state").read_bytes()
    (tmp_path / "truncated.state").write_bytes(data[: len(data) // 2])
    (tmp_path / "header.state").write_bytes(data[:8] + b"{not json" + data[17:])
    names, wkv = list_init_states(mounted), get_init_state(mounted).wkv
    for name in ("truncated.state", "header.state"):
        with pytest.raises(StateFileError, match="corrupted or truncated"):
            load_init_state(mounted, tmp_path / name, name="bad")
    assert unchanged(mounted, names, wkv)


def test_rwkv4_is_refused_clearly():
    model = tiny_model("4")
    with pytest.raises(ValueError, match="RWKV-4 has no matrix-valued WKV state"):
        load_init_state(model, {"blocks.0.att.time_state": torch.zeros(1, 4, 4)})


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        read_state_file("/nonexistent/state.pth")


# ---------------------------------------------------------------------------------------------------------
# The official naming scheme
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,expected",
    [
        (
            "rwkv7-g1-2.9b-20250519-ctx4096-chat.pth",
            dict(version="7", family="G1", size="2.9B", date="20250519", ctx="4096", purpose="chat"),
        ),
        (
            "rwkv6-world-v3-7b-chn_文言文QA-20241114-ctx2048.pth",
            dict(
                version="6",
                family="World",
                data_version="3",
                size="7B",
                purpose="chn_文言文QA",
                date="20241114",
                ctx="2048",
            ),
        ),
        (
            "rwkv-x060-OnlyForChnNovel_小说扩写-14B-20240806-ctx4096.pth",
            dict(version="6", purpose="OnlyForChnNovel_小说扩写", size="14B", date="20240806", ctx="4096"),
        ),
        (
            "RWKV-6-World-3B-v2.1-chn_文言文QA",
            dict(version="6", family="World", size="3B", data_version="2.1", purpose="chn_文言文QA"),
        ),
        (
            "RWKV-x070-World-1.5B-v3-20250127-ctx4096.state",
            dict(version="7", family="World", size="1.5B", data_version="3", date="20250127", ctx="4096"),
        ),
        ("rwkv-x052-1b5-test.pth", dict(version="5.2", size="1.5B", purpose="test")),
        ("my_state.pth", {}),
    ],
)
def test_parse_state_name(name, expected):
    assert parse_state_name(name) == expected
