"""The converter under attack: interrupted runs, hostile destinations, memory bombs and bad values.

Each test names what it proves. Every refusal must be a clear error (a CheckpointError or the right builtin
error) naming what was found and what was expected, raised before the destination changes.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

import rwkv_hf  # noqa: F401 - registers the Auto classes
import rwkv_hf.convert_rwkv_hf as convert_module
from rwkv_checkpoints import make_official_checkpoint, save_official_checkpoint
from rwkv_hf import RwkvForCausalLM, convert_rwkv_checkpoint
from rwkv_hf.cli import main as cli_main
from rwkv_hf.convert_rwkv_hf import INIT_STATE_FILE, CheckpointError


def small(version, **kwargs):
    kwargs = {"n_layer": 2, "n_embd": 64, "head_size": 16, "vocab_size": 300, **kwargs}
    return make_official_checkpoint(version, **kwargs)


def convert(checkpoint, out, **kwargs):
    return convert_rwkv_checkpoint(checkpoint, out, progress=False, **kwargs)


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder``: file bytes, symlink targets, folders (symlinks are not followed)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", path.read_bytes())
    return out


def forbid_loading(monkeypatch):
    """Make reading the checkpoint fail loudly: the test proves the refusal came before any work."""

    def fail(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the arguments were checked")

    monkeypatch.setattr(convert_module, "load_official_checkpoint", fail)
    monkeypatch.setattr(convert_module, "validate_tensor_dict", fail)


# --- 1. atomic conversion ----------------------------------------------------------------------------------


def interrupt_after_the_weights(monkeypatch, seen):
    """Ctrl-C while the init state is written: the weights and config are already on disk (in the staging folder)."""

    def interrupt(init_states, config, path):
        seen.append(sorted(os.listdir(Path(path).parent)))
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "save_merged_init_state", interrupt)


def test_interrupted_conversion_leaves_the_destination_untouched(tmp_path, monkeypatch):
    seen = []
    interrupt_after_the_weights(monkeypatch, seen)
    with pytest.raises(KeyboardInterrupt):
        convert(small("7", time_state=True), tmp_path / "out")
    assert "model.safetensors" in seen[0] and "config.json" in seen[0]  # the interrupt did come mid-write
    assert os.listdir(tmp_path) == []  # no folder that loads without its state, no hidden staging sibling


def test_interrupted_overwrite_keeps_the_previous_conversion(tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(small("7", time_state=True, seed=1), out)
    before = snapshot(out)
    interrupt_after_the_weights(monkeypatch, [])
    with pytest.raises(KeyboardInterrupt):
        convert(small("7", time_state=True, seed=2), out, overwrite=True)
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == ["out"]


def moves_touching(folder: Path, monkeypatch, on_call: int, action):
    """Wrap os.replace: run ``action`` at the ``on_call``-th rename into or out of ``folder``."""
    real_replace, calls = os.replace, []

    def replace(src, dst, **kwargs):
        if folder in (Path(src).parent, Path(dst).parent):
            calls.append(dst)
            if len(calls) == on_call:
                action()
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("on_call", [2, 20], ids=["while-moving-old-files-aside", "while-moving-new-files-in"])
def test_a_failure_during_the_final_moves_puts_every_file_back(tmp_path, monkeypatch, on_call):
    out = tmp_path / "out"
    convert(small("7", time_state=True, seed=1), out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)

    def interrupt():
        raise KeyboardInterrupt

    moves_touching(out, monkeypatch, on_call, interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(small("4"), out, overwrite=True)
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == ["out"]


def test_ctrl_c_during_the_final_moves_waits_until_the_folder_is_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(small("7", time_state=True), out)
    moves_touching(out, monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):  # delivered once the folder is whole
        convert(small("4"), out, overwrite=True)
    assert AutoConfig.from_pretrained(out).rwkv_version == "4"
    assert not (out / INIT_STATE_FILE).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_bad_arguments_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    pth = save_official_checkpoint(small("4"), tmp_path / "m.pth")
    forbid_loading(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"Unknown tokenizer 'bogus': expected auto, world, 20b or none"):
        convert(pth, out, tokenizer="bogus")
    for dtype in ("int8", torch.int8, torch.float64):
        with pytest.raises(ValueError, match=r"Unknown dtype .*: expected float32, bfloat16 or float16"):
            convert(pth, out, dtype=dtype)
    assert cli_main(["convert", str(pth), str(out), "--tokenizer", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "Unknown tokenizer 'bogus'" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["m.pth"]


def test_a_tokenizer_with_more_ids_than_the_embedding_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"world tokenizer has \d+ tokens but the model's embedding has 300 rows"):
        convert(small("7"), tmp_path / "out", tokenizer="world")
    assert os.listdir(tmp_path) == []


def test_a_failed_conversion_removes_the_parent_folders_it_created(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(CheckpointError):
        convert({"emb.weight": torch.zeros(3)}, tmp_path / "a" / "b" / "c" / "out")
    assert snapshot(tmp_path) == {"a": ("dir",)}  # b and c were made for the staging folder, and went with it


def test_a_new_output_folder_gets_the_usual_permissions(tmp_path):
    convert(small("4"), tmp_path / "out")  # it was the staging folder: made with mkdir, not mkdtemp's 0o700
    (tmp_path / "plain").mkdir()
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


# --- 2. overwrite: only our files, never through a symlink --------------------------------------------------


def test_overwrite_removes_the_init_state_a_previous_conversion_wrote(tmp_path):
    out = tmp_path / "out"
    convert(small("7", time_state=True), out)
    assert (out / INIT_STATE_FILE).is_file()
    convert(small("7", seed=1), out, overwrite=True)
    assert not (out / INIT_STATE_FILE).exists()  # else the new model would silently start from the old state
    assert getattr(AutoModelForCausalLM.from_pretrained(out).rwkv, "init_state", None) is None


@pytest.mark.parametrize("converted_before", [True, False], ids=["converted-folder", "foreign-folder"])
def test_overwrite_refuses_to_leave_a_state_it_did_not_write_beside_new_weights(tmp_path, converted_before):
    out = tmp_path / "out"
    if converted_before:
        convert(small("7"), out)
    else:
        out.mkdir()
    # what save_pretrained of a state-tuned model writes: our format, with the state's "source"
    state = {f"blocks.{i}.att.time_state": torch.zeros(4, 16, 16) for i in range(2)}
    save_file(state, str(out / INIT_STATE_FILE), metadata={"format": "rwkv_hf.init_state", "source": "tuned.pth"})
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=r"init_state.safetensors: from_pretrained would mount it as the new model's default initial state"):
        convert(small("7", seed=1), out, overwrite=True)
    assert snapshot(out) == before
    convert(small("7", time_state=True, seed=1), out, overwrite=True)  # a conversion that writes its own replaces it
    assert (out / INIT_STATE_FILE).is_file()


def test_overwrite_keeps_files_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    mine = {
        "notes.txt": b"mine",
        "model-00001-of-00002.safetensors": b"my shard",  # transformers' save_pretrained deletes these
        "model-00002-of-00002.safetensors": b"my other shard",
        "sub/inner.txt": b"mine too",
    }
    for name, data in mine.items():
        (out / name).write_bytes(data)
    convert(small("4"), out, overwrite=True)
    convert(small("4", seed=1), out, overwrite=True)  # over our own conversion too
    for name, data in mine.items():
        assert (out / name).read_bytes() == data, name
    assert AutoConfig.from_pretrained(out).rwkv_version == "4"


def test_overwrite_removes_the_shards_a_previous_sharded_conversion_wrote(tmp_path):
    out = tmp_path / "out"
    convert(small("4"), out)
    model = RwkvForCausalLM.from_pretrained(out)
    (out / "model.safetensors").unlink()
    model.save_pretrained(out, max_shard_size="100KB")  # its config keeps converted_from: a converted folder
    shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1
    users_shard = out / "model-00099-of-00099.safetensors"  # not listed in the index: the user's
    save_file({"mine": torch.ones(3)}, str(users_shard))
    users_bytes = users_shard.read_bytes()

    convert(small("4", seed=1), out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert not any((out / name).exists() for name in shards)
    assert users_shard.read_bytes() == users_bytes
    AutoModelForCausalLM.from_pretrained(out)


def test_overwrite_never_follows_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "folder" / "file").write_text("precious")
    for name in ("config.json", "model.safetensors", INIT_STATE_FILE):
        (outside / name).write_text(f"precious {name}")
    out = tmp_path / "out"
    convert(small("4"), out)
    for name in ("config.json", "model.safetensors", INIT_STATE_FILE):
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(outside / name)
    (out / "generation_config.json").unlink()
    (out / "generation_config.json").symlink_to(outside / "folder")  # a link to a folder, named like our file
    before = snapshot(outside)

    convert(small("7", time_state=True), out, overwrite=True)
    assert snapshot(outside) == before
    for name in ("config.json", "model.safetensors", INIT_STATE_FILE, "generation_config.json"):
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert AutoConfig.from_pretrained(out).rwkv_version == "7"


@pytest.mark.parametrize("kind", ["file", "symlink-to-file", "broken-symlink", "below-a-file"])
def test_a_destination_that_is_not_a_folder_is_refused_before_any_work(tmp_path, monkeypatch, kind):
    forbid_loading(monkeypatch)
    (tmp_path / "file").write_text("mine")
    out = {
        "file": tmp_path / "file",
        "symlink-to-file": tmp_path / "link",
        "broken-symlink": tmp_path / "dangling",
        "below-a-file": tmp_path / "file" / "out",
    }[kind]
    if kind == "symlink-to-file":
        out.symlink_to(tmp_path / "file")
    if kind == "broken-symlink":
        out.symlink_to(tmp_path / "nowhere")
    before = snapshot(tmp_path)
    expected = "is a file, so no folder can be created inside it" if kind == "below-a-file" else "expected a folder to convert into"
    with pytest.raises(NotADirectoryError, match=expected):
        convert(tmp_path / "m.pth", out, overwrite=True)
    assert snapshot(tmp_path) == before


def test_an_unwritable_destination_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    pth = save_official_checkpoint(small("4"), tmp_path / "m.pth")
    existing, locked_parent = tmp_path / "existing", tmp_path / "locked"
    existing.mkdir()
    locked_parent.mkdir()
    # root ignores permission bits, so os.access is told the truth the bits would tell anyone else
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) not in (existing, locked_parent) and real_access(p, mode, **kw))
    forbid_loading(monkeypatch)
    existing.chmod(0o555)
    locked_parent.chmod(0o555)
    try:
        for out in (existing, locked_parent / "out"):
            with pytest.raises(PermissionError, match=r"Cannot write to .*: it is read-only or not yours; expected a writable folder"):
                convert(pth, out, overwrite=True)
        assert cli_main(["convert", str(pth), str(existing), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "Cannot write to" in err and "Traceback" not in err
    finally:
        existing.chmod(0o755)
        locked_parent.chmod(0o755)
    assert os.listdir(existing) == [] and os.listdir(locked_parent) == []


def test_a_folder_named_like_an_output_file_is_left_alone(tmp_path):
    out = tmp_path / "out"
    (out / "config.json").mkdir(parents=True)
    (out / "config.json" / "mine.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(IsADirectoryError, match=r"folders named like files the conversion writes: \['config.json'\]"):
        convert(small("4"), out, overwrite=True)
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == ["out"]


# --- 3. bounded work on hostile files ------------------------------------------------------------------------


def refusal_cost(path, out):
    """(the error, seconds, peak Python memory) of converting ``path``."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointError) as info:
            convert(path, out)
        return info.value, time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_huge_block_index_is_refused_quickly_and_briefly(tmp_path):
    sd = small("4")
    sd["blocks.2000000000.ln1.weight"] = torch.zeros(64)
    pth = save_official_checkpoint(sd, tmp_path / "m.pth")
    err, seconds, peak = refusal_cost(pth, tmp_path / "out")
    message = str(err)
    assert "2000000000" in message and "expected blocks 0..2 without gaps" in message
    assert len(message) < 600 and seconds < 10 and peak < 2 * pth.stat().st_size

    lone = save_official_checkpoint({"blocks.2000000000.ln1.weight": torch.zeros(4)}, tmp_path / "lone.pth")
    err, seconds, peak = refusal_cost(lone, tmp_path / "out")
    assert len(str(err)) < 600 and seconds < 10 and peak < 1_000_000
    assert not (tmp_path / "out").exists()


