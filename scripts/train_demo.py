#!/usr/bin/env python
"""Train the tiny RWKV-7 demo model that ships in ``demo/rwkv7-demo.pth``, from scratch, on CPU, offline.

    python scripts/train_demo.py                 # the shipped model (about 10 minutes on one CPU core)
    python scripts/train_demo.py --quick --out out/demo-quick   # a 2-layer, width-32 model (under 2 minutes)

The data are synthetic chat conversations generated here from a fixed seed (``rwkv_hf.demo``: capitals, sums,
unit conversions, spelling, days/months, number comparison, repeating and reversing word lists, follow-up
questions), in RWKV's chat format ``User: ...\n\nAssistant: ...\n\n``. The model is this package's
``RwkvForCausalLM(RwkvConfig(rwkv_version="7", ...))`` with RWKV-LM's initialisation, trained with AdamW on the
causal-LM loss of the assistant's answers only (``labels`` = -100 elsewhere).

The cost of a tiny model on CPU is the 65536-way softmax of the World vocabulary. Only a few hundred tokens ever
occur in the answers, so the head rows of every other token start out *equal* (one shared row); under the full
softmax they then receive identical gradients and stay equal, so training them as one shared row is the same
computation, exactly: the loss is ``log(sum_used exp(z) + N_other * exp(z_other))``, the shared row's gradient is
one row's gradient, and gradient clipping counts it ``N_other`` times. At step 0 the script checks that this loss
equals ``model(input_ids, labels=labels).loss`` of the full model; ``--full-softmax`` trains with the plain
65536-row head instead (the same losses, about 4x slower). Export writes the shared row back into every
unused row, and all reported losses of the shipped model are computed with the full head.

Written to ``--out``: ``rwkv7-demo.pth`` (official RWKV-LM layout, bf16; convert it with ``rwkv-hf convert``) and
``train_log.json`` (arguments, config, versions, wall time, tokens seen, the training-loss curve, the held-out loss,
and the greedy accuracy per task of the *shipped* bf16 checkpoint after conversion, with sample answers).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import rwkv_hf  # noqa: E402
from rwkv_hf import demo  # noqa: E402
from rwkv_hf import RwkvConfig, RwkvForCausalLM  # noqa: E402
from rwkv_hf.convert_rwkv_hf import convert_rwkv_checkpoint, export_official_state_dict  # noqa: E402
from rwkv_hf.demo import (  # noqa: E402
    DEMO_CHECKPOINT_NAME,
    DEMO_SEED,
    TASKS,
    encode_conversation,
    evaluate,
    make_split,
    sample_conversation,
)
from rwkv_hf.tokenization_rwkv_hf import RwkvWorldTokenizer  # noqa: E402

FULL = dict(hidden_size=64, layers=6, head_size=32, steps=2400, batch_size=32, lr=2e-3, warmup=100)
QUICK = dict(hidden_size=32, layers=2, head_size=16, steps=1500, batch_size=16, lr=3e-3, warmup=20, eval_per_task=5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small model and a short run (smoke test; about a minute)")
    p.add_argument("--out", default=None, help="output folder (default: demo/; --quick requires another folder)")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help="seed of the data, the split and the initialisation")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="conversations per step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (linear warm-up, cosine decay to 10%%)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--head-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine two threads spend most of their time "
                   "waiting for each other in OpenMP barriers; results differ slightly with the thread count)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=400, help="held-out loss every N steps (0: only at the end)")
    p.add_argument("--accuracy-every", type=int, default=800,
                   help="also greedy accuracy on 8 held-out prompts per task every N steps (0: only at the end)")
    p.add_argument("--eval-per-task", type=int, default=None, help="held-out prompts per task for the final accuracy (default: all)")
    p.add_argument("--full-softmax", action="store_true", help="train with the plain 65536-row head (slow; see above)")
    p.add_argument("--no-check-loss", dest="check_loss", action="store_false",
                   help="skip checking at step 0 that the loop's loss equals model(..., labels=...).loss")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        if args.quick:
            p.error("--quick needs --out (it must not overwrite the shipped demo model)")
        args.out = str(ROOT / "demo")
    if args.quick and Path(args.out).resolve() == (ROOT / "demo").resolve():
        p.error("--quick must not write into demo/ (the shipped model)")
    return args


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def batches(tokenizer, split, rng: random.Random, batch_size: int, group: int = 8):
    """Endless (input_ids, labels) batches; conversations of similar length are batched together (right padding:
    a causal recurrent model's outputs at real tokens do not depend on the padding after them)."""
    while True:
        pool = [encode_conversation(tokenizer, sample_conversation(rng, split)) for _ in range(batch_size * group)]
        pool.sort(key=lambda item: len(item[0]))
        chunks = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield collate(chunk)


def collate(items):
    T = max(len(ids) for ids, _ in items)
    input_ids = torch.zeros(len(items), T, dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    for row, (ids, lab) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
    return input_ids, labels


def held_out_batch(tokenizer, split):
    """Every held-out conversation, supervised on its last answer (+ end of text) only."""
    items = []
    for _, turns in split.held_out_flat():
        ids, labels = encode_conversation(tokenizer, turns)
        prefix, _ = encode_conversation(tokenizer, turns[:-1], end_of_text=False) if len(turns) > 1 else ([], [])
        labels = [-100] * len(prefix) + labels[len(prefix) :]
        items.append((ids, labels))
    return collate(items)


# ---------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------


def answer_token_ids(tokenizer) -> list:
    """Every token id an answer can contain (plus end of text), enumerated from the task definitions."""
    texts = [demo.GREETING_ANSWER]
    for fact_list in demo.fact_questions().values():
        texts += [qs[0].answer for qs in fact_list]
    texts += [f"{n} is larger." for n in range(1, 100)]
    words = demo.LIST_WORDS
    texts += [f"{a} {b}" for a in words for b in words]  # every word at the start and after another word
    ids = {0}
    for text in texts:
        ids.update(tokenizer.encode(f" {text}{demo.TURN_END}", add_special_tokens=False))
    return sorted(ids)


class SharedRowHead(nn.Module):
    """The 65536-row head with the rows of tokens that never occur in an answer tied into one shared row.

    Exactly the full softmax of a head whose unused rows are equal (see the module docstring). ``rows`` are the
    used tokens' rows, ``shared`` the common row of the ``n_other`` others.
    """

    def __init__(self, head_weight: torch.Tensor, used_ids: list, shared_init: torch.Tensor):
        super().__init__()
        V = head_weight.shape[0]
        self.register_buffer("used", torch.tensor(used_ids, dtype=torch.long), persistent=False)
        index = torch.full((V,), -1, dtype=torch.long)
        index[self.used] = torch.arange(len(used_ids))
        self.register_buffer("index", index, persistent=False)
        self.rows = nn.Parameter(head_weight.detach()[self.used].clone())
        self.shared = nn.Parameter(shared_init.detach().clone())
        self.n_other = V - len(used_ids)
        # The shared parameter's gradient is the sum over n_other tied rows; scale it to one row's gradient so
        # that AdamW (and weight decay) update it exactly like each row of the untied head.
        self.shared.register_hook(lambda grad: grad / self.n_other)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        local = self.index[targets]
        if bool((local < 0).any()):
            bad = sorted(set(targets[local < 0].tolist()))[:10]
            raise ValueError(f"target tokens {bad} are not in the answer vocabulary (answer_token_ids)")
        logits = torch.cat([hidden @ self.rows.t(), (hidden @ self.shared)[:, None] + math.log(self.n_other)], dim=1)
        return F.cross_entropy(logits.float(), local, reduction=reduction)

    def grad_sq_extra(self) -> torch.Tensor:
        """The n_other - 1 tied copies the optimiser does not see, for the global gradient norm."""
        return (self.n_other - 1) * self.shared.grad.float().pow(2).sum()

    @torch.no_grad()
    def write_back(self, head_weight: torch.Tensor):
        head_weight.copy_(self.shared.expand_as(head_weight))
        head_weight[self.used] = self.rows


def answer_loss(model: RwkvForCausalLM, input_ids, labels, head=None, reduction="mean"):
    """The causal-LM loss of ``model(input_ids, labels=labels)``, the head run only where labels are set (through
    ``head``, a SharedRowHead, when given)."""
    hidden = model.rwkv(input_ids=input_ids, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    selected = hidden[:, :-1][keep]
    if head is not None:
        loss = head.loss(selected, targets[keep], reduction)
    else:
        loss = F.cross_entropy(model.head(selected).float(), targets[keep], reduction=reduction)
    return loss, int(keep.sum())


@torch.no_grad()
def held_out_loss(model, data, head=None, batch_size=64):
    """Mean loss per supervised token on the held-out conversations' last answers."""
    was_training = model.training
    model.eval()
    input_ids, labels = data
    total, count = 0.0, 0
    for i in range(0, input_ids.shape[0], batch_size):
        loss, n = answer_loss(model, input_ids[i : i + batch_size], labels[i : i + batch_size], head, reduction="sum")
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / count


@torch.no_grad()
def labels_loss(model, data, batch_size=16):
    """The same held-out loss through the model's own ``labels`` path (full 65536-way softmax)."""
    input_ids, labels = data
    total, count = 0.0, 0
    for i in range(0, input_ids.shape[0], batch_size):
        ids, lab = input_ids[i : i + batch_size], labels[i : i + batch_size]
        n = int((lab[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, labels=lab, use_cache=False).loss) * n
        count += n
    return total / count


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = RwkvWorldTokenizer()
    split = make_split(args.seed)
    data_rng = random.Random(args.seed + 1)
    torch.manual_seed(args.seed)

    config = RwkvConfig(
        rwkv_version="7",
        vocab_size=65536,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        head_size=args.head_size,
        intermediate_size=4 * args.hidden_size,
    )
    model = RwkvForCausalLM(config)  # RWKV-LM's initialisation (RwkvPreTrainedModel._init_weights)
    model.train()
    used_ids = answer_token_ids(tokenizer)
    # Rows of tokens that never occur in an answer start equal (zero: their logit starts at 0, like the random
    # rows' expected logit); the used rows keep RWKV-LM's random head initialisation.
    shared_init = torch.zeros(config.hidden_size)
    head = None
    if args.full_softmax:
        with torch.no_grad():
            used = torch.tensor(used_ids)
            kept = model.head.weight[used].clone()
            model.head.weight.copy_(shared_init.expand_as(model.head.weight))
            model.head.weight[used] = kept
    else:
        head = SharedRowHead(model.head.weight, used_ids, shared_init)
        model.head.weight.requires_grad_(False)
        head.write_back(model.head.weight)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"RWKV-7 demo: {config.num_hidden_layers} layers, width {config.hidden_size}, head size {config.head_size}, "
          f"{n_params / 1e6:.2f}M parameters; {len(used_ids)} answer tokens; {args.steps} steps x {args.batch_size} "
          f"conversations, {args.threads} thread(s)", flush=True)

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if head is not None:
        trainable += [("head.rows", head.rows), ("head.shared", head.shared)]
    decay = [p for n, p in trainable if (p.dim() == 2 or n == "head.shared") and not n.startswith("rwkv.emb")]
    no_decay = [p for n, p in trainable if not ((p.dim() == 2 or n == "head.shared") and not n.startswith("rwkv.emb"))]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.99), eps=1e-8,
    )
    params = [p for _, p in trainable]

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    eval_data = held_out_batch(tokenizer, split)
    stream = batches(tokenizer, split, data_rng, args.batch_size)
    log = {"curve": [], "held_out_curve": []}
    tokens_seen = supervised_seen = 0
    window_loss = window_n = 0.0
    start, cpu_start = time.time(), time.process_time()
    for step in range(args.steps):
        input_ids, labels = next(stream)
        if step == 0 and args.check_loss:  # the loop's loss is the package's labels loss (full softmax)
            with torch.no_grad():
                reference = float(model(input_ids=input_ids, labels=labels, use_cache=False).loss)
                ours = float(answer_loss(model, input_ids, labels, head)[0])
            assert abs(reference - ours) < 1e-4 * max(1.0, abs(reference)), (reference, ours)
            log["loss_check"] = {"labels_loss": reference, "loop_loss": ours}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss, n = answer_loss(model, input_ids, labels, head)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Global gradient norm of the full model (the tied rows counted n_other times), clipped at 1.
        sq = sum(p.grad.float().pow(2).sum() for p in params if p.grad is not None)
        if head is not None:
            sq = sq + head.grad_sq_extra()
        grad_norm = float(sq.sqrt())
        if grad_norm > 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(1.0 / (grad_norm + 1e-6))
        optimizer.step()
        tokens_seen += int((input_ids != 0).sum()) + int((labels == 0).sum())  # real tokens (id 0 only as end of text)
        supervised_seen += n
        window_loss += float(loss.detach()) * n
        window_n += n
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            entry = {"step": step + 1, "loss": round(window_loss / window_n, 4), "lr": round(lr_at(step), 6),
                     "grad_norm": round(grad_norm, 3), "tokens": tokens_seen, "elapsed_s": round(time.time() - start, 1),
                     "cpu_s": round(time.process_time() - cpu_start, 1)}
            log["curve"].append(entry)
            window_loss = window_n = 0.0
            print(json.dumps(entry), flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            entry = {"step": step + 1, "held_out_loss": round(held_out_loss(model, eval_data, head), 4)}
            log["held_out_curve"].append(entry)
            print(json.dumps(entry), flush=True)
        if args.accuracy_every and (step + 1) % args.accuracy_every == 0 and step + 1 < args.steps:
            if head is not None:
                head.write_back(model.head.weight)
            model.eval()
            result = evaluate(model, tokenizer, split.held_out_flat(per_task=8))
            model.train()
            entry = {"step": step + 1, "accuracy": round(result["accuracy"], 3),
                     "per_task": {k: round(v, 2) for k, v in result["per_task"].items()}}
            log.setdefault("accuracy_curve", []).append(entry)
            print(json.dumps(entry), flush=True)
    train_seconds, train_cpu_seconds = time.time() - start, time.process_time() - cpu_start
    model.eval()
    if head is not None:
        head.write_back(model.head.weight)
    final_held_out = held_out_loss(model, eval_data, head)
    log["held_out_curve"].append({"step": args.steps, "held_out_loss": round(final_held_out, 4)})

    # The shipped artifact: official layout, bf16.
    state_dict = {k: v.to(torch.bfloat16).contiguous() for k, v in export_official_state_dict(model).items()}
    pth = out / DEMO_CHECKPOINT_NAME
    torch.save(state_dict, pth)

    # Evaluate what ships: the bf16 .pth, converted as a user would (fp32 on CPU), full 65536-way softmax.
    with tempfile.TemporaryDirectory() as tmp:
        shipped = convert_rwkv_checkpoint(pth, Path(tmp) / "hf", dtype="float32", tokenizer="world", progress=False).eval()
        shipped_held_out = labels_loss(shipped, eval_data)
        conversations = split.held_out_flat(per_task=args.eval_per_task)
        result = evaluate(shipped, tokenizer, conversations)
    by_task = {}
    for sample in result["samples"]:
        by_task.setdefault(sample["task"], []).append(sample)
    samples = [s for task in TASKS for s in by_task.get(task, [])[:3]]

    log.update({
        "model": {k: getattr(config, k) for k in ("rwkv_version", "vocab_size", "hidden_size", "num_hidden_layers",
                                                  "head_size", "intermediate_size", "decay_low_rank_dim",
                                                  "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim")},
        "parameters": n_params,
        "answer_vocabulary": len(used_ids),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "rwkv_hf": rwkv_hf.__version__, "threads": args.threads, "machine": platform.machine()},
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "tokens_seen": tokens_seen,
        "supervised_tokens_seen": supervised_seen,
        "final_train_loss": log["curve"][-1]["loss"],
        "held_out_loss": round(final_held_out, 4),
        "held_out_loss_shipped_bf16": round(shipped_held_out, 4),
        "held_out_prompts": result["n"],
        "held_out_accuracy": round(result["accuracy"], 4),
        "held_out_accuracy_per_task": {k: round(v, 4) for k, v in result["per_task"].items()},
        "samples": samples,
        "checkpoint": {"file": DEMO_CHECKPOINT_NAME, "bytes": pth.stat().st_size, "dtype": "bfloat16"},
    })
    with open(out / "train_log.json", "w") as f:
        json.dump(log, f, indent=1)
        f.write("\n")
    print(f"trained in {train_seconds:.0f}s, {tokens_seen} tokens ({supervised_seen} supervised); held-out loss "
          f"{final_held_out:.4f} (shipped bf16, full softmax: {shipped_held_out:.4f}); held-out greedy accuracy "
          f"{result['accuracy']:.1%} on {result['n']} prompts")
    for task, acc in result["per_task"].items():
        print(f"  {task:9s} {acc:.1%}")
    print(f"wrote {pth} ({pth.stat().st_size / 1e6:.1f} MB) and {out / 'train_log.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
