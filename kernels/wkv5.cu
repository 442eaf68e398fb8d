// RWKV-5.2 / RWKV-6 WKV (matrix state per head, per-token per-key-channel decay, bonus u), forward and backward.
//
// State S [key i][value j] per (batch, head), as ops_rwkv_hf.wkv5_recurrent:
//   y_t[j] = sum_i r_t[i] (S[i][j] + u[i] k_t[i] v_t[j]);     S[i][j] <- w_t[i] S[i][j] + k_t[i] v_t[j]
// with w_t = exp(log_w_t). One block of N threads per (batch, head), sequential in time.
//
// Backward (no stored states; three passes of the same cost as the forward):
//   rows   (thread = key i, forward in time) recomputes S and gives  dr_t = S_{t-1} gy_t + u.k_t (gy_t.v_t);
//          then (backward in time) carries dS and gives  dk_t = dS_t v_t + r_t.u (gy_t.v_t),  du,  dS_0,
//          and d log_w through  X_t = sum_j dS_t[i][j] S_t[i][j]:
//            d log_w_t = X_t - k_t . (dS_t v_t),   X_{t-1} = d log_w_t + r_t . (S_{t-1} gy_t)
//          (exact algebra: no division by the decay and no exponentials, so any decay in [0, 1] is fine).
//   cols   (thread = value j, backward in time) carries dS column j and gives  dv_t = dS_t^T k_t + (r.u.k) gy_t.
// Here dS_t is the gradient w.r.t. the state after token t: dS_{t-1} = w_t . dS_t + r_t gy_t^T.
#include "wkv_common.cuh"

namespace rwkv_hf_wkv {

template <typename F, int N>
__global__ void __launch_bounds__(N) wkv5_forward_kernel(int T, int H, const F* __restrict__ r_,
                                                         const F* __restrict__ k_, const F* __restrict__ v_,
                                                         const float* __restrict__ lw_, i64 lw_sb, i64 lw_st,
                                                         const float* __restrict__ u_, const float* __restrict__ s0_,
                                                         float* __restrict__ y_, float* __restrict__ sT_) {
    const int bh = blockIdx.x, b = bh / H, h = bh % H, j = threadIdx.x;
    __shared__ float rs[N], ks[N], ws[N], us[N];
    float S[N];  // column j of the state: S[i] = state[i][j]
    const float* s0 = s0_ + i64(bh) * N * N + j;
#pragma unroll
    for (int i = 0; i < N; ++i) S[i] = s0[i64(i) * N];
    us[j] = u_[h * N + j];
    const float* lw = lw_ + i64(b) * lw_sb + i64(h) * N + j;
    // Token t+1's inputs are loaded while token t is computed, to hide the global-memory latency.
    const i64 stride_t = i64(H) * N;
    i64 idx = (i64(b) * T * H + h) * N + j;
    F r_n = F(), k_n = F(), v_n = F();
    float lw_n = 0.f;
    if (T > 0) {
        r_n = r_[idx];
        k_n = k_[idx];
        v_n = v_[idx];
        lw_n = lw[0];
    }
    for (int t = 0; t < T; ++t, idx += stride_t) {
        const float r_c = to_float(r_n), k_c = to_float(k_n), vj = to_float(v_n), lw_c = lw_n;
        if (t + 1 < T) {
            r_n = r_[idx + stride_t];
            k_n = k_[idx + stride_t];
            v_n = v_[idx + stride_t];
            lw_n = lw[i64(t + 1) * lw_st];
        }
        __syncthreads();
        rs[j] = r_c;
        ks[j] = k_c;
        ws[j] = expf(lw_c);
        __syncthreads();
        float y = 0.f;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float kv = ks[i] * vj;
            y += rs[i] * (us[i] * kv + S[i]);
            S[i] = S[i] * ws[i] + kv;
        }
        y_[idx] = y;
    }
    float* sT = sT_ + i64(bh) * N * N + j;
#pragma unroll
    for (int i = 0; i < N; ++i) sT[i64(i) * N] = S[i];
}

