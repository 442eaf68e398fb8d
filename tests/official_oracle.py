"""Run the official ``rwkv`` pip package (ChatRWKV's engine, 0.8.32) on a checkpoint: the numeric oracle.

Two ways in:

* CLI, one checkpoint::

      python tests/official_oracle.py CKPT.pth --tokens 1,2,3 --out out.pt [--chunk 7] [--init-state s.pt]

  or several checkpoints of the same family in one process (``--jobs jobs.pt``, a ``torch.save``d list
  of request dicts, see ``run_official_many``).
* Python: ``run_official(ckpt_path, tokens, chunk=None, init_state=None) -> dict`` and
  ``run_official_many(requests) -> list[dict]``, which run the CLI in subprocesses.

Why a subprocess: the package picks its model class at import time from environment variables.
``RWKV_V7_ON=1`` rebinds ``rwkv.model.RWKV`` to the v7 class (v7 is never auto-detected) and
``RWKV_DE_VERSION=1`` switches v7 to DeepEmbed, so v4-6, v7 and v7-DE each need their own process.
This module therefore never imports ``rwkv`` in the calling process.  The child process always runs
with ``RWKV_JIT_ON=1``, ``RWKV_CUDA_ON=0``, ``RWKV_RESCALE_LAYER=0`` (no fp16 rescaling, so the
logits are the un-rescaled fp32 ones), one torch thread (reproducible results) and strategy
``"cpu fp32"``.

What one run returns (``T`` tokens, ``V`` vocab; all tensors float32 on CPU):

=====================  =========================================================================
``logits_full``        [T, V]: one ``forward(tokens, None, full_output=True)`` call
``logits_last``        [V]: one ``forward(tokens, None)`` call (last position only)
``logits_step``        [T, V]: one token per call, carrying the state
``logits_chunked``     [n_chunks, V]: last logits of each chunk of ``chunk`` tokens, state carried
``logits_chunked_last`` [V]: ``logits_chunked[-1]``
``chunk``, ``chunk_ends``  the chunk length used and the exclusive end index of every chunk
``state_full`` / ``state_step`` / ``state_chunked``  final states, official list layout (cloned)
``state_after_chunk``  list (one per chunk) of the states after ``tokens[:chunk_ends[k]]``
``init_state``         the initial state actually passed (list) or None (the package's default)
``tokens``             LongTensor [T]
metadata               ``version`` ("4"/"5.2"/"6"/"7"), ``official_version`` (the package's own
                       ``model.version``; 7.0 for v7), ``deep_embed``, ``has_time_state``,
                       ``n_layer``, ``n_embd``, ``dim_att``, ``ffn_dim``, ``vocab_size``, ``n_head``,
                       ``head_size``, ``state_per_layer`` (5 for v4, else 3), ``reordered_keys``,
                       ``rwkv_version``, ``torch_version``, ``ckpt_path``
=====================  =========================================================================

Official state layout (``state[i*K + j]``): v4, K=5: att ``x_prev`` (C), ``aa`` (A), ``bb`` (A),
``pp`` (A, starts at -1e30), ffn ``x_prev`` (C).  v5.2/v6/v7, K=3: att ``x_prev`` (C), ``S`` (H, N, N)
fp32, ffn ``x_prev`` (C).  ``S`` is [h, key, value] for v5.2/v6 but [h, value, key] for v7.

Quirks of the official package handled here:

* v4-6 ``forward`` replaces the elements of the state list it is given, and v7's TorchScript path
  works on the list too: every call gets a fresh clone and every returned state is cloned.
* v7 returns logits in the model dtype; a length-1 list (or an int) goes to ``forward_one`` and
  returns (V,) even with ``full_output=True``; ``forward_seq`` does support ``full_output``.  A tensor
  of token ids is not accepted by v7, so tokens are always passed as a Python list.
* The v4-6 loader detects the version from keys *in dict order*.  A one-layer v5.2 checkpoint in
  RWKV-LM order (``time_decay`` before ``ln_x``/``gate``) is misdetected as v5.1 and then crashes
  (``AttributeError: n_head``).  Putting ``blocks.0.att.ln_x.*`` first makes the official detection
  correct, so for that case the child saves a reordered copy (same tensors) and reports
  ``reordered_keys=True``.  The detected version is always checked against the keys.
* The official CPU code assumes ``dim_att == n_embd`` (v4's seq path writes the WKV output into a
  (T, n_embd) buffer and crashes; v5.2/v6 compute the head size as ``n_embd // n_head``): such
  checkpoints are refused with ``OracleError``.
* ``RWKV_x070`` appends ``.pth`` to the model name itself; the v4-6 class appends it if missing.
* The v4-6 loader calls ``gc.collect()`` per layer (~0.1 s each with torch loaded); the child replaces
  ``rwkv.model.gc`` with a no-op, which only affects memory, not numbers.
* ``time_state``: the v4-6 class (v5.2/v6) auto-loads it (transposed) as the default initial state;
  the v7 class ignores it.  Pass ``init_state="time_state"`` to start v7 from it the way RWKV-Runner
  does (the .pth tensor as is); for v6 that equals the default.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import torch  # noqa: E402

from rwkv_checkpoints import describe_checkpoint, official_state_from_time_state  # noqa: E402

__all__ = ["OracleError", "DEFAULT_CHUNK", "oracle_env", "run_official", "run_official_many", "official_detected_version"]

DEFAULT_CHUNK = 7
STRATEGY = "cpu fp32"


class OracleError(RuntimeError):
    """The official package cannot serve as an oracle for this checkpoint, or its run failed."""


# --------------------------------------------------------------------------------------------------
# helpers shared by parent and child
# --------------------------------------------------------------------------------------------------


def _family(info: dict) -> str:
    if info["version"] == "7":
        return "v7-de" if info["deep_embed"] else "v7"
    return "v4-6"


def oracle_env(family: str, base: dict | None = None) -> dict:
    """Environment for a child process serving ``family`` ("v4-6", "v7" or "v7-de")."""
    env = dict(os.environ if base is None else base)
    env.update(
        RWKV_V7_ON="1" if family in ("v7", "v7-de") else "0",
        RWKV_DE_VERSION="1" if family == "v7-de" else "0",
        RWKV_JIT_ON="1",
        RWKV_CUDA_ON="0",
        RWKV_DML_ON="0",
        RWKV_RESCALE_LAYER="0",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return env


def official_detected_version(keys, shapes: dict) -> float:
    """Replays the official v4-6 loader's order-dependent version detection (``RWKV.__init__``)."""
    version = 4
    for x in keys:
        if "ln_x" in x:
            version = max(5, version)
        if "gate.weight" in x:
            version = max(5.1, version)
        if int(version) == 5 and "att.time_decay" in x:
            shape = shapes[x]
            if len(shape) > 1 and shape[1] > 1:
                version = max(5.2, version)
        if "time_maa" in x:
            version = max(6, version)
    return float(version)


