#!/usr/bin/env python
"""State tuning with accelerate (DDP): the same trained state on any number of processes.

    accelerate launch --multi_gpu --num_processes 2 scripts/state_tuning_accelerate.py --out tuned.safetensors
    torchrun --nproc_per_node 2 scripts/state_tuning_accelerate.py --out tuned.safetensors   # the same
    python scripts/state_tuning_accelerate.py --out tuned.safetensors                        # one process, same result

On a machine without GPUs the script asks accelerate for the CPU, so both launchers give DDP over gloo.
(``accelerate launch --cpu --num_processes 2`` starts a *single* process in accelerate 1.x: its multi-CPU mode
goes through ``mpirun --mpirun_hostfile``.)

Without ``--model`` the script builds a small random RWKV-7 (deterministic, no download) and tunes its
initial state on a synthetic task (random prompts, then a fixed token pattern). With ``--model`` it loads a
converted folder and ``--data`` (a JSON list of ``{"input_ids": [...], "labels": [...]}`` of equal lengths).

Equivalence with one process: every step takes the *same* ``--global-batch`` rows and gives each process a
contiguous slice; DDP averages the per-process mean losses' gradients, which equals the gradient of the
global mean when every row counts the same number of label tokens (true here: fixed-length rows). The LR
scheduler is stepped once per optimizer step on every process (not passed to ``accelerator.prepare``, whose
wrapper steps it once per process when batches are not split).

For models that do not fit one device, see docs/state_tuning.md (FSDP / DeepSpeed).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from rwkv_hf import RwkvConfig, RwkvForCausalLM
from rwkv_hf.state_rwkv_hf import create_state_optimizer, save_init_state

PATTERN = [7, 8, 9, 10, 11, 12]


def random_model(seed: int = 0) -> RwkvForCausalLM:
    """A tiny RWKV-7 whose outputs depend on its state (RWKV-LM zero-inits the output projections)."""
    torch.manual_seed(seed)
    config = RwkvConfig(rwkv_version="7", vocab_size=300, hidden_size=64, num_hidden_layers=2, head_size=16)
    model = RwkvForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                torch.nn.init.normal_(p, std=0.5 / math.sqrt(p.shape[-1]))
    return model


def synthetic_data(rows: int, prompt_len: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(20, 300, (rows, prompt_len), generator=g)
    ids = torch.cat([prompts, torch.tensor(PATTERN).expand(rows, -1)], dim=1)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return [{"input_ids": i.tolist(), "labels": lab.tolist()} for i, lab in zip(ids, labels)]


def train_state(model, data: list[dict], steps: int, global_batch: int, accelerator=None, lr: float = 1.0):
    """Tune the initial state with PEFT; returns the (unwrapped) PEFT model. ``accelerator=None``: one process."""
    from peft import get_peft_model

    from rwkv_hf.peft_rwkv_hf import StateTuningConfig, register_state_tuning

    register_state_tuning()
    model = get_peft_model(model, StateTuningConfig())
    optimizer, scheduler = create_state_optimizer(model, num_training_steps=steps, lr=lr, final_lr=lr / 100)
    world, rank = 1, 0
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
        world, rank = accelerator.num_processes, accelerator.process_index
    if global_batch % world:
        raise ValueError(f"--global-batch {global_batch} is not divisible by {world} processes")
    per_process = global_batch // world
    model.train()
    for step in range(steps):
        start = (step * global_batch) % len(data) + rank * per_process
        rows = [data[(start + j) % len(data)] for j in range(per_process)]
        ids = torch.tensor([r["input_ids"] for r in rows])
        labels = torch.tensor([r["labels"] for r in rows])
        loss = model(ids, labels=labels).loss
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    model = accelerator.unwrap_model(model) if accelerator is not None else model
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the state (.safetensors, .state or .pth)")
    parser.add_argument("--model", help="a converted rwkv_hf folder (default: a tiny random RWKV-7)")
    parser.add_argument("--data", help="JSON list of {input_ids, labels} rows of equal length (default: synthetic)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1.0)
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # under torchrun: MULTI_CPU with gloo
    model = RwkvForCausalLM.from_pretrained(args.model) if args.model else random_model()
    data = json.loads(Path(args.data).read_text()) if args.data else synthetic_data(64)
    tuned = train_state(model, data, args.steps, args.global_batch, accelerator, lr=args.lr)
    if accelerator.is_main_process:
        save_init_state(tuned, args.out)
        print(f"{accelerator.num_processes} process(es): state written to {args.out}")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