// grid (B*H, 2): blockIdx.y == 0 runs the row passes, blockIdx.y == 1 the column pass.
template <typename F, int N>
__global__ void __launch_bounds__(N) wkv5_backward_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ k_, const F* __restrict__ v_,
    const float* __restrict__ lw_, i64 lw_sb, i64 lw_st, const float* __restrict__ u_, const float* __restrict__ s0_,
    const float* __restrict__ gy_, const float* __restrict__ gsT_, float* __restrict__ gr_, float* __restrict__ gk_,
    float* __restrict__ gv_, float* __restrict__ glw_, float* __restrict__ gu_part_, float* __restrict__ gs0_) {
    const int bh = blockIdx.x, b = bh / H, h = bh % H, n = threadIdx.x;
    __shared__ float sh_a[N], sh_b[N], sh_c[N], us[N];
    float X[N];  // rows: row n of S, then of dS.   cols: column n of dS.
    us[n] = u_[h * N + n];
    const float* lw = lw_ + i64(b) * lw_sb + i64(h) * N;
    const i64 sbase = i64(bh) * N * N;
    if (blockIdx.y == 0) {
        // ---- rows, thread = key channel i = n ----
        const float ui = u_[h * N + n];
        float* vs = sh_a;
        float* gys = sh_b;
#pragma unroll
        for (int j = 0; j < N; ++j) X[j] = s0_[sbase + i64(n) * N + j];
        for (int t = 0; t < T; ++t) {
            const i64 idx = ((i64(b) * T + t) * H + h) * N + n;
            __syncthreads();
            vs[n] = to_float(v_[idx]);
            gys[n] = gy_[idx];
            __syncthreads();
            const float ki = to_float(k_[idx]);
            const float wi = expf(lw[i64(t) * lw_st + n]);
            float dr = 0.f, gyv = 0.f;
#pragma unroll
            for (int j = 0; j < N; ++j) {
                dr += X[j] * gys[j];
                gyv += gys[j] * vs[j];
                X[j] = X[j] * wi + ki * vs[j];
            }
            gr_[idx] = dr + ui * ki * gyv;
        }
        // X is now row n of the final state S_T.
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const float g = gsT_[sbase + i64(n) * N + j];
            acc += g * X[j];
            X[j] = g;
        }
        float gu = 0.f;
        for (int t = T - 1; t >= 0; --t) {
            const i64 idx = ((i64(b) * T + t) * H + h) * N + n;
            __syncthreads();
            vs[n] = to_float(v_[idx]);
            gys[n] = gy_[idx];
            __syncthreads();
            const float ki = to_float(k_[idx]), ri = to_float(r_[idx]);
            const float wi = expf(lw[i64(t) * lw_st + n]);
            const float gri = gr_[idx];  // written by this thread in the forward pass
            float dkp = 0.f, gyv = 0.f;
#pragma unroll
            for (int j = 0; j < N; ++j) {
                dkp += X[j] * vs[j];
                gyv += gys[j] * vs[j];
            }
            const float bonus = ui * ki * gyv;
            gk_[idx] = dkp + ri * ui * gyv;
            gu += ri * ki * gyv;
            acc -= ki * dkp;
            glw_[idx] = acc;
            acc += ri * (gri - bonus);
#pragma unroll
            for (int j = 0; j < N; ++j) X[j] = X[j] * wi + ri * gys[j];
        }
#pragma unroll
        for (int j = 0; j < N; ++j) gs0_[sbase + i64(n) * N + j] = X[j];
        gu_part_[i64(bh) * N + n] = gu;
    } else {
        // ---- columns, thread = value channel j = n ----
        float* ks = sh_a;
        float* rs = sh_b;
        float* ws = sh_c;
#pragma unroll
        for (int i = 0; i < N; ++i) X[i] = gsT_[sbase + i64(i) * N + n];
        for (int t = T - 1; t >= 0; --t) {
            const i64 idx = ((i64(b) * T + t) * H + h) * N + n;
            __syncthreads();
            ks[n] = to_float(k_[idx]);
            rs[n] = to_float(r_[idx]);
            ws[n] = expf(lw[i64(t) * lw_st + n]);
            __syncthreads();
            const float gyj = gy_[idx];
            float dv = 0.f, ruk = 0.f;
#pragma unroll
            for (int i = 0; i < N; ++i) {
                dv += X[i] * ks[i];
                ruk += rs[i] * us[i] * ks[i];
                X[i] = X[i] * ws[i] + rs[i] * gyj;
            }
            gv_[idx] = dv + ruk * gyj;
        }
    }
}

const char* wkv5_forward(int dtype, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                         const float* lw, int64_t lw_sb, int64_t lw_st, const float* u, const float* s0, float* y,
                         float* sT, cudaStream_t stream) {
    WKV_DISPATCH_DTYPE(dtype, WKV_DISPATCH_HEAD_SIZE(N, WKV_LAUNCH(dim3(B * H), dim3(N), stream,
                                                                   wkv5_forward_kernel<F, N>)(
                                                            T, H, (const F*)r, (const F*)k, (const F*)v,
                                                            lw, lw_sb, lw_st, u, s0, y, sT)));
    return WKV_LAUNCH_ERROR();
}

const char* wkv5_backward(int dtype, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                          const float* lw, int64_t lw_sb, int64_t lw_st, const float* u, const float* s0,
                          const float* gy, const float* gsT, float* gr, float* gk, float* gv, float* glw,
                          float* gu_part, float* gs0, cudaStream_t stream) {
    WKV_DISPATCH_DTYPE(dtype, WKV_DISPATCH_HEAD_SIZE(N, WKV_LAUNCH(dim3(B * H, 2), dim3(N), stream,
                                                                   wkv5_backward_kernel<F, N>)(
                                                            T, H, (const F*)r, (const F*)k, (const F*)v,
                                                            lw, lw_sb, lw_st, u, s0, gy, gsT, gr, gk,
                                                            gv, glw, gu_part, gs0)));
    return WKV_LAUNCH_ERROR();
}

}  // namespace rwkv_hf_wkv