def _load_sd(path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def _check_servable(info: dict) -> None:
    if info["dim_att"] != info["n_embd"]:
        raise OracleError(
            f"v{info['version']} with dim_att={info['dim_att']} != n_embd={info['n_embd']}: the official CPU code "
            "assumes dim_att == n_embd (v4's seq path reuses a (T, n_embd) buffer for the WKV output; v5.2/v6 "
            "derive the head size as n_embd // n_head; v7 sizes its state from n_embd), so it cannot be an "
            "oracle for this checkpoint"
        )


def _check_request(info: dict, tokens: list[int], init_state) -> None:
    _check_servable(info)
    if not tokens:
        raise OracleError("need at least one token")
    if min(tokens) < 0 or max(tokens) >= info["vocab_size"]:
        raise OracleError(f"token id out of range [0, {info['vocab_size']})")
    if isinstance(init_state, str) and init_state == "time_state" and not info["has_time_state"]:
        raise OracleError("init_state='time_state' but the checkpoint has no time_state keys")


# --------------------------------------------------------------------------------------------------
# child side (imports rwkv)
# --------------------------------------------------------------------------------------------------


def _import_rwkv(family: str):
    want = oracle_env(family, {})
    for k, v in want.items():
        os.environ[k] = v
    if "rwkv.model" in sys.modules:  # pragma: no cover - only reachable when misused in-process
        mod = sys.modules["rwkv.model"]
        is_v7 = mod.RWKV.__name__ == "RWKV_x070"
        if is_v7 != (family != "v4-6"):
            raise OracleError("rwkv.model was already imported for another family in this process")
        return mod
    torch.set_num_threads(1)
    import types

    import rwkv  # noqa: F401
    import rwkv.model as mod

    # The v4-6 loader calls gc.collect() once per layer and tensor group; with torch loaded that is
    # ~0.1 s a call and dominates loading a small model.  It only frees memory, so skip it here.
    mod.gc = types.SimpleNamespace(collect=lambda *a, **k: 0)
    return mod


def _clone(state):
    return [t.detach().clone() for t in state]


def _prepare_path(ckpt: Path, info: dict, sd: dict, tmp: Path) -> tuple[str, bool]:
    """Path string to hand to the official constructor (+ whether keys had to be reordered)."""
    keys = list(sd.keys())
    reordered = False
    src = ckpt
    if info["version"] != "7":
        expected = {"4": 4.0, "5.2": 5.2, "6": 6.0}[info["version"]]
        detected = official_detected_version(keys, {k: tuple(sd[k].shape) for k in keys})
        if detected != expected:
            # Known case: 1-layer v5.2 in RWKV-LM order.  ln_x first makes the official scan see v5
            # before block 0's time_decay, so its 2-D shape promotes the model to 5.2.
            first = [k for k in keys if ".att.ln_x." in k]
            new_keys = first + [k for k in keys if k not in first]
            if official_detected_version(new_keys, {k: tuple(sd[k].shape) for k in keys}) != expected:
                raise OracleError(
                    f"the official loader would detect v{detected} for a v{info['version']} checkpoint"
                )
            src = tmp / "reordered.pth"
            torch.save({k: sd[k].clone() for k in new_keys}, str(src))
            reordered = True
    if src.suffix != ".pth":
        link = tmp / "model.pth"
        torch.save({k: sd[k].clone() for k in keys}, str(link))
        src = link
    name = str(src)
    if info["version"] == "7":
        name = name[: -len(".pth")]  # RWKV_x070 appends '.pth' itself
    return name, reordered


def _run_one(mod, req: dict) -> dict:
    ckpt = Path(req["ckpt_path"])
    sd = _load_sd(ckpt)
    info = describe_checkpoint(sd)
    tokens = [int(t) for t in req["tokens"]]
    T = len(tokens)
    chunk = int(req.get("chunk") or DEFAULT_CHUNK)
    if chunk < 1:
        raise OracleError("chunk must be >= 1")

    init_state = req.get("init_state")
    _check_request(info, tokens, init_state)
    if isinstance(init_state, str):
        if init_state == "time_state":
            init_state = official_state_from_time_state(sd)
        else:
            init_state = torch.load(init_state, map_location="cpu", weights_only=True)
    if init_state is not None:
        init_state = [torch.as_tensor(t).float().contiguous() for t in init_state]
        k = 5 if info["version"] == "4" else 3
        if len(init_state) != k * info["n_layer"]:
            raise OracleError(f"init_state has {len(init_state)} tensors, expected {k * info['n_layer']}")

    with tempfile.TemporaryDirectory(prefix="rwkv_oracle_") as tmp:
        name, reordered = _prepare_path(ckpt, info, sd, Path(tmp))
        del sd
        if info["version"] == "7":
            model = mod.RWKV(name, STRATEGY)
            official_version = 7.0
        else:
            model = mod.RWKV(name, STRATEGY, verbose=False)
            official_version = float(model.version)
            expected = {"4": 4.0, "5.2": 5.2, "6": 6.0}[info["version"]]
            if official_version != expected:
                raise OracleError(f"official package detected v{official_version}, expected v{expected}")

    def fresh():
        return None if init_state is None else _clone(init_state)

    def fwd(toks, state, full=False):
        out, st = model.forward(list(toks), state, full_output=full)
        return out.float().clone(), _clone(st)

    logits_full, state_full = fwd(tokens, fresh(), full=True)
    if logits_full.dim() == 1:  # a length-1 prompt takes the *_one path and returns (V,)
        logits_full = logits_full.unsqueeze(0)
    logits_last, _ = fwd(tokens, fresh())

    state = fresh()
    step = []
    for t in tokens:
        out, state = fwd([t], state)
        step.append(out)
    logits_step, state_step = torch.stack(step), state

    state = fresh()
    chunk_logits, chunk_ends, chunk_states = [], [], []
    for start in range(0, T, chunk):
        out, state = fwd(tokens[start : start + chunk], state)
        chunk_logits.append(out)
        chunk_ends.append(min(start + chunk, T))
        chunk_states.append(_clone(state))
    logits_chunked, state_chunked = torch.stack(chunk_logits), state

    import rwkv as rwkv_pkg

    try:
        from importlib.metadata import version as _pkg_version

        rwkv_version = _pkg_version("rwkv")
    except Exception:  # pragma: no cover
        rwkv_version = getattr(rwkv_pkg, "__version__", "unknown")

    return {
        **info,
        "official_version": official_version,
        "state_per_layer": 5 if info["version"] == "4" else 3,
        "reordered_keys": reordered,
        "rwkv_version": rwkv_version,
        "torch_version": str(torch.__version__),
        "ckpt_path": str(ckpt),
        "tokens": torch.tensor(tokens, dtype=torch.long),
        "chunk": chunk,
        "chunk_ends": chunk_ends,
        "logits_full": logits_full,
        "logits_last": logits_last,
        "logits_step": logits_step,
        "logits_chunked": logits_chunked,
        "logits_chunked_last": logits_chunked[-1].clone(),
        "state_full": state_full,
        "state_step": state_step,
        "state_chunked": state_chunked,
        "state_after_chunk": chunk_states,
        "init_state": None if init_state is None else _clone(init_state),
    }


def _child_main(requests: list[dict]) -> None:
    infos = [describe_checkpoint(_load_sd(r["ckpt_path"])) for r in requests]
    families = {_family(i) for i in infos}
    if len(families) != 1:
        raise OracleError(f"one process serves one family, got {sorted(families)}")
    mod = _import_rwkv(families.pop())
    for req in requests:
        t0 = time.perf_counter()
        out = _run_one(mod, req)
        out["elapsed_s"] = time.perf_counter() - t0
        Path(req["out"]).parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, req["out"])


