// Host-side entry points of the WKV kernels (defined in wkv4.cu, wkv5.cu, wkv7.cu; called by wkv_ops.cpp).
//
// Every pointer is a contiguous device buffer. Inputs typed `void` hold elements of `dtype`; everything
// else (log_w, u, w, states, outputs, gradients) is fp32. Each function launches on `stream` without synchronising and returns nullptr on success or
// a message saying what was not supported / what the CUDA runtime rejected.
//
// Layouts (B batch, T tokens, H heads, N head size, C = H*N):
//   v4: k, v, y [B,T,C]; w, u [C]; state [B,3,C] = (aa, bb, pp); checkpoints [B, ceil(T/K4), 3, C]
//   v5: r, k, v, y [B,T,H,N]; log_w at element b*lw_sb + t*lw_st + h*N + n; u [H,N];
//       state [B,H,N(key),N(value)]
//   v7: r, log_w, k, v, a, b, y, sa [B,T,H,N]; state [B,H,N(value),N(key)];
//       checkpoints [B,H,ceil(T/K7),N(key),N(value)] (the transposed state before every K7-th token);
//       scratch [B,H,K7,N(value),N(key)]
#pragma once

#include <cstdint>

#ifdef WKV_HOST_EMU
#include "wkv_host_emu.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace rwkv_hf_wkv {

enum DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int K4 = 16;  // v4 backward: tokens between state checkpoints
constexpr int K7 = 16;  // v7 backward: tokens between state checkpoints

const char* wkv4_forward(int dtype, int B, int T, int C, const float* w, const float* u, const void* k,
                         const void* v, const float* s0, float* y, float* sT, float* ckpt, cudaStream_t stream);
const char* wkv4_backward(int dtype, int B, int T, int C, const float* w, const float* u, const void* k,
                          const void* v, const float* ckpt, const float* gy, const float* gsT, float* gw_part,
                          float* gu_part, float* gk, float* gv, float* gs0, cudaStream_t stream);

const char* wkv5_forward(int dtype, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                         const float* lw, int64_t lw_sb, int64_t lw_st, const float* u, const float* s0, float* y,
                         float* sT, cudaStream_t stream);
const char* wkv5_backward(int dtype, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                          const float* lw, int64_t lw_sb, int64_t lw_st, const float* u, const float* s0,
                          const float* gy, const float* gsT, float* gr, float* gk, float* gv, float* glw,
                          float* gu_part, float* gs0, cudaStream_t stream);

const char* wkv7_forward(int dtype, int B, int T, int H, int N, const void* r, const float* lw, const void* k,
                         const void* v, const void* a, const void* b, const float* s0, float* y, float* sT,
                         float* ckpt, float* sa, cudaStream_t stream);
const char* wkv7_backward(int dtype, int B, int T, int H, int N, const void* r, const float* lw, const void* k,
                          const void* v, const void* a, const void* b, const float* gy, const float* gsT,
                          const float* ckpt, const float* sa, float* scratch, float* dsa, float* gr, float* glw,
                          float* gk, float* gv, float* ga, float* gb, float* gs0, cudaStream_t stream);

}  // namespace rwkv_hf_wkv