def test_many_missing_blocks_give_a_short_message(tmp_path):
    sd = small("4")
    sd.update({k.replace("blocks.1.", "blocks.200000."): v for k, v in sd.items() if k.startswith("blocks.1.")})
    with pytest.raises(CheckpointError) as info:
        convert(sd, tmp_path / "out")
    message = str(info.value)
    assert message.startswith("Blocks [2, 3, 4, 5, 6, 7, 8, 9, ... 199990 more] are missing")
    assert len(message) < 600


def test_key_lists_in_errors_are_bounded(tmp_path):
    sd = small("6")
    for i in range(5000):
        sd[f"blocks.0.att.extra_{i}_" + "x" * 500] = torch.zeros(1)
    del sd["blocks.1.att.key.weight"], sd["blocks.1.att.value.weight"]
    with pytest.raises(CheckpointError) as info:
        convert(sd, tmp_path / "out")
    message = str(info.value)
    assert "Missing keys (2): ['blocks.1.att.key.weight', 'blocks.1.att.value.weight']" in message
    assert "Unexpected keys (5000)" in message and "4992 more" in message
    assert len(message) < 1500


def test_a_tensor_claiming_more_data_than_the_file_holds_is_refused(tmp_path):
    sd = small("4")
    sd["emb.weight"] = torch.zeros(1).expand(20000, 5000)  # stored as one float; 400 MB once written out
    pth = save_official_checkpoint(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"its tensors claim \d+ bytes in all, more than the file's \d+ bytes"):
        convert(pth, tmp_path / "out")


