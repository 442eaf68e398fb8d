"""A converted folder works with trust_remote_code in a fresh virtualenv that does not have rwkv_hf."""

from __future__ import annotations

import json
import subprocess
import sys
import site
import textwrap
import venv

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from rwkv_hf import convert_rwkv_checkpoint

LOGITS_ATOL = 1e-4  # against the official package (test_parity's budget)


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory):
    """A new venv that sees torch and transformers but not rwkv_hf.

    It reuses this interpreter's site-packages through a plain path line in a .pth file: a path added that way
    is not itself scanned for .pth files, so the editable-install hook of rwkv_hf never runs there.
    """
    root = tmp_path_factory.mktemp("fresh_venv")
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    target = subprocess.check_output([python, "-c", "import site; print(site.getsitepackages()[0])"], text=True).strip()
    paths = [p for p in site.getsitepackages() if "site-packages" in p]
    with open(f"{target}/parent_site.pth", "w") as f:
        f.write("\n".join(paths) + "\n")
    probe = subprocess.run([python, "-c", "import rwkv_hf"], capture_output=True, text=True, cwd=root)
    if probe.returncode == 0:
        pytest.skip("rwkv_hf is importable without the editable hook (non-editable install): cannot isolate it")
    return python


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    try:
        import rwkv_hf
        sys.exit("rwkv_hf must not be importable here")
    except ImportError:
        pass
    import transformers
    from transformers import AutoModelForCausalLM
    folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ids).logits[0].tolist()
        # random ids hold the pad id 0: an explicit mask, else generate reads those as padding holes
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0].tolist()
        # the same six tokens by hand, carrying the state through the outputs' `cache`
        out, loop = model(ids, use_cache=True), ids
        for _ in range(6):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            loop = torch.cat([loop, token], 1)
            out = model(token, cache=out.cache, use_cache=True)
    print(json.dumps({"module": type(model).__module__, "transformers": transformers.__version__,
                      "logits": logits, "greedy": greedy, "loop": loop[0].tolist()}))
    """
)


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_trust_remote_code_without_the_package_gives_the_official_logits(tmp_path, fresh_python, official_case, version):
    case = official_case(version)
    convert_rwkv_checkpoint(case.ckpt_path, tmp_path / "model", progress=False)
    ids = case.tokens[None]
    # cwd elsewhere: the project folder on sys.path would make rwkv_hf importable again
    result = subprocess.run(
        [fresh_python, "-c", REMOTE_SCRIPT, str(tmp_path / "model"), json.dumps(ids.tolist())],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["module"].startswith("transformers_modules.")
    assert out["transformers"] == transformers.__version__
    torch.testing.assert_close(torch.tensor(out["logits"]), case.oracle["logits_full"], atol=LOGITS_ATOL, rtol=0)
    assert out["greedy"] == out["loop"]
    with torch.no_grad():  # and the installed package generates the same
        installed = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
        greedy = installed.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        assert greedy[0].tolist() == out["greedy"]


def test_a_model_saved_after_import_carries_its_code(tmp_path, fresh_python):
    """save_pretrained of a model built here (not converted) must load where rwkv_hf is not installed."""
    from model_factory import random_ids, tiny_model

    model = tiny_model("6")
    model.save_pretrained(tmp_path / "saved")
    for name in ("configuration_rwkv_hf.py", "modeling_rwkv_hf.py", "compat_rwkv_hf.py"):
        assert (tmp_path / "saved" / name).is_file(), name
    ids = random_ids(1, 8)
    result = subprocess.run(
        [fresh_python, "-c", REMOTE_SCRIPT, str(tmp_path / "saved"), json.dumps(ids.tolist())],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(out["logits"]), model(ids).logits[0], atol=1e-5, rtol=0)
    assert out["greedy"] == out["loop"]


# ---------------------------------------------------------------------------------------------------------
# The architecture name: tools that resolve the class by name must land on this model, never on transformers'
# built-in RWKV-4 "RwkvForCausalLM" (which loaded these folders with random weights, silently)
# ---------------------------------------------------------------------------------------------------------

BY_NAME_SCRIPT = textwrap.dedent(
    """
    import json, sys, transformers
    from transformers import AutoConfig
    name = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True).architectures[0]
    try:
        cls = getattr(transformers, name)
        print(json.dumps({"name": name, "resolved": cls.__module__}))
    except AttributeError as e:
        print(json.dumps({"name": name, "error": str(e)}))
    """
)


def test_tools_that_resolve_the_architecture_name_get_this_model(tmp_path, fresh_python):
    """TRL's SFTTrainer(model=folder) and `transformers serve` load getattr(transformers, architectures[0])."""
    import transformers
    from model_factory import random_ids, tiny_model

    from rwkv_hf import RwkvForCausalLM

    model = tiny_model("7").eval()
    model.save_pretrained(tmp_path / "saved")
    name = json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"][0]
    assert name == "RwkvHfForCausalLM" and name != transformers.RwkvForCausalLM.__name__
    # with rwkv_hf imported, the name resolves to this model, which loads the folder's weights
    loaded = getattr(transformers, name).from_pretrained(tmp_path / "saved").eval()
    assert isinstance(loaded, RwkvForCausalLM)
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    # without it, the lookup fails loudly instead of giving transformers' RWKV-4 with random weights
    result = subprocess.run([fresh_python, "-c", BY_NAME_SCRIPT, str(tmp_path / "saved")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["name"] == "RwkvHfForCausalLM" and "resolved" not in out, out


def test_a_folder_naming_the_old_architecture_is_renamed_on_load(tmp_path):
    from model_factory import tiny_model

    tiny_model("6").save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["RwkvForCausalLM"]  # as rwkv_hf 0.2.0 wrote it
    config["auto_map"]["AutoModelForCausalLM"] = "modeling_rwkv_hf.RwkvForCausalLM"
    config_path.write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "old")
    assert model.config.architectures == ["RwkvHfForCausalLM"]
    model.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["architectures"] == ["RwkvHfForCausalLM"]
