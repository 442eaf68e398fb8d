// RWKV-7 WKV (generalised delta rule), forward and backward, with initial state in, final state out and the
// gradient w.r.t. the initial state.
//
// State S [value j][key i] per (batch, head), as ops_rwkv_hf.wkv7_recurrent:
//   sa = S a_t;   S <- S diag(w_t) + sa b_t^T + v_t k_t^T;   y_t = S r_t        (w_t = exp(log_w_t))
//
// Forward: one block of N threads per (batch, head), thread j owns row j of S in registers, sequential in
// time (the RWKV-LM / official-package layout). When a backward will follow it also stores sa_t and the
// state before every K7-th token (transposed, so the stores are coalesced).
//
// Backward, two kernels:
//   rows (thread = value j, backward in time) carries row j of dS (the gradient w.r.t. the state after
//        token t, y_t's term included) and gives  dv_t = dS_t k_t,  dsa_t = dS_t b_t  (stored),  dS_0;
//        dS_{t-1} = dS_t diag(w_t) + dsa_t a_t^T.
//   cols (thread = key i) walks the checkpoint chunks from the last: recomputes the chunk's states from
//        the checkpoint and the stored sa into a per-(batch, head) scratch (column i only: no thread reads
//        another's data), then walks the chunk backward carrying column i of dS:
//        dr_t = S_t^T gy_t,  dk_t = dS_t^T v_t,  db_t = dS_t^T sa_t,  da_t = S_{t-1}^T dsa_t,
//        d log_w_t = w_t . (dS_t . S_{t-1}) summed over values.
// States are recomputed, never reconstructed by dividing by the decay, so any decay in [0, 1] is exact.
#include "wkv_common.cuh"

namespace rwkv_hf_wkv {

// Row-wise state I/O of 4 floats at a time (rows are N floats, N % 4 == 0, and torch buffers are aligned).
template <int N>
__device__ __forceinline__ void load_row(float (&dst)[N], const float* __restrict__ src) {
    const float4* s4 = reinterpret_cast<const float4*>(src);
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
        const float4 x = s4[q];
        dst[4 * q] = x.x;
        dst[4 * q + 1] = x.y;
        dst[4 * q + 2] = x.z;
        dst[4 * q + 3] = x.w;
    }
}

template <int N>
__device__ __forceinline__ void store_row(float* __restrict__ dst, const float (&src)[N]) {
    float4* d4 = reinterpret_cast<float4*>(dst);
#pragma unroll
    for (int q = 0; q < N / 4; ++q) d4[q] = make_float4(src[4 * q], src[4 * q + 1], src[4 * q + 2], src[4 * q + 3]);
}

template <typename F, int N>
__global__ void __launch_bounds__(N) wkv7_forward_kernel(int T, int H, const F* __restrict__ r_,
                                                         const float* __restrict__ lw_, const F* __restrict__ k_,
                                                         const F* __restrict__ v_, const F* __restrict__ a_,
                                                         const F* __restrict__ b_, const float* __restrict__ s0_,
                                                         float* __restrict__ y_, float* __restrict__ sT_,
                                                         float* __restrict__ ckpt_, float* __restrict__ sa_) {
    const int bh = blockIdx.x, b = bh / H, h = bh % H, j = threadIdx.x;
    __shared__ float rs[N], ws[N], ks[N], as[N], bs[N];
    float S[N];  // row j of the state: S[i] = state[j][i]
    load_row<N>(S, s0_ + (i64(bh) * N + j) * N);
    const int nck = (T + K7 - 1) / K7;
    // Token t+1's inputs are loaded while token t is computed, to hide the global-memory latency.
    const i64 stride_t = i64(H) * N;
    i64 idx = (i64(b) * T * H + h) * N + j;
    F r_n = F(), k_n = F(), v_n = F(), a_n = F(), b_n = F();
    float lw_n = 0.f;
    if (T > 0) {
        r_n = r_[idx];
        k_n = k_[idx];
        v_n = v_[idx];
        a_n = a_[idx];
        b_n = b_[idx];
        lw_n = lw_[idx];
    }
    for (int t = 0; t < T; ++t, idx += stride_t) {
        const float r_c = to_float(r_n), k_c = to_float(k_n), v_c = to_float(v_n);
        const float a_c = to_float(a_n), b_c = to_float(b_n), lw_c = lw_n;
        if (t + 1 < T) {
            const i64 nx = idx + stride_t;
            r_n = r_[nx];
            k_n = k_[nx];
            v_n = v_[nx];
            a_n = a_[nx];
            b_n = b_[nx];
            lw_n = lw_[nx];
        }
        __syncthreads();
        rs[j] = r_c;
        ws[j] = expf(lw_c);
        ks[j] = k_c;
        as[j] = a_c;
        bs[j] = b_c;
        __syncthreads();
        if (ckpt_ != nullptr && t % K7 == 0) {
            float* ck = ckpt_ + (i64(bh) * nck + t / K7) * N * N + j;
#pragma unroll
            for (int i = 0; i < N; ++i) ck[i64(i) * N] = S[i];
        }
        float sa = 0.f;
#pragma unroll
        for (int i = 0; i < N; ++i) sa += S[i] * as[i];
        if (sa_ != nullptr) sa_[idx] = sa;
        float y = 0.f;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float s = S[i] * ws[i] + sa * bs[i] + v_c * ks[i];
            S[i] = s;
            y += s * rs[i];
        }
        y_[idx] = y;
    }
    store_row<N>(sT_ + (i64(bh) * N + j) * N, S);
}

