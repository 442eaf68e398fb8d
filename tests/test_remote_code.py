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

from model_factory import model_from_state_dict, random_ids
from rwkv_checkpoints import make_official_checkpoint
from rwkv_hf import convert_rwkv_checkpoint


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


@pytest.mark.parametrize("version", ["4", "7"])
def test_trust_remote_code_without_the_package_gives_the_same_logits(tmp_path, fresh_python, version):
    sd = make_official_checkpoint(version, n_layer=2, n_embd=64, head_size=16, vocab_size=300, seed=3)
    convert_rwkv_checkpoint(sd, tmp_path / "model", progress=False)
    ids = random_ids(1, 10)
    with torch.no_grad():
        expected = model_from_state_dict(sd)(ids).logits[0].tolist()
        greedy = model_from_state_dict(sd).generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)[0].tolist()
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        try:
            import rwkv_hf
            sys.exit("rwkv_hf must not be importable here")
        except ImportError:
            pass
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            logits = model(ids).logits[0].tolist()
            greedy = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)[0].tolist()
        print(json.dumps({{"module": type(model).__module__, "logits": logits, "greedy": greedy}}))
        """
    )
    # cwd elsewhere: the project folder on sys.path would make rwkv_hf importable again
    result = subprocess.run([fresh_python, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["module"].startswith("transformers_modules.")
    torch.testing.assert_close(torch.tensor(out["logits"]), torch.tensor(expected), atol=1e-6, rtol=0)
    assert out["greedy"] == greedy
