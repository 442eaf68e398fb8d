"""Ahead-of-time build of the WKV CUDA kernels (``rwkv-hf build-kernels``).

The kernels otherwise build lazily, on the first use of a CUDA model. Building ahead of time fills the same
cache (see ``kernels_rwkv_hf``: ``RWKV_HF_KERNEL_CACHE``, ``TORCH_EXTENSIONS_DIR``, ``~/.cache/rwkv_hf``) for
the GPUs visible now, or for the archs in ``TORCH_CUDA_ARCH_LIST``; ``MAX_JOBS`` limits the parallel compiles.

    python -m rwkv_hf.build_kernels [--quiet] [--emulation]
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build(verbose: bool = True, host_emulation: bool = False):
    """Build (or load from the cache) the extension and return the loaded module; raises on failure.

    ``host_emulation=True`` builds the CPU emulation of the kernels that the test-suite uses instead.
    """
    from . import kernels_rwkv_hf as K

    ext = K._host_emulation_extension(verbose=verbose) if host_emulation else K.build_extension(verbose=verbose)
    if verbose:
        print(f"rwkv_hf WKV kernels ready: {ext.__file__}")
        print(f"  sources: {K.kernel_source_dir()}")
        print(f"  cache:   {K.kernel_cache_root()}")
    return ext


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="rwkv-hf build-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet", action="store_true", help="do not show the compiler output")
    parser.add_argument("--emulation", action="store_true",
                        help="build the CPU emulation used by the tests instead of the CUDA extension")
    args = parser.parse_args(argv)
    try:
        build(verbose=not args.quiet, host_emulation=args.emulation)
    except Exception as err:  # noqa: BLE001 - report any failure as an exit status
        print(f"rwkv-hf build-kernels: failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