def _parse_tokens(text: str) -> list[int]:
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", nargs="?", help="official .pth checkpoint")
    ap.add_argument("--tokens", help="comma-separated token ids")
    ap.add_argument("--out", help="where to torch.save the result dict")
    ap.add_argument("--chunk", type=int, default=None, help=f"chunk length for chunked prefill (default {DEFAULT_CHUNK})")
    ap.add_argument("--init-state", default=None, help="torch.save'd list of state tensors, or 'time_state'")
    ap.add_argument("--jobs", default=None, help="torch.save'd list of request dicts (one family)")
    args = ap.parse_args(argv)
    if args.jobs:
        requests = torch.load(args.jobs, weights_only=True)
    else:
        if not (args.ckpt and args.tokens is not None and args.out):
            ap.error("CKPT, --tokens and --out are required (or --jobs)")
        requests = [
            {
                "ckpt_path": args.ckpt,
                "tokens": _parse_tokens(args.tokens),
                "chunk": args.chunk,
                "init_state": args.init_state,
                "out": args.out,
            }
        ]
    try:
        _child_main(requests)
    except OracleError as e:
        print(f"OracleError: {e}", file=sys.stderr)
        return 3
    return 0


# --------------------------------------------------------------------------------------------------
# parent side (never imports rwkv)
# --------------------------------------------------------------------------------------------------


