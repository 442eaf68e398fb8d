"""Shared pytest fixtures: random official checkpoints and the official package's outputs on them.

Fixtures (all session-scoped, files under pytest's session tmp dir):

* ``official_case(version, shape="base") -> OfficialCase`` -- a factory.  ``OfficialCase`` is a
  NamedTuple ``(ckpt_path, tokens, oracle)``: the ``.pth`` path (RWKV-LM layout), the prompt as a
  LongTensor [T] and the oracle dict of ``official_oracle.run_official`` (``logits_full`` [T, V],
  ``logits_last`` [V], ``logits_step`` [T, V], ``logits_chunked`` [n_chunks, V],
  ``logits_chunked_last`` [V], ``chunk_ends``, ``state_full``/``state_step``/``state_chunked``,
  ``init_state``, metadata).  It also has ``.version``, ``.shape``, ``.kwargs`` (builder kwargs) and
  ``.state_dict()`` (the checkpoint, loaded).  Cases are ``rwkv_checkpoints.CASES``; the first request
  builds every case and runs all the oracles at once (one subprocess per family, concurrently), and
  the results are reused by every test file.
* ``official_case_params`` -- parametrised over all ``CASES`` (ids like ``v6-hs32``); yields an
  ``OfficialCase``.
* ``official_checkpoint(version, **kwargs) -> Path`` -- a factory that builds and saves a checkpoint
  with ``make_official_checkpoint`` (cached per kwargs), for tests that need weights but no oracle.

The oracle fixtures skip when the ``rwkv`` package is not installed.  Tests marked
``@pytest.mark.gpu`` are skipped unless CUDA is available.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from official_oracle import run_official_many  # noqa: E402
from rwkv_checkpoints import (  # noqa: E402
    CASE_CHUNK,
    CASE_SHAPES,
    CASES,
    case_kwargs,
    case_tokens,
    make_official_checkpoint,
    normalize_version,
    save_official_checkpoint,
)

# --------------------------------------------------------------------------------------------------
# gpu marker
# --------------------------------------------------------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --------------------------------------------------------------------------------------------------
# transformers' deprecation notices are errors here
# --------------------------------------------------------------------------------------------------
# FutureWarnings that name this package's classes are turned into errors in pyproject.toml; transformers also
# announces renames through its logger (e.g. "`past_key_values`/`cache_params` are deprecated. Use `cache`
# instead."), once per process. A coming rename must fail CI before it fails users, so any such notice logged
# while a test runs fails that test.


class _DeprecationNotices(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        # about the state's name or this package's classes (not, say, transformers' own pipeline internals)
        if "deprecat" in message.lower() and re.search(r"cache|past_key_values|Rwkv", message):
            self.records.append(f"{record.name}: {message}")


@pytest.fixture(autouse=True)
def no_transformers_deprecation_notices(request):
    if request.node.get_closest_marker("peer_code"):  # another library's model speaking the old names
        yield
        return
    handler = _DeprecationNotices()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.records, f"transformers logged a deprecation notice: {handler.records}"


# --------------------------------------------------------------------------------------------------
# official checkpoints + oracle outputs
# --------------------------------------------------------------------------------------------------


class OfficialCase(NamedTuple):
    ckpt_path: Path
    tokens: torch.Tensor  # LongTensor [T]
    oracle: dict

    @property
    def version(self) -> str:
        return self.oracle["version"]

    @property
    def shape(self) -> str:
        return self.oracle["case_shape"]

    @property
    def kwargs(self) -> dict:
        return case_kwargs(self.version, self.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return torch.load(str(self.ckpt_path), map_location="cpu", weights_only=True)


class _OfficialStore:
    """Builds every standard case and runs all their oracles together on the first request.

    One ``run_official_many`` call: one subprocess per family (v4-6, v7, v7-DE), run concurrently,
    so the whole set costs about as much as its slowest family.
    """

    def __init__(self, root: Path):
        self.root = root
        self.cases: dict[tuple[str, str], OfficialCase | BaseException] | None = None

    def get(self, version, shape: str = "base") -> OfficialCase:
        key = (normalize_version(version), shape)
        if key not in CASES:
            raise KeyError(f"no standard oracle case {key}; available: {CASES}")
        if self.cases is None:
            self._compute_all()
        case = self.cases[key]
        if isinstance(case, BaseException):
            raise case
        return case

    def _compute_all(self) -> None:
        if importlib.util.find_spec("rwkv") is None:
            pytest.skip("the official `rwkv` package is not installed (pip install rwkv==0.8.32)")
        requests = []
        for v, s in CASES:
            path = self.root / f"v{v}-{s}.pth"
            save_official_checkpoint(make_official_checkpoint(v, **case_kwargs(v, s)), path)
            requests.append(
                {
                    "ckpt_path": path,
                    "tokens": case_tokens(v, s),
                    "chunk": CASE_CHUNK,
                    "init_state": "time_state" if CASE_SHAPES[s]["kwargs"].get("time_state") else None,
                }
            )
        results = run_official_many(requests, return_exceptions=True)
        self.cases = {}
        for (v, s), req, out in zip(CASES, requests, results):
            if isinstance(out, BaseException):
                self.cases[(v, s)] = out
                continue
            out["case_shape"] = s
            self.cases[(v, s)] = OfficialCase(Path(req["ckpt_path"]), out["tokens"], out)


@pytest.fixture(scope="session")
def _official_store(tmp_path_factory) -> _OfficialStore:
    return _OfficialStore(tmp_path_factory.mktemp("official_cases"))


@pytest.fixture(scope="session")
def official_case(_official_store):
    """Factory ``official_case(version, shape="base") -> OfficialCase`` (see the module docstring)."""
    return _official_store.get


@pytest.fixture(scope="session", params=CASES, ids=[f"v{v}-{s}" for v, s in CASES])
def official_case_params(request, _official_store) -> OfficialCase:
    """Every standard case in turn (parametrised)."""
    return _official_store.get(*request.param)


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory):
    """Factory ``official_checkpoint(version, **make_official_checkpoint_kwargs) -> Path`` (cached)."""
    root = tmp_path_factory.mktemp("official_checkpoints")
    cache: dict[tuple, Path] = {}

    def build(version, **kwargs) -> Path:
        v = normalize_version(version)
        key = (v, tuple(sorted((k, str(val)) for k, val in kwargs.items())))
        if key not in cache:
            path = root / f"ckpt{len(cache)}-v{v}.pth"
            save_official_checkpoint(make_official_checkpoint(v, **kwargs), path)
            cache[key] = path
        return cache[key]

    return build


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~20x faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
