#!/usr/bin/env bash
# Compile check of the CUDA WKV kernels, without a GPU.
#
#   1. every kernels/*.cu is compiled to an object file by nvcc (device code for each arch in WKV_ARCHS,
#      default sm_90, plus the host launchers), exactly the translation units the JIT build compiles;
#      ptxas' register / spill report is printed for the record;
#   2. the binding kernels/wkv_ops.cpp is syntax-checked by the host compiler against torch's headers
#      (including ATen/cuda and c10/cuda, which the CPU wheel ships) and the CUDA toolkit headers;
#   3. the host-emulation translation unit (binding + all kernels compiled as C++ with -DWKV_HOST_EMU, the
#      one tests/test_kernels.py runs on the CPU) is syntax-checked the same way.
# Exits non-zero on the first failure; exits 0 with a message when nvcc is not installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KDIR="$ROOT/kernels"

NVCC="${NVCC:-}"
if [[ -z "$NVCC" && -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"; fi
if [[ -z "$NVCC" ]]; then NVCC="$(command -v nvcc || true)"; fi
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
    echo "compile_kernels: nvcc not found (set NVCC or CUDA_HOME); skipping the CUDA compile check"
    exit 0
fi

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    for cand in python python3 "$ROOT/.venv/bin/python"; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY="$cand"; break; fi
    done
fi
if [[ -z "$PY" ]]; then
    echo "compile_kernels: no Python with torch found (set PYTHON)" >&2
    exit 1
fi
CXX="${CXX:-g++}"

# The toolkit root (for cuda_runtime_api.h, which the ATen/cuda headers include): CUDA_HOME, else what torch
# finds, else next to the real nvcc binary (nvcc may be a wrapper script, so nvcc's own answer wins).
CUDA_ROOT=""
for cand in "${CUDA_HOME:-}" "$("$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')")" \
            "$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)" /usr/local/cuda; do
    if [[ -n "$cand" && -f "$cand/include/cuda_runtime_api.h" ]]; then CUDA_ROOT="$cand"; break; fi
done
if [[ -z "$CUDA_ROOT" ]]; then
    echo "compile_kernels: cuda_runtime_api.h not found (set CUDA_HOME)" >&2
    exit 1
fi

mapfile -t TORCH_INC < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
PY_INC="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
INC_FLAGS=(-I"$KDIR" -I"$CUDA_ROOT/include" -I"$PY_INC")
for d in "${TORCH_INC[@]}"; do INC_FLAGS+=(-isystem "$d"); done
# torch >= 2.10 headers need C++20; older ones C++17 (the same choice torch.utils.cpp_extension makes).
CXX_STD="$("$PY" -c "import torch; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); print('c++20' if v >= (2, 10) else 'c++17')")"

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
# CPU-only torch wheels ship the c10/cuda headers but not the one CMake generates for them; supply the
# same one-line header so the binding can still be checked (CUDA wheels have it and this is skipped).
if ! "$PY" -c "import os,sys; from torch.utils.cpp_extension import include_paths; sys.exit(0 if any(os.path.isfile(os.path.join(p,'c10/cuda/impl/cuda_cmake_macros.h')) for p in include_paths()) else 1)"; then
    mkdir -p "$OUT/stub/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
    INC_FLAGS+=(-isystem "$OUT/stub")
    echo "compile_kernels: this torch has no c10/cuda/impl/cuda_cmake_macros.h (CPU wheel); using a stub for the binding check"
fi
ARCHS="${WKV_ARCHS:-sm_90}"
echo "compile_kernels: $("$NVCC" --version | tail -1); host $("$CXX" --version | head -1); torch headers ${CXX_STD}; archs: $ARCHS"

start=$SECONDS
for cu in "$KDIR"/*.cu; do
    name="$(basename "$cu" .cu)"
    for arch in $ARCHS; do
        echo "== nvcc $name.cu ($arch)"
        "$NVCC" -c -std=c++17 -O3 -Xptxas=-O3 --extra-device-vectorization -arch="$arch" --resource-usage \
            -I"$KDIR" -o "$OUT/$name.$arch.o" "$cu" 2>"$OUT/$name.$arch.log" || { cat "$OUT/$name.$arch.log"; exit 1; }
        # One line per kernel: registers, stack and spill bytes (spills would mean a register array
        # the kernels rely on was demoted to local memory).
        "$PY" - "$OUT/$name.$arch.log" <<'PYEOF'
import re, shutil, subprocess, sys
text = open(sys.argv[1]).read()
rows = re.findall(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores.*\n.*?Used (\d+) registers", text)
names = [r[0] for r in rows]
if shutil.which("c++filt") and names:
    names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
for name, (_, stack, spill, regs) in zip(names, rows):
    name = re.sub(r"\(.*", "", name).replace("rwkv_hf_wkv::", "")
    print(f"   {name:55s} {regs:>4s} regs  {stack:>4s} B stack  {spill:>4s} B spilled")
PYEOF
    done
done

echo "== host syntax check: wkv_ops.cpp (torch + CUDA headers)"
"$CXX" -fsyntax-only -std="$CXX_STD" -DTORCH_EXTENSION_NAME=rwkv_hf_wkv_check -DTORCH_API_INCLUDE_EXTENSION_H \
    "${INC_FLAGS[@]}" "$KDIR/wkv_ops.cpp"

echo "== host syntax check: host-emulation unit (binding + kernels as C++, -DWKV_HOST_EMU)"
printf '#include "wkv_ops.cpp"\n#include "wkv4.cu"\n#include "wkv5.cu"\n#include "wkv7.cu"\n' >"$OUT/emu.cpp"
"$CXX" -fsyntax-only -std="$CXX_STD" -x c++ -DWKV_HOST_EMU -DTORCH_EXTENSION_NAME=rwkv_hf_wkv_emu_check \
    -DTORCH_API_INCLUDE_EXTENSION_H -Wno-unknown-pragmas "${INC_FLAGS[@]}" "$OUT/emu.cpp"

echo "compile_kernels: OK ($((SECONDS - start)) s)"