template <typename F, int N>
__global__ void __launch_bounds__(N) wkv7_backward_rows_kernel(
    int T, int H, const F* __restrict__ r_, const float* __restrict__ lw_, const F* __restrict__ k_,
    const F* __restrict__ a_, const F* __restrict__ b_, const float* __restrict__ gy_, const float* __restrict__ gsT_,
    float* __restrict__ dsa_, float* __restrict__ gv_, float* __restrict__ gs0_) {
    const int bh = blockIdx.x, b = bh / H, h = bh % H, j = threadIdx.x;
    __shared__ float rs[N], ws[N], ks[N], as[N], bs[N];
    float dS[N];  // row j of dS
    const i64 sbase = (i64(bh) * N + j) * N;
    load_row<N>(dS, gsT_ + sbase);
    for (int t = T - 1; t >= 0; --t) {
        const i64 idx = ((i64(b) * T + t) * H + h) * N + j;
        __syncthreads();
        rs[j] = to_float(r_[idx]);
        ws[j] = expf(lw_[idx]);
        ks[j] = to_float(k_[idx]);
        as[j] = to_float(a_[idx]);
        bs[j] = to_float(b_[idx]);
        __syncthreads();
        const float gyj = gy_[idx];
        float dsa = 0.f, dv = 0.f;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float d = dS[i] + gyj * rs[i];
            dS[i] = d;
            dsa += d * bs[i];
            dv += d * ks[i];
        }
        dsa_[idx] = dsa;
        gv_[idx] = dv;
#pragma unroll
        for (int i = 0; i < N; ++i) dS[i] = dS[i] * ws[i] + dsa * as[i];
    }
    store_row<N>(gs0_ + sbase, dS);
}