def test_a_compressed_archive_is_refused_before_unpacking(tmp_path):
    pth = save_official_checkpoint(small("4"), tmp_path / "m.pth")
    with zipfile.ZipFile(pth) as src, zipfile.ZipFile(tmp_path / "zipped.pth", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(CheckpointError, match=r"has compressed records .*; expected the uncompressed records torch.save writes"):
        convert(tmp_path / "zipped.pth", tmp_path / "out")


# --- 4. values and types ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path, bad):
    sd = small("6")
    sd["blocks.1.att.key.weight"][3, 5] = bad
    with pytest.raises(CheckpointError, match=r"blocks\.1\.att\.key\.weight contains NaN or Inf values; expected finite weights"):
        convert(sd, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_a_value_that_overflows_float16_is_refused_naming_the_tensor(tmp_path):
    sd = small("4")
    sd["blocks.0.ffn.value.weight"][0, 0] = 1e6  # fine in float32 and bfloat16, Inf in float16
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.value\.weight does not fit in torch\.float16"):
        convert(sd, tmp_path / "fp16", dtype="float16")
    convert(sd, tmp_path / "bf16", dtype="bfloat16")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_a_tensor_that_is_not_a_float_weight_is_refused_naming_key_and_dtype(tmp_path, dtype):
    sd = small("7")
    sd["blocks.1.att.w0"] = sd["blocks.1.att.w0"].to(dtype)
    pth = save_official_checkpoint(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=rf"blocks\.1\.att\.w0 has dtype {dtype}; expected a floating-point dtype"):
        convert(pth, tmp_path / "out")


def test_a_tuned_state_that_is_not_floating_point_is_refused(tmp_path):
    sd = small("7", time_state=True)
    sd["blocks.0.att.time_state"] = sd["blocks.0.att.time_state"].to(torch.int32)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.att\.time_state has dtype torch\.int32"):
        convert(sd, tmp_path / "out")


def test_a_non_string_key_is_refused(tmp_path):
    sd = dict(small("4"))
    sd[7] = torch.zeros(2)
    pth = tmp_path / "m.pth"
    torch.save(sd, pth)
    with pytest.raises(CheckpointError, match=r"has 1 keys that are not strings: \[7\]; expected parameter names"):
        convert(pth, tmp_path / "out")


@pytest.mark.parametrize(
    "key,shape,expected",
    [
        ("emb.weight", (300 * 64,), r"emb\.weight has shape \(19200,\); expected 2 non-zero dimensions \[vocab_size, hidden_size\]"),
        ("blocks.0.att.key.weight", (0, 64), r"blocks\.0\.att\.key\.weight has shape \(0, 64\); expected 2 non-zero dimensions"),
        ("blocks.0.att.r_k", (64,), r"blocks\.0\.att\.r_k has shape \(64,\); expected 2 non-zero dimensions \[heads, head_size\]"),
    ],
)
def test_a_size_tensor_of_the_wrong_rank_is_refused(tmp_path, key, shape, expected):
    sd = small("7")
    sd[key] = torch.zeros(shape)
    with pytest.raises(CheckpointError, match=expected):
        convert(sd, tmp_path / "out")


def test_a_sparse_tensor_is_refused(tmp_path):
    sd = small("4")
    sd["ln_out.weight"] = sd["ln_out.weight"].to_sparse()
    with pytest.raises(CheckpointError, match=r"ln_out\.weight is a torch\.sparse_coo tensor; expected a dense"):
        convert(sd, tmp_path / "out")


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda sd: sd["blocks.1.att.time_state"].view(-1).__setitem__(0, float("nan")), r"blocks\.1\.att\.time_state contains NaN or Inf"),
        (lambda sd: sd.pop("blocks.1.att.time_state"), r"Missing \(1\): \['blocks\.1\.att\.time_state'\]"),
        (lambda sd: sd.__setitem__("blocks.5.att.time_state", torch.zeros(4, 16, 16)), r"Unexpected \(1\): \['blocks\.5\.att\.time_state'\]"),
    ],
    ids=["nan", "missing-layer", "extra-layer"],
)
def test_a_broken_tuned_state_is_refused_before_anything_is_written(tmp_path, change, expected):
    sd = small("7", time_state=True)
    change(sd)
    with pytest.raises(CheckpointError, match=expected):
        convert(sd, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_the_cli_reports_each_bad_file_in_a_short_line(tmp_path, capsys):
    sd = small("4")
    sd["blocks.1.ln1.weight"][0] = float("nan")
    files = {
        "nan.pth": sd,
        "key.pth": {**small("4"), 3: torch.zeros(1)},
        "index.pth": {**small("4"), "blocks.2000000000.ln1.weight": torch.zeros(64)},
    }
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        assert cli_main(["convert", str(tmp_path / name), str(tmp_path / "out")]) == 2, name
        err = capsys.readouterr().err
        last = err.splitlines()[-1]  # after the progress bar
        assert last.startswith("rwkv-hf convert: error: ") and len(last) < 800 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