def run_official_many(
    requests: list[dict], *, timeout: float = 600.0, parallel: bool = True, return_exceptions: bool = False
) -> list:
    """Run several oracle requests with one child process per family (v4-6 / v7 / v7-DE).

    Each request is a dict with ``ckpt_path``, ``tokens`` (ints), and optionally ``chunk`` and
    ``init_state`` (None, a list of tensors in the official layout, or ``"time_state"``).  Families run
    concurrently when ``parallel``.  Returns the result dicts (see the module docstring) in request
    order.  A request the oracle cannot serve raises ``OracleError``; with ``return_exceptions`` the
    error takes the place of the result instead (for a failed child: of every request of its family).
    """
    results: list = [None] * len(requests)
    if not requests:
        return results
    work = Path(tempfile.mkdtemp(prefix="rwkv_oracle_jobs_"))
    groups: dict[str, list[tuple[int, dict]]] = {}
    try:
        for idx, req in enumerate(requests):
            ckpt = Path(req["ckpt_path"]).resolve()
            info = describe_checkpoint(_load_sd(ckpt))
            init_state = req.get("init_state")
            tokens = [int(t) for t in req["tokens"]]
            try:
                _check_request(info, tokens, init_state)
            except OracleError as e:
                if not return_exceptions:
                    raise
                results[idx] = e
                continue
            if init_state is not None and not isinstance(init_state, str):
                p = work / f"init_{idx}.pt"
                torch.save([torch.as_tensor(t).detach().float().cpu() for t in init_state], str(p))
                init_state = str(p)
            job = {
                "ckpt_path": str(ckpt),
                "tokens": tokens,
                "chunk": req.get("chunk"),
                "init_state": init_state,
                "out": str(work / f"out_{idx}.pt"),
            }
            groups.setdefault(_family(info), []).append((idx, job))

        def start(family, items):
            jobs_path = work / f"jobs_{family}.pt"
            torch.save([job for _, job in items], str(jobs_path))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--jobs", str(jobs_path)]
            return subprocess.Popen(
                cmd, env=oracle_env(family), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )

        def finish(family, proc):
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return OracleError(f"official oracle ({family}) timed out after {timeout}s")
            if proc.returncode != 0:
                tail = "\n".join((err or "").strip().splitlines()[-15:])
                return OracleError(f"official oracle ({family}) failed with exit code {proc.returncode}:\n{tail}")
            return None

        errors: dict[str, OracleError | None] = {}
        if parallel:
            procs = [(family, start(family, items)) for family, items in groups.items()]
            for family, proc in procs:
                errors[family] = finish(family, proc)
        else:
            for family, items in groups.items():
                errors[family] = finish(family, start(family, items))

        for family, items in groups.items():
            err = errors[family]
            if err is not None and not return_exceptions:
                raise err
            for idx, job in items:
                results[idx] = err if err is not None else torch.load(job["out"], map_location="cpu", weights_only=True)
        return results
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()


def run_official(ckpt_path, tokens, *, chunk: int | None = None, init_state=None, timeout: float = 600.0) -> dict:
    """Run the official package on one checkpoint in a subprocess; returns the dict described above."""
    return run_official_many(
        [{"ckpt_path": ckpt_path, "tokens": list(tokens), "chunk": chunk, "init_state": init_state}], timeout=timeout
    )[0]


if __name__ == "__main__":
    sys.exit(main())