template <typename F, int N>
__global__ void __launch_bounds__(N) wkv7_backward_cols_kernel(
    int T, int H, const F* __restrict__ r_, const float* __restrict__ lw_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_, const float* __restrict__ gy_,
    const float* __restrict__ gsT_, const float* __restrict__ ckpt_, const float* __restrict__ sa_,
    const float* __restrict__ dsa_, float* __restrict__ scratch_, float* __restrict__ gr_, float* __restrict__ glw_,
    float* __restrict__ gk_, float* __restrict__ ga_, float* __restrict__ gb_) {
    const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
    __shared__ float vs[N], sas[N], gys[N], dsas[N];
    float dS[N];  // column i of dS: dS[j] = dstate[j][i]
#pragma unroll
    for (int j = 0; j < N; ++j) dS[j] = gsT_[(i64(bh) * N + j) * N + i];
    const int nck = (T + K7 - 1) / K7;
    float* scr = scratch_ + i64(bh) * K7 * N * N + i;  // scr[m*N*N + j*N] = state[j][i] before token t0+m
    for (int c = nck - 1; c >= 0; --c) {
        const int t0 = c * K7;
        const int L = (T - t0) < K7 ? (T - t0) : K7;
        const float* ck = ckpt_ + (i64(bh) * nck + c) * N * N + i64(i) * N;  // ck[j] = state[j][i] before t0
        // Recompute the states before tokens t0+1 .. t0+L-1 (column i).
        for (int m = 1; m < L; ++m) {
            const int t = t0 + m - 1;
            const i64 idx = ((i64(b) * T + t) * H + h) * N + i;
            __syncthreads();
            vs[i] = to_float(v_[idx]);
            sas[i] = sa_[idx];
            __syncthreads();
            const float wi = expf(lw_[idx]), ki = to_float(k_[idx]), bi = to_float(b_[idx]);
            const float* prev = (m == 1) ? ck : scr + i64(m - 1) * N * N;
            const i64 prev_stride = (m == 1) ? 1 : N;
            float* cur = scr + i64(m) * N * N;
#pragma unroll 8
            for (int j = 0; j < N; ++j) cur[i64(j) * N] = prev[j * prev_stride] * wi + sas[j] * bi + vs[j] * ki;
        }
        // Walk the chunk backward.
        for (int m = L - 1; m >= 0; --m) {
            const int t = t0 + m;
            const i64 idx = ((i64(b) * T + t) * H + h) * N + i;
            __syncthreads();
            vs[i] = to_float(v_[idx]);
            sas[i] = sa_[idx];
            gys[i] = gy_[idx];
            dsas[i] = dsa_[idx];
            __syncthreads();
            const float ri = to_float(r_[idx]), wi = expf(lw_[idx]), ki = to_float(k_[idx]);
            const float ai = to_float(a_[idx]), bi = to_float(b_[idx]);
            const float* prev = (m == 0) ? ck : scr + i64(m) * N * N;
            const i64 prev_stride = (m == 0) ? 1 : N;
            float dk = 0.f, db = 0.f, gyS = 0.f, dsaS = 0.f, dw = 0.f, vgy = 0.f, sagy = 0.f;
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const float d = dS[j] + gys[j] * ri;  // gradient w.r.t. state[j][i] after token t
                const float s = prev[j * prev_stride];  // state[j][i] before token t
                dk += d * vs[j];
                db += d * sas[j];
                dw += d * s;
                gyS += s * gys[j];
                dsaS += s * dsas[j];
                vgy += vs[j] * gys[j];
                sagy += sas[j] * gys[j];
                dS[j] = d * wi + dsas[j] * ai;
            }
            gr_[idx] = wi * gyS + bi * sagy + ki * vgy;
            gk_[idx] = dk;
            gb_[idx] = db;
            ga_[idx] = dsaS;
            glw_[idx] = wi * dw;
        }
    }
}

const char* wkv7_forward(int dtype, int B, int T, int H, int N, const void* r, const float* lw, const void* k,
                         const void* v, const void* a, const void* b, const float* s0, float* y, float* sT,
                         float* ckpt, float* sa, cudaStream_t stream) {
    WKV_DISPATCH_DTYPE(dtype, WKV_DISPATCH_HEAD_SIZE(N, WKV_LAUNCH(dim3(B * H), dim3(N), stream,
                                                                   wkv7_forward_kernel<F, N>)(
                                                            T, H, (const F*)r, lw, (const F*)k, (const F*)v,
                                                            (const F*)a, (const F*)b, s0, y, sT, ckpt, sa)));
    return WKV_LAUNCH_ERROR();
}

const char* wkv7_backward(int dtype, int B, int T, int H, int N, const void* r, const float* lw, const void* k,
                          const void* v, const void* a, const void* b, const float* gy, const float* gsT,
                          const float* ckpt, const float* sa, float* scratch, float* dsa, float* gr, float* glw,
                          float* gk, float* gv, float* ga, float* gb, float* gs0, cudaStream_t stream) {
    WKV_DISPATCH_DTYPE(dtype, WKV_DISPATCH_HEAD_SIZE(N, {
        WKV_LAUNCH(dim3(B * H), dim3(N), stream, wkv7_backward_rows_kernel<F, N>)(
            T, H, (const F*)r, lw, (const F*)k, (const F*)a, (const F*)b, gy, gsT, dsa, gv, gs0);
        const char* err = WKV_LAUNCH_ERROR();
        if (err != nullptr) return err;
        WKV_LAUNCH(dim3(B * H), dim3(N), stream, wkv7_backward_cols_kernel<F, N>)(
            T, H, (const F*)r, lw, (const F*)k, (const F*)v, (const F*)a, (const F*)b, gy, gsT, ckpt, sa, dsa,
            scratch, gr, glw, gk, ga, gb);
    }));
    return WKV_LAUNCH_ERROR();
}

}  // namespace rwkv_hf_wkv
