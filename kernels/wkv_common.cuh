// Shared definitions of the rwkv_hf WKV kernels: input element types, conversion to float, launch macro.
//
// The kernels are plain CUDA C++ and need only the CUDA toolkit headers. With -DWKV_HOST_EMU the same
// source compiles as host C++ against wkv_host_emu.h, which runs every block's threads on the CPU: the
// test-suite uses that to check the kernel maths on machines without a GPU.
#pragma once

#include <cstdint>

#ifdef WKV_HOST_EMU
#include "wkv_host_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

typedef __nv_bfloat16 wkv_bf16;
typedef __half wkv_fp16;
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(wkv_bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(wkv_fp16 x) { return __half2float(x); }

// WKV_LAUNCH(grid, block, stream, kernel<...>)(args...)
#define WKV_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
// Reports (without synchronising) whether the last launch was rejected.
#define WKV_LAUNCH_ERROR() wkv_launch_error()
static inline const char* wkv_launch_error() {
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
#endif

#include "wkv_launchers.h"

namespace rwkv_hf_wkv {

typedef int64_t i64;

// Calls fn.template operator()<F>() with F the element type named by the dtype code.
#define WKV_DISPATCH_DTYPE(dtype, ...)                              \
    switch (dtype) {                                                \
        case kFloat32: { typedef float F; __VA_ARGS__; break; }     \
        case kFloat16: { typedef wkv_fp16 F; __VA_ARGS__; break; }  \
        case kBFloat16: { typedef wkv_bf16 F; __VA_ARGS__; break; } \
        default: return "unsupported input dtype (supported: float32, float16, bfloat16)"; \
    }

#define WKV_DISPATCH_HEAD_SIZE(n, ...)                 \
    switch (n) {                                       \
        case 64: { constexpr int N = 64; __VA_ARGS__; break; }   \
        case 128: { constexpr int N = 128; __VA_ARGS__; break; } \
        default: return "unsupported head size (supported: 64, 128)"; \
    }

}  // namespace rwkv_hf_wkv
