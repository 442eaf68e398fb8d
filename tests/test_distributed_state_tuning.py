"""Two-process DDP on CPU (gloo) state tuning gives the state one process gives.

Launched as ``accelerate launch --multi_gpu --num_processes 2``: torchrun under the hood, and the script's
``Accelerator(cpu=True)`` makes it MULTI_CPU over gloo. (``accelerate launch --cpu --num_processes 2`` would
start a single process: accelerate's own multi-CPU mode needs mpirun.)

The reference runs the same function of ``scripts/state_tuning_accelerate.py`` in this process, without
accelerate. DDP averages two per-process gradients where one process averages all rows at once, so the
gradients differ by fp32 rounding only (~1e-7 relative). Adam divides by sqrt(v) + 1e-8, which amplifies that
for the few elements whose gradient is tiny: typically all elements agree within 1e-6 and a handful within
1e-4 relative to states of size ~1-10. A process that trained on its half alone would be off by ~0.1-1.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from rwkv_hf.state_rwkv_hf import get_init_state, load_init_state  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "state_tuning_accelerate.py"
STEPS, GLOBAL_BATCH = 6, 8


def load_script():
    spec = importlib.util.spec_from_file_location("state_tuning_accelerate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_cpu_processes_train_the_same_state_as_one(tmp_path):
    out = tmp_path / "ddp.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(SCRIPT),
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--global-batch",
        str(GLOBAL_BATCH),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    assert "2 process(es)" in result.stdout

    script = load_script()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = script.train_state(script.random_model(), script.synthetic_data(64), STEPS, GLOBAL_BATCH)
    finally:
        torch.set_num_threads(threads)
    expected = get_init_state(single).wkv

    model = script.random_model()
    load_init_state(model, out)
    ddp = get_init_state(model).wkv
    assert expected.abs().max() > 1.0  # it trained (lr 1.0 moves a zero state by ~1 per step)
    torch.testing.assert_close(ddp, expected, atol=1e-4, rtol=1e-4)
    assert (ddp - expected).abs().median() < 1e-6
